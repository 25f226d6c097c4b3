//! The coordinator's persistent store: a small key-value interface with revisions, so that jobs
//! and nodes survive a coordinator restart and concurrent writers can compare-and-set.
//!
//! Two backends implement [`Store`] and pass the same conformance suite ([`conformance`]): the
//! embedded store ([`EmbeddedStore`], one file through `redb`; the default, so the main job needs
//! no server) and etcd (`EtcdStore`, feature `etcd`; keys under a prefix, revisions are etcd's
//! `mod_revision`, compare-and-set is a transaction).
//!
//! Key layout (the same in every backend):
//! - `jobs/<id>`: a job record (JSON: spec, state, reason, history);
//! - `jobs-seq`: the last job sequence number, for ids;
//! - `nodes/<name>`: a node record (with the membership work).
//!
//! Every write bumps a store-wide revision; a key's revision is the store revision of its last
//! write, as etcd's `mod_revision`.

pub mod conformance;
mod embedded;
#[cfg(feature = "etcd")]
mod etcd;

pub use embedded::EmbeddedStore;
#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;

use std::future::Future;

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
}
