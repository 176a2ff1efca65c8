//! The engine over the real SQLite store and the in-memory storage.

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Value, json};
use sluice_engine::{Engine, EngineConfig, KickoffError};
use sluice_jobs::{JobRepo, JobStatus};
use sluice_ndjson::SplitLimits;
use sluice_planner::{KickoffRequest, Level, plan};
use sluice_storage::{
    FixedStorage, MemoryStorage, ObjectMeta, ObjectWriter, SignedUrl, Storage, StorageError, StorageTarget,
};
use sluice_store::{ExportReads, ResourceWrites, prepare};
use sluice_store_sqlite::SqliteStore;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

async fn store_with_data(dir: &std::path::Path) -> Arc<SqliteStore> {
    let s = Arc::new(SqliteStore::open(dir.join("s.db")).unwrap());
    for p in 0..3 {
        s.put(prepare(&json!({"resourceType":"Patient","id":format!("p{p}")}).to_string(), None).unwrap())
            .await
            .unwrap();
        for o in 0..5 {
            let r = json!({"resourceType":"Observation","id":format!("o{p}-{o}"),"subject":{"reference":format!("Patient/p{p}")}});
            s.put(prepare(&r.to_string(), None).unwrap()).await.unwrap();
        }
    }
    s.put(prepare(&json!({"resourceType":"Organization","id":"org"}).to_string(), None).unwrap()).await.unwrap();
    s.put(
        prepare(
            &json!({"resourceType":"Group","id":"g","type":"person","actual":true,"member":[
        {"entity":{"reference":"Patient/p0"}},{"entity":{"reference":"Patient/p2"},"inactive":true}]})
            .to_string(),
            None,
        )
        .unwrap(),
    )
    .await
    .unwrap();
    s
}

fn get_plan(level: Level, q: &[(&str, &str)]) -> sluice_planner::ExportPlan {
    let q: Vec<(String, String)> = q.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    plan(&KickoffRequest::get(level, &q)).unwrap()
}

fn lines(bytes: &[u8], gzip: bool) -> Vec<Value> {
    let mut text = String::new();
    if gzip {
        flate2::read::MultiGzDecoder::new(bytes).read_to_string(&mut text).unwrap();
    } else {
        text = String::from_utf8(bytes.to_vec()).unwrap();
    }
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

async fn run(engine: &Engine, p: sluice_planner::ExportPlan) -> sluice_jobs::JobRecord {
    let job = engine.kickoff(p, "http://x/fhir/$export".into(), StorageTarget::Default).await.unwrap();
    engine.wait(&job.id).await;
    engine.store().get(&job.id).await.unwrap().unwrap()
}

#[tokio::test]
async fn system_export_writes_every_type_and_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let mem = MemoryStorage::new();
    let engine = Engine::new(store, Arc::new(FixedStorage(Arc::new(mem.clone()))), EngineConfig::default());
    let job = run(&engine, get_plan(Level::System, &[])).await;
    assert_eq!(job.status, JobStatus::Completed, "{:?}", job.outcome);
    let counts: Vec<(&str, u64)> = job.output.iter().map(|f| (f.resource_type.as_str(), f.count)).collect();
    assert_eq!(counts, vec![("Group", 1), ("Observation", 15), ("Organization", 1), ("Patient", 3)]);
    for f in &job.output {
        let obj = mem.get(&f.key).unwrap();
        assert_eq!(obj.bytes.len() as u64, f.bytes);
        assert!(
            f.key.starts_with(&format!("{}/", job.folder)) && f.key.ends_with(&format!("/{}.ndjson", f.resource_type))
        );
        let ls = lines(&obj.bytes, false);
        assert_eq!(ls.len() as u64, f.count);
        assert!(ls.iter().all(|l| l["resourceType"] == f.resource_type.as_str()));
    }
    assert_eq!(job.percent(), 100);
    assert_eq!(job.totals(), (20, 20));
    let m = sluice_engine::manifest(&job, &mem, Duration::from_secs(60)).await.unwrap();
    assert_eq!(m.body["request"], "http://x/fhir/$export");
    assert_eq!(m.body["requiresAccessToken"], false);
    assert_eq!(m.body["error"], json!([]));
    assert_eq!(m.body["output"].as_array().unwrap().len(), 4);
    assert_eq!(m.body["transactionTime"], sluice_fhir::instant::format(job.transaction_time.unwrap()));
}

#[tokio::test]
async fn patient_and_group_exports_follow_the_compartment() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let mem = MemoryStorage::new();
    let engine = Engine::new(store, Arc::new(FixedStorage(Arc::new(mem.clone()))), EngineConfig::default());
    let job = run(&engine, get_plan(Level::Patient, &[])).await;
    let types: Vec<_> = job.output.iter().map(|f| (f.resource_type.clone(), f.count)).collect();
    assert_eq!(types, vec![("Observation".into(), 15), ("Patient".into(), 3)], "no Group, no Organization");

    let job = run(&engine, get_plan(Level::Group("g".into()), &[])).await;
    let ids: Vec<String> = job
        .output
        .iter()
        .flat_map(|f| lines(&mem.get(&f.key).unwrap().bytes, false))
        .map(|v| format!("{}/{}", v["resourceType"].as_str().unwrap(), v["id"].as_str().unwrap()))
        .collect();
    let mut expected: Vec<String> = (0..5).map(|o| format!("Observation/o0-{o}")).collect();
    expected.push("Patient/p0".into());
    assert_eq!(ids, expected, "the inactive member p2 is skipped");

    let missing = engine.kickoff(get_plan(Level::Group("nope".into()), &[]), "u".into(), StorageTarget::Default).await;
    assert!(matches!(missing, Err(KickoffError::NotFound(_))));
    let missing =
        engine.kickoff(get_plan(Level::Patient, &[("patient", "zz")]), "u".into(), StorageTarget::Default).await;
    assert!(matches!(missing, Err(KickoffError::NotFound(i)) if i.diagnostics.contains("zz")));
}

#[tokio::test]
async fn split_gzip_files_are_named_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let mem = MemoryStorage::new();
    let config = EngineConfig {
        split: SplitLimits { max_resources: 4, max_bytes: 0 },
        batch_bytes: 100,
        ..EngineConfig::default()
    };
    let engine = Engine::new(store, Arc::new(FixedStorage(Arc::new(mem.clone()))), config);
    let job = run(&engine, get_plan(Level::System, &[("_type", "Observation"), ("_outputFormat", "ndjson.gz")])).await;
    let names: Vec<(String, u64)> =
        job.output.iter().map(|f| (f.key.rsplit('/').next().unwrap().to_string(), f.count)).collect();
    assert_eq!(
        names,
        vec![
            ("Observation.ndjson.gz".to_string(), 4),
            ("Observation-2.ndjson.gz".to_string(), 4),
            ("Observation-3.ndjson.gz".to_string(), 4),
            ("Observation-4.ndjson.gz".to_string(), 3)
        ]
    );
    let mut all = Vec::new();
    for f in &job.output {
        let obj = mem.get(&f.key).unwrap();
        assert_eq!(obj.meta, ObjectMeta::ndjson(true));
        all.extend(lines(&obj.bytes, true).into_iter().map(|v| v["id"].as_str().unwrap().to_string()));
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 15);
    assert_eq!(all.len(), 15);
}

#[tokio::test]
async fn cancel_removes_everything_and_frees_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let mem = MemoryStorage::new();
    let config = EngineConfig { throttle: Some(Duration::from_secs(3600)), batch_bytes: 1, ..EngineConfig::default() };
    let engine = Engine::new(store, Arc::new(FixedStorage(Arc::new(mem.clone()))), config);
    let job = engine.kickoff(get_plan(Level::System, &[]), "u".into(), StorageTarget::Default).await.unwrap();
    assert!(
        matches!(engine.kickoff(get_plan(Level::System, &[]), "u".into(), StorageTarget::Default).await, Err(KickoffError::Busy(id)) if id == job.id)
    );
    engine.cancel(&job.id).await.unwrap();
    assert!(mem.keys().is_empty(), "nothing of a cancelled export remains: {:?}", mem.keys());
    assert_eq!(engine.store().get(&job.id).await.unwrap().unwrap().status, JobStatus::Cancelled);
    assert!(engine.cancel(&job.id).await.is_err(), "a second DELETE finds nothing");
    // The slot is free at once.
    let next = engine
        .kickoff(get_plan(Level::System, &[("_type", "Patient")]), "u".into(), StorageTarget::Default)
        .await
        .unwrap();
    engine.cancel(&next.id).await.unwrap();
}

/// A storage whose writes fail, like a full disk or a revoked bucket.
struct Broken(MemoryStorage);

struct BrokenWriter;

#[async_trait]
impl ObjectWriter for BrokenWriter {
    async fn write(&mut self, _chunk: Bytes) -> Result<(), StorageError> {
        Err(StorageError::Backend { location: "bucket-x".into(), reason: "quota exceeded".into() })
    }
    async fn finish(self: Box<Self>) -> Result<u64, StorageError> {
        Ok(0)
    }
    async fn abort(self: Box<Self>) {}
}

#[async_trait]
impl Storage for Broken {
    fn describe(&self) -> String {
        "broken".into()
    }
    async fn create(&self, key: &str, meta: ObjectMeta) -> Result<Box<dyn ObjectWriter>, StorageError> {
        if key.contains("Patient") {
            return Ok(Box::new(BrokenWriter));
        }
        self.0.create(key, meta).await
    }
    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError> {
        self.0.signed_url(key, ttl).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        self.0.delete_prefix(prefix).await
    }
}

#[tokio::test]
async fn a_storage_failure_fails_the_job_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let mem = MemoryStorage::new();
    let engine = Engine::new(store, Arc::new(FixedStorage(Arc::new(Broken(mem.clone())))), EngineConfig::default());
    let job = run(&engine, get_plan(Level::System, &[])).await;
    assert_eq!(job.status, JobStatus::Failed);
    let issue = &job.outcome.unwrap().issues[0];
    assert!(
        issue.diagnostics.contains("bucket-x") && issue.diagnostics.contains("quota exceeded"),
        "{}",
        issue.diagnostics
    );
    assert!(job.output.is_empty());
    assert!(mem.keys().is_empty(), "no file of a failed export remains: {:?}", mem.keys());
    assert_eq!(engine.store().active().await.unwrap(), None);
}

/// Starts an export in a "process" of its own (a separate runtime), lets it take its
/// snapshot, then kills that process (drops the runtime, ending all its tasks) and returns
/// the job as the crash left it.
fn crash_mid_export(
    store: Arc<SqliteStore>,
    mem: MemoryStorage,
    plan: sluice_planner::ExportPlan,
) -> sluice_jobs::JobRecord {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async move {
            let slow =
                EngineConfig { throttle: Some(Duration::from_secs(3600)), batch_bytes: 1, ..EngineConfig::default() };
            let engine = Engine::new(store.clone(), Arc::new(FixedStorage(Arc::new(mem))), slow);
            let job = engine.kickoff(plan, "u".into(), StorageTarget::Default).await.unwrap();
            loop {
                let j = store.get(&job.id).await.unwrap().unwrap();
                if j.status == JobStatus::InProgress && !j.progress.is_empty() {
                    return j;
                }
                tokio::task::yield_now().await;
            }
        })
        // The runtime is dropped here: the "process" is gone.
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn an_interrupted_job_is_rerun_on_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let mem = MemoryStorage::new();
    let job = crash_mid_export(store.clone(), mem.clone(), get_plan(Level::System, &[("_type", "Observation")]));
    let snapshot_time = job.transaction_time.unwrap();
    // A write after the snapshot must not appear in the rerun.
    let late = json!({"resourceType":"Observation","id":"late","subject":{"reference":"Patient/p0"}});
    store.put(prepare(&late.to_string(), None).unwrap()).await.unwrap();

    // Second process, same database: it finds the job (lease expired) and finishes it.
    let takeover = EngineConfig { lease: Duration::ZERO, ..EngineConfig::default() };
    let second = Engine::new(store.clone(), Arc::new(FixedStorage(Arc::new(mem.clone()))), takeover);
    assert_eq!(second.resume_unfinished().await.unwrap(), 1);
    second.wait(&job.id).await;
    let done = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.outcome);
    assert_eq!(done.transaction_time, Some(snapshot_time));
    assert_eq!(done.output.len(), 1);
    assert_eq!(done.output[0].count, 15, "the late write is not in the export");
    let lines = lines(&mem.get(&done.output[0].key).unwrap().bytes, false);
    assert_eq!(lines.len(), 15);
    assert_eq!(done.attempts, 2);
}

#[tokio::test]
async fn a_job_interrupted_too_often_fails_with_an_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let mem = MemoryStorage::new();
    let mut job = crash_mid_export(store.clone(), mem.clone(), get_plan(Level::System, &[]));
    job.attempts = sluice_engine::MAX_ATTEMPTS;
    assert!(store.save_if(&job, &[JobStatus::InProgress]).await.unwrap());

    let takeover = EngineConfig { lease: Duration::ZERO, ..EngineConfig::default() };
    let second = Engine::new(store.clone(), Arc::new(FixedStorage(Arc::new(mem.clone()))), takeover);
    assert_eq!(second.resume_unfinished().await.unwrap(), 1);
    second.wait(&job.id).await;
    let done = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Failed);
    assert!(done.outcome.unwrap().issues[0].diagnostics.contains("interrupted"));
    assert_eq!(store.active().await.unwrap(), None, "the slot is free again");
    assert!(mem.keys().is_empty(), "nothing of the given-up export remains");
}

/// The file names (without the folder) and counts of a job's output, in manifest order.
fn names_and_counts(job: &sluice_jobs::JobRecord) -> Vec<(String, u64)> {
    job.output.iter().map(|f| (f.key.rsplit('/').next().unwrap().to_string(), f.count)).collect()
}

/// The ids in each of a job's files of `t`, in manifest order.
fn ids_per_file(job: &sluice_jobs::JobRecord, mem: &MemoryStorage, t: &str, gzip: bool) -> Vec<Vec<String>> {
    job.output
        .iter()
        .filter(|f| f.resource_type == t)
        .map(|f| {
            let ls = lines(&mem.get(&f.key).unwrap().bytes, gzip);
            assert_eq!(ls.len() as u64, f.count, "{}", f.key);
            ls.iter().map(|v| v["id"].as_str().unwrap().to_string()).collect()
        })
        .collect()
}

/// A type with at least `range_split_min` resources and more than half its fair share is
/// read as `parallelism` id ranges at once: every resource exactly once, each file within
/// one range, the file names of the type numbered from one counter (D15) and listed in
/// natural order, file splitting by count still applied within each range, and one
/// progress entry for the type.
#[tokio::test]
async fn a_large_type_is_read_in_id_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let mem = MemoryStorage::new();
    let config = EngineConfig {
        parallelism: 2,
        range_split_min: 5,
        split: SplitLimits { max_resources: 3, max_bytes: 0 },
        batch_bytes: 100,
        ..EngineConfig::default()
    };
    let engine = Engine::new(store, Arc::new(FixedStorage(Arc::new(mem.clone()))), config);
    let job = run(&engine, get_plan(Level::System, &[("_outputFormat", "ndjson.gz")])).await;
    assert_eq!(job.status, JobStatus::Completed, "{:?}", job.outcome);
    // 15 Observations of 20 resources: two ranges, cut at the 8th id of 15 (o1-2); 7 and 8
    // resources, 3 files each with at most 3 resources (one type read whole makes 5).
    let names = names_and_counts(&job);
    let obs: Vec<&str> = names.iter().filter(|(n, _)| n.starts_with("Observation")).map(|(n, _)| n.as_str()).collect();
    let want: Vec<String> = (1..=6)
        .map(|n| if n == 1 { "Observation.ndjson.gz".to_string() } else { format!("Observation-{n}.ndjson.gz") })
        .collect();
    assert_eq!(obs, want, "one numbering for the type, in natural order: {names:?}");
    let others: Vec<(String, u64)> = names.into_iter().filter(|(n, _)| !n.starts_with("Observation")).collect();
    let expected = [("Group.ndjson.gz", 1), ("Organization.ndjson.gz", 1), ("Patient.ndjson.gz", 3)];
    assert_eq!(others, expected.map(|(n, c)| (n.to_string(), c)), "small types are read whole");
    let files = ids_per_file(&job, &mem, "Observation", true);
    let mut all: Vec<String> = files.concat();
    all.sort();
    let every: Vec<String> = (0..3).flat_map(|p| (0..5).map(move |o| format!("o{p}-{o}"))).collect();
    assert_eq!(all, every, "every Observation exactly once");
    for f in &files {
        assert!(f.len() <= 3, "file splitting applies within a range: {f:?}");
        let low = f.iter().filter(|id| id.as_str() < "o1-2").count();
        assert!(low == 0 || low == f.len(), "a file holds one range: {f:?}");
    }
    let per_range = |low: bool| files.iter().flatten().filter(|id| (id.as_str() < "o1-2") == low).count();
    assert_eq!((per_range(true), per_range(false)), (7, 8));
    let progress = &job.progress["Observation"];
    assert_eq!((progress.done, progress.total), (15, 15), "the ranges share the type's progress");
    assert_eq!(job.totals(), (20, 20));
    let m = sluice_engine::manifest(&job, &mem, Duration::from_secs(60)).await.unwrap();
    assert_eq!(m.body["output"].as_array().unwrap().len(), 9);
}

/// A group export with `_since` and a member who joined after it (D7) reads compartment
/// types from two sources (the late joiner's resources before `_since`, every member's
/// changes since); split into id ranges, each range reads both, and the result is the same
/// set of resources, each once.
#[tokio::test]
async fn ranges_combine_with_late_joiners() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_data(dir.path()).await;
    let since = store.snapshot().await.unwrap().time;
    // p1 joins the group; one of p0's Observations changes after `_since`.
    let group = json!({"resourceType":"Group","id":"g","type":"person","actual":true,"member":[
        {"entity":{"reference":"Patient/p0"}},{"entity":{"reference":"Patient/p1"}},
        {"entity":{"reference":"Patient/p2"},"inactive":true}]});
    store.put(prepare(&group.to_string(), None).unwrap()).await.unwrap();
    let changed =
        json!({"resourceType":"Observation","id":"o0-3","status":"amended","subject":{"reference":"Patient/p0"}});
    store.put(prepare(&changed.to_string(), None).unwrap()).await.unwrap();
    let mem = MemoryStorage::new();
    let since_param = sluice_fhir::instant::format(since);
    let plan = || get_plan(Level::Group("g".into()), &[("_since", since_param.as_str())]);
    let whole = Engine::new(store.clone(), Arc::new(FixedStorage(Arc::new(mem.clone()))), EngineConfig::default());
    let reference = run(&whole, plan()).await;
    assert_eq!(reference.status, JobStatus::Completed, "{:?}", reference.outcome);
    let config = EngineConfig { parallelism: 2, range_split_min: 2, ..EngineConfig::default() };
    let ranged = Engine::new(store, Arc::new(FixedStorage(Arc::new(mem.clone()))), config);
    let job = run(&ranged, plan()).await;
    assert_eq!(job.status, JobStatus::Completed, "{:?}", job.outcome);

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let expected: Vec<String> = sorted(ids_per_file(&reference, &mem, "Observation", false).concat());
    // p1's complete data, and p0's change since `_since`.
    let want: Vec<String> = sorted((0..5).map(|o| format!("o1-{o}")).chain(["o0-3".to_string()]).collect());
    assert_eq!(expected, want, "the export read whole");
    let files = ids_per_file(&job, &mem, "Observation", false);
    assert_eq!(files.len(), 2, "two ranges, a file each: {:?}", names_and_counts(&job));
    assert_eq!(sorted(files.concat()), want, "the same resources, each once");
    let names = names_and_counts(&job);
    assert_eq!(names[0].0, "Observation.ndjson");
    assert_eq!(names[1].0, "Observation-2.ndjson");
    assert_eq!(names[2], ("Patient.ndjson".to_string(), 1), "p1 joined: its Patient too");
    assert_eq!(job.progress["Observation"].done, 6);
}
