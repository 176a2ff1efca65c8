//! The export engine: runs a validated [`ExportPlan`] against a [`ResourceStore`] and
//! writes its files to a [`Storage`].
//!
//! - [`Engine::kickoff`] checks what needs the store (the Group exists, the patients
//!   exist), records an `Accepted` job (the store refuses a second active one) and starts it.
//! - A run takes one snapshot (or reuses the one recorded, after a restart), works out
//!   what each type reads (at group level: the members at the snapshot's time, D6, and with
//!   `_since` those who joined after it, whose complete data is exported, D7), counts it,
//!   then exports the types in parallel (bounded by [`EngineConfig::parallelism`]). A type
//!   too large to leave to one core is read as several id ranges at once (see
//!   [`EngineConfig::range_split_min`]). Each part streams batches from the store, encodes
//!   them on blocking threads (gzip never runs on the async reactor) and streams the bytes
//!   into storage objects. Memory is bounded by batch and chunk sizes, never by export size.
//! - Progress is saved to the job record about twice a second; the save is a
//!   compare-and-set, so a run notices a cancellation made by any server.
//! - On failure or cancellation every object the run wrote is deleted.
//! - [`manifest`] renders the completed-job manifest with freshly signed URLs.

mod elements;
mod manifest;

pub use manifest::{Manifest, manifest, manifest_page};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use sluice_fhir::{Issue, IssueCode, OperationOutcome};
use sluice_jobs::{JobError, JobRecord, JobStatus, OutputFile, TypeProgress};
use sluice_ndjson::{Compression, Event, NdjsonWriter, SplitLimits};
use sluice_planner::{ExportPlan, Level, TypeSelection};
use sluice_storage::{ObjectMeta, ObjectWriter, Storage, StorageError, StorageSource};
use sluice_store::{Batch, IdRange, Patients, ReadResult, ResourceStore, ScanFilter, Snapshot};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Tuning knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Parts exported at the same time (and how many id ranges a large type is split into).
    pub parallelism: usize,
    /// A type with at least this many resources to export, and more than half its fair
    /// share of the export (`total / parallelism / 2`), is read by several parts at once,
    /// each reading one range of ids: as many ranges as make each at most half a fair share,
    /// at most `parallelism`. Otherwise one type alone (Observation is 40-50% of Synthea
    /// data) keeps one core busy while the other has nothing left to do. Its files are still
    /// `<Type>.ndjson`, `<Type>-2.ndjson`, ... (D15). 0 = never split.
    pub range_split_min: u64,
    /// Bytes per batch read from the store.
    pub batch_bytes: usize,
    /// When to split a type into several files.
    pub split: SplitLimits,
    /// gzip level for `ndjson.gz` output (1-9).
    pub gzip_level: u32,
    /// How often progress is saved to the job record.
    pub progress_interval: Duration,
    /// A pause after every batch, to slow exports down on purpose (demos, and tests that
    /// must act while an export runs). `None` in production.
    pub throttle: Option<Duration>,
    /// A running job renews its lease every quarter of this; a job whose lease is older
    /// (its server died) is taken over by any server sharing the store.
    pub lease: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            parallelism: std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
            range_split_min: 50_000,
            batch_bytes: 1 << 20,
            split: SplitLimits { max_resources: 0, max_bytes: 0 },
            gzip_level: 2,
            progress_interval: Duration::from_millis(500),
            throttle: None,
            lease: Duration::from_secs(10),
        }
    }
}

/// Why a kick-off was refused.
#[derive(Debug, thiserror::Error)]
pub enum KickoffError {
    /// Another export is running (429).
    #[error("export {0} is running; only one export runs at a time")]
    Busy(String),
    /// The Group or a patient does not exist (404).
    #[error("{}", .0.diagnostics)]
    NotFound(Issue),
    /// The store failed (500).
    #[error("{0}")]
    Internal(String),
}

/// Why a cancel or delete was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such export (or it was already cancelled or deleted).
    #[error("no export with id '{0}'")]
    NotFound(String),
    /// The store failed.
    #[error("{0}")]
    Internal(String),
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("cancelled")]
    Cancelled,
    #[error("{}", .0.diagnostics)]
    Failed(Issue),
}

impl From<sluice_store::StoreError> for RunError {
    fn from(e: sluice_store::StoreError) -> Self {
        RunError::Failed(Issue::fatal(IssueCode::Exception, format!("reading the store failed: {e}")))
    }
}

impl From<sluice_storage::StorageError> for RunError {
    fn from(e: sluice_storage::StorageError) -> Self {
        RunError::Failed(Issue::fatal(IssueCode::Exception, format!("writing the export failed: {e}")))
    }
}

impl From<JobError> for RunError {
    fn from(e: JobError) -> Self {
        RunError::Failed(Issue::fatal(IssueCode::Exception, format!("saving the job failed: {e}")))
    }
}

/// A run in this process: how to stop it and how to know it has stopped.
struct Running {
    token: CancellationToken,
    done: tokio::sync::watch::Receiver<bool>,
}

/// What one part reads, in order: (resource type, filter).
type Sources = Vec<(String, ScanFilter)>;

/// A part before it runs ([`Engine::export_snapshot`]).
struct PlannedPart {
    /// The type its files are named after (`Bundle` for deletions, [`BLOCK_FILES`] for
    /// patient blocks).
    resource_type: String,
    sources: Sources,
    /// `organizeOutputBy=Patient`: the patient blocks it writes (`sources` is then empty).
    blocks: Option<Arc<Blocks>>,
    /// Whether it lists deletions.
    deleted: bool,
    /// About how many resources it reads: larger parts start first.
    size: u64,
}

/// The progress entry of the deletions part (`_since` exports).
const DELETED: &str = "deleted";

/// The name of the files of patient blocks (`organizeOutputBy=Patient`): `patients.ndjson`,
/// `patients-2.ndjson`, ...
const BLOCK_FILES: &str = "patients";

/// The patient blocks of one part (`organizeOutputBy=Patient`): for each patient, in
/// order, a `Parameters` header naming it, then its compartment's resources, type by type
/// (`Patient` first), each read from the store through the patient's own compartment
/// filter. A resource in the compartments of several exported patients is in each of
/// their blocks, as the IG defines a block.
struct Blocks {
    /// Whose blocks.
    patients: BlockPatients,
    /// The types of a block, in order: `Patient` first, then the others by name.
    types: Vec<String>,
    /// The window every block reads (`_since`, `_until`); no patients.
    window: ScanFilter,
    /// Group members who joined after `_since` (D7): their blocks read their whole
    /// compartment up to `_until`.
    late: HashSet<String>,
    /// The window of the late joiners' blocks.
    late_window: ScanFilter,
}

/// The patients of a part's blocks.
enum BlockPatients {
    /// These ids, in order (group members, or the `patient` parameter).
    Listed(Vec<String>),
    /// The patients with ids in this range that have resources in the window, in the
    /// store's order ([`ResourceStore::compartment_patients`]; patient level).
    Range(IdRange),
}

/// A job interrupted this many times (crashes, restarts) is failed instead of rerun.
pub const MAX_ATTEMPTS: u32 = 3;

/// How long DELETE waits for a local run to stop and delete its files.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// Runs exports. Cheap to clone; one per server.
#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn ResourceStore>,
    storages: Arc<dyn StorageSource>,
    config: EngineConfig,
    running: Arc<Mutex<HashMap<String, Running>>>,
}

impl Engine {
    /// An engine over a store, writing where `storages` says.
    pub fn new(store: Arc<dyn ResourceStore>, storages: Arc<dyn StorageSource>, config: EngineConfig) -> Self {
        Engine { store, storages, config, running: Default::default() }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ResourceStore> {
        &self.store
    }

    /// Where new exports go, or why storage is not usable ([`StorageError::NotConfigured`]):
    /// a kick-off checks this before anything else.
    pub async fn storage_for_new_export(&self) -> Result<(Arc<dyn Storage>, serde_json::Value), StorageError> {
        self.storages.current().await
    }

    /// The storage `job` wrote its files to.
    pub async fn storage_of(&self, job: &JobRecord) -> Result<Arc<dyn Storage>, StorageError> {
        self.storages.open(&job.storage).await
    }

    /// Checks the plan against the store, records an `Accepted` job writing to `storage` (a
    /// description from [`Engine::storage_for_new_export`]) and starts it.
    pub async fn kickoff(
        &self,
        plan: ExportPlan,
        request_url: String,
        storage: serde_json::Value,
    ) -> Result<JobRecord, KickoffError> {
        let internal = |e: &dyn std::fmt::Display| KickoffError::Internal(e.to_string());
        if let Level::Group(id) = &plan.level {
            match self.store.read("Group", id).await.map_err(|e| internal(&e))? {
                ReadResult::Found(_) => {}
                ReadResult::Deleted(_) => {
                    return Err(KickoffError::NotFound(
                        Issue::error(IssueCode::Deleted, format!("Group/{id} was deleted")).at("Group"),
                    ));
                }
                ReadResult::NotFound => {
                    return Err(KickoffError::NotFound(
                        Issue::error(IssueCode::NotFound, format!("Group/{id} does not exist")).at("Group"),
                    ));
                }
            }
        }
        if let Some(patients) = &plan.patients {
            let mut missing = Vec::new();
            for p in patients {
                if !matches!(self.store.read("Patient", p).await.map_err(|e| internal(&e))?, ReadResult::Found(_)) {
                    missing.push(p.as_str());
                }
            }
            if !missing.is_empty() {
                return Err(KickoffError::NotFound(
                    Issue::error(IssueCode::NotFound, format!("no Patient with id {}", missing.join(", ")))
                        .at("patient"),
                ));
            }
        }
        let mut job = JobRecord::new(uuid::Uuid::new_v4().to_string(), plan, request_url, OffsetDateTime::now_utc());
        job.storage = storage;
        match self.store.insert(&job).await {
            Ok(()) => {}
            Err(JobError::Busy(id)) => return Err(KickoffError::Busy(id)),
            Err(e) => return Err(internal(&e)),
        }
        self.spawn(job.clone());
        Ok(job)
    }

    /// Takes over every active job whose lease expired (its server died) and runs it
    /// again; returns how many. A job that had a snapshot is rerun on the same snapshot when
    /// the store can still read it, so its result is what it would have been.
    pub async fn resume_unfinished(&self) -> Result<usize, JobError> {
        let jobs = self.store.claim_stale(self.config.lease).await?;
        let mut n = 0;
        for job in jobs {
            if self.running.lock().expect("running map").contains_key(&job.id) {
                continue; // ours, and alive
            }
            tracing::info!(job = %job.id, status = job.status.as_str(), "taking over an interrupted export");
            self.spawn(job);
            n += 1;
        }
        Ok(n)
    }

    /// Runs [`Engine::resume_unfinished`] now and then every half lease, for as long as the
    /// runtime lives: a job whose server died is finished by another one.
    pub fn spawn_recovery(&self) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval((engine.config.lease / 2).max(Duration::from_millis(100)));
            loop {
                tick.tick().await;
                if let Err(e) = engine.resume_unfinished().await {
                    tracing::warn!(error = %e, "looking for interrupted exports failed");
                }
            }
        })
    }

    /// Cancels an active export, or deletes a finished one with its files. The one-export
    /// slot is free when this returns.
    pub async fn cancel(&self, id: &str) -> Result<(), CancelError> {
        let internal = |e: JobError| CancelError::Internal(e.to_string());
        loop {
            let Some(mut job) = self.store.get(id).await.map_err(internal)? else {
                return Err(CancelError::NotFound(id.to_string()));
            };
            if job.status == JobStatus::Cancelled {
                return Err(CancelError::NotFound(id.to_string()));
            }
            let was = job.status;
            job.status = JobStatus::Cancelled;
            job.finished_at = Some(OffsetDateTime::now_utc());
            job.outcome = Some(OperationOutcome::single(Issue::error(
                IssueCode::Incomplete,
                "the export was cancelled by the client",
            )));
            if !self.store.save_if(&job, &[was]).await.map_err(internal)? {
                continue; // the status moved under us: look again
            }
            if was.is_active() {
                let local = self.running.lock().expect("running map").get(id).map(|r| {
                    r.token.cancel();
                    r.done.clone()
                });
                // Wait for the local run to delete what it wrote. A run on another server
                // notices at its next progress save and cleans up there.
                if let Some(mut done) = local {
                    let _ = tokio::time::timeout(CANCEL_WAIT, done.wait_for(|d| *d)).await;
                }
            } else {
                let prefix = format!("{}/", job.folder);
                let deleted = match self.storage_of(&job).await {
                    Ok(storage) => storage.delete_prefix(&prefix).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                if let Err(e) = deleted {
                    tracing::warn!(job = %id, error = %e, "deleting the files of a deleted export failed");
                }
            }
            tracing::info!(job = %id, was = was.as_str(), "export cancelled");
            return Ok(());
        }
    }

    /// Waits until the run of job `id` in this process (if any) has stopped.
    pub async fn wait(&self, id: &str) {
        let done = self.running.lock().expect("running map").get(id).map(|r| r.done.clone());
        if let Some(mut done) = done {
            let _ = done.wait_for(|d| *d).await;
        }
    }

    fn spawn(&self, job: JobRecord) {
        let token = CancellationToken::new();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        self.running.lock().expect("running map").insert(job.id.clone(), Running { token: token.clone(), done });
        let engine = self.clone();
        tokio::spawn(async move {
            let id = job.id.clone();
            engine.run(job, token).await;
            engine.running.lock().expect("running map").remove(&id);
            let _ = done_tx.send(true);
        });
    }

    async fn run(&self, mut job: JobRecord, token: CancellationToken) {
        let prefix = format!("{}/", job.folder);
        let started = std::time::Instant::now();
        let heartbeat = self.heartbeat(job.id.clone(), token.clone());
        let (storage, result) = match self.storage_of(&job).await {
            Ok(storage) => {
                let result = self.run_inner(&mut job, &token, &storage).await;
                (Some(storage), result)
            }
            Err(e) => (None, Err(RunError::from(e))),
        };
        heartbeat.abort();
        let cleanup = |what: &'static str| {
            let (storage, prefix, id) = (storage.clone(), prefix.clone(), job.id.clone());
            async move {
                if let Some(storage) = storage
                    && let Err(e) = storage.delete_prefix(&prefix).await
                {
                    tracing::warn!(job = %id, error = %e, "cleaning up a {what} export failed");
                }
            }
        };
        match result {
            Ok(()) => {
                let (done, _) = job.totals();
                tracing::info!(job = %job.id, resources = done, files = job.output.len(), elapsed_ms = started.elapsed().as_millis() as u64, "export completed");
            }
            Err(RunError::Cancelled) => cleanup("cancelled").await,
            Err(RunError::Failed(issue)) => {
                tracing::error!(job = %job.id, error = %issue.diagnostics, "export failed");
                cleanup("failed").await;
                job.status = JobStatus::Failed;
                job.finished_at = Some(OffsetDateTime::now_utc());
                job.output.clear();
                job.error.clear();
                job.outcome = Some(OperationOutcome::single(issue));
                if let Err(e) = self.store.save_if(&job, &[JobStatus::Accepted, JobStatus::InProgress]).await {
                    tracing::error!(job = %job.id, error = %e, "recording the failure failed");
                }
            }
        }
    }

    /// Renews the job's lease while it runs; stops the run when the job is no longer active
    /// (cancelled through any server).
    fn heartbeat(&self, id: String, token: CancellationToken) -> tokio::task::JoinHandle<()> {
        let store = self.store.clone();
        let every = (self.config.lease / 4).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match store.touch(&id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        token.cancel();
                        return;
                    }
                    Err(e) => tracing::warn!(job = %id, error = %e, "renewing the export's lease failed"),
                }
            }
        })
    }

    async fn run_inner(
        &self,
        job: &mut JobRecord,
        token: &CancellationToken,
        storage: &Arc<dyn Storage>,
    ) -> Result<(), RunError> {
        let from = job.status;
        job.attempts += 1;
        if job.attempts > MAX_ATTEMPTS {
            return Err(RunError::Failed(Issue::fatal(
                IssueCode::Incomplete,
                format!(
                    "the export was interrupted {MAX_ATTEMPTS} times (server restarts) and was given up; start a new one"
                ),
            )));
        }
        // Files listed in a manifest page a client may have read can't be rewritten: the IG
        // says they never change once listed.
        if job.attempts > 1 && !job.pages.is_empty() {
            return Err(RunError::Failed(Issue::fatal(
                IssueCode::Incomplete,
                "the export was interrupted (server restart) after partial manifests had listed some of \
                 its files, which must not change; start a new export",
            )));
        }
        // A rerun after a restart starts over on the same snapshot: drop what it wrote.
        if job.attempts > 1 {
            storage.delete_prefix(&format!("{}/", job.folder)).await?;
            job.output.clear();
            job.error.clear();
        }
        let phase = std::time::Instant::now();
        let recorded = match (&job.snapshot, job.transaction_time) {
            (Some(id), Some(time)) => Some(Snapshot { id: id.clone(), time }),
            _ => None,
        };
        let snapshot = match recorded {
            Some(s) if self.store.can_resume(&s).await => s,
            _ => {
                let s = self.store.snapshot().await?;
                job.snapshot = Some(s.id.clone());
                job.transaction_time = Some(s.time);
                s
            }
        };
        tracing::debug!(job = %job.id, ms = phase.elapsed().as_millis() as u64, "snapshot taken");
        let result = self.export_snapshot(job, token, &snapshot, from, storage).await;
        self.store.release(&snapshot).await;
        result
    }

    async fn export_snapshot(
        &self,
        job: &mut JobRecord,
        token: &CancellationToken,
        snapshot: &Snapshot,
        from: JobStatus,
        storage: &Arc<dyn Storage>,
    ) -> Result<(), RunError> {
        job.status = JobStatus::InProgress;
        if !self.store.save_if(job, &[from]).await? {
            return Err(RunError::Cancelled);
        }

        let phase = std::time::Instant::now();
        let Filters { compartment: compartment_filter, plain: plain_filter, late, deletions: del_compartment } =
            self.filters(job, snapshot).await?;
        let mut counts = self.counts(job, snapshot, compartment_filter.as_ref(), &plain_filter).await?;
        let pick = |t: &str, comp: Option<&ScanFilter>, plain: &ScanFilter| match comp {
            Some(cf) if sluice_fhir::is_patient_compartment_type(t) => cf.clone(),
            _ => plain.clone(),
        };
        self.recount_narrowed(&job.plan, snapshot, &mut counts, |t| {
            pick(t, compartment_filter.as_ref(), &plain_filter)
        })
        .await?;
        // Group members who joined after `_since` (D7): their resources from before it too.
        // Disjoint from what the compartment filter reads (last updated at or before
        // `_since`, against after it), so the counts add up and nothing is read twice.
        let late_counts = match &late {
            Some(lf) => {
                let mut c = self.store.count(snapshot, lf).await?;
                c.retain(|t, _| sluice_fhir::is_patient_compartment_type(t));
                self.recount_narrowed(&job.plan, snapshot, &mut c, |_| lf.clone()).await?;
                c
            }
            None => BTreeMap::new(),
        };
        for (t, n) in &late_counts {
            *counts.entry(t.clone()).or_default() += n;
        }
        // With `_since`, the resources deleted since are listed too (D12).
        let del_plain = ScanFilter { deleted: true, ..plain_filter.clone() };
        let del_counts = match job.plan.since {
            Some(_) => self.counts(job, snapshot, del_compartment.as_ref(), &del_plain).await?,
            None => BTreeMap::new(),
        };
        tracing::debug!(job = %job.id, ms = phase.elapsed().as_millis() as u64, "filters and counts");
        let types = job.plan.resolve_types(counts.keys().map(String::as_str));
        let del_types = job.plan.resolve_types(del_counts.keys().map(String::as_str));
        // One part per type, or one per id range of a large type (every source of the type
        // restricted to the range); the deletions of every type go into one `Bundle` part.
        let total: u64 = types.iter().map(|t| counts[t]).sum();
        let mut plan_parts: Vec<PlannedPart> = Vec::new();
        job.progress.clear();
        for t in &types {
            job.progress.insert(t.clone(), TypeProgress { done: 0, total: counts[t] });
        }
        if job.plan.organize_by_patient {
            plan_parts.extend(self.block_parts(&types, snapshot, compartment_filter.as_ref(), late.as_ref()).await?);
        }
        for t in types.iter().filter(|_| !job.plan.organize_by_patient) {
            let mut sources = Vec::with_capacity(2);
            if let Some(lf) = late.as_ref().filter(|_| late_counts.contains_key(t)) {
                sources.push((t.clone(), narrow(&job.plan, t, lf)));
            }
            sources.push((t.clone(), narrow(&job.plan, t, &pick(t, compartment_filter.as_ref(), &plain_filter))));
            let ranges = match range_parts(&self.config, counts[t], total) {
                1 => Vec::new(),
                n => IdRange::between(&self.store.split_points(snapshot, t, n).await?),
            };
            if ranges.len() < 2 {
                plan_parts.push(PlannedPart {
                    resource_type: t.clone(),
                    sources,
                    blocks: None,
                    deleted: false,
                    size: counts[t],
                });
                continue;
            }
            tracing::debug!(job = %job.id, resource_type = %t, ranges = ranges.len(), "reading a type in id ranges");
            let size = counts[t] / ranges.len() as u64;
            for range in ranges {
                let sources = sources
                    .iter()
                    .map(|(rt, f)| (rt.clone(), ScanFilter { id_range: Some(range.clone()), ..f.clone() }))
                    .collect();
                plan_parts.push(PlannedPart { resource_type: t.clone(), sources, blocks: None, deleted: false, size });
            }
        }
        if !del_types.is_empty() {
            let total = del_types.iter().map(|t| del_counts[t]).sum();
            job.progress.insert(DELETED.to_string(), TypeProgress { done: 0, total });
            let sources =
                del_types.iter().map(|t| (t.clone(), pick(t, del_compartment.as_ref(), &del_plain))).collect();
            plan_parts.push(PlannedPart {
                resource_type: "Bundle".into(),
                sources,
                blocks: None,
                deleted: true,
                size: total,
            });
        }
        // Largest parts first, so the big ones run alongside the many small ones instead of
        // alone at the end.
        plan_parts.sort_by_key(|p| std::cmp::Reverse(p.size));
        if !self.store.save_if(job, &[JobStatus::InProgress]).await? {
            return Err(RunError::Cancelled);
        }

        // The lenient-mode error file first: with partial manifests every page carries the
        // same `error` array, so it must exist before the first page.
        job.error = self.write_error_file(job, storage).await?;
        let finished: Finished = Arc::default();
        let done: Arc<BTreeMap<String, AtomicU64>> =
            Arc::new(job.progress.keys().map(|k| (k.clone(), AtomicU64::new(0))).collect());
        // File numbers per file name (type): the range parts of a type, and a `Bundle`
        // type beside the deletions, name their files from one counter.
        let mut file_numbers: HashMap<String, Arc<AtomicU32>> = HashMap::new();
        let limit = Arc::new(Semaphore::new(self.config.parallelism.max(1)));
        let mut parts = tokio::task::JoinSet::new();
        for PlannedPart { resource_type: t, sources, blocks, deleted: del, .. } in plan_parts {
            let part = Part {
                file_numbers: file_numbers.entry(t.clone()).or_default().clone(),
                engine: self.clone(),
                storage: storage.clone(),
                job_folder: job.folder.clone(),
                plan: job.plan.clone(),
                snapshot: snapshot.clone(),
                progress_key: if del { DELETED.to_string() } else { t.clone() },
                resource_type: t,
                deleted: del,
                sources,
                blocks,
                done: done.clone(),
                finished: finished.clone(),
                token: token.clone(),
            };
            let limit = limit.clone();
            parts.spawn(async move {
                let _permit = limit.acquire_owned().await.map_err(|_| RunError::Cancelled)?;
                part.run().await
            });
        }

        let mut ticker = tokio::time::interval(self.config.progress_interval);
        ticker.tick().await;
        let mut failure: Option<RunError> = None;
        while !parts.is_empty() {
            tokio::select! {
                joined = parts.join_next() => {
                    match joined.expect("set is not empty") {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => { failure.get_or_insert(e); token.cancel(); }
                        Err(join) => {
                            failure.get_or_insert(RunError::Failed(Issue::fatal(IssueCode::Exception, format!("an export worker crashed: {join}"))));
                            token.cancel();
                        }
                    }
                }
                _ = ticker.tick() => {
                    Self::copy_progress(job, &done);
                    if job.plan.allow_partial_manifests {
                        Self::take_finished(job, &finished);
                        job.close_page(false);
                    }
                    if !self.store.save_if(job, &[JobStatus::InProgress]).await? {
                        token.cancel();
                        failure.get_or_insert(RunError::Cancelled);
                    }
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if token.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        Self::copy_progress(job, &done);
        Self::take_finished(job, &finished);
        if job.plan.allow_partial_manifests {
            // Pages already closed keep their files; the rest make the last page.
            job.close_page(true);
        } else {
            let order = |a: &OutputFile, b: &OutputFile| natural_key(&a.key).cmp(&natural_key(&b.key));
            job.output.sort_by(|a, b| a.resource_type.cmp(&b.resource_type).then(order(a, b)));
            job.deleted.sort_by(order);
        }
        self.write_completion_markers(job, storage).await?;
        job.status = JobStatus::Completed;
        job.finished_at = Some(OffsetDateTime::now_utc());
        if !self.store.save_if(job, &[JobStatus::InProgress]).await? {
            return Err(RunError::Cancelled);
        }
        Ok(())
    }

    /// The parts of an export organized by patient: the patients split into about
    /// [`EngineConfig::parallelism`] parts (listed patients in contiguous chunks; at patient
    /// level, id ranges of the `Patient` resources).
    async fn block_parts(
        &self,
        types: &[String],
        snapshot: &Snapshot,
        compartment: Option<&ScanFilter>,
        late: Option<&ScanFilter>,
    ) -> Result<Vec<PlannedPart>, RunError> {
        let mut block_types: Vec<String> =
            types.iter().filter(|t| sluice_fhir::is_patient_compartment_type(t)).cloned().collect();
        block_types.sort_by_key(|t| (t != "Patient", t.clone()));
        let Some(cf) = compartment else {
            return Err(RunError::Failed(Issue::fatal(
                IssueCode::Exception,
                "organizeOutputBy=Patient needs a patient or group export",
            )));
        };
        let window = ScanFilter { patients: None, ..cf.clone() };
        let (late_set, late_window) = match late {
            Some(ScanFilter { patients: Some(Patients::Only(ids)), .. }) => {
                (ids.iter().cloned().collect(), ScanFilter { since: None, ..window.clone() })
            }
            _ => (HashSet::new(), window.clone()),
        };
        let p = self.config.parallelism.max(1);
        let groups: Vec<BlockPatients> = match &cf.patients {
            Some(Patients::Only(ids)) => {
                ids.chunks(ids.len().div_ceil(p).max(1)).map(|c| BlockPatients::Listed(c.to_vec())).collect()
            }
            _ => IdRange::between(&self.store.split_points(snapshot, "Patient", p).await?)
                .into_iter()
                .map(BlockPatients::Range)
                .collect(),
        };
        Ok(groups
            .into_iter()
            .map(|patients| {
                let size = match &patients {
                    BlockPatients::Listed(ids) => ids.len() as u64,
                    BlockPatients::Range(_) => 0,
                };
                let blocks = Blocks {
                    patients,
                    types: block_types.clone(),
                    window: window.clone(),
                    late: late_set.clone(),
                    late_window: late_window.clone(),
                };
                PlannedPart {
                    resource_type: BLOCK_FILES.into(),
                    sources: Vec::new(),
                    blocks: Some(Arc::new(blocks)),
                    deleted: false,
                    size,
                }
            })
            .collect())
    }

    /// Recounts the types in `counts` whose `_typeFilter` bounds `_lastUpdated` or `_id`
    /// ([`narrow`]): they read, so they count, only that. `filter_of` gives a type's filter
    /// before narrowing.
    async fn recount_narrowed(
        &self,
        plan: &ExportPlan,
        snapshot: &Snapshot,
        counts: &mut BTreeMap<String, u64>,
        filter_of: impl Fn(&str) -> ScanFilter,
    ) -> Result<(), RunError> {
        for t in plan.type_filters.keys() {
            let Some(n) = counts.get_mut(t) else { continue };
            let wide = filter_of(t);
            let filter = narrow(plan, t, &wide);
            if filter != wide {
                *n = self.store.count(snapshot, &filter).await?.get(t).copied().unwrap_or(0);
            }
        }
        Ok(())
    }

    /// Per-type counts of what the export reads: compartment types through the compartment
    /// filter at patient and group level, other types whole and only when asked for (D8).
    async fn counts(
        &self,
        job: &JobRecord,
        snapshot: &Snapshot,
        compartment_filter: Option<&ScanFilter>,
        plain_filter: &ScanFilter,
    ) -> Result<BTreeMap<String, u64>, RunError> {
        let in_compartment = sluice_fhir::is_patient_compartment_type;
        let Some(cf) = compartment_filter else { return Ok(self.store.count(snapshot, plain_filter).await?) };
        let mut counts = self.store.count(snapshot, cf).await?;
        counts.retain(|t, _| in_compartment(t));
        let asked_outside =
            matches!(&job.plan.types, TypeSelection::Only(list) if list.iter().any(|t| !in_compartment(t)));
        if asked_outside {
            let all = self.store.count(snapshot, plain_filter).await?;
            counts.extend(all.into_iter().filter(|(t, _)| !in_compartment(t)));
        }
        Ok(counts)
    }

    /// Moves the files the parts finished since the last call into the job, in the order
    /// they finished.
    fn take_finished(job: &mut JobRecord, finished: &Finished) {
        let files = std::mem::take(&mut *finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for (deleted, file) in files {
            if deleted { job.deleted.push(file) } else { job.output.push(file) }
        }
    }

    fn copy_progress(job: &mut JobRecord, done: &BTreeMap<String, AtomicU64>) {
        for (t, n) in done {
            if let Some(p) = job.progress.get_mut(t) {
                p.done = n.load(Ordering::Relaxed);
            }
        }
    }

    /// What the export reads: the compartment filter (for compartment types at patient and
    /// group level), the filter for everything else, and at group level with `_since` the
    /// late joiners' filter (D7).
    async fn filters(&self, job: &JobRecord, snapshot: &Snapshot) -> Result<Filters, RunError> {
        let plan = &job.plan;
        let plain = ScanFilter { since: plan.since, until: plan.until, ..Default::default() };
        let only =
            |patients: Patients, deleted: bool| ScanFilter { patients: Some(patients), deleted, ..plain.clone() };
        let simple = |patients: Patients| Filters {
            compartment: Some(only(patients.clone(), false)),
            deletions: Some(only(patients, true)),
            late: None,
            plain: plain.clone(),
        };
        let id = match &plan.level {
            Level::System => return Ok(Filters { compartment: None, deletions: None, late: None, plain }),
            Level::Patient => {
                return Ok(simple(match &plan.patients {
                    Some(ids) => Patients::Only(ids.clone()),
                    None => Patients::Any,
                }));
            }
            Level::Group(id) => id,
        };
        let json = self.store.read_at(snapshot, "Group", id).await?.ok_or_else(|| {
            RunError::Failed(Issue::error(
                IssueCode::NotFound,
                format!("Group/{id} does not exist at the export's transaction time"),
            ))
        })?;
        let mut members = group_members(&parse_group(id, &json)?, snapshot.time);
        if let Some(only) = &plan.patients {
            members.retain(|m| only.contains(m));
        }
        // D7: members are compared with the Group version current at `_since`. A `_since`
        // at or after the snapshot's time has no late joiners: the Group then is the Group
        // now, and nothing written after the snapshot is exported.
        let since = match plan.since {
            Some(since) if since < snapshot.time && !members.is_empty() => since,
            _ => return Ok(simple(Patients::Only(members))),
        };
        let then = match self.store.read_as_of(snapshot, "Group", id, since).await? {
            Some(json) => Some(parse_group(id, &json)?),
            None => None,
        };
        let late = late_joiners(&members, then.as_ref(), since);
        if late.is_empty() {
            return Ok(simple(Patients::Only(members)));
        }
        let joined: HashSet<&String> = late.iter().collect();
        let earlier: Vec<String> = members.iter().filter(|m| !joined.contains(m)).cloned().collect();
        // The compartment filter reads every member's changes since `_since`; the late
        // filter reads the late joiners' resources last updated at or before it (and, like
        // everything, at or before `_until`). The two windows do not overlap, so a resource
        // in the compartments of both a late joiner and an earlier member is read once, by
        // the filter its `lastUpdated` falls in: no exclusion in the store, no set of ids
        // in the engine, no JSON parsed, and the counts simply add up.
        let until = Some(plan.until.map_or(since, |u| u.min(since)));
        let late = ScanFilter { until, patients: Some(Patients::Only(late)), ..Default::default() };
        Ok(Filters {
            compartment: Some(only(Patients::Only(members), false)),
            // Deletions (D12) only of the members the client already had data for: a late
            // joiner's resources deleted since `_since` were never sent for this group, so
            // there is nothing to take back. A deleted resource that was also in an earlier
            // member's compartment is still listed, through that member.
            deletions: Some(only(Patients::Only(earlier), true)),
            late: Some(late),
            plain,
        })
    }

    /// Writes `manifest.json` (file names relative to the folder) and then an empty
    /// `_SUCCESS` into the export folder, last: a bucket-event pipeline can start on
    /// `_SUCCESS` without polling.
    async fn write_completion_markers(&self, job: &JobRecord, storage: &Arc<dyn Storage>) -> Result<(), RunError> {
        let body = manifest::folder_manifest(job).to_string();
        for (name, data, content_type) in
            [("manifest.json", body.into_bytes(), "application/json"), ("_SUCCESS", Vec::new(), "text/plain")]
        {
            let meta = ObjectMeta { content_type: content_type.into(), content_encoding: None };
            let mut w = storage.create(&format!("{}/{name}", job.folder), meta).await?;
            if !data.is_empty() {
                w.write(Bytes::from(data)).await?;
            }
            w.finish().await?;
        }
        Ok(())
    }

    /// Lenient mode: the ignored parameters as an OperationOutcome ndjson file.
    async fn write_error_file(&self, job: &JobRecord, storage: &Arc<dyn Storage>) -> Result<Vec<OutputFile>, RunError> {
        if job.plan.ignored.is_empty() {
            return Ok(Vec::new());
        }
        let mut data = Vec::new();
        for issue in &job.plan.ignored {
            let line = OperationOutcome::single(issue.clone()).to_json().to_string();
            data.extend_from_slice(line.as_bytes());
            data.push(b'\n');
        }
        let key = format!("{}/OperationOutcome.ndjson", job.folder);
        let sha256 = Some(hex::encode(Sha256::digest(&data)));
        let mut w = storage.create(&key, ObjectMeta::ndjson(false)).await?;
        w.write(Bytes::from(data)).await?;
        let bytes = w.finish().await?;
        Ok(vec![OutputFile {
            resource_type: "OperationOutcome".into(),
            key,
            count: job.plan.ignored.len() as u64,
            bytes,
            sha256,
        }])
    }
}

/// What an export reads ([`Engine::filters`]).
struct Filters {
    /// Compartment types at patient and group level; `None` at system level.
    compartment: Option<ScanFilter>,
    /// Every type at system level; types outside the compartment (asked for in `_type`)
    /// at patient and group level.
    plain: ScanFilter,
    /// Group level with `_since` (D7): the compartments of the members who joined after
    /// `_since`, last updated at or before it (the compartment filter reads their changes
    /// after it). `None` when nobody joined.
    late: Option<ScanFilter>,
    /// The deletions to list for compartment types (`deleted` set): those of the
    /// compartment filter's patients, without the late joiners (D7). `None` at system level.
    deletions: Option<ScanFilter>,
}

fn parse_group(id: &str, json: &str) -> Result<serde_json::Value, RunError> {
    serde_json::from_str(json).map_err(|e| {
        RunError::Failed(Issue::fatal(IssueCode::Exception, format!("Group/{id} is not readable JSON: {e}")))
    })
}

/// `filter` for reading `resource_type`, narrowed to the `_lastUpdated` window and `_id`
/// list its `_typeFilter` queries bound (a superset of what they match: the queries are
/// still evaluated on every resource read). Not for deletions.
fn narrow(plan: &ExportPlan, resource_type: &str, filter: &ScanFilter) -> ScanFilter {
    match plan.type_filter(resource_type).map(sluice_search::store_bounds) {
        Some(b) if !b.is_unbounded() => filter.narrowed(b.after, b.until, b.ids.map(|ids| ids.into_iter().collect())),
        _ => filter.clone(),
    }
}

/// How many id ranges to read a type of `count` resources (of `total` in the export) in:
/// 1 (not split) unless the type has at least [`EngineConfig::range_split_min`] resources;
/// then enough ranges that each is at most half a fair share (`total / parallelism / 2`),
/// at most `parallelism`.
fn range_parts(config: &EngineConfig, count: u64, total: u64) -> usize {
    let p = config.parallelism.max(1) as u64;
    let min = config.range_split_min;
    if p < 2 || min == 0 || count < min {
        return 1;
    }
    count.saturating_mul(2 * p).div_ceil(total.max(1)).clamp(1, p) as usize
}

/// Sort key that orders `Type.ndjson`, `Type-2.ndjson`, ..., `Type-10.ndjson` naturally.
fn natural_key(key: &str) -> (usize, &str) {
    (key.len(), key)
}

/// The patient ids of a Group's members that count at `at` (D6): `inactive` members and
/// members whose `period` does not contain `at` are skipped; only Patient references count.
pub fn group_members(group: &serde_json::Value, at: OffsetDateTime) -> Vec<String> {
    let mut out = Vec::new();
    let Some(members) = group.get("member").and_then(|m| m.as_array()) else { return out };
    let mut seen = HashSet::new();
    for m in members {
        if m.get("inactive").and_then(|v| v.as_bool()) == Some(true) {
            continue;
        }
        if let Some(period) = m.get("period") {
            let bound =
                |k: &str| period.get(k).and_then(|v| v.as_str()).and_then(|s| sluice_fhir::instant::parse(s).ok());
            if bound("start").is_some_and(|s| s > at) || bound("end").is_some_and(|e| e < at) {
                continue;
            }
        }
        let reference = m.pointer("/entity/reference").and_then(|v| v.as_str());
        if let Some(id) = reference.and_then(sluice_fhir::compartment::patient_reference_id)
            && seen.insert(id)
        {
            out.push(id.to_string());
        }
    }
    out
}

/// The members of `members` (a Group's members now) who were not members of the Group
/// version current at `since` (D7): not in `then` (`None`: the Group did not exist, or was
/// deleted, at `since`), or not counting at `since` by the D6 rules (inactive, or a
/// `period` that did not contain `since`). In the order of `members`.
pub fn late_joiners(members: &[String], then: Option<&serde_json::Value>, since: OffsetDateTime) -> Vec<String> {
    let before = then.map(|g| group_members(g, since)).unwrap_or_default();
    let before: HashSet<&String> = before.iter().collect();
    members.iter().filter(|m| !before.contains(m)).cloned().collect()
}

/// The ndjson writer plus a running SHA-256 of each file's bytes. Lives on blocking threads
/// between batches: neither compression nor hashing runs on the async reactor.
struct Encoder {
    writer: NdjsonWriter,
    digest: Option<(u32, Sha256)>,
}

/// What encoding produced: bytes for a file, or a finished file with its SHA-256.
enum Encoded {
    Data { file: u32, bytes: Vec<u8> },
    Finished { summary: sluice_ndjson::FileSummary, sha256: String },
}

impl Encoder {
    fn digest(&mut self, events: Vec<Event>) -> Vec<Encoded> {
        events
            .into_iter()
            .map(|ev| match ev {
                Event::Data { file, bytes } => {
                    if self.digest.as_ref().is_none_or(|(f, _)| *f != file) {
                        self.digest = Some((file, Sha256::new()));
                    }
                    self.digest.as_mut().expect("set above").1.update(&bytes);
                    Encoded::Data { file, bytes }
                }
                Event::Finished(summary) => {
                    let hasher = match self.digest.take() {
                        Some((f, h)) if f == summary.file => h,
                        other => {
                            self.digest = other;
                            Sha256::new()
                        }
                    };
                    Encoded::Finished { summary, sha256: hex::encode(hasher.finalize()) }
                }
            })
            .collect()
    }

    /// Encodes `lines`. In a patient block (`joined`), they stay in the file of the line
    /// before them; `header` (a block's first line, which may start a new file) goes first.
    fn encode<'a>(
        &mut self,
        header: Option<&[u8]>,
        lines: impl IntoIterator<Item = &'a [u8]>,
        joined: bool,
    ) -> Result<Vec<Encoded>, sluice_ndjson::NdjsonError> {
        let mut events = Vec::new();
        if let Some(h) = header {
            self.writer.write_header(h, &mut events)?;
        }
        for line in lines {
            if joined {
                self.writer.write_line_joined(line, &mut events)?;
            } else {
                self.writer.write_line(line, &mut events)?;
            }
        }
        Ok(self.digest(events))
    }

    fn finish(mut self) -> Result<Vec<Encoded>, sluice_ndjson::NdjsonError> {
        let mut events = Vec::new();
        let writer = std::mem::replace(&mut self.writer, NdjsonWriter::new(Compression::None, SplitLimits::default()));
        writer.finish(&mut events)?;
        Ok(self.digest(events))
    }
}

/// Files the parts have finished and the runner has not taken into the job yet:
/// (whether it lists deletions, the file).
type Finished = Arc<std::sync::Mutex<Vec<(bool, OutputFile)>>>;

/// An object being written: the encoder's file index, the file's number in its type (its
/// name, [`Part::key`]) and the writer.
type OpenObject = (u32, u32, Box<dyn ObjectWriter>);

/// What a running part holds: the encoder (on a blocking thread while a batch is encoded),
/// the object being written, and its store readers (aborted when the part fails).
struct PartState {
    writer: Option<Encoder>,
    open: Option<OpenObject>,
    scans: Vec<tokio::task::AbortHandle>,
}

fn reader_crashed(e: tokio::task::JoinError) -> RunError {
    RunError::Failed(Issue::fatal(IssueCode::Exception, format!("store reader crashed: {e}")))
}

/// What a part does to the lines of one type before encoding them ([`Part::treatment`]).
#[derive(Clone, Default)]
struct Treatment {
    subset: Option<elements::Subsetter>,
    queries: Option<Arc<Vec<sluice_planner::TypeQuery>>>,
    targets: Option<Arc<Vec<String>>>,
}

impl Treatment {
    /// The batch's lines as the plan keeps them: `None` when they are all kept unchanged (no
    /// copy), else the kept lines, subsetted. Also whether nothing is left.
    fn apply(&self, batch: &Batch) -> (Option<Vec<Vec<u8>>>, bool) {
        if self.subset.is_none() && self.queries.is_none() && self.targets.is_none() {
            return (None, batch.count == 0);
        }
        let keep = |line: &&[u8]| {
            if self.queries.is_none() && self.targets.is_none() {
                return true;
            }
            sluice_json::Json::parse_bytes(line).is_ok_and(|v| {
                self.queries.as_ref().is_none_or(|q| sluice_search::matches_any(q, &v))
                    && self.targets.as_ref().is_none_or(|t| sluice_planner::targets_any_of(&v, t))
            })
        };
        let lines: Vec<Vec<u8>> = batch
            .lines()
            .filter(keep)
            .map(|l| self.subset.as_ref().map_or_else(|| l.to_vec(), |s| s.apply(l)))
            .collect();
        let empty = lines.is_empty();
        (Some(lines), empty)
    }
}

/// The header line of a patient's block (Bulk Data IG v3, `organizeOutputBy`).
fn block_header(id: &str) -> Vec<u8> {
    serde_json::json!({
        "resourceType": "Parameters",
        "parameter": [{"name": "header", "valueReference": {"reference": format!("Patient/{id}")}}],
    })
    .to_string()
    .into_bytes()
}

/// One resource type of one export, or one id range of a large type.
struct Part {
    engine: Engine,
    storage: Arc<dyn Storage>,
    job_folder: String,
    plan: ExportPlan,
    snapshot: Snapshot,
    resource_type: String,
    /// The part's entry in the job's progress.
    progress_key: String,
    /// Whether this part lists deletions (IG `deleted` Bundles) instead of resources.
    deleted: bool,
    /// What it reads, in order: (resource type, filter). One entry, except for deletions
    /// (one per type) and for compartment types of a group export with late joiners (D7:
    /// their resources from before `_since`, then every member's changes since). The
    /// parts of a large type each read one id range of the same sources.
    sources: Sources,
    /// `organizeOutputBy=Patient`: the patient blocks it writes instead of `sources`.
    blocks: Option<Arc<Blocks>>,
    /// The next file number of the type, shared by its parts: each file a part starts takes
    /// one, so names are unique and dense (D15: `<Type>`, `<Type>-2`, ...) whichever part
    /// writes which file.
    file_numbers: Arc<AtomicU32>,
    done: Arc<BTreeMap<String, AtomicU64>>,
    /// Where each finished file goes, as soon as it is stored.
    finished: Finished,
    token: CancellationToken,
}

impl Part {
    /// The object name of the type's file number `file` (from 0).
    fn key(&self, file: u32) -> String {
        let ext = self.plan.output_format.extension();
        match file {
            0 => format!("{}/{}.{ext}", self.job_folder, self.resource_type),
            n => format!("{}/{}-{}.{ext}", self.job_folder, self.resource_type, n + 1),
        }
    }

    async fn run(self) -> Result<(), RunError> {
        let cfg = &self.engine.config;
        let compression = if self.plan.output_format.is_gzip() {
            Compression::Gzip { level: cfg.gzip_level }
        } else {
            Compression::None
        };
        let mut st = PartState {
            writer: Some(Encoder { writer: NdjsonWriter::new(compression, cfg.split), digest: None }),
            open: None,
            scans: Vec::new(),
        };
        let result: Result<(), RunError> = async {
            match &self.blocks {
                Some(blocks) => self.write_blocks(&mut st, blocks).await?,
                None => {
                    self.scan_into(&mut st, self.sources.clone(), None).await?;
                }
            }
            let w = st.writer.take().expect("writer present at end");
            let events = tokio::task::spawn_blocking(move || w.finish())
                .await
                .map_err(|e| RunError::Failed(Issue::fatal(IssueCode::Exception, format!("encoder crashed: {e}"))))?
                .map_err(|e| RunError::Failed(Issue::fatal(IssueCode::Exception, format!("encoding failed: {e}"))))?;
            self.handle(events, &mut st.open).await
        }
        .await;

        if let Err(e) = result {
            // Stop reading before the snapshot is released, then drop what was written.
            st.scans.iter().for_each(tokio::task::AbortHandle::abort);
            if let Some((_, _, w)) = st.open.take() {
                w.abort().await;
            }
            return Err(e);
        }
        Ok(())
    }

    /// `organizeOutputBy=Patient`: each patient's block, in order. A block starts with its
    /// header only once it has a resource (with `_since`, a patient without changes has no
    /// block), and no block is split across files.
    async fn write_blocks(&self, st: &mut PartState, blocks: &Blocks) -> Result<(), RunError> {
        let write = async |st: &mut PartState, id: &str| -> Result<(), RunError> {
            let window = if blocks.late.contains(id) { &blocks.late_window } else { &blocks.window };
            let filter = ScanFilter { patients: Some(Patients::Only(vec![id.to_string()])), ..window.clone() };
            let sources = blocks.types.iter().map(|rt| (rt.clone(), narrow(&self.plan, rt, &filter))).collect();
            self.scan_into(st, sources, Some(&mut Some(block_header(id)))).await
        };
        match &blocks.patients {
            BlockPatients::Listed(ids) => {
                for id in ids {
                    write(st, id).await?;
                }
            }
            BlockPatients::Range(range) => {
                // The patients in the range with something to export (with `_since`, only
                // those with changes), a batch of ids at a time: the reader waits (bounded
                // channel) while the batch's blocks are written.
                let (tx, mut rx) = mpsc::channel(1);
                let scan = {
                    let store = self.engine.store.clone();
                    let filter = ScanFilter { id_range: Some(range.clone()), ..blocks.window.clone() };
                    let (snap, types) = (self.snapshot.clone(), blocks.types.clone());
                    tokio::spawn(async move { store.compartment_patients(&snap, &types, &filter, tx).await })
                };
                st.scans.push(scan.abort_handle());
                loop {
                    let ids = tokio::select! {
                        ids = rx.recv() => ids,
                        _ = self.token.cancelled() => return Err(RunError::Cancelled),
                    };
                    let Some(ids) = ids else { break };
                    for id in &ids {
                        write(st, id).await?;
                    }
                }
                scan.await.map_err(reader_crashed)??;
            }
        }
        Ok(())
    }

    /// What the plan does to the resources of `rt` once read: `_elements` subsetting,
    /// `_typeFilter` queries (evaluated on each resource's JSON), and at system level with
    /// `_type` and `includeAssociatedData` the Provenance target check. Nothing for
    /// deletions: a tombstone has no content to match, and listing a deletion the client may
    /// not hold is harmless.
    fn treatment(&self, rt: &str) -> Treatment {
        if self.deleted {
            return Treatment::default();
        }
        Treatment {
            subset: elements::Subsetter::for_type(self.plan.elements.as_deref(), rt),
            queries: self.plan.type_filter(rt).map(|q| Arc::new(q.to_vec())),
            targets: match self.plan.provenance_targets() {
                Some(types) if rt == "Provenance" => Some(Arc::new(types.to_vec())),
                _ => None,
            },
        }
    }

    /// Reads `sources` (each a type through a filter, one after the other) and encodes what
    /// the plan keeps of them into the part's files. In a patient block (`header` given), the
    /// lines stay together, after the block's header, which is written before the block's
    /// first line (and then taken).
    async fn scan_into(
        &self,
        st: &mut PartState,
        sources: Sources,
        mut header: Option<&mut Option<Vec<u8>>>,
    ) -> Result<(), RunError> {
        let cfg = &self.engine.config;
        let joined = header.is_some();
        let treatments: Vec<Treatment> = sources.iter().map(|(rt, _)| self.treatment(rt)).collect();
        let counters: Vec<&AtomicU64> = sources
            .iter()
            .map(|(rt, _)| if joined { &self.done[rt] } else { &self.done[&self.progress_key] })
            .collect();
        let types: Vec<String> = sources.iter().map(|(rt, _)| rt.clone()).collect();
        let (tx, mut rx) = mpsc::channel(2);
        let scan = {
            let store = self.engine.store.clone();
            let (snap, bytes) = (self.snapshot.clone(), cfg.batch_bytes);
            tokio::spawn(async move { store.scan_many(&snap, &sources, bytes, tx).await })
        };
        st.scans.push(scan.abort_handle());
        loop {
            let next = tokio::select! {
                b = rx.recv() => b,
                _ = self.token.cancelled() => return Err(RunError::Cancelled),
            };
            let Some((source, batch)) = next else { break };
            let n = batch.count;
            let mut w = st.writer.take().expect("writer present between batches");
            let treatment = treatments[source].clone();
            let pending = header.as_mut().and_then(|h| h.take());
            let (w, events, pending) = tokio::task::spawn_blocking(move || {
                let (lines, empty) = treatment.apply(&batch);
                // A block's header goes before its first line, not before nothing.
                let (first, pending) = if empty { (None, pending) } else { (pending, None) };
                let res = match &lines {
                    Some(lines) => w.encode(first.as_deref(), lines.iter().map(Vec::as_slice), joined),
                    None => w.encode(first.as_deref(), batch.lines(), joined),
                };
                (w, res, pending)
            })
            .await
            .map_err(|e| RunError::Failed(Issue::fatal(IssueCode::Exception, format!("encoder crashed: {e}"))))?;
            st.writer = Some(w);
            if let (Some(h), Some(p)) = (header.as_mut(), pending) {
                **h = Some(p);
            }
            let events = events.map_err(|e| {
                RunError::Failed(Issue::fatal(IssueCode::Exception, format!("encoding {} failed: {e}", types[source])))
            })?;
            self.handle(events, &mut st.open).await?;
            counters[source].fetch_add(n, Ordering::Relaxed);
            if let Some(pause) = cfg.throttle {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.token.cancelled() => return Err(RunError::Cancelled),
                }
            }
        }
        scan.await.map_err(reader_crashed)??;
        Ok(())
    }

    async fn handle(&self, events: Vec<Encoded>, open: &mut Option<OpenObject>) -> Result<(), RunError> {
        for ev in events {
            match ev {
                Encoded::Data { file, bytes } => {
                    if open.as_ref().is_none_or(|(f, _, _)| *f != file) {
                        // The encoder never starts an empty file: every number taken is
                        // a file in the manifest.
                        let number = self.file_numbers.fetch_add(1, Ordering::Relaxed);
                        let meta = ObjectMeta::ndjson(self.plan.output_format.is_gzip());
                        let w = self.storage.create(&self.key(number), meta).await?;
                        *open = Some((file, number, w));
                    }
                    let (_, _, w) = open.as_mut().expect("opened above");
                    w.write(Bytes::from(bytes)).await?;
                }
                Encoded::Finished { summary, sha256 } => {
                    let (f, number, w) = open.take().ok_or_else(|| {
                        RunError::Failed(Issue::fatal(
                            IssueCode::Exception,
                            "encoder finished a file that was never opened",
                        ))
                    })?;
                    debug_assert_eq!(f, summary.file);
                    let bytes = w.finish().await?;
                    if bytes != summary.bytes {
                        return Err(RunError::Failed(Issue::fatal(
                            IssueCode::Exception,
                            format!("{}: stored {bytes} bytes, encoded {}", self.key(number), summary.bytes),
                        )));
                    }
                    let file = OutputFile {
                        resource_type: self.resource_type.clone(),
                        key: self.key(number),
                        count: summary.resources,
                        bytes,
                        sha256: Some(sha256),
                    };
                    self.finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((self.deleted, file));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn group_members_respect_inactive_and_period() {
        let at = sluice_fhir::instant::parse("2024-06-01T00:00:00Z").unwrap();
        let g = json!({"resourceType":"Group","member":[
            {"entity":{"reference":"Patient/a"}},
            {"entity":{"reference":"Patient/b"},"inactive":true},
            {"entity":{"reference":"Patient/c"},"period":{"start":"2025-01-01"}},
            {"entity":{"reference":"Patient/d"},"period":{"end":"2024-01-01"}},
            {"entity":{"reference":"Patient/e"},"period":{"start":"2024-01-01","end":"2024-12-31"}},
            {"entity":{"reference":"Practitioner/f"}},
            {"entity":{"reference":"Patient/a"}}
        ]});
        assert_eq!(group_members(&g, at), vec!["a".to_string(), "e".to_string()]);
        assert!(group_members(&json!({"resourceType":"Group"}), at).is_empty());
    }

    #[test]
    fn late_joiners_are_members_now_who_did_not_count_at_since() {
        let since = sluice_fhir::instant::parse("2024-06-01T00:00:00Z").unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let now = ids(&["a", "b", "c", "d", "e", "f"]);
        let then = json!({"resourceType":"Group","member":[
            {"entity":{"reference":"Patient/a"}},
            {"entity":{"reference":"Patient/b"},"inactive":true},
            {"entity":{"reference":"Patient/c"},"period":{"start":"2024-07-01"}},
            {"entity":{"reference":"Patient/d"},"period":{"start":"2024-01-01","end":"2024-05-01"}},
            {"entity":{"reference":"Patient/e"},"period":{"start":"2024-01-01"}},
            {"entity":{"reference":"Patient/gone"}}
        ]});
        // b was inactive, c had not started yet, d had ended, f was not listed.
        assert_eq!(late_joiners(&now, Some(&then), since), ids(&["b", "c", "d", "f"]));
        // No Group at `_since`: everyone joined after it.
        assert_eq!(late_joiners(&now, None, since), now);
        assert!(late_joiners(&ids(&["a", "e"]), Some(&then), since).is_empty());
    }

    #[test]
    fn large_types_are_split_into_ranges_of_at_most_half_a_fair_share() {
        let cfg = |parallelism, range_split_min| EngineConfig { parallelism, range_split_min, ..Default::default() };
        let two = cfg(2, 50_000);
        // Observation as 42% of 1M resources on 2 cores: two ranges of 21%.
        assert_eq!(range_parts(&two, 420_000, 1_000_000), 2);
        // At most half a fair share (25% on 2 cores) is left whole, like anything small.
        assert_eq!(range_parts(&two, 250_000, 1_000_000), 1);
        assert_eq!(range_parts(&two, 250_001, 1_000_000), 2);
        assert_eq!(range_parts(&two, 49_999, 50_000), 1, "below range_split_min");
        assert_eq!(range_parts(&two, 1_000_000, 1_000_000), 2, "never more than parallelism");
        let eight = cfg(8, 50_000);
        assert_eq!(range_parts(&eight, 420_000, 1_000_000), 7);
        assert_eq!(range_parts(&eight, 100_000, 1_000_000), 2);
        assert_eq!(range_parts(&eight, 600_000, 1_000_000), 8);
        assert_eq!(range_parts(&cfg(1, 50_000), 1_000_000, 1_000_000), 1, "one core: nothing to share");
        assert_eq!(range_parts(&cfg(2, 0), 1_000_000, 1_000_000), 1, "0 turns splitting off");
    }

    #[test]
    fn natural_order_of_split_files() {
        let mut keys = vec!["f/Obs-10.ndjson", "f/Obs-2.ndjson", "f/Obs.ndjson"];
        keys.sort_by_key(|k| natural_key(k));
        assert_eq!(keys, vec!["f/Obs.ndjson", "f/Obs-2.ndjson", "f/Obs-10.ndjson"]);
    }
}
