//! Secrets at rest (D50) through the real binary: the data dir and the files holding secrets
//! are owner-only; with `SLUICE_SECRETS_KEY` the secret of an `AwsAccount` is sealed in the
//! store (the raw SQLite file, or the row read with `psql`), never shown by the API, and
//! still opens the account (`/readyz`, and an export to the S3 emulator when
//! `SLUICE_TEST_S3_ENDPOINT` is set); a missing or wrong key is a clear error naming the
//! variable, and rotation with `SLUICE_SECRETS_KEY_PREVIOUS` reseals under the new key.

mod common;

use common::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// A secret that must never be seen again outside the server.
const SECRET: &str = "S3CR3T-at-rest-7f3a9c";

/// Three keys: the first in hex, the others in base64.
const K1: &str = "5be8a6e9a0f4d32e9c1b7a44f0d1c2b3a4958677e8d9cafbec0d1e2f30415263";
const K2: &str = "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4k=";
const K3: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";

/// The key id Sluice writes in a sealed value: the first 4 bytes of the key's SHA-256.
fn key_id(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..4])
}

fn k1_id() -> String {
    key_id(&hex::decode(K1).unwrap())
}

fn k2_id() -> String {
    use base64::Engine as _;
    key_id(&base64::engine::general_purpose::STANDARD.decode(K2).unwrap())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What the store holds for the configuration resources, as raw as it gets: the SQLite
/// database and WAL files byte for byte, or the PostgreSQL rows.
fn raw_store(dir: &Path) -> String {
    if let Ok(url) = std::fs::read_to_string(dir.join("database-url")) {
        let out = Command::new("psql")
            .arg(url.trim())
            .args(["-v", "ON_ERROR_STOP=1", "-qAtc", "SELECT type, id, json FROM sluice_config"])
            .output()
            .expect("running psql");
        assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
        return String::from_utf8_lossy(&out.stdout).into_owned();
    }
    let mut bytes = std::fs::read(dir.join("sluice.db")).expect("reading sluice.db");
    bytes.extend(std::fs::read(dir.join("sluice.db-wal")).unwrap_or_default());
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Where exports go: the S3 emulator when there is one (with a fresh bucket), else an
/// endpoint nothing listens on (opening the account needs no request).
struct Target {
    endpoint: String,
    bucket: String,
    live: bool,
}

impl Target {
    fn new() -> Target {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let bucket = format!("sluice-secrets-{}-{}", std::process::id(), nanos % 1_000_000_000);
        match std::env::var("SLUICE_TEST_S3_ENDPOINT") {
            Ok(e) if !e.is_empty() => {
                let endpoint = e.trim_end_matches('/').to_string();
                let r = send("PUT", &format!("{endpoint}/{bucket}"), &[], Some(b""));
                assert_eq!(r.status, 200, "creating bucket {bucket}: {}", r.text());
                Target { endpoint, bucket, live: true }
            }
            _ => Target { endpoint: "http://127.0.0.1:9".into(), bucket, live: false },
        }
    }

    fn args(&self) -> Vec<String> {
        ["--storage-provider", "aws", "--aws-account", "exports", "--aws-bucket", &self.bucket, "--storage-endpoint"]
            .into_iter()
            .map(String::from)
            .chain([self.endpoint.clone()])
            .collect()
    }

    /// With the emulator: a Patient export lands in the bucket (the account, secret
    /// included, was opened).
    fn check_export(&self, srv: &Server) {
        if !self.live {
            return;
        }
        let manifest = export(srv, &with_query(&srv.fhir("/$export"), &[("_type", "Patient")]));
        let output = manifest["output"].as_array().expect("output");
        assert!(!output.is_empty(), "{manifest}");
        for f in output {
            let url = f["url"].as_str().unwrap();
            assert!(url.starts_with(&format!("{}/{}/", self.endpoint, self.bucket)), "{url}");
        }
    }
}

fn start(dir: tempfile::TempDir, target: &Target, env: &[(&str, &str)]) -> Server {
    let args = target.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with_env(dir, &args, env)
}

fn readyz(srv: &Server) -> Resp {
    get(&format!("{}/readyz", srv.url))
}

fn put_account(srv: &Server) {
    let body = json!({"region": "us-east-1", "access-key-id": "AKIDEXAMPLE", "secret-access-key": SECRET});
    let r = put_json(&format!("{}/AwsAccount/exports", srv.url), &body);
    assert!(r.status == 201 || r.status == 200, "PUT AwsAccount: {}", r.text());
    assert!(!r.text().contains(SECRET), "PUT answers with the secret");
}

/// The whole server log (every start in this data dir).
fn full_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

#[test]
fn data_dir_and_store_files_are_owner_only() {
    let dir = empty_dir();
    set_mode(dir.path(), 0o755);
    let srv = Server::start(dir, &[]);
    assert_eq!(mode(&srv.dir), 0o700, "the data dir");
    assert_eq!(mode(&srv.dir.join("signing.key")), 0o600, "signing.key");
    let sqlite = pg_admin().is_none();
    if sqlite {
        assert_eq!(mode(&srv.dir.join("sluice.db")), 0o600, "sluice.db");
        for f in ["sluice.db-wal", "sluice.db-shm"] {
            if srv.dir.join(f).exists() {
                assert_eq!(mode(&srv.dir.join(f)), 0o600, "{f}");
            }
        }
    }
    let log = srv.log_tail(200);
    assert!(log.contains("the data dir was accessible to other local users"), "{log}");

    // Files made readable meanwhile (a restore, a copy) are tightened at the next start.
    let dir = srv.kill();
    set_mode(dir.path(), 0o750);
    set_mode(&dir.path().join("signing.key"), 0o644);
    if sqlite {
        set_mode(&dir.path().join("sluice.db"), 0o644);
    }
    let srv = Server::start(dir, &[]);
    assert_eq!(mode(&srv.dir), 0o700, "the data dir, again");
    assert_eq!(mode(&srv.dir.join("signing.key")), 0o600, "signing.key, again");
    if sqlite {
        assert_eq!(mode(&srv.dir.join("sluice.db")), 0o600, "sluice.db, again");
        assert!(srv.log_tail(200).contains("the database was accessible to other local users"));
    }
    assert!(srv.log_tail(200).contains("the URL signing key was accessible to other local users"));
}

/// Sealed at rest, hidden by the API, used by the server; a missing or wrong key is an
/// error naming the variable; rotation reseals under the new key.
#[test]
fn secrets_are_sealed_at_rest_and_rotated() {
    let target = Target::new();
    let (id1, id2) = (k1_id(), k2_id());
    let srv = start(loaded_dir(), &target, &[("SLUICE_SECRETS_KEY", K1)]);
    assert_eq!(readyz(&srv).status, 503, "no AwsAccount yet");
    put_account(&srv);
    let r = get(&format!("{}/AwsAccount/exports", srv.url));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["access-key-id"], "AKIDEXAMPLE");
    assert!(r.json().get("secret-access-key").is_none() && !r.text().contains(SECRET), "{}", r.text());
    let raw = raw_store(&srv.dir);
    assert!(!raw.contains(SECRET), "the secret is in the store in plain text");
    assert!(raw.contains(&format!("\"secret-access-key\":\"enc:v1:{id1}:")), "no sealed value in the store");
    assert!(raw.contains("\"access-key-id\":\"AKIDEXAMPLE\""), "the rest stays readable");
    // The server opens the account with the secret.
    let r = readyz(&srv);
    assert_eq!(r.status, 200, "{}", r.text());
    target.check_export(&srv);

    // No key: the server runs, and says what is missing wherever the secret is needed.
    let dir = srv.kill();
    let srv = start(dir, &target, &[]);
    let r = readyz(&srv);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("SLUICE_SECRETS_KEY is not set") && r.text().contains(&id1), "{}", r.text());
    let r = get(&format!("{}/AwsAccount/exports", srv.url));
    assert_outcome(&r, 500, &["SLUICE_SECRETS_KEY"]);
    let r = send("GET", &srv.fhir("/$export"), &[("prefer", "respond-async")], None);
    assert_outcome(&r, 500, &["SLUICE_SECRETS_KEY"]);

    // A wrong key: the same, naming both key ids; the value stays as it was.
    let dir = srv.kill();
    let srv = start(dir, &target, &[("SLUICE_SECRETS_KEY", K2)]);
    let r = readyz(&srv);
    assert_eq!(r.status, 503, "{}", r.text());
    for want in ["SLUICE_SECRETS_KEY", "SLUICE_SECRETS_KEY_PREVIOUS", &id1, &id2] {
        assert!(r.text().contains(want), "{want}: {}", r.text());
    }
    assert!(srv.log_tail(200).contains("a secret cannot be opened"), "{}", srv.log_tail(200));
    assert!(raw_store(&srv.dir).contains(&format!("enc:v1:{id1}:")));

    // Rotation: the new key with the old one among the previous keys reseals at start.
    let dir = srv.kill();
    let previous = format!("{K3},{K1}");
    let srv = start(dir, &target, &[("SLUICE_SECRETS_KEY", K2), ("SLUICE_SECRETS_KEY_PREVIOUS", &previous)]);
    let r = readyz(&srv);
    assert_eq!(r.status, 200, "{}", r.text());
    let raw = raw_store(&srv.dir);
    assert!(raw.contains(&format!("\"secret-access-key\":\"enc:v1:{id2}:")), "not resealed under the new key");
    assert!(!raw.contains(&format!("\"secret-access-key\":\"enc:v1:{id1}:")) && !raw.contains(SECRET));
    assert!(srv.log_tail(200).contains("secrets sealed under the current SLUICE_SECRETS_KEY"));

    // The previous key can go.
    let dir = srv.kill();
    let srv = start(dir, &target, &[("SLUICE_SECRETS_KEY", K2)]);
    let r = readyz(&srv);
    assert_eq!(r.status, 200, "{}", r.text());
    target.check_export(&srv);
    let r = get(&format!("{}/AwsAccount/exports", srv.url));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains(SECRET));

    let log = full_log(&srv.dir);
    for never in [SECRET, K1, K2, K3] {
        assert!(!log.contains(never), "the log holds a secret or a key ({never})");
    }
}

/// A secret stored before a key was set is sealed at the next start with one, and its
/// plain text is gone from the files.
#[test]
fn plain_secrets_are_sealed_once_a_key_is_set() {
    let target = Target::new();
    let srv = start(empty_dir(), &target, &[]);
    put_account(&srv);
    assert!(raw_store(&srv.dir).contains(SECRET), "stored as given without a key");
    assert_eq!(readyz(&srv).status, 200);

    let dir = srv.kill();
    let srv = start(dir, &target, &[("SLUICE_SECRETS_KEY", K1)]);
    let raw = raw_store(&srv.dir);
    assert!(!raw.contains(SECRET), "the plain secret is still in the store's files");
    assert!(raw.contains(&format!("\"secret-access-key\":\"enc:v1:{}:", k1_id())), "not sealed");
    let r = readyz(&srv);
    assert_eq!(r.status, 200, "{}", r.text());
    // Replaced over the API, a secret is sealed at once.
    put_account(&srv);
    assert!(!raw_store(&srv.dir).contains(SECRET));
    assert_eq!(readyz(&srv).status, 200);
}

/// A key that is not 32 bytes stops `serve` and `load` before anything is opened, naming
/// the variable but never echoing the value.
#[test]
fn a_malformed_key_is_refused_naming_the_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = sluice().args(args).envs(env.iter().copied()).output().expect("running sluice");
        assert!(!out.status.success(), "{args:?} {env:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let serve = ["serve", "--data-dir", data, "--listen", "127.0.0.1:0"];
    let e = run(&serve, &[("SLUICE_SECRETS_KEY", "hunter2-TOPSECRET")]);
    assert!(e.contains("SLUICE_SECRETS_KEY must be 32 bytes") && !e.contains("TOPSECRET"), "{e}");
    let e = run(&serve, &[("SLUICE_SECRETS_KEY", K1), ("SLUICE_SECRETS_KEY_PREVIOUS", "TOPSECRET")]);
    assert!(e.contains("SLUICE_SECRETS_KEY_PREVIOUS (key 1 of the list) must be") && !e.contains("TOPSECRET"), "{e}");
    let e = run(&serve, &[("SLUICE_SECRETS_KEY_PREVIOUS", K1)]);
    assert!(e.contains("SLUICE_SECRETS_KEY_PREVIOUS is set but SLUICE_SECRETS_KEY is not"), "{e}");
    let e = run(&["load", "--data-dir", data, "--secrets-key", "TOPSECRET", DATA], &[]);
    assert!(e.contains("SLUICE_SECRETS_KEY must be 32 bytes") && !e.contains("TOPSECRET"), "{e}");
    assert!(!Path::new(data).exists(), "nothing was created");
    let help = sluice().args(["serve", "--help"]).env("SLUICE_SECRETS_KEY", K1).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--secrets-key") && !help.contains(K1), "{help}");
}
