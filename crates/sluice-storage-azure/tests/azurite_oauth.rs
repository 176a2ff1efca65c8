//! The keyless path against Azurite over TLS with `--oauth basic`, as far as an emulator
//! allows: `AzureBackend::connect` without a key uses the SDK's workload identity
//! credential, which reads the environment (AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID,
//! AZURE_TENANT_ID, AZURE_AUTHORITY_HOST) and exchanges the federated token at a local
//! stand-in for Entra ID (started by `.ci/emulators/azure.sh`, which only answers when the
//! assertion is the file's content). Azurite accepts the resulting bearer token, hands out
//! a user delegation key, and verifies the user delegation SAS of download links.
//!
//! Not verified here, only in a real cloud: Entra ID's validation of the federated token,
//! role assignments, and Azure's own derivation of user delegation keys.
//!
//! One test in its own binary: it sets process environment variables before any thread
//! starts.

use azure_core::http::{Method, Request, Url, new_http_client};
use azure_identity::WorkloadIdentityCredential;
use azure_storage_blob::BlobContainerClient;
use bytes::Bytes;
use sluice_storage::{CloudOptions, CloudStorage, ObjectBackend, ObjectMeta, Storage};
use sluice_storage_azure::{AzureBackend, AzureConfig};
use std::time::Duration;
use time::OffsetDateTime;

struct Env {
    endpoint: String,
    authority_host: String,
    ca_file: String,
    federated_token: String,
    client_id: String,
    tenant_id: String,
}

/// The emulator's settings, or `None` (skip) when they are not configured outside CI.
fn env() -> Option<Env> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let all = (
        var("SLUICE_TEST_AZURE_OAUTH_ENDPOINT"),
        var("SLUICE_TEST_AZURE_AUTHORITY_HOST"),
        var("SLUICE_TEST_AZURE_CA_FILE"),
        var("SLUICE_TEST_AZURE_FEDERATED_TOKEN"),
        var("SLUICE_TEST_AZURE_CLIENT_ID"),
        var("SLUICE_TEST_AZURE_TENANT_ID"),
    );
    match all {
        (
            Some(endpoint),
            Some(authority_host),
            Some(ca_file),
            Some(federated_token),
            Some(client_id),
            Some(tenant_id),
        ) => Some(Env { endpoint, authority_host, ca_file, federated_token, client_id, tenant_id }),
        _ if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "SLUICE_TEST_AZURE_OAUTH_ENDPOINT and friends are not set: run `bash .ci/emulators/azure.sh start` \
             and export its output"
        ),
        _ => {
            eprintln!("skipping: SLUICE_TEST_AZURE_OAUTH_ENDPOINT is not set (see .ci/emulators/azure.sh)");
            None
        }
    }
}

/// GET `url` with the SDK's HTTP client (HTTPS, trusting SSL_CERT_FILE): status and body.
async fn fetch(url: &str) -> (u16, Bytes) {
    let client = new_http_client(None);
    let response = client.execute_request(&Request::new(Url::parse(url).unwrap(), Method::Get)).await.expect("GET");
    let response = response.try_into_raw_response().await.expect("body");
    (u16::from(response.status()), response.body().clone().into())
}

#[test]
fn workload_identity_and_user_delegation_sas() {
    let Some(env) = env() else { return };
    let dir = std::env::temp_dir().join(format!("sluice-azure-oauth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("federated-token");
    std::fs::write(&token_file, &env.federated_token).unwrap();
    // SAFETY: this binary has a single test and no other thread runs yet (the runtime
    // is built below), so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("AZURE_FEDERATED_TOKEN_FILE", &token_file);
        std::env::set_var("AZURE_CLIENT_ID", &env.client_id);
        std::env::set_var("AZURE_TENANT_ID", &env.tenant_id);
        std::env::set_var("AZURE_AUTHORITY_HOST", &env.authority_host);
        // The emulator's certificate is signed by a throwaway CA; rustls reads this.
        std::env::set_var("SSL_CERT_FILE", &env.ca_file);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(run(&env));
    let _ = std::fs::remove_dir_all(&dir);
}

async fn run(env: &Env) {
    let endpoint = env.endpoint.trim_end_matches('/');
    let account = endpoint.rsplit('/').next().unwrap().to_string();
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let container = format!("oauth-{}-{}", std::process::id(), nanos % 1_000_000_000_000);

    // The container, created with a bearer token from the same credential.
    let credential = WorkloadIdentityCredential::new(None).expect("workload identity credential");
    let url = Url::parse(&format!("{endpoint}/{container}")).unwrap();
    BlobContainerClient::new(url, Some(credential), None)
        .expect("container client")
        .create(None)
        .await
        .expect("create container with a bearer token");

    let config = AzureConfig { account, container: container.clone(), endpoint: Some(endpoint.to_string()), key: None };
    let backend = AzureBackend::connect(config).await.expect("connect with workload identity");
    let storage = CloudStorage::new(backend, CloudOptions { part_bytes: 1 << 20, ..Default::default() });

    // A small object and a staged-block one, written with bearer tokens.
    let body = b"{\"resourceType\":\"Patient\",\"id\":\"1\"}\n";
    let mut writer = storage.create("job/Patient.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from_static(body)).await.unwrap();
    assert_eq!(writer.finish().await.unwrap(), body.len() as u64);
    let big: Vec<u8> = (0..(5usize << 20) + 123).map(|i| (i % 253) as u8).collect();
    let mut writer = storage.create("job/Observation.ndjson.gz", ObjectMeta::ndjson(true)).await.unwrap();
    for chunk in big.chunks(700_001) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), big.len() as u64);

    // Download links are user delegation SAS tokens, which Azurite verifies.
    let signed = storage.signed_url("job/Patient.ndjson", Duration::from_secs(3600)).await.unwrap();
    for field in ["skoid=", "sktid=", "skt=", "ske=", "sks=b", "skv=", "spr=https", "sp=r", "sr=b"] {
        assert!(signed.url.contains(field), "{field} missing in {}", signed.url);
    }
    let (status, fetched) = fetch(&signed.url).await;
    assert_eq!(status, 200);
    assert_eq!(&fetched[..], body);
    let signed_big = storage.signed_url("job/Observation.ndjson.gz", Duration::from_secs(600)).await.unwrap();
    let (status, fetched) = fetch(&signed_big.url).await;
    assert_eq!(status, 200);
    assert!(fetched[..] == big[..], "reassembled bytes differ");

    // A tampered signature is refused.
    let start = signed.url.find("sig=").unwrap() + 4;
    let replacement = if &signed.url[start..start + 1] == "A" { "B" } else { "A" };
    let tampered = format!("{}{}{}", &signed.url[..start], replacement, &signed.url[start + 1..]);
    assert_eq!(fetch(&tampered).await.0, 403);

    // A week-long link is capped by the user delegation key and says so.
    let week = storage.signed_url("job/Patient.ndjson", Duration::from_secs(30 * 24 * 3600)).await.unwrap();
    assert!(week.expires <= OffsetDateTime::now_utc() + Duration::from_secs(7 * 24 * 3600));
    assert!(week.expires > OffsetDateTime::now_utc() + Duration::from_secs(6 * 24 * 3600));
    assert_eq!(fetch(&week.url).await.0, 200);

    assert_eq!(storage.delete_prefix("job/").await.unwrap(), 2);
    assert!(storage.backend().list("").await.unwrap().is_empty());
}
