//! The `appends`, `e2e` and `federated` scenarios.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use sealpost_proto::limits::{MAX_ACKS_PER_FRAME, MAX_CIPHERTEXT_BYTES, MAX_DURABLE_TTL_SECS};
use serde_json::{Value, json};

use crate::{
    AppendsArgs, Common, E2eArgs, FederatedArgs, TrafficArgs,
    api::{Api, register_many},
    client::{Account, ConnectOptions, Ws, connect_all},
    traffic::{self, Outcome, Plan, Recipient, Stats},
    util::{Targets, check_nofile, fmt_duration, latency_json, latency_line, per_sec, run_tag},
};

/// Read buffer for connections that carry traffic.
///
/// Small on purpose: tungstenite zeroes the free part of its read buffer before every read
/// (`FrameCodec::read_in`), including reads that find nothing. At 64 KiB that was a quarter of
/// the generator's CPU: in W1 against the in-memory store it used 93 % of its core, at the
/// edge of measuring itself (`loadtest/JOURNAL.md`, "2026-12-08 (10)"). A frame longer than
/// this still arrives in one read: tungstenite reserves room for a whole frame once it has
/// its header.
pub(crate) const BUSY_READ_BUFFER: usize = 8 * 1024;

pub(crate) fn check_size(size: usize) -> Result<()> {
    ensure!(
        size >= 8,
        "--size must be at least 8 (the send timestamp takes 8 bytes)"
    );
    ensure!(
        size <= MAX_CIPHERTEXT_BYTES,
        "--size must be at most {MAX_CIPHERTEXT_BYTES}"
    );
    Ok(())
}

pub(crate) fn check_traffic(t: &TrafficArgs) -> Result<()> {
    ensure!(
        (1..=MAX_ACKS_PER_FRAME).contains(&t.ack_batch),
        "--ack-batch must be 1..={MAX_ACKS_PER_FRAME}"
    );
    ensure!(
        (1..=MAX_DURABLE_TTL_SECS).contains(&t.ttl_secs),
        "--ttl must be 1..={MAX_DURABLE_TTL_SECS}"
    );
    ensure!(!t.duration.is_zero(), "--duration must be > 0");
    Ok(())
}

/// How the traffic of an `e2e` or `federated` run (or another server's `e2e`) is paced, once
/// its arguments are checked.
pub(crate) struct Pacing {
    /// Sends outstanding per device.
    pub(crate) pipeline: usize,
    /// Open loop: the interval between one device's sends (the total rate spread evenly over
    /// all devices). Closed loop: `None`.
    pub(crate) interval: Option<Duration>,
    /// Says which, for the banner.
    pub(crate) mode: String,
}

impl Pacing {
    /// Checks the arguments common to `e2e` and `federated` and derives the pacing.
    fn of(e: &E2eArgs) -> Result<Self> {
        Self::new(e.devices, e.size, e.rate, e.pipeline, &e.traffic)
    }

    /// Checks an `e2e`-like run's arguments and derives the pacing.
    pub(crate) fn new(
        devices: usize,
        size: usize,
        rate: u64,
        pipeline: Option<usize>,
        traffic: &TrafficArgs,
    ) -> Result<Self> {
        check_size(size)?;
        check_traffic(traffic)?;
        ensure!(devices >= 2, "--devices must be at least 2");
        check_nofile(u64::try_from(devices).unwrap_or(u64::MAX) + 256)?;
        let open_loop = rate > 0;
        let pipeline = pipeline.unwrap_or(if open_loop { 64 } else { 1 });
        ensure!(pipeline > 0, "--pipeline must be > 0");
        let interval = open_loop.then(|| {
            #[allow(clippy::cast_precision_loss)]
            let secs = devices as f64 / rate as f64;
            Duration::from_secs_f64(secs)
        });
        let mode = if open_loop {
            format!("open loop at {rate} msg/s total (cap {pipeline} outstanding per device)")
        } else {
            format!("closed loop, pipeline {pipeline} per device")
        };
        Ok(Pacing {
            pipeline,
            interval,
            mode,
        })
    }

    /// The plan of connections sending to `accounts` (each a list of its devices).
    fn plan(&self, e: &E2eArgs, accounts: &[Vec<Account>]) -> Arc<Plan> {
        let recipients = accounts
            .iter()
            .map(|devs| Recipient {
                handle: devs[0].handle.clone(),
                devices: devs.iter().map(|d| d.device).collect(),
            })
            .collect();
        self.plan_to(recipients, e.size, &e.traffic)
    }

    /// The plan of connections sending `size`-byte messages to `recipients`.
    pub(crate) fn plan_to(
        &self,
        recipients: Vec<Recipient>,
        size: usize,
        t: &TrafficArgs,
    ) -> Arc<Plan> {
        Arc::new(Plan {
            recipients,
            size,
            ttl_secs: t.ttl_secs,
            pipeline: self.pipeline,
            interval: self.interval,
            ack_batch: t.ack_batch,
            ack_delay: t.ack_delay,
            warmup: t.warmup,
            duration: t.duration,
            drain_timeout: t.drain_timeout,
            wait_for_delivery: true,
            cpu: t.cpu.clone(),
            total: None,
            taken: Arc::default(),
        })
    }
}

fn connect_options(common: &Common) -> ConnectOptions {
    ConnectOptions {
        read_buffer: BUSY_READ_BUFFER,
        timeout: common.connect_timeout,
    }
}

/// Connects and authenticates `accounts`' devices (draining their backlogs), spread over
/// `targets`, as many at once as `--connect-concurrency` allows.
async fn connect(common: &Common, targets: &Targets, accounts: &[Account]) -> Result<Vec<Ws>> {
    connect_all(
        targets,
        accounts,
        connect_options(common),
        common.connect_concurrency,
    )
    .await
}

/// N senders, pipelined, to recipients that never connect: how fast the broker makes
/// envelopes durable.
pub(crate) async fn appends(args: &AppendsArgs) -> Result<Value> {
    let (common, t) = (&args.common, &args.traffic);
    check_size(args.size)?;
    check_traffic(t)?;
    ensure!(
        args.senders > 0 && args.recipients > 0,
        "--senders and --recipients must be > 0"
    );
    ensure!(args.pipeline > 0, "--pipeline must be > 0");
    check_nofile(u64::try_from(args.senders).unwrap_or(u64::MAX) + 256)?;
    let targets = common.targets()?;
    let apis = Api::each(&targets)?;
    let tag = run_tag();
    let shape = AppendsShape::of(args);
    print_appends_banner("appends", &shape, t, &tag);
    print_brokers(&targets);

    let recipient_handles = (0..args.recipients)
        .map(|i| format!("lt-{tag}-r{i}@{}", common.domain))
        .collect();
    let recipients =
        register_many(&apis, recipient_handles, 1, common.register_concurrency).await?;
    let sender_handles = (0..args.senders)
        .map(|i| format!("lt-{tag}-s{i}@{}", common.domain))
        .collect();
    let senders = register_many(&apis, sender_handles, 1, common.register_concurrency).await?;
    let senders: Vec<_> = senders.into_iter().flatten().collect();
    let conns = connect(common, &targets, &senders).await?;

    let plan = appends_plan(
        &shape,
        recipients
            .iter()
            .map(|devs| Recipient {
                handle: devs[0].handle.clone(),
                devices: devs.iter().map(|d| d.device).collect(),
            })
            .collect(),
        t,
    );
    let stats = Arc::new(Stats::new());
    let self_index = vec![None; conns.len()];
    let out = traffic::run(conns, self_index, plan, Arc::clone(&stats)).await;

    let mut fields = report_appends(&shape, &stats, &out);
    if args.drain {
        // Every recipient's device connects (as many at once as connects are allowed) and
        // reads its queue up to `queue_empty`, acking as it goes.
        let devices: Vec<_> = recipients.iter().map(|a| a[0].clone()).collect();
        let started = Instant::now();
        let conns = connect(common, &targets, &devices).await?;
        let drain_s = started.elapsed().as_secs_f64();
        println!("  drained {} queues in {drain_s:.2}s", conns.len());
        fields["drain_s"] = json!(drain_s);
    }
    Ok(fields)
}

/// What an `appends` run (against any target) does, for its banner and report.
pub(crate) struct AppendsShape {
    pub(crate) senders: usize,
    pub(crate) recipients: usize,
    pub(crate) size: usize,
    pub(crate) pipeline: usize,
    /// Zero with a fixed count of sends.
    pub(crate) warmup: Duration,
    /// `--per-recipient`: a fixed count of sends (recipients × this) instead of a duration.
    pub(crate) per_recipient: Option<u64>,
    pub(crate) total: Option<u64>,
}

impl AppendsShape {
    fn of(args: &AppendsArgs) -> Self {
        Self::new(
            args.senders,
            args.recipients,
            args.size,
            args.pipeline,
            args.per_recipient,
            &args.traffic,
        )
    }

    pub(crate) fn new(
        senders: usize,
        recipients: usize,
        size: usize,
        pipeline: usize,
        per_recipient: Option<u64>,
        t: &TrafficArgs,
    ) -> Self {
        let total =
            per_recipient.map(|n| n.saturating_mul(u64::try_from(recipients).unwrap_or(u64::MAX)));
        AppendsShape {
            senders,
            recipients,
            size,
            pipeline,
            warmup: if total.is_some() {
                Duration::ZERO
            } else {
                t.warmup
            },
            per_recipient,
            total,
        }
    }
}

/// The plan of an `appends` run (any target): pipelined senders, nobody waits for delivery.
pub(crate) fn appends_plan(
    shape: &AppendsShape,
    recipients: Vec<Recipient>,
    t: &TrafficArgs,
) -> Arc<Plan> {
    Arc::new(Plan {
        recipients,
        size: shape.size,
        ttl_secs: t.ttl_secs,
        pipeline: shape.pipeline,
        interval: None,
        ack_batch: t.ack_batch,
        ack_delay: t.ack_delay,
        warmup: shape.warmup,
        duration: t.duration,
        drain_timeout: t.drain_timeout,
        wait_for_delivery: false,
        cpu: t.cpu.clone(),
        total: shape.total,
        taken: Arc::default(),
    })
}

/// The banner of an `appends` run: `name` says which target.
pub(crate) fn print_appends_banner(name: &str, shape: &AppendsShape, t: &TrafficArgs, tag: &str) {
    match shape.per_recipient {
        None => println!(
            "{name}: {} senders -> {} recipient(s), {} B ciphertext, pipeline {}, warm-up {}, \
             duration {} (run {tag})",
            shape.senders,
            shape.recipients,
            shape.size,
            shape.pipeline,
            fmt_duration(shape.warmup),
            fmt_duration(t.duration),
        ),
        Some(n) => println!(
            "{name}: {} senders -> {} recipient(s) x {n} each, {} B ciphertext, pipeline {}, \
             at most {} (run {tag})",
            shape.senders,
            shape.recipients,
            shape.size,
            shape.pipeline,
            fmt_duration(t.duration),
        ),
    }
}

/// Prints the figures of an `appends` run (any target) and returns its JSON fields.
pub(crate) fn report_appends(shape: &AppendsShape, stats: &Stats, out: &Outcome) -> Value {
    let (result_hist, _) = stats.histograms();
    let rejected = stats.rejected.by_name();
    let w = out.window;
    println!("results:");
    println!(
        "  sent {}  accepted {} (duplicates {})  rejected {} {:?}",
        out.total.sent,
        out.total.accepted,
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        stats.rejected.total(),
        rejected,
    );
    println!(
        "  durable appends/s: {}  (send_results/s {}, sends/s {}) over {}",
        per_sec(w.accepted, out.window_len),
        per_sec(w.results, out.window_len),
        per_sec(w.sent, out.window_len),
        fmt_duration(out.window_len),
    );
    println!("{}", latency_line("send->send_result", &result_hist));
    print_health(stats, out);

    let mut fields = json!({
        "senders": shape.senders,
        "recipients": shape.recipients,
        "size": shape.size,
        "pipeline": shape.pipeline,
        "duration_s": out.window_len.as_secs_f64(),
        "warmup_s": shape.warmup.as_secs_f64(),
        "sent": out.total.sent,
        "accepted": out.total.accepted,
        "rejected": rejected,
        "durable_per_s": per_sec(w.accepted, out.window_len),
        "results_per_s": per_sec(w.results, out.window_len),
        "send_result_latency": latency_json(&result_hist),
        "drained": out.drained,
        "server_errors": stats.server_errors.by_name(),
        "closed_early": stats.closes(),
    });
    if let Some(n) = shape.per_recipient {
        fields["per_recipient"] = json!(n);
    }
    add_window_cpu(&mut fields, out);
    fields
}

/// Every device sends to random other accounts and acks what it receives: end-to-end latency.
pub(crate) async fn e2e(args: &E2eArgs) -> Result<Value> {
    let (common, t) = (&args.common, &args.traffic);
    let pacing = Pacing::of(args)?;
    let targets = common.targets()?;
    let apis = Api::each(&targets)?;
    let tag = run_tag();
    println!(
        "e2e: {} devices, {} B ciphertext, {}, warm-up {}, duration {} (run {tag})",
        args.devices,
        args.size,
        pacing.mode,
        fmt_duration(t.warmup),
        fmt_duration(t.duration),
    );
    print_brokers(&targets);

    let handles = (0..args.devices)
        .map(|i| format!("lt-{tag}-d{i}@{}", common.domain))
        .collect();
    let accounts = register_many(&apis, handles, 1, common.register_concurrency).await?;
    let devices: Vec<_> = accounts.iter().map(|a| a[0].clone()).collect();
    let conns = connect(common, &targets, &devices).await?;
    if conns.len() != devices.len() {
        bail!(
            "only {} of {} devices connected",
            conns.len(),
            devices.len()
        );
    }

    let plan = pacing.plan(args, &accounts);
    let stats = Arc::new(Stats::new());
    let self_index = (0..conns.len()).map(Some).collect();
    let out = traffic::run(conns, self_index, plan, Arc::clone(&stats)).await;

    let shape = E2eShape {
        devices: args.devices,
        size: args.size,
        rate: args.rate,
        pipeline: pacing.pipeline,
        warmup: t.warmup,
    };
    Ok(report_e2e(&shape, &stats, &out))
}

/// What an `e2e` run (against any target) does, for its report.
pub(crate) struct E2eShape {
    pub(crate) devices: usize,
    pub(crate) size: usize,
    /// 0: closed loop.
    pub(crate) rate: u64,
    pub(crate) pipeline: usize,
    pub(crate) warmup: Duration,
}

/// Prints the figures of an `e2e` run (any target) and returns its JSON fields.
pub(crate) fn report_e2e(shape: &E2eShape, stats: &Stats, out: &Outcome) -> Value {
    let open_loop = shape.rate > 0;
    let (result_hist, deliver_hist) = stats.histograms();
    let rejected = stats.rejected.by_name();
    let late = stats.late_sends.load(std::sync::atomic::Ordering::Relaxed);
    let w = out.window;
    println!("results:");
    println!(
        "  sent {}  durable {}  rejected {} {:?}  delivered {}  undelivered {}",
        out.total.sent,
        out.total.accepted,
        stats.rejected.total(),
        rejected,
        out.total.delivered,
        out.total.accepted.saturating_sub(out.total.delivered),
    );
    println!(
        "  per second over {}: sent {}  durable {}  delivered {}",
        fmt_duration(out.window_len),
        per_sec(w.sent, out.window_len),
        per_sec(w.accepted, out.window_len),
        per_sec(w.delivered, out.window_len),
    );
    if open_loop {
        println!(
            "  target {} msg/s; sends more than 5 ms behind schedule: {late}",
            shape.rate
        );
    }
    println!("{}", latency_line("send->deliver", &deliver_hist));
    println!("{}", latency_line("send->send_result", &result_hist));
    print_health(stats, out);

    let mut fields = json!({
        "devices": shape.devices,
        "size": shape.size,
        "rate": shape.rate,
        "pipeline": shape.pipeline,
        "duration_s": out.window_len.as_secs_f64(),
        "warmup_s": shape.warmup.as_secs_f64(),
        "sent": out.total.sent,
        "durable": out.total.accepted,
        "rejected": rejected,
        "delivered": out.total.delivered,
        "sent_per_s": per_sec(w.sent, out.window_len),
        "durable_per_s": per_sec(w.accepted, out.window_len),
        "delivered_per_s": per_sec(w.delivered, out.window_len),
        "late_sends": late,
        "deliver_latency": latency_json(&deliver_hist),
        "send_result_latency": latency_json(&result_hist),
        "drained": out.drained,
        "server_errors": stats.server_errors.by_name(),
        "closed_early": stats.closes(),
    });
    add_window_cpu(&mut fields, out);
    fields
}

/// Devices on two federated brokers, each sending only to accounts of the other domain:
/// every envelope crosses the link (outbox on the sending broker, transaction, mailbox on the
/// receiving one).
pub(crate) async fn federated(args: &FederatedArgs) -> Result<Value> {
    let e = &args.e2e;
    let (common, t) = (&e.common, &e.traffic);
    let pacing = Pacing::of(e)?;
    let targets = [
        common.target("federated")?,
        crate::util::Target::parse(&args.peer_url)?,
    ];
    let domains = [common.domain.clone(), args.peer_domain.clone()];
    let tag = run_tag();
    let per_side = e.devices / 2;
    println!(
        "federated: {per_side} devices on {} and {per_side} on {}, {} B ciphertext, {}, \
         warm-up {}, duration {} (run {tag})",
        domains[0],
        domains[1],
        e.size,
        pacing.mode,
        fmt_duration(t.warmup),
        fmt_duration(t.duration),
    );
    let mut accounts = Vec::new();
    let mut conns = Vec::new();
    for (side, (target, domain)) in targets.iter().zip(&domains).enumerate() {
        let api = Api::new(&target.http)?;
        let handles = (0..per_side)
            .map(|i| format!("lt-{tag}-f{side}-{i}@{domain}"))
            .collect();
        let side_accounts = register_many(
            std::slice::from_ref(&api),
            handles,
            1,
            common.register_concurrency,
        )
        .await?;
        let devices: Vec<_> = side_accounts.iter().map(|a| a[0].clone()).collect();
        let side_conns = connect(common, &Targets::one(target.clone()), &devices).await?;
        ensure!(
            side_conns.len() == devices.len(),
            "only {} of {} devices connected to {domain}",
            side_conns.len(),
            devices.len()
        );
        accounts.push(side_accounts);
        conns.push(side_conns);
    }
    let (plan_ab, plan_ba) = (pacing.plan(e, &accounts[1]), pacing.plan(e, &accounts[0]));
    let stats = Arc::new(Stats::new());
    let conns_b = conns.pop().unwrap_or_default();
    let conns_a = conns.pop().unwrap_or_default();
    let none_a = vec![None; conns_a.len()];
    let none_b = vec![None; conns_b.len()];
    // Both directions at once, sharing the counters: the figures are the sum.
    let (out, _) = tokio::join!(
        traffic::run(conns_a, none_a, plan_ab, Arc::clone(&stats)),
        traffic::run(conns_b, none_b, plan_ba, Arc::clone(&stats)),
    );
    let (result_hist, deliver_hist) = stats.histograms();
    let rejected = stats.rejected.by_name();
    let w = out.window;
    println!("results:");
    println!(
        "  sent {}  durable in outboxes {}  rejected {} {:?}  delivered {}",
        out.total.sent,
        out.total.accepted,
        stats.rejected.total(),
        rejected,
        out.total.delivered,
    );
    println!(
        "  per second over {}: sent {}  durable {}  delivered across domains {}",
        fmt_duration(out.window_len),
        per_sec(w.sent, out.window_len),
        per_sec(w.accepted, out.window_len),
        per_sec(w.delivered, out.window_len),
    );
    println!("{}", latency_line("send->deliver", &deliver_hist));
    println!("{}", latency_line("send->send_result", &result_hist));
    print_health(&stats, &out);
    let mut fields = json!({
        "devices": e.devices,
        "size": e.size,
        "rate": e.rate,
        "pipeline": pacing.pipeline,
        "duration_s": out.window_len.as_secs_f64(),
        "sent": out.total.sent,
        "durable": out.total.accepted,
        "rejected": rejected,
        "delivered": out.total.delivered,
        "delivered_per_s": per_sec(w.delivered, out.window_len),
        "deliver_latency": latency_json(&deliver_hist),
        "send_result_latency": latency_json(&result_hist),
        "drained": out.drained,
        "server_errors": stats.server_errors.by_name(),
        "closed_early": stats.closes(),
    });
    // Both directions ran at once: the first one's window sample covers the whole machine.
    add_window_cpu(&mut fields, &out);
    Ok(fields)
}

/// With `--cpu`: prints the CPU seconds each class used during the measured window and adds
/// them to the JSON as `window_cpu_s` (`{"brokers": 12.3, ..., "loadgen": 3.4}`). Without it,
/// the output is unchanged.
fn add_window_cpu(fields: &mut Value, out: &Outcome) {
    if out.window_cpu.is_empty() {
        return;
    }
    let line: Vec<String> = out
        .window_cpu
        .iter()
        .map(|(name, d)| format!("{name} {:.2}", d.as_secs_f64()))
        .collect();
    println!("  CPU seconds during the window: {}", line.join("  "));
    let cpu: serde_json::Map<String, Value> = out
        .window_cpu
        .iter()
        .map(|(name, d)| (name.clone(), json!(d.as_secs_f64())))
        .collect();
    if let Some(map) = fields.as_object_mut() {
        map.insert("window_cpu_s".into(), Value::Object(cpu));
    }
}

/// With several brokers (pods of one domain), says so under the banner; one broker prints
/// nothing, so single-broker output stays as it was.
pub(crate) fn print_brokers(targets: &Targets) {
    if targets.len() > 1 {
        println!(
            "  {} brokers, accounts and devices round-robin: {}",
            targets.len(),
            targets.describe()
        );
    }
}

fn print_health(stats: &Stats, out: &Outcome) {
    use std::sync::atomic::Ordering::Relaxed;
    println!(
        "  drain: {} in {:.2}s",
        if out.drained {
            "complete"
        } else {
            "TIMED OUT (counts above are partial)"
        },
        out.drain_time.as_secs_f64()
    );
    let errors = stats.server_errors.by_name();
    if !errors.is_empty() {
        println!("  server error frames: {errors:?}");
    }
    let notices = stats.notices.load(Relaxed);
    if notices > 0 {
        println!("  notices (mailbox_full): {notices}");
    }
    let decode_errors = stats.decode_errors.load(Relaxed);
    if decode_errors > 0 {
        println!("  undecodable frames: {decode_errors}");
    }
    let closes = stats.closes();
    if !closes.is_empty() {
        println!("  connections closed before the end: {closes:?}");
    }
    let failures = stats
        .failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !failures.is_empty() {
        println!("  failures: {failures:?}");
    }
}
