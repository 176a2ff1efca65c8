//! Amazon S3 (and S3-compatible: MinIO, moto, ...) storage for Sluice export files.
//!
//! [`S3Backend`] implements [`ObjectBackend`]: one S3 request per call, nothing buffered and
//! nothing retried here (the AWS SDK's own retries are switched off). Wrap it with
//! [`storage`] (or [`CloudStorage::new`]) to get a [`sluice_storage::Storage`] that buffers
//! each file into parts, uploads small files with a single `PutObject` and large ones with a
//! multipart upload, and retries transient failures.
//!
//! # Configuration
//!
//! [`S3Config`] names the bucket and optionally a region, a custom endpoint and static keys:
//!
//! - **Region**: `region`, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else the shared config
//!   profile, else `us-east-1`. (The EC2 instance metadata service is not asked for the
//!   region: set it explicitly on EC2.)
//! - **Endpoint**: when `endpoint` is set (e.g. `http://127.0.0.1:9000` for MinIO), requests
//!   go there with path-style addressing (`<endpoint>/<bucket>/<key>`). Otherwise the AWS
//!   endpoint of the region is used, with virtual-hosted addressing.
//!
//! # Authentication
//!
//! - **Static keys**: with `credentials` set, every request is signed with that access key
//!   pair and nothing else is looked up.
//! - **Default credential chain**: without `credentials`, the AWS SDK's chain is used, in
//!   order: environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`),
//!   shared config/credentials profiles, web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` +
//!   `AWS_ROLE_ARN`: EKS IRSA), container credentials (EKS Pod Identity, ECS task roles) and
//!   the EC2 instance role (IMDS). Temporary credentials are refreshed before they expire.
//!
//! Signed download URLs are SigV4 presigned `GetObject` URLs. S3 accepts at most 7 days, so
//! longer lifetimes are shortened, and the returned [`SignedUrl::expires`] is always the
//! true expiry. A URL signed with temporary credentials (web identity, container or instance
//! role) stops working when those credentials expire, so its `expires` is never later than
//! theirs (typically an hour at most); temporary credentials are replaced five minutes
//! before they expire, so such a URL is still valid for at least about five minutes. Use
//! static keys for long-lived links.
//!
//! Multipart uploads that are neither completed nor aborted (a crashed process) keep their
//! parts in the bucket: give the bucket a lifecycle rule that aborts incomplete multipart
//! uploads after a day or so.

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::environment::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Credentials, IdentityCache, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use sluice_storage::{CloudOptions, CloudStorage, ObjectBackend, ObjectMeta, PartUpload, SignedUrl, StorageError};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;

/// The longest lifetime S3 accepts for a presigned URL: 7 days.
pub const MAX_URL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The smallest part S3 accepts in a multipart upload (all but the last part): 5 MiB.
pub const MIN_PART_BYTES: usize = 5 << 20;

/// The region used when neither the configuration nor the environment names one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// How long before temporary credentials expire they are replaced: a URL signed with them
/// stays valid at least this long.
const CREDENTIALS_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Where export files go in S3, and how to sign in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket (must exist).
    pub bucket: String,
    /// The AWS region, e.g. `eu-west-1`; `None` reads it from the environment, or uses
    /// `us-east-1`.
    pub region: Option<String>,
    /// A custom endpoint URL for S3-compatible stores (MinIO, moto), e.g.
    /// `http://127.0.0.1:9000`; implies path-style addressing.
    pub endpoint: Option<String>,
    /// Static keys; `None` uses the AWS default credential chain (environment, web identity,
    /// container credentials, instance role).
    pub credentials: Option<S3Keys>,
}

/// A static access key pair. Its `Debug` output hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Keys {
    /// The access key id, e.g. `AKIA...`.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

impl fmt::Debug for S3Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Keys")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// An S3 bucket as an [`ObjectBackend`]: one request per call, no retries.
#[derive(Clone)]
pub struct S3Backend {
    client: Client,
    bucket: String,
    location: String,
    credentials: RecentCredentials,
}

impl fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Backend").field("location", &self.location).finish_non_exhaustive()
    }
}

/// Wraps `backend` into a [`sluice_storage::Storage`] that buffers parts and retries
/// (the same as [`CloudStorage::new`]).
pub fn storage(backend: S3Backend, options: CloudOptions) -> CloudStorage<S3Backend> {
    CloudStorage::new(backend, options)
}

impl S3Backend {
    /// Builds a client for `config.bucket`. Checks the configuration and resolves the region,
    /// but sends no request: a missing bucket or bad credentials show up on first use.
    pub async fn connect(config: S3Config) -> Result<S3Backend, StorageError> {
        let S3Config { bucket, region, endpoint, credentials } = config;
        let location = describe(&bucket, endpoint.as_deref());
        let invalid = |reason: String| StorageError::Backend { location: location.clone(), reason };
        if bucket.is_empty() || bucket.contains('/') {
            return Err(invalid(format!("invalid bucket name '{bucket}'")));
        }
        if let Some(endpoint) = &endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid("the endpoint must be an http:// or https:// URL".to_string()));
        }
        let region = match region.filter(|r| !r.is_empty()) {
            Some(region) => Region::new(region),
            None => RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
                .or_else(ProfileFileRegionProvider::new())
                .region()
                .await
                .unwrap_or(Region::from_static(DEFAULT_REGION)),
        };
        let auth = if credentials.is_some() { "static keys" } else { "default credential chain" };
        tracing::debug!(location, %region, auth, "S3 storage configured");

        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region);
        if let Some(keys) = credentials {
            let creds = Credentials::new(keys.access_key_id, keys.secret_access_key, None, None, "sluice-static");
            loader = loader.credentials_provider(creds);
        }
        let shared = loader.load().await;
        let provider = shared
            .credentials_provider()
            .ok_or_else(|| invalid("no AWS credentials provider is available".to_string()))?;
        let credentials = RecentCredentials { inner: provider, seen: Arc::default() };

        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .operation_attempt_timeout(Duration::from_secs(300))
            .build();
        // Retries live in `CloudStorage`; the SDK's own would multiply them.
        let mut s3 = aws_sdk_s3::config::Builder::from(&shared)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .credentials_provider(SharedCredentialsProvider::new(credentials.clone()))
            .identity_cache(IdentityCache::lazy().buffer_time(CREDENTIALS_REFRESH_MARGIN).build());
        if let Some(endpoint) = endpoint {
            s3 = s3.endpoint_url(endpoint).force_path_style(true);
        }
        let client = Client::from_conf(s3.build());
        Ok(S3Backend { client, bucket, location, credentials })
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// A presigned `GetObject` URL for `key` whose validity starts at `start` (truncated to
    /// whole seconds) and lasts `ttl` (at most [`MAX_URL_TTL`], at least one second).
    /// [`ObjectBackend::signed_url`] calls this with the current time; tests fix the time.
    #[doc(hidden)]
    pub async fn presign_get_at(&self, key: &str, ttl: Duration, start: SystemTime) -> Result<SignedUrl, StorageError> {
        let start_secs = start.duration_since(UNIX_EPOCH).map_err(|_| self.fail("clock is before 1970"))?.as_secs();
        let ttl_secs = ttl.as_secs().clamp(1, MAX_URL_TTL.as_secs());
        let presigning = PresigningConfig::builder()
            .start_time(UNIX_EPOCH + Duration::from_secs(start_secs))
            .expires_in(Duration::from_secs(ttl_secs))
            .build()
            .map_err(|e| self.fail(format!("cannot presign '{key}': {e}")))?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(presigning)
            .await
            .map_err(|e| self.sdk_error("presign GetObject", key, e))?;
        let url = request.uri().to_string();
        // A URL signed with temporary credentials dies with them.
        let mut expires_secs = start_secs + ttl_secs;
        if let Some(expiry) = self.credentials.expiry_of(&url) {
            let expiry_secs = expiry.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            expires_secs = expires_secs.min(expiry_secs);
        }
        let expires = i64::try_from(expires_secs)
            .ok()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .ok_or_else(|| self.fail("expiry out of range"))?;
        Ok(SignedUrl { url, expires })
    }

    fn fail(&self, reason: impl Into<String>) -> StorageError {
        StorageError::Backend { location: self.location.clone(), reason: reason.into() }
    }

    fn sdk_error<E>(&self, op: &str, key: &str, err: SdkError<E>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        map_error(&self.location, &self.bucket, op, key, err)
    }
}

/// An access key id and when its credentials expire (`None`: never).
type KeyExpiry = (String, Option<SystemTime>);

/// Passes credentials through from the configured provider (static keys or the default
/// chain), remembering the expiry of the last few so that a signed URL can tell when the
/// credentials it was signed with stop working. The SDK's identity cache sits in front, so
/// this is only called when credentials are (re)loaded.
#[derive(Debug, Clone)]
struct RecentCredentials {
    inner: SharedCredentialsProvider,
    /// (access key id, expiry), newest last; shared by the clones.
    seen: Arc<Mutex<Vec<KeyExpiry>>>,
}

impl RecentCredentials {
    /// The expiry of the credentials whose access key signed `url`, if they expire.
    fn expiry_of(&self, url: &str) -> Option<SystemTime> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter().rev().find(|(id, _)| url.contains(&format!("X-Amz-Credential={id}%2F"))).and_then(|(_, e)| *e)
    }
}

impl ProvideCredentials for RecentCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            let credentials = self.inner.provide_credentials().await?;
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.retain(|(id, _)| id != credentials.access_key_id());
            seen.push((credentials.access_key_id().to_string(), credentials.expiry()));
            let excess = seen.len().saturating_sub(4);
            seen.drain(..excess);
            Ok(credentials)
        })
    }
}

/// `s3://bucket`, plus the endpoint's host when it is not AWS.
fn describe(bucket: &str, endpoint: Option<&str>) -> String {
    match endpoint {
        None => format!("s3://{bucket}"),
        Some(url) => {
            let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
            let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
            // Never show user:password@ if someone put credentials in the URL.
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            format!("s3://{bucket} at {host}")
        }
    }
}

/// S3 error codes worth retrying whatever their HTTP status.
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "TooManyRequests"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "RequestThrottled"
            | "RequestTimeout"
            | "RequestTimeoutException"
            | "InternalError"
            | "ServiceUnavailable"
            | "OperationAborted"
    )
}

/// Whether an S3 error response is transient: 5xx, 429 or a throttling/timeout code.
fn transient_response(status: u16, code: Option<&str>) -> bool {
    status >= 500 || status == 429 || code.is_some_and(transient_code)
}

/// Turns an SDK error into a [`StorageError`]: transient ones become `Unavailable`.
fn map_error<E>(location: &str, bucket: &str, op: &str, key: &str, err: SdkError<E>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let unavailable = |reason: String| StorageError::Unavailable { location: location.to_string(), reason };
    let backend = |reason: String| StorageError::Backend { location: location.to_string(), reason };
    let what = if key.is_empty() { op.to_string() } else { format!("{op} '{key}'") };
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let e = service.err();
            let code = e.code();
            let reason = match (code, e.message()) {
                (Some(code), Some(message)) => format!("{what}: {code} (HTTP {status}): {message}"),
                (Some(code), None) => format!("{what}: {code} (HTTP {status})"),
                _ => format!("{what}: HTTP {status}: {}", error_chain(e)),
            };
            match code {
                Some("NoSuchBucket") => backend(format!("{what}: bucket '{bucket}' does not exist (HTTP {status})")),
                Some("NoSuchKey") => StorageError::NotFound(key.to_string()),
                _ if transient_response(status, code) => unavailable(reason),
                _ if status == 404 && code.is_none() => StorageError::NotFound(key.to_string()),
                Some("AccessDenied") | Some("InvalidAccessKeyId") | Some("SignatureDoesNotMatch") => {
                    backend(format!("{reason} (check the credentials and the bucket policy)"))
                }
                _ => backend(reason),
            }
        }
        SdkError::TimeoutError(_) => unavailable(format!("{what}: timed out")),
        SdkError::ResponseError(_) => unavailable(format!("{what}: bad response: {}", error_chain(&err))),
        SdkError::DispatchFailure(failure) => {
            // Connection refused/reset, DNS, TLS, timeouts, credential look-ups: transient.
            // A request the client itself finds invalid is not.
            let reason = format!("{what}: request failed: {}", error_chain(&err));
            if failure.is_user() { backend(reason) } else { unavailable(reason) }
        }
        _ => backend(format!("{what}: {}", error_chain(&err))),
    }
}

/// The error and its sources, joined with `: `.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[async_trait]
impl ObjectBackend for S3Backend {
    fn describe(&self) -> String {
        self.location.clone()
    }

    fn provider(&self) -> &'static str {
        "aws"
    }

    fn min_part_bytes(&self) -> usize {
        MIN_PART_BYTES
    }

    async fn put_object(&self, key: &str, meta: &ObjectMeta, data: Bytes) -> Result<(), StorageError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(&meta.content_type)
            .set_content_encoding(meta.content_encoding.clone())
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.sdk_error("PutObject", key, e))?;
        Ok(())
    }

    async fn start_upload(&self, key: &str, meta: &ObjectMeta) -> Result<Box<dyn PartUpload>, StorageError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(&meta.content_type)
            .set_content_encoding(meta.content_encoding.clone())
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| self.sdk_error("CreateMultipartUpload", key, e))?;
        let upload_id = out
            .upload_id()
            .ok_or_else(|| self.fail(format!("CreateMultipartUpload '{key}': no upload id in the response")))?
            .to_string();
        Ok(Box::new(S3Upload {
            backend: self.clone(),
            key: key.to_string(),
            upload_id,
            parts: Vec::new(),
            complete_tried: false,
            finished: false,
        }))
    }

    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError> {
        self.presign_get_at(key, ttl, SystemTime::now()).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.sdk_error("ListObjectsV2", prefix, e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key()).map(str::to_string));
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => return Ok(keys),
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.client.delete_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(e) => match self.sdk_error("DeleteObject", key, e) {
                StorageError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }
}

/// One multipart upload: the ETag (and CRC32) of every part put so far, by index.
struct S3Upload {
    backend: S3Backend,
    key: String,
    upload_id: String,
    parts: Vec<Option<CompletedPart>>,
    complete_tried: bool,
    finished: bool,
}

impl S3Upload {
    fn error<E>(&self, op: &str, err: SdkError<E>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.backend.sdk_error(op, &self.key, err)
    }
}

#[async_trait]
impl PartUpload for S3Upload {
    async fn put_part(&mut self, index: u32, data: Bytes) -> Result<(), StorageError> {
        let number =
            index.checked_add(1).and_then(|n| i32::try_from(n).ok()).filter(|n| *n <= 10_000).ok_or_else(|| {
                self.backend.fail(format!("UploadPart '{}': too many parts (S3 allows 10000)", self.key))
            })?;
        let out = self
            .backend
            .client
            .upload_part()
            .bucket(&self.backend.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.error("UploadPart", e))?;
        let etag = out
            .e_tag()
            .ok_or_else(|| self.backend.fail(format!("UploadPart '{}': no ETag in the response", self.key)))?;
        let part = CompletedPart::builder()
            .part_number(number)
            .e_tag(etag)
            .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
            .build();
        let slot = index as usize;
        if self.parts.len() <= slot {
            self.parts.resize(slot + 1, None);
        }
        self.parts[slot] = Some(part);
        Ok(())
    }

    async fn complete(&mut self) -> Result<(), StorageError> {
        let parts: Vec<CompletedPart> = self.parts.iter().flatten().cloned().collect();
        if parts.is_empty() || parts.len() != self.parts.len() {
            return Err(self.backend.fail(format!("CompleteMultipartUpload '{}': parts are missing", self.key)));
        }
        let retry = self.complete_tried;
        self.complete_tried = true;
        let result = self
            .backend
            .client
            .complete_multipart_upload()
            .bucket(&self.backend.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await;
        match result {
            Ok(_) => {
                self.finished = true;
                Ok(())
            }
            // A retry after a lost response: the upload is gone because it completed.
            Err(e) if retry && e.as_service_error().and_then(|s| s.code()) == Some("NoSuchUpload") => {
                let head = self.backend.client.head_object().bucket(&self.backend.bucket).key(&self.key).send().await;
                match head {
                    Ok(_) => {
                        self.finished = true;
                        Ok(())
                    }
                    Err(_) => Err(self.error("CompleteMultipartUpload", e)),
                }
            }
            Err(e) => Err(self.error("CompleteMultipartUpload", e)),
        }
    }

    async fn abort(&mut self) {
        if self.finished {
            return;
        }
        let result = self
            .backend
            .client
            .abort_multipart_upload()
            .bucket(&self.backend.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .send()
            .await;
        match result {
            Ok(_) => self.finished = true,
            Err(e) => {
                let error = self.error("AbortMultipartUpload", e);
                tracing::warn!(%error, "could not abort a multipart upload; its parts stay until a lifecycle rule removes them");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_bucket_and_endpoint_without_userinfo() {
        assert_eq!(describe("b", None), "s3://b");
        assert_eq!(describe("b", Some("http://127.0.0.1:5000")), "s3://b at 127.0.0.1:5000");
        assert_eq!(describe("b", Some("https://u:secret@minio.local:9000/x")), "s3://b at minio.local:9000");
    }

    #[test]
    fn debug_hides_the_secret() {
        let config = S3Config {
            bucket: "b".into(),
            credentials: Some(S3Keys { access_key_id: "AKIDEXAMPLE".into(), secret_access_key: "s3cr3t".into() }),
            ..Default::default()
        };
        let text = format!("{config:?}");
        assert!(text.contains("AKIDEXAMPLE"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn classifies_responses() {
        assert!(transient_response(500, Some("InternalError")));
        assert!(transient_response(503, Some("SlowDown")));
        assert!(transient_response(503, None));
        assert!(transient_response(429, None));
        assert!(transient_response(400, Some("RequestTimeout")));
        assert!(!transient_response(403, Some("AccessDenied")));
        assert!(!transient_response(404, Some("NoSuchBucket")));
        assert!(!transient_response(400, Some("InvalidPart")));
    }

    #[tokio::test]
    async fn connection_refused_is_unavailable() {
        // Port 9 on loopback: nothing listens there.
        let backend = S3Backend::connect(S3Config {
            bucket: "sluice-b".into(),
            region: Some("us-east-1".into()),
            endpoint: Some("http://127.0.0.1:9".into()),
            credentials: Some(S3Keys { access_key_id: "id".into(), secret_access_key: "s3cr3t".into() }),
        })
        .await
        .unwrap();
        let err = backend.put_object("a/b", &ObjectMeta::ndjson(false), Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(err, StorageError::Unavailable { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("s3://sluice-b at 127.0.0.1:9") && text.contains("PutObject 'a/b'"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[tokio::test]
    async fn rejects_bad_config() {
        let bad_bucket = S3Backend::connect(S3Config { bucket: "a/b".into(), ..Default::default() }).await;
        assert!(matches!(bad_bucket, Err(StorageError::Backend { .. })));
        let bad_endpoint = S3Backend::connect(S3Config {
            bucket: "b".into(),
            endpoint: Some("127.0.0.1:5000".into()),
            ..Default::default()
        })
        .await;
        let err = bad_endpoint.unwrap_err().to_string();
        assert!(err.contains("s3://b"), "{err}");
    }
}
