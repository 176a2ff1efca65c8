//! Secrets at rest (D50): the secret fields of configuration resources, sealed with
//! AES-256-GCM under `SLUICE_SECRETS_KEY` before a store writes them.
//!
//! Only the secret fields are sealed, in place, as a marked string:
//! `"secret-access-key": "enc:v1:<key id>:<base64(nonce || ciphertext || tag)>"`. The rest
//! of the resource stays readable and no store needs a schema change. Every value has its
//! own random 96-bit nonce, and the resource type, id and field name are its associated
//! data, so a sealed value copied into another resource or field does not open. The key id
//! (the first 4 bytes of the key's SHA-256, in hex) says which key sealed a value, so older
//! keys (`SLUICE_SECRETS_KEY_PREVIOUS`) still open theirs and [`Secrets::reseal`] moves
//! them to the current key. No message ever holds a secret or a key.

use crate::ConfigError;
use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::Value;
use std::sync::Arc;

/// The fields holding secrets, per configuration resource type (the same lists as
/// `sluice_storage_config::resources::CONFIG_TYPES`; a test there keeps them equal).
pub const SECRET_FIELDS: [(&str, &[&str]); 3] =
    [("AwsAccount", &["secret-access-key"]), ("AzureAccount", &["key"]), ("GcpServiceAccount", &["private-key"])];

/// The secret fields of `resource_type` (none for other types).
pub fn secret_fields(resource_type: &str) -> &'static [&'static str] {
    SECRET_FIELDS.iter().find(|(t, _)| *t == resource_type).map_or(&[], |(_, f)| f)
}

/// How every sealed value starts.
pub const SEALED_MARK: &str = "enc:v1:";

/// The environment variable of the current key (named in errors).
const KEY_VAR: &str = "SLUICE_SECRETS_KEY";
/// The environment variable of the older keys (named in errors).
const PREVIOUS_VAR: &str = "SLUICE_SECRETS_KEY_PREVIOUS";

/// A 256-bit AES-GCM key and its id. Its `Debug` shows the id only.
#[derive(Clone)]
pub struct SecretsKey {
    key: Arc<RandomizedNonceKey>,
    id: String,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretsKey({})", self.id)
    }
}

/// Why a key was refused. Never holds the text given.
#[derive(Debug, thiserror::Error)]
#[error("must be 32 bytes written as 64 hex digits or in base64 (e.g. `openssl rand -hex 32`)")]
pub struct KeyFormatError;

impl SecretsKey {
    /// A key written as 64 hex digits or in base64 (standard or URL-safe, padded or not)
    /// of exactly 32 bytes; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, KeyFormatError> {
        let text = text.trim();
        let hex = (text.len() == 64).then(|| hex::decode(text).ok()).flatten();
        let mut bytes = match hex {
            Some(b) => b,
            None => [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
                .iter()
                .find_map(|engine| engine.decode(text).ok())
                .ok_or(KeyFormatError)?,
        };
        let key = (bytes.len() == 32).then(|| SecretsKey::from_bytes(&bytes));
        bytes.fill(0);
        key.ok_or(KeyFormatError)
    }

    /// A key from its 32 bytes.
    ///
    /// # Panics
    /// If `bytes` is not 32 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        assert_eq!(bytes.len(), 32, "an AES-256 key is 32 bytes");
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes).expect("32 bytes make an AES-256-GCM key");
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let id = digest.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
        SecretsKey { key: Arc::new(key), id }
    }

    /// The key id: the first 4 bytes of the key's SHA-256, in hex (8 digits).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The keys secret fields are sealed and opened with: the current key (`None`: values are
/// stored as given) and older keys that still open what they sealed. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    current: Option<SecretsKey>,
    previous: Vec<SecretsKey>,
}

/// The associated data of a sealed value: where it belongs.
fn aad(resource_type: &str, id: &str, field: &str) -> Vec<u8> {
    format!("sluice secret v1\0{resource_type}\0{id}\0{field}").into_bytes()
}

fn err(msg: String) -> ConfigError {
    ConfigError::new(msg)
}

impl Secrets {
    /// No key: values are stored as given, and a sealed value found in the store is an
    /// error naming `SLUICE_SECRETS_KEY`.
    pub fn none() -> Self {
        Secrets::default()
    }

    /// Seals with `current`; `previous` keys only open values sealed earlier.
    pub fn new(current: SecretsKey, previous: Vec<SecretsKey>) -> Self {
        Secrets { current: Some(current), previous }
    }

    /// The keys as configured: `current` is `SLUICE_SECRETS_KEY` and `previous` the entries of
    /// `SLUICE_SECRETS_KEY_PREVIOUS` (blank ones are skipped). Errors name the variable,
    /// never its value.
    pub fn from_settings(current: Option<&str>, previous: &[String]) -> Result<Self, ConfigError> {
        let previous: Vec<&str> = previous.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).collect();
        let Some(current) = current.map(str::trim).filter(|c| !c.is_empty()) else {
            if previous.is_empty() {
                return Ok(Secrets::none());
            }
            return Err(err(format!(
                "{PREVIOUS_VAR} is set but {KEY_VAR} is not: set the key new secrets are sealed with"
            )));
        };
        let current = SecretsKey::parse(current).map_err(|e| err(format!("{KEY_VAR} {e}")))?;
        let previous = previous
            .iter()
            .enumerate()
            .map(|(n, p)| {
                SecretsKey::parse(p).map_err(|e| err(format!("{PREVIOUS_VAR} (key {} of the list) {e}", n + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Secrets::new(current, previous))
    }

    /// The id of the key new values are sealed with, if any.
    pub fn key_id(&self) -> Option<&str> {
        self.current.as_ref().map(SecretsKey::id)
    }

    /// The ids of the older keys.
    pub fn previous_ids(&self) -> impl Iterator<Item = &str> {
        self.previous.iter().map(SecretsKey::id)
    }

    /// The JSON to store for `resource_type/id`: `json` with its secret fields sealed
    /// under the current key (unchanged without a key). A secret that already looks sealed
    /// is refused: it could never be told apart from one.
    pub fn seal(&self, resource_type: &str, id: &str, json: &str) -> Result<String, ConfigError> {
        let fields = secret_fields(resource_type);
        if fields.is_empty() || (self.current.is_none() && !json.contains(SEALED_MARK)) {
            return Ok(json.to_string());
        }
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(json) else { return Ok(json.to_string()) };
        let mut changed = false;
        for &field in fields {
            let Some(Value::String(plain)) = obj.get(field) else { continue };
            if plain.starts_with(SEALED_MARK) {
                return Err(err(format!(
                    "{resource_type}/{id}: '{field}' may not start with '{SEALED_MARK}' (the mark of a sealed secret)"
                )));
            }
            if let Some(key) = &self.current {
                let sealed = seal_value(key, &aad(resource_type, id, field), plain)?;
                obj.insert(field.to_string(), Value::String(sealed));
                changed = true;
            }
        }
        Ok(if changed { Value::Object(obj).to_string() } else { json.to_string() })
    }

    /// The JSON of `resource_type/id` as it was given: `stored` with its sealed secret
    /// fields opened. A value no configured key opens is an error naming
    /// `SLUICE_SECRETS_KEY` (and the key id that sealed it).
    pub fn open(&self, resource_type: &str, id: &str, stored: &str) -> Result<String, ConfigError> {
        let fields = secret_fields(resource_type);
        if fields.is_empty() || !stored.contains(SEALED_MARK) {
            return Ok(stored.to_string());
        }
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(stored) else { return Ok(stored.to_string()) };
        let mut changed = false;
        for &field in fields {
            let Some(Value::String(sealed)) = obj.get(field) else { continue };
            let Some(rest) = sealed.strip_prefix(SEALED_MARK) else { continue };
            let plain = self.open_value(resource_type, id, field, rest)?;
            obj.insert(field.to_string(), Value::String(plain));
            changed = true;
        }
        Ok(if changed { Value::Object(obj).to_string() } else { stored.to_string() })
    }

    /// What to store instead of `stored` so that every secret field is sealed under the
    /// current key: `None` when nothing is to change (or there is no current key). Values
    /// sealed by an older key are opened and sealed again; plain ones are sealed.
    pub fn reseal(&self, resource_type: &str, id: &str, stored: &str) -> Result<Option<String>, ConfigError> {
        let (fields, Some(key)) = (secret_fields(resource_type), &self.current) else { return Ok(None) };
        if fields.is_empty() {
            return Ok(None);
        }
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(stored) else { return Ok(None) };
        let mut changed = false;
        for &field in fields {
            let Some(Value::String(value)) = obj.get(field) else { continue };
            let plain = match value.strip_prefix(SEALED_MARK) {
                Some(rest) if rest.split(':').next() == Some(key.id()) => continue,
                Some(rest) => self.open_value(resource_type, id, field, rest)?,
                None => value.clone(),
            };
            let sealed = seal_value(key, &aad(resource_type, id, field), &plain)?;
            obj.insert(field.to_string(), Value::String(sealed));
            changed = true;
        }
        Ok(changed.then(|| Value::Object(obj).to_string()))
    }

    /// Opens one sealed value (`rest`: what follows the mark).
    fn open_value(&self, resource_type: &str, id: &str, field: &str, rest: &str) -> Result<String, ConfigError> {
        let at = format!("{resource_type}/{id}: '{field}'");
        let (kid, data) = rest.split_once(':').unwrap_or((rest, ""));
        let key = self.current.iter().chain(&self.previous).find(|k| k.id() == kid);
        let Some(key) = key else {
            return Err(err(match &self.current {
                None => {
                    format!("{at} is encrypted at rest (key id {kid}) but {KEY_VAR} is not set; set it to that key")
                }
                Some(cur) => format!(
                    "{at} was encrypted with key id {kid}, which is neither {KEY_VAR} (key id {}) nor in {PREVIOUS_VAR}; set the key it was sealed with",
                    cur.id()
                ),
            }));
        };
        let damaged = || {
            err(format!(
                "{at} does not decrypt with the key of id {kid} ({KEY_VAR} or {PREVIOUS_VAR}): the stored value is damaged or belongs to another resource"
            ))
        };
        let mut bytes = STANDARD.decode(data).map_err(|_| damaged())?;
        if bytes.len() < NONCE_LEN {
            return Err(damaged());
        }
        let (nonce, sealed) = bytes.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged())?;
        let plain =
            key.key.open_in_place(nonce, Aad::from(aad(resource_type, id, field)), sealed).map_err(|_| damaged())?;
        let text = std::str::from_utf8(plain).map(str::to_string).map_err(|_| damaged());
        plain.fill(0);
        text
    }
}

/// Seals `plain` under `key`: the marked string that is stored.
fn seal_value(key: &SecretsKey, aad: &[u8], plain: &str) -> Result<String, ConfigError> {
    let mut in_out = plain.as_bytes().to_vec();
    let nonce = key
        .key
        .seal_in_place_append_tag(Aad::from(aad), &mut in_out)
        .map_err(|_| err("sealing a secret failed (AES-256-GCM)".into()))?;
    let mut data = Vec::with_capacity(NONCE_LEN + in_out.len());
    data.extend_from_slice(nonce.as_ref());
    data.extend_from_slice(&in_out);
    Ok(format!("{SEALED_MARK}{}:{}", key.id(), STANDARD.encode(&data)))
}

/// What a store's sealing pass did ([`Secrets::reseal`] over every secret-holding
/// configuration resource).
#[derive(Debug, Default)]
pub struct Resealed {
    /// Resources written again with every secret under the current key.
    pub resealed: usize,
    /// Resources left as they were, and why (never with a secret in the message).
    pub failed: Vec<(String, ConfigError)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const SECRET: &str = "wJalr-very-secret/K7MDENG";

    fn key(hex: &str) -> SecretsKey {
        SecretsKey::parse(hex).unwrap()
    }

    fn k2() -> SecretsKey {
        SecretsKey::from_bytes(&[7u8; 32])
    }

    fn aws() -> String {
        format!(r#"{{"region":"eu-west-1","access-key-id":"AKIA","secret-access-key":"{SECRET}","id":"a"}}"#)
    }

    #[test]
    fn keys_parse_from_hex_and_base64_and_never_echo() {
        let hex = key(K1);
        let b64 = SecretsKey::parse(&STANDARD.encode((0u8..32).collect::<Vec<_>>())).unwrap();
        let url = SecretsKey::parse(&format!("  {}\n", URL_SAFE_NO_PAD.encode((0u8..32).collect::<Vec<_>>()))).unwrap();
        assert_eq!(hex.id(), b64.id());
        assert_eq!(hex.id(), url.id());
        assert_eq!(hex.id().len(), 8);
        // SHA-256 of the bytes 0..32, first 4 bytes.
        assert_eq!(hex.id(), "630dcd29");
        assert_eq!(format!("{hex:?}"), "SecretsKey(630dcd29)");
        let bad = [
            "".into(),
            "abc".into(),
            K1[..62].to_string(),
            format!("{K1}00"),
            STANDARD.encode([1u8; 31]),
            "zz".repeat(32),
        ];
        for bad in bad {
            assert!(SecretsKey::parse(&bad).is_err(), "{bad:?}");
        }
        let e = Secrets::from_settings(Some("not-a-key-TOPSECRET"), &[]).unwrap_err().to_string();
        assert!(e.contains("SLUICE_SECRETS_KEY") && !e.contains("TOPSECRET"), "{e}");
        let e = Secrets::from_settings(Some(K1), &["".into(), "oops-TOPSECRET".into()]).unwrap_err().to_string();
        assert!(e.contains("SLUICE_SECRETS_KEY_PREVIOUS") && !e.contains("TOPSECRET"), "{e}");
        let e = Secrets::from_settings(None, &[K1.into()]).unwrap_err().to_string();
        assert!(e.contains("SLUICE_SECRETS_KEY is not"), "{e}");
        assert!(Secrets::from_settings(Some(" "), &[" ".into()]).unwrap().key_id().is_none());
    }

    #[test]
    fn only_secret_fields_are_sealed_and_they_open_again() {
        let s = Secrets::new(key(K1), vec![]);
        let stored = s.seal("AwsAccount", "a", &aws()).unwrap();
        assert!(!stored.contains(SECRET), "{stored}");
        assert!(stored.contains(&format!("\"secret-access-key\":\"{SEALED_MARK}630dcd29:")), "{stored}");
        assert!(stored.starts_with(r#"{"region":"eu-west-1","access-key-id":"AKIA","#), "key order kept: {stored}");
        assert_eq!(s.open("AwsAccount", "a", &stored).unwrap(), aws());
        // A fresh nonce every time.
        assert_ne!(s.seal("AwsAccount", "a", &aws()).unwrap(), stored);
        // Types without secrets, and resources without the field, are left as they are.
        let container = r#"{"storage":"s","container":"c"}"#;
        assert_eq!(s.seal("AzureContainer", "c", container).unwrap(), container);
        assert_eq!(s.seal("AwsAccount", "b", r#"{"region":"r"}"#).unwrap(), r#"{"region":"r"}"#);
        for (t, f) in SECRET_FIELDS.iter().map(|(t, f)| (*t, f[0])) {
            let json = serde_json::json!({ f: SECRET }).to_string();
            let sealed = s.seal(t, "x", &json).unwrap();
            assert!(!sealed.contains(SECRET) && sealed.contains(SEALED_MARK), "{t}: {sealed}");
            assert_eq!(s.open(t, "x", &sealed).unwrap(), json);
        }
    }

    #[test]
    fn a_sealed_value_is_bound_to_its_place() {
        let s = Secrets::new(key(K1), vec![]);
        let stored = s.seal("AwsAccount", "a", &aws()).unwrap();
        let e = s.open("AwsAccount", "b", &stored).unwrap_err().to_string();
        assert!(e.contains("AwsAccount/b") && e.contains("does not decrypt"), "{e}");
        let v: Value = serde_json::from_str(&stored).unwrap();
        let moved = serde_json::json!({"key": v["secret-access-key"]}).to_string();
        assert!(s.open("AzureAccount", "a", &moved).is_err());
        // A flipped bit in the ciphertext.
        let sealed = v["secret-access-key"].as_str().unwrap();
        let (head, data) = sealed.rsplit_once(':').unwrap();
        let mut bytes = STANDARD.decode(data).unwrap();
        bytes[NONCE_LEN] ^= 1;
        let damaged = serde_json::json!({"secret-access-key": format!("{head}:{}", STANDARD.encode(bytes))});
        let e = s.open("AwsAccount", "a", &damaged.to_string()).unwrap_err().to_string();
        assert!(e.contains("does not decrypt") && !e.contains(SECRET), "{e}");
        let truncated = serde_json::json!({"secret-access-key": format!("{head}:AAAA")}).to_string();
        assert!(s.open("AwsAccount", "a", &truncated).is_err());
    }

    #[test]
    fn without_a_key_plain_is_kept_and_sealed_values_name_the_variable() {
        let none = Secrets::none();
        assert_eq!(none.seal("AwsAccount", "a", &aws()).unwrap(), aws());
        assert_eq!(none.open("AwsAccount", "a", &aws()).unwrap(), aws());
        assert_eq!(none.reseal("AwsAccount", "a", &aws()).unwrap(), None);
        let stored = Secrets::new(key(K1), vec![]).seal("AwsAccount", "a", &aws()).unwrap();
        let e = none.open("AwsAccount", "a", &stored).unwrap_err().to_string();
        assert!(e.contains("SLUICE_SECRETS_KEY is not set") && e.contains("630dcd29"), "{e}");
        assert!(!e.contains(SECRET) && !e.contains(SEALED_MARK), "{e}");
        // A wrong key names both variables and both key ids.
        let wrong = Secrets::new(k2(), vec![]);
        let e = wrong.open("AwsAccount", "a", &stored).unwrap_err().to_string();
        assert!(e.contains("SLUICE_SECRETS_KEY (key id") && e.contains("SLUICE_SECRETS_KEY_PREVIOUS"), "{e}");
        assert!(e.contains("630dcd29") && e.contains(k2().id()), "{e}");
        // Something that looks sealed is never stored as a plain secret.
        let fake = r#"{"secret-access-key":"enc:v1:x"}"#;
        for s in [&none, &wrong] {
            let e = s.seal("AwsAccount", "a", fake).unwrap_err().to_string();
            assert!(e.contains("may not start with"), "{e}");
        }
    }

    #[test]
    fn rotation_opens_with_previous_keys_and_reseals_under_the_current_one() {
        let old = Secrets::new(key(K1), vec![]);
        let stored = old.seal("AwsAccount", "a", &aws()).unwrap();
        let rotated = Secrets::new(k2(), vec![key(K1)]);
        assert_eq!(rotated.open("AwsAccount", "a", &stored).unwrap(), aws());
        let resealed = rotated.reseal("AwsAccount", "a", &stored).unwrap().expect("moved to the new key");
        assert!(resealed.contains(&format!("{SEALED_MARK}{}:", k2().id())), "{resealed}");
        assert_eq!(rotated.reseal("AwsAccount", "a", &resealed).unwrap(), None, "already under the current key");
        // The previous key can go now.
        assert_eq!(Secrets::new(k2(), vec![]).open("AwsAccount", "a", &resealed).unwrap(), aws());
        // A plain value is sealed by the pass; a value no key opens is an error.
        let sealed = rotated.reseal("AwsAccount", "a", &aws()).unwrap().unwrap();
        assert_eq!(rotated.open("AwsAccount", "a", &sealed).unwrap(), aws());
        assert!(Secrets::new(k2(), vec![]).reseal("AwsAccount", "a", &stored).is_err());
        assert_eq!(rotated.reseal("AzureContainer", "c", r#"{"storage":"s"}"#).unwrap(), None);
        assert_eq!(rotated.previous_ids().collect::<Vec<_>>(), vec!["630dcd29"]);
    }
}
