//! [`Inbox`] on tree `queues`: envelopes, queue heads, dedup records and the expiry index,
//! all written in an order whose every crash-surviving prefix is consistent ([`plan`]), and
//! made durable by one group commit shared by many appends.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use super::{Inner, SledStore, device_suffix, recovery};
use crate::store::{
    AppendError, Appended, Due, EnvelopeRecord, Inbox, NewEnvelope, Placement, QueueLimits, Result,
    StoreError, StoreFuture, Trim, UserInbox, keys, ready,
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
    fn is_empty(&self) -> bool {
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
        let prefix = keys::head_prefix(user);
        self.queues
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let id = device_suffix(&k[prefix.len()..])?;
                Ok((id, records::decode(&v)?))
            })
            .collect()
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

    /// All stored (seq, expires_ms) of a device queue (used when a device is removed).
    fn seqs(&self, user: &str, device: u32) -> Result<Vec<(u64, u64)>> {
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
    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Due>> {
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

impl Inbox for SledStore {
    fn open(
        &self,
        user: &str,
        devices: &[u32],
        limits: QueueLimits,
    ) -> StoreFuture<Box<dyn UserInbox>> {
        let heads =
            match recovery::recover_heads(&self.inner, user, devices, crate::clock::now_ms()) {
                Ok(heads) => heads,
                Err(e) => return ready(Err(e)),
            };
        let queues: Box<dyn UserInbox> = Box::new(SledUserInbox {
            inner: self.inner.clone(),
            user: user.to_owned(),
            limits,
            heads,
            pending: Arc::default(),
        });
        // Writes of a previous writer are durable unless a flush failed and none has
        // succeeded since: then what was loaded may hold writes that are not, and nothing
        // may be pushed until a flush succeeds.
        if self
            .inner
            .health
            .flush_ok
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return ready(Ok(queues));
        }
        let durable = self.inner.sync();
        Box::pin(async move { durable.await.map(|()| queues) })
    }

    fn due(&self, now_ms: u64, limit: usize) -> StoreFuture<Vec<Due>> {
        ready(self.inner.due(now_ms, limit))
    }
}

/// One user's queues: the heads live here, written by this handle alone.
struct SledUserInbox {
    inner: Arc<Inner>,
    user: String,
    limits: QueueLimits,
    /// The stored head of each open queue (next sequence number, count, bytes).
    heads: BTreeMap<u32, HeadRecord>,
    /// Sends written but not yet durable, by envelope id, with where they were stored: a
    /// retry waits for durability like the original, and the sweep keeps their dedup records.
    pending: Arc<Mutex<HashMap<[u8; 16], Placement>>>,
}

impl SledUserInbox {
    /// Answers `stored` once everything written so far is durable. A successful flush makes
    /// every earlier write durable too, including writes of sends whose own flush failed:
    /// the answer covers every queue, not only this send's.
    fn when_durable(&self, duplicate: bool, stored: Placement) -> StoreFuture<Appended> {
        let durable = self.ends();
        let flushed = self.inner.sync();
        Box::pin(async move {
            flushed.await.map(|()| Appended {
                duplicate,
                stored,
                durable,
            })
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], Placement>> {
        // Holds only ids; a panic elsewhere cannot leave it half-updated.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl UserInbox for SledUserInbox {
    fn ends(&self) -> Vec<(u32, u64)> {
        self.heads.iter().map(|(d, h)| (*d, h.next_seq)).collect()
    }

    fn add_queue(&mut self, device: u32) -> u64 {
        self.heads
            .entry(device)
            .or_insert_with(recovery::empty_head)
            .next_seq
    }

    fn duplicate(&mut self, id: &[u8; 16]) -> Result<Option<StoreFuture<Appended>>> {
        if let Some(stored) = self.pending().get(id).cloned() {
            return Ok(Some(self.when_durable(true, stored)));
        }
        Ok(self
            .inner
            .dedup(&self.user, id)?
            .map(|record| self.when_durable(true, record.stored)))
    }

    fn append(&mut self, envelope: NewEnvelope<'_>) -> Result<StoreFuture<Appended>, AppendError> {
        if let Some(original) = self.duplicate(&envelope.id)? {
            return Ok(original);
        }
        // Refuse rather than risk a full disk: nothing acknowledged may be lost to one.
        if !self
            .inner
            .health
            .disk_ok
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(AppendError::NoRoom);
        }
        // Quota, checked for every device before anything is written.
        let mut staged = Vec::with_capacity(envelope.copies.len());
        let mut full = Vec::new();
        for &(device, ciphertext) in &envelope.copies {
            let head = *self.heads.get(&device).ok_or(StoreError::NotFound)?;
            if head.count >= self.limits.count
                || head.bytes + ciphertext.len() as u64 > self.limits.bytes
            {
                full.push(device);
            }
            staged.push(recovery::DeviceCopy {
                device,
                head,
                ciphertext,
            });
        }
        if !full.is_empty() {
            return Err(AppendError::Full(full));
        }
        let template = EnvelopeRecord {
            version: records::RECORD_VERSION,
            id: envelope.id,
            class: envelope.class,
            accepted_ms: envelope.accepted_ms,
            expires_ms: envelope.expires_ms,
            ciphertext: Vec::new(),
        };
        let (write, heads) =
            recovery::send_write(&self.user, &template, envelope.remember_until_ms, &staged);
        self.inner.write(write)?;
        let mut stored = Vec::with_capacity(heads.len());
        for (head, copy) in heads.into_iter().zip(&staged) {
            self.heads.insert(copy.device, head);
            metrics::histogram!("sealpost_queue_depth").record(head.count as f64);
            stored.push((copy.device, head.next_seq - 1));
        }
        self.pending().insert(envelope.id, stored.clone());
        let answer = self.when_durable(false, stored);
        let pending = self.pending.clone();
        let id = envelope.id;
        Ok(Box::pin(async move {
            let answer = answer.await;
            pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            answer
        }))
    }

    fn read(
        &self,
        device: u32,
        from: u64,
        limit: usize,
    ) -> StoreFuture<Vec<(u64, EnvelopeRecord)>> {
        ready(self.inner.read(&self.user, device, from, limit))
    }

    fn trim(&mut self, device: u32, acked: &[Trim]) -> Result<StoreFuture<()>> {
        let Some(mut head) = self.heads.get(&device).copied() else {
            return Ok(ready(Ok(())));
        };
        let mut write = QueueWrite::default();
        for t in acked {
            write.ops.push(QueueOp::Remove {
                user: self.user.clone(),
                device,
                seq: t.seq,
                expires_ms: t.expires_ms,
            });
            head.count = head.count.saturating_sub(1);
            head.bytes = head.bytes.saturating_sub(t.bytes);
        }
        write.ops.push(QueueOp::Head {
            user: self.user.clone(),
            device,
            head,
        });
        self.inner.write(write)?;
        self.heads.insert(device, head);
        Ok(self.inner.sync())
    }

    fn drop_queue(&mut self, device: u32) -> Result<StoreFuture<()>> {
        let mut write = QueueWrite::default();
        for (seq, expires_ms) in self.inner.seqs(&self.user, device)? {
            write.ops.push(QueueOp::Remove {
                user: self.user.clone(),
                device,
                seq,
                expires_ms,
            });
        }
        write.ops.push(QueueOp::DropHead {
            user: self.user.clone(),
            device,
        });
        self.inner.write(write)?;
        self.heads.remove(&device);
        Ok(self.inner.sync())
    }

    fn expire(&mut self, due: Vec<Due>) -> Result<Vec<(u32, u64)>> {
        let mut write = QueueWrite::default();
        let mut expired = Vec::new();
        let mut new_heads: BTreeMap<u32, HeadRecord> = BTreeMap::new();
        for entry in due {
            match entry {
                Due::Envelope {
                    device,
                    seq,
                    expires_ms,
                    ..
                } => {
                    // The entry stands for the envelope at `seq` only if that envelope has
                    // its expiry: a crash can leave an entry whose envelope never got
                    // written, and the sequence number may hold another envelope since.
                    let len = self
                        .inner
                        .read(&self.user, device, seq, 1)?
                        .first()
                        .filter(|(s, r)| *s == seq && r.expires_ms == expires_ms)
                        .map(|(_, r)| r.ciphertext.len() as u64);
                    let Some(len) = len else {
                        write.ops.push(QueueOp::Unindex(entry));
                        continue;
                    };
                    write.ops.push(QueueOp::Remove {
                        user: self.user.clone(),
                        device,
                        seq,
                        expires_ms,
                    });
                    let Some(head) = self.heads.get(&device) else {
                        continue;
                    };
                    let head = new_heads.entry(device).or_insert(*head);
                    head.count = head.count.saturating_sub(1);
                    head.bytes = head.bytes.saturating_sub(len);
                    expired.push((device, seq));
                }
                Due::Dedup { id, expires_ms, .. } => {
                    if self.pending().contains_key(&id) {
                        continue;
                    }
                    // Likewise, a retry of a torn send may have written the record again
                    // with a later expiry: then only the stale entry goes.
                    match self.inner.dedup(&self.user, &id)? {
                        Some(r) if r.expires_ms == expires_ms => {
                            write.ops.push(QueueOp::ForgetDedup {
                                user: self.user.clone(),
                                id,
                                expires_ms,
                            });
                        }
                        _ => write.ops.push(QueueOp::Unindex(entry)),
                    }
                }
            }
        }
        for (device, head) in &new_heads {
            write.ops.push(QueueOp::Head {
                user: self.user.clone(),
                device: *device,
                head: *head,
            });
        }
        if write.is_empty() {
            return Ok(expired);
        }
        self.inner.write(write)?;
        self.heads.extend(new_heads);
        Ok(expired)
    }
}
