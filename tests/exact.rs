//! D17: every resource comes out exactly as it went in. Digits, trailing zeros, numbers
//! beyond 64 bits, `-0.0`, string escapes (`\u2028`, `\"`, surrogate pairs), non-BMP
//! characters and member order survive every write path and every export path; only
//! `meta.versionId` and `meta.lastUpdated` change (and, with `_elements`, the dropped
//! elements and the `SUBSETTED` tag).
//!
//! The comparisons use `common::exact`, which compares the written text of every scalar and
//! never goes through `f64`.

mod common;

use common::exact::{Exact, assert_same_resource};
use common::*;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// The hand-written edge cases: one resource per line, ids `edge-*`.
const EDGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/exact-edge-cases.ndjson");

/// `(type, id, line)` of every edge case.
fn edge_cases() -> Vec<(String, String, String)> {
    std::fs::read_to_string(EDGE)
        .expect("the edge-case file")
        .lines()
        .map(|line| {
            let v = Exact::parse(line, "an edge case");
            let t = v.get("resourceType").and_then(Exact::as_str).expect("resourceType");
            let id = v.get("id").and_then(Exact::as_str).expect("id");
            (t, id, line.to_string())
        })
        .collect()
}

/// What a system export holds after the edge cases were written (with `rename` applied to
/// each line).
fn edge_expected(rename: impl Fn(&str) -> String) -> Expected {
    let mut out = Expected::new();
    for (t, _, line) in edge_cases() {
        let line = rename(&line);
        let id = Exact::parse(&line, "an edge case").get("id").and_then(Exact::as_str).unwrap();
        out.entry(t).or_default().insert(id, Cow::Owned(line));
    }
    out
}

/// Runs `sluice load` with `args` into `dir`.
fn load(dir: &Path, args: &[&std::ffi::OsStr]) {
    let out = sluice().arg("load").args(store_args(dir)).args(args).output().expect("running sluice load");
    assert!(out.status.success(), "sluice load failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A system export of everything, as plain ndjson.
fn export_all(srv: &Server, format: &str) -> Files {
    let url = with_query(&srv.fhir("/$export"), &[("_outputFormat", format)]);
    download_all(&export(srv, &url))
}

/// `GET /fhir/<type>/<id>` of every expected resource answers it exactly.
fn check_reads(srv: &Server, expected: &Expected) {
    for (t, ids) in expected {
        for (id, want) in ids {
            let r = get(&srv.fhir(&format!("/{t}/{id}")));
            assert_eq!(r.status, 200, "GET {t}/{id}: {}", r.text());
            assert_same_resource(&r.text(), want, &format!("GET {t}/{id}"));
        }
    }
}

/// The edge cases as a transaction or batch Bundle of PUTs, pretty-printed (whitespace
/// between tokens is the one thing a server may drop). Each resource is pasted in as
/// written, so its numbers and escapes reach the server unchanged.
fn bundle_text(kind: &str) -> String {
    let entries: Vec<String> = edge_cases()
        .iter()
        .map(|(t, id, line)| {
            format!(
                "    {{\n      \"fullUrl\": \"urn:uuid:{id}\",\n      \"resource\": {line},\n      \"request\": {{ \"method\": \"PUT\", \"url\": \"{t}/{id}\" }}\n    }}"
            )
        })
        .collect();
    format!(
        "{{\n  \"resourceType\": \"Bundle\",\n  \"type\": \"{kind}\",\n  \"entry\": [\n{}\n  ]\n}}\n",
        entries.join(",\n")
    )
}

/// Every write path keeps numbers, strings and member order exactly: `sluice load` of
/// ndjson, ndjson.gz and a Bundle file, `--copies`, REST PUT and POST, batch and
/// transaction Bundles. Each is checked through a system export and `GET`.
#[test]
fn every_write_path_keeps_resources_exactly() {
    let files = tempfile::tempdir().unwrap();
    let gz = files.path().join("edge.ndjson.gz");
    let mut enc = GzEncoder::new(std::fs::File::create(&gz).unwrap(), Compression::default());
    enc.write_all(&std::fs::read(EDGE).unwrap()).unwrap();
    enc.finish().unwrap();
    let bundle = files.path().join("edge-bundle.json");
    std::fs::write(&bundle, bundle_text("transaction")).unwrap();

    let same = |l: &str| l.to_string();
    for (what, path) in [("ndjson", PathBuf::from(EDGE)), ("ndjson.gz", gz.clone()), ("Bundle file", bundle.clone())] {
        let dir = empty_dir();
        load(dir.path(), &[path.as_os_str()]);
        let srv = Server::start(dir, &[]);
        let expected = edge_expected(same);
        check_content(&export_all(&srv, "application/fhir+ndjson"), &expected);
        check_reads(&srv, &expected);
        eprintln!("load of {what}: exact");
    }

    // --copies 2: the original and a copy whose ids and references carry the prefix c1-.
    let dir = empty_dir();
    load(dir.path(), &["--copies".as_ref(), "2".as_ref(), EDGE.as_ref()]);
    let srv = Server::start(dir, &[]);
    let mut expected = edge_expected(same);
    for (t, ids) in edge_expected(|l| l.replace("edge-", "c1-edge-")) {
        expected.entry(t).or_default().extend(ids);
    }
    check_content(&export_all(&srv, "application/fhir+ndjson"), &expected);

    // REST: PUT each line as it is, and batch and transaction Bundles of PUTs.
    let srv = Server::empty(&[]);
    for (t, id, line) in edge_cases() {
        let r = send(
            "PUT",
            &srv.fhir(&format!("/{t}/{id}")),
            &[("content-type", "application/fhir+json")],
            Some(line.as_bytes()),
        );
        assert!(r.status == 201, "PUT {t}/{id}: {} {}", r.status, r.text());
        assert_same_resource(&r.text(), &line, &format!("the PUT {t}/{id} response"));
    }
    let expected = edge_expected(same);
    check_content(&export_all(&srv, "application/fhir+ndjson"), &expected);
    check_reads(&srv, &expected);
    for kind in ["batch", "transaction"] {
        let srv = Server::empty(&[]);
        let body = bundle_text(kind);
        let r = send("POST", &srv.fhir(""), &[("content-type", "application/fhir+json")], Some(body.as_bytes()));
        assert_eq!(r.status, 200, "POST {kind}: {}", r.text());
        check_content(&export_all(&srv, "application/fhir+ndjson"), &expected);
        check_reads(&srv, &expected);
    }

    // POST: a new id in place of the given one, everything else as sent.
    let srv = Server::empty(&[]);
    let (t, id, line) = edge_cases().into_iter().next().unwrap();
    let r =
        send("POST", &srv.fhir(&format!("/{t}")), &[("content-type", "application/fhir+json")], Some(line.as_bytes()));
    assert_eq!(r.status, 201, "POST {t}: {}", r.text());
    let new_id = Exact::parse(&r.text(), "the POST response").get("id").and_then(Exact::as_str).unwrap();
    assert_ne!(new_id, id);
    let want = line.replace(&format!("\"id\":\"{id}\""), &format!("\"id\":\"{new_id}\""));
    assert_same_resource(&r.text(), &want, "the POST response");
    let got = get(&srv.fhir(&format!("/{t}/{new_id}")));
    assert_same_resource(&got.text(), &want, "GET after POST");
}

/// Every export path copies the stored resources exactly: ndjson.gz, patient and group
/// level, `_typeFilter`, `_elements` (kept elements), `organizeOutputBy=Patient` blocks
/// and `includeAssociatedData`.
#[test]
fn every_export_path_keeps_resources_exactly() {
    let dir = empty_dir();
    load(dir.path(), &[EDGE.as_ref()]);
    let srv = Server::start(dir, &[]);
    let all = edge_expected(|l| l.to_string());
    let pick = |keep: &[&str]| -> Expected {
        let mut out = Expected::new();
        for (t, ids) in &all {
            for (id, line) in ids {
                if keep.contains(&id.as_str()) {
                    out.entry(t.clone()).or_default().insert(id.clone(), line.clone());
                }
            }
        }
        out
    };

    check_content(&export_all(&srv, "ndjson.gz"), &all);

    let compartment = pick(&["edge-p1", "edge-o1", "edge-o2", "edge-o3", "edge-o4", "edge-eob1"]);
    check_content(&download_all(&export(&srv, &srv.fhir("/Patient/$export"))), &compartment);
    check_content(&download_all(&export(&srv, &srv.fhir("/Group/edge-g/$export"))), &compartment);

    let url =
        with_query(&srv.fhir("/$export"), &[("_type", "Observation"), ("_typeFilter", "Observation?status=final")]);
    check_content(&download_all(&export(&srv, &url)), &pick(&["edge-o1", "edge-o2", "edge-o4"]));

    // Quantities compare as exact decimals: 5.4000000000000001 is above 5.40 (as an f64 it
    // is not), and within the precision of eq5.40.
    for (filter, ids) in [
        ("Observation?value-quantity=gt5.40", ["edge-o1", "edge-o3", "edge-o4"].as_slice()),
        ("Observation?value-quantity=5.40", &["edge-o2", "edge-o3"]),
        ("Observation?value-quantity=le5.40&status=final", &["edge-o2"]),
    ] {
        let url = with_query(&srv.fhir("/$export"), &[("_type", "Observation"), ("_typeFilter", filter)]);
        check_content(&download_all(&export(&srv, &url)), &pick(ids));
    }

    let url = with_query(
        &srv.fhir("/$export"),
        &[("_type", "Observation"), ("includeAssociatedData", "LatestProvenanceResources")],
    );
    check_content(
        &download_all(&export(&srv, &url)),
        &pick(&["edge-o1", "edge-o2", "edge-o3", "edge-o4", "edge-prov"]),
    );

    // _elements: what is kept is kept exactly (Observation.code and .status are mandatory).
    let url = with_query(
        &srv.fhir("/$export"),
        &[("_type", "Observation,Patient"), ("_elements", "valueQuantity,extension")],
    );
    let files = download_all(&export(&srv, &url));
    for (t, lines) in &files {
        for line in lines {
            let mut got = Exact::parse(line, "a subsetted line");
            let id = got.get("id").and_then(Exact::as_str).unwrap();
            got.remove("meta");
            let Exact::Object(full) = Exact::parse(&all[t][&id], "an edge case") else { panic!() };
            let kept = ["resourceType", "id", "status", "code", "valueQuantity", "extension"];
            let want: Vec<(String, Exact)> = full.into_iter().filter(|(k, _)| kept.contains(&k.as_str())).collect();
            assert_eq!(got, Exact::Object(want), "{t}/{id} with _elements");
        }
    }

    // organizeOutputBy=Patient: the block's resources are the stored ones, and the count
    // counts resources, not the Parameters header (D18).
    let url = with_query(&srv.fhir("/Patient/$export"), &[("organizeOutputBy", "Patient")]);
    let status = kickoff(&srv, &url);
    let manifest = manifest_response(&poll_until_done(&status), &url);
    let mut resources = 0;
    let mut headers = 0;
    let mut counted = 0;
    for entry in manifest["output"].as_array().unwrap() {
        counted += entry["count"].as_u64().unwrap();
        let r = send("GET", entry["url"].as_str().unwrap(), &[], None);
        for line in r.text().lines() {
            let v = Exact::parse(line, "a block line");
            let t = v.get("resourceType").and_then(Exact::as_str).unwrap();
            if t == "Parameters" {
                headers += 1;
                continue;
            }
            let id = v.get("id").and_then(Exact::as_str).unwrap();
            assert_same_resource(line, &compartment[&t][&id], &format!("{t}/{id} in a patient block"));
            resources += 1;
        }
    }
    assert_eq!((headers, resources), (1, 6), "one block: a header and six resources");
    assert_eq!(counted, 6, "the manifest counts the resources, not the header line (D18)");
}

/// The four data sets in `../shared/data` (when present beside the repository).
fn shared_sets() -> Option<Vec<PathBuf>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    let sets = ["r4-100-patients-groups", "r4-615-patients", "r4-79-patients-hiv", "bulk-export-sample-10-patients"];
    let found: Vec<PathBuf> = sets.iter().map(|s| root.join(s)).filter(|p| p.is_dir()).collect();
    if found.len() == sets.len() {
        return Some(found);
    }
    let notice = format!("the shared data sets are not at {} (found {} of 4)", root.display(), found.len());
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{notice}; CI must have them");
    eprintln!("SKIPPED: {notice}");
    None
}

/// The resource files of a set (`<Type>.ndjson.gz` or `<Type>.<n>.ndjson.gz`; not its
/// `log.ndjson.gz`), and per type, per id, each line as written.
fn read_set(set: &Path) -> (Vec<PathBuf>, Expected) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(set)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.ends_with(".ndjson.gz") && name.starts_with(|c: char| c.is_ascii_uppercase())
        })
        .collect();
    files.sort();
    let mut expected = Expected::new();
    for file in &files {
        let reader = BufReader::new(flate2::read::MultiGzDecoder::new(std::fs::File::open(file).unwrap()));
        for line in reader.lines() {
            let line = line.unwrap();
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            let (t, id) = (v["resourceType"].as_str().unwrap().to_string(), v["id"].as_str().unwrap().to_string());
            // A set repeats no (type, id); were it to, the load keeps the last one.
            expected.entry(t).or_default().insert(id, Cow::Owned(line));
        }
    }
    (files, expected)
}

/// Every resource of every shared data set (about 281k lines) goes in with `sluice load`
/// and comes out of a system export exactly as written, apart from `meta.versionId` and
/// `meta.lastUpdated`, with per-type counts equal to the set's.
#[test]
fn every_shared_data_set_round_trips_exactly() {
    let Some(sets) = shared_sets() else { return };
    let mut total = 0;
    for set in sets {
        let (files, expected) = read_set(&set);
        let dir = empty_dir();
        let args: Vec<&std::ffi::OsStr> = files.iter().map(|f| f.as_os_str()).collect();
        load(dir.path(), &args);
        let srv = Server::start(dir, &[]);
        let exported = export_all(&srv, "application/fhir+ndjson");
        let counts: BTreeMap<&str, usize> = exported.iter().map(|(t, l)| (t.as_str(), l.len())).collect();
        let want: BTreeMap<&str, usize> = expected.iter().map(|(t, ids)| (t.as_str(), ids.len())).collect();
        assert_eq!(counts, want, "{}: resources per type", set.display());
        check_content(&exported, &expected);
        let n: usize = want.values().sum();
        eprintln!("{}: {n} resources exported exactly", set.display());
        total += n;
    }
    assert!(total > 270_000, "{total} resources in the four sets");
}
