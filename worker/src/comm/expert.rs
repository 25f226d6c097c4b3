//! The expert-parallel exchange over a [`Transport`]: the all-to-all behind MoE dispatch and
//! combine.
//!
//! The `n`-th exchange of a step is tagged `seq = n` on every member (members run the same
//! layers and micro-batches in the same order), so frames of different layers, micro-batches or
//! directions never mix; a member that falls out of step times out naming the exchange.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::transport::{CommOp, Tag, Transport};
use crate::model::ep::{ExchangePhase, ExpertExchange};
use crate::{Result, WorkerError};

/// One rank's end of its expert-parallel group for one step.
pub struct EpLink<'t> {
    transport: Mutex<&'t mut dyn Transport>,
    /// Mesh ranks of the group's members, in member order.
    group: Vec<usize>,
    me: usize,
    step: u64,
    next: AtomicU64,
}

impl<'t> EpLink<'t> {
    /// The exchange of the member at `position` of `group` (mesh ranks) during `step`.
    pub fn new(
        transport: &'t mut dyn Transport,
        group: Vec<usize>,
        position: usize,
        step: u64,
    ) -> Result<Self> {
        if group.get(position) != Some(&transport.rank()) {
            return Err(WorkerError::invalid(
                "ep",
                format!(
                    "rank {} is not member {position} of the group {group:?}",
                    transport.rank()
                ),
            ));
        }
        Ok(Self {
            transport: Mutex::new(transport),
            group,
            me: position,
            step,
            next: AtomicU64::new(0),
        })
    }

    /// Exchanges run so far.
    pub fn exchanges(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for EpLink<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpLink")
            .field("group", &self.group)
            .field("me", &self.me)
            .field("step", &self.step)
            .finish()
    }
}

/// An endpoint that several parts of a rank's thread use in turn: a pipeline rank's transfers
/// to its neighbours share it with the rank's expert exchanges.
pub(crate) trait SharedEndpoint: Sync {
    /// Sends `frame` to mesh rank `to`.
    fn send_to(&self, to: usize, tag: Tag, frame: Vec<u8>) -> Result<()>;
    /// Waits for the frame `tag` from mesh rank `from`.
    fn recv_from(&self, from: usize, tag: Tag) -> Result<Vec<u8>>;
}

impl<'t> EpLink<'t> {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, &'t mut dyn Transport>> {
        self.transport
            .lock()
            .map_err(|_| WorkerError::invalid("ep", "the transport's lock was poisoned"))
    }
}

impl SharedEndpoint for EpLink<'_> {
    fn send_to(&self, to: usize, tag: Tag, frame: Vec<u8>) -> Result<()> {
        self.lock()?.send(to, tag, frame)
    }

    fn recv_from(&self, from: usize, tag: Tag) -> Result<Vec<u8>> {
        self.lock()?.recv(from, tag)
    }
}

impl ExpertExchange for EpLink<'_> {
    fn ep(&self) -> usize {
        self.group.len()
    }

    fn position(&self) -> usize {
        self.me
    }

    fn exchange(&self, phase: ExchangePhase, mut frames: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if frames.len() != self.group.len() {
            return Err(WorkerError::invalid(
                "ep",
                format!(
                    "{} frames for a group of {}",
                    frames.len(),
                    self.group.len()
                ),
            ));
        }
        let tag = Tag {
            step: self.step,
            op: match phase {
                ExchangePhase::Dispatch => CommOp::Dispatch,
                ExchangePhase::Combine => CommOp::Combine,
            },
            seq: self.next.fetch_add(1, Ordering::Relaxed),
        };
        let _span = tracing::debug_span!("all_to_all", op = %tag.op, seq = tag.seq).entered();
        let mut t = self.lock()?;
        let own = std::mem::take(&mut frames[self.me]);
        for (q, frame) in frames.into_iter().enumerate() {
            if q != self.me {
                t.send(self.group[q], tag, frame)?;
            }
        }
        let mut out = Vec::with_capacity(self.group.len());
        let mut own = Some(own);
        for (q, &peer) in self.group.iter().enumerate() {
            if q == self.me {
                out.push(own.take().unwrap_or_default());
            } else {
                out.push(t.recv(peer, tag)?);
            }
        }
        Ok(out)
    }
}
