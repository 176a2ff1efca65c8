//! PostgreSQL faults during an export (D51): a part whose own connection is killed runs
//! again on a new connection with the same snapshot, and the export completes with every
//! resource exactly once; killing the connection that holds the snapshot fails the export
//! as before. Runs in PostgreSQL mode only (`SLUICE_TEST_DATABASE_URL`).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Slow enough to act while the export runs (20 ms after every 16 KiB batch), two parts at
/// a time, and 2000 resources a file, so the Observation part (16,315, started first as
/// the largest) finishes files before its connection is killed and must rewrite them.
const SLOW: &[&str] =
    &["--throttle-ms", "20", "--batch-bytes", "16384", "--parallelism", "2", "--max-file-resources", "2000"];

/// How long the test waits for something the running export should do.
const BOUND: Duration = Duration::from_secs(60);

fn skip() -> bool {
    if pg_admin().is_none() {
        eprintln!("SLUICE_TEST_DATABASE_URL is not set: PostgreSQL fault tests skipped");
        return true;
    }
    false
}

/// The server's scratch database.
fn database(srv: &Server) -> String {
    let url = std::fs::read_to_string(srv.dir.join("database-url")).expect("database-url of a PostgreSQL data dir");
    let db = url.trim().rsplit('/').next().expect("a database name");
    db.split('?').next().unwrap_or(db).to_string()
}

/// Polls `cond` (without sleeping more than a few milliseconds at a time) until it holds;
/// fails after [`BOUND`] with `what`.
fn wait_for(what: &str, srv: &Server, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < BOUND, "timed out waiting for {what}; log:\n{}", srv.log_tail(40));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Terminates the backends of `db` that `condition` (SQL over `pg_stat_activity`) selects;
/// returns how many.
fn terminate(db: &str, condition: &str) -> u32 {
    let sql = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{db}' AND pid <> pg_backend_pid() AND {condition}"
    );
    psql(&sql).parse().expect("a count")
}

/// The data files (not `manifest.json`, `_SUCCESS` or anything unfinished) in an export
/// folder.
fn files_in(folder: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(folder)
        .expect("the export folder")
        .map(|e| e.expect("a folder entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json" && n != "_SUCCESS")
        .collect()
}

/// The part reading Observation loses its connection after it has finished a file: it
/// runs again on a new connection and the same snapshot, rewrites the same files, and the
/// export completes with every resource once, the folder holding exactly the manifest's
/// files under dense names.
#[test]
fn a_killed_part_connection_is_retried() {
    if skip() {
        return;
    }
    let srv = Server::loaded(SLOW);
    let db = database(&srv);
    let url = srv.fhir("/$export");
    let status = kickoff(&srv, &url);

    // The Observation part has finished its first file and is still reading.
    wait_for("the first Observation file", &srv, || {
        srv.export_folder(&status).is_some_and(|f| f.join("Observation.ndjson").is_file())
    });
    let killed =
        terminate(&db, "state = 'active' AND query LIKE 'COPY (%' AND query LIKE '%r.type = ''Observation''%'");
    assert_eq!(killed, 1, "one backend streaming Observation; log:\n{}", srv.log_tail(40));

    let done = poll_until_done(&status);
    let manifest = complete_manifest(&done, &url);
    check_export(&manifest, &reference().all());

    // Dense names (D15), and nothing in the folder that the manifest does not list.
    let listed: BTreeSet<String> = manifest["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|e| e["url"].as_str().expect("url").split('?').next().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    let observations = listed.iter().filter(|n| n.starts_with("Observation")).count();
    assert_eq!(observations, 16_315usize.div_ceil(2000), "Observation files: {listed:?}");
    for n in 2..=observations {
        assert!(listed.contains(&format!("Observation-{n}.ndjson")), "Observation-{n}.ndjson missing: {listed:?}");
    }
    let folder = srv.export_folder(&status).expect("the completed export's folder");
    assert_eq!(files_in(&folder), listed, "the folder holds exactly the manifest's files");

    // The retry was logged (with the export and the part) and counted.
    let log = srv.log_tail(100_000);
    let id = status.rsplit('/').next().unwrap();
    assert!(
        log.lines().any(|l| l.contains("lost its database connection") && l.contains(id) && l.contains("Observation")),
        "the retry is logged:\n{log}"
    );
    let retries = Scrape::of(&srv.url, &[]).value("sluice_export_part_retries_total", &[]);
    assert!(retries >= 1.0, "retries counted: {retries}");
}

/// The connection holding the snapshot's exporting transaction is killed: the snapshot is
/// gone, so the next part that imports it fails, and the export fails with an
/// OperationOutcome and leaves no files, as before D51. Nothing is retried.
#[test]
fn a_killed_snapshot_connection_fails_the_export() {
    if skip() {
        return;
    }
    let srv = Server::loaded(SLOW);
    let db = database(&srv);
    let status = kickoff(&srv, &srv.fhir("/$export"));

    // Running: the first two parts read while sixteen wait for them.
    wait_for("a running part", &srv, || {
        psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state = 'active' AND query LIKE 'COPY (%'"
        )) != "0"
    });
    let killed = terminate(&db, "state = 'idle in transaction' AND query LIKE 'SELECT pg_export_snapshot()%'");
    assert_eq!(killed, 1, "one backend holds the snapshot; log:\n{}", srv.log_tail(40));

    let done = poll_until_done(&status);
    assert_outcome(&done, 500, &["snapshot", "is not valid"]);
    assert!(srv.export_folder(&status).is_none(), "a failed export leaves no files");
    let log = srv.log_tail(100_000);
    assert!(!log.contains("lost its database connection"), "nothing was retried:\n{log}");
    assert_eq!(Scrape::of(&srv.url, &[]).value("sluice_export_part_retries_total", &[]), 0.0);

    // The store works on: the next export completes.
    let url = srv.fhir("/$export?_type=Patient");
    let next = kickoff(&srv, &url);
    let m = complete_manifest(&poll_until_done(&next), &url);
    check_export(&m, &reference().types(&["Patient"]));
}
