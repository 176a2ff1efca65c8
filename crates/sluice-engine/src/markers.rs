//! The files a run writes besides the data: the lenient-mode error file (first), and the
//! completion markers `manifest.json` and `_SUCCESS` (last); and the order of the files in
//! the manifest.

use crate::{RunError, manifest};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use sluice_fhir::OperationOutcome;
use sluice_jobs::{JobRecord, OutputFile};
use sluice_storage::{ObjectMeta, Storage};
use std::sync::Arc;

/// Writes `manifest.json` (file names relative to the folder) and then an empty
/// `_SUCCESS` into the export folder, last: a bucket-event pipeline can start on
/// `_SUCCESS` without polling.
pub(crate) async fn write_completion_markers(job: &JobRecord, storage: &Arc<dyn Storage>) -> Result<(), RunError> {
    let body = manifest::folder_manifest(job).to_string();
    for (name, data, content_type) in
        [("manifest.json", body.into_bytes(), "application/json"), ("_SUCCESS", Vec::new(), "text/plain")]
    {
        let meta = ObjectMeta { content_type: content_type.into(), content_encoding: None };
        let mut w = storage.create(&format!("{}/{name}", job.folder), meta).await?;
        if !data.is_empty() {
            w.write(Bytes::from(data)).await?;
        }
        w.finish().await?;
    }
    Ok(())
}

/// Lenient mode: the ignored parameters as an OperationOutcome ndjson file.
pub(crate) async fn write_error_file(job: &JobRecord, storage: &Arc<dyn Storage>) -> Result<Vec<OutputFile>, RunError> {
    if job.plan.ignored.is_empty() {
        return Ok(Vec::new());
    }
    let mut data = Vec::new();
    for issue in &job.plan.ignored {
        let line = OperationOutcome::single(issue.clone()).to_json().to_string();
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
    }
    let key = format!("{}/OperationOutcome.ndjson", job.folder);
    let sha256 = Some(hex::encode(Sha256::digest(&data)));
    let mut w = storage.create(&key, ObjectMeta::ndjson(false)).await?;
    w.write(Bytes::from(data)).await?;
    let bytes = w.finish().await?;
    Ok(vec![OutputFile {
        resource_type: "OperationOutcome".into(),
        key,
        count: job.plan.ignored.len() as u64,
        bytes,
        sha256,
    }])
}

/// Puts the job's files in manifest order, once every part has finished: with partial
/// manifests, pages already closed keep their files and the rest make the last page;
/// otherwise the files are sorted by type, and within a type naturally ([`natural_key`]).
pub(crate) fn order_files(job: &mut JobRecord) {
    if job.plan.allow_partial_manifests {
        // Pages already closed keep their files; the rest make the last page.
        job.close_page(true);
    } else {
        let order = |a: &OutputFile, b: &OutputFile| natural_key(&a.key).cmp(&natural_key(&b.key));
        job.output.sort_by(|a, b| a.resource_type.cmp(&b.resource_type).then(order(a, b)));
        job.deleted.sort_by(order);
    }
}

/// Sort key that orders `Type.ndjson`, `Type-2.ndjson`, ..., `Type-10.ndjson` naturally.
fn natural_key(key: &str) -> (usize, &str) {
    (key.len(), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_of_split_files() {
        let mut keys = vec!["f/Obs-10.ndjson", "f/Obs-2.ndjson", "f/Obs.ndjson"];
        keys.sort_by_key(|k| natural_key(k));
        assert_eq!(keys, vec!["f/Obs.ndjson", "f/Obs-2.ndjson", "f/Obs-10.ndjson"]);
    }
}
