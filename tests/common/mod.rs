//! The harness shared by Sluice's integration tests.
//!
//! - [`Server`] runs the real `sluice` binary on a free port in its own data dir, started
//!   from a template store that holds the test data set (loaded once, see [`template`]).
//! - [`Reference`] is the data set read straight from the files, with the patient
//!   compartments computed by a small hand-written table: never by Sluice's own crates.
//! - The bulk-data client side: [`kickoff`], [`poll_until_done`], [`complete_manifest`],
//!   [`download_all`] and [`check_content`], which checks every exported line.
//!
//! Nothing here sleeps to synchronise: the server announces its address on stdout, and
//! export polling waits exactly the `Retry-After` the server asks for (the IG's protocol).
//!
//! The same suite runs on both stores. With `SLUICE_TEST_DATABASE_URL` set to an admin URL
//! (e.g. `postgres://postgres@127.0.0.1:5432/postgres`), every data dir gets its own scratch
//! PostgreSQL database, cloned from a template database loaded once; its URL is kept in the
//! data dir's `database-url` file and passed as `--database-url` ([`store_args`]). Scratch
//! databases are dropped with their server.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod exact;

use flate2::read::MultiGzDecoder;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use ureq::http;

/// The `sluice` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// The small Synthea data set (100 patients, one Group): the repository's copy of
/// `shared/data/r4-100-patients-groups`, so a clone anywhere can run the tests.
pub const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data/r4-100-patients-groups");

/// The data set's Group, with all 100 patients as members.
pub const GROUP_ID: &str = "d9f31445-f448-48c0-af57-295c005e07df";

/// Resources per type in the data set, as its README documents them.
pub const DATA_COUNTS: [(&str, usize); 18] = [
    ("AllergyIntolerance", 38),
    ("CarePlan", 278),
    ("CareTeam", 278),
    ("Claim", 6083),
    ("Condition", 639),
    ("Device", 4),
    ("DiagnosticReport", 897),
    ("Encounter", 3697),
    ("ExplanationOfBenefit", 3697),
    ("Group", 1),
    ("ImagingStudy", 16),
    ("Immunization", 1287),
    ("MedicationRequest", 2386),
    ("Observation", 16315),
    ("Organization", 203),
    ("Patient", 100),
    ("Practitioner", 203),
    ("Procedure", 2351),
];

/// How long an export may take before a test gives up on it.
const EXPORT_BOUND: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Servers and data dirs
// ---------------------------------------------------------------------------------------

/// A data dir holding the loaded data set. Built once (`sluice load`) and reused: it lives
/// in Cargo's tmp dir for integration tests, keyed by the binary and the data files, so a
/// rebuilt binary gets a fresh one; templates of older builds are removed after an hour.
pub fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        if pg_admin().is_some() {
            return pg_template();
        }
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(root).expect("creating CARGO_TARGET_TMPDIR");
        let name = format!("sluice-template-{:016x}", fingerprint());
        let dir = root.join(&name);
        if dir.join("sluice.db").is_file() {
            return dir;
        }
        let tmp = tempfile::Builder::new().prefix(".loading-").tempdir_in(root).expect("temp dir");
        let out =
            sluice().args(["load", "--data-dir"]).arg(tmp.path()).arg(DATA).output().expect("running sluice load");
        assert!(
            out.status.success(),
            "sluice load {DATA} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let loaded = tmp.keep();
        if std::fs::rename(&loaded, &dir).is_err() {
            // Another test process made it first.
            let _ = std::fs::remove_dir_all(&loaded);
            assert!(dir.join("sluice.db").is_file(), "no template store at {}", dir.display());
        }
        // Templates of earlier builds: removed once no test run can still be using them.
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if n.starts_with("sluice-template-") && n != name && age.is_some_and(|a| a > Duration::from_secs(3600)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        dir
    })
}

/// The PostgreSQL admin URL when the suite runs on PostgreSQL.
pub fn pg_admin() -> Option<&'static str> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    URL.get_or_init(|| std::env::var("SLUICE_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty())).as_deref()
}

/// Runs one SQL statement as the admin user with `psql`.
pub fn psql(sql: &str) -> String {
    let admin = pg_admin().expect("PostgreSQL mode");
    let out = Command::new("psql")
        .arg(admin)
        .args(["-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("running psql (the PostgreSQL client)");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The URL of database `name` on the admin URL's server.
fn db_url(name: &str) -> String {
    let admin = pg_admin().expect("PostgreSQL mode");
    let (base, query) = admin.split_once('?').map_or((admin, None), |(b, q)| (b, Some(q)));
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

/// A new scratch database (empty, or a copy of `template`), unique to this process.
fn scratch_db(template: Option<&str>) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("sluice_t_{}_{n}", std::process::id());
    let sql = match template {
        Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
        None => format!("CREATE DATABASE {name}"),
    };
    // Copying a template fails while another copy of it is being made: try again.
    let mut last = String::new();
    for _ in 0..50 {
        let out = Command::new("psql")
            .arg(pg_admin().expect("PostgreSQL mode"))
            .args(["-v", "ON_ERROR_STOP=1", "-qAtc", &sql])
            .output()
            .expect("running psql");
        if out.status.success() {
            return name;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !last.contains("being accessed by other users") {
            break;
        }
    }
    panic!("{sql}: {last}");
}

/// The template database: the data set loaded once per binary build.
fn pg_template() -> PathBuf {
    let name = format!("sluice_tpl_{:016x}", fingerprint());
    if psql(&format!("SELECT 1 FROM pg_database WHERE datname = '{name}'")) != "1" {
        let loading = scratch_db(None);
        let out = sluice()
            .args(["load", "--database-url", &db_url(&loading)])
            .arg(DATA)
            .output()
            .expect("running sluice load");
        assert!(
            out.status.success(),
            "sluice load {DATA} into PostgreSQL failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let renamed = Command::new("psql")
            .arg(pg_admin().expect("PostgreSQL mode"))
            .args(["-v", "ON_ERROR_STOP=1", "-qAtc", &format!("ALTER DATABASE {loading} RENAME TO {name}")])
            .output()
            .expect("running psql");
        if !renamed.status.success() {
            // Another test process made it first.
            psql(&format!("DROP DATABASE IF EXISTS {loading}"));
        }
    }
    PathBuf::from(name)
}

/// Where a data dir's store is: `--data-dir`, plus `--database-url` in PostgreSQL mode.
pub fn store_args(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut args = vec!["--data-dir".into(), dir.as_os_str().to_owned()];
    if let Ok(url) = std::fs::read_to_string(dir.join("database-url")) {
        args.push("--database-url".into());
        args.push(url.trim().into());
    }
    args
}

/// Drops the scratch database of a data dir (PostgreSQL mode).
pub fn drop_store(dir: &Path) {
    let Ok(url) = std::fs::read_to_string(dir.join("database-url")) else { return };
    let name = url.trim().rsplit('/').next().map(|n| n.split('?').next().unwrap_or(n)).unwrap_or_default();
    if name.starts_with("sluice_t_") {
        let _ = Command::new("psql")
            .arg(pg_admin().expect("PostgreSQL mode"))
            .args(["-qAtc", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")])
            .output();
    }
}

fn pg_dir(template: Option<&str>) -> TempDir {
    let dir = tempfile::Builder::new().prefix("sluice-test-").tempdir().expect("temp dir");
    let db = scratch_db(template);
    std::fs::write(dir.path().join("database-url"), db_url(&db)).expect("writing database-url");
    dir
}

/// Identifies the binary build and the data files a template was made from.
fn fingerprint() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let stamp = |p: &Path, h: &mut std::collections::hash_map::DefaultHasher| {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        p.file_name().hash(h);
        m.len().hash(h);
        m.modified().ok().hash(h);
    };
    stamp(Path::new(BIN), &mut h);
    for f in data_files() {
        stamp(&f, &mut h);
    }
    h.finish()
}

/// The `.ndjson.gz` files of the data set, sorted.
pub fn data_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DATA)
        .unwrap_or_else(|e| panic!("the test data set {DATA} is missing: {e}"))
        .map(|e| e.expect("reading the data dir").path())
        .filter(|p| p.to_string_lossy().ends_with(".ndjson.gz"))
        .collect();
    files.sort();
    files
}

/// A `sluice` command whose environment holds none of the caller's `SLUICE_*` /
/// `BOX_FHIR_*` settings (a stray `SLUICE_THROTTLE_MS` would change every test).
pub fn sluice() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("SLUICE_") || k.starts_with("BOX_FHIR_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SLUICE_LOG", "info");
    cmd
}

/// A fresh data dir holding a copy of the template store.
pub fn loaded_dir() -> TempDir {
    if pg_admin().is_some() {
        return pg_dir(Some(&template().to_string_lossy()));
    }
    let dir = tempfile::Builder::new().prefix("sluice-test-").tempdir().expect("temp dir");
    std::fs::copy(template().join("sluice.db"), dir.path().join("sluice.db")).expect("copying the template store");
    dir
}

/// A fresh, empty data dir.
pub fn empty_dir() -> TempDir {
    if pg_admin().is_some() {
        return pg_dir(None);
    }
    tempfile::Builder::new().prefix("sluice-test-").tempdir().expect("temp dir")
}

/// A running `sluice serve`. Killed (and its data dir removed, if it owns it) on drop.
pub struct Server {
    child: Child,
    /// The base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The data dir.
    pub dir: PathBuf,
    tmp: Option<TempDir>,
}

impl Server {
    /// A server over a copy of the loaded data set; `args` are extra `serve` flags.
    pub fn loaded(args: &[&str]) -> Server {
        Server::start(loaded_dir(), args)
    }

    /// A server over an empty store.
    pub fn empty(args: &[&str]) -> Server {
        Server::start(empty_dir(), args)
    }

    /// A server on `dir` (which it then owns). Listens on a free port unless `args` has
    /// `--listen`. Returns once the server printed its address.
    pub fn start(dir: TempDir, args: &[&str]) -> Server {
        Server::start_with_env(dir, args, &[])
    }

    /// [`Server::start`] with environment variables set for the process.
    pub fn start_with_env(dir: TempDir, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut server = Server::spawn(dir.path(), args, env, "server.log");
        server.tmp = Some(dir);
        server
    }

    /// A second server on the store and data dir of `other`, which it does not own: two
    /// processes sharing one database (PostgreSQL) and one export folder.
    pub fn beside(other: &Server, args: &[&str]) -> Server {
        Server::spawn(&other.dir, args, &[], "peer.log")
    }

    fn spawn(path: &Path, args: &[&str], env: &[(&str, &str)], log_name: &str) -> Server {
        let log = File::options().create(true).append(true).open(path.join(log_name)).expect("opening the server log");
        let mut cmd = sluice();
        cmd.envs(env.iter().copied());
        cmd.arg("serve").args(store_args(path));
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args);
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log).spawn().expect("starting sluice serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads stdout to the end so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("sluice listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let mut server = Server { child, url: String::new(), dir: path.to_path_buf(), tmp: None };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => server.url = url,
            Err(_) => panic!("sluice serve did not start; its log:\n{}", server.log_tail(60)),
        }
        server
    }

    /// The URL of `path` under the FHIR base: `fhir("/metadata")`.
    pub fn fhir(&self, path: &str) -> String {
        format!("{}/fhir{path}", self.url)
    }

    /// The address the server listens on (`127.0.0.1:port`).
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Kills the process with SIGKILL (no clean shutdown) and hands back its data dir.
    pub fn kill(mut self) -> TempDir {
        self.child.kill().expect("killing the server");
        self.child.wait().expect("reaping the server");
        self.tmp.take().expect("the server owns its data dir")
    }

    /// Sends SIGTERM (a clean shutdown), waits for the process to exit and hands back its
    /// exit status and data dir.
    pub fn terminate(mut self) -> (std::process::ExitStatus, TempDir) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("running kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let status = self.child.wait().expect("waiting for the server to exit");
        (status, self.tmp.take().expect("the server owns its data dir"))
    }

    /// Sends SIGTERM and returns at once (the server shuts down meanwhile).
    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("running kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
    }

    /// Waits for the process to exit (after [`Server::sigterm`]); its exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("waiting for the server to exit")
    }

    /// The server process's peak resident memory so far (Linux `VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("/proc status");
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM");
        kb * 1024
    }

    /// Asserts the server is still running and answering.
    pub fn assert_alive(&mut self) {
        assert!(self.child.try_wait().expect("checking the server process").is_none(), "the server exited");
        let r = get(&self.fhir("/metadata"));
        assert_eq!(r.status, 200, "GET /fhir/metadata after the test: {}", r.text());
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(log_path(&self.dir)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The folder of an export under `<data-dir>/exports`, if it exists.
    pub fn export_folder(&self, status_url: &str) -> Option<PathBuf> {
        let id = status_url.rsplit('/').next().expect("status URL");
        let exports = self.dir.join("exports");
        std::fs::read_dir(exports)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&format!("_{id}"))))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- sluice server log ({}) ---\n{}", self.url, self.log_tail(40));
        }
        if self.tmp.is_some() {
            drop_store(&self.dir);
        }
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("server.log")
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// A response, read completely.
#[derive(Debug)]
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The raw body (never decompressed).
    pub body: Vec<u8>,
}

impl Resp {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap_or_else(|_| panic!("header {name} is not text")))
    }

    /// The media type of `Content-Type` (without parameters), lowercase.
    pub fn media_type(&self) -> String {
        self.header("content-type").unwrap_or_default().split(';').next().unwrap_or_default().trim().to_lowercase()
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    /// `Retry-After` as integer seconds (asserted present and an integer).
    pub fn retry_after(&self) -> u64 {
        let v = self.header("retry-after").unwrap_or_else(|| panic!("no Retry-After on a {} response", self.status));
        v.trim().parse().unwrap_or_else(|_| panic!("Retry-After '{v}' is not integer seconds"))
    }
}

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent()
    })
}

/// Sends a request and reads the whole response.
pub fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Resp {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = match body {
        Some(b) => agent().run(req.body(b.to_vec()).expect("request")),
        None => agent().run(req.body(()).expect("request")),
    };
    let mut res = res.unwrap_or_else(|e| panic!("{method} {url} failed: {e}"));
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap_or_else(|e| panic!("{method} {url}: reading the body failed: {e}"));
    Resp { status, headers, body }
}

/// `GET url`.
pub fn get(url: &str) -> Resp {
    send("GET", url, &[], None)
}

/// `DELETE url`.
pub fn delete(url: &str) -> Resp {
    send("DELETE", url, &[], None)
}

/// `PUT url` with a FHIR JSON body.
pub fn put_json(url: &str, body: &Value) -> Resp {
    send("PUT", url, &[("content-type", "application/fhir+json")], Some(body.to_string().as_bytes()))
}

/// `POST url` with a FHIR JSON body.
pub fn post_json(url: &str, body: &Value) -> Resp {
    send("POST", url, &[("content-type", "application/fhir+json")], Some(body.to_string().as_bytes()))
}

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved bytes).
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `url` with the query `params` appended (values percent-encoded).
pub fn with_query(url: &str, params: &[(&str, &str)]) -> String {
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
    if query.is_empty() { url.to_string() } else { format!("{url}?{}", query.join("&")) }
}

/// A FHIR `Parameters` resource from `(name, value[x] key, value)` triples.
pub fn parameters(params: &[(&str, &str, Value)]) -> Value {
    let parameter: Vec<Value> = params
        .iter()
        .map(|(name, key, value)| {
            let mut p = json!({ "name": name });
            p[*key] = value.clone();
            p
        })
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}

// ---------------------------------------------------------------------------------------
// OperationOutcome and value checks
// ---------------------------------------------------------------------------------------

/// Asserts `r` has `status` and an error OperationOutcome whose first issue's
/// diagnostics mention every one of `mentions`; returns the OperationOutcome.
pub fn assert_outcome(r: &Resp, status: u16, mentions: &[&str]) -> Value {
    assert_eq!(r.status, status, "expected {status}, body: {}", r.text());
    assert!(r.media_type().contains("json"), "an OperationOutcome is JSON, got Content-Type {:?}", r.media_type());
    let oo = r.json();
    assert_eq!(oo["resourceType"], "OperationOutcome", "{oo}");
    let issue = &oo["issue"][0];
    let severity = issue["severity"].as_str().unwrap_or_default();
    assert!(severity == "error" || severity == "fatal", "issue[0].severity is {severity:?}: {oo}");
    let diagnostics = issue["diagnostics"].as_str().unwrap_or_default();
    assert!(!diagnostics.trim().is_empty(), "issue[0].diagnostics is empty: {oo}");
    for m in mentions {
        assert!(diagnostics.contains(m), "issue[0].diagnostics does not mention {m:?}: {diagnostics}");
    }
    oo
}

/// The `expression` list of the first issue.
pub fn expressions(oo: &Value) -> Vec<String> {
    oo["issue"][0]["expression"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Whether `s` is a FHIR `instant`: `YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm)`.
pub fn is_instant(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    let z = rest.as_bytes();
    rest == "Z"
        || (z.len() == 6
            && (z[0] == b'+' || z[0] == b'-')
            && z[1..3].iter().all(u8::is_ascii_digit)
            && z[3] == b':'
            && z[4..6].iter().all(u8::is_ascii_digit))
}

/// Whether `s` is an HTTP date (IMF-fixdate): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn is_http_date(s: &str) -> bool {
    let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let p: Vec<&str> = s.split(' ').collect();
    let num = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_digit());
    let time: Vec<&str> = p.get(4).map(|t| t.split(':').collect()).unwrap_or_default();
    p.len() == 6
        && p[0].strip_suffix(',').is_some_and(|d| days.contains(&d))
        && num(p[1], 2)
        && months.contains(&p[2])
        && num(p[3], 4)
        && time.len() == 3
        && time.iter().all(|t| num(t, 2))
        && p[5] == "GMT"
}

// ---------------------------------------------------------------------------------------
// The bulk-data client
// ---------------------------------------------------------------------------------------

/// Asserts a kick-off response is 202 with an absolute `Content-Location` on this server;
/// returns that status URL.
pub fn assert_accepted(r: &Resp, server: &Server) -> String {
    assert_eq!(r.status, 202, "kick-off not accepted: {}", r.text());
    let loc = r.header("content-location").expect("a 202 kick-off has Content-Location").to_string();
    assert!(
        loc.starts_with(&format!("{}/", server.url)),
        "Content-Location must be an absolute URL on {}, got {loc}",
        server.url
    );
    loc
}

/// `GET` kick-off at `url` (with `Prefer: respond-async`); returns the status URL.
pub fn kickoff(server: &Server, url: &str) -> String {
    let r = send("GET", url, &[("accept", "application/fhir+json"), ("prefer", "respond-async")], None);
    assert_accepted(&r, server)
}

/// `POST` kick-off at `url` with a `Parameters` body; returns the status URL.
pub fn kickoff_post(server: &Server, url: &str, params: &Value) -> String {
    let r = send(
        "POST",
        url,
        &[("accept", "application/fhir+json"), ("prefer", "respond-async"), ("content-type", "application/fhir+json")],
        Some(params.to_string().as_bytes()),
    );
    assert_accepted(&r, server)
}

/// Polls a status URL until the export stops running, waiting the `Retry-After` the server
/// sends between polls (also a 429's, D13); returns the final response. Running is a 202,
/// or, when the kick-off asked for `separate-export-status`, a 200 with
/// `X-Export-Status: 202 Accepted`.
pub fn poll_until_done(status_url: &str) -> Resp {
    let started = Instant::now();
    loop {
        let r = get(status_url);
        let separate_running = r.status == 200 && r.header("x-export-status").is_some_and(|s| s.starts_with("202"));
        if r.status != 202 && r.status != 429 && !separate_running {
            return r;
        }
        let wait = r.retry_after();
        assert!(
            started.elapsed() + Duration::from_secs(wait) < EXPORT_BOUND,
            "the export at {status_url} did not finish within {EXPORT_BOUND:?} (X-Progress: {:?})",
            r.header("x-progress")
        );
        std::thread::sleep(Duration::from_secs(wait));
    }
}

/// Asserts a completed-export response: 200 `application/json` with `Expires`, and a
/// manifest with an instant `transactionTime`, `request` equal to `request_url`,
/// `requiresAccessToken: false`, and `output` / `error` arrays of well-formed entries.
/// Returns the manifest.
pub fn complete_manifest(r: &Resp, request_url: &str) -> Value {
    let m = manifest_response(r, request_url);
    for key in ["output", "error"] {
        let entries = m[key].as_array().unwrap_or_else(|| panic!("manifest {key} is not an array: {m}"));
        for e in entries {
            assert!(e["type"].is_string(), "{key} entry without type: {e}");
            let url = e["url"].as_str().unwrap_or_else(|| panic!("{key} entry without url: {e}"));
            assert!(url.starts_with("http://") || url.starts_with("https://"), "url is not absolute: {url}");
            assert!(e["count"].is_u64(), "{key} entry without an integer count: {e}");
        }
    }
    m
}

/// The part of [`complete_manifest`] every manifest shares, whatever its files: 200
/// `application/json` with `Expires`, an instant `transactionTime`, `request` equal to
/// `request_url`, `requiresAccessToken: false`. Returns the manifest.
pub fn manifest_response(r: &Resp, request_url: &str) -> Value {
    assert_eq!(r.status, 200, "the export did not complete: {}", r.text());
    assert_eq!(r.media_type(), "application/json", "a manifest is served as application/json");
    let expires = r.header("expires").expect("a manifest response has Expires");
    assert!(is_http_date(expires), "Expires is not an HTTP date: {expires:?}");
    let m = r.json();
    let tt = m["transactionTime"].as_str().unwrap_or_else(|| panic!("no transactionTime: {m}"));
    assert!(is_instant(tt), "transactionTime {tt:?} is not a FHIR instant");
    assert_eq!(m["request"], request_url, "manifest request");
    assert_eq!(m["requiresAccessToken"], false, "requiresAccessToken");
    m
}

/// Kicks off a GET export at `url`, waits for it and returns its checked manifest.
pub fn export(server: &Server, url: &str) -> Value {
    let status = kickoff(server, url);
    complete_manifest(&poll_until_done(&status), url)
}

/// Lines per resource type.
pub type Files = BTreeMap<String, Vec<String>>;

/// Downloads every `output` file of a manifest; see [`download_entries`].
pub fn download_all(manifest: &Value) -> Files {
    download_entries(&manifest["output"])
}

/// Downloads every file of a manifest's `output` or `error` array: each must be served as
/// `application/fhir+ndjson` (`.ndjson.gz` files with `Content-Encoding: gzip` and gzip
/// bytes), end every line with `\n`, and hold as many lines as its entry's `count`.
pub fn download_entries(entries: &Value) -> Files {
    download_entries_checked(entries, true)
}

/// [`download_entries`], checking `Content-Type` only if `content_type` is set (an emulator
/// that does not keep it, such as fake-gcs-server, is checked on the request instead).
pub fn download_entries_checked(entries: &Value, content_type: bool) -> Files {
    let mut files = Files::new();
    for e in entries.as_array().expect("manifest entries") {
        let (t, url) = (e["type"].as_str().expect("type"), e["url"].as_str().expect("url"));
        let path = url.split('?').next().unwrap_or(url);
        let name = path.rsplit('/').next().unwrap_or_default();
        let stem = name.trim_end_matches(".gz").trim_end_matches(".ndjson");
        let split_no = stem.strip_prefix(t).and_then(|rest| rest.strip_prefix('-'));
        assert!(
            stem == t || split_no.is_some_and(|n| n.parse::<u32>().is_ok()),
            "file name {name} is neither {t}.ndjson[.gz] nor {t}-<n>.ndjson[.gz] (D15)"
        );
        // As bulk clients do; GCS serves gzip objects decompressed to clients that don't.
        let r = send("GET", url, &[("accept-encoding", "gzip")], None);
        assert_eq!(r.status, 200, "GET {url}: {}", r.text());
        if content_type {
            assert_eq!(r.media_type(), "application/fhir+ndjson", "Content-Type of {path}");
        }
        let bytes = if path.ends_with(".ndjson.gz") {
            assert_eq!(r.header("content-encoding"), Some("gzip"), "Content-Encoding of {path}");
            assert!(r.body.starts_with(&[0x1f, 0x8b]), "{path} is not gzip data");
            let mut out = Vec::new();
            MultiGzDecoder::new(&r.body[..]).read_to_end(&mut out).unwrap_or_else(|e| panic!("gunzip {path}: {e}"));
            out
        } else {
            assert!(path.ends_with(".ndjson"), "unexpected file name {path}");
            assert_eq!(r.header("content-encoding"), None, "{path} is plain ndjson");
            r.body
        };
        let text = String::from_utf8(bytes).unwrap_or_else(|_| panic!("{path} is not UTF-8"));
        assert!(text.is_empty() || text.ends_with('\n'), "{path}: the last line does not end with a newline");
        let lines: Vec<String> = text.lines().map(String::from).collect();
        assert_eq!(Some(lines.len() as u64), e["count"].as_u64(), "count of {path} in the manifest");
        files.entry(t.to_string()).or_default().extend(lines);
    }
    files
}

/// What an export should hold: per type, per id, the resource's JSON (without the
/// server's `meta.versionId` / `meta.lastUpdated`).
pub type Expected = BTreeMap<String, BTreeMap<String, Cow<'static, str>>>;

/// The `(type, id)` pairs of an expectation, for readable comparisons.
pub fn keys(expected: &Expected) -> BTreeSet<(String, String)> {
    expected.iter().flat_map(|(t, ids)| ids.keys().map(move |id| (t.clone(), id.clone()))).collect()
}

/// Checks every exported line against `expected`: it parses, its `resourceType` is the
/// manifest entry's type, no `(type, id)` repeats, `meta.versionId` and `meta.lastUpdated`
/// are present, and without them (and without `meta` if that leaves it empty) the resource
/// equals the expected one. Exactly the expected types and resources must be there.
pub fn check_content(files: &Files, expected: &Expected) {
    let got_types: BTreeSet<&String> = files.keys().collect();
    let want_types: BTreeSet<&String> = expected.iter().filter(|(_, ids)| !ids.is_empty()).map(|(t, _)| t).collect();
    assert_eq!(got_types, want_types, "the types exported");
    for (t, lines) in files {
        let want = &expected[t];
        let mut seen = BTreeSet::new();
        for line in lines {
            let v = exact::Exact::parse(line, &format!("a {t} line"));
            assert_eq!(
                v.get("resourceType").and_then(exact::Exact::as_str).as_deref(),
                Some(t.as_str()),
                "resourceType of a line in a {t} file"
            );
            let id =
                v.get("id").and_then(exact::Exact::as_str).unwrap_or_else(|| panic!("a {t} without an id: {line}"));
            assert!(seen.insert(id.clone()), "{t}/{id} is exported twice");
            let Some(json) = want.get(&id) else { panic!("{t}/{id} is exported but not expected") };
            // Exact: every digit, escape and member order as loaded; only meta.versionId and
            // meta.lastUpdated may differ (D17).
            exact::assert_same_resource(line, json, &format!("{t}/{id}"));
        }
        let missing: Vec<&String> = want.keys().filter(|id| !seen.contains(*id)).take(5).collect();
        assert!(missing.is_empty(), "{} {t} missing from the export, e.g. {missing:?}", want.len() - seen.len());
    }
}

/// Asserts `meta.versionId` and `meta.lastUpdated` are there, then removes them (and
/// `meta` when nothing else is left in it).
pub fn strip_server_meta(v: &mut Value, what: &str) {
    let meta = v.get_mut("meta").and_then(Value::as_object_mut).unwrap_or_else(|| panic!("{what} has no meta"));
    let version = meta.remove("versionId");
    assert!(version.as_ref().is_some_and(Value::is_string), "{what}: meta.versionId is missing or not a string");
    let updated = meta.remove("lastUpdated");
    let updated = updated.as_ref().and_then(Value::as_str).unwrap_or_else(|| panic!("{what}: no meta.lastUpdated"));
    assert!(is_instant(updated), "{what}: meta.lastUpdated {updated:?} is not an instant");
    if meta.is_empty() {
        v.as_object_mut().expect("object").remove("meta");
    }
}

/// Downloads a manifest's output and checks it against `expected` (see [`check_content`]).
pub fn check_export(manifest: &Value, expected: &Expected) -> Files {
    let files = download_all(manifest);
    check_content(&files, expected);
    files
}

/// The resource types listed in a manifest's `output`.
pub fn output_types(manifest: &Value) -> BTreeSet<String> {
    manifest["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The reference: the data set read from its files
// ---------------------------------------------------------------------------------------

/// The R4 Patient compartment for the types in the data set: each type's element paths
/// that link a resource to a patient (CompartmentDefinition/patient, R4). `Patient` is in
/// its own compartment only (`link` is not followed, D16).
const COMPARTMENT: &[(&str, &[&str])] = &[
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("CarePlan", &["subject", "activity.detail.performer"]),
    ("CareTeam", &["subject", "participant.member"]),
    ("Claim", &["patient", "payee.party"]),
    ("Condition", &["subject", "asserter"]),
    ("DiagnosticReport", &["subject"]),
    ("Encounter", &["subject"]),
    ("ExplanationOfBenefit", &["patient", "payee.party"]),
    ("ImagingStudy", &["subject"]),
    ("Immunization", &["patient"]),
    ("MedicationRequest", &["subject"]),
    ("Observation", &["subject", "performer"]),
    ("Procedure", &["subject", "performer.actor"]),
];

/// Types in the data set that are not in any patient's compartment: R4 has no `Device` in
/// the Patient compartment, and `Group` is not exported at patient level (D9).
pub const OUTSIDE_COMPARTMENT: [&str; 4] = ["Device", "Group", "Organization", "Practitioner"];

/// The data set, as read from its files.
pub struct Reference {
    /// Per type, per id, the JSON line.
    pub resources: BTreeMap<String, BTreeMap<String, String>>,
    /// Per patient id, the `(type, id)` of every resource in that patient's compartment.
    pub compartments: BTreeMap<String, BTreeSet<(String, String)>>,
}

/// The data set (read once per test binary).
pub fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(read_reference)
}

fn read_reference() -> Reference {
    let mut resources: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut compartments: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for file in data_files() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let file_type = name.trim_end_matches(".ndjson.gz").to_string();
        let reader = BufReader::new(MultiGzDecoder::new(File::open(&file).expect("data file")));
        for line in reader.lines() {
            let line = line.unwrap_or_else(|e| panic!("{name}: {e}"));
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name}: {e}"));
            let t = v["resourceType"].as_str().expect("resourceType");
            assert_eq!(t, file_type, "{name} holds a {t}");
            let id = v["id"].as_str().expect("id").to_string();
            let key = (t.to_string(), id.clone());
            for p in compartment_patients(&v) {
                compartments.entry(p).or_default().insert(key.clone());
            }
            let old = resources.entry(t.to_string()).or_default().insert(id.clone(), line);
            assert!(old.is_none(), "{t}/{id} appears twice in the data set");
        }
    }
    let counts: Vec<(&str, usize)> = resources.iter().map(|(t, ids)| (t.as_str(), ids.len())).collect();
    assert_eq!(counts, DATA_COUNTS.to_vec(), "the data set's counts differ from its README");
    Reference { resources, compartments }
}

/// The ids of the patients whose compartment `v` is in, by the table above.
pub fn compartment_patients(v: &Value) -> BTreeSet<String> {
    let t = v["resourceType"].as_str().expect("resourceType");
    let mut patients = BTreeSet::new();
    if t == "Patient" {
        patients.insert(v["id"].as_str().expect("id").to_string());
    } else if let Some((_, paths)) = COMPARTMENT.iter().find(|(ct, _)| *ct == t) {
        for path in *paths {
            let steps: Vec<&str> = path.split('.').collect();
            patient_refs(v, &steps, &mut patients);
        }
    } else {
        assert!(OUTSIDE_COMPARTMENT.contains(&t), "the compartment table does not cover {t}");
    }
    patients
}

/// Collects the patient ids that the references at `steps` point to.
fn patient_refs(v: &Value, steps: &[&str], out: &mut BTreeSet<String>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| patient_refs(i, steps, out)),
        Value::Object(obj) => match steps.split_first() {
            Some((step, rest)) => {
                if let Some(child) = obj.get(*step) {
                    patient_refs(child, rest, out);
                }
            }
            None => {
                if let Some(id) = obj.get("reference").and_then(Value::as_str).and_then(|r| r.strip_prefix("Patient/"))
                {
                    out.insert(id.to_string());
                }
            }
        },
        _ => {}
    }
}

impl Reference {
    /// The whole data set.
    pub fn all(&'static self) -> Expected {
        self.select(|_, _| true)
    }

    /// Every resource of the given types.
    pub fn types(&'static self, types: &[&str]) -> Expected {
        self.select(|t, _| types.contains(&t))
    }

    /// The union of the given patients' compartments.
    pub fn compartments_of(&'static self, patients: &[&str]) -> Expected {
        let keys: BTreeSet<&(String, String)> = patients
            .iter()
            .flat_map(|p| self.compartments.get(*p).unwrap_or_else(|| panic!("no patient {p} in the data")))
            .collect();
        self.select(|t, id| keys.contains(&(t.to_string(), id.to_string())))
    }

    /// The union of every patient's compartment (a patient-level export).
    pub fn all_compartments(&'static self) -> Expected {
        let ids: Vec<&str> = self.patient_ids();
        self.compartments_of(&ids)
    }

    /// The data set's patient ids, sorted.
    pub fn patient_ids(&self) -> Vec<&str> {
        self.resources["Patient"].keys().map(String::as_str).collect()
    }

    /// One resource, parsed.
    pub fn resource(&self, t: &str, id: &str) -> Value {
        serde_json::from_str(&self.resources[t][id]).expect("reference JSON")
    }

    fn select(&'static self, keep: impl Fn(&str, &str) -> bool) -> Expected {
        let mut out = Expected::new();
        for (t, ids) in &self.resources {
            for (id, json) in ids {
                if keep(t, id) {
                    out.entry(t.clone()).or_default().insert(id.clone(), Cow::Borrowed(json.as_str()));
                }
            }
        }
        out
    }
}

/// Per-type counts of an expectation, as a manifest lists them.
pub fn counts(expected: &Expected) -> BTreeMap<String, u64> {
    expected.iter().filter(|(_, ids)| !ids.is_empty()).map(|(t, ids)| (t.clone(), ids.len() as u64)).collect()
}

/// Per-type counts of a manifest's `output` (summed over split files).
pub fn manifest_counts(manifest: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for e in manifest["output"].as_array().expect("output") {
        *out.entry(e["type"].as_str().expect("type").to_string()).or_insert(0) += e["count"].as_u64().expect("count");
    }
    out
}

/// The ids of the first `n` resources of type `t` in patient `p`'s compartment alone.
pub fn own_resources(p: &str, t: &str, n: usize) -> Vec<String> {
    let reference = reference();
    let ids: Vec<String> = reference.compartments[p]
        .iter()
        .filter(|(rt, id)| rt == t && compartment_patients(&reference.resource(t, id)).len() == 1)
        .map(|(_, id)| id.clone())
        .take(n)
        .collect();
    assert_eq!(ids.len(), n, "patient {p} has {n} {t} of its own");
    ids
}

/// An external tool the tests drive: the path in `env_var`, else `name` on the `PATH`;
/// `None` (after a skip notice naming `how`) when it is not installed, which fails the test
/// under `CI=true`.
pub fn external_tool(env_var: &str, name: &str, how: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or_default();
    if on_path.is_none() {
        let notice = format!("{name} is not installed (set {env_var} or put it on the PATH; {how})");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{notice}");
        eprintln!("SKIPPED: {notice}");
    }
    on_path
}

/// A Prometheus text exposition: the value of each sample, by name and label set.
pub struct Scrape {
    /// The whole text.
    pub text: String,
    /// Every sample: name, labels, value.
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// `GET <url>/metrics` with `headers`, checked and parsed.
    pub fn of(url: &str, headers: &[(&str, &str)]) -> Scrape {
        let r = send("GET", &format!("{url}/metrics"), headers, None);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let text = r.text();
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                    let labels = body
                        .split("\",")
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").unwrap_or_else(|| panic!("bad label: {line}"));
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Scrape { text, samples }
    }

    /// The sample `name` with exactly `labels`; 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.iter().find(|(n, l, _)| n == name && *l == want).map_or(0.0, |s| s.2)
    }

    /// The sum of the samples `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.2)
            .sum()
    }

    /// Whether `name` is declared with `kind` and has a help line.
    pub fn declares(&self, name: &str, kind: &str) -> bool {
        self.text.contains(&format!("# TYPE {name} {kind}\n")) && self.text.contains(&format!("# HELP {name} "))
    }
}
