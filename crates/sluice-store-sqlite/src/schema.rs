//! Versioned schema migrations, tracked in `PRAGMA user_version`.

use rusqlite::Connection;

/// Migration `n` (1-based) is `MIGRATIONS[n - 1]`. Append only; never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: resources with versions and tombstones, the compartment index, jobs.
    "CREATE TABLE resource_version (
        seq          INTEGER PRIMARY KEY,
        type         TEXT    NOT NULL,
        id           TEXT    NOT NULL,
        version      INTEGER NOT NULL,
        last_updated INTEGER NOT NULL,
        deleted      INTEGER NOT NULL DEFAULT 0,
        superseded   INTEGER,
        json         TEXT
     );
     CREATE UNIQUE INDEX resource_current ON resource_version(type, id) WHERE superseded IS NULL;
     CREATE INDEX resource_type_seq ON resource_version(type, seq);
     CREATE TABLE compartment (
        patient_id TEXT    NOT NULL,
        seq        INTEGER NOT NULL,
        PRIMARY KEY (patient_id, seq)
     ) WITHOUT ROWID;
     CREATE INDEX compartment_seq ON compartment(seq);
     CREATE TABLE jobs (
        id         TEXT PRIMARY KEY,
        status     TEXT NOT NULL,
        active     INTEGER UNIQUE,
        record     TEXT NOT NULL,
        updated_at INTEGER NOT NULL
     );
     CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 2: configuration resources (AwsAccount, ...), apart from FHIR data.
    "CREATE TABLE config (
        type TEXT NOT NULL,
        id   TEXT NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (type, id)
     ) WITHOUT ROWID;",
    // 3: authorization (D36): client assertions already used, and the audit trail, apart
    // from FHIR data. Times are unix microseconds.
    "CREATE TABLE auth_assertion (
        key     TEXT    PRIMARY KEY,
        expires INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX auth_assertion_expires ON auth_assertion(expires);
     CREATE TABLE audit_event (
        id       TEXT    PRIMARY KEY,
        recorded INTEGER NOT NULL,
        agent    TEXT,
        json     TEXT    NOT NULL
     );
     CREATE INDEX audit_event_recorded ON audit_event(recorded, id);",
];

/// Brings the database up to the latest schema, one transaction per migration.
pub(crate) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if current > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "database schema version {current} is newer than this sluice ({}); upgrade sluice",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        conn.execute_batch(&format!("BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;", i + 1))?;
    }
    Ok(())
}
