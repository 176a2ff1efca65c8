//! Snapshots: what they hold, under concurrent writes too, and what they refuse.

use crate::Store;
use crate::support::{mark, obs, res, scan_ids, set, strings};
use serde_json::{Value, json};
use sluice_store::{NewResource, Patients, ReadResult, ScanFilter, Snapshot, StoreError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};
use tokio::sync::mpsc;

/// A snapshot never sees a write made after it: scans, counts and `read_at` read the state
/// at its time, while later snapshots see the later writes; `_since` and `_until` windows
/// select by `lastUpdated`.
pub async fn snapshots_isolate_later_writes<S: Store>(store: S) {
    let s = Arc::new(store);
    let wa = s.put(obs("a", "p1", "final")).await.unwrap();
    let wb = s.put(obs("b", "p2", "final")).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    assert!(snap.time >= wa.last_updated && snap.time >= wb.last_updated, "it holds every write before it");
    assert!(s.can_resume(&snap).await, "a snapshot not released can be resumed");
    // After the snapshot: an update (into another compartment), a delete and a create.
    let upd = s.put(obs("a", "p2", "amended")).await.unwrap();
    assert_eq!(upd.version_id, 2);
    assert!(upd.last_updated > snap.time, "writes after a snapshot are later than its time");
    s.delete("Observation", "b").await.unwrap();
    s.put(obs("c", "p1", "final")).await.unwrap();
    assert_eq!(s.read("Observation", "b").await.unwrap(), ReadResult::Deleted(2));

    let all = ScanFilter::default();
    assert_eq!(scan_ids(&s, &snap, "Observation", &all).await, set(&["a", "b"]));
    let a_then = s.read_at(&snap, "Observation", "a").await.unwrap().unwrap();
    assert!(a_then.contains("\"final\""), "the snapshot reads the old version");
    assert_eq!(s.count(&snap, &all).await.unwrap(), BTreeMap::from([("Observation".to_string(), 2)]));
    let p1 = ScanFilter { patients: Some(Patients::Only(vec!["p1".into()])), ..Default::default() };
    assert_eq!(scan_ids(&s, &snap, "Observation", &p1).await, set(&["a"]), "a was in p1's compartment then");

    let now = s.snapshot().await.unwrap();
    assert!(now.time >= snap.time);
    assert_eq!(scan_ids(&s, &now, "Observation", &all).await, set(&["a", "c"]));
    assert_eq!(scan_ids(&s, &now, "Observation", &p1).await, set(&["c"]));
    // _since the first snapshot: exactly what changed after it (the delete is not output).
    let since = ScanFilter { since: Some(snap.time), ..Default::default() };
    assert_eq!(scan_ids(&s, &now, "Observation", &since).await, set(&["a", "c"]));
    let until = ScanFilter { until: Some(snap.time), ..Default::default() };
    assert!(scan_ids(&s, &now, "Observation", &until).await.is_empty(), "a was updated, b deleted after it");
    let any = ScanFilter { patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(s.count(&now, &any).await.unwrap().get("Observation"), Some(&2));
    // The first snapshot still reads as it did.
    assert_eq!(scan_ids(&s, &snap, "Observation", &all).await, set(&["a", "b"]));
    s.release(&now).await;
    s.release(&snap).await;
}

/// Writers keep creating resources while snapshots are taken: every snapshot holds exactly
/// the resources whose lastUpdated is at or before its time (no write is half in).
pub async fn snapshots_under_concurrent_writes_are_exact<S: Store>(store: S) {
    let s = Arc::new(store);
    let mut writers = Vec::new();
    for w in 0..3 {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..150 {
                s.put(obs(&format!("w{w}-{i}"), "p", "final")).await.unwrap();
            }
        }));
    }
    let mut snaps = Vec::new();
    for _ in 0..10 {
        snaps.push(s.snapshot().await.unwrap());
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
    // The final state: every resource with its lastUpdated.
    let last = s.snapshot().await.unwrap();
    let (tx, mut rx) = mpsc::channel(4);
    let (s2, last2) = (s.clone(), last.clone());
    let h = tokio::spawn(async move { s2.scan(&last2, "Observation", &ScanFilter::default(), 4096, tx).await });
    let mut stamps = Vec::new();
    while let Some(b) = rx.recv().await {
        for l in b.lines() {
            let v: Value = serde_json::from_slice(l).unwrap();
            let t = sluice_fhir::instant::parse(v["meta"]["lastUpdated"].as_str().unwrap()).unwrap();
            stamps.push((v["id"].as_str().unwrap().to_string(), t));
        }
    }
    h.await.unwrap().unwrap();
    assert_eq!(stamps.len(), 450);
    for snap in &snaps {
        let expected: BTreeSet<String> =
            stamps.iter().filter(|(_, t)| *t <= snap.time).map(|(i, _)| i.clone()).collect();
        assert_eq!(scan_ids(&s, snap, "Observation", &ScanFilter::default()).await, expected);
        s.release(snap).await;
    }
    s.release(&last).await;
}

/// A snapshot id the store never gave is refused (`BadSnapshot`) by every read of a snapshot.
pub async fn foreign_snapshots_are_refused<S: Store>(store: S) {
    let s = Arc::new(store);
    s.put(obs("a", "p", "final")).await.unwrap();
    let real = s.snapshot().await.unwrap();
    for id in ["nope", "", "sqlite:x", "pg:'; SELECT 1"] {
        let bad = Snapshot { id: id.into(), time: real.time };
        let refused = |what: &str, r: Result<(), StoreError>| {
            assert!(matches!(r, Err(StoreError::BadSnapshot(_))), "{what} of snapshot {id:?}: {r:?}");
        };
        let all = ScanFilter::default();
        refused("scan", s.scan(&bad, "Observation", &all, 64, mpsc::channel(1).0).await);
        refused("count", s.count(&bad, &all).await.map(drop));
        refused("read_at", s.read_at(&bad, "Observation", "a").await.map(drop));
        refused("read_as_of", s.read_as_of(&bad, "Observation", "a", real.time).await.map(drop));
        let types = strings(&["Observation"]);
        refused("compartment_patients", s.compartment_patients(&bad, &types, &all, mpsc::channel(1).0).await);
        let sources = [("Observation".to_string(), all.clone())];
        refused("scan_many", s.scan_many(&bad, &sources, 64, mpsc::channel(1).0).await);
    }
    assert!(s.read_at(&real, "Observation", "a").await.unwrap().is_some(), "the store's own snapshot reads");
    s.release(&real).await;
}

/// A Group with these members.
fn group(members: &[&str]) -> NewResource {
    let member: Vec<_> = members.iter().map(|p| json!({"entity": {"reference": format!("Patient/{p}")}})).collect();
    res(json!({"resourceType": "Group", "id": "g", "type": "person", "member": member}))
}

/// `read_as_of` gives the version current at an instant: none before the first, each
/// version from its `lastUpdated` on, nothing while deleted, and only what the snapshot
/// holds.
pub async fn read_as_of_gives_the_version_current_at_an_instant<S: Store>(store: S) {
    let s = Arc::new(store);
    // A snapshot between two writes makes the later one strictly later.
    let v1 = s.put(group(&["a"])).await.unwrap();
    mark(&s).await;
    let v2 = s.put(group(&["a", "b"])).await.unwrap();
    mark(&s).await;
    let gone = s.delete("Group", "g").await.unwrap().unwrap();
    let mid = s.snapshot().await.unwrap();
    let v4 = s.put(group(&["c"])).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    let ms = Duration::milliseconds(1);
    let at = |t: OffsetDateTime| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { s.read_as_of(&snap, "Group", "g", t).await.unwrap() }
    };
    assert_eq!(at(v1.last_updated - ms).await, None, "before its first version");
    assert_eq!(at(v1.last_updated).await, v1.json, "an old version");
    assert_eq!(at(v2.last_updated - ms).await, v1.json);
    assert_eq!(at(v2.last_updated).await, v2.json);
    assert_eq!(at(gone.last_updated).await, None, "deleted then");
    assert_eq!(at(v4.last_updated).await, v4.json, "the current version");
    let later = snap.time + Duration::days(1);
    assert_eq!(at(later).await, v4.json);
    assert_eq!(s.read_as_of(&mid, "Group", "g", later).await.unwrap(), None, "v4 is not in the earlier snapshot");
    assert_eq!(s.read_as_of(&snap, "Group", "nope", later).await.unwrap(), None);
    s.release(&mid).await;
    s.release(&snap).await;
}
