//! The embedding example (`examples/host.rs`), served on a real socket: a patient export
//! through Sluice mounted under `/bulk` in a host's axum app, next to the host's own route,
//! behind the host's own authorization.

#[allow(dead_code)] // the example's `main` is not run here
#[path = "../../../examples/host.rs"]
mod host;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The sample files loaded: the Patient compartment's types and two outside it.
const FILES: [&str; 6] = ["Patient", "Condition", "Encounter", "Observation", "Organization", "Practitioner"];

fn sample(t: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../examples/data/r4-100-patients-groups/{t}.ndjson.gz"))
}

/// Every resource of the sample files, by type and id.
fn source() -> BTreeMap<(String, String), Value> {
    let mut all = BTreeMap::new();
    for t in FILES {
        let gz = flate2::read::MultiGzDecoder::new(std::fs::File::open(sample(t)).unwrap());
        for line in BufReader::new(gz).lines() {
            let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
            all.insert((t.to_string(), v["id"].as_str().unwrap().to_string()), v);
        }
    }
    all
}

struct Running {
    base: String,
    host: host::Host,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn start() -> Running {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let host = {
        let _runtime = runtime.enter(); // the engine starts its recovery task
        host::host(dir.path(), &base).unwrap()
    };
    let paths: Vec<PathBuf> = FILES.iter().map(|t| sample(t)).collect();
    runtime
        .block_on(sluice_load::load_paths(host.store.as_ref(), &paths, 1, Arc::new(sluice_load::Quiet)))
        .expect("loading the sample files");
    let app = host.app.clone();
    runtime.spawn(async move { axum::serve(listener, app).await });
    Running { base, host, runtime, _dir: dir }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn get(url: &str, key: Option<&str>) -> (u16, ureq::http::HeaderMap, String) {
    let mut req = agent().get(url).header("Prefer", "respond-async").header("Accept", "application/fhir+json");
    if let Some(k) = key {
        req = req.header("X-Api-Key", k);
    }
    let mut res = req.call().unwrap();
    let body = res.body_mut().read_to_string().unwrap();
    (res.status().as_u16(), res.headers().clone(), body)
}

#[test]
fn a_patient_export_runs_through_the_host_app() {
    let r = start();
    let (status, _, body) = get(&format!("{}/", r.base), None);
    assert_eq!((status, body.as_str()), (200, "the host's own page"), "the host's route is its own");

    let kickoff = format!("{}/bulk/fhir/Patient/$export", r.base);
    let (status, headers, _) = get(&kickoff, Some(host::API_KEY));
    assert_eq!(status, 202);
    let location = headers["content-location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&format!("{}/bulk/fhir/$export-status/", r.base)), "{location}");

    // The Bulk Data protocol: poll, waiting the Retry-After the server asks for.
    let manifest = loop {
        let (status, headers, body) = get(&location, Some(host::API_KEY));
        match status {
            200 => break serde_json::from_str::<Value>(&body).unwrap(),
            202 => std::thread::sleep(Duration::from_secs(headers["retry-after"].to_str().unwrap().parse().unwrap())),
            s => panic!("status {s}: {body}"),
        }
    };
    assert_eq!(manifest["request"], Value::String(kickoff.clone()), "the request as the client sent it");

    // Every resource in a patient's compartment, exactly once, with its content as loaded.
    let source = source();
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ((t, id), v) in &source {
        let text = v.to_string();
        let json = sluice_json::Json::parse(&text).unwrap();
        if !sluice_fhir::patient_ids(&json).is_empty() {
            expected.entry(t.clone()).or_default().insert(id.clone());
        }
    }
    assert_eq!(expected.keys().collect::<Vec<_>>(), ["Condition", "Encounter", "Observation", "Patient"]);
    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in manifest["output"].as_array().unwrap() {
        let t = file["type"].as_str().unwrap().to_string();
        let url = file["url"].as_str().unwrap();
        let key = url.strip_prefix("memory://").unwrap().split('?').next().unwrap();
        let object = r.host.files.get(key).unwrap_or_else(|| panic!("{key} is not in the host's storage"));
        let text = String::from_utf8(object.bytes.to_vec()).unwrap();
        assert_eq!(text.lines().count() as u64, file["count"].as_u64().unwrap(), "{key}: count");
        for line in text.lines() {
            let mut v: Value = serde_json::from_str(line).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            let meta = v["meta"].as_object_mut().unwrap();
            assert!(meta.remove("versionId").is_some() && meta.remove("lastUpdated").is_some(), "{line}");
            let original = &source[&(t.clone(), id.clone())];
            if meta.is_empty() && original.get("meta").is_none() {
                v.as_object_mut().unwrap().remove("meta");
            }
            assert_eq!(&v, original, "{t}/{id} comes out as it went in");
            assert!(exported.entry(t.clone()).or_default().insert(id), "{t}: a resource appears twice");
        }
    }
    assert_eq!(exported, expected);
    drop(r.runtime);
}

#[test]
fn the_hosts_authorization_decides_and_every_refusal_is_an_operation_outcome() {
    let r = start();
    let url = |path: &str| format!("{}/bulk{path}", r.base);
    for (url, key, want) in [
        (url("/fhir/$export"), None, 401),
        (url("/fhir/$export"), Some("wrong"), 401),
        (url("/fhir/$export-status/nope"), None, 401),
        (url("/fhir/Patient/p1"), None, 401),
        (url("/AwsAccount/a1"), Some(host::API_KEY), 403),
    ] {
        let (status, headers, body) = get(&url, key);
        assert_eq!(status, want, "{url}: {body}");
        assert!(headers["content-type"].to_str().unwrap().starts_with("application/fhir+json"), "{url}");
        let outcome: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        let code = if want == 401 { "login" } else { "forbidden" };
        assert_eq!(outcome["issue"][0]["code"], code, "{url}");
    }
    let (status, _, body) = get(&format!("{}/bulk/fhir/metadata", r.base), None);
    assert_eq!(status, 200, "the CapabilityStatement is public: {body}");
    let (status, _, body) = get(&format!("{}/bulk/nothing/here/at/all", r.base), Some(host::API_KEY));
    assert_eq!(status, 404);
    assert!(body.contains("OperationOutcome"), "Sluice's fallback answers inside /bulk: {body}");
    drop(r.runtime);
}
