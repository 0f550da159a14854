//! Tree `queues`: the write plan whose every crash-surviving prefix is consistent
//! ([`plan`]), and the reads the inbox and its recovery are built on. Key layouts:
//! [`crate::store::keys`].

use super::{Inner, by_device};
use crate::store::{
    Due, EnvelopeRecord, Result, StoreError, keys,
    records::{self, DedupRecord, HeadRecord},
};

/// One write operation of a [`QueueWrite`] batch.
#[derive(Debug)]
pub(super) enum QueueOp {
    /// Store an envelope at `seq` of a device queue (and index its expiry).
    Append {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
        /// Sequence number.
        seq: u64,
        /// The envelope.
        record: EnvelopeRecord,
    },
    /// Delete an envelope (and its expiry index entry).
    Remove {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
        /// Sequence number.
        seq: u64,
        /// Its expiry, to find the index entry.
        expires_ms: u64,
    },
    /// Set a device queue's head.
    Head {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
        /// New head.
        head: HeadRecord,
    },
    /// Delete a device queue's head (the device was removed).
    DropHead {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
    },
    /// Remember an accepted send for deduplication (and index its expiry).
    Dedup {
        /// Account handle.
        user: String,
        /// Envelope id.
        id: [u8; 16],
        /// The record.
        record: DedupRecord,
    },
    /// Forget a dedup record.
    ForgetDedup {
        /// Account handle.
        user: String,
        /// Envelope id.
        id: [u8; 16],
        /// Its expiry, to find the index entry.
        expires_ms: u64,
    },
    /// Delete only an expiry index entry: its record is gone, or was written again with
    /// another expiry (a crash can leave an entry behind, since entries go first).
    Unindex(Due),
}

/// Queue writes, applied in order; after a crash a prefix of them survives.
#[derive(Debug, Default)]
pub(super) struct QueueWrite {
    /// The operations, applied in order.
    pub(super) ops: Vec<QueueOp>,
}

impl QueueWrite {
    /// True when there is nothing to write.
    pub(super) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The key-value writes of a batch, in the order that keeps every crash-surviving prefix
/// consistent (`None` deletes):
///
/// - an expiry index entry is written before what it indexes and removed after it, so nothing
///   stored lacks its expiry (an entry without its record is skipped by the sweep);
/// - a send is ordered as envelopes, heads, then the dedup record, so a surviving
///   dedup record implies its envelopes and heads survived (a retry never hides a lost
///   envelope), and a send without one is rolled back when its queues are opened (a retry never
///   stores an envelope twice).
pub(super) fn plan(write: QueueWrite) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut out = Vec::with_capacity(write.ops.len() * 2);
    for op in write.ops {
        match op {
            QueueOp::Append {
                user,
                device,
                seq,
                record,
            } => {
                out.push((
                    keys::expiry_envelope(record.expires_ms, &user, device, seq),
                    Some(Vec::new()),
                ));
                out.push((
                    keys::envelope(&user, device, seq),
                    Some(records::encode(&record)),
                ));
            }
            QueueOp::Remove {
                user,
                device,
                seq,
                expires_ms,
            } => {
                out.push((keys::envelope(&user, device, seq), None));
                out.push((keys::expiry_envelope(expires_ms, &user, device, seq), None));
            }
            QueueOp::Head { user, device, head } => {
                out.push((keys::head(&user, device), Some(records::encode(&head))));
            }
            QueueOp::DropHead { user, device } => out.push((keys::head(&user, device), None)),
            QueueOp::Dedup { user, id, record } => {
                out.push((
                    keys::expiry_dedup(record.expires_ms, &user, &id),
                    Some(Vec::new()),
                ));
                out.push((keys::dedup(&user, &id), Some(records::encode(&record))));
            }
            QueueOp::ForgetDedup {
                user,
                id,
                expires_ms,
            } => {
                out.push((keys::dedup(&user, &id), None));
                out.push((keys::expiry_dedup(expires_ms, &user, &id), None));
            }
            QueueOp::Unindex(Due::Envelope {
                user,
                device,
                seq,
                expires_ms,
            }) => out.push((keys::expiry_envelope(expires_ms, &user, device, seq), None)),
            QueueOp::Unindex(Due::Dedup {
                user,
                id,
                expires_ms,
            }) => out.push((keys::expiry_dedup(expires_ms, &user, &id), None)),
        }
    }
    out
}

impl Inner {
    /// Applies the writes in order (not yet durable: see [`Inner::sync`]).
    pub(super) fn write(&self, write: QueueWrite) -> Result<()> {
        // One insert or remove at a time, in order. sled's batches and transactions take a
        // global write lock that also waits for every running flush, which cut durable
        // throughput by two thirds here (see the README); single writes do not, and sled's
        // recovery replays a prefix of its log, so ordered writes survive a crash as a prefix.
        for (k, v) in plan(write) {
            match v {
                Some(v) => {
                    self.queues.insert(k, v)?;
                }
                None => {
                    self.queues.remove(k)?;
                }
            }
        }
        Ok(())
    }

    /// All queue heads of `user`.
    pub(super) fn heads(&self, user: &str) -> Result<Vec<(u32, HeadRecord)>> {
        by_device(&self.queues, &keys::head_prefix(user))
    }

    /// The envelope with the highest stored sequence number of a device queue.
    pub(super) fn last_envelope(
        &self,
        user: &str,
        device: u32,
    ) -> Result<Option<(u64, EnvelopeRecord)>> {
        match self
            .queues
            .scan_prefix(keys::envelope_prefix(user, device))
            .next_back()
        {
            Some(kv) => {
                let (k, v) = kv?;
                let seq = keys::envelope_seq(&k)
                    .ok_or_else(|| StoreError::Corruption("short envelope key".into()))?;
                Ok(Some((seq, records::decode(&v)?)))
            }
            None => Ok(None),
        }
    }

    /// Up to `limit` envelopes of a device queue with `seq >= from`, in order.
    pub(super) fn read(
        &self,
        user: &str,
        device: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, EnvelopeRecord)>> {
        let start = keys::envelope(user, device, from);
        let end = keys::envelope(user, device, u64::MAX);
        let mut out = Vec::new();
        for kv in self.queues.range(start..=end).take(limit) {
            let (k, v) = kv?;
            let seq = keys::envelope_seq(&k)
                .ok_or_else(|| StoreError::Corruption("short envelope key".into()))?;
            out.push((seq, records::decode(&v)?));
        }
        Ok(out)
    }

    /// Whether the envelope at `seq` of a device queue is stored.
    pub(super) fn holds(&self, user: &str, device: u32, seq: u64) -> Result<bool> {
        Ok(self
            .queues
            .contains_key(keys::envelope(user, device, seq))?)
    }

    /// All stored (seq, expires_ms) of a device queue (used when a device is removed).
    pub(super) fn seqs(&self, user: &str, device: u32) -> Result<Vec<(u64, u64)>> {
        self.queues
            .scan_prefix(keys::envelope_prefix(user, device))
            .map(|kv| {
                let (k, v) = kv?;
                let seq = keys::envelope_seq(&k)
                    .ok_or_else(|| StoreError::Corruption("short envelope key".into()))?;
                let rec: EnvelopeRecord = records::decode(&v)?;
                Ok((seq, rec.expires_ms))
            })
            .collect()
    }

    /// The dedup record of a send.
    pub(super) fn dedup(&self, user: &str, id: &[u8; 16]) -> Result<Option<DedupRecord>> {
        self.queues
            .get(keys::dedup(user, id))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    /// Up to `limit` index entries due at or before `now_ms`.
    pub(super) fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Due>> {
        let mut out = Vec::new();
        for tag in [keys::EXPIRY_ENVELOPE, keys::EXPIRY_DEDUP] {
            let range = vec![tag]..keys::expiry_until(tag, now_ms);
            for kv in self
                .queues
                .range(range)
                .take(limit.saturating_sub(out.len()))
            {
                let (k, _) = kv?;
                let bad = || StoreError::Corruption("bad expiry key".into());
                let (expires_ms, user, rest) = keys::split_expiry(&k).ok_or_else(bad)?;
                let user = user.to_owned();
                out.push(if tag == keys::EXPIRY_ENVELOPE {
                    let device = u32::from_be_bytes(
                        rest.get(..4)
                            .ok_or_else(bad)?
                            .try_into()
                            .map_err(|_| bad())?,
                    );
                    let seq = u64::from_be_bytes(
                        rest.get(4..12)
                            .ok_or_else(bad)?
                            .try_into()
                            .map_err(|_| bad())?,
                    );
                    Due::Envelope {
                        user,
                        device,
                        seq,
                        expires_ms,
                    }
                } else {
                    let id: [u8; 16] = rest.try_into().map_err(|_| bad())?;
                    Due::Dedup {
                        user,
                        id,
                        expires_ms,
                    }
                });
            }
        }
        Ok(out)
    }
}
