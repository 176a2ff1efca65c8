//! The completed-export manifest (Bulk Data IG), with URLs signed at request time.

use serde_json::{Value, json};
use sluice_jobs::{JobRecord, OutputFile};
use sluice_storage::{Storage, StorageError};
use std::time::Duration;
use time::OffsetDateTime;

/// A rendered manifest and the time its links stop working.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The manifest JSON.
    pub body: Value,
    /// The earliest expiry of its links (the response's `Expires`).
    pub expires: OffsetDateTime,
}

/// Renders the manifest of a completed job, signing every file's URL afresh for `ttl`.
pub async fn manifest(job: &JobRecord, storage: &dyn Storage, ttl: Duration) -> Result<Manifest, StorageError> {
    render(job, &job.output, &job.deleted, None, storage, ttl).await
}

/// Renders page `page` (from 1) of a job's manifests (`allowPartialManifests`), once that
/// page is closed: its files, and a `link` to `next_url` when there is a next page. `None`
/// when the page is not closed (yet).
pub async fn manifest_page(
    job: &JobRecord,
    page: usize,
    next_url: impl FnOnce(usize) -> String,
    storage: &dyn Storage,
    ttl: Duration,
) -> Result<Option<Manifest>, StorageError> {
    let Some((output, deleted)) = job.page(page) else { return Ok(None) };
    let next = (page < job.pages.len()).then(|| next_url(page + 1));
    render(job, output, deleted, next, storage, ttl).await.map(Some)
}

async fn render(
    job: &JobRecord,
    output: &[OutputFile],
    deleted: &[OutputFile],
    next: Option<String>,
    storage: &dyn Storage,
    ttl: Duration,
) -> Result<Manifest, StorageError> {
    let mut expires = OffsetDateTime::now_utc() + ttl;
    let organized = job.plan.organize_by_patient;
    let entries = |files: &[OutputFile], typed: bool| {
        let files = files.to_vec();
        async move {
            let mut out = Vec::with_capacity(files.len());
            let mut earliest: Option<OffsetDateTime> = None;
            for f in &files {
                let signed = storage.signed_url(&f.key, ttl).await?;
                earliest = Some(earliest.map_or(signed.expires, |e| e.min(signed.expires)));
                out.push(entry(f, signed.url, typed));
            }
            Ok::<_, StorageError>((out, earliest))
        }
    };
    let (output, e1) = entries(output, !organized).await?;
    let (error, e2) = entries(&job.error, true).await?;
    let (deleted, e3) = entries(deleted, true).await?;
    for e in [e1, e2, e3].into_iter().flatten() {
        expires = expires.min(e);
    }
    let mut body = head(job);
    body["output"] = Value::Array(output);
    body["error"] = Value::Array(error);
    if job.plan.since.is_some() {
        body["deleted"] = Value::Array(deleted);
    }
    if let Some(url) = next {
        body["link"] = json!([{"relation": "next", "url": url}]);
    }
    Ok(Manifest { body, expires })
}

/// The fields every manifest (and every page of one) shares.
fn head(job: &JobRecord) -> Value {
    let mut body = json!({
        "transactionTime": job.transaction_time.map(sluice_fhir::instant::format),
        "request": job.request_url,
        "requiresAccessToken": false,
    });
    if job.plan.organize_by_patient {
        body["outputOrganizedBy"] = json!("Patient");
    }
    body
}

/// One manifest entry; `extension` carries the file's size in bytes and its SHA-256 (hex)
/// so a client can check what it downloaded. `type` is left out (`typed` false) for files
/// of patient blocks, which hold several types.
fn entry(f: &OutputFile, url: String, typed: bool) -> Value {
    let mut e = json!({"url": url, "count": f.count});
    if typed {
        e["type"] = json!(f.resource_type);
    }
    let mut ext = json!({"size": f.bytes});
    if let Some(sha) = &f.sha256 {
        ext["sha256"] = json!(sha);
    }
    e["extension"] = ext;
    e
}

/// The manifest written into the export folder as `manifest.json`: the same as the one
/// served, with file names relative to the folder instead of signed URLs.
pub fn folder_manifest(job: &JobRecord) -> Value {
    let organized = job.plan.organize_by_patient;
    let rel = |files: &[OutputFile], typed: bool| -> Vec<Value> {
        files.iter().map(|f| entry(f, f.key.rsplit('/').next().unwrap_or(&f.key).to_string(), typed)).collect()
    };
    let mut body = head(job);
    body["output"] = Value::Array(rel(&job.output, !organized));
    body["error"] = Value::Array(rel(&job.error, true));
    if job.plan.since.is_some() {
        body["deleted"] = Value::Array(rel(&job.deleted, true));
    }
    body
}
