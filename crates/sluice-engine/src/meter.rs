//! The engine's metrics, recorded through the `metrics` facade (the host installs a
//! recorder; without one they cost nothing). Names and meanings are listed in the README.

use sluice_jobs::JobRecord;
use std::time::Duration;
use time::OffsetDateTime;

/// Exports accepted, by level.
pub const STARTED: &str = "sluice_exports_started_total";
/// Exports completed, by level.
pub const COMPLETED: &str = "sluice_exports_completed_total";
/// Exports failed, by level.
pub const FAILED: &str = "sluice_exports_failed_total";
/// Running exports cancelled by a client, by level.
pub const CANCELLED: &str = "sluice_exports_cancelled_total";
/// Resources in the files an export took into its manifest, by type and storage provider.
pub const RESOURCES: &str = "sluice_export_resources_total";
/// Bytes written to finished files (as stored: gzip output counts compressed bytes), by
/// type and storage provider.
pub const BYTES: &str = "sluice_export_bytes_total";
/// Finished exports deleted when their retention ended.
pub const EXPIRED: &str = "sluice_exports_expired_total";
/// Seconds from kick-off to completion, by level (histogram).
pub const DURATION: &str = "sluice_export_duration_seconds";
/// Seconds from kick-off to the first finished file (histogram).
pub const FIRST_FILE: &str = "sluice_export_first_file_seconds";
/// Export parts run again after their database connection was lost (D51).
pub const PART_RETRIES: &str = "sluice_export_part_retries_total";

/// Describes the engine's metrics to the installed recorder (their `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(STARTED, "Exports accepted (kick-offs answered 202), by level.");
    metrics::describe_counter!(COMPLETED, "Exports completed, by level.");
    metrics::describe_counter!(FAILED, "Exports failed, by level.");
    metrics::describe_counter!(CANCELLED, "Running exports cancelled by a client (DELETE), by level.");
    metrics::describe_counter!(RESOURCES, "Resources in the files exports listed, by type and storage provider.");
    metrics::describe_counter!(
        BYTES,
        metrics::Unit::Bytes,
        "Bytes of the files exports listed (as stored), by type and storage provider."
    );
    metrics::describe_counter!(EXPIRED, "Finished exports deleted with their files when their retention ended.");
    metrics::describe_histogram!(DURATION, metrics::Unit::Seconds, "Time from kick-off to completion, by level.");
    metrics::describe_histogram!(FIRST_FILE, metrics::Unit::Seconds, "Time from kick-off to the first finished file.");
    metrics::describe_counter!(
        PART_RETRIES,
        "Export parts run again from their start after their database connection was lost."
    );
    metrics::counter!(PART_RETRIES).absolute(0);
    // Every level's counters exist from the start (at 0), so rates and alerts need no
    // first event.
    for level in ["system", "patient", "group"] {
        for name in [STARTED, COMPLETED, FAILED, CANCELLED] {
            metrics::counter!(name, "level" => level).absolute(0);
        }
    }
}

/// Seconds since `since`, for the histograms (0 if the clock went back).
pub(crate) fn seconds_since(since: OffsetDateTime) -> f64 {
    Duration::try_from(OffsetDateTime::now_utc() - since).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Counts one more export of `job`'s level under `name`.
pub(crate) fn count(name: &'static str, job: &JobRecord) {
    metrics::counter!(name, "level" => job.plan.level.name()).increment(1);
}

/// A completed export: counted, and its duration recorded.
pub(crate) fn completed(job: &JobRecord) {
    count(COMPLETED, job);
    metrics::histogram!(DURATION, "level" => job.plan.level.name()).record(seconds_since(job.created_at));
}

/// A part that runs again after its database connection was lost.
pub(crate) fn part_retried() {
    metrics::counter!(PART_RETRIES).increment(1);
}

/// A finished file of `resource_type` holding `resources` resources in `bytes` bytes.
pub(crate) fn file(resource_type: &str, provider: &'static str, resources: u64, bytes: u64) {
    let labels = [("type", resource_type.to_string()), ("provider", provider.to_string())];
    metrics::counter!(RESOURCES, &labels).increment(resources);
    metrics::counter!(BYTES, &labels).increment(bytes);
}
