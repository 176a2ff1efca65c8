//! `fuzz`: a bounded, seeded HTTP fuzzer of the API, on loopback only. It builds a release
//! `sluice` (`--no-default-features`: local storage, no cloud SDKs) and starts two
//! `sluice serve --listen 127.0.0.1:0` processes, each on an embedded store in a temporary
//! folder loaded with the sample set (`bulk-export-sample-10-patients`): one with
//! `--auth none` (most requests: they reach the handlers) and one with `--auth smart` (a
//! quarter: the authorization paths, the token endpoint's RFC 6749 errors, configuration
//! with the root client's Basic credentials). On the `none` server one system export runs
//! to completion first: its id, its signed file URLs and the patients' ids are the "real"
//! values mutated below. It never takes a target: it only talks to the servers it started.
//!
//! Then `--requests` requests (default 24000) over raw TCP (one connection each, or two or
//! three on a keep-alive connection), each made from its own PRNG seeded with `--seed` and
//! its index, so a run is reproducible (what the servers answer may still depend on timing:
//! exports run one at a time). What they are:
//!
//! - well-formed requests to every route with mutated inputs: `GET|POST /fhir/$export`,
//!   `/fhir/Patient/$export`, `/fhir/Group/<id>/$export` with real and random parameters
//!   and values, random `Prefer`, `Accept`, `Content-Type`, POST bodies (valid and broken
//!   `Parameters`, random JSON, binary, big ones up to `--max-body-mib`); status polls and
//!   cancels; `/files/<key>?expires=&sig=`; FHIR REST reads, creates, updates, deletes and
//!   `POST /fhir` Bundles; configuration resources (`/AwsAccount/<id>`, ...); `/metrics`,
//!   `/`, `/exports/<id>`, `/healthz`, `/readyz`, `/fhir/metadata`, the SMART
//!   configuration, `POST /auth/token` and `GET /AuditEvent`; random paths;
//! - path mutations (`..`, `%2e%2e`, `//`, long segments, unicode, percent-encoding, NULs
//!   encoded), method mutations and `Host` variations (a foreign host is answered 421);
//! - malformed HTTP: spaces, NUL and control bytes, bad versions, conflicting lengths, bad
//!   chunked encoding, a URI over 64 KiB, oversized and too many headers, garbage bytes, a
//!   TLS ClientHello, the HTTP/2 preface, bare LF, obs-fold.
//!
//! Every 4xx and 5xx answer must be a FHIR OperationOutcome (JSON, `resourceType:
//! OperationOutcome`), except `POST /auth/token`'s RFC 6749 errors (JSON with an `error`
//! member); no answer may be a 5xx; the servers must live to the end and still answer
//! `GET /fhir/metadata` with 200. A kick-off answered 202 is cancelled at once (`DELETE`
//! of its `Content-Location`), so exports do not pile up. Printed: requests sent, answers
//! by status and by category, the answers that break the rules (with the request), the
//! requests without an answer (closed, or no answer within `--timeout`), the servers' peak
//! and final RSS, the lines of their logs at ERROR level, and the time taken. The exit
//! status is 1 when a server died, or any answer was a 5xx or an error without an
//! OperationOutcome.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target-release cargo run --release -p sluice-bench --bin fuzz -- --requests 24000 --seed 1
//! ```

#[path = "../shared.rs"]
mod shared;

use clap::Parser;
use fastrand::Rng;
use serde_json::Value;
use shared::{EmbeddedServer, Res, local_sluice_bin, resource_files};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Bounded, seeded HTTP fuzzer of the Sluice API (loopback only: it starts its own servers)")]
struct Args {
    /// The folder holding the sample sets.
    #[arg(long, default_value = "../shared/data")]
    data: PathBuf,
    /// The sample set (a folder under --data) loaded into both servers.
    #[arg(long, default_value = "bulk-export-sample-10-patients")]
    set: String,
    /// Requests to send (not counting the cancels of accepted kick-offs).
    #[arg(long, default_value_t = 24000)]
    requests: u64,
    /// Seed of the request generator: the same seed sends the same requests.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Client threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds a request may wait for its answer before it counts as unanswered.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    /// The largest request body sent, in MiB.
    #[arg(long, default_value_t = 4)]
    max_body_mib: usize,
    /// Send only connection N of the run (the `#N` of the examples printed) and print its
    /// requests and answers (the setup export's id and files differ from run to run).
    #[arg(long)]
    unit: Option<u64>,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("fuzz: {e}");
            std::process::exit(2);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The servers and what the generator knows of them.

/// A server under test and the values the generator mutates.
struct Target {
    name: &'static str,
    server: EmbeddedServer,
    log: PathBuf,
    port: u16,
    smart: bool,
    /// The root client's secret (smart only).
    secret: String,
    /// A completed export's id (none only; else a made-up one).
    export_id: String,
    /// Its files' signed URLs, as path and query.
    files: Vec<String>,
    /// Patient ids in the store.
    patients: Vec<String>,
}

impl Target {
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn start(bin: &std::path::Path, name: &'static str, args: &[&str], files: &[PathBuf], secret: String) -> Res<Target> {
    let log = std::env::temp_dir().join(format!("sluice-fuzz-{name}-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let server = EmbeddedServer::start(bin, &format!("fuzz-{name}"), args, files, Stdio::from(file))?;
    let port = server
        .url
        .strip_prefix("http://127.0.0.1:")
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .ok_or_else(|| format!("the server listens on {}, not on 127.0.0.1", server.url))?;
    Ok(Target {
        name,
        server,
        log,
        port,
        smart: name == "smart",
        secret,
        export_id: "0d5f3c1e-8a8e-4f7b-9c39-5a3f4c2b1a00".into(),
        files: Vec::new(),
        patients: Vec::new(),
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// Runs a system export to completion on `t` and records its id, its files and the
/// patients' ids.
fn prepare(t: &mut Target) -> Res<()> {
    let agent = agent();
    let base = &t.server.url;
    let r = agent.get(format!("{base}/fhir/$export")).header("prefer", "respond-async").call();
    let r = r.map_err(|e| e.to_string())?;
    if r.status() != 202 {
        return Err(format!("setup kick-off: {}", r.status()));
    }
    let loc = r.headers().get("content-location").and_then(|v| v.to_str().ok()).ok_or("no Content-Location")?;
    let loc = loc.to_string();
    let started = Instant::now();
    let manifest: Value = loop {
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("the setup export {loc} did not complete in 120 s"));
        }
        let mut r = agent.get(&loc).call().map_err(|e| e.to_string())?;
        match r.status().as_u16() {
            200 => {
                break serde_json::from_str(&r.body_mut().read_to_string().map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
            202 | 429 => std::thread::sleep(Duration::from_millis(500)),
            s => return Err(format!("setup export: status {s}")),
        }
    };
    t.export_id = loc.rsplit('/').next().unwrap_or_default().to_string();
    for f in manifest["output"].as_array().into_iter().flatten() {
        let url = f["url"].as_str().unwrap_or_default();
        let path = url.strip_prefix(base.trim_end_matches('/')).unwrap_or(url).to_string();
        if f["type"] == "Patient" {
            let mut r = agent.get(url).call().map_err(|e| e.to_string())?;
            let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
            for line in text.lines() {
                if let Some(id) =
                    serde_json::from_str::<Value>(line).ok().and_then(|v| v["id"].as_str().map(str::to_string))
                {
                    t.patients.push(id);
                }
            }
        }
        t.files.push(path);
    }
    if t.files.is_empty() || t.patients.is_empty() {
        return Err(format!("the setup export listed no files or no patients: {manifest}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Requests.

/// A request to send, as bytes, and what is needed to judge its answer.
struct Req {
    /// What it exercises (the figures are also given by category).
    cat: &'static str,
    /// Which malformation (malformed HTTP only).
    kind: &'static str,
    method: String,
    bytes: Vec<u8>,
    /// Method, target and body, shortened, for the report.
    summary: String,
    /// `POST /auth/token`: its errors are RFC 6749 JSON.
    token: bool,
    /// A kick-off: a 202 is cancelled at once.
    kickoff: bool,
}

/// A well-formed request before it is written out.
struct Parts {
    cat: &'static str,
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    body_note: String,
}

impl Parts {
    fn new(cat: &'static str, method: &str, path: impl Into<String>) -> Parts {
        Parts {
            cat,
            method: method.into(),
            path: path.into(),
            query: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
            body_note: String::new(),
        }
    }

    fn header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.push((name.into(), value.into()));
    }

    fn json_body(&mut self, body: String, note: &str) {
        self.body = body.into_bytes();
        self.body_note = note.into();
    }
}

fn pick<'a, T>(r: &mut Rng, xs: &'a [T]) -> &'a T {
    &xs[r.usize(..xs.len())]
}

fn chance(r: &mut Rng, percent: u32) -> bool {
    r.u32(..100) < percent
}

/// Percent-encodes all but the unreserved characters.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Shortens `s` to `n` characters for the report.
fn short(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push_str(&format!("...({} chars)", s.chars().count()));
    }
    out
}

const RESOURCE_TYPES: [&str; 16] = [
    "Patient",
    "Observation",
    "Condition",
    "Encounter",
    "Procedure",
    "MedicationRequest",
    "Immunization",
    "AllergyIntolerance",
    "Organization",
    "Practitioner",
    "Location",
    "Device",
    "DocumentReference",
    "Group",
    "Provenance",
    "Binary",
];

const CONFIG_TYPES: [&str; 5] = ["AwsAccount", "AzureAccount", "AzureContainer", "GcpServiceAccount", "Client"];

/// A random string: unicode, control characters, long runs, reserved characters.
fn rand_str(r: &mut Rng) -> String {
    match r.u32(..12) {
        0 => String::new(),
        1 => (0..r.usize(1..40)).map(|_| r.alphanumeric()).collect(),
        2 => (0..r.usize(1..40)).map(|_| r.char(..)).collect(),
        3 => "x".repeat(r.usize(1000..20000)),
        4 => (0..r.usize(1..20)).map(|_| char::from(r.u8(0..32))).collect(),
        5 => {
            pick(r, &["..", "../../etc/passwd", "%00", "\u{0}", "%", "%zz", "%%", "+", "&&", "==", "?", "#", "/", "\\"])
                .to_string()
        }
        6 => {
            pick(r, &["é", "𝔘𝔫𝔦", "日本語", "\u{202e}rtl", "\u{feff}", "\u{fffd}", "Ω≈ç√", "🙂"]).repeat(r.usize(1..5))
        }
        7 => r.i64(..).to_string(),
        8 => format!("{}", r.f64() * 10f64.powi(r.i32(-400..400))),
        9 => pick(r, &["true", "false", "null", "{}", "[]", "\"\"", "NaN", "-0", "1e999"]).to_string(),
        10 => format!("{}-{}", pick(r, &RESOURCE_TYPES), r.u32(..)),
        _ => (0..r.usize(1..30)).map(|_| char::from(r.u8(32..127))).collect(),
    }
}

/// A value for one of the kick-off parameters, real or random.
fn param_value(r: &mut Rng, t: &Target, name: &str) -> String {
    if chance(r, 20) {
        return rand_str(r);
    }
    let patient = t.patients.first().cloned().unwrap_or_default();
    match name {
        "_type" => match r.u32(..5) {
            0 => (0..r.usize(1..6)).map(|_| *pick(r, &RESOURCE_TYPES)).collect::<Vec<_>>().join(","),
            1 => (0..r.usize(100..600)).map(|_| *pick(r, &RESOURCE_TYPES)).collect::<Vec<_>>().join(","),
            2 => pick(r, &["Patient,,", ",", "patient", "NotAType", "Patient, Observation", "*"]).to_string(),
            _ => pick(r, &RESOURCE_TYPES).to_string(),
        },
        "_since" | "_until" => pick(
            r,
            &[
                "2020-01-01T00:00:00Z",
                "2020-01-01",
                "2020",
                "2020-05",
                "2099-12-31T23:59:59.999+14:00",
                "1970-01-01T00:00:00Z",
                "0001-01-01T00:00:00Z",
                "9999-12-31T23:59:59Z",
                "2020-13-45T25:61:61Z",
                "2020-01-01T00:00:00",
                "yesterday",
                "-0001-01-01",
                "2020-02-30T00:00:00Z",
                "2020-01-01T00:00:00+25:00",
                "99999999999999999999",
            ],
        )
        .to_string(),
        "_typeFilter" => {
            let f = pick(
                r,
                &[
                    "Patient?gender=female",
                    "Patient?gender=female,male",
                    "Observation?code=http://loinc.org|8867-4",
                    "Condition?onset-date=ge2020-01-01",
                    "Encounter?_lastUpdated=gt2020-01-01",
                    "Patient?name:contains=a&birthdate=lt2000",
                    "Patient?_id=x",
                    "Patient?",
                    "?",
                    "Patient?%zz",
                    "Foo?bar=baz",
                    "Patient?unknown-param=1",
                    "Observation?value-quantity=gt5|http://unitsofmeasure.org|mg",
                    "Patient?birthdate=ge1900&birthdate=le",
                    "MedicationRequest?status=active&intent=order",
                ],
            );
            (0..r.usize(1..4)).map(|_| f.to_string()).collect::<Vec<_>>().join(",")
        }
        "_elements" => {
            pick(r, &["id", "id,meta", "Patient.name", "name,gender", "nope", "", ",,,", "meta.tag"]).to_string()
        }
        "_outputFormat" => pick(
            r,
            &[
                "application/fhir+ndjson",
                "application/ndjson",
                "ndjson",
                "application/fhir+ndjson+gzip",
                "application/gzip",
                "text/csv",
                "application/fhir+json",
            ],
        )
        .to_string(),
        "patient" => match r.u32(..4) {
            0 => format!("Patient/{patient}"),
            1 => patient,
            2 => format!("Patient/{}", rand_str(r)),
            _ => pick(r, &["Group/1", "Patient/", "", "Patient/a/b"]).to_string(),
        },
        "includeAssociatedData" => {
            pick(r, &["LatestProvenanceResources", "RelevantProvenanceResources", "_custom", "x,y"]).to_string()
        }
        "organizeOutputBy" => pick(r, &["Patient", "Group", "Observation", ""]).to_string(),
        "allowPartialManifests" => pick(r, &["true", "false", "yes", "1", ""]).to_string(),
        "page" | "_count" => pick(r, &["0", "1", "2", "-1", "abc", "99999999999999999999999", "1.5", ""]).to_string(),
        _ => rand_str(r),
    }
}

const EXPORT_PARAMS: [&str; 10] = [
    "_type",
    "_since",
    "_until",
    "_typeFilter",
    "_elements",
    "_outputFormat",
    "patient",
    "includeAssociatedData",
    "organizeOutputBy",
    "allowPartialManifests",
];

/// A parameter name: mostly real ones, some unknown.
fn param_name(r: &mut Rng) -> String {
    if chance(r, 85) {
        pick(r, &EXPORT_PARAMS).to_string()
    } else {
        pick(r, &["_format", "_pretty", "page", "_count", "unknown", "_TYPE", "_type[]", "", "="]).to_string()
    }
}

/// A query string of random parameters; now and then with raw (unencoded) bytes.
fn query(r: &mut Rng, t: &Target) -> String {
    let n = r.usize(0..6);
    let mut pairs = Vec::new();
    for _ in 0..n {
        let name = param_name(r);
        let value = param_value(r, t, &name);
        pairs.push(match r.u32(..10) {
            0 => enc(&name),
            1 => format!("{}={}", enc(&name), value.replace([' ', '#', '\r', '\n', '\0'], "")),
            _ => format!("{}={}", enc(&name), enc(&value)),
        });
    }
    pairs.join("&")
}

/// Random JSON text, sometimes broken.
fn rand_json(r: &mut Rng, depth: u32) -> String {
    let k = if depth > 4 { r.u32(..6) } else { r.u32(..9) };
    match k {
        0 => "null".into(),
        1 => pick(r, &["true", "false"]).to_string(),
        2 => pick(r, &["0", "-0", "1e999", "-1e999", "123456789012345678901234567890", "1.5", "0.0000001", "-12"])
            .to_string(),
        3 | 4 => serde_json::to_string(&rand_str(r)).unwrap_or_default(),
        5 => pick(r, &["\"\\ud800\"", "\"\\u0000\"", "\"\\x\"", "\"abc", "'x'", "NaN", "undefined"]).to_string(),
        6 => format!("[{}]", (0..r.usize(0..5)).map(|_| rand_json(r, depth + 1)).collect::<Vec<_>>().join(",")),
        _ => {
            let fields: Vec<String> = (0..r.usize(0..6))
                .map(|_| {
                    let key = if chance(r, 50) {
                        pick(r, &["resourceType", "id", "parameter", "name", "entry", "type", "meta", "valueString"])
                            .to_string()
                    } else {
                        rand_str(r)
                    };
                    format!("{}:{}", serde_json::to_string(&key).unwrap_or_default(), rand_json(r, depth + 1))
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
    }
}

/// A body that breaks parsers: deep nesting, truncation, invalid UTF-8, binary, big.
fn nasty_body(r: &mut Rng, max: usize, valid: &str) -> (Vec<u8>, String) {
    match r.u32(..8) {
        0 => {
            let d = r.usize(100..200_000);
            (format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes(), format!("nested arrays x{d}"))
        }
        1 => {
            let d = r.usize(100..100_000);
            (format!("{}1{}", "{\"a\":".repeat(d), "}".repeat(d)).into_bytes(), format!("nested objects x{d}"))
        }
        2 => {
            let cut = r.usize(..valid.len().max(1));
            (valid.as_bytes()[..cut].to_vec(), format!("truncated at {cut}"))
        }
        3 => {
            let mut b = valid.as_bytes().to_vec();
            for _ in 0..r.usize(1..5) {
                let i = r.usize(..b.len().max(1));
                if i < b.len() {
                    b[i] = r.u8(0x80..=0xff);
                }
            }
            (b, "invalid UTF-8".into())
        }
        4 => {
            let n = r.usize(1..65536);
            ((0..n).map(|_| r.u8(..)).collect(), format!("{n} random bytes"))
        }
        5 => {
            let n = r.usize(1 << 20..=max.max(1 << 20));
            let mut b = Vec::with_capacity(n);
            if chance(r, 50) {
                b.extend_from_slice(b"{\"resourceType\":\"Parameters\",\"parameter\":[");
                while b.len() < n {
                    b.extend_from_slice(b"{\"name\":\"_type\",\"valueString\":\"Patient\"},");
                }
                b.extend_from_slice(b"{\"name\":\"_type\",\"valueString\":\"Patient\"}]}");
                (b, format!("big JSON, {n} B"))
            } else {
                b.resize(n, b'a');
                (b, format!("big, {n} B of 'a'"))
            }
        }
        6 => {
            let s =
                format!("{{\"resourceType\":\"Parameters\",\"x\":\"{}\"}}", "y".repeat(r.usize(100_000..2_000_000)));
            let n = s.len();
            (s.into_bytes(), format!("long string, {n} B"))
        }
        _ => {
            let s = rand_json(r, 0);
            let n = s.len();
            (s.into_bytes(), format!("random JSON, {n} B"))
        }
    }
}

/// A `Parameters` body with real or random parameters, sometimes broken.
fn parameters(r: &mut Rng, t: &Target) -> String {
    let n = r.usize(0..6);
    let params: Vec<String> = (0..n)
        .map(|_| {
            let name = param_name(r);
            let value = param_value(r, t, &name);
            let v = serde_json::to_string(&value).unwrap_or_default();
            let name = serde_json::to_string(&name).unwrap_or_default();
            match r.u32(..12) {
                0 => format!("{{\"name\":{name},\"valueBoolean\":{}}}", pick(r, &["true", "\"true\"", "1"])),
                1 => format!("{{\"name\":{name},\"valueInstant\":{v}}}"),
                2 => format!("{{\"name\":{name},\"valueCoding\":{{\"code\":{v}}}}}"),
                3 => format!("{{\"name\":{name},\"valueReference\":{{\"reference\":{v}}}}}"),
                4 => format!("{{\"name\":{name}}}"),
                5 => format!("{{\"valueString\":{v}}}"),
                6 => format!("{{\"name\":{name},\"valueString\":{v},\"valueInteger\":1}}"),
                7 => format!("{{\"name\":{name},\"part\":[{{\"name\":{name},\"valueString\":{v}}}]}}"),
                8 => rand_json(r, 2),
                _ => format!("{{\"name\":{name},\"valueString\":{v}}}"),
            }
        })
        .collect();
    let list = params.join(",");
    match r.u32(..10) {
        0 => format!("{{\"resourceType\":\"Parameters\",\"parameter\":{{{}}}}}", list),
        1 => format!("{{\"parameter\":[{list}]}}"),
        2 => format!("{{\"resourceType\":\"Patient\",\"parameter\":[{list}]}}"),
        3 => format!("[{list}]"),
        4 => "{\"resourceType\":\"Parameters\"}".into(),
        5 => format!("{{\"resourceType\":\"Parameters\",\"parameter\":[{list}],\"parameter\":[]}}"),
        _ => format!("{{\"resourceType\":\"Parameters\",\"parameter\":[{list}]}}"),
    }
}

const PREFERS: [&str; 8] = [
    "respond-async",
    "respond-async",
    "respond-async",
    "respond-async, handling=lenient",
    "handling=strict",
    "respond-sync",
    "RESPOND-ASYNC",
    "respond-async;;;,",
];
const ACCEPTS: [&str; 8] = [
    "application/fhir+json",
    "application/json",
    "*/*",
    "text/html",
    "application/xml",
    "application/fhir+ndjson",
    "application/fhir+json;q=0.1, text/html",
    "",
];
const CONTENT_TYPES: [&str; 8] = [
    "application/fhir+json",
    "application/json",
    "application/fhir+json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
];

fn kickoff(r: &mut Rng, t: &Target, max: usize) -> Parts {
    let path = match r.u32(..10) {
        0..=3 => "/fhir/$export".to_string(),
        4..=6 => "/fhir/Patient/$export".to_string(),
        _ => format!(
            "/fhir/Group/{}/$export",
            if chance(r, 50) { pick(r, &["1", "g1", "group-1"]).to_string() } else { enc(&rand_str(r)) }
        ),
    };
    let post = chance(r, 40);
    let mut p = Parts::new("export kick-off", if post { "POST" } else { "GET" }, path);
    if !post || chance(r, 20) {
        p.query = query(r, t);
    }
    if chance(r, 85) {
        p.header("Prefer", *pick(r, &PREFERS));
    } else if chance(r, 50) {
        p.header("Prefer", rand_str(r));
    }
    if chance(r, 60) {
        p.header("Accept", *pick(r, &ACCEPTS));
    }
    if post {
        if chance(r, 80) {
            p.header("Content-Type", *pick(r, &CONTENT_TYPES));
        }
        if chance(r, 75) {
            let body = parameters(r, t);
            p.json_body(body, "Parameters");
        } else {
            let valid = parameters(r, t);
            let (b, note) = nasty_body(r, max, &valid);
            p.body = b;
            p.body_note = note;
        }
    }
    p
}

/// A made-up or mutated export id.
fn export_id(r: &mut Rng, t: &Target) -> String {
    match r.u32(..6) {
        0 => t.export_id.clone(),
        1 => {
            let mut id = t.export_id.clone().into_bytes();
            if !id.is_empty() {
                let i = r.usize(..id.len());
                id[i] = r.alphanumeric() as u8;
            }
            String::from_utf8_lossy(&id).into_owned()
        }
        2 => format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            r.u32(..),
            r.u16(..),
            r.u16(..0xfff),
            r.u16(..0xfff),
            r.u64(..1 << 48)
        ),
        3 => format!("{}/../{}", t.export_id, t.export_id),
        _ => enc(&rand_str(r)),
    }
}

fn status(r: &mut Rng, t: &Target) -> Parts {
    // DELETE only made-up ids: the real export stays for the other requests.
    let delete = chance(r, 25);
    let mut id = export_id(r, t);
    if delete && id == t.export_id {
        id.push('x');
    }
    let mut p =
        Parts::new("export status", if delete { "DELETE" } else { "GET" }, format!("/fhir/$export-status/{id}"));
    if chance(r, 40) {
        let v = param_value(r, t, "page");
        p.query = format!("page={}", enc(&v));
        if chance(r, 20) {
            p.query.push_str("&page=2");
        }
    }
    if chance(r, 30) {
        p.header("Accept", *pick(r, &ACCEPTS));
    }
    p
}

fn files(r: &mut Rng, t: &Target) -> Parts {
    let real =
        t.files.get(r.usize(..t.files.len().max(1))).cloned().unwrap_or_else(|| "/files/x?expires=1&sig=00".into());
    let (path, q) = real.split_once('?').unwrap_or((&real, ""));
    let mut expires = q.split('&').find_map(|kv| kv.strip_prefix("expires=")).unwrap_or("0").to_string();
    let mut sig = q.split('&').find_map(|kv| kv.strip_prefix("sig=")).unwrap_or("").to_string();
    let mut path = path.to_string();
    match r.u32(..10) {
        0 => {}
        1 => path = format!("/files/{}", (0..r.usize(1..5)).map(|_| enc(&rand_str(r))).collect::<Vec<_>>().join("/")),
        2 => {
            path = pick(
                r,
                &[
                    "/files/../../etc/passwd",
                    "/files/%2e%2e/%2e%2e/etc/passwd",
                    "/files//etc/passwd",
                    "/files/%2fetc%2fpasswd",
                    "/files/..%2f..%2fetc%2fpasswd",
                    "/files/a/%00/b",
                    "/files/",
                    "/files",
                ],
            )
            .to_string()
        }
        3 => expires = pick(r, &["0", "1", "-1", "abc", "", "99999999999999999999999", "4102444800"]).to_string(),
        4 => {
            if !sig.is_empty() {
                let i = r.usize(..sig.len());
                let mut b = sig.into_bytes();
                b[i] = if b[i] == b'0' { b'1' } else { b'0' };
                sig = String::from_utf8_lossy(&b).into_owned();
            }
        }
        5 => sig = enc(&rand_str(r)),
        6 => {
            // Another file's signature.
            let other = t.files.get(r.usize(..t.files.len().max(1))).cloned().unwrap_or_default();
            sig = other.split("sig=").nth(1).unwrap_or("").to_string();
            path.push('x');
        }
        7 => path = format!("{path}/../{}", pick(r, &["x", "..", "Patient.000.ndjson"])),
        8 => path = path.replace('/', "%2F").replacen("%2Ffiles%2F", "/files/", 1),
        _ => path = format!("{path}{}", enc(&rand_str(r))),
    }
    let mut p = Parts::new("files", "GET", path);
    p.query = match r.u32(..8) {
        0 => String::new(),
        1 => format!("sig={sig}"),
        2 => format!("expires={expires}"),
        3 => format!("expires={expires}&sig={sig}&expires=1"),
        _ => format!("expires={expires}&sig={sig}"),
    };
    if chance(r, 20) {
        p.header(
            "Range",
            *pick(r, &["bytes=0-10", "bytes=-5", "bytes=999999999-", "bytes=5-1", "items=1-2", "bytes=0-0,1-1,2-2"]),
        );
    }
    p
}

/// A FHIR resource for a REST write, real-looking or random.
fn resource(r: &mut Rng, ty: &str, id: &str) -> String {
    match r.u32(..8) {
        0 => rand_json(r, 0),
        1 => format!("{{\"resourceType\":{}}}", serde_json::to_string(&rand_str(r)).unwrap_or_default()),
        2 => format!("{{\"resourceType\":\"{ty}\",\"id\":\"{}\"}}", if chance(r, 50) { "other-id" } else { "" }),
        3 => format!("{{\"resourceType\":\"{ty}\",\"id\":{}}}", rand_json(r, 3)),
        _ => {
            let extra: Vec<String> = (0..r.usize(0..4))
                .map(|_| format!("{}:{}", serde_json::to_string(&rand_str(r)).unwrap_or_default(), rand_json(r, 2)))
                .collect();
            let mut body = format!(
                "{{\"resourceType\":\"{ty}\",\"id\":{},\"meta\":{{\"lastUpdated\":\"2026-12-06T00:00:00Z\"}},\"subject\":{{\"reference\":\"Patient/1\"}}",
                serde_json::to_string(id).unwrap_or_default()
            );
            for e in extra {
                body.push(',');
                body.push_str(&e);
            }
            body.push('}');
            body
        }
    }
}

fn rest(r: &mut Rng, t: &Target, max: usize) -> Parts {
    let ty = if chance(r, 85) { pick(r, &RESOURCE_TYPES).to_string() } else { enc(&rand_str(r)) };
    let id = match r.u32(..5) {
        0 | 1 => t.patients.get(r.usize(..t.patients.len().max(1))).cloned().unwrap_or_default(),
        2 => format!("fuzz-{}", r.u32(..1000)),
        3 => "x".repeat(r.usize(60..5000)),
        _ => rand_str(r),
    };
    let method = *pick(r, &["GET", "GET", "PUT", "PUT", "POST", "DELETE"]);
    let path = if method == "POST" { format!("/fhir/{ty}") } else { format!("/fhir/{ty}/{}", enc(&id)) };
    let mut p = Parts::new("FHIR REST", method, path);
    if chance(r, 10) {
        p.query = query(r, t);
    }
    if method == "PUT" || method == "POST" {
        p.header("Content-Type", *pick(r, &CONTENT_TYPES));
        let body = resource(r, &ty, &id);
        if chance(r, 85) {
            p.json_body(body, "resource");
        } else {
            let (b, note) = nasty_body(r, max, &body);
            p.body = b;
            p.body_note = note;
        }
        if chance(r, 15) {
            p.header("If-Match", *pick(r, &["W/\"1\"", "\"1\"", "*", "W/\"", "garbage"]));
        }
    }
    if chance(r, 30) {
        p.header("Accept", *pick(r, &ACCEPTS));
    }
    p
}

fn bundle(r: &mut Rng, t: &Target, max: usize) -> Parts {
    let mut p = Parts::new("FHIR Bundle", "POST", "/fhir");
    p.header("Content-Type", if chance(r, 80) { "application/fhir+json" } else { pick(r, &CONTENT_TYPES) });
    let entries: Vec<String> = (0..r.usize(0..8))
        .map(|_| {
            let ty = pick(r, &RESOURCE_TYPES).to_string();
            let id = t.patients.first().cloned().unwrap_or_else(|| "p1".into());
            let method = pick(r, &["PUT", "POST", "DELETE", "GET", "PATCH", "put", ""]).to_string();
            let url = match r.u32(..5) {
                0 => ty.clone(),
                1 => format!("{ty}/{}", rand_str(r)),
                2 => rand_str(r),
                _ => format!("{ty}/{id}"),
            };
            match r.u32(..6) {
                0 => rand_json(r, 1),
                1 => format!("{{\"request\":{{\"method\":\"{method}\",\"url\":{}}}}}", serde_json::to_string(&url).unwrap_or_default()),
                2 => format!("{{\"resource\":{}}}", resource(r, &ty, &id)),
                _ => format!(
                    "{{\"fullUrl\":\"urn:uuid:{}\",\"resource\":{},\"request\":{{\"method\":\"{method}\",\"url\":{}}}}}",
                    r.u64(..),
                    resource(r, &ty, &id),
                    serde_json::to_string(&url).unwrap_or_default()
                ),
            }
        })
        .collect();
    let ty = pick(r, &["transaction", "batch", "collection", "searchset", "", "TRANSACTION"]);
    let body = match r.u32(..8) {
        0 => format!("{{\"resourceType\":\"Bundle\",\"entry\":[{}]}}", entries.join(",")),
        1 => format!("{{\"resourceType\":\"Bundle\",\"type\":\"{ty}\",\"entry\":{{}}}}"),
        2 => format!("{{\"resourceType\":\"Patient\",\"type\":\"{ty}\",\"entry\":[{}]}}", entries.join(",")),
        _ => format!("{{\"resourceType\":\"Bundle\",\"type\":\"{ty}\",\"entry\":[{}]}}", entries.join(",")),
    };
    if chance(r, 85) {
        p.json_body(body, "Bundle");
    } else {
        let (b, note) = nasty_body(r, max, &body);
        p.body = b;
        p.body_note = note;
    }
    p
}

fn config(r: &mut Rng, max: usize) -> Parts {
    let ty = if chance(r, 85) { pick(r, &CONFIG_TYPES).to_string() } else { enc(&rand_str(r)) };
    let id = match r.u32(..4) {
        0 => "fuzz".to_string(),
        1 => "x".repeat(r.usize(60..3000)),
        _ => enc(&rand_str(r)),
    };
    let method = *pick(r, &["GET", "PUT", "PUT", "DELETE"]);
    let mut p = Parts::new("configuration", method, format!("/{ty}/{id}"));
    if method == "PUT" {
        p.header("Content-Type", *pick(r, &CONTENT_TYPES));
        let field = |r: &mut Rng| serde_json::to_string(&rand_str(r)).unwrap_or_default();
        let body = match r.u32(..6) {
            0 => rand_json(r, 0),
            1 => format!(
                "{{\"resourceType\":\"{ty}\",\"region\":{},\"bucket\":{},\"access_key_id\":{},\"secret_access_key\":{}}}",
                field(r),
                field(r),
                field(r),
                field(r)
            ),
            2 => format!(
                "{{\"resourceType\":\"{ty}\",\"grant_types\":[\"client_credentials\"],\"scope\":[{}],\"jwks\":{}}}",
                field(r),
                rand_json(r, 2)
            ),
            3 => format!("{{\"resourceType\":\"{ty}\",\"id\":\"other\"}}"),
            _ => format!("{{\"resourceType\":\"{ty}\",{}:{}}}", field(r), rand_json(r, 2)),
        };
        if chance(r, 85) {
            p.json_body(body, "configuration");
        } else {
            let (b, note) = nasty_body(r, max, &body);
            p.body = b;
            p.body_note = note;
        }
    }
    p
}

fn ops(r: &mut Rng, t: &Target) -> Parts {
    let id = export_id(r, t);
    let (path, cat) = match r.u32(..10) {
        0 => ("/metrics".to_string(), "monitoring"),
        1 => ("/".to_string(), "monitoring"),
        2 | 3 => (format!("/exports/{id}"), "monitoring"),
        4 => ("/healthz".to_string(), "monitoring"),
        5 => ("/readyz".to_string(), "monitoring"),
        6 => ("/fhir/metadata".to_string(), "metadata"),
        7 => ("/fhir/.well-known/smart-configuration".to_string(), "metadata"),
        _ => ("/AuditEvent".to_string(), "audit"),
    };
    let mut p = Parts::new(cat, "GET", path);
    if p.path == "/AuditEvent" {
        let q: Vec<String> = (0..r.usize(0..4))
            .map(|_| {
                let v = match r.u32(..4) {
                    0 => format!("ge{}", param_value(r, t, "_since")),
                    1 => format!("lt{}", param_value(r, t, "_until")),
                    2 => param_value(r, t, "_since"),
                    _ => rand_str(r),
                };
                format!("{}={}", pick(r, &["date", "agent", "_count", "x"]), enc(&v))
            })
            .collect();
        p.query = q.join("&");
    } else if chance(r, 10) {
        p.query = query(r, t);
    }
    if chance(r, 50) {
        p.header("Accept", *pick(r, &ACCEPTS));
    }
    p
}

/// A base64url JSON Web Token, usually invalid.
fn jwt(r: &mut Rng) -> String {
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let header = pick(
        r,
        &[
            "{\"alg\":\"none\"}",
            "{\"alg\":\"ES384\",\"kid\":\"k1\"}",
            "{\"alg\":\"RS384\",\"kid\":\"../../x\",\"jku\":\"http://127.0.0.1:1/jwks\"}",
            "{\"alg\":\"HS256\"}",
            "{}",
            "[]",
        ],
    )
    .to_string();
    let claims = format!(
        "{{\"iss\":{0},\"sub\":{0},\"aud\":\"http://127.0.0.1/auth/token\",\"exp\":{1},\"jti\":\"{2}\"}}",
        serde_json::to_string(&rand_str(r)).unwrap_or_default(),
        pick(r, &["4102444800", "0", "\"x\"", "1e30"]),
        r.u64(..)
    );
    match r.u32(..4) {
        0 => rand_str(r),
        1 => format!("{}.{}", b64(&header), b64(&claims)),
        _ => format!("{}.{}.{}", b64(&header), b64(&claims), b64(&rand_str(r))),
    }
}

fn token(r: &mut Rng, _t: &Target, max: usize) -> Parts {
    let mut p = Parts::new("token", "POST", "/auth/token");
    if chance(r, 85) {
        p.header("Content-Type", "application/x-www-form-urlencoded");
    } else {
        p.header("Content-Type", *pick(r, &CONTENT_TYPES));
    }
    let mut form = Vec::new();
    for _ in 0..r.usize(0..6) {
        let (k, v) = match r.u32(..6) {
            0 => ("grant_type", pick(r, &["client_credentials", "authorization_code", "password", ""]).to_string()),
            1 => (
                "scope",
                pick(r, &["system/*.read", "system/*.rs", "system/Patient.read", "user/*.*", "", "openid"]).to_string(),
            ),
            2 => (
                "client_assertion_type",
                pick(r, &["urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "x"]).to_string(),
            ),
            3 => ("client_assertion", jwt(r)),
            4 => ("client_id", rand_str(r)),
            _ => ("client_secret", rand_str(r)),
        };
        form.push(format!("{}={}", enc(k), enc(&v)));
    }
    let body = form.join("&");
    if chance(r, 90) {
        p.body = body.into_bytes();
        p.body_note = "form".into();
    } else {
        let (b, note) = nasty_body(r, max, &body);
        p.body = b;
        p.body_note = note;
    }
    p
}

fn random_route(r: &mut Rng, _t: &Target) -> Parts {
    let segs = r.usize(0..6);
    let path: String = (0..segs)
        .map(|_| {
            let s = if chance(r, 50) {
                pick(r, &["fhir", "files", "exports", "Patient", "$export", "$export-status", "auth", "metrics", "x"])
                    .to_string()
            } else {
                enc(&rand_str(r))
            };
            format!("/{s}")
        })
        .collect();
    let method = *pick(r, &["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]);
    let mut p = Parts::new("random route", method, if path.is_empty() { "/".to_string() } else { path });
    if chance(r, 30) {
        p.query = enc(&rand_str(r));
    }
    p
}

/// Mutates the path: traversal, doubled slashes, long segments, unicode, encodings.
fn mutate_path(r: &mut Rng, p: &mut Parts) {
    let path = std::mem::take(&mut p.path);
    p.path = match r.u32(..14) {
        0 => format!("{path}/.."),
        1 => format!("/fhir/../{}", path.trim_start_matches('/')),
        2 => path.replace('/', "/%2e%2e/"),
        3 => path.replace('/', "//"),
        4 => format!("{path}/{}", "a".repeat(r.usize(1000..60000))),
        5 => format!("{path}/{}", enc(pick::<&str>(r, &["é", "日本", "🙂", "\u{202e}"]))),
        6 => format!("{path}/{}", pick(r, &["é", "日本", "🙂"])),
        7 => path.replace('$', "%24"),
        8 => path.replacen('e', "%65", 1),
        9 => format!("{path}%00"),
        10 => format!("{path}/%00/../x"),
        11 => path.to_uppercase(),
        12 => format!("{path};jsessionid=1"),
        _ => format!("{path}/"),
    };
    p.cat = "path mutation";
}

fn mutate_method(r: &mut Rng, p: &mut Parts) {
    p.method = match r.u32(..8) {
        0 => "HEAD".into(),
        1 => "OPTIONS".into(),
        2 => "PATCH".into(),
        3 => "TRACE".into(),
        4 => p.method.to_lowercase(),
        5 => "FUZZ".into(),
        6 => "G".repeat(r.usize(10..2000)),
        _ => pick(r, &["GET", "POST", "PUT", "DELETE"]).to_string(),
    };
    p.cat = "method mutation";
}

fn host_variation(r: &mut Rng, t: &Target) -> Option<String> {
    let port = t.port;
    Some(match r.u32(..16) {
        0 => return None,
        1 => "evil.example".into(),
        2 => format!("evil.example:{port}"),
        3 => format!("127.0.0.1.evil.example:{port}"),
        4 => "localhost".into(),
        5 => format!("LOCALHOST.:{port}"),
        6 => format!("[::1]:{port}"),
        7 => String::new(),
        8 => format!("127.0.0.1:{port}:{port}"),
        9 => "localhost:abc".into(),
        10 => "user@localhost".into(),
        11 => "xn--n3h.example".into(),
        12 => format!("127.0.0.1:{port}, evil.example"),
        13 => "127.0.0.1:99999999999".into(),
        14 => "h".repeat(r.usize(300..5000)),
        _ => "localhost\u{7f}".into(),
    })
}

/// Writes a well-formed request out: Host, authorization, length or chunks.
fn render(r: &mut Rng, t: &Target, mut p: Parts, keep_alive: bool) -> Req {
    let mut head: Vec<(String, String)> = Vec::new();
    // Host: mostly right; a tenth of the time a variation (a foreign host is answered 421).
    if chance(r, 10) {
        if let Some(h) = host_variation(r, t) {
            head.push(("Host".into(), h));
        }
        if chance(r, 10) {
            head.push(("Host".into(), "evil.example".into()));
        }
        if p.cat != "path mutation" && p.cat != "method mutation" {
            p.cat = "Host variation";
        }
    } else {
        head.push(("Host".into(), t.host()));
    }
    if t.smart {
        let basic = |user: &str, secret: &str| {
            use base64::Engine as _;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}")))
        };
        match r.u32(..6) {
            0 => {}
            1 => head.push(("Authorization".into(), basic("root", &t.secret))),
            2 => head.push(("Authorization".into(), basic("root", "wrong"))),
            3 => head.push(("Authorization".into(), format!("Bearer {}", jwt(r)))),
            4 => head.push((
                "Authorization".into(),
                pick(r, &["Bearer", "Basic", "Basic !!!", "Bearer  ", "Digest x"]).to_string(),
            )),
            _ => head.push(("Authorization".into(), basic(&rand_str(r), &rand_str(r)))),
        }
    } else if chance(r, 5) {
        head.push(("Authorization".into(), format!("Bearer {}", jwt(r))));
    }
    head.append(&mut p.headers);
    if chance(r, 5) {
        head.push(("X-Fuzz".into(), rand_str(r).replace(['\r', '\n', '\0'], "")));
    }
    if chance(r, 3) {
        head.push(("Expect".into(), "100-continue".into()));
    }
    let chunked = !p.body.is_empty() && chance(r, 10);
    if chunked {
        head.push(("Transfer-Encoding".into(), "chunked".into()));
    } else if !p.body.is_empty() || p.method == "POST" || p.method == "PUT" {
        head.push(("Content-Length".into(), p.body.len().to_string()));
    }
    if !keep_alive {
        head.push(("Connection".into(), "close".into()));
    }
    let target = if p.query.is_empty() { p.path.clone() } else { format!("{}?{}", p.path, p.query) };
    let mut bytes = format!("{} {target} HTTP/1.1\r\n", p.method).into_bytes();
    for (k, v) in &head {
        bytes.extend_from_slice(k.as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(v.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    if chunked {
        let mut rest = &p.body[..];
        while !rest.is_empty() {
            let n = r.usize(1..=rest.len().min(1 << 16));
            bytes.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            bytes.extend_from_slice(&rest[..n]);
            bytes.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
    } else {
        bytes.extend_from_slice(&p.body);
    }
    let body = if p.body.is_empty() {
        String::new()
    } else {
        let text = String::from_utf8_lossy(&p.body[..p.body.len().min(120)]).into_owned();
        format!(" [{} B {}{}: {}]", p.body.len(), p.body_note, if chunked { ", chunked" } else { "" }, short(&text, 80))
    };
    let hosts: Vec<&str> = head.iter().filter(|(k, _)| k == "Host").map(|(_, v)| v.as_str()).collect();
    let host = if hosts == [t.host().as_str()] {
        String::new()
    } else {
        format!(" Host={:?}", hosts.iter().map(|h| short(h, 40)).collect::<Vec<_>>())
    };
    Req {
        cat: p.cat,
        kind: "",
        token: p.method == "POST" && p.path == "/auth/token",
        kickoff: p.cat == "export kick-off",
        summary: format!("{} {}{host}{body}", short(&p.method, 20), short(&target, 160)),
        method: p.method,
        bytes,
    }
}

fn well_formed(r: &mut Rng, t: &Target, max: usize, keep_alive: bool) -> Req {
    let mut p = match r.u32(..100) {
        0..=21 => kickoff(r, t, max),
        22..=31 => status(r, t),
        32..=39 => files(r, t),
        40..=51 => rest(r, t, max),
        52..=57 => bundle(r, t, max),
        58..=65 => config(r, max),
        66..=75 => ops(r, t),
        76..=84 => token(r, t, max),
        _ => random_route(r, t),
    };
    if chance(r, 8) {
        mutate_path(r, &mut p);
    }
    if chance(r, 5) {
        mutate_method(r, &mut p);
    }
    render(r, t, p, keep_alive)
}

/// Malformed HTTP: each is complete (the server has all it needs to answer at once).
fn malformed(r: &mut Rng, t: &Target) -> Req {
    let host = t.host();
    let port = t.port;
    let (kind, bytes): (&str, Vec<u8>) = match r.u32(..25) {
        0 => ("space in target", format!("GET /fhir/Patient/a b?x=1 2 HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()),
        1 => ("NUL in header value", format!("GET /fhir/metadata HTTP/1.1\r\nHost: {host}\r\nX-A: a\0b\r\n\r\n").into_bytes()),
        2 => {
            let c = *pick(r, &[1u8, 2, 8, 11, 12, 14, 27, 31, 127]);
            let mut b = format!("GET /fhir/metadata HTTP/1.1\r\nHost: {host}\r\nX-").into_bytes();
            if chance(r, 50) {
                b.push(c);
                b.extend_from_slice(b"A: a\r\n\r\n");
            } else {
                b.extend_from_slice(b"A: a");
                b.push(c);
                b.extend_from_slice(b"b\r\n\r\n");
            }
            ("control byte in header", b)
        }
        3 => {
            let v = pick(r, &["HTTP/1.2", "HTTP/2.0", "HTTP/0.9", "HTTP/9.9", "HTTP/1.1x", "http/1.1", "HTTP/1", "HTTP/11", "HTTPS/1.1", "HTTP/1.1 x"]);
            ("bad version", format!("GET /fhir/metadata {v}\r\nHost: {host}\r\n\r\n").into_bytes())
        }
        4 => (
            "conflicting Content-Length",
            format!("POST /fhir/$export HTTP/1.1\r\nHost: {host}\r\nPrefer: respond-async\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}} ").into_bytes(),
        ),
        5 => (
            "Content-Length and chunked",
            format!("POST /fhir HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/fhir+json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").into_bytes(),
        ),
        6 => {
            let v = pick(r, &["-1", "abc", "1e3", "99999999999999999999999", "5,6", "0x10", "+5", "5 5"]);
            ("bad Content-Length", format!("POST /fhir/Patient HTTP/1.1\r\nHost: {host}\r\nContent-Length: {v}\r\n\r\nhello").into_bytes())
        }
        7 => {
            let size = pick(r, &["zz", "-1", "ffffffffffffffffffffff", "", " 5", "5 ;", "0x5"]);
            (
                "bad chunk size",
                format!("POST /fhir/Patient HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n").into_bytes(),
            )
        }
        8 => (
            "chunk without CRLF",
            format!("POST /fhir HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}XX0\r\n\r\n").into_bytes(),
        ),
        9 => (
            "chunk extension garbage",
            format!("POST /fhir HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n2;\0\x01=\"\r\n{{}}\r\n0\r\n\r\n").into_bytes(),
        ),
        10 => {
            let te = pick(r, &["gzip", "chunked, gzip", "identity", "Chunked", "chunked\x0b", "chunked, chunked", "x"]);
            (
                "odd Transfer-Encoding",
                format!("POST /fhir/$export HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: {te}\r\nContent-Length: 2\r\n\r\n{{}}").into_bytes(),
            )
        }
        11 => {
            let n = r.usize(65 << 10..200 << 10);
            ("URI over 64 KiB", format!("GET /fhir/$export?_type={} HTTP/1.1\r\nHost: {host}\r\n\r\n", "A".repeat(n)).into_bytes())
        }
        12 => {
            let n = r.usize(70 << 10..200 << 10);
            ("oversized header", format!("GET /fhir/metadata HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n", "b".repeat(n)).into_bytes())
        }
        13 => {
            let n = r.usize(101..600);
            let mut s = format!("GET /fhir/metadata HTTP/1.1\r\nHost: {host}\r\n");
            for i in 0..n {
                s.push_str(&format!("X-H{i}: v\r\n"));
            }
            s.push_str("\r\n");
            ("too many headers", s.into_bytes())
        }
        14 => {
            let mut b: Vec<u8> = (0..r.usize(1..4096)).map(|_| r.u8(..)).collect();
            b.extend_from_slice(b"\r\n\r\n");
            ("garbage bytes", b)
        }
        15 => {
            let mut b = vec![0x16, 0x03, 0x01, 0x00, 0xf1, 0x01, 0x00, 0x00, 0xed, 0x03, 0x03];
            b.extend((0..32).map(|_| r.u8(..)));
            b.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
            b.resize(246, 0);
            ("TLS ClientHello", b)
        }
        16 => ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        17 => ("bare LF", format!("GET /fhir/metadata HTTP/1.1\nHost: {host}\n\n").into_bytes()),
        18 => ("obs-fold", format!("GET /fhir/metadata HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n b\r\n\r\n").into_bytes()),
        19 => ("header without colon", format!("GET /fhir/metadata HTTP/1.1\r\nHost: {host}\r\nNoColonHere\r\n\r\n").into_bytes()),
        20 => {
            let line = pick(
                r,
                &[
                    "GET  /fhir/metadata HTTP/1.1",
                    "GET /fhir/metadata  HTTP/1.1",
                    " GET /fhir/metadata HTTP/1.1",
                    "GET\t/fhir/metadata\tHTTP/1.1",
                    "GET http://evil.example/fhir/metadata HTTP/1.1",
                    "GET http://127.0.0.1:{port}/fhir/metadata HTTP/1.1",
                    "CONNECT 127.0.0.1:{port} HTTP/1.1",
                    "OPTIONS * HTTP/1.1",
                    "GET * HTTP/1.1",
                    "GET fhir/metadata HTTP/1.1",
                    "GET /fhir/metadata",
                    "GET",
                    "\r\nGET /fhir/metadata HTTP/1.1",
                    "GET /fhir/metadata#frag HTTP/1.1",
                    "GET /fhir/metadata?? HTTP/1.1",
                ],
            )
            .replace("{port}", &port.to_string());
            ("odd request line", format!("{line}\r\nHost: {host}\r\n\r\n").into_bytes())
        }
        21 => {
            let mut b = b"GET /fhir/Patient/".to_vec();
            b.extend((0..r.usize(1..20)).map(|_| r.u8(0x80..=0xff)));
            b.extend_from_slice(format!(" HTTP/1.1\r\nHost: {host}\r\nX-A: ").as_bytes());
            b.extend((0..r.usize(1..20)).map(|_| r.u8(0x80..=0xff)));
            b.extend_from_slice(b"\r\n\r\n");
            ("raw non-ASCII bytes", b)
        }
        22 => {
            let h = pick(r, &["Host : x", "Content-Length : 5", " Host: x", "Ho st: x", ": x", "Host:\0"]);
            ("bad header name", format!("GET /fhir/metadata HTTP/1.1\r\nHost: {host}\r\n{h}\r\n\r\n").into_bytes())
        }
        23 => ("HTTP/1.0 without Host", b"GET /fhir/metadata HTTP/1.0\r\n\r\n".to_vec()),
        _ => {
            let m = pick(r, &["G\0T", "GET\x01", "get", "GE T", "\u{e9}GET"]);
            ("bad method", format!("{m} /fhir/metadata HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes())
        }
    };
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    Req {
        cat: "malformed HTTP",
        kind,
        method: String::new(),
        summary: format!("{kind}: {} B, starting {:?}", bytes.len(), short(&head, 80)),
        bytes,
        token: false,
        kickoff: false,
    }
}

/// The server connection `i` goes to: a quarter go to the smart one.
fn target_of(seed: u64, i: u64) -> usize {
    usize::from(Rng::with_seed(seed ^ i.rotate_left(17)).u32(..4) == 0)
}

/// The requests of connection `i`: one malformed request, or one to three well-formed ones
/// (kept alive between them).
fn unit(seed: u64, i: u64, t: &Target, max: usize) -> Vec<Req> {
    let mut r = Rng::with_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ i);
    if chance(&mut r, 10) {
        return vec![malformed(&mut r, t)];
    }
    let n = if chance(&mut r, 15) { r.usize(2..=3) } else { 1 };
    (0..n).map(|k| well_formed(&mut r, t, max, k + 1 < n)).collect()
}

// ---------------------------------------------------------------------------------------
// Sending and reading answers.

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a request got no answer.
enum NoAnswer {
    /// The connection closed with this many bytes of an answer read (0: nothing).
    Closed(usize),
    /// No (complete) answer within the timeout.
    Timeout(usize),
    /// An I/O error.
    Io(String),
    /// Bytes that are not an HTTP answer.
    Garbled(String),
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Closed(0) => write!(f, "connection closed without an answer"),
            NoAnswer::Closed(n) => write!(f, "connection closed after {n} bytes of an incomplete answer"),
            NoAnswer::Timeout(n) => write!(f, "no complete answer within the timeout ({n} bytes read)"),
            NoAnswer::Io(e) => write!(f, "I/O error: {e}"),
            NoAnswer::Garbled(s) => write!(f, "not an HTTP answer: {s}"),
        }
    }
}

impl NoAnswer {
    fn kind(&self) -> &'static str {
        match self {
            NoAnswer::Closed(0) => "closed without an answer",
            NoAnswer::Closed(_) => "closed mid-answer",
            NoAnswer::Timeout(_) => "timeout",
            NoAnswer::Io(_) => "I/O error",
            NoAnswer::Garbled(_) => "garbled answer",
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A connection with the bytes read but not consumed yet.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    deadline: Instant,
}

impl Conn {
    fn open(port: u16, timeout: Duration) -> Result<Conn, NoAnswer> {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| NoAnswer::Io(format!("connect: {e}")))?;
        let _ = stream.set_read_timeout(Some(timeout));
        let _ = stream.set_write_timeout(Some(timeout));
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream, buf: Vec::new(), deadline: Instant::now() + timeout })
    }

    /// Reads more bytes; false at the end of the stream.
    fn fill(&mut self) -> Result<bool, NoAnswer> {
        if Instant::now() > self.deadline {
            return Err(NoAnswer::Timeout(self.buf.len()));
        }
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(NoAnswer::Timeout(self.buf.len()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(NoAnswer::Io(e.to_string())),
        }
    }

    /// Reads until `buf` holds at least `n` bytes.
    fn need(&mut self, n: usize, read: usize) -> Result<(), NoAnswer> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(NoAnswer::Closed(read + self.buf.len()));
            }
        }
        Ok(())
    }

    /// Reads up to a CRLF; the line, consumed.
    fn line(&mut self, read: usize) -> Result<Vec<u8>, NoAnswer> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if !self.fill()? {
                return Err(NoAnswer::Closed(read + self.buf.len()));
            }
        }
    }

    /// Reads one answer (after any 1xx ones) to a request with `method`.
    fn answer(&mut self, method: &str) -> Result<Answer, NoAnswer> {
        loop {
            let end = loop {
                if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                    break i;
                }
                if !self.fill()? {
                    return Err(NoAnswer::Closed(self.buf.len()));
                }
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let status = status_line
                .strip_prefix("HTTP/1.")
                .and_then(|s| s.get(2..5))
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(|| NoAnswer::Garbled(short(status_line, 80)))?;
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let mut a = Answer { status, headers, body: Vec::new() };
            if method == "HEAD" || status == 204 || status == 304 {
                return Ok(a);
            }
            let chunked = a.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            if chunked {
                loop {
                    let line = self.line(a.body.len())?;
                    let size = String::from_utf8_lossy(&line);
                    let size = size.split(';').next().unwrap_or_default().trim();
                    let n = usize::from_str_radix(size, 16)
                        .map_err(|_| NoAnswer::Garbled(format!("chunk size {size:?}")))?;
                    if n == 0 {
                        while !self.line(a.body.len())?.is_empty() {}
                        return Ok(a);
                    }
                    self.need(n + 2, a.body.len())?;
                    a.body.extend_from_slice(&self.buf[..n]);
                    self.buf.drain(..n + 2);
                }
            } else if let Some(len) = a.header("content-length") {
                let n: usize = len.parse().map_err(|_| NoAnswer::Garbled(format!("content-length {len:?}")))?;
                self.need(n, 0)?;
                a.body = self.buf.drain(..n).collect();
                return Ok(a);
            } else {
                while self.fill()? {}
                a.body = std::mem::take(&mut self.buf);
                return Ok(a);
            }
        }
    }
}

/// Sends the requests of one unit, in order, on one connection (a new one if the server
/// closed a kept-alive connection before the next request: counted in `resent`).
fn exchange(port: u16, reqs: &[Req], timeout: Duration, resent: &AtomicU64) -> Vec<Result<Answer, NoAnswer>> {
    let mut out = Vec::new();
    let mut conn: Option<Conn> = None;
    for (k, req) in reqs.iter().enumerate() {
        let mut attempt = 0;
        let result = loop {
            let fresh = conn.is_none();
            if fresh {
                match Conn::open(port, timeout) {
                    Ok(c) => conn = Some(c),
                    Err(e) => break Err(e),
                }
            }
            let c = conn.as_mut().expect("opened above");
            c.deadline = Instant::now() + timeout;
            // A write error is not the end: the server may have answered before it stopped
            // reading (a 413, a parse error), and that answer is still to be read.
            let wrote = c.stream.write_all(&req.bytes).and_then(|()| c.stream.flush());
            let got = c.answer(&req.method);
            match got {
                Err(NoAnswer::Closed(0)) | Err(NoAnswer::Io(_)) if !fresh && attempt == 0 && k > 0 => {
                    // The server closed the kept-alive connection: resend on a new one.
                    resent.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                    attempt += 1;
                }
                Err(e) => {
                    break Err(match (e, wrote) {
                        (NoAnswer::Closed(0), Err(w)) => NoAnswer::Io(format!("writing: {w}; then closed")),
                        (e, _) => e,
                    });
                }
                Ok(a) => break Ok(a),
            }
        };
        let close = match &result {
            Ok(a) => a.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
            Err(_) => true,
        };
        if close {
            conn = None;
        }
        out.push(result);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Judging and counting.

#[derive(Default)]
struct Stats {
    sent: u64,
    by_status: BTreeMap<u16, u64>,
    /// Per category: requests, 2xx, 3xx, 4xx, 5xx, no answer.
    by_cat: BTreeMap<&'static str, [u64; 6]>,
    /// Malformed HTTP, per kind: answers by status ("none": no answer).
    by_kind: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// Distinct 5xx and non-OperationOutcome errors (status and body start): count, and
    /// the first request.
    distinct: BTreeMap<String, (u64, String)>,
    non_oo: u64,
    non_oo_examples: Vec<String>,
    oauth_errors: u64,
    five_xx: u64,
    five_xx_examples: Vec<String>,
    no_answer: u64,
    no_answer_kinds: BTreeMap<String, u64>,
    no_answer_examples: Vec<String>,
    kickoffs_accepted: u64,
    cancels: BTreeMap<u16, u64>,
    cancel_failures: u64,
}

const EXAMPLES: usize = 10;

/// Whether an error answer is an OperationOutcome; `token`: an RFC 6749 error is fine too.
/// Some(true): OperationOutcome, Some(false): RFC 6749 error, None: neither.
fn error_shape(req: &Req, a: &Answer) -> Option<bool> {
    if req.method == "HEAD" {
        // No body by definition: its type must still say FHIR JSON.
        return a.header("content-type").is_some_and(|c| c.starts_with("application/fhir+json")).then_some(true);
    }
    let v: Value = serde_json::from_slice(&a.body).ok()?;
    if v["resourceType"] == "OperationOutcome" {
        return Some(true);
    }
    (req.token && v["error"].is_string()).then_some(false)
}

fn body_start(a: &Answer) -> String {
    short(&String::from_utf8_lossy(&a.body[..a.body.len().min(300)]), 200)
}

impl Stats {
    /// Counts a 5xx or non-OperationOutcome error among the distinct ones.
    fn note(&mut self, req: &Req, a: &Answer, target: &str) {
        let key = format!("{} {}", a.status, short(&String::from_utf8_lossy(&a.body), 240));
        let e = self.distinct.entry(key).or_insert_with(|| (0, format!("[{target}] {}", req.summary)));
        e.0 += 1;
    }

    fn record(&mut self, target: &str, unit: u64, req: &Req, result: &Result<Answer, NoAnswer>) {
        let target = format!("{target} #{unit}");
        self.sent += 1;
        let cat = self.by_cat.entry(req.cat).or_default();
        cat[0] += 1;
        if !req.kind.is_empty() {
            let got = result.as_ref().map_or("none".to_string(), |a| a.status.to_string());
            *self.by_kind.entry(req.kind).or_default().entry(got).or_default() += 1;
        }
        match result {
            Ok(a) => {
                *self.by_status.entry(a.status).or_default() += 1;
                cat[match a.status {
                    500.. => 4,
                    400..=499 => 3,
                    300..=399 => 2,
                    _ => 1,
                }] += 1;
                if a.status >= 400 {
                    match error_shape(req, a) {
                        Some(true) => {}
                        Some(false) => self.oauth_errors += 1,
                        None => {
                            self.note(req, a, &target);
                            self.non_oo += 1;
                            if self.non_oo_examples.len() < EXAMPLES {
                                self.non_oo_examples.push(format!(
                                    "[{target}] {} -> {} {:?}: {}",
                                    req.summary,
                                    a.status,
                                    a.header("content-type").unwrap_or(""),
                                    body_start(a)
                                ));
                            }
                        }
                    }
                }
                if a.status >= 500 {
                    if error_shape(req, a).is_some() {
                        self.note(req, a, &target);
                    }
                    self.five_xx += 1;
                    if self.five_xx_examples.len() < EXAMPLES {
                        self.five_xx_examples.push(format!(
                            "[{target}] {} -> {}: {}",
                            req.summary,
                            a.status,
                            body_start(a)
                        ));
                    }
                }
            }
            Err(e) => {
                cat[5] += 1;
                self.no_answer += 1;
                *self.no_answer_kinds.entry(format!("{} / {}", req.cat, e.kind())).or_default() += 1;
                if self.no_answer_examples.len() < EXAMPLES {
                    self.no_answer_examples.push(format!("[{target}] {} -> {e}", req.summary));
                }
            }
        }
    }
}

/// Cancels an accepted kick-off (`DELETE` of its Content-Location).
fn cancel(t: &Target, a: &Answer, timeout: Duration, stats: &Mutex<Stats>) {
    let loc = a.header("content-location").unwrap_or_default();
    let path = loc.find("/fhir/").map_or(loc, |i| &loc[i..]);
    // On the smart server only the root client's Basic credentials get a kick-off through.
    let auth = if t.smart {
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("root:{}", t.secret));
        format!("Authorization: Basic {basic}\r\n")
    } else {
        String::new()
    };
    let req = format!("DELETE {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n", t.host());
    let got = Conn::open(t.port, timeout).and_then(|mut c| {
        c.stream.write_all(req.as_bytes()).map_err(|e| NoAnswer::Io(e.to_string()))?;
        c.answer("DELETE")
    });
    let mut s = stats.lock().expect("stats");
    match got {
        Ok(a) => *s.cancels.entry(a.status).or_default() += 1,
        Err(_) => s.cancel_failures += 1,
    }
}

// ---------------------------------------------------------------------------------------

fn server_errors(log: &std::path::Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<String> =
        text.lines().filter(|l| l.contains("ERROR") || l.contains("panicked")).map(|l| short(l, 300)).collect();
    let n = errors.len();
    (n, errors.into_iter().take(5).collect())
}

/// Sends connection `i` alone and prints its requests and answers.
fn replay(args: &Args, targets: &[Target; 2], i: u64, max: usize, timeout: Duration) {
    let t = &targets[target_of(args.seed, i)];
    let reqs = unit(args.seed, i, t, max);
    let answers = exchange(t.port, &reqs, timeout, &AtomicU64::new(0));
    for (req, a) in reqs.iter().zip(&answers) {
        let bytes = String::from_utf8_lossy(&req.bytes[..req.bytes.len().min(4000)]).into_owned();
        println!("--- [{} #{i}] {} ({}, {} bytes):", t.name, req.cat, req.summary, req.bytes.len());
        println!("{}", bytes.escape_debug());
        match a {
            Ok(a) => {
                println!("--- answer {}", a.status);
                for (k, v) in &a.headers {
                    println!("{k}: {v}");
                }
                println!("{}", String::from_utf8_lossy(&a.body[..a.body.len().min(2000)]));
            }
            Err(e) => println!("--- no answer: {e}"),
        }
    }
}

fn run(args: &Args) -> Res<bool> {
    if args.requests == 0 || args.threads == 0 {
        return Err("--requests and --threads must be at least 1".into());
    }
    let set = args.data.join(&args.set);
    let (files, _) = resource_files(&set)?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {nproc} cores; data: {} ({} resource files)", set.display(), files.len());
    println!("building sluice (release, --no-default-features)...");
    let bin = local_sluice_bin()?;
    let secret = {
        let mut r = Rng::with_seed(args.seed);
        format!("{:032x}", r.u128(..))
    };
    let mut none = start(&bin, "none", &["--auth", "none"], &files, String::new())?;
    let mut smart =
        start(&bin, "smart", &["--auth", "smart", "--root-client-secret", &secret], &files, secret.clone())?;
    prepare(&mut none)?;
    // The smart server gets the same "real" values: ids it does not hold, URLs signed by
    // another server's key.
    smart.export_id.clone_from(&none.export_id);
    smart.files.clone_from(&none.files);
    smart.patients.clone_from(&none.patients);
    println!(
        "servers: none {} (pid {}), smart {} (pid {}); setup export {} with {} files, {} patients",
        none.server.url,
        none.server.child.id(),
        smart.server.url,
        smart.server.child.id(),
        none.export_id,
        none.files.len(),
        none.patients.len()
    );
    let targets = [none, smart];
    let max = args.max_body_mib << 20;
    let timeout = Duration::from_secs(args.timeout);
    if let Some(i) = args.unit {
        replay(args, &targets, i, max, timeout);
        return Ok(true);
    }
    println!(
        "sending {} requests, seed {}, {} threads, answer timeout {} s, bodies up to {} MiB",
        args.requests, args.seed, args.threads, args.timeout, args.max_body_mib
    );
    let started = Instant::now();
    let stats = Mutex::new(Stats::default());
    let per_target: Vec<Mutex<Stats>> = targets.iter().map(|_| Mutex::new(Stats::default())).collect();
    let next_unit = AtomicU64::new(0);
    let reserved = AtomicU64::new(0);
    let resent = AtomicU64::new(0);
    let dead = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..args.threads {
            s.spawn(|| {
                loop {
                    let i = next_unit.fetch_add(1, Ordering::Relaxed);
                    // A quarter of the connections go to the smart server.
                    let which = target_of(args.seed, i);
                    let t = &targets[which];
                    let mut reqs = unit(args.seed, i, t, max);
                    let before = reserved.fetch_add(reqs.len() as u64, Ordering::Relaxed);
                    if before >= args.requests || dead.load(Ordering::Relaxed) {
                        break;
                    }
                    reqs.truncate((args.requests - before) as usize);
                    let answers = exchange(t.port, &reqs, timeout, &resent);
                    for (req, a) in reqs.iter().zip(&answers) {
                        stats.lock().expect("stats").record(t.name, i, req, a);
                        per_target[which].lock().expect("stats").record(t.name, i, req, a);
                        if let Ok(a) = a
                            && req.kickoff
                            && a.status == 202
                        {
                            stats.lock().expect("stats").kickoffs_accepted += 1;
                            cancel(t, a, timeout, &stats);
                        }
                    }
                    if i.is_multiple_of(500) && targets.iter().any(|t| !t.server.running()) {
                        dead.store(true, Ordering::Relaxed);
                    }
                    if i.is_multiple_of(4000) {
                        let sent = stats.lock().expect("stats").sent;
                        eprintln!("{sent} requests sent, {:.0} s", started.elapsed().as_secs_f64());
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let s = stats.into_inner().expect("stats");

    println!();
    println!("requests sent: {} in {elapsed:.1} s ({:.0}/s)", s.sent, s.sent as f64 / elapsed.max(1e-9));
    for (t, ps) in targets.iter().zip(&per_target) {
        let ps = ps.lock().expect("stats");
        println!("  {} server: {} requests, {} without an answer", t.name, ps.sent, ps.no_answer);
    }
    println!(
        "kept-alive connections the server closed before a next request (resent on a new one): {}",
        resent.load(Ordering::Relaxed)
    );
    println!();
    println!("answers by status:");
    for (code, n) in &s.by_status {
        println!("  {code}: {n}");
    }
    println!("  no answer: {}", s.no_answer);
    println!();
    println!(
        "{:<18} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9}",
        "category", "requests", "2xx", "3xx", "4xx", "5xx", "no answer"
    );
    for (cat, c) in &s.by_cat {
        println!("{cat:<18} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9}", c[0], c[1], c[2], c[3], c[4], c[5]);
    }
    println!();
    println!("malformed HTTP, answers by kind:");
    for (kind, got) in &s.by_kind {
        let got: Vec<String> = got.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        println!("  {kind}: {}", got.join(", "));
    }
    println!();
    println!(
        "kick-offs accepted (202) and cancelled at once: {} (cancel answers: {:?}; failed: {})",
        s.kickoffs_accepted, s.cancels, s.cancel_failures
    );
    println!("token endpoint errors in RFC 6749 form (JSON with `error`): {}", s.oauth_errors);
    println!("4xx/5xx answers without an OperationOutcome: {}", s.non_oo);
    for e in &s.non_oo_examples {
        println!("  {e}");
    }
    println!("5xx answers: {}", s.five_xx);
    for e in &s.five_xx_examples {
        println!("  {e}");
    }
    if !s.distinct.is_empty() {
        println!("distinct 5xx and non-OperationOutcome answers (status and body: count, first request):");
        for (k, (n, first)) in &s.distinct {
            println!("  {k}: {n}, first {first}");
        }
    }
    println!("requests without an answer: {}", s.no_answer);
    for (k, n) in &s.no_answer_kinds {
        println!("  {k}: {n}");
    }
    for e in &s.no_answer_examples {
        println!("  e.g. {e}");
    }

    println!();
    let mut alive = true;
    for t in &targets {
        let running = t.server.running();
        let metadata = if running {
            let r = agent().get(format!("{}/fhir/metadata", t.server.url)).call();
            r.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
        } else {
            Err("not running".into())
        };
        let ok = running && metadata == Ok(200);
        alive &= ok;
        let mib = |k: Option<u64>| k.map_or("?".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        println!(
            "{} server: {}; GET /fhir/metadata: {}; peak RSS (VmHWM) {}, final RSS {}; CPU {:.1} s",
            t.name,
            if running { "alive" } else { "DEAD" },
            match &metadata {
                Ok(s) => s.to_string(),
                Err(e) => e.clone(),
            },
            mib(t.server.memory_kib("VmHWM")),
            mib(t.server.memory_kib("VmRSS")),
            t.server.cpu_seconds()
        );
        let (n, errors) = server_errors(&t.log);
        println!("  log lines at ERROR level or with a panic: {n} ({})", t.log.display());
        for e in errors {
            println!("    {e}");
        }
    }
    let pass = alive && s.five_xx == 0 && s.non_oo == 0;
    println!();
    println!(
        "{}: servers alive and answering, {} 5xx, {} errors without an OperationOutcome ({} without an answer)",
        if pass { "PASS" } else { "FAIL" },
        s.five_xx,
        s.non_oo,
        s.no_answer
    );
    Ok(pass)
}
