//! `GET /files/<key>?expires=..&sig=..`: downloads of local export files at signed URLs.

use crate::outcome::ApiError;
use crate::{Access, AppState};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use sluice_auth::{Event, Kind};
use sluice_fhir::{Issue, IssueCode};
use sluice_jobs::JobStatus;
use sluice_storage_local::DownloadError;
use tokio_util::io::ReaderStream;

/// Streams a file after checking its signature and expiry, or, with bearer-protected
/// downloads, that the caller is the client that started its export. Audited.
pub async fn download(
    State(app): State<AppState>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mut who = None;
    let result = serve(&app, &key, query, &headers, &mut who).await;
    if app.inner.audit.enabled() {
        let event = Event::new(Kind::Download, who.as_deref()).entity(key.clone());
        let event = match &result {
            Ok(_) => event,
            Err(e) => event.refused(e.status().as_u16()).detail(e.message().to_string()),
        };
        app.inner.audit.record(event).await;
    }
    result
}

/// The export id in a file key (`<datetime>_<id>/<file>`).
pub(crate) fn export_of(key: &str) -> Option<&str> {
    key.split('/').next()?.rsplit_once('_').map(|(_, id)| id)
}

async fn serve(
    app: &AppState,
    key: &str,
    query: Option<String>,
    headers: &HeaderMap,
    who: &mut Option<String>,
) -> Result<Response, ApiError> {
    let Some(local) = &app.inner.local else {
        return Err(ApiError::not_found("this server does not serve export files itself"));
    };
    let gone = || ApiError::not_found(format!("no export file {key}"));
    if app.inner.token_downloads {
        let id = export_of(key).ok_or_else(gone)?;
        let grant = app.allow_as(Access::Download { export_id: id }, headers, who).await?;
        let job = app.inner.store.get(id).await.map_err(ApiError::internal)?;
        let job =
            job.filter(|j| j.status != JobStatus::Cancelled && grant.owns(j.owner.as_deref())).ok_or_else(gone)?;
        if !job.storage.is_default() || !key.starts_with(&format!("{}/", job.folder)) {
            return Err(gone());
        }
        let opened = local.open(key).await.map_err(|_| gone())?;
        return stream(opened);
    }
    let mut expires = None;
    let mut sig = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "expires" => expires = v.parse::<i64>().ok(),
            "sig" => sig = Some(v.into_owned()),
            _ => {}
        }
    }
    let (Some(expires), Some(sig)) = (expires, sig) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Issue::error(
                IssueCode::Security,
                "a download link needs its 'expires' and 'sig' parameters; use the URL from the manifest",
            ),
        ));
    };
    let opened = local.open_signed(key, expires, &sig).await.map_err(|e| match e {
        DownloadError::NotFound => ApiError::not_found(e.to_string()),
        DownloadError::BadSignature | DownloadError::Expired => {
            ApiError::new(StatusCode::FORBIDDEN, Issue::error(IssueCode::Security, e.to_string()))
        }
    })?;
    stream(opened)
}

fn stream(opened: sluice_storage_local::OpenedFile) -> Result<Response, ApiError> {
    let mut res = Response::new(Body::from_stream(ReaderStream::with_capacity(opened.file, 64 * 1024)));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_str(&opened.meta.content_type).map_err(ApiError::internal)?);
    if let Some(enc) = &opened.meta.content_encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_str(enc).map_err(ApiError::internal)?);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(opened.len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    Ok(res)
}
