//! The bulk-data kick-off planner: turns a `$export` kick-off request (level, method, query
//! parameters, POST body, `Prefer` / `Accept` / `Content-Type` headers) into a validated
//! [`ExportPlan`], or into the complete list of [`Issue`]s that explain what is wrong.
//!
//! It is pure: no I/O, no async, no clock. The HTTP layer renders the issues as an
//! `OperationOutcome` with the status [`error_status`] picks (406 for an `Accept` we cannot
//! honour, 400 otherwise).
//!
//! Decisions it implements (see the design notes): D1 (missing `Prefer`/`Accept` is fine),
//! D2 (bad or unknown parameters are errors, or warnings under `Prefer: handling=lenient`),
//! D3 (`patient` on GET only at patient level, POST `valueReference`s at patient and group
//! level), D4 (POST at system level), D5 (`_since`/`_until` forms), D8/D9 (which types a
//! patient or group export covers), D14 (`_typeFilter`, parsed with `sluice-search`).
//!
//! `_typeFilter` (Bulk Data IG v2): each value holds one or more FHIR search queries
//! `Type?name=value&...`, joined with `,` ([`sluice_search::split_type_filter`] splits them
//! where a comma is followed by the next `Type?`); repeated parameters count as if their
//! values were comma-joined. A query may only narrow a type the export covers: a query for a
//! type that `_type` (or, without `_type`, the level) leaves out is refused, or ignored and
//! reported under `Prefer: handling=lenient`, like a query Sluice cannot run.
//!
//! `includeAssociatedData` (Bulk Data IG v2): comma list and/or repeated. Only
//! `LatestProvenanceResources` is supported ([`ExportPlan::latest_provenance`]): it adds
//! `Provenance` to the exported types, at system level restricted to the Provenance whose
//! `target` is of an exported type ([`ExportPlan::provenance_targets`]). Other codes
//! (`RelevantProvenanceResources`, implementation-specific `_...` codes) are refused, or
//! ignored and reported under `Prefer: handling=lenient`.

#![warn(missing_docs)]

mod headers;
mod input;
mod values;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sluice_fhir::{Issue, IssueCode, Severity, is_patient_compartment_type, is_r4_resource_type};
pub use sluice_search::TypeQuery;
use time::OffsetDateTime;

use crate::input::Value;

/// The export level: which kick-off endpoint was called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// `[base]/$export`: every resource of the standard R4 types.
    System,
    /// `[base]/Patient/$export`: the compartments of all (or the listed) patients.
    Patient,
    /// `[base]/Group/<id>/$export`: the compartments of the group's members.
    Group(String),
}

impl Level {
    /// `"system"`, `"patient"` or `"group"`, for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Level::System => "system",
            Level::Patient => "patient",
            Level::Group(_) => "group",
        }
    }

    /// Whether the export is built from patient compartments (patient and group level).
    pub fn is_patient_based(&self) -> bool {
        !matches!(self, Level::System)
    }
}

/// The HTTP method of the kick-off request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Parameters come from the query string.
    Get,
    /// Parameters come from a FHIR `Parameters` body.
    Post,
}

/// The format of the exported files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// Plain newline-delimited FHIR JSON (`.ndjson`).
    #[default]
    Ndjson,
    /// Gzip-compressed ndjson (`.ndjson.gz`, D10).
    NdjsonGz,
}

impl OutputFormat {
    /// The file extension without a leading dot: `ndjson` or `ndjson.gz`.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Ndjson => "ndjson",
            OutputFormat::NdjsonGz => "ndjson.gz",
        }
    }

    /// Whether the files are gzip-compressed.
    pub fn is_gzip(self) -> bool {
        self == OutputFormat::NdjsonGz
    }

    /// The `Content-Type` of the files: `application/fhir+ndjson` for both formats (D10).
    pub fn content_type(self) -> &'static str {
        "application/fhir+ndjson"
    }

    /// The `Content-Encoding` of the files: `gzip` for [`OutputFormat::NdjsonGz`] (D10).
    pub fn content_encoding(self) -> Option<&'static str> {
        self.is_gzip().then_some("gzip")
    }

    /// Reads an `_outputFormat` value; `None` when it is not one Sluice accepts.
    ///
    /// Case-insensitive. `application/` is optional and the `+`-joined tokens `fhir`,
    /// `ndjson` and `gzip` may come in any order (each at most once): `application/fhir+ndjson`,
    /// `application/ndjson+fhir`, `application/ndjson`, `ndjson` mean ndjson; the same with
    /// `gzip` added (`application/fhir+ndjson+gzip`, `application/gzip+ndjson+fhir`,
    /// `ndjson+gzip`, ...) and `gzip`, `application/gzip`, `ndjson.gz` mean gzipped ndjson.
    /// A `+` that arrived as a space (unencoded in a query string) counts as `+`.
    pub fn parse(value: &str) -> Option<OutputFormat> {
        values::output_format(value)
    }
}

/// A kick-off request, as the HTTP layer hands it over.
#[derive(Debug, Clone)]
pub struct KickoffRequest<'a> {
    /// The endpoint's level.
    pub level: Level,
    /// GET or POST.
    pub method: Method,
    /// URL-decoded query pairs, in order, repeats kept. On POST they must be empty.
    pub query: &'a [(String, String)],
    /// The POST body (ignored on GET).
    pub body: Option<&'a [u8]>,
    /// The `Content-Type` header (checked on POST only).
    pub content_type: Option<&'a str>,
    /// All `Prefer` header values joined with `", "`.
    pub prefer: Option<&'a str>,
    /// The `Accept` header.
    pub accept: Option<&'a str>,
}

impl<'a> KickoffRequest<'a> {
    /// A GET kick-off with the given query pairs and no headers.
    pub fn get(level: Level, query: &'a [(String, String)]) -> Self {
        KickoffRequest { level, method: Method::Get, query, body: None, content_type: None, prefer: None, accept: None }
    }

    /// A POST kick-off with the given body, `Content-Type: application/fhir+json` and no
    /// query parameters.
    pub fn post(level: Level, body: &'a [u8]) -> Self {
        KickoffRequest {
            level,
            method: Method::Post,
            query: &[],
            body: Some(body),
            content_type: Some("application/fhir+json"),
            prefer: None,
            accept: None,
        }
    }
}

/// Which resource types the client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TypeSelection {
    /// No (usable) `_type`: every type the level covers.
    #[default]
    All,
    /// The `_type` list: deduplicated, in request order.
    Only(Vec<String>),
}

/// A validated export: everything the engine needs to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportPlan {
    /// The export level (and group id).
    pub level: Level,
    /// The file format.
    pub output_format: OutputFormat,
    /// The requested types (deduplicated, in request order) or all.
    pub types: TypeSelection,
    /// `_since`: only resources last updated after this time.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// `_until`: only resources last updated at or before this time.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    /// `patient`: bare patient ids (deduplicated, order kept) the export is limited to.
    pub patients: Option<Vec<String>>,
    /// `_elements`: entries as given (`name` or `Type.name`), deduplicated.
    pub elements: Option<Vec<String>>,
    /// `_typeFilter`: per resource type, the queries (deduplicated, in request order) a
    /// resource of that type must match one of (OR); types without an entry are not
    /// filtered. Only types the export covers appear.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub type_filters: BTreeMap<String, Vec<TypeQuery>>,
    /// `includeAssociatedData=LatestProvenanceResources`: the export also holds the
    /// (current) `Provenance` of the resources it exports; see [`ExportPlan::resolve_types`]
    /// and [`ExportPlan::provenance_targets`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latest_provenance: bool,
    /// `allowPartialManifests=true` (v3): while the export runs, status requests may answer
    /// with a manifest of the files finished so far, and manifests come in pages linked by
    /// `link` (`next`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_partial_manifests: bool,
    /// `organizeOutputBy=Patient` (v3, patient and group level): files hold patient blocks (a
    /// `Parameters` header naming the patient, the `Patient`, then the rest of its
    /// compartment) instead of one resource type each, and no block is split across files.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub organize_by_patient: bool,
    /// Whether `Prefer: handling=lenient` was sent.
    pub lenient: bool,
    /// In lenient mode, what was ignored (warnings), for the manifest `error` array.
    pub ignored: Vec<Issue>,
}

impl ExportPlan {
    /// A plan for `level` with every default: all types, ndjson, no filters, strict.
    pub fn new(level: Level) -> Self {
        ExportPlan {
            level,
            output_format: OutputFormat::Ndjson,
            types: TypeSelection::All,
            since: None,
            until: None,
            patients: None,
            elements: None,
            type_filters: BTreeMap::new(),
            latest_provenance: false,
            allow_partial_manifests: false,
            organize_by_patient: false,
            lenient: false,
            ignored: Vec::new(),
        }
    }

    /// The resource types this plan exports given the types that have data, sorted and
    /// deduplicated.
    ///
    /// System level: every standard R4 type among `available` (or only the `_type` ones).
    /// Patient and group level: the Patient-compartment types except `Group` (D9), or, with
    /// `_type`, exactly the named types, which may lie outside the compartment (D8: "asked
    /// for"). Types without data get no file, so they are never returned.
    ///
    /// With [`ExportPlan::latest_provenance`], `Provenance` is added to these (at patient and
    /// group level it is read from the patients' compartments like any compartment type).
    pub fn resolve_types<'a>(&self, available: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let patient_based = self.level.is_patient_based();
        let wanted = |t: &str| match &self.types {
            _ if self.latest_provenance && t == PROVENANCE => true,
            TypeSelection::All if patient_based => t != "Group" && is_patient_compartment_type(t),
            TypeSelection::All => is_r4_resource_type(t),
            TypeSelection::Only(list) => !(patient_based && t == "Group") && list.iter().any(|x| x == t),
        };
        let set: BTreeSet<&str> = available.into_iter().filter(|t| wanted(t)).collect();
        set.into_iter().map(String::from).collect()
    }

    /// Whether the export is limited to listed patients (the `patient` parameter).
    pub fn has_patient_filter(&self) -> bool {
        self.patients.is_some()
    }

    /// The `_typeFilter` queries for `resource_type`, if it is filtered.
    pub fn type_filter(&self, resource_type: &str) -> Option<&[TypeQuery]> {
        self.type_filters.get(resource_type).map(Vec::as_slice)
    }

    /// Whether `resource` (FHIR JSON of type `resource_type`) passes `_typeFilter`: always
    /// when its type has no queries, otherwise when it matches at least one of them. A
    /// `Provenance` must also pass [`ExportPlan::provenance_targets`].
    pub fn keeps(&self, resource_type: &str, resource: &sluice_json::Json<'_>) -> bool {
        self.type_filter(resource_type).is_none_or(|queries| sluice_search::matches_any(queries, resource))
            && (resource_type != PROVENANCE
                || self.provenance_targets().is_none_or(|types| targets_any_of(resource, types)))
    }

    /// The types whose `Provenance` only is exported: `Some(_type)` at system level when
    /// [`ExportPlan::latest_provenance`] is set and `_type` does not name `Provenance` (a
    /// Provenance is then exported when one of its `target`s is of one of these types, see
    /// [`targets_any_of`]); `None` when the export's `Provenance` is not restricted (system
    /// level without `_type` exports every type; at patient and group level the patients'
    /// compartments select the Provenance; or `Provenance` is asked for itself).
    pub fn provenance_targets(&self) -> Option<&[String]> {
        match &self.types {
            TypeSelection::Only(list)
                if self.latest_provenance && self.level == Level::System && !list.iter().any(|t| t == PROVENANCE) =>
            {
                Some(list)
            }
            _ => None,
        }
    }

    /// Whether the plan exports `resource_type` at all (with `_type`, or by the level's
    /// default), whether or not it has data.
    fn covers(&self, resource_type: &str) -> bool {
        !self.resolve_types([resource_type]).is_empty()
    }
}

/// The `Provenance` resource type.
const PROVENANCE: &str = "Provenance";

/// Whether a `Provenance` (FHIR JSON) has a `target` of one of `types`: the type of a
/// literal `reference` (relative `Type/id`, absolute `https://host/fhir/Type/id`, either
/// versioned `.../_history/n`), or for a logical reference without one, its `type`.
/// Contained (`#x`) and `urn:` references name no type.
pub fn targets_any_of(provenance: &sluice_json::Json<'_>, types: &[String]) -> bool {
    let Some(targets) = provenance.get("target").and_then(sluice_json::Json::as_array) else { return false };
    targets.iter().filter_map(target_type).any(|t| types.contains(&t))
}

/// The resource type a `Reference` points at (see [`targets_any_of`]).
fn target_type(target: &sluice_json::Json<'_>) -> Option<String> {
    let Some(reference) = target.get("reference").and_then(sluice_json::Json::as_str) else {
        return target.get("type").and_then(sluice_json::Json::as_str).map(|t| t.into_owned());
    };
    if reference.starts_with('#') || reference.starts_with("urn:") {
        return None;
    }
    let unversioned = reference.split_once("/_history/").map_or(reference.as_ref(), |(base, _)| base);
    let (before, _id) = unversioned.rsplit_once('/')?;
    let t = before.rsplit_once('/').map_or(before, |(_, t)| t);
    is_r4_resource_type(t).then(|| t.to_string())
}

/// The HTTP status for a failed kick-off: 406 when one of the issues is about the `Accept`
/// header (its `expression` is `Accept`), 400 otherwise.
pub fn error_status(issues: &[Issue]) -> u16 {
    if issues.iter().any(|i| i.expression.as_deref() == Some(ACCEPT)) { 406 } else { 400 }
}

/// The `expression` of issues about the `Accept` header.
pub const ACCEPT: &str = "Accept";

/// The kick-off parameters Sluice recognises, in the order of the IG.
pub const KNOWN_PARAMETERS: &[&str] = &[
    "_outputFormat",
    "_since",
    "_until",
    "_type",
    "_elements",
    "patient",
    "includeAssociatedData",
    "_typeFilter",
    "organizeOutputBy",
    "allowPartialManifests",
];

/// Validates a kick-off request and builds its plan, or returns every problem found.
///
/// Header and body problems (`Accept`, `Content-Type`, a body that is not a `Parameters`
/// resource) are always errors. Parameter problems (unknown, invalid, repeated, recognised
/// but not supported) are errors, or, with `Prefer: handling=lenient`, warnings in
/// [`ExportPlan::ignored`] while the offending parameter (or list entry) is dropped.
pub fn plan(req: &KickoffRequest) -> Result<ExportPlan, Vec<Issue>> {
    let lenient = headers::prefers_lenient(req.prefer);
    let mut cx = Issues::new(lenient);
    headers::check_accept(req.accept, &mut cx);

    let params = match req.method {
        Method::Get => input::from_query(req.query),
        Method::Post => {
            input::reject_query_on_post(req.query, &mut cx);
            headers::check_content_type(req.content_type, &mut cx);
            let content_type_ok = cx.errors.iter().all(|i| i.expression.as_deref() != Some(CONTENT_TYPE));
            input::from_body(req.body, content_type_ok, &mut cx)
        }
    };

    let mut b = Builder::new(req, &mut cx);
    for (name, vals) in input::group(params) {
        b.parameter(&name, &vals);
    }
    let plan = b.finish();

    if cx.errors.is_empty() { Ok(ExportPlan { lenient, ignored: cx.ignored, ..plan }) } else { Err(cx.errors) }
}

/// The `expression` of issues about the `Content-Type` header.
const CONTENT_TYPE: &str = "Content-Type";

/// Where issues go: errors, or (lenient, parameter problems only) warnings.
pub(crate) struct Issues {
    lenient: bool,
    errors: Vec<Issue>,
    ignored: Vec<Issue>,
}

impl Issues {
    fn new(lenient: bool) -> Self {
        Issues { lenient, errors: Vec::new(), ignored: Vec::new() }
    }

    /// A problem that fails the request whatever the handling preference.
    pub(crate) fn hard(&mut self, issue: Issue) {
        self.errors.push(issue);
    }

    /// A problem with a parameter: an error, or in lenient mode a warning and the parameter
    /// (or entry) is dropped.
    pub(crate) fn reject(&mut self, mut issue: Issue) {
        if self.lenient {
            issue.severity = Severity::Warning;
            issue.diagnostics.push_str(" Ignored (Prefer: handling=lenient).");
            self.ignored.push(issue);
        } else {
            self.errors.push(issue);
        }
    }

    /// Whether lenient handling is on.
    pub(crate) fn lenient(&self) -> bool {
        self.lenient
    }
}

/// Accumulates the plan while the parameters are checked.
struct Builder<'c> {
    level: Level,
    method: Method,
    cx: &'c mut Issues,
    output_format: OutputFormat,
    types: Vec<String>,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    patients: Vec<String>,
    elements: Vec<String>,
    type_filters: Vec<TypeQuery>,
    latest_provenance: bool,
    allow_partial_manifests: bool,
    organize_by_patient: bool,
}

impl<'c> Builder<'c> {
    fn new(req: &KickoffRequest, cx: &'c mut Issues) -> Self {
        Builder {
            level: req.level.clone(),
            method: req.method,
            cx,
            output_format: OutputFormat::default(),
            types: Vec::new(),
            since: None,
            until: None,
            patients: Vec::new(),
            elements: Vec::new(),
            type_filters: Vec::new(),
            latest_provenance: false,
            allow_partial_manifests: false,
            organize_by_patient: false,
        }
    }

    /// Checks one parameter (all its values, in order) and records what it asks for.
    fn parameter(&mut self, name: &str, vals: &[Value]) {
        match name {
            "_outputFormat" => {
                if let Some(v) = self.single(name, vals)
                    && let Some(f) = values::check_output_format(v, self.cx)
                {
                    self.output_format = f;
                }
            }
            "_type" => {
                for v in vals {
                    if let Some(text) = self.text(name, v) {
                        values::check_types(text, &self.level, &mut self.types, self.cx);
                    }
                }
            }
            "_since" | "_until" => {
                if let Some(v) = self.single(name, vals) {
                    let t = values::check_instant(name, v, self.cx);
                    if name == "_since" {
                        self.since = t;
                    } else {
                        self.until = t;
                    }
                }
            }
            "patient" => self.patient(vals),
            "_elements" => {
                for v in vals {
                    if let Some(text) = self.text(name, v) {
                        values::check_elements(text, &mut self.elements, self.cx);
                    }
                }
            }
            "allowPartialManifests" => {
                if let Some(v) = self.single(name, vals) {
                    self.allow_partial_manifests = values::check_allow_partial(v, self.cx);
                }
            }
            "organizeOutputBy" => {
                if let Some(v) = self.single(name, vals) {
                    self.organize_by_patient = values::check_organize_by(v, &self.level, self.cx);
                }
            }
            "_typeFilter" => {
                for v in vals {
                    if let Some(text) = self.text(name, v) {
                        values::check_type_filter(text, &mut self.type_filters, self.cx);
                    }
                }
            }
            "includeAssociatedData" => {
                for v in vals {
                    if let Some(text) = self.text(name, v) {
                        values::check_associated_data(text, &mut self.latest_provenance, self.cx);
                    }
                }
            }
            _ => values::unknown_parameter(name, self.cx),
        }
    }

    /// The value of a single-valued parameter; a repeat is a problem (the first is used).
    fn single<'v>(&mut self, name: &str, vals: &'v [Value]) -> Option<&'v str> {
        if vals.len() > 1 {
            let given: Vec<String> = vals.iter().map(|v| format!("'{}'", v.display())).collect();
            self.cx.reject(
                Issue::error(
                    IssueCode::Invalid,
                    format!(
                        "Parameter {name} was given {} times ({}); it takes a single value.{}",
                        vals.len(),
                        given.join(", "),
                        if self.cx.lenient() { " The first one is used." } else { "" }
                    ),
                )
                .at(name),
            );
        }
        vals.first().and_then(|v| self.text(name, v))
    }

    /// The text of a string-like value; a `valueReference` is a problem.
    fn text<'v>(&mut self, name: &str, v: &'v Value) -> Option<&'v str> {
        match v {
            Value::Text(s) => Some(s),
            Value::Reference(r) => {
                self.cx.reject(
                    Issue::error(
                        IssueCode::Invalid,
                        format!(
                            "Parameter {name} takes a string value, not a valueReference \
                             (got reference '{r}'); send it as valueString."
                        ),
                    )
                    .at(name),
                );
                None
            }
        }
    }

    /// `patient` (D3): where it is allowed, and its ids.
    fn patient(&mut self, vals: &[Value]) {
        const NAME: &str = "patient";
        let given: Vec<String> = vals.iter().map(|v| format!("'{}'", v.display())).collect();
        let given = given.join(", ");
        match (&self.level, self.method) {
            (Level::System, _) => self.cx.reject(
                Issue::error(
                    IssueCode::NotSupported,
                    format!(
                        "Parameter patient ({given}) is not accepted by a system-level export; \
                         use [base]/Patient/$export or [base]/Group/[id]/$export to export \
                         particular patients."
                    ),
                )
                .at(NAME),
            ),
            (Level::Group(_), Method::Get) => self.cx.reject(
                Issue::error(
                    IssueCode::NotSupported,
                    format!(
                        "Parameter patient ({given}) is not accepted on a GET group-level \
                         export; use POST with a Parameters body holding patient \
                         valueReferences ({{\"name\": \"patient\", \"valueReference\": \
                         {{\"reference\": \"Patient/123\"}}}})."
                    ),
                )
                .at(NAME),
            ),
            (Level::Patient, Method::Get) => {
                for v in vals {
                    if let Some(text) = self.text(NAME, v) {
                        values::check_patient_list(text, &mut self.patients, self.cx);
                    }
                }
            }
            (_, Method::Post) => {
                for v in vals {
                    values::check_patient_value(v, &mut self.patients, self.cx);
                }
            }
        }
    }

    /// The plan from what was recorded; cross-parameter checks happen here.
    fn finish(self) -> ExportPlan {
        let mut until = self.until;
        if let (Some(since), Some(u)) = (self.since, self.until)
            && since > u
        {
            self.cx.reject(
                Issue::error(
                    IssueCode::Value,
                    format!(
                        "_since ({}) is later than _until ({}); _since must be at or \
                         before _until.{}",
                        sluice_fhir::instant::format(since),
                        sluice_fhir::instant::format(u),
                        if self.cx.lenient() { " _until is dropped." } else { "" }
                    ),
                )
                .at("_until"),
            );
            until = None;
        }
        let mut types = self.types;
        if self.organize_by_patient {
            // Blocks hold the Patient compartment only (the IG lets a server omit the rest).
            types.retain(|t| {
                let inside = is_patient_compartment_type(t) && t != "Group";
                if !inside {
                    values::type_outside_blocks(t, self.cx);
                }
                inside
            });
        }
        let mut plan = ExportPlan {
            level: self.level,
            output_format: self.output_format,
            types: if types.is_empty() { TypeSelection::All } else { TypeSelection::Only(types) },
            since: self.since,
            until,
            patients: (!self.patients.is_empty()).then_some(self.patients),
            elements: (!self.elements.is_empty()).then_some(self.elements),
            type_filters: BTreeMap::new(),
            latest_provenance: self.latest_provenance,
            allow_partial_manifests: self.allow_partial_manifests,
            organize_by_patient: self.organize_by_patient,
            lenient: self.cx.lenient(),
            ignored: Vec::new(),
        };
        for query in self.type_filters {
            if plan.covers(&query.resource_type) {
                plan.type_filters.entry(query.resource_type.clone()).or_default().push(query);
            } else {
                values::type_filter_outside_export(&query, &plan, self.cx);
            }
        }
        plan
    }
}
