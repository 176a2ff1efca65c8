//! Evaluating criteria against a resource's JSON.

use sluice_json::Json;
use std::borrow::Cow;

use crate::date::{self, Range};
use crate::params::ParamDef;
use crate::parse::split_reference;
use crate::{Criterion, Prefix, QuantityValue, StringMode, Test, TokenValue};
use bigdecimal::BigDecimal;
use std::str::FromStr;

/// Collects the values at `path` below `node`, following every element of every array on
/// the way (and of an array at the end). `null`, `""` and `{}` carry no value and are
/// skipped.
fn collect<'a, 'j>(node: &'a Json<'j>, path: &[&str], out: &mut Vec<&'a Json<'j>>) {
    match node {
        Json::Array(items) => items.iter().for_each(|item| collect(item, path, out)),
        Json::Null => {}
        Json::String(s) if s.raw().is_empty() => {}
        Json::Object(o) if o.is_empty() => {}
        _ => match path.split_first() {
            None => out.push(node),
            Some((head, rest)) => {
                if let Some(child) = node.get(head) {
                    collect(child, rest, out);
                }
            }
        },
    }
}

/// Every value the parameter's paths reach in `resource`.
fn values_of<'a, 'j>(def: &ParamDef, resource: &'a Json<'j>) -> Vec<&'a Json<'j>> {
    let mut out = Vec::new();
    for path in def.paths {
        let steps: Vec<&str> = path.split('.').collect();
        collect(resource, &steps, &mut out);
    }
    out
}

impl Criterion {
    /// Whether `resource` meets this criterion, with `def` the parameter's definition.
    pub(crate) fn holds(&self, def: &ParamDef, resource: &Json<'_>) -> bool {
        let nodes = values_of(def, resource);
        match &self.test {
            Test::Missing(missing) => nodes.is_empty() == *missing,
            Test::Token { not, values } => {
                let hit = nodes.iter().any(|n| values.iter().any(|v| token_matches(n, v)));
                hit != *not
            }
            Test::Text(values) => {
                let mut texts = Vec::new();
                nodes.iter().for_each(|n| texts_of(n, &mut texts));
                texts.iter().any(|t| values.iter().any(|v| word_starts_with(t, v)))
            }
            Test::Date(values) => nodes
                .iter()
                .filter_map(|n| date::of_json(n))
                .any(|target| values.iter().any(|v| v.prefix.test(Range { start: v.start, end: v.end }, target))),
            Test::Reference(values) => {
                nodes.iter().filter_map(|n| n.get("reference").and_then(Json::as_str)).any(|reference| {
                    let Some((ty, id)) = split_reference(&reference) else { return false };
                    values.iter().any(|v| {
                        v.id == id
                            && match (&v.resource_type, ty) {
                                (None, _) => true,
                                (Some(wanted), Some(ty)) => wanted == ty,
                                (Some(_), None) => false,
                            }
                    })
                })
            }
            Test::Quantity(values) => nodes.iter().any(|n| values.iter().any(|v| quantity_matches(n, v))),
            Test::String { mode, values } => nodes.iter().filter_map(|n| n.as_str()).any(|s| match mode {
                StringMode::Exact => values.iter().any(|v| *v == s),
                StringMode::StartsWith => {
                    let folded = fold(&s);
                    values.iter().any(|v| folded.starts_with(v.as_str()))
                }
                StringMode::Contains => {
                    let folded = fold(&s);
                    values.iter().any(|v| folded.contains(v.as_str()))
                }
            }),
        }
    }
}

/// Whether a token value matches a `CodeableConcept`, `Coding`, `Identifier`, code/string
/// or boolean.
fn token_matches(node: &Json<'_>, wanted: &TokenValue) -> bool {
    match node {
        Json::Object(_) => match node.get("coding") {
            Some(Json::Array(codings)) => codings.iter().any(|c| coding_matches(c, wanted)),
            Some(coding @ Json::Object(_)) => coding_matches(coding, wanted),
            Some(_) => false,
            None => coding_matches(node, wanted),
        },
        Json::String(s) => plain_matches(&s.text(), wanted),
        Json::Bool(b) => plain_matches(if *b { "true" } else { "false" }, wanted),
        _ => false,
    }
}

/// A FHIR decimal as an exact number: the text as written, digits and scale kept (`5.40`
/// has scale 2). `None` for anything else, including JSON's `1e400`-style numbers too large
/// to be a FHIR decimal (their exponent is bounded so that comparisons stay cheap).
pub(crate) fn decimal(text: &str) -> Option<BigDecimal> {
    let valid = text.strip_prefix('-').unwrap_or(text).starts_with(|c: char| c.is_ascii_digit())
        && text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        && text.len() <= 64;
    let d = BigDecimal::from_str(text).ok().filter(|_| valid)?;
    (d.as_bigint_and_exponent().1.abs() <= 1000).then_some(d)
}

/// Whether a `Quantity` matches a quantity search value. The resource's value and the
/// search number are compared as exact decimals (D17): `gt5.40` matches
/// `5.4000000000000001`. `eq` (and `ne`) use the search number's precision, as FHIR's
/// number search defines it: `5.40` stands for `[5.395, 5.405)`.
fn quantity_matches(node: &Json<'_>, wanted: &QuantityValue) -> bool {
    let Some(value) = node.get("value").and_then(Json::as_number).and_then(decimal) else { return false };
    let Some(number) = decimal(&wanted.number) else { return false };
    let text = |key: &str| node.get(key).and_then(Json::as_str);
    let unit_ok = match (&wanted.system, &wanted.code) {
        (None, None) => true,
        (Some(system), code) => {
            text("system").as_deref() == Some(system.as_str())
                && code.as_ref().is_none_or(|c| text("code").as_deref() == Some(c.as_str()))
        }
        (None, Some(code)) => {
            text("code").as_deref() == Some(code.as_str()) || text("unit").as_deref() == Some(code.as_str())
        }
    };
    if !unit_ok {
        return false;
    }
    // Half a unit in the last given digit: 0.005 for 5.40, 50 for 1e2.
    let half = BigDecimal::new(5.into(), number.as_bigint_and_exponent().1 + 1);
    let within = value >= &number - &half && value < &number + &half;
    match wanted.prefix {
        Prefix::Eq => within,
        Prefix::Ne => !within,
        Prefix::Gt | Prefix::Sa => value > number,
        Prefix::Lt | Prefix::Eb => value < number,
        Prefix::Ge => value >= number,
        Prefix::Le => value <= number,
    }
}

/// A `Coding` (`system` + `code`) or an `Identifier` (`system` + `value`).
fn coding_matches(coding: &Json<'_>, wanted: &TokenValue) -> bool {
    let system = coding.get("system").and_then(Json::as_str);
    let code = coding.get("code").or_else(|| coding.get("value")).and_then(Json::as_str);
    let system_ok = match wanted.system.as_deref() {
        None => true,
        Some("") => system.is_none(),
        Some(s) => system.as_deref() == Some(s),
    };
    let code_ok = match wanted.code.as_deref() {
        None => true,
        Some(c) => code.as_deref() == Some(c),
    };
    system_ok && code_ok
}

/// A plain code, string or boolean: it has no system, so only `code` and `|code` match it.
fn plain_matches(value: &str, wanted: &TokenValue) -> bool {
    matches!(wanted.system.as_deref(), None | Some("")) && wanted.code.as_deref() == Some(value)
}

/// The text associated with a coded value, for `:text`: `CodeableConcept.text` and its
/// codings' `display`, `Coding.display`, `Identifier.type.text`.
fn texts_of<'a>(node: &'a Json<'_>, out: &mut Vec<Cow<'a, str>>) {
    if !node.is_object() {
        return;
    }
    let mut push = |v: Option<&'a Json<'_>>| {
        if let Some(s) = v.and_then(Json::as_str) {
            out.push(s);
        }
    };
    push(node.get("text"));
    push(node.get("display"));
    push(node.get("type").and_then(|t| t.get("text")));
    match node.get("coding") {
        Some(Json::Array(codings)) => codings.iter().for_each(|c| push(c.get("display"))),
        Some(c @ Json::Object(_)) => push(c.get("display")),
        _ => {}
    }
}

/// Whether the folded `text`, or one of its words, starts with `wanted` (already folded).
fn word_starts_with(text: &str, wanted: &str) -> bool {
    let folded = fold(text);
    folded.starts_with(wanted)
        || folded
            .match_indices(|c: char| !c.is_alphanumeric())
            .any(|(i, sep)| folded[i + sep.len()..].starts_with(wanted))
}

/// Folds text for case- and accent-insensitive comparison: lower case, Latin letters with
/// diacritics reduced to their base letters (`é` -> `e`, `ß` -> `ss`, `Ø` -> `o`), combining
/// marks dropped.
pub(crate) fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().flat_map(char::to_lowercase) {
        match base_letters(c) {
            Some(base) => out.push_str(base),
            None => out.push(c),
        }
    }
    out
}

/// The base letters of a lower-case Latin letter with diacritics (Latin-1 Supplement and
/// Latin Extended-A), or `""` for a combining mark; `None` for anything else.
fn base_letters(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{300}'..='\u{36f}' => "",
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => "a",
        'æ' => "ae",
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => "c",
        'ď' | 'đ' | 'ð' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => "e",
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => "g",
        'ĥ' | 'ħ' => "h",
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => "i",
        'ĳ' => "ij",
        'ĵ' => "j",
        'ķ' => "k",
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => "l",
        'ñ' | 'ń' | 'ņ' | 'ň' | 'ŉ' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => "o",
        'œ' => "oe",
        'ŕ' | 'ŗ' | 'ř' => "r",
        'ś' | 'ŝ' | 'ş' | 'š' | 'ſ' => "s",
        'ß' => "ss",
        'ţ' | 'ť' | 'ŧ' => "t",
        'þ' => "th",
        'ù' | 'ú' | 'û' | 'ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => "u",
        'ŵ' => "w",
        'ý' | 'ÿ' | 'ŷ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        _ => return None,
    })
}
