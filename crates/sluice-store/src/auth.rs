//! What authorization keeps in the store (D36): the client assertions already used, so that
//! a replayed `jti` is refused by every server sharing the database, and the audit trail
//! (FHIR `AuditEvent`s, D23), kept apart from FHIR data and never exported.

use crate::StoreError;
use async_trait::async_trait;
use time::OffsetDateTime;

/// One recorded audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// The event's id (the `AuditEvent.id`).
    pub id: String,
    /// When it was recorded (the `AuditEvent.recorded`).
    pub recorded: OffsetDateTime,
    /// Who acted: the client id, `root`, or `None` when unknown.
    pub agent: Option<String>,
    /// The `AuditEvent` as JSON text, returned exactly as appended.
    pub json: String,
}

/// Which audit events to return: all conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Recorded at or after this time (`date=ge...`).
    pub since: Option<OffsetDateTime>,
    /// Recorded strictly before this time (`date=lt...`).
    pub before: Option<OffsetDateTime>,
    /// Recorded by this agent (`agent=...`).
    pub agent: Option<String>,
    /// At most this many (the oldest first); 0 means none.
    pub limit: usize,
}

/// The authorization records of a store.
#[async_trait]
pub trait AuthRepo: Send + Sync {
    /// Remembers the assertion `key` (client id and `jti`) until `expires`. Returns `false`
    /// when the key is already remembered and has not expired: the assertion is a replay.
    /// Atomic across servers sharing the database; expired keys may be purged.
    async fn remember_assertion(&self, key: &str, expires: OffsetDateTime) -> Result<bool, StoreError>;

    /// Appends an audit event.
    async fn audit_append(&self, record: &AuditRecord) -> Result<(), StoreError>;

    /// The events matching `query`, oldest first (by `recorded`, then id).
    async fn audit_query(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;
}
