//! The one error type of `shoal-coordinator`, and its mapping to gRPC statuses (the only place
//! that mapping happens).

use thiserror::Error;

/// What can go wrong in the coordinator.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    /// Client input that cannot be used: the field path and the reason.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field path, for example `spec.parallelism.ep`.
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// No such object.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What was looked for (`job`, `node`).
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// A transition the object's state does not allow.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The store failed (IO, corruption, a lost connection).
    #[error("store: {0}")]
    Store(String),
    /// A stored record that cannot be decoded.
    #[error("store record {key:?}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The coordinator is shutting down (an actor's mailbox is closed).
    #[error("coordinator is shutting down")]
    Unavailable,
}

impl CoordinatorError {
    /// Refused client input.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CoordinatorError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<shoal_spec::SpecError> for CoordinatorError {
    fn from(e: shoal_spec::SpecError) -> Self {
        match e {
            shoal_spec::SpecError::Invalid { field, reason } => {
                CoordinatorError::InvalidArgument { field, reason }
            }
            other => CoordinatorError::InvalidArgument {
                field: "spec".into(),
                reason: other.to_string(),
            },
        }
    }
}

/// Longest status message sent; the rest is cut. A message travels in an HTTP/2 header, and an
/// oversized one (say, a client's value echoed back) would break the connection instead.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `msg` cut to [`MAX_STATUS_MESSAGE`] bytes (on a character boundary), marked with `...`.
fn clip(mut msg: String) -> String {
    if msg.len() > MAX_STATUS_MESSAGE {
        let mut end = MAX_STATUS_MESSAGE - 3;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
        msg.push_str("...");
    }
    msg
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        let msg = clip(e.to_string());
        match e {
            CoordinatorError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            CoordinatorError::NotFound { .. } => tonic::Status::not_found(msg),
            CoordinatorError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            CoordinatorError::Unavailable => tonic::Status::unavailable(msg),
            CoordinatorError::Store(_) | CoordinatorError::Corrupt { .. } => {
                tonic::Status::internal(msg)
            }
        }
    }
}

/// Results of the coordinator.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_grpc_codes_with_the_field_in_the_message() {
        let s: tonic::Status =
            CoordinatorError::invalid("spec.parallelism.ep", "3 does not divide dp 4").into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "spec.parallelism.ep: 3 does not divide dp 4");
        let s: tonic::Status = CoordinatorError::NotFound {
            kind: "job",
            id: "j-9".into(),
        }
        .into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        let s: tonic::Status = CoordinatorError::Store("disk full".into()).into();
        assert_eq!(s.code(), tonic::Code::Internal);
        let spec = shoal_spec::SpecError::invalid("training.steps", "must be at least 1");
        let s: tonic::Status = CoordinatorError::from(spec).into();
        assert_eq!(s.message(), "training.steps: must be at least 1");
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let s: tonic::Status = CoordinatorError::invalid("spec.model", "é".repeat(5000)).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().len() <= MAX_STATUS_MESSAGE,
            "{}",
            s.message().len()
        );
        assert!(s.message().starts_with("spec.model: éé"));
        assert!(s.message().ends_with("..."));
        let short: tonic::Status = CoordinatorError::invalid("f", "r").into();
        assert_eq!(short.message(), "f: r");
    }
}
