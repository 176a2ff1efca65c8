//! Group membership: who is a member of a FHIR `Group` at an instant (D6), and who joined
//! it after an instant (D7).
//!
//! A member counts at an instant unless it is `inactive` or its `period` does not contain the
//! instant; only members whose `entity` references a Patient count. The functions read the
//! Group's JSON as a `serde_json::Value`: nothing here depends on exact numbers or string
//! escapes, only on `inactive`, `period` and `entity.reference`.

use crate::compartment::patient_reference_id;
use crate::instant;
use serde_json::Value;
use std::collections::HashSet;
use time::OffsetDateTime;

/// The patient ids of a Group's members that count at `at` (D6): `inactive` members and
/// members whose `period` does not contain `at` are skipped; only Patient references count.
/// Each id once, in the order of the members.
pub fn group_members(group: &Value, at: OffsetDateTime) -> Vec<String> {
    let mut out = Vec::new();
    let Some(members) = group.get("member").and_then(|m| m.as_array()) else { return out };
    let mut seen = HashSet::new();
    for m in members {
        if m.get("inactive").and_then(|v| v.as_bool()) == Some(true) {
            continue;
        }
        if let Some(period) = m.get("period") {
            let bound = |k: &str| period.get(k).and_then(|v| v.as_str()).and_then(|s| instant::parse(s).ok());
            if bound("start").is_some_and(|s| s > at) || bound("end").is_some_and(|e| e < at) {
                continue;
            }
        }
        let reference = m.pointer("/entity/reference").and_then(|v| v.as_str());
        if let Some(id) = reference.and_then(patient_reference_id)
            && seen.insert(id)
        {
            out.push(id.to_string());
        }
    }
    out
}

/// The members of `members` (a Group's members now) who were not members of the Group
/// version current at `since` (D7): not in `then` (`None`: the Group did not exist, or was
/// deleted, at `since`), or not counting at `since` by the D6 rules (inactive, or a
/// `period` that did not contain `since`). In the order of `members`.
pub fn late_joiners(members: &[String], then: Option<&Value>, since: OffsetDateTime) -> Vec<String> {
    let before = then.map(|g| group_members(g, since)).unwrap_or_default();
    let before: HashSet<&String> = before.iter().collect();
    members.iter().filter(|m| !before.contains(m)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn group_members_respect_inactive_and_period() {
        let at = instant::parse("2024-06-01T00:00:00Z").unwrap();
        let g = json!({"resourceType":"Group","member":[
            {"entity":{"reference":"Patient/a"}},
            {"entity":{"reference":"Patient/b"},"inactive":true},
            {"entity":{"reference":"Patient/c"},"period":{"start":"2025-01-01"}},
            {"entity":{"reference":"Patient/d"},"period":{"end":"2024-01-01"}},
            {"entity":{"reference":"Patient/e"},"period":{"start":"2024-01-01","end":"2024-12-31"}},
            {"entity":{"reference":"Practitioner/f"}},
            {"entity":{"reference":"Patient/a"}}
        ]});
        assert_eq!(group_members(&g, at), vec!["a".to_string(), "e".to_string()]);
        assert!(group_members(&json!({"resourceType":"Group"}), at).is_empty());
    }

    #[test]
    fn late_joiners_are_members_now_who_did_not_count_at_since() {
        let since = instant::parse("2024-06-01T00:00:00Z").unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let now = ids(&["a", "b", "c", "d", "e", "f"]);
        let then = json!({"resourceType":"Group","member":[
            {"entity":{"reference":"Patient/a"}},
            {"entity":{"reference":"Patient/b"},"inactive":true},
            {"entity":{"reference":"Patient/c"},"period":{"start":"2024-07-01"}},
            {"entity":{"reference":"Patient/d"},"period":{"start":"2024-01-01","end":"2024-05-01"}},
            {"entity":{"reference":"Patient/e"},"period":{"start":"2024-01-01"}},
            {"entity":{"reference":"Patient/gone"}}
        ]});
        // b was inactive, c had not started yet, d had ended, f was not listed.
        assert_eq!(late_joiners(&now, Some(&then), since), ids(&["b", "c", "d", "f"]));
        // No Group at `_since`: everyone joined after it.
        assert_eq!(late_joiners(&now, None, since), now);
        assert!(late_joiners(&ids(&["a", "e"]), Some(&then), since).is_empty());
    }
}
