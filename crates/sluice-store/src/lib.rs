//! The resource store: versioned FHIR resources with consistent snapshots for export.
//!
//! A store implements two traits, one per concern (D30), so each consumer asks for only what it
//! uses: [`ResourceWrites`] (the REST API, the loader) and [`ExportReads`] (the export
//! engine: current reads, snapshots, counts, scans). The job records (`sluice_jobs::JobRepo`)
//! and the configuration resources (`sluice_storage::ConfigRepo`) live in the same
//! database, behind traits of their own crates. Both traits are shaped for the embedded
//! SQLite store and PostgreSQL:
//! - every write creates a new version; deletes leave tombstones;
//! - the server assigns `meta.versionId` and `meta.lastUpdated` on write, and keeps the
//!   resource's JSON as compact text, which exports stream verbatim;
//! - compartment membership ([`sluice_fhir::patient_ids`]) is indexed on write, so patient
//!   and group exports are index lookups;
//! - an export reads one [`Snapshot`]: every part of the export sees the same state, and the
//!   snapshot's time is the export's `transactionTime`. Writes committed after a snapshot
//!   get a `lastUpdated` later than its time, so chained `_since` exports miss nothing.
//!
//! [`prepare`] checks and normalises an incoming resource; [`bundle`] turns batch and
//! transaction Bundles into write operations.

pub mod auth;
pub mod bundle;

pub use auth::{AuditQuery, AuditRecord, AuthRepo};

use async_trait::async_trait;
use sluice_fhir::{Issue, IssueCode, valid_id};
use sluice_json::Json;
use std::collections::BTreeMap;
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The input is not acceptable (an issue a client can act on).
    #[error("{}", .0.diagnostics)]
    Invalid(Issue),
    /// The snapshot no longer exists or is not valid for this store.
    #[error("snapshot '{0}' is not valid for this store")]
    BadSnapshot(String),
    /// A load was aborted or its input ended without a commit; nothing was written.
    #[error("load rolled back: {0}")]
    LoadAborted(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
    /// The connection the call was using went away (cut, or ended by the server) while the
    /// database may still be up: the call may succeed on another connection. What a
    /// snapshot holds is not lost with it; a snapshot that is gone is
    /// [`StoreError::BadSnapshot`].
    #[error("database connection lost: {0}")]
    ConnectionLost(String),
}

/// A resource ready to be written: validated, with its type, id and patient links, and its
/// JSON rendered once, exactly as it came in (D17), with room for `meta.versionId` and
/// `meta.lastUpdated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewResource {
    /// `resourceType`.
    pub resource_type: String,
    /// `id`.
    pub id: String,
    /// Ids of the patients whose compartment it is in.
    pub patients: Vec<String>,
    /// The compact JSON, less the two values the store assigns.
    body: Template,
}

/// Compact JSON with holes for `meta.versionId` and `meta.lastUpdated`: the store fills
/// them in without parsing or serialising again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Template {
    /// The text around the holes.
    text: String,
    /// Where each hole is in `text`, in order.
    holes: Vec<(usize, Hole)>,
}

/// What goes into a [`Template`] hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    VersionId,
    LastUpdated,
}

impl Template {
    /// Writes `resource` (an object) with every `meta` member's `versionId` and
    /// `lastUpdated` as holes; a missing `meta` is added at the end, missing members at the
    /// end of `meta`. Everything else is written exactly as it was read.
    fn of(resource: &Json<'_>) -> Template {
        let mut t = Template::default();
        let members = resource.members().unwrap_or_default();
        t.text.push('{');
        let mut has_meta = false;
        for (i, (key, value)) in members.iter().enumerate() {
            if i > 0 {
                t.text.push(',');
            }
            if key.is("meta") {
                has_meta = true;
                sluice_json::write_str(key, &mut t.text);
                t.text.push(':');
                t.meta(value);
            } else {
                sluice_json::write_member(key, value, &mut t.text);
            }
        }
        if !has_meta {
            if !members.is_empty() {
                t.text.push(',');
            }
            t.text.push_str("\"meta\":");
            t.meta(&Json::Null);
        }
        t.text.push('}');
        t
    }

    /// Writes a `meta` object (a non-object `meta` is replaced by an object).
    fn meta(&mut self, meta: &Json<'_>) {
        let mut first = true;
        let mut sep = |text: &mut String| {
            if !std::mem::take(&mut first) {
                text.push(',');
            }
        };
        let (mut version, mut updated) = (false, false);
        self.text.push('{');
        for (key, value) in meta.members().unwrap_or_default() {
            let (seen, hole) = if key.is("versionId") {
                (&mut version, Hole::VersionId)
            } else if key.is("lastUpdated") {
                (&mut updated, Hole::LastUpdated)
            } else {
                sep(&mut self.text);
                sluice_json::write_member(key, value, &mut self.text);
                continue;
            };
            if !std::mem::replace(seen, true) {
                sep(&mut self.text);
                sluice_json::write_str(key, &mut self.text);
                self.text.push(':');
                self.holes.push((self.text.len(), hole));
            }
        }
        for (seen, key, hole) in [(version, "versionId", Hole::VersionId), (updated, "lastUpdated", Hole::LastUpdated)]
        {
            if !seen {
                sep(&mut self.text);
                self.text.push_str(&format!("\"{key}\":"));
                self.holes.push((self.text.len(), hole));
            }
        }
        self.text.push('}');
    }

    fn render(&self, version: u64, last_updated: OffsetDateTime) -> String {
        let mut out = String::with_capacity(self.text.len() + 48);
        let mut from = 0;
        for &(at, hole) in &self.holes {
            out.push_str(&self.text[from..at]);
            out.push('"');
            match hole {
                Hole::VersionId => out.push_str(&version.to_string()),
                Hole::LastUpdated => out.push_str(&sluice_fhir::instant::format(last_updated)),
            }
            out.push('"');
            from = at;
        }
        out.push_str(&self.text[from..]);
        out
    }
}

impl NewResource {
    /// The write is a no-op when this resource equals the current version (stored as
    /// `current_json`, version `version` at `last_updated`) in everything but `meta`: then
    /// this returns what to report, and nothing should be written.
    pub fn unchanged_from(&self, current_json: &str, version: u64, last_updated: OffsetDateTime) -> Option<Written> {
        let same = self.render(version, last_updated);
        (same == current_json).then(|| Written {
            resource_type: self.resource_type.clone(),
            id: self.id.clone(),
            version_id: version,
            last_updated,
            created: false,
            unchanged: true,
            json: Some(same),
        })
    }

    /// The JSON to store for `version` at `last_updated`: the resource as it came in, with
    /// only `meta.versionId` and `meta.lastUpdated` set.
    pub fn render(&self, version: u64, last_updated: OffsetDateTime) -> String {
        self.body.render(version, last_updated)
    }
}

/// Checks an incoming resource, given as JSON text, and prepares it for writing (see
/// [`prepare_parsed`]). Invalid JSON is an `Issue` naming the position.
pub fn prepare(json: &str, id: Option<&str>) -> Result<NewResource, Issue> {
    let resource = Json::parse(json)
        .map_err(|e| Issue::error(IssueCode::Structure, format!("the resource is not valid JSON: {e}")))?;
    prepare_parsed(resource, id)
}

/// Checks an incoming resource (an object with a known `resourceType` and a valid `id`)
/// and computes its compartment membership. `id` may be given when the resource has none;
/// it is then written after `resourceType`. Nothing else of the resource changes: numbers
/// and strings are kept exactly as written (D17).
pub fn prepare_parsed(mut resource: Json<'_>, id: Option<&str>) -> Result<NewResource, Issue> {
    if !resource.is_object() {
        return Err(Issue::error(IssueCode::Structure, "a resource must be a JSON object"));
    }
    let rt = resource
        .get("resourceType")
        .and_then(Json::as_str)
        .ok_or_else(|| Issue::error(IssueCode::Required, "the resource has no resourceType").at("resourceType"))?
        .into_owned();
    if !sluice_fhir::is_r4_resource_type(&rt) {
        return Err(
            Issue::error(IssueCode::NotSupported, format!("'{rt}' is not a FHIR R4 resource type")).at("resourceType")
        );
    }
    if let Some(id) = id
        && resource.get("id").is_none()
    {
        resource.set("id", Json::string(id), Some("resourceType"));
    }
    let rid = match resource.get("id") {
        Some(Json::String(s)) => s.text().into_owned(),
        Some(_) => {
            return Err(Issue::error(IssueCode::Invalid, "the resource id must be a string").at(format!("{rt}.id")));
        }
        None => return Err(Issue::error(IssueCode::Required, format!("the {rt} has no id")).at(format!("{rt}.id"))),
    };
    if !valid_id(&rid) {
        return Err(Issue::error(
            IssueCode::Invalid,
            format!("'{rid}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)"),
        )
        .at(format!("{rt}.id")));
    }
    let patients = sluice_fhir::patient_ids(&resource).into_iter().collect();
    Ok(NewResource { resource_type: rt, id: rid, patients, body: Template::of(&resource) })
}

/// What a write produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// `resourceType`.
    pub resource_type: String,
    /// `id`.
    pub id: String,
    /// The new `meta.versionId`.
    pub version_id: u64,
    /// The new `meta.lastUpdated`.
    pub last_updated: OffsetDateTime,
    /// Whether the resource did not exist (or was deleted) before.
    pub created: bool,
    /// Whether the content equalled the current version, so nothing was written.
    pub unchanged: bool,
    /// The stored JSON text (`None` for a delete).
    pub json: Option<String>,
}

/// The current row of a resource, as a store reads it inside a write transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrentRow<'a> {
    /// Its `meta.versionId`.
    pub version: i64,
    /// Its `meta.lastUpdated`, in milliseconds since the epoch.
    pub last_updated_ms: i64,
    /// Whether it is a tombstone.
    pub deleted: bool,
    /// Its stored JSON (`None` for a tombstone).
    pub json: Option<&'a str>,
}

impl<'a> CurrentRow<'a> {
    /// A row from its columns.
    pub fn of(version: i64, last_updated_ms: i64, deleted: bool, json: Option<&'a str>) -> Self {
        CurrentRow { version, last_updated_ms, deleted, json }
    }
}

/// What a write does, decided the same way by every store ([`decide_write`]).
#[derive(Debug, Clone, PartialEq)]
pub enum WriteDecision {
    /// A delete of something absent or already deleted: nothing to write.
    Nothing,
    /// A put whose content equals the current version (`meta` aside): nothing is written
    /// and this is the answer, so reloading the same data creates no versions.
    Unchanged(Written),
    /// A new version.
    NewVersion {
        /// Its `meta.versionId`.
        version: i64,
        /// Whether the resource did not exist (or was deleted) before.
        created: bool,
    },
}

/// What writing `resource` (a delete when `None`) over the `current` row does.
pub fn decide_write(current: Option<CurrentRow<'_>>, resource: Option<&NewResource>) -> WriteDecision {
    let live = current.filter(|c| !c.deleted);
    match (live, resource) {
        (None, None) => return WriteDecision::Nothing,
        (Some(c), Some(r)) => {
            let unchanged = c.json.and_then(|old| {
                r.unchanged_from(old, c.version as u64, sluice_fhir::instant::from_millis(c.last_updated_ms))
            });
            if let Some(w) = unchanged {
                return WriteDecision::Unchanged(w);
            }
        }
        _ => {}
    }
    WriteDecision::NewVersion { version: current.map_or(1, |c| c.version + 1), created: live.is_none() }
}

impl WriteDecision {
    /// The new version's `(version, created)`, or, when nothing is written, the answer to
    /// give (`None` for [`WriteDecision::Nothing`]).
    pub fn new_version(self) -> Result<(i64, bool), Option<Written>> {
        match self {
            WriteDecision::Nothing => Err(None),
            WriteDecision::Unchanged(w) => Err(Some(w)),
            WriteDecision::NewVersion { version, created } => Ok((version, created)),
        }
    }
}

impl Written {
    /// What a new version of `resource_type/id` is, once written (`json`: `None` for a
    /// tombstone).
    pub fn new_version(
        resource_type: &str,
        id: &str,
        version: i64,
        last_updated: OffsetDateTime,
        created: bool,
        json: Option<String>,
    ) -> Self {
        Written {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version_id: version as u64,
            last_updated,
            created,
            unchanged: false,
            json,
        }
    }
}

/// One operation of a batch or transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// Create or update.
    Put(NewResource),
    /// Delete (idempotent).
    Delete {
        /// `resourceType`.
        resource_type: String,
        /// `id`.
        id: String,
    },
}

/// The current state of one resource.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadResult {
    /// The current version's JSON text.
    Found(String),
    /// Deleted; the tombstone's version.
    Deleted(u64),
    /// Never existed.
    NotFound,
}

/// A consistent read view for one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Opaque, store-specific; persisted in the job record so a restarted export reads the
    /// same state.
    pub id: String,
    /// The snapshot's time: everything committed before is visible, nothing after.
    pub time: OffsetDateTime,
}

/// Which resources of one type an export part reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScanFilter {
    /// Only resources last updated strictly after this time (`_since`).
    pub since: Option<OffsetDateTime>,
    /// Only resources last updated at or before this time (`_until`).
    pub until: Option<OffsetDateTime>,
    /// Compartment restriction: `None` = no restriction (system export);
    /// `Some(Patients::Any)` = in some patient's compartment; `Some(Patients::Only(ids))`
    /// = in the compartment of one of these patients.
    pub patients: Option<Patients>,
    /// Select the resources deleted in the window instead (their current version is a
    /// tombstone; the compartment is the one of the version before the deletion). A scan
    /// then yields one IG "deleted" line per resource: a `transaction` Bundle with a
    /// `DELETE` entry for `Type/id`.
    pub deleted: bool,
    /// Only resources whose id falls in this range (one of several parts reading a large
    /// type at once). `None` = every id.
    pub id_range: Option<IdRange>,
    /// Only resources with these ids (what `_typeFilter`'s `_id` criteria allow); `None` =
    /// every id. An empty list selects nothing; ids that are not valid FHIR ids match
    /// nothing. Applies to deletions too (`deleted`), and in [`ExportReads::count`] to
    /// every type, so it belongs in the filter of one type's scan.
    pub ids: Option<Vec<String>>,
}

impl ScanFilter {
    /// This filter narrowed further (the bounds `_typeFilter` queries put on one type):
    /// `since` becomes the later of `since` and `after` (both exclusive), `until` the
    /// earlier of the two `until`s (inclusive), and `ids` the given ids, intersected with
    /// those already set. `None` leaves that part as it is. The resulting ids are sorted and
    /// distinct.
    ///
    /// For the resources of a type, not for its deletions: a tombstone's `lastUpdated` is
    /// the time of the deletion.
    pub fn narrowed(
        &self,
        after: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
        ids: Option<Vec<String>>,
    ) -> ScanFilter {
        let since = match (self.since, after) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let until = match (self.until, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let ids = match (&self.ids, ids) {
            (Some(old), Some(new)) => {
                let new: std::collections::BTreeSet<String> = new.into_iter().collect();
                Some(old.iter().filter(|id| new.contains(*id)).cloned().collect::<Vec<_>>())
            }
            (old, new) => new.or_else(|| old.clone()),
        }
        .map(|mut ids| {
            ids.sort();
            ids.dedup();
            ids
        });
        ScanFilter { since, until, ids, ..self.clone() }
    }
}

/// A range of resource ids, in the store's own order of ids (the order in which
/// [`ExportReads::split_points`] returns them): `from` inclusive, `to` exclusive; `None`
/// leaves that end open. The ranges `[None, b1)`, `[b1, b2)`, ..., `[bk, None)` built from
/// increasing split points partition every id, whatever the order is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdRange {
    /// The least id in the range (inclusive); `None` = no lower bound.
    pub from: Option<String>,
    /// The first id after the range (exclusive); `None` = no upper bound.
    pub to: Option<String>,
}

impl IdRange {
    /// The ranges that `points` (increasing, as [`ExportReads::split_points`] returns
    /// them) cut the id space into: `points.len() + 1` ranges, the first and last open.
    pub fn between(points: &[String]) -> Vec<IdRange> {
        let bound = |i: usize| if i == 0 || i > points.len() { None } else { Some(points[i - 1].clone()) };
        (0..=points.len()).map(|i| IdRange { from: bound(i), to: bound(i + 1) }).collect()
    }
}

/// The SQL text of the IG's line for a deleted resource, around `Type/id`: prefix and suffix.
pub const DELETED_LINE: (&str, &str) =
    (r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":""#, r#""}}]}"#);

/// How many patient ids [`ExportReads::compartment_patients`] sends at a time.
pub const PATIENT_BATCH: usize = 1024;

/// A compartment restriction.
#[derive(Debug, Clone, PartialEq)]
pub enum Patients {
    /// Resources in the compartment of any patient.
    Any,
    /// Resources in the compartment of one of these patients.
    Only(Vec<String>),
}

/// Resources read for export: compact JSON lines, each followed by `\n`, bounded in bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The lines, `\n`-terminated.
    pub data: Vec<u8>,
    /// How many lines.
    pub count: u64,
}

impl Batch {
    /// An empty batch with room for about `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        Batch { data: Vec::with_capacity(bytes + 4096), count: 0 }
    }

    /// Appends one line (compact JSON without `\n`). Once the batch holds `limit` bytes it
    /// is returned to be sent, and this one starts again empty.
    pub fn push(&mut self, json: &[u8], limit: usize) -> Option<Batch> {
        self.data.extend_from_slice(json);
        self.data.push(b'\n');
        self.count += 1;
        (self.data.len() >= limit).then(|| std::mem::replace(self, Batch::with_capacity(limit)))
    }

    /// The lines without their `\n`.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.data.split(|&b| b == b'\n').filter(|l| !l.is_empty())
    }
}

/// A message into a running bulk load ([`ExportReads::load`]).
#[derive(Debug, Clone, PartialEq)]
pub enum LoadMsg {
    /// Resources to write.
    Batch(Vec<NewResource>),
    /// Everything was sent: commit.
    Commit,
    /// Give up: roll everything back and report this reason.
    Abort(String),
}

/// Counts from a finished load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// Resources written, per type.
    pub per_type: BTreeMap<String, u64>,
    /// Of those, how many replaced an existing resource (same type and id) with new content.
    pub updated: u64,
    /// Of those, how many equalled the current version and were left as they were.
    pub unchanged: u64,
}

/// Writing FHIR resources: what the REST API and the loader use. Every write gets a new
/// version with `meta.versionId` and `meta.lastUpdated` set by the store (D17: the rest of
/// the text is kept exactly).
#[async_trait]
pub trait ResourceWrites: Send + Sync {
    /// A short description (kind and location, no secrets).
    fn describe(&self) -> String;

    /// Creates or updates one resource.
    async fn put(&self, resource: NewResource) -> Result<Written, StoreError>;
    /// Deletes a resource (a tombstone version); `None` when it did not exist.
    async fn delete(&self, resource_type: &str, id: &str) -> Result<Option<Written>, StoreError>;
    /// Applies operations in one database transaction (all or nothing).
    async fn transaction(&self, ops: Vec<WriteOp>) -> Result<Vec<Option<Written>>, StoreError>;
    /// Runs a bulk load in one database transaction: writes every [`LoadMsg::Batch`],
    /// commits on [`LoadMsg::Commit`]; on [`LoadMsg::Abort`], or if the sender goes away
    /// first, rolls back so nothing of the load remains.
    async fn load(&self, input: mpsc::Receiver<LoadMsg>) -> Result<LoadSummary, StoreError>;
}

/// Reading FHIR resources: the current version, and everything an export reads from one
/// consistent snapshot.
#[async_trait]
pub trait ExportReads: Send + Sync {
    /// The current version of a resource.
    async fn read(&self, resource_type: &str, id: &str) -> Result<ReadResult, StoreError>;

    /// Takes a snapshot for an export. Call [`ExportReads::release`] when the export ends.
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// Frees what a snapshot holds (PostgreSQL: the transaction that exported it).
    async fn release(&self, _snapshot: &Snapshot) {}
    /// Whether a snapshot recorded before a restart can still be read. When it cannot, a
    /// resumed export takes a new one (and a new `transactionTime`).
    async fn can_resume(&self, _snapshot: &Snapshot) -> bool {
        true
    }
    /// Per-type counts of what a scan with `filter` would return, for types with data.
    async fn count(&self, snapshot: &Snapshot, filter: &ScanFilter) -> Result<BTreeMap<String, u64>, StoreError>;
    /// A resource as of the snapshot.
    async fn read_at(&self, snapshot: &Snapshot, resource_type: &str, id: &str) -> Result<Option<String>, StoreError>;
    /// The version of a resource that was current at the instant `at`, as the snapshot's
    /// history holds it: the JSON of its latest version last updated at or before `at`;
    /// `None` when it had no version yet or that version is a tombstone. Group exports
    /// with `_since` read the Group as it was at `_since` with it (D7).
    async fn read_as_of(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<Option<String>, StoreError>;
    /// Streams one type's resources as of the snapshot into `tx`, in batches of at most
    /// about `batch_bytes`. Returns when done or when the receiver is dropped.
    async fn scan(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        filter: &ScanFilter,
        batch_bytes: usize,
        tx: mpsc::Sender<Batch>,
    ) -> Result<(), StoreError>;
    /// Streams several scans one after the other ([`ExportReads::scan`] of each `(type,
    /// filter)`, in order) into `tx`, each batch tagged with the index of its source; a batch
    /// never mixes sources. A patient block (`organizeOutputBy=Patient`) reads one patient's
    /// compartment type by type this way. Stores override it to read every source over one
    /// connection and snapshot import; the default runs the scans one by one.
    async fn scan_many(
        &self,
        snapshot: &Snapshot,
        sources: &[(String, ScanFilter)],
        batch_bytes: usize,
        tx: mpsc::Sender<(usize, Batch)>,
    ) -> Result<(), StoreError> {
        for (i, (resource_type, filter)) in sources.iter().enumerate() {
            let (inner_tx, mut inner_rx) = mpsc::channel(1);
            // `move`: the inner receiver goes when forwarding stops (the reader went), so a
            // scan blocked on a full channel ends instead of waiting forever.
            let tx = &tx;
            let forward = async move {
                while let Some(batch) = inner_rx.recv().await {
                    if tx.send((i, batch)).await.is_err() {
                        return false;
                    }
                }
                true
            };
            let (scanned, open) =
                tokio::join!(self.scan(snapshot, resource_type, filter, batch_bytes, inner_tx), forward);
            scanned?;
            if !open {
                return Ok(()); // the reader stopped (cancelled)
            }
        }
        Ok(())
    }
    /// The patients a patient-level export organized by patient (`organizeOutputBy=Patient`)
    /// writes blocks for: the distinct ids, increasing in the store's order of ids (the
    /// order [`IdRange`] bounds compare in), of the patients in whose compartment lies a
    /// current resource of one of `types` last updated in `filter`'s window (`since`,
    /// `until`). `filter.id_range` bounds the *patient* ids; its `patients`, `ids` and
    /// `deleted` are ignored. A patient without a `Patient` resource (never loaded, or
    /// deleted) counts like any other: the resources in its compartment are still exported.
    /// Sent in batches of ids.
    async fn compartment_patients(
        &self,
        snapshot: &Snapshot,
        types: &[String],
        filter: &ScanFilter,
        tx: mpsc::Sender<Vec<String>>,
    ) -> Result<(), StoreError>;
    /// Up to `parts - 1` distinct ids, increasing in the store's order of ids (the order
    /// [`IdRange`] bounds compare in), that cut the resources of `resource_type` into about
    /// equal ranges ([`IdRange::between`]), so that several parts can read one large type at
    /// once. Only the balance depends on them: any increasing points give ranges that
    /// partition the ids. Fewer (or none) when the type has few resources. The default
    /// never splits.
    async fn split_points(
        &self,
        _snapshot: &Snapshot,
        _resource_type: &str,
        _parts: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> OffsetDateTime {
        sluice_fhir::instant::parse("2024-01-02T03:04:05.678Z").unwrap()
    }

    #[test]
    fn prepare_checks_type_and_id() {
        let ok =
            prepare(r#"{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"}}"#, None).unwrap();
        assert_eq!((ok.resource_type.as_str(), ok.id.as_str()), ("Observation", "o1"));
        assert_eq!(ok.patients, vec!["p1".to_string()]);
        assert!(prepare("[1]", None).is_err());
        assert!(prepare(r#"{"id":"x"}"#, None).is_err());
        let e = prepare(r#"{"resourceType":"Nope","id":"x"}"#, None).unwrap_err();
        assert!(e.diagnostics.contains("'Nope'"));
        assert!(prepare(r#"{"resourceType":"Patient"}"#, None).is_err());
        assert!(prepare(r#"{"resourceType":"Patient","id":"bad id"}"#, None).is_err());
        assert!(prepare(r#"{"resourceType":"Patient","id":7}"#, None).is_err());
        let e = prepare(r#"{"resourceType":"Patient",}"#, None).unwrap_err();
        assert!(e.diagnostics.contains("not valid JSON") && e.diagnostics.contains("column"), "{}", e.diagnostics);
        let p = prepare(r#"{"resourceType":"Patient","active":true}"#, Some("new")).unwrap();
        assert_eq!(
            p.render(1, t()),
            r#"{"resourceType":"Patient","id":"new","active":true,"meta":{"versionId":"1","lastUpdated":"2024-01-02T03:04:05.678Z"}}"#
        );
    }

    #[test]
    fn render_sets_meta_where_it_is_and_keeps_the_rest() {
        let r = prepare(
            r#"{"resourceType":"Patient","id":"p","meta":{"lastUpdated":"x","profile":["x"],"versionId":"9"},"active":true}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            r.render(12, t()),
            r#"{"resourceType":"Patient","id":"p","meta":{"lastUpdated":"2024-01-02T03:04:05.678Z","profile":["x"],"versionId":"12"},"active":true}"#
        );
        let bare = prepare(r#"{"resourceType":"Patient","id":"q"}"#, None).unwrap();
        assert!(bare.render(1, t()).ends_with(r#""meta":{"versionId":"1","lastUpdated":"2024-01-02T03:04:05.678Z"}}"#));
        let odd = prepare(r#"{"resourceType":"Patient","id":"q","meta":7}"#, None).unwrap();
        assert!(odd.render(1, t()).ends_with(r#""meta":{"versionId":"1","lastUpdated":"2024-01-02T03:04:05.678Z"}}"#));
        let tagged = prepare(r#"{"resourceType":"Patient","id":"q","meta":{"tag":[{"code":"a"}]}}"#, None).unwrap();
        assert!(
            tagged.render(2, t()).ends_with(
                r#""meta":{"tag":[{"code":"a"}],"versionId":"2","lastUpdated":"2024-01-02T03:04:05.678Z"}}"#
            )
        );
    }

    #[test]
    fn numbers_strings_and_order_are_kept_exactly() {
        let text = "{ \"resourceType\" : \"Observation\", \"id\":\"o\",\n \"valueQuantity\": {\"value\": 112.41600000000001, \"unit\":\"\\u2028\\\"😀\\ud83d\\ude00\"},\n \"component\":[{\"valueDecimal\":-0.0},{\"valueDecimal\":1.50},{\"valueInteger\":123456789012345678901234567890}],\"zz\":3.14159265358979323846264338327950288,\"aa\":0.010 }";
        let r = prepare(text, None).unwrap();
        assert_eq!(
            r.render(1, t()),
            "{\"resourceType\":\"Observation\",\"id\":\"o\",\"valueQuantity\":{\"value\":112.41600000000001,\"unit\":\"\\u2028\\\"😀\\ud83d\\ude00\"},\"component\":[{\"valueDecimal\":-0.0},{\"valueDecimal\":1.50},{\"valueInteger\":123456789012345678901234567890}],\"zz\":3.14159265358979323846264338327950288,\"aa\":0.010,\"meta\":{\"versionId\":\"1\",\"lastUpdated\":\"2024-01-02T03:04:05.678Z\"}}"
        );
    }

    #[test]
    fn unchanged_compares_everything_but_meta() {
        let r = prepare(r#"{"resourceType":"Patient","id":"p","x":1.50}"#, None).unwrap();
        let stored = r.render(3, t());
        assert!(r.unchanged_from(&stored, 3, t()).is_some());
        let other = prepare(r#"{"resourceType":"Patient","id":"p","x":1.5}"#, None).unwrap();
        assert!(other.unchanged_from(&stored, 3, t()).is_none(), "1.5 is not 1.50");
    }

    #[test]
    fn ranges_between_split_points_cover_every_id_once() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(IdRange::between(&[]), vec![IdRange { from: None, to: None }]);
        assert_eq!(
            IdRange::between(&["b".into(), "d".into()]),
            vec![
                IdRange { from: None, to: s("b") },
                IdRange { from: s("b"), to: s("d") },
                IdRange { from: s("d"), to: None }
            ]
        );
    }

    #[test]
    fn narrowing_intersects_windows_and_ids() {
        let t = |s: &str| sluice_fhir::instant::parse(s).unwrap();
        let ids = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let base = ScanFilter {
            since: Some(t("2024-01-01T00:00:00Z")),
            until: Some(t("2024-12-31T00:00:00Z")),
            patients: Some(Patients::Any),
            id_range: Some(IdRange { from: Some("a".into()), to: None }),
            ..Default::default()
        };
        assert_eq!(base.narrowed(None, None, None), base, "nothing to narrow");
        let later = base.narrowed(Some(t("2024-06-01T00:00:00Z")), Some(t("2025-01-01T00:00:00Z")), None);
        assert_eq!((later.since, later.until), (Some(t("2024-06-01T00:00:00Z")), base.until));
        let earlier = base.narrowed(Some(t("2023-01-01T00:00:00Z")), Some(t("2024-02-01T00:00:00Z")), None);
        assert_eq!((earlier.since, earlier.until), (base.since, Some(t("2024-02-01T00:00:00Z"))));
        assert_eq!(
            (earlier.patients, earlier.id_range, earlier.deleted),
            (base.patients.clone(), base.id_range.clone(), false)
        );
        let open = ScanFilter::default().narrowed(Some(t("2024-06-01T00:00:00Z")), None, ids(&["b", "a", "b"]));
        assert_eq!((open.since, open.until, open.ids), (Some(t("2024-06-01T00:00:00Z")), None, ids(&["a", "b"])));
        let with_ids = ScanFilter { ids: ids(&["c", "a", "b"]), ..Default::default() };
        assert_eq!(with_ids.narrowed(None, None, ids(&["b", "c", "d"])).ids, ids(&["b", "c"]));
        assert_eq!(with_ids.narrowed(None, None, ids(&["x"])).ids, ids(&[]), "disjoint: nothing");
        assert_eq!(with_ids.narrowed(None, None, None).ids, ids(&["a", "b", "c"]));
    }

    #[test]
    fn batch_lines() {
        let b = Batch { data: b"{\"a\":1}\n{\"b\":2}\n".to_vec(), count: 2 };
        assert_eq!(b.lines().collect::<Vec<_>>(), vec![&b"{\"a\":1}"[..], &b"{\"b\":2}"[..]]);
    }
}
