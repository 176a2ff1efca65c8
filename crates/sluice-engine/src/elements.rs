//! `_elements`: keep only the listed top-level elements (plus `resourceType`, `id`, `meta`)
//! and tag the result `SUBSETTED`, as FHIR search does.

use serde_json::{Map, Value, json};
use std::sync::Arc;

/// The subsetting for one resource type; `None` from [`Subsetter::for_type`] means "whole
/// resources".
#[derive(Debug, Clone)]
pub(crate) struct Subsetter {
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
        (!keep.is_empty()).then(|| Subsetter { keep: Arc::new(keep) })
    }

    /// The subsetted line (compact JSON). A line that is not a JSON object is returned as is.
    pub(crate) fn apply(&self, line: &[u8]) -> Vec<u8> {
        let Ok(Value::Object(mut full)) = serde_json::from_slice::<Value>(line) else {
            return line.to_vec();
        };
        let mut out = Map::new();
        for k in ["resourceType", "id"] {
            if let Some(v) = full.remove(k) {
                out.insert(k.to_string(), v);
            }
        }
        out.insert("meta".to_string(), full.remove("meta").unwrap_or_else(|| json!({})));
        for k in self.keep.iter() {
            if let Some(v) = full.remove(k.as_str()) {
                out.insert(k.clone(), v);
            }
        }
        if let Some(meta) = out.get_mut("meta").and_then(Value::as_object_mut) {
            let tags = meta.entry("tag").or_insert_with(|| json!([]));
            if let Some(tags) = tags.as_array_mut() {
                tags.push(json!({
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "SUBSETTED",
                    "display": "subsetted"
                }));
            }
        }
        serde_json::to_vec(&Value::Object(out)).expect("a Value always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_listed_and_mandatory_elements() {
        let els = vec!["status".to_string(), "Patient.name".to_string()];
        let obs = Subsetter::for_type(Some(&els), "Observation").unwrap();
        let line = br#"{"resourceType":"Observation","id":"o","meta":{"versionId":"1"},"status":"final","code":{},"subject":{}}"#;
        let v: Value = serde_json::from_slice(&obs.apply(line)).unwrap();
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), vec!["resourceType", "id", "meta", "status"]);
        assert_eq!(v["meta"]["versionId"], "1");
        assert_eq!(v["meta"]["tag"][0]["code"], "SUBSETTED");

        let pat = Subsetter::for_type(Some(&els), "Patient").unwrap();
        let v: Value =
            serde_json::from_slice(&pat.apply(br#"{"resourceType":"Patient","id":"p","name":[{}],"gender":"x"}"#))
                .unwrap();
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), vec!["resourceType", "id", "meta", "name"]);
    }

    #[test]
    fn types_without_entries_are_whole() {
        let els = vec!["Patient.name".to_string()];
        assert!(Subsetter::for_type(Some(&els), "Observation").is_none());
        assert!(Subsetter::for_type(None, "Patient").is_none());
    }
}
