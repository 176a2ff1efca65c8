//! Chooses where exports go, the way Aidbox users already configure it: the
//! `BOX_FHIR_BULK_STORAGE_*` environment variables name a provider and, through
//! configuration resources ([`resources`]), its account. Unset: local disk.
//!
//! | provider | settings | resources |
//! |---|---|---|
//! | `aws` | `..._AWS_BUCKET`, `..._AWS_ACCOUNT` | `AwsAccount` (`region`, optional `access-key-id` + `secret-access-key`) |
//! | `azure` | `..._AZURE_CONTAINER` | `AzureContainer` (`storage`, `container`, optional `account` → `AzureAccount` with `key`) |
//! | `gcp` | `..._GCP_BUCKET`, optional `..._GCP_SERVICE_ACCOUNT` | `GcpServiceAccount` (`service-account-email`, `private-key`) |
//!
//! [`ConfiguredStorage`] implements [`StorageSource`]: each kick-off reads the resources
//! afresh (a changed resource applies to the next export), and the job records a
//! description of its storage (provider, bucket, resource ids; never secrets), so later
//! status requests sign URLs for the storage the files are in. Clients are cached by
//! description and secret fingerprint.

pub mod resources;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sluice_storage::{CloudOptions, Storage, StorageError, StorageSource};
use sluice_store::ConfigRepo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The storage settings from the environment (Aidbox's names, plus Sluice's endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageEnv {
    /// `BOX_FHIR_BULK_STORAGE_PROVIDER`: `aws`, `azure`, `gcp`; unset: local disk.
    pub provider: Option<String>,
    /// `BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT`: id of an `AwsAccount`.
    pub aws_account: Option<String>,
    /// `BOX_FHIR_BULK_STORAGE_AWS_BUCKET`.
    pub aws_bucket: Option<String>,
    /// `BOX_FHIR_BULK_STORAGE_AZURE_CONTAINER`: id of an `AzureContainer`.
    pub azure_container: Option<String>,
    /// `BOX_FHIR_BULK_STORAGE_GCP_BUCKET`.
    pub gcp_bucket: Option<String>,
    /// `BOX_FHIR_BULK_STORAGE_GCP_SERVICE_ACCOUNT`: id of a `GcpServiceAccount`.
    pub gcp_service_account: Option<String>,
    /// `SLUICE_STORAGE_ENDPOINT`: a custom endpoint for the provider (S3-compatible stores,
    /// emulators).
    pub endpoint: Option<String>,
}

impl StorageEnv {
    /// Reads the variables from the process environment; empty values count as unset.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `get` (for tests and embedders).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        StorageEnv {
            provider: var("BOX_FHIR_BULK_STORAGE_PROVIDER"),
            aws_account: var("BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT"),
            aws_bucket: var("BOX_FHIR_BULK_STORAGE_AWS_BUCKET"),
            azure_container: var("BOX_FHIR_BULK_STORAGE_AZURE_CONTAINER"),
            gcp_bucket: var("BOX_FHIR_BULK_STORAGE_GCP_BUCKET"),
            gcp_service_account: var("BOX_FHIR_BULK_STORAGE_GCP_SERVICE_ACCOUNT"),
            endpoint: var("SLUICE_STORAGE_ENDPOINT"),
        }
    }
}

/// The export storage chosen by [`StorageEnv`] and the configuration resources.
pub struct ConfiguredStorage {
    env: StorageEnv,
    repo: Arc<dyn ConfigRepo>,
    local: Arc<dyn Storage>,
    options: CloudOptions,
    /// Open clients by description + secret fingerprint.
    cache: Mutex<HashMap<String, Arc<dyn Storage>>>,
}

fn missing(msg: impl Into<String>) -> StorageError {
    StorageError::NotConfigured(msg.into())
}

impl ConfiguredStorage {
    /// Storage per `env`, reading configuration resources from `repo`; `local` serves when
    /// no provider is set.
    pub fn new(env: StorageEnv, repo: Arc<dyn ConfigRepo>, local: Arc<dyn Storage>, options: CloudOptions) -> Self {
        ConfiguredStorage { env, repo, local, options, cache: Mutex::new(HashMap::new()) }
    }

    /// The settings in use.
    pub fn env(&self) -> &StorageEnv {
        &self.env
    }

    /// The description of the storage new exports go to, or what is missing.
    async fn describe_current(&self) -> Result<Value, StorageError> {
        let env = &self.env;
        let endpoint = env.endpoint.clone();
        match env.provider.as_deref() {
            None => Ok(Value::Null),
            Some("aws") => {
                let bucket = env.aws_bucket.as_ref().ok_or_else(|| {
                    missing("BOX_FHIR_BULK_STORAGE_PROVIDER is aws but BOX_FHIR_BULK_STORAGE_AWS_BUCKET is not set")
                })?;
                let account = env.aws_account.as_ref().ok_or_else(|| {
                    missing("BOX_FHIR_BULK_STORAGE_PROVIDER is aws but BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT is not set (it names an AwsAccount)")
                })?;
                self.resource("AwsAccount", account, "BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT").await?;
                Ok(json!({"provider": "aws", "bucket": bucket, "account": account, "endpoint": endpoint}))
            }
            Some("azure") => {
                let id = env.azure_container.as_ref().ok_or_else(|| {
                    missing("BOX_FHIR_BULK_STORAGE_PROVIDER is azure but BOX_FHIR_BULK_STORAGE_AZURE_CONTAINER is not set (it names an AzureContainer)")
                })?;
                let c = self.resource("AzureContainer", id, "BOX_FHIR_BULK_STORAGE_AZURE_CONTAINER").await?;
                let account = match c.get("account") {
                    Some(r) => {
                        let acc = resources::reference_id(r, "AzureAccount").ok_or_else(|| {
                            missing(format!("AzureContainer/{id} has an unreadable 'account' reference"))
                        })?;
                        self.resource("AzureAccount", acc, &format!("AzureContainer/{id}.account")).await?;
                        Some(acc.to_string())
                    }
                    None => None,
                };
                let storage = resources::field(&c, "storage").unwrap_or_default();
                let container = resources::field(&c, "container").unwrap_or_default();
                Ok(
                    json!({"provider": "azure", "storage": storage, "container": container, "account": account, "endpoint": endpoint}),
                )
            }
            Some("gcp") => {
                let bucket = env.gcp_bucket.as_ref().ok_or_else(|| {
                    missing("BOX_FHIR_BULK_STORAGE_PROVIDER is gcp but BOX_FHIR_BULK_STORAGE_GCP_BUCKET is not set")
                })?;
                if let Some(sa) = &env.gcp_service_account {
                    self.resource("GcpServiceAccount", sa, "BOX_FHIR_BULK_STORAGE_GCP_SERVICE_ACCOUNT").await?;
                }
                Ok(
                    json!({"provider": "gcp", "bucket": bucket, "service-account": env.gcp_service_account, "endpoint": endpoint}),
                )
            }
            Some(other) => Err(missing(format!(
                "BOX_FHIR_BULK_STORAGE_PROVIDER is '{other}'; use aws, azure or gcp (or leave it unset for local disk)"
            ))),
        }
    }

    /// A configuration resource that must exist; `named_by` says where its id came from.
    async fn resource(&self, ty: &str, id: &str, named_by: &str) -> Result<Map<String, Value>, StorageError> {
        let json = self
            .repo
            .config_get(ty, id)
            .await
            .map_err(|e| StorageError::Unavailable { location: format!("{ty}/{id}"), reason: e.to_string() })?
            .ok_or_else(|| {
                missing(format!("{ty} '{id}' (named by {named_by}) does not exist; create it with PUT /{ty}/{id}"))
            })?;
        match serde_json::from_str(&json) {
            Ok(Value::Object(obj)) => Ok(obj),
            _ => Err(missing(format!("{ty}/{id} is unreadable; PUT it again"))),
        }
    }

    /// Opens (or reuses) the client for a description.
    async fn open_target(&self, target: &Value) -> Result<Arc<dyn Storage>, StorageError> {
        let s = |k: &str| target.get(k).and_then(Value::as_str).map(str::to_string);
        let endpoint = s("endpoint");
        let (fingerprint, build): (String, Build) = match s("provider").as_deref() {
            None | Some("local") => return Ok(self.local.clone()),
            Some("aws") => {
                let account = s("account").unwrap_or_default();
                let acc = self.resource("AwsAccount", &account, "the export's storage").await?;
                let keys = match (resources::field(&acc, "access-key-id"), resources::field(&acc, "secret-access-key"))
                {
                    (Some(id), Some(secret)) => Some(sluice_storage_s3::S3Keys {
                        access_key_id: id.to_string(),
                        secret_access_key: secret.to_string(),
                    }),
                    _ => None,
                };
                let config = sluice_storage_s3::S3Config {
                    bucket: s("bucket").unwrap_or_default(),
                    region: resources::field(&acc, "region").map(str::to_string),
                    endpoint: endpoint.or_else(|| resources::field(&acc, "host").map(str::to_string)),
                    credentials: keys,
                };
                (fingerprint_of(&acc), Build::S3(config))
            }
            Some("azure") => {
                let key = match s("account") {
                    Some(acc) => {
                        let a = self.resource("AzureAccount", &acc, "the export's storage").await?;
                        resources::field(&a, "key").map(str::to_string)
                    }
                    None => None,
                };
                let fp = key.as_deref().map(|k| hex::encode(Sha256::digest(k.as_bytes()))).unwrap_or_default();
                let config = sluice_storage_azure::AzureConfig {
                    account: s("storage").unwrap_or_default(),
                    container: s("container").unwrap_or_default(),
                    endpoint,
                    key,
                };
                (fp, Build::Azure(config))
            }
            Some("gcp") => {
                let sa = match s("service-account") {
                    Some(id) => {
                        let a = self.resource("GcpServiceAccount", &id, "the export's storage").await?;
                        Some(sluice_storage_gcs::GcsServiceAccount {
                            client_email: resources::field(&a, "service-account-email").unwrap_or_default().to_string(),
                            private_key: resources::field(&a, "private-key").unwrap_or_default().to_string(),
                            private_key_id: resources::field(&a, "private-key-id").map(str::to_string),
                        })
                    }
                    None => None,
                };
                let fp = sa
                    .as_ref()
                    .map(|sa| hex::encode(Sha256::digest(format!("{}\n{}", sa.client_email, sa.private_key))))
                    .unwrap_or_default();
                let config = sluice_storage_gcs::GcsConfig {
                    bucket: s("bucket").unwrap_or_default(),
                    endpoint,
                    service_account: sa,
                };
                (fp, Build::Gcs(config))
            }
            Some(other) => return Err(missing(format!("unknown storage provider '{other}'"))),
        };
        let cache_key = format!("{target}\n{fingerprint}");
        if let Some(hit) = self.cache.lock().expect("storage cache").get(&cache_key) {
            return Ok(hit.clone());
        }
        let opts = self.options.clone();
        let storage: Arc<dyn Storage> = match build {
            Build::S3(c) => {
                Arc::new(sluice_storage::CloudStorage::new(sluice_storage_s3::S3Backend::connect(c).await?, opts))
            }
            Build::Azure(c) => {
                Arc::new(sluice_storage::CloudStorage::new(sluice_storage_azure::AzureBackend::connect(c).await?, opts))
            }
            Build::Gcs(c) => {
                Arc::new(sluice_storage::CloudStorage::new(sluice_storage_gcs::GcsBackend::connect(c).await?, opts))
            }
        };
        tracing::info!(storage = %storage.describe(), "export storage opened");
        let mut cache = self.cache.lock().expect("storage cache");
        // Old entries hold clients for rotated keys; a handful at most in practice.
        if cache.len() > 16 {
            cache.clear();
        }
        cache.insert(cache_key, storage.clone());
        Ok(storage)
    }
}

/// What to connect to, before connecting.
enum Build {
    S3(sluice_storage_s3::S3Config),
    Azure(sluice_storage_azure::AzureConfig),
    Gcs(sluice_storage_gcs::GcsConfig),
}

/// A digest of a resource's content (secrets included), so a changed resource opens a new
/// client. Never shown anywhere.
fn fingerprint_of(obj: &Map<String, Value>) -> String {
    hex::encode(Sha256::digest(Value::Object(obj.clone()).to_string()))
}

#[async_trait]
impl StorageSource for ConfiguredStorage {
    async fn current(&self) -> Result<(Arc<dyn Storage>, Value), StorageError> {
        let target = self.describe_current().await?;
        let storage = self.open_target(&target).await?;
        Ok((storage, target))
    }

    async fn open(&self, target: &Value) -> Result<Arc<dyn Storage>, StorageError> {
        self.open_target(target).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_reads_aidbox_names_and_ignores_empty_values() {
        let vars: HashMap<&str, &str> = [
            ("BOX_FHIR_BULK_STORAGE_PROVIDER", "aws"),
            ("BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT", "acc"),
            ("BOX_FHIR_BULK_STORAGE_AWS_BUCKET", " b "),
            ("BOX_FHIR_BULK_STORAGE_GCP_BUCKET", ""),
        ]
        .into();
        let env = StorageEnv::from_lookup(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(env.provider.as_deref(), Some("aws"));
        assert_eq!(env.aws_account.as_deref(), Some("acc"));
        assert_eq!(env.aws_bucket.as_deref(), Some("b"));
        assert_eq!(env.gcp_bucket, None);
    }
}
