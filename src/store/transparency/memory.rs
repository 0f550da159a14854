//! The log's storage in memory, for unit tests and the non-durable benchmark store.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use super::{KtBatch, TransparencyStore, name_epoch, prefixed};
use crate::store::{StoreFuture, ready};

#[derive(Default)]
struct Maps {
    records: HashMap<Vec<u8>, Vec<u8>>,
    states: BTreeMap<Vec<u8>, Vec<u8>>,
    roots: BTreeMap<u64, Vec<u8>>,
    cosignatures: BTreeMap<(Vec<u8>, String), Vec<u8>>,
    audited: HashMap<String, Vec<u8>>,
}

/// See the module docs.
#[derive(Clone, Default)]
pub struct MemoryTransparency {
    maps: Arc<Mutex<Maps>>,
}

impl MemoryTransparency {
    /// An empty log store.
    pub fn new() -> Self {
        Self::default()
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().expect("transparency maps lock")
    }
}

impl TransparencyStore for MemoryTransparency {
    fn write(&self, batch: KtBatch) -> StoreFuture<()> {
        let mut maps = self.maps();
        maps.records.extend(batch.records);
        for (label, epoch, state) in batch.states {
            maps.states.insert(name_epoch(&label, epoch), state);
        }
        ready(Ok(()))
    }

    fn records(&self, ids: Vec<Vec<u8>>) -> StoreFuture<Vec<Option<Vec<u8>>>> {
        let maps = self.maps();
        ready(Ok(ids
            .iter()
            .map(|id| maps.records.get(id).cloned())
            .collect()))
    }

    fn states(&self, label: Vec<u8>) -> StoreFuture<Vec<Vec<u8>>> {
        let prefix = prefixed(&label);
        let maps = self.maps();
        let found = maps
            .states
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect();
        ready(Ok(found))
    }

    fn everything(&self) -> StoreFuture<Vec<Vec<u8>>> {
        let maps = self.maps();
        let all = maps
            .records
            .values()
            .chain(maps.states.values())
            .cloned()
            .collect();
        ready(Ok(all))
    }

    fn put_root(&self, epoch: u64, root: Vec<u8>) -> StoreFuture<()> {
        self.maps().roots.insert(epoch, root);
        ready(Ok(()))
    }

    fn roots(&self, from: u64, to: u64) -> StoreFuture<Vec<Vec<u8>>> {
        if from > to {
            return ready(Ok(Vec::new()));
        }
        let maps = self.maps();
        ready(Ok(maps
            .roots
            .range(from..=to)
            .map(|(_, r)| r.clone())
            .collect()))
    }

    fn latest_root(&self) -> StoreFuture<Option<Vec<u8>>> {
        ready(Ok(self.maps().roots.values().next_back().cloned()))
    }

    fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        auditor: &str,
        cosignature: Vec<u8>,
    ) -> StoreFuture<()> {
        self.maps().cosignatures.insert(
            (name_epoch(domain.as_bytes(), epoch), auditor.to_owned()),
            cosignature,
        );
        ready(Ok(()))
    }

    fn cosignatures(&self, domain: &str, epoch: u64) -> StoreFuture<Vec<Vec<u8>>> {
        let key = name_epoch(domain.as_bytes(), epoch);
        let maps = self.maps();
        let found = maps
            .cosignatures
            .range((key.clone(), String::new())..)
            .take_while(|((k, _), _)| *k == key)
            .map(|(_, v)| v.clone())
            .collect();
        ready(Ok(found))
    }

    fn prune_cosignatures(&self, domain: &str, before_epoch: u64) -> StoreFuture<()> {
        let start = prefixed(domain.as_bytes());
        let end = name_epoch(domain.as_bytes(), before_epoch);
        self.maps()
            .cosignatures
            .retain(|(k, _), _| !(k.starts_with(&start) && *k < end));
        ready(Ok(()))
    }

    fn audited(&self, domain: &str) -> StoreFuture<Option<Vec<u8>>> {
        ready(Ok(self.maps().audited.get(domain).cloned()))
    }

    fn set_audited(&self, domain: &str, root: Vec<u8>) -> StoreFuture<()> {
        self.maps().audited.insert(domain.to_owned(), root);
        ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn keeps_the_contract() {
        super::super::contract::holds_what_it_was_given(&super::MemoryTransparency::new()).await;
    }
}
