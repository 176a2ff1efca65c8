//! `OperationOutcome`: the shape of every error Sluice reports, over HTTP and in manifests.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Issue severity, as in the FHIR `IssueSeverity` value set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The operation could not complete.
    Fatal,
    /// The request or part of the work failed.
    Error,
    /// Something was ignored or degraded but the work went on.
    Warning,
    /// For information only.
    Information,
}

/// The subset of the FHIR `IssueType` codes Sluice uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IssueCode {
    /// Content is invalid (bad value, bad JSON, wrong shape).
    Invalid,
    /// A structural problem in the content.
    Structure,
    /// A required element is missing.
    Required,
    /// A value is not one the server accepts.
    Value,
    /// The request names something the server does not support.
    NotSupported,
    /// The referenced resource or export does not exist.
    NotFound,
    /// The resource was deleted.
    Deleted,
    /// The server is busy (for example an export is already running).
    Throttled,
    /// The request conflicts with the current state.
    Conflict,
    /// A resource limit was hit.
    TooCostly,
    /// Transient problem; retrying may succeed.
    Transient,
    /// An unexpected internal failure.
    Exception,
    /// Processing was stopped on purpose (cancellation).
    Incomplete,
    /// Information only.
    Informational,
    /// Security problem (forbidden content, signature mismatch).
    Security,
    /// The client is not authenticated.
    Login,
    /// The client is authenticated but not allowed to do this.
    Forbidden,
}

impl IssueCode {
    /// The FHIR code string, e.g. `not-supported`.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::NotSupported => "not-supported",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::Throttled => "throttled",
            IssueCode::Conflict => "conflict",
            IssueCode::TooCostly => "too-costly",
            IssueCode::Transient => "transient",
            IssueCode::Exception => "exception",
            IssueCode::Incomplete => "incomplete",
            IssueCode::Informational => "informational",
            IssueCode::Security => "security",
            IssueCode::Login => "login",
            IssueCode::Forbidden => "forbidden",
        }
    }
}

/// One `OperationOutcome.issue`: what went wrong, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// How bad it is.
    pub severity: Severity,
    /// The machine-readable category.
    pub code: IssueCode,
    /// The human-readable explanation; names the offending parameter or value.
    pub diagnostics: String,
    /// Where the problem is: a parameter name (`_since`) or an element path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

impl Issue {
    /// An `error` issue.
    pub fn error(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Issue { severity: Severity::Error, code, diagnostics: diagnostics.into(), expression: None }
    }

    /// A `warning` issue.
    pub fn warning(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Issue { severity: Severity::Warning, code, diagnostics: diagnostics.into(), expression: None }
    }

    /// An `information` issue with code `informational`.
    pub fn information(diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: Severity::Information,
            code: IssueCode::Informational,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    /// A `fatal` issue.
    pub fn fatal(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Issue { severity: Severity::Fatal, code, diagnostics: diagnostics.into(), expression: None }
    }

    /// Sets the `expression` (parameter name or path) the issue is about.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression = Some(expression.into());
        self
    }

    /// This issue as FHIR JSON (`OperationOutcome.issue[n]`).
    pub fn to_json(&self) -> Value {
        let sev = match self.severity {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        };
        let mut v = json!({
            "severity": sev,
            "code": self.code.as_str(),
            "diagnostics": self.diagnostics,
        });
        if let Some(e) = &self.expression {
            v["expression"] = json!([e]);
        }
        v
    }
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.expression {
            Some(e) => write!(f, "{} ({e})", self.diagnostics),
            None => f.write_str(&self.diagnostics),
        }
    }
}

impl std::error::Error for Issue {}

/// A whole `OperationOutcome`: one or more issues.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OperationOutcome {
    /// The issues, most important first.
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    /// An outcome with a single issue.
    pub fn single(issue: Issue) -> Self {
        OperationOutcome { issues: vec![issue] }
    }

    /// The outcome as FHIR JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "resourceType": "OperationOutcome",
            "issue": self.issues.iter().map(Issue::to_json).collect::<Vec<_>>(),
        })
    }
}

impl From<Issue> for OperationOutcome {
    fn from(issue: Issue) -> Self {
        OperationOutcome::single(issue)
    }
}

impl From<Vec<Issue>> for OperationOutcome {
    fn from(issues: Vec<Issue>) -> Self {
        OperationOutcome { issues }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fhir_json() {
        let oo = OperationOutcome::single(Issue::error(IssueCode::NotSupported, "unknown type Foo").at("_type"));
        let v = oo.to_json();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["severity"], "error");
        assert_eq!(v["issue"][0]["code"], "not-supported");
        assert_eq!(v["issue"][0]["diagnostics"], "unknown type Foo");
        assert_eq!(v["issue"][0]["expression"][0], "_type");
    }

    #[test]
    fn expression_is_omitted_when_absent() {
        let v = Issue::warning(IssueCode::Value, "x").to_json();
        assert!(v.get("expression").is_none());
        assert_eq!(v["severity"], "warning");
    }
}
