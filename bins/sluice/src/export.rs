//! `sluice export`: a Bulk Data client for any server that follows the IG (D47-D49), on
//! `sluice-client`; this file holds the flags, the progress display and Ctrl-C.

use crate::cli::CliError;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sluice_client::{
    BulkClient, ClientOptions, Error, ErrorKind, Event, ExportRequest, Level, Reporter, SigningKey, SmartAuth, Summary,
};
use std::collections::{HashMap, HashSet};
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Exit codes of `sluice export` (D48).
pub mod code {
    /// Anything else: local I/O, the network, an answer the protocol does not allow.
    pub const OTHER: u8 = 1;
    /// Bad arguments (clap's own code), a bad key file or state file.
    pub const USAGE: u8 = 2;
    /// The server refused the kick-off.
    pub const KICKOFF_REFUSED: u8 = 3;
    /// The export failed on the server (its status answered 4xx/5xx, 404 once deleted).
    pub const EXPORT_FAILED: u8 = 4;
    /// A file failed to download or verify after every retry.
    pub const DOWNLOAD_FAILED: u8 = 5;
    /// Authorization failed.
    pub const AUTH_FAILED: u8 = 6;
    /// Interrupted (Ctrl-C); resumable with `--resume` unless it was cancelled.
    pub const INTERRUPTED: u8 = 7;
}

const EXIT_CODES: &str = "\
Exit codes:
  0  the export completed; every file is downloaded and verified
  1  anything else: local I/O, the network, an answer the Bulk Data IG does not allow
  2  bad arguments, key file or state file
  3  the server refused the kick-off (its OperationOutcome is printed)
  4  the export failed on the server (or was cancelled or deleted there)
  5  a file failed to download or verify (count, size, SHA-256) after every retry
  6  authorization failed (SMART discovery, token request, 401/403)
  7  interrupted (Ctrl-C): resume with --resume <status-url>, unless cancelled";

/// Export from a FHIR Bulk Data server (Sluice or any other that follows the IG) into a
/// folder: kick-off, live progress, parallel verified downloads, resumable.
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct ExportArgs {
    /// The server's FHIR base URL, e.g. http://localhost:8080/fhir (optional with --resume).
    #[arg(value_name = "FHIR_BASE_URL", required_unless_present = "resume")]
    base: Option<String>,
    /// System-level export, [base]/$export (the default).
    #[arg(long, group = "level")]
    system: bool,
    /// Patient-level export, [base]/Patient/$export.
    #[arg(long, group = "level")]
    patient: bool,
    /// Group-level export, [base]/Group/<ID>/$export.
    #[arg(long, group = "level", value_name = "ID")]
    group: Option<String>,
    /// _type: resource types (comma-separated or repeated).
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
    types: Vec<String>,
    /// _since: only resources changed after this FHIR instant.
    #[arg(long, value_name = "INSTANT")]
    since: Option<String>,
    /// _since = the transactionTime of the last complete export of this source into --out
    /// (kept in <out>/.sluice-export-state.json); each run's files go to a subfolder
    /// named after its transactionTime.
    #[arg(long, conflicts_with = "since")]
    since_last: bool,
    /// _until: only resources changed before this FHIR instant.
    #[arg(long, value_name = "INSTANT")]
    until: Option<String>,
    /// _typeFilter: a search query such as 'Observation?status=final' (repeatable).
    #[arg(long = "type-filter", value_name = "QUERY")]
    type_filters: Vec<String>,
    /// _elements: elements to keep (comma-separated).
    #[arg(long, value_name = "ELEMENT", value_delimiter = ',')]
    elements: Vec<String>,
    /// _outputFormat=application/fhir+ndjson+gzip (files are kept compressed).
    #[arg(long, conflicts_with = "output_format")]
    gzip: bool,
    /// _outputFormat, as given.
    #[arg(long, value_name = "FORMAT")]
    output_format: Option<String>,
    /// patient: patient ids (POST valueReferences; comma-separated on GET).
    #[arg(long = "patient-id", value_name = "ID", value_delimiter = ',')]
    patients: Vec<String>,
    /// includeAssociatedData values (comma-separated).
    #[arg(long, value_name = "VALUE", value_delimiter = ',')]
    include_associated_data: Vec<String>,
    /// organizeOutputBy, e.g. Patient.
    #[arg(long, value_name = "TYPE")]
    organize_output_by: Option<String>,
    /// allowPartialManifests=true: files are downloaded while the export still runs.
    #[arg(long)]
    partial_manifests: bool,
    /// Kick off with POST and a Parameters body instead of GET.
    #[arg(long)]
    post: bool,
    /// Output folder: files under their manifest names, error/ and deleted/ apart,
    /// manifest.json beside them.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Files downloaded at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Retries of a failed download or status request (exponential backoff).
    #[arg(long, value_name = "N", default_value_t = 5)]
    retries: usize,
    /// Pick up an export already kicked off, from its status URL (printed at kick-off and
    /// on Ctrl-C); complete files are kept, .part files resumed with Range requests.
    #[arg(long, value_name = "STATUS_URL", conflicts_with_all = [
        "system", "patient", "group", "types", "since", "until", "type_filters", "elements", "gzip",
        "output_format", "patients", "include_associated_data", "organize_output_by", "partial_manifests", "post",
    ])]
    resume: Option<String>,
    /// SMART Backend Services: the client id registered with the server.
    #[arg(long, value_name = "ID", requires = "key")]
    client_id: Option<String>,
    /// SMART Backend Services: the client's private key, a JWK (or JWK Set) or a PEM file;
    /// RS384 for RSA keys, ES384 for P-384 EC keys.
    #[arg(long, value_name = "FILE", requires = "client_id")]
    key: Option<PathBuf>,
    /// The key's id (kid) as registered; default: the JWK's own (a PEM key needs it).
    #[arg(long, value_name = "KID")]
    kid: Option<String>,
    /// The scopes asked for.
    #[arg(long, default_value = "system/*.read")]
    scope: String,
    /// On Ctrl-C, cancel the export on the server (DELETE) without asking.
    #[arg(long)]
    cancel_on_interrupt: bool,
}

/// An exit code, its message already printed.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for Exit {}

fn exit(code: u8) -> Result<(), CliError> {
    Err(Box::new(Exit(code)))
}

fn code_of(e: &Error) -> u8 {
    match e.kind() {
        ErrorKind::KickoffRefused => code::KICKOFF_REFUSED,
        ErrorKind::ExportFailed => code::EXPORT_FAILED,
        ErrorKind::Download => code::DOWNLOAD_FAILED,
        ErrorKind::Auth => code::AUTH_FAILED,
        ErrorKind::Usage => code::USAGE,
        ErrorKind::Other => code::OTHER,
    }
}

impl ExportArgs {
    fn request(&self) -> ExportRequest {
        let level = match (&self.group, self.patient) {
            (Some(id), _) => Level::Group(id.clone()),
            (None, true) => Level::Patient,
            (None, false) => Level::System,
        };
        let output_format =
            if self.gzip { Some("application/fhir+ndjson+gzip".to_string()) } else { self.output_format.clone() };
        ExportRequest {
            level,
            types: self.types.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            type_filters: self.type_filters.clone(),
            elements: self.elements.clone(),
            output_format,
            patients: self.patients.clone(),
            include_associated_data: self.include_associated_data.clone(),
            organize_output_by: self.organize_output_by.clone(),
            allow_partial_manifests: self.partial_manifests,
            post: self.post,
        }
    }

    /// The FHIR base: given, or the status URL's part before `/$export-status`.
    fn base(&self) -> Option<String> {
        if let Some(b) = &self.base {
            return Some(b.clone());
        }
        let status = self.resume.as_deref()?;
        status.find("/$export-status").map(|i| status[..i].to_string())
    }

    /// How to resume, for messages.
    fn resume_hint(&self, status_url: &str) -> String {
        let mut s = format!("sluice export --resume '{status_url}' --out '{}'", self.out.display());
        if let Some(b) = &self.base {
            s = format!("sluice export '{b}' --resume '{status_url}' --out '{}'", self.out.display());
        }
        if self.since_last {
            s.push_str(" --since-last");
        }
        if let (Some(id), Some(key)) = (&self.client_id, &self.key) {
            s.push_str(&format!(" --client-id '{id}' --key '{}'", key.display()));
            if let Some(kid) = &self.kid {
                s.push_str(&format!(" --kid '{kid}'"));
            }
        }
        s
    }
}

/// Runs `sluice export`; a failure is an [`Exit`] error carrying its exit code.
pub async fn run(args: ExportArgs) -> Result<(), CliError> {
    let Some(base) = args.base() else {
        eprintln!("sluice export: give the FHIR base URL (the status URL does not contain /$export-status)");
        return exit(code::USAGE);
    };
    let auth = match (&args.client_id, &args.key) {
        (Some(id), Some(key)) => match SigningKey::load(key, args.kid.as_deref()) {
            Ok(k) => Some(SmartAuth::new(id.clone(), k, args.scope.clone())),
            Err(e) => {
                eprintln!("sluice export: {e}");
                return exit(code_of(&e));
            }
        },
        _ => None,
    };
    let options = ClientOptions { parallel: args.parallel as usize, retries: args.retries, auth, ..Default::default() };
    let client = match BulkClient::new(&base, options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice export: {e}");
            return exit(code_of(&e));
        }
    };
    let display = Arc::new(Display::new());
    let reporter: Arc<dyn Reporter> = display.clone();
    let work = async {
        match &args.resume {
            Some(url) => client.resume(url, &args.out, args.since_last, reporter).await,
            None => client.export(args.request(), &args.out, args.since_last, reporter).await,
        }
    };
    let result = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => {
            display.clear();
            return interrupted(&client, &args, display.status_url()).await;
        }
    };
    display.clear();
    match result {
        Ok(summary) => {
            report(&summary);
            Ok(())
        }
        Err(e) => {
            eprintln!("sluice export: {e}");
            if matches!(e.kind(), ErrorKind::Download | ErrorKind::Other)
                && let Some(url) = display.status_url()
            {
                eprintln!("the export may still be there to resume; resume with:\n  {}", args.resume_hint(&url));
            }
            exit(code_of(&e))
        }
    }
}

/// Ctrl-C: cancel the export on the server (asked on a terminal, `--cancel-on-interrupt`
/// otherwise) or leave it running and say how to resume.
async fn interrupted(client: &BulkClient, args: &ExportArgs, status_url: Option<String>) -> Result<(), CliError> {
    let Some(url) = status_url else {
        eprintln!("sluice export: interrupted before the server accepted the export");
        return exit(code::INTERRUPTED);
    };
    let cancel = if args.cancel_on_interrupt {
        true
    } else if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        let ask = tokio::task::spawn_blocking(|| {
            eprint!("\nCancel the export on the server? [y/N] ");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line.trim().eq_ignore_ascii_case("y")).unwrap_or(false)
        });
        tokio::select! {
            answer = ask => answer.unwrap_or(false),
            _ = tokio::signal::ctrl_c() => false,
        }
    } else {
        false
    };
    if cancel {
        match client.cancel(&url).await {
            Ok(()) => eprintln!("sluice export: interrupted; the export was cancelled on the server"),
            Err(e) => {
                eprintln!("sluice export: interrupted; cancelling the export failed: {e}");
                eprintln!("resume with:\n  {}", args.resume_hint(&url));
            }
        }
    } else {
        eprintln!("sluice export: interrupted; the export keeps running on the server ({url})");
        eprintln!("resume with:\n  {}", args.resume_hint(&url));
    }
    exit(code::INTERRUPTED)
}

/// The summary, on stdout.
fn report(s: &Summary) {
    println!(
        "exported {} resources in {} files ({} bytes) to {}; transactionTime {}",
        s.resources,
        s.files,
        s.bytes,
        s.folder.display(),
        s.transaction_time
    );
    if s.skipped > 0 {
        println!("{} files were already complete on disk", s.skipped);
    }
    if s.error_files > 0 {
        println!("{} error files (OperationOutcomes) under {}", s.error_files, s.folder.join("error").display());
    }
    if s.deleted_files > 0 {
        println!("{} files of deleted resources under {}", s.deleted_files, s.folder.join("deleted").display());
    }
}

/// Progress on stderr: bars on a terminal, plain lines otherwise.
struct Display {
    bars: Option<Bars>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    status_url: Option<String>,
    last_progress: Option<String>,
    sized: HashSet<String>,
    files: u64,
    done: u64,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    types: Mutex<HashMap<String, ProgressBar>>,
    download: ProgressBar,
}

impl Display {
    fn new() -> Display {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall = multi.add(ProgressBar::new(0));
            overall.set_style(
                ProgressStyle::with_template("{spinner} {msg:<24} [{bar:32}] {pos}/{len} resources ({eta})")
                    .expect("template")
                    .progress_chars("=> "),
            );
            overall.set_message("waiting for the server");
            overall.enable_steady_tick(std::time::Duration::from_millis(200));
            let download = multi.add(ProgressBar::new(0));
            download.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg:<24} [{bar:32}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            download.set_message("files: waiting");
            Bars { multi, overall, types: Mutex::new(HashMap::new()), download }
        });
        Display { bars, state: Mutex::new(State::default()) }
    }

    fn status_url(&self) -> Option<String> {
        self.state.lock().expect("display state").status_url.clone()
    }

    /// Removes the bars (before messages and prompts).
    fn clear(&self) {
        if let Some(b) = &self.bars {
            b.overall.finish_and_clear();
            for bar in b.types.lock().expect("bars").values() {
                bar.finish_and_clear();
            }
            b.download.finish_and_clear();
            let _ = b.multi.clear();
        }
    }

    fn line(&self, text: &str) {
        match &self.bars {
            Some(b) => {
                let _ = b.multi.println(text);
            }
            None => eprintln!("{text}"),
        }
    }
}

impl Reporter for Display {
    fn event(&self, event: Event) {
        let mut st = self.state.lock().expect("display state");
        match event {
            Event::KickedOff { status_url } => {
                self.line(&format!("status URL: {status_url}"));
                st.status_url = Some(status_url);
            }
            Event::Running(p) => match &self.bars {
                Some(b) => {
                    match (p.done, p.total) {
                        (Some(done), Some(total)) => {
                            b.overall.set_length(total);
                            b.overall.set_position(done);
                        }
                        _ => {
                            b.overall.set_length(100);
                            b.overall.set_position(p.percent.unwrap_or(0.0) as u64);
                        }
                    }
                    b.overall.set_message("exporting");
                    let mut types = b.types.lock().expect("bars");
                    for (t, done, total) in &p.types {
                        let bar = types.entry(t.clone()).or_insert_with(|| {
                            let bar = b.multi.insert_before(&b.download, ProgressBar::new(*total));
                            bar.set_style(
                                ProgressStyle::with_template("  {msg:<24} [{bar:32}] {pos}/{len}")
                                    .expect("template")
                                    .progress_chars("=> "),
                            );
                            bar.set_message(t.clone());
                            bar
                        });
                        bar.set_length(*total);
                        bar.set_position(*done);
                    }
                }
                None => {
                    let text = p.text.clone().or_else(|| p.percent.map(|x| format!("{x}%")));
                    if let Some(text) = text
                        && st.last_progress.as_ref() != Some(&text)
                    {
                        eprintln!("progress: {text}");
                        st.last_progress = Some(text);
                    }
                }
            },
            Event::Waiting { wait, throttled: true } => {
                self.line(&format!("the server asks to wait {} s (Retry-After)", wait.as_secs()));
            }
            Event::Waiting { .. } => {}
            Event::Manifest { new_files, complete } => {
                st.files += new_files as u64;
                match &self.bars {
                    Some(b) => {
                        if complete {
                            match b.overall.length() {
                                // Complete at the first answer: there was no progress to show.
                                Some(0) | None => b.overall.finish_and_clear(),
                                Some(len) => {
                                    b.overall.set_position(len);
                                    b.overall.set_message("export complete");
                                    b.overall.disable_steady_tick();
                                }
                            }
                            for bar in b.types.lock().expect("bars").values() {
                                bar.set_position(bar.length().unwrap_or(0));
                            }
                        }
                        b.download.set_message(format!("files {}/{}", st.done, st.files));
                    }
                    None => {
                        let what = if complete { "manifest" } else { "partial manifest" };
                        eprintln!("{what}: {new_files} new files");
                    }
                }
            }
            Event::FileStarted { name, size, resumed_from } => {
                if let Some(b) = &self.bars {
                    if let Some(size) = size
                        && st.sized.insert(name.clone())
                    {
                        b.download.inc_length(size);
                    }
                    b.download.inc(resumed_from);
                }
                if resumed_from > 0 {
                    self.line(&format!("resuming {name} from byte {resumed_from}"));
                }
            }
            Event::FileBytes { bytes, .. } => {
                if let Some(b) = &self.bars {
                    b.download.inc(bytes);
                }
            }
            Event::FileRetry { name, error, wait } => {
                self.line(&format!("retrying {name} in {:.1} s: {error}", wait.as_secs_f64()));
            }
            Event::FileDone { name, bytes, count, skipped } => {
                st.done += 1;
                match &self.bars {
                    Some(b) => {
                        if skipped {
                            b.download.inc_length(bytes);
                            b.download.inc(bytes);
                        }
                        b.download.set_message(format!("files {}/{}", st.done, st.files));
                    }
                    None if skipped => eprintln!("already complete: {name} ({count} resources, {bytes} bytes)"),
                    None => eprintln!("downloaded {name} ({count} resources, {bytes} bytes)"),
                }
            }
        }
    }
}
