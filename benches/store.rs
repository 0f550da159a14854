//! Store benchmarks (`cargo bench --bench store`): the cost of durability and of start-up.
//!
//! 1. Durable appends/s from concurrent writers: group commit vs one flush per append, each
//!    with and without the fsync of sled's data file (sled's own flush is only
//!    `sync_file_range`). Then round trips/s: append, read, ack (trim) and wait for both to be
//!    durable, so every queue drains after every envelope (its key replaced each time).
//! 2. Start-up with many envelopes queued (default 1,000,000; `SEALPOST_BENCH_ENVELOPES`):
//!    store open, a mailbox's state load, and the real binary's time to `listening on`.
//!    With `SEALPOST_BENCH_KEEP_DIR=PATH` the envelopes are filled into the data directory
//!    PATH (which must not exist yet) and it is kept, with no broker started on it: the fast
//!    offline fill of `loadtest/backlog.sh`'s `PREFILL` mode, which then runs the broker on it.
//!
//! 3. The disk's ceiling for the same work, measured in the same run: a plain append-only
//!    file, group-committed by one thread (`write` + `fdatasync` per batch), to which each
//!    writer appends records of the bytes one append stores and waits for its batch.
//!
//! Prints figures; asserts nothing (this machine is shared and noisy).

#![allow(clippy::print_stdout, clippy::cast_possible_truncation)]

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use sealpost::store::{
    DeviceRecord, Directory, Health, Inbox, NewEnvelope, QueueLimits, SledStore, StoreOptions,
    Trim, UserInbox,
};

/// No quota: the benchmarks fill queues far beyond a real one.
const NO_LIMITS: QueueLimits = QueueLimits {
    count: u64::MAX,
    bytes: u64::MAX,
};

fn open(dir: &std::path::Path, group_commit: bool, fsync: bool) -> SledStore {
    let delay_us = std::env::var("SEALPOST_BENCH_COMMIT_DELAY_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    SledStore::open(&StoreOptions {
        dir: dir.to_path_buf(),
        group_commit,
        fsync,
        cache_bytes: 256 << 20,
        commit_delay: Duration::from_micros(delay_us),
        min_free_bytes: 0,
        failpoint_sync: None,
        key_max_age: sealpost::store::sled::DEFAULT_KEY_MAX_AGE,
    })
    .expect("open store")
}

/// An append of one 256-byte envelope with id `n` to device 1, as a mailbox makes it.
fn envelope(n: u64, ciphertext: &[u8]) -> NewEnvelope<'_> {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    NewEnvelope {
        id,
        class: 0,
        accepted_ms: 0,
        expires_ms: u64::MAX / 2,
        remember_until_ms: u64::MAX / 2,
        copies: vec![(1, ciphertext)],
    }
}

/// One user's queues, opened the way a mailbox opens them.
fn open_user(rt: &tokio::runtime::Runtime, store: &SledStore, user: &str) -> Box<dyn UserInbox> {
    rt.block_on(store.open(user, &[1], NO_LIMITS))
        .expect("open queues")
}

/// `writers` threads each append one envelope (+ index entry + dedup, like a mailbox) and wait for
/// durability, for `duration`. Returns appends per second.
fn durable_appends(
    group_commit: bool,
    fsync: bool,
    writers: usize,
    duration: Duration,
) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(dir.path(), group_commit, fsync));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                let user = format!("user{w}@bench");
                let mut queues = open_user(&rt, &store, &user);
                let ciphertext = [0xab; 256];
                let mut n = 0u64;
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let t = Instant::now();
                    n += 1;
                    let durable = queues.append(envelope(n, &ciphertext)).expect("append");
                    rt.block_on(durable).expect("durable");
                    latencies.push(t.elapsed());
                }
                (n, latencies)
            })
        })
        .collect();
    let mut total = 0;
    let mut lat = Vec::new();
    for t in threads {
        let (n, l) = t.join().expect("writer");
        total += n;
        lat.extend(l);
    }
    drop(rt);
    lat.sort();
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or_default();
    (
        total as f64 / started.elapsed().as_secs_f64(),
        p50.as_secs_f64() * 1000.0,
    )
}

/// `writers` threads each append one envelope, read it back, trim it (the queue drains) and
/// wait until both are durable, for `duration`. Returns round trips per second and p50 ms.
fn round_trips(writers: usize, duration: Duration) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(dir.path(), true, true));
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                let user = format!("user{w}@bench");
                let mut queues = open_user(&rt, &store, &user);
                let ciphertext = [0xab; 256];
                let mut n = 0u64;
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let t = Instant::now();
                    n += 1;
                    let durable = queues.append(envelope(n, &ciphertext)).expect("append");
                    rt.block_on(durable).expect("durable");
                    let read = rt.block_on(queues.read(1, 0, 10)).expect("read");
                    let trims: Vec<Trim> = read
                        .iter()
                        .map(|(seq, r)| Trim {
                            seq: *seq,
                            expires_ms: r.expires_ms,
                            bytes: r.ciphertext.len() as u64,
                        })
                        .collect();
                    let durable = queues.trim(1, &trims).expect("trim");
                    rt.block_on(durable).expect("durable");
                    latencies.push(t.elapsed());
                }
                (n, latencies)
            })
        })
        .collect();
    let mut total = 0;
    let mut lat = Vec::new();
    for t in threads {
        let (n, l) = t.join().expect("writer");
        total += n;
        lat.extend(l);
    }
    lat.sort();
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or_default();
    (
        total as f64 / started.elapsed().as_secs_f64(),
        p50.as_secs_f64() * 1000.0,
    )
}

fn startup(count: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory to fill and keep (and then start no broker on), or one that goes with `dir`.
    let keep = std::env::var_os("SEALPOST_BENCH_KEEP_DIR").map(std::path::PathBuf::from);
    if let Some(keep) = &keep {
        assert!(!keep.exists(), "SEALPOST_BENCH_KEEP_DIR must not exist yet");
    }
    let data = keep.clone().unwrap_or_else(|| dir.path().join("data"));
    let users = 1000u64;
    let per_user = count / users;
    {
        let store = open(&data, true, false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let t = Instant::now();
        let ciphertext = [0xab; 256];
        let mut last = None;
        for u in 0..users {
            let user = format!("user{u}@localhost");
            let device = DeviceRecord {
                version: 1,
                token_hash: [0; 32],
                identity_keys: vec![1],
                created_ms: 0,
            };
            rt.block_on(store.create_account(&user, 0, device))
                .expect("account");
            let mut queues = open_user(&rt, &store, &user);
            for seq in 1..=per_user {
                // Durable with the last one's flush.
                last = Some(queues.append(envelope(seq, &ciphertext)).expect("append"));
            }
            // As a mailbox does when it stops: the heads are stored exact, so opening the
            // queues again reads them instead of counting the queue.
            queues.close();
        }
        if let Some(last) = last {
            rt.block_on(last).expect("durable");
        }
        println!(
            "filled {} envelopes ({} users) in {:.1}s, {} MiB on disk",
            users * per_user,
            users,
            t.elapsed().as_secs_f64(),
            store.size_on_disk().unwrap_or(0) >> 20
        );
    }
    let t = Instant::now();
    let store = open(&data, true, true);
    let opened = t.elapsed();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let t = Instant::now();
    let devices: Vec<u32> = rt
        .block_on(store.devices("user500@localhost"))
        .expect("devices")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let queues = rt
        .block_on(store.open("user500@localhost", &devices, NO_LIMITS))
        .expect("open queues");
    let load = t.elapsed();
    assert_eq!(queues.ends(), vec![(1, per_user + 1)]);
    drop(queues);
    drop(store);
    println!(
        "store open with {count} queued: {:.0} ms; one mailbox load: {:.3} ms",
        opened.as_secs_f64() * 1e3,
        load.as_secs_f64() * 1e3
    );
    if keep.is_some() {
        println!("kept {}", data.display());
        return;
    }

    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-level", "warn"])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn broker");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("line");
    let ready = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "broker process start to `{}`: {:.0} ms",
        line.trim(),
        ready.as_secs_f64() * 1e3
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let startup_only = std::env::args().any(|a| a == "--startup-only");
    let secs = if quick { 1 } else { 5 };
    if !startup_only {
        durability(secs);
    }
    if std::env::args().any(|a| a == "--durability-only") {
        return;
    }
    let count: u64 = std::env::var("SEALPOST_BENCH_ENVELOPES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 10_000 } else { 1_000_000 });
    println!("== start-up with {count} envelopes queued ==");
    startup(count);
}

/// Bytes of keys and values one durable append stores, about (layout 4: the sealed envelope
/// of 256 bytes of ciphertext and the dedup record, 460; a 64th of the writer's index entries,
/// 20. Layout 3 stored 570, with an index entry per send).
const RAW_RECORD: usize = 480;

/// The ceiling: `writers` threads each append a `RAW_RECORD`-byte record to one file through a
/// group-committing thread and wait until it is synced, for `duration`.
fn raw_appends(writers: usize, duration: Duration) -> (f64, f64) {
    use std::{io::Write as _, sync::mpsc};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut file = std::fs::File::create(dir.path().join("log")).expect("log file");
    let (tx, rx) = mpsc::channel::<(Vec<u8>, mpsc::SyncSender<()>)>();
    let committer = std::thread::spawn(move || {
        let mut batch = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut waiters = vec![first];
            waiters.extend(rx.try_iter());
            batch.clear();
            for (record, _) in &waiters {
                batch.extend_from_slice(record);
            }
            file.write_all(&batch).expect("write");
            file.sync_data().expect("fdatasync");
            for (_, done) in waiters {
                let _ = done.send(());
            }
        }
    });
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let t = Instant::now();
                    let (done, wait) = mpsc::sync_channel(1);
                    tx.send((vec![0xab; RAW_RECORD], done)).expect("committer");
                    wait.recv().expect("synced");
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    drop(tx);
    let mut lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("writer"))
        .collect();
    let elapsed = started.elapsed();
    committer.join().expect("committer");
    lat.sort();
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or_default();
    (
        lat.len() as f64 / elapsed.as_secs_f64(),
        p50.as_secs_f64() * 1000.0,
    )
}

fn durability(secs: u64) {
    println!(
        "== the disk's ceiling: a plain file, group commit, {RAW_RECORD}-byte records, {secs}s each =="
    );
    for writers in [1, 16, 64] {
        let (rate, p50) = raw_appends(writers, Duration::from_secs(secs));
        println!(
            "raw file           fsync=true  writers={writers:>2}: {rate:>9.0} appends/s, p50 {p50:.2} ms"
        );
    }
    println!(
        "== durable appends (2 records per append and the index every 64, 256-byte envelope), {secs}s each =="
    );
    for (group, fsync) in [(true, true), (false, true), (true, false), (false, false)] {
        for writers in [1, 16, 64] {
            let (rate, p50) = durable_appends(group, fsync, writers, Duration::from_secs(secs));
            println!(
                "group_commit={group:<5} fsync={fsync:<5} writers={writers:>2}: {rate:>9.0} appends/s, p50 {p50:.2} ms"
            );
        }
    }
    println!("== round trips (append, read, ack; the queue drains every time), {secs}s each ==");
    for writers in [1, 16, 64] {
        let (rate, p50) = round_trips(writers, Duration::from_secs(secs));
        println!(
            "group_commit=true  fsync=true  writers={writers:>2}: {rate:>9.0} round trips/s, p50 {p50:.2} ms"
        );
    }
}
