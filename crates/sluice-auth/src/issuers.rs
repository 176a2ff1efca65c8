//! Bearer tokens from external OAuth 2 / OpenID Connect servers (Keycloak, Entra ID, Okta):
//! their keys come from the issuer's discovery document (`jwks_uri`), cached as a client's
//! `jwks_uri` is.

use crate::jwks::{Fetcher, JwksCache};
use crate::scopes::Scopes;
use crate::token::describe;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The algorithms accepted from external issuers (asymmetric only).
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// A verified external token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalToken {
    /// The client: `client_id`, `azp` or `sub`, in that order.
    pub client: String,
    /// The scopes, from `scope` (space-separated) or `scp` (a list or a string).
    pub scopes: Scopes,
}

/// The trusted external issuers.
pub struct Issuers {
    issuers: Vec<String>,
    audience: String,
    fetcher: Fetcher,
    jwks: std::sync::Arc<JwksCache>,
    /// Each issuer's `jwks_uri`, from its discovery document, and until when it is kept.
    discovered: Mutex<HashMap<String, (String, Instant, Duration)>>,
}

impl Issuers {
    /// Trusts tokens from `issuers` (their `iss` exactly) whose `aud` holds `audience`.
    pub fn new(issuers: Vec<String>, audience: String, jwks: std::sync::Arc<JwksCache>) -> Self {
        Issuers { issuers, audience, fetcher: Fetcher::new(), jwks, discovered: Mutex::default() }
    }

    /// Whether tokens from `iss` are trusted.
    pub fn trusts(&self, iss: &str) -> bool {
        self.issuers.iter().any(|i| i == iss)
    }

    /// The issuers trusted.
    pub fn list(&self) -> &[String] {
        &self.issuers
    }

    /// Verifies a token whose (unverified) `iss` is trusted.
    pub async fn verify(&self, token: &str, iss: &str) -> Result<ExternalToken, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(format!("tokens signed with {:?} are not accepted", header.alg));
        }
        let uri = self.jwks_uri(iss).await?;
        let set = self.jwks.get(&uri, header.kid.as_deref()).await?;
        let jwk = match &header.kid {
            Some(kid) => set.find(kid).ok_or_else(|| format!("{iss} publishes no key with kid '{kid}'"))?,
            None if set.keys.len() == 1 => &set.keys[0],
            None => return Err("the token's header has no kid".into()),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("the issuer's key is not usable: {e}"))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[iss]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.leeway = 30;
        let claims = jsonwebtoken::decode::<Value>(token, &key, &v)
            .map_err(|e| format!("the token is not valid: {}", describe(&e, &self.audience)))?
            .claims;
        let client = ["client_id", "azp", "sub"]
            .iter()
            .find_map(|c| claims.get(*c).and_then(Value::as_str))
            .ok_or("the token names no client (client_id, azp or sub)")?;
        let scope = match (claims.get("scope"), claims.get("scp")) {
            (Some(Value::String(s)), _) => s.clone(),
            (_, Some(Value::String(s))) => s.clone(),
            (_, Some(Value::Array(a))) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
            _ => String::new(),
        };
        Ok(ExternalToken { client: format!("{client}@{iss}"), scopes: Scopes::parse(&scope) })
    }

    /// The issuer's `jwks_uri`, from `<issuer>/.well-known/openid-configuration` (or the
    /// OAuth 2 `oauth-authorization-server` document), whose `issuer` must be `iss`.
    async fn jwks_uri(&self, iss: &str) -> Result<String, String> {
        if let Some((uri, at, ttl)) = self.discovered.lock().unwrap_or_else(|p| p.into_inner()).get(iss)
            && at.elapsed() < *ttl
        {
            return Ok(uri.clone());
        }
        let base = iss.trim_end_matches('/');
        let mut last = String::new();
        for doc in ["openid-configuration", "oauth-authorization-server"] {
            match self.fetcher.get_json(&format!("{base}/.well-known/{doc}")).await {
                Ok(f) => {
                    if f.body.get("issuer").and_then(Value::as_str) != Some(iss) {
                        return Err(format!("{iss}'s discovery document names another issuer"));
                    }
                    let uri = f
                        .body
                        .get("jwks_uri")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("{iss}'s discovery document has no jwks_uri"))?;
                    let ttl = f.ttl.max(Duration::from_secs(60));
                    self.discovered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(iss.to_string(), (uri.to_string(), Instant::now(), ttl));
                    return Ok(uri.to_string());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}
