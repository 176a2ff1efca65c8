//! Google Cloud Storage for Sluice export files, with V4 signed download URLs.
//!
//! [`GcsBackend`] implements [`ObjectBackend`]; wrap it in
//! [`CloudStorage`](sluice_storage::CloudStorage) to get a [`Storage`](sluice_storage::Storage)
//! with part buffering and retries:
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_storage::StorageError> {
//! use sluice_storage::{CloudOptions, CloudStorage};
//! use sluice_storage_gcs::{GcsBackend, GcsConfig};
//!
//! let backend = GcsBackend::connect(GcsConfig {
//!     bucket: "my-exports".to_string(),
//!     endpoint: None,
//!     service_account: None,
//! })
//! .await?;
//! let storage = CloudStorage::new(backend, CloudOptions::default());
//! # Ok(()) }
//! ```
//!
//! It is built on Google's official SDK (`google-cloud-storage` and `google-cloud-auth`).
//!
//! # Configuration
//!
//! - `bucket`: the bucket that holds the export files (it must exist).
//! - `endpoint`: another server speaking the GCS JSON API, such as `fake-gcs-server`
//!   (`http://127.0.0.1:80`). Signed URLs then point at it too, in path style
//!   (`http://host/bucket/object?...`).
//! - `service_account`: a service account key (client email and PEM private key).
//!
//! # Authentication and signing
//!
//! - **Service account key**: requests are authorized with tokens made from the key, and
//!   download URLs are signed locally with it (RSA-SHA256, V4 signing).
//! - **Application default credentials** (no key, no endpoint): the usual Google lookup,
//!   e.g. GKE workload identity through the metadata server. URLs are signed through the
//!   IAM Credentials `signBlob` API, so the service account needs the "Service Account
//!   Token Creator" role on itself.
//! - **Emulator** (an endpoint and no key): anonymous requests, and URLs carry a placeholder
//!   signature that only an emulator ignoring signatures accepts.
//!
//! [`GcsBackend::connect`] lists the bucket once, so a wrong bucket name, missing
//! credentials or missing permissions show up at startup. The service account needs
//! `storage.objects.create`, `storage.objects.get`, `storage.objects.list` and
//! `storage.objects.delete` on the bucket (e.g. "Storage Object Admin").
//!
//! # Uploads
//!
//! Small objects are one request. Larger ones use a resumable upload: the parts handed to
//! [`PartUpload::put_part`] go through a channel holding at most one part into the SDK's
//! upload task, which sends them in chunks of 8 MiB and retries lost chunks itself. An
//! object becomes visible only when its upload is finalized, so an aborted upload leaves
//! nothing behind. Memory per open upload: the part being handed over, one part in the
//! channel, and the SDK's 8 MiB chunk (plus at most one part it has not cut yet).
//!
//! Uploads go through the SDK's JSON API client; listing and deleting objects use the JSON
//! API directly (with the same credentials), since the SDK's `StorageControl` client speaks
//! gRPC only, which emulators do not.

use async_trait::async_trait;
use bytes::Bytes;
use google_cloud_auth::credentials::{self, CacheableResource, Credentials};
use google_cloud_auth::signer::{Signer, SigningProvider};
use google_cloud_storage::builder::storage::SignedUrlBuilder;
use google_cloud_storage::client::Storage as StorageClient;
use google_cloud_storage::model::Object;
use google_cloud_storage::streaming_source::StreamingSource;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sluice_storage::{ObjectBackend, ObjectMeta, PartUpload, SignedUrl, StorageError};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Longest validity of a V4 signed URL: 7 days.
pub const MAX_SIGNED_URL_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Resumable uploads go in multiples of 256 KiB; parts may be that small.
const MIN_PART_BYTES: usize = 256 * 1024;

/// Bytes the SDK sends per resumable-upload request (and keeps in memory to resend them).
const UPLOAD_CHUNK_BYTES: usize = 8 << 20;

/// Longest wait for a single-request upload (at most one part).
const PUT_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest time a resumable upload may go without taking the next part (or finishing):
/// the SDK's own retries give up after 5 minutes, so this only ends uploads that hang.
const STALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest wait for one list or delete request.
const JSON_API_TIMEOUT: Duration = Duration::from_secs(60);

const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// Signer identity used against an emulator without a key.
const EMULATOR_CLIENT_EMAIL: &str = "sluice-emulator@localhost.invalid";

/// Unreserved characters (RFC 3986) stay; everything else is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Where export files go in Google Cloud Storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsConfig {
    /// The bucket name (without `gs://`).
    pub bucket: String,
    /// Another endpoint than `https://storage.googleapis.com`, e.g. `http://127.0.0.1:80` for
    /// fake-gcs-server. Without `service_account`, requests to it are anonymous.
    pub endpoint: Option<String>,
    /// A service account key; without it, application default credentials are used
    /// (or anonymous access when `endpoint` is set).
    pub service_account: Option<GcsServiceAccount>,
}

/// A service account key: its email and PEM private key. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct GcsServiceAccount {
    /// The service account email, e.g. `exporter@my-project.iam.gserviceaccount.com`.
    pub client_email: String,
    /// The PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), as in the key file's
    /// `private_key` field.
    pub private_key: String,
    /// The key's id (the key file's `private_key_id`), sent as the `kid` of the self-signed
    /// tokens that authorize requests; optional, as in Aidbox's `GcpServiceAccount`.
    pub private_key_id: Option<String>,
}

impl std::fmt::Debug for GcsServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key", &"[redacted]")
            .field("private_key_id", &self.private_key_id)
            .finish()
    }
}

/// Google Cloud Storage as an [`ObjectBackend`]: one bucket, one SDK client.
pub struct GcsBackend {
    bucket: String,
    /// `projects/_/buckets/<bucket>`, the SDK's name for the bucket.
    bucket_path: String,
    location: String,
    client: StorageClient,
    credentials: Credentials,
    http: reqwest::Client,
    /// `<endpoint>/storage/v1`.
    json_api: String,
    signer: Signer,
    /// Endpoint the signed URLs point at; `None` for `https://storage.googleapis.com`.
    sign_endpoint: Option<String>,
    /// Objects per list request; `None` for the API's default (1000).
    list_page_size: Option<u32>,
}

impl std::fmt::Debug for GcsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsBackend").field("bucket", &self.bucket).field("json_api", &self.json_api).finish()
    }
}

impl GcsBackend {
    /// Builds the client for `config` and checks that the bucket can be listed.
    ///
    /// Fails with [`StorageError::Backend`] for a bad configuration, a missing bucket or
    /// missing permissions, and with [`StorageError::Unavailable`] when GCS cannot be
    /// reached.
    pub async fn connect(config: GcsConfig) -> Result<GcsBackend, StorageError> {
        let backend = Self::build(config).await?;
        backend.list_page("", None, Some(1)).await?;
        tracing::info!(bucket = %backend.bucket, endpoint = %backend.json_api, "connected to Google Cloud Storage");
        Ok(backend)
    }

    /// Builds the clients without any request.
    async fn build(config: GcsConfig) -> Result<GcsBackend, StorageError> {
        let GcsConfig { bucket, endpoint, service_account } = config;
        let location = format!("gs://{bucket}");
        let fail = |reason: String| StorageError::Backend { location: location.clone(), reason };
        if bucket.is_empty() || bucket.contains('/') {
            return Err(fail(format!("invalid bucket name '{bucket}'")));
        }
        let endpoint = match endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
            Some(e) if e.starts_with("http://") || e.starts_with("https://") => {
                Some(e.trim_end_matches('/').to_string())
            }
            Some(e) => return Err(fail(format!("endpoint '{e}' must start with http:// or https://"))),
            None => None,
        };

        let (credentials, signer) = match (&service_account, &endpoint) {
            (Some(key), _) => service_account_auth(key).await.map_err(fail)?,
            (None, Some(_)) => {
                tracing::warn!(
                    bucket = %bucket,
                    "GCS endpoint without a service account: anonymous requests, signed URLs carry no valid signature"
                );
                (credentials::anonymous::Builder::new().build(), Signer::from(EmulatorSigner))
            }
            (None, None) => {
                let credentials = credentials::Builder::default()
                    .build()
                    .map_err(|e| fail(format!("no application default credentials: {e}")))?;
                let signer = credentials::Builder::default()
                    .build_signer()
                    .map_err(|e| fail(format!("cannot sign URLs with application default credentials: {e}")))?;
                (credentials, signer)
            }
        };

        let mut builder = StorageClient::builder()
            .with_credentials(credentials.clone())
            .with_resumable_upload_buffer_size(UPLOAD_CHUNK_BYTES);
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let client = builder.build().await.map_err(|e| fail(format!("cannot create the GCS client: {e}")))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(JSON_API_TIMEOUT)
            .build()
            .map_err(|e| fail(format!("cannot create the HTTP client: {e}")))?;
        let json_api = format!("{}/storage/v1", endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT));
        Ok(GcsBackend {
            bucket_path: format!("projects/_/buckets/{bucket}"),
            bucket,
            location,
            client,
            credentials,
            http,
            json_api,
            signer,
            sign_endpoint: endpoint,
            list_page_size: None,
        })
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Lists at most `size` objects per request instead of the API's 1000 (for tests of
    /// paging).
    pub fn with_list_page_size(mut self, size: u32) -> Self {
        self.list_page_size = Some(size.max(1));
        self
    }

    fn backend_error(&self, reason: String) -> StorageError {
        StorageError::Backend { location: self.location.clone(), reason }
    }

    fn unavailable(&self, reason: String) -> StorageError {
        StorageError::Unavailable { location: self.location.clone(), reason }
    }

    /// Maps an SDK error for operation `what` (e.g. "upload of 'a/b.ndjson'").
    fn sdk_error(&self, what: &str, error: &google_cloud_storage::Error) -> StorageError {
        let reason = format!("{what} failed: {}", short(&error.to_string()));
        match classify_sdk_error(error) {
            ErrorClass::Transient => self.unavailable(reason),
            ErrorClass::NoBucket => self.backend_error(format!("{what} failed: bucket '{}' not found", self.bucket)),
            ErrorClass::Denied => self.backend_error(format!("{what} failed: permission denied: {}", short_msg(error))),
            ErrorClass::Permanent => self.backend_error(reason),
        }
    }

    /// Authorization headers for a JSON API request.
    async fn auth_headers(&self) -> Result<http::HeaderMap, StorageError> {
        match self.credentials.headers(http::Extensions::new()).await {
            Ok(CacheableResource::New { data, .. }) => Ok(data),
            Ok(CacheableResource::NotModified) => Err(self.backend_error("credentials returned no headers".into())),
            Err(e) if e.is_transient() => {
                Err(self.unavailable(format!("cannot get credentials: {}", short(&e.to_string()))))
            }
            Err(e) => Err(self.backend_error(format!("cannot get credentials: {}", short(&e.to_string())))),
        }
    }

    /// Sends a JSON API request; maps transport failures and error statuses.
    async fn json_request(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Bytes), StorageError> {
        let headers = self.auth_headers().await?;
        let response = request.headers(headers).send().await.map_err(|e| {
            let kind = if e.is_timeout() { "timed out" } else { "could not be sent" };
            self.unavailable(format!("{what} {kind}: {}", short(&error_chain(&e))))
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            self.unavailable(format!("{what}: reading the response failed: {}", short(&error_chain(&e))))
        })?;
        Ok((status, body))
    }

    fn status_error(&self, what: &str, status: reqwest::StatusCode, body: &[u8]) -> StorageError {
        let message = json_error_message(body);
        let code = status.as_u16();
        match code {
            408 | 429 | 500..=599 => self.unavailable(format!("{what} failed with HTTP {code}: {message}")),
            401 | 403 => self.backend_error(format!("{what} failed: permission denied (HTTP {code}): {message}")),
            404 => self.backend_error(format!("{what} failed: bucket '{}' not found", self.bucket)),
            _ => self.backend_error(format!("{what} failed with HTTP {code}: {message}")),
        }
    }

    /// One page of object names under `prefix`, and the token of the next page.
    async fn list_page(
        &self,
        prefix: &str,
        page_token: Option<&str>,
        max_results: Option<u32>,
    ) -> Result<(Vec<String>, Option<String>), StorageError> {
        let mut url = format!(
            "{}/b/{}/o?fields={}&prefix={}",
            self.json_api,
            encode(&self.bucket),
            encode("items(name),nextPageToken"),
            encode(prefix)
        );
        if let Some(max) = max_results {
            url.push_str(&format!("&maxResults={max}"));
        }
        if let Some(token) = page_token {
            url.push_str(&format!("&pageToken={}", encode(token)));
        }
        let what = if prefix.is_empty() { "listing objects".to_string() } else { format!("listing '{prefix}'") };
        let (status, body) = self.json_request(&what, self.http.get(url)).await?;
        if !status.is_success() {
            return Err(self.status_error(&what, status, &body));
        }
        let page: ListPage = serde_json::from_slice(&body)
            .map_err(|e| self.backend_error(format!("{what}: unexpected response: {e}")))?;
        let names = page.items.into_iter().map(|item| item.name).collect();
        Ok((names, page.next_page_token.filter(|t| !t.is_empty())))
    }
}

/// How an SDK error is reported.
#[derive(Debug, PartialEq, Eq)]
enum ErrorClass {
    /// Timeouts, connection failures, 408, 429, 5xx: worth retrying.
    Transient,
    /// 404 on a bucket-level operation.
    NoBucket,
    /// 401 / 403.
    Denied,
    /// Anything else.
    Permanent,
}

fn classify_sdk_error(error: &google_cloud_storage::Error) -> ErrorClass {
    if let Some(code) = error.http_status_code() {
        return match code {
            408 | 429 | 500..=599 => ErrorClass::Transient,
            401 | 403 => ErrorClass::Denied,
            404 => ErrorClass::NoBucket,
            _ => ErrorClass::Permanent,
        };
    }
    if let Some(status) = error.status() {
        use google_cloud_gax::error::rpc::Code;
        return match status.code {
            Code::Unavailable | Code::ResourceExhausted | Code::Internal | Code::DeadlineExceeded | Code::Aborted => {
                ErrorClass::Transient
            }
            Code::PermissionDenied | Code::Unauthenticated => ErrorClass::Denied,
            Code::NotFound => ErrorClass::NoBucket,
            _ => ErrorClass::Permanent,
        };
    }
    if error.is_timeout() || error.is_io() || error.is_connect() || error.is_exhausted() || error.is_transport() {
        return ErrorClass::Transient;
    }
    if error.is_authentication() {
        let transient = std::error::Error::source(error)
            .and_then(|e| e.downcast_ref::<google_cloud_gax::error::CredentialsError>())
            .is_some_and(|e| e.is_transient());
        return if transient { ErrorClass::Transient } else { ErrorClass::Denied };
    }
    ErrorClass::Permanent
}

/// The service's own message of an SDK error, if it has one.
fn short_msg(error: &google_cloud_storage::Error) -> String {
    match error.http_payload() {
        Some(body) => json_error_message(body),
        None => short(&error.to_string()),
    }
}

/// The `error.message` of a JSON API error body, or the body itself (shortened).
fn json_error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        message: String,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(e) => short(&e.error.message),
        Err(_) => short(String::from_utf8_lossy(body).trim()),
    }
}

/// At most 300 characters, on one line.
fn short(text: &str) -> String {
    let one_line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match one_line.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

/// An error and its sources, joined with ": ".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

fn encode(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListPage {
    #[serde(default)]
    items: Vec<ListItem>,
    next_page_token: Option<String>,
}

#[derive(serde::Deserialize)]
struct ListItem {
    name: String,
}

/// Credentials and signer from a service account key; the key is checked by signing once.
async fn service_account_auth(key: &GcsServiceAccount) -> Result<(Credentials, Signer), String> {
    if key.client_email.trim().is_empty() {
        return Err("the service account has no client email".into());
    }
    if !key.private_key.contains("-----BEGIN PRIVATE KEY-----") {
        return Err("the service account private key must be a PKCS#8 PEM key (-----BEGIN PRIVATE KEY-----)".into());
    }
    let json = serde_json::json!({
        "type": "service_account",
        "client_email": key.client_email,
        "private_key": key.private_key,
        "private_key_id": key.private_key_id.as_deref().unwrap_or_default(),
        "project_id": "",
    });
    let credentials = credentials::service_account::Builder::new(json.clone())
        .build()
        .map_err(|e| format!("invalid service account key for '{}': {e}", key.client_email))?;
    let signer = credentials::service_account::Builder::new(json)
        .build_signer()
        .map_err(|e| format!("invalid service account key for '{}': {e}", key.client_email))?;
    signer
        .sign(b"sluice key check")
        .await
        .map_err(|e| format!("the private key of '{}' cannot sign: {e}", key.client_email))?;
    Ok((credentials, signer))
}

/// Signs nothing: for emulators, which do not check signatures.
#[derive(Debug)]
struct EmulatorSigner;

impl SigningProvider for EmulatorSigner {
    async fn client_email(&self) -> google_cloud_auth::signer::Result<String> {
        Ok(EMULATOR_CLIENT_EMAIL.to_string())
    }

    async fn sign(&self, _content: &[u8]) -> google_cloud_auth::signer::Result<Bytes> {
        Ok(Bytes::from_static(b"unsigned"))
    }
}

/// Reads `X-Goog-Date` (e.g. `20240301T120000Z`) from a signed URL.
fn signed_url_date(url: &str) -> Option<OffsetDateTime> {
    let query = url.split_once('?')?.1;
    let value = query.split('&').find_map(|pair| pair.strip_prefix("X-Goog-Date="))?;
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::PrimitiveDateTime::parse(value, format).ok().map(|t| t.assume_utc())
}

/// The validity actually granted for a requested `ttl`: between 1 s and 7 days, whole seconds.
fn clamp_ttl(ttl: Duration) -> Duration {
    Duration::from_secs(ttl.as_secs().clamp(1, MAX_SIGNED_URL_TTL.as_secs()))
}

#[async_trait]
impl ObjectBackend for GcsBackend {
    fn describe(&self) -> String {
        self.location.clone()
    }

    fn provider(&self) -> &'static str {
        "gcp"
    }

    fn min_part_bytes(&self) -> usize {
        MIN_PART_BYTES
    }

    async fn put_object(&self, key: &str, meta: &ObjectMeta, data: Bytes) -> Result<(), StorageError> {
        let what = format!("upload of '{key}'");
        let size = data.len();
        // Sent up front in the metadata, GCS checks it against what it receives (and the
        // request stays a plain two-part upload instead of one with trailing checksums).
        let crc32c = crc32c::crc32c(&data);
        let mut request = self
            .client
            .write_object(&self.bucket_path, key, data)
            .set_content_type(&meta.content_type)
            .with_known_crc32c(crc32c)
            // Always one request: resumable uploads start at sizes above this one.
            .with_resumable_upload_threshold(size.saturating_add(1));
        if let Some(encoding) = &meta.content_encoding {
            // `no-transform`: GCS serves the stored gzip bytes to every client instead of
            // decompressing for those that do not send `Accept-Encoding: gzip`, so the
            // manifest's size and SHA-256 always match the download (D10).
            request = request.set_content_encoding(encoding).set_cache_control("no-transform");
        }
        match tokio::time::timeout(PUT_TIMEOUT, request.send_unbuffered()).await {
            Ok(Ok(_)) => {
                tracing::debug!(bucket = %self.bucket, key, size, "uploaded object");
                Ok(())
            }
            Ok(Err(e)) => Err(self.sdk_error(&what, &e)),
            Err(_) => Err(self.unavailable(format!("{what} timed out after {} s", PUT_TIMEOUT.as_secs()))),
        }
    }

    async fn start_upload(&self, key: &str, meta: &ObjectMeta) -> Result<Box<dyn PartUpload>, StorageError> {
        let (tx, rx) = mpsc::channel(1);
        let mut request = self
            .client
            .write_object(&self.bucket_path, key, ChannelSource { rx, ended: false })
            .set_content_type(&meta.content_type)
            // The size is unknown up front, so this is always a resumable upload.
            .with_resumable_upload_threshold(0_usize)
            .with_resumable_upload_buffer_size(UPLOAD_CHUNK_BYTES);
        if let Some(encoding) = &meta.content_encoding {
            // `no-transform`: GCS serves the stored gzip bytes to every client instead of
            // decompressing for those that do not send `Accept-Encoding: gzip`, so the
            // manifest's size and SHA-256 always match the download (D10).
            request = request.set_content_encoding(encoding).set_cache_control("no-transform");
        }
        let task = tokio::spawn(request.send_buffered());
        tracing::debug!(bucket = %self.bucket, key, "started resumable upload");
        Ok(Box::new(GcsUpload {
            location: self.location.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            tx: Some(tx),
            task: Some(task),
            next_index: 0,
            failure: None,
        }))
    }

    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError> {
        let ttl = clamp_ttl(ttl);
        let mut builder = SignedUrlBuilder::for_object(&self.bucket_path, key)
            .with_method(google_cloud_storage::http::Method::GET)
            .with_expiration(ttl);
        if let Some(endpoint) = &self.sign_endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let url = builder.sign_with(&self.signer).await.map_err(|e| {
            let transient = std::iter::successors(std::error::Error::source(&e), |e| e.source())
                .filter_map(|e| e.downcast_ref::<google_cloud_auth::signer::SigningError>())
                .any(|e| e.is_transport());
            let reason = format!("signing a URL for '{key}' failed: {}", short(&error_chain(&e)));
            if transient { self.unavailable(reason) } else { self.backend_error(reason) }
        })?;
        let signed_at = signed_url_date(&url)
            .ok_or_else(|| self.backend_error(format!("the signed URL for '{key}' has no valid X-Goog-Date")))?;
        Ok(SignedUrl { url, expires: signed_at + ttl })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let (names, next) = self.list_page(prefix, token.as_deref(), self.list_page_size).await?;
            keys.extend(names);
            match next {
                Some(next) => token = Some(next),
                None => return Ok(keys),
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let url = format!("{}/b/{}/o/{}", self.json_api, encode(&self.bucket), encode(key));
        let what = format!("deleting '{key}'");
        let (status, body) = self.json_request(&what, self.http.delete(url)).await?;
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.status_error(&what, status, &body))
        }
    }
}

/// What the upload task is fed: a part, or the end of the object. A channel closed without
/// `End` means the upload was abandoned, and the task fails instead of finalizing.
enum Feed {
    Part(Bytes),
    End,
}

/// The SDK's data source for a resumable upload: the parts from [`GcsUpload::put_part`].
struct ChannelSource {
    rx: mpsc::Receiver<Feed>,
    ended: bool,
}

impl StreamingSource for ChannelSource {
    type Error = std::io::Error;

    async fn next(&mut self) -> Option<Result<Bytes, Self::Error>> {
        if self.ended {
            return None;
        }
        match self.rx.recv().await {
            Some(Feed::Part(data)) => Some(Ok(data)),
            Some(Feed::End) => {
                self.ended = true;
                None
            }
            None => Some(Err(std::io::Error::other("the upload was abandoned before completion"))),
        }
    }
}

/// A resumable upload in progress: a spawned SDK upload fed through a channel.
struct GcsUpload {
    location: String,
    bucket: String,
    key: String,
    tx: Option<mpsc::Sender<Feed>>,
    task: Option<JoinHandle<google_cloud_storage::Result<Object>>>,
    next_index: u32,
    /// Why the upload failed, once it has.
    failure: Option<String>,
}

impl GcsUpload {
    fn error(&self, reason: String) -> StorageError {
        StorageError::Backend { location: self.location.clone(), reason }
    }

    /// Waits for the upload task and gives its outcome (an error if it failed or ended
    /// without being told to).
    async fn join(&mut self) -> Result<(), StorageError> {
        if let Some(reason) = &self.failure {
            return Err(self.error(reason.clone()));
        }
        let Some(mut task) = self.task.take() else {
            return Err(self.error(format!("upload of '{}' is already finished", self.key)));
        };
        self.tx = None;
        let what = format!("resumable upload of '{}'", self.key);
        let outcome = tokio::time::timeout(STALL_TIMEOUT, &mut task).await;
        let reason = match outcome {
            Err(_) => {
                // Dropping a JoinHandle would leave the task running.
                task.abort();
                format!("{what} stalled: not finished after {} s", STALL_TIMEOUT.as_secs())
            }
            Ok(Ok(Ok(_))) => return Ok(()),
            Ok(Ok(Err(e))) => match classify_sdk_error(&e) {
                ErrorClass::NoBucket => format!("{what} failed: bucket '{}' not found", self.bucket),
                ErrorClass::Denied => format!("{what} failed: permission denied: {}", short_msg(&e)),
                ErrorClass::Transient => format!("{what} failed after the SDK's retries: {}", short(&e.to_string())),
                ErrorClass::Permanent => format!("{what} failed: {}", short(&e.to_string())),
            },
            Ok(Err(e)) => format!("{what}: the upload task failed: {e}"),
        };
        self.failure = Some(reason.clone());
        Err(self.error(reason))
    }
}

#[async_trait]
impl PartUpload for GcsUpload {
    // Errors are never `Unavailable`: the SDK already retried, and a failed resumable
    // upload cannot take the same part again.
    async fn put_part(&mut self, index: u32, data: Bytes) -> Result<(), StorageError> {
        if let Some(reason) = &self.failure {
            return Err(self.error(reason.clone()));
        }
        if index != self.next_index {
            return Err(self
                .error(format!("upload of '{}': part {index} out of order (expected {})", self.key, self.next_index)));
        }
        let Some(tx) = &self.tx else {
            return Err(self.error(format!("upload of '{}' is already finished", self.key)));
        };
        match tokio::time::timeout(STALL_TIMEOUT, tx.send(Feed::Part(data))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // The task ended early: report why.
                self.join().await?;
                let reason = format!("upload of '{}' ended before all parts were sent", self.key);
                self.failure = Some(reason.clone());
                return Err(self.error(reason));
            }
            Err(_) => {
                self.abort().await;
                let reason = format!("upload of '{}' stalled: no progress for {} s", self.key, STALL_TIMEOUT.as_secs());
                self.failure = Some(reason.clone());
                return Err(self.error(reason));
            }
        }
        self.next_index += 1;
        Ok(())
    }

    async fn complete(&mut self) -> Result<(), StorageError> {
        if let Some(tx) = self.tx.take() {
            // A send error means the task has ended, and a timeout that it hangs; `join`
            // says how.
            let _ = tokio::time::timeout(STALL_TIMEOUT, tx.send(Feed::End)).await;
        }
        self.join().await?;
        tracing::debug!(bucket = %self.bucket, key = %self.key, parts = self.next_index, "finished resumable upload");
        Ok(())
    }

    async fn abort(&mut self) {
        if let Some(task) = self.task.take() {
            // Cancel before closing the channel, so the SDK never sees the end of the data.
            task.abort();
            let _ = task.await;
        }
        self.tx = None;
        self.failure.get_or_insert_with(|| "the upload was aborted".to_string());
        tracing::debug!(bucket = %self.bucket, key = %self.key, "aborted resumable upload");
    }
}

impl Drop for GcsUpload {
    fn drop(&mut self) {
        // Dropped without complete/abort: stop the upload; the channel then closes without
        // `End`, so the object is never finalized.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests;
