//! `polls`: what SMART Backend Services authorization costs a status poll. Two release
//! `sluice serve` processes (built `--no-default-features`: local storage, no cloud SDKs),
//! each on an embedded SQLite store in a temporary folder loaded with the same sample set
//! (`bulk-export-sample-10-patients`), one with `--auth none` and one with `--auth smart`.
//! On the smart server the bench registers a `Client` with an ES384 key (made with the
//! `openssl` CLI) as the root client, and gets a bearer token from `/auth/token` with a
//! signed assertion (private_key_jwt). On each server one system export runs to completion
//! (polled as the IG asks, honouring `Retry-After`); then its status URL, which answers the
//! manifest, is polled open loop: `--rate` requests a second (default 500) for `--seconds`
//! (default 10) from `--threads` client threads (default 4), every request scheduled at a
//! fixed time and its latency counted from that time, so a slow answer delays no later
//! measurement (no coordinated omission). Rounds alternate none, smart, none, smart
//! (`--rounds` per mode, default 2) after a short unmeasured warm-up of each server.
//!
//! Printed per round and per mode: p50, p99, max, achieved rate, non-200 answers, the
//! client's own lag (how late its threads sent, already included in the latencies) and the
//! server's CPU time per request; then smart / none ratios of p99 and p50, and whether the
//! target holds: p99 with auth at most 5 ms and at most 1.5 times the p99 without.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target-release cargo run --release -p sluice-bench --bin polls
//! ```
//! Needs `openssl`. The client threads share the machine with both servers: on a small
//! machine their CPU use is part of what is measured, equally for both modes.
//!
//! Then what monitoring costs the polls (issue 13), on the `none` server: rounds alternate
//! `plain` (the polls alone) and `watched`: the same polls while a real headless Chromium
//! (`--chromium`) has the status page `/` open, and a watcher thread sends, every second,
//! a Prometheus scrape (`GET /metrics`) and the request an open `/exports/<id>` tab sends
//! while an export runs (`GET /exports/<id>`, `Accept: application/json`); Chromium gets 8 s
//! to start and load the page before a watched round is measured. Printed: both modes and
//! the watched / plain ratios of p99 and p50.

#[path = "../shared.rs"]
mod shared;

use base64::Engine as _;
use clap::Parser;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shared::{EmbeddedServer, Res, local_sluice_bin, resource_files, sh};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Parser)]
#[command(about = "Sluice status-poll latency with SMART authorization on and off")]
struct Args {
    /// The folder holding the sample sets.
    #[arg(long, default_value = "../shared/data")]
    data: PathBuf,
    /// The sample set (a folder under --data) loaded into both servers.
    #[arg(long, default_value = "bulk-export-sample-10-patients")]
    set: String,
    /// Status polls per second (open loop).
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Seconds per measured round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Measured rounds per mode (alternating none, smart, none, smart, ...).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Client threads sending the polls.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Seconds of unmeasured polls on each server before the first round.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Chromium, for the monitoring rounds (skipped when it is not there).
    #[arg(long, default_value = "/usr/bin/chromium")]
    chromium: PathBuf,
}

/// p99 with authorization must stay at or under this many milliseconds...
const TARGET_P99_MS: f64 = 5.0;
/// ...and at or under this multiple of the p99 without.
const TARGET_RATIO: f64 = 1.5;

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("polls: {e}");
        std::process::exit(1);
    }
}

/// A `sluice serve` on an embedded store in a temporary folder (see [`EmbeddedServer`]).
type Server = EmbeddedServer;

/// Starts the `mode` server: `auth` are its authorization flags.
fn start_server(bin: &Path, mode: &str, auth: &[&str], files: &[PathBuf]) -> Res<Server> {
    EmbeddedServer::start(bin, &format!("polls-{mode}"), auth, files, Stdio::inherit())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `n` random bytes as hex.
fn random_hex(n: usize) -> Res<String> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| e.to_string())?;
    Ok(hex::encode(buf))
}

/// Registers client `bench` with a new ES384 key on the smart server (as the root client)
/// and returns a bearer token for `system/*.read`.
fn bearer_token(agent: &ureq::Agent, base: &str, root_secret: &str) -> Res<String> {
    let pem = sh(Command::new("openssl").args(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]))
        .map_err(|e| format!("making an ES384 key with openssl (is it installed?): {e}"))?;
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| format!("reading openssl's key: {e}"))?;
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES384).map_err(|e| format!("the key's JWK: {e}"))?;
    jwk.common.key_id = Some("k1".into());
    let client = json!({
        "resourceType": "Client",
        "grant_types": ["client_credentials"],
        "auth": {"client_credentials": {
            "client_assertion_types": ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"],
            "access_token_expiration": 3600}},
        "scope": ["system/*.read"],
        "jwks": {"keys": [jwk]},
    });
    let mut r = agent
        .put(format!("{base}/Client/bench"))
        .header(
            "authorization",
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("root:{root_secret}"))),
        )
        .header("content-type", "application/json")
        .send(client.to_string())
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!(
            "PUT /Client/bench: {}: {}",
            r.status(),
            r.body_mut().read_to_string().unwrap_or_default()
        ));
    }
    let token_url = format!("{base}/auth/token");
    let now = unix_now();
    let claims = json!({
        "iss": "bench", "sub": "bench", "aud": token_url, "iat": now, "exp": now + 240,
        "jti": format!("bench-{}-{}", std::process::id(), random_hex(8)?),
    });
    let header = Header { kid: Some("k1".into()), ..Header::new(Algorithm::ES384) };
    let assertion = jsonwebtoken::encode(&header, &claims, &key).map_err(|e| format!("signing the assertion: {e}"))?;
    let mut r = agent
        .post(&token_url)
        .send_form([
            ("grant_type", "client_credentials"),
            ("scope", "system/*.read"),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            ("client_assertion", assertion.as_str()),
        ])
        .map_err(|e| e.to_string())?;
    let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("POST /auth/token: {}: {text}", r.status()));
    }
    let answer: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    answer["access_token"].as_str().map(str::to_string).ok_or_else(|| format!("no access_token in {text}"))
}

/// Adds `Authorization: Bearer <token>` when there is a token.
fn authed<B>(req: ureq::RequestBuilder<B>, token: Option<&str>) -> ureq::RequestBuilder<B> {
    match token {
        Some(t) => req.header("authorization", format!("Bearer {t}")),
        None => req,
    }
}

/// Runs a system export to completion, polling as the IG asks (waiting each `Retry-After`);
/// returns its status URL, the seconds it took, the files and resources its manifest lists,
/// and the manifest's size in bytes.
fn export(agent: &ureq::Agent, base: &str, token: Option<&str>) -> Res<(String, f64, usize, u64, usize)> {
    let started = Instant::now();
    let mut r = authed(agent.get(format!("{base}/fhir/$export")), token)
        .header("prefer", "respond-async")
        .call()
        .map_err(|e| e.to_string())?;
    if r.status() != 202 {
        return Err(format!("kick-off: {}: {}", r.status(), r.body_mut().read_to_string().unwrap_or_default()));
    }
    let loc = r.headers().get("content-location").and_then(|v| v.to_str().ok()).ok_or("no Content-Location")?;
    let loc = loc.to_string();
    loop {
        if started.elapsed() > Duration::from_secs(300) {
            return Err(format!("the export at {loc} did not complete in 300 s"));
        }
        let mut r = authed(agent.get(&loc), token).call().map_err(|e| e.to_string())?;
        match r.status().as_u16() {
            200 => {
                let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
                let manifest: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                let output = manifest["output"].as_array().cloned().unwrap_or_default();
                let count = output.iter().map(|f| f["count"].as_u64().unwrap_or(0)).sum();
                return Ok((loc, started.elapsed().as_secs_f64(), output.len(), count, text.len()));
            }
            202 | 429 => {
                let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.trim().parse().ok());
                std::thread::sleep(Duration::from_secs(wait.unwrap_or(1)));
            }
            s => return Err(format!("status {s}: {}", r.body_mut().read_to_string().unwrap_or_default())),
        }
    }
}

/// What one round of polls measured.
#[derive(Default)]
struct Round {
    /// Latency of every request that was answered, from its scheduled time (ms).
    latencies: Vec<f64>,
    /// How late each request was sent after its scheduled time (ms): the client's own lag.
    lags: Vec<f64>,
    /// Answers other than 200, and requests that got no answer.
    non_200: u64,
    /// A few of those, for the report.
    failures: Vec<String>,
    /// Seconds from the first scheduled request to the last answer.
    span: f64,
    /// Server CPU seconds used during the round.
    cpu: f64,
}

impl Round {
    fn absorb(&mut self, other: Round) {
        self.latencies.extend(other.latencies);
        self.lags.extend(other.lags);
        self.non_200 += other.non_200;
        for f in other.failures {
            if self.failures.len() < 5 {
                self.failures.push(f);
            }
        }
        self.span += other.span;
        self.cpu += other.cpu;
    }

    fn requests(&self) -> usize {
        self.latencies.len() + self.non_200 as usize
    }
}

/// The `p` quantile (nearest rank) of sorted `xs`.
fn quantile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let rank = (p * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

/// Polls `url` open loop at `rate` a second for `seconds` from `threads` threads: request
/// `i` is due at start + i / rate and is sent by thread `i % threads` (at once if that
/// thread is late); its latency counts from when it was due.
fn poll_round(server: &Server, url: &str, token: Option<&str>, rate: u32, seconds: u64, threads: usize) -> Round {
    let total = u64::from(rate) * seconds;
    let threads = threads.max(1);
    let start = Instant::now() + Duration::from_millis(50);
    let cpu_before = server.cpu_seconds();
    let results: Vec<(Round, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let agent = agent();
                    let mut round = Round::default();
                    let mut last = start;
                    for i in (t as u64..total).step_by(threads) {
                        let due = start + Duration::from_nanos(i * 1_000_000_000 / u64::from(rate.max(1)));
                        let now = Instant::now();
                        if now < due {
                            std::thread::sleep(due - now);
                        }
                        round.lags.push(due.elapsed().as_secs_f64() * 1e3);
                        let answer = authed(agent.get(url), token).call();
                        let failure = match answer {
                            Ok(mut r) => {
                                let status = r.status().as_u16();
                                let body = r.body_mut().read_to_vec();
                                match (status, body) {
                                    (200, Ok(_)) => None,
                                    (200, Err(e)) => Some(format!("reading the body: {e}")),
                                    (s, b) => Some(format!(
                                        "{s}: {}",
                                        b.map(|b| String::from_utf8_lossy(&b).chars().take(200).collect::<String>())
                                            .unwrap_or_default()
                                    )),
                                }
                            }
                            Err(e) => Some(e.to_string()),
                        };
                        last = Instant::now();
                        match failure {
                            None => round.latencies.push((last - due).as_secs_f64() * 1e3),
                            Some(f) => {
                                round.non_200 += 1;
                                if round.failures.len() < 5 {
                                    round.failures.push(f);
                                }
                            }
                        }
                    }
                    (round, last)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a poll thread panicked")).collect()
    });
    let mut round = Round::default();
    let mut end = start;
    for (r, last) in results {
        end = end.max(last);
        round.absorb(r);
    }
    round.span = end.saturating_duration_since(start).as_secs_f64();
    round.cpu = server.cpu_seconds() - cpu_before;
    round.latencies.sort_by(f64::total_cmp);
    round.lags.sort_by(f64::total_cmp);
    round
}

/// A server under test: its mode, the status URL polled and the token (smart only).
struct Target {
    mode: &'static str,
    server: Server,
    status_url: String,
    token: Option<String>,
}

fn print_header() {
    println!(
        "{:<7} {:<7} {:>8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>11} {:>12}",
        "round", "mode", "requests", "non-200", "rate/s", "p50 ms", "p99 ms", "max ms", "lag p99 ms", "CPU us/req"
    );
}

fn print_row(label: &str, mode: &str, r: &Round) {
    let n = r.requests();
    println!(
        "{label:<7} {mode:<7} {n:>8} {:>7} {:>8.1} {:>7.2} {:>7.2} {:>7.2} {:>11.2} {:>12.0}",
        r.non_200,
        n as f64 / r.span.max(1e-9),
        quantile(&r.latencies, 0.50),
        quantile(&r.latencies, 0.99),
        r.latencies.last().copied().unwrap_or(f64::NAN),
        quantile(&r.lags, 0.99),
        r.cpu * 1e6 / n.max(1) as f64,
    );
}

fn run(args: &Args) -> Res<()> {
    if args.rate == 0 || args.seconds == 0 || args.rounds == 0 {
        return Err("--rate, --seconds and --rounds must be at least 1".into());
    }
    let set = args.data.join(&args.set);
    let (files, skipped) = resource_files(&set)?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    println!("machine: {nproc} cores ({cpu})");
    println!(
        "data: {} ({} resource files{})",
        set.display(),
        files.len(),
        if skipped.is_empty() { String::new() } else { format!("; skipped: {}", skipped.join(", ")) }
    );
    println!("building sluice (release, --no-default-features)...");
    let bin = local_sluice_bin()?;
    let agent = agent();

    let none = start_server(&bin, "none", &["--auth", "none"], &files)?;
    let secret = random_hex(16)?;
    let smart = start_server(&bin, "smart", &["--auth", "smart", "--root-client-secret", &secret], &files)?;
    let token = bearer_token(&agent, &smart.url, &secret)?;
    // Without a token the smart server must refuse: the polls below really are checked.
    let r = agent.get(format!("{}/fhir/$export", smart.url)).header("prefer", "respond-async").call();
    let refused = r.map_err(|e| e.to_string())?.status().as_u16();
    if refused != 401 {
        return Err(format!("the smart server answered a kick-off without a token with {refused}, not 401"));
    }
    let mut targets = Vec::new();
    for (mode, server, token) in [("none", none, None), ("smart", smart, Some(token))] {
        let (status_url, secs, nfiles, count, bytes) = export(&agent, &server.url, token.as_deref())?;
        println!(
            "{mode:<5} server {}: system export of {count} resources in {nfiles} files, complete after {secs:.2} s; manifest {bytes} bytes",
            server.url
        );
        targets.push(Target { mode, server, status_url, token });
    }

    println!();
    println!(
        "GET <status URL> (completed export: the manifest), open loop {} requests/s for {} s from {} threads; \
         latency from each request's scheduled time",
        args.rate, args.seconds, args.threads
    );
    for t in &targets {
        let r = poll_round(&t.server, &t.status_url, t.token.as_deref(), args.rate, args.warmup.max(1), args.threads);
        if r.non_200 > 0 {
            return Err(format!("warm-up on the {} server: {} non-200 answers: {:?}", t.mode, r.non_200, r.failures));
        }
    }
    print_header();
    let mut totals: [Round; 2] = Default::default();
    for round in 1..=args.rounds {
        for (i, t) in targets.iter().enumerate() {
            let r = poll_round(&t.server, &t.status_url, t.token.as_deref(), args.rate, args.seconds, args.threads);
            print_row(&round.to_string(), t.mode, &r);
            for f in &r.failures {
                println!("        {}: {f}", t.mode);
            }
            totals[i].absorb(r);
        }
    }
    for t in &mut totals {
        t.latencies.sort_by(f64::total_cmp);
        t.lags.sort_by(f64::total_cmp);
    }
    println!();
    println!("per mode, all {} rounds:", args.rounds);
    print_header();
    for (t, r) in targets.iter().zip(&totals) {
        print_row("all", t.mode, r);
    }
    let [none, smart] = &totals;
    let (p50_none, p99_none) = (quantile(&none.latencies, 0.50), quantile(&none.latencies, 0.99));
    let (p50_smart, p99_smart) = (quantile(&smart.latencies, 0.50), quantile(&smart.latencies, 0.99));
    let ratio = p99_smart / p99_none;
    println!();
    println!("smart / none: p99 {ratio:.2}, p50 {:.2}", p50_smart / p50_none);
    let non_200 = none.non_200 + smart.non_200;
    let pass = p99_smart <= TARGET_P99_MS && ratio <= TARGET_RATIO && non_200 == 0;
    println!(
        "{}: p99 with auth <= {TARGET_P99_MS} ms and <= {TARGET_RATIO}x without (p99 with auth {p99_smart:.2} ms, \
         without {p99_none:.2} ms: {ratio:.2}x{})",
        if pass { "PASS" } else { "FAIL" },
        if non_200 > 0 { format!("; {non_200} non-200 answers") } else { String::new() }
    );
    monitoring(args, &targets[0])
}

/// A headless Chromium with one tab on `url`, and a thread sending what a Prometheus
/// server and an open export page send every second; both stop on drop.
struct Watcher {
    browser: Child,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Watcher {
    fn start(chromium: &Path, base: &str, export_id: &str) -> Res<Watcher> {
        let profile = std::env::temp_dir().join(format!("sluice-polls-chromium-{}", std::process::id()));
        let browser = Command::new(chromium)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("{base}/"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", chromium.display()))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, metrics, page) = (stop.clone(), format!("{base}/metrics"), format!("{base}/exports/{export_id}"));
        let thread = std::thread::spawn(move || {
            let agent = agent();
            let mut sent = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let tick = Instant::now();
                let _ = agent.get(&metrics).call().map(|mut r| r.body_mut().read_to_vec());
                let _ = agent
                    .get(&page)
                    .header("accept", "application/json")
                    .call()
                    .map(|mut r| r.body_mut().read_to_vec());
                sent += 2;
                std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
            }
            sent
        });
        Ok(Watcher { browser, stop, thread: Some(thread) })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.browser.kill();
        let _ = self.browser.wait();
    }
}

/// Seconds between starting Chromium and measuring (it starts and loads the page).
const SETTLE_SECONDS: u64 = 8;

/// Status polls with and without the status page open and metrics scraped.
fn monitoring(args: &Args, target: &Target) -> Res<()> {
    if !args.chromium.is_file() {
        println!();
        println!("monitoring rounds skipped: no Chromium at {}", args.chromium.display());
        return Ok(());
    }
    let export_id = target.status_url.rsplit('/').next().unwrap_or_default().to_string();
    println!();
    println!(
        "monitoring cost on the none server: plain polls, and the same polls with a headless Chromium on / \
         plus GET /metrics and GET /exports/<id> (JSON) every second"
    );
    print_header();
    let mut totals: [Round; 2] = Default::default();
    for round in 1..=args.rounds {
        for (i, mode) in ["plain", "watched"].into_iter().enumerate() {
            let watcher =
                (i == 1).then(|| Watcher::start(&args.chromium, &target.server.url, &export_id)).transpose()?;
            if watcher.is_some() {
                // Chromium's start-up is not what is measured: the tab is open and idle first.
                std::thread::sleep(Duration::from_secs(SETTLE_SECONDS));
            }
            let r = poll_round(&target.server, &target.status_url, None, args.rate, args.seconds, args.threads);
            drop(watcher);
            print_row(&round.to_string(), mode, &r);
            totals[i].absorb(r);
        }
    }
    for t in &mut totals {
        t.latencies.sort_by(f64::total_cmp);
        t.lags.sort_by(f64::total_cmp);
    }
    println!();
    print_header();
    print_row("all", "plain", &totals[0]);
    print_row("all", "watched", &totals[1]);
    let [plain, watched] = &totals;
    println!(
        "watched / plain: p99 {:.2}, p50 {:.2}",
        quantile(&watched.latencies, 0.99) / quantile(&plain.latencies, 0.99),
        quantile(&watched.latencies, 0.50) / quantile(&plain.latencies, 0.50)
    );
    Ok(())
}
