//! `shoal plan`: place a job's ranks, EP groups and expert shards on a cluster, or balance
//! experts from measured loads (EPLB).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use shoal_spec::ModelConfig;
use shoal_spec::plan::{Cluster, Parallelism, Plan, Schedule, plan};
use shoal_spec::schedule::{self, Costs, StepSchedule, Timeline};

/// Options of `shoal plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// Model: a preset (`tiny`, `small`, `deepseek-v3-671b`), a `config.json`, or a directory
    /// holding one.
    #[arg(long, default_value = "deepseek-v3-671b")]
    pub model: String,
    /// Cluster shape, `NODESxDEVICES`.
    #[arg(long, default_value = "256x8")]
    pub cluster: String,
    /// Pipeline ranks.
    #[arg(long, default_value_t = 16)]
    pub pp: usize,
    /// Data-parallel ranks per pipeline rank.
    #[arg(long, default_value_t = 128)]
    pub dp: usize,
    /// Expert-parallel group size (consecutive data-parallel ranks; divides `dp`).
    #[arg(long, default_value_t = 64)]
    pub ep: usize,
    /// Pipeline schedule: 1f1b, zb1p, dualpipe, dualpipev.
    #[arg(long, default_value = "dualpipe")]
    pub schedule: String,
    /// Micro-batches per step (default: 2 x pp).
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub micro_batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 4096)]
    pub seq_len: usize,
    /// Measured expert loads: a JSON list of per-layer lists of loads. With `--replicas`,
    /// `--groups`, `--nodes` and `--gpus` it balances just those (EPLB) and prints
    /// `{"phy2log": [...], "logcnt": [...]}` with `--json`; without them it balances the routed
    /// experts over the plan's EP groups (`expert_placement` in the plan).
    #[arg(long)]
    pub expert_loads: Option<PathBuf>,
    /// Redundant expert slots per device when balancing over the plan's EP groups.
    #[arg(long, default_value_t = 1)]
    pub redundant_experts: usize,
    /// Physical expert slots per layer (with `--expert-loads`).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Expert groups of node-limited routing (with `--expert-loads`).
    #[arg(long)]
    pub groups: Option<usize>,
    /// Nodes (with `--expert-loads`).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// GPUs in all nodes together (with `--expert-loads`).
    #[arg(long)]
    pub gpus: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `shoal plan`.
pub fn run(args: &PlanArgs) -> Result<()> {
    let standalone = args.replicas.is_some()
        || args.groups.is_some()
        || args.nodes.is_some()
        || args.gpus.is_some();
    if let (Some(path), true) = (&args.expert_loads, standalone) {
        return eplb(args, path);
    }
    let model = model_config(&args.model)?;
    let schedule: Schedule = args.schedule.parse().context("--schedule")?;
    let par = Parallelism {
        pp: args.pp,
        dp: args.dp,
        ep: args.ep,
        schedule,
        micro_batches: args.micro_batches.unwrap_or(2 * args.pp),
        micro_batch_size: args.micro_batch_size,
        seq_len: args.seq_len,
    };
    let cluster = Cluster::parse(&args.cluster).context("--cluster")?;
    let start = Instant::now();
    let p = plan(&model, &par, &cluster)?;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    let experts = match &args.expert_loads {
        Some(path) => Some(
            shoal_spec::eplb::expert_placement(
                &model,
                &p,
                &read_loads(path)?,
                args.redundant_experts,
            )
            .context("--expert-loads")?,
        ),
        None => None,
    };
    // The step's operations rank by rank, run on the simulator with the plan's F, B and W FLOPs.
    // The plan itself validated the parallelism; a schedule too large to list only leaves out
    // the operation lists.
    let step = match schedule::build(schedule, par.pp, par.micro_batches) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("shoal plan: no operation lists: {e}");
            None
        }
    };
    let flops = Costs {
        f: p.bubble.f_flops,
        b: p.bubble.b_flops,
        w: p.bubble.w_flops,
        fb: p.bubble.f_flops + p.bubble.b_flops,
    };
    let timeline = match &step {
        Some(s) => Some(schedule::simulate(s, &flops).context("--schedule")?),
        None => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&p)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("model".into(), args.model.clone().into());
            o.insert("cluster".into(), args.cluster.clone().into());
            o.insert("planning_ms".into(), elapsed_ms.into());
            if let Some(e) = &experts {
                o.insert("expert_placement".into(), serde_json::to_value(e)?);
            }
            if let (Some(s), Some(t)) = (&step, &timeline) {
                o.insert("schedule".into(), serde_json::to_value(&s.ranks)?);
                o.insert(
                    "simulated".into(),
                    serde_json::json!({
                        "makespan_flops": t.makespan,
                        "bubble_flops": t.bubble,
                        "table2_bubble_flops": p.bubble.bubble_flops,
                    }),
                );
            }
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        print_plan(&p, args, elapsed_ms);
        if let (Some(s), Some(t)) = (&step, &timeline) {
            let max = t.bubble.iter().copied().fold(0.0, f64::max);
            println!(
                "simulated step: bubble {:.1} TFLOP per rank (Table 2: {:.1}), makespan {:.1} TFLOP of one rank's compute",
                max / 1e12,
                p.bubble.bubble_flops / 1e12,
                t.makespan / 1e12
            );
            draw(s)?;
        }
        if let Some(e) = &experts {
            println!(
                "expert placement: {} slots per layer ({} per device, {} redundant), EP group of {} node(s), {} routing group(s)",
                e.replicas, e.slots_per_device, args.redundant_experts, e.nodes, e.groups
            );
            for (l, (b, a)) in e
                .imbalance_before
                .iter()
                .zip(&e.imbalance_after)
                .enumerate()
            {
                println!("  layer {l}: busiest device / mean load {b:.3} -> {a:.3}");
            }
        }
    }
    Ok(())
}

/// The model a `--model` value names (the coordinator's resolution: a preset, a `config.json`
/// or a directory holding one).
fn model_config(name: &str) -> Result<ModelConfig> {
    shoal_coordinator::jobs::resolve_model(name).map_err(|e| anyhow::anyhow!("--model {name}: {e}"))
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn print_plan(p: &Plan, args: &PlanArgs, elapsed_ms: f64) {
    let par = &p.parallelism;
    println!(
        "{} on {}: pp {} x dp {} = {} devices, ep {}, {} with {} micro-batches of {} x {} tokens",
        args.model,
        args.cluster,
        par.pp,
        par.dp,
        p.world,
        par.ep,
        par.schedule,
        par.micro_batches,
        par.micro_batch_size,
        par.seq_len
    );
    println!(
        "stages: {} (layers {:?}); rank 0 holds stages {:?}",
        p.stages, p.layers_per_stage, p.rank_stages[0]
    );
    let spans: Vec<usize> = p.ep_groups.iter().map(|g| g.nodes.len()).collect();
    let aligned = p.ep_groups.iter().all(|g| g.routing_groups_aligned);
    println!(
        "EP groups: {} of {} ranks, each spanning {}-{} nodes; {} routed experts per rank per \
         layer; routing groups {} nodes; a token reaches at most {} nodes",
        p.ep_groups.len(),
        par.ep,
        spans.iter().min().copied().unwrap_or(0),
        spans.iter().max().copied().unwrap_or(0),
        p.experts_per_ep_rank,
        if aligned {
            "line up with"
        } else {
            "do not line up with"
        },
        p.max_nodes_per_token
    );
    println!(
        "per device: {:.2}B parameters, {:.1} GiB weights+grads+optimizer, {:.1} GiB activations",
        p.device.parameters as f64 / 1e9,
        gib(p.device.parameter_bytes),
        gib(p.device.activation_bytes)
    );
    println!(
        "bubble: {:.1} TFLOP per rank per step ({:.1}% of the step; F {:.2}, B {:.2}, W {:.2} TFLOP per chunk)",
        p.bubble.bubble_flops / 1e12,
        100.0 * p.bubble.bubble_fraction,
        p.bubble.f_flops / 1e12,
        p.bubble.b_flops / 1e12,
        p.bubble.w_flops / 1e12
    );
    println!("planned in {elapsed_ms:.1} ms");
}

/// Draws `s` run with `F = B = W = 1` and `F&B = 2`: one row per rank, one cell per time unit.
fn draw(s: &StepSchedule) -> Result<()> {
    const MAX_UNITS: f64 = 400.0;
    let t: Timeline = schedule::simulate(s, &Costs::UNIT)?;
    if t.makespan > MAX_UNITS {
        println!(
            "(the timeline is {} units long; the drawing is left out above {MAX_UNITS} units, --json has every rank's operations)",
            t.makespan
        );
        return Ok(());
    }
    let width = s
        .ranks
        .iter()
        .flatten()
        .filter(|o| matches!(o, schedule::Op::One(_)))
        .map(|o| o.to_string().len())
        .max()
        .unwrap_or(4)
        + 1;
    println!(
        "timeline with F = B = W = 1 and F&B = 2 ({} units, bubble per rank {}):",
        t.makespan,
        t.bubble.first().copied().unwrap_or(0.0)
    );
    for (r, (ops, spans)) in s.ranks.iter().zip(&t.spans).enumerate() {
        let mut line = format!("rank {r:>3} |");
        let mut at = 0.0;
        for (op, (start, end)) in ops.iter().zip(spans) {
            while at < *start {
                line.push_str(&format!("{:<width$}", "."));
                at += 1.0;
            }
            let cells = (end - start).round() as usize;
            line.push_str(&format!("{:<w$}", op.to_string(), w = cells * width));
            at = *end;
        }
        println!("{}", line.trim_end());
    }
    Ok(())
}

fn read_loads(path: &Path) -> Result<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--expert-loads: cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--expert-loads {}: expected a JSON list of per-layer lists of loads",
            path.display()
        )
    })
}

fn eplb(args: &PlanArgs, path: &Path) -> Result<()> {
    let need = |v: Option<usize>, flag: &str| -> Result<usize> {
        match v {
            Some(v) => Ok(v),
            None => bail!("--expert-loads needs {flag}"),
        }
    };
    let replicas = need(args.replicas, "--replicas")?;
    let groups = need(args.groups, "--groups")?;
    let nodes = need(args.nodes, "--nodes")?;
    let gpus = need(args.gpus, "--gpus")?;
    let loads = read_loads(path)?;
    let r = shoal_spec::eplb::rebalance(&loads, replicas, groups, nodes, gpus)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"phy2log": r.phy2log, "logcnt": r.logcnt, "log2phy": r.log2phy})
        );
    } else {
        for (l, (phy, cnt)) in r.phy2log.iter().zip(&r.logcnt).enumerate() {
            println!("layer {l}: phy2log {phy:?}");
            println!("layer {l}: logcnt  {cnt:?}");
        }
    }
    Ok(())
}
