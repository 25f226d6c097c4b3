//! Every CUDA kernel source compiles with NVRTC for Ampere, Ada and Hopper, and defines the kernels
//! the launch code looks up. Needs only the NVRTC library (no GPU): the test command installs it
//! from PyPI. A missing NVRTC library fails these tests; it is never skipped.
#![cfg(feature = "cuda")]

use shoal_kernels::KernelError;
use shoal_kernels::cuda::source::{CHECKED_ARCHS, SOURCES, Source, compile, defines_kernel};

#[test]
fn nvrtc_is_loadable() {
    assert!(
        shoal_kernels::cuda::nvrtc_present(),
        "libnvrtc was not found on LD_LIBRARY_PATH (scripts/test.sh installs nvidia-cuda-nvrtc-cu12)"
    );
}

#[test]
fn every_kernel_source_compiles_for_every_checked_architecture() {
    for source in SOURCES {
        for arch in CHECKED_ARCHS {
            let ptx = compile(source, arch, &[]).unwrap_or_else(|e| panic!("{e}"));
            for kernel in source.kernels {
                assert!(
                    defines_kernel(&ptx, kernel),
                    "{}.cu for {arch} does not define {kernel}",
                    source.name
                );
            }
        }
    }
}

#[test]
fn the_software_fp8_encoder_compiles_for_hopper_too() {
    // The GPU tests compare the hardware conversion with the software one on the same device.
    for source in SOURCES {
        compile(source, "sm_90", &["SHOAL_SOFT_FP8"]).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn hopper_code_uses_the_fp8_tensor_core_and_conversion_instructions() {
    let gemm = compile(&shoal_kernels::cuda::source::FP8_GEMM, "sm_90", &[]).expect("fp8_gemm");
    assert!(
        gemm.to_src()
            .contains("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32")
    );
    // What a Hopper GPU gets (sm_90a): the WGMMA kernel on the FP8 tensor cores, fed through the
    // async proxy by a cp.async pipeline.
    let gemm90a = compile(&shoal_kernels::cuda::source::FP8_GEMM, "sm_90a", &[])
        .expect("fp8_gemm for sm_90a")
        .to_src();
    for instr in [
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3",
        "wgmma.fence.sync.aligned",
        "wgmma.commit_group.sync.aligned",
        "wgmma.wait_group.sync.aligned",
        "fence.proxy.async.shared::cta",
        "cp.async.cg.shared.global",
    ] {
        assert!(gemm90a.contains(instr), "sm_90a PTX lacks {instr}");
    }
    // Without the architecture-specific features there is no WGMMA: the portable path.
    assert!(!gemm.to_src().contains("wgmma.mma_async"));
    let quant = compile(&shoal_kernels::cuda::source::QUANT, "sm_90", &[]).expect("quant");
    assert!(quant.to_src().contains("cvt.rn.satfinite.e4m3x2.f32"));
    // Ampere has neither: the software paths are compiled instead.
    let gemm80 = compile(&shoal_kernels::cuda::source::FP8_GEMM, "sm_80", &[]).expect("fp8_gemm");
    assert!(!gemm80.to_src().contains("e4m3"));
}

#[test]
fn a_source_that_does_not_compile_is_a_typed_error_with_the_log() {
    let broken = Source {
        name: "broken",
        text: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        kernels: &["k"],
        fmad: true,
    };
    match compile(&broken, "sm_90", &[]) {
        Err(KernelError::Compile {
            source_name,
            arch,
            log,
        }) => {
            assert_eq!(source_name, "broken");
            assert_eq!(arch, "sm_90");
            assert!(log.contains("undefined_name"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn probing_gives_the_gpus_or_a_typed_error_never_a_panic() {
    match shoal_kernels::cuda::probe() {
        Ok(gpus) => {
            assert!(shoal_kernels::cuda::driver_present());
            assert!(!gpus.is_empty());
            for g in gpus {
                assert!(
                    g.memory_bytes > 0 && g.sms > 0 && g.compute_capability.0 >= 3,
                    "{g:?}"
                );
                assert!(g.nvlink_peers.iter().all(|p| g.p2p_peers.contains(p)));
            }
        }
        Err(KernelError::CudaUnavailable { reason }) => {
            // This machine (CI) has no driver: the reason says which library is missing.
            if !shoal_kernels::cuda::driver_present() {
                assert!(reason.contains("libcuda"), "{reason}");
            }
            let e = shoal_kernels::cuda::Gpu::open(0).unwrap_err();
            assert!(matches!(e, KernelError::CudaUnavailable { .. }), "{e}");
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}
