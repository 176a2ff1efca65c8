//! What can go wrong, by class (each class is one exit code of `sluice export`).

/// The class of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server refused the kick-off (4xx/5xx, usually with an OperationOutcome).
    KickoffRefused,
    /// The export failed on the server (its status answered 4xx/5xx).
    ExportFailed,
    /// A file could not be downloaded or did not verify, after every retry.
    Download,
    /// Authorization failed (discovery, the token request, or a 401/403).
    Auth,
    /// Bad input from the caller (a key file, a URL, the state file).
    Usage,
    /// Anything else: local I/O, the network, answers that break the protocol.
    Other,
}

/// An error of the bulk client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kick-off was refused.
    #[error("kick-off refused (HTTP {status}): {message}")]
    KickoffRefused {
        /// The HTTP status.
        status: u16,
        /// The OperationOutcome's diagnostics, or the body.
        message: String,
    },
    /// The export failed on the server.
    #[error("the export failed on the server (HTTP {status}): {message}")]
    ExportFailed {
        /// The HTTP status of the status request.
        status: u16,
        /// The OperationOutcome's diagnostics, or the body.
        message: String,
    },
    /// A file failed to download or verify after every retry.
    #[error("downloading {file} failed: {message}")]
    Download {
        /// The file's name in the output folder.
        file: String,
        /// The last problem.
        message: String,
    },
    /// Authorization failed.
    #[error("authorization failed: {0}")]
    Auth(String),
    /// Bad input.
    #[error("{0}")]
    Usage(String),
    /// A network problem or an answer the protocol does not allow.
    #[error("{0}")]
    Protocol(String),
    /// Local I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Error {
    /// The error's class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::KickoffRefused { .. } => ErrorKind::KickoffRefused,
            Error::ExportFailed { .. } => ErrorKind::ExportFailed,
            Error::Download { .. } => ErrorKind::Download,
            Error::Auth(_) => ErrorKind::Auth,
            Error::Usage(_) => ErrorKind::Usage,
            Error::Protocol(_) | Error::Io { .. } => ErrorKind::Other,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// The diagnostics of an OperationOutcome body, or the body itself (shortened).
pub(crate) fn describe_body(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(issues) = v.get("issue").and_then(serde_json::Value::as_array) {
            let texts: Vec<String> = issues
                .iter()
                .map(|i| {
                    let text = i.get("diagnostics").and_then(serde_json::Value::as_str);
                    let text = text.or_else(|| i.pointer("/details/text").and_then(serde_json::Value::as_str));
                    let code = i.get("code").and_then(serde_json::Value::as_str).unwrap_or("unknown");
                    match text {
                        Some(t) => format!("{t} ({code})"),
                        None => code.to_string(),
                    }
                })
                .collect();
            if !texts.is_empty() {
                return texts.join("; ");
            }
        }
        if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
            let d = v.get("error_description").and_then(serde_json::Value::as_str).unwrap_or_default();
            return format!("{e}: {d}");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "no details given".to_string();
    }
    text.chars().take(500).collect()
}
