//! `sluice`: the FHIR Bulk Data export server. This binary only wires the crates together
//! ([`cli`]): the store, the engine, the storage, the HTTP API (`sluice-server`) and the
//! loader (`sluice-load`).

mod at_rest;
mod cli;
mod export;
mod telemetry;

use clap::Parser;
use std::process::ExitCode;

/// glibc gives each thread that allocates its own malloc arena (up to 8 per core); with the
/// export's worker threads that fragmentation cost a third of the server's memory (67 MB
/// against 43 MB at 1M resources). Two arenas are plenty for this workload.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator tunable; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.json_logs() {
        // One object per line: the event's fields at the top level, the export's span
        // (`export_id`) under `span`.
        logs.json().flatten_event(true).with_current_span(true).with_span_list(false).init();
    } else {
        logs.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        // `sluice export`'s exit codes (D48); its message is printed already.
        Err(e) if e.is::<export::Exit>() => e.downcast_ref::<export::Exit>().map_or(ExitCode::FAILURE, |x| x.0.into()),
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
        }
    }
}
