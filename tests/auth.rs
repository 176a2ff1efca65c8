//! SMART Backend Services authorization against the real binary (D22, D23, D32, D36-D41): the
//! discovery document and the CapabilityStatement's security, the root client guarding
//! configuration and `Client` resources, the token endpoint (signed assertions, RS384 and
//! ES384, inline keys and `jwks_uri`, every refusal RFC 6749 names), bearer tokens on every
//! FHIR request, scopes limiting exports and REST writes, exports belonging to their client,
//! bearer-protected downloads, tokens of an external issuer, `--auth none` refusing a public
//! address, and the audit trail those requests leave (without tokens or secrets).
//!
//! Keys are generated with the `openssl` CLI; assertions and external tokens are signed with
//! `jsonwebtoken`. A client's `jwks_uri` and the external issuer are served by a tiny HTTP
//! server in the test ([`JsonServer`]).

mod common;

use base64::Engine as _;
use common::*;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The root client's secret given to every server here.
const ROOT_SECRET: &str = "r00t-Secret-5b1f0c7d";
/// A storage secret: never shown back, never audited or logged.
const AWS_SECRET: &str = "aws-Secret-9e2d4a61";
/// The only client assertion type.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `serve` flags of a SMART server with the root client and the audit trail.
const SMART: [&str; 6] = ["--auth", "smart", "--root-client-secret", ROOT_SECRET, "--audit", "true"];

/// SMART flags plus `extra`.
fn smart_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    SMART.iter().copied().chain(extra.iter().copied()).collect()
}

// ---------------------------------------------------------------------------------------
// Keys, assertions and tokens
// ---------------------------------------------------------------------------------------

/// A private key (PKCS#8 PEM, made by `openssl genpkey`).
struct Key {
    alg: Algorithm,
    pem: Vec<u8>,
}

impl Key {
    fn generate(dir: &std::path::Path, name: &str, alg: Algorithm) -> Key {
        let path = dir.join(name);
        let args: &[&str] = match alg {
            Algorithm::RS384 => &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Algorithm::ES384 => &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            other => panic!("no key for {other:?}"),
        };
        let out = std::process::Command::new("openssl")
            .args(args)
            .arg("-out")
            .arg(&path)
            .output()
            .expect("running openssl (the OpenSSL command line tool)");
        assert!(out.status.success(), "openssl genpkey: {}", String::from_utf8_lossy(&out.stderr));
        Key { alg, pem: std::fs::read(&path).expect("reading the generated key") }
    }

    fn encoding(&self) -> EncodingKey {
        match self.alg {
            Algorithm::ES384 => EncodingKey::from_ec_pem(&self.pem).expect("an EC key"),
            _ => EncodingKey::from_rsa_pem(&self.pem).expect("an RSA key"),
        }
    }

    /// The public JWK, named `kid`, for `alg`.
    fn jwk_for(&self, kid: &str, alg: Algorithm) -> Value {
        let mut jwk = Jwk::from_encoding_key(&self.encoding(), alg).expect("a public JWK");
        jwk.common.key_id = Some(kid.to_string());
        serde_json::to_value(jwk).expect("JWK as JSON")
    }

    /// The public JWK, named `kid`, for the key's own algorithm.
    fn jwk(&self, kid: &str) -> Value {
        self.jwk_for(kid, self.alg)
    }

    /// A JWT of `claims`, signed with `alg` and naming `kid`.
    fn sign_as(&self, alg: Algorithm, kid: &str, claims: &Value) -> String {
        let header = Header { kid: Some(kid.to_string()), ..Header::new(alg) };
        jsonwebtoken::encode(&header, claims, &self.encoding()).expect("signing a JWT")
    }

    /// A JWT of `claims`, signed with the key's own algorithm, naming `kid`.
    fn sign(&self, kid: &str, claims: &Value) -> String {
        self.sign_as(self.alg, kid, claims)
    }
}

/// The keys of this test binary: made once.
struct Keys {
    rsa: Key,
    /// Another RSA key: signs what must not verify with `rsa`'s public key.
    rsa_other: Key,
    ec: Key,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        Keys {
            rsa: Key::generate(dir.path(), "rsa.pem", Algorithm::RS384),
            rsa_other: Key::generate(dir.path(), "rsa-other.pem", Algorithm::RS384),
            ec: Key::generate(dir.path(), "ec.pem", Algorithm::ES384),
        }
    })
}

/// Unix seconds now.
fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Now, as a FHIR instant (for `AuditEvent?date=ge..`).
fn now_instant() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).expect("an instant")
}

fn token_url(srv: &Server) -> String {
    format!("{}/auth/token", srv.url)
}

/// The claims of a valid client assertion of `client` for `srv` (a fresh `jti`).
fn assertion_claims(srv: &Server, client: &str) -> Value {
    json!({
        "iss": client,
        "sub": client,
        "aud": token_url(srv),
        "exp": now() + 60,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

/// `POST /auth/token` with a form.
fn token_request(srv: &Server, form: &[(&str, &str)]) -> Resp {
    let body: Vec<String> = form.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
    send(
        "POST",
        &token_url(srv),
        &[("content-type", "application/x-www-form-urlencoded"), ("accept", "application/json")],
        Some(body.join("&").as_bytes()),
    )
}

/// A complete client_credentials form for `assertion`, asking for `scope`.
fn token_form<'a>(scope: &'a str, assertion: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("scope", scope),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion),
    ]
}

/// Asks for a token for `client` (its key `key`, named `kid`) with `scope`.
fn request_token(srv: &Server, client: &str, key: &Key, kid: &str, scope: &str) -> Resp {
    let assertion = key.sign(kid, &assertion_claims(srv, client));
    token_request(srv, &token_form(scope, &assertion))
}

/// A token answer's checks; returns the answer.
fn assert_token(r: &Resp, scope: &str) -> Value {
    assert_eq!(r.status, 200, "token request refused: {}", r.text());
    assert_eq!(r.media_type(), "application/json");
    assert_eq!(r.header("cache-control"), Some("no-store"), "a token answer is never cached");
    assert_eq!(r.header("pragma"), Some("no-cache"));
    let t = r.json();
    assert!(t["access_token"].as_str().is_some_and(|s| !s.is_empty()), "no access_token: {t}");
    assert_eq!(t["token_type"], "bearer", "{t}");
    assert!(t["expires_in"].as_u64().is_some_and(|n| n > 0), "expires_in: {t}");
    assert_eq!(t["scope"], scope, "the scope granted: {t}");
    t
}

/// A token for `client` with `scope` (all of it granted).
fn token(srv: &Server, client: &str, key: &Key, kid: &str, scope: &str) -> String {
    let t = assert_token(&request_token(srv, client, key, kid, scope), scope);
    t["access_token"].as_str().unwrap().to_string()
}

/// Asserts an RFC 6749 error answer: `status`, JSON `{error, error_description}` not
/// cached, the description mentioning each of `mentions`.
fn assert_oauth_error(r: &Resp, status: u16, error: &str, mentions: &[&str]) {
    assert_eq!(r.status, status, "expected {status} {error}, got: {}", r.text());
    assert_eq!(r.media_type(), "application/json", "an OAuth error is JSON");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let e = r.json();
    assert_eq!(e["error"], error, "{e}");
    let description = e["error_description"].as_str().unwrap_or_default();
    assert!(!description.is_empty(), "no error_description: {e}");
    for m in mentions {
        assert!(description.contains(m), "error_description does not mention {m:?}: {description}");
    }
    assert!(e.get("access_token").is_none(), "a refusal carries no token: {e}");
}

/// `Authorization: Bearer <token>`.
fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `Authorization: Basic <user:password>`.
fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// The root client's `Authorization`.
fn root() -> String {
    basic("root", ROOT_SECRET)
}

/// An Aidbox-shaped `Client` allowed `scope`, with `keys` (`{"jwks": ..}` or
/// `{"jwks_uri": ..}`).
fn client_body(scope: &[&str], keys: Value) -> Value {
    let mut c = json!({
        "resourceType": "Client",
        "grant_types": ["client_credentials"],
        "auth": {"client_credentials": {
            "client_assertion_types": [JWT_BEARER],
            "access_token_expiration": 120,
            "token_format": "jwt"
        }},
        "scope": scope,
    });
    for (k, v) in keys.as_object().expect("keys") {
        c[k] = v.clone();
    }
    c
}

/// `{"jwks": {"keys": [<key's JWK named kid>]}}`.
fn inline_keys(key: &Key, kid: &str) -> Value {
    json!({"jwks": {"keys": [key.jwk(kid)]}})
}

/// `PUT /Client/<id>` as `auth`.
fn put_client(srv: &Server, id: &str, body: &Value, auth: &str) -> Resp {
    send(
        "PUT",
        &format!("{}/Client/{id}", srv.url),
        &[("content-type", "application/json"), ("authorization", auth)],
        Some(body.to_string().as_bytes()),
    )
}

/// Registers client `id` as root (201).
fn register(srv: &Server, id: &str, body: &Value) {
    let r = put_client(srv, id, body, &root());
    assert_eq!(r.status, 201, "PUT /Client/{id}: {}", r.text());
}

// ---------------------------------------------------------------------------------------
// Refusals, exports and the audit trail
// ---------------------------------------------------------------------------------------

/// Asserts a 401 OperationOutcome (issue code `login`) with a `WWW-Authenticate`
/// challenge starting with `scheme`; returns the challenge.
fn assert_unauthorized(r: &Resp, mentions: &[&str], scheme: &str) -> String {
    let oo = assert_outcome(r, 401, mentions);
    assert_eq!(oo["issue"][0]["code"], "login", "{oo}");
    let challenge = r.header("www-authenticate").unwrap_or_else(|| panic!("a 401 without WWW-Authenticate: {oo}"));
    assert!(challenge.starts_with(scheme), "WWW-Authenticate {challenge:?} does not start with {scheme}");
    challenge.to_string()
}

/// Asserts a 401 for a bearer token that is not valid (RFC 6750 `invalid_token`).
fn assert_invalid_token(r: &Resp, mentions: &[&str]) {
    let challenge = assert_unauthorized(r, mentions, "Bearer");
    assert!(challenge.contains("error=\"invalid_token\""), "WWW-Authenticate {challenge:?}");
}

/// Asserts a 403 OperationOutcome (issue code `forbidden`); returns it.
fn assert_forbidden(r: &Resp, mentions: &[&str]) -> Value {
    let oo = assert_outcome(r, 403, mentions);
    assert_eq!(oo["issue"][0]["code"], "forbidden", "{oo}");
    assert!(r.header("www-authenticate").is_none(), "a 403 is not a challenge");
    oo
}

/// A GET kick-off at `url` with `Authorization: auth`.
fn kickoff_as(url: &str, auth: &str) -> Resp {
    send("GET", url, &[("accept", "application/fhir+json"), ("prefer", "respond-async"), ("authorization", auth)], None)
}

/// `method url` with `Authorization: auth` (and a FHIR JSON body).
fn send_as(method: &str, url: &str, auth: &str, body: Option<&Value>) -> Resp {
    match body {
        Some(b) => send(
            method,
            url,
            &[("authorization", auth), ("content-type", "application/fhir+json")],
            Some(b.to_string().as_bytes()),
        ),
        None => send(method, url, &[("authorization", auth)], None),
    }
}

/// Polls a status URL as `auth` until the export stops running, waiting the `Retry-After`
/// the server asks for (as [`poll_until_done`] does).
fn poll_as(status_url: &str, auth: &str) -> Resp {
    let started = Instant::now();
    loop {
        let r = send_as("GET", status_url, auth, None);
        if r.status != 202 && r.status != 429 {
            return r;
        }
        let wait = r.retry_after();
        assert!(
            started.elapsed() + Duration::from_secs(wait) < Duration::from_secs(120),
            "{status_url} never finished"
        );
        std::thread::sleep(Duration::from_secs(wait));
    }
}

/// The id at the end of a status URL.
fn export_id(status_url: &str) -> String {
    status_url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string()
}

/// The AuditEvents recorded since `since` (and by `agent`), as root; returns the Bundle's
/// resources and the whole response text.
fn audit_events(srv: &Server, since: &str, agent: Option<&str>) -> (Vec<Value>, String) {
    let mut params = vec![("date", format!("ge{since}")), ("_count", "1000".to_string())];
    if let Some(a) = agent {
        params.push(("agent", a.to_string()));
    }
    let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = send_as("GET", &with_query(&format!("{}/AuditEvent", srv.url), &params), &root(), None);
    assert_eq!(r.status, 200, "GET /AuditEvent: {}", r.text());
    assert_eq!(r.media_type(), "application/fhir+json");
    let b = r.json();
    assert_eq!((b["resourceType"].as_str(), b["type"].as_str()), (Some("Bundle"), Some("searchset")), "{b}");
    let events: Vec<Value> = b["entry"].as_array().expect("entries").iter().map(|e| e["resource"].clone()).collect();
    for e in &events {
        assert_eq!(e["resourceType"], "AuditEvent", "{e}");
        if let Some(a) = agent {
            assert_eq!(e["agent"][0]["who"]["identifier"]["value"], a, "agent={a} returned another agent's event");
        }
    }
    (events, r.text())
}

/// What an AuditEvent says, in short.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Audited {
    /// `type.code`: 110106 (export), 110114 (token), rest.
    ty: String,
    /// `subtype[0].code`: kickoff, complete, fail, download, cancel, token, update, delete.
    subtype: String,
    /// `outcome`: "0" success, "4" refused.
    outcome: String,
    /// `agent[0].who.identifier.value`, or `None` for an anonymous agent.
    agent: Option<String>,
    /// The entity: an identifier's value or a reference.
    entity: Option<String>,
}

fn audited(e: &Value) -> Audited {
    let s = |v: &Value| v.as_str().map(str::to_string);
    let what = &e["entity"][0]["what"];
    Audited {
        ty: s(&e["type"]["code"]).unwrap_or_default(),
        subtype: s(&e["subtype"][0]["code"]).unwrap_or_default(),
        outcome: s(&e["outcome"]).unwrap_or_default(),
        agent: s(&e["agent"][0]["who"]["identifier"]["value"]),
        entity: s(&what["identifier"]["value"]).or_else(|| s(&what["reference"])),
    }
}

/// The first event of type `ty`, subtype `subtype` and `outcome` by `agent` (`None`:
/// anonymous), if any.
fn find<'a>(events: &'a [Value], ty: &str, subtype: &str, outcome: &str, agent: Option<&str>) -> Option<&'a Value> {
    events.iter().find(|e| {
        let a = audited(e);
        a.ty == ty && a.subtype == subtype && a.outcome == outcome && a.agent.as_deref() == agent
    })
}

/// Asserts an event is there; returns it.
fn expect_event<'a>(events: &'a [Value], ty: &str, subtype: &str, outcome: &str, agent: Option<&str>) -> &'a Value {
    find(events, ty, subtype, outcome, agent).unwrap_or_else(|| {
        let seen: BTreeSet<Audited> = events.iter().map(audited).collect();
        panic!("no AuditEvent {ty}/{subtype} outcome {outcome} by {agent:?}; recorded: {seen:#?}")
    })
}

/// A completion is recorded right after the job is saved `Completed`: it may land just
/// after the manifest is served. Asks again (without sleeping) until it is there, for at
/// most 10 s.
fn await_event(srv: &Server, since: &str, ty: &str, subtype: &str, agent: &str, entity: &str) -> Value {
    let started = Instant::now();
    loop {
        let (events, _) = audit_events(srv, since, Some(agent));
        if let Some(e) = events.iter().find(|e| {
            let a = audited(e);
            a.ty == ty && a.subtype == subtype && a.entity.as_deref() == Some(entity)
        }) {
            return e.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no AuditEvent {subtype} for {entity} by {agent}");
        std::thread::yield_now();
    }
}

/// Asserts none of `secrets` appears in the audit trail or the server's log.
fn assert_nothing_leaks(srv: &Server, since: &str, secrets: &[&str]) {
    let (events, text) = audit_events(srv, since, None);
    assert!(!events.is_empty(), "the audit trail is empty");
    let log = std::fs::read_to_string(srv.dir.join("server.log")).expect("the server log");
    for s in secrets {
        assert!(!s.is_empty());
        assert!(!text.contains(s), "a token or secret is in the audit trail: {s}");
        assert!(!log.contains(s), "a token or secret is in the server log: {s}");
    }
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP server of JSON documents (a client's jwks_uri, an external issuer)
// ---------------------------------------------------------------------------------------

/// Serves fixed JSON documents by path, with `Cache-Control: max-age=60`; counts requests.
struct JsonServer {
    /// `http://127.0.0.1:<port>`.
    url: String,
    docs: Arc<Mutex<BTreeMap<String, Value>>>,
    hits: Arc<Mutex<Vec<String>>>,
}

impl JsonServer {
    fn start() -> JsonServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let docs: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
        let hits: Arc<Mutex<Vec<String>>> = Arc::default();
        let (d, h) = (docs.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("cloning a socket"));
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    continue;
                }
                // The rest of the head (no bodies: only GETs are expected).
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim_end() != "" {
                    line.clear();
                }
                let path = first.split_whitespace().nth(1).unwrap_or_default().to_string();
                h.lock().unwrap().push(path.clone());
                let doc = d.lock().unwrap().get(&path).cloned();
                let (status, body) = match doc {
                    Some(v) => ("200 OK", v.to_string()),
                    None => ("404 Not Found", "{}".to_string()),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nCache-Control: max-age=60\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JsonServer { url, docs, hits }
    }

    fn serve(&self, path: &str, doc: Value) {
        self.docs.lock().unwrap().insert(path.to_string(), doc);
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().iter().filter(|p| *p == path).count()
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

/// Discovery (no token needed), the CapabilityStatement's security, and the root client
/// guarding configuration resources, `Client`s and the audit trail.
#[test]
fn discovery_and_root_client() {
    let since = now_instant();
    let mut srv = Server::empty(&SMART);
    let keys = keys();

    let r = get(&srv.fhir("/.well-known/smart-configuration"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.media_type(), "application/json");
    let c = r.json();
    assert_eq!(c["token_endpoint"], token_url(&srv), "{c}");
    let has = |field: &str, v: &str| c[field].as_array().is_some_and(|a| a.iter().any(|x| x == v));
    assert!(has("grant_types_supported", "client_credentials"), "{c}");
    assert!(has("token_endpoint_auth_methods_supported", "private_key_jwt"), "{c}");
    assert!(has("token_endpoint_auth_signing_alg_values_supported", "RS384"), "{c}");
    assert!(has("token_endpoint_auth_signing_alg_values_supported", "ES384"), "{c}");
    assert!(has("capabilities", "client-confidential-asymmetric"), "{c}");
    assert!(has("scopes_supported", "system/*.read"), "{c}");

    let r = get(&srv.fhir("/metadata"));
    assert_eq!(r.status, 200, "the CapabilityStatement needs no token: {}", r.text());
    let cs = r.json();
    let security = &cs["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR", "{security}");
    let oauth = security["extension"]
        .as_array()
        .and_then(|a| {
            a.iter().find(|e| e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris")
        })
        .unwrap_or_else(|| panic!("no oauth-uris extension: {security}"));
    let token_uri = oauth["extension"].as_array().unwrap().iter().find(|e| e["url"] == "token").expect("token uri");
    assert_eq!(token_uri["valueUri"], token_url(&srv));

    // Configuration: root only.
    let aws_url = format!("{}/AwsAccount/acc", srv.url);
    let aws = json!({"region": "eu-west-1", "access-key-id": "AKID", "secret-access-key": AWS_SECRET});
    let put_aws = |auth: Option<&str>| {
        let mut h = vec![("content-type", "application/json")];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        send("PUT", &aws_url, &h, Some(aws.to_string().as_bytes()))
    };
    let challenge = assert_unauthorized(&put_aws(None), &["root"], "Basic");
    assert!(challenge.contains("Bearer"), "the challenge offers both schemes: {challenge}");
    assert_unauthorized(&put_aws(Some(&basic("root", "not-the-secret"))), &["wrong"], "Basic");
    assert_invalid_token(&put_aws(Some("Bearer not-a-jwt")), &[]);

    // A client, even with every scope, is not the administrator.
    let admin_wannabe = client_body(&["system/*.*"], inline_keys(&keys.rsa, "aw-1"));
    register(&srv, "admin-wannabe", &admin_wannabe);
    let wannabe = token(&srv, "admin-wannabe", &keys.rsa, "aw-1", "system/*.*");
    assert_forbidden(&put_aws(Some(&bearer(&wannabe))), &["root client"]);
    assert_outcome(&send_as("GET", &aws_url, &root(), None), 404, &["AwsAccount/acc"]);

    let r = put_aws(Some(&root()));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(!r.text().contains(AWS_SECRET), "PUT answers with the secret");
    let r = send_as("GET", &aws_url, &root(), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"region": "eu-west-1", "access-key-id": "AKID", "resourceType": "AwsAccount", "id": "acc"})
    );
    assert_forbidden(&send_as("GET", &aws_url, &bearer(&wannabe), None), &["root client"]);
    assert_unauthorized(&get(&aws_url), &[], "Basic");
    assert_forbidden(&send_as("DELETE", &aws_url, &bearer(&wannabe), None), &["root client"]);
    assert_eq!(send_as("DELETE", &aws_url, &root(), None).status, 204);

    // Client CRUD.
    let client_url = format!("{}/Client/svc", srv.url);
    let svc = client_body(&["system/Patient.read"], inline_keys(&keys.ec, "svc-1"));
    assert_unauthorized(&send("PUT", &client_url, &[], Some(svc.to_string().as_bytes())), &[], "Basic");
    assert_forbidden(&put_client(&srv, "svc", &svc, &bearer(&wannabe)), &["root client"]);
    let r = put_client(&srv, "svc", &svc, &root());
    assert_eq!(r.status, 201, "{}", r.text());
    let mut stored = svc.clone();
    stored["id"] = json!("svc");
    assert_eq!(r.json(), stored, "PUT answers with the Client");
    let r = send_as("GET", &client_url, &root(), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), stored, "GET returns the Client as stored");
    assert_forbidden(&send_as("GET", &client_url, &bearer(&wannabe), None), &["root client"]);
    let svc_token = token(&srv, "svc", &keys.ec, "svc-1", "system/Patient.read");
    // Replaced: the new scopes apply to the next token.
    let mut svc2 = svc.clone();
    svc2["scope"] = json!(["system/Patient.read", "system/Observation.read"]);
    assert_eq!(put_client(&srv, "svc", &svc2, &root()).status, 200, "a second PUT replaces");
    token(&srv, "svc", &keys.ec, "svc-1", "system/Patient.read system/Observation.read");
    // What is not a usable client is refused, saying why.
    let mut with_secret = svc.clone();
    with_secret["secret"] = json!("s3cret");
    assert_outcome(&put_client(&srv, "bad", &with_secret, &root()), 400, &["secrets are not supported"]);
    let mut no_keys = svc.clone();
    no_keys.as_object_mut().unwrap().remove("jwks");
    assert_outcome(&put_client(&srv, "bad", &no_keys, &root()), 400, &["jwks"]);
    let mut private = keys.ec.jwk("svc-1");
    private["d"] = json!("cHJpdmF0ZQ");
    let mut with_private = svc.clone();
    with_private["jwks"] = json!({"keys": [private]});
    assert_outcome(&put_client(&srv, "bad", &with_private, &root()), 400, &["private"]);
    let mut bad_scope = svc.clone();
    bad_scope["scope"] = json!(["patient/*.read"]);
    assert_outcome(&put_client(&srv, "bad", &bad_scope, &root()), 400, &["patient/*.read"]);
    assert_outcome(&send_as("GET", &format!("{}/Client/bad", srv.url), &root(), None), 404, &[]);
    // Deleted: its assertions no longer get tokens.
    assert_forbidden(&send_as("DELETE", &client_url, &bearer(&wannabe), None), &["root client"]);
    assert_eq!(send_as("DELETE", &client_url, &root(), None).status, 204);
    assert_outcome(&send_as("GET", &client_url, &root(), None), 404, &["Client/svc"]);
    assert_outcome(&send_as("DELETE", &client_url, &root(), None), 404, &["Client/svc"]);
    let r = request_token(&srv, "svc", &keys.ec, "svc-1", "system/Patient.read");
    assert_oauth_error(&r, 401, "invalid_client", &["svc"]);

    // The audit trail: root only.
    let audit_url = format!("{}/AuditEvent", srv.url);
    assert_unauthorized(&get(&audit_url), &[], "Basic");
    assert_forbidden(&send_as("GET", &audit_url, &bearer(&wannabe), None), &["root client"]);
    assert_outcome(&send_as("GET", &format!("{audit_url}?nope=1"), &root(), None), 400, &["nope"]);
    let (events, _) = audit_events(&srv, &since, None);
    let e = expect_event(&events, "rest", "update", "0", Some("root"));
    assert!(events.iter().any(|e| {
        let a = audited(e);
        (a.subtype.as_str(), a.outcome.as_str(), a.entity.as_deref()) == ("update", "0", Some("Client/svc"))
    }));
    assert_eq!(e["action"], "U");
    let refused = events
        .iter()
        .find(|e| {
            let a = audited(e);
            (a.subtype.as_str(), a.outcome.as_str(), a.entity.as_deref()) == ("update", "4", Some("AwsAccount/acc"))
        })
        .unwrap_or_else(|| panic!("no refused AwsAccount change audited: {events:#?}"));
    assert!(refused["outcomeDesc"].as_str().is_some_and(|d| d.starts_with("401")), "{refused}");
    let forbidden = events.iter().any(|e| {
        let a = audited(e);
        a.entity.as_deref() == Some("Client/svc")
            && a.outcome == "4"
            && e["outcomeDesc"].as_str().is_some_and(|d| d.starts_with("403"))
    });
    assert!(forbidden, "a client's refused Client change is audited: {events:#?}");
    let by_wannabe = events.iter().any(|e| {
        let a = audited(e);
        a.entity.as_deref() == Some("Client/svc") && a.outcome == "4" && a.agent.as_deref() == Some("admin-wannabe")
    });
    assert!(by_wannabe, "a configuration change refused (403) to a client's token names the client: {events:#?}");
    let deleted = events.iter().any(|e| {
        let a = audited(e);
        (a.subtype.as_str(), a.outcome.as_str(), a.agent.as_deref(), a.entity.as_deref())
            == ("delete", "0", Some("root"), Some("Client/svc"))
    });
    assert!(deleted, "the Client's deletion is audited: {events:#?}");
    assert_eq!(expect_event(&events, "rest", "delete", "0", Some("root"))["action"], "D");
    expect_event(&events, "110114", "token", "0", Some("admin-wannabe"));
    expect_event(&events, "110114", "token", "4", Some("svc"));
    assert_nothing_leaks(
        &srv,
        &since,
        &[ROOT_SECRET, AWS_SECRET, &wannabe, &svc_token, &basic("root", ROOT_SECRET)[6..]],
    );
    // `date` as FHIR search has it: a bare date is that whole day (UTC), prefixes bound it.
    let today = &since[..10];
    let total = |params: &[(&str, &str)]| {
        let r = send_as("GET", &with_query(&format!("{}/AuditEvent", srv.url), params), &root(), None);
        assert_eq!(r.status, 200, "{params:?}: {}", r.text());
        r.json()["total"].as_u64().expect("total")
    };
    let all = total(&[("date", today), ("_count", "1000")]);
    assert!(all as usize >= events.len(), "date={today} holds every event of today");
    assert_eq!(total(&[("date", &format!("lt{today}"))]), 0, "nothing before today");
    assert_eq!(total(&[("date", &format!("le{today}")), ("_count", "1000")]), all, "le a date is its end");
    assert_eq!(total(&[("date", &format!("gt{today}"))]), 0, "gt a date is after its end");
    assert_eq!(total(&[("date", &format!("ge{since}")), ("date", &format!("lt{since}"))]), 0);
    assert_outcome(&send_as("GET", &format!("{}/AuditEvent?date=sa{today}", srv.url), &root(), None), 400, &["sa"]);
    srv.assert_alive();

    // Without a root secret, configuration is closed to everyone.
    let closed = Server::empty(&["--auth", "smart", "--root-client-secret="]);
    let r = put_client(&closed, "svc", &svc, &basic("root", ""));
    assert_forbidden(&r, &["BOX_ROOT_CLIENT_SECRET"]);
    let r = send("PUT", &format!("{}/Client/svc", closed.url), &[], Some(svc.to_string().as_bytes()));
    assert_forbidden(&r, &["BOX_ROOT_CLIENT_SECRET"]);
    assert_forbidden(&get(&format!("{}/AuditEvent", closed.url)), &["BOX_ROOT_CLIENT_SECRET"]);
    assert_eq!(get(&closed.fhir("/metadata")).status, 200);
}

/// The token endpoint: RS384 with inline keys and ES384 with `jwks_uri`, then every
/// refusal, each with an assertion of its own.
#[test]
fn token_endpoint() {
    let since = now_instant();
    let srv = Server::empty(&SMART);
    let keys = keys();
    let jwks = JsonServer::start();
    jwks.serve("/jwks", json!({"keys": [keys.ec.jwk("es-1")]}));

    register(&srv, "rs-client", &client_body(&["system/*.read"], inline_keys(&keys.rsa, "rs-1")));
    let es = client_body(
        &["system/Patient.rs", "system/Observation.read"],
        json!({"jwks_uri": format!("{}/jwks", jwks.url)}),
    );
    register(&srv, "es-client", &es);
    let mut off = client_body(&["system/*.read"], inline_keys(&keys.rsa, "off-1"));
    off["active"] = json!(false);
    register(&srv, "off-client", &off);

    // RS384, inline keys: the scopes asked for that the client may have.
    let r = request_token(
        &srv,
        "rs-client",
        &keys.rsa,
        "rs-1",
        "system/Patient.rs system/Observation.read system/Patient.write launch",
    );
    let t = assert_token(&r, "system/Patient.rs system/Observation.read");
    assert_eq!(t["expires_in"], 120, "the client's access_token_expiration");
    let rs_token = t["access_token"].as_str().unwrap().to_string();
    // The token works (a read it permits), a tampered one does not.
    let read = |auth: &str| send_as("GET", &srv.fhir("/Patient/nobody"), auth, None);
    assert_outcome(&read(&bearer(&rs_token)), 404, &["nobody"]);
    assert_unauthorized(&get(&srv.fhir("/Patient/nobody")), &["/auth/token"], "Bearer");
    let (signed_part, signature) = rs_token.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{signed_part}.{flipped}{}", &signature[1..]);
    assert_invalid_token(&read(&bearer(&tampered)), &[]);
    assert_invalid_token(&read("Bearer not-a-jwt"), &["not a JWT"]);
    assert_unauthorized(&read("Token abc"), &["Bearer"], "Bearer");
    // A token of another server is not accepted here.
    let other = Server::empty(&SMART);
    register(&other, "rs-client", &client_body(&["system/*.read"], inline_keys(&keys.rsa, "rs-1")));
    let foreign = token(&other, "rs-client", &keys.rsa, "rs-1", "system/Patient.rs");
    assert_invalid_token(&read(&bearer(&foreign)), &[]);
    drop(other);

    // ES384, keys at the client's jwks_uri: fetched once, then cached (max-age=60).
    let es_token = token(&srv, "es-client", &keys.ec, "es-1", "system/Patient.rs");
    assert_eq!(jwks.hits("/jwks"), 1, "the key set is fetched");
    token(&srv, "es-client", &keys.ec, "es-1", "system/Observation.read system/Patient.rs");
    assert_eq!(jwks.hits("/jwks"), 1, "the key set is cached as Cache-Control allows");
    assert_outcome(&read(&bearer(&es_token)), 404, &["nobody"]);

    // The refusals.
    let claims = || assertion_claims(&srv, "rs-client");
    let signed = |c: &Value| keys.rsa.sign("rs-1", c);
    let scope = "system/Patient.rs";
    let good = signed(&claims());
    let form_with = |drop_field: &str, replace: Option<(&'static str, &'static str)>, assertion: String| {
        let mut f: Vec<(&str, String)> =
            token_form(scope, &assertion).into_iter().map(|(k, v)| (k, v.to_string())).collect();
        f.retain(|(k, _)| *k != drop_field);
        if let Some((k, v)) = replace {
            for e in f.iter_mut().filter(|(fk, _)| *fk == k) {
                e.1 = v.to_string();
            }
        }
        f
    };
    let post = |f: &[(&str, String)]| {
        let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        token_request(&srv, &f)
    };
    let r = post(&form_with("", Some(("grant_type", "password")), signed(&claims())));
    assert_oauth_error(&r, 400, "unsupported_grant_type", &["password"]);
    let r = post(&form_with("grant_type", None, signed(&claims())));
    assert_oauth_error(&r, 400, "invalid_request", &["grant_type"]);
    let r = send(
        "POST",
        &token_url(&srv),
        &[("content-type", "application/json")],
        Some(json!({"grant_type": "client_credentials", "client_assertion": good}).to_string().as_bytes()),
    );
    assert_oauth_error(&r, 400, "invalid_request", &["x-www-form-urlencoded"]);
    let r = post(&form_with("client_assertion_type", None, signed(&claims())));
    assert_oauth_error(&r, 401, "invalid_client", &["client_assertion_type"]);
    let saml = "urn:ietf:params:oauth:client-assertion-type:saml2-bearer";
    let r = post(&form_with("", Some(("client_assertion_type", saml)), signed(&claims())));
    assert_oauth_error(&r, 401, "invalid_client", &["saml2-bearer"]);
    let r = post(&form_with("client_assertion", None, String::new()));
    assert_oauth_error(&r, 401, "invalid_client", &["client_assertion"]);
    let r = post(&form_with("", None, "not.a-jwt".into()));
    assert_oauth_error(&r, 401, "invalid_client", &["JWT"]);
    let mut c = claims();
    c["iss"] = json!("nobody");
    c["sub"] = json!("nobody");
    assert_oauth_error(&post(&form_with("", None, signed(&c))), 401, "invalid_client", &["nobody"]);
    let r = post(&form_with("", None, keys.rsa_other.sign("rs-1", &claims())));
    assert_oauth_error(&r, 401, "invalid_client", &["signature"]);
    let mut c = claims();
    c["aud"] = json!(srv.fhir(""));
    assert_oauth_error(&post(&form_with("", None, signed(&c))), 401, "invalid_client", &["aud", &token_url(&srv)]);
    let mut c = claims();
    c["exp"] = json!(now() - 120);
    assert_oauth_error(&post(&form_with("", None, signed(&c))), 401, "invalid_client", &["expired"]);
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_oauth_error(&post(&form_with("", None, signed(&c))), 401, "invalid_client", &["exp"]);
    let mut c = claims();
    c["exp"] = json!(now() + 900);
    assert_oauth_error(&post(&form_with("", None, signed(&c))), 401, "invalid_client", &["300 seconds"]);
    let mut c = claims();
    c["sub"] = json!("someone-else");
    assert_oauth_error(&post(&form_with("", None, signed(&c))), 401, "invalid_client", &["sub"]);
    let mut c = claims();
    c.as_object_mut().unwrap().remove("jti");
    assert_oauth_error(&post(&form_with("", None, signed(&c))), 401, "invalid_client", &["jti"]);
    // A replayed assertion: its jti was used.
    let once = signed(&claims());
    assert_token(&post(&form_with("", None, once.clone())), scope);
    assert_oauth_error(&post(&form_with("", None, once)), 401, "invalid_client", &["already used"]);
    let r = post(&form_with("", None, keys.rsa.sign("rs-404", &claims())));
    assert_oauth_error(&r, 401, "invalid_client", &["rs-404"]);
    let r = post(&form_with("", None, keys.rsa.sign_as(Algorithm::RS256, "rs-1", &claims())));
    assert_oauth_error(&r, 401, "invalid_client", &["RS256"]);
    let r = request_token(&srv, "off-client", &keys.rsa, "off-1", scope);
    assert_oauth_error(&r, 401, "invalid_client", &["not active"]);
    // Keys at a jwks_uri: an unknown kid (the set is not fetched again within seconds).
    let r = request_token(&srv, "es-client", &keys.ec, "es-404", scope);
    assert_oauth_error(&r, 401, "invalid_client", &["es-404"]);
    // Scopes the client may not have.
    let r = request_token(&srv, "rs-client", &keys.rsa, "rs-1", "system/Patient.write");
    assert_oauth_error(&r, 400, "invalid_scope", &["rs-client", "system/*.read"]);
    let r = request_token(&srv, "rs-client", &keys.rsa, "rs-1", "patient/*.read openid");
    assert_oauth_error(&r, 400, "invalid_scope", &[]);
    let r = post(&form_with("scope", None, signed(&claims())));
    assert_oauth_error(&r, 400, "invalid_scope", &["scope"]);
    let r = request_token(&srv, "es-client", &keys.ec, "es-1", "system/Condition.rs");
    assert_oauth_error(&r, 400, "invalid_scope", &["es-client"]);

    // Audited: issued and refused, the refusal's reason said, no token or assertion in it.
    let (events, _) = audit_events(&srv, &since, Some("rs-client"));
    let issued = expect_event(&events, "110114", "token", "0", Some("rs-client"));
    let desc = issued["outcomeDesc"].as_str().unwrap_or_default();
    assert!(desc.contains("system/Patient.rs system/Observation.read"), "{issued}");
    let refusals: Vec<String> = events
        .iter()
        .filter(|e| audited(e).outcome == "4")
        .map(|e| e["outcomeDesc"].as_str().unwrap_or_default().to_string())
        .collect();
    for expected in ["invalid_client", "invalid_scope", "signature", "already used", "RS256"] {
        assert!(refusals.iter().any(|d| d.contains(expected)), "no refusal audited with {expected:?}: {refusals:#?}");
    }
    expect_event(&events, "110114", "token", "4", Some("rs-client"));
    let (all, _) = audit_events(&srv, &since, None);
    expect_event(&all, "110114", "token", "0", Some("es-client"));
    expect_event(&all, "110114", "token", "4", Some("off-client"));
    expect_event(&all, "110114", "token", "4", None);
    assert_nothing_leaks(&srv, &since, &[ROOT_SECRET, &rs_token, &es_token, &good]);
}

/// Tokens on every FHIR request, and scopes limiting exports and REST writes: an explicit
/// `_type` outside them refused, the types left out of an export without `_type` said in
/// the manifest's `error`; exports belong to their client.
#[test]
fn scopes_and_export_ownership() {
    let since = now_instant();
    let srv = Server::loaded(&SMART);
    let keys = keys();
    let reference = reference();
    register(
        &srv,
        "narrow",
        &client_body(&["system/Patient.rs", "system/Condition.rs"], inline_keys(&keys.rsa, "n-1")),
    );
    register(&srv, "reader", &client_body(&["system/*.read"], inline_keys(&keys.ec, "r-1")));
    let narrow_token = token(&srv, "narrow", &keys.rsa, "n-1", "system/Patient.rs system/Condition.rs");
    let reader_token = token(&srv, "reader", &keys.ec, "r-1", "system/*.read");
    let (narrow, reader) = (bearer(&narrow_token), bearer(&reader_token));

    // No token, or not a valid one.
    let system = srv.fhir("/$export");
    let r = send("GET", &system, &[("accept", "application/fhir+json"), ("prefer", "respond-async")], None);
    assert_unauthorized(&r, &["bearer token", "/auth/token"], "Bearer");
    assert_invalid_token(&kickoff_as(&system, "Bearer not-a-jwt"), &[]);
    assert_unauthorized(&kickoff_as(&system, &basic("root", "wrong")), &[], "Basic");
    assert_unauthorized(&get(&srv.fhir(&format!("/Group/{GROUP_ID}/$export"))), &[], "Bearer");
    assert_unauthorized(&get(&srv.fhir("/Patient/$export")), &[], "Bearer");

    // Explicit types outside the scopes, a Group, REST writes: 403.
    let url = with_query(&system, &[("_type", "Patient,Observation,Condition,Encounter")]);
    let oo = assert_forbidden(&kickoff_as(&url, &narrow), &["Observation", "Encounter"]);
    let diagnostics = oo["issue"][0]["diagnostics"].as_str().unwrap();
    let named = diagnostics.split_once("exporting ").and_then(|(_, rest)| rest.split_once(':')).map(|(t, _)| t);
    let named: BTreeSet<&str> = named.unwrap_or_else(|| panic!("no types named: {diagnostics}")).split(", ").collect();
    assert_eq!(named, BTreeSet::from(["Encounter", "Observation"]), "the types refused: {diagnostics}");
    let group = srv.fhir(&format!("/Group/{GROUP_ID}/$export"));
    assert_forbidden(&kickoff_as(&group, &narrow), &["Group"]);
    let provenance = with_query(&system, &[("includeAssociatedData", "LatestProvenanceResources")]);
    assert_forbidden(&kickoff_as(&provenance, &narrow), &["exporting Provenance"]);
    let patient_id = reference.patient_ids()[0].to_string();
    let patient_url = srv.fhir(&format!("/Patient/{patient_id}"));
    let before = send_as("GET", &patient_url, &narrow, None);
    assert_eq!(before.status, 200, "system/Patient.rs reads a Patient: {}", before.text());
    let mut changed = before.json();
    changed["gender"] = json!("other");
    assert_forbidden(&send_as("PUT", &patient_url, &narrow, Some(&changed)), &["system/Patient.c"]);
    assert_forbidden(&send_as("DELETE", &patient_url, &narrow, None), &["system/Patient.d"]);
    assert_forbidden(
        &send_as("POST", &srv.fhir("/Patient"), &narrow, Some(&json!({"resourceType": "Patient"}))),
        &["Patient"],
    );
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": changed, "request": {"method": "PUT", "url": format!("Patient/{patient_id}")}}]});
    assert_forbidden(&send_as("POST", &srv.fhir(""), &narrow, Some(&tx)), &["Patient"]);
    assert_forbidden(&send_as("PUT", &patient_url, &reader, Some(&changed)), &["Patient"]);
    let after = send_as("GET", &patient_url, &reader, None);
    assert_eq!(after.json(), before.json(), "nothing was written");
    let obs_id = reference.resources["Observation"].keys().next().unwrap();
    assert_forbidden(
        &send_as("GET", &srv.fhir(&format!("/Observation/{obs_id}")), &narrow, None),
        &["system/Observation.r"],
    );

    // Without _type: only the permitted types, the others said in `error`.
    let status_url = assert_accepted(&kickoff_as(&system, &narrow), &srv);
    let id = export_id(&status_url);
    assert_unauthorized(&get(&status_url), &[], "Bearer");
    assert_outcome(&send_as("GET", &status_url, &reader, None), 404, &[&id]);
    assert_outcome(&send_as("DELETE", &status_url, &reader, None), 404, &[&id]);
    let manifest = complete_manifest(&poll_as(&status_url, &narrow), &system);
    assert_eq!(output_types(&manifest), BTreeSet::from(["Condition".to_string(), "Patient".to_string()]));
    check_export(&manifest, &reference.types(&["Patient", "Condition"]));
    let errors = manifest["error"].as_array().expect("error");
    assert_eq!(errors.len(), 1, "one OperationOutcome file: {manifest}");
    assert_eq!(errors[0]["type"], "OperationOutcome");
    let lines = download_entries(&manifest["error"]).remove("OperationOutcome").expect("an OperationOutcome file");
    let issues: Vec<Value> = lines
        .iter()
        .flat_map(|l| serde_json::from_str::<Value>(l).expect("JSON")["issue"].as_array().cloned().unwrap_or_default())
        .collect();
    let withheld = issues
        .iter()
        .find(|i| i["diagnostics"].as_str().is_some_and(|d| d.contains("do not permit")))
        .unwrap_or_else(|| panic!("no issue says which types were left out: {issues:#?}"));
    assert_eq!(withheld["severity"], "information", "{withheld}");
    assert_eq!(withheld["code"], "informational", "{withheld}");
    let diagnostics = withheld["diagnostics"].as_str().unwrap();
    assert!(diagnostics.contains("system/Patient.rs system/Condition.rs"), "{diagnostics}");
    let types: BTreeSet<&str> = diagnostics.rsplit_once(": ").expect("a list of types").1.split(", ").collect();
    for t in ["Observation", "Encounter", "Claim", "Group", "Practitioner"] {
        assert!(types.contains(t), "{t} is not said to be left out: {diagnostics}");
    }
    for t in ["Patient", "Condition"] {
        assert!(!types.contains(t), "{t} is exported, yet said to be left out: {diagnostics}");
    }
    // Still the owner's only: another client cannot see or delete it; root (the
    // administrator) can see it.
    assert_outcome(&send_as("GET", &status_url, &reader, None), 404, &[&id]);
    assert_outcome(&send_as("DELETE", &status_url, &reader, None), 404, &[&id]);
    assert_eq!(send_as("GET", &status_url, &root(), None).status, 200, "root sees every export");
    assert_eq!(send_as("GET", &status_url, &narrow, None).status, 200, "the owner's export is still there");

    // A _typeFilter on a type outside the scopes does not bring it in.
    let filtered = with_query(&system, &[("_typeFilter", "Observation?status=final")]);
    let s = assert_accepted(&kickoff_as(&filtered, &narrow), &srv);
    let m = complete_manifest(&poll_as(&s, &narrow), &filtered);
    assert_eq!(manifest_counts(&m), BTreeMap::from([("Condition".to_string(), 639), ("Patient".to_string(), 100)]));

    // system/*.read covers Group.
    let group_patients = with_query(&group, &[("_type", "Patient")]);
    let group_status = assert_accepted(&kickoff_as(&group_patients, &reader), &srv);
    let m = complete_manifest(&poll_as(&group_status, &reader), &group_patients);
    assert_eq!(manifest_counts(&m), BTreeMap::from([("Patient".to_string(), 100)]));
    // A cancellation (or deletion) by its owner only.
    let all_status = assert_accepted(&kickoff_as(&system, &reader), &srv);
    let all_id = export_id(&all_status);
    assert_outcome(&send_as("DELETE", &all_status, &narrow, None), 404, &[&all_id]);
    assert_unauthorized(&delete(&all_status), &[], "Bearer");
    let r = send_as("DELETE", &all_status, &reader, None);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_outcome(&send_as("GET", &all_status, &reader, None), 404, &[&all_id]);
    let r = send_as("DELETE", &status_url, &narrow, None);
    assert_eq!(r.status, 202, "the owner deletes its finished export: {}", r.text());
    assert_outcome(&send_as("GET", &status_url, &narrow, None), 404, &[&id]);

    // Audited: accepted and refused kick-offs, the completion, the cancellations.
    let (events, _) = audit_events(&srv, &since, Some("narrow"));
    let accepted = expect_event(&events, "110106", "kickoff", "0", Some("narrow"));
    assert_eq!(audited(accepted).entity.as_deref(), Some(id.as_str()));
    assert_eq!(accepted["action"], "E");
    let refused: Vec<&Value> =
        events.iter().filter(|e| audited(e).subtype == "kickoff" && audited(e).outcome == "4").collect();
    assert!(
        refused
            .iter()
            .any(|e| e["outcomeDesc"].as_str().is_some_and(|d| d.starts_with("403") && d.contains("Observation"))),
        "the refused _type kick-off is audited as narrow's: {events:#?}"
    );
    let (all_events, _) = audit_events(&srv, &since, None);
    let group_refusal = all_events.iter().find(|e| {
        let a = audited(e);
        a.subtype == "kickoff"
            && a.outcome == "4"
            && e["outcomeDesc"].as_str().is_some_and(|d| d.starts_with("403") && d.contains(GROUP_ID))
    });
    let group_refusal = group_refusal.unwrap_or_else(|| panic!("the refused Group kick-off is not audited"));
    assert_eq!(
        audited(group_refusal).agent.as_deref(),
        Some("narrow"),
        "a Group kick-off refused for want of Group scope names the client"
    );
    assert!(
        all_events.iter().any(|e| {
            let a = audited(e);
            a.subtype == "kickoff"
                && a.outcome == "4"
                && a.agent.is_none()
                && e["outcomeDesc"].as_str().unwrap_or("").starts_with("401")
        }),
        "a kick-off without a token is audited as refused (401)"
    );
    let completed = await_event(&srv, &since, "110106", "complete", "narrow", &id);
    assert_eq!(completed["outcome"], "0");
    let cancelled = expect_event(&events, "110106", "cancel", "0", Some("narrow"));
    assert_eq!(audited(cancelled).entity.as_deref(), Some(id.as_str()));
    let (reader_events, _) = audit_events(&srv, &since, Some("reader"));
    let c = expect_event(&reader_events, "110106", "cancel", "0", Some("reader"));
    assert_eq!(audited(c).entity.as_deref(), Some(all_id.as_str()));
    expect_event(&reader_events, "110106", "kickoff", "0", Some("reader"));
    expect_event(&reader_events, "110114", "token", "0", Some("reader"));
    assert_nothing_leaks(&srv, &since, &[ROOT_SECRET, &narrow_token, &reader_token]);
}

/// `--download-auth token`: the manifest says `requiresAccessToken: true`, its URLs carry
/// no signature, and a file is served to its export's client only.
#[test]
fn token_protected_downloads() {
    let since = now_instant();
    let srv = Server::loaded(&smart_args(&["--download-auth", "token"]));
    let keys = keys();
    register(&srv, "owner", &client_body(&["system/*.read"], inline_keys(&keys.rsa, "o-1")));
    register(&srv, "other", &client_body(&["system/*.read"], inline_keys(&keys.ec, "x-1")));
    let owner_token = token(&srv, "owner", &keys.rsa, "o-1", "system/*.read");
    let other_token = token(&srv, "other", &keys.ec, "x-1", "system/*.read");
    let (owner, other) = (bearer(&owner_token), bearer(&other_token));

    let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient,Condition")]);
    let status_url = assert_accepted(&kickoff_as(&url, &owner), &srv);
    let r = poll_as(&status_url, &owner);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.media_type(), "application/json");
    let m = r.json();
    assert_eq!(m["requiresAccessToken"], true, "{m}");
    assert_eq!(m["request"], url);
    assert_eq!(manifest_counts(&m), BTreeMap::from([("Condition".to_string(), 639), ("Patient".to_string(), 100)]));
    let mut keys_downloaded = Vec::new();
    for e in m["output"].as_array().unwrap() {
        let file = e["url"].as_str().expect("url");
        assert!(file.starts_with(&format!("{}/files/", srv.url)), "{file}");
        assert!(!file.contains('?'), "a token-protected URL carries no signature: {file}");
        assert_unauthorized(&get(file), &[], "Bearer");
        assert_unauthorized(&get(&format!("{file}?expires=9999999999&sig=00")), &[], "Bearer");
        assert_outcome(&send_as("GET", file, &other, None), 404, &[]);
        let r = send_as("GET", file, &owner, None);
        assert_eq!(r.status, 200, "GET {file} as its owner: {}", r.text());
        assert_eq!(r.media_type(), "application/fhir+ndjson");
        assert_eq!(r.header("cache-control"), Some("private, no-store"));
        let body = if r.header("content-encoding") == Some("gzip") {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&r.body[..]).read_to_end(&mut out).expect("gunzip");
            out
        } else {
            r.body.clone()
        };
        let text = String::from_utf8(body).expect("UTF-8");
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(Some(lines.len() as u64), e["count"].as_u64(), "lines of {file}");
        let t = e["type"].as_str().unwrap();
        for l in &lines {
            assert_eq!(serde_json::from_str::<Value>(l).expect("JSON")["resourceType"], t);
        }
        assert_eq!(send_as("GET", file, &root(), None).status, 200, "root (the administrator) downloads it too");
        keys_downloaded.push(file.split("/files/").nth(1).unwrap().to_string());
    }

    // Deleted: its files are gone for its owner too.
    let r = send_as("DELETE", &status_url, &owner, None);
    assert_eq!(r.status, 202, "{}", r.text());
    let first = m["output"][0]["url"].as_str().unwrap();
    assert_outcome(&send_as("GET", first, &owner, None), 404, &[]);

    // Audited: each download, refused or not, by whom.
    let (events, _) = audit_events(&srv, &since, None);
    for key in &keys_downloaded {
        let of = |agent: Option<&str>, outcome: &str| {
            events.iter().any(|e| {
                let a = audited(e);
                a.subtype == "download"
                    && a.entity.as_deref() == Some(key.as_str())
                    && a.agent.as_deref() == agent
                    && a.outcome == outcome
            })
        };
        assert!(of(Some("owner"), "0"), "the owner's download of {key} is audited: {events:#?}");
        assert!(of(None, "4"), "the download of {key} without a token is audited as refused");
        assert!(of(Some("other"), "4"), "the other client's refused download of {key} is audited");
    }
    let d = expect_event(&events, "110106", "download", "0", Some("owner"));
    assert_eq!(d["action"], "R");
    assert_nothing_leaks(&srv, &since, &[ROOT_SECRET, &owner_token, &other_token]);
}

/// Bearer tokens of an external OAuth 2 / OpenID Connect issuer (`--auth-issuer`): keys from
/// its discovery document, scopes from `scope` or `scp`, the client from `client_id`/`azp`.
#[test]
fn external_issuer() {
    let since = now_instant();
    let keys = keys();
    let issuer = JsonServer::start();
    let iss = issuer.url.clone();
    issuer.serve(
        "/.well-known/openid-configuration",
        json!({"issuer": iss, "jwks_uri": format!("{iss}/jwks"), "token_endpoint": format!("{iss}/token")}),
    );
    issuer.serve("/jwks", json!({"keys": [keys.rsa.jwk_for("ext-1", Algorithm::RS256)]}));
    let srv = Server::loaded(&smart_args(&["--auth-issuer", &iss]));
    let audience = srv.fhir("");
    let external = |claims: Value| bearer(&keys.rsa.sign_as(Algorithm::RS256, "ext-1", &claims));
    let claims = |extra: Value| {
        let mut c = json!({"iss": iss, "aud": audience, "exp": now() + 300, "iat": now()});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    let app = external(claims(json!({"client_id": "ext-app", "scope": "system/Patient.read system/Group.read"})));
    let url = with_query(&srv.fhir("/$export"), &[("_type", "Patient")]);
    let status_url = assert_accepted(&kickoff_as(&url, &app), &srv);
    assert!(issuer.hits("/.well-known/openid-configuration") >= 1 && issuer.hits("/jwks") >= 1);
    let m = complete_manifest(&poll_as(&status_url, &app), &url);
    check_export(&m, &reference().types(&["Patient"]));
    // Another external client (azp, scp as a list) reads what its scopes permit, and does
    // not see ext-app's export.
    let app2 = external(claims(json!({"azp": "ext-app2", "scp": ["system/Patient.rs"]})));
    let patient_id = reference().patient_ids()[0];
    assert_eq!(send_as("GET", &srv.fhir(&format!("/Patient/{patient_id}")), &app2, None).status, 200);
    let obs_id = reference().resources["Observation"].keys().next().unwrap();
    assert_forbidden(&send_as("GET", &srv.fhir(&format!("/Observation/{obs_id}")), &app2, None), &["Observation"]);
    assert_outcome(&send_as("GET", &status_url, &app2, None), 404, &[]);
    assert_eq!(send_as("GET", &status_url, &app, None).status, 200);
    // A client of this server with the same id is another client.
    register(&srv, "ext-app", &client_body(&["system/*.read"], inline_keys(&keys.ec, "local-1")));
    let local = bearer(&token(&srv, "ext-app", &keys.ec, "local-1", "system/*.read"));
    assert_outcome(&send_as("GET", &status_url, &local, None), 404, &[]);
    assert_outcome(&send_as("DELETE", &status_url, &local, None), 404, &[]);
    // Its scopes bind it as this server's tokens do.
    let obs = with_query(&srv.fhir("/$export"), &[("_type", "Observation")]);
    assert_forbidden(&kickoff_as(&obs, &app), &["Observation"]);

    // Refused: another audience, an issuer not trusted, expired, a key it does not publish.
    let wrong_aud = external(json!({"iss": iss, "aud": "https://elsewhere.example/fhir", "exp": now() + 300,
        "client_id": "ext-app", "scope": "system/Patient.read"}));
    assert_invalid_token(&kickoff_as(&url, &wrong_aud), &["aud", &audience]);
    let unknown = external(json!({"iss": "https://unknown-issuer.example", "aud": audience, "exp": now() + 300,
        "client_id": "ext-app", "scope": "system/Patient.read"}));
    assert_invalid_token(&kickoff_as(&url, &unknown), &["not accepted", "unknown-issuer.example"]);
    let expired = external(claims(json!({"client_id": "ext-app", "scope": "system/Patient.read", "exp": now() - 300})));
    assert_invalid_token(&kickoff_as(&url, &expired), &["expired"]);
    let forged = keys.rsa_other.sign_as(
        Algorithm::RS256,
        "ext-1",
        &claims(json!({"client_id": "ext-app", "scope": "system/Patient.read"})),
    );
    assert_invalid_token(&kickoff_as(&url, &bearer(&forged)), &["signature"]);
    let unknown_kid = bearer(&keys.rsa.sign_as(
        Algorithm::RS256,
        "ext-404",
        &claims(json!({"client_id": "ext-app", "scope": "system/Patient.read"})),
    ));
    assert_invalid_token(&kickoff_as(&url, &unknown_kid), &["ext-404"]);

    let agent = format!("ext-app@{iss}");
    let (events, _) = audit_events(&srv, &since, Some(&agent));
    let k = expect_event(&events, "110106", "kickoff", "0", Some(&agent));
    assert_eq!(audited(k).entity.as_deref(), Some(export_id(&status_url).as_str()));
    let refused = expect_event(&events, "110106", "kickoff", "4", Some(&agent));
    assert!(refused["outcomeDesc"].as_str().unwrap_or("").contains("Observation"), "{refused}");
    assert_nothing_leaks(&srv, &since, &[ROOT_SECRET, &app[7..], &app2[7..], &wrong_aud[7..]]);
}

/// Runs `sluice serve` with `args` over a fresh store and expects it to refuse to start:
/// returns its stderr. Fails if it starts listening instead.
fn serve_refused(args: &[&str]) -> String {
    let dir = empty_dir();
    let mut child = sluice()
        .arg("serve")
        .args(store_args(dir.path()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting sluice serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("sluice listening on") {
                let _ = tx.send(Some(line));
                return;
            }
        }
        let _ = tx.send(None); // stdout closed: the process ended
    });
    let listening = rx.recv_timeout(Duration::from_secs(60)).expect("sluice serve neither exited nor listened");
    if let Some(line) = listening {
        let _ = child.kill();
        let _ = child.wait();
        drop_store(dir.path());
        panic!("sluice serve {args:?} started ({line}) instead of refusing");
    }
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).expect("reading stderr");
    let status = child.wait().expect("waiting for sluice");
    drop_store(dir.path());
    assert!(!status.success(), "sluice serve {args:?} exited with success: {stderr}");
    stderr
}

/// `--auth none` (the default) serves a loopback address only, unless `--insecure-no-auth`;
/// the options that need `--auth smart` say so.
#[test]
fn auth_none_refuses_public_addresses() {
    let err = serve_refused(&["--listen", "0.0.0.0:0"]);
    assert!(err.contains("refusing to listen on 0.0.0.0"), "{err}");
    assert!(err.contains("--insecure-no-auth") && err.contains("--auth smart"), "{err}");
    let err = serve_refused(&["--listen", "127.0.0.1:0", "--download-auth", "token"]);
    assert!(err.contains("--download-auth token needs --auth smart"), "{err}");
    let err = serve_refused(&["--listen", "127.0.0.1:0", "--auth-issuer", "http://127.0.0.1:9/"]);
    assert!(err.contains("--auth-issuer needs --auth smart"), "{err}");
    let err = serve_refused(&["--listen", "127.0.0.1:0", "--auth", "smart", "--auth-issuer", "issuer.example"]);
    assert!(err.contains("must be an http(s) URL"), "{err}");

    // --insecure-no-auth: it listens (Server::start waits for "sluice listening on"), and warns.
    let insecure = Server::empty(&["--listen", "0.0.0.0:0", "--insecure-no-auth"]);
    assert!(insecure.log_tail(50).contains("--insecure-no-auth"), "no warning logged: {}", insecure.log_tail(50));
    drop(insecure);

    // --auth smart on a public address is fine.
    let public = Server::empty(&["--listen", "0.0.0.0:0", "--auth", "smart"]);
    assert_unauthorized(&get(&public.fhir("/$export")), &[], "Bearer");
    drop(public);

    // Without authorization (loopback): no security advertised, no SMART endpoints.
    let mut open = Server::empty(&[]);
    let cs = get(&open.fhir("/metadata")).json();
    assert!(cs["rest"][0].get("security").is_none(), "{cs}");
    assert_outcome(&get(&open.fhir("/.well-known/smart-configuration")), 404, &["--auth smart"]);
    let r = send(
        "POST",
        &format!("{}/auth/token", open.url),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(b"grant_type=client_credentials"),
    );
    assert_outcome(&r, 404, &["--auth smart"]);
    open.assert_alive();
}

/// A kick-off while another export runs (issue 14): the 429 names the running export only
/// to the client that owns it; another client is told only to retry.
#[test]
fn the_busy_answer_names_the_export_to_its_owner_only() {
    let srv = Server::loaded(&smart_args(&["--throttle-ms", "20", "--batch-bytes", "16384"]));
    let keys = keys();
    register(&srv, "owner", &client_body(&["system/*.read"], inline_keys(&keys.rsa, "o-1")));
    register(&srv, "other", &client_body(&["system/*.read"], inline_keys(&keys.ec, "x-1")));
    let owner = bearer(&token(&srv, "owner", &keys.rsa, "o-1", "system/*.read"));
    let other = bearer(&token(&srv, "other", &keys.ec, "x-1", "system/*.read"));
    let status_url = assert_accepted(&kickoff_as(&srv.fhir("/Patient/$export?_type=Observation"), &owner), &srv);
    let id = export_id(&status_url);

    let theirs = kickoff_as(&srv.fhir("/$export"), &other);
    assert_outcome(&theirs, 429, &["another export is running"]);
    assert!(!theirs.text().contains(&id), "another client is told the running export's id: {}", theirs.text());
    let mine = kickoff_as(&srv.fhir("/$export"), &owner);
    assert_outcome(&mine, 429, &["your export", &id, "DELETE"]);
    assert_eq!(send_as("DELETE", &status_url, &owner, None).status, 202);
}
