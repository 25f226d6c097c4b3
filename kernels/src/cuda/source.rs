//! The CUDA C++ sources of `kernels/cuda/` and how NVRTC compiles them.
//!
//! Every source is prefixed with `prelude.cuh` (types, FP8/BF16 conversions, warp reductions), so
//! no CUDA header is needed: the NVRTC library alone (for example the `nvidia-cuda-nvrtc-cu12`
//! wheel from PyPI) compiles them, with or without a GPU. That is how CI checks every kernel.

use cudarc::nvrtc::{self, CompileError, CompileOptions, Ptx};

use crate::{KernelError, Result};

const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

/// One CUDA translation unit and the kernels it defines.
#[derive(Debug)]
pub struct Source {
    /// Short name (`quant`, `fp8_gemm`, ...), used in errors and as NVRTC's program name.
    pub name: &'static str,
    /// The CUDA C++ text, without the prelude.
    pub text: &'static str,
    /// The `extern "C"` kernels it defines.
    pub kernels: &'static [&'static str],
    /// Whether multiply-adds may be fused (off where results must equal the CPU's bit for bit).
    pub fmad: bool,
}

/// FP8 quantization (tiles, blocks, fused transpose), dequantization and transposes.
pub const QUANT: Source = Source {
    name: "quant",
    text: include_str!("../../cuda/quant.cu"),
    kernels: &[
        "quantize_tiles",
        "quantize_tiles_transposed",
        "quantize_blocks",
        "dequantize",
        "transpose_u8",
        "transpose_f32",
        "pad_rows_f32",
    ],
    fmad: false,
};

/// The FP8 GEMM with fine-grained scales and FP32 promotion (dense and grouped): mma.sync, and
/// WGMMA for Hopper (sm_90a).
pub const FP8_GEMM: Source = Source {
    name: "fp8_gemm",
    text: include_str!("../../cuda/fp8_gemm.cu"),
    kernels: &["fp8_gemm_grouped", "fp8_gemm_wgmma"],
    fmad: true,
};

/// Training operators: RMSNorm, SwiGLU, RoPE, cross-entropy, AdamW.
pub const OPS: Source = Source {
    name: "ops",
    text: include_str!("../../cuda/ops.cu"),
    kernels: &[
        "rmsnorm_forward",
        "rmsnorm_backward_input",
        "swiglu_forward",
        "swiglu_backward",
        "rope",
        "cross_entropy_forward",
        "cross_entropy_backward",
        "adamw_f32",
        "adamw_bf16",
    ],
    fmad: false,
};

/// The warp-specialized two-hop dispatch/combine kernel and the combine's reduction.
pub const DISPATCH: Source = Source {
    name: "dispatch",
    text: include_str!("../../cuda/dispatch.cu"),
    kernels: &["two_hop", "combine_reduce"],
    fmad: false,
};

/// The rest of the model's training step: attention, the RMSNorm weight gradient, embeddings,
/// column and row copies, row dot products, sums, and the BF16 conversions of the
/// mixed-precision linears.
pub const MODEL: Source = Source {
    name: "model",
    text: include_str!("../../cuda/model.cu"),
    kernels: &[
        "attention_forward",
        "attention_delta",
        "attention_backward_q",
        "attention_backward_kv",
        "row_rstd",
        "rmsnorm_backward_weight",
        "embedding_gather",
        "embedding_scatter",
        "copy_cols",
        "gather_rows",
        "scatter_add_rows",
        "row_dots",
        "add_into",
        "sum_sq_partial",
        "to_bf16",
        "round_bf16",
    ],
    fmad: false,
};

/// Every source, in a fixed order (the index is the per-device module cache's slot).
pub const SOURCES: [&Source; 5] = [&QUANT, &FP8_GEMM, &OPS, &DISPATCH, &MODEL];

/// The architectures CI compiles every source for: Ampere (no FP8 instructions: the software
/// paths), Ada, and Hopper both with its architecture-specific features (`sm_90a`: WGMMA, what a
/// Hopper GPU gets) and without them.
pub const CHECKED_ARCHS: [&str; 4] = ["sm_80", "sm_89", "sm_90", "sm_90a"];

/// The NVRTC architecture a GPU of this compute capability is compiled for: `sm_XY`, and for
/// Hopper (9.0) `sm_90a`, whose architecture-specific instructions (WGMMA) run only there.
pub fn arch_of(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// Whether the NVRTC library can be loaded (checked before any NVRTC call: cudarc panics when a
/// dynamically loaded library is missing).
pub fn nvrtc_present() -> bool {
    // SAFETY: `is_culib_present` only tries to open the library with `libloading`; it calls no
    // function of it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles `source` to PTX for `arch` (for example `sm_90`), with `defines` (`NAME` or
/// `NAME=VALUE`) added.
///
/// Fails with [`KernelError::CudaUnavailable`] when the NVRTC library is missing and with
/// [`KernelError::Compile`] (carrying NVRTC's log) when the source does not compile.
pub fn compile(source: &Source, arch: &str, defines: &[&str]) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(KernelError::CudaUnavailable {
            reason: "the NVRTC library (libnvrtc.so) was not found; install the CUDA toolkit or \
                     the nvidia-cuda-nvrtc-cu12 wheel and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        });
    }
    let text = format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", source.name, source.text);
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    let opts = CompileOptions {
        fmad: Some(source.fmad),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        options,
        name: Some(format!("{}.cu", source.name)),
        ..Default::default()
    };
    nvrtc::compile_ptx_with_opts(text, opts).map_err(|e| KernelError::Compile {
        source_name: source.name,
        arch: arch.to_string(),
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().trim().to_string(),
            other => other.to_string(),
        },
    })
}

/// Whether `ptx` defines an entry point named `kernel`.
pub fn defines_kernel(ptx: &Ptx, kernel: &str) -> bool {
    let text = ptx.to_src();
    text.lines().any(|l| {
        l.contains(".entry")
            && l.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|w| w == kernel)
    })
}
