//! `Client` resources in Aidbox's shape: a backend service allowed to ask for tokens with
//! a signed assertion (`private_key_jwt`), its keys inline (`jwks`) or at a URL
//! (`jwks_uri`), and the scopes it may have.
//!
//! ```json
//! {"resourceType": "Client", "id": "analytics", "active": true,
//!  "grant_types": ["client_credentials"],
//!  "auth": {"client_credentials": {
//!     "client_assertion_types": ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"],
//!     "access_token_expiration": 300, "token_format": "jwt"}},
//!  "scope": ["system/*.read"],
//!  "jwks_uri": "https://analytics.example.org/.well-known/jwks.json"}
//! ```

use jsonwebtoken::jwk::JwkSet;
use serde_json::Value;
use sluice_fhir::{Issue, IssueCode};

/// The resource type of clients (a configuration resource: `/Client/<id>`).
pub const CLIENT_TYPE: &str = "Client";
/// The only client assertion type: a JWT signed with the client's key.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Token lifetime when the client does not set `access_token_expiration` (seconds).
pub const DEFAULT_TOKEN_SECONDS: u64 = 300;
/// The longest token lifetime a client may set (seconds).
pub const MAX_TOKEN_SECONDS: u64 = 3600;

/// Where a client's public keys are.
#[derive(Debug, Clone, PartialEq)]
pub enum Keys {
    /// Inline (`jwks`).
    Inline(JwkSet),
    /// At a URL (`jwks_uri`), fetched and cached.
    Uri(String),
}

/// A validated `Client`.
#[derive(Debug, Clone, PartialEq)]
pub struct Client {
    /// The client id (`iss` and `sub` of its assertions).
    pub id: String,
    /// Whether it may get tokens.
    pub active: bool,
    /// The scopes it may be granted.
    pub scope: Vec<String>,
    /// How long its tokens live (seconds).
    pub token_seconds: u64,
    /// Its public keys.
    pub keys: Keys,
}

/// Checks a `Client` body for `/Client/<id>`; returns the resource to store (the body,
/// with `resourceType` and `id` set) or what is wrong with it.
pub fn validate(id: &str, body: &[u8]) -> Result<Value, Vec<Issue>> {
    let invalid = |msg: String| vec![Issue::error(IssueCode::Invalid, msg)];
    if !sluice_fhir::valid_id(id) {
        return Err(invalid(format!("'{id}' is not a valid id")));
    }
    let mut value: Value = serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    let obj = value.as_object_mut().ok_or_else(|| invalid("a Client is a JSON object".into()))?;
    match obj.get("resourceType").and_then(Value::as_str) {
        None | Some(CLIENT_TYPE) => {}
        Some(other) => return Err(invalid(format!("resourceType is '{other}', expected 'Client'"))),
    }
    match obj.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id != id => {
            return Err(invalid(format!("the body's id '{body_id}' differs from the URL's '{id}'")));
        }
        _ => {}
    }
    obj.insert("resourceType".into(), CLIENT_TYPE.into());
    obj.insert("id".into(), id.into());
    parse(&value).map_err(invalid)?;
    Ok(value)
}

/// Reads a stored (or submitted) `Client`; the error says what is wrong.
pub fn parse(value: &Value) -> Result<Client, String> {
    let id = value.get("id").and_then(Value::as_str).ok_or("a Client needs an id")?.to_string();
    if value.get("secret").is_some() {
        return Err("client secrets are not supported: give the client's public keys (jwks or jwks_uri) and have it sign assertions (private_key_jwt)".into());
    }
    let active = match value.get("active") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("active must be true or false".into()),
    };
    let strings = |field: &str, v: Option<&Value>| -> Result<Vec<String>, String> {
        match v {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string).ok_or_else(|| format!("{field} must be an array of strings")))
                .collect(),
            Some(_) => Err(format!("{field} must be an array of strings")),
        }
    };
    let grants = strings("grant_types", value.get("grant_types"))?;
    if !grants.iter().any(|g| g == "client_credentials") {
        return Err("grant_types must include \"client_credentials\" (the only grant this server supports)".into());
    }
    let cc = value.pointer("/auth/client_credentials");
    let assertion_types =
        strings("auth.client_credentials.client_assertion_types", cc.and_then(|c| c.get("client_assertion_types")))?;
    if !assertion_types.is_empty() && !assertion_types.iter().any(|t| t == JWT_BEARER) {
        return Err(format!("auth.client_credentials.client_assertion_types must include \"{JWT_BEARER}\""));
    }
    let token_seconds = match cc.and_then(|c| c.get("access_token_expiration")) {
        None => DEFAULT_TOKEN_SECONDS,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_TOKEN_SECONDS).contains(&n) => n,
            _ => {
                return Err(format!(
                    "auth.client_credentials.access_token_expiration must be a number of seconds from 1 to {MAX_TOKEN_SECONDS}"
                ));
            }
        },
    };
    match cc.and_then(|c| c.get("token_format")) {
        None => {}
        Some(Value::String(f)) if f == "jwt" => {}
        Some(_) => return Err("auth.client_credentials.token_format must be \"jwt\" (tokens are signed JWTs)".into()),
    }
    let scope = strings("scope", value.get("scope"))?;
    if let Some(bad) = scope.iter().find(|s| crate::scopes::Scope::parse(s).is_none()) {
        return Err(format!(
            "scope '{bad}' is not a system scope this server enforces (system/<Type|*>.<read|write|*> or system/<Type|*>.<cruds>)"
        ));
    }
    let keys = match (value.get("jwks"), value.get("jwks_uri")) {
        (Some(_), Some(_)) => return Err("give either jwks or jwks_uri, not both".into()),
        (Some(jwks), None) => {
            // A Client is returned by GET as stored: it must hold public keys only.
            let private = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
            let keys = jwks.get("keys").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            if keys.iter().any(|k| private.iter().any(|p| k.get(*p).is_some())) {
                return Err("jwks holds private or symmetric key material: give only the public keys (the client keeps its private key)".into());
            }
            let set: JwkSet =
                serde_json::from_value(jwks.clone()).map_err(|e| format!("jwks is not a JSON Web Key Set: {e}"))?;
            if set.keys.is_empty() {
                return Err("jwks has no keys".into());
            }
            if set.keys.iter().any(|k| k.common.key_id.is_none()) {
                return Err("every key in jwks needs a kid (assertions name their key by kid)".into());
            }
            Keys::Inline(set)
        }
        (None, Some(Value::String(uri))) => {
            if !(uri.starts_with("https://") || uri.starts_with("http://")) {
                return Err("jwks_uri must be an http(s) URL".into());
            }
            Keys::Uri(uri.clone())
        }
        (None, Some(_)) => return Err("jwks_uri must be a string".into()),
        (None, None) => return Err("a Client needs its public keys: jwks (inline) or jwks_uri".into()),
    };
    Ok(Client { id, active, scope, token_seconds, keys })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    #[test]
    fn aidbox_shaped_clients_are_accepted() {
        let v = validate(
            "bulk",
            &body(json!({
                "grant_types": ["client_credentials"],
                "auth": {"client_credentials": {"client_assertion_types": [JWT_BEARER], "access_token_expiration": 120, "token_format": "jwt"}},
                "scope": ["system/*.read"], "jwks_uri": "https://example.org/jwks"
            })),
        )
        .unwrap();
        assert_eq!(v["resourceType"], "Client");
        let c = parse(&v).unwrap();
        assert_eq!((c.id.as_str(), c.active, c.token_seconds), ("bulk", true, 120));
        assert_eq!(c.keys, Keys::Uri("https://example.org/jwks".into()));
    }

    #[test]
    fn what_is_wrong_is_said() {
        let base =
            json!({"grant_types": ["client_credentials"], "scope": ["system/*.read"], "jwks_uri": "https://x/j"});
        let cases = [
            (json!({"grant_types": ["authorization_code"]}), "grant_types"),
            (json!({"secret": "s3cret"}), "secrets are not supported"),
            (json!({"scope": ["patient/*.read"]}), "not a system scope"),
            (json!({"jwks_uri": "ftp://x"}), "http(s)"),
            (json!({"jwks": {"keys": []}}), "both"),
            (
                json!({"jwks_uri": null, "jwks": {"keys": [{"kty": "EC", "kid": "a", "crv": "P-384", "x": "x", "y": "y", "d": "secret"}]}}),
                "private",
            ),
            (json!({"auth": {"client_credentials": {"access_token_expiration": 0}}}), "access_token_expiration"),
            (json!({"active": "yes"}), "active"),
            (json!({"id": "other"}), "differs"),
        ];
        for (patch, expect) in cases {
            let mut v = base.clone();
            for (k, x) in patch.as_object().unwrap() {
                if x.is_null() {
                    v.as_object_mut().unwrap().remove(k);
                } else {
                    v[k] = x.clone();
                }
            }
            let err = validate("bulk", &body(v)).unwrap_err();
            assert!(err[0].diagnostics.contains(expect), "{expect}: {}", err[0].diagnostics);
        }
        let mut no_keys = base.clone();
        no_keys.as_object_mut().unwrap().remove("jwks_uri");
        assert!(validate("bulk", &body(no_keys)).unwrap_err()[0].diagnostics.contains("public keys"));
    }
}
