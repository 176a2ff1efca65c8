//! [`AuthRepo`] in the `auth_assertion` and `audit_event` tables. Times are stored as unix
//! microseconds, so that SQL compares and orders them as instants.

use crate::{SqliteStore, db_err};
use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::{TransactionBehavior, params, params_from_iter};
use sluice_store::{AuditQuery, AuditRecord, AuthRepo, StoreError};
use time::OffsetDateTime;

/// `t` in unix microseconds (rounded down).
fn to_micros(t: OffsetDateTime) -> Result<i64, StoreError> {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1000)).map_err(|_| db_err(format!("time out of range: {t}")))
}

/// The instant `micros` unix microseconds.
fn from_micros(micros: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).map_err(db_err)
}

#[async_trait]
impl AuthRepo for SqliteStore {
    async fn remember_assertion(&self, key: &str, expires: OffsetDateTime) -> Result<bool, StoreError> {
        let (key, expires) = (key.to_string(), to_micros(expires)?);
        let now = to_micros(OffsetDateTime::now_utc())?;
        self.with_writer(move |w| {
            // `BEGIN IMMEDIATE`: other processes on the same file are serialised too.
            let tx = w.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            tx.execute("DELETE FROM auth_assertion WHERE expires <= ?1", params![now]).map_err(db_err)?;
            let n = tx
                .execute("INSERT OR IGNORE INTO auth_assertion(key, expires) VALUES (?1, ?2)", params![key, expires])
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn audit_append(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let recorded = to_micros(record.recorded)?;
        let (id, agent, json) = (record.id.clone(), record.agent.clone(), record.json.clone());
        self.with_writer(move |w| {
            w.conn
                .execute(
                    "INSERT INTO audit_event(id, recorded, agent, json) VALUES (?1, ?2, ?3, ?4)",
                    params![id, recorded, agent, json],
                )
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn audit_query(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let mut sql = String::from("SELECT id, recorded, agent, json FROM audit_event WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::new();
        if let Some(since) = query.since {
            args.push(Value::Integer(to_micros(since)?));
            sql.push_str(&format!(" AND recorded >= ?{}", args.len()));
        }
        if let Some(before) = query.before {
            args.push(Value::Integer(to_micros(before)?));
            sql.push_str(&format!(" AND recorded < ?{}", args.len()));
        }
        if let Some(agent) = &query.agent {
            args.push(Value::Text(agent.clone()));
            sql.push_str(&format!(" AND agent = ?{}", args.len()));
        }
        args.push(Value::Integer(i64::try_from(query.limit).unwrap_or(i64::MAX)));
        sql.push_str(&format!(" ORDER BY recorded, id LIMIT ?{}", args.len()));
        let rows = self
            .with_writer(move |w| {
                let mut stmt = w.conn.prepare(&sql).map_err(db_err)?;
                let rows = stmt
                    .query_map(params_from_iter(args), |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get(2)?, r.get(3)?))
                    })
                    .map_err(db_err)?;
                rows.collect::<rusqlite::Result<Vec<(String, i64, Option<String>, String)>>>().map_err(db_err)
            })
            .await?;
        rows.into_iter()
            .map(|(id, recorded, agent, json)| Ok(AuditRecord { id, recorded: from_micros(recorded)?, agent, json }))
            .collect()
    }
}
