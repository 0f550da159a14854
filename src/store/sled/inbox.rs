//! [`Inbox`] on tree `queues`: envelopes, queue heads, pages of sends and the expiry index,
//! all written in an order whose every crash-surviving prefix is consistent (see `queues`),
//! and made durable by one group commit shared by many appends.
//!
//! A delivered envelope costs two new keys: the envelope, then on its acknowledgement its
//! deletion. Each send also overwrites the user's `L` record, which commits it (see
//! `recovery`). Heads live in memory and are stored as checkpoints and when the queues close.
//! So do the writer's sends: it lists them in memory and stores the list every
//! [`INDEX_EVERY`] sends and when it closes, as one page with one expiry index entry. Until
//! then one stored *wake* entry (a `Z` entry listing nothing), due when the first listed send
//! is, brings the sweep to the writer, or after a crash to the recount that pages again what
//! is queued of them. Expiry finds a send's envelopes through its page. Retries are answered
//! from memory: the ids of the sends of the dedup window (the writer's own, and those of the
//! recent pages it loads when it opens the queues).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use super::{
    Inner, SledStore,
    keyring::HashedMap,
    queues::{QueueOp, QueueWrite},
    recovery,
};
use crate::store::{
    AppendError, Appended, Due, EnvelopeRecord, Inbox, NewEnvelope, Placement, QueueLimits, Result,
    StoreError, StoreFuture, Trim, UserInbox,
    keys::Hashed,
    ready,
    records::{self, HeadRecord, PagedSend},
};

impl Inbox for SledStore {
    fn open(
        &self,
        user: &str,
        devices: &[u32],
        limits: QueueLimits,
    ) -> StoreFuture<Box<dyn UserInbox>> {
        let queues: Box<dyn UserInbox> = match self.writer(user, devices, limits) {
            Ok(queues) => Box::new(queues),
            Err(e) => return ready(Err(e)),
        };
        // Writes of a previous writer are durable unless a flush failed and none has
        // succeeded since: then what was loaded may hold writes that are not, and nothing
        // may be pushed until a flush succeeds.
        if self
            .inner()
            .health
            .flush_ok
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return ready(Ok(queues));
        }
        let durable = self.inner().sync();
        Box::pin(async move { durable.await.map(|()| queues) })
    }

    fn due(&self, now_ms: u64, limit: usize) -> StoreFuture<Vec<Due>> {
        // The sweep is this backend's clock for the age-based key rotation too.
        let inner = self.inner();
        match inner.keyring.rotate(now_ms, super::ROTATION_BUDGET) {
            // What it left to destroy goes after the next flush: ask for one.
            Ok(true) => drop(inner.committer.request(false)),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "key rotation failed"),
        }
        ready(inner.due(now_ms, limit))
    }
}

/// A writer stores the sends it lists once it holds this many (and when it closes the
/// queues): one page and its expiry index entry, instead of a record per send. It bounds
/// what a crash makes the next writer page again.
pub(super) const INDEX_EVERY: usize = 64;

impl SledStore {
    /// The single writer of `user`'s queues, recovered (see [`Inbox::open`]).
    fn writer(&self, user: &str, devices: &[u32], limits: QueueLimits) -> Result<SledUserInbox> {
        let inner = self.inner();
        let now = crate::clock::now_ms();
        let heads = recovery::recover_heads(&inner, user, devices, now)?;
        let mut recent = Vec::new();
        // Pages are numbered in the order their sends were made: the recent ones are last,
        // and the first page none of whose sends is remembered any more ends the window.
        let next_page = inner.pages_back(user, |page| {
            let before = recent.len();
            recent.extend(page.sends.into_iter().filter(|s| s.dedup_until_ms > now));
            recent.len() > before
        })?;
        let mut remembered = Remembered::default();
        for send in recent {
            remembered.insert(send.id, send.dedup_until_ms, now);
        }
        Ok(SledUserInbox {
            inner: inner.clone(),
            user: user.to_owned(),
            limits,
            paged_from: heads.iter().map(|(d, h)| (*d, h.next_seq)).collect(),
            heads,
            unpaged: Vec::new(),
            next_page,
            remembered,
            legacy_dedup: inner.has_dedup_records(user)?,
            pending: Arc::default(),
            checked_new: None,
            expired: Expired::default(),
            listed: Vec::new(),
            wake: None,
            failed: false,
        })
    }
}

/// Removes a send from its user's pending sends when dropped.
struct LeavesPending {
    pending: Arc<Mutex<HashedMap<Placement>>>,
    id: Hashed,
}

impl Drop for LeavesPending {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// One user's queues: the heads live here, written by this handle alone.
struct SledUserInbox {
    inner: Arc<Inner>,
    user: String,
    limits: QueueLimits,
    /// The stored head of each open queue (next sequence number, count, bytes).
    heads: BTreeMap<u32, HeadRecord>,
    /// Sends written but not yet durable, by the keyed hash of their envelope id, with where
    /// they were stored: a retry waits for durability like the original, and the sweep leaves
    /// them for later.
    pending: Arc<Mutex<HashedMap<Placement>>>,
    /// Sends of the dedup window, answering retries.
    remembered: Remembered,
    /// The user has dedup records of layouts 2-4: a retry not remembered is looked up there.
    legacy_dedup: bool,
    /// Sends listed but not yet in a stored page.
    unpaged: Vec<PagedSend>,
    /// Per queue, the first sequence number whose send is not in a stored page.
    paged_from: BTreeMap<u32, u64>,
    /// The number of the next page this writer stores.
    next_page: u64,
    /// The id [`UserInbox::duplicate`] last found new: its append, which the writer makes
    /// next, need not look it up again.
    checked_new: Option<[u8; 16]>,
    /// Envelopes the sweep removed lately, so that a trim need not read whether each
    /// acknowledged one is still stored.
    expired: Expired,
    /// Layout 4's sends (which have dedup records) not yet in a stored index entry: (when
    /// it falls due, keyed id).
    listed: Vec<(u64, Hashed)>,
    /// The wake entry this writer stored for them: (due second, nonce).
    wake: Option<(u64, u64)>,
    /// A write failed: what is in memory may not be what is stored, so closing does not
    /// mark the heads exact.
    failed: bool,
}

/// The sends whose retries are answered as duplicates: by keyed id, until when. About 45
/// bytes a send, for the sends of the dedup window (`dedup_secs`) while the mailbox is open;
/// no placement (a duplicate's is answered while the writer still lists the send).
#[derive(Default)]
struct Remembered {
    sends: HashedMap<u64>,
    /// How many were remembered after the last pass that forgot what is past its window.
    kept: usize,
}

impl Remembered {
    /// Remembers a send until `until_ms`; forgets what is past its window at `now_ms` once
    /// the map has doubled since the last time (amortized: one pass per send remembered).
    fn insert(&mut self, id: Hashed, until_ms: u64, now_ms: u64) {
        self.sends.insert(id, until_ms);
        if self.sends.len() >= 2 * self.kept.max(512) {
            self.sends.retain(|_, until| *until > now_ms);
            self.sends.shrink_to_fit();
            self.kept = self.sends.len();
        }
    }

    /// Whether the send `id` is remembered at `now_ms`.
    fn holds(&self, id: &Hashed, now_ms: u64) -> bool {
        self.sends.get(id).is_some_and(|until| *until > now_ms)
    }
}

/// The (device, seq) of envelopes the sweep removed lately. A mailbox never acknowledges one
/// of those (it marks the ones in flight as expired, and the rest are never delivered), so a
/// trim trusts that what it is given is stored, but for these: recent ones, in case an ack
/// crossed the sweep. Bounded: past [`Expired::MAX`] entries the older ones are forgotten.
#[derive(Default)]
struct Expired(std::collections::BTreeSet<(u32, u64)>);

impl Expired {
    const MAX: usize = 4096;

    fn insert(&mut self, device: u32, seq: u64) {
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        self.0.insert((device, seq));
    }

    /// Whether the envelope at `seq` is still stored, as far as trims need to know.
    fn holds(&mut self, device: u32, seq: u64) -> bool {
        !self.0.remove(&(device, seq))
    }
}

impl SledUserInbox {
    /// Applies `write`, noting a failure (see `failed`).
    fn write(&mut self, write: QueueWrite) -> Result<()> {
        let written = self.inner.write(write);
        if written.is_err() {
            self.failed = true;
            // Whether its wake entry is stored is not known now: the next write stores one.
            self.wake = None;
        }
        written
    }

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

    fn pending(&self) -> std::sync::MutexGuard<'_, HashedMap<Placement>> {
        // Holds only ids; a panic elsewhere cannot leave it half-updated.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writes storing what is listed, which leaves the list: layout 4's index entries and
    /// a page of sends; the wake entry goes after them (unless the writer failed: see
    /// [`UserInbox::expire`]).
    fn index_writes(&mut self) -> Vec<QueueOp> {
        let mut ops = recovery::index_entries(&self.user, self.listed.drain(..));
        if let Some((page, sends)) = self.next_page() {
            ops.extend(recovery::page_write(&self.user, page, sends));
            self.paged();
        }
        ops.extend(self.unwake());
        ops
    }

    /// The page that would list the sends not yet paged: its number and the sends. Nothing
    /// changes until [`Self::paged`] says it is written.
    fn next_page(&self) -> Option<(u64, Vec<PagedSend>)> {
        (!self.unpaged.is_empty()).then(|| (self.next_page, self.unpaged.clone()))
    }

    /// The page [`Self::next_page`] made is written: its sends leave the list, and the queues'
    /// unpaged sends begin at their ends.
    fn paged(&mut self) {
        self.unpaged.clear();
        self.next_page += 1;
        self.paged_from = self.heads.iter().map(|(d, h)| (*d, h.next_seq)).collect();
    }

    /// The deletion of the stored wake entry, if any, unless the writer failed: its memory of
    /// what is listed may be wrong, so the entry stays for a new writer, which counts again.
    fn unwake(&mut self) -> Option<QueueOp> {
        let (due_ms, nonce) = self.wake.take()?;
        (!self.failed).then(|| QueueOp::Unwake {
            user: self.user.clone(),
            due_ms,
            nonce,
        })
    }

    /// A wake entry due with the first listed send, if the stored one is not due by then, and
    /// the deletion of the one it replaces. `newest` is the send listed last, if that is all
    /// that changed: only it can be due before the stored entry.
    fn wake_write(&mut self, newest: Option<u64>) -> Vec<QueueOp> {
        let first = match (self.wake, newest) {
            (Some((at, _)), Some(due_ms)) if at <= recovery::due_second(due_ms) => {
                return Vec::new();
            }
            (Some(_), Some(due_ms)) => recovery::due_second(due_ms),
            _ => match self
                .listed
                .iter()
                .map(|(at, _)| *at)
                .chain(self.unpaged.iter().map(|s| s.envelopes_expire_ms))
                .min()
            {
                Some(at) => recovery::due_second(at),
                None => return Vec::new(),
            },
        };
        if self.wake.is_some_and(|(at, _)| at <= first) {
            return Vec::new();
        }
        let replaced = self.unwake();
        let nonce = rand::random();
        self.wake = Some((first, nonce));
        let mut ops = vec![QueueOp::IndexSends {
            user: self.user.clone(),
            due_ms: first,
            nonce,
            ids: Vec::new(),
        }];
        ops.extend(replaced);
        ops
    }
}

impl UserInbox for SledUserInbox {
    fn ends(&self) -> Vec<(u32, u64)> {
        self.heads.iter().map(|(d, h)| (*d, h.next_seq)).collect()
    }

    fn add_queue(&mut self, device: u32) -> u64 {
        let end = self
            .heads
            .entry(device)
            .or_insert_with(recovery::empty_head)
            .next_seq;
        self.paged_from.entry(device).or_insert(end);
        end
    }

    fn duplicate(&mut self, id: &[u8; 16]) -> Result<Option<StoreFuture<Appended>>> {
        let hashed = self.inner.keyring.id(id);
        if let Some(stored) = self.pending().get(&hashed).cloned() {
            return Ok(Some(self.when_durable(true, stored)));
        }
        let original = if self.remembered.holds(&hashed, crate::clock::now_ms()) {
            let listed = self.unpaged.iter().rev().find(|s| s.id == hashed);
            Some(listed.map(|s| s.stored.clone()).unwrap_or_default())
        } else if self.legacy_dedup {
            self.inner
                .dedup(&self.user, &hashed)?
                .map(|record| record.stored)
        } else {
            None
        };
        self.checked_new = original.is_none().then_some(*id);
        Ok(original.map(|stored| self.when_durable(true, stored)))
    }

    fn append(&mut self, envelope: NewEnvelope<'_>) -> Result<StoreFuture<Appended>, AppendError> {
        // Only this handle writes these queues: an id found new just now is still new.
        if self.checked_new.take() != Some(envelope.id) {
            if let Some(original) = self.duplicate(&envelope.id)? {
                return Ok(original);
            }
            // Checked here, not by the caller: what `duplicate` noted is used up now, or a
            // second append of this id would skip its check and store it twice.
            self.checked_new = None;
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
        let hashed = self.inner.keyring.id(&envelope.id);
        let stored: Placement = staged
            .iter()
            .map(|copy| (copy.device, copy.head.next_seq))
            .collect();
        self.unpaged.push(PagedSend {
            id: hashed,
            dedup_until_ms: envelope.remember_until_ms,
            envelopes_expire_ms: envelope.expires_ms,
            stored: stored.clone(),
        });
        let index = self.wake_write(Some(envelope.expires_ms));
        let (mut write, heads) = recovery::send_write(&self.user, index, &template, &staged);
        let mut after = self.heads.clone();
        after.extend(staged.iter().map(|c| c.device).zip(heads.iter().copied()));
        // Last: it commits the send.
        write.ops.push(recovery::last_send(
            &self.user,
            &after,
            &self.paged_from,
            &self.unpaged,
            envelope
                .remember_until_ms
                .saturating_sub(envelope.accepted_ms),
        ));
        if let Err(e) = self.write(write) {
            // Not committed (`L` goes last, and a failed write stops where it failed): a page
            // written later must not list it, or a retry would be taken for a duplicate of
            // what is not stored.
            self.unpaged.pop();
            return Err(e.into());
        }
        for (head, copy) in heads.into_iter().zip(&staged) {
            self.heads.insert(copy.device, head);
            crate::telemetry::QUEUE_DEPTH.record(head.count as f64);
        }
        // The page goes after `L` (it must never list a send that `L` does not commit), in
        // a write of its own: the send is committed whatever becomes of it.
        if self.unpaged.len() >= INDEX_EVERY || self.listed.len() >= INDEX_EVERY {
            let mut ops = recovery::index_entries(&self.user, self.listed.drain(..));
            let page = self.next_page();
            if let Some((number, sends)) = page.clone() {
                ops.extend(recovery::page_write(&self.user, number, sends));
            }
            ops.extend(self.unwake());
            match self.write(QueueWrite { ops }) {
                Ok(()) if page.is_some() => self.paged(),
                Ok(()) => {}
                // Its sends stay listed, and named in `L`: the next send tries again.
                Err(e) => tracing::warn!(error = %e, "storing a page of sends failed"),
            }
        }
        self.remembered
            .insert(hashed, envelope.remember_until_ms, envelope.accepted_ms);
        self.pending().insert(hashed, stored.clone());
        let answer = self.when_durable(false, stored);
        // The id leaves `pending` when the answer resolves, or if the caller drops it unawaited.
        let leaving = LeavesPending {
            pending: self.pending.clone(),
            id: hashed,
        };
        Ok(Box::pin(async move {
            let _leaving = leaving;
            answer.await
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
        let mut removed = Vec::with_capacity(acked.len());
        for t in acked {
            // One already gone (expired meanwhile) was taken off the counts then: counting it
            // again would undercount the queue against its quota for good.
            if !self.expired.holds(device, t.seq) {
                continue;
            }
            removed.push(t.seq);
            head.count = head.count.saturating_sub(1);
            head.bytes = head.bytes.saturating_sub(t.bytes);
        }
        let write = recovery::trim_write(&self.user, device, &removed);
        self.write(write)?;
        self.heads.insert(device, head);
        if head.count == 0 {
            self.inner.drained(&self.user, device);
        }
        // Nobody waits for the deletions: they may share the next send's flush.
        Ok(self.inner.flushed(false))
    }

    fn close(mut self: Box<Self>) {
        if self.failed {
            return;
        }
        // The list before the mark: a writer that closed left every send indexed.
        let mut write = QueueWrite {
            ops: self.index_writes(),
        };
        write
            .ops
            .extend(recovery::close_write(&self.user, &self.heads).ops);
        if let Err(e) = self.write(write) {
            tracing::warn!(error = %e, "storing the queue heads at close failed");
        }
    }

    fn drop_queue(&mut self, device: u32) -> Result<StoreFuture<()>> {
        let mut write = QueueWrite::default();
        for seq in self.inner.seqs(&self.user, device)? {
            write.ops.push(QueueOp::Remove {
                user: self.user.clone(),
                device,
                seq,
            });
        }
        write.ops.push(QueueOp::DropHead {
            user: self.user.clone(),
            device,
        });
        self.write(write)?;
        self.heads.remove(&device);
        self.paged_from.remove(&device);
        self.inner.drained(&self.user, device);
        Ok(self.inner.sync())
    }

    fn expire(&mut self, due: Vec<Due>) -> Result<Vec<(u32, u64)>> {
        let expired = self.sweep(due);
        // Sends it took off the list may be neither expired nor listed now: the next writer
        // counts the queues again, which lists them anew.
        self.failed |= expired.is_err();
        expired
    }
}

impl SledUserInbox {
    /// [`UserInbox::expire`].
    fn sweep(&mut self, due: Vec<Due>) -> Result<Vec<(u32, u64)>> {
        let mut sweep = Sweep::default();
        // What this writer lists falls due with the entries it is handed (a wake entry is due
        // when the first is). Taken off the list first: what the entries list again must
        // stay listed.
        let cut_ms = due
            .iter()
            .filter_map(|d| match d {
                Due::Sends { due_ms, .. } => Some(*due_ms),
                _ => None,
            })
            .max();
        let mut listed_due = Vec::new();
        // Sends not yet paged that are due are paged now, and their page swept at once. What
        // to put back if the write fails: the sends and where the unpaged ones began.
        let mut paged = Vec::new();
        let mut undo = None;
        if let Some(cut_ms) = cut_ms {
            let (due, kept) = std::mem::take(&mut self.listed)
                .into_iter()
                .partition::<Vec<_>, _>(|(at, _)| *at <= cut_ms);
            self.listed = kept;
            listed_due = due;
            if self.unpaged.iter().any(|s| s.envelopes_expire_ms <= cut_ms)
                && let Some((page, sends)) = self.next_page()
            {
                let due_ms = recovery::page_due(&sends);
                paged = recovery::page_write(&self.user, page, sends.clone());
                undo = Some((sends.clone(), self.paged_from.clone()));
                self.expire_page(&mut sweep, page, sends, cut_ms, due_ms)?;
                self.paged();
            }
        }
        for entry in due {
            match entry {
                // Layout 2 indexed each envelope on its own.
                Due::Envelope {
                    device,
                    seq,
                    expires_ms,
                    ..
                } => {
                    self.expire_envelope(&mut sweep, device, seq, expires_ms, None)?;
                    sweep.write.ops.push(QueueOp::Unindex(entry));
                }
                Due::Sends {
                    ref ids,
                    due_ms,
                    entry: nonce,
                    ..
                } => {
                    for id in ids {
                        self.expire_send(&mut sweep, *id, due_ms)?;
                    }
                    if ids.is_empty() && self.failed {
                        // A wake entry stays while this writer's memory may be wrong: once it
                        // has gone, the entry brings a new writer, which counts again.
                        continue;
                    }
                    if self.wake == Some((due_ms, nonce)) {
                        self.wake = None;
                    }
                    sweep.write.ops.push(QueueOp::Unindex(entry));
                }
                Due::Page { due_ms, page, .. } => match self.inner.page(&self.user, page) {
                    Ok(Some(record)) => {
                        self.expire_page(&mut sweep, page, record.sends, due_ms, Some(due_ms))?;
                    }
                    Ok(None) => sweep.write.ops.push(QueueOp::Unindex(entry)),
                    Err(e @ StoreError::Corruption(_)) => {
                        corrupt(&e);
                        sweep.write.ops.push(QueueOp::DropPage {
                            user: self.user.clone(),
                            page,
                        });
                        sweep.write.ops.push(QueueOp::Unindex(entry));
                    }
                    Err(e) => return Err(e),
                },
                Due::Dedup { id, expires_ms, .. } => {
                    if self.pending().contains_key(&id) {
                        continue;
                    }
                    // The entry stands for the send only if its record has this time: a crash
                    // can leave an entry whose send was rolled back, and a retry of a torn send
                    // may have written the record again with a later expiry.
                    let record = match self.inner.dedup(&self.user, &id) {
                        Ok(record) => record,
                        Err(e @ StoreError::Corruption(_)) => {
                            corrupt(&e);
                            sweep.write.ops.push(QueueOp::ForgetDedup {
                                user: self.user.clone(),
                                id,
                                expires_ms,
                            });
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let Some(record) = record else {
                        sweep.write.ops.push(QueueOp::Unindex(entry));
                        continue;
                    };
                    let envelopes_due = record.envelopes_expire_ms == expires_ms;
                    if envelopes_due {
                        for &(device, seq) in &record.stored {
                            self.expire_envelope(&mut sweep, device, seq, expires_ms, Some(&id))?;
                        }
                    }
                    if record.expires_ms == expires_ms
                        || (envelopes_due && record.expires_ms < expires_ms)
                    {
                        sweep.write.ops.push(QueueOp::ForgetDedup {
                            user: self.user.clone(),
                            id,
                            expires_ms,
                        });
                    } else if envelopes_due {
                        sweep.write.ops.push(QueueOp::Reindex {
                            user: self.user.clone(),
                            id,
                            from_ms: expires_ms,
                            to_ms: record.expires_ms,
                        });
                    } else {
                        sweep.write.ops.push(QueueOp::Unindex(entry));
                    }
                }
            }
        }
        if let Some(cut_ms) = cut_ms {
            for (_, id) in listed_due {
                self.expire_send(&mut sweep, id, cut_ms)?;
            }
        }
        let Sweep {
            write: removes,
            expired,
            mut heads,
            ..
        } = sweep;
        // A forgotten dedup record may have been the only word on a queue's end (see
        // `recovery`): the heads go first then.
        if removes
            .ops
            .iter()
            .any(|op| matches!(op, QueueOp::ForgetDedup { .. } | QueueOp::ForgetSend { .. }))
        {
            for (device, head) in &self.heads {
                heads.entry(*device).or_insert(*head);
            }
        }
        // Heads first, as in a trim.
        let mut write = QueueWrite {
            ops: heads
                .iter()
                .map(|(device, head)| QueueOp::Head {
                    user: self.user.clone(),
                    device: *device,
                    head: *head,
                })
                .collect(),
        };
        // A page made now is stored before what its sweep writes.
        write.ops.extend(paged);
        // What is listed again is stored, or woken for, before the entries that listed it go.
        if self.listed.len() >= INDEX_EVERY {
            let index = self.index_writes();
            write.ops.extend(index);
        } else {
            write.ops.extend(self.wake_write(None));
        }
        write.ops.extend(removes.ops);
        if write.is_empty() {
            return Ok(expired);
        }
        if let Err(e) = self.write(write) {
            if let Some((sends, paged_from)) = undo {
                self.unpaged = sends;
                self.paged_from = paged_from;
                self.next_page -= 1;
            }
            return Err(e);
        }
        for &(device, seq) in &expired {
            self.expired.insert(device, seq);
        }
        for (device, head) in &heads {
            if head.count == 0 {
                self.inner.drained(&self.user, *device);
            }
        }
        self.heads.extend(heads);
        Ok(expired)
    }
}

/// What one expiry sweep of a user's queues writes.
#[derive(Default)]
struct Sweep {
    write: QueueWrite,
    /// (device, seq) of the envelopes it removes.
    expired: Vec<(u32, u64)>,
    /// The heads it changes.
    heads: BTreeMap<u32, HeadRecord>,
    /// The envelopes and sends it has dealt with: an entry may list a send another one lists
    /// too (a recount lists every send again), and its reads do not see its own writes, so a
    /// second visit would count an envelope off its queue twice.
    seen: std::collections::HashSet<(u32, u64)>,
    sends: std::collections::HashSet<Hashed>,
}

impl SledUserInbox {
    /// Expires what of the page `page`'s sends is due by `now_ms`: their envelopes; a send
    /// whose envelopes are gone stays listed until its dedup window ends, and the page goes
    /// with its last send. `entry_ms` is when its index entry that brought the sweep is due
    /// (`None` for a page stored by this sweep): a new entry replaces it if the page is due
    /// at another time.
    fn expire_page(
        &mut self,
        sweep: &mut Sweep,
        page: u64,
        mut sends: Vec<PagedSend>,
        now_ms: u64,
        entry_ms: Option<u64>,
    ) -> Result<()> {
        let before = sends.len();
        let mut changed = false;
        for send in &mut sends {
            if send.stored.is_empty()
                || send.envelopes_expire_ms > now_ms
                || self.pending().contains_key(&send.id)
            {
                continue;
            }
            // Not deduplicated by id: a retry after the dedup window is another send with the
            // same id. `Sweep::seen` keeps an envelope listed twice from counting twice.
            for &(device, seq) in &send.stored {
                self.expire_envelope(sweep, device, seq, send.envelopes_expire_ms, Some(&send.id))?;
            }
            send.stored.clear();
            changed = true;
        }
        sends.retain(|s| !s.stored.is_empty() || s.dedup_until_ms > now_ms);
        changed |= sends.len() != before;
        let user = || self.user.clone();
        let due_ms = recovery::page_due(&sends);
        let ops = &mut sweep.write.ops;
        match due_ms {
            None => ops.push(QueueOp::DropPage { user: user(), page }),
            Some(due_ms) => {
                // The new entry first: a page is never left without one.
                if entry_ms != Some(due_ms) {
                    ops.push(QueueOp::PageDue {
                        user: user(),
                        page,
                        due_ms,
                    });
                }
                if changed {
                    ops.push(QueueOp::Page {
                        user: user(),
                        page,
                        record: records::PageRecord {
                            version: records::RECORD_VERSION,
                            sends,
                        },
                    });
                }
            }
        }
        if let Some(entry_ms) = entry_ms.filter(|at| due_ms != Some(*at)) {
            ops.push(QueueOp::Unindex(Due::Page {
                user: user(),
                due_ms: entry_ms,
                page,
            }));
        }
        Ok(())
    }

    /// Expires what of the send `id` (listed in an index entry, or by this writer) is due by
    /// `now_ms`: its envelopes, then its dedup record; what is not due yet is listed again.
    fn expire_send(&mut self, sweep: &mut Sweep, id: Hashed, now_ms: u64) -> Result<()> {
        if !sweep.sends.insert(id) {
            return Ok(());
        }
        if self.pending().contains_key(&id) {
            // Not durable yet (a send due as soon as it is made): the next sweep sees it.
            self.listed.push((now_ms.saturating_add(1), id));
            return Ok(());
        }
        let record = match self.inner.dedup(&self.user, &id) {
            Ok(Some(record)) => record,
            // Forgotten already (listed twice), or a send a crash rolled back.
            Ok(None) => return Ok(()),
            Err(e @ StoreError::Corruption(_)) => {
                corrupt(&e);
                sweep.write.ops.push(QueueOp::ForgetSend {
                    user: self.user.clone(),
                    id,
                });
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // The record goes only with or after its envelopes: a stored envelope without its
        // dedup record is taken for a torn send (`recovery`).
        if record.envelopes_expire_ms > now_ms {
            self.listed.push((record.envelopes_expire_ms, id));
            return Ok(());
        }
        // Layout 2's records say 0: their envelopes have index entries of their own.
        if record.envelopes_expire_ms != 0 {
            for &(device, seq) in &record.stored {
                self.expire_envelope(sweep, device, seq, record.envelopes_expire_ms, Some(&id))?;
            }
        }
        if record.expires_ms <= now_ms {
            sweep.write.ops.push(QueueOp::ForgetSend {
                user: self.user.clone(),
                id,
            });
        } else {
            self.listed.push((record.expires_ms, id));
        }
        Ok(())
    }

    /// Removes the envelope at `seq` of `device` if it is the one that expires at
    /// `expires_ms` (and, when known, has the id whose keyed hash is `id`): the sequence
    /// number may hold nothing, or — after a torn send was rolled back — another envelope. An
    /// undecodable envelope is removed too (its byte count is not known: the queue's count
    /// goes down, its bytes are reset once it is empty), rather than holding up the rest of
    /// the sweep; so is a shredded one (its key destroyed): it was deleted once already.
    fn expire_envelope(
        &self,
        sweep: &mut Sweep,
        device: u32,
        seq: u64,
        expires_ms: u64,
        id: Option<&Hashed>,
    ) -> Result<()> {
        let len = match self.inner.envelope_at(&self.user, device, seq) {
            Ok(Some(Some(r))) => (r.expires_ms == expires_ms
                && id.is_none_or(|id| self.inner.keyring.id(&r.id) == *id))
            .then_some(r.ciphertext.len() as u64),
            Ok(Some(None)) => Some(0),
            Ok(None) => None,
            Err(e @ StoreError::Corruption(_)) => {
                corrupt(&e);
                Some(0)
            }
            Err(e) => return Err(e),
        };
        let Some(len) = len else { return Ok(()) };
        if !sweep.seen.insert((device, seq)) {
            return Ok(());
        }
        sweep.write.ops.push(QueueOp::Remove {
            user: self.user.clone(),
            device,
            seq,
        });
        let Some(head) = self.heads.get(&device) else {
            return Ok(());
        };
        let head = sweep.heads.entry(device).or_insert(*head);
        head.count = head.count.saturating_sub(1);
        head.bytes = head.bytes.saturating_sub(len);
        sweep.expired.push((device, seq));
        Ok(())
    }
}

/// An undecodable record met by the expiry sweep: reported, then deleted.
fn corrupt(e: &StoreError) {
    tracing::warn!(error = %e, "an expired record does not decode; deleting it");
    metrics::counter!("sealpost_corrupt_records_total").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewEnvelope, StoreOptions, keys};

    /// A writer that failed keeps its wake entry: its memory of what it lists may be wrong,
    /// and the entry is what brings a new writer, which counts the queues again.
    #[test]
    fn a_failed_writer_leaves_its_wake_entry_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open_waiting(&StoreOptions::for_tests(dir.path())).expect("open");
        let limits = QueueLimits {
            count: 10,
            bytes: u64::MAX,
        };
        let mut writer = store.writer("bob@x", &[1], limits).expect("writer");
        let now = crate::clock::now_ms();
        let answer = writer
            .append(NewEnvelope {
                id: [1; 16],
                class: 0,
                accepted_ms: now,
                expires_ms: now + 1_000,
                remember_until_ms: now + 1_000,
                copies: vec![(1, &b"x"[..])],
            })
            .expect("append");
        drop(answer);
        let wakes = || {
            store
                .inner()
                .queues
                .scan_prefix([keys::EXPIRY_SENDS])
                .count()
        };
        assert_eq!(wakes(), 1);
        // As after a write that failed part-way.
        writer.failed = true;
        let due = store.inner().due(now + 2_000, 10).expect("due");
        assert_eq!(due.len(), 1);
        writer.expire(due).expect("expire");
        assert_eq!(wakes(), 1, "the wake entry was taken away");
        // Nor does storing the list take it away.
        assert!(
            writer
                .index_writes()
                .iter()
                .all(|op| !matches!(op, QueueOp::Unwake { .. }))
        );
        Box::new(writer).close();
        assert_eq!(wakes(), 1);
    }
}
