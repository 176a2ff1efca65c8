//! `organizeOutputBy=Patient` (Bulk Data IG v3): output files of patient blocks, each a
//! `Parameters` header naming the patient followed by that patient's compartment, type by
//! type. Every block is checked line by line against the data set read from its files, with
//! the compartments computed by the harness's own table, never by Sluice's crates.

mod common;

use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

/// The header line of `patient`'s block, byte for byte as the IG shows it.
fn header(patient: &str) -> String {
    format!(
        r#"{{"resourceType":"Parameters","parameter":[{{"name":"header","valueReference":{{"reference":"Patient/{patient}"}}}}]}}"#
    )
}

/// Asserts a completed export organized by patient: 200 `application/json` with `Expires`,
/// an instant `transactionTime`, `request`, `requiresAccessToken: false`,
/// `outputOrganizedBy: Patient`, `output` entries with `url`, `count`, `size` and `sha256`
/// but no `type`, and typed `error` entries. Returns the manifest.
fn organized_manifest(r: &Resp, request_url: &str) -> Value {
    let m = manifest_response(r, request_url);
    assert_eq!(m["outputOrganizedBy"], "Patient", "outputOrganizedBy: {m}");
    for e in m["output"].as_array().unwrap_or_else(|| panic!("output is not an array: {m}")) {
        assert!(e.get("type").is_none(), "a file of patient blocks holds several types: no type, got {e}");
        let url = e["url"].as_str().unwrap_or_else(|| panic!("output entry without url: {e}"));
        assert!(url.starts_with("http://"), "url is not absolute: {url}");
        assert!(e["count"].is_u64(), "output entry without an integer count: {e}");
        assert!(e["extension"]["size"].is_u64(), "output entry without size: {e}");
        let sha = e["extension"]["sha256"].as_str().unwrap_or_else(|| panic!("output entry without sha256: {e}"));
        assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()), "sha256 {sha:?}");
    }
    for e in m["error"].as_array().unwrap_or_else(|| panic!("error is not an array: {m}")) {
        assert!(e["type"].is_string() && e["url"].is_string() && e["count"].is_u64(), "error entry: {e}");
    }
    m
}

/// Kicks off a GET export organized by patient (`url` carries the parameters), waits for
/// it and returns the status URL and its checked manifest.
fn organized_export(srv: &Server, url: &str) -> (String, Value) {
    let status = kickoff(srv, url);
    let m = organized_manifest(&poll_until_done(&status), url);
    (status, m)
}

/// A downloaded file of patient blocks.
struct BlockFile {
    name: String,
    lines: Vec<String>,
}

/// The file name of a manifest entry's URL.
fn file_name(e: &Value) -> String {
    let url = e["url"].as_str().expect("url");
    url.split('?').next().unwrap().rsplit('/').next().unwrap().to_string()
}

/// Downloads every `output` file as bulk clients do (`Accept-Encoding: gzip`): the files
/// are `patients.<ext>`, `patients-2.<ext>`, ... in manifest order, served as
/// `application/fhir+ndjson` (gzip bytes with `Content-Encoding: gzip` for `.ndjson.gz`);
/// the served bytes have the entry's size and SHA-256, and the file `count` resources: its
/// lines less the block headers (D18).
fn download_blocks(m: &Value, ext: &str) -> Vec<BlockFile> {
    let entries = m["output"].as_array().expect("output");
    let names: Vec<String> = entries.iter().map(file_name).collect();
    let want: Vec<String> = (1..=entries.len())
        .map(|n| if n == 1 { format!("patients.{ext}") } else { format!("patients-{n}.{ext}") })
        .collect();
    assert_eq!(names, want, "file names in manifest order");
    let mut files = Vec::new();
    for (e, name) in entries.iter().zip(names) {
        let url = e["url"].as_str().unwrap();
        let r = send("GET", url, &[("accept-encoding", "gzip")], None);
        assert_eq!(r.status, 200, "GET {name}: {}", r.text());
        assert_eq!(r.media_type(), "application/fhir+ndjson", "Content-Type of {name}");
        assert_eq!(e["extension"]["size"].as_u64(), Some(r.body.len() as u64), "size of {name}");
        let sha = hex::encode(Sha256::digest(&r.body));
        assert_eq!(e["extension"]["sha256"].as_str(), Some(sha.as_str()), "sha256 of {name}");
        let bytes = if ext == "ndjson.gz" {
            assert_eq!(r.header("content-encoding"), Some("gzip"), "Content-Encoding of {name}");
            assert!(r.body.starts_with(&[0x1f, 0x8b]), "{name} is not gzip data");
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&r.body[..])
                .read_to_end(&mut out)
                .unwrap_or_else(|e| panic!("gunzip {name}: {e}"));
            out
        } else {
            assert_eq!(r.header("content-encoding"), None, "{name} is plain ndjson");
            r.body
        };
        let text = String::from_utf8(bytes).unwrap_or_else(|_| panic!("{name} is not UTF-8"));
        assert!(text.ends_with('\n'), "{name}: empty, or its last line does not end with a newline");
        let lines: Vec<String> = text.lines().map(String::from).collect();
        let headers = lines.iter().filter(|l| l.starts_with(r#"{"resourceType":"Parameters""#)).count();
        assert!(headers > 0, "{name} has no block header");
        assert_eq!(
            Some((lines.len() - headers) as u64),
            e["count"].as_u64(),
            "count of {name}: resources, not header lines (D18)"
        );
        files.push(BlockFile { name, lines });
    }
    files
}

/// One patient's block: the index of its file, where its header is in that file, and the
/// lines after the header, parsed.
struct Block {
    patient: String,
    file: usize,
    at: usize,
    resources: Vec<Value>,
}

/// Splits the files into blocks, asserting their shape: every file starts with a header;
/// a header is exactly the IG's line; every block has at least one resource; no patient
/// has two blocks (in one file or in two); within a block `Patient` comes first, then the
/// other types in ascending name order.
fn blocks(files: &[BlockFile]) -> Vec<Block> {
    let mut out: Vec<Block> = Vec::new();
    let mut seen = BTreeSet::new();
    for (f, file) in files.iter().enumerate() {
        for (i, line) in file.lines.iter().enumerate() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{} line {i} is not JSON ({e}): {line}", file.name));
            if v["resourceType"] == "Parameters" {
                let reference = v["parameter"][0]["valueReference"]["reference"].as_str().unwrap_or_default();
                let patient = reference.strip_prefix("Patient/").unwrap_or_else(|| panic!("a header line: {line}"));
                assert_eq!(line, &header(patient), "{} line {i}: the header of Patient/{patient}", file.name);
                assert!(seen.insert(patient.to_string()), "Patient/{patient} has a second block ({})", file.name);
                out.push(Block { patient: patient.to_string(), file: f, at: i, resources: Vec::new() });
            } else {
                let block = out.last_mut().filter(|b| b.file == f);
                let block = block.unwrap_or_else(|| panic!("{} does not start with a block header: {line}", file.name));
                block.resources.push(v);
            }
        }
    }
    for b in &out {
        assert!(!b.resources.is_empty(), "the block of Patient/{} has a header and nothing else", b.patient);
        let order: Vec<(bool, &str)> = b
            .resources
            .iter()
            .map(|r| r["resourceType"].as_str().expect("resourceType"))
            .map(|t| (t != "Patient", t))
            .collect();
        assert!(order.is_sorted(), "the block of Patient/{}: Patient first, then types by name: {order:?}", b.patient);
    }
    out
}

/// What each patient's block should hold: per patient, per type, per id, the JSON.
type PerPatient = BTreeMap<String, Expected>;

/// Distributes `expected` (what a normal export with the same parameters holds) over the
/// blocks of `patients`: a resource is in the block of each of them whose compartment it is
/// in (by the harness's table), and a patient with nothing has no block.
fn by_patient(expected: &Expected, patients: &[&str]) -> PerPatient {
    let mut out = PerPatient::new();
    for (t, ids) in expected {
        for (id, json) in ids {
            let v: Value = serde_json::from_str(json).expect("expected JSON");
            let owners = compartment_patients(&v);
            let mut placed = false;
            for p in patients.iter().filter(|p| owners.contains(**p)) {
                out.entry(p.to_string()).or_default().entry(t.clone()).or_default().insert(id.clone(), json.clone());
                placed = true;
            }
            assert!(placed, "the expectation holds {t}/{id}, which is in no exported patient's compartment");
        }
    }
    out
}

/// The `(type, id)` pairs of a block's resources, asserting none repeats.
fn block_keys(b: &Block) -> BTreeSet<(String, String)> {
    let mut keys = BTreeSet::new();
    for r in &b.resources {
        let key = (r["resourceType"].as_str().unwrap().to_string(), r["id"].as_str().expect("id").to_string());
        assert!(keys.insert(key.clone()), "{}/{} twice in the block of Patient/{}", key.0, key.1, b.patient);
    }
    keys
}

/// Asserts the blocks are exactly `want`: the same patients, each block exactly its
/// resources, and every line equal to the expected resource once the server's
/// `meta.versionId` / `meta.lastUpdated` are removed (as [`check_content`] compares).
fn check_blocks(blocks: &[Block], want: &PerPatient) {
    let got: BTreeSet<&str> = blocks.iter().map(|b| b.patient.as_str()).collect();
    let wanted: BTreeSet<&str> = want.keys().map(String::as_str).collect();
    assert_eq!(got, wanted, "the patients with a block");
    for b in blocks {
        let expected = &want[&b.patient];
        let (have, should) = (block_keys(b), keys(expected));
        let extra: Vec<_> = have.difference(&should).take(5).collect();
        let missing: Vec<_> = should.difference(&have).take(5).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "block of Patient/{}: extra {extra:?}, missing {missing:?}",
            b.patient
        );
        for r in &b.resources {
            let (t, id) = (r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
            let mut v = r.clone();
            strip_server_meta(&mut v, &format!("{t}/{id}"));
            let want_v: Value = serde_json::from_str(&expected[t][id]).expect("expected JSON");
            assert!(v == want_v, "{t}/{id} in the block of Patient/{}\n exported: {v}\n expected: {want_v}", b.patient);
        }
    }
}

/// Keeps only `types` in an expectation.
fn only(mut expected: Expected, types: &[&str]) -> Expected {
    expected.retain(|t, _| types.contains(&t.as_str()));
    expected
}

/// Adds (or replaces) resources in an expectation.
fn expect(expected: &mut Expected, resources: &[&Value]) {
    for r in resources {
        let (t, id) = (r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
        expected.entry(t.into()).or_default().insert(id.into(), Cow::Owned(r.to_string()));
    }
}

/// PUTs resources, each new (201) or replacing one (200).
fn put_all(srv: &Server, resources: &[&Value]) {
    for r in resources {
        let url = srv.fhir(&format!("/{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap()));
        let resp = put_json(&url, r);
        assert!(resp.status == 200 || resp.status == 201, "PUT {url}: {}", resp.text());
    }
}

/// A Group of `patients`.
fn group(id: &str, patients: &[&str]) -> Value {
    let members: Vec<Value> =
        patients.iter().map(|p| json!({"entity": {"reference": format!("Patient/{p}")}})).collect();
    json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": members})
}

/// An Observation with `subject` and `performer` patients and one category code.
fn observation(id: &str, status: &str, category: &str, subject: &str, performer: &str) -> Value {
    json!({
        "resourceType": "Observation", "id": id, "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": category, "display": category}]}],
        "code": {"text": id},
        "subject": {"reference": format!("Patient/{subject}")},
        "performer": [{"reference": format!("Patient/{performer}")}],
    })
}

/// The lines of the manifest's `error` files: OperationOutcomes (files of type
/// `OperationOutcome`) whose issues are all warnings.
fn warnings(m: &Value) -> Vec<Value> {
    let files = download_entries(&m["error"]);
    assert_eq!(files.keys().collect::<Vec<_>>(), ["OperationOutcome"], "error files: {}", m["error"]);
    let lines: Vec<Value> = files.values().flatten().map(|l| serde_json::from_str(l).unwrap()).collect();
    for oo in &lines {
        assert_eq!(oo["resourceType"], "OperationOutcome", "{oo}");
        let issues = oo["issue"].as_array().unwrap_or_else(|| panic!("no issue: {oo}"));
        assert!(!issues.is_empty() && issues.iter().all(|i| i["severity"] == "warning"), "warnings only: {oo}");
    }
    lines
}

/// Whether one of the warnings names `parameter` in an issue's `expression` and mentions
/// `word` in its diagnostics.
fn warns_about(warnings: &[Value], parameter: &str, word: &str) -> bool {
    warnings.iter().flat_map(|oo| oo["issue"].as_array().unwrap()).any(|i| {
        i["expression"].as_array().is_some_and(|e| e.iter().any(|x| x == parameter))
            && i["diagnostics"].as_str().is_some_and(|d| d.contains(word))
    })
}

/// A patient-level export organized by patient, as gzip: one block per patient with every
/// resource of its compartment, Patient first and then type by type; the blocks together
/// are exactly a patient-level export. The manifest's counts (resources, D18),
/// sizes and checksums match the served files, and the export folder's `manifest.json`
/// lists the same files, without types.
#[test]
fn patient_export_organized_by_patient_as_gzip() {
    let srv = Server::loaded(&[]);
    let url = with_query(
        &srv.fhir("/Patient/$export"),
        &[("organizeOutputBy", "Patient"), ("_outputFormat", "application/fhir+ndjson+gzip")],
    );
    let (status, m) = organized_export(&srv, &url);
    assert_eq!(m["error"], json!([]), "error: [] is present and empty");
    assert!(m.get("deleted").is_none(), "no deleted array without _since");
    let files = download_blocks(&m, "ndjson.gz");
    let blocks = blocks(&files);
    let reference = reference();
    let patients = reference.patient_ids();
    assert_eq!(blocks.len(), patients.len(), "one block per patient");
    check_blocks(&blocks, &by_patient(&reference.all_compartments(), &patients));
    let lines: usize = files.iter().map(|f| f.lines.len()).sum();
    assert_eq!(lines, keys(&reference.all_compartments()).len() + patients.len(), "lines: resources and headers");

    let folder = srv.export_folder(&status).expect("the export folder");
    assert_eq!(std::fs::read(folder.join("_SUCCESS")).expect("_SUCCESS").len(), 0, "an empty _SUCCESS");
    let local: Value = serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(local["outputOrganizedBy"], "Patient", "manifest.json: {local}");
    assert_eq!((&local["transactionTime"], &local["request"]), (&m["transactionTime"], &m["request"]));
    assert_eq!(local["error"], json!([]));
    let (ours, served) = (local["output"].as_array().unwrap(), m["output"].as_array().unwrap());
    assert_eq!(ours.len(), served.len(), "manifest.json lists every file");
    for (l, e) in ours.iter().zip(served) {
        let name = l["url"].as_str().unwrap();
        assert_eq!(name, file_name(e), "manifest.json names the files relative to the folder, in order");
        assert!(l.get("type").is_none(), "manifest.json: no type for a file of blocks: {l}");
        assert_eq!((&l["count"], &l["extension"]), (&e["count"], &e["extension"]), "{name}");
        let on_disk = std::fs::metadata(folder.join(name)).unwrap_or_else(|e| panic!("{name} in the folder: {e}"));
        assert_eq!(Some(on_disk.len()), e["extension"]["size"].as_u64(), "size of {name} on disk");
    }
}

/// With `--max-file-resources 500` the blocks fill several files, and no block is split:
/// each file starts with a header and takes a new block only while it holds fewer than 500
/// resources (headers are not counted, D18), so a file exceeds the limit by less than its
/// last block (the largest
/// compartment has over 2,000 resources); each patient's header is in exactly one file.
#[test]
fn blocks_are_never_split_across_files() {
    const LIMIT: usize = 500;
    let srv = Server::loaded(&["--max-file-resources", &LIMIT.to_string()]);
    let url = with_query(&srv.fhir("/Patient/$export"), &[("organizeOutputBy", "Patient")]);
    let (_, m) = organized_export(&srv, &url);
    let files = download_blocks(&m, "ndjson");
    let blocks = blocks(&files);
    let reference = reference();
    let expected = reference.all_compartments();
    let lines = keys(&expected).len() + reference.patient_ids().len();
    let largest = reference.compartments.values().map(BTreeSet::len).max().unwrap();
    assert!(largest > LIMIT, "the data set has a compartment larger than a file");
    // A file holds fewer than LIMIT lines before its last block, which has at most
    // `largest` resources and its header.
    let fewest = lines.div_ceil(LIMIT + largest);
    assert!(files.len() >= fewest, "{} files for {lines} lines, at least {fewest} expected", files.len());
    assert!(files.iter().any(|f| f.lines.len() > largest), "the largest block and its header share a file");
    for (f, file) in files.iter().enumerate() {
        let last = blocks.iter().filter(|b| b.file == f).map(|b| b.at).max().expect("a file holds a block");
        let resources_before = last - blocks.iter().filter(|b| b.file == f && b.at < last).count();
        assert!(
            resources_before < LIMIT,
            "{}: a block starts after {resources_before} resources, with the file already full",
            file.name
        );
    }
    check_blocks(&blocks, &by_patient(&expected, &reference.patient_ids()));
}

/// A group-level POST with `_type=Patient,Condition,Observation` and
/// `_typeFilter=Observation?category=vital-signs`: blocks hold only those types and only
/// vital signs among the Observations. A resource in the compartments of two members is in
/// both their blocks; one in a member's and a non-member's compartment is in the member's
/// only. The blocks together equal the export of the same request organized by type.
#[test]
fn group_post_with_type_and_type_filter() {
    let srv = Server::loaded(&[]);
    let reference = reference();
    let ids = reference.patient_ids();
    let members: Vec<&str> = ids[40..52].to_vec();
    let (a, b, outsider) = (members[0], members[1], ids[60]);
    put_all(&srv, &[&group("organized", &members)]);
    let shared_vitals = observation("shared-vitals", "final", "vital-signs", a, b);
    let outsider_vitals = observation("outsider-vitals", "final", "vital-signs", outsider, a);
    let shared_lab = observation("shared-lab", "final", "laboratory", a, b);
    let shared_condition = json!({"resourceType": "Condition", "id": "shared-condition", "code": {"text": "shared"},
        "subject": {"reference": format!("Patient/{a}")}, "asserter": {"reference": format!("Patient/{b}")}});
    let written = [&shared_vitals, &outsider_vitals, &shared_lab, &shared_condition];
    put_all(&srv, &written);

    let types = ["Patient", "Condition", "Observation"];
    let mut expected = reference.compartments_of(&members);
    expect(&mut expected, &written);
    let mut expected = only(expected, &types);
    expected.get_mut("Observation").unwrap().retain(|_, json| {
        let v: Value = serde_json::from_str(json).unwrap();
        v["category"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["coding"].as_array().into_iter().flatten())
            .any(|c| c["code"] == "vital-signs")
    });
    assert!(!expected["Observation"].contains_key("shared-lab"));

    let url = srv.fhir("/Group/organized/$export");
    let params = [
        ("_type", "valueString", json!(types.join(","))),
        ("_typeFilter", "valueString", json!("Observation?category=vital-signs")),
    ];
    let organized =
        parameters(&[params[0].clone(), params[1].clone(), ("organizeOutputBy", "valueString", json!("Patient"))]);
    let status = kickoff_post(&srv, &url, &organized);
    let m = organized_manifest(&poll_until_done(&status), &url);
    let blocks = blocks(&download_blocks(&m, "ndjson"));
    let want = by_patient(&expected, &members);
    assert_eq!(want.len(), members.len(), "every member has a block");
    for (p, shared) in [(a, "shared-vitals"), (b, "shared-vitals"), (a, "outsider-vitals")] {
        assert!(want[p]["Observation"].contains_key(shared), "{p}'s block is to hold {shared}");
    }
    assert!(
        want[a]["Condition"].contains_key("shared-condition") && want[b]["Condition"].contains_key("shared-condition")
    );
    check_blocks(&blocks, &want);

    let status = kickoff_post(&srv, &url, &parameters(&params));
    check_export(&complete_manifest(&poll_until_done(&status), &url), &expected);
}

/// Chained `_since` exports of a Group organized by patient (D7). The second export, since
/// the first: the member who joined in between gets a block with the complete compartment
/// (a shared resource unchanged since included); the earlier member whose Observation
/// changed gets a block with only the changes (no Patient line, the unchanged shared
/// resource left out); the member without changes gets no block; a deletion is in
/// `deleted`, not in a block. The third export, since the second, has no block until the
/// late joiner's Patient changes, and then only that.
#[test]
fn group_since_chain_with_a_late_joiner() {
    let srv = Server::loaded(&[]);
    let reference = reference();
    let ids = reference.patient_ids();
    // x joins after the first export; o changes; q does not.
    let (x, o, q) = (ids[70], ids[71], ids[72]);
    put_all(&srv, &[&group("chain", &[o, q])]);
    let unchanged = observation("shared-unchanged", "final", "exam", x, o);
    let before = observation("shared-changed", "preliminary", "exam", x, o);
    put_all(&srv, &[&unchanged, &before]);

    let url = srv.fhir("/Group/chain/$export");
    let (_, first) = organized_export(&srv, &with_query(&url, &[("organizeOutputBy", "Patient")]));
    let t1 = first["transactionTime"].as_str().unwrap().to_string();
    let mut expected = reference.compartments_of(&[o, q]);
    expect(&mut expected, &[&unchanged, &before]);
    check_blocks(&blocks(&download_blocks(&first, "ndjson")), &by_patient(&expected, &[o, q]));

    put_all(&srv, &[&group("chain", &[o, q, x])]);
    let (o_obs, x_obs) = (own_resources(o, "Observation", 2), own_resources(x, "Observation", 1));
    let mut o_changed = reference.resource("Observation", &o_obs[0]);
    o_changed["status"] = json!("amended");
    let mut x_changed = reference.resource("Observation", &x_obs[0]);
    x_changed["status"] = json!("amended");
    let after = observation("shared-changed", "final", "exam", x, o);
    put_all(&srv, &[&o_changed, &x_changed, &after]);
    assert_eq!(delete(&srv.fhir(&format!("/Observation/{}", o_obs[1]))).status, 200);

    let since_t1 = with_query(&url, &[("organizeOutputBy", "Patient"), ("_since", &t1)]);
    let (_, second) = organized_export(&srv, &since_t1);
    let t2 = second["transactionTime"].as_str().unwrap().to_string();
    let mut x_block = reference.compartments_of(&[x]);
    expect(&mut x_block, &[&x_changed, &unchanged, &after]);
    let mut o_block = Expected::new();
    expect(&mut o_block, &[&o_changed, &after]);
    let blocks_2 = blocks(&download_blocks(&second, "ndjson"));
    let o_types: Vec<&str> = blocks_2
        .iter()
        .filter(|b| b.patient == o)
        .flat_map(|b| b.resources.iter().map(|r| r["resourceType"].as_str().unwrap()))
        .collect();
    assert!(!o_types.contains(&"Patient"), "o's Patient did not change: not in its block ({o_types:?})");
    check_blocks(&blocks_2, &PerPatient::from([(x.to_string(), x_block), (o.to_string(), o_block)]));
    let deleted: Vec<Value> =
        download_entries(&second["deleted"]).values().flatten().map(|l| serde_json::from_str(l).unwrap()).collect();
    let deletion = json!({"resourceType": "Bundle", "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": format!("Observation/{}", o_obs[1])}}]});
    assert_eq!(deleted, vec![deletion], "o's deletion is in the deleted array");

    let since_t2 = with_query(&url, &[("organizeOutputBy", "Patient"), ("_since", &t2)]);
    let (_, third) = organized_export(&srv, &since_t2);
    assert_eq!((&third["output"], &third["deleted"]), (&json!([]), &json!([])), "nothing changed: {third}");
    let mut x_patient = reference.resource("Patient", x);
    x_patient["active"] = json!(false);
    put_all(&srv, &[&x_patient]);
    let (_, fourth) = organized_export(&srv, &since_t2);
    let mut x_block = Expected::new();
    expect(&mut x_block, &[&x_patient]);
    check_blocks(&blocks(&download_blocks(&fourth, "ndjson")), &PerPatient::from([(x.to_string(), x_block)]));
}

/// `_elements=id` within blocks: every resource is subsetted to `resourceType`, `id`, `meta`
/// and its type's mandatory elements (D21), tagged SUBSETTED, as in an export organized by
/// type; the headers are untouched.
#[test]
fn elements_apply_within_blocks() {
    let srv = Server::loaded(&[]);
    let reference = reference();
    let ids = reference.patient_ids();
    let two = [ids[3], ids[42]];
    let url = with_query(
        &srv.fhir("/Patient/$export"),
        &[
            ("organizeOutputBy", "Patient"),
            ("patient", &two.join(",")),
            ("_type", "Patient,Immunization"),
            ("_elements", "id"),
        ],
    );
    let (_, m) = organized_export(&srv, &url);
    let blocks = blocks(&download_blocks(&m, "ndjson"));
    let want = by_patient(&only(reference.compartments_of(&two), &["Patient", "Immunization"]), &two);
    assert_eq!(
        blocks.iter().map(|b| b.patient.as_str()).collect::<BTreeSet<_>>(),
        want.keys().map(String::as_str).collect()
    );
    for b in &blocks {
        assert_eq!(block_keys(b), keys(&want[&b.patient]), "the block of Patient/{}", b.patient);
        for r in &b.resources {
            let fields: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            // Immunization's mandatory elements (R4 min 1) stay too (D21).
            let kept = ["resourceType", "id", "meta", "status", "vaccineCode", "patient", "occurrenceDateTime"];
            assert!(fields.is_subset(&BTreeSet::from(kept)), "{r}");
            let tags = r["meta"]["tag"].as_array().unwrap_or_else(|| panic!("no meta.tag: {r}"));
            assert!(
                tags.iter().any(|t| t["code"] == "SUBSETTED"
                    && t["system"] == "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"),
                "not tagged SUBSETTED: {r}"
            );
        }
    }
}

/// A patient with nothing to export has no block, not even a header: with
/// `_type=Condition&_typeFilter=Condition?code=<diabetes>` only the patients with a matching
/// Condition have one, holding exactly those Conditions.
#[test]
fn patients_without_exported_resources_get_no_block() {
    let srv = Server::loaded(&[]);
    let url = with_query(
        &srv.fhir("/Patient/$export"),
        &[
            ("organizeOutputBy", "Patient"),
            ("_type", "Condition"),
            ("_typeFilter", "Condition?code=http://snomed.info/sct|44054006"),
        ],
    );
    let (_, m) = organized_export(&srv, &url);
    let reference = reference();
    let mut expected = only(reference.all_compartments(), &["Condition"]);
    expected.get_mut("Condition").unwrap().retain(|_, json| {
        let v: Value = serde_json::from_str(json).unwrap();
        v["code"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["system"] == "http://snomed.info/sct" && c["code"] == "44054006")
    });
    let want = by_patient(&expected, &reference.patient_ids());
    assert!(!want.is_empty() && want.len() < 50, "{} patients have the Condition", want.len());
    check_blocks(&blocks(&download_blocks(&m, "ndjson")), &want);
}

/// Refused with 400 naming the parameter: `organizeOutputBy` at system level, a value other
/// than `Patient`, and `_type` naming a type outside the Patient compartment. With
/// `Prefer: handling=lenient` each is ignored and reported as a warning in the manifest's
/// `error` file: the system-level export and the `Encounter` one are organized by type, the
/// `Practitioner` one by patient without Practitioner.
#[test]
fn refusals_strict_and_lenient() {
    let srv = Server::loaded(&[]);
    let system = with_query(&srv.fhir("/$export"), &[("organizeOutputBy", "Patient"), ("_type", "Patient,Condition")]);
    let encounter = with_query(
        &srv.fhir("/Patient/$export"),
        &[("organizeOutputBy", "Encounter"), ("_type", "Patient,AllergyIntolerance")],
    );
    let practitioner = with_query(
        &srv.fhir("/Patient/$export"),
        &[("organizeOutputBy", "Patient"), ("_type", "Patient,Practitioner,AllergyIntolerance")],
    );
    for (url, parameter, word) in [
        (&system, "organizeOutputBy", "organizeOutputBy"),
        (&encounter, "organizeOutputBy", "Encounter"),
        (&practitioner, "_type", "Practitioner"),
    ] {
        let r = send("GET", url, &[("prefer", "respond-async")], None);
        let oo = assert_outcome(&r, 400, &[word]);
        assert_eq!(expressions(&oo), [parameter], "{url}: {oo}");
    }
    let group_post = parameters(&[("organizeOutputBy", "valueString", json!("Encounter"))]);
    let r = send(
        "POST",
        &srv.fhir(&format!("/Group/{GROUP_ID}/$export")),
        &[("prefer", "respond-async"), ("content-type", "application/fhir+json")],
        Some(group_post.to_string().as_bytes()),
    );
    assert_eq!(expressions(&assert_outcome(&r, 400, &["Encounter"])), ["organizeOutputBy"]);

    let lenient = |url: &str| {
        let r = send("GET", url, &[("prefer", "respond-async, handling=lenient")], None);
        poll_until_done(&assert_accepted(&r, &srv))
    };
    let reference = reference();
    let m = complete_manifest(&lenient(&system), &system);
    assert!(m.get("outputOrganizedBy").is_none(), "organized by type: {m}");
    check_export(&m, &reference.types(&["Condition", "Patient"]));
    assert!(warns_about(&warnings(&m), "organizeOutputBy", "organizeOutputBy"), "{}", m["error"]);

    let m = complete_manifest(&lenient(&encounter), &encounter);
    assert!(m.get("outputOrganizedBy").is_none(), "organized by type: {m}");
    check_export(&m, &only(reference.all_compartments(), &["Patient", "AllergyIntolerance"]));
    assert!(warns_about(&warnings(&m), "organizeOutputBy", "Encounter"), "{}", m["error"]);

    let m = organized_manifest(&lenient(&practitioner), &practitioner);
    let expected = only(reference.all_compartments(), &["Patient", "AllergyIntolerance"]);
    check_blocks(&blocks(&download_blocks(&m, "ndjson")), &by_patient(&expected, &reference.patient_ids()));
    assert!(warns_about(&warnings(&m), "_type", "Practitioner"), "{}", m["error"]);
}

/// At patient level every patient with something to export gets a block, whether or not its
/// `Patient` resource exists: once a Patient is deleted, and an Observation names a patient
/// that was never loaded, their resources are in blocks without a `Patient` line, and the
/// blocks together hold exactly what the export by type holds. A chained `_since` export then
/// has blocks only for the patients with changes.
#[test]
fn patients_without_a_patient_resource_get_blocks_too() {
    let srv = Server::loaded(&[]);
    let r = reference();
    let ids = r.patient_ids();
    let (gone, other) = (ids[4], ids[9]);
    assert_eq!(delete(&srv.fhir(&format!("/Patient/{gone}"))).status, 200);
    let ghost = observation("organize-ghost", "final", "exam", "never-loaded", "never-loaded");
    put_all(&srv, &[&ghost]);

    let url = with_query(&srv.fhir("/Patient/$export"), &[("organizeOutputBy", "Patient")]);
    let (_, m) = organized_export(&srv, &url);
    let first = blocks(&download_blocks(&m, "ndjson"));
    let mut expected = r.all_compartments();
    expected.get_mut("Patient").unwrap().remove(gone);
    expect(&mut expected, &[&ghost]);
    let mut patients = ids.clone();
    patients.push("never-loaded");
    check_blocks(&first, &by_patient(&expected, &patients));
    for p in [gone, "never-loaded"] {
        let b = first.iter().find(|b| b.patient == p).unwrap_or_else(|| panic!("no block for Patient/{p}"));
        assert_ne!(b.resources[0]["resourceType"], "Patient", "Patient/{p} has no Patient resource");
    }

    // Since that export: one change, one block.
    let since = m["transactionTime"].as_str().unwrap().to_string();
    let changed = observation("organize-later", "final", "exam", other, other);
    put_all(&srv, &[&changed]);
    let url = with_query(&srv.fhir("/Patient/$export"), &[("organizeOutputBy", "Patient"), ("_since", since.as_str())]);
    let (_, m) = organized_export(&srv, &url);
    let second = blocks(&download_blocks(&m, "ndjson"));
    let mut expected = Expected::new();
    expect(&mut expected, &[&changed]);
    check_blocks(&second, &by_patient(&expected, &[other]));
}
