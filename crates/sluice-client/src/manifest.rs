//! Manifests: pages merged into one, entries given safe local names.

use crate::error::Error;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// The manifest arrays that list files, and the folder each one's files go to.
pub(crate) const LISTS: [(&str, &str); 3] = [("output", ""), ("error", "error/"), ("deleted", "deleted/")];

/// One file to download.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Its URL (signed URLs change between pages and polls; the latest is kept).
    pub url: String,
    /// Its path relative to the output folder (`Patient.ndjson`, `error/x.ndjson`).
    pub name: String,
    /// `count`.
    pub count: Option<u64>,
    /// `extension.size`.
    pub size: Option<u64>,
    /// `extension.sha256` (lowercase hex).
    pub sha256: Option<String>,
}

/// Every page seen so far, merged; files listed twice (a page polled again) count once.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    head: Map<String, Value>,
    lists: [Vec<Value>; 3],
    has_deleted: bool,
    /// URL without query -> local name.
    seen: HashMap<String, String>,
    /// Local names taken (lowercase, for case-insensitive file systems).
    taken: HashSet<String>,
}

impl Merged {
    /// Adds a manifest page; returns the files it lists that were not listed before.
    pub fn add_page(&mut self, page: &Value) -> Result<Vec<Entry>, Error> {
        let obj = page.as_object().ok_or_else(|| Error::Protocol("the manifest is not a JSON object".into()))?;
        for (k, v) in obj {
            if !matches!(k.as_str(), "output" | "error" | "deleted" | "link") {
                self.head.insert(k.clone(), v.clone());
            }
        }
        if obj.get("output").is_none_or(|o| !o.is_array()) {
            return Err(Error::Protocol("the manifest has no 'output' array".into()));
        }
        let mut new = Vec::new();
        for (i, (list, dir)) in LISTS.iter().enumerate() {
            let Some(entries) = obj.get(*list).and_then(Value::as_array) else { continue };
            if *list == "deleted" {
                self.has_deleted = true;
            }
            for e in entries {
                let url = e
                    .get("url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::Protocol(format!("a manifest '{list}' entry without a url: {e}")))?;
                let key = url.split(['?', '#']).next().unwrap_or(url).to_string();
                if self.seen.contains_key(&key) {
                    continue;
                }
                let name = self.name_for(dir, &key);
                self.seen.insert(key, name.clone());
                let mut local = e.clone();
                local["url"] = Value::String(name.clone());
                self.lists[i].push(local);
                let ext = e.get("extension");
                new.push(Entry {
                    url: url.to_string(),
                    name,
                    count: e.get("count").and_then(Value::as_u64),
                    size: ext.and_then(|x| x.get("size")).and_then(Value::as_u64),
                    sha256: ext.and_then(|x| x.get("sha256")).and_then(Value::as_str).map(|s| s.to_ascii_lowercase()),
                });
            }
        }
        Ok(new)
    }

    /// The manifest's `transactionTime`.
    pub fn transaction_time(&self) -> Option<&str> {
        self.head.get("transactionTime").and_then(Value::as_str)
    }

    /// The manifest's `request`.
    pub fn request(&self) -> Option<&str> {
        self.head.get("request").and_then(Value::as_str)
    }

    /// Whether downloads need the bearer token.
    pub fn requires_token(&self) -> bool {
        self.head.get("requiresAccessToken").and_then(Value::as_bool).unwrap_or(false)
    }

    /// Whether files are organized by patient (their counts leave out the block headers).
    pub fn organized(&self) -> bool {
        self.head.contains_key("outputOrganizedBy")
    }

    /// Files in each list: output, error, deleted.
    pub fn counts(&self) -> [usize; 3] {
        [self.lists[0].len(), self.lists[1].len(), self.lists[2].len()]
    }

    /// The merged manifest as saved: the first page's fields, every file once, each `url`
    /// replaced by the file's path relative to the folder.
    pub fn to_json(&self) -> Value {
        let mut m = self.head.clone();
        m.insert("output".into(), Value::Array(self.lists[0].clone()));
        m.insert("error".into(), Value::Array(self.lists[1].clone()));
        if self.has_deleted {
            m.insert("deleted".into(), Value::Array(self.lists[2].clone()));
        }
        Value::Object(m)
    }

    /// A free local name in `dir` for the file at `url` (its last path segment, made safe).
    fn name_for(&mut self, dir: &str, url: &str) -> String {
        let last = url.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
        let mut base: String =
            last.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
        if base.trim_matches('.').is_empty() || base == STATE || base == "manifest.json" || base.ends_with(".part") {
            base = format!("file-{base}");
        }
        let (stem, ext) = match base.find('.') {
            Some(0) | None => (base.clone(), String::new()),
            Some(i) => (base[..i].to_string(), base[i..].to_string()),
        };
        let mut n = 1;
        loop {
            let name = if n == 1 { format!("{dir}{stem}{ext}") } else { format!("{dir}{stem}~{n}{ext}") };
            if self.taken.insert(name.to_ascii_lowercase()) {
                return name;
            }
            n += 1;
        }
    }
}

const STATE: &str = crate::state::STATE_FILE;

/// The `next` link of a manifest page.
pub(crate) fn next_link(page: &Value) -> Option<String> {
    page.get("link")?
        .as_array()?
        .iter()
        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))?
        .get("url")?
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pages_merge_and_names_are_safe_and_unique() {
        let mut m = Merged::default();
        let p1 = json!({"transactionTime": "t", "request": "r", "requiresAccessToken": false,
            "output": [{"type": "Patient", "url": "http://h/f/a/Patient.ndjson?sig=1", "count": 2,
                        "extension": {"size": 10, "sha256": "AB"}},
                       {"type": "Patient", "url": "http://h/f/b/Patient.ndjson", "count": 1}],
            "error": [{"type": "OperationOutcome", "url": "http://h/f/a/..", "count": 1}],
            "link": [{"relation": "next", "url": "http://h/s?page=2"}]});
        let new = m.add_page(&p1).unwrap();
        let names: Vec<&str> = new.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["Patient.ndjson", "Patient~2.ndjson", "error/file-.."]);
        assert_eq!(new[0].sha256.as_deref(), Some("ab"));
        assert_eq!(next_link(&p1).as_deref(), Some("http://h/s?page=2"));
        // The same files again (fresh signatures), and a new one.
        let p2 = json!({"transactionTime": "t", "output": [
            {"type": "Patient", "url": "http://h/f/a/Patient.ndjson?sig=2", "count": 2},
            {"url": "http://h/f/a/%2e%2e%2fx.ndjson", "count": 2}], "error": []});
        let new = m.add_page(&p2).unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].name, "_2e_2e_2fx.ndjson");
        let saved = m.to_json();
        assert_eq!(saved["output"][0]["url"], "Patient.ndjson");
        assert_eq!(saved["output"].as_array().unwrap().len(), 3);
        assert!(saved.get("deleted").is_none() && saved.get("link").is_none());
        assert_eq!(m.counts(), [3, 1, 0]);
    }
}
