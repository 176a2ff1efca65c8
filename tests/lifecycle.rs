//! The life of an export: one export at a time (429 for a second kick-off), progress and
//! an estimate of the time left while running, 429 for status polls faster than
//! `Retry-After` (D13), `Prefer: separate-export-status`, cancellation (DELETE frees the
//! slot at once and removes the files), deleting a completed export, and a server killed
//! mid-export resuming it on restart.
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

/// Asserts a 429 for polling too fast (D13): a `throttled` OperationOutcome that says how
/// long to wait, and an integer `Retry-After` of at most 10 seconds. Returns the
/// `Retry-After`.
fn assert_throttled(r: &Resp) -> u64 {
    let oo = assert_outcome(r, 429, &["Retry-After"]);
    assert_eq!(oo["issue"][0]["code"], "throttled", "{oo}");
    let wait = r.retry_after();
    assert!((1..=10).contains(&wait), "Retry-After {wait} is not between 1 and 10 seconds");
    wait
}

/// Polls a running export, as a client would (waiting each `Retry-After`, a 429's too),
/// until a 202 satisfies `done`; returns that response. Fails if the export stops running
/// or a minute passes.
fn poll_running_until(status_url: &str, what: &str, done: impl Fn(&Resp) -> bool) -> Resp {
    let started = Instant::now();
    loop {
        let r = get(status_url);
        let wait = if r.status == 429 { assert_throttled(&r) } else { assert_running(&r) };
        if r.status == 202 && done(&r) {
            return r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: not within a minute: {:?}",
            r.header("x-progress")
        );
        std::thread::sleep(Duration::from_secs(wait));
    }
}

/// Polls a running export until `X-Progress` reports it in progress with some resources
/// written; returns that 202 response.
fn wait_for_progress_response(status_url: &str) -> Resp {
    poll_running_until(status_url, "progress", |r| {
        let progress = r.header("x-progress").unwrap_or_default();
        progress.starts_with("in-progress") && progress_counts(progress).is_some_and(|(done, _)| done > 0)
    })
}

/// [`wait_for_progress_response`]'s `(done, total)`.
fn wait_for_progress(status_url: &str) -> (u64, u64) {
    let r = wait_for_progress_response(status_url);
    progress_counts(r.header("x-progress").unwrap()).expect("counts in X-Progress")
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

/// SIGTERM lets a download in flight finish (issue 13: `--shutdown-grace`): the server stops
/// accepting connections at once, serves the rest of the file, and then exits cleanly.
#[test]
fn sigterm_lets_a_running_download_finish() {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut srv = Server::loaded(&["--shutdown-grace", "120"]);
    let url = srv.fhir("/$export?_type=Observation");
    let manifest = export(&srv, &url);
    let file = &manifest["output"][0];
    let link = file["url"].as_str().expect("a download URL");
    let size = file["extension"]["size"].as_u64().expect("a size");
    assert!(size > 4 << 20, "a file large enough not to fit the socket buffers: {size} bytes");

    let mut body = ureq::get(link).call().expect("starting the download").into_body().into_reader();
    let mut got = vec![0u8; 64 << 10];
    body.read_exact(&mut got).expect("the first 64 KiB");
    srv.sigterm();
    // New connections are refused once the signal is handled...
    let addr = srv.addr().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections a minute after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... while the download in flight runs to its end, byte for byte.
    body.read_to_end(&mut got).expect("the rest of the file");
    assert_eq!(got.len() as u64, size);
    assert_eq!(hex::encode(sha2::Sha256::digest(&got)), file["extension"]["sha256"].as_str().expect("a SHA-256"));
    let status = srv.wait_exit();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// SIGTERM hands a running export over (issue 13): the stopping server stops its run
/// without deleting what it wrote, releases the lease and exits cleanly, so a peer sharing
/// the store takes the export over long before the lease runs out, and the export completes
/// exactly. The takeover time is printed.
#[test]
fn sigterm_hands_the_export_over_to_a_peer() {
    // A lease far longer than the test: only a released lease is taken over in time.
    let lease = ["--job-lease-ms", "120000"];
    let srv = Server::loaded(&[THROTTLED, &lease].concat());
    let peer = Server::beside(&srv, &[&lease[..], &["--log-format", "json"]].concat());
    let url = srv.fhir("/$export");
    let status = kickoff(&srv, &url);
    let (done, total) = wait_for_progress(&status);
    assert!(done < total, "the throttled export finished too early ({done}/{total}) to test anything");

    let sent = std::time::SystemTime::now();
    let (exit, dir) = srv.terminate();
    assert!(exit.success(), "the server stopped by SIGTERM exits cleanly: {exit}");
    let on_peer = status.replacen(&url[..url.len() - "/fhir/$export".len()], &peer.url, 1);
    let m = complete_manifest(&poll_until_done(&on_peer), &url);
    let expected = reference().all();
    assert_eq!(manifest_counts(&m), counts(&expected), "counts after the handover");
    check_export(&m, &expected);
    let exports = dir.path().join("exports");
    assert_eq!(std::fs::read_dir(&exports).unwrap().count(), 1, "one export folder in {}", exports.display());
    assert_eq!(files_ending_with(&exports, ".partial"), Vec::<String>::new(), "half-written files left behind");

    // When the peer took it over, from its log.
    let log = std::fs::read_to_string(dir.path().join("peer.log")).expect("the peer's log");
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "taking over an interrupted export")
        .unwrap_or_else(|| panic!("the peer never took the export over:\n{log}"));
    let at = time::OffsetDateTime::parse(
        line["timestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("a timestamp");
    let took = (at - time::OffsetDateTime::from(sent)).as_seconds_f64();
    eprintln!("handover: the peer took the export over {took:.2} s after SIGTERM (lease {} ms)", lease[1]);
    assert!(took < 120.0, "taken over only when the lease ran out: the lease was not released");
    drop(peer);
    drop(dir);
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
    let r = wait_for_progress_response(&status);
    assert_eq!(r.media_type(), "application/json");
    let body = r.json();
    assert_eq!(body["status"], "in-progress");
    let (now_done, now_total) = progress_counts(r.header("x-progress").unwrap()).expect("counts in X-Progress");
    assert!(now_done > 0 && now_done <= now_total);
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

/// Once the rate can be told, `X-Progress` says about how long is left, before the counts
/// (`in-progress: 42%, about 12 s left (1234/5678 resources)`), and the JSON body has the
/// same estimate as `estimatedSecondsLeft`.
#[test]
fn progress_estimates_the_time_left() {
    let srv = Server::loaded(THROTTLED);
    let status = kickoff(&srv, &srv.fhir("/$export"));
    let r = poll_running_until(&status, "an estimate of the time left", |r| {
        r.header("x-progress").is_some_and(|p| p.contains(" left ("))
    });
    let progress = r.header("x-progress").unwrap();
    assert!(progress.len() < 100, "the IG wants X-Progress under 100 characters: {progress:?}");
    let (done, total) = progress_counts(progress).expect("counts in X-Progress");
    assert!(0 < done && done < total, "{progress}");
    assert!(progress.ends_with(" resources)"), "the counts stay last: {progress}");
    let body = r.json();
    let secs = body["estimatedSecondsLeft"].as_u64().unwrap_or_else(|| panic!("no estimatedSecondsLeft: {body}"));
    assert!(secs > 0, "{body}");
    let said =
        if secs < 120 { format!("about {secs} s left") } else { format!("about {} min left", secs.div_ceil(60)) };
    assert!(progress.contains(&format!("%, {said} (")), "X-Progress {progress:?} does not say {said:?}");
    assert_eq!(delete(&status).status, 202);
}

/// D13: a status poll sooner than the last `Retry-After` allows (the server accepts polls
/// from half of it on) gets 429 with `Retry-After` and a `throttled` OperationOutcome;
/// after waiting that `Retry-After`, the next poll is answered normally. DELETE is never
/// throttled.
#[test]
fn polling_faster_than_retry_after_gets_429() {
    let srv = Server::loaded(THROTTLED);
    let status = kickoff(&srv, &srv.fhir("/$export"));
    // Two polls back to back. If the time from sending the first to receiving the second
    // is under half the Retry-After, the server saw them closer than that too, so the
    // second must be refused. A slower pair (a loaded machine) proves nothing: after the
    // Retry-After, try again.
    let mut wait = 0;
    let mut tries = 0;
    let refused = loop {
        std::thread::sleep(Duration::from_secs(wait));
        let sent = Instant::now();
        let first = get(&status);
        let asked = assert_running(&first);
        let second = get(&status);
        let span = sent.elapsed();
        if second.status == 429 {
            break (second, asked);
        }
        assert!(
            span >= Duration::from_secs(asked) / 2,
            "a poll within {span:?} of a 202 with Retry-After: {asked} was answered {}",
            second.status
        );
        wait = assert_running(&second);
        tries += 1;
        assert!(tries < 20, "no two polls came within half a Retry-After of each other in {tries} tries");
    };
    let (refused, asked) = refused;
    let wait = assert_throttled(&refused);
    assert!(wait <= asked, "Retry-After {wait} is more than the interval the server asked for ({asked} s)");
    assert!(refused.header("x-progress").is_none(), "a refused poll gets no status");

    // Waiting what the 429 said is enough.
    std::thread::sleep(Duration::from_secs(wait));
    let r = get(&status);
    assert_running(&r);
    assert!(r.header("x-progress").is_some());

    // DELETE right after a poll is not throttled; then the export is gone (404, not 429).
    assert_eq!(delete(&status).status, 202, "DELETE is never throttled");
    assert_outcome(&get(&status), 404, &[]);
}

/// `Prefer: respond-async, separate-export-status` (Bulk Data IG 3.0): the kick-off
/// answers `Preference-Applied` with both; status responses are then 200 whenever the
/// status request worked, with the export's own status in `X-Export-Status` (`202
/// Accepted` while running, `200 OK` with the manifest); a deleted export is still a
/// plain 404. The completed manifest is served on every poll, however close together.
#[test]
fn separate_export_status_puts_the_export_status_in_a_header() {
    let srv = Server::loaded(THROTTLED);
    let separate = [("accept", "application/fhir+json"), ("prefer", "respond-async,separate-export-status")];
    let r = send("GET", &srv.fhir("/$export"), &separate, None);
    let status = assert_accepted(&r, &srv);
    let applied: Vec<String> = r
        .headers
        .get_all("preference-applied")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(',').map(|t| t.trim().to_string()).collect::<Vec<_>>())
        .collect();
    assert!(
        applied.contains(&"respond-async".to_string()) && applied.contains(&"separate-export-status".to_string()),
        "Preference-Applied: {applied:?}"
    );

    let r = get(&status);
    assert_eq!(r.status, 200, "a running export's status with separate-export-status: {}", r.text());
    assert_eq!(r.header("x-export-status"), Some("202 Accepted"));
    assert!(r.header("x-progress").is_some(), "X-Progress is still there");
    let wait = r.retry_after();
    assert!((1..=10).contains(&wait));
    assert_eq!(r.media_type(), "application/json");
    assert!(r.json()["status"].is_string());
    assert_eq!(delete(&status).status, 202);
    let r = get(&status);
    assert_outcome(&r, 404, &[]);
    assert_eq!(r.header("x-export-status"), None, "a 404 is about the status request itself");

    let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient")]);
    let status = assert_accepted(&send("GET", &url, &separate, None), &srv);
    let done = poll_until_done(&status);
    assert_eq!(done.header("x-export-status"), Some("200 OK"), "{}", done.text());
    let m = complete_manifest(&done, &url);
    check_export(&m, &reference().types(&["Patient"]));
    for _ in 0..2 {
        let again = get(&status);
        assert_eq!((again.status, again.header("x-export-status")), (200, Some("200 OK")), "{}", again.text());
    }
    // Without the preference (the same export's plain status URL), the plain codes.
    let plain = status.split('?').next().unwrap();
    let r = get(plain);
    assert_eq!((r.status, r.header("x-export-status")), (200, None));
}
