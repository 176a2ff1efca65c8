//! A real bulk client, unmodified: smart-fetch (PyPI) against the real `sluice serve`.
//! A system export, a group export, and a group export with `--type-filter`, each must exit
//! 0 with exactly the data set's resources per type, every line as loaded apart from
//! `meta.versionId` / `meta.lastUpdated`.
//!
//! smart-fetch is found through `SLUICE_TEST_SMART_FETCH` (the path of its executable, as
//! `.ci/run` sets it after installing the pinned versions of `.ci/smart-fetch-requirements.txt`
//! into a virtual environment) or as `smart-fetch` on the `PATH`. Without it the tests print
//! a skip notice; with `CI=true` they fail.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The types smart-fetch asks for when given no `--type` (its default list).
const SMART_FETCH_TYPES: [&str; 15] = [
    "AllergyIntolerance",
    "Condition",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "EpisodeOfCare",
    "Immunization",
    "MedicationDispense",
    "MedicationRequest",
    "Observation",
    "Patient",
    "Procedure",
    "ServiceRequest",
    "Specimen",
];

/// The smart-fetch executable, or `None` (after a notice) when it is not installed.
fn smart_fetch() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_TEST_SMART_FETCH") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|d| d.join("smart-fetch")).find(|p| p.is_file()))
        .unwrap_or_default();
    if on_path.is_none() {
        let notice = "smart-fetch is not installed (set SLUICE_TEST_SMART_FETCH or put it on the PATH; \
                      .ci/run installs it from .ci/smart-fetch-requirements.txt)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{notice}");
        eprintln!("SKIPPED: {notice}");
    }
    on_path
}

/// Runs `smart-fetch bulk --fhir-url <server> <args> <out>` (bounded by `timeout`) and
/// returns what it wrote: per type, the lines of its `<Type>.<n>.ndjson.gz` files.
fn run(bin: &Path, srv: &Server, args: &[&str]) -> Files {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("export");
    let run = Command::new("timeout")
        .arg("300")
        .arg(bin)
        .args(["bulk", "--fhir-url", &srv.fhir("")])
        .args(args)
        .arg(&dir)
        .output()
        .expect("running smart-fetch");
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "smart-fetch {args:?} failed ({}):\n{stdout}\n{stderr}", run.status);
    assert!(!stdout.contains("Skipping"), "smart-fetch skipped a type:\n{stdout}");
    let mut files = Files::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".ndjson.gz") else { continue };
        let t = stem.split('.').next().unwrap().to_string();
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
        files.entry(t).or_default().extend(text.lines().map(String::from));
    }
    files
}

/// The data set's resources of `types` among `expected`.
fn only(expected: Expected, types: &[&str]) -> Expected {
    expected.into_iter().filter(|(t, _)| types.contains(&t.as_str())).collect()
}

/// What smart-fetch wrote is `expected`: first the counts per type (a readable first
/// comparison), then every line.
fn assert_fetched(files: &Files, expected: &Expected) {
    let got: BTreeMap<&str, usize> = files.iter().map(|(t, lines)| (t.as_str(), lines.len())).collect();
    let want: BTreeMap<&str, usize> =
        expected.iter().filter(|(_, ids)| !ids.is_empty()).map(|(t, ids)| (t.as_str(), ids.len())).collect();
    assert_eq!(got, want, "resources per type");
    check_content(files, expected);
}

#[test]
fn smart_fetch_system_export() {
    let Some(bin) = smart_fetch() else { return };
    let srv = Server::loaded(&[]);
    let files = run(&bin, &srv, &["--no-default-filters"]);
    let expected = only(reference().all(), &SMART_FETCH_TYPES);
    assert_fetched(&files, &expected);
}

#[test]
fn smart_fetch_group_export() {
    let Some(bin) = smart_fetch() else { return };
    let srv = Server::loaded(&[]);
    let files = run(&bin, &srv, &["--group", GROUP_ID, "--no-default-filters"]);
    // Every patient is a member. Device is outside the R4 Patient compartment: named in
    // smart-fetch's `_type`, it is exported whole (D8).
    let mut expected = only(reference().all_compartments(), &SMART_FETCH_TYPES);
    expected.extend(reference().types(&["Device"]));
    assert_fetched(&files, &expected);
}

/// A `--type-filter` with a comma and `|` in its value (smart-fetch encodes them twice),
/// checked against the Observations whose codes the filter names, read from the data set.
#[test]
fn smart_fetch_type_filter() {
    let Some(bin) = smart_fetch() else { return };
    let srv = Server::loaded(&[]);
    let codes = ["8302-2", "29463-7"]; // body height, body weight
    let filter = format!("Observation?code=http://loinc.org|{},http://loinc.org|{}", codes[0], codes[1]);
    let files = run(&bin, &srv, &["--group", GROUP_ID, "--type", "Patient,Observation", "--type-filter", &filter]);
    let mut expected = only(reference().all_compartments(), &["Patient", "Observation"]);
    expected.get_mut("Observation").unwrap().retain(|_, line| {
        let v: Value = serde_json::from_str(line).unwrap();
        v["code"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["system"] == "http://loinc.org" && codes.iter().any(|code| c["code"] == *code))
    });
    assert!(expected["Observation"].len() > 100, "the filter selects some Observations");
    assert_fetched(&files, &expected);
}
