//! Fetching JSON Web Key Sets (a client's `jwks_uri`, an issuer's published keys) with a
//! timeout and a size limit, cached no longer than the response's `Cache-Control` allows.

use jsonwebtoken::jwk::JwkSet;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set (or discovery document) read.
const MAX_BYTES: usize = 256 * 1024;
/// How long an answer without `Cache-Control` is kept.
const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// The longest an answer is kept, whatever it says.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// A key set is fetched again for an unknown `kid` at most this often (key rotation
/// without hammering the client's server with made-up kids).
const MIN_REFETCH: Duration = Duration::from_secs(10);

/// A JSON document fetched over HTTP, and how long it may be kept.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The parsed body.
    pub body: serde_json::Value,
    /// From `Cache-Control` (`max-age`; nothing for `no-store`/`no-cache`).
    pub ttl: Duration,
}

/// An HTTP client for small JSON documents (key sets, discovery documents).
#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
}

impl Default for Fetcher {
    fn default() -> Self {
        Fetcher::new()
    }
}

impl Fetcher {
    /// A client with Sluice's timeout and no redirects to other schemes.
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Fetcher { http }
    }

    /// GETs `url` as JSON; the error says what failed (never a body).
    pub async fn get_json(&self, url: &str) -> Result<Fetched, String> {
        let mut res = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("fetching {url} failed: {}", without_url(&e)))?;
        if !res.status().is_success() {
            return Err(format!("fetching {url} answered {}", res.status()));
        }
        let ttl = cache_ttl(res.headers().get("cache-control").and_then(|v| v.to_str().ok()));
        let mut bytes = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| format!("reading {url} failed: {}", without_url(&e)))? {
            if bytes.len() + chunk.len() > MAX_BYTES {
                return Err(format!("{url} answered more than {MAX_BYTES} bytes"));
            }
            bytes.extend_from_slice(&chunk);
        }
        let body = serde_json::from_slice(&bytes).map_err(|e| format!("{url} did not answer JSON: {e}"))?;
        Ok(Fetched { body, ttl })
    }
}

fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() { format!("no answer within {} s", FETCH_TIMEOUT.as_secs()) } else { e.to_string() }
}

/// How long `Cache-Control` lets an answer be kept.
pub fn cache_ttl(header: Option<&str>) -> Duration {
    let Some(h) = header else { return DEFAULT_TTL };
    let mut ttl = DEFAULT_TTL;
    for d in h.split(',').map(|d| d.trim().to_ascii_lowercase()) {
        if d == "no-store" || d == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(n) = d.strip_prefix("max-age=").or_else(|| d.strip_prefix("s-maxage=")) {
            match n.trim_matches('"').parse::<u64>() {
                Ok(n) => ttl = Duration::from_secs(n),
                Err(_) => return Duration::ZERO,
            }
        }
    }
    ttl.min(MAX_TTL)
}

struct Entry {
    keys: JwkSet,
    fetched: Instant,
    ttl: Duration,
}

/// Key sets by URL, each kept as long as its `Cache-Control` allows.
#[derive(Default)]
pub struct JwksCache {
    fetcher: Fetcher,
    entries: Mutex<HashMap<String, Entry>>,
}

impl JwksCache {
    /// An empty cache.
    pub fn new(fetcher: Fetcher) -> Self {
        JwksCache { fetcher, entries: Mutex::default() }
    }

    /// The key set at `url`: from the cache while fresh, else fetched. With `kid` given
    /// and missing from a cached set, fetched again (at most every few seconds), so a
    /// rotated key works at once.
    pub async fn get(&self, url: &str, kid: Option<&str>) -> Result<JwkSet, String> {
        {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = entries.get(url) {
                let age = e.fetched.elapsed();
                let has_kid = kid.is_none_or(|k| e.keys.find(k).is_some());
                if age < e.ttl && (has_kid || age < MIN_REFETCH) {
                    return Ok(e.keys.clone());
                }
            }
        }
        let fetched = self.fetcher.get_json(url).await?;
        let keys: JwkSet =
            serde_json::from_value(fetched.body).map_err(|e| format!("{url} is not a JSON Web Key Set: {e}"))?;
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if fetched.ttl.is_zero() {
            entries.remove(url);
        } else {
            if entries.len() >= 1024 {
                entries.retain(|_, e| e.fetched.elapsed() < e.ttl);
            }
            entries.insert(url.to_string(), Entry { keys: keys.clone(), fetched: Instant::now(), ttl: fetched.ttl });
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_bounds_the_cache() {
        assert_eq!(cache_ttl(None), DEFAULT_TTL);
        assert_eq!(cache_ttl(Some("public, max-age=60")), Duration::from_secs(60));
        assert_eq!(cache_ttl(Some("max-age=0")), Duration::ZERO);
        assert_eq!(cache_ttl(Some("no-store")), Duration::ZERO);
        assert_eq!(cache_ttl(Some("max-age=60, no-cache")), Duration::ZERO);
        assert_eq!(cache_ttl(Some("max-age=abc")), Duration::ZERO);
        assert_eq!(cache_ttl(Some("max-age=999999999")), MAX_TTL);
    }
}
