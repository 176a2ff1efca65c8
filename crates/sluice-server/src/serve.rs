//! Serving the router over TCP with the limits a public port needs: a cap on connections,
//! timeouts for slow headers, stalled request bodies and stalled responses, and an
//! OperationOutcome (not an empty body) for the requests HTTP itself refuses before the
//! router sees them (a URI or headers too large, a malformed request).
//!
//! ```no_run
//! # async fn host(router: axum::Router) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! sluice_server::serve::serve(listener, router, sluice_server::serve::Limits::default(), std::future::pending()).await
//! # }
//! ```

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

/// The largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 96 << 10;
/// The most a connection buffers while reading.
const MAX_BUFFER: usize = 128 << 10;

/// Connection limits and timeouts. The defaults leave a slow but honest client alone.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time for a request's headers to arrive, and for the next request on an idle
    /// keep-alive connection to start.
    pub header_timeout: Duration,
    /// Longest pause between two pieces of a request body.
    pub body_timeout: Duration,
    /// Longest time a response write may make no progress (a client that stopped reading).
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(120),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting and waits
/// for the connections in flight to finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        // A request line and headers of at most 96 KiB (431 above; a URI over 64 KiB is 414
        // before that), read into a buffer of at most 128 KiB per connection.
        .max_header_size(MAX_HEAD)
        .max_buf_size(MAX_BUFFER);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(Guarded::new(stream, limits.write_timeout));
        let (router, body_timeout) = (router.clone(), limits.body_timeout);
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            // A body that stops arriving for the body timeout fails its reader (413/400
            // OperationOutcome), and the connection ends.
            let req = req.map(|body| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(body_timeout, body)));
            router.clone().oneshot(req)
        });
        let conn = graceful.watch(builder.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A connection's socket, with a timeout on writes that make no progress, and the bare
/// error responses HTTP answers on its own (`content-length: 0`) turned into
/// OperationOutcomes.
struct Guarded<S> {
    inner: S,
    write_timeout: Duration,
    /// Armed while a write is pending; reset by progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A replacement response being written, and how much of it is written.
    replacing: Option<(Vec<u8>, usize)>,
}

impl<S> Guarded<S> {
    fn new(inner: S, write_timeout: Duration) -> Self {
        Guarded { inner, write_timeout, stalled: None, replacing: None }
    }

    /// Before reporting a pending write: errors once the write made no progress for the
    /// write timeout.
    fn check_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let timeout = self.write_timeout;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading the response")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacing.is_none()
            && let Some(outcome) = bare_error_response(buf)
        {
            this.replacing = Some((outcome, 0));
        }
        if let Some((outcome, written)) = &mut this.replacing {
            // Hyper offers its own response again until it is reported written: write ours.
            while *written < outcome.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &outcome[*written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => *written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return this.check_stall(cx),
                }
            }
            this.stalled = None;
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.check_stall(cx),
            ready => {
                this.stalled = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // A bare error response is a head alone: check the first non-empty slice.
        let first = bufs.iter().find(|b| !b.is_empty());
        if this.replacing.is_some() || first.is_some_and(|b| bare_error_response(b).is_some()) {
            let total = bufs.iter().map(|b| b.len()).sum::<usize>();
            let head: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            return match ready!(Pin::new(this).poll_write(cx, &head)) {
                Ok(_) => Poll::Ready(Ok(total)),
                Err(e) => Poll::Ready(Err(e)),
            };
        }
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.check_stall(cx),
            ready => {
                this.stalled = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// If `buf` is a whole response head with a 4xx/5xx status and `content-length: 0`, the
/// response HTTP sends by itself when it cannot parse a request (the router's errors always
/// carry an OperationOutcome), the same response with an OperationOutcome that says why.
fn bare_error_response(buf: &[u8]) -> Option<Vec<u8>> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ").or_else(|| buf.strip_prefix(b"HTTP/1.0 "))?;
    let code = std::str::from_utf8(rest.get(..3)?).ok()?.parse::<u16>().ok()?;
    if !(400..600).contains(&code) || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    if !head.to_ascii_lowercase().contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let (issue_code, why) = match code {
        414 => (
            "too-long",
            "the request URI is too long for this server (at most 64 KiB); send the parameters in a POST body",
        ),
        431 => ("too-long", "the request's headers are too large or too many for this server"),
        505 => ("not-supported", "this server speaks HTTP/1.1 (and 1.0) only"),
        400 => (
            "structure",
            "the request is not valid HTTP/1.1 (a malformed request line or header, a conflicting \
             Content-Length, or a byte not allowed there); it was not processed",
        ),
        _ => ("exception", "the request could not be processed"),
    };
    let reason = head.lines().next()?.splitn(3, ' ').nth(2).unwrap_or("Error").to_string();
    let body = serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": issue_code, "diagnostics": why}],
    })
    .to_string();
    let date = head
        .split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with("date:"))
        .map(|l| format!("{l}\r\n"))
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n{date}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_errors_become_operation_outcomes_and_nothing_else_changes() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Sun, 06 Dec 2026 16:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(bare_error_response(bare).expect("replaced")).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{head}");
        assert!(head.contains("content-type: application/fhir+json"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        assert!(head.contains("date: Sun, 06 Dec 2026 16:00:00 GMT"), "{head}");
        let oo: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(oo["issue"][0]["code"], "too-long");
        for keep in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 120\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{\"x\":1}",
            b"{\"resourceType\":\"Patient\"}\n",
        ] {
            assert!(bare_error_response(keep).is_none(), "{}", String::from_utf8_lossy(keep));
        }
    }
}
