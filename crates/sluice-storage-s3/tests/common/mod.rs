//! Shared by the moto-backed test files.
#![allow(dead_code)]

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The moto endpoint from `SLUICE_TEST_S3_ENDPOINT`. Without it: panics under CI, else
/// prints a skip notice and returns `None`.
pub fn endpoint() -> Option<String> {
    sluice_storage::conformance::emulator("SLUICE_TEST_S3_ENDPOINT", "bash .ci/emulators/s3.sh start")
}

/// A bucket name no other test uses.
pub fn unique_bucket(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("sluice-{tag}-{:x}-{n}-{}", nanos & 0xffff_ffff_ffff, std::process::id())
}

/// A plain SDK client for moto, to set up and inspect buckets behind the backend's back.
pub fn admin_client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Creates a fresh bucket and returns its name.
pub async fn create_bucket(client: &aws_sdk_s3::Client, tag: &str) -> String {
    let bucket = unique_bucket(tag);
    client.create_bucket().bucket(&bucket).send().await.expect("create bucket");
    bucket
}
