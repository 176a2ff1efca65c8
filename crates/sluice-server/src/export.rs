//! `$export` kick-off at the three levels, `$export-status` polling and cancellation.

use crate::outcome::{ApiError, info};
use crate::{Access, AppState, Denied, Grant};
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sluice_auth::{Event, Kind};
use sluice_engine::{CancelError, KickoffError};
use sluice_fhir::{Issue, IssueCode, OperationOutcome};
use sluice_jobs::{JobRecord, JobStatus};
use sluice_planner::{ExportPlan, KickoffRequest, Level, TypeSelection};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds a client should wait between status polls (small: real clients wait this long).
const MAX_POLL_SECONDS: u64 = 10;
/// Seconds a client should wait before retrying a kick-off refused because one is running.
const BUSY_SECONDS: u64 = 5;

/// What a kick-off handler reads of its request, whatever the level.
pub struct KickoffParts {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for KickoffParts {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (method, uri, headers) = (req.method().clone(), req.uri().clone(), req.headers().clone());
        // A kick-off body is a `Parameters` resource: at most SMALL_BODY (the router's
        // default limit).
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Issue::error(
                        IssueCode::TooCostly,
                        format!("a kick-off body (a Parameters resource) may be at most {} bytes", crate::SMALL_BODY),
                    ),
                )
                .into_response()
            } else {
                rejection.into_response()
            }
        })?;
        Ok(KickoffParts { method, uri, headers, body })
    }
}

/// `GET|POST /fhir/$export`.
pub async fn system(State(app): State<AppState>, parts: KickoffParts) -> Result<Response, ApiError> {
    kickoff(app, Level::System, parts).await
}

/// `GET|POST /fhir/Patient/$export`.
pub async fn patient(State(app): State<AppState>, parts: KickoffParts) -> Result<Response, ApiError> {
    kickoff(app, Level::Patient, parts).await
}

/// `GET|POST /fhir/Group/<id>/$export`.
pub async fn group(
    State(app): State<AppState>,
    Path(id): Path<String>,
    parts: KickoffParts,
) -> Result<Response, ApiError> {
    if !sluice_fhir::valid_id(&id) {
        return Err(ApiError::not_found(format!("Group/{id} does not exist ('{id}' is not a valid id)")));
    }
    kickoff(app, Level::Group(id), parts).await
}

fn header_str<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A kick-off, audited whether accepted or refused.
async fn kickoff(app: AppState, level: Level, parts: KickoffParts) -> Result<Response, ApiError> {
    let uri = &parts.uri;
    let request_url = format!("{}{}", app.inner.base_url, uri.path_and_query().map_or(uri.path(), |p| p.as_str()));
    let mut who = None;
    let result = start(&app, level, parts, &request_url, &mut who).await;
    if let Err(e) = &result {
        crate::meter::kickoff_refused(e.status());
    }
    if app.inner.audit.enabled() {
        let event = Event::new(Kind::Kickoff, who.as_deref());
        let event = match &result {
            Ok((_, id)) => event.entity(id.clone()).detail(request_url),
            Err(e) => event.refused(e.status().as_u16()).detail(format!("{request_url}: {}", e.message())),
        };
        app.inner.audit.record(event).await;
    }
    no_store(result.map(|(res, _)| res))
}

/// `Cache-Control: no-store` on an answer (kick-off, status, manifest, and their errors):
/// a shared cache must never keep a manifest's signed URLs or an export's progress.
fn no_store(result: Result<Response, ApiError>) -> Result<Response, ApiError> {
    let mut res = result.unwrap_or_else(IntoResponse::into_response);
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// Starts an export; returns the 202 and the export's id. `who` is set to the client once
/// known.
async fn start(
    app: &AppState,
    level: Level,
    parts: KickoffParts,
    request_url: &str,
    who: &mut Option<String>,
) -> Result<(Response, String), ApiError> {
    let KickoffParts { method, uri, headers, body } = parts;
    let grant = app.allow_as(Access::Kickoff { level: &level }, &headers, who).await?;
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
    let separate = prefers_separate_status(prefer.as_deref());
    let req = KickoffRequest {
        level,
        method: if method == Method::POST { sluice_planner::Method::Post } else { sluice_planner::Method::Get },
        query: &query,
        body: (method == Method::POST).then_some(&body[..]),
        content_type: header_str(&headers, &header::CONTENT_TYPE),
        prefer: prefer.as_deref(),
        accept: header_str(&headers, &header::ACCEPT),
    };
    let mut plan = sluice_planner::plan(&req).map_err(|issues| {
        let status = StatusCode::from_u16(sluice_planner::error_status(&issues)).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(status, issues)
    })?;
    limit_to_scopes(&mut plan, &grant)?;
    let owner = grant.client.clone();
    // The headers the 202 needs are built before the export exists: a base URL that cannot
    // go into a header must not leave an export running that nobody heard of.
    HeaderValue::from_str(&format!("{}/fhir/$export-status/", app.inner.base_url)).map_err(ApiError::internal)?;
    let job = match app.inner.engine.kickoff_as(plan, request_url.to_string(), storage, owner).await {
        Ok(job) => job,
        Err(KickoffError::Busy(id)) => return Err(busy(app, &grant, &id).await),
        Err(KickoffError::NotFound(issue)) => return Err(ApiError::new(StatusCode::NOT_FOUND, issue)),
        Err(KickoffError::Internal(msg)) => return Err(ApiError::internal(msg)),
        Err(KickoffError::ShuttingDown) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Issue::error(
                    IssueCode::Transient,
                    "this server is shutting down; retry the kick-off (another server sharing the database will take it)",
                ),
            )
            .retry_after(BUSY_SECONDS));
        }
    };
    let mut location = format!("{}/fhir/$export-status/{}", app.inner.base_url, job.id);
    if separate {
        // The preference travels with the status URL the client polls, so every server
        // sharing the store honours it, before and after a restart.
        location.push_str(SEPARATE_QUERY);
    }
    let mut res = info(StatusCode::ACCEPTED, &format!("export {} accepted; poll {location}", job.id));
    let h = res.headers_mut();
    h.insert(header::CONTENT_LOCATION, HeaderValue::from_str(&location).map_err(ApiError::internal)?);
    if separate {
        h.insert("preference-applied", HeaderValue::from_static("respond-async, separate-export-status"));
    }
    res.extensions_mut().insert(crate::ExportOfResponse(job.id.clone()));
    Ok((res, job.id))
}

/// The 429 of a kick-off while export `id` runs (one export at a time). Only the client
/// that owns the running export (or an administrator) is told its id: with it anyone
/// else could read its manifest or cancel it. Without authorization nobody is.
async fn busy(app: &AppState, grant: &Grant, id: &str) -> ApiError {
    let owner = match app.inner.store.get(id).await {
        Ok(Some(job)) => job.owner,
        _ => None,
    };
    let yours = grant.client.is_some() && owner.is_some() && grant.owns(owner.as_deref());
    let message = if yours {
        format!(
            "your export {id} is running and only one export runs at a time; retry after it completes, \
             or cancel it with DELETE {}/fhir/$export-status/{id}",
            app.inner.base_url
        )
    } else {
        format!(
            "another export is running and only one export runs at a time; retry the kick-off after \
             {BUSY_SECONDS} s (Retry-After)"
        )
    };
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, Issue::error(IssueCode::Throttled, message)).retry_after(BUSY_SECONDS)
}

/// Limits an export to the types the grant may read (D37): an explicit `_type` outside
/// them is refused (403, naming them); without `_type`, the types it may not read are left
/// out and the manifest's `error` says which (the IG: a server SHALL limit the data
/// returned to what the client is authorized for).
fn limit_to_scopes(plan: &mut ExportPlan, grant: &Grant) -> Result<(), ApiError> {
    let scopes = &grant.scopes;
    if scopes.exports_everything() {
        return Ok(());
    }
    let refuse = |types: &[&str]| {
        ApiError::from(Denied::forbidden(format!(
            "the token's scopes ('{}') do not permit exporting {}: ask for a token with system/<Type>.read (or .rs) for them, or leave them out of _type",
            scopes.as_str(),
            types.join(", ")
        )))
    };
    if plan.latest_provenance && !scopes.exports("Provenance") {
        return Err(refuse(&["Provenance"]));
    }
    match &plan.types {
        TypeSelection::Only(list) => {
            let denied: Vec<&str> = list.iter().map(String::as_str).filter(|t| !scopes.exports(t)).collect();
            if !denied.is_empty() {
                return Err(refuse(&denied));
            }
        }
        TypeSelection::All => {
            let covered = plan.resolve_types(sluice_fhir::R4_RESOURCE_TYPES.iter().copied());
            let (allowed, withheld): (Vec<String>, Vec<String>) = covered.into_iter().partition(|t| scopes.exports(t));
            if allowed.is_empty() {
                return Err(ApiError::from(Denied::forbidden(format!(
                    "the token's scopes ('{}') permit exporting none of the types this export covers",
                    scopes.as_str()
                ))));
            }
            if !withheld.is_empty() {
                plan.ignored.push(Issue::information(format!(
                    "the client's scopes ('{}') do not permit {} resource types, which this export leaves out: {}",
                    scopes.as_str(),
                    withheld.len(),
                    withheld.join(", ")
                )));
            }
            plan.types = TypeSelection::Only(allowed);
        }
    }
    Ok(())
}

/// The query a status URL carries when the kick-off asked for `separate-export-status`.
const SEPARATE_QUERY: &str = "?prefer=separate-export-status";

/// Whether `Prefer` holds the `separate-export-status` preference (Bulk Data IG 3.0: the
/// status response's HTTP code then reflects the status request, and `X-Export-Status`
/// the export). Preferences are comma-separated, each possibly with `;`-parameters;
/// names are case-insensitive.
fn prefers_separate_status(prefer: Option<&str>) -> bool {
    prefer.unwrap_or_default().split(',').any(|pref| {
        let name = pref.split(';').next().unwrap_or_default();
        name.split('=').next().unwrap_or_default().trim().eq_ignore_ascii_case("separate-export-status")
    })
}

/// Whether a status URL's query says the kick-off asked for `separate-export-status`.
fn separate_status_requested(query: Option<&str>) -> bool {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == "prefer" && prefers_separate_status(Some(&v)))
}

/// `GET /fhir/$export-status/<id>`: 202 while running, the manifest when complete, the
/// failure's OperationOutcome when failed, 404 when unknown, cancelled or deleted; 429 when
/// polled faster than the last `Retry-After` allows (D13). With `separate-export-status`
/// (the status URL's `?prefer=separate-export-status`), the export's status moves into
/// `X-Export-Status` and the response is `200` whenever the status request itself worked.
pub async fn status(
    State(app): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    no_store(answer_status(app, id, query, headers).await)
}

/// [`status`], before `Cache-Control`.
async fn answer_status(
    app: AppState,
    id: String,
    query: Option<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = app.allow(Access::Status { export_id: &id }, &headers).await?;
    let separate = separate_status_requested(query.as_deref());
    let page = manifest_page_requested(query.as_deref())?;
    let result = export_status(&app, &grant, &id, page, separate).await;
    crate::meter::status_poll(&result);
    let mut res = result?;
    if separate {
        let job_status = res.status();
        let text = format!("{} {}", job_status.as_u16(), job_status.canonical_reason().unwrap_or_default());
        *res.status_mut() = StatusCode::OK;
        res.headers_mut().insert("x-export-status", HeaderValue::from_str(text.trim()).map_err(ApiError::internal)?);
    }
    Ok(res)
}

/// The manifest page a status URL asks for (`?page=N`, `allowPartialManifests`); 1 when
/// it names none.
fn manifest_page_requested(query: Option<&str>) -> Result<usize, ApiError> {
    let Some((_, v)) = form_urlencoded::parse(query.unwrap_or_default().as_bytes()).find(|(k, _)| k == "page") else {
        return Ok(1);
    };
    v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Issue::error(
                IssueCode::Invalid,
                format!("page '{v}' is not a manifest page number; follow the manifest's link (pages count from 1)"),
            ),
        )
    })
}

/// The URL of manifest page `page` of export `id` (page 1 is the status URL itself).
fn page_url(app: &AppState, id: &str, page: usize, separate: bool) -> String {
    let mut url = format!("{}/fhir/$export-status/{id}?page={page}", app.inner.base_url);
    if separate {
        url.push_str("&prefer=separate-export-status");
    }
    url
}

/// No such manifest page (`allowPartialManifests`), or pages asked of an export without them.
fn no_page(job: &JobRecord, page: usize) -> ApiError {
    let why = if job.plan.allow_partial_manifests {
        "it has not been linked from an earlier page (yet)"
    } else {
        "the export was not started with allowPartialManifests=true, so its manifest has one page"
    };
    ApiError::not_found(format!("export {} has no manifest page {page}: {why}", job.id))
}

/// The status response as the IG's plain mode has it: `Ok` carries the export's status
/// (202 running, 200 complete, 4xx/5xx failed); `Err` is a failure of the status request
/// itself (404 unknown export or page, 429 too fast, 500 store errors).
///
/// With `allowPartialManifests`, a running export's closed pages are served with 202
/// (the files listed are complete and never change); a page links to the next once that
/// is closed.
async fn export_status(
    app: &AppState,
    grant: &Grant,
    id: &str,
    page: usize,
    separate: bool,
) -> Result<Response, ApiError> {
    let polls = &app.inner.polls;
    let mut job = app.inner.store.get(id).await.map_err(ApiError::internal)?;
    // Another client's export is answered as if it did not exist (ids leak nothing), at
    // once: not after the settle wait below, whose delay would tell it exists.
    if job.as_ref().is_some_and(|j| !grant.owns(j.owner.as_deref())) {
        job = None;
    }
    if let Some(j) = &job
        && settles(j, page)
    {
        // A young export running here: give it a moment to finish (D29), then look again.
        if tokio::time::timeout(SETTLE, app.inner.engine.wait(id)).await.is_ok() {
            job = app.inner.store.get(id).await.map_err(ApiError::internal)?;
        }
    }
    // Another client's export is answered as if it did not exist: ids leak nothing.
    let Some(job) = job.filter(|j| j.status != JobStatus::Cancelled && grant.owns(j.owner.as_deref())) else {
        polls.forget(id);
        return Err(ApiError::not_found(format!("no export with id '{id}' (it may have been cancelled or deleted)")));
    };
    let partial = job.plan.allow_partial_manifests;
    if page > 1 && !(partial && page <= job.pages.len() + 1) && job.status != JobStatus::Failed {
        return Err(no_page(&job, page));
    }
    match job.status {
        JobStatus::Accepted | JobStatus::InProgress if partial && page <= job.pages.len() => {
            let mut res = running(polls, &job, page)?;
            let m = signed_page(app, &job, page, separate).await?.ok_or_else(|| no_page(&job, page))?;
            let m = for_downloads(app, &job, m);
            *res.body_mut() = axum::body::Body::from(m.body.to_string());
            insert_expires(&mut res, &m)?;
            Ok(res)
        }
        JobStatus::Accepted | JobStatus::InProgress => running(polls, &job, page),
        JobStatus::Failed => {
            polls.forget(id);
            let outcome = job
                .outcome
                .unwrap_or_else(|| OperationOutcome::single(Issue::fatal(IssueCode::Exception, "the export failed")));
            Ok(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, outcome).into_response())
        }
        JobStatus::Completed => {
            polls.forget(id);
            let m = if partial {
                signed_page(app, &job, page, separate).await?.ok_or_else(|| no_page(&job, page))?
            } else {
                let storage = job_storage(app, &job).await?;
                sluice_engine::manifest(&job, storage.as_ref(), app.inner.ttl).await.map_err(signing_failed)?
            };
            let m = for_downloads(app, &job, m);
            let mut res =
                (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], m.body.to_string()).into_response();
            insert_expires(&mut res, &m)?;
            Ok(res)
        }
        JobStatus::Cancelled => unreachable!("filtered above"),
    }
}

/// With bearer-protected downloads (`--download-auth token`) and the job's files on local
/// disk, the manifest's URLs lose their signatures and say `requiresAccessToken: true`.
fn for_downloads(app: &AppState, job: &JobRecord, mut m: sluice_engine::Manifest) -> sluice_engine::Manifest {
    if !(app.inner.token_downloads && job.storage.is_default()) {
        return m;
    }
    m.body["requiresAccessToken"] = serde_json::Value::Bool(true);
    for list in ["output", "error", "deleted"] {
        if let Some(entries) = m.body.get_mut(list).and_then(serde_json::Value::as_array_mut) {
            for e in entries {
                if let Some(url) = e.get("url").and_then(serde_json::Value::as_str) {
                    let plain = url.split_once('?').map_or(url, |(u, _)| u).to_string();
                    e["url"] = serde_json::Value::String(plain);
                }
            }
        }
    }
    m
}

fn signing_failed(e: sluice_storage::StorageError) -> ApiError {
    ApiError::internal(format!("signing download links failed: {e}"))
}

/// Manifest page `page` of `job`, its URLs signed, once the page is closed.
async fn signed_page(
    app: &AppState,
    job: &JobRecord,
    page: usize,
    separate: bool,
) -> Result<Option<sluice_engine::Manifest>, ApiError> {
    let storage = job_storage(app, job).await?;
    let next = |n| page_url(app, &job.id, n, separate);
    sluice_engine::manifest_page(job, page, next, storage.as_ref(), app.inner.ttl).await.map_err(signing_failed)
}

/// The storage `job`'s files are in.
async fn job_storage(app: &AppState, job: &JobRecord) -> Result<std::sync::Arc<dyn sluice_storage::Storage>, ApiError> {
    app.inner.engine.storage_of(job).await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Issue::fatal(IssueCode::Exception, e.to_string()))
    })
}

/// `Expires`: when the manifest's links stop working (D11).
fn insert_expires(res: &mut Response, m: &sluice_engine::Manifest) -> Result<(), ApiError> {
    let expires = m.expires.format(HTTP_DATE).map_err(ApiError::internal)?;
    res.headers_mut().insert(header::EXPIRES, HeaderValue::from_str(&expires).map_err(ApiError::internal)?);
    Ok(())
}

/// The 202 of a running export (progress, ETA, `Retry-After`), or 429 when the last 202
/// for it (for manifest page `page`) was too recent (D13). Each page has its own budget:
/// a client following a `next` link right after reading a page is not polling too fast.
fn running(polls: &Polls, job: &JobRecord, page: usize) -> Result<Response, ApiError> {
    let (done, total) = job.totals();
    let counted = job.status == JobStatus::InProgress && !job.progress.is_empty();
    let now = Instant::now();
    let key = if page == 1 { job.id.clone() } else { format!("{}#page={page}", job.id) };
    let first = match polls.poll(&key, now, counted.then_some(done)) {
        Poll::TooSoon { wait, since, asked } => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                Issue::error(
                    IssueCode::Throttled,
                    format!(
                        "export {} is being polled too often: its status was given {:.1} s ago with \
                         Retry-After: {}; wait {wait} s (Retry-After) before polling again",
                        job.id,
                        since.as_secs_f64(),
                        asked
                    ),
                ),
            )
            .retry_after(wait));
        }
        Poll::Answer { first } => first,
    };
    // Time since the kick-off, for a first estimate (not after a restart: the rerun
    // started over later than that).
    let since_kickoff = (job.attempts <= 1)
        .then(|| Duration::try_from(time::OffsetDateTime::now_utc() - job.created_at).ok())
        .flatten();
    let left = if counted { seconds_left(done, total, first, now, since_kickoff) } else { None };
    let retry_after = retry_after(left);
    polls.asked(&key, retry_after);
    let progress = match job.status {
        JobStatus::Accepted => "accepted: waiting to start".to_string(),
        _ if !counted => "in-progress: 0% (taking the snapshot, counting resources)".to_string(),
        // The counts stay last: tools look for `(done/total resources)` at the end.
        _ => match left {
            Some(secs) => format!("in-progress: {}%, {} ({done}/{total} resources)", job.percent(), eta_text(secs)),
            None => format!("in-progress: {}% ({done}/{total} resources)", job.percent()),
        },
    };
    // The same progress as JSON, for tools: overall and per type.
    let types: serde_json::Map<String, serde_json::Value> =
        job.progress.iter().map(|(t, p)| (t.clone(), serde_json::json!({"done": p.done, "total": p.total}))).collect();
    let mut body = serde_json::json!({
        "status": job.status.as_str(),
        "percent": job.percent(),
        "done": done,
        "total": total,
        "types": types,
        "transactionTime": job.transaction_time.map(sluice_fhir::instant::format),
    });
    if let Some(secs) = left {
        body["estimatedSecondsLeft"] = secs.into();
    }
    let mut res =
        (StatusCode::ACCEPTED, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    let h = res.headers_mut();
    h.insert("x-progress", HeaderValue::from_str(&progress).map_err(ApiError::internal)?);
    h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    Ok(res)
}

/// How long a status request may wait for a young export to finish (D29).
const SETTLE: Duration = Duration::from_millis(900);
/// Exports younger than this are young: most small exports are done within it.
const SETTLE_WINDOW: Duration = Duration::from_secs(2);

/// Whether a status request for manifest page `page` of `job` waits (up to [`SETTLE`]) for
/// the export to finish before answering (D29): it is running and was kicked off less than
/// [`SETTLE_WINDOW`] ago, so a small export's first poll gets the manifest instead of a
/// `202` and a second of `Retry-After`. Pages of partial manifests are answered at once.
fn settles(job: &JobRecord, page: usize) -> bool {
    let young =
        Duration::try_from(time::OffsetDateTime::now_utc() - job.created_at).is_ok_and(|age| age < SETTLE_WINDOW);
    matches!(job.status, JobStatus::Accepted | JobStatus::InProgress)
        && page == 1
        && !job.plan.allow_partial_manifests
        && young
}

/// `Retry-After` for a running export (D19): 1 s while it is likely to end within a second
/// or two (or nothing tells yet how long it will take: most exports are short), else a
/// quarter of the time left, so a long export is polled a few times on its way, never more
/// than the time left and at most [`MAX_POLL_SECONDS`] (clients such as smart-fetch wait a
/// minute when told more).
fn retry_after(seconds_left: Option<u64>) -> u64 {
    match seconds_left {
        Some(left) if left > 2 => (left / 4).clamp(1, MAX_POLL_SECONDS),
        _ => 1,
    }
}

/// Seconds an export still needs at the rate it has written so far, when that can be
/// told: from the first progress this server saw (`first`: when, and resources done then)
/// once at least a second has passed, else from the kick-off (`since_kickoff`, unknown
/// after a restart). `None` before anything was written or when nothing is left to write.
fn seconds_left(
    done: u64,
    total: u64,
    first: Option<(Instant, u64)>,
    now: Instant,
    since_kickoff: Option<Duration>,
) -> Option<u64> {
    const MIN_SPAN: Duration = Duration::from_secs(1);
    let left = total.saturating_sub(done);
    if left == 0 {
        return None;
    }
    let observed = first.and_then(|(at, done_then)| {
        let span = now.saturating_duration_since(at);
        (span >= MIN_SPAN && done > done_then).then(|| (done - done_then) as f64 / span.as_secs_f64())
    });
    let rate = observed.or_else(|| {
        since_kickoff.filter(|span| *span >= MIN_SPAN && done > 0).map(|span| done as f64 / span.as_secs_f64())
    })?;
    Some((left as f64 / rate).ceil() as u64)
}

/// `about 12 s left`, `about 5 min left` (X-Progress stays well under the IG's 100
/// characters).
fn eta_text(secs: u64) -> String {
    if secs < 120 { format!("about {secs} s left") } else { format!("about {} min left", secs.div_ceil(60)) }
}

/// Status polls of running exports, per export id (D13), in this process: when the export
/// was last answered 202 and with which `Retry-After`, and the first progress seen (for
/// the ETA). An entry goes when its export is seen ended (complete, failed, cancelled,
/// deleted) and, at the latest, [`FORGET_AFTER`] after its last 202; there are never more
/// than [`MAX_TRACKED`].
#[derive(Default)]
pub struct Polls {
    map: Mutex<HashMap<String, PollState>>,
}

struct PollState {
    /// When the last 202 was given.
    answered: Instant,
    /// The `Retry-After` it carried.
    retry_after: u64,
    /// The first progress seen: (when, resources done then).
    first: Option<(Instant, u64)>,
    /// Resources done at the last 202.
    last_done: u64,
}

/// Entries not polled for this long are dropped (their export ended elsewhere, or the
/// client went away).
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// At most this many exports are tracked (only one runs at a time; this bounds the map
/// whatever happens).
const MAX_TRACKED: usize = 256;

/// What [`Polls::poll`] decided.
#[derive(Debug, PartialEq)]
enum Poll {
    /// Too early: 429, retry after `wait` seconds; the last 202 was `since` ago and asked
    /// for `asked` seconds.
    TooSoon { wait: u64, since: Duration, asked: u64 },
    /// Answer with the status; `first` is the first progress seen, for the ETA.
    Answer { first: Option<(Instant, u64)> },
}

impl Polls {
    /// A poll of export `id` at `now`, to be answered 202 (with `done` resources written,
    /// once counted) unless it comes too early; [`Polls::asked`] then records the
    /// `Retry-After` the answer carries.
    ///
    /// The tolerance: a poll is accepted from half the previous `Retry-After` on. Clients'
    /// timers are coarse and `Retry-After` is whole seconds, so a client that waits what it
    /// was told is never refused, even with jitter; one that polls several times per
    /// interval is. A 429 does not restart the interval, and its `Retry-After` is what is
    /// left of the full interval (at least 1 s), so waiting it is always enough.
    fn poll(&self, id: &str, now: Instant, done: Option<u64>) -> Poll {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get_mut(id) {
            let since = now.saturating_duration_since(s.answered);
            let asked = Duration::from_secs(s.retry_after);
            if since < asked / 2 {
                let rest = asked - since;
                let wait = rest.as_secs() + u64::from(rest.subsec_nanos() > 0);
                return Poll::TooSoon { wait: wait.max(1), since, asked: s.retry_after };
            }
            s.answered = now;
            if let Some(done) = done {
                // A rerun (after a restart elsewhere) starts again from 0: start over too.
                if s.first.is_none() || done < s.last_done {
                    s.first = Some((now, done));
                }
                s.last_done = done;
            }
            return Poll::Answer { first: s.first };
        }
        map.retain(|_, s| now.saturating_duration_since(s.answered) < FORGET_AFTER);
        while map.len() >= MAX_TRACKED {
            let Some(oldest) = map.iter().min_by_key(|(_, s)| s.answered).map(|(k, _)| k.clone()) else { break };
            map.remove(&oldest);
        }
        let first = done.map(|d| (now, d));
        map.insert(id.to_string(), PollState { answered: now, retry_after: 1, first, last_done: done.unwrap_or(0) });
        Poll::Answer { first }
    }

    /// Records the `Retry-After` of the 202 just given for export `id`: the next poll is
    /// accepted from half of it on.
    fn asked(&self, id: &str, retry_after: u64) {
        if let Some(s) = self.map.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            s.retry_after = retry_after;
        }
    }

    /// Forgets export `id` (it ended, or was cancelled or deleted).
    pub fn forget(&self, id: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// IMF-fixdate, the HTTP date format: `Sun, 06 Nov 1994 08:49:37 GMT`.
const HTTP_DATE: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// `DELETE /fhir/$export-status/<id>`: cancels a running export (or deletes a finished one
/// and its files). 202; the one-export slot is free at once.
pub async fn cancel(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = app.allow(Access::Cancel { export_id: &id }, &headers).await?;
    let not_found =
        || ApiError::not_found(format!("no export with id '{id}' (it may have been cancelled or deleted already)"));
    if !grant.admin {
        // Another client's export is answered as if it did not exist.
        let job = app.inner.store.get(&id).await.map_err(ApiError::internal)?;
        if job.is_some_and(|j| !grant.owns(j.owner.as_deref())) {
            return Err(not_found());
        }
    }
    // Never throttled (D13 concerns status polls only).
    app.inner.polls.forget(&id);
    let result = match app.inner.engine.cancel(&id).await {
        Ok(()) => Ok(info(StatusCode::ACCEPTED, &format!("export {id} cancelled; its files are being deleted"))),
        Err(CancelError::NotFound(_)) => Err(not_found()),
        Err(CancelError::Internal(msg)) => Err(ApiError::internal(msg)),
    };
    if result.is_ok() {
        app.inner.audit.record(Event::new(Kind::Cancel, grant.client.as_deref()).entity(id.clone())).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// A poll as the status handler makes it: answered polls record their `Retry-After`.
    fn ask(polls: &Polls, id: &str, now: Instant, retry_after: u64, done: Option<u64>) -> Poll {
        let answer = polls.poll(id, now, done);
        if matches!(answer, Poll::Answer { .. }) {
            polls.asked(id, retry_after);
        }
        answer
    }

    #[test]
    fn only_young_running_exports_settle() {
        let now = time::OffsetDateTime::now_utc();
        let plan = sluice_planner::ExportPlan::new(Level::System);
        let mut job = JobRecord::new("j".into(), plan, "u".into(), now);
        assert!(settles(&job, 1), "just kicked off");
        assert!(!settles(&job, 2), "a later manifest page is answered at once");
        job.status = JobStatus::InProgress;
        assert!(settles(&job, 1));
        job.created_at = now - time::Duration::seconds(3);
        assert!(!settles(&job, 1), "older than the window: answered at once, with Retry-After");
        job.created_at = now;
        job.status = JobStatus::Completed;
        assert!(!settles(&job, 1), "nothing to wait for");
        job.status = JobStatus::InProgress;
        job.plan.allow_partial_manifests = true;
        assert!(!settles(&job, 1), "partial manifests answer with the pages they have");
    }

    #[test]
    fn retry_after_follows_the_estimate() {
        assert_eq!(retry_after(None), 1, "no estimate yet: most exports are short");
        assert_eq!(retry_after(Some(1)), 1);
        assert_eq!(retry_after(Some(2)), 1);
        assert_eq!(retry_after(Some(3)), 1, "never more than the time left");
        assert_eq!(retry_after(Some(12)), 3);
        assert_eq!(retry_after(Some(39)), 9);
        assert_eq!(retry_after(Some(3600)), 10, "at most 10 s");
        for left in 1..100 {
            assert!(retry_after(Some(left)) <= left, "{left}");
        }
    }

    #[test]
    fn polls_faster_than_half_the_retry_after_are_refused() {
        let polls = Polls::default();
        let t0 = Instant::now();
        assert_eq!(ask(&polls, "a", t0, 2, None), Poll::Answer { first: None });
        // Too early: what is left of the full 2 s, rounded up, at least 1 s.
        assert_eq!(ask(&polls, "a", t0 + MS(300), 2, None), Poll::TooSoon { wait: 2, since: MS(300), asked: 2 });
        assert_eq!(ask(&polls, "a", t0 + MS(999), 2, None), Poll::TooSoon { wait: 2, since: MS(999), asked: 2 });
        // Other exports are counted apart.
        assert_eq!(ask(&polls, "b", t0 + MS(999), 2, None), Poll::Answer { first: None });
        // From half the interval on: answered, and the interval starts again.
        assert_eq!(ask(&polls, "a", t0 + MS(1000), 2, Some(5)), Poll::Answer { first: Some((t0 + MS(1000), 5)) });
        assert!(matches!(ask(&polls, "a", t0 + MS(1500), 2, Some(9)), Poll::TooSoon { wait: 2, .. }));
        // A refused poll does not restart the interval: waiting its Retry-After is enough.
        assert!(matches!(ask(&polls, "a", t0 + MS(3000), 2, Some(9)), Poll::Answer { .. }));
        // Retry-After 1: allowed from 0.5 s; a refusal says 1 s.
        assert!(matches!(ask(&polls, "a", t0 + MS(5000), 1, Some(9)), Poll::Answer { .. }));
        assert_eq!(ask(&polls, "a", t0 + MS(5100), 1, None), Poll::TooSoon { wait: 1, since: MS(100), asked: 1 });
        assert!(matches!(ask(&polls, "a", t0 + MS(5500), 1, None), Poll::Answer { .. }));
        // Forgotten (the export ended): the next poll is answered at once.
        polls.forget("a");
        assert!(matches!(ask(&polls, "a", t0 + MS(5501), 2, None), Poll::Answer { .. }));
    }

    #[test]
    fn polls_remember_the_first_progress_and_restart_with_a_rerun() {
        let polls = Polls::default();
        let t0 = Instant::now();
        assert_eq!(ask(&polls, "a", t0, 2, None), Poll::Answer { first: None });
        assert_eq!(ask(&polls, "a", t0 + MS(2000), 2, Some(0)), Poll::Answer { first: Some((t0 + MS(2000), 0)) });
        assert_eq!(ask(&polls, "a", t0 + MS(4000), 2, Some(50)), Poll::Answer { first: Some((t0 + MS(2000), 0)) });
        assert_eq!(ask(&polls, "a", t0 + MS(5000), 2, Some(50)), Poll::Answer { first: Some((t0 + MS(2000), 0)) });
        // Fewer done than before: the export started over (a restart); so does the estimate.
        assert_eq!(ask(&polls, "a", t0 + MS(6000), 2, Some(10)), Poll::Answer { first: Some((t0 + MS(6000), 10)) });
        assert_eq!(ask(&polls, "a", t0 + MS(8000), 2, Some(20)), Poll::Answer { first: Some((t0 + MS(6000), 10)) });
    }

    #[test]
    fn the_map_stays_bounded() {
        let polls = Polls::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u64 * 3) {
            ask(&polls, &format!("e{i}"), t0 + MS(i), 2, None);
        }
        assert!(polls.map.lock().unwrap().len() <= MAX_TRACKED);
        // Entries not polled for FORGET_AFTER go at the next new export.
        ask(&polls, "late", t0 + FORGET_AFTER + MS(MAX_TRACKED as u64 * 3), 2, None);
        assert_eq!(polls.map.lock().unwrap().len(), 1);
    }

    #[test]
    fn estimates_from_the_rate_so_far() {
        let now = Instant::now() + Duration::from_secs(100);
        let secs = Duration::from_secs;
        // Nothing known yet, nothing written, or nothing left.
        assert_eq!(seconds_left(0, 100, None, now, None), None);
        assert_eq!(seconds_left(0, 100, None, now, Some(secs(10))), None);
        assert_eq!(seconds_left(100, 100, Some((now - secs(5), 0)), now, Some(secs(10))), None);
        // From the kick-off: 30 done in 10 s, 70 left: 23.3 s, rounded up.
        assert_eq!(seconds_left(30, 100, None, now, Some(secs(10))), Some(24));
        // Too short to tell.
        assert_eq!(seconds_left(30, 100, None, now, Some(MS(500))), None);
        // From the first progress seen (preferred): 20 more in 2 s, 70 left: 7 s.
        assert_eq!(seconds_left(30, 100, Some((now - secs(2), 10)), now, Some(secs(10))), Some(7));
        // Seen too recently, or no progress since: the kick-off rate.
        assert_eq!(seconds_left(30, 100, Some((now - MS(500), 10)), now, Some(secs(10))), Some(24));
        assert_eq!(seconds_left(30, 100, Some((now - secs(5), 30)), now, Some(secs(10))), Some(24));
        // After a restart (no kick-off time) only what was seen counts.
        assert_eq!(seconds_left(30, 100, Some((now - MS(500), 10)), now, None), None);
        assert_eq!(eta_text(12), "about 12 s left");
        assert_eq!(eta_text(119), "about 119 s left");
        assert_eq!(eta_text(121), "about 3 min left");
    }

    #[test]
    fn separate_export_status_preference() {
        assert!(prefers_separate_status(Some("respond-async,separate-export-status")));
        assert!(prefers_separate_status(Some("respond-async, Separate-Export-Status, handling=lenient")));
        assert!(prefers_separate_status(Some("separate-export-status")));
        assert!(!prefers_separate_status(Some("respond-async")));
        assert!(!prefers_separate_status(Some("respond-async, handling=separate-export-status")));
        assert!(!prefers_separate_status(None));
        assert!(separate_status_requested(Some(&SEPARATE_QUERY[1..])));
        assert!(!separate_status_requested(Some("prefer=respond-async")));
        assert!(!separate_status_requested(None));
    }
}
