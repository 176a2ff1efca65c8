//! `sluice-bench`: loads the large sample set (×copies) into a scratch PostgreSQL database,
//! then times, through the HTTP API of a release `sluice serve`: system export (ndjson and
//! ndjson.gz), patient export (by type and organized by patient), a group export of 10% of the
//! patients, and a `_typeFilter` evaluated on every Observation against one bounded in SQL. In
//! the same run it times the pipe a DBA would write over the same resources in a plain `jsonb` table
//! (`psql -c "COPY (SELECT resource FROM t) TO STDOUT (FORMAT binary)" | pigz -1 -p2`), and
//! prints resources/s, MB/s, the server's peak RSS and the ratios.
//!
//! ```sh
//! cargo run --release -p sluice-bench -- --copies 4
//! ```
//! Needs `psql` and `pigz` (Debian packages `postgresql-client`, `pigz`).
//!
//! With `--download`, it measures the `sluice export` client instead: after the same load,
//! one system export (ndjson) completes, then its files are fetched, alternately, by `curl`
//! (`--parallel --parallel-max 4`, no checks; also timed until `sync` has its files on disk)
//! and by `sluice export --resume <status URL> --parallel 4` (which also checks every file's
//! line count, size and SHA-256, and syncs each file before renaming it into place), `--runs`
//! times each; it prints MB/s and the rate ratios. Needs `psql` and `curl`.

mod shared;

use clap::Parser;
use serde_json::{Value, json};
use shared::{Res, listening_url, sh};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Sluice export benchmark (PostgreSQL)")]
struct Args {
    /// Load the data set this many times (ids prefixed per copy).
    #[arg(long, default_value_t = 1)]
    copies: u32,
    /// Admin URL of the PostgreSQL server; a scratch database is created and dropped.
    #[arg(long, env = "SLUICE_BENCH_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// The folder holding the sample sets.
    #[arg(long, default_value = "../shared/data")]
    data: PathBuf,
    /// Timed runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keep the scratch database afterwards.
    #[arg(long)]
    keep: bool,
    /// Measure the `sluice export` client's download rate against curl instead (see above).
    #[arg(long)]
    download: bool,
    /// A `sluice` binary built from an earlier commit (e.g. with `git worktree`): its load,
    /// system exports, `_typeFilter` evaluation and client round trip are timed in the same
    /// run, on a scratch database of its own, and the report adds this build / that build
    /// ratios.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
}

const SETS: [&str; 3] = ["r4-615-patients", "r4-100-patients-groups", "r4-79-patients-hiv"];

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("sluice-bench: {e}");
        std::process::exit(1);
    }
}

fn psql(url: &str, sql: &str) -> Res<String> {
    sh(Command::new("psql").arg(url).args(["-v", "ON_ERROR_STOP=1", "-qAtc", sql]))
}

fn db_url(admin: &str, name: &str) -> String {
    let server = admin.rsplit_once('/').map_or(admin, |(s, _)| s);
    format!("{server}/{name}")
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// The release `sluice` binary next to this one, built if needed.
fn sluice_bin() -> Res<PathBuf> {
    sh(Command::new(env!("CARGO")).args(["build", "--release", "-q", "-p", "sluice"]))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(exe.with_file_name("sluice"))
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(bin: &Path, db: &str, dir: &Path) -> Res<Server> {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", db, "--data-dir"])
            .arg(dir)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| e.to_string())?;
        let url = listening_url(&mut child)?;
        Ok(Server { child, url })
    }

    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// One export through the API: (seconds, resources, bytes written).
///
/// The status URL is polled as the IG asks, waiting each `Retry-After` (a faster poll gets
/// 429, D13), which alone would time an export only to within that interval. The export's
/// end is instead the moment its `_SUCCESS` marker (the last object a completed export
/// writes, a few milliseconds before the job is recorded complete) appears in its folder:
/// the bench looks for it every 10 ms on the local disk while it waits, without any HTTP
/// request, and polls the status at once when it appears. Waits after that (a 429 or a
/// last 202) are not timed.
fn export(agent: &ureq::Agent, server: &Server, dir: &Path, path: &str) -> Res<(f64, u64, u64)> {
    let started = Instant::now();
    let r = agent.get(format!("{}/fhir/{path}", server.url)).header("prefer", "respond-async").call();
    let r = r.map_err(|e| e.to_string())?;
    if r.status() != 202 {
        return Err(format!("kick-off {path}: {}", r.status()));
    }
    let loc = r.headers().get("content-location").and_then(|v| v.to_str().ok()).ok_or("no Content-Location")?;
    let loc = loc.to_string();
    let id = loc.rsplit('/').next().unwrap_or_default().to_string();
    let mut finished: Option<f64> = None;
    let manifest: Value = loop {
        let mut r = agent.get(&loc).call().map_err(|e| e.to_string())?;
        match r.status().as_u16() {
            200 => {
                let text = r.body_mut().with_config().limit(1 << 30).read_to_string().map_err(|e| e.to_string())?;
                break serde_json::from_str(&text).map_err(|e| e.to_string())?;
            }
            202 | 429 => {
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1);
                let until = Instant::now() + Duration::from_secs(wait);
                while finished.is_none() && Instant::now() < until {
                    if export_succeeded(dir, &id) {
                        finished = Some(started.elapsed().as_secs_f64());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                if finished.is_some() {
                    // Once `_SUCCESS` was seen, the first poll may still come too early: from
                    // then on, wait what the server says (not timed).
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                }
            }
            s => return Err(format!("status {s}: {}", r.body_mut().read_to_string().unwrap_or_default())),
        }
    };
    let secs = finished.unwrap_or_else(|| started.elapsed().as_secs_f64());
    let count: u64 =
        manifest["output"].as_array().map_or(0, |o| o.iter().map(|f| f["count"].as_u64().unwrap_or(0)).sum());
    let mut bytes = 0;
    for e in std::fs::read_dir(dir.join("exports")).map_err(|e| e.to_string())?.flatten() {
        if e.file_name().to_string_lossy().ends_with(&id) {
            for f in std::fs::read_dir(e.path()).map_err(|e| e.to_string())?.flatten() {
                bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    // Free the disk between runs.
    let _ = agent.delete(&loc).call();
    Ok((secs, count, bytes))
}

/// Whether export `id`'s folder (`<dir>/exports/<datetime>_<id>`) holds `_SUCCESS`.
fn export_succeeded(dir: &Path, id: &str) -> bool {
    std::fs::read_dir(dir.join("exports"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(&format!("_{id}")) && e.path().join("_SUCCESS").is_file())
}

fn run(args: &Args) -> Res<()> {
    let tools: &[&str] = if args.download { &["psql", "curl"] } else { &["psql", "pigz"] };
    for tool in tools {
        sh(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .map_err(|_| format!("needs {tool} (apt-get install postgresql-client pigz curl)"))?;
    }
    let bin = sluice_bin()?;
    if args.download {
        return with_database(args, "download", |db| download_bench(args, &bin, db));
    }
    let before = match &args.baseline_bin {
        Some(old) => {
            println!("== baseline build: {}", old.display());
            let r = with_database(args, "base", |db| bench(args, old, db));
            println!("\n== this build");
            Some(r?)
        }
        None => None,
    };
    let after = with_database(args, "main", |db| bench(args, &bin, db))?;
    if let Some(before) = before {
        println!();
        println!("this build / baseline build (same run; < 1 is faster, > 1 for rates is faster):");
        println!("  load resources/s               {:>6.2}   [target: >= 50k/s]", after.load_rate / before.load_rate);
        println!("  system export ndjson.gz time   {:>6.2}", after.sys_gz / before.sys_gz);
        println!("  system export ndjson time      {:>6.2}", after.sys_nd / before.sys_nd);
        println!("  _typeFilter evaluated time     {:>6.2}", after.tf_eval / before.tf_eval);
        println!("  _elements time                 {:>6.2}", after.elements / before.elements);
        println!("  server peak RSS                {:>6.2}", after.rss / before.rss);
        println!(
            "  client round trip (100 patients, kick-off to last byte) {:.2} s -> {:.2} s",
            before.client, after.client
        );
    }
    Ok(())
}

/// Runs `f` on a scratch database, dropped afterwards unless `--keep`.
fn with_database<T>(args: &Args, tag: &str, f: impl FnOnce(&str) -> Res<T>) -> Res<T> {
    let name = format!("sluice_bench_{tag}_{}", std::process::id());
    psql(&args.database_url, &format!("CREATE DATABASE {name}"))?;
    let db = db_url(&args.database_url, &name);
    let result = f(&db);
    if !args.keep {
        let _ = psql(&args.database_url, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    } else {
        println!("kept database {db}");
    }
    result
}

/// Loads the sample sets (`--copies` times) into `db`: resources loaded and seconds.
fn load(args: &Args, bin: &Path, db: &str) -> Res<(u64, f64)> {
    let sets: Vec<PathBuf> = SETS.iter().map(|s| args.data.join(s)).collect();
    let started = Instant::now();
    let out = sh(Command::new(bin)
        .args(["load", "--database-url", db, "--copies", &args.copies.to_string()])
        .args(&sets)
        .env("SLUICE_LOG", "warn"))?;
    let load_secs = started.elapsed().as_secs_f64();
    let loaded: u64 =
        out.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|n| n.parse().ok()).unwrap_or(0);
    println!("load: {loaded} resources in {load_secs:.1} s = {:.0} resources/s", loaded as f64 / load_secs);
    Ok((loaded, load_secs))
}

/// `--download`: `sluice export` against `curl` fetching the files of one completed export.
fn download_bench(args: &Args, bin: &Path, db: &str) -> Res<()> {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {nproc} cores; copies: {}", args.copies);
    load(args, bin, db)?;
    let dir = std::env::temp_dir().join(format!("sluice-bench-download-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let server = Server::start(bin, db, &dir)?;
    let agent = agent();
    let r = agent
        .get(format!("{}/fhir/$export?_outputFormat=ndjson", server.url))
        .header("prefer", "respond-async")
        .call()
        .map_err(|e| e.to_string())?;
    let status_url = r.headers().get("content-location").and_then(|v| v.to_str().ok()).ok_or("no Content-Location")?;
    let status_url = status_url.to_string();
    let manifest: Value = loop {
        let mut r = agent.get(&status_url).call().map_err(|e| e.to_string())?;
        match r.status().as_u16() {
            200 => {
                let text = r.body_mut().with_config().limit(1 << 30).read_to_string().map_err(|e| e.to_string())?;
                break serde_json::from_str(&text).map_err(|e| e.to_string())?;
            }
            202 | 429 => {
                let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.trim().parse().ok());
                std::thread::sleep(Duration::from_secs(wait.unwrap_or(1)));
            }
            s => return Err(format!("status {s}")),
        }
    };
    let files = manifest["output"].as_array().ok_or("no output")?;
    let total: u64 = files.iter().map(|f| f["extension"]["size"].as_u64().unwrap_or(0)).sum();
    let count: u64 = files.iter().map(|f| f["count"].as_u64().unwrap_or(0)).sum();
    println!("export: {count} resources in {} files, {:.1} MB", files.len(), total as f64 / 1e6);
    let out = dir.join("out");
    let (mut curl, mut curl_synced, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs.max(1) {
        // curl: every file, 4 at a time, as fast as it can (no checks).
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        let mut config = String::new();
        for (i, f) in files.iter().enumerate() {
            let url = f["url"].as_str().ok_or("no url")?;
            config.push_str(&format!("url = \"{url}\"\noutput = \"{}/{i}.ndjson\"\n", out.display()));
        }
        let config_path = dir.join("curl.config");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let started = Instant::now();
        sh(Command::new("curl").args(["--parallel", "--parallel-max", "4", "-sS", "--fail", "-K"]).arg(&config_path))?;
        let secs = started.elapsed().as_secs_f64();
        // What it takes for curl's files to be on disk (sluice export syncs each file
        // before it renames it into place).
        sh(Command::new("sync").args(std::fs::read_dir(&out).map_err(|e| e.to_string())?.flatten().map(|e| e.path())))?;
        let synced = started.elapsed().as_secs_f64();
        let got: u64 = std::fs::read_dir(&out)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum();
        if got != total {
            return Err(format!("curl fetched {got} bytes, the manifest lists {total}"));
        }
        curl.push(secs);
        curl_synced.push(synced);
        // sluice export: the same files, 4 at a time, each checked.
        let _ = std::fs::remove_dir_all(&out);
        let started = Instant::now();
        sh(Command::new(bin)
            .args(["export", "--resume", &status_url, "--parallel", "4", "--out"])
            .arg(&out)
            .stdin(Stdio::null()))?;
        let secs2 = started.elapsed().as_secs_f64();
        ours.push(secs2);
        let mb = |t: f64| total as f64 / 1e6 / t;
        println!(
            "run {run}: curl {secs:.2} s ({:.0} MB/s), curl + sync {synced:.2} s ({:.0} MB/s), sluice export {secs2:.2} s ({:.0} MB/s)",
            mb(secs),
            mb(synced),
            mb(secs2)
        );
    }
    let (c, cs, o) = (median(curl), median(curl_synced), median(ours));
    let mb = |t: f64| total as f64 / 1e6 / t;
    println!();
    println!("median: curl {:.0} MB/s, curl + sync {:.0} MB/s, sluice export {:.0} MB/s", mb(c), mb(cs), mb(o));
    println!("sluice export rate / curl rate: {:.2}; / curl + sync rate: {:.2}   [>= 0.8]", c / o, cs / o);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The figures compared between two builds.
struct Figures {
    load_rate: f64,
    sys_gz: f64,
    sys_nd: f64,
    tf_eval: f64,
    elements: f64,
    rss: f64,
    client: f64,
}

/// A bulk client's whole run on the 100-patient set (embedded store): kick-off of a system
/// export, status polls that wait exactly each `Retry-After`, and the download of every file:
/// the seconds from the kick-off to the last byte (median of `runs`).
fn client_round_trip(args: &Args, bin: &Path) -> Res<f64> {
    let dir = std::env::temp_dir().join(format!("sluice-bench-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    sh(Command::new(bin)
        .args(["load", "--data-dir"])
        .arg(&dir)
        .arg(args.data.join("r4-100-patients-groups"))
        .env("SLUICE_LOG", "warn"))?;
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let url = lines
        .find_map(|l| l.ok().and_then(|l| l.strip_prefix("sluice listening on ").map(|u| u.trim().to_string())))
        .ok_or("sluice serve did not start")?;
    std::thread::spawn(move || lines.for_each(drop));
    let agent = agent();
    let mut runs = Vec::new();
    let mut result = Ok(());
    for _ in 0..args.runs.max(1) {
        match client_once(&agent, &url) {
            Ok(s) => runs.push(s),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| median(runs))
}

/// One client run (see [`client_round_trip`]).
fn client_once(agent: &ureq::Agent, url: &str) -> Res<f64> {
    let started = Instant::now();
    let r = agent.get(format!("{url}/fhir/$export")).header("prefer", "respond-async").call();
    let r = r.map_err(|e| e.to_string())?;
    let loc = r.headers().get("content-location").and_then(|v| v.to_str().ok()).ok_or("no Content-Location")?;
    let loc = loc.to_string();
    let manifest: Value = loop {
        let mut r = agent.get(&loc).call().map_err(|e| e.to_string())?;
        match r.status().as_u16() {
            200 => {
                break serde_json::from_str(&r.body_mut().read_to_string().map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
            202 | 429 => {
                let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.trim().parse().ok());
                std::thread::sleep(Duration::from_secs(wait.unwrap_or(1)));
            }
            s => return Err(format!("status {s}")),
        }
    };
    for f in manifest["output"].as_array().into_iter().flatten() {
        let mut r = agent.get(f["url"].as_str().unwrap_or_default()).call().map_err(|e| e.to_string())?;
        std::io::copy(&mut r.body_mut().with_config().limit(1 << 32).reader(), &mut std::io::sink())
            .map_err(|e| e.to_string())?;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = agent.delete(&loc).call();
    Ok(secs)
}

fn bench(args: &Args, bin: &Path, db: &str) -> Res<Figures> {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let pg = psql(db, "SHOW server_version")?;
    println!("machine: {nproc} cores ({cpu}); PostgreSQL {pg}; copies: {}", args.copies);

    let (loaded, load_secs) = load(args, bin, db)?;

    // The naive pipe's table: the same resources as jsonb.
    psql(db, "CREATE TABLE naive AS SELECT json::jsonb AS resource FROM sluice_resource WHERE NOT deleted")?;
    psql(db, "VACUUM ANALYZE naive")?;
    psql(db, "VACUUM ANALYZE")?;

    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let server = Server::start(bin, db, &dir)?;
    let agent = agent();

    // A Group of 10% of the patients.
    let ids = psql(db, "SELECT id FROM sluice_resource WHERE type = 'Patient' AND NOT deleted ORDER BY id")?;
    let ids: Vec<&str> = ids.lines().collect();
    let tenth: Vec<Value> =
        ids.iter().step_by(10).map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    let group =
        json!({"resourceType": "Group", "id": "bench-10pct", "type": "person", "actual": true, "member": tenth});
    let r = agent
        .put(format!("{}/fhir/Group/bench-10pct", server.url))
        .header("content-type", "application/fhir+json")
        .send(group.to_string())
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("creating the 10% group: {}", r.status()));
    }

    let measure = |path: &str| -> Res<(f64, u64, u64)> {
        let mut runs = Vec::new();
        let (mut n, mut b) = (0, 0);
        for _ in 0..args.runs.max(1) {
            let (s, count, bytes) = export(&agent, &server, &dir, path)?;
            runs.push(s);
            (n, b) = (count, bytes);
        }
        Ok((median(runs), n, b))
    };
    let naive = || -> Res<f64> {
        let mut runs = Vec::new();
        for _ in 0..args.runs.max(1) {
            let started = Instant::now();
            sh(Command::new("sh").args([
                "-c",
                &format!(
                    "psql '{db}' -c 'COPY (SELECT resource FROM naive) TO STDOUT (FORMAT binary)' | pigz -1 -p2 > /dev/null"
                ),
            ]))?;
            runs.push(started.elapsed().as_secs_f64());
        }
        Ok(median(runs))
    };

    let naive_s = naive()?;
    let sys_nd = measure("$export?_outputFormat=ndjson")?;
    let sys_gz = measure("$export?_outputFormat=ndjson.gz")?;
    let pat_gz = measure("Patient/$export?_outputFormat=ndjson.gz")?;
    let grp_gz = measure("Group/bench-10pct/$export?_outputFormat=ndjson.gz")?;
    let org_gz = measure("Patient/$export?_outputFormat=ndjson.gz&organizeOutputBy=Patient")?;
    // `_typeFilter` on Observation that matches nothing: evaluated on every resource
    // (`status`), or pushed into the store's query (`_lastUpdated`).
    let tf_eval = measure("$export?_type=Observation&_typeFilter=Observation%3Fstatus%3Dentered-in-error")?;
    let tf_push = measure("$export?_type=Observation&_typeFilter=Observation%3F_lastUpdated%3Dgt2100-01-01")?;
    // `_elements` parses and rewrites every resource of the types it names.
    let elements = measure("$export?_type=Observation,Claim&_elements=id,status&_outputFormat=ndjson.gz")?;
    let rss = server.peak_rss_mb();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    println!();
    println!("{:<38} {:>8} {:>10} {:>12} {:>9}", "measurement (median)", "seconds", "resources", "resources/s", "MB/s");
    println!(
        "{:<38} {:>8.2} {:>10} {:>12.0} {:>9}",
        "naive: COPY jsonb | pigz -1 -p2",
        naive_s,
        loaded,
        loaded as f64 / naive_s,
        ""
    );
    for (name, (s, n, b)) in [
        ("system export, ndjson", sys_nd),
        ("system export, ndjson.gz", sys_gz),
        ("patient export, ndjson.gz", pat_gz),
        ("group export (10%), ndjson.gz", grp_gz),
        ("patient export by patient, ndjson.gz", org_gz),
        ("_typeFilter status (evaluated)", tf_eval),
        ("_typeFilter _lastUpdated (in SQL)", tf_push),
        ("_elements id,status (Observation, Claim)", elements),
    ] {
        println!("{name:<38} {s:>8.2} {n:>10} {:>12.0} {:>9.1}", n as f64 / s, b as f64 / 1e6 / s);
    }
    println!();
    println!("ratios (targets in brackets):");
    println!("  system ndjson.gz / naive pipe   {:>6.2}   [<= 0.50]", sys_gz.0 / naive_s);
    println!("  system ndjson / naive pipe      {:>6.2}", sys_nd.0 / naive_s);
    println!("  group 10% / system ndjson.gz    {:>6.2}   [<= 0.15]", grp_gz.0 / sys_gz.0);
    println!("  patient / system ndjson.gz      {:>6.2}", pat_gz.0 / sys_gz.0);
    println!("  by patient / patient ndjson.gz  {:>6.2}", org_gz.0 / pat_gz.0);
    println!("  _typeFilter in SQL / evaluated  {:>6.2}", tf_push.0 / tf_eval.0);
    println!("server peak RSS: {rss:.1} MB   [<= 64 MB at 1M resources]");
    let client = client_round_trip(args, bin)?;
    println!("client round trip, 100 patients, kick-off to last byte: {client:.2} s   [<= 1.5 s]");
    Ok(Figures {
        load_rate: loaded as f64 / load_secs,
        sys_gz: sys_gz.0,
        sys_nd: sys_nd.0,
        tf_eval: tf_eval.0,
        elements: elements.0,
        rss,
        client,
    })
}
