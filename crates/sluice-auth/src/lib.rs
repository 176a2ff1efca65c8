//! Sluice's authorization (D22, D32, D36).
//!
//! - [`Authorize`], the seam the HTTP API asks before every operation ([`Access`]), and
//!   its answer, a [`Grant`] (who is asking, and the [`Scopes`] they hold); [`AllowAll`]
//!   for servers without authorization.
//! - [`Smart`]: SMART Backend Services as Aidbox users know it. `Client` resources
//!   ([`client`]) hold a backend service's public keys and allowed scopes; the token
//!   endpoint ([`Smart::token`]) checks a signed assertion (RS384 or ES384, `kid`, `iss` =
//!   `sub`, `aud`, `exp`, a `jti` never seen before, kept in the store) and issues a bearer
//!   token; tokens of external OAuth 2 / OIDC issuers are accepted too ([`issuers`]). The
//!   root client (HTTP Basic with `BOX_ROOT_CLIENT_SECRET`) is the administrator.
//! - [`Auditor`]: the audit trail of FHIR `AuditEvent`s (D23).
//!
//! No cryptography is written here: JOSE is `jsonwebtoken` (aws-lc-rs).

mod access;
pub mod audit;
pub mod client;
pub mod issuers;
pub mod jwks;
pub mod scopes;
mod smart;
pub mod token;

pub use access::{Access, AllowAll, Authorize, Denied, Grant};
pub use audit::{Auditor, Event, Kind};
pub use scopes::{Interaction, Scopes};
pub use smart::{ROOT_CLIENT, Smart, SmartConfig};
pub use token::{OAuthError, TokenAnswer, TokenStore};
