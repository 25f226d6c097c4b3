//! The one error type of `shoal-spec`.

use thiserror::Error;

/// A configuration that cannot be used, with the source and the field at fault.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpecError {
    /// The text is not valid JSON (or not a JSON object).
    #[error("{source_name}: not a json object: {reason}")]
    Json {
        /// Where the text came from (a file path or a preset name).
        source_name: String,
        /// The parser's complaint.
        reason: String,
    },
    /// Required fields are absent.
    #[error("{source_name}: missing required field(s): {}", fields.join(", "))]
    MissingFields {
        /// Where the text came from.
        source_name: String,
        /// Every missing field, in the order of the format's documentation.
        fields: Vec<String>,
    },
    /// A field is present but unusable.
    #[error("{source_name}: field {field}: {reason}")]
    InvalidField {
        /// Where the configuration came from.
        source_name: String,
        /// The field's name.
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// No preset has that name.
    #[error("unknown model preset {name:?}: known presets are {}", known.join(", "))]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The presets that exist.
        known: Vec<String>,
    },
    /// A planning input (cluster shape, parallelism, expert loads) that cannot be used.
    #[error("{field}: {reason}")]
    Invalid {
        /// The argument or field at fault.
        field: String,
        /// Why it was refused.
        reason: String,
    },
}

impl SpecError {
    /// A refused planning input.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SpecError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
