//! Enough FHIR REST to put data in and look at it: read, create, update, delete, and
//! `batch` / `transaction` Bundles.

use crate::outcome::{ApiError, fhir_json, info};
use crate::{Access, AppState};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use sluice_auth::Interaction;
use sluice_fhir::valid_id;
use sluice_fhir::{Issue, IssueCode, OperationOutcome};
use sluice_json::Json;
use sluice_store::bundle::{BundleKind, IdPolicy, bundle_ops};
use sluice_store::{ReadResult, WriteOp, Written, prepare_parsed};

fn check_type(t: &str) -> Result<(), ApiError> {
    if sluice_fhir::is_r4_resource_type(t) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("'{t}' is not a FHIR R4 resource type")))
    }
}

/// The body as an exact JSON tree: numbers and strings stay as the client wrote them (D17).
fn parse_json(body: &[u8]) -> Result<Json<'_>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty; send a FHIR JSON resource"));
    }
    Json::parse_bytes(body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

fn invalid(issue: Issue) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, issue)
}

fn store_err(e: sluice_store::StoreError) -> ApiError {
    match e {
        sluice_store::StoreError::Invalid(issue) => invalid(issue),
        other => ApiError::internal(other),
    }
}

/// The response for a written resource: the stored JSON with ETag, Last-Modified, Location.
fn written_response(app: &AppState, w: &Written, status: StatusCode) -> Result<Response, ApiError> {
    let body = w.json.clone().unwrap_or_default();
    let mut res = Response::new(axum::body::Body::from(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+json; charset=utf-8"));
    h.insert(header::ETAG, HeaderValue::from_str(&format!("W/\"{}\"", w.version_id)).map_err(ApiError::internal)?);
    let loc = format!("{}/fhir/{}/{}/_history/{}", app.inner.base_url, w.resource_type, w.id, w.version_id);
    h.insert(header::LOCATION, HeaderValue::from_str(&loc).map_err(ApiError::internal)?);
    let lm = w.last_updated.format(&time::format_description::well_known::Rfc2822).map_err(ApiError::internal)?;
    h.insert(header::LAST_MODIFIED, HeaderValue::from_str(&lm).map_err(ApiError::internal)?);
    Ok(res)
}

/// `GET /fhir/<type>/<id>`.
pub async fn read(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    app.allow_type(Access::Read { resource_type: &t }, &headers, &t, &[Interaction::Read]).await?;
    check_type(&t)?;
    match app.inner.store.read(&t, &id).await.map_err(store_err)? {
        ReadResult::Found(json) => {
            let mut res = Response::new(axum::body::Body::from(json));
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+json; charset=utf-8"));
            Ok(res)
        }
        ReadResult::Deleted(v) => Err(ApiError::new(
            StatusCode::GONE,
            Issue::error(IssueCode::Deleted, format!("{t}/{id} was deleted (version {v})")),
        )),
        ReadResult::NotFound => Err(ApiError::not_found(format!("{t}/{id} does not exist"))),
    }
}

/// `PUT /fhir/<type>/<id>`: create or update.
pub async fn update(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // It creates or updates, which only the store knows: both are needed.
    app.allow_type(Access::Write { resource_type: &t }, &headers, &t, &[Interaction::Create, Interaction::Update])
        .await?;
    let (body, _budget) = app.read_body(&headers, body).await?;
    check_type(&t)?;
    if !valid_id(&id) {
        return Err(ApiError::bad_request(format!("'{id}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)")));
    }
    let resource = parse_json(&body)?;
    match resource.get("resourceType").and_then(Json::as_str) {
        Some(rt) if rt == t => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "the body's resourceType ({}) does not match the URL's type {t}",
                other.as_deref().unwrap_or("missing")
            )));
        }
    }
    match resource.get("id") {
        None => {}
        Some(Json::String(s)) if s.is(&id) => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!("the body's id ({other}) does not match the URL's id '{id}'")));
        }
    }
    let r = prepare_parsed(resource, Some(&id)).map_err(invalid)?;
    let w = app.inner.store.put(r).await.map_err(store_err)?;
    written_response(&app, &w, if w.created { StatusCode::CREATED } else { StatusCode::OK })
}

/// `POST /fhir/<type>`: create with a server-assigned id.
pub async fn create(
    State(app): State<AppState>,
    Path(t): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    app.allow_type(Access::Write { resource_type: &t }, &headers, &t, &[Interaction::Create]).await?;
    let (body, _budget) = app.read_body(&headers, body).await?;
    check_type(&t)?;
    let mut resource = parse_json(&body)?;
    if resource.get("resourceType").and_then(Json::as_str).as_deref() != Some(t.as_str()) {
        return Err(ApiError::bad_request(format!("the body's resourceType does not match the URL's type {t}")));
    }
    let id = uuid::Uuid::new_v4().to_string();
    resource.set("id", Json::string(&id), Some("resourceType"));
    let r = prepare_parsed(resource, Some(&id)).map_err(invalid)?;
    let w = app.inner.store.put(r).await.map_err(store_err)?;
    written_response(&app, &w, StatusCode::CREATED)
}

/// `DELETE /fhir/<type>/<id>`: leaves a tombstone; deleting twice is fine.
pub async fn delete(
    State(app): State<AppState>,
    Path((t, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    app.allow_type(Access::Write { resource_type: &t }, &headers, &t, &[Interaction::Delete]).await?;
    check_type(&t)?;
    let w = app.inner.store.delete(&t, &id).await.map_err(store_err)?;
    Ok(info(
        StatusCode::OK,
        &match w {
            Some(w) => format!("{t}/{id} deleted (version {})", w.version_id),
            None => format!("{t}/{id} did not exist or was already deleted"),
        },
    ))
}

fn entry_response(w: &Option<Written>, is_delete: bool) -> Value {
    match w {
        Some(w) if !is_delete => json!({
            "status": if w.created { "201 Created" } else { "200 OK" },
            "location": format!("{}/{}/_history/{}", w.resource_type, w.id, w.version_id),
            "etag": format!("W/\"{}\"", w.version_id),
            "lastModified": sluice_fhir::instant::format(w.last_updated),
        }),
        _ => json!({"status": if w.is_some() { "200 OK" } else { "204 No Content" }}),
    }
}

/// `POST /fhir` with a `batch` or `transaction` Bundle. A transaction is all or nothing:
/// any invalid entry rejects the whole Bundle with every problem listed.
pub async fn bundle(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let grant = app.allow(Access::Write { resource_type: "Bundle" }, &headers).await?;
    let (body, _budget) = app.read_body(&headers, body).await?;
    let (kind, ops) = bundle_ops(parse_json(&body)?, IdPolicy::Rest).map_err(invalid)?;
    // Every entry's type must be permitted, whatever the Bundle's kind: a refusal names the
    // first entry that is not, and nothing is written.
    for op in ops.iter().flatten() {
        match op {
            WriteOp::Put(r) => crate::permitted(&grant, &r.resource_type, &[Interaction::Create, Interaction::Update])?,
            WriteOp::Delete { resource_type, .. } => crate::permitted(&grant, resource_type, &[Interaction::Delete])?,
        }
    }
    let store = &app.inner.store;
    match kind {
        BundleKind::Other => Err(ApiError::bad_request("POST /fhir takes a Bundle of type 'batch' or 'transaction'")),
        BundleKind::Transaction => {
            let errors: Vec<Issue> = ops.iter().filter_map(|o| o.as_ref().err().cloned()).collect();
            if !errors.is_empty() {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, OperationOutcome::from(errors)));
            }
            let ops: Vec<WriteOp> = ops.into_iter().map(|o| o.expect("checked above")).collect();
            let deletes: Vec<bool> = ops.iter().map(|o| matches!(o, WriteOp::Delete { .. })).collect();
            let written = store.transaction(ops).await.map_err(store_err)?;
            let entries: Vec<Value> =
                written.iter().zip(deletes).map(|(w, d)| json!({"response": entry_response(w, d)})).collect();
            Ok(fhir_json(
                StatusCode::OK,
                &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": entries}),
            ))
        }
        BundleKind::Batch => {
            let mut entries = vec![Value::Null; ops.len()];
            let mut valid = Vec::new();
            let mut positions = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Ok(op) => {
                        positions.push((i, matches!(op, WriteOp::Delete { .. })));
                        valid.push(op);
                    }
                    Err(issue) => {
                        entries[i] = json!({"response": {"status": "400 Bad Request", "outcome": OperationOutcome::single(issue).to_json()}});
                    }
                }
            }
            let written = store.transaction(valid).await.map_err(store_err)?;
            for ((i, d), w) in positions.into_iter().zip(written) {
                entries[i] = json!({"response": entry_response(&w, d)});
            }
            Ok(fhir_json(
                StatusCode::OK,
                &json!({"resourceType": "Bundle", "type": "batch-response", "entry": entries}),
            ))
        }
    }
}
