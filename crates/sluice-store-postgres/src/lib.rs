//! The PostgreSQL store ([`ResourceWrites`], [`ExportReads`], plus the job records, configuration resources and authorization records), on deadpool-postgres + tokio-postgres.
//!
//! - `sluice_resource` holds the current version of every resource (tombstones included) with
//!   its JSON as `text`, exactly the bytes an export writes; older versions move to
//!   `sluice_resource_history`. Each resource records its (least) patient, indexed with its
//!   type; `sluice_compartment(patient_id, type, id)` holds every membership of the few
//!   resources that are in more than one patient's compartment. Together they index the
//!   Patient compartment of the current versions.
//! - Loads stream rows with binary `COPY` into a staging table and merge them in one
//!   transaction.
//! - A snapshot is a REPEATABLE READ transaction that exported its snapshot
//!   (`pg_export_snapshot`); it stays open, on a connection held by the store, until
//!   [`ExportReads::release`]. Every export part imports it (`SET TRANSACTION SNAPSHOT`) and
//!   streams `COPY (SELECT json ...) TO STDOUT (FORMAT binary)`: stored text is streamed,
//!   never converted from jsonb, never in COPY's text format.
//! - `lastUpdated` and `transactionTime` agree across servers: writers hold a shared
//!   advisory lock for their whole transaction; taking a snapshot takes it exclusively for a
//!   moment, so no write is in flight, and records the snapshot's time in `sluice_clock`.
//!   Later writes read it and stamp a strictly later time.
//! - The one-active-export rule is a unique partial index on `sluice_job(active)`.

mod auth;
mod config;
mod jobs;
mod schema;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::{StreamExt, pin_mut};
use sluice_fhir::{instant, valid_id};
use sluice_store::{
    Batch, CurrentRow, ExportReads, LoadMsg, LoadSummary, NewResource, Patients, ReadResult, ResourceWrites,
    ScanFilter, Snapshot, StoreError, WriteOp, Written, decide_write,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::Type;

/// The advisory lock key that orders writes against snapshots ("sluice" in ASCII).
const WRITE_LOCK: i64 = 0x736c_7569_6365;

/// Pool and timeout settings. deadpool waits forever by default; these never do.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections in the pool.
    pub pool_size: usize,
    /// How long a caller waits for a free connection.
    pub wait_timeout: Duration,
    /// How long opening a connection may take.
    pub create_timeout: Duration,
    /// How long checking a returned connection may take.
    pub recycle_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 16,
            wait_timeout: Duration::from_secs(30),
            create_timeout: Duration::from_secs(10),
            recycle_timeout: Duration::from_secs(5),
        }
    }
}

pub(crate) fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

/// A tokio-postgres error with the server's message, when there is one;
/// [`StoreError::ConnectionLost`] when the connection itself went away.
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let lost = connection_lost(&e);
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    if lost { StoreError::ConnectionLost(message) } else { StoreError::Database(message) }
}

/// Whether `e` says the connection is gone (closed, cut, or ended by the server: a
/// terminated backend, a shutdown, a connection exception), rather than that a statement
/// failed on a live connection.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN || code.code().starts_with("08")
        }
        // No server error: an I/O error on the socket is a lost connection.
        None => std::error::Error::source(e).is_some_and(|c| c.is::<std::io::Error>()),
    }
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    describe: String,
    /// Connections holding an open exporting transaction, by snapshot id.
    snapshots: Arc<Mutex<HashMap<String, Object>>>,
    /// Seals and opens the secret fields of configuration resources (D50).
    pub(crate) secrets: sluice_storage::Secrets,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("db", &self.describe).finish()
    }
}

/// `user@host:port/db` of a connection URL, without the password.
fn describe_url(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("PostgreSQL {}@{host}:{port}/{}", config.get_user().unwrap_or("?"), config.get_dbname().unwrap_or("?"))
}

/// Requests that found every pooled connection in use.
const POOL_WAITS: &str = "sluice_db_pool_waits_total";

impl PgStore {
    /// Connects (with a pool), creates or migrates the schema, and returns the store.
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| db_err(format!("not a PostgreSQL URL: {e}")))?;
        let describe = describe_url(&config);
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            // A connection always goes back to the pool outside any transaction, even when a
            // task holding it was cancelled mid-way.
            ManagerConfig { recycling_method: RecyclingMethod::Custom("ROLLBACK".into()) },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.create_timeout))
            .recycle_timeout(Some(options.recycle_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(db_err)?;
        let store = PgStore { pool, describe, snapshots: Default::default(), secrets: Default::default() };
        let mut client = store.client().await?;
        schema::migrate(&mut client).await?;
        Ok(store)
    }

    /// Seals the secret fields of configuration resources with `secrets` from now on
    /// (D50); see also [`PgStore::reseal_secrets`].
    pub fn with_secrets(mut self, secrets: sluice_storage::Secrets) -> Self {
        self.secrets = secrets;
        self
    }

    pub(crate) async fn client(&self) -> Result<Object, StoreError> {
        let status = self.pool.status();
        if status.available == 0 && status.size >= status.max_size {
            // Every connection is in use: this request waits for one.
            metrics::counter!(POOL_WAITS).increment(1);
        }
        self.pool.get().await.map_err(|e| db_err(format!("{}: {e}", self.describe)))
    }

    /// Sets the connection pool's gauges (`sluice_db_pool_*`) to its state now; call it
    /// before rendering the metrics.
    pub fn record_pool_metrics(&self) {
        let status = self.pool.status();
        metrics::gauge!("sluice_db_pool_max").set(status.max_size as f64);
        metrics::gauge!("sluice_db_pool_size").set(status.size as f64);
        metrics::gauge!("sluice_db_pool_in_use").set(status.size.saturating_sub(status.available) as f64);
        metrics::gauge!("sluice_db_pool_waiting").set(status.waiting as f64);
    }

    /// Describes the pool's metrics to the installed recorder.
    pub fn describe_metrics() {
        metrics::describe_gauge!("sluice_db_pool_max", "PostgreSQL connections the pool may open.");
        metrics::describe_gauge!("sluice_db_pool_size", "PostgreSQL connections open.");
        metrics::describe_gauge!("sluice_db_pool_in_use", "PostgreSQL connections in use.");
        metrics::describe_gauge!("sluice_db_pool_waiting", "Requests waiting for a PostgreSQL connection now.");
        metrics::describe_counter!(POOL_WAITS, "Requests that had to wait for a PostgreSQL connection (all in use).");
        metrics::counter!(POOL_WAITS).absolute(0);
    }
}

/// The current row of a resource.
struct Current {
    version: i64,
    last_updated: i64,
    deleted: bool,
    json: Option<String>,
    patient: Option<String>,
    /// In several compartments (the others in `sluice_compartment`).
    multi: bool,
}

/// Starts a write: the shared write lock, then a `lastUpdated` later than every snapshot.
async fn begin_write(tx: &tokio_postgres::Transaction<'_>) -> Result<i64, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&WRITE_LOCK]).await.map_err(pg_err)?;
    let row = tx
        .query_one(
            "SELECT GREATEST((extract(epoch FROM clock_timestamp()) * 1000)::bigint, snapshot_ms + 1) FROM sluice_clock",
            &[],
        )
        .await
        .map_err(pg_err)?;
    Ok(row.get(0))
}

/// Writes one version (a tombstone when `resource` is `None`) in a write transaction.
async fn write_one(
    tx: &tokio_postgres::Transaction<'_>,
    ts_ms: i64,
    rt: &str,
    id: &str,
    resource: Option<NewResource>,
) -> Result<Option<Written>, StoreError> {
    let cur = tx
        .query_opt(
            "SELECT version, last_updated, deleted, json, patient, multi FROM sluice_resource \
             WHERE type = $1 AND id = $2 FOR UPDATE",
            &[&rt, &id],
        )
        .await
        .map_err(pg_err)?
        .map(|r| Current {
            version: r.get(0),
            last_updated: r.get(1),
            deleted: r.get(2),
            json: r.get(3),
            patient: r.get(4),
            multi: r.get(5),
        });
    let is_delete = resource.is_none();
    let row = cur.as_ref().map(|c| CurrentRow::of(c.version, c.last_updated, c.deleted, c.json.as_deref()));
    let (version, created) = match decide_write(row, resource.as_ref()).new_version() {
        Ok(new) => new,
        Err(answer) => return Ok(answer),
    };
    let last_updated = instant::from_millis(ts_ms);
    if cur.is_some() {
        tx.execute(
            "INSERT INTO sluice_resource_history SELECT type, id, version, last_updated, deleted, json \
             FROM sluice_resource WHERE type = $1 AND id = $2",
            &[&rt, &id],
        )
        .await
        .map_err(pg_err)?;
        if !is_delete {
            tx.execute("DELETE FROM sluice_compartment WHERE type = $1 AND id = $2", &[&rt, &id])
                .await
                .map_err(pg_err)?;
        }
    }
    let (json, patients) = match resource {
        Some(r) => (Some(r.render(version as u64, last_updated)), r.patients),
        None => (None, Vec::new()),
    };
    // A tombstone keeps its resource's compartments (its least patient, and the others in
    // `sluice_compartment`), so `_since` exports of any of those patients or their groups
    // list the deletion.
    let kept = cur.as_ref().and_then(|c| c.patient.clone());
    let kept_multi = cur.as_ref().is_some_and(|c| c.multi);
    let (patient, multi) = if is_delete { (kept.as_ref(), kept_multi) } else { (patients.first(), patients.len() > 1) };
    tx.execute(
        "INSERT INTO sluice_resource (type, id, version, last_updated, deleted, json, patient, multi) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (type, id) DO UPDATE SET version = EXCLUDED.version, last_updated = EXCLUDED.last_updated, \
         deleted = EXCLUDED.deleted, json = EXCLUDED.json, patient = EXCLUDED.patient, multi = EXCLUDED.multi",
        &[&rt, &id, &version, &ts_ms, &is_delete, &json, &patient, &multi],
    )
    .await
    .map_err(pg_err)?;
    if multi && !is_delete {
        tx.execute(
            "INSERT INTO sluice_compartment (patient_id, type, id) SELECT DISTINCT unnest($1::text[]), $2, $3",
            &[&patients, &rt, &id],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(Some(Written::new_version(rt, id, version, last_updated, created, json)))
}

/// A SQL string literal. Only used for values already checked (type names, FHIR ids), and
/// escaped all the same.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The conditions on `sluice_resource r` for the time window of a filter.
fn time_conditions(filter: &ScanFilter) -> String {
    let mut sql = format!("r.deleted = {}", filter.deleted);
    if let Some(since) = filter.since {
        sql.push_str(&format!(" AND r.last_updated > {}", instant::to_millis(since)));
    }
    if let Some(until) = filter.until {
        sql.push_str(&format!(" AND r.last_updated <= {}", instant::to_millis(until)));
    }
    sql
}

/// A query over the resources a filter selects, of the given types (all types when none
/// is given), selecting `what` (columns of `sluice_resource r`), with literals inlined
/// (`COPY` takes no parameters; only checked type names and FHIR ids are inlined, escaped
/// all the same).
///
/// Listed patients are read through the `(patient, type)` index, so a small group reads
/// its own rows (which a load writes close together), not the whole table.
fn select_sql(types: &[&str], filter: &ScanFilter, what: &str) -> Result<String, StoreError> {
    if let Some(t) = types.iter().find(|t| !sluice_fhir::is_r4_resource_type(t)) {
        return Err(db_err(format!("'{t}' is not a resource type")));
    }
    let listed: Vec<String> = types.iter().map(|t| lit(t)).collect();
    let rtype = |col: &str| match listed.as_slice() {
        [] => String::new(),
        [one] => format!(" AND {col} = {one}"),
        many => format!(" AND {col} IN ({})", many.join(",")),
    };
    let mut window = time_conditions(filter);
    // An id range (one of several parts reading a large type), in the column's collation,
    // as `split_points` picked its bounds. The bounds are inlined: only valid FHIR ids.
    for (bound, op) in filter.id_range.iter().flat_map(|r| [(&r.from, ">="), (&r.to, "<")]) {
        if let Some(id) = bound {
            if !valid_id(id) {
                return Err(db_err(format!("'{id}' is not a valid id range bound")));
            }
            window.push_str(&format!(" AND r.id {op} {}", lit(id)));
        }
    }
    // Listed ids (from `_typeFilter`), inlined the same way: only valid FHIR ids, as no other
    // id can exist; none left selects nothing. With the type, a short list is read through the
    // primary key; a long one (PostgreSQL hashes an `IN` list) filters the type's rows.
    if let Some(ids) = &filter.ids {
        let list: Vec<String> = ids.iter().filter(|i| valid_id(i)).map(|i| lit(i)).collect();
        if list.is_empty() {
            window.push_str(" AND false");
        } else {
            window.push_str(&format!(" AND r.id IN ({})", list.join(",")));
        }
    }
    Ok(match &filter.patients {
        None => format!("SELECT {what} FROM sluice_resource r WHERE {window}{}", rtype("r.type")),
        // A resource is in some compartment exactly when it has a (least) patient.
        Some(Patients::Any) => {
            format!("SELECT {what} FROM sluice_resource r WHERE {window}{} AND r.patient IS NOT NULL", rtype("r.type"))
        }
        Some(Patients::Only(ids)) => {
            let list: Vec<String> = ids.iter().filter(|i| valid_id(i)).map(|i| lit(i)).collect();
            let list = if list.is_empty() { "NULL".to_string() } else { list.join(",") };
            let rt = rtype("r.type");
            // Resources whose (least) patient is listed, read through the (patient, type)
            // index; plus the few in several compartments whose least patient is not listed.
            format!(
                "SELECT {what} FROM sluice_resource r WHERE {window}{rt} AND r.patient IN ({list}) \
                 UNION ALL \
                 SELECT {what} FROM sluice_resource r WHERE {window}{rt} AND r.multi AND r.patient NOT IN ({list}) \
                 AND EXISTS (SELECT 1 FROM sluice_compartment c WHERE c.type = r.type AND c.id = r.id \
                 AND c.patient_id IN ({list}))"
            )
        }
    })
}

/// Streams what `filter` selects of `resource_type` (in `client`'s transaction) into `tx`
/// as batches of about `batch_bytes`, each wrapped by `wrap`. `Ok(false)` when the receiver
/// is gone (the reader stopped).
async fn copy_batches<T>(
    client: &Object,
    resource_type: &str,
    filter: &ScanFilter,
    batch_bytes: usize,
    tx: &mpsc::Sender<T>,
    wrap: impl Fn(Batch) -> T,
) -> Result<bool, StoreError> {
    let what = if filter.deleted {
        let (pre, post) = sluice_store::DELETED_LINE;
        format!("'{pre}' || r.type || '/' || r.id || '{post}' AS json")
    } else {
        "r.json".to_string()
    };
    let sql = format!("COPY ({}) TO STDOUT (FORMAT binary)", select_sql(&[resource_type], filter, &what)?);
    let stream = client.copy_out(&sql).await.map_err(pg_err)?;
    let rows = BinaryCopyOutStream::new(stream, &[Type::TEXT]);
    pin_mut!(rows);
    let mut batch = Batch::with_capacity(batch_bytes);
    while let Some(row) = rows.next().await {
        let row = row.map_err(pg_err)?;
        let json: &str = row.try_get(0).map_err(pg_err)?;
        if let Some(full) = batch.push(json.as_bytes(), batch_bytes)
            && tx.send(wrap(full)).await.is_err()
        {
            return Ok(false);
        }
    }
    if batch.count > 0 && tx.send(wrap(batch)).await.is_err() {
        return Ok(false);
    }
    Ok(true)
}

/// Streams what `filter` selects of several types in one query, the rows of each type
/// together and the types in the order of `sources` (`(tag, type)`, types distinct), into
/// `tx` as batches of one type each, tagged. `Ok(false)` when the receiver is gone.
async fn copy_types(
    client: &Object,
    sources: &[(usize, &str)],
    filter: &ScanFilter,
    batch_bytes: usize,
    tx: &mpsc::Sender<(usize, Batch)>,
) -> Result<bool, StoreError> {
    let types: Vec<&str> = sources.iter().map(|(_, t)| *t).collect();
    let order: Vec<String> = types.iter().map(|t| lit(t)).collect();
    let sql = format!(
        "COPY (SELECT q.type, q.json FROM ({}) q ORDER BY array_position(ARRAY[{}]::text[], q.type::text)) \
         TO STDOUT (FORMAT binary)",
        select_sql(&types, filter, "r.type, r.json")?,
        order.join(",")
    );
    let stream = client.copy_out(&sql).await.map_err(pg_err)?;
    let rows = BinaryCopyOutStream::new(stream, &[Type::TEXT, Type::TEXT]);
    pin_mut!(rows);
    let mut batch = Batch::with_capacity(batch_bytes);
    let mut tag: Option<usize> = None;
    while let Some(row) = rows.next().await {
        let row = row.map_err(pg_err)?;
        let (t, json): (&str, &str) = (row.try_get(0).map_err(pg_err)?, row.try_get(1).map_err(pg_err)?);
        let row_tag = sources.iter().find(|(_, st)| *st == t).map(|(i, _)| *i);
        let row_tag = row_tag.ok_or_else(|| db_err(format!("a row of type {t} nobody asked for")))?;
        if tag.is_some_and(|cur| cur != row_tag) && batch.count > 0 {
            let full = std::mem::replace(&mut batch, Batch::with_capacity(batch_bytes));
            if tx.send((tag.expect("checked"), full)).await.is_err() {
                return Ok(false);
            }
        }
        tag = Some(row_tag);
        if let Some(full) = batch.push(json.as_bytes(), batch_bytes)
            && tx.send((row_tag, full)).await.is_err()
        {
            return Ok(false);
        }
    }
    if let Some(t) = tag
        && batch.count > 0
        && tx.send((t, batch)).await.is_err()
    {
        return Ok(false);
    }
    Ok(true)
}

fn snapshot_name(s: &Snapshot) -> Result<&str, StoreError> {
    s.id.strip_prefix("pg:")
        .filter(|n| n.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .ok_or_else(|| StoreError::BadSnapshot(s.id.clone()))
}

impl PgStore {
    /// A connection in a read-only transaction that imported `snapshot`. A snapshot that
    /// cannot be imported (released, or its exporting transaction's connection died) is
    /// [`StoreError::BadSnapshot`]; a connection lost while importing it is
    /// [`StoreError::ConnectionLost`].
    async fn in_snapshot(&self, snapshot: &Snapshot) -> Result<Object, StoreError> {
        let name = snapshot_name(snapshot)?;
        let client = self.client().await?;
        let imported = client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                lit(name)
            ))
            .await
            .map_err(|e| match pg_err(e) {
                // This connection went away, not the snapshot: another may import it.
                lost @ StoreError::ConnectionLost(_) => lost,
                e => {
                    tracing::warn!(error = %e, snapshot = %snapshot.id, "importing a snapshot failed");
                    StoreError::BadSnapshot(snapshot.id.clone())
                }
            });
        if let Err(e) = imported {
            Self::end(&client).await;
            return Err(e);
        }
        Ok(client)
    }

    async fn end(client: &Object) {
        let _ = client.batch_execute("ROLLBACK").await;
    }
}

/// Rows of one load batch after lookup: what to write.
struct Staged {
    rows: Vec<(String, String, i64, String, Vec<String>)>,
    replaced: Vec<(String, String)>,
}

#[async_trait]
impl ResourceWrites for PgStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn put(&self, resource: NewResource) -> Result<Written, StoreError> {
        let (rt, id) = (resource.resource_type.clone(), resource.id.clone());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let ts = begin_write(&tx).await?;
        let w = write_one(&tx, ts, &rt, &id, Some(resource)).await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(w.expect("a put always writes"))
    }

    async fn delete(&self, resource_type: &str, id: &str) -> Result<Option<Written>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let ts = begin_write(&tx).await?;
        let w = write_one(&tx, ts, resource_type, id, None).await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(w)
    }

    async fn transaction(&self, ops: Vec<WriteOp>) -> Result<Vec<Option<Written>>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let ts = begin_write(&tx).await?;
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(match op {
                WriteOp::Put(r) => {
                    let (rt, id) = (r.resource_type.clone(), r.id.clone());
                    write_one(&tx, ts, &rt, &id, Some(r)).await?
                }
                WriteOp::Delete { resource_type, id } => write_one(&tx, ts, &resource_type, &id, None).await?,
            });
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(out)
    }

    async fn load(&self, mut input: mpsc::Receiver<LoadMsg>) -> Result<LoadSummary, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let ts = begin_write(&tx).await?;
        tx.batch_execute(
            "CREATE TEMP TABLE sluice_load (type text NOT NULL, id text NOT NULL, version bigint NOT NULL, \
             json text NOT NULL, patients text[] NOT NULL) ON COMMIT DROP",
        )
        .await
        .map_err(pg_err)?;
        // A store that held no resource when the load began: a key this load has not
        // written cannot exist yet, so only keys the filter may have seen are looked up.
        let empty: bool =
            tx.query_one("SELECT NOT EXISTS (SELECT 1 FROM sluice_resource)", &[]).await.map_err(pg_err)?.get(0);
        let mut written = empty.then(KeyFilter::new);
        let mut summary = LoadSummary::default();
        loop {
            let batch = match input.recv().await {
                Some(LoadMsg::Batch(b)) => b,
                Some(LoadMsg::Commit) => break,
                Some(LoadMsg::Abort(why)) => return Err(StoreError::LoadAborted(why)),
                None => return Err(StoreError::LoadAborted("the input ended before it was complete".into())),
            };
            // A resource may come twice in one batch: each run of distinct ids is merged on its own.
            let mut run: Vec<NewResource> = Vec::with_capacity(batch.len());
            let mut seen: HashSet<(String, String)> = HashSet::new();
            for r in batch {
                if !seen.insert((r.resource_type.clone(), r.id.clone())) {
                    merge_run(&tx, ts, std::mem::take(&mut run), &mut summary, written.as_mut()).await?;
                    seen.clear();
                    seen.insert((r.resource_type.clone(), r.id.clone()));
                }
                run.push(r);
            }
            merge_run(&tx, ts, run, &mut summary, written.as_mut()).await?;
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(summary)
    }
}

#[async_trait]
impl ExportReads for PgStore {
    async fn read(&self, resource_type: &str, id: &str) -> Result<ReadResult, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT version, deleted, json FROM sluice_resource WHERE type = $1 AND id = $2",
                &[&resource_type, &id],
            )
            .await
            .map_err(pg_err)?;
        Ok(match row {
            None => ReadResult::NotFound,
            Some(r) if r.get::<_, bool>(1) => ReadResult::Deleted(r.get::<_, i64>(0) as u64),
            Some(r) => ReadResult::Found(r.get::<_, Option<String>>(2).unwrap_or_default()),
        })
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // 1. Stop writers for a moment: no write transaction is in flight after this.
        let mut gate = self.client().await?;
        let gate_tx = gate.transaction().await.map_err(pg_err)?;
        gate_tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK]).await.map_err(pg_err)?;
        // 2. The exporting transaction: its snapshot sees every committed write.
        let holder = self.client().await?;
        holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.map_err(pg_err)?;
        let row = holder
            .query_one("SELECT pg_export_snapshot(), (extract(epoch FROM clock_timestamp()) * 1000)::bigint", &[])
            .await;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                Self::end(&holder).await;
                return Err(pg_err(e));
            }
        };
        let name: String = row.get(0);
        let now: i64 = row.get(1);
        // 3. The snapshot's time; writes after it read this and stamp a later time.
        let time: i64 = gate_tx
            .query_one(
                "UPDATE sluice_clock SET snapshot_ms = GREATEST(snapshot_ms + 1, $1) RETURNING snapshot_ms",
                &[&now],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        gate_tx.commit().await.map_err(pg_err)?;
        let id = format!("pg:{name}");
        self.snapshots.lock().expect("snapshot map").insert(id.clone(), holder);
        Ok(Snapshot { id, time: instant::from_millis(time) })
    }

    async fn release(&self, snapshot: &Snapshot) {
        let holder = self.snapshots.lock().expect("snapshot map").remove(&snapshot.id);
        if let Some(client) = holder {
            Self::end(&client).await;
        }
    }

    async fn can_resume(&self, snapshot: &Snapshot) -> bool {
        self.snapshots.lock().expect("snapshot map").contains_key(&snapshot.id)
    }

    async fn count(&self, snapshot: &Snapshot, filter: &ScanFilter) -> Result<BTreeMap<String, u64>, StoreError> {
        let client = self.in_snapshot(snapshot).await?;
        let sql = format!("SELECT type, count(*) FROM ({}) x GROUP BY type", select_sql(&[], filter, "r.type")?);
        let rows = client.query(&sql, &[]).await.map_err(pg_err);
        Self::end(&client).await;
        Ok(rows?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .filter(|(t, n)| *n > 0 && sluice_fhir::is_r4_resource_type(t))
            .collect())
    }

    async fn read_at(&self, snapshot: &Snapshot, resource_type: &str, id: &str) -> Result<Option<String>, StoreError> {
        let client = self.in_snapshot(snapshot).await?;
        let row = client
            .query_opt(
                "SELECT json FROM sluice_resource WHERE type = $1 AND id = $2 AND NOT deleted",
                &[&resource_type, &id],
            )
            .await
            .map_err(pg_err);
        Self::end(&client).await;
        Ok(row?.map(|r| r.get(0)))
    }

    async fn read_as_of(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        id: &str,
        at: time::OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        let client = self.in_snapshot(snapshot).await?;
        // The current row and the older versions moved to history: the latest version
        // last updated at or before `at` is the one current then. Versions of one resource
        // are written one after another (`FOR UPDATE`), so the highest version wins even if
        // two servers' clocks disagreed.
        let row = client
            .query_opt(
                "SELECT deleted, json FROM ( \
                   SELECT version, deleted, json FROM sluice_resource \
                    WHERE type = $1 AND id = $2 AND last_updated <= $3 \
                   UNION ALL \
                   SELECT version, deleted, json FROM sluice_resource_history \
                    WHERE type = $1 AND id = $2 AND last_updated <= $3 \
                 ) v ORDER BY version DESC LIMIT 1",
                &[&resource_type, &id, &instant::to_millis(at)],
            )
            .await
            .map_err(pg_err);
        Self::end(&client).await;
        Ok(row?.and_then(|r| if r.get::<_, bool>(0) { None } else { r.get(1) }))
    }

    async fn scan(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        filter: &ScanFilter,
        batch_bytes: usize,
        tx: mpsc::Sender<Batch>,
    ) -> Result<(), StoreError> {
        let client = self.in_snapshot(snapshot).await?;
        let result = copy_batches(&client, resource_type, filter, batch_bytes, &tx, |b| b).await;
        Self::end(&client).await;
        result.map(drop)
    }

    /// Every source over one connection that imported the snapshot once: a patient block
    /// reads a dozen small scans, where a connection and a snapshot import each would cost
    /// more than the rows.
    async fn scan_many(
        &self,
        snapshot: &Snapshot,
        sources: &[(String, ScanFilter)],
        batch_bytes: usize,
        tx: mpsc::Sender<(usize, Batch)>,
    ) -> Result<(), StoreError> {
        let client = self.in_snapshot(snapshot).await?;
        let result = async {
            // Consecutive sources of distinct types through the same filter (a patient's
            // block) are one query; the rest one query each.
            let mut i = 0;
            while i < sources.len() {
                let filter = &sources[i].1;
                let mut group: Vec<(usize, &str)> = vec![(i, sources[i].0.as_str())];
                while let Some((t, f)) = sources.get(i + group.len())
                    && f == filter
                    && !filter.deleted
                    && group.iter().all(|(_, g)| g != t)
                {
                    group.push((i + group.len(), t.as_str()));
                }
                let open = match group.as_slice() {
                    [(tag, t)] => copy_batches(&client, t, filter, batch_bytes, &tx, |b| (*tag, b)).await?,
                    _ => copy_types(&client, &group, filter, batch_bytes, &tx).await?,
                };
                if !open {
                    break; // the reader stopped (cancelled)
                }
                i += group.len();
            }
            Ok(())
        }
        .await;
        Self::end(&client).await;
        result
    }

    async fn compartment_patients(
        &self,
        snapshot: &Snapshot,
        types: &[String],
        filter: &ScanFilter,
        tx: mpsc::Sender<Vec<String>>,
    ) -> Result<(), StoreError> {
        if let Some(t) = types.iter().find(|t| !sluice_fhir::is_r4_resource_type(t)) {
            return Err(db_err(format!("'{t}' is not a resource type")));
        }
        if types.is_empty() {
            return Ok(());
        }
        let window = time_conditions(&ScanFilter { since: filter.since, until: filter.until, ..Default::default() });
        let listed: Vec<String> = types.iter().map(|t| lit(t)).collect();
        let listed = listed.join(",");
        let mut bounds = String::new();
        for (bound, op) in filter.id_range.iter().flat_map(|r| [(&r.from, ">="), (&r.to, "<")]) {
            if let Some(id) = bound {
                if !valid_id(id) {
                    return Err(db_err(format!("'{id}' is not a valid id range bound")));
                }
                bounds.push_str(&format!(" AND p {op} {}", lit(id)));
            }
        }
        // Each resource's least patient (indexed), plus the other patients of the few
        // resources in several compartments.
        let sql = format!(
            "COPY (SELECT DISTINCT p FROM (\
             SELECT r.patient AS p FROM sluice_resource r \
             WHERE {window} AND r.type IN ({listed}) AND r.patient IS NOT NULL \
             UNION ALL \
             SELECT c.patient_id FROM sluice_compartment c JOIN sluice_resource r ON r.type = c.type AND r.id = c.id \
             WHERE {window} AND r.multi AND r.type IN ({listed})) x WHERE true{bounds} ORDER BY p) \
             TO STDOUT (FORMAT binary)"
        );
        let client = self.in_snapshot(snapshot).await?;
        let result = async {
            let stream = client.copy_out(&sql).await.map_err(pg_err)?;
            let rows = BinaryCopyOutStream::new(stream, &[Type::TEXT]);
            pin_mut!(rows);
            let mut batch = Vec::with_capacity(sluice_store::PATIENT_BATCH);
            while let Some(row) = rows.next().await {
                batch.push(row.map_err(pg_err)?.try_get::<String>(0).map_err(pg_err)?);
                if batch.len() == sluice_store::PATIENT_BATCH
                    && tx
                        .send(std::mem::replace(&mut batch, Vec::with_capacity(sluice_store::PATIENT_BATCH)))
                        .await
                        .is_err()
                {
                    return Ok(());
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(batch).await;
            }
            Ok(())
        }
        .await;
        Self::end(&client).await;
        result
    }

    async fn split_points(
        &self,
        snapshot: &Snapshot,
        resource_type: &str,
        parts: usize,
    ) -> Result<Vec<String>, StoreError> {
        if parts < 2 {
            return Ok(Vec::new());
        }
        let fractions: Vec<f64> = (1..parts).map(|k| k as f64 / parts as f64).collect();
        let client = self.in_snapshot(snapshot).await?;
        // Quantiles of the type's ids (tombstones included), in the column's collation, so
        // the `r.id >= / <` bounds of `select_sql` cut exactly there. First from a 1% sample
        // of the table's pages (a few ms whatever the table's size or vacuum state); when the
        // sample holds too few of the type's rows, from all of them (every id read and
        // sorted; only types under about 100k rows get there). On 443k Observations: 4-9 ms
        // sampled, against 90-400 ms for an exact percentile_disc and 25-330 ms per OFFSET
        // boundary (index-only once vacuumed, heap fetches right after a load).
        const SAMPLE_MIN: i64 = 1000;
        let quantiles = |from: &str| {
            format!(
                "SELECT count(*), percentile_disc($2::float8[]) WITHIN GROUP (ORDER BY id) FROM {from} WHERE type = $1"
            )
        };
        let result = async {
            let sampled = quantiles("sluice_resource TABLESAMPLE SYSTEM (1) REPEATABLE (0)");
            let row = client.query_one(&sampled, &[&resource_type, &fractions]).await.map_err(pg_err)?;
            if row.get::<_, i64>(0) >= SAMPLE_MIN {
                return Ok(row.get::<_, Option<Vec<String>>>(1));
            }
            let row = client.query_one(&quantiles("sluice_resource"), &[&resource_type, &fractions]).await;
            Ok(row.map_err(pg_err)?.get::<_, Option<Vec<String>>>(1))
        }
        .await;
        Self::end(&client).await;
        // Quantiles only increase; of few rows several can be the same id.
        let mut points = result?.unwrap_or_default();
        points.dedup();
        Ok(points)
    }
}

/// The (type, id) keys a load has written, as a Bloom filter of fixed size: "maybe" or
/// "certainly not". Memory stays at [`KeyFilter::BYTES`] whatever the load's size; past
/// tens of millions of keys it answers "maybe" more often, which costs lookups, never
/// correctness.
struct KeyFilter {
    bits: Vec<u64>,
    hasher: std::collections::hash_map::RandomState,
}

impl KeyFilter {
    const BYTES: usize = 4 << 20;
    const HASHES: u64 = 4;

    fn new() -> Self {
        KeyFilter { bits: vec![0; Self::BYTES / 8], hasher: Default::default() }
    }

    /// The bit positions of a key (double hashing).
    fn positions(&self, resource_type: &str, id: &str) -> impl Iterator<Item = usize> + use<> {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one((resource_type, id));
        let (h1, h2) = (h, h.rotate_left(32) | 1);
        let m = (self.bits.len() * 64) as u64;
        (0..Self::HASHES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % m) as usize)
    }

    fn insert(&mut self, resource_type: &str, id: &str) {
        // The positions borrow nothing of `self` (`use<>`), so no buffer is needed.
        for p in self.positions(resource_type, id) {
            self.bits[p / 64] |= 1 << (p % 64);
        }
    }

    fn may_contain(&self, resource_type: &str, id: &str) -> bool {
        self.positions(resource_type, id).all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }
}

/// Merges resources with distinct (type, id) into the store inside a load transaction:
/// looks up current versions, stamps `meta`, streams rows with binary COPY into the staging
/// table, then moves replaced rows to history and upserts.
async fn merge_run(
    tx: &tokio_postgres::Transaction<'_>,
    ts_ms: i64,
    run: Vec<NewResource>,
    summary: &mut LoadSummary,
    seen: Option<&mut KeyFilter>,
) -> Result<(), StoreError> {
    if run.is_empty() {
        return Ok(());
    }
    let existing = existing_rows(tx, &run, seen).await?;
    let staged = stage(run, &existing, ts_ms, summary);
    if staged.rows.is_empty() {
        return Ok(());
    }
    if staged.replaced.is_empty() {
        return copy_new(tx, ts_ms, &staged.rows).await;
    }
    replace_staged(tx, ts_ms, &staged).await
}

/// The current rows of the resources of `run` that may exist already (all of them, or those
/// the `seen` filter of earlier runs of this load may hold), by `(type, id)`. Adds the run's
/// keys to `seen`.
async fn existing_rows(
    tx: &tokio_postgres::Transaction<'_>,
    run: &[NewResource],
    seen: Option<&mut KeyFilter>,
) -> Result<HashMap<(String, String), Current>, StoreError> {
    let (mut types, mut ids): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for r in run {
        let maybe_there = match &seen {
            Some(filter) => filter.may_contain(&r.resource_type, &r.id),
            None => true,
        };
        if maybe_there {
            types.push(&r.resource_type);
            ids.push(&r.id);
        }
    }
    if let Some(filter) = seen {
        run.iter().for_each(|r| filter.insert(&r.resource_type, &r.id));
    }
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(tx
        .query(
            "SELECT r.type, r.id, r.version, r.last_updated, r.deleted, r.json FROM sluice_resource r \
             JOIN unnest($1::text[], $2::text[]) AS k(type, id) ON r.type = k.type AND r.id = k.id",
            &[&types, &ids],
        )
        .await
        .map_err(pg_err)?
        .into_iter()
        .map(|r| {
            let key = (r.get::<_, String>(0), r.get::<_, String>(1));
            (
                key,
                Current {
                    version: r.get(2),
                    last_updated: r.get(3),
                    deleted: r.get(4),
                    json: r.get(5),
                    patient: None,
                    multi: false,
                },
            )
        })
        .collect())
}

/// The rows a run writes: each resource rendered with its new version, except those equal
/// to their current version (counted as unchanged); replaced keys are listed apart.
fn stage(
    run: Vec<NewResource>,
    existing: &HashMap<(String, String), Current>,
    ts_ms: i64,
    summary: &mut LoadSummary,
) -> Staged {
    let last_updated = instant::from_millis(ts_ms);
    let mut staged = Staged { rows: Vec::with_capacity(run.len()), replaced: Vec::new() };
    for r in run {
        let key = (r.resource_type.clone(), r.id.clone());
        *summary.per_type.entry(r.resource_type.clone()).or_default() += 1;
        let version = match existing.get(&key) {
            None => 1,
            Some(c) => {
                if let Some(old) = c.json.as_deref().filter(|_| !c.deleted)
                    && r.unchanged_from(old, c.version as u64, instant::from_millis(c.last_updated)).is_some()
                {
                    summary.unchanged += 1;
                    continue;
                }
                if !c.deleted {
                    summary.updated += 1;
                }
                staged.replaced.push(key.clone());
                c.version + 1
            }
        };
        let json = r.render(version as u64, last_updated);
        staged.rows.push((key.0, key.1, version, json, r.patients));
    }
    staged
}

/// Writes staged rows some of which replace existing resources: through the `sluice_load`
/// staging table, moving the versions they replace to the history.
async fn replace_staged(tx: &tokio_postgres::Transaction<'_>, ts_ms: i64, staged: &Staged) -> Result<(), StoreError> {
    tx.batch_execute("TRUNCATE sluice_load").await.map_err(pg_err)?;
    let sink = tx
        .copy_in("COPY sluice_load (type, id, version, json, patients) FROM STDIN (FORMAT binary)")
        .await
        .map_err(pg_err)?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::TEXT, Type::INT8, Type::TEXT, Type::TEXT_ARRAY]);
    pin_mut!(writer);
    for (t, id, v, json, patients) in &staged.rows {
        writer.as_mut().write(&[t, id, v, json, patients]).await.map_err(pg_err)?;
    }
    writer.finish().await.map_err(pg_err)?;
    tx.batch_execute(
        "INSERT INTO sluice_resource_history SELECT r.type, r.id, r.version, r.last_updated, r.deleted, r.json \
         FROM sluice_resource r JOIN sluice_load l ON r.type = l.type AND r.id = l.id; \
         DELETE FROM sluice_compartment c USING sluice_load l WHERE c.type = l.type AND c.id = l.id;",
    )
    .await
    .map_err(pg_err)?;
    tx.execute(
        "INSERT INTO sluice_resource (type, id, version, last_updated, deleted, json, patient, multi) \
         SELECT type, id, version, $1, false, json, patients[1], cardinality(patients) > 1 FROM sluice_load \
         ON CONFLICT (type, id) DO UPDATE SET version = EXCLUDED.version, last_updated = EXCLUDED.last_updated, \
         deleted = false, json = EXCLUDED.json, patient = EXCLUDED.patient, multi = EXCLUDED.multi",
        &[&ts_ms],
    )
    .await
    .map_err(pg_err)?;
    tx.batch_execute(
        "INSERT INTO sluice_compartment (patient_id, type, id) \
         SELECT DISTINCT p, l.type, l.id FROM sluice_load l, unnest(l.patients) AS p WHERE cardinality(l.patients) > 1",
    )
    .await
    .map_err(pg_err)
}

/// Resources none of which exist yet (the common case of a first load): streamed with
/// binary COPY straight into their tables, without the staging table.
async fn copy_new(
    tx: &tokio_postgres::Transaction<'_>,
    ts_ms: i64,
    rows: &[(String, String, i64, String, Vec<String>)],
) -> Result<(), StoreError> {
    let mut data = CopyRows::new(rows.iter().map(|r| r.3.len() + 128).sum());
    for (t, id, v, json, patients) in rows {
        data.row(8);
        data.text(Some(t));
        data.text(Some(id));
        data.int8(*v);
        data.int8(ts_ms);
        data.bool(false);
        data.text(Some(json));
        data.text(patients.first().map(String::as_str));
        data.bool(patients.len() > 1);
    }
    copy_in(tx, "COPY sluice_resource (type, id, version, last_updated, deleted, json, patient, multi)", data).await?;
    let mut data = CopyRows::new(0);
    for (t, id, _, _, patients) in rows.iter().filter(|r| r.4.len() > 1) {
        let mut seen: Vec<&String> = Vec::with_capacity(patients.len());
        for p in patients {
            if !seen.contains(&p) {
                seen.push(p);
                data.row(3);
                data.text(Some(p));
                data.text(Some(t));
                data.text(Some(id));
            }
        }
    }
    copy_in(tx, "COPY sluice_compartment (patient_id, type, id)", data).await
}

/// Sends `data` to `COPY <target> FROM STDIN (FORMAT binary)` as one message.
async fn copy_in(tx: &tokio_postgres::Transaction<'_>, target: &str, data: CopyRows) -> Result<(), StoreError> {
    use futures_util::SinkExt;
    let sink = tx.copy_in::<_, Bytes>(&format!("{target} FROM STDIN (FORMAT binary)")).await.map_err(pg_err)?;
    pin_mut!(sink);
    sink.send(data.finish()).await.map_err(pg_err)?;
    sink.finish().await.map_err(pg_err)?;
    Ok(())
}

/// Rows in PostgreSQL's binary `COPY` format, framed here so that a whole batch goes to the
/// server as one message: writing row by row through a sink costs a wake-up of the
/// connection task every few kilobytes, which was a tenth of a load's CPU time.
struct CopyRows {
    buf: BytesMut,
}

impl CopyRows {
    fn new(capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity + 32);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        CopyRows { buf }
    }

    fn row(&mut self, fields: i16) {
        self.buf.put_i16(fields);
    }

    fn text(&mut self, value: Option<&str>) {
        match value {
            Some(v) => {
                self.buf.put_i32(i32::try_from(v.len()).expect("a field under 2 GiB"));
                self.buf.put_slice(v.as_bytes());
            }
            None => self.buf.put_i32(-1),
        }
    }

    fn int8(&mut self, value: i64) {
        self.buf.put_i32(8);
        self.buf.put_i64(value);
    }

    fn bool(&mut self, value: bool) {
        self.buf.put_i32(1);
        self.buf.put_u8(u8::from(value));
    }

    fn finish(mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_filter_never_forgets_a_key_and_rarely_imagines_one() {
        let mut f = KeyFilter::new();
        for i in 0..100_000 {
            f.insert("Observation", &format!("o{i}"));
        }
        assert!((0..100_000).all(|i| f.may_contain("Observation", &format!("o{i}"))));
        let false_hits = (0..100_000).filter(|i| f.may_contain("Observation", &format!("x{i}"))).count();
        assert!(false_hits < 100, "{false_hits} false positives in 100k");
        assert!(!f.may_contain("Condition", "o1") || !f.may_contain("Condition", "o2"), "the type is part of the key");
    }
}
