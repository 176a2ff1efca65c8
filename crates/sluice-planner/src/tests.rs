//! Unit tests for the planner: one group per rule.

use serde_json::{Value as Json, json};
use sluice_fhir::{Issue, IssueCode, Severity};

use super::*;

// ---------------------------------------------------------------- helpers

/// The exact tree of a `serde_json` value (written out and read back).
fn j(resource: &Json) -> sluice_json::Json<'static> {
    sluice_json::Json::parse(&resource.to_string()).unwrap().into_owned()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn get(level: Level, list: &[(&str, &str)]) -> Result<ExportPlan, Vec<Issue>> {
    let query = pairs(list);
    plan(&KickoffRequest::get(level, &query))
}

fn get_lenient(level: Level, list: &[(&str, &str)]) -> Result<ExportPlan, Vec<Issue>> {
    let query = pairs(list);
    let mut req = KickoffRequest::get(level, &query);
    req.prefer = Some("respond-async, handling=lenient");
    plan(&req)
}

fn ok(r: Result<ExportPlan, Vec<Issue>>) -> ExportPlan {
    match r {
        Ok(p) => p,
        Err(issues) => panic!("expected a plan, got {issues:#?}"),
    }
}

fn err(r: Result<ExportPlan, Vec<Issue>>) -> Vec<Issue> {
    match r {
        Ok(p) => panic!("expected errors, got {p:#?}"),
        Err(issues) => {
            assert!(!issues.is_empty());
            for i in &issues {
                assert_eq!(i.severity, Severity::Error, "{i:?}");
                assert!(i.expression.is_some(), "every error names its parameter: {i:?}");
            }
            issues
        }
    }
}

fn get_ok(level: Level, list: &[(&str, &str)]) -> ExportPlan {
    ok(get(level, list))
}

fn get_err(level: Level, list: &[(&str, &str)]) -> Vec<Issue> {
    err(get(level, list))
}

fn post_body(level: Level, body: &Json) -> Result<ExportPlan, Vec<Issue>> {
    let bytes = serde_json::to_vec(body).unwrap();
    plan(&KickoffRequest::post(level, &bytes))
}

fn parameters(entries: Json) -> Json {
    json!({"resourceType": "Parameters", "parameter": entries})
}

fn group() -> Level {
    Level::Group("g1".to_string())
}

/// Asserts that exactly one issue has this expression and code, and that its diagnostics
/// mention every fragment; returns it.
fn one<'a>(issues: &'a [Issue], expression: &str, code: IssueCode, fragments: &[&str]) -> &'a Issue {
    let found: Vec<&Issue> = issues.iter().filter(|i| i.expression.as_deref() == Some(expression)).collect();
    assert_eq!(found.len(), 1, "one issue at {expression} expected in {issues:#?}");
    let issue = found[0];
    assert_eq!(issue.code, code, "{issue:?}");
    for f in fragments {
        assert!(issue.diagnostics.contains(f), "{:?} should mention {f:?}", issue.diagnostics);
    }
    issue
}

fn only(types: &[&str]) -> TypeSelection {
    TypeSelection::Only(types.iter().map(|t| t.to_string()).collect())
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn instant(s: &str) -> OffsetDateTime {
    sluice_fhir::instant::parse(s).unwrap()
}

// ---------------------------------------------------------------- defaults

#[test]
fn no_parameters_gives_the_default_plan_at_every_level() {
    for level in [Level::System, Level::Patient, group()] {
        let p = get_ok(level.clone(), &[]);
        assert_eq!(p, ExportPlan::new(level));
        assert_eq!((p.output_format, &p.types), (OutputFormat::Ndjson, &TypeSelection::All), "every type as ndjson");
        assert!(p.since.is_none() && p.until.is_none() && p.patients.is_none() && p.elements.is_none());
        assert!(p.type_filters.is_empty() && p.ignored.is_empty(), "no filters, nothing ignored");
        assert!(!(p.latest_provenance || p.allow_partial_manifests || p.organize_by_patient || p.lenient));
    }
}

#[test]
fn level_names_and_patient_basis() {
    assert_eq!(Level::System.name(), "system");
    assert_eq!(Level::Patient.name(), "patient");
    assert_eq!(group().name(), "group");
    assert!(!Level::System.is_patient_based());
    assert!(Level::Patient.is_patient_based());
    assert!(group().is_patient_based());
}

// ---------------------------------------------------------------- _outputFormat

const NDJSON_SPELLINGS: &[&str] = &[
    "application/fhir+ndjson",
    "application/ndjson",
    "ndjson",
    // Aidbox's documented values
    "application/ndjson+fhir",
    // case-insensitive, whitespace-tolerant, '+' sent as a space
    "APPLICATION/FHIR+NDJSON",
    "Application/Fhir+NDJson",
    "  application/fhir+ndjson ",
    "application/fhir ndjson",
    "NDJSON",
];

const GZIP_SPELLINGS: &[&str] = &[
    "application/fhir+ndjson+gzip",
    "application/ndjson+gzip",
    "ndjson+gzip",
    "gzip",
    "ndjson.gz",
    "application/gzip",
    // Aidbox's documented values
    "application/fhir+gzip+ndjson",
    "application/ndjson+fhir+gzip",
    "application/ndjson+gzip+fhir",
    "application/gzip+fhir+ndjson",
    "application/gzip+ndjson+fhir",
    // case, spaces
    "APPLICATION/FHIR+NDJSON+GZIP",
    "NDJSON.GZ",
    "GZIP",
    "application/fhir ndjson gzip",
    "ndjson gzip",
];

#[test]
fn output_format_ndjson_spellings() {
    for s in NDJSON_SPELLINGS {
        assert_eq!(OutputFormat::parse(s), Some(OutputFormat::Ndjson), "{s}");
        let p = get_ok(Level::System, &[("_outputFormat", s)]);
        assert_eq!(p.output_format, OutputFormat::Ndjson, "{s}");
    }
}

#[test]
fn output_format_gzip_spellings() {
    for s in GZIP_SPELLINGS {
        assert_eq!(OutputFormat::parse(s), Some(OutputFormat::NdjsonGz), "{s}");
        let p = get_ok(Level::Patient, &[("_outputFormat", s)]);
        assert_eq!(p.output_format, OutputFormat::NdjsonGz, "{s}");
    }
}

#[test]
fn output_format_rejects_everything_else() {
    for s in [
        "",
        "json",
        "csv",
        "parquet",
        "application/fhir+json",
        "application/json",
        "text/ndjson",
        "application/x-ndjson",
        "application/fhir",
        "application/fhir+gzip",
        "fhir",
        "ndjson+ndjson",
        "application/fhir+ndjson+gzip+gzip",
        "ndjson.gzip",
        "application/ndjson.gz",
        "application/fhir+ndjson; charset=utf-8",
    ] {
        assert_eq!(OutputFormat::parse(s), None, "{s}");
        let issues = get_err(Level::System, &[("_outputFormat", s)]);
        assert_eq!(issues.len(), 1);
        one(
            &issues,
            "_outputFormat",
            IssueCode::NotSupported,
            &[&format!("'{s}'"), "application/fhir+ndjson", "ndjson.gz"],
        );
    }
}

#[test]
fn output_format_helpers() {
    assert_eq!(OutputFormat::default(), OutputFormat::Ndjson);
    assert_eq!(OutputFormat::Ndjson.extension(), "ndjson");
    assert_eq!(OutputFormat::NdjsonGz.extension(), "ndjson.gz");
    assert!(!OutputFormat::Ndjson.is_gzip());
    assert!(OutputFormat::NdjsonGz.is_gzip());
    assert_eq!(OutputFormat::Ndjson.content_type(), "application/fhir+ndjson");
    assert_eq!(OutputFormat::NdjsonGz.content_type(), "application/fhir+ndjson");
    assert_eq!(OutputFormat::Ndjson.content_encoding(), None);
    assert_eq!(OutputFormat::NdjsonGz.content_encoding(), Some("gzip"));
}

#[test]
fn output_format_repeated_is_an_error_even_when_equal() {
    let issues = get_err(Level::System, &[("_outputFormat", "ndjson"), ("_outputFormat", "ndjson")]);
    one(&issues, "_outputFormat", IssueCode::Invalid, &["2 times", "single value"]);
}

// ---------------------------------------------------------------- _type

#[test]
fn type_comma_list() {
    let p = get_ok(Level::System, &[("_type", "Patient,Observation,Condition")]);
    assert_eq!(p.types, only(&["Patient", "Observation", "Condition"]));
}

#[test]
fn type_repeated_and_mixed_accumulates_in_order() {
    let p = get_ok(Level::System, &[("_type", "Observation"), ("_type", "Patient,Encounter"), ("_type", "Condition")]);
    assert_eq!(p.types, only(&["Observation", "Patient", "Encounter", "Condition"]));
}

#[test]
fn type_trims_whitespace_skips_empty_entries_and_dedups() {
    let p = get_ok(Level::System, &[("_type", " Patient , ,Observation,,"), ("_type", "Patient"), ("_type", "")]);
    assert_eq!(p.types, only(&["Patient", "Observation"]));
}

#[test]
fn type_with_only_empty_entries_means_all() {
    for v in ["", " ", ",", " , ,"] {
        assert_eq!(get_ok(Level::System, &[("_type", v)]).types, TypeSelection::All, "{v:?}");
    }
}

#[test]
fn type_unknown_is_an_error_naming_it() {
    let issues = get_err(Level::System, &[("_type", "Patient,Foo")]);
    assert_eq!(issues.len(), 1);
    one(&issues, "_type", IssueCode::NotSupported, &["'Foo'", "R4 resource type"]);
}

#[test]
fn type_each_unknown_type_is_reported() {
    let issues = get_err(Level::System, &[("_type", "Foo,Patient"), ("_type", "Bar")]);
    assert_eq!(issues.len(), 2);
    assert!(issues[0].diagnostics.contains("'Foo'"));
    assert!(issues[1].diagnostics.contains("'Bar'"));
}

#[test]
fn type_is_case_sensitive_with_a_hint() {
    let issues = get_err(Level::System, &[("_type", "observation")]);
    one(&issues, "_type", IssueCode::NotSupported, &["'observation'", "did you mean Observation?"]);
}

#[test]
fn type_rejects_non_r4_types() {
    // R5-only, abstract and Aidbox-specific names are not standard R4 types.
    for t in ["Resource", "DomainResource", "Requirements", "AidboxJob", "User"] {
        let issues = get_err(Level::System, &[("_type", t)]);
        one(&issues, "_type", IssueCode::NotSupported, &[t]);
    }
}

#[test]
fn type_group_is_fine_at_system_level() {
    let p = get_ok(Level::System, &[("_type", "Group,Patient")]);
    assert_eq!(p.types, only(&["Group", "Patient"]));
}

#[test]
fn type_group_is_rejected_at_patient_and_group_level_d9() {
    for level in [Level::Patient, group()] {
        let name = level.name();
        let issues = get_err(level, &[("_type", "Patient,Group")]);
        assert_eq!(issues.len(), 1);
        one(
            &issues,
            "_type",
            IssueCode::NotSupported,
            &["'Group'", &format!("{name}-level"), "not data about its patients", "$export?_type=Group"],
        );
    }
}

#[test]
fn type_outside_the_compartment_is_accepted_at_patient_level_d8() {
    let p = get_ok(Level::Patient, &[("_type", "Practitioner,Organization,Medication")]);
    assert_eq!(p.types, only(&["Practitioner", "Organization", "Medication"]));
}

// ---------------------------------------------------------------- _since / _until

#[test]
fn since_accepts_instant_datetime_and_date_forms() {
    for (raw, expect) in [
        ("2024-05-03T10:11:12Z", "2024-05-03T10:11:12Z"),
        ("2024-05-03T10:11:12.123Z", "2024-05-03T10:11:12.123Z"),
        ("2024-05-03T10:11:12+02:00", "2024-05-03T08:11:12Z"),
        ("2024-05-03T10:11:12 02:00", "2024-05-03T08:11:12Z"),
        ("2024-05-03T10:11:12-05:00", "2024-05-03T15:11:12Z"),
        ("2024-05-03T10:11:12", "2024-05-03T10:11:12Z"),
        ("2024-05-03T10:11", "2024-05-03T10:11:00Z"),
        ("2024-05-03", "2024-05-03T00:00:00Z"),
        ("2024-05", "2024-05-01T00:00:00Z"),
        ("2024", "2024-01-01T00:00:00Z"),
    ] {
        let p = get_ok(Level::System, &[("_since", raw)]);
        assert_eq!(p.since, Some(instant(expect)), "{raw}");
        let p = get_ok(Level::Patient, &[("_until", raw)]);
        assert_eq!(p.until, Some(instant(expect)), "{raw}");
    }
}

#[test]
fn since_and_until_reject_garbage() {
    for name in ["_since", "_until"] {
        for bad in ["", "yesterday", "2024-13-01", "2024-02-30", "20240101", "1714730000", "now"] {
            let issues = get_err(Level::System, &[(name, bad)]);
            assert_eq!(issues.len(), 1, "{name}={bad}");
            one(&issues, name, IssueCode::Invalid, &[name, &format!("'{bad}'"), "2024-05-01"]);
        }
    }
}

#[test]
fn since_later_than_until_is_an_error() {
    let issues = get_err(Level::System, &[("_since", "2024-06-01"), ("_until", "2024-05-01")]);
    assert_eq!(issues.len(), 1);
    one(
        &issues,
        "_until",
        IssueCode::Value,
        &["_since (2024-06-01T00:00:00.000Z)", "_until (2024-05-01T00:00:00.000Z)"],
    );
}

#[test]
fn since_equal_to_or_before_until_is_fine() {
    let p = get_ok(Level::System, &[("_since", "2024-05-01"), ("_until", "2024-05-01T00:00:00Z")]);
    assert_eq!(p.since, p.until);
    let p = get_ok(Level::System, &[("_until", "2024-06-01"), ("_since", "2024-05-01")]);
    assert_eq!(p.since, Some(instant("2024-05-01")));
    assert_eq!(p.until, Some(instant("2024-06-01")));
}

#[test]
fn since_repeated_is_an_error() {
    let issues = get_err(Level::System, &[("_since", "2024-01-01"), ("_since", "2024-02-01")]);
    assert_eq!(issues.len(), 1);
    one(&issues, "_since", IssueCode::Invalid, &["_since", "2 times", "'2024-01-01'", "'2024-02-01'"]);
}

#[test]
fn repeated_single_valued_parameters_use_the_first_when_lenient() {
    let p = ok(get_lenient(
        Level::System,
        &[("_since", "2024-01-01"), ("_since", "2024-02-01"), ("_outputFormat", "gzip"), ("_outputFormat", "x")],
    ));
    assert_eq!(p.since, Some(instant("2024-01-01")));
    assert_eq!(p.output_format, OutputFormat::NdjsonGz);
    assert_eq!(p.ignored.len(), 2);
    assert!(p.ignored[0].diagnostics.contains("The first one is used"));
}

// ---------------------------------------------------------------- patient (D3)

#[test]
fn patient_get_at_patient_level_takes_ids_and_references() {
    let p = get_ok(Level::Patient, &[("patient", "123, Patient/456,,123"), ("patient", "a-b.c")]);
    assert_eq!(p.patients, Some(strings(&["123", "456", "a-b.c"])));
    assert!(p.has_patient_filter());
}

#[test]
fn patient_get_rejects_bad_ids() {
    let too_long = "7".repeat(65);
    for bad in ["Practitioner/1", "Patient/", "a b", "Patient/1/_history/2", "x_y", &too_long] {
        let issues = get_err(Level::Patient, &[("patient", bad)]);
        assert_eq!(issues.len(), 1, "{bad}");
        one(&issues, "patient", IssueCode::Invalid, &[&format!("'{bad}'"), "Patient/123"]);
    }
}

#[test]
fn patient_get_without_any_id_is_an_error() {
    for v in ["", " , "] {
        let issues = get_err(Level::Patient, &[("patient", v)]);
        one(&issues, "patient", IssueCode::Required, &["names no patient"]);
    }
}

#[test]
fn patient_get_at_system_level_is_an_error() {
    let issues = get_err(Level::System, &[("patient", "123")]);
    assert_eq!(issues.len(), 1);
    one(&issues, "patient", IssueCode::NotSupported, &["'123'", "system-level", "Patient/$export"]);
}

#[test]
fn patient_get_at_group_level_says_to_use_post() {
    let issues = get_err(group(), &[("patient", "123"), ("patient", "456")]);
    assert_eq!(issues.len(), 1);
    one(
        &issues,
        "patient",
        IssueCode::NotSupported,
        &["'123', '456'", "GET group-level", "use POST", "valueReference"],
    );
}

#[test]
fn patient_post_at_patient_and_group_level_takes_references() {
    for level in [Level::Patient, group()] {
        let body = parameters(json!([
            {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
            {"name": "patient", "valueReference": {"reference": "Patient/p2"}},
            {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
        ]));
        let p = ok(post_body(level.clone(), &body));
        assert_eq!(p.patients, Some(strings(&["p1", "p2"])), "{level:?}");
    }
}

#[test]
fn patient_post_rejects_non_patient_references_and_strings() {
    let body = parameters(json!([
        {"name": "patient", "valueReference": {"reference": "Practitioner/1"}},
        {"name": "patient", "valueString": "Patient/p1"},
        {"name": "patient", "valueReference": {"reference": "p1"}},
        {"name": "patient", "valueReference": {"display": "no reference"}},
    ]));
    let issues = err(post_body(group(), &body));
    assert_eq!(issues.len(), 4, "{issues:#?}");
    assert!(issues.iter().all(|i| i.expression.as_deref() == Some("patient")));
    for fragment in ["'Practitioner/1'", "not a valueReference", "reference 'p1'", "without a reference"] {
        assert!(issues.iter().any(|i| i.diagnostics.contains(fragment)), "{fragment}: {issues:#?}");
    }
}

#[test]
fn patient_post_at_system_level_is_an_error() {
    let body = parameters(json!([{"name": "patient", "valueReference": {"reference": "Patient/p1"}}]));
    let issues = err(post_body(Level::System, &body));
    one(&issues, "patient", IssueCode::NotSupported, &["Patient/p1", "system-level"]);
}

// ---------------------------------------------------------------- _elements

#[test]
fn elements_keeps_names_and_typed_names_as_given() {
    let p = get_ok(
        Level::System,
        &[("_elements", "id, Patient.name,,birthDate"), ("_elements", "Observation.valueQuantity,id")],
    );
    assert_eq!(p.elements, Some(strings(&["id", "Patient.name", "birthDate", "Observation.valueQuantity"])));
}

#[test]
fn elements_empty_means_none() {
    assert_eq!(get_ok(Level::System, &[("_elements", " , ")]).elements, None);
}

#[test]
fn elements_rejects_nested_paths() {
    for bad in ["Patient.name.given", "name.given", "a.b.c.d"] {
        let issues = get_err(Level::System, &[("_elements", bad)]);
        one(&issues, "_elements", IssueCode::NotSupported, &[bad, "nested paths are not supported"]);
    }
}

#[test]
fn elements_rejects_unknown_types_and_bad_names() {
    let issues = get_err(Level::System, &[("_elements", "Foo.name")]);
    one(&issues, "_elements", IssueCode::NotSupported, &["'Foo.name'", "R4 resource type"]);
    for bad in ["Patient", "Patient.", ".name", "Patient.Name", "na-me", "1abc"] {
        let issues = get_err(Level::System, &[("_elements", bad)]);
        one(&issues, "_elements", IssueCode::Invalid, &[&format!("'{bad}'"), "element name", "Patient.name"]);
    }
}

// ---------------------------------------------------------------- v3: organizeOutputBy, allowPartialManifests

#[test]
fn allow_partial_manifests_is_a_boolean_flag() {
    for (value, want) in [("true", true), ("TRUE", true), ("false", false), ("FALSE", false), ("", false)] {
        let p = get_ok(Level::System, &[("allowPartialManifests", value)]);
        assert_eq!(p.allow_partial_manifests, want, "{value}");
        assert!(p.ignored.is_empty());
    }
    assert!(!get_ok(Level::System, &[]).allow_partial_manifests);
}

#[test]
fn organize_output_by_patient_at_patient_and_group_level() {
    for level in [Level::Patient, Level::Group("g".into())] {
        let p = get_ok(level.clone(), &[("organizeOutputBy", "Patient"), ("_type", "Patient,Observation")]);
        assert!(p.organize_by_patient, "{level:?}");
        assert_eq!(p.types, only(&["Patient", "Observation"]));
    }
    let p = get_ok(Level::Patient, &[("organizeOutputBy", "")]);
    assert!(!p.organize_by_patient);
}

#[test]
fn organize_output_by_refuses_other_types_system_level_and_types_outside_the_compartment() {
    let issues = get_err(Level::Patient, &[("organizeOutputBy", "Encounter")]);
    one(&issues, "organizeOutputBy", IssueCode::NotSupported, &["'Encounter'", "Patient only"]);
    let issues = get_err(Level::Patient, &[("organizeOutputBy", "patient")]);
    one(&issues, "organizeOutputBy", IssueCode::NotSupported, &["'patient'"]);
    let issues = get_err(Level::System, &[("organizeOutputBy", "Patient")]);
    one(&issues, "organizeOutputBy", IssueCode::NotSupported, &["patient and group level", "Patient/$export"]);
    let issues =
        get_err(Level::Patient, &[("organizeOutputBy", "Patient"), ("_type", "Patient,Practitioner,Observation")]);
    one(&issues, "_type", IssueCode::NotSupported, &["Practitioner", "outside the Patient compartment"]);
}

#[test]
fn organize_output_by_problems_are_warnings_when_lenient() {
    let p = ok(get_lenient(
        Level::Patient,
        &[("organizeOutputBy", "Patient"), ("_type", "Patient,Practitioner,Observation")],
    ));
    assert!(p.organize_by_patient);
    assert_eq!(p.types, only(&["Patient", "Observation"]));
    assert_eq!(p.ignored.len(), 1);
    assert_eq!(p.ignored[0].severity, Severity::Warning);
    assert!(p.ignored[0].diagnostics.contains("Practitioner"), "{:?}", p.ignored[0]);
    let p = ok(get_lenient(Level::System, &[("organizeOutputBy", "Patient")]));
    assert!(!p.organize_by_patient);
    assert_eq!(p.ignored.len(), 1);
    assert_eq!(p.ignored[0].expression.as_deref(), Some("organizeOutputBy"));
    assert!(p.ignored[0].diagnostics.contains("Ignored"), "{:?}", p.ignored[0]);
}

#[test]
fn allow_partial_manifests_must_be_a_boolean() {
    let issues = get_err(Level::System, &[("allowPartialManifests", "maybe")]);
    one(&issues, "allowPartialManifests", IssueCode::Invalid, &["'maybe'", "true or false"]);
}

#[test]
fn repeated_single_valued_unsupported_parameters_are_errors() {
    let issues = get_err(Level::System, &[("allowPartialManifests", "false"), ("allowPartialManifests", "false")]);
    one(&issues, "allowPartialManifests", IssueCode::Invalid, &["2 times"]);
}

// ---------------------------------------------------------------- includeAssociatedData (D14)

#[test]
fn latest_provenance_is_accepted_from_get_and_post() {
    const LATEST: &str = "LatestProvenanceResources";
    for level in [Level::System, Level::Patient, group()] {
        assert!(get_ok(level.clone(), &[("includeAssociatedData", LATEST)]).latest_provenance);
        assert!(!get_ok(level.clone(), &[]).latest_provenance);
    }
    let p = get_ok(Level::System, &[("includeAssociatedData", " , LatestProvenanceResources,"), ("_type", "Patient")]);
    assert!(p.latest_provenance && p.ignored.is_empty());
    let p = get_ok(Level::Patient, &[("includeAssociatedData", LATEST), ("includeAssociatedData", LATEST)]);
    assert!(p.latest_provenance);
    for key in ["valueCode", "valueString"] {
        let body = parameters(json!([{"name": "includeAssociatedData", key: LATEST}]));
        let p = ok(post_body(group(), &body));
        assert!(p.latest_provenance, "{key}");
    }
}

#[test]
fn other_associated_data_codes_are_refused_or_reported() {
    for (code, why) in [
        ("RelevantProvenanceResources", "only the latest version"),
        ("_myCustomData", "implementation-specific"),
        ("latestprovenanceresources", "case-sensitive"),
        ("Everything", "code system"),
    ] {
        let issues = get_err(Level::System, &[("includeAssociatedData", code)]);
        one(&issues, "includeAssociatedData", IssueCode::NotSupported, &[code, why, "LatestProvenanceResources"]);
    }
    // Lenient: the supported code is kept, the other one reported.
    let p = ok(get_lenient(
        Level::System,
        &[("includeAssociatedData", "RelevantProvenanceResources,LatestProvenanceResources")],
    ));
    assert!(p.latest_provenance);
    assert_eq!(p.ignored.len(), 1);
    let w = &p.ignored[0];
    assert_eq!((w.severity, w.code), (Severity::Warning, IssueCode::NotSupported));
    assert!(w.diagnostics.contains("RelevantProvenanceResources") && w.diagnostics.contains("Ignored"), "{w:?}");
    let p = ok(get_lenient(Level::System, &[("includeAssociatedData", "RelevantProvenanceResources")]));
    assert!(!p.latest_provenance);
    assert_eq!(p.ignored.len(), 1);
}

#[test]
fn latest_provenance_adds_provenance_to_the_types() {
    let available = ["Patient", "Observation", "Provenance", "Practitioner", "Group"];
    let with = |level: Level, q: &[(&str, &str)]| {
        let mut list = q.to_vec();
        list.push(("includeAssociatedData", "LatestProvenanceResources"));
        get_ok(level, &list)
    };
    let p = with(Level::System, &[("_type", "Patient,Observation")]);
    assert_eq!(p.resolve_types(available), strings(&["Observation", "Patient", "Provenance"]));
    assert_eq!(p.provenance_targets(), Some(&strings(&["Patient", "Observation"])[..]));
    let p = get_ok(Level::System, &[("_type", "Patient,Observation")]);
    assert_eq!(p.resolve_types(available), strings(&["Observation", "Patient"]));
    assert_eq!(p.provenance_targets(), None);
    // Provenance asked for itself, or every type: not restricted.
    assert_eq!(with(Level::System, &[("_type", "Patient,Provenance")]).provenance_targets(), None);
    let p = with(Level::System, &[]);
    assert_eq!(p.resolve_types(available), strings(&["Group", "Observation", "Patient", "Practitioner", "Provenance"]));
    assert_eq!(p.provenance_targets(), None);
    // Patient and group level: the compartments select the Provenance.
    for level in [Level::Patient, group()] {
        let p = with(level, &[("_type", "Observation")]);
        assert_eq!(p.resolve_types(available), strings(&["Observation", "Provenance"]));
        assert_eq!(p.provenance_targets(), None);
    }
    // A `_typeFilter` may narrow the Provenance the parameter adds.
    let p = with(Level::System, &[("_type", "Patient"), ("_typeFilter", "Provenance?_id=a")]);
    assert!(p.type_filter("Provenance").is_some());
}

#[test]
fn provenance_targets_are_matched_by_reference_type() {
    let p = get_ok(
        Level::System,
        &[("_type", "Patient,Observation"), ("includeAssociatedData", "LatestProvenanceResources")],
    );
    let prov = |targets: Json| json!({"resourceType": "Provenance", "id": "x", "target": targets});
    for (targets, kept) in [
        (json!([{"reference": "Patient/1"}]), true),
        (json!([{"reference": "Practitioner/1"}, {"reference": "Observation/2/_history/3"}]), true),
        (json!([{"reference": "https://host/fhir/Observation/2"}]), true),
        (json!([{"type": "Patient", "identifier": {"value": "1"}}]), true),
        (json!([{"reference": "Practitioner/1"}]), false),
        (json!([{"reference": "#contained"}, {"reference": "urn:uuid:1234"}]), false),
        (json!([]), false),
    ] {
        assert_eq!(p.keeps("Provenance", &j(&prov(targets.clone()))), kept, "{targets}");
    }
    assert!(!p.keeps("Provenance", &j(&json!({"resourceType": "Provenance"}))));
    assert!(p.keeps("Patient", &j(&json!({"resourceType": "Patient"}))));
}

// ---------------------------------------------------------------- _typeFilter (D14)

/// The `_typeFilter` queries of a plan as text, per type.
fn filters(p: &ExportPlan) -> Vec<(&str, Vec<&str>)> {
    p.type_filters.iter().map(|(t, qs)| (t.as_str(), qs.iter().map(|q| q.query.as_str()).collect())).collect()
}

fn medication_request(status: &str, authored: &str) -> Json {
    json!({"resourceType": "MedicationRequest", "status": status, "authoredOn": authored})
}

#[test]
fn type_filter_single_query() {
    let p = get_ok(Level::System, &[("_typeFilter", "Observation?status=final")]);
    assert_eq!(filters(&p), [("Observation", vec!["Observation?status=final"])]);
    assert!(p.ignored.is_empty());
    assert_eq!(p.types, TypeSelection::All);
    let q = &p.type_filter("Observation").unwrap()[0];
    assert_eq!(q.resource_type, "Observation");
    assert_eq!(q.criteria.len(), 1);
    assert!(p.type_filter("Condition").is_none());
}

#[test]
fn type_filter_comma_joined_queries_as_in_the_ig_example() {
    // The IG v2 example: URL-decoded by the HTTP layer, the two queries arrive comma-joined.
    let p = get_ok(
        Level::System,
        &[
            ("_type", "MedicationRequest,Condition"),
            (
                "_typeFilter",
                "MedicationRequest?status=active,MedicationRequest?status=completed&date=gt2018-07-01T00:00:00Z",
            ),
        ],
    );
    assert_eq!(
        filters(&p),
        [(
            "MedicationRequest",
            vec!["MedicationRequest?status=active", "MedicationRequest?status=completed&date=gt2018-07-01T00:00:00Z"]
        )]
    );
}

#[test]
fn type_filter_repeated_parameters_equal_comma_joined_values() {
    let joined = get_ok(
        Level::Patient,
        &[("_typeFilter", "Observation?category=laboratory,vital-signs,Condition?clinical-status=active")],
    );
    let repeated = get_ok(
        Level::Patient,
        &[
            ("_typeFilter", "Observation?category=laboratory,vital-signs"),
            ("_typeFilter", "Condition?clinical-status=active"),
        ],
    );
    assert_eq!(joined.type_filters, repeated.type_filters);
    assert_eq!(
        filters(&joined),
        [
            ("Condition", vec!["Condition?clinical-status=active"]),
            ("Observation", vec!["Observation?category=laboratory,vital-signs"])
        ]
    );
}

#[test]
fn type_filter_queries_are_deduplicated_in_order() {
    let p = get_ok(
        Level::System,
        &[
            ("_typeFilter", "Observation?status=final"),
            ("_typeFilter", "Observation?code=1,Observation?status=final&"),
            ("_typeFilter", "Observation?status=final"),
        ],
    );
    assert_eq!(filters(&p), [("Observation", vec!["Observation?status=final", "Observation?code=1"])]);
}

#[test]
fn type_filter_empty_values_ask_for_nothing() {
    let p = get_ok(Level::System, &[("_typeFilter", ""), ("_typeFilter", "  ")]);
    assert!(p.type_filters.is_empty());
    assert!(p.ignored.is_empty());
}

#[test]
fn type_filter_still_encoded_queries_are_read() {
    let p = get_ok(
        Level::System,
        &[("_typeFilter", "MedicationRequest%3Fstatus%3Dactive,MedicationRequest%3Fstatus%3Dstopped")],
    );
    assert_eq!(p.type_filter("MedicationRequest").unwrap().len(), 2);
    assert!(p.keeps("MedicationRequest", &j(&medication_request("stopped", "2020"))));
    assert!(!p.keeps("MedicationRequest", &j(&medication_request("draft", "2020"))));
}

#[test]
fn keeps_ors_the_queries_of_a_type_and_leaves_other_types_alone() {
    let p = get_ok(
        Level::System,
        &[
            ("_type", "MedicationRequest,Condition"),
            ("_typeFilter", "MedicationRequest?status=active"),
            ("_typeFilter", "MedicationRequest?status=completed&authoredon=gt2018-07-01T00:00:00Z"),
        ],
    );
    assert!(p.keeps("MedicationRequest", &j(&medication_request("active", "2010-01-01"))));
    assert!(p.keeps("MedicationRequest", &j(&medication_request("completed", "2019-01-01"))));
    assert!(!p.keeps("MedicationRequest", &j(&medication_request("completed", "2017-01-01"))));
    assert!(!p.keeps("MedicationRequest", &j(&medication_request("stopped", "2019-01-01"))));
    assert!(p.keeps("Condition", &j(&json!({"resourceType": "Condition"}))));
    assert!(get_ok(Level::System, &[]).keeps("Observation", &j(&json!({"resourceType": "Observation"}))));
}

#[test]
fn type_filter_in_a_post_body() {
    let body = parameters(json!([
        {"name": "_type", "valueString": "Observation,Condition"},
        {"name": "_typeFilter", "valueString": "Observation?code=http://loinc.org|8302-2,8867-4"},
        {"name": "_typeFilter", "valueString": "Condition?onset-date=ge2020,Observation?category=laboratory"}
    ]));
    for level in [Level::System, Level::Patient, group()] {
        let p = ok(post_body(level, &body));
        assert_eq!(
            filters(&p),
            [
                ("Condition", vec!["Condition?onset-date=ge2020"]),
                (
                    "Observation",
                    vec!["Observation?code=http://loinc.org|8302-2,8867-4", "Observation?category=laboratory"]
                )
            ]
        );
    }
    let body = parameters(json!([{"name": "_typeFilter", "valueReference": {"reference": "Observation/1"}}]));
    let issues = err(post_body(Level::System, &body));
    one(&issues, "_typeFilter", IssueCode::Invalid, &["valueReference", "valueString"]);
}

#[test]
fn type_filter_queries_sluice_cannot_run_are_errors_when_strict() {
    for (query, code, fragments) in [
        ("Foo?x=1", IssueCode::NotSupported, &["'Foo' is not a standard FHIR R4 resource type"][..]),
        ("observation?status=final", IssueCode::NotSupported, &["did you mean Observation?"]),
        (
            "Observation?combo-code=x",
            IssueCode::NotSupported,
            &["'combo-code' is not supported on Observation", "_id, _lastUpdated, category"],
        ),
        ("Observation?status=final&_sort=date", IssueCode::NotSupported, &["'_sort' is a search result parameter"]),
        ("Observation?subject.name=x", IssueCode::NotSupported, &["chained"]),
        ("Observation?code:below=1", IssueCode::NotSupported, &["modifier ':below'"]),
        ("Observation?date=gz2020", IssueCode::Invalid, &["not a date prefix"]),
        ("Observation?date=2020-13", IssueCode::Invalid, &["'2020-13' is not a FHIR date"]),
        ("Observation?status", IssueCode::Invalid, &["has no value"]),
        ("Observation", IssueCode::Invalid, &["without search criteria"]),
        ("status=final", IssueCode::Invalid, &["not a FHIR search query"]),
    ] {
        let issues = get_err(Level::System, &[("_typeFilter", query)]);
        assert_eq!(issues.len(), 1, "{query}: {issues:#?}");
        let mut all = vec![query];
        all.extend_from_slice(fragments);
        all.push("CapabilityStatement");
        one(&issues, "_typeFilter", code, &all);
    }
}

#[test]
fn type_filter_every_bad_query_is_reported() {
    let issues = get_err(
        Level::System,
        &[("_typeFilter", "Observation?foo=1,Condition?bar=2"), ("_typeFilter", "Patient?_count=1")],
    );
    let texts: Vec<&str> = issues.iter().map(|i| i.diagnostics.as_str()).collect();
    assert_eq!(issues.len(), 3, "{texts:#?}");
    assert!(
        texts[0].contains("'Observation?foo=1'")
            && texts[1].contains("'Condition?bar=2'")
            && texts[2].contains("'Patient?_count=1'")
    );
}

#[test]
fn type_filter_bad_queries_are_ignored_when_lenient() {
    let p = ok(get_lenient(
        Level::System,
        &[("_typeFilter", "Observation?foo=1,Observation?status=final"), ("_typeFilter", "Condition?onset-date=soon")],
    ));
    assert_eq!(filters(&p), [("Observation", vec!["Observation?status=final"])]);
    assert_eq!(p.ignored.len(), 2);
    for w in &p.ignored {
        assert_eq!(w.severity, Severity::Warning);
        assert_eq!(w.expression.as_deref(), Some("_typeFilter"));
        assert!(w.diagnostics.ends_with("Ignored (Prefer: handling=lenient)."), "{w:?}");
    }
    assert_eq!(p.ignored[0].code, IssueCode::NotSupported);
    assert_eq!(p.ignored[1].code, IssueCode::Invalid);
    // A type whose every query was dropped is not filtered at all.
    let p = ok(get_lenient(Level::System, &[("_typeFilter", "Observation?foo=1")]));
    assert!(p.type_filters.is_empty());
    assert!(p.keeps("Observation", &j(&json!({"resourceType": "Observation"}))));
}

#[test]
fn type_filter_on_a_type_that_type_excludes_is_an_error_when_strict() {
    for list in [
        [("_type", "Patient,Condition"), ("_typeFilter", "Observation?status=final")],
        // The order of the parameters does not matter.
        [("_typeFilter", "Observation?status=final"), ("_type", "Patient,Condition")],
    ] {
        let issues = get_err(Level::System, &list);
        assert_eq!(issues.len(), 1);
        one(
            &issues,
            "_typeFilter",
            IssueCode::Value,
            &[
                "'Observation?status=final' filters Observation",
                "_type (Patient,Condition) does not include Observation",
                "never adds a type",
                "add Observation to _type",
            ],
        );
    }
}

#[test]
fn type_filter_on_a_type_that_type_excludes_is_ignored_when_lenient() {
    let p = ok(get_lenient(
        Level::System,
        &[("_type", "Patient,Condition"), ("_typeFilter", "Observation?status=final,Condition?code=1")],
    ));
    assert_eq!(filters(&p), [("Condition", vec!["Condition?code=1"])]);
    assert_eq!(p.ignored.len(), 1);
    assert_eq!(p.ignored[0].expression.as_deref(), Some("_typeFilter"));
    assert!(p.ignored[0].diagnostics.contains("does not include Observation"));
    // Lenient _type drops bad entries first; the filter is checked against what is left.
    let p = ok(get_lenient(
        Level::System,
        &[("_type", "Foo,Observation"), ("_typeFilter", "Condition?code=1,Observation?code=2")],
    ));
    assert_eq!(p.types, only(&["Observation"]));
    assert_eq!(filters(&p), [("Observation", vec!["Observation?code=2"])]);
    assert_eq!(p.ignored.len(), 2);
}

#[test]
fn type_filter_at_patient_level_follows_the_covered_types() {
    for level in [Level::Patient, group()] {
        // Compartment types are covered without _type.
        let p = get_ok(level.clone(), &[("_typeFilter", "Observation?status=final,Patient?gender=female")]);
        assert_eq!(p.type_filters.len(), 2);
        // Types outside the compartment only when _type names them (D8).
        let issues = get_err(level.clone(), &[("_typeFilter", "Practitioner?name=smith")]);
        one(
            &issues,
            "_typeFilter",
            IssueCode::Value,
            &["without _type includes only the Patient compartment types", "name Practitioner in _type"],
        );
        let p =
            get_ok(level.clone(), &[("_type", "Practitioner,Observation"), ("_typeFilter", "Practitioner?name=smith")]);
        assert_eq!(filters(&p), [("Practitioner", vec!["Practitioner?name=smith"])]);
        // Never Group (D9).
        let issues = get_err(level.clone(), &[("_typeFilter", "Group?_id=g1")]);
        one(&issues, "_typeFilter", IssueCode::Value, &["never includes Group", "system-level export"]);
    }
    // At system level every type is covered, Group included.
    let p = get_ok(Level::System, &[("_typeFilter", "Group?_id=g1,Practitioner?name=smith")]);
    assert_eq!(p.type_filters.len(), 2);
}

#[test]
fn type_filter_plan_round_trips_through_json() {
    let p = get_ok(
        Level::Patient,
        &[(
            "_typeFilter",
            "Observation?status=final&date=ge2024-01&patient=Patient/p1,Condition?code:not=1&code:text=fever",
        )],
    );
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["type_filters"]["Observation"][0]["resource_type"], "Observation");
    let back: ExportPlan = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
    // A plan without filters has no type_filters key, and job records from before
    // _typeFilter (without the key) still decode.
    let mut v = serde_json::to_value(get_ok(Level::System, &[])).unwrap();
    assert!(v.get("type_filters").is_none());
    v.as_object_mut().unwrap().remove("type_filters");
    let back: ExportPlan = serde_json::from_value(v).unwrap();
    assert!(back.type_filters.is_empty());
    assert_eq!(ExportPlan::new(Level::System).type_filters, BTreeMap::new());
}

// ---------------------------------------------------------------- unknown parameters (D2)

#[test]
fn unknown_parameter_is_an_error_when_strict() {
    let issues = get_err(Level::System, &[("foo", "bar")]);
    assert_eq!(issues.len(), 1);
    one(&issues, "foo", IssueCode::NotSupported, &["Unknown parameter 'foo'", "_outputFormat", "_since"]);
}

#[test]
fn unknown_parameter_repeated_is_reported_once() {
    let issues = get_err(Level::System, &[("foo", "1"), ("foo", "2")]);
    assert_eq!(issues.len(), 1);
}

#[test]
fn unknown_parameter_hints_at_the_known_spelling() {
    for (bad, good) in
        [("_outputformat", "_outputFormat"), ("since", "_since"), ("_TYPE", "_type"), ("Patient", "patient")]
    {
        let issues = get_err(Level::System, &[(bad, "x")]);
        one(&issues, bad, IssueCode::NotSupported, &[&format!("did you mean {good}?")]);
    }
}

#[test]
fn unknown_parameter_is_a_warning_when_lenient() {
    let p = ok(get_lenient(Level::System, &[("foo", "bar"), ("_type", "Patient")]));
    assert_eq!(p.types, only(&["Patient"]));
    assert_eq!(p.ignored.len(), 1);
    assert_eq!(p.ignored[0].severity, Severity::Warning);
    assert_eq!(p.ignored[0].expression.as_deref(), Some("foo"));
}

#[test]
fn lenient_drops_each_invalid_value_and_keeps_the_rest() {
    let p = ok(get_lenient(
        Level::Patient,
        &[
            ("_outputFormat", "csv"),
            ("_type", "Patient,Foo,Group,Observation"),
            ("_since", "garbage"),
            ("_until", "2024-01-01"),
            ("patient", "1,Practitioner/2,3"),
            ("_elements", "id,name.given"),
            ("bogus", "1"),
        ],
    ));
    assert_eq!(p.output_format, OutputFormat::Ndjson);
    assert_eq!(p.types, only(&["Patient", "Observation"]));
    assert_eq!(p.since, None);
    assert_eq!(p.until, Some(instant("2024-01-01")));
    assert_eq!(p.patients, Some(strings(&["1", "3"])));
    assert_eq!(p.elements, Some(strings(&["id"])));
    let exprs: Vec<&str> = p.ignored.iter().map(|i| i.expression.as_deref().unwrap()).collect();
    assert_eq!(exprs, ["_outputFormat", "_type", "_type", "_since", "patient", "_elements", "bogus"]);
    assert!(p.ignored.iter().all(|i| i.severity == Severity::Warning));
}

#[test]
fn lenient_with_only_invalid_types_exports_all_types() {
    let p = ok(get_lenient(Level::System, &[("_type", "Foo,Bar")]));
    assert_eq!(p.types, TypeSelection::All);
    assert_eq!(p.ignored.len(), 2);
}

#[test]
fn lenient_since_after_until_drops_until() {
    let p = ok(get_lenient(Level::System, &[("_since", "2024-06-01"), ("_until", "2024-05-01")]));
    assert_eq!(p.since, Some(instant("2024-06-01")));
    assert_eq!(p.until, None);
    assert_eq!(p.ignored.len(), 1);
    assert!(p.ignored[0].diagnostics.contains("_until is dropped"));
}

#[test]
fn lenient_patient_at_wrong_level_is_ignored() {
    let p = ok(get_lenient(Level::System, &[("patient", "1")]));
    assert_eq!(p.patients, None);
    assert_eq!(p.ignored.len(), 1);
    let p = ok(get_lenient(group(), &[("patient", "1")]));
    assert_eq!(p.patients, None);
    assert_eq!(p.ignored.len(), 1);
}

// ---------------------------------------------------------------- Prefer

#[test]
fn prefer_parsing() {
    for (prefer, lenient) in [
        (None, false),
        (Some(""), false),
        (Some("respond-async"), false),
        (Some("handling=lenient"), true),
        (Some("respond-async, handling=lenient"), true),
        (Some("handling=lenient, respond-async"), true),
        (Some("respond-async,handling=lenient"), true),
        (Some("  HANDLING = Lenient "), true),
        (Some("handling=\"lenient\""), true),
        (Some("handling=lenient; foo=bar"), true),
        (Some("handling=strict"), false),
        (Some("respond-async, handling=strict"), false),
        (Some("handling=lenient, handling=strict"), false),
        (Some("handling=strict, handling=lenient"), true),
        (Some("return=minimal"), false),
        (Some("handling"), false),
        (Some("lenient"), false),
    ] {
        assert_eq!(headers::prefers_lenient(prefer), lenient, "{prefer:?}");
        let query = pairs(&[]);
        let mut req = KickoffRequest::get(Level::System, &query);
        req.prefer = prefer;
        assert_eq!(ok(plan(&req)).lenient, lenient, "{prefer:?}");
    }
}

#[test]
fn missing_respond_async_is_fine_d1() {
    let query = pairs(&[("_type", "Patient")]);
    let mut req = KickoffRequest::get(Level::System, &query);
    req.prefer = None;
    req.accept = None;
    assert!(plan(&req).is_ok());
}

// ---------------------------------------------------------------- Accept

fn with_accept(accept: Option<&str>) -> Result<ExportPlan, Vec<Issue>> {
    let query = pairs(&[]);
    let mut req = KickoffRequest::get(Level::System, &query);
    req.accept = accept;
    plan(&req)
}

#[test]
fn accept_values_that_allow_fhir_json() {
    for a in [
        None,
        Some(""),
        Some("*/*"),
        Some("application/fhir+json"),
        Some("application/json"),
        Some("APPLICATION/FHIR+JSON"),
        Some("application/fhir+json; fhirVersion=4.0"),
        Some("application/json;charset=utf-8"),
        Some("application/*"),
        Some("text/html, application/json;q=0.9"),
        Some("text/html,*/*;q=0.1"),
        Some("application/json+fhir"),
    ] {
        assert!(with_accept(a).is_ok(), "{a:?}");
    }
}

#[test]
fn accept_values_that_cannot_be_honoured() {
    for a in [
        "text/html",
        "application/xml",
        "application/fhir+xml",
        "application/fhir+ndjson",
        "text/*",
        "application/json;q=0",
        "text/plain, application/fhir+json;q=0",
    ] {
        let issues = err(with_accept(Some(a)));
        assert_eq!(issues.len(), 1, "{a}");
        one(&issues, "Accept", IssueCode::NotSupported, &[a, "application/fhir+json"]);
        assert_eq!(error_status(&issues), 406);
    }
}

#[test]
fn accept_problem_is_not_lenient() {
    let query = pairs(&[]);
    let mut req = KickoffRequest::get(Level::System, &query);
    req.accept = Some("text/html");
    req.prefer = Some("handling=lenient");
    let issues = err(plan(&req));
    assert_eq!(error_status(&issues), 406);
}

#[test]
fn error_status_is_400_without_an_accept_problem() {
    let issues = get_err(Level::System, &[("_type", "Foo")]);
    assert_eq!(error_status(&issues), 400);
    assert_eq!(error_status(&[]), 400);
    let query = pairs(&[("_type", "Foo")]);
    let mut req = KickoffRequest::get(Level::System, &query);
    req.accept = Some("text/html");
    let issues = err(plan(&req));
    assert_eq!(issues.len(), 2);
    assert_eq!(error_status(&issues), 406);
}

// ---------------------------------------------------------------- POST

#[test]
fn post_with_a_full_parameters_body() {
    let body = parameters(json!([
        {"name": "_outputFormat", "valueString": "application/fhir+ndjson+gzip"},
        {"name": "_type", "valueString": "Patient,Observation"},
        {"name": "_type", "valueCode": "Condition"},
        {"name": "_type", "valueString": "Patient"},
        {"name": "_since", "valueInstant": "2024-05-01T00:00:00Z"},
        {"name": "_until", "valueDateTime": "2024-06-01"},
        {"name": "_elements", "valueString": "id,Patient.name"},
        {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
        {"name": "allowPartialManifests", "valueBoolean": false},
        {"name": "organizeOutputBy", "valueString": ""},
    ]));
    let p = ok(post_body(Level::Patient, &body));
    assert_eq!(p.output_format, OutputFormat::NdjsonGz);
    assert_eq!(p.types, only(&["Patient", "Observation", "Condition"]));
    assert_eq!(p.since, Some(instant("2024-05-01T00:00:00Z")));
    assert_eq!(p.until, Some(instant("2024-06-01")));
    assert_eq!(p.elements, Some(strings(&["id", "Patient.name"])));
    assert_eq!(p.patients, Some(strings(&["p1"])));
    assert!(p.ignored.is_empty());
}

#[test]
fn post_accepts_every_listed_value_type() {
    let body = parameters(json!([
        {"name": "_outputFormat", "valueUri": "application/fhir+ndjson"},
        {"name": "_since", "valueDate": "2024-05-01"},
        {"name": "_type", "valueString": "Patient"},
    ]));
    let p = ok(post_body(Level::System, &body));
    assert_eq!(p.since, Some(instant("2024-05-01")));
    let body = parameters(json!([{"name": "allowPartialManifests", "valueBoolean": true}]));
    assert!(ok(post_body(Level::System, &body)).allow_partial_manifests);
}

#[test]
fn post_at_system_level_is_supported_d4() {
    let p = ok(post_body(Level::System, &parameters(json!([{"name": "_type", "valueString": "Patient"}]))));
    assert_eq!(p.level, Level::System);
    assert_eq!(p.types, only(&["Patient"]));
}

#[test]
fn post_parameters_without_parameter_array_is_the_default_plan() {
    let p = ok(post_body(group(), &json!({"resourceType": "Parameters"})));
    assert_eq!(p, get_ok(group(), &[]));
    let p = ok(post_body(group(), &parameters(json!([]))));
    assert_eq!(p.types, TypeSelection::All);
}

#[test]
fn post_content_type_variants() {
    let bytes = serde_json::to_vec(&parameters(json!([]))).unwrap();
    for ct in [
        "application/fhir+json",
        "application/json",
        "application/fhir+json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/json+fhir",
    ] {
        let mut req = KickoffRequest::post(Level::System, &bytes);
        req.content_type = Some(ct);
        assert!(plan(&req).is_ok(), "{ct}");
    }
    for ct in
        [None, Some(""), Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("application/fhir+xml")]
    {
        let mut req = KickoffRequest::post(Level::System, &bytes);
        req.content_type = ct;
        let issues = err(plan(&req));
        assert_eq!(issues.len(), 1, "{ct:?}");
        let i = one(&issues, "Content-Type", IssueCode::NotSupported, &["application/fhir+json", "application/json"]);
        if let Some(ct) = ct.filter(|c| !c.is_empty()) {
            assert!(i.diagnostics.contains(ct));
        } else {
            assert!(i.diagnostics.contains("missing"));
        }
        assert_eq!(error_status(&issues), 400);
    }
}

#[test]
fn post_wrong_content_type_with_non_json_body_reports_only_the_content_type() {
    let mut req = KickoffRequest::post(Level::System, b"_type=Patient");
    req.content_type = Some("application/x-www-form-urlencoded");
    let issues = err(plan(&req));
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].expression.as_deref(), Some("Content-Type"));
}

#[test]
fn post_empty_body_is_an_error() {
    for body in [&b""[..], &b"  \n"[..]] {
        let issues = err(plan(&KickoffRequest::post(Level::System, body)));
        one(&issues, "Parameters", IssueCode::Required, &["empty", "resourceType", "Parameters"]);
    }
    let mut req = KickoffRequest::post(Level::System, b"");
    req.body = None;
    let issues = err(plan(&req));
    one(&issues, "Parameters", IssueCode::Required, &["empty"]);
}

#[test]
fn post_invalid_json_is_an_error() {
    let issues = err(plan(&KickoffRequest::post(Level::System, b"{\"resourceType\": ")));
    one(&issues, "Parameters", IssueCode::Invalid, &["not valid JSON", "Parameters resource"]);
}

#[test]
fn post_other_resource_types_are_errors() {
    for (body, got) in [
        (json!({"resourceType": "Patient"}), "resourceType 'Patient'"),
        (json!({"parameter": []}), "without resourceType"),
        (json!([1, 2]), "JSON array"),
        (json!("Parameters"), "JSON string"),
    ] {
        let issues = err(post_body(Level::System, &body));
        assert_eq!(issues.len(), 1);
        one(&issues, "Parameters", IssueCode::Invalid, &[got, "expected a FHIR Parameters resource"]);
    }
}

#[test]
fn post_parameter_must_be_an_array() {
    let issues = err(post_body(Level::System, &json!({"resourceType": "Parameters", "parameter": {"name": "_type"}})));
    one(&issues, "Parameters.parameter", IssueCode::Structure, &["array", "object"]);
}

#[test]
fn post_bad_entries_are_each_reported() {
    let body = parameters(json!([
        "just a string",
        {"valueString": "Patient"},
        {"name": "_type"},
        {"name": "_since", "valueInteger": 5},
        {"name": "_outputFormat", "valueString": "ndjson", "valueCode": "ndjson"},
        {"name": "_type", "valueString": 12},
        {"name": "allowPartialManifests", "valueBoolean": "false"},
        {"name": "patient", "valueReference": "Patient/1"},
        {"name": "_elements", "resource": {"resourceType": "Patient"}},
        {"name": "_type", "valueReference": {"reference": "Patient/1"}},
    ]));
    let issues = err(post_body(Level::Patient, &body));
    let summary: Vec<(IssueCode, &str)> = issues.iter().map(|i| (i.code, i.expression.as_deref().unwrap())).collect();
    assert_eq!(
        summary,
        [
            (IssueCode::Structure, "Parameters.parameter[0]"),
            (IssueCode::Required, "Parameters.parameter[1]"),
            (IssueCode::Required, "_type"),
            (IssueCode::NotSupported, "_since"),
            (IssueCode::Invalid, "_outputFormat"),
            (IssueCode::Structure, "_type"),
            (IssueCode::Structure, "allowPartialManifests"),
            (IssueCode::Structure, "patient"),
            (IssueCode::NotSupported, "_elements"),
            (IssueCode::Invalid, "_type"),
        ],
        "{issues:#?}"
    );
    assert!(issues[2].diagnostics.contains("has no value") && issues[2].diagnostics.contains("valueString"));
    assert!(issues[3].diagnostics.contains("valueInteger") && issues[3].diagnostics.contains("valueInstant"));
    assert!(issues[4].diagnostics.contains("several values"));
    assert!(issues[5].diagnostics.contains("JSON string"));
    assert!(issues[6].diagnostics.contains("JSON boolean"));
    assert!(issues[8].diagnostics.contains("resource"));
    assert!(issues[9].diagnostics.contains("not a valueReference"));
}

#[test]
fn post_bad_entries_are_dropped_when_lenient() {
    let body = parameters(json!([
        {"name": "_since", "valueInteger": 5},
        {"name": "_type", "valueString": "Observation"},
        {"name": "foo", "valueString": "bar"},
    ]));
    let bytes = serde_json::to_vec(&body).unwrap();
    let mut req = KickoffRequest::post(Level::System, &bytes);
    req.prefer = Some("handling=lenient");
    let p = ok(plan(&req));
    assert_eq!(p.types, only(&["Observation"]));
    assert_eq!(p.since, None);
    assert_eq!(p.ignored.len(), 2);
}

#[test]
fn post_body_problems_fail_even_when_lenient() {
    let mut req = KickoffRequest::post(Level::System, b"not json");
    req.prefer = Some("handling=lenient");
    err(plan(&req));
}

#[test]
fn post_with_query_parameters_is_an_error() {
    let bytes = serde_json::to_vec(&parameters(json!([]))).unwrap();
    let query = pairs(&[("_type", "Patient"), ("_since", "2024")]);
    let mut req = KickoffRequest::post(Level::System, &bytes);
    req.query = &query;
    let issues = err(plan(&req));
    assert_eq!(issues.len(), 2);
    one(&issues, "_type", IssueCode::NotSupported, &["_type='Patient'", "POST", "Parameters body"]);
    one(&issues, "_since", IssueCode::NotSupported, &["_since='2024'"]);
}

#[test]
fn post_query_parameters_are_ignored_when_lenient() {
    let bytes = serde_json::to_vec(&parameters(json!([{"name": "_type", "valueString": "Condition"}]))).unwrap();
    let query = pairs(&[("_type", "Patient")]);
    let mut req = KickoffRequest::post(Level::System, &bytes);
    req.query = &query;
    req.prefer = Some("handling=lenient");
    let p = ok(plan(&req));
    assert_eq!(p.types, only(&["Condition"]));
    assert_eq!(p.ignored.len(), 1);
}

#[test]
fn get_ignores_body_and_content_type() {
    let query = pairs(&[]);
    let mut req = KickoffRequest::get(Level::System, &query);
    req.body = Some(&b"garbage"[..]);
    req.content_type = Some("text/plain");
    assert!(plan(&req).is_ok());
}

// ---------------------------------------------------------------- several errors at once

#[test]
fn all_problems_are_reported_together() {
    let query = pairs(&[
        ("_outputFormat", "csv"),
        ("_type", "Foo,Group"),
        ("_since", "soon"),
        ("patient", "1"),
        ("_elements", "a.b.c"),
        ("_typeFilter", "Observation?foo=1"),
        ("mystery", "1"),
    ]);
    let mut req = KickoffRequest::get(group(), &query);
    req.accept = Some("text/html");
    let issues = err(plan(&req));
    let exprs: Vec<&str> = issues.iter().map(|i| i.expression.as_deref().unwrap()).collect();
    assert_eq!(
        exprs,
        ["Accept", "_outputFormat", "_type", "_type", "_since", "patient", "_elements", "_typeFilter", "mystery"]
    );
    assert_eq!(error_status(&issues), 406);
}

// ---------------------------------------------------------------- resolve_types

const AVAILABLE: &[&str] =
    &["Patient", "Observation", "Group", "Practitioner", "Organization", "Encounter", "AidboxJob", "Observation"];

#[test]
fn resolve_types_system_all_is_every_available_r4_type_sorted() {
    let p = get_ok(Level::System, &[]);
    assert_eq!(
        p.resolve_types(AVAILABLE.iter().copied()),
        strings(&["Encounter", "Group", "Observation", "Organization", "Patient", "Practitioner"])
    );
}

#[test]
fn resolve_types_patient_and_group_all_is_the_compartment_without_group() {
    for level in [Level::Patient, group()] {
        let p = get_ok(level, &[]);
        assert_eq!(p.resolve_types(AVAILABLE.iter().copied()), strings(&["Encounter", "Observation", "Patient"]));
    }
}

#[test]
fn resolve_types_with_type_is_the_named_types_that_have_data() {
    let p = get_ok(Level::System, &[("_type", "Observation,Group,Condition")]);
    assert_eq!(p.resolve_types(AVAILABLE.iter().copied()), strings(&["Group", "Observation"]));
    // D8: asked-for types outside the compartment are included at patient/group level.
    for level in [Level::Patient, group()] {
        let p = get_ok(level, &[("_type", "Practitioner,Observation,Condition")]);
        assert_eq!(p.resolve_types(AVAILABLE.iter().copied()), strings(&["Observation", "Practitioner"]));
    }
}

#[test]
fn resolve_types_never_returns_group_for_patient_exports_even_if_forced() {
    let mut p = get_ok(Level::Patient, &[]);
    p.types = only(&["Group", "Patient"]);
    assert_eq!(p.resolve_types(AVAILABLE.iter().copied()), strings(&["Patient"]));
}

#[test]
fn resolve_types_with_nothing_available_is_empty() {
    assert!(get_ok(Level::System, &[]).resolve_types([]).is_empty());
    let p = get_ok(Level::Patient, &[("_type", "Patient")]);
    assert!(p.resolve_types(["Observation"]).is_empty());
}

// ---------------------------------------------------------------- serde

#[test]
fn plan_round_trips_through_json() {
    let p = ok(get_lenient(
        group(),
        &[
            ("_outputFormat", "ndjson.gz"),
            ("_type", "Patient,Observation"),
            ("_since", "2024-05-01T10:00:00.123+02:00"),
            ("_until", "2025"),
            ("_elements", "id"),
            ("foo", "bar"),
        ],
    ));
    let text = serde_json::to_string(&p).unwrap();
    let v: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(v["level"], json!({"group": "g1"}));
    assert_eq!(v["output_format"], "ndjson-gz");
    assert_eq!(v["types"], json!({"only": ["Patient", "Observation"]}));
    assert_eq!(v["since"], "2024-05-01T08:00:00.123Z");
    assert_eq!(v["until"], "2025-01-01T00:00:00Z");
    let back: ExportPlan = serde_json::from_str(&text).unwrap();
    assert_eq!(back, p);

    let p = get_ok(Level::System, &[]);
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["level"], "system");
    assert_eq!(v["types"], "all");
    assert_eq!(v["since"], Json::Null);
    let back: ExportPlan = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
}
