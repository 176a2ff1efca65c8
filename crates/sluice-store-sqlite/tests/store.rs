//! The SQLite store against a real database file: versions, tombstones, snapshots,
//! compartment filters, atomic loads and the job repository.

use serde_json::{Value, json};
use sluice_jobs::{JobError, JobRecord, JobRepo, JobStatus};
use sluice_planner::{ExportPlan, Level};
use sluice_store::{
    IdRange, LoadMsg, PATIENT_BATCH, Patients, ReadResult, ResourceStore, ScanFilter, Snapshot, StoreError, WriteOp,
    prepare,
};
use sluice_store_sqlite::SqliteStore;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("s.db")).unwrap();
    (dir, store)
}

fn r(v: Value) -> sluice_store::NewResource {
    prepare(&v.to_string(), None).unwrap()
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

fn ids(list: &[&str]) -> Option<Vec<String>> {
    Some(list.iter().map(|s| s.to_string()).collect())
}

fn count_of(counts: &BTreeMap<String, u64>, t: &str) -> u64 {
    counts.get(t).copied().unwrap_or(0)
}

/// `ScanFilter::ids` narrows scans and counts to the listed ids, together with every other
/// part of the filter: compartments, the time window, id ranges, deletions. An empty list,
/// or one of ids that cannot exist, selects nothing.
#[tokio::test]
async fn listed_ids() {
    let (_d, s) = open();
    s.put(r(json!({"resourceType":"Patient","id":"p1"}))).await.unwrap();
    s.put(r(json!({"resourceType":"Patient","id":"p2"}))).await.unwrap();
    let mut written = Vec::new();
    for i in 1..=6 {
        written.push(s.put(obs(&format!("o{i}"), if i % 2 == 1 { "p1" } else { "p2" }, "final")).await.unwrap());
    }
    s.put(obs("o2", "p2", "amended")).await.unwrap(); // a second version of o2
    s.delete("Observation", "o6").await.unwrap();
    let snap = s.snapshot().await.unwrap();
    s.put(obs("o1", "p1", "amended")).await.unwrap(); // after the snapshot
    s.put(obs("o7", "p1", "final")).await.unwrap();

    let only = |list: &[&str]| ScanFilter { ids: ids(list), ..Default::default() };
    let scan = |f: ScanFilter| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { scan_ids(&s, &snap, "Observation", &f).await }
    };
    let count = |f: ScanFilter| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { s.count(&snap, &f).await.unwrap() }
    };
    assert_eq!(scan(only(&["o1", "o3", "o7", "nope"])).await, vec!["o1", "o3"], "o7 came after the snapshot");
    assert_eq!(count(only(&["o1", "o3", "o7", "nope"])).await, BTreeMap::from([("Observation".to_string(), 2)]));
    let v1 = s.read_at(&snap, "Observation", "o1").await.unwrap().unwrap();
    assert!(v1.contains("\"final\""), "the snapshot's version");
    let o2 = scan(only(&["o2", "o2"])).await;
    assert_eq!(o2, vec!["o2"], "the version in the snapshot, once");
    assert_eq!(scan(only(&["o6"])).await, Vec::<String>::new(), "deleted");
    // Counts cover every type: the ids apply to each.
    let mixed = count(only(&["p1", "o4"])).await;
    assert_eq!(mixed, BTreeMap::from([("Observation".to_string(), 1), ("Patient".to_string(), 1)]));
    // Nothing: an empty list, ids that cannot exist (never SQL).
    for list in [&[][..], &["bad id", "x' OR '1'='1", ""]] {
        assert!(scan(only(list)).await.is_empty(), "{list:?}");
        assert!(count(only(list)).await.is_empty(), "{list:?}");
    }
    // With a compartment.
    let p1 = |list: &[&str]| ScanFilter {
        ids: ids(list),
        patients: Some(Patients::Only(vec!["p1".into()])),
        ..Default::default()
    };
    assert_eq!(scan(p1(&["o1", "o2", "o3"])).await, vec!["o1", "o3"]);
    assert_eq!(count_of(&count(p1(&["o1", "o2", "o3"])).await, "Observation"), 2);
    let any = ScanFilter { ids: ids(&["o2", "p1"]), patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(scan(any.clone()).await, vec!["o2"]);
    let in_any = BTreeMap::from([("Observation".to_string(), 1), ("Patient".to_string(), 1)]);
    assert_eq!(count(any).await, in_any, "a Patient is in its own compartment");
    // With a time window: o3 and o4 were written after o2's first version, o4 at the latest.
    let window = ScanFilter {
        since: Some(written[1].last_updated),
        until: Some(written[3].last_updated),
        ids: ids(&["o1", "o3", "o4", "o5"]),
        ..Default::default()
    };
    assert_eq!(scan(window.clone()).await, vec!["o3", "o4"]);
    assert_eq!(count_of(&count(window).await, "Observation"), 2);
    // With an id range.
    let range = ScanFilter {
        ids: ids(&["o1", "o2", "o4", "o5"]),
        id_range: Some(IdRange { from: Some("o2".into()), to: Some("o5".into()) }),
        ..Default::default()
    };
    assert_eq!(scan(range.clone()).await, vec!["o4", "o2"], "in order of writing: o2's version is the later");
    assert_eq!(count_of(&count(range).await, "Observation"), 2);
    // Deletions: only the listed ones.
    let deleted = |list: &[&str]| ScanFilter { deleted: true, ids: ids(list), ..Default::default() };
    assert_eq!(count_of(&count(deleted(&["o6"])).await, "Observation"), 1);
    assert_eq!(count_of(&count(deleted(&["o5"])).await, "Observation"), 0);
    let (tx, mut rx) = mpsc::channel(4);
    s.scan(&snap, "Observation", &deleted(&["o6", "o1"]), 1024, tx).await.unwrap();
    let lines = rx.recv().await.unwrap();
    assert_eq!(lines.count, 1);
    assert!(String::from_utf8(lines.data).unwrap().contains("Observation/o6"));
}

/// Ten thousand ids in one filter (more than SQLite's bound-parameter limit would allow as
/// parameters).
#[tokio::test]
async fn many_listed_ids() {
    let (_d, s) = open();
    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    tx.send(LoadMsg::Batch((0..600).map(|i| obs(&format!("o{i}"), "p", "final")).collect())).await.unwrap();
    tx.send(LoadMsg::Commit).await.unwrap();
    h.await.unwrap().unwrap();
    let snap = s.snapshot().await.unwrap();
    // Every even id up to 40,000: 300 of them exist.
    let list: Vec<String> = (0..40_000).step_by(4).chain((2..40_000).step_by(4)).map(|i| format!("o{i}")).collect();
    assert_eq!(list.len(), 20_000);
    let f = ScanFilter { ids: Some(list[..10_000].to_vec()), ..Default::default() };
    assert_eq!(s.count(&snap, &f).await.unwrap(), BTreeMap::from([("Observation".to_string(), 150)]));
    let f = ScanFilter { ids: Some(list), ..Default::default() };
    let got = scan_ids(&s, &snap, "Observation", &f).await;
    assert_eq!(got.len(), 300);
    assert!(got.iter().all(|id| id[1..].parse::<u32>().unwrap() % 2 == 0));
    assert_eq!(s.count(&snap, &f).await.unwrap(), BTreeMap::from([("Observation".to_string(), 300)]));
}

/// What `compartment_patients` sends, batch by batch.
async fn patient_batches(store: &SqliteStore, snap: &Snapshot, types: &[&str], f: &ScanFilter) -> Vec<Vec<String>> {
    let (tx, mut rx) = mpsc::channel(2);
    let s = store.clone();
    let types: Vec<String> = types.iter().map(|t| t.to_string()).collect();
    let (snap, f) = (snap.clone(), f.clone());
    let h = tokio::spawn(async move { s.compartment_patients(&snap, &types, &f, tx).await });
    let mut batches = Vec::new();
    while let Some(b) = rx.recv().await {
        batches.push(b);
    }
    h.await.unwrap().unwrap();
    batches
}

/// The patient ids `compartment_patients` sends, checked to come in non-empty batches of at
/// most `PATIENT_BATCH` and to strictly increase (so none comes twice).
async fn compartment_ids(store: &SqliteStore, snap: &Snapshot, types: &[&str], f: &ScanFilter) -> Vec<String> {
    let batches = patient_batches(store, snap, types, f).await;
    assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= PATIENT_BATCH), "batch sizes: {batches:?}");
    let ids = batches.concat();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing: {ids:?}");
    ids
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `compartment_patients` lists, in increasing order and each once, the patients in whose
/// compartment lies a current resource of the given types last updated in the window, as of
/// the snapshot: through any of a resource's patients, whether or not a Patient resource
/// exists; deleted resources do not count; `id_range` bounds the patient ids; the filter's
/// `patients`, `ids` and `deleted` are ignored.
#[tokio::test]
async fn compartment_patients_lists_patients_with_resources_in_the_window() {
    let (_d, s) = open();
    let patient = |id: &str| r(json!({"resourceType":"Patient","id":id}));
    let of = |t: &str, id: &str, p: &str| {
        r(json!({"resourceType":t,"id":id,"subject":{"reference":format!("Patient/{p}")}}))
    };
    // Up to `t1`: p1 and p3 with a Patient resource, p2 and p4 without one.
    s.put(patient("p1")).await.unwrap();
    s.put(obs("o1", "p1", "final")).await.unwrap();
    s.put(of("Condition", "c2", "p2")).await.unwrap();
    s.put(patient("p3")).await.unwrap();
    s.put(obs("o3", "p3", "final")).await.unwrap();
    s.put(of("Encounter", "e3", "p3")).await.unwrap();
    // In p1's and p4's compartments; p4 has nothing else.
    let shared = json!({"resourceType":"Observation","id":"shared","subject":{"reference":"Patient/p1"},
        "performer":[{"reference":"Patient/p4"}]});
    s.put(r(shared)).await.unwrap();
    s.put(of("Procedure", "x5", "p5")).await.unwrap(); // p5: only a type not always asked for
    s.put(obs("o6", "p6", "final")).await.unwrap();
    s.delete("Observation", "o6").await.unwrap(); // p6: only a deleted resource
    // p0 and p9: in the compartments of a resource's earlier version only.
    let both = json!({"resourceType":"Observation","id":"moved","subject":{"reference":"Patient/p0"},
        "performer":[{"reference":"Patient/p9"}]});
    s.put(r(both)).await.unwrap();
    s.put(r(json!({"resourceType":"Observation","id":"moved","subject":{"reference":"Group/g"}}))).await.unwrap();
    let t1 = s.snapshot().await.unwrap().time;
    // Between `t1` and `t2`: a new patient p7.
    let w7 = s.put(obs("o7", "p7", "final")).await.unwrap();
    let t2 = s.snapshot().await.unwrap().time;
    // After `t2`: a second version of p2's only resource.
    s.put(r(json!({"resourceType":"Condition","id":"c2","subject":{"reference":"Patient/p2"},"onsetString":"x"})))
        .await
        .unwrap();
    let snap = s.snapshot().await.unwrap();
    // After the snapshot: p3 loses everything, p1 its Patient resource, p8 appears, and p4's
    // shared Observation leaves p4's compartment.
    for (t, id) in [("Patient", "p3"), ("Observation", "o3"), ("Encounter", "e3"), ("Patient", "p1")] {
        s.delete(t, id).await.unwrap().unwrap();
    }
    s.put(obs("o8", "p8", "final")).await.unwrap();
    s.put(obs("shared", "p1", "final")).await.unwrap();

    let main = ["Patient", "Observation", "Condition", "Encounter"];
    let all = ScanFilter::default();
    assert_eq!(
        compartment_ids(&s, &snap, &main, &all).await,
        strings(&["p1", "p2", "p3", "p4", "p7"]),
        "not p0 and p9 (an old version), p5 (another type), p6 (deleted), p8 (after the snapshot)"
    );
    // Types.
    let with_procedure = ["Procedure", "Patient", "Observation", "Condition", "Encounter"];
    assert_eq!(compartment_ids(&s, &snap, &with_procedure, &all).await, strings(&["p1", "p2", "p3", "p4", "p5", "p7"]));
    assert_eq!(compartment_ids(&s, &snap, &["Procedure"], &all).await, strings(&["p5"]));
    assert_eq!(compartment_ids(&s, &snap, &["Patient"], &all).await, strings(&["p1", "p3"]));
    assert_eq!(
        compartment_ids(&s, &snap, &["Observation"], &all).await,
        strings(&["p1", "p3", "p4", "p7"]),
        "p4 through the shared Observation's performer"
    );
    assert_eq!(compartment_ids(&s, &snap, &["Condition", "Encounter"], &all).await, strings(&["p2", "p3"]));
    assert!(patient_batches(&s, &snap, &[], &all).await.is_empty(), "no types, no patients");
    // The window: `since` exclusive, `until` inclusive, of the current versions.
    let window = |since, until| ScanFilter { since, until, ..Default::default() };
    assert_eq!(compartment_ids(&s, &snap, &main, &window(Some(t1), None)).await, strings(&["p2", "p7"]));
    assert_eq!(compartment_ids(&s, &snap, &main, &window(None, Some(t1))).await, strings(&["p1", "p3", "p4"]));
    assert_eq!(compartment_ids(&s, &snap, &main, &window(Some(t1), Some(t2))).await, strings(&["p7"]));
    assert_eq!(compartment_ids(&s, &snap, &main, &window(Some(t2), None)).await, strings(&["p2"]));
    let at7 = Some(w7.last_updated);
    assert_eq!(compartment_ids(&s, &snap, &main, &window(None, at7)).await, strings(&["p1", "p3", "p4", "p7"]));
    assert_eq!(compartment_ids(&s, &snap, &main, &window(at7, None)).await, strings(&["p2"]));
    assert!(
        compartment_ids(&s, &snap, &["Condition"], &window(None, Some(t2))).await.is_empty(),
        "c2's first version is not current"
    );
    // Id ranges bound the patient ids.
    let range = |from: Option<&str>, to: Option<&str>| ScanFilter {
        id_range: Some(IdRange { from: from.map(Into::into), to: to.map(Into::into) }),
        ..Default::default()
    };
    assert_eq!(compartment_ids(&s, &snap, &main, &range(Some("p2"), Some("p4"))).await, strings(&["p2", "p3"]));
    assert_eq!(compartment_ids(&s, &snap, &main, &range(Some("p4"), None)).await, strings(&["p4", "p7"]));
    assert_eq!(compartment_ids(&s, &snap, &main, &range(None, Some("p2"))).await, strings(&["p1"]));
    assert_eq!(compartment_ids(&s, &snap, &main, &range(None, None)).await, strings(&["p1", "p2", "p3", "p4", "p7"]));
    assert!(compartment_ids(&s, &snap, &main, &range(Some("p5"), Some("p7"))).await.is_empty());
    let late_from_p3 = ScanFilter { since: Some(t1), ..range(Some("p3"), None) };
    assert_eq!(compartment_ids(&s, &snap, &main, &late_from_p3).await, strings(&["p7"]));
    // Ignored: the compartment, listed ids, deletions.
    let ignored = ScanFilter {
        patients: Some(Patients::Only(vec!["p2".into()])),
        ids: ids(&["nope"]),
        deleted: true,
        ..Default::default()
    };
    assert_eq!(compartment_ids(&s, &snap, &main, &ignored).await, strings(&["p1", "p2", "p3", "p4", "p7"]));
    // A later snapshot sees the later writes; p1 stays without its Patient resource.
    let now = s.snapshot().await.unwrap();
    assert_eq!(compartment_ids(&s, &now, &main, &all).await, strings(&["p1", "p2", "p7", "p8"]));
    assert!(compartment_ids(&s, &now, &["Patient"], &all).await.is_empty(), "both Patient resources deleted");
    let bad = Snapshot { id: "nope".into(), time: snap.time };
    let refused = s.compartment_patients(&bad, &strings(&main), &all, mpsc::channel(1).0).await;
    assert!(matches!(refused, Err(StoreError::BadSnapshot(_))), "{refused:?}");
}

/// More patients than one batch holds: full batches of `PATIENT_BATCH` ids, then the rest,
/// in increasing order and each once, whatever order they were written in and however many
/// resources each has. A reader that stops early ends the listing without an error.
#[tokio::test]
async fn compartment_patients_in_batches() {
    const N: usize = 2_500;
    let (_d, s) = open();
    // Written in an order unlike the ids' (7 is prime to N); each patient is in the
    // compartment of its own Observation and of the one shared with the patient before it.
    let q = |i: usize| format!("q{:04}", i % N);
    let mut resources = Vec::new();
    for i in (0..N).map(|i| i * 7 % N) {
        resources.push(obs(&format!("o{i}"), &q(i), "final"));
        let shared = json!({"resourceType":"Observation","id":format!("s{i}"),"subject":{"reference":format!("Patient/{}", q(i))},
            "performer":[{"reference":format!("Patient/{}", q(i + 1))}]});
        resources.push(r(shared));
    }
    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    tx.send(LoadMsg::Batch(resources)).await.unwrap();
    tx.send(LoadMsg::Commit).await.unwrap();
    assert_eq!(h.await.unwrap().unwrap().per_type["Observation"], 2 * N as u64);
    let snap = s.snapshot().await.unwrap();
    let expected: Vec<String> = (0..N).map(q).collect();
    let sizes = |batches: &[Vec<String>]| batches.iter().map(Vec::len).collect::<Vec<_>>();

    let all = ScanFilter::default();
    let batches = patient_batches(&s, &snap, &["Observation"], &all).await;
    assert_eq!(sizes(&batches), vec![PATIENT_BATCH, PATIENT_BATCH, N - 2 * PATIENT_BATCH]);
    assert_eq!(batches.concat(), expected, "every patient once, in order");
    let range = |from: usize, to: usize| ScanFilter {
        id_range: Some(IdRange { from: Some(q(from)), to: Some(q(to)) }),
        ..Default::default()
    };
    let batches = patient_batches(&s, &snap, &["Observation"], &range(1000, 2100)).await;
    assert_eq!(sizes(&batches), vec![PATIENT_BATCH, 1100 - PATIENT_BATCH]);
    assert_eq!(batches.concat(), expected[1000..2100]);
    let batches = patient_batches(&s, &snap, &["Observation"], &range(7, 7 + PATIENT_BATCH)).await;
    assert_eq!(sizes(&batches), vec![PATIENT_BATCH], "exactly one full batch, no empty one after it");
    assert_eq!(batches.concat(), expected[7..7 + PATIENT_BATCH]);

    // The reader takes one batch and goes away.
    let (tx, mut rx) = mpsc::channel(1);
    let (s2, snap2) = (s.clone(), snap.clone());
    let h = tokio::spawn(async move { s2.compartment_patients(&snap2, &strings(&["Observation"]), &all, tx).await });
    assert_eq!(rx.recv().await.unwrap(), expected[..PATIENT_BATCH]);
    drop(rx);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), h).await.expect("ends when the reader goes");
    ended.unwrap().unwrap();
    assert_eq!(compartment_ids(&s, &snap, &["Observation"], &ScanFilter::default()).await, expected);
}
