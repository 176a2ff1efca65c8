//! What every cloud provider shares, written once: buffering a stream into parts bounded
//! by bytes, a single upload for small objects, retries with backoff, and key checks.
//!
//! A provider crate implements [`ObjectBackend`] (one request per method, no buffering,
//! no retries) and wraps it in [`CloudStorage`], which implements [`Storage`].

use crate::{ObjectMeta, ObjectWriter, SignedUrl, Storage, StorageError, validate_key};
use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// An upload of one object in parts, started by [`ObjectBackend::start_upload`].
#[async_trait]
pub trait PartUpload: Send + Sync {
    /// Uploads part `index` (0, 1, 2, ... in order). Every part but the last is at least
    /// [`ObjectBackend::min_part_bytes`] long. May be called again with the same index and
    /// bytes after a [`StorageError::Unavailable`].
    async fn put_part(&mut self, index: u32, data: Bytes) -> Result<(), StorageError>;
    /// Makes the object visible under its key, made of the parts put so far.
    async fn complete(&mut self) -> Result<(), StorageError>;
    /// Discards the parts; the key stays absent. Best effort.
    async fn abort(&mut self);
}

/// One provider's object API: one request per call, no buffering and no retries (those
/// live in [`CloudStorage`]). Transient failures are reported as
/// [`StorageError::Unavailable`] so that they are retried.
#[async_trait]
pub trait ObjectBackend: Send + Sync + 'static {
    /// Provider and location, e.g. `s3://bucket`; never credentials.
    fn describe(&self) -> String;
    /// The smallest part the provider accepts before the last one (S3: 5 MiB).
    fn min_part_bytes(&self) -> usize;
    /// Uploads a whole small object in one request.
    async fn put_object(&self, key: &str, meta: &ObjectMeta, data: Bytes) -> Result<(), StorageError>;
    /// Starts a multipart / staged-block / resumable upload.
    async fn start_upload(&self, key: &str, meta: &ObjectMeta) -> Result<Box<dyn PartUpload>, StorageError>;
    /// A signed GET URL for `key`, valid for `ttl`.
    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError>;
    /// Keys of the objects under `prefix` (all of them, across pages).
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError>;
    /// Deletes one object; deleting an absent one is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
}

/// How [`CloudStorage`] buffers and retries.
#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// Bytes per uploaded part (raised to the provider's minimum). Each open file holds at
    /// most one part in memory.
    pub part_bytes: usize,
    /// Attempts per request, the first included.
    pub attempts: usize,
    /// Delay before the first retry; doubled each time, with jitter.
    pub first_backoff: Duration,
    /// Longest delay between retries.
    pub max_backoff: Duration,
}

impl Default for CloudOptions {
    fn default() -> Self {
        CloudOptions {
            part_bytes: 8 << 20,
            attempts: 5,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A [`Storage`] over any [`ObjectBackend`].
pub struct CloudStorage<B> {
    backend: Arc<B>,
    options: CloudOptions,
}

impl<B: ObjectBackend> CloudStorage<B> {
    /// Wraps `backend` with the given buffering and retry options.
    pub fn new(backend: B, options: CloudOptions) -> Self {
        CloudStorage { backend: Arc::new(backend), options }
    }

    /// The provider's backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

/// The retry schedule of one request: exponential delays with jitter.
pub struct Backoff {
    what: &'static str,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    /// A fresh schedule for the request `what` (named in warnings).
    pub fn new(options: &CloudOptions, what: &'static str) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(options.first_backoff)
            .with_max_delay(options.max_backoff)
            .with_max_times(options.attempts.saturating_sub(1))
            .with_jitter();
        Backoff { what, delays: builder.build() }
    }

    /// After a failed attempt: waits before the next one if `error` is transient and
    /// attempts are left, otherwise gives the error back.
    pub async fn wait(&mut self, error: StorageError) -> Result<(), StorageError> {
        if !matches!(error, StorageError::Unavailable { .. }) {
            return Err(error);
        }
        let Some(delay) = self.delays.next() else { return Err(error) };
        tracing::warn!(op = self.what, error = %error, retry_in = ?delay, "storage request failed, retrying");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// Runs `op` until it succeeds, fails for good, or runs out of attempts. Only
/// [`StorageError::Unavailable`] is retried.
pub async fn with_retries<T, F, Fut>(options: &CloudOptions, what: &'static str, mut op: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let mut backoff = Backoff::new(options, what);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => backoff.wait(e).await?,
        }
    }
}

#[async_trait]
impl<B: ObjectBackend> Storage for CloudStorage<B> {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    async fn create(&self, key: &str, meta: ObjectMeta) -> Result<Box<dyn ObjectWriter>, StorageError> {
        validate_key(key)?;
        let part_bytes = self.options.part_bytes.max(self.backend.min_part_bytes()).max(1);
        Ok(Box::new(CloudWriter {
            backend: self.backend.clone(),
            options: self.options.clone(),
            key: key.to_string(),
            meta,
            part_bytes,
            buf: BytesMut::new(),
            upload: None,
            parts: 0,
            size: 0,
        }))
    }

    async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError> {
        validate_key(key)?;
        self.backend.signed_url(key, ttl).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let keys = with_retries(&self.options, "list", || self.backend.list(prefix)).await?;
        for key in &keys {
            with_retries(&self.options, "delete", || self.backend.delete(key)).await?;
        }
        Ok(keys.len() as u64)
    }
}

/// Buffers one part at a time; the upload starts when the first part is full, so an
/// object smaller than a part is one request.
struct CloudWriter<B> {
    backend: Arc<B>,
    options: CloudOptions,
    key: String,
    meta: ObjectMeta,
    part_bytes: usize,
    buf: BytesMut,
    upload: Option<Box<dyn PartUpload>>,
    parts: u32,
    size: u64,
}

impl<B: ObjectBackend> CloudWriter<B> {
    async fn flush_part(&mut self, data: Bytes) -> Result<(), StorageError> {
        if self.upload.is_none() {
            let (backend, key, meta) = (&self.backend, &self.key, &self.meta);
            let upload = with_retries(&self.options, "start upload", || backend.start_upload(key, meta)).await?;
            self.upload = Some(upload);
        }
        let upload = self.upload.as_mut().expect("started above");
        let mut backoff = Backoff::new(&self.options, "upload part");
        while let Err(e) = upload.put_part(self.parts, data.clone()).await {
            if let Err(e) = backoff.wait(e).await {
                upload.abort().await;
                self.upload = None;
                return Err(e);
            }
        }
        self.parts += 1;
        Ok(())
    }
}

#[async_trait]
impl<B: ObjectBackend> ObjectWriter for CloudWriter<B> {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        self.size += chunk.len() as u64;
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let room = self.part_bytes - self.buf.len();
            let take = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.part_bytes {
                let part = self.buf.split().freeze();
                self.flush_part(part).await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StorageError> {
        let last = self.buf.split().freeze();
        if self.upload.is_none() {
            let (backend, key, meta) = (&self.backend, &self.key, &self.meta);
            with_retries(&self.options, "put object", || backend.put_object(key, meta, last.clone())).await?;
            return Ok(self.size);
        }
        if !last.is_empty() {
            self.flush_part(last).await?;
        }
        let upload = self.upload.as_mut().expect("checked above");
        let mut backoff = Backoff::new(&self.options, "complete upload");
        while let Err(e) = upload.complete().await {
            if let Err(e) = backoff.wait(e).await {
                upload.abort().await;
                return Err(e);
            }
        }
        Ok(self.size)
    }

    async fn abort(mut self: Box<Self>) {
        if let Some(upload) = self.upload.as_mut() {
            upload.abort().await;
        }
    }
}
