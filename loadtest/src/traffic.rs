//! The send/receive engine shared by the `appends` and `e2e` scenarios, and (its pacing,
//! measured window, counters and timestamps: [`Pacer`], [`drive`], [`Stats`]) by the same
//! workloads against ejabberd and NATS (`crate::other`).
//!
//! Each connection runs two tasks. The writer sends `send` frames (closed loop: as soon as one
//! of its `pipeline` slots is free; open loop: on a fixed schedule, still capped at `pipeline`
//! outstanding) and the acks the reader hands it. The reader decodes every frame: a
//! `send_result` frees a slot and records send→send_result latency, a `deliver` records
//! send→deliver latency and queues its seq for a batched ack.
//!
//! Timestamps travel in the messages themselves, in nanoseconds since the process-wide base
//! ([`crate::util::now_ns`]): the first 8 bytes (little-endian) of every envelope id and of every
//! ciphertext. The other 8 bytes of the id are random, so ids stay unique. In open loop the
//! timestamp is the *scheduled* send time, so a sender that falls behind its schedule shows up
//! as latency instead of silently sending less (no coordinated omission).

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use hdrhistogram::Histogram;
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use sealpost_proto::{
    Class, ClientFrame, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome, ServerFrame,
};
use tokio::{
    sync::{Semaphore, mpsc, watch},
    task::JoinHandle,
    time::{Instant, Sleep, sleep, sleep_until},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    client::{Ws, describe_close, message},
    util::{CpuClass, LOADGEN_CLASS, cpu_sample, instant_ns, new_histogram, now_ns},
};

/// Counters by protocol error code.
pub(crate) struct CodeCounts([AtomicU64; 64]);

impl CodeCounts {
    fn new() -> Self {
        CodeCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn add(&self, code: ErrorCode) {
        let i = usize::from(code.as_u16()).min(self.0.len() - 1);
        self.0[i].fetch_add(1, Relaxed);
    }

    pub(crate) fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Non-zero counts by code name.
    pub(crate) fn by_name(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Relaxed);
                (n > 0).then(|| {
                    let name = u16::try_from(i)
                        .ok()
                        .and_then(ErrorCode::from_u16)
                        .map_or_else(|| format!("code_{i}"), |c| c.as_str().to_owned());
                    (name, n)
                })
            })
            .collect()
    }
}

/// Everything the connections count, shared by all of them.
pub(crate) struct Stats {
    pub(crate) sent: AtomicU64,
    pub(crate) results: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) rejected: CodeCounts,
    pub(crate) server_errors: CodeCounts,
    pub(crate) delivered: AtomicU64,
    pub(crate) notices: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    /// Open-loop sends that left more than 5 ms after their scheduled time.
    pub(crate) late_sends: AtomicU64,
    /// Connections that ended before the run did, by reason.
    pub(crate) closes: Mutex<BTreeMap<String, u64>>,
    /// Other servers' failed sends or reads that did not end the connection, by reason
    /// (Sealpost's refusals are in `rejected`).
    pub(crate) failures: Mutex<BTreeMap<String, u64>>,
    /// send→send_result of accepted sends, µs.
    pub(crate) result_latency: Mutex<Histogram<u64>>,
    /// send→deliver, µs.
    pub(crate) deliver_latency: Mutex<Histogram<u64>>,
    /// Latencies are recorded only for messages stamped at or after this (end of warm-up).
    record_from_ns: AtomicU64,
}

impl Stats {
    pub(crate) fn new() -> Self {
        Stats {
            sent: AtomicU64::new(0),
            results: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: CodeCounts::new(),
            server_errors: CodeCounts::new(),
            delivered: AtomicU64::new(0),
            notices: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            late_sends: AtomicU64::new(0),
            closes: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(BTreeMap::new()),
            result_latency: Mutex::new(new_histogram()),
            deliver_latency: Mutex::new(new_histogram()),
            record_from_ns: AtomicU64::new(0),
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            sent: self.sent.load(Relaxed),
            results: self.results.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
        }
    }

    pub(crate) fn closes(&self) -> BTreeMap<String, u64> {
        self.closes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn histograms(&self) -> (Histogram<u64>, Histogram<u64>) {
        let r = self
            .result_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let d = self
            .deliver_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (r, d)
    }

    /// Counts a failure that did not end the connection.
    pub(crate) fn fail(&self, reason: String) {
        *self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    pub(crate) fn close(&self, reason: String) {
        *self
            .closes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    pub(crate) fn record(&self, hist: &Mutex<Histogram<u64>>, stamp_ns: u64) {
        if stamp_ns < self.record_from_ns.load(Relaxed) {
            return;
        }
        let us = now_ns().saturating_sub(stamp_ns) / 1000;
        hist.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(us);
    }
}

/// Counter values at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) sent: u64,
    pub(crate) results: u64,
    pub(crate) accepted: u64,
    pub(crate) delivered: u64,
}

impl Snapshot {
    pub(crate) fn minus(self, earlier: Snapshot) -> Snapshot {
        Snapshot {
            sent: self.sent.saturating_sub(earlier.sent),
            results: self.results.saturating_sub(earlier.results),
            accepted: self.accepted.saturating_sub(earlier.accepted),
            delivered: self.delivered.saturating_sub(earlier.delivered),
        }
    }
}

/// A recipient account and its current devices.
#[derive(Clone)]
pub(crate) struct Recipient {
    pub(crate) handle: String,
    pub(crate) devices: Vec<u32>,
}

/// What the connections do.
pub(crate) struct Plan {
    /// Whom to send to; each send picks one at random.
    pub(crate) recipients: Vec<Recipient>,
    /// Ciphertext bytes per copy (at least 8).
    pub(crate) size: usize,
    pub(crate) ttl_secs: u32,
    /// Most sends outstanding (sent, no send_result yet) per connection.
    pub(crate) pipeline: usize,
    /// Open loop: time between two sends of one connection. `None`: closed loop.
    pub(crate) interval: Option<Duration>,
    /// Ack once this many deliveries are pending...
    pub(crate) ack_batch: usize,
    /// ...or once the oldest pending one waited this long.
    pub(crate) ack_delay: Duration,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    /// After sending stops, wait at most this long for outstanding results (and deliveries).
    pub(crate) drain_timeout: Duration,
    /// Whether draining also waits until every accepted envelope was delivered.
    pub(crate) wait_for_delivery: bool,
    /// Processes whose CPU time over the measured window is reported (`--cpu`).
    pub(crate) cpu: Vec<CpuClass>,
    /// A fixed number of sends for the whole run instead of sending for `duration` (which
    /// then only caps the run); send number `k` goes to recipient `k mod n`. `None`: timed.
    pub(crate) total: Option<u64>,
    /// Sends taken from `total` so far (shared by the connections' [`Pacer`]s).
    pub(crate) taken: Arc<AtomicU64>,
}

/// What a run measured.
pub(crate) struct Outcome {
    /// Counts during the measured window (after warm-up, before sending stopped).
    pub(crate) window: Snapshot,
    pub(crate) window_len: Duration,
    /// CPU time each `--cpu` class, then this process ([`LOADGEN_CLASS`]), used during the
    /// measured window; empty without `--cpu`.
    pub(crate) window_cpu: Vec<(String, Duration)>,
    /// Counts at the end, after draining.
    pub(crate) total: Snapshot,
    /// Whether draining finished before its timeout.
    pub(crate) drained: bool,
    pub(crate) drain_time: Duration,
}

/// Runs the plan over `conns`. `self_index[i]`, when set, is the recipient connection `i` must
/// not pick (its own account).
pub(crate) async fn run(
    conns: Vec<Ws>,
    self_index: Vec<Option<usize>>,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
) -> Outcome {
    let spawn_plan = Arc::clone(&plan);
    let spawn_stats = Arc::clone(&stats);
    drive(&plan, &stats, move |window, done_rx| {
        let (plan, stats) = (spawn_plan, spawn_stats);
        let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(conns.len() * 2);
        for (ws, me) in conns.into_iter().zip(self_index) {
            let (sink, stream) = ws.split();
            let permits = Arc::new(Semaphore::new(plan.pipeline));
            let (ack_tx, ack_rx) = mpsc::unbounded_channel();
            tasks.push(tokio::spawn(reader(
                stream,
                Arc::clone(&plan),
                Arc::clone(&stats),
                Arc::clone(&permits),
                ack_tx,
                done_rx.clone(),
            )));
            let schedule = Schedule { window, me };
            tasks.push(tokio::spawn(writer(
                sink,
                Arc::clone(&plan),
                Arc::clone(&stats),
                permits,
                ack_rx,
                done_rx.clone(),
                schedule,
            )));
        }
        tasks
    })
    .await
}

/// When a run sends: every connection starts at `start` and stops at `stop_at`.
#[derive(Clone, Copy)]
pub(crate) struct Window {
    pub(crate) start: Instant,
    pub(crate) stop_at: Instant,
}

/// The measuring part every target shares (Sealpost here, ejabberd in `xmpp`, NATS in
/// `jetstream`): `spawn` starts the connections' tasks, which send on `Window`'s schedule (see
/// [`Pacer`]) and count into `stats` until the watch says done. This samples the counters at the
/// start and end of the measured window, then waits (up to `plan.drain_timeout`) until every
/// send was answered and, with `plan.wait_for_delivery`, every accepted one delivered.
///
/// With `plan.total` (a fixed number of sends instead of a duration), the window starts with
/// the first send and ends when the last one is answered (or at the `duration` cap).
pub(crate) async fn drive(
    plan: &Plan,
    stats: &Arc<Stats>,
    spawn: impl FnOnce(Window, watch::Receiver<bool>) -> Vec<JoinHandle<()>>,
) -> Outcome {
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + plan.warmup;
    let stop_at = measure_from + plan.duration;
    stats
        .record_from_ns
        .store(instant_ns(measure_from.into_std()), Relaxed);
    let (done_tx, done_rx) = watch::channel(false);

    let tasks = spawn(Window { start, stop_at }, done_rx);

    sleep_until(measure_from).await;
    let at_start = stats.snapshot();
    let cpu_start = (!plan.cpu.is_empty()).then(|| cpu_sample(&plan.cpu));
    let window_len = match plan.total {
        None => {
            sleep_until(stop_at).await;
            plan.duration
        }
        Some(total) => {
            while stats.results.load(Relaxed) < total && Instant::now() < stop_at {
                sleep(Duration::from_millis(1)).await;
            }
            measure_from.elapsed()
        }
    };
    let at_stop = stats.snapshot();
    let window_cpu = match cpu_start {
        None => Vec::new(),
        Some(before) => plan
            .cpu
            .iter()
            .map(|c| c.name.clone())
            .chain([LOADGEN_CLASS.to_owned()])
            .zip(cpu_sample(&plan.cpu).into_iter().zip(before))
            .map(|(name, (after, before))| (name, after.saturating_sub(before)))
            .collect(),
    };
    println!(
        "  sending stopped: sent {}, results {}, delivered {}; draining",
        at_stop.sent, at_stop.results, at_stop.delivered
    );

    let drain_started = Instant::now();
    let drain_deadline = drain_started + plan.drain_timeout;
    let drained = loop {
        let s = stats.snapshot();
        let results_done = s.results >= s.sent;
        let delivery_done = !plan.wait_for_delivery || s.delivered >= s.accepted;
        // Writers may still be inside a send when sending stops; give them a moment.
        if results_done && delivery_done && drain_started.elapsed() > Duration::from_millis(50) {
            break true;
        }
        if Instant::now() >= drain_deadline {
            break false;
        }
        sleep(Duration::from_millis(20)).await;
    };
    let drain_time = drain_started.elapsed();
    let total = stats.snapshot();

    let _ = done_tx.send(true);
    let joined = tokio::time::timeout(Duration::from_secs(15), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    if joined.is_err() {
        println!("  warning: some connection tasks did not stop within 15s");
    }

    Outcome {
        window: at_stop.minus(at_start),
        window_len,
        window_cpu,
        total,
        drained,
        drain_time,
    }
}

/// One connection's sending schedule, the same for every target. Closed loop (`interval`
/// `None`): a send is due whenever a pipeline slot is free. Open loop: sends are due every
/// `interval`, starting at a random phase so the connections spread evenly; the timestamp a
/// send carries is its *scheduled* time, so falling behind shows as latency (no coordinated
/// omission). With a budget (`Plan::total`), sending stops once the run's sends are used up.
pub(crate) struct Pacer {
    interval: Option<Duration>,
    next_due: Instant,
    due_sleep: Pin<Box<Sleep>>,
    stop_sleep: Pin<Box<Sleep>>,
    sending: bool,
    due: bool,
    budget: Option<(Arc<AtomicU64>, u64)>,
}

impl Pacer {
    pub(crate) fn new(plan: &Plan, window: Window, rng: &mut StdRng) -> Self {
        let mut next_due = window.start;
        if let Some(interval) = plan.interval {
            next_due += interval.mul_f64(rng.gen_range(0.0..1.0));
        }
        Pacer {
            interval: plan.interval,
            next_due,
            due_sleep: Box::pin(sleep_until(next_due)),
            stop_sleep: Box::pin(sleep_until(window.stop_at)),
            sending: true,
            due: false,
            budget: plan.total.map(|t| (Arc::clone(&plan.taken), t)),
        }
    }

    /// Whether [`Pacer::tick`] has anything to wait for (select on it only then).
    pub(crate) fn sending(&self) -> bool {
        self.sending
    }

    /// Waits until sending stops or the next send falls due.
    pub(crate) async fn tick(&mut self) {
        tokio::select! {
            biased;
            () = &mut self.stop_sleep => self.sending = false,
            () = &mut self.due_sleep, if !self.due => self.due = true,
        }
    }

    /// Whether a send is due (then wait for a pipeline slot and call [`Pacer::take`]).
    pub(crate) fn ready(&self) -> bool {
        self.sending && self.due
    }

    /// Takes the due send: its timestamp, and with a budget its number in the run (which
    /// picks its recipient). `None`: the budget is used up and this connection stops sending
    /// (give the pipeline slot back).
    pub(crate) fn take(&mut self, stats: &Stats) -> Option<(u64, Option<u64>)> {
        let number = match &self.budget {
            None => None,
            Some((taken, total)) => {
                let k = taken.fetch_add(1, Relaxed);
                if k >= *total {
                    self.sending = false;
                    return None;
                }
                Some(k)
            }
        };
        let stamp = match self.interval {
            None => now_ns(),
            Some(interval) => {
                let scheduled = self.next_due;
                if scheduled.elapsed() > Duration::from_millis(5) {
                    stats.late_sends.fetch_add(1, Relaxed);
                }
                self.next_due += interval;
                self.due_sleep.as_mut().reset(self.next_due);
                self.due = false;
                instant_ns(scheduled.into_std())
            }
        };
        Some((stamp, number))
    }
}

/// The recipient of a send: number `k` of a budgeted run goes to `k mod n` (so each recipient
/// gets the same count), otherwise a random one other than `me`.
pub(crate) fn pick_recipient(
    n: usize,
    me: Option<usize>,
    number: Option<u64>,
    rng: &mut StdRng,
) -> usize {
    if let Some(k) = number {
        return usize::try_from(k % n as u64).unwrap_or(0);
    }
    match me {
        // Any other account: draw from n - 1 and skip over ourselves.
        Some(me) if n > 1 => {
            let i = rng.gen_range(0..n - 1);
            if i >= me { i + 1 } else { i }
        }
        _ => rng.gen_range(0..n),
    }
}

struct Schedule {
    window: Window,
    me: Option<usize>,
}

async fn writer(
    mut sink: SplitSink<Ws, Message>,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    permits: Arc<Semaphore>,
    mut acks: mpsc::UnboundedReceiver<Vec<u64>>,
    mut done: watch::Receiver<bool>,
    schedule: Schedule,
) {
    let mut rng = StdRng::from_entropy();
    let mut template = vec![0u8; plan.size.max(8)];
    rng.fill_bytes(&mut template);
    let mut pacer = Pacer::new(&plan, schedule.window, &mut rng);

    loop {
        tokio::select! {
            biased;
            _ = done.changed() => break,
            seqs = acks.recv() => {
                let Some(seqs) = seqs else { break };
                if sink.send(message(&ClientFrame::Ack { seqs })).await.is_err() {
                    break;
                }
            }
            () = pacer.tick(), if pacer.sending() => {}
            permit = Arc::clone(&permits).acquire_owned(), if pacer.ready() => {
                let Ok(permit) = permit else { break };
                let Some((stamp, number)) = pacer.take(&stats) else { continue };
                permit.forget();
                let frame = send_frame(&plan, schedule.me, number, &mut rng, &mut template, stamp);
                if sink.send(message(&frame)).await.is_err() {
                    break;
                }
                stats.sent.fetch_add(1, Relaxed);
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

fn send_frame(
    plan: &Plan,
    me: Option<usize>,
    number: Option<u64>,
    rng: &mut StdRng,
    template: &mut [u8],
    stamp: u64,
) -> ClientFrame {
    let to = pick_recipient(plan.recipients.len(), me, number, rng);
    let recipient = &plan.recipients[to];
    template[..8].copy_from_slice(&stamp.to_le_bytes());
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&stamp.to_le_bytes());
    rng.fill_bytes(&mut id[8..]);
    ClientFrame::Send {
        id: EnvelopeId(id),
        to: recipient.handle.clone(),
        class: Class::Durable,
        ttl_secs: plan.ttl_secs,
        copies: recipient
            .devices
            .iter()
            .map(|&d| Copy {
                device: DeviceId(d),
                ciphertext: template.to_vec(),
            })
            .collect(),
    }
}

pub(crate) fn stamp_of(bytes: &[u8]) -> Option<u64> {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
}

async fn reader(
    mut stream: SplitStream<Ws>,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    permits: Arc<Semaphore>,
    acks: mpsc::UnboundedSender<Vec<u64>>,
    mut done: watch::Receiver<bool>,
) {
    let mut pending: Vec<u64> = Vec::new();
    let ack_sleep = sleep(Duration::ZERO);
    tokio::pin!(ack_sleep);
    let mut armed = false;

    'read: loop {
        tokio::select! {
            biased;
            _ = done.changed() => break,
            () = &mut ack_sleep, if armed => {
                armed = false;
                if acks.send(std::mem::take(&mut pending)).is_err() {
                    break;
                }
            }
            msg = stream.next() => {
                let bytes = match msg {
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Close(frame))) => {
                        stats.close(describe_close(frame.as_ref()));
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        stats.close(format!("read_error: {e}"));
                        break;
                    }
                    None => {
                        stats.close("eof".to_owned());
                        break;
                    }
                };
                // One frame, or (`?batch=1`) a batch of them.
                let frames = match ServerFrame::decode_all(&bytes) {
                    Ok(frames) => frames,
                    Err(_) => {
                        stats.decode_errors.fetch_add(1, Relaxed);
                        continue;
                    }
                };
                for frame in frames {
                match frame {
                    ServerFrame::SendResult { id, outcome } => {
                        match outcome {
                            SendOutcome::Accepted { duplicate } => {
                                // Only accepted sends: a refusal is not a durable append, and
                                // its (fast) answer would flatter the latency figures.
                                if let Some(stamp) = stamp_of(id.as_bytes()) {
                                    stats.record(&stats.result_latency, stamp);
                                }
                                stats.accepted.fetch_add(1, Relaxed);
                                if duplicate {
                                    stats.duplicates.fetch_add(1, Relaxed);
                                }
                            }
                            SendOutcome::Rejected { code, .. } => stats.rejected.add(code),
                        }
                        stats.results.fetch_add(1, Relaxed);
                        permits.add_permits(1);
                    }
                    ServerFrame::Deliver { seq, envelope } => {
                        if let Some(stamp) = stamp_of(&envelope.ciphertext) {
                            stats.record(&stats.deliver_latency, stamp);
                        }
                        stats.delivered.fetch_add(1, Relaxed);
                        pending.push(seq);
                        if pending.len() >= plan.ack_batch {
                            armed = false;
                            if acks.send(std::mem::take(&mut pending)).is_err() {
                                break 'read;
                            }
                        } else if !armed {
                            ack_sleep.as_mut().reset(Instant::now() + plan.ack_delay);
                            armed = true;
                        }
                    }
                    ServerFrame::Error { code, .. } => stats.server_errors.add(code),
                    ServerFrame::Notice { .. } => {
                        stats.notices.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
                }
            }
        }
    }
}
