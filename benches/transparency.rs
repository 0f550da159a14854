//! Key-transparency benchmarks (`cargo bench --bench transparency`): the log on its sled store,
//! at 10,000 and 1,000,000 accounts (`SEALPOST_BENCH_ACCOUNTS=10000,1000000`).
//!
//! For each size: the load (accounts published in epochs of 100,000), then three epochs of
//! 1,000 changed lists on the full log (the steady state: publication time), the size of
//! each proof a client or an auditor fetches (lookup, append-only for one such epoch, an
//! account's history), the broker's time to answer a device-list fetch's evidence, and a
//! client's time to verify it.
//!
//! Prints figures; asserts nothing (this machine is shared and noisy).

#![allow(clippy::print_stdout, clippy::cast_possible_truncation)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sealpost::{
    crypto::LogKeys,
    store::transparency::sled::SledTransparency,
    transparency::{Log, LogSettings, audit::verify_append_only},
};
use sealpost_client::crypto::transparency::LogPins;
use serde_bytes::ByteBuf;

const LOAD_EPOCH: usize = 100_000;
const STEADY_EPOCH: usize = 1_000;

fn handle(i: usize) -> String {
    format!("user{i}@bench.example")
}

/// A signed-list blob as the log reads it (the log does not check signatures; clients do).
fn list(user: &str, version: u64) -> Vec<u8> {
    let master = blake3::hash(format!("{user}/{version}").as_bytes());
    let body = rmp_serde::to_vec(&(
        1u8,
        user,
        version,
        ByteBuf::from(master.as_bytes().to_vec()),
        Vec::<(u32, ByteBuf)>::new(),
    ))
    .expect("encode");
    let mut blob = vec![1u8];
    blob.extend([0u8; 64]);
    blob.extend(body);
    blob
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn publish(log: &Log, from: usize, to: usize, version: u64, step: usize) -> Duration {
    let started = Instant::now();
    for i in (from..to).step_by(step) {
        log.update(&handle(i), &list(&handle(i), version));
    }
    let last = to - step + (from % step);
    let last = last.max(from);
    log.evidence(&handle(last), &list(&handle(last), version), None, true)
        .await
        .expect("published");
    started.elapsed()
}

async fn run(accounts: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(
        "bench.example".into(),
        Arc::new(SledTransparency::open(dir.path()).expect("open")),
        LogKeys::from_seeds([1; 32], [2; 32]),
        LogSettings {
            epoch_interval: Duration::from_millis(1),
            wait: Duration::from_secs(3600),
            equivocate_to: Vec::new(),
        },
    )
    .await
    .expect("log");

    let started = Instant::now();
    let mut at = 0;
    while at < accounts {
        let end = (at + LOAD_EPOCH).min(accounts);
        publish(&log, at, end, 1, 1).await;
        at = end;
    }
    println!(
        "{accounts} accounts: loaded in {:.1} s ({} epochs of up to {LOAD_EPOCH})",
        started.elapsed().as_secs_f64(),
        accounts.div_ceil(LOAD_EPOCH)
    );

    // Steady state: epochs of 1,000 changed lists spread over the whole log.
    let step = accounts / STEADY_EPOCH;
    let mut times = Vec::new();
    for round in 0..3u64 {
        let before = log.latest(None).await.expect("root").epoch;
        let took = publish(&log, round as usize, accounts, 2 + round, step).await;
        times.push(ms(took));
        let after = log.latest(None).await.expect("root");
        if round == 2 {
            let (roots, proof) = log.audit(before, after.epoch, None).await.expect("audit");
            let t = Instant::now();
            verify_append_only(&roots, &proof).await.expect("verifies");
            println!(
                "  append-only proof of one {STEADY_EPOCH}-change epoch: {} bytes, verified in {:.1} ms",
                proof.len(),
                ms(t.elapsed())
            );
        }
    }
    println!(
        "  publishing an epoch of {STEADY_EPOCH} changes: {:.0} / {:.0} / {:.0} ms",
        times[0], times[1], times[2]
    );

    // A device-list fetch's evidence: the broker's lookup, its size, a client's check.
    let mut lookups = Vec::new();
    let mut checks = Vec::new();
    let mut size = 0;
    let pins = LogPins::default();
    for k in 0..200 {
        let i = (k * 7919) % accounts;
        // The newest version of account i: the steady rounds changed some.
        let version = (0..3u64)
            .rev()
            .find(|r| i >= *r as usize && (i - *r as usize).is_multiple_of(step))
            .map_or(1, |r| 2 + r);
        let signed = list(&handle(i), version);
        let t = Instant::now();
        let evidence = log
            .evidence(&handle(i), &signed, None, true)
            .await
            .expect("evidence");
        lookups.push(ms(t.elapsed()));
        let bytes = evidence.to_bytes();
        size = size.max(bytes.len());
        let t = Instant::now();
        pins.check(&handle(i), &signed, Some(&bytes))
            .expect("verifies")
            .expect("a log");
        checks.push(ms(t.elapsed()));
    }
    println!(
        "  device-list evidence: up to {size} bytes; broker lookup p50 {:.2} ms; client check p50 {:.2} ms",
        median(lookups),
        median(checks)
    );
    let (_, history) = log.history(&handle(0), 64).await.expect("history");
    println!(
        "  history proof of an account with 4 versions: {} bytes",
        history.len()
    );
    let disk: u64 = walk(dir.path());
    println!("  log on disk: {:.0} MB", disk as f64 / 1e6);
}

fn walk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let sizes: Vec<usize> = std::env::var("SEALPOST_BENCH_ACCOUNTS")
        .unwrap_or_else(|_| "10000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for accounts in sizes {
        runtime.block_on(run(accounts));
    }
}
