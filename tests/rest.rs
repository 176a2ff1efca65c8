//! The little FHIR REST API used to put data in: create, update, read and delete one
//! resource, server-assigned ids, and `transaction` / `batch` Bundles (urn:uuid references
//! rewritten; a transaction is all or nothing, a batch entry fails alone).

mod common;

use common::*;
use serde_json::{Value, json};

/// Asserts a write response: `status`, `ETag: W/"<version>"`, a `Location` naming the
/// resource, and the stored resource in the body with `meta.versionId` / `lastUpdated`.
/// Returns the body.
fn assert_written(r: &Resp, status: u16, resource: &str, version: u64) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("etag"), Some(format!("W/\"{version}\"").as_str()), "ETag");
    let location = r.header("location").expect("Location");
    assert!(location.contains(&format!("/fhir/{resource}")), "Location {location} does not name {resource}");
    let body = r.json();
    assert_eq!(body["meta"]["versionId"], version.to_string(), "meta.versionId: {body}");
    let updated = body["meta"]["lastUpdated"].as_str().unwrap_or_default();
    assert!(is_instant(updated), "meta.lastUpdated {updated:?}");
    body
}

/// The resource without the server's meta.
fn without_meta(mut v: Value) -> Value {
    strip_server_meta(&mut v, "resource");
    v
}

#[test]
fn put_get_delete_lifecycle() {
    let mut srv = Server::empty(&[]);
    let url = srv.fhir("/Patient/rest-p1");
    let v1 = json!({"resourceType": "Patient", "id": "rest-p1", "gender": "female", "birthDate": "1970-01-01"});
    let created = assert_written(&put_json(&url, &v1), 201, "Patient/rest-p1", 1);
    assert_eq!(without_meta(created.clone()), v1, "the stored resource is the one sent");

    let mut v2 = v1.clone();
    v2["gender"] = json!("male");
    let updated = assert_written(&put_json(&url, &v2), 200, "Patient/rest-p1", 2);
    assert_eq!(without_meta(updated.clone()), v2);
    let (t1, t2) = (created["meta"]["lastUpdated"].as_str().unwrap(), updated["meta"]["lastUpdated"].as_str().unwrap());
    assert!(t2 > t1, "lastUpdated moves forward: {t1} then {t2}");

    let read = get(&url);
    assert_eq!(read.status, 200);
    assert_eq!(read.media_type(), "application/fhir+json");
    assert_eq!(read.json(), updated, "GET returns the current version");

    let r = delete(&url);
    assert!((200..300).contains(&r.status), "DELETE: {} {}", r.status, r.text());
    assert_outcome(&get(&url), 410, &["rest-p1"]);
    let r = delete(&url);
    assert!((200..300).contains(&r.status), "a second DELETE is fine: {} {}", r.status, r.text());
    assert_outcome(&get(&url), 410, &[]);
    assert_outcome(&get(&srv.fhir("/Patient/never-was")), 404, &["never-was"]);
    srv.assert_alive();
}

#[test]
fn put_with_mismatched_type_or_id_is_400() {
    let mut srv = Server::empty(&[]);
    let url = srv.fhir("/Patient/rest-p2");
    assert_outcome(&put_json(&url, &json!({"resourceType": "Observation", "id": "rest-p2"})), 400, &["Observation"]);
    assert_outcome(&put_json(&url, &json!({"resourceType": "Patient", "id": "other"})), 400, &["other"]);
    assert_outcome(&send("PUT", &url, &[("content-type", "application/fhir+json")], Some(b"{not json")), 400, &[]);
    assert_outcome(&get(&url), 404, &[]);
    srv.assert_alive();
}

#[test]
fn post_assigns_an_id() {
    let mut srv = Server::empty(&[]);
    let sent = json!({"resourceType": "Patient", "gender": "other"});
    let r = post_json(&srv.fhir("/Patient"), &sent);
    assert_eq!(r.status, 201, "{}", r.text());
    let body = r.json();
    let id = body["id"].as_str().expect("an assigned id").to_string();
    assert!(!id.is_empty());
    assert_written(&r, 201, &format!("Patient/{id}"), 1);
    let read = get(&srv.fhir(&format!("/Patient/{id}")));
    assert_eq!(read.status, 200);
    assert_eq!(read.json(), body);
    let again = post_json(&srv.fhir("/Patient"), &sent).json();
    assert_ne!(again["id"], body["id"], "every POST gets a new id");
    srv.assert_alive();
}

/// A transaction Bundle in Synthea's style: entries POSTed with `urn:uuid` fullUrls and
/// references between them.
#[test]
fn transaction_rewrites_urn_uuid_references() {
    let mut srv = Server::empty(&[]);
    let patient_urn = "urn:uuid:0b9c3a53-3d1c-4c42-9f57-4d2a8a0e0001";
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient_urn, "resource": {"resourceType": "Patient", "gender": "female"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:0b9c3a53-3d1c-4c42-9f57-4d2a8a0e0002",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": patient_urn}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Encounter", "id": "tx-enc", "status": "finished",
                      "class": {"code": "AMB"}, "subject": {"reference": patient_urn}},
         "request": {"method": "PUT", "url": "Encounter/tx-enc"}}
    ]});
    let r = post_json(&srv.fhir(""), &bundle);
    assert_eq!(r.status, 200, "{}", r.text());
    let resp = r.json();
    assert_eq!(resp["type"], "transaction-response");
    let locations: Vec<String> = (0..3)
        .map(|i| {
            let e = &resp["entry"][i]["response"];
            assert!(e["status"].as_str().unwrap_or_default().starts_with("201"), "entry {i}: {e}");
            e["location"].as_str().unwrap_or_else(|| panic!("entry {i} has no location: {e}")).to_string()
        })
        .collect();
    let id_of = |loc: &str, t: &str| -> String {
        let rest = loc.split_once(&format!("{t}/")).unwrap_or_else(|| panic!("{loc} is not a {t}")).1;
        rest.split('/').next().unwrap().to_string()
    };
    let patient_id = id_of(&locations[0], "Patient");
    let obs_id = id_of(&locations[1], "Observation");
    assert_eq!(id_of(&locations[2], "Encounter"), "tx-enc");

    assert_eq!(get(&srv.fhir(&format!("/Patient/{patient_id}"))).status, 200);
    let obs = get(&srv.fhir(&format!("/Observation/{obs_id}")));
    assert_eq!(obs.status, 200);
    assert_eq!(obs.json()["subject"]["reference"], format!("Patient/{patient_id}"));
    let enc = get(&srv.fhir("/Encounter/tx-enc"));
    assert_eq!(enc.status, 200);
    assert_eq!(enc.json()["subject"]["reference"], format!("Patient/{patient_id}"));
    srv.assert_alive();
}

/// Two valid entries and one invalid (an unknown resource type).
fn mixed_bundle(kind: &str) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": [
        {"resource": {"resourceType": "Patient", "id": "mixed-p"}, "request": {"method": "PUT", "url": "Patient/mixed-p"}},
        {"resource": {"resourceType": "NoSuchType", "id": "bad"}, "request": {"method": "PUT", "url": "NoSuchType/bad"}},
        {"resource": {"resourceType": "Observation", "id": "mixed-o", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/mixed-p"}},
         "request": {"method": "PUT", "url": "Observation/mixed-o"}}
    ]})
}

#[test]
fn transaction_with_an_invalid_entry_writes_nothing() {
    let mut srv = Server::empty(&[]);
    assert_outcome(&post_json(&srv.fhir(""), &mixed_bundle("transaction")), 400, &["NoSuchType"]);
    assert_outcome(&get(&srv.fhir("/Patient/mixed-p")), 404, &[]);
    assert_outcome(&get(&srv.fhir("/Observation/mixed-o")), 404, &[]);
    srv.assert_alive();
}

#[test]
fn batch_with_an_invalid_entry_writes_the_valid_ones() {
    let mut srv = Server::empty(&[]);
    let r = post_json(&srv.fhir(""), &mixed_bundle("batch"));
    assert_eq!(r.status, 200, "{}", r.text());
    let resp = r.json();
    assert_eq!(resp["type"], "batch-response");
    let status = |i: usize| resp["entry"][i]["response"]["status"].as_str().unwrap_or_default().to_string();
    assert!(status(0).starts_with("201"), "entry 0: {resp}");
    assert!(status(1).starts_with("400"), "entry 1: {resp}");
    assert!(status(2).starts_with("201"), "entry 2: {resp}");
    let outcome = &resp["entry"][1]["response"]["outcome"];
    assert_eq!(outcome["resourceType"], "OperationOutcome", "the bad entry's outcome: {resp}");
    assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap_or_default().contains("NoSuchType"), "{outcome}");
    assert_eq!(get(&srv.fhir("/Patient/mixed-p")).status, 200);
    assert_eq!(get(&srv.fhir("/Observation/mixed-o")).status, 200);
    assert_outcome(&get(&srv.fhir("/NoSuchType/bad")), 404, &[]);
    srv.assert_alive();
}
