//! Job specifications: what a user submits, as a TOML job file or over gRPC.
//!
//! A [`JobSpec`] is pure data. [`JobSpec::validate`] checks it against the model it names and
//! reports the first problem with its field path (`parallelism.ep`, `training.seq_len`, ...), so
//! the coordinator can answer `INVALID_ARGUMENT` with that path and the CLI can print it.
//!
//! Job file layout (every section but the name optional, with the defaults shown):
//!
//! ```toml
//! name = "tiny-run"
//! model = "tiny"            # a preset, a config.json, or a checkpoint directory
//! precision = "fp8"         # fp32 | bf16 | fp8
//! priority = 0              # higher runs first
//!
//! [parallelism]
//! pp = 1
//! dp = 1
//! ep = 1
//! schedule = "1f1b"         # 1f1b | zb1p | dualpipe | dualpipev
//! micro_batches = 2
//!
//! [training]
//! steps = 60
//! seq_len = 256
//! batch = 8                 # sequences per step, over all data-parallel ranks
//! lr = 1e-3                 # peak learning rate
//! warmup_steps = 3         # default: 5% of the steps, between 1 and 100
//! min_lr_ratio = 0.1        # cosine decay to lr * min_lr_ratio
//! gamma = 0.001             # bias update speed
//! alpha = 0.0001            # sequence-wise balance loss weight
//! mtp_lambda = 0.3
//! seed = 0
//! comm_timeout_s = 120      # longest wait for another device's data before the job fails
//!
//! [data]
//! source = "synthetic"      # or a token file (.bin) or a text file
//! dtype = "u16"             # token files: u16 | u32
//!
//! [checkpointing]
//! dir = "runs/tiny-run"
//! interval = 0              # steps between checkpoints; 0 = only at the end
//! keep = 3
//! resume = ""              # a checkpoint directory to continue from
//! on_error = "continue"     # a checkpoint that cannot be written: "continue" | "pause"
//! retry_s = 10              # paused: seconds before trying again from the last checkpoint
//!
//! [elasticity]
//! min_dp = 1                # default: dp
//! max_dp = 1                # default: dp
//! ```

use serde::{Deserialize, Serialize};

use crate::plan::{Parallelism, Schedule};
use crate::{ModelConfig, SpecError};

/// Arithmetic of the linear layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// FP32 throughout.
    Fp32,
    /// BF16 GEMM operands, FP32 accumulation.
    Bf16,
    /// The report's FP8 recipe.
    #[default]
    Fp8,
}

/// Token file element type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Little-endian u16 ids.
    #[default]
    U16,
    /// Little-endian u32 ids.
    U32,
}

/// How the job is split over devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelismSpec {
    /// Pipeline ranks.
    pub pp: usize,
    /// Data-parallel ranks per pipeline rank.
    pub dp: usize,
    /// Expert-parallel group size (divides `dp` and the routed experts).
    pub ep: usize,
    /// Pipeline schedule: `1f1b`, `zb1p`, `dualpipe`, `dualpipev`.
    pub schedule: String,
    /// Micro-batches per step and data-parallel rank.
    pub micro_batches: usize,
}

impl Default for ParallelismSpec {
    fn default() -> Self {
        Self {
            pp: 1,
            dp: 1,
            ep: 1,
            schedule: "1f1b".into(),
            micro_batches: 2,
        }
    }
}

/// The default of `training.comm_timeout_s`.
pub const DEFAULT_COMM_TIMEOUT_S: f64 = 120.0;
/// The largest `training.comm_timeout_s` accepted (a day).
pub const MAX_COMM_TIMEOUT_S: f64 = 86_400.0;

/// The optimisation run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSpec {
    /// Optimizer steps.
    pub steps: u64,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per step, over all data-parallel ranks.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps (absent: 5% of the steps, between 1 and 100).
    pub warmup_steps: Option<u64>,
    /// The cosine decay ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Bias update speed of auxiliary-loss-free balancing.
    pub gamma: f64,
    /// Weight of the sequence-wise balance loss.
    pub alpha: f64,
    /// Weight of the MTP losses.
    pub mtp_lambda: f64,
    /// Seed of the initialisation and the data order.
    pub seed: u64,
    /// Seconds any wait for another device's data (a frame, a collective, a connection) may
    /// take before the job fails with an error naming the peer and the operation.
    pub comm_timeout_s: f64,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        Self {
            steps: 60,
            seq_len: 256,
            batch: 8,
            lr: 1e-3,
            warmup_steps: None,
            min_lr_ratio: 0.1,
            gamma: 0.001,
            alpha: 0.0001,
            mtp_lambda: 0.3,
            seed: 0,
            comm_timeout_s: DEFAULT_COMM_TIMEOUT_S,
        }
    }
}

/// Where the tokens come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// `synthetic`, or the path of a token file (`.bin`) or text file.
    pub source: String,
    /// Element type of token files.
    pub dtype: TokenDtype,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            source: "synthetic".into(),
            dtype: TokenDtype::U16,
        }
    }
}

/// Checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// Directory; empty means `runs/<name>`.
    pub dir: String,
    /// Steps between checkpoints; 0 writes one at the end only.
    pub interval: u64,
    /// Committed checkpoints to keep (at least 1).
    pub keep: usize,
    /// Continue from this checkpoint directory (one a previous run wrote: weights, optimizer,
    /// data position); empty starts from step 0.
    pub resume: String,
    /// What a checkpoint that cannot be written (a full or unwritable disk) does to the job:
    /// `continue` trains on (the error is a job event); `pause` stops the job and, every
    /// `retry_s`, runs it again from its last committed checkpoint, so it never gets further
    /// than one interval past what is saved.
    pub on_error: String,
    /// Seconds a paused job waits before it tries again.
    pub retry_s: f64,
}

/// `checkpointing.on_error` values.
pub const ON_CHECKPOINT_ERROR: [&str; 2] = ["continue", "pause"];

impl CheckpointSpec {
    /// Whether a checkpoint that cannot be written pauses the job.
    pub fn pauses(&self) -> bool {
        self.on_error == "pause"
    }
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            dir: String::new(),
            interval: 0,
            keep: 3,
            resume: String::new(),
            on_error: "continue".into(),
            retry_s: 10.0,
        }
    }
}

/// How far the data-parallel width may shrink or grow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticitySpec {
    /// Fewest data-parallel ranks the job may run with (0: `dp`).
    pub min_dp: usize,
    /// Most data-parallel ranks the job may run with (0: `dp`).
    pub max_dp: usize,
}

/// A training job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A name for people: 1-63 characters of `a-z`, `0-9`, `-`, `_`, `.`.
    pub name: String,
    /// A preset name, a `config.json` path, or a checkpoint directory.
    #[serde(default = "default_model")]
    pub model: String,
    /// Arithmetic of the linear layers.
    #[serde(default)]
    pub precision: Precision,
    /// Higher runs first among queued jobs.
    #[serde(default)]
    pub priority: i32,
    /// How the job is split.
    #[serde(default)]
    pub parallelism: ParallelismSpec,
    /// The optimisation run.
    #[serde(default)]
    pub training: TrainingSpec,
    /// The data.
    #[serde(default)]
    pub data: DataSpec,
    /// Checkpoints.
    #[serde(default)]
    pub checkpointing: CheckpointSpec,
    /// Elastic data parallelism.
    #[serde(default)]
    pub elasticity: ElasticitySpec,
}

fn default_model() -> String {
    "tiny".into()
}

fn bad(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError::invalid(field, reason)
}

impl JobSpec {
    /// Parses a TOML job file (`source` names it in errors).
    pub fn from_toml(text: &str, source: &str) -> Result<Self, SpecError> {
        toml::from_str(text).map_err(|e| SpecError::Json {
            source_name: source.to_string(),
            reason: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// The schedule, parsed.
    pub fn schedule(&self) -> Result<Schedule, SpecError> {
        self.parallelism.schedule.parse()
    }

    /// The data-parallel bounds after defaults: `(min_dp, max_dp)`.
    pub fn dp_bounds(&self) -> (usize, usize) {
        let dp = self.parallelism.dp;
        let min = if self.elasticity.min_dp == 0 {
            dp
        } else {
            self.elasticity.min_dp
        };
        let max = if self.elasticity.max_dp == 0 {
            dp
        } else {
            self.elasticity.max_dp
        };
        (min, max)
    }

    /// The planner's view of the job's parallelism.
    pub fn parallelism(&self) -> Result<Parallelism, SpecError> {
        let par = &self.parallelism;
        let per_rank = par.dp.max(1).saturating_mul(par.micro_batches.max(1));
        Ok(Parallelism {
            pp: par.pp,
            dp: par.dp,
            ep: par.ep,
            schedule: self.schedule()?,
            micro_batches: par.micro_batches,
            micro_batch_size: self.training.batch / per_rank,
            seq_len: self.training.seq_len,
        })
    }

    /// Checks everything but the model reference itself against `model`, the configuration
    /// it names. The first problem is reported with its field path.
    pub fn validate(&self, model: &ModelConfig) -> Result<(), SpecError> {
        let name_ok = (1..=63).contains(&self.name.len())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !name_ok {
            // A long name is not echoed back whole (errors travel in gRPC headers).
            let got = if self.name.len() <= 63 {
                format!("{:?}", self.name)
            } else {
                format!("{} bytes", self.name.len())
            };
            return Err(bad(
                "name",
                format!("must be 1-63 characters of a-z, 0-9, '-', '_', '.', got {got}"),
            ));
        }
        if self.model.trim().is_empty() {
            return Err(bad(
                "model",
                "must name a preset, a config.json or a directory",
            ));
        }
        let t = &self.training;
        if t.steps == 0 {
            return Err(bad("training.steps", "must be at least 1"));
        }
        if t.seq_len == 0 || t.seq_len > model.max_position_embeddings {
            return Err(bad(
                "training.seq_len",
                format!(
                    "must be in 1..={} (the model's max_position_embeddings), got {}",
                    model.max_position_embeddings, t.seq_len
                ),
            ));
        }
        let par = &self.parallelism;
        for (field, v) in [
            ("parallelism.dp", par.dp),
            ("parallelism.micro_batches", par.micro_batches),
        ] {
            if v == 0 {
                return Err(bad(field, "must be at least 1"));
            }
        }
        let per_step = par.dp.saturating_mul(par.micro_batches);
        if t.batch == 0 || per_step == 0 || !t.batch.is_multiple_of(per_step) {
            return Err(bad(
                "training.batch",
                format!(
                    "must be a positive multiple of dp x micro_batches = {per_step}, got {}",
                    t.batch
                ),
            ));
        }
        for (field, v, min_ok) in [
            ("training.lr", t.lr, t.lr > 0.0),
            (
                "training.min_lr_ratio",
                t.min_lr_ratio,
                (0.0..=1.0).contains(&t.min_lr_ratio),
            ),
            ("training.gamma", t.gamma, t.gamma >= 0.0),
            ("training.alpha", t.alpha, t.alpha >= 0.0),
            ("training.mtp_lambda", t.mtp_lambda, t.mtp_lambda >= 0.0),
            (
                "training.comm_timeout_s",
                t.comm_timeout_s,
                t.comm_timeout_s > 0.0 && t.comm_timeout_s <= MAX_COMM_TIMEOUT_S,
            ),
        ] {
            if !(v.is_finite() && min_ok) {
                return Err(bad(
                    field,
                    format!(
                        "got {v}: must be finite and in range (lr > 0, ratio in [0, 1], weights \
                         >= 0, comm_timeout_s in (0, {MAX_COMM_TIMEOUT_S}])"
                    ),
                ));
            }
        }
        if let Some(w) = t.warmup_steps.filter(|w| *w > t.steps) {
            return Err(bad(
                "training.warmup_steps",
                format!("{w} exceeds training.steps {}", t.steps),
            ));
        }
        if self.data.source.trim().is_empty() {
            return Err(bad("data.source", "must be \"synthetic\" or a file path"));
        }
        if self.checkpointing.keep == 0 {
            return Err(bad("checkpointing.keep", "must be at least 1"));
        }
        if !ON_CHECKPOINT_ERROR.contains(&self.checkpointing.on_error.as_str()) {
            return Err(bad(
                "checkpointing.on_error",
                format!(
                    "must be \"continue\" or \"pause\", got {:?}",
                    self.checkpointing.on_error
                ),
            ));
        }
        let retry = self.checkpointing.retry_s;
        if !(retry.is_finite() && (0.1..=86_400.0).contains(&retry)) {
            return Err(bad(
                "checkpointing.retry_s",
                format!("must be between 0.1 and 86400 seconds, got {retry}"),
            ));
        }
        crate::plan::validate(model, &self.parallelism()?)?;
        let (min_dp, max_dp) = self.dp_bounds();
        if min_dp > par.dp || max_dp < par.dp {
            return Err(bad(
                "elasticity",
                format!(
                    "min_dp {min_dp} <= dp {} <= max_dp {max_dp} does not hold",
                    par.dp
                ),
            ));
        }
        for (field, v) in [("elasticity.min_dp", min_dp), ("elasticity.max_dp", max_dp)] {
            if v % par.ep != 0 {
                return Err(bad(
                    field,
                    format!("{v} is not a multiple of ep {}", par.ep),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn minimal() -> JobSpec {
        JobSpec::from_toml("name = \"run-1\"", "job.toml").unwrap()
    }

    #[test]
    fn defaults_fill_a_minimal_file_and_validate() {
        let partial =
            JobSpec::from_toml("name = \"p\"\n[checkpointing]\ndir = \"d\"", "p").unwrap();
        assert_eq!(
            partial.checkpointing.keep, 3,
            "a partial section keeps the other defaults"
        );
        let job = minimal();
        assert_eq!(job.model, "tiny");
        assert_eq!(job.precision, Precision::Fp8);
        assert_eq!(job.training.steps, 60);
        assert_eq!(job.checkpointing.keep, 3);
        assert_eq!(job.dp_bounds(), (1, 1));
        job.validate(&ModelConfig::tiny()).unwrap();
    }

    #[test]
    fn a_full_file_round_trips() {
        let text = r#"
            name = "big"
            model = "deepseek-v3-671b"
            precision = "bf16"
            priority = 5
            [parallelism]
            pp = 16
            dp = 128
            ep = 64
            schedule = "dualpipe"
            micro_batches = 32
            [training]
            steps = 10
            seq_len = 4096
            batch = 4096
            [data]
            source = "tokens.bin"
            dtype = "u32"
            [checkpointing]
            dir = "/ckpt"
            interval = 100
            keep = 2
            [elasticity]
            min_dp = 64
            max_dp = 128
        "#;
        let job = JobSpec::from_toml(text, "big.toml").unwrap();
        job.validate(&ModelConfig::deepseek_v3_671b()).unwrap();
        assert_eq!(job.parallelism().unwrap().micro_batch_size, 1);
        let again = JobSpec::from_toml(&toml::to_string(&job).unwrap(), "x").unwrap();
        assert_eq!(again, job);
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let e = JobSpec::from_toml("name = \"a\"\n[training]\nstepz = 3", "j.toml").unwrap_err();
        assert!(
            e.to_string().contains("j.toml") && e.to_string().contains("stepz"),
            "{e}"
        );
        let tiny = ModelConfig::tiny();
        let cases: Vec<(&str, &str)> = vec![
            ("name = \"Bad Name\"", "name"),
            ("name = \"a\"\n[training]\nsteps = 0", "training.steps"),
            (
                "name = \"a\"\n[training]\nseq_len = 100000",
                "training.seq_len",
            ),
            ("name = \"a\"\n[training]\nbatch = 7", "training.batch"),
            ("name = \"a\"\n[training]\nlr = -1.0", "training.lr"),
            (
                "name = \"a\"\n[training]\nwarmup_steps = 100",
                "training.warmup_steps",
            ),
            (
                "name = \"a\"\n[parallelism]\nschedule = \"gpipe\"",
                "parallelism.schedule",
            ),
            (
                "name = \"a\"\n[parallelism]\npp = 3\nschedule = \"dualpipe\"\nmicro_batches = 6\n[training]\nbatch = 6",
                "parallelism.pp",
            ),
            (
                "name = \"a\"\n[parallelism]\ndp = 4\nep = 3\n[training]\nbatch = 8",
                "parallelism.ep",
            ),
            (
                "name = \"a\"\n[parallelism]\ndp = 2\nep = 2\n[training]\nbatch = 8\n[elasticity]\nmin_dp = 1",
                "elasticity.min_dp",
            ),
            (
                "name = \"a\"\n[elasticity]\nmax_dp = 0\nmin_dp = 2",
                "elasticity",
            ),
            (
                "name = \"a\"\n[checkpointing]\nkeep = 0",
                "checkpointing.keep",
            ),
            (
                "name = \"a\"\n[checkpointing]\non_error = \"stop\"",
                "checkpointing.on_error",
            ),
            (
                "name = \"a\"\n[checkpointing]\nretry_s = 0.0",
                "checkpointing.retry_s",
            ),
            (
                "name = \"a\"\n[training]\ncomm_timeout_s = 0.0",
                "training.comm_timeout_s",
            ),
            (
                "name = \"a\"\n[training]\ncomm_timeout_s = 1e9",
                "training.comm_timeout_s",
            ),
            (
                "name = \"a\"\n[training]\ncomm_timeout_s = nan",
                "training.comm_timeout_s",
            ),
        ];
        for (text, field) in cases {
            let job = JobSpec::from_toml(text, "j.toml").unwrap();
            let e = job.validate(&tiny).unwrap_err().to_string();
            assert!(e.starts_with(field), "{text:?}: {e} should name {field}");
        }
    }

    #[test]
    fn names_are_limited_to_63_characters_and_long_ones_are_not_echoed() {
        let tiny = ModelConfig::tiny();
        let named = |name: String| JobSpec {
            name,
            ..JobSpec::from_toml("name = \"a\"", "j.toml").unwrap()
        };
        named("a".repeat(63)).validate(&tiny).unwrap();
        let e = named("a".repeat(64))
            .validate(&tiny)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("name: must be 1-63 characters"), "{e}");
        assert!(e.ends_with("got 64 bytes"), "{e}");
        let e = named(String::new())
            .validate(&tiny)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("name:") && e.ends_with("got \"\""), "{e}");
        let e = named("x".repeat(1 << 20))
            .validate(&tiny)
            .unwrap_err()
            .to_string();
        assert!(e.len() < 100, "{} bytes", e.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever the numbers, validation answers (no panic), and a spec it accepts can be
        /// planned on a cluster big enough for it.
        #[test]
        fn validation_never_panics_and_accepted_specs_plan(
            pp in 0usize..9, dp in 0usize..9, ep in 0usize..9, mb in 0usize..20,
            batch in 0usize..200, seq in 0usize..5000, steps in 0u64..5,
            sched in 0usize..5, min_dp in 0usize..9, max_dp in 0usize..9,
            lr in prop::num::f64::ANY,
        ) {
            let schedule = ["1f1b", "zb1p", "dualpipe", "dualpipev", "bogus"][sched];
            let job = JobSpec {
                name: "p".into(),
                model: "tiny".into(),
                precision: Precision::Fp32,
                priority: 0,
                parallelism: ParallelismSpec { pp, dp, ep, schedule: schedule.into(), micro_batches: mb },
                training: TrainingSpec { steps, seq_len: seq, batch, lr, ..TrainingSpec::default() },
                data: DataSpec::default(),
                checkpointing: CheckpointSpec::default(),
                elasticity: ElasticitySpec { min_dp, max_dp },
            };
            let model = ModelConfig::tiny();
            if job.validate(&model).is_ok() {
                let par = job.parallelism().unwrap();
                let cluster = crate::plan::Cluster::uniform(pp * dp, 1);
                prop_assert!(crate::plan::plan(&model, &par, &cluster).is_ok());
                prop_assert!(par.micro_batch_size >= 1);
            }
        }
    }
}
