//! The standard resource types of FHIR R4 (4.0.1), and what a resource id may be.
//!
//! The list is the `ResourceType` code system of R4 (`CodeSystem-resource-types.json` in the
//! `hl7.fhir.r4.core` 4.0.1 package) without the two abstract types `Resource` and
//! `DomainResource`: 146 concrete types, sorted by byte order (which is alphabetical here, since
//! every name is plain ASCII in UpperCamelCase).

/// Every standard (concrete) FHIR R4 resource type, sorted, without duplicates.
pub static R4_RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// Whether `t` is a standard R4 resource type (exact, case-sensitive match).
pub fn is_r4_resource_type(t: &str) -> bool {
    R4_RESOURCE_TYPES.binary_search(&t).is_ok()
}

/// Whether `id` is a valid FHIR id: 1 to 64 characters of `A-Za-z0-9-.`.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The root elements of `resource_type` with minimum cardinality 1 in R4, as the R4
/// StructureDefinitions list them (a choice element as `name[x]`); empty for a type that has
/// none or is not an R4 type. `_elements` keeps them whether listed or not (D21).
pub fn mandatory_elements(resource_type: &str) -> &'static [&'static str] {
    use crate::mandatory::MANDATORY;
    MANDATORY.binary_search_by(|(t, _)| t.cmp(&resource_type)).map_or(&[], |i| MANDATORY[i].1)
}

/// Whether the JSON member `name` of a `resource_type` is one of its mandatory root
/// elements: listed in [`mandatory_elements`], or a typed form of a mandatory choice
/// (`medicationCodeableConcept` for `medication[x]`).
pub fn is_mandatory_element(resource_type: &str, name: &str) -> bool {
    mandatory_elements(resource_type).iter().any(|element| match element.strip_suffix("[x]") {
        Some(base) => name.strip_prefix(base).is_some_and(|ty| ty.starts_with(|c: char| c.is_ascii_uppercase())),
        None => *element == name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_r4_type_has_its_mandatory_elements() {
        let table: Vec<&str> = crate::mandatory::MANDATORY.iter().map(|(t, _)| *t).collect();
        assert_eq!(table, R4_RESOURCE_TYPES, "one row per R4 type, in the same order");
        assert_eq!(mandatory_elements("Condition"), ["subject"]);
        assert_eq!(mandatory_elements("Observation"), ["status", "code"]);
        assert_eq!(mandatory_elements("Patient"), [] as [&str; 0]);
        assert_eq!(mandatory_elements("EvidenceVariable"), ["status", "characteristic"]);
        assert_eq!(mandatory_elements("Nope"), [] as [&str; 0]);
        assert!(is_mandatory_element("MedicationRequest", "medicationReference"));
        assert!(is_mandatory_element("MedicationRequest", "medicationCodeableConcept"));
        assert!(!is_mandatory_element("MedicationRequest", "medication"));
        assert!(!is_mandatory_element("MedicationRequest", "medicationsomething"));
        assert!(is_mandatory_element("ExplanationOfBenefit", "patient"));
        assert!(!is_mandatory_element("Condition", "code"));
    }

    #[test]
    fn list_has_all_146_concrete_types_sorted_and_unique() {
        assert_eq!(R4_RESOURCE_TYPES.len(), 146);
        for pair in R4_RESOURCE_TYPES.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn names_are_upper_camel_case_ascii() {
        for t in R4_RESOURCE_TYPES {
            assert!(t.starts_with(|c: char| c.is_ascii_uppercase()), "{t}");
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric()), "{t}");
        }
    }

    #[test]
    fn known_types_are_in_and_abstract_or_foreign_ones_are_not() {
        for t in [
            "Account",
            "Binary",
            "Bundle",
            "Parameters",
            "Patient",
            "Observation",
            "ExplanationOfBenefit",
            "MedicinalProductUndesirableEffect",
            "VisionPrescription",
            "OperationOutcome",
            "RequestGroup",
            "Media",
        ] {
            assert!(is_r4_resource_type(t), "{t}");
        }
        for t in [
            "Resource",
            "DomainResource",
            "patient",
            "PATIENT",
            "",
            " Patient",
            // R5-only or pre-R4 names.
            "ActorDefinition",
            "Requirements",
            "DeviceUsage",
            "MedicationUsage",
            "BodySite",
            "ProcedureRequest",
        ] {
            assert!(!is_r4_resource_type(t), "{t:?}");
        }
    }

    #[test]
    fn ids() {
        assert!(valid_id("a-B.9"));
        assert!(valid_id(&"x".repeat(64)));
        assert!(!valid_id(&"x".repeat(65)));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
    }

    #[test]
    fn lookup_agrees_with_linear_scan() {
        for t in R4_RESOURCE_TYPES {
            assert!(is_r4_resource_type(t));
            let lower = t.to_ascii_lowercase();
            assert_eq!(is_r4_resource_type(&lower), R4_RESOURCE_TYPES.contains(&lower.as_str()));
        }
    }
}
