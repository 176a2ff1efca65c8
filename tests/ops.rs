//! Running Sluice in production (issue 13, first part): the health probes `/healthz` and
//! `/readyz`, and JSON logs (`--log-format json`) in which every line about an export
//! carries its id.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

/// `GET` a probe: its status and JSON body, never cached.
fn probe(url: &str) -> (u16, Value) {
    let r = get(url);
    assert_eq!(r.media_type(), "application/json", "{url}: {}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"), "{url}");
    (r.status, r.json())
}

#[test]
fn health_probes_say_whether_a_kickoff_could_be_served() {
    let mut srv = Server::empty(&[]);
    let (status, body) = probe(&format!("{}/healthz", srv.url));
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = probe(&format!("{}/readyz", srv.url));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["store"].as_str(), body["storage"].as_str()),
        (Some("ready"), Some("ok"), Some("ok"))
    );
    srv.assert_alive();

    // S3 chosen but not configured: up, not ready, and the probe says why.
    let aws = Server::empty(&["--storage-provider", "aws"]);
    let (status, _) = probe(&format!("{}/healthz", aws.url));
    assert_eq!(status, 200);
    let (status, body) = probe(&format!("{}/readyz", aws.url));
    assert_eq!(status, 503, "{body}");
    assert_eq!((body["status"].as_str(), body["store"].as_str()), (Some("not ready"), Some("ok")), "{body}");
    let storage = body["storage"].as_str().unwrap_or_default();
    assert!(storage.starts_with("not usable") && storage.contains("BOX_FHIR_BULK_STORAGE_AWS"), "{body}");
}

#[test]
fn json_logs_are_one_object_per_line_with_the_export_id() {
    let mut srv = Server::loaded(&["--log-format", "json"]);
    let url = srv.fhir("/Patient/$export?_type=Patient");
    let status_url = kickoff(&srv, &url);
    let id = status_url.rsplit('/').next().expect("an id").to_string();
    complete_manifest(&poll_until_done(&status_url), &url);
    srv.assert_alive();

    let log = std::fs::read_to_string(srv.dir.join("server.log")).expect("the server log");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 4, "{log}");
    for l in &lines {
        for field in ["timestamp", "level", "message", "target"] {
            assert!(l[field].is_string(), "no {field} in {l}");
        }
    }
    let about = |pred: &dyn Fn(&Value) -> bool| -> Vec<&Value> { lines.iter().filter(|l| pred(l)).collect() };
    let kickoff = about(&|l| l["message"] == "request" && l["path"] == "/fhir/Patient/$export");
    assert_eq!(kickoff.len(), 1, "{log}");
    assert_eq!(kickoff[0]["status"], 202);
    assert_eq!(kickoff[0]["export_id"], id.as_str(), "the kick-off's line names the new export");
    let completed = about(&|l| l["message"] == "export completed");
    assert_eq!(completed.len(), 1, "{log}");
    assert_eq!(completed[0]["export_id"], id.as_str());
    assert_eq!(completed[0]["span"]["export_id"], id.as_str(), "the run's span names the export");
    let polls =
        about(&|l| l["message"] == "request" && l["path"].as_str().is_some_and(|p| p.contains("$export-status")));
    assert!(!polls.is_empty(), "{log}");
    for p in polls {
        assert_eq!(p["export_id"], id.as_str(), "{p}");
    }
    // Every line inside the run's span is about this export.
    for l in about(&|l| l.get("span").is_some()) {
        assert_eq!(l["span"]["export_id"], id.as_str(), "{l}");
    }
}

#[test]
fn metrics_count_what_the_exports_did() {
    let srv = Server::loaded(&["--throttle-ms", "20", "--batch-bytes", "16384"]);
    let before = Scrape::of(&srv.url, &[]);
    for level in ["system", "patient", "group"] {
        for outcome in ["started", "completed", "failed", "cancelled"] {
            let name = format!("sluice_exports_{outcome}_total");
            assert!(before.declares(&name, "counter"), "{name} is not declared:\n{}", before.text);
            assert_eq!(before.value(&name, &[("level", level)]), 0.0, "{name} {level}");
        }
    }
    assert!(before.value("process_resident_memory_bytes", &[]) > 1e6, "{}", before.text);

    // A system export, polled to its manifest.
    let url = srv.fhir("/$export?_type=Patient,Condition,Encounter");
    let status_url = kickoff(&srv, &url);
    let manifest = complete_manifest(&poll_until_done(&status_url), &url);
    // A refused kick-off (unknown type) and a poll of an unknown export.
    let bad = get(&srv.fhir("/$export?_type=NoSuchType"));
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(get(&srv.fhir("/$export-status/no-such-export")).status, 404);
    // A running patient export; a second kick-off meanwhile is refused (busy); then
    // the running one is cancelled.
    let running = kickoff(&srv, &srv.fhir("/Patient/$export?_type=Observation"));
    let busy = get(&srv.fhir("/$export"));
    assert_eq!(busy.status, 429, "the throttled export ended before the second kick-off: {}", busy.text());
    assert_eq!(delete(&running).status, 202);

    let after = Scrape::of(&srv.url, &[]);
    let m = |name: &str, labels: &[(&str, &str)]| after.value(name, labels);
    assert_eq!(m("sluice_exports_started_total", &[("level", "system")]), 1.0);
    assert_eq!(m("sluice_exports_completed_total", &[("level", "system")]), 1.0);
    assert_eq!(m("sluice_exports_failed_total", &[("level", "system")]), 0.0);
    assert_eq!(m("sluice_exports_started_total", &[("level", "patient")]), 1.0);
    assert_eq!(m("sluice_exports_cancelled_total", &[("level", "patient")]), 1.0);
    assert_eq!(m("sluice_exports_completed_total", &[("level", "patient")]), 0.0);
    assert_eq!(m("sluice_kickoffs_refused_total", &[("reason", "invalid")]), 1.0);
    assert_eq!(m("sluice_kickoffs_refused_total", &[("reason", "busy")]), 1.0);
    assert_eq!(m("sluice_status_polls_total", &[("answer", "complete")]), 1.0);
    assert_eq!(m("sluice_status_polls_total", &[("answer", "not_found")]), 1.0);

    // Resources and bytes per type: what the manifest lists (the cancelled export wrote
    // only Observations).
    let mut per_type: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for f in manifest["output"].as_array().expect("output") {
        let e = per_type.entry(f["type"].as_str().expect("type").to_string()).or_default();
        e.0 += f["count"].as_f64().expect("count");
        e.1 += f["extension"]["size"].as_f64().expect("size");
    }
    assert_eq!(per_type.len(), 3, "{manifest}");
    for (t, (count, bytes)) in &per_type {
        let labels = [("type", t.as_str()), ("provider", "local")];
        let (got_count, got_bytes) =
            (m("sluice_export_resources_total", &labels), m("sluice_export_bytes_total", &labels));
        assert_eq!((got_count, got_bytes), (*count, *bytes), "{t}: resources and bytes");
    }
    assert!(after.declares("sluice_export_duration_seconds", "histogram"));
    assert_eq!(m("sluice_export_duration_seconds_count", &[("level", "system")]), 1.0);
    assert_eq!(m("sluice_export_duration_seconds_count", &[("level", "patient")]), 0.0);
    let first_files = m("sluice_export_first_file_seconds_count", &[]);
    assert!((1.0..=2.0).contains(&first_files), "{first_files}");

    // The connection pool, on PostgreSQL.
    if pg_admin().is_some() {
        assert!(m("sluice_db_pool_max", &[]) >= 2.0, "{}", after.text);
        let (size, in_use) = (m("sluice_db_pool_size", &[]), m("sluice_db_pool_in_use", &[]));
        assert!(size >= 1.0 && in_use <= size, "{size} open, {in_use} in use");
        assert!(after.declares("sluice_db_pool_waits_total", "counter"), "{}", after.text);
    }

    // HTTP requests by route and status, with latency histograms.
    let kickoffs = [("method", "GET"), ("route", "/fhir/$export"), ("status", "202")];
    assert_eq!(m("sluice_http_requests_total", &kickoffs), 1.0);
    let refused = [("method", "GET"), ("route", "/fhir/$export"), ("status", "400")];
    assert_eq!(m("sluice_http_requests_total", &refused), 1.0);
    let cancels = [("method", "DELETE"), ("route", "/fhir/$export-status/{id}"), ("status", "202")];
    assert_eq!(m("sluice_http_requests_total", &cancels), 1.0);
    assert!(after.declares("sluice_http_request_duration_seconds", "histogram"));
    let timed = m("sluice_http_request_duration_seconds_count", &[("method", "GET"), ("route", "/fhir/$export")]);
    assert_eq!(timed, 3.0, "three GET kick-offs");
    // The first scrape is counted too; paths that match no route are not labels.
    assert_eq!(m("sluice_http_requests_total", &[("method", "GET"), ("route", "/metrics"), ("status", "200")]), 1.0);
    get(&format!("{}/no/such/path/{}", srv.url, "x".repeat(40)));
    let last = Scrape::of(&srv.url, &[]);
    assert_eq!(
        last.value("sluice_http_requests_total", &[("method", "GET"), ("route", "other"), ("status", "404")]),
        1.0
    );
    assert!(!last.text.contains("/no/such/path"), "{}", last.text);
}
