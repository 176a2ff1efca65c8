//! Exact comparison of JSON texts for the tests, built on `serde_json`'s `RawValue` alone
//! (not on Sluice's own JSON code): numbers, strings (escapes included), `true`, `false` and
//! `null` are compared as the text written; objects member by member, in order. Only the
//! whitespace between tokens does not count. Nothing goes through `f64`.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// A JSON value with every scalar kept as its written text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exact {
    /// A number, string, boolean or null, as written (a string with its quotes).
    Raw(String),
    /// An array.
    Array(Vec<Exact>),
    /// An object's members in order (keys decoded).
    Object(Vec<(String, Exact)>),
}

/// An object's members, each value left as raw text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members<'a>, M::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    out.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl Exact {
    /// Parses `text`; panics (naming `what`) when it is not JSON.
    pub fn parse(text: &str, what: &str) -> Exact {
        let raw: &RawValue = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {text}"));
        Exact::of(raw)
    }

    fn of(raw: &RawValue) -> Exact {
        let text = raw.get();
        match text.as_bytes()[0] {
            b'{' => Exact::Object(
                serde_json::from_str::<Members>(text)
                    .expect("an object")
                    .0
                    .into_iter()
                    .map(|(k, v)| (k, Exact::of(v)))
                    .collect(),
            ),
            b'[' => Exact::Array(
                serde_json::from_str::<Vec<&RawValue>>(text).expect("an array").into_iter().map(Exact::of).collect(),
            ),
            _ => Exact::Raw(text.to_string()),
        }
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Exact> {
        match self {
            Exact::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Removes the member `key` of an object and returns it.
    pub fn remove(&mut self, key: &str) -> Option<Exact> {
        match self {
            Exact::Object(m) => m.iter().position(|(k, _)| k == key).map(|i| m.remove(i).1),
            _ => None,
        }
    }

    /// The decoded text of a string value.
    pub fn as_str(&self) -> Option<String> {
        match self {
            Exact::Raw(t) if t.starts_with('"') => serde_json::from_str(t).ok(),
            _ => None,
        }
    }

    /// Checks that `meta.versionId` and `meta.lastUpdated` are there and well formed, then
    /// removes them (and `meta` when nothing else is left in it): what a server may change.
    pub fn strip_server_meta(&mut self, what: &str) {
        let Some(Exact::Object(meta)) = self.get_mut("meta") else { panic!("{what} has no meta object") };
        let take = |meta: &mut Vec<(String, Exact)>, key: &str| {
            let i = meta.iter().position(|(k, _)| k == key).unwrap_or_else(|| panic!("{what}: no meta.{key}"));
            meta.remove(i).1.as_str().unwrap_or_else(|| panic!("{what}: meta.{key} is not a string"))
        };
        take(meta, "versionId");
        let updated = take(meta, "lastUpdated");
        assert!(super::is_instant(&updated), "{what}: meta.lastUpdated {updated:?} is not an instant");
        if meta.is_empty() {
            self.remove("meta");
        }
    }

    /// Removes `meta.versionId` and `meta.lastUpdated` where a written resource has them (the
    /// server replaces both), and `meta` when nothing else is left in it.
    pub fn strip_given_meta(&mut self) {
        if let Some(meta @ Exact::Object(_)) = self.get_mut("meta") {
            meta.remove("versionId");
            meta.remove("lastUpdated");
            if matches!(meta, Exact::Object(m) if m.is_empty()) {
                self.remove("meta");
            }
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Exact> {
        match self {
            Exact::Object(m) => m.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

impl fmt::Display for Exact {
    /// Compact JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exact::Raw(t) => f.write_str(t),
            Exact::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Exact::Object(members) => {
                f.write_str("{")?;
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}:{v}", serde_json::to_string(k).expect("a key"))?;
                }
                f.write_str("}")
            }
        }
    }
}

/// Panics with both texts unless `got` (a server's line, its meta stripped) equals `want`
/// exactly.
pub fn assert_same_resource(got_line: &str, want: &str, what: &str) {
    let mut got = Exact::parse(got_line, what);
    got.strip_server_meta(what);
    let mut want = Exact::parse(want, "the expected resource");
    want.strip_given_meta();
    if got != want {
        panic!("{what} differs from the expected resource\n exported: {got}\n expected: {want}");
    }
}
