//! A dense, row-major, owned tensor: the operand type of every operator.

use crate::{KernelError, Real, Result};

/// A dense row-major tensor that owns its elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

/// The element count of `shape`, or an error naming `operand` when it overflows or exceeds what
/// one allocation of `elem_size`-byte elements can hold. A zero dimension makes the count zero
/// whatever the others are.
pub fn checked_numel(operand: &'static str, shape: &[usize], elem_size: usize) -> Result<usize> {
    let too_big = || {
        KernelError::shape(
            operand,
            "a shape whose element count fits in memory",
            fmt_shape(shape),
        )
    };
    if shape.contains(&0) {
        return Ok(0);
    }
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(too_big)?;
    if n.checked_mul(elem_size.max(1))
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(too_big());
    }
    Ok(n)
}

/// Formats a shape as `[a, b, c]` for error messages.
pub(crate) fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl<T: Copy> Tensor<T> {
    /// Wraps `data` with `shape`; fails if the element count does not match.
    pub fn new(shape: impl Into<Vec<usize>>, data: Vec<T>) -> Result<Self> {
        let shape = shape.into();
        let numel = checked_numel("tensor.shape", &shape, std::mem::size_of::<T>())?;
        if numel != data.len() {
            return Err(KernelError::shape(
                "tensor.data",
                format!("{numel} elements for shape {}", fmt_shape(&shape)),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Self { shape, data })
    }

    /// Wraps data whose length the caller has already matched to `shape`.
    pub(crate) fn from_parts(shape: Vec<usize>, data: Vec<T>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// A tensor of `shape` filled with `value`.
    ///
    /// Panics, like `vec!`, if the element count overflows; shapes that come from users go
    /// through [`Tensor::try_full`] or [`checked_numel`] first.
    pub fn full(shape: impl Into<Vec<usize>>, value: T) -> Self {
        let shape = shape.into();
        let numel = shape.iter().product();
        Self {
            shape,
            data: vec![value; numel],
        }
    }

    /// A tensor of `shape` filled with `value`, or an error naming `operand` if the shape is too
    /// large to allocate.
    pub fn try_full(operand: &'static str, shape: impl Into<Vec<usize>>, value: T) -> Result<Self> {
        let shape = shape.into();
        let numel = checked_numel(operand, &shape, std::mem::size_of::<T>())?;
        Ok(Self {
            shape,
            data: vec![value; numel],
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// The elements, row-major, mutably.
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Gives up the elements.
    pub fn into_data(self) -> Vec<T> {
        self.data
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// The product of all dimensions but the last: the number of rows when viewed as a matrix.
    pub fn rows(&self) -> usize {
        match self.shape.split_last() {
            Some((_, lead)) => lead.iter().product(),
            None => 1,
        }
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: impl Into<Vec<usize>>) -> Result<Self> {
        Self::new(shape, self.data)
    }

    /// Applies `f` to every element.
    pub fn map<U: Copy>(&self, f: impl Fn(T) -> U) -> Tensor<U> {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }

    /// Fails unless the shape is exactly `expected`.
    pub fn expect_shape(&self, operand: &'static str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(KernelError::shape(
                operand,
                fmt_shape(expected),
                fmt_shape(&self.shape),
            ));
        }
        Ok(())
    }

    /// Fails unless the tensor has `n` dimensions; returns them.
    pub fn expect_rank(&self, operand: &'static str, n: usize) -> Result<&[usize]> {
        if self.shape.len() != n {
            return Err(KernelError::shape(
                operand,
                format!("{n} dimensions"),
                fmt_shape(&self.shape),
            ));
        }
        Ok(&self.shape)
    }

    /// Views the tensor as a matrix `[rows, last_dim]`, failing for a scalar.
    pub fn as_matrix(&self, operand: &'static str) -> Result<(usize, usize)> {
        if self.shape.is_empty() {
            return Err(KernelError::shape(
                operand,
                "at least 1 dimension",
                fmt_shape(&self.shape),
            ));
        }
        Ok((self.rows(), self.last_dim()))
    }
}

impl<T: Real> Tensor<T> {
    /// A tensor of zeros (panics like `vec!` if the element count overflows; see
    /// [`Tensor::try_zeros`]).
    pub fn zeros(shape: impl Into<Vec<usize>>) -> Self {
        Self::full(shape, T::zero())
    }

    /// A tensor of zeros, or an error naming `operand` if the shape is too large to allocate.
    pub fn try_zeros(operand: &'static str, shape: impl Into<Vec<usize>>) -> Result<Self> {
        Self::try_full(operand, shape, T::zero())
    }

    /// Fails with [`KernelError::NonFinite`] if any element is NaN or infinite.
    pub fn check_finite(&self, operand: &'static str) -> Result<()> {
        crate::error::check_finite(operand, &self.data)
    }

    /// Converts element type through `f64`.
    pub fn cast<U: Real>(&self) -> Tensor<U> {
        self.map(|v| U::of(v.f64()))
    }

    /// Adds `other` element-wise into `self`.
    pub fn add_assign(&mut self, other: &Self, operand: &'static str) -> Result<()> {
        other.expect_shape(operand, &self.shape)?;
        crate::real::add_into(&mut self.data, &other.data);
        Ok(())
    }

    /// The largest absolute element-wise difference to `other` (shapes must match).
    pub fn max_abs_diff(&self, other: &Self) -> Result<f64> {
        other.expect_shape("other", &self.shape)?;
        Ok(self
            .data
            .iter()
            .zip(&other.data)
            .map(|(&a, &b)| (a - b).abs().f64())
            .fold(0.0, f64::max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_shapes_are_errors_not_panics() {
        let e = Tensor::<f32>::new([2, 1 << 63], vec![]).unwrap_err();
        assert!(e.to_string().contains("tensor.shape"), "{e}");
        assert!(Tensor::<f32>::new([1 << 40, 1 << 40, 0], vec![]).is_ok());
        assert!(Tensor::<f32>::try_zeros("x", [1 << 62]).is_err());
        assert_eq!(checked_numel("x", &[3, 0, usize::MAX], 4).unwrap(), 0);
        assert_eq!(checked_numel("x", &[3, 5], 4).unwrap(), 15);
    }
}
