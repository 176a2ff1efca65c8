//! The token endpoint's rules (SMART Backend Services, RFC 6749 and RFC 7523): checking a
//! client's signed assertion and issuing access tokens, and verifying those tokens.

use crate::client::{self, Client, JWT_BEARER, Keys};
use crate::jwks::JwksCache;
use crate::scopes;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use sluice_storage::ConfigRepo;
use sluice_store::AuthRepo;
use time::OffsetDateTime;

/// The longest an assertion may live (SMART: `exp` at most five minutes ahead).
pub const MAX_ASSERTION_SECONDS: i64 = 300;
/// Clock skew tolerated on `exp` (seconds).
const LEEWAY: u64 = 30;
/// The algorithms accepted for client assertions (SMART requires RS384 and ES384).
pub const ASSERTION_ALGORITHMS: [Algorithm; 2] = [Algorithm::RS384, Algorithm::ES384];

/// A refusal of the token endpoint (RFC 6749 §5.2), answered as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// 400, or 401 for `invalid_client`.
    pub status: u16,
    /// The RFC 6749 error code.
    pub error: &'static str,
    /// What went wrong, for a person (never a secret).
    pub description: String,
    /// The client the request named, when known (for the audit trail).
    pub client: Option<String>,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError { status, error, description: description.into(), client: None }
    }

    fn invalid_client(description: impl Into<String>) -> Self {
        OAuthError::new(401, "invalid_client", description)
    }

    fn of(mut self, client: &str) -> Self {
        self.client = Some(client.to_string());
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.error, "error_description": self.description})
    }
}

/// A successful token answer (RFC 6749 §5.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenAnswer {
    /// The bearer token.
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// The scopes granted (space-separated).
    pub scope: String,
    /// The client it was issued to (not serialised; for the audit trail).
    #[serde(skip)]
    pub client: String,
}

/// The claims of a client assertion that are checked by hand.
#[derive(Debug, Deserialize)]
struct AssertionClaims {
    iss: Option<String>,
    exp: Option<i64>,
    jti: Option<String>,
}

/// The claims of the access tokens this server issues.
#[derive(Debug, Serialize, Deserialize)]
pub struct AccessClaims {
    /// This server (its base URL).
    pub iss: String,
    /// The client id.
    pub sub: String,
    /// This server (its base URL).
    pub aud: String,
    /// Expiry (Unix seconds).
    pub exp: i64,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// A unique id.
    pub jti: String,
    /// The scopes granted.
    pub scope: String,
}

/// Issues and verifies this server's access tokens (HS256 with a key every server sharing
/// the database is given: derived from the URL signing key).
pub struct Tokens {
    issuer: String,
    token_url: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

impl Tokens {
    /// Tokens issued by `base_url` (also their audience), signed with `key`; assertions must
    /// name `token_url` as their audience.
    pub fn new(base_url: &str, token_url: &str, key: &[u8]) -> Self {
        // Hashed, so any key material (even empty) becomes a 32-byte HMAC key.
        let key: [u8; 32] =
            sha2::Sha256::new_with_prefix(b"sluice access tokens\n").chain_update(key).finalize().into();
        Tokens {
            issuer: base_url.to_string(),
            token_url: token_url.to_string(),
            encoding: EncodingKey::from_secret(&key).expect("a 32-byte key"),
            decoding: DecodingKey::from_secret(&key).expect("a 32-byte key"),
        }
    }

    /// This server's issuer name.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// Verifies one of this server's tokens; returns its claims.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, String> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 0;
        jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| format!("the access token is not valid: {e}"))
    }

    fn issue(&self, client: &Client, scope: String) -> Result<TokenAnswer, OAuthError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: client.id.clone(),
            aud: self.issuer.clone(),
            exp: now + client.token_seconds as i64,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scope.clone(),
        };
        let access_token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| OAuthError::new(500, "server_error", format!("signing the token failed: {e}")))?;
        Ok(TokenAnswer {
            access_token,
            token_type: "bearer",
            expires_in: client.token_seconds,
            scope,
            client: client.id.clone(),
        })
    }
}

/// What the token endpoint needs of the store: the `Client`s and the used assertions.
pub trait TokenStore: ConfigRepo + AuthRepo {}

impl<T: ConfigRepo + AuthRepo + ?Sized> TokenStore for T {}

/// Answers a token request (the form's fields, in order).
pub async fn exchange(
    form: &[(String, String)],
    tokens: &Tokens,
    store: &dyn TokenStore,
    jwks: &JwksCache,
) -> Result<TokenAnswer, OAuthError> {
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    match field("grant_type") {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                format!("grant_type '{other}' is not supported; use client_credentials"),
            ));
        }
        None => return Err(OAuthError::new(400, "invalid_request", "grant_type is missing; use client_credentials")),
    }
    match field("client_assertion_type") {
        Some(JWT_BEARER) => {}
        Some(other) => {
            return Err(OAuthError::invalid_client(format!(
                "client_assertion_type '{other}' is not supported; use {JWT_BEARER}"
            )));
        }
        None => {
            return Err(OAuthError::invalid_client(format!(
                "client_assertion_type is missing; authenticate with a signed assertion ({JWT_BEARER})"
            )));
        }
    }
    let assertion = field("client_assertion").ok_or_else(|| {
        OAuthError::invalid_client("client_assertion is missing: send a JWT signed with the client's key")
    })?;
    let client = check_assertion(assertion, tokens, store, jwks).await?;
    let requested = field("scope").unwrap_or_default();
    if requested.trim().is_empty() {
        return Err(OAuthError::new(
            400,
            "invalid_scope",
            "scope is missing: ask for system scopes such as system/*.read",
        )
        .of(&client.id));
    }
    let granted = scopes::negotiate(requested, &client.scope);
    if granted.is_empty() {
        return Err(OAuthError::new(
            400,
            "invalid_scope",
            format!(
                "none of the scopes asked for is allowed to client '{}' (it may have: {})",
                client.id,
                client.scope.join(" ")
            ),
        )
        .of(&client.id));
    }
    tokens.issue(&client, granted.join(" ")).map_err(|e| e.of(&client.id))
}

/// Checks a client assertion: the client exists and is active, the signature verifies with
/// its key named by `kid`, `iss` = `sub` = the client id, `aud` = the token URL, `exp` is
/// present and at most five minutes ahead, and the `jti` was never used before.
async fn check_assertion(
    assertion: &str,
    tokens: &Tokens,
    store: &dyn TokenStore,
    jwks: &JwksCache,
) -> Result<Client, OAuthError> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|e| OAuthError::invalid_client(format!("client_assertion is not a JWT: {e}")))?;
    let unverified: AssertionClaims = jsonwebtoken::dangerous::insecure_decode_claims(assertion)
        .map_err(|e| OAuthError::invalid_client(format!("client_assertion's claims are not readable: {e}")))?;
    let id = unverified.iss.clone().unwrap_or_default();
    if id.is_empty() {
        return Err(OAuthError::invalid_client("client_assertion has no iss (the client id)"));
    }
    let fail = |msg: String| OAuthError::invalid_client(msg).of(&id);
    if !ASSERTION_ALGORITHMS.contains(&header.alg) {
        return Err(fail(format!("client_assertion is signed with {:?}; use RS384 or ES384", header.alg)));
    }
    let json = if sluice_fhir::valid_id(&id) {
        store
            .config_get(client::CLIENT_TYPE, &id)
            .await
            .map_err(|e| OAuthError::new(500, "server_error", format!("reading the client failed: {e}")))?
    } else {
        None
    };
    let value: serde_json::Value = json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| fail(format!("no client '{id}' is registered")))?;
    let client = client::parse(&value).map_err(|e| fail(format!("client '{id}' is not usable: {e}")))?;
    if !client.active {
        return Err(fail(format!("client '{id}' is not active")));
    }
    let kid = header.kid.as_deref().ok_or_else(|| fail("client_assertion's header has no kid".into()))?;
    let set = match &client.keys {
        Keys::Inline(set) => set.clone(),
        Keys::Uri(uri) => jwks.get(uri, Some(kid)).await.map_err(|e| fail(format!("the client's jwks_uri: {e}")))?,
    };
    let key = key_for(&set, kid, header.alg).map_err(fail)?;
    let mut v = Validation::new(header.alg);
    v.set_issuer(&[&id]);
    v.sub = Some(id.clone());
    v.set_audience(&[tokens.token_url()]);
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    v.leeway = LEEWAY;
    jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &v)
        .map_err(|e| fail(format!("client_assertion is not valid: {}", describe(&e, tokens.token_url()))))?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let exp = unverified.exp.unwrap_or_default();
    if exp > now + MAX_ASSERTION_SECONDS + LEEWAY as i64 {
        return Err(fail(format!("client_assertion's exp is more than {MAX_ASSERTION_SECONDS} seconds ahead")));
    }
    let jti = unverified.jti.filter(|j| !j.is_empty()).ok_or_else(|| fail("client_assertion has no jti".into()))?;
    let expires = OffsetDateTime::from_unix_timestamp(exp + LEEWAY as i64).unwrap_or(OffsetDateTime::now_utc());
    let fresh = store
        .remember_assertion(&format!("{id}\n{jti}"), expires)
        .await
        .map_err(|e| OAuthError::new(500, "server_error", format!("recording the assertion failed: {e}")).of(&id))?;
    if !fresh {
        return Err(fail(format!(
            "client_assertion's jti '{jti}' was already used: sign a new assertion for each request"
        )));
    }
    Ok(client)
}

/// The key `kid` of `set`, usable for `alg`.
fn key_for(set: &JwkSet, kid: &str, alg: Algorithm) -> Result<DecodingKey, String> {
    let jwk = set.find(kid).ok_or_else(|| format!("the client has no key with kid '{kid}'"))?;
    if let Some(key_alg) = jwk.common.key_algorithm
        && format!("{key_alg:?}") != format!("{alg:?}")
    {
        return Err(format!("key '{kid}' is for {key_alg:?}, the assertion is signed with {alg:?}"));
    }
    DecodingKey::from_jwk(jwk).map_err(|e| format!("key '{kid}' is not usable: {e}"))
}

/// A validation error in words a client developer can act on.
pub(crate) fn describe(e: &jsonwebtoken::errors::Error, audience: &str) -> String {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        InvalidSignature => "the signature does not verify with the key named by kid".into(),
        ExpiredSignature => "it has expired (exp)".into(),
        InvalidAudience => format!("aud must be {audience}"),
        InvalidIssuer => "iss is not the expected issuer".into(),
        InvalidSubject => "sub must equal iss (the client id)".into(),
        ImmatureSignature => "it is not valid yet (nbf)".into(),
        MissingRequiredClaim(c) => format!("the {c} claim is missing"),
        InvalidAlgorithm => "the algorithm does not match the key".into(),
        _ => e.to_string(),
    }
}
