//! `sluice export`, the Bulk Data client subcommand, against the real server: the three
//! levels, GET and POST, gzip, partial manifests, `organizeOutputBy`, a `--since-last`
//! chain, a download cut off mid-file and resumed with a `Range` request (through a small
//! proxy in the test that records what the client asks), Ctrl-C (cancel or leave running)
//! and `--resume` from a `.part` file, refusals and failures with their exit codes, and
//! SMART Backend Services (an EC key as a JWK, an RSA key as PEM, bearer-protected
//! downloads). Every downloaded line is checked against the data set read from its files.

mod common;

use common::*;
use flate2::read::MultiGzDecoder;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};

/// A slow export into many small files (as tests/partial.rs has it).
const SLOW: &[&str] = &["--throttle-ms", "100", "--max-file-resources", "400", "--batch-bytes", "524288"];

/// Runs `sluice export <args>` to the end, stdin not a terminal.
fn export(args: &[&str]) -> Output {
    sluice().arg("export").args(args).stdin(Stdio::null()).output().expect("running sluice export")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing the output when it differs.
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "sluice export exited {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
}

/// The `manifest.json` saved in `dir`.
fn saved_manifest(dir: &Path) -> Value {
    let text =
        std::fs::read(dir.join("manifest.json")).unwrap_or_else(|e| panic!("{}/manifest.json: {e}", dir.display()));
    serde_json::from_slice(&text).expect("manifest.json is JSON")
}

/// Reads the files a saved manifest's `list` names (paths relative to `dir`), checks each
/// one's `count` (resources: lines less `organizeOutputBy` headers), size and SHA-256,
/// and returns the lines per resource type (headers left out).
fn local_files(dir: &Path, m: &Value, list: &str) -> Files {
    let mut files = Files::new();
    for e in m[list].as_array().unwrap_or_else(|| panic!("no {list} array: {m}")) {
        let name = e["url"].as_str().expect("url");
        assert!(!name.contains("..") && !name.starts_with('/'), "a local name: {name}");
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(size) = e["extension"]["size"].as_u64() {
            assert_eq!(bytes.len() as u64, size, "size of {name}");
        }
        if let Some(sha) = e["extension"]["sha256"].as_str() {
            assert_eq!(hex::encode(Sha256::digest(&bytes)), sha, "sha256 of {name}");
        }
        let text = if name.ends_with(".gz") {
            let mut out = String::new();
            MultiGzDecoder::new(&bytes[..]).read_to_string(&mut out).unwrap_or_else(|e| panic!("gunzip {name}: {e}"));
            out
        } else {
            String::from_utf8(bytes).expect("UTF-8")
        };
        let mut resources = 0;
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: {e}: {line}"));
            let t = v["resourceType"].as_str().expect("resourceType").to_string();
            if t == "Parameters" && m.get("outputOrganizedBy").is_some() {
                continue;
            }
            if let Some(want) = e["type"].as_str() {
                assert_eq!(t, want, "a line of {name}");
            }
            resources += 1;
            files.entry(t).or_default().push(line.to_string());
        }
        assert_eq!(Some(resources), e["count"].as_u64(), "count of {name}");
    }
    files
}

/// No `.part` or temporary file is left in `dir` (recursively).
fn assert_no_leftovers(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("out dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            assert_no_leftovers(&p);
        } else {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!n.ends_with(".part") && !n.ends_with(".tmp"), "left over: {}", p.display());
        }
    }
}

/// Checks a finished export in `dir`: the saved manifest's output holds exactly `expected`.
fn check_folder(dir: &Path, expected: &Expected) -> Value {
    let m = saved_manifest(dir);
    assert!(m["transactionTime"].as_str().is_some_and(is_instant), "transactionTime: {m}");
    check_content(&local_files(dir, &m, "output"), expected);
    assert_no_leftovers(dir);
    m
}

/// `expected` limited to `types`.
fn only(expected: Expected, types: &[&str]) -> Expected {
    expected.into_iter().filter(|(t, _)| types.contains(&t.as_str())).collect()
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("sluice-client-").tempdir().expect("temp dir")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// System level (GET), patient level (POST, with `_type`), group level (gzip): every
/// line as the data set has it; files under their manifest names, `manifest.json` beside.
#[test]
fn three_levels_get_post_and_gzip() {
    let srv = Server::loaded(&[]);
    let base = srv.fhir("");

    let out = tmp();
    let o = export(&[&base, "--out", path(out.path())]);
    assert_exit(&o, 0);
    let m = check_folder(out.path(), &reference().all());
    assert_eq!(m["request"], srv.fhir("/$export"));
    assert!(out.path().join("Observation.ndjson").is_file(), "files keep their manifest names");
    assert!(String::from_utf8_lossy(&o.stdout).contains("exported 38473 resources"), "{}", stderr(&o));
    assert!(stderr(&o).contains("status URL: "), "{}", stderr(&o));

    let out = tmp();
    let o = export(&[&base, "--patient", "--post", "--type", "Patient,Condition", "--out", path(out.path())]);
    assert_exit(&o, 0);
    check_folder(out.path(), &only(reference().all_compartments(), &["Patient", "Condition"]));

    let out = tmp();
    let o = export(&[&base, "--group", GROUP_ID, "--gzip", "--parallel", "2", "--out", path(out.path())]);
    assert_exit(&o, 0);
    let m = check_folder(out.path(), &reference().all_compartments());
    for e in m["output"].as_array().unwrap() {
        assert!(e["url"].as_str().unwrap().ends_with(".ndjson.gz"), "{e}");
    }
    let request = m["request"].as_str().unwrap();
    assert!(request.starts_with(&srv.fhir(&format!("/Group/{GROUP_ID}/$export?"))), "{request}");
}

/// `allowPartialManifests`: the client reads the pages while the export runs (files of
/// early pages are downloaded before the export ends) and ends with every file once.
/// `organizeOutputBy=Patient`: files of patient blocks, counts without the headers.
#[test]
fn partial_manifests_and_organize_output_by() {
    let srv = Server::loaded(SLOW);
    let out = tmp();
    let o = export(&[&srv.fhir(""), "--partial-manifests", "--out", path(out.path())]);
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(err.contains("partial manifest: "), "no partial manifest was read:\n{err}");
    let m = check_folder(out.path(), &reference().all());
    assert!(m.get("link").is_none(), "the saved manifest merges the pages: {m}");
    let names: Vec<&str> = m["output"].as_array().unwrap().iter().map(|e| e["url"].as_str().unwrap()).collect();
    assert!(names.contains(&"Observation-2.ndjson"), "{names:?}");
    let unique: BTreeSet<&&str> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "every file once");
    drop(srv);

    let srv = Server::loaded(&["--max-file-resources", "500"]);
    let out = tmp();
    let args = [&srv.fhir("") as &str, "--patient", "--organize-output-by", "Patient", "--type", "Patient,Condition"];
    let o = export(&[&args[..], &["--out", path(out.path())]].concat());
    assert_exit(&o, 0);
    let m = check_folder(out.path(), &only(reference().all_compartments(), &["Patient", "Condition"]));
    assert_eq!(m["outputOrganizedBy"], "Patient");
    assert!(m["output"].as_array().unwrap().len() > 1, "several files of blocks: {m}");
    assert!(out.path().join("patients-2.ndjson").is_file());
}

/// `--since-last`: the first run exports everything, the next only what changed since the
/// first's `transactionTime` (the new version of a patient), the third nothing; each run
/// in its own subfolder; the state file keeps the last `transactionTime` per source.
#[test]
fn since_last_chain_misses_nothing_and_repeats_nothing() {
    let srv = Server::loaded(&[]);
    let out = tmp();
    let args = |out: &Path| {
        vec![
            srv.fhir(""),
            "--type".into(),
            "Patient,Condition".into(),
            "--since-last".into(),
            "--out".into(),
            path(out).to_string(),
        ]
    };
    let run = |out: &Path| {
        let a = args(out);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = export(&a);
        assert_exit(&o, 0);
        o
    };
    let state = |out: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(out.join(".sluice-export-state.json")).expect("state file")).unwrap()
    };
    let folders = |out: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> =
            std::fs::read_dir(out).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        v.sort();
        v
    };
    let source = srv.fhir("/$export");

    run(out.path());
    let first = folders(out.path());
    assert_eq!(first.len(), 1, "one folder per run");
    let m1 = check_folder(&first[0], &reference().types(&["Patient", "Condition"]));
    let t1 = m1["transactionTime"].as_str().unwrap().to_string();
    assert_eq!(state(out.path())["sources"][&source]["transactionTime"], t1.as_str());
    assert!(m1.get("deleted").is_none(), "the first run has no _since");

    // A new version of one patient.
    let id = reference().patient_ids()[0].to_string();
    let mut patient = reference().resource("Patient", &id);
    patient["active"] = json!(false);
    let r = put_json(&srv.fhir(&format!("/Patient/{id}")), &patient);
    assert_eq!(r.status, 200, "{}", r.text());

    run(out.path());
    let second: Vec<PathBuf> = folders(out.path()).into_iter().filter(|f| !first.contains(f)).collect();
    assert_eq!(second.len(), 1);
    let want =
        Expected::from([("Patient".to_string(), BTreeMap::from([(id.clone(), Cow::Owned(patient.to_string()))]))]);
    let m2 = check_folder(&second[0], &want);
    assert_eq!(m2["request"].as_str().unwrap(), format!("{source}?_type=Patient%2CCondition&_since={}", enc(&t1)));
    assert_eq!(m2["deleted"], json!([]));
    let t2 = m2["transactionTime"].as_str().unwrap().to_string();
    assert!(t2 > t1, "{t2} after {t1}");
    assert_eq!(state(out.path())["sources"][&source]["transactionTime"], t2.as_str());

    run(out.path());
    let all = folders(out.path());
    assert_eq!(all.len(), 3);
    let third = all.iter().find(|f| !first.contains(f) && !second.contains(f)).unwrap();
    let m3 = check_folder(third, &Expected::new());
    assert_eq!(m3["output"], json!([]), "nothing changed since the second run");
    assert!(m3["request"].as_str().unwrap().ends_with(&enc(&t2)));
}

/// A proxy between the client and the server that records each request's head and cuts
/// the first plain GET of every `/files/` path after `cut` bytes of its body.
struct Proxy {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
    upstream: Arc<Mutex<String>>,
}

impl Proxy {
    fn start(cut: usize) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let upstream = Arc::new(Mutex::new(String::new()));
        let cut_once = Arc::new(Mutex::new(BTreeSet::new()));
        let (h, u) = (heads.clone(), upstream.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (h, u, c) = (h.clone(), u.lock().unwrap().clone(), cut_once.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, &u, &h, &c, cut);
                });
            }
        });
        Proxy { url, heads, upstream }
    }

    /// The request heads seen, lowercase.
    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn relay(
    client: TcpStream,
    upstream: &str,
    heads: &Mutex<Vec<String>>,
    cut_once: &Mutex<BTreeSet<String>>,
    cut: usize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if !lower.starts_with("connection:") {
            head.push_str(&line);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let lower = head.to_ascii_lowercase();
    heads.lock().unwrap().push(lower.clone());
    let path = lower.split_whitespace().nth(1).unwrap_or_default().split('?').next().unwrap_or_default().to_string();
    let cut_this =
        lower.starts_with("get /files/") && !lower.contains("\nrange:") && cut_once.lock().unwrap().insert(path);
    let mut server = TcpStream::connect(upstream)?;
    server.write_all(head.as_bytes())?;
    server.write_all(b"connection: close\r\n\r\n")?;
    server.write_all(&body)?;
    let mut client = client;
    if !cut_this {
        std::io::copy(&mut server, &mut client)?;
        return Ok(());
    }
    // Pass the response head, then `cut` bytes of the body, then drop the connection.
    let mut from = BufReader::new(server);
    loop {
        let mut line = String::new();
        from.read_line(&mut line)?;
        client.write_all(line.as_bytes())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut part = vec![0; cut];
    from.read_exact(&mut part)?;
    client.write_all(&part)?;
    client.flush()?;
    client.shutdown(std::net::Shutdown::Both)
}

/// Each file's first download breaks off after 3000 bytes; the client retries with
/// `Range: bytes=3000-`, the server answers 206, and every file ends up whole and verified.
#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let proxy = Proxy::start(3000);
    // The server announces its base URL (the proxy's), so it listens on a port chosen here.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    *proxy.upstream.lock().unwrap() = listen.clone();
    let _srv = Server::loaded(&["--listen", &listen, "--base-url", &proxy.url]);
    let out = tmp();
    let base = format!("{}/fhir", proxy.url);
    let o = export(&[&base, "--type", "Patient,Condition,Encounter", "--retries", "3", "--out", path(out.path())]);
    assert_exit(&o, 0);
    check_folder(out.path(), &reference().types(&["Patient", "Condition", "Encounter"]));
    let err = stderr(&o);
    assert!(err.contains("retrying Patient.ndjson"), "{err}");
    let heads = proxy.heads();
    for t in ["Patient", "Condition", "Encounter"] {
        let file = format!("/{t}.ndjson?");
        let gets: Vec<&String> =
            heads.iter().filter(|h| h.starts_with("get /files/") && h.contains(&file.to_ascii_lowercase())).collect();
        assert_eq!(gets.len(), 2, "{t}: a cut download and a resumed one: {gets:#?}");
        assert!(!gets[0].contains("\nrange:"), "{}", gets[0]);
        assert!(gets[1].contains("\nrange: bytes=3000-\r\n"), "{t}: resumed from byte 3000: {}", gets[1]);
    }
}

/// Starts `sluice export` with `args`, waits for its status URL on stderr, sends it SIGINT
/// and returns the status URL and its output.
fn interrupt(args: &[&str]) -> (String, Output) {
    let mut child = sluice()
        .arg("export")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting sluice export");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let status = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "sluice export ended without a status URL:\n{seen}");
        seen.push_str(&line);
        if let Some(url) = line.trim().strip_prefix("status URL: ") {
            break url.to_string();
        }
    };
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    err.read_to_string(&mut seen).unwrap();
    let mut o = child.wait_with_output().unwrap();
    o.stderr = seen.into_bytes();
    (status, o)
}

/// Ctrl-C: with `--cancel-on-interrupt` the export is deleted on the server; without, and
/// stdin not a terminal, it keeps running and the client says how to resume. `--resume`
/// then finishes it, continuing a truncated `.part` file with a Range request.
#[test]
fn ctrl_c_cancels_or_leaves_running_and_resume_finishes() {
    let srv = Server::loaded(SLOW);
    let base = srv.fhir("");
    let out = tmp();

    let (status, o) = interrupt(&[&base, "--cancel-on-interrupt", "--out", path(out.path())]);
    assert_exit(&o, 7);
    assert!(stderr(&o).contains("the export was cancelled on the server"), "{}", stderr(&o));
    assert_outcome(&get(&status), 404, &[]);

    let (status, o) = interrupt(&[&base, "--out", path(out.path())]);
    assert_exit(&o, 7);
    let err = stderr(&o);
    assert!(err.contains("keeps running on the server"), "{err}");
    assert!(err.contains(&format!("sluice export '{base}' --resume '{status}' --out")), "{err}");

    // A half-downloaded file from the interrupted run.
    let m = complete_manifest(&poll_until_done(&status), &srv.fhir("/$export"));
    let entry = &m["output"][0];
    let name = entry["url"].as_str().unwrap().split('?').next().unwrap().rsplit('/').next().unwrap().to_string();
    let whole = get(entry["url"].as_str().unwrap()).body;
    let half = whole.len() / 2;
    std::fs::write(out.path().join(format!("{name}.part")), &whole[..half]).unwrap();

    let o = export(&["--resume", &status, "--out", path(out.path())]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains(&format!("resuming {name} from byte {half}")), "{}", stderr(&o));
    check_folder(out.path(), &reference().all());

    // Resumed again: every file is already there and verified.
    let o = export(&["--resume", &status, "--out", path(out.path())]);
    assert_exit(&o, 0);
    assert!(String::from_utf8_lossy(&o.stdout).contains("files were already complete on disk"));
    check_folder(out.path(), &reference().all());
}

/// A refused kick-off exits 3 with the server's diagnostics; an export that fails on the
/// server exits 4; bad arguments exit 2.
#[test]
fn refusals_and_failures_have_their_exit_codes() {
    let srv = Server::loaded(&[]);
    let out = tmp();
    let o = export(&[&srv.fhir(""), "--type", "NotAType", "--out", path(out.path())]);
    assert_exit(&o, 3);
    assert!(stderr(&o).contains("NotAType"), "{}", stderr(&o));

    let o = export(&[&srv.fhir(""), "--patient", "--group", GROUP_ID]);
    assert_exit(&o, 2);
    let o = export(&["--since-last", "--since", "2020-01-01"]);
    assert_exit(&o, 2);

    // Local export files go under <data-dir>/exports: a plain file there fails every export.
    let exports = srv.dir.join("exports");
    let _ = std::fs::remove_dir_all(&exports);
    std::fs::write(&exports, b"not a folder").unwrap();
    let o = export(&[&srv.fhir(""), "--type", "Patient", "--out", path(out.path())]);
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("the export failed on the server (HTTP 500)"), "{}", stderr(&o));
    assert!(!out.path().join(".sluice-export-state.json").exists());
}

// ---------------------------------------------------------------------------------------
// SMART Backend Services
// ---------------------------------------------------------------------------------------

const ROOT_SECRET: &str = "r00t-Secret-client-test";

/// `openssl genpkey` with `args` into `dir/name`; returns the PEM.
fn genpkey(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    let p = dir.join(name);
    let out = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&p)
        .output()
        .expect("running openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(p).unwrap()
}

/// A P-384 key as a private JWK (`kid`), and its public JWK.
fn ec_jwk(dir: &Path, kid: &str) -> (Value, Value) {
    let pem = genpkey(dir, "ec.pem", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]);
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    let mut public = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::ES384).unwrap();
    public.common.key_id = Some(kid.to_string());
    let public = serde_json::to_value(public).unwrap();
    // The private scalar: the 48-byte OCTET STRING after ECPrivateKey's version 1.
    let der = std::process::Command::new("openssl")
        .args(["pkey", "-outform", "DER", "-in"])
        .arg(dir.join("ec.pem"))
        .output()
        .unwrap()
        .stdout;
    let at = der.windows(5).position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x30]).expect("ECPrivateKey") + 5;
    use base64::Engine as _;
    let d = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&der[at..at + 48]);
    let mut private = public.clone();
    private["d"] = json!(d);
    (private, public)
}

/// Registers a backend-services client with `jwks` (root only).
fn register(srv: &Server, id: &str, jwks: &[Value]) {
    use base64::Engine as _;
    let body = json!({
        "resourceType": "Client",
        "grant_types": ["client_credentials"],
        "auth": {"client_credentials": {
            "client_assertion_types": ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"],
            "access_token_expiration": 120,
            "token_format": "jwt"
        }},
        "scope": ["system/*.read"],
        "jwks": {"keys": jwks},
    });
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("root:{ROOT_SECRET}")));
    let r = send(
        "PUT",
        &format!("{}/Client/{id}", srv.url),
        &[("content-type", "application/json"), ("authorization", &basic)],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(r.status, 201, "PUT /Client/{id}: {}", r.text());
}

/// With `--auth smart` and bearer-protected downloads: an EC key given as a JWK and an RSA
/// key given as PEM with `--kid` both export; a client the server does not know exits 6.
#[test]
fn smart_backend_services() {
    let srv = Server::loaded(&["--auth", "smart", "--root-client-secret", ROOT_SECRET, "--download-auth", "token"]);
    let keys = tmp();
    let (ec_private, ec_public) = ec_jwk(keys.path(), "ec-1");
    let rsa_pem = genpkey(keys.path(), "rsa.pem", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let rsa = jsonwebtoken::EncodingKey::from_rsa_pem(&rsa_pem).unwrap();
    let mut rsa_public = jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa, jsonwebtoken::Algorithm::RS384).unwrap();
    rsa_public.common.key_id = Some("rsa-1".into());
    register(&srv, "backend", &[ec_public, serde_json::to_value(rsa_public).unwrap()]);
    let jwk_file = keys.path().join("ec.jwk.json");
    std::fs::write(&jwk_file, ec_private.to_string()).unwrap();

    // Without credentials: refused.
    let out = tmp();
    let o = export(&[&srv.fhir(""), "--type", "Patient", "--out", path(out.path())]);
    assert_exit(&o, 6);

    let o = export(&[
        &srv.fhir(""),
        "--type",
        "Patient,Condition",
        "--client-id",
        "backend",
        "--key",
        path(&jwk_file),
        "--out",
        path(out.path()),
    ]);
    assert_exit(&o, 0);
    let m = check_folder(out.path(), &reference().types(&["Patient", "Condition"]));
    assert_eq!(m["requiresAccessToken"], true, "{m}");

    let out = tmp();
    let pem = keys.path().join("rsa.pem");
    let args = [&srv.fhir("") as &str, "--patient", "--type", "Patient", "--client-id", "backend", "--key", path(&pem)];
    let o =
        export(&[&args[..], &["--kid", "rsa-1", "--scope", "system/Patient.read", "--out", path(out.path())]].concat());
    assert_exit(&o, 0);
    check_folder(out.path(), &reference().types(&["Patient"]));

    // A PEM key without --kid is a usage error; an unknown client an authorization failure.
    let o = export(&[&args[..], &["--out", path(out.path())]].concat());
    assert_exit(&o, 2);
    let o = export(&[&srv.fhir(""), "--client-id", "nobody", "--key", path(&jwk_file), "--out", path(out.path())]);
    assert_exit(&o, 6);
    assert!(stderr(&o).contains("invalid_client"), "{}", stderr(&o));
}
