//! Checkpoints written behind training: the step loop hands a snapshot (already copied out of
//! the live state) to a writer thread and goes on; the thread writes the shards and, in the
//! process that commits, waits for the other processes' shards and writes the manifest.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sharded::{self, DeviceShard, Manifest};
use crate::{Result, WorkerError};

/// One checkpoint to write.
#[derive(Debug)]
pub struct Snapshot {
    /// The checkpoints' root (`<job dir>/checkpoints`).
    pub root: PathBuf,
    /// Optimizer steps taken.
    pub step: u64,
    /// This process's devices' shards.
    pub shards: Vec<DeviceShard>,
    /// Documents this process writes beside them (name, bytes).
    pub extra: Vec<(String, Vec<u8>)>,
    /// In the process that commits: the manifest to write once every device's shard is there
    /// (its files are filled in), how long to wait for them, and how many checkpoints to keep.
    pub commit: Option<(Manifest, Duration, usize)>,
}

/// A checkpoint written.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    /// Its step.
    pub step: u64,
    /// Its directory.
    pub dir: PathBuf,
    /// Bytes this process wrote.
    pub bytes: u64,
    /// Seconds the writer took, from the hand-off to the last file (the manifest, if this
    /// process commits).
    pub seconds: f64,
    /// Whether this process wrote the manifest.
    pub committed: bool,
}

/// The writer thread and its queue (at most one checkpoint in flight).
pub struct BackgroundWriter {
    tx: Option<mpsc::SyncSender<Snapshot>>,
    done: mpsc::Receiver<(u64, Result<Written>)>,
    cancel: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    in_flight: usize,
}

impl BackgroundWriter {
    /// Starts the writer thread (named `checkpoint-writer`).
    pub fn start() -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Snapshot>(1);
        let (done_tx, done) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for snap in rx {
                    let step = snap.step;
                    let dir = sharded::step_dir(&snap.root, step);
                    let commits = snap.commit.is_some();
                    let r = write(snap, &flag);
                    if r.is_err() && commits && !dir.join(sharded::MANIFEST_FILE).is_file() {
                        // No half-written checkpoint stays behind.
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    if done_tx.send((step, r)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| WorkerError::invalid("checkpoint", format!("no writer thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            done,
            cancel,
            handle: Some(handle),
            in_flight: 0,
        })
    }

    /// Hands a snapshot over. If the previous checkpoint is still being written, waits for it
    /// first (so at most one snapshot is held besides the live state); returns what finished.
    pub fn submit(&mut self, snap: Snapshot) -> Vec<(u64, Result<Written>)> {
        let mut out = self.finish();
        let step = snap.step;
        match &self.tx {
            Some(tx) if tx.send(snap).is_ok() => self.in_flight += 1,
            _ => out.push((
                step,
                Err(WorkerError::invalid(
                    "checkpoint",
                    "the writer thread has stopped",
                )),
            )),
        }
        out
    }

    /// What finished since the last call, without waiting.
    pub fn poll(&mut self) -> Vec<(u64, Result<Written>)> {
        let mut out = Vec::new();
        while let Ok(r) = self.done.try_recv() {
            self.in_flight -= 1;
            out.push(r);
        }
        out
    }

    /// Waits for everything handed over.
    pub fn finish(&mut self) -> Vec<(u64, Result<Written>)> {
        let mut out = self.poll();
        while self.in_flight > 0 {
            match self.done.recv() {
                Ok(r) => {
                    self.in_flight -= 1;
                    out.push(r);
                }
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for BackgroundWriter {
    /// Cancels what is in flight (a checkpoint without a manifest is not one) and joins.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn write(snap: Snapshot, cancel: &AtomicBool) -> Result<Written> {
    let started = Instant::now();
    let dir = sharded::step_dir(&snap.root, snap.step);
    let files = sharded::write_part(&dir, &snap.shards, &snap.extra, cancel)?;
    let bytes = files.iter().map(|f| f.bytes).sum();
    let committed = match snap.commit {
        Some((manifest, wait, keep)) => {
            sharded::commit(&dir, manifest, wait, cancel)?;
            let removed = sharded::prune(&snap.root, keep)?;
            tracing::info!(
                step = snap.step,
                dir = %dir.display(),
                removed = removed.len(),
                "checkpoint committed"
            );
            true
        }
        None => false,
    };
    Ok(Written {
        step: snap.step,
        dir,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        committed,
    })
}
