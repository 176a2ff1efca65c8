//! Checking the value of each parameter.

use sluice_fhir::{Issue, IssueCode, is_r4_resource_type};
use time::OffsetDateTime;

use crate::input::Value;
use crate::{ExportPlan, Issues, KNOWN_PARAMETERS, Level, OutputFormat, TypeQuery, TypeSelection};

/// Reads an `_outputFormat` value (see [`OutputFormat::parse`]).
pub(crate) fn output_format(value: &str) -> Option<OutputFormat> {
    let s = value.trim().replace(' ', "+").to_ascii_lowercase();
    if s == "ndjson.gz" {
        return Some(OutputFormat::NdjsonGz);
    }
    let subtype = s.strip_prefix("application/").unwrap_or(&s);
    let (mut fhir, mut ndjson, mut gzip) = (false, false, false);
    for token in subtype.split('+') {
        let seen = match token {
            "fhir" => &mut fhir,
            "ndjson" => &mut ndjson,
            "gzip" => &mut gzip,
            _ => return None,
        };
        if *seen {
            return None;
        }
        *seen = true;
    }
    match (fhir, ndjson, gzip) {
        (_, true, false) => Some(OutputFormat::Ndjson),
        (_, true, true) | (false, false, true) => Some(OutputFormat::NdjsonGz),
        _ => None,
    }
}

/// `_outputFormat`: a problem when not recognised.
pub(crate) fn check_output_format(value: &str, cx: &mut Issues) -> Option<OutputFormat> {
    let format = output_format(value);
    if format.is_none() {
        cx.reject(
            Issue::error(
                IssueCode::NotSupported,
                format!(
                    "_outputFormat '{value}' is not supported; use application/fhir+ndjson \
                     (also application/ndjson, ndjson) or, for gzip-compressed files, \
                     application/fhir+ndjson+gzip (also application/ndjson+gzip, ndjson+gzip, \
                     ndjson.gz, gzip, application/gzip)."
                ),
            )
            .at("_outputFormat"),
        );
    }
    format
}

/// Splits a comma list: entries trimmed, empty entries dropped.
fn entries(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty())
}

/// `_type`: every entry must be a standard R4 type; `Group` is not exported at patient and
/// group level (D9). Valid entries are appended to `types` unless already there.
pub(crate) fn check_types(list: &str, level: &Level, types: &mut Vec<String>, cx: &mut Issues) {
    for t in entries(list) {
        if !is_r4_resource_type(t) {
            let hint = case_insensitive_type(t).map(|real| format!(" (did you mean {real}?)")).unwrap_or_default();
            cx.reject(
                Issue::error(
                    IssueCode::NotSupported,
                    format!(
                        "_type '{t}' is not a standard FHIR R4 resource type{hint}; _type takes \
                         a comma-separated list of R4 resource types (e.g. \
                         Patient,Observation), names are case-sensitive."
                    ),
                )
                .at("_type"),
            );
        } else if t == "Group" && level.is_patient_based() {
            cx.reject(
                Issue::error(
                    IssueCode::NotSupported,
                    format!(
                        "_type 'Group' is not exported by a {}-level export: a Group's \
                         characteristics and member list are not data about its patients; \
                         use the system-level [base]/$export?_type=Group, or read the Group \
                         directly.",
                        level.name()
                    ),
                )
                .at("_type"),
            );
        } else if !types.iter().any(|x| x == t) {
            types.push(t.to_string());
        }
    }
}

/// The R4 type that differs from `t` only in letter case, if any.
fn case_insensitive_type(t: &str) -> Option<&'static str> {
    sluice_fhir::R4_RESOURCE_TYPES.iter().copied().find(|real| real.eq_ignore_ascii_case(t))
}

/// `_since` / `_until`: a FHIR instant, dateTime or date (D5).
pub(crate) fn check_instant(name: &str, value: &str, cx: &mut Issues) -> Option<OffsetDateTime> {
    match sluice_fhir::instant::parse(value) {
        Ok(t) => Some(t),
        Err(e) => {
            cx.reject(
                Issue::error(
                    IssueCode::Invalid,
                    format!(
                        "{name}: {e}. A date without a time zone is read as UTC; encode '+' in \
                         an offset as %2B."
                    ),
                )
                .at(name),
            );
            None
        }
    }
}

/// Whether `id` is a FHIR id: 1-64 of `A-Z a-z 0-9 - .`.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Adds `id` to `patients` unless already there.
fn push_patient(id: &str, patients: &mut Vec<String>) {
    if !patients.iter().any(|p| p == id) {
        patients.push(id.to_string());
    }
}

/// `patient` on a GET patient-level kick-off (D3): comma-separated `123` or `Patient/123`.
pub(crate) fn check_patient_list(list: &str, patients: &mut Vec<String>, cx: &mut Issues) {
    let mut any = false;
    for entry in entries(list) {
        any = true;
        let id = entry.strip_prefix("Patient/").unwrap_or(entry);
        if is_fhir_id(id) {
            push_patient(id, patients);
        } else {
            cx.reject(
                Issue::error(
                    IssueCode::Invalid,
                    format!(
                        "patient '{entry}' is not a patient id; patient takes a comma-separated \
                         list of ids or references such as 123 or Patient/123 (ids are 1-64 \
                         characters A-Z, a-z, 0-9, '-' and '.')."
                    ),
                )
                .at("patient"),
            );
        }
    }
    if !any {
        cx.reject(
            Issue::error(
                IssueCode::Required,
                format!(
                    "patient '{list}' names no patient; give a comma-separated list of ids or \
                     references such as 123 or Patient/123, or leave the parameter out to \
                     export all patients."
                ),
            )
            .at("patient"),
        );
    }
}

/// `patient` in a POST body (D3): a `valueReference` to `Patient/<id>`.
pub(crate) fn check_patient_value(value: &Value, patients: &mut Vec<String>, cx: &mut Issues) {
    let problem = match value {
        Value::Reference(r) => match r.trim().strip_prefix("Patient/") {
            Some(id) if is_fhir_id(id) => {
                push_patient(id, patients);
                return;
            }
            _ => format!("patient reference '{r}' is not a reference to a Patient"),
        },
        Value::Text(t) => format!("patient '{t}' is not a valueReference"),
    };
    cx.reject(
        Issue::error(
            IssueCode::Invalid,
            format!(
                "{problem}; in a POST body each patient is a parameter {{\"name\": \"patient\", \
                 \"valueReference\": {{\"reference\": \"Patient/123\"}}}}."
            ),
        )
        .at("patient"),
    );
}

/// Whether `name` looks like a FHIR element name (`birthDate`, `value[x]` spelled out as
/// `valueQuantity`, ...).
fn is_element_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase()) && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `_elements`: comma-separated `name` or `Type.name` (Type an R4 type); nested paths are
/// not supported. Valid entries are appended to `elements` as given, unless already there.
pub(crate) fn check_elements(list: &str, elements: &mut Vec<String>, cx: &mut Issues) {
    const ACCEPTED: &str = "_elements takes a comma-separated list of top-level element \
                            names, each alone (name) or with a resource type (Patient.name)";
    for entry in entries(list) {
        let parts: Vec<&str> = entry.split('.').collect();
        let problem = match parts.as_slice() {
            [name] if is_element_name(name) => None,
            [ty, name] if is_r4_resource_type(ty) && is_element_name(name) => None,
            [ty, _] if ty.is_empty() || is_r4_resource_type(ty) => Some((IssueCode::Invalid, "an element name")),
            [ty, _] if ty.starts_with(|c: char| c.is_ascii_uppercase()) => {
                Some((IssueCode::NotSupported, "a standard R4 resource type before the '.'"))
            }
            [_, _] | [_, _, _, ..] => {
                Some((IssueCode::NotSupported, "a top-level element (nested paths are not supported)"))
            }
            _ => Some((IssueCode::Invalid, "an element name")),
        };
        match problem {
            None => {
                if !elements.iter().any(|e| e == entry) {
                    elements.push(entry.to_string());
                }
            }
            Some((code, lacks)) => cx
                .reject(Issue::error(code, format!("_elements '{entry}' is not {lacks}; {ACCEPTED}.")).at("_elements")),
        }
    }
}

/// `_typeFilter`: one parameter value, holding one query or several joined with `,`. Each
/// query Sluice can run is appended to `queries` unless an equal one is already there
/// (same type and criteria); the others are problems. An empty value asks for nothing.
pub(crate) fn check_type_filter(value: &str, queries: &mut Vec<TypeQuery>, cx: &mut Issues) {
    for text in sluice_search::split_type_filter(value) {
        match sluice_search::parse_query(text) {
            Ok(query) => {
                if !queries.iter().any(|q| q.resource_type == query.resource_type && q.criteria == query.criteria) {
                    queries.push(query);
                }
            }
            Err(e) => {
                let code = if e.is_not_supported() { IssueCode::NotSupported } else { IssueCode::Invalid };
                cx.reject(
                    Issue::error(
                        code,
                        format!(
                            "_typeFilter '{text}' cannot be used: {e}. A _typeFilter value is a FHIR search \
                             query such as Observation?category=laboratory&date=ge2024-01-01; the search \
                             parameters each type supports are listed in the CapabilityStatement."
                        ),
                    )
                    .at("_typeFilter"),
                );
            }
        }
    }
}

/// A `_typeFilter` query for a type the export does not include. The Bulk Data IG has
/// `_typeFilter` filter out resources "that would have otherwise been returned" and each
/// type independently: it never adds a type, so such a query can only be a mistake.
pub(crate) fn type_filter_outside_export(query: &TypeQuery, plan: &ExportPlan, cx: &mut Issues) {
    let t = query.resource_type.as_str();
    let level = plan.level.name();
    let (why, fix) = match &plan.types {
        TypeSelection::Only(list) => {
            (format!("_type ({}) does not include {t}", list.join(",")), format!("add {t} to _type"))
        }
        TypeSelection::All if t == "Group" => {
            (format!("a {level}-level export never includes Group"), "use a system-level export".to_string())
        }
        TypeSelection::All => (
            format!(
                "a {level}-level export without _type includes only the Patient compartment types, and {t} is \
                 not one of them"
            ),
            format!("name {t} in _type, with every other type you want"),
        ),
    };
    cx.reject(
        Issue::error(
            IssueCode::Value,
            format!(
                "_typeFilter '{query}' filters {t}, but {why}; a _typeFilter only narrows the resources of the \
                 types an export includes, it never adds a type: {fix}, or leave the query out."
            ),
        )
        .at("_typeFilter"),
    );
}

/// `includeAssociatedData`: a comma list of codes. `LatestProvenanceResources` sets
/// `latest_provenance`; any other code is not supported (refused, or ignored in lenient mode).
pub(crate) fn check_associated_data(list: &str, latest_provenance: &mut bool, cx: &mut Issues) {
    const NAME: &str = "includeAssociatedData";
    const LATEST: &str = "LatestProvenanceResources";
    for code in entries(list) {
        if code == LATEST {
            *latest_provenance = true;
            continue;
        }
        let why = if code == "RelevantProvenanceResources" {
            "is not supported by this server: it exports only the latest version of each Provenance".to_string()
        } else if code.eq_ignore_ascii_case(LATEST) {
            format!("is not a code (codes are case-sensitive; did you mean {LATEST}?)")
        } else if code.starts_with('_') {
            "is an implementation-specific code this server does not define".to_string()
        } else {
            "is not a code of the IG's include-associated-data code system (LatestProvenanceResources, \
             RelevantProvenanceResources)"
                .to_string()
        };
        cx.reject(
            Issue::error(
                IssueCode::NotSupported,
                format!(
                    "{NAME} '{code}' {why}; the only value supported is {LATEST} (the current Provenance of \
                     the exported resources): use {NAME}={LATEST}, leave it out, or send Prefer: \
                     handling=lenient to have it ignored."
                ),
            )
            .at(NAME),
        );
    }
}

/// `allowPartialManifests` (v3): `true` or `false`, any case; empty means `false`.
pub(crate) fn check_allow_partial(value: &str, cx: &mut Issues) -> bool {
    let v = value.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("false") {
        return false;
    }
    if v.eq_ignore_ascii_case("true") {
        return true;
    }
    cx.reject(
        Issue::error(
            IssueCode::Invalid,
            format!("allowPartialManifests '{value}' is not a boolean; use true or false."),
        )
        .at("allowPartialManifests"),
    );
    false
}

/// `organizeOutputBy` (v3): only `Patient`, and only at patient and group level; empty
/// asks for nothing. Returns whether output is organized by patient.
pub(crate) fn check_organize_by(value: &str, level: &Level, cx: &mut Issues) -> bool {
    const NAME: &str = "organizeOutputBy";
    let v = value.trim();
    if v.is_empty() {
        return false;
    }
    if v != "Patient" {
        cx.reject(
            Issue::error(
                IssueCode::NotSupported,
                format!(
                    "organizeOutputBy '{value}' is not supported; this server organizes output by Patient \
                     only (organizeOutputBy=Patient), or by resource type when the parameter is left out."
                ),
            )
            .at(NAME),
        );
        return false;
    }
    if !level.is_patient_based() {
        cx.reject(
            Issue::error(
                IssueCode::NotSupported,
                "organizeOutputBy=Patient is supported at patient and group level, where every exported \
                 resource belongs to a patient's block; a system-level export also holds resources of no \
                 patient. Use [base]/Patient/$export or [base]/Group/[id]/$export, or leave the parameter \
                 out to get one file per resource type.",
            )
            .at(NAME),
        );
        return false;
    }
    true
}

/// `organizeOutputBy=Patient` with `_type` naming `resource_type`, which is outside the
/// Patient compartment: its resources belong to no patient's block, so they cannot be
/// exported in this organization.
pub(crate) fn type_outside_blocks(resource_type: &str, cx: &mut Issues) {
    cx.reject(
        Issue::error(
            IssueCode::NotSupported,
            format!(
                "_type {resource_type} is outside the Patient compartment, so its resources belong to no \
                 patient's block and cannot be exported with organizeOutputBy=Patient; export it \
                 without organizeOutputBy."
            ),
        )
        .at("_type"),
    );
}

/// A parameter that is not a kick-off parameter (D2).
pub(crate) fn unknown_parameter(name: &str, cx: &mut Issues) {
    let hint = KNOWN_PARAMETERS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(name) || k.trim_start_matches('_') == name)
        .map(|k| format!(" (did you mean {k}?)"))
        .unwrap_or_default();
    cx.reject(
        Issue::error(
            IssueCode::NotSupported,
            format!("Unknown parameter '{name}'{hint}; a kick-off accepts {}.", KNOWN_PARAMETERS.join(", ")),
        )
        .at(name),
    );
}
