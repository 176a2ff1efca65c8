//! The kick-off headers: `Prefer`, `Accept` and (on POST) `Content-Type`.

use sluice_fhir::{Issue, IssueCode};

use crate::{ACCEPT, CONTENT_TYPE, Issues};

/// Whether the `Prefer` header asks for lenient handling.
///
/// The header may hold several comma-separated preferences (`respond-async,
/// handling=lenient`), each possibly with `;`-parameters and a quoted value. Names and
/// values are case-insensitive; when `handling` appears more than once the last one wins.
/// `respond-async` is not required (D1).
pub(crate) fn prefers_lenient(prefer: Option<&str>) -> bool {
    let mut lenient = false;
    for pref in prefer.unwrap_or_default().split(',') {
        let token = pref.split(';').next().unwrap_or_default();
        let Some((key, value)) = token.split_once('=') else { continue };
        if key.trim().eq_ignore_ascii_case("handling") {
            let value = value.trim().trim_matches('"');
            lenient = value.eq_ignore_ascii_case("lenient");
        }
    }
    lenient
}

/// The media ranges whose responses can be FHIR JSON (the kick-off answers with an empty
/// body or an `OperationOutcome`).
const ACCEPTABLE: &[&str] =
    &["*/*", "*", "application/*", "application/fhir+json", "application/json", "application/json+fhir"];

/// `Accept` must allow FHIR JSON (D1: a missing header is fine). Failing that is a hard
/// error with `expression` `Accept` (the HTTP layer answers 406).
pub(crate) fn check_accept(accept: Option<&str>, cx: &mut Issues) {
    let Some(accept) = accept else { return };
    if accept.trim().is_empty() {
        return;
    }
    let ok = accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map(|(_, v)| v.trim().parse::<f32>().unwrap_or(1.0))
            .unwrap_or(1.0);
        quality > 0.0 && ACCEPTABLE.contains(&media.as_str())
    });
    if !ok {
        cx.hard(
            Issue::error(
                IssueCode::NotSupported,
                format!(
                    "Accept '{accept}' cannot be honoured: a kick-off responds with \
                     application/fhir+json; send Accept: application/fhir+json (or \
                     application/json, */*, or no Accept header)."
                ),
            )
            .at(ACCEPT),
        );
    }
}

/// On POST the body must be declared as JSON: `application/fhir+json` or `application/json`,
/// parameters such as `charset` allowed.
pub(crate) fn check_content_type(content_type: Option<&str>, cx: &mut Issues) {
    let media =
        content_type.and_then(|c| c.split(';').next()).map(|m| m.trim().to_ascii_lowercase()).unwrap_or_default();
    if matches!(media.as_str(), "application/fhir+json" | "application/json" | "application/json+fhir") {
        return;
    }
    let got = match content_type {
        Some(c) if !c.trim().is_empty() => format!("Content-Type '{c}' is not accepted"),
        _ => "Content-Type is missing".to_string(),
    };
    cx.hard(
        Issue::error(
            IssueCode::NotSupported,
            format!(
                "{got} for a POST kick-off; the body must be a FHIR Parameters resource sent as \
                 application/fhir+json or application/json."
            ),
        )
        .at(CONTENT_TYPE),
    );
}
