//! The coordinator's persistent store: a small key-value interface with revisions, so that jobs
//! and nodes survive a coordinator restart and concurrent writers can compare-and-set.
//!
//! Two backends implement [`Store`] and pass the same conformance suite ([`conformance`]): the
//! embedded store ([`EmbeddedStore`], one file through `redb`; the default, so the main job needs
//! no server) and etcd (`EtcdStore`, feature `etcd`; keys under a prefix, revisions are etcd's
//! `mod_revision`, compare-and-set is a transaction).
//!
//! Key layout (the same in every backend; etcd puts the coordinator's prefix, `shoal/` by
//! default, in front of each):
//! - `jobs/<id>`: a job record (JSON: spec, state, reason, history, placement);
//! - `nodes/<name>`: a node record (JSON: devices, topology, epoch, state);
//! - `live/<name>`: present while the node's session is alive (JSON: `{"epoch": N}`), written
//!   with [`Store::put_ephemeral`]: its lease's TTL is twice the heartbeat timeout plus three
//!   heartbeat intervals, the coordinator renews it on the node's heartbeats (at most every
//!   third of the TTL) and revokes it when the session ends, so the store itself shows which
//!   nodes are alive and a dead coordinator's nodes expire.
//!
//! Every write bumps a store-wide revision; a key's revision is the store revision of its last
//! write, as etcd's `mod_revision`. A deletion (by [`Store::delete`], a revoked lease or an
//! expired one) bumps it too, and [`Store::watch`] reports puts and deletions under a prefix in
//! revision order.
//!
//! Ephemeral keys: each [`Store::put_ephemeral`] grants a new lease with a TTL and attaches the
//! key to it; the key is deleted when the lease is revoked or when the TTL passes without a
//! [`Store::keep_alive`]. An ordinary write of the key detaches it from its lease (as in etcd).
//! etcd counts TTLs in whole seconds (and raises short ones to its minimum, 2 s by default); the
//! embedded store keeps them exactly, in memory, on tokio's clock, and drops leftover ephemeral
//! keys when it is opened (their leases died with the process that held them).

pub mod conformance;
mod embedded;
#[cfg(feature = "etcd")]
mod etcd;

pub use embedded::EmbeddedStore;
#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::Result;

/// A value and the store revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The bytes.
    pub value: Vec<u8>,
    /// Revision of the write that stored them.
    pub revision: u64,
}

/// What a compare-and-set expects of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist at this revision.
    Revision(u64),
}

/// A lease, as the store granted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key written by [`Store::put_ephemeral`]: its lease and the revision of the write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ephemeral {
    /// The lease the key is attached to.
    pub lease: LeaseId,
    /// Revision of the write.
    pub revision: u64,
}

/// A change under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// `key` was written.
    Put {
        /// The key (without the backend's prefix).
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// Revision of the write.
        revision: u64,
    },
    /// `key` was deleted (explicitly, or with its lease).
    Delete {
        /// The key.
        key: String,
        /// Revision of the deletion.
        revision: u64,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { revision, .. } | WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// The changes under a prefix from the moment [`Store::watch`] returned, in revision order.
/// Dropping it ends the watch.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Result<WatchEvent>>,
}

impl Watch {
    /// A watch fed by `rx` (the backend's forwarding task holds the sender).
    pub(crate) fn new(rx: mpsc::Receiver<Result<WatchEvent>>) -> Self {
        Self { rx }
    }

    /// The next change; an error (the watch fell behind, the connection was lost) is the last
    /// item, and `None` means the watch ended. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        self.rx.recv().await
    }
}

/// Buffer between a backend's watch and its reader.
pub(crate) const WATCH_BUFFER: usize = 256;

/// A key-value store with revisions. Implementations are cheap to clone handles.
pub trait Store: Clone + Send + Sync + 'static {
    /// The value under `key`.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>>> + Send;
    /// Stores `value` under `key`; returns the new revision.
    fn put(&self, key: &str, value: Vec<u8>) -> impl Future<Output = Result<u64>> + Send;
    /// Stores `value` only if `key` is as `expect` says. Returns `Ok(new revision)`, or
    /// `Err(current)` (the key's value now, `None` if absent) when the expectation failed.
    fn compare_and_set(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<Result<u64, Option<Versioned>>>> + Send;
    /// Removes `key`; returns whether it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<(String, Versioned)>>> + Send;
    /// Stores `value` under `key`, attached to a new lease of `ttl`: the key is deleted when the
    /// lease is revoked, or when `ttl` passes without a [`Store::keep_alive`].
    fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Ephemeral>> + Send;
    /// [`Store::put_ephemeral`] only if `key` does not exist: `None` (and no lease left behind)
    /// when it does. Two callers racing for one key: exactly one gets it (a leader election).
    fn create_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Ephemeral>>> + Send;
    /// Restarts `lease`'s TTL; `false` if it is gone (expired or revoked).
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<bool>> + Send;
    /// Ends `lease` and deletes its keys; `false` if it was already gone.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<bool>> + Send;
    /// The puts and deletions of keys starting with `prefix` from now on, in revision order.
    fn watch(&self, prefix: &str) -> impl Future<Output = Result<Watch>> + Send;
}
