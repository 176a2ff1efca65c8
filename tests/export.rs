//! Bulk export end to end: the three kick-off levels, GET and POST, the kick-off
//! parameters (`_type`, `_outputFormat`, `patient`, `_since`, `_elements`), group membership
//! rules, signed download links and the CapabilityStatement. Every exported line is checked
//! against the data set read from its files.

mod common;

use common::*;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

/// A system-level export to ndjson: the kick-off, status and manifest as the IG and the
/// real clients need them, and exactly the data set in the files.
#[test]
fn system_export_ndjson_is_the_whole_data_set() {
    let srv = Server::loaded(&[]);
    let url = srv.fhir("/$export");
    let status = kickoff(&srv, &url);
    let m = complete_manifest(&poll_until_done(&status), &url);
    assert_eq!(m["error"], json!([]), "error: [] is present and empty");
    let expected = reference().all();
    assert_eq!(manifest_counts(&m), counts(&expected), "counts per type (all 18 types)");
    assert_eq!(output_types(&m).len(), 18);
    for e in m["output"].as_array().unwrap() {
        let path = e["url"].as_str().unwrap().split('?').next().unwrap().to_string();
        assert!(path.ends_with(".ndjson"), "ndjson output, got {path}");
    }
    check_export(&m, &expected);
}

/// The same export as gzip (`application/fhir+ndjson+gzip`): the same content.
#[test]
fn system_export_gzip_is_the_whole_data_set() {
    let srv = Server::loaded(&[]);
    let url = with_query(&srv.fhir("/$export"), &[("_outputFormat", "application/fhir+ndjson+gzip")]);
    let m = export(&srv, &url);
    for e in m["output"].as_array().unwrap() {
        let path = e["url"].as_str().unwrap().split('?').next().unwrap().to_string();
        assert!(path.ends_with(".ndjson.gz"), "gzip output is named .ndjson.gz (D10), got {path}");
    }
    check_export(&m, &reference().all());
}

/// `_outputFormat=ndjson.gz` is another spelling of gzip output.
#[test]
fn system_export_gzip_short_spelling() {
    let srv = Server::loaded(&[]);
    let url = with_query(&srv.fhir("/$export"), &[("_outputFormat", "ndjson.gz")]);
    let m = export(&srv, &url);
    assert!(m["output"].as_array().unwrap().iter().all(|e| e["url"].as_str().unwrap().contains(".ndjson.gz?")));
    check_export(&m, &reference().all());
}

/// A patient-level export is exactly the union of every patient's compartment: no Group
/// (D9), no Device, Organization or Practitioner (not in the R4 Patient compartment).
#[test]
fn patient_export_is_every_patient_compartment() {
    let srv = Server::loaded(&[]);
    let m = export(&srv, &srv.fhir("/Patient/$export"));
    let types = output_types(&m);
    for t in OUTSIDE_COMPARTMENT {
        assert!(!types.contains(t), "a patient export must not hold {t}");
    }
    check_export(&m, &reference().all_compartments());
}

/// The data set's Group has every patient as a member: its export equals the patient export.
#[test]
fn group_export_of_the_data_group_equals_patient_export() {
    let srv = Server::loaded(&[]);
    let m = export(&srv, &srv.fhir(&format!("/Group/{GROUP_ID}/$export")));
    assert!(!output_types(&m).contains("Group"), "Group is not exported at group level (D9)");
    check_export(&m, &reference().all_compartments());
}

/// Group membership at the export's time (D6): an inactive member and a member whose
/// period has ended do not count.
#[test]
fn group_export_skips_inactive_and_expired_members() {
    let srv = Server::loaded(&[]);
    let ids: Vec<&str> = reference().patient_ids().into_iter().skip(20).take(10).collect();
    let mut members: Vec<Value> =
        ids.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    members[8]["inactive"] = json!(true);
    members[9]["period"] = json!({"start": "2000-01-01", "end": "2001-01-01T00:00:00Z"});
    let group = json!({
        "resourceType": "Group", "id": "ten-patients", "type": "person", "actual": true, "member": members,
    });
    let r = put_json(&srv.fhir("/Group/ten-patients"), &group);
    assert_eq!(r.status, 201, "PUT Group: {}", r.text());
    let m = export(&srv, &srv.fhir("/Group/ten-patients/$export"));
    check_export(&m, &reference().compartments_of(&ids[..8]));
}

/// With a file size limit, a type is split into `<Type>.ndjson`, `<Type>-2.ndjson`, ...
/// (D15); together the files hold exactly the type's resources.
#[test]
fn split_files_hold_every_resource_once() {
    let srv = Server::loaded(&["--max-file-resources", "5000"]);
    let url = with_query(&srv.fhir("/$export"), &[("_type", "Observation,Patient"), ("_outputFormat", "ndjson+gzip")]);
    let m = export(&srv, &url);
    let names: Vec<String> = m["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["url"].as_str().unwrap().split('?').next().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    let want =
        ["Observation", "Observation-2", "Observation-3", "Observation-4", "Patient"].map(|n| format!("{n}.ndjson.gz"));
    assert_eq!(names, want, "file names in manifest order");
    let per_file: Vec<u64> = m["output"].as_array().unwrap().iter().map(|e| e["count"].as_u64().unwrap()).collect();
    assert_eq!(per_file, [5000, 5000, 5000, 1315, 100], "resources per file");
    check_export(&m, &reference().types(&["Observation", "Patient"]));
}

/// `_type` as a comma-separated list and as a repeated parameter select the same types.
#[test]
fn type_as_list_and_as_repeated_parameter() {
    let srv = Server::loaded(&[]);
    let expected = reference().types(&["AllergyIntolerance", "Device", "Patient"]);
    let list = with_query(&srv.fhir("/$export"), &[("_type", "Patient,AllergyIntolerance,Device")]);
    check_export(&export(&srv, &list), &expected);
    let repeated = with_query(
        &srv.fhir("/$export"),
        &[("_type", "Patient"), ("_type", "AllergyIntolerance"), ("_type", "Device")],
    );
    check_export(&export(&srv, &repeated), &expected);
}

/// A valid type without data is accepted and gets no file.
#[test]
fn type_without_data_gets_no_file() {
    let srv = Server::loaded(&[]);
    let only = export(&srv, &with_query(&srv.fhir("/$export"), &[("_type", "DocumentReference")]));
    assert_eq!(only["output"], json!([]), "no file for a type without data");
    assert_eq!(only["error"], json!([]));
    let mixed =
        export(&srv, &with_query(&srv.fhir("/Patient/$export"), &[("_type", "DocumentReference,Immunization")]));
    check_export(&mixed, &reference().types(&["Immunization"]));
}

/// `patient=<id>,<id>` on a Patient-level GET exports exactly those compartments (D3).
#[test]
fn patient_parameter_on_patient_level_get() {
    let srv = Server::loaded(&[]);
    let ids = reference().patient_ids();
    let two = [ids[3], ids[42]];
    let url = with_query(&srv.fhir("/Patient/$export"), &[("patient", &format!("{},{}", two[0], two[1]))]);
    check_export(&export(&srv, &url), &reference().compartments_of(&two));
}

/// POST at group level with `patient` valueReferences exports those members' compartments.
#[test]
fn patient_references_in_a_group_level_post() {
    let srv = Server::loaded(&[]);
    let ids = reference().patient_ids();
    let two = [ids[7], ids[77]];
    let body = parameters(&[
        ("patient", "valueReference", json!({"reference": format!("Patient/{}", two[0])})),
        ("patient", "valueReference", json!({"reference": format!("Patient/{}", two[1])})),
    ]);
    let url = srv.fhir(&format!("/Group/{GROUP_ID}/$export"));
    let status = kickoff_post(&srv, &url, &body);
    let m = complete_manifest(&poll_until_done(&status), &url);
    check_export(&m, &reference().compartments_of(&two));
}

/// POST kick-off at system level (D4) with `_type` and `_outputFormat` in a Parameters body.
#[test]
fn system_level_post_with_parameters() {
    let srv = Server::loaded(&[]);
    let body = parameters(&[
        ("_type", "valueString", json!("Patient,CarePlan")),
        ("_outputFormat", "valueString", json!("application/fhir+ndjson+gzip")),
    ]);
    let url = srv.fhir("/$export");
    let status = kickoff_post(&srv, &url, &body);
    let m = complete_manifest(&poll_until_done(&status), &url);
    assert!(m["output"].as_array().unwrap().iter().all(|e| e["url"].as_str().unwrap().contains(".ndjson.gz?")));
    check_export(&m, &reference().types(&["CarePlan", "Patient"]));
}

/// `_since=<transactionTime of an earlier export>` returns exactly what was written after
/// it; chained exports miss nothing and repeat nothing.
#[test]
fn since_a_transaction_time_exports_exactly_the_changes() {
    let srv = Server::loaded(&[]);
    let base = srv.fhir("/$export");
    let first = export(&srv, &with_query(&base, &[("_type", "Patient")]));
    let t1 = first["transactionTime"].as_str().unwrap().to_string();

    let reference = reference();
    let patient_id = reference.patient_ids()[5];
    let obs_id = reference.resources["Observation"].keys().nth(100).unwrap().clone();
    let mut patient = reference.resource("Patient", patient_id);
    patient["active"] = json!(false);
    let mut obs = reference.resource("Observation", &obs_id);
    obs["status"] = json!("amended");
    let new_obs = json!({
        "resourceType": "Observation", "id": "since-new", "status": "final",
        "code": {"text": "written after the first export"},
        "subject": {"reference": format!("Patient/{patient_id}")},
    });
    assert_eq!(put_json(&srv.fhir(&format!("/Patient/{patient_id}")), &patient).status, 200);
    assert_eq!(put_json(&srv.fhir(&format!("/Observation/{obs_id}")), &obs).status, 200);
    assert_eq!(put_json(&srv.fhir("/Observation/since-new"), &new_obs).status, 201);

    let second = export(&srv, &with_query(&base, &[("_since", &t1)]));
    let t2 = second["transactionTime"].as_str().unwrap().to_string();
    assert!(t2 > t1, "transactionTime moves forward: {t1} then {t2}");
    let mut expected = Expected::new();
    expected.entry("Patient".into()).or_default().insert(patient_id.into(), Cow::Owned(patient.to_string()));
    let observations = expected.entry("Observation".into()).or_default();
    observations.insert(obs_id.clone(), Cow::Owned(obs.to_string()));
    observations.insert("since-new".into(), Cow::Owned(new_obs.to_string()));
    let files = check_export(&second, &expected);
    let versions: BTreeSet<(String, String)> = files
        .values()
        .flatten()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_string(), v["meta"]["versionId"].as_str().unwrap().to_string()))
        .collect();
    let want: BTreeSet<(String, String)> =
        [(patient_id, "2"), (obs_id.as_str(), "2"), ("since-new", "1")].map(|(a, b)| (a.into(), b.into())).into();
    assert_eq!(versions, want, "(id, versionId) of the changed resources");

    // Nothing changed since the second export: the next one in the chain is empty...
    let third = export(&srv, &with_query(&base, &[("_since", &t2)]));
    assert_eq!(third["output"], json!([]), "a chained _since export repeats nothing");
    // ...until something is written.
    let condition_id = reference.resources["Condition"].keys().next().unwrap().clone();
    let mut condition = reference.resource("Condition", &condition_id);
    condition["clinicalStatus"]["text"] = json!("checked again");
    assert_eq!(put_json(&srv.fhir(&format!("/Condition/{condition_id}")), &condition).status, 200);
    let fourth = export(&srv, &with_query(&base, &[("_since", &t2)]));
    let mut expected = Expected::new();
    expected.entry("Condition".into()).or_default().insert(condition_id, Cow::Owned(condition.to_string()));
    check_export(&fourth, &expected);
}

/// Patient exports follow writes: an Observation moved to another patient leaves the old
/// compartment and joins the new one, a deleted one is gone, a created one is there.
#[test]
fn patient_exports_follow_updates_and_deletes() {
    let srv = Server::loaded(&[]);
    let reference = reference();
    let ids = reference.patient_ids();
    let (a, b) = (ids[10], ids[11]);
    let observations_of_a: Vec<&String> = reference.compartments[a]
        .iter()
        .filter(|(t, _)| t == "Observation")
        .map(|(_, id)| id)
        .filter(|id| compartment_patients(&reference.resource("Observation", id)).len() == 1)
        .take(2)
        .collect();
    let (moved_id, deleted_id) = (observations_of_a[0].clone(), observations_of_a[1].clone());
    let mut moved = reference.resource("Observation", &moved_id);
    moved["subject"]["reference"] = json!(format!("Patient/{b}"));
    assert_eq!(put_json(&srv.fhir(&format!("/Observation/{moved_id}")), &moved).status, 200);
    assert_eq!(delete(&srv.fhir(&format!("/Observation/{deleted_id}"))).status, 200);
    let created = json!({
        "resourceType": "Observation", "id": "created-for-a", "status": "final", "code": {"text": "new"},
        "subject": {"reference": format!("Patient/{a}")},
    });
    assert_eq!(put_json(&srv.fhir("/Observation/created-for-a"), &created).status, 201);

    let mut expected_a = reference.compartments_of(&[a]);
    let obs_a = expected_a.get_mut("Observation").unwrap();
    obs_a.remove(&moved_id);
    obs_a.remove(&deleted_id);
    obs_a.insert("created-for-a".into(), Cow::Owned(created.to_string()));
    let url_a = with_query(&srv.fhir("/Patient/$export"), &[("patient", a)]);
    check_export(&export(&srv, &url_a), &expected_a);

    let mut expected_b = reference.compartments_of(&[b]);
    expected_b.get_mut("Observation").unwrap().insert(moved_id.clone(), Cow::Owned(moved.to_string()));
    let url_b = with_query(&srv.fhir("/Patient/$export"), &[("patient", b)]);
    check_export(&export(&srv, &url_b), &expected_b);

    let mut expected_all = reference.types(&["Observation"]);
    let obs = expected_all.get_mut("Observation").unwrap();
    obs.remove(&deleted_id);
    obs.insert(moved_id, Cow::Owned(moved.to_string()));
    obs.insert("created-for-a".into(), Cow::Owned(created.to_string()));
    let url_all = with_query(&srv.fhir("/$export"), &[("_type", "Observation")]);
    check_export(&export(&srv, &url_all), &expected_all);
}

/// `_elements=id,status` keeps `resourceType`, `id`, `meta`, `status` and the type's
/// mandatory elements (D21: R4 minimum cardinality 1, e.g. Observation.code and
/// Condition.subject), each exactly as stored and in stored order, and tags every resource
/// SUBSETTED.
#[test]
fn elements_subsets_resources() {
    // The R4 StructureDefinitions' root elements with min 1, for these types.
    let mandatory =
        BTreeMap::from([("Observation", vec!["status", "code"]), ("Patient", vec![]), ("Condition", vec!["subject"])]);
    let srv = Server::loaded(&[]);
    let url =
        with_query(&srv.fhir("/$export"), &[("_type", "Observation,Patient,Condition"), ("_elements", "id,status")]);
    let m = export(&srv, &url);
    let files = download_all(&m);
    let reference = reference();
    for (t, required) in mandatory {
        let lines = &files[t];
        assert_eq!(lines.len(), reference.resources[t].len(), "{t} count");
        let mut seen = BTreeSet::new();
        for line in lines {
            let v: Value = serde_json::from_str(line).unwrap();
            let id = v["id"].as_str().unwrap();
            assert!(seen.insert(id.to_string()), "{t}/{id} twice");
            let tags = v["meta"]["tag"].as_array().unwrap_or_else(|| panic!("{t}/{id} has no meta.tag: {v}"));
            assert!(
                tags.iter().any(|tag| tag["code"] == "SUBSETTED"
                    && tag["system"] == "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"),
                "{t}/{id} is not tagged SUBSETTED: {v}"
            );
            assert!(v["meta"]["versionId"].is_string() && v["meta"]["lastUpdated"].is_string(), "{t}/{id} meta");

            // Every other member is the stored one, exactly, in stored order.
            let full = exact::Exact::parse(&reference.resources[t][id], "the data set's line");
            let exact::Exact::Object(full_members) = &full else { panic!() };
            let kept: Vec<(String, exact::Exact)> = full_members
                .iter()
                .filter(|(k, _)| {
                    ["resourceType", "id", "status"].contains(&k.as_str()) || required.contains(&k.as_str())
                })
                .cloned()
                .collect();
            let mut got = exact::Exact::parse(line, "an exported line");
            got.remove("meta");
            assert_eq!(got, exact::Exact::Object(kept), "{t}/{id}");
            for r in &required {
                assert!(full.get(r).is_none() || got.get(r).is_some(), "{t}/{id} lost mandatory {r}");
            }
        }
    }
}

/// A download link whose signature was altered (or is missing) is refused with 403.
#[test]
fn altered_signature_is_refused() {
    let srv = Server::loaded(&[]);
    let m = export(&srv, &with_query(&srv.fhir("/$export"), &[("_type", "Patient")]));
    let url = m["output"][0]["url"].as_str().unwrap().to_string();
    assert_eq!(get(&url).status, 200, "the link as given works");
    let (start, sig) = url.rsplit_once("sig=").expect("a sig parameter");
    let last = sig.chars().last().unwrap();
    let altered = format!("{start}sig={}{}", &sig[..sig.len() - 1], if last == '0' { '1' } else { '0' });
    assert_outcome(&get(&altered), 403, &[]);
    let expires: i64 = url.split("expires=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
    let extended = url.replace(&format!("expires={expires}"), &format!("expires={}", expires + 86400));
    assert_outcome(&get(&extended), 403, &[]);
    let unsigned = url.split('?').next().unwrap();
    assert_outcome(&get(unsigned), 403, &[]);
    let other_file = url.replace("/Patient.ndjson?", "/Observation.ndjson?");
    assert_outcome(&get(&other_file), 403, &[]);
}

/// The CapabilityStatement names Sluice, declares the three export operations and lists
/// every R4 resource type, also those without data (D20); `Group` is marked not available
/// to patient and group exports (D9, IG 3.0's operation-not-supported extension), other
/// types are not (outside the compartment they are exported when asked for, D8).
#[test]
fn capability_statement() {
    let srv = Server::empty(&[]);
    let r = get(&srv.fhir("/metadata"));
    assert_eq!(r.status, 200);
    let cs = r.json();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["software"]["name"], "Sluice");
    assert!(cs["software"]["version"].as_str().is_some_and(|v| !v.is_empty()), "software.version");
    let rest = &cs["rest"][0];
    let op_defs = |ops: &Value| -> BTreeSet<String> {
        ops.as_array().into_iter().flatten().filter_map(|o| o["definition"].as_str().map(String::from)).collect()
    };
    let bulk = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/";
    assert!(op_defs(&rest["operation"]).contains(&format!("{bulk}export")), "system $export: {rest}");
    let resources = rest["resource"].as_array().expect("rest[0].resource");
    let by_type = |t: &str| resources.iter().find(|r| r["type"] == t).unwrap_or_else(|| panic!("no {t} in {rest}"));
    assert!(op_defs(&by_type("Patient")["operation"]).contains(&format!("{bulk}patient-export")));
    assert!(op_defs(&by_type("Group")["operation"]).contains(&format!("{bulk}group-export")));
    let listed: BTreeSet<&str> = resources.iter().filter_map(|r| r["type"].as_str()).collect();
    assert_eq!(listed.len(), 146, "every concrete R4 resource type, in an empty store: {listed:?}");
    for t in DATA_COUNTS.map(|(t, _)| t).into_iter().chain(["DocumentReference", "Specimen", "Binary", "Provenance"]) {
        assert!(listed.contains(t), "rest[0].resource does not list {t}");
    }
    let not_supported = |t: &str| -> BTreeSet<String> {
        by_type(t)["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["url"] == "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/operation-not-supported")
            .map(|e| e["valueCanonical"].as_str().unwrap().to_string())
            .collect()
    };
    let patient_and_group = BTreeSet::from([format!("{bulk}patient-export"), format!("{bulk}group-export")]);
    assert_eq!(not_supported("Group"), patient_and_group, "Group is never exported at patient or group level");
    for t in ["Patient", "Observation", "DocumentReference", "Provenance", "Organization", "Device", "Binary"] {
        assert!(not_supported(t).is_empty(), "{t} can be exported at every level");
    }
}

/// Every manifest entry carries the file's size and SHA-256, which match the bytes served;
/// the export folder ends with `manifest.json` (relative names) and an empty `_SUCCESS`.
#[test]
fn files_have_sizes_and_checksums_and_the_folder_is_sealed() {
    use sha2::{Digest, Sha256};
    let srv = Server::loaded(&[]);
    let url = with_query(&srv.fhir("/$export"), &[("_outputFormat", "ndjson.gz"), ("_type", "Patient,Condition")]);
    let status = kickoff(&srv, &url);
    let m = complete_manifest(&poll_until_done(&status), &url);
    let entries = m["output"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for e in entries {
        let served = get(e["url"].as_str().unwrap());
        assert_eq!(served.status, 200);
        assert_eq!(e["extension"]["size"].as_u64(), Some(served.body.len() as u64), "size of {}", e["type"]);
        let sha = hex::encode(Sha256::digest(&served.body));
        assert_eq!(e["extension"]["sha256"].as_str(), Some(sha.as_str()), "checksum of {}", e["type"]);
    }

    let folder = srv.export_folder(&status).expect("the export folder");
    assert_eq!(std::fs::read(folder.join("_SUCCESS")).expect("_SUCCESS").len(), 0);
    let local: Value = serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(local["transactionTime"], m["transactionTime"]);
    assert_eq!(local["request"], m["request"]);
    for (l, e) in local["output"].as_array().unwrap().iter().zip(entries) {
        let name = l["url"].as_str().unwrap();
        assert!(folder.join(name).is_file(), "manifest.json names {name}, which is in the folder");
        assert!(e["url"].as_str().unwrap().split('?').next().unwrap().ends_with(&format!("/{name}")));
        assert_eq!((&l["type"], &l["count"], &l["extension"]), (&e["type"], &e["count"], &e["extension"]));
    }
}

/// With `_since`, resources deleted since are listed in `deleted` (Bundle ndjson with one
/// DELETE entry each, IG format) and never in `output`; patient and group exports list the
/// deletions of their own patients only. Without `_since` there is no `deleted` array.
#[test]
fn since_lists_deletions_in_the_deleted_array() {
    let srv = Server::loaded(&[]);
    let first = export(&srv, &srv.fhir("/$export?_type=Patient"));
    assert!(first.get("deleted").is_none(), "no deleted array without _since");
    let t = first["transactionTime"].as_str().unwrap().to_string();

    // Delete one Observation of a patient (its only compartment).
    let reference = reference();
    let obs_id = reference.all()["Observation"]
        .keys()
        .find(|id| compartment_patients(&reference.resource("Observation", id)).len() == 1)
        .unwrap()
        .clone();
    let owner = compartment_patients(&reference.resource("Observation", &obs_id)).into_iter().next().unwrap();
    let other = reference.patient_ids().into_iter().find(|p| *p != owner).unwrap().to_string();
    assert_eq!(delete(&srv.fhir(&format!("/Observation/{obs_id}"))).status, 200);

    let deleted_of = |m: &Value| -> Vec<Value> {
        let files = download_entries(&m["deleted"]);
        files.values().flatten().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let expected_line = json!({"resourceType": "Bundle", "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": format!("Observation/{obs_id}")}}]});

    let url = with_query(&srv.fhir("/$export"), &[("_since", &t)]);
    let m = export(&srv, &url);
    assert_eq!(manifest_counts(&m), Default::default(), "nothing changed but the deletion: {m}");
    assert_eq!(m["deleted"][0]["type"], "Bundle");
    assert_eq!(deleted_of(&m), vec![expected_line.clone()]);

    let url = with_query(&srv.fhir("/Patient/$export"), &[("_since", &t), ("patient", &owner)]);
    assert_eq!(deleted_of(&export(&srv, &url)), vec![expected_line], "the owner's export lists it");
    let url = with_query(&srv.fhir("/Patient/$export"), &[("_since", &t), ("patient", &other)]);
    let m = export(&srv, &url);
    assert_eq!(m["deleted"], json!([]), "another patient's export does not");
}

/// Adds (or replaces) resources in an expectation.
fn expect(expected: &mut Expected, resources: &[&Value]) {
    for r in resources {
        let (t, id) = (r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
        expected.entry(t.into()).or_default().insert(id.into(), Cow::Owned(r.to_string()));
    }
}

/// The lines of a manifest's `deleted` files.
fn deleted_lines(m: &Value) -> Vec<Value> {
    download_entries(&m["deleted"]).values().flatten().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The IG's line for a deleted resource.
fn deletion(t: &str, id: &str) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": format!("{t}/{id}")}}]})
}

/// D7: a group export with `_since` compares the members with the Group as it was at
/// `_since`. Members who joined after it (not listed then, or listed but inactive then) get
/// their complete data; the others only their changes. A resource in the compartments of
/// both a late joiner and an earlier member is exported once, changed or not. Deletions are
/// listed for the earlier members only (the client never had the late joiners' data). The
/// next export in the chain treats the late joiners like everyone else.
#[test]
fn group_since_exports_the_complete_data_of_members_who_joined_after_it() {
    let srv = Server::loaded(&[]);
    let reference = reference();
    let ids = reference.patient_ids();
    // x: not a member at `_since`; y: a member, but inactive then; o: a member all along.
    let (x, y, o) = (ids[30], ids[31], ids[32]);
    let original = reference.resource("Group", GROUP_ID);
    let mut then = original.clone();
    let members = then["member"].as_array_mut().unwrap();
    members.retain(|m| m["entity"]["reference"] != format!("Patient/{x}"));
    let y_entry = members.iter_mut().find(|m| m["entity"]["reference"] == format!("Patient/{y}")).unwrap();
    y_entry["inactive"] = json!(true);
    assert_eq!(put_json(&srv.fhir(&format!("/Group/{GROUP_ID}")), &then).status, 200);
    // Two Observations in the compartments of both x and o, written before `_since`.
    let shared = |id: &str, status: &str| {
        json!({"resourceType": "Observation", "id": id, "status": status, "code": {"text": "shared"},
            "subject": {"reference": format!("Patient/{x}")}, "performer": [{"reference": format!("Patient/{o}")}]})
    };
    let (unchanged, before) = (shared("shared-unchanged", "final"), shared("shared-changed", "preliminary"));
    for r in [&unchanged, &before] {
        assert_eq!(put_json(&srv.fhir(&format!("/Observation/{}", r["id"].as_str().unwrap())), r).status, 201);
    }

    let group_url = srv.fhir(&format!("/Group/{GROUP_ID}/$export"));
    let first = export(&srv, &group_url);
    let t1 = first["transactionTime"].as_str().unwrap().to_string();
    let earlier: Vec<&str> = ids.iter().copied().filter(|p| *p != x && *p != y).collect();
    let mut expected = reference.compartments_of(&earlier);
    expect(&mut expected, &[&unchanged, &before]);
    check_export(&first, &expected);

    // x joins, y becomes active; o and x change and lose a resource each; a new shared one.
    assert_eq!(put_json(&srv.fhir(&format!("/Group/{GROUP_ID}")), &original).status, 200);
    let (o_obs, x_obs) = (own_resources(o, "Observation", 2), own_resources(x, "Observation", 2));
    let mut o_changed = reference.resource("Observation", &o_obs[0]);
    o_changed["status"] = json!("amended");
    let mut x_changed = reference.resource("Observation", &x_obs[0]);
    x_changed["status"] = json!("amended");
    let after = shared("shared-changed", "final");
    let created = shared("shared-new", "final");
    for r in [&o_changed, &x_changed, &after, &created] {
        let r2 = put_json(&srv.fhir(&format!("/Observation/{}", r["id"].as_str().unwrap())), r);
        assert!(r2.status == 200 || r2.status == 201, "PUT: {}", r2.text());
    }
    for id in [&o_obs[1], &x_obs[1]] {
        assert_eq!(delete(&srv.fhir(&format!("/Observation/{id}"))).status, 200);
    }

    let second = export(&srv, &with_query(&group_url, &[("_since", &t1)]));
    let t2 = second["transactionTime"].as_str().unwrap().to_string();
    let mut expected = reference.compartments_of(&[x, y]);
    expected.get_mut("Observation").unwrap().remove(&x_obs[1]);
    expect(&mut expected, &[&o_changed, &x_changed, &unchanged, &after, &created]);
    assert_eq!(manifest_counts(&second), counts(&expected), "counts per type");
    check_export(&second, &expected);
    assert_eq!(deleted_lines(&second), vec![deletion("Observation", &o_obs[1])], "only o's deletion is listed");

    // Chained: since the second export, the late joiners are members like the others.
    let third = export(&srv, &with_query(&group_url, &[("_since", &t2)]));
    assert_eq!(third["output"], json!([]), "nothing changed since the second export: {third}");
    assert_eq!(third["deleted"], json!([]));
    let mut y_patient = reference.resource("Patient", y);
    y_patient["active"] = json!(false);
    assert_eq!(put_json(&srv.fhir(&format!("/Patient/{y}")), &y_patient).status, 200);
    let fourth = export(&srv, &with_query(&group_url, &[("_since", &t2)]));
    let mut expected = Expected::new();
    expect(&mut expected, &[&y_patient]);
    check_export(&fourth, &expected);
}

/// D7 when the Group did not exist at `_since`: every member joined after it, so each gets
/// its complete data, still limited by `_type` and bounded by `_until`.
#[test]
fn group_created_after_since_exports_its_members_completely() {
    let srv = Server::loaded(&[]);
    let first = export(&srv, &with_query(&srv.fhir("/$export"), &[("_type", "Patient")]));
    let t1 = first["transactionTime"].as_str().unwrap().to_string();
    let reference = reference();
    let with_conditions: Vec<&str> = reference
        .patient_ids()
        .into_iter()
        .filter(|p| reference.compartments[*p].iter().any(|(t, _)| t == "Condition"))
        .collect();
    let two = [with_conditions[10], with_conditions[20]];
    let members: Vec<Value> = two.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    let group =
        json!({"resourceType": "Group", "id": "new-group", "type": "person", "actual": true, "member": members});
    assert_eq!(put_json(&srv.fhir("/Group/new-group"), &group).status, 201);
    let condition_id = own_resources(two[0], "Condition", 1).remove(0);
    let mut condition = reference.resource("Condition", &condition_id);
    condition["clinicalStatus"]["text"] = json!("checked again");
    assert_eq!(put_json(&srv.fhir(&format!("/Condition/{condition_id}")), &condition).status, 200);

    let url = srv.fhir("/Group/new-group/$export");
    let m = export(&srv, &with_query(&url, &[("_since", &t1)]));
    let mut expected = reference.compartments_of(&two);
    expect(&mut expected, &[&condition]);
    check_export(&m, &expected);
    assert_eq!(m["deleted"], json!([]));

    let typed = export(&srv, &with_query(&url, &[("_since", &t1), ("_type", "Patient,Condition")]));
    expected.retain(|t, _| t == "Patient" || t == "Condition");
    check_export(&typed, &expected);

    // `_until` = `_since`: the members' data as it was then; the Condition changed after.
    let until = export(&srv, &with_query(&url, &[("_since", &t1), ("_until", &t1), ("_type", "Patient,Condition")]));
    expected.get_mut("Condition").unwrap().remove(&condition_id);
    check_export(&until, &expected);
}

/// The engine in this process over a copy of the loaded data set (SQLite, or PostgreSQL
/// with `SLUICE_TEST_DATABASE_URL`), writing to memory: for engine settings `serve` has no
/// flag for.
struct InProcess {
    engine: sluice_engine::Engine,
    storage: sluice_storage::MemoryStorage,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl InProcess {
    fn new(config: sluice_engine::EngineConfig) -> InProcess {
        let dir = loaded_dir();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let store: std::sync::Arc<dyn sluice_engine::ExportStore> =
            match std::fs::read_to_string(dir.path().join("database-url")) {
                Ok(url) => std::sync::Arc::new(
                    runtime
                        .block_on(sluice_store_postgres::PgStore::connect(url.trim(), Default::default()))
                        .expect("connecting to the scratch database"),
                ),
                Err(_) => std::sync::Arc::new(
                    sluice_store_sqlite::SqliteStore::open(dir.path().join("sluice.db")).expect("opening the store"),
                ),
            };
        let storage = sluice_storage::MemoryStorage::new();
        let fixed = sluice_storage::FixedStorage(std::sync::Arc::new(storage.clone()));
        let engine = sluice_engine::Engine::new(store, std::sync::Arc::new(fixed), config);
        InProcess { engine, storage, runtime, dir }
    }

    /// Runs a GET kick-off's export to the end; the job as it finished.
    fn export(&self, level: sluice_planner::Level, query: &[(&str, &str)]) -> sluice_jobs::JobRecord {
        let q: Vec<(String, String)> = query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let plan = sluice_planner::plan(&sluice_planner::KickoffRequest::get(level, &q)).expect("a valid kick-off");
        self.runtime.block_on(async {
            let job = self
                .engine
                .kickoff(plan, "http://test/fhir/$export".into(), sluice_storage::StorageTarget::Default)
                .await
                .unwrap();
            self.engine.wait(&job.id).await;
            let job = self.engine.store().get(&job.id).await.unwrap().unwrap();
            assert_eq!(job.status, sluice_jobs::JobStatus::Completed, "{:?}", job.outcome);
            job
        })
    }

    /// A job's output files, read from memory: per type, the lines; and the file names
    /// with their counts, in manifest order.
    fn files(&self, job: &sluice_jobs::JobRecord) -> (Files, Vec<(String, u64)>) {
        let mut files = Files::new();
        let mut names = Vec::new();
        for f in &job.output {
            let bytes = self.storage.get(&f.key).expect("a listed file exists").bytes;
            let mut text = String::new();
            flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_string(&mut text).expect("gzip");
            let lines: Vec<String> = text.lines().map(String::from).collect();
            assert_eq!(lines.len() as u64, f.count, "count of {}", f.key);
            files.entry(f.resource_type.clone()).or_default().extend(lines);
            names.push((f.key.rsplit('/').next().unwrap().to_string(), f.count));
        }
        (files, names)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        drop_store(self.dir.path());
    }
}

/// A large type (here Observation, 42% of the data set, with `range_split_min` lowered to
/// 1000 on 2 parts) is read as two id ranges at once, on both stores, at every level: the
/// export is exactly the data set, the type's files are named `Observation.ndjson.gz`,
/// `Observation-2.ndjson.gz`, ... (D15) from one counter, listed in natural order, and
/// file splitting by count still applies within each range.
#[test]
fn a_large_type_read_in_id_ranges_is_exported_whole() {
    let config = sluice_engine::EngineConfig {
        parallelism: 2,
        range_split_min: 1000,
        split: sluice_ndjson::SplitLimits { max_resources: 5000, max_bytes: 0 },
        ..Default::default()
    };
    let run = InProcess::new(config);
    let gz = [("_outputFormat", "ndjson.gz")];
    let cases = [
        (sluice_planner::Level::System, reference().all()),
        (sluice_planner::Level::Patient, reference().all_compartments()),
        (sluice_planner::Level::Group(GROUP_ID.into()), reference().all_compartments()),
    ];
    for (level, expected) in cases {
        let job = run.export(level.clone(), &gz);
        let (files, names) = run.files(&job);
        check_content(&files, &expected);
        let obs: Vec<(String, u64)> = names.into_iter().filter(|(n, _)| n.starts_with("Observation")).collect();
        let want: Vec<String> = (1..=obs.len())
            .map(|n| if n == 1 { "Observation.ndjson.gz".into() } else { format!("Observation-{n}.ndjson.gz") })
            .collect();
        assert_eq!(obs.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), want, "{level:?}: D15 names in order");
        // Read whole, 16,315 Observations make files of 5000, 5000, 5000 and 1315: two
        // ranges of about 8,150 each end in a file of their own that is not full.
        let partial = obs.iter().filter(|(_, c)| *c < 5000).count();
        assert_eq!(partial, 2, "{level:?}: two ranges, each with its last file: {obs:?}");
        assert!(obs.iter().all(|(_, c)| *c <= 5000), "{level:?}: file splitting within a range");
        let p = &job.progress["Observation"];
        assert_eq!((p.done, p.total), (16315, 16315), "{level:?}: one progress entry for the type");
    }
}
