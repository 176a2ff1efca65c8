//! Reading query text: `Type?name[:modifier]=value[,value...]&...`.

use sluice_fhir::{R4_RESOURCE_TYPES, is_r4_resource_type};

use crate::date::{self, Prefix};
use crate::matching::fold;
use crate::params::{self, ParamDef, ParamKind};
use crate::{Criterion, DateValue, QuantityValue, RefValue, SearchError, StringMode, Test, TokenValue, TypeQuery};

/// The FHIR search result parameters, which shape a result page and cannot filter.
const RESULT_PARAMETERS: &[&str] =
    &["_sort", "_count", "_include", "_revinclude", "_summary", "_elements", "_total", "_contained", "_containedType"];

/// The FHIR R4 search modifiers (besides resource type names), to tell an unsupported
/// modifier from a misspelt one.
const FHIR_MODIFIERS: &[&str] =
    &["missing", "exact", "contains", "not", "text", "in", "not-in", "below", "above", "type", "identifier", "ofType"];

/// Decodes `%XX` escapes and `+` (a space, as in `application/x-www-form-urlencoded`). A `%`
/// not followed by two hex digits is kept as it is; bytes that do not form UTF-8 are
/// replaced.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() && hex(bytes[i + 1]).is_some() && hex(bytes[i + 2]).is_some() => {
                out.push(hex(bytes[i + 1]).unwrap_or(0) * 16 + hex(bytes[i + 2]).unwrap_or(0));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of a hex digit.
fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Whether `text` (after a comma) starts a new query: after optional whitespace, a name that
/// starts with an uppercase ASCII letter, made of ASCII letters and digits, followed by `?` (or `%3F`).
fn starts_query(text: &str) -> bool {
    let text = text.trim_start();
    let name_len = text.bytes().take_while(u8::is_ascii_alphanumeric).count();
    let rest = &text[name_len..];
    text.starts_with(|c: char| c.is_ascii_uppercase())
        && (rest.starts_with('?') || rest.get(..3).is_some_and(|r| r.eq_ignore_ascii_case("%3f")))
}

/// Splits the value of one `_typeFilter` parameter into its queries.
///
/// The Bulk Data IG v2 lets a client join several URL-encoded queries with `,` in one
/// `_typeFilter` value ("a comma-separated list of FHIR REST API queries"). Once the value is
/// URL-decoded, a comma that separates queries looks like a comma that separates the values
/// of one search parameter (`status=active,completed`), so a comma ends a query only where
/// the next query begins: where it is followed by a resource-type-like name and `?`
/// (`,Condition?...`, or `,Condition%3F...` when the query is still encoded). A comma escaped
/// as `\,` never splits. Entries are trimmed; empty ones are dropped.
pub fn split_type_filter(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut begin = 0;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        match c {
            '\\' => {
                escaped = !escaped;
                continue;
            }
            ',' if !escaped && starts_query(&value[i + 1..]) => {
                out.push(&value[begin..i]);
                begin = i + 1;
            }
            _ => {}
        }
        escaped = false;
    }
    out.push(&value[begin..]);
    out.into_iter().map(str::trim).filter(|q| !q.is_empty()).collect()
}

/// Splits `text` at every `sep` not escaped with `\`, keeping the escapes.
fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut begin = 0;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if c == '\\' {
            escaped = !escaped;
            continue;
        }
        if c == sep && !escaped {
            out.push(&text[begin..i]);
            begin = i + c.len_utf8();
        }
        escaped = false;
    }
    out.push(&text[begin..]);
    out
}

/// Removes the FHIR search escapes: `\,` `\|` `\$` `\\` become `,` `|` `$` `\`.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(next @ (',' | '|' | '$' | '\\')) => out.push(next),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses one FHIR search query `Type?name=value&...` (see the crate documentation).
pub fn parse_query(text: &str) -> Result<TypeQuery, SearchError> {
    let query = text.trim();
    if query.is_empty() {
        return Err(SearchError::Syntax(
            "the query is empty; expected a FHIR search query such as Observation?status=final".into(),
        ));
    }
    // A query that still carries its URL encoding (`Observation%3Fstatus%3Dfinal`).
    if !query.contains('?') && query.to_ascii_lowercase().contains("%3f") {
        let decoded = percent_decode(query);
        return parse_query(&decoded).map(|q| TypeQuery { query: query.to_string(), ..q });
    }
    let Some((type_part, search)) = query.split_once('?') else {
        let what = if is_r4_resource_type(query) {
            format!(
                "'{query}' is a resource type without search criteria; a query is Type?name=value \
                 (e.g. {query}?_id=123); to export every {query} leave it out of _typeFilter"
            )
        } else {
            format!("'{query}' is not a FHIR search query; expected Type?name=value, e.g. Observation?status=final")
        };
        return Err(SearchError::Syntax(what));
    };
    let resource_type = type_part.trim();
    if resource_type.is_empty() {
        return Err(SearchError::Syntax(
            "the query names no resource type; each query searches one type, e.g. Observation?status=final".into(),
        ));
    }
    if resource_type.contains('/') {
        return Err(SearchError::Syntax(format!(
            "'{resource_type}' is a compartment or instance path; a query searches one resource type \
             (Type?name=value), compartment searches are not allowed in _typeFilter"
        )));
    }
    if !is_r4_resource_type(resource_type) {
        let hint = R4_RESOURCE_TYPES
            .iter()
            .find(|t| t.eq_ignore_ascii_case(resource_type))
            .map(|t| format!(" (did you mean {t}?)"))
            .unwrap_or_default();
        return Err(SearchError::UnknownType { resource_type: resource_type.to_string(), hint });
    }
    let mut criteria = Vec::new();
    for pair in search.split('&').filter(|p| !p.trim().is_empty()) {
        criteria.push(criterion(resource_type, pair)?);
    }
    Ok(TypeQuery { resource_type: resource_type.to_string(), criteria, query: query.to_string() })
}

/// One `name[:modifier]=value` pair (still URL-encoded).
fn criterion(resource_type: &str, pair: &str) -> Result<Criterion, SearchError> {
    let Some((raw_name, raw_value)) = pair.split_once('=') else {
        return Err(SearchError::Syntax(format!(
            "'{}' has no value; each criterion is name=value (e.g. status=final)",
            percent_decode(pair)
        )));
    };
    let name = percent_decode(raw_name).trim().to_string();
    let value = percent_decode(raw_value);
    if name.is_empty() {
        return Err(SearchError::Syntax(format!(
            "'={value}' has no parameter name; each criterion is name=value (e.g. status=final)"
        )));
    }
    if name.starts_with("_has:") || name == "_has" {
        return Err(SearchError::Chained { param: name });
    }
    let (base, modifier) = match name.split_once(':') {
        Some((b, m)) => (b, Some(m)),
        None => (name.as_str(), None),
    };
    if RESULT_PARAMETERS.contains(&base) {
        return Err(SearchError::ResultParameter { param: base.to_string() });
    }
    if name.contains('.') {
        return Err(SearchError::Chained { param: name.clone() });
    }
    let Some(def) = params::find(resource_type, base) else {
        return Err(SearchError::UnsupportedParameter {
            resource_type: resource_type.to_string(),
            param: base.to_string(),
            supported: params::supported_params(resource_type).into_iter().map(|(n, _)| n.to_string()).collect(),
        });
    };
    if value.trim().is_empty() {
        return Err(invalid(&name, "the value is empty; give one value or a comma-separated list".into()));
    }
    let test = match modifier {
        Some("missing") => Test::Missing(match value.trim() {
            "true" => true,
            "false" => false,
            other => {
                return Err(invalid(&name, format!("'{other}' is not true or false (:missing takes true or false)")));
            }
        }),
        _ => kind_test(def, &name, modifier, &value)?,
    };
    Ok(Criterion { param: def.name.to_string(), test })
}

/// A value problem.
fn invalid(param: &str, reason: String) -> SearchError {
    SearchError::InvalidValue { param: param.to_string(), reason }
}

/// The comma-separated values of a parameter (escapes kept), none of them empty.
fn values<'v>(name: &str, value: &'v str) -> Result<Vec<&'v str>, SearchError> {
    let list = split_unescaped(value, ',');
    if list.iter().any(|v| v.trim().is_empty()) {
        return Err(invalid(name, format!("'{value}' has an empty entry; separate values with single commas")));
    }
    Ok(list.into_iter().map(str::trim).collect())
}

/// The modifiers each kind accepts, for messages.
fn allowed_modifiers(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Token => ":missing, :not, :text",
        ParamKind::Date => ":missing",
        ParamKind::Reference => ":missing, :[type] (e.g. :Patient)",
        ParamKind::String => ":missing, :exact, :contains",
        ParamKind::Quantity => ":missing",
    }
}

/// The test for a parameter with no modifier or a kind-specific one.
fn kind_test(def: &ParamDef, name: &str, modifier: Option<&str>, value: &str) -> Result<Test, SearchError> {
    let bad_modifier = |m: &str| SearchError::UnsupportedModifier {
        param: def.name.to_string(),
        modifier: m.to_string(),
        kind: def.kind.as_str(),
        allowed: allowed_modifiers(def.kind).to_string(),
        known: FHIR_MODIFIERS.contains(&m) || is_r4_resource_type(m),
    };
    let list = values(name, value)?;
    match def.kind {
        ParamKind::Token => match modifier {
            None | Some("not") => Ok(Test::Token {
                not: modifier.is_some(),
                values: list.iter().map(|v| token_value(name, v)).collect::<Result<_, _>>()?,
            }),
            Some("text") => Ok(Test::Text(list.iter().map(|v| fold(&unescape(v))).collect())),
            Some(m) => Err(bad_modifier(m)),
        },
        ParamKind::Date => match modifier {
            None => Ok(Test::Date(list.iter().map(|v| date_value(name, v)).collect::<Result<_, _>>()?)),
            Some(m) => Err(bad_modifier(m)),
        },
        ParamKind::Quantity => match modifier {
            None => Ok(Test::Quantity(list.iter().map(|v| quantity_value(name, v)).collect::<Result<_, _>>()?)),
            Some(m) => Err(bad_modifier(m)),
        },
        ParamKind::String => {
            let mode = match modifier {
                None => StringMode::StartsWith,
                Some("exact") => StringMode::Exact,
                Some("contains") => StringMode::Contains,
                Some(m) => return Err(bad_modifier(m)),
            };
            let values =
                list.iter().map(|v| if mode == StringMode::Exact { unescape(v) } else { fold(&unescape(v)) }).collect();
            Ok(Test::String { mode, values })
        }
        ParamKind::Reference => {
            let type_modifier = match modifier {
                None => None,
                Some(m) if is_r4_resource_type(m) => Some(m),
                Some(m) => return Err(bad_modifier(m)),
            };
            if let (Some(m), Some(target)) = (type_modifier, def.target)
                && m != target
            {
                return Err(invalid(name, format!("'{}' only refers to {target}, not {m}", def.name)));
            }
            let values = list.iter().map(|v| reference_value(def, name, type_modifier, v)).collect::<Result<_, _>>()?;
            Ok(Test::Reference(values))
        }
    }
}

/// `code`, `system|code`, `|code` or `system|`.
fn token_value(name: &str, value: &str) -> Result<TokenValue, SearchError> {
    let parts = split_unescaped(value, '|');
    let token = match parts.as_slice() {
        [code] => TokenValue { system: None, code: Some(unescape(code)) },
        [system, code] => {
            let (system, code) = (unescape(system), unescape(code));
            if system.is_empty() && code.is_empty() {
                return Err(invalid(
                    name,
                    "'|' gives neither a system nor a code; use code, system|code, |code or system|".into(),
                ));
            }
            TokenValue { system: Some(system), code: (!code.is_empty()).then_some(code) }
        }
        _ => {
            return Err(invalid(
                name,
                format!(
                    "'{value}' has more than one '|'; use code, system|code, |code or system| (escape a literal | as \\|)"
                ),
            ));
        }
    };
    Ok(token)
}

/// `[prefix]date`.
/// `[prefix]number[|system|code]`, the number a FHIR decimal (`5.40`, `-1`, `1e3`).
fn quantity_value(name: &str, value: &str) -> Result<QuantityValue, SearchError> {
    let parts = split_unescaped(value, '|');
    let (number, system, code) = match parts.as_slice() {
        [n] => (*n, None, None),
        [n, s, c] => {
            let (s, c) = (unescape(s), unescape(c));
            (*n, (!s.is_empty()).then_some(s), (!c.is_empty()).then_some(c))
        }
        _ => {
            return Err(invalid(
                name,
                format!("'{value}' is not number, or number|system|code (e.g. gt5.4|http://unitsofmeasure.org|mg)"),
            ));
        }
    };
    let (prefix, number) = prefixed(name, number, "number")?;
    if crate::matching::decimal(number).is_none() {
        return Err(invalid(
            name,
            format!(
                "'{number}' is not a decimal number (e.g. 5.40, -1, 1.5e3), optionally after a prefix ({})",
                Prefix::ACCEPTED
            ),
        ));
    }
    Ok(QuantityValue { prefix, number: number.to_string(), system, code })
}

/// Splits a search prefix (`gt`, ...) off `value`; `eq` when there is none.
fn prefixed<'v>(name: &str, value: &'v str, what: &str) -> Result<(Prefix, &'v str), SearchError> {
    Ok(match value.get(..2) {
        Some(p) if p.bytes().all(|b| b.is_ascii_alphabetic()) => match Prefix::parse(p) {
            Some(prefix) => (prefix, &value[2..]),
            None if p == "ap" => {
                return Err(invalid(
                    name,
                    format!("the prefix 'ap' (approximately) is not supported; use one of {}", Prefix::ACCEPTED),
                ));
            }
            None => {
                return Err(invalid(
                    name,
                    format!("'{p}' in '{value}' is not a {what} prefix; use one of {}", Prefix::ACCEPTED),
                ));
            }
        },
        _ => (Prefix::Eq, value),
    })
}

fn date_value(name: &str, value: &str) -> Result<DateValue, SearchError> {
    let (prefix, text) = prefixed(name, value, "date")?;
    let Some(range) = date::parse(text) else {
        return Err(invalid(
            name,
            format!(
                "'{text}' is not a FHIR date or dateTime; expected 2024, 2024-05, 2024-05-03, \
                 2024-05-03T10:00, 2024-05-03T10:00:00 or with a zone (Z, +02:00; encode '+' as %2B), \
                 optionally after a prefix ({})",
                Prefix::ACCEPTED
            ),
        ));
    };
    Ok(DateValue { prefix, start: range.start, end: range.end })
}

/// Whether `id` is a FHIR id: 1-64 of `A-Z a-z 0-9 - .`.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `Type/id`, `id`, or an absolute URL ending in `Type/id` (`/_history/n` allowed).
fn reference_value(
    def: &ParamDef,
    name: &str,
    type_modifier: Option<&str>,
    value: &str,
) -> Result<RefValue, SearchError> {
    let text = unescape(value);
    let expected = "expected Type/id (e.g. Patient/123), a bare id, or an absolute URL ending in Type/id";
    let Some((resource_type, id)) = split_reference(&text) else {
        return Err(invalid(name, format!("'{text}' is not a reference; {expected}")));
    };
    if !is_fhir_id(id) {
        return Err(invalid(
            name,
            format!("'{id}' in '{text}' is not a FHIR id (1-64 of A-Z a-z 0-9 - .); {expected}"),
        ));
    }
    if let Some(t) = resource_type
        && !is_r4_resource_type(t)
    {
        return Err(invalid(name, format!("'{t}' in '{text}' is not a standard FHIR R4 resource type; {expected}")));
    }
    let resource_type = match (resource_type, type_modifier.or(def.target)) {
        (Some(given), Some(expected_type)) if given != expected_type => {
            return Err(invalid(name, format!("'{text}' refers to a {given}, but here only {expected_type} fits")));
        }
        (given, implied) => given.or(implied),
    };
    Ok(RefValue { resource_type: resource_type.map(String::from), id: id.to_string() })
}

/// The `(type, id)` of a reference text: `Type/id`, `id`, `[base/]Type/id[/_history/v]`.
/// Local (`#x`) and non-URL (`urn:...`) references give `None`.
pub(crate) fn split_reference(text: &str) -> Option<(Option<&str>, &str)> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') || text.starts_with("urn:") {
        return None;
    }
    let mut segments: Vec<&str> = text.split('/').collect();
    if let [.., _, _, "_history", _] = segments.as_slice() {
        segments.truncate(segments.len() - 2);
    }
    match segments.as_slice() {
        [id] => Some((None, id)),
        [.., t, id] if !id.is_empty() && t.starts_with(|c: char| c.is_ascii_uppercase()) => Some((Some(t), id)),
        _ => None,
    }
}
