use shoal_kernels::ops::linear::Precision;
use shoal_spec::ModelConfig;
use shoal_worker::model::{Model, Objective, TokenBatch};
use std::time::Instant;
fn main() {
    let cfg = ModelConfig::tiny();
    for prec in [Precision::Fp32] {
        let model = Model::<f32>::new(&cfg, prec, 1).unwrap();
        let (batch, seq) = (8, 256);
        let inputs: Vec<u32> = (0..batch * seq)
            .map(|i| ((i * 7919) % 4096) as u32)
            .collect();
        let targets: Vec<u32> = (0..batch * seq)
            .map(|i| ((i * 104729 + 1) % 4096) as u32)
            .collect();
        let b = TokenBatch {
            batch,
            seq,
            inputs: &inputs,
            targets: &targets,
        };
        let mut grads = model.params().zero_grads();
        for i in 0..3 {
            let t = Instant::now();
            let out = model
                .forward_backward(&b, &Objective::default(), &mut grads)
                .unwrap();
            let dt = t.elapsed().as_secs_f64();
            println!(
                "{prec:?} step {i}: {dt:.3}s  {:.0} tok/s loss {:.4}",
                (batch * seq) as f64 / dt,
                out.loss
            );
        }
    }
}
