//! Running Sluice in production (issue 13, first part): the health probes `/healthz` and
//! `/readyz`, and JSON logs (`--log-format json`) in which every line about an export
//! carries its id.

mod common;

use common::*;
use serde_json::Value;

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
