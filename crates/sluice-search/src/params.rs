//! The search parameters Sluice supports, per resource type, as element paths over the
//! resource's JSON.
//!
//! A path is a dot-separated list of JSON member names (`name.given`); whenever a step meets
//! an array, every element is followed, so `name.given` reaches every given name of every
//! `HumanName`. Choice elements (`effective[x]`) are listed once per JSON spelling
//! (`effectiveDateTime`, `effectivePeriod`). The definitions follow the FHIR R4 search
//! parameters of the same names (and US Core's use of them).

use serde::{Deserialize, Serialize};
use sluice_fhir::is_r4_resource_type;

/// The type of a search parameter, as in FHIR's `SearchParamType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamKind {
    /// Codes and identifiers: `code`, `system|code`, `|code`, `system|`.
    Token,
    /// Dates and times, compared as ranges, with prefixes (`ge2024-01`).
    Date,
    /// References to other resources: `Type/id`, `id`, or an absolute URL.
    Reference,
    /// Text: case- and accent-insensitive starts-with by default.
    String,
    /// A `Quantity`'s value (with an optional `system|code`), compared as an exact decimal
    /// with prefixes (`gt5.40`), never through binary floating point.
    Quantity,
}

impl ParamKind {
    /// The FHIR `SearchParamType` code: `token`, `date`, `reference` or `string`.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::Token => "token",
            ParamKind::Date => "date",
            ParamKind::Reference => "reference",
            ParamKind::String => "string",
            ParamKind::Quantity => "quantity",
        }
    }
}

/// One supported search parameter.
#[derive(Debug)]
pub(crate) struct ParamDef {
    /// The parameter name (`code`, `_lastUpdated`).
    pub(crate) name: &'static str,
    /// Its type.
    pub(crate) kind: ParamKind,
    /// The element paths it searches.
    pub(crate) paths: &'static [&'static str],
    /// For a reference parameter that can only point to one resource type (`patient`,
    /// `encounter`): that type. A bare id in the search value means this type.
    pub(crate) target: Option<&'static str>,
}

const fn token(name: &'static str, paths: &'static [&'static str]) -> ParamDef {
    ParamDef { name, kind: ParamKind::Token, paths, target: None }
}

const fn date(name: &'static str, paths: &'static [&'static str]) -> ParamDef {
    ParamDef { name, kind: ParamKind::Date, paths, target: None }
}

const fn string(name: &'static str, paths: &'static [&'static str]) -> ParamDef {
    ParamDef { name, kind: ParamKind::String, paths, target: None }
}

const fn quantity(name: &'static str, paths: &'static [&'static str]) -> ParamDef {
    ParamDef { name, kind: ParamKind::Quantity, paths, target: None }
}

const fn reference(name: &'static str, paths: &'static [&'static str], target: Option<&'static str>) -> ParamDef {
    ParamDef { name, kind: ParamKind::Reference, paths, target }
}

/// `patient`: the `subject` when it is a Patient.
const PATIENT_SUBJECT: ParamDef = reference("patient", &["subject"], Some("Patient"));
/// `subject`: the `subject`, whatever its type.
const SUBJECT: ParamDef = reference("subject", &["subject"], None);
/// `patient`: a `patient` element.
const PATIENT: ParamDef = reference("patient", &["patient"], Some("Patient"));
/// `encounter`: the `encounter` element.
const ENCOUNTER: ParamDef = reference("encounter", &["encounter"], Some("Encounter"));
/// `status`: a plain `status` code.
const STATUS: ParamDef = token("status", &["status"]);
/// `identifier`: the `identifier` list.
const IDENTIFIER: ParamDef = token("identifier", &["identifier"]);
/// `active`: the `active` boolean.
const ACTIVE: ParamDef = token("active", &["active"]);
/// Every string part of a `HumanName` list called `name`.
const HUMAN_NAME: &[&str] = &["name.family", "name.given", "name.prefix", "name.suffix", "name.text"];

/// The parameters every resource type has.
const COMMON: &[ParamDef] = &[token("_id", &["id"]), date("_lastUpdated", &["meta.lastUpdated"])];

const OBSERVATION: &[ParamDef] = &[
    token("category", &["category"]),
    token("code", &["code"]),
    STATUS,
    date("date", &["effectiveDateTime", "effectivePeriod", "effectiveInstant"]),
    quantity("value-quantity", &["valueQuantity"]),
    quantity("component-value-quantity", &["component.valueQuantity"]),
    PATIENT_SUBJECT,
    SUBJECT,
    ENCOUNTER,
];

const CONDITION: &[ParamDef] = &[
    token("category", &["category"]),
    token("code", &["code"]),
    token("clinical-status", &["clinicalStatus"]),
    token("verification-status", &["verificationStatus"]),
    date("onset-date", &["onsetDateTime", "onsetPeriod"]),
    date("abatement-date", &["abatementDateTime", "abatementPeriod"]),
    date("recorded-date", &["recordedDate"]),
    PATIENT_SUBJECT,
    SUBJECT,
    ENCOUNTER,
];

const ENCOUNTER_PARAMS: &[ParamDef] = &[
    token("class", &["class"]),
    token("type", &["type"]),
    STATUS,
    date("date", &["period"]),
    PATIENT_SUBJECT,
    SUBJECT,
];

const PROCEDURE: &[ParamDef] = &[
    token("code", &["code"]),
    STATUS,
    date("date", &["performedDateTime", "performedPeriod"]),
    PATIENT_SUBJECT,
    SUBJECT,
    ENCOUNTER,
];

const MEDICATION_REQUEST: &[ParamDef] = &[
    STATUS,
    token("intent", &["intent"]),
    date("authoredon", &["authoredOn"]),
    date("date", &["dosageInstruction.timing.event"]),
    token("code", &["medicationCodeableConcept"]),
    PATIENT_SUBJECT,
    SUBJECT,
    ENCOUNTER,
];

const IMMUNIZATION: &[ParamDef] =
    &[token("vaccine-code", &["vaccineCode"]), STATUS, date("date", &["occurrenceDateTime"]), PATIENT];

const DIAGNOSTIC_REPORT: &[ParamDef] = &[
    token("category", &["category"]),
    token("code", &["code"]),
    STATUS,
    date("date", &["effectiveDateTime", "effectivePeriod"]),
    PATIENT_SUBJECT,
    SUBJECT,
    ENCOUNTER,
];

const ALLERGY_INTOLERANCE: &[ParamDef] = &[
    token("clinical-status", &["clinicalStatus"]),
    token("verification-status", &["verificationStatus"]),
    token("category", &["category"]),
    token("code", &["code", "reaction.substance"]),
    PATIENT,
];

const CARE_PLAN: &[ParamDef] =
    &[token("category", &["category"]), STATUS, date("date", &["period"]), PATIENT_SUBJECT, SUBJECT];

const CARE_TEAM: &[ParamDef] = &[STATUS, PATIENT_SUBJECT, SUBJECT];

const DOCUMENT_REFERENCE: &[ParamDef] = &[
    token("type", &["type"]),
    token("category", &["category"]),
    STATUS,
    date("date", &["date"]),
    PATIENT_SUBJECT,
    SUBJECT,
];

const PATIENT_PARAMS: &[ParamDef] = &[
    token("gender", &["gender"]),
    date("birthdate", &["birthDate"]),
    string("family", &["name.family"]),
    string("given", &["name.given"]),
    string("name", HUMAN_NAME),
    IDENTIFIER,
    ACTIVE,
];

const CLAIM: &[ParamDef] = &[PATIENT, STATUS, date("created", &["created"])];

const PRACTITIONER: &[ParamDef] = &[string("name", HUMAN_NAME), IDENTIFIER, ACTIVE];

const ORGANIZATION: &[ParamDef] = &[string("name", &["name", "alias"]), IDENTIFIER, ACTIVE];

/// The type-specific parameters of `resource_type` (empty for types with only the common
/// ones).
fn specific(resource_type: &str) -> &'static [ParamDef] {
    match resource_type {
        "AllergyIntolerance" => ALLERGY_INTOLERANCE,
        "CarePlan" => CARE_PLAN,
        "CareTeam" => CARE_TEAM,
        "Claim" | "ExplanationOfBenefit" => CLAIM,
        "Condition" => CONDITION,
        "DiagnosticReport" => DIAGNOSTIC_REPORT,
        "DocumentReference" => DOCUMENT_REFERENCE,
        "Encounter" => ENCOUNTER_PARAMS,
        "Immunization" => IMMUNIZATION,
        "MedicationRequest" => MEDICATION_REQUEST,
        "Observation" => OBSERVATION,
        "Organization" => ORGANIZATION,
        "Patient" => PATIENT_PARAMS,
        "Practitioner" => PRACTITIONER,
        "Procedure" => PROCEDURE,
        _ => &[],
    }
}

/// Every parameter of `resource_type`: the common ones first, then the type's own.
fn all(resource_type: &str) -> impl Iterator<Item = &'static ParamDef> {
    let common: &'static [ParamDef] = if is_r4_resource_type(resource_type) { COMMON } else { &[] };
    common.iter().chain(specific(resource_type))
}

/// The definition of parameter `name` on `resource_type`, if supported.
pub(crate) fn find(resource_type: &str, name: &str) -> Option<&'static ParamDef> {
    all(resource_type).find(|p| p.name == name)
}

/// The search parameters Sluice supports in a `_typeFilter` query on `resource_type`, with
/// their types, in a stable order (the common `_id` and `_lastUpdated` first), for the
/// CapabilityStatement. Empty for anything that is not a standard R4 resource type.
pub fn supported_params(resource_type: &str) -> Vec<(&'static str, ParamKind)> {
    all(resource_type).map(|p| (p.name, p.kind)).collect()
}

/// The resource types that have parameters beyond `_id` and `_lastUpdated`, sorted.
pub fn types_with_specific_params() -> &'static [&'static str] {
    &[
        "AllergyIntolerance",
        "CarePlan",
        "CareTeam",
        "Claim",
        "Condition",
        "DiagnosticReport",
        "DocumentReference",
        "Encounter",
        "ExplanationOfBenefit",
        "Immunization",
        "MedicationRequest",
        "Observation",
        "Organization",
        "Patient",
        "Practitioner",
        "Procedure",
    ]
}
