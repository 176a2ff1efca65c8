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
    /// The provider's short name in metrics: `aws`, `azure`, `gcp` (Aidbox's names).
    fn provider(&self) -> &'static str;
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

/// Describes the storage metrics to the installed recorder (their `# HELP` lines).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "sluice_storage_requests_total",
        "Requests to cloud storage (each attempt), by provider and operation."
    );
    metrics::describe_counter!(
        "sluice_storage_retries_total",
        "Cloud storage requests retried after a transient failure, by provider and operation."
    );
    metrics::describe_counter!(
        "sluice_storage_failures_total",
        "Cloud storage requests that failed for good (not transient, or out of attempts), by provider and operation."
    );
}

/// The retry schedule of one request: exponential delays with jitter. It also counts the
/// attempts, retries and failures in the metrics (`sluice_storage_*_total`, by provider
/// and operation).
pub struct Backoff {
    provider: &'static str,
    what: &'static str,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    /// A fresh schedule for the request `what` (named in warnings and metrics) to `provider`.
    pub fn new(options: &CloudOptions, provider: &'static str, what: &'static str) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(options.first_backoff)
            .with_max_delay(options.max_backoff)
            .with_max_times(options.attempts.saturating_sub(1))
            .with_jitter();
        Backoff { provider, what, delays: builder.build() }
    }

    /// Counts one attempt of the request (call before each).
    pub fn attempt(&self) {
        metrics::counter!("sluice_storage_requests_total", "provider" => self.provider, "operation" => self.what)
            .increment(1);
    }

    /// After a failed attempt: waits before the next one if `error` is transient and
    /// attempts are left, otherwise gives the error back.
    pub async fn wait(&mut self, error: StorageError) -> Result<(), StorageError> {
        let delay = match matches!(error, StorageError::Unavailable { .. }) {
            true => self.delays.next(),
            false => None,
        };
        let Some(delay) = delay else {
            metrics::counter!("sluice_storage_failures_total", "provider" => self.provider, "operation" => self.what)
                .increment(1);
            return Err(error);
        };
        metrics::counter!("sluice_storage_retries_total", "provider" => self.provider, "operation" => self.what)
            .increment(1);
        tracing::warn!(op = self.what, error = %error, retry_in = ?delay, "storage request failed, retrying");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// Runs `op` until it succeeds, fails for good, or runs out of attempts. Only
/// [`StorageError::Unavailable`] is retried.
pub async fn with_retries<T, F, Fut>(
    options: &CloudOptions,
    provider: &'static str,
    what: &'static str,
    mut op: F,
) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let mut backoff = Backoff::new(options, provider, what);
    loop {
        backoff.attempt();
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

    fn provider(&self) -> &'static str {
        self.backend.provider()
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
        let keys = with_retries(&self.options, self.backend.provider(), "list", || self.backend.list(prefix)).await?;
        for key in &keys {
            with_retries(&self.options, self.backend.provider(), "delete", || self.backend.delete(key)).await?;
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
            let upload =
                with_retries(&self.options, backend.provider(), "start upload", || backend.start_upload(key, meta))
                    .await?;
            self.upload = Some(upload);
        }
        let upload = self.upload.as_mut().expect("started above");
        let mut backoff = Backoff::new(&self.options, self.backend.provider(), "upload part");
        while let Err(e) = {
            backoff.attempt();
            upload.put_part(self.parts, data.clone()).await
        } {
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
            with_retries(&self.options, backend.provider(), "put object", || {
                backend.put_object(key, meta, last.clone())
            })
            .await?;
            return Ok(self.size);
        }
        if !last.is_empty() {
            self.flush_part(last).await?;
        }
        let upload = self.upload.as_mut().expect("checked above");
        let mut backoff = Backoff::new(&self.options, self.backend.provider(), "complete upload");
        while let Err(e) = {
            backoff.attempt();
            upload.complete().await
        } {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// What the fake backend saw and holds.
    #[derive(Default)]
    struct State {
        objects: BTreeMap<String, Vec<u8>>,
        puts: usize,
        uploads: usize,
        parts: Vec<usize>,
        aborted: usize,
        /// Fail this many part uploads with `Unavailable` before succeeding.
        flaky_parts: usize,
        /// Fail every part upload for good.
        broken_parts: bool,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<State>>);

    struct FakeUpload {
        key: String,
        parts: Vec<Bytes>,
        state: Arc<Mutex<State>>,
    }

    #[async_trait]
    impl PartUpload for FakeUpload {
        async fn put_part(&mut self, index: u32, data: Bytes) -> Result<(), StorageError> {
            let mut s = self.state.lock().unwrap();
            if s.broken_parts {
                return Err(StorageError::Backend { location: "fake".into(), reason: "denied".into() });
            }
            if s.flaky_parts > 0 {
                s.flaky_parts -= 1;
                return Err(StorageError::Unavailable { location: "fake".into(), reason: "503".into() });
            }
            assert_eq!(index as usize, self.parts.len(), "parts arrive in order");
            s.parts.push(data.len());
            self.parts.push(data);
            Ok(())
        }

        async fn complete(&mut self) -> Result<(), StorageError> {
            let bytes = self.parts.iter().flat_map(|p| p.iter().copied()).collect();
            self.state.lock().unwrap().objects.insert(self.key.clone(), bytes);
            Ok(())
        }

        async fn abort(&mut self) {
            self.state.lock().unwrap().aborted += 1;
        }
    }

    #[async_trait]
    impl ObjectBackend for Fake {
        fn describe(&self) -> String {
            "fake://bucket".into()
        }

        fn provider(&self) -> &'static str {
            "fake"
        }
        fn min_part_bytes(&self) -> usize {
            10
        }
        async fn put_object(&self, key: &str, _meta: &ObjectMeta, data: Bytes) -> Result<(), StorageError> {
            let mut s = self.0.lock().unwrap();
            s.puts += 1;
            s.objects.insert(key.into(), data.to_vec());
            Ok(())
        }
        async fn start_upload(&self, key: &str, _meta: &ObjectMeta) -> Result<Box<dyn PartUpload>, StorageError> {
            self.0.lock().unwrap().uploads += 1;
            Ok(Box::new(FakeUpload { key: key.into(), parts: Vec::new(), state: self.0.clone() }))
        }
        async fn signed_url(&self, key: &str, ttl: Duration) -> Result<SignedUrl, StorageError> {
            Ok(SignedUrl { url: format!("fake://{key}"), expires: time::OffsetDateTime::now_utc() + ttl })
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
            Ok(self.0.lock().unwrap().objects.keys().filter(|k| k.starts_with(prefix)).cloned().collect())
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.0.lock().unwrap().objects.remove(key);
            Ok(())
        }
    }

    fn storage(fake: &Fake, part_bytes: usize) -> CloudStorage<Fake> {
        let options = CloudOptions { part_bytes, first_backoff: Duration::from_millis(1), ..CloudOptions::default() };
        CloudStorage::new(fake.clone(), options)
    }

    async fn write(storage: &CloudStorage<Fake>, key: &str, chunks: &[&[u8]]) -> Result<u64, StorageError> {
        let mut w = storage.create(key, ObjectMeta::ndjson(false)).await?;
        for c in chunks {
            w.write(Bytes::copy_from_slice(c)).await?;
        }
        w.finish().await
    }

    #[tokio::test]
    async fn a_small_object_is_one_request() {
        let fake = Fake::default();
        let n = write(&storage(&fake, 16), "f/a", &[b"hello ", b"world"]).await.unwrap();
        assert_eq!(n, 11);
        let s = fake.0.lock().unwrap();
        assert_eq!((s.puts, s.uploads), (1, 0));
        assert_eq!(s.objects["f/a"], b"hello world");
    }

    #[tokio::test]
    async fn a_large_object_goes_up_in_full_parts_and_is_reassembled() {
        let fake = Fake::default();
        let data: Vec<u8> = (0..40u8).collect();
        let chunks: Vec<&[u8]> = vec![&data[..3], &data[3..20], &data[20..21], &data[21..]];
        assert_eq!(write(&storage(&fake, 16), "f/big", &chunks).await.unwrap(), 40);
        let s = fake.0.lock().unwrap();
        assert_eq!((s.puts, s.uploads), (0, 1));
        assert_eq!(s.parts, vec![16, 16, 8]);
        assert_eq!(s.objects["f/big"], data);
    }

    #[tokio::test]
    async fn parts_are_never_smaller_than_the_provider_minimum() {
        let fake = Fake::default();
        write(&storage(&fake, 1), "f/x", &[&[7u8; 25]]).await.unwrap();
        assert_eq!(fake.0.lock().unwrap().parts, vec![10, 10, 5]);
    }

    #[tokio::test]
    async fn transient_failures_are_retried() {
        let fake = Fake::default();
        fake.0.lock().unwrap().flaky_parts = 2;
        write(&storage(&fake, 10), "f/y", &[&[1u8; 25]]).await.unwrap();
        let s = fake.0.lock().unwrap();
        assert_eq!(s.parts, vec![10, 10, 5]);
        assert_eq!(s.objects["f/y"], vec![1u8; 25]);
    }

    #[tokio::test]
    async fn too_many_transient_failures_give_up_and_abort() {
        let fake = Fake::default();
        fake.0.lock().unwrap().flaky_parts = 100;
        let e = write(&storage(&fake, 10), "f/z", &[&[1u8; 25]]).await.unwrap_err();
        assert!(matches!(e, StorageError::Unavailable { .. }), "{e}");
        let s = fake.0.lock().unwrap();
        assert_eq!(s.aborted, 1);
        assert!(!s.objects.contains_key("f/z"));
        assert_eq!(s.flaky_parts, 100 - CloudOptions::default().attempts, "one try plus the retries");
    }

    #[tokio::test]
    async fn a_permanent_failure_is_not_retried_and_aborts() {
        let fake = Fake::default();
        fake.0.lock().unwrap().broken_parts = true;
        let e = write(&storage(&fake, 10), "f/w", &[&[1u8; 25]]).await.unwrap_err();
        assert!(matches!(e, StorageError::Backend { .. }), "{e}");
        assert_eq!(fake.0.lock().unwrap().aborted, 1);
    }

    #[tokio::test]
    async fn delete_prefix_deletes_only_the_prefix() {
        let fake = Fake::default();
        let st = storage(&fake, 10);
        for k in ["a/1", "a/2", "ab/3", "b/a/4"] {
            write(&st, k, &[b"x"]).await.unwrap();
        }
        assert_eq!(st.delete_prefix("a/").await.unwrap(), 2);
        let keys: Vec<String> = fake.0.lock().unwrap().objects.keys().cloned().collect();
        assert_eq!(keys, vec!["ab/3", "b/a/4"]);
        assert!(st.create("../x", ObjectMeta::ndjson(false)).await.is_err(), "keys are checked");
    }
}
