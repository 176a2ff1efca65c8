//! The default credential chain, through web identity (EKS IRSA style), against moto's STS.
//!
//! The chain reads process-wide environment variables, so this file holds a single test (a
//! test binary of its own: its own process) that sets them before any thread or runtime
//! exists.

mod common;

use bytes::Bytes;
use common::{admin_client, create_bucket, endpoint};
use sluice_storage::conformance::{Fetch, HttpFetch};
use sluice_storage::{CloudOptions, ObjectMeta, Storage};
use sluice_storage_s3::{S3Backend, S3Config, storage};
use std::time::Duration;

#[test]
fn default_chain_assumes_a_role_with_web_identity() {
    let Some(endpoint) = endpoint() else { return };
    let dir = std::env::temp_dir().join(format!("sluice-s3-web-identity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzbHVpY2UifQ.").unwrap();

    // SAFETY: this is the only test of this binary and no other thread has started yet
    // (the tokio runtime is built below), so nothing reads the environment concurrently.
    unsafe {
        for name in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_ENDPOINT_URL",
        ] {
            std::env::remove_var(name);
        }
        // No profile files, and never the instance metadata service.
        std::env::set_var("AWS_CONFIG_FILE", dir.join("no-config"));
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"));
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_WEB_IDENTITY_TOKEN_FILE", &token_file);
        std::env::set_var("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/sluice-export");
        std::env::set_var("AWS_ROLE_SESSION_NAME", "sluice-test");
        std::env::set_var("AWS_ENDPOINT_URL_STS", &endpoint);
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let admin = admin_client(&endpoint);
        let bucket = create_bucket(&admin, "irsa").await;
        // No region and no keys: both come from the environment.
        let backend = S3Backend::connect(S3Config {
            bucket: bucket.clone(),
            region: None,
            endpoint: Some(endpoint.clone()),
            credentials: None,
        })
        .await
        .expect("connect");
        let storage = storage(backend, CloudOptions { attempts: 1, ..Default::default() });

        let mut writer = storage.create("job/Patient.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
        writer.write(Bytes::from_static(b"{\"resourceType\":\"Patient\"}\n")).await.unwrap();
        writer.finish().await.expect("write with web identity credentials");

        let before = time::OffsetDateTime::now_utc();
        let url = storage.signed_url("job/Patient.ndjson", Duration::from_secs(7 * 24 * 3600)).await.unwrap();
        // The URL dies with the session credentials (moto: one hour), whatever was asked for.
        let lifetime = url.expires - before;
        assert!(
            lifetime <= time::Duration::seconds(3600) && lifetime > time::Duration::seconds(3500),
            "expires in {lifetime}, not with the one-hour session"
        );
        // Temporary credentials from AssumeRoleWithWebIdentity: a session token is signed in,
        // one minted by moto's STS (its tokens start with this prefix).
        assert!(url.url.contains("X-Amz-Security-Token=FQoGZXIvYXdzEBYaD"), "{}", url.url);
        let got = HttpFetch.fetch(&url.url).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, b"{\"resourceType\":\"Patient\"}\n");
    });

    let _ = std::fs::remove_dir_all(&dir);
}
