//! A pipeline policy that authorizes every SDK request with a container SAS signed with
//! the account key, renewed before it expires.

use crate::sas::{self, Resource, SasParams};
use async_trait::async_trait;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// How long a container SAS is valid.
const SAS_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// A token with less than this left is replaced before use.
const SAS_RENEW_BEFORE: Duration = Duration::from_secs(15 * 60);

/// The permissions the SDK calls need: create, write, delete, list.
const CONTAINER_PERMISSIONS: &str = "cwdl";

/// Signs container SAS tokens with the account key.
pub(crate) struct KeySigner {
    pub account: String,
    pub container: String,
    /// The decoded account key.
    pub key: Vec<u8>,
    /// `Some("https")` when the endpoint is HTTPS.
    pub protocol: Option<&'static str>,
}

impl std::fmt::Debug for KeySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySigner")
            .field("account", &self.account)
            .field("container", &self.container)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Appends the current container SAS to each request's query.
pub(crate) struct ContainerSasPolicy {
    signer: Arc<KeySigner>,
    current: Mutex<Option<(OffsetDateTime, sas::Token)>>,
}

impl std::fmt::Debug for ContainerSasPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerSasPolicy").field("signer", &self.signer).finish_non_exhaustive()
    }
}

impl ContainerSasPolicy {
    pub fn new(signer: Arc<KeySigner>) -> Self {
        ContainerSasPolicy { signer, current: Mutex::new(None) }
    }

    /// The token to use now, signing a new one when the cached one is about to expire.
    fn token(&self) -> sas::Token {
        let now = OffsetDateTime::now_utc();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((expiry, token)) = current.as_ref()
            && *expiry - now > SAS_RENEW_BEFORE
        {
            return token.clone();
        }
        let expiry = now + SAS_LIFETIME;
        let token = sas::service_sas(
            &SasParams {
                account: &self.signer.account,
                container: &self.signer.container,
                resource: Resource::Container,
                permissions: CONTAINER_PERMISSIONS,
                expiry,
                protocol: self.signer.protocol,
            },
            &self.signer.key,
        );
        *current = Some((expiry, token.clone()));
        token
    }
}

#[async_trait]
impl Policy for ContainerSasPolicy {
    async fn send(&self, ctx: &Context, request: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
        // Sign a copy, so that a request sent through here twice never carries two tokens.
        let mut signed = request.clone();
        signed.url_mut().query_pairs_mut().extend_pairs(self.token());
        next[0].send(ctx, &mut signed, &next[1..]).await
    }
}
