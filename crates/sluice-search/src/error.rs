//! Why a query cannot be used, in words a person can act on.

/// Why [`parse_query`](crate::parse_query) refused a query. The messages do not repeat the
/// query itself: the caller says which query they are about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    /// The text is not of the form `Type?name=value&...`.
    #[error("{0}")]
    Syntax(String),

    /// The part before `?` is not a standard FHIR R4 resource type.
    #[error(
        "'{resource_type}' is not a standard FHIR R4 resource type{hint}; a query starts with one, e.g. Observation?status=final (names are case-sensitive)"
    )]
    UnknownType {
        /// The type as given.
        resource_type: String,
        /// `" (did you mean X?)"` or empty.
        hint: String,
    },

    /// The parameter is not supported on this resource type.
    #[error("search parameter '{param}' is not supported on {resource_type}; supported: {}", supported.join(", "))]
    UnsupportedParameter {
        /// The resource type of the query.
        resource_type: String,
        /// The parameter as given (without its modifier).
        param: String,
        /// The parameters that are supported on this type.
        supported: Vec<String>,
    },

    /// A search result parameter (`_sort`, `_include`, ...), which a filter cannot use.
    #[error(
        "'{param}' is a search result parameter (it shapes a search's result page, not which resources match); the Bulk Data IG does not allow it in _typeFilter: leave it out"
    )]
    ResultParameter {
        /// The parameter as given.
        param: String,
    },

    /// A chained (`subject.name=`) or reverse-chained (`_has:`) parameter.
    #[error(
        "'{param}' is a chained parameter; chained and reverse-chained (_has) parameters are not supported: filter on the resource's own elements instead"
    )]
    Chained {
        /// The parameter as given.
        param: String,
    },

    /// A modifier the parameter does not support, or no FHIR modifier at all.
    #[error("{} ':{modifier}' on {kind} parameter '{param}'; supported: {allowed}", if *known { "unsupported modifier" } else { "unknown modifier" })]
    UnsupportedModifier {
        /// The parameter (without its modifier).
        param: String,
        /// The modifier as given, without the `:`.
        modifier: String,
        /// The parameter's type (`token`, `date`, ...).
        kind: &'static str,
        /// The modifiers this parameter accepts, for the message.
        allowed: String,
        /// Whether `modifier` is a FHIR search modifier (just not one Sluice supports here).
        known: bool,
    },

    /// A value that cannot be read for the parameter's type.
    #[error("{param}: {reason}")]
    InvalidValue {
        /// The parameter (with its modifier, as given).
        param: String,
        /// What is wrong and what would be right.
        reason: String,
    },
}

impl SearchError {
    /// Whether the query asks for something Sluice does not support (an unknown type,
    /// parameter or modifier, a result or chained parameter), as opposed to text that is
    /// malformed. Callers use it to pick an issue code (`not-supported` vs `invalid`).
    pub fn is_not_supported(&self) -> bool {
        !matches!(self, SearchError::Syntax(_) | SearchError::InvalidValue { .. })
    }
}
