//! `compartment_patients`: the patients a patient-level export organized by patient writes
//! blocks for.

use crate::Store;
use crate::support::{compartment_ids, ids, load, mark, obs, of, patient, patient_batches, res, shared, strings};
use serde_json::json;
use sluice_store::{IdRange, LoadMsg, PATIENT_BATCH, Patients, ScanFilter, Snapshot, StoreError};
use std::sync::Arc;
use tokio::sync::mpsc;

/// `compartment_patients` lists, in increasing order and each once, the patients in whose
/// compartment lies a current resource of the given types last updated in the window, as of
/// the snapshot: through any of a resource's patients, whether or not a Patient resource
/// exists; deleted resources do not count; `id_range` bounds the patient ids; the filter's
/// `patients`, `ids` and `deleted` are ignored.
pub async fn compartment_patients_lists_patients_with_resources_in_the_window<S: Store>(store: S) {
    let s = Arc::new(store);
    // Up to `t1`: p1 and p3 with a Patient resource, p2 and p4 without one.
    s.put(patient("p1")).await.unwrap();
    s.put(obs("o1", "p1", "final")).await.unwrap();
    s.put(of("Condition", "c2", "p2")).await.unwrap();
    s.put(patient("p3")).await.unwrap();
    s.put(obs("o3", "p3", "final")).await.unwrap();
    s.put(of("Encounter", "e3", "p3")).await.unwrap();
    // In p1's and p4's compartments (p1 is its least patient); p4 has nothing else.
    s.put(shared("shared", "p1", "p4")).await.unwrap();
    s.put(of("Procedure", "x5", "p5")).await.unwrap(); // p5: only a type not always asked for
    s.put(obs("o6", "p6", "final")).await.unwrap();
    s.delete("Observation", "o6").await.unwrap(); // p6: only a deleted resource
    // p0 and p9: in the compartments of a resource's earlier version only.
    s.put(shared("moved", "p0", "p9")).await.unwrap();
    s.put(res(json!({"resourceType":"Observation","id":"moved","subject":{"reference":"Group/g"}}))).await.unwrap();
    let t1 = mark(&s).await;
    // Between `t1` and `t2`: a new patient p7.
    let w7 = s.put(obs("o7", "p7", "final")).await.unwrap();
    let t2 = mark(&s).await;
    // After `t2`: a second version of p2's only resource.
    s.put(res(json!({"resourceType":"Condition","id":"c2","subject":{"reference":"Patient/p2"},"onsetString":"x"})))
        .await
        .unwrap();
    let snap = s.snapshot().await.unwrap();
    // After the snapshot: p3 loses everything, p1 its Patient resource, p8 appears, and p4's
    // shared Observation leaves p4's compartment.
    for (t, id) in [("Patient", "p3"), ("Observation", "o3"), ("Encounter", "e3"), ("Patient", "p1")] {
        s.delete(t, id).await.unwrap().unwrap();
    }
    s.put(obs("o8", "p8", "final")).await.unwrap();
    s.put(obs("shared", "p1", "final")).await.unwrap();

    let main: &[&str] = &["Patient", "Observation", "Condition", "Encounter"];
    let all = ScanFilter::default();
    let listed = |types: &'static [&'static str], f: ScanFilter| {
        let (s, snap) = (s.clone(), snap.clone());
        async move { compartment_ids(&s, &snap, types, &f).await }
    };
    assert_eq!(
        listed(main, all.clone()).await,
        strings(&["p1", "p2", "p3", "p4", "p7"]),
        "not p0 and p9 (an old version), p5 (another type), p6 (deleted), p8 (after the snapshot)"
    );
    // Types.
    let with_procedure = &["Procedure", "Patient", "Observation", "Condition", "Encounter"];
    assert_eq!(listed(with_procedure, all.clone()).await, strings(&["p1", "p2", "p3", "p4", "p5", "p7"]));
    assert_eq!(listed(&["Procedure"], all.clone()).await, strings(&["p5"]));
    assert_eq!(listed(&["Patient"], all.clone()).await, strings(&["p1", "p3"]));
    assert_eq!(
        listed(&["Observation"], all.clone()).await,
        strings(&["p1", "p3", "p4", "p7"]),
        "p4 through the shared Observation's performer"
    );
    assert_eq!(listed(&["Condition", "Encounter"], all.clone()).await, strings(&["p2", "p3"]));
    assert!(patient_batches(&s, &snap, &[], &all).await.is_empty(), "no types, no patients");
    // The window: `since` exclusive, `until` inclusive, of the current versions.
    let window = |since, until| ScanFilter { since, until, ..Default::default() };
    assert_eq!(listed(main, window(Some(t1), None)).await, strings(&["p2", "p7"]));
    assert_eq!(listed(main, window(None, Some(t1))).await, strings(&["p1", "p3", "p4"]));
    assert_eq!(listed(main, window(Some(t1), Some(t2))).await, strings(&["p7"]));
    assert_eq!(listed(main, window(Some(t2), None)).await, strings(&["p2"]));
    let at7 = Some(w7.last_updated);
    assert_eq!(listed(main, window(None, at7)).await, strings(&["p1", "p3", "p4", "p7"]));
    assert_eq!(listed(main, window(at7, None)).await, strings(&["p2"]));
    assert!(listed(&["Condition"], window(None, Some(t2))).await.is_empty(), "c2's first version is not current");
    // Id ranges bound the patient ids (p4 only through the shared resource's second patient).
    let range = |from: Option<&str>, to: Option<&str>| ScanFilter {
        id_range: Some(IdRange { from: from.map(Into::into), to: to.map(Into::into) }),
        ..Default::default()
    };
    assert_eq!(listed(main, range(Some("p2"), Some("p4"))).await, strings(&["p2", "p3"]));
    assert_eq!(listed(main, range(Some("p4"), None)).await, strings(&["p4", "p7"]));
    assert_eq!(listed(main, range(None, Some("p2"))).await, strings(&["p1"]));
    assert_eq!(listed(main, range(None, None)).await, strings(&["p1", "p2", "p3", "p4", "p7"]));
    assert!(listed(main, range(Some("p5"), Some("p7"))).await.is_empty());
    let late_from_p3 = ScanFilter { since: Some(t1), ..range(Some("p3"), None) };
    assert_eq!(listed(main, late_from_p3).await, strings(&["p7"]));
    // Ignored: the compartment, listed ids, deletions.
    let ignored = ScanFilter {
        patients: Some(Patients::Only(vec!["p2".into()])),
        ids: ids(&["nope"]),
        deleted: true,
        ..Default::default()
    };
    assert_eq!(listed(main, ignored).await, strings(&["p1", "p2", "p3", "p4", "p7"]));
    // A later snapshot sees the later writes; p1 stays without its Patient resource.
    let now = s.snapshot().await.unwrap();
    assert_eq!(compartment_ids(&s, &now, main, &all).await, strings(&["p1", "p2", "p7", "p8"]));
    assert!(compartment_ids(&s, &now, &["Patient"], &all).await.is_empty(), "both Patient resources deleted");
    s.release(&now).await;
    let bad = Snapshot { id: "nope".into(), time: snap.time };
    let refused = s.compartment_patients(&bad, &strings(main), &all, mpsc::channel(1).0).await;
    assert!(matches!(refused, Err(StoreError::BadSnapshot(_))), "{refused:?}");
    s.release(&snap).await;
}

/// More patients than one batch holds: full batches of `PATIENT_BATCH` ids, then the rest,
/// in increasing order and each once, whatever order they were loaded in and however many
/// resources (several in two compartments) each has. A reader that stops early ends the
/// listing without an error, and the store reads on.
pub async fn compartment_patients_in_batches<S: Store>(store: S) {
    const N: usize = 2_500;
    let s = Arc::new(store);
    // Loaded in an order unlike the ids' (7 is prime to N); each patient is in the
    // compartment of its own Observation and of the one shared with the patient before it.
    let q = |i: usize| format!("q{:04}", i % N);
    let mut resources = Vec::new();
    for i in (0..N).map(|i| i * 7 % N) {
        resources.push(obs(&format!("o{i}"), &q(i), "final"));
        resources.push(shared(&format!("s{i}"), &q(i), &q(i + 1)));
    }
    let sum = load(&s, vec![resources], LoadMsg::Commit).await.unwrap();
    assert_eq!(sum.per_type["Observation"], 2 * N as u64);
    let snap = s.snapshot().await.unwrap();
    let expected: Vec<String> = (0..N).map(q).collect();
    let sizes = |batches: &[Vec<String>]| batches.iter().map(Vec::len).collect::<Vec<_>>();

    let all = ScanFilter::default();
    let batches = patient_batches(&s, &snap, &["Observation"], &all).await;
    assert_eq!(sizes(&batches), vec![PATIENT_BATCH, PATIENT_BATCH, N - 2 * PATIENT_BATCH]);
    assert_eq!(batches.concat(), expected, "every patient once, in order");
    let range = |from: usize, to: usize| ScanFilter {
        id_range: Some(IdRange { from: Some(q(from)), to: Some(q(to)) }),
        ..Default::default()
    };
    let batches = patient_batches(&s, &snap, &["Observation"], &range(1000, 2100)).await;
    assert_eq!(sizes(&batches), vec![PATIENT_BATCH, 1100 - PATIENT_BATCH]);
    assert_eq!(batches.concat(), expected[1000..2100]);
    let batches = patient_batches(&s, &snap, &["Observation"], &range(7, 7 + PATIENT_BATCH)).await;
    assert_eq!(sizes(&batches), vec![PATIENT_BATCH], "exactly one full batch, no empty one after it");
    assert_eq!(batches.concat(), expected[7..7 + PATIENT_BATCH]);

    // The reader takes one batch and goes away.
    let (tx, mut rx) = mpsc::channel(1);
    let (s2, snap2) = (s.clone(), snap.clone());
    let h = tokio::spawn(async move { s2.compartment_patients(&snap2, &strings(&["Observation"]), &all, tx).await });
    assert_eq!(rx.recv().await.unwrap(), expected[..PATIENT_BATCH]);
    drop(rx);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), h).await.expect("ends when the reader goes");
    ended.unwrap().unwrap();
    assert_eq!(compartment_ids(&s, &snap, &["Observation"], &ScanFilter::default()).await, expected);
    s.release(&snap).await;
}
