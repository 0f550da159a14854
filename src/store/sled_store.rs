//! The embedded default backend: sled 0.34.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use super::{
    AccountRecord, DedupRecord, DeliveryTokenRecord, DeviceRecord, Durable, EnvelopeRecord,
    Expired, FallbackKeyRecord, HeadRecord, LinkCodeRecord, OutboxRecord, QueueOp, QueueWrite,
    Result, Store, StoreError,
    committer::{Committer, Health},
    keys,
    records::{self, RECORD_VERSION},
};

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Directory of the sled database.
    pub dir: PathBuf,
    /// Share one flush among all appends waiting for it (group commit). Off: one flush per
    /// append, for comparison.
    pub group_commit: bool,
    /// fsync the data file after sled's flush (on by default; off only for benchmarks).
    pub fsync: bool,
    /// sled page cache size in bytes.
    pub cache_bytes: u64,
    /// Under concurrent load, how long a flush waits for more appends to join it.
    pub commit_delay: std::time::Duration,
    /// Free disk space below which new envelopes are refused, in bytes.
    pub min_free_bytes: u64,
    /// Debug builds only: while this file exists every flush fails (fault tests).
    pub failpoint_sync: Option<PathBuf>,
}

impl StoreOptions {
    /// A small store in `dir` for unit tests: group commit, no fsync, 4 MiB of cache.
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &Path) -> Self {
        StoreOptions {
            dir: dir.to_path_buf(),
            group_commit: true,
            fsync: false,
            cache_bytes: 4 << 20,
            commit_delay: std::time::Duration::ZERO,
            min_free_bytes: 0,
            failpoint_sync: None,
        }
    }
}

/// The sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    accounts: sled::Tree,
    queues: sled::Tree,
    outbox: sled::Tree,
    committer: Committer,
    /// Serializes account and device changes (rare; keeps read-modify-write simple).
    account_lock: Mutex<()>,
    /// Flush and free-space state.
    health: Arc<Health>,
}

impl SledStore {
    /// Opens (or creates) the store in `options.dir`. Start-up cost does not grow with the
    /// number of queued envelopes beyond sled's own log recovery.
    pub fn open(options: &StoreOptions) -> Result<Self> {
        std::fs::create_dir_all(&options.dir).map_err(|e| StoreError::Io(e.to_string()))?;
        let db = sled::Config::new()
            .path(&options.dir)
            .cache_capacity(options.cache_bytes)
            // Values above segment_size/4 go to unsynced blob files; a larger segment keeps
            // every envelope (<= 64 KiB) and most pages in the synced log.
            .segment_size(8 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()?;
        let accounts = db.open_tree("accounts")?;
        let queues = db.open_tree("queues")?;
        let outbox = db.open_tree("outbox")?;
        let health = Arc::new(Health {
            flush_ok: AtomicBool::new(true),
            disk_ok: AtomicBool::new(true),
            min_free: options.min_free_bytes,
            dir: options.dir.clone(),
        });
        health.check_disk();
        let committer = Committer::start(
            db.clone(),
            options.dir.clone(),
            options.group_commit,
            options.fsync,
            options.commit_delay,
            health.clone(),
            options.failpoint_sync.clone(),
        )
        .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(SledStore {
            db,
            accounts,
            queues,
            outbox,
            committer,
            account_lock: Mutex::new(()),
            health,
        })
    }

    /// The data directory layout sled uses; for tests that inspect files.
    pub fn data_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A poisoned lock only means another thread panicked mid-update of an account; each
        // update is a single atomic sled batch, so the data is consistent: keep going.
        self.account_lock.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for SledStore {
    fn account(&self, user: &str) -> Result<Option<AccountRecord>> {
        self.accounts
            .get(keys::account(user))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    fn create_account(&self, user: &str, created_ms: u64, first: DeviceRecord) -> Result<u32> {
        let _guard = self.lock();
        if self.accounts.contains_key(keys::account(user))? {
            return Err(StoreError::AccountExists);
        }
        let account = AccountRecord {
            version: RECORD_VERSION,
            created_ms,
            next_device: 2,
        };
        // Device first: an account record always has its first device, even after a crash
        // between the two writes (a device record without an account is overwritten when the
        // handle registers again).
        self.accounts
            .insert(keys::device(user, 1), records::encode(&first))?;
        self.accounts
            .insert(keys::account(user), records::encode(&account))?;
        Ok(1)
    }

    fn add_device(&self, user: &str, device: DeviceRecord, max_devices: usize) -> Result<u32> {
        let _guard = self.lock();
        let mut account = self.account(user)?.ok_or(StoreError::NotFound)?;
        if self.accounts.scan_prefix(keys::device_prefix(user)).count() >= max_devices {
            return Err(StoreError::TooManyDevices);
        }
        let id = account.next_device;
        account.next_device = id.checked_add(1).ok_or(StoreError::TooManyDevices)?;
        // Counter first: a crash in between skips an id, never reuses one.
        self.accounts
            .insert(keys::account(user), records::encode(&account))?;
        self.accounts
            .insert(keys::device(user, id), records::encode(&device))?;
        Ok(id)
    }

    fn remove_device(&self, user: &str, device: u32) -> Result<()> {
        let _guard = self.lock();
        match self.accounts.remove(keys::device(user, device))? {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound),
        }
    }

    fn device(&self, user: &str, device: u32) -> Result<Option<DeviceRecord>> {
        self.accounts
            .get(keys::device(user, device))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    fn devices(&self, user: &str) -> Result<Vec<(u32, DeviceRecord)>> {
        let prefix = keys::device_prefix(user);
        self.accounts
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let id = device_suffix(&k[prefix.len()..])?;
                Ok((id, records::decode(&v)?))
            })
            .collect()
    }

    fn put_one_time_keys(&self, user: &str, device: u32, keys: Vec<(u64, Vec<u8>)>) -> Result<u64> {
        for (id, key) in keys {
            self.accounts
                .insert(keys::one_time_key(user, device, id), key)?;
        }
        Ok(self.key_count(user, device)?.0)
    }

    fn set_fallback_key(&self, user: &str, device: u32, key: FallbackKeyRecord) -> Result<()> {
        self.accounts
            .insert(keys::fallback_key(user, device), records::encode(&key))?;
        Ok(())
    }

    fn has_one_time_key(&self, user: &str, device: u32, key_id: u64) -> Result<bool> {
        Ok(self
            .accounts
            .contains_key(keys::one_time_key(user, device, key_id))?)
    }

    fn key_count(&self, user: &str, device: u32) -> Result<(u64, bool)> {
        let count = self
            .accounts
            .scan_prefix(keys::one_time_key_prefix(user, device))
            .count();
        let fallback = self
            .accounts
            .contains_key(keys::fallback_key(user, device))?;
        Ok((count as u64, fallback))
    }

    fn take_one_time_key(&self, user: &str, device: u32) -> Result<Option<(u64, Vec<u8>)>> {
        let prefix = keys::one_time_key_prefix(user, device);
        let Some(kv) = self.accounts.scan_prefix(&prefix).next() else {
            return Ok(None);
        };
        let (k, v) = kv?;
        let id =
            keys::envelope_seq(&k).ok_or_else(|| StoreError::Corruption("bad key id".into()))?;
        self.accounts.remove(&k)?;
        Ok(Some((id, v.to_vec())))
    }

    fn fallback_key(&self, user: &str, device: u32) -> Result<Option<FallbackKeyRecord>> {
        self.accounts
            .get(keys::fallback_key(user, device))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    fn drop_device_keys(&self, user: &str, device: u32) -> Result<()> {
        for kv in self
            .accounts
            .scan_prefix(keys::one_time_key_prefix(user, device))
        {
            self.accounts.remove(kv?.0)?;
        }
        self.accounts.remove(keys::fallback_key(user, device))?;
        Ok(())
    }

    fn device_list(&self, user: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .accounts
            .get(keys::device_list(user))?
            .map(|v| v.to_vec()))
    }

    fn set_device_list(&self, user: &str, signed: Vec<u8>) -> Result<()> {
        self.accounts.insert(keys::device_list(user), signed)?;
        Ok(())
    }

    fn delivery_token(&self, user: &str) -> Result<Option<DeliveryTokenRecord>> {
        self.accounts
            .get(keys::delivery_token(user))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    fn set_delivery_token(&self, user: &str, record: DeliveryTokenRecord) -> Result<()> {
        self.accounts
            .insert(keys::delivery_token(user), records::encode(&record))?;
        Ok(())
    }

    fn put_link_code(
        &self,
        user: &str,
        code_hash: &[u8; 32],
        record: LinkCodeRecord,
    ) -> Result<()> {
        self.accounts
            .insert(keys::link_code(user, code_hash), records::encode(&record))?;
        Ok(())
    }

    fn take_link_code(&self, user: &str, code_hash: &[u8; 32], now_ms: u64) -> Result<bool> {
        let _guard = self.lock();
        let Some(v) = self.accounts.remove(keys::link_code(user, code_hash))? else {
            return Ok(false);
        };
        let record: LinkCodeRecord = records::decode(&v)?;
        Ok(record.expires_ms > now_ms)
    }

    fn heads(&self, user: &str) -> Result<Vec<(u32, HeadRecord)>> {
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

    fn last_envelope(&self, user: &str, device: u32) -> Result<Option<(u64, EnvelopeRecord)>> {
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

    fn first_seq(&self, user: &str, device: u32) -> Result<Option<u64>> {
        match self
            .queues
            .scan_prefix(keys::envelope_prefix(user, device))
            .next()
        {
            Some(kv) => Ok(keys::envelope_seq(&kv?.0)),
            None => Ok(None),
        }
    }

    fn read(
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

    fn dedup(&self, user: &str, id: &[u8; 16]) -> Result<Option<DedupRecord>> {
        self.queues
            .get(keys::dedup(user, id))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    fn write(&self, write: QueueWrite) -> Result<()> {
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

    fn sync(&self) -> Durable {
        let rx = self.committer.request();
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Io("commit thread stopped".into())))
        })
    }

    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Expired>> {
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
                    Expired::Envelope {
                        user,
                        device,
                        seq,
                        expires_ms,
                    }
                } else {
                    let id: [u8; 16] = rest.try_into().map_err(|_| bad())?;
                    Expired::Dedup {
                        user,
                        id,
                        expires_ms,
                    }
                });
            }
        }
        Ok(out)
    }

    fn has_room(&self) -> bool {
        self.health.disk_ok.load(Ordering::Relaxed)
    }

    fn healthy(&self) -> bool {
        self.health.flush_ok.load(Ordering::Relaxed)
    }

    fn check_disk(&self) {
        self.health.check_disk();
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    fn outbox_put(&self, domain: &str, seq: u64, record: &OutboxRecord) -> Result<()> {
        self.outbox
            .insert(keys::outbox(domain, seq), records::encode(record))?;
        Ok(())
    }

    fn outbox_remove(&self, domain: &str, seqs: &[u64]) -> Result<()> {
        for seq in seqs {
            self.outbox.remove(keys::outbox(domain, *seq))?;
        }
        Ok(())
    }

    fn outbox_read(
        &self,
        domain: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>> {
        let start = keys::outbox(domain, from);
        let end = keys::outbox(domain, u64::MAX);
        let mut out = Vec::new();
        for kv in self.outbox.range(start..=end).take(limit) {
            let (k, v) = kv?;
            let seq = keys::envelope_seq(&k)
                .ok_or_else(|| StoreError::Corruption("short outbox key".into()))?;
            out.push((seq, records::decode(&v)?));
        }
        Ok(out)
    }

    fn outbox_index(&self, domain: &str) -> Result<Vec<(u64, u64, u64)>> {
        self.outbox
            .scan_prefix(keys::outbox_prefix(domain))
            .map(|kv| {
                let (k, v) = kv?;
                let seq = keys::envelope_seq(&k)
                    .ok_or_else(|| StoreError::Corruption("short outbox key".into()))?;
                let rec: OutboxRecord = records::decode(&v)?;
                Ok((seq, rec.accepted_ms, rec.size()))
            })
            .collect()
    }
}

/// The key-value writes of a batch, in the order that keeps every crash-surviving prefix
/// consistent (`None` deletes):
///
/// - an expiry index entry is written before what it indexes and removed after it, so nothing
///   stored lacks its expiry (an entry without its record is skipped by the sweep);
/// - the mailbox orders a send as envelopes, heads, then the dedup record, so a surviving
///   dedup record implies its envelopes and heads survived (a retry never hides a lost
///   envelope), and a send without one is rolled back when the mailbox loads (a retry never
///   stores an envelope twice).
fn plan(write: QueueWrite) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
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
            QueueOp::Unindex(Expired::Envelope {
                user,
                device,
                seq,
                expires_ms,
            }) => out.push((keys::expiry_envelope(expires_ms, &user, device, seq), None)),
            QueueOp::Unindex(Expired::Dedup {
                user,
                id,
                expires_ms,
            }) => out.push((keys::expiry_dedup(expires_ms, &user, &id), None)),
        }
    }
    out
}

fn device_suffix(rest: &[u8]) -> Result<u32> {
    let bytes: [u8; 4] = rest
        .try_into()
        .map_err(|_| StoreError::Corruption("bad device key".into()))?;
    Ok(u32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> SledStore {
        SledStore::open(&StoreOptions {
            fsync: true,
            ..StoreOptions::for_tests(dir)
        })
        .unwrap()
    }

    fn device() -> DeviceRecord {
        DeviceRecord {
            version: 1,
            token_hash: [1; 32],
            identity_keys: vec![2],
            created_ms: 0,
        }
    }

    #[test]
    fn accounts_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        assert_eq!(s.create_account("a@x", 1, device()).unwrap(), 1);
        assert!(matches!(
            s.create_account("a@x", 1, device()),
            Err(StoreError::AccountExists)
        ));
        assert_eq!(s.add_device("a@x", device(), 16).unwrap(), 2);
        s.remove_device("a@x", 1).unwrap();
        assert_eq!(
            s.add_device("a@x", device(), 16).unwrap(),
            3,
            "ids are never reused"
        );
        let ids: Vec<u32> = s
            .devices("a@x")
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![2, 3]);
        assert!(matches!(
            s.add_device("b@x", device(), 16),
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            s.add_device("a@x", device(), 2),
            Err(StoreError::TooManyDevices)
        ));
    }

    #[test]
    fn writes_are_ordered_so_every_prefix_is_consistent() {
        let rec = EnvelopeRecord {
            version: 1,
            id: [0; 16],
            class: 0,
            accepted_ms: 0,
            expires_ms: 5,
            ciphertext: vec![],
        };
        let head = HeadRecord {
            version: 1,
            next_seq: 2,
            count: 1,
            bytes: 0,
        };
        let dedup = DedupRecord {
            version: 1,
            expires_ms: 9,
            stored: vec![(1, 1)],
        };
        let w = QueueWrite {
            ops: vec![
                QueueOp::Append {
                    user: "a@x".into(),
                    device: 1,
                    seq: 1,
                    record: rec,
                },
                QueueOp::Head {
                    user: "a@x".into(),
                    device: 1,
                    head,
                },
                QueueOp::Dedup {
                    user: "a@x".into(),
                    id: [0; 16],
                    record: dedup,
                },
            ],
        };
        let tags: Vec<u8> = plan(w).iter().map(|(k, _)| k[0]).collect();
        // expiry index, envelope, head, dedup index, dedup record.
        assert_eq!(tags, vec![b'x', b'e', b'h', b'y', b'd']);
        let rm = QueueWrite {
            ops: vec![QueueOp::Remove {
                user: "a@x".into(),
                device: 1,
                seq: 1,
                expires_ms: 5,
            }],
        };
        let tags: Vec<u8> = plan(rm).iter().map(|(k, _)| k[0]).collect();
        assert_eq!(
            tags,
            vec![b'e', b'x'],
            "the record goes before its index entry"
        );
    }

    #[test]
    fn outboxes_are_per_domain_ordered_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |n: u8| OutboxRecord {
            version: 1,
            id: [n; 16],
            to: "bob@b.example".into(),
            class: 0,
            accepted_ms: u64::from(n),
            expires_ms: 1000,
            copies: vec![(1, serde_bytes::ByteBuf::from(vec![n; 3]))],
            admission: 0,
            token: None,
        };
        {
            let s = open(dir.path());
            for seq in 1..=3u8 {
                s.outbox_put("b.example", u64::from(seq), &rec(seq))
                    .unwrap();
            }
            // A domain that is a prefix of another does not share its entries.
            s.outbox_put("b.exampl", 1, &rec(9)).unwrap();
            s.outbox_remove("b.example", &[2]).unwrap();
            s.db.flush().unwrap();
        }
        let s = open(dir.path());
        let read = s.outbox_read("b.example", 1, 10).unwrap();
        assert_eq!(
            read.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(read[1].1, rec(3));
        assert_eq!(s.outbox_read("b.example", 2, 10).unwrap().len(), 1);
        assert_eq!(
            s.outbox_index("b.example").unwrap(),
            vec![(1, 1, 3), (3, 3, 3)]
        );
        assert_eq!(s.outbox_index("b.exampl").unwrap(), vec![(1, 9, 3)]);
    }

    #[test]
    fn expiry_index_finds_due_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let rec = |expires_ms| EnvelopeRecord {
            version: 1,
            id: [0; 16],
            class: 0,
            accepted_ms: 0,
            expires_ms,
            ciphertext: vec![],
        };
        let mut w = QueueWrite::default();
        for (seq, exp) in [(1, 100), (2, 200), (3, 300)] {
            w.ops.push(QueueOp::Append {
                user: "a@x".into(),
                device: 1,
                seq,
                record: rec(exp),
            });
        }
        s.write(w).unwrap();
        let due = s.expired(200, 10).unwrap();
        assert_eq!(due.len(), 2);
        assert!(matches!(due[1], Expired::Envelope { seq: 2, .. }));
        assert_eq!(s.read("a@x", 1, 2, 10).unwrap().len(), 2);
        assert_eq!(s.first_seq("a@x", 1).unwrap(), Some(1));
    }
}
