//! The API's metrics (HTTP requests, status polls, kick-off refusals, process memory),
//! recorded through the `metrics` facade, and `GET /metrics`, which renders whatever
//! recorder the host installed (the `sluice` binary: Prometheus). Names and meanings are
//! listed in the README.

use crate::outcome::ApiError;
use crate::{Access, AppState};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::time::Duration;

/// HTTP requests answered, by method, route and status.
pub const HTTP_REQUESTS: &str = "sluice_http_requests_total";
/// Seconds from a request to its response's headers, by method and route (histogram).
pub const HTTP_DURATION: &str = "sluice_http_request_duration_seconds";
/// Status requests (`GET $export-status`), by answer.
pub const STATUS_POLLS: &str = "sluice_status_polls_total";
/// Kick-offs refused, by reason.
pub const KICKOFFS_REFUSED: &str = "sluice_kickoffs_refused_total";
/// The process's resident memory (the standard Prometheus name).
pub const RSS: &str = "process_resident_memory_bytes";

/// Renders the metrics in the Prometheus text format.
pub(crate) type Render = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// Describes the API's metrics to the installed recorder (their `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by method, route and status.");
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "Time from a request to its response's headers, by method and route."
    );
    metrics::describe_counter!(
        STATUS_POLLS,
        "Status requests, by answer: in_progress (202), complete (manifest), failed (the export failed), throttled (429), not_found, error."
    );
    metrics::describe_counter!(
        KICKOFFS_REFUSED,
        "Kick-offs refused, by reason: busy (429, an export is running), invalid, unauthorized, forbidden, not_found, not_acceptable, too_large, shutting_down, error."
    );
    metrics::describe_gauge!(RSS, metrics::Unit::Bytes, "Resident memory of the server process.");
}

/// Records one HTTP request: `route` is the matched route template (`other` when none
/// matched, so paths never become labels).
pub(crate) fn request(method: &Method, route: Option<&str>, status: StatusCode, took: Duration) {
    let method = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "other",
    };
    let route = route.unwrap_or("other").to_string();
    metrics::counter!(HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status.as_str().to_string())
        .increment(1);
    metrics::histogram!(HTTP_DURATION, "method" => method, "route" => route).record(took.as_secs_f64());
}

/// Records a status request's answer: the export's status (`Ok`) or the request's failure.
pub(crate) fn status_poll(result: &Result<Response, ApiError>) {
    let answer = match result {
        Ok(res) if res.status() == StatusCode::ACCEPTED => "in_progress",
        Ok(res) if res.status() == StatusCode::OK => "complete",
        Ok(_) => "failed",
        Err(e) if e.status() == StatusCode::TOO_MANY_REQUESTS => "throttled",
        Err(e) if e.status() == StatusCode::NOT_FOUND => "not_found",
        Err(_) => "error",
    };
    metrics::counter!(STATUS_POLLS, "answer" => answer).increment(1);
}

/// Records a refused kick-off, by the reason its status says.
pub(crate) fn kickoff_refused(status: StatusCode) {
    let reason = match status.as_u16() {
        429 => "busy",
        400 | 422 => "invalid",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        406 | 415 => "not_acceptable",
        413 => "too_large",
        503 => "shutting_down",
        _ => "error",
    };
    metrics::counter!(KICKOFFS_REFUSED, "reason" => reason).increment(1);
}

/// The process's resident memory in bytes, where the system tells (Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// `GET /metrics`: the Prometheus text format (the root client only, when authorization
/// is on); 404 when the host installed no recorder.
pub(crate) async fn metrics(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    app.allow(Access::Monitor, &headers).await?;
    let Some(render) = &app.inner.metrics else {
        return Err(ApiError::not_found("this server does not publish metrics (its host installed no recorder)"));
    };
    if let Some(rss) = resident_bytes() {
        metrics::gauge!(RSS).set(rss as f64);
    }
    let mut res = (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render())
        .into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}
