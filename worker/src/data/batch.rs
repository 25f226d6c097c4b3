//! Windows, shuffled training batches and sequential evaluation batches.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::TokenSource;
use super::seeded_rng;
use crate::{Result, WorkerError};

/// A batch of windows: `batch` rows of `seq_len` inputs and the targets, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Number of rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Input ids, `[batch * seq_len]`: row `r` is the first `seq_len` tokens of its window.
    pub inputs: Vec<u32>,
    /// Target ids, `[batch * seq_len]`: row `r` is the last `seq_len` tokens of its window, so
    /// `targets[r][t]` is the token that follows `inputs[r][t]`.
    pub targets: Vec<u32>,
    /// The window index of each row (window `i` starts at token `i * (seq_len + 1)`).
    pub window_ids: Vec<usize>,
}

impl Batch {
    fn with_capacity(rows: usize, seq_len: usize) -> Self {
        Self {
            batch: 0,
            seq_len,
            inputs: Vec::with_capacity(rows * seq_len),
            targets: Vec::with_capacity(rows * seq_len),
            window_ids: Vec::with_capacity(rows),
        }
    }

    fn push_window(&mut self, source: &TokenSource, window: usize) {
        let start = window * (self.seq_len + 1);
        source.extend_into(start..start + self.seq_len, &mut self.inputs);
        source.extend_into(start + 1..start + self.seq_len + 1, &mut self.targets);
        self.window_ids.push(window);
        self.batch += 1;
    }
}

/// Where a [`Batcher`] stands: the epoch, and the index within that epoch's shuffled order of
/// the next window to serve. Save it with a checkpoint and restore it with [`Batcher::seek`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DataPosition {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Index of the next window within the epoch's order, `0..windows`.
    pub index: u64,
}

/// Number of windows of `seq_len + 1` tokens in `source`, refusing a zero `seq_len` and a source
/// shorter than one window.
fn count_windows(source: &TokenSource, seq_len: usize) -> Result<usize> {
    if seq_len == 0 {
        return Err(WorkerError::invalid("seq_len", "must be positive"));
    }
    let Some(need) = seq_len.checked_add(1) else {
        return Err(WorkerError::invalid("seq_len", "too large"));
    };
    let have = source.len();
    if have < need {
        return Err(WorkerError::data(
            source.name(),
            format!("has {have} tokens, shorter than one sequence of seq_len + 1 = {need} tokens"),
        ));
    }
    Ok(have / need)
}

/// Refuses a zero batch, and one whose `batch * seq_len` tokens overflow.
fn check_batch(batch: usize, seq_len: usize) -> Result<()> {
    if batch == 0 {
        return Err(WorkerError::invalid("batch", "must be positive"));
    }
    if batch.checked_mul(seq_len).is_none() {
        return Err(WorkerError::invalid(
            "batch",
            format!("{batch} rows of {seq_len} tokens overflow"),
        ));
    }
    Ok(())
}

/// The order of the windows in epoch `epoch`: a permutation of `0..windows` that depends on
/// `(seed, epoch)` alone.
fn epoch_order(seed: u64, epoch: u64, windows: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..windows).collect();
    order.shuffle(&mut seeded_rng(seed, epoch, b"shoal data order"));
    order
}

/// Serves training batches of shuffled windows from a [`TokenSource`], epoch after epoch.
///
/// Each epoch visits every window once, in an order drawn from `(seed, epoch)`; when an epoch's
/// windows run out the next epoch begins, within a batch if need be.
#[derive(Debug, Clone)]
pub struct Batcher {
    source: TokenSource,
    seq_len: usize,
    batch: usize,
    seed: u64,
    windows: usize,
    epoch: u64,
    /// Index into `order` of the next window; `windows` once the epoch is spent.
    index: usize,
    order: Vec<usize>,
}

impl Batcher {
    /// A batcher of `batch` windows of `seq_len + 1` tokens a batch, shuffled by `seed`, at the
    /// start of epoch 0.
    ///
    /// Errors: `seq_len` or `batch` zero; a source shorter than `seq_len + 1` tokens (naming the
    /// source and both lengths).
    pub fn new(source: TokenSource, seq_len: usize, batch: usize, seed: u64) -> Result<Self> {
        check_batch(batch, seq_len)?;
        let windows = count_windows(&source, seq_len)?;
        Ok(Self {
            source,
            seq_len,
            batch,
            seed,
            windows,
            epoch: 0,
            index: 0,
            order: epoch_order(seed, 0, windows),
        })
    }

    /// Number of windows in an epoch.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// Tokens per row.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Rows per batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// The shuffling seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The token source.
    pub fn source(&self) -> &TokenSource {
        &self.source
    }

    /// The next batch of `batch` windows, moving on to the next epoch when this one runs out.
    pub fn next_batch(&mut self) -> Batch {
        let mut out = Batch::with_capacity(self.batch, self.seq_len);
        for _ in 0..self.batch {
            if self.index >= self.windows {
                self.start_epoch(self.epoch.wrapping_add(1));
            }
            let window = self.order[self.index];
            self.index += 1;
            out.push_window(&self.source, window);
        }
        out
    }

    /// Where the batcher stands: the next window to be served. A spent epoch reads as the start
    /// of the next one.
    pub fn position(&self) -> DataPosition {
        if self.index >= self.windows {
            DataPosition {
                epoch: self.epoch.wrapping_add(1),
                index: 0,
            }
        } else {
            DataPosition {
                epoch: self.epoch,
                index: self.index as u64,
            }
        }
    }

    /// Moves to `pos`, as saved by [`Batcher::position`] of a batcher over the same source,
    /// `seq_len` and seed; the batches that follow are those the saving batcher would have served.
    ///
    /// Errors: an index past the windows of an epoch (`index == windows` is taken as the start
    /// of the next epoch).
    pub fn seek(&mut self, pos: DataPosition) -> Result<()> {
        let index = usize::try_from(pos.index)
            .ok()
            .filter(|&i| i <= self.windows)
            .ok_or_else(|| {
                WorkerError::invalid(
                    "data position",
                    format!(
                        "index {} is past the {} windows of an epoch of {}",
                        pos.index,
                        self.windows,
                        self.source.name()
                    ),
                )
            })?;
        let (epoch, index) = if index == self.windows {
            (pos.epoch.wrapping_add(1), 0)
        } else {
            (pos.epoch, index)
        };
        if epoch != self.epoch {
            self.start_epoch(epoch);
        }
        self.index = index;
        Ok(())
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.index = 0;
        self.order = epoch_order(self.seed, epoch, self.windows);
    }
}

/// Every window of `source` once, in file order, in batches of up to `batch` windows (the last
/// may be smaller): for evaluation.
///
/// Errors: `seq_len` or `batch` zero; a source shorter than `seq_len + 1` tokens.
pub fn sequential_batches(
    source: &TokenSource,
    seq_len: usize,
    batch: usize,
) -> Result<SequentialBatches<'_>> {
    check_batch(batch, seq_len)?;
    let windows = count_windows(source, seq_len)?;
    Ok(SequentialBatches {
        source,
        seq_len,
        batch,
        windows,
        next: 0,
    })
}

/// The iterator of [`sequential_batches`].
#[derive(Debug, Clone)]
pub struct SequentialBatches<'a> {
    source: &'a TokenSource,
    seq_len: usize,
    batch: usize,
    windows: usize,
    next: usize,
}

impl SequentialBatches<'_> {
    /// Total number of windows served over the whole iteration.
    pub fn windows(&self) -> usize {
        self.windows
    }
}

impl Iterator for SequentialBatches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.windows {
            return None;
        }
        let rows = self.batch.min(self.windows - self.next);
        let mut out = Batch::with_capacity(rows, self.seq_len);
        for window in self.next..self.next + rows {
            out.push_window(self.source, window);
        }
        self.next += rows;
        Some(out)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.windows - self.next).div_ceil(self.batch);
        (left, Some(left))
    }
}

impl ExactSizeIterator for SequentialBatches<'_> {}
