//! [`AuthRepo`] in the `sluice_auth_assertion` and `sluice_audit_event` tables. Times are
//! stored as unix microseconds (`bigint`), so that SQL compares and orders them as instants.

use crate::{PgStore, db_err, pg_err};
use async_trait::async_trait;
use sluice_store::{AuditQuery, AuditRecord, AuthRepo, StoreError};
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

/// The database's clock in unix microseconds: every server sharing the database agrees on it.
const NOW_MICROS: &str = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

/// `t` in unix microseconds (rounded down).
fn to_micros(t: OffsetDateTime) -> Result<i64, StoreError> {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1000)).map_err(|_| db_err(format!("time out of range: {t}")))
}

/// The instant `micros` unix microseconds.
fn from_micros(micros: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).map_err(db_err)
}

#[async_trait]
impl AuthRepo for PgStore {
    async fn remember_assertion(&self, key: &str, expires: OffsetDateTime) -> Result<bool, StoreError> {
        let expires = to_micros(expires)?;
        let client = self.client().await?;
        // One statement, committed at once: a concurrent insert of the same key waits for it
        // and then sees the row, so exactly one caller gets a row back. An expired row is
        // taken over (the `WHERE` is evaluated on the latest committed version).
        let inserted = client
            .query_opt(
                &format!(
                    "INSERT INTO sluice_auth_assertion (key, expires) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET expires = EXCLUDED.expires
                     WHERE sluice_auth_assertion.expires <= {NOW_MICROS}
                     RETURNING true"
                ),
                &[&key, &expires],
            )
            .await
            .map_err(pg_err)?
            .is_some();
        // Purges the other expired keys, skipping rows another server holds: it never waits,
        // so it cannot deadlock with a concurrent purge or insert.
        client
            .execute(
                &format!(
                    "DELETE FROM sluice_auth_assertion WHERE key IN (
                        SELECT key FROM sluice_auth_assertion WHERE expires <= {NOW_MICROS}
                        FOR UPDATE SKIP LOCKED)"
                ),
                &[],
            )
            .await
            .map_err(pg_err)?;
        Ok(inserted)
    }

    async fn audit_append(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let recorded = to_micros(record.recorded)?;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO sluice_audit_event (id, recorded, agent, json) VALUES ($1, $2, $3, $4)",
                &[&record.id, &recorded, &record.agent, &record.json],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn audit_query(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let since = query.since.map(to_micros).transpose()?;
        let before = query.before.map(to_micros).transpose()?;
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let mut sql = String::from("SELECT id, recorded, agent, json FROM sluice_audit_event WHERE true");
        let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(since) = &since {
            args.push(since);
            sql.push_str(&format!(" AND recorded >= ${}", args.len()));
        }
        if let Some(before) = &before {
            args.push(before);
            sql.push_str(&format!(" AND recorded < ${}", args.len()));
        }
        if let Some(agent) = &query.agent {
            args.push(agent);
            sql.push_str(&format!(" AND agent = ${}", args.len()));
        }
        args.push(&limit);
        sql.push_str(&format!(" ORDER BY recorded, id LIMIT ${}", args.len()));
        let client = self.client().await?;
        let rows = client.query(&sql, &args).await.map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord { id: r.get(0), recorded: from_micros(r.get(1))?, agent: r.get(2), json: r.get(3) })
            })
            .collect()
    }
}
