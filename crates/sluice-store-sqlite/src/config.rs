//! [`ConfigRepo`] in the `config` table.

use crate::{SqliteStore, db_err};
use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use sluice_storage::{ConfigError, ConfigRepo};

#[async_trait]
impl ConfigRepo for SqliteStore {
    async fn config_put(&self, resource_type: &str, id: &str, json: &str) -> Result<bool, ConfigError> {
        let (t, i, j) = (resource_type.to_string(), id.to_string(), json.to_string());
        self.with_writer(move |w| {
            let updated = w.conn.execute("UPDATE config SET json = ?3 WHERE type = ?1 AND id = ?2", params![t, i, j]);
            if updated.map_err(db_err)? > 0 {
                return Ok(false);
            }
            w.conn
                .execute("INSERT INTO config(type, id, json) VALUES (?1, ?2, ?3)", params![t, i, j])
                .map_err(db_err)?;
            Ok(true)
        })
        .await
        .map_err(ConfigError::new)
    }

    async fn config_get(&self, resource_type: &str, id: &str) -> Result<Option<String>, ConfigError> {
        let (t, i) = (resource_type.to_string(), id.to_string());
        self.with_writer(move |w| {
            w.conn
                .query_row("SELECT json FROM config WHERE type = ?1 AND id = ?2", params![t, i], |r| r.get(0))
                .optional()
                .map_err(db_err)
        })
        .await
        .map_err(ConfigError::new)
    }

    async fn config_delete(&self, resource_type: &str, id: &str) -> Result<bool, ConfigError> {
        let (t, i) = (resource_type.to_string(), id.to_string());
        self.with_writer(move |w| {
            let n = w.conn.execute("DELETE FROM config WHERE type = ?1 AND id = ?2", params![t, i]).map_err(db_err)?;
            Ok(n > 0)
        })
        .await
        .map_err(ConfigError::new)
    }
}
