//! Shared by the moto-backed test files.
#![allow(dead_code)]

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The moto endpoint from `SLUICE_TEST_S3_ENDPOINT`. Without it: panics under CI, else
/// prints a skip notice and returns `None`.
pub fn endpoint(test: &str) -> Option<String> {
    match std::env::var("SLUICE_TEST_S3_ENDPOINT") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("SLUICE_TEST_S3_ENDPOINT is not set: start moto with `eval \"$(bash .ci/emulators/s3.sh start)\"`")
        }
        _ => {
            eprintln!("skipping {test}: SLUICE_TEST_S3_ENDPOINT is not set (see .ci/emulators/s3.sh)");
            None
        }
    }
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

/// What a plain HTTP client gets from `url`.
pub struct Fetched {
    pub status: u16,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub body: Vec<u8>,
}

/// GETs `url` with ureq (no decompression, no size limit worth mentioning).
pub async fn fetch(url: &str) -> Fetched {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut response = agent.get(&url).call().expect("GET signed URL");
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let content_type = header("content-type");
        let content_encoding = header("content-encoding");
        let status = response.status().as_u16();
        let body = response.body_mut().with_config().limit(256 << 20).read_to_vec().expect("read body");
        Fetched { status, content_type, content_encoding, body }
    })
    .await
    .unwrap()
}
