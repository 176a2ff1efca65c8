//! FHIR R4 search queries for the Bulk Data `_typeFilter` parameter: parsed once at kick-off,
//! then evaluated against each resource's JSON in memory.
//!
//! ```
//! use sluice_json::Json;
//!
//! let q = sluice_search::parse_query(
//!     "Observation?status=final&date=ge2024-01&code=http://loinc.org|8302-2,8867-4&value-quantity=gt5.40",
//! )?;
//! let obs = Json::parse(r#"{
//!     "resourceType": "Observation", "status": "final",
//!     "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
//!     "effectiveDateTime": "2024-03-05T10:00:00+01:00",
//!     "valueQuantity": {"value": 5.4000000000000001}
//! }"#).unwrap();
//! assert!(q.matches(&obs), "5.4000000000000001 > 5.40, compared as exact decimals");
//! # Ok::<(), sluice_search::SearchError>(())
//! ```
//!
//! **Queries.** [`parse_query`] reads `Type?name[:modifier]=value[,value...]&...`. Names and
//! values are URL-decoded (`%XX`, and `+` as a space); criteria (`&`) are AND-ed, the
//! comma-separated values of one criterion are OR-ed (`\,` is a literal comma), and a
//! parameter may repeat (`date=ge2020&date=lt2021`). [`split_type_filter`] splits one
//! `_typeFilter` value into its queries. Several queries for one type are OR-ed by the caller
//! ([`matches_any`]).
//!
//! **Parameters.** Every type has `_id` (token) and `_lastUpdated` (date); the clinical types
//! of US Core have their usual parameters ([`supported_params`]). Anything else is refused with
//! the list of what is supported, as are search result parameters (`_sort`, `_include`, ...),
//! chained parameters and unknown modifiers ([`SearchError`]).
//!
//! **Matching**, as the FHIR R4 search page defines it:
//! - token: `code` (any system), `system|code`, `|code` (no system), `system|` (any code) on a
//!   `CodeableConcept`, `Coding`, `Identifier` (`system|value`), a plain code/string (which has
//!   no system) or a boolean; exact and case-sensitive. `:not` matches resources without any
//!   matching value (including those without a value); `:text` matches the start of the text
//!   or of a word of it (`CodeableConcept.text`, `Coding.display`, `Identifier.type.text`),
//!   ignoring case and accents.
//! - date: the search value and the resource's value are ranges set by their precision
//!   (a year, month, day, minute, second or fraction; missing zone = UTC); a `Period` is
//!   `[start, end]` with a missing end open. Prefixes `eq` (default), `ne`, `gt`, `lt`, `ge`,
//!   `le`, `sa`, `eb` compare the ranges exactly as the R4 table says; `ap` is refused.
//! - reference: `Type/id`, a bare `id` (any type, or the parameter's only target type, e.g.
//!   `patient=123` means `Patient/123`), or an absolute URL ending in `Type/id` (its base is
//!   ignored); resource references compare by type and id, whatever their base. `:[Type]`
//!   (`subject:Patient=123`) names the type.
//! - string: starts-with ignoring case and accents; `:contains` anywhere; `:exact` the whole
//!   string, case and accents included. `name` on a `HumanName` searches family, given,
//!   prefix, suffix and text.
//! - quantity (`value-quantity`, `component-value-quantity` on Observation):
//!   `[prefix]number[|system|code]`. The resource's `value` and the search number are compared
//!   as exact decimals, as written (D17), never through `f64`: `gt5.40` matches
//!   `5.4000000000000001`. `eq` (default) and `ne` use the search number's precision (`5.40`
//!   is `[5.395, 5.405)`); `gt`, `lt`, `ge`, `le` (and `sa`, `eb`) compare the values.
//!   `system|code` must match the Quantity's; `||code` matches its `code` or `unit`.
//! - `:missing=true|false` on every kind: whether the resource has no value for the parameter.
//!
//! **Pushdown.** [`store_bounds`] derives from a type's queries what a store can select before
//! they are evaluated: the `meta.lastUpdated` window of their `_lastUpdated` criteria and the
//! ids of their `_id` criteria ([`StoreBounds`], a superset of what they match).
//!
//! Pure: no I/O, no async, no clock.

#![warn(missing_docs)]

mod date;
mod error;
mod matching;
mod params;
mod parse;
mod pushdown;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use sluice_json::Json;

pub use date::Prefix;
pub use error::SearchError;
pub use params::{ParamKind, supported_params, types_with_specific_params};
pub use parse::{parse_query, split_type_filter};
pub use pushdown::{StoreBounds, store_bounds};

/// One search query: a resource type and the criteria a resource of that type must all meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeQuery {
    /// The resource type searched (a standard R4 type).
    pub resource_type: String,
    /// The criteria, AND-ed. None: every resource of the type matches.
    pub criteria: Vec<Criterion>,
    /// The query text as given, for messages and logs.
    #[serde(default)]
    pub query: String,
}

/// One `name[:modifier]=values` criterion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Criterion {
    /// The parameter name (`code`, `_lastUpdated`), without its modifier.
    pub param: String,
    /// What the values of the parameter must satisfy.
    pub test: Test,
}

/// The test a criterion applies to the values its parameter reaches in a resource. Where
/// there is a list of values, any one of them may match (OR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Test {
    /// `:missing=true` (the resource has no value) or `:missing=false` (it has one).
    Missing(bool),
    /// A token parameter, or `:not` (`not: true`).
    Token {
        /// `:not`: the resource matches when none of its values matches.
        not: bool,
        /// The values.
        values: Vec<TokenValue>,
    },
    /// A token parameter with `:text`: the values, case- and accent-folded.
    Text(Vec<String>),
    /// A date parameter.
    Date(Vec<DateValue>),
    /// A reference parameter.
    Reference(Vec<RefValue>),
    /// A quantity parameter.
    Quantity(Vec<QuantityValue>),
    /// A string parameter.
    String {
        /// How the strings are compared.
        mode: StringMode,
        /// The values: as given for `Exact`, case- and accent-folded otherwise.
        values: Vec<String>,
    },
}

/// A token value: `code` (system `None`), `system|code`, `|code` (system `Some("")`: no
/// system) or `system|` (code `None`: any code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenValue {
    /// The system; `None` for any, `Some("")` for none.
    pub system: Option<String>,
    /// The code (or identifier value); `None` for any.
    pub code: Option<String>,
}

/// A date value with its prefix, as the range its precision covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateValue {
    /// The prefix (`eq` when none was given).
    pub prefix: Prefix,
    /// The first millisecond of the range (since the Unix epoch, UTC).
    pub start: i64,
    /// The millisecond after the range.
    pub end: i64,
}

/// A quantity value: `[prefix]number[|system|code]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantityValue {
    /// The prefix (`eq` when none was given).
    pub prefix: Prefix,
    /// The number exactly as given (`5.40`): its digits set the precision `eq` compares at.
    pub number: String,
    /// The unit system; `None` for any (`5.4` or `5.4||mg`).
    pub system: Option<String>,
    /// The unit code (or, without a system, the code or the unit text); `None` for any.
    pub code: Option<String>,
}

/// A reference value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefValue {
    /// The referenced type; `None` for a bare id on a parameter that may refer to several.
    pub resource_type: Option<String>,
    /// The referenced id.
    pub id: String,
}

/// How a string parameter compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StringMode {
    /// The default: the value starts with the search text, ignoring case and accents.
    StartsWith,
    /// `:exact`: the whole value equals the search text.
    Exact,
    /// `:contains`: the value contains the search text, ignoring case and accents.
    Contains,
}

impl TypeQuery {
    /// Whether `resource` (a FHIR resource as JSON) is of this query's type and meets every
    /// criterion.
    ///
    /// A criterion on a parameter this version does not support (possible only for a query
    /// stored by another version) matches nothing.
    pub fn matches(&self, resource: &Json<'_>) -> bool {
        if !resource.get("resourceType").is_some_and(|t| t.is_str(&self.resource_type)) {
            return false;
        }
        self.criteria.iter().all(|c| match params::find(&self.resource_type, &c.param) {
            Some(def) => c.holds(def, resource),
            None => false,
        })
    }
}

impl std::fmt::Display for TypeQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.query)
    }
}

/// Whether `resource` matches any of `queries` (several `_typeFilter` queries for one type
/// are OR-ed). `false` when `queries` is empty.
pub fn matches_any(queries: &[TypeQuery], resource: &Json<'_>) -> bool {
    queries.iter().any(|q| q.matches(resource))
}
