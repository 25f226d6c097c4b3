//! The one error type of `shoal-kernels`.

use thiserror::Error;

/// Everything a kernel can refuse. Each variant names the operand (or argument) at fault and why,
/// so that a caller several layers up can report it without extra context.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KernelError {
    /// An operand does not have the shape the operation needs.
    #[error("shape mismatch for {operand}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which operand (for example `"linear.weight"`).
        operand: &'static str,
        /// What was expected, in words or as a shape.
        expected: String,
        /// What was given.
        got: String,
    },
    /// An operand holds NaN or an infinity where a finite value is required.
    #[error("non-finite value in {operand} at flat index {index}: {value}")]
    NonFinite {
        /// Which operand.
        operand: &'static str,
        /// Flat (row-major) index of the first offending element.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// A configuration or scalar argument is out of its domain.
    #[error("invalid argument {name}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// An index operand (token id, expert id, target) is outside its range.
    #[error("index out of range in {operand} at position {position}: {index} >= {bound}")]
    IndexOutOfRange {
        /// Which operand.
        operand: &'static str,
        /// Position of the offending entry.
        position: usize,
        /// The offending index.
        index: usize,
        /// The exclusive upper bound.
        bound: usize,
    },
}

/// Result alias for kernels.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

impl KernelError {
    pub(crate) fn shape(
        operand: &'static str,
        expected: impl ToString,
        got: impl ToString,
    ) -> Self {
        Self::ShapeMismatch {
            operand,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    pub(crate) fn invalid(name: &'static str, reason: impl ToString) -> Self {
        Self::InvalidArgument {
            name,
            reason: reason.to_string(),
        }
    }
}

/// Fails with [`KernelError::NonFinite`] naming the first non-finite element of `data`.
pub(crate) fn check_finite<T: crate::Real>(operand: &'static str, data: &[T]) -> Result<()> {
    // Fast path: a vectorisable fold; the slow search only runs when something is wrong.
    if data.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    let (index, value) = data
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
        .map(|(i, v)| (i, v.to_f64().unwrap_or(f64::NAN)))
        .unwrap_or((0, f64::NAN));
    Err(KernelError::NonFinite {
        operand,
        index,
        value,
    })
}
