//! Batch and transaction Bundles (and Synthea-style Bundle files) as write operations.
//!
//! Entries whose `fullUrl` is a `urn:uuid:` are given their resource id, and every
//! `reference` to such a `fullUrl` anywhere in the Bundle is rewritten to `Type/id`.

use crate::{WriteOp, prepare_parsed};
use sluice_fhir::valid_id;
use sluice_fhir::{Issue, IssueCode};
use sluice_json::Json;
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
pub fn bundle_ops(bundle: Json<'_>, policy: IdPolicy) -> Result<(BundleKind, Vec<EntryOp>), Issue> {
    bundle_ops_with(bundle, policy, |_| {})
}

/// [`bundle_ops`], with `edit` applied to each entry's resource after its references to
/// other entries were resolved and before it is prepared (`sluice load --copies` renames).
pub fn bundle_ops_with(
    bundle: Json<'_>,
    policy: IdPolicy,
    edit: impl Fn(&mut Json<'_>),
) -> Result<(BundleKind, Vec<EntryOp>), Issue> {
    if !bundle.get("resourceType").is_some_and(|t| t.is_str("Bundle")) {
        return Err(Issue::error(IssueCode::Invalid, "expected a Bundle resource").at("resourceType"));
    }
    let kind = match bundle.get("type").and_then(Json::as_str).as_deref() {
        Some("transaction") => BundleKind::Transaction,
        Some("batch") => BundleKind::Batch,
        Some(_) => BundleKind::Other,
        None => return Err(Issue::error(IssueCode::Required, "the Bundle has no type").at("Bundle.type")),
    };
    let Json::Object(members) = bundle else { unreachable!("a Bundle with a type is an object") };
    let entries = match members.into_iter().rev().find(|(k, _)| k.is("entry")).map(|(_, v)| v) {
        None => return Ok((kind, Vec::new())),
        Some(Json::Array(a)) => a,
        Some(_) => return Err(Issue::error(IssueCode::Structure, "Bundle.entry must be an array").at("Bundle.entry")),
    };

    // First pass: decide every entry's id, so references between entries can be rewritten.
    let mut urls: HashMap<String, String> = HashMap::new();
    let mut ids: Vec<Option<String>> = Vec::with_capacity(entries.len());
    for entry in &entries {
        let text = |path: &[&str]| entry.pointer(path).and_then(Json::as_str);
        let rt = text(&["resource", "resourceType"]);
        let method = text(&["request", "method"]);
        let own = text(&["resource", "id"]);
        let full = text(&["fullUrl"]);
        let urn_id = full.as_deref().and_then(|f| f.strip_prefix("urn:uuid:")).filter(|u| valid_id(u));
        let id = match (policy, method.as_deref().unwrap_or("PUT")) {
            (IdPolicy::Rest, "POST") => Some(uuid::Uuid::new_v4().to_string()),
            (IdPolicy::Rest, _) => url_id(entry).or(own.map(|o| o.into_owned())),
            (IdPolicy::Keep, _) => own.as_deref().or(urn_id).map(str::to_string),
        };
        if let (Some(full), Some(rt), Some(id)) = (&full, &rt, &id) {
            urls.insert(full.to_string(), format!("{rt}/{id}"));
        }
        ids.push(id);
    }

    let ops = entries
        .into_iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (entry, id))| {
            entry_op(entry, id, policy, &urls, &edit).map_err(|e| e.at(format!("Bundle.entry[{i}]")))
        })
        .collect();
    Ok((kind, ops))
}

fn url_id(entry: &Json<'_>) -> Option<String> {
    let url = entry.pointer(&["request", "url"]).and_then(Json::as_str)?;
    let path = url.split('?').next().unwrap_or(&url);
    let mut parts = path.trim_matches('/').split('/');
    let (_t, id) = (parts.next()?, parts.next()?);
    Some(id.to_string())
}

fn entry_op(
    entry: Json<'_>,
    id: Option<String>,
    policy: IdPolicy,
    urls: &HashMap<String, String>,
    edit: &impl Fn(&mut Json<'_>),
) -> Result<WriteOp, Issue> {
    if !entry.is_object() {
        return Err(Issue::error(IssueCode::Structure, "a Bundle entry must be a JSON object"));
    }
    let method =
        entry.pointer(&["request", "method"]).and_then(Json::as_str).map_or("PUT".to_string(), |m| m.into_owned());
    match (policy, method.as_str()) {
        (_, "DELETE") => {
            let url = entry.pointer(&["request", "url"]).and_then(Json::as_str).unwrap_or_default();
            let mut parts = url.trim_matches('/').split('/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(t), Some(i), None) if sluice_fhir::is_r4_resource_type(t) && valid_id(i) => {
                    Ok(WriteOp::Delete { resource_type: t.to_string(), id: i.to_string() })
                }
                _ => Err(Issue::error(IssueCode::Invalid, format!("DELETE needs request.url 'Type/id', got '{url}'"))),
            }
        }
        (_, "PUT" | "POST") => {
            let Json::Object(members) = entry else { unreachable!("checked above: the entry is an object") };
            let mut resource = members
                .into_iter()
                .rev()
                .find(|(k, _)| k.is("resource"))
                .map(|(_, v)| v)
                .ok_or_else(|| Issue::error(IssueCode::Required, format!("a {method} entry needs a resource")))?;
            if policy == IdPolicy::Rest
                && resource.is_object()
                && let Some(id) = &id
            {
                if method == "PUT"
                    && let Some(own) = resource.get("id").and_then(Json::as_str)
                    && own != id.as_str()
                {
                    return Err(Issue::error(
                        IssueCode::Invalid,
                        format!("resource id '{own}' does not match request.url id '{id}'"),
                    ));
                }
                resource.set("id", Json::string(id), Some("resourceType"));
            }
            rewrite_references(&mut resource, urls);
            edit(&mut resource);
            prepare_parsed(resource, id.as_deref()).map(WriteOp::Put)
        }
        (_, other) => Err(Issue::error(
            IssueCode::NotSupported,
            format!("request.method '{other}' is not supported in a Bundle here (use PUT, POST or DELETE)"),
        )),
    }
}

/// Rewrites every `reference` whose value is a key of `urls`.
pub fn rewrite_references(v: &mut Json<'_>, urls: &HashMap<String, String>) {
    if urls.is_empty() {
        return;
    }
    match v {
        Json::Object(members) => {
            for (k, child) in members.iter_mut() {
                if k.is("reference")
                    && let Json::String(s) = child
                {
                    if let Some(new) = urls.get(s.text().as_ref()) {
                        *child = Json::string(new);
                    }
                    continue;
                }
                rewrite_references(child, urls);
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|c| rewrite_references(c, urls)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The exact tree of a `serde_json` value.
    fn tree(v: serde_json::Value) -> Json<'static> {
        Json::parse(&v.to_string()).unwrap().into_owned()
    }

    /// The stored JSON of a prepared resource, as a `serde_json` value.
    fn stored(r: &crate::NewResource) -> serde_json::Value {
        serde_json::from_str(&r.render(1, time::OffsetDateTime::UNIX_EPOCH)).unwrap()
    }

    /// The resources of a Bundle's operations, which must all be valid puts.
    fn puts(ops: Vec<Result<WriteOp, Issue>>) -> Vec<crate::NewResource> {
        ops.into_iter()
            .map(|o| match o.unwrap() {
                WriteOp::Put(r) => r,
                other => panic!("not a put: {other:?}"),
            })
            .collect()
    }

    fn synthea_bundle() -> Json<'static> {
        tree(json!({"resourceType":"Bundle","type":"transaction","entry":[
            {"fullUrl":"urn:uuid:p1","resource":{"resourceType":"Patient","id":"p1"},"request":{"method":"POST","url":"Patient"}},
            {"fullUrl":"urn:uuid:e1","resource":{"resourceType":"Encounter","id":"e1","subject":{"reference":"urn:uuid:p1"}},"request":{"method":"POST","url":"Encounter"}},
            {"fullUrl":"urn:uuid:o1","resource":{"resourceType":"Observation","subject":{"reference":"urn:uuid:p1"},"encounter":{"reference":"urn:uuid:e1"}},"request":{"method":"POST","url":"Observation"}}
        ]}))
    }

    #[test]
    fn keep_policy_keeps_ids_and_resolves_urns() {
        let (kind, ops) = bundle_ops(synthea_bundle(), IdPolicy::Keep).unwrap();
        assert_eq!(kind, BundleKind::Transaction);
        let puts = puts(ops);
        assert_eq!(puts[0].id, "p1");
        assert_eq!(stored(&puts[1])["subject"]["reference"], "Patient/p1");
        assert_eq!(puts[1].patients, vec!["p1".to_string()]);
        assert_eq!(puts[2].id, "o1", "falls back to the urn:uuid");
        assert_eq!(stored(&puts[2])["encounter"]["reference"], "Encounter/e1");
    }

    #[test]
    fn rest_policy_assigns_ids_on_post() {
        let (_, ops) = bundle_ops(synthea_bundle(), IdPolicy::Rest).unwrap();
        let puts = puts(ops);
        assert_ne!(puts[0].id, "p1");
        assert_eq!(stored(&puts[1])["subject"]["reference"], format!("Patient/{}", puts[0].id));
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
            {"request":{"method":"DELETE","url":"Nope/z"}},
            null, false, 3, [], "entry"
        ]});
        let (kind, ops) = bundle_ops(tree(b), IdPolicy::Rest).unwrap();
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
        assert!(bundle_ops(tree(json!({"resourceType":"Patient"})), IdPolicy::Keep).is_err());
        assert!(bundle_ops(tree(json!({"resourceType":"Bundle"})), IdPolicy::Keep).is_err());
        let (_, ops) = bundle_ops(tree(json!({"resourceType":"Bundle","type":"collection"})), IdPolicy::Keep).unwrap();
        assert!(ops.is_empty());
    }
}
