//! Turning SDK errors into [`StorageError`]s: transient ones become
//! [`StorageError::Unavailable`], and no message carries a SAS signature or token.

use azure_core::error::ErrorKind;
use azure_core::http::StatusCode;
use sluice_storage::StorageError;

/// Where an error happened, for its message.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    /// `azure://account/container`.
    pub location: String,
    pub account: String,
    pub container: String,
}

impl Place {
    /// A permanent failure.
    pub fn backend(&self, reason: impl Into<String>) -> StorageError {
        StorageError::Backend { location: self.location.clone(), reason: redact(&reason.into()) }
    }

    /// A transient failure.
    pub fn unavailable(&self, reason: impl Into<String>) -> StorageError {
        StorageError::Unavailable { location: self.location.clone(), reason: redact(&reason.into()) }
    }

    /// Maps an SDK error from the operation `op` (e.g. "put block") on `key`, if any.
    pub fn map(&self, op: &str, key: Option<&str>, error: azure_core::Error) -> StorageError {
        let what = match key {
            Some(key) => format!("{op} '{key}'"),
            None => op.to_string(),
        };
        match error.kind() {
            ErrorKind::HttpResponse { status, error_code, raw_response } => {
                let code = error_code.as_deref().unwrap_or("no error code");
                let detail = raw_response.as_ref().and_then(|r| service_message(r.body())).unwrap_or_default();
                let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
                let status_num = u16::from(*status);
                if error_code.as_deref() == Some("ContainerNotFound") {
                    return self.backend(format!(
                        "{what}: container '{}' does not exist in storage account '{}'",
                        self.container, self.account
                    ));
                }
                if *status == StatusCode::NotFound
                    && let Some(key) = key
                    && error_code.as_deref() == Some("BlobNotFound")
                {
                    return StorageError::NotFound(key.to_string());
                }
                let reason = match status_num {
                    401 | 403 => format!(
                        "{what}: access denied by storage account '{}' (HTTP {status_num}, {code}){detail}; \
                         check the account key, or the identity's role on container '{}'",
                        self.account, self.container
                    ),
                    _ => format!("{what}: HTTP {status_num} ({code}){detail}"),
                };
                if is_transient_status(status_num) { self.unavailable(reason) } else { self.backend(reason) }
            }
            ErrorKind::Io | ErrorKind::Connection => {
                self.unavailable(format!("{what}: cannot reach storage account '{}': {}", self.account, chain(&error)))
            }
            ErrorKind::Credential => {
                let reason = format!("{what}: cannot get an Entra ID token: {}", chain(&error));
                if caused_by_transient(&error) { self.unavailable(reason) } else { self.backend(reason) }
            }
            _ => self.backend(format!("{what}: {}", chain(&error))),
        }
    }
}

/// Timeouts, throttling and server errors are worth retrying.
fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// Whether any error in the chain is a connection problem or a transient HTTP status.
fn caused_by_transient(error: &azure_core::Error) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(azure) = e.downcast_ref::<azure_core::Error>() {
            match azure.kind() {
                ErrorKind::Io | ErrorKind::Connection => return true,
                ErrorKind::HttpResponse { status, .. } if is_transient_status(u16::from(*status)) => return true,
                _ => {}
            }
        }
        current = e.source();
    }
    false
}

/// The error and its sources, joined with ": ", without repeats.
fn chain(error: &azure_core::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        let text = e.to_string().trim().to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// The first line of `<Message>` in a storage error body.
fn service_message(body: &[u8]) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    let start = body.find("<Message>")? + "<Message>".len();
    let end = body[start..].find("</Message>")? + start;
    let line = body[start..end].lines().next()?.trim();
    (!line.is_empty()).then(|| line.chars().take(300).collect())
}

/// Removes SAS signatures and query strings from text that may contain URLs, and any
/// bearer token.
pub(crate) fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("http") {
        out.push_str(&rest[..pos]);
        let url_len = rest[pos..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>'))
            .unwrap_or(rest.len() - pos);
        let url = &rest[pos..pos + url_len];
        match url.find('?') {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?<redacted>");
            }
            None => out.push_str(url),
        }
        rest = &rest[pos + url_len..];
    }
    out.push_str(rest);
    // A signature or token outside a URL, e.g. in a quoted query string.
    for marker in ["sig=", "Bearer "] {
        while let Some(pos) = out.find(marker) {
            let start = pos + marker.len();
            let end = out[start..]
                .find(|c: char| c.is_whitespace() || matches!(c, '&' | ')' | '"' | '\''))
                .map_or(out.len(), |e| start + e);
            if out[start..end] == *"<redacted>" {
                break;
            }
            out.replace_range(start..end, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_signatures_and_queries() {
        let text = "error sending request for url (https://a.blob.core.windows.net/c/b?sv=2022&sig=abc%2B): timed out";
        let r = redact(text);
        assert_eq!(r, "error sending request for url (https://a.blob.core.windows.net/c/b?<redacted>): timed out");
        assert_eq!(redact("query sig=SECRET&se=x"), "query sig=<redacted>&se=x");
        assert_eq!(redact("Authorization: Bearer eyJ.abc"), "Authorization: Bearer <redacted>");
        assert_eq!(redact("plain http://h/p text"), "plain http://h/p text");
    }

    #[test]
    fn reads_service_message() {
        let body =
            b"<?xml version=\"1.0\"?><Error><Code>X</Code><Message>Server failed.\nRequestId:1</Message></Error>";
        assert_eq!(service_message(body).as_deref(), Some("Server failed."));
        assert_eq!(service_message(b"nope"), None);
    }

    #[test]
    fn transient_statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient_status(s));
        }
        for s in [400, 401, 403, 404, 409, 412] {
            assert!(!is_transient_status(s));
        }
    }

    #[test]
    fn io_errors_are_unavailable() {
        let place = Place { location: "azure://a/c".into(), account: "a".into(), container: "c".into() };
        let e = azure_core::Error::with_message(ErrorKind::Io, "connection reset");
        assert!(matches!(place.map("put blob", Some("k"), e), StorageError::Unavailable { .. }));
        let e = azure_core::Error::with_message(ErrorKind::Other, "bad");
        assert!(matches!(place.map("put blob", Some("k"), e), StorageError::Backend { .. }));
    }
}
