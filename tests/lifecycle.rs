//! The life of an export: one export at a time (429 for a second kick-off), progress
//! while running, cancellation (DELETE frees the slot at once and removes the files),
//! deleting a completed export, and a server killed mid-export resuming it on restart.
//!
//! The server's hidden test knobs slow exports down so a test can act while one runs:
//! a pause after every batch read from the store, and small batches.

mod common;

use common::*;
use serde_json::json;
use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant};

/// `serve` flags that make a full export take tens of seconds.
const THROTTLED: &[&str] = &["--throttle-ms", "20", "--batch-bytes", "16384"];

/// `(done, total)` from an `X-Progress` value such as `in-progress: 12% (345/38473 resources)`.
fn progress_counts(progress: &str) -> Option<(u64, u64)> {
    let inner = progress.split_once('(')?.1.split_once(')')?.0;
    let (done, rest) = inner.split_once('/')?;
    let total = rest.split_whitespace().next()?;
    Some((done.trim().parse().ok()?, total.parse().ok()?))
}

/// Asserts a status response of a running export: 202, `X-Progress`, integer
/// `Retry-After` of at most 10 seconds. Returns the `Retry-After`.
fn assert_running(r: &Resp) -> u64 {
    assert_eq!(r.status, 202, "the export should be running: {}", r.text());
    let progress = r.header("x-progress").expect("a running export's status has X-Progress");
    assert!(!progress.trim().is_empty(), "X-Progress is empty");
    let wait = r.retry_after();
    assert!((1..=10).contains(&wait), "Retry-After {wait} is not between 1 and 10 seconds");
    wait
}

/// Polls a running export, as a client would (honouring `Retry-After`), until `X-Progress`
/// reports it in progress with some resources written; returns `(done, total)`.
fn wait_for_progress(status_url: &str) -> (u64, u64) {
    let started = Instant::now();
    loop {
        let r = get(status_url);
        let wait = assert_running(&r);
        let progress = r.header("x-progress").unwrap();
        if progress.starts_with("in-progress")
            && let Some((done, total)) = progress_counts(progress)
            && done > 0
        {
            return (done, total);
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no progress within a minute: {progress}");
        std::thread::sleep(Duration::from_secs(wait));
    }
}

/// Files under `dir` (recursively) whose name ends with `suffix`.
fn files_ending_with(dir: &Path, suffix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_ending_with(&p, suffix));
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p.display().to_string());
        }
    }
    out
}

/// While an export runs, a second kick-off (any level) gets 429 with an integer
/// `Retry-After` and an OperationOutcome; the status says 202 with progress.
#[test]
fn second_kickoff_while_one_runs_gets_429() {
    let srv = Server::loaded(THROTTLED);
    let status = kickoff(&srv, &srv.fhir("/$export"));
    assert_running(&get(&status));
    for url in [srv.fhir("/$export"), srv.fhir("/Patient/$export"), srv.fhir(&format!("/Group/{GROUP_ID}/$export"))] {
        let r = send("GET", &url, &[("prefer", "respond-async")], None);
        assert_outcome(&r, 429, &[]);
        r.retry_after();
    }
    let (done, total) = wait_for_progress(&status);
    assert!(done < total, "the throttled export finished too early ({done}/{total}) to test anything");
    let r = send("GET", &srv.fhir("/$export"), &[("prefer", "respond-async")], None);
    assert_outcome(&r, 429, &[]);
    r.retry_after();
    assert_eq!(delete(&status).status, 202, "cancelling the running export");
}

/// DELETE while running: 202, the files are gone when it returns, the status is 404
/// (and a second DELETE too), and the slot is free at once for a new export.
#[test]
fn cancel_while_running_frees_the_slot_and_removes_files() {
    let srv = Server::loaded(THROTTLED);
    let status = kickoff(&srv, &srv.fhir("/$export"));
    wait_for_progress(&status);
    let folder = srv.export_folder(&status).expect("a running export with progress has its folder");

    let r = delete(&status);
    assert_eq!(r.status, 202, "DELETE of a running export: {}", r.text());
    assert!(!folder.exists(), "{} still exists after DELETE returned", folder.display());
    assert_outcome(&get(&status), 404, &[]);
    assert_outcome(&delete(&status), 404, &[]);

    let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient,AllergyIntolerance")]);
    let next = kickoff(&srv, &url);
    let m = complete_manifest(&poll_until_done(&next), &url);
    check_export(&m, &reference().types(&["AllergyIntolerance", "Patient"]));
}

/// DELETE of a completed export: 202, its files are gone (links too), status 404.
#[test]
fn delete_of_a_completed_export_removes_it() {
    let srv = Server::loaded(&[]);
    let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient,Device")]);
    let status = kickoff(&srv, &url);
    let m = complete_manifest(&poll_until_done(&status), &url);
    let folder = srv.export_folder(&status).expect("the export's folder");
    assert_eq!(files_ending_with(&folder, ".ndjson").len(), 2, "two files in {}", folder.display());
    let link = m["output"][0]["url"].as_str().unwrap().to_string();
    assert_eq!(get(&link).status, 200);

    let r = delete(&status);
    assert_eq!(r.status, 202, "DELETE of a completed export: {}", r.text());
    assert!(!folder.exists(), "{} still exists after DELETE returned", folder.display());
    assert_outcome(&get(&link), 404, &[]);
    assert_outcome(&get(&status), 404, &[]);
    assert_outcome(&delete(&status), 404, &[]);
}

/// A server killed (SIGKILL) in the middle of an export: a new server on the same data dir
/// finishes it, and the same status URL then gives the complete, exact data set.
#[test]
fn export_survives_a_killed_server() {
    // A short job lease: the new server takes the dead one's export over about a second
    // after the kill (the default is 10 s).
    let lease = ["--job-lease-ms", "1000"];
    let srv = Server::loaded(&[THROTTLED, &lease].concat());
    let url = srv.fhir("/$export");
    let status = kickoff(&srv, &url);
    let (done, total) = wait_for_progress(&status);
    assert!(done < total, "the throttled export finished too early ({done}/{total}) to test anything");

    let addr = srv.addr().to_string();
    let dir = srv.kill();
    let srv = Server::start(dir, &[&["--listen", addr.as_str()][..], &lease].concat());
    assert!(status.starts_with(&srv.url), "the restarted server answers the same status URL");
    let m = complete_manifest(&poll_until_done(&status), &url);
    let expected = reference().all();
    assert_eq!(manifest_counts(&m), counts(&expected), "counts after the restart");
    check_export(&m, &expected);
    let exports = srv.dir.join("exports");
    assert_eq!(std::fs::read_dir(&exports).unwrap().count(), 1, "one export folder in {}", exports.display());
    assert_eq!(files_ending_with(&exports, ".partial"), Vec::<String>::new(), "half-written files left behind");
}

/// An export reads one snapshot: writes made while it runs are not in it, and the next
/// export `_since` its `transactionTime` has exactly them (chained syncs lose nothing).
#[test]
fn writes_during_an_export_go_to_the_next_since_export() {
    let srv = Server::loaded(&["--throttle-ms", "50", "--batch-bytes", "4096"]);
    let types = [("_type", "Patient,Condition")];
    let url = with_query(&srv.fhir("/$export"), &types);
    let status = kickoff(&srv, &url);
    wait_for_progress(&status); // the snapshot is taken before anything is written

    let reference = reference();
    let patient_id = reference.patient_ids()[50];
    let condition_id = reference.resources["Condition"].keys().last().unwrap().clone();
    let mut patient = reference.resource("Patient", patient_id);
    patient["active"] = json!(true);
    let mut condition = reference.resource("Condition", &condition_id);
    condition["verificationStatus"] = json!({"text": "refuted"});
    let new_condition = json!({
        "resourceType": "Condition", "id": "during-export", "code": {"text": "written while exporting"},
        "subject": {"reference": format!("Patient/{patient_id}")},
    });
    assert_eq!(put_json(&srv.fhir(&format!("/Patient/{patient_id}")), &patient).status, 200);
    assert_eq!(put_json(&srv.fhir(&format!("/Condition/{condition_id}")), &condition).status, 200);
    assert_eq!(put_json(&srv.fhir("/Condition/during-export"), &new_condition).status, 201);

    let first = complete_manifest(&poll_until_done(&status), &url);
    check_export(&first, &reference.types(&["Condition", "Patient"]));

    let t1 = first["transactionTime"].as_str().unwrap();
    let since = with_query(&srv.fhir("/$export"), &[types[0], ("_since", t1)]);
    let mut expected = Expected::new();
    expected.entry("Patient".into()).or_default().insert(patient_id.into(), Cow::Owned(patient.to_string()));
    let conditions = expected.entry("Condition".into()).or_default();
    conditions.insert(condition_id, Cow::Owned(condition.to_string()));
    conditions.insert("during-export".into(), Cow::Owned(new_condition.to_string()));
    check_export(&export(&srv, &since), &expected);
}

/// While an export runs, the 202's body is the same progress as JSON, per type.
#[test]
fn progress_is_also_json() {
    let srv = Server::loaded(THROTTLED);
    let status = kickoff(&srv, &srv.fhir("/$export"));
    let (done, total) = wait_for_progress(&status);
    assert!(done > 0 && done <= total);
    let r = get(&status);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.media_type(), "application/json");
    let body = r.json();
    assert_eq!(body["status"], "in-progress");
    let (now_done, now_total) = progress_counts(r.header("x-progress").unwrap()).expect("counts in X-Progress");
    assert_eq!((body["done"].as_u64(), body["total"].as_u64()), (Some(now_done), Some(now_total)));
    assert!(body["percent"].as_u64().unwrap() < 100);
    let types = body["types"].as_object().unwrap();
    assert_eq!(types.len(), DATA_COUNTS.len(), "every type of the data set has a progress entry");
    let sum: u64 = types.values().map(|t| t["done"].as_u64().unwrap()).sum();
    assert_eq!(sum, now_done);
    for (t, p) in types {
        let expected = DATA_COUNTS.iter().find(|(n, _)| n == t).unwrap().1 as u64;
        assert_eq!(p["total"].as_u64(), Some(expected), "total of {t}");
        assert!(p["done"].as_u64().unwrap() <= expected);
    }
    assert_eq!(delete(&status).status, 202);
}
