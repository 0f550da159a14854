//! [`Outbox`] on tree `outbox`: one key per envelope, written once and deleted once
//! acknowledged, so every crash-surviving prefix of outbox writes is consistent.

use super::SledStore;
use crate::store::{
    Outbox, OutboxEntry, OutboxRecord, Result, StoreError, StoreFuture, keys, ready, records,
};

impl Outbox for SledStore {
    fn index(&self, domain: &str) -> StoreFuture<Vec<OutboxEntry>> {
        ready(
            self.inner()
                .outbox
                .scan_prefix(keys::outbox_prefix(domain))
                .map(|kv| {
                    let (k, v) = kv?;
                    let seq = keys::envelope_seq(&k)
                        .ok_or_else(|| StoreError::Corruption("short outbox key".into()))?;
                    let rec: OutboxRecord = records::decode(&v)?;
                    Ok(OutboxEntry {
                        seq,
                        accepted_ms: rec.accepted_ms,
                        bytes: rec.size(),
                    })
                })
                .collect(),
        )
    }

    fn put(&self, domain: &str, seq: u64, record: &OutboxRecord) -> Result<StoreFuture<()>> {
        self.inner()
            .outbox
            .insert(keys::outbox(domain, seq), records::encode(record))?;
        Ok(self.inner().sync())
    }

    fn durable(&self, _domain: &str) -> StoreFuture<()> {
        self.inner().sync()
    }

    fn read(&self, domain: &str, from: u64, limit: usize) -> StoreFuture<Vec<(u64, OutboxRecord)>> {
        let start = keys::outbox(domain, from);
        let end = keys::outbox(domain, u64::MAX);
        ready(
            self.inner()
                .outbox
                .range(start..=end)
                .take(limit)
                .map(|kv| {
                    let (k, v) = kv?;
                    let seq = keys::envelope_seq(&k)
                        .ok_or_else(|| StoreError::Corruption("short outbox key".into()))?;
                    Ok((seq, records::decode(&v)?))
                })
                .collect(),
        )
    }

    fn remove(&self, domain: &str, seqs: &[u64]) -> Result<StoreFuture<()>> {
        for seq in seqs {
            self.inner().outbox.remove(keys::outbox(domain, *seq))?;
        }
        Ok(self.inner().sync())
    }
}
