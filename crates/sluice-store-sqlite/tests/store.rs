//! The SQLite store against a real database file: versions, tombstones, snapshots,
//! compartment filters, atomic loads and the job repository.

use serde_json::{Value, json};
use sluice_jobs::{JobError, JobRecord, JobRepo, JobStatus};
use sluice_planner::{ExportPlan, Level};
use sluice_store::{LoadMsg, Patients, ReadResult, ResourceStore, ScanFilter, Snapshot, StoreError, WriteOp, prepare};
use sluice_store_sqlite::SqliteStore;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("s.db")).unwrap();
    (dir, store)
}

fn r(v: Value) -> sluice_store::NewResource {
    prepare(v, None).unwrap()
}

fn obs(id: &str, patient: &str, status: &str) -> sluice_store::NewResource {
    r(
        json!({"resourceType":"Observation","id":id,"status":status,"subject":{"reference":format!("Patient/{patient}")}}),
    )
}

async fn scan_ids(store: &SqliteStore, snap: &Snapshot, t: &str, f: &ScanFilter) -> Vec<String> {
    let (tx, mut rx) = mpsc::channel(4);
    let s = store.clone();
    let (snap, t2, f2) = (snap.clone(), t.to_string(), f.clone());
    let h = tokio::spawn(async move { s.scan(&snap, &t2, &f2, 64, tx).await });
    let mut ids = Vec::new();
    while let Some(b) = rx.recv().await {
        assert_eq!(b.count as usize, b.lines().count());
        for l in b.lines() {
            let v: Value = serde_json::from_slice(l).unwrap();
            assert_eq!(v["resourceType"], t);
            ids.push(v["id"].as_str().unwrap().to_string());
        }
    }
    h.await.unwrap().unwrap();
    ids
}

#[tokio::test]
async fn versions_tombstones_and_unchanged_puts() {
    let (_d, s) = open();
    let w1 = s.put(obs("o1", "p1", "final")).await.unwrap();
    assert!(w1.created && !w1.unchanged);
    assert_eq!(w1.version_id, 1);
    let stored: Value = serde_json::from_str(w1.json.as_deref().unwrap()).unwrap();
    assert_eq!(stored["meta"]["versionId"], "1");
    assert_eq!(stored["meta"]["lastUpdated"], sluice_fhir::instant::format(w1.last_updated));

    let same = s.put(obs("o1", "p1", "final")).await.unwrap();
    assert!(same.unchanged, "identical content writes no version");
    assert_eq!(same.version_id, 1);

    let w2 = s.put(obs("o1", "p1", "amended")).await.unwrap();
    assert!(!w2.created && !w2.unchanged);
    assert_eq!(w2.version_id, 2);
    assert!(w2.last_updated > w1.last_updated);

    let d = s.delete("Observation", "o1").await.unwrap().unwrap();
    assert_eq!(d.version_id, 3);
    assert_eq!(s.read("Observation", "o1").await.unwrap(), ReadResult::Deleted(3));
    assert!(s.delete("Observation", "o1").await.unwrap().is_none(), "deleting twice is a no-op");
    assert_eq!(s.read("Observation", "nope").await.unwrap(), ReadResult::NotFound);

    let again = s.put(obs("o1", "p1", "final")).await.unwrap();
    assert!(again.created, "re-creating after a delete counts as created");
    assert_eq!(again.version_id, 4);
    assert_eq!(s.types_with_data().await.unwrap(), vec!["Observation".to_string()]);
}

#[tokio::test]
async fn a_snapshot_never_sees_later_writes() {
    let (_d, s) = open();
    s.put(obs("a", "p1", "final")).await.unwrap();
    s.put(obs("b", "p1", "final")).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    // After the snapshot: an update, a delete and a create.
    let upd = s.put(obs("a", "p1", "amended")).await.unwrap();
    s.delete("Observation", "b").await.unwrap();
    s.put(obs("c", "p1", "final")).await.unwrap();
    assert!(upd.last_updated > snap.time, "writes after a snapshot are later than its time");

    let all = ScanFilter::default();
    assert_eq!(scan_ids(&s, &snap, "Observation", &all).await, vec!["a", "b"]);
    let a_then = s.read_at(&snap, "Observation", "a").await.unwrap().unwrap();
    assert!(a_then.contains("\"final\""), "the snapshot reads the old version");
    assert_eq!(s.count(&snap, &all).await.unwrap(), BTreeMap::from([("Observation".to_string(), 2)]));

    let now = s.snapshot().await.unwrap();
    assert_eq!(scan_ids(&s, &now, "Observation", &all).await, vec!["a", "c"]);
    // _since the first snapshot: exactly what changed after it (the delete is not output).
    let since = ScanFilter { since: Some(snap.time), ..Default::default() };
    assert_eq!(scan_ids(&s, &now, "Observation", &since).await, vec!["a", "c"]);
    let until = ScanFilter { until: Some(snap.time), ..Default::default() };
    assert!(scan_ids(&s, &now, "Observation", &until).await.is_empty(), "a was updated, b deleted after it");

    let bad = Snapshot { id: "nope".into(), time: snap.time };
    assert!(matches!(s.scan(&bad, "Observation", &all, 10, mpsc::channel(1).0).await, Err(StoreError::BadSnapshot(_))));
}

#[tokio::test]
async fn compartment_filters() {
    let (_d, s) = open();
    s.put(r(json!({"resourceType":"Patient","id":"p1"}))).await.unwrap();
    s.put(r(json!({"resourceType":"Patient","id":"p2"}))).await.unwrap();
    s.put(obs("o1", "p1", "final")).await.unwrap();
    s.put(obs("o2", "p2", "final")).await.unwrap();
    s.put(r(json!({"resourceType":"Observation","id":"o3","subject":{"reference":"Group/g"}}))).await.unwrap();
    s.put(r(json!({"resourceType":"Observation","id":"o4","subject":{"reference":"Patient/p1"},"performer":[{"reference":"Patient/p2"}]}))).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    let only = |ids: &[&str]| ScanFilter {
        patients: Some(Patients::Only(ids.iter().map(|s| s.to_string()).collect())),
        ..Default::default()
    };
    assert_eq!(scan_ids(&s, &snap, "Observation", &only(&["p1"])).await, vec!["o1", "o4"]);
    assert_eq!(scan_ids(&s, &snap, "Observation", &only(&["p2"])).await, vec!["o2", "o4"]);
    assert_eq!(scan_ids(&s, &snap, "Observation", &only(&["p1", "p2"])).await, vec!["o1", "o2", "o4"]);
    assert_eq!(scan_ids(&s, &snap, "Patient", &only(&["p2"])).await, vec!["p2"]);
    let any = ScanFilter { patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(scan_ids(&s, &snap, "Observation", &any).await, vec!["o1", "o2", "o4"]);
    // Membership is per version: moving o1 to p2 leaves the snapshot's view alone.
    s.put(obs("o1", "p2", "final")).await.unwrap();
    assert_eq!(scan_ids(&s, &snap, "Observation", &only(&["p1"])).await, vec!["o1", "o4"]);
    let now = s.snapshot().await.unwrap();
    assert_eq!(scan_ids(&s, &now, "Observation", &only(&["p1"])).await, vec!["o4"]);
}

#[tokio::test]
async fn a_load_is_all_or_nothing() {
    let (_d, s) = open();
    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    tx.send(LoadMsg::Batch(vec![obs("a", "p", "final"), obs("b", "p", "final")])).await.unwrap();
    tx.send(LoadMsg::Abort("bad.ndjson:3: not valid JSON".into())).await.unwrap();
    let err = h.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("bad.ndjson:3"), "{err}");
    assert_eq!(s.read("Observation", "a").await.unwrap(), ReadResult::NotFound);

    // Input that ends without a commit is rolled back too.
    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    tx.send(LoadMsg::Batch(vec![obs("a", "p", "final")])).await.unwrap();
    drop(tx);
    assert!(h.await.unwrap().is_err());
    assert_eq!(s.read("Observation", "a").await.unwrap(), ReadResult::NotFound);

    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    tx.send(LoadMsg::Batch(vec![obs("a", "p", "final"), obs("b", "p", "final"), obs("a", "p", "amended")]))
        .await
        .unwrap();
    tx.send(LoadMsg::Commit).await.unwrap();
    let sum = h.await.unwrap().unwrap();
    assert_eq!(sum.per_type["Observation"], 3);
    assert_eq!(sum.updated, 1);
    assert!(matches!(s.read("Observation", "a").await.unwrap(), ReadResult::Found(j) if j.contains("amended")));
}

#[tokio::test]
async fn transactions_are_atomic() {
    let (_d, s) = open();
    let out = s
        .transaction(vec![
            WriteOp::Put(obs("a", "p", "final")),
            WriteOp::Delete { resource_type: "Observation".into(), id: "zz".into() },
        ])
        .await
        .unwrap();
    assert!(out[0].as_ref().unwrap().created);
    assert!(out[1].is_none(), "deleting a missing resource reports nothing");
}

#[tokio::test]
async fn state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let (snap, last) = {
        let s = SqliteStore::open(&path).unwrap();
        let w = s.put(obs("a", "p", "final")).await.unwrap();
        (s.snapshot().await.unwrap(), w.last_updated)
    };
    let s = SqliteStore::open(&path).unwrap();
    let w = s.put(obs("b", "p", "final")).await.unwrap();
    assert!(w.last_updated > snap.time && w.last_updated > last, "the clock never goes back after a restart");
    assert_eq!(
        scan_ids(&s, &snap, "Observation", &ScanFilter::default()).await,
        vec!["a"],
        "old snapshots stay readable"
    );
}

fn job(id: &str) -> JobRecord {
    let plan = ExportPlan::new(Level::System);
    JobRecord::new(id.into(), plan, "http://x/fhir/$export".into(), time::OffsetDateTime::now_utc())
}

#[tokio::test]
async fn one_active_job_and_compare_and_set() {
    let (_d, s) = open();
    let mut a = job("a");
    s.insert(&a).await.unwrap();
    assert!(matches!(s.insert(&job("b")).await, Err(JobError::Busy(id)) if id == "a"));
    assert_eq!(s.active().await.unwrap().as_deref(), Some("a"));
    // Leases: a job just written is not stale; with a zero lease it is claimed, once renewed.
    assert!(s.claim_stale(std::time::Duration::from_secs(10)).await.unwrap().is_empty());
    assert_eq!(s.claim_stale(std::time::Duration::ZERO).await.unwrap().len(), 1);
    assert!(s.touch("a").await.unwrap());

    a.status = JobStatus::InProgress;
    assert!(s.save_if(&a, &[JobStatus::Accepted]).await.unwrap());
    assert!(!s.save_if(&a, &[JobStatus::Accepted]).await.unwrap(), "stale compare-and-set fails");
    assert_eq!(s.unfinished().await.unwrap().len(), 1);

    a.status = JobStatus::Cancelled;
    assert!(s.save_if(&a, &[JobStatus::InProgress]).await.unwrap());
    assert_eq!(s.active().await.unwrap(), None, "a cancelled job frees the slot at once");
    assert!(!s.touch("a").await.unwrap(), "a cancelled job's runner learns it from its lease");
    s.insert(&job("b")).await.unwrap();
    assert_eq!(s.get("a").await.unwrap().unwrap().status, JobStatus::Cancelled);
    assert_eq!(s.get("b").await.unwrap().unwrap().plan.level, Level::System);
    assert!(s.get("zz").await.unwrap().is_none());
}
