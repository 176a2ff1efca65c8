//! [`ConfigRepo`] in the `sluice_config` table. Secret fields go through the store's
//! [`sluice_storage::Secrets`] (D50): sealed on write, opened on read.

use crate::{PgStore, pg_err};
use async_trait::async_trait;
use sluice_storage::secrets::secret_fields;
use sluice_storage::{ConfigError, ConfigRepo, Resealed};

#[async_trait]
impl ConfigRepo for PgStore {
    async fn config_put(&self, resource_type: &str, id: &str, json: &str) -> Result<bool, ConfigError> {
        let json = self.secrets.seal(resource_type, id, json)?;
        let client = self.client().await.map_err(ConfigError::new)?;
        // `xmax = 0` holds for a freshly inserted row, not for one the upsert updated.
        let row = client
            .query_one(
                "INSERT INTO sluice_config (type, id, json) VALUES ($1, $2, $3)
                 ON CONFLICT (type, id) DO UPDATE SET json = EXCLUDED.json, updated_at = now()
                 RETURNING (xmax = 0)",
                &[&resource_type, &id, &json],
            )
            .await
            .map_err(|e| ConfigError::new(pg_err(e)))?;
        Ok(row.get(0))
    }

    async fn config_get(&self, resource_type: &str, id: &str) -> Result<Option<String>, ConfigError> {
        let client = self.client().await.map_err(ConfigError::new)?;
        let row = client
            .query_opt("SELECT json FROM sluice_config WHERE type = $1 AND id = $2", &[&resource_type, &id])
            .await
            .map_err(|e| ConfigError::new(pg_err(e)))?;
        row.map(|r| self.secrets.open(resource_type, id, r.get(0))).transpose()
    }

    async fn config_delete(&self, resource_type: &str, id: &str) -> Result<bool, ConfigError> {
        let client = self.client().await.map_err(ConfigError::new)?;
        let n = client
            .execute("DELETE FROM sluice_config WHERE type = $1 AND id = $2", &[&resource_type, &id])
            .await
            .map_err(|e| ConfigError::new(pg_err(e)))?;
        Ok(n > 0)
    }
}

impl PgStore {
    /// The sealing pass (D50): rewrites every configuration resource whose secrets are
    /// plain or sealed by an older key so that they are sealed under the current key. Each
    /// row is replaced only if it still holds what was read, so a concurrent `PUT` (or a
    /// peer's pass) wins. Nothing to do without a key. A resource no configured key opens
    /// is left as it is and reported in [`Resealed::failed`].
    pub async fn reseal_secrets(&self) -> Result<Resealed, ConfigError> {
        let mut done = Resealed::default();
        if self.secrets.key_id().is_none() {
            return Ok(done);
        }
        let client = self.client().await.map_err(ConfigError::new)?;
        let rows = client
            .query("SELECT type, id, json FROM sluice_config", &[])
            .await
            .map_err(|e| ConfigError::new(pg_err(e)))?;
        for row in rows {
            let (t, i, json): (String, String, String) = (row.get(0), row.get(1), row.get(2));
            if secret_fields(&t).is_empty() {
                continue;
            }
            match self.secrets.reseal(&t, &i, &json) {
                Ok(Some(sealed)) => {
                    let n = client
                        .execute(
                            "UPDATE sluice_config SET json = $4, updated_at = now()
                             WHERE type = $1 AND id = $2 AND json = $3",
                            &[&t, &i, &json, &sealed],
                        )
                        .await
                        .map_err(|e| ConfigError::new(pg_err(e)))?;
                    done.resealed += n as usize;
                }
                Ok(None) => {}
                Err(e) => done.failed.push((format!("{t}/{i}"), e)),
            }
        }
        Ok(done)
    }
}
