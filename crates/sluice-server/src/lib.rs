//! Sluice's HTTP API as a library: the FHIR Bulk Data `$export` endpoints (kick-off at the
//! three levels, `$export-status` polling, manifests and cancellation), signed downloads of
//! local export files (`/files`), the CapabilityStatement, a little FHIR REST (read, create,
//! update, delete, batch and transaction Bundles) and the configuration resources
//! (`/AwsAccount/<id>`, ...). Every 4xx/5xx is a FHIR `OperationOutcome`.
//!
//! [`Api`] builds an axum [`Router`] (a tower `Service`) that a host application can serve
//! as it is (the `sluice` binary does) or mount under a prefix of its own, next to its own
//! routes and layers:
//!
//! ```no_run
//! # async fn host(engine: sluice_engine::Engine, store: std::sync::Arc<dyn sluice_server::Store>) {
//! let sluice = sluice_server::Api::new(engine, store, "https://example.org/bulk").router();
//! let app: axum::Router = axum::Router::new().nest("/bulk", sluice);
//! # }
//! ```
//!
//! The base URL is the public URL of the router's root (the prefix included): absolute URLs
//! (`Content-Location`, manifest links, the kick-off `request`) start with it (D33).
//!
//! Who may do what is the host's decision: [`Api::authorize`] takes an [`Authorize`], asked
//! before every operation ([`Access`]) with the request's headers; its [`Grant`] says who
//! is asking and what they may do, and the API applies it (the types an export covers, the
//! entries of a Bundle, the owner of an export). The default, [`AllowAll`], allows
//! everything. [`Api::smart`] installs SMART Backend Services ([`sluice_auth::Smart`]) with
//! its routes: `POST /auth/token`, `GET /fhir/.well-known/smart-configuration`,
//! `/Client/<id>` and `GET /AuditEvent`. A host can also wrap the router in tower layers of
//! its own.

mod auth;
mod config;
mod export;
mod files;
mod health;
mod hosts;
mod metadata;
pub mod meter;
mod outcome;
mod page;
mod rest;
pub mod serve;

pub use sluice_auth::{Access, AllowAll, Auditor, Authorize, Denied, Grant, Smart};

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use sluice_engine::{Engine, ExportStore};
use sluice_storage::ConfigRepo;
use sluice_storage_local::LocalStorage;
use sluice_store::{AuthRepo, ResourceWrites};
use std::sync::Arc;
use std::time::Duration;

/// Everything the API asks of a store: writes ([`ResourceWrites`]), what the engine reads
/// ([`ExportStore`]: snapshots and job records), the configuration resources
/// ([`ConfigRepo`]) and the authorization records ([`AuthRepo`]: used assertions, the
/// audit trail). Every type implementing the four is one.
pub trait Store: ResourceWrites + ExportStore + sluice_auth::TokenStore {}

impl<T: ResourceWrites + ExportStore + ConfigRepo + AuthRepo + ?Sized> Store for T {}

/// The largest request body accepted by default (a transaction Bundle); larger ones get 413.
/// Bodies this large are read one at a time: the bytes of REST and Bundle bodies buffered
/// at once never exceed this (smaller ones are read side by side).
pub const DEFAULT_MAX_BODY: usize = 64 << 20;

/// The largest body of any other request (a kick-off's `Parameters`, a configuration
/// resource, a token request); larger ones get 413.
pub const SMALL_BODY: usize = 1 << 20;

/// A builder for Sluice's HTTP API.
pub struct Api {
    engine: Engine,
    store: Arc<dyn Store>,
    base_url: String,
    local: Option<LocalStorage>,
    ttl: Duration,
    authorize: Arc<dyn Authorize>,
    smart: Option<Smart>,
    audit: Auditor,
    token_downloads: bool,
    max_body: usize,
    metrics: Option<meter::Render>,
    allowed_hosts: Vec<String>,
}

impl Api {
    /// The API over `engine` and `store` (the same store the engine reads), whose router's
    /// root is public at `base_url` (e.g. `https://example.org/bulk`; a trailing `/` is
    /// dropped).
    pub fn new(engine: Engine, store: Arc<dyn Store>, base_url: impl Into<String>) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_string();
        Api {
            engine,
            store,
            base_url,
            local: None,
            ttl: Duration::from_secs(3600),
            authorize: Arc::new(AllowAll),
            smart: None,
            audit: Auditor::disabled(),
            token_downloads: false,
            max_body: DEFAULT_MAX_BODY,
            metrics: None,
            allowed_hosts: Vec::new(),
        }
    }

    /// Serves the signed download URLs of `local` under `/files` (when exports go to local
    /// disk; cloud storage signs its own URLs). Its base URL must be this API's.
    pub fn local_files(mut self, local: LocalStorage) -> Self {
        self.local = Some(local);
        self
    }

    /// How long the download URLs in a manifest work (default: one hour).
    pub fn signed_url_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Who may do what: asked before every operation (default: [`AllowAll`]).
    pub fn authorize(mut self, authorize: impl Authorize + 'static) -> Self {
        self.authorize = Arc::new(authorize);
        self
    }

    /// SMART Backend Services: `smart` authorizes every request, and the router serves its
    /// token endpoint, discovery document, `/Client/<id>` and the audit trail (recorded
    /// with `smart`'s [`Auditor`]).
    pub fn smart(mut self, smart: Smart) -> Self {
        self.audit = smart.auditor().clone();
        self.authorize = Arc::new(smart.clone());
        self.smart = Some(smart);
        self
    }

    /// Records the audit trail with `audit` (set by [`Api::smart`] already).
    pub fn audit(mut self, audit: Auditor) -> Self {
        self.audit = audit;
        self
    }

    /// Bearer-protected downloads (`--download-auth token`): local export files are served
    /// at unsigned URLs to the export's own client only, and manifests say
    /// `requiresAccessToken: true`. Cloud storage keeps its signed URLs.
    pub fn token_downloads(mut self, on: bool) -> Self {
        self.token_downloads = on;
        self
    }

    /// The largest request body accepted (default [`DEFAULT_MAX_BODY`]); larger ones get 413.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Serves `GET /metrics` with what `render` returns (the Prometheus text format): the
    /// host installs a `metrics` recorder (the API and the engine record through the
    /// `metrics` facade) and renders it here. The root client only, under SMART.
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// Host names answered besides the base URL's and the loopback names (`localhost`,
    /// `127.0.0.1`, `[::1]`), whatever the port; `*` answers any. A request naming another
    /// host in `Host` is refused with 421: a web page cannot drive a server on the
    /// user's machine through a DNS name it controls (DNS rebinding). The health probes
    /// answer any host.
    pub fn allowed_hosts(mut self, hosts: impl IntoIterator<Item = String>) -> Self {
        self.allowed_hosts.extend(hosts.into_iter().map(|h| h.to_ascii_lowercase()));
        self
    }

    /// The router: every route, with the layers that make every error an OperationOutcome
    /// (handler panics included) and log each request (never its query, which can hold
    /// URL signatures).
    pub fn router(self) -> Router {
        if let Err(why) = check_base_url(&self.base_url) {
            // Nothing may run with a base URL that cannot go into a header: every request
            // would change state first and fail to answer after.
            tracing::error!(error = %why, "the API's base URL is unusable; every request is refused");
            let why = Arc::new(why);
            return Router::new().fallback(move || {
                let why = why.clone();
                async move { outcome::ApiError::internal(format!("this server is misconfigured: {why}")) }
            });
        }
        let max_body = self.max_body;
        let hosts = Arc::new(hosts::AllowedHosts::new(&self.base_url, self.allowed_hosts));
        let state = AppState {
            inner: Arc::new(Inner {
                engine: self.engine,
                store: self.store,
                local: self.local,
                base_url: self.base_url,
                ttl: self.ttl,
                authorize: self.authorize,
                smart: self.smart,
                audit: self.audit,
                token_downloads: self.token_downloads,
                polls: export::Polls::default(),
                metrics: self.metrics,
                body_budget: tokio::sync::Semaphore::new(kib(max_body) as usize),
                max_body,
            }),
        };
        Router::new()
            .route("/healthz", get(health::healthz))
            .route("/readyz", get(health::readyz))
            .route("/metrics", get(meter::metrics))
            .route("/", get(page::index))
            .route("/exports/{id}", get(page::export))
            .route("/fhir/metadata", get(metadata::capability_statement))
            .route("/fhir/.well-known/smart-configuration", get(auth::smart_configuration))
            .route("/auth/token", post(auth::token))
            .route("/AuditEvent", get(auth::audit_events))
            .route("/fhir/$export", get(export::system).post(export::system))
            .route("/fhir/Patient/$export", get(export::patient).post(export::patient))
            .route("/fhir/Group/{id}/$export", get(export::group).post(export::group))
            .route("/fhir/$export-status/{id}", get(export::status).delete(export::cancel))
            .route("/fhir", post(rest::bundle))
            .route("/fhir/{type}", post(rest::create))
            .route("/fhir/{type}/{id}", get(rest::read).put(rest::update).delete(rest::delete))
            .route("/files/{*key}", get(files::download))
            .route("/{type}/{id}", get(config::get).put(config::put).delete(config::delete))
            .fallback(outcome::not_found)
            .method_not_allowed_fallback(outcome::method_not_allowed)
            .layer(axum::extract::DefaultBodyLimit::max(SMALL_BODY))
            .layer(axum::middleware::from_fn_with_state(hosts, hosts::check))
            .layer(axum::middleware::from_fn(outcome::ensure_outcome))
            .layer(axum::middleware::from_fn(access_log))
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(outcome::panic_response))
            .with_state(state)
    }
}

/// Checks a public base URL (`--base-url`, [`Api::new`]): an absolute `http` or `https`
/// URL of printable ASCII, without query or fragment (a path prefix is fine). It goes into
/// headers (`Content-Location`, `Location`) and every absolute URL the API writes.
pub fn check_base_url(url: &str) -> Result<(), String> {
    if let Some(c) = url.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "the base URL must be printable ASCII without spaces (percent-encode anything else); it holds {:?}",
            c
        ));
    }
    let uri: axum::http::Uri =
        url.parse().map_err(|e| format!("the base URL '{url}' is not an absolute http:// or https:// URL ({e})"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(format!("the base URL '{url}' must be an absolute http:// or https:// URL"));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(format!("the base URL '{url}' must not have a query or a fragment"));
    }
    Ok(())
}

/// Shared state of all handlers.
#[derive(Clone)]
struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    store: Arc<dyn Store>,
    local: Option<LocalStorage>,
    base_url: String,
    ttl: Duration,
    authorize: Arc<dyn Authorize>,
    /// SMART Backend Services, when on.
    smart: Option<Smart>,
    /// The audit trail (disabled unless configured).
    audit: Auditor,
    /// Bearer-protected local downloads.
    token_downloads: bool,
    /// Status polls of running exports (D13: 429 when too fast; ETA).
    polls: export::Polls,
    /// Renders `GET /metrics`, when the host publishes metrics.
    metrics: Option<meter::Render>,
    /// KiB of REST and Bundle bodies that may be buffered at once (the largest body's).
    body_budget: tokio::sync::Semaphore,
    /// The largest REST or Bundle body.
    max_body: usize,
}

/// `bytes` in KiB, rounded up (semaphore permits).
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl AppState {
    /// Asks the host's [`Authorize`] whether the request may do `access`.
    async fn allow(&self, access: Access<'_>, headers: &axum::http::HeaderMap) -> Result<Grant, outcome::ApiError> {
        self.allow_as(access, headers, &mut None).await
    }

    /// [`AppState::allow`], setting `who` to the caller once known (granted, or refused
    /// though identified): the audit trail names it either way.
    async fn allow_as(
        &self,
        access: Access<'_>,
        headers: &axum::http::HeaderMap,
        who: &mut Option<String>,
    ) -> Result<Grant, outcome::ApiError> {
        match self.inner.authorize.authorize(&access, headers).await {
            Ok(grant) => {
                who.clone_from(&grant.client);
                Ok(grant)
            }
            Err(denied) => {
                who.clone_from(&denied.client);
                Err(denied.into())
            }
        }
    }

    /// Reads a REST or Bundle body (at most the API's largest body, else 413) once its size
    /// fits the bytes that may be buffered at once; the permit returned holds that share
    /// until dropped (after the body is parsed and written).
    async fn read_body(
        &self,
        headers: &axum::http::HeaderMap,
        body: axum::body::Body,
    ) -> Result<(axum::body::Bytes, tokio::sync::SemaphorePermit<'_>), outcome::ApiError> {
        let max = self.inner.max_body;
        let too_large = || {
            outcome::ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                sluice_fhir::Issue::error(
                    sluice_fhir::IssueCode::TooCostly,
                    format!("the request body is larger than this server accepts ({max} bytes); split the Bundle"),
                ),
            )
        };
        let declared = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(too_large());
        }
        // A body of unknown length may be as large as the largest.
        let permit = self
            .inner
            .body_budget
            .acquire_many(kib(declared.unwrap_or(max)))
            .await
            .map_err(outcome::ApiError::internal)?;
        // Read into one buffer of the declared size: no doubling, no second copy.
        let mut buf = Vec::with_capacity(declared.unwrap_or(0));
        let mut body = body;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            let frame = frame
                .map_err(|e| outcome::ApiError::bad_request(format!("the request body could not be read: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > max {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok((axum::body::Bytes::from(buf), permit))
    }

    /// [`AppState::allow`], then that `interaction` on `resource_type` is in the grant.
    async fn allow_type(
        &self,
        access: Access<'_>,
        headers: &axum::http::HeaderMap,
        resource_type: &str,
        interactions: &[sluice_auth::Interaction],
    ) -> Result<Grant, outcome::ApiError> {
        let grant = self.allow(access, headers).await?;
        permitted(&grant, resource_type, interactions)?;
        Ok(grant)
    }
}

/// 403 unless `grant` permits every one of `interactions` on `resource_type`.
fn permitted(
    grant: &Grant,
    resource_type: &str,
    interactions: &[sluice_auth::Interaction],
) -> Result<(), outcome::ApiError> {
    if let Some(missing) = interactions.iter().find(|i| !grant.allows(resource_type, **i)) {
        let scope = format!("system/{resource_type}.{}", missing.letter());
        return Err(Denied::forbidden(format!(
            "the token's scopes ('{}') do not permit this on {resource_type}: it needs {scope} (or the v1 .read/.write)",
            grant.scopes.as_str()
        ))
        .into());
    }
    Ok(())
}

/// Logs method, path (never the query: it can hold signatures), status and time, and the
/// export's id when the path names one (status, cancel, files); counts the request in the
/// metrics by its route.
async fn access_log(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str().to_string());
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    let took = started.elapsed();
    meter::request(&method, route.as_deref(), res.status(), took);
    let (status, ms) = (res.status().as_u16(), took.as_millis() as u64);
    let named = res.extensions().get::<ExportOfResponse>().map(|e| e.0.as_str());
    match named.or_else(|| export_in_path(&path)) {
        Some(export_id) => tracing::info!(%method, %path, status, ms, export_id, "request"),
        None => tracing::info!(%method, %path, status, ms, "request"),
    }
    res
}

/// The export a response concerns when its path does not say (a kick-off's new export),
/// for the access log.
#[derive(Clone)]
struct ExportOfResponse(String);

/// The export a request path names: `.../$export-status/<id>` or `.../files/<folder>_<id>/...`.
fn export_in_path(path: &str) -> Option<&str> {
    if let Some((_, rest)) = path.rsplit_once("/$export-status/") {
        return Some(rest).filter(|id| !id.is_empty() && !id.contains('/'));
    }
    files::export_of(path.split_once("/files/")?.1)
}
