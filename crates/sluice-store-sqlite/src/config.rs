//! [`ConfigRepo`] in the `config` table. Secret fields go through the store's [`Secrets`]
//! (D50): sealed on write, opened on read.

use crate::{SqliteStore, db_err};
use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use sluice_storage::secrets::secret_fields;
use sluice_storage::{ConfigError, ConfigRepo, Resealed, Secrets};
use sluice_store::StoreError;

#[async_trait]
impl ConfigRepo for SqliteStore {
    async fn config_put(&self, resource_type: &str, id: &str, json: &str) -> Result<bool, ConfigError> {
        let j = self.secrets.seal(resource_type, id, json)?;
        let (t, i) = (resource_type.to_string(), id.to_string());
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
        let stored: Option<String> = self
            .with_writer(move |w| {
                w.conn
                    .query_row("SELECT json FROM config WHERE type = ?1 AND id = ?2", params![t, i], |r| r.get(0))
                    .optional()
                    .map_err(db_err)
            })
            .await
            .map_err(ConfigError::new)?;
        stored.map(|s| self.secrets.open(resource_type, id, &s)).transpose()
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

impl SqliteStore {
    /// The sealing pass (D50): rewrites every configuration resource whose secrets are
    /// plain or sealed by an older key so that they are sealed under the current key, in
    /// one transaction. Nothing to do without a key. A resource no configured key opens is
    /// left as it is and reported in [`Resealed::failed`].
    ///
    /// The old text is overwritten in the file (`secure_delete` while the pass runs), and
    /// the WAL, which still holds it, is checkpointed and truncated afterwards.
    pub async fn reseal_secrets(&self) -> Result<Resealed, ConfigError> {
        let secrets: Secrets = self.secrets.clone();
        if secrets.key_id().is_none() {
            return Ok(Resealed::default());
        }
        self.with_writer(move |w| {
            w.conn.pragma_update(None, "secure_delete", true).map_err(db_err)?;
            let done = reseal_rows(&mut w.conn, &secrets);
            let off = w.conn.pragma_update(None, "secure_delete", false).map_err(db_err);
            let done = done?;
            off?;
            if done.resealed > 0 {
                // Best effort: a reader of another process may keep the WAL from being reset.
                let _ = w.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
            }
            Ok(done)
        })
        .await
        .map_err(ConfigError::new)
    }
}

/// [`SqliteStore::reseal_secrets`] in one write transaction.
fn reseal_rows(conn: &mut rusqlite::Connection, secrets: &Secrets) -> Result<Resealed, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
    let rows: Vec<(String, String, String)> = {
        let mut stmt = tx.prepare("SELECT type, id, json FROM config").map_err(db_err)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)?
    };
    let mut done = Resealed::default();
    for (t, i, json) in rows.into_iter().filter(|(t, _, _)| !secret_fields(t).is_empty()) {
        match secrets.reseal(&t, &i, &json) {
            Ok(Some(sealed)) => {
                tx.execute("UPDATE config SET json = ?3 WHERE type = ?1 AND id = ?2", params![t, i, sealed])
                    .map_err(db_err)?;
                done.resealed += 1;
            }
            Ok(None) => {}
            Err(e) => done.failed.push((format!("{t}/{i}"), e)),
        }
    }
    tx.commit().map_err(db_err)?;
    Ok(done)
}
