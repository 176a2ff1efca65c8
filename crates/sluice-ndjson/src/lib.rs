//! Turns a stream of FHIR resources into NDJSON export files, plain or gzip, split by
//! resource count and size.
//!
//! [`NdjsonWriter`] is a pure, synchronous state machine: every call appends [`Event`]s to a
//! caller-provided `Vec`, and the caller ships the [`Event::Data`] bytes to storage. It never
//! holds more than about one chunk (`chunk_size`, default 256 KiB), the line being written and,
//! for gzip, the deflate state (a few hundred KiB), whatever the size of the files.
//!
//! Each resource becomes one line: its compact JSON followed by `\n`. A gzip file is one complete
//! gzip member, so every file can be decompressed on its own.
//!
//! ```
//! use sluice_ndjson::{Compression, Event, NdjsonWriter, SplitLimits};
//!
//! let limits = SplitLimits { max_resources: 2, max_bytes: 0 };
//! let mut writer = NdjsonWriter::new(Compression::None, limits);
//! let mut events = Vec::new();
//! writer.write_lines(
//!     [&br#"{"resourceType":"Patient","id":"a"}"#[..], br#"{"resourceType":"Patient","id":"b"}"#],
//!     &mut events,
//! )?;
//! writer.write_line(br#"{"resourceType":"Patient","id":"c"}"#, &mut events)?;
//! writer.finish(&mut events)?;
//!
//! let lines_per_file: Vec<u64> = events
//!     .iter()
//!     .filter_map(|e| match e {
//!         Event::Finished(summary) => Some(summary.resources),
//!         Event::Data { .. } => None,
//!     })
//!     .collect();
//! assert_eq!(lines_per_file, [2, 1]);
//! # Ok::<(), sluice_ndjson::NdjsonError>(())
//! ```
//!
//! # File-splitting rule
//!
//! Files are numbered from 0. A line always goes into the current file if that file has no line
//! yet, so no file is ever empty and a single line larger than `max_bytes` gets a file of its own.
//! Otherwise, before writing the line, the writer finishes the current file (emitting its last
//! [`Event::Data`] and its [`Event::Finished`]) and starts file `index + 1` when any limit that is
//! not 0 would be crossed:
//!
//! - `max_resources`: the current file already holds `max_resources` lines.
//! - `max_bytes`, plain NDJSON: `bytes + line.len() + 1 > max_bytes`, where `bytes` is the size of
//!   the current file so far. A plain file therefore never exceeds `max_bytes` unless it holds a
//!   single line that alone does.
//! - `max_bytes`, gzip: `produced + held + line.len() + 1 + 16 > max_bytes`, where
//!   - `produced` is the exact number of bytes deflate has produced for this file so far (gzip
//!     header included): the bytes already emitted plus those in the writer's buffer;
//!   - `held = ceil(pending * ratio)` estimates the compressed size of the input deflate has
//!     accepted but not turned into output yet: `pending` is the uncompressed input accepted
//!     since deflate's output last grew, and `ratio` the file's compressed/uncompressed ratio
//!     at that moment (1, i.e. no compression, before deflate has produced anything);
//!   - the new line is counted uncompressed (deflate may fail to shrink it), and the 16 bytes
//!     cover the end of the deflate stream and the 8-byte gzip trailer.
//!
//!   At levels 2 and up deflate holds back whole blocks (typically a few hundred KiB of JSON)
//!   before writing anything, so `held` can be a large guess when limits are small. When the
//!   rule fires while `held >= max_bytes / 16`, the writer sync-flushes deflate (at most 4
//!   times per file, a few bytes each) so that what it held is counted exactly, and then
//!   applies the rule again. With limits of a few MiB and more this practically never happens.
//!
//!   A line longer than `max_bytes` therefore always starts a new file, like in plain files.
//!   A gzip file can still exceed `max_bytes`, by at most what deflate held back beyond the
//!   estimate when the file's last line was accepted (at most about one deflate block, typically
//!   a few tens of KiB at levels 2 and up, almost nothing at level 1), or because its single
//!   line alone does.

#![warn(missing_docs)]

use std::io;
use std::mem;

use flate2::{Compress, FlushCompress, Status};

/// Default size of the [`Event::Data`] chunks: 256 KiB.
pub const DEFAULT_CHUNK_SIZE: usize = 256 * 1024;

/// Size of the gzip header deflate writes (no file name, comment or extra field).
const GZIP_HEADER_LEN: u64 = 10;
/// Bytes reserved in the gzip split estimate for the end of the deflate stream and the trailer.
const GZIP_FINISH_RESERVE: u64 = 16;
/// Most sync flushes the gzip size check may do in one file.
const MAX_SYNC_FLUSHES: u32 = 4;
/// The gzip size check sync-flushes only when its guess about what deflate holds back is at
/// least `max_bytes / SYNC_FLUSH_FRACTION`.
const SYNC_FLUSH_FRACTION: u64 = 16;
/// Smallest buffer allocation, so that small files do not start with many tiny reallocations.
const MIN_BUFFER: usize = 8 * 1024;
/// Deflate window size (log2), the gzip default.
const WINDOW_BITS: u8 = 15;

/// Output encoding of export files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain NDJSON (`.ndjson`).
    None,
    /// Each file is one gzip member (`.ndjson.gz`) compressed at deflate `level` 0..=9;
    /// larger values are treated as 9.
    Gzip {
        /// Deflate level: 0 (store only), 1 (fastest) to 9 (smallest).
        level: u32,
    },
}

impl Compression {
    /// File extension without the leading dot: `"ndjson"` or `"ndjson.gz"`.
    pub fn extension(&self) -> &'static str {
        match self {
            Compression::None => "ndjson",
            Compression::Gzip { .. } => "ndjson.gz",
        }
    }
}

/// When to start a new file. 0 means "no limit" for either field; the default has no limits.
///
/// See the [crate documentation](crate#file-splitting-rule) for the exact rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitLimits {
    /// Most lines (resources) in one file.
    pub max_resources: u64,
    /// Most stored bytes (compressed bytes for gzip) in one file.
    pub max_bytes: u64,
}

/// What the writer emits, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes to append to file number `file` (0-based). Only emitted in chunks of at least
    /// `chunk_size` except at file end (this writer emits exactly `chunk_size` bytes except in
    /// the last chunk of a file). Never empty.
    Data {
        /// Index of the file the bytes belong to.
        file: u32,
        /// The bytes, to be appended after those of earlier `Data` events for the same file.
        bytes: Vec<u8>,
    },
    /// File `file` is complete: no more Data for it will follow.
    Finished(FileSummary),
}

/// Exact counts for one finished file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSummary {
    /// Index of the file (0-based).
    pub file: u32,
    /// Lines (resources) in the file.
    pub resources: u64,
    /// Exact bytes of the file as stored (compressed size for gzip): the sum of its `Data` bytes.
    pub bytes: u64,
    /// Bytes of the NDJSON text before compression (equals `bytes` for plain files).
    pub uncompressed_bytes: u64,
}

/// Errors of [`NdjsonWriter`].
#[derive(thiserror::Error, Debug)]
pub enum NdjsonError {
    /// The line was rejected and nothing was written.
    #[error("invalid ndjson line: {reason}")]
    InvalidLine {
        /// Why the line was rejected.
        reason: &'static str,
    },
    /// Compression failed. The writer must not be used any further after this error.
    #[error("ndjson output failed: {0}")]
    Io(#[from] io::Error),
}

/// Streams lines into one or more NDJSON (or gzip NDJSON) files, emitting their bytes as
/// [`Event`]s. See the [crate documentation](crate) for the splitting rule.
#[derive(Debug)]
pub struct NdjsonWriter {
    compression: Compression,
    limits: SplitLimits,
    chunk_size: usize,
    /// The open file; it exists only while it holds at least one line.
    file: Option<OpenFile>,
    /// Index the next file will get.
    next_file: u32,
    /// Lines of the files already finished.
    finished_resources: u64,
    /// Stored bytes of the files already finished.
    finished_bytes: u64,
    /// Gzip compressor, created on first use and reset between files.
    deflate: Option<Compress>,
}

/// State of the file being written.
#[derive(Debug)]
struct OpenFile {
    index: u32,
    resources: u64,
    uncompressed: u64,
    /// Bytes already emitted as `Data`.
    emitted: u64,
    /// Bytes not emitted yet; never longer (nor larger in capacity) than the chunk size.
    buf: Vec<u8>,
    gzip: GzipProgress,
}

/// What the gzip size estimate knows about deflate's progress in the current file.
#[derive(Debug, Default)]
struct GzipProgress {
    /// Compressed bytes (without the header) when the output last grew.
    out_mark: u64,
    /// Uncompressed bytes accepted by deflate at that moment.
    in_mark: u64,
    /// Sync flushes done in this file.
    flushes: u32,
}

impl NdjsonWriter {
    /// Creates a writer; no file is started until the first line arrives.
    /// The chunk size is [`DEFAULT_CHUNK_SIZE`].
    pub fn new(compression: Compression, limits: SplitLimits) -> Self {
        NdjsonWriter {
            compression,
            limits,
            chunk_size: DEFAULT_CHUNK_SIZE,
            file: None,
            next_file: 0,
            finished_resources: 0,
            finished_bytes: 0,
            deflate: None,
        }
    }

    /// Sets the size of the [`Event::Data`] chunks (at least 1 byte; 0 is treated as 1).
    pub fn with_chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes.max(1);
        self
    }

    /// The output encoding.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The split limits.
    pub fn limits(&self) -> SplitLimits {
        self.limits
    }

    /// The size of the [`Event::Data`] chunks.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Appends one resource (compact JSON, without trailing newline) as one line. Lines
    /// containing '\n' or '\r' (raw) or empty lines are rejected with
    /// [`NdjsonError::InvalidLine`] (nothing written).
    ///
    /// May first finish the current file and start the next one (see the
    /// [splitting rule](crate#file-splitting-rule)).
    pub fn write_line(&mut self, line: &[u8], out: &mut Vec<Event>) -> Result<(), NdjsonError> {
        self.write(line, true, false, out)
    }

    /// Appends one line to the current file whatever the split limits say: the line stays
    /// with the ones before it (a file is only ever split before a [`write_line`] line).
    /// Patient blocks (`organizeOutputBy=Patient`) use it so that no block spans two files;
    /// a file then exceeds the limits by at most one block. Same validation as
    /// [`write_line`](Self::write_line).
    ///
    /// [`write_line`]: Self::write_line
    pub fn write_line_joined(&mut self, line: &[u8], out: &mut Vec<Event>) -> Result<(), NdjsonError> {
        self.write(line, false, false, out)
    }

    /// Appends a line that is not a resource: a patient block's `Parameters` header
    /// (`organizeOutputBy=Patient`). It may start a new file like a
    /// [`write_line`](Self::write_line) line, but it is not counted in
    /// [`FileSummary::resources`] nor in the `max_resources` limit: manifests count resources
    /// only (D18), as the SMART reference server does.
    pub fn write_header(&mut self, line: &[u8], out: &mut Vec<Event>) -> Result<(), NdjsonError> {
        self.write(line, true, true, out)
    }

    fn write(&mut self, line: &[u8], may_split: bool, header: bool, out: &mut Vec<Event>) -> Result<(), NdjsonError> {
        validate_line(line)?;
        let added = line.len() as u64 + 1;
        if may_split && self.must_split(added, out)? {
            self.finish_file(out)?;
        }
        let chunk_size = self.chunk_size;
        let next_file = &mut self.next_file;
        let file = self.file.get_or_insert_with(|| {
            let index = *next_file;
            *next_file += 1;
            OpenFile::new(index)
        });
        match self.compression {
            Compression::None => {
                file.push_plain(line, chunk_size, out);
                file.push_plain(b"\n", chunk_size, out);
            }
            Compression::Gzip { level } => {
                let deflate = self
                    .deflate
                    .get_or_insert_with(|| Compress::new_gzip(flate2::Compression::new(level.min(9)), WINDOW_BITS));
                file.deflate(deflate, line, FlushCompress::None, chunk_size, out)?;
                file.deflate(deflate, b"\n", FlushCompress::None, chunk_size, out)?;
                file.observe(deflate);
            }
        }
        file.resources += u64::from(!header);
        file.uncompressed += added;
        Ok(())
    }

    /// Convenience: many lines, written in order with [`write_line`](Self::write_line).
    /// Stops at the first invalid line; the lines before it stay written.
    pub fn write_lines<'a, I: IntoIterator<Item = &'a [u8]>>(
        &mut self,
        lines: I,
        out: &mut Vec<Event>,
    ) -> Result<(), NdjsonError> {
        for line in lines {
            self.write_line(line, out)?;
        }
        Ok(())
    }

    /// Ends the current file (if it has at least one line): emits its remaining Data and
    /// Finished. A writer that never got a line emits nothing.
    pub fn finish(mut self, out: &mut Vec<Event>) -> Result<(), NdjsonError> {
        Ok(self.finish_file(out)?)
    }

    /// Totals so far over all files: (resources, stored bytes). Stored bytes are the bytes
    /// emitted as [`Event::Data`] so far; bytes still buffered are not counted yet.
    pub fn totals(&self) -> (u64, u64) {
        let (resources, bytes) = self.file.as_ref().map_or((0, 0), |f| (f.resources, f.emitted));
        (self.finished_resources + resources, self.finished_bytes + bytes)
    }

    /// Whether a line adding `added` uncompressed bytes must go into a new file.
    fn must_split(&mut self, added: u64, out: &mut Vec<Event>) -> io::Result<bool> {
        let Some(file) = self.file.as_mut() else {
            return Ok(false);
        };
        let limits = self.limits;
        if limits.max_resources != 0 && file.resources >= limits.max_resources {
            return Ok(true);
        }
        if limits.max_bytes == 0 {
            return Ok(false);
        }
        let (Compression::Gzip { .. }, Some(deflate)) = (self.compression, self.deflate.as_mut()) else {
            // Plain NDJSON: sizes are exact.
            return Ok(file.stored() + added > limits.max_bytes);
        };
        loop {
            let held = file.gzip_held(deflate);
            if file.gzip_projected(held, added) <= limits.max_bytes {
                return Ok(false);
            }
            if file.gzip.flushes >= MAX_SYNC_FLUSHES || held.saturating_mul(SYNC_FLUSH_FRACTION) < limits.max_bytes {
                return Ok(true);
            }
            // Much of the projection is a guess about what deflate holds: flush it out so
            // that it is counted exactly, then decide again.
            file.gzip.flushes += 1;
            file.deflate(deflate, &[], FlushCompress::Sync, self.chunk_size, out)?;
            file.observe(deflate);
        }
    }

    /// Finishes the open file, if any: remaining Data, then Finished.
    fn finish_file(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        if let Some(deflate) = self.deflate.as_mut() {
            let finished = file.deflate(deflate, &[], FlushCompress::Finish, self.chunk_size, out);
            if finished.is_err() {
                self.deflate = None;
                return finished;
            }
            deflate.reset();
        }
        file.emit(out);
        self.finished_resources += file.resources;
        self.finished_bytes += file.emitted;
        out.push(Event::Finished(FileSummary {
            file: file.index,
            resources: file.resources,
            bytes: file.emitted,
            uncompressed_bytes: file.uncompressed,
        }));
        Ok(())
    }
}

impl OpenFile {
    fn new(index: u32) -> Self {
        OpenFile { index, resources: 0, uncompressed: 0, emitted: 0, buf: Vec::new(), gzip: GzipProgress::default() }
    }

    /// Bytes of this file produced so far (emitted or buffered).
    fn stored(&self) -> u64 {
        self.emitted + self.buf.len() as u64
    }

    /// Emits the buffer as one `Data` event (if it is not empty).
    fn emit(&mut self, out: &mut Vec<Event>) {
        if self.buf.is_empty() {
            return;
        }
        let bytes = mem::take(&mut self.buf);
        self.emitted += bytes.len() as u64;
        out.push(Event::Data { file: self.index, bytes });
    }

    /// Emits a full buffer, then makes sure it has spare capacity for at least
    /// `min(want, room left in the chunk)` bytes (and at least one), never letting its
    /// capacity exceed `chunk_size`.
    fn make_room(&mut self, want: usize, chunk_size: usize, out: &mut Vec<Event>) {
        if self.buf.len() >= chunk_size {
            self.emit(out);
        }
        let len = self.buf.len();
        let want = want.clamp(1, chunk_size - len);
        if self.buf.capacity() - len >= want {
            return;
        }
        let target = if self.buf.capacity() == 0 && self.emitted > 0 {
            // Past the first chunk of a file, chunks are normally filled completely.
            chunk_size
        } else {
            (len + want).max(self.buf.capacity() * 2).max(MIN_BUFFER).min(chunk_size)
        };
        self.buf.reserve_exact(target - len);
    }

    /// Appends uncompressed bytes, emitting every full chunk.
    fn push_plain(&mut self, mut data: &[u8], chunk_size: usize, out: &mut Vec<Event>) {
        while !data.is_empty() {
            self.make_room(data.len(), chunk_size, out);
            let n = (chunk_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() >= chunk_size {
                self.emit(out);
            }
        }
    }

    /// Runs deflate over `input` with `flush`, emitting every full chunk. Returns once all
    /// input is taken (and, for `Sync`, all output is out; for `Finish`, the stream is ended).
    fn deflate(
        &mut self,
        deflate: &mut Compress,
        mut input: &[u8],
        flush: FlushCompress,
        chunk_size: usize,
        out: &mut Vec<Event>,
    ) -> io::Result<()> {
        loop {
            self.make_room(1, chunk_size, out);
            let (in_before, out_before) = (deflate.total_in(), deflate.total_out());
            let status = deflate.compress_vec(input, &mut self.buf, flush).map_err(io::Error::other)?;
            let consumed = (deflate.total_in() - in_before) as usize;
            let produced = deflate.total_out() - out_before;
            input = &input[consumed..];
            let out_full = self.buf.len() == self.buf.capacity();
            let done = match flush {
                FlushCompress::Finish => status == Status::StreamEnd,
                FlushCompress::None => input.is_empty(),
                // Sync: output is complete once deflate stops short of filling the buffer.
                _ => input.is_empty() && (!out_full || status == Status::BufError),
            };
            if done {
                break;
            }
            if consumed == 0 && produced == 0 && !out_full {
                return Err(io::Error::other("deflate made no progress"));
            }
        }
        if self.buf.len() >= chunk_size {
            self.emit(out);
        }
        Ok(())
    }

    /// Records deflate's progress for the size estimate.
    fn observe(&mut self, deflate: &Compress) {
        let data_out = deflate.total_out().saturating_sub(GZIP_HEADER_LEN);
        if data_out > self.gzip.out_mark {
            self.gzip.out_mark = data_out;
            self.gzip.in_mark = deflate.total_in();
        }
    }

    /// Estimated compressed size of the input deflate holds back in this file.
    fn gzip_held(&self, deflate: &Compress) -> u64 {
        let pending = deflate.total_in() - self.gzip.in_mark;
        if self.gzip.in_mark == 0 {
            return pending;
        }
        let (num, den) = (self.gzip.out_mark as u128, self.gzip.in_mark as u128);
        u64::try_from((pending as u128 * num).div_ceil(den)).unwrap_or(u64::MAX)
    }

    /// Estimated final size of this gzip file if `added` more uncompressed bytes go into it,
    /// given the estimate `held` of what deflate holds back.
    fn gzip_projected(&self, held: u64, added: u64) -> u64 {
        self.stored().saturating_add(held).saturating_add(added).saturating_add(GZIP_FINISH_RESERVE)
    }
}

/// Rejects empty lines and lines with a raw line break.
fn validate_line(line: &[u8]) -> Result<(), NdjsonError> {
    if line.is_empty() {
        return Err(NdjsonError::InvalidLine { reason: "empty line" });
    }
    if has_line_break(line) {
        let reason =
            if line.contains(&b'\n') { "line contains a raw line feed" } else { "line contains a raw carriage return" };
        return Err(NdjsonError::InvalidLine { reason });
    }
    Ok(())
}

/// Whether `line` contains `\n` or `\r`. Scans in blocks without an early exit inside a block
/// so that the compiler can vectorise the comparison.
fn has_line_break(line: &[u8]) -> bool {
    let mut blocks = line.chunks_exact(64);
    for block in &mut blocks {
        let mut found = 0u8;
        for &b in block {
            found |= u8::from(b == b'\n') | u8::from(b == b'\r');
        }
        if found != 0 {
            return true;
        }
    }
    blocks.remainder().iter().any(|&b| b == b'\n' || b == b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn line(n: usize) -> Vec<u8> {
        format!(r#"{{"resourceType":"Basic","id":"b{n}","code":{{"text":"{}"}}}}"#, "x".repeat(n % 50)).into_bytes()
    }

    #[test]
    fn gzip_header_is_ten_bytes_and_comes_first() {
        let mut deflate = Compress::new_gzip(flate2::Compression::new(6), WINDOW_BITS);
        let mut buf = Vec::with_capacity(1024);
        deflate.compress_vec(b"{\"a\":1}\n", &mut buf, FlushCompress::None).unwrap();
        assert_eq!(buf.len() as u64, GZIP_HEADER_LEN);
        assert_eq!(&buf[..3], &[0x1f, 0x8b, 8]);
    }

    #[test]
    fn buffer_never_grows_past_chunk_size() {
        for compression in [Compression::None, Compression::Gzip { level: 1 }] {
            let mut w = NdjsonWriter::new(compression, SplitLimits::default()).with_chunk_size(1000);
            let mut out = Vec::new();
            for n in 0..5000 {
                w.write_line(&line(n), &mut out).unwrap();
                let file = w.file.as_ref().unwrap();
                assert!(file.buf.capacity() <= 1000, "{}", file.buf.capacity());
                assert!(file.buf.len() < 1000);
            }
            let big = vec![b'a'; 10_000];
            w.write_line(&big, &mut out).unwrap();
            assert!(w.file.as_ref().unwrap().buf.capacity() <= 1000);
            w.finish(&mut out).unwrap();
        }
    }

    #[test]
    fn buffered_bytes_match_deflate_output() {
        let mut w = NdjsonWriter::new(Compression::Gzip { level: 6 }, SplitLimits::default()).with_chunk_size(4096);
        let mut out = Vec::new();
        for n in 0..3000 {
            w.write_line(&line(n), &mut out).unwrap();
            let file = w.file.as_ref().unwrap();
            assert_eq!(file.stored(), w.deflate.as_ref().unwrap().total_out());
        }
    }

    #[test]
    fn small_gzip_limits_pack_files_closely() {
        let limits = SplitLimits { max_resources: 0, max_bytes: 20_000 };
        let mut w = NdjsonWriter::new(Compression::Gzip { level: 9 }, limits);
        let mut out = Vec::new();
        let mut lines = Vec::new();
        for n in 0..20_000 {
            let l = line(n);
            w.write_line(&l, &mut out).unwrap();
            lines.extend_from_slice(&l);
            lines.push(b'\n');
        }
        w.finish(&mut out).unwrap();
        let mut files: Vec<Vec<u8>> = Vec::new();
        let mut sizes = Vec::new();
        for event in out {
            match event {
                Event::Data { file, bytes } => {
                    if files.len() <= file as usize {
                        files.push(Vec::new());
                    }
                    files[file as usize].extend_from_slice(&bytes);
                }
                Event::Finished(summary) => {
                    assert!(summary.bytes <= 20_000 + 1024, "{summary:?}");
                    sizes.push(summary.bytes);
                }
            }
        }
        assert!(files.len() > 1);
        let (_, full) = sizes.split_last().unwrap();
        assert!(full.iter().all(|&b| b > 18_000), "{sizes:?}");
        let mut all = Vec::new();
        for f in &files {
            flate2::read::GzDecoder::new(&f[..]).read_to_end(&mut all).unwrap();
        }
        assert_eq!(all, lines);
    }

    #[test]
    fn line_break_scan() {
        assert!(!has_line_break(&[b'a'; 200]));
        for pos in [0, 5, 63, 64, 65, 127, 128, 199] {
            for br in [b'\n', b'\r'] {
                let mut l = vec![b'a'; 200];
                l[pos] = br;
                assert!(has_line_break(&l), "{pos}");
            }
        }
    }
}
