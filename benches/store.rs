//! Store benchmarks (`cargo bench --bench store`): the cost of durability and of start-up.
//!
//! 1. Durable appends/s from concurrent writers: group commit vs one flush per append, each
//!    with and without the fsync of sled's data file (sled's own flush is only
//!    `sync_file_range`).
//! 2. Start-up with many envelopes queued (default 1,000,000; `SEALPOST_BENCH_ENVELOPES`):
//!    store open, a mailbox's state load, and the real binary's time to `listening on`.
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
    DedupRecord, DeviceRecord, EnvelopeRecord, HeadRecord, QueueOp, QueueWrite, SledStore, Store,
    StoreOptions,
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
    })
    .expect("open store")
}

fn envelope(id: u64, expires_ms: u64) -> EnvelopeRecord {
    let mut eid = [0u8; 16];
    eid[..8].copy_from_slice(&id.to_be_bytes());
    EnvelopeRecord {
        version: 1,
        id: eid,
        class: 0,
        accepted_ms: 0,
        expires_ms,
        ciphertext: vec![0xab; 256],
    }
}

/// `writers` threads each append one envelope (+ head + dedup, like a mailbox) and wait for
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
                let mut n = 0u64;
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let t = Instant::now();
                    n += 1;
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&n.to_be_bytes());
                    let write = QueueWrite {
                        ops: vec![
                            QueueOp::Append {
                                user: user.clone(),
                                device: 1,
                                seq: n,
                                record: envelope(n, u64::MAX / 2),
                            },
                            QueueOp::Head {
                                user: user.clone(),
                                device: 1,
                                head: HeadRecord {
                                    version: 1,
                                    next_seq: n + 1,
                                    count: n,
                                    bytes: n * 256,
                                },
                            },
                            QueueOp::Dedup {
                                user: user.clone(),
                                id,
                                record: DedupRecord {
                                    version: 1,
                                    expires_ms: u64::MAX / 2,
                                    stored: vec![(1, n)],
                                },
                            },
                        ],
                    };
                    store.write(write).expect("write");
                    rt.block_on(store.sync()).expect("sync");
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

fn startup(count: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let users = 1000u64;
    let per_user = count / users;
    {
        let store = open(&data, true, false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let t = Instant::now();
        for u in 0..users {
            let user = format!("user{u}@localhost");
            let device = DeviceRecord {
                version: 1,
                token_hash: [0; 32],
                identity_keys: vec![1],
                created_ms: 0,
            };
            store.create_account(&user, 0, device).expect("account");
            let mut seq = 1;
            while seq <= per_user {
                let mut write = QueueWrite::default();
                for _ in 0..1000.min(per_user - seq + 1) {
                    write.ops.push(QueueOp::Append {
                        user: user.clone(),
                        device: 1,
                        seq,
                        record: envelope(seq, u64::MAX / 2),
                    });
                    seq += 1;
                }
                write.ops.push(QueueOp::Head {
                    user: user.clone(),
                    device: 1,
                    head: HeadRecord {
                        version: 1,
                        next_seq: seq,
                        count: seq - 1,
                        bytes: (seq - 1) * 256,
                    },
                });
                store.write(write).expect("write");
            }
        }
        rt.block_on(store.sync()).expect("sync");
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
    let t = Instant::now();
    let heads = store.heads("user500@localhost").expect("heads");
    let devices = store.devices("user500@localhost").expect("devices");
    let first = store.first_seq("user500@localhost", 1).expect("first");
    let load = t.elapsed();
    assert_eq!((heads.len(), devices.len(), first), (1, 1, Some(1)));
    drop(store);
    println!(
        "store open with {count} queued: {:.0} ms; one mailbox load: {:.3} ms",
        opened.as_secs_f64() * 1e3,
        load.as_secs_f64() * 1e3
    );

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
    let count: u64 = std::env::var("SEALPOST_BENCH_ENVELOPES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 10_000 } else { 1_000_000 });
    println!("== start-up with {count} envelopes queued ==");
    startup(count);
}

fn durability(secs: u64) {
    println!("== durable appends (3 records per append, 256-byte envelope), {secs}s each ==");
    for (group, fsync) in [(true, true), (false, true), (true, false), (false, false)] {
        for writers in [1, 16, 64] {
            let (rate, p50) = durable_appends(group, fsync, writers, Duration::from_secs(secs));
            println!(
                "group_commit={group:<5} fsync={fsync:<5} writers={writers:>2}: {rate:>9.0} appends/s, p50 {p50:.2} ms"
            );
        }
    }
}
