//! Several `sluice serve` processes on one PostgreSQL database behave as one server: the
//! one-active-export rule holds across them, and any of them answers status, manifest and
//! DELETE for any export. Runs in PostgreSQL mode only (`SLUICE_TEST_DATABASE_URL`); the
//! embedded store is one process's file.

mod common;

use common::*;
use std::sync::{Arc, Barrier};

const SLOW: &[&str] = &["--throttle-ms", "20", "--batch-bytes", "16384"];

#[test]
fn two_servers_one_export_at_a_time() {
    if pg_admin().is_none() {
        eprintln!("SLUICE_TEST_DATABASE_URL is not set: multi-server tests skipped");
        return;
    }
    let a = Server::loaded(SLOW);
    let b = Server::beside(&a, SLOW);

    for round in 0..4 {
        // Both kick off at the same moment.
        let barrier = Arc::new(Barrier::new(2));
        let kick = |url: String, barrier: Arc<Barrier>| {
            std::thread::spawn(move || {
                barrier.wait();
                send("GET", &url, &[("prefer", "respond-async")], None)
            })
        };
        let ra = kick(a.fhir("/$export"), barrier.clone());
        let rb = kick(b.fhir("/$export"), barrier);
        let (ra, rb) = (ra.join().unwrap(), rb.join().unwrap());
        let mut statuses = [ra.status, rb.status];
        statuses.sort();
        assert_eq!(statuses, [202, 429], "round {round}: exactly one kick-off wins ({} / {})", ra.text(), rb.text());
        let (winner, winner_server, other, loser) =
            if ra.status == 202 { (&ra, &a, &b, &rb) } else { (&rb, &b, &a, &ra) };
        assert_outcome(loser, 429, &[]);
        assert!(loser.retry_after() > 0);
        let status_url = assert_accepted(winner, winner_server);
        let id = status_url.rsplit('/').next().unwrap();

        // The other server reports on it and cancels it.
        let on_other = other.fhir(&format!("/$export-status/{id}"));
        let r = get(&on_other);
        assert_eq!(r.status, 202, "the other server sees the running export: {}", r.text());
        assert!(r.header("x-progress").is_some());
        assert_eq!(delete(&on_other).status, 202);
        assert_outcome(&get(&status_url), 404, &[id]);
        assert_outcome(&get(&on_other), 404, &[id]);
    }

    // An export kicked off on one server completes and is served by the other.
    let status_url = kickoff(&a, &a.fhir("/$export?_type=Patient,Group"));
    let id = status_url.rsplit('/').next().unwrap();
    let on_b = b.fhir(&format!("/$export-status/{id}"));
    let manifest = complete_manifest(&poll_until_done(&on_b), &a.fhir("/$export?_type=Patient,Group"));
    check_export(&manifest, &reference().types(&["Patient", "Group"]));
    assert_eq!(delete(&on_b).status, 202);
    assert!(a.export_folder(&status_url).is_none(), "deleting through the other server removes the files");
}

/// The database drops every connection of a running export (as a restart or a failover
/// does): the export ends failed with an OperationOutcome, or completed; never stuck. Its
/// files are gone if it failed, and the next export runs normally.
#[test]
fn a_database_outage_ends_the_export_cleanly() {
    if pg_admin().is_none() {
        eprintln!("SLUICE_TEST_DATABASE_URL is not set: multi-server tests skipped");
        return;
    }
    let srv = Server::loaded(SLOW);
    let status_url = kickoff(&srv, &srv.fhir("/$export"));
    // Wait until it is running with some resources written.
    loop {
        let r = get(&status_url);
        assert_eq!(r.status, 202, "the throttled export ended early: {}", r.text());
        if r.header("x-progress").is_some_and(|p| p.ends_with(" resources)") && !p.contains("(0/")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(r.retry_after()));
    }
    let url = std::fs::read_to_string(srv.dir.join("database-url")).unwrap();
    let db = url.trim().rsplit('/').next().unwrap().to_string();
    psql(&format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}'"));

    let done = poll_until_done(&status_url);
    match done.status {
        200 => {
            let m = complete_manifest(&done, &srv.fhir("/$export"));
            check_export(&m, &reference().all());
        }
        500 => {
            let oo = assert_outcome(&done, 500, &[]);
            let text = oo.to_string();
            assert!(text.contains("failed"), "the outcome says what failed: {text}");
            assert!(srv.export_folder(&status_url).is_none(), "a failed export leaves no files");
        }
        other => panic!("the export neither completed nor failed: {other} {}", done.text()),
    }
    // The slot is free and the store works again.
    let next = kickoff(&srv, &srv.fhir("/$export?_type=Patient"));
    let m = complete_manifest(&poll_until_done(&next), &srv.fhir("/$export?_type=Patient"));
    check_export(&m, &reference().types(&["Patient"]));
}
