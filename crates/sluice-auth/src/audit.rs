//! The audit trail (D23): FHIR `AuditEvent`s for kick-offs, completions, failures,
//! downloads, cancellations, tokens and configuration changes, kept in the store (never
//! exported) and logged as one JSON line each. Secrets and tokens never go in.

use serde_json::{Value, json};
use sluice_jobs::{JobObserver, JobRecord, JobStatus};
use sluice_store::{AuditRecord, AuthRepo};
use std::sync::Arc;
use time::OffsetDateTime;

/// DICOM "Export" (exports and their files).
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
/// What the subtypes of Sluice's own events are named in.
const SUBTYPES: &str = "https://sluice.invalid/fhir/CodeSystem/audit-subtype";

/// What kind of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A kick-off, accepted or refused (DICOM 110106 Export, action `E`).
    Kickoff,
    /// An export completed (110106, `E`).
    Completed,
    /// An export failed (110106, `E`).
    Failed,
    /// A file of an export was downloaded (110106, `R`).
    Download,
    /// An export was cancelled (110106, `D`).
    Cancel,
    /// A token was issued or refused (DICOM 110114 User Authentication, `E`).
    Token,
    /// A configuration or `Client` resource was created or replaced (`rest` update, `U`).
    ConfigPut,
    /// A configuration or `Client` resource was deleted (`rest` delete, `D`).
    ConfigDelete,
}

impl Kind {
    fn parts(self) -> (Value, &'static str, &'static str) {
        let export = json!({"system": DCM, "code": "110106", "display": "Export"});
        let rest = json!({"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"});
        match self {
            Kind::Kickoff => (export, "E", "kickoff"),
            Kind::Completed => (export, "E", "complete"),
            Kind::Failed => (export, "E", "fail"),
            Kind::Download => (export, "R", "download"),
            Kind::Cancel => (export, "D", "cancel"),
            Kind::Token => (json!({"system": DCM, "code": "110114", "display": "User Authentication"}), "E", "token"),
            Kind::ConfigPut => (rest, "U", "update"),
            Kind::ConfigDelete => (rest, "D", "delete"),
        }
    }
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened.
    pub kind: Kind,
    /// Who acted (a client id, `root`), if known.
    pub agent: Option<String>,
    /// Whether it succeeded; the HTTP status when refused.
    pub outcome: Result<(), u16>,
    /// What it concerned: an export id or a file key (an identifier), or a resource
    /// (`Client/x`, a reference).
    pub entity: Option<(bool, String)>,
    /// A sentence for a person (the refusal's reason, the request URL).
    pub detail: String,
}

impl Event {
    /// An event of `kind` by `agent`, a success unless [`Event::refused`] says otherwise.
    pub fn new(kind: Kind, agent: Option<&str>) -> Self {
        Event { kind, agent: agent.map(str::to_string), outcome: Ok(()), entity: None, detail: String::new() }
    }

    /// Concerning `entity` (an export id, a file key).
    pub fn entity(mut self, entity: impl Into<String>) -> Self {
        self.entity = Some((false, entity.into()));
        self
    }

    /// Concerning the resource `reference` (`Client/x`).
    pub fn reference(mut self, reference: impl Into<String>) -> Self {
        self.entity = Some((true, reference.into()));
        self
    }

    /// With a sentence for a person.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Refused (or failed) with HTTP status `status`.
    pub fn refused(mut self, status: u16) -> Self {
        self.outcome = Err(status);
        self
    }

    /// The `AuditEvent` resource.
    pub fn to_resource(&self, id: &str, recorded: OffsetDateTime) -> Value {
        let (ty, action, subtype) = self.kind.parts();
        let (outcome, desc) = match self.outcome {
            Ok(()) => ("0", self.detail.clone()),
            Err(s) if s >= 500 => ("8", format!("{s}: {}", self.detail)),
            Err(s) => ("4", format!("{s}: {}", self.detail)),
        };
        let who = match &self.agent {
            Some(a) => {
                json!({"identifier": {"system": "https://sluice.invalid/fhir/client", "value": a}, "display": a})
            }
            None => json!({"display": "anonymous"}),
        };
        let mut ev = json!({
            "resourceType": "AuditEvent",
            "id": id,
            "type": ty,
            "subtype": [{"system": SUBTYPES, "code": subtype}],
            "action": action,
            "recorded": sluice_fhir::instant::format(recorded),
            "outcome": outcome,
            "agent": [{"who": who, "requestor": true}],
            "source": {"observer": {"display": "sluice"}},
        });
        if !desc.is_empty() {
            ev["outcomeDesc"] = json!(desc);
        }
        if let Some((is_ref, e)) = &self.entity {
            let what = if *is_ref { json!({"reference": e}) } else { json!({"identifier": {"value": e}}) };
            ev["entity"] = json!([{"what": what}]);
        }
        ev
    }
}

/// Records audit events when `BOX_SECURITY_AUDIT_LOG_ENABLED=true`; does nothing otherwise.
#[derive(Clone, Default)]
pub struct Auditor {
    repo: Option<Arc<dyn AuthRepo>>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").field("enabled", &self.enabled()).finish()
    }
}

impl Auditor {
    /// Records nothing.
    pub fn disabled() -> Self {
        Auditor { repo: None }
    }

    /// Records into `repo` (and the log).
    pub fn new(repo: Arc<dyn AuthRepo>) -> Self {
        Auditor { repo: Some(repo) }
    }

    /// Whether events are recorded.
    pub fn enabled(&self) -> bool {
        self.repo.is_some()
    }

    /// Records `event`: logged as one JSON line (target `sluice::audit`) and stored. A
    /// failure to store is logged, not returned: the request it audits has happened.
    pub async fn record(&self, event: Event) {
        let Some(repo) = &self.repo else { return };
        let now = OffsetDateTime::now_utc();
        let id = uuid::Uuid::new_v4().to_string();
        let json = event.to_resource(&id, now).to_string();
        tracing::info!(target: "sluice::audit", "{json}");
        let record = AuditRecord { id, recorded: now, agent: event.agent.clone(), json };
        if let Err(e) = repo.audit_append(&record).await {
            tracing::error!(error = %e, "recording an audit event failed");
        }
    }
}

#[async_trait::async_trait]
impl JobObserver for Auditor {
    async fn finished(&self, job: &JobRecord) {
        let kind = match job.status {
            JobStatus::Completed => Kind::Completed,
            JobStatus::Failed => Kind::Failed,
            _ => return,
        };
        if !self.enabled() {
            return;
        }
        let mut event = Event::new(kind, job.owner.as_deref()).entity(job.id.clone()).detail(job.request_url.clone());
        if kind == Kind::Failed {
            let why = job.outcome.as_ref().and_then(|o| o.issues.first()).map(|i| i.diagnostics.clone());
            event = event.refused(500).detail(why.unwrap_or_default());
        }
        self.record(event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_audit_event_resources() {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let ev =
            Event::new(Kind::Kickoff, Some("bulk")).entity("e1").detail("http://x/fhir/$export").to_resource("a1", at);
        assert_eq!(ev["type"]["code"], "110106");
        assert_eq!(ev["action"], "E");
        assert_eq!(ev["outcome"], "0");
        assert_eq!(ev["agent"][0]["who"]["identifier"]["value"], "bulk");
        assert_eq!(ev["entity"][0]["what"]["identifier"]["value"], "e1");
        let ev =
            Event::new(Kind::ConfigPut, None).reference("Client/bulk").refused(403).detail("no").to_resource("a2", at);
        assert_eq!((ev["type"]["code"].as_str(), ev["outcome"].as_str()), (Some("rest"), Some("4")));
        assert_eq!(ev["entity"][0]["what"]["reference"], "Client/bulk");
        assert_eq!(ev["outcomeDesc"], "403: no");
    }
}
