//! The FHIR R4 (4.0.1) pieces Sluice needs, as plain data and pure functions.
//!
//! - [`compartment`]: the complete Patient CompartmentDefinition and the function that
//!   tells which patients a resource belongs to.
//! - [`types`]: the list of standard R4 resource types, and each type's mandatory root
//!   elements (generated from the R4 StructureDefinitions, `tools/mandatory_elements.py`),
//!   and [`valid_id`].
//! - [`outcome`]: `OperationOutcome` issues, the error currency of every layer.
//! - [`instant`]: parsing FHIR `instant` / `dateTime` / `date` values and formatting instants.
//! - [`group`]: Group membership: who is a member at an instant (D6), who joined after one (D7).
//!
//! Nothing here does I/O or is async.

pub mod compartment;
pub mod group;
pub mod instant;
mod mandatory;
pub mod outcome;
pub mod types;

pub use compartment::{PATIENT_COMPARTMENT, is_patient_compartment_type, patient_ids};
pub use group::{group_members, late_joiners};
pub use outcome::{Issue, IssueCode, OperationOutcome, Severity};
pub use types::{R4_RESOURCE_TYPES, is_mandatory_element, is_r4_resource_type, mandatory_elements, valid_id};
