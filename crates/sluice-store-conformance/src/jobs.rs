//! Job records: one active export at a time, compare-and-set saves, leases, and the state
//! machine enforced on every save.

use crate::Store;
use JobStatus::{Accepted, Cancelled, Completed, Failed, InProgress};
use sluice_jobs::{JobError, JobRecord, JobStatus};
use sluice_planner::{ExportPlan, Level};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// A new system-level job.
fn job(id: &str) -> JobRecord {
    JobRecord::new(id.into(), ExportPlan::new(Level::System), "http://x/fhir/$export".into(), OffsetDateTime::now_utc())
}

/// At most one job is active: inserting another fails with `Busy` until the active one
/// finishes. Saves are compare-and-set on the stored status and replace the whole record;
/// leases are renewed by `touch` and by `claim_stale` and given up by `release_lease`;
/// `claim_stale` takes only jobs whose lease ran out; `recent` lists jobs newest first.
pub async fn one_active_job_and_compare_and_set<S: Store>(store: S) {
    let s = Arc::new(store);
    assert_eq!(s.active().await.unwrap(), None);
    assert!(s.unfinished().await.unwrap().is_empty());
    let mut a = job("a");
    s.insert(&a).await.unwrap();
    assert!(matches!(s.insert(&job("b")).await, Err(JobError::Busy(id)) if id == "a"));
    assert_eq!(s.active().await.unwrap().as_deref(), Some("a"));
    // Leases: a job just written is not stale; with a zero lease it is claimed, once renewed.
    assert!(s.claim_stale(Duration::from_secs(10)).await.unwrap().is_empty(), "a live job is not taken");
    let claimed = s.claim_stale(Duration::ZERO).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(s.claim_stale(Duration::from_secs(10)).await.unwrap().is_empty(), "claiming renews the lease");
    assert!(s.touch("a").await.unwrap());
    assert!(!s.touch("zz").await.unwrap(), "no such job");
    // A released lease (the server is shutting down) is taken at once, whatever the lease.
    assert!(s.release_lease("a").await.unwrap());
    let claimed = s.claim_stale(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["a"], "a released lease is stale");
    assert!(s.claim_stale(Duration::from_secs(10)).await.unwrap().is_empty(), "and claimed once");
    assert!(!s.release_lease("zz").await.unwrap(), "no such job");

    a.status = InProgress;
    a.attempts = 1;
    assert!(s.save_if(&a, &[Accepted]).await.unwrap());
    assert!(!s.save_if(&a, &[Accepted]).await.unwrap(), "stale compare-and-set fails");
    let unfinished = s.unfinished().await.unwrap();
    assert_eq!(unfinished.len(), 1);
    assert_eq!((unfinished[0].status, unfinished[0].attempts), (InProgress, 1), "the whole record is saved");
    assert_eq!(s.get("a").await.unwrap().unwrap(), a);

    a.status = Cancelled;
    assert!(s.save_if(&a, &[Accepted, InProgress]).await.unwrap(), "any of the expected statuses");
    assert_eq!(s.active().await.unwrap(), None, "a cancelled job frees the slot at once");
    assert!(!s.touch("a").await.unwrap(), "a cancelled job's runner learns it from its lease");
    assert!(!s.release_lease("a").await.unwrap(), "only an active job's lease is released");
    assert!(s.claim_stale(Duration::ZERO).await.unwrap().is_empty(), "only active jobs are claimed");
    assert!(s.unfinished().await.unwrap().is_empty());
    let mut b = job("b");
    s.insert(&b).await.unwrap();
    assert_eq!(s.get("a").await.unwrap().unwrap().status, Cancelled);
    assert_eq!(s.get("b").await.unwrap().unwrap().plan.level, Level::System);
    assert!(s.get("zz").await.unwrap().is_none());
    let mut zz = job("zz");
    zz.status = InProgress;
    assert!(!s.save_if(&zz, &[Accepted]).await.unwrap(), "no such job: nothing saved");
    assert!(s.get("zz").await.unwrap().is_none());

    // Completed and failed jobs free the slot too.
    b.status = InProgress;
    assert!(s.save_if(&b, &[Accepted]).await.unwrap());
    b.status = Completed;
    assert!(s.save_if(&b, &[InProgress]).await.unwrap());
    assert_eq!(s.active().await.unwrap(), None);
    let mut c = job("c");
    s.insert(&c).await.unwrap();
    c.status = Failed;
    assert!(s.save_if(&c, &[Accepted]).await.unwrap());
    assert_eq!(s.active().await.unwrap(), None);
    s.insert(&job("d")).await.unwrap();
    assert_eq!(s.active().await.unwrap().as_deref(), Some("d"));

    // The recent jobs: newest kick-off first, whatever their status or last save.
    let recent = |n| {
        let s = s.clone();
        async move { s.recent(n).await.unwrap().into_iter().map(|j| (j.id, j.status)).collect::<Vec<_>>() }
    };
    let d = (String::from("d"), Accepted);
    assert_eq!(recent(3).await, [d.clone(), ("c".into(), Failed), ("b".into(), Completed)]);
    assert_eq!(recent(10).await.len(), 4);
    assert!(recent(0).await.is_empty());

    // Retention: finished jobs (completed b, failed c) older than the age, oldest first;
    // never active (d) or cancelled (a) ones.
    let expired = |age| {
        let s = s.clone();
        async move { s.expired(age, 10).await.unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>() }
    };
    assert!(expired(Duration::from_secs(3600)).await.is_empty(), "nothing is an hour old");
    // Both were saved before this instant (the stores keep milliseconds).
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(expired(Duration::ZERO).await, ["b", "c"]);
    assert_eq!(s.expired(Duration::ZERO, 1).await.unwrap().len(), 1);
}

/// Asserts that saving `job` over `expected` is refused as the transition `from -> to`.
async fn refused<S: Store>(s: &S, job: &JobRecord, expected: &[JobStatus], from: JobStatus) {
    let r = s.save_if(job, expected).await;
    assert!(
        matches!(r, Err(JobError::IllegalTransition { from: f, to }) if f == from && to == job.status),
        "{expected:?} -> {:?}: {r:?}",
        job.status
    );
}

/// `save_if` refuses, writing nothing, every status change the state machine forbids
/// (`JobError::IllegalTransition`), whatever the stored record: each expected status must
/// be allowed to become the new one.
pub async fn illegal_transitions_are_refused<S: Store>(store: S) {
    let s = Arc::new(store);
    let mut a = job("a");
    s.insert(&a).await.unwrap();
    a.status = Completed;
    refused(&*s, &a, &[Accepted], Accepted).await;
    let stored = s.get("a").await.unwrap().unwrap();
    assert_eq!((stored.status, s.active().await.unwrap().as_deref()), (Accepted, Some("a")), "nothing written");
    a.status = InProgress;
    refused(&*s, &a, &[Accepted, Completed], Completed).await;
    assert_eq!(s.get("a").await.unwrap().unwrap().status, Accepted, "every expected status must allow it");
    a.status = Accepted;
    refused(&*s, &a, &[Accepted], Accepted).await;

    a.status = InProgress;
    assert!(s.save_if(&a, &[Accepted]).await.unwrap());
    assert!(s.save_if(&a, &[InProgress]).await.unwrap(), "progress is saved in progress");
    a.status = Completed;
    assert!(s.save_if(&a, &[InProgress]).await.unwrap());
    a.status = InProgress;
    refused(&*s, &a, &[Completed], Completed).await;
    a.status = Failed;
    refused(&*s, &a, &[Completed], Completed).await;
    assert_eq!(s.get("a").await.unwrap().unwrap().status, Completed, "a completed export never runs again");
    a.status = Cancelled;
    assert!(s.save_if(&a, &[Completed]).await.unwrap(), "deleting a completed export cancels it");
    for to in [Accepted, InProgress, Completed, Failed, Cancelled] {
        a.status = to;
        refused(&*s, &a, &[Cancelled], Cancelled).await;
    }
    assert_eq!(s.get("a").await.unwrap().unwrap().status, Cancelled, "cancelled is final");
    assert_eq!(s.active().await.unwrap(), None);

    // Refused before the database is asked: even when no record would match.
    let mut ghost = job("ghost");
    ghost.status = Completed;
    refused(&*s, &ghost, &[Accepted], Accepted).await;
    assert!(s.get("ghost").await.unwrap().is_none());
}
