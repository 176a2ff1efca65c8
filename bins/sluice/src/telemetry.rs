//! Metrics: installs the Prometheus recorder every crate records into (through the
//! `metrics` facade) and renders it for `GET /metrics`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use sluice_store_postgres::PgStore;

/// Request latencies: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Export durations: 100 ms to 2 h.
const EXPORT_BUCKETS: &[f64] =
    &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0];

/// Installs the recorder (once per process) and returns what renders the metrics; `pool`
/// is the PostgreSQL store whose connection pool is reported, if the store is PostgreSQL.
pub fn install(pool: Option<PgStore>) -> Result<impl Fn() -> String + Send + Sync + 'static, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(sluice_server::meter::HTTP_DURATION.into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Prefix("sluice_export_".into()), EXPORT_BUCKETS))
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    sluice_server::meter::describe();
    sluice_engine::meter::describe();
    sluice_storage::cloud::describe_metrics();
    if pool.is_some() {
        PgStore::describe_metrics();
    }
    Ok(move || {
        if let Some(pool) = &pool {
            pool.record_pool_metrics();
        }
        handle.run_upkeep();
        handle.render()
    })
}
