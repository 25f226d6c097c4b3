//! The etcd store (feature `etcd`): the same key layout under a configurable prefix, revisions
//! are etcd's `mod_revision`, compare-and-set is an etcd transaction.

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};

use super::{Expect, Store, Versioned};
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
}
