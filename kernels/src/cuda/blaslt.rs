//! cuBLASLt's block-scaled FP8 GEMM (cuBLAS 12.9 and later, Hopper only): the vendor's answer to
//! the same recipe as [`Gpu::fp8_gemm`] (1x128 activation tiles, 128x128 weight blocks, E4M3,
//! FP32 accumulation), measured side by side with Shoal's kernel by `examples/gpu_bench.rs`.
//!
//! cuBLASLt reads the scales in layouts of its own: the activation's tile scales K-block-major
//! (`[ceil(k/128), m]`, the rows contiguous) and the weight's block scales with each row of K
//! blocks padded to a multiple of 4 (16 bytes). [`Gpu::fp8_gemm_cublaslt`] lays them out so on the
//! device before the call.

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;
use std::ffi::c_void;

use super::device::{Gpu, cuda_err};
use super::launch::{GpuFp8, dim, grid_stride, launch};
use super::source::QUANT;
use crate::fp8::Fp8Format;
use crate::quant::{Granularity, blocks};
use crate::{KernelError, Result};

/// `CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F` (cuBLAS 12.9): one FP32 scale per 128 K-elements of
/// a row. Passed as its value: the bindings Shoal builds against (CUDA 12.8) predate the enum
/// member, the library loaded at run time must be 12.9 or later.
const SCALE_VEC128_32F: i32 = 4;
/// `CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F` (cuBLAS 12.9): one FP32 scale per 128x128 block.
const SCALE_BLK128X128_32F: i32 = 5;
/// The workspace cuBLASLt may use (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLASLt handle and its workspace, created on first use by one [`Gpu`].
pub(crate) struct LtState {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: a cuBLASLt handle may be used from any host thread; every use of this one queues work
// on the owning `Gpu`'s single stream, which orders the calls and their use of the workspace.
unsafe impl Send for LtState {}
// SAFETY: as above; the handle is only read after creation.
unsafe impl Sync for LtState {}

impl Drop for LtState {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `cublasLtCreate` and is destroyed once, here. A
        // failure leaves nothing to clean up.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

fn lt_err<'a>(what: &'static str, shapes: &'a str) -> impl Fn(lt::CublasError) -> KernelError + 'a {
    move |e| KernelError::Cuda {
        kernel: what,
        shapes: shapes.to_string(),
        reason: format!("{e}"),
    }
}

/// A cuBLASLt descriptor destroyed on drop.
struct Owned<T: Copy> {
    raw: T,
    destroy: unsafe fn(T) -> std::result::Result<(), lt::CublasError>,
}

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by the matching create call and is destroyed once, here.
        let _ = unsafe { (self.destroy)(self.raw) };
    }
}

impl Gpu {
    /// The cuBLASLt handle and workspace of this GPU, created on first use.
    fn lt(&self) -> Result<&LtState> {
        if let Some(s) = self.lt.get() {
            return Ok(s);
        }
        // SAFETY: only tries to open the library with `libloading`; no function of it is called.
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::CudaUnavailable {
                reason: "the cuBLASLt library (libcublasLt.so) was not found".into(),
            });
        }
        self.context()
            .bind_to_thread()
            .map_err(cuda_err("cublaslt_create", ""))?;
        let handle = lt::create_handle().map_err(lt_err("cublaslt_create", ""))?;
        let workspace = match self.zeros::<u8>("cublaslt.workspace", WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: just created, not yet shared.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e);
            }
        };
        if let Err(lost) = self.lt.set(LtState { handle, workspace }) {
            // Another thread's state got there first: dropping ours destroys its handle.
            drop(lost);
        }
        self.lt.get().ok_or_else(|| KernelError::Cuda {
            kernel: "cublaslt_create",
            shapes: String::new(),
            reason: "the cuBLASLt state was not kept".into(),
        })
    }

    /// `C[m, n] = A[m, k] . B[n, k]^T` in BF16 through cuBLASLt's block-scaled FP8 GEMM: A with
    /// 1x128 tile scales, B with 128x128 block scales, both E4M3, `k % 128 == 0` and `n % 8 == 0`.
    /// Needs a Hopper GPU (compute capability 9.0) and cuBLAS 12.9 or later; anything else is a
    /// typed error naming the shapes.
    pub fn fp8_gemm_cublaslt(&self, a: &GpuFp8, b: &GpuFp8) -> Result<CudaSlice<bf16>> {
        let (m, k, n) = (a.rows, a.cols, b.rows);
        let shapes = format!("a [{m}, {k}], b [{n}, {}]", b.cols);
        let kernel = "cublaslt_fp8_block_scaled";
        if b.cols != k {
            return Err(KernelError::shape(
                "fp8_gemm_cublaslt.b",
                format!("[n, {k}] (inner dimension of a)"),
                format!("[{n}, {}]", b.cols),
            ));
        }
        if a.format != Fp8Format::E4M3 || b.format != Fp8Format::E4M3 {
            return Err(KernelError::invalid(
                "fp8_gemm_cublaslt",
                "cuBLASLt's block scaling multiplies E4M3 operands",
            ));
        }
        if a.granularity != Granularity::Tile1x128 || b.granularity != Granularity::Block128x128 {
            return Err(KernelError::invalid(
                "fp8_gemm_cublaslt",
                "needs 1x128 tile scales on a and 128x128 block scales on b",
            ));
        }
        if k % 128 != 0 || n % 8 != 0 || m == 0 || n == 0 {
            return Err(KernelError::invalid(
                "fp8_gemm_cublaslt",
                format!(
                    "{shapes}: needs k a multiple of 128, n a multiple of 8, and m, n at least 1"
                ),
            ));
        }
        let (major, minor) = self.info().compute_capability;
        if (major, minor) != (9, 0) {
            return Err(KernelError::invalid(
                "fp8_gemm_cublaslt",
                format!(
                    "cuBLASLt's 1x128/128x128 block scaling runs on compute capability 9.0 only; this GPU is {major}.{minor}"
                ),
            ));
        }
        let state = self.lt()?;
        let (kb, nb) = (k / 128, blocks(n));
        let ld = kb.next_multiple_of(4);
        // The scales in cuBLASLt's layouts.
        let mut sa = self.zeros::<f32>("cublaslt.a_scales", kb * m)?;
        let mut sb = self.zeros::<f32>("cublaslt.b_scales", nb * ld)?;
        // a.scales holds the m x kb tile-scale grid and sa as many; b.scales the nb x kb block
        // grid, sb nb rows of ld >= kb.
        let (rm, ckb) = (
            dim("fp8_gemm_cublaslt.m", m)?,
            dim("fp8_gemm_cublaslt.k", kb)?,
        );
        launch!(self, QUANT, "transpose_f32", &shapes, grid_stride(m * kb, 256); &a.scales, &mut sa, &rm, &ckb);
        let (rnb, ld32) = (
            dim("fp8_gemm_cublaslt.n", nb)?,
            dim("fp8_gemm_cublaslt.k", ld)?,
        );
        launch!(self, QUANT, "pad_rows_f32", &shapes, grid_stride(nb * kb, 256); &b.scales, &mut sb, &rnb, &ckb, &ld32);
        let mut d = self.zeros::<bf16>("fp8_gemm_cublaslt.out", m * n)?;
        let stream = self.stream().clone();
        let err = lt_err(kernel, &shapes);
        // Row-major D[m, n] is column-major D^T[n, m] = op(A) . op(B) with cuBLASLt's A = the
        // weight (column-major [k, n], transposed) and B = the activation (column-major [k, m]).
        let desc = Owned {
            raw: lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(&err)?,
            destroy: lt::destroy_matmul_desc,
        };
        let layout = |ty: sys::cudaDataType, rows: usize, cols: usize| {
            Ok::<_, KernelError>(Owned {
                raw: lt::create_matrix_layout(ty, rows as u64, cols as u64, rows as i64)
                    .map_err(&err)?,
                destroy: lt::destroy_matrix_layout,
            })
        };
        let la = layout(sys::cudaDataType::CUDA_R_8F_E4M3, k, n)?;
        let lb = layout(sys::cudaDataType::CUDA_R_8F_E4M3, k, m)?;
        let ld_ = layout(sys::cudaDataType::CUDA_R_16BF, n, m)?;
        let pref = Owned {
            raw: lt::create_matmul_pref().map_err(&err)?,
            destroy: lt::destroy_matmul_pref,
        };
        let (pa, _ga) = b.codes.device_ptr(&stream);
        let (pb, _gb) = a.codes.device_ptr(&stream);
        let (psa, _gsa) = sb.device_ptr(&stream);
        let (psb, _gsb) = sa.device_ptr(&stream);
        let (pw, _gw) = state.workspace.device_ptr(&stream);
        let (pd, _gd) = d.device_ptr_mut(&stream);
        use sys::cublasLtMatmulDescAttributes_t as A;
        // Every attribute set here is an i32 (transposes, scale modes) or a u64 (device
        // pointers), passed by address and size.
        let set_i32 = |attr: A, v: i32| {
            // SAFETY: the descriptor is alive; `v` is the 4 readable bytes the attribute wants.
            unsafe { lt::set_matmul_desc_attribute(desc.raw, attr, (&v as *const i32).cast(), 4) }
                .map_err(&err)
        };
        let set_u64 = |attr: A, v: u64| {
            // SAFETY: as above, 8 bytes.
            unsafe { lt::set_matmul_desc_attribute(desc.raw, attr, (&v as *const u64).cast(), 8) }
                .map_err(&err)
        };
        set_i32(A::CUBLASLT_MATMUL_DESC_TRANSA, 1)?;
        set_i32(A::CUBLASLT_MATMUL_DESC_TRANSB, 0)?;
        set_i32(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, SCALE_BLK128X128_32F)?;
        set_i32(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, SCALE_VEC128_32F)?;
        set_u64(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, psa)?;
        set_u64(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, psb)?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: the preference descriptor is alive; the value is a u64 as the attribute wants.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.raw,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        }
        .map_err(&err)?;
        // SAFETY: every descriptor is alive and describes the buffers passed below.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(
                state.handle,
                desc.raw,
                la.raw,
                lb.raw,
                ld_.raw,
                ld_.raw,
                pref.raw,
            )
        }
        .map_err(&err)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: A holds n x k codes (b), B holds m x k codes (a), D holds m x n BF16 values, the
        // scale buffers hold the layouts set above, the workspace holds WORKSPACE_BYTES; all live
        // on this stream, which the call is queued on. beta = 0, so C (= D) is not read.
        unsafe {
            lt::matmul(
                state.handle,
                desc.raw,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                pa as *const c_void,
                la.raw,
                pb as *const c_void,
                lb.raw,
                pd as *const c_void,
                ld_.raw,
                pd as *mut c_void,
                ld_.raw,
                &heuristic.algo,
                pw as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream().cast(),
            )
        }
        .map_err(&err)?;
        drop((_ga, _gb, _gsa, _gsb, _gw, _gd));
        Ok(d)
    }
}
