//! An in-memory backend of every seam, for unit tests of the actors above the store, and for
//! measuring what those layers cost without a disk (`sealpost serve --store memory`: nothing
//! is durable; never for serving users).
//!
//! Everything is "durable" the moment it is written (there is no crash to survive here). Faults
//! can be injected ([`Faults`]): I/O errors, a store short of room, failing flushes, and
//! answers that come later instead of inline (as a network backend's would), so that tests
//! reach the paths a sled store never takes.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use super::{
    AccountRecord, AppendError, Appended, Claimed, DeliveryTokenRecord, DeviceRecord, Directory,
    Due, EnvelopeRecord, EpochTaken, FallbackKeyRecord, GroupRecord, Health, Inbox, KeyCount,
    KeyKind, KeyUpload, KeysPut, LinkCodeRecord, NewEnvelope, Outbox, OutboxEntry, OutboxRecord,
    Placement, PushRecord, QueueLimits, Result, StoreError, StoreFuture, Trim, UserInbox,
    records::RECORD_VERSION,
};

/// Faults to inject; each can be switched at any time.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every operation fails with an I/O error.
    pub io: AtomicBool,
    /// The store is short of room: appends are refused with [`AppendError::NoRoom`].
    pub no_room: AtomicBool,
    /// Writes are applied but never become durable: their futures fail.
    pub flush: AtomicBool,
    /// Answers come after a yield instead of inline (as a network backend's would).
    pub deferred: AtomicBool,
}

/// The in-memory store. Clones share their state.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    /// Faults to inject.
    pub faults: Arc<Faults>,
}

#[derive(Default)]
struct State {
    accounts: BTreeMap<String, AccountRecord>,
    devices: BTreeMap<(String, u32), DeviceRecord>,
    one_time_keys: BTreeMap<(String, u32, KeyKind, u64), Vec<u8>>,
    fallback_keys: BTreeMap<(String, u32, KeyKind), FallbackKeyRecord>,
    device_lists: BTreeMap<String, Vec<u8>>,
    delivery_tokens: BTreeMap<String, DeliveryTokenRecord>,
    push: BTreeMap<(String, u32), PushRecord>,
    link_codes: BTreeMap<(String, [u8; 32]), LinkCodeRecord>,
    queues: BTreeMap<(String, u32), Queue>,
    /// Appended envelope ids: (remembered until, where stored).
    dedup: BTreeMap<(String, [u8; 16]), (u64, Placement)>,
    outbox: BTreeMap<(String, u64), OutboxRecord>,
    groups: BTreeMap<Vec<u8>, GroupRecord>,
}

/// The one-time keys of one kind of one device.
fn key_range(
    user: &str,
    device: u32,
    kind: KeyKind,
) -> std::ops::RangeInclusive<(String, u32, KeyKind, u64)> {
    (user.to_owned(), device, kind, 0)..=(user.to_owned(), device, kind, u64::MAX)
}

/// One device queue.
struct Queue {
    next_seq: u64,
    envelopes: BTreeMap<u64, EnvelopeRecord>,
}

impl Queue {
    fn new() -> Self {
        Queue {
            next_seq: 1,
            envelopes: BTreeMap::new(),
        }
    }

    fn bytes(&self) -> u64 {
        self.envelopes
            .values()
            .map(|e| e.ciphertext.len() as u64)
            .sum()
    }
}

impl MemoryStore {
    /// An empty store without faults.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not hide the state (from a test's assertions, or a benchmark).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_io(&self) -> Result<()> {
        if self.faults.io.load(Relaxed) {
            return Err(StoreError::Io("injected I/O error".into()));
        }
        Ok(())
    }

    /// Runs a read now; answers inline, or later while `deferred` is set.
    fn answer<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut State) -> Result<T>,
    ) -> StoreFuture<T> {
        let result = self.check_io().and_then(|()| op(&mut self.state()));
        self.later(result)
    }

    /// Answers a write once it is "durable" (at once, or failing while `flush` is set).
    fn durable<T: Send + 'static>(&self, result: Result<T>) -> StoreFuture<T> {
        let result = result.and_then(|value| {
            if self.faults.flush.load(Relaxed) {
                Err(StoreError::Io("injected flush failure".into()))
            } else {
                Ok(value)
            }
        });
        self.later(result)
    }

    fn later<T: Send + 'static>(&self, result: Result<T>) -> StoreFuture<T> {
        if self.faults.deferred.load(Relaxed) {
            Box::pin(async move {
                tokio::task::yield_now().await;
                result
            })
        } else {
            super::ready(result)
        }
    }

    /// The stored envelopes of a device queue, by seq (for assertions).
    pub fn queue(&self, user: &str, device: u32) -> Vec<(u64, EnvelopeRecord)> {
        self.state()
            .queues
            .get(&(user.to_owned(), device))
            .map(|q| q.envelopes.iter().map(|(s, e)| (*s, e.clone())).collect())
            .unwrap_or_default()
    }

    /// The entries of a domain's outbox (for assertions).
    pub fn outbox_entries(&self, domain: &str) -> Vec<(u64, OutboxRecord)> {
        self.state()
            .outbox
            .range((domain.to_owned(), 0)..=(domain.to_owned(), u64::MAX))
            .map(|((_, seq), r)| (*seq, r.clone()))
            .collect()
    }
}

impl Health for MemoryStore {
    fn has_room(&self) -> bool {
        !self.faults.no_room.load(Relaxed)
    }

    fn flush_ok(&self) -> bool {
        !self.faults.flush.load(Relaxed)
    }

    fn check_room(&self) {}

    fn size_on_disk(&self) -> Result<u64> {
        Ok(0)
    }

    fn flush(&self) -> StoreFuture<()> {
        self.durable(Ok(()))
    }
}

impl Inbox for MemoryStore {
    fn open(
        &self,
        user: &str,
        devices: &[u32],
        limits: QueueLimits,
    ) -> StoreFuture<Box<dyn UserInbox>> {
        let opened = self.check_io().map(|()| {
            let mut state = self.state();
            for &device in devices {
                state
                    .queues
                    .entry((user.to_owned(), device))
                    .or_insert_with(Queue::new);
            }
            Box::new(MemoryUserInbox {
                store: self.clone(),
                user: user.to_owned(),
                devices: devices.to_vec(),
                limits,
            }) as Box<dyn UserInbox>
        });
        self.durable(opened)
    }

    fn due(&self, now_ms: u64, limit: usize) -> StoreFuture<Vec<Due>> {
        self.answer(|state| {
            let mut due = Vec::new();
            for ((user, device), queue) in &state.queues {
                for (seq, e) in &queue.envelopes {
                    if e.expires_ms <= now_ms {
                        due.push(Due::Envelope {
                            user: user.clone(),
                            device: *device,
                            seq: *seq,
                            expires_ms: e.expires_ms,
                        });
                    }
                }
            }
            for ((user, id), (expires_ms, _)) in &state.dedup {
                if *expires_ms <= now_ms {
                    due.push(Due::Dedup {
                        user: user.clone(),
                        id: *id,
                        expires_ms: *expires_ms,
                    });
                }
            }
            due.truncate(limit);
            Ok(due)
        })
    }
}

/// One user's queues in memory.
struct MemoryUserInbox {
    store: MemoryStore,
    user: String,
    /// The open queues.
    devices: Vec<u32>,
    limits: QueueLimits,
}

impl MemoryUserInbox {
    fn key(&self, device: u32) -> (String, u32) {
        (self.user.clone(), device)
    }

    fn original(&self, state: &State, id: &[u8; 16]) -> Option<Appended> {
        let (_, stored) = state.dedup.get(&(self.user.clone(), *id))?;
        Some(Appended {
            duplicate: true,
            stored: stored.clone(),
            durable: self.ends_in(state),
        })
    }

    fn ends_in(&self, state: &State) -> Vec<(u32, u64)> {
        self.devices
            .iter()
            .map(|d| {
                let next = state.queues.get(&self.key(*d)).map_or(1, |q| q.next_seq);
                (*d, next)
            })
            .collect()
    }
}

impl UserInbox for MemoryUserInbox {
    fn ends(&self) -> Vec<(u32, u64)> {
        self.ends_in(&self.store.state())
    }

    fn add_queue(&mut self, device: u32) -> u64 {
        if !self.devices.contains(&device) {
            self.devices.push(device);
            self.devices.sort_unstable();
        }
        let key = self.key(device);
        self.store
            .state()
            .queues
            .entry(key)
            .or_insert_with(Queue::new)
            .next_seq
    }

    fn duplicate(&mut self, id: &[u8; 16]) -> Result<Option<StoreFuture<Appended>>> {
        self.store.check_io()?;
        let original = self.original(&self.store.state(), id);
        Ok(original.map(|a| self.store.durable(Ok(a))))
    }

    fn append(&mut self, envelope: NewEnvelope<'_>) -> Result<StoreFuture<Appended>, AppendError> {
        self.store.check_io()?;
        let mut state = self.store.state();
        if let Some(original) = self.original(&state, &envelope.id) {
            drop(state);
            return Ok(self.store.durable(Ok(original)));
        }
        if self.store.faults.no_room.load(Relaxed) {
            return Err(AppendError::NoRoom);
        }
        let mut full = Vec::new();
        for &(device, ciphertext) in &envelope.copies {
            let queue = state
                .queues
                .get(&self.key(device))
                .ok_or(StoreError::NotFound)?;
            if queue.envelopes.len() as u64 >= self.limits.count
                || queue.bytes() + ciphertext.len() as u64 > self.limits.bytes
            {
                full.push(device);
            }
        }
        if !full.is_empty() {
            return Err(AppendError::Full(full));
        }
        let mut stored = Vec::new();
        for (device, ciphertext) in envelope.copies {
            let queue = state
                .queues
                .get_mut(&self.key(device))
                .expect("checked above");
            let seq = queue.next_seq;
            queue.next_seq += 1;
            queue.envelopes.insert(
                seq,
                EnvelopeRecord {
                    version: RECORD_VERSION,
                    id: envelope.id,
                    class: envelope.class,
                    accepted_ms: envelope.accepted_ms,
                    expires_ms: envelope.expires_ms,
                    ciphertext: ciphertext.to_vec(),
                },
            );
            stored.push((device, seq));
        }
        state.dedup.insert(
            (self.user.clone(), envelope.id),
            (envelope.remember_until_ms, stored.clone()),
        );
        let appended = Appended {
            duplicate: false,
            stored,
            durable: self.ends_in(&state),
        };
        drop(state);
        Ok(self.store.durable(Ok(appended)))
    }

    fn read(
        &self,
        device: u32,
        from: u64,
        limit: usize,
    ) -> StoreFuture<Vec<(u64, EnvelopeRecord)>> {
        let key = self.key(device);
        self.store.answer(move |state| {
            Ok(state
                .queues
                .get(&key)
                .map(|q| {
                    q.envelopes
                        .range(from..)
                        .take(limit)
                        .map(|(s, e)| (*s, e.clone()))
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn trim(&mut self, device: u32, acked: &[Trim]) -> Result<StoreFuture<()>> {
        self.store.check_io()?;
        if let Some(queue) = self.store.state().queues.get_mut(&self.key(device)) {
            for t in acked {
                queue.envelopes.remove(&t.seq);
            }
        }
        Ok(self.store.durable(Ok(())))
    }

    fn drop_queue(&mut self, device: u32) -> Result<StoreFuture<()>> {
        self.store.check_io()?;
        self.store.state().queues.remove(&self.key(device));
        self.devices.retain(|d| *d != device);
        Ok(self.store.durable(Ok(())))
    }

    fn expire(&mut self, due: Vec<Due>) -> Result<Vec<(u32, u64)>> {
        self.store.check_io()?;
        let mut state = self.store.state();
        let mut expired = Vec::new();
        for entry in due {
            match entry {
                Due::Envelope {
                    device,
                    seq,
                    expires_ms,
                    ..
                } => {
                    if let Some(queue) = state.queues.get_mut(&self.key(device))
                        && queue
                            .envelopes
                            .get(&seq)
                            .is_some_and(|e| e.expires_ms == expires_ms)
                    {
                        queue.envelopes.remove(&seq);
                        expired.push((device, seq));
                    }
                }
                Due::Dedup { id, expires_ms, .. } => {
                    let key = (self.user.clone(), id);
                    if state.dedup.get(&key).is_some_and(|d| d.0 == expires_ms) {
                        state.dedup.remove(&key);
                    }
                }
                // This backend indexes every envelope and dedup record on its own.
                Due::Sends { .. } | Due::Page { .. } => {}
            }
        }
        Ok(expired)
    }
}

impl Directory for MemoryStore {
    fn account(&self, user: &str) -> StoreFuture<Option<AccountRecord>> {
        let user = user.to_owned();
        self.answer(move |s| Ok(s.accounts.get(&user).cloned()))
    }

    fn create_account(&self, user: &str, created_ms: u64, first: DeviceRecord) -> StoreFuture<u32> {
        let user = user.to_owned();
        let created = self.check_io().and_then(|()| {
            let mut s = self.state();
            if s.accounts.contains_key(&user) {
                return Err(StoreError::AccountExists);
            }
            s.accounts.insert(
                user.clone(),
                AccountRecord {
                    version: RECORD_VERSION,
                    created_ms,
                    next_device: 2,
                },
            );
            s.devices.insert((user, 1), first);
            Ok(1)
        });
        self.durable(created)
    }

    fn add_device(&self, user: &str, device: DeviceRecord, max_devices: usize) -> StoreFuture<u32> {
        let user = user.to_owned();
        let added = self.check_io().and_then(|()| {
            let mut s = self.state();
            let held = s
                .devices
                .range((user.clone(), 0)..=(user.clone(), u32::MAX))
                .count();
            let account = s.accounts.get_mut(&user).ok_or(StoreError::NotFound)?;
            if held >= max_devices {
                return Err(StoreError::TooManyDevices);
            }
            let id = account.next_device;
            account.next_device = id.checked_add(1).ok_or(StoreError::TooManyDevices)?;
            s.devices.insert((user, id), device);
            Ok(id)
        });
        self.durable(added)
    }

    fn remove_device(&self, user: &str, device: u32) -> StoreFuture<()> {
        let user = user.to_owned();
        let removed = self.check_io().and_then(|()| {
            let mut s = self.state();
            s.devices
                .remove(&(user.clone(), device))
                .ok_or(StoreError::NotFound)?;
            s.one_time_keys
                .retain(|(u, d, _, _), _| !(u == &user && *d == device));
            s.fallback_keys
                .retain(|(u, d, _), _| !(u == &user && *d == device));
            s.push.remove(&(user.clone(), device));
            Ok(())
        });
        self.durable(removed)
    }

    fn device(&self, user: &str, device: u32) -> StoreFuture<Option<DeviceRecord>> {
        let key = (user.to_owned(), device);
        self.answer(move |s| Ok(s.devices.get(&key).cloned()))
    }

    fn devices(&self, user: &str) -> StoreFuture<Vec<(u32, DeviceRecord)>> {
        let user = user.to_owned();
        self.answer(move |s| {
            Ok(s.devices
                .range((user.clone(), 0)..=(user, u32::MAX))
                .map(|((_, id), d)| (*id, d.clone()))
                .collect())
        })
    }

    fn put_keys(
        &self,
        user: &str,
        device: u32,
        kind: KeyKind,
        upload: KeyUpload,
    ) -> StoreFuture<KeysPut> {
        let user = user.to_owned();
        let put = self.check_io().map(|()| {
            let mut s = self.state();
            let range = key_range(&user, device, kind);
            let held = s.one_time_keys.range(range).count() as u64;
            let added = upload
                .one_time
                .iter()
                .filter(|(id, _)| {
                    !s.one_time_keys
                        .contains_key(&(user.clone(), device, kind, *id))
                })
                .count() as u64;
            if held + added > upload.max_held {
                return KeysPut::OverLimit;
            }
            if let Some(fallback) = upload.fallback {
                s.fallback_keys
                    .insert((user.clone(), device, kind), fallback);
            }
            for (id, key) in upload.one_time {
                s.one_time_keys
                    .insert((user.clone(), device, kind, id), key);
            }
            KeysPut::Held(held + added)
        });
        self.durable(put)
    }

    fn key_count(&self, user: &str, device: u32, kind: KeyKind) -> StoreFuture<KeyCount> {
        let user = user.to_owned();
        self.answer(move |s| {
            Ok(KeyCount {
                one_time: s
                    .one_time_keys
                    .range(key_range(&user, device, kind))
                    .count() as u64,
                fallback: s.fallback_keys.contains_key(&(user, device, kind)),
            })
        })
    }

    fn claim_key(&self, user: &str, device: u32, kind: KeyKind) -> StoreFuture<Option<Claimed>> {
        let user = user.to_owned();
        let claimed = self.check_io().map(|()| {
            let mut s = self.state();
            if !s.devices.contains_key(&(user.clone(), device)) {
                return None;
            }
            let range = key_range(&user, device, kind);
            let first = s
                .one_time_keys
                .range(range.clone())
                .next()
                .map(|(k, _)| k.clone());
            if let Some(k) = first {
                let key = s.one_time_keys.remove(&k).expect("found above");
                let left = s.one_time_keys.range(range).count() as u64;
                return Some(Claimed {
                    key_id: k.3,
                    key,
                    fallback: false,
                    left,
                });
            }
            s.fallback_keys.get(&(user, device, kind)).map(|f| Claimed {
                key_id: f.key_id,
                key: f.key.clone(),
                fallback: true,
                left: 0,
            })
        });
        self.durable(claimed)
    }

    fn push_subscription(&self, user: &str, device: u32) -> StoreFuture<Option<PushRecord>> {
        let key = (user.to_owned(), device);
        self.answer(move |s| Ok(s.push.get(&key).cloned()))
    }

    fn set_push_subscription(
        &self,
        user: &str,
        device: u32,
        record: Option<PushRecord>,
    ) -> StoreFuture<()> {
        let key = (user.to_owned(), device);
        let set = self.check_io().map(|()| {
            let mut s = self.state();
            match record {
                Some(record) => s.push.insert(key, record),
                None => s.push.remove(&key),
            };
        });
        self.durable(set)
    }

    fn device_list(&self, user: &str) -> StoreFuture<Option<Vec<u8>>> {
        let user = user.to_owned();
        self.answer(move |s| Ok(s.device_lists.get(&user).cloned()))
    }

    fn set_device_list(&self, user: &str, signed: Vec<u8>) -> StoreFuture<()> {
        let user = user.to_owned();
        let set = self.check_io().map(|()| {
            self.state().device_lists.insert(user, signed);
        });
        self.durable(set)
    }

    fn delivery_token(&self, user: &str) -> StoreFuture<Option<DeliveryTokenRecord>> {
        let user = user.to_owned();
        self.answer(move |s| Ok(s.delivery_tokens.get(&user).cloned()))
    }

    fn set_delivery_token(&self, user: &str, record: DeliveryTokenRecord) -> StoreFuture<()> {
        let user = user.to_owned();
        let set = self.check_io().map(|()| {
            self.state().delivery_tokens.insert(user, record);
        });
        self.durable(set)
    }

    fn put_link_code(
        &self,
        user: &str,
        code_hash: [u8; 32],
        record: LinkCodeRecord,
    ) -> StoreFuture<()> {
        let user = user.to_owned();
        let put = self.check_io().map(|()| {
            self.state().link_codes.insert((user, code_hash), record);
        });
        self.durable(put)
    }

    fn take_epoch(
        &self,
        group: &[u8],
        epoch: u64,
        id: [u8; 16],
        now_ms: u64,
    ) -> StoreFuture<EpochTaken> {
        let taken = self.check_io().map(|()| {
            let mut s = self.state();
            let (answer, write) = GroupRecord::take(s.groups.get(group), epoch, id, now_ms);
            if let Some(record) = write {
                s.groups.insert(group.to_vec(), record);
            }
            answer
        });
        self.durable(taken)
    }

    fn take_link_code(&self, user: &str, code_hash: [u8; 32], now_ms: u64) -> StoreFuture<bool> {
        let user = user.to_owned();
        let taken = self.check_io().map(|()| {
            self.state()
                .link_codes
                .remove(&(user, code_hash))
                .is_some_and(|r| r.expires_ms > now_ms)
        });
        self.durable(taken)
    }
}

impl Outbox for MemoryStore {
    fn index(&self, domain: &str) -> StoreFuture<Vec<OutboxEntry>> {
        let domain = domain.to_owned();
        self.answer(move |s| {
            Ok(s.outbox
                .range((domain.clone(), 0)..=(domain, u64::MAX))
                .map(|((_, seq), r)| OutboxEntry {
                    seq: *seq,
                    accepted_ms: r.accepted_ms,
                    bytes: r.size(),
                })
                .collect())
        })
    }

    fn put(&self, domain: &str, seq: u64, record: &OutboxRecord) -> Result<StoreFuture<()>> {
        self.check_io()?;
        self.state()
            .outbox
            .insert((domain.to_owned(), seq), record.clone());
        Ok(MemoryStore::durable(self, Ok(())))
    }

    fn durable(&self, _domain: &str) -> StoreFuture<()> {
        MemoryStore::durable(self, Ok(()))
    }

    fn read(&self, domain: &str, from: u64, limit: usize) -> StoreFuture<Vec<(u64, OutboxRecord)>> {
        let domain = domain.to_owned();
        self.answer(move |s| {
            Ok(s.outbox
                .range((domain.clone(), from)..=(domain, u64::MAX))
                .take(limit)
                .map(|((_, seq), r)| (*seq, r.clone()))
                .collect())
        })
    }

    fn remove(&self, domain: &str, seqs: &[u64]) -> Result<StoreFuture<()>> {
        self.check_io()?;
        let mut s = self.state();
        for seq in seqs {
            s.outbox.remove(&(domain.to_owned(), *seq));
        }
        drop(s);
        Ok(MemoryStore::durable(self, Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::MemoryStore;
    use crate::store::{Stores, contract};

    #[test]
    fn the_seams_contract_holds() {
        let stores = Stores::from_backend(Arc::new(MemoryStore::new()));
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(contract::all(&stores, ""));
    }
}
