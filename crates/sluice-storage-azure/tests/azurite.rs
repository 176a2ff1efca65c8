//! Against a real Azurite (`bash .ci/emulators/azure.sh start` prints the environment):
//! account-key authentication, staged blocks, and service SAS download links, which
//! Azurite verifies.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use sluice_storage::{CloudOptions, CloudStorage, ObjectBackend, ObjectMeta, Storage, StorageError};
use sluice_storage_azure::{AzureBackend, AzureConfig, MAX_URL_TTL};
use std::time::Duration;
use time::OffsetDateTime;

/// Azurite's well-known development account key (public, documented).
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The blob endpoint, or `None` (skip) when it is not configured outside CI.
fn endpoint() -> Option<String> {
    match std::env::var("SLUICE_TEST_AZURE_ENDPOINT") {
        Ok(v) if !v.is_empty() => Some(v.trim_end_matches('/').to_string()),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "SLUICE_TEST_AZURE_ENDPOINT is not set: run `bash .ci/emulators/azure.sh start` and export its output"
            )
        }
        _ => {
            eprintln!("skipping: SLUICE_TEST_AZURE_ENDPOINT is not set (see .ci/emulators/azure.sh)");
            None
        }
    }
}

/// The account is the endpoint's last path segment (`.../devstoreaccount1`).
fn account(endpoint: &str) -> String {
    endpoint.rsplit('/').next().unwrap_or("devstoreaccount1").to_string()
}

/// A container name no other test uses.
fn unique(prefix: &str) -> String {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000_000)
}

fn sas_time(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// Creates a container with an account SAS signed here (the backend never creates one).
fn create_container(endpoint: &str, container: &str) {
    let account = account(endpoint);
    let (sp, ss, srt, se, sv) =
        ("rwdlc", "b", "sco", sas_time(OffsetDateTime::now_utc() + Duration::from_secs(600)), "2022-11-02");
    let to_sign = format!("{account}\n{sp}\n{ss}\n{srt}\n\n{se}\n\n\n{sv}\n\n");
    let mut mac = Hmac::<Sha256>::new_from_slice(&BASE64.decode(AZURITE_KEY).unwrap()).unwrap();
    mac.update(to_sign.as_bytes());
    let sig = BASE64.encode(mac.finalize().into_bytes());
    let query: String = form_urlencoded(&[
        ("restype", "container"),
        ("sv", sv),
        ("ss", ss),
        ("srt", srt),
        ("sp", sp),
        ("se", &se),
        ("sig", &sig),
    ]);
    let response =
        agent().put(format!("{endpoint}/{container}?{query}")).send_empty().expect("create container request");
    assert_eq!(response.status().as_u16(), 201, "create container {container}");
}

fn form_urlencoded(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// GET `url`: status, content type, content encoding, body.
fn fetch(url: &str) -> (u16, Option<String>, Option<String>, Vec<u8>) {
    let mut response = agent().get(url).call().expect("GET request");
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (content_type, content_encoding) = (header("content-type"), header("content-encoding"));
    let body = response.body_mut().with_config().limit(64 << 20).read_to_vec().expect("read body");
    (response.status().as_u16(), content_type, content_encoding, body)
}

fn config(endpoint: &str, container: &str) -> AzureConfig {
    AzureConfig {
        account: account(endpoint),
        container: container.to_string(),
        endpoint: Some(endpoint.to_string()),
        key: Some(AZURITE_KEY.to_string()),
    }
}

/// A fresh container and a `CloudStorage` over it with 1 MiB parts (raised to the backend's
/// minimum).
async fn storage(endpoint: &str, prefix: &str) -> CloudStorage<AzureBackend> {
    let container = unique(prefix);
    create_container(endpoint, &container);
    let backend = AzureBackend::connect(config(endpoint, &container)).await.expect("connect");
    assert_eq!(backend.describe(), format!("azure://{}/{container}", account(endpoint)));
    CloudStorage::new(backend, CloudOptions { part_bytes: 1 << 20, ..Default::default() })
}

async fn write(storage: &CloudStorage<AzureBackend>, key: &str, meta: ObjectMeta, chunks: &[&[u8]]) -> u64 {
    let mut writer = storage.create(key, meta).await.expect("create");
    for chunk in chunks {
        writer.write(Bytes::copy_from_slice(chunk)).await.expect("write");
    }
    writer.finish().await.expect("finish")
}

/// The URL with its signature changed (same length, still valid base64).
fn tamper(url: &str) -> String {
    let start = url.find("sig=").expect("a sig parameter") + 4;
    let first = &url[start..start + 1];
    let replacement = if first == "A" { "B" } else { "A" };
    format!("{}{}{}", &url[..start], replacement, &url[start + 1..])
}

#[tokio::test]
async fn small_objects_and_signed_urls() {
    let Some(endpoint) = endpoint() else { return };
    let storage = storage(&endpoint, "small").await;
    let body = b"{\"resourceType\":\"Patient\",\"id\":\"1\"}\n";
    let size = write(&storage, "job-1/Patient.ndjson", ObjectMeta::ndjson(false), &[body]).await;
    assert_eq!(size, body.len() as u64);

    let before = OffsetDateTime::now_utc();
    let signed = storage.signed_url("job-1/Patient.ndjson", Duration::from_secs(3600)).await.expect("signed url");
    assert!(signed.url.contains("/job-1/Patient.ndjson?"), "{}", signed.url);
    assert!(
        signed.expires > before + Duration::from_secs(3500) && signed.expires <= before + Duration::from_secs(3601)
    );
    let (status, content_type, content_encoding, fetched) = fetch(&signed.url);
    assert_eq!(status, 200);
    assert_eq!(fetched, body);
    assert_eq!(content_type.as_deref(), Some("application/fhir+ndjson"));
    assert_eq!(content_encoding, None);

    // Azurite checks the signature: a tampered one is refused.
    let (status, ..) = fetch(&tamper(&signed.url));
    assert_eq!(status, 403);
    // The link is read-only and for this blob only.
    let other = signed.url.replace("Patient.ndjson", "Observation.ndjson");
    assert_eq!(fetch(&other).0, 403);
    assert_eq!(agent().delete(&signed.url).call().expect("DELETE").status().as_u16(), 403);

    // A gzip file keeps its Content-Encoding; the bytes are served as stored.
    let gz: &[u8] = &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    write(&storage, "job-1/Observation.ndjson.gz", ObjectMeta::ndjson(true), &[gz]).await;
    let signed = storage.signed_url("job-1/Observation.ndjson.gz", Duration::from_secs(60)).await.unwrap();
    let (status, content_type, content_encoding, fetched) = fetch(&signed.url);
    assert_eq!(status, 200);
    assert_eq!(fetched, gz);
    assert_eq!(content_type.as_deref(), Some("application/fhir+ndjson"));
    assert_eq!(content_encoding.as_deref(), Some("gzip"));

    // An empty file is an object too.
    assert_eq!(write(&storage, "job-1/Empty.ndjson", ObjectMeta::ndjson(false), &[]).await, 0);
    let signed = storage.signed_url("job-1/Empty.ndjson", Duration::from_secs(60)).await.unwrap();
    assert_eq!(fetch(&signed.url).0, 200);

    // Links are capped at seven days, and say so.
    let signed = storage.signed_url("job-1/Patient.ndjson", Duration::from_secs(30 * 24 * 3600)).await.unwrap();
    assert!(signed.expires <= OffsetDateTime::now_utc() + MAX_URL_TTL);
    assert!(signed.expires > OffsetDateTime::now_utc() + MAX_URL_TTL - Duration::from_secs(60));
    assert_eq!(fetch(&signed.url).0, 200);
}

#[tokio::test]
async fn multi_block_object_is_reassembled_exactly() {
    let Some(endpoint) = endpoint() else { return };
    let storage = storage(&endpoint, "blocks").await;
    // 9.5 MiB in odd-sized chunks: three 4 MiB-or-smaller blocks.
    let data: Vec<u8> = (0..(19usize << 19)).map(|i| (i * 31 % 251) as u8).collect();
    let mut chunks = Vec::new();
    let (mut at, mut step) = (0, 1usize);
    while at < data.len() {
        let end = (at + step).min(data.len());
        chunks.push(&data[at..end]);
        at = end;
        step = step * 7 % 1_048_573 + 333;
    }
    let size = write(&storage, "job-2/Observation.ndjson.gz", ObjectMeta::ndjson(true), &chunks).await;
    assert_eq!(size, data.len() as u64);

    let keys = storage.backend().list("job-2/").await.unwrap();
    assert_eq!(keys, vec!["job-2/Observation.ndjson.gz".to_string()]);
    let signed = storage.signed_url("job-2/Observation.ndjson.gz", Duration::from_secs(600)).await.unwrap();
    let (status, content_type, content_encoding, fetched) = fetch(&signed.url);
    assert_eq!(status, 200);
    assert_eq!(fetched.len(), data.len());
    assert!(fetched == data, "reassembled bytes differ");
    assert_eq!(content_type.as_deref(), Some("application/fhir+ndjson"));
    assert_eq!(content_encoding.as_deref(), Some("gzip"));
}

#[tokio::test]
async fn abort_leaves_no_blob() {
    let Some(endpoint) = endpoint() else { return };
    let storage = storage(&endpoint, "abort").await;
    // Large enough that blocks were staged before the abort.
    let mut writer = storage.create("job-3/Patient.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from(vec![b'x'; 9 << 20])).await.unwrap();
    writer.abort().await;
    // And one that never left memory.
    let mut writer = storage.create("job-3/Small.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from_static(b"{}\n")).await.unwrap();
    writer.abort().await;

    assert!(storage.backend().list("job-3/").await.unwrap().is_empty());
    let signed = storage.signed_url("job-3/Patient.ndjson", Duration::from_secs(60)).await.unwrap();
    assert_eq!(fetch(&signed.url).0, 404);

    // Writing the same key afterwards commits only the new blocks.
    let size = write(&storage, "job-3/Patient.ndjson", ObjectMeta::ndjson(false), &[b"{}\n"]).await;
    assert_eq!(size, 3);
    let signed = storage.signed_url("job-3/Patient.ndjson", Duration::from_secs(60)).await.unwrap();
    assert_eq!(fetch(&signed.url).3, b"{}\n");
}

#[tokio::test]
async fn delete_prefix_removes_only_the_prefix() {
    let Some(endpoint) = endpoint() else { return };
    let storage = storage(&endpoint, "delete").await;
    for key in [
        "job-a/Patient.ndjson",
        "job-a/Observation.ndjson",
        "job-a/sub/Encounter.ndjson",
        "job-ab/Patient.ndjson",
        "other/x.ndjson",
    ] {
        write(&storage, key, ObjectMeta::ndjson(false), &[b"{}\n"]).await;
    }
    assert_eq!(storage.delete_prefix("job-a/").await.unwrap(), 3);
    let mut left = storage.backend().list("").await.unwrap();
    left.sort();
    assert_eq!(left, vec!["job-ab/Patient.ndjson".to_string(), "other/x.ndjson".to_string()]);
    assert_eq!(storage.delete_prefix("job-a/").await.unwrap(), 0);
    // Deleting an absent blob is fine.
    storage.backend().delete("job-a/Patient.ndjson").await.unwrap();
}

#[tokio::test]
async fn missing_container_and_wrong_key_are_reported() {
    let Some(endpoint) = endpoint() else { return };
    let missing = unique("missing");
    let err = AzureBackend::connect(config(&endpoint, &missing)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StorageError::Backend { .. }), "{text}");
    assert!(text.contains(&missing) && text.contains(&account(&endpoint)), "{text}");
    assert!(text.contains("does not exist"), "{text}");

    let container = unique("wrongkey");
    create_container(&endpoint, &container);
    let mut wrong = config(&endpoint, &container);
    wrong.key = Some(BASE64.encode([7u8; 64]));
    let err = AzureBackend::connect(wrong).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StorageError::Backend { .. }), "{text}");
    assert!(text.contains("access denied") && text.contains(&container), "{text}");
    assert!(!text.contains("sig=") || text.contains("sig=<redacted>"), "{text}");
    assert!(!text.contains(&BASE64.encode([7u8; 64])), "{text}");
}
