//! Configuration resources, Aidbox style, outside `/fhir`: `PUT|GET|DELETE /<Type>/<id>`
//! for `AwsAccount`, `AzureAccount`, `AzureContainer`, `GcpServiceAccount` and `Client`
//! (SMART backend services; public keys only). Secrets are stored but never returned (nor
//! logged: the access log omits bodies). Changes are audited.

use crate::outcome::{ApiError, fhir_json};
use crate::{Access, AppState, Grant};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sluice_auth::client::{self, CLIENT_TYPE};
use sluice_auth::{Event, Kind as AuditKind};
use sluice_storage_config::resources::{self, ConfigType};

/// A configuration resource type: storage configuration, or `Client`.
#[derive(Clone, Copy)]
enum Kind {
    Storage(&'static ConfigType),
    Client,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Storage(ty) => ty.name,
            Kind::Client => CLIENT_TYPE,
        }
    }

    fn validate(self, id: &str, body: &[u8]) -> Result<serde_json::Value, Vec<sluice_fhir::Issue>> {
        match self {
            Kind::Storage(ty) => resources::validate(ty, id, body),
            Kind::Client => client::validate(id, body),
        }
    }

    fn redact(self, value: serde_json::Value) -> serde_json::Value {
        match self {
            Kind::Storage(ty) => resources::redact(ty, value),
            Kind::Client => value,
        }
    }
}

fn config_type(t: &str) -> Result<Kind, ApiError> {
    if t == CLIENT_TYPE {
        return Ok(Kind::Client);
    }
    resources::config_type(t).map(Kind::Storage).ok_or_else(|| {
        let mut known: Vec<&str> = resources::CONFIG_TYPES.iter().map(|c| c.name).collect();
        known.push(CLIENT_TYPE);
        ApiError::not_found(format!(
            "no route for /{t}: configuration resources are {}; FHIR resources live under /fhir",
            known.join(", ")
        ))
    })
}

/// The configuration type `t` names, once the host's [`crate::Authorize`] allows it.
async fn admitted(
    app: &AppState,
    t: &str,
    headers: &HeaderMap,
    who: &mut Option<String>,
) -> Result<(Kind, Grant), ApiError> {
    let ty = config_type(t)?;
    let grant = app.allow_as(Access::Configure { resource_type: ty.name() }, headers, who).await?;
    Ok((ty, grant))
}

/// Records a change (or a refused one) in the audit trail. `who` is the caller once
/// identified; otherwise only a name the request claims (never its credentials).
async fn audited(
    app: &AppState,
    kind: AuditKind,
    (t, id): (&str, &str),
    headers: &HeaderMap,
    who: Option<String>,
    result: Result<Response, ApiError>,
) -> Result<Response, ApiError> {
    if app.inner.audit.enabled() {
        let who = who.or_else(|| claimed(headers));
        let mut event = Event::new(kind, who.as_deref()).reference(format!("{t}/{id}"));
        if let Err(e) = &result {
            event = event.refused(e.status().as_u16()).detail(e.message().to_string());
        }
        app.inner.audit.record(event).await;
    }
    result
}

/// The user name of HTTP Basic credentials, if any (never the password).
fn claimed(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, cred) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(cred.trim()).ok()?;
    let user = String::from_utf8(raw).ok()?.split_once(':')?.0.to_string();
    Some(user).filter(|u| !u.is_empty() && u.len() <= 64)
}

/// `PUT /<Type>/<id>`: creates (201) or replaces (200); answers with the resource minus its
/// secrets.
pub async fn put(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut who = None;
    let result = async {
        let (ty, _) = admitted(&app, &t, &headers, &mut who).await?;
        let value = ty.validate(&id, &body).map_err(|issues| ApiError::new(StatusCode::BAD_REQUEST, issues))?;
        let created =
            app.inner.store.config_put(ty.name(), &id, &value.to_string()).await.map_err(ApiError::internal)?;
        tracing::info!(resource = %format!("{}/{id}", ty.name()), created, "configuration resource saved");
        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
        Ok(fhir_json(status, &ty.redact(value)))
    }
    .await;
    audited(&app, AuditKind::ConfigPut, (&t, &id), &headers, who, result).await
}

/// `GET /<Type>/<id>`: the resource minus its secrets.
pub async fn get(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (ty, _) = admitted(&app, &t, &headers, &mut None).await?;
    let json = app.inner.store.config_get(ty.name(), &id).await.map_err(ApiError::internal)?;
    let json = json.ok_or_else(|| ApiError::not_found(format!("{}/{id} does not exist", ty.name())))?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(ApiError::internal)?;
    Ok(fhir_json(StatusCode::OK, &ty.redact(value)))
}

/// `DELETE /<Type>/<id>`: 204, or 404 when absent.
pub async fn delete(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mut who = None;
    let result = async {
        let (ty, _) = admitted(&app, &t, &headers, &mut who).await?;
        if !app.inner.store.config_delete(ty.name(), &id).await.map_err(ApiError::internal)? {
            return Err(ApiError::not_found(format!("{}/{id} does not exist", ty.name())));
        }
        tracing::info!(resource = %format!("{}/{id}", ty.name()), "configuration resource deleted");
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    audited(&app, AuditKind::ConfigDelete, (&t, &id), &headers, who, result).await
}
