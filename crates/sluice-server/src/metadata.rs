//! `GET /fhir/metadata`: the CapabilityStatement (Bulk Data IG).

use crate::AppState;
use crate::outcome::{ApiError, fhir_json};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

const EXPORT_OP: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_OP: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_OP: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// The IG's extension marking a resource type (or search parameter) as not available to
/// one export operation (Bulk Data IG 3.0).
const NOT_SUPPORTED: &str = "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/operation-not-supported";

/// The server's CapabilityStatement: the three export operations and every R4 resource type
/// (D20: anything can be loaded and exported, and bulk clients intersect their `_type` list
/// with this one), each with the search parameters `_typeFilter` accepts. `Group` carries the
/// IG's `operation-not-supported` extension for the patient and group exports, which never
/// include Groups (D9).
pub async fn capability_statement(State(app): State<AppState>) -> Result<Response, ApiError> {
    let resources: Vec<_> = sluice_fhir::R4_RESOURCE_TYPES
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
            match *t {
                "Patient" => r["operation"] = json!([{"name": "export", "definition": PATIENT_EXPORT_OP}]),
                "Group" => r["operation"] = json!([{"name": "export", "definition": GROUP_EXPORT_OP}]),
                _ => {}
            }
            // Other types outside the compartment are exported whole when `_type` names them
            // (D8); a Group never is at these levels (it says nothing about its patients, D9).
            if *t == "Group" {
                r["extension"] = json!([
                    {"url": NOT_SUPPORTED, "valueCanonical": PATIENT_EXPORT_OP},
                    {"url": NOT_SUPPORTED, "valueCanonical": GROUP_EXPORT_OP},
                ]);
            }
            r
        })
        .collect();
    let mut body = json!({
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
    if let Some(smart) = &app.inner.smart {
        // SMART App Launch: the security service, and where the token endpoint is.
        body["rest"][0]["security"] = serde_json::json!({
            "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}], "text": "SMART Backend Services (client_credentials, private_key_jwt)"}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": smart.token_url()}],
            }],
            "description": "Bearer tokens from the token endpoint (see /fhir/.well-known/smart-configuration)",
        });
    }
    Ok(fhir_json(StatusCode::OK, &body))
}
