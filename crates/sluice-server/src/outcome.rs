//! Rendering errors as FHIR `OperationOutcome` responses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_fhir::{Issue, IssueCode, OperationOutcome};

/// An error response: a status and an OperationOutcome, plus optional extra headers.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    outcome: OperationOutcome,
    retry_after: Option<u64>,
    /// `WWW-Authenticate` of a 401.
    challenge: Option<HeaderValue>,
}

impl ApiError {
    /// `status` with the given issues.
    pub fn new(status: StatusCode, outcome: impl Into<OperationOutcome>) -> Self {
        ApiError { status, outcome: outcome.into(), retry_after: None, challenge: None }
    }

    /// 400 with one `invalid` issue.
    pub fn bad_request(diagnostics: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Issue::error(IssueCode::Invalid, diagnostics))
    }

    /// 404 with one `not-found` issue.
    pub fn not_found(diagnostics: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, Issue::error(IssueCode::NotFound, diagnostics))
    }

    /// 500 with one `exception` issue. The message must not contain secrets.
    pub fn internal(diagnostics: impl std::fmt::Display) -> Self {
        tracing::error!(error = %diagnostics, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, Issue::fatal(IssueCode::Exception, diagnostics.to_string()))
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The first issue's text (for the audit trail).
    pub fn message(&self) -> &str {
        self.outcome.issues.first().map_or("", |i| i.diagnostics.as_str())
    }

    /// Adds a `Retry-After` header (seconds).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = fhir_json(self.status, &self.outcome.to_json());
        if let Some(s) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(c) = self.challenge {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, c);
        }
        res
    }
}

/// A FHIR JSON response (`application/fhir+json`).
pub fn fhir_json(status: StatusCode, body: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/fhir+json; charset=utf-8")], body.to_string()).into_response()
}

/// An informational OperationOutcome with 200/202.
pub fn info(status: StatusCode, message: &str) -> Response {
    fhir_json(status, &OperationOutcome::single(Issue::information(message)).to_json())
}

/// Fallback for unknown paths.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {} (the FHIR base is /fhir)", uri.path()))
}

/// Fallback for a known path with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Issue::error(IssueCode::NotSupported, format!("{method} is not supported on {}", uri.path())),
    )
}

/// Turns a handler panic into a 500 OperationOutcome (the server keeps running).
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    ApiError::internal(format!("internal error: {detail}")).into_response()
}

/// Turns any error response that is not already JSON (axum's own rejections: a body over
/// the size limit, a path that is not UTF-8, ...) into an OperationOutcome carrying the
/// original message, so every 4xx/5xx a client sees is an OperationOutcome (or, from the
/// token endpoint, the JSON error RFC 6749 prescribes).
pub async fn ensure_outcome(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_fhir = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/fhir+json") || ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_fhir {
        return res;
    }
    let retry_after = res.headers().get(header::RETRY_AFTER).cloned();
    let body = axum::body::to_bytes(res.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => IssueCode::TooCostly,
        StatusCode::METHOD_NOT_ALLOWED => IssueCode::NotSupported,
        StatusCode::NOT_FOUND => IssueCode::NotFound,
        s if s.is_server_error() => IssueCode::Exception,
        _ => IssueCode::Invalid,
    };
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let mut out = ApiError::new(status, Issue::error(code, message)).into_response();
    if let Some(v) = retry_after {
        out.headers_mut().insert(header::RETRY_AFTER, v);
    }
    out
}

impl From<sluice_auth::Denied> for ApiError {
    fn from(d: sluice_auth::Denied) -> Self {
        let unauthorized = d.status == StatusCode::UNAUTHORIZED;
        let code = if unauthorized { IssueCode::Login } else { IssueCode::Forbidden };
        let challenge =
            unauthorized.then(|| HeaderValue::from_str(d.challenge()).unwrap_or(HeaderValue::from_static("Bearer")));
        let mut e = ApiError::new(d.status, Issue::error(code, d.message));
        e.challenge = challenge;
        e
    }
}
