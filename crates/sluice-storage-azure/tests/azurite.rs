//! Against a real Azurite (`bash .ci/emulators/azure.sh start` prints the environment):
//! the conformance suite every storage passes (account-key authentication, staged blocks),
//! then what is Azure's own: service SAS download links, which Azurite verifies, and
//! errors.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use sluice_storage::conformance::{Fetch, HttpFetch, Subject};
use sluice_storage::{CloudOptions, CloudStorage, ObjectBackend, ObjectMeta, Storage, StorageError};
use sluice_storage_azure::{AzureBackend, AzureConfig, MAX_URL_TTL};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use time::OffsetDateTime;

/// Azurite's well-known development account key (public, documented).
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The blob endpoint, or `None` (skip) when it is not configured outside CI.
fn endpoint() -> Option<String> {
    sluice_storage::conformance::emulator("SLUICE_TEST_AZURE_ENDPOINT", "bash .ci/emulators/azure.sh start")
}

/// The account is the endpoint's last path segment (`.../devstoreaccount1`).
fn account(endpoint: &str) -> String {
    endpoint.rsplit('/').next().unwrap_or("devstoreaccount1").to_string()
}

/// A container name no other test uses.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}-{}", std::process::id(), nanos % 1_000_000_000_000)
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

fn config(endpoint: &str, container: &str) -> AzureConfig {
    AzureConfig {
        account: account(endpoint),
        container: container.to_string(),
        endpoint: Some(endpoint.to_string()),
        key: Some(AZURITE_KEY.to_string()),
    }
}

/// A fresh container and a `CloudStorage` over it with 1 MiB parts (raised to the backend's
/// minimum, 4 MiB).
async fn storage(endpoint: &str, prefix: &str) -> CloudStorage<AzureBackend> {
    let container = unique(prefix);
    create_container(endpoint, &container);
    let backend = AzureBackend::connect(config(endpoint, &container)).await.expect("connect");
    assert_eq!(backend.describe(), format!("azure://{}/{container}", account(endpoint)));
    CloudStorage::new(backend, CloudOptions { part_bytes: 1 << 20, ..Default::default() })
}

/// The URL with its signature changed (same length, still valid base64).
fn tamper(url: &str) -> String {
    let start = url.find("sig=").expect("a sig parameter") + 4;
    let first = &url[start..start + 1];
    let replacement = if first == "A" { "B" } else { "A" };
    format!("{}{}{}", &url[..start], replacement, &url[start + 1..])
}

/// A fresh container as a conformance subject; `None` (skip) without Azurite.
async fn subject() -> Option<Subject> {
    let storage = storage(&endpoint()?, "conformance").await;
    Some(Subject::new(Arc::new(storage), Arc::new(HttpFetch), 4 << 20).with_max_url_ttl(MAX_URL_TTL))
}

sluice_storage::storage_conformance_tests!(subject().await);

#[tokio::test]
async fn sas_links_are_verified_read_only_and_for_one_blob() {
    let Some(endpoint) = endpoint() else { return };
    let storage = storage(&endpoint, "sas").await;
    let mut writer = storage.create("job-1/Patient.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from_static(b"{}\n")).await.unwrap();
    writer.finish().await.unwrap();

    let signed = storage.signed_url("job-1/Patient.ndjson", Duration::from_secs(3600)).await.expect("signed url");
    assert!(signed.url.contains("/job-1/Patient.ndjson?"), "{}", signed.url);
    assert_eq!(HttpFetch.fetch(&signed.url).await.status, 200);
    // Azurite checks the signature: a tampered one is refused.
    assert_eq!(HttpFetch.fetch(&tamper(&signed.url)).await.status, 403);
    // The link is read-only and for this blob only.
    let other = signed.url.replace("Patient.ndjson", "Observation.ndjson");
    assert_eq!(HttpFetch.fetch(&other).await.status, 403);
    assert_eq!(agent().delete(&signed.url).call().expect("DELETE").status().as_u16(), 403);
}

#[tokio::test]
async fn nested_blobs_go_with_their_prefix_and_absent_ones_delete_quietly() {
    let Some(endpoint) = endpoint() else { return };
    let storage = storage(&endpoint, "delete").await;
    for key in ["job-a/Patient.ndjson", "job-a/sub/Encounter.ndjson", "job-ab/Patient.ndjson"] {
        storage.create(key, ObjectMeta::ndjson(false)).await.unwrap().finish().await.unwrap();
    }
    assert_eq!(storage.delete_prefix("job-a/").await.unwrap(), 2);
    assert_eq!(storage.backend().list("").await.unwrap(), ["job-ab/Patient.ndjson"]);
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
