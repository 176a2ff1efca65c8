//! What the scenarios share: resources to write, and readers that check every batch a store
//! sends.

use crate::Store;
use serde_json::{Value, json};
use sluice_store::{
    Batch, LoadMsg, LoadSummary, NewResource, PATIENT_BATCH, ScanFilter, Snapshot, StoreError, prepare,
};
use std::collections::BTreeSet;
use std::sync::Arc;
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// The batch size the scenarios scan with: small, so that a scan sends many batches.
pub(crate) const BATCH_BYTES: usize = 64;

/// A resource ready to write.
pub(crate) fn res(v: Value) -> NewResource {
    prepare(&v.to_string(), None).unwrap()
}

/// An Observation in `patient`'s compartment.
pub(crate) fn obs(id: &str, patient: &str, status: &str) -> NewResource {
    res(
        json!({"resourceType":"Observation","id":id,"status":status,"subject":{"reference":format!("Patient/{patient}")}}),
    )
}

/// A resource of type `t` whose subject is `patient`.
pub(crate) fn of(t: &str, id: &str, patient: &str) -> NewResource {
    res(json!({"resourceType":t,"id":id,"subject":{"reference":format!("Patient/{patient}")}}))
}

/// A Patient resource.
pub(crate) fn patient(id: &str) -> NewResource {
    res(json!({"resourceType":"Patient","id":id}))
}

/// An Observation in two compartments: `subject` and `performer`.
pub(crate) fn shared(id: &str, subject: &str, performer: &str) -> NewResource {
    res(json!({"resourceType":"Observation","id":id,"subject":{"reference":format!("Patient/{subject}")},
        "performer":[{"reference":format!("Patient/{performer}")}]}))
}

/// Owned strings.
pub(crate) fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A set of ids.
pub(crate) fn set(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A list of ids for [`ScanFilter::ids`].
pub(crate) fn ids(list: &[&str]) -> Option<Vec<String>> {
    Some(strings(list))
}

/// Checks one batch of a scan of at most about `limit` bytes: not empty, `count` lines, and
/// under `limit` before its last line.
pub(crate) fn check_batch(b: &Batch, limit: usize) {
    let lines: Vec<&[u8]> = b.lines().collect();
    assert!(!lines.is_empty(), "no empty batch");
    assert_eq!(b.count as usize, lines.len(), "a batch counts its lines");
    assert_eq!(b.data.len(), lines.iter().map(|l| l.len() + 1).sum::<usize>(), "every line ends with a newline");
    let before_last = b.data.len() - lines.last().map_or(0, |l| l.len() + 1);
    assert!(before_last < limit, "a batch is sent once it holds {limit} bytes: {before_last} before its last line");
}

/// Every line a scan of `t` sends, parsed, each batch checked.
pub(crate) async fn scan_lines<S: Store>(s: &Arc<S>, snap: &Snapshot, t: &str, f: &ScanFilter) -> Vec<Value> {
    let (tx, mut rx) = mpsc::channel(4);
    let (s2, snap2, t2, f2) = (s.clone(), snap.clone(), t.to_string(), f.clone());
    let h = tokio::spawn(async move { s2.scan(&snap2, &t2, &f2, BATCH_BYTES, tx).await });
    let mut lines = Vec::new();
    while let Some(b) = rx.recv().await {
        check_batch(&b, BATCH_BYTES);
        lines.extend(b.lines().map(|l| serde_json::from_slice::<Value>(l).unwrap()));
    }
    h.await.unwrap().unwrap();
    lines
}

/// The ids a scan of `t` sends, each once, every line of type `t`.
pub(crate) async fn scan_ids<S: Store>(s: &Arc<S>, snap: &Snapshot, t: &str, f: &ScanFilter) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for v in scan_lines(s, snap, t, f).await {
        assert_eq!(v["resourceType"], t);
        assert!(ids.insert(v["id"].as_str().unwrap().to_string()), "no duplicates: {v}");
    }
    ids
}

/// The ids of the IG "deleted" lines a scan of `t`'s deletions sends (`filter.deleted` is
/// set here): each line a `transaction` Bundle with one `DELETE` of `t/id`, each id once.
pub(crate) async fn deleted_ids<S: Store>(s: &Arc<S>, snap: &Snapshot, t: &str, f: &ScanFilter) -> BTreeSet<String> {
    let f = ScanFilter { deleted: true, ..f.clone() };
    let mut ids = BTreeSet::new();
    for v in scan_lines(s, snap, t, &f).await {
        assert_eq!((v["resourceType"].as_str(), v["type"].as_str()), (Some("Bundle"), Some("transaction")), "{v}");
        let entries = v["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 1, "{v}");
        assert_eq!(entries[0]["request"]["method"], "DELETE");
        let url = entries[0]["request"]["url"].as_str().unwrap();
        let id = url.strip_prefix(&format!("{t}/")).unwrap_or_else(|| panic!("{url} is not a {t}"));
        assert!(ids.insert(id.to_string()), "no duplicates: {v}");
    }
    ids
}

/// The count of type `t` under `f` (zero when the type is absent from the counts).
pub(crate) async fn count_of<S: Store>(s: &Arc<S>, snap: &Snapshot, t: &str, f: &ScanFilter) -> u64 {
    s.count(snap, f).await.unwrap().get(t).copied().unwrap_or(0)
}

/// The time of a snapshot taken now (released at once): later writes are later than it.
pub(crate) async fn mark<S: Store>(s: &Arc<S>) -> OffsetDateTime {
    let snap = s.snapshot().await.unwrap();
    s.release(&snap).await;
    snap.time
}

/// Runs a load of `batches`, ended by `end`.
pub(crate) async fn load<S: Store>(
    s: &Arc<S>,
    batches: Vec<Vec<NewResource>>,
    end: LoadMsg,
) -> Result<LoadSummary, StoreError> {
    let (tx, rx) = mpsc::channel(4);
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.load(rx).await });
    for b in batches {
        tx.send(LoadMsg::Batch(b)).await.unwrap();
    }
    tx.send(end).await.unwrap();
    h.await.unwrap()
}

/// What `compartment_patients` sends, batch by batch.
pub(crate) async fn patient_batches<S: Store>(
    s: &Arc<S>,
    snap: &Snapshot,
    types: &[&str],
    f: &ScanFilter,
) -> Vec<Vec<String>> {
    let (tx, mut rx) = mpsc::channel(2);
    let (s2, snap2, types, f2) = (s.clone(), snap.clone(), strings(types), f.clone());
    let h = tokio::spawn(async move { s2.compartment_patients(&snap2, &types, &f2, tx).await });
    let mut batches = Vec::new();
    while let Some(b) = rx.recv().await {
        batches.push(b);
    }
    h.await.unwrap().unwrap();
    batches
}

/// The patient ids `compartment_patients` sends, checked to come in non-empty batches of at
/// most `PATIENT_BATCH` and to strictly increase (so none comes twice). The scenarios' ids
/// sort alike in every collation.
pub(crate) async fn compartment_ids<S: Store>(
    s: &Arc<S>,
    snap: &Snapshot,
    types: &[&str],
    f: &ScanFilter,
) -> Vec<String> {
    let batches = patient_batches(s, snap, types, f).await;
    assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= PATIENT_BATCH), "batch sizes: {batches:?}");
    let ids = batches.concat();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing: {ids:?}");
    ids
}
