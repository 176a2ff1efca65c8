//! The embedded store ([`ResourceWrites`], [`ExportReads`], plus the job records, configuration resources and authorization records): one SQLite file (bundled SQLite, WAL mode).
//!
//! Every write appends a row to `resource_version` with a sequence number (`seq`) taken
//! from a counter owned by the single writer; the row it replaces gets `superseded = seq`.
//! A snapshot is a sequence number `S` (taken under the writer lock, so no write is half
//! done): the state at `S` is the rows with `seq <= S` not superseded at or before `S`.
//! Readers on their own connections can therefore all read the same state in parallel,
//! and a restarted export reads exactly what it read before. Compartment membership is
//! stored per version in `compartment(patient_id, seq)`.
//!
//! The write clock only moves forward and a snapshot's time is at least every earlier
//! write's `lastUpdated`, while later writes get strictly later times: `_since` chains
//! across exports are exact.

mod auth;
mod config;
mod jobs;
mod schema;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params};
use sluice_fhir::instant;
use sluice_storage::{Secrets, owner_only};
use sluice_store::{
    Batch, CurrentRow, ExportReads, LoadMsg, LoadSummary, NewResource, Patients, ReadResult, ResourceWrites,
    ScanFilter, Snapshot, StoreError, WriteOp, Written, decide_write,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use tokio::sync::mpsc;

pub(crate) fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

/// The writer connection of this process. Other processes (a `sluice load` next to a
/// running server) may write to the same file, so the sequence number and the clock are
/// read inside each write transaction (`BEGIN IMMEDIATE` holds SQLite's write lock), never
/// cached in memory.
pub(crate) struct Writer {
    pub(crate) conn: Connection,
}

/// A write transaction with its next sequence number and its `lastUpdated`.
struct WriteTx<'c> {
    tx: Transaction<'c>,
    next_seq: i64,
    ts_ms: i64,
}

/// Reads the persisted clock (the latest write or snapshot time, in ms).
fn stored_clock(tx: &Transaction<'_>) -> rusqlite::Result<i64> {
    tx.query_row("SELECT CAST(value AS INTEGER) FROM kv WHERE key='clock_ms'", [], |r| r.get(0))
        .optional()
        .map(|v| v.unwrap_or(0))
}

fn store_clock(tx: &Transaction<'_>, ms: i64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO kv(key, value) VALUES('clock_ms', ?1) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        params![ms.to_string()],
    )
    .map(|_| ())
}

fn max_seq(tx: &Transaction<'_>) -> rusqlite::Result<i64> {
    tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM resource_version", [], |r| r.get(0))
}

impl Writer {
    /// Starts a write: takes the write lock, reads the next sequence number, and picks a
    /// `lastUpdated` that is now but always after every earlier write and snapshot.
    fn begin(&mut self) -> Result<WriteTx<'_>, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        let next_seq = max_seq(&tx).map_err(db_err)? + 1;
        let now = instant::to_millis(OffsetDateTime::now_utc());
        let ts_ms = now.max(stored_clock(&tx).map_err(db_err)? + 1);
        store_clock(&tx, ts_ms).map_err(db_err)?;
        Ok(WriteTx { tx, next_seq, ts_ms })
    }
}

/// The embedded SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    pub(crate) writer: Arc<Mutex<Writer>>,
    /// Seals and opens the secret fields of configuration resources (D50).
    pub(crate) secrets: Secrets,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

/// Creates the database file owner-only (SQLite gives its `-wal` and `-shm` files the
/// database's mode), or tightens an existing one and its companions.
fn owner_only_db(path: &Path) -> std::io::Result<()> {
    owner_only::create_file(path)?;
    owner_only::tighten(path, "the database")?;
    for suffix in ["-wal", "-shm"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        owner_only::tighten(Path::new(&companion), "the database's journal")?;
    }
    Ok(())
}

fn open_conn(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database file at `path`. On Unix the
    /// file (and its `-wal`/`-shm` files) is owner-only (0600): a looser one is tightened,
    /// with a warning; folders it creates are 0700.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            owner_only::create_dir_all(dir).map_err(|e| db_err(format!("{}: {e}", dir.display())))?;
        }
        owner_only_db(&path).map_err(|e| db_err(format!("{}: {e}", path.display())))?;
        let conn = open_conn(&path, false).map_err(|e| db_err(format!("{}: {e}", path.display())))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
            .map_err(db_err)?;
        schema::migrate(&conn).map_err(db_err)?;
        let writer = Writer { conn };
        Ok(SqliteStore { path, writer: Arc::new(Mutex::new(writer)), secrets: Secrets::none() })
    }

    /// Seals the secret fields of configuration resources with `secrets` from now on
    /// (D50); see also [`SqliteStore::reseal_secrets`].
    pub fn with_secrets(mut self, secrets: Secrets) -> Self {
        self.secrets = secrets;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the writer on a blocking thread.
    pub(crate) async fn with_writer<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer) -> Result<T, StoreError> + Send + 'static,
    {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = writer.lock().map_err(|_| db_err("writer lock poisoned"))?;
            f(&mut w)
        })
        .await
        .map_err(db_err)?
    }

    /// Runs `f` with a fresh read-only connection on a blocking thread.
    async fn with_reader<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = open_conn(&path, true).map_err(db_err)?;
            f(&conn)
        })
        .await
        .map_err(db_err)?
    }
}

struct Current {
    seq: i64,
    version: i64,
    deleted: bool,
    last_updated: i64,
    json: Option<String>,
}

fn current(tx: &Transaction<'_>, rt: &str, id: &str) -> rusqlite::Result<Option<Current>> {
    tx.prepare_cached(
        "SELECT seq, version, deleted, last_updated, json FROM resource_version WHERE type=?1 AND id=?2 AND superseded IS NULL",
    )?
    .query_row(params![rt, id], |r| {
        Ok(Current { seq: r.get(0)?, version: r.get(1)?, deleted: r.get(2)?, last_updated: r.get(3)?, json: r.get(4)? })
    })
    .optional()
}

/// Appends a version (a tombstone when `resource` is `None`). Returns what was written,
/// or `None` for a delete of something absent. A put whose content equals the current
/// version (ignoring `meta.versionId`/`meta.lastUpdated`) writes nothing and returns the
/// current version with `unchanged` set, so reloading the same data creates no versions.
fn write_version(
    tx: &Transaction<'_>,
    next_seq: &mut i64,
    ts_ms: i64,
    rt: &str,
    id: &str,
    resource: Option<NewResource>,
) -> Result<Option<Written>, StoreError> {
    let cur = current(tx, rt, id).map_err(db_err)?;
    let is_delete = resource.is_none();
    let row = cur.as_ref().map(|c| CurrentRow::of(c.version, c.last_updated, c.deleted, c.json.as_deref()));
    let (version, created) = match decide_write(row, resource.as_ref()).new_version() {
        Ok(new) => new,
        Err(answer) => return Ok(answer),
    };
    let seq = *next_seq;
    *next_seq += 1;
    if let Some(c) = &cur {
        tx.prepare_cached("UPDATE resource_version SET superseded=?1 WHERE seq=?2")
            .and_then(|mut s| s.execute(params![seq, c.seq]))
            .map_err(db_err)?;
    }
    let last_updated = instant::from_millis(ts_ms);
    let json = resource.map(|r| {
        let json = r.render(version as u64, last_updated);
        (json, r.patients)
    });
    tx.prepare_cached(
        "INSERT INTO resource_version(seq, type, id, version, last_updated, deleted, json) VALUES (?1,?2,?3,?4,?5,?6,?7)",
    )
    .and_then(|mut s| s.execute(params![seq, rt, id, version, ts_ms, is_delete, json.as_ref().map(|j| &j.0)]))
    .map_err(db_err)?;
    if let Some((_, patients)) = &json {
        let mut ins =
            tx.prepare_cached("INSERT OR IGNORE INTO compartment(patient_id, seq) VALUES (?1, ?2)").map_err(db_err)?;
        for p in patients {
            ins.execute(params![p, seq]).map_err(db_err)?;
        }
    }
    Ok(Some(Written::new_version(rt, id, version, last_updated, created, json.map(|j| j.0))))
}

fn parse_snapshot(s: &Snapshot) -> Result<i64, StoreError> {
    s.id.strip_prefix("sqlite:").and_then(|n| n.parse().ok()).ok_or_else(|| StoreError::BadSnapshot(s.id.clone()))
}

/// SQL (after `FROM resource_version r WHERE`) and its parameters for a filtered scan.
fn visible_where(snap: i64, filter: &ScanFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let mut sql = format!(
        "r.seq <= ?1 AND (r.superseded IS NULL OR r.superseded > ?1) AND r.deleted = {}",
        i32::from(filter.deleted)
    );
    // A tombstone has no compartment of its own: the version it replaced has.
    let member = if filter.deleted {
        "(SELECT p.seq FROM resource_version p WHERE p.type = r.type AND p.id = r.id AND p.superseded = r.seq)"
    } else {
        "r.seq"
    };
    let mut args = vec![V::Integer(snap)];
    if let Some(since) = filter.since {
        args.push(V::Integer(instant::to_millis(since)));
        sql.push_str(&format!(" AND r.last_updated > ?{}", args.len()));
    }
    if let Some(until) = filter.until {
        args.push(V::Integer(instant::to_millis(until)));
        sql.push_str(&format!(" AND r.last_updated <= ?{}", args.len()));
    }
    if let Some(range) = &filter.id_range {
        // Ids compare as bytes (BINARY), like the `resource_current` index that
        // `split_points` reads them from.
        for (bound, op) in [(&range.from, ">="), (&range.to, "<")] {
            if let Some(id) = bound {
                args.push(V::Text(id.clone()));
                sql.push_str(&format!(" AND r.id {op} ?{}", args.len()));
            }
        }
    }
    if let Some(ids) = &filter.ids {
        // One parameter whatever the number of ids (SQLite allows at most 32,766 bound
        // parameters per statement): the list as a JSON array, read with `json_each`, which
        // SQLite turns into an ephemeral index for `IN` once per statement. An empty array
        // selects nothing.
        args.push(V::Text(serde_json::to_string(ids).expect("ids serialise")));
        sql.push_str(&format!(" AND r.id IN (SELECT value FROM json_each(?{}))", args.len()));
    }
    match &filter.patients {
        None => {}
        Some(Patients::Any) => {
            sql.push_str(&format!(" AND EXISTS (SELECT 1 FROM compartment c WHERE c.seq = {member})"))
        }
        Some(Patients::Only(ids)) => {
            args.push(V::Text(serde_json::to_string(ids).expect("ids serialise")));
            sql.push_str(&format!(
                " AND {member} IN (SELECT c.seq FROM compartment c WHERE c.patient_id IN (SELECT value FROM json_each(?{})))",
                args.len()
            ));
        }
    }
    (sql, args)
}

/// The column a scan yields: the stored JSON, or the IG line of a deleted resource.
fn line_sql(filter: &ScanFilter) -> String {
    if filter.deleted {
        let (pre, post) = sluice_store::DELETED_LINE;
        format!("'{pre}' || r.type || '/' || r.id || '{post}'")
    } else {
        "r.json".to_string()
    }
}

#[async_trait]
impl ResourceWrites for SqliteStore {
    fn describe(&self) -> String {
        format!("embedded SQLite ({})", self.path.display())
    }

    async fn put(&self, resource: NewResource) -> Result<Written, StoreError> {
        let rt = resource.resource_type.clone();
        let id = resource.id.clone();
        self.with_writer(move |w| {
            let WriteTx { tx, mut next_seq, ts_ms } = w.begin()?;
            let out = write_version(&tx, &mut next_seq, ts_ms, &rt, &id, Some(resource))?;
            tx.commit().map_err(db_err)?;
            Ok(out.expect("a put always writes"))
        })
        .await
    }

    async fn delete(&self, resource_type: &str, id: &str) -> Result<Option<Written>, StoreError> {
        let (rt, id) = (resource_type.to_string(), id.to_string());
        self.with_writer(move |w| {
            let WriteTx { tx, mut next_seq, ts_ms } = w.begin()?;
            let out = write_version(&tx, &mut next_seq, ts_ms, &rt, &id, None)?;
            tx.commit().map_err(db_err)?;
            Ok(out)
        })
        .await
    }

    async fn transaction(&self, ops: Vec<WriteOp>) -> Result<Vec<Option<Written>>, StoreError> {
        self.with_writer(move |w| {
            let WriteTx { tx, next_seq: mut seq, ts_ms: ts } = w.begin()?;
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                out.push(match op {
                    WriteOp::Put(r) => {
                        let (rt, id) = (r.resource_type.clone(), r.id.clone());
                        write_version(&tx, &mut seq, ts, &rt, &id, Some(r))?
                    }
                    WriteOp::Delete { resource_type, id } => {
                        write_version(&tx, &mut seq, ts, &resource_type, &id, None)?
                    }
                });
            }
            tx.commit().map_err(db_err)?;
            Ok(out)
        })
        .await
    }

    async fn load(&self, mut input: mpsc::Receiver<LoadMsg>) -> Result<LoadSummary, StoreError> {
        self.with_writer(move |w| {
            let WriteTx { tx, next_seq: mut seq, ts_ms: ts } = w.begin()?;
            let mut summary = LoadSummary::default();
            loop {
                match input.blocking_recv() {
                    Some(LoadMsg::Batch(batch)) => {
                        for r in batch {
                            let (rt, id) = (r.resource_type.clone(), r.id.clone());
                            match write_version(&tx, &mut seq, ts, &rt, &id, Some(r))? {
                                Some(w) if w.unchanged => summary.unchanged += 1,
                                Some(w) if !w.created => summary.updated += 1,
                                _ => {}
                            }
                            *summary.per_type.entry(rt).or_default() += 1;
                        }
                    }
                    Some(LoadMsg::Commit) => break,
                    Some(LoadMsg::Abort(why)) => return Err(StoreError::LoadAborted(why)),
                    None => return Err(StoreError::LoadAborted("the input ended before it was complete".into())),
                }
            }
            tx.commit().map_err(db_err)?;
            Ok(summary)
        })
        .await
    }
}

#[async_trait]
impl ExportReads for SqliteStore {
    async fn read(&self, resource_type: &str, id: &str) -> Result<ReadResult, StoreError> {
        let (rt, id) = (resource_type.to_string(), id.to_string());
        self.with_reader(move |c| {
            let row: Option<(i64, bool, Option<String>)> = c
                .query_row(
                    "SELECT version, deleted, json FROM resource_version WHERE type=?1 AND id=?2 AND superseded IS NULL",
                    params![rt, id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(db_err)?;
            Ok(match row {
                None => ReadResult::NotFound,
                Some((v, true, _)) => ReadResult::Deleted(v as u64),
                Some((_, false, json)) => ReadResult::Found(json.unwrap_or_default()),
            })
        })
        .await
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.with_writer(|w| {
            // Under the write lock no write is half done: everything up to MAX(seq) is
            // committed, and later writes get a later clock.
            let tx = w.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            let seq = max_seq(&tx).map_err(db_err)?;
            let now = instant::to_millis(OffsetDateTime::now_utc());
            let time = now.max(stored_clock(&tx).map_err(db_err)?);
            store_clock(&tx, time).map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(Snapshot { id: format!("sqlite:{seq}"), time: instant::from_millis(time) })
        })
        .await
    }

    async fn count(&self, snapshot: &Snapshot, filter: &ScanFilter) -> Result<BTreeMap<String, u64>, StoreError> {
        let snap = parse_snapshot(snapshot)?;
        let (cond, args) = visible_where(snap, filter);
        self.with_reader(move |c| {
            let sql = format!("SELECT r.type, COUNT(*) FROM resource_version r WHERE {cond} GROUP BY r.type");
            let mut stmt = c.prepare(&sql).map_err(db_err)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(db_err)?;
            rows.collect::<Result<BTreeMap<_, _>, _>>().map_err(db_err)
        })
        .await
    }

    async fn read_at(&self, snapshot: &Snapshot, resource_type: &str, id: &str) -> Result<Option<String>, StoreError> {
        let snap = parse_snapshot(snapshot)?;
        let (rt, id) = (resource_type.to_string(), id.to_string());
        self.with_reader(move |c| {
            c.query_row(
                "SELECT json FROM resource_version r WHERE r.type=?2 AND r.id=?3 AND r.seq <= ?1 \
                 AND (r.superseded IS NULL OR r.superseded > ?1) AND r.deleted = 0",
                params![snap, rt, id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn read_as_of(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        let snap = parse_snapshot(snapshot)?;
        let (rt, id, at_ms) = (resource_type.to_string(), id.to_string(), instant::to_millis(at));
        self.with_reader(move |c| {
            // A resource's versions have increasing `seq`: the latest one written at or
            // before `at` (and visible in the snapshot) is the one current at `at`. Read
            // through the `(type, seq)` index backwards from the snapshot.
            let row: Option<(bool, Option<String>)> = c
                .query_row(
                    "SELECT deleted, json FROM resource_version r WHERE r.type=?2 AND r.id=?3 AND r.seq <= ?1 \
                     AND r.last_updated <= ?4 ORDER BY r.seq DESC LIMIT 1",
                    params![snap, rt, id, at_ms],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db_err)?;
            Ok(row.and_then(|(deleted, json)| if deleted { None } else { json }))
        })
        .await
    }

    async fn scan(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        filter: &ScanFilter,
        batch_bytes: usize,
        tx: mpsc::Sender<Batch>,
    ) -> Result<(), StoreError> {
        let snap = parse_snapshot(snapshot)?;
        let (cond, mut args) = visible_where(snap, filter);
        args.push(rusqlite::types::Value::Text(resource_type.to_string()));
        let sql = format!(
            "SELECT {} FROM resource_version r WHERE r.type = ?{} AND {cond} ORDER BY r.seq",
            line_sql(filter),
            args.len()
        );
        self.with_reader(move |c| {
            let mut stmt = c.prepare(&sql).map_err(db_err)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(args)).map_err(db_err)?;
            let mut batch = Batch::with_capacity(batch_bytes);
            while let Some(row) = rows.next().map_err(db_err)? {
                let json = row.get_ref(0).map_err(db_err)?.as_str().map_err(db_err)?;
                if let Some(full) = batch.push(json.as_bytes(), batch_bytes)
                    && tx.blocking_send(full).is_err()
                {
                    return Ok(()); // the reader stopped (cancelled)
                }
            }
            if batch.count > 0 {
                let _ = tx.blocking_send(batch);
            }
            Ok(())
        })
        .await
    }

    async fn compartment_patients(
        &self,
        snapshot: &Snapshot,
        types: &[String],
        filter: &ScanFilter,
        tx: mpsc::Sender<Vec<String>>,
    ) -> Result<(), StoreError> {
        use rusqlite::types::Value as V;
        let snap = parse_snapshot(snapshot)?;
        let window = ScanFilter { since: filter.since, until: filter.until, ..Default::default() };
        let (cond, mut args) = visible_where(snap, &window);
        args.push(V::Text(serde_json::to_string(types).expect("types serialise")));
        let mut sql = format!(
            "SELECT DISTINCT c.patient_id FROM compartment c JOIN resource_version r ON r.seq = c.seq \
             WHERE {cond} AND r.type IN (SELECT value FROM json_each(?{}))",
            args.len()
        );
        // Patient ids compare as bytes (BINARY), like the ids `split_points` returns.
        for (bound, op) in filter.id_range.iter().flat_map(|r| [(&r.from, ">="), (&r.to, "<")]) {
            if let Some(id) = bound {
                args.push(V::Text(id.clone()));
                sql.push_str(&format!(" AND c.patient_id {op} ?{}", args.len()));
            }
        }
        sql.push_str(" ORDER BY c.patient_id");
        self.with_reader(move |c| {
            let mut stmt = c.prepare(&sql).map_err(db_err)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(args)).map_err(db_err)?;
            let mut batch = Vec::with_capacity(sluice_store::PATIENT_BATCH);
            while let Some(row) = rows.next().map_err(db_err)? {
                batch.push(row.get::<_, String>(0).map_err(db_err)?);
                if batch.len() == sluice_store::PATIENT_BATCH
                    && tx
                        .blocking_send(std::mem::replace(&mut batch, Vec::with_capacity(sluice_store::PATIENT_BATCH)))
                        .is_err()
                {
                    return Ok(()); // the reader stopped (cancelled)
                }
            }
            if !batch.is_empty() {
                let _ = tx.blocking_send(batch);
            }
            Ok(())
        })
        .await
    }

    async fn split_points(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        parts: usize,
    ) -> Result<Vec<String>, StoreError> {
        parse_snapshot(snapshot)?;
        if parts < 2 {
            return Ok(Vec::new());
        }
        let rt = resource_type.to_string();
        self.with_reader(move |c| {
            // The type's current rows (tombstones included), through the covering
            // `resource_current (type, id)` index: two walks over ids, no resource read
            // (on 443k Observations, 20 ms; counting through the planner's own pick, the
            // `(type, seq)` index, reads every row: 130 ms). Rows written after the
            // snapshot shift the balance a little, never correctness.
            const CURRENT: &str = "FROM resource_version INDEXED BY resource_current \
                                   WHERE type = ?1 AND superseded IS NULL";
            let n: i64 =
                c.query_row(&format!("SELECT COUNT(*) {CURRENT}"), params![rt], |r| r.get(0)).map_err(db_err)?;
            let (n, parts) = (n as u64, parts as u64);
            // Boundary k is the id at position k * n / parts (0-based), k = 1..parts.
            let mut at = (1..parts).map(|k| k * n / parts).filter(|&i| i > 0).peekable();
            let mut stmt = c.prepare(&format!("SELECT id {CURRENT} ORDER BY id")).map_err(db_err)?;
            let mut rows = stmt.query(params![rt]).map_err(db_err)?;
            let mut points: Vec<String> = Vec::new();
            let mut i = 0u64;
            while let Some(&want) = at.peek() {
                let Some(row) = rows.next().map_err(db_err)? else { break };
                if i == want {
                    points.push(row.get(0).map_err(db_err)?);
                    while at.next_if(|&k| k <= i).is_some() {}
                }
                i += 1;
            }
            Ok(points)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_store::IdRange;

    async fn scan_ids(s: &SqliteStore, snap: &Snapshot, f: &ScanFilter) -> Vec<String> {
        let (tx, mut rx) = mpsc::channel(2);
        let (s2, snap2, f2) = (s.clone(), snap.clone(), f.clone());
        let h = tokio::spawn(async move { s2.scan(&snap2, "Observation", &f2, 64, tx).await });
        let mut ids = Vec::new();
        while let Some(b) = rx.recv().await {
            for l in b.lines() {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                ids.push(v["id"].as_str().unwrap().to_string());
            }
        }
        h.await.unwrap().unwrap();
        ids
    }

    /// `split_points` cuts a type's ids into about equal ranges; the id ranges between them
    /// partition what every scan and count of the snapshot selects.
    #[tokio::test]
    async fn id_ranges_partition_a_type() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("s.db")).unwrap();
        // Ids that sort differently by case, digits and punctuation.
        let ids: Vec<String> = (0..40).map(|i| format!("{}{i}", ["a", "B", "z.", "0-", "Z"][i % 5])).collect();
        for id in &ids {
            let r = json!({"resourceType":"Observation","id":id,"subject":{"reference":"Patient/p"}});
            s.put(sluice_store::prepare(&r.to_string(), None).unwrap()).await.unwrap();
        }
        s.delete("Observation", &ids[3]).await.unwrap();
        let snap = s.snapshot().await.unwrap();
        // Written after the snapshot: counted by neither the scans nor the counts.
        s.put(sluice_store::prepare(&json!({"resourceType":"Observation","id":"a-late"}).to_string(), None).unwrap())
            .await
            .unwrap();
        s.delete("Observation", &ids[4]).await.unwrap();

        assert!(s.split_points(&snap, "Observation", 1).await.unwrap().is_empty());
        assert!(s.split_points(&snap, "Patient", 4).await.unwrap().is_empty(), "no rows, no points");
        let points = s.split_points(&snap, "Observation", 4).await.unwrap();
        assert_eq!(points.len(), 3);
        assert!(points.windows(2).all(|w| w[0] < w[1]), "increasing: {points:?}");
        let all = ScanFilter::default();
        let mut whole = scan_ids(&s, &snap, &all).await;
        assert_eq!(whole.len(), 39);
        let mut parts = Vec::new();
        for range in IdRange::between(&points) {
            let f = ScanFilter { id_range: Some(range), ..Default::default() };
            let got = scan_ids(&s, &snap, &f).await;
            assert!((8..=12).contains(&got.len()), "about a quarter each: {}", got.len());
            assert_eq!(s.count(&snap, &f).await.unwrap().get("Observation").copied().unwrap_or(0), got.len() as u64);
            parts.extend(got);
        }
        whole.sort();
        parts.sort();
        assert_eq!(parts, whole, "every resource in exactly one range");
        // Deletions too (a tombstone is in the range of its id).
        let del = |range| ScanFilter { deleted: true, id_range: range, ..Default::default() };
        let mut deleted = 0;
        for r in IdRange::between(&points) {
            deleted += s.count(&snap, &del(Some(r))).await.unwrap().get("Observation").copied().unwrap_or(0);
        }
        assert_eq!(deleted, 1);
        // More parts than rows: distinct points only.
        let few = SqliteStore::open(dir.path().join("few.db")).unwrap();
        for id in ["b", "a"] {
            few.put(sluice_store::prepare(&json!({"resourceType":"Observation","id":id}).to_string(), None).unwrap())
                .await
                .unwrap();
        }
        let snap = few.snapshot().await.unwrap();
        assert_eq!(few.split_points(&snap, "Observation", 8).await.unwrap(), vec!["b".to_string()]);
    }
}
