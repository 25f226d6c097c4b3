//! What every layer needs to know about the current micro-batch.

use shoal_kernels::ops::linear::Precision;
use shoal_kernels::ops::rope::{RopeLayout, RopeTable};

use super::ep::ExpertExchange;

/// Shape and settings of the micro-batch a layer runs on.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    /// Sequences in the micro-batch.
    pub batch: usize,
    /// Tokens per sequence (rows of activations are `batch * seq`, sequence-major).
    pub seq: usize,
    /// Arithmetic of the linear layers.
    pub precision: Precision,
    /// RoPE cos/sin table.
    pub rope: &'a RopeTable,
    /// RoPE pair layout.
    pub rope_layout: RopeLayout,
    /// Attention softmax scale (1/sqrt(qk head dim), times the YaRN factor).
    pub softmax_scale: f64,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Weight of the sequence-wise balance loss.
    pub balance_alpha: f64,
    /// With expert parallelism: the group's exchange (MoE layers compute only this rank's
    /// routed experts and reach the others' through it).
    pub experts: Option<&'a dyn ExpertExchange>,
}

impl Ctx<'_> {
    /// The same context for sequences of another length (MTP depths shorten them).
    pub fn with_seq(self, seq: usize) -> Self {
        Self { seq, ..self }
    }

    /// Rows of activations: `batch * seq`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}
