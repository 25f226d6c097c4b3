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
    /// The CUDA driver, a CUDA library (NVRTC, cuBLAS, NCCL) or a device is not available.
    #[error("cuda unavailable: {reason}")]
    CudaUnavailable {
        /// What is missing, and what to do about it.
        reason: String,
    },
    /// NVRTC did not compile a kernel source.
    #[error("nvrtc could not compile {source_name}.cu for {arch}: {log}")]
    Compile {
        /// The source (`quant`, `fp8_gemm`, ...).
        source_name: &'static str,
        /// The target architecture (`sm_90`).
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A CUDA call failed while running a kernel: a launch error, an out-of-memory, a fault.
    #[error("cuda error in {kernel} ({shapes}): {reason}")]
    Cuda {
        /// The kernel or operation (`fp8_gemm_grouped`, `alloc`, ...).
        kernel: &'static str,
        /// The shapes it was given.
        shapes: String,
        /// The driver's message.
        reason: String,
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

/// Whether every element is finite: `x * 0` is `0` for finite `x` and NaN for infinities and
/// NaN, so summing it over 16 lanes checks everything in one vectorised pass.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub(crate) fn all_finite<T: crate::Real>(data: &[T]) -> bool {
    let mut probe = [T::zero(); 16];
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        for (z, &x) in probe.iter_mut().zip(c) {
            *z += x * T::zero();
        }
    }
    for (z, &x) in probe.iter_mut().zip(chunks.remainder()) {
        *z += x * T::zero();
    }
    probe.iter().all(|z| *z == T::zero())
}

/// Fails with [`KernelError::NonFinite`] naming the first non-finite element of `data`.
pub(crate) fn check_finite<T: crate::Real>(operand: &'static str, data: &[T]) -> Result<()> {
    // Fast path: a vectorised probe; the slow search only runs when something is wrong.
    if all_finite(data) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finiteness_probe_finds_every_kind_of_non_finite_value() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for n in [1usize, 16, 17, 100] {
                for pos in [0, n / 2, n - 1] {
                    let mut v = vec![1.5f32; n];
                    v[pos] = bad;
                    assert!(!all_finite(&v), "{bad} at {pos} of {n}");
                    let err = check_finite("x", &v).unwrap_err();
                    assert!(
                        matches!(err, KernelError::NonFinite { index, .. } if index == pos),
                        "{err}"
                    );
                }
            }
        }
        assert!(all_finite(&[
            f32::MAX,
            f32::MIN,
            0.0,
            -0.0,
            f32::MIN_POSITIVE
        ]));
        assert!(all_finite::<f64>(&[]));
        assert!(check_finite("x", &[1.0f64, 2.0]).is_ok());
    }
}
