//! The `Host` check (DNS rebinding): only the base URL's host, the loopback names and the
//! hosts allowed with [`Api::allowed_hosts`](crate::Api::allowed_hosts) are answered.

use crate::outcome::ApiError;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sluice_fhir::{Issue, IssueCode};
use std::sync::Arc;

/// Host names a request may name (lowercase, without port).
pub(crate) struct AllowedHosts {
    names: Vec<String>,
    any: bool,
}

/// Loopback names, always answered.
const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

impl AllowedHosts {
    /// The base URL's host, the loopback names and `extra` (`*`: any host).
    pub(crate) fn new(base_url: &str, extra: Vec<String>) -> Self {
        let any = extra.iter().any(|h| h == "*");
        let mut names: Vec<String> = LOOPBACK.iter().map(|h| h.to_string()).chain(extra).collect();
        if let Some(host) = base_url.parse::<axum::http::Uri>().ok().and_then(|u| u.host().map(str::to_ascii_lowercase))
        {
            names.push(host);
        }
        AllowedHosts { names, any }
    }

    /// Whether `host` (a `Host` header: name, optional port) is one of them.
    fn allows(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let host = host.trim().to_ascii_lowercase();
        // `[v6]:port`, `name:port`, or a bare name.
        let name = match host.rsplit_once(':') {
            Some((name, port))
                if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') =>
            {
                name
            }
            _ => host.as_str(),
        };
        let name = name.trim_end_matches('.');
        self.names.iter().any(|n| n == name)
    }
}

/// Refuses a request whose `Host` names another server (421 with an OperationOutcome).
/// The health probes answer any host (orchestrators call them by address); a request
/// without `Host` (HTTP/1.0) is answered.
pub(crate) async fn check(State(hosts): State<Arc<AllowedHosts>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(req).await;
    }
    let host = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("\u{fffd}"));
    match host {
        Some(h) if !hosts.allows(h) => {
            let shown: String = h.chars().take(100).collect();
            ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                Issue::error(
                    IssueCode::Security,
                    format!(
                        "this server does not answer for the host '{shown}' (Host header); it answers for its \
                         base URL's host and loopback names, and for hosts added with --allowed-hosts"
                    ),
                ),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_matched_by_name_whatever_the_port() {
        let h = AllowedHosts::new("https://bulk.example.org/base", vec!["alias.example".into()]);
        for ok in
            ["bulk.example.org", "BULK.example.org:443", "localhost:8080", "127.0.0.1", "[::1]:80", "alias.example"]
        {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in ["rebind.evil.example", "evil.example:8080", "127.0.0.2", "bulk.example.org.evil", "", "[::2]:80"] {
            assert!(!h.allows(bad), "{bad}");
        }
        assert!(AllowedHosts::new("http://x", vec!["*".into()]).allows("anything"));
    }
}
