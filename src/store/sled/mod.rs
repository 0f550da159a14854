//! The embedded default backend: sled 0.34, one directory, no other service to run.
//!
//! - `committer`: group commit — one thread turns many durability requests into one flush +
//!   fsync.
//! - `queues`: tree `queues` — the write plan that keeps every crash-surviving prefix
//!   consistent, and the reads below the inbox.
//! - `inbox`: [`Inbox`](super::Inbox) on it: dedup records, queue heads, the expiry index,
//!   the pending sends of each user.
//! - `recovery`: how a send is written, and how opening a user's queues rolls back the one
//!   send a crash may have torn.
//! - `directory`, `outbox`: the other seams, on trees `accounts` and `outbox`.
//! - `keyring`: crypto-shredding — envelopes and outbox records are sealed under a key per
//!   queue kept outside sled, destroyed when the queue drains or the key ages; keyed hashes
//!   for handles and ids in keys.
//! - `migrate`: rewrites a data directory of layout 1 (plain) on open.
//!
//! sled is durable only up to a flush, and after a crash a prefix of the writes not yet
//! flushed survives. That is this backend's business alone: every write here is ordered so
//! that each prefix is consistent or repaired on open, and every future resolves after the
//! flush that covers its writes. Key layouts: [`super::keys`].

mod committer;
mod directory;
mod inbox;
mod keyring;
mod migrate;
mod outbox;
mod queues;
mod recovery;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use committer::{Committer, DiskHealth};

use super::{Result, StoreError, StoreFuture, keys, records};

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        match e {
            ::sled::Error::Corruption { .. } => StoreError::Corruption(e.to_string()),
            other => StoreError::Io(other.to_string()),
        }
    }
}

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
    /// Under load (see `committer::LINGER_ABOVE_PER_S`), how long a flush waits for more
    /// appends to join it; zero: never.
    pub commit_delay: std::time::Duration,
    /// Free disk space below which new envelopes are refused, in bytes.
    pub min_free_bytes: u64,
    /// Debug builds only: while this file exists every flush fails (fault tests).
    pub failpoint_sync: Option<PathBuf>,
    /// Oldest a queue's key may grow before the survivors are re-sealed under a new one and
    /// it is destroyed (a queue that drains gets a new key at once).
    pub key_max_age: std::time::Duration,
}

/// Default of [`StoreOptions::key_max_age`].
pub const DEFAULT_KEY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Most records the age-based rotation re-seals per sweep (and most queues it starts
/// rotating): the sweep runs it inline.
const ROTATION_BUDGET: usize = 2_000;

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
            key_max_age: DEFAULT_KEY_MAX_AGE,
        }
    }
}

/// The sled backend of every seam ([`super::Stores::from_backend`]).
#[derive(Clone)]
pub struct SledStore {
    cell: Arc<Cell>,
}

/// The open database, and what is needed to open it again.
struct Cell {
    /// `None` only while it is being reopened (under the write lock, so nobody sees it).
    current: RwLock<Option<Arc<Inner>>>,
    options: StoreOptions,
}

/// Free space a reopen needs beyond the configured floor: sled writes as it opens.
const REOPEN_HEADROOM: u64 = 32 * 1024 * 1024;

/// What the seams' implementations share.
struct Inner {
    db: ::sled::Db,
    accounts: ::sled::Tree,
    queues: ::sled::Tree,
    outbox: ::sled::Tree,
    /// Keys of the queues (outside sled) and the keyed hashes of handles and ids.
    keyring: Arc<keyring::Keyring>,
    committer: Committer,
    /// Serializes account and device changes (rare; keeps read-modify-write simple).
    account_lock: Mutex<()>,
    /// Flush and free-space state.
    health: Arc<DiskHealth>,
    /// How many due expiry index entries the last whole scan could not decode (warned once
    /// per change).
    undecodable_index: std::sync::atomic::AtomicUsize,
}

impl SledStore {
    /// Opens (or creates) the store in `options.dir`. Start-up cost does not grow with the
    /// number of queued envelopes beyond sled's own log recovery.
    pub fn open(options: &StoreOptions) -> Result<Self> {
        let inner = Inner::open(options)?;
        Ok(SledStore {
            cell: Arc::new(Cell {
                current: RwLock::new(Some(Arc::new(inner))),
                options: options.clone(),
            }),
        })
    }

    /// [`SledStore::open`] for tests that reopen a directory in the same process: sled's I/O
    /// threads can hold the previous database's file (and its lock) for a moment after it was
    /// dropped.
    #[cfg(test)]
    pub(crate) fn open_waiting(options: &StoreOptions) -> Result<Self> {
        let mut tries = 0;
        loop {
            match Self::open(options) {
                Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    /// The open database.
    fn inner(&self) -> Arc<Inner> {
        let current = self.cell.current.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            current
                .as_ref()
                .expect("the store is open outside a reopen"),
        )
    }

    /// Closes the database and opens it again: sled keeps the error of a failed write (a full
    /// disk) until it is reopened, refusing every later write. Refused while anything still
    /// holds the old database (a user's open queues: their mailboxes must stop first).
    fn reopen_now(&self) -> Result<()> {
        let mut current = self.cell.current.write().unwrap_or_else(|p| p.into_inner());
        let Some(old) = current.as_ref() else {
            return Err(StoreError::Io("the store is not open".into()));
        };
        if Arc::strong_count(old) > 1 {
            return Err(StoreError::Io(
                "the store is still in use; not reopened".into(),
            ));
        }
        // Dropping it stops the commit thread and closes the database (and its lock file).
        drop(current.take());
        let mut attempt = 0;
        let inner = loop {
            match Inner::open(&self.cell.options) {
                Ok(inner) => break inner,
                // sled's threads may hold the old file for a moment.
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "reopening the store failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                Err(e) => {
                    // Nothing acknowledged is lost (what was durable is on disk), but this
                    // process can no longer serve: exit, and let the supervisor start it again.
                    tracing::error!(error = %e, "the store could not be reopened; exiting");
                    std::process::exit(70);
                }
            }
        };
        *current = Some(Arc::new(inner));
        tracing::warn!("store reopened after an I/O error; accepting writes again");
        metrics::counter!("sealpost_store_reopens_total").increment(1);
        Ok(())
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
}

impl Inner {
    fn open(options: &StoreOptions) -> Result<Self> {
        std::fs::create_dir_all(&options.dir).map_err(|e| StoreError::Io(e.to_string()))?;
        let db = ::sled::Config::new()
            .path(&options.dir)
            .cache_capacity(options.cache_bytes)
            // Values above segment_size/4 go to unsynced blob files; a larger segment keeps
            // every envelope (<= 64 KiB) and most pages in the synced log.
            .segment_size(8 * 1024 * 1024)
            .mode(::sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()?;
        // sled writes its `conf` file and creates its files without ever syncing them or the
        // directory: a power cut after the first start could leave an empty or torn `conf`
        // (found by the power-loss test). Make them durable once, now.
        committer::sync_dir_and(&options.dir, &["conf"])
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let accounts = db.open_tree("accounts")?;
        let queues = db.open_tree("queues")?;
        let outbox = db.open_tree("outbox")?;
        let has_data = [
            keys::HEAD,
            keys::ENVELOPE,
            keys::DEDUP,
            keys::EXPIRY_ENVELOPE,
            keys::EXPIRY_DEDUP,
            keys::EXPIRY_SENDS,
            keys::LAST_SEND,
            keys::PAGE,
            keys::EXPIRY_PAGE,
        ]
        .iter()
        .any(|tag| queues.scan_prefix([*tag]).next().is_some())
            || outbox.scan_prefix([keys::OUTBOX]).next().is_some();
        let keyring = Arc::new(keyring::Keyring::open(
            &options.dir,
            u64::try_from(options.key_max_age.as_millis()).unwrap_or(u64::MAX),
            queues.clone(),
            outbox.clone(),
            has_data,
        )?);
        migrate::layout_1(&db, &options.dir, &queues, &outbox, &keyring)?;
        claim_layout(&queues)?;
        let health = Arc::new(DiskHealth {
            flush_ok: AtomicBool::new(true),
            disk_ok: AtomicBool::new(true),
            min_free: options.min_free_bytes,
            dir: options.dir.clone(),
        });
        health.check_disk();
        let committer = Committer::start(db.clone(), options, health.clone(), keyring.clone())
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(Inner {
            db,
            accounts,
            queues,
            outbox,
            keyring,
            committer,
            account_lock: Mutex::new(()),
            health,
            undecodable_index: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A poisoned lock only means another thread panicked mid-update of an account; each
        // update is a single atomic sled batch, so the data is consistent: keep going.
        self.account_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once everything written so far is durable. Many calls share one flush.
    fn sync(&self) -> StoreFuture<()> {
        self.flushed(true)
    }

    /// Answers once everything written so far is durable; `urgent` when somebody waits for
    /// the answer, false when it only reports (deletions nobody waits for may share a later
    /// flush, see `committer`).
    pub(super) fn flushed(&self, urgent: bool) -> StoreFuture<()> {
        let rx = self.committer.request(urgent);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Io("commit thread stopped".into())))
        })
    }

    /// Runs `write` inline and answers once it is durable.
    fn durably<T: Send + 'static>(&self, write: impl FnOnce() -> Result<T>) -> StoreFuture<T> {
        match write() {
            Ok(value) => {
                let durable = self.sync();
                Box::pin(async move { durable.await.map(|()| value) })
            }
            Err(e) => super::ready(Err(e)),
        }
    }
}

/// The key layout this build writes (`keys`).
const LAYOUT: u8 = 5;

/// Refuses a data directory a newer build wrote (its layout may mean something this build
/// would take for damage, or roll back), and marks it as this layout's: from now on no
/// build older than this one may open it (builds before layout 5 do not read the mark).
fn claim_layout(queues: &::sled::Tree) -> Result<()> {
    match queues.get(keys::LAYOUT)?.as_deref() {
        Some(&[found]) if found > LAYOUT => Err(StoreError::Corruption(format!(
            "the data directory was written by a newer build (layout {found}; this build \
             writes layout {LAYOUT}); run that build or a newer one"
        ))),
        Some(&[LAYOUT]) => Ok(()),
        _ => {
            queues.insert(keys::LAYOUT, &[LAYOUT])?;
            Ok(())
        }
    }
}

impl super::Health for SledStore {
    fn has_room(&self) -> bool {
        self.inner().health.disk_ok.load(Ordering::Relaxed)
    }

    fn flush_ok(&self) -> bool {
        self.inner().health.flush_ok.load(Ordering::Relaxed)
    }

    fn check_room(&self) {
        self.inner().health.check_disk();
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(self.inner().db.size_on_disk()?)
    }

    fn flush(&self) -> StoreFuture<()> {
        self.inner().sync()
    }

    fn wants_reopen(&self) -> bool {
        let inner = self.inner();
        !inner.health.flush_ok.load(Ordering::Relaxed)
            && inner
                .health
                .free_bytes()
                .is_some_and(|free| free >= inner.health.min_free.max(REOPEN_HEADROOM))
    }

    fn reopen(&self) -> StoreFuture<()> {
        let store = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Closing and opening sled blocks: not on an async worker.
        std::thread::spawn(move || {
            let _ = tx.send(store.reopen_now());
        });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Io("reopen thread failed".into())))
        })
    }
}

/// Every record of `tree` under `prefix` whose key ends in a device id, by device.
fn by_device<T: serde::de::DeserializeOwned + records::Versioned>(
    tree: &::sled::Tree,
    prefix: &[u8],
) -> Result<Vec<(u32, T)>> {
    tree.scan_prefix(prefix)
        .map(|kv| {
            let (k, v) = kv?;
            let id: [u8; 4] = k[prefix.len()..]
                .try_into()
                .map_err(|_| StoreError::Corruption("bad device key".into()))?;
            Ok((u32::from_be_bytes(id), records::decode(&v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests;
