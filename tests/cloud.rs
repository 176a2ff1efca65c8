//! Exports to cloud storage through `sluice serve`, against real emulators: moto (S3),
//! Azurite (Azure Blob) and fake-gcs-server (GCS), started by `.ci/run` (see
//! `.ci/emulators/`). Storage is configured the Aidbox way (provider settings plus
//! configuration resources over the REST API); every manifest URL is downloaded and every
//! line checked; the bucket is listed to see exactly the export's objects, and nothing after
//! DELETE. Without the emulator variables a test is skipped, except in CI, where it fails.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::*;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::BTreeSet;

/// The emulator URL in `var`; `None` (skip) when unset outside CI.
fn emulator(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v.trim_end_matches('/').to_string()),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{var} is not set: CI must start the storage emulators (.ci/emulators/*.sh)")
        }
        _ => {
            eprintln!("skipped: {var} is not set (start the emulator with .ci/emulators/*.sh)");
            None
        }
    }
}

/// A bucket / container name no other run uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000_000)
}

/// A secret that must never come back from the server.
const SECRET_MARK: &str = "S3CR3T-never-shown";

/// One provider under test.
trait Cloud {
    /// `serve` flags selecting the provider (as the `BOX_FHIR_BULK_STORAGE_*` twins).
    fn server_args(&self) -> Vec<String>;
    /// What a kick-off before [`Cloud::configure`] must name as missing.
    fn missing(&self) -> &'static str;
    /// Creates the configuration resources over the REST API; returns their paths.
    fn configure(&self, srv: &Server) -> Vec<String>;
    /// The keys of the objects under `prefix`, read from the emulator.
    fn list(&self, prefix: &str) -> BTreeSet<String>;
    /// The start of every signed URL.
    fn url_prefix(&self) -> String;
    /// The secret given in [`Cloud::configure`].
    fn secret(&self) -> &'static str;
    /// The provider's name in the metrics.
    fn provider(&self) -> &'static str;
    /// Whether the emulator serves the `Content-Type` it was given.
    fn keeps_content_type(&self) -> bool {
        true
    }
}

/// The export folder (`<datetime>_<uuid>`) of a manifest URL.
fn folder_of(url: &str) -> String {
    let path = url.split('?').next().unwrap();
    let mut segs = path.rsplit('/');
    segs.next();
    segs.next().expect("a folder segment").to_string()
}

/// The object key (`<folder>/<file>`) of a manifest URL.
fn key_of(url: &str) -> String {
    let path = url.split('?').next().unwrap();
    let file = path.rsplit('/').next().unwrap();
    format!("{}/{file}", folder_of(url))
}

/// The whole story for one provider: unusable storage answers 500 at kick-off; the
/// configuration resources hide their secrets; a gzip system export lands in the bucket
/// with exactly its files, every URL downloads the right lines; URLs are re-signed on
/// every poll; DELETE removes the objects; the server log never shows a secret.
fn export_end_to_end(cloud: &dyn Cloud) {
    let args = cloud.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let srv = Server::loaded(&args);

    if !cloud.missing().is_empty() {
        let r = send("GET", &srv.fhir("/$export"), &[("prefer", "respond-async")], None);
        assert_outcome(&r, 500, &[cloud.missing()]);
    }

    for path in cloud.configure(&srv) {
        let shown = get(&format!("{}{path}", srv.url));
        assert_eq!(shown.status, 200, "GET {path}: {}", shown.text());
        assert!(!shown.text().contains(cloud.secret()), "GET {path} shows a secret: {}", shown.text());
    }

    let url = with_query(&srv.fhir("/$export"), &[("_outputFormat", "application/fhir+ndjson+gzip")]);
    let status = kickoff(&srv, &url);
    let manifest = complete_manifest(&poll_until_done(&status), &url);
    let entries = manifest["output"].as_array().expect("output");
    for e in entries {
        let u = e["url"].as_str().unwrap();
        assert!(u.starts_with(&cloud.url_prefix()), "{u} is not a signed URL of {}", cloud.url_prefix());
    }
    check_content(&download_entries_checked(&manifest["output"], cloud.keeps_content_type()), &reference().all());

    let folder = folder_of(entries[0]["url"].as_str().unwrap());
    let mut want: BTreeSet<String> = entries.iter().map(|e| key_of(e["url"].as_str().unwrap())).collect();
    want.insert(format!("{folder}/manifest.json"));
    want.insert(format!("{folder}/_SUCCESS"));
    assert_eq!(cloud.list(&format!("{folder}/")), want, "the objects of the export");

    // A second poll signs afresh; its URLs still download.
    let again = get(&status);
    assert_eq!(again.status, 200);
    let again = again.json();
    let first = &again["output"][0];
    let lines = download_entries_checked(&json!([first]), cloud.keeps_content_type());
    assert_eq!(lines.values().map(Vec::len).sum::<usize>() as u64, first["count"].as_u64().unwrap());

    assert_eq!(delete(&status).status, 202);
    assert_eq!(get(&status).status, 404);
    assert_eq!(cloud.list(&format!("{folder}/")), BTreeSet::new(), "DELETE removes the export's objects");

    // The metrics count what went to the provider.
    let metrics = Scrape::of(&srv.url, &[]);
    let p = cloud.provider();
    let count: u64 = entries.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(metrics.sum("sluice_export_resources_total", &[("provider", p)]), count as f64);
    let requests = metrics.sum("sluice_storage_requests_total", &[("provider", p)]);
    // Every file and both markers went up (one request each at least), and were listed
    // and deleted.
    assert!(requests >= (entries.len() + 2) as f64, "{requests} requests to {p}:\n{}", metrics.text);
    assert_eq!(metrics.sum("sluice_storage_failures_total", &[("provider", p)]), 0.0, "{}", metrics.text);
    assert_eq!(
        metrics.sum("sluice_storage_requests_total", &[("provider", p), ("operation", "delete")]),
        want.len() as f64
    );

    let log = std::fs::read_to_string(srv.dir.join("server.log")).unwrap_or_default();
    assert!(!log.contains(cloud.secret()), "the server log shows a secret");
    assert!(!manifest.to_string().contains(cloud.secret()), "the manifest shows a secret");
}

/// `organizeOutputBy=Patient` with `allowPartialManifests=true`, gzip, in files of about 3,000
/// lines: every page's URLs are the provider's signed URLs, the pages linked from the status
/// URL list every file once, each file is patient blocks (a header first) holding exactly
/// what the group export by type holds, and the bucket holds exactly those files plus the
/// completion markers.
fn organized_pages(cloud: &dyn Cloud) {
    let mut args = cloud.server_args();
    args.extend(["--max-file-resources".to_string(), "3000".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let srv = Server::loaded(&args);
    cloud.configure(&srv);
    let url = with_query(
        &srv.fhir(&format!("/Group/{GROUP_ID}/$export")),
        &[
            ("organizeOutputBy", "Patient"),
            ("allowPartialManifests", "true"),
            ("_outputFormat", "application/fhir+ndjson+gzip"),
            ("_type", "Patient,Condition,Encounter"),
        ],
    );
    let status = kickoff(&srv, &url);
    let mut page = poll_until_done(&status);
    let mut entries: Vec<Value> = Vec::new();
    loop {
        let m = manifest_response(&page, &url);
        assert_eq!(m["outputOrganizedBy"], "Patient", "{m}");
        entries.extend(m["output"].as_array().expect("output").iter().cloned());
        match m["link"][0]["url"].as_str() {
            Some(next) => page = get(next),
            None => break,
        }
    }
    assert!(entries.len() > 1, "several files of blocks");

    let mut lines_of: std::collections::BTreeMap<(String, String), String> = Default::default();
    let mut files = Files::new();
    for e in &entries {
        let u = e["url"].as_str().expect("url");
        assert!(u.starts_with(&cloud.url_prefix()), "{u} is not a signed URL of {}", cloud.url_prefix());
        assert!(e.get("type").is_none(), "a file of blocks has no type: {e}");
        let r = send("GET", u, &[("accept-encoding", "gzip")], None);
        assert_eq!(r.status, 200, "GET {u}: {}", r.text());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::MultiGzDecoder::new(&r.body[..]), &mut text).expect("gzip");
        let lines: Vec<&str> = text.lines().collect();
        let headers = lines.iter().filter(|l| l.starts_with(r#"{"resourceType":"Parameters""#)).count();
        assert_eq!(Some((lines.len() - headers) as u64), e["count"].as_u64(), "count of {u}: resources (D18)");
        assert!(lines[0].starts_with(r#"{"resourceType":"Parameters","parameter":[{"name":"header""#), "{u}");
        for line in lines {
            let v: Value = serde_json::from_str(line).expect("JSON line");
            let t = v["resourceType"].as_str().expect("resourceType").to_string();
            if t == "Parameters" {
                continue;
            }
            let key = (t.clone(), v["id"].as_str().expect("id").to_string());
            match lines_of.get(&key) {
                // In the blocks of two patients: the same resource both times.
                Some(before) => assert_eq!(before, line, "{key:?} differs between blocks"),
                None => {
                    lines_of.insert(key, line.to_string());
                    files.entry(t).or_default().push(line.to_string());
                }
            }
        }
    }
    let mut expected = reference().all_compartments();
    expected.retain(|t, _| ["Patient", "Condition", "Encounter"].contains(&t.as_str()));
    check_content(&files, &expected);

    let folder = folder_of(entries[0]["url"].as_str().unwrap());
    let mut want: BTreeSet<String> = entries.iter().map(|e| key_of(e["url"].as_str().unwrap())).collect();
    want.insert(format!("{folder}/manifest.json"));
    want.insert(format!("{folder}/_SUCCESS"));
    assert_eq!(cloud.list(&format!("{folder}/")), want, "the objects of the export");
}

/// An export whose bucket does not exist fails with an OperationOutcome naming it, and
/// lists no file.
fn export_to_missing_bucket(cloud: &dyn Cloud, bucket: &str) {
    let args = cloud.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let srv = Server::loaded(&args);
    cloud.configure(&srv);
    let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient")]);
    let r = send("GET", &url, &[("prefer", "respond-async")], None);
    // Storage is checked at kick-off (500 naming the bucket) or, at the latest, by the run.
    if r.status == 202 {
        let done = poll_until_done(r.header("content-location").unwrap());
        let oo = assert_outcome(&done, 500, &[bucket]);
        assert!(!oo.to_string().contains("output"), "{oo}");
    } else {
        assert_outcome(&r, 500, &[bucket]);
    }
}

// ---------------------------------------------------------------------------------------
// S3 (moto)
// ---------------------------------------------------------------------------------------

struct S3 {
    endpoint: String,
    bucket: String,
}

impl S3 {
    fn new(endpoint: String, create: bool) -> S3 {
        let bucket = unique("sluice-e2e");
        if create {
            let r = send("PUT", &format!("{endpoint}/{bucket}"), &[], Some(b""));
            assert_eq!(r.status, 200, "creating bucket {bucket}: {}", r.text());
        }
        S3 { endpoint, bucket }
    }
}

impl Cloud for S3 {
    fn provider(&self) -> &'static str {
        "aws"
    }

    fn server_args(&self) -> Vec<String> {
        ["--storage-provider", "aws", "--aws-account", "exports", "--aws-bucket", &self.bucket]
            .into_iter()
            .map(String::from)
            .chain(["--storage-endpoint".into(), self.endpoint.clone()])
            // The smallest part S3 takes, so that the larger files go up in several parts.
            .chain(["--storage-part-bytes".into(), (5 << 20).to_string()])
            .collect()
    }

    fn missing(&self) -> &'static str {
        "AwsAccount"
    }

    fn configure(&self, srv: &Server) -> Vec<String> {
        let body = json!({"region": "us-east-1", "access-key-id": "AKIDEXAMPLE", "secret-access-key": SECRET_MARK});
        let r = put_json(&format!("{}/AwsAccount/exports", srv.url), &body);
        assert!(r.status == 201 || r.status == 200, "PUT AwsAccount: {}", r.text());
        assert!(!r.text().contains(SECRET_MARK), "PUT answers with the secret");
        vec!["/AwsAccount/exports".into()]
    }

    fn list(&self, prefix: &str) -> BTreeSet<String> {
        let r = get(&format!("{}/{}?list-type=2&prefix={}", self.endpoint, self.bucket, enc(prefix)));
        assert_eq!(r.status, 200, "listing {}: {}", self.bucket, r.text());
        let xml = r.text();
        xml.split("<Key>").skip(1).map(|s| s.split("</Key>").next().unwrap().to_string()).collect()
    }

    fn url_prefix(&self) -> String {
        format!("{}/{}/", self.endpoint, self.bucket)
    }

    fn secret(&self) -> &'static str {
        SECRET_MARK
    }
}

#[test]
fn s3_export_end_to_end() {
    let Some(endpoint) = emulator("SLUICE_TEST_S3_ENDPOINT") else { return };
    export_end_to_end(&S3::new(endpoint, true));
}

#[test]
fn s3_organized_by_patient_in_pages() {
    let Some(endpoint) = emulator("SLUICE_TEST_S3_ENDPOINT") else { return };
    organized_pages(&S3::new(endpoint, true));
}

/// DELETE while an export runs removes the files it already wrote to the bucket.
#[test]
fn s3_cancel_removes_what_was_written() {
    let Some(endpoint) = emulator("SLUICE_TEST_S3_ENDPOINT") else { return };
    let s3 = S3::new(endpoint, true);
    let mut args = s3.server_args();
    // Slow, with small files, so that some are finished while the export still runs.
    args.extend(["--throttle-ms", "20", "--batch-bytes", "16384", "--max-file-resources", "100"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let srv = Server::loaded(&args);
    s3.configure(&srv);
    let status = kickoff(&srv, &srv.fhir("/$export"));
    let started = std::time::Instant::now();
    loop {
        let r = get(&status);
        assert_eq!(r.status, 202, "the throttled export finished before any file could be seen: {}", r.text());
        if !s3.list("").is_empty() {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "no object was written within a minute");
        std::thread::sleep(std::time::Duration::from_secs(r.retry_after()));
    }
    assert_eq!(delete(&status).status, 202);
    assert_eq!(s3.list(""), BTreeSet::new(), "the cancelled export's objects are gone");
    assert_eq!(get(&status).status, 404);
}

#[test]
fn s3_missing_bucket_fails_naming_it() {
    let Some(endpoint) = emulator("SLUICE_TEST_S3_ENDPOINT") else { return };
    let s3 = S3::new(endpoint, false);
    export_to_missing_bucket(&s3, &s3.bucket);
}

// ---------------------------------------------------------------------------------------
// Azure Blob (Azurite)
// ---------------------------------------------------------------------------------------

/// Azurite's well-known development account key (public, documented by Microsoft).
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

struct Azure {
    endpoint: String,
    account: String,
    container: String,
}

impl Azure {
    fn new(endpoint: String, create: bool) -> Azure {
        let account = endpoint.rsplit('/').next().unwrap().to_string();
        let azure = Azure { container: unique("sluice-e2e"), account, endpoint };
        if create {
            let r = send("PUT", &azure.url(&azure.container, &[("restype", "container")]), &[], Some(b""));
            assert_eq!(r.status, 201, "creating container {}: {}", azure.container, r.text());
        }
        azure
    }

    /// `<endpoint>/<path>?<query>&<account SAS>`: an account SAS signed here, independently
    /// of the crate under test.
    fn url(&self, path: &str, query: &[(&str, &str)]) -> String {
        let expiry = time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(600);
        let se = expiry.replace_nanosecond(0).unwrap().format(&time::format_description::well_known::Rfc3339).unwrap();
        let (sp, ss, srt, sv) = ("rwdlc", "b", "sco", "2022-11-02");
        let to_sign = format!("{}\n{sp}\n{ss}\n{srt}\n\n{se}\n\n\n{sv}\n\n", self.account);
        let mut mac = Hmac::<Sha256>::new_from_slice(&BASE64.decode(AZURITE_KEY).unwrap()).unwrap();
        mac.update(to_sign.as_bytes());
        let sig = BASE64.encode(mac.finalize().into_bytes());
        let mut q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
        for (k, v) in [("sv", sv), ("ss", ss), ("srt", srt), ("sp", sp), ("se", &se), ("sig", &sig)] {
            q.push(format!("{k}={}", enc(v)));
        }
        format!("{}/{path}?{}", self.endpoint, q.join("&"))
    }
}

impl Cloud for Azure {
    fn provider(&self) -> &'static str {
        "azure"
    }

    fn server_args(&self) -> Vec<String> {
        ["--storage-provider", "azure", "--azure-container", "exports", "--storage-endpoint", &self.endpoint]
            .into_iter()
            .map(String::from)
            .chain(["--storage-part-bytes".into(), (4 << 20).to_string()])
            .collect()
    }

    fn missing(&self) -> &'static str {
        "AzureContainer"
    }

    fn configure(&self, srv: &Server) -> Vec<String> {
        let r = put_json(&format!("{}/AzureAccount/{}", srv.url, self.account), &json!({"key": AZURITE_KEY}));
        assert_eq!(r.status, 201, "PUT AzureAccount: {}", r.text());
        assert!(!r.text().contains(AZURITE_KEY), "PUT answers with the key");
        let container = json!({
            "storage": self.account,
            "container": self.container,
            "account": {"id": self.account, "resourceType": "AzureAccount"},
        });
        let r = put_json(&format!("{}/AzureContainer/exports", srv.url), &container);
        assert_eq!(r.status, 201, "PUT AzureContainer: {}", r.text());
        let shown = get(&format!("{}/AzureAccount/{}", srv.url, self.account));
        assert_eq!(shown.status, 200);
        assert!(!shown.text().contains(AZURITE_KEY), "GET AzureAccount shows the key: {}", shown.text());
        vec![format!("/AzureAccount/{}", self.account), "/AzureContainer/exports".into()]
    }

    fn list(&self, prefix: &str) -> BTreeSet<String> {
        let url = self.url(&self.container, &[("restype", "container"), ("comp", "list"), ("prefix", prefix)]);
        let r = get(&url);
        assert_eq!(r.status, 200, "listing {}: {}", self.container, r.text());
        let xml = r.text();
        xml.split("<Name>").skip(1).map(|s| s.split("</Name>").next().unwrap().to_string()).collect()
    }

    fn url_prefix(&self) -> String {
        format!("{}/{}/", self.endpoint, self.container)
    }

    fn secret(&self) -> &'static str {
        AZURITE_KEY
    }
}

#[test]
fn azure_export_end_to_end() {
    let Some(endpoint) = emulator("SLUICE_TEST_AZURE_ENDPOINT") else { return };
    export_end_to_end(&Azure::new(endpoint, true));
}

#[test]
fn azure_organized_by_patient_in_pages() {
    let Some(endpoint) = emulator("SLUICE_TEST_AZURE_ENDPOINT") else { return };
    organized_pages(&Azure::new(endpoint, true));
}

#[test]
fn azure_missing_container_fails_naming_it() {
    let Some(endpoint) = emulator("SLUICE_TEST_AZURE_ENDPOINT") else { return };
    let azure = Azure::new(endpoint, false);
    export_to_missing_bucket(&azure, &azure.container);
}

// ---------------------------------------------------------------------------------------
// Google Cloud Storage (fake-gcs-server)
// ---------------------------------------------------------------------------------------

struct Gcs {
    endpoint: String,
    bucket: String,
}

impl Gcs {
    fn new(endpoint: String, create: bool) -> Gcs {
        let bucket = unique("sluice-e2e");
        if create {
            let r = post_json(&format!("{endpoint}/storage/v1/b"), &json!({"name": bucket}));
            assert_eq!(r.status, 200, "creating bucket {bucket}: {}", r.text());
        }
        Gcs { endpoint, bucket }
    }
}

impl Cloud for Gcs {
    fn provider(&self) -> &'static str {
        "gcp"
    }

    fn server_args(&self) -> Vec<String> {
        // No service account: against an emulator, anonymous requests (`SLUICE_STORAGE_ENDPOINT`).
        ["--storage-provider", "gcp", "--gcp-bucket", &self.bucket, "--storage-endpoint", &self.endpoint]
            .into_iter()
            .map(String::from)
            .chain(["--storage-part-bytes".into(), (1 << 20).to_string()])
            .collect()
    }

    fn missing(&self) -> &'static str {
        "" // the keyless path needs no resource
    }

    fn configure(&self, _srv: &Server) -> Vec<String> {
        Vec::new()
    }

    fn list(&self, prefix: &str) -> BTreeSet<String> {
        let r = get(&format!("{}/storage/v1/b/{}/o?prefix={}", self.endpoint, self.bucket, enc(prefix)));
        assert_eq!(r.status, 200, "listing {}: {}", self.bucket, r.text());
        let v = r.json();
        v["items"]
            .as_array()
            .map(|items| items.iter().map(|o| o["name"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }

    fn url_prefix(&self) -> String {
        format!("{}/{}/", self.endpoint, self.bucket)
    }

    fn secret(&self) -> &'static str {
        "-----BEGIN PRIVATE KEY-----"
    }

    /// fake-gcs-server takes the type from the upload's media part, not from the object
    /// metadata the SDK sends (fake-gcs-server issue #1098); sluice-storage-gcs's own tests
    /// check the `contentType` in the requests instead.
    fn keeps_content_type(&self) -> bool {
        false
    }
}

#[test]
fn gcs_export_end_to_end() {
    let Some(endpoint) = emulator("SLUICE_TEST_GCS_ENDPOINT") else { return };
    export_end_to_end(&Gcs::new(endpoint, true));
}

#[test]
fn gcs_organized_by_patient_in_pages() {
    let Some(endpoint) = emulator("SLUICE_TEST_GCS_ENDPOINT") else { return };
    organized_pages(&Gcs::new(endpoint, true));
}

#[test]
fn gcs_missing_bucket_fails_naming_it() {
    let Some(endpoint) = emulator("SLUICE_TEST_GCS_ENDPOINT") else { return };
    let gcs = Gcs::new(endpoint, false);
    export_to_missing_bucket(&gcs, &gcs.bucket);
}

/// A named `GcpServiceAccount` that does not exist is reported at kick-off; once created,
/// GET shows it without its private key.
#[test]
fn gcs_service_account_resource() {
    let srv = Server::empty(&["--storage-provider", "gcp", "--gcp-bucket", "b", "--gcp-service-account", "exporter"]);
    let r = send("GET", &srv.fhir("/$export"), &[("prefer", "respond-async")], None);
    assert_outcome(&r, 500, &["GcpServiceAccount", "exporter"]);
    let key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----\n";
    let body = json!({"service-account-email": "exporter@p.iam.gserviceaccount.com", "private-key": key});
    assert_eq!(put_json(&format!("{}/GcpServiceAccount/exporter", srv.url), &body).status, 201);
    let shown = get(&format!("{}/GcpServiceAccount/exporter", srv.url));
    assert_eq!(
        shown.json(),
        json!({"service-account-email": "exporter@p.iam.gserviceaccount.com", "resourceType": "GcpServiceAccount", "id": "exporter"})
    );
}

/// A configuration resource that names an unknown type, lacks a field or references the
/// wrong type is refused with an OperationOutcome; DELETE removes it; the storage it
/// served is then reported missing at kick-off.
#[test]
fn configuration_resources_are_checked() {
    let srv = Server::empty(&["--storage-provider", "aws", "--aws-account", "acc", "--aws-bucket", "b"]);
    let base = &srv.url;
    assert_outcome(
        &put_json(&format!("{base}/AwsAccount/acc"), &json!({"access-key-id": "A"})),
        400,
        &["secret-access-key"],
    );
    assert_outcome(&put_json(&format!("{base}/AzureContainer/c"), &json!({"storage": "s"})), 400, &["container"]);
    assert_outcome(&put_json(&format!("{base}/Nope/x"), &json!({})), 404, &["AwsAccount"]);
    assert_outcome(&get(&format!("{base}/AwsAccount/acc")), 404, &["AwsAccount/acc"]);
    let ok = json!({"region": "eu-west-1", "access-key-id": "AKID", "secret-access-key": SECRET_MARK});
    assert_eq!(put_json(&format!("{base}/AwsAccount/acc"), &ok).status, 201);
    assert_eq!(put_json(&format!("{base}/AwsAccount/acc"), &ok).status, 200, "a second PUT replaces");
    let shown: Value = get(&format!("{base}/AwsAccount/acc")).json();
    assert_eq!(
        shown,
        json!({"region": "eu-west-1", "access-key-id": "AKID", "resourceType": "AwsAccount", "id": "acc"})
    );
    assert_eq!(delete(&format!("{base}/AwsAccount/acc")).status, 204);
    assert_outcome(&delete(&format!("{base}/AwsAccount/acc")), 404, &["AwsAccount/acc"]);
    let r = send("GET", &srv.fhir("/$export"), &[("prefer", "respond-async")], None);
    assert_outcome(&r, 500, &["AwsAccount", "acc", "does not exist"]);
    // Configuration resources are not FHIR data: not readable under /fhir, never exported.
    assert_eq!(get(&srv.fhir("/AwsAccount/acc")).status, 404);
}

/// An unknown provider, or a provider without its settings, answers 500 naming the
/// setting at every kick-off, before the request itself is looked at.
#[test]
fn unusable_storage_is_reported_before_anything_else() {
    for (args, mention) in [
        (vec!["--storage-provider", "ftp"], "'ftp'"),
        (vec!["--storage-provider", "aws", "--aws-account", "a"], "BOX_FHIR_BULK_STORAGE_AWS_BUCKET"),
        (vec!["--storage-provider", "azure"], "BOX_FHIR_BULK_STORAGE_AZURE_CONTAINER"),
        (vec!["--storage-provider", "gcp"], "BOX_FHIR_BULK_STORAGE_GCP_BUCKET"),
    ] {
        let srv = Server::empty(&args);
        // Even a request that is itself invalid (unknown type) gets the storage error.
        let r = send("GET", &srv.fhir("/$export?_type=Nope"), &[("prefer", "respond-async")], None);
        assert_outcome(&r, 500, &[mention]);
    }
}
