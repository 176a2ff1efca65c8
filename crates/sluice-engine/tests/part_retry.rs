//! A part whose database connection is lost runs again (D51), over the real SQLite store
//! wrapped so that a scan of one type loses its connection the way a PostgreSQL part does
//! when its backend is killed, and the in-memory storage.

use async_trait::async_trait;
use serde_json::json;
use sluice_engine::{Engine, EngineConfig};
use sluice_jobs::{JobError, JobRecord, JobRepo, JobStatus};
use sluice_ndjson::SplitLimits;
use sluice_planner::{KickoffRequest, Level, plan};
use sluice_storage::{FixedStorage, MemoryStorage, StorageTarget};
use sluice_store::{Batch, ExportReads, ReadResult, ResourceWrites, ScanFilter, Snapshot, StoreError, prepare};
use sluice_store_sqlite::SqliteStore;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The SQLite store, except that the first `losses` scans reading `lose` fail with
/// `error()` after forwarding `after` batches, with `after_a_page` not before the running
/// job's manifest page lists a file of `lose`.
struct Flaky {
    inner: SqliteStore,
    lose: &'static str,
    after: usize,
    losses: AtomicU32,
    after_a_page: bool,
    error: fn() -> StoreError,
}

fn lost() -> StoreError {
    StoreError::ConnectionLost("57P01: terminating connection due to administrator command".into())
}

impl Flaky {
    fn new(dir: &std::path::Path, losses: u32) -> Flaky {
        Flaky {
            inner: SqliteStore::open(dir.join("s.db")).unwrap(),
            lose: "Observation",
            after: 5,
            losses: AtomicU32::new(losses),
            after_a_page: false,
            error: lost,
        }
    }

    /// Polls until the running job has a manifest page listing a file of `self.lose`.
    async fn wait_for_a_page(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(id) = self.inner.active().await.unwrap()
                && let Some(job) = self.inner.get(&id).await.unwrap()
                && !job.pages.is_empty()
                && job.output.iter().any(|f| f.resource_type == self.lose)
            {
                return;
            }
            assert!(Instant::now() < deadline, "no manifest page listed a {} file", self.lose);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[async_trait]
impl ExportReads for Flaky {
    async fn read(&self, resource_type: &str, id: &str) -> Result<ReadResult, StoreError> {
        self.inner.read(resource_type, id).await
    }
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.inner.snapshot().await
    }
    async fn release(&self, snapshot: &Snapshot) {
        self.inner.release(snapshot).await
    }
    async fn can_resume(&self, snapshot: &Snapshot) -> bool {
        self.inner.can_resume(snapshot).await
    }
    async fn count(&self, snapshot: &Snapshot, filter: &ScanFilter) -> Result<BTreeMap<String, u64>, StoreError> {
        self.inner.count(snapshot, filter).await
    }
    async fn read_at(&self, snapshot: &Snapshot, resource_type: &str, id: &str) -> Result<Option<String>, StoreError> {
        self.inner.read_at(snapshot, resource_type, id).await
    }
    async fn read_as_of(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        id: &str,
        at: time::OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        self.inner.read_as_of(snapshot, resource_type, id, at).await
    }
    async fn scan(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        filter: &ScanFilter,
        batch_bytes: usize,
        tx: mpsc::Sender<Batch>,
    ) -> Result<(), StoreError> {
        self.inner.scan(snapshot, resource_type, filter, batch_bytes, tx).await
    }
    async fn scan_many(
        &self,
        snapshot: &Snapshot,
        sources: &[(String, ScanFilter)],
        batch_bytes: usize,
        tx: mpsc::Sender<(usize, Batch)>,
    ) -> Result<(), StoreError> {
        let reads = sources.iter().any(|(t, _)| t == self.lose);
        let fail = reads && self.losses.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if !fail {
            return self.inner.scan_many(snapshot, sources, batch_bytes, tx).await;
        }
        // Forward `after` batches, then stop reading and fail as a killed connection does.
        let (inner_tx, mut inner_rx) = mpsc::channel(1);
        let reading = self.inner.scan_many(snapshot, sources, batch_bytes, inner_tx);
        let forwarding = async {
            for _ in 0..self.after {
                let Some(b) = inner_rx.recv().await else { break };
                if tx.send(b).await.is_err() {
                    break;
                }
            }
            drop(inner_rx);
        };
        let (read, ()) = tokio::join!(reading, forwarding);
        read?;
        if self.after_a_page {
            self.wait_for_a_page().await;
        }
        Err((self.error)())
    }
    async fn compartment_patients(
        &self,
        snapshot: &Snapshot,
        types: &[String],
        filter: &ScanFilter,
        tx: mpsc::Sender<Vec<String>>,
    ) -> Result<(), StoreError> {
        self.inner.compartment_patients(snapshot, types, filter, tx).await
    }
    async fn split_points(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        parts: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.split_points(snapshot, resource_type, parts).await
    }
}

#[async_trait]
impl JobRepo for Flaky {
    async fn insert(&self, job: &JobRecord) -> Result<(), JobError> {
        self.inner.insert(job).await
    }
    async fn get(&self, id: &str) -> Result<Option<JobRecord>, JobError> {
        self.inner.get(id).await
    }
    async fn save_if(&self, job: &JobRecord, expected: &[JobStatus]) -> Result<bool, JobError> {
        self.inner.save_if(job, expected).await
    }
    async fn unfinished(&self) -> Result<Vec<JobRecord>, JobError> {
        self.inner.unfinished().await
    }
    async fn recent(&self, limit: usize) -> Result<Vec<JobRecord>, JobError> {
        self.inner.recent(limit).await
    }
    async fn expired(&self, age: Duration, limit: usize) -> Result<Vec<JobRecord>, JobError> {
        self.inner.expired(age, limit).await
    }
    async fn touch(&self, id: &str) -> Result<bool, JobError> {
        self.inner.touch(id).await
    }
    async fn release_lease(&self, id: &str) -> Result<bool, JobError> {
        self.inner.release_lease(id).await
    }
    async fn claim_stale(&self, lease: Duration) -> Result<Vec<JobRecord>, JobError> {
        self.inner.claim_stale(lease).await
    }
}

/// 3 patients with 5 Observations each, an Organization.
async fn load(store: &Flaky) {
    let put = async |v: serde_json::Value| store.inner.put(prepare(&v.to_string(), None).unwrap()).await.unwrap();
    for p in 0..3 {
        put(json!({"resourceType":"Patient","id":format!("p{p}")})).await;
        for o in 0..5 {
            put(json!({"resourceType":"Observation","id":format!("o{p}-{o}"),"subject":{"reference":format!("Patient/p{p}")}}))
                .await;
        }
    }
    put(json!({"resourceType":"Organization","id":"org"})).await;
}

/// Runs a system export of `query` on `store`, files of at most 2 resources, a batch
/// about a resource; returns the job as recorded and the storage.
async fn export(store: Flaky, query: &[(&str, &str)]) -> (JobRecord, MemoryStorage) {
    load(&store).await;
    let mem = MemoryStorage::new();
    let config = EngineConfig {
        split: SplitLimits { max_resources: 2, max_bytes: 0 },
        batch_bytes: 100,
        progress_interval: Duration::from_millis(10),
        ..EngineConfig::default()
    };
    let engine = Engine::new(Arc::new(store), Arc::new(FixedStorage(Arc::new(mem.clone()))), config);
    let q: Vec<(String, String)> = query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let p = plan(&KickoffRequest::get(Level::System, &q)).unwrap();
    let job = engine.kickoff(p, "http://x/fhir/$export".into(), StorageTarget::Default).await.unwrap();
    engine.wait(&job.id).await;
    (engine.store().get(&job.id).await.unwrap().unwrap(), mem)
}

/// The ids in an ndjson object.
fn ids(mem: &MemoryStorage, key: &str) -> Vec<String> {
    let object = mem.get(key).unwrap_or_else(|| panic!("{key} is not stored"));
    let text = String::from_utf8(object.bytes.to_vec()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect()
}

/// The Observation part loses its connection twice, after finishing two files each time:
/// the third attempt completes, under the same dense names, every Observation once, the
/// progress right, and nothing in storage the manifest does not list.
#[tokio::test]
async fn a_part_that_loses_its_connection_runs_again_under_the_same_names() {
    let dir = tempfile::tempdir().unwrap();
    let (job, mem) = export(Flaky::new(dir.path(), 2), &[]).await;
    assert_eq!(job.status, JobStatus::Completed, "{:?}", job.outcome);
    let names: Vec<String> = job
        .output
        .iter()
        .filter(|f| f.resource_type == "Observation")
        .map(|f| f.key.rsplit('/').next().unwrap().to_string())
        .collect();
    let want: Vec<String> =
        (1..=8).map(|n| if n == 1 { "Observation.ndjson".into() } else { format!("Observation-{n}.ndjson") }).collect();
    assert_eq!(names, want);
    let mut all: Vec<String> =
        job.output.iter().filter(|f| f.resource_type == "Observation").flat_map(|f| ids(&mem, &f.key)).collect();
    all.sort();
    let every: Vec<String> = (0..3).flat_map(|p| (0..5).map(move |o| format!("o{p}-{o}"))).collect();
    assert_eq!(all, every, "every Observation exactly once");
    for f in &job.output {
        assert_eq!(ids(&mem, &f.key).len() as u64, f.count, "{}", f.key);
    }
    let progress = &job.progress["Observation"];
    assert_eq!((progress.done, progress.total), (15, 15), "progress taken back before each retry");
    let mut stored = mem.keys();
    stored.retain(|k| !k.ends_with("/manifest.json") && !k.ends_with("/_SUCCESS"));
    let mut listed: Vec<String> = job.output.iter().map(|f| f.key.clone()).collect();
    listed.sort();
    assert_eq!(stored, listed, "storage holds exactly the listed files");
}

/// Three lost connections in a row: the part gives up, the export fails with an outcome
/// saying so, and its files are deleted.
#[tokio::test]
async fn a_part_that_keeps_losing_its_connection_fails_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let (job, mem) = export(Flaky::new(dir.path(), 3), &[]).await;
    assert_eq!(job.status, JobStatus::Failed);
    let outcome = serde_json::to_string(&job.outcome).unwrap();
    assert!(outcome.contains("connection lost") && outcome.contains("3 attempts"), "{outcome}");
    assert!(mem.keys().iter().all(|k| !k.starts_with(&job.folder)), "{:?}", mem.keys());
}

/// With `allowPartialManifests`, once a page has listed the part's files they must not
/// change: the lost connection fails the export as before D51.
#[tokio::test]
async fn files_a_manifest_page_listed_are_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky { after_a_page: true, ..Flaky::new(dir.path(), 1) };
    let (job, _) = export(store, &[("allowPartialManifests", "true")]).await;
    assert_eq!(job.status, JobStatus::Failed);
    let outcome = serde_json::to_string(&job.outcome).unwrap();
    assert!(outcome.contains("manifest page"), "{outcome}");
}

/// A snapshot that is gone is not a lost connection: no retry, the export fails.
#[tokio::test]
async fn a_lost_snapshot_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky { error: || StoreError::BadSnapshot("pg:gone".into()), ..Flaky::new(dir.path(), 1) };
    let (job, _) = export(store, &[]).await;
    assert_eq!(job.status, JobStatus::Failed);
    let outcome = serde_json::to_string(&job.outcome).unwrap();
    assert!(outcome.contains("snapshot 'pg:gone' is not valid"), "{outcome}");
}
