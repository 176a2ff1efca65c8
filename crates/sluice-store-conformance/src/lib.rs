//! The conformance suite for resource stores: every contract of [`ResourceWrites`],
//! [`ExportReads`], [`JobRepo`], [`ConfigRepo`] and [`AuthRepo`] that does not depend on how a
//! store keeps its data, as one scenario each, run against the SQLite and PostgreSQL stores alike.
//!
//! Each scenario is a public async function that takes a fresh, empty store and panics
//! (through `assert!`) where the store breaks a contract. A store's tests get the whole suite,
//! one `#[tokio::test]` per scenario, with [`store_tests!`]:
//!
//! ```ignore
//! /// A fresh, empty store, and what must live as long as it (here its folder); `None`
//! /// skips the test (a database that is not configured).
//! async fn fresh() -> Option<(MyStore, tempfile::TempDir)> {
//!     let dir = tempfile::tempdir().unwrap();
//!     Some((MyStore::open(dir.path().join("s.db")).unwrap(), dir))
//! }
//!
//! sluice_store_conformance::store_tests!(fresh());
//! ```
//!
//! The store's own test file keeps only what is specific to it (reopening a file, releasing
//! an exported PostgreSQL snapshot, two servers sharing a database, ...).
//!
//! A new scenario is a public `async fn name<S: Store>(store: S)` in the module of its
//! concern, re-exported here and listed in [`store_tests!`].

mod auth;
mod config;
mod jobs;
mod patients;
mod scans;
mod snapshots;
mod support;
mod writes;

pub use auth::{
    assertions_are_remembered_until_they_expire, audit_events_are_appended_and_queried,
    concurrent_assertions_are_accepted_once,
};
pub use config::config_resources;
pub use jobs::{illegal_transitions_are_refused, one_active_job_and_compare_and_set};
pub use patients::{compartment_patients_in_batches, compartment_patients_lists_patients_with_resources_in_the_window};
pub use scans::{
    compartment_filters, counts_per_type, deletions_in_the_window, deletions_keep_every_compartment,
    id_ranges_partition_a_type, listed_ids, many_listed_ids, scan_many_ends_when_the_reader_goes,
    scan_many_streams_each_source_in_order, scans_stream_in_batches_until_the_reader_goes,
};
pub use snapshots::{
    foreign_snapshots_are_refused, read_as_of_gives_the_version_current_at_an_instant, snapshots_isolate_later_writes,
    snapshots_under_concurrent_writes_are_exact,
};
pub use writes::{
    loads_commit_or_roll_back, reads, the_clock_never_goes_back, transactions_apply_all_or_nothing,
    versions_and_tombstones,
};

use sluice_jobs::JobRepo;
use sluice_storage::ConfigRepo;
use sluice_store::{AuthRepo, ExportReads, ResourceWrites};

/// What the suite asks of a store: every trait a Sluice store implements.
pub trait Store: ResourceWrites + ExportReads + JobRepo + ConfigRepo + AuthRepo + 'static {}

impl<T: ResourceWrites + ExportReads + JobRepo + ConfigRepo + AuthRepo + 'static> Store for T {}

/// Generates a module `conformance` with one `#[tokio::test]` per scenario of the suite.
///
/// `$fresh` is an expression evaluated once per test to a future of
/// `Option<(store, guard)>`: a fresh, empty store, and a value dropped only after the
/// scenario ends (a temporary folder, a scratch database; `()` when there is none). `None`
/// skips the test. The calling crate needs `tokio` (with `macros` and `rt-multi-thread`).
#[macro_export]
macro_rules! store_tests {
    ($fresh:expr) => {
        $crate::store_tests!(@each $fresh;
            versions_and_tombstones,
            reads,
            transactions_apply_all_or_nothing,
            loads_commit_or_roll_back,
            the_clock_never_goes_back,
            snapshots_isolate_later_writes,
            snapshots_under_concurrent_writes_are_exact,
            foreign_snapshots_are_refused,
            read_as_of_gives_the_version_current_at_an_instant,
            counts_per_type,
            compartment_filters,
            deletions_in_the_window,
            deletions_keep_every_compartment,
            id_ranges_partition_a_type,
            listed_ids,
            many_listed_ids,
            scans_stream_in_batches_until_the_reader_goes,
            scan_many_streams_each_source_in_order,
            scan_many_ends_when_the_reader_goes,
            compartment_patients_lists_patients_with_resources_in_the_window,
            compartment_patients_in_batches,
            one_active_job_and_compare_and_set,
            illegal_transitions_are_refused,
            config_resources,
            assertions_are_remembered_until_they_expire,
            concurrent_assertions_are_accepted_once,
            audit_events_are_appended_and_queried,
        );
    };
    (@each $fresh:expr; $($scenario:ident),+ $(,)?) => {
        /// The shared conformance suite (`sluice-store-conformance`), one test per scenario.
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let Some((store, guard)) = ($fresh).await else { return };
                    $crate::$scenario(store).await;
                    drop(guard);
                }
            )+
        }
    };
}
