//! The PostgreSQL store against a real server: the shared conformance suite
//! (`sluice-store-conformance`, one test per scenario), and what only this store does:
//! exported snapshots that a release ends, two servers (two pools) sharing one database,
//! id range bounds inlined into SQL, and split points from a sample of a large table.
//!
//! Runs when `SLUICE_TEST_DATABASE_URL` names an admin URL (CI sets it); each test gets its
//! own scratch database, dropped at the end.

use serde_json::json;
use sluice_jobs::{JobError, JobRecord, JobRepo, JobStatus};
use sluice_planner::{ExportPlan, Level};
use sluice_store::{ExportReads, IdRange, LoadMsg, ResourceWrites, ScanFilter, StoreError, prepare};
use sluice_store_postgres::{PgOptions, PgStore};
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

/// A store on a fresh scratch database, and the database (dropped when the scenario ends);
/// `None` without `SLUICE_TEST_DATABASE_URL`.
async fn fresh() -> Option<(PgStore, Scratch)> {
    let db = Scratch::new().await?;
    Some((db.store().await, db))
}

sluice_store_conformance::store_tests!(fresh());

fn obs(id: &str, patient: &str) -> sluice_store::NewResource {
    let v = json!({"resourceType":"Observation","id":id,"subject":{"reference":format!("Patient/{patient}")}});
    prepare(&v.to_string(), None).unwrap()
}

/// A snapshot is an exporting transaction held open until it is released: then it can no
/// longer be resumed, and every read of it is refused.
#[tokio::test]
async fn released_snapshots_cannot_be_resumed_or_read() {
    let Some((s, _db)) = fresh().await else { return };
    s.put(obs("a", "p")).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    assert!(s.can_resume(&snap).await);
    assert!(s.read_at(&snap, "Observation", "a").await.unwrap().is_some());
    s.release(&snap).await;
    assert!(!s.can_resume(&snap).await, "a released snapshot is gone");
    let all = ScanFilter::default();
    let refused = |what: &str, r: Result<(), StoreError>| {
        assert!(matches!(r, Err(StoreError::BadSnapshot(_))), "{what} of a released snapshot: {r:?}");
    };
    refused("scan", s.scan(&snap, "Observation", &all, 64, mpsc::channel(1).0).await);
    refused("count", s.count(&snap, &all).await.map(drop));
    refused("read_at", s.read_at(&snap, "Observation", "a").await.map(drop));
    let types = ["Observation".to_string()];
    refused("compartment_patients", s.compartment_patients(&snap, &types, &all, mpsc::channel(1).0).await);
    s.release(&snap).await; // releasing twice is harmless
    let now = s.snapshot().await.unwrap();
    assert!(s.read_at(&now, "Observation", "a").await.unwrap().is_some(), "the store reads on");
    s.release(&now).await;
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

/// Id range bounds go into the SQL text (`COPY` takes no parameters): only valid FHIR ids
/// are taken, anything else is an error.
#[tokio::test]
async fn id_range_bounds_are_ids_never_sql() {
    let Some((s, _db)) = fresh().await else { return };
    s.put(obs("a", "p")).await.unwrap();
    let bad =
        ScanFilter { id_range: Some(IdRange { from: Some("x' OR '1'='1".into()), to: None }), ..Default::default() };
    let now = s.snapshot().await.unwrap();
    assert!(s.count(&now, &bad).await.is_err(), "bounds are ids, never SQL");
    let listing = s.compartment_patients(&now, &["Observation".to_string()], &bad, mpsc::channel(1).0).await;
    assert!(listing.is_err(), "patient bounds too: {listing:?}");
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

/// Terminates the backends of `db`'s database that `condition` (SQL over
/// `pg_stat_activity`) selects; returns how many.
async fn terminate(db: &Scratch, condition: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(&db.admin, tokio_postgres::NoTls).await.unwrap();
    let h = tokio::spawn(conn);
    let sql = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{}' AND pid <> pg_backend_pid() AND {condition}",
        db.name
    );
    let n = client.query_one(&sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")).get(0);
    drop(client);
    let _ = h.await;
    n
}

/// A scan whose own connection is terminated fails with `ConnectionLost`, and the snapshot
/// reads on over another connection (the engine runs the part again, D51); once the
/// connection holding the exporting transaction is terminated, the snapshot is gone:
/// `BadSnapshot`.
#[tokio::test]
async fn a_lost_connection_is_not_a_lost_snapshot() {
    let Some((s, db)) = fresh().await else { return };
    // About 20 MB: more than the socket buffers hold, so a stalled scan's COPY is still
    // running on the server.
    const N: u64 = 20_000;
    let note = "x".repeat(1000);
    let (tx, rx) = mpsc::channel(4);
    let loading = {
        let s = s.clone();
        tokio::spawn(async move { s.load(rx).await })
    };
    for chunk in 0..N / 1000 {
        let batch = (chunk * 1000..(chunk + 1) * 1000)
            .map(|i| {
                let v = json!({"resourceType": "Observation", "id": format!("o{i}"), "note": [{"text": note}]});
                prepare(&v.to_string(), None).unwrap()
            })
            .collect();
        tx.send(LoadMsg::Batch(batch)).await.unwrap();
    }
    tx.send(LoadMsg::Commit).await.unwrap();
    loading.await.unwrap().unwrap();
    let snap = s.snapshot().await.unwrap();
    let all = ScanFilter::default();

    // A scan stalled after its first batch (its channel full): its backend is in the COPY.
    let (tx, mut rx) = mpsc::channel(1);
    let scan = {
        let (s, snap, all) = (s.clone(), snap.clone(), all.clone());
        tokio::spawn(async move { s.scan(&snap, "Observation", &all, 4096, tx).await })
    };
    assert!(rx.recv().await.is_some(), "a first batch");
    assert_eq!(terminate(&db, "state = 'active' AND query LIKE 'COPY (%'").await, 1, "the scan's backend");
    while rx.recv().await.is_some() {}
    let lost = scan.await.unwrap();
    assert!(matches!(lost, Err(StoreError::ConnectionLost(_))), "{lost:?}");

    // The snapshot lives: a new connection imports it and reads everything.
    let (tx, mut rx) = mpsc::channel::<sluice_store::Batch>(4);
    let counting = tokio::spawn(async move {
        let mut n = 0;
        while let Some(b) = rx.recv().await {
            n += b.count;
        }
        n
    });
    s.scan(&snap, "Observation", &all, 1 << 20, tx).await.unwrap();
    assert_eq!(counting.await.unwrap(), N);

    // The exporting transaction's connection is terminated: the snapshot is gone (once the
    // backend has ended).
    let holder = "state = 'idle in transaction' AND query LIKE 'SELECT pg_export_snapshot()%'";
    assert_eq!(terminate(&db, holder).await, 1, "the snapshot's backend");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match s.count(&snap, &all).await {
            Err(StoreError::BadSnapshot(_)) => break,
            Ok(_) => assert!(std::time::Instant::now() < deadline, "the snapshot outlived its connection"),
            Err(e) => panic!("{e:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    s.release(&snap).await; // harmless on a dead connection
    let now = s.snapshot().await.unwrap();
    assert_eq!(s.count(&now, &all).await.unwrap().get("Observation"), Some(&N), "the store reads on");
    s.release(&now).await;
}
