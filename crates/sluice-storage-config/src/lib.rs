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
//! afresh (a changed resource applies to the next export), and the job records the
//! [`StorageTarget`] of its storage (provider, bucket, resource ids; never secrets), so
//! later status requests sign URLs for the storage the files are in. Clients are cached by
//! target and secret fingerprint.
//!
//! Each provider is a Cargo feature (`aws`, `azure`, `gcp`; all on by default; D34), so an
//! embedder compiles only the SDKs it needs. Choosing a provider whose feature is off is a
//! [`StorageError::NotConfigured`] that says so; its configuration resources are still
//! checked on write.

pub mod resources;

use async_trait::async_trait;
use serde_json::{Map, Value};
use sluice_storage::{
    AwsTarget, AzureTarget, CloudOptions, ConfigRepo, GcpTarget, Storage, StorageError, StorageSource, StorageTarget,
};
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
    /// Open clients by target and secret fingerprint.
    cache: Mutex<HashMap<(StorageTarget, String), Arc<dyn Storage>>>,
}

fn missing(msg: impl Into<String>) -> StorageError {
    StorageError::NotConfigured(msg.into())
}

/// Each provider, and whether this build has its Cargo feature.
const PROVIDERS: [(&str, bool); 3] =
    [("aws", cfg!(feature = "aws")), ("azure", cfg!(feature = "azure")), ("gcp", cfg!(feature = "gcp"))];

/// Whether this build supports `provider` (false only for a known provider left out).
fn compiled(provider: &str) -> bool {
    PROVIDERS.iter().all(|&(name, on)| on || name != provider)
}

/// The error for a provider this build was compiled without.
fn not_compiled(provider: &str) -> StorageError {
    missing(format!("this build of Sluice has no {provider} support (Cargo feature `{provider}`)"))
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

    /// The target new exports go to, or what is missing.
    async fn describe_current(&self) -> Result<StorageTarget, StorageError> {
        let env = &self.env;
        let endpoint = env.endpoint.clone();
        match env.provider.as_deref() {
            None => Ok(StorageTarget::Default),
            Some(provider) if !compiled(provider) => Err(not_compiled(provider)),
            Some("aws") => {
                let bucket = env.aws_bucket.as_ref().ok_or_else(|| {
                    missing("BOX_FHIR_BULK_STORAGE_PROVIDER is aws but BOX_FHIR_BULK_STORAGE_AWS_BUCKET is not set")
                })?;
                let account = env.aws_account.as_ref().ok_or_else(|| {
                    missing("BOX_FHIR_BULK_STORAGE_PROVIDER is aws but BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT is not set (it names an AwsAccount)")
                })?;
                self.resource("AwsAccount", account, "BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT").await?;
                Ok(StorageTarget::Aws(AwsTarget { bucket: bucket.clone(), account: account.clone(), endpoint }))
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
                let text = |name| resources::field(&c, name).unwrap_or_default().to_string();
                Ok(StorageTarget::Azure(AzureTarget {
                    storage: text("storage"),
                    container: text("container"),
                    account,
                    endpoint,
                }))
            }
            Some("gcp") => {
                let bucket = env.gcp_bucket.as_ref().ok_or_else(|| {
                    missing("BOX_FHIR_BULK_STORAGE_PROVIDER is gcp but BOX_FHIR_BULK_STORAGE_GCP_BUCKET is not set")
                })?;
                if let Some(sa) = &env.gcp_service_account {
                    self.resource("GcpServiceAccount", sa, "BOX_FHIR_BULK_STORAGE_GCP_SERVICE_ACCOUNT").await?;
                }
                let service_account = env.gcp_service_account.clone();
                Ok(StorageTarget::Gcp(GcpTarget { bucket: bucket.clone(), service_account, endpoint }))
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

    /// Opens (or reuses) the client for a target.
    async fn open_target(&self, target: &StorageTarget) -> Result<Arc<dyn Storage>, StorageError> {
        let prepared: Result<(String, Build), StorageError> = match target {
            StorageTarget::Default => return Ok(self.local.clone()),
            #[cfg(feature = "aws")]
            StorageTarget::Aws(t) => self.aws(t).await,
            #[cfg(feature = "azure")]
            StorageTarget::Azure(t) => self.azure(t).await,
            #[cfg(feature = "gcp")]
            StorageTarget::Gcp(t) => self.gcp(t).await,
            #[allow(unreachable_patterns)]
            other => Err(not_compiled(other.provider().unwrap_or_default())),
        };
        let (fingerprint, build) = prepared?;
        let cache_key = (target.clone(), fingerprint);
        if let Some(hit) = self.cache.lock().expect("storage cache").get(&cache_key) {
            return Ok(hit.clone());
        }
        let storage = build.connect(self.options.clone()).await?;
        tracing::info!(storage = %storage.describe(), "export storage opened");
        let mut cache = self.cache.lock().expect("storage cache");
        // Old entries hold clients for rotated keys; a handful at most in practice.
        if cache.len() > 16 {
            cache.clear();
        }
        cache.insert(cache_key, storage.clone());
        Ok(storage)
    }

    /// The S3 settings for `t`, and a fingerprint of its `AwsAccount`.
    #[cfg(feature = "aws")]
    async fn aws(&self, t: &AwsTarget) -> Result<(String, Build), StorageError> {
        let acc = self.resource("AwsAccount", &t.account, "the export's storage").await?;
        let keys = match (resources::field(&acc, "access-key-id"), resources::field(&acc, "secret-access-key")) {
            (Some(id), Some(secret)) => {
                Some(sluice_storage_s3::S3Keys { access_key_id: id.to_string(), secret_access_key: secret.to_string() })
            }
            _ => None,
        };
        let config = sluice_storage_s3::S3Config {
            bucket: t.bucket.clone(),
            region: resources::field(&acc, "region").map(str::to_string),
            endpoint: t.endpoint.clone().or_else(|| resources::field(&acc, "host").map(str::to_string)),
            credentials: keys,
        };
        Ok((fingerprint(&Value::Object(acc).to_string()), Build::S3(config)))
    }

    /// The Azure settings for `t`, and a fingerprint of its account key.
    #[cfg(feature = "azure")]
    async fn azure(&self, t: &AzureTarget) -> Result<(String, Build), StorageError> {
        let key = match &t.account {
            Some(acc) => {
                let a = self.resource("AzureAccount", acc, "the export's storage").await?;
                resources::field(&a, "key").map(str::to_string)
            }
            None => None,
        };
        let fp = key.as_deref().map(fingerprint).unwrap_or_default();
        let config = sluice_storage_azure::AzureConfig {
            account: t.storage.clone(),
            container: t.container.clone(),
            endpoint: t.endpoint.clone(),
            key,
        };
        Ok((fp, Build::Azure(config)))
    }

    /// The GCS settings for `t`, and a fingerprint of its service account key.
    #[cfg(feature = "gcp")]
    async fn gcp(&self, t: &GcpTarget) -> Result<(String, Build), StorageError> {
        let sa = match &t.service_account {
            Some(id) => {
                let a = self.resource("GcpServiceAccount", id, "the export's storage").await?;
                Some(sluice_storage_gcs::GcsServiceAccount {
                    client_email: resources::field(&a, "service-account-email").unwrap_or_default().to_string(),
                    private_key: resources::field(&a, "private-key").unwrap_or_default().to_string(),
                    private_key_id: resources::field(&a, "private-key-id").map(str::to_string),
                })
            }
            None => None,
        };
        let fp =
            sa.as_ref().map(|sa| fingerprint(&format!("{}\n{}", sa.client_email, sa.private_key))).unwrap_or_default();
        let config = sluice_storage_gcs::GcsConfig {
            bucket: t.bucket.clone(),
            endpoint: t.endpoint.clone(),
            service_account: sa,
        };
        Ok((fp, Build::Gcs(config)))
    }
}

/// What to connect to, before connecting.
enum Build {
    #[cfg(feature = "aws")]
    S3(sluice_storage_s3::S3Config),
    #[cfg(feature = "azure")]
    Azure(sluice_storage_azure::AzureConfig),
    #[cfg(feature = "gcp")]
    Gcs(sluice_storage_gcs::GcsConfig),
}

impl Build {
    /// Connects, and wraps the backend in [`sluice_storage::CloudStorage`].
    #[cfg_attr(not(any(feature = "aws", feature = "azure", feature = "gcp")), allow(unused, unreachable_code))]
    async fn connect(self, opts: CloudOptions) -> Result<Arc<dyn Storage>, StorageError> {
        use sluice_storage::CloudStorage;
        Ok(match self {
            #[cfg(feature = "aws")]
            Build::S3(c) => Arc::new(CloudStorage::new(sluice_storage_s3::S3Backend::connect(c).await?, opts)),
            #[cfg(feature = "azure")]
            Build::Azure(c) => Arc::new(CloudStorage::new(sluice_storage_azure::AzureBackend::connect(c).await?, opts)),
            #[cfg(feature = "gcp")]
            Build::Gcs(c) => Arc::new(CloudStorage::new(sluice_storage_gcs::GcsBackend::connect(c).await?, opts)),
        })
    }
}

/// A digest of secret material (a resource's content, a key), so a changed secret opens a
/// new client. Never shown anywhere.
#[cfg(any(feature = "aws", feature = "azure", feature = "gcp"))]
fn fingerprint(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[async_trait]
impl StorageSource for ConfiguredStorage {
    async fn current(&self) -> Result<(Arc<dyn Storage>, StorageTarget), StorageError> {
        let target = self.describe_current().await?;
        let storage = self.open_target(&target).await?;
        Ok((storage, target))
    }

    async fn open(&self, target: &StorageTarget) -> Result<Arc<dyn Storage>, StorageError> {
        self.open_target(target).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_storage::{ConfigError, MemoryStorage};

    /// Configuration resources in a map.
    #[derive(Default)]
    struct Resources(Mutex<HashMap<(String, String), String>>);

    #[async_trait]
    impl ConfigRepo for Resources {
        async fn config_put(&self, ty: &str, id: &str, json: &str) -> Result<bool, ConfigError> {
            Ok(self.0.lock().unwrap().insert((ty.into(), id.into()), json.into()).is_none())
        }
        async fn config_get(&self, ty: &str, id: &str) -> Result<Option<String>, ConfigError> {
            Ok(self.0.lock().unwrap().get(&(ty.into(), id.into())).cloned())
        }
        async fn config_delete(&self, ty: &str, id: &str) -> Result<bool, ConfigError> {
            Ok(self.0.lock().unwrap().remove(&(ty.into(), id.into())).is_some())
        }
    }

    /// Storage per the given variables, over these resources.
    async fn configured(vars: &[(&str, &str)], resources: &[(&str, &str, &str)]) -> ConfiguredStorage {
        let repo = Resources::default();
        for (ty, id, json) in resources {
            repo.config_put(ty, id, json).await.unwrap();
        }
        let vars: HashMap<&str, &str> = vars.iter().copied().collect();
        let env = StorageEnv::from_lookup(|k| vars.get(k).map(|v| v.to_string()));
        ConfiguredStorage::new(env, Arc::new(repo), Arc::new(MemoryStorage::new()), CloudOptions::default())
    }

    #[cfg(feature = "aws")]
    const AWS: [(&str, &str); 3] = [
        ("BOX_FHIR_BULK_STORAGE_PROVIDER", "aws"),
        ("BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT", "acc"),
        ("BOX_FHIR_BULK_STORAGE_AWS_BUCKET", "exports"),
    ];

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

    #[tokio::test]
    async fn without_a_provider_exports_go_to_the_local_storage() {
        let storage = configured(&[], &[]).await;
        let (local, target) = storage.current().await.unwrap();
        assert_eq!(target, StorageTarget::Default);
        assert_eq!(local.describe(), "memory");
        assert_eq!(storage.open(&StorageTarget::Default).await.unwrap().describe(), "memory");
    }

    #[cfg(all(feature = "aws", feature = "azure", feature = "gcp"))]
    #[tokio::test]
    async fn targets_name_the_resources_and_are_saved_as_before() {
        let aws = configured(&AWS, &[("AwsAccount", "acc", r#"{"region":"us-east-1"}"#)]).await;
        let azure = configured(
            &[("BOX_FHIR_BULK_STORAGE_PROVIDER", "azure"), ("BOX_FHIR_BULK_STORAGE_AZURE_CONTAINER", "c1")],
            &[
                ("AzureContainer", "c1", r#"{"storage":"acct","container":"exports","account":{"id":"k1"}}"#),
                ("AzureAccount", "k1", r#"{"key":"AAAA"}"#),
            ],
        )
        .await;
        let gcp = configured(
            &[
                ("BOX_FHIR_BULK_STORAGE_PROVIDER", "gcp"),
                ("BOX_FHIR_BULK_STORAGE_GCP_BUCKET", "g"),
                ("SLUICE_STORAGE_ENDPOINT", "http://127.0.0.1:80"),
            ],
            &[],
        )
        .await;
        let expected = [
            r#"{"provider":"aws","bucket":"exports","account":"acc","endpoint":null}"#,
            r#"{"provider":"azure","storage":"acct","container":"exports","account":"k1","endpoint":null}"#,
            r#"{"provider":"gcp","bucket":"g","service-account":null,"endpoint":"http://127.0.0.1:80"}"#,
        ];
        for (storage, json) in [aws, azure, gcp].iter().zip(expected) {
            let target = storage.describe_current().await.unwrap();
            assert_eq!(serde_json::to_string(&target).unwrap(), json);
        }
    }

    #[cfg(feature = "aws")]
    #[tokio::test]
    async fn missing_settings_and_resources_are_named() {
        let no_account = configured(&AWS, &[]).await;
        let err = no_account.current().await.err().expect("no AwsAccount");
        assert!(matches!(err, StorageError::NotConfigured(_)), "{err}");
        assert!(err.to_string().contains("AwsAccount 'acc' (named by BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT)"), "{err}");
        let no_bucket = configured(&AWS[..2], &[("AwsAccount", "acc", "{}")]).await;
        let err = no_bucket.current().await.err().expect("no bucket");
        assert!(err.to_string().contains("BOX_FHIR_BULK_STORAGE_AWS_BUCKET is not set"), "{err}");
        let ftp = configured(&[("BOX_FHIR_BULK_STORAGE_PROVIDER", "ftp")], &[]).await;
        let err = ftp.current().await.err().expect("unknown provider");
        assert!(err.to_string().contains("is 'ftp'; use aws, azure or gcp"), "{err}");
    }

    /// Only in builds without every provider (`--no-default-features --features aws`).
    #[cfg(not(all(feature = "aws", feature = "azure", feature = "gcp")))]
    #[tokio::test]
    async fn providers_left_out_of_the_build_say_so() {
        for (provider, _) in PROVIDERS.into_iter().filter(|(_, on)| !on) {
            let storage = configured(&[("BOX_FHIR_BULK_STORAGE_PROVIDER", provider)], &[]).await;
            let expected = format!("this build of Sluice has no {provider} support (Cargo feature `{provider}`)");
            let err = storage.current().await.err().expect("not compiled in");
            assert!(matches!(&err, StorageError::NotConfigured(m) if *m == expected), "{err}");
            let saved =
                format!(r#"{{"provider":"{provider}","bucket":"b","account":"a","storage":"s","container":"c"}}"#);
            let target: StorageTarget = serde_json::from_str(&saved).unwrap();
            let err = storage.open(&target).await.err().expect("not compiled in");
            assert!(matches!(&err, StorageError::NotConfigured(m) if *m == expected), "{err}");
        }
    }
}
