//! Times single operators at the shapes of the `tiny` preset's training step (batch 8 x 256).
//!
//! `cargo run --release -p shoal-kernels --example op_costs`

use std::time::Instant;

use shoal_kernels::Tensor;
use shoal_kernels::ops::attention::{attention_backward, attention_forward};
use shoal_kernels::ops::cross_entropy::{cross_entropy_backward, cross_entropy_forward};
use shoal_kernels::ops::swiglu::{swiglu_backward, swiglu_forward};

fn time<R>(name: &str, reps: usize, mut f: impl FnMut() -> R) {
    let _ = f();
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    println!(
        "{name:<28} {:8.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

fn filled(shape: &[usize], seed: u32) -> Tensor<f32> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::new(shape.to_vec(), data).expect("shape")
}

fn main() -> shoal_kernels::Result<()> {
    let only = std::env::args().nth(1).unwrap_or_default();
    let (tokens, vocab) = (2048, 4096);
    if only == "attention" {
        return attention(50);
    }
    if only == "gemm" {
        return gemms();
    }
    if only == "swiglu" {
        let g = filled(&[tokens, 768], 6);
        let u = filled(&[tokens, 768], 7);
        let d = filled(&[tokens, 768], 8);
        time("swiglu_backward 2048x768", 200, || {
            swiglu_backward(&d, &g, &u)
        });
        return Ok(());
    }
    let logits = filled(&[tokens, vocab], 1).map(|v| v * 4.0);
    let targets: Vec<u32> = (0..tokens as u32)
        .map(|i| (i * 7919) % vocab as u32)
        .collect();
    parts(&logits, vocab);
    exp_variants(&logits, vocab);
    time("cross_entropy_forward", 10, || {
        cross_entropy_forward(&logits, &targets, None)
    });
    let ce = cross_entropy_forward(&logits, &targets, None)?;
    time("cross_entropy_backward", 10, || {
        cross_entropy_backward(&logits, &targets, &ce, 1.0)
    });

    attention(10)?;

    let g = filled(&[tokens, 768], 6);
    let u = filled(&[tokens, 768], 7);
    time("swiglu_forward 2048x768", 10, || swiglu_forward(&g, &u));
    let d = filled(&[tokens, 768], 8);
    time("swiglu_backward 2048x768", 10, || {
        swiglu_backward(&d, &g, &u)
    });
    Ok(())
}

#[allow(dead_code)]
fn parts(logits: &Tensor<f32>, vocab: usize) {
    time("  max fold", 10, || {
        logits
            .data()
            .chunks_exact(vocab)
            .map(|r| r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)))
            .sum::<f32>()
    });
    time("  sum_exp_shifted", 10, || {
        logits
            .data()
            .chunks_exact(vocab)
            .map(|r| shoal_kernels::real::sum_exp_shifted(r, 1.0f32))
            .sum::<f64>()
    });
    time("  all finite", 10, || {
        logits.data().iter().all(|v| v.is_finite())
    });
}

#[allow(dead_code)]
fn exp_variants(logits: &Tensor<f32>, vocab: usize) {
    time("  exp f32 lanes", 10, || {
        logits
            .data()
            .chunks_exact(vocab)
            .map(|r| {
                let mut lanes = [0f32; 16];
                for c in r.chunks_exact(16) {
                    for (x, l) in c.iter().zip(lanes.iter_mut()) {
                        *l += shoal_kernels::real::exp_f32(*x - 1.0);
                    }
                }
                lanes.iter().map(|&v| f64::from(v)).sum::<f64>()
            })
            .sum::<f64>()
    });
    time("  exp write only", 10, || {
        let mut out = vec![0f32; vocab];
        logits
            .data()
            .chunks_exact(vocab)
            .map(|r| {
                for (o, x) in out.iter_mut().zip(r) {
                    *o = shoal_kernels::real::exp_f32(*x - 1.0);
                }
                out[3]
            })
            .sum::<f32>()
    });
}

fn attention(reps: usize) -> shoal_kernels::Result<()> {
    let (b, s, h, dk, dv) = (8, 256, 4, 48, 32);
    let q = filled(&[b, s, h, dk], 2);
    let k = filled(&[b, s, h, dk], 3);
    let v = filled(&[b, s, h, dv], 4);
    let scale = 1.0 / (dk as f64).sqrt();
    time("attention_forward", reps, || {
        attention_forward(&q, &k, &v, scale)
    });
    let (out, lse) = attention_forward(&q, &k, &v, scale)?;
    let dout = filled(&[b, s, h, dv], 5);
    time("attention_backward", reps, || {
        attention_backward(&dout, &q, &k, &v, &out, &lse, scale)
    });

    Ok(())
}

fn gemms() -> shoal_kernels::Result<()> {
    use shoal_kernels::matmul::{MatMut, MatRef, gemm_into};
    for (m, n, k) in [
        (2048, 768, 256),
        (2048, 256, 768),
        (512, 128, 256),
        (256, 128, 256),
        (256, 256, 256),
        (256, 256, 128),
        (1024, 128, 256),
        (2048, 4096, 256),
    ] {
        let a = filled(&[m, k], 1);
        let w = filled(&[n, k], 2);
        let dy = filled(&[m, n], 3);
        let mut c = vec![0f32; m * n];
        let mut dx = vec![0f32; m * k];
        let mut dw = vec![0f32; n * k];
        let flop = 2.0 * (m * n * k) as f64;
        let reps = 20;
        let run = |name: &str, f: &mut dyn FnMut() -> shoal_kernels::Result<()>| {
            f().expect("gemm");
            let t = Instant::now();
            for _ in 0..reps {
                f().expect("gemm");
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{name:<10} m {m:5} n {n:5} k {k:5}  {:7.3} ms  {:6.1} GFLOP/s",
                s * 1e3,
                flop / s / 1e9
            );
        };
        run("fprop", &mut || {
            gemm_into(
                MatMut::row_major(&mut c, m, n)?,
                MatRef::row_major(a.data(), m, k)?,
                MatRef::row_major(w.data(), n, k)?.t(),
                false,
            )
        });
        run("dgrad", &mut || {
            gemm_into(
                MatMut::row_major(&mut dx, m, k)?,
                MatRef::row_major(dy.data(), m, n)?,
                MatRef::row_major(w.data(), n, k)?,
                false,
            )
        });
        run("wgrad", &mut || {
            gemm_into(
                MatMut::row_major(&mut dw, n, k)?,
                MatRef::row_major(dy.data(), m, n)?.t(),
                MatRef::row_major(a.data(), m, k)?,
                true,
            )
        });
        run("wgrad^T", &mut || {
            gemm_into(
                MatMut::strided(&mut dw, 0, k, n, 1, k)?,
                MatRef::row_major(a.data(), m, k)?.t(),
                MatRef::row_major(dy.data(), m, n)?,
                true,
            )
        });
    }
    Ok(())
}
