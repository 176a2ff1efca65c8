//! `GET /fhir/metadata`: the CapabilityStatement (Bulk Data IG).

use super::AppState;
use super::outcome::{ApiError, fhir_json};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

const EXPORT_OP: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_OP: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_OP: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// The server's CapabilityStatement: the three export operations, and every resource type
/// the store holds (bulk clients intersect their `_type` list with it).
pub async fn capability_statement(State(app): State<AppState>) -> Result<Response, ApiError> {
    let mut types = app.inner.engine.store().types_with_data().await.map_err(ApiError::internal)?;
    for t in ["Patient", "Group"] {
        if !types.iter().any(|x| x == t) {
            types.push(t.to_string());
        }
    }
    types.sort();
    let resources: Vec<_> = types
        .iter()
        .map(|t| {
            let mut r = json!({
                "type": t,
                "interaction": [{"code": "read"}, {"code": "create"}, {"code": "update"}, {"code": "delete"}],
            });
            // The search parameters `_typeFilter` understands for this type (there is no
            // search interaction: they apply to exports only).
            let params: Vec<_> = sluice_search::supported_params(t)
                .into_iter()
                .map(|(name, kind)| {
                    json!({"name": name, "type": kind.as_str(), "documentation": "usable in $export _typeFilter queries"})
                })
                .collect();
            if !params.is_empty() {
                r["searchParam"] = json!(params);
            }
            match t.as_str() {
                "Patient" => r["operation"] = json!([{"name": "export", "definition": PATIENT_EXPORT_OP}]),
                "Group" => r["operation"] = json!([{"name": "export", "definition": GROUP_EXPORT_OP}]),
                _ => {}
            }
            r
        })
        .collect();
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": sluice_fhir::instant::format(time::OffsetDateTime::now_utc()),
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "software": {"name": "Sluice", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Sluice FHIR Bulk Data export server", "url": format!("{}/fhir", app.inner.base_url)},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [{"name": "export", "definition": EXPORT_OP}],
        }],
    });
    Ok(fhir_json(StatusCode::OK, &body))
}
