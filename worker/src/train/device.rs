//! Training on a compute backend. A [`Trainer`] with a device attached runs each step's forward,
//! backward, clipping, AdamW and bias update on the device ([`DeviceModel`]), and the state stays
//! there between steps. [`Trainer::sync_device`] copies the parameters, expert biases and AdamW
//! moments back into the trainer's host model and optimizer state, as the CPU path would hold
//! them; checkpoints sync first, so they, resumption and every report read the same state (and a
//! run resumed on the CPU, or on another device, continues from it).
//!
//! Which runs can: one data-parallel rank in this process, no pipeline or expert parallelism,
//! any precision and moments ([`Trainer::device_eligibility`] says why not).

use std::time::Instant;

use shoal_kernels::backend::Backend;
use shoal_kernels::ops::adamw::{AdamWState, Moments};

use super::{StepMetrics, Trainer, max_violation};
use crate::model::device::{DeviceModel, DeviceStep, StepHyper};
use crate::model::params::ParamId;
use crate::model::{Model, TokenBatch};
use crate::{Result, WorkerError};

/// A model whose steps run on a compute backend (object-safe over the backend type).
pub trait DeviceStepper: Send {
    /// What computes.
    fn describe(&self) -> String;
    /// One optimizer step.
    fn step(&mut self, b: &TokenBatch<'_>, h: &StepHyper) -> Result<DeviceStep>;
    /// Copies the parameters into `model`.
    fn params_into(&self, model: &mut Model<f32>) -> Result<()>;
    /// The AdamW steps taken and every trainable parameter's moments.
    fn moments(&self) -> Result<(u64, Vec<(ParamId, Moments)>)>;
    /// Replaces the AdamW state.
    fn set_moments(&mut self, step: u64, moments: &[(ParamId, &Moments)]) -> Result<()>;
}

impl<B: Backend + 'static> DeviceStepper for DeviceModel<B> {
    fn describe(&self) -> String {
        self.backend().describe()
    }

    fn step(&mut self, b: &TokenBatch<'_>, h: &StepHyper) -> Result<DeviceStep> {
        self.train_step(b, h)
    }

    fn params_into(&self, model: &mut Model<f32>) -> Result<()> {
        DeviceModel::params_into(self, model)
    }

    fn moments(&self) -> Result<(u64, Vec<(ParamId, Moments)>)> {
        DeviceModel::moments(self)
    }

    fn set_moments(&mut self, step: u64, moments: &[(ParamId, &Moments)]) -> Result<()> {
        DeviceModel::set_moments(self, step, moments)
    }
}

impl Trainer {
    /// Why this run cannot train on a device (`None`: it can).
    pub fn device_eligibility(&self) -> Option<String> {
        let o = &self.opts;
        if self.devices() != 1 || o.dp != 1 {
            return Some(format!(
                "{} data-parallel ranks: the device step runs one",
                o.dp.max(self.devices())
            ));
        }
        if o.pipeline.is_some() {
            return Some("pipeline parallelism runs on the cpu path".into());
        }
        if o.ep != 1 {
            return Some("expert parallelism runs on the cpu path".into());
        }
        None
    }

    /// Trains every following step on `device` (made from this trainer's current model), after
    /// giving it this trainer's optimizer state. Fails, leaving the trainer on the CPU, when the
    /// run is not eligible (see [`Self::device_eligibility`]).
    pub fn attach_device(&mut self, mut device: Box<dyn DeviceStepper>) -> Result<()> {
        if let Some(why) = self.device_eligibility() {
            return Err(WorkerError::invalid("device", why));
        }
        // A device already attached hands over its state, not a stale host copy.
        self.sync_device()?;
        let states = self.param_moments()?;
        let step = states.first().map_or(0, |(_, s)| s.step);
        let moments: Vec<(ParamId, &Moments)> =
            states.iter().map(|(id, s)| (*id, &s.moments)).collect();
        device.set_moments(step, &moments)?;
        tracing::info!(device = %device.describe(), step = self.step, "training on the device");
        self.device = Some(device);
        Ok(())
    }

    /// What computes this trainer's steps, when a device does.
    pub fn device(&self) -> Option<String> {
        self.device.as_ref().map(|d| d.describe())
    }

    /// [`Trainer::train_step`] on the attached device.
    pub(super) fn device_train_step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let _span = tracing::debug_span!("step", step = self.step + 1).entered();
        let batch = self.batcher.next_batch();
        let tb = super::tokens_of(&batch);
        let h = self.opts.step_hyper(self.step);
        let device = self
            .device
            .as_mut()
            .ok_or_else(|| WorkerError::invalid("device", "no device attached"))?;
        let r = device.step(&tb, &h)?;
        self.host_behind = true;
        self.step += 1;
        let out = r.out;
        let mtp = super::mean_mtp(&out);
        let seconds = t0.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.step,
            loss: out.loss,
            main_loss: out.main_loss,
            mtp_loss: mtp,
            balance_loss: out.balance_loss,
            grad_norm: r.grad_norm,
            lr: h.lr,
            max_vio: out.expert_loads.iter().map(|l| max_violation(l)).collect(),
            expert_loads: out.expert_loads,
            bubble_s: 0.0,
            tokens: out.tokens,
            seconds,
            busy_s: seconds,
            bytes_sent: 0,
            comm: Default::default(),
            exposed_comm_s: 0.0,
            max_target_nodes: 0,
            wire_s: 0.0,
        })
    }

    /// Debug builds: fails if `what` reads the host copy while the device is ahead of it.
    pub(super) fn assert_host_current(&self, what: &str) {
        debug_assert!(
            !self.host_behind,
            "Trainer::{what} read the host copy before sync_device"
        );
    }

    /// Brings the host copy up to date with the device: parameters, expert biases and AdamW
    /// moments, as the CPU path would hold them after the same steps. Checkpoints call it; a
    /// no-op when nothing has stepped since the last sync or no device is attached.
    pub fn sync_device(&mut self) -> Result<()> {
        let Some(device) = self.device.as_ref().filter(|_| self.host_behind) else {
            return Ok(());
        };
        let _span = tracing::debug_span!("device.sync", step = self.step).entered();
        device.params_into(&mut self.replicas[0].model)?;
        let (steps, moments) = device.moments()?;
        let states: Vec<(ParamId, AdamWState)> = moments
            .into_iter()
            .map(|(id, moments)| {
                (
                    id,
                    AdamWState {
                        moments,
                        step: steps,
                    },
                )
            })
            .collect();
        self.set_param_moments(&states)?;
        self.host_behind = false;
        Ok(())
    }
}
