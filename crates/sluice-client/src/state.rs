//! `--since-last`: each source's last `transactionTime`, kept in the output folder.

use crate::error::Error;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The state file's name in the output folder.
pub const STATE_FILE: &str = ".sluice-export-state.json";

/// The `--since-last` state of an output folder: per source (the kick-off URL without its
/// query: base URL, level and group), the `transactionTime` of the last export of it that
/// completed with every file downloaded and verified.
///
/// The file is JSON: `{"version": 1, "sources": {"<source>": {"transactionTime": "..",
/// "request": "..", "savedAt": ".."}}}`; it is replaced atomically (written beside, then
/// renamed).
#[derive(Debug, Clone)]
pub struct SinceLast {
    path: PathBuf,
    doc: Value,
}

impl SinceLast {
    /// Reads the state of folder `dir` (empty when there is none yet).
    pub fn load(dir: &Path) -> Result<SinceLast, Error> {
        let path = dir.join(STATE_FILE);
        let doc = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
                .ok()
                .filter(|d| d.get("sources").is_some_and(Value::is_object))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "{} is not a sluice export state file; remove it to start over",
                        path.display()
                    ))
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({"version": 1, "sources": {}}),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
        };
        Ok(SinceLast { path, doc })
    }

    /// The source key of a kick-off or `request` URL: the URL without its query.
    pub fn source_of(url: &str) -> String {
        url.split(['?', '#']).next().unwrap_or(url).to_string()
    }

    /// The last `transactionTime` recorded for `source`.
    pub fn last(&self, source: &str) -> Option<String> {
        self.doc["sources"].get(source)?.get("transactionTime")?.as_str().map(str::to_string)
    }

    /// Records `transaction_time` for `source` and saves the file.
    pub fn record(&mut self, source: &str, transaction_time: &str, request: &str) -> Result<(), Error> {
        let now =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        self.doc["sources"][source] = json!({"transactionTime": transaction_time, "request": request, "savedAt": now});
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&self.doc).expect("JSON");
        std::fs::write(&tmp, text).map_err(Error::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &self.path).map_err(Error::io(format!("writing {}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_per_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SinceLast::load(dir.path()).unwrap();
        let src = SinceLast::source_of("http://h/fhir/Patient/$export?_type=Patient");
        assert_eq!(src, "http://h/fhir/Patient/$export");
        assert_eq!(s.last(&src), None);
        s.record(&src, "2026-01-01T00:00:00Z", "http://h/fhir/Patient/$export").unwrap();
        let s = SinceLast::load(dir.path()).unwrap();
        assert_eq!(s.last(&src).as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(s.last("http://h/fhir/$export"), None);
        std::fs::write(dir.path().join(STATE_FILE), "[]").unwrap();
        assert!(matches!(SinceLast::load(dir.path()), Err(Error::Usage(_))));
    }
}
