//! Group commit: one thread turns many durability requests into one flush + fsync.
//!
//! sled 0.34's `flush()` writes its log with `sync_file_range`, which does not flush the
//! drive's write cache nor file metadata; after it we `fsync` the data file (and any blob
//! files) ourselves. Requests that arrive while a flush is running wait for the next one, so
//! under load one flush covers many appends.
//!
//! After a flush succeeds and its waiters are answered, the keys of queues that drained before
//! it began are destroyed (`keyring::Keyring::settle`, one keyring `fdatasync`): the deletions
//! that emptied them are durable by then. Under load (a flush that answers several waiting
//! requests) that work is gathered for up to [`SETTLE_INTERVAL`] and done once, rather than
//! after every flush: each settle is an `fdatasync` that delays the next flush and holds the
//! drained queues' locks. New keys are synced when created, before anything is sealed under
//! them, so the keyring is never dirty at a flush. New device queues adopt spare keys: this
//! thread makes more after a flush once few are left, so that writers need not.

use std::{
    fs::File,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::store::{Result, StoreError};

type Waiter = oneshot::Sender<Result<()>>;

/// A request for a flush, and whether it may wait for company.
struct Request {
    waiter: Waiter,
    /// Somebody waits for this flush to answer (a sender for its `send_result`); a request
    /// that is not urgent (an acknowledgement's deletions, which nobody waits for) may wait
    /// [`LAZY_WINDOW`] for an urgent one to share the flush with.
    urgent: bool,
}

/// Longest a flush that only non-urgent requests asked for waits for an urgent one: at a
/// moderate rate an acknowledgement's deletions share the next send's flush instead of costing
/// one of their own.
const LAZY_WINDOW: Duration = Duration::from_millis(2);

/// Under load, the longest drained queues' keys wait to be destroyed beyond the flush that made
/// their deletions durable; with nothing queued they are destroyed right after that flush.
pub(crate) const SETTLE_INTERVAL: Duration = Duration::from_millis(50);

/// Longest the free-space figure may be stale while flushes succeed (a `statvfs` per flush
/// cost more than the check is worth under load); after a failed flush it is read at once.
const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// What the store knows about its own health, for refusing writes early and for readiness.
#[derive(Debug)]
pub(crate) struct DiskHealth {
    /// Whether the last flush succeeded.
    pub(crate) flush_ok: std::sync::atomic::AtomicBool,
    /// Whether the data directory's file system had at least `min_free` bytes available at the
    /// last check.
    pub(crate) disk_ok: std::sync::atomic::AtomicBool,
    /// Free space below which new envelopes are refused.
    pub(crate) min_free: u64,
    /// The data directory.
    pub(crate) dir: PathBuf,
}

impl DiskHealth {
    /// Free space on the data directory's file system, if it can be read.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.dir).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Re-reads the free space of the data directory's file system.
    pub(crate) fn check_disk(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let ok = match self.free_bytes() {
            Some(free) => {
                metrics::gauge!("sealpost_disk_free_bytes").set(free as f64);
                free >= self.min_free
            }
            // Unknown: do not refuse on a failed probe; a failing disk shows in flushes.
            None => true,
        };
        if self.disk_ok.swap(ok, Relaxed) != ok {
            if ok {
                tracing::info!("free disk space recovered; accepting envelopes again");
            } else {
                tracing::warn!(
                    min_free = self.min_free,
                    "disk nearly full; refusing new envelopes"
                );
            }
        }
    }
}

/// Handle to the commit thread; dropping it stops the thread after it drains.
pub(crate) struct Committer {
    tx: Option<mpsc::Sender<Request>>,
    /// Joined on drop, so that the database is closed when the store is dropped.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Committer {
    /// Starts the commit thread for `db`, stored in `dir`.
    pub(crate) fn start(
        db: sled::Db,
        options: &super::StoreOptions,
        health: std::sync::Arc<DiskHealth>,
        keyring: std::sync::Arc<super::keyring::Keyring>,
    ) -> std::io::Result<Self> {
        let dir = options.dir.clone();
        let (group, fsync, delay) = (options.group_commit, options.fsync, options.commit_delay);
        let failpoint = options.failpoint_sync.clone();
        let (tx, rx) = mpsc::channel::<Request>();
        let data_file = File::open(dir.join("db"))?;
        let thread = std::thread::Builder::new()
            .name("sealpost-commit".into())
            .spawn(move || {
                // sled renames a new snapshot into place and removes the old one without a
                // directory fsync: one stat per flush notices, and then the directory is synced.
                let mut synced_dir = dir_mtime(&dir);
                let mut blobs = Blobs::default();
                let mut flush = || -> Result<()> {
                    db.flush().map_err(StoreError::from)?;
                    if fsync {
                        data_file
                            .sync_data()
                            .map_err(|e| StoreError::Io(e.to_string()))?;
                        blobs
                            .sync(&dir)
                            .map_err(|e| StoreError::Io(e.to_string()))?;
                        let now = dir_mtime(&dir);
                        if now != synced_dir {
                            sync_dir_and(&dir, &[]).map_err(|e| StoreError::Io(e.to_string()))?;
                            synced_dir = now;
                        }
                    }
                    Ok(())
                };
                let mut rate = Rate::new();
                let mut settled = Instant::now();
                let mut disk_checked = Instant::now();
                // Key work was put off under load: if no request comes within the interval,
                // a flush of its own (nothing else may have made the drains durable) settles it.
                // Closing with key work put off: one last flush and settle before the thread ends.
                let mut deferred = false;
                let mut closing = false;
                loop {
                    if closing {
                        break;
                    }
                    let first = if deferred {
                        match rx.recv_timeout(SETTLE_INTERVAL) {
                            Ok(first) => Some(first),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => {
                                closing = true;
                                None
                            }
                        }
                    } else {
                        match rx.recv() {
                            Ok(first) => Some(first),
                            Err(_) => break,
                        }
                    };
                    let mut requests: Vec<Request> = first.into_iter().collect();
                    if group {
                        requests.extend(rx.try_iter());
                        wait_for_urgent(&rx, &mut requests);
                        // Under load, linger so that this flush serves more: fewer, larger
                        // flushes. Sleeping, not waiting on the channel: a request that arrives
                        // meanwhile wakes nobody.
                        if !delay.is_zero() && rate.per_s(Instant::now()) >= LINGER_ABOVE_PER_S {
                            std::thread::sleep(delay);
                            requests.extend(rx.try_iter());
                        }
                        rate.record(requests.iter().filter(|r| r.urgent).count(), Instant::now());
                    }
                    let waiters: Vec<Waiter> = requests.into_iter().map(|r| r.waiter).collect();
                    // Keys whose queues drained before this flush: destroyed after it, once
                    // the deletions that emptied them are durable.
                    // Under load (several answers awaited) gathered for a while.
                    let awaited = waiters.iter().filter(|w| !w.is_closed()).count();
                    deferred = awaited > 1 && settled.elapsed() < SETTLE_INTERVAL;
                    let pending = (!deferred).then(|| keyring.take_pending());
                    let started = Instant::now();
                    let result = if failpoint_active(failpoint.as_deref()) {
                        Err(StoreError::Io("failpoint store.sync".into()))
                    } else {
                        flush()
                    };
                    metrics::histogram!("sealpost_flush_seconds").record(started.elapsed());
                    metrics::histogram!("sealpost_flush_batch_size").record(waiters.len() as f64);
                    if result.is_err() {
                        metrics::counter!("sealpost_flush_failures_total").increment(1);
                    }
                    health
                        .flush_ok
                        .store(result.is_ok(), std::sync::atomic::Ordering::Relaxed);
                    if result.is_err() || disk_checked.elapsed() >= DISK_CHECK_INTERVAL {
                        health.check_disk();
                        disk_checked = Instant::now();
                    }
                    let ok = result.is_ok();
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                    // New queues adopt spare keys: make more here, not on a writer's thread
                    // (not after a failed flush: the disk may be full).
                    if ok && let Err(e) = keyring.refill_spares() {
                        tracing::warn!(error = %e, "making spare keys failed");
                    }
                    let Some(pending) = pending else { continue };
                    settled = Instant::now();
                    if !ok {
                        keyring.restore_pending(pending);
                    } else if let Err(e) = keyring.settle(pending) {
                        // The keys stay as they were: still readable, destroyed on a later
                        // drain or rotation.
                        tracing::warn!(error = %e, "destroying drained queues' keys failed");
                    }
                }
            })?;
        Ok(Committer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Asks for a flush covering everything written so far; `urgent` when somebody waits for
    /// it (see [`Request`]).
    pub(crate) fn request(&self, urgent: bool) -> oneshot::Receiver<Result<()>> {
        let (tx, rx) = oneshot::channel();
        // If the thread is gone the receiver resolves to an error, reported by the caller.
        if let Some(sender) = &self.tx {
            let _ = sender.send(Request { waiter: tx, urgent });
        }
        rx
    }
}

/// Rate of urgent requests above which a flush lingers for the store's `commit_delay` before
/// it starts. At 1,500 sends a second a flush serves one send, and lingering would only add
/// to its latency. Under W1's load on one core (about 11,000 sends a second) a 1 ms linger
/// cut the flushes from about 1,700 to 400 a second and the CPU per delivered envelope by a
/// sixth (see `loadtest/JOURNAL.md`, "2026-12-07 (4)").
const LINGER_ABOVE_PER_S: f64 = 4_000.0;

/// How far back [`Rate`] looks: its estimate follows a change of load within a few of these.
const RATE_HORIZON: Duration = Duration::from_millis(20);

/// The recent rate of urgent requests: arrivals counted at each flush, decaying with
/// [`RATE_HORIZON`]. At a steady rate r it settles at r, within a few percent at the rates that
/// decide lingering (a 20 ms horizon holds about 30 arrivals at 1,500/s).
struct Rate {
    /// Arrivals, each weighted by how recent it is.
    weighted: f64,
    /// When `weighted` was last decayed.
    at: Instant,
}

impl Rate {
    fn new() -> Self {
        Rate {
            weighted: 0.0,
            at: Instant::now(),
        }
    }

    fn decay(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.at).as_secs_f64();
        self.weighted *= (-age / RATE_HORIZON.as_secs_f64()).exp();
        self.at = now;
    }

    /// Counts `n` arrivals at `now`.
    fn record(&mut self, n: usize, now: Instant) {
        self.decay(now);
        self.weighted += n as f64;
    }

    /// Arrivals per second up to `now`.
    fn per_s(&mut self, now: Instant) -> f64 {
        self.decay(now);
        self.weighted / RATE_HORIZON.as_secs_f64()
    }
}

/// If `requests` are only ones nobody waits for, waits up to [`LAZY_WINDOW`] for one somebody
/// does (taking what arrives meanwhile), so that one flush serves both.
fn wait_for_urgent(rx: &mpsc::Receiver<Request>, requests: &mut Vec<Request>) {
    if requests.is_empty() || requests.iter().any(|r| r.urgent) {
        return;
    }
    let until = Instant::now() + LAZY_WINDOW;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let Ok(request) = rx.recv_timeout(left) else {
            break;
        };
        let urgent = request.urgent;
        requests.push(request);
        if urgent {
            break;
        }
    }
    requests.extend(rx.try_iter());
}

/// fsyncs the named files of `dir` that exist, then `dir` itself (its entries: names
/// created, renamed or removed).
pub(crate) fn sync_dir_and(dir: &std::path::Path, files: &[&str]) -> std::io::Result<()> {
    for name in files {
        match File::open(dir.join(name)) {
            Ok(f) => f.sync_all()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    File::open(dir)?.sync_all()
}

/// The data directory's modification time: it changes when sled creates, renames or
/// removes a file (a snapshot taking the place of the last one).
fn dir_mtime(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(dir).and_then(|m| m.modified()).ok()
}

/// sled writes values too large for its log into `blobs/`, and never syncs them: each flush
/// syncs what is there. Envelopes are far below sled's blob threshold, so the directory is
/// nearly always empty: while its modification time is the one it had when it was last found
/// empty, no file can have been created in it, and listing it again is skipped — for at most
/// [`BLOBS_RELIST`]: a file system with coarse timestamps could show the same time across a
/// removal and a creation within one tick.
#[derive(Default)]
struct Blobs {
    /// The directory's modification time when a listing found it empty, and when that was.
    empty_at: Option<(std::time::SystemTime, Instant)>,
}

/// Longest a listing that found `blobs/` empty is trusted (see [`Blobs`]).
const BLOBS_RELIST: Duration = Duration::from_secs(1);

impl Blobs {
    fn sync(&mut self, dir: &std::path::Path) -> std::io::Result<()> {
        let blobs = dir.join("blobs");
        // Read before listing: a file created after this changes it.
        let mtime = dir_mtime(&blobs);
        if let (Some(now), Some((then, listed))) = (mtime, self.empty_at)
            && now == then
            && listed.elapsed() < BLOBS_RELIST
        {
            return Ok(());
        }
        let mut any = false;
        for entry in std::fs::read_dir(&blobs)? {
            File::open(entry?.path())?.sync_data()?;
            any = true;
        }
        if any {
            File::open(&blobs)?.sync_all()?;
        }
        self.empty_at = match mtime {
            Some(mtime) if !any => Some((mtime, Instant::now())),
            _ => None,
        };
        Ok(())
    }
}

/// Test-only failpoint (debug builds only): while `file` exists, every flush fails as if the
/// disk had failed.
fn failpoint_active(file: Option<&std::path::Path>) -> bool {
    cfg!(debug_assertions) && file.is_some_and(|f| f.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `rate` one arrival every `gap` for a second, the way the commit thread counts
    /// them (a few per flush), and returns its estimate at the end.
    fn steady(per_s: u32) -> f64 {
        let mut rate = Rate::new();
        let start = rate.at;
        let gap = Duration::from_secs(1) / per_s;
        for i in 1..=per_s {
            rate.record(1, start + gap * i);
        }
        rate.per_s(start + Duration::from_secs(1))
    }

    #[test]
    fn the_rate_follows_a_steady_load() {
        // Right after an arrival the estimate is high by half an arrival: gap / (2 × horizon),
        // 1.7 % at 1,500/s.
        for per_s in [1_500, 4_000, 10_000, 40_000] {
            let estimate = steady(per_s);
            let error = (estimate - f64::from(per_s)).abs() / f64::from(per_s);
            assert!(error < 0.05, "{per_s}/s estimated as {estimate:.0}/s");
        }
        assert!(steady(1_500) < LINGER_ABOVE_PER_S);
        assert!(steady(10_000) > LINGER_ABOVE_PER_S);
    }

    #[test]
    fn the_rate_forgets_a_burst() {
        let mut rate = Rate::new();
        let start = rate.at;
        rate.record(200, start);
        assert!(rate.per_s(start) > LINGER_ABOVE_PER_S);
        assert!(rate.per_s(start + 5 * RATE_HORIZON) < 100.0);
    }
}
