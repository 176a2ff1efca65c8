//! The S3 backend, through `CloudStorage` and the `Storage` trait, against a real moto
//! server (`eval "$(bash .ci/emulators/s3.sh start)"` sets `SLUICE_TEST_S3_ENDPOINT`):
//! the conformance suite every storage passes, then what is S3's own (single PutObject or
//! multipart, presigned URL parameters, no upload left behind, listing pages, errors).
//! Every test makes its own bucket.

mod common;

use bytes::Bytes;
use common::{admin_client, create_bucket, endpoint, unique_bucket};
use sluice_storage::conformance::{HttpFetch, Subject, noise};
use sluice_storage::{CloudOptions, CloudStorage, ObjectMeta, Storage, StorageError};
use sluice_storage_s3::{MAX_URL_TTL, MIN_PART_BYTES, S3Backend, S3Config, S3Keys, storage};
use std::sync::Arc;
use std::time::Duration;

async fn open(endpoint: &str, bucket: &str) -> CloudStorage<S3Backend> {
    let backend = S3Backend::connect(S3Config {
        bucket: bucket.to_string(),
        region: Some("us-east-1".to_string()),
        endpoint: Some(endpoint.to_string()),
        credentials: Some(S3Keys { access_key_id: "test".into(), secret_access_key: "test".into() }),
    })
    .await
    .expect("connect");
    let options = CloudOptions {
        part_bytes: MIN_PART_BYTES,
        attempts: 2,
        first_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    storage(backend, options)
}

/// A fresh bucket as a conformance subject; `None` (skip) without moto.
async fn subject(tag: &str) -> Option<(Subject, aws_sdk_s3::Client, String)> {
    let endpoint = endpoint()?;
    let admin = admin_client(&endpoint);
    let bucket = create_bucket(&admin, tag).await;
    let storage = open(&endpoint, &bucket).await;
    assert_eq!(storage.describe(), format!("s3://{bucket} at 127.0.0.1:{}", endpoint.rsplit(':').next().unwrap()));
    let subject = Subject::new(Arc::new(storage), Arc::new(HttpFetch), MIN_PART_BYTES).with_max_url_ttl(MAX_URL_TTL);
    Some((subject, admin, bucket))
}

sluice_storage::storage_conformance_tests!(subject("conformance").await.map(|(s, ..)| s));

async fn etag(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> String {
    let head = client.head_object().bucket(bucket).key(key).send().await.expect("head object");
    head.e_tag().unwrap_or_default().trim_matches('"').to_string()
}

async fn keys(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let page = client.list_objects_v2().bucket(bucket).set_continuation_token(token).send().await.unwrap();
        keys.extend(page.contents().iter().filter_map(|o| o.key()).map(str::to_string));
        token = page.next_continuation_token().map(str::to_string);
        if token.is_none() {
            return keys;
        }
    }
}

#[tokio::test]
async fn small_objects_are_one_put_and_large_ones_full_parts() {
    let Some((s, admin, bucket)) = subject("parts").await else { return };
    // A multipart object's ETag ends with -<parts>; a single PutObject's does not.
    s.write("job1/Patient.ndjson", ObjectMeta::ndjson(false), &[b"{}\n", b"{}\n"]).await;
    let tag = etag(&admin, &bucket, "job1/Patient.ndjson").await;
    assert!(!tag.contains('-'), "expected a single PutObject, got ETag {tag}");

    // 5 MiB + 5 MiB + 2 MiB, whatever the chunks.
    let data = noise(12 << 20, 7);
    let chunks: Vec<&[u8]> = data.chunks(1_048_573).collect();
    s.write("job1/Observation.ndjson.gz", ObjectMeta::ndjson(true), &chunks).await;
    let tag = etag(&admin, &bucket, "job1/Observation.ndjson.gz").await;
    assert!(tag.ends_with("-3"), "expected 3 parts, got ETag {tag}");
}

#[tokio::test]
async fn presigned_urls_are_sigv4_and_last_at_most_seven_days() {
    let Some((s, ..)) = subject("presign").await else { return };
    s.write("job8/a.ndjson", ObjectMeta::ndjson(false), &[b"{}\n"]).await;
    for (asked, expires) in [(600, "X-Amz-Expires=600"), (30 * 24 * 3600, "X-Amz-Expires=604800")] {
        let url = s.storage.signed_url("job8/a.ndjson", Duration::from_secs(asked)).await.unwrap();
        assert!(url.url.contains("X-Amz-Signature=") && url.url.contains(expires), "{}", url.url);
    }
}

#[tokio::test]
async fn abort_leaves_no_multipart_upload() {
    let Some((s, admin, bucket)) = subject("abort").await else { return };
    // Past one part: a multipart upload is in progress when aborted.
    let mut writer = s.storage.create("job4/big.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from(noise(MIN_PART_BYTES + 1, 3))).await.unwrap();
    let uploads = admin.list_multipart_uploads().bucket(&bucket).send().await.unwrap();
    assert_eq!(uploads.uploads().len(), 1, "the upload should have started");
    writer.abort().await;

    assert!(keys(&admin, &bucket).await.is_empty());
    let uploads = admin.list_multipart_uploads().bucket(&bucket).send().await.unwrap();
    assert!(uploads.uploads().is_empty(), "upload left behind: {:?}", uploads.uploads());
}

#[tokio::test]
async fn delete_prefix_follows_listing_pages() {
    let Some((s, admin, bucket)) = subject("delete").await else { return };
    // More than one ListObjectsV2 page (1000 keys) under the prefix.
    for i in 0..1003 {
        admin.put_object().bucket(&bucket).key(format!("job5/f{i:04}.ndjson")).send().await.unwrap();
    }
    s.write("job6/keep.ndjson", ObjectMeta::ndjson(false), &[b"{}\n"]).await;
    assert_eq!(s.storage.delete_prefix("job5/").await.unwrap(), 1003);
    assert_eq!(keys(&admin, &bucket).await, ["job6/keep.ndjson"]);
}

#[tokio::test]
async fn missing_bucket_error_names_the_bucket() {
    let Some(endpoint) = endpoint() else { return };
    let bucket = unique_bucket("missing");
    let storage = open(&endpoint, &bucket).await;

    let mut writer = storage.create("job7/Patient.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from_static(b"{}\n")).await.unwrap();
    let err = writer.finish().await.unwrap_err();
    assert!(matches!(err, StorageError::Backend { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&bucket) && text.contains("does not exist"), "{text}");
    assert!(!text.contains("test\""), "{text}");

    let err = storage.delete_prefix("job7/").await.unwrap_err();
    assert!(err.to_string().contains(&bucket), "{err}");
}
