//! The export engine: runs a validated [`ExportPlan`](sluice_planner::ExportPlan) against
//! an [`ExportStore`] and writes its files to a [`Storage`].
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
//!
//! The modules, in the order of a run:
//! - `lifecycle`: the public API of [`Engine`] (kick-off, cancel, recovery, wait) and a
//!   run from start to finish (lease heartbeat, attempts, snapshot, job status).
//! - `plan`: planning the parts of a run (filters, counts, id ranges, patient blocks).
//! - `runner`: running the parts in parallel and streaming their files into storage.
//! - `encode`: what a part keeps of each line (`_elements`, `_typeFilter`) and the encoder
//!   (ndjson, gzip, SHA-256) on blocking threads.
//! - `markers`: the error file, `manifest.json` and `_SUCCESS`.
//! - `elements` (`_elements` subsetting) and `manifest` (the manifest served to clients).
//! - [`meter`]: the engine's metrics (exports by outcome, resources and bytes, durations).
//!
//! The Group membership rules (D6, D7) are FHIR semantics and live in
//! [`sluice_fhir::group`]; [`group_members`] and [`late_joiners`] are re-exported here.

mod elements;
mod encode;
mod lifecycle;
mod manifest;
mod markers;
pub mod meter;
mod plan;
mod runner;

pub use manifest::{Manifest, manifest, manifest_page};
pub use sluice_fhir::group::{group_members, late_joiners};

use sluice_fhir::{Issue, IssueCode};
use sluice_jobs::{JobError, JobRecord, JobRepo};
use sluice_ndjson::SplitLimits;
use sluice_storage::{Storage, StorageError, StorageSource};
use sluice_store::ExportReads;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    /// Completed and failed exports are deleted with their files this long after they
    /// finished, by whichever server sharing the store notices first; their status URL
    /// then answers 404. `None`: kept until a client deletes them.
    pub retention: Option<Duration>,
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
            retention: None,
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
    /// This server is shutting down (503): another server sharing the store can take it.
    #[error("this server is shutting down")]
    ShuttingDown,
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

/// Why a run stopped before completing.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// The job was cancelled (or deleted), through this server or another.
    #[error("cancelled")]
    Cancelled,
    /// The run failed: the job is recorded `Failed` with this issue.
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
    /// Cancels the run.
    token: CancellationToken,
    /// Set before `token` is cancelled when the server hands the export over to a peer
    /// (shutting down): the run then stops without deleting what it wrote.
    handover: Arc<std::sync::atomic::AtomicBool>,
    /// Becomes `true` when the run has stopped (and deleted its files, if it did not complete).
    done: tokio::sync::watch::Receiver<bool>,
}

/// A job interrupted this many times (crashes, restarts) is failed instead of rerun.
pub const MAX_ATTEMPTS: u32 = 3;

/// What the engine needs of a store: reads from snapshots ([`ExportReads`]) and the job
/// records ([`JobRepo`]). Every type implementing both is one.
pub trait ExportStore: ExportReads + JobRepo {}

impl<T: ExportReads + JobRepo + ?Sized> ExportStore for T {}

/// Runs exports. Cheap to clone; one per server.
#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn ExportStore>,
    storages: Arc<dyn StorageSource>,
    config: EngineConfig,
    running: Arc<Mutex<HashMap<String, Running>>>,
    observer: Option<Arc<dyn sluice_jobs::JobObserver>>,
    /// Set by [`Engine::shut_down`]: no new kick-off, no takeover.
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl Engine {
    /// An engine over a store, writing where `storages` says.
    pub fn new(store: Arc<dyn ExportStore>, storages: Arc<dyn StorageSource>, config: EngineConfig) -> Self {
        Engine { store, storages, config, running: Default::default(), observer: None, draining: Default::default() }
    }

    /// Tells `observer` of every export this engine finishes (the audit trail).
    pub fn observe(mut self, observer: Arc<dyn sluice_jobs::JobObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ExportStore> {
        &self.store
    }

    /// Where new exports go, or why storage is not usable ([`StorageError::NotConfigured`]):
    /// a kick-off checks this before anything else.
    pub async fn storage_for_new_export(
        &self,
    ) -> Result<(Arc<dyn Storage>, sluice_storage::StorageTarget), StorageError> {
        self.storages.current().await
    }

    /// The storage `job` wrote its files to.
    pub async fn storage_of(&self, job: &JobRecord) -> Result<Arc<dyn Storage>, StorageError> {
        self.storages.open(&job.storage).await
    }
}
