//! `sluice load` / `serve --load`: reads `.ndjson`, `.ndjson.gz` and FHIR `.json` files
//! (Bundles or single resources), or folders of them, into the store in one transaction.
//!
//! Parsing runs on its own thread while the store writes on another; a malformed line or
//! resource stops the load with its file and line number, and nothing of the load remains.
//! What the load is doing is reported to a [`Progress`] (the `sluice` binary draws a
//! progress bar with it).

use flate2::read::MultiGzDecoder;
use sluice_json::Json;
use sluice_store::bundle::{IdPolicy, bundle_ops_with};
use sluice_store::{LoadMsg, LoadSummary, NewResource, ResourceWrites, WriteOp, prepare_parsed};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Why a load failed. Nothing of a failed load remains in the store.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A path could not be read, or holds no loadable file.
    #[error("{0}")]
    Input(String),
    /// A file, line or Bundle entry is not a valid resource (named with file and line).
    #[error("load failed, nothing was written: {0}")]
    Invalid(String),
}

/// Hears what a load is doing; every method has a default that does nothing. Called from
/// the reading thread.
pub trait Progress: Send + Sync {
    /// The load starts: it will read `bytes` bytes of files (counting every copy).
    fn start(&self, _bytes: u64) {}
    /// Reading of `file` starts.
    fn file(&self, _file: &Path) {}
    /// `bytes` more bytes were read.
    fn read(&self, _bytes: u64) {}
}

/// A [`Progress`] that ignores everything.
pub struct Quiet;

impl Progress for Quiet {}

/// Source bytes per batch sent to the store. Parsed JSON takes several times its text size,
/// so batches are bounded by bytes (and at most two wait in the channel), not by count.
const BATCH_BYTES: usize = 1 << 20;

/// The files to load under `paths`, sorted; folders are searched recursively.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| LoadError::Input(format!("{}: {e}", p.display())))?;
        if meta.is_dir() {
            let mut stack = vec![p.clone()];
            while let Some(dir) = stack.pop() {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map_err(|e| LoadError::Input(format!("{}: {e}", dir.display())))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .collect();
                entries.sort();
                for e in entries {
                    if e.is_dir() {
                        stack.push(e);
                    } else if is_loadable(&e) {
                        out.push(e);
                    }
                }
            }
        } else if is_loadable(p) {
            out.push(p.clone());
        } else {
            return Err(LoadError::Input(format!("{}: not a .ndjson, .ndjson.gz or .json file", p.display())));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn is_loadable(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.ends_with(".ndjson") || name.ends_with(".ndjson.gz") || name.ends_with(".json")
}

/// Counts bytes read, for [`Progress::read`].
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.read(n as u64);
        Ok(n)
    }
}

/// Loads the files under `paths` into `store` in one transaction and returns what was
/// written per type.
///
/// With `copies` > 1, each resource is loaded `copies` times: copy `k` (from 1) gets the id
/// `c<k>-<id>`, and every relative reference `Type/id` in it is rewritten the same way, so
/// each copy is a consistent data set of its own (for building large benchmark databases).
pub async fn load_paths(
    store: &dyn ResourceWrites,
    paths: &[PathBuf],
    copies: u32,
    progress: Arc<dyn Progress>,
) -> Result<LoadSummary, LoadError> {
    let files = discover(paths)?;
    if files.is_empty() {
        return Err(LoadError::Input("no .ndjson, .ndjson.gz or .json files found".into()));
    }
    let total: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    progress.start(total * u64::from(copies.max(1)));
    let (tx, rx) = mpsc::channel(2);
    let reader = std::thread::spawn(move || {
        let result = read_files(&files, &tx, progress.as_ref(), copies.max(1));
        let msg = match &result {
            Ok(()) => LoadMsg::Commit,
            Err(e) => LoadMsg::Abort(e.clone()),
        };
        let _ = tx.blocking_send(msg);
        result
    });
    let summary = store.load(rx).await;
    let read_result = reader.join().map_err(|_| LoadError::Invalid("the file reader crashed".into()))?;
    read_result.map_err(LoadError::Invalid)?;
    summary.map_err(|e| LoadError::Invalid(e.to_string()))
}

type Sender = mpsc::Sender<LoadMsg>;

/// Resources read but not yet sent, and the source bytes they came from.
struct Pending {
    resources: Vec<NewResource>,
    bytes: usize,
    /// Which copy is being read (0: the original).
    copy: u32,
}

impl Pending {
    /// Adds a resource, prepared (and so rendered) here on the reading thread: the writer
    /// only fills in the version and time.
    fn push(&mut self, r: NewResource, bytes: usize) {
        self.resources.push(r);
        self.bytes += bytes;
    }

    /// Renames a resource read from a file for the current copy (see [`copy_of`]).
    fn edit(&self, resource: &mut Json<'_>) {
        if self.copy > 0 {
            copy_of(resource, self.copy);
        }
    }

    /// Sends the batch when it is full (or, with `force`, whatever there is).
    fn flush(&mut self, tx: &Sender, force: bool) -> Result<(), String> {
        if self.resources.is_empty() || (!force && self.bytes < BATCH_BYTES) {
            return Ok(());
        }
        self.bytes = 0;
        let batch = std::mem::take(&mut self.resources);
        tx.blocking_send(LoadMsg::Batch(batch)).map_err(|_| "the store stopped the load".to_string())
    }
}

/// Reads the files once per copy, so each copy keeps the files' order (a patient's resources
/// stay close together, as in the source).
fn read_files(files: &[PathBuf], tx: &Sender, progress: &dyn Progress, copies: u32) -> Result<(), String> {
    let mut batch = Pending { resources: Vec::new(), bytes: 0, copy: 0 };
    for copy in 0..copies {
        batch.copy = copy;
        read_all(files, tx, progress, &mut batch)?;
    }
    batch.flush(tx, true)
}

fn read_all(files: &[PathBuf], tx: &Sender, progress: &dyn Progress, batch: &mut Pending) -> Result<(), String> {
    for file in files {
        progress.file(file);
        let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let counted = Counting { inner: f, progress };
        let name = file.to_string_lossy();
        if name.ends_with(".json") {
            read_json_file(file, counted, batch)?;
        } else {
            let reader: Box<dyn Read> =
                if name.ends_with(".gz") { Box::new(MultiGzDecoder::new(counted)) } else { Box::new(counted) };
            let mut lines = BufReader::with_capacity(256 * 1024, reader);
            let mut line = Vec::new();
            let mut no = 0u64;
            loop {
                line.clear();
                let n =
                    lines.read_until(b'\n', &mut line).map_err(|e| format!("{}:{}: {e}", file.display(), no + 1))?;
                if n == 0 {
                    break;
                }
                no += 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let mut value =
                    Json::parse_bytes(&line).map_err(|e| format!("{}:{no}: not valid JSON: {e}", file.display()))?;
                batch.edit(&mut value);
                let r =
                    prepare_parsed(value, None).map_err(|i| format!("{}:{no}: {}", file.display(), i.diagnostics))?;
                batch.push(r, line.len());
                batch.flush(tx, false)?;
            }
        }
        batch.flush(tx, false)?;
    }
    Ok(())
}

fn read_json_file(file: &Path, mut r: impl Read, batch: &mut Pending) -> Result<(), String> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut value = Json::parse_bytes(&buf).map_err(|e| format!("{}: not valid JSON: {e}", file.display()))?;
    if !value.get("resourceType").is_some_and(|t| t.is_str("Bundle")) {
        batch.edit(&mut value);
        let r = prepare_parsed(value, None).map_err(|i| format!("{}: {}", file.display(), i.diagnostics))?;
        batch.push(r, buf.len());
        return Ok(());
    }
    let (_, ops) = bundle_ops_with(value, IdPolicy::Keep, |r| batch.edit(r))
        .map_err(|i| format!("{}: {}", file.display(), i.diagnostics))?;
    let per_entry = buf.len() / ops.len().max(1);
    for op in ops {
        match op {
            Ok(WriteOp::Put(r)) => batch.push(r, per_entry),
            Ok(WriteOp::Delete { .. }) => {} // a file load only adds data
            Err(i) => {
                return Err(format!(
                    "{}: {}: {}",
                    file.display(),
                    i.expression.as_deref().unwrap_or("Bundle"),
                    i.diagnostics
                ));
            }
        }
    }
    Ok(())
}

/// Makes a resource copy `k` of itself: its id and every relative reference `Type/id` get
/// the prefix `c<k>-`. Nothing else changes.
fn copy_of(resource: &mut Json<'_>, k: u32) {
    let prefix = format!("c{k}-");
    if let Some(id) = resource.get("id").and_then(Json::as_str).map(|id| format!("{prefix}{id}")) {
        resource.set("id", Json::string(&id), None);
    }
    prefix_references(resource, &prefix);
}

fn prefix_references(v: &mut Json<'_>, prefix: &str) {
    match v {
        Json::Object(members) => {
            for (key, child) in members.iter_mut() {
                if key.is("reference")
                    && let Some(s) = child.as_str()
                {
                    if let Some((t, rest)) = s.split_once('/')
                        && sluice_fhir::is_r4_resource_type(t)
                        && !rest.is_empty()
                    {
                        *child = Json::string(&format!("{t}/{prefix}{rest}"));
                    }
                } else {
                    prefix_references(child, prefix);
                }
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|c| prefix_references(c, prefix)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_rewrite_ids_and_relative_references() {
        let text = r##"{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"},"performer":[{"reference":"Practitioner/x/_history/2"},{"reference":"#contained"}],"note":[{"text":"Patient/p1 is fine"}],"basedOn":[{"reference":"https://elsewhere/fhir/ServiceRequest/s"}],"valueQuantity":{"value":1.50}}"##;
        let mut c = Json::parse(text).unwrap();
        copy_of(&mut c, 2);
        assert_eq!(
            c.to_string(),
            r##"{"resourceType":"Observation","id":"c2-o1","subject":{"reference":"Patient/c2-p1"},"performer":[{"reference":"Practitioner/c2-x/_history/2"},{"reference":"#contained"}],"note":[{"text":"Patient/p1 is fine"}],"basedOn":[{"reference":"https://elsewhere/fhir/ServiceRequest/s"}],"valueQuantity":{"value":1.50}}"##,
            "only ids and relative reference elements change"
        );
    }
}
