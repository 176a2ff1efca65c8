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
                out.push(json!({"type": f.resource_type, "url": signed.url, "count": f.count}));
            }
            Ok::<_, StorageError>((out, earliest))
        }
    };
    let (output, e1) = entries(&job.output).await?;
    let (error, e2) = entries(&job.error).await?;
    for e in [e1, e2].into_iter().flatten() {
        expires = expires.min(e);
    }
    let body = json!({
        "transactionTime": job.transaction_time.map(sluice_fhir::instant::format),
        "request": job.request_url,
        "requiresAccessToken": false,
        "output": output,
        "error": error,
    });
    Ok(Manifest { body, expires })
}
