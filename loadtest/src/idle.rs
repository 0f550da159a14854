//! The `idle` scenario: memory the broker spends per idle authenticated connection.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Result, ensure};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, sleep},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    IdleArgs,
    api::{Api, register_many},
    client::{ConnectOptions, Ws, connect, describe_close},
    util::{check_nofile, fmt_duration, read_cpu_time, read_rss_kib, run_tag},
};

/// Idle connections need little read buffer on our side.
const IDLE_READ_BUFFER: usize = 4 * 1024;

/// What the held sessions count.
#[derive(Default)]
pub(crate) struct IdleStats {
    open: AtomicU64,
    /// Heartbeats the server sent (WebSocket pings, XMPP pings, ...).
    pub(crate) pings: AtomicU64,
    /// Anything else it sent.
    pub(crate) frames: AtomicU64,
    closes: Mutex<BTreeMap<String, u64>>,
}

impl IdleStats {
    /// A session ended before the run did, for `reason`.
    pub(crate) fn close(&self, reason: String) {
        self.open.fetch_sub(1, Relaxed);
        *self
            .closes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }
}

/// Keeps reading one connection (so pings are answered) until the run ends.
async fn keep_alive(mut ws: Ws, stats: Arc<IdleStats>, mut done: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            _ = done.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Ping(_))) => {
                    stats.pings.fetch_add(1, Relaxed);
                }
                Some(Ok(Message::Close(frame))) => {
                    stats.close(describe_close(frame.as_ref()));
                    return;
                }
                Some(Ok(_)) => {
                    stats.frames.fetch_add(1, Relaxed);
                }
                Some(Err(e)) => {
                    stats.close(format!("read_error: {e}"));
                    return;
                }
                None => {
                    stats.close("eof".to_owned());
                    return;
                }
            },
        }
    }
}

/// Samples the broker's RSS every 500 ms until four samples in a row moved less than
/// max(256 KiB, 0.1 %), or `timeout` passes. Returns the last sample and whether it settled.
async fn settle(pid: u32, timeout: Duration) -> Result<(u64, bool)> {
    let deadline = Instant::now() + timeout;
    let mut prev = read_rss_kib(pid)?;
    let mut stable = 0;
    loop {
        sleep(Duration::from_millis(500)).await;
        let cur = read_rss_kib(pid)?;
        if cur.abs_diff(prev) <= (cur / 1000).max(256) {
            stable += 1;
        } else {
            stable = 0;
        }
        prev = cur;
        if stable >= 4 {
            return Ok((cur, true));
        }
        if Instant::now() >= deadline {
            return Ok((cur, false));
        }
    }
}

pub(crate) async fn idle(args: &IdleArgs) -> Result<Value> {
    let common = &args.common;
    ensure!(args.connections > 0, "--connections must be > 0");
    ensure!(
        (1..=sealpost_proto::limits::MAX_DEVICES_PER_USER).contains(&args.devices_per_account),
        "--devices-per-account must be 1..={}",
        sealpost_proto::limits::MAX_DEVICES_PER_USER
    );
    check_nofile(u64::try_from(args.connections).unwrap_or(u64::MAX) + 256)?;
    let targets = common.targets()?;
    if let Some(pid) = args.broker_pid {
        ensure!(
            targets.len() == 1,
            "--broker-pid measures one broker: give one --url"
        );
        read_rss_kib(pid)?;
    }
    let apis = Api::each(&targets)?;
    let tag = run_tag();
    let accounts_n = args.connections.div_ceil(args.devices_per_account);
    println!(
        "idle: {} connections ({} accounts x {} device(s)), hold {} (run {tag})",
        args.connections,
        accounts_n,
        args.devices_per_account,
        fmt_duration(args.hold),
    );
    crate::scenarios::print_brokers(&targets);

    let handles = (0..accounts_n)
        .map(|i| format!("lt-{tag}-i{i}@{}", common.domain))
        .collect();
    let accounts = register_many(
        &apis,
        handles,
        args.devices_per_account,
        common.register_concurrency,
    )
    .await?;
    let devices: Vec<_> = accounts
        .into_iter()
        .flatten()
        .take(args.connections)
        .collect();

    let opts = ConnectOptions {
        read_buffer: IDLE_READ_BUFFER,
        timeout: common.connect_timeout,
    };
    let hold = Hold {
        server_pid: args.broker_pid,
        settle_timeout: args.settle_timeout,
        hold: args.hold,
        concurrency: common.connect_concurrency,
    };
    let (targets, devices) = (&targets, &devices);
    let mut fields = hold_idle(devices.len(), &hold, |i, stats, done| async move {
        let (ws, _) = connect(&targets.of(i).ws, &devices[i], opts).await?;
        Ok(tokio::spawn(keep_alive(ws, stats, done)))
    })
    .await?;
    fields["devices_per_account"] = json!(args.devices_per_account);
    Ok(fields)
}

/// How [`hold_idle`] measures.
pub(crate) struct Hold {
    /// The server's process id, for its RSS and CPU time.
    pub(crate) server_pid: Option<u32>,
    pub(crate) settle_timeout: Duration,
    pub(crate) hold: Duration,
    /// Connects at once.
    pub(crate) concurrency: usize,
}

/// The measuring part of every target's `idle` scenario: waits for the server's RSS to settle,
/// opens `total` sessions with `open(i, stats, done)` (which connects and authenticates
/// session `i` and spawns the task that keeps it open, counting into `stats`, until `done`),
/// waits for RSS to settle again, holds the sessions for `hold.hold`, then closes them and
/// reports RSS per session (printed, and as JSON fields).
pub(crate) async fn hold_idle<F, Fut>(total: usize, hold: &Hold, open: F) -> Result<Value>
where
    F: Fn(usize, Arc<IdleStats>, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = Result<JoinHandle<()>>>,
{
    // Let the broker finish whatever registration left behind before the baseline.
    let rss_before = match hold.server_pid {
        Some(pid) => Some(settle(pid, hold.settle_timeout).await?.0),
        None => None,
    };
    if let Some(kib) = rss_before {
        println!("  broker RSS before connecting: {kib} KiB");
    }

    let stats = Arc::new(IdleStats::default());
    let (done_tx, done_rx) = watch::channel(false);
    let started = Instant::now();
    let step = (total / 10).max(1);
    let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(total);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_failure: Option<String> = None;
    let mut attempts = stream::iter(0..total)
        .map(|i| open(i, Arc::clone(&stats), done_rx.clone()))
        .buffer_unordered(hold.concurrency.max(1));
    let mut finished = 0;
    while let Some(result) = attempts.next().await {
        finished += 1;
        match result {
            Ok(task) => {
                stats.open.fetch_add(1, Relaxed);
                tasks.push(task);
            }
            Err(e) => {
                *failures.entry(e.root_cause().to_string()).or_default() += 1;
                first_failure.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        if finished % step == 0 && finished < total {
            println!(
                "  connected {finished}/{total} ({} open)",
                stats.open.load(Relaxed)
            );
        }
    }
    drop(attempts);
    let connected = u64::try_from(tasks.len()).unwrap_or(u64::MAX);
    println!(
        "  {connected} of {total} connections authenticated in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    if let Some(first) = &first_failure {
        println!("  connect failures: {failures:?}; first: {first}");
    }

    let (rss_after, settled) = match hold.server_pid {
        Some(pid) => {
            let (kib, settled) = settle(pid, hold.settle_timeout).await?;
            (Some(kib), settled)
        }
        None => (None, false),
    };
    // What the broker spends on idle connections (pings, timers) while they are held.
    let cpu_start = hold.server_pid.map(read_cpu_time).transpose()?;
    let hold_started = Instant::now();
    if !hold.hold.is_zero() {
        println!("  holding the connections for {}", fmt_duration(hold.hold));
        sleep(hold.hold).await;
    }
    let held = hold_started.elapsed();
    let cpu_end = hold.server_pid.map(read_cpu_time).transpose()?;
    let idle_cpu_pct = match (cpu_start, cpu_end) {
        (Some(start), Some(end)) if !hold.hold.is_zero() => {
            let pct = (end - start).as_secs_f64() / held.as_secs_f64() * 100.0;
            Some((pct * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let rss_end = hold.server_pid.map(read_rss_kib).transpose()?;
    let still_open = stats.open.load(Relaxed);
    let closes = stats
        .closes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();

    let _ = done_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;

    let per_conn = match (rss_before, rss_after) {
        (Some(before), Some(after)) if connected > 0 => {
            #[allow(clippy::cast_precision_loss)]
            let kib = (after.saturating_sub(before)) as f64 / connected as f64;
            Some((kib * 100.0).round() / 100.0)
        }
        _ => None,
    };
    println!("results:");
    println!("  connections: {connected} authenticated, {still_open} still open at the end");
    match (rss_before, rss_after, per_conn) {
        (Some(before), Some(after), Some(per)) => {
            println!(
                "  broker RSS: {before} KiB -> {after} KiB ({}) = {:+} KiB; {per} KiB per connection",
                if settled {
                    "settled"
                } else {
                    "NOT settled within the timeout"
                },
                i128::from(after) - i128::from(before),
            );
            if let Some(end) = rss_end {
                println!("  broker RSS at the end of the hold: {end} KiB");
            }
        }
        _ => println!("  broker RSS: not measured (pass --broker-pid)"),
    }
    if let Some(pct) = idle_cpu_pct {
        println!("  broker CPU during the hold: {pct}% of one core");
    }
    println!("  pings answered: {}", stats.pings.load(Relaxed));
    if !closes.is_empty() {
        println!("  connections closed by the broker: {closes:?}");
    }

    Ok(json!({
        "connections": total,
        "connected": connected,
        "still_open": still_open,
        "connect_failures": failures,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_end_kib": rss_end,
        "rss_settled": settled,
        "kib_per_connection": per_conn,
        "idle_cpu_percent": idle_cpu_pct,
        "pings": stats.pings.load(Relaxed),
        "closed_early": closes,
    }))
}
