//! Scans and counts: every part of a `ScanFilter`, id ranges between split points, and
//! `scan_many`.

use crate::Store;
use crate::support::{
    BATCH_BYTES, check_batch, count_of, deleted_ids, ids, load, mark, obs, of, patient, res, scan_ids, set, shared,
};
use serde_json::{Value, json};
use sluice_store::{Batch, IdRange, LoadMsg, Patients, ScanFilter, Snapshot};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Per-type counts as of a snapshot of what a scan with the filter would return: only types
/// with data, nothing for an empty store.
pub async fn counts_per_type<S: Store>(store: S) {
    let s = Arc::new(store);
    let empty = s.snapshot().await.unwrap();
    assert!(s.count(&empty, &ScanFilter::default()).await.unwrap().is_empty(), "an empty store counts nothing");
    s.release(&empty).await;
    s.put(patient("p1")).await.unwrap();
    s.put(patient("p2")).await.unwrap();
    s.put(obs("o1", "p1", "final")).await.unwrap();
    s.put(res(json!({"resourceType":"Condition","id":"c1","subject":{"reference":"Group/g"}}))).await.unwrap();
    s.put(obs("o3", "p1", "final")).await.unwrap();
    s.delete("Observation", "o3").await.unwrap();
    let t = mark(&s).await;
    s.put(obs("o2", "p2", "final")).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    s.put(of("Encounter", "e1", "p1")).await.unwrap(); // after the snapshot
    let count = |f: ScanFilter| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { s.count(&snap, &f).await.unwrap() }
    };
    let counts = |list: &[(&str, u64)]| list.iter().map(|(t, n)| (t.to_string(), *n)).collect::<BTreeMap<_, _>>();
    let all = counts(&[("Condition", 1), ("Observation", 2), ("Patient", 2)]);
    assert_eq!(count(ScanFilter::default()).await, all, "not the deleted o3, not the later e1");
    let any = ScanFilter { patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(count(any).await, counts(&[("Observation", 2), ("Patient", 2)]), "c1 is in no compartment");
    let p1 = ScanFilter { patients: Some(Patients::Only(vec!["p1".into()])), ..Default::default() };
    assert_eq!(count(p1).await, counts(&[("Observation", 1), ("Patient", 1)]), "a Patient is in its own compartment");
    let deleted = ScanFilter { deleted: true, ..Default::default() };
    assert_eq!(count(deleted).await, counts(&[("Observation", 1)]));
    let since = ScanFilter { since: Some(t), ..Default::default() };
    assert_eq!(count(since).await, counts(&[("Observation", 1)]));
    let until = ScanFilter { until: Some(t), ..Default::default() };
    assert_eq!(count(until).await, counts(&[("Condition", 1), ("Observation", 1), ("Patient", 2)]));
    s.release(&snap).await;
}

/// Compartment filters: `Patients::Only` selects the resources in the compartment of any
/// listed patient (each once, through any of its patients), `Patients::Any` those in some
/// compartment; membership is per version.
pub async fn compartment_filters<S: Store>(store: S) {
    let s = Arc::new(store);
    s.put(patient("p1")).await.unwrap();
    s.put(patient("p2")).await.unwrap();
    s.put(obs("o1", "p1", "final")).await.unwrap();
    s.put(obs("o2", "p2", "final")).await.unwrap();
    s.put(res(json!({"resourceType":"Observation","id":"o3","subject":{"reference":"Group/g"}}))).await.unwrap();
    s.put(shared("o4", "p1", "p2")).await.unwrap();
    s.put(shared("o5", "p2", "p1")).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    let only = |ids: &[&str]| ScanFilter {
        patients: Some(Patients::Only(ids.iter().map(|s| s.to_string()).collect())),
        ..Default::default()
    };
    let scan = |t: &'static str, f: ScanFilter| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { scan_ids(&s, &snap, t, &f).await }
    };
    assert_eq!(scan("Observation", only(&["p1"])).await, set(&["o1", "o4", "o5"]), "o5 through its performer");
    assert_eq!(scan("Observation", only(&["p2"])).await, set(&["o2", "o4", "o5"]), "o4 through its performer");
    assert_eq!(scan("Observation", only(&["p1", "p2"])).await, set(&["o1", "o2", "o4", "o5"]), "each once");
    assert_eq!(scan("Patient", only(&["p2"])).await, set(&["p2"]), "a Patient is in its own compartment");
    assert!(scan("Observation", only(&["nope"])).await.is_empty());
    assert!(scan("Observation", only(&[])).await.is_empty(), "no patient listed, nothing");
    let any = ScanFilter { patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(scan("Observation", any.clone()).await, set(&["o1", "o2", "o4", "o5"]));
    assert_eq!(count_of(&s, &snap, "Observation", &only(&["p1", "p2"])).await, 4);
    assert_eq!(count_of(&s, &snap, "Observation", &only(&["p2"])).await, 3);
    // Membership is per version: moving o1 to p2 and o4 out of p1's leaves the snapshot's view alone.
    s.put(obs("o1", "p2", "final")).await.unwrap();
    s.put(obs("o4", "p2", "final")).await.unwrap();
    assert_eq!(scan("Observation", only(&["p1"])).await, set(&["o1", "o4", "o5"]));
    let now = s.snapshot().await.unwrap();
    assert_eq!(scan_ids(&s, &now, "Observation", &only(&["p1"])).await, set(&["o5"]));
    assert_eq!(scan_ids(&s, &now, "Observation", &only(&["p2"])).await, set(&["o1", "o2", "o4", "o5"]));
    assert_eq!(count_of(&s, &now, "Observation", &any).await, 4);
    s.release(&now).await;
    s.release(&snap).await;
}

/// `deleted` selects the resources whose current version (in the snapshot) is a tombstone
/// written in the window, as IG "deleted" lines, in the compartment of the version before
/// the deletion; a resource written again is not deleted.
pub async fn deletions_in_the_window<S: Store>(store: S) {
    let s = Arc::new(store);
    for (id, p) in [("o1", "p1"), ("o2", "p2"), ("o3", "p1"), ("o4", "p1"), ("o5", "p2")] {
        s.put(obs(id, p, "final")).await.unwrap();
    }
    s.delete("Observation", "o5").await.unwrap();
    let t0 = mark(&s).await;
    s.delete("Observation", "o1").await.unwrap();
    s.delete("Observation", "o2").await.unwrap();
    s.delete("Observation", "o4").await.unwrap();
    s.put(obs("o4", "p1", "again")).await.unwrap(); // written again: no longer deleted
    let snap = s.snapshot().await.unwrap();
    s.delete("Observation", "o3").await.unwrap(); // after the snapshot
    let deleted = |f: ScanFilter| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { deleted_ids(&s, &snap, "Observation", &f).await }
    };
    assert_eq!(deleted(ScanFilter::default()).await, set(&["o1", "o2", "o5"]));
    assert_eq!(deleted(ScanFilter { since: Some(t0), ..Default::default() }).await, set(&["o1", "o2"]));
    assert_eq!(deleted(ScanFilter { until: Some(t0), ..Default::default() }).await, set(&["o5"]));
    let p1 = ScanFilter { patients: Some(Patients::Only(vec!["p1".into()])), ..Default::default() };
    assert_eq!(deleted(p1.clone()).await, set(&["o1"]), "the compartment of the version before");
    let any = ScanFilter { patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(deleted(any).await, set(&["o1", "o2", "o5"]));
    assert!(deleted(ScanFilter::default()).await.is_disjoint(&scan_ids(&s, &snap, "Observation", &p1).await));
    let gone = ScanFilter { deleted: true, ..Default::default() };
    assert_eq!(count_of(&s, &snap, "Observation", &gone).await, 3);
    assert_eq!(count_of(&s, &snap, "Observation", &ScanFilter { since: Some(t0), ..gone }).await, 2);
    s.release(&snap).await;
}

/// A deleted resource that was in several patients' compartments is listed for each of
/// them (a `_since` export of any of those patients lists the deletion); written again, it
/// is in its new compartments only.
pub async fn deletions_keep_every_compartment<S: Store>(store: S) {
    let s = Arc::new(store);
    let shared_obs = |id: &str, subject: &str, performer: &str| {
        res(json!({"resourceType": "Observation", "id": id, "status": "final",
                   "subject": {"reference": format!("Patient/{subject}")},
                   "performer": [{"reference": format!("Patient/{performer}")}]}))
    };
    s.put(shared_obs("o1", "p1", "p2")).await.unwrap();
    s.put(shared_obs("o2", "p1", "p3")).await.unwrap();
    s.delete("Observation", "o1").await.unwrap();
    s.delete("Observation", "o2").await.unwrap();
    s.put(shared_obs("o2", "p4", "p4")).await.unwrap(); // back, in p4's compartment only
    let snap = s.snapshot().await.unwrap();
    let only = |p: &str, deleted: bool| ScanFilter {
        patients: Some(Patients::Only(vec![p.to_string()])),
        deleted,
        ..Default::default()
    };
    for (p, gone) in [("p1", &["o1"][..]), ("p2", &["o1"]), ("p3", &[]), ("p4", &[])] {
        assert_eq!(deleted_ids(&s, &snap, "Observation", &only(p, true)).await, set(gone), "deleted, for {p}");
        assert_eq!(count_of(&s, &snap, "Observation", &only(p, true)).await, gone.len() as u64, "counted, for {p}");
    }
    assert_eq!(scan_ids(&s, &snap, "Observation", &only("p4", false)).await, set(&["o2"]));
    for p in ["p1", "p2", "p3"] {
        assert!(scan_ids(&s, &snap, "Observation", &only(p, false)).await.is_empty(), "nothing current for {p}");
    }
    s.release(&snap).await;
}

/// Scans (and counts) of each id range between the split points.
async fn scan_ranges<S: Store>(
    s: &Arc<S>,
    snap: &Snapshot,
    t: &str,
    points: &[String],
    f: &ScanFilter,
) -> Vec<BTreeSet<String>> {
    let mut out = Vec::new();
    for range in IdRange::between(points) {
        let f = ScanFilter { id_range: Some(range), ..f.clone() };
        let ids = scan_ids(s, snap, t, &f).await;
        assert_eq!(count_of(s, snap, t, &f).await, ids.len() as u64);
        out.push(ids);
    }
    out
}

/// Checks that `parts` are disjoint and together `whole`.
fn assert_partition(parts: &[BTreeSet<String>], whole: &BTreeSet<String>) {
    let n: usize = parts.iter().map(BTreeSet::len).sum();
    let union: BTreeSet<String> = parts.iter().flatten().cloned().collect();
    assert_eq!(n, union.len(), "no resource in two ranges");
    assert_eq!(&union, whole, "every resource in a range");
}

/// `split_points` cuts a type's ids into about equal ranges (in the store's order of ids);
/// the id ranges between them partition what every scan and count of the snapshot selects,
/// with and without a compartment filter, for deletions too.
pub async fn id_ranges_partition_a_type<S: Store>(store: S) {
    let s = Arc::new(store);
    // Ids that sort differently by case, digits and punctuation in different collations.
    let ids: Vec<String> = (0..40).map(|i| format!("{}{i}", ["a", "B", "z.", "0-", "Z"][i % 5])).collect();
    for (i, id) in ids.iter().enumerate() {
        s.put(obs(id, if i % 2 == 0 { "p1" } else { "p2" }, "final")).await.unwrap();
    }
    s.delete("Observation", &ids[3]).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    // Written after the snapshot: counted by neither the scans nor the counts.
    s.put(obs("a-late", "p1", "final")).await.unwrap();
    s.delete("Observation", &ids[4]).await.unwrap();

    assert!(s.split_points(&snap, "Observation", 1).await.unwrap().is_empty(), "one part, no point");
    assert!(s.split_points(&snap, "Patient", 4).await.unwrap().is_empty(), "no rows, no points");
    let points = s.split_points(&snap, "Observation", 4).await.unwrap();
    assert_eq!(points.len(), 3, "{points:?}");
    assert_eq!(points.iter().collect::<BTreeSet<_>>().len(), 3, "distinct");
    let all = ScanFilter::default();
    let whole = scan_ids(&s, &snap, "Observation", &all).await;
    assert_eq!(whole.len(), 39, "the snapshot: 40 created, 1 deleted");
    let parts = scan_ranges(&s, &snap, "Observation", &points, &all).await;
    assert!(parts.iter().all(|p| (8..=12).contains(&p.len())), "about a quarter each: {parts:?}");
    assert_partition(&parts, &whole);
    let p1 = ScanFilter { patients: Some(Patients::Only(vec!["p1".into()])), ..Default::default() };
    assert_partition(
        &scan_ranges(&s, &snap, "Observation", &points, &p1).await,
        &scan_ids(&s, &snap, "Observation", &p1).await,
    );
    let mut gone = Vec::new();
    for range in IdRange::between(&points) {
        let f = ScanFilter { deleted: true, id_range: Some(range), ..Default::default() };
        gone.push(count_of(&s, &snap, "Observation", &f).await);
    }
    assert_eq!(gone.iter().sum::<u64>(), 1, "the deletion, in one range: {gone:?}");
    s.release(&snap).await;

    // More parts than resources: distinct points only, and the ranges still partition.
    for id in ["b", "a"] {
        s.put(res(json!({"resourceType":"Condition","id":id}))).await.unwrap();
    }
    let snap = s.snapshot().await.unwrap();
    let few = s.split_points(&snap, "Condition", 8).await.unwrap();
    assert!(few.len() <= 2 && few.iter().collect::<BTreeSet<_>>().len() == few.len(), "{few:?}");
    assert_partition(&scan_ranges(&s, &snap, "Condition", &few, &ScanFilter::default()).await, &set(&["a", "b"]));
    s.release(&snap).await;
}

/// `ScanFilter::ids` narrows scans and counts to the listed ids, together with every other
/// part of the filter: compartments (a resource in several too), the time window, id ranges,
/// deletions. An empty list, or one of ids that cannot exist, selects nothing.
pub async fn listed_ids<S: Store>(store: S) {
    let s = Arc::new(store);
    s.put(patient("p1")).await.unwrap();
    s.put(patient("p2")).await.unwrap();
    let mut written = Vec::new();
    for i in 1..=6 {
        mark(&s).await; // each write strictly later than the one before
        written.push(s.put(obs(&format!("o{i}"), if i % 2 == 1 { "p1" } else { "p2" }, "final")).await.unwrap());
    }
    s.put(shared("shared", "p1", "p2")).await.unwrap();
    s.put(obs("o2", "p2", "amended")).await.unwrap(); // a second version of o2
    s.delete("Observation", "o6").await.unwrap();
    let snap = s.snapshot().await.unwrap();
    s.put(obs("o1", "p1", "amended")).await.unwrap(); // after the snapshot
    s.put(obs("o7", "p1", "final")).await.unwrap();

    let only = |list: &[&str]| ScanFilter { ids: ids(list), ..Default::default() };
    let scan = |f: ScanFilter| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { scan_ids(&s, &snap, "Observation", &f).await }
    };
    let count = |f: ScanFilter| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { s.count(&snap, &f).await.unwrap() }
    };
    let obs_count = |n: u64| BTreeMap::from([("Observation".to_string(), n)]);
    assert_eq!(scan(only(&["o1", "o3", "o7", "nope"])).await, set(&["o1", "o3"]), "o7 came after the snapshot");
    assert_eq!(count(only(&["o1", "o3", "o7", "nope"])).await, obs_count(2));
    let v1 = s.read_at(&snap, "Observation", "o1").await.unwrap().unwrap();
    assert!(v1.contains("\"final\""), "the snapshot's version");
    assert_eq!(scan(only(&["o2", "o2"])).await, set(&["o2"]), "the version in the snapshot, once");
    assert!(scan(only(&["o6"])).await.is_empty(), "deleted");
    // Counts cover every type: the ids apply to each.
    let mixed = count(only(&["p1", "o4"])).await;
    assert_eq!(mixed, BTreeMap::from([("Observation".to_string(), 1), ("Patient".to_string(), 1)]));
    // Nothing: an empty list, ids that cannot exist (never SQL).
    for list in [&[][..], &["bad id", "x' OR '1'='1", ""]] {
        assert!(scan(only(list)).await.is_empty(), "{list:?}");
        assert!(count(only(list)).await.is_empty(), "{list:?}");
    }
    assert_eq!(scan(only(&["x' OR '1'='1", "o3"])).await, set(&["o3"]), "invalid ids are skipped");
    // With a compartment, through either of a shared resource's patients.
    let of = |patient: &str, list: &[&str]| ScanFilter {
        ids: ids(list),
        patients: Some(Patients::Only(vec![patient.into()])),
        ..Default::default()
    };
    assert_eq!(scan(of("p1", &["o1", "o2", "o3"])).await, set(&["o1", "o3"]));
    assert_eq!(count(of("p1", &["o1", "o2", "o3"])).await, obs_count(2));
    assert_eq!(scan(of("p1", &["o1", "o2", "o3", "shared"])).await, set(&["o1", "o3", "shared"]));
    assert_eq!(count(of("p1", &["o1", "o2", "o3", "shared"])).await, obs_count(3));
    assert_eq!(scan(of("p2", &["o1", "o2", "shared"])).await, set(&["o2", "shared"]));
    assert_eq!(scan(of("p2", &["o1", "o2"])).await, set(&["o2"]));
    assert_eq!(count(of("p2", &["o1", "o2"])).await, obs_count(1));
    let any = ScanFilter { ids: ids(&["o2", "p1", "nope"]), patients: Some(Patients::Any), ..Default::default() };
    assert_eq!(scan(any.clone()).await, set(&["o2"]));
    let in_any = BTreeMap::from([("Observation".to_string(), 1), ("Patient".to_string(), 1)]);
    assert_eq!(count(any).await, in_any, "a Patient is in its own compartment");
    // With a time window: o3 and o4 were written after o2's first version, o4 at the latest.
    let window = ScanFilter {
        since: Some(written[1].last_updated),
        until: Some(written[3].last_updated),
        ids: ids(&["o1", "o3", "o4", "o5"]),
        ..Default::default()
    };
    assert_eq!(scan(window.clone()).await, set(&["o3", "o4"]));
    assert_eq!(count(window).await, obs_count(2));
    // With an id range.
    let range = ScanFilter {
        ids: ids(&["o1", "o2", "o4", "o5"]),
        id_range: Some(IdRange { from: Some("o2".into()), to: Some("o5".into()) }),
        ..Default::default()
    };
    assert_eq!(scan(range.clone()).await, set(&["o2", "o4"]));
    assert_eq!(count(range).await, obs_count(2));
    // Deletions: only the listed ones.
    let deleted = |list: &[&str]| ScanFilter { deleted: true, ids: ids(list), ..Default::default() };
    assert_eq!(count(deleted(&["o6"])).await, obs_count(1));
    assert!(count(deleted(&["o5"])).await.is_empty());
    assert_eq!(deleted_ids(&s, &snap, "Observation", &deleted(&["o6", "o1"])).await, set(&["o6"]));
    s.release(&snap).await;
}

/// Ten thousand ids (and twenty thousand) in one filter, in a scan and a count, with and
/// without a patient list: more than a database allows as bound parameters.
pub async fn many_listed_ids<S: Store>(store: S) {
    let s = Arc::new(store);
    load(&s, vec![(0..600).map(|i| obs(&format!("o{i}"), "p", "final")).collect()], LoadMsg::Commit).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    // Every even id up to 40,000: 300 of them exist.
    let list: Vec<String> = (0..40_000).step_by(4).chain((2..40_000).step_by(4)).map(|i| format!("o{i}")).collect();
    assert_eq!(list.len(), 20_000);
    let f = ScanFilter { ids: Some(list[..10_000].to_vec()), ..Default::default() };
    assert_eq!(s.count(&snap, &f).await.unwrap(), BTreeMap::from([("Observation".to_string(), 150)]));
    assert_eq!(scan_ids(&s, &snap, "Observation", &f).await.len(), 150);
    let even = |got: &BTreeSet<String>| got.iter().all(|id| id[1..].parse::<u32>().unwrap() % 2 == 0);
    let f = ScanFilter { ids: Some(list.clone()), ..Default::default() };
    let got = scan_ids(&s, &snap, "Observation", &f).await;
    assert_eq!(got.len(), 300);
    assert!(even(&got));
    assert_eq!(s.count(&snap, &f).await.unwrap(), BTreeMap::from([("Observation".to_string(), 300)]));
    let f = ScanFilter { ids: Some(list), patients: Some(Patients::Only(vec!["p".into()])), ..Default::default() };
    let got = scan_ids(&s, &snap, "Observation", &f).await;
    assert_eq!(got.len(), 300);
    assert!(even(&got));
    assert_eq!(s.count(&snap, &f).await.unwrap()["Observation"], 300);
    s.release(&snap).await;
}

/// A scan sends its lines in batches of about `batch_bytes` (whatever the size asked for),
/// every line once; a reader that stops early ends the scan without an error.
pub async fn scans_stream_in_batches_until_the_reader_goes<S: Store>(store: S) {
    let s = Arc::new(store);
    load(&s, vec![(0..300).map(|i| obs(&format!("o{i}"), "p", "final")).collect()], LoadMsg::Commit).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    for limit in [1, 500, 1 << 20] {
        let (tx, mut rx) = mpsc::channel(4);
        let (s2, snap2) = (s.clone(), snap.clone());
        let h = tokio::spawn(async move { s2.scan(&snap2, "Observation", &ScanFilter::default(), limit, tx).await });
        let (mut batches, mut ids) = (0, BTreeSet::new());
        while let Some(b) = rx.recv().await {
            check_batch(&b, limit);
            batches += 1;
            for l in b.lines() {
                let v: Value = serde_json::from_slice(l).unwrap();
                assert!(ids.insert(v["id"].as_str().unwrap().to_string()), "each line once");
            }
        }
        h.await.unwrap().unwrap();
        assert_eq!(ids.len(), 300, "batches of {limit} bytes");
        assert!(limit > 1 || batches == 300, "one line a batch: {batches}");
        assert!(limit < 1 << 20 || batches == 1, "everything in one batch: {batches}");
    }
    // The reader takes one batch and goes away.
    let (tx, mut rx) = mpsc::channel(1);
    let (s2, snap2) = (s.clone(), snap.clone());
    let h = tokio::spawn(async move { s2.scan(&snap2, "Observation", &ScanFilter::default(), 64, tx).await });
    assert_eq!(rx.recv().await.unwrap().count, 1);
    drop(rx);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), h).await.expect("ends when the reader goes");
    ended.unwrap().unwrap();
    s.release(&snap).await;
}

/// What `scan_many` sends: per source, `(tag, batch)`s in the order of the sources.
async fn scan_many_batches<S: Store>(
    s: &Arc<S>,
    snap: &Snapshot,
    sources: &[(String, ScanFilter)],
) -> Vec<(usize, Batch)> {
    let (tx, mut rx) = mpsc::channel(2);
    let (s2, snap2, sources2) = (s.clone(), snap.clone(), sources.to_vec());
    let h = tokio::spawn(async move { s2.scan_many(&snap2, &sources2, BATCH_BYTES, tx).await });
    let mut out = Vec::new();
    while let Some(b) = rx.recv().await {
        out.push(b);
    }
    h.await.unwrap().unwrap();
    out
}

/// `scan_many` streams each source's scan one after the other, in order, each batch tagged
/// with its source and holding only that source's lines: exactly what `scan` of each sends.
pub async fn scan_many_streams_each_source_in_order<S: Store>(store: S) {
    let s = Arc::new(store);
    s.put(patient("p1")).await.unwrap();
    s.put(patient("p2")).await.unwrap();
    for (id, p) in [("o1", "p1"), ("o2", "p2"), ("o6", "p1"), ("o7", "p1")] {
        s.put(obs(id, p, "final")).await.unwrap();
    }
    s.put(shared("o3", "p1", "p2")).await.unwrap();
    s.put(of("Condition", "c1", "p1")).await.unwrap();
    s.put(of("Encounter", "e2", "p2")).await.unwrap();
    s.delete("Observation", "o2").await.unwrap();
    let snap = s.snapshot().await.unwrap();
    s.put(obs("o9", "p1", "final")).await.unwrap(); // after the snapshot
    let only = |p: &str| ScanFilter { patients: Some(Patients::Only(vec![p.into()])), ..Default::default() };
    let block = |p: &str, types: &[&str]| types.iter().map(|t| (t.to_string(), only(p))).collect::<Vec<_>>();
    let mut sources = block("p1", &["Patient", "Observation", "Condition", "Encounter"]);
    sources.extend(block("p2", &["Patient", "Observation", "Encounter"]));
    sources.push(("Observation".into(), ScanFilter { deleted: true, ..Default::default() }));
    sources.extend(block("p2", &["Observation", "Observation"])); // the same type and filter again
    sources.push(("Observation".into(), ScanFilter::default()));

    let batches = scan_many_batches(&s, &snap, &sources).await;
    assert!(batches.windows(2).all(|w| w[0].0 <= w[1].0), "the sources in order");
    let mut got: Vec<BTreeSet<String>> = vec![BTreeSet::new(); sources.len()];
    for (tag, batch) in &batches {
        check_batch(batch, BATCH_BYTES);
        let (t, f) = &sources[*tag];
        for l in batch.lines() {
            let v: Value = serde_json::from_slice(l).unwrap();
            let id = if f.deleted {
                v["entry"][0]["request"]["url"].as_str().unwrap().strip_prefix("Observation/").unwrap().to_string()
            } else {
                assert_eq!(v["resourceType"], t.as_str(), "source {tag} sends only its own type");
                v["id"].as_str().unwrap().to_string()
            };
            assert!(got[*tag].insert(id), "each line once");
        }
    }
    for (i, (t, f)) in sources.iter().enumerate() {
        let alone = if f.deleted { deleted_ids(&s, &snap, t, f).await } else { scan_ids(&s, &snap, t, f).await };
        assert_eq!(got[i], alone, "source {i} ({t}) reads what its own scan reads");
    }
    let expected = [
        set(&["p1"]),
        set(&["o1", "o3", "o6", "o7"]),
        set(&["c1"]),
        set(&[]),
        set(&["p2"]),
        set(&["o3"]),
        set(&["e2"]),
        set(&["o2"]),
        set(&["o3"]),
        set(&["o3"]),
        set(&["o1", "o3", "o6", "o7"]),
    ];
    assert_eq!(got, expected);
    assert!(scan_many_batches(&s, &snap, &[]).await.is_empty(), "no sources, nothing");
    s.release(&snap).await;
}

/// A reader of `scan_many` that takes one batch and goes away, in the middle of a source
/// with more batches to come: `scan_many` ends, without an error.
pub async fn scan_many_ends_when_the_reader_goes<S: Store>(store: S) {
    let s = Arc::new(store);
    load(&s, vec![(0..50).map(|i| obs(&format!("o{i}"), "p", "final")).collect()], LoadMsg::Commit).await.unwrap();
    let snap = s.snapshot().await.unwrap();
    let sources =
        vec![("Observation".to_string(), ScanFilter::default()), ("Patient".to_string(), ScanFilter::default())];
    let (tx, mut rx) = mpsc::channel(1);
    let (s2, snap2) = (s.clone(), snap.clone());
    let h = tokio::spawn(async move { s2.scan_many(&snap2, &sources, 1, tx).await });
    let (tag, first) = rx.recv().await.unwrap();
    assert_eq!((tag, first.count), (0, 1), "one line a batch");
    drop(rx);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), h).await.expect("ends when the reader goes");
    ended.unwrap().unwrap();
    s.release(&snap).await;
}
