//! Shared access signatures signed in this crate: service SAS tokens with the account key,
//! and user delegation SAS tokens with a key from Get User Delegation Key.
//!
//! Both follow the string-to-sign of service version [`SAS_VERSION`] (the layout that
//! applies from 2020-12-06 up to, not including, 2025-07-05): HMAC-SHA256 over the
//! newline-joined fields, keyed with the decoded account key or delegation key, base64.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The `sv` of every token signed here.
pub(crate) const SAS_VERSION: &str = "2022-11-02";

/// Formats a SAS time: UTC, whole seconds, e.g. `2024-05-01T12:00:00Z`.
pub(crate) fn sas_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).expect("0 is a valid nanosecond");
    t.format(&Rfc3339).expect("a UTC time with whole seconds formats as RFC 3339")
}

/// What a token grants access to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource<'a> {
    /// The whole container (`sr=c`).
    Container,
    /// One blob (`sr=b`).
    Blob(&'a str),
}

impl Resource<'_> {
    fn sr(&self) -> &'static str {
        match self {
            Resource::Container => "c",
            Resource::Blob(_) => "b",
        }
    }

    fn canonical(&self, account: &str, container: &str) -> String {
        match self {
            Resource::Container => format!("/blob/{account}/{container}"),
            Resource::Blob(name) => format!("/blob/{account}/{container}/{name}"),
        }
    }
}

/// The fields shared by both kinds of token.
#[derive(Debug, Clone)]
pub(crate) struct SasParams<'a> {
    pub account: &'a str,
    pub container: &'a str,
    pub resource: Resource<'a>,
    /// Permissions in the documented order, e.g. `r` or `cwdl`.
    pub permissions: &'a str,
    pub expiry: OffsetDateTime,
    /// `Some("https")` to refuse plain HTTP.
    pub protocol: Option<&'a str>,
}

/// A user delegation key as returned by Get User Delegation Key.
#[derive(Clone)]
pub(crate) struct DelegationKey {
    pub object_id: String,
    pub tenant_id: String,
    pub start: OffsetDateTime,
    pub expiry: OffsetDateTime,
    pub service: String,
    pub version: String,
    /// The decoded key bytes.
    pub value: Vec<u8>,
}

impl std::fmt::Debug for DelegationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelegationKey")
            .field("object_id", &self.object_id)
            .field("tenant_id", &self.tenant_id)
            .field("start", &self.start)
            .field("expiry", &self.expiry)
            .field("value", &"<redacted>")
            .finish()
    }
}

fn hmac_base64(key: &[u8], message: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// The string-to-sign of a service SAS signed with the account key.
pub(crate) fn service_string_to_sign(p: &SasParams<'_>) -> String {
    [
        p.permissions,
        "", // signedStart: valid from now
        &sas_time(p.expiry),
        &p.resource.canonical(p.account, p.container),
        "", // signedIdentifier
        "", // signedIP
        p.protocol.unwrap_or(""),
        SAS_VERSION,
        p.resource.sr(),
        "", // signedSnapshotTime
        "", // signedEncryptionScope
        "", // rscc
        "", // rscd
        "", // rsce
        "", // rscl
        "", // rsct
    ]
    .join("\n")
}

/// The string-to-sign of a user delegation SAS.
pub(crate) fn delegation_string_to_sign(p: &SasParams<'_>, key: &DelegationKey) -> String {
    [
        p.permissions,
        "", // signedStart: valid from now
        &sas_time(p.expiry),
        &p.resource.canonical(p.account, p.container),
        &key.object_id,
        &key.tenant_id,
        &sas_time(key.start),
        &sas_time(key.expiry),
        &key.service,
        &key.version,
        "", // signedAuthorizedUserObjectId
        "", // signedUnauthorizedUserObjectId
        "", // signedCorrelationId
        "", // signedIP
        p.protocol.unwrap_or(""),
        SAS_VERSION,
        p.resource.sr(),
        "", // signedSnapshotTime
        "", // signedEncryptionScope
        "", // rscc
        "", // rscd
        "", // rsce
        "", // rscl
        "", // rsct
    ]
    .join("\n")
}

/// The query pairs of a token, `sig` last.
pub(crate) type Token = Vec<(&'static str, String)>;

fn common_pairs(p: &SasParams<'_>) -> Token {
    let mut pairs = vec![
        ("sv", SAS_VERSION.to_string()),
        ("sr", p.resource.sr().to_string()),
        ("sp", p.permissions.to_string()),
        ("se", sas_time(p.expiry)),
    ];
    if let Some(protocol) = p.protocol {
        pairs.push(("spr", protocol.to_string()));
    }
    pairs
}

/// A service SAS signed with the (decoded) account key.
pub(crate) fn service_sas(p: &SasParams<'_>, account_key: &[u8]) -> Token {
    let sig = hmac_base64(account_key, &service_string_to_sign(p));
    let mut pairs = common_pairs(p);
    pairs.push(("sig", sig));
    pairs
}

/// A user delegation SAS signed with `key`.
pub(crate) fn delegation_sas(p: &SasParams<'_>, key: &DelegationKey) -> Token {
    let sig = hmac_base64(&key.value, &delegation_string_to_sign(p, key));
    let mut pairs = common_pairs(p);
    pairs.extend([
        ("skoid", key.object_id.clone()),
        ("sktid", key.tenant_id.clone()),
        ("skt", sas_time(key.start)),
        ("ske", sas_time(key.expiry)),
        ("sks", key.service.clone()),
        ("skv", key.version.clone()),
        ("sig", sig),
    ]);
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn params(resource: Resource<'_>) -> SasParams<'_> {
        SasParams {
            account: "acct",
            container: "exports",
            resource,
            permissions: "r",
            expiry: datetime!(2030-01-02 03:04:05.678 UTC),
            protocol: Some("https"),
        }
    }

    #[test]
    fn times_are_whole_seconds_utc() {
        assert_eq!(sas_time(datetime!(2030-01-02 03:04:05.999 +02:00)), "2030-01-02T01:04:05Z");
    }

    #[test]
    fn service_layout() {
        let s = service_string_to_sign(&params(Resource::Blob("job/Patient.ndjson")));
        let lines: Vec<&str> = s.split('\n').collect();
        assert_eq!(lines.len(), 16);
        assert_eq!(lines[0], "r");
        assert_eq!(lines[2], "2030-01-02T03:04:05Z");
        assert_eq!(lines[3], "/blob/acct/exports/job/Patient.ndjson");
        assert_eq!(lines[6], "https");
        assert_eq!(lines[7], SAS_VERSION);
        assert_eq!(lines[8], "b");
        let c = service_string_to_sign(&params(Resource::Container));
        assert_eq!(c.split('\n').nth(3), Some("/blob/acct/exports"));
    }

    #[test]
    fn delegation_layout() {
        let key = DelegationKey {
            object_id: "oid".into(),
            tenant_id: "tid".into(),
            start: datetime!(2030-01-01 00:00:00 UTC),
            expiry: datetime!(2030-01-08 00:00:00 UTC),
            service: "b".into(),
            version: "2025-11-05".into(),
            value: vec![7; 32],
        };
        let s = delegation_string_to_sign(&params(Resource::Blob("a/b")), &key);
        let lines: Vec<&str> = s.split('\n').collect();
        assert_eq!(lines.len(), 24);
        assert_eq!(&lines[4..10], ["oid", "tid", "2030-01-01T00:00:00Z", "2030-01-08T00:00:00Z", "b", "2025-11-05"]);
        assert_eq!(lines[14], "https");
        assert_eq!(lines[15], SAS_VERSION);
        assert_eq!(lines[16], "b");
        let token = delegation_sas(&params(Resource::Blob("a/b")), &key);
        assert_eq!(token.last().map(|(k, _)| *k), Some("sig"));
        assert!(token.iter().any(|(k, v)| *k == "skoid" && v == "oid"));
        assert!(!format!("{key:?}").contains("7, 7"));
    }

    #[test]
    fn signature_is_hmac_sha256_base64() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            hmac_base64(b"Jefe", "what do ya want for nothing?"),
            BASE64.encode(
                [
                    0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75, 0xc7,
                    0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9, 0x64, 0xec, 0x38, 0x43
                ]
                .as_slice()
            )
        );
    }
}
