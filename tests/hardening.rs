//! Hardening (issue 14) against the real binary: slow connections are closed and cannot
//! lock honest clients out, large bodies cannot drive memory up, the 429 does not name
//! another client's export, requests HTTP itself refuses still get an OperationOutcome,
//! status answers are never cached, a bad base URL is refused at start, a foreign `Host`
//! is refused (DNS rebinding), and finished exports are deleted when their retention ends.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// An answer read off a raw connection.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as an OperationOutcome, checked: FHIR JSON, an issue with diagnostics.
    fn outcome(&self) -> Value {
        assert!(self.header("content-type").is_some_and(|c| c.starts_with("application/fhir+json")), "{}", self.head);
        let oo: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)));
        assert_eq!(oo["resourceType"], "OperationOutcome", "{oo}");
        assert!(oo["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.len() > 20), "{oo}");
        oo
    }
}

/// Sends `request` as bytes on a new connection and reads one answer (the connection may
/// then be closed by the server).
fn raw(addr: &str, request: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    // The server may answer and close before reading everything: a failed write is fine.
    let _ = s.write_all(request);
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if got.is_empty() => panic!("no answer: {e}"),
            Err(_) => break,
        }
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok());
            if let Some(len) = len
                && got.len() >= end + 4 + len
            {
                break;
            }
        }
    }
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole response head");
    let head = String::from_utf8_lossy(&got[..end]).to_string();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    Raw { status, head, body: got[end + 4..].to_vec() }
}

/// Whether the server closed `s` (EOF or reset) within a minute.
fn closed_by_server(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an error answer first, then the close
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn slow_connections_are_closed_and_do_not_lock_clients_out() {
    let srv = Server::empty(&["--header-timeout", "1", "--body-timeout", "1", "--max-connections", "8"]);
    let addr = srv.addr().to_string();
    // Stopped in the middle of the headers.
    let mut headers = TcpStream::connect(&addr).unwrap();
    headers.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").unwrap();
    // Short of the declared body.
    let mut body = TcpStream::connect(&addr).unwrap();
    body.write_all(b"POST /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{\"resourceType\":").unwrap();
    // Mid-chunk.
    let mut chunked = TcpStream::connect(&addr).unwrap();
    chunked
        .write_all(b"POST /fhir HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n{\"resourceType\"")
        .unwrap();
    // Idle keep-alive after a complete request.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    for (what, s) in [("slow headers", headers), ("short body", body), ("stalled chunk", chunked), ("idle", idle)] {
        assert!(closed_by_server(s), "{what}: the connection stayed open");
    }

    // More slow connections than the server serves at once: honest requests still get
    // through once the slow ones time out.
    let hogs: Vec<TcpStream> = (0..32)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
            s
        })
        .collect();
    for _ in 0..3 {
        let r = get(&srv.fhir("/metadata"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    drop(hogs);
}

#[test]
fn large_bodies_cannot_drive_memory_up() {
    let srv = Server::loaded(&[]);
    let addr = srv.addr().to_string();
    let body = vec![b'x'; 60 << 20];
    for path in ["/fhir/$export", "/fhir"] {
        let answers: Vec<Raw> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (addr, body) = (&addr, &body);
                    s.spawn(move || {
                        let mut req = format!(
                            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\n\
                             Prefer: respond-async\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        req.extend_from_slice(body);
                        raw(addr, &req)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a sender")).collect()
        });
        for a in &answers {
            // A kick-off body over 1 MiB: 413; a Bundle of 60 MB that is not JSON: 400.
            let want = if path == "/fhir" { 400 } else { 413 };
            assert_eq!(a.status, want, "{path}: {}", String::from_utf8_lossy(&a.body));
            a.outcome();
        }
    }
    let peak = srv.peak_rss_bytes();
    eprintln!("peak RSS: {} MB", peak >> 20);
    assert!(peak < 128 << 20, "peak RSS {} MB after sixteen 60 MB bodies", peak >> 20);
}

#[test]
fn the_busy_answer_names_no_export() {
    let srv = Server::loaded(&["--throttle-ms", "20", "--batch-bytes", "16384"]);
    let status = kickoff(&srv, &srv.fhir("/Patient/$export?_type=Observation"));
    let id = status.rsplit('/').next().unwrap().to_string();
    let busy = send("GET", &srv.fhir("/$export"), &[("prefer", "respond-async")], None);
    let oo = assert_outcome(&busy, 429, &["another export is running"]);
    assert!(!busy.text().contains(&id), "the 429 names the running export: {oo}");
    assert!(busy.header("retry-after").is_some());
    assert_eq!(busy.header("cache-control"), Some("no-store"));
    assert_eq!(delete(&status).status, 202);
}

#[test]
fn requests_refused_below_the_router_get_an_operation_outcome() {
    let srv = Server::empty(&[]);
    let addr = srv.addr().to_string();
    let long_url = format!("GET /fhir/metadata?x={} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "a".repeat(70 << 10));
    let big_header =
        format!("GET /fhir/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n", "b".repeat(200 << 10));
    let many_headers = format!(
        "GET /fhir/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n{}\r\n",
        (0..200).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("URL over 64 KiB", long_url.into_bytes(), 414),
        ("a 200 KiB header", big_header.into_bytes(), 431),
        ("200 headers", many_headers.into_bytes(), 431),
        ("a raw space in the URL", b"GET /fhir/meta data HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(), 400),
        (
            "conflicting Content-Length",
            b"POST /fhir HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello".to_vec(),
            400,
        ),
        (
            "a NUL byte in a header",
            b"GET /fhir/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\0b\r\n\r\n".to_vec(),
            400,
        ),
        ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(), 400),
    ];
    for (what, request, status) in cases {
        let r = raw(&addr, &request);
        assert_eq!(r.status, status, "{what}: {}", r.head);
        r.outcome();
    }
    // The server is still serving.
    assert_eq!(get(&srv.fhir("/metadata")).status, 200);
}

#[test]
fn status_answers_are_never_cached() {
    let srv = Server::loaded(&[]);
    let url = srv.fhir("/$export?_type=Patient");
    let r = send("GET", &url, &[("prefer", "respond-async")], None);
    assert_eq!(r.status, 202);
    assert_eq!(r.header("cache-control"), Some("no-store"), "kick-off");
    let status = r.header("content-location").expect("Content-Location").to_string();
    let done = poll_until_done(&status);
    assert_eq!(done.status, 200);
    assert_eq!(done.header("cache-control"), Some("no-store"), "manifest");
    assert!(done.header("expires").is_some());
    let bad = send("GET", &srv.fhir("/$export?_type=Nope"), &[("prefer", "respond-async")], None);
    assert_eq!((bad.status, bad.header("cache-control")), (400, Some("no-store")), "refused kick-off");
    let unknown = get(&srv.fhir("/$export-status/nope"));
    assert_eq!((unknown.status, unknown.header("cache-control")), (404, Some("no-store")), "unknown export");
}

#[test]
fn a_bad_base_url_is_refused_at_start() {
    let dir = empty_dir();
    for (bad, says) in [
        ("http://example.org\r\nX-Injected: 1", "printable ASCII"),
        ("http://exämple.org", "printable ASCII"),
        ("example.org/fhir", "absolute http"),
        ("ftp://example.org", "absolute http"),
        ("http://example.org/?a=1", "query"),
    ] {
        let out = sluice()
            .arg("serve")
            .args(store_args(dir.path()))
            .args(["--listen", "127.0.0.1:0", "--base-url", bad])
            .output()
            .expect("running sluice serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(stderr.contains("--base-url") && stderr.contains(says), "{bad:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{bad:?}: it started listening");
    }
}

#[test]
fn a_foreign_host_is_refused() {
    let srv = Server::empty(&[]);
    let evil = [("host", "rebind.evil.example")];
    let r = send("GET", &srv.fhir("/$export"), &[("host", "rebind.evil.example"), ("prefer", "respond-async")], None);
    assert_outcome(&r, 421, &["rebind.evil.example", "--allowed-hosts"]);
    assert_eq!(send("GET", &srv.fhir("/metadata"), &evil, None).status, 421);
    // Loopback names and the probes answer.
    assert_eq!(send("GET", &srv.fhir("/metadata"), &[("host", "localhost:1234")], None).status, 200);
    assert_eq!(send("GET", &format!("{}/healthz", srv.url), &evil, None).status, 200);

    let allowed = Server::empty(&["--allowed-hosts", "bulk.example.org,rebind.evil.example"]);
    assert_eq!(send("GET", &allowed.fhir("/metadata"), &evil, None).status, 200);
    assert_eq!(send("GET", &allowed.fhir("/metadata"), &[("host", "other.example")], None).status, 421);
}

#[test]
fn finished_exports_are_deleted_when_their_retention_ends() {
    let srv = Server::loaded(&["--export-retention", "1"]);
    let url = srv.fhir("/$export?_type=Patient");
    let status = kickoff(&srv, &url);
    let manifest = complete_manifest(&poll_until_done(&status), &url);
    let folder = srv.export_folder(&status).expect("the export's folder");
    assert!(folder.join("Patient.ndjson").is_file());
    let file = manifest["output"][0]["url"].as_str().expect("a file URL").to_string();
    // Gone within a minute: status 404, folder and files deleted.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = get(&status);
        if r.status == 404 {
            assert_outcome(&r, 404, &["no export"]);
            break;
        }
        assert!(Instant::now() < deadline, "the export outlived its retention: {}", r.status);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!folder.exists(), "its files are still on disk");
    assert_eq!(get(&file).status, 404);
    let metrics = Scrape::of(&srv.url, &[]);
    assert_eq!(metrics.value("sluice_exports_expired_total", &[]), 1.0);
}

#[test]
fn a_client_that_stops_reading_is_dropped() {
    // One connection at a time: the honest request below is served only once the server
    // has dropped the connection whose client stopped reading a 13 MB download.
    let srv = Server::loaded(&["--max-connections", "1", "--write-timeout", "1"]);
    let url = srv.fhir("/$export?_type=Observation");
    let manifest = export(&srv, &url);
    let link = manifest["output"][0]["url"].as_str().expect("a download URL").to_string();
    let path = link.strip_prefix(&srv.url).expect("a local download");
    let mut stalled = TcpStream::connect(srv.addr()).unwrap();
    stalled.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).unwrap();
    // Nothing is read from `stalled` until the honest request is answered.
    let r = get(&srv.fhir("/metadata"));
    assert_eq!(r.status, 200, "{}", r.text());
    drop(stalled);
}
