//! Probes for orchestrators: `GET /healthz` (the process answers) and `GET /readyz` (the
//! store answers and export storage is usable). Cheap, unauthenticated, and they never
//! name a secret.

use crate::AppState;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

fn probe(status: StatusCode, body: serde_json::Value) -> Response {
    let mut res = (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// `GET /healthz`: 200 while the process serves requests.
pub async fn healthz() -> Response {
    probe(StatusCode::OK, json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when a kick-off could be served (the store answers a read of the job
/// records; the storage for new exports is configured), else 503 saying which is not.
pub async fn readyz(State(app): State<AppState>) -> Response {
    let store = match app.inner.store.get("readyz-probe").await {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("unreachable: {e}"),
    };
    let storage = match app.inner.engine.storage_for_new_export().await {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("not usable: {e}"),
    };
    let ready = store == "ok" && storage == "ok";
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    probe(status, json!({"status": if ready { "ready" } else { "not ready" }, "store": store, "storage": storage}))
}
