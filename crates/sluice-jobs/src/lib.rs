//! Export jobs: the state machine, the persisted job record, and the repository trait
//! that enforces one active export at a time.
//!
//! ```text
//! Accepted -> InProgress -> Completed
//!     |           |-------> Failed
//!     |-----------+-------> Cancelled
//! ```
//! A job is *active* while `Accepted` or `InProgress`. At most one job is active at a time;
//! the repository enforces it in the database (a unique `active` column), not in process
//! memory, so it holds across restarts and across servers sharing a database. Every
//! transition is a compare-and-set on the status, so a cancellation racing a completion
//! has exactly one winner.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_fhir::OperationOutcome;
use sluice_planner::ExportPlan;
use sluice_storage::StorageTarget;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// Kicked off, not yet started.
    Accepted,
    /// Running.
    InProgress,
    /// Finished; the manifest is available.
    Completed,
    /// Stopped by an error; `outcome` says why.
    Failed,
    /// Cancelled by the client (or deleted after completion).
    Cancelled,
}

impl JobStatus {
    /// The status name as stored (`in-progress`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Accepted => "accepted",
            JobStatus::InProgress => "in-progress",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored status name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Accepted, Self::InProgress, Self::Completed, Self::Failed, Self::Cancelled]
            .into_iter()
            .find(|st| st.as_str() == s)
    }

    /// Whether the job holds the one-active-export slot.
    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::Accepted | JobStatus::InProgress)
    }

    /// Whether the state machine allows `self -> to`. Every change of a job's status goes
    /// through it: [`JobRecord::transition`] in memory, [`check_transition`] in every
    /// [`JobRepo::save_if`].
    pub fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Accepted, InProgress)
                | (Accepted, Failed)
                | (Accepted, Cancelled)
                | (InProgress, InProgress)
                | (InProgress, Completed)
                | (InProgress, Failed)
                | (InProgress, Cancelled)
                | (Completed, Cancelled)
                | (Failed, Cancelled)
        )
    }
}

/// One file of an export, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// The resource type in the file (`OperationOutcome` for error files).
    pub resource_type: String,
    /// The object key in storage (`<folder>/<Type>.ndjson`).
    pub key: String,
    /// Resources (lines) in the file.
    pub count: u64,
    /// Size in bytes as stored.
    pub bytes: u64,
    /// SHA-256 of the bytes as stored, in hex.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// Per-type progress: resources written and resources to write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeProgress {
    /// Resources written so far.
    pub done: u64,
    /// Resources the export will write.
    pub total: u64,
}

/// A job and everything needed to report on it, persisted as one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job id (a UUID), also the last segment of the status URL.
    pub id: String,
    /// Current status.
    pub status: JobStatus,
    /// The validated request.
    pub plan: ExportPlan,
    /// The kick-off URL as the client sent it (the manifest's `request`).
    pub request_url: String,
    /// The export folder (`<datetime>_<uuid>`), the prefix of every object key.
    pub folder: String,
    /// When the kick-off was accepted.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The store snapshot the export reads (opaque, store-specific), once taken.
    pub snapshot: Option<String>,
    /// The snapshot's time: the manifest's `transactionTime`.
    #[serde(with = "time::serde::rfc3339::option")]
    pub transaction_time: Option<OffsetDateTime>,
    /// When the job reached a final status.
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// Data files, in manifest order.
    pub output: Vec<OutputFile>,
    /// Error files (OperationOutcome ndjson), in manifest order.
    pub error: Vec<OutputFile>,
    /// With `_since`: files listing the resources deleted since (Bundle ndjson).
    #[serde(default)]
    pub deleted: Vec<OutputFile>,
    /// Why the job failed or was cancelled.
    pub outcome: Option<OperationOutcome>,
    /// Per-type progress.
    pub progress: BTreeMap<String, TypeProgress>,
    /// How many times the job was (re)started, counting restarts after a crash.
    pub attempts: u32,
    /// Where the files go: the storage target chosen at kick-off (provider, bucket, names
    /// of configuration resources; never secrets). Default (left out of the JSON, or
    /// `null`): the server's default storage.
    #[serde(default, skip_serializing_if = "StorageTarget::is_default")]
    pub storage: StorageTarget,
    /// The client that started the export (D22): only it (or an administrator) sees its
    /// status, cancels it and downloads its files. `None`: started without authorization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// `allowPartialManifests`: the manifest pages closed so far, in order. Page `n`, counted
    /// from one, lists `output[pages[n-2].output..pages[n-1].output]` and the same slice of
    /// `deleted`. A closed page never changes; `output` and `deleted` then keep the order in
    /// which files finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageEnd>,
}

/// Where a manifest page ends: how many `output` and `deleted` files the pages up to and
/// including it hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageEnd {
    /// End (exclusive) of the page's slice of [`JobRecord::output`].
    pub output: usize,
    /// End (exclusive) of the page's slice of [`JobRecord::deleted`].
    pub deleted: usize,
}

/// Checks that a record saved over one in any of the `expected` statuses may have status
/// `to`: every store calls it first in [`JobRepo::save_if`], so no store ever persists a
/// transition the state machine forbids (D31).
pub fn check_transition(expected: &[JobStatus], to: JobStatus) -> Result<(), JobError> {
    match expected.iter().find(|from| !from.can_become(to)) {
        Some(&from) => Err(JobError::IllegalTransition { from, to }),
        None => Ok(()),
    }
}

impl JobRecord {
    /// Moves the job to status `to`, if the state machine allows it
    /// ([`JobStatus::can_become`]); otherwise leaves it as it is and says why.
    pub fn transition(&mut self, to: JobStatus) -> Result<(), JobError> {
        check_transition(&[self.status], to)?;
        self.status = to;
        Ok(())
    }

    /// A new `Accepted` job for `plan`.
    pub fn new(id: String, plan: ExportPlan, request_url: String, now: OffsetDateTime) -> Self {
        let folder = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z_{}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            id
        );
        JobRecord {
            id,
            status: JobStatus::Accepted,
            plan,
            request_url,
            folder,
            created_at: now,
            snapshot: None,
            transaction_time: None,
            finished_at: None,
            output: Vec::new(),
            error: Vec::new(),
            deleted: Vec::new(),
            outcome: None,
            progress: BTreeMap::new(),
            attempts: 0,
            storage: StorageTarget::Default,
            owner: None,
            pages: Vec::new(),
        }
    }

    /// The files of manifest page `page` (from 1), `(output, deleted)`, once it is closed.
    pub fn page(&self, page: usize) -> Option<(&[OutputFile], &[OutputFile])> {
        let end = *self.pages.get(page.checked_sub(1)?)?;
        let start = page.checked_sub(2).and_then(|i| self.pages.get(i)).copied().unwrap_or_default();
        Some((self.output.get(start.output..end.output)?, self.deleted.get(start.deleted..end.deleted)?))
    }

    /// Closes a manifest page with the files finished since the last one, when there are
    /// any (or, with `last`, when no page exists yet: a completed export has at least one).
    /// Returns whether a page was closed.
    pub fn close_page(&mut self, last: bool) -> bool {
        let prev = self.pages.last().copied().unwrap_or_default();
        let end = PageEnd { output: self.output.len(), deleted: self.deleted.len() };
        if end == prev && !(last && self.pages.is_empty()) {
            return false;
        }
        self.pages.push(end);
        true
    }

    /// Total (done, total) over all types.
    pub fn totals(&self) -> (u64, u64) {
        self.progress.values().fold((0, 0), |(d, t), p| (d + p.done, t + p.total))
    }

    /// Progress in whole percent (0 until totals are known; 100 only when completed).
    pub fn percent(&self) -> u8 {
        if self.status == JobStatus::Completed {
            return 100;
        }
        let (d, t) = self.totals();
        (d.min(t) * 100).checked_div(t).unwrap_or(0).min(99) as u8
    }
}

/// Why a repository call failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Another export is active; its id is given.
    #[error("export {0} is already running; only one export runs at a time")]
    Busy(String),
    /// The database failed.
    #[error("job store error: {0}")]
    Store(String),
    /// A status change the state machine forbids (a bug in the caller).
    #[error("illegal export status change from {} to {}", from.as_str(), to.as_str())]
    IllegalTransition {
        /// The status the job had (or was expected to have).
        from: JobStatus,
        /// The status asked for.
        to: JobStatus,
    },
}

/// Told when an export finishes on this server (completed or failed; a cancellation is
/// seen by whoever cancels). Awaited by the export's task right after the record is saved.
#[async_trait]
pub trait JobObserver: Send + Sync {
    /// `job` has just been recorded `Completed` or `Failed`.
    async fn finished(&self, job: &JobRecord);
}

/// Persistence of job records; implemented by each resource store, in its own database.
#[async_trait]
pub trait JobRepo: Send + Sync {
    /// Inserts an `Accepted` job, or fails with [`JobError::Busy`] when one is active.
    async fn insert(&self, job: &JobRecord) -> Result<(), JobError>;
    /// The job with this id.
    async fn get(&self, id: &str) -> Result<Option<JobRecord>, JobError>;
    /// Replaces the record if its stored status is one of `expected` (compare-and-set).
    /// Returns false (and writes nothing) otherwise. The active slot follows the new status.
    /// Fails with [`JobError::IllegalTransition`] (writing nothing) when some expected status
    /// cannot become the record's ([`check_transition`]).
    async fn save_if(&self, job: &JobRecord, expected: &[JobStatus]) -> Result<bool, JobError>;
    /// Jobs still `Accepted` or `InProgress`.
    async fn unfinished(&self) -> Result<Vec<JobRecord>, JobError>;
    /// The `limit` jobs kicked off last, newest first, whatever their status (the status
    /// page's list).
    async fn recent(&self, limit: usize) -> Result<Vec<JobRecord>, JobError>;
    /// Up to `limit` completed or failed jobs last saved more than `age` ago (export
    /// retention: their files are due for deletion), oldest first.
    async fn expired(&self, age: std::time::Duration, limit: usize) -> Result<Vec<JobRecord>, JobError>;
    /// Renews the lease of an active job (its runner is alive). False when the job is no
    /// longer active (cancelled or finished, possibly by another server).
    async fn touch(&self, id: &str) -> Result<bool, JobError>;
    /// Gives up the lease of active job `id` (its server is shutting down and has stopped
    /// running it): the next [`JobRepo::claim_stale`] of any server takes it, without
    /// waiting for the lease to run out. False when the job is not active.
    async fn release_lease(&self, id: &str) -> Result<bool, JobError>;
    /// Claims the active jobs whose lease is older than `lease` (their runner died): renews
    /// their lease and returns them. Each stale job is claimed by exactly one caller.
    async fn claim_stale(&self, lease: std::time::Duration) -> Result<Vec<JobRecord>, JobError>;
    /// The id of the active job, if any (at most one job is active).
    async fn active(&self) -> Result<Option<String>, JobError> {
        Ok(self.unfinished().await?.into_iter().next().map(|job| job.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    #[test]
    fn transitions() {
        let all = [Accepted, InProgress, Completed, Failed, Cancelled];
        let allowed: Vec<_> =
            all.iter().flat_map(|a| all.iter().map(move |b| (*a, *b))).filter(|(a, b)| a.can_become(*b)).collect();
        assert_eq!(
            allowed,
            vec![
                (Accepted, InProgress),
                (Accepted, Failed),
                (Accepted, Cancelled),
                (InProgress, InProgress),
                (InProgress, Completed),
                (InProgress, Failed),
                (InProgress, Cancelled),
                (Completed, Cancelled),
                (Failed, Cancelled),
            ]
        );
        for s in all {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(s.is_active(), matches!(s, Accepted | InProgress));
        }
        assert_eq!(JobStatus::parse("running"), None);
    }

    #[test]
    fn records_change_status_only_as_the_machine_allows() {
        let mut job = JobRecord::new(
            "j".into(),
            ExportPlan::new(sluice_planner::Level::System),
            "u".into(),
            OffsetDateTime::UNIX_EPOCH,
        );
        let illegal = job.transition(Completed).unwrap_err();
        assert!(matches!(illegal, JobError::IllegalTransition { from: Accepted, to: Completed }), "{illegal}");
        assert_eq!(illegal.to_string(), "illegal export status change from accepted to completed");
        assert_eq!(job.status, Accepted, "a refused transition changes nothing");
        job.transition(InProgress).unwrap();
        job.transition(Completed).unwrap();
        assert!(job.transition(InProgress).is_err(), "a completed export never runs again");
        job.transition(Cancelled).unwrap();
        for to in [Accepted, InProgress, Completed, Failed, Cancelled] {
            assert!(job.transition(to).is_err(), "cancelled is final ({to:?})");
        }
        assert!(check_transition(&[Accepted, InProgress], Failed).is_ok());
        assert!(check_transition(&[Accepted, Completed], InProgress).is_err(), "every expected status must allow it");
    }

    #[test]
    fn pages_slice_the_files_in_order_and_never_change() {
        let file = |n: u32| OutputFile {
            resource_type: "Patient".into(),
            key: format!("f/{n}"),
            count: 1,
            bytes: 1,
            sha256: None,
        };
        let mut job = JobRecord::new(
            "j".into(),
            ExportPlan::new(sluice_planner::Level::System),
            "u".into(),
            OffsetDateTime::UNIX_EPOCH,
        );
        assert!(!job.close_page(false), "nothing finished: no page");
        assert_eq!(job.page(1), None);
        job.output.extend([file(1), file(2)]);
        assert!(job.close_page(false));
        assert!(!job.close_page(false), "no new file: no new page");
        job.deleted.push(file(9));
        job.output.push(file(3));
        assert!(job.close_page(true));
        assert_eq!(job.page(0), None);
        assert_eq!(job.page(1).unwrap(), (&[file(1), file(2)][..], &[][..]));
        assert_eq!(job.page(2).unwrap(), (&[file(3)][..], &[file(9)][..]));
        assert_eq!(job.page(3), None);
        let mut empty = JobRecord::new(
            "e".into(),
            ExportPlan::new(sluice_planner::Level::System),
            "u".into(),
            OffsetDateTime::UNIX_EPOCH,
        );
        assert!(empty.close_page(true), "a completed export has a first page, even empty");
        assert_eq!(empty.page(1).unwrap(), (&[][..], &[][..]));
        assert!(!empty.close_page(true));
    }

    #[test]
    fn the_storage_target_is_saved_as_before() {
        let plan = ExportPlan::new(sluice_planner::Level::System);
        let mut job = JobRecord::new("j".into(), plan, "u".into(), OffsetDateTime::UNIX_EPOCH);
        let text = serde_json::to_string(&job).unwrap();
        assert!(!text.contains("\"storage\""), "the default storage is left out: {text}");
        for saved in [text.clone(), text.replacen('{', r#"{"storage":null,"#, 1)] {
            assert_eq!(serde_json::from_str::<JobRecord>(&saved).unwrap(), job);
        }
        let aws = r#"{"provider":"aws","bucket":"b","account":"a","endpoint":null}"#;
        job.storage = serde_json::from_str(aws).unwrap();
        let text = serde_json::to_string(&job).unwrap();
        assert!(text.contains(&format!(r#""storage":{aws}"#)), "{text}");
        assert_eq!(serde_json::from_str::<JobRecord>(&text).unwrap(), job);
    }
}
