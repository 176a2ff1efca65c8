//! SMART scopes (App Launch 2.x): `system/<Type|*>.<read|write|*>` (v1) and
//! `system/<Type|*>.<cruds>` (v2), as permissions per resource type and interaction.

use std::collections::BTreeMap;
use std::fmt;

/// A FHIR interaction a scope can permit (SMART v2's `c r u d s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Interaction {
    /// `c`: create.
    Create,
    /// `r`: read by id.
    Read,
    /// `u`: update.
    Update,
    /// `d`: delete.
    Delete,
    /// `s`: search (an export is a search).
    Search,
}

impl Interaction {
    const ALL: [Interaction; 5] =
        [Interaction::Create, Interaction::Read, Interaction::Update, Interaction::Delete, Interaction::Search];

    /// Its letter in SMART v2 scopes (`c`, `r`, `u`, `d` or `s`).
    pub fn letter(self) -> char {
        char::from(b"cruds"[self as usize])
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of interactions, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Perms(u8);

impl Perms {
    const READ: Perms = Perms(1 << Interaction::Read as u8 | 1 << Interaction::Search as u8);
    const WRITE: Perms =
        Perms(1 << Interaction::Create as u8 | 1 << Interaction::Update as u8 | 1 << Interaction::Delete as u8);
    const ALL: Perms = Perms(Perms::READ.0 | Perms::WRITE.0);

    fn has(self, i: Interaction) -> bool {
        self.0 & i.bit() != 0
    }

    fn covers(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }
}

/// One parsed `system/` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The resource type, or `*`.
    resource_type: String,
    perms: Perms,
}

impl Scope {
    /// Parses one scope; `None` for anything that is not a `system/` resource scope this
    /// server enforces (other contexts, granular `?` scopes, unknown permissions).
    pub fn parse(text: &str) -> Option<Scope> {
        let rest = text.strip_prefix("system/")?;
        let (ty, perm) = rest.rsplit_once('.')?;
        if ty.is_empty() || !(ty == "*" || sluice_fhir::is_r4_resource_type(ty)) {
            return None;
        }
        let perms = match perm {
            "read" => Perms::READ,
            "write" => Perms::WRITE,
            "*" => Perms::ALL,
            v2 => {
                // v2: a non-empty subsequence of `cruds`, in that order.
                let mut bits = 0u8;
                let mut rest = "cruds";
                for c in v2.chars() {
                    let at = rest.find(c)?;
                    rest = &rest[at + 1..];
                    let i = Interaction::ALL["cruds".find(c)?];
                    bits |= i.bit();
                }
                if bits == 0 {
                    return None;
                }
                Perms(bits)
            }
        };
        Some(Scope { resource_type: ty.to_string(), perms })
    }

    /// Whether this scope grants everything `other` asks for.
    pub fn covers(&self, other: &Scope) -> bool {
        (self.resource_type == "*" || self.resource_type == other.resource_type) && self.perms.covers(other.perms)
    }
}

/// What a token permits: interactions per resource type.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Scopes {
    /// Permissions for every type (`*` scopes).
    any: Perms,
    /// Permissions per named type.
    by_type: BTreeMap<String, Perms>,
    /// The scope text as granted (for logs and the token answer).
    text: String,
}

impl Scopes {
    /// Everything (the root client, or a server without authorization).
    pub fn all() -> Scopes {
        Scopes { any: Perms::ALL, by_type: BTreeMap::new(), text: "system/*.*".into() }
    }

    /// The permissions a space-separated scope string grants; scopes this server does not
    /// enforce grant nothing.
    pub fn parse(text: &str) -> Scopes {
        let mut s = Scopes { text: text.split_whitespace().collect::<Vec<_>>().join(" "), ..Scopes::default() };
        for scope in text.split_whitespace().filter_map(Scope::parse) {
            if scope.resource_type == "*" {
                s.any.0 |= scope.perms.0;
            } else {
                s.by_type.entry(scope.resource_type).or_default().0 |= scope.perms.0;
            }
        }
        s
    }

    /// Whether `interaction` on `resource_type` is permitted.
    pub fn allows(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.any.has(interaction) || self.by_type.get(resource_type).is_some_and(|p| p.has(interaction))
    }

    /// Whether `resource_type` may be exported (read and search).
    pub fn exports(&self, resource_type: &str) -> bool {
        self.allows(resource_type, Interaction::Read) && self.allows(resource_type, Interaction::Search)
    }

    /// Whether every type may be exported.
    pub fn exports_everything(&self) -> bool {
        self.any.covers(Perms::READ)
    }

    /// The scope text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({:?})", self.text)
    }
}

/// The scopes of `requested` (space-separated) that one of `allowed` covers, in request
/// order and deduplicated: what a token for a client allowed `allowed` gets.
pub fn negotiate(requested: &str, allowed: &[String]) -> Vec<String> {
    let allowed: Vec<Scope> = allowed.iter().filter_map(|s| Scope::parse(s)).collect();
    let mut granted: Vec<String> = Vec::new();
    for text in requested.split_whitespace() {
        if granted.iter().any(|g| g == text) {
            continue;
        }
        if let Some(want) = Scope::parse(text)
            && allowed.iter().any(|a| a.covers(&want))
        {
            granted.push(text.to_string());
        }
    }
    granted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_syntax() {
        let s = Scopes::parse("system/*.read system/Observation.cud");
        assert!(s.exports("Patient") && s.exports_everything());
        assert!(s.allows("Observation", Interaction::Create) && !s.allows("Patient", Interaction::Create));
        let s = Scopes::parse("system/Observation.rs system/Patient.r");
        assert!(s.exports("Observation") && !s.exports("Patient") && !s.exports_everything());
        assert!(s.allows("Patient", Interaction::Read));
        let w = Scopes::parse("system/Patient.write");
        assert!(w.allows("Patient", Interaction::Delete) && !w.allows("Patient", Interaction::Read));
        assert!(Scopes::parse("system/*.*").allows("Claim", Interaction::Update));
    }

    #[test]
    fn scopes_not_enforced_here_grant_nothing() {
        for s in [
            "patient/*.read",
            "user/Observation.rs",
            "system/Observation.rs?category=x",
            "system/Nope.read",
            "system/*.sr",
            "system/*.x",
            "system/*.",
            "openid",
            "system/.read",
        ] {
            assert_eq!(Scope::parse(s), None, "{s}");
        }
        assert!(!Scopes::parse("patient/*.read launch").exports("Patient"));
    }

    #[test]
    fn negotiation_keeps_what_the_client_may_have() {
        let allowed = vec!["system/*.read".to_string(), "system/Observation.write".to_string()];
        assert_eq!(
            negotiate(
                "system/Patient.rs system/Observation.c system/Patient.write system/*.rs system/Patient.rs",
                &allowed
            ),
            ["system/Patient.rs", "system/Observation.c", "system/*.rs"]
        );
        assert!(negotiate("system/*.*", &allowed).is_empty());
        assert!(negotiate("patient/*.read", &allowed).is_empty());
    }
}
