//! SMART Backend Services routes (when [`crate::Api::smart`] is on): the token endpoint,
//! the discovery document and the audit trail.

use crate::outcome::{ApiError, fhir_json};
use crate::{Access, AppState};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_store::AuditQuery;
use time::OffsetDateTime;

/// The most audit events one search returns.
const MAX_AUDIT_PAGE: usize = 1000;

fn smart_off() -> ApiError {
    ApiError::not_found("authorization is off on this server (start it with --auth smart)")
}

/// A JSON answer that no cache keeps (RFC 6749 §5.1).
fn oauth_json(status: StatusCode, body: &Value) -> Response {
    let mut res = (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    res
}

/// `POST /auth/token` (form-encoded): a bearer token for a client's signed assertion.
pub async fn token(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let smart = app.inner.smart.as_ref().ok_or_else(smart_off)?;
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        let e = json!({"error": "invalid_request", "error_description": "send the token request as application/x-www-form-urlencoded"});
        return Ok(oauth_json(StatusCode::BAD_REQUEST, &e));
    }
    let form: Vec<(String, String)> =
        form_urlencoded::parse(&body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    Ok(match smart.token(&form).await {
        Ok(t) => oauth_json(StatusCode::OK, &serde_json::to_value(&t).map_err(ApiError::internal)?),
        Err(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            oauth_json(status, &e.body())
        }
    })
}

/// `GET /fhir/.well-known/smart-configuration`.
pub async fn smart_configuration(State(app): State<AppState>) -> Result<Response, ApiError> {
    let smart = app.inner.smart.as_ref().ok_or_else(smart_off)?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], smart.smart_configuration().to_string())
        .into_response())
}

/// `GET /AuditEvent?date=ge..&date=lt..&agent=..&_count=..` (root client only): a
/// `searchset` Bundle, oldest first.
pub async fn audit_events(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    app.allow(Access::Audit, &headers).await?;
    let mut q = AuditQuery { limit: 100, ..AuditQuery::default() };
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "date" => {
                let (prefix, when) = if v.len() > 2 && v.as_bytes()[..2].iter().all(u8::is_ascii_alphabetic) {
                    v.split_at(2)
                } else {
                    ("eq", &*v)
                };
                let t = parse_date(when)?;
                // A bare date is that whole day (UTC); an instant is that moment (the
                // stores keep microseconds).
                let span = if when.len() == 10 { time::Duration::days(1) } else { time::Duration::microseconds(1) };
                match prefix {
                    "eq" => (q.since, q.before) = (Some(t), Some(t + span)),
                    "ge" => q.since = Some(t),
                    "gt" => q.since = Some(t + span),
                    "lt" => q.before = Some(t),
                    "le" => q.before = Some(t + span),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "date supports the prefixes eq, ge, gt, lt and le, not '{prefix}'"
                        )));
                    }
                }
            }
            "agent" => q.agent = Some(v.into_owned()),
            "_count" => {
                q.limit = v.parse::<usize>().ok().filter(|n| (1..=MAX_AUDIT_PAGE).contains(n)).ok_or_else(|| {
                    ApiError::bad_request(format!("_count must be a number from 1 to {MAX_AUDIT_PAGE}"))
                })?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "AuditEvent search supports date, agent and _count, not '{other}'"
                )));
            }
        }
    }
    let records = app.inner.store.audit_query(&q).await.map_err(ApiError::internal)?;
    let mut entries = Vec::with_capacity(records.len());
    for r in records {
        let resource: Value = serde_json::from_str(&r.json).map_err(ApiError::internal)?;
        entries.push(json!({"fullUrl": format!("{}/AuditEvent/{}", app.inner.base_url, r.id), "resource": resource}));
    }
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries});
    let mut res = fhir_json(StatusCode::OK, &bundle);
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// A FHIR `dateTime` or `instant` (a date alone is its first moment, UTC).
fn parse_date(s: &str) -> Result<OffsetDateTime, ApiError> {
    let bad = || {
        ApiError::bad_request(format!("'{s}' is not a date (YYYY-MM-DD or an instant such as 2026-01-02T03:04:05Z)"))
    };
    if let Ok(t) = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t);
    }
    let d = time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).map_err(|_| bad())?;
    Ok(d.midnight().assume_utc())
}
