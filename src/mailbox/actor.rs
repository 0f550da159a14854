//! The mailbox actor.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::{fut::wrap_future, prelude::*};
use actix_web::web::Bytes;
use futures_util::{FutureExt, StreamExt};
use sealpost_proto::{
    Class, CloseCode, DeviceId, Envelope, EnvelopeId, ErrorCode, Notice, SendOutcome, ServerFrame,
};
use tracing::{debug, warn};

use super::{
    device_map::DeviceMap,
    messages::{
        Ack, AddDevice, Attach, AttachError, ClaimKey, ClaimedKey, Conn, CurrentDevices, Detach,
        Expire, KickAll, RemoveDevice, Retire, Submit, UploadError, UploadKeys,
    },
    registry::Registry,
};
use crate::{
    clock::now_ms,
    store::{
        AppendError, Appended, EnvelopeRecord, FallbackKeyRecord, KeyKind, KeyUpload, KeysPut,
        NewEnvelope, QueueLimits, StoreError, StoreFuture, Stores, Trim, UserInbox,
        live::LiveEvent,
    },
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
    /// How long a send id is remembered: a retry within it is a duplicate.
    pub dedup_secs: u64,
    /// Testing only (debug builds): while this file exists, the next durable envelope is
    /// answered as accepted and not stored, and the file is removed: a broker withholding one
    /// message, for the clients' withheld-message detection to find.
    pub failpoint_withhold: Option<std::path::PathBuf>,
}

impl MailboxConfig {
    /// Settings for unit tests: timers that never fire, ids remembered for an hour.
    #[cfg(test)]
    pub(crate) fn for_tests(queue_quota: u64, window: usize, idle: Duration) -> Self {
        MailboxConfig {
            queue_quota,
            queue_quota_bytes: u64::MAX,
            window,
            ack_timeout: Duration::from_secs(3600),
            idle,
            dedup_secs: 3600,
            failpoint_withhold: None,
        }
    }
}

/// Live state of one device queue (what is stored is the inbox's business).
struct DeviceQueue {
    /// Sequence numbers below this are durable and may be pushed.
    durable_next: u64,
    /// Highest sequence number ever pushed by this mailbox (redelivery accounting).
    pushed_hwm: u64,
    /// The connected session, if any.
    conn: Option<Attached>,
    /// Whether this mailbox listens to the device's live events (a store whose sockets may
    /// be held in other processes; from the device's first attach until the mailbox stops).
    listening: bool,
    /// A check of the queue's end in the store is scheduled (see [`Mailbox::resync_later`]).
    resync: bool,
}

/// A live-delivery event for one of the user's devices.
#[derive(Message)]
#[rtype(result = "()")]
struct Live {
    device: DeviceId,
    event: LiveEvent,
}

/// A connected device.
struct Attached {
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
    /// A read from the store is under way (a backend that does not answer inline); its
    /// completion continues the pump.
    reading: bool,
    /// When it attached (ms since the Unix epoch): of two sessions of one device in two
    /// processes, the later one stays.
    at_ms: u64,
}

/// The single writer of one user's device queues.
pub struct Mailbox {
    user: String,
    /// Identifies this incarnation in the registry (a successor may replace it).
    incarnation: u64,
    stores: Stores,
    /// The user's queues, held by this mailbox alone; `None` until loaded.
    inbox: Option<Box<dyn UserInbox>>,
    registry: Arc<Registry>,
    config: Arc<MailboxConfig>,
    devices: DeviceMap<DeviceQueue>,
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

/// How long after a queue moved its end is read from the store again (scale-out: a live event
/// may have been lost).
const RESYNC_AFTER: Duration = Duration::from_secs(1);

/// How long a device's pump waits before reading its queue again after a failed read.
const READ_RETRY: Duration = Duration::from_millis(500);

/// Longest hold on an origin's envelopes: well past the origin's longest resend backoff.
const HOLD_MAX_MS: u64 = 10 * 60 * 1000;

impl Mailbox {
    /// Hands the queues back to the store before the mailbox stops, and before its successor
    /// can open them (it is forgotten by the registry right after).
    fn close_inbox(&mut self) {
        if let Some(inbox) = self.inbox.take() {
            inbox.close();
        }
    }

    /// A mailbox for `user`; its state is loaded when it starts.
    pub fn new(
        user: String,
        incarnation: u64,
        stores: Stores,
        registry: Arc<Registry>,
        config: Arc<MailboxConfig>,
    ) -> Self {
        Mailbox {
            user,
            incarnation,
            stores,
            inbox: None,
            registry,
            config,
            devices: DeviceMap::new(),
            inflight_syncs: 0,
            last_activity: Instant::now(),
            watchdog: None,
            held_back: Vec::new(),
        }
    }

    /// Loads the user's devices and opens their queues (the inbox repairs what a crash
    /// left). Resolves once what it loaded is durable.
    fn load(&self) -> impl Future<Output = crate::store::Result<Box<dyn UserInbox>>> + 'static {
        let (directory, inbox) = (self.stores.directory.clone(), self.stores.inbox.clone());
        let user = self.user.clone();
        let limits = QueueLimits {
            count: self.config.queue_quota,
            bytes: self.config.queue_quota_bytes,
        };
        async move {
            let devices: Vec<u32> = directory
                .devices(&user)
                .await?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            inbox.open(&user, &devices, limits).await
        }
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
            self.close_inbox();
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
    fn pump(&mut self, device: DeviceId, ctx: &mut Context<Self>) {
        let window = self.config.window;
        let Some(inbox) = self.inbox.as_ref() else {
            return;
        };
        let Some(q) = self.devices.get_mut(&device) else {
            return;
        };
        let Some(live) = q.conn.as_mut() else { return };
        if live.reading {
            return;
        }
        // What this pump pushes reaches the session together (one `batch` message).
        let _cork = live.conn.tx.cork();
        let mut slow = false;
        let mut failed = false;
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
            let mut read = inbox.read(device.0, live.cursor, want);
            let batch = match (&mut read).now_or_never() {
                Some(Ok(batch)) => batch,
                Some(Err(e)) => {
                    warn!(error = %e, "reading a device queue failed; trying again");
                    failed = true;
                    break;
                }
                None => {
                    // Not answered inline: continue when it is.
                    live.reading = true;
                    let conn = live.conn.id;
                    ctx.spawn(wrap_future::<_, Self>(read).map(move |result, act, ctx| {
                        act.read_done(device, conn, (limit, want), result, ctx);
                    }));
                    return;
                }
            };
            if !live.take_batch(&mut q.pushed_hwm, batch, limit, want) {
                slow = true;
                break;
            }
        }
        if slow {
            self.kick(device, CloseCode::SlowConsumer);
            return;
        }
        if failed {
            // The store cannot be read for now: the session stays, the read is tried again
            // shortly (a NATS failover must not send every client away to reconnect).
            ctx.run_later(READ_RETRY, move |act, ctx| act.pump(device, ctx));
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

    /// A read the pump started has been answered: push it and carry on pumping, if the same
    /// connection is still there.
    fn read_done(
        &mut self,
        device: DeviceId,
        conn: super::ConnId,
        (limit, want): (u64, usize),
        result: crate::store::Result<Vec<(u64, EnvelopeRecord)>>,
        ctx: &mut Context<Self>,
    ) {
        let Some(q) = self.devices.get_mut(&device) else {
            return;
        };
        let Some(live) = q.conn.as_mut().filter(|l| l.conn.id == conn) else {
            return;
        };
        live.reading = false;
        // The page and what the pump adds to it reach the session together.
        let _cork = live.conn.tx.cork();
        match result {
            Ok(batch) => {
                if !live.take_batch(&mut q.pushed_hwm, batch, limit, want) {
                    self.kick(device, CloseCode::SlowConsumer);
                    return;
                }
            }
            Err(e) => {
                // The store is unavailable for now (a NATS stream between leaders, an I/O
                // error): the session stays, and the read is tried again shortly.
                warn!(error = %e, "reading a device queue failed; trying again");
                ctx.run_later(READ_RETRY, move |act, ctx| act.pump(device, ctx));
                return;
            }
        }
        self.pump(device, ctx);
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

    /// Pushes an ephemeral envelope to connected devices — here, or (a scale-out store)
    /// wherever they are connected; never stored.
    fn push_ephemeral(&mut self, msg: &Submit) -> SendOutcome {
        let now = now_ms();
        let elsewhere = self.stores.live.spans_processes();
        for copy in msg.copies.iter() {
            let frame = || {
                Bytes::from(
                    ServerFrame::DeliverEphemeral {
                        envelope: Envelope {
                            id: msg.id,
                            class: Class::Ephemeral,
                            accepted_ms: now,
                            expires_ms: now + u64::from(msg.ttl_secs) * 1000,
                            ciphertext: copy.ciphertext.clone(),
                        },
                    }
                    .encode(),
                )
            };
            let Some(live) = self.devices.get(&copy.device).and_then(|q| q.conn.as_ref()) else {
                if elsewhere {
                    self.stores
                        .live
                        .ephemeral(&self.user, copy.device.0, frame());
                }
                continue;
            };
            // Never let ephemeral traffic eat the room durable deliveries need.
            if live.conn.tx.capacity() <= self.config.window {
                continue;
            }
            if live.conn.tx.try_send(frame()).is_ok() {
                metrics::counter!("sealpost_ephemeral_total").increment(1);
            }
        }
        SendOutcome::Accepted { duplicate: false }
    }
}

impl Attached {
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

    /// Pushes envelopes read from the store from the cursor on (`want` were asked for),
    /// stopping at `limit` (the hot tail), and moves the cursor past them. False if the
    /// session's channel is full (slow consumer).
    fn take_batch(
        &mut self,
        pushed_hwm: &mut u64,
        batch: Vec<(u64, EnvelopeRecord)>,
        limit: u64,
        want: usize,
    ) -> bool {
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
            if !self.push(pushed_hwm, seq, frame, envelope.expires_ms, len) {
                self.cursor = seq;
                return false;
            }
            next = seq + 1;
        }
        self.cursor = next;
        if fetched < want {
            // Short read: nothing else is stored below the limit.
            self.cursor = self.cursor.max(limit);
        }
        true
    }
}

impl DeviceQueue {
    /// A queue whose envelopes below `end` are stored and durable.
    fn new(end: u64) -> Self {
        DeviceQueue {
            durable_next: end,
            pushed_hwm: 0,
            conn: None,
            listening: false,
            resync: false,
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
        // Nothing is handled (so nothing pushed) until the queues are open and what they
        // hold is durable.
        ctx.wait(
            wrap_future::<_, Self>(self.load()).map(|result, act, ctx| match result {
                Ok(inbox) => {
                    for (device, end) in inbox.ends() {
                        act.devices.insert(DeviceId(device), DeviceQueue::new(end));
                    }
                    act.inbox = Some(inbox);
                    act.watch(ctx);
                }
                Err(e) => {
                    warn!(error = %e, "mailbox could not load its state; stopping");
                    act.registry.forget(&act.user, act.incarnation);
                    ctx.stop();
                }
            }),
        );
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
        let q = self
            .devices
            .get_mut(&msg.device)
            .ok_or(AttachError::UnknownDevice)?;
        // From the start of the queue: the first read skips what was trimmed.
        q.conn = Some(Attached {
            conn: msg.conn,
            cursor: 0,
            in_flight: BTreeMap::new(),
            backlog_end: Some(q.durable_next),
            last_progress: Instant::now(),
            hot: VecDeque::new(),
            reading: false,
            at_ms: now_ms(),
        });
        let at_ms = q.conn.as_ref().map_or(0, |l| l.at_ms);
        let live = self.stores.live.clone();
        if live.spans_processes() {
            // A session of this device in another process closes (`displaced`); appends made
            // there, and ephemeral envelopes sent there, reach this one.
            live.attached(&self.user, msg.device.0, at_ms);
            if !q.listening {
                q.listening = true;
                let device = msg.device;
                ctx.add_stream(
                    live.subscribe(&self.user, device.0)
                        .into_stream()
                        .map(move |event| Live { device, event }),
                );
            }
        }
        metrics::gauge!("sealpost_connections").increment(1.0);
        self.registry.wakeups().connected(&self.user, msg.device.0);
        self.pump(msg.device, ctx);
        self.watch(ctx);
        Ok(())
    }
}

impl StreamHandler<Live> for Mailbox {
    fn handle(&mut self, msg: Live, ctx: &mut Self::Context) {
        let Live { device, event } = msg;
        match event {
            LiveEvent::Ready => {
                // Subscribed: what was appended elsewhere before is read from the store's end.
                let Some(inbox) = self.inbox.as_ref() else {
                    return;
                };
                ctx.spawn(
                    wrap_future::<_, Self>(inbox.end(device.0)).map(move |end, act, ctx| {
                        if let Ok(end) = end {
                            act.advance(device, end, ctx);
                        }
                    }),
                );
            }
            LiveEvent::Durable(end) => self.advance(device, end, ctx),
            LiveEvent::Attached { origin, at_ms } => {
                let own = self.stores.live.origin();
                let newer = self
                    .devices
                    .get(&device)
                    .and_then(|q| q.conn.as_ref())
                    .is_some_and(|l| origin != own && (at_ms, origin) > (l.at_ms, own));
                if newer {
                    self.kick(device, CloseCode::Displaced);
                }
            }
            LiveEvent::Ephemeral(frame) => {
                let Some(live) = self.devices.get(&device).and_then(|q| q.conn.as_ref()) else {
                    return;
                };
                // Never let ephemeral traffic eat the room durable deliveries need.
                if live.conn.tx.capacity() > self.config.window
                    && live.conn.tx.try_send(frame).is_ok()
                {
                    metrics::counter!("sealpost_ephemeral_total").increment(1);
                }
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        // A device's events ended (the store's connection closed): the mailbox goes on; its
        // devices are served from the store.
    }
}

impl Mailbox {
    /// Another process made `device`'s queue durable below `end`: push what is new.
    fn advance(&mut self, device: DeviceId, end: u64, ctx: &mut Context<Self>) {
        let advanced = self
            .devices
            .get_mut(&device)
            .filter(|q| q.durable_next < end)
            .map(|q| q.durable_next = end)
            .is_some();
        if advanced {
            self.pump(device, ctx);
            self.resync_later(device, ctx);
        }
    }

    /// Live events are best effort (core NATS drops them for a slow subscriber): a moment
    /// after the queue of a connected device moved, its end is read from the store once more,
    /// so that the last envelopes of a burst are not left waiting for the next one.
    fn resync_later(&mut self, device: DeviceId, ctx: &mut Context<Self>) {
        if !self.stores.live.spans_processes() {
            return;
        }
        let Some(q) = self.devices.get_mut(&device) else {
            return;
        };
        if q.resync || q.conn.is_none() {
            return;
        }
        q.resync = true;
        ctx.run_later(RESYNC_AFTER, move |act, ctx| {
            let Some(q) = act.devices.get_mut(&device) else {
                return;
            };
            q.resync = false;
            let (Some(inbox), true) = (act.inbox.as_ref(), q.conn.is_some()) else {
                return;
            };
            ctx.spawn(
                wrap_future::<_, Self>(inbox.end(device.0)).map(move |end, act, ctx| {
                    if let Ok(end) = end {
                        act.advance(device, end, ctx);
                    }
                }),
            );
        });
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
        if msg.class != Class::Ephemeral
            && let Some(file) = &self.config.failpoint_withhold
            && cfg!(debug_assertions)
            // The file may name the recipient whose next envelope is dropped.
            && std::fs::read_to_string(file)
                .is_ok_and(|who| who.trim().is_empty() || who.trim() == self.user)
            && std::fs::remove_file(file).is_ok()
        {
            return Box::pin(actix::fut::ready(SendOutcome::Accepted {
                duplicate: false,
            }));
        }
        let started = Instant::now();
        let staged = match self.submit(&msg) {
            Ok(staged) => staged,
            Err(answer) => return Box::pin(actix::fut::ready(answer)),
        };
        self.inflight_syncs += 1;
        Box::pin(
            wrap_future::<_, Self>(staged.durable).map(move |result, act, ctx| {
                act.inflight_syncs -= 1;
                act.last_activity = Instant::now();
                match result {
                    Ok(appended) => {
                        if !appended.duplicate {
                            act.keep_hot(&msg, &appended, staged.accepted_ms, staged.expires_ms);
                        }
                        for (device, next) in appended.durable {
                            let device = DeviceId(device);
                            let advanced = act
                                .devices
                                .get_mut(&device)
                                .filter(|q| q.durable_next < next)
                                .map(|q| q.durable_next = next)
                                .is_some();
                            if advanced {
                                act.registry
                                    .live_delivery()
                                    .notify(&act.user, device.0, next);
                                let here =
                                    act.devices.get(&device).is_some_and(|q| q.conn.is_some());
                                if !here {
                                    act.registry.wakeups().wake(
                                        &act.user,
                                        device.0,
                                        msg.class == Class::Urgent,
                                    );
                                }
                                act.pump(device, ctx);
                                act.resync_later(device, ctx);
                            }
                        }
                        act.watch(ctx);
                        crate::telemetry::APPEND_SECONDS.record_duration(started.elapsed());
                        SendOutcome::Accepted {
                            duplicate: appended.duplicate,
                        }
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

/// A send the inbox took: its answer once durable, and what a push of it needs.
struct Staged {
    durable: StoreFuture<Appended>,
    accepted_ms: u64,
    expires_ms: u64,
}

impl Mailbox {
    /// Validates a send and hands it to the inbox. Returns what becomes durable — the
    /// original answer, for a retry of an accepted send — or the answer, when the send is
    /// answered at once (refused, or ephemeral).
    fn submit(&mut self, msg: &Submit) -> Result<Staged, SendOutcome> {
        if msg.class == Class::Ephemeral {
            self.copies_for_current_devices(msg)?;
            let outcome = self.push_ephemeral(msg);
            return Err(outcome);
        }
        let Some(inbox) = self.inbox.as_mut() else {
            return Err(rejected(ErrorCode::StoreUnavailable));
        };
        let now = now_ms();
        let expires_ms = now + u64::from(msg.ttl_secs) * 1000;
        // Idempotency: a retry gets the first answer and stores nothing, even if the devices
        // changed since.
        match inbox.duplicate(msg.id.as_bytes()) {
            Ok(Some(durable)) => {
                return Ok(Staged {
                    durable,
                    accepted_ms: now,
                    expires_ms,
                });
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "dedup lookup failed");
                return Err(rejected(ErrorCode::StoreUnavailable));
            }
        }
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
        let envelope = NewEnvelope {
            id: msg.id.0,
            class: msg.class as u8,
            accepted_ms: now,
            expires_ms,
            remember_until_ms: now + self.config.dedup_secs * 1000,
            copies: copies
                .iter()
                .map(|c| (c.device.0, c.ciphertext.as_slice()))
                .collect(),
        };
        let appended = self.inbox.as_mut().expect("checked above").append(envelope);
        match appended {
            Ok(durable) => {
                metrics::counter!("sealpost_appends_total").increment(copies.len() as u64);
                Ok(Staged {
                    durable,
                    accepted_ms: now,
                    expires_ms,
                })
            }
            Err(AppendError::Full(full)) => {
                for device in full {
                    self.notify_full(DeviceId(device));
                }
                if let Some(origin) = &msg.origin {
                    self.held_back.push(HeldBack {
                        origin: origin.clone(),
                        first: msg.id,
                        until_ms: expires_ms.min(now + HOLD_MAX_MS),
                    });
                }
                Err(rejected(ErrorCode::MailboxFull))
            }
            // Refuse rather than risk a full disk: nothing acknowledged may be lost to one.
            Err(AppendError::NoRoom) => Err(rejected(ErrorCode::StoreUnavailable)),
            Err(AppendError::Store(e)) => {
                warn!(error = %e, "append failed; send refused");
                Err(rejected(ErrorCode::StoreUnavailable))
            }
        }
    }

    /// Keeps the encoded frames of a durable send for its connected devices, so that the
    /// pump pushes the live tail without reading the store back.
    fn keep_hot(&mut self, msg: &Submit, appended: &Appended, accepted_ms: u64, expires_ms: u64) {
        let hot_limit = self.config.window * 2;
        for &(device, seq) in &appended.stored {
            let Some(live) = self
                .devices
                .get_mut(&DeviceId(device))
                .and_then(|q| q.conn.as_mut())
            else {
                continue;
            };
            if live.hot.len() >= hot_limit || live.hot.back().is_some_and(|h| h.0 + 1 != seq) {
                continue;
            }
            let Some(copy) = msg.copies.iter().find(|c| c.device.0 == device) else {
                continue;
            };
            let envelope = Envelope {
                id: msg.id,
                class: msg.class,
                accepted_ms,
                expires_ms,
                ciphertext: copy.ciphertext.clone(),
            };
            let frame = Bytes::from(ServerFrame::encode_deliver(seq, &envelope));
            let len = copy.ciphertext.len() as u64;
            live.hot.push_back((seq, frame, expires_ms, len));
        }
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
        let mut acked = Vec::new();
        for seq in msg.seqs {
            match live.in_flight.remove(&seq) {
                Some((_, _, true)) => {} // expired meanwhile: already deleted
                Some((expires_ms, bytes, false)) => acked.push(Trim {
                    seq,
                    expires_ms,
                    bytes,
                }),
                None => unknown.push(seq),
            }
        }
        if !acked.is_empty()
            && let Some(inbox) = self.inbox.as_mut()
        {
            live.last_progress = Instant::now();
            // Nobody waits for deletions to be durable, but a failure to make them so is
            // reported: an acknowledged envelope would be delivered again after a crash.
            match inbox.trim(msg.device.0, &acked) {
                Ok(durable) => {
                    let count = acked.len() as u64;
                    metrics::counter!("sealpost_acks_total").increment(count);
                    actix::spawn(async move {
                        match durable.await {
                            Ok(()) => {
                                metrics::counter!("sealpost_acks_durable_total").increment(count);
                            }
                            Err(e) => warn!(error = %e, "flushing acknowledged deletions failed"),
                        }
                    });
                }
                Err(e) => {
                    // The acked envelopes stay stored and counted: the device reconnects, is
                    // delivered them again and acks them again.
                    warn!(error = %e, "deleting acknowledged envelopes failed");
                    self.kick(msg.device, CloseCode::GoingAway);
                }
            }
        }
        if msg.report
            && let Some(live) = self.devices.get(&msg.device).and_then(|q| q.conn.as_ref())
            && live.conn.id == msg.conn
        {
            // A few: a client acking garbage learns enough from those. Advisory: not sent
            // when the connection's queue is full.
            for &seq in unknown.iter().take(8) {
                telemetry::reject(ErrorCode::UnknownSeq.as_str());
                let frame = ServerFrame::Error {
                    code: ErrorCode::UnknownSeq,
                    message: "not outstanding".into(),
                    seq: Some(seq),
                };
                let _ = live.conn.tx.try_send(Bytes::from(frame.encode()));
            }
        }
        self.pump(msg.device, ctx);
        self.watch(ctx);
        MessageResult(unknown)
    }
}

impl Handler<Expire> for Mailbox {
    type Result = ();

    fn handle(&mut self, msg: Expire, _ctx: &mut Self::Context) {
        let Some(inbox) = self.inbox.as_mut() else {
            return;
        };
        match inbox.expire(msg.due) {
            Ok(expired) => {
                for (device, seq) in &expired {
                    let Some(live) = self
                        .devices
                        .get_mut(&DeviceId(*device))
                        .and_then(|q| q.conn.as_mut())
                    else {
                        continue;
                    };
                    // Delivered and not acknowledged yet: its ack deletes nothing more.
                    if let Some(f) = live.in_flight.get_mut(seq) {
                        f.2 = true;
                    }
                    // Waiting in the hot tail: never pushed now (an expired call ring does
                    // not ring). The pump reads around the gap from the store.
                    live.hot.retain(|h| h.0 != *seq);
                }
                metrics::counter!("sealpost_expirations_total").increment(expired.len() as u64);
            }
            Err(e) => warn!(error = %e, "expiry failed"),
        }
    }
}

impl Handler<AddDevice> for Mailbox {
    /// Atomic: no send is checked against the device set while a device is being added.
    type Result = AtomicResponse<Self, Result<DeviceId, StoreError>>;

    fn handle(&mut self, msg: AddDevice, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let added = self
            .stores
            .directory
            .add_device(&self.user, msg.record, msg.max_devices);
        self.inflight_syncs += 1;
        AtomicResponse::new(Box::pin(wrap_future::<_, Self>(added).map(
            |result, act, _| {
                act.inflight_syncs -= 1;
                let id = result?;
                let inbox = act.inbox.as_mut().ok_or(StoreError::NotFound)?;
                let end = inbox.add_queue(id);
                act.devices.insert(DeviceId(id), DeviceQueue::new(end));
                Ok(DeviceId(id))
            },
        )))
    }
}

impl Handler<RemoveDevice> for Mailbox {
    /// Atomic: no send is checked against the device set while a device is being removed.
    type Result = AtomicResponse<Self, Result<(), StoreError>>;

    fn handle(&mut self, msg: RemoveDevice, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let removed = self
            .stores
            .directory
            .remove_device(&self.user, msg.device.0);
        self.inflight_syncs += 1;
        let device = msg.device;
        AtomicResponse::new(Box::pin(wrap_future::<_, Self>(removed).then(
            move |result, act, ctx| {
                let dropped = result.and_then(|()| {
                    let dropped = match act.inbox.as_mut() {
                        Some(inbox) => inbox.drop_queue(device.0),
                        None => Err(StoreError::NotFound),
                    };
                    act.kick(device, CloseCode::DeviceRevoked);
                    act.devices.remove(&device);
                    act.watch(ctx);
                    dropped
                });
                async move {
                    match dropped {
                        Ok(durable) => durable.await,
                        Err(e) => Err(e),
                    }
                }
                .into_actor(act)
                .map(|result, act, _| {
                    act.inflight_syncs -= 1;
                    result
                })
            },
        )))
    }
}

/// Below this many one-time keys a device is told to upload more.
const KEYS_LOW: u64 = 10;

impl Handler<UploadKeys> for Mailbox {
    type Result = ResponseActFuture<Self, Result<u64, UploadError>>;

    fn handle(&mut self, msg: UploadKeys, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let max_held = msg.max_held;
        let upload = KeyUpload {
            one_time: msg.one_time,
            fallback: msg.fallback.map(|(key_id, key)| FallbackKeyRecord {
                version: crate::store::records::RECORD_VERSION,
                key_id,
                key,
            }),
            max_held,
        };
        let put = self
            .stores
            .directory
            .put_keys(&self.user, msg.device.0, msg.kind, upload);
        self.inflight_syncs += 1;
        Box::pin(wrap_future::<_, Self>(put).map(move |result, act, _| {
            act.inflight_syncs -= 1;
            match result? {
                KeysPut::Held(count) => Ok(count),
                KeysPut::OverLimit => Err(UploadError::TooManyKeys(max_held)),
            }
        }))
    }
}

impl Handler<ClaimKey> for Mailbox {
    type Result = ResponseActFuture<Self, Result<Option<ClaimedKey>, StoreError>>;

    fn handle(&mut self, msg: ClaimKey, _ctx: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        if !self.devices.contains_key(&msg.device) {
            return Box::pin(actix::fut::ready(Ok(None)));
        }
        // The directory consumes a one-time key atomically, and answers once that is
        // durable: a key is never handed out twice, even across a crash.
        let claim = self
            .stores
            .directory
            .claim_key(&self.user, msg.device.0, msg.kind);
        let notice = match msg.kind {
            KeyKind::Olm => Notice::KeysLow,
            KeyKind::Mls => Notice::KeyPackagesLow,
        };
        self.inflight_syncs += 1;
        let device = msg.device;
        Box::pin(wrap_future::<_, Self>(claim).map(move |result, act, _| {
            act.inflight_syncs -= 1;
            let Some(claimed) = result? else {
                return Ok(None);
            };
            if !claimed.fallback
                && claimed.left < KEYS_LOW
                && let Some(live) = act.devices.get(&device).and_then(|q| q.conn.as_ref())
            {
                let frame = ServerFrame::Notice { notice, device };
                let _ = live.conn.tx.try_send(Bytes::from(frame.encode()));
            }
            Ok(Some(ClaimedKey {
                key_id: claimed.key_id,
                key: claimed.key,
                fallback: claimed.fallback,
            }))
        }))
    }
}

impl Handler<CurrentDevices> for Mailbox {
    type Result = MessageResult<CurrentDevices>;

    fn handle(&mut self, _msg: CurrentDevices, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.device_ids())
    }
}

impl Handler<Retire> for Mailbox {
    type Result = ();

    fn handle(&mut self, _msg: Retire, ctx: &mut Self::Context) {
        // `stopped` sends every connected device away.
        self.close_inbox();
        self.registry.forget(&self.user, self.incarnation);
        ctx.stop();
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
