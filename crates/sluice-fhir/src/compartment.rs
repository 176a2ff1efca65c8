//! The FHIR R4 (4.0.1) Patient compartment, and which patients a resource belongs to.
//!
//! [`PATIENT_COMPARTMENT`] is the complete R4 `CompartmentDefinition/patient`
//! (<http://hl7.org/fhir/R4/compartmentdefinition-patient.html>): the 66 resource types that
//! have at least one linking search parameter, each with its parameters in the order of the
//! definition. For every parameter the table holds the element paths of that search
//! parameter's R4 FHIRPath expression, restricted to the resource type, with the resource type
//! dropped and any `.where(resolve() is Patient)` removed (the type check is done on the
//! reference string instead). For example `Observation.subject` is `subject`,
//! `Procedure.performer.actor` is `performer.actor` and `Provenance.target.where(resolve() is
//! Patient)` is `target`. No path of the R4 Patient compartment goes through a choice
//! (`[x]`) element: every path ends at a plain `Reference` element.
//!
//! The data was transcribed from the `hl7.fhir.r4.core` 4.0.1 package
//! (`CompartmentDefinition-patient.json` and the `SearchParameter-*.json` resources).
//!
//! Two things the definition implies that are easy to get wrong:
//! - Types that are *not* in the R4 Patient compartment include `Device` (even though
//!   `Device.patient` exists), `Organization`, `Practitioner`, `PractitionerRole`, `Location`,
//!   `Medication` and `Task`.
//! - `Encounter` links only through `patient` (= `Encounter.subject`); `Encounter.participant`
//!   belongs to the Practitioner and RelatedPerson compartments, not this one.
//!
//! Design decision D16: a `Patient` resource belongs only to its own compartment. The
//! definition lists `Patient.link` (`link.other`), and the table keeps it as data, but
//! [`patient_ids`] does not follow it.

use std::collections::BTreeSet;

use sluice_json::Json;

/// One resource type of the Patient compartment and the search parameters that link it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompartmentEntry {
    /// The resource type, e.g. `Observation`.
    pub resource_type: &'static str,
    /// The linking search parameters, in the order of the CompartmentDefinition (never empty).
    pub params: &'static [LinkParam],
}

/// A linking search parameter and the element paths it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParam {
    /// The search parameter code, e.g. `subject` or `policy-holder`.
    pub name: &'static str,
    /// Dot-separated JSON element paths relative to the resource (e.g. `performer.actor`), each
    /// ending at a `Reference` (never empty).
    pub paths: &'static [&'static str],
}

/// Shorthand for a table entry.
const fn e(resource_type: &'static str, params: &'static [LinkParam]) -> CompartmentEntry {
    CompartmentEntry { resource_type, params }
}

/// Shorthand for a table parameter.
const fn p(name: &'static str, paths: &'static [&'static str]) -> LinkParam {
    LinkParam { name, paths }
}

/// The R4 Patient compartment: 66 entries, sorted by resource type, one per type.
#[rustfmt::skip]
pub static PATIENT_COMPARTMENT: &[CompartmentEntry] = &[
    e("Account", &[p("subject", &["subject"])]),
    e("AdverseEvent", &[p("subject", &["subject"])]),
    e("AllergyIntolerance", &[
        p("patient", &["patient"]),
        p("recorder", &["recorder"]),
        p("asserter", &["asserter"]),
    ]),
    e("Appointment", &[p("actor", &["participant.actor"])]),
    e("AppointmentResponse", &[p("actor", &["actor"])]),
    e("AuditEvent", &[p("patient", &["agent.who", "entity.what"])]),
    e("Basic", &[p("patient", &["subject"]), p("author", &["author"])]),
    e("BodyStructure", &[p("patient", &["patient"])]),
    e("CarePlan", &[p("patient", &["subject"]), p("performer", &["activity.detail.performer"])]),
    e("CareTeam", &[p("patient", &["subject"]), p("participant", &["participant.member"])]),
    e("ChargeItem", &[p("subject", &["subject"])]),
    e("Claim", &[p("patient", &["patient"]), p("payee", &["payee.party"])]),
    e("ClaimResponse", &[p("patient", &["patient"])]),
    e("ClinicalImpression", &[p("subject", &["subject"])]),
    e("Communication", &[
        p("subject", &["subject"]),
        p("sender", &["sender"]),
        p("recipient", &["recipient"]),
    ]),
    e("CommunicationRequest", &[
        p("subject", &["subject"]),
        p("sender", &["sender"]),
        p("recipient", &["recipient"]),
        p("requester", &["requester"]),
    ]),
    e("Composition", &[
        p("subject", &["subject"]),
        p("author", &["author"]),
        p("attester", &["attester.party"]),
    ]),
    e("Condition", &[p("patient", &["subject"]), p("asserter", &["asserter"])]),
    e("Consent", &[p("patient", &["patient"])]),
    e("Coverage", &[
        p("policy-holder", &["policyHolder"]),
        p("subscriber", &["subscriber"]),
        p("beneficiary", &["beneficiary"]),
        p("payor", &["payor"]),
    ]),
    e("CoverageEligibilityRequest", &[p("patient", &["patient"])]),
    e("CoverageEligibilityResponse", &[p("patient", &["patient"])]),
    e("DetectedIssue", &[p("patient", &["patient"])]),
    e("DeviceRequest", &[p("subject", &["subject"]), p("performer", &["performer"])]),
    e("DeviceUseStatement", &[p("subject", &["subject"])]),
    e("DiagnosticReport", &[p("subject", &["subject"])]),
    e("DocumentManifest", &[
        p("subject", &["subject"]),
        p("author", &["author"]),
        p("recipient", &["recipient"]),
    ]),
    e("DocumentReference", &[p("subject", &["subject"]), p("author", &["author"])]),
    e("Encounter", &[p("patient", &["subject"])]),
    e("EnrollmentRequest", &[p("subject", &["candidate"])]),
    e("EpisodeOfCare", &[p("patient", &["patient"])]),
    e("ExplanationOfBenefit", &[p("patient", &["patient"]), p("payee", &["payee.party"])]),
    e("FamilyMemberHistory", &[p("patient", &["patient"])]),
    e("Flag", &[p("patient", &["subject"])]),
    e("Goal", &[p("patient", &["subject"])]),
    e("Group", &[p("member", &["member.entity"])]),
    e("ImagingStudy", &[p("patient", &["subject"])]),
    e("Immunization", &[p("patient", &["patient"])]),
    e("ImmunizationEvaluation", &[p("patient", &["patient"])]),
    e("ImmunizationRecommendation", &[p("patient", &["patient"])]),
    e("Invoice", &[
        p("subject", &["subject"]),
        p("patient", &["subject"]),
        p("recipient", &["recipient"]),
    ]),
    e("List", &[p("subject", &["subject"]), p("source", &["source"])]),
    e("MeasureReport", &[p("patient", &["subject"])]),
    e("Media", &[p("subject", &["subject"])]),
    e("MedicationAdministration", &[
        p("patient", &["subject"]),
        p("performer", &["performer.actor"]),
        p("subject", &["subject"]),
    ]),
    e("MedicationDispense", &[
        p("subject", &["subject"]),
        p("patient", &["subject"]),
        p("receiver", &["receiver"]),
    ]),
    e("MedicationRequest", &[p("subject", &["subject"])]),
    e("MedicationStatement", &[p("subject", &["subject"])]),
    e("MolecularSequence", &[p("patient", &["patient"])]),
    e("NutritionOrder", &[p("patient", &["patient"])]),
    e("Observation", &[p("subject", &["subject"]), p("performer", &["performer"])]),
    // Kept as data only: `patient_ids` does not follow Patient.link (D16).
    e("Patient", &[p("link", &["link.other"])]),
    e("Person", &[p("patient", &["link.target"])]),
    e("Procedure", &[p("patient", &["subject"]), p("performer", &["performer.actor"])]),
    e("Provenance", &[p("patient", &["target"])]),
    e("QuestionnaireResponse", &[p("subject", &["subject"]), p("author", &["author"])]),
    e("RelatedPerson", &[p("patient", &["patient"])]),
    e("RequestGroup", &[p("subject", &["subject"]), p("participant", &["action.participant"])]),
    e("ResearchSubject", &[p("individual", &["individual"])]),
    e("RiskAssessment", &[p("subject", &["subject"])]),
    e("Schedule", &[p("actor", &["actor"])]),
    e("ServiceRequest", &[p("subject", &["subject"]), p("performer", &["performer"])]),
    e("Specimen", &[p("subject", &["subject"])]),
    e("SupplyDelivery", &[p("patient", &["patient"])]),
    e("SupplyRequest", &[p("subject", &["deliverTo"])]),
    e("VisionPrescription", &[p("patient", &["patient"])]),
];

/// The compartment entry for a resource type, or `None` when the type cannot be in a patient's
/// compartment (or is unknown). A binary search over [`PATIENT_COMPARTMENT`].
pub fn compartment_entry(t: &str) -> Option<&'static CompartmentEntry> {
    PATIENT_COMPARTMENT.binary_search_by(|entry| entry.resource_type.cmp(t)).ok().map(|i| &PATIENT_COMPARTMENT[i])
}

/// Whether resources of this type can be in a patient's compartment.
pub fn is_patient_compartment_type(t: &str) -> bool {
    compartment_entry(t).is_some()
}

/// The ids of the patients whose compartment the resource is in.
///
/// - A `Patient` is in its own compartment only: the result is its `id` (when that is a
///   non-empty string), and `Patient.link` is not followed (D16).
/// - For another type of the compartment, every path of every linking parameter is walked (a
///   step into an array visits every element; missing elements, `null`s and values of the wrong
///   shape are skipped) to `Reference` objects, and each `reference` string that points at a
///   Patient (see [`patient_reference_id`]) contributes its id.
/// - Resources without a string `resourceType`, of unknown types or of types outside the
///   compartment give an empty set.
pub fn patient_ids(resource: &Json<'_>) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let Some(resource_type) = resource.get("resourceType").and_then(Json::as_str) else {
        return ids;
    };
    if resource_type == "Patient" {
        if let Some(id) = resource.get("id").and_then(Json::as_str)
            && !id.is_empty()
        {
            ids.insert(id.into_owned());
        }
        return ids;
    }
    let Some(entry) = compartment_entry(&resource_type) else {
        return ids;
    };
    for param in entry.params {
        for path in param.paths {
            collect_patient_ids(resource, path, &mut ids);
        }
    }
    ids
}

/// Walks `path` (dot-separated element names) from `value`, fanning out over arrays, and adds
/// the patient id of every Reference found at the end of it.
fn collect_patient_ids(value: &Json<'_>, path: &str, ids: &mut BTreeSet<String>) {
    match value {
        Json::Array(items) => {
            for item in items {
                collect_patient_ids(item, path, ids);
            }
        }
        Json::Object(_) if path.is_empty() => add_reference(value, ids),
        Json::Object(_) => {
            let (head, rest) = path.split_once('.').unwrap_or((path, ""));
            if let Some(child) = value.get(head) {
                collect_patient_ids(child, rest, ids);
            }
        }
        _ => {}
    }
}

/// Adds the patient id of a `Reference` object, if its `reference` points at a Patient.
fn add_reference(reference: &Json<'_>, ids: &mut BTreeSet<String>) {
    if let Some(reference) = reference.get("reference").and_then(Json::as_str)
        && let Some(id) = patient_reference_id(&reference)
    {
        ids.insert(id.to_owned());
    }
}

/// The patient id a literal reference string points at, if it points at a Patient.
///
/// Accepted forms: relative `Patient/123`, versioned `Patient/123/_history/4`, and absolute
/// `https://host/fhir/Patient/123` (also versioned). The id (and a version) must be a valid FHIR
/// id: 1 to 64 of `A-Z a-z 0-9 - .`. Contained references (`#x`), `urn:` references
/// (`urn:uuid:…`, `urn:oid:…`), searches (`Patient?identifier=…`), references to other types
/// and anything malformed give `None`. The type name is matched case-sensitively.
pub fn patient_reference_id(reference: &str) -> Option<&str> {
    if reference.starts_with('#') || reference.starts_with("urn:") {
        return None;
    }
    let unversioned = match reference.split_once("/_history/") {
        Some((base, version)) if is_fhir_id(version) => base,
        Some(_) => return None,
        None => reference,
    };
    let (before, id) = unversioned.rsplit_once('/')?;
    let resource_type = before.rsplit_once('/').map_or(before, |(_, t)| t);
    (resource_type == "Patient" && is_fhir_id(id)).then_some(id)
}

/// Whether `s` matches the FHIR `id` syntax `[A-Za-z0-9\-\.]{1,64}`.
fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};

    use serde_json::{Value, json};

    use super::*;
    use crate::types::is_r4_resource_type;

    /// The resource types of the R4 Patient compartment that have linking parameters, as listed
    /// in the specification.
    const SPEC_TYPES: [&str; 66] = [
        "Account",
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "AppointmentResponse",
        "AuditEvent",
        "Basic",
        "BodyStructure",
        "CarePlan",
        "CareTeam",
        "ChargeItem",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "Communication",
        "CommunicationRequest",
        "Composition",
        "Condition",
        "Consent",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "Encounter",
        "EnrollmentRequest",
        "EpisodeOfCare",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "Group",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "Invoice",
        "List",
        "MeasureReport",
        "Media",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationRequest",
        "MedicationStatement",
        "MolecularSequence",
        "NutritionOrder",
        "Observation",
        "Patient",
        "Person",
        "Procedure",
        "Provenance",
        "QuestionnaireResponse",
        "RelatedPerson",
        "RequestGroup",
        "ResearchSubject",
        "RiskAssessment",
        "Schedule",
        "ServiceRequest",
        "Specimen",
        "SupplyDelivery",
        "SupplyRequest",
        "VisionPrescription",
    ];

    /// A parameter name and its paths, as written in the expectations.
    type ExpectedParam = (&'static str, &'static [&'static str]);

    fn params_of(t: &str) -> Vec<(&'static str, Vec<&'static str>)> {
        compartment_entry(t)
            .unwrap_or_else(|| panic!("{t} is not in the compartment"))
            .params
            .iter()
            .map(|param| (param.name, param.paths.to_vec()))
            .collect()
    }

    /// `patient_ids` of a `serde_json` value (written out and read back exactly).
    fn patient_ids(resource: &Value) -> BTreeSet<String> {
        super::patient_ids(&Json::parse(&resource.to_string()).unwrap())
    }

    fn ids(resource: &Value) -> Vec<String> {
        patient_ids(resource).into_iter().collect()
    }

    // ---- the table ----

    #[test]
    fn table_has_the_66_spec_types_sorted_unique_and_all_r4() {
        assert_eq!(PATIENT_COMPARTMENT.len(), 66);
        let types: Vec<&str> = PATIENT_COMPARTMENT.iter().map(|e| e.resource_type).collect();
        assert_eq!(types, SPEC_TYPES);
        for pair in PATIENT_COMPARTMENT.windows(2) {
            assert!(pair[0].resource_type < pair[1].resource_type);
        }
        for entry in PATIENT_COMPARTMENT {
            assert!(is_r4_resource_type(entry.resource_type), "{}", entry.resource_type);
        }
    }

    #[test]
    fn every_entry_has_params_and_every_param_has_well_formed_paths() {
        let mut params = 0;
        for entry in PATIENT_COMPARTMENT {
            assert!(!entry.params.is_empty(), "{}", entry.resource_type);
            let names: BTreeSet<&str> = entry.params.iter().map(|p| p.name).collect();
            assert_eq!(names.len(), entry.params.len(), "{}", entry.resource_type);
            for param in entry.params {
                params += 1;
                assert!(!param.name.is_empty());
                assert!(!param.paths.is_empty(), "{}.{}", entry.resource_type, param.name);
                for path in param.paths {
                    for step in path.split('.') {
                        assert!(
                            step.starts_with(|c: char| c.is_ascii_lowercase())
                                && step.chars().all(|c| c.is_ascii_alphanumeric()),
                            "{}: bad path {path:?}",
                            entry.resource_type
                        );
                    }
                }
            }
        }
        // Parameter occurrences in the R4 CompartmentDefinition.
        assert_eq!(params, 100);
    }

    #[test]
    fn lookup_finds_every_entry_and_nothing_else() {
        for entry in PATIENT_COMPARTMENT {
            let found = compartment_entry(entry.resource_type).expect("entry");
            assert!(std::ptr::eq(found, entry));
            assert!(is_patient_compartment_type(entry.resource_type));
        }
        for t in crate::types::R4_RESOURCE_TYPES {
            assert_eq!(is_patient_compartment_type(t), SPEC_TYPES.contains(t), "{t}");
        }
        for t in [
            "Device",
            "Organization",
            "Practitioner",
            "PractitionerRole",
            "Location",
            "Medication",
            "Task",
            "Bundle",
            "Binary",
            "observation",
            "",
            "Observation ",
            "Zzz",
            "Aaa",
        ] {
            assert!(compartment_entry(t).is_none(), "{t:?}");
        }
    }

    #[test]
    fn params_and_paths_match_the_spec() {
        let cases: &[(&str, &[ExpectedParam])] = &[
            ("Account", &[("subject", &["subject"])]),
            (
                "AllergyIntolerance",
                &[("patient", &["patient"]), ("recorder", &["recorder"]), ("asserter", &["asserter"])],
            ),
            ("Appointment", &[("actor", &["participant.actor"])]),
            ("AuditEvent", &[("patient", &["agent.who", "entity.what"])]),
            ("CarePlan", &[("patient", &["subject"]), ("performer", &["activity.detail.performer"])]),
            ("CareTeam", &[("patient", &["subject"]), ("participant", &["participant.member"])]),
            ("Claim", &[("patient", &["patient"]), ("payee", &["payee.party"])]),
            ("Composition", &[("subject", &["subject"]), ("author", &["author"]), ("attester", &["attester.party"])]),
            (
                "Coverage",
                &[
                    ("policy-holder", &["policyHolder"]),
                    ("subscriber", &["subscriber"]),
                    ("beneficiary", &["beneficiary"]),
                    ("payor", &["payor"]),
                ],
            ),
            ("DocumentReference", &[("subject", &["subject"]), ("author", &["author"])]),
            ("Encounter", &[("patient", &["subject"])]),
            ("EnrollmentRequest", &[("subject", &["candidate"])]),
            ("ExplanationOfBenefit", &[("patient", &["patient"]), ("payee", &["payee.party"])]),
            ("Group", &[("member", &["member.entity"])]),
            ("Immunization", &[("patient", &["patient"])]),
            ("Invoice", &[("subject", &["subject"]), ("patient", &["subject"]), ("recipient", &["recipient"])]),
            (
                "MedicationDispense",
                &[("subject", &["subject"]), ("patient", &["subject"]), ("receiver", &["receiver"])],
            ),
            ("MedicationRequest", &[("subject", &["subject"])]),
            ("Observation", &[("subject", &["subject"]), ("performer", &["performer"])]),
            ("Patient", &[("link", &["link.other"])]),
            ("Person", &[("patient", &["link.target"])]),
            ("Procedure", &[("patient", &["subject"]), ("performer", &["performer.actor"])]),
            ("Provenance", &[("patient", &["target"])]),
            ("RequestGroup", &[("subject", &["subject"]), ("participant", &["action.participant"])]),
            ("ResearchSubject", &[("individual", &["individual"])]),
            ("Schedule", &[("actor", &["actor"])]),
            ("SupplyRequest", &[("subject", &["deliverTo"])]),
        ];
        for (t, expected) in cases {
            let expected: Vec<(&str, Vec<&str>)> = expected.iter().map(|(n, ps)| (*n, ps.to_vec())).collect();
            assert_eq!(params_of(t), expected, "{t}");
        }
    }

    // ---- reference strings ----

    #[test]
    fn reference_forms() {
        let yes = [
            ("Patient/123", "123"),
            ("Patient/123/_history/4", "123"),
            ("https://host/fhir/Patient/123", "123"),
            ("https://host/fhir/Patient/123/_history/4", "123"),
            ("http://example.org/Patient/a-b.C", "a-b.C"),
            ("Patient/6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", "6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2"),
        ];
        for (reference, id) in yes {
            assert_eq!(patient_reference_id(reference), Some(id), "{reference}");
        }
        let long_id = "x".repeat(65);
        let too_long = format!("Patient/{long_id}");
        let no = [
            "#p1",
            "#Patient/1",
            "urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2",
            "urn:oid:1.2.3",
            "Practitioner/123",
            "Group/123",
            "RelatedPerson/123",
            "https://host/fhir/Organization/1",
            "patient/123",
            "Patient",
            "Patient/",
            "Patient//",
            "Patient/123/",
            "Patient/1 2",
            "Patient/123/_history/",
            "Patient/123/_history/x y",
            "Patient?identifier=abc",
            "Patient/123?x=1",
            "Patient/123#frag",
            "",
            "123",
            too_long.as_str(),
        ];
        for reference in no {
            assert_eq!(patient_reference_id(reference), None, "{reference:?}");
        }
        let longest = format!("Patient/{}", "x".repeat(64));
        assert_eq!(patient_reference_id(&longest).map(str::len), Some(64));
    }

    // ---- patient_ids on realistic resources ----

    #[test]
    fn observation_subject_and_performer() {
        let obs = json!({
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "performer": [
                {"reference": "Practitioner/dr"},
                {"reference": "Patient/p2"}
            ],
            "valueQuantity": {"value": 180.0, "unit": "cm"}
        });
        assert_eq!(ids(&obs), ["p1", "p2"]);
    }

    #[test]
    fn encounter_links_only_through_subject() {
        let enc = json!({
            "resourceType": "Encounter",
            "id": "e1",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": "Patient/p1", "display": "Mr. Abram Lemke"},
            "participant": [
                {"individual": {"reference": "Practitioner/dr", "display": "Dr. X"}},
                // Not a link in the R4 Patient compartment (participant is the
                // Practitioner/RelatedPerson compartments' parameter).
                {"individual": {"reference": "Patient/p9"}}
            ],
            "serviceProvider": {"reference": "Organization/org"}
        });
        assert_eq!(ids(&enc), ["p1"]);
        let for_group = json!({
            "resourceType": "Encounter",
            "subject": {"reference": "Group/g1"}
        });
        assert!(patient_ids(&for_group).is_empty());
    }

    #[test]
    fn claim_and_explanation_of_benefit() {
        let claim = json!({
            "resourceType": "Claim",
            "id": "c1",
            "status": "active",
            "patient": {"reference": "Patient/p1", "display": "Abram Lemke"},
            "provider": {"reference": "Organization/org"},
            "insurance": [{"sequence": 1, "coverage": {"display": "Medicaid"}}],
            "payee": {"type": {"text": "subscriber"}, "party": {"reference": "Patient/p2"}}
        });
        assert_eq!(ids(&claim), ["p1", "p2"]);
        let eob = json!({
            "resourceType": "ExplanationOfBenefit",
            "id": "eob1",
            "contained": [
                {"resourceType": "ServiceRequest", "id": "referral",
                 "subject": {"reference": "Patient/contained-only"}},
                {"resourceType": "Coverage", "id": "coverage",
                 "beneficiary": {"reference": "Patient/contained-only"}}
            ],
            "patient": {"reference": "Patient/p1"},
            "insurer": {"display": "Medicaid"},
            "provider": {"reference": "Practitioner/dr"},
            "referral": {"reference": "#referral"},
            "claim": {"reference": "Claim/c1"},
            "insurance": [{"focal": true, "coverage": {"reference": "#coverage"}}],
            "payee": {"party": {"reference": "Organization/org"}}
        });
        assert_eq!(ids(&eob), ["p1"]);
    }

    #[test]
    fn provenance_targets() {
        let prov = json!({
            "resourceType": "Provenance",
            "id": "prov1",
            "target": [
                {"reference": "Patient/p1"},
                {"reference": "Encounter/e1"},
                {"reference": "Observation/o1"},
                {"reference": "https://host/fhir/Patient/p2/_history/3"},
                {"reference": "urn:uuid:0b6e33d5-1e4e-4b93-9e5b-6e6cbe1d2b52"},
                {"reference": "Patient/p1"},
                {"reference": "Patient/p3/_history/1"},
                {"identifier": {"value": "no-reference"}}
            ],
            "recorded": "2020-01-01T00:00:00Z",
            "agent": [{"who": {"reference": "Patient/not-a-target"}}]
        });
        assert_eq!(ids(&prov), ["p1", "p2", "p3"]);
    }

    #[test]
    fn group_members() {
        let group = json!({
            "resourceType": "Group",
            "id": "g1",
            "type": "person",
            "actual": true,
            "member": [
                {"entity": {"reference": "Patient/p1"}},
                {"entity": {"reference": "Patient/p2"}, "inactive": true},
                {"entity": {"reference": "Practitioner/dr"}},
                {"entity": {"reference": "Group/g2"}},
                {"period": {"start": "2020"}}
            ]
        });
        assert_eq!(ids(&group), ["p1", "p2"]);
        let empty = json!({"resourceType": "Group", "type": "person", "actual": true});
        assert!(patient_ids(&empty).is_empty());
    }

    #[test]
    fn care_team_subject_and_participants() {
        let team = json!({
            "resourceType": "CareTeam",
            "id": "ct1",
            "status": "active",
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "participant": [
                {"role": [{"text": "Patient"}],
                 "member": {"reference": "Patient/p1", "display": "Mr. Abram Lemke"}},
                {"role": [{"text": "Healthcare professional"}],
                 "member": {"reference": "Practitioner/dr"}},
                {"role": [{"text": "Caregiver"}],
                 "member": {"reference": "Patient/p2"}},
                {"member": {"reference": "Organization/org"}}
            ],
            "managingOrganization": [{"reference": "Organization/org"}]
        });
        assert_eq!(ids(&team), ["p1", "p2"]);
    }

    #[test]
    fn allergy_intolerance_patient_recorder_asserter() {
        let allergy = json!({
            "resourceType": "AllergyIntolerance",
            "id": "a1",
            "patient": {"reference": "Patient/p1"},
            "recorder": {"reference": "Patient/p2"},
            "asserter": {"reference": "https://other/fhir/Patient/p3"}
        });
        assert_eq!(ids(&allergy), ["p1", "p2", "p3"]);
        let by_practitioner = json!({
            "resourceType": "AllergyIntolerance",
            "patient": {"reference": "Patient/p1"},
            "recorder": {"reference": "Practitioner/dr"},
            "asserter": {"reference": "RelatedPerson/rp"}
        });
        assert_eq!(ids(&by_practitioner), ["p1"]);
    }

    #[test]
    fn immunization_document_reference_and_more() {
        let imm = json!({
            "resourceType": "Immunization",
            "id": "i1",
            "status": "completed",
            "vaccineCode": {"coding": [{"code": "140"}]},
            "patient": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "occurrenceDateTime": "2010-01-01",
            "performer": [{"actor": {"reference": "Patient/not-a-link"}}]
        });
        assert_eq!(ids(&imm), ["p1"]);
        let doc = json!({
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "subject": {"reference": "Patient/p1"},
            "author": [{"reference": "Practitioner/dr"}, {"reference": "Patient/p4"}],
            "custodian": {"reference": "Patient/not-a-link"},
            "content": [{"attachment": {"contentType": "text/plain"}}]
        });
        assert_eq!(ids(&doc), ["p1", "p4"]);
        let coverage = json!({
            "resourceType": "Coverage",
            "policyHolder": {"reference": "Patient/holder"},
            "subscriber": {"reference": "RelatedPerson/sub"},
            "beneficiary": {"reference": "Patient/p1"},
            "payor": [{"reference": "Organization/ins"}, {"reference": "Patient/payor"}]
        });
        assert_eq!(ids(&coverage), ["holder", "p1", "payor"]);
        let plan = json!({
            "resourceType": "CarePlan",
            "subject": {"reference": "Patient/p1"},
            "activity": [
                {"detail": {"performer": [{"reference": "Patient/p5"}]}},
                {"detail": {"status": "completed"}},
                {"reference": {"reference": "ServiceRequest/s1"}}
            ]
        });
        assert_eq!(ids(&plan), ["p1", "p5"]);
        let person = json!({
            "resourceType": "Person",
            "link": [{"target": {"reference": "Patient/p1"}}, {"target": {"reference": "Practitioner/x"}}]
        });
        assert_eq!(ids(&person), ["p1"]);
    }

    #[test]
    fn device_is_not_in_the_r4_patient_compartment() {
        let device = json!({
            "resourceType": "Device",
            "id": "dev1",
            "status": "active",
            "type": {"coding": [{"code": "72506001"}]},
            "patient": {"reference": "Patient/p1"}
        });
        assert!(patient_ids(&device).is_empty());
        for t in ["Organization", "Practitioner", "Location", "PractitionerRole", "Medication"] {
            let other = json!({"resourceType": t, "subject": {"reference": "Patient/p1"},
                               "patient": {"reference": "Patient/p1"}});
            assert!(patient_ids(&other).is_empty(), "{t}");
        }
    }

    #[test]
    fn patient_is_only_in_its_own_compartment() {
        let patient = json!({
            "resourceType": "Patient",
            "id": "p1",
            "link": [
                {"other": {"reference": "Patient/p2"}, "type": "replaced-by"},
                {"other": {"reference": "Patient/p3"}, "type": "seealso"}
            ],
            "generalPractitioner": [{"reference": "Practitioner/dr"}]
        });
        assert_eq!(ids(&patient), ["p1"]);
        let no_id = json!({"resourceType": "Patient", "link": [{"other": {"reference": "Patient/p2"}}]});
        assert!(patient_ids(&no_id).is_empty());
        for bad in [json!(null), json!(7), json!(""), json!(["p1"])] {
            let patient = json!({"resourceType": "Patient", "id": bad});
            assert!(patient_ids(&patient).is_empty(), "{patient}");
        }
    }

    #[test]
    fn odd_shapes_are_skipped() {
        let cases = [
            json!({"resourceType": "Observation"}),
            json!({"resourceType": "Observation", "subject": null}),
            json!({"resourceType": "Observation", "subject": 42}),
            json!({"resourceType": "Observation", "subject": "Patient/p1"}),
            json!({"resourceType": "Observation", "subject": {"reference": null}}),
            json!({"resourceType": "Observation", "subject": {"reference": 17}}),
            json!({"resourceType": "Observation", "subject": {"reference": ["Patient/p1"]}}),
            json!({"resourceType": "Observation", "subject": {"reference": {"id": "p1"}}}),
            json!({"resourceType": "Observation", "subject": {"display": "Someone"}}),
            json!({"resourceType": "Observation", "subject": {"reference": "#p1"}}),
            json!({"resourceType": "Observation", "performer": [null, 3, "x", [], {}]}),
            json!({"resourceType": "Procedure", "performer": {"actor": null}}),
            json!({"resourceType": "Procedure", "performer": [{"actor": [null, 1]}]}),
            json!({"resourceType": "Group", "member": "Patient/p1"}),
            json!({"resourceType": "Group", "member": [{"entity": "Patient/p1"}]}),
            json!({"resourceType": "Unknown", "subject": {"reference": "Patient/p1"}}),
            json!({"resourceType": 5, "subject": {"reference": "Patient/p1"}}),
            json!({"resourceType": null, "subject": {"reference": "Patient/p1"}}),
            json!({"subject": {"reference": "Patient/p1"}}),
            json!({"resourceType": "observation", "subject": {"reference": "Patient/p1"}}),
            json!(null),
            json!(12),
            json!("Observation"),
            json!([{"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}]),
        ];
        for resource in cases {
            assert!(patient_ids(&resource).is_empty(), "{resource}");
        }
    }

    #[test]
    fn arrays_fan_out_at_every_step() {
        // A single object where an array is expected (and vice versa) is walked as it is.
        let proc_single = json!({
            "resourceType": "Procedure",
            "subject": {"reference": "Patient/p1"},
            "performer": {"actor": {"reference": "Patient/p2"}}
        });
        assert_eq!(ids(&proc_single), ["p1", "p2"]);
        let proc_many = json!({
            "resourceType": "Procedure",
            "subject": [{"reference": "Patient/p1"}, {"reference": "Patient/p3"}],
            "performer": [
                {"actor": {"reference": "Patient/p2"}},
                {"actor": [{"reference": "Patient/p4"}, {"reference": "Device/d"}]},
                {"function": {"text": "no actor"}}
            ]
        });
        assert_eq!(ids(&proc_many), ["p1", "p2", "p3", "p4"]);
        let request_group = json!({
            "resourceType": "RequestGroup",
            "action": [
                {"participant": [{"reference": "Patient/p1"}, {"reference": "Patient/p2"}]},
                {"participant": [{"reference": "Practitioner/dr"}]},
                // Nested actions are not part of the R4 expression.
                {"action": [{"participant": [{"reference": "Patient/nested"}]}]}
            ]
        });
        assert_eq!(ids(&request_group), ["p1", "p2"]);
        let audit = json!({
            "resourceType": "AuditEvent",
            "agent": [{"who": {"reference": "Patient/p1"}}, {"who": {"reference": "Device/d"}}],
            "entity": [{"what": {"reference": "Patient/p2/_history/9"}}, {"what": {"reference": "Observation/o"}}]
        });
        assert_eq!(ids(&audit), ["p1", "p2"]);
    }

    // ---- real data ----

    const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data/r4-100-patients-groups");

    #[test]
    fn synthea_sample_every_compartment_resource_has_a_patient() {
        let mut files: Vec<_> = std::fs::read_dir(DATA_DIR)
            .unwrap_or_else(|e| panic!("cannot read {DATA_DIR}: {e}"))
            .map(|entry| entry.expect("dir entry").path())
            .filter(|path| path.to_string_lossy().ends_with(".ndjson.gz"))
            .collect();
        files.sort();
        assert!(files.len() >= 10, "too few files in {DATA_DIR}");

        let mut patients = BTreeSet::new();
        let mut referenced = BTreeSet::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for path in &files {
            let file = std::fs::File::open(path).expect("open");
            let reader = BufReader::new(flate2::read::GzDecoder::new(file));
            for (n, line) in reader.lines().enumerate() {
                let line = line.expect("read line");
                if line.trim().is_empty() {
                    continue;
                }
                let resource: Value = serde_json::from_str(&line).expect("JSON");
                let t = resource["resourceType"].as_str().expect("resourceType").to_owned();
                let found = patient_ids(&resource);
                let at = format!("{}:{}", path.display(), n + 1);
                if is_patient_compartment_type(&t) {
                    assert!(!found.is_empty(), "{t} without a patient at {at}");
                } else {
                    assert!(
                        ["Organization", "Practitioner", "Location", "PractitionerRole", "Device"]
                            .contains(&t.as_str()),
                        "unexpected type {t} at {at}"
                    );
                    assert!(found.is_empty(), "{t} at {at}");
                }
                if t == "Patient" {
                    let id = resource["id"].as_str().expect("Patient.id");
                    assert_eq!(found, BTreeSet::from([id.to_owned()]), "{at}");
                    patients.insert(id.to_owned());
                }
                referenced.extend(found);
                *counts.entry(t).or_default() += 1;
            }
        }
        assert_eq!(patients.len(), 100);
        assert_eq!(referenced, patients);
        for t in ["Observation", "Encounter", "Claim", "ExplanationOfBenefit", "Group"] {
            assert!(counts.get(t).copied().unwrap_or(0) > 0, "no {t} in the sample");
        }
    }
}
