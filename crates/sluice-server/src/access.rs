//! The authorization seam: the API asks an [`Authorize`] before every operation (D32).

use async_trait::async_trait;
use axum::http::{HeaderMap, StatusCode};
use sluice_planner::Level;

/// What a request asks to do, as the API names it before running it. The
/// CapabilityStatement (`/fhir/metadata`) and signed download URLs (`/files`, whose
/// signature is their authorization) are not asked about.
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
    /// Reading a resource of this type through the REST API.
    Read {
        /// The resource type.
        resource_type: &'a str,
    },
    /// Creating, updating or deleting resources of this type (`Bundle` for a batch or
    /// transaction, whatever it holds).
    Write {
        /// The resource type.
        resource_type: &'a str,
    },
    /// Reading, replacing or deleting a configuration resource (`AwsAccount`, ...): it
    /// decides where exports go, so it is an administrator's operation.
    Configure {
        /// The configuration resource type.
        resource_type: &'a str,
    },
}

/// Why a request was refused; answered as an OperationOutcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// 401 (who is asking is unknown) or 403 (not allowed).
    pub status: StatusCode,
    /// What the client can do about it (never a secret).
    pub message: String,
}

impl Denied {
    /// 401: the request did not say who is asking, or not credibly.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Denied { status: StatusCode::UNAUTHORIZED, message: message.into() }
    }

    /// 403: the caller is known but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Denied { status: StatusCode::FORBIDDEN, message: message.into() }
    }
}

/// Decides whether a request may do what it asks. Implemented by the host (the `sluice`
/// binary's SMART Backend Services, a host's own scheme); [`AllowAll`] allows everything.
#[async_trait]
pub trait Authorize: Send + Sync {
    /// `Ok` lets the request go on; `Err` answers it with the [`Denied`] status.
    async fn authorize(&self, access: &Access<'_>, headers: &HeaderMap) -> Result<(), Denied>;
}

/// Allows every request: for servers that listen on loopback only, or behind a gateway
/// that authorizes.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

#[async_trait]
impl Authorize for AllowAll {
    async fn authorize(&self, _access: &Access<'_>, _headers: &HeaderMap) -> Result<(), Denied> {
        Ok(())
    }
}
