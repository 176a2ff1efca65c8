//! Encoding: what a part does to the lines it reads ([`Treatment`]: `_elements`,
//! `_typeFilter`, the Provenance target check), and the [`Encoder`] that turns the kept lines
//! into ndjson (or gzip) file bytes with each file's SHA-256, on blocking threads. Also the
//! header line of a patient block ([`block_header`]).

use crate::elements;
use sha2::{Digest, Sha256};
use sluice_ndjson::{Compression, Event, NdjsonError, NdjsonWriter, SplitLimits};
use sluice_store::Batch;
use std::sync::Arc;

/// The ndjson writer plus a running SHA-256 of each file's bytes. Lives on blocking threads
/// between batches: neither compression nor hashing runs on the async reactor.
pub(crate) struct Encoder {
    writer: NdjsonWriter,
    /// The file being hashed: the encoder's file index and the hash of its bytes so far.
    digest: Option<(u32, Sha256)>,
}

/// What encoding produced: bytes for a file, or a finished file with its SHA-256.
pub(crate) enum Encoded {
    /// Bytes of the encoder's file `file` (its index, counted from 0 by the writer).
    Data { file: u32, bytes: Vec<u8> },
    /// A file is complete: what it holds, and the SHA-256 (hex) of its bytes.
    Finished { summary: sluice_ndjson::FileSummary, sha256: String },
}

impl Encoder {
    /// An encoder writing files compressed with `compression`, split at `split`.
    pub(crate) fn new(compression: Compression, split: SplitLimits) -> Self {
        Encoder { writer: NdjsonWriter::new(compression, split), digest: None }
    }

    /// The writer's events, with each finished file's SHA-256.
    fn digest(&mut self, events: Vec<Event>) -> Vec<Encoded> {
        events
            .into_iter()
            .map(|ev| match ev {
                Event::Data { file, bytes } => {
                    if self.digest.as_ref().is_none_or(|(f, _)| *f != file) {
                        self.digest = Some((file, Sha256::new()));
                    }
                    self.digest.as_mut().expect("set above").1.update(&bytes);
                    Encoded::Data { file, bytes }
                }
                Event::Finished(summary) => {
                    let hasher = match self.digest.take() {
                        Some((f, h)) if f == summary.file => h,
                        other => {
                            self.digest = other;
                            Sha256::new()
                        }
                    };
                    Encoded::Finished { summary, sha256: hex::encode(hasher.finalize()) }
                }
            })
            .collect()
    }

    /// Encodes `lines`. In a patient block (`joined`), they stay in the file of the line
    /// before them; `header` (a block's first line, which may start a new file) goes first.
    fn encode<'a>(
        &mut self,
        header: Option<&[u8]>,
        lines: impl IntoIterator<Item = &'a [u8]>,
        joined: bool,
    ) -> Result<Vec<Encoded>, NdjsonError> {
        let mut events = Vec::new();
        if let Some(h) = header {
            self.writer.write_header(h, &mut events)?;
        }
        for line in lines {
            if joined {
                self.writer.write_line_joined(line, &mut events)?;
            } else {
                self.writer.write_line(line, &mut events)?;
            }
        }
        Ok(self.digest(events))
    }

    /// Encodes what `treatment` keeps of `batch` (see [`Encoder::encode`] for `joined`). A
    /// block's `header` goes before its first line, not before nothing: when the batch keeps
    /// no line, the header is handed back, still to be written.
    pub(crate) fn encode_batch(
        &mut self,
        treatment: &Treatment,
        batch: &Batch,
        header: Option<Vec<u8>>,
        joined: bool,
    ) -> (Result<Vec<Encoded>, NdjsonError>, Option<Vec<u8>>) {
        let (lines, empty) = treatment.apply(batch);
        let (first, pending) = if empty { (None, header) } else { (header, None) };
        let res = match &lines {
            Some(lines) => self.encode(first.as_deref(), lines.iter().map(Vec::as_slice), joined),
            None => self.encode(first.as_deref(), batch.lines(), joined),
        };
        (res, pending)
    }

    /// Ends the last file.
    pub(crate) fn finish(mut self) -> Result<Vec<Encoded>, NdjsonError> {
        let mut events = Vec::new();
        let writer = std::mem::replace(&mut self.writer, NdjsonWriter::new(Compression::None, SplitLimits::default()));
        writer.finish(&mut events)?;
        Ok(self.digest(events))
    }
}

/// What a part does to the lines of one type before encoding them ([`crate::runner`]'s
/// `Part::treatment`).
#[derive(Clone, Default)]
pub(crate) struct Treatment {
    /// `_elements`: the elements kept.
    pub(crate) subset: Option<elements::Subsetter>,
    /// `_typeFilter`: a resource is kept when it matches one of these queries.
    pub(crate) queries: Option<Arc<Vec<sluice_planner::TypeQuery>>>,
    /// A Provenance is kept when it targets a resource of one of these types.
    pub(crate) targets: Option<Arc<Vec<String>>>,
}

impl Treatment {
    /// The batch's lines as the plan keeps them: `None` when they are all kept unchanged (no
    /// copy), else the kept lines, subsetted. Also whether nothing is left.
    fn apply(&self, batch: &Batch) -> (Option<Vec<Vec<u8>>>, bool) {
        if self.subset.is_none() && self.queries.is_none() && self.targets.is_none() {
            return (None, batch.count == 0);
        }
        let keep = |line: &&[u8]| {
            if self.queries.is_none() && self.targets.is_none() {
                return true;
            }
            sluice_json::Json::parse_bytes(line).is_ok_and(|v| {
                self.queries.as_ref().is_none_or(|q| sluice_search::matches_any(q, &v))
                    && self.targets.as_ref().is_none_or(|t| sluice_planner::targets_any_of(&v, t))
            })
        };
        let lines: Vec<Vec<u8>> = batch
            .lines()
            .filter(keep)
            .map(|l| self.subset.as_ref().map_or_else(|| l.to_vec(), |s| s.apply(l)))
            .collect();
        let empty = lines.is_empty();
        (Some(lines), empty)
    }
}

/// The header line of a patient's block (Bulk Data IG v3, `organizeOutputBy`).
pub(crate) fn block_header(id: &str) -> Vec<u8> {
    serde_json::json!({
        "resourceType": "Parameters",
        "parameter": [{"name": "header", "valueReference": {"reference": format!("Patient/{id}")}}],
    })
    .to_string()
    .into_bytes()
}
