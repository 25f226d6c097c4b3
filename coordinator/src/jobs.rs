//! Jobs: their persisted state machine and the actor that owns them.
//!
//! A job is `Pending` (queued, with the reason) -> `Scheduling` -> `Running` -> `Succeeded` |
//! `Failed` | `Cancelled`, with `Recovering` between `Running` and `Running` again. Every change is
//! written to the store (compare-and-set on the record's revision) before anyone hears of it, so
//! a coordinator restarted on the same store finds every job in the state it last reported.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shoal_spec::ModelConfig;
use shoal_spec::job::JobSpec;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::store::{Expect, Store};
use crate::{CoordinatorError, Result};

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
            (Running, Succeeded) | (Running, Recovering) | (Recovering, Running) => true,
            (Recovering, Pending) => true,
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
}

fn now_ms() -> u64 {
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

/// Messages to the jobs actor.
#[derive(Debug)]
enum Msg {
    Submit(Box<JobSpec>, oneshot::Sender<Result<String>>),
    Get(String, oneshot::Sender<Result<JobRecord>>),
    List(oneshot::Sender<Vec<JobRecord>>),
    Cancel(String, oneshot::Sender<Result<JobRecord>>),
    Watch(
        String,
        oneshot::Sender<Result<(JobRecord, broadcast::Receiver<JobEvent>)>>,
    ),
}

/// A cloneable handle to the jobs actor.
#[derive(Clone, Debug)]
pub struct Jobs {
    tx: mpsc::Sender<Msg>,
}

/// Mailbox size of the jobs actor.
const MAILBOX: usize = 256;

/// Why a new job waits, until scheduling lands.
pub const NO_NODES: &str = "waiting for devices: no worker nodes are registered";

impl Jobs {
    /// Loads every job from `store` and starts the actor on the current runtime. The actor ends
    /// (releasing the store) once every handle is dropped; the returned task resolves then.
    pub async fn start<S: Store>(store: S) -> Result<(Self, tokio::task::JoinHandle<()>)> {
        let mut jobs = BTreeMap::new();
        let mut seq = 0;
        for (key, v) in store.list("jobs/").await? {
            let rec: JobRecord =
                serde_json::from_slice(&v.value).map_err(|e| CoordinatorError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            seq = seq.max(rec.seq);
            jobs.insert(rec.id.clone(), (rec, v.revision));
        }
        tracing::info!(jobs = jobs.len(), "loaded jobs from the store");
        let (tx, rx) = mpsc::channel(MAILBOX);
        let actor = JobsActor {
            store,
            jobs,
            seq,
            watchers: BTreeMap::new(),
        };
        let task = tokio::spawn(actor.run(rx));
        Ok((Self { tx }, task))
    }

    async fn ask<T>(&self, msg: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(msg(tx))
            .await
            .map_err(|_| CoordinatorError::Unavailable)?;
        rx.await.map_err(|_| CoordinatorError::Unavailable)
    }

    /// Validates and queues a job; returns its id.
    pub async fn submit(&self, spec: JobSpec) -> Result<String> {
        validate(&spec)?;
        self.ask(|tx| Msg::Submit(Box::new(spec), tx)).await?
    }

    /// One job.
    pub async fn get(&self, id: &str) -> Result<JobRecord> {
        self.ask(|tx| Msg::Get(id.to_string(), tx)).await?
    }

    /// Every job in submission order.
    pub async fn list(&self) -> Result<Vec<JobRecord>> {
        self.ask(Msg::List).await
    }

    /// Cancels a job (a finished job stays as it is).
    pub async fn cancel(&self, id: &str) -> Result<JobRecord> {
        self.ask(|tx| Msg::Cancel(id.to_string(), tx)).await?
    }

    /// The job now and a receiver of its later events.
    pub async fn watch(&self, id: &str) -> Result<(JobRecord, broadcast::Receiver<JobEvent>)> {
        self.ask(|tx| Msg::Watch(id.to_string(), tx)).await?
    }
}

struct JobsActor<S> {
    store: S,
    /// id -> (record, store revision).
    jobs: BTreeMap<String, (JobRecord, u64)>,
    seq: u64,
    watchers: BTreeMap<String, broadcast::Sender<JobEvent>>,
}

impl<S: Store> JobsActor<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Submit(spec, reply) => {
                    let _ = reply.send(self.submit(*spec).await);
                }
                Msg::Get(id, reply) => {
                    let _ = reply.send(self.record(&id).cloned());
                }
                Msg::List(reply) => {
                    let mut all: Vec<JobRecord> =
                        self.jobs.values().map(|(r, _)| r.clone()).collect();
                    all.sort_by_key(|r| r.seq);
                    let _ = reply.send(all);
                }
                Msg::Cancel(id, reply) => {
                    let _ = reply.send(self.cancel(&id).await);
                }
                Msg::Watch(id, reply) => {
                    let answer = self.record(&id).cloned().map(|rec| {
                        let rx = self
                            .watchers
                            .entry(id)
                            .or_insert_with(|| broadcast::channel(1024).0)
                            .subscribe();
                        (rec, rx)
                    });
                    let _ = reply.send(answer);
                }
            }
        }
    }

    fn record(&self, id: &str) -> Result<&JobRecord> {
        self.jobs
            .get(id)
            .map(|(r, _)| r)
            .ok_or_else(|| CoordinatorError::NotFound {
                kind: "job",
                id: id.to_string(),
            })
    }

    async fn submit(&mut self, spec: JobSpec) -> Result<String> {
        let seq = self.seq + 1;
        let id = format!("job-{seq}");
        let rec = JobRecord {
            id: id.clone(),
            seq,
            spec,
            state: JobState::Pending,
            reason: NO_NODES.into(),
            step: 0,
            history: vec![Transition {
                state: JobState::Pending,
                reason: NO_NODES.into(),
                unix_ms: now_ms(),
            }],
        };
        let bytes = encode(&rec)?;
        let rev = match self
            .store
            .compare_and_set(&format!("jobs/{id}"), Expect::Absent, bytes)
            .await?
        {
            Ok(rev) => rev,
            Err(_) => {
                return Err(CoordinatorError::Store(format!(
                    "job id {id} already taken in the store (another coordinator?)"
                )));
            }
        };
        self.seq = seq;
        tracing::info!(job = %id, name = %rec.spec.name, "job submitted");
        self.jobs.insert(id.clone(), (rec, rev));
        Ok(id)
    }

    async fn cancel(&mut self, id: &str) -> Result<JobRecord> {
        let rec = self.record(id)?.clone();
        if rec.state.is_final() {
            return Ok(rec);
        }
        self.transition(id, JobState::Cancelled, "cancelled by request")
            .await
    }

    /// Moves a job to `to`, persisting it first, then telling its watchers.
    async fn transition(&mut self, id: &str, to: JobState, reason: &str) -> Result<JobRecord> {
        let (rec, rev) = self
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| CoordinatorError::NotFound {
                kind: "job",
                id: id.to_string(),
            })?;
        if !rec.state.allows(to) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "job {id} cannot go from {:?} to {to:?}",
                rec.state
            )));
        }
        let t = Transition {
            state: to,
            reason: reason.to_string(),
            unix_ms: now_ms(),
        };
        let mut next = rec;
        next.state = to;
        next.reason = reason.to_string();
        next.history.push(t.clone());
        let new_rev = match self
            .store
            .compare_and_set(&format!("jobs/{id}"), Expect::Revision(rev), encode(&next)?)
            .await?
        {
            Ok(r) => r,
            Err(_) => {
                return Err(CoordinatorError::Store(format!(
                    "job {id} was changed in the store by someone else"
                )));
            }
        };
        tracing::info!(job = %id, state = ?to, reason, "job state changed");
        self.jobs.insert(id.to_string(), (next.clone(), new_rev));
        if let Some(w) = self.watchers.get(id) {
            let _ = w.send(JobEvent::State(t));
            if to.is_final() {
                self.watchers.remove(id);
            }
        }
        Ok(next)
    }
}

fn encode(rec: &JobRecord) -> Result<Vec<u8>> {
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
        assert!(Running.allows(Recovering) && Recovering.allows(Running));
        assert!(!Pending.allows(Running), "no running without scheduling");
        assert!(!Succeeded.allows(Cancelled));
        assert!(!Cancelled.allows(Pending));
    }
}
