//! The HTML status page (`/`, `/exports/<id>`) in a real browser: Debian's Chromium,
//! headless, driven through ChromeDriver by fantoccini. The page shows a running export's
//! progress moving (refreshed by its script, without reloading), lists the recent exports
//! with their files and SHA-256, and its button cancels the running export.
//!
//! ChromeDriver is found through `SLUICE_TEST_CHROMEDRIVER` (its path, as `.ci/run` sets it
//! after installing the `chromium` and `chromium-driver` packages) or as `chromedriver` on
//! the `PATH`. Without it the browser test prints a skip notice; with `CI=true` it fails.

mod common;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running export is slow enough to watch (Observation: 16k resources).
const THROTTLED: &[&str] = &["--throttle-ms", "20", "--batch-bytes", "16384"];

/// The ChromeDriver executable, or `None` (after a notice) when it is not installed.
fn chromedriver() -> Option<PathBuf> {
    external_tool("SLUICE_TEST_CHROMEDRIVER", "chromedriver", ".ci/run installs Debian's chromium and chromium-driver")
}

/// A ChromeDriver process on a free port; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(bin: &PathBuf) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
        // Ready when its status endpoint says so.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut r) = ureq::get(&format!("{}/status", driver.url)).call()
                && let Ok(text) = r.body_mut().read_to_string()
                && serde_json::from_str::<Value>(&text).is_ok_and(|v| v["value"]["ready"] == true)
            {
                return driver;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A headless Chromium session.
    async fn session(&self) -> Client {
        let chromium = std::env::var("SLUICE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            }
        });
        let Value::Object(caps) = caps else { unreachable!() };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Evaluates `expr` in the page.
async fn eval(c: &Client, expr: &str) -> Value {
    c.execute(&format!("return {expr};"), vec![]).await.unwrap_or_else(|e| panic!("{expr}: {e}"))
}

/// Polls `expr` until `ok` holds for its value (at most 60 s); returns that value.
async fn until(c: &Client, expr: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = eval(c, expr).await;
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{expr} stayed {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_page_shows_a_running_export_moving_and_its_button_cancels_it() {
    let Some(bin) = chromedriver() else { return };
    let srv = Server::loaded(THROTTLED);
    // A finished export, then a running one.
    let url = srv.fhir("/$export?_type=Patient,Condition");
    let done_status = kickoff(&srv, &url);
    let manifest = complete_manifest(&poll_until_done(&done_status), &url);
    let done_id = done_status.rsplit('/').next().expect("id").to_string();
    let running_status = kickoff(&srv, &srv.fhir("/Patient/$export?_type=Observation"));
    let running_id = running_status.rsplit('/').next().expect("id").to_string();

    let driver = Driver::start(&bin);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let c = driver.session().await;
        c.goto(&format!("{}/", srv.url)).await.expect("opening /");
        let running = c.find(Locator::Css("#running")).await.expect("the running section");
        assert_eq!(running.attr("data-export").await.expect("attr").as_deref(), Some(running_id.as_str()));

        // The bars move without a reload: a mark set on the page now survives the change.
        eval(&c, "(window.sluiceMark = 1)").await;
        let first = eval(&c, "document.querySelector('#overall progress').value").await.as_f64().expect("a value");
        let total = eval(&c, "document.querySelector('#overall progress').max").await.as_f64().expect("a max");
        assert_eq!(total, 16315.0, "every Observation of the data set");
        let moved = until(&c, "document.querySelector('#overall progress').value", |v| {
            v.as_f64().is_some_and(|v| v > first)
        })
        .await;
        assert!(moved.as_f64().expect("a value") < total, "the export finished before the page could show it moving");
        assert_eq!(eval(&c, "window.sluiceMark").await, json!(1), "the page was reloaded instead of refreshed");
        let per_type = eval(&c, "document.querySelector('tr[data-type=\"Observation\"] progress').value").await;
        assert!(per_type.as_f64().is_some_and(|v| v > 0.0), "the Observation bar: {per_type}");
        let rate = until(&c, "document.getElementById('rate').textContent", |v| v != "unknown").await;
        assert!(rate.as_str().is_some_and(|r| r.ends_with("resources/s")), "{rate}");
        let left = eval(&c, "document.getElementById('left').textContent").await;
        assert!(left.as_str().is_some_and(|l| l.ends_with(" s") || l.ends_with(" min")), "{left}");

        // The recent exports: both, newest first.
        let rows = eval(&c, "[...document.querySelectorAll('#recent tbody tr')].map(r => [r.dataset.export, r.querySelector('.status').textContent])").await;
        assert_eq!(rows, json!([[running_id, "in-progress"], [done_id, "completed"]]));

        // The button cancels the export; the page then shows nothing running.
        c.find(Locator::Css("#cancel")).await.expect("the cancel button").click().await.expect("clicking");
        until(&c, "document.querySelector('#running p') && document.querySelector('#running p').textContent", |v| {
            v == "No export is running."
        })
        .await;
        let status = eval(&c, &format!("document.querySelector('tr[data-export=\"{running_id}\"] .status').textContent")).await;
        assert_eq!(status, json!("cancelled"));

        // One export's page: its files with size and SHA-256, as the manifest lists them.
        c.goto(&format!("{}/exports/{done_id}", srv.url)).await.expect("opening the export's page");
        let files = eval(&c, "[...document.querySelectorAll('#files tbody tr')].map(r => [...r.cells].map(c => c.textContent))").await;
        let expected: Vec<Value> = manifest["output"]
            .as_array()
            .expect("output")
            .iter()
            .map(|f| {
                let name = f["url"].as_str().expect("url").split('?').next().unwrap().rsplit('/').next().unwrap();
                json!([f["type"], name, f["count"].to_string(), f["extension"]["size"].to_string(), f["extension"]["sha256"]])
            })
            .collect();
        assert_eq!(files, json!(expected));
        assert_eq!(eval(&c, "document.getElementById('status').textContent").await, json!("completed"));
        c.close().await.expect("closing the session");
    });

    // The cancellation was real: the export is gone and the slot is free.
    assert_eq!(get(&running_status).status, 404);
    let next = kickoff(&srv, &srv.fhir("/$export?_type=Patient"));
    assert_eq!(delete(&next).status, 202);
}

#[test]
fn the_page_and_metrics_need_the_root_client_under_smart() {
    let secret = "status-page-secret";
    let srv = Server::empty(&["--auth", "smart", "--root-client-secret", secret]);
    let root = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("root:{secret}"))
    );
    for path in ["/", "/exports/some-id", "/metrics"] {
        let url = format!("{}{path}", srv.url);
        let r = get(&url);
        assert_outcome(&r, 401, &["root client"]);
        assert!(r.header("www-authenticate").is_some_and(|c| c.starts_with("Basic")), "{path}");
        let wrong =
            format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "root:nope"));
        assert_eq!(send("GET", &url, &[("authorization", &wrong)], None).status, 401, "{path}");
    }
    let page = send("GET", &format!("{}/", srv.url), &[("authorization", &root)], None);
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.header("content-security-policy").is_some_and(|p| p.contains("frame-ancestors 'none'")));
    assert!(page.text().contains("No export is running."), "{}", page.text());
    let unknown = send("GET", &format!("{}/exports/no-such-export", srv.url), &[("authorization", &root)], None);
    assert_outcome(&unknown, 404, &["no-such-export"]);
    let metrics = send("GET", &format!("{}/metrics", srv.url), &[("authorization", &root)], None);
    assert_eq!(metrics.status, 200);
}
