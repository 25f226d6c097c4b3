//! The trainer's side of sharded checkpoints: each device's shard copied out of the live state
//! (cheap, so the step loop stalls little), and a trainer restored from a committed checkpoint
//! under any split of the job.

use std::collections::BTreeMap;
use std::path::Path;

use shoal_spec::ModelConfig;

use super::Trainer;
use super::state::{Restored, TRAINER_STATE_FILE};
use crate::checkpoint::sharded::{self, DeviceShard, FragMoments, Fragment, Manifest};
use crate::checkpoint::{CONFIG_FILE, background::Snapshot};
use crate::comm::transport::LocalTransport;
use crate::data::Batcher;
use crate::train::TrainOptions;
use crate::{Result, WorkerError};

impl Trainer {
    /// This process's devices' shards: each device's ZeRO-1 segments (master values and
    /// moments) and every untrained parameter it holds (the expert biases). With a device
    /// attached, [`Self::sync_device`] first.
    pub fn shard_snapshot(&self) -> Vec<DeviceShard> {
        self.assert_host_current("shard_snapshot");
        self.replicas
            .iter()
            .zip(&self.ranks)
            .map(|(rep, &device)| {
                let params = rep.model.params();
                let mut fragments = Vec::new();
                for part in &rep.parts {
                    let layout = &self.layouts[part.layout];
                    for (seg, st) in layout.shards[part.member].iter().zip(&part.moments) {
                        let moments = st.moments.clone();
                        fragments.push(Fragment {
                            name: params.name(seg.param).to_string(),
                            start: seg.within.start,
                            values: params.get(seg.param).data()[seg.within.clone()].to_vec(),
                            moments: Some(moments),
                        });
                    }
                }
                for (id, name, t) in params.iter() {
                    if !params.trainable(id) && params.holds(id) {
                        fragments.push(Fragment {
                            name: name.to_string(),
                            start: 0,
                            values: t.data().to_vec(),
                            moments: None,
                        });
                    }
                }
                DeviceShard { device, fragments }
            })
            .collect()
    }

    /// Whether this process holds device 0 (it writes the job's documents and commits).
    pub fn holds_rank0(&self) -> bool {
        self.ranks.first() == Some(&0)
    }

    /// A snapshot of the current step for the background writer: this process's shards, and in
    /// the process holding device 0 the configuration, trainer state and the manifest to commit
    /// once every process's shards are written (waiting at most `wait`, keeping `keep`). Brings
    /// the host copy up to date with an attached device first.
    pub fn checkpoint_snapshot(
        &mut self,
        root: &Path,
        plan: serde_json::Value,
        wait: std::time::Duration,
        keep: usize,
    ) -> Result<Snapshot> {
        self.sync_device()?;
        let shards = self.shard_snapshot();
        let (extra, commit) = if self.holds_rank0() {
            let cfg = self.model().config().to_hf_json();
            let state = serde_json::to_value(self.trainer_state())
                .map_err(|e| WorkerError::checkpoint(root, e))?;
            let doc = |v: &serde_json::Value| {
                serde_json::to_vec_pretty(v).map_err(|e| WorkerError::checkpoint(root, e))
            };
            let params = self.model().params();
            let shapes = params
                .iter()
                .map(|(id, name, _)| (name.to_string(), params.layout_shape(id)))
                .collect();
            let manifest = Manifest {
                format: sharded::FORMAT,
                step: self.step,
                devices: self.devices(),
                files: Vec::new(),
                shapes,
                plan,
                unix_ms: (crate::trace::unix_us() / 1000.0) as u64,
            };
            (
                vec![
                    (CONFIG_FILE.to_string(), doc(&cfg)?),
                    (TRAINER_STATE_FILE.to_string(), doc(&state)?),
                ],
                Some((manifest, wait, keep)),
            )
        } else {
            (Vec::new(), None)
        };
        Ok(Snapshot {
            root: root.to_path_buf(),
            step: self.step,
            shards,
            extra,
            commit,
        })
    }

    /// Restores a trainer from the committed checkpoint in `dir` (verified: every file's size
    /// and checksum): whatever split wrote it, the tensors are reassembled and sharded for
    /// `opts` and `mesh` (see [`Trainer::new_on`]).
    pub fn restore_sharded(
        dir: &Path,
        batcher: Batcher,
        opts: TrainOptions,
        mesh: Option<Vec<LocalTransport>>,
    ) -> Result<Self> {
        let (cfg, parts) = read_checkpoint(dir)?;
        let state = Self::read_state(dir)?;
        let mut moments: BTreeMap<String, FragMoments> = parts.moments;
        Self::resume_from(
            Restored {
                cfg,
                tensors: parts.tensors,
                state,
                origin: dir,
            },
            batcher,
            opts,
            mesh,
            |name, fresh| {
                let got = moments.remove(name).ok_or_else(|| {
                    WorkerError::checkpoint(dir, format!("no moments for {name}"))
                })?;
                Ok(got.into_precision(fresh.is_bf16()))
            },
        )
    }
}

/// The configuration and whole weights of the committed checkpoint in `dir` (verified), as a
/// model directory would give them: for evaluation, export, or a new job's starting point.
pub fn load_weights(
    dir: &Path,
) -> Result<(ModelConfig, BTreeMap<String, shoal_kernels::Tensor<f32>>)> {
    let (cfg, parts) = read_checkpoint(dir)?;
    Ok((cfg, parts.tensors))
}

/// The configuration and reassembled tensors and moments of the committed checkpoint in `dir`,
/// every file verified first.
fn read_checkpoint(dir: &Path) -> Result<(ModelConfig, sharded::Assembled)> {
    let manifest = sharded::verify(dir)?;
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| WorkerError::io(&path, e))?;
    let cfg = ModelConfig::from_hf_json(&text, &path.display().to_string())?;
    Ok((cfg, sharded::read_fragments(dir, &manifest)?))
}

/// Whether `dir` is a sharded checkpoint (it has a manifest), not a model directory.
pub fn is_sharded(dir: &Path) -> bool {
    dir.join(sharded::MANIFEST_FILE).is_file()
}
