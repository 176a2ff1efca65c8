//! The GCS backend against a real fake-gcs-server, through `CloudStorage` and the `Storage`
//! trait: the conformance suite every storage passes, then what is GCS's own. Start the
//! server with `bash .ci/emulators/gcs.sh start` and export the `SLUICE_TEST_GCS_ENDPOINT`
//! it prints. Without the variable the tests are skipped, except in CI (`CI=true`), where
//! they fail.
//!
//! fake-gcs-server takes an object's Content-Type from the media part of a multipart upload
//! or from the last chunk request of a resumable one, not from the object metadata the
//! client sends as the JSON API specifies (fake-gcs-server issue #1098), and the SDK sends
//! the type only in that metadata. So the conformance suite does not check the type served,
//! and the tests here read it from the requests themselves, through a recording proxy, and
//! check the rest on the stored objects.
//!
//! The tests run on a multi-threaded runtime: the test body makes blocking HTTP calls
//! (ureq) while the proxy's tasks run on the worker threads.

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use sluice_storage::conformance::{Fetch, HttpFetch, Subject, noise, odd_chunks};
use sluice_storage::{CloudOptions, CloudStorage, ObjectMeta, Storage, StorageError};
use sluice_storage_gcs::{GcsBackend, GcsConfig, MAX_SIGNED_URL_TTL};
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The smallest part size: parts are sent as soon as they reach it.
const PART: usize = 256 * 1024;

fn endpoint() -> Option<String> {
    sluice_storage::conformance::emulator("SLUICE_TEST_GCS_ENDPOINT", "bash .ci/emulators/gcs.sh start")
}

/// Percent-encodes one path segment or query value.
fn enc(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A fresh, empty bucket with a unique name.
fn fresh_bucket(endpoint: &str, test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let name = format!("sluice-{test}-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    ureq::post(&format!("{endpoint}/storage/v1/b"))
        .header("content-type", "application/json")
        .send(serde_json::json!({ "name": name }).to_string())
        .unwrap_or_else(|e| panic!("creating bucket {name} on {endpoint}: {e}"));
    name
}

/// A TCP proxy in front of the emulator that keeps every byte the client sends.
struct Recorder {
    endpoint: String,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start(upstream: &str) -> Recorder {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                let log = log.clone();
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upload = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = client_read.read(&mut buf).await {
                            if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let download = async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(upload, download);
                });
            }
        });
        Recorder { endpoint, sent }
    }

    /// Everything sent so far, as text (binary bytes replaced).
    fn sent(&self) -> String {
        String::from_utf8_lossy(&self.sent.lock().unwrap()).into_owned()
    }

    /// Checks that object metadata with these fields was sent for `key`'s upload.
    fn assert_sent_metadata(&self, content_type: &str, content_encoding: Option<&str>) {
        let sent = self.sent();
        assert!(sent.contains(&format!("\"contentType\":\"{content_type}\"")), "no contentType sent");
        if let Some(encoding) = content_encoding {
            assert!(sent.contains(&format!("\"contentEncoding\":\"{encoding}\"")), "no contentEncoding sent");
        }
    }
}

async fn storage(endpoint: &str, bucket: &str) -> CloudStorage<GcsBackend> {
    let backend = GcsBackend::connect(GcsConfig {
        bucket: bucket.to_string(),
        endpoint: Some(endpoint.to_string()),
        service_account: None,
    })
    .await
    .unwrap();
    let options = CloudOptions { part_bytes: PART, first_backoff: Duration::from_millis(10), ..Default::default() };
    CloudStorage::new(backend, options)
}

/// The object's JSON metadata, or `None` if it does not exist.
fn metadata(endpoint: &str, bucket: &str, key: &str) -> Option<serde_json::Value> {
    match ureq::get(&format!("{endpoint}/storage/v1/b/{bucket}/o/{}", enc(key))).call() {
        Ok(mut response) => Some(serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()),
        Err(ureq::Error::StatusCode(404)) => None,
        Err(e) => panic!("metadata of {key}: {e}"),
    }
}

/// Names of all objects in the bucket, sorted (read through the JSON API, not the backend).
fn object_names(endpoint: &str, bucket: &str) -> Vec<String> {
    let mut response = ureq::get(&format!("{endpoint}/storage/v1/b/{bucket}/o")).call().unwrap();
    let list: serde_json::Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    let mut names: Vec<String> = list["items"]
        .as_array()
        .map(|items| items.iter().map(|i| i["name"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A fresh bucket as a conformance subject; `None` (skip) without the emulator. The large
/// object spans several of the SDK's 8 MiB upload requests, and is not a multiple of a part.
async fn subject() -> Option<Subject> {
    let ep = endpoint()?;
    let bucket = fresh_bucket(&ep, "conformance");
    let storage = storage(&ep, &bucket).await;
    assert_eq!(storage.describe(), format!("gs://{bucket}"));
    let subject = Subject::new(Arc::new(storage), Arc::new(HttpFetch), PART)
        .with_large_object(9 * 1024 * 1024 + 12_345)
        .with_max_url_ttl(MAX_SIGNED_URL_TTL)
        .without_served_content_type();
    Some(subject)
}

sluice_storage::storage_conformance_tests!(subject().await);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_send_the_content_type_and_encoding() {
    let Some(ep) = endpoint() else { return };
    let bucket = fresh_bucket(&ep, "metadata");
    // Only the session start of a resumable upload goes through the recorder: the chunks
    // go to the session URL the emulator hands out, which points at the emulator itself.
    let recorder = Recorder::start(&ep).await;
    let storage = storage(&recorder.endpoint, &bucket).await;
    // Writes the object and returns its metadata as stored.
    let write = async |key: &str, meta: ObjectMeta, data: &[u8]| {
        let mut writer = storage.create(key, meta).await.unwrap();
        for chunk in odd_chunks(data, PART) {
            writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert_eq!(writer.finish().await.unwrap(), data.len() as u64);
        metadata(&ep, &bucket, key).expect("the object exists")
    };

    let body = b"{\"resourceType\":\"Patient\",\"id\":\"1\"}\n";
    let meta = write("job/Patient.ndjson", ObjectMeta::ndjson(false), body).await;
    recorder.assert_sent_metadata("application/fhir+ndjson", None);
    assert!(!recorder.sent().contains("contentEncoding"));
    assert!(meta.get("contentEncoding").is_none_or(|v| v.as_str() == Some("")), "{meta}");
    assert_eq!(meta["size"], body.len().to_string());

    let gz = gzip(&b"{\"resourceType\":\"Observation\",\"id\":\"o1\"}\n".repeat(50));
    let meta = write("job/Observation.ndjson.gz", ObjectMeta::ndjson(true), &gz).await;
    recorder.assert_sent_metadata("application/fhir+ndjson", Some("gzip"));
    assert_eq!(meta["contentEncoding"], "gzip");

    let large = gzip(&noise(9 * 1024 * 1024, 7));
    let meta = write("job/Encounter.ndjson.gz", ObjectMeta::ndjson(true), &large).await;
    assert!(recorder.sent().contains("uploadType=resumable"));
    assert_eq!(meta["contentEncoding"], "gzip");
    assert_eq!(meta["size"], large.len().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_are_v4_and_path_style() {
    let Some(ep) = endpoint() else { return };
    let bucket = fresh_bucket(&ep, "signed");
    let storage = storage(&ep, &bucket).await;
    let key = "2024-03-01T120000Z_job/Patient 1.ndjson";
    let mut writer = storage.create(key, ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from_static(b"{}\n")).await.unwrap();
    writer.finish().await.unwrap();

    let signed = storage.signed_url(key, Duration::from_secs(600)).await.unwrap();
    let path = format!("/{bucket}/2024-03-01T120000Z_job/Patient%201.ndjson?X-Goog-Algorithm=GOOG4-RSA-SHA256&");
    assert!(signed.url.starts_with(&format!("{ep}{path}")), "{}", signed.url);
    assert!(signed.url.contains("X-Goog-Signature="), "{}", signed.url);
    assert_eq!(HttpFetch.fetch(&signed.url).await.body, b"{}\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_prefix_follows_page_tokens() {
    let Some(ep) = endpoint() else { return };
    let bucket = fresh_bucket(&ep, "delete");
    let backend =
        GcsBackend::connect(GcsConfig { bucket: bucket.clone(), endpoint: Some(ep.clone()), service_account: None })
            .await
            .unwrap()
            // Small pages, so that listing has to follow page tokens.
            .with_list_page_size(2);
    let storage = CloudStorage::new(backend, CloudOptions { part_bytes: PART, ..Default::default() });

    let doomed = ["job1/a.ndjson", "job1/b.ndjson", "job1/sub/c.ndjson", "job1/d.ndjson", "job1/e.ndjson"];
    let kept = ["job10/x.ndjson", "job2/y.ndjson", "job1.ndjson"];
    for key in doomed.iter().chain(&kept) {
        storage.create(key, ObjectMeta::ndjson(false)).await.unwrap().finish().await.unwrap();
    }
    assert_eq!(storage.delete_prefix("job1/").await.unwrap(), doomed.len() as u64);
    assert_eq!(object_names(&ep, &bucket), ["job1.ndjson", "job10/x.ndjson", "job2/y.ndjson"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_errors_name_the_bucket() {
    let Some(ep) = endpoint() else { return };
    let missing = format!("sluice-missing-{}", std::process::id());
    let err =
        GcsBackend::connect(GcsConfig { bucket: missing.clone(), endpoint: Some(ep.clone()), service_account: None })
            .await
            .unwrap_err();
    assert!(matches!(err, StorageError::Backend { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&missing) && text.contains("not found"), "{text}");

    // A bucket that disappears after connecting: both upload paths report it.
    let bucket = fresh_bucket(&ep, "vanish");
    let storage = storage(&ep, &bucket).await;
    ureq::delete(&format!("{ep}/storage/v1/b/{bucket}")).call().unwrap();

    let mut writer = storage.create("job/small.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from_static(b"{}\n")).await.unwrap();
    let text = writer.finish().await.unwrap_err().to_string();
    assert!(text.contains(&bucket), "{text}");

    let mut writer = storage.create("job/large.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    let data = Bytes::from(noise(4 * PART, 5));
    let result = match writer.write(data).await {
        Ok(()) => writer.finish().await.map(|_| ()),
        Err(e) => Err(e),
    };
    let text = result.unwrap_err().to_string();
    assert!(text.contains(&bucket), "{text}");

    let text = storage.delete_prefix("job/").await.unwrap_err().to_string();
    assert!(text.contains(&bucket) && text.contains("not found"), "{text}");
}
