//! The embedded store: one `redb` database file. Calls run on tokio's blocking pool, never on the
//! async worker threads.
//!
//! Leases live in memory on tokio's clock (so tests with paused time control them): each has an
//! expiry task that deletes its key when the TTL passes without a keep-alive. Ephemeral keys are
//! also recorded in the file (table `ephemeral`, key -> lease), so that an ordinary write can
//! detach a key from its lease and so that [`EmbeddedStore::open`] can drop the keys a previous
//! process left behind. Watchers hear of changes through a broadcast channel; a write and its
//! events go out under one lock, so every watcher sees them in revision order.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::{Ephemeral, Expect, LeaseId, Store, Versioned, WATCH_BUFFER, Watch, WatchEvent};
use crate::{CoordinatorError, Result};

/// Key -> (revision, value).
const DATA: TableDefinition<'_, &str, (u64, &[u8])> = TableDefinition::new("data");
/// "revision" -> the store revision.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// Ephemeral key -> the lease it is attached to.
const EPHEMERAL: TableDefinition<'_, &str, i64> = TableDefinition::new("ephemeral");

/// Events a slow watcher may fall behind by before its watch ends with an error.
const EVENT_BACKLOG: usize = 4096;

/// A store in one local file.
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    /// Held from the start of a write transaction until its events are sent.
    events: Mutex<broadcast::Sender<WatchEvent>>,
    leases: Mutex<Leases>,
}

#[derive(Debug, Default)]
struct Leases {
    next: i64,
    live: HashMap<i64, Lease>,
}

#[derive(Debug)]
struct Lease {
    key: String,
    ttl: Duration,
    deadline: Instant,
}

fn store_err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Store(e.to_string())
}

/// Locks `m`; a panic elsewhere while it was held leaves plain data behind, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating it if absent. Ephemeral keys left by an earlier
    /// process are deleted (their leases ended with it).
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| CoordinatorError::Store(format!("{}: {e}", parent.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| CoordinatorError::Store(format!("{}: {e}", path.display())))?;
        // Create the tables so that readers never meet a missing one.
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(DATA).map_err(store_err)?;
        tx.open_table(META).map_err(store_err)?;
        let leftover = {
            let mut eph = tx.open_table(EPHEMERAL).map_err(store_err)?;
            let mut keys = Vec::new();
            for entry in eph.iter().map_err(store_err)? {
                let (k, _) = entry.map_err(store_err)?;
                keys.push(k.value().to_string());
            }
            for k in &keys {
                eph.remove(k.as_str()).map_err(store_err)?;
            }
            keys
        };
        if !leftover.is_empty() {
            {
                let mut data = tx.open_table(DATA).map_err(store_err)?;
                for k in &leftover {
                    data.remove(k.as_str()).map_err(store_err)?;
                }
            }
            next_revision(&tx)?;
            tracing::info!(
                keys = leftover.len(),
                "dropped ephemeral keys of an earlier process"
            );
        }
        tx.commit().map_err(store_err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                events: Mutex::new(broadcast::channel(EVENT_BACKLOG).0),
                leases: Mutex::new(Leases::default()),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| CoordinatorError::Store(format!("store task: {e}")))?
    }

    /// Writes `key` attached to a new lease of `ttl`; with `only_if_absent`, only if the key
    /// does not exist (`None` then, and no lease).
    async fn ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
        only_if_absent: bool,
    ) -> Result<Option<Ephemeral>> {
        let id = {
            let mut leases = lock(&self.inner.leases);
            leases.next += 1;
            leases.next
        };
        let k = key.to_string();
        let revision = self
            .blocking(move |inner| {
                // One write transaction at a time: the check and the write are atomic.
                write_txn(inner, |tx, ev| {
                    if only_if_absent
                        && tx
                            .open_table(DATA)
                            .map_err(store_err)?
                            .get(k.as_str())
                            .map_err(store_err)?
                            .is_some()
                    {
                        return Ok(None);
                    }
                    write(tx, ev, &k, &value, Some(id)).map(Some)
                })
            })
            .await?;
        let Some(revision) = revision else {
            return Ok(None);
        };
        let deadline = Instant::now() + ttl;
        lock(&self.inner.leases).live.insert(
            id,
            Lease {
                key: key.to_string(),
                ttl,
                deadline,
            },
        );
        tokio::spawn(expire(Arc::downgrade(&self.inner), id, deadline));
        Ok(Some(Ephemeral {
            lease: LeaseId(id),
            revision,
        }))
    }
}

/// Runs `f` in one write transaction; after the commit, sends the events it recorded.
fn write_txn<T>(
    inner: &Inner,
    f: impl FnOnce(&WriteTransaction, &mut Vec<WatchEvent>) -> Result<T>,
) -> Result<T> {
    let sender = lock(&inner.events);
    let tx = inner.db.begin_write().map_err(store_err)?;
    let mut events = Vec::new();
    let out = f(&tx, &mut events)?;
    tx.commit().map_err(store_err)?;
    for ev in events {
        // No receiver is not an error: nobody watches.
        let _ = sender.send(ev);
    }
    Ok(out)
}

/// Bumps the store revision in `tx`; returns the new one.
fn next_revision(tx: &WriteTransaction) -> Result<u64> {
    let mut meta = tx.open_table(META).map_err(store_err)?;
    let rev = meta
        .get("revision")
        .map_err(store_err)?
        .map_or(0, |v| v.value())
        + 1;
    meta.insert("revision", rev).map_err(store_err)?;
    Ok(rev)
}

/// Writes `value` under `key` in `tx` with the next store revision, attached to `lease` (or to
/// none); returns the revision.
fn write(
    tx: &WriteTransaction,
    events: &mut Vec<WatchEvent>,
    key: &str,
    value: &[u8],
    lease: Option<i64>,
) -> Result<u64> {
    let rev = next_revision(tx)?;
    let mut data = tx.open_table(DATA).map_err(store_err)?;
    data.insert(key, (rev, value)).map_err(store_err)?;
    let mut eph = tx.open_table(EPHEMERAL).map_err(store_err)?;
    match lease {
        Some(l) => {
            eph.insert(key, l).map_err(store_err)?;
        }
        None => {
            eph.remove(key).map_err(store_err)?;
        }
    }
    events.push(WatchEvent::Put {
        key: key.to_string(),
        value: value.to_vec(),
        revision: rev,
    });
    Ok(rev)
}

/// Deletes `key` in `tx`, if present and (with `lease`) still attached to that lease; returns
/// whether it was deleted.
fn remove(
    tx: &WriteTransaction,
    events: &mut Vec<WatchEvent>,
    key: &str,
    lease: Option<i64>,
) -> Result<bool> {
    let mut eph = tx.open_table(EPHEMERAL).map_err(store_err)?;
    if let Some(l) = lease {
        let attached = eph.get(key).map_err(store_err)?.map(|v| v.value());
        if attached != Some(l) {
            return Ok(false);
        }
    }
    eph.remove(key).map_err(store_err)?;
    let existed = {
        let mut data = tx.open_table(DATA).map_err(store_err)?;
        data.remove(key).map_err(store_err)?.is_some()
    };
    if existed {
        let revision = next_revision(tx)?;
        events.push(WatchEvent::Delete {
            key: key.to_string(),
            revision,
        });
    }
    Ok(existed)
}

fn read(db: &Database, key: &str) -> Result<Option<Versioned>> {
    let tx = db.begin_read().map_err(store_err)?;
    let data = tx.open_table(DATA).map_err(store_err)?;
    Ok(data.get(key).map_err(store_err)?.map(|v| {
        let (revision, value) = v.value();
        Versioned {
            value: value.to_vec(),
            revision,
        }
    }))
}

/// Waits out lease `id` of `store`: deletes its key once its deadline passes without a
/// keep-alive. Holds the store weakly, so a dropped store closes its file.
async fn expire(store: Weak<Inner>, id: i64, mut deadline: Instant) {
    loop {
        tokio::time::sleep_until(deadline).await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let key = {
            let mut leases = lock(&inner.leases);
            match leases.live.get(&id) {
                None => return, // revoked
                Some(l) if l.deadline > Instant::now() => {
                    deadline = l.deadline;
                    continue;
                }
                Some(_) => leases.live.remove(&id).map(|l| l.key),
            }
        };
        let Some(key) = key else {
            return;
        };
        let deleted = EmbeddedStore { inner }
            .blocking(move |inner| write_txn(inner, |tx, ev| remove(tx, ev, &key, Some(id))))
            .await;
        match deleted {
            Ok(_) => tracing::debug!(lease = %LeaseId(id), "lease expired"),
            Err(e) => {
                tracing::warn!(lease = %LeaseId(id), error = %e, "deleting an expired lease's key")
            }
        }
        return;
    }
}

impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let key = key.to_string();
        self.blocking(move |inner| read(&inner.db, &key)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        let key = key.to_string();
        self.blocking(move |inner| write_txn(inner, |tx, ev| write(tx, ev, &key, &value, None)))
            .await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<Result<u64, Option<Versioned>>> {
        let key = key.to_string();
        self.blocking(move |inner| {
            // redb runs one write transaction at a time, so the check and the write are atomic.
            write_txn(inner, |tx, ev| {
                let current = {
                    let data = tx.open_table(DATA).map_err(store_err)?;
                    let got = data.get(key.as_str()).map_err(store_err)?;
                    got.map(|v| {
                        let (revision, value) = v.value();
                        Versioned {
                            value: value.to_vec(),
                            revision,
                        }
                    })
                };
                let ok = match (&current, expect) {
                    (None, Expect::Absent) => true,
                    (Some(c), Expect::Revision(r)) => c.revision == r,
                    _ => false,
                };
                if !ok {
                    return Ok(Err(current));
                }
                write(tx, ev, &key, &value, None).map(Ok)
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.blocking(move |inner| write_txn(inner, |tx, ev| remove(tx, ev, &key, None)))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            let tx = inner.db.begin_read().map_err(store_err)?;
            let data = tx.open_table(DATA).map_err(store_err)?;
            let mut out = Vec::new();
            for entry in data.range(prefix.as_str()..).map_err(store_err)? {
                let (k, v) = entry.map_err(store_err)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (revision, value) = v.value();
                out.push((
                    key.to_string(),
                    Versioned {
                        value: value.to_vec(),
                        revision,
                    },
                ));
            }
            Ok(out)
        })
        .await
    }

    async fn put_ephemeral(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<Ephemeral> {
        self.ephemeral(key, value, ttl, false)
            .await?
            .ok_or_else(|| CoordinatorError::Store(format!("{key}: ephemeral write lost")))
    }

    async fn create_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Option<Ephemeral>> {
        self.ephemeral(key, value, ttl, true).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let mut leases = lock(&self.inner.leases);
        Ok(match leases.live.get_mut(&lease.0) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                true
            }
            None => false,
        })
    }

    async fn revoke(&self, lease: LeaseId) -> Result<bool> {
        let Some(l) = lock(&self.inner.leases).live.remove(&lease.0) else {
            return Ok(false);
        };
        let id = lease.0;
        self.blocking(move |inner| write_txn(inner, |tx, ev| remove(tx, ev, &l.key, Some(id))))
            .await?;
        Ok(true)
    }

    async fn watch(&self, prefix: &str) -> Result<Watch> {
        let mut events = lock(&self.inner.events).subscribe();
        let prefix = prefix.to_string();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    () = tx.closed() => return,
                    ev = events.recv() => ev,
                };
                match ev {
                    Ok(ev) if ev.key().starts_with(&prefix) => {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let e = CoordinatorError::Store(format!(
                            "watch of {prefix:?} fell {n} events behind"
                        ));
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Watch::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("shoal.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        crate::store::conformance::run(&store).await;
        // Reopened on the same file, everything is still there.
        drop(store);
        let again = EmbeddedStore::open(&path).unwrap();
        crate::store::conformance::check_persisted(&again).await;
    }

    #[tokio::test]
    async fn ephemeral_keys_do_not_outlive_the_process_that_held_their_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        let e = store
            .put_ephemeral("live/n1", b"1".to_vec(), Duration::from_secs(3600))
            .await
            .unwrap();
        // An ordinary write detaches a key from its lease: revoking it leaves the key.
        store
            .put_ephemeral("live/n2", b"2".to_vec(), Duration::from_secs(3600))
            .await
            .unwrap();
        let kept = store.put("live/n2", b"kept".to_vec()).await.unwrap();
        store.put("jobs/a", b"a".to_vec()).await.unwrap();
        drop(store);
        let again = EmbeddedStore::open(&path).unwrap();
        assert_eq!(again.get("live/n1").await.unwrap(), None);
        assert_eq!(
            again
                .get("live/n2")
                .await
                .unwrap()
                .map(|v| (v.value, v.revision)),
            Some((b"kept".to_vec(), kept))
        );
        assert!(again.get("jobs/a").await.unwrap().is_some());
        // The lease ended with the old handle.
        assert!(!again.keep_alive(e.lease).await.unwrap());
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_store_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bogus.redb");
        std::fs::write(&path, b"this is not a database").unwrap();
        let e = EmbeddedStore::open(&path).unwrap_err().to_string();
        assert!(e.contains("bogus.redb"), "{e}");
    }
}
