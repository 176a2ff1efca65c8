//! `$export` kick-off at the three levels, `$export-status` polling and cancellation.

use super::AppState;
use super::outcome::{ApiError, info};
use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_engine::{CancelError, KickoffError};
use sluice_fhir::{Issue, IssueCode, OperationOutcome};
use sluice_jobs::JobStatus;
use sluice_planner::{KickoffRequest, Level};

/// Seconds a client should wait between status polls (small: real clients wait this long).
const POLL_SECONDS: u64 = 2;
/// Seconds a client should wait before retrying a kick-off refused because one is running.
const BUSY_SECONDS: u64 = 5;

/// `GET|POST /fhir/$export`.
pub async fn system(
    State(app): State<AppState>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    kickoff(app, Level::System, method, uri, headers, body).await
}

/// `GET|POST /fhir/Patient/$export`.
pub async fn patient(
    State(app): State<AppState>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    kickoff(app, Level::Patient, method, uri, headers, body).await
}

/// `GET|POST /fhir/Group/<id>/$export`.
pub async fn group(
    State(app): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !sluice_store::valid_id(&id) {
        return Err(ApiError::not_found(format!("Group/{id} does not exist ('{id}' is not a valid id)")));
    }
    kickoff(app, Level::Group(id), method, uri, headers, body).await
}

fn header_str<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn kickoff(
    app: AppState,
    level: Level,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Storage first, as Aidbox does: a misconfigured server says so whatever the request.
    let (_, storage) = app.inner.engine.storage_for_new_export().await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Issue::fatal(IssueCode::Exception, e.to_string()))
    })?;
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
        .unwrap_or_default();
    let prefer: Vec<&str> =
        headers.get_all(header::HeaderName::from_static("prefer")).iter().filter_map(|v| v.to_str().ok()).collect();
    let prefer = (!prefer.is_empty()).then(|| prefer.join(", "));
    let req = KickoffRequest {
        level,
        method: if method == Method::POST { sluice_planner::Method::Post } else { sluice_planner::Method::Get },
        query: &query,
        body: (method == Method::POST).then_some(&body[..]),
        content_type: header_str(&headers, &header::CONTENT_TYPE),
        prefer: prefer.as_deref(),
        accept: header_str(&headers, &header::ACCEPT),
    };
    let plan = sluice_planner::plan(&req).map_err(|issues| {
        let status = StatusCode::from_u16(sluice_planner::error_status(&issues)).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(status, issues)
    })?;
    let request_url = format!("{}{}", app.inner.base_url, uri.path_and_query().map_or(uri.path(), |p| p.as_str()));
    let job = app.inner.engine.kickoff(plan, request_url, storage).await.map_err(|e| match e {
        KickoffError::Busy(id) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Issue::error(
                IssueCode::Throttled,
                format!("export {id} is running and only one export runs at a time; retry after it completes or cancel it with DELETE {}/fhir/$export-status/{id}", app.inner.base_url),
            ),
        )
        .retry_after(BUSY_SECONDS),
        KickoffError::NotFound(issue) => ApiError::new(StatusCode::NOT_FOUND, issue),
        KickoffError::Internal(msg) => ApiError::internal(msg),
    })?;
    let location = format!("{}/fhir/$export-status/{}", app.inner.base_url, job.id);
    let mut res = info(StatusCode::ACCEPTED, &format!("export {} accepted; poll {location}", job.id));
    res.headers_mut().insert(header::CONTENT_LOCATION, HeaderValue::from_str(&location).map_err(ApiError::internal)?);
    Ok(res)
}

/// `GET /fhir/$export-status/<id>`: 202 while running, the manifest when complete, the
/// failure's OperationOutcome when failed, 404 when unknown, cancelled or deleted.
pub async fn status(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let job = app.inner.engine.store().get(&id).await.map_err(ApiError::internal)?;
    let Some(job) = job.filter(|j| j.status != JobStatus::Cancelled) else {
        return Err(ApiError::not_found(format!("no export with id '{id}' (it may have been cancelled or deleted)")));
    };
    match job.status {
        JobStatus::Accepted | JobStatus::InProgress => {
            let (done, total) = job.totals();
            let progress = match job.status {
                JobStatus::Accepted => "accepted: waiting to start".to_string(),
                _ if job.progress.is_empty() => "in-progress: 0% (taking the snapshot, counting resources)".to_string(),
                _ => format!("in-progress: {}% ({done}/{total} resources)", job.percent()),
            };
            // The same progress as JSON, for tools: overall and per type.
            let types: serde_json::Map<String, serde_json::Value> = job
                .progress
                .iter()
                .map(|(t, p)| (t.clone(), serde_json::json!({"done": p.done, "total": p.total})))
                .collect();
            let body = serde_json::json!({
                "status": job.status.as_str(),
                "percent": job.percent(),
                "done": done,
                "total": total,
                "types": types,
                "transactionTime": job.transaction_time.map(sluice_fhir::instant::format),
            });
            let mut res =
                (StatusCode::ACCEPTED, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
            let h = res.headers_mut();
            h.insert("x-progress", HeaderValue::from_str(&progress).map_err(ApiError::internal)?);
            h.insert(header::RETRY_AFTER, HeaderValue::from(POLL_SECONDS));
            Ok(res)
        }
        JobStatus::Failed => {
            let outcome = job
                .outcome
                .unwrap_or_else(|| OperationOutcome::single(Issue::fatal(IssueCode::Exception, "the export failed")));
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, outcome))
        }
        JobStatus::Completed => {
            let storage = app.inner.engine.storage_of(&job).await.map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Issue::fatal(IssueCode::Exception, e.to_string()))
            })?;
            let m = sluice_engine::manifest(&job, storage.as_ref(), app.inner.ttl)
                .await
                .map_err(|e| ApiError::internal(format!("signing download links failed: {e}")))?;
            let mut res =
                (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], m.body.to_string()).into_response();
            let expires = m.expires.format(HTTP_DATE).map_err(ApiError::internal)?;
            res.headers_mut().insert(header::EXPIRES, HeaderValue::from_str(&expires).map_err(ApiError::internal)?);
            Ok(res)
        }
        JobStatus::Cancelled => unreachable!("filtered above"),
    }
}

/// IMF-fixdate, the HTTP date format: `Sun, 06 Nov 1994 08:49:37 GMT`.
const HTTP_DATE: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// `DELETE /fhir/$export-status/<id>`: cancels a running export (or deletes a finished one
/// and its files). 202; the one-export slot is free at once.
pub async fn cancel(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match app.inner.engine.cancel(&id).await {
        Ok(()) => Ok(info(StatusCode::ACCEPTED, &format!("export {id} cancelled; its files are being deleted"))),
        Err(CancelError::NotFound(_)) => Err(ApiError::not_found(format!(
            "no export with id '{id}' (it may have been cancelled or deleted already)"
        ))),
        Err(CancelError::Internal(msg)) => Err(ApiError::internal(msg)),
    }
}
