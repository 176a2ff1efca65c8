//! Unit tests, and the known-answer test of V4 URL signing with a fixed test key.

use super::*;

/// A throwaway RSA-2048 key made for this test only (not a secret; it signs nothing real).
const TEST_PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCbZ/Lg4zPM+lQf
PNh8oKIrfkkwjhgZy18obkndYUkrkQ3DxDnTwVMQAz0gcop1ssMF28WHdQiA6r0s
4dUc0QvGIPOK3YSQ4JQmPEwdTR89/zXO3iQ3vncN9TYXpzv8anQ6/wveyVP+HjRW
0XhasKKpu56pg2jq9Y5uzuZQnU1mKcUzj85QOE5p02tCO6AuLXmNasg7BG9SFBbp
laUbPP5SyRdya+uIPP4PImlbYT5MXORxUFv92dsGDJyrAfY/Lg07MhThrnM++p3B
moQblSQMIMgpB5bmd0/XTeD6gpYYhOmV0c+txpfsE1zKSkM39Yi+FsM0N2kPpg8q
YNLDUG7ZAgMBAAECggEAQV2EGZZHDAEA0BDKKAVyoKOiCkPCHFtfv4RAGlcYrTP6
W6zV+9zVYKdUFylGVsIlaHnriBGwTXUus8mbV18QOjpS5cZNw5hKiBiVlT+ClBOb
4NKr3iyFLABHS8SiJQXrtILhTchVxU2UCy5ZFqA0Evtg/YDR6P329mGdGyxGyWDB
epII+oqjcKU6pVCvG6Fgzi+ooK9tfes1Tr3n0CQM+Ehq+/5CmaSjTWZS4H51/HTM
dIzVNJ2SFQPjABnXDX0NCYNKU4fYR9lHnEJrt1CiL5h2w0NQgRfoPz21gMbxBQRy
EjlkhUCqwTrI5pIzPz6b9V0/zuXkXyi/fxCvcX8XBwKBgQDN6NoiQbhPMHCOQsIg
Esz2IsOrrQsD1tC1oq0jwLTdBvNKVGWs+iToA4Cn2WyJ+lmxR4UVr8ChYjbKiyHN
iG7U76DkcCgByhSX/gUFZmBENAPWkQsbusA90NzoiJjFTH/aVvt53gzwtYSbOHT9
psj92fRoQy5vc6FYg42oSUf5EwKBgQDBNfUxzC9uwz/sSK0UumJOa3+Lzy6n4EfG
d+GO4TLhGNF3ZQyDHyUjs5qod45UYwAYHJlmtmJOoLOAKseuimtVyQ3mm+spgjha
Fa41MwOOUP7a8f/ff68ge80YUDdROOL4jRlQsWWYw3fupALrPOVkpvyidYop4MTM
khXbB5SB4wKBgCmKvueGZs7jMPIimdOqt1s5LEzofn5pynW6uj+qU1L8Yf0vBcxe
My/z9PLoNLOppIrVqQ31BWIJ1JAMfedfjSy8o7MyxX+G65y2jQDH5MgdzmBtptYT
WVGfX9IyLNAxXOIKBnZRzD6MAJLoUwIRsh8059BZLXci1vxqnhvDnRetAoGBAJiL
YHabrot17p9AVh76dSlTKFWbE0wKAMFK3zQuyzv7m0334yQXT/xbDm2aTy6DJ4zh
75+vufg4WuCDZjqBIPOPFMGRMt8H6DP/0BZCm7kea8kzrgCoz/0GocxjcPlYv6Lb
zDPwi7VMBwHMTl2qK7cHPImL4bTkuJyHbmgLGQ5fAoGAauUGZDFOBTWbTVy2GP74
iJ/+kN1rYCvzHI4oeXTiUE5Uh0C8+JpE2IAtyhOvO5d9S6Rgz0ayGGDS4n24qmLs
NgnMJlYt2MAcB8QhRIhypn7Q2ek1f+kUNICQvZRYPCMiU3R4oc1k9ueMSl7r1poz
XzTbdnmk14N9QtedWO+GM8I=
-----END PRIVATE KEY-----
";

/// The public half of [`TEST_PRIVATE_KEY`] (PKCS#1 RSAPublicKey, DER, hex), exported with
/// `openssl rsa -RSAPublicKey_out` independently of the code under test.
const TEST_PUBLIC_KEY_HEX: &[&str] = &[
    "3082010a02820101009b67f2e0e333ccfa541f3cd87ca0a22b7e49308e1819cb5f286e49dd61492b910dc3c439d3c153",
    "10033d20728a75b2c305dbc587750880eabd2ce1d51cd10bc620f38add8490e094263c4c1d4d1f3dff35cede2437be77",
    "0df53617a73bfc6a743aff0bdec953fe1e3456d1785ab0a2a9bb9ea98368eaf58e6ecee6509d4d6629c5338fce50384e",
    "69d36b423ba02e2d798d6ac83b046f521416e995a51b3cfe52c917726beb883cfe0f22695b613e4c5ce471505bfdd9db",
    "060c9cab01f63f2e0d3b3214e1ae733efa9dc19a841b95240c20c8290796e6774fd74de0fa82961884e995d1cfadc697",
    "ec135cca4a4337f588be16c33437690fa60f2a60d2c3506ed90203010001",
];

const TEST_EMAIL: &str = "sluice-kat@example-project.iam.gserviceaccount.com";
const TEST_BUCKET: &str = "sluice-kat-bucket";
/// Has a space, `+`, parentheses and a non-ASCII letter, which must be percent-encoded.
const TEST_OBJECT: &str = "2024-03-01_job/Patient (1)+é.ndjson";

fn key_config(endpoint: Option<&str>) -> GcsConfig {
    GcsConfig {
        bucket: TEST_BUCKET.to_string(),
        endpoint: endpoint.map(str::to_string),
        service_account: Some(GcsServiceAccount {
            client_email: TEST_EMAIL.to_string(),
            private_key: TEST_PRIVATE_KEY.to_string(),
            private_key_id: None,
        }),
    }
}

fn public_key() -> Vec<u8> {
    hex::decode(TEST_PUBLIC_KEY_HEX.concat()).unwrap()
}

/// Percent-encoding as the GCS V4 docs describe it: everything but `A-Za-z0-9-._~` (and `/`
/// in paths when `keep_slash`), as `%XX` of the UTF-8 bytes with upper-case hex digits.
fn reference_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The parts of a V4 signed GET URL, built independently of the SDK from the format in
/// the GCS docs ("Canonical requests", "Signatures", "V4 signing process").
struct Reference {
    path: String,
    query: String,
    canonical_request: String,
    string_to_sign: String,
}

fn reference(host: &str, bucket: &str, object: &str, email: &str, date: &str, expires: u64) -> Reference {
    let day = &date[..8];
    let scope = format!("{day}/auto/storage/goog4_request");
    let path = format!("/{bucket}/{}", reference_encode(object, true));
    let params = [
        ("X-Goog-Algorithm", "GOOG4-RSA-SHA256".to_string()),
        ("X-Goog-Credential", format!("{email}/{scope}")),
        ("X-Goog-Date", date.to_string()),
        ("X-Goog-Expires", expires.to_string()),
        ("X-Goog-SignedHeaders", "host".to_string()),
    ];
    let query = params
        .iter()
        .map(|(k, v)| format!("{}={}", reference_encode(k, false), reference_encode(v, false)))
        .collect::<Vec<_>>()
        .join("&");
    let canonical_request = format!("GET\n{path}\n{query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD");
    let hash = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical_request.as_bytes()));
    let string_to_sign = format!("GOOG4-RSA-SHA256\n{date}\n{scope}\n{hash}");
    Reference { path, query, canonical_request, string_to_sign }
}

fn query_param<'a>(url: &'a str, name: &str) -> &'a str {
    let query = url.split_once('?').expect("a query").1;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

/// Signs a URL with the test key and checks it, byte for byte, against the reference
/// computation: URL layout, canonical query, and an RSA-SHA256 signature that verifies with
/// the public key over the independently built string-to-sign.
async fn check_signed_url(endpoint: Option<&str>, base: &str, host: &str) {
    let backend = GcsBackend::build(key_config(endpoint)).await.unwrap();
    let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let signed = backend.signed_url(TEST_OBJECT, Duration::from_secs(3600)).await.unwrap();
    let after = OffsetDateTime::now_utc();

    // The SDK stamps the current time; everything else is fixed.
    let date = query_param(&signed.url, "X-Goog-Date");
    let signed_at = signed_url_date(&signed.url).unwrap();
    assert!(before <= signed_at && signed_at <= after, "{signed_at} not in [{before}, {after}]");
    assert_eq!(signed.expires, signed_at + Duration::from_secs(3600));

    let r = reference(host, TEST_BUCKET, TEST_OBJECT, TEST_EMAIL, date, 3600);
    let signature_hex = query_param(&signed.url, "X-Goog-Signature");
    assert_eq!(signed.url, format!("{base}{}?{}&X-Goog-Signature={signature_hex}", r.path, r.query));
    assert_eq!(signature_hex.len(), 512, "an RSA-2048 signature is 256 bytes");

    let signature = hex::decode(signature_hex).unwrap();
    let public_key =
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256, public_key());
    public_key.verify(r.string_to_sign.as_bytes(), &signature).unwrap_or_else(|_| {
        panic!("signature does not verify over\n{}\n(canonical request:\n{})", r.string_to_sign, r.canonical_request)
    });
}

#[tokio::test]
async fn signed_url_known_answer_google_endpoint() {
    check_signed_url(None, "https://storage.googleapis.com", "storage.googleapis.com").await;
}

#[tokio::test]
async fn signed_url_known_answer_custom_endpoint() {
    // Path style against the endpoint; the signed `host` header is the host name.
    check_signed_url(Some("http://127.0.0.1:80"), "http://127.0.0.1:80", "127.0.0.1").await;
}

/// The reference builder itself, at a fixed time, against the documented layout.
#[test]
fn reference_follows_documented_format() {
    let r = reference(
        "storage.googleapis.com",
        "example-bucket",
        "cat-pics/tabby.jpeg",
        "example@example-project.iam.gserviceaccount.com",
        "20190301T190859Z",
        3600,
    );
    assert_eq!(r.path, "/example-bucket/cat-pics/tabby.jpeg");
    assert_eq!(
        r.canonical_request,
        "GET\n\
         /example-bucket/cat-pics/tabby.jpeg\n\
         X-Goog-Algorithm=GOOG4-RSA-SHA256\
         &X-Goog-Credential=example%40example-project.iam.gserviceaccount.com%2F20190301%2Fauto%2Fstorage%2Fgoog4_request\
         &X-Goog-Date=20190301T190859Z&X-Goog-Expires=3600&X-Goog-SignedHeaders=host\n\
         host:storage.googleapis.com\n\
         \n\
         host\n\
         UNSIGNED-PAYLOAD"
    );
    let lines: Vec<&str> = r.string_to_sign.lines().collect();
    assert_eq!(lines[..3], ["GOOG4-RSA-SHA256", "20190301T190859Z", "20190301/auto/storage/goog4_request"]);
    assert_eq!(lines[3].len(), 64);
    assert_eq!(reference_encode("a b+é/c", true), "a%20b%2B%C3%A9/c");
}

#[tokio::test]
async fn signed_url_ttl_is_clamped_to_seven_days() {
    let backend = GcsBackend::build(key_config(None)).await.unwrap();
    let signed = backend.signed_url("a/b.ndjson", Duration::from_secs(30 * 24 * 3600)).await.unwrap();
    assert_eq!(query_param(&signed.url, "X-Goog-Expires"), "604800");
    assert_eq!(signed.expires, signed_url_date(&signed.url).unwrap() + MAX_SIGNED_URL_TTL);

    let signed = backend.signed_url("a/b.ndjson", Duration::from_millis(10)).await.unwrap();
    assert_eq!(query_param(&signed.url, "X-Goog-Expires"), "1");
    assert_eq!(clamp_ttl(Duration::from_millis(90_500)), Duration::from_secs(90));
}

#[tokio::test]
async fn emulator_without_key_signs_with_placeholder() {
    let config = GcsConfig { bucket: "b".into(), endpoint: Some("http://127.0.0.1:80/".into()), service_account: None };
    let backend = GcsBackend::build(config).await.unwrap();
    assert_eq!(backend.describe(), "gs://b");
    let signed = backend.signed_url("x/y.ndjson", Duration::from_secs(60)).await.unwrap();
    assert!(signed.url.starts_with("http://127.0.0.1:80/b/x/y.ndjson?X-Goog-Algorithm="), "{}", signed.url);
}

#[test]
fn debug_hides_the_private_key() {
    let text = format!("{:?}", key_config(None));
    assert!(text.contains(TEST_EMAIL));
    assert!(text.contains("[redacted]"));
    assert!(!text.contains("PRIVATE KEY") && !text.contains("MIIE"), "{text}");
}

#[tokio::test]
async fn bad_configuration_is_reported_without_secrets() {
    let mut config = key_config(None);
    let key = config.service_account.as_mut().unwrap();
    key.private_key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ1dC1icm9rZW4=\n-----END PRIVATE KEY-----\n".into();
    let err = GcsBackend::build(config).await.unwrap_err().to_string();
    assert!(err.contains("gs://sluice-kat-bucket") && err.contains(TEST_EMAIL), "{err}");
    assert!(!err.contains("c2VjcmV0"), "{err}");

    let mut config = key_config(None);
    config.service_account.as_mut().unwrap().private_key = "-----BEGIN RSA PRIVATE KEY-----\n...".into();
    let err = GcsBackend::build(config).await.unwrap_err().to_string();
    assert!(err.contains("PKCS#8"), "{err}");

    let config = GcsConfig { bucket: "b".into(), endpoint: Some("localhost:80".into()), service_account: None };
    let err = GcsBackend::build(config).await.unwrap_err().to_string();
    assert!(err.contains("http://"), "{err}");

    let config = GcsConfig { bucket: "".into(), endpoint: None, service_account: None };
    assert!(GcsBackend::build(config).await.is_err());
}

#[test]
fn sdk_errors_are_classified() {
    use google_cloud_storage::Error;
    let http = |code: u16| Error::http(code, http::HeaderMap::new(), Bytes::from_static(b"{}"));
    for code in [408, 429, 500, 502, 503] {
        assert_eq!(classify_sdk_error(&http(code)), ErrorClass::Transient, "{code}");
    }
    assert_eq!(classify_sdk_error(&http(403)), ErrorClass::Denied);
    assert_eq!(classify_sdk_error(&http(401)), ErrorClass::Denied);
    assert_eq!(classify_sdk_error(&http(404)), ErrorClass::NoBucket);
    assert_eq!(classify_sdk_error(&http(400)), ErrorClass::Permanent);
    assert_eq!(classify_sdk_error(&Error::timeout("slow")), ErrorClass::Transient);
    assert_eq!(classify_sdk_error(&Error::io("reset")), ErrorClass::Transient);
    assert_eq!(classify_sdk_error(&Error::connect("refused")), ErrorClass::Transient);
    assert_eq!(classify_sdk_error(&Error::ser("bad")), ErrorClass::Permanent);
}

#[test]
fn helpers() {
    assert_eq!(
        json_error_message(br#"{"error":{"code":404,"message":"The specified bucket does not exist."}}"#),
        "The specified bucket does not exist."
    );
    assert_eq!(json_error_message(b"  plain\ntext "), "plain text");
    assert_eq!(short(&"x".repeat(400)).len(), 303);
    assert_eq!(encode("a/b c+é~"), "a%2Fb%20c%2B%C3%A9~");
    let date = signed_url_date("http://h/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Date=20240301T120005Z&x=1");
    assert_eq!(date, Some(time::macros::datetime!(2024-03-01 12:00:05 UTC)));
    assert_eq!(signed_url_date("http://h/b/o?X-Goog-Date=bad"), None);
}

#[tokio::test]
async fn channel_source_ends_only_when_told() {
    let (tx, rx) = mpsc::channel(1);
    let mut source = ChannelSource { rx, ended: false };
    tx.send(Feed::Part(Bytes::from_static(b"ab"))).await.unwrap();
    assert_eq!(source.next().await.unwrap().unwrap(), Bytes::from_static(b"ab"));
    tx.send(Feed::End).await.unwrap();
    assert!(source.next().await.is_none());
    assert!(source.next().await.is_none());

    // Closed without `End`: an error, so the SDK never finalizes a partial object.
    let (tx, rx) = mpsc::channel(1);
    let mut source = ChannelSource { rx, ended: false };
    tx.send(Feed::Part(Bytes::from_static(b"ab"))).await.unwrap();
    drop(tx);
    assert!(source.next().await.unwrap().is_ok());
    assert!(source.next().await.unwrap().is_err());
}
