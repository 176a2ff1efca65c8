//! The kick-off request: level, parameters, GET query or POST `Parameters` body.

use serde_json::{Value, json};

/// Which data an export covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Level {
    /// `[base]/$export`: everything.
    #[default]
    System,
    /// `[base]/Patient/$export`: every patient's compartment.
    Patient,
    /// `[base]/Group/<id>/$export`: the compartments of the group's members.
    Group(String),
}

impl Level {
    /// The path of the kick-off under the FHIR base.
    pub fn path(&self) -> String {
        match self {
            Level::System => "$export".to_string(),
            Level::Patient => "Patient/$export".to_string(),
            Level::Group(id) => format!("Group/{}/$export", encode(id)),
        }
    }
}

/// A kick-off request with every parameter of the Bulk Data IG.
#[derive(Debug, Clone, Default)]
pub struct ExportRequest {
    /// The level.
    pub level: Level,
    /// `_type`: resource types.
    pub types: Vec<String>,
    /// `_since`: a FHIR instant.
    pub since: Option<String>,
    /// `_until`: a FHIR instant.
    pub until: Option<String>,
    /// `_typeFilter`: one FHIR search query per value (`Type?param=value`).
    pub type_filters: Vec<String>,
    /// `_elements`.
    pub elements: Vec<String>,
    /// `_outputFormat` (`None`: the server's default, ndjson).
    pub output_format: Option<String>,
    /// `patient`: patient ids (POST `valueReference`s; comma-separated on GET).
    pub patients: Vec<String>,
    /// `includeAssociatedData`.
    pub include_associated_data: Vec<String>,
    /// `organizeOutputBy` (e.g. `Patient`).
    pub organize_output_by: Option<String>,
    /// `allowPartialManifests=true`.
    pub allow_partial_manifests: bool,
    /// Kick off with POST and a `Parameters` body instead of GET.
    pub post: bool,
}

impl ExportRequest {
    /// The kick-off URL without query for `base` (the FHIR base URL).
    pub fn endpoint(&self, base: &str) -> String {
        format!("{}/{}", base.trim_end_matches('/'), self.level.path())
    }

    /// The parameters as `(name, value)` pairs, as a GET query sends them.
    pub fn query_pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(f) = &self.output_format {
            q.push(("_outputFormat", f.clone()));
        }
        if !self.types.is_empty() {
            q.push(("_type", self.types.join(",")));
        }
        if let Some(s) = &self.since {
            q.push(("_since", s.clone()));
        }
        if let Some(u) = &self.until {
            q.push(("_until", u.clone()));
        }
        for f in &self.type_filters {
            q.push(("_typeFilter", f.clone()));
        }
        if !self.elements.is_empty() {
            q.push(("_elements", self.elements.join(",")));
        }
        if !self.patients.is_empty() {
            q.push(("patient", self.patients.join(",")));
        }
        if !self.include_associated_data.is_empty() {
            q.push(("includeAssociatedData", self.include_associated_data.join(",")));
        }
        if let Some(o) = &self.organize_output_by {
            q.push(("organizeOutputBy", o.clone()));
        }
        if self.allow_partial_manifests {
            q.push(("allowPartialManifests", "true".to_string()));
        }
        q
    }

    /// The GET kick-off URL for `base`, parameters percent-encoded.
    pub fn get_url(&self, base: &str) -> String {
        let mut url = self.endpoint(base);
        let pairs = self.query_pairs();
        if !pairs.is_empty() {
            let mut s = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &pairs {
                s.append_pair(k, v);
            }
            url.push('?');
            url.push_str(&s.finish());
        }
        url
    }

    /// The POST body: a FHIR `Parameters` resource.
    pub fn parameters(&self) -> Value {
        let mut p: Vec<Value> = Vec::new();
        let string = |name: &str, v: &str| json!({"name": name, "valueString": v});
        if let Some(f) = &self.output_format {
            p.push(string("_outputFormat", f));
        }
        if !self.types.is_empty() {
            p.push(string("_type", &self.types.join(",")));
        }
        if let Some(s) = &self.since {
            p.push(json!({"name": "_since", "valueInstant": s}));
        }
        if let Some(u) = &self.until {
            p.push(json!({"name": "_until", "valueInstant": u}));
        }
        for f in &self.type_filters {
            p.push(string("_typeFilter", f));
        }
        if !self.elements.is_empty() {
            p.push(string("_elements", &self.elements.join(",")));
        }
        for id in &self.patients {
            let reference = if id.contains('/') { id.clone() } else { format!("Patient/{id}") };
            p.push(json!({"name": "patient", "valueReference": {"reference": reference}}));
        }
        for v in &self.include_associated_data {
            p.push(json!({"name": "includeAssociatedData", "valueCode": v}));
        }
        if let Some(o) = &self.organize_output_by {
            p.push(string("organizeOutputBy", o));
        }
        if self.allow_partial_manifests {
            p.push(json!({"name": "allowPartialManifests", "valueBoolean": true}));
        }
        json!({"resourceType": "Parameters", "parameter": p})
    }
}

/// Percent-encodes one path segment.
fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_post_carry_every_parameter() {
        let r = ExportRequest {
            level: Level::Group("g 1".into()),
            types: vec!["Patient".into(), "Observation".into()],
            since: Some("2020-01-01T00:00:00Z".into()),
            type_filters: vec!["Observation?code=1234-5&status=final".into()],
            patients: vec!["p1".into()],
            allow_partial_manifests: true,
            ..Default::default()
        };
        let url = r.get_url("http://h/fhir/");
        assert_eq!(
            url,
            "http://h/fhir/Group/g%201/$export?_type=Patient%2CObservation&_since=2020-01-01T00%3A00%3A00Z\
             &_typeFilter=Observation%3Fcode%3D1234-5%26status%3Dfinal&patient=p1&allowPartialManifests=true"
        );
        let p = r.parameters();
        assert_eq!(p["parameter"][1], json!({"name": "_since", "valueInstant": "2020-01-01T00:00:00Z"}));
        assert_eq!(p["parameter"][3]["valueReference"]["reference"], "Patient/p1");
        assert_eq!(p["parameter"][4]["valueBoolean"], true);
        assert_eq!(ExportRequest::default().get_url("http://h/fhir"), "http://h/fhir/$export");
    }
}
