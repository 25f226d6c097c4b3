//! The `shoal` command-line interface.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;

/// Shoal: a DeepSeek-V3-style Mixture-of-Experts training orchestrator.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model (the single-process trainer lands with the model issue).
    Train,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train => Err(anyhow::anyhow!(
            "training is not available yet: the model and `shoal train` land with the model issue; \
             this build provides `shoal bench kernels`"
        )),
        Command::Bench {
            suite: BenchSuite::Kernels(args),
        } => bench::kernels::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}
