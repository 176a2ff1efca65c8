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
    let mut expires = OffsetDateTime::now_utc() + ttl;
    let entries = |files: &[OutputFile]| {
        let files = files.to_vec();
        async move {
            let mut out = Vec::with_capacity(files.len());
            let mut earliest: Option<OffsetDateTime> = None;
            for f in &files {
                let signed = storage.signed_url(&f.key, ttl).await?;
                earliest = Some(earliest.map_or(signed.expires, |e| e.min(signed.expires)));
                out.push(entry(f, signed.url));
            }
            Ok::<_, StorageError>((out, earliest))
        }
    };
    let (output, e1) = entries(&job.output).await?;
    let (error, e2) = entries(&job.error).await?;
    let (deleted, e3) = entries(&job.deleted).await?;
    for e in [e1, e2, e3].into_iter().flatten() {
        expires = expires.min(e);
    }
    let mut body = json!({
        "transactionTime": job.transaction_time.map(sluice_fhir::instant::format),
        "request": job.request_url,
        "requiresAccessToken": false,
        "output": output,
        "error": error,
    });
    if job.plan.since.is_some() {
        body["deleted"] = Value::Array(deleted);
    }
    Ok(Manifest { body, expires })
}

/// One manifest entry; `extension` carries the file's size in bytes and its SHA-256 (hex)
/// so a client can check what it downloaded.
fn entry(f: &OutputFile, url: String) -> Value {
    let mut e = json!({"type": f.resource_type, "url": url, "count": f.count});
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
    let rel = |files: &[OutputFile]| -> Vec<Value> {
        files.iter().map(|f| entry(f, f.key.rsplit('/').next().unwrap_or(&f.key).to_string())).collect()
    };
    let mut body = json!({
        "transactionTime": job.transaction_time.map(sluice_fhir::instant::format),
        "request": job.request_url,
        "requiresAccessToken": false,
        "output": rel(&job.output),
        "error": rel(&job.error),
    });
    if job.plan.since.is_some() {
        body["deleted"] = Value::Array(rel(&job.deleted));
    }
    body
}
