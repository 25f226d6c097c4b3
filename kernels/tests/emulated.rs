//! The CUDA kernel sources run on the CPU: `kernels/cuda/emu/harness.cpp` compiles every `.cu`
//! file with g++ against a host emulation of the CUDA execution model (each CUDA thread an OS
//! thread; warps and blocks synchronize through barriers, shuffles through them), and these tests
//! hold each kernel to the CPU reference, on host memory.
//!
//! This checks the kernels' logic - indexing, partial tiles, warp and block collectives, the
//! warp-specialized dispatch protocol - on every CI run, which has no GPU. It does not check the
//! GPU-only instructions (mma.sync, cvt.satfinite, ld.acquire): the sources' portable paths stand
//! in for them here, and `tests/gpu.rs` checks those on a GPU.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::{
    bf16_bits, close, combine_routing, gemm_error, randn, random_bf16_rows, random_routing,
    random_rows,
};
use half::bf16;
use libloading::{Library, Symbol};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_kernels::ops::adamw::{AdamCoeffs, AdamWConfig, AdamWState, Moments, adamw_step};
use shoal_kernels::ops::{cross_entropy, rmsnorm, rope, swiglu};
use shoal_kernels::two_hop::{
    Geometry, Routing, Rows, TransferConfig, TwoHopRank, cpu_combine_reduce, cpu_transfer,
};
use shoal_kernels::{Accumulation, Fp8Format, Fp8Matrix, QuantConfig, Tensor, fp8_gemm};

/// The harness, built once per test run.
fn lib() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda/emu/harness.cpp");
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("shoal-emu-{}.so", std::process::id()));
        let status = Command::new("g++")
            .args([
                "-std=c++20",
                "-O2",
                "-shared",
                "-fPIC",
                "-pthread",
                "-ffp-contract=off",
                "-fvisibility=hidden",
                "-Wno-unknown-pragmas",
                "-o",
            ])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("g++ runs (the test command installs it)");
        assert!(status.success(), "g++ could not compile {}", src.display());
        // SAFETY: the library is our harness; its initializers only set up the C++ runtime.
        unsafe { Library::new(&out) }.expect("the harness loads")
    })
}

/// The harness's entry point `name`, typed `T`: the caller names the C signature harness.cpp
/// gives it.
fn kernel<T>(name: &str) -> Symbol<'static, T> {
    // SAFETY: every caller passes the exact signature the symbol has in harness.cpp.
    unsafe { lib().get(name.as_bytes()) }.unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The emulated kernels run one test at a time: each launch takes up to ~1,500 OS threads, and
/// tests running side by side on a small machine would starve each other's spinning warps.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

type QuantFn = unsafe extern "C" fn(*const f32, *mut u8, *mut f32, i32, i32, i32, i32, *mut i32);

fn fmt(f: Fp8Format) -> i32 {
    match f {
        Fp8Format::E4M3 => 0,
        Fp8Format::E5M2 => 1,
    }
}

/// Runs a quantization kernel; returns (codes, scales, non-finite flag).
fn quantize(
    which: &str,
    x: &[f32],
    rows: usize,
    cols: usize,
    cfg: QuantConfig,
) -> (Vec<u8>, Vec<f32>, i32) {
    let kb_out = |c: usize| c.div_ceil(128);
    let (n_scales, tiles_grid) = match which {
        "tiles" => (rows * kb_out(cols), 3u32),
        "transposed" => (cols * kb_out(rows), 0),
        _ => (rows.div_ceil(128) * kb_out(cols), 0),
    };
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; n_scales.max(1)];
    let mut bad = 0i32;
    let (r, c, f, p) = (
        rows as i32,
        cols as i32,
        fmt(cfg.format),
        i32::from(cfg.pow2_scales),
    );
    // SAFETY: buffers hold what the kernel indexes for this shape.
    unsafe {
        match which {
            "tiles" => {
                let k = kernel::<
                    unsafe extern "C" fn(
                        *const f32,
                        *mut u8,
                        *mut f32,
                        i32,
                        i32,
                        i32,
                        i32,
                        *mut i32,
                        u32,
                    ),
                >("emu_quantize_tiles");
                k(
                    x.as_ptr(),
                    codes.as_mut_ptr(),
                    scales.as_mut_ptr(),
                    r,
                    c,
                    f,
                    p,
                    &mut bad,
                    tiles_grid,
                );
            }
            "transposed" => {
                let k = kernel::<QuantFn>("emu_quantize_tiles_transposed");
                k(
                    x.as_ptr(),
                    codes.as_mut_ptr(),
                    scales.as_mut_ptr(),
                    r,
                    c,
                    f,
                    p,
                    &mut bad,
                );
            }
            _ => {
                let k = kernel::<QuantFn>("emu_quantize_blocks");
                k(
                    x.as_ptr(),
                    codes.as_mut_ptr(),
                    scales.as_mut_ptr(),
                    r,
                    c,
                    f,
                    p,
                    &mut bad,
                );
            }
        }
    }
    scales.truncate(n_scales);
    (codes, scales, bad)
}

#[test]
fn quantization_kernels_equal_the_cpu_bit_for_bit() {
    let _serial = serial();
    let mut rng = StdRng::seed_from_u64(11);
    for &(r, c) in &[(1, 128), (3, 200), (130, 257), (5, 1024)] {
        let x = randn(&mut rng, r * c, 2.0);
        for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for pow2_scales in [false, true] {
                let cfg = QuantConfig {
                    format,
                    pow2_scales,
                };
                let want = Fp8Matrix::quantize_tiles(&x, r, c, cfg).unwrap();
                let (codes, scales, bad) = quantize("tiles", &x, r, c, cfg);
                assert_eq!(
                    (codes.as_slice(), scales.as_slice(), bad),
                    (want.codes(), want.scales(), 0),
                    "tiles {r}x{c} {cfg:?}"
                );
                let want = Fp8Matrix::quantize_tiles_transposed(&x, r, c, cfg).unwrap();
                let (codes, scales, _) = quantize("transposed", &x, r, c, cfg);
                assert_eq!(
                    (codes.as_slice(), scales.as_slice()),
                    (want.codes(), want.scales()),
                    "transposed {r}x{c} {cfg:?}"
                );
                let want = Fp8Matrix::quantize_blocks(&x, r, c, cfg).unwrap();
                let (codes, scales, _) = quantize("blocks", &x, r, c, cfg);
                assert_eq!(
                    (codes.as_slice(), scales.as_slice()),
                    (want.codes(), want.scales()),
                    "blocks {r}x{c} {cfg:?}"
                );
            }
        }
    }
}

#[test]
fn a_non_finite_input_raises_the_flag_of_every_quantization_kernel() {
    let _serial = serial();
    let mut x = vec![1.0f32; 3 * 300];
    x[2 * 300 + 7] = f32::NAN;
    for which in ["tiles", "transposed", "blocks"] {
        assert_eq!(
            quantize(which, &x, 3, 300, QuantConfig::default()).2,
            1,
            "{which}"
        );
    }
    x[2 * 300 + 7] = f32::NEG_INFINITY;
    assert_eq!(quantize("tiles", &x, 3, 300, QuantConfig::default()).2, 1);
}

#[test]
fn dequantization_the_byte_transpose_and_the_scale_relayouts_equal_the_cpu() {
    let _serial = serial();
    let mut rng = StdRng::seed_from_u64(12);
    let (r, c) = (140, 300);
    let w = Fp8Matrix::quantize_blocks(&randn(&mut rng, r * c, 1.0), r, c, QuantConfig::default())
        .unwrap();
    let mut out = vec![0f32; r * c];
    let mut t = vec![0u8; r * c];
    // SAFETY: buffers hold the matrix's codes, scales and outputs.
    unsafe {
        kernel::<unsafe extern "C" fn(*const u8, *const f32, *mut f32, i32, i32, i32, i32)>(
            "emu_dequantize",
        )(
            w.codes().as_ptr(),
            w.scales().as_ptr(),
            out.as_mut_ptr(),
            r as i32,
            c as i32,
            0,
            128,
        );
        kernel::<unsafe extern "C" fn(*const u8, *mut u8, i32, i32)>("emu_transpose_u8")(
            w.codes().as_ptr(),
            t.as_mut_ptr(),
            r as i32,
            c as i32,
        );
    }
    assert_eq!(out, w.dequantize().data().to_vec());
    assert_eq!(t, w.transpose().unwrap().codes().to_vec());

    // The scale grids in cuBLASLt's layouts: tile scales K-block-major, block-scale rows padded
    // to a multiple of 4.
    let x = Fp8Matrix::quantize_tiles(&randn(&mut rng, r * c, 1.0), r, c, QuantConfig::default())
        .unwrap();
    let kb = c.div_ceil(128);
    let (nb, ld) = (r.div_ceil(128), kb.next_multiple_of(4));
    let mut st = vec![0f32; r * kb];
    let mut sp = vec![0f32; nb * ld];
    // SAFETY: the inputs are the grids' r x kb and nb x kb scales; the outputs hold as many and
    // nb x ld.
    unsafe {
        kernel::<unsafe extern "C" fn(*const f32, *mut f32, i32, i32)>("emu_transpose_f32")(
            x.scales().as_ptr(),
            st.as_mut_ptr(),
            r as i32,
            kb as i32,
        );
        kernel::<unsafe extern "C" fn(*const f32, *mut f32, i32, i32, i32)>("emu_pad_rows_f32")(
            w.scales().as_ptr(),
            sp.as_mut_ptr(),
            nb as i32,
            kb as i32,
            ld as i32,
        );
    }
    for row in 0..r {
        for b in 0..kb {
            assert_eq!(st[b * r + row], x.scales()[row * kb + b]);
        }
    }
    for row in 0..nb {
        assert_eq!(
            &sp[row * ld..row * ld + kb],
            &w.scales()[row * kb..(row + 1) * kb]
        );
        assert!(sp[row * ld + kb..(row + 1) * ld].iter().all(|&v| v == 0.0));
    }
}

type GemmFn = unsafe extern "C" fn(
    *const u8,
    *const f32,
    *const u8,
    *const f32,
    *mut f32,
    *const i32,
    *const i32,
    *const i32,
    i32,
    i32,
    i32,
    i32,
);

/// Runs the grouped GEMM kernel `name` over `segments` of A's rows (one weight each, block or tile
/// scales) and holds every segment to the exact CPU GEMM.
#[allow(clippy::unwrap_used)]
fn check_grouped_gemm(name: &str, seed: u64, segments: &[usize], n: usize, k: usize, blocks: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let m: usize = segments.iter().sum();
    let a = Fp8Matrix::quantize_tiles(&randn(&mut rng, m * k, 1.0), m, k, QuantConfig::default())
        .unwrap();
    let ws: Vec<Fp8Matrix> = segments
        .iter()
        .map(|_| {
            let x = randn(&mut rng, n * k, 0.3);
            if blocks {
                Fp8Matrix::quantize_blocks(&x, n, k, QuantConfig::default()).unwrap()
            } else {
                Fp8Matrix::quantize_tiles(&x, n, k, QuantConfig::default()).unwrap()
            }
        })
        .collect();
    let codes: Vec<u8> = ws.iter().flat_map(|w| w.codes().to_vec()).collect();
    let scales: Vec<f32> = ws.iter().flat_map(|w| w.scales().to_vec()).collect();
    let (mut seg_end, mut tg, mut tr) = (vec![], vec![], vec![]);
    let mut start = 0;
    for (g, &len) in segments.iter().enumerate() {
        seg_end.push((start + len) as i32);
        for r0 in (start..start + len).step_by(128) {
            tg.push(g as i32);
            tr.push(r0 as i32);
        }
        start += len;
    }
    let mut c = vec![0f32; m * n];
    // SAFETY: A is m x k with m x kb scales; B is groups x n x k with its scales; C is m x n.
    unsafe {
        kernel::<GemmFn>(name)(
            a.codes().as_ptr(),
            a.scales().as_ptr(),
            codes.as_ptr(),
            scales.as_ptr(),
            c.as_mut_ptr(),
            seg_end.as_ptr(),
            tg.as_ptr(),
            tr.as_ptr(),
            tg.len() as i32,
            n as i32,
            k as i32,
            if blocks { 128 } else { 1 },
        );
    }
    let mut row = 0;
    for (s, &len) in segments.iter().enumerate() {
        if len == 0 {
            continue;
        }
        let kb = k.div_ceil(128);
        let part = Fp8Matrix::from_parts(
            len,
            k,
            Fp8Format::E4M3,
            a.granularity(),
            a.codes()[row * k..(row + len) * k].to_vec(),
            a.scales()[row * kb..(row + len) * kb].to_vec(),
        )
        .unwrap();
        let want = fp8_gemm(&part, &ws[s], Accumulation::Fp32).unwrap();
        // Both sum each 128-deep block in FP32, in different orders.
        let err = gemm_error(&c[row * n..(row + len) * n], want.data(), &part, &ws[s]);
        assert!(err < 1e-6, "{name}, segment {s}: error {err:e} of |A||B|");
        row += len;
    }
}

#[test]
fn the_grouped_fp8_gemm_tiles_fragments_and_promotion_match_the_exact_cpu_gemm() {
    let _serial = serial();
    check_grouped_gemm("emu_fp8_gemm_grouped", 13, &[37, 0, 93], 136, 272, true);
}

/// The Hopper kernel's shared-memory layout, WGMMA descriptors, accumulator fragments, cp.async
/// pipeline (more K blocks than stages, a partial last block) and promotion, with WGMMA itself
/// computed as the PTX ISA defines it from the descriptors.
#[test]
fn the_wgmma_gemm_layouts_descriptors_pipeline_and_promotion_match_the_exact_cpu_gemm() {
    let _serial = serial();
    check_grouped_gemm("emu_fp8_gemm_wgmma", 15, &[37, 0, 93], 136, 272, true);
    check_grouped_gemm("emu_fp8_gemm_wgmma", 16, &[130, 70], 200, 656, false);
}

#[test]
fn norm_activation_rope_and_cross_entropy_kernels_match_the_cpu() {
    let _serial = serial();
    let mut rng = StdRng::seed_from_u64(14);
    let (rows, d) = (5, 200);
    let x = randn(&mut rng, rows * d, 1.0);
    let w = randn(&mut rng, d, 1.0);
    let dy = randn(&mut rng, rows * d, 1.0);
    let (tx, tw, tdy) = (
        Tensor::new(vec![rows, d], x.clone()).unwrap(),
        Tensor::new(vec![d], w.clone()).unwrap(),
        Tensor::new(vec![rows, d], dy.clone()).unwrap(),
    );
    let (mut y, mut dx) = (vec![0f32; rows * d], vec![0f32; rows * d]);
    let (mut dg, mut du) = (vec![0f32; rows * d], vec![0f32; rows * d]);
    // SAFETY: every buffer is rows x d (w is d).
    unsafe {
        kernel::<unsafe extern "C" fn(*const f32, *const f32, *mut f32, i32, i32, f64)>(
            "emu_rmsnorm_forward",
        )(
            x.as_ptr(),
            w.as_ptr(),
            y.as_mut_ptr(),
            rows as i32,
            d as i32,
            1e-6,
        );
        kernel::<unsafe extern "C" fn(*const f32, *const f32, *const f32, *mut f32, i32, i32, f64)>(
            "emu_rmsnorm_backward_input",
        )(
            x.as_ptr(),
            w.as_ptr(),
            dy.as_ptr(),
            dx.as_mut_ptr(),
            rows as i32,
            d as i32,
            1e-6,
        );
    }
    close(
        &y,
        rmsnorm::rmsnorm_forward(&tx, &tw, 1e-6).unwrap().data(),
        1e-6,
        "rmsnorm",
    );
    close(
        &dx,
        rmsnorm::rmsnorm_backward_input(&tdy, &tx, &tw, 1e-6)
            .unwrap()
            .data(),
        1e-5,
        "rmsnorm dx",
    );

    let up = randn(&mut rng, rows * d, 1.0);
    // SAFETY: gate, up, dy and both outputs are rows x d.
    unsafe {
        kernel::<unsafe extern "C" fn(*const f32, *const f32, *const f32, *mut f32, *mut f32, i64)>(
            "emu_swiglu_backward",
        )(
            x.as_ptr(),
            up.as_ptr(),
            dy.as_ptr(),
            dg.as_mut_ptr(),
            du.as_mut_ptr(),
            (rows * d) as i64,
        );
    }
    let (wg, wu) =
        swiglu::swiglu_backward(&tdy, &tx, &Tensor::new(vec![rows, d], up).unwrap()).unwrap();
    close(&dg, wg.data(), 1e-6, "swiglu dgate");
    close(&du, wu.data(), 1e-6, "swiglu dup");

    let (b, seq, h, hd) = (2, 3, 2, 16);
    let table = rope::RopeTable::new(hd, 8, 10_000.0).unwrap();
    let q = randn(&mut rng, b * seq * h * hd, 1.0);
    let tq = Tensor::new(vec![b, seq, h, hd], q.clone()).unwrap();
    let cos: Vec<f32> = table.cos().iter().map(|&c| c as f32).collect();
    let sin: Vec<f32> = table.sin().iter().map(|&c| c as f32).collect();
    for (layout, il) in [
        (rope::RopeLayout::Interleaved, 1),
        (rope::RopeLayout::HalfSplit, 0),
    ] {
        for (sign, want) in [
            (1.0f32, rope::rope_forward(&tq, &table, layout, 2).unwrap()),
            (-1.0, rope::rope_backward(&tq, &table, layout, 2).unwrap()),
        ] {
            let mut out = vec![0f32; q.len()];
            // SAFETY: x and y are [b*seq, h, hd]; the tables are [8, hd/2].
            unsafe {
                kernel::<
                    unsafe extern "C" fn(
                        *const f32,
                        *mut f32,
                        *const f32,
                        *const f32,
                        i64,
                        i32,
                        i32,
                        i32,
                        i32,
                        f32,
                        i32,
                    ),
                >("emu_rope")(
                    q.as_ptr(),
                    out.as_mut_ptr(),
                    cos.as_ptr(),
                    sin.as_ptr(),
                    (b * seq) as i64,
                    seq as i32,
                    h as i32,
                    hd as i32,
                    2,
                    sign,
                    il,
                );
            }
            close(&out, want.data(), 1e-6, "rope");
        }
    }

    let (n, vocab) = (6, 300);
    let logits = randn(&mut rng, n * vocab, 3.0);
    let targets: Vec<u32> = vec![3, 299, 7, 0, 150, 7];
    let tl = Tensor::new(vec![n, vocab], logits.clone()).unwrap();
    let want = cross_entropy::cross_entropy_forward(&tl, &targets, Some(7)).unwrap();
    let (mut lse, mut loss) = (vec![0f64; n], vec![0f64; n]);
    let mut dl = vec![0f32; n * vocab];
    let mut bad = 0i32;
    // SAFETY: logits are n x vocab, targets/lse/loss n.
    unsafe {
        kernel::<
            unsafe extern "C" fn(
                *const f32,
                *const u32,
                *mut f64,
                *mut f64,
                i32,
                i32,
                i64,
                *mut i32,
            ),
        >("emu_cross_entropy_forward")(
            logits.as_ptr(),
            targets.as_ptr(),
            lse.as_mut_ptr(),
            loss.as_mut_ptr(),
            n as i32,
            vocab as i32,
            7,
            &mut bad,
        );
        kernel::<
            unsafe extern "C" fn(*const f32, *const u32, *const f64, *mut f32, i32, i32, i64, f32),
        >("emu_cross_entropy_backward")(
            logits.as_ptr(),
            targets.as_ptr(),
            lse.as_ptr(),
            dl.as_mut_ptr(),
            n as i32,
            vocab as i32,
            7,
            1.0 / want.count as f32,
        );
    }
    assert_eq!(bad, 0);
    let mean = loss.iter().sum::<f64>() / want.count as f64;
    assert!(
        (mean - want.loss).abs() < 1e-12 * want.loss.abs().max(1.0),
        "kernel {mean} cpu {}",
        want.loss
    );
    close(
        &dl,
        cross_entropy::cross_entropy_backward(&tl, &targets, &want, 1.0)
            .unwrap()
            .data(),
        1e-6,
        "cross-entropy gradient",
    );

    // A counted target past the vocabulary is flagged, not read.
    let bad_targets: Vec<u32> = vec![3, 300, 7, 0, 150, 7];
    // SAFETY: as above.
    unsafe {
        kernel::<
            unsafe extern "C" fn(
                *const f32,
                *const u32,
                *mut f64,
                *mut f64,
                i32,
                i32,
                i64,
                *mut i32,
            ),
        >("emu_cross_entropy_forward")(
            logits.as_ptr(),
            bad_targets.as_ptr(),
            lse.as_mut_ptr(),
            loss.as_mut_ptr(),
            n as i32,
            vocab as i32,
            7,
            &mut bad,
        );
    }
    assert_eq!(bad, 1);
}

#[test]
fn the_adamw_kernels_equal_the_cpu_step_bit_for_bit() {
    let _serial = serial();
    let mut rng = StdRng::seed_from_u64(15);
    let n = 1001;
    for bf16_moments in [true, false] {
        let cfg = AdamWConfig {
            bf16_moments,
            ..AdamWConfig::default()
        };
        let mut p = randn(&mut rng, n, 1.0);
        let mut kp = p.clone();
        let mut state = AdamWState::new(n, &cfg);
        let (mut m16, mut v16) = (vec![0u16; n], vec![0u16; n]);
        let (mut m32, mut v32) = (vec![0f32; n], vec![0f32; n]);
        for t in 1..=4u64 {
            let g = randn(&mut rng, n, 0.1);
            adamw_step(&mut p, &g, &mut state, &cfg, 3e-4).unwrap();
            let k = AdamCoeffs::new(&cfg, 3e-4, t, 1.0);
            // SAFETY: every buffer has n elements; `k` is the repr(C) struct the kernel takes.
            unsafe {
                if bf16_moments {
                    kernel::<
                        unsafe extern "C" fn(
                            *mut f32,
                            *const f32,
                            *mut u16,
                            *mut u16,
                            i64,
                            *const AdamCoeffs,
                        ),
                    >("emu_adamw_bf16")(
                        kp.as_mut_ptr(),
                        g.as_ptr(),
                        m16.as_mut_ptr(),
                        v16.as_mut_ptr(),
                        n as i64,
                        &k,
                    );
                } else {
                    kernel::<
                        unsafe extern "C" fn(
                            *mut f32,
                            *const f32,
                            *mut f32,
                            *mut f32,
                            i64,
                            *const AdamCoeffs,
                        ),
                    >("emu_adamw_f32")(
                        kp.as_mut_ptr(),
                        g.as_ptr(),
                        m32.as_mut_ptr(),
                        v32.as_mut_ptr(),
                        n as i64,
                        &k,
                    );
                }
            }
        }
        assert_eq!(kp, p, "params, bf16_moments={bf16_moments}");
        match &state.moments {
            Moments::Bf16 { m, v } => {
                assert_eq!(
                    m16.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>(),
                    *m
                );
                assert_eq!(
                    v16.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>(),
                    *v
                );
            }
            Moments::F32 { m, v } => assert_eq!((&m32, &v32), (m, v)),
        }
    }
}

/// Runs the two-hop kernel on host memory; returns what each rank received.
/// How the emulated two-hop transfer is launched.
#[derive(Clone, Copy, Debug)]
enum Launches {
    /// One launch for every rank (ranks on one GPU).
    One,
    /// Ranks `0..n` and `n..` as two launches at once (as on two GPUs of a process).
    Split(usize),
    /// One launch per rank, each with a table holding only the others' rings (ranks in separate
    /// processes, their rings mapped through CUDA IPC).
    PerRank,
}

#[allow(clippy::too_many_arguments)]
fn two_hop(
    routing: &Routing,
    pos: &[Vec<i32>],
    received: &[usize],
    inputs: &[Rows],
    (len0, len1): (usize, usize),
    combine: bool,
    cfg: TransferConfig,
    launches: Launches,
) -> (Vec<Rows>, Vec<Vec<i32>>, i32) {
    let geo = Geometry::new(routing.ranks, (len0, len1), &cfg);
    let mut outs: Vec<Rows> = received
        .iter()
        .map(|&n| Rows {
            part0: vec![0; n * len0],
            part1: vec![0; n * len1],
        })
        .collect();
    let mut metas: Vec<Vec<i32>> = received.iter().map(|&n| vec![0; n * 3]).collect();
    // u64 storage keeps the rings 8-byte aligned for the atomic head/tail words.
    let mut rings: Vec<Vec<u64>> = (0..routing.ranks)
        .map(|_| vec![0u64; geo.rings_per_rank / 8 + 1])
        .collect();
    let descs: Vec<TwoHopRank> = (0..routing.ranks)
        .map(|s| TwoHopRank {
            in0: inputs[s].part0.as_ptr() as u64,
            in1: inputs[s].part1.as_ptr() as u64,
            dest: routing.dest[s].as_ptr() as u64,
            pos: pos[s].as_ptr() as u64,
            rows: (routing.dest[s].len() / routing.maxd) as i32,
            pad: 0,
            out0: outs[s].part0.as_mut_ptr() as u64,
            out1: outs[s].part1.as_mut_ptr() as u64,
            out_meta: metas[s].as_mut_ptr() as u64,
            rings: rings[s].as_mut_ptr() as u64,
        })
        .collect();
    let mut error = 0i32;
    type TwoHopFn = unsafe extern "C" fn(
        *const TwoHopRank,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i64,
        i32,
        i64,
        *mut i32,
        i32,
        i32,
    );
    let args = (
        routing.ranks as i32,
        routing.local as i32,
        len0 as i32,
        len1 as i32,
        routing.maxd as i32,
        cfg.slots as i32,
        geo.slot_bytes as i32,
        geo.ring_bytes as i64,
        i32::from(combine),
        60_000_000_000i64,
    );
    // Rank r's view for per-rank launches: its own entry, and only the rings of the others.
    let tables: Vec<TwoHopRank> = (0..routing.ranks)
        .flat_map(|r| {
            descs.iter().enumerate().map(move |(s, d)| {
                if s == r {
                    *d
                } else {
                    TwoHopRank {
                        rings: d.rings,
                        ..Default::default()
                    }
                }
            })
        })
        .collect();
    // SAFETY: every address in `descs` (and `tables`) points into a live buffer of the size the
    // kernel indexes (inputs rows x len, outputs received x len, rings `rings_per_rank` bytes),
    // all outliving the call, which joins every emulated thread before returning.
    unsafe {
        match launches {
            Launches::PerRank => kernel::<TwoHopFn>("emu_two_hop_private")(
                tables.as_ptr(),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                args.5,
                args.6,
                args.7,
                args.8,
                args.9,
                &mut error,
                cfg.sms as i32,
                cfg.receivers as i32,
            ),
            Launches::One | Launches::Split(_) => {
                let split = match launches {
                    Launches::Split(n) => n as i32,
                    _ => 0,
                };
                kernel::<
                    unsafe extern "C" fn(
                        *const TwoHopRank,
                        i32,
                        i32,
                        i32,
                        i32,
                        i32,
                        i32,
                        i32,
                        i64,
                        i32,
                        i64,
                        *mut i32,
                        i32,
                        i32,
                        i32,
                    ),
                >("emu_two_hop")(
                    descs.as_ptr(),
                    args.0,
                    args.1,
                    args.2,
                    args.3,
                    args.4,
                    args.5,
                    args.6,
                    args.7,
                    args.8,
                    args.9,
                    &mut error,
                    cfg.sms as i32,
                    cfg.receivers as i32,
                    split,
                )
            }
        }
    }
    drop(rings);
    (outs, metas, error)
}

#[test]
fn the_warp_specialized_two_hop_dispatch_and_combine_equal_the_cpu_transport() {
    let _serial = serial();
    let mut rng = StdRng::seed_from_u64(16);
    // 8 ranks as 2 nodes of 4: both hops, fan-out at the proxies, self-sends, empty rows.
    let (ranks, local, rows, maxd, hidden) = (8usize, 4usize, 24usize, 3usize, 256usize);
    let r = random_routing(&mut rng, ranks, local, rows, maxd, 0.3);
    let layout = r.layout().unwrap();
    let (len0, len1) = (hidden, hidden / 128 * 4);
    let inputs = random_rows(&mut rng, ranks, rows, (len0, len1));
    let want = cpu_transfer(&r, &layout, &inputs, len0, len1).unwrap();
    // Either route (dispatch: inter-node hop first; combine: intra-node hop first) delivers the
    // same rows to the same places; so do two launches sharing the ranks (as on two GPUs: ranks
    // 0..3 and 3..8, the second with a rank base of 3, split across a node boundary), and one
    // launch per rank that sees only the others' rings (as processes sharing them over IPC).
    for (combine, cfg, launches) in [
        (
            false,
            TransferConfig {
                sms: 2,
                slots: 2,
                receivers: 1,
                ..Default::default()
            },
            Launches::One,
        ),
        (
            false,
            TransferConfig {
                sms: 3,
                slots: 4,
                receivers: 2,
                ..Default::default()
            },
            Launches::Split(3),
        ),
        (
            true,
            TransferConfig {
                sms: 2,
                slots: 3,
                receivers: 2,
                ..Default::default()
            },
            Launches::Split(5),
        ),
        (
            false,
            TransferConfig {
                sms: 2,
                slots: 2,
                receivers: 1,
                ..Default::default()
            },
            Launches::PerRank,
        ),
    ] {
        let (got, meta, error) = two_hop(
            &r,
            &layout.pos,
            &layout.received,
            &inputs,
            (len0, len1),
            combine,
            cfg,
            launches,
        );
        assert_eq!(error, 0, "timed out with {cfg:?}, {launches:?}");
        for d in 0..ranks {
            assert_eq!(
                got[d], want[d].rows,
                "dispatch rows at rank {d} with {cfg:?}"
            );
            let m: Vec<[i32; 3]> = meta[d].chunks(3).map(|c| [c[0], c[1], c[2]]).collect();
            assert_eq!(m, want[d].meta, "dispatch provenance at rank {d}");
        }
    }

    // Nodes without shared memory: rows cross nodes once (phase 1, copies standing in for NCCL
    // point-to-point), then each node's kernel launch moves them inside the node (phase 2).
    let phased = shoal_kernels::inter_node::transfer_in_phases(
        &r,
        &layout,
        &inputs,
        (len0, len1),
        |phase, ins| {
            let cfg = TransferConfig {
                sms: 2,
                slots: 2,
                receivers: 1,
                ..Default::default()
            };
            let (rows, metas, error) = two_hop(
                &phase.routing,
                &phase.layout.pos,
                &phase.layout.received,
                ins,
                (len0, len1),
                false,
                cfg,
                Launches::One,
            );
            assert_eq!(error, 0, "a node's phase 2 timed out");
            Ok(rows
                .into_iter()
                .zip(metas)
                .map(|(rows, m)| shoal_kernels::two_hop::Received {
                    rows,
                    meta: m.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
                })
                .collect())
        },
    )
    .unwrap();
    for d in 0..ranks {
        assert_eq!(phased[d].rows, want[d].rows, "two-phase rows at rank {d}");
        assert_eq!(
            phased[d].meta, want[d].meta,
            "two-phase provenance at rank {d}"
        );
    }

    // Combine: each received row goes back to its source's staging slot (row * maxd + entry),
    // then the source sums its entries in order.
    let (back, back_layout) = combine_routing(&r, &want);
    let vals = random_bf16_rows(&mut rng, &want, hidden);
    let staged_want = cpu_transfer(&back, &back_layout, &vals, hidden * 2, 0).unwrap();
    let (staged, _, error) = two_hop(
        &back,
        &back_layout.pos,
        &back_layout.received,
        &vals,
        (hidden * 2, 0),
        true,
        TransferConfig {
            sms: 2,
            slots: 3,
            receivers: 2,
            ..Default::default()
        },
        Launches::PerRank,
    );
    assert_eq!(error, 0, "combine timed out");
    for s in 0..ranks {
        assert_eq!(
            staged[s], staged_want[s].rows,
            "combine staging at rank {s}"
        );
        let v: Vec<u16> = bf16_bits(&staged[s].part0);
        let mut out = vec![0f32; rows * hidden];
        // SAFETY: staged is rows x maxd x hidden, dest rows x maxd, out rows x hidden.
        unsafe {
            kernel::<unsafe extern "C" fn(*const u16, *const i32, *mut f32, i32, i32, i32)>(
                "emu_combine_reduce",
            )(
                v.as_ptr(),
                r.dest[s].as_ptr(),
                out.as_mut_ptr(),
                rows as i32,
                maxd as i32,
                hidden as i32,
            );
        }
        assert_eq!(
            out,
            cpu_combine_reduce(&v, &r.dest[s], rows, maxd, hidden),
            "combine sums at rank {s}"
        );
    }
}

#[test]
fn a_row_sent_to_more_ranks_behind_one_proxy_than_a_slot_holds_reaches_all_of_them() {
    let _serial = serial();
    // Ten single-GPU nodes: in the combine route every destination sits behind the same proxy
    // (the sender itself), so the row's ten entries need two slots of eight.
    let (ranks, local, maxd, len0) = (10usize, 1usize, 10usize, 64usize);
    let mut dest = vec![vec![-1i32; maxd]; ranks];
    dest[3] = (0..ranks as i32).collect();
    let r = Routing {
        ranks,
        local,
        maxd,
        dest,
    };
    let layout = r.layout().unwrap();
    let inputs: Vec<Rows> = (0..ranks)
        .map(|s| Rows {
            part0: vec![s as u8 + 1; len0],
            part1: vec![],
        })
        .collect();
    let want = cpu_transfer(&r, &layout, &inputs, len0, 0).unwrap();
    for combine in [false, true] {
        let (got, _, error) = two_hop(
            &r,
            &layout.pos,
            &layout.received,
            &inputs,
            (len0, 0),
            combine,
            TransferConfig {
                sms: 1,
                slots: 2,
                receivers: 1,
                ..Default::default()
            },
            Launches::One,
        );
        assert_eq!(error, 0);
        for d in 0..ranks {
            assert_eq!(got[d], want[d].rows, "rank {d}, combine={combine}");
            assert_eq!(got[d].part0, vec![4u8; len0], "rank {d} got rank 3's row");
        }
    }
}

/// model.cu's attention forward and backward against the CPU on random `[b, s, h, d]` inputs.
#[allow(clippy::unwrap_used)]
fn attention_matches_the_cpu(
    rng: &mut StdRng,
    (b, s, h, dk, dv): (usize, usize, usize, usize, usize),
) {
    use shoal_kernels::ops::attention;
    let what = format!("b {b} s {s} h {h} dk {dk} dv {dv}");
    let scale = 0.2f32;
    // Logits of the same spread at every dk: 0.5 at dk 48.
    let qk = 0.5 * (48.0 / dk as f32).sqrt();
    let q = randn(rng, b * s * h * dk, qk);
    let k = randn(rng, b * s * h * dk, qk);
    let v = randn(rng, b * s * h * dv, 1.0);
    let dout = randn(rng, b * s * h * dv, 1.0);
    let t = |d: &[f32], w| Tensor::new([b, s, h, w], d.to_vec()).unwrap();
    let (want_out, saved) =
        attention::attention_forward(&t(&q, dk), &t(&k, dk), &t(&v, dv), f64::from(scale)).unwrap();
    let (want_dq, want_dk, want_dv) = attention::attention_backward(
        &t(&dout, dv),
        &t(&q, dk),
        &t(&k, dk),
        &t(&v, dv),
        &want_out,
        &saved,
        f64::from(scale),
    )
    .unwrap();
    let mut out = vec![0f32; b * s * h * dv];
    let mut lse = vec![0f32; b * h * s];
    let (mut delta, mut dq, mut dkk, mut dvv) = (
        vec![0f32; b * h * s],
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    let dims = (b as i32, s as i32, h as i32, dk as i32, dv as i32);
    // SAFETY: every buffer has the length of its [b, s, h, d] or [b, h, s] shape.
    unsafe {
        kernel::<
            unsafe extern "C" fn(
                *const f32,
                *const f32,
                *const f32,
                *mut f32,
                *mut f32,
                i32,
                i32,
                i32,
                i32,
                i32,
                f32,
            ),
        >("emu_attention_forward")(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            out.as_mut_ptr(),
            lse.as_mut_ptr(),
            dims.0,
            dims.1,
            dims.2,
            dims.3,
            dims.4,
            scale,
        );
        kernel::<
            unsafe extern "C" fn(
                *const f32,
                *const f32,
                *const f32,
                *const f32,
                *const f32,
                *const f32,
                *mut f32,
                *mut f32,
                *mut f32,
                *mut f32,
                i32,
                i32,
                i32,
                i32,
                i32,
                f32,
            ),
        >("emu_attention_backward")(
            dout.as_ptr(),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            out.as_ptr(),
            lse.as_ptr(),
            delta.as_mut_ptr(),
            dq.as_mut_ptr(),
            dkk.as_mut_ptr(),
            dvv.as_mut_ptr(),
            dims.0,
            dims.1,
            dims.2,
            dims.3,
            dims.4,
            scale,
        );
    }
    close(
        &out,
        want_out.data(),
        1e-5,
        &format!("attention.out {what}"),
    );
    close(
        &lse,
        saved.lse.data(),
        1e-5,
        &format!("attention.lse {what}"),
    );
    close(&dq, want_dq.data(), 1e-4, &format!("attention.dq {what}"));
    close(&dkk, want_dk.data(), 1e-4, &format!("attention.dk {what}"));
    close(&dvv, want_dv.data(), 1e-4, &format!("attention.dv {what}"));
}

/// The model-step kernels of model.cu: attention forward and backward, the RMSNorm weight
/// gradient, embedding rows and their deterministic table gradient, column and row copies, row
/// dot products, y += x and the sum of squares, each against the CPU.
#[test]
fn the_model_step_kernels_match_the_cpu() {
    use shoal_kernels::ops::embedding;
    let _serial = serial();
    let mut rng = StdRng::seed_from_u64(17);

    // Attention: 2 sequences of 19 tokens (a partial block of 8 query rows, a partial tile of 16
    // keys), 3 heads, dk 48 (two partial warps of lanes), dv 40; then DeepSeek-V3's head
    // dimensions (dk 192, dv 128, the kernels' largest dv) over 3 key tiles.
    attention_matches_the_cpu(&mut rng, (2, 19, 3, 48, 40));
    attention_matches_the_cpu(&mut rng, (1, 37, 2, 192, 128));

    // RMSNorm weight gradient, accumulated into an existing gradient.
    let (rows, d) = (37usize, 70usize);
    let x = randn(&mut rng, rows * d, 1.0);
    let dy = randn(&mut rng, rows * d, 1.0);
    let before = randn(&mut rng, d, 1.0);
    let mut dw = before.clone();
    let mut rstd = vec![0f32; rows];
    // SAFETY: x, dy are rows x d; rstd has rows entries, dw d.
    unsafe {
        kernel::<unsafe extern "C" fn(*const f32, *const f32, *mut f32, *mut f32, i32, i32, f64)>(
            "emu_rmsnorm_backward_weight",
        )(
            x.as_ptr(),
            dy.as_ptr(),
            rstd.as_mut_ptr(),
            dw.as_mut_ptr(),
            rows as i32,
            d as i32,
            1e-6,
        );
    }
    let want = rmsnorm::rmsnorm_backward_weight(
        &Tensor::new([rows, d], dy.clone()).unwrap(),
        &Tensor::new([rows, d], x.clone()).unwrap(),
        1e-6,
    )
    .unwrap();
    let want: Vec<f32> = before.iter().zip(want.data()).map(|(a, b)| a + b).collect();
    close(&dw, &want, 1e-5, "rmsnorm.dweight");

    // Embedding rows and the table gradient from the host's per-id row lists.
    let (vocab, n) = (11usize, 29usize);
    let table = randn(&mut rng, vocab * d, 1.0);
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut rows_out = vec![0f32; n * d];
    let dy = randn(&mut rng, n * d, 1.0);
    let mut uniq: Vec<u32> = ids.clone();
    uniq.sort_unstable();
    uniq.dedup();
    let mut off = vec![0u32];
    let mut order = Vec::new();
    for &u in &uniq {
        order.extend((0..n as u32).filter(|&i| ids[i as usize] == u));
        off.push(order.len() as u32);
    }
    let mut dtable = vec![0f32; vocab * d];
    // SAFETY: the table is vocab x d, ids and rows n long, dy n x d, the CSR lists as built.
    unsafe {
        kernel::<unsafe extern "C" fn(*const f32, *const u32, *mut f32, i64, i32)>(
            "emu_embedding_gather",
        )(
            table.as_ptr(),
            ids.as_ptr(),
            rows_out.as_mut_ptr(),
            n as i64,
            d as i32,
        );
        kernel::<
            unsafe extern "C" fn(
                *const f32,
                *const u32,
                *const u32,
                *const u32,
                *mut f32,
                i32,
                i32,
            ),
        >("emu_embedding_scatter")(
            dy.as_ptr(),
            uniq.as_ptr(),
            off.as_ptr(),
            order.as_ptr(),
            dtable.as_mut_ptr(),
            uniq.len() as i32,
            d as i32,
        );
    }
    let tt = Tensor::new([vocab, d], table.clone()).unwrap();
    assert_eq!(
        rows_out,
        embedding::embedding_forward(&tt, &ids)
            .unwrap()
            .data()
            .to_vec()
    );
    let want =
        embedding::embedding_backward(&Tensor::new([n, d], dy.clone()).unwrap(), &ids, vocab)
            .unwrap();
    assert_eq!(
        dtable,
        want.data().to_vec(),
        "embedding.dtable, rows summed in order"
    );

    // Column blocks: heads 0..3 of width 5 taken from offset 2 of groups of 9, accumulated into
    // groups of 7 at offset 1.
    let (r, g, w) = (6usize, 3usize, 5usize);
    let src = randn(&mut rng, r * g * 9, 1.0);
    let mut dst = randn(&mut rng, r * g * 7, 1.0);
    let mut want = dst.clone();
    for ri in 0..r {
        for gi in 0..g {
            for c in 0..w {
                want[ri * g * 7 + 1 + gi * 7 + c] += src[ri * g * 9 + 2 + gi * 9 + c];
            }
        }
    }
    // SAFETY: src is r x 27 and dst r x 21; the copy stays inside both rows.
    unsafe {
        kernel::<
            unsafe extern "C" fn(
                *const f32,
                *mut f32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
            ),
        >("emu_copy_cols")(
            src.as_ptr(),
            dst.as_mut_ptr(),
            r as i32,
            g as i32,
            w as i32,
            (g * 9) as i32,
            2,
            9,
            (g * 7) as i32,
            1,
            7,
            1,
        );
    }
    assert_eq!(dst, want);

    // Rows: a scaled gather, a scaled scatter-add to distinct rows, dot products, y += x.
    let width = 45usize;
    let src = randn(&mut rng, 10 * width, 1.0);
    let idx: Vec<u32> = vec![7, 2, 9, 0];
    let sc: Vec<f32> = vec![0.5, -2.0, 1.5, 3.0];
    let mut gathered = vec![0f32; idx.len() * width];
    let mut scattered = randn(&mut rng, 10 * width, 1.0);
    let mut want_sc = scattered.clone();
    let mut dots = vec![0f32; idx.len()];
    let mut y = randn(&mut rng, 300, 1.0);
    let xs = randn(&mut rng, 300, 1.0);
    let want_y: Vec<f32> = y.iter().zip(&xs).map(|(a, b)| a + b).collect();
    let mut partial = vec![0f64; 3];
    // SAFETY: src has 10 rows of `width`, every index is below 10, the outputs are sized here.
    unsafe {
        type Rows = unsafe extern "C" fn(*const f32, *const u32, *const f32, *mut f32, i64, i32);
        kernel::<Rows>("emu_gather_rows")(
            src.as_ptr(),
            idx.as_ptr(),
            sc.as_ptr(),
            gathered.as_mut_ptr(),
            idx.len() as i64,
            width as i32,
        );
        kernel::<Rows>("emu_scatter_add_rows")(
            gathered.as_ptr(),
            idx.as_ptr(),
            std::ptr::null(),
            scattered.as_mut_ptr(),
            idx.len() as i64,
            width as i32,
        );
        kernel::<unsafe extern "C" fn(*const f32, *const u32, *const f32, *mut f32, i32, i32)>(
            "emu_row_dots",
        )(
            src.as_ptr(),
            idx.as_ptr(),
            gathered.as_ptr(),
            dots.as_mut_ptr(),
            idx.len() as i32,
            width as i32,
        );
        kernel::<unsafe extern "C" fn(*mut f32, *const f32, i64)>("emu_add_into")(
            y.as_mut_ptr(),
            xs.as_ptr(),
            300,
        );
        kernel::<unsafe extern "C" fn(*const f32, *mut f64, i64, u32)>("emu_sum_sq_partial")(
            xs.as_ptr(),
            partial.as_mut_ptr(),
            300,
            3,
        );
    }
    for (i, (&row, &s)) in idx.iter().zip(&sc).enumerate() {
        let from = &src[row as usize * width..(row as usize + 1) * width];
        let want_row: Vec<f32> = from.iter().map(|v| v * s).collect();
        assert_eq!(&gathered[i * width..(i + 1) * width], &want_row[..]);
        for (o, v) in want_sc[row as usize * width..(row as usize + 1) * width]
            .iter_mut()
            .zip(&want_row)
        {
            *o += v;
        }
        let dot: f64 = from
            .iter()
            .zip(&want_row)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        assert!(
            (f64::from(dots[i]) - dot).abs() <= 1e-5 * (1.0 + dot.abs()),
            "row_dots[{i}]"
        );
    }
    assert_eq!(scattered, want_sc);
    assert_eq!(y, want_y);
    let want: f64 = xs.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    let got: f64 = partial.iter().sum();
    assert!((got - want).abs() <= 1e-12 * want, "sum_sq {got} vs {want}");
}

/// The mixed-precision linears' BF16 conversions round as the CPU does (to nearest, ties to
/// even; NaN kept a NaN), on every float class: bit-exact.
#[test]
fn the_bf16_conversions_equal_the_cpu_rounding() {
    let _serial = serial();
    let mut rng = StdRng::seed_from_u64(23);
    let mut x = randn(&mut rng, 1000, 3.0);
    // Ties (both parities), subnormals, the largest finite values, infinities, NaN, zeros.
    x.extend([
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x0000_8001),
        f32::MIN_POSITIVE / 3.0,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.0,
        -0.0,
    ]);
    let n = x.len();
    let mut codes = vec![0u16; n];
    let mut rounded = x.clone();
    // SAFETY: codes and rounded hold n elements, as x.
    unsafe {
        kernel::<unsafe extern "C" fn(*const f32, *mut u16, i64)>("emu_to_bf16")(
            x.as_ptr(),
            codes.as_mut_ptr(),
            n as i64,
        );
        kernel::<unsafe extern "C" fn(*mut f32, i64)>("emu_round_bf16")(
            rounded.as_mut_ptr(),
            n as i64,
        );
    }
    let mut want = x.clone();
    shoal_kernels::matmul::round_bf16(&mut want);
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(
            codes[i],
            half::bf16::from_f32(v).to_bits(),
            "to_bf16({v:e})"
        );
        assert_eq!(rounded[i].to_bits(), want[i].to_bits(), "round_bf16({v:e})");
    }
}
