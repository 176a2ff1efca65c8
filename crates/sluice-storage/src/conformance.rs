//! What every [`Storage`] must do, written once and run against each implementation
//! (Cargo feature `conformance`; provider crates enable it as a dev-dependency).
//!
//! A provider's tests describe the storage under test as a [`Subject`]: the storage, a
//! [`Fetch`] that follows its signed URLs the way a client would ([`HttpFetch`] for
//! anything served over HTTP), and the few facts that differ between providers (part size,
//! longest link lifetime). [`storage_conformance_tests!`](crate::storage_conformance_tests)
//! then generates one test per scenario:
//!
//! ```text
//! async fn subject() -> Option<Subject> { /* None: skipped (no emulator) */ }
//! sluice_storage::storage_conformance_tests!(subject().await);
//! ```
//!
//! Every scenario works under its own key prefix, so scenarios may share a bucket. What is
//! specific to one provider (URL layouts, SAS fields, part counts, credentials) stays in
//! that provider's tests.

use crate::{MemoryStorage, ObjectMeta, SignedUrl, Storage, StorageError};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// What a download through a signed URL returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// HTTP status (or its equivalent): 200 with the object, 404 without one, 403 refused.
    pub status: u16,
    /// `Content-Type` served.
    pub content_type: Option<String>,
    /// `Content-Encoding` served.
    pub content_encoding: Option<String>,
    /// The bytes served, as stored (never decompressed).
    pub body: Vec<u8>,
}

/// Follows a signed URL the way a client would.
#[async_trait]
pub trait Fetch: Send + Sync {
    /// Downloads `url`, a URL from [`Storage::signed_url`].
    async fn fetch(&self, url: &str) -> Fetched;
}

/// A storage under test, and what the scenarios need to know about it.
#[derive(Clone)]
pub struct Subject {
    /// The storage.
    pub storage: Arc<dyn Storage>,
    /// How its signed URLs are followed.
    pub fetch: Arc<dyn Fetch>,
    /// Bytes per uploaded part: an object larger than this goes up in parts (storage
    /// without parts: any size, the scenarios then just write more).
    pub part_bytes: usize,
    /// The size of the large object, several parts long.
    pub large_bytes: usize,
    /// The longest a signed URL lives; `None`: as long as asked.
    pub max_url_ttl: Option<Duration>,
    /// Whether downloads carry the `Content-Type` written (fake-gcs-server's do not: it
    /// ignores the type in the object metadata, its issue #1098).
    pub serves_content_type: bool,
}

impl Subject {
    /// `storage` uploading parts of `part_bytes`, read through `fetch`; links live as long
    /// as asked and carry the written `Content-Type`.
    pub fn new(storage: Arc<dyn Storage>, fetch: Arc<dyn Fetch>, part_bytes: usize) -> Self {
        let large_bytes = 2 * part_bytes + part_bytes / 2 + 7;
        Subject { storage, fetch, part_bytes, large_bytes, max_url_ttl: None, serves_content_type: true }
    }

    /// Links live at most `ttl`.
    pub fn with_max_url_ttl(mut self, ttl: Duration) -> Self {
        self.max_url_ttl = Some(ttl);
        self
    }

    /// The large object is `bytes` long (e.g. to span several requests of an SDK).
    pub fn with_large_object(mut self, bytes: usize) -> Self {
        self.large_bytes = bytes;
        self
    }

    /// Downloads do not say the `Content-Type` (an emulator's shortcoming).
    pub fn without_served_content_type(mut self) -> Self {
        self.serves_content_type = false;
        self
    }

    /// Writes `chunks` to `key` and returns the size [`crate::ObjectWriter::finish`]
    /// reports.
    pub async fn write(&self, key: &str, meta: ObjectMeta, chunks: &[&[u8]]) -> u64 {
        let mut writer = self.storage.create(key, meta).await.unwrap_or_else(|e| panic!("create {key}: {e}"));
        for chunk in chunks {
            writer.write(Bytes::copy_from_slice(chunk)).await.unwrap_or_else(|e| panic!("write {key}: {e}"));
        }
        writer.finish().await.unwrap_or_else(|e| panic!("finish {key}: {e}"))
    }

    /// What a client downloading `key` gets now: `None` when there is no such object.
    pub async fn read(&self, key: &str) -> Option<Fetched> {
        let url = match self.storage.signed_url(key, Duration::from_secs(600)).await {
            Ok(url) => url,
            Err(StorageError::NotFound(_)) => return None,
            Err(e) => panic!("signing {key}: {e}"),
        };
        let got = self.fetch.fetch(&url.url).await;
        match got.status {
            200 => Some(got),
            404 => None,
            other => panic!("downloading {key} gave status {other}"),
        }
    }

    /// Checks that `key` holds exactly `data`, served with `meta`.
    pub async fn assert_holds(&self, key: &str, meta: &ObjectMeta, data: &[u8]) {
        let got = self.read(key).await.unwrap_or_else(|| panic!("{key} is not there"));
        assert_eq!(got.body.len(), data.len(), "{key}: size");
        assert!(got.body == data, "{key}: the bytes differ from those written");
        assert_eq!(got.content_encoding, meta.content_encoding, "{key}: Content-Encoding");
        if self.serves_content_type {
            assert_eq!(got.content_type.as_deref(), Some(meta.content_type.as_str()), "{key}: Content-Type");
        }
    }

    /// Checks that no object is visible under `key`.
    pub async fn assert_absent(&self, key: &str) {
        assert_eq!(self.read(key).await.map(|got| got.body.len()), None, "{key} should not exist");
    }
}

/// Deterministic bytes that do not compress (xorshift), different for each `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `data` cut into chunks of odd, varying sizes, some larger than a part.
pub fn odd_chunks(data: &[u8], part_bytes: usize) -> Vec<&[u8]> {
    let sizes = [1, 7_919, 65_537, part_bytes / 3 + 1, 13, part_bytes + 5];
    let mut chunks = Vec::new();
    let mut rest = data;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at((*size).min(rest.len()));
        chunks.push(head);
        rest = tail;
    }
    chunks
}

/// The environment variable `var` naming an emulator, or `None` (the caller skips) with a
/// notice. Under CI (`CI=true`) a missing variable is a failure: `start` says how to set it.
pub fn emulator(var: &str, start: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().trim_end_matches('/').to_string()),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{var} is not set: run `eval \"$({start})\"`")
        }
        _ => {
            eprintln!("skipping: {var} is not set (see `{start}`)");
            None
        }
    }
}

/// A finished object is there with exactly the bytes and metadata written, and nothing
/// is before `finish`; an empty object is an object; writing a key again replaces it.
pub async fn finished_objects_read_back(s: &Subject) {
    let plain = ObjectMeta::ndjson(false);
    let key = "conf-write/Patient.ndjson";
    let body = b"{\"resourceType\":\"Patient\",\"id\":\"1\"}\n{\"resourceType\":\"Patient\",\"id\":\"2\"}\n";
    let mut writer = s.storage.create(key, plain.clone()).await.unwrap();
    for chunk in [&body[..10], &body[10..13], &body[13..]] {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    s.assert_absent(key).await;
    assert_eq!(writer.finish().await.unwrap(), body.len() as u64);
    s.assert_holds(key, &plain, body).await;

    let gzip = ObjectMeta::ndjson(true);
    let data = noise(1000, 1);
    assert_eq!(s.write("conf-write/Observation.ndjson.gz", gzip.clone(), &[&data]).await, 1000);
    s.assert_holds("conf-write/Observation.ndjson.gz", &gzip, &data).await;

    assert_eq!(s.write("conf-write/Empty.ndjson", plain.clone(), &[]).await, 0);
    s.assert_holds("conf-write/Empty.ndjson", &plain, b"").await;

    assert_eq!(s.write(key, plain.clone(), &[b"{}\n"]).await, 3);
    s.assert_holds(key, &plain, b"{}\n").await;
}

/// Objects of several parts, written in odd-sized chunks, are reassembled exactly, with
/// their metadata; so are the edge sizes of exactly one part and one part plus a byte.
pub async fn large_objects_read_back(s: &Subject) {
    let gzip = ObjectMeta::ndjson(true);
    let key = "conf-large/Observation.ndjson.gz";
    let data = noise(s.large_bytes, 7);
    let mut writer = s.storage.create(key, gzip.clone()).await.unwrap();
    for chunk in odd_chunks(&data, s.part_bytes) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    s.assert_absent(key).await;
    assert_eq!(writer.finish().await.unwrap(), data.len() as u64);
    s.assert_holds(key, &gzip, &data).await;

    let plain = ObjectMeta::ndjson(false);
    for (name, len) in [("one-part", s.part_bytes), ("one-part-and-a-byte", s.part_bytes + 1)] {
        let key = format!("conf-large/{name}.ndjson");
        let data = noise(len, len as u64);
        assert_eq!(s.write(&key, plain.clone(), &[&data]).await, len as u64);
        s.assert_holds(&key, &plain, &data).await;
    }
}

/// An aborted writer leaves nothing under its prefix, whether parts went up or not, and
/// the key can be written afresh; a writer dropped unfinished leaves no object either.
pub async fn aborted_writers_leave_nothing(s: &Subject) {
    let meta = ObjectMeta::ndjson(false);
    let mut writer = s.storage.create("conf-abort/large.ndjson", meta.clone()).await.unwrap();
    writer.write(Bytes::from(noise(s.part_bytes + 1, 3))).await.unwrap();
    writer.abort().await;
    let mut writer = s.storage.create("conf-abort/small.ndjson", meta.clone()).await.unwrap();
    writer.write(Bytes::from_static(b"{}\n")).await.unwrap();
    writer.abort().await;

    s.assert_absent("conf-abort/large.ndjson").await;
    s.assert_absent("conf-abort/small.ndjson").await;
    assert_eq!(s.storage.delete_prefix("conf-abort/").await.unwrap(), 0, "something was left behind");

    assert_eq!(s.write("conf-abort/large.ndjson", meta.clone(), &[b"{}\n"]).await, 3);
    s.assert_holds("conf-abort/large.ndjson", &meta, b"{}\n").await;

    for (name, len) in [("dropped-large", s.part_bytes + 1), ("dropped-small", 3)] {
        let key = format!("conf-drop/{name}.ndjson");
        let mut writer = s.storage.create(&key, meta.clone()).await.unwrap();
        writer.write(Bytes::from(noise(len, 4))).await.unwrap();
        drop(writer);
        s.assert_absent(&key).await;
    }
}

/// A signed URL downloads the object and says when it expires: after the lifetime asked
/// for, or the provider's longest, whichever is sooner.
pub async fn signed_urls_download_until_they_expire(s: &Subject) {
    let meta = ObjectMeta::ndjson(false);
    let key = "conf-sign/Patient.ndjson";
    s.write(key, meta.clone(), &[b"{\"resourceType\":\"Patient\"}\n"]).await;
    let month = Duration::from_secs(30 * 24 * 3600);
    for asked in [Duration::from_secs(600), month] {
        let expected = s.max_url_ttl.map_or(asked, |max| asked.min(max));
        let before = OffsetDateTime::now_utc();
        let url: SignedUrl = s.storage.signed_url(key, asked).await.unwrap();
        let after = OffsetDateTime::now_utc();
        // Providers count in whole seconds.
        assert!(
            url.expires > before + expected - Duration::from_secs(2) && url.expires <= after + expected,
            "asked {asked:?}: expires {} is not {expected:?} from now",
            url.expires
        );
        let got = s.fetch.fetch(&url.url).await;
        assert_eq!(got.status, 200, "{}", url.url);
        assert_eq!(got.body, b"{\"resourceType\":\"Patient\"}\n");
    }
}

/// `delete_prefix` deletes exactly the objects under a folder, says how many, and
/// deletes nothing the second time.
pub async fn delete_prefix_deletes_exactly_the_prefix(s: &Subject) {
    let meta = ObjectMeta::ndjson(false);
    let doomed = ["conf-del/a.ndjson", "conf-del/b.ndjson"];
    let kept = ["conf-delx/a.ndjson", "conf-keep/conf-del/a.ndjson", "conf-del.ndjson"];
    for key in doomed.iter().chain(&kept) {
        s.write(key, meta.clone(), &[key.as_bytes()]).await;
    }
    assert_eq!(s.storage.delete_prefix("conf-del/").await.unwrap(), doomed.len() as u64);
    for key in doomed {
        s.assert_absent(key).await;
    }
    for key in kept {
        s.assert_holds(key, &meta, key.as_bytes()).await;
    }
    assert_eq!(s.storage.delete_prefix("conf-del/").await.unwrap(), 0);
    assert_eq!(s.storage.delete_prefix("conf-none/").await.unwrap(), 0);
}

/// Keys that are not relative paths are refused before anything is written or signed.
pub async fn invalid_keys_are_refused(s: &Subject) {
    for bad in ["", "/a.ndjson", "a/../b.ndjson", "a//b.ndjson", "./a.ndjson", "a/", "a\\b.ndjson"] {
        let created = s.storage.create(bad, ObjectMeta::ndjson(false)).await;
        assert!(matches!(created, Err(StorageError::InvalidKey(_))), "create '{bad}' was not refused");
        let signed = s.storage.signed_url(bad, Duration::from_secs(60)).await;
        assert!(matches!(signed, Err(StorageError::InvalidKey(_))), "signing '{bad}': {signed:?}");
    }
}

/// Generates one `#[tokio::test]` per conformance scenario, in a module `conformance`.
/// `$subject` is an expression of type `Option<Subject>` (it may `.await`), evaluated in
/// each test with the caller's names in scope; `None` skips the test.
#[macro_export]
macro_rules! storage_conformance_tests {
    ($subject:expr) => {
        $crate::storage_conformance_tests!(@each $subject;
            finished_objects_read_back,
            large_objects_read_back,
            aborted_writers_leave_nothing,
            signed_urls_download_until_they_expire,
            delete_prefix_deletes_exactly_the_prefix,
            invalid_keys_are_refused,
        );
    };
    (@each $subject:expr; $($scenario:ident,)*) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test]
                async fn $scenario() {
                    let Some(subject) = $subject else { return };
                    $crate::conformance::$scenario(&subject).await;
                }
            )*
        }
    };
}

/// [`MemoryStorage`] serves its own `memory://<key>?expires=<unix>` links: 403 once
/// expired, 404 without an object.
#[async_trait]
impl Fetch for MemoryStorage {
    async fn fetch(&self, url: &str) -> Fetched {
        let rest = url.strip_prefix("memory://").unwrap_or_else(|| panic!("not a memory URL: {url}"));
        let (key, expires) = rest.split_once("?expires=").unwrap_or_else(|| panic!("no expiry in {url}"));
        let expires: i64 = expires.parse().unwrap_or_else(|_| panic!("bad expiry in {url}"));
        let (status, object) = if OffsetDateTime::now_utc().unix_timestamp() > expires {
            (403, None)
        } else {
            self.get(key).map_or((404, None), |object| (200, Some(object)))
        };
        Fetched {
            status,
            content_type: object.as_ref().map(|o| o.meta.content_type.clone()),
            content_encoding: object.as_ref().and_then(|o| o.meta.content_encoding.clone()),
            body: object.map(|o| o.bytes).unwrap_or_default(),
        }
    }
}

/// Follows signed URLs over plain HTTP (ureq), as a bulk client does: `Accept-Encoding:
/// gzip`, so gzip objects come back as stored.
#[cfg(feature = "conformance")]
pub struct HttpFetch;

#[cfg(feature = "conformance")]
#[async_trait]
impl Fetch for HttpFetch {
    async fn fetch(&self, url: &str) -> Fetched {
        let url = url.to_string();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let mut response =
                agent.get(&url).header("accept-encoding", "gzip").call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
            let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            let (content_type, content_encoding) = (header("content-type"), header("content-encoding"));
            let body = response.body_mut().with_config().limit(256 << 20).read_to_vec().expect("read the body");
            Fetched { status: response.status().as_u16(), content_type, content_encoding, body }
        })
        .await
        .expect("the download task")
    }
}
