//! The SQLite store against a real database file: the shared conformance suite
//! (`sluice-store-conformance`, one test per scenario, each on a fresh file), and what only
//! this store does: a clock and snapshots that survive reopening the file, two stores (a
//! loader next to a server) on one file, every write strictly later than the one before,
//! and scans in the order of writing.

use serde_json::{Value, json};
use sluice_store::{ExportReads, IdRange, ResourceWrites, ScanFilter, Snapshot, prepare};
use sluice_store_sqlite::SqliteStore;
use tokio::sync::mpsc;

/// A fresh store, and its folder (removed when the scenario ends).
async fn fresh() -> Option<(SqliteStore, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("s.db")).unwrap();
    Some((store, dir))
}

sluice_store_conformance::store_tests!(fresh());

fn obs(id: &str, patient: &str, status: &str) -> sluice_store::NewResource {
    let v = json!({"resourceType":"Observation","id":id,"status":status,"subject":{"reference":format!("Patient/{patient}")}});
    prepare(&v.to_string(), None).unwrap()
}

/// The ids a scan of Observations sends, in the order it sends them.
async fn scan_ids(store: &SqliteStore, snap: &Snapshot, f: &ScanFilter) -> Vec<String> {
    let (tx, mut rx) = mpsc::channel(4);
    let (s, snap, f) = (store.clone(), snap.clone(), f.clone());
    let h = tokio::spawn(async move { s.scan(&snap, "Observation", &f, 64, tx).await });
    let mut ids = Vec::new();
    while let Some(b) = rx.recv().await {
        for l in b.lines() {
            let v: Value = serde_json::from_slice(l).unwrap();
            ids.push(v["id"].as_str().unwrap().to_string());
        }
    }
    h.await.unwrap().unwrap();
    ids
}

/// The clock and the snapshots live in the file: after reopening it, writes are later than
/// every earlier write and snapshot, and old snapshots still read (releasing one frees
/// nothing: it is a sequence number).
#[tokio::test]
async fn state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let (snap, last) = {
        let s = SqliteStore::open(&path).unwrap();
        let w = s.put(obs("a", "p", "final")).await.unwrap();
        let snap = s.snapshot().await.unwrap();
        s.release(&snap).await;
        (snap, w.last_updated)
    };
    let s = SqliteStore::open(&path).unwrap();
    let w = s.put(obs("b", "p", "final")).await.unwrap();
    assert!(w.last_updated > snap.time && w.last_updated > last, "the clock never goes back after a restart");
    assert!(s.can_resume(&snap).await, "a snapshot outlives its release and a restart");
    assert_eq!(scan_ids(&s, &snap, &ScanFilter::default()).await, vec!["a"], "old snapshots stay readable");
}

/// Every write is strictly later than the one before, even within one millisecond: the
/// clock is read and moved inside each write transaction.
#[tokio::test]
async fn every_write_is_later_than_the_one_before() {
    let (s, _dir) = fresh().await.unwrap();
    let mut last = None;
    for i in 0..50 {
        let w = s.put(obs("a", "p", &format!("v{i}"))).await.unwrap();
        assert!(Some(w.last_updated) > last, "write {i}");
        last = Some(w.last_updated);
    }
}

/// Two stores on one file (`sluice load` next to a running server) share the sequence and
/// the clock: each sees the other's writes, and writes stay later than the other's
/// snapshots.
#[tokio::test]
async fn two_stores_share_one_file() {
    let (a, dir) = fresh().await.unwrap();
    let b = SqliteStore::open(dir.path().join("s.db")).unwrap();
    a.put(obs("x", "p", "final")).await.unwrap();
    let snap = b.snapshot().await.unwrap();
    let w = a.put(obs("y", "p", "final")).await.unwrap();
    assert!(w.last_updated > snap.time, "a write after the other store's snapshot");
    b.put(obs("z", "p", "final")).await.unwrap();
    assert_eq!(scan_ids(&b, &snap, &ScanFilter::default()).await, vec!["x"]);
    let now = a.snapshot().await.unwrap();
    assert_eq!(scan_ids(&a, &now, &ScanFilter::default()).await, vec!["x", "y", "z"]);
}

/// Scans send resources in the order they were last written.
#[tokio::test]
async fn scans_come_in_the_order_of_writing() {
    let (s, _dir) = fresh().await.unwrap();
    for id in ["o4", "o1", "o2", "o3"] {
        s.put(obs(id, "p", "final")).await.unwrap();
    }
    s.put(obs("o2", "p", "amended")).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    s.put(obs("o4", "p", "amended")).await.unwrap();
    assert_eq!(scan_ids(&s, &snap, &ScanFilter::default()).await, vec!["o4", "o1", "o3", "o2"]);
    let range = ScanFilter {
        ids: Some(vec!["o1".into(), "o2".into(), "o4".into(), "o5".into()]),
        id_range: Some(IdRange { from: Some("o2".into()), to: Some("o5".into()) }),
        ..Default::default()
    };
    assert_eq!(scan_ids(&s, &snap, &range).await, vec!["o4", "o2"], "o2's version is the later");
    let now = s.snapshot().await.unwrap();
    assert_eq!(scan_ids(&s, &now, &ScanFilter::default()).await, vec!["o1", "o3", "o2", "o4"]);
}

/// D50: secret fields are sealed in the file and opened on read; the pass seals what was
/// stored plain and leaves no plain text in the database or WAL files; the file is 0600.
#[tokio::test]
async fn secrets_are_sealed_in_the_file() {
    use sluice_storage::{ConfigRepo, Secrets, SecretsKey};
    const SECRET: &str = "plain-secret-4b1d";
    let raw = |dir: &std::path::Path| {
        let mut bytes = std::fs::read(dir.join("s.db")).unwrap();
        bytes.extend(std::fs::read(dir.join("s.db-wal")).unwrap_or_default());
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let json = json!({"region":"r","access-key-id":"AK","secret-access-key":SECRET}).to_string();
    let plain = SqliteStore::open(dir.path().join("s.db")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("s.db")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(plain.config_put("AwsAccount", "a", &json).await.unwrap());
    assert!(plain.config_put("AzureContainer", "c", r#"{"storage":"s","container":"c"}"#).await.unwrap());
    assert!(raw(dir.path()).contains(SECRET));
    assert_eq!(plain.reseal_secrets().await.unwrap().resealed, 0, "no key, no pass");
    drop(plain);

    let key = SecretsKey::from_bytes(&[9u8; 32]);
    let sealed = SqliteStore::open(dir.path().join("s.db")).unwrap().with_secrets(Secrets::new(key.clone(), vec![]));
    let done = sealed.reseal_secrets().await.unwrap();
    assert_eq!((done.resealed, done.failed.len()), (1, 0));
    let bytes = raw(dir.path());
    assert!(!bytes.contains(SECRET), "the plain secret is still in the files");
    assert!(bytes.contains(&format!("enc:v1:{}:", key.id())));
    assert_eq!(sealed.config_get("AwsAccount", "a").await.unwrap().as_deref(), Some(json.as_str()));
    assert_eq!(sealed.reseal_secrets().await.unwrap().resealed, 0, "already sealed");
    assert!(!sealed.config_put("AwsAccount", "a", &json).await.unwrap());
    assert!(!raw(dir.path()).contains(SECRET));
    // Without the key, the sealed value is an error naming the variable.
    let e = SqliteStore::open(dir.path().join("s.db")).unwrap().config_get("AwsAccount", "a").await.unwrap_err();
    assert!(e.to_string().contains("SLUICE_SECRETS_KEY is not set"), "{e}");
}
