//! Private JWKs to the DER forms `jsonwebtoken` signs with (it reads no private JWK):
//! RSA as PKCS#1 `RSAPrivateKey`, P-384 EC as PKCS#8 wrapping an RFC 5915 `ECPrivateKey`.

use base64::Engine as _;
use serde_json::Value;

/// A private key read from a JWK: its algorithm family and DER.
pub(crate) enum JwkDer {
    /// PKCS#1 DER of an RSA private key.
    Rsa(Vec<u8>),
    /// PKCS#8 DER of a P-384 private key.
    EcP384(Vec<u8>),
}

fn field(jwk: &Value, name: &str) -> Result<Vec<u8>, String> {
    let s = jwk
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("the private JWK has no '{name}' (a private key needs it)"))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("the JWK's '{name}' is not base64url: {e}"))
}

/// Converts a private JWK (`kty` RSA, or EC on `crv` P-384).
pub(crate) fn to_der(jwk: &Value) -> Result<JwkDer, String> {
    match jwk.get("kty").and_then(Value::as_str) {
        Some("RSA") => {
            let mut body = Vec::new();
            body.extend(der_uint(&[0]));
            for name in ["n", "e", "d", "p", "q", "dp", "dq", "qi"] {
                body.extend(der_uint(&field(jwk, name)?));
            }
            Ok(JwkDer::Rsa(tlv(0x30, &body)))
        }
        Some("EC") => {
            let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or_default();
            if crv != "P-384" {
                return Err(format!("EC keys must be on P-384 for ES384 (SMART Backend Services), not '{crv}'"));
            }
            let fixed = |mut v: Vec<u8>| -> Result<Vec<u8>, String> {
                while v.len() > 48 && v[0] == 0 {
                    v.remove(0);
                }
                if v.len() > 48 {
                    return Err("a P-384 coordinate or scalar longer than 48 bytes".into());
                }
                let mut out = vec![0; 48 - v.len()];
                out.extend(v);
                Ok(out)
            };
            let (d, x, y) = (fixed(field(jwk, "d")?)?, fixed(field(jwk, "x")?)?, fixed(field(jwk, "y")?)?);
            let mut point = vec![0x00, 0x04];
            point.extend(&x);
            point.extend(&y);
            let mut ec = Vec::new();
            ec.extend(tlv(0x02, &[1]));
            ec.extend(tlv(0x04, &d));
            ec.extend(tlv(0xa1, &tlv(0x03, &point)));
            let ec = tlv(0x30, &ec);
            // id-ecPublicKey, secp384r1
            const ALG: &[u8] = &[
                0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00,
                0x22,
            ];
            let mut p8 = Vec::new();
            p8.extend(tlv(0x02, &[0]));
            p8.extend(ALG);
            p8.extend(tlv(0x04, &ec));
            Ok(JwkDer::EcP384(tlv(0x30, &p8)))
        }
        other => Err(format!("unsupported JWK kty {other:?}: RSA or EC (P-384) keys only")),
    }
}

/// DER tag-length-value.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER of an unsigned big-endian number.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    tlv(0x02, &v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_integers_and_lengths() {
        assert_eq!(der_uint(&[0]), vec![2, 1, 0]);
        assert_eq!(der_uint(&[0, 0, 0x7f]), vec![2, 1, 0x7f]);
        assert_eq!(der_uint(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(tlv(0x04, &[7; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(tlv(0x04, &[7; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    }

    /// A JWK made from an RSA key's components converts to exactly the PKCS#1 DER openssl
    /// writes for it, and signs (skipped without the `openssl` tool).
    #[test]
    fn rsa_jwk_matches_openssl() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, der) = (dir.path().join("k.pem"), dir.path().join("k.der"));
        let openssl = |args: &[&std::ffi::OsStr]| std::process::Command::new("openssl").args(args).output();
        let Ok(out) = openssl(&["genrsa".as_ref(), "-out".as_ref(), pem.as_os_str(), "2048".as_ref()]) else {
            return; // no openssl here
        };
        assert!(out.status.success(), "openssl genrsa: {}", String::from_utf8_lossy(&out.stderr));
        let out = openssl(&[
            "rsa".as_ref(),
            "-in".as_ref(),
            pem.as_os_str(),
            "-traditional".as_ref(),
            "-outform".as_ref(),
            "DER".as_ref(),
            "-out".as_ref(),
            der.as_os_str(),
        ])
        .unwrap();
        assert!(out.status.success(), "openssl rsa: {}", String::from_utf8_lossy(&out.stderr));
        let want = std::fs::read(&der).unwrap();
        let ints = read_ints(&want);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let names = ["n", "e", "d", "p", "q", "dp", "dq", "qi"];
        let mut jwk = serde_json::json!({"kty": "RSA"});
        for (name, v) in names.iter().zip(&ints[1..]) {
            jwk[name] = b64(v).into();
        }
        let JwkDer::Rsa(got) = to_der(&jwk).unwrap() else { panic!("RSA") };
        assert_eq!(got, want);
        let key = jsonwebtoken::EncodingKey::from_rsa_der(&got);
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS384);
        jsonwebtoken::encode(&header, &serde_json::json!({"a": 1}), &key).expect("signs");
    }

    /// The INTEGERs of a DER SEQUENCE (lengths up to two bytes).
    fn read_ints(der: &[u8]) -> Vec<Vec<u8>> {
        let len = |d: &[u8], at: usize| -> (usize, usize) {
            match d[at] {
                n if n < 0x80 => (n as usize, at + 1),
                0x81 => (d[at + 1] as usize, at + 2),
                0x82 => (((d[at + 1] as usize) << 8) | d[at + 2] as usize, at + 3),
                _ => panic!("long length"),
            }
        };
        let (_, mut at) = len(der, 1);
        let mut out = Vec::new();
        while at < der.len() {
            assert_eq!(der[at], 2);
            let (n, start) = len(der, at + 1);
            out.push(der[start..start + n].to_vec());
            at = start + n;
        }
        out
    }
}
