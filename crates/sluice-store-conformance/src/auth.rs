//! Authorization records: client assertions already used (replay protection) and the audit
//! trail, apart from FHIR data.

use crate::Store;
use sluice_store::{AuditQuery, AuditRecord, ReadResult, ScanFilter};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

/// `remember_assertion` accepts a key once until it expires: the same key again is a replay
/// (`false`), another key is new (`true`), and a key whose expiry has passed is accepted again.
pub async fn assertions_are_remembered_until_they_expire<S: Store>(store: S) {
    let later = OffsetDateTime::now_utc() + Duration::hours(1);
    assert!(store.remember_assertion("client-a|jti-1", later).await.unwrap(), "first use");
    assert!(!store.remember_assertion("client-a|jti-1", later).await.unwrap(), "a replay");
    assert!(!store.remember_assertion("client-a|jti-1", later + Duration::hours(1)).await.unwrap(), "still a replay");
    assert!(store.remember_assertion("client-a|jti-2", later).await.unwrap(), "another jti");
    assert!(store.remember_assertion("client-b|jti-1", later).await.unwrap(), "another client");

    let past = OffsetDateTime::now_utc() - Duration::seconds(10);
    assert!(store.remember_assertion("client-a|jti-old", past).await.unwrap(), "first use");
    assert!(
        store.remember_assertion("client-a|jti-old", later).await.unwrap(),
        "its expiry has passed: accepted again"
    );
    assert!(!store.remember_assertion("client-a|jti-old", later).await.unwrap(), "remembered again, until later");
    assert!(!store.remember_assertion("client-a|jti-1", later).await.unwrap(), "unexpired keys survive purges");
}

/// Eight callers remembering the same key at once: exactly one is accepted.
pub async fn concurrent_assertions_are_accepted_once<S: Store>(store: S) {
    let s = Arc::new(store);
    let later = OffsetDateTime::now_utc() + Duration::hours(1);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.remember_assertion("client-a|jti-race", later).await.unwrap() })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        accepted += usize::from(t.await.unwrap());
    }
    assert_eq!(accepted, 1, "exactly one caller is accepted");
    assert!(!s.remember_assertion("client-a|jti-race", later).await.unwrap(), "and it stays remembered");
}

/// An audit record at `seconds` after a fixed instant.
fn record(id: &str, seconds: i64, agent: Option<&str>) -> AuditRecord {
    let recorded = OffsetDateTime::from_unix_timestamp(1_750_000_000 + seconds).unwrap();
    let json = format!(
        r#"{{"resourceType": "AuditEvent", "id": "{id}", "recorded": "{seconds}",  "agent": [{{"who": {:?}}}]}}"#,
        agent.unwrap_or("?")
    );
    AuditRecord { id: id.to_string(), recorded, agent: agent.map(str::to_string), json }
}

/// The ids of audit records, in order.
fn ids(records: &[AuditRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

/// `audit_query` returns the appended records oldest first (then by id), exactly as appended,
/// filtered by `since` (inclusive), `before` (exclusive), `agent` and `limit`; no FHIR read,
/// count or scan sees them.
pub async fn audit_events_are_appended_and_queried<S: Store>(store: S) {
    let s = Arc::new(store);
    let all = |limit| AuditQuery { limit, ..Default::default() };
    assert!(s.audit_query(&all(100)).await.unwrap().is_empty());

    // Appended out of order; "b" and "b2" share their time, so the id orders them.
    let (a, b, b2, c) = (
        record("a", 0, Some("client-1")),
        record("b", 60, None),
        record("b2", 60, Some("root")),
        record("c", 120, Some("client-1")),
    );
    for r in [&c, &b2, &a, &b] {
        s.audit_append(r).await.unwrap();
    }
    let got = s.audit_query(&all(100)).await.unwrap();
    assert_eq!(got, vec![a.clone(), b.clone(), b2.clone(), c.clone()], "oldest first, each exactly as appended");

    let t = |r: &AuditRecord| Some(r.recorded);
    let q = AuditQuery { since: t(&b), ..all(100) };
    assert_eq!(ids(&s.audit_query(&q).await.unwrap()), ["b", "b2", "c"], "since is inclusive");
    let q = AuditQuery { before: t(&b), ..all(100) };
    assert_eq!(ids(&s.audit_query(&q).await.unwrap()), ["a"], "before is exclusive");
    let q = AuditQuery { since: t(&b), before: t(&c), ..all(100) };
    assert_eq!(ids(&s.audit_query(&q).await.unwrap()), ["b", "b2"]);
    let q = AuditQuery { agent: Some("client-1".into()), ..all(100) };
    assert_eq!(ids(&s.audit_query(&q).await.unwrap()), ["a", "c"], "by agent");
    let q = AuditQuery { agent: Some("client-1".into()), since: t(&b), ..all(100) };
    assert_eq!(ids(&s.audit_query(&q).await.unwrap()), ["c"], "all conditions hold");
    let q = AuditQuery { agent: Some("nobody".into()), ..all(100) };
    assert!(s.audit_query(&q).await.unwrap().is_empty());
    assert_eq!(ids(&s.audit_query(&all(2)).await.unwrap()), ["a", "b"], "limit keeps the oldest");
    assert!(s.audit_query(&all(0)).await.unwrap().is_empty(), "limit 0 is none");
    let q = AuditQuery { since: Some(c.recorded + Duration::seconds(1)), ..all(100) };
    assert!(s.audit_query(&q).await.unwrap().is_empty());

    // Sub-second times keep their order and come back as they were recorded (to the
    // microsecond).
    let mut d = record("d", 120, Some("client-2"));
    d.recorded += Duration::microseconds(250_001);
    s.audit_append(&d).await.unwrap();
    let q = AuditQuery { since: Some(c.recorded + Duration::microseconds(1)), ..all(100) };
    assert_eq!(s.audit_query(&q).await.unwrap(), vec![d.clone()]);
    let q = AuditQuery { before: t(&d), ..all(100) };
    assert_eq!(ids(&s.audit_query(&q).await.unwrap()), ["a", "b", "b2", "c"]);

    // Apart from FHIR data: no read, count or scan sees them.
    assert_eq!(s.read("AuditEvent", "a").await.unwrap(), ReadResult::NotFound);
    let snap = s.snapshot().await.unwrap();
    assert!(s.count(&snap, &ScanFilter::default()).await.unwrap().is_empty(), "no export counts them");
    s.release(&snap).await;
}
