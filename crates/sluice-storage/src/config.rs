//! [`ConfigRepo`]: where the configuration resources that open cloud storage are kept.

use async_trait::async_trait;

/// Why a [`ConfigRepo`] call failed: the store's own error, shown as it is.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConfigError(Box<dyn std::error::Error + Send + Sync>);

impl ConfigError {
    /// Wraps a store's error (or a message).
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ConfigError(error.into())
    }
}

/// Configuration resources (`AwsAccount`, `AzureContainer`, ...): JSON documents kept
/// apart from FHIR data, so that no export can ever read them.
#[async_trait]
pub trait ConfigRepo: Send + Sync {
    /// Creates or replaces `resource_type/id`; returns whether it was created.
    async fn config_put(&self, resource_type: &str, id: &str, json: &str) -> Result<bool, ConfigError>;
    /// The stored JSON of `resource_type/id`.
    async fn config_get(&self, resource_type: &str, id: &str) -> Result<Option<String>, ConfigError>;
    /// Deletes `resource_type/id`; returns whether it existed.
    async fn config_delete(&self, resource_type: &str, id: &str) -> Result<bool, ConfigError>;
}
