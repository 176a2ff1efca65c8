//! `sluice load`: the per-type summary, all-or-nothing loads (a malformed line fails the
//! load with its file and line number and leaves the store as it was), and Synthea-style
//! transaction Bundle files with `urn:uuid` references.

mod common;

use common::*;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Output;

/// Runs `sluice load --data-dir <dir> <paths...>`.
fn load(dir: &Path, paths: &[&Path]) -> Output {
    sluice().arg("load").args(store_args(dir)).args(paths).output().expect("running sluice load")
}

/// The per-type lines of a load summary (`  Patient    100`).
fn summary(stdout: &str) -> BTreeMap<String, u64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("  ") && !l.trim_start().starts_with('('))
        .map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(parts.len(), 2, "summary line {l:?}");
            (parts[0].to_string(), parts[1].parse().unwrap_or_else(|_| panic!("summary line {l:?}")))
        })
        .collect()
}

/// Writes an ndjson file with a good line, a malformed line 2, and a good line 3.
fn write_bad_ndjson(path: &Path, first: &Value) {
    let third = json!({"resourceType": "Patient", "id": "after-the-bad-line"});
    std::fs::write(path, format!("{first}\n{{\"resourceType\": \"Patient\", \"id\": \n{third}\n")).unwrap();
}

fn assert_failed_at_line_2(out: &Output, file: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the load should fail; stderr: {stderr}");
    assert!(stderr.contains(&format!("{file}:2")), "stderr does not name {file} line 2: {stderr}");
}

/// Loading the data set prints the right count per type; a later failed load changes nothing.
#[test]
fn load_summary_matches_the_data_and_a_failed_load_changes_nothing() {
    let dir = empty_dir();
    let out = load(dir.path(), &[Path::new(DATA)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "load failed: {}", String::from_utf8_lossy(&out.stderr));
    let expected = reference().all();
    assert_eq!(summary(&stdout), counts(&expected), "the summary per type:\n{stdout}");
    assert!(stdout.starts_with("loaded 38473 resources"), "the first summary line: {stdout}");

    // An update of an existing patient, then a malformed line: nothing of it may stay.
    let patient_id = reference().patient_ids()[0];
    let mut changed = reference().resource("Patient", patient_id);
    changed["gender"] = json!("unknown");
    let bad = tempfile::tempdir().unwrap();
    let bad_file = bad.path().join("update.ndjson");
    write_bad_ndjson(&bad_file, &changed);
    assert_failed_at_line_2(&load(dir.path(), &[&bad_file]), "update.ndjson");

    let srv = Server::start(dir, &[]);
    let m = export(&srv, &srv.fhir("/$export"));
    assert_eq!(manifest_counts(&m), counts(&expected), "counts after the failed load");
    let patients = export(&srv, &with_query(&srv.fhir("/$export"), &[("_type", "Patient")]));
    check_export(&patients, &reference().types(&["Patient"]));
}

/// A malformed line in the middle of a file fails the whole load (every file of it) with
/// the file and line number; a fresh store stays empty.
#[test]
fn malformed_line_fails_the_load_and_writes_nothing() {
    let input = tempfile::tempdir().unwrap();
    let good = input.path().join("a-good.ndjson");
    std::fs::write(&good, "{\"resourceType\":\"Patient\",\"id\":\"good-1\"}\n").unwrap();
    write_bad_ndjson(&input.path().join("b-bad.ndjson"), &json!({"resourceType": "Patient", "id": "before-bad"}));
    let dir = empty_dir();
    assert_failed_at_line_2(&load(dir.path(), &[input.path()]), "b-bad.ndjson");

    let srv = Server::start(dir, &[]);
    for id in ["good-1", "before-bad", "after-the-bad-line"] {
        assert_outcome(&get(&srv.fhir(&format!("/Patient/{id}"))), 404, &[]);
    }
    let m = export(&srv, &srv.fhir("/$export"));
    assert_eq!(m["output"], json!([]), "the store is empty after the failed load");
}

/// A FHIR transaction Bundle file as Synthea writes them: `urn:uuid` fullUrls and
/// references, entries POSTed. Ids are kept (a resource without one takes its fullUrl's
/// uuid) and references are rewritten to `Type/id`.
#[test]
fn bundle_file_loads_with_references_rewritten() {
    let (p, e, o, c) = (
        "6f1c3c55-8a43-4a4e-9d0e-0000000000a1",
        "6f1c3c55-8a43-4a4e-9d0e-0000000000a2",
        "6f1c3c55-8a43-4a4e-9d0e-0000000000a3",
        "6f1c3c55-8a43-4a4e-9d0e-0000000000a4",
    );
    let urn = |id: &str| format!("urn:uuid:{id}");
    let entry = |id: &str, resource: Value| {
        let t = resource["resourceType"].as_str().unwrap().to_string();
        json!({"fullUrl": urn(id), "resource": resource, "request": {"method": "POST", "url": t}})
    };
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        entry(p, json!({"resourceType": "Patient", "id": p, "gender": "female"})),
        entry(e, json!({"resourceType": "Encounter", "id": e, "status": "finished", "class": {"code": "AMB"},
                        "subject": {"reference": urn(p)}})),
        entry(o, json!({"resourceType": "Observation", "id": o, "status": "final", "code": {"text": "x"},
                        "subject": {"reference": urn(p)}, "encounter": {"reference": urn(e)}})),
        entry(c, json!({"resourceType": "Condition", "subject": {"reference": urn(p)},
                        "encounter": {"reference": urn(e)}})),
    ]});
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("Synthea_Patient.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&bundle).unwrap()).unwrap();
    let dir = empty_dir();
    let out = load(dir.path(), &[&file]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "load failed: {}", String::from_utf8_lossy(&out.stderr));
    let want: BTreeMap<String, u64> =
        ["Condition", "Encounter", "Observation", "Patient"].iter().map(|t| (t.to_string(), 1)).collect();
    assert_eq!(summary(&stdout), want, "{stdout}");

    let srv = Server::start(dir, &[]);
    let obs = get(&srv.fhir(&format!("/Observation/{o}")));
    assert_eq!(obs.status, 200, "{}", obs.text());
    assert_eq!(obs.json()["subject"]["reference"], format!("Patient/{p}"));
    assert_eq!(obs.json()["encounter"]["reference"], format!("Encounter/{e}"));

    let expected: Expected = [
        ("Patient", p, json!({"resourceType": "Patient", "id": p, "gender": "female"})),
        (
            "Encounter",
            e,
            json!({"resourceType": "Encounter", "id": e, "status": "finished", "class": {"code": "AMB"},
                                "subject": {"reference": format!("Patient/{p}")}}),
        ),
        (
            "Observation",
            o,
            json!({"resourceType": "Observation", "id": o, "status": "final", "code": {"text": "x"},
                                  "subject": {"reference": format!("Patient/{p}")},
                                  "encounter": {"reference": format!("Encounter/{e}")}}),
        ),
        (
            "Condition",
            c,
            json!({"resourceType": "Condition", "id": c, "subject": {"reference": format!("Patient/{p}")},
                                "encounter": {"reference": format!("Encounter/{e}")}}),
        ),
    ]
    .into_iter()
    .map(|(t, id, v)| (t.to_string(), [(id.to_string(), Cow::Owned(v.to_string()))].into()))
    .collect();
    let m = export(&srv, &with_query(&srv.fhir("/Patient/$export"), &[("patient", p)]));
    check_export(&m, &expected);
}

/// `sluice load` into the data dir of a running server: either the load refuses (and the
/// store is unchanged), or the server sees the loaded resources; either way the server
/// keeps accepting writes and its exports hold exactly what the store holds.
#[test]
fn load_into_the_data_dir_of_a_running_server() {
    let srv = Server::empty(&[]);
    let patient = |id: &str| json!({"resourceType": "Patient", "id": id});
    assert_eq!(put_json(&srv.fhir("/Patient/before"), &patient("before")).status, 201);
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("more.ndjson");
    std::fs::write(&file, format!("{}\n{}\n", patient("loaded-1"), patient("loaded-2"))).unwrap();

    let out = load(&srv.dir, &[&file]);
    let mut ids = vec!["before", "after"];
    if out.status.success() {
        ids.extend(["loaded-1", "loaded-2"]);
    } else {
        assert!(!out.stderr.is_empty(), "a refused load says why");
    }
    let r = put_json(&srv.fhir("/Patient/after"), &patient("after"));
    assert_eq!(r.status, 201, "a write after the load: {}", r.text());
    for id in &ids {
        assert_eq!(get(&srv.fhir(&format!("/Patient/{id}"))).status, 200, "GET Patient/{id}");
    }
    let m = export(&srv, &with_query(&srv.fhir("/$export"), &[("_type", "Patient")]));
    let expected: Expected =
        [("Patient".to_string(), ids.iter().map(|id| (id.to_string(), Cow::Owned(patient(id).to_string()))).collect())]
            .into();
    check_export(&m, &expected);
}

/// `--copies 3` loads every resource three times with consistent references: copy k's ids
/// and references carry the prefix `c<k>-`, so each copy's Observations point at that copy's
/// Patients.
#[test]
fn copies_multiply_the_data_with_consistent_references() {
    let dir = empty_dir();
    let out = sluice().arg("load").args(store_args(dir.path())).args(["--copies", "3", DATA]).output().unwrap();
    assert!(out.status.success(), "load failed: {}", String::from_utf8_lossy(&out.stderr));
    let expected = counts(&reference().all());
    let tripled: BTreeMap<String, u64> = expected.iter().map(|(t, n)| (t.clone(), n * 3)).collect();
    assert_eq!(summary(&String::from_utf8_lossy(&out.stdout)), tripled);

    let server = Server::start(dir, &[]);
    let manifest = export(&server, &server.fhir("/$export?_type=Patient,Observation"));
    assert_eq!(manifest_counts(&manifest)["Patient"], 300);
    assert_eq!(manifest_counts(&manifest)["Observation"], expected["Observation"] * 3);
    let files = download_all(&manifest);
    let parsed = |t: &str| -> Vec<Value> { files[t].iter().map(|l| serde_json::from_str(l).unwrap()).collect() };
    let patients: BTreeSet<String> = parsed("Patient").iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    for original in reference().patient_ids() {
        for id in [original.to_string(), format!("c1-{original}"), format!("c2-{original}")] {
            assert!(patients.contains(&id), "Patient/{id} is missing");
        }
    }
    for obs in &parsed("Observation") {
        let id = obs["id"].as_str().unwrap();
        let subject = obs["subject"]["reference"].as_str().unwrap().strip_prefix("Patient/").unwrap();
        assert!(patients.contains(subject), "Observation/{id} points at a missing Patient/{subject}");
        let prefix = |s: &str| s.strip_prefix("c1-").map(|_| 1).or(s.strip_prefix("c2-").map(|_| 2)).unwrap_or(0);
        assert_eq!(prefix(id), prefix(subject), "Observation/{id} points into another copy: {subject}");
    }
}
