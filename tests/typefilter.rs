//! `_typeFilter`: exports restricted by FHIR search queries per type. Every expected set is
//! computed here from the data set's files with plain JSON predicates, never with Sluice's
//! own search code.

mod common;

use common::*;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The resources of `t` in `base` for which `keep` holds.
fn filtered(base: Expected, t: &str, keep: impl Fn(&Value) -> bool) -> Expected {
    let mut out = base;
    if let Some(ids) = out.get_mut(t) {
        ids.retain(|_, json| keep(&serde_json::from_str(json).expect("reference JSON")));
    }
    out
}

/// Whether a CodeableConcept (or an array of them) holds a coding with `code` (and `system`).
fn has_coding(v: &Value, system: Option<&str>, code: &str) -> bool {
    let concepts: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    concepts
        .iter()
        .flat_map(|c| c["coding"].as_array().into_iter().flatten())
        .any(|c| c["code"] == code && system.is_none_or(|s| c["system"] == s))
}

#[test]
fn a_token_filter_keeps_only_matching_resources_of_its_type() {
    let srv = Server::loaded(&[]);
    let url = with_query(
        &srv.fhir("/$export"),
        &[("_type", "Observation,Patient"), ("_typeFilter", "Observation?category=laboratory")],
    );
    let m = export(&srv, &url);
    let r = reference();
    let expected = filtered(r.types(&["Observation", "Patient"]), "Observation", |o| {
        has_coding(&o["category"], None, "laboratory")
    });
    assert!(
        expected["Observation"].len() > 1000
            && expected["Observation"].len() < r.types(&["Observation"])["Observation"].len()
    );
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);
}

/// Two queries for one type are OR-ed; comma-separated values within a parameter too; the
/// criteria of one query are AND-ed.
#[test]
fn queries_are_ored_and_criteria_anded() {
    let srv = Server::loaded(&[]);
    let diabetes = "http://snomed.info/sct|44054006";
    let url = with_query(
        &srv.fhir("/$export"),
        &[
            ("_type", "Condition,Observation"),
            ("_typeFilter", &format!("Condition?code={diabetes}")),
            ("_typeFilter", "Condition?clinical-status=resolved&code=444814009,195662009"),
            ("_typeFilter", "Observation?category=exam,procedure"),
        ],
    );
    let m = export(&srv, &url);
    let expected = filtered(reference().types(&["Condition", "Observation"]), "Condition", |c| {
        has_coding(&c["code"], Some("http://snomed.info/sct"), "44054006")
            || (has_coding(&c["clinicalStatus"], None, "resolved")
                && (has_coding(&c["code"], None, "444814009") || has_coding(&c["code"], None, "195662009")))
    });
    let expected = filtered(expected, "Observation", |o| {
        has_coding(&o["category"], None, "exam") || has_coding(&o["category"], None, "procedure")
    });
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);
}

/// A date prefix compares the resource's instant with the search value's range: `lt2015`
/// keeps what happened before 2015-01-01T00:00:00Z, offsets included.
#[test]
fn a_date_prefix_filters_by_instant() {
    let srv = Server::loaded(&[]);
    let url =
        with_query(&srv.fhir("/$export"), &[("_type", "Immunization"), ("_typeFilter", "Immunization?date=lt2015")]);
    let m = export(&srv, &url);
    let cut = OffsetDateTime::parse("2015-01-01T00:00:00Z", &Rfc3339).unwrap();
    let expected = filtered(reference().types(&["Immunization"]), "Immunization", |i| {
        OffsetDateTime::parse(i["occurrenceDateTime"].as_str().unwrap(), &Rfc3339).unwrap() < cut
    });
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);
}

/// POST takes `_typeFilter` as `valueString`s; at patient level the filter applies within
/// the compartment.
#[test]
fn post_at_patient_level() {
    let srv = Server::loaded(&[]);
    let params = parameters(&[
        ("_type", "valueString", json!("Observation")),
        ("_typeFilter", "valueString", json!("Observation?category=vital-signs")),
    ]);
    let url = srv.fhir("/Patient/$export");
    let status = kickoff_post(&srv, &url, &params);
    let m = complete_manifest(&poll_until_done(&status), &url);
    let r = reference();
    let mut expected = Expected::new();
    for (t, ids) in r.all_compartments() {
        if t == "Observation" {
            expected.insert(t, ids);
        }
    }
    let expected = filtered(expected, "Observation", |o| has_coding(&o["category"], None, "vital-signs"));
    assert_eq!(manifest_counts(&m), counts(&expected));
    check_export(&m, &expected);
}

/// A query that cannot be used is a 400 naming it; with `handling=lenient` it is ignored,
/// reported in the manifest's `error` file, and the export is unfiltered for that type.
#[test]
fn unusable_queries_strict_and_lenient() {
    let srv = Server::loaded(&[]);
    for (q, mention) in [
        ("Observation?_sort=date", "_sort"),
        ("Observation?flavour=sweet", "flavour"),
        ("Observation?date=soon", "soon"),
        ("Observation?subject.name=x", "subject.name"),
    ] {
        let url = with_query(&srv.fhir("/$export"), &[("_type", "Observation"), ("_typeFilter", q)]);
        let r = send("GET", &url, &[("prefer", "respond-async")], None);
        let oo = assert_outcome(&r, 400, &[mention]);
        assert!(expressions(&oo).iter().any(|e| e == "_typeFilter"), "{oo}");
    }
    let url = with_query(
        &srv.fhir("/$export"),
        &[("_type", "AllergyIntolerance"), ("_typeFilter", "AllergyIntolerance?_count=5")],
    );
    let r = send("GET", &url, &[("prefer", "respond-async, handling=lenient")], None);
    let status = assert_accepted(&r, &srv);
    let m = complete_manifest(&poll_until_done(&status), &url);
    check_export(&m, &reference().types(&["AllergyIntolerance"]));
    let errors = download_entries(&m["error"]);
    let text = errors.values().flatten().cloned().collect::<Vec<_>>().join("\n");
    assert!(text.contains("_count"), "the ignored query is reported: {text}");
}

/// The CapabilityStatement lists the search parameters `_typeFilter` understands.
#[test]
fn capability_statement_lists_search_parameters() {
    let srv = Server::loaded(&[]);
    let cs = get(&srv.fhir("/metadata")).json();
    let obs = cs["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Observation").unwrap();
    let names: Vec<&str> = obs["searchParam"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for n in ["_id", "_lastUpdated", "category", "code", "date", "patient", "status"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let date = obs["searchParam"].as_array().unwrap().iter().find(|p| p["name"] == "date").unwrap();
    assert_eq!(date["type"], "date");
}

/// `_lastUpdated` and `_id` queries are exact, and the store reads only what they bound: the
/// progress the server reports while the export runs counts, for each filtered type, just the
/// resources in the queried window or with the queried ids (the store counted them with the
/// same query it reads with), not the whole type. Claim, unfiltered, keeps the slowed-down
/// export running long enough to be polled.
#[test]
fn last_updated_and_id_queries_are_read_through_the_store() {
    let srv = Server::loaded(&["--throttle-ms", "200", "--batch-bytes", "131072"]);
    let r = reference();
    let first = export(&srv, &with_query(&srv.fhir("/$export"), &[("_type", "Device")]));
    let t1 = first["transactionTime"].as_str().unwrap().to_string();
    let obs_id = r.resources["Observation"].keys().nth(7).unwrap().clone();
    let mut obs = r.resource("Observation", &obs_id);
    obs["status"] = json!("amended");
    assert_eq!(put_json(&srv.fhir(&format!("/Observation/{obs_id}")), &obs).status, 200);
    let patients: Vec<&str> = r.patient_ids().into_iter().skip(3).take(2).collect();

    let url = with_query(
        &srv.fhir("/$export"),
        &[
            ("_type", "Observation,Patient,Claim"),
            ("_typeFilter", &format!("Observation?_lastUpdated=gt{t1}")),
            ("_typeFilter", &format!("Patient?_id={},{},no-such-patient", patients[0], patients[1])),
        ],
    );
    let status = kickoff(&srv, &url);
    // Poll (as a client does) until the running export reports its counts.
    let totals = loop {
        let p = get(&status);
        assert!(p.status == 202 || p.status == 429, "the export ended before its progress was seen: {}", p.text());
        if p.status == 202 && p.json()["types"].as_object().is_some_and(|t| !t.is_empty()) {
            break p.json()["types"].clone();
        }
        std::thread::sleep(std::time::Duration::from_secs(p.retry_after()));
    };
    assert_eq!(totals["Observation"]["total"], 1, "{totals}");
    assert_eq!(totals["Patient"]["total"], 2, "{totals}");
    assert_eq!(totals["Claim"]["total"], r.resources["Claim"].len(), "{totals}");

    let m = complete_manifest(&poll_until_done(&status), &url);
    let mut expected = r.types(&["Claim"]);
    expected.entry("Observation".into()).or_default().insert(obs_id, obs.to_string().into());
    let chosen = r.compartments_of(&patients);
    expected.insert("Patient".into(), chosen["Patient"].clone());
    check_export(&m, &expected);
}
