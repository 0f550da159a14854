//! The federation peer actor: one per destination domain, the single writer of that domain's
//! outbox.
//!
//! ```text
//! Enqueue ──▶ device-set check (cached, or asked over the link) ──▶ outbox (store) ──▶ sync ──▶ send_result
//!                                                                        │
//!       link up ◀── LinkUp / LinkDown (backoff) ◀── link task ◀──────────┤ txns of durable entries, in order
//!       TxnAcked ──▶ delete acknowledged entries; retryable refusals resend from there after a backoff
//! ```
//!
//! Order: entries get increasing sequence numbers and are sent in that order; after a lost link
//! or a retryable refusal, sending resumes from the oldest unacknowledged entry, so the
//! receiving broker sees every envelope of a device in order (duplicates of envelopes it had
//! already stored are absorbed by its envelope-id deduplication).
//!
//! A refusal that concerns one recipient (`mailbox_full`) holds back only that recipient: its
//! entries are *parked* (kept in the outbox, skipped when sending) and resent, in order, after
//! a backoff of their own, while everyone else's envelopes keep flowing. A refusal that
//! concerns the receiving broker (rate limit, store trouble, shutdown) pauses the whole link.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use sealpost_proto::{
    Class, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome,
    federation::{
        Admission, FedEnvelope, FedGroupEnvelope, FedRecipient, LinkFrame, MAX_TXN_ENVELOPES,
    },
    limits::{MAX_DURABLE_TTL_SECS, MAX_URGENT_TTL_SECS},
};
use serde_bytes::ByteBuf;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::{
    PeerConfig, PeerSettings, Resolver,
    backoff::Backoff,
    identity::ServerKey,
    link::{self, LinkParams},
    messages::{
        Enqueue, GroupEnqueue, GroupTo, LinkDown, LinkReports, LinkUp, Outgoing, PeerStatus, Query,
        QueryResult, Request, Status, TxnAcked,
    },
};
use crate::{
    clock::now_ms,
    store::{
        OutboxRecord, StoreError, StoreFuture, Stores,
        records::{OutboxRecipient, RECORD_VERSION},
    },
};

/// State of the link to the destination.
enum Link {
    /// Not connected; a reconnection is scheduled.
    Down,
    /// A connection attempt is running.
    Connecting,
    /// Authenticated and carrying frames.
    Up(tokio::sync::mpsc::Sender<Outgoing>),
}

/// What the peer keeps in memory of an outbox entry.
struct Entry {
    accepted_ms: u64,
    bytes: u64,
    /// The envelope id and its recipient, for entries accepted by this incarnation.
    id: Option<(EnvelopeId, String)>,
}

/// A transaction sent and not yet acknowledged.
struct InFlight {
    txn_id: u64,
    /// The outbox entry of each answer the acknowledgement holds, in order (one per envelope,
    /// one per recipient of a group message; empty for ephemeral envelopes).
    seqs: Vec<u64>,
    /// The recipient of each of `seqs`.
    to: Vec<String>,
}

/// Outbox entries on their way into one transaction: envelopes, or group messages (they
/// travel in different frames, so a transaction holds one kind).
#[derive(Default)]
struct Batch {
    envelopes: Vec<FedEnvelope>,
    groups: Vec<FedGroupEnvelope>,
    /// As [`InFlight::seqs`] and [`InFlight::to`].
    seqs: Vec<u64>,
    to: Vec<String>,
    bytes: u64,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.envelopes.is_empty() && self.groups.is_empty()
    }

    /// Whether an entry costing `cost` may join (the first always does).
    fn fits(&self, cost: &Cost, settings: &PeerSettings) -> bool {
        let entries = self.envelopes.len() + self.groups.len();
        self.is_empty()
            || (self.groups.is_empty() != cost.group
                && entries < settings.batch
                && self.seqs.len() + cost.answers <= MAX_TXN_ENVELOPES
                && self.bytes + cost.bytes <= settings.max_txn_bytes)
    }

    fn push(&mut self, seq: u64, wire: Wire, cost: &Cost) {
        self.bytes += cost.bytes;
        match wire {
            Wire::One(envelope) => {
                self.seqs.push(seq);
                self.to.push(envelope.to.clone());
                self.envelopes.push(envelope);
            }
            Wire::Group(group) => {
                for r in &group.recipients {
                    self.seqs.push(seq);
                    self.to.push(r.to.clone());
                }
                self.groups.push(group);
            }
        }
    }

    fn into_frame(self, txn_id: u64) -> (LinkFrame, InFlight) {
        let frame = if self.groups.is_empty() {
            LinkFrame::Txn {
                txn_id,
                envelopes: self.envelopes,
            }
        } else {
            LinkFrame::GroupTxn {
                txn_id,
                entries: self.groups,
            }
        };
        let in_flight = InFlight {
            txn_id,
            seqs: self.seqs,
            to: self.to,
        };
        (frame, in_flight)
    }
}

/// What an outbox entry adds to a transaction.
struct Cost {
    group: bool,
    /// Its bytes on the wire, about: the ciphertext, and a group message's recipient list.
    bytes: u64,
    /// The answers it gets: one per recipient.
    answers: usize,
}

impl Cost {
    fn of(record: &OutboxRecord) -> Cost {
        let listed = record.group.iter().flatten().map(|r| {
            let token = r.token.as_ref().map_or(0, |t| t.len());
            (r.to.len() + 5 * r.devices.len() + token + 8) as u64
        });
        Cost {
            group: record.group.is_some(),
            bytes: record.size() + listed.sum::<u64>(),
            answers: record.recipients().count(),
        }
    }
}

/// An outbox entry's wire form.
pub(super) enum Wire {
    One(FedEnvelope),
    Group(FedGroupEnvelope),
}

/// A send waiting for a device lookup of its recipient (or of one of them) to end.
enum Waiter {
    One(Enqueue, oneshot::Sender<SendOutcome>),
    /// A group message, in the queue of each of its recipients that waits.
    Group(Rc<RefCell<WaitingGroup>>),
}

/// A group message some of whose recipients wait for their lookups.
struct WaitingGroup {
    /// The recipients' queues in which it has not yet come to the front.
    behind: usize,
    /// Recipients whose queues stopped at it: sends to them after it wait until it is accepted.
    blocked: Vec<String>,
    send: Option<(GroupEnqueue, GroupReply)>,
}

/// Where a group message's outcomes go, one per recipient.
type GroupReply = oneshot::Sender<Vec<(String, SendOutcome)>>;

/// A recipient whose envelopes wait because its mailbox at the destination is full.
struct Parked {
    /// Its outbox entries that were refused or skipped, in order.
    seqs: BTreeSet<u64>,
    /// Whether they are held back (`true`), or resent and waiting for their answer.
    holding: bool,
    /// Spaces the resends out while the mailbox stays full.
    backoff: Backoff,
}

/// After a send that named other devices than the ones known made the peer ask again, further
/// such sends to that user are checked against the answer for this long without asking (a
/// sender with a wrong set cannot make every send a lookup).
const RECHECK_AFTER: Duration = Duration::from_millis(100);

/// What the peer knows of a remote user's devices, for stale-set checks before accepting.
struct KnownDevices {
    at: Instant,
    /// Device ids, or why the user cannot receive (unknown recipient).
    devices: Result<Vec<DeviceId>, ErrorCode>,
}

/// Counters shown by the admin view.
#[derive(Default)]
struct Stats {
    attempts: u64,
    failures: u64,
    delivered: u64,
    refused: u64,
    last_error: Option<String>,
}

/// The actor forwarding envelopes to one destination domain.
pub struct FederationPeer {
    config: Arc<PeerConfig>,
    settings: Arc<PeerSettings>,
    key: Arc<ServerKey>,
    store: Stores,
    resolver: Arc<Resolver>,
    /// Sequence number of the next outbox entry.
    next_seq: u64,
    /// Entries below this are durable and may be sent.
    durable_next: u64,
    /// Next entry to put into a transaction.
    cursor: u64,
    /// Unacknowledged outbox entries by seq. Ciphertext stays in the store.
    backlog: BTreeMap<u64, Entry>,
    backlog_bytes: u64,
    /// Ids of entries accepted by this incarnation and still in the backlog, with their
    /// recipients (one id names a group send to many): a client's retry is answered as a
    /// duplicate without a second entry.
    ids: HashMap<(EnvelopeId, String), u64>,
    in_flight: VecDeque<InFlight>,
    next_txn: u64,
    /// Ephemeral envelopes waiting for the link (never stored), at most one transaction's worth.
    ephemeral: Vec<FedEnvelope>,
    ephemeral_bytes: u64,
    /// Recipients held back after `mailbox_full`, by handle.
    parked: HashMap<String, Parked>,
    /// The entry a link-wide retry resumes from, sent even if its recipient is parked.
    resume: Option<u64>,
    /// Whether the outbox was read at start. Until it is, nothing is sent or accepted: a new
    /// entry could otherwise take the sequence number of an unread one and overwrite it.
    loaded: bool,
    link: Link,
    /// Identifies the current connection attempt; reports of older ones are ignored.
    generation: u64,
    up_since: Option<Instant>,
    backoff: Backoff,
    /// No transaction is sent before this (after a retryable refusal).
    hold_until: Option<Instant>,
    known: HashMap<String, KnownDevices>,
    /// When a send naming other devices than the known ones last made us ask again, by user.
    rechecked: HashMap<String, Instant>,
    /// Sends to a recipient whose device lookup is running, in arrival order: they are
    /// accepted together when it ends, so later sends to that recipient never overtake earlier
    /// ones, and sends to everyone else go on meanwhile. A group message waits in the queue
    /// of each recipient being looked up, and holds back the sends behind it until all of
    /// its lookups have ended.
    waiting: HashMap<String, VecDeque<Waiter>>,
    /// A lookup went unanswered: until then, sends are checked against the devices known so
    /// far without asking (by then a silent link has been declared dead).
    lookups_paused_until: Option<Instant>,
    /// Requests (device lookups, key claims, epochs) that came before the link was ever up
    /// (this broker just started): sent when it comes up, each answered `peer_unavailable`
    /// if its time runs out first, instead of being refused at once. Once the link has been
    /// up, a request while it is down is refused at once (the peer is having an outage).
    /// Bounded by [`MAX_QUEUED_REQUESTS`].
    queued_requests: Vec<(Request, oneshot::Sender<LinkFrame>)>,
    /// The link has been up at least once since this broker started.
    ever_up: bool,
    /// Since when the link has been failing, and how often; for the outage log lines.
    outage: Option<Outage>,
    stats: Stats,
    /// This actor, for answers of store reads that did not answer at once (a network store).
    me: Option<Addr<FederationPeer>>,
    /// An outbox read for `pump` is running.
    fetching: bool,
    /// What it read: (the seq it read from, the entries).
    fetched: Option<(u64, Vec<(u64, OutboxRecord)>)>,
}

/// Entries read from the outbox, or why not.
type Read = Result<Vec<(u64, OutboxRecord)>, StoreError>;

/// The answer of an outbox read `pump` started.
#[derive(actix::Message)]
#[rtype(result = "()")]
struct Fetched {
    from: u64,
    result: Read,
}

/// The answers of the reads of a parked recipient's entries (seq, read).
#[derive(actix::Message)]
#[rtype(result = "()")]
struct ParkedRead {
    to: String,
    reads: Vec<(u64, Read)>,
}

/// Resolves `read` now if it can; else `None` and the future back, to be awaited.
fn at_once<T>(mut read: StoreFuture<T>) -> Result<Result<T, StoreError>, StoreFuture<T>> {
    use futures_util::FutureExt;
    match (&mut read).now_or_never() {
        Some(answer) => Ok(answer),
        None => Err(read),
    }
}

/// A stretch of failed connection attempts (and links that did not stay up for long).
struct Outage {
    since: Instant,
    attempts: u64,
    /// When the last summary line was logged.
    logged: Instant,
    /// Whether its end was logged: a flapping link logs it once.
    restored: bool,
}

/// A link up this long ends an outage (and resets the reconnection backoff).
const STABLE_LINK: Duration = Duration::from_secs(10);

/// Sends to one recipient that may wait behind its device lookup; more are refused with
/// `peer_unavailable` (retryable).
const MAX_WAITING_PER_RECIPIENT: usize = 1024;

/// How often a lasting outage is summed up in the log.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Refusals after which the same envelope is sent again later (the receiving side was
/// temporarily unable); every other refusal is final. `mailbox_full` concerns one recipient
/// and parks it (see the module docs); the others pause the whole link.
pub(super) fn retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::MailboxFull
            | ErrorCode::StoreUnavailable
            | ErrorCode::RateLimited
            | ErrorCode::Internal
            | ErrorCode::ShuttingDown
            | ErrorCode::PeerUnavailable
    )
}

fn rejected(code: ErrorCode) -> SendOutcome {
    crate::telemetry::reject(code.as_str());
    SendOutcome::Rejected {
        code,
        current_devices: Vec::new(),
    }
}

impl FederationPeer {
    /// A peer for `config`; its outbox is loaded when it starts.
    pub(crate) fn new(
        config: Arc<PeerConfig>,
        settings: Arc<PeerSettings>,
        key: Arc<ServerKey>,
        store: Stores,
        resolver: Arc<Resolver>,
    ) -> Self {
        let backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
        FederationPeer {
            config,
            settings,
            key,
            store,
            resolver,
            next_seq: 1,
            durable_next: 1,
            cursor: 1,
            backlog: BTreeMap::new(),
            backlog_bytes: 0,
            ids: HashMap::new(),
            in_flight: VecDeque::new(),
            next_txn: 1,
            ephemeral: Vec::new(),
            ephemeral_bytes: 0,
            parked: HashMap::new(),
            resume: None,
            loaded: false,
            link: Link::Down,
            generation: 0,
            up_since: None,
            backoff,
            hold_until: None,
            known: HashMap::new(),
            rechecked: HashMap::new(),
            waiting: HashMap::new(),
            lookups_paused_until: None,
            queued_requests: Vec::new(),
            ever_up: false,
            outage: None,
            stats: Stats::default(),
            me: None,
            fetching: false,
            fetched: None,
        }
    }

    /// Up to `want` outbox entries from `from` on: at once, from a read that finished, or
    /// `None` while a read runs (`pump` runs again when it is done).
    fn read_outbox(&mut self, from: u64, want: usize) -> Option<Read> {
        if let Some((at, entries)) = self.fetched.take()
            && at == from
        {
            return Some(Ok(entries));
        }
        if self.fetching {
            return None;
        }
        match at_once(self.store.outbox.read(self.domain(), from, want)) {
            Ok(answer) => Some(answer),
            Err(read) => {
                let me = self.me.clone()?;
                self.fetching = true;
                actix::spawn(async move {
                    me.do_send(Fetched {
                        from,
                        result: read.await,
                    });
                });
                None
            }
        }
    }

    fn domain(&self) -> &str {
        &self.config.domain
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.link, Link::Down) {
            return;
        }
        self.generation += 1;
        self.link = Link::Connecting;
        self.stats.attempts += 1;
        metrics::counter!("sealpost_federation_link_attempts_total", "destination" => self.config.domain.clone())
            .increment(1);
        let params = LinkParams {
            local_domain: self.settings.local_domain.clone(),
            peer: self.config.clone(),
            key: self.key.clone(),
            resolver: self.resolver.clone(),
            connect_timeout: self.settings.request_timeout,
            keepalive: self.settings.keepalive,
            link_timeout: self.settings.link_timeout,
            write_timeout: self.settings.request_timeout,
            queue: self.settings.window * 2 + 64,
        };
        // A task of its own, not a future of this context: it outlives any one message, and
        // lookups made by the context are answered through it.
        let me = ctx.address();
        let reports = LinkReports {
            up: me.clone().recipient(),
            down: me.clone().recipient(),
            acked: me.recipient(),
        };
        actix::spawn(link::run(params, reports, self.generation));
    }

    fn publish(&self) {
        let d = self.config.domain.clone();
        metrics::gauge!("sealpost_federation_backlog", "destination" => d.clone())
            .set(self.backlog.len() as f64);
        metrics::gauge!("sealpost_federation_backlog_bytes", "destination" => d.clone())
            .set(self.backlog_bytes as f64);
        metrics::gauge!("sealpost_federation_oldest_age_seconds", "destination" => d.clone())
            .set(self.oldest_age_ms() as f64 / 1000.0);
        metrics::gauge!("sealpost_federation_parked", "destination" => d.clone())
            .set(self.parked.values().map(|p| p.seqs.len()).sum::<usize>() as f64);
        let up = matches!(self.link, Link::Up(_));
        metrics::gauge!("sealpost_federation_link_up", "destination" => d).set(if up {
            1.0
        } else {
            0.0
        });
    }

    fn oldest_age_ms(&self) -> u64 {
        self.backlog
            .values()
            .next()
            .map_or(0, |e| now_ms().saturating_sub(e.accepted_ms))
    }

    /// Sends transactions of durable entries while the window allows.
    fn pump(&mut self) {
        let Link::Up(tx) = &self.link else { return };
        let tx = tx.clone();
        if !self.loaded {
            return;
        }
        if self.hold_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.hold_until = None;
        while self.in_flight.len() < self.settings.window {
            if !self.ephemeral.is_empty() {
                let batch = Batch {
                    envelopes: std::mem::take(&mut self.ephemeral),
                    ..Batch::default()
                };
                self.ephemeral_bytes = 0;
                if !self.send_txn(&tx, batch) {
                    break; // ephemeral envelopes are dropped rather than delayed
                }
                continue;
            }
            if self.cursor >= self.durable_next {
                break;
            }
            let want = self.settings.batch;
            let entries = match self.read_outbox(self.cursor, want) {
                Some(Ok(entries)) => entries,
                Some(Err(e)) => {
                    warn!(error = %e, destination = %self.config.domain, "reading the outbox failed");
                    break;
                }
                None => break,
            };
            let now = now_ms();
            let mut batch = Batch::default();
            let mut expired = Vec::new();
            let mut next = self.durable_next;
            for (seq, record) in entries {
                if seq >= self.durable_next {
                    next = seq;
                    break;
                }
                if record.expires_ms <= now {
                    let recipients: Vec<String> = record.recipients().map(str::to_owned).collect();
                    for to in recipients {
                        self.done_with(&to, seq);
                    }
                    expired.push(seq);
                    next = seq + 1;
                    continue;
                }
                let cost = Cost::of(&record);
                if !batch.fits(&cost, &self.settings) {
                    next = seq;
                    break;
                }
                // A parked recipient's entries are sent when its hold ends, before anything
                // newer for it. The entry a link-wide retry resumes from goes out even for a
                // parked recipient: the destination holds everything after it until it comes
                // back (its mailbox then refuses it as full again, keeping the order).
                let resume = self.resume == Some(seq);
                let held: Vec<String> = record
                    .recipients()
                    .filter(|to| !resume && self.parked.get(*to).is_some_and(|p| p.holding))
                    .map(str::to_owned)
                    .collect();
                for to in &held {
                    if let Some(parked) = self.parked.get_mut(to) {
                        parked.seqs.insert(seq);
                    }
                }
                next = seq + 1;
                if let Some(wire) = to_wire(record, now, |to| !held.iter().any(|h| h == to)) {
                    batch.push(seq, wire, &cost);
                }
            }
            self.drop_expired(&expired);
            if batch.is_empty() {
                self.cursor = next;
                continue;
            }
            if !self.send_txn(&tx, batch) {
                break; // the link's queue is full or closing: resume on the next ack or link
            }
            self.cursor = next;
            if self.resume.is_some_and(|r| r < next) {
                self.resume = None;
            }
        }
        self.publish();
    }

    /// Hands a transaction to the link and tracks it; false if the link's queue is full or
    /// closing (nothing was sent).
    fn send_txn(&mut self, tx: &tokio::sync::mpsc::Sender<Outgoing>, batch: Batch) -> bool {
        let txn_id = self.next_txn;
        let (frame, in_flight) = batch.into_frame(txn_id);
        if tx.try_send(Outgoing::Frame(frame)).is_err() {
            return false;
        }
        self.next_txn += 1;
        metrics::counter!("sealpost_federation_txns_total", "destination" => self.config.domain.clone())
            .increment(1);
        self.in_flight.push_back(in_flight);
        true
    }

    /// Deletes expired entries from the outbox, counted.
    fn drop_expired(&mut self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        metrics::counter!("sealpost_federation_expired_total", "destination" => self.config.domain.clone())
            .increment(seqs.len() as u64);
        self.forget(seqs);
    }

    /// Holds back `to` after its mailbox at the destination refused `seq` as full; its
    /// entries are resent after the recipient's own backoff.
    fn park(&mut self, to: &str, seq: u64, ctx: &mut Context<Self>) {
        let (min, max) = (self.settings.backoff_min, self.settings.backoff_max);
        let parked = self.parked.entry(to.to_owned()).or_insert_with(|| Parked {
            seqs: BTreeSet::new(),
            holding: false,
            backoff: Backoff::new(min, max),
        });
        parked.seqs.insert(seq);
        if !parked.holding {
            parked.holding = true;
            let delay = parked.backoff.fail();
            debug!(destination = %self.config.domain, retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "a recipient's mailbox is full; its envelopes wait");
            let to = to.to_owned();
            ctx.run_later(delay, move |act, ctx| act.unpark(&to, ctx));
        }
    }

    /// An entry of `to` was answered for good (stored or refused): once none of its parked
    /// entries is left, the recipient is no longer parked.
    fn done_with(&mut self, to: &str, seq: u64) {
        if let Some(parked) = self.parked.get_mut(to) {
            parked.seqs.remove(&seq);
            if parked.seqs.is_empty() && !parked.holding {
                self.parked.remove(to);
            }
        }
    }

    /// Ends a recipient's hold: its parked entries go out now, in order, ahead of anything
    /// newer for it (which `pump` sends from now on).
    fn unpark(&mut self, to: &str, ctx: &mut Context<Self>) {
        let Some(parked) = self.parked.get_mut(to) else {
            return;
        };
        if parked.seqs.is_empty() {
            self.parked.remove(to);
            return;
        }
        if let Some(until) = self.hold_until.filter(|t| Instant::now() < *t) {
            // The whole link is paused (the destination asked to slow down): after that.
            let to = to.to_owned();
            ctx.run_later(until - Instant::now(), move |act, ctx| act.unpark(&to, ctx));
            return;
        }
        if self.in_flight.iter().any(|t| t.to.iter().any(|r| r == to)) {
            // Entries of this recipient sent before it was parked are still unanswered: the
            // resend must not overtake them. Nothing new for it is sent meanwhile, so this
            // wait ends with their answers.
            let to = to.to_owned();
            ctx.run_later(self.settings.backoff_min, move |act, ctx| {
                act.unpark(&to, ctx)
            });
            return;
        }
        parked.holding = false;
        if !matches!(self.link, Link::Up(_)) {
            // Sent in order from the oldest entry when the link comes back.
            return;
        }
        let seqs: Vec<u64> = parked.seqs.iter().copied().collect();
        let mut reads = Vec::with_capacity(seqs.len());
        let mut later = Vec::new();
        for seq in seqs {
            match at_once(self.store.outbox.read(self.domain(), seq, 1)) {
                Ok(read) => reads.push((seq, read)),
                Err(read) => later.push((seq, read)),
            }
        }
        if later.is_empty() {
            self.send_parked(to, reads, ctx);
            return;
        }
        // A network store: held until the reads are answered.
        if let (Some(me), Some(parked)) = (self.me.clone(), self.parked.get_mut(to)) {
            parked.holding = true;
            let to = to.to_owned();
            actix::spawn(async move {
                for (seq, read) in later {
                    reads.push((seq, read.await));
                }
                reads.sort_by_key(|(seq, _)| *seq);
                me.do_send(ParkedRead { to, reads });
            });
        }
    }

    /// Sends a parked recipient's entries, read from the outbox.
    fn send_parked(&mut self, to: &str, reads: Vec<(u64, Read)>, ctx: &mut Context<Self>) {
        let Link::Up(tx) = &self.link else {
            return;
        };
        let tx = tx.clone();
        let now = now_ms();
        let mut expired = Vec::new();
        let mut gone = Vec::new();
        let mut txns: Vec<Batch> = Vec::new();
        for (seq, read) in reads {
            let record = match read {
                Ok(mut found) => match found.pop() {
                    Some((got, record)) if got == seq => record,
                    _ => {
                        gone.push(seq); // answered meanwhile
                        continue;
                    }
                },
                Err(e) => {
                    warn!(error = %e, destination = %self.config.domain, "reading the outbox failed");
                    if let Some(parked) = self.parked.get_mut(to) {
                        parked.holding = true;
                        let delay = parked.backoff.fail();
                        let to = to.to_owned();
                        ctx.run_later(delay, move |act, ctx| act.unpark(&to, ctx));
                    }
                    return;
                }
            };
            if record.expires_ms <= now {
                expired.push(seq);
                continue;
            }
            let cost = Cost::of(&record);
            // A group message goes to this recipient only: the others have had it.
            let Some(wire) = to_wire(record, now, |r| r == to) else {
                gone.push(seq);
                continue;
            };
            if !txns.last().is_some_and(|b| b.fits(&cost, &self.settings)) {
                txns.push(Batch::default());
            }
            txns.last_mut()
                .expect("pushed above")
                .push(seq, wire, &cost);
        }
        for seq in gone {
            self.done_with(to, seq);
        }
        for seq in &expired {
            self.done_with(to, *seq);
        }
        self.drop_expired(&expired);
        for batch in txns {
            if !self.send_txn(&tx, batch) {
                // The link's queue is full or closing: hold on a little longer.
                if let Some(parked) = self.parked.get_mut(to) {
                    parked.holding = true;
                    let delay = self.settings.backoff_min;
                    let to = to.to_owned();
                    ctx.run_later(delay, move |act, ctx| act.unpark(&to, ctx));
                }
                break;
            }
        }
        self.pump();
    }

    /// Takes the outbox's index into the backlog.
    fn load(&mut self, index: Vec<crate::store::OutboxEntry>) {
        for crate::store::OutboxEntry {
            seq,
            accepted_ms,
            bytes,
        } in index
        {
            self.backlog.insert(
                seq,
                Entry {
                    accepted_ms,
                    bytes,
                    id: None,
                },
            );
            self.backlog_bytes += bytes;
        }
        let last = self.backlog.keys().next_back().copied().unwrap_or(0);
        self.next_seq = last + 1;
        self.durable_next = self.next_seq;
        self.cursor = self.backlog.keys().next().copied().unwrap_or(self.next_seq);
        if !self.backlog.is_empty() {
            info!(
                destination = %self.config.domain,
                backlog = self.backlog.len(),
                "outbox loaded"
            );
        }
        self.loaded = true;
    }

    /// Loads the outbox, trying again after a backoff while the store fails.
    fn load_or_retry(&mut self, ctx: &mut Context<Self>, backoff: Backoff) {
        match at_once(self.store.outbox.index(self.domain())) {
            Ok(index) => self.loaded(index, ctx, backoff),
            // Nothing else is handled until it is loaded (sends wait rather than overtake).
            Err(read) => ctx.wait(
                actix::fut::wrap_future::<_, Self>(read)
                    .map(move |index, act, ctx| act.loaded(index, ctx, backoff)),
            ),
        }
    }

    fn loaded(
        &mut self,
        index: Result<Vec<crate::store::OutboxEntry>, StoreError>,
        ctx: &mut Context<Self>,
        mut backoff: Backoff,
    ) {
        match index {
            Ok(index) => {
                self.load(index);
                self.publish();
                self.pump();
            }
            Err(e) => {
                warn!(error = %e, destination = %self.config.domain, "loading the outbox failed; sends to this domain are refused until it loads");
                let delay = backoff.fail();
                ctx.run_later(delay, move |act, ctx| act.load_or_retry(ctx, backoff));
            }
        }
    }

    /// Deletes entries from the outbox (acknowledged, refused for good, or expired).
    fn forget(&mut self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        for seq in seqs {
            if let Some(entry) = self.backlog.remove(seq) {
                self.backlog_bytes = self.backlog_bytes.saturating_sub(entry.bytes);
                if let Some(id) = entry.id {
                    self.ids.remove(&id);
                }
            }
        }
        let durable = match self.store.outbox.remove(self.domain(), seqs) {
            Ok(durable) => durable,
            Err(e) => {
                warn!(error = %e, destination = %self.config.domain, "deleting from the outbox failed");
                return;
            }
        };
        // Nobody waits for deletions; they ride the next group commit. After a crash before
        // it, the receiving broker gets them again and deduplicates them.
        actix::spawn(async move {
            if let Err(e) = durable.await {
                warn!(error = %e, "flushing outbox deletions failed");
            }
        });
    }

    /// A lookup over the link, answered with the reply frame.
    fn query(&mut self, request: Request) -> impl Future<Output = QueryResult> + 'static {
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = match &self.link {
            Link::Up(tx) => tx
                .try_send(Outgoing::Request(request, reply_tx))
                .ok()
                .map(|()| reply_rx),
            // Not up yet since start: it goes when the link comes up, within its time.
            _ if !self.ever_up && self.queued_requests.len() < MAX_QUEUED_REQUESTS => {
                self.queued_requests.retain(|(_, reply)| !reply.is_closed());
                self.queued_requests.push((request, reply_tx));
                Some(reply_rx)
            }
            _ => None,
        };
        let timeout = self.settings.request_timeout;
        async move {
            let rx = sent.ok_or(ErrorCode::PeerUnavailable)?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(frame)) => Ok(frame),
                _ => Err(ErrorCode::PeerUnavailable),
            }
        }
    }

    /// Whether a send should wait for the recipient's current devices: a durable or urgent
    /// send, the devices not learned within the cache period (or the send names others than
    /// those known: the sender may know of a device linked since, and would otherwise be
    /// refused with what is only our older view; asked again at most every
    /// [`RECHECK_AFTER`]), the link up and answering.
    fn should_ask(&self, to: &str, devices: Vec<DeviceId>, class: Class) -> bool {
        let fresh = self.known.get(to).is_some_and(|k| {
            k.at.elapsed() < self.settings.device_cache
                && (self.stale(to, devices).is_none()
                    || self
                        .rechecked
                        .get(to)
                        .is_some_and(|at| at.elapsed() < RECHECK_AFTER))
        });
        let paused = self
            .lookups_paused_until
            .is_some_and(|until| Instant::now() < until);
        class != Class::Ephemeral && !fresh && !paused && matches!(self.link, Link::Up(_))
    }

    /// Asks the peer's broker for `user`'s devices, for at most `lookup_wait`; the sends
    /// waiting for it (in `waiting`) are accepted when it ends. The actor goes on serving
    /// everything else meanwhile.
    fn look_up(&mut self, user: String, ctx: &mut Context<Self>) {
        if self.known.contains_key(&user) {
            if self.rechecked.len() > 100_000 {
                self.rechecked.clear();
            }
            self.rechecked.insert(user.clone(), Instant::now());
        }
        let lookup = self.query(Request::GetDevices { user: user.clone() });
        let wait = self.settings.lookup_wait;
        let bounded = async move { tokio::time::timeout(wait, lookup).await };
        ctx.spawn(bounded.into_actor(self).map(move |answer, act, ctx| {
            match answer {
                Ok(answer) => act.learn(user.clone(), answer),
                Err(_elapsed) => act.lookup_unanswered(&user),
            }
            act.drain(&user, ctx);
        }));
    }

    /// Accepts the sends waiting for `user`, in order, up to a group message that still waits
    /// for another recipient's lookup: the rest wait behind it. A group message accepted
    /// releases the queues it held back, in turn (a worklist: chains of group messages can be
    /// long).
    fn drain(&mut self, user: &str, ctx: &mut Context<Self>) {
        let mut work = vec![user.to_owned()];
        while let Some(user) = work.pop() {
            let Some(mut queue) = self.waiting.remove(&user) else {
                continue;
            };
            while let Some(waiter) = queue.pop_front() {
                let group = match waiter {
                    Waiter::One(msg, reply) => {
                        self.accept(msg, reply, ctx);
                        continue;
                    }
                    Waiter::Group(group) => group,
                };
                let mut waiting = group.borrow_mut();
                waiting.behind -= 1;
                if waiting.behind > 0 {
                    waiting.blocked.push(user.clone());
                    drop(waiting);
                    self.waiting.insert(user, queue);
                    break;
                }
                work.append(&mut waiting.blocked);
                let send = waiting.send.take();
                drop(waiting);
                if let Some((msg, reply)) = send {
                    self.accept_group(msg, reply, ctx);
                }
            }
        }
    }

    /// A device lookup was not answered within `lookup_wait`: the link may be silent. Sends are
    /// checked against what is known without asking until the link has had time to be declared
    /// dead, and the operator hears of it once.
    fn lookup_unanswered(&mut self, user: &str) {
        if let Some(known) = self.known.get_mut(user) {
            known.at = Instant::now();
        }
        if self
            .lookups_paused_until
            .is_none_or(|until| until <= Instant::now())
        {
            warn!(
                destination = %self.config.domain,
                wait_ms = u64::try_from(self.settings.lookup_wait.as_millis()).unwrap_or(u64::MAX),
                "a device lookup went unanswered; sends are checked against the devices known so far"
            );
        }
        metrics::counter!("sealpost_federation_lookups_unanswered_total", "destination" => self.config.domain.clone())
            .increment(1);
        self.lookups_paused_until = Some(Instant::now() + self.settings.link_timeout);
    }

    /// Checks a send's device set against what the peer knows of the recipient.
    fn stale(&self, to: &str, mut named: Vec<DeviceId>) -> Option<SendOutcome> {
        let known = self.known.get(to)?;
        match &known.devices {
            Err(code) => Some(rejected(*code)),
            Ok(current) => {
                named.sort_unstable();
                (&named != current).then(|| {
                    crate::telemetry::reject(ErrorCode::StaleDevices.as_str());
                    SendOutcome::Rejected {
                        code: ErrorCode::StaleDevices,
                        current_devices: current.clone(),
                    }
                })
            }
        }
    }

    fn learn(&mut self, user: String, answer: QueryResult) {
        let devices = match answer {
            Ok(LinkFrame::Devices { devices, .. }) => {
                let mut ids: Vec<DeviceId> = devices.iter().map(|d| DeviceId(d.device)).collect();
                ids.sort_unstable();
                Ok(ids)
            }
            Ok(LinkFrame::Refused {
                code: ErrorCode::UnknownRecipient,
                ..
            }) => Err(ErrorCode::UnknownRecipient),
            // Unreachable or unexpected: keep what we knew (trusted for another cache period,
            // so the next send does not wait again), accept unchecked otherwise.
            Ok(_) | Err(_) => {
                if let Some(known) = self.known.get_mut(&user) {
                    known.at = Instant::now();
                }
                return;
            }
        };
        if self.known.len() > 100_000 {
            self.known.clear();
        }
        self.known.insert(
            user,
            KnownDevices {
                at: Instant::now(),
                devices,
            },
        );
    }

    /// Carries an ephemeral envelope if the link is up now, and only as much as one
    /// transaction holds; past that (a peer that does not acknowledge), it is dropped, as for
    /// a device that is not connected. Never stored.
    fn carry_ephemeral(&mut self, envelope: FedEnvelope) {
        let size: u64 = envelope
            .copies
            .iter()
            .map(|c| c.ciphertext.len() as u64)
            .sum();
        let room = self.ephemeral.len() < self.settings.batch
            && self.ephemeral_bytes + size <= self.settings.max_txn_bytes;
        if matches!(self.link, Link::Up(_)) && room {
            self.ephemeral_bytes += size;
            self.ephemeral.push(envelope);
            self.pump();
        } else {
            metrics::counter!("sealpost_federation_ephemeral_dropped_total", "destination" => self.config.domain.clone())
                .increment(1);
        }
    }

    /// Accepts (or refuses) an envelope once its device set has been checked.
    fn accept(
        &mut self,
        msg: Enqueue,
        reply: oneshot::Sender<SendOutcome>,
        ctx: &mut Context<Self>,
    ) {
        let named = msg.copies.iter().map(|c| c.device).collect();
        if let Some(refusal) = self.stale(&msg.to, named) {
            let _ = reply.send(refusal);
            return;
        }
        if msg.class == Class::Ephemeral {
            self.carry_ephemeral(FedEnvelope {
                id: msg.id,
                to: msg.to,
                class: msg.class,
                ttl_secs: msg.ttl_secs,
                copies: msg.copies.to_vec(),
                admission: msg.admission,
            });
            let _ = reply.send(SendOutcome::Accepted { duplicate: false });
            return;
        }
        let key = (msg.id, msg.to.clone());
        let entry = move |now: u64| {
            let (admission, token) = admission_to(msg.admission);
            OutboxRecord {
                version: RECORD_VERSION,
                id: msg.id.0,
                to: msg.to,
                class: msg.class as u8,
                accepted_ms: now,
                expires_ms: now + u64::from(msg.ttl_secs) * 1000,
                copies: msg
                    .copies
                    .iter()
                    .map(|c| (c.device.0, ByteBuf::from(c.ciphertext.clone())))
                    .collect(),
                admission,
                token,
                group: None,
            }
        };
        self.store_entry(key, entry, ctx, move |stored| {
            let _ = reply.send(match stored {
                Ok(duplicate) => SendOutcome::Accepted { duplicate },
                Err(code) => rejected(code),
            });
        });
    }

    /// Accepts (or refuses) a group message once its recipients' device sets can be checked:
    /// the recipients that pass share one outbox entry.
    fn accept_group(&mut self, msg: GroupEnqueue, reply: GroupReply, ctx: &mut Context<Self>) {
        let mut outcomes = Vec::with_capacity(msg.recipients.len());
        let mut kept = Vec::with_capacity(msg.recipients.len());
        for r in msg.recipients {
            match self.stale(&r.to, r.devices.clone()) {
                Some(refusal) => outcomes.push((r.to, refusal)),
                None => kept.push(r),
            }
        }
        if kept.is_empty() {
            let _ = reply.send(outcomes);
            return;
        }
        if msg.class == Class::Ephemeral {
            for r in kept {
                outcomes.push((r.to.clone(), SendOutcome::Accepted { duplicate: false }));
                self.carry_ephemeral(FedEnvelope {
                    id: msg.id,
                    to: r.to,
                    class: msg.class,
                    ttl_secs: msg.ttl_secs,
                    copies: r
                        .devices
                        .iter()
                        .map(|&device| Copy {
                            device,
                            ciphertext: msg.ciphertext.to_vec(),
                        })
                        .collect(),
                    admission: r.admission,
                });
            }
            let _ = reply.send(outcomes);
            return;
        }
        // A retry of the same message to the same recipients is the same entry (a key no 1:1
        // envelope's recipient can have).
        let names: Vec<String> = kept.iter().map(|r| r.to.clone()).collect();
        let key = (msg.id, format!("\n{}", names.join("\n")));
        let (id, class, ttl_secs, ciphertext) = (msg.id, msg.class, msg.ttl_secs, msg.ciphertext);
        let entry = move |now: u64| OutboxRecord {
            version: RECORD_VERSION,
            id: id.0,
            to: String::new(),
            class: class as u8,
            accepted_ms: now,
            expires_ms: now + u64::from(ttl_secs) * 1000,
            copies: vec![(0, ByteBuf::from(ciphertext.to_vec()))],
            admission: 0,
            token: None,
            group: Some(kept.into_iter().map(outbox_recipient).collect()),
        };
        self.store_entry(key, entry, ctx, move |stored| {
            let outcome = match stored {
                Ok(duplicate) => SendOutcome::Accepted { duplicate },
                Err(code) => rejected(code),
            };
            outcomes.extend(names.into_iter().map(|to| (to, outcome.clone())));
            let _ = reply.send(outcomes);
        });
    }

    /// Writes the outbox entry `entry` makes (given the time), unless this incarnation holds
    /// one under `key` already (a retry); `answer` hears once it is durable whether it was a
    /// duplicate, or why it was refused.
    fn store_entry(
        &mut self,
        key: (EnvelopeId, String),
        entry: impl FnOnce(u64) -> OutboxRecord,
        ctx: &mut Context<Self>,
        answer: impl FnOnce(Result<bool, ErrorCode>) + 'static,
    ) {
        if !self.loaded {
            return answer(Err(ErrorCode::StoreUnavailable));
        }
        let duplicate = self.ids.contains_key(&key);
        let mut durable = None;
        if !duplicate {
            // A destination unreachable for long must not fill the disk: past the quota,
            // senders are told to retry later.
            if self.backlog.len() as u64 >= self.settings.outbox_quota {
                return answer(Err(ErrorCode::PeerUnavailable));
            }
            if !self.store.health.has_room() {
                return answer(Err(ErrorCode::StoreUnavailable));
            }
            let now = now_ms();
            let record = entry(now);
            let seq = self.next_seq;
            match self.store.outbox.put(self.domain(), seq, &record) {
                Ok(put) => durable = Some(put),
                Err(e) => {
                    warn!(error = %e, destination = %self.config.domain, "outbox write failed; send refused");
                    return answer(Err(ErrorCode::StoreUnavailable));
                }
            }
            self.next_seq += 1;
            let size = record.size();
            self.backlog.insert(
                seq,
                Entry {
                    accepted_ms: now,
                    bytes: size,
                    id: Some(key.clone()),
                },
            );
            self.backlog_bytes += size;
            self.ids.insert(key, seq);
            metrics::counter!("sealpost_federation_enqueued_total", "destination" => self.config.domain.clone())
                .increment(1);
        }
        // Once a put resolves, every earlier put to this outbox is durable too.
        let covered = self.next_seq;
        let started = Instant::now();
        let durable = durable.unwrap_or_else(|| self.store.outbox.durable(self.domain()));
        ctx.spawn(
            durable
                .into_actor(self)
                .map(move |result, act, _| match result {
                    Ok(()) => {
                        act.durable_next = act.durable_next.max(covered);
                        crate::telemetry::APPEND_SECONDS.record_duration(started.elapsed());
                        answer(Ok(duplicate));
                        act.pump();
                    }
                    Err(e) => {
                        warn!(error = %e, "outbox commit failed; send refused");
                        answer(Err(ErrorCode::StoreUnavailable));
                    }
                }),
        );
    }
}

/// A group message's recipient as its outbox entry holds it.
fn outbox_recipient(r: GroupTo) -> OutboxRecipient {
    let (admission, token) = admission_to(r.admission);
    OutboxRecipient {
        to: r.to,
        devices: r.devices.into_iter().map(|d| d.0).collect(),
        admission,
        token,
    }
}

/// The wire form of an outbox entry, with the time-to-live left, for the recipients `to` lets
/// through (`None` if it lets none through).
pub(super) fn to_wire(record: OutboxRecord, now: u64, to: impl Fn(&str) -> bool) -> Option<Wire> {
    let (class, ttl_secs) = class_and_ttl(&record, now);
    let id = EnvelopeId(record.id);
    let mut copies = record.copies.into_iter().map(|(device, c)| Copy {
        device: DeviceId(device),
        ciphertext: c.into_vec(),
    });
    if let Some(recipients) = record.group {
        let recipients: Vec<FedRecipient> = recipients
            .into_iter()
            .filter(|r| to(&r.to))
            .map(|r| FedRecipient {
                to: r.to,
                devices: r.devices.into_iter().map(DeviceId).collect(),
                admission: admission_from(r.admission, r.token),
            })
            .collect();
        let ciphertext = copies.next().map(|c| c.ciphertext).unwrap_or_default();
        return (!recipients.is_empty()).then_some(Wire::Group(FedGroupEnvelope {
            id,
            class,
            ttl_secs,
            ciphertext,
            recipients,
        }));
    }
    if !to(&record.to) {
        return None;
    }
    Some(Wire::One(FedEnvelope {
        id,
        to: record.to,
        class,
        ttl_secs,
        copies: copies.collect(),
        admission: admission_from(record.admission, record.token),
    }))
}

/// An outbox entry's class, and its time-to-live left at `now`.
fn class_and_ttl(record: &OutboxRecord, now: u64) -> (Class, u32) {
    let class = match record.class {
        1 => Class::Ephemeral,
        2 => Class::Urgent,
        _ => Class::Durable,
    };
    let max = match class {
        Class::Durable => MAX_DURABLE_TTL_SECS,
        _ => MAX_URGENT_TTL_SECS,
    };
    let left = record.expires_ms.saturating_sub(now).div_ceil(1000);
    (class, u32::try_from(left).unwrap_or(max).clamp(1, max))
}

/// An admission as an outbox record holds it.
fn admission_to(admission: Admission) -> (u8, Option<ByteBuf>) {
    match admission {
        Admission::Origin => (0, None),
        Admission::Token(t) => (1, Some(ByteBuf::from(t))),
        Admission::Open => (2, None),
    }
}

/// An admission from its outbox record form.
fn admission_from(kind: u8, token: Option<ByteBuf>) -> Admission {
    match (kind, token) {
        (1, Some(t)) => Admission::Token(t.into_vec()),
        (2, _) => Admission::Open,
        _ => Admission::Origin,
    }
}

impl Actor for FederationPeer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        self.me = Some(ctx.address());
        let backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        self.load_or_retry(ctx, backoff);
        self.publish();
        ctx.run_interval(Duration::from_secs(1), |act, _| act.publish());
        self.connect(ctx);
    }
}

impl Handler<Fetched> for FederationPeer {
    type Result = ();

    fn handle(&mut self, msg: Fetched, ctx: &mut Self::Context) {
        self.fetching = false;
        match msg.result {
            Ok(entries) => {
                self.fetched = Some((msg.from, entries));
                self.pump();
            }
            Err(e) => {
                warn!(error = %e, destination = %self.config.domain, "reading the outbox failed");
                ctx.run_later(self.settings.backoff_min, |act, _| act.pump());
            }
        }
    }
}

impl Handler<ParkedRead> for FederationPeer {
    type Result = ();

    fn handle(&mut self, msg: ParkedRead, ctx: &mut Self::Context) {
        if let Some(parked) = self.parked.get_mut(&msg.to) {
            parked.holding = false;
            self.send_parked(&msg.to, msg.reads, ctx);
        }
    }
}

impl Handler<Enqueue> for FederationPeer {
    type Result = ResponseFuture<SendOutcome>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if let Some(waiting) = self.waiting.get_mut(&msg.to) {
            // Behind an earlier send to the same recipient whose lookup is running; bounded,
            // since a lookup may take `lookup_wait` and senders do not wait for each other.
            if waiting.len() >= MAX_WAITING_PER_RECIPIENT {
                let _ = tx.send(rejected(ErrorCode::PeerUnavailable));
            } else {
                waiting.push_back(Waiter::One(msg, tx));
            }
        } else if self.should_ask(
            &msg.to,
            msg.copies.iter().map(|c| c.device).collect(),
            msg.class,
        ) {
            let user = msg.to.clone();
            self.waiting
                .insert(user.clone(), VecDeque::from([Waiter::One(msg, tx)]));
            self.look_up(user, ctx);
        } else {
            self.accept(msg, tx, ctx);
        }
        // A send dropped unanswered (the actor stopped) may be retried: not the sender's fault.
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| rejected(ErrorCode::PeerUnavailable))
        })
    }
}

impl Handler<GroupEnqueue> for FederationPeer {
    type Result = ResponseFuture<Vec<(String, SendOutcome)>>;

    fn handle(&mut self, msg: GroupEnqueue, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let names: Vec<String> = msg.recipients.iter().map(|r| r.to.clone()).collect();
        let answer = Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                let outcome = rejected(ErrorCode::PeerUnavailable);
                names.into_iter().map(|to| (to, outcome.clone())).collect()
            })
        });
        // It waits for the lookups of the recipients that need one, and behind the sends
        // already waiting for theirs; meanwhile it holds back later sends to its other
        // recipients, so that nothing overtakes it.
        let mut seen = HashSet::new();
        let (mut wait, mut hold) = (Vec::new(), Vec::new());
        for r in &msg.recipients {
            if !seen.insert(r.to.as_str()) {
                continue; // the gateway names each recipient once; a second is no second wait
            }
            if self.waiting.contains_key(&r.to)
                || self.should_ask(&r.to, r.devices.clone(), msg.class)
            {
                wait.push(r.to.clone());
            } else {
                hold.push(r.to.clone());
            }
        }
        if wait.is_empty() {
            self.accept_group(msg, tx, ctx);
            return answer;
        }
        let full = wait.iter().any(|user| {
            self.waiting
                .get(user)
                .is_some_and(|q| q.len() >= MAX_WAITING_PER_RECIPIENT)
        });
        if full {
            drop(tx); // answered as `peer_unavailable`, retryable
            return answer;
        }
        for user in &hold {
            self.waiting.insert(user.clone(), VecDeque::new());
        }
        let group = Rc::new(RefCell::new(WaitingGroup {
            behind: wait.len(),
            blocked: hold,
            send: Some((msg, tx)),
        }));
        for user in wait {
            let waiter = Waiter::Group(group.clone());
            if let Some(queue) = self.waiting.get_mut(&user) {
                queue.push_back(waiter);
            } else {
                self.waiting.insert(user.clone(), VecDeque::from([waiter]));
                self.look_up(user, ctx);
            }
        }
        answer
    }
}

/// Most requests waiting for a link to come up; more are answered `peer_unavailable` at once.
const MAX_QUEUED_REQUESTS: usize = 256;

impl Handler<Query> for FederationPeer {
    type Result = ResponseFuture<QueryResult>;

    fn handle(&mut self, msg: Query, _ctx: &mut Self::Context) -> Self::Result {
        Box::pin(self.query(msg.0))
    }
}

impl Handler<LinkUp> for FederationPeer {
    type Result = ();

    fn handle(&mut self, msg: LinkUp, _ctx: &mut Self::Context) {
        if msg.generation != self.generation {
            return;
        }
        match &mut self.outage {
            Some(outage) if !outage.restored => {
                outage.restored = true;
                warn!(
                    destination = %self.config.domain,
                    down_s = outage.since.elapsed().as_secs(),
                    attempts = outage.attempts,
                    backlog = self.backlog.len(),
                    "federation link restored"
                );
            }
            Some(_) => debug!(destination = %self.config.domain, "federation link up again"),
            None => info!(destination = %self.config.domain, "federation link up"),
        }
        // Requests that waited for the link go first; those whose caller gave up are dropped.
        for (request, reply) in self.queued_requests.drain(..) {
            if !reply.is_closed() {
                let _ = msg.tx.try_send(Outgoing::Request(request, reply));
            }
        }
        self.link = Link::Up(msg.tx);
        self.ever_up = true;
        self.up_since = Some(Instant::now());
        self.lookups_paused_until = None;
        self.cursor = self
            .backlog
            .keys()
            .next()
            .copied()
            .unwrap_or(self.durable_next)
            .min(self.durable_next);
        self.pump();
    }
}

impl Handler<LinkDown> for FederationPeer {
    type Result = ();

    fn handle(&mut self, msg: LinkDown, ctx: &mut Self::Context) {
        if msg.generation != self.generation {
            return;
        }
        let was_up = matches!(self.link, Link::Up(_));
        if self.up_since.is_some_and(|t| t.elapsed() > STABLE_LINK) {
            self.backoff.reset();
            self.outage = None;
        }
        self.link = Link::Down;
        self.up_since = None;
        self.in_flight.clear();
        self.ephemeral.clear();
        self.ephemeral_bytes = 0;
        self.stats.failures += 1;
        self.stats.last_error = Some(msg.reason.clone());
        metrics::counter!("sealpost_federation_link_failures_total", "destination" => self.config.domain.clone())
            .increment(1);
        let delay = self.backoff.fail();
        let retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        // One warning when an outage begins, a summary each minute while it lasts, and one
        // when it ends (in the LinkUp handler); single failed attempts at debug level.
        let now = Instant::now();
        match &mut self.outage {
            None => {
                self.outage = Some(Outage {
                    since: now,
                    attempts: 1,
                    logged: now,
                    restored: false,
                });
                let what = if was_up {
                    "federation link down"
                } else {
                    "federation link cannot be established"
                };
                warn!(destination = %self.config.domain, reason = %msg.reason, retry_ms, backlog = self.backlog.len(), "{what}");
            }
            Some(outage) => {
                outage.attempts += 1;
                if now.duration_since(outage.logged) >= OUTAGE_LOG_EVERY {
                    outage.logged = now;
                    warn!(
                        destination = %self.config.domain,
                        down_s = outage.since.elapsed().as_secs(),
                        attempts = outage.attempts,
                        backlog = self.backlog.len(),
                        reason = %msg.reason,
                        "federation link still down"
                    );
                } else {
                    debug!(destination = %self.config.domain, reason = %msg.reason, retry_ms, "federation link attempt failed");
                }
            }
        }
        self.publish();
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }
}

impl Handler<TxnAcked> for FederationPeer {
    type Result = ();

    fn handle(&mut self, msg: TxnAcked, ctx: &mut Self::Context) {
        if msg.generation != self.generation {
            return;
        }
        // Acknowledgements come in order; anything before this one was dropped by a retry.
        let Some(pos) = self.in_flight.iter().position(|t| t.txn_id == msg.txn_id) else {
            return;
        };
        let txn = self
            .in_flight
            .remove(pos)
            .expect("position is within in_flight");
        let mut delivered = 0u64;
        let mut retry_from = None;
        // Entries that one of their recipients still waits for.
        let mut unfinished = HashSet::new();
        for (i, (seq, to)) in txn.seqs.iter().zip(&txn.to).enumerate() {
            // A short answer leaves the rest unanswered: send them again.
            let Some(code) = msg.codes.get(i) else {
                retry_from = Some(*seq);
                break;
            };
            match code {
                None => {
                    delivered += 1;
                    self.done_with(to, *seq);
                }
                // Only this recipient has to wait; the rest of the stream goes on.
                Some(ErrorCode::MailboxFull) => {
                    unfinished.insert(*seq);
                    self.park(to, *seq, ctx);
                }
                Some(code) if retryable(*code) => {
                    retry_from = Some(*seq);
                    break;
                }
                Some(code) => {
                    // Refused for good (unknown recipient, bad token, ...): nobody can fix
                    // this by retrying. The sender was already answered; count it.
                    self.done_with(to, *seq);
                    self.stats.refused += 1;
                    metrics::counter!(
                        "sealpost_federation_refused_total",
                        "destination" => self.config.domain.clone(),
                        "reason" => code.as_str()
                    )
                    .increment(1);
                }
            }
        }
        // An entry is done once each of its recipients has had an answer for good: here, or
        // earlier (a group message parked for some of its recipients).
        let mut done: Vec<u64> = txn
            .seqs
            .iter()
            .copied()
            .filter(|seq| retry_from.is_none_or(|r| *seq < r) && !unfinished.contains(seq))
            .collect();
        done.dedup();
        if !self.parked.is_empty() {
            done.retain(|seq| !self.parked.values().any(|p| p.seqs.contains(seq)));
        }
        self.stats.delivered += delivered;
        metrics::counter!("sealpost_federation_delivered_total", "destination" => self.config.domain.clone())
            .increment(delivered);
        self.forget(&done);
        match retry_from {
            Some(seq) => {
                // Resend from the first unfinished entry, after a pause; later transactions
                // already sent will be answered again (and deduplicated) on the resend. A
                // parked recipient's resend may hold older entries than this one.
                let oldest = self
                    .in_flight
                    .iter()
                    .filter_map(|t| t.seqs.first().copied())
                    .min();
                self.in_flight.clear();
                self.cursor = oldest.map_or(seq, |o| o.min(seq));
                self.resume = Some(seq);
                let delay = self.backoff.fail();
                self.hold_until = Some(Instant::now() + delay);
                ctx.run_later(delay, |act, _| act.pump());
            }
            None => {
                if !txn.seqs.is_empty() {
                    self.backoff.reset();
                }
                self.pump();
            }
        }
    }
}

impl Handler<Status> for FederationPeer {
    type Result = MessageResult<Status>;

    fn handle(&mut self, _msg: Status, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(PeerStatus {
            domain: self.config.domain.clone(),
            url: self.config.location().to_owned(),
            link: match self.link {
                Link::Up(_) => "up",
                Link::Connecting => "connecting",
                Link::Down => "down",
            },
            backlog: self.backlog.len() as u64,
            backlog_bytes: self.backlog_bytes,
            oldest_age_ms: self.oldest_age_ms(),
            in_flight_txns: self.in_flight.len(),
            attempts: self.stats.attempts,
            failures: self.stats.failures,
            consecutive_failures: self.backoff.failures(),
            delivered: self.stats.delivered,
            refused: self.stats.refused,
            last_error: self.stats.last_error.clone(),
        })
    }
}
