//! The HTML status page: `GET /` (the running export with a progress bar per type, rate
//! and time left, and the recent exports) and `GET /exports/<id>` (one export: parameters,
//! progress, files with size and SHA-256, errors). Rendered on the server; a little
//! JavaScript (`page/status.js`) refreshes a running export from the JSON document that
//! `GET /exports/<id>` answers to `Accept: application/json`, and cancels it with `DELETE`
//! on its status URL. The page reads its own JSON rather than `$export-status`, so an open
//! tab never spends the client's poll budget (D13). The root client only, under SMART (D44).

use crate::outcome::ApiError;
use crate::{Access, AppState};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_jobs::{JobRecord, OutputFile};
use std::fmt::Write as _;
use std::time::Duration;
use time::OffsetDateTime;

/// Exports listed on `/`.
const RECENT: usize = 20;
const SCRIPT: &str = include_str!("page/status.js");
const STYLE: &str = include_str!("page/status.css");

/// `GET /`: the running export and the recent ones.
pub(crate) async fn index(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    app.allow(Access::Monitor, &headers).await?;
    let jobs = app.inner.store.recent(RECENT).await.map_err(ApiError::internal)?;
    let mut body = String::new();
    match jobs.iter().find(|j| j.status.is_active()) {
        Some(job) => running_section(&mut body, &app, job, &format!("exports/{}", job.id)),
        // Nothing running: look again now and then for a new export.
        None => body.push_str("<section id=\"running\"><p>No export is running.</p></section>"),
    }
    body.push_str("<h2>Recent exports</h2>");
    if jobs.is_empty() {
        body.push_str("<p>None yet.</p>");
    } else {
        body.push_str(
            "<table id=\"recent\"><thead><tr><th>Export</th><th>Level</th><th>Status</th><th>Parameters</th>\
             <th>Kicked off</th><th class=\"num\">Duration</th><th class=\"num\">Resources</th>\
             <th class=\"num\">Bytes</th><th class=\"num\">Files</th></tr></thead><tbody>",
        );
        for j in &jobs {
            let (done, _) = j.totals();
            let bytes: u64 = j.output.iter().map(|f| f.bytes).sum();
            let _ = write!(
                body,
                "<tr data-export=\"{id}\"><td><a href=\"exports/{id}\"><code>{id}</code></a></td><td>{level}</td>\
                 <td class=\"status status-{status}\">{status}</td><td><code>{params}</code></td><td>{at}</td>\
                 <td class=\"num\">{duration}</td><td class=\"num\">{done}</td><td class=\"num\">{bytes}</td>\
                 <td class=\"num\">{files}</td></tr>",
                id = esc(&j.id),
                level = j.plan.level.name(),
                status = j.status.as_str(),
                params = esc(parameters(&j.request_url)),
                at = instant(j.created_at),
                duration = duration(j),
                files = j.output.len(),
            );
        }
        body.push_str("</tbody></table>");
    }
    let refresh = !jobs.iter().any(|j| j.status.is_active());
    Ok(html("Sluice: exports", &body, refresh))
}

/// `GET /exports/<id>`: one export, as HTML, or as JSON (`Accept: application/json`) for
/// the page's script.
pub(crate) async fn export(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    app.allow(Access::Monitor, &headers).await?;
    let job = app.inner.store.get(&id).await.map_err(ApiError::internal)?;
    let job = job.ok_or_else(|| ApiError::not_found(format!("no export with id '{id}'")))?;
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/html"));
    if wants_json {
        let mut res =
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], document(&job).to_string()).into_response();
        res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(res);
    }
    let mut body = String::new();
    let _ = write!(
        body,
        "<p><a href=\"../\">All exports</a></p><table id=\"summary\">\
         <tr><th>Status</th><td class=\"status status-{status}\" id=\"status\">{status}</td></tr>\
         <tr><th>Level</th><td>{level}</td></tr><tr><th>Request</th><td><code>{request}</code></td></tr>\
         <tr><th>Kicked off</th><td>{at}</td></tr><tr><th>Finished</th><td>{finished}</td></tr>\
         <tr><th>Duration</th><td>{duration}</td></tr><tr><th>Transaction time</th><td>{tx}</td></tr>\
         <tr><th>Client</th><td>{owner}</td></tr></table>",
        status = job.status.as_str(),
        level = job.plan.level.name(),
        request = esc(&job.request_url),
        at = instant(job.created_at),
        finished = job.finished_at.map_or_else(|| "-".into(), instant),
        duration = duration(&job),
        tx = job.transaction_time.map_or_else(|| "-".into(), instant),
        owner = job.owner.as_deref().map_or_else(|| "-".into(), esc),
    );
    if job.status.is_active() {
        running_section(&mut body, &app, &job, &job.id);
    }
    if let Some(outcome) = &job.outcome {
        body.push_str("<h2>Outcome</h2><ul id=\"issues\">");
        for i in &outcome.issues {
            let _ = write!(body, "<li>{}</li>", esc(&i.diagnostics));
        }
        body.push_str("</ul>");
    }
    files_table(&mut body, "Files", "files", &job.output);
    files_table(&mut body, "Deleted resources", "deleted", &job.deleted);
    files_table(&mut body, "Errors", "errors", &job.error);
    Ok(html(&format!("Sluice: export {}", job.id), &body, false))
}

/// The JSON document of one export: the fields of the `$export-status` 202 body
/// (`status`, `percent`, `done`, `total`, `types`, `transactionTime`,
/// `estimatedSecondsLeft`), with the rate and the files.
fn document(job: &JobRecord) -> Value {
    let (done, total) = job.totals();
    let types: serde_json::Map<String, Value> =
        job.progress.iter().map(|(t, p)| (t.clone(), json!({"done": p.done, "total": p.total}))).collect();
    let elapsed = Duration::try_from(job.finished_at.unwrap_or_else(OffsetDateTime::now_utc) - job.created_at)
        .map_or(0.0, |d| d.as_secs_f64());
    let rate = (done > 0 && elapsed > 0.0).then(|| done as f64 / elapsed);
    let file = |f: &OutputFile| json!({"type": f.resource_type, "name": name(f), "count": f.count, "size": f.bytes, "sha256": f.sha256});
    let mut doc = json!({
        "id": job.id,
        "status": job.status.as_str(),
        "level": job.plan.level.name(),
        "request": job.request_url,
        "percent": job.percent(),
        "done": done,
        "total": total,
        "types": types,
        "transactionTime": job.transaction_time.map(sluice_fhir::instant::format),
        "ratePerSecond": rate,
        "output": job.output.iter().map(file).collect::<Vec<_>>(),
        "deleted": job.deleted.iter().map(file).collect::<Vec<_>>(),
        "error": job.error.iter().map(file).collect::<Vec<_>>(),
    });
    if let Some(rate) = rate.filter(|_| job.status.is_active() && total > done) {
        doc["estimatedSecondsLeft"] = json!(((total - done) as f64 / rate).ceil() as u64);
    }
    doc
}

/// The running export's section: overall and per-type progress bars, rate, time left and
/// the cancel button; the script refreshes it from `progress` (the export's JSON).
fn running_section(body: &mut String, app: &AppState, job: &JobRecord, progress: &str) {
    let (done, total) = job.totals();
    let doc = document(job);
    let cancel = format!("{}/fhir/$export-status/{}", app.inner.base_url, job.id);
    let _ = write!(
        body,
        "<section id=\"running\" data-progress=\"{progress}\" data-cancel=\"{cancel}\" data-export=\"{id}\">\
         <h2>Running: <a href=\"{progress}\"><code>{id}</code></a> ({level})</h2><p><code>{request}</code></p>\
         <p id=\"overall\"><progress max=\"{max}\" value=\"{done}\"></progress> <span id=\"percent\">{percent}%</span> \
         <span class=\"count\">{done} / {total}</span></p>\
         <p>Rate: <span id=\"rate\">{rate}</span>; time left: <span id=\"left\">{left}</span></p>\
         <table id=\"types\"><thead><tr><th>Type</th><th>Progress</th><th>Resources</th></tr></thead><tbody>",
        progress = esc(progress),
        cancel = esc(&cancel),
        id = esc(&job.id),
        level = job.plan.level.name(),
        request = esc(&job.request_url),
        max = total.max(1),
        percent = job.percent(),
        rate = doc["ratePerSecond"].as_f64().map_or_else(|| "unknown".into(), |r| format!("{r:.0} resources/s")),
        left = doc["estimatedSecondsLeft"].as_u64().map_or_else(|| "unknown".into(), seconds),
    );
    for (t, p) in &job.progress {
        let _ = write!(
            body,
            "<tr data-type=\"{t}\"><td class=\"type\">{t}</td><td><progress max=\"{max}\" value=\"{done}\"></progress></td>\
             <td class=\"count\">{done} / {total}</td></tr>",
            t = esc(t),
            max = p.total.max(1),
            done = p.done,
            total = p.total,
        );
    }
    body.push_str(
        "</tbody></table><p><button id=\"cancel\" type=\"button\">Cancel this export</button> \
         <span id=\"note\" role=\"status\"></span></p></section>",
    );
}

/// A table of files: type, name, resources, bytes, SHA-256.
fn files_table(body: &mut String, title: &str, id: &str, files: &[OutputFile]) {
    if files.is_empty() {
        return;
    }
    let _ = write!(
        body,
        "<h2>{title}</h2><table id=\"{id}\"><thead><tr><th>Type</th><th>File</th><th class=\"num\">Resources</th>\
         <th class=\"num\">Bytes</th><th>SHA-256</th></tr></thead><tbody>"
    );
    for f in files {
        let _ = write!(
            body,
            "<tr><td>{t}</td><td><code>{name}</code></td><td class=\"num\">{count}</td><td class=\"num\">{bytes}</td>\
             <td class=\"sha\">{sha}</td></tr>",
            t = esc(&f.resource_type),
            name = esc(name(f)),
            count = f.count,
            bytes = f.bytes,
            sha = f.sha256.as_deref().map_or_else(|| "-".into(), esc),
        );
    }
    body.push_str("</tbody></table>");
}

/// A file's name: the last segment of its key.
fn name(f: &OutputFile) -> &str {
    f.key.rsplit('/').next().unwrap_or(&f.key)
}

/// The kick-off's parameters: the query of its request URL (or `-`).
fn parameters(request_url: &str) -> &str {
    request_url.split_once('?').map_or("-", |(_, q)| q)
}

fn instant(t: OffsetDateTime) -> String {
    sluice_fhir::instant::format(t)
}

/// A time left, as the script writes it.
fn seconds(s: u64) -> String {
    if s < 90 { format!("{s} s") } else { format!("{} min", (s + 30) / 60) }
}

/// How long the export ran (or has run so far).
fn duration(job: &JobRecord) -> String {
    let end = job.finished_at.unwrap_or_else(OffsetDateTime::now_utc);
    let secs = Duration::try_from(end - job.created_at).map_or(0.0, |d| d.as_secs_f64());
    if secs < 90.0 { format!("{secs:.1} s") } else { format!("{:.1} min", secs / 60.0) }
}

/// Escapes text for HTML (content and quoted attributes).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page: never cached, never framed (its button cancels exports), scripts only
/// its own.
fn html(title: &str, body: &str, refresh: bool) -> Response {
    let meta = if refresh { "<meta http-equiv=\"refresh\" content=\"10\">" } else { "" };
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{meta}<title>{title}</title>\
         <style>{STYLE}</style></head><body><h1>{title}</h1>{body}<script>{SCRIPT}</script></body></html>",
        title = esc(title),
    );
    let mut res = (StatusCode::OK, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_parameters_are_the_query() {
        assert_eq!(esc("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(parameters("http://h/fhir/$export?_type=Patient&_since=2024"), "_type=Patient&_since=2024");
        assert_eq!(parameters("http://h/fhir/$export"), "-");
    }
}
