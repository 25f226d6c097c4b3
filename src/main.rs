//! The `shoal` command-line interface.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod alloc;
mod bench;
mod cmd;
mod procs;
mod telemetry;

/// Shoal: a DeepSeek-V3-style Mixture-of-Experts training orchestrator.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    /// Export spans over OTLP/gRPC to this collector (http://host:4317); also read from the
    /// standard OTEL_EXPORTER_OTLP_ENDPOINT. Log lines go to stderr at RUST_LOG's level.
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a DeepSeek-V3 model in this process.
    Train(cmd::train::TrainArgs),
    /// Mean next-token cross-entropy of a checkpoint on a token file.
    Eval(cmd::eval::EvalArgs),
    /// Write a checkpoint (a committed sharded one, or the newest of a job's) as a Hugging
    /// Face model directory.
    Export(cmd::export::ExportArgs),
    /// Place a job on a cluster (stages, EP groups, memory, bubble), or balance experts from
    /// measured loads (EPLB).
    Plan(cmd::plan::PlanArgs),
    /// Train on a simulated cluster (`sim` devices on a cost model) against a real coordinator,
    /// with failures injected at random: placement, detection, recovery, ETTR, GPU-hours.
    Simulate(cmd::simulate::SimulateArgs),
    /// Run the coordinator (job API, scheduling, membership) until Ctrl-C.
    Coordinator(cmd::cluster::CoordinatorArgs),
    /// Run a node agent: attach to the coordinator and run the jobs it assigns.
    Worker(cmd::cluster::WorkerArgs),
    /// A local cluster: a coordinator and worker processes, until Ctrl-C.
    Up(cmd::cluster::UpArgs),
    /// Submit a TOML job file; prints the job id.
    Submit {
        /// The job file.
        file: std::path::PathBuf,
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// List jobs.
    Jobs {
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// One job's state.
    Status {
        /// The job id.
        job: String,
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// Follow a job until it ends (non-zero exit unless it succeeded).
    Watch {
        /// The job id.
        job: String,
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// Cancel a job.
    Cancel {
        /// The job id.
        job: String,
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// Write a job's step timeline (every node's ranks, clocks aligned) as a Chrome trace that
    /// Perfetto opens.
    Trace {
        /// The job id.
        job: String,
        /// Where to write the trace.
        #[arg(short, long, default_value = "trace.json")]
        out: std::path::PathBuf,
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// List the cluster's nodes.
    Nodes {
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// Stop placing new jobs on a node (its running jobs go on).
    Cordon {
        /// The node.
        node: String,
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// Cordon a node and move its jobs back to the queue.
    Drain {
        /// The node.
        node: String,
        #[command(flatten)]
        target: cmd::cluster::Target,
    },
    /// Run a benchmark suite.
    Bench {
        #[command(subcommand)]
        suite: BenchSuite,
    },
}

#[derive(Debug, Subcommand)]
enum BenchSuite {
    /// FP8 quantization against memcpy, GEMMs against numpy.
    Kernels(bench::kernels::KernelBenchArgs),
    /// Training tokens/s against PyTorch transformers, FP8 vs BF16 loss, MaxVio.
    Train(bench::train::TrainBenchArgs),
    /// Control plane against Ray: RPC round trips, submit-to-running latency, node sessions
    /// one coordinator core serves.
    Control(bench::control::ControlBenchArgs),
    /// Pipeline schedules on threads against the single-process step; bubbles against Table 2.
    Pipeline(bench::pipeline::PipelineBenchArgs),
    /// The expert-parallel exchange against memcpy (one node) and raw TCP (two nodes); tokens/s
    /// with data and expert parallelism against one rank.
    Comm(bench::comm::CommBenchArgs),
    /// Time from SIGKILL of one of two workers to training resumed, against torchrun's
    /// elastic agent.
    Recovery(bench::recovery::RecoveryBenchArgs),
    /// Tokens/s with every span exported over OTLP against tracing off.
    Tracing(bench::tracing::TracingBenchArgs),
    /// Dashboard page load times (p50, p99) at 256 nodes x 8 devices against a 300 ms goal.
    Dashboard(bench::dashboard::DashboardBenchArgs),
    /// The bare TCP echo server `bench control` measures its floor against (prints its port).
    #[command(hide = true)]
    Echo,
}

impl Command {
    /// The process's role (its service name is `shoal-<role>`) and the level it logs at
    /// without `RUST_LOG`: daemons say what they do, one-shot commands only what goes wrong.
    fn role(&self) -> (&'static str, &'static str) {
        match self {
            Self::Coordinator(_) => ("coordinator", "info"),
            Self::Worker(_) => ("worker", "info"),
            Self::Up(_) => ("up", "info"),
            Self::Train(_) => ("train", "warn"),
            Self::Simulate(_) => ("simulate", "warn"),
            Self::Bench { .. } => ("bench", "warn"),
            _ => ("cli", "warn"),
        }
    }
}

/// `shoal plan | head`: when the reader of stdout goes away, end quietly with SIGPIPE's status
/// (141), as Unix tools do, instead of the panic `println!` raises on a broken pipe.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    alloc::keep_freed_memory();
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    let (role, level) = cli.command.role();
    let _telemetry = match telemetry::init(role, level, cli.otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Train(args) => cmd::train::run(&args),
        Command::Eval(args) => cmd::eval::run(&args),
        Command::Export(args) => cmd::export::run(&args),
        Command::Plan(args) => cmd::plan::run(&args),
        Command::Simulate(args) => cmd::simulate::run(&args),
        Command::Coordinator(args) => cmd::cluster::coordinator(&args),
        Command::Worker(args) => cmd::cluster::worker(&args),
        Command::Up(args) => cmd::cluster::up(&args),
        Command::Submit { file, target } => cmd::cluster::submit(&file, &target),
        Command::Jobs { target } => cmd::cluster::jobs(&target),
        Command::Status { job, target } => cmd::cluster::status(&job, &target),
        Command::Watch { job, target } => cmd::cluster::watch(&job, &target),
        Command::Cancel { job, target } => cmd::cluster::cancel(&job, &target),
        Command::Trace { job, out, target } => cmd::cluster::trace(&job, &out, &target),
        Command::Nodes { target } => cmd::cluster::nodes(&target),
        Command::Cordon { node, target } => cmd::cluster::cordon(&node, false, &target),
        Command::Drain { node, target } => cmd::cluster::cordon(&node, true, &target),
        Command::Bench {
            suite: BenchSuite::Kernels(args),
        } => bench::kernels::run(&args),
        Command::Bench {
            suite: BenchSuite::Train(args),
        } => bench::train::run(&args),
        Command::Bench {
            suite: BenchSuite::Control(args),
        } => bench::control::run(&args),
        Command::Bench {
            suite: BenchSuite::Pipeline(args),
        } => bench::pipeline::run(&args),
        Command::Bench {
            suite: BenchSuite::Comm(args),
        } => bench::comm::run(&args),
        Command::Bench {
            suite: BenchSuite::Recovery(args),
        } => bench::recovery::run(&args),
        Command::Bench {
            suite: BenchSuite::Tracing(args),
        } => bench::tracing::run(&args),
        Command::Bench {
            suite: BenchSuite::Dashboard(args),
        } => bench::dashboard::run(&args),
        Command::Bench {
            suite: BenchSuite::Echo,
        } => bench::control::echo_server(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}
