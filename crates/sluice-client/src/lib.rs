//! `sluice-client`: a FHIR Bulk Data (`$export`) client as a library, for any server that
//! follows the Bulk Data Access IG (Sluice included).
//!
//! - [`ExportRequest`]: the kick-off (system, patient or group level; every IG kick-off
//!   parameter; GET query or POST `Parameters`).
//! - [`BulkClient`]: kicks off, polls (honouring `Retry-After`, also on 429), reads the
//!   manifest page by page (`allowPartialManifests`: files are downloaded while later pages
//!   are still coming), downloads `N` files at a time with retries and backoff, resumes
//!   interrupted downloads with HTTP `Range` requests, verifies each file (`count`, and the
//!   size and SHA-256 when the manifest carries them), saves the merged manifest, cancels.
//! - [`SmartAuth`]: SMART Backend Services (a signed client assertion exchanged for a
//!   bearer token, refreshed when it expires).
//! - [`SinceLast`]: the `--since-last` state kept in the output folder.
//!
//! Progress goes to a [`Reporter`]; the library never touches a terminal.

mod auth;
mod download;
mod error;
mod export;
mod jwk;
mod kickoff;
mod manifest;
mod progress;
mod state;

pub use auth::{SigningKey, SmartAuth};
pub use error::{Error, ErrorKind};
pub use export::{BulkClient, ClientOptions, Layout, Summary};
pub use kickoff::{ExportRequest, Level};
pub use progress::{Event, NoReport, Reporter, ServerProgress};
pub use state::{STATE_FILE, SinceLast};
