//! The life of an export job: the public API of [`Engine`] (kick-off, cancel and delete,
//! taking over interrupted jobs, waiting), and a run from start to finish: the lease
//! heartbeat, the attempts and the snapshot, planning ([`crate::plan`]), running the parts
//! ([`crate::runner`]), the completion markers ([`crate::markers`]), and the job's status
//! at each step (`Accepted` → `InProgress` → `Completed`, `Failed` or `Cancelled`).

use crate::{CancelError, Engine, KickoffError, MAX_ATTEMPTS, RunError, Running, markers};
use sluice_fhir::{Issue, IssueCode, OperationOutcome};
use sluice_jobs::{JobError, JobRecord, JobStatus};
use sluice_planner::{ExportPlan, Level};
use sluice_storage::Storage;
use sluice_store::{ReadResult, Snapshot};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// How long DELETE waits for a local run to stop and delete its files.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

impl Engine {
    /// Checks the plan against the store, records an `Accepted` job writing to `storage` (a
    /// target from [`Engine::storage_for_new_export`]) and starts it.
    pub async fn kickoff(
        &self,
        plan: ExportPlan,
        request_url: String,
        storage: sluice_storage::StorageTarget,
    ) -> Result<JobRecord, KickoffError> {
        self.kickoff_as(plan, request_url, storage, None).await
    }

    /// Whether [`Engine::shut_down`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Hands this server's exports over before it stops (SIGTERM): refuses new kick-offs
    /// ([`KickoffError::ShuttingDown`]) and takeovers, stops each running export without
    /// deleting its files, and releases its lease ([`JobRepo::release_lease`]), so a server
    /// sharing the store takes it over at its next look (at most a second) instead of
    /// after the lease. Returns how many exports were handed over.
    pub async fn shut_down(&self) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        let running: Vec<(String, tokio::sync::watch::Receiver<bool>)> = {
            let map = self.running.lock().expect("running map");
            map.iter()
                .map(|(id, r)| {
                    r.handover.store(true, Ordering::SeqCst);
                    r.token.cancel();
                    (id.clone(), r.done.clone())
                })
                .collect()
        };
        let mut handed = 0;
        for (id, mut done) in running {
            let _ = tokio::time::timeout(CANCEL_WAIT, done.wait_for(|d| *d)).await;
            match self.store.release_lease(&id).await {
                Ok(true) => {
                    tracing::info!(export_id = %id, "export handed over: its lease is released for another server");
                    handed += 1;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(export_id = %id, error = %e, "releasing the export's lease failed; another server takes it over when the lease runs out")
                }
            }
        }
        handed
    }

    /// [`Engine::kickoff`] on behalf of `owner` (the client that asked, D22), recorded on
    /// the job so that only it sees the export.
    pub async fn kickoff_as(
        &self,
        plan: ExportPlan,
        request_url: String,
        storage: sluice_storage::StorageTarget,
        owner: Option<String>,
    ) -> Result<JobRecord, KickoffError> {
        if self.is_draining() {
            return Err(KickoffError::ShuttingDown);
        }
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
        job.owner = owner;
        match self.store.insert(&job).await {
            Ok(()) => {}
            Err(JobError::Busy(id)) => return Err(KickoffError::Busy(id)),
            Err(e) => return Err(internal(&e)),
        }
        crate::meter::count(crate::meter::STARTED, &job);
        self.spawn(job.clone());
        Ok(job)
    }

    /// Takes over every active job whose lease expired (its server died) and runs it
    /// again; returns how many. A job that had a snapshot is rerun on the same snapshot when
    /// the store can still read it, so its result is what it would have been.
    pub async fn resume_unfinished(&self) -> Result<usize, JobError> {
        if self.is_draining() {
            return Ok(0); // handing exports over, not taking them
        }
        let jobs = self.store.claim_stale(self.config.lease).await?;
        let mut n = 0;
        for job in jobs {
            if self.running.lock().expect("running map").contains_key(&job.id) {
                continue; // ours, and alive
            }
            tracing::info!(export_id = %job.id, status = job.status.as_str(), "taking over an interrupted export");
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
            // Every half lease, and at least every second: a lease released by a server
            // shutting down is taken over at once.
            let every = (engine.config.lease / 2).min(Duration::from_secs(1)).max(Duration::from_millis(100));
            let mut tick = tokio::time::interval(every);
            // Expired exports are looked for every quarter retention, at most every minute.
            let sweep_every =
                engine.config.retention.map(|r| (r / 4).clamp(Duration::from_millis(100), Duration::from_secs(60)));
            let mut swept = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                if let Err(e) = engine.resume_unfinished().await {
                    tracing::warn!(error = %e, "looking for interrupted exports failed");
                }
                if sweep_every.is_some_and(|every| swept.elapsed() >= every) {
                    swept = tokio::time::Instant::now();
                    if let Err(e) = engine.delete_expired().await {
                        tracing::warn!(error = %e, "looking for expired exports failed");
                    }
                }
            }
        })
    }

    /// Deletes the completed and failed exports that finished longer than
    /// [`EngineConfig::retention`](crate::EngineConfig::retention) ago, with their files
    /// (their status URL then answers 404); returns how many. Servers sharing the store may
    /// run it at the same time: each export is deleted once.
    pub async fn delete_expired(&self) -> Result<usize, JobError> {
        let Some(retention) = self.config.retention else { return Ok(0) };
        let now = OffsetDateTime::now_utc();
        let mut deleted = 0;
        for job in self.store.expired(retention, 100).await? {
            let ended = job.finished_at.unwrap_or(job.created_at);
            if Duration::try_from(now - ended).is_ok_and(|age| age < retention) {
                continue;
            }
            let why = "the export was deleted with its files when its retention period ended (--export-retention)";
            match self.remove(&job.id, why).await {
                Ok(()) => {
                    deleted += 1;
                    metrics::counter!(crate::meter::EXPIRED).increment(1);
                    tracing::info!(export_id = %job.id, "export expired: deleted with its files");
                }
                Err(CancelError::NotFound(_)) => {} // another server was first
                Err(CancelError::Internal(e)) => {
                    tracing::warn!(export_id = %job.id, error = %e, "deleting an expired export failed")
                }
            }
        }
        Ok(deleted)
    }

    /// Cancels an active export, or deletes a finished one with its files. The one-export
    /// slot is free when this returns.
    pub async fn cancel(&self, id: &str) -> Result<(), CancelError> {
        self.remove(id, "the export was cancelled by the client").await
    }

    /// [`Engine::cancel`], recording `why` as the job's outcome.
    async fn remove(&self, id: &str, why: &str) -> Result<(), CancelError> {
        let internal = |e: JobError| CancelError::Internal(e.to_string());
        loop {
            let Some(mut job) = self.store.get(id).await.map_err(internal)? else {
                return Err(CancelError::NotFound(id.to_string()));
            };
            if job.status == JobStatus::Cancelled {
                return Err(CancelError::NotFound(id.to_string()));
            }
            let was = job.status;
            job.transition(JobStatus::Cancelled).map_err(internal)?;
            job.finished_at = Some(OffsetDateTime::now_utc());
            job.outcome = Some(OperationOutcome::single(Issue::error(IssueCode::Incomplete, why)));
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
                    tracing::warn!(export_id = %id, error = %e, "deleting the files of a deleted export failed");
                }
            }
            if was.is_active() {
                crate::meter::count(crate::meter::CANCELLED, &job);
            }
            tracing::info!(export_id = %id, was = was.as_str(), "export cancelled");
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

    /// Runs `job` in a task of its own, registered in `running` until it stops.
    fn spawn(&self, job: JobRecord) {
        let token = CancellationToken::new();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let handover = Arc::new(AtomicBool::new(false));
        let running = Running { token: token.clone(), handover: handover.clone(), done };
        self.running.lock().expect("running map").insert(job.id.clone(), running);
        let engine = self.clone();
        // Every line the run logs carries the export's id (the span's field).
        let span = tracing::info_span!("export", export_id = %job.id);
        let run = async move {
            let id = job.id.clone();
            engine.run(job, token, &handover).await;
            engine.running.lock().expect("running map").remove(&id);
            let _ = done_tx.send(true);
        };
        tokio::spawn(tracing::Instrument::instrument(run, span));
    }

    /// Runs `job` to its end: renews its lease meanwhile; on failure or cancellation deletes
    /// what it wrote, and records a failure.
    async fn run(&self, mut job: JobRecord, token: CancellationToken, handover: &AtomicBool) {
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
                    tracing::warn!(export_id = %id, error = %e, "cleaning up a {what} export failed");
                }
            }
        };
        match result {
            Ok(()) => {
                let (done, _) = job.totals();
                tracing::info!(export_id = %job.id, resources = done, files = job.output.len(), elapsed_ms = started.elapsed().as_millis() as u64, "export completed");
                crate::meter::completed(&job);
                if let Some(o) = &self.observer {
                    o.finished(&job).await;
                }
            }
            // Handed over (shutting down): what was written stays, as after a crash; the
            // server that takes the export over reruns it.
            Err(RunError::Cancelled) if handover.load(Ordering::SeqCst) => {
                tracing::info!(export_id = %job.id, "export stopped for a handover")
            }
            Err(RunError::Cancelled) => cleanup("cancelled").await,
            Err(RunError::Failed(issue)) => {
                tracing::error!(export_id = %job.id, error = %issue.diagnostics, "export failed");
                cleanup("failed").await;
                let saved = match job.transition(JobStatus::Failed) {
                    Ok(()) => {
                        job.finished_at = Some(OffsetDateTime::now_utc());
                        job.output.clear();
                        job.error.clear();
                        job.outcome = Some(OperationOutcome::single(issue));
                        self.store.save_if(&job, &[JobStatus::Accepted, JobStatus::InProgress]).await.map(drop)
                    }
                    Err(e) => Err(e),
                };
                match saved {
                    Ok(()) => {
                        crate::meter::count(crate::meter::FAILED, &job);
                        if let Some(o) = &self.observer {
                            o.finished(&job).await;
                        }
                    }
                    Err(e) => tracing::error!(export_id = %job.id, error = %e, "recording the failure failed"),
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
                    Err(e) => tracing::warn!(export_id = %id, error = %e, "renewing the export's lease failed"),
                }
            }
        })
    }

    /// One attempt at the job: gives up after [`MAX_ATTEMPTS`] (or when a partial manifest
    /// has listed files), starts a rerun over on the recorded snapshot when the store can
    /// still read it, else on a new one, and exports on it.
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
        tracing::debug!(export_id = %job.id, ms = phase.elapsed().as_millis() as u64, "snapshot taken");
        let result = self.export_snapshot(job, token, &snapshot, from, storage).await;
        self.store.release(&snapshot).await;
        result
    }

    /// A run on `snapshot`, once the job is recorded `InProgress`: plans the parts, writes
    /// the lenient-mode error file, runs the parts, then writes the completion markers and
    /// records the job `Completed`. `from` is the status the job is taken from.
    async fn export_snapshot(
        &self,
        job: &mut JobRecord,
        token: &CancellationToken,
        snapshot: &Snapshot,
        from: JobStatus,
        storage: &Arc<dyn Storage>,
    ) -> Result<(), RunError> {
        job.transition(JobStatus::InProgress)?;
        if !self.store.save_if(job, &[from]).await? {
            return Err(RunError::Cancelled);
        }
        let planned = self.plan_parts(job, snapshot).await?;
        if !self.store.save_if(job, &[JobStatus::InProgress]).await? {
            return Err(RunError::Cancelled);
        }
        // The lenient-mode error file first: with partial manifests every page carries the
        // same `error` array, so it must exist before the first page.
        job.error = markers::write_error_file(job, storage).await?;
        self.run_parts(job, token, snapshot, storage, planned).await?;
        markers::order_files(job);
        markers::write_completion_markers(job, storage).await?;
        // Saved from a copy: if the save fails, the run fails from `InProgress`.
        let mut completed = job.clone();
        completed.transition(JobStatus::Completed)?;
        completed.finished_at = Some(OffsetDateTime::now_utc());
        if !self.store.save_if(&completed, &[JobStatus::InProgress]).await? {
            return Err(RunError::Cancelled);
        }
        *job = completed;
        Ok(())
    }
}
