//! [`ConfigRepo`] in the `sluice_config` table.

use crate::{PgStore, pg_err};
use async_trait::async_trait;
use sluice_storage::{ConfigError, ConfigRepo};

#[async_trait]
impl ConfigRepo for PgStore {
    async fn config_put(&self, resource_type: &str, id: &str, json: &str) -> Result<bool, ConfigError> {
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
        Ok(row.map(|r| r.get(0)))
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
