//! The S3 backend, through `CloudStorage` and the `Storage` trait, against a real moto
//! server (`eval "$(bash .ci/emulators/s3.sh start)"` sets `SLUICE_TEST_S3_ENDPOINT`).
//! Every test makes its own bucket.

mod common;

use bytes::Bytes;
use common::{admin_client, create_bucket, endpoint, fetch, unique_bucket};
use sluice_storage::{CloudOptions, CloudStorage, ObjectMeta, Storage, StorageError};
use sluice_storage_s3::{S3Backend, S3Config, S3Keys, storage};
use std::time::Duration;
use time::OffsetDateTime;

const MIB: usize = 1 << 20;

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
        part_bytes: 5 * MIB,
        attempts: 2,
        first_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    storage(backend, options)
}

/// Deterministic, incompressible-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
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

/// Writes `data` in chunks of the given (cycled) sizes and finishes the object.
async fn write_chunked(storage: &dyn Storage, key: &str, meta: ObjectMeta, data: &[u8], sizes: &[usize]) -> u64 {
    let mut writer = storage.create(key, meta).await.expect("create");
    let mut rest = data;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let take = (*size).min(rest.len());
        writer.write(Bytes::copy_from_slice(&rest[..take])).await.expect("write");
        rest = &rest[take..];
    }
    writer.finish().await.expect("finish")
}

async fn etag(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> String {
    let head = client.head_object().bucket(bucket).key(key).send().await.expect("head object");
    head.e_tag().unwrap_or_default().to_string()
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
async fn small_object_is_one_put_and_downloads_through_the_signed_url() {
    let Some(endpoint) = endpoint("small_object") else { return };
    let admin = admin_client(&endpoint);
    let bucket = create_bucket(&admin, "small").await;
    let storage = open(&endpoint, &bucket).await;
    assert_eq!(storage.describe(), format!("s3://{bucket} at 127.0.0.1:{}", endpoint.rsplit(':').next().unwrap()));

    let body = b"{\"resourceType\":\"Patient\",\"id\":\"1\"}\n{\"resourceType\":\"Patient\",\"id\":\"2\"}\n";
    let size = write_chunked(&storage, "job1/Patient.ndjson", ObjectMeta::ndjson(false), body, &[10, 3]).await;
    assert_eq!(size, body.len() as u64);
    // A multipart object's ETag ends with -<parts>; a single PutObject's does not.
    let tag = etag(&admin, &bucket, "job1/Patient.ndjson").await;
    assert!(!tag.contains('-'), "expected a single PutObject, got ETag {tag}");

    let before = OffsetDateTime::now_utc();
    let url = storage.signed_url("job1/Patient.ndjson", Duration::from_secs(600)).await.unwrap();
    assert!(url.url.contains("X-Amz-Signature="), "{}", url.url);
    assert!(url.url.contains("X-Amz-Expires=600"), "{}", url.url);
    let lifetime = url.expires - before;
    assert!(lifetime <= time::Duration::seconds(600) && lifetime > time::Duration::seconds(590), "{lifetime}");

    let got = fetch(&url.url).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, body);
    assert_eq!(got.content_type.as_deref(), Some("application/fhir+ndjson"));
    assert_eq!(got.content_encoding, None);
}

#[tokio::test]
async fn multipart_object_is_reassembled_exactly() {
    let Some(endpoint) = endpoint("multipart_object") else { return };
    let admin = admin_client(&endpoint);
    let bucket = create_bucket(&admin, "multi").await;
    let storage = open(&endpoint, &bucket).await;

    let data = pattern(12 * MIB, 7);
    let sizes = [1, 7_919, 65_537, 1_048_573, 13, 3 * MIB + 5];
    let size = write_chunked(&storage, "job2/Observation.ndjson", ObjectMeta::ndjson(false), &data, &sizes).await;
    assert_eq!(size, data.len() as u64);
    // 5 MiB + 5 MiB + 2 MiB.
    let tag = etag(&admin, &bucket, "job2/Observation.ndjson").await;
    assert!(tag.trim_matches('"').ends_with("-3"), "expected 3 parts, got ETag {tag}");

    let url = storage.signed_url("job2/Observation.ndjson", Duration::from_secs(3600)).await.unwrap();
    let got = fetch(&url.url).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), data.len());
    assert!(got.body == data, "downloaded bytes differ from what was written");
    assert_eq!(got.content_type.as_deref(), Some("application/fhir+ndjson"));
}

#[tokio::test]
async fn gzip_objects_are_served_with_content_encoding() {
    let Some(endpoint) = endpoint("gzip_objects") else { return };
    let admin = admin_client(&endpoint);
    let bucket = create_bucket(&admin, "gzip").await;
    let storage = open(&endpoint, &bucket).await;

    // Single PutObject, then a multipart upload: both must carry the metadata.
    let small = pattern(1000, 1);
    let large = pattern(6 * MIB + 17, 2);
    write_chunked(&storage, "job3/Patient.ndjson.gz", ObjectMeta::ndjson(true), &small, &[999]).await;
    write_chunked(&storage, "job3/Encounter.ndjson.gz", ObjectMeta::ndjson(true), &large, &[MIB]).await;
    assert!(etag(&admin, &bucket, "job3/Encounter.ndjson.gz").await.contains("-2"));

    for (key, data) in [("job3/Patient.ndjson.gz", &small), ("job3/Encounter.ndjson.gz", &large)] {
        let url = storage.signed_url(key, Duration::from_secs(60)).await.unwrap();
        let got = fetch(&url.url).await;
        assert_eq!(got.status, 200, "{key}");
        assert_eq!(got.content_type.as_deref(), Some("application/fhir+ndjson"), "{key}");
        assert_eq!(got.content_encoding.as_deref(), Some("gzip"), "{key}");
        assert!(&got.body == data, "{key}: bytes differ");
    }
}

#[tokio::test]
async fn abort_leaves_no_object_and_no_upload() {
    let Some(endpoint) = endpoint("abort") else { return };
    let admin = admin_client(&endpoint);
    let bucket = create_bucket(&admin, "abort").await;
    let storage = open(&endpoint, &bucket).await;

    // Past one part: a multipart upload is in progress when aborted.
    let mut writer = storage.create("job4/big.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from(pattern(5 * MIB + 1, 3))).await.unwrap();
    let uploads = admin.list_multipart_uploads().bucket(&bucket).send().await.unwrap();
    assert_eq!(uploads.uploads().len(), 1, "the upload should have started");
    writer.abort().await;

    // Below one part: nothing was sent at all.
    let mut writer = storage.create("job4/small.ndjson", ObjectMeta::ndjson(false)).await.unwrap();
    writer.write(Bytes::from_static(b"{}\n")).await.unwrap();
    writer.abort().await;

    assert!(keys(&admin, &bucket).await.is_empty());
    let uploads = admin.list_multipart_uploads().bucket(&bucket).send().await.unwrap();
    assert!(uploads.uploads().is_empty(), "upload left behind: {:?}", uploads.uploads());
}

#[tokio::test]
async fn delete_prefix_removes_only_that_prefix_across_pages() {
    let Some(endpoint) = endpoint("delete_prefix") else { return };
    let admin = admin_client(&endpoint);
    let bucket = create_bucket(&admin, "delete").await;
    let storage = open(&endpoint, &bucket).await;

    // More than one ListObjectsV2 page (1000 keys) under the prefix.
    for i in 0..1003 {
        admin.put_object().bucket(&bucket).key(format!("job5/f{i:04}.ndjson")).send().await.unwrap();
    }
    for key in ["job5x/keep.ndjson", "job6/keep.ndjson", "job6/job5/keep.ndjson"] {
        write_chunked(&storage, key, ObjectMeta::ndjson(false), b"{}\n", &[3]).await;
    }

    assert_eq!(storage.delete_prefix("job5/").await.unwrap(), 1003);
    let mut left = keys(&admin, &bucket).await;
    left.sort();
    assert_eq!(left, ["job5x/keep.ndjson", "job6/job5/keep.ndjson", "job6/keep.ndjson"]);
    assert_eq!(storage.delete_prefix("job5/").await.unwrap(), 0);
}

#[tokio::test]
async fn missing_bucket_error_names_the_bucket() {
    let Some(endpoint) = endpoint("missing_bucket") else { return };
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

#[tokio::test]
async fn signed_url_lifetime_is_clamped_to_seven_days() {
    let Some(endpoint) = endpoint("clamp") else { return };
    let admin = admin_client(&endpoint);
    let bucket = create_bucket(&admin, "clamp").await;
    let storage = open(&endpoint, &bucket).await;
    write_chunked(&storage, "job8/a.ndjson", ObjectMeta::ndjson(false), b"{}\n", &[3]).await;

    let before = OffsetDateTime::now_utc();
    let url = storage.signed_url("job8/a.ndjson", Duration::from_secs(30 * 24 * 3600)).await.unwrap();
    assert!(url.url.contains("X-Amz-Expires=604800"), "{}", url.url);
    let lifetime = url.expires - before;
    assert!(lifetime <= time::Duration::days(7) && lifetime > time::Duration::days(7) - time::Duration::seconds(10));
    assert_eq!(fetch(&url.url).await.body, b"{}\n");
}
