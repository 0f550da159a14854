//! Tree `queues`: the write plan whose every crash-surviving prefix is consistent
//! ([`plan`]), and the reads the inbox and its recovery are built on. Key layouts:
//! [`crate::store::keys`]; envelopes are sealed under their queue's key (`keyring`), and a
//! record whose key was destroyed reads as absent (it was deleted before its key went).

use std::{collections::BTreeMap, sync::atomic::Ordering};

use zeroize::Zeroizing;

use super::{Inner, by_device, keyring::Keyring};
use crate::store::{
    Due, EnvelopeRecord, Result, StoreError,
    keys::{self, Hashed},
    records::{self, DedupRecord, HeadRecord, LastSendRecord, PageRecord},
};

/// What [`Inner::dedup_ends`] finds: each device's highest sequence number given out, and
/// (when it falls due next, keyed id) of every send.
pub(super) type DedupEnds = (BTreeMap<u32, u64>, Vec<(u64, Hashed)>);

/// One write operation of a [`QueueWrite`] batch.
#[derive(Debug)]
pub(super) enum QueueOp {
    /// Index sends of a user that fall due by `due_ms` in one entry (`Z`); with no ids, a
    /// writer's wake entry (see `sled::inbox`).
    IndexSends {
        /// Account handle.
        user: String,
        /// The end of the second they fall due in.
        due_ms: u64,
        /// The entry's random nonce.
        nonce: u64,
        /// Keyed hashes of their envelope ids.
        ids: Vec<Hashed>,
    },
    /// Layout 3's index entry of one send (`Y`), due at `at_ms`: only tests write one now,
    /// to make such a data directory.
    #[cfg(test)]
    IndexSend {
        /// Account handle.
        user: String,
        /// Keyed hash of the envelope id.
        id: Hashed,
        /// When the entry falls due.
        at_ms: u64,
    },
    /// Store an envelope at `seq` of a device queue (indexed through its send).
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
    /// Delete an envelope.
    Remove {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
        /// Sequence number.
        seq: u64,
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
    /// Mark the user's stored heads exact: its writer closed the queues after storing them.
    Close {
        /// Account handle.
        user: String,
    },
    /// Take that mark away: a writer has opened the queues, and its trims store no heads.
    Open {
        /// Account handle.
        user: String,
    },
    /// Delete a device queue's head (the device was removed).
    DropHead {
        /// Account handle.
        user: String,
        /// Device id.
        device: u32,
    },
    /// Name every queue's end after a send: the record that commits it (layout 5).
    LastSend {
        /// Account handle.
        user: String,
        /// The record.
        record: LastSendRecord,
    },
    /// Store (or rewrite) a page of sends.
    Page {
        /// Account handle.
        user: String,
        /// The page's number.
        page: u64,
        /// The record.
        record: PageRecord,
    },
    /// Index a page, due at `due_ms`.
    PageDue {
        /// Account handle.
        user: String,
        /// The page's number.
        page: u64,
        /// When it falls due.
        due_ms: u64,
    },
    /// Delete a page (every send it lists is expired and forgotten).
    DropPage {
        /// Account handle.
        user: String,
        /// The page's number.
        page: u64,
    },
    /// Remember an accepted send for deduplication: the record that commits it (layouts
    /// 2-4; only tests write one now, to make such a data directory).
    #[cfg(test)]
    Dedup {
        /// Account handle.
        user: String,
        /// Keyed hash of the envelope id.
        id: Hashed,
        /// The record.
        record: DedupRecord,
    },
    /// Move a layout-3 send's index entry to a later time (its envelopes expired; its dedup
    /// record stays until then): the new entry is written before the old one goes.
    Reindex {
        /// Account handle.
        user: String,
        /// Keyed hash of the envelope id.
        id: Hashed,
        /// The entry's time now.
        from_ms: u64,
        /// Its new time.
        to_ms: u64,
    },
    /// Forget a dedup record, and its layout-3 index entry (due at `expires_ms`).
    ForgetDedup {
        /// Account handle.
        user: String,
        /// Keyed hash of the envelope id.
        id: Hashed,
        /// Its index entry's time.
        expires_ms: u64,
    },
    /// Delete a writer's wake entry (a `Z` entry listing nothing): the list it stood for is
    /// stored now.
    Unwake {
        /// Account handle.
        user: String,
        /// Its due second.
        due_ms: u64,
        /// Its nonce.
        nonce: u64,
    },
    /// Forget a dedup record listed in a `Z` entry (the entry goes on its own).
    ForgetSend {
        /// Account handle.
        user: String,
        /// Keyed hash of the envelope id.
        id: Hashed,
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

/// What a planned write stores at its key.
pub(super) enum Value {
    /// Delete the key.
    Delete,
    /// Store these bytes as they are.
    Plain(Vec<u8>),
    /// Store this record sealed under the current key of the queue `prefix`.
    Sealed {
        prefix: Vec<u8>,
        plain: Zeroizing<Vec<u8>>,
    },
}

/// The key-value writes of a batch, in the order that keeps every crash-surviving prefix
/// consistent:
///
/// - nothing stored lacks its expiry: a send a writer lists in memory is written after a wake
///   entry due no later than it (which brings the sweep to the writer, or to the recount that
///   lists the sends not yet paged again if the writer died: `recovery`); a wake entry goes
///   only after the list is stored or a new wake entry is (and never while the writer has
///   failed), the list before the `K` mark of a writer that closes; a page's index entry is
///   written before the page, and removed after what it lists; a page is rewritten after the
///   envelopes it no longer lists are removed;
/// - a send is ordered as the wake entry its writer stores then (if any), envelopes, heads
///   (when checkpointed), then `L` naming the queue ends past it; the page listing it (when
///   the writer stores its list) goes in a later write. A surviving `L` implies the envelopes
///   survived (a retry never hides a lost envelope), a send past the ends it names is rolled
///   back when its queues are opened (a retry never stores an envelope twice), and a page
///   never lists a send that was rolled back (a retry of it would be taken for a duplicate).
pub(super) fn plan(keyring: &Keyring, write: QueueWrite) -> Vec<(Vec<u8>, Value)> {
    let mut out = Vec::with_capacity(write.ops.len() + 1);
    let index = |key: Vec<u8>, user: &str| {
        let v = keyring.seal_index(&key, user);
        (key, Value::Plain(v))
    };
    for op in write.ops {
        match op {
            QueueOp::IndexSends {
                user,
                due_ms,
                nonce,
                ids,
            } => {
                let key = keys::expiry_sends(due_ms, &keyring.user(&user), nonce);
                let value = keyring.seal_index_list(&key, &user, &ids);
                out.push((key, Value::Plain(value)));
            }
            QueueOp::Unwake {
                user,
                due_ms,
                nonce,
            } => out.push((
                keys::expiry_sends(due_ms, &keyring.user(&user), nonce),
                Value::Delete,
            )),
            QueueOp::ForgetSend { user, id } => {
                out.push((keys::dedup(&keyring.user(&user), &id), Value::Delete));
            }
            #[cfg(test)]
            QueueOp::IndexSend { user, id, at_ms } => {
                let u = keyring.user(&user);
                out.push(index(keys::expiry_dedup(at_ms, &u, &id), &user));
            }
            QueueOp::Append {
                user,
                device,
                seq,
                record,
            } => {
                let u = keyring.user(&user);
                out.push((
                    keys::envelope(&u, device, seq),
                    Value::Sealed {
                        prefix: keys::envelope_prefix(&u, device),
                        plain: Zeroizing::new(records::encode(&record)),
                    },
                ));
            }
            QueueOp::Remove { user, device, seq } => {
                let u = keyring.user(&user);
                out.push((keys::envelope(&u, device, seq), Value::Delete));
            }
            QueueOp::Head { user, device, head } => {
                out.push((
                    keys::head(&keyring.user(&user), device),
                    Value::Plain(records::encode(&head)),
                ));
            }
            QueueOp::Close { user } => {
                out.push((keys::closed(&keyring.user(&user)), Value::Plain(Vec::new())));
            }
            QueueOp::Open { user } => {
                out.push((keys::closed(&keyring.user(&user)), Value::Delete));
            }
            QueueOp::DropHead { user, device } => {
                out.push((keys::head(&keyring.user(&user), device), Value::Delete));
            }
            QueueOp::LastSend { user, record } => out.push((
                keys::last_send(&keyring.user(&user)),
                Value::Plain(records::encode(&record)),
            )),
            QueueOp::Page { user, page, record } => out.push((
                keys::page(&keyring.user(&user), page),
                Value::Plain(records::encode(&record)),
            )),
            QueueOp::PageDue { user, page, due_ms } => {
                let key = keys::expiry_page(due_ms, &keyring.user(&user), page);
                out.push(index(key, &user));
            }
            QueueOp::DropPage { user, page } => {
                out.push((keys::page(&keyring.user(&user), page), Value::Delete));
            }
            #[cfg(test)]
            QueueOp::Dedup { user, id, record } => {
                let u = keyring.user(&user);
                out.push((keys::dedup(&u, &id), Value::Plain(records::encode(&record))));
            }
            QueueOp::Reindex {
                user,
                id,
                from_ms,
                to_ms,
            } => {
                let u = keyring.user(&user);
                out.push(index(keys::expiry_dedup(to_ms, &u, &id), &user));
                out.push((keys::expiry_dedup(from_ms, &u, &id), Value::Delete));
            }
            QueueOp::ForgetDedup {
                user,
                id,
                expires_ms,
            } => {
                let u = keyring.user(&user);
                out.push((keys::dedup(&u, &id), Value::Delete));
                out.push((keys::expiry_dedup(expires_ms, &u, &id), Value::Delete));
            }
            QueueOp::Unindex(Due::Envelope {
                user,
                device,
                seq,
                expires_ms,
            }) => out.push((
                keys::expiry_envelope(expires_ms, &keyring.user(&user), device, seq),
                Value::Delete,
            )),
            QueueOp::Unindex(Due::Dedup {
                user,
                id,
                expires_ms,
            }) => out.push((
                keys::expiry_dedup(expires_ms, &keyring.user(&user), &id),
                Value::Delete,
            )),
            QueueOp::Unindex(Due::Page { user, due_ms, page }) => out.push((
                keys::expiry_page(due_ms, &keyring.user(&user), page),
                Value::Delete,
            )),
            QueueOp::Unindex(Due::Sends {
                user,
                due_ms,
                entry,
                ..
            }) => out.push((
                keys::expiry_sends(due_ms, &keyring.user(&user), entry),
                Value::Delete,
            )),
        }
    }
    out
}

impl Inner {
    /// Applies the writes in order (not yet durable: see [`Inner::sync`]). A write that
    /// fails (sled's, or the keyring's on a full disk, which may come first now that new
    /// queues need a key) counts as a failed flush until a flush succeeds: readiness turns
    /// false, and once there is room again the server's recovery reopens the store.
    pub(super) fn write(&self, write: QueueWrite) -> Result<()> {
        let written = self.write_in_order(write);
        if matches!(written, Err(StoreError::Io(_))) {
            self.health
                .flush_ok
                .store(false, std::sync::atomic::Ordering::Relaxed);
            self.health.check_disk();
        }
        written
    }

    fn write_in_order(&self, write: QueueWrite) -> Result<()> {
        // One insert or remove at a time, in order. sled's batches and transactions take a
        // global write lock that also waits for every running flush, which cut durable
        // throughput by two thirds here (`loadtest/JOURNAL.md`, "Durable appends"); single
        // writes do not, and sled's recovery replays a prefix of its log, so ordered writes
        // survive a crash as a prefix.
        for (k, v) in plan(&self.keyring, write) {
            match v {
                Value::Plain(v) => {
                    self.queues.insert(k, v)?;
                }
                Value::Sealed { prefix, plain } => {
                    self.keyring.with_sealer(&prefix, |sealer| {
                        self.queues.insert(&k, sealer.seal(&k, &plain))?;
                        Ok(())
                    })?;
                }
                Value::Delete => {
                    self.queues.remove(k)?;
                }
            }
        }
        Ok(())
    }

    /// The envelope sealed at `key`, or `None` if its key was destroyed (shredded).
    pub(super) fn envelope(&self, key: &[u8], value: &[u8]) -> Result<Option<EnvelopeRecord>> {
        match self.keyring.unseal(key, value)? {
            Some(plain) => Ok(Some(records::decode(&plain)?)),
            None => Ok(None),
        }
    }

    /// Reports that a device queue emptied: its key is replaced after the next flush.
    pub(super) fn drained(&self, user: &str, device: u32) {
        self.keyring
            .drained(keys::envelope_prefix(&self.keyring.user(user), device));
    }

    /// All queue heads of `user`.
    pub(super) fn heads(&self, user: &str) -> Result<Vec<(u32, HeadRecord)>> {
        by_device(&self.queues, &keys::head_prefix(&self.keyring.user(user)))
    }

    /// Whether the user's heads were stored exact when their last writer closed the queues.
    pub(super) fn closed(&self, user: &str) -> Result<bool> {
        Ok(self
            .queues
            .contains_key(keys::closed(&self.keyring.user(user)))?)
    }

    /// The highest sequence number each device was given by a send whose dedup record is
    /// stored: a queue's end, also once acknowledgements have emptied it (its head is a
    /// checkpoint; see `recovery`); and every send's keyed id with when it falls due next
    /// (an undecodable record's: `undecodable_due_ms`). Reads every dedup record of the
    /// user.
    pub(super) fn dedup_ends(&self, user: &str, undecodable_due_ms: u64) -> Result<DedupEnds> {
        let mut ends = BTreeMap::new();
        let mut sends = Vec::new();
        let prefix = keys::dedup_prefix(&self.keyring.user(user));
        for kv in self.queues.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let Ok(id) = Hashed::try_from(&k[prefix.len()..]) else {
                continue;
            };
            let record: DedupRecord = match records::decode(&v) {
                Ok(r) => r,
                Err(StoreError::Corruption(e)) => {
                    tracing::warn!(error = %e, "a dedup record does not decode");
                    metrics::counter!("sealpost_corrupt_records_total").increment(1);
                    sends.push((undecodable_due_ms, id));
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Layout 2's records say 0: their envelopes have index entries of their own.
            let next = match record.envelopes_expire_ms {
                0 => record.expires_ms,
                envelopes => envelopes.min(record.expires_ms),
            };
            sends.push((next, id));
            for (device, seq) in record.stored {
                let end = ends.entry(device).or_insert(seq);
                *end = (*end).max(seq);
            }
        }
        Ok((ends, sends))
    }

    /// The envelope with the highest stored sequence number of a device queue (`None` for
    /// its record if that was shredded).
    pub(super) fn last_envelope(
        &self,
        user: &str,
        device: u32,
    ) -> Result<Option<(u64, Option<EnvelopeRecord>)>> {
        match self
            .queues
            .scan_prefix(keys::envelope_prefix(&self.keyring.user(user), device))
            .next_back()
        {
            Some(kv) => {
                let (k, v) = kv?;
                let seq = keys::envelope_seq(&k)
                    .ok_or_else(|| StoreError::Corruption("short envelope key".into()))?;
                Ok(Some((seq, self.envelope(&k, &v)?)))
            }
            None => Ok(None),
        }
    }

    /// Up to `limit` envelopes of a device queue with `seq >= from`, in order. Shredded
    /// ones (deleted before their key was destroyed, then brought back by a crash) are
    /// skipped: they were acknowledged.
    pub(super) fn read(
        &self,
        user: &str,
        device: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, EnvelopeRecord)>> {
        let u = self.keyring.user(user);
        let start = keys::envelope(&u, device, from);
        let end = keys::envelope(&u, device, u64::MAX);
        let mut out = Vec::new();
        for kv in self.queues.range(start..=end) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let seq = keys::envelope_seq(&k)
                .ok_or_else(|| StoreError::Corruption("short envelope key".into()))?;
            if let Some(record) = self.envelope(&k, &v)? {
                out.push((seq, record));
            }
        }
        Ok(out)
    }

    /// How many envelopes a device queue holds from `from` on, and their ciphertext bytes.
    /// Shredded ones (acknowledged) are not counted; an undecodable one counts with no bytes
    /// (the sweep removes it when it falls due) rather than keeping the queue from opening.
    pub(super) fn count_from(&self, user: &str, device: u32, from: u64) -> Result<(u64, u64)> {
        let u = self.keyring.user(user);
        let range = keys::envelope(&u, device, from)..=keys::envelope(&u, device, u64::MAX);
        let (mut count, mut bytes) = (0, 0);
        for kv in self.queues.range(range) {
            let (k, v) = kv?;
            match self.envelope(&k, &v) {
                Ok(Some(record)) => {
                    count += 1;
                    bytes += record.ciphertext.len() as u64;
                }
                Ok(None) => {}
                Err(StoreError::Corruption(e)) => {
                    tracing::warn!(error = %e, "a queued envelope does not decode");
                    metrics::counter!("sealpost_corrupt_records_total").increment(1);
                    count += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok((count, bytes))
    }

    /// The envelope at `seq` of a device queue: `None` if absent, `Some(None)` if shredded.
    pub(super) fn envelope_at(
        &self,
        user: &str,
        device: u32,
        seq: u64,
    ) -> Result<Option<Option<EnvelopeRecord>>> {
        let k = keys::envelope(&self.keyring.user(user), device, seq);
        match self.queues.get(&k)? {
            Some(v) => Ok(Some(self.envelope(&k, &v)?)),
            None => Ok(None),
        }
    }

    /// Whether layout 2's per-envelope expiry index entry for the envelope at `seq` exists
    /// (layouts 3 and 4 index sends, through their dedup records).
    pub(super) fn indexed_alone(
        &self,
        user: &str,
        device: u32,
        seq: u64,
        expires_ms: u64,
    ) -> Result<bool> {
        let u = self.keyring.user(user);
        Ok(self
            .queues
            .contains_key(keys::expiry_envelope(expires_ms, &u, device, seq))?)
    }

    /// The sequence numbers stored in a device queue (used when a device is removed).
    pub(super) fn seqs(&self, user: &str, device: u32) -> Result<Vec<u64>> {
        self.queues
            .scan_prefix(keys::envelope_prefix(&self.keyring.user(user), device))
            .keys()
            .map(|k| {
                keys::envelope_seq(&k?)
                    .ok_or_else(|| StoreError::Corruption("short envelope key".into()))
            })
            .collect()
    }

    /// What names `user`'s queue ends after its last committed send, if any send was made
    /// since layout 4.
    pub(super) fn last_send(&self, user: &str) -> Result<Option<LastSendRecord>> {
        self.queues
            .get(keys::last_send(&self.keyring.user(user)))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    /// A page of `user`'s sends.
    pub(super) fn page(&self, user: &str, page: u64) -> Result<Option<PageRecord>> {
        self.queues
            .get(keys::page(&self.keyring.user(user), page))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    /// `user`'s pages, newest first, as long as `more` asks for the next one; and the number
    /// a new page gets. An undecodable page is counted and passed over.
    pub(super) fn pages_back(
        &self,
        user: &str,
        mut more: impl FnMut(PageRecord) -> bool,
    ) -> Result<u64> {
        let prefix = keys::page_prefix(&self.keyring.user(user));
        let mut next = 0;
        for kv in self.queues.scan_prefix(&prefix).rev() {
            let (k, v) = kv?;
            let page = keys::envelope_seq(&k)
                .ok_or_else(|| StoreError::Corruption("short page key".into()))?;
            next = next.max(page + 1);
            match records::decode(&v) {
                Ok(record) => {
                    if !more(record) {
                        break;
                    }
                }
                Err(StoreError::Corruption(e)) => {
                    tracing::warn!(error = %e, "a page of sends does not decode");
                    metrics::counter!("sealpost_corrupt_records_total").increment(1);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(next)
    }

    /// Whether `user` has dedup records of layouts 2-4.
    pub(super) fn has_dedup_records(&self, user: &str) -> Result<bool> {
        Ok(self
            .queues
            .scan_prefix(keys::dedup_prefix(&self.keyring.user(user)))
            .next()
            .transpose()?
            .is_some())
    }

    /// The dedup record of a send, by the keyed hash of its id.
    pub(super) fn dedup(&self, user: &str, id: &Hashed) -> Result<Option<DedupRecord>> {
        self.queues
            .get(keys::dedup(&self.keyring.user(user), id))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    /// Up to `limit` index entries due at or before `now_ms`.
    ///
    /// An entry that does not decode (a damaged key or sealed value) names nobody whose
    /// envelopes could be found from it. It is skipped and counted: one such entry must not
    /// stop every user's expiry, as failing the whole scan would. It is kept, not deleted:
    /// entries that fail because the keyring is not this directory's decode again once it
    /// is put back. Sends that only a damaged entry listed stay until their user's queues are
    /// next recounted (after an unclean stop). A scan passes over at most `limit` of them,
    /// so that an index that does not decode at all costs no more than a full batch; more
    /// than that many ahead of the rest hold the rest back, as a single one did before.
    pub(super) fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Due>> {
        let mut out = Vec::new();
        let mut undecodable = 0usize;
        // Layouts 2 to 4 first: nothing writes their entries any more, so they run out.
        'layouts: for tag in [
            keys::EXPIRY_ENVELOPE,
            keys::EXPIRY_DEDUP,
            keys::EXPIRY_SENDS,
            keys::EXPIRY_PAGE,
        ] {
            if out.len() >= limit || undecodable >= limit {
                break;
            }
            let range = vec![tag]..keys::expiry_until(tag, now_ms);
            for kv in self.queues.range(range) {
                let (k, v) = kv?;
                match self.due_entry(tag, &k, &v) {
                    Some(due) => out.push(due),
                    None => undecodable += 1,
                }
                if out.len() >= limit || undecodable >= limit {
                    break 'layouts;
                }
            }
        }
        // A scan that saw every due entry knows how many do not decode; one cut short by the
        // limit knows at least how many.
        let whole = out.len() < limit && undecodable < limit;
        let before = if whole {
            self.undecodable_index.swap(undecodable, Ordering::Relaxed)
        } else {
            self.undecodable_index
                .fetch_max(undecodable, Ordering::Relaxed)
        };
        let known = if whole {
            undecodable
        } else {
            before.max(undecodable)
        };
        metrics::gauge!("sealpost_undecodable_index_entries").set(known as f64);
        if known != before && known > 0 {
            tracing::warn!(count = known, "expiry index entries do not decode; skipped");
        }
        Ok(out)
    }

    /// What the expiry index entry `key` -> `value` (of layout `tag`) asks for, if it decodes.
    fn due_entry(&self, tag: u8, key: &[u8], value: &[u8]) -> Option<Due> {
        let (at_ms, rest) = keys::split_expiry(key)?;
        match tag {
            keys::EXPIRY_ENVELOPE => {
                let user = self.keyring.open_index(key, value)?;
                let (device, seq) = keys::device_seq(rest)?;
                Some(Due::Envelope {
                    user,
                    device,
                    seq,
                    expires_ms: at_ms,
                })
            }
            keys::EXPIRY_DEDUP => {
                let user = self.keyring.open_index(key, value)?;
                Some(Due::Dedup {
                    user,
                    id: rest.try_into().ok()?,
                    expires_ms: at_ms,
                })
            }
            keys::EXPIRY_PAGE => {
                let user = self.keyring.open_index(key, value)?;
                Some(Due::Page {
                    user,
                    due_ms: at_ms,
                    page: u64::from_be_bytes(rest.try_into().ok()?),
                })
            }
            _ => {
                let entry = u64::from_be_bytes(rest.try_into().ok()?);
                let (user, ids) = self.keyring.open_index_list(key, value)?;
                Some(Due::Sends {
                    user,
                    due_ms: at_ms,
                    entry,
                    ids,
                })
            }
        }
    }
}
