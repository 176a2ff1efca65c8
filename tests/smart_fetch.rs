//! A real bulk client, unmodified: smart-fetch (PyPI) against the real `sluice serve`.
//! A system export, a group export, and a group export with `--type-filter`, each must exit
//! 0 with exactly the data set's resources per type, every line as loaded apart from
//! `meta.versionId` / `meta.lastUpdated`. Then the same against `sluice serve --auth smart`
//! with smart-fetch's SMART Backend Services options (`--smart-client-id`, `--smart-key`):
//! an RSA key as a PEM file (RS384), and a P-384 key as a private JWKS file (ES384) with
//! token-authorized downloads; without credentials, or as an unregistered client, it fails.
//!
//! smart-fetch is found through `SLUICE_TEST_SMART_FETCH` (the path of its executable, as
//! `.ci/run` sets it after installing the pinned versions of `.ci/smart-fetch-requirements.txt`
//! into a virtual environment) or as `smart-fetch` on the `PATH`. Without it the tests print
//! a skip notice; with `CI=true` they fail.

mod common;

use base64::Engine as _;
use common::*;
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

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
    external_tool("SLUICE_TEST_SMART_FETCH", "smart-fetch", ".ci/run installs it from .ci/smart-fetch-requirements.txt")
}

/// Runs `smart-fetch bulk --fhir-url <server> <args> <out>` (bounded by `timeout`) and
/// returns what it wrote: per type, the lines of its `<Type>.<n>.ndjson.gz` files.
fn run(bin: &Path, srv: &Server, args: &[&str]) -> Files {
    let (run, out) = fetch(bin, srv, args);
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "smart-fetch {args:?} failed ({}):\n{stdout}\n{stderr}", run.status);
    assert!(!stdout.contains("Skipping"), "smart-fetch skipped a type:\n{stdout}");
    written(&out)
}

/// Runs `smart-fetch bulk --fhir-url <server> <args> <out>` (bounded by `timeout`); returns
/// how it ended and the temporary folder holding `<out>` (`export`).
fn fetch(bin: &Path, srv: &Server, args: &[&str]) -> (Output, TempDir) {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("timeout")
        .arg("300")
        .arg(bin)
        .args(["bulk", "--fhir-url", &srv.fhir("")])
        .args(args)
        .arg(out.path().join("export"))
        .output()
        .expect("running smart-fetch");
    (run, out)
}

/// Per type, the lines of the `<Type>.<n>.ndjson.gz` files smart-fetch wrote in `out`.
fn written(out: &TempDir) -> Files {
    let dir = out.path().join("export");
    let mut files = Files::new();
    let Ok(entries) = std::fs::read_dir(&dir) else { return files };
    for entry in entries {
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

// ---------------------------------------------------------------------------------------
// SMART Backend Services: `sluice serve --auth smart`, smart-fetch with a client's key
// ---------------------------------------------------------------------------------------

/// The root client's secret of the `--auth smart` servers (HTTP Basic `root:<secret>`).
const ROOT_SECRET: &str = "smart-fetch-root-secret";

/// A server over the loaded data set with SMART Backend Services authorization.
fn smart_server(args: &[&str]) -> Server {
    let mut all = vec!["--auth", "smart", "--root-client-secret", ROOT_SECRET];
    all.extend(args);
    Server::loaded(&all)
}

/// A client's key pair, made with the `openssl` CLI.
struct ClientKey {
    /// What smart-fetch's `--smart-key` is given: a private key file (`.pem` or `.jwks`).
    file: PathBuf,
    /// The public JWK (with `kid` and `alg`) registered with the server.
    public: Value,
}

/// Runs `openssl <args>`; returns its standard output.
fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().expect("running openssl (needed to make the client's keys)");
    assert!(out.status.success(), "openssl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// An RSA key pair; smart-fetch gets the private key as a PEM file and signs with RS384,
/// naming the key by its RFC 7638 thumbprint (jwcrypto's `kid` for a PEM key), so the
/// registered public JWK carries that `kid`.
fn rsa_pem_key(dir: &Path) -> ClientKey {
    let file = dir.join("client-key.pem");
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", file.to_str().unwrap()]);
    let key = EncodingKey::from_rsa_pem(&std::fs::read(&file).unwrap()).expect("openssl's RSA key");
    let mut public = Jwk::from_encoding_key(&key, Algorithm::RS384).unwrap();
    public.common.key_id = Some(public.thumbprint(ThumbprintHash::SHA256).unwrap());
    ClientKey { file, public: serde_json::to_value(&public).unwrap() }
}

/// A P-384 key pair; smart-fetch gets a private JWK Set (`kid`, `alg` ES384, `key_ops`
/// sign), built from the numbers `openssl pkey -text` prints.
fn ec_jwks_key(dir: &Path) -> ClientKey {
    const KID: &str = "smart-fetch-es384";
    const LEN: usize = 48; // P-384 coordinates and private scalar, in bytes
    let pem = dir.join("client-key-ec.pem");
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", pem.to_str().unwrap()]);
    let text = openssl(&["pkey", "-in", pem.to_str().unwrap(), "-noout", "-text"]);
    // The hex bytes of a `name:` block ("priv:", "pub:"): the indented lines after it.
    let block = |name: &str| -> Vec<u8> {
        let hex: String = text
            .lines()
            .skip_while(|l| l.trim() != name)
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .flat_map(|l| l.trim().split(':').filter(|b| !b.is_empty()).map(String::from).collect::<Vec<_>>())
            .collect();
        hex::decode(hex).unwrap_or_else(|e| panic!("openssl's {name} block: {e}\n{text}"))
    };
    let mut d: Vec<u8> = block("priv:").into_iter().skip_while(|b| *b == 0).collect();
    assert!(d.len() <= LEN, "a P-384 private key:\n{text}");
    d.splice(0..0, std::iter::repeat_n(0, LEN - d.len()));
    let point = block("pub:");
    assert!(point.len() == 1 + 2 * LEN && point[0] == 4, "an uncompressed P-384 point:\n{text}");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let public = json!({
        "kty": "EC", "crv": "P-384", "kid": KID, "alg": "ES384",
        "x": b64(&point[1..1 + LEN]), "y": b64(&point[1 + LEN..]),
    });
    // The same public key as jsonwebtoken derives from the PEM (the numbers were read right).
    let key = EncodingKey::from_ec_pem(&std::fs::read(&pem).unwrap()).expect("openssl's EC key");
    let derived = serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::ES384).unwrap()).unwrap();
    assert_eq!((&derived["x"], &derived["y"]), (&public["x"], &public["y"]), "the public key read from openssl");
    let mut private = public.clone();
    private["d"] = b64(&d).into();
    private["key_ops"] = json!(["sign"]);
    let file = dir.join("client-key.jwks");
    std::fs::write(&file, json!({"keys": [private]}).to_string()).unwrap();
    ClientKey { file, public }
}

/// Registers client `id` with `public` as its only key (`PUT /Client/<id>` as the root
/// client), allowed `system/*.read`.
fn register(srv: &Server, id: &str, public: &Value) {
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("root:{ROOT_SECRET}")));
    let client = json!({
        "resourceType": "Client",
        "grant_types": ["client_credentials"],
        "auth": {"client_credentials": {
            "client_assertion_types": ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"],
            "access_token_expiration": 300,
            "token_format": "jwt",
        }},
        "scope": ["system/*.read"],
        "jwks": {"keys": [public]},
    });
    let url = format!("{}/Client/{id}", srv.url);
    let headers = [("authorization", basic.as_str()), ("content-type", "application/json")];
    let r = send("PUT", &url, &headers, Some(client.to_string().as_bytes()));
    assert!(matches!(r.status, 200 | 201), "PUT {url}: {} {}", r.status, r.text());
}

/// smart-fetch `args` fail (not time out) without writing any data, saying `says`.
fn assert_refused(bin: &Path, srv: &Server, args: &[&str], says: &str) {
    let (run, out) = fetch(bin, srv, args);
    let output = format!("{}\n{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(
        !run.status.success() && run.status.code() != Some(124),
        "smart-fetch {args:?} ({}):\n{output}",
        run.status
    );
    assert!(output.contains(says), "smart-fetch {args:?} does not say '{says}':\n{output}");
    assert_eq!(written(&out), Files::new(), "smart-fetch {args:?} wrote data");
}

/// The README's path: an RSA key made with openssl, the private key as a PEM file. Without
/// credentials smart-fetch's kick-off is refused (401) and it gives up; as a client nobody
/// registered, the token endpoint's refusal reaches the user; registered, the system export
/// holds every resource of the exported types.
#[test]
fn smart_fetch_backend_services_pem() {
    let Some(bin) = smart_fetch() else { return };
    let srv = smart_server(&[]);
    let keys = tempfile::tempdir().unwrap();
    let key = rsa_pem_key(keys.path());
    register(&srv, "smart-fetch-rsa", &key.public);
    let pem = key.file.to_str().unwrap();

    assert_refused(&bin, &srv, &["--type", "Patient"], "without authentication");
    let stranger = ["--smart-client-id", "not-registered", "--smart-key", pem, "--type", "Patient"];
    assert_refused(&bin, &srv, &stranger, "no client 'not-registered' is registered");

    let files = run(&bin, &srv, &["--smart-client-id", "smart-fetch-rsa", "--smart-key", pem, "--no-default-filters"]);
    let expected = only(reference().all(), &SMART_FETCH_TYPES);
    assert_fetched(&files, &expected);
}

/// A P-384 key as a private JWK Set (ES384), and files downloaded with the export's bearer
/// token (`--download-auth token`, `requiresAccessToken: true`). A system export: smart-fetch
/// asks for `system/<Type>.read` of its own list of types, which lacks Group, so this
/// server refuses it a group export (403, "needs read access to Group").
#[test]
fn smart_fetch_backend_services_jwks_token_downloads() {
    let Some(bin) = smart_fetch() else { return };
    let srv = smart_server(&["--download-auth", "token"]);
    let keys = tempfile::tempdir().unwrap();
    let key = ec_jwks_key(keys.path());
    register(&srv, "smart-fetch-ec", &key.public);
    let jwks = key.file.to_str().unwrap();

    let types = ["Patient", "Condition"];
    let args = [
        "--smart-client-id",
        "smart-fetch-ec",
        "--smart-key",
        jwks,
        "--type",
        "Patient,Condition",
        "--no-default-filters",
    ];
    let files = run(&bin, &srv, &args);
    let expected = only(reference().all(), &types);
    assert_fetched(&files, &expected);
}
