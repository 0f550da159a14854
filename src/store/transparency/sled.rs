//! The log's storage in its own sled database (`transparency/` in the data directory).
//!
//! One tree, keys by kind (the catalogue of this database):
//!
//! ```text
//! b'r' ‖ akd id                                   → akd record (a tree node, the azks)
//! b's' ‖ u16-BE len ‖ label ‖ u64-BE epoch          → akd value state
//! b'o' ‖ u64-BE epoch                              → SignedRoot
//! b'c' ‖ u16-BE len ‖ domain ‖ u64-BE epoch ‖ auditor → Cosignature
//! b'a' ‖ domain                                    → SignedRoot (the last one audited)
//! ```
//!
//! A batch is one `apply_batch` (atomic) followed by a flush: nothing is answered before it
//! is on disk.

use std::path::Path;

use super::{KtBatch, TransparencyStore, name_epoch, prefixed};
use crate::store::{Result, StoreError, StoreFuture};

const RECORD: u8 = b'r';
const STATE: u8 = b's';
const ROOT: u8 = b'o';
const COSIGNATURE: u8 = b'c';
const AUDITED: u8 = b'a';

/// See the module docs.
#[derive(Clone)]
pub struct SledTransparency {
    db: sled::Db,
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn key(kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(kind);
    k.extend_from_slice(rest);
    k
}

impl SledTransparency {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(io)?;
        Ok(SledTransparency { db })
    }

    /// Applies a batch, then waits for it to be on disk.
    fn durable(&self, batch: sled::Batch) -> StoreFuture<()> {
        let db = self.db.clone();
        Box::pin(async move {
            db.apply_batch(batch).map_err(io)?;
            db.flush_async().await.map_err(io)?;
            Ok(())
        })
    }

    fn scan(&self, prefix: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.db
            .scan_prefix(prefix)
            .values()
            .map(|v| v.map(|v| v.to_vec()).map_err(io))
            .collect()
    }
}

impl TransparencyStore for SledTransparency {
    fn write(&self, batch: KtBatch) -> StoreFuture<()> {
        let mut b = sled::Batch::default();
        for (id, record) in batch.records {
            b.insert(key(RECORD, &id), record);
        }
        for (label, epoch, state) in batch.states {
            b.insert(key(STATE, &name_epoch(&label, epoch)), state);
        }
        self.durable(b)
    }

    fn records(&self, ids: Vec<Vec<u8>>) -> StoreFuture<Vec<Option<Vec<u8>>>> {
        let found = ids
            .iter()
            .map(|id| {
                self.db
                    .get(key(RECORD, id))
                    .map(|v| v.map(|v| v.to_vec()))
                    .map_err(io)
            })
            .collect();
        crate::store::ready(found)
    }

    fn states(&self, label: Vec<u8>) -> StoreFuture<Vec<Vec<u8>>> {
        crate::store::ready(self.scan(key(STATE, &prefixed(&label))))
    }

    fn everything(&self) -> StoreFuture<Vec<Vec<u8>>> {
        let mut all = self.scan(vec![RECORD]);
        if let Ok(all) = &mut all {
            match self.scan(vec![STATE]) {
                Ok(states) => all.extend(states),
                Err(e) => return crate::store::ready(Err(e)),
            }
        }
        crate::store::ready(all)
    }

    fn put_root(&self, epoch: u64, root: Vec<u8>) -> StoreFuture<()> {
        let mut b = sled::Batch::default();
        b.insert(key(ROOT, &epoch.to_be_bytes()), root);
        self.durable(b)
    }

    fn roots(&self, from: u64, to: u64) -> StoreFuture<Vec<Vec<u8>>> {
        if from > to {
            return crate::store::ready(Ok(Vec::new()));
        }
        let found = self
            .db
            .range(key(ROOT, &from.to_be_bytes())..=key(ROOT, &to.to_be_bytes()))
            .values()
            .map(|v| v.map(|v| v.to_vec()).map_err(io))
            .collect();
        crate::store::ready(found)
    }

    fn latest_root(&self) -> StoreFuture<Option<Vec<u8>>> {
        let found = self
            .db
            .scan_prefix([ROOT])
            .values()
            .next_back()
            .transpose()
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(io);
        crate::store::ready(found)
    }

    fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        auditor: &str,
        cosignature: Vec<u8>,
    ) -> StoreFuture<()> {
        let mut k = key(COSIGNATURE, &name_epoch(domain.as_bytes(), epoch));
        k.extend_from_slice(auditor.as_bytes());
        let mut b = sled::Batch::default();
        b.insert(k, cosignature);
        self.durable(b)
    }

    fn cosignatures(&self, domain: &str, epoch: u64) -> StoreFuture<Vec<Vec<u8>>> {
        crate::store::ready(self.scan(key(COSIGNATURE, &name_epoch(domain.as_bytes(), epoch))))
    }

    fn prune_cosignatures(&self, domain: &str, before_epoch: u64) -> StoreFuture<()> {
        let start = key(COSIGNATURE, &prefixed(domain.as_bytes()));
        let end = key(COSIGNATURE, &name_epoch(domain.as_bytes(), before_epoch));
        let mut b = sled::Batch::default();
        for k in self.db.range(start..end).keys() {
            match k {
                Ok(k) => b.remove(k),
                Err(e) => return crate::store::ready(Err(io(e))),
            }
        }
        self.durable(b)
    }

    fn audited(&self, domain: &str) -> StoreFuture<Option<Vec<u8>>> {
        let found = self
            .db
            .get(key(AUDITED, domain.as_bytes()))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(io);
        crate::store::ready(found)
    }

    fn set_audited(&self, domain: &str, root: Vec<u8>) -> StoreFuture<()> {
        let mut b = sled::Batch::default();
        b.insert(key(AUDITED, domain.as_bytes()), root);
        self.durable(b)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn keeps_the_contract_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = super::SledTransparency::open(dir.path()).unwrap();
            super::super::contract::holds_what_it_was_given(&store).await;
        }
        // sled's I/O threads may hold the file lock a moment after the drop.
        let store = loop {
            match super::SledTransparency::open(dir.path()) {
                Ok(store) => break store,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        use super::super::TransparencyStore;
        assert_eq!(store.latest_root().await.unwrap(), Some(vec![3]));
    }
}
