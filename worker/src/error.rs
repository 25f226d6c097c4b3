//! The one error type of `shoal-worker`.

use std::path::Path;

use shoal_kernels::KernelError;
use shoal_spec::SpecError;
use thiserror::Error;

/// Everything the worker can refuse or fail at. Messages name the file, tensor or field at fault.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// A kernel refused its operands.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A model configuration is unusable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file or directory.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A data source is unusable (bad token ids, too short, unreadable).
    #[error("data {source_name}: {reason}")]
    Data {
        /// The data source (file path or `synthetic`).
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint is missing pieces, has misshapen tensors or unsupported dtypes.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file or directory.
        path: String,
        /// What is wrong, naming the tensor where there is one.
        reason: String,
    },
    /// Bytes from a peer that do not form a frame (truncated, wrong magic or kind, lengths that do
    /// not match, values out of range).
    #[error("malformed {kind} frame: {reason}")]
    Frame {
        /// The frame kind expected (`dispatch`, `combine`).
        kind: &'static str,
        /// What is wrong, with the offsets or lengths.
        reason: String,
    },
    /// A pipeline rank failed, or waited too long for a peer.
    #[error("pipeline rank {rank}: {reason}")]
    Pipeline {
        /// The rank that failed.
        rank: usize,
        /// What it was doing and what went wrong, naming the operation and the peer.
        reason: String,
    },
    /// A transfer between ranks failed: the peer went away, sent something malformed, or did
    /// not answer in time.
    #[error("rank {rank}: {op} with rank {peer}: {reason}")]
    Comm {
        /// The rank that saw the failure.
        rank: usize,
        /// The peer it was exchanging with.
        peer: usize,
        /// The operation, with its step (`reduce-scatter (step 3)`).
        op: String,
        /// What went wrong.
        reason: String,
    },
    /// An argument or setting is out of its domain.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: String,
        /// Why it was refused.
        reason: String,
    },
}

/// Result alias for the worker.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl WorkerError {
    /// An IO error on `path`.
    pub fn io(path: impl AsRef<Path>, err: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            reason: err.to_string(),
        }
    }

    /// A data-source error.
    pub fn data(source_name: impl ToString, reason: impl ToString) -> Self {
        Self::Data {
            source_name: source_name.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A checkpoint error.
    pub fn checkpoint(path: impl AsRef<Path>, reason: impl ToString) -> Self {
        Self::Checkpoint {
            path: path.as_ref().display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// Whether running the job again may succeed: a peer lost, a link broken or a wait timed
    /// out, as opposed to an error that would recur (invalid input, a divergence, a bad file).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Comm { .. } | Self::Pipeline { .. } | Self::Frame { .. }
        )
    }

    /// An invalid argument.
    pub fn invalid(name: impl ToString, reason: impl ToString) -> Self {
        Self::InvalidArgument {
            name: name.to_string(),
            reason: reason.to_string(),
        }
    }
}
