//! Where export files go: the [`Storage`] trait, and [`MemoryStorage`] for tests of the
//! layers above.
//!
//! A provider crate (local disk, S3, Azure Blob, GCS) implements [`Storage`]. Objects are
//! written as streams through an [`ObjectWriter`]: nothing is visible under its key until
//! [`ObjectWriter::finish`] succeeds, so a failed or cancelled export never leaves a
//! half-written file that looks complete. Download links are handed out as signed URLs
//! with an expiry, created afresh each time they are asked for.
//!
//! A [`StorageSource`] says where new exports go; each job keeps the [`StorageTarget`] it
//! was given, so its files can be found again. [`ConfigRepo`] is where the configuration
//! resources naming cloud accounts are kept; [`Secrets`] seals their secret fields at rest
//! (D50). [`conformance`] (feature `conformance`) is the test suite every [`Storage`] passes.

pub mod cloud;
mod config;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod memory;
pub mod owner_only;
pub mod secrets;
mod target;

pub use cloud::{CloudOptions, CloudStorage, ObjectBackend, PartUpload};
pub use config::{ConfigError, ConfigRepo};
pub use memory::MemoryStorage;
pub use secrets::{Resealed, Secrets, SecretsKey};
pub use target::{AwsTarget, AzureTarget, GcpTarget, StorageTarget};

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// What the reader of an object will be told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// `Content-Type`, e.g. `application/fhir+ndjson`.
    pub content_type: String,
    /// `Content-Encoding`, e.g. `gzip` for `.ndjson.gz` files (D10).
    pub content_encoding: Option<String>,
}

impl ObjectMeta {
    /// Metadata for an export file: ndjson, gzip-encoded when `gzip` is set (D10).
    pub fn ndjson(gzip: bool) -> Self {
        ObjectMeta {
            content_type: "application/fhir+ndjson".to_string(),
            content_encoding: gzip.then(|| "gzip".to_string()),
        }
    }
}

/// A download link and when it stops working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedUrl {
    /// The absolute URL.
    pub url: String,
    /// When the link expires.
    pub expires: OffsetDateTime,
}

/// Why a storage operation failed. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object key is not acceptable (empty, absolute, `..`).
    #[error("invalid object key '{0}'")]
    InvalidKey(String),
    /// No object under that key.
    #[error("object '{0}' not found")]
    NotFound(String),
    /// The backend failed; `location` names the bucket/container/folder, `reason` says why.
    #[error("storage '{location}' failed: {reason}")]
    Backend {
        /// Bucket, container or folder (never credentials).
        location: String,
        /// What went wrong.
        reason: String,
    },
    /// A transient failure (timeout, throttling, 5xx, connection reset): worth retrying.
    #[error("storage '{location}' is unavailable: {reason}")]
    Unavailable {
        /// Bucket, container or folder (never credentials).
        location: String,
        /// What went wrong.
        reason: String,
    },
    /// Storage is not configured well enough to be used; says what is missing.
    #[error("export storage is not usable: {0}")]
    NotConfigured(String),
    /// A local I/O error.
    #[error("I/O error on '{location}': {source}")]
    Io {
        /// The file or folder.
        location: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A stream being written to one object.
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends bytes. Implementations buffer into parts bounded by bytes.
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError>;
    /// Makes the object visible under its key and returns its size in bytes.
    async fn finish(self: Box<Self>) -> Result<u64, StorageError>;
    /// Drops what was written; the key stays absent.
    async fn abort(self: Box<Self>);
}

/// An object store for export files.
#[async_trait]
pub trait Storage: Send + Sync {
    /// A short description for logs and error messages (provider and location, no secrets).
    fn describe(&self) -> String;
    /// The provider's short name in metrics (`local`, `aws`, `azure`, `gcp`, ...).
    fn provider(&self) -> &'static str {
        "other"
    }
    /// Starts writing the object `key` (a relative path such as `2024..._uuid/Patient.ndjson`).
    async fn create(&self, key: &str, meta: ObjectMeta) -> Result<Box<dyn ObjectWriter>, StorageError>;
    /// A fresh signed download URL for `key`, valid for `ttl`.
    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError>;
    /// Deletes every object whose key starts with `prefix` (a folder such as `2024..._uuid/`);
    /// returns how many were deleted.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError>;
}

/// Where exports go: the storage a new export uses, and the storage an earlier export was
/// written to. A server whose storage configuration can change implements it; a fixed one
/// is [`FixedStorage`].
#[async_trait]
pub trait StorageSource: Send + Sync {
    /// The storage for a new export, with the target naming it (no secrets) that is saved
    /// with the job, or why storage is not usable now.
    async fn current(&self) -> Result<(Arc<dyn Storage>, StorageTarget), StorageError>;
    /// The storage a target from [`StorageSource::current`] names;
    /// [`StorageTarget::Default`] (also jobs saved before targets existed) means the default
    /// storage.
    async fn open(&self, target: &StorageTarget) -> Result<Arc<dyn Storage>, StorageError>;
}

/// One storage for every export.
#[derive(Clone)]
pub struct FixedStorage(pub Arc<dyn Storage>);

#[async_trait]
impl StorageSource for FixedStorage {
    async fn current(&self) -> Result<(Arc<dyn Storage>, StorageTarget), StorageError> {
        Ok((self.0.clone(), StorageTarget::Default))
    }

    async fn open(&self, _target: &StorageTarget) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.0.clone())
    }
}

/// Checks that `key` is a relative path without `..`, empty or absolute segments.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\\')
        || key.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad { Err(StorageError::InvalidKey(key.to_string())) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(validate_key("a/b.ndjson").is_ok());
        for bad in ["", "/a", "a/../b", "a//b", "./a", "a/", "a\\b"] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ndjson_meta() {
        assert_eq!(ObjectMeta::ndjson(true).content_encoding.as_deref(), Some("gzip"));
        assert_eq!(ObjectMeta::ndjson(false).content_encoding, None);
        assert_eq!(ObjectMeta::ndjson(false).content_type, "application/fhir+ndjson");
    }
}
