//! The HTTP API: FHIR base `/fhir` (bulk export, status, a little REST) and `/files` for
//! signed downloads of local export files. Every error is an `OperationOutcome`.

mod config;
mod export;
mod files;
mod metadata;
mod outcome;
mod rest;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use sluice_engine::Engine;
use sluice_storage_local::LocalStorage;
use std::sync::Arc;
use std::time::Duration;

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    local: Option<LocalStorage>,
    base_url: String,
    ttl: Duration,
    /// Status polls of running exports (D13: 429 when too fast; ETA).
    polls: export::Polls,
}

impl AppState {
    /// State for a server whose absolute URLs start with `base_url`.
    pub fn new(engine: Engine, local: Option<LocalStorage>, base_url: String, ttl: Duration) -> Self {
        AppState { inner: Arc::new(Inner { engine, local, base_url, ttl, polls: export::Polls::default() }) }
    }
}

/// The largest request body accepted (a transaction Bundle); larger ones get 413.
const MAX_BODY: usize = 64 << 20;

/// All routes.
pub fn router(state: AppState) -> Router {
    let fhir = Router::new()
        .route("/metadata", get(metadata::capability_statement))
        .route("/$export", get(export::system).post(export::system))
        .route("/Patient/$export", get(export::patient).post(export::patient))
        .route("/Group/{id}/$export", get(export::group).post(export::group))
        .route("/$export-status/{id}", get(export::status).delete(export::cancel))
        .route("/", post(rest::bundle))
        .route("/{type}", post(rest::create))
        .route("/{type}/{id}", get(rest::read).put(rest::update).delete(rest::delete));
    Router::new()
        .nest("/fhir", fhir)
        .route("/files/{*key}", get(files::download))
        .route("/{type}/{id}", get(config::get).put(config::put).delete(config::delete))
        .fallback(outcome::not_found)
        .method_not_allowed_fallback(outcome::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(outcome::ensure_outcome))
        .layer(axum::middleware::from_fn(access_log))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(outcome::panic_response))
        .with_state(state)
}

/// Logs method, path (never the query: it can hold signatures), status and time.
async fn access_log(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    tracing::info!(%method, %path, status = res.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request");
    res
}
