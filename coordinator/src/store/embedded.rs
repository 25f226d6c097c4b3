//! The embedded store: one `redb` database file. Calls run on tokio's blocking pool, never on the
//! async worker threads.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Expect, Store, Versioned};
use crate::{CoordinatorError, Result};

/// Key -> (revision, value).
const DATA: TableDefinition<'_, &str, (u64, &[u8])> = TableDefinition::new("data");
/// "revision" -> the store revision.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// A store in one local file.
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn store_err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Store(e.to_string())
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating it if absent.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| CoordinatorError::Store(format!("{}: {e}", parent.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| CoordinatorError::Store(format!("{}: {e}", path.display())))?;
        // Create both tables so that readers never meet a missing one.
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(DATA).map_err(store_err)?;
        tx.open_table(META).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(Self { db: Arc::new(db) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| CoordinatorError::Store(format!("store task: {e}")))?
    }
}

/// Bumps the store revision in `tx`; returns the new one.
fn next_revision(tx: &redb::WriteTransaction) -> Result<u64> {
    let mut meta = tx.open_table(META).map_err(store_err)?;
    let rev = meta
        .get("revision")
        .map_err(store_err)?
        .map_or(0, |v| v.value())
        + 1;
    meta.insert("revision", rev).map_err(store_err)?;
    Ok(rev)
}

/// Writes `value` under `key` in `tx` with the next store revision; returns it.
fn write(tx: &redb::WriteTransaction, key: &str, value: &[u8]) -> Result<u64> {
    let rev = next_revision(tx)?;
    let mut data = tx.open_table(DATA).map_err(store_err)?;
    data.insert(key, (rev, value)).map_err(store_err)?;
    Ok(rev)
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

impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let key = key.to_string();
        self.blocking(move |db| read(db, &key)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        let key = key.to_string();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(store_err)?;
            let rev = write(&tx, &key, &value)?;
            tx.commit().map_err(store_err)?;
            Ok(rev)
        })
        .await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<Result<u64, Option<Versioned>>> {
        let key = key.to_string();
        self.blocking(move |db| {
            // redb runs one write transaction at a time, so the check and the write are atomic.
            let tx = db.begin_write().map_err(store_err)?;
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
                tx.abort().map_err(store_err)?;
                return Ok(Err(current));
            }
            let rev = write(&tx, &key, &value)?;
            tx.commit().map_err(store_err)?;
            Ok(Ok(rev))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(store_err)?;
            let existed = {
                let mut data = tx.open_table(DATA).map_err(store_err)?;
                data.remove(key.as_str()).map_err(store_err)?.is_some()
            };
            if existed {
                next_revision(&tx)?;
            }
            tx.commit().map_err(store_err)?;
            Ok(existed)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let prefix = prefix.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(store_err)?;
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
    async fn a_file_that_is_not_a_store_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bogus.redb");
        std::fs::write(&path, b"this is not a database").unwrap();
        let e = EmbeddedStore::open(&path).unwrap_err().to_string();
        assert!(e.contains("bogus.redb"), "{e}");
    }
}
