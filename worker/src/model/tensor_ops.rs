//! Small layout helpers for `[rows, groups * width]` activations (heads side by side).

use shoal_kernels::{Real, Tensor};

use crate::{Result, WorkerError};

/// Splits each row's `groups` blocks of `sum(widths)` columns into one tensor per width:
/// part `i` is `[rows, groups * widths[i]]`.
pub fn split_groups<T: Real>(
    x: &Tensor<T>,
    groups: usize,
    widths: &[usize],
) -> Result<Vec<Tensor<T>>> {
    let total: usize = widths.iter().sum();
    let cols = x.last_dim();
    if groups * total != cols {
        return Err(WorkerError::invalid(
            "split",
            format!("{cols} columns are not {groups} groups of {total}"),
        ));
    }
    let rows = x.rows();
    let mut parts: Vec<Vec<T>> = widths
        .iter()
        .map(|w| Vec::with_capacity(rows * groups * w))
        .collect();
    for row in x.data().chunks(cols.max(1)).take(rows) {
        for g in row.chunks(total.max(1)).take(groups) {
            let mut off = 0;
            for (p, &w) in parts.iter_mut().zip(widths) {
                p.extend_from_slice(&g[off..off + w]);
                off += w;
            }
        }
    }
    parts
        .into_iter()
        .zip(widths)
        .map(|(d, &w)| Ok(Tensor::new([rows, groups * w], d)?))
        .collect()
}

/// The inverse of [`split_groups`]: interleaves the parts group by group.
pub fn join_groups<T: Real>(parts: &[&Tensor<T>], groups: usize) -> Result<Tensor<T>> {
    let rows = parts.first().map_or(0, |p| p.rows());
    let mut widths = Vec::with_capacity(parts.len());
    for p in parts {
        if p.rows() != rows || p.last_dim() % groups.max(1) != 0 {
            return Err(WorkerError::invalid(
                "join",
                format!("part of shape {:?} does not fit", p.shape()),
            ));
        }
        widths.push(p.last_dim() / groups.max(1));
    }
    let total: usize = widths.iter().sum();
    let mut out = Vec::with_capacity(rows * groups * total);
    for r in 0..rows {
        for g in 0..groups {
            for (p, &w) in parts.iter().zip(&widths) {
                let start = r * groups * w + g * w;
                out.extend_from_slice(&p.data()[start..start + w]);
            }
        }
    }
    Ok(Tensor::new([rows, groups * total], out)?)
}

/// Repeats a `[rows, w]` tensor `groups` times along the columns: `[rows, groups * w]`.
pub fn repeat_groups<T: Real>(x: &Tensor<T>, groups: usize) -> Result<Tensor<T>> {
    let (rows, w) = (x.rows(), x.last_dim());
    let mut out = Vec::with_capacity(rows * groups * w);
    for row in x.data().chunks(w.max(1)).take(rows) {
        for _ in 0..groups {
            out.extend_from_slice(row);
        }
    }
    Ok(Tensor::new([rows, groups * w], out)?)
}

/// Sums the `groups` blocks of each row: `[rows, groups * w]` to `[rows, w]` (the backward of
/// [`repeat_groups`]).
pub fn sum_groups<T: Real>(x: &Tensor<T>, groups: usize) -> Result<Tensor<T>> {
    let (rows, cols) = (x.rows(), x.last_dim());
    let w = cols / groups.max(1);
    let mut out = vec![T::zero(); rows * w];
    for (o, row) in out.chunks_mut(w.max(1)).zip(x.data().chunks(cols.max(1))) {
        for g in row.chunks(w.max(1)).take(groups) {
            for (a, &b) in o.iter_mut().zip(g) {
                *a += b;
            }
        }
    }
    Ok(Tensor::new([rows, w], out)?)
}

/// `a + b` element-wise.
pub fn add<T: Real>(a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
    let mut out = a.clone();
    out.add_assign(b, "add")?;
    Ok(out)
}

/// Gathers rows `idx` of a `[rows, w]` tensor.
pub fn gather_rows<T: Real>(x: &Tensor<T>, idx: &[usize]) -> Result<Tensor<T>> {
    let w = x.last_dim();
    let mut out = Vec::with_capacity(idx.len() * w);
    for &i in idx {
        out.extend_from_slice(&x.data()[i * w..(i + 1) * w]);
    }
    Ok(Tensor::new([idx.len(), w], out)?)
}

/// Keeps the first `keep` of every `len` consecutive rows (truncating each sequence).
pub fn take_prefix_rows<T: Real>(x: &Tensor<T>, len: usize, keep: usize) -> Result<Tensor<T>> {
    let w = x.last_dim();
    let seqs = x.rows() / len.max(1);
    let mut out = Vec::with_capacity(seqs * keep * w);
    for s in 0..seqs {
        out.extend_from_slice(&x.data()[s * len * w..(s * len + keep) * w]);
    }
    Ok(Tensor::new([seqs * keep, w], out)?)
}

/// The backward of [`take_prefix_rows`]: pads every sequence back to `len` rows with zeros.
pub fn pad_prefix_rows<T: Real>(dx: &Tensor<T>, len: usize, keep: usize) -> Result<Tensor<T>> {
    let w = dx.last_dim();
    let seqs = dx.rows() / keep.max(1);
    let mut out = vec![T::zero(); seqs * len * w];
    for s in 0..seqs {
        out[s * len * w..(s * len + keep) * w]
            .copy_from_slice(&dx.data()[s * keep * w..(s + 1) * keep * w]);
    }
    Ok(Tensor::new([seqs * len, w], out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_are_inverse() {
        let x = Tensor::new([2, 2 * 5], (0..20).map(f64::from).collect()).unwrap();
        let parts = split_groups(&x, 2, &[3, 2]).unwrap();
        assert_eq!(
            parts[0].data(),
            &[0., 1., 2., 5., 6., 7., 10., 11., 12., 15., 16., 17.]
        );
        let back = join_groups(&[&parts[0], &parts[1]], 2).unwrap();
        assert_eq!(back, x);
    }

    #[test]
    fn repeat_and_sum_are_adjoint() {
        let x = Tensor::new([2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let r = repeat_groups(&x, 3).unwrap();
        assert_eq!(r.shape(), &[2, 9]);
        let s = sum_groups(&r, 3).unwrap();
        assert_eq!(s.data(), &[3., 6., 9., 12., 15., 18.]);
    }

    #[test]
    fn prefix_rows_round_trip() {
        let x = Tensor::new([6, 1], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let t = take_prefix_rows(&x, 3, 2).unwrap();
        assert_eq!(t.data(), &[1., 2., 4., 5.]);
        let p = pad_prefix_rows(&t, 3, 2).unwrap();
        assert_eq!(p.data(), &[1., 2., 0., 4., 5., 0.]);
    }
}
