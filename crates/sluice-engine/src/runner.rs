//! The part runner: runs the planned parts of a run in parallel ([`Engine::run_parts`]),
//! saving progress as they go. Each [`Part`] streams batches from the store, has them
//! encoded on blocking threads ([`crate::encode`]) and streams the bytes into storage
//! objects, one per file; patient blocks (`organizeOutputBy=Patient`) are written patient by
//! patient. A part whose database connection is lost (not its snapshot) runs again from its
//! start on a new connection, rewriting the same files (D51).

use crate::encode::{Encoded, Encoder, Treatment, block_header};
use crate::plan::{BlockPatients, Blocks, DELETED, PlannedPart, Sources, narrow};
use crate::{Engine, RunError, elements};
use bytes::Bytes;
use sluice_fhir::{Issue, IssueCode};
use sluice_jobs::{JobRecord, JobStatus, OutputFile};
use sluice_ndjson::Compression;
use sluice_planner::ExportPlan;
use sluice_storage::{ObjectMeta, ObjectWriter, Storage};
use sluice_store::{Patients, ScanFilter, Snapshot, StoreError};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A file a part has stored, not yet taken into the job.
struct FinishedFile {
    /// Whether it lists deletions: it goes to the job's `deleted`, else to its `output`.
    deleted: bool,
    /// The file.
    file: OutputFile,
}

/// The files the parts have finished and the runner has not taken into the job yet, in
/// the order they finished. Clones share the list.
#[derive(Clone)]
struct Finished {
    /// The files, oldest first.
    files: Arc<Mutex<Vec<FinishedFile>>>,
    /// The export's kick-off, and whether a file has finished yet (for the time to the
    /// first file, a metric).
    kicked_off: time::OffsetDateTime,
    any: Arc<std::sync::atomic::AtomicBool>,
    /// The storage's provider, for the metrics.
    provider: &'static str,
}

impl Finished {
    /// For an export kicked off at `kicked_off`, written to `provider`'s storage.
    fn new(kicked_off: time::OffsetDateTime, provider: &'static str) -> Self {
        Finished { files: Arc::default(), kicked_off, any: Arc::default(), provider }
    }

    /// Adds a file a part has stored.
    fn push(&self, file: FinishedFile) {
        if !self.any.swap(true, Ordering::Relaxed) {
            metrics::histogram!(crate::meter::FIRST_FILE).record(crate::meter::seconds_since(self.kicked_off));
        }
        self.files.lock().unwrap_or_else(PoisonError::into_inner).push(file);
    }

    /// Takes the files added since the last call.
    fn take(&self) -> Vec<FinishedFile> {
        std::mem::take(&mut *self.files.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes back the files named `keys` (a failed attempt's, to be written again), if none
    /// of them has been taken into the job yet; otherwise leaves the list as it is and
    /// returns `false`.
    fn withdraw(&self, keys: &[String]) -> bool {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if !keys.iter().all(|k| files.iter().any(|f| &f.file.key == k)) {
            return false;
        }
        files.retain(|f| !keys.contains(&f.file.key));
        true
    }
}

/// Attempts at a part whose database connection is lost (D51): the first and two retries.
const PART_ATTEMPTS: u32 = 3;

/// The pause before the first retry of a part; doubled before each next one.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Why an attempt at a part stopped.
enum PartError {
    /// The part fails (or the run stops) with this.
    Run(RunError),
    /// A store reader lost its database connection, not the snapshot: the part can run
    /// again on a new one.
    Lost(StoreError),
}

impl From<RunError> for PartError {
    fn from(e: RunError) -> Self {
        PartError::Run(e)
    }
}

impl From<StoreError> for PartError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ConnectionLost(_) => PartError::Lost(e),
            e => PartError::Run(e.into()),
        }
    }
}

/// An object being written.
struct OpenObject {
    /// The encoder's index of the file it holds.
    file: u32,
    /// The file's number in its type, which names it ([`Part::key`]).
    number: u32,
    /// Where its bytes go.
    writer: Box<dyn ObjectWriter>,
}

/// What an attempt at a part holds: the encoder (on a blocking thread while a batch is
/// encoded), the object being written, its store readers (aborted when the attempt fails),
/// and what it has done so far, which a retry takes back or reuses.
struct PartState {
    /// The encoder; `None` while it encodes a batch on a blocking thread.
    writer: Option<Encoder>,
    /// The object being written, if a file is open.
    open: Option<OpenObject>,
    /// The part's store readers.
    scans: Vec<tokio::task::AbortHandle>,
    /// File numbers an earlier attempt took, for this one's files in the same order.
    reuse: VecDeque<u32>,
    /// The file numbers this attempt has taken (reused or new), in order.
    numbers: Vec<u32>,
    /// The keys of the files this attempt finished.
    finished: Vec<String>,
    /// What this attempt added to each progress entry.
    counted: BTreeMap<String, u64>,
}

impl PartState {
    /// A first attempt's state (`reuse` empty), or a retry's reusing `reuse`.
    fn new(encoder: Encoder, reuse: Vec<u32>) -> Self {
        PartState {
            writer: Some(encoder),
            open: None,
            scans: Vec::new(),
            reuse: reuse.into(),
            numbers: Vec::new(),
            finished: Vec::new(),
            counted: BTreeMap::new(),
        }
    }

    /// Stops the readers and drops the object being written.
    async fn abort(&mut self) {
        // Stop reading before the snapshot is released, then drop what was written.
        self.scans.iter().for_each(tokio::task::AbortHandle::abort);
        if let Some(open) = self.open.take() {
            open.writer.abort().await;
        }
    }
}

/// The failure of a store reader task that panicked or was aborted.
fn reader_crashed(e: tokio::task::JoinError) -> RunError {
    RunError::Failed(Issue::fatal(IssueCode::Exception, format!("store reader crashed: {e}")))
}

impl Engine {
    /// Runs the planned parts, at most
    /// [`EngineConfig::parallelism`](crate::EngineConfig::parallelism) at a time (see
    /// [`Engine::supervise`]). On success the job holds every file they wrote and the final
    /// progress.
    pub(crate) async fn run_parts(
        &self,
        job: &mut JobRecord,
        token: &CancellationToken,
        snapshot: &Snapshot,
        storage: &Arc<dyn Storage>,
        planned: Vec<PlannedPart>,
    ) -> Result<(), RunError> {
        let finished = Finished::new(job.created_at, storage.provider());
        let done: Arc<BTreeMap<String, AtomicU64>> =
            Arc::new(job.progress.keys().map(|k| (k.clone(), AtomicU64::new(0))).collect());
        // File numbers per file name (type): the range parts of a type, and a `Bundle`
        // type beside the deletions, name their files from one counter.
        let mut file_numbers: HashMap<String, Arc<AtomicU32>> = HashMap::new();
        let limit = Arc::new(Semaphore::new(self.config.parallelism.max(1)));
        let mut parts = tokio::task::JoinSet::new();
        for PlannedPart { resource_type: t, sources, blocks, deleted: del, .. } in planned {
            let part = Part {
                export_id: job.id.clone(),
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
        self.supervise(job, token, parts, &done, &finished).await?;
        Self::copy_progress(job, &done);
        Self::take_finished(job, &finished);
        Ok(())
    }

    /// Waits for the parts. Every
    /// [`EngineConfig::progress_interval`](crate::EngineConfig::progress_interval) copies
    /// their progress into the job (with partial manifests also their finished files,
    /// closing a page) and saves it; a save that finds the job no longer in progress
    /// (cancelled) stops the run. The first failure cancels the other parts and is the result.
    async fn supervise(
        &self,
        job: &mut JobRecord,
        token: &CancellationToken,
        mut parts: JoinSet<Result<(), RunError>>,
        done: &BTreeMap<String, AtomicU64>,
        finished: &Finished,
    ) -> Result<(), RunError> {
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
                    Self::copy_progress(job, done);
                    if job.plan.allow_partial_manifests {
                        Self::take_finished(job, finished);
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
        Ok(())
    }

    /// Moves the files the parts finished since the last call into the job, in the order
    /// they finished.
    /// Counted in the metrics here, once a file is the job's (a retried part's files
    /// never are).
    fn take_finished(job: &mut JobRecord, finished: &Finished) {
        for FinishedFile { deleted, file } in finished.take() {
            crate::meter::file(&file.resource_type, finished.provider, file.count, file.bytes);
            if deleted { job.deleted.push(file) } else { job.output.push(file) }
        }
    }

    /// Copies the parts' counts of resources read into the job's progress.
    fn copy_progress(job: &mut JobRecord, done: &BTreeMap<String, AtomicU64>) {
        for (t, n) in done {
            if let Some(p) = job.progress.get_mut(t) {
                p.done = n.load(Ordering::Relaxed);
            }
        }
    }
}

/// One resource type of one export, or one id range of a large type, or a share of the
/// patient blocks.
struct Part {
    /// The export's id (for the log).
    export_id: String,
    /// The engine (its store and configuration).
    engine: Engine,
    /// Where the files go.
    storage: Arc<dyn Storage>,
    /// The job's folder in `storage`.
    job_folder: String,
    /// The export.
    plan: ExportPlan,
    /// What the store reads from.
    snapshot: Snapshot,
    /// The type the part's files are named after ([`PlannedPart::resource_type`]).
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
    /// Resources read so far, per progress entry (shared by every part of the run).
    done: Arc<BTreeMap<String, AtomicU64>>,
    /// Where each finished file goes, as soon as it is stored.
    finished: Finished,
    /// Cancelled when the run stops (a cancellation, or another part failed).
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

    /// A name for the part in the log: its progress entry, and its id range if it reads one.
    fn name(&self) -> String {
        let range = match &self.blocks {
            Some(b) => match &b.patients {
                BlockPatients::Range(r) => Some(r),
                BlockPatients::Listed(_) => None,
            },
            None => self.sources.first().and_then(|(_, f)| f.id_range.as_ref()),
        };
        match range {
            Some(r) => format!(
                "{} [{}, {})",
                self.progress_key,
                r.from.as_deref().unwrap_or("start"),
                r.to.as_deref().unwrap_or("end")
            ),
            None => self.progress_key.clone(),
        }
    }

    /// Writes the part's files: reads its sources (or writes its patient blocks), encodes
    /// and stores them. When a store reader loses its database connection (not the
    /// snapshot), the part runs again from its start on a new one, at most
    /// [`PART_ATTEMPTS`] times in all, rewriting the same files (D51). On failure, stops its
    /// readers and drops the object being written.
    async fn run(self) -> Result<(), RunError> {
        let mut reuse = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut st = PartState::new(self.encoder(), reuse);
            let result = self.attempt(&mut st).await;
            if result.is_err() {
                st.abort().await;
            }
            let lost = match result {
                Ok(()) => return Ok(()),
                Err(PartError::Run(e)) => return Err(e),
                Err(PartError::Lost(e)) => e,
            };
            if self.token.is_cancelled() {
                return Err(RunError::Cancelled);
            }
            if attempt >= PART_ATTEMPTS {
                return Err(RunError::Failed(Issue::fatal(
                    IssueCode::Exception,
                    format!("reading the store failed: {lost} ({attempt} attempts at {})", self.name()),
                )));
            }
            // The files this attempt finished are written again under the same names; once
            // a manifest page has listed one (allowPartialManifests), it must not change.
            if !self.finished.withdraw(&st.finished) {
                return Err(RunError::Failed(Issue::fatal(
                    IssueCode::Exception,
                    format!(
                        "reading the store failed: {lost}; {} is not read again: a manifest page has listed its files",
                        self.name()
                    ),
                )));
            }
            for (key, n) in &st.counted {
                self.done[key].fetch_sub(*n, Ordering::Relaxed);
            }
            tracing::warn!(
                export_id = %self.export_id,
                part = %self.name(),
                attempt,
                error = %lost,
                "a part lost its database connection; running it again from its start on a new one"
            );
            crate::meter::part_retried();
            tokio::select! {
                _ = tokio::time::sleep(RETRY_PAUSE * 2u32.pow(attempt - 1)) => {}
                _ = self.token.cancelled() => return Err(RunError::Cancelled),
            }
            reuse = st.numbers;
        }
    }

    /// A new encoder for the part's files.
    fn encoder(&self) -> Encoder {
        let cfg = &self.engine.config;
        let compression = if self.plan.output_format.is_gzip() {
            Compression::Gzip { level: cfg.gzip_level }
        } else {
            Compression::None
        };
        Encoder::new(compression, cfg.split)
    }

    /// One attempt at the part, from its start. A retry that ends with numbers of the
    /// attempt before it unused (its files split elsewhere: rows in another order with
    /// `max_bytes`) fails, as the files of those numbers cannot be taken back.
    async fn attempt(&self, st: &mut PartState) -> Result<(), PartError> {
        match &self.blocks {
            Some(blocks) => self.write_blocks(st, blocks).await?,
            None => self.scan_into(st, self.sources.clone(), None).await?,
        }
        let w = st.writer.take().expect("writer present at end");
        let events = tokio::task::spawn_blocking(move || w.finish())
            .await
            .map_err(|e| RunError::Failed(Issue::fatal(IssueCode::Exception, format!("encoder crashed: {e}"))))?
            .map_err(|e| RunError::Failed(Issue::fatal(IssueCode::Exception, format!("encoding failed: {e}"))))?;
        self.handle(events, st).await?;
        if !st.reuse.is_empty() {
            return Err(PartError::Run(RunError::Failed(Issue::fatal(
                IssueCode::Exception,
                format!(
                    "{} was read again after a lost database connection and wrote fewer files than before; \
                     start a new export",
                    self.name()
                ),
            ))));
        }
        Ok(())
    }

    /// `organizeOutputBy=Patient`: each patient's block, in order. A block starts with its
    /// header only once it has a resource (with `_since`, a patient without changes has no
    /// block), and no block is split across files.
    async fn write_blocks(&self, st: &mut PartState, blocks: &Blocks) -> Result<(), PartError> {
        let write = async |st: &mut PartState, id: &str| -> Result<(), PartError> {
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
                        _ = self.token.cancelled() => return Err(RunError::Cancelled.into()),
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
    ) -> Result<(), PartError> {
        let cfg = &self.engine.config;
        let joined = header.is_some();
        let treatments: Vec<Treatment> = sources.iter().map(|(rt, _)| self.treatment(rt)).collect();
        let counters: Vec<String> =
            sources.iter().map(|(rt, _)| if joined { rt.clone() } else { self.progress_key.clone() }).collect();
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
                _ = self.token.cancelled() => return Err(RunError::Cancelled.into()),
            };
            let Some((source, batch)) = next else { break };
            let n = batch.count;
            let mut w = st.writer.take().expect("writer present between batches");
            let treatment = treatments[source].clone();
            let pending = header.as_mut().and_then(|h| h.take());
            let (w, events, pending) = tokio::task::spawn_blocking(move || {
                let (res, pending) = w.encode_batch(&treatment, &batch, pending, joined);
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
            self.handle(events, st).await?;
            let key = &counters[source];
            self.done[key].fetch_add(n, Ordering::Relaxed);
            match st.counted.get_mut(key) {
                Some(c) => *c += n,
                None => {
                    st.counted.insert(key.clone(), n);
                }
            }
            self.throttle().await?;
        }
        scan.await.map_err(reader_crashed)??;
        Ok(())
    }

    /// [`EngineConfig::throttle`](crate::EngineConfig::throttle): the pause after a batch,
    /// if any (a cancellation ends it).
    async fn throttle(&self) -> Result<(), RunError> {
        if let Some(pause) = self.engine.config.throttle {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.token.cancelled() => return Err(RunError::Cancelled),
            }
        }
        Ok(())
    }

    /// Stores what the encoder produced: bytes go to the object of their file (created when
    /// a new file starts); a finished file is checked (stored size against encoded size) and
    /// handed to the runner ([`Finished`]).
    async fn handle(&self, events: Vec<Encoded>, st: &mut PartState) -> Result<(), RunError> {
        let open = &mut st.open;
        for ev in events {
            match ev {
                Encoded::Data { file, bytes } => {
                    if open.as_ref().is_none_or(|o| o.file != file) {
                        // The encoder never starts an empty file: every number taken is
                        // a file in the manifest. A retry first takes the numbers of the
                        // attempt before it, in order (D51).
                        let number = match st.reuse.pop_front() {
                            Some(n) => n,
                            None => self.file_numbers.fetch_add(1, Ordering::Relaxed),
                        };
                        st.numbers.push(number);
                        let meta = ObjectMeta::ndjson(self.plan.output_format.is_gzip());
                        let writer = self.storage.create(&self.key(number), meta).await?;
                        *open = Some(OpenObject { file, number, writer });
                    }
                    let o = open.as_mut().expect("opened above");
                    o.writer.write(Bytes::from(bytes)).await?;
                }
                Encoded::Finished { summary, sha256 } => {
                    let OpenObject { file: index, number, writer } = open.take().ok_or_else(|| {
                        RunError::Failed(Issue::fatal(
                            IssueCode::Exception,
                            "encoder finished a file that was never opened",
                        ))
                    })?;
                    debug_assert_eq!(index, summary.file);
                    let bytes = writer.finish().await?;
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
                    st.finished.push(file.key.clone());
                    self.finished.push(FinishedFile { deleted: self.deleted, file });
                }
            }
        }
        Ok(())
    }
}
