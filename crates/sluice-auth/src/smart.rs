//! [`Smart`]: SMART Backend Services authorization (D22). Bearer tokens from this server's
//! token endpoint or a trusted external issuer; the root client by HTTP Basic.

use crate::access::{Access, Authorize, Denied, Grant};
use crate::audit::{Auditor, Event, Kind};
use crate::issuers::Issuers;
use crate::jwks::JwksCache;
use crate::scopes::Scopes;
use crate::token::{self, OAuthError, TokenAnswer, TokenStore, Tokens};
use async_trait::async_trait;
use base64::Engine as _;
use http::HeaderMap;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sluice_planner::Level;
use std::sync::Arc;

/// The root client's user name in HTTP Basic (`root:<BOX_ROOT_CLIENT_SECRET>`).
pub const ROOT_CLIENT: &str = "root";

/// How [`Smart`] is set up.
#[derive(Clone, Default)]
pub struct SmartConfig {
    /// The public URL of the API's root (the base URL given to `sluice_server::Api`): the
    /// token endpoint is `<base>/auth/token`, and this server's tokens name it as issuer
    /// and audience.
    pub base_url: String,
    /// The key this server's access tokens are signed with (HS256); every server sharing
    /// the database needs the same.
    pub token_key: Vec<u8>,
    /// `BOX_ROOT_CLIENT_SECRET`: HTTP Basic `root:<secret>` is the administrator. Unset:
    /// configuration and `Client` resources cannot be changed (403).
    pub root_secret: Option<String>,
    /// External issuers whose bearer tokens are accepted (`iss` exactly).
    pub issuers: Vec<String>,
    /// The `aud` external tokens must carry (default: the base URL's FHIR endpoint,
    /// `<base>/fhir`).
    pub audience: Option<String>,
}

impl std::fmt::Debug for SmartConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartConfig")
            .field("base_url", &self.base_url)
            .field("root_secret", &self.root_secret.as_ref().map(|_| "<redacted>"))
            .field("issuers", &self.issuers)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// SMART Backend Services: the token endpoint's logic and an [`Authorize`] for the API.
/// Cheap to clone.
#[derive(Clone)]
pub struct Smart {
    inner: Arc<Inner>,
}

struct Inner {
    tokens: Tokens,
    root_digest: Option<[u8; 32]>,
    store: Arc<dyn TokenStore>,
    jwks: Arc<JwksCache>,
    issuers: Issuers,
    audit: Auditor,
}

/// 401 asking for the root client's Basic credentials (the challenge names Bearer too).
fn root_required(message: &str) -> Denied {
    let mut d = Denied::unauthorized(message);
    d.challenge = Some("Basic realm=\"sluice\", Bearer".into());
    d
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

impl Smart {
    /// SMART Backend Services over `store` (the `Client`s and used assertions), recording
    /// to `audit`.
    pub fn new(config: SmartConfig, store: Arc<dyn TokenStore>, audit: Auditor) -> Self {
        let base = config.base_url.trim_end_matches('/').to_string();
        let token_url = format!("{base}/auth/token");
        let jwks = Arc::new(JwksCache::default());
        let audience = config.audience.clone().unwrap_or_else(|| format!("{base}/fhir"));
        let issuers = Issuers::new(config.issuers.clone(), audience, jwks.clone());
        Smart {
            inner: Arc::new(Inner {
                tokens: Tokens::new(&base, &token_url, &config.token_key),
                root_digest: config.root_secret.as_deref().map(|s| digest(format!("{ROOT_CLIENT}:{s}").as_bytes())),
                store,
                jwks,
                issuers,
                audit,
            }),
        }
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> &str {
        self.inner.tokens.token_url()
    }

    /// The audit trail this authorization records to.
    pub fn auditor(&self) -> &Auditor {
        &self.inner.audit
    }

    /// `POST /auth/token`: answers a form (`grant_type`, `scope`, `client_assertion_type`,
    /// `client_assertion`); audited either way.
    pub async fn token(&self, form: &[(String, String)]) -> Result<TokenAnswer, OAuthError> {
        let i = &self.inner;
        let result = token::exchange(form, &i.tokens, i.store.as_ref(), &i.jwks).await;
        let event = match &result {
            Ok(t) => Event::new(Kind::Token, Some(&t.client)).detail(format!("token issued for {}", t.scope)),
            Err(e) => Event::new(Kind::Token, e.client.as_deref())
                .refused(e.status)
                .detail(format!("{}: {}", e.error, e.description)),
        };
        i.audit.record(event).await;
        match &result {
            Ok(t) => tracing::info!(client = %t.client, scope = %t.scope, "token issued"),
            Err(e) => tracing::info!(client = e.client.as_deref().unwrap_or("?"), error = e.error, "token refused"),
        }
        result
    }

    /// `/.well-known/smart-configuration` (SMART App Launch 2.x, backend services).
    pub fn smart_configuration(&self) -> Value {
        json!({
            "issuer": self.inner.tokens.issuer(),
            "token_endpoint": self.token_url(),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": ["system/*.read", "system/*.rs", "system/*.write", "system/*.cud", "system/*.*", "system/*.cruds"],
            "capabilities": ["client-confidential-asymmetric"],
        })
    }

    /// Who the request's `Authorization` says is asking: `None` without credentials.
    async fn identify(&self, headers: &HeaderMap) -> Result<Option<Grant>, Denied> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else { return Ok(None) };
        let value = value.to_str().map_err(|_| Denied::invalid_token("the Authorization header is not readable"))?;
        let (scheme, cred) = value.trim().split_once(' ').unwrap_or((value, ""));
        let cred = cred.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            return self.root(cred).map(Some);
        }
        if !scheme.eq_ignore_ascii_case("bearer") || cred.is_empty() {
            return Err(Denied::unauthorized(format!(
                "Authorization must be 'Bearer <token>' (get one at {}) or the root client's Basic credentials",
                self.token_url()
            )));
        }
        self.bearer(cred).await.map(Some)
    }

    fn root(&self, cred: &str) -> Result<Grant, Denied> {
        let Some(expected) = &self.inner.root_digest else {
            return Err(Denied::forbidden("the root client is disabled: set BOX_ROOT_CLIENT_SECRET to use it"));
        };
        let given = base64::engine::general_purpose::STANDARD.decode(cred).unwrap_or_default();
        if digest(&given) == *expected {
            Ok(Grant::root())
        } else {
            Err(root_required("the root client's credentials are wrong"))
        }
    }

    async fn bearer(&self, token: &str) -> Result<Grant, Denied> {
        #[derive(serde::Deserialize)]
        struct Iss {
            iss: Option<String>,
        }
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<Iss>(token)
            .map_err(|_| Denied::invalid_token("the bearer token is not a JWT"))?
            .iss
            .unwrap_or_default();
        let i = &self.inner;
        if iss == i.tokens.issuer() {
            let claims = i.tokens.verify(token).map_err(Denied::invalid_token)?;
            return Ok(Grant { client: Some(claims.sub), admin: false, scopes: Scopes::parse(&claims.scope) });
        }
        if i.issuers.trusts(&iss) {
            let t = i.issuers.verify(token, &iss).await.map_err(Denied::invalid_token)?;
            return Ok(Grant { client: Some(t.client), admin: false, scopes: t.scopes });
        }
        Err(Denied::invalid_token(format!("tokens issued by '{iss}' are not accepted here")))
    }
}

#[async_trait]
impl Authorize for Smart {
    async fn authorize(&self, access: &Access<'_>, headers: &HeaderMap) -> Result<Grant, Denied> {
        let who = self.identify(headers).await?;
        match access {
            Access::Configure { .. } | Access::Audit | Access::Monitor => {
                if self.inner.root_digest.is_none() {
                    return Err(Denied::forbidden(
                        "configuration, Client resources, the audit trail, metrics and the status page are disabled: set BOX_ROOT_CLIENT_SECRET and use the root client (HTTP Basic root:<secret>)",
                    ));
                }
                match who {
                    Some(g) if g.admin => Ok(g),
                    Some(g) => Err(Denied::forbidden(
                        "only the root client (HTTP Basic root:<BOX_ROOT_CLIENT_SECRET>) may read or change configuration, Client resources, the audit trail, metrics and the status page",
                    )
                    .of(g.client)),
                    None => {
                        Err(root_required("this needs the root client: HTTP Basic root:<BOX_ROOT_CLIENT_SECRET>"))
                    }
                }
            }
            _ => {
                let grant = who.ok_or_else(|| {
                    Denied::unauthorized(format!(
                        "this server requires a bearer token: get one at {} (SMART Backend Services, client_credentials with a signed assertion)",
                        self.token_url()
                    ))
                })?;
                if let Access::Kickoff { level: Level::Group(id) } = access
                    && !grant.scopes.exports("Group")
                {
                    return Err(Denied::forbidden(format!(
                        "exporting Group/{id} needs read access to Group (system/Group.read or system/Group.rs); the token has '{}'",
                        grant.scopes.as_str()
                    ))
                    .of(grant.client));
                }
                Ok(grant)
            }
        }
    }
}
