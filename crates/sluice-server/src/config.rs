//! Configuration resources, Aidbox style, outside `/fhir`: `PUT|GET|DELETE /<Type>/<id>`
//! for `AwsAccount`, `AzureAccount`, `AzureContainer` and `GcpServiceAccount`. Secrets are
//! stored but never returned (nor logged: the access log omits bodies).

use crate::outcome::{ApiError, fhir_json};
use crate::{Access, AppState};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sluice_storage_config::resources::{self, ConfigType};

fn config_type(t: &str) -> Result<&'static ConfigType, ApiError> {
    resources::config_type(t).ok_or_else(|| {
        let known: Vec<&str> = resources::CONFIG_TYPES.iter().map(|c| c.name).collect();
        ApiError::not_found(format!(
            "no route for /{t}: configuration resources are {}; FHIR resources live under /fhir",
            known.join(", ")
        ))
    })
}

/// The configuration type `t` names, once the host's [`crate::Authorize`] allows it.
async fn admitted(app: &AppState, t: &str, headers: &HeaderMap) -> Result<&'static ConfigType, ApiError> {
    let ty = config_type(t)?;
    app.allow(Access::Configure { resource_type: ty.name }, headers).await?;
    Ok(ty)
}

/// `PUT /<Type>/<id>`: creates (201) or replaces (200); answers with the resource minus its
/// secrets.
pub async fn put(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ty = admitted(&app, &t, &headers).await?;
    let value = resources::validate(ty, &id, &body).map_err(|issues| ApiError::new(StatusCode::BAD_REQUEST, issues))?;
    let created = app.inner.store.config_put(ty.name, &id, &value.to_string()).await.map_err(ApiError::internal)?;
    tracing::info!(resource = %format!("{}/{id}", ty.name), created, "configuration resource saved");
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(fhir_json(status, &resources::redact(ty, value)))
}

/// `GET /<Type>/<id>`: the resource minus its secrets.
pub async fn get(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ty = admitted(&app, &t, &headers).await?;
    let json = app.inner.store.config_get(ty.name, &id).await.map_err(ApiError::internal)?;
    let json = json.ok_or_else(|| ApiError::not_found(format!("{}/{id} does not exist", ty.name)))?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(ApiError::internal)?;
    Ok(fhir_json(StatusCode::OK, &resources::redact(ty, value)))
}

/// `DELETE /<Type>/<id>`: 204, or 404 when absent.
pub async fn delete(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ty = admitted(&app, &t, &headers).await?;
    if !app.inner.store.config_delete(ty.name, &id).await.map_err(ApiError::internal)? {
        return Err(ApiError::not_found(format!("{}/{id} does not exist", ty.name)));
    }
    tracing::info!(resource = %format!("{}/{id}", ty.name), "configuration resource deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}
