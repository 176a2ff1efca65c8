//! Bad kick-offs and bad requests: each gets the right status and an OperationOutcome that
//! names the offending value (and, where the planner sets one, the `expression`). With
//! `Prefer: handling=lenient` a bad parameter is ignored and reported in the manifest's
//! `error` files instead (D2). After every test the server must still be answering.

mod common;

use common::*;
use serde_json::json;

/// Kick-off headers a bulk client sends.
const ASYNC: (&str, &str) = ("prefer", "respond-async");
const LENIENT: (&str, &str) = ("prefer", "respond-async, handling=lenient");

/// GET kick-off at `path` (under `/fhir`) with `params` and an extra header.
fn get_kickoff(srv: &Server, path: &str, params: &[(&str, &str)], header: (&str, &str)) -> Resp {
    send("GET", &with_query(&srv.fhir(path), params), &[header], None)
}

/// Asserts an error OperationOutcome naming `mentions`, with `expression` as given.
fn assert_kickoff_error(r: &Resp, status: u16, mentions: &[&str], expression: &str) {
    let oo = assert_outcome(r, status, mentions);
    assert_eq!(expressions(&oo), vec![expression.to_string()], "issue[0].expression: {oo}");
}

/// A lenient kick-off at system level completes; its manifest lists one OperationOutcome
/// error file whose lines are warnings mentioning every one of `mentions`.
fn assert_lenient_export_reports(srv: &Server, params: &[(&str, &str)], mentions: &[&str]) {
    let url = with_query(&srv.fhir("/$export"), params);
    let status = assert_accepted(&send("GET", &url, &[LENIENT], None), srv);
    let m = complete_manifest(&poll_until_done(&status), &url);
    let errors = m["error"].as_array().expect("error array");
    assert_eq!(errors.len(), 1, "one error file: {m}");
    assert_eq!(errors[0]["type"], "OperationOutcome");
    let files = download_entries(&m["error"]);
    let lines = &files["OperationOutcome"];
    assert!(!lines.is_empty(), "the error file is empty");
    for line in lines {
        let oo: serde_json::Value = serde_json::from_str(line).expect("an OperationOutcome line");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{line}");
    }
    for m in mentions {
        assert!(lines.iter().any(|l| l.contains(m)), "no error line mentions {m:?}: {lines:?}");
    }
}

#[test]
fn unknown_type_is_400() {
    let mut srv = Server::empty(&[]);
    let r = get_kickoff(&srv, "/$export", &[("_type", "Patient,Foo")], ASYNC);
    assert_kickoff_error(&r, 400, &["Foo"], "_type");
    srv.assert_alive();
}

#[test]
fn unparsable_since_is_400() {
    let mut srv = Server::empty(&[]);
    let r = get_kickoff(&srv, "/$export", &[("_since", "yesterday")], ASYNC);
    assert_kickoff_error(&r, 400, &["yesterday"], "_since");
    srv.assert_alive();
}

#[test]
fn patient_at_system_level_is_400() {
    let mut srv = Server::empty(&[]);
    let r = get_kickoff(&srv, "/$export", &[("patient", "abc")], ASYNC);
    assert_kickoff_error(&r, 400, &["patient", "abc"], "patient");
    srv.assert_alive();
}

#[test]
fn missing_group_or_patient_is_404() {
    let mut srv = Server::empty(&[]);
    let r = get_kickoff(&srv, "/Group/no-such-group/$export", &[], ASYNC);
    assert_outcome(&r, 404, &["no-such-group"]);
    let r = get_kickoff(&srv, "/Patient/$export", &[("patient", "no-such-patient")], ASYNC);
    assert_outcome(&r, 404, &["no-such-patient"]);
    srv.assert_alive();
}

#[test]
fn post_bodies_that_are_not_parameters_are_400() {
    let mut srv = Server::empty(&[]);
    let url = srv.fhir("/$export");
    let fhir_json = ("content-type", "application/fhir+json");
    let patient = json!({"resourceType": "Patient", "id": "p"}).to_string();
    let r = send("POST", &url, &[ASYNC, fhir_json], Some(patient.as_bytes()));
    assert_kickoff_error(&r, 400, &["Patient"], "Parameters");
    let r = send("POST", &url, &[ASYNC, fhir_json], Some(br#"{"resourceType": "Parameters", "#));
    assert_kickoff_error(&r, 400, &["JSON"], "Parameters");
    let params = parameters(&[("_type", "valueString", json!("Patient"))]).to_string();
    let r = send("POST", &url, &[ASYNC, ("content-type", "text/plain")], Some(params.as_bytes()));
    assert_kickoff_error(&r, 400, &["text/plain"], "Content-Type");
    srv.assert_alive();
}

#[test]
fn unknown_parameter_is_400_or_reported_when_lenient() {
    let mut srv = Server::empty(&[]);
    let r = get_kickoff(&srv, "/$export", &[("foo", "bar")], ASYNC);
    assert_kickoff_error(&r, 400, &["foo"], "foo");
    assert_lenient_export_reports(&srv, &[("foo", "bar")], &["foo"]);
    srv.assert_alive();
}

#[test]
fn unsupported_output_format_is_400() {
    let mut srv = Server::empty(&[]);
    let r = get_kickoff(&srv, "/$export", &[("_outputFormat", "text/csv")], ASYNC);
    assert_kickoff_error(&r, 400, &["text/csv"], "_outputFormat");
    srv.assert_alive();
}

#[test]
fn unacceptable_accept_is_406() {
    let mut srv = Server::empty(&[]);
    let r = send("GET", &srv.fhir("/$export"), &[ASYNC, ("accept", "text/html")], None);
    assert_kickoff_error(&r, 406, &["text/html"], "Accept");
    srv.assert_alive();
}

#[test]
fn unusable_type_filter_is_400_strict_and_reported_when_lenient() {
    let mut srv = Server::empty(&[]);
    let filter = [("_typeFilter", "Observation?_include=Observation:subject")];
    let r = get_kickoff(&srv, "/$export", &filter, ASYNC);
    assert_kickoff_error(&r, 400, &["_typeFilter", "_include"], "_typeFilter");
    assert_lenient_export_reports(&srv, &filter, &["_typeFilter"]);
    srv.assert_alive();
}

#[test]
fn unknown_export_status_is_404() {
    let mut srv = Server::empty(&[]);
    let url = srv.fhir("/$export-status/3f1c0a52-0000-4000-8000-000000000000");
    assert_outcome(&get(&url), 404, &["3f1c0a52-0000-4000-8000-000000000000"]);
    assert_outcome(&delete(&url), 404, &[]);
    srv.assert_alive();
}

#[test]
fn unknown_paths_are_404() {
    let mut srv = Server::empty(&[]);
    assert_outcome(&get(&format!("{}/no/such/endpoint", srv.url)), 404, &["/no/such/endpoint"]);
    assert_outcome(&get(&srv.fhir("/Patient/p/_history/1/extra")), 404, &["/fhir/Patient/p/_history/1/extra"]);
    srv.assert_alive();
}

#[test]
fn wrong_methods_are_405() {
    let mut srv = Server::empty(&[]);
    assert_outcome(&send("PUT", &srv.fhir("/$export"), &[], Some(b"{}")), 405, &["PUT", "/fhir/$export"]);
    assert_outcome(&send("DELETE", &srv.fhir("/metadata"), &[], None), 405, &["DELETE", "/fhir/metadata"]);
    srv.assert_alive();
}

/// Requests the router itself rejects (a path that is not UTF-8) still get an
/// OperationOutcome, not axum's plain-text message.
#[test]
fn framework_rejections_are_outcomes_too() {
    let mut srv = Server::empty(&[]);
    let r = get(&srv.fhir("/Patient/%FF%FE"));
    assert_eq!(r.status, 400, "{}", r.text());
    let oo = assert_outcome(&r, 400, &[]);
    assert!(!oo["issue"][0]["diagnostics"].as_str().unwrap_or_default().is_empty());
    srv.assert_alive();
}

/// An export that cannot write its files fails. Its status is 500 with the failure's
/// OperationOutcome; with `Prefer: respond-async, separate-export-status` at kick-off it is
/// 200 (the status request worked) with `X-Export-Status: 500 Internal Server Error` and the
/// same OperationOutcome as `application/fhir+json`.
#[test]
fn failed_export_status_with_and_without_separate_export_status() {
    let mut srv = Server::empty(&[]);
    // Local export files go under <data-dir>/exports: a plain file there makes every write fail.
    let exports = srv.dir.join("exports");
    let _ = std::fs::remove_dir_all(&exports);
    std::fs::write(&exports, b"not a folder").expect("writing a file where the export folder goes");

    let r = send("GET", &srv.fhir("/$export"), &[ASYNC], None);
    let status = assert_accepted(&r, &srv);
    assert_eq!(r.header("preference-applied"), None, "separate-export-status was not asked for");
    let done = poll_until_done(&status);
    let plain = assert_outcome(&done, 500, &[]);
    assert_eq!(done.header("x-export-status"), None);

    let separate = ("prefer", "respond-async, separate-export-status");
    let status = assert_accepted(&send("GET", &srv.fhir("/$export"), &[separate], None), &srv);
    let done = poll_until_done(&status);
    assert_eq!(done.header("x-export-status"), Some("500 Internal Server Error"), "{}", done.text());
    assert_eq!(done.media_type(), "application/fhir+json");
    let oo = assert_outcome(&done, 200, &[]);
    for k in ["severity", "code"] {
        assert_eq!(oo["issue"][0][k], plain["issue"][0][k], "the same kind of failure: {oo} / {plain}");
    }
    srv.assert_alive();
}
