//! The etcd store (feature `etcd`): the same key layout under a configurable prefix, revisions
//! are etcd's `mod_revision`, compare-and-set is an etcd transaction, ephemeral keys are attached
//! to etcd leases (TTLs rounded up to whole seconds) and watches are etcd watches on the prefix.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{Ephemeral, Expect, LeaseId, Store, Versioned, WATCH_BUFFER, Watch, WatchEvent};
use crate::{CoordinatorError, Result};

/// A store in an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// Prepended to every key (for example `shoal/`), so several clusters can share one etcd.
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn etcd_err(e: etcd_client::Error) -> CoordinatorError {
    CoordinatorError::Store(format!("etcd: {e}"))
}

fn rev(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Whether `e` is etcd saying that a lease does not exist (expired or revoked).
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

/// A new lease of `ttl`.
async fn grant(c: &mut Client, ttl: Duration) -> Result<i64> {
    Ok(c.lease_grant(ttl_seconds(ttl), None)
        .await
        .map_err(etcd_err)?
        .id())
}

/// `ttl` in etcd's whole seconds, rounded up (at least 1).
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_millis().div_ceil(1000).max(1);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (for example `http://127.0.0.1:2379`); keys live under
    /// `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        let client = Client::connect(endpoints, None).await.map_err(|e| {
            CoordinatorError::Store(format!("etcd at {}: {e}", endpoints.join(",")))
        })?;
        Ok(Self {
            client,
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// A watch event of etcd as a store event (`None` for a key outside this store's prefix).
    fn event(&self, ev: &etcd_client::Event) -> Result<Option<WatchEvent>> {
        let Some(kv) = ev.kv() else {
            return Ok(None);
        };
        let key = kv.key_str().map_err(etcd_err)?;
        let Some(key) = key.strip_prefix(self.prefix.as_str()) else {
            return Ok(None);
        };
        let revision = rev(kv.mod_revision());
        Ok(Some(match ev.event_type() {
            EventType::Put => WatchEvent::Put {
                key: key.to_string(),
                value: kv.value().to_vec(),
                revision,
            },
            EventType::Delete => WatchEvent::Delete {
                key: key.to_string(),
                revision,
            },
        }))
    }
}

fn versioned(kv: &etcd_client::KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        revision: rev(kv.mod_revision()),
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let mut c = self.client.clone();
        let r = c.get(self.key(key), None).await.map_err(etcd_err)?;
        Ok(r.kvs().first().map(versioned))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        let mut c = self.client.clone();
        let r = c.put(self.key(key), value, None).await.map_err(etcd_err)?;
        Ok(r.header().map_or(0, |h| rev(h.revision())))
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<Result<u64, Option<Versioned>>> {
        let k = self.key(key);
        let cmp = match expect {
            Expect::Absent => Compare::version(k.clone(), CompareOp::Equal, 0),
            Expect::Revision(r) => Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                i64::try_from(r).unwrap_or(i64::MAX),
            ),
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(k.clone(), value, None)])
            .or_else([TxnOp::get(k, None)]);
        let mut c = self.client.clone();
        let r = c.txn(txn).await.map_err(etcd_err)?;
        if r.succeeded() {
            return Ok(Ok(r.header().map_or(0, |h| rev(h.revision()))));
        }
        let current = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(versioned)),
            _ => None,
        });
        Ok(Err(current.flatten()))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut c = self.client.clone();
        let r = c.delete(self.key(key), None).await.map_err(etcd_err)?;
        Ok(r.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let mut c = self.client.clone();
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let r = c
            .get(self.key(prefix), Some(opts))
            .await
            .map_err(etcd_err)?;
        let strip = self.prefix.len();
        r.kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().map_err(etcd_err)?;
                Ok((key[strip..].to_string(), versioned(kv)))
            })
            .collect()
    }

    async fn put_ephemeral(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<Ephemeral> {
        let mut c = self.client.clone();
        let lease = grant(&mut c, ttl).await?;
        let put = c
            .put(
                self.key(key),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await;
        match put {
            Ok(r) => Ok(Ephemeral {
                lease: LeaseId(lease),
                revision: r.header().map_or(0, |h| rev(h.revision())),
            }),
            Err(e) => {
                // Do not leave an unused lease behind (it would expire anyway).
                let _ = c.lease_revoke(lease).await;
                Err(etcd_err(e))
            }
        }
    }

    async fn create_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Option<Ephemeral>> {
        let mut c = self.client.clone();
        let lease = grant(&mut c, ttl).await?;
        let k = self.key(key);
        let txn = Txn::new()
            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                k,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = c.txn(txn).await;
        match r {
            Ok(r) if r.succeeded() => Ok(Some(Ephemeral {
                lease: LeaseId(lease),
                revision: r.header().map_or(0, |h| rev(h.revision())),
            })),
            other => {
                // Do not leave an unused lease behind (it would expire anyway).
                let _ = c.lease_revoke(lease).await;
                other.map(|_| None).map_err(etcd_err)
            }
        }
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let mut c = self.client.clone();
        // Opening the keep-alive stream sends the first keep-alive and reads its answer.
        match c.lease_keep_alive(lease.0).await {
            Ok(_) => Ok(true),
            Err(e) if lease_not_found(&e) => Ok(false),
            Err(e) => Err(etcd_err(e)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<bool> {
        let mut c = self.client.clone();
        match c.lease_revoke(lease.0).await {
            Ok(_) => Ok(true),
            Err(e) if lease_not_found(&e) => Ok(false),
            Err(e) => Err(etcd_err(e)),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<Watch> {
        let mut c = self.client.clone();
        let mut stream = c
            .watch(self.key(prefix), Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(etcd_err)?;
        // Events count from the watch's creation: wait for etcd to confirm it.
        match stream.message().await.map_err(etcd_err)? {
            Some(r) if r.created() && !r.canceled() => {}
            Some(r) => {
                return Err(CoordinatorError::Store(format!(
                    "etcd: watch of {prefix:?} not created: {}",
                    r.cancel_reason()
                )));
            }
            None => {
                return Err(CoordinatorError::Store(format!(
                    "etcd: watch of {prefix:?} ended before it started"
                )));
            }
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let store = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = tx.closed() => return,
                    msg = stream.message() => msg,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let e = CoordinatorError::Store(format!("etcd: watch of {prefix:?} ended"));
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(etcd_err(e))).await;
                        return;
                    }
                };
                for ev in resp.events() {
                    let item = match store.event(ev) {
                        Ok(Some(ev)) => Ok(ev),
                        Ok(None) => continue,
                        Err(e) => Err(e),
                    };
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
                if resp.canceled() {
                    let e = CoordinatorError::Store(format!(
                        "etcd: watch of {prefix:?} cancelled: {}",
                        resp.cancel_reason()
                    ));
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        });
        Ok(Watch::new(rx))
    }
}
