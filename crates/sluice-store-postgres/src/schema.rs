//! Versioned schema migrations, applied at start under an advisory lock so that several
//! servers starting together migrate once.

use crate::pg_err;
use deadpool_postgres::Object;
use sluice_store::StoreError;

/// The advisory lock key that serialises migrations ("sluimg").
const MIGRATION_LOCK: i64 = 0x736c_7569_6d67;

/// Migration `n` (1-based) is `MIGRATIONS[n - 1]`. Append only; never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: current resources, history, the compartment index, jobs, the snapshot clock.
    "CREATE TABLE sluice_resource (
        type         text    NOT NULL,
        id           text    NOT NULL,
        version      bigint  NOT NULL,
        last_updated bigint  NOT NULL,
        deleted      boolean NOT NULL DEFAULT false,
        json         text,
        -- The resource's patient (the least id of its compartment; NULL outside it) and
        -- whether it belongs to more than one: group exports read by patient.
        patient      text,
        multi        boolean NOT NULL DEFAULT false,
        PRIMARY KEY (type, id)
     );
     CREATE INDEX sluice_resource_patient ON sluice_resource (patient, type) WHERE patient IS NOT NULL;
     CREATE INDEX sluice_resource_multi ON sluice_resource (type) WHERE multi;
     -- Exports stream this column: keep it uncompressed (no pglz on the hot path) and
     -- inline up to a full page, so most resources are read without a TOAST lookup.
     ALTER TABLE sluice_resource ALTER COLUMN json SET STORAGE EXTERNAL;
     ALTER TABLE sluice_resource SET (toast_tuple_target = 8160);
     CREATE TABLE sluice_resource_history (
        type         text    NOT NULL,
        id           text    NOT NULL,
        version      bigint  NOT NULL,
        last_updated bigint  NOT NULL,
        deleted      boolean NOT NULL,
        json         text,
        PRIMARY KEY (type, id, version)
     );
     CREATE TABLE sluice_compartment (
        patient_id text NOT NULL,
        type       text NOT NULL,
        id         text NOT NULL,
        PRIMARY KEY (patient_id, type, id)
     );
     CREATE INDEX sluice_compartment_resource ON sluice_compartment (type, id);
     CREATE TABLE sluice_job (
        id         text        PRIMARY KEY,
        status     text        NOT NULL,
        active     boolean     NOT NULL DEFAULT false,
        record     text        NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE UNIQUE INDEX sluice_job_one_active ON sluice_job (active) WHERE active;
     CREATE TABLE sluice_clock (
        one         boolean PRIMARY KEY DEFAULT true CHECK (one),
        snapshot_ms bigint  NOT NULL
     );
     INSERT INTO sluice_clock (one, snapshot_ms) VALUES (true, 0);",
    // 2: configuration resources (AwsAccount, ...), apart from FHIR data.
    "CREATE TABLE sluice_config (
        type       text        NOT NULL,
        id         text        NOT NULL,
        json       text        NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (type, id)
     );",
    // 3: authorization (D36): client assertions already used, and the audit trail, apart
    // from FHIR data. Times are unix microseconds.
    "CREATE TABLE sluice_auth_assertion (
        key     text   PRIMARY KEY,
        expires bigint NOT NULL
     );
     CREATE INDEX sluice_auth_assertion_expires ON sluice_auth_assertion (expires);
     CREATE TABLE sluice_audit_event (
        id       text   PRIMARY KEY,
        recorded bigint NOT NULL,
        agent    text,
        json     text   NOT NULL
     );
     CREATE INDEX sluice_audit_event_recorded ON sluice_audit_event (recorded, id);",
];

/// Brings the database up to the latest schema.
pub(crate) async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sluice_schema (version integer NOT NULL)").await.map_err(pg_err)?;
    let current: i32 =
        tx.query_one("SELECT COALESCE(MAX(version), 0) FROM sluice_schema", &[]).await.map_err(pg_err)?.get(0);
    let current = current as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Database(format!(
            "database schema version {current} is newer than this sluice ({}); upgrade sluice",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).await.map_err(pg_err)?;
        tx.execute("INSERT INTO sluice_schema (version) VALUES ($1)", &[&((i + 1) as i32)]).await.map_err(pg_err)?;
    }
    tx.commit().await.map_err(pg_err)
}
