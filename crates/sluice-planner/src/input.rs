//! Reading the raw parameters: query pairs on GET, a FHIR `Parameters` body on POST.

use serde_json::Value as Json;
use sluice_fhir::{Issue, IssueCode};

use crate::Issues;

/// One parameter occurrence, before its value is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Param {
    /// The parameter name, exactly as sent.
    pub(crate) name: String,
    /// Its value.
    pub(crate) value: Value,
}

/// A raw parameter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// A query value, or a POST `valueString`/`valueCode`/`valueUri`/`valueInstant`/
    /// `valueDateTime`/`valueDate` (a `valueBoolean` becomes `true`/`false`).
    Text(String),
    /// A POST `valueReference.reference`.
    Reference(String),
}

impl Param {
    /// A parameter occurrence.
    pub(crate) fn new(name: impl Into<String>, value: Value) -> Self {
        Param { name: name.into(), value }
    }
}

impl Value {
    /// The value as text, for messages.
    pub(crate) fn display(&self) -> &str {
        match self {
            Value::Text(s) | Value::Reference(s) => s,
        }
    }
}

/// The POST `value[x]` types Sluice accepts.
const VALUE_TYPES: &[&str] = &[
    "valueString",
    "valueCode",
    "valueInstant",
    "valueDateTime",
    "valueDate",
    "valueBoolean",
    "valueReference",
    "valueUri",
];

/// The query pairs as parameters.
pub(crate) fn from_query(query: &[(String, String)]) -> Vec<Param> {
    query.iter().map(|(k, v)| Param::new(k.as_str(), Value::Text(v.clone()))).collect()
}

/// Query parameters on a POST kick-off are a problem: parameters belong in the body.
pub(crate) fn reject_query_on_post(query: &[(String, String)], cx: &mut Issues) {
    for (name, value) in query {
        cx.reject(
            Issue::error(
                IssueCode::NotSupported,
                format!(
                    "Query parameter {name}='{value}' is not accepted on a POST kick-off; put \
                     every parameter in the FHIR Parameters body instead (for example \
                     {{\"name\": \"{name}\", \"valueString\": \"{value}\"}})."
                ),
            )
            .at(name.as_str()),
        );
    }
}

/// The parameters of a POST body, which must be a FHIR `Parameters` resource in JSON.
///
/// Body-level problems are always errors; problems with single entries are parameter
/// problems (dropped in lenient mode). When the `Content-Type` was already rejected, a body
/// that is not JSON adds no second error.
pub(crate) fn from_body(body: Option<&[u8]>, content_type_ok: bool, cx: &mut Issues) -> Vec<Param> {
    const EXPECTED: &str = "a FHIR Parameters resource in JSON, e.g. {\"resourceType\": \
                            \"Parameters\", \"parameter\": [{\"name\": \"_type\", \
                            \"valueString\": \"Patient,Observation\"}]}";
    let body = body.unwrap_or_default();
    if body.iter().all(u8::is_ascii_whitespace) {
        cx.hard(
            Issue::error(IssueCode::Required, format!("The POST kick-off body is empty; expected {EXPECTED}."))
                .at("Parameters"),
        );
        return Vec::new();
    }
    let json: Json = match serde_json::from_slice(body) {
        Ok(j) => j,
        Err(e) => {
            if content_type_ok {
                cx.hard(
                    Issue::error(
                        IssueCode::Invalid,
                        format!("The POST kick-off body is not valid JSON ({e}); expected {EXPECTED}."),
                    )
                    .at("Parameters"),
                );
            }
            return Vec::new();
        }
    };
    let resource_type = json.get("resourceType").and_then(Json::as_str);
    if resource_type != Some("Parameters") {
        let got = match (&json, resource_type) {
            (_, Some(rt)) => format!("resourceType '{rt}'"),
            (Json::Object(_), None) => "a JSON object without resourceType".to_string(),
            _ => format!("a JSON {}", json_kind(&json)),
        };
        cx.hard(
            Issue::error(IssueCode::Invalid, format!("The POST kick-off body is {got}; expected {EXPECTED}."))
                .at("Parameters"),
        );
        return Vec::new();
    }
    let entries = match json.get("parameter") {
        None => return Vec::new(),
        Some(Json::Array(a)) => a,
        Some(other) => {
            cx.hard(
                Issue::error(
                    IssueCode::Structure,
                    format!(
                        "Parameters.parameter must be an array of {{name, value[x]}} objects, \
                         got a JSON {}.",
                        json_kind(other)
                    ),
                )
                .at("Parameters.parameter"),
            );
            return Vec::new();
        }
    };
    entries.iter().enumerate().filter_map(|(i, entry)| read_entry(i, entry, cx)).collect()
}

/// One `Parameters.parameter` entry.
fn read_entry(index: usize, entry: &Json, cx: &mut Issues) -> Option<Param> {
    let at = format!("Parameters.parameter[{index}]");
    let Some(obj) = entry.as_object() else {
        cx.reject(
            Issue::error(
                IssueCode::Structure,
                format!("{at} must be an object with a name and a value[x], got a JSON {}.", json_kind(entry)),
            )
            .at(at),
        );
        return None;
    };
    let Some(name) = obj.get("name").and_then(Json::as_str) else {
        cx.reject(Issue::error(IssueCode::Required, format!("{at} has no name (a string is required).")).at(at));
        return None;
    };
    let key = value_key(obj, name, &at, cx)?;
    let raw = &obj[key];
    let value = match (key, raw) {
        ("valueBoolean", Json::Bool(b)) => Value::Text(b.to_string()),
        ("valueReference", Json::Object(r)) => match r.get("reference").and_then(Json::as_str) {
            Some(reference) => Value::Reference(reference.to_string()),
            None => {
                cx.reject(
                    Issue::error(
                        IssueCode::Required,
                        format!(
                            "Parameter {name} ({at}) has a valueReference without a \
                             reference string; expected e.g. {{\"reference\": \"Patient/123\"}}."
                        ),
                    )
                    .at(name),
                );
                return None;
            }
        },
        ("valueBoolean" | "valueReference", _) => return wrong_json(name, &at, key, raw, cx),
        (_, Json::String(s)) => Value::Text(s.clone()),
        _ => return wrong_json(name, &at, key, raw, cx),
    };
    Some(Param::new(name, value))
}

/// The one accepted `value[x]` key of a parameter named `name`, or the issue why not.
fn value_key<'o>(obj: &'o serde_json::Map<String, Json>, name: &str, at: &str, cx: &mut Issues) -> Option<&'o str> {
    let accepted = VALUE_TYPES.join(", ");
    let value_keys: Vec<&str> =
        obj.keys().map(String::as_str).filter(|k| k.starts_with("value") || *k == "resource" || *k == "part").collect();
    let key = match value_keys.as_slice() {
        [] => {
            cx.reject(
                Issue::error(
                    IssueCode::Required,
                    format!("Parameter {name} ({at}) has no value; give one of {accepted}."),
                )
                .at(name),
            );
            return None;
        }
        [k] => *k,
        several => {
            cx.reject(
                Issue::error(
                    IssueCode::Invalid,
                    format!(
                        "Parameter {name} ({at}) has several values ({}); give exactly one of \
                         {accepted}.",
                        several.join(", ")
                    ),
                )
                .at(name),
            );
            return None;
        }
    };
    if !VALUE_TYPES.contains(&key) {
        cx.reject(
            Issue::error(
                IssueCode::NotSupported,
                format!(
                    "Parameter {name} ({at}) uses {key}, which is not accepted; give one of \
                     {accepted}."
                ),
            )
            .at(name),
        );
        return None;
    }
    Some(key)
}

/// A `value[x]` whose JSON type does not match its FHIR type.
fn wrong_json(name: &str, at: &str, key: &str, raw: &Json, cx: &mut Issues) -> Option<Param> {
    let expected = match key {
        "valueBoolean" => "a JSON boolean",
        "valueReference" => "a JSON object with a reference",
        _ => "a JSON string",
    };
    cx.reject(
        Issue::error(
            IssueCode::Structure,
            format!("Parameter {name} ({at}): {key} must be {expected}, got a JSON {}.", json_kind(raw)),
        )
        .at(name),
    );
    None
}

/// A word for a JSON value's kind, for messages.
fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

/// Groups parameter occurrences by name: names in order of first appearance, each with its
/// values in order.
pub(crate) fn group(params: Vec<Param>) -> Vec<(String, Vec<Value>)> {
    let mut out: Vec<(String, Vec<Value>)> = Vec::new();
    for p in params {
        match out.iter_mut().find(|(n, _)| *n == p.name) {
            Some((_, vals)) => vals.push(p.value),
            None => out.push((p.name, vec![p.value])),
        }
    }
    out
}
