//! The client: kick-off, polling, manifest pages, parallel downloads, cancellation.

use crate::auth::SmartAuth;
use crate::download::{Done, Job};
use crate::error::{Error, describe_body};
use crate::kickoff::ExportRequest;
use crate::manifest::{Merged, next_link};
use crate::progress::{Event, Reporter, ServerProgress};
use crate::state::SinceLast;
use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::header::{ACCEPT, CONTENT_LOCATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How the client behaves.
#[derive(Debug)]
pub struct ClientOptions {
    /// Files downloaded at once (at least 1).
    pub parallel: usize,
    /// Retries of a failed download (and of failed status requests) before giving up.
    pub retries: usize,
    /// SMART Backend Services, when the server needs a bearer token.
    pub auth: Option<SmartAuth>,
    /// Seconds to wait for a connection.
    pub connect_timeout: Duration,
    /// Seconds a response may stay silent before the request is abandoned (and retried).
    pub read_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            parallel: 4,
            retries: 5,
            auth: None,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
        }
    }
}

/// Where an export's files go in the output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Straight into the folder.
    Flat,
    /// Into a subfolder named after the export's `transactionTime` (`20261126T182115809Z`):
    /// the runs of a `--since-last` chain never overwrite each other.
    PerExport,
}

/// The outcome of a completed export.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The manifest's `transactionTime`.
    pub transaction_time: String,
    /// The manifest's `request`.
    pub request: String,
    /// The folder holding the files and `manifest.json`.
    pub folder: PathBuf,
    /// Output files.
    pub files: usize,
    /// Error files (OperationOutcomes), under `error/`.
    pub error_files: usize,
    /// Files of deleted resources, under `deleted/`.
    pub deleted_files: usize,
    /// Resources in the output files.
    pub resources: u64,
    /// Bytes of every file.
    pub bytes: u64,
    /// Files that were already complete on disk (a resumed run).
    pub skipped: usize,
}

/// HTTP with the bearer token when there is one.
pub(crate) struct Http {
    client: reqwest::Client,
    base: String,
    auth: Option<SmartAuth>,
}

impl Http {
    /// Sends the request `build` makes, with the bearer token if `with_token` and SMART is
    /// configured; a 401 gets a fresh token and one more try.
    pub async fn send(
        &self,
        with_token: bool,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, Error> {
        let auth = self.auth.as_ref().filter(|_| with_token);
        let mut fresh = false;
        loop {
            let mut rb = build(&self.client);
            if let Some(a) = auth {
                rb = rb.bearer_auth(a.bearer(&self.client, &self.base).await?);
            }
            let r = rb.send().await.map_err(|e| Error::Protocol(chain(&e)))?;
            if r.status() == StatusCode::UNAUTHORIZED
                && let Some(a) = auth
                && !fresh
            {
                a.invalidate().await;
                fresh = true;
                continue;
            }
            return Ok(r);
        }
    }
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `Retry-After` as a wait: delay-seconds or an HTTP date; at most an hour.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(v, format).ok()?.assume_utc();
    let secs = (at - time::OffsetDateTime::now_utc()).whole_seconds().clamp(0, 3600);
    Some(Duration::from_secs(secs as u64))
}

/// A Bulk Data client for one FHIR server.
pub struct BulkClient {
    http: Arc<Http>,
    parallel: usize,
    retries: usize,
}

impl BulkClient {
    /// A client for the FHIR base URL `base` (e.g. `http://localhost:8080/fhir`).
    pub fn new(base: &str, options: ClientOptions) -> Result<BulkClient, Error> {
        reqwest::Url::parse(base).map_err(|e| Error::Usage(format!("'{base}' is not a URL: {e}")))?;
        let client = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .user_agent(concat!("sluice-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Protocol(format!("starting the HTTP client: {}", chain(&e))))?;
        Ok(BulkClient {
            http: Arc::new(Http { client, base: base.trim_end_matches('/').to_string(), auth: options.auth }),
            parallel: options.parallel.max(1),
            retries: options.retries,
        })
    }

    /// The FHIR base URL.
    pub fn base(&self) -> &str {
        &self.http.base
    }

    /// Kicks off an export; returns its status URL. A 429 or 503 with `Retry-After` (the
    /// server is busy) is waited out a few times.
    pub async fn kickoff(&self, req: &ExportRequest, reporter: &dyn Reporter) -> Result<String, Error> {
        let endpoint = req.endpoint(&self.http.base);
        let get_url = req.get_url(&self.http.base);
        let body = req.parameters().to_string();
        let mut busy = 0;
        loop {
            let r = self
                .http
                .send(true, |c| {
                    let rb = if req.post {
                        c.post(&endpoint).header(CONTENT_TYPE, "application/fhir+json").body(body.clone())
                    } else {
                        c.get(&get_url)
                    };
                    rb.header(ACCEPT, "application/fhir+json").header("prefer", "respond-async")
                })
                .await?;
            let status = r.status();
            if status == StatusCode::ACCEPTED {
                let loc = r
                    .headers()
                    .get(CONTENT_LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| Error::Protocol("the kick-off answered 202 without Content-Location".into()))?;
                let base = reqwest::Url::parse(&endpoint).map_err(|e| Error::Protocol(e.to_string()))?;
                let url = base.join(loc).map_err(|e| Error::Protocol(format!("Content-Location '{loc}': {e}")))?;
                let url = url.to_string();
                reporter.event(Event::KickedOff { status_url: url.clone() });
                return Ok(url);
            }
            let wait = retry_after(r.headers());
            let body = r.bytes().await.unwrap_or_default();
            match (status, wait) {
                (StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE, Some(wait)) if busy < 10 => {
                    busy += 1;
                    reporter.event(Event::Waiting { wait, throttled: true });
                    tokio::time::sleep(wait.max(Duration::from_millis(200))).await;
                }
                (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => {
                    return Err(Error::Auth(format!("the kick-off answered {status}: {}", describe_body(&body))));
                }
                _ => return Err(Error::KickoffRefused { status: status.as_u16(), message: describe_body(&body) }),
            }
        }
    }

    /// Cancels an export (or deletes a finished one and its files): `DELETE` its status URL.
    pub async fn cancel(&self, status_url: &str) -> Result<(), Error> {
        let r = self.http.send(true, |c| c.delete(status_url).header(ACCEPT, "application/fhir+json")).await?;
        let status = r.status();
        if status.is_success() {
            return Ok(());
        }
        let body = r.bytes().await.unwrap_or_default();
        Err(Error::Protocol(format!("DELETE {status_url} answered {status}: {}", describe_body(&body))))
    }

    /// Runs a whole export into `out`: kick-off, polling, every file downloaded and verified,
    /// `manifest.json`. With `since_last`, `_since` is the `transactionTime` of this source's
    /// last complete export recorded in `out` (none the first time), the files go into a
    /// subfolder per export ([`Layout::PerExport`]), and the new `transactionTime` is
    /// recorded once everything is downloaded.
    pub async fn export(
        &self,
        mut req: ExportRequest,
        out: &Path,
        since_last: bool,
        reporter: Arc<dyn Reporter>,
    ) -> Result<Summary, Error> {
        tokio::fs::create_dir_all(out).await.map_err(Error::io(format!("creating {}", out.display())))?;
        let source = SinceLast::source_of(&req.endpoint(&self.http.base));
        let mut state = None;
        if since_last {
            let s = SinceLast::load(out)?;
            if let Some(t) = s.last(&source) {
                req.since = Some(t);
            }
            state = Some(s);
        }
        let status_url = self.kickoff(&req, reporter.as_ref()).await?;
        let layout = if since_last { Layout::PerExport } else { Layout::Flat };
        let summary = self.collect(&status_url, out, layout, reporter).await?;
        if let Some(mut s) = state {
            s.record(&source, &summary.transaction_time, &summary.request)?;
        }
        Ok(summary)
    }

    /// Picks up an export already kicked off (its status URL) and finishes it as
    /// [`BulkClient::export`] does: files already complete on disk are kept, `.part` files
    /// are resumed. With `since_last`, the source recorded is the manifest's `request`
    /// without its query.
    pub async fn resume(
        &self,
        status_url: &str,
        out: &Path,
        since_last: bool,
        reporter: Arc<dyn Reporter>,
    ) -> Result<Summary, Error> {
        tokio::fs::create_dir_all(out).await.map_err(Error::io(format!("creating {}", out.display())))?;
        let state = if since_last { Some(SinceLast::load(out)?) } else { None };
        reporter.event(Event::KickedOff { status_url: status_url.to_string() });
        let layout = if since_last { Layout::PerExport } else { Layout::Flat };
        let summary = self.collect(status_url, out, layout, reporter).await?;
        if let Some(mut s) = state {
            s.record(&SinceLast::source_of(&summary.request), &summary.transaction_time, &summary.request)?;
        }
        Ok(summary)
    }

    /// Polls `status_url` and follows manifest pages, downloading each page's files as it
    /// arrives, until the export is complete and every file verified.
    pub async fn collect(
        &self,
        status_url: &str,
        out: &Path,
        layout: Layout,
        reporter: Arc<dyn Reporter>,
    ) -> Result<Summary, Error> {
        let mut merged = Merged::default();
        let mut run = Downloads {
            tasks: JoinSet::new(),
            permits: Arc::new(Semaphore::new(self.parallel)),
            totals: Totals::default(),
        };
        let mut folder: Option<PathBuf> = None;
        let mut url = status_url.to_string();
        let mut failures = self.backoff();
        let mut unhinted = Duration::from_secs(1);
        loop {
            let answer = match self.http.send(true, |c| c.get(&url).header(ACCEPT, "application/json")).await {
                Ok(r) => {
                    let (status, headers) = (r.status(), r.headers().clone());
                    r.bytes().await.map(|b| (status, headers, b)).map_err(|e| Error::Protocol(chain(&e)))
                }
                Err(e) => Err(e),
            };
            let (status, headers, body) = match answer {
                Ok(a) if !matches!(a.0.as_u16(), 502..=504) => a,
                Ok((status, headers, body)) => {
                    let why = format!("status request answered {status}: {}", describe_body(&body));
                    let wait = failures.next().ok_or_else(|| Error::Protocol(why.clone()))?;
                    let wait = retry_after(&headers).map_or(wait, |a| a.max(wait));
                    run.wait(wait, reporter.as_ref(), false).await?;
                    continue;
                }
                Err(Error::Auth(m)) => return Err(Error::Auth(m)),
                Err(e) => {
                    let wait = failures.next().ok_or(e)?;
                    run.wait(wait, reporter.as_ref(), false).await?;
                    continue;
                }
            };
            match status {
                StatusCode::OK | StatusCode::ACCEPTED => {
                    let page = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .filter(|v| v.get("output").is_some() && v.get("resourceType").is_none());
                    let Some(page) = page else {
                        if status == StatusCode::OK {
                            return Err(Error::Protocol(format!(
                                "the export is complete but its status answer is no manifest: {}",
                                describe_body(&body)
                            )));
                        }
                        let progress = headers.get("x-progress").and_then(|v| v.to_str().ok());
                        reporter.event(Event::Running(ServerProgress::parse(progress, &body)));
                        let wait = retry_after(&headers).unwrap_or_else(|| {
                            let w = unhinted;
                            unhinted = (unhinted * 2).min(Duration::from_secs(30));
                            w
                        });
                        run.wait(wait, reporter.as_ref(), false).await?;
                        continue;
                    };
                    let new = merged.add_page(&page)?;
                    let dir = match &folder {
                        Some(d) => d.clone(),
                        None => {
                            let d = match layout {
                                Layout::Flat => out.to_path_buf(),
                                Layout::PerExport => out.join(stamp(merged.transaction_time().unwrap_or("export"))),
                            };
                            folder = Some(d.clone());
                            d
                        }
                    };
                    reporter.event(Event::Manifest { new_files: new.len(), complete: status == StatusCode::OK });
                    for entry in new {
                        let list = if entry.name.starts_with("error/") {
                            1
                        } else if entry.name.starts_with("deleted/") {
                            2
                        } else {
                            0
                        };
                        let job = Job {
                            http: self.http.clone(),
                            dest: dir.join(&entry.name),
                            entry,
                            requires_token: merged.requires_token(),
                            organized: merged.organized(),
                            retries: self.retries,
                            reporter: reporter.clone(),
                        };
                        let permits = run.permits.clone();
                        run.tasks.spawn(async move {
                            let _permit = permits.acquire_owned().await.expect("the semaphore is never closed");
                            (list, job.run().await)
                        });
                    }
                    if let Some(next) = next_link(&page) {
                        url = next;
                        continue;
                    }
                    if status == StatusCode::OK {
                        break;
                    }
                    // A partial manifest of a running export: poll the same page again.
                    let wait = retry_after(&headers).unwrap_or(Duration::from_secs(1));
                    run.wait(wait, reporter.as_ref(), false).await?;
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    let wait = retry_after(&headers).unwrap_or(Duration::from_secs(2));
                    run.wait(wait, reporter.as_ref(), true).await?;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(Error::Auth(format!("the status request answered {status}: {}", describe_body(&body))));
                }
                s => return Err(Error::ExportFailed { status: s.as_u16(), message: describe_body(&body) }),
            }
        }
        while let Some(joined) = run.tasks.join_next().await {
            run.record(joined)?;
        }
        let dir = folder.unwrap_or_else(|| out.to_path_buf());
        tokio::fs::create_dir_all(&dir).await.map_err(Error::io(format!("creating {}", dir.display())))?;
        let path = dir.join("manifest.json");
        let tmp = dir.join(".manifest.json.tmp");
        let text = serde_json::to_vec_pretty(&merged.to_json()).expect("JSON");
        tokio::fs::write(&tmp, text).await.map_err(Error::io(format!("writing {}", tmp.display())))?;
        tokio::fs::rename(&tmp, &path).await.map_err(Error::io(format!("writing {}", path.display())))?;
        let [files, error_files, deleted_files] = merged.counts();
        let t = run.totals;
        Ok(Summary {
            transaction_time: merged.transaction_time().unwrap_or_default().to_string(),
            request: merged.request().unwrap_or_default().to_string(),
            folder: dir,
            files,
            error_files,
            deleted_files,
            resources: t.resources,
            bytes: t.bytes,
            skipped: t.skipped,
        })
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.retries)
            .with_jitter()
            .build()
    }
}

/// A folder name from a `transactionTime`: its letters and digits.
fn stamp(transaction_time: &str) -> String {
    let s: String = transaction_time.chars().filter(char::is_ascii_alphanumeric).collect();
    if s.is_empty() { "export".to_string() } else { s }
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    resources: u64,
    bytes: u64,
    skipped: usize,
}

/// The downloads running while the status is polled.
struct Downloads {
    tasks: JoinSet<(usize, Result<Done, Error>)>,
    permits: Arc<Semaphore>,
    totals: Totals,
}

impl Downloads {
    fn record(&mut self, joined: Result<(usize, Result<Done, Error>), tokio::task::JoinError>) -> Result<(), Error> {
        let (list, done) = joined.map_err(|e| Error::Protocol(format!("a download task failed: {e}")))?;
        let done = done?;
        self.totals.bytes += done.bytes;
        if list == 0 {
            self.totals.resources += done.count;
        }
        if done.skipped {
            self.totals.skipped += 1;
        }
        Ok(())
    }

    /// Waits `wait` before the next status request, surfacing a failed download at once.
    async fn wait(&mut self, wait: Duration, reporter: &dyn Reporter, throttled: bool) -> Result<(), Error> {
        reporter.event(Event::Waiting { wait, throttled });
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
                Some(joined) = self.tasks.join_next() => self.record(joined)?,
            }
        }
    }
}
