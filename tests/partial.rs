//! `allowPartialManifests=true` (Bulk Data IG v3): while an export runs, a status request may
//! answer 202 with a manifest of the files finished so far; manifests come in pages linked by
//! `link` (`relation: next`); a page never changes once served, except for its link and
//! re-signed URLs; every page carries the same `transactionTime`, `request`, `error`.
//!
//! The exports are slowed down (`--throttle-ms`) and split into many small files
//! (`--max-file-resources`), so files finish one after another while the test polls; the
//! polling itself waits the server's `Retry-After`, as a client does.

mod common;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A slow export into many small files.
const SLOW: &[&str] = &["--throttle-ms", "100", "--max-file-resources", "400", "--batch-bytes", "524288"];

/// One manifest file entry as a user compares it across polls: the object (URL without its
/// signature), its count and its checksum.
type Entry = (String, u64, String);

fn entries(m: &Value, key: &str) -> Vec<Entry> {
    m[key]
        .as_array()
        .unwrap_or_else(|| panic!("manifest {key} is not an array: {m}"))
        .iter()
        .map(|e| {
            let url = e["url"].as_str().expect("url");
            (
                url.split('?').next().unwrap_or(url).to_string(),
                e["count"].as_u64().expect("count"),
                e["extension"]["sha256"].as_str().expect("sha256").to_string(),
            )
        })
        .collect()
}

/// The fields every page of an export shares.
fn shared(m: &Value) -> Value {
    serde_json::json!({
        "transactionTime": m["transactionTime"],
        "request": m["request"],
        "requiresAccessToken": m["requiresAccessToken"],
        "error": entries(m, "error"),
    })
}

/// Downloads each listed file and checks its size and SHA-256 against the entry: a file in a
/// partial manifest is complete and final.
fn check_downloads(m: &Value) {
    for e in m["output"].as_array().expect("output") {
        let url = e["url"].as_str().expect("url");
        let r = get(url);
        assert_eq!(r.status, 200, "GET {url} listed in a partial manifest: {}", r.text());
        assert_eq!(Some(r.body.len() as u64), e["extension"]["size"].as_u64(), "size of {url}");
        assert_eq!(hex::encode(Sha256::digest(&r.body)), e["extension"]["sha256"], "sha256 of {url}");
    }
}

/// Reads an export page by page as a client does: polls a page (waiting `Retry-After`) until
/// it links to a next page or the export is complete, follows the link, and so on. Returns
/// every page's last response body, and how many 202 responses carried a partial manifest.
/// Checks on the way that a page never loses or changes a file once served, and that running
/// pages' files are complete.
fn read_pages(status_url: &str, separate: bool) -> (Vec<Value>, usize) {
    let mut pages: Vec<Value> = Vec::new();
    let mut partial_answers = 0;
    let mut url = status_url.to_string();
    let mut first_seen: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    let mut polls = 0;
    loop {
        polls += 1;
        assert!(polls < 2000, "too many polls of {url}");
        let r = get(&url);
        let running = if separate {
            assert_eq!(r.status, 200, "separate-export-status: status requests answer 200: {}", r.text());
            match r.header("x-export-status") {
                Some(s) if s.starts_with("202") => true,
                Some(s) if s.starts_with("200") => false,
                other => panic!("X-Export-Status {other:?}"),
            }
        } else {
            match r.status {
                202 | 429 => true,
                200 => false,
                s => panic!("status {s}: {}", r.text()),
            }
        };
        let body: Option<Value> = (r.status != 429).then(|| r.json());
        let manifest = body.filter(|b| b.get("output").is_some());
        if let Some(m) = &manifest {
            assert_eq!(r.media_type(), "application/json");
            assert!(r.header("expires").is_some_and(is_http_date), "a manifest page has Expires");
            let files = entries(m, "output");
            if let Some(before) = first_seen.get(&url) {
                assert_eq!(&files, before, "page {url} changed after it was served");
            } else {
                first_seen.insert(url.clone(), files);
            }
            if running {
                partial_answers += 1;
                check_downloads(m);
            }
        }
        let next = manifest.as_ref().and_then(|m| m["link"].as_array()).map(|links| {
            assert_eq!(links.len(), 1, "one link: {links:?}");
            assert_eq!(links[0]["relation"], "next");
            links[0]["url"].as_str().expect("link url").to_string()
        });
        match (manifest, next, running) {
            (Some(m), Some(next), _) => {
                pages.push(m);
                url = next;
            }
            (Some(m), None, false) => {
                pages.push(m);
                return (pages, partial_answers);
            }
            (None, _, false) => panic!("a finished export answered without a manifest: {}", r.text()),
            _ => std::thread::sleep(Duration::from_secs(r.retry_after())),
        }
    }
}

/// A slow system export with partial manifests: files are listed while the export runs,
/// downloadable and final; pages never change and share their common fields; following the
/// links from the status URL reaches every file exactly once, and the files hold exactly the
/// data set. Re-reading the pages after completion gives the same files.
#[test]
fn partial_manifests_list_files_as_they_finish_and_page_through_all_of_them() {
    let server = Server::loaded(SLOW);
    let url = server.fhir("/$export?allowPartialManifests=true");
    let status = kickoff(&server, &url);
    let (pages, partial_answers) = read_pages(&status, false);
    assert!(partial_answers > 0, "no 202 carried a partial manifest");
    assert!(pages.len() > 1, "a slow export with many files has several pages");
    let first = shared(&pages[0]);
    assert_eq!(pages[0]["request"], url.as_str());
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(shared(p), first, "page {} shares the manifest's fields", i + 1);
        assert!(p.get("deleted").is_none(), "no deleted array without _since");
    }
    for (i, p) in pages.iter().enumerate().skip(1) {
        let want = format!("{status}?page={}", i + 1);
        assert_eq!(pages[i - 1]["link"][0]["url"], want.as_str(), "page {i} links to page {}", i + 1);
        assert!(!entries(p, "output").is_empty() || i == pages.len() - 1, "only the last page may be empty");
    }
    assert!(pages.last().unwrap().get("link").is_none(), "the last page has no link");

    // Every file once, and all of them together: exactly the data set.
    let mut all = Vec::new();
    let mut seen = BTreeSet::new();
    for p in &pages {
        for e in p["output"].as_array().unwrap() {
            let (key, _, _) = &entries(&serde_json::json!({"output": [e]}), "output")[0];
            assert!(seen.insert(key.clone()), "{key} is listed on two pages");
            all.push(e.clone());
        }
    }
    let files = download_entries(&Value::Array(all));
    check_content(&files, &reference().all());

    // After completion every page answers 200 with the same files.
    for (i, p) in pages.iter().enumerate() {
        let page_url = if i == 0 { status.clone() } else { format!("{status}?page={}", i + 1) };
        let r = get(&page_url);
        assert_eq!(r.status, 200, "{page_url}: {}", r.text());
        assert_eq!(entries(&r.json(), "output"), entries(p, "output"), "{page_url} after completion");
    }

    // Pages that don't exist, and page numbers that aren't numbers.
    let r = get(&format!("{status}?page={}", pages.len() + 1));
    assert_outcome(&r, 404, &["no manifest page"]);
    assert_outcome(&get(&format!("{status}?page=0")), 400, &["page '0'"]);
    assert_outcome(&get(&format!("{status}?page=two")), 400, &["page 'two'"]);
}

/// `separate-export-status` with partial manifests: running pages answer 200 with
/// `X-Export-Status: 202 Accepted` and the manifest body, and links keep the preference.
/// With `_since`, every page has a `deleted` array.
#[test]
fn partial_manifests_with_separate_export_status_and_since() {
    let server = Server::loaded(SLOW);
    let url = server.fhir("/Patient/$export?allowPartialManifests=true&_since=2000-01-01T00:00:00Z");
    let r = send("GET", &url, &[("prefer", "respond-async, separate-export-status")], None);
    let status = assert_accepted(&r, &server);
    assert!(status.ends_with("?prefer=separate-export-status"), "{status}");
    let (pages, partial_answers) = read_pages(&status, true);
    assert!(partial_answers > 0, "no running answer carried a partial manifest");
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(p["deleted"], serde_json::json!([]), "page {}: nothing was deleted", i + 1);
        if let Some(link) = p["link"][0]["url"].as_str() {
            assert!(link.ends_with(&format!("?page={}&prefer=separate-export-status", i + 2)), "{link}");
        }
    }
    let all: Vec<Value> = pages.iter().flat_map(|p| p["output"].as_array().unwrap().clone()).collect();
    check_content(&download_entries(&Value::Array(all)), &reference().all_compartments());
}

/// Without `allowPartialManifests`, a running export's 202 carries no manifest, the complete
/// manifest has no link, and there is no page 2.
#[test]
fn without_the_parameter_there_is_one_manifest() {
    let server = Server::loaded(&["--max-file-resources", "400"]);
    let url = server.fhir("/$export?_type=Patient,Condition");
    let status = kickoff(&server, &url);
    let r = get(&status);
    if r.status == 202 {
        assert!(r.json().get("output").is_none(), "a 202 without allowPartialManifests lists no files");
    }
    let m = complete_manifest(&poll_until_done(&status), &url);
    assert!(m.get("link").is_none());
    assert_eq!(m["output"].as_array().unwrap().len(), 3, "Patient, Condition and Condition-2");
    assert_outcome(&get(&format!("{status}?page=2")), 404, &["was not started with allowPartialManifests"]);
    assert_eq!(get(&format!("{status}?page=1")).status, 200);
}
