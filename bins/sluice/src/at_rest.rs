//! Secrets at rest (D50): the owner-only data dir, the keys that seal the secret fields of
//! configuration resources, and the report of the sealing pass run when a store opens.

use crate::cli::CliError;
use sluice_storage::{ConfigError, Resealed, Secrets, owner_only};
use std::path::Path;

/// Creates the data dir owner-only (0700), or makes an existing one owner-only with a
/// warning.
pub fn data_dir(dir: &Path) -> Result<(), CliError> {
    owner_only::create_dir_all(dir).map_err(|e| format!("creating the data dir {}: {e}", dir.display()))?;
    owner_only::tighten(dir, "the data dir").map_err(|e| format!("the data dir {}: {e}", dir.display()))?;
    Ok(())
}

/// The keys from `SLUICE_SECRETS_KEY` and `SLUICE_SECRETS_KEY_PREVIOUS`; errors name the
/// variable, never a value.
pub fn secrets(current: Option<&str>, previous: &[String]) -> Result<Secrets, CliError> {
    let secrets = Secrets::from_settings(current, previous)?;
    match secrets.key_id() {
        Some(id) => {
            let previous: Vec<&str> = secrets.previous_ids().collect();
            tracing::info!(key_id = id, previous = ?previous, "secrets at rest are sealed (AES-256-GCM)");
        }
        None => tracing::info!("SLUICE_SECRETS_KEY is not set: secrets of configuration resources are stored as given"),
    }
    Ok(secrets)
}

/// Logs what the sealing pass did. Never fatal: a resource no configured key opens stays
/// as it is and fails (naming `SLUICE_SECRETS_KEY`) where it is used, and the server still
/// answers, so the key can be fixed without a crash loop.
pub fn resealed(pass: Result<Resealed, ConfigError>, secrets: &Secrets) {
    match pass {
        Ok(done) => {
            if done.resealed > 0 {
                tracing::info!(
                    resources = done.resealed,
                    key_id = secrets.key_id().unwrap_or_default(),
                    "secrets sealed under the current SLUICE_SECRETS_KEY"
                );
            }
            for (resource, e) in done.failed {
                tracing::error!(%resource, error = %e, "a secret cannot be opened: exports that need it fail until the key is set");
            }
        }
        Err(e) => tracing::error!(error = %e, "sealing the secrets of configuration resources failed"),
    }
}
