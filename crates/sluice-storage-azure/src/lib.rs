//! Export files in Azure Blob Storage, with signed (SAS) download URLs.
//!
//! [`AzureBackend`] implements [`sluice_storage::ObjectBackend`] with the official
//! `azure_storage_blob` SDK, one request per call; wrap it in
//! [`sluice_storage::CloudStorage`] for buffering into blocks and retries (the SDK's own
//! retry policy is switched off so that requests are not retried twice).
//!
//! # Configuration
//!
//! [`AzureConfig`] names the storage `account` and the `container` (which must exist), and
//! optionally an `endpoint` (default `https://<account>.blob.core.windows.net`; for Azurite
//! e.g. `http://127.0.0.1:10000/devstoreaccount1`) and an account `key`.
//!
//! # Authentication
//!
//! - **Account key** (`key` set, base64 as shown in the portal): the SDK has no shared-key
//!   authentication, so this crate signs a *service SAS* for the container (permissions
//!   create, write, delete, list; valid one hour, renewed 15 minutes before it expires)
//!   and appends it to every request. Download links are read-only service SAS tokens for
//!   one blob. Works over HTTP (emulators) and HTTPS.
//! - **Microsoft Entra ID** (`key` unset): with `AZURE_FEDERATED_TOKEN_FILE` set (AKS
//!   workload identity, which also sets `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and
//!   `AZURE_AUTHORITY_HOST`), a workload identity credential; otherwise a managed identity
//!   credential (IMDS, App Service; `AZURE_CLIENT_ID` selects a user-assigned identity).
//!   The identity needs the *Storage Blob Data Contributor* role on the container and
//!   *Storage Blob Delegator* (or Data Contributor) on the account. Download links are
//!   *user delegation SAS* tokens signed with a user delegation key that is fetched, and
//!   cached, through the SDK. Entra ID tokens need an HTTPS endpoint.
//!
//! Download links live at most [`MAX_URL_TTL`] (seven days, the longest a user delegation
//! key is valid); the [`sluice_storage::SignedUrl`] returned says when a link really expires.
//!
//! Errors name the account and container and never contain the key, a SAS signature or a
//! token. Timeouts, connection failures and HTTP 408/429/500/502/503/504 are reported as
//! [`StorageError::Unavailable`], so that [`sluice_storage::CloudStorage`] retries them.

mod error;
mod policy;
mod sas;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::http::{
    ClientOptions, HttpClientOptions, RequestContent, RetryOptions, Transport, Url, new_http_client,
};
use azure_identity::{
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
};
use azure_storage_blob::models::{
    BlobClientDeleteOptions, BlobContainerClientListBlobsOptions, BlockBlobClientCommitBlockListOptions,
    BlockBlobClientUploadOptions, BlockLookupList, DeleteSnapshotsOptionType, KeyInfo,
};
use azure_storage_blob::{
    BlobContainerClient, BlobContainerClientOptions, BlobServiceClient, BlobServiceClientOptions,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use error::Place;
use futures_util::TryStreamExt as _;
use policy::{ContainerSasPolicy, KeySigner};
use sas::{DelegationKey, Resource, SasParams};
use sluice_storage::{ObjectBackend, ObjectMeta, PartUpload, SignedUrl, StorageError};
use std::num::NonZero;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// The longest a download link lives: the seven days a user delegation key may be valid.
pub const MAX_URL_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Blocks staged before the last one are at least this long. Azure accepts blocks of any
/// size (up to 4000 MiB, 50,000 per blob); 4 MiB keeps the request count reasonable.
const MIN_PART_BYTES: usize = 4 << 20;

/// How far back a user delegation key starts, for clock skew.
const KEY_START_SKEW: Duration = Duration::from_secs(5 * 60);
/// A margin kept below the seven-day maximum of a user delegation key.
const KEY_EXPIRY_MARGIN: Duration = Duration::from_secs(10 * 60);
/// A cached user delegation key is reused for a link that should outlive it by at most
/// this much (the link then expires with the key, and says so): links of the longest TTL
/// fetch a new key at most once per this period, not once per link.
const KEY_REUSE_SLACK: Duration = Duration::from_secs(60 * 60);

/// Where and how to connect.
#[derive(Clone, Default)]
pub struct AzureConfig {
    /// Storage account name, e.g. `mystorageacct`.
    pub account: String,
    /// Container that holds the export files; it must already exist.
    pub container: String,
    /// Blob service endpoint, e.g. `http://127.0.0.1:10000/devstoreaccount1` for Azurite.
    /// Default: `https://<account>.blob.core.windows.net`.
    pub endpoint: Option<String>,
    /// Base64 account key. Without it, Microsoft Entra ID (workload or managed identity)
    /// is used. Never printed by `Debug`.
    pub key: Option<String>,
}

impl std::fmt::Debug for AzureConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureConfig")
            .field("account", &self.account)
            .field("container", &self.container)
            .field("endpoint", &self.endpoint)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// An Azure Blob Storage container as an [`ObjectBackend`].
pub struct AzureBackend {
    place: Arc<Place>,
    /// The container URL without a query, for download links.
    container_url: Url,
    container: BlobContainerClient,
    auth: Auth,
}

enum Auth {
    /// Account key: every request carries a container SAS.
    Key(Arc<KeySigner>),
    /// Entra ID: bearer tokens, and a cached user delegation key for download links.
    Identity(Box<Identity>),
}

struct Identity {
    /// For Get User Delegation Key.
    service: BlobServiceClient,
    delegation_key: tokio::sync::Mutex<Option<DelegationKey>>,
}

impl std::fmt::Debug for AzureBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match self.auth {
            Auth::Key(_) => "account key",
            Auth::Identity(_) => "entra id",
        };
        f.debug_struct("AzureBackend").field("location", &self.place.location).field("auth", &auth).finish()
    }
}

/// Checks the account and container names Azure accepts.
fn check_names(config: &AzureConfig, place: &Place) -> Result<(), StorageError> {
    if config.account.is_empty() || !config.account.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(place.backend(format!("invalid storage account name '{}'", config.account)));
    }
    let container_ok = (3..=63).contains(&config.container.len())
        && config.container.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !config.container.starts_with('-')
        && !config.container.ends_with('-')
        && !config.container.contains("--");
    if !container_ok {
        return Err(place.backend(format!(
            "invalid container name '{}' (3-63 lowercase letters, digits and single hyphens)",
            config.container
        )));
    }
    Ok(())
}

/// The service URL (ending in `/`) and the container URL of `config`'s endpoint.
fn urls(config: &AzureConfig, place: &Place) -> Result<(Url, Url), StorageError> {
    let endpoint =
        config.endpoint.clone().unwrap_or_else(|| format!("https://{}.blob.core.windows.net", config.account));
    let mut service_url = Url::parse(endpoint.trim_end_matches('/'))
        .map_err(|e| place.backend(format!("invalid endpoint '{}': {e}", error::redact(&endpoint))))?;
    if service_url.cannot_be_a_base()
        || !matches!(service_url.scheme(), "http" | "https")
        || service_url.query().is_some()
        || service_url.fragment().is_some()
    {
        return Err(place.backend(format!(
            "invalid endpoint '{}': expected http(s)://host[:port][/path] without a query",
            error::redact(&endpoint)
        )));
    }
    let mut container_url = service_url.clone();
    container_url.path_segments_mut().expect("checked: a base URL").pop_if_empty().push(&config.container);
    service_url.path_segments_mut().expect("checked: a base URL").pop_if_empty().push("");
    Ok((service_url, container_url))
}

impl AzureBackend {
    /// Builds the clients and checks that the container can be listed, so that a wrong
    /// name, key or role shows at startup. Fails with an error naming the account and
    /// container if the container does not exist.
    pub async fn connect(config: AzureConfig) -> Result<AzureBackend, StorageError> {
        let place = Arc::new(Place {
            location: format!("azure://{}/{}", config.account, config.container),
            account: config.account.clone(),
            container: config.container.clone(),
        });
        check_names(&config, &place)?;
        let (service_url, container_url) = urls(&config, &place)?;
        let https = service_url.scheme() == "https";

        // One HTTP client for every SDK client; no SDK retries (CloudStorage retries).
        let http = HttpClientOptions { automatic_decompression: false };
        let mut client_options = ClientOptions {
            transport: Some(Transport::new(new_http_client(Some(http)))),
            retry: RetryOptions::none(),
            ..Default::default()
        };

        let (container, auth) = match &config.key {
            Some(key) => {
                let key =
                    BASE64.decode(key.trim()).map_err(|_| place.backend("the account key is not valid base64"))?;
                let signer = Arc::new(KeySigner {
                    account: config.account.clone(),
                    container: config.container.clone(),
                    key,
                    protocol: https.then_some("https"),
                });
                client_options.per_try_policies.push(Arc::new(ContainerSasPolicy::new(signer.clone())));
                let options = BlobContainerClientOptions { client_options, ..Default::default() };
                let container = BlobContainerClient::new(container_url.clone(), None, Some(options))
                    .map_err(|e| place.map("create client", None, e))?;
                (container, Auth::Key(signer))
            }
            None => {
                if !https {
                    return Err(place.backend(format!(
                        "endpoint '{}' is not HTTPS: Entra ID authentication needs HTTPS (or set an account key)",
                        service_url
                    )));
                }
                let credential = identity_credential().map_err(|e| place.map("set up Entra ID credential", None, e))?;
                let options =
                    BlobContainerClientOptions { client_options: client_options.clone(), ..Default::default() };
                let container =
                    BlobContainerClient::new(container_url.clone(), Some(credential.clone()), Some(options))
                        .map_err(|e| place.map("create client", None, e))?;
                let options = BlobServiceClientOptions { client_options, ..Default::default() };
                let service = BlobServiceClient::new(service_url, Some(credential), Some(options))
                    .map_err(|e| place.map("create client", None, e))?;
                (
                    container,
                    Auth::Identity(Box::new(Identity { service, delegation_key: tokio::sync::Mutex::new(None) })),
                )
            }
        };

        let backend = AzureBackend { place, container_url, container, auth };
        backend.probe().await?;
        Ok(backend)
    }

    /// Lists at most one blob: proves the container exists and the credentials work.
    async fn probe(&self) -> Result<(), StorageError> {
        let options = BlobContainerClientListBlobsOptions { maxresults: Some(1), ..Default::default() };
        let mut pages =
            self.container.list_blobs(Some(options)).map_err(|e| self.place.map("list blobs", None, e))?.into_pages();
        pages.try_next().await.map_err(|e| self.place.map("list blobs", None, e))?;
        Ok(())
    }

    /// The blob URL of `key` without a query, one path segment per `/`-separated part.
    fn blob_url(&self, key: &str) -> Url {
        let mut url = self.container_url.clone();
        url.path_segments_mut().expect("a base URL").extend(key.split('/'));
        url
    }

    /// A user delegation key valid until `until`, or at most [`KEY_REUSE_SLACK`] less;
    /// fetched when the cached one ends earlier.
    async fn delegation_key(&self, identity: &Identity, until: OffsetDateTime) -> Result<DelegationKey, StorageError> {
        let mut cached = identity.delegation_key.lock().await;
        if let Some(key) = cached.as_ref()
            && key.expiry >= until - KEY_REUSE_SLACK
        {
            return Ok(key.clone());
        }
        let now = OffsetDateTime::now_utc();
        let info = KeyInfo {
            start: Some(now - KEY_START_SKEW),
            expiry: Some(now + MAX_URL_TTL - KEY_EXPIRY_MARGIN),
            ..Default::default()
        };
        let what = "get user delegation key";
        let body = RequestContent::try_from(info).map_err(|e| self.place.map(what, None, e))?;
        let response =
            identity.service.get_user_delegation_key(body, None).await.map_err(|e| self.place.map(what, None, e))?;
        let model = response.into_model().map_err(|e| self.place.map(what, None, e))?;
        let missing = |field: &str| self.place.backend(format!("{what}: the response has no {field}"));
        let key = DelegationKey {
            object_id: model.signed_oid.ok_or_else(|| missing("SignedOid"))?,
            tenant_id: model.signed_tid.ok_or_else(|| missing("SignedTid"))?,
            start: model.signed_start.ok_or_else(|| missing("SignedStart"))?,
            expiry: model.signed_expiry.ok_or_else(|| missing("SignedExpiry"))?,
            service: model.signed_service.ok_or_else(|| missing("SignedService"))?,
            version: model.signed_version.ok_or_else(|| missing("SignedVersion"))?,
            value: model.value.ok_or_else(|| missing("Value"))?,
        };
        tracing::debug!(location = %self.place.location, expiry = %key.expiry, "fetched a user delegation key");
        *cached = Some(key.clone());
        Ok(key)
    }
}

/// Workload identity when a federated token file is configured, else managed identity
/// (user-assigned when `AZURE_CLIENT_ID` is set, system-assigned otherwise).
fn identity_credential() -> azure_core::Result<Arc<dyn TokenCredential>> {
    if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        return Ok(WorkloadIdentityCredential::new(None)?);
    }
    let user_assigned_id =
        std::env::var("AZURE_CLIENT_ID").ok().filter(|id| !id.is_empty()).map(UserAssignedId::ClientId);
    Ok(ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
        user_assigned_id,
        ..Default::default()
    }))?)
}

/// The block id of part `index`: fixed width, so that every id of a blob has the same
/// length as Azure requires (the SDK base64-encodes it).
fn block_id(index: u32) -> Vec<u8> {
    format!("sluice-{index:010}").into_bytes()
}

#[async_trait]
impl ObjectBackend for AzureBackend {
    fn describe(&self) -> String {
        self.place.location.clone()
    }

    fn provider(&self) -> &'static str {
        "azure"
    }

    fn min_part_bytes(&self) -> usize {
        MIN_PART_BYTES
    }

    /// Put Blob (a block blob) with the content headers of `meta`.
    async fn put_object(&self, key: &str, meta: &ObjectMeta, data: Bytes) -> Result<(), StorageError> {
        let client = self.container.blob_client(key).block_blob_client();
        let options = BlockBlobClientUploadOptions {
            blob_content_type: Some(meta.content_type.clone()),
            blob_content_encoding: meta.content_encoding.clone(),
            // One request: a partition as large as the data makes the SDK send a single Put Blob.
            partition_size: NonZero::new(data.len().max(1) as u64),
            parallel: NonZero::new(1),
            ..Default::default()
        };
        client.upload(data.into(), Some(options)).await.map_err(|e| self.place.map("put blob", Some(key), e))?;
        Ok(())
    }

    /// Stages blocks (Put Block) and commits them (Put Block List). Nothing is visible
    /// under the key until [`PartUpload::complete`].
    async fn start_upload(&self, key: &str, meta: &ObjectMeta) -> Result<Box<dyn PartUpload>, StorageError> {
        Ok(Box::new(BlockUpload {
            place: self.place.clone(),
            client: self.container.blob_client(key).block_blob_client(),
            key: key.to_string(),
            meta: meta.clone(),
            parts: 0,
        }))
    }

    /// A read-only SAS URL for one blob (service SAS with the account key, or user
    /// delegation SAS with Entra ID), valid for `ttl` capped at [`MAX_URL_TTL`].
    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError> {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("0 is a valid nanosecond");
        let mut expires = now + ttl.min(MAX_URL_TTL);
        let https = self.container_url.scheme() == "https";
        let params = |expiry| SasParams {
            account: &self.place.account,
            container: &self.place.container,
            resource: Resource::Blob(key),
            permissions: "r",
            expiry,
            protocol: https.then_some("https"),
        };
        let token = match &self.auth {
            Auth::Key(signer) => sas::service_sas(&params(expires), &signer.key),
            Auth::Identity(identity) => {
                let wanted = expires.min(now + MAX_URL_TTL - KEY_EXPIRY_MARGIN);
                let udk = self.delegation_key(identity, wanted).await?;
                expires = expires.min(udk.expiry);
                sas::delegation_sas(&params(expires), &udk)
            }
        };
        let mut url = self.blob_url(key);
        url.query_pairs_mut().extend_pairs(token);
        Ok(SignedUrl { url: url.to_string(), expires })
    }

    /// List Blobs with `prefix`, following every continuation marker.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let options = BlobContainerClientListBlobsOptions {
            prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
            ..Default::default()
        };
        let mut pages =
            self.container.list_blobs(Some(options)).map_err(|e| self.place.map("list blobs", None, e))?.into_pages();
        let mut keys = Vec::new();
        while let Some(page) = pages.try_next().await.map_err(|e| self.place.map("list blobs", None, e))? {
            let page = page.into_model().map_err(|e| self.place.map("list blobs", None, e))?;
            keys.extend(page.blob_items.into_iter().filter_map(|item| item.name));
        }
        Ok(keys)
    }

    /// Delete Blob, with its snapshots; an absent blob is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let options = BlobClientDeleteOptions {
            delete_snapshots: Some(DeleteSnapshotsOptionType::Include),
            ..Default::default()
        };
        match self.container.blob_client(key).delete(Some(options)).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status() == Some(azure_core::http::StatusCode::NotFound) => match e.kind() {
                azure_core::error::ErrorKind::HttpResponse { error_code: Some(code), .. }
                    if code == "ContainerNotFound" =>
                {
                    Err(self.place.map("delete blob", Some(key), e))
                }
                _ => Ok(()),
            },
            Err(e) => Err(self.place.map("delete blob", Some(key), e)),
        }
    }
}

/// Blocks staged for one blob. `abort` sends nothing: staged blocks are never visible,
/// and Azure discards uncommitted blocks by itself (after about a week).
struct BlockUpload {
    place: Arc<Place>,
    client: azure_storage_blob::BlockBlobClient,
    key: String,
    meta: ObjectMeta,
    /// Parts 0..parts have been staged.
    parts: u32,
}

#[async_trait]
impl PartUpload for BlockUpload {
    async fn put_part(&mut self, index: u32, data: Bytes) -> Result<(), StorageError> {
        let len = data.len() as u64;
        self.client
            .stage_block(&block_id(index), len, data.into(), None)
            .await
            .map_err(|e| self.place.map("put block", Some(&self.key), e))?;
        self.parts = self.parts.max(index + 1);
        Ok(())
    }

    async fn complete(&mut self) -> Result<(), StorageError> {
        let what = "put block list";
        let list = BlockLookupList { latest: Some((0..self.parts).map(block_id).collect()), ..Default::default() };
        let body = RequestContent::try_from(list).map_err(|e| self.place.map(what, Some(&self.key), e))?;
        let options = BlockBlobClientCommitBlockListOptions {
            blob_content_type: Some(self.meta.content_type.clone()),
            blob_content_encoding: self.meta.content_encoding.clone(),
            ..Default::default()
        };
        self.client
            .commit_block_list(body, Some(options))
            .await
            .map_err(|e| self.place.map(what, Some(&self.key), e))?;
        Ok(())
    }

    async fn abort(&mut self) {
        // Nothing to send: see the type's doc.
        self.parts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ids_have_fixed_width() {
        assert_eq!(block_id(0).len(), block_id(u32::MAX).len());
        assert_ne!(block_id(1), block_id(10));
    }

    #[test]
    fn debug_redacts_key() {
        let config = AzureConfig {
            account: "acct".into(),
            container: "exports".into(),
            endpoint: None,
            key: Some("c2VjcmV0LWtleQ==".into()),
        };
        let text = format!("{config:?}");
        assert!(!text.contains("c2VjcmV0"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[tokio::test]
    async fn rejects_bad_names_and_keys() {
        let config = |account: &str, container: &str, key: Option<&str>| AzureConfig {
            account: account.into(),
            container: container.into(),
            endpoint: Some("http://127.0.0.1:9/devstoreaccount1".into()),
            key: key.map(str::to_string),
        };
        for (account, container) in [("", "exports"), ("bad-name", "exports"), ("acct", "Ex"), ("acct", "a--b")] {
            let err = AzureBackend::connect(config(account, container, Some("AAAA"))).await.unwrap_err();
            assert!(matches!(err, StorageError::Backend { .. }), "{err}");
        }
        let err = AzureBackend::connect(config("acct", "exports", Some("not base64!"))).await.unwrap_err();
        assert!(err.to_string().contains("not valid base64"), "{err}");
        assert!(!err.to_string().contains("not base64!"), "{err}");
        // Entra ID needs HTTPS.
        let err = AzureBackend::connect(config("acct", "exports", None)).await.unwrap_err();
        assert!(err.to_string().contains("HTTPS"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_unavailable() {
        let config = AzureConfig {
            account: "acct".into(),
            container: "exports".into(),
            // Port 9 (discard) is closed on the loopback interface.
            endpoint: Some("http://127.0.0.1:9/acct".into()),
            key: Some("AAAA".into()),
        };
        let err = AzureBackend::connect(config).await.unwrap_err();
        assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("azure://acct/exports"), "{text}");
        assert!(!text.contains("sig="), "{text}");
    }
}
