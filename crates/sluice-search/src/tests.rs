//! Unit tests: one group per rule, then the parameter table against the sample data.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};

use serde_json::{Value, json};

use super::*;

// ---------------------------------------------------------------- helpers

fn q(text: &str) -> TypeQuery {
    parse_query(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// The exact tree of a `serde_json` value (written out and read back).
fn j(resource: &Value) -> Json<'static> {
    Json::parse(&resource.to_string()).unwrap().into_owned()
}

fn m(text: &str, resource: &Value) -> bool {
    q(text).matches(&j(resource))
}

fn e(text: &str) -> SearchError {
    match parse_query(text) {
        Ok(q) => panic!("{text} should be refused, got {q:?}"),
        Err(e) => e,
    }
}

/// Asserts that `text` is refused and that the message mentions every fragment.
fn refused(text: &str, fragments: &[&str]) -> SearchError {
    let err = e(text);
    let msg = err.to_string();
    for f in fragments {
        assert!(msg.contains(f), "{text}: {msg:?} should mention {f:?}");
    }
    err
}

const LOINC: &str = "http://loinc.org";
const OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

fn observation() -> Value {
    json!({
        "resourceType": "Observation",
        "id": "o1",
        "meta": {"lastUpdated": "2024-06-01T12:00:00.123Z"},
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": "8302-2", "display": "Body Height"}], "text": "Body height measured"},
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "effectiveDateTime": "2024-05-03T10:00:00+02:00",
        "valueQuantity": {"value": 181.2, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"}
    })
}

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "p1",
        "active": true,
        "identifier": [
            {"system": "http://hospital.example/mrn", "value": "MRN1", "type": {"text": "Medical record number"}},
            {"value": "LOCAL-7"}
        ],
        "name": [
            {"use": "official", "family": "Müller", "given": ["Jürgen", "Karl"], "prefix": ["Dr."]},
            {"text": "Jürgen Müller-Lüdenscheidt"}
        ],
        "gender": "male",
        "birthDate": "1965-01-13"
    })
}

fn encounter(period: Value) -> Value {
    json!({
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185345009", "display": "Encounter for symptom"}]}],
        "subject": {"reference": "Patient/p1"},
        "period": period
    })
}

fn with(mut resource: Value, key: &str, value: Value) -> Value {
    resource[key] = value;
    resource
}

fn without(mut resource: Value, key: &str) -> Value {
    resource.as_object_mut().unwrap().remove(key);
    resource
}

// ---------------------------------------------------------------- splitting _typeFilter values

#[test]
fn split_single_query() {
    assert_eq!(split_type_filter("Observation?status=final"), ["Observation?status=final"]);
}

#[test]
fn split_at_commas_that_start_a_query() {
    assert_eq!(
        split_type_filter("MedicationRequest?status=active,MedicationRequest?status=completed&date=gt2018-07-01"),
        ["MedicationRequest?status=active", "MedicationRequest?status=completed&date=gt2018-07-01"]
    );
    assert_eq!(
        split_type_filter("Observation?category=laboratory,vital-signs,Condition?code=1,2&clinical-status=active"),
        ["Observation?category=laboratory,vital-signs", "Condition?code=1,2&clinical-status=active"]
    );
}

#[test]
fn split_keeps_value_lists_and_non_query_commas() {
    for value in [
        "Observation?code=http://loinc.org|1,http://loinc.org|2",
        "Observation?status=final,amended,Corrected",
        "Patient?name=Smith,Jones",
        "Observation?code=a,observation?x",
        "Observation?code=a\\,Condition?b",
    ] {
        assert_eq!(split_type_filter(value), [value], "{value}");
    }
}

#[test]
fn split_recognises_still_encoded_queries_and_drops_empty_entries() {
    assert_eq!(
        split_type_filter("MedicationRequest%3Fstatus%3Dactive,MedicationRequest%3fstatus%3Dstopped"),
        ["MedicationRequest%3Fstatus%3Dactive", "MedicationRequest%3fstatus%3Dstopped"]
    );
    assert_eq!(
        split_type_filter(" Observation?status=final , Condition?code=1 "),
        ["Observation?status=final", "Condition?code=1"]
    );
    assert!(split_type_filter("").is_empty());
    assert!(split_type_filter("  ").is_empty());
    assert_eq!(split_type_filter("Observation?status=final,"), ["Observation?status=final,"]);
}

// ---------------------------------------------------------------- parsing and percent-encoding

#[test]
fn parses_type_and_criteria() {
    let query = q("Observation?status=final&code=http://loinc.org|8302-2,|x,http://s|");
    assert_eq!(query.resource_type, "Observation");
    assert_eq!(query.query, "Observation?status=final&code=http://loinc.org|8302-2,|x,http://s|");
    assert_eq!(query.to_string(), query.query);
    assert_eq!(query.criteria.len(), 2);
    assert_eq!(query.criteria[0].param, "status");
    assert_eq!(
        query.criteria[1].test,
        Test::Token {
            not: false,
            values: vec![
                TokenValue { system: Some(LOINC.into()), code: Some("8302-2".into()) },
                TokenValue { system: Some(String::new()), code: Some("x".into()) },
                TokenValue { system: Some("http://s".into()), code: None },
            ]
        }
    );
}

#[test]
fn query_without_criteria_matches_every_resource_of_its_type() {
    let query = q("Observation?");
    assert!(query.criteria.is_empty());
    assert!(query.matches(&j(&observation())));
    assert!(!query.matches(&j(&patient())));
    // Empty pairs (`&&`, a trailing `&`) are ignored.
    assert_eq!(q("Observation?status=final&&").criteria.len(), 1);
}

#[test]
fn names_and_values_are_percent_decoded() {
    let obs = observation();
    assert!(m("Observation?code=http%3A%2F%2Floinc.org%7C8302-2", &obs));
    assert!(m("Observation?%73tatus=final", &obs));
    assert!(m("Observation?date=2024-05-03T10:00:00%2B02:00", &obs));
    // `+` is a space (form encoding); in a date, a space stands for the `+` of an offset.
    assert!(m("Observation?date=2024-05-03T10:00:00+02:00", &obs));
    assert!(m("Patient?name=J%C3%BCrgen+M", &patient()));
    // An encoded `&` or `=` stays inside the value.
    let query = q("Patient?family=a%26b%3Dc");
    assert_eq!(query.criteria.len(), 1);
    assert_eq!(query.criteria[0].test, Test::String { mode: StringMode::StartsWith, values: vec!["a&b=c".into()] });
    // A `%` that is not an escape is kept.
    assert_eq!(parse::percent_decode("100%zz%4"), "100%zz%4");
    assert_eq!(parse::percent_decode("%E2%82%AC+%2b"), "€ +");
}

#[test]
fn a_query_that_is_still_url_encoded_is_decoded_once() {
    let query = q("Observation%3Fstatus%3Dfinal%26code%3D8302-2");
    assert_eq!(query.resource_type, "Observation");
    assert_eq!(query.criteria.len(), 2);
    assert_eq!(query.query, "Observation%3Fstatus%3Dfinal%26code%3D8302-2");
    assert!(query.matches(&j(&observation())));
}

#[test]
fn escaped_commas_and_bars_are_literal() {
    let query = q(r"Patient?family=a\,b,c&identifier=sys\|x|v\\w");
    assert_eq!(
        query.criteria[0].test,
        Test::String { mode: StringMode::StartsWith, values: vec!["a,b".into(), "c".into()] }
    );
    assert_eq!(
        query.criteria[1].test,
        Test::Token {
            not: false,
            values: vec![TokenValue { system: Some("sys|x".into()), code: Some(r"v\w".into()) }]
        }
    );
}

// ---------------------------------------------------------------- syntax errors

#[test]
fn malformed_queries_are_refused() {
    refused("", &["empty"]);
    refused("   ", &["empty"]);
    refused("Observation", &["'Observation' is a resource type without search criteria", "Observation?_id="]);
    refused("status=final", &["not a FHIR search query", "Type?name=value"]);
    refused("?status=final", &["names no resource type"]);
    refused("Patient/123/Observation?code=1", &["compartment", "Patient/123/Observation"]);
    refused("Observation?status", &["'status' has no value", "name=value"]);
    refused("Observation?=final", &["no parameter name"]);
    for text in ["", "Observation", "?a=b", "Observation?status"] {
        assert!(matches!(e(text), SearchError::Syntax(_)), "{text}");
        assert!(!e(text).is_not_supported());
    }
}

#[test]
fn empty_values_are_refused() {
    refused("Observation?status=", &["status", "empty"]);
    refused("Observation?status=final,,amended", &["empty entry"]);
    refused("Observation?status=final,", &["empty entry"]);
    assert!(matches!(e("Observation?status= "), SearchError::InvalidValue { .. }));
}

#[test]
fn unknown_types_are_refused_with_a_hint() {
    let err = refused("observation?status=final", &["'observation'", "did you mean Observation?"]);
    assert!(err.is_not_supported());
    refused("Foo?x=1", &["'Foo' is not a standard FHIR R4 resource type"]);
    assert!(matches!(e("Foo?x=1"), SearchError::UnknownType { hint, .. } if hint.is_empty()));
}

#[test]
fn unsupported_parameters_list_the_supported_ones() {
    let err = refused(
        "Observation?combo-code=x",
        &["'combo-code' is not supported on Observation", "_id, _lastUpdated, category, code, status, date"],
    );
    assert!(err.is_not_supported());
    refused("Device?type=x", &["supported: _id, _lastUpdated"]);
    refused("Observation?_tag=x", &["'_tag'"]);
    refused("Observation?Status=final", &["'Status'"]);
    // Parameters of another type are not borrowed.
    refused("Observation?gender=male", &["'gender' is not supported on Observation"]);
}

#[test]
fn result_parameters_are_refused() {
    for p in [
        "_sort",
        "_count",
        "_include",
        "_revinclude",
        "_summary",
        "_elements",
        "_total",
        "_contained",
        "_containedType",
    ] {
        let err = refused(&format!("Observation?status=final&{p}=x"), &[&format!("'{p}'"), "search result parameter"]);
        assert!(matches!(err, SearchError::ResultParameter { .. }), "{p}");
        assert!(err.is_not_supported());
    }
    refused("Observation?_include:iterate=Observation:patient", &["'_include'"]);
}

#[test]
fn chained_parameters_are_refused() {
    refused("Observation?subject.name=peter", &["'subject.name'", "chained"]);
    refused("Observation?patient:Patient.name=peter", &["chained"]);
    refused("Patient?_has:Observation:patient:code=1234", &["'_has:Observation:patient:code'", "reverse-chained"]);
    assert!(e("Observation?subject.name=x").is_not_supported());
}

#[test]
fn modifiers_are_checked_per_kind() {
    let err = refused("Observation?code:foo=1", &["unknown modifier ':foo'", "token parameter 'code'", ":not, :text"]);
    assert!(err.is_not_supported());
    refused("Observation?code:above=1", &["unsupported modifier ':above'"]);
    refused("Observation?code:in=http://vs", &["unsupported modifier ':in'"]);
    refused("Observation?code:exact=1", &["unsupported modifier ':exact'", "token"]);
    refused("Observation?date:not=2024", &["unsupported modifier ':not'", "date parameter 'date'", ":missing"]);
    refused("Observation?status:Patient=x", &["unsupported modifier ':Patient'"]);
    refused("Patient?family:text=x", &["unsupported modifier ':text'", ":exact, :contains"]);
    refused("Observation?subject:identifier=x", &["unsupported modifier ':identifier'", ":[type]"]);
    refused("Observation?subject:Foo=x", &["unknown modifier ':Foo'"]);
    refused("Observation?patient:Group=x", &["'patient' only refers to Patient, not Group"]);
}

#[test]
fn missing_takes_true_or_false() {
    refused("Observation?code:missing=yes", &["'yes' is not true or false"]);
    refused("Observation?code:missing=true,false", &["not true or false"]);
    assert_eq!(q("Observation?code:missing=true").criteria[0].test, Test::Missing(true));
    assert_eq!(q("Observation?date:missing=false").criteria[0].test, Test::Missing(false));
}

// ---------------------------------------------------------------- token

#[test]
fn token_on_codeable_concept() {
    let obs = observation();
    for (query, expected) in [
        ("code=8302-2", true),
        ("code=http://loinc.org|8302-2", true),
        ("code=http://snomed.info/sct|8302-2", false),
        ("code=|8302-2", false),
        ("code=http://loinc.org|", true),
        ("code=http://snomed.info/sct|", false),
        ("code=8302", false),
        ("code=8302-2x", false),
        ("code=1234,8302-2", true),
        ("code=1234,5678", false),
        ("category=vital-signs", true),
        (&format!("category={OBS_CATEGORY}|vital-signs"), true),
        ("category=laboratory", false),
        ("category=Vital-Signs", false),
    ] {
        assert_eq!(m(&format!("Observation?{query}"), &obs), expected, "{query}");
    }
}

#[test]
fn token_without_system_in_the_resource() {
    let cond = json!({"resourceType": "Condition", "code": {"coding": [{"code": "x"}, {"system": "s", "code": "y"}]}});
    assert!(m("Condition?code=|x", &cond));
    assert!(m("Condition?code=x", &cond));
    assert!(!m("Condition?code=s|x", &cond));
    assert!(!m("Condition?code=|y", &cond));
    assert!(m("Condition?code=s|y", &cond));
    // A single coding object instead of a list is read too.
    let single = json!({"resourceType": "Condition", "code": {"coding": {"system": "s", "code": "z"}}});
    assert!(m("Condition?code=s|z", &single));
}

#[test]
fn token_on_plain_codes() {
    let obs = observation();
    assert!(m("Observation?status=final", &obs));
    assert!(m("Observation?status=|final", &obs));
    assert!(m("Observation?status=amended,final", &obs));
    assert!(!m("Observation?status=FINAL", &obs));
    assert!(!m("Observation?status=http://hl7.org/fhir/observation-status|final", &obs));
    assert!(!m("Observation?status=http://hl7.org/fhir/observation-status|", &obs));
    assert!(m("Observation?_id=o1", &obs));
    assert!(m("Observation?_id=o0,o1", &obs));
    assert!(!m("Observation?_id=o", &obs));
    // A list of codes.
    let allergy = json!({"resourceType": "AllergyIntolerance", "category": ["food", "medication"]});
    assert!(m("AllergyIntolerance?category=medication", &allergy));
    assert!(!m("AllergyIntolerance?category=environment", &allergy));
}

#[test]
fn token_on_coding_identifier_and_boolean() {
    let enc = encounter(json!({"start": "2024-01-01"}));
    assert!(m("Encounter?class=AMB", &enc));
    assert!(m("Encounter?class=http://terminology.hl7.org/CodeSystem/v3-ActCode|AMB", &enc));
    assert!(!m("Encounter?class=IMP", &enc));
    assert!(m("Encounter?type=185345009", &enc));

    let pat = patient();
    assert!(m("Patient?identifier=MRN1", &pat));
    assert!(m("Patient?identifier=http://hospital.example/mrn|MRN1", &pat));
    assert!(m("Patient?identifier=http://hospital.example/mrn|", &pat));
    assert!(!m("Patient?identifier=http://other|MRN1", &pat));
    assert!(!m("Patient?identifier=|MRN1", &pat));
    assert!(m("Patient?identifier=|LOCAL-7", &pat));
    assert!(m("Patient?gender=male", &pat));
    assert!(!m("Patient?gender=female", &pat));

    assert!(m("Patient?active=true", &pat));
    assert!(!m("Patient?active=false", &pat));
    assert!(m("Patient?active=false", &with(pat.clone(), "active", json!(false))));
    assert!(!m("Patient?active=true", &without(pat, "active")));
}

#[test]
fn token_paths_with_several_elements() {
    let allergy = json!({
        "resourceType": "AllergyIntolerance",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]},
        "reaction": [{"substance": {"coding": [{"code": "2"}]}}, {"substance": {"coding": [{"code": "3"}]}}]
    });
    for code in ["1", "2", "3"] {
        assert!(m(&format!("AllergyIntolerance?code={code}"), &allergy), "{code}");
    }
    assert!(!m("AllergyIntolerance?code=4", &allergy));
    let request =
        json!({"resourceType": "MedicationRequest", "medicationCodeableConcept": {"coding": [{"code": "313782"}]}});
    assert!(m("MedicationRequest?code=313782", &request));
}

#[test]
fn token_not() {
    let obs = observation();
    assert!(!m("Observation?code:not=8302-2", &obs));
    assert!(m("Observation?code:not=1234", &obs));
    assert!(!m("Observation?code:not=1234,8302-2", &obs));
    assert!(m("Observation?code:not=http://snomed.info/sct|8302-2", &obs));
    assert!(m("Observation?status:not=amended", &obs));
    // Resources without a value match :not.
    assert!(m("Observation?code:not=8302-2", &without(obs, "code")));
}

#[test]
fn token_text() {
    let obs = observation();
    assert!(m("Observation?code:text=body", &obs));
    assert!(m("Observation?code:text=BODY+H", &obs));
    assert!(m("Observation?code:text=height", &obs));
    assert!(m("Observation?code:text=measured", &obs));
    assert!(!m("Observation?code:text=eight", &obs));
    assert!(m("Observation?category:text=vital", &obs));
    assert!(m("Observation?code:text=xyz,meas", &obs));
    let pat = patient();
    assert!(m("Patient?identifier:text=medical", &pat));
    assert!(m("Patient?identifier:text=record", &pat));
    assert!(!m("Patient?identifier:text=mrn", &pat));
    let accents = json!({"resourceType": "Condition", "code": {"text": "Fièvre élevée"}});
    assert!(m("Condition?code:text=eleve", &accents));
    assert!(m("Condition?code:text=FIE", &accents));
}

// ---------------------------------------------------------------- date

/// The prefixes in the order of the tables below.
const PREFIXES: [&str; 8] = ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"];

/// Checks every prefix of `search` against `resource` for parameter `param` of its type.
fn check_prefixes(resource: &Value, param: &str, search: &str, expected: [bool; 8]) {
    let rt = resource["resourceType"].as_str().unwrap();
    for (prefix, want) in PREFIXES.iter().zip(expected) {
        let text = format!("{rt}?{param}={prefix}{search}");
        assert_eq!(m(&text, resource), want, "{text} on {}", resource);
    }
}

fn observed_at(value: &str) -> Value {
    with(observation(), "effectiveDateTime", json!(value))
}

fn born(value: &str) -> Value {
    with(patient(), "birthDate", json!(value))
}

#[test]
fn no_prefix_means_eq() {
    assert_eq!(q("Patient?birthdate=2024").criteria[0].test, q("Patient?birthdate=eq2024").criteria[0].test);
    let Test::Date(values) = &q("Patient?birthdate=ge2024-05-03").criteria[0].test else { panic!() };
    assert_eq!(values[0].prefix, Prefix::Ge);
}

#[test]
fn date_search_ranges_follow_the_precision() {
    let range = |v: &str| {
        let Test::Date(values) = q(&format!("Patient?birthdate={v}")).criteria[0].test.clone() else { panic!() };
        (values[0].end - values[0].start, values[0].start)
    };
    let at = |s: &str| sluice_fhir::instant::to_millis(sluice_fhir::instant::parse(s).unwrap());
    assert_eq!(range("2024"), (366 * 86_400_000, at("2024-01-01T00:00:00Z")));
    assert_eq!(range("2023"), (365 * 86_400_000, at("2023-01-01T00:00:00Z")));
    assert_eq!(range("2024-02"), (29 * 86_400_000, at("2024-02-01T00:00:00Z")));
    assert_eq!(range("2024-12"), (31 * 86_400_000, at("2024-12-01T00:00:00Z")));
    assert_eq!(range("2024-05-03"), (86_400_000, at("2024-05-03T00:00:00Z")));
    assert_eq!(range("2024-05-03T10:11"), (60_000, at("2024-05-03T10:11:00Z")));
    assert_eq!(range("2024-05-03T10:11:12"), (1000, at("2024-05-03T10:11:12Z")));
    assert_eq!(range("2024-05-03T10:11:12.3"), (100, at("2024-05-03T10:11:12.300Z")));
    assert_eq!(range("2024-05-03T10:11:12.34"), (10, at("2024-05-03T10:11:12.340Z")));
    assert_eq!(range("2024-05-03T10:11:12.345"), (1, at("2024-05-03T10:11:12.345Z")));
    assert_eq!(range("2024-05-03T10:11:12.3456"), (1, at("2024-05-03T10:11:12.345Z")));
    assert_eq!(range("2024-05-03T10:11:12Z"), (1000, at("2024-05-03T10:11:12Z")));
    assert_eq!(range("2024-05-03T10:11:12-05:00"), (1000, at("2024-05-03T15:11:12Z")));
    assert_eq!(range("2024-05-03T10:11%2B02:00"), (60_000, at("2024-05-03T08:11:00Z")));
}

#[test]
fn bad_dates_and_prefixes_are_refused() {
    for bad in [
        "2024-13",
        "2024-02-30",
        "20240503",
        "24",
        "2024-5-3",
        "2024-05-03T25:00",
        "2024-05-03T10",
        "2024-05-03T10:00:00+15:00",
        "2024-05-03T10:00:00+0200",
        "2024-05-03T10:00:00.",
        "2024-05-03T10:00:00.1a",
        "2024-05-03Z",
        "2024-05-03T10:00:60",
        "2024-05-03 10:00",
    ] {
        refused(&format!("Observation?date={bad}"), &["is not a FHIR date or dateTime", "2024-05-03T10:00"]);
        refused(&format!("Observation?date=ge{bad}"), &["is not a FHIR date"]);
    }
    refused("Observation?date=ap2024", &["'ap' (approximately) is not supported", "eq, ne, gt, lt, ge, le, sa, eb"]);
    refused("Observation?date=gx2024", &["'gx' in 'gx2024' is not a date prefix"]);
    refused("Observation?date=GE2024", &["'GE'"]);
    refused("Observation?date=yesterday", &["not a date prefix"]);
    refused("Observation?date=ge", &["'' is not a FHIR date"]);
    assert!(!e("Observation?date=2024-13").is_not_supported());
}

#[test]
fn year_search_against_datetimes() {
    // eq ne gt lt ge le sa eb
    let inside = [true, false, false, false, true, true, false, false];
    let just_before = [false, true, false, true, false, true, false, true];
    let just_after = [false, true, true, false, true, false, true, false];
    check_prefixes(&observed_at("2024-06-15T10:00:00Z"), "date", "2024", inside);
    check_prefixes(&observed_at("2024-01-01T00:00:00Z"), "date", "2024", inside);
    check_prefixes(&observed_at("2024-12-31T23:59:59Z"), "date", "2024", inside);
    check_prefixes(&observed_at("2023-12-31T23:59:59Z"), "date", "2024", just_before);
    check_prefixes(&observed_at("2025-01-01T00:00:00Z"), "date", "2024", just_after);
    check_prefixes(&observed_at("2020-03-01T00:00:00Z"), "date", "2024", just_before);
    // The zone counts: 23:30 at -01:00 is already 2025 in UTC, 00:30 at +01:00 still 2024.
    check_prefixes(&observed_at("2024-12-31T23:30:00-01:00"), "date", "2024", just_after);
    check_prefixes(&observed_at("2025-01-01T00:30:00+01:00"), "date", "2024", inside);
    // A minute-precision value straddling nothing; a year value equal to the search range.
    check_prefixes(&observed_at("2024-06-15T10:00"), "date", "2024", inside);
    check_prefixes(&observed_at("2024"), "date", "2024", inside);
}

#[test]
fn month_and_day_search_against_dates() {
    // eq ne gt lt ge le sa eb
    let inside = [true, false, false, false, true, true, false, false];
    let after = [false, true, true, false, true, false, true, false];
    let before = [false, true, false, true, false, true, false, true];
    let wider = [false, true, true, true, true, true, false, false];
    check_prefixes(&born("2024-05-31"), "birthdate", "2024-05", inside);
    check_prefixes(&born("2024-05-01"), "birthdate", "2024-05", inside);
    check_prefixes(&born("2024-06-01"), "birthdate", "2024-05", after);
    check_prefixes(&born("2024-04-30"), "birthdate", "2024-05", before);
    check_prefixes(&born("2024-05"), "birthdate", "2024-05", inside);
    check_prefixes(&born("2024"), "birthdate", "2024-05", wider);
    check_prefixes(&born("2024-05-03"), "birthdate", "2024-05-03", inside);
    check_prefixes(&born("2024-05-04"), "birthdate", "2024-05-03", after);
    check_prefixes(&born("2024-05-02"), "birthdate", "2024-05-03", before);
    check_prefixes(&born("2024-05"), "birthdate", "2024-05-03", wider);
    check_prefixes(&born("2024-05-03"), "birthdate", "2024", inside);
}

#[test]
fn datetime_search_against_datetimes() {
    // eq ne gt lt ge le sa eb
    let inside = [true, false, false, false, true, true, false, false];
    let wider = [false, true, true, true, true, true, false, false];
    let after = [false, true, true, false, true, false, true, false];
    // The resource is 2024-05-03T08:00:00Z (10:00 at +02:00), one second wide.
    let obs = observation();
    check_prefixes(&obs, "date", "2024-05-03T08:00:00Z", inside);
    check_prefixes(&obs, "date", "2024-05-03T10:00:00%2B02:00", inside);
    check_prefixes(&obs, "date", "2024-05-03T08:00:00", inside); // no zone: UTC
    check_prefixes(&obs, "date", "2024-05-03T08:00", inside);
    check_prefixes(&obs, "date", "2024-05-03T08:00:00.5", wider);
    check_prefixes(&obs, "date", "2024-05-03T07:59:59Z", after);
    check_prefixes(&obs, "date", "2024-05-03", inside);
    check_prefixes(&obs, "date", "2024-05-02", after);
}

#[test]
fn instants_with_milliseconds() {
    // eq ne gt lt ge le sa eb
    let inside = [true, false, false, false, true, true, false, false];
    let before = [false, true, false, true, false, true, false, true];
    let obs = observation(); // lastUpdated 2024-06-01T12:00:00.123Z
    check_prefixes(&obs, "_lastUpdated", "2024-06-01T12:00:00Z", inside);
    check_prefixes(&obs, "_lastUpdated", "2024-06-01T12:00:00.1Z", inside);
    check_prefixes(&obs, "_lastUpdated", "2024-06-01T12:00:00.12Z", inside);
    check_prefixes(&obs, "_lastUpdated", "2024-06-01T12:00:00.123Z", inside);
    check_prefixes(&obs, "_lastUpdated", "2024-06-01T12:00:00.124Z", before);
    check_prefixes(&obs, "_lastUpdated", "2024-06-01T12:00:00.2Z", before);
}

#[test]
fn periods_are_ranges() {
    // eq ne gt lt ge le sa eb
    let within = [true, false, false, false, true, true, false, false];
    let straddles = [false, true, true, true, true, true, false, false];
    let starts_before = [false, true, false, true, false, true, false, false];
    let after = [false, true, true, false, true, false, true, false];
    let before = [false, true, false, true, false, true, false, true];

    let hour = encounter(json!({"start": "2024-05-01T10:00:00Z", "end": "2024-05-01T11:00:00Z"}));
    check_prefixes(&hour, "date", "2024-05-01", within);
    check_prefixes(&hour, "date", "2024-05", within);
    check_prefixes(&hour, "date", "2024-05-01T10:30", straddles);
    check_prefixes(&hour, "date", "2024-04-30", after);
    check_prefixes(&hour, "date", "2024-05-02", before);

    let overnight = encounter(json!({"start": "2024-04-30T23:00:00Z", "end": "2024-05-01T01:00:00Z"}));
    check_prefixes(&overnight, "date", "2024-05-01", starts_before);
    check_prefixes(&overnight, "date", "2024-05", starts_before);
    check_prefixes(&overnight, "date", "2024", within);

    // Period bounds keep their own precision: a day-precision end covers the whole day.
    let days = encounter(json!({"start": "2024-05-01", "end": "2024-05-03"}));
    check_prefixes(&days, "date", "2024-05", within);
    assert!(m("Encounter?date=eb2024-05-04", &days));
    assert!(!m("Encounter?date=eb2024-05-03", &days));
    assert!(m("Encounter?date=sa2024-04-30", &days));
    assert!(!m("Encounter?date=sa2024-05-01", &days));
}

#[test]
fn open_periods() {
    // eq ne gt lt ge le sa eb
    let ongoing = encounter(json!({"start": "2024-05-01"}));
    check_prefixes(&ongoing, "date", "2024", [false, true, true, false, true, false, false, false]);
    check_prefixes(&ongoing, "date", "2025", [false, true, true, true, true, true, false, false]);
    check_prefixes(&ongoing, "date", "2024-04-30", [false, true, true, false, true, false, true, false]);
    let ended = encounter(json!({"end": "2020-01-01"}));
    check_prefixes(&ended, "date", "2019", [false, true, true, true, true, true, false, false]);
    check_prefixes(&ended, "date", "2020", [false, true, false, true, false, true, false, false]);
    check_prefixes(&ended, "date", "2020-01-02", [false, true, false, true, false, true, false, true]);
    assert!(m("Encounter?date=lt1900", &ended));
    // A Period without bounds, or with a bad bound, has no value.
    assert!(!m("Encounter?date=ne2020", &encounter(json!({}))));
    assert!(m("Encounter?date:missing=true", &encounter(json!({}))));
    assert!(!m("Encounter?date=ne2020", &encounter(json!({"start": "garbage"}))));
}

#[test]
fn date_choice_elements_and_or_and() {
    let period = with(without(observation(), "effectiveDateTime"), "effectivePeriod", json!({"start": "2020-01-01"}));
    assert!(m("Observation?date=ge2021", &period));
    assert!(!m("Observation?date=lt2020", &period));
    let instant =
        with(without(observation(), "effectiveDateTime"), "effectiveInstant", json!("2021-02-03T04:05:06.789Z"));
    assert!(m("Observation?date=2021-02-03", &instant));
    // OR within a parameter, AND across repeats.
    let obs = observation();
    assert!(m("Observation?date=2020,2024", &obs));
    assert!(!m("Observation?date=2020,2021", &obs));
    assert!(m("Observation?date=ge2024&date=lt2025", &obs));
    assert!(!m("Observation?date=ge2024&date=lt2024-05", &obs));
    assert!(m("Observation?date=sa2024-04-30&date=eb2024-05-04", &obs));
    // Values that are not dates are ignored.
    assert!(!m("Observation?date=ne2024", &observed_at("not a date")));
    assert!(!m(
        "Observation?date=ne2024",
        &with(without(observation(), "effectiveDateTime"), "effectiveDateTime", json!(12))
    ));
}

#[test]
fn date_params_of_each_type() {
    let cond = json!({
        "resourceType": "Condition",
        "onsetDateTime": "1985-06-18T17:30:49-04:00",
        "abatementDateTime": "2017-05-03T17:30:49-04:00",
        "recordedDate": "1985-06-19"
    });
    assert!(m("Condition?onset-date=1985-06-18", &cond));
    assert!(m("Condition?abatement-date=2017", &cond));
    assert!(m("Condition?recorded-date=gt1985-06-18", &cond));
    let onset_period = json!({"resourceType": "Condition", "onsetPeriod": {"start": "2001", "end": "2002"}});
    assert!(m("Condition?onset-date=le2001-06", &onset_period));
    let proc_ = json!({"resourceType": "Procedure", "performedPeriod": {"start": "2013-02-06T16:30:49-05:00", "end": "2013-02-06T16:45:49-05:00"}});
    assert!(m("Procedure?date=2013-02-06", &proc_));
    let proc_dt = json!({"resourceType": "Procedure", "performedDateTime": "2013-02-07T01:00:00+02:00"});
    assert!(m("Procedure?date=2013-02-06", &proc_dt));
    let mr = json!({"resourceType": "MedicationRequest", "authoredOn": "2017-11-25T16:30:49-05:00"});
    assert!(m("MedicationRequest?authoredon=2017-11-25", &mr));
    assert!(!m("MedicationRequest?date=2017-11-25", &mr));
    let timed = json!({"resourceType": "MedicationRequest", "dosageInstruction": [
        {"timing": {"event": ["2018-07-01T08:00:00Z", "2018-07-02T08:00:00Z"]}},
        {"timing": {"repeat": {"frequency": 1}}}
    ]});
    assert!(m("MedicationRequest?date=gt2018-07-01T00:00:00Z", &timed));
    assert!(m("MedicationRequest?date=2018-07-02", &timed));
    assert!(!m("MedicationRequest?date=2018-07-03", &timed));
    let imm = json!({"resourceType": "Immunization", "occurrenceDateTime": "2011-02-02T16:30:49-05:00"});
    assert!(m("Immunization?date=2011-02", &imm));
    let dr = json!({"resourceType": "DiagnosticReport", "effectivePeriod": {"start": "2011-02-02"}});
    assert!(m("DiagnosticReport?date=ge2011", &dr));
    let doc = json!({"resourceType": "DocumentReference", "date": "2020-02-02T00:00:00Z"});
    assert!(m("DocumentReference?date=2020", &doc));
    let claim = json!({"resourceType": "Claim", "created": "1985-06-18T17:45:49-04:00"});
    assert!(m("Claim?created=1985", &claim));
    let plan = json!({"resourceType": "CarePlan", "period": {"start": "2013-02-06T16:30:49-05:00"}});
    assert!(m("CarePlan?date=ge2020", &plan));
}

// ---------------------------------------------------------------- reference

#[test]
fn reference_forms() {
    let obs = observation();
    for (query, expected) in [
        ("patient=p1", true),
        ("patient=Patient/p1", true),
        ("patient=http://example.org/fhir/Patient/p1", true),
        ("patient=https://other.example/base/Patient/p1/_history/4", true),
        ("patient=p2", false),
        ("patient=p2,p1", true),
        ("subject=p1", true),
        ("subject=Patient/p1", true),
        ("subject=Group/p1", false),
        ("subject:Patient=p1", true),
        ("subject:Group=p1", false),
        ("patient:Patient=p1", true),
        ("encounter=e1", true),
        ("encounter=Encounter/e1", true),
        ("encounter=e2", false),
    ] {
        assert_eq!(m(&format!("Observation?{query}"), &obs), expected, "{query}");
    }
}

#[test]
fn reference_targets_and_resource_reference_forms() {
    let group_subject = with(observation(), "subject", json!({"reference": "Group/g1"}));
    assert!(m("Observation?subject=g1", &group_subject));
    assert!(m("Observation?subject=Group/g1", &group_subject));
    assert!(!m("Observation?patient=g1", &group_subject));
    for reference in
        ["http://other.example/fhir/Patient/p1", "Patient/p1/_history/3", "https://x/Patient/p1/_history/3"]
    {
        let obs = with(observation(), "subject", json!({"reference": reference}));
        assert!(m("Observation?patient=p1", &obs), "{reference}");
        assert!(m("Observation?patient=Patient/p1", &obs), "{reference}");
    }
    for reference in ["#p1", "urn:uuid:p1", "", "Patient/"] {
        let obs = with(observation(), "subject", json!({"reference": reference}));
        assert!(!m("Observation?subject=p1", &obs), "{reference:?}");
    }
    // A reference without `reference` (display or identifier only) has no value to compare.
    let display_only = with(observation(), "subject", json!({"display": "p1"}));
    assert!(!m("Observation?subject=p1", &display_only));
    // Types with a `patient` element.
    let imm = json!({"resourceType": "Immunization", "patient": {"reference": "Patient/p9"}});
    assert!(m("Immunization?patient=p9", &imm));
    let claim = json!({"resourceType": "ExplanationOfBenefit", "patient": {"reference": "Patient/p9"}});
    assert!(m("ExplanationOfBenefit?patient=Patient/p9", &claim));
}

#[test]
fn bad_references_are_refused() {
    refused("Observation?patient=Practitioner/1", &["refers to a Practitioner", "only Patient fits"]);
    refused("Observation?encounter=Patient/1", &["only Encounter fits"]);
    refused("Observation?subject:Patient=Group/1", &["only Patient fits"]);
    refused("Observation?subject=Foo/1", &["'Foo' in 'Foo/1' is not a standard FHIR R4 resource type"]);
    refused("Observation?subject=a b", &["'a b' in 'a b' is not a FHIR id"]);
    refused("Observation?subject=http://example.org/", &["is not a reference", "Type/id"]);
    refused("Observation?subject=%23contained", &["'#contained' is not a reference"]);
    refused(&format!("Observation?subject={}", "x".repeat(65)), &["is not a FHIR id"]);
    assert!(!e("Observation?subject=a b").is_not_supported());
}

// ---------------------------------------------------------------- string

#[test]
fn string_starts_with_ignoring_case_and_accents() {
    let pat = patient();
    for (query, expected) in [
        ("family=mul", true),
        ("family=MÜL", true),
        ("family=Müller", true),
        ("family=muller", true),
        ("family=ller", false),
        ("family=müllers", false),
        ("given=kar", true),
        ("given=jur", true),
        ("given=dr", false),
        ("name=dr", true),
        ("name=karl", true),
        ("name=j%C3%BCrgen+m%C3%BCller-l", true),
        ("name=lud", false),
        ("name=xyz,mul", true),
        ("name=xyz,abc", false),
    ] {
        assert_eq!(m(&format!("Patient?{query}"), &pat), expected, "{query}");
    }
}

#[test]
fn string_exact_and_contains() {
    let pat = patient();
    assert!(m("Patient?family:exact=Müller", &pat));
    assert!(!m("Patient?family:exact=Muller", &pat));
    assert!(!m("Patient?family:exact=müller", &pat));
    assert!(!m("Patient?family:exact=Mül", &pat));
    assert!(m("Patient?family:contains=LLER", &pat));
    assert!(m("Patient?name:contains=lud", &pat));
    assert!(!m("Patient?name:contains=xyz", &pat));
    assert!(m("Patient?given:exact=Karl,Jürgen", &pat));
}

#[test]
fn folding_covers_common_latin_letters() {
    assert_eq!(matching::fold("ÀÉÎÕÜ Çß Øæœ Łódź Šťěpán İ"), "aeiou css oaeoe lodz stepan i");
    assert_eq!(matching::fold("e\u{301}"), "e");
    assert_eq!(matching::fold("日本"), "日本");
}

#[test]
fn string_params_of_practitioner_and_organization() {
    let prac = json!({"resourceType": "Practitioner", "name": [{"family": "Christiansen", "given": ["Darlena"], "prefix": ["Dr."]}], "active": true});
    assert!(m("Practitioner?name=darl", &prac));
    assert!(m("Practitioner?name=christ", &prac));
    assert!(m("Practitioner?active=true", &prac));
    let org = json!({"resourceType": "Organization", "name": "HEALTHALLIANCE HOSPITALS, INC", "alias": ["HAH"]});
    assert!(m("Organization?name=healthalliance", &org));
    assert!(m("Organization?name=hah", &org));
    assert!(m("Organization?name:contains=hospitals", &org));
    assert!(!m("Organization?name=hospitals", &org));
}

// ---------------------------------------------------------------- :missing

#[test]
fn missing_on_every_kind() {
    let obs = observation();
    let bare = json!({"resourceType": "Observation", "id": "x"});
    for param in ["code", "date", "encounter", "patient", "_lastUpdated"] {
        assert!(m(&format!("Observation?{param}:missing=false"), &obs), "{param}");
        assert!(!m(&format!("Observation?{param}:missing=true"), &obs), "{param}");
        assert!(m(&format!("Observation?{param}:missing=true"), &bare), "{param}");
        assert!(!m(&format!("Observation?{param}:missing=false"), &bare), "{param}");
    }
    assert!(m("Patient?family:missing=false", &patient()));
    assert!(m("Patient?family:missing=true", &json!({"resourceType": "Patient", "name": [{"text": "x"}]})));
    // null counts as missing; an empty array too.
    assert!(m("Observation?encounter:missing=true", &with(observation(), "encounter", Value::Null)));
    assert!(m("Observation?category:missing=true", &with(observation(), "category", json!([]))));
}

// ---------------------------------------------------------------- AND / OR / types

#[test]
fn criteria_are_anded_and_values_ored() {
    let obs = observation();
    assert!(m("Observation?status=final&code=8302-2&date=2024&patient=p1", &obs));
    assert!(!m("Observation?status=final&code=8302-2&date=2023&patient=p1", &obs));
    assert!(!m("Observation?status=amended&code=8302-2", &obs));
    assert!(m("Observation?status=amended,final&code=x,8302-2", &obs));
    assert!(m("Observation?code=8302-2&code:not=1234", &obs));
    assert!(!m("Observation?code=8302-2&code:not=8302-2", &obs));
}

#[test]
fn matches_checks_the_resource_type() {
    let query = q("Observation?_id=o1");
    assert!(query.matches(&j(&observation())));
    assert!(!query.matches(&j(&with(observation(), "resourceType", json!("Condition")))));
    assert!(!query.matches(&j(&without(observation(), "resourceType"))));
    assert!(!query.matches(&j(&json!("Observation"))));
}

#[test]
fn several_queries_are_ored() {
    let queries = vec![q("Observation?status=amended"), q("Observation?code=8302-2")];
    assert!(matches_any(&queries, &j(&observation())));
    assert!(!matches_any(&queries[..1], &j(&observation())));
    assert!(!matches_any(&[], &j(&observation())));
}

// ---------------------------------------------------------------- serde

#[test]
fn queries_round_trip_through_json() {
    let query = q("Observation?status:not=final&code:text=body&date=ge2024-05&subject:Patient=p1&_id:missing=false");
    let text = serde_json::to_string(&query).unwrap();
    let back: TypeQuery = serde_json::from_str(&text).unwrap();
    assert_eq!(back, query);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["resource_type"], "Observation");
    assert_eq!(v["criteria"][0]["test"]["token"]["not"], true);
    assert_eq!(v["criteria"][2]["test"]["date"][0]["prefix"], "ge");
    assert_eq!(v["criteria"][3]["test"]["reference"][0], json!({"resource_type": "Patient", "id": "p1"}));
    let patient = q("Patient?name:exact=Ann");
    let v = serde_json::to_value(&patient).unwrap();
    assert_eq!(v["criteria"][0]["test"]["string"], json!({"mode": "exact", "values": ["Ann"]}));
    // Old or foreign records: `query` is optional; an unknown parameter matches nothing.
    let stored: TypeQuery = serde_json::from_value(json!({
        "resource_type": "Observation",
        "criteria": [{"param": "combo-code", "test": {"missing": false}}]
    }))
    .unwrap();
    assert_eq!(stored.query, "");
    assert!(!stored.matches(&j(&observation())));
}

// ---------------------------------------------------------------- the parameter table

#[test]
fn every_type_has_id_and_last_updated_first() {
    for t in sluice_fhir::R4_RESOURCE_TYPES {
        let params = supported_params(t);
        assert_eq!(params[..2], [("_id", ParamKind::Token), ("_lastUpdated", ParamKind::Date)], "{t}");
        let mut names: Vec<&str> = params.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), params.len(), "duplicate parameter on {t}");
    }
    assert!(supported_params("Foo").is_empty());
    assert!(supported_params("observation").is_empty());
    assert_eq!(supported_params("Device").len(), 2);
}

#[test]
fn kinds_have_fhir_codes() {
    assert_eq!(ParamKind::Token.as_str(), "token");
    assert_eq!(ParamKind::Date.as_str(), "date");
    assert_eq!(ParamKind::Reference.as_str(), "reference");
    assert_eq!(ParamKind::String.as_str(), "string");
    assert_eq!(serde_json::to_value(ParamKind::Reference).unwrap(), "reference");
}

#[test]
fn the_table_has_the_us_core_parameters() {
    use ParamKind::{Date as D, Reference as R, String as S, Token as T};
    let expected: &[(&str, &[(&str, ParamKind)])] = &[
        (
            "Observation",
            &[
                ("category", T),
                ("code", T),
                ("status", T),
                ("date", D),
                ("patient", R),
                ("subject", R),
                ("encounter", R),
            ],
        ),
        (
            "Condition",
            &[
                ("category", T),
                ("code", T),
                ("clinical-status", T),
                ("verification-status", T),
                ("onset-date", D),
                ("recorded-date", D),
                ("patient", R),
                ("subject", R),
                ("encounter", R),
            ],
        ),
        ("Encounter", &[("class", T), ("type", T), ("status", T), ("date", D), ("patient", R), ("subject", R)]),
        ("Procedure", &[("code", T), ("status", T), ("date", D), ("patient", R), ("subject", R)]),
        (
            "MedicationRequest",
            &[
                ("status", T),
                ("intent", T),
                ("authoredon", D),
                ("code", T),
                ("patient", R),
                ("subject", R),
                ("encounter", R),
            ],
        ),
        ("Immunization", &[("vaccine-code", T), ("status", T), ("date", D), ("patient", R)]),
        (
            "DiagnosticReport",
            &[("category", T), ("code", T), ("status", T), ("date", D), ("patient", R), ("subject", R)],
        ),
        ("AllergyIntolerance", &[("clinical-status", T), ("verification-status", T), ("code", T), ("patient", R)]),
        ("CarePlan", &[("category", T), ("status", T), ("patient", R), ("subject", R)]),
        ("CareTeam", &[("status", T), ("patient", R), ("subject", R)]),
        (
            "DocumentReference",
            &[("type", T), ("category", T), ("status", T), ("date", D), ("patient", R), ("subject", R)],
        ),
        ("Patient", &[("gender", T), ("birthdate", D), ("family", S), ("given", S), ("name", S), ("identifier", T)]),
        ("Claim", &[("patient", R), ("status", T)]),
        ("ExplanationOfBenefit", &[("patient", R), ("status", T)]),
        ("Practitioner", &[("name", S), ("identifier", T)]),
        ("Organization", &[("name", S), ("identifier", T)]),
    ];
    for (t, params) in expected {
        let supported = supported_params(t);
        for p in *params {
            assert!(supported.contains(p), "{t} lacks {p:?}: {supported:?}");
        }
    }
    let listed: Vec<&str> = expected.iter().map(|(t, _)| *t).collect();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    assert_eq!(types_with_specific_params(), sorted.as_slice());
    for t in types_with_specific_params() {
        assert!(supported_params(t).len() > 2, "{t}");
    }
}

#[test]
fn every_parameter_parses_with_every_modifier_of_its_kind() {
    for t in sluice_fhir::R4_RESOURCE_TYPES {
        for (name, kind) in supported_params(t) {
            let values: &[&str] = match kind {
                ParamKind::Token => &["x", "s|x", "|x", "s|"],
                ParamKind::Date => &["2024", "ge2024-05-03T10:00:00Z"],
                ParamKind::Reference => &["Patient/1", "1"],
                ParamKind::String => &["x"],
                ParamKind::Quantity => &["5.40", "gt5|http://unitsofmeasure.org|cm", "le-1e3||mg"],
            };
            let modifiers: &[&str] = match kind {
                ParamKind::Token => &["", ":not", ":text"],
                ParamKind::String => &["", ":exact", ":contains"],
                _ => &[""],
            };
            for v in values {
                for modifier in modifiers {
                    if kind == ParamKind::Reference && *v == "Patient/1" && !["patient", "subject"].contains(&name) {
                        continue;
                    }
                    q(&format!("{t}?{name}{modifier}={v}"));
                }
            }
            q(&format!("{t}?{name}:missing=true"));
        }
    }
}

// ---------------------------------------------------------------- the sample data

const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data/r4-100-patients-groups");

/// Every resource of the sample data, by type.
fn sample() -> BTreeMap<String, Vec<Value>> {
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for entry in std::fs::read_dir(DATA_DIR).unwrap_or_else(|e| panic!("cannot read {DATA_DIR}: {e}")) {
        let path = entry.expect("dir entry").path();
        if !path.to_string_lossy().ends_with(".ndjson.gz") {
            continue;
        }
        let reader = BufReader::new(flate2::read::GzDecoder::new(std::fs::File::open(&path).expect("open")));
        for line in reader.lines() {
            let line = line.expect("line");
            if line.trim().is_empty() {
                continue;
            }
            let resource: Value = serde_json::from_str(&line).expect("JSON");
            by_type.entry(resource["resourceType"].as_str().unwrap().to_string()).or_default().push(resource);
        }
    }
    by_type
}

fn count(data: &BTreeMap<String, Vec<Value>>, text: &str) -> usize {
    let query = q(text);
    data.get(&query.resource_type).map_or(0, |list| list.iter().filter(|r| query.matches(&j(r))).count())
}

#[test]
fn every_parameter_reaches_values_in_the_sample_data() {
    let data = sample();
    // Elements the sample does not have: no meta (the store stamps it), no Patient.active,
    // no Condition.category, no MedicationRequest.dosageInstruction.timing.event.
    let absent = [("Patient", "active"), ("Condition", "category"), ("MedicationRequest", "date")];
    for t in types_with_specific_params() {
        let Some(list) = data.get(*t) else { continue };
        for (name, _) in supported_params(t) {
            if name == "_lastUpdated" || absent.contains(&(*t, name)) {
                continue;
            }
            let n = count(&data, &format!("{t}?{name}:missing=false"));
            assert!(n > 0, "{t}?{name} reaches no value in the sample");
            assert!(n <= list.len());
        }
    }
}

#[test]
fn realistic_queries_on_the_sample_data() {
    let data = sample();
    let total = |t: &str| data[t].len();
    for (text, t) in [
        ("Observation?category=vital-signs", "Observation"),
        ("Observation?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory", "Observation"),
        ("Observation?code=http://loinc.org|8302-2", "Observation"),
        ("Observation?code:text=body", "Observation"),
        ("Observation?date=ge2015&date=lt2016", "Observation"),
        ("Condition?clinical-status=active", "Condition"),
        ("Condition?abatement-date:missing=true", "Condition"),
        ("Encounter?class=AMB", "Encounter"),
        ("Encounter?date=2015", "Encounter"),
        ("MedicationRequest?status=active", "MedicationRequest"),
        ("MedicationRequest?status=active,completed&authoredon=ge2018-07-01T00:00:00Z", "MedicationRequest"),
        ("Patient?gender=female", "Patient"),
        ("Patient?birthdate=lt1970", "Patient"),
        ("Procedure?date=ge2015", "Procedure"),
        ("Immunization?vaccine-code=http://hl7.org/fhir/sid/cvx|140", "Immunization"),
        ("Practitioner?name=christiansen", "Practitioner"),
    ] {
        let n = count(&data, text);
        assert!(n > 0 && n < total(t), "{text}: {n} of {}", total(t));
    }
    // Point values split exactly at a boundary: lt and ge partition, so do eb and sa of a
    // one-second search value at a second precision resource value.
    for (a, b, t) in [
        ("Patient?birthdate=lt1970", "Patient?birthdate=ge1970", "Patient"),
        ("Observation?date=lt2015", "Observation?date=ge2015", "Observation"),
        ("Condition?onset-date=lt2000-06", "Condition?onset-date=ge2000-06", "Condition"),
    ] {
        assert_eq!(count(&data, a) + count(&data, b), total(t), "{a} + {b}");
    }
    // Every Observation has a patient subject; one patient's share is below the total.
    assert_eq!(count(&data, "Observation?patient:missing=false"), total("Observation"));
    let someone = data["Patient"][0]["id"].as_str().unwrap();
    let theirs = count(&data, &format!("Observation?patient={someone}"));
    assert!(theirs > 0 && theirs < total("Observation"));
    assert_eq!(count(&data, &format!("Observation?subject=Patient/{someone}")), theirs);
}

// ---------------------------------------------------------------- pushdown (store bounds)

fn qs(texts: &[&str]) -> Vec<TypeQuery> {
    texts.iter().map(|t| q(t)).collect()
}

fn ms_of(text: &str) -> i64 {
    sluice_fhir::instant::to_millis(sluice_fhir::instant::parse(text).unwrap())
}

fn at(ms: i64) -> time::OffsetDateTime {
    sluice_fhir::instant::from_millis(ms)
}

/// An Observation as a store holds it: `meta.lastUpdated` stamped at millisecond precision.
fn stored_obs(id: &str, ms: i64) -> Value {
    json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "meta": {"versionId": "1", "lastUpdated": sluice_fhir::instant::format(at(ms))}
    })
}

/// Whether a store narrowed to `b` would read a resource last updated at `ms` with `id`
/// (comparing at millisecond precision, as the stores do).
fn within(b: &StoreBounds, ms: i64, id: &str) -> bool {
    let to_ms = sluice_fhir::instant::to_millis;
    b.after.is_none_or(|a| ms > to_ms(a))
        && b.until.is_none_or(|u| ms <= to_ms(u))
        && b.ids.as_ref().is_none_or(|ids| ids.contains(id))
}

/// The superset property: every resource some query matches is within the bounds, tried
/// at every edge of every date value of the queries and of the bounds (a few ms either side),
/// with every id the queries name and one they do not. Returns how many matched.
fn check_superset(texts: &[&str]) -> usize {
    let queries = qs(texts);
    let b = store_bounds(&queries);
    let mut instants = BTreeSet::new();
    let mut ids = BTreeSet::from(["o1".to_string(), "other".to_string()]);
    for c in queries.iter().flat_map(|q| &q.criteria) {
        match &c.test {
            Test::Date(values) => {
                for v in values {
                    instants.extend([v.start, v.end].iter().flat_map(|&x| x - 2..=x + 2));
                }
            }
            Test::Token { values, .. } => ids.extend(values.iter().filter_map(|v| v.code.clone())),
            _ => {}
        }
    }
    for edge in [b.after, b.until].into_iter().flatten() {
        let x = sluice_fhir::instant::to_millis(edge);
        instants.extend(x - 2..=x + 2);
    }
    instants.insert(ms_of("2024-06-01T12:00:00.123Z"));
    let mut matched = 0;
    for &ms in &instants {
        for id in &ids {
            if matches_any(&queries, &j(&stored_obs(id, ms))) {
                matched += 1;
                assert!(within(&b, ms, id), "{texts:?}: {id} at {} matches but is outside {b:?}", at(ms));
            }
        }
    }
    matched
}

fn id_set(ids: &[&str]) -> Option<BTreeSet<String>> {
    Some(ids.iter().map(|s| s.to_string()).collect())
}

#[test]
fn no_queries_no_bounds() {
    assert!(store_bounds(&[]).is_unbounded());
    assert!(store_bounds(&qs(&["Observation?status=final"])).is_unbounded());
    assert_eq!(store_bounds(&[]), StoreBounds::default());
}

#[test]
fn last_updated_prefixes_bound_the_window() {
    let day = |prefix: &str| store_bounds(&qs(&[&format!("Observation?_lastUpdated={prefix}2024-02-29")]));
    let (start, end) = (ms_of("2024-02-29T00:00:00Z"), ms_of("2024-03-01T00:00:00Z"));
    let b =
        |after: Option<i64>, until: Option<i64>| StoreBounds { after: after.map(at), until: until.map(at), ids: None };
    assert_eq!(day("eq"), b(Some(start - 1), Some(end - 1)));
    assert_eq!(day(""), day("eq"));
    assert_eq!(day("ne"), b(None, None));
    assert_eq!(day("gt"), b(Some(end - 1), None));
    assert_eq!(day("sa"), b(Some(end - 1), None));
    assert_eq!(day("ge"), b(Some(start - 1), None));
    assert_eq!(day("lt"), b(None, Some(start - 1)));
    assert_eq!(day("eb"), b(None, Some(start - 1)));
    assert_eq!(day("le"), b(None, Some(end - 1)));
    // The precision of the value sets the range: a second, with a zone.
    let sec = store_bounds(&qs(&["Observation?_lastUpdated=2024-05-03T10:11:12%2B02:00"]));
    let s = ms_of("2024-05-03T08:11:12Z");
    assert_eq!(sec, b(Some(s - 1), Some(s + 999)));
    let year = store_bounds(&qs(&["Observation?_lastUpdated=gt2023"]));
    assert_eq!(year, b(Some(ms_of("2024-01-01T00:00:00Z") - 1), None));
}

#[test]
fn criteria_intersect_values_and_queries_take_the_hull() {
    let ms = |t: &str| Some(at(ms_of(t)));
    // AND: the intersection.
    let and = store_bounds(&qs(&["Observation?_lastUpdated=ge2024-01&_lastUpdated=lt2024-03&status=final"]));
    assert_eq!((and.after, and.until), (ms("2023-12-31T23:59:59.999Z"), ms("2024-02-29T23:59:59.999Z")));
    // Values (OR): the hull.
    let or = store_bounds(&qs(&["Observation?_lastUpdated=2020,2022-06"]));
    assert_eq!((or.after, or.until), (ms("2019-12-31T23:59:59.999Z"), ms("2022-06-30T23:59:59.999Z")));
    // Queries (OR): the hull; one query without a bound opens that end.
    let two = store_bounds(&qs(&["Observation?_lastUpdated=2020", "Observation?_lastUpdated=2022"]));
    assert_eq!((two.after, two.until), (ms("2019-12-31T23:59:59.999Z"), ms("2022-12-31T23:59:59.999Z")));
    let open = store_bounds(&qs(&["Observation?_lastUpdated=2020", "Observation?_lastUpdated=ge2022"]));
    assert_eq!((open.after, open.until), (ms("2019-12-31T23:59:59.999Z"), None));
    let none = store_bounds(&qs(&["Observation?_lastUpdated=2020", "Observation?status=final"]));
    assert!(none.is_unbounded());
    // A query that matches nothing adds nothing; if none can match, nothing is read.
    let empty = store_bounds(&qs(&["Observation?_lastUpdated=ge2025&_lastUpdated=lt2024", "Observation?_id=a"]));
    assert_eq!(empty, StoreBounds { after: None, until: None, ids: id_set(&["a"]) });
    let nothing = store_bounds(&qs(&["Observation?_lastUpdated=ge2025&_lastUpdated=lt2024"]));
    assert_eq!(nothing.ids, id_set(&[]));
}

#[test]
fn what_bounds_nothing() {
    for text in [
        "Observation?_lastUpdated=ne2024",
        "Observation?_lastUpdated=ne2024,2023",
        "Observation?_lastUpdated:missing=false",
        "Observation?_lastUpdated:missing=true",
        "Observation?_id:not=o1",
        "Observation?_id:missing=false",
        "Observation?_id:text=o1",
        "Observation?status=final&code=8302-2&date=2024",
    ] {
        assert!(store_bounds(&qs(&[text])).is_unbounded(), "{text}");
    }
}

#[test]
fn id_criteria_bound_the_ids() {
    let ids = |texts: &[&str]| store_bounds(&qs(texts)).ids;
    assert_eq!(ids(&["Patient?_id=a,b"]), id_set(&["a", "b"]));
    assert_eq!(ids(&["Patient?_id=a,b&_id=b,c"]), id_set(&["b"]));
    assert_eq!(ids(&["Patient?_id=a", "Patient?_id=c&gender=male"]), id_set(&["a", "c"]));
    assert_eq!(ids(&["Patient?_id=a", "Patient?gender=male"]), None);
    assert_eq!(ids(&["Patient?_id=|a,http://x|b,http://x|"]), id_set(&["a"]), "only values without a system match");
    assert_eq!(ids(&["Patient?_id=http://x|b"]), id_set(&[]), "matches no id");
    assert_eq!(ids(&["Patient?_id=a&_id=b"]), id_set(&[]));
    let both = store_bounds(&qs(&["Observation?_id=o1&_lastUpdated=ge2024"]));
    assert_eq!((both.ids, both.after.is_some(), both.until), (id_set(&["o1"]), true, None));
}

#[test]
fn bounds_are_a_superset_of_what_matches() {
    let values = [
        "2024",
        "2024-02",
        "2024-02-29",
        "2024-06-01T12:00",
        "2024-06-01T12:00:00",
        "2024-06-01T12:00:00.1",
        "2024-06-01T12:00:00.12",
        "2024-06-01T12:00:00.123",
        "2024-06-01T12:00:00.123Z",
        "2024-06-01T14:00:00.123%2B02:00",
        "2024-06-01T12:00:00-05:30",
    ];
    for prefix in ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"] {
        for value in values {
            let text = format!("Observation?_lastUpdated={prefix}{value}");
            let matched = check_superset(&[&text]);
            assert!(matched > 0 || prefix == "eq" || prefix.is_empty(), "{text} matched nothing tried");
        }
    }
    for texts in [
        &["Observation?_lastUpdated=ge2024-01&_lastUpdated=lt2024-06-01T12:00:00.124Z"][..],
        &["Observation?_lastUpdated=lt2020,gt2024-06-01T12:00:00.122Z"],
        &["Observation?_lastUpdated=le2024-06-01T12:00:00.123Z&_id=o1,o2"],
        &["Observation?_lastUpdated=ne2024-06-01T12:00:00.123Z", "Observation?_id=o1"],
        &["Observation?_lastUpdated=sa2024-06-01T12:00:00.122Z", "Observation?_lastUpdated=eb2024-06-01T12:00:00.124Z"],
        &["Observation?_id=|o1,o2&status=final", "Observation?_id=other&_lastUpdated=2024-06"],
        &["Observation?_id:not=o1&_lastUpdated=ge2024-06-01T12:00:00.123Z"],
        &["Observation?_lastUpdated:missing=false&_lastUpdated=2024-06-01T12:00:00.123Z"],
    ] {
        assert!(check_superset(texts) > 0, "{texts:?} matched nothing tried");
    }
}

/// The bounds are tight at both ends: the first and last millisecond inside match, the
/// ones just outside do not (so a store comparing at milliseconds loses nothing and reads
/// nothing extra).
#[test]
fn bounds_are_exact_at_the_edges() {
    let to_ms = sluice_fhir::instant::to_millis;
    for text in [
        "Observation?_lastUpdated=2024-06-01T12:00",
        "Observation?_lastUpdated=ge2024-06-01T12:00:00.5",
        "Observation?_lastUpdated=gt2024-06-01T12:00:00.5",
        "Observation?_lastUpdated=le2024-06",
        "Observation?_lastUpdated=lt2024-06",
        "Observation?_lastUpdated=sa2024&_lastUpdated=eb2026",
    ] {
        let queries = qs(&[text]);
        let b = store_bounds(&queries);
        assert!(b.after.is_some() || b.until.is_some(), "{text}");
        if let Some(after) = b.after {
            let a = to_ms(after);
            assert!(!matches_any(&queries, &j(&stored_obs("o1", a))), "{text}: {a} is excluded");
            assert!(matches_any(&queries, &j(&stored_obs("o1", a + 1))), "{text}: {a} + 1 is included");
        }
        if let Some(until) = b.until {
            let u = to_ms(until);
            assert!(matches_any(&queries, &j(&stored_obs("o1", u))), "{text}: {u} is included");
            assert!(!matches_any(&queries, &j(&stored_obs("o1", u + 1))), "{text}: {u} + 1 is excluded");
        }
    }
}

// ---------------------------------------------------------------- quantities (exact decimals)

/// An Observation whose `valueQuantity.value` is written as `value` (exact text).
fn quantity_obs(value: &str) -> Json<'static> {
    let text = format!(
        r#"{{"resourceType":"Observation","valueQuantity":{{"value":{value},"unit":"cm","system":"http://unitsofmeasure.org","code":"cm"}}}}"#
    );
    Json::parse(&text).unwrap().into_owned()
}

fn qm(query: &str, value: &str) -> bool {
    q(&format!("Observation?value-quantity={query}")).matches(&quantity_obs(value))
}

#[test]
fn quantities_compare_as_exact_decimals_never_through_f64() {
    // 5.4000000000000001 and 5.40 are the same f64; they are not the same decimal.
    assert!(qm("gt5.40", "5.4000000000000001"));
    assert!(!qm("gt5.40", "5.40"));
    assert!(!qm("gt5.40", "5.4"));
    assert!(qm("ge5.40", "5.4"));
    assert!(qm("lt5.4000000000000001", "5.40"));
    assert!(!qm("le5.3999999999999999", "5.4"));
    assert!(qm("gt123456789012345678901234567889", "123456789012345678901234567890"));
    assert!(!qm("gt123456789012345678901234567890", "123456789012345678901234567890"));
    assert!(qm("sa5", "5.0000000000000000001") && qm("eb5", "4.9999999999999999999"));
    // eq and ne use the precision of the search number: 5.40 is [5.395, 5.405).
    assert!(qm("5.40", "5.4000000000000001"));
    assert!(qm("eq5.40", "5.395"));
    assert!(!qm("eq5.40", "5.405"));
    assert!(qm("5.4", "5.44") && !qm("5.40", "5.44"));
    assert!(qm("ne5.40", "5.41") && !qm("ne5.40", "5.4"));
    assert!(qm("1e2", "149") && !qm("1e2", "150"));
    assert!(qm("-0.0", "0") && qm("0", "-0.0"));
    // Several values are OR-ed; units narrow.
    assert!(qm("1,5.4", "5.4"));
    assert!(qm("5.4|http://unitsofmeasure.org|cm", "5.4"));
    assert!(!qm("5.4|http://unitsofmeasure.org|mm", "5.4"));
    assert!(qm("5.4||cm", "5.4") && !qm("5.4||kg", "5.4"));
    // Not a number at the path, or no value: no match.
    let text = Json::parse(r#"{"resourceType":"Observation","valueQuantity":{"value":"5.4"}}"#).unwrap();
    assert!(!q("Observation?value-quantity=5.4").matches(&text));
    assert!(q("Observation?value-quantity:missing=false").matches(&j(&observation())));
    assert!(!q("Observation?value-quantity:missing=true").matches(&j(&observation())));
}

#[test]
fn component_quantities_are_searched_too() {
    let text = r#"{"resourceType":"Observation","component":[{"valueQuantity":{"value":120}},{"valueQuantity":{"value":80.0}}]}"#;
    let obs = Json::parse(text).unwrap();
    assert!(q("Observation?component-value-quantity=gt119").matches(&obs));
    assert!(q("Observation?component-value-quantity=80").matches(&obs));
    assert!(!q("Observation?component-value-quantity=gt120").matches(&obs));
}

#[test]
fn bad_quantities_are_refused_with_reasons() {
    for bad in ["gtabc", "ap5", "5|x", "5|a|b|c", "xx5", "5.4.3", "1e99999", "0x10", ".5", "5,"] {
        let err = parse_query(&format!("Observation?value-quantity={bad}")).unwrap_err();
        assert!(matches!(err, SearchError::InvalidValue { .. }), "{bad}: {err}");
    }
    let err = parse_query("Observation?value-quantity:exact=5").unwrap_err();
    assert!(matches!(err, SearchError::UnsupportedModifier { .. }), "{err}");
}
