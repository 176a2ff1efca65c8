//! Progress reporting: events a [`Reporter`] receives (the library has no terminal).

use serde_json::Value;
use std::time::Duration;

/// The progress of a running export, as its status answer tells it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerProgress {
    /// The `X-Progress` header.
    pub text: Option<String>,
    /// Percent done (JSON body `percent`, or a `NN%` in `X-Progress`).
    pub percent: Option<f64>,
    /// Resources done and in total (JSON body `done`/`total`).
    pub done: Option<u64>,
    /// Resources in total.
    pub total: Option<u64>,
    /// Per type: `(type, done, total)` (JSON body `types`, Sluice's shape).
    pub types: Vec<(String, u64, u64)>,
    /// The server's estimate of the seconds left (`estimatedSecondsLeft`).
    pub seconds_left: Option<u64>,
}

impl ServerProgress {
    /// Reads the progress of a 202: the `X-Progress` header and, when the body is JSON
    /// with Sluice's fields (`percent`, `done`, `total`, `types`), those.
    pub fn parse(x_progress: Option<&str>, body: &[u8]) -> ServerProgress {
        let mut p = ServerProgress { text: x_progress.map(str::to_string), ..Default::default() };
        if let Ok(v) = serde_json::from_slice::<Value>(body) {
            p.percent = v.get("percent").and_then(Value::as_f64);
            p.done = v.get("done").and_then(Value::as_u64);
            p.total = v.get("total").and_then(Value::as_u64);
            p.seconds_left = v.get("estimatedSecondsLeft").and_then(Value::as_u64);
            if let Some(types) = v.get("types").and_then(Value::as_object) {
                for (t, c) in types {
                    let (Some(done), Some(total)) =
                        (c.get("done").and_then(Value::as_u64), c.get("total").and_then(Value::as_u64))
                    else {
                        continue;
                    };
                    p.types.push((t.clone(), done, total));
                }
            }
        }
        if p.percent.is_none()
            && let Some(text) = x_progress
        {
            p.percent = percent_in(text);
        }
        p
    }
}

/// The first `NN%` (or `NN.N%`) in a text.
fn percent_in(text: &str) -> Option<f64> {
    let end = text.find('%')?;
    let start = text[..end].rfind(|c: char| !(c.is_ascii_digit() || c == '.')).map_or(0, |i| i + 1);
    text[start..end].parse().ok()
}

/// Something that happened during an export, for display.
#[derive(Debug, Clone)]
pub enum Event {
    /// The kick-off was accepted; the export's status URL.
    KickedOff {
        /// The status URL (`Content-Location`).
        status_url: String,
    },
    /// The export is still running.
    Running(ServerProgress),
    /// Waiting before the next status request.
    Waiting {
        /// How long.
        wait: Duration,
        /// The server answered 429 (polled too fast).
        throttled: bool,
    },
    /// A manifest (page) arrived.
    Manifest {
        /// New files listed on it.
        new_files: usize,
        /// Whether the export is complete (`false`: a partial manifest of a running export).
        complete: bool,
    },
    /// A download starts (or starts again).
    FileStarted {
        /// The file's path relative to the output folder.
        name: String,
        /// Its size, when the manifest gives it.
        size: Option<u64>,
        /// Bytes already on disk from an earlier, interrupted download.
        resumed_from: u64,
    },
    /// Bytes of a file arrived.
    FileBytes {
        /// The file.
        name: String,
        /// How many arrived now.
        bytes: u64,
    },
    /// A download failed and will be tried again.
    FileRetry {
        /// The file.
        name: String,
        /// What went wrong.
        error: String,
        /// The wait before the next try.
        wait: Duration,
    },
    /// A file is downloaded and verified.
    FileDone {
        /// The file.
        name: String,
        /// Its size.
        bytes: u64,
        /// Its resources (lines, less `organizeOutputBy` headers).
        count: u64,
        /// It was already complete on disk.
        skipped: bool,
    },
}

/// Receives [`Event`]s. Called from several tasks at once.
pub trait Reporter: Send + Sync {
    /// One event.
    fn event(&self, event: Event);
}

/// A reporter that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReport;

impl Reporter for NoReport {
    fn event(&self, _: Event) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sluice_progress_and_x_progress() {
        let body = br#"{"status":"in-progress","percent":42,"done":420,"total":1000,
            "types":{"Patient":{"done":100,"total":100},"Observation":{"done":320,"total":900}},
            "estimatedSecondsLeft":3}"#;
        let p = ServerProgress::parse(Some("in-progress: 42%"), body);
        assert_eq!(p.percent, Some(42.0));
        assert_eq!((p.done, p.total, p.seconds_left), (Some(420), Some(1000), Some(3)));
        assert_eq!(p.types, vec![("Patient".into(), 100, 100), ("Observation".into(), 320, 900)]);
        let p = ServerProgress::parse(Some("running: 12.5% of types"), b"");
        assert_eq!(p.percent, Some(12.5));
        assert_eq!(ServerProgress::parse(Some("working"), b"").percent, None);
    }
}
