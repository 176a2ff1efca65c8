//! The authorization seam: the API asks an [`Authorize`] before every operation (D32).

use crate::scopes::{Interaction, Scopes};
use async_trait::async_trait;
use http::{HeaderMap, StatusCode};
use sluice_planner::Level;

/// What a request asks to do, as the API names it before running it. The
/// CapabilityStatement, the SMART discovery document, the token endpoint and signed download
/// URLs (whose signature is their authorization) are not asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// A `$export` kick-off at this level.
    Kickoff {
        /// System, patient or group level.
        level: &'a Level,
    },
    /// Reading the status or manifest of an export.
    Status {
        /// The export's id.
        export_id: &'a str,
    },
    /// Cancelling (or deleting) an export.
    Cancel {
        /// The export's id.
        export_id: &'a str,
    },
    /// Downloading a file of an export at an unsigned URL (`requiresAccessToken: true`).
    Download {
        /// The export's id.
        export_id: &'a str,
    },
    /// Reading a resource of this type through the REST API.
    Read {
        /// The resource type.
        resource_type: &'a str,
    },
    /// Creating, updating or deleting resources of this type (`Bundle` for a batch or
    /// transaction; the API then checks each entry's type against the [`Grant`]).
    Write {
        /// The resource type.
        resource_type: &'a str,
    },
    /// Reading, replacing or deleting a configuration resource (`AwsAccount`, ...,
    /// `Client`): it decides where exports go and who may ask, so it is an administrator's
    /// operation.
    Configure {
        /// The configuration resource type.
        resource_type: &'a str,
    },
    /// Reading the audit trail (`GET /AuditEvent`).
    Audit,
    /// Watching the server: `GET /metrics` and the status page (`/`, `/exports/<id>`,
    /// which show every client's exports).
    Monitor,
}

/// Who is asking, and what they may do: the answer of an [`Authorize`] that lets a request
/// go on. The API applies it where only it knows what a request touches (the types an
/// export covers, the entries of a Bundle, the owner of an export).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The client (the owner of the exports it starts); `None` when nobody is identified.
    pub client: Option<String>,
    /// An administrator: sees and cancels every export.
    pub admin: bool,
    /// The resource types and interactions permitted.
    pub scopes: Scopes,
}

impl Grant {
    /// Everything, for nobody in particular: what [`AllowAll`] grants.
    pub fn everything() -> Grant {
        Grant { client: None, admin: true, scopes: Scopes::all() }
    }

    /// The root client: everything, as `root`.
    pub fn root() -> Grant {
        Grant { client: Some(crate::ROOT_CLIENT.into()), admin: true, scopes: Scopes::all() }
    }

    /// Whether `interaction` on `resource_type` is permitted.
    pub fn allows(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.scopes.allows(resource_type, interaction)
    }

    /// Whether this caller may see an export owned by `owner` (`None`: started without
    /// authorization, visible to all).
    pub fn owns(&self, owner: Option<&str>) -> bool {
        match owner {
            None => true,
            Some(o) => self.admin || self.client.as_deref() == Some(o),
        }
    }
}

/// Why a request was refused; answered as an OperationOutcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// 401 (who is asking is unknown) or 403 (not allowed).
    pub status: StatusCode,
    /// What the client can do about it (never a secret).
    pub message: String,
    /// The `WWW-Authenticate` challenge of a 401 (`Bearer` when unset).
    pub challenge: Option<String>,
    /// The caller, when it was identified before being refused (for the audit trail).
    pub client: Option<String>,
}

impl Denied {
    /// 401: the request did not say who is asking, or not credibly.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Denied { status: StatusCode::UNAUTHORIZED, message: message.into(), challenge: None, client: None }
    }

    /// 401 for a bearer token that was presented but is not valid (RFC 6750
    /// `invalid_token`).
    pub fn invalid_token(message: impl Into<String>) -> Self {
        let message = message.into();
        let challenge = format!("Bearer error=\"invalid_token\", error_description=\"{}\"", message.replace('"', "'"));
        Denied { status: StatusCode::UNAUTHORIZED, message, challenge: Some(challenge), client: None }
    }

    /// 403: the caller is known but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Denied { status: StatusCode::FORBIDDEN, message: message.into(), challenge: None, client: None }
    }

    /// Names the caller that was refused (known, but not allowed).
    pub fn of(mut self, client: Option<String>) -> Self {
        self.client = client;
        self
    }

    /// The `WWW-Authenticate` value a 401 carries.
    pub fn challenge(&self) -> &str {
        self.challenge.as_deref().unwrap_or("Bearer")
    }
}

/// Decides whether a request may do what it asks. Implemented by the host (the `sluice`
/// binary's SMART Backend Services, [`crate::Smart`]; a host's own scheme); [`AllowAll`]
/// allows everything.
#[async_trait]
pub trait Authorize: Send + Sync {
    /// `Ok` lets the request go on, with what the caller may do; `Err` answers it with the
    /// [`Denied`] status.
    async fn authorize(&self, access: &Access<'_>, headers: &HeaderMap) -> Result<Grant, Denied>;
}

/// Allows every request: for servers that listen on loopback only, or behind a gateway
/// that authorizes.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

#[async_trait]
impl Authorize for AllowAll {
    async fn authorize(&self, _access: &Access<'_>, _headers: &HeaderMap) -> Result<Grant, Denied> {
        Ok(Grant::everything())
    }
}
