//! The configuration resources, Aidbox style: `AwsAccount`, `AzureAccount`,
//! `AzureContainer` and `GcpServiceAccount`, with Aidbox's field names. They are checked
//! on write, and their secrets never leave the store: [`redact`] drops them from every
//! response.

use serde_json::{Map, Value};
use sluice_fhir::{Issue, IssueCode};

/// One kind of configuration resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigType {
    /// The resource type, e.g. `AwsAccount`.
    pub name: &'static str,
    /// Fields that must be present (non-empty strings).
    required: &'static [&'static str],
    /// Optional string fields.
    optional: &'static [&'static str],
    /// Fields holding secrets: stored, never returned.
    pub secrets: &'static [&'static str],
}

/// Every configuration resource type.
pub const CONFIG_TYPES: [ConfigType; 4] = [
    ConfigType {
        name: "AwsAccount",
        required: &[],
        optional: &["region", "access-key-id", "secret-access-key", "host"],
        secrets: &["secret-access-key"],
    },
    ConfigType { name: "AzureAccount", required: &["key"], optional: &[], secrets: &["key"] },
    ConfigType { name: "AzureContainer", required: &["storage", "container"], optional: &[], secrets: &[] },
    ConfigType {
        name: "GcpServiceAccount",
        required: &["service-account-email", "private-key"],
        optional: &["private-key-id"],
        secrets: &["private-key"],
    },
];

/// The configuration type named `name`, if it is one.
pub fn config_type(name: &str) -> Option<&'static ConfigType> {
    CONFIG_TYPES.iter().find(|t| t.name == name)
}

/// Checks a PUT body for `ty/id` and returns what to store (with `resourceType` and `id`
/// set), or the problems found.
pub fn validate(ty: &ConfigType, id: &str, body: &[u8]) -> Result<Value, Vec<Issue>> {
    let invalid = |msg: String| Issue::error(IssueCode::Invalid, msg);
    if !sluice_fhir::valid_id(id) {
        return Err(vec![invalid(format!("'{id}' is not a valid id (1-64 of A-Z, a-z, 0-9, '-', '.')"))]);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| vec![invalid(format!("the body is not JSON: {e}"))])?;
    let Value::Object(mut obj) = value else {
        return Err(vec![invalid("the body must be a JSON object".into())]);
    };
    let mut issues = field_issues(ty, id, &obj);
    issues.extend(type_issues(ty, &obj));
    if !issues.is_empty() {
        return Err(issues);
    }
    obj.insert("resourceType".into(), Value::String(ty.name.into()));
    obj.insert("id".into(), Value::String(id.into()));
    Ok(Value::Object(obj))
}

/// The problems with `resourceType`, `id` and the type's string fields.
fn field_issues(ty: &ConfigType, id: &str, obj: &serde_json::Map<String, Value>) -> Vec<Issue> {
    let invalid = |msg: String| Issue::error(IssueCode::Invalid, msg);
    let mut issues = Vec::new();
    match obj.get("resourceType") {
        None => {}
        Some(Value::String(t)) if t == ty.name => {}
        Some(other) => issues.push(
            invalid(format!("resourceType is {other} but the URL names {}", ty.name))
                .at(format!("{}.resourceType", ty.name)),
        ),
    }
    match obj.get("id") {
        None => {}
        Some(Value::String(i)) if i == id => {}
        Some(other) => {
            issues.push(invalid(format!("id is {other} but the URL names '{id}'")).at(format!("{}.id", ty.name)))
        }
    }
    for field in ty.required {
        match obj.get(*field) {
            Some(Value::String(s)) if !s.trim().is_empty() => {}
            Some(_) => issues.push(invalid(format!("'{field}' must be a non-empty string")).at(path(ty, field))),
            None => issues.push(
                Issue::error(IssueCode::Required, format!("'{field}' is required in {}", ty.name)).at(path(ty, field)),
            ),
        }
    }
    for field in ty.optional {
        if let Some(v) = obj.get(*field)
            && !matches!(v, Value::String(s) if !s.trim().is_empty())
        {
            issues.push(invalid(format!("'{field}' must be a non-empty string")).at(path(ty, field)));
        }
    }
    issues
}

/// The problems specific to one configuration type (key formats, pairs, references).
fn type_issues(ty: &ConfigType, obj: &serde_json::Map<String, Value>) -> Vec<Issue> {
    let invalid = |msg: String| Issue::error(IssueCode::Invalid, msg);
    let mut issues = Vec::new();
    match ty.name {
        "AwsAccount" if obj.contains_key("access-key-id") != obj.contains_key("secret-access-key") => issues.push(
            Issue::error(
                IssueCode::Required,
                "give both 'access-key-id' and 'secret-access-key', or neither (then the default AWS credential chain applies)",
            )
            .at("AwsAccount"),
        ),
        "AzureAccount" => {
            if let Some(Value::String(k)) = obj.get("key")
                && !looks_like_base64(k)
            {
                issues.push(invalid("'key' must be the storage account key, in base64".into()).at("AzureAccount.key"));
            }
        }
        "AzureContainer" => {
            if let Some(v) = obj.get("account")
                && reference_id(v, "AzureAccount").is_none()
            {
                issues.push(
                    invalid(r#"'account' must reference an AzureAccount: {"id": "<id>", "resourceType": "AzureAccount"}"#.into())
                        .at("AzureContainer.account"),
                );
            }
        }
        "GcpServiceAccount" => {
            if let Some(Value::String(k)) = obj.get("private-key")
                && !k.contains("PRIVATE KEY-----")
            {
                issues.push(
                    invalid("'private-key' must be the PEM private key of the service account".into())
                        .at("GcpServiceAccount.private-key"),
                );
            }
        }
        _ => {}
    }
    issues
}

fn path(ty: &ConfigType, field: &str) -> String {
    format!("{}.{field}", ty.name)
}

fn looks_like_base64(s: &str) -> bool {
    s.len().is_multiple_of(4) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

/// The id a reference to a `ty` resource points at: Aidbox's `{"id", "resourceType"}`, or
/// FHIR's `{"reference": "Type/id"}`.
pub fn reference_id<'a>(v: &'a Value, ty: &str) -> Option<&'a str> {
    if let Some(r) = v.get("reference").and_then(Value::as_str) {
        return r.strip_prefix(ty)?.strip_prefix('/').filter(|id| sluice_fhir::valid_id(id));
    }
    let id = v.get("id")?.as_str()?;
    let type_ok = v.get("resourceType").is_none_or(|t| t.as_str() == Some(ty));
    (type_ok && sluice_fhir::valid_id(id)).then_some(id)
}

/// The resource as it may be shown: secrets removed.
pub fn redact(ty: &ConfigType, mut value: Value) -> Value {
    if let Some(obj) = value.as_object_mut() {
        for s in ty.secrets {
            obj.remove(*s);
        }
    }
    value
}

/// A string field of a stored resource.
pub(crate) fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    obj.get(name).and_then(Value::as_str).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ty(name: &str) -> &'static ConfigType {
        config_type(name).unwrap()
    }

    #[test]
    fn aws_account_takes_both_keys_or_neither() {
        let ok =
            validate(ty("AwsAccount"), "a", br#"{"region":"us-east-1","access-key-id":"AK","secret-access-key":"s"}"#)
                .unwrap();
        assert_eq!(ok["resourceType"], "AwsAccount");
        assert_eq!(ok["id"], "a");
        assert!(validate(ty("AwsAccount"), "a", br#"{"region":"us-east-1"}"#).is_ok());
        let e = validate(ty("AwsAccount"), "a", br#"{"access-key-id":"AK"}"#).unwrap_err();
        assert!(e[0].diagnostics.contains("both"), "{e:?}");
        assert!(validate(ty("AwsAccount"), "a", br#"{"region":7}"#).is_err());
    }

    #[test]
    fn required_fields_and_ids_are_checked() {
        let e = validate(ty("AzureContainer"), "c", br#"{"storage":"acct"}"#).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].diagnostics.contains("'container' is required"));
        assert!(validate(ty("AzureAccount"), "bad id", br#"{"key":"AAAA"}"#).is_err());
        assert!(validate(ty("AzureAccount"), "x", br#"{"key":"not base64!"}"#).is_err());
        assert!(validate(ty("AzureAccount"), "x", br#"{"key":"AAAA","id":"y"}"#).is_err());
        assert!(validate(ty("AzureAccount"), "x", br#"{"key":"AAAA","resourceType":"AwsAccount"}"#).is_err());
        assert!(validate(ty("AzureAccount"), "x", b"[1]").is_err());
        assert!(validate(ty("AzureAccount"), "x", b"{").is_err());
        assert!(
            validate(ty("GcpServiceAccount"), "g", br#"{"service-account-email":"a@b","private-key":"x"}"#).is_err()
        );
    }

    #[test]
    fn container_account_references() {
        let ok = br#"{"storage":"s","container":"c","account":{"id":"acc","resourceType":"AzureAccount"}}"#;
        assert!(validate(ty("AzureContainer"), "c", ok).is_ok());
        let bad = br#"{"storage":"s","container":"c","account":{"id":"acc","resourceType":"AwsAccount"}}"#;
        assert!(validate(ty("AzureContainer"), "c", bad).is_err());
        assert_eq!(reference_id(&json!({"reference":"AzureAccount/a1"}), "AzureAccount"), Some("a1"));
        assert_eq!(reference_id(&json!({"reference":"Other/a1"}), "AzureAccount"), None);
    }

    #[test]
    fn redaction_drops_every_secret() {
        let v = json!({"resourceType":"AwsAccount","id":"a","access-key-id":"AK","secret-access-key":"s","region":"r"});
        let shown = redact(ty("AwsAccount"), v);
        assert_eq!(shown, json!({"resourceType":"AwsAccount","id":"a","access-key-id":"AK","region":"r"}));
        let shown = redact(ty("GcpServiceAccount"), json!({"private-key":"k","service-account-email":"e"}));
        assert_eq!(shown, json!({"service-account-email":"e"}));
        assert_eq!(redact(ty("AzureAccount"), json!({"key":"k"})), json!({}));
    }

    #[test]
    fn the_fields_sealed_at_rest_are_the_secrets() {
        for t in &CONFIG_TYPES {
            assert_eq!(sluice_storage::secrets::secret_fields(t.name), t.secrets, "{} (D50)", t.name);
        }
    }
}
