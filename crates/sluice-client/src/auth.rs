//! SMART Backend Services: discovery, a signed client assertion, the token, its refresh.

use crate::error::{Error, describe_body};
use crate::jwk::{JwkDer, to_der};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// A client's private key for signing assertions (RS384 or ES384) and its `kid`.
pub struct SigningKey {
    alg: Algorithm,
    key: EncodingKey,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("alg", &self.alg).field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a key file: a private JWK (or a JWK Set; its first private key), or a PEM
    /// (PKCS#8 or PKCS#1 RSA, PKCS#8 EC P-384). `kid` overrides the JWK's; a PEM needs it.
    pub fn load(path: &Path, kid: Option<&str>) -> Result<SigningKey, Error> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::Usage(format!("reading the key {}: {e}", path.display())))?;
        if bytes.trim_ascii_start().starts_with(b"{") {
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Usage(format!("the key {} is not JSON: {e}", path.display())))?;
            SigningKey::from_jwk(&v, kid)
        } else {
            let kid = kid.ok_or_else(|| {
                Error::Usage("a PEM key needs --kid: the key id registered with the server (the JWK's kid)".into())
            })?;
            SigningKey::from_pem(&bytes, kid)
        }
    }

    /// A key from a private JWK (or a JWK Set holding one).
    pub fn from_jwk(v: &Value, kid: Option<&str>) -> Result<SigningKey, Error> {
        let jwk = match v.get("keys").and_then(Value::as_array) {
            Some(keys) => keys
                .iter()
                .find(|k| k.get("d").is_some())
                .ok_or_else(|| Error::Usage("the JWK Set holds no private key (no 'd')".into()))?,
            None => v,
        };
        let kid = kid
            .map(str::to_string)
            .or_else(|| jwk.get("kid").and_then(Value::as_str).map(str::to_string))
            .ok_or_else(|| Error::Usage("the JWK has no 'kid'; give one with --kid".into()))?;
        let (alg, key) = match to_der(jwk).map_err(Error::Usage)? {
            JwkDer::Rsa(der) => (Algorithm::RS384, EncodingKey::from_rsa_der(&der)),
            JwkDer::EcP384(der) => (Algorithm::ES384, EncodingKey::from_ec_der(&der)),
        };
        let key = SigningKey { alg, key, kid };
        key.check()?;
        Ok(key)
    }

    /// A key from a PEM file's bytes.
    pub fn from_pem(pem: &[u8], kid: &str) -> Result<SigningKey, Error> {
        let (alg, key) = match EncodingKey::from_rsa_pem(pem) {
            Ok(k) => (Algorithm::RS384, k),
            Err(_) => match EncodingKey::from_ec_pem(pem) {
                Ok(k) => (Algorithm::ES384, k),
                Err(e) => return Err(Error::Usage(format!("the PEM key is neither RSA nor EC P-384 (PKCS#8): {e}"))),
            },
        };
        let key = SigningKey { alg, key, kid: kid.to_string() };
        key.check()?;
        Ok(key)
    }

    /// The algorithm it signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Signs once, so a bad key fails when it is read, not at the first token request.
    fn check(&self) -> Result<(), Error> {
        self.sign(&json!({"check": true}))
            .map(|_| ())
            .map_err(|e| Error::Usage(format!("the key cannot sign {:?}: {e}", self.alg)))
    }

    fn sign(&self, claims: &Value) -> Result<String, jsonwebtoken::errors::Error> {
        let header = Header { kid: Some(self.kid.clone()), typ: Some("JWT".into()), ..Header::new(self.alg) };
        jsonwebtoken::encode(&header, claims, &self.key)
    }
}

/// SMART Backend Services for one client: the token endpoint is discovered from
/// `<base>/.well-known/smart-configuration`; tokens are requested with a client assertion
/// and reused until shortly before they expire.
#[derive(Debug)]
pub struct SmartAuth {
    client_id: String,
    key: SigningKey,
    scope: String,
    state: Mutex<TokenState>,
}

#[derive(Debug, Default)]
struct TokenState {
    token_url: Option<String>,
    token: Option<(String, Instant)>,
}

impl SmartAuth {
    /// Client `client_id` signing with `key`, asking for `scope` (e.g. `system/*.read`).
    pub fn new(client_id: impl Into<String>, key: SigningKey, scope: impl Into<String>) -> SmartAuth {
        SmartAuth { client_id: client_id.into(), key, scope: scope.into(), state: Mutex::new(TokenState::default()) }
    }

    /// A valid access token (fetching a new one when there is none or it expires soon).
    pub(crate) async fn bearer(&self, http: &reqwest::Client, base: &str) -> Result<String, Error> {
        let mut st = self.state.lock().await;
        if let Some((token, until)) = &st.token
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let token_url = match &st.token_url {
            Some(u) => u.clone(),
            None => {
                let u = discover(http, base).await?;
                st.token_url = Some(u.clone());
                u
            }
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + 240,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let assertion = self.key.sign(&claims).map_err(|e| Error::Auth(format!("signing the assertion: {e}")))?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", &self.scope)
            .append_pair("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            .append_pair("client_assertion", &assertion)
            .finish();
        let r = http
            .post(&token_url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| Error::Auth(format!("token request to {token_url}: {e}")))?;
        let status = r.status();
        let body = r.bytes().await.map_err(|e| Error::Auth(format!("token answer: {e}")))?;
        if !status.is_success() {
            return Err(Error::Auth(format!("the token endpoint refused ({status}): {}", describe_body(&body))));
        }
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| Error::Auth(format!("the token answer is not JSON: {e}")))?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Auth("the token answer has no access_token".into()))?
            .to_string();
        let lifetime = v.get("expires_in").and_then(Value::as_u64).unwrap_or(300);
        // Renewed a little early: a token must not expire between a check and its use.
        let margin = (lifetime / 10).clamp(1, 60);
        let until = Instant::now() + Duration::from_secs(lifetime.saturating_sub(margin));
        st.token = Some((token.clone(), until));
        Ok(token)
    }

    /// Forgets the current token (after a 401): the next request gets a new one.
    pub(crate) async fn invalidate(&self) {
        self.state.lock().await.token = None;
    }
}

/// The token endpoint from `<base>/.well-known/smart-configuration`.
async fn discover(http: &reqwest::Client, base: &str) -> Result<String, Error> {
    let url = format!("{}/.well-known/smart-configuration", base.trim_end_matches('/'));
    let r = http
        .get(&url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| Error::Auth(format!("SMART discovery at {url}: {e}")))?;
    let status = r.status();
    let body = r.bytes().await.map_err(|e| Error::Auth(format!("SMART discovery at {url}: {e}")))?;
    if !status.is_success() {
        return Err(Error::Auth(format!("SMART discovery at {url} answered {status}: {}", describe_body(&body))));
    }
    serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("token_endpoint").and_then(Value::as_str).map(str::to_string))
        .ok_or_else(|| Error::Auth(format!("{url} names no token_endpoint")))
}
