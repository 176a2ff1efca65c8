//! The PostgreSQL store against a real server. Runs when `SLUICE_TEST_DATABASE_URL` names an
//! admin URL (CI sets it); each test gets its own scratch database, dropped at the end.

use serde_json::{Value, json};
use sluice_jobs::{JobError, JobRecord, JobRepo, JobStatus};
use sluice_planner::{ExportPlan, Level};
use sluice_store::{
    IdRange, LoadMsg, PATIENT_BATCH, Patients, ReadResult, ResourceStore, ScanFilter, Snapshot, prepare,
};
use sluice_store_postgres::{PgOptions, PgStore};
use std::collections::BTreeSet;
use tokio::sync::mpsc;

/// A scratch database; dropped (with its connections) when the value is dropped.
struct Scratch {
    admin: String,
    name: String,
    url: String,
}

impl Scratch {
    async fn new() -> Option<Scratch> {
        let Ok(admin) = std::env::var("SLUICE_TEST_DATABASE_URL") else {
            eprintln!("SLUICE_TEST_DATABASE_URL is not set: PostgreSQL store tests skipped");
            return None;
        };
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("sluice_t_store_{}_{n}", std::process::id());
        run_admin(&admin, &format!("CREATE DATABASE {name}")).await;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_string();
        let url = format!("{base}/{name}");
        Some(Scratch { admin, name, url })
    }

    async fn store(&self) -> PgStore {
        PgStore::connect(&self.url, PgOptions::default()).await.unwrap()
    }
}

async fn run_admin(admin: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls).await.unwrap();
    let h = tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    drop(client);
    let _ = h.await;
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let (admin, sql) = (self.admin.clone(), format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(run_admin(&admin, &sql));
        })
        .join()
        .unwrap();
    }
}

fn obs(id: &str, patient: &str, status: &str) -> sluice_store::NewResource {
    prepare(
        &json!({"resourceType":"Observation","id":id,"status":status,"subject":{"reference":format!("Patient/{patient}")}}).to_string(),
        None,
    )
    .unwrap()
}

async fn scan_ids(store: &PgStore, snap: &Snapshot, t: &str, f: &ScanFilter) -> BTreeSet<String> {
    let (tx, mut rx) = mpsc::channel(4);
    let s = store.clone();
    let (snap, t2, f2) = (snap.clone(), t.to_string(), f.clone());
    let h = tokio::spawn(async move { s.scan(&snap, &t2, &f2, 256, tx).await });
    let mut ids = BTreeSet::new();
    while let Some(b) = rx.recv().await {
        for l in b.lines() {
            let v: Value = serde_json::from_slice(l).unwrap();
            assert_eq!(v["resourceType"], t);
            assert!(ids.insert(v["id"].as_str().unwrap().to_string()), "no duplicates");
        }
    }
    h.await.unwrap().unwrap();
    ids
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn versions_snapshots_and_compartments() {
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
    let w1 = s.put(obs("a", "p1", "final")).await.unwrap();
    assert_eq!((w1.version_id, w1.created), (1, true));
    assert!(s.put(obs("a", "p1", "final")).await.unwrap().unchanged);
    s.put(obs("b", "p2", "final")).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    assert!(snap.time >= w1.last_updated);

    let upd = s.put(obs("a", "p2", "amended")).await.unwrap();
    assert_eq!(upd.version_id, 2);
    assert!(upd.last_updated > snap.time, "writes after a snapshot are later than its time");
    s.delete("Observation", "b").await.unwrap();
    s.put(obs("c", "p1", "final")).await.unwrap();
    assert_eq!(s.read("Observation", "b").await.unwrap(), ReadResult::Deleted(2));

    let all = ScanFilter::default();
    assert_eq!(scan_ids(&s, &snap, "Observation", &all).await, set(&["a", "b"]));
    assert!(s.read_at(&snap, "Observation", "a").await.unwrap().unwrap().contains("\"final\""));
    let p1 = ScanFilter { patients: Some(Patients::Only(vec!["p1".into()])), ..Default::default() };
    assert_eq!(scan_ids(&s, &snap, "Observation", &p1).await, set(&["a"]), "a was in p1's compartment then");
    // A resource in two compartments is found through either patient.
    let shared = json!({"resourceType":"Observation","id":"shared","subject":{"reference":"Patient/p1"},
        "performer":[{"reference":"Patient/p2"}]});
    s.put(prepare(&shared.to_string(), None).unwrap()).await.unwrap();
    let later = s.snapshot().await.unwrap();
    let p2 = ScanFilter { patients: Some(Patients::Only(vec!["p2".into()])), ..Default::default() };
    assert!(scan_ids(&s, &later, "Observation", &p2).await.contains("shared"), "found through its second patient");
    assert!(scan_ids(&s, &later, "Observation", &p1).await.contains("shared"), "found through its first patient");
    let both = ScanFilter { patients: Some(Patients::Only(vec!["p1".into(), "p2".into()])), ..Default::default() };
    assert_eq!(scan_ids(&s, &later, "Observation", &both).await, set(&["a", "c", "shared"]), "each once");
    s.release(&later).await;
    s.delete("Observation", "shared").await.unwrap();
    s.release(&snap).await;
    assert!(!s.can_resume(&snap).await);

    let now = s.snapshot().await.unwrap();
    assert_eq!(scan_ids(&s, &now, "Observation", &p1).await, set(&["c"]));
    let since = ScanFilter { since: Some(snap.time), ..Default::default() };
    assert_eq!(scan_ids(&s, &now, "Observation", &since).await, set(&["a", "c"]));
    let any = ScanFilter { patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(s.count(&now, &any).await.unwrap().get("Observation"), Some(&2));
    s.release(&now).await;
}

/// Writers keep creating resources while snapshots are taken: every snapshot holds exactly
/// the resources whose lastUpdated is at or before its time (no write is half in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_under_concurrent_writes_are_exact() {
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
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
    let s2 = s.clone();
    let last2 = last.clone();
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

#[tokio::test]
async fn a_load_is_all_or_nothing_and_merges_duplicates() {
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    tx.send(LoadMsg::Batch(vec![obs("a", "p", "final")])).await.unwrap();
    tx.send(LoadMsg::Abort("x.ndjson:2: bad".into())).await.unwrap();
    assert!(h.await.unwrap().unwrap_err().to_string().contains("x.ndjson:2"));
    assert_eq!(s.read("Observation", "a").await.unwrap(), ReadResult::NotFound);

    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    tx.send(LoadMsg::Batch(vec![obs("a", "p", "final"), obs("b", "p", "final"), obs("a", "q", "amended")]))
        .await
        .unwrap();
    tx.send(LoadMsg::Batch(vec![obs("b", "p", "final")])).await.unwrap();
    tx.send(LoadMsg::Commit).await.unwrap();
    let sum = h.await.unwrap().unwrap();
    assert_eq!(sum.per_type["Observation"], 4);
    assert_eq!((sum.updated, sum.unchanged), (1, 1));
    match s.read("Observation", "a").await.unwrap() {
        ReadResult::Found(j) => {
            let v: Value = serde_json::from_str(&j).unwrap();
            assert_eq!((v["status"].as_str(), v["meta"]["versionId"].as_str()), (Some("amended"), Some("2")));
        }
        other => panic!("{other:?}"),
    }
    let snap = s.snapshot().await.unwrap();
    let q = ScanFilter { patients: Some(Patients::Only(vec!["q".into()])), ..Default::default() };
    assert_eq!(scan_ids(&s, &snap, "Observation", &q).await, set(&["a"]), "the compartment follows the last version");
    s.release(&snap).await;
}

fn job(id: &str) -> JobRecord {
    let plan = ExportPlan::new(Level::System);
    JobRecord::new(id.into(), plan, "u".into(), time::OffsetDateTime::now_utc())
}

/// Two servers (two pools) kick off at once: the database lets exactly one through.
#[tokio::test]
async fn one_active_job_across_servers() {
    let Some(db) = Scratch::new().await else { return };
    let (a, b) = (db.store().await, db.store().await);
    for round in 0..5 {
        let (ja, jb) = (job(&format!("a{round}")), job(&format!("b{round}")));
        let (ra, rb) = tokio::join!(a.insert(&ja), b.insert(&jb));
        let winners = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "round {round}: {ra:?} {rb:?}");
        let (mut won, loser) = if ra.is_ok() { (ja, rb) } else { (jb, ra) };
        assert!(matches!(loser, Err(JobError::Busy(id)) if id == won.id));
        assert_eq!(b.get(&won.id).await.unwrap().unwrap().id, won.id, "any server reads any job");
        assert!(b.claim_stale(std::time::Duration::from_secs(10)).await.unwrap().is_empty(), "a live job is not taken");
        assert!(a.touch(&won.id).await.unwrap());
        won.status = JobStatus::Cancelled;
        assert!(a.save_if(&won, &[JobStatus::Accepted]).await.unwrap());
        assert_eq!(b.active().await.unwrap(), None);
        assert!(!b.touch(&won.id).await.unwrap());
    }
}

/// Scans (and counts) of each id range between the split points.
async fn scan_ranges(
    store: &PgStore,
    snap: &Snapshot,
    t: &str,
    points: &[String],
    f: &ScanFilter,
) -> Vec<BTreeSet<String>> {
    let mut out = Vec::new();
    for range in IdRange::between(points) {
        let f = ScanFilter { id_range: Some(range), ..f.clone() };
        let ids = scan_ids(store, snap, t, &f).await;
        assert_eq!(store.count(snap, &f).await.unwrap().get(t).copied().unwrap_or(0), ids.len() as u64);
        out.push(ids);
    }
    out
}

/// Checks that `parts` are disjoint and together `whole`.
fn assert_partition(parts: &[BTreeSet<String>], whole: &BTreeSet<String>) {
    let n: usize = parts.iter().map(BTreeSet::len).sum();
    let union: BTreeSet<String> = parts.iter().flatten().cloned().collect();
    assert_eq!(n, union.len(), "no resource in two ranges");
    assert_eq!(&union, whole, "every resource in a range");
}

/// `split_points` cuts a type's ids into about equal ranges (in the database's collation);
/// the id ranges between them partition what every scan and count of the snapshot selects,
/// with and without a compartment filter, for deletions too.
#[tokio::test]
async fn id_ranges_partition_a_type() {
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
    // Ids that sort differently by case, digits and punctuation in different collations.
    let ids: Vec<String> = (0..40).map(|i| format!("{}{i}", ["a", "B", "z.", "0-", "Z"][i % 5])).collect();
    for (i, id) in ids.iter().enumerate() {
        s.put(obs(id, if i % 2 == 0 { "p1" } else { "p2" }, "final")).await.unwrap();
    }
    s.delete("Observation", &ids[3]).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    s.put(obs("a-late", "p1", "final")).await.unwrap();
    s.delete("Observation", &ids[4]).await.unwrap();

    assert!(s.split_points(&snap, "Observation", 1).await.unwrap().is_empty());
    assert!(s.split_points(&snap, "Patient", 4).await.unwrap().is_empty(), "no rows, no points");
    let points = s.split_points(&snap, "Observation", 4).await.unwrap();
    assert_eq!(points.len(), 3, "{points:?}");
    assert_eq!(points.iter().collect::<BTreeSet<_>>().len(), 3, "distinct");
    let all = ScanFilter::default();
    let whole = scan_ids(&s, &snap, "Observation", &all).await;
    assert_eq!(whole.len(), 39, "the snapshot: 40 created, 1 deleted");
    let parts = scan_ranges(&s, &snap, "Observation", &points, &all).await;
    assert!(parts.iter().all(|p| (8..=12).contains(&p.len())), "about a quarter each: {parts:?}");
    assert_partition(&parts, &whole);
    let p1 = ScanFilter { patients: Some(Patients::Only(vec!["p1".into()])), ..Default::default() };
    assert_partition(
        &scan_ranges(&s, &snap, "Observation", &points, &p1).await,
        &scan_ids(&s, &snap, "Observation", &p1).await,
    );
    let mut gone = Vec::new();
    for range in IdRange::between(&points) {
        let f = ScanFilter { deleted: true, id_range: Some(range), ..Default::default() };
        gone.push(s.count(&snap, &f).await.unwrap().get("Observation").copied().unwrap_or(0));
    }
    assert_eq!(gone.iter().sum::<u64>(), 1, "the deletion, in one range: {gone:?}");
    s.release(&snap).await;
    let bad = ScanFilter { id_range: Some(IdRange { from: Some("x' OR '1'='1".into()), to: None }), ..all };
    let now = s.snapshot().await.unwrap();
    assert!(s.count(&now, &bad).await.is_err(), "bounds are ids, never SQL");
    s.release(&now).await;
}

/// A large type: the points come from a sample of the table's pages, and still cut it into
/// ranges that partition it, each of roughly its share.
#[tokio::test]
async fn split_points_of_a_large_type_come_from_a_sample() {
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
    // 200k small rows straight into the table (the store's write paths are not under test);
    // a 1% sample of its pages holds about 1,500 Observations, enough to go by.
    run_admin(
        &db.url,
        "INSERT INTO sluice_resource (type, id, version, last_updated, deleted, json) \
         SELECT 'Observation', md5(g::text), 1, 1, false, \
                '{\"resourceType\":\"Observation\",\"id\":\"' || md5(g::text) || '\"}' \
         FROM generate_series(1, 200000) g; \
         INSERT INTO sluice_resource (type, id, version, last_updated, deleted, json) \
         SELECT 'Patient', 'p' || g, 1, 1, false, '{\"resourceType\":\"Patient\",\"id\":\"p' || g || '\"}' \
         FROM generate_series(1, 20000) g; ANALYZE sluice_resource",
    )
    .await;
    let snap = s.snapshot().await.unwrap();
    let points = s.split_points(&snap, "Observation", 3).await.unwrap();
    assert_eq!(points.len(), 2, "{points:?}");
    let mut total = 0;
    for range in IdRange::between(&points) {
        let f = ScanFilter { id_range: Some(range), ..Default::default() };
        let n = s.count(&snap, &f).await.unwrap()["Observation"];
        assert!((55_000..=80_000).contains(&n), "roughly a third: {n}");
        total += n;
    }
    assert_eq!(total, 200_000, "the ranges partition the type");
    s.release(&snap).await;
}

fn ids(list: &[&str]) -> Option<Vec<String>> {
    Some(list.iter().map(|s| s.to_string()).collect())
}

fn count_of(counts: &std::collections::BTreeMap<String, u64>, t: &str) -> u64 {
    counts.get(t).copied().unwrap_or(0)
}

/// `ScanFilter::ids` narrows scans and counts to the listed ids, together with every other
/// part of the filter: compartments (a resource in several too), the time window, id ranges,
/// deletions. An empty list, or one of ids that cannot exist, selects nothing.
#[tokio::test]
async fn listed_ids() {
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
    s.put(prepare(&json!({"resourceType":"Patient","id":"p1"}).to_string(), None).unwrap()).await.unwrap();
    s.put(prepare(&json!({"resourceType":"Patient","id":"p2"}).to_string(), None).unwrap()).await.unwrap();
    let mut written = Vec::new();
    for i in 1..=6 {
        written.push(s.put(obs(&format!("o{i}"), if i % 2 == 1 { "p1" } else { "p2" }, "final")).await.unwrap());
    }
    let shared = json!({"resourceType":"Observation","id":"shared","subject":{"reference":"Patient/p1"},
        "performer":[{"reference":"Patient/p2"}]});
    s.put(prepare(&shared.to_string(), None).unwrap()).await.unwrap();
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
    let obs_count = |n: u64| std::collections::BTreeMap::from([("Observation".to_string(), n)]);
    assert_eq!(scan(only(&["o1", "o3", "o7", "nope"])).await, set(&["o1", "o3"]), "o7 came after the snapshot");
    assert_eq!(count(only(&["o1", "o3", "o7", "nope"])).await, obs_count(2));
    assert_eq!(scan(only(&["o2", "o2"])).await, set(&["o2"]));
    assert!(scan(only(&["o6"])).await.is_empty(), "deleted");
    // Counts cover every type: the ids apply to each.
    let mixed = count(only(&["p1", "o4"])).await;
    assert_eq!(mixed, std::collections::BTreeMap::from([("Observation".to_string(), 1), ("Patient".to_string(), 1)]));
    // Nothing: an empty list, ids that cannot exist (skipped, never SQL).
    for list in [&[][..], &["bad id", "x' OR '1'='1", ""]] {
        assert!(scan(only(list)).await.is_empty(), "{list:?}");
        assert!(count(only(list)).await.is_empty(), "{list:?}");
    }
    assert_eq!(scan(only(&["x' OR '1'='1", "o3"])).await, set(&["o3"]), "invalid ids are skipped");
    // With a compartment, through either of a shared resource's patients.
    let of = |patient: &str, list: &[&str]| ScanFilter {
        ids: ids(list),
        patients: Some(Patients::Only(vec![patient.into()])),
        ..Default::default()
    };
    assert_eq!(scan(of("p1", &["o1", "o2", "o3", "shared"])).await, set(&["o1", "o3", "shared"]));
    assert_eq!(count_of(&count(of("p1", &["o1", "o2", "o3", "shared"])).await, "Observation"), 3);
    assert_eq!(scan(of("p2", &["o1", "o2", "shared"])).await, set(&["o2", "shared"]));
    assert_eq!(scan(of("p2", &["o1", "o2"])).await, set(&["o2"]));
    assert_eq!(count_of(&count(of("p2", &["o1", "o2"])).await, "Observation"), 1);
    let any = ScanFilter { ids: ids(&["o2", "p1", "nope"]), patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(scan(any.clone()).await, set(&["o2"]));
    assert_eq!(count_of(&count(any).await, "Observation"), 1);
    // With a time window: o3 and o4 were written after o2's first version, o4 at the latest.
    let window = ScanFilter {
        since: Some(written[1].last_updated),
        until: Some(written[3].last_updated),
        ids: ids(&["o1", "o3", "o4", "o5"]),
        ..Default::default()
    };
    assert_eq!(scan(window.clone()).await, set(&["o3", "o4"]));
    assert_eq!(count_of(&count(window).await, "Observation"), 2);
    // With an id range.
    let range = ScanFilter {
        ids: ids(&["o1", "o2", "o4", "o5"]),
        id_range: Some(IdRange { from: Some("o2".into()), to: Some("o5".into()) }),
        ..Default::default()
    };
    assert_eq!(scan(range.clone()).await, set(&["o2", "o4"]));
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
    s.release(&snap).await;
}

/// Ten thousand ids (and twenty thousand) in one filter, in a scan and a count, with and
/// without a patient list (whose query holds the list twice).
#[tokio::test]
async fn many_listed_ids() {
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
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
    assert_eq!(s.count(&snap, &f).await.unwrap()["Observation"], 150);
    assert_eq!(scan_ids(&s, &snap, "Observation", &f).await.len(), 150);
    let f = ScanFilter { ids: Some(list), patients: Some(Patients::Only(vec!["p".into()])), ..Default::default() };
    let got = scan_ids(&s, &snap, "Observation", &f).await;
    assert_eq!(got.len(), 300);
    assert!(got.iter().all(|id| id[1..].parse::<u32>().unwrap() % 2 == 0));
    assert_eq!(s.count(&snap, &f).await.unwrap()["Observation"], 300);
    s.release(&snap).await;
}

/// What `compartment_patients` sends, batch by batch.
async fn patient_batches(store: &PgStore, snap: &Snapshot, types: &[&str], f: &ScanFilter) -> Vec<Vec<String>> {
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
/// most `PATIENT_BATCH` and to strictly increase (so none comes twice). The tests' ids sort
/// alike in every collation.
async fn compartment_ids(store: &PgStore, snap: &Snapshot, types: &[&str], f: &ScanFilter) -> Vec<String> {
    let batches = patient_batches(store, snap, types, f).await;
    assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= PATIENT_BATCH), "batch sizes: {batches:?}");
    let ids = batches.concat();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing: {ids:?}");
    ids
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The time of a snapshot taken now (released at once): later writes are later than it.
async fn mark(s: &PgStore) -> time::OffsetDateTime {
    let snap = s.snapshot().await.unwrap();
    s.release(&snap).await;
    snap.time
}

/// `compartment_patients` lists, in increasing order and each once, the patients in whose
/// compartment lies a current resource of the given types last updated in the window, as of
/// the snapshot: through any of a resource's patients (a resource in several compartments
/// through `sluice_compartment`), whether or not a Patient resource exists; deleted resources
/// do not count; `id_range` bounds the patient ids; the filter's `patients`, `ids` and
/// `deleted` are ignored.
#[tokio::test]
async fn compartment_patients_lists_patients_with_resources_in_the_window() {
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
    let r = |v: Value| prepare(&v.to_string(), None).unwrap();
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
    // In p1's and p4's compartments (p1 is its least patient); p4 has nothing else.
    let shared = json!({"resourceType":"Observation","id":"shared","subject":{"reference":"Patient/p1"},
        "performer":[{"reference":"Patient/p4"}]});
    s.put(r(shared)).await.unwrap();
    s.put(of("Procedure", "x5", "p5")).await.unwrap(); // p5: only a type not always asked for
    s.put(obs("o6", "p6", "final")).await.unwrap();
    s.delete("Observation", "o6").await.unwrap(); // p6: only a deleted resource (whose row keeps p6)
    // p0 and p9: in the compartments of a resource's earlier version only.
    let both = json!({"resourceType":"Observation","id":"moved","subject":{"reference":"Patient/p0"},
        "performer":[{"reference":"Patient/p9"}]});
    s.put(r(both)).await.unwrap();
    s.put(r(json!({"resourceType":"Observation","id":"moved","subject":{"reference":"Group/g"}}))).await.unwrap();
    let t1 = mark(&s).await;
    // Between `t1` and `t2`: a new patient p7.
    let w7 = s.put(obs("o7", "p7", "final")).await.unwrap();
    let t2 = mark(&s).await;
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
    // Id ranges bound the patient ids (p4 only through `sluice_compartment`).
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
    s.release(&now).await;
    s.release(&snap).await;
    let refused = s.compartment_patients(&snap, &strings(&main), &all, mpsc::channel(1).0).await;
    assert!(refused.is_err(), "a released snapshot cannot be read: {refused:?}");
}

/// More patients than one batch holds: full batches of `PATIENT_BATCH` ids, then the rest,
/// in increasing order and each once, whatever order they were loaded in and however many
/// resources (several in two compartments) each has. A reader that stops early ends the
/// listing without an error, and the store reads on.
#[tokio::test]
async fn compartment_patients_in_batches() {
    const N: usize = 2_500;
    let Some(db) = Scratch::new().await else { return };
    let s = db.store().await;
    // Loaded in an order unlike the ids' (7 is prime to N); each patient is in the
    // compartment of its own Observation and of the one shared with the patient before it.
    let q = |i: usize| format!("q{:04}", i % N);
    let mut resources = Vec::new();
    for i in (0..N).map(|i| i * 7 % N) {
        resources.push(obs(&format!("o{i}"), &q(i), "final"));
        let shared = json!({"resourceType":"Observation","id":format!("s{i}"),"subject":{"reference":format!("Patient/{}", q(i))},
            "performer":[{"reference":format!("Patient/{}", q(i + 1))}]});
        resources.push(prepare(&shared.to_string(), None).unwrap());
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
    s.release(&snap).await;
}
