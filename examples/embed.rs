//! Embedding Sluice's crates: the SQLite store, the engine and in-memory storage, without
//! the HTTP server. Run with `cargo run -p sluice-engine --example embed`.

use serde_json::json;
use sluice_engine::{Engine, EngineConfig};
use sluice_jobs::JobRepo;
use sluice_planner::{KickoffRequest, Level, plan};
use sluice_storage::{FixedStorage, MemoryStorage};
use sluice_store::{ResourceWrites, prepare};
use sluice_store_sqlite::SqliteStore;
use std::sync::Arc;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(dir.path().join("sluice.db"))?);
    store.put(prepare(&json!({"resourceType": "Patient", "id": "p1"}).to_string(), None)?).await?;
    let obs = json!({"resourceType": "Observation", "id": "o1", "status": "final",
                     "subject": {"reference": "Patient/p1"}});
    store.put(prepare(&obs.to_string(), None)?).await?;

    // A Patient-level export of everything in p1's compartment, as gzip.
    let query = vec![("_outputFormat".to_string(), "ndjson.gz".to_string())];
    let export_plan = plan(&KickoffRequest::get(Level::Patient, &query)).map_err(|issues| format!("{issues:?}"))?;

    let storage = MemoryStorage::new();
    let engine = Engine::new(store.clone(), Arc::new(FixedStorage(Arc::new(storage.clone()))), EngineConfig::default());
    let job = engine.kickoff(export_plan, "embedded".into(), sluice_storage::StorageTarget::Default).await?;
    engine.wait(&job.id).await;

    let job = store.get(&job.id).await?.ok_or("job vanished")?;
    let manifest = sluice_engine::manifest(&job, &storage, Duration::from_secs(60)).await?;
    println!("{}", serde_json::to_string_pretty(&manifest.body)?);
    for key in storage.keys() {
        println!("{key}: {} bytes", storage.get(&key).map_or(0, |o| o.bytes.len()));
    }
    Ok(())
}
