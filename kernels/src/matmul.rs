//! Dense GEMMs on the CPU: FP32/FP64 through the `gemm` crate (SIMD micro-kernels chosen at run time,
//! multi-threaded with rayon), and BF16 operands with FP32 accumulation.
//!
//! All `unsafe` of the crate's GEMM path is in [`gemm_into`]: the views are validated first, so the
//! raw-pointer call only ever touches memory that the borrowed slices own.

use half::bf16;

use crate::tensor::fmt_shape;
use crate::{KernelError, Real, Result, Tensor};

/// Below this many multiply-adds a GEMM runs on the calling thread.
const PARALLEL_THRESHOLD: usize = 1 << 18;

/// A read-only strided matrix view into a slice.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A mutable strided matrix view into a slice, with no two elements sharing memory.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

fn last_index(offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(offset);
    }
    offset.checked_add(
        (rows - 1)
            .checked_mul(rs)?
            .checked_add((cols - 1).checked_mul(cs)?)?,
    )
}

fn check_view(
    operand: &'static str,
    len: usize,
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<()> {
    match last_index(offset, rows, cols, rs, cs) {
        Some(last) if rows == 0 || cols == 0 || last < len => Ok(()),
        _ => Err(KernelError::shape(
            operand,
            format!(
                "a view of {rows}x{cols} (offset {offset}, strides {rs},{cs}) inside the buffer"
            ),
            format!("a buffer of {len} elements"),
        )),
    }
}

impl<'a, T> MatRef<'a, T> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(data, 0, rows, cols, cols, 1)
    }

    /// A general strided view: element `(i, j)` is `data[offset + i * row_stride + j * col_stride]`.
    pub fn strided(
        data: &'a [T],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        check_view(
            "matrix view",
            data.len(),
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        )?;
        Ok(Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows of the view.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the view.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl<'a, T> MatMut<'a, T> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(data, 0, rows, cols, cols, 1)
    }

    /// A general strided view; the strides must not make two elements share memory.
    pub fn strided(
        data: &'a mut [T],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        check_view(
            "output view",
            data.len(),
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        )?;
        let disjoint = rows <= 1 && (cols <= 1 || col_stride >= 1)
            || cols <= 1 && row_stride >= 1
            || (col_stride >= 1 && row_stride >= cols * col_stride)
            || (row_stride >= 1 && col_stride >= rows * row_stride);
        if !disjoint {
            return Err(KernelError::shape(
                "output view",
                "strides that give every element its own memory",
                format!("{rows}x{cols} with strides {row_stride},{col_stride}"),
            ));
        }
        Ok(Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }
}

/// `c = a * b`, or `c += a * b` when `accumulate` is set.
pub fn gemm_into<T: Real>(
    c: MatMut<'_, T>,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    accumulate: bool,
) -> Result<()> {
    if a.cols != b.rows || c.rows != a.rows || c.cols != b.cols {
        return Err(KernelError::shape(
            "gemm operands",
            format!(
                "[m, k] x [k, n] -> [m, n] with c = [{}, {}]",
                c.rows, c.cols
            ),
            format!("a = [{}, {}], b = [{}, {}]", a.rows, a.cols, b.rows, b.cols),
        ));
    }
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c.data[c.offset + i * c.row_stride + j * c.col_stride] = T::zero();
                }
            }
        }
        return Ok(());
    }
    // SAFETY: the three views were bounds-checked at construction (every element index they can
    // produce lies inside their slice), the output view's strides were checked to be
    // non-overlapping, and the output is borrowed mutably while the inputs are borrowed shared, so
    // they cannot alias.
    unsafe {
        raw_gemm(
            c.data.as_mut_ptr().add(c.offset),
            c.row_stride,
            c.col_stride,
            accumulate,
            &a,
            &b,
        );
    }
    Ok(())
}

/// `a * b` into a new row-major `[m, n]` buffer, written by the GEMM directly (no zero fill
/// before it).
pub fn gemm_new<T: Real>(a: MatRef<'_, T>, b: MatRef<'_, T>) -> Result<Vec<T>> {
    if a.cols != b.rows {
        return Err(KernelError::shape(
            "gemm operands",
            "[m, k] x [k, n]".to_string(),
            format!("a = [{}, {}], b = [{}, {}]", a.rows, a.cols, b.rows, b.cols),
        ));
    }
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let len = crate::checked_numel("gemm output", &[m, n], std::mem::size_of::<T>())?;
    if len == 0 || k == 0 {
        return Ok(vec![T::zero(); len]);
    }
    let mut out: Vec<T> = Vec::new();
    out.try_reserve_exact(len).map_err(|_| {
        KernelError::invalid("gemm output", format!("cannot allocate {len} elements"))
    })?;
    // SAFETY: `out` has capacity for `m * n` elements, laid out row-major (row stride `n`,
    // column stride 1), so every element index the GEMM produces is in bounds, and it cannot
    // alias the inputs (it is freshly allocated). With `read_dst = false` the `gemm` crate
    // never reads the destination: every one of its code paths (the blocked kernels, gemv,
    // gevv and the small horizontal kernels, checked in gemm-common 0.19) sets alpha to zero
    // and then stores without loading. It writes all `m * n` elements, so they are initialised
    // when `set_len` runs.
    unsafe {
        raw_gemm(out.as_mut_ptr(), n, 1, false, &a, &b);
        out.set_len(len);
    }
    Ok(out)
}

/// Calls the `gemm` crate on views whose shapes agree (`a: [m, k]`, `b: [k, n]`, `k > 0`).
///
/// # Safety
///
/// `dst` with the given strides must address `m * n` distinct elements valid for writes (and
/// for reads when `accumulate` is set, in which case they must be initialised), not aliasing
/// `a` or `b`.
unsafe fn raw_gemm<T: Real>(
    dst: *mut T,
    row_stride: usize,
    col_stride: usize,
    accumulate: bool,
    a: &MatRef<'_, T>,
    b: &MatRef<'_, T>,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    // Large GEMMs split across rayon's threads, unless this call already runs inside a parallel
    // region (a rayon worker thread: attention heads, experts, weight gradients), where nested
    // splitting only adds overhead. The result does not depend on the choice.
    let nested = rayon::current_thread_index().is_some();
    let parallelism = if !nested && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let as_isize = |v: usize| v as isize;
    // SAFETY: the caller guarantees the destination; the input views were bounds-checked at
    // construction, so every element index they can produce lies inside their slices. `T` is
    // f32 or f64 (the only `Real` types), both supported by `gemm`. All strides fit in `isize`
    // because they index into allocated slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            as_isize(col_stride),
            as_isize(row_stride),
            accumulate,
            a.data.as_ptr().add(a.offset),
            as_isize(a.col_stride),
            as_isize(a.row_stride),
            b.data.as_ptr().add(b.offset),
            as_isize(b.col_stride),
            as_isize(b.row_stride),
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

fn matrix_view<'a, T: Real>(
    operand: &'static str,
    t: &'a Tensor<T>,
    transpose: bool,
) -> Result<MatRef<'a, T>> {
    let dims = t.expect_rank(operand, 2)?;
    let view = MatRef::row_major(t.data(), dims[0], dims[1])?;
    Ok(if transpose { view.t() } else { view })
}

/// `op(a) * op(b)` for 2-D tensors, where `op` transposes when its flag is set.
pub fn matmul<T: Real>(
    a: &Tensor<T>,
    transpose_a: bool,
    b: &Tensor<T>,
    transpose_b: bool,
) -> Result<Tensor<T>> {
    let av = matrix_view("matmul.a", a, transpose_a)?;
    let bv = matrix_view("matmul.b", b, transpose_b)?;
    if av.cols != bv.rows {
        return Err(KernelError::shape(
            "matmul.b",
            format!("{} rows to match a's inner dimension", av.cols),
            format!(
                "{} (b is {}{})",
                bv.rows,
                fmt_shape(b.shape()),
                if transpose_b { " transposed" } else { "" }
            ),
        ));
    }
    let (m, n) = (av.rows, bv.cols);
    Tensor::new([m, n], gemm_new(av, bv)?)
}

/// Rounds every element to the nearest BF16 value (ties to even), kept in `f32` storage: the
/// same values as `bf16::from_f32(v).to_f32()`, computed on the bits so the loop vectorises
/// (NaN stays NaN).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn round_bf16(x: &mut [f32]) {
    for v in x {
        let bits = v.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
        // A NaN keeps its (quieted) payload's top bits instead of rounding into infinity.
        let nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
        *v = f32::from_bits(if nan {
            (bits | 0x0040_0000) & 0xffff_0000
        } else {
            rounded
        });
    }
}

/// `x` rounded to BF16, kept in `f32` storage (see [`round_bf16`]).
pub fn rounded_bf16(x: &Tensor<f32>) -> Tensor<f32> {
    let mut y = x.clone();
    round_bf16(y.data_mut());
    y
}

/// BF16 GEMM: BF16 operands, products and sums in FP32 (BF16 products are exact in FP32), FP32 out.
/// Round the result with [`round_bf16`] for a BF16 output.
pub fn matmul_bf16(
    a: &Tensor<bf16>,
    transpose_a: bool,
    b: &Tensor<bf16>,
    transpose_b: bool,
) -> Result<Tensor<f32>> {
    matmul(
        &a.map(bf16::to_f32),
        transpose_a,
        &b.map(bf16::to_f32),
        transpose_b,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_rounding_matches_the_half_crate() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        // Every rounding midpoint and its neighbours over a sweep of exponents.
        let mut s = 0x1234_5678u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let mid = (s & 0xffff_0000) | 0x8000;
            for b in [s, mid, mid - 1, mid + 1] {
                xs.push(f32::from_bits(b));
            }
        }
        let mut got = xs.clone();
        round_bf16(&mut got);
        for (x, g) in xs.iter().zip(&got) {
            let want = bf16::from_f32(*x).to_f32();
            if want.is_nan() {
                assert!(g.is_nan(), "{x:e}");
            } else {
                assert_eq!(g.to_bits(), want.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
    }

    #[test]
    fn overwriting_gemms_never_read_the_destination() {
        // `gemm_new` relies on the gemm crate not reading the destination when it overwrites:
        // a NaN-filled destination must come out exactly as a zero-filled one, on every kernel
        // path (gemv with m or n = 1, the small horizontal kernels, the blocked kernels).
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 5),
            (9, 1, 5),
            (4, 4, 3),
            (16, 16, 40),
            (17, 33, 129),
            (130, 70, 300),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 3.0).collect();
            let av = MatRef::row_major(&a, m, k).unwrap();
            let bv = MatRef::row_major(&b, k, n).unwrap();
            let mut zeros = vec![0f32; m * n];
            gemm_into(MatMut::row_major(&mut zeros, m, n).unwrap(), av, bv, false).unwrap();
            let mut nans = vec![f32::NAN; m * n];
            gemm_into(MatMut::row_major(&mut nans, m, n).unwrap(), av, bv, false).unwrap();
            assert_eq!(zeros, nans, "m {m} n {n} k {k}");
            assert_eq!(gemm_new(av, bv).unwrap(), zeros, "m {m} n {n} k {k}");
            // Transposed operands take other packing paths.
            let at = MatRef::row_major(&a, k, m).unwrap().t();
            let bt = MatRef::row_major(&b, n, k).unwrap().t();
            let mut z2 = vec![0f32; m * n];
            gemm_into(MatMut::row_major(&mut z2, m, n).unwrap(), at, bt, false).unwrap();
            assert_eq!(
                gemm_new(at, bt).unwrap(),
                z2,
                "transposed m {m} n {n} k {k}"
            );
        }
        let empty: [f32; 0] = [];
        let a0 = MatRef::row_major(&empty, 3, 0).unwrap();
        let b0 = MatRef::row_major(&empty, 0, 2).unwrap();
        assert_eq!(gemm_new(a0, b0).unwrap(), vec![0f32; 6]);
    }

    fn naive(a: &Tensor<f64>, ta: bool, b: &Tensor<f64>, tb: bool) -> Tensor<f64> {
        let get = |t: &Tensor<f64>, tr: bool, i: usize, j: usize| {
            let c = t.shape()[1];
            if tr {
                t.data()[j * c + i]
            } else {
                t.data()[i * c + j]
            }
        };
        let (m, k) = if ta {
            (a.shape()[1], a.shape()[0])
        } else {
            (a.shape()[0], a.shape()[1])
        };
        let n = if tb { b.shape()[0] } else { b.shape()[1] };
        let mut out = Tensor::zeros([m, n]);
        for i in 0..m {
            for j in 0..n {
                out.data_mut()[i * n + j] =
                    (0..k).map(|p| get(a, ta, i, p) * get(b, tb, p, j)).sum();
            }
        }
        out
    }

    fn seq(shape: [usize; 2], seed: f64) -> Tensor<f64> {
        let n = shape[0] * shape[1];
        Tensor::new(
            shape,
            (0..n).map(|i| ((i as f64 + seed) * 0.37).sin()).collect(),
        )
        .unwrap()
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (m, k, n) = (70, 133, 65);
            let a = seq(if ta { [k, m] } else { [m, k] }, 1.0);
            let b = seq(if tb { [n, k] } else { [k, n] }, 2.0);
            let got = matmul(&a, ta, &b, tb).unwrap();
            let want = naive(&a, ta, &b, tb);
            assert!(got.max_abs_diff(&want).unwrap() < 1e-10, "ta={ta} tb={tb}");
        }
    }

    #[test]
    fn large_parallel_f32_matches_f64() {
        let (m, k, n) = (257, 300, 129);
        let a = seq([m, k], 0.5);
        let b = seq([k, n], 1.5);
        let want = matmul(&a, false, &b, false).unwrap();
        let got = matmul(&a.cast::<f32>(), false, &b.cast::<f32>(), false).unwrap();
        assert!(got.cast::<f64>().max_abs_diff(&want).unwrap() < 1e-3);
    }

    #[test]
    fn accumulate_adds_into_output() {
        let a = seq([3, 4], 0.0);
        let b = seq([4, 5], 1.0);
        let mut c = vec![1.0f64; 15];
        gemm_into(
            MatMut::row_major(&mut c, 3, 5).unwrap(),
            MatRef::row_major(a.data(), 3, 4).unwrap(),
            MatRef::row_major(b.data(), 4, 5).unwrap(),
            true,
        )
        .unwrap();
        let want = naive(&a, false, &b, false);
        for (g, w) in c.iter().zip(want.data()) {
            assert!((g - (w + 1.0)).abs() < 1e-12);
        }
    }

    #[test]
    fn shape_errors_name_the_operand() {
        let a = Tensor::<f32>::zeros([2, 3]);
        let b = Tensor::<f32>::zeros([4, 5]);
        let err = matmul(&a, false, &b, false).unwrap_err();
        assert!(err.to_string().contains("matmul.b"), "{err}");
        let v = Tensor::<f32>::zeros([6]);
        let err = matmul(&v, false, &b, false).unwrap_err();
        assert!(err.to_string().contains("matmul.a"), "{err}");
        assert!(MatRef::strided(&[0.0f32; 4], 1, 2, 2, 2, 1).is_err());
        assert!(MatMut::strided(&mut [0.0f32; 8], 0, 2, 2, 0, 1).is_err());
    }

    #[test]
    fn bf16_gemm_accumulates_in_f32() {
        // 1 + 2^-9 * 256 terms: a BF16 accumulator would lose every small term.
        let k = 257;
        let a = Tensor::new([1, k], vec![bf16::ONE; k]).unwrap();
        let mut bv = vec![bf16::from_f32(2f32.powi(-9)); k];
        bv[0] = bf16::ONE;
        let b = Tensor::new([k, 1], bv).unwrap();
        let c = matmul_bf16(&a, false, &b, false).unwrap();
        assert_eq!(c.data()[0], 1.0 + 256.0 * 2f32.powi(-9));
    }
}
