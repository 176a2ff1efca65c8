//! Known-answer tests for the presigned download URLs (moto does not check signatures).
//!
//! A small SigV4 query-signing verifier written here from the AWS specification recomputes
//! the signature of a URL from its own parts. It is first proven on the example of the AWS
//! documentation ("Authenticating Requests: Using Query Parameters", GET /test.txt from
//! examplebucket), then used on the URL that the backend produces for the same key, time,
//! credentials and region (which differs from the example only by the query parameters the
//! SDK adds, such as `x-id=GetObject`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use sluice_storage::ObjectBackend;
use sluice_storage_s3::{S3Backend, S3Config, S3Keys};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ACCESS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
/// 2013-05-24T00:00:00Z.
const DOC_TIME: u64 = 1_369_353_600;
const DOC_SIGNATURE: &str = "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404";
const DOC_URL: &str = "https://examplebucket.s3.amazonaws.com/test.txt\
    ?X-Amz-Algorithm=AWS4-HMAC-SHA256\
    &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
    &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
    &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404";

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("utf-8")
}

/// RFC 3986 encoding as SigV4 wants it: everything but unreserved characters (and `/` when
/// `keep_slash`) becomes %XX with upper-case hex.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b'/' if keep_slash => "/".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The parts of a presigned URL, decoded.
struct Presigned {
    host: String,
    path: String,
    query: Vec<(String, String)>,
    signature: String,
}

fn parse(url: &str) -> Presigned {
    let rest = url.split_once("://").expect("scheme").1;
    let (authority, path_and_query) = rest.split_at(rest.find('/').expect("path"));
    let (path, query) = path_and_query.split_once('?').expect("query");
    let mut params: Vec<(String, String)> = query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let at = params.iter().position(|(k, _)| k == "X-Amz-Signature").expect("signature");
    let signature = params.remove(at).1;
    Presigned { host: authority.to_string(), path: percent_decode(path), query: params, signature }
}

fn param<'a>(p: &'a Presigned, name: &str) -> &'a str {
    &p.query.iter().find(|(k, _)| k == name).unwrap_or_else(|| panic!("no {name}")).1
}

/// The signature SigV4 gives to the presigned GET `url` (its own X-Amz-Signature excluded)
/// with `secret`; S3 does not double-encode the path, and the payload is unsigned.
fn expected_signature(url: &str, secret: &str) -> String {
    let p = parse(url);
    assert_eq!(param(&p, "X-Amz-Algorithm"), "AWS4-HMAC-SHA256");
    assert_eq!(param(&p, "X-Amz-SignedHeaders"), "host", "only the host header may be signed");
    let mut query: Vec<(String, String)> =
        p.query.iter().map(|(k, v)| (uri_encode(k, false), uri_encode(v, false))).collect();
    query.sort();
    let canonical_query = query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let canonical_request =
        format!("GET\n{}\n{}\nhost:{}\n\nhost\nUNSIGNED-PAYLOAD", uri_encode(&p.path, true), canonical_query, p.host);
    let date_time = param(&p, "X-Amz-Date");
    let credential = param(&p, "X-Amz-Credential");
    let scope = credential.split_once('/').expect("credential scope").1;
    let [date, region, service, terminator] = scope.split('/').collect::<Vec<_>>()[..] else {
        panic!("bad scope {scope}")
    };
    assert_eq!(terminator, "aws4_request");
    assert!(date_time.starts_with(date));
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), date);
    for part in [region, service, "aws4_request"] {
        key = hmac(&key, part);
    }
    hex::encode(hmac(&key, &string_to_sign))
}

async fn example_backend(endpoint: Option<&str>) -> S3Backend {
    S3Backend::connect(S3Config {
        bucket: "examplebucket".into(),
        region: Some("us-east-1".into()),
        endpoint: endpoint.map(str::to_string),
        credentials: Some(S3Keys { access_key_id: ACCESS_KEY.into(), secret_access_key: SECRET_KEY.into() }),
    })
    .await
    .expect("connect")
}

#[test]
fn verifier_reproduces_the_aws_documentation_example() {
    assert_eq!(expected_signature(DOC_URL, SECRET_KEY), DOC_SIGNATURE);
    // And it can fail: another secret or another key give other signatures.
    assert_ne!(expected_signature(DOC_URL, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEZ"), DOC_SIGNATURE);
    assert_ne!(expected_signature(&DOC_URL.replace("/test.txt", "/test.txu"), SECRET_KEY), DOC_SIGNATURE);
}

#[tokio::test]
async fn presigned_url_matches_an_independent_sigv4_signature() {
    let backend = example_backend(None).await;
    let start = UNIX_EPOCH + Duration::from_secs(DOC_TIME);
    let signed = backend.presign_get_at("test.txt", Duration::from_secs(86_400), start).await.unwrap();
    let url = &signed.url;

    let p = parse(url);
    assert_eq!(p.path, "/test.txt", "{url}");
    assert!(p.host.starts_with("examplebucket.s3."), "{url}");
    assert_eq!(param(&p, "X-Amz-Date"), "20130524T000000Z");
    assert_eq!(param(&p, "X-Amz-Expires"), "86400");
    assert_eq!(param(&p, "X-Amz-Credential"), "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request");
    assert_eq!(p.signature, expected_signature(url, SECRET_KEY), "{url}");
    assert_eq!(signed.expires.unix_timestamp(), (DOC_TIME + 86_400) as i64);

    // Exactly the documentation's request (same host, no extra parameters): same signature.
    let extra: Vec<&str> = p.query.iter().map(|(k, _)| k.as_str()).filter(|k| !k.starts_with("X-Amz-")).collect();
    if p.host == "examplebucket.s3.amazonaws.com" && extra.is_empty() {
        assert_eq!(p.signature, DOC_SIGNATURE);
    }
}

#[tokio::test]
async fn presigned_url_with_custom_endpoint_and_odd_key() {
    let backend = example_backend(Some("http://127.0.0.1:9")).await;
    assert_eq!(backend.describe(), "s3://examplebucket at 127.0.0.1:9");
    let start = UNIX_EPOCH + Duration::from_secs(DOC_TIME) + Duration::from_millis(999);
    // Longer than S3 allows: clamped to 7 days, counted from the whole second.
    let signed =
        backend.presign_get_at("job/Patient 1+ü.ndjson", Duration::from_secs(30 * 86_400), start).await.unwrap();
    let url = &signed.url;
    let p = parse(url);
    assert_eq!(p.host, "127.0.0.1:9");
    assert_eq!(p.path, "/examplebucket/job/Patient 1+ü.ndjson", "{url}");
    assert_eq!(param(&p, "X-Amz-Expires"), "604800");
    assert_eq!(param(&p, "X-Amz-Date"), "20130524T000000Z");
    assert_eq!(p.signature, expected_signature(url, SECRET_KEY), "{url}");
    assert_eq!(signed.expires.unix_timestamp(), (DOC_TIME + 7 * 86_400) as i64);
}

#[tokio::test]
async fn signed_url_uses_the_current_time() {
    let backend = example_backend(None).await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let signed = backend.signed_url("a/b.ndjson", Duration::from_secs(3600)).await.unwrap();
    let lifetime = signed.expires.unix_timestamp() - now;
    assert!((3599..=3601).contains(&lifetime), "{lifetime}");
    assert_eq!(parse(&signed.url).signature, expected_signature(&signed.url, SECRET_KEY));
}
