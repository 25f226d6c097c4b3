//! Jobs: their records and their state machine (the control actor owns and persists them).
//!
//! A job is `Pending` (queued, with the reason) -> `Scheduling` -> `Running` -> `Succeeded` |
//! `Failed` | `Cancelled`, with `Recovering` between `Running` and `Running` again. Every change is
//! written to the store (compare-and-set on the record's revision) before anyone hears of it, so
//! a coordinator restarted on the same store finds every job in the state it last reported.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{CoordinatorError, Result};
use serde::{Deserialize, Serialize};
use shoal_spec::ModelConfig;
use shoal_spec::job::JobSpec;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Queued; the record's reason says what it waits for.
    Pending,
    /// Devices chosen; workers are being given their assignments.
    Scheduling,
    /// Training.
    Running,
    /// A failure is being repaired.
    Recovering,
    /// Finished every step.
    Succeeded,
    /// Stopped by an error.
    Failed,
    /// Stopped by a user.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Whether the state machine allows `self -> to`.
    pub fn allows(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (_, Cancelled) | (_, Failed) => !self.is_final(),
            (Pending, Scheduling) | (Scheduling, Running) | (Scheduling, Pending) => true,
            (Running, Succeeded) | (Running, Recovering) | (Scheduling, Recovering) => true,
            (Recovering, Scheduling) | (Recovering, Pending) => true,
            _ => false,
        }
    }
}

/// A state change as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The new state.
    pub state: JobState,
    /// Why.
    pub reason: String,
    /// When, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// A job as stored under `jobs/<id>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// `job-<sequence>`.
    pub id: String,
    /// Submission order.
    pub seq: u64,
    /// The spec as submitted (validated).
    pub spec: JobSpec,
    /// Current state.
    pub state: JobState,
    /// Why the job is pending or failed.
    pub reason: String,
    /// Steps completed.
    pub step: u64,
    /// Every state change, oldest first.
    pub history: Vec<Transition>,
    /// Where the ranks run (empty until scheduled).
    #[serde(default)]
    pub placement: Vec<Placed>,
    /// 0 until the first recovery; each recovery starts the next attempt, which continues
    /// from the newest committed checkpoint.
    #[serde(default)]
    pub attempt: u32,
    /// The newest committed checkpoint's step (0: none).
    #[serde(default)]
    pub checkpoint_step: u64,
    /// Every recovery, oldest first; the last one is open until the job runs again.
    #[serde(default)]
    pub recoveries: Vec<Recovery>,
    /// The W3C `traceparent` of the job's submission (empty when it was not traced): the
    /// coordinator's spans for the job and every node's attempt join that trace.
    #[serde(default)]
    pub trace: String,
}

/// One recovery from a failure, as recorded in the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// The attempt it started.
    pub attempt: u32,
    /// What failed.
    pub cause: String,
    /// When the coordinator noticed, ms since the Unix epoch.
    pub detected_unix_ms: u64,
    /// When a lost node was last heard from (0: no node was lost).
    pub last_heard_unix_ms: u64,
    /// When the job ran again (0 while recovering).
    pub resumed_unix_ms: u64,
    /// The last step completed before the failure.
    pub failed_step: u64,
    /// The step the job went back to.
    pub restored_step: u64,
    /// Data-parallel ranks before and after.
    pub dp_before: u32,
    /// Data-parallel ranks of the new attempt (0 until placed).
    pub dp_after: u32,
    /// Microseconds spent placing the job again (0 until placed).
    #[serde(default)]
    pub replan_us: u64,
    /// The nodes the job ran on when it failed, in placement order.
    #[serde(default)]
    pub nodes_before: Vec<String>,
    /// The nodes of the new attempt (empty until it runs).
    #[serde(default)]
    pub nodes_after: Vec<String>,
}

impl Recovery {
    /// Steps run again.
    pub fn steps_redone(&self) -> u64 {
        self.failed_step.saturating_sub(self.restored_step)
    }

    /// Milliseconds from detection to running again (`None` while recovering).
    pub fn recovery_ms(&self) -> Option<u64> {
        (self.resumed_unix_ms > 0)
            .then(|| self.resumed_unix_ms.saturating_sub(self.detected_unix_ms))
    }
}

/// One rank's device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// Pipeline rank.
    pub pp_rank: usize,
    /// Data-parallel rank.
    pub dp_rank: usize,
    /// Node name.
    pub node: String,
    /// Device index within the node.
    pub device: usize,
}

/// The distinct nodes of a placement, in placement order.
pub fn nodes_of(placement: &[Placed]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    placement
        .iter()
        .filter(|p| seen.insert(p.node.as_str()))
        .map(|p| p.node.clone())
        .collect()
}

impl JobRecord {
    /// Submission time.
    pub fn submitted_unix_ms(&self) -> u64 {
        self.history.first().map_or(0, |t| t.unix_ms)
    }

    /// Time of the last state change.
    pub fn updated_unix_ms(&self) -> u64 {
        self.history.last().map_or(0, |t| t.unix_ms)
    }
}

/// Something that happened to a job, as watchers hear it.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEvent {
    /// The job changed state.
    State(Transition),
    /// A step completed.
    Step(shoal_proto::v1::StepMetrics),
    /// Something went wrong that did not end the job (a checkpoint not written).
    Error(String),
    /// A node much slower than its peers.
    Straggler(crate::stragglers::Straggler),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Resolves a spec's model reference: a preset name, or a `config.json` file or a directory
/// holding one, readable by the coordinator.
pub fn resolve_model(reference: &str) -> Result<ModelConfig> {
    let path = Path::new(reference);
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    if file.is_file() {
        let text = std::fs::read_to_string(&file).map_err(|e| {
            CoordinatorError::invalid("spec.model", format!("{}: {e}", file.display()))
        })?;
        let name = file.display().to_string();
        let cfg = ModelConfig::from_hf_json(&text, &name)
            .and_then(|c| c.validate(&name).map(|()| c))
            .map_err(|e| CoordinatorError::invalid("spec.model", e.to_string()))?;
        return Ok(cfg);
    }
    ModelConfig::preset(reference).map_err(|e| {
        CoordinatorError::invalid(
            "spec.model",
            format!("{e}, and no config.json at {reference:?}"),
        )
    })
}

/// Validates a spec against its model; field paths get the `spec.` prefix of the API.
pub fn validate(spec: &JobSpec) -> Result<()> {
    let model = resolve_model(&spec.model)?;
    spec.validate(&model).map_err(|e| match e {
        shoal_spec::SpecError::Invalid { field, reason } => {
            CoordinatorError::invalid(format!("spec.{field}"), reason)
        }
        other => CoordinatorError::invalid("spec", other.to_string()),
    })
}

/// A record as stored.
pub fn encode(rec: &JobRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(rec).map_err(|e| CoordinatorError::Store(format!("encode job: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_machine_allows_only_the_documented_moves() {
        use JobState::*;
        let all = [
            Pending, Scheduling, Running, Recovering, Succeeded, Failed, Cancelled,
        ];
        let allowed: Vec<(JobState, JobState)> = all
            .iter()
            .flat_map(|&a| all.iter().map(move |&b| (a, b)))
            .filter(|(a, b)| a.allows(*b))
            .collect();
        for (a, b) in &allowed {
            assert!(!a.is_final(), "{a:?} -> {b:?} leaves a final state");
        }
        assert!(Pending.allows(Scheduling) && Scheduling.allows(Running));
        assert!(Running.allows(Recovering) && Recovering.allows(Scheduling));
        assert!(
            !Recovering.allows(Running),
            "a recovered job is placed again first"
        );
        assert!(!Pending.allows(Running), "no running without scheduling");
        assert!(!Succeeded.allows(Cancelled));
        assert!(!Cancelled.allows(Pending));
    }
}
