//! Writes: versions and tombstones, reads, transactions, bulk loads, the write clock.

use crate::Store;
use crate::support::{load, mark, obs, of, patient, res, scan_ids, set};
use serde_json::{Value, json};
use sluice_fhir::instant;
use sluice_store::{LoadMsg, Patients, ReadResult, ScanFilter, StoreError, WriteOp, prepare};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Every write makes a new version with `meta.versionId` and `meta.lastUpdated` set by the
/// store; identical content writes nothing; a delete leaves a tombstone (once), and a
/// resource written again after it is created anew.
pub async fn versions_and_tombstones<S: Store>(store: S) {
    let s = Arc::new(store);
    assert!(!s.describe().is_empty(), "a store describes itself");
    let w1 = s.put(obs("o1", "p1", "final")).await.unwrap();
    assert!(w1.created && !w1.unchanged);
    assert_eq!((w1.resource_type.as_str(), w1.id.as_str(), w1.version_id), ("Observation", "o1", 1));
    let stored: Value = serde_json::from_str(w1.json.as_deref().unwrap()).unwrap();
    assert_eq!(stored["meta"]["versionId"], "1");
    assert_eq!(stored["meta"]["lastUpdated"], instant::format(w1.last_updated));

    let same = s.put(obs("o1", "p1", "final")).await.unwrap();
    assert!(same.unchanged && !same.created, "identical content writes no version");
    assert_eq!((same.version_id, same.last_updated, &same.json), (1, w1.last_updated, &w1.json), "the stored one");

    let between = mark(&s).await;
    let w2 = s.put(obs("o1", "p1", "amended")).await.unwrap();
    assert!(!w2.created && !w2.unchanged);
    assert_eq!(w2.version_id, 2);
    assert!(w1.last_updated <= between && between < w2.last_updated, "a later version is later");

    let d = s.delete("Observation", "o1").await.unwrap().unwrap();
    assert_eq!((d.version_id, d.json.as_deref(), d.created), (3, None, false));
    assert_eq!(s.read("Observation", "o1").await.unwrap(), ReadResult::Deleted(3));
    assert!(s.delete("Observation", "o1").await.unwrap().is_none(), "deleting twice is a no-op");
    assert_eq!(s.read("Observation", "o1").await.unwrap(), ReadResult::Deleted(3), "still the first tombstone");
    assert!(s.delete("Observation", "nope").await.unwrap().is_none(), "deleting what never was is a no-op");
    assert_eq!(s.read("Observation", "nope").await.unwrap(), ReadResult::NotFound);

    let again = s.put(obs("o1", "p1", "final")).await.unwrap();
    assert!(again.created && !again.unchanged, "re-creating after a delete counts as created");
    assert_eq!(again.version_id, 4);
    let snap = s.snapshot().await.unwrap();
    let counts = s.count(&snap, &ScanFilter::default()).await.unwrap();
    assert_eq!(counts, BTreeMap::from([("Observation".to_string(), 1)]), "one resource, whatever its versions");
    s.release(&snap).await;
}

/// `read` gives the current version's text exactly as stored, per type and id; `read_at`
/// the version a snapshot holds, or nothing where the snapshot holds none.
pub async fn reads<S: Store>(store: S) {
    let s = Arc::new(store);
    // Numbers and strings stay exactly as written (D17).
    let text = r#"{"resourceType":"Observation","id":"x","status":"final","valueQuantity":{"value":1.50},"note":[{"text":"\u00e9 \"q\""}]}"#;
    let w = s.put(prepare(text, None).unwrap()).await.unwrap();
    let json = w.json.clone().unwrap();
    assert!(json.contains(r#""value":1.50"#) && json.contains(r#""\u00e9 \"q\"""#), "{json}");
    assert_eq!(s.read("Observation", "x").await.unwrap(), ReadResult::Found(json.clone()));
    assert_eq!(s.read("Condition", "x").await.unwrap(), ReadResult::NotFound, "an id is per type");
    let c = s.put(of("Condition", "x", "p")).await.unwrap();
    assert_eq!(c.version_id, 1, "a type's ids are its own");
    s.delete("Condition", "x").await.unwrap().unwrap();
    assert_eq!(s.read("Observation", "x").await.unwrap(), ReadResult::Found(json.clone()), "left alone");
    assert_eq!(s.read("Condition", "x").await.unwrap(), ReadResult::Deleted(2));

    let snap = s.snapshot().await.unwrap();
    let w2 = s.put(res(json!({"resourceType":"Observation","id":"x","status":"amended"}))).await.unwrap();
    s.put(obs("later", "p", "final")).await.unwrap();
    assert_eq!(s.read("Observation", "x").await.unwrap(), ReadResult::Found(w2.json.unwrap()), "the current one");
    assert_eq!(s.read_at(&snap, "Observation", "x").await.unwrap(), Some(json), "the snapshot's version, exactly");
    assert_eq!(s.read_at(&snap, "Condition", "x").await.unwrap(), None, "deleted in the snapshot");
    assert_eq!(s.read_at(&snap, "Observation", "later").await.unwrap(), None, "written after the snapshot");
    assert_eq!(s.read_at(&snap, "Observation", "nope").await.unwrap(), None);
    s.release(&snap).await;
}

/// A transaction applies its operations in order, each seeing the ones before it, and
/// commits them at once: a snapshot taken meanwhile holds all of one or none.
pub async fn transactions_apply_all_or_nothing<S: Store>(store: S) {
    let s = Arc::new(store);
    let del = |t: &str, id: &str| WriteOp::Delete { resource_type: t.into(), id: id.into() };
    let out = s.transaction(vec![WriteOp::Put(obs("a", "p", "final")), del("Observation", "zz")]).await.unwrap();
    assert_eq!(out.len(), 2);
    assert!(out[0].as_ref().unwrap().created);
    assert!(out[1].is_none(), "deleting a missing resource reports nothing");

    let out = s
        .transaction(vec![
            WriteOp::Put(obs("b", "p", "final")),
            WriteOp::Put(obs("b", "p", "final")),
            WriteOp::Put(obs("b", "p", "amended")),
            del("Observation", "b"),
            del("Observation", "a"),
        ])
        .await
        .unwrap();
    let got: Vec<_> = out.iter().map(|w| w.as_ref().map(|w| (w.version_id, w.created, w.unchanged))).collect();
    let expected = [Some((1, true, false)), Some((1, false, true)), Some((2, false, false)), Some((3, false, false))];
    assert_eq!(got, [&expected[..], &[Some((2, false, false))]].concat(), "in order, each on the one before");
    assert_eq!(s.read("Observation", "b").await.unwrap(), ReadResult::Deleted(3));
    assert_eq!(s.read("Observation", "a").await.unwrap(), ReadResult::Deleted(2));

    // Pairs written by transactions while snapshots are taken: never half a pair.
    const PAIRS: usize = 40;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..PAIRS {
                let id = format!("t{i}");
                let pair = vec![WriteOp::Put(of("Encounter", &id, "p")), WriteOp::Put(of("Condition", &id, "p"))];
                s.transaction(pair).await.unwrap();
            }
        })
    };
    let pairs = |counts: &BTreeMap<String, u64>| {
        let n = |t: &str| counts.get(t).copied().unwrap_or(0);
        assert_eq!(n("Encounter"), n("Condition"), "half a transaction: {counts:?}");
        n("Encounter")
    };
    loop {
        let done = writer.is_finished();
        let snap = s.snapshot().await.unwrap();
        let seen = pairs(&s.count(&snap, &ScanFilter::default()).await.unwrap());
        s.release(&snap).await;
        if done {
            assert_eq!(seen, PAIRS as u64);
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
}

/// A bulk load commits everything on `Commit`, and nothing when aborted or when its input
/// ends first; a resource sent twice is written like two puts (an update, or unchanged).
pub async fn loads_commit_or_roll_back<S: Store>(store: S) {
    let s = Arc::new(store);
    let aborted = LoadMsg::Abort("bad.ndjson:3: not valid JSON".into());
    let err = load(&s, vec![vec![obs("a", "p", "final"), obs("b", "p", "final")]], aborted).await.unwrap_err();
    assert!(matches!(&err, StoreError::LoadAborted(why) if why.contains("bad.ndjson:3")), "{err:?}");
    assert!(err.to_string().contains("bad.ndjson:3"), "{err}");
    assert_eq!(s.read("Observation", "a").await.unwrap(), ReadResult::NotFound);
    assert_eq!(s.read("Observation", "b").await.unwrap(), ReadResult::NotFound);

    // Input that ends without a commit is rolled back too.
    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    tx.send(LoadMsg::Batch(vec![obs("a", "p", "final")])).await.unwrap();
    drop(tx);
    assert!(matches!(h.await.unwrap(), Err(StoreError::LoadAborted(_))));
    assert_eq!(s.read("Observation", "a").await.unwrap(), ReadResult::NotFound);

    // Twice in one batch, and again in the next one.
    let first = vec![obs("a", "p", "final"), obs("b", "p", "final"), obs("a", "q", "amended")];
    let sum = load(&s, vec![first, vec![obs("b", "p", "final")]], LoadMsg::Commit).await.unwrap();
    assert_eq!(sum.per_type, BTreeMap::from([("Observation".to_string(), 4)]));
    assert_eq!((sum.updated, sum.unchanged), (1, 1));
    match s.read("Observation", "a").await.unwrap() {
        ReadResult::Found(j) => {
            let v: Value = serde_json::from_str(&j).unwrap();
            assert_eq!((v["status"].as_str(), v["meta"]["versionId"].as_str()), (Some("amended"), Some("2")));
        }
        other => panic!("{other:?}"),
    }
    let snap = s.snapshot().await.unwrap();
    let only = |p: &str| ScanFilter { patients: Some(Patients::Only(vec![p.into()])), ..Default::default() };
    assert_eq!(
        scan_ids(&s, &snap, "Observation", &only("q")).await,
        set(&["a"]),
        "the compartment of the last version"
    );
    assert_eq!(scan_ids(&s, &snap, "Observation", &only("p")).await, set(&["b"]));
    s.release(&snap).await;

    // Into a store that holds data.
    let more = vec![obs("a", "q", "amended"), obs("c", "p", "final"), patient("p"), obs("b", "p", "corrected")];
    let sum = load(&s, vec![more], LoadMsg::Commit).await.unwrap();
    let per_type = BTreeMap::from([("Observation".to_string(), 3), ("Patient".to_string(), 1)]);
    assert_eq!((sum.per_type, sum.updated, sum.unchanged), (per_type, 1, 1));
    assert!(matches!(s.read("Observation", "c").await.unwrap(), ReadResult::Found(_)));
    assert!(matches!(s.read("Observation", "b").await.unwrap(), ReadResult::Found(j) if j.contains("corrected")));
}

/// `lastUpdated` never goes back past a snapshot: a snapshot's time is at least every
/// earlier write's, every later write (put, delete, transaction, load) is strictly later,
/// and snapshot times never decrease.
pub async fn the_clock_never_goes_back<S: Store>(store: S) {
    let s = Arc::new(store);
    let mut last = None;
    for i in 0..20 {
        let w = s.put(obs(&format!("c{i}"), "p", "final")).await.unwrap();
        last = last.max(Some(w.last_updated));
    }
    let snap1 = s.snapshot().await.unwrap();
    assert!(Some(snap1.time) >= last, "a snapshot is at least as late as every write before it");
    let d = s.delete("Observation", "c0").await.unwrap().unwrap();
    assert!(d.last_updated > snap1.time, "a delete after a snapshot");
    let snap2 = s.snapshot().await.unwrap();
    assert!(snap2.time >= d.last_updated && snap2.time >= snap1.time);
    let t = s.transaction(vec![WriteOp::Put(obs("c1", "p", "amended"))]).await.unwrap();
    assert!(t[0].as_ref().unwrap().last_updated > snap2.time, "a transaction after a snapshot");
    let snap3 = s.snapshot().await.unwrap();
    assert!(snap3.time >= snap2.time);
    load(&s, vec![vec![obs("l", "p", "final")]], LoadMsg::Commit).await.unwrap();
    let ReadResult::Found(loaded) = s.read("Observation", "l").await.unwrap() else { panic!("loaded") };
    let v: Value = serde_json::from_str(&loaded).unwrap();
    let stamp = instant::parse(v["meta"]["lastUpdated"].as_str().unwrap()).unwrap();
    assert!(stamp > snap3.time, "a load after a snapshot");
    for snap in [snap1, snap2, snap3] {
        s.release(&snap).await;
    }
}
