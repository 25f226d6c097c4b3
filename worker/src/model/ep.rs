//! Expert parallelism as the model sees it: a rank computes the routed experts it owns, and
//! reaches the others' through an [`ExpertExchange`].
//!
//! The `ep` members of an expert-parallel group hold `n_routed_experts / ep` consecutive routed
//! experts each (member `p` holds experts `p * per .. (p + 1) * per`); the router, the bias,
//! the shared experts and attention stay with every member. An exchange is an all-to-all: each
//! member hands one frame to every member (itself included) and gets one from each. Members run
//! the same layers in the same order, so the `n`-th exchange of one member meets the `n`-th of
//! the others.

use std::fmt;

use shoal_kernels::ops::linear::Precision;

use crate::Result;
use crate::comm::wire::RowCodec;

/// Which half of an all-to-all a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangePhase {
    /// Tokens (forward) or output gradients (backward) to the experts' owners.
    Dispatch,
    /// Expert outputs (forward) or input gradients (backward) back to the tokens' ranks.
    Combine,
}

/// One rank's view of its expert-parallel group.
pub trait ExpertExchange: Sync + fmt::Debug {
    /// Members of the group.
    fn ep(&self) -> usize;
    /// This rank's position in the group.
    fn position(&self) -> usize;
    /// Hands `frames[q]` to member `q` (this member's own frame comes straight back) and returns
    /// the frame each member handed to this one, in member order.
    fn exchange(&self, phase: ExchangePhase, frames: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;

    /// Dispatch: hands member `q` the frame of this rank's tokens `rows[q]` (ascending token
    /// indices; `encode` makes the frame of any such list, each row encoded on its own) and
    /// returns the frame each member handed this one, in member order. By default every member
    /// gets its frame directly; a node-aware exchange sends each token once to each other node
    /// and forwards it inside the node (see [`crate::comm::expert`]), with the same frames
    /// arriving.
    fn dispatch(
        &self,
        rows: &[Vec<usize>],
        encode: &mut dyn FnMut(&[usize]) -> Result<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        let frames = rows.iter().map(|r| encode(r)).collect::<Result<Vec<_>>>()?;
        self.all_to_all(ExchangePhase::Dispatch, frames)
    }

    /// Tells the other ranks of the mesh to stop waiting: this rank has failed (a no-op where
    /// nothing waits on this rank).
    fn abort(&self) {}

    /// [`Self::exchange`], checking that one frame came back per member.
    fn all_to_all(&self, phase: ExchangePhase, frames: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let got = self.exchange(phase, frames)?;
        if got.len() != self.ep() {
            return Err(crate::WorkerError::invalid(
                "expert exchange",
                format!("{} frames from a group of {}", got.len(), self.ep()),
            ));
        }
        Ok(got)
    }
}

/// How token rows travel in a precision mode: FP8 dispatch and BF16 combine in FP8 runs (the
/// report's choice), BF16 both ways in BF16 runs, FP32 in FP32 runs (so an FP32 run computes
/// what one device computes).
pub fn dispatch_codec(p: Precision) -> RowCodec {
    match p {
        Precision::Fp8 => RowCodec::Fp8 { pow2_scales: false },
        Precision::Bf16 => RowCodec::Bf16,
        Precision::Fp32 => RowCodec::F32,
    }
}

/// Whether combine frames (and the gradients of the backward dispatch) carry FP32 rather than
/// BF16.
pub fn combine_full(p: Precision) -> bool {
    p == Precision::Fp32
}
