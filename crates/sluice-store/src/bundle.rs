//! Batch and transaction Bundles (and Synthea-style Bundle files) as write operations.
//!
//! Entries whose `fullUrl` is a `urn:uuid:` are given their resource id, and every
//! `reference` to such a `fullUrl` anywhere in the Bundle is rewritten to `Type/id`.

use crate::{WriteOp, prepare, valid_id};
use serde_json::Value;
use sluice_fhir::{Issue, IssueCode};
use std::collections::HashMap;

/// How entries get their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdPolicy {
    /// Keep each resource's own id (falling back to its `urn:uuid` fullUrl): loading files.
    Keep,
    /// FHIR REST: `POST` entries get a new server-assigned id; `PUT` uses the URL's id.
    Rest,
}

/// The Bundle's `type`, as far as writing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    /// All or nothing.
    Transaction,
    /// Each entry on its own.
    Batch,
    /// Any other type (collection, searchset...): its resources are loaded.
    Other,
}

/// One entry turned into an operation, or the reason it could not be.
pub type EntryOp = Result<WriteOp, Issue>;

/// Reads a Bundle into one operation per entry (in entry order).
///
/// Errors in the Bundle as a whole (not a Bundle, no `type`) are returned as `Err`;
/// errors in one entry are that entry's `Err`, with `expression` `Bundle.entry[i]`.
pub fn bundle_ops(mut bundle: Value, policy: IdPolicy) -> Result<(BundleKind, Vec<EntryOp>), Issue> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Issue::error(IssueCode::Invalid, "expected a Bundle resource").at("resourceType"));
    }
    let kind = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => BundleKind::Transaction,
        Some("batch") => BundleKind::Batch,
        Some(_) => BundleKind::Other,
        None => return Err(Issue::error(IssueCode::Required, "the Bundle has no type").at("Bundle.type")),
    };
    let entries = match bundle.get_mut("entry") {
        None => return Ok((kind, Vec::new())),
        Some(Value::Array(a)) => std::mem::take(a),
        Some(_) => return Err(Issue::error(IssueCode::Structure, "Bundle.entry must be an array").at("Bundle.entry")),
    };

    // First pass: decide every entry's id, so references between entries can be rewritten.
    let mut urls: HashMap<String, String> = HashMap::new();
    let mut ids: Vec<Option<String>> = Vec::with_capacity(entries.len());
    for entry in &entries {
        let rt = entry.pointer("/resource/resourceType").and_then(Value::as_str);
        let method = entry.pointer("/request/method").and_then(Value::as_str).unwrap_or("PUT");
        let own = entry.pointer("/resource/id").and_then(Value::as_str);
        let full = entry.get("fullUrl").and_then(Value::as_str);
        let urn_id = full.and_then(|f| f.strip_prefix("urn:uuid:")).filter(|u| valid_id(u));
        let id = match (policy, method) {
            (IdPolicy::Rest, "POST") => Some(uuid::Uuid::new_v4().to_string()),
            (IdPolicy::Rest, _) => url_id(entry).or(own.map(str::to_string)),
            (IdPolicy::Keep, _) => own.or(urn_id).map(str::to_string),
        };
        if let (Some(full), Some(rt), Some(id)) = (full, rt, &id) {
            urls.insert(full.to_string(), format!("{rt}/{id}"));
        }
        ids.push(id);
    }

    let ops = entries
        .into_iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (entry, id))| entry_op(entry, id, policy, &urls).map_err(|e| e.at(format!("Bundle.entry[{i}]"))))
        .collect();
    Ok((kind, ops))
}

fn url_id(entry: &Value) -> Option<String> {
    let url = entry.pointer("/request/url").and_then(Value::as_str)?;
    let path = url.split('?').next().unwrap_or(url);
    let mut parts = path.trim_matches('/').split('/');
    let (_t, id) = (parts.next()?, parts.next()?);
    Some(id.to_string())
}

fn entry_op(
    mut entry: Value,
    id: Option<String>,
    policy: IdPolicy,
    urls: &HashMap<String, String>,
) -> Result<WriteOp, Issue> {
    let method = entry.pointer("/request/method").and_then(Value::as_str).unwrap_or("PUT").to_string();
    match (policy, method.as_str()) {
        (_, "DELETE") => {
            let url = entry.pointer("/request/url").and_then(Value::as_str).unwrap_or("");
            let mut parts = url.trim_matches('/').split('/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(t), Some(i), None) if sluice_fhir::is_r4_resource_type(t) && valid_id(i) => {
                    Ok(WriteOp::Delete { resource_type: t.to_string(), id: i.to_string() })
                }
                _ => Err(Issue::error(IssueCode::Invalid, format!("DELETE needs request.url 'Type/id', got '{url}'"))),
            }
        }
        (_, "PUT" | "POST") => {
            let mut resource = entry
                .get_mut("resource")
                .map(Value::take)
                .ok_or_else(|| Issue::error(IssueCode::Required, format!("a {method} entry needs a resource")))?;
            if policy == IdPolicy::Rest
                && let (Some(obj), Some(id)) = (resource.as_object_mut(), &id)
            {
                if method == "PUT"
                    && let Some(Value::String(own)) = obj.get("id")
                    && own != id
                {
                    return Err(Issue::error(
                        IssueCode::Invalid,
                        format!("resource id '{own}' does not match request.url id '{id}'"),
                    ));
                }
                obj.insert("id".into(), Value::String(id.clone()));
            }
            rewrite_references(&mut resource, urls);
            prepare(resource, id.as_deref()).map(WriteOp::Put)
        }
        (_, other) => Err(Issue::error(
            IssueCode::NotSupported,
            format!("request.method '{other}' is not supported in a Bundle here (use PUT, POST or DELETE)"),
        )),
    }
}

/// Rewrites every `reference` whose value is a key of `urls`.
pub fn rewrite_references(v: &mut Value, urls: &HashMap<String, String>) {
    if urls.is_empty() {
        return;
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "reference"
                    && let Value::String(s) = child
                {
                    if let Some(new) = urls.get(s.as_str()) {
                        *s = new.clone();
                    }
                    continue;
                }
                rewrite_references(child, urls);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| rewrite_references(c, urls)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn synthea_bundle() -> Value {
        json!({"resourceType":"Bundle","type":"transaction","entry":[
            {"fullUrl":"urn:uuid:p1","resource":{"resourceType":"Patient","id":"p1"},"request":{"method":"POST","url":"Patient"}},
            {"fullUrl":"urn:uuid:e1","resource":{"resourceType":"Encounter","id":"e1","subject":{"reference":"urn:uuid:p1"}},"request":{"method":"POST","url":"Encounter"}},
            {"fullUrl":"urn:uuid:o1","resource":{"resourceType":"Observation","subject":{"reference":"urn:uuid:p1"},"encounter":{"reference":"urn:uuid:e1"}},"request":{"method":"POST","url":"Observation"}}
        ]})
    }

    #[test]
    fn keep_policy_keeps_ids_and_resolves_urns() {
        let (kind, ops) = bundle_ops(synthea_bundle(), IdPolicy::Keep).unwrap();
        assert_eq!(kind, BundleKind::Transaction);
        let puts: Vec<_> = ops
            .into_iter()
            .map(|o| match o.unwrap() {
                WriteOp::Put(r) => r,
                _ => panic!(),
            })
            .collect();
        assert_eq!(puts[0].id, "p1");
        assert_eq!(puts[1].resource["subject"]["reference"], "Patient/p1");
        assert_eq!(puts[1].patients, vec!["p1".to_string()]);
        assert_eq!(puts[2].id, "o1", "falls back to the urn:uuid");
        assert_eq!(puts[2].resource["encounter"]["reference"], "Encounter/e1");
    }

    #[test]
    fn rest_policy_assigns_ids_on_post() {
        let (_, ops) = bundle_ops(synthea_bundle(), IdPolicy::Rest).unwrap();
        let puts: Vec<_> = ops
            .into_iter()
            .map(|o| match o.unwrap() {
                WriteOp::Put(r) => r,
                _ => panic!(),
            })
            .collect();
        assert_ne!(puts[0].id, "p1");
        assert_eq!(puts[1].resource["subject"]["reference"], format!("Patient/{}", puts[0].id));
        assert_eq!(puts[1].patients, vec![puts[0].id.clone()]);
    }

    #[test]
    fn put_delete_and_errors() {
        let b = json!({"resourceType":"Bundle","type":"batch","entry":[
            {"resource":{"resourceType":"Patient","id":"a"},"request":{"method":"PUT","url":"Patient/a"}},
            {"request":{"method":"DELETE","url":"Patient/b"}},
            {"request":{"method":"GET","url":"Patient/c"}},
            {"resource":{"resourceType":"Patient","id":"x"},"request":{"method":"PUT","url":"Patient/y"}},
            {"request":{"method":"PUT","url":"Patient/z"}},
            {"request":{"method":"DELETE","url":"Nope/z"}}
        ]});
        let (kind, ops) = bundle_ops(b, IdPolicy::Rest).unwrap();
        assert_eq!(kind, BundleKind::Batch);
        assert!(matches!(&ops[0], Ok(WriteOp::Put(r)) if r.id == "a"));
        assert_eq!(ops[1], Ok(WriteOp::Delete { resource_type: "Patient".into(), id: "b".into() }));
        for (i, op) in ops.iter().enumerate().skip(2) {
            let e = op.as_ref().unwrap_err();
            assert_eq!(e.expression.as_deref(), Some(format!("Bundle.entry[{i}]").as_str()));
        }
    }

    #[test]
    fn not_a_bundle() {
        assert!(bundle_ops(json!({"resourceType":"Patient"}), IdPolicy::Keep).is_err());
        assert!(bundle_ops(json!({"resourceType":"Bundle"}), IdPolicy::Keep).is_err());
        let (_, ops) = bundle_ops(json!({"resourceType":"Bundle","type":"collection"}), IdPolicy::Keep).unwrap();
        assert!(ops.is_empty());
    }
}
