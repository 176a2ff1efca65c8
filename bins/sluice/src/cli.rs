//! Command-line interface: `sluice serve` and `sluice load` (D1).

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_auth::{Auditor, Smart, SmartConfig};
use sluice_engine::{Engine, EngineConfig};
use sluice_ndjson::SplitLimits;
use sluice_server::{Api, Store};
use sluice_storage::CloudOptions;
use sluice_storage_config::{ConfiguredStorage, StorageEnv};
use sluice_storage_local::{LocalStorage, SigningKey};
use sluice_store::LoadSummary;
use sluice_store_postgres::{PgOptions, PgStore};
use sluice_store_sqlite::SqliteStore;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sluice: a FHIR Bulk Data ($export) server.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: text, or json (one object per line; lines about an export
    /// carry its export_id).
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

impl Cli {
    /// Whether logs are JSON lines.
    pub fn json_logs(&self) -> bool {
        self.log_format == "json"
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(Box<ServeArgs>),
    /// Bulk-load .ndjson, .ndjson.gz and Bundle .json files or folders into the store.
    Load(LoadArgs),
    /// Export from a FHIR Bulk Data server (this one or any other) into a folder.
    Export(Box<crate::export::ExportArgs>),
}

/// Where the data lives (shared by both commands).
#[derive(Debug, Args)]
struct StoreArgs {
    /// Folder for the embedded store and local export files.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    data_dir: PathBuf,
    /// A postgres:// URL switches the store (and the job records) to PostgreSQL.
    #[arg(long, env = "SLUICE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "SLUICE_DB_POOL_SIZE", default_value_t = 16)]
    db_pool_size: usize,
    /// Key sealing the secrets of configuration resources at rest (AES-256-GCM): 32 bytes
    /// as 64 hex digits or base64. Unset: secrets are stored as given.
    #[arg(long, env = "SLUICE_SECRETS_KEY", hide_env_values = true)]
    secrets_key: Option<String>,
    /// Older keys that still open secrets sealed with them (comma-separated); those are
    /// sealed again with the current key at start.
    #[arg(long, env = "SLUICE_SECRETS_KEY_PREVIOUS", hide_env_values = true, value_delimiter = ',')]
    secrets_key_previous: Vec<String>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Address to listen on (port 0 picks a free port; the address is printed on start).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Public base URL used in absolute URLs (default: http://<listen address>).
    #[arg(long, env = "SLUICE_BASE_URL")]
    base_url: Option<String>,
    /// Files or folders to load before serving.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    load: Vec<PathBuf>,
    /// Lifetime of signed download URLs, in seconds.
    #[arg(long, env = "SLUICE_SIGNED_URL_TTL", default_value_t = 3600)]
    signed_url_ttl: u64,
    /// Hex key for signing local download URLs (default: generated and kept in the data dir).
    #[arg(long, env = "SLUICE_SIGNING_KEY", hide_env_values = true)]
    signing_key: Option<String>,
    /// Start a new file after this many resources (0 = no limit).
    #[arg(long, env = "SLUICE_MAX_FILE_RESOURCES", default_value_t = 0)]
    max_file_resources: u64,
    /// Start a new file after about this many bytes (0 = no limit).
    #[arg(long, env = "SLUICE_MAX_FILE_BYTES", default_value_t = 0)]
    max_file_bytes: u64,
    /// gzip level for ndjson.gz output (1-9).
    #[arg(long, env = "SLUICE_GZIP_LEVEL", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=9))]
    gzip_level: u32,
    /// Resource types exported in parallel (default: the number of cores).
    #[arg(long, env = "SLUICE_EXPORT_PARALLELISM")]
    parallelism: Option<usize>,
    /// A type with at least this many resources (and more than half its fair share of the
    /// export) is read as several id ranges in parallel; 0 turns splitting off.
    #[arg(long, env = "SLUICE_RANGE_SPLIT_MIN", default_value_t = 50_000, hide = true)]
    range_split_min: u64,
    /// Bytes per batch read from the store.
    #[arg(long, env = "SLUICE_EXPORT_BATCH_BYTES", default_value_t = 1 << 20, hide = true)]
    batch_bytes: usize,
    /// Pause this many milliseconds after every batch: slows exports down for demos and
    /// for tests that act while an export runs. Never set it in production.
    #[arg(long, env = "SLUICE_THROTTLE_MS", hide = true)]
    throttle_ms: Option<u64>,
    #[command(flatten)]
    cloud: CloudArgs,
    #[command(flatten)]
    auth: AuthArgs,
    /// Seconds running requests (downloads) may take to finish after SIGTERM or Ctrl-C
    /// before the server stops anyway. Running exports are handed over at once.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE", default_value_t = 30)]
    shutdown_grace: u64,
    /// Milliseconds after which an export whose server stopped renewing it is taken over.
    #[arg(long, env = "SLUICE_JOB_LEASE_MS", default_value_t = 10_000, hide = true)]
    job_lease_ms: u64,
    /// Seconds a completed or failed export (its files and its status URL) is kept after
    /// it finished; then it is deleted. 0 keeps exports until a client deletes them.
    #[arg(long, env = "SLUICE_EXPORT_RETENTION", default_value_t = 86_400)]
    export_retention: u64,
    #[command(flatten)]
    http: HttpArgs,
}

/// What the HTTP listener accepts: hosts, connections, timeouts.
#[derive(Debug, Args)]
struct HttpArgs {
    /// Host names answered besides the base URL's and loopback names (comma-separated;
    /// `*` answers any). Other `Host` headers get 421 (DNS rebinding).
    #[arg(long, env = "SLUICE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 512)]
    max_connections: usize,
    /// Seconds a request's headers may take to arrive (also how long an idle keep-alive
    /// connection stays open).
    #[arg(long, env = "SLUICE_HEADER_TIMEOUT", default_value_t = 30)]
    header_timeout: u64,
    /// Seconds a request body may pause between two pieces.
    #[arg(long, env = "SLUICE_BODY_TIMEOUT", default_value_t = 60)]
    body_timeout: u64,
    /// Seconds a response may wait for a client that stopped reading it.
    #[arg(long, env = "SLUICE_WRITE_TIMEOUT", default_value_t = 120)]
    write_timeout: u64,
}

impl HttpArgs {
    /// The listener's limits.
    fn limits(&self) -> sluice_server::serve::Limits {
        sluice_server::serve::Limits {
            max_connections: self.max_connections.max(1),
            header_timeout: Duration::from_secs(self.header_timeout.max(1)),
            body_timeout: Duration::from_secs(self.body_timeout.max(1)),
            write_timeout: Duration::from_secs(self.write_timeout.max(1)),
        }
    }
}

/// Cloud storage for export files, configured exactly as in Aidbox (see the README).
#[derive(Debug, Args)]
struct CloudArgs {
    /// Where export files go: aws, azure or gcp (unset: local disk under the data dir).
    #[arg(long, env = "BOX_FHIR_BULK_STORAGE_PROVIDER")]
    storage_provider: Option<String>,
    /// AWS: the id of the AwsAccount resource (region and, optionally, keys).
    #[arg(long, env = "BOX_FHIR_BULK_STORAGE_AWS_ACCOUNT")]
    aws_account: Option<String>,
    /// AWS: the S3 bucket.
    #[arg(long, env = "BOX_FHIR_BULK_STORAGE_AWS_BUCKET")]
    aws_bucket: Option<String>,
    /// Azure: the id of the AzureContainer resource (storage account, container, account).
    #[arg(long, env = "BOX_FHIR_BULK_STORAGE_AZURE_CONTAINER")]
    azure_container: Option<String>,
    /// GCP: the bucket.
    #[arg(long, env = "BOX_FHIR_BULK_STORAGE_GCP_BUCKET")]
    gcp_bucket: Option<String>,
    /// GCP: the id of the GcpServiceAccount resource (unset: application default credentials).
    #[arg(long, env = "BOX_FHIR_BULK_STORAGE_GCP_SERVICE_ACCOUNT")]
    gcp_service_account: Option<String>,
    /// A custom endpoint for the provider: S3-compatible stores (MinIO) and emulators.
    #[arg(long, env = "SLUICE_STORAGE_ENDPOINT")]
    storage_endpoint: Option<String>,
    /// Bytes per uploaded part (S3 multipart part, Azure block, GCS chunk).
    #[arg(long, env = "SLUICE_STORAGE_PART_BYTES", default_value_t = 8 << 20, hide = true)]
    storage_part_bytes: usize,
}

impl CloudArgs {
    fn env(&self) -> StorageEnv {
        let clean = |v: &Option<String>| v.as_ref().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        StorageEnv {
            provider: clean(&self.storage_provider),
            aws_account: clean(&self.aws_account),
            aws_bucket: clean(&self.aws_bucket),
            azure_container: clean(&self.azure_container),
            gcp_bucket: clean(&self.gcp_bucket),
            gcp_service_account: clean(&self.gcp_service_account),
            endpoint: clean(&self.storage_endpoint),
        }
    }
}

/// Who may use the server (D22): SMART Backend Services, or nobody checked (loopback only).
#[derive(Debug, Args)]
struct AuthArgs {
    /// smart: bearer tokens (SMART Backend Services) on every FHIR request, the root client
    /// for configuration; none: no authorization (only on a loopback address, unless
    /// --insecure-no-auth).
    #[arg(long = "auth", env = "SLUICE_AUTH", default_value = "none", value_parser = ["smart", "none"])]
    mode: String,
    /// With --auth none, listen on a non-loopback address anyway (anyone who reaches the
    /// port can export every record and repoint the storage).
    #[arg(long, env = "SLUICE_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// An external OAuth 2 / OpenID Connect issuer whose bearer tokens are accepted (its
    /// `iss`; keys from its discovery document). Repeatable; comma-separated in the variable.
    #[arg(long = "auth-issuer", env = "SLUICE_AUTH_ISSUER", value_delimiter = ',')]
    issuers: Vec<String>,
    /// The audience external tokens must name (default: <base-url>/fhir).
    #[arg(long = "auth-audience", env = "SLUICE_AUTH_AUDIENCE")]
    audience: Option<String>,
    /// How local export files are downloaded: signed (signed URLs, requiresAccessToken
    /// false) or token (the export's own bearer token, requiresAccessToken true).
    #[arg(long = "download-auth", env = "SLUICE_DOWNLOAD_AUTH", default_value = "signed", value_parser = ["signed", "token"])]
    download_auth: String,
    /// The root client's secret (HTTP Basic root:<secret>): the administrator, who alone
    /// may change configuration and Client resources and read the audit trail.
    #[arg(long, env = "BOX_ROOT_CLIENT_SECRET", hide_env_values = true)]
    root_client_secret: Option<String>,
    /// Record an audit trail (FHIR AuditEvents in the store, and JSON lines in the log).
    #[arg(long, env = "BOX_SECURITY_AUDIT_LOG_ENABLED", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    audit: bool,
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Files or folders to load.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Load every resource N times, copy k with ids (and references) prefixed `c<k>-`:
    /// builds large databases from the sample sets for benchmarks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    copies: u32,
}

/// An error for the user, printed as `sluice: <message>`.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

async fn open_store(args: &StoreArgs) -> Result<Arc<dyn Store>, CliError> {
    Ok(open_store_pool(args).await?.0)
}

/// [`open_store`], with the PostgreSQL store itself when it is one (for its pool metrics).
async fn open_store_pool(args: &StoreArgs) -> Result<(Arc<dyn Store>, Option<PgStore>), CliError> {
    let secrets = crate::at_rest::secrets(args.secrets_key.as_deref(), &args.secrets_key_previous)?;
    if let Some(url) = &args.database_url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("--database-url must be a postgres:// or postgresql:// URL".into());
        }
        let options = PgOptions { pool_size: args.db_pool_size, ..PgOptions::default() };
        // The error names host and database, never the password.
        let store = PgStore::connect(url, options).await.map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
        let store = store.with_secrets(secrets.clone());
        crate::at_rest::resealed(store.reseal_secrets().await, &secrets);
        return Ok((Arc::new(store.clone()), Some(store)));
    }
    crate::at_rest::data_dir(&args.data_dir)?;
    let path = args.data_dir.join("sluice.db");
    let store = SqliteStore::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let store = store.with_secrets(secrets.clone());
    crate::at_rest::resealed(store.reseal_secrets().await, &secrets);
    Ok((Arc::new(store), None))
}

/// Runs the chosen command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Load(args) => {
            let store = open_store(&args.store).await?;
            load(store.as_ref(), &args.paths, args.copies).await
        }
        Command::Serve(args) => serve(*args).await,
        Command::Export(args) => crate::export::run(*args).await,
    }
}

/// Checks the authorization flags against the address listened on.
fn check_auth(auth: &AuthArgs, addr: std::net::SocketAddr) -> Result<bool, CliError> {
    let smart = auth.mode == "smart";
    if !smart && auth.download_auth == "token" {
        return Err(
            "--download-auth token needs --auth smart (a download is checked against the export's bearer token)".into(),
        );
    }
    if !smart && !auth.issuers.is_empty() {
        return Err("--auth-issuer needs --auth smart".into());
    }
    if !smart && !addr.ip().is_loopback() {
        if !auth.insecure_no_auth {
            return Err(format!(
                "refusing to listen on {addr} without authorization: anyone who reaches it could export every record. Use --auth smart, a loopback address (127.0.0.1), or --insecure-no-auth if something in front of Sluice authorizes"
            )
            .into());
        }
        tracing::warn!(%addr, "listening without authorization (--insecure-no-auth): anyone who reaches this address can export every record and change the storage configuration");
    }
    Ok(smart)
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    if let Some(bad) = args.auth.issuers.iter().find(|i| !(i.starts_with("https://") || i.starts_with("http://"))) {
        return Err(format!("--auth-issuer '{bad}' must be an http(s) URL").into());
    }
    if let Some(base) = &args.base_url {
        sluice_server::check_base_url(base.trim_end_matches('/')).map_err(|e| format!("--base-url: {e}"))?;
    }
    let (store, pool) = open_store_pool(&args.store).await?;
    let metrics = crate::telemetry::install(pool)?;
    if !args.load.is_empty() {
        load(store.as_ref(), &args.load, 1).await?;
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    let smart = check_auth(&args.auth, addr)?;
    let base_url = args.base_url.clone().unwrap_or_else(|| format!("http://{addr}")).trim_end_matches('/').to_string();

    crate::at_rest::data_dir(&args.store.data_dir)?;
    let key = match &args.signing_key {
        Some(hex_key) => SigningKey::from_hex(hex_key).ok_or("SLUICE_SIGNING_KEY must be a non-empty hex string")?,
        None => SigningKey::load_or_create(&args.store.data_dir.join("signing.key"))?,
    };
    // Access tokens are signed with a key derived from the URL signing key: servers sharing
    // a database share SLUICE_SIGNING_KEY, and so accept each other's tokens.
    let token_key = key.derive("access tokens");
    let local = LocalStorage::new(args.store.data_dir.join("exports"), base_url.clone(), key);
    let config = EngineConfig {
        parallelism: args.parallelism.unwrap_or(EngineConfig::default().parallelism).max(1),
        split: SplitLimits { max_resources: args.max_file_resources, max_bytes: args.max_file_bytes },
        gzip_level: args.gzip_level,
        batch_bytes: args.batch_bytes.max(1),
        throttle: args.throttle_ms.map(Duration::from_millis),
        lease: Duration::from_millis(args.job_lease_ms.max(100)),
        range_split_min: args.range_split_min,
        retention: (args.export_retention > 0).then(|| Duration::from_secs(args.export_retention)),
        ..EngineConfig::default()
    };
    let cloud = CloudOptions { part_bytes: args.cloud.storage_part_bytes, ..CloudOptions::default() };
    let storages = ConfiguredStorage::new(args.cloud.env(), store.clone(), Arc::new(local.clone()), cloud);
    let provider = storages.env().provider.clone().unwrap_or_else(|| "local".into());
    let audit = if args.auth.audit { Auditor::new(store.clone()) } else { Auditor::disabled() };
    let mut engine = Engine::new(store.clone(), Arc::new(storages), config);
    if audit.enabled() {
        engine = engine.observe(Arc::new(audit.clone()));
    }
    // Say now if storage is not usable, rather than at the first kick-off; the resources it
    // needs may still be created over the API, so this is not fatal.
    match engine.storage_for_new_export().await {
        Ok((s, _)) => tracing::info!(storage = %s.describe(), "export storage"),
        Err(e) => {
            tracing::warn!(%provider, error = %e, "export storage is not usable yet; kick-offs answer 500 until it is")
        }
    }
    // Finishes exports whose server died (this one before a restart, or a peer).
    engine.spawn_recovery();
    let handover = engine.clone();
    let mut api = Api::new(engine, store.clone(), base_url.clone())
        .local_files(local)
        .signed_url_ttl(Duration::from_secs(args.signed_url_ttl))
        .audit(audit.clone())
        .token_downloads(args.auth.download_auth == "token")
        .metrics(metrics);
    if smart {
        let config = SmartConfig {
            base_url: base_url.clone(),
            token_key,
            root_secret: args.auth.root_client_secret.clone().filter(|s| !s.is_empty()),
            issuers: args.auth.issuers.clone(),
            audience: args.auth.audience.clone(),
        };
        if config.root_secret.is_none() {
            tracing::warn!("BOX_ROOT_CLIENT_SECRET is not set: configuration and Client resources cannot be changed");
        }
        api = api.smart(Smart::new(config, store.clone(), audit));
    }
    let app = api.allowed_hosts(args.http.allowed_hosts.iter().map(|h| h.trim().to_string())).router();
    tracing::info!(auth = if smart { "smart" } else { "none" }, "authorization");
    tracing::info!(store = %store.describe(), %base_url, "sluice listening");
    // Scripts and tests read this line; a closed stdout is not a reason to stop serving.
    {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "sluice listening on {base_url}").and_then(|()| out.flush());
    }
    // On SIGTERM (or Ctrl-C): hand running exports over to the servers sharing the store,
    // stop accepting connections, and give running requests (downloads) the grace period.
    let signaled = Arc::new(tokio::sync::Notify::new());
    let on_signal = {
        let signaled = signaled.clone();
        async move {
            shutdown_signal().await;
            signaled.notify_one();
            let handed = handover.shut_down().await;
            tracing::info!(handed_over = handed, "no new kick-offs; finishing running requests");
        }
    };
    let grace = Duration::from_secs(args.shutdown_grace);
    let serve = sluice_server::serve::serve(listener, app, args.http.limits(), on_signal);
    tokio::select! {
        served = serve => served?,
        () = async { signaled.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_s = grace.as_secs(), "requests still running after the grace period; stopping anyway");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

/// Loads files with a progress bar on stderr and prints a summary per type on stdout.
async fn load(store: &dyn Store, paths: &[PathBuf], copies: u32) -> Result<(), CliError> {
    let started = Instant::now();
    let bar = Bar(ProgressBar::new(0));
    let summary = sluice_load::load_paths(store, paths, copies, Arc::new(bar.clone())).await;
    bar.0.finish_and_clear();
    print_summary(&summary?, started.elapsed().as_secs_f64(), &store.describe());
    Ok(())
}

/// The load's progress bar.
#[derive(Clone)]
struct Bar(ProgressBar);

impl sluice_load::Progress for Bar {
    fn start(&self, bytes: u64) {
        self.0.set_length(bytes);
        self.0.set_style(
            ProgressStyle::with_template("{spinner} loading [{bar:30}] {bytes}/{total_bytes} {msg} ({eta})")
                .expect("static template")
                .progress_chars("=> "),
        );
    }

    fn file(&self, file: &Path) {
        self.0.set_message(file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }

    fn read(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

fn print_summary(summary: &LoadSummary, secs: f64, store: &str) {
    use std::fmt::Write as _;
    let n: u64 = summary.per_type.values().sum();
    // The summary goes to stdout; a closed pipe (`sluice load ... | head -1`) is not an error.
    let mut out = String::new();
    let _ = writeln!(out, "loaded {n} resources in {secs:.1}s ({:.0}/s) into {store}", n as f64 / secs.max(1e-9));
    for (t, c) in &summary.per_type {
        let _ = writeln!(out, "  {t:<28} {c:>9}");
    }
    if summary.updated > 0 {
        let _ =
            writeln!(out, "  ({} of them replaced an existing resource with the same type and id)", summary.updated);
    }
    if summary.unchanged > 0 {
        let _ = writeln!(out, "  ({} of them were already stored unchanged: no new version)", summary.unchanged);
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
}
