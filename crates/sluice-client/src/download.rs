//! One file: streamed to `<name>.part`, resumed with `Range`, verified, renamed.

use crate::error::Error;
use crate::export::Http;
use crate::manifest::Entry;
use crate::progress::{Event, Reporter};
use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_ENCODING, CONTENT_RANGE, RANGE};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a download needs besides its entry.
pub(crate) struct Job {
    pub http: Arc<Http>,
    pub entry: Entry,
    pub dest: PathBuf,
    pub requires_token: bool,
    pub organized: bool,
    pub retries: usize,
    pub reporter: Arc<dyn Reporter>,
}

/// A verified file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done {
    pub bytes: u64,
    pub count: u64,
    /// It was complete on disk already.
    pub skipped: bool,
}

/// Why one attempt failed.
enum Failed {
    /// Worth another try; `restart` drops what is on disk; `after` is the server's wait.
    Retry { why: String, restart: bool, after: Option<Duration> },
    /// Not worth another try.
    Fatal(Error),
}

fn retry(why: impl Into<String>) -> Failed {
    Failed::Retry { why: why.into(), restart: false, after: None }
}

fn restart(why: impl Into<String>) -> Failed {
    Failed::Retry { why: why.into(), restart: true, after: None }
}

impl Job {
    fn part(&self) -> PathBuf {
        let mut p = self.dest.clone().into_os_string();
        p.push(".part");
        PathBuf::from(p)
    }

    fn io(&self, what: &str, e: std::io::Error) -> Failed {
        Failed::Fatal(Error::Io { context: format!("{what} {}", self.part().display()), source: e })
    }

    /// Downloads and verifies the file, retrying with exponential backoff.
    pub async fn run(self) -> Result<Done, Error> {
        if let Some(done) = self.already_there().await {
            self.reporter.event(Event::FileDone {
                name: self.entry.name.clone(),
                bytes: done.bytes,
                count: done.count,
                skipped: done.skipped,
            });
            return Ok(done);
        }
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.retries)
            .with_jitter()
            .build();
        loop {
            match self.attempt().await {
                Ok(done) => {
                    self.reporter.event(Event::FileDone {
                        name: self.entry.name.clone(),
                        bytes: done.bytes,
                        count: done.count,
                        skipped: false,
                    });
                    return Ok(done);
                }
                Err(Failed::Fatal(e)) => return Err(e),
                Err(Failed::Retry { why, restart, after }) => {
                    if restart {
                        let _ = tokio::fs::remove_file(self.part()).await;
                    }
                    let Some(delay) = delays.next() else {
                        return Err(Error::Download {
                            file: self.entry.name.clone(),
                            message: format!("{why} (gave up after {} retries)", self.retries),
                        });
                    };
                    let wait = after.map_or(delay, |a| a.max(delay));
                    self.reporter.event(Event::FileRetry { name: self.entry.name.clone(), error: why, wait });
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// A file left complete by an earlier run: kept when the manifest's size and SHA-256
    /// both match it.
    async fn already_there(&self) -> Option<Done> {
        let (Some(size), Some(sha)) = (self.entry.size, &self.entry.sha256) else { return None };
        let meta = tokio::fs::metadata(&self.dest).await.ok()?;
        if meta.len() != size {
            return None;
        }
        let mut check = Check::new(self.is_gzip(None), self.organized);
        feed_file(&self.dest, &mut check).await.ok()?;
        let (bytes, digest, lines) = check.finish().ok()?;
        (digest == *sha && bytes == size && self.count_ok(lines).is_ok()).then_some(Done {
            bytes,
            count: lines.0 - lines.1,
            skipped: true,
        })
    }

    fn is_gzip(&self, encoding: Option<&str>) -> bool {
        self.entry.name.ends_with(".gz") || encoding.is_some_and(|e| e.eq_ignore_ascii_case("gzip"))
    }

    /// Whether `(lines, headers)` agrees with the entry's `count`; with `organizeOutputBy`
    /// the count is of resources (headers left out, as Sluice and the reference server
    /// do), or of every line.
    fn count_ok(&self, (lines, headers): (u64, u64)) -> Result<(), String> {
        let Some(count) = self.entry.count else { return Ok(()) };
        if count == lines - headers || (self.organized && count == lines) {
            return Ok(());
        }
        Err(format!("it holds {} resources but the manifest's count is {count}", lines - headers))
    }

    async fn attempt(&self) -> Result<Done, Failed> {
        let part = self.part();
        let mut have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
        if self.entry.size.is_some_and(|s| have > s) {
            let _ = tokio::fs::remove_file(&part).await;
            have = 0;
        }
        let token = self.requires_token;
        let url = self.entry.url.clone();
        let resp = self
            .http
            .send(token, |c| {
                let r = c.get(&url);
                if have > 0 { r.header(RANGE, format!("bytes={have}-")) } else { r }
            })
            .await
            .map_err(|e| match e {
                Error::Auth(m) => Failed::Fatal(Error::Auth(m)),
                other => retry(other.to_string()),
            })?;
        let status = resp.status();
        let encoding = resp.headers().get(CONTENT_ENCODING).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut check = Check::new(self.is_gzip(encoding.as_deref()), self.organized);
        let append = match status {
            StatusCode::PARTIAL_CONTENT if have > 0 => {
                let range = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or_default();
                if range_start(range) != Some(have) {
                    return Err(restart(format!("the server sent range '{range}', not bytes {have}-")));
                }
                true
            }
            StatusCode::OK => false,
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                // Already complete on disk (the server's length is what we have)?
                let range = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or_default();
                if range.strip_prefix("bytes */").and_then(|n| n.trim().parse::<u64>().ok()) == Some(have) {
                    feed_file(&part, &mut check).await.map_err(|e| self.io("reading", e))?;
                    return self.finish(check).await;
                }
                return Err(restart(format!("range bytes={have}- refused (416)")));
            }
            s if s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT || s.is_server_error() => {
                let after = crate::export::retry_after(resp.headers());
                return Err(Failed::Retry { why: format!("HTTP {s}"), restart: false, after });
            }
            s => {
                let body = resp.bytes().await.unwrap_or_default();
                return Err(Failed::Fatal(Error::Download {
                    file: self.entry.name.clone(),
                    message: format!("HTTP {s}: {}", crate::error::describe_body(&body)),
                }));
            }
        };
        let file = if append {
            feed_file(&part, &mut check).await.map_err(|e| self.io("reading", e))?;
            tokio::fs::OpenOptions::new().append(true).open(&part).await.map_err(|e| self.io("opening", e))?
        } else {
            have = 0;
            if let Some(dir) = part.parent() {
                tokio::fs::create_dir_all(dir).await.map_err(|e| self.io("creating the folder of", e))?;
            }
            tokio::fs::File::create(&part).await.map_err(|e| self.io("creating", e))?
        };
        // Each write of a tokio file is a trip to a blocking thread: write in 1 MiB pieces.
        let mut file = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        self.reporter.event(Event::FileStarted {
            name: self.entry.name.clone(),
            size: self.entry.size,
            resumed_from: have,
        });
        let mut resp = resp;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    file.flush().await.map_err(|e| self.io("writing", e))?;
                    return Err(retry(format!("the download broke off: {e}")));
                }
            };
            check.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| self.io("writing", e))?;
            self.reporter.event(Event::FileBytes { name: self.entry.name.clone(), bytes: chunk.len() as u64 });
        }
        file.flush().await.map_err(|e| self.io("writing", e))?;
        file.get_ref().sync_all().await.map_err(|e| self.io("writing", e))?;
        drop(file);
        self.finish(check).await
    }

    /// Verifies what `check` saw (all of `.part`), then renames `.part` to the file.
    async fn finish(&self, check: Check) -> Result<Done, Failed> {
        let (bytes, digest, lines) = check.finish().map_err(|e| restart(format!("not valid gzip: {e}")))?;
        if let Some(size) = self.entry.size
            && size != bytes
        {
            return Err(restart(format!("{bytes} bytes arrived but the manifest's size is {size}")));
        }
        if let Some(sha) = &self.entry.sha256
            && *sha != digest
        {
            return Err(restart(format!("its SHA-256 is {digest}, the manifest's {sha}")));
        }
        self.count_ok(lines).map_err(restart)?;
        tokio::fs::rename(self.part(), &self.dest).await.map_err(|e| self.io("renaming", e))?;
        Ok(Done { bytes, count: lines.0 - lines.1, skipped: false })
    }
}

/// Bytes gathered before each write to the `.part` file.
const WRITE_BUFFER: usize = 1 << 20;

/// The start of a `Content-Range: bytes a-b/n`.
fn range_start(v: &str) -> Option<u64> {
    v.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

async fn feed_file(path: &Path, check: &mut Check) -> std::io::Result<()> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        check.update(&buf[..n]);
    }
}

/// Size, SHA-256 and lines of the bytes as downloaded (lines after gunzip for gzip files).
struct Check {
    bytes: u64,
    sha: Sha256,
    lines: Lines,
    gunzip: Option<flate2::write::MultiGzDecoder<Lines>>,
    gzip_error: Option<std::io::Error>,
}

impl Check {
    fn new(gzip: bool, organized: bool) -> Check {
        let lines = Lines { organized, ..Lines::default() };
        Check {
            bytes: 0,
            sha: Sha256::new(),
            gunzip: gzip.then(|| flate2::write::MultiGzDecoder::new(lines.clone())),
            lines,
            gzip_error: None,
        }
    }

    fn update(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.sha.update(data);
        match &mut self.gunzip {
            Some(d) => {
                if self.gzip_error.is_none()
                    && let Err(e) = d.write_all(data)
                {
                    self.gzip_error = Some(e);
                }
            }
            None => self.lines.feed(data),
        }
    }

    /// `(bytes, sha256 hex, (lines, header lines))`.
    fn finish(self) -> std::io::Result<(u64, String, (u64, u64))> {
        if let Some(e) = self.gzip_error {
            return Err(e);
        }
        let lines = match self.gunzip {
            Some(d) => d.finish()?,
            None => self.lines,
        };
        let (n, h) = lines.done();
        Ok((self.bytes, hex::encode(self.sha.finalize()), (n, h)))
    }
}

/// Counts non-empty lines, and the `Parameters` header lines of `organizeOutputBy` files.
#[derive(Debug, Clone, Default)]
struct Lines {
    organized: bool,
    lines: u64,
    headers: u64,
    in_line: bool,
    prefix: Vec<u8>,
}

const HEADER: &[u8] = br#"{"resourceType":"Parameters""#;

impl Lines {
    fn feed(&mut self, mut data: &[u8]) {
        // Line by line (memchr finds the ends); a line counts once it has a non-blank byte,
        // and only its first bytes matter for the header check.
        loop {
            let (line, rest) = match memchr::memchr(b'\n', data) {
                Some(i) => (&data[..i], Some(&data[i + 1..])),
                None => (data, None),
            };
            self.part(line);
            match rest {
                Some(rest) => {
                    self.end_line();
                    data = rest;
                }
                None => return,
            }
        }
    }

    /// A piece of the current line (no newline in it).
    fn part(&mut self, piece: &[u8]) {
        if !self.organized && self.in_line {
            return;
        }
        for &b in piece {
            if self.organized && self.prefix.len() >= HEADER.len() {
                break;
            }
            if !b.is_ascii_whitespace() {
                self.in_line = true;
                if !self.organized {
                    break;
                }
                self.prefix.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        if self.in_line {
            self.lines += 1;
            if self.organized && self.prefix == HEADER {
                self.headers += 1;
            }
        }
        self.in_line = false;
        self.prefix.clear();
    }

    fn done(mut self) -> (u64, u64) {
        self.end_line();
        (self.lines, self.headers)
    }
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lines_and_headers_in_plain_and_gzip() {
        let text = b"{\"resourceType\":\"Parameters\",\"parameter\":[]}\n{\"a\":1}\n\n{ \"b\" : 2 }";
        let mut c = Check::new(false, true);
        c.update(&text[..10]);
        c.update(&text[10..]);
        let (bytes, sha, lines) = c.finish().unwrap();
        assert_eq!((bytes, lines), (text.len() as u64, (3, 1)));
        assert_eq!(sha, hex::encode(Sha256::digest(text)));
        // Byte by byte, and in one piece: the same count.
        for pieces in [text.chunks(1).collect::<Vec<_>>(), vec![&text[..]]] {
            let mut c = Check::new(false, true);
            pieces.into_iter().for_each(|p| c.update(p));
            assert_eq!(c.finish().unwrap().2, (3, 1));
        }
        let mut c = Check::new(false, false);
        c.update(b"  \n\t\n{}\n \n{}");
        assert_eq!(c.finish().unwrap().2, (2, 0), "blank lines are not resources");

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text).unwrap();
        let mut member = gz.finish().unwrap();
        member.extend(member.clone()); // two members: still one gzip file
        let mut c = Check::new(true, false);
        for chunk in member.chunks(7) {
            c.update(chunk);
        }
        // The first member's unterminated last line runs into the second's first.
        assert_eq!(c.finish().unwrap().2, (5, 0));
        let mut c = Check::new(true, false);
        c.update(b"not gzip at all");
        assert!(c.finish().is_err());
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
    }
}
