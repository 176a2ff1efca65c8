//! `includeAssociatedData=LatestProvenanceResources`: the export also holds the current
//! Provenance of the resources it exports. The sample data has no Provenance, so the tests
//! PUT some; every expected set is computed here from those resources and the data set's
//! files, never with Sluice's own code.

mod common;

use std::borrow::Cow;
use std::collections::BTreeSet;

use common::*;
use serde_json::{Value, json};

const LATEST: &str = "LatestProvenanceResources";

/// The Provenance resources a test writes: one per target list, with the given ids.
struct Provenances(Vec<Value>);

impl Provenances {
    /// PUTs a Provenance targeting a patient, one targeting an Observation of that patient,
    /// one targeting a Practitioner, and one targeting a Practitioner and another patient.
    fn put(srv: &Server) -> Provenances {
        let r = reference();
        let patients = r.patient_ids();
        let (p1, p2) = (patients[0], patients[1]);
        let obs = r.resources["Observation"]
            .keys()
            .find(|id| compartment_patients(&r.resource("Observation", id)).contains(p1))
            .expect("an Observation of the first patient");
        let pract = r.resources["Practitioner"].keys().next().expect("a Practitioner");
        let all = vec![
            provenance("prov-patient", &[&format!("Patient/{p1}")], "2024-01-01T00:00:00Z"),
            provenance("prov-observation", &[&format!("Observation/{obs}")], "2024-01-02T00:00:00Z"),
            provenance("prov-practitioner", &[&format!("Practitioner/{pract}")], "2024-01-03T00:00:00Z"),
            provenance(
                "prov-mixed",
                &[&format!("Practitioner/{pract}"), &format!("Patient/{p2}")],
                "2024-01-04T00:00:00Z",
            ),
        ];
        let mut out = Provenances(Vec::new());
        for p in all {
            out.write(srv, p, 201);
        }
        out
    }

    /// PUTs `p` (a new resource or a new version of one) and remembers it as the latest.
    fn write(&mut self, srv: &Server, p: Value, status: u16) {
        let id = p["id"].as_str().unwrap().to_string();
        let r = put_json(&srv.fhir(&format!("/Provenance/{id}")), &p);
        assert_eq!(r.status, status, "PUT Provenance/{id}: {}", r.text());
        self.0.retain(|old| old["id"] != id.as_str());
        self.0.push(p);
    }

    /// `base` plus the Provenance for which `keep` holds (given its target references).
    fn expected(&self, base: Expected, keep: impl Fn(&[&str]) -> bool) -> Expected {
        let mut out = base;
        for p in &self.0 {
            let targets: Vec<&str> =
                p["target"].as_array().unwrap().iter().map(|t| t["reference"].as_str().unwrap()).collect();
            if keep(&targets) {
                let id = p["id"].as_str().unwrap().to_string();
                out.entry("Provenance".into()).or_default().insert(id, Cow::Owned(p.to_string()));
            }
        }
        out
    }
}

fn provenance(id: &str, targets: &[&str], recorded: &str) -> Value {
    let targets: Vec<Value> = targets.iter().map(|t| json!({"reference": t})).collect();
    json!({
        "resourceType": "Provenance",
        "id": id,
        "target": targets,
        "recorded": recorded,
        "agent": [{"who": {"display": "an integration engine"}}]
    })
}

/// The type a relative reference points at.
fn ref_type(reference: &str) -> &str {
    reference.split('/').next().unwrap()
}

/// System level with `_type`: only the Provenance of the exported types; a second version
/// of a Provenance replaces the first.
#[test]
fn system_level_exports_the_provenance_of_the_exported_types() {
    let srv = Server::loaded(&[]);
    let mut provs = Provenances::put(&srv);
    let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient,Observation"), ("includeAssociatedData", LATEST)]);
    let exported = ["Patient", "Observation"];
    let keep = |targets: &[&str]| targets.iter().any(|t| exported.contains(&ref_type(t)));

    let m = export(&srv, &url);
    let expected = provs.expected(reference().types(&exported), keep);
    let ids: BTreeSet<&String> = expected["Provenance"].keys().collect();
    assert_eq!(
        ids.into_iter().map(String::as_str).collect::<Vec<_>>(),
        ["prov-mixed", "prov-observation", "prov-patient"]
    );
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);

    // A new version of one: only the latest is exported.
    let mut v2 = provs.0.iter().find(|p| p["id"] == "prov-observation").unwrap().clone();
    v2["recorded"] = json!("2024-02-01T00:00:00Z");
    v2["activity"] = json!({"text": "corrected"});
    provs.write(&srv, v2, 200);
    let m = export(&srv, &url);
    let expected = provs.expected(reference().types(&exported), keep);
    assert!(expected["Provenance"]["prov-observation"].contains("corrected"));
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);

    // Without the parameter, no Provenance.
    let plain = with_query(&srv.fhir("/$export"), &[("_type", "Patient,Observation")]);
    let m = export(&srv, &plain);
    assert!(!output_types(&m).contains("Provenance"));
}

/// Provenance asked for in `_type` too: every Provenance, once.
#[test]
fn provenance_in_type_is_exported_once_and_whole() {
    let srv = Server::loaded(&[]);
    let provs = Provenances::put(&srv);
    let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient,Provenance"), ("includeAssociatedData", LATEST)]);
    let m = export(&srv, &url);
    let expected = provs.expected(reference().types(&["Patient"]), |_| true);
    assert_eq!(expected["Provenance"].len(), 4);
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);
}

/// Patient level (POST, `valueCode`): the Provenance in the exported patients' compartments,
/// those whose target is a patient.
#[test]
fn patient_level_exports_the_provenance_in_the_compartments() {
    let srv = Server::loaded(&[]);
    let provs = Provenances::put(&srv);
    let params = parameters(&[
        ("_type", "valueString", json!("Immunization")),
        ("includeAssociatedData", "valueCode", json!(LATEST)),
    ]);
    let url = srv.fhir("/Patient/$export");
    let m = complete_manifest(&poll_until_done(&kickoff_post(&srv, &url, &params)), &url);
    let r = reference();
    let patients: BTreeSet<&str> = r.patient_ids().into_iter().collect();
    let mut base = Expected::new();
    base.extend(r.all_compartments().into_iter().filter(|(t, _)| t == "Immunization"));
    let expected = provs.expected(base, |targets| {
        targets.iter().any(|t| t.strip_prefix("Patient/").is_some_and(|id| patients.contains(id)))
    });
    let ids: Vec<&str> = expected["Provenance"].keys().map(String::as_str).collect();
    assert_eq!(ids, ["prov-mixed", "prov-patient"]);
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);
}

/// Other codes: 400 naming the code; with `handling=lenient`, ignored and reported while
/// the supported code still applies.
#[test]
fn other_codes_strict_and_lenient() {
    let srv = Server::loaded(&[]);
    let provs = Provenances::put(&srv);
    for code in ["RelevantProvenanceResources", "_custom"] {
        let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient"), ("includeAssociatedData", code)]);
        let r = send("GET", &url, &[("prefer", "respond-async")], None);
        let oo = assert_outcome(&r, 400, &[code, LATEST]);
        assert_eq!(expressions(&oo), ["includeAssociatedData"], "{oo}");
    }
    let url = with_query(
        &srv.fhir("/$export"),
        &[("_type", "Patient"), ("includeAssociatedData", &format!("RelevantProvenanceResources,{LATEST}"))],
    );
    let r = send("GET", &url, &[("prefer", "respond-async, handling=lenient")], None);
    let m = complete_manifest(&poll_until_done(&assert_accepted(&r, &srv)), &url);
    let expected = provs.expected(reference().types(&["Patient"]), |ts| ts.iter().any(|t| ref_type(t) == "Patient"));
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);
    let errors = download_entries(&m["error"]);
    let text = errors.values().flatten().cloned().collect::<Vec<_>>().join("\n");
    assert!(text.contains("RelevantProvenanceResources"), "the ignored code is reported: {text}");
}
