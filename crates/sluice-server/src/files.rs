//! `GET /files/<key>?expires=..&sig=..`: downloads of local export files at signed URLs.

use crate::AppState;
use crate::outcome::ApiError;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use sluice_fhir::{Issue, IssueCode};
use sluice_storage_local::DownloadError;
use tokio_util::io::ReaderStream;

/// Streams a file after checking its signature and expiry.
pub async fn download(
    State(app): State<AppState>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let Some(local) = &app.inner.local else {
        return Err(ApiError::not_found("this server does not serve export files itself"));
    };
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
    let opened = local.open_signed(&key, expires, &sig).await.map_err(|e| match e {
        DownloadError::NotFound => ApiError::not_found(e.to_string()),
        DownloadError::BadSignature | DownloadError::Expired => {
            ApiError::new(StatusCode::FORBIDDEN, Issue::error(IssueCode::Security, e.to_string()))
        }
    })?;
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
