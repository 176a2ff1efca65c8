//! `GET /files/<key>?expires=..&sig=..`: downloads of local export files at signed URLs,
//! with single HTTP range requests (`Range: bytes=a-b`, `a-`, `-n`) so that clients can
//! resume an interrupted download.

use crate::outcome::ApiError;
use crate::{Access, AppState};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_auth::{Event, Kind};
use sluice_fhir::{Issue, IssueCode};
use sluice_jobs::JobStatus;
use sluice_storage_local::DownloadError;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
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
        return stream(opened, headers).await;
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
    stream(opened, headers).await
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    /// The whole file: no `Range`, or one this route ignores (not `bytes`, several
    /// ranges, malformed), as RFC 9110 allows.
    All,
    /// Bytes `start..=end`.
    Part(u64, u64),
    /// A range that starts past the end (416).
    Unsatisfiable,
}

/// Reads a single byte range: `bytes=a-b`, `bytes=a-`, `bytes=-n` (the last n bytes).
fn wanted(headers: &HeaderMap, len: u64) -> Wanted {
    let Some(spec) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Wanted::All };
    let Some(spec) = spec.trim().strip_prefix("bytes=") else { return Wanted::All };
    let Some((first, last)) = spec.split_once('-').filter(|_| !spec.contains(',')) else { return Wanted::All };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return match last.parse::<u64>() {
            Ok(0) => Wanted::Unsatisfiable,
            Ok(_) if len == 0 => Wanted::Unsatisfiable,
            Ok(n) => Wanted::Part(len.saturating_sub(n), len - 1),
            Err(_) => Wanted::All,
        };
    }
    let Ok(start) = first.parse::<u64>() else { return Wanted::All };
    let end = match last {
        "" => u64::MAX,
        l => match l.parse::<u64>() {
            Ok(end) if end >= start => end,
            _ => return Wanted::All,
        },
    };
    if start >= len {
        return Wanted::Unsatisfiable;
    }
    Wanted::Part(start, end.min(len - 1))
}

async fn stream(opened: sluice_storage_local::OpenedFile, headers: &HeaderMap) -> Result<Response, ApiError> {
    let len = opened.len;
    let (mut res, length) = match wanted(headers, len) {
        Wanted::All => (Response::new(Body::from_stream(ReaderStream::with_capacity(opened.file, 64 * 1024))), len),
        Wanted::Part(start, end) => {
            let mut file = opened.file;
            file.seek(std::io::SeekFrom::Start(start)).await.map_err(ApiError::internal)?;
            let length = end - start + 1;
            let body = Body::from_stream(ReaderStream::with_capacity(file.take(length), 64 * 1024));
            let mut res = Response::new(body);
            *res.status_mut() = StatusCode::PARTIAL_CONTENT;
            let range = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")).map_err(ApiError::internal)?;
            res.headers_mut().insert(header::CONTENT_RANGE, range);
            (res, length)
        }
        Wanted::Unsatisfiable => {
            let mut res = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Issue::error(
                    IssueCode::Invalid,
                    format!("the range asked for is outside the file, which has {len} bytes"),
                ),
            )
            .into_response();
            let range = HeaderValue::from_str(&format!("bytes */{len}")).map_err(ApiError::internal)?;
            res.headers_mut().insert(header::CONTENT_RANGE, range);
            return Ok(res);
        }
    };
    let h = res.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_str(&opened.meta.content_type).map_err(ApiError::internal)?);
    if let Some(enc) = &opened.meta.content_encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_str(enc).map_err(ApiError::internal)?);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(range: &str, len: u64) -> Wanted {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
        wanted(&h, len)
    }

    #[test]
    fn single_ranges_and_what_is_ignored() {
        assert_eq!(wanted(&HeaderMap::new(), 10), Wanted::All);
        assert_eq!(ask("bytes=0-4", 10), Wanted::Part(0, 4));
        assert_eq!(ask("bytes=4-", 10), Wanted::Part(4, 9));
        assert_eq!(ask("bytes=4-100", 10), Wanted::Part(4, 9));
        assert_eq!(ask("bytes=-3", 10), Wanted::Part(7, 9));
        assert_eq!(ask("bytes=-30", 10), Wanted::Part(0, 9));
        assert_eq!(ask("bytes=10-", 10), Wanted::Unsatisfiable);
        assert_eq!(ask("bytes=-0", 10), Wanted::Unsatisfiable);
        assert_eq!(ask("bytes=0-", 0), Wanted::Unsatisfiable);
        for ignored in ["bytes=0-1,4-5", "bytes=5-2", "items=0-1", "bytes=a-", "bytes=1", "bytes=--1"] {
            assert_eq!(ask(ignored, 10), Wanted::All, "{ignored}");
        }
    }
}
