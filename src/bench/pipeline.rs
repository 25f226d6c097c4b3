//! `shoal bench pipeline`: pipeline-parallel steps on threads against the single-process step,
//! and each schedule's measured bubble against the report's Table 2 formula with the F, B, W and
//! F&B times measured in the same steps.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use shoal_spec::ModelConfig;
use shoal_spec::plan::{Schedule, balanced_layers};
use shoal_spec::schedule::{Costs, Op, Pass, build};
use shoal_worker::model::{Model, Objective, StagePart, TokenBatch};
use shoal_worker::pipeline::{DEFAULT_TIMEOUT, StepReport, run_step};

/// Options of `shoal bench pipeline`.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineBenchArgs {
    /// Steps timed per configuration (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Micro-batches per step (DualPipe needs an even number of at least 2 x pp).
    #[arg(long, default_value_t = 8)]
    pub micro_batches: usize,
    /// Pipeline depths to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub pp: Vec<usize>,
    /// Precision.
    #[arg(long, value_parser = ["fp32", "bf16", "fp8"], default_value = "fp8")]
    pub precision: String,
    /// Print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    schedule: String,
    pp: usize,
    step_s: f64,
    tokens_per_s: f64,
    /// Tokens/s over the single-process step's.
    speed_vs_single: f64,
    /// Step time over 1F1B's at the same pp (below 1: faster).
    step_vs_1f1b: Option<f64>,
    /// Mean times of the operations in the timed steps, in ms.
    f_ms: f64,
    b_ms: f64,
    w_ms: f64,
    fb_ms: Option<f64>,
    /// Largest rank bubble of the median step, in ms: the step's end minus the rank's compute.
    bubble_ms: f64,
    /// Table 2's bubble with the measured times, in ms.
    table2_ms: f64,
    /// The simulator's bubble for this schedule with the measured times, in ms.
    simulated_ms: f64,
    /// Bytes sent between ranks per step.
    bytes_per_step: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    cores: usize,
    precision: String,
    batch: usize,
    seq_len: usize,
    micro_batches: usize,
    single_step_s: f64,
    single_tokens_per_s: f64,
    rows: Vec<Row>,
}

/// Mean duration in ms of the operations `keep` selects over the reports' timelines.
fn mean_ms(reports: &[StepReport], keep: impl Fn(&Op) -> bool) -> Option<f64> {
    let d: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.timeline.iter().flatten())
        .filter(|s| keep(&s.op))
        .map(|s| (s.end - s.start) * 1e3)
        .collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

fn is_one(op: &Op, pass: Pass) -> bool {
    matches!(op, Op::One(c) if c.pass == pass)
}

/// Runs the benchmark and prints the report.
pub fn run(args: &PipelineBenchArgs) -> Result<()> {
    if args.steps == 0 || args.batch == 0 || args.seq_len == 0 {
        bail!("--steps, --batch and --seq-len must be at least 1");
    }
    if args.micro_batches == 0 || args.micro_batches > args.batch {
        bail!(
            "--micro-batches must be 1 to --batch ({}), got {}",
            args.batch,
            args.micro_batches
        );
    }
    let cfg = ModelConfig::tiny();
    let precision = shoal_worker::train::state::parse_precision(&args.precision)?;
    let model = Model::<f32>::new(&cfg, precision, 0)?;
    let obj = Objective::default();
    // A deterministic batch of token ids.
    let n = args.batch * args.seq_len;
    let inputs: Vec<u32> = (0..n)
        .map(|i| ((i * 2_654_435_761usize) >> 7) as u32 % cfg.vocab_size as u32)
        .collect();
    let targets: Vec<u32> = inputs.iter().skip(1).chain(&inputs[..1]).copied().collect();
    let b = TokenBatch {
        batch: args.batch,
        seq: args.seq_len,
        inputs: &inputs,
        targets: &targets,
    };
    let tokens = n as f64;
    let mut grads = model.params().zero_grads();

    eprintln!(
        "bench: single process, {} micro-batches",
        args.micro_batches
    );
    let mut single = Vec::new();
    for i in 0..=args.steps {
        grads.zero();
        let t = Instant::now();
        model.forward_backward_micro(&b, &obj, args.micro_batches, &mut grads)?;
        if i > 0 {
            single.push(t.elapsed().as_secs_f64());
        }
    }
    let single_s = super::median(single);

    let mut rows: Vec<Row> = Vec::new();
    for &pp in &args.pp {
        let mut one_f_one_b = None;
        for schedule in [
            Schedule::OneFOneB,
            Schedule::Zb1p,
            Schedule::DualPipe,
            Schedule::DualPipeV,
        ] {
            // DualPipeV cuts the model into 2 pp stages.
            let n_stages = schedule.stages(pp);
            if n_stages > cfg.num_hidden_layers {
                eprintln!(
                    "bench: {schedule} at pp {pp} skipped: {n_stages} stages for {} layers",
                    cfg.num_hidden_layers
                );
                continue;
            }
            let stages = StagePart::split(
                cfg.num_hidden_layers,
                &balanced_layers(&cfg, n_stages, args.seq_len),
            )
            .with_context(|| format!("--pp {pp}"))?;
            let steps = match build(schedule, pp, args.micro_batches) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bench: {schedule} at pp {pp} skipped: {e}");
                    continue;
                }
            };
            eprintln!("bench: {schedule}, pp {pp}");
            let mut reports = Vec::new();
            for i in 0..=args.steps {
                grads.zero();
                let r = run_step(
                    &model,
                    &stages,
                    &steps,
                    &b,
                    &obj,
                    &mut grads,
                    DEFAULT_TIMEOUT,
                )?;
                if i > 0 {
                    reports.push(r);
                }
            }
            let step_s = super::median(reports.iter().map(|r| r.seconds).collect());
            let f = mean_ms(&reports, |o| is_one(o, Pass::F)).unwrap_or(0.0);
            let bw = mean_ms(&reports, |o| is_one(o, Pass::B)).unwrap_or(0.0);
            let w = mean_ms(&reports, |o| is_one(o, Pass::W)).unwrap_or(0.0);
            let fb = mean_ms(&reports, |o| matches!(o, Op::Overlapped { .. }));
            let costs = Costs {
                f,
                b: bw,
                w,
                fb: fb.unwrap_or(f + bw),
            };
            let median_report = reports
                .iter()
                .min_by(|x, y| {
                    (x.seconds - step_s)
                        .abs()
                        .total_cmp(&(y.seconds - step_s).abs())
                })
                .context("no timed step")?;
            let bubble_ms = median_report.bubble().into_iter().fold(0.0, f64::max) * 1e3;
            let simulated = shoal_spec::schedule::simulate(&steps, &costs)?
                .bubble
                .into_iter()
                .fold(0.0, f64::max);
            if schedule == Schedule::OneFOneB {
                one_f_one_b = Some(step_s);
            }
            rows.push(Row {
                schedule: schedule.to_string(),
                pp,
                step_s,
                tokens_per_s: tokens / step_s,
                speed_vs_single: single_s / step_s,
                step_vs_1f1b: one_f_one_b.map(|o| step_s / o),
                f_ms: f,
                b_ms: bw,
                w_ms: w,
                fb_ms: fb,
                bubble_ms,
                table2_ms: costs.table2_bubble(schedule, pp),
                simulated_ms: simulated,
                bytes_per_step: median_report.bytes_sent.iter().sum(),
            });
        }
    }
    let report = Report {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        precision: args.precision.clone(),
        batch: args.batch,
        seq_len: args.seq_len,
        micro_batches: args.micro_batches,
        single_step_s: single_s,
        single_tokens_per_s: tokens / single_s,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "pipeline parallelism on threads: tiny, {}, {} x {} tokens per step, {} micro-batches, {} cores",
        r.precision, r.batch, r.seq_len, r.micro_batches, r.cores
    );
    println!(
        "  single process: {:.3} s per step, {:.0} tokens/s",
        r.single_step_s, r.single_tokens_per_s
    );
    println!(
        "  {:<9} {:>3} {:>8} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "schedule",
        "pp",
        "step s",
        "tokens/s",
        "x single",
        "x 1f1b",
        "F ms",
        "B ms",
        "W ms",
        "F&B ms",
        "bubble ms",
        "table 2 ms",
        "sim ms",
        "bytes"
    );
    for row in &r.rows {
        println!(
            "  {:<9} {:>3} {:>8.3} {:>9.0} {:>7.2}x {:>8} {:>7.1} {:>7.1} {:>7.1} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>10}",
            row.schedule,
            row.pp,
            row.step_s,
            row.tokens_per_s,
            row.speed_vs_single,
            row.step_vs_1f1b.map_or("-".into(), |v| format!("{v:.2}x")),
            row.f_ms,
            row.b_ms,
            row.w_ms,
            row.fb_ms.map_or("-".into(), |v| format!("{v:.1}")),
            row.bubble_ms,
            row.table2_ms,
            row.simulated_ms,
            row.bytes_per_step
        );
    }
}
