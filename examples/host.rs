//! A host application that embeds Sluice's HTTP API: its own axum app, with a route of its
//! own (`/`), mounts Sluice under `/bulk`, keeps its data in SQLite and its export files in
//! memory ([`MemoryStorage`]), and says who may do what with an [`Authorize`] of its own (a
//! fixed API key).
//!
//! ```sh
//! cargo run -p sluice-server --example host -- examples/data/r4-100-patients-groups
//! curl -H 'Prefer: respond-async' -H 'X-Api-Key: let-me-in' 'http://127.0.0.1:3000/bulk/fhir/Patient/$export'
//! ```
//!
//! `crates/sluice-server/tests/host.rs` runs a patient export through this very code over
//! HTTP.

use async_trait::async_trait;
use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use sluice_engine::{Engine, EngineConfig};
use sluice_server::{Access, Api, Authorize, Denied, Grant};
use sluice_storage::{FixedStorage, MemoryStorage};
use sluice_store_sqlite::SqliteStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The key this host's clients send in `X-Api-Key`.
pub const API_KEY: &str = "let-me-in";

/// The host's own rule: every Sluice operation needs the API key; configuration resources
/// (where exports go) are never reachable through this host.
pub struct ApiKey;

#[async_trait]
impl Authorize for ApiKey {
    async fn authorize(&self, access: &Access<'_>, headers: &HeaderMap) -> Result<Grant, Denied> {
        if headers.get("x-api-key").is_none_or(|k| k.as_bytes() != API_KEY.as_bytes()) {
            return Err(Denied::unauthorized("send the host's API key in X-Api-Key"));
        }
        match access {
            Access::Configure { .. } | Access::Audit => {
                Err(Denied::forbidden("this host keeps its storage configuration to itself"))
            }
            // One key, one caller: it may do everything else.
            _ => Ok(Grant::everything()),
        }
    }
}

/// The host application and the parts a caller may want to look at.
pub struct Host {
    /// The whole app: the host's routes and Sluice under `/bulk`.
    pub app: Router,
    /// The store Sluice reads and writes.
    pub store: Arc<SqliteStore>,
    /// Where Sluice's export files go.
    pub files: MemoryStorage,
}

/// Builds the host app over a SQLite store in `data_dir`, with Sluice's API public at
/// `<base_url>/bulk`.
pub fn host(data_dir: &Path, base_url: &str) -> Result<Host, Box<dyn std::error::Error>> {
    let store = Arc::new(SqliteStore::open(data_dir.join("host.db"))?);
    let files = MemoryStorage::new();
    let engine = Engine::new(store.clone(), Arc::new(FixedStorage(Arc::new(files.clone()))), EngineConfig::default());
    engine.spawn_recovery();
    let sluice = Api::new(engine, store.clone(), format!("{base_url}/bulk")).authorize(ApiKey).router();
    let app = Router::new().route("/", get(|| async { "the host's own page" })).nest("/bulk", sluice);
    Ok(Host { app, store, files })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    let host = host(data.path(), &format!("http://{}", listener.local_addr()?))?;
    let paths: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if !paths.is_empty() {
        let summary = sluice_load::load_paths(host.store.as_ref(), &paths, 1, Arc::new(sluice_load::Quiet)).await?;
        println!("loaded {} resources", summary.per_type.values().sum::<u64>());
    }
    println!("host listening on http://{}; Sluice is under /bulk", listener.local_addr()?);
    axum::serve(listener, host.app).await?;
    Ok(())
}
