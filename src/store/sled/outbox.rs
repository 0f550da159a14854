//! [`Outbox`] on tree `outbox`: one key per envelope, written once and deleted once
//! acknowledged, so every crash-surviving prefix of outbox writes is consistent. Each record
//! (recipient, ciphertexts, admission token) is sealed under its destination's outbox key,
//! which is replaced once the outbox drains (`keyring`): a removed entry cannot be read back
//! from old sled pages.

use zeroize::Zeroizing;

use super::{Inner, SledStore};
use crate::store::{
    Outbox, OutboxEntry, OutboxRecord, Result, StoreError, StoreFuture, keys, ready, records,
};

impl Inner {
    /// Every readable entry of a domain's outbox with `seq >= from`, up to `limit`; shredded
    /// ones (removed before their key was destroyed) are skipped.
    fn outbox_entries(
        &self,
        domain: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>> {
        let d = self.keyring.domain(domain);
        let start = keys::outbox(&d, from);
        let end = keys::outbox(&d, u64::MAX);
        let mut out = Vec::new();
        for kv in self.outbox.range(start..=end) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let seq = keys::envelope_seq(&k)
                .ok_or_else(|| StoreError::Corruption("short outbox key".into()))?;
            if let Some(plain) = self.keyring.unseal(&k, &v)? {
                out.push((seq, records::decode(&plain)?));
            }
        }
        Ok(out)
    }
}

impl Outbox for SledStore {
    fn index(&self, domain: &str) -> StoreFuture<Vec<OutboxEntry>> {
        ready(
            self.inner()
                .outbox_entries(domain, 0, usize::MAX)
                .map(|entries| {
                    entries
                        .into_iter()
                        .map(|(seq, rec)| OutboxEntry {
                            seq,
                            accepted_ms: rec.accepted_ms,
                            bytes: rec.size(),
                        })
                        .collect()
                }),
        )
    }

    fn put(&self, domain: &str, seq: u64, record: &OutboxRecord) -> Result<StoreFuture<()>> {
        let inner = self.inner();
        let d = inner.keyring.domain(domain);
        let key = keys::outbox(&d, seq);
        let plain = Zeroizing::new(records::encode(record));
        inner
            .keyring
            .with_sealer(&keys::outbox_prefix(&d), |sealer| {
                inner.outbox.insert(&key, sealer.seal(&key, &plain))?;
                Ok(())
            })?;
        Ok(inner.sync())
    }

    fn durable(&self, _domain: &str) -> StoreFuture<()> {
        self.inner().sync()
    }

    fn read(&self, domain: &str, from: u64, limit: usize) -> StoreFuture<Vec<(u64, OutboxRecord)>> {
        ready(self.inner().outbox_entries(domain, from, limit))
    }

    fn remove(&self, domain: &str, seqs: &[u64]) -> Result<StoreFuture<()>> {
        let inner = self.inner();
        let d = inner.keyring.domain(domain);
        for seq in seqs {
            inner.outbox.remove(keys::outbox(&d, *seq))?;
        }
        let prefix = keys::outbox_prefix(&d);
        if inner.outbox.scan_prefix(&prefix).next().is_none() {
            inner.keyring.drained(prefix);
        }
        Ok(inner.sync())
    }
}
