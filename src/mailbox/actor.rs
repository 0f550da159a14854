//! The mailbox actor.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use actix_web::web::Bytes;
use sealpost_proto::{
    Class, CloseCode, DeviceId, Envelope, EnvelopeId, ErrorCode, Notice, SendOutcome, ServerFrame,
};
use tracing::{debug, warn};

use super::{
    device_map::DeviceMap,
    messages::{
        Ack, AddDevice, Attach, AttachError, ClaimKey, ClaimedKey, Conn, CurrentDevices, Detach,
        Expire, KickAll, RemoveDevice, Submit, UploadError, UploadKeys,
    },
    recovery,
    registry::Registry,
};
use crate::{
    clock::now_ms,
    store::{EnvelopeRecord, Expired, HeadRecord, QueueOp, QueueWrite, Store},
    telemetry,
};

/// Tunables of every mailbox, from the broker settings.
#[derive(Debug, Clone)]
pub struct MailboxConfig {
    /// Most envelopes per device queue.
    pub queue_quota: u64,
    /// Most ciphertext bytes per device queue.
    pub queue_quota_bytes: u64,
    /// Unacknowledged deliveries in flight per connected device.
    pub window: usize,
    /// A device whose in-flight deliveries see no ack for this long is disconnected.
    pub ack_timeout: Duration,
    /// A mailbox with no connection and no traffic for this long stops.
    pub idle: Duration,
    /// Minimum time a send id is remembered.
    pub dedup_secs: u64,
}

/// Live state of one device queue. Not what is stored: the stored part is `head`.
struct DeviceQueue {
    /// The stored head (next sequence number, count, bytes).
    head: HeadRecord,
    /// Sequence numbers below this are durable and may be pushed.
    durable_next: u64,
    /// Highest sequence number ever pushed by this mailbox (redelivery accounting).
    pushed_hwm: u64,
    /// The connected session, if any.
    conn: Option<Live>,
}

/// A connected device.
struct Live {
    conn: Conn,
    /// Next sequence number to consider pushing.
    cursor: u64,
    /// Pushed, not yet acknowledged: seq → (expires_ms, ciphertext len, expired meanwhile).
    in_flight: BTreeMap<u64, (u64, u64, bool)>,
    /// `queue_empty` is sent once the cursor passes this (the queue's end at attach time).
    backlog_end: Option<u64>,
    /// Last time this device made progress (attached or acknowledged).
    last_progress: Instant,
    /// Encoded `deliver` frames of envelopes appended while the device is connected, so the
    /// live tail is pushed without reading the store back: (seq, frame, expires_ms, len).
    /// Contiguous, bounded by twice the window; anything else is read from the store.
    hot: VecDeque<(u64, Bytes, u64, u64)>,
}

/// The single writer of one user's device queues.
pub struct Mailbox {
    user: String,
    /// Identifies this incarnation in the registry (a successor may replace it).
    incarnation: u64,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    config: Arc<MailboxConfig>,
    devices: DeviceMap<DeviceQueue>,
    /// Sends in progress (between write and durable), by envelope id; a concurrent retry
    /// of one of them waits for durability like the original.
    pending: HashSet<EnvelopeId>,
    /// Outstanding durability waits; the mailbox does not stop while any are running.
    inflight_syncs: usize,
    last_activity: Instant,
    /// The next watchdog check, armed only while something needs watching (see
    /// [`Mailbox::watch`]).
    watchdog: Option<SpawnHandle>,
    /// Per federation origin, the first of its envelopes refused as full (see
    /// [`Mailbox::submit`]). Origins are few: a list.
    held_back: Vec<HeldBack>,
}

/// A federated envelope refused because the mailbox was full, which its origin will resend.
struct HeldBack {
    origin: Arc<str>,
    first: EnvelopeId,
    /// When the hold lapses: when the envelope expires (its origin stops resending it), or
    /// after [`HOLD_MAX_MS`], in case its resend is refused before it reaches the mailbox.
    until_ms: u64,
}

/// Longest hold on an origin's envelopes: well past the origin's longest resend backoff.
const HOLD_MAX_MS: u64 = 10 * 60 * 1000;

impl Mailbox {
    /// A mailbox for `user`; its state is loaded when it starts.
    pub fn new(
        user: String,
        incarnation: u64,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        config: Arc<MailboxConfig>,
    ) -> Self {
        Mailbox {
            user,
            incarnation,
            store,
            registry,
            config,
            devices: DeviceMap::new(),
            pending: HashSet::new(),
            inflight_syncs: 0,
            last_activity: Instant::now(),
            watchdog: None,
            held_back: Vec::new(),
        }
    }

    /// Loads the user's devices and queue heads (a few keys, never the queued envelopes),
    /// rolling back a send a crash tore.
    fn load(&mut self) -> crate::store::Result<()> {
        for (id, head) in recovery::recover_heads(self.store.as_ref(), &self.user, now_ms())? {
            self.devices.insert(DeviceId(id), DeviceQueue::new(head));
        }
        Ok(())
    }

    /// Arms the watchdog if something needs watching and it is not armed already: deliveries
    /// in flight (the ack timeout), or no device connected (the idle stop). A mailbox whose
    /// devices are connected and up to date — most of them, with many devices online — runs
    /// no timer at all. Called by every handler that may connect, disconnect or push.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        if self.watchdog.is_some() {
            return;
        }
        let mut connected = false;
        let mut in_flight = false;
        for q in self.devices.values() {
            if let Some(live) = &q.conn {
                connected = true;
                in_flight |= !live.in_flight.is_empty();
            }
        }
        if connected && !in_flight {
            return;
        }
        let tick = (self.config.idle.min(self.config.ack_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        self.watchdog = Some(ctx.run_later(tick, |act, ctx| {
            act.watchdog = None;
            if act.check(ctx) {
                act.watch(ctx);
            }
        }));
    }

    /// Disconnects devices that left deliveries unacknowledged too long, and stops the
    /// mailbox once idle. Returns whether it keeps running.
    fn check(&mut self, ctx: &mut Context<Self>) -> bool {
        let now = Instant::now();
        let timeout = self.config.ack_timeout;
        let stuck: Vec<DeviceId> = self
            .devices
            .iter()
            .filter_map(|(id, q)| {
                let live = q.conn.as_ref()?;
                (!live.in_flight.is_empty() && now - live.last_progress > timeout).then_some(*id)
            })
            .collect();
        for device in stuck {
            self.kick(device, CloseCode::SlowConsumer);
        }
        let connected = self.devices.values().any(|q| q.conn.is_some());
        // A hold on an origin's envelopes (see `submit`) lives in memory: the mailbox stays
        // until it is released or lapses.
        let now_ms = now_ms();
        self.held_back.retain(|h| h.until_ms > now_ms);
        if !connected
            && self.inflight_syncs == 0
            && self.held_back.is_empty()
            && now - self.last_activity > self.config.idle
        {
            self.registry.forget(&self.user, self.incarnation);
            ctx.stop();
            return false;
        }
        true
    }

    fn device_ids(&self) -> Vec<DeviceId> {
        self.devices.keys().copied().collect()
    }

    fn kick(&mut self, device: DeviceId, reason: CloseCode) {
        if let Some(live) = self.devices.get_mut(&device).and_then(|q| q.conn.take()) {
            let _ = live.conn.kick.send(reason);
            metrics::counter!("sealpost_disconnects_total", "reason" => reason.as_str())
                .increment(1);
            metrics::gauge!("sealpost_connections").decrement(1.0);
            debug!(
                device = device.0,
                reason = reason.as_str(),
                "device disconnected"
            );
        }
    }

    /// Pushes what the device's window allows, in sequence order: the live tail from memory,
    /// anything older from the store.
    fn pump(&mut self, device: DeviceId) {
        let window = self.config.window;
        let Some(q) = self.devices.get_mut(&device) else {
            return;
        };
        let Some(live) = q.conn.as_mut() else { return };
        let mut slow = false;
        while live.in_flight.len() < window && live.cursor < q.durable_next {
            while live.hot.front().is_some_and(|h| h.0 < live.cursor) {
                live.hot.pop_front();
            }
            if let Some(&(seq, _, _, _)) = live.hot.front()
                && seq == live.cursor
            {
                let (seq, frame, expires_ms, len) = live.hot.pop_front().expect("front exists");
                if !live.push(&mut q.pushed_hwm, seq, frame, expires_ms, len) {
                    slow = true;
                    break;
                }
                live.cursor = seq + 1;
                continue;
            }
            // Read up to the hot tail (or the window) from the store.
            let limit = live.hot.front().map_or(q.durable_next, |h| h.0);
            let want = (window - live.in_flight.len())
                .min(usize::try_from(limit - live.cursor).unwrap_or(usize::MAX));
            let batch = match self.store.read(&self.user, device.0, live.cursor, want) {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "reading a device queue failed");
                    break;
                }
            };
            let fetched = batch.len();
            let mut next = limit;
            for (seq, rec) in batch {
                if seq >= limit {
                    next = seq;
                    break;
                }
                let envelope = Envelope {
                    id: EnvelopeId(rec.id),
                    class: class_of(rec.class),
                    accepted_ms: rec.accepted_ms,
                    expires_ms: rec.expires_ms,
                    ciphertext: rec.ciphertext,
                };
                let frame = Bytes::from(ServerFrame::encode_deliver(seq, &envelope));
                let len = envelope.ciphertext.len() as u64;
                if !live.push(&mut q.pushed_hwm, seq, frame, envelope.expires_ms, len) {
                    slow = true;
                    next = seq;
                    break;
                }
                next = seq + 1;
            }
            live.cursor = next;
            if slow {
                break;
            }
            if fetched < want {
                // Short read: nothing else is stored below the limit.
                live.cursor = live.cursor.max(limit);
            }
        }
        if slow {
            self.kick(device, CloseCode::SlowConsumer);
            return;
        }
        if let Some(end) = live.backlog_end
            && live.cursor >= end
        {
            live.backlog_end = None;
            if live
                .conn
                .tx
                .try_send(Bytes::from(ServerFrame::QueueEmpty.encode()))
                .is_err()
            {
                self.kick(device, CloseCode::SlowConsumer);
            }
        }
    }

    fn notify_full(&mut self, device: DeviceId) {
        if let Some(live) = self.devices.get(&device).and_then(|q| q.conn.as_ref()) {
            let frame = ServerFrame::Notice {
                notice: Notice::MailboxFull,
                device,
            };
            let _ = live.conn.tx.try_send(Bytes::from(frame.encode()));
        }
    }

    /// The copies of a send to store: one for each current device, exactly, or the send is
    /// refused with the current list so that the sender can re-encrypt. A send whose device
    /// set was checked where it was accepted (at the origin broker of a federated send)
    /// instead keeps the copies for the devices that still exist, as a local send
    /// accepted before the change would have; it is refused only if none does. That gives a
    /// remote sender nothing a sender lacks anyway (a copy can always be made undecryptable):
    /// the exact-set check is there so that honest clients learn of new devices, which the
    /// origin did when it checked the set.
    fn copies_for_current_devices<'m>(
        &self,
        msg: &'m Submit,
    ) -> Result<Vec<&'m sealpost_proto::Copy>, SendOutcome> {
        let mut named: Vec<DeviceId> = msg.copies.iter().map(|c| c.device).collect();
        named.sort_unstable();
        let current = self.device_ids();
        if named == current {
            return Ok(msg.copies.iter().collect());
        }
        let mut kept: Vec<&sealpost_proto::Copy> = Vec::new();
        if msg.origin.is_some() && named.windows(2).all(|w| w[0] < w[1]) {
            kept = msg
                .copies
                .iter()
                .filter(|c| self.devices.contains_key(&c.device))
                .collect();
        }
        if kept.is_empty() {
            telemetry::reject(ErrorCode::StaleDevices.as_str());
            return Err(SendOutcome::Rejected {
                code: ErrorCode::StaleDevices,
                current_devices: current,
            });
        }
        metrics::counter!("sealpost_sends_to_changed_devices_total").increment(1);
        Ok(kept)
    }

    /// Pushes an ephemeral envelope to connected devices; never stored.
    fn push_ephemeral(&mut self, msg: &Submit) -> SendOutcome {
        let now = now_ms();
        for copy in msg.copies.iter() {
            let Some(live) = self.devices.get(&copy.device).and_then(|q| q.conn.as_ref()) else {
                continue;
            };
            // Never let ephemeral traffic eat the room durable deliveries need.
            if live.conn.tx.capacity() <= self.config.window {
                continue;
            }
            let frame = ServerFrame::DeliverEphemeral {
                envelope: Envelope {
                    id: msg.id,
                    class: Class::Ephemeral,
                    accepted_ms: now,
                    expires_ms: now + u64::from(msg.ttl_secs) * 1000,
                    ciphertext: copy.ciphertext.clone(),
                },
            };
            if live.conn.tx.try_send(Bytes::from(frame.encode())).is_ok() {
                metrics::counter!("sealpost_ephemeral_total").increment(1);
            }
        }
        SendOutcome::Accepted { duplicate: false }
    }

    fn remove_queue_ops(
        &self,
        device: DeviceId,
        ops: &mut Vec<QueueOp>,
    ) -> crate::store::Result<()> {
        for (seq, expires_ms) in self.store.seqs(&self.user, device.0)? {
            ops.push(QueueOp::Remove {
                user: self.user.clone(),
                device: device.0,
                seq,
                expires_ms,
            });
        }
        ops.push(QueueOp::DropHead {
            user: self.user.clone(),
            device: device.0,
        });
        Ok(())
    }
}

impl Live {
    /// Hands one `deliver` frame to the session; false if its channel is full (slow consumer).
    fn push(
        &mut self,
        pushed_hwm: &mut u64,
        seq: u64,
        frame: Bytes,
        expires_ms: u64,
        len: u64,
    ) -> bool {
        if self.conn.tx.try_send(frame).is_err() {
            return false;
        }
        self.in_flight.insert(seq, (expires_ms, len, false));
        metrics::counter!("sealpost_deliveries_total").increment(1);
        if seq <= *pushed_hwm {
            metrics::counter!("sealpost_redeliveries_total").increment(1);
        }
        *pushed_hwm = (*pushed_hwm).max(seq);
        true
    }
}

impl DeviceQueue {
    fn new(head: HeadRecord) -> Self {
        DeviceQueue {
            durable_next: head.next_seq,
            head,
            pushed_hwm: 0,
            conn: None,
        }
    }
}

fn class_of(v: u8) -> Class {
    match v {
        1 => Class::Ephemeral,
        2 => Class::Urgent,
        _ => Class::Durable,
    }
}

fn rejected(code: ErrorCode) -> SendOutcome {
    telemetry::reject(code.as_str());
    SendOutcome::Rejected {
        code,
        current_devices: Vec::new(),
    }
}

impl Actor for Mailbox {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        metrics::gauge!("sealpost_mailboxes").increment(1.0);
        if let Err(e) = self.load() {
            warn!(error = %e, "mailbox could not load its state; stopping");
            self.registry.forget(&self.user, self.incarnation);
            ctx.stop();
            return;
        }
        // A previous incarnation stopped only once its syncs had finished, so its writes are
        // durable unless a flush failed and none has succeeded since: then what was loaded
        // may hold writes that are not, and nothing is handled (so nothing pushed) until a
        // sync succeeds.
        if self.store.healthy() {
            self.watch(ctx);
            return;
        }
        self.inflight_syncs += 1;
        ctx.wait(self.store.sync().into_actor(self).map(|result, act, ctx| {
            act.inflight_syncs -= 1;
            if let Err(e) = result {
                warn!(error = %e, "mailbox could not make its state durable; stopping");
                act.registry.forget(&act.user, act.incarnation);
                ctx.stop();
            }
        }));
        self.watch(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        metrics::gauge!("sealpost_mailboxes").decrement(1.0);
        let devices: Vec<DeviceId> = self.devices.keys().copied().collect();
        for device in devices {
            self.kick(device, CloseCode::GoingAway);
        }
    }
}

impl Handler<Attach> for Mailbox {
    type Result = Result<(), AttachError>;

    fn handle(&mut self, msg: Attach, ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        if !self.devices.contains_key(&msg.device) {
            return Err(AttachError::UnknownDevice);
        }
        self.kick(msg.device, CloseCode::Displaced);
        let first = match self.store.first_seq(&self.user, msg.device.0) {
            Ok(first) => first,
            Err(e) => {
                warn!(error = %e, "reading a device queue failed");
                None
            }
        };
        let q = self
            .devices
            .get_mut(&msg.device)
            .ok_or(AttachError::UnknownDevice)?;
        let cursor = first.unwrap_or(q.durable_next).min(q.durable_next);
        q.conn = Some(Live {
            conn: msg.conn,
            cursor,
            in_flight: BTreeMap::new(),
            backlog_end: Some(q.durable_next),
            last_progress: Instant::now(),
            hot: VecDeque::new(),
        });
        metrics::gauge!("sealpost_connections").increment(1.0);
        self.pump(msg.device);
        self.watch(ctx);
        Ok(())
    }
}

impl Handler<Detach> for Mailbox {
    type Result = ();

    fn handle(&mut self, msg: Detach, ctx: &mut Self::Context) {
        self.last_activity = Instant::now();
        if let Some(q) = self.devices.get_mut(&msg.device)
            && q.conn.as_ref().is_some_and(|l| l.conn.id == msg.conn)
        {
            q.conn = None;
            metrics::gauge!("sealpost_connections").decrement(1.0);
        }
        self.watch(ctx);
    }
}

impl Handler<Submit> for Mailbox {
    type Result = ResponseActFuture<Self, SendOutcome>;

    fn handle(&mut self, msg: Submit, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let started = Instant::now();
        let writes = match self.submit(&msg) {
            Ok(writes) => writes,
            Err(answer) => return Box::pin(actix::fut::ready(answer)),
        };
        self.inflight_syncs += 1;
        let duplicate = writes.is_empty();
        // A successful sync makes everything written before it durable, including writes of
        // earlier sends whose own sync failed: cover every device, not only this send's.
        let covered: Vec<(DeviceId, u64)> = self
            .devices
            .iter()
            .map(|(d, q)| (*d, q.head.next_seq))
            .collect();
        Box::pin(
            self.store
                .sync()
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.inflight_syncs -= 1;
                    act.pending.remove(&msg.id);
                    act.last_activity = Instant::now();
                    match result {
                        Ok(()) => {
                            for (device, next) in covered {
                                let advanced = act
                                    .devices
                                    .get_mut(&device)
                                    .filter(|q| q.durable_next < next)
                                    .map(|q| q.durable_next = next)
                                    .is_some();
                                if advanced {
                                    act.pump(device);
                                }
                            }
                            act.watch(ctx);
                            metrics::histogram!("sealpost_append_seconds")
                                .record(started.elapsed());
                            SendOutcome::Accepted { duplicate }
                        }
                        Err(e) => {
                            warn!(error = %e, "commit failed; send refused");
                            rejected(ErrorCode::StoreUnavailable)
                        }
                    }
                }),
        )
    }
}

impl Mailbox {
    /// Validates and applies a send. Returns the (device, next seq) pairs that become durable
    /// with the next sync — empty for a duplicate of an accepted send — or the answer, when
    /// the send is answered at once (refused, or ephemeral).
    fn submit(&mut self, msg: &Submit) -> Result<Vec<(DeviceId, u64)>, SendOutcome> {
        if msg.class == Class::Ephemeral {
            self.copies_for_current_devices(msg)?;
            let outcome = self.push_ephemeral(msg);
            return Err(outcome);
        }
        // Idempotency: a retry gets the first answer and stores nothing, even if the devices
        // changed since.
        if self.pending.contains(&msg.id) {
            return Ok(Vec::new());
        }
        match self.store.dedup(&self.user, msg.id.as_bytes()) {
            Ok(Some(_)) => return Ok(Vec::new()),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "dedup lookup failed");
                return Err(rejected(ErrorCode::StoreUnavailable));
            }
        }
        let now = now_ms();
        let expires_ms = now + u64::from(msg.ttl_secs) * 1000;
        // A federation origin sends its envelopes in order and resends one refused as full,
        // in order, after a pause. Envelopes it sent after that one are refused too until it
        // comes back (whatever its answer then) or the hold lapses, even if room appeared
        // meanwhile: stored now, they would come before it.
        if let Some(origin) = &msg.origin
            && let Some(i) = self.held_back.iter().position(|h| &h.origin == origin)
        {
            let held = &self.held_back[i];
            if held.first != msg.id && held.until_ms > now {
                return Err(rejected(ErrorCode::MailboxFull));
            }
            self.held_back.swap_remove(i);
        }
        let copies = self.copies_for_current_devices(msg)?;
        // Refuse rather than risk a full disk: nothing acknowledged may be lost to one.
        if !self.store.has_room() {
            return Err(rejected(ErrorCode::StoreUnavailable));
        }
        // Quota, checked for every device before anything is written.
        let mut full = Vec::new();
        for copy in &copies {
            let q = &self.devices[&copy.device];
            let len = copy.ciphertext.len() as u64;
            if q.head.count >= self.config.queue_quota
                || q.head.bytes + len > self.config.queue_quota_bytes
            {
                full.push(copy.device);
            }
        }
        if !full.is_empty() {
            for device in full {
                self.notify_full(device);
            }
            if let Some(origin) = &msg.origin {
                self.held_back.push(HeldBack {
                    origin: origin.clone(),
                    first: msg.id,
                    until_ms: expires_ms.min(now + HOLD_MAX_MS),
                });
            }
            return Err(rejected(ErrorCode::MailboxFull));
        }
        let staged: Vec<recovery::DeviceCopy<'_>> = copies
            .iter()
            .map(|copy| recovery::DeviceCopy {
                device: copy.device.0,
                head: self.devices[&copy.device].head,
                ciphertext: &copy.ciphertext,
            })
            .collect();
        let template = EnvelopeRecord {
            version: crate::store::records::RECORD_VERSION,
            id: msg.id.0,
            class: msg.class as u8,
            accepted_ms: now,
            expires_ms,
            ciphertext: Vec::new(),
        };
        let dedup_expires = expires_ms.max(now + self.config.dedup_secs * 1000);
        let (write, heads) = recovery::send_write(&self.user, &template, dedup_expires, &staged);
        if let Err(e) = self.store.write(write) {
            warn!(error = %e, "append failed; send refused");
            return Err(rejected(ErrorCode::StoreUnavailable));
        }
        let mut durable = Vec::with_capacity(heads.len());
        let hot_limit = self.config.window * 2;
        for (head, copy) in heads.into_iter().zip(&copies) {
            let device = copy.device;
            if let Some(q) = self.devices.get_mut(&device) {
                q.head = head;
                metrics::histogram!("sealpost_queue_depth").record(head.count as f64);
                let seq = head.next_seq - 1;
                if let Some(live) = q.conn.as_mut()
                    && live.hot.len() < hot_limit
                    && live.hot.back().is_none_or(|h| h.0 + 1 == seq)
                {
                    let envelope = Envelope {
                        id: msg.id,
                        class: msg.class,
                        accepted_ms: now,
                        expires_ms,
                        ciphertext: copy.ciphertext.clone(),
                    };
                    let frame = Bytes::from(ServerFrame::encode_deliver(seq, &envelope));
                    let len = copy.ciphertext.len() as u64;
                    live.hot.push_back((seq, frame, expires_ms, len));
                }
            }
            durable.push((device, head.next_seq));
        }
        metrics::counter!("sealpost_appends_total").increment(durable.len() as u64);
        self.pending.insert(msg.id);
        Ok(durable)
    }
}

impl Handler<Ack> for Mailbox {
    type Result = MessageResult<Ack>;

    fn handle(&mut self, msg: Ack, ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let mut unknown = Vec::new();
        let Some(q) = self.devices.get_mut(&msg.device) else {
            return MessageResult(msg.seqs);
        };
        let Some(live) = q.conn.as_mut().filter(|l| l.conn.id == msg.conn) else {
            return MessageResult(msg.seqs);
        };
        let mut write = QueueWrite::default();
        let mut head = q.head;
        let mut acked = 0u64;
        for seq in msg.seqs {
            match live.in_flight.remove(&seq) {
                Some((_, _, true)) => {} // expired meanwhile: already deleted
                Some((expires_ms, len, false)) => {
                    write.ops.push(QueueOp::Remove {
                        user: self.user.clone(),
                        device: msg.device.0,
                        seq,
                        expires_ms,
                    });
                    head.count = head.count.saturating_sub(1);
                    head.bytes = head.bytes.saturating_sub(len);
                    acked += 1;
                }
                None => unknown.push(seq),
            }
        }
        if acked > 0 {
            live.last_progress = Instant::now();
            write.ops.push(QueueOp::Head {
                user: self.user.clone(),
                device: msg.device.0,
                head,
            });
            // Nobody waits for deletions to be durable, but they ride the next group commit,
            // so an acknowledged envelope is not delivered again after a later crash.
            match self.store.write(write) {
                Ok(()) => {
                    q.head = head;
                    metrics::counter!("sealpost_acks_total").increment(acked);
                    let durable = self.store.sync();
                    actix::spawn(async move {
                        match durable.await {
                            Ok(()) => {
                                metrics::counter!("sealpost_acks_durable_total").increment(acked);
                            }
                            Err(e) => warn!(error = %e, "flushing acknowledged deletions failed"),
                        }
                    });
                }
                Err(e) => warn!(error = %e, "deleting acknowledged envelopes failed"),
            }
        }
        self.pump(msg.device);
        self.watch(ctx);
        MessageResult(unknown)
    }
}

impl Handler<Expire> for Mailbox {
    type Result = ();

    fn handle(&mut self, msg: Expire, _ctx: &mut Self::Context) {
        let mut write = QueueWrite::default();
        let mut expired = 0u64;
        let mut new_heads: BTreeMap<DeviceId, HeadRecord> = BTreeMap::new();
        for entry in msg.due {
            match entry {
                Expired::Envelope {
                    device,
                    seq,
                    expires_ms,
                    ..
                } => {
                    let id = DeviceId(device);
                    // The entry stands for the envelope at `seq` only if that envelope has
                    // its expiry: a crash can leave an entry whose envelope never got
                    // written, and the sequence number may hold another envelope since.
                    let len = match self.store.read(&self.user, device, seq, 1) {
                        Ok(v) => v
                            .first()
                            .filter(|(s, r)| *s == seq && r.expires_ms == expires_ms)
                            .map(|(_, r)| r.ciphertext.len() as u64),
                        Err(e) => {
                            warn!(error = %e, "reading an expiring envelope failed");
                            continue;
                        }
                    };
                    let Some(len) = len else {
                        write.ops.push(QueueOp::Unindex(entry));
                        continue;
                    };
                    write.ops.push(QueueOp::Remove {
                        user: self.user.clone(),
                        device,
                        seq,
                        expires_ms,
                    });
                    let Some(q) = self.devices.get_mut(&id) else {
                        continue;
                    };
                    let head = new_heads.entry(id).or_insert(q.head);
                    head.count = head.count.saturating_sub(1);
                    head.bytes = head.bytes.saturating_sub(len);
                    if let Some(f) = q.conn.as_mut().and_then(|l| l.in_flight.get_mut(&seq)) {
                        f.2 = true;
                    }
                    expired += 1;
                }
                Expired::Dedup { id, expires_ms, .. } => {
                    if self.pending.contains(&EnvelopeId(id)) {
                        continue;
                    }
                    // Likewise, a retry of a torn send may have written the record again
                    // with a later expiry: then only the stale entry goes.
                    match self.store.dedup(&self.user, &id) {
                        Ok(Some(r)) if r.expires_ms == expires_ms => {
                            write.ops.push(QueueOp::ForgetDedup {
                                user: self.user.clone(),
                                id,
                                expires_ms,
                            });
                        }
                        Ok(_) => write.ops.push(QueueOp::Unindex(entry)),
                        Err(e) => warn!(error = %e, "reading an expiring dedup record failed"),
                    }
                }
            }
        }
        for (device, head) in &new_heads {
            write.ops.push(QueueOp::Head {
                user: self.user.clone(),
                device: device.0,
                head: *head,
            });
        }
        if write.is_empty() {
            return;
        }
        match self.store.write(write) {
            Ok(()) => {
                for (device, head) in new_heads {
                    if let Some(q) = self.devices.get_mut(&device) {
                        q.head = head;
                    }
                }
                metrics::counter!("sealpost_expirations_total").increment(expired);
            }
            Err(e) => warn!(error = %e, "expiry failed"),
        }
    }
}

impl Handler<AddDevice> for Mailbox {
    type Result = ResponseActFuture<Self, Result<DeviceId, crate::store::StoreError>>;

    fn handle(&mut self, msg: AddDevice, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let added = self
            .store
            .add_device(&self.user, msg.record, msg.max_devices);
        let id = match added {
            Ok(id) => DeviceId(id),
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        self.devices
            .insert(id, DeviceQueue::new(recovery::empty_head()));
        self.inflight_syncs += 1;
        Box::pin(self.store.sync().into_actor(self).map(move |r, act, _| {
            act.inflight_syncs -= 1;
            r.map(|()| id)
        }))
    }
}

impl Handler<RemoveDevice> for Mailbox {
    type Result = ResponseActFuture<Self, Result<(), crate::store::StoreError>>;

    fn handle(&mut self, msg: RemoveDevice, ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let result = (|| {
            self.store.remove_device(&self.user, msg.device.0)?;
            self.store.drop_device_keys(&self.user, msg.device.0)?;
            let mut write = QueueWrite::default();
            self.remove_queue_ops(msg.device, &mut write.ops)?;
            self.store.write(write)
        })();
        if let Err(e) = result {
            return Box::pin(actix::fut::ready(Err(e)));
        }
        self.kick(msg.device, CloseCode::DeviceRevoked);
        self.devices.remove(&msg.device);
        self.watch(ctx);
        self.inflight_syncs += 1;
        Box::pin(self.store.sync().into_actor(self).map(|r, act, _| {
            act.inflight_syncs -= 1;
            r
        }))
    }
}

/// Below this many one-time keys a device is told to upload more.
const KEYS_LOW: u64 = 10;

impl Handler<UploadKeys> for Mailbox {
    type Result = ResponseActFuture<Self, Result<u64, UploadError>>;

    fn handle(&mut self, msg: UploadKeys, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let result = (|| {
            // Checked here, by the only writer of the account's keys, so that concurrent
            // uploads cannot pass the limit together. Keys re-uploaded under ids already held
            // (a retry) replace them and do not count twice.
            let (held, _) = self.store.key_count(&self.user, msg.device.0)?;
            let mut added = 0u64;
            for (id, _) in &msg.one_time {
                if !self.store.has_one_time_key(&self.user, msg.device.0, *id)? {
                    added += 1;
                }
            }
            if held + added > msg.max_held {
                return Err(UploadError::TooManyKeys(msg.max_held));
            }
            if let Some((key_id, key)) = msg.fallback {
                let record = crate::store::FallbackKeyRecord {
                    version: crate::store::records::RECORD_VERSION,
                    key_id,
                    key,
                };
                self.store
                    .set_fallback_key(&self.user, msg.device.0, record)?;
            }
            Ok(self
                .store
                .put_one_time_keys(&self.user, msg.device.0, msg.one_time)?)
        })();
        let count = match result {
            Ok(count) => count,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        self.inflight_syncs += 1;
        Box::pin(self.store.sync().into_actor(self).map(move |r, act, _| {
            act.inflight_syncs -= 1;
            Ok(r.map(|()| count)?)
        }))
    }
}

impl Handler<ClaimKey> for Mailbox {
    type Result = ResponseActFuture<Self, Result<Option<ClaimedKey>, crate::store::StoreError>>;

    fn handle(&mut self, msg: ClaimKey, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        // The mailbox is the only writer of its user's keys, so a key is taken once.
        let result = (|| {
            if !self.devices.contains_key(&msg.device) {
                return Ok(None);
            }
            if let Some((key_id, key)) = self.store.take_one_time_key(&self.user, msg.device.0)? {
                let (left, _) = self.store.key_count(&self.user, msg.device.0)?;
                if left < KEYS_LOW
                    && let Some(live) = self.devices.get(&msg.device).and_then(|q| q.conn.as_ref())
                {
                    let frame = ServerFrame::Notice {
                        notice: Notice::KeysLow,
                        device: msg.device,
                    };
                    let _ = live.conn.tx.try_send(Bytes::from(frame.encode()));
                }
                return Ok(Some(ClaimedKey {
                    key_id,
                    key,
                    fallback: false,
                }));
            }
            Ok(self
                .store
                .fallback_key(&self.user, msg.device.0)?
                .map(|f| ClaimedKey {
                    key_id: f.key_id,
                    key: f.key,
                    fallback: true,
                }))
        })();
        match result {
            Ok(Some(claimed)) if !claimed.fallback => {
                // The key must stay consumed across a crash, or it could be handed out twice.
                self.inflight_syncs += 1;
                Box::pin(self.store.sync().into_actor(self).map(move |r, act, _| {
                    act.inflight_syncs -= 1;
                    r.map(|()| Some(claimed))
                }))
            }
            other => Box::pin(actix::fut::ready(other)),
        }
    }
}

impl Handler<CurrentDevices> for Mailbox {
    type Result = MessageResult<CurrentDevices>;

    fn handle(&mut self, _msg: CurrentDevices, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.device_ids())
    }
}

impl Handler<KickAll> for Mailbox {
    type Result = ();

    fn handle(&mut self, msg: KickAll, ctx: &mut Self::Context) {
        let devices: Vec<DeviceId> = self.devices.keys().copied().collect();
        for device in devices {
            self.kick(device, msg.reason);
        }
        self.watch(ctx);
    }
}
