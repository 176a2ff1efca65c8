//! `_elements`: keep only the listed top-level elements (plus `resourceType`, `id`, `meta`
//! and the type's mandatory elements, D21) and tag the result `SUBSETTED`, as FHIR search
//! does. Kept elements are copied exactly as stored (D17), in their stored order.

use sluice_json::{Json, Str};
use std::sync::Arc;

/// The `SUBSETTED` tag added to `meta.tag`.
const SUBSETTED: &str = r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED","display":"subsetted"}"#;

/// The subsetting for one resource type; `None` from [`Subsetter::for_type`] means "whole
/// resources".
#[derive(Debug, Clone)]
pub(crate) struct Subsetter {
    resource_type: String,
    keep: Arc<Vec<String>>,
}

impl Subsetter {
    /// Entries `name` apply to every type, `Type.name` to `Type` only. When no entry
    /// applies to `resource_type`, its resources are exported whole.
    pub(crate) fn for_type(elements: Option<&[String]>, resource_type: &str) -> Option<Self> {
        let keep: Vec<String> = elements?
            .iter()
            .filter_map(|e| match e.split_once('.') {
                None => Some(e.clone()),
                Some((t, name)) if t == resource_type => Some(name.to_string()),
                Some(_) => None,
            })
            .collect();
        (!keep.is_empty()).then(|| Subsetter { resource_type: resource_type.to_string(), keep: Arc::new(keep) })
    }

    /// Whether the root member `name` stays: `resourceType`, `id`, `meta`, a listed or
    /// mandatory element, or the `_name` that carries a kept primitive's id and extensions.
    fn keeps(&self, name: &str) -> bool {
        let element = name.strip_prefix('_').unwrap_or(name);
        matches!(name, "resourceType" | "id" | "meta")
            || self.keep.iter().any(|k| k == element)
            || sluice_fhir::is_mandatory_element(&self.resource_type, element)
    }

    /// The subsetted line (compact JSON). A line that is not a JSON object is returned as is.
    pub(crate) fn apply(&self, line: &[u8]) -> Vec<u8> {
        let Ok(Json::Object(members)) = Json::parse_bytes(line) else {
            return line.to_vec();
        };
        let mut out = Json::Object(members.into_iter().filter(|(k, _)| self.keeps(&k.text())).collect());
        let tag = Json::parse(SUBSETTED).expect("the SUBSETTED tag is JSON");
        match out.get_mut("meta") {
            Some(meta @ Json::Object(_)) => match meta.get_mut("tag") {
                Some(Json::Array(tags)) => tags.push(tag),
                _ => meta.set("tag", Json::Array(vec![tag]), None),
            },
            _ => out.set("meta", Json::Object(vec![(Str::new("tag"), Json::Array(vec![tag]))]), Some("id")),
        }
        out.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(s: &Subsetter, line: &str) -> String {
        String::from_utf8(s.apply(line.as_bytes())).unwrap()
    }

    #[test]
    fn keeps_listed_and_mandatory_elements_exactly_in_their_order() {
        let els = vec!["status".to_string(), "Patient.name".to_string(), "valueQuantity".to_string()];
        let obs = Subsetter::for_type(Some(&els), "Observation").unwrap();
        let line = r#"{"resourceType":"Observation","id":"o","meta":{"versionId":"1"},"valueQuantity":{"value":1.50},"status":"final","_status":{"id":"s"},"code":{"text":"\u2028"},"subject":{}}"#;
        assert_eq!(
            apply(&obs, line),
            r#"{"resourceType":"Observation","id":"o","meta":{"versionId":"1","tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED","display":"subsetted"}]},"valueQuantity":{"value":1.50},"status":"final","_status":{"id":"s"},"code":{"text":"\u2028"}}"#,
            "code is mandatory for Observation; subject is not"
        );

        let pat = Subsetter::for_type(Some(&els), "Patient").unwrap();
        let out = apply(
            &pat,
            r#"{"resourceType":"Patient","id":"p","name":[{}],"gender":"x","meta":{"tag":[{"code":"a"}]}}"#,
        );
        assert_eq!(
            out,
            r#"{"resourceType":"Patient","id":"p","name":[{}],"meta":{"tag":[{"code":"a"},{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED","display":"subsetted"}]}}"#
        );
        let bare = apply(&pat, r#"{"resourceType":"Patient","id":"p"}"#);
        assert!(bare.starts_with(r#"{"resourceType":"Patient","id":"p","meta":{"tag":[{"#), "{bare}");
    }

    #[test]
    fn mandatory_elements_stay_even_when_not_listed() {
        let els = vec!["id".to_string(), "code".to_string()];
        let cond = Subsetter::for_type(Some(&els), "Condition").unwrap();
        let out = apply(
            &cond,
            r#"{"resourceType":"Condition","id":"c","subject":{"reference":"Patient/p"},"code":{},"onsetDateTime":"2020"}"#,
        );
        assert!(out.contains(r#""subject":{"reference":"Patient/p"}"#) && !out.contains("onset"), "{out}");
        let mr = Subsetter::for_type(Some(&els), "MedicationRequest").unwrap();
        let out =
            apply(&mr, r#"{"resourceType":"MedicationRequest","id":"m","medicationCodeableConcept":{},"note":[]}"#);
        assert!(out.contains("medicationCodeableConcept") && !out.contains("note"), "{out}");
    }

    #[test]
    fn types_without_entries_are_whole() {
        let els = vec!["Patient.name".to_string()];
        assert!(Subsetter::for_type(Some(&els), "Observation").is_none());
        assert!(Subsetter::for_type(None, "Patient").is_none());
    }
}
