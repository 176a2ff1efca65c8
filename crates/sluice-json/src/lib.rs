//! Exact JSON: a tree that keeps every number and string exactly as it was written.
//!
//! FHIR decimals are arbitrary-precision and their precision is significant (`1.50` is not
//! `1.5`), so Sluice must never route a resource through `f64`. `serde_json::Value` does
//! (unless its workspace-wide `arbitrary_precision` switch is on, which changes how every
//! other crate in the build deserialises numbers), and it also re-escapes strings. [`Json`]
//! instead borrows the text of each number and string from the input, escapes included, and
//! writes it back verbatim (D17): reading a resource and writing it again only removes the
//! whitespace between tokens.
//!
//! Syntax is checked by `serde_json` (error messages with line and column, a nesting limit
//! of 128); the tree is then built by a small scanner that only ever sees valid JSON.

use serde::de::IgnoredAny;
use std::borrow::Cow;
use std::fmt;

/// Why a text is not JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// A JSON string as written between its quotes, escapes included.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Str<'a>(Cow<'a, str>);

impl<'a> Str<'a> {
    /// A string with this text (escaped the way `serde_json` escapes).
    pub fn new(text: &str) -> Str<'static> {
        let quoted = serde_json::to_string(text).expect("a string always serialises");
        Str(Cow::Owned(quoted[1..quoted.len() - 1].to_string()))
    }

    /// The text as written between the quotes (escapes not decoded).
    pub fn raw(&self) -> &str {
        &self.0
    }

    /// The decoded text. A string with a lone surrogate escape (`\ud800`), which has no
    /// Unicode text, is returned as written.
    pub fn text(&self) -> Cow<'_, str> {
        if !self.0.contains('\\') {
            return Cow::Borrowed(&self.0);
        }
        match serde_json::from_str::<String>(&format!("\"{}\"", self.0)) {
            Ok(s) => Cow::Owned(s),
            Err(_) => Cow::Borrowed(&self.0),
        }
    }

    /// Whether the decoded text is `s`.
    pub fn is(&self, s: &str) -> bool {
        if self.0.contains('\\') { self.text() == s } else { self.0 == s }
    }

    /// The same string, owning its text.
    pub fn into_owned(self) -> Str<'static> {
        Str(Cow::Owned(self.0.into_owned()))
    }
}

/// A JSON value whose numbers and strings keep their written form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number as written: every digit, sign, exponent and trailing zero.
    Number(Cow<'a, str>),
    /// A string.
    String(Str<'a>),
    /// An array.
    Array(Vec<Json<'a>>),
    /// An object's members in their written order (duplicates kept).
    Object(Vec<(Str<'a>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// Parses `text` (whitespace around the value is allowed).
    pub fn parse(text: &'a str) -> Result<Json<'a>, Error> {
        serde_json::from_str::<IgnoredAny>(text).map_err(|e| Error(e.to_string()))?;
        let mut scanner = Scanner { text, bytes: text.as_bytes(), at: 0 };
        scanner.value(0)
    }

    /// Parses UTF-8 bytes.
    pub fn parse_bytes(bytes: &'a [u8]) -> Result<Json<'a>, Error> {
        let text = std::str::from_utf8(bytes).map_err(|e| Error(format!("not UTF-8: {e}")))?;
        Json::parse(text)
    }

    /// A string value.
    pub fn string(text: &str) -> Json<'static> {
        Json::String(Str::new(text))
    }

    /// Appends the compact JSON text of this value to `out`.
    pub fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(true) => out.push_str("true"),
            Json::Bool(false) => out.push_str("false"),
            Json::Number(n) => out.push_str(n),
            Json::String(s) => write_str(s, out),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Object(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_member(key, value, out);
                }
                out.push('}');
            }
        }
    }

    /// The member `key` of an object (the last one, if the key is repeated).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.members()?.iter().rev().find(|(k, _)| k.is(key)).map(|(_, v)| v)
    }

    /// The member `key` of an object, to change it.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Json<'a>> {
        match self {
            Json::Object(members) => members.iter_mut().rev().find(|(k, _)| k.is(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follows `path`, one member name per step.
    pub fn pointer(&self, path: &[&str]) -> Option<&Json<'a>> {
        path.iter().try_fold(self, |node, step| node.get(step))
    }

    /// Sets member `key` of an object: replaces its value where it is, or inserts it after
    /// the member `after` (at the end when there is none). Does nothing to a non-object.
    pub fn set(&mut self, key: &str, value: Json<'a>, after: Option<&str>) {
        let Json::Object(members) = self else { return };
        if let Some((_, v)) = members.iter_mut().rev().find(|(k, _)| k.is(key)) {
            *v = value;
            return;
        }
        let at = after.and_then(|a| members.iter().position(|(k, _)| k.is(a))).map_or(members.len(), |i| i + 1);
        members.insert(at, (Str::new(key), value));
    }

    /// The decoded text of a string.
    pub fn as_str(&self) -> Option<Cow<'_, str>> {
        match self {
            Json::String(s) => Some(s.text()),
            _ => None,
        }
    }

    /// Whether this is a string whose decoded text is `text`.
    pub fn is_str(&self, text: &str) -> bool {
        matches!(self, Json::String(s) if s.is(text))
    }

    /// The number's text, as written.
    pub fn as_number(&self) -> Option<&str> {
        match self {
            Json::Number(n) => Some(n),
            _ => None,
        }
    }

    /// The elements of an array.
    pub fn as_array(&self) -> Option<&[Json<'a>]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The members of an object.
    pub fn members(&self) -> Option<&[(Str<'a>, Json<'a>)]> {
        match self {
            Json::Object(members) => Some(members),
            _ => None,
        }
    }

    /// Whether this is an object.
    pub fn is_object(&self) -> bool {
        matches!(self, Json::Object(_))
    }

    /// The same value, owning all its text.
    pub fn into_owned(self) -> Json<'static> {
        match self {
            Json::Null => Json::Null,
            Json::Bool(b) => Json::Bool(b),
            Json::Number(n) => Json::Number(Cow::Owned(n.into_owned())),
            Json::String(s) => Json::String(s.into_owned()),
            Json::Array(items) => Json::Array(items.into_iter().map(Json::into_owned).collect()),
            Json::Object(members) => {
                Json::Object(members.into_iter().map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
            }
        }
    }
}

impl fmt::Display for Json<'_> {
    /// The compact JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        self.write(&mut out);
        f.write_str(&out)
    }
}

/// Appends `"raw"`: a string as written.
pub fn write_str(s: &Str<'_>, out: &mut String) {
    out.push('"');
    out.push_str(s.raw());
    out.push('"');
}

/// Appends `"key":value`.
pub fn write_member(key: &Str<'_>, value: &Json<'_>, out: &mut String) {
    write_str(key, out);
    out.push(':');
    value.write(out);
}

/// How deeply arrays and objects may nest (as in `serde_json`'s own parser): the tree and
/// everything that walks it recurse, so the depth must be bounded.
pub const MAX_DEPTH: usize = 128;

/// Builds the tree from text that `serde_json` has already accepted, so it checks nothing
/// but the nesting depth.
struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn skip_whitespace(&mut self) {
        while self.bytes.get(self.at).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Skips whitespace and returns the next byte, consuming it.
    fn next(&mut self) -> u8 {
        self.skip_whitespace();
        let b = self.bytes[self.at];
        self.at += 1;
        b
    }

    fn value(&mut self, depth: usize) -> Result<Json<'a>, Error> {
        let b = self.next();
        if matches!(b, b'{' | b'[') && depth >= MAX_DEPTH {
            return Err(Error(format!("nested more than {MAX_DEPTH} levels deep at byte {}", self.at - 1)));
        }
        Ok(match b {
            b'{' => {
                let mut members = Vec::new();
                self.skip_whitespace();
                if self.bytes[self.at] == b'}' {
                    self.at += 1;
                    return Ok(Json::Object(members));
                }
                loop {
                    self.next(); // the key's opening quote
                    let key = self.string();
                    self.next(); // ':'
                    let value = self.value(depth + 1)?;
                    members.push((key, value));
                    if self.next() == b'}' {
                        return Ok(Json::Object(members));
                    }
                }
            }
            b'[' => {
                let mut items = Vec::new();
                self.skip_whitespace();
                if self.bytes[self.at] == b']' {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    if self.next() == b']' {
                        return Ok(Json::Array(items));
                    }
                }
            }
            b'"' => Json::String(self.string()),
            b't' => {
                self.at += 3;
                Json::Bool(true)
            }
            b'f' => {
                self.at += 4;
                Json::Bool(false)
            }
            b'n' => {
                self.at += 3;
                Json::Null
            }
            _ => {
                let start = self.at - 1;
                while self
                    .bytes
                    .get(self.at)
                    .is_some_and(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                {
                    self.at += 1;
                }
                Json::Number(Cow::Borrowed(&self.text[start..self.at]))
            }
        })
    }

    /// The string whose opening quote was just consumed.
    fn string(&mut self) -> Str<'a> {
        let start = self.at;
        loop {
            match self.bytes[self.at] {
                b'"' => break,
                b'\\' => self.at += 2,
                _ => self.at += 1,
            }
        }
        let raw = &self.text[start..self.at];
        self.at += 1;
        Str(Cow::Borrowed(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> String {
        Json::parse(text).unwrap().to_string()
    }

    #[test]
    fn numbers_are_kept_as_written() {
        for n in [
            "112.41600000000001",
            "38.068680711754276",
            "1.50",
            "0.010",
            "-0.0",
            "0",
            "-0",
            "123456789012345678901234567890",
            "3.14159265358979323846264338327950288",
            "1e400",
            "1E-7",
            "2.50e+10",
            "-12",
        ] {
            assert_eq!(round_trip(n), n);
            let doc = format!(r#"{{"a":[{n},{{"b":{n}}}]}}"#);
            assert_eq!(round_trip(&doc), doc);
            assert_eq!(Json::parse(&doc).unwrap().get("a").unwrap().as_array().unwrap()[0].as_number(), Some(n));
        }
    }

    #[test]
    fn strings_keep_their_escapes() {
        let doc = r#"{"a":"\u2028 \" \\ \/ \n \ud83d\ude00 😀 é \u00e9 \ud800","\u0069d":"x"}"#;
        assert_eq!(round_trip(doc), doc);
        let v = Json::parse(doc).unwrap();
        assert_eq!(v.get("id").unwrap().as_str().unwrap(), "x", "keys compare decoded");
        let a = v.get("a").unwrap();
        let Json::String(s) = a else { panic!() };
        assert!(s.raw().starts_with(r"\u2028 "));
        assert_eq!(Json::string("a\"b\u{2028}").to_string(), "\"a\\\"b\u{2028}\"");
        assert_eq!(Json::parse(r#""\ud800""#).unwrap().as_str().unwrap(), r"\ud800", "lone surrogate as written");
    }

    #[test]
    fn whitespace_goes_order_and_duplicates_stay() {
        let text =
            "{ \"z\" : 1 ,\n \"a\":[ 1 , 2 ,{ } , [ ] ],\t\"z\": \"two words\" ,\"t\":true,\"f\":false,\"n\":null}\n";
        assert_eq!(round_trip(text), r#"{"z":1,"a":[1,2,{},[]],"z":"two words","t":true,"f":false,"n":null}"#);
        let v = Json::parse(text).unwrap();
        assert_eq!(v.get("z").unwrap().as_str().unwrap(), "two words", "the last of a repeated key wins");
        assert_eq!(round_trip(" [ ] "), "[]");
        assert_eq!(round_trip("{}"), "{}");
    }

    #[test]
    fn invalid_json_is_refused_with_a_position() {
        for bad in ["", "{", "{\"a\":}", "[1,]", "01", "\"\u{1}\"", "{} x", "nul", "[1e]", "\"\\x\""] {
            let e = Json::parse(bad).expect_err(bad);
            assert!(!e.to_string().is_empty(), "{bad}");
        }
        let deep = "[".repeat(129) + &"]".repeat(129);
        assert!(Json::parse(&deep).unwrap_err().to_string().contains("nested more than 128"));
        let deep = r#"{"a":"#.repeat(1_000_000) + "1" + &"}".repeat(1_000_000);
        assert!(Json::parse(&deep).is_err(), "a million levels fail without exhausting the stack");
        let ok = "[".repeat(128) + &"]".repeat(128);
        assert_eq!(Json::parse(&ok).unwrap().to_string(), ok);
        assert!(Json::parse_bytes(b"\"\xff\"").is_err());
    }

    #[test]
    fn set_replaces_in_place_or_inserts_after() {
        let mut v = Json::parse(r#"{"resourceType":"Patient","name":[]}"#).unwrap();
        v.set("id", Json::string("p1"), Some("resourceType"));
        assert_eq!(v.to_string(), r#"{"resourceType":"Patient","id":"p1","name":[]}"#);
        v.set("id", Json::string("p2"), Some("resourceType"));
        v.set("gender", Json::string("x"), None);
        assert_eq!(v.to_string(), r#"{"resourceType":"Patient","id":"p2","name":[],"gender":"x"}"#);
        assert_eq!(v.pointer(&["id"]).unwrap().as_str().unwrap(), "p2");
        assert!(v.pointer(&["name", "x"]).is_none());
        let mut n = Json::Null;
        n.set("a", Json::Null, None);
        assert_eq!(n, Json::Null);
    }

    #[test]
    fn owned_copies_are_equal() {
        let text = String::from(r#"{"a":[1.0,"x\n"]}"#);
        let owned = Json::parse(&text).unwrap().into_owned();
        drop(text);
        assert_eq!(owned.to_string(), r#"{"a":[1.0,"x\n"]}"#);
    }
}
