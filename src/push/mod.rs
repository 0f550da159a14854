//! Push wake-ups: a content-free notice to a device that is not connected when an envelope
//! for it arrives, so that a phone or a closed browser comes back and fetches over its socket.
//! RFC 8030 delivery, RFC 8291 message encryption and RFC 8292 VAPID, for browsers' push
//! services and UnifiedPush distributors alike (the same protocol).
//!
//! ```text
//!  Mailbox ── wake(user, device) ──▶ Pusher (one task): at most one per device per interval
//!                                        │ due
//!                                        ▼
//!                          deliver: read the subscription, encrypt WAKE_PAYLOAD, POST
//!                                        │
//!              2xx: done · 404/410: subscription deleted · 429/5xx/no answer: retry later
//! ```
//!
//! What a push service learns: that this broker has something for the subscription, and when.
//! Every wake-up has the same bytes ([`WAKE_PAYLOAD`], encrypted to the device), so neither the
//! service nor anyone on the path learns from whom, what or how much; the `Topic` header lets
//! the service replace a wake-up still waiting with the next one. In a scale-out deployment a
//! device connected to another pod may get a redundant wake-up; it finds nothing new and that
//! is all.

pub mod deliver;
pub mod endpoint;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tracing::{debug, info};

use self::deliver::{Outcome, Sender};
use crate::store::Directory;

/// The only plaintext a wake-up ever carries: "you have mail". Nothing of the envelope, its
/// sender or its recipient.
pub const WAKE_PAYLOAD: &[u8] = br#"{"sealpost":"wake"}"#;

/// Wake requests waiting for the pusher; more are dropped (a wake-up is best effort, and the
/// next envelope wakes the device again).
const WAKE_QUEUE: usize = 65_536;

/// Deliveries in flight at once, across all devices.
const MAX_IN_FLIGHT: usize = 64;

/// Attempts of one wake-up before it is given up (the device still finds its envelopes when
/// it next connects).
const MAX_ATTEMPTS: u32 = 8;

/// The push settings of a broker.
#[derive(Debug, Clone)]
pub struct PushSettings {
    /// At most one wake-up per device in this interval (an urgent one, a ringing call, at most
    /// one per [`PushSettings::urgent_interval`]).
    pub interval: Duration,
    /// At most one urgent wake-up per device in this interval.
    pub urgent_interval: Duration,
    /// The VAPID `sub` claim: how a push service's operator reaches this broker's operator.
    pub contact: String,
    /// Accept endpoints on loopback and private addresses, and plain http: for tests and a
    /// self-hosted distributor on the same network only.
    pub allow_private_endpoints: bool,
    /// First retry delay; it doubles per failure up to [`PushSettings::backoff_max`].
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How long a push service keeps an undelivered wake-up (the `TTL` header).
    pub ttl: Duration,
}

/// What mailboxes tell the pusher.
enum Notice {
    /// `device` got a durable envelope while not connected; `urgent`: a call rings.
    Wake {
        user: String,
        device: u32,
        urgent: bool,
    },
    /// `device` connected: a wake-up it still waits for is not needed any more.
    Connected { user: String, device: u32 },
}

/// The handle mailboxes call: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Pusher {
    tx: mpsc::Sender<Notice>,
}

impl Pusher {
    /// Starts the pusher on the current runtime.
    pub fn start(
        settings: PushSettings,
        vapid: endpoint::VapidKey,
        directory: Arc<dyn Directory>,
    ) -> Result<Pusher, reqwest::Error> {
        let (tx, rx) = mpsc::channel(WAKE_QUEUE);
        let sender = Sender::new(settings.clone(), vapid, directory)?;
        actix_web::rt::spawn(run(settings, sender, rx));
        Ok(Pusher { tx })
    }

    /// Asks for a wake-up of `user`'s `device`; `urgent` for a ringing call.
    pub fn wake(&self, user: &str, device: u32, urgent: bool) {
        let wake = Notice::Wake {
            user: user.to_owned(),
            device,
            urgent,
        };
        if self.tx.try_send(wake).is_err() {
            metrics::counter!("sealpost_push_total", "result" => "dropped").increment(1);
        }
    }

    /// `user`'s `device` connected: a wake-up not sent yet is dropped.
    pub fn connected(&self, user: &str, device: u32) {
        // Best effort: a lost notice costs one needless wake-up.
        let _ = self.tx.try_send(Notice::Connected {
            user: user.to_owned(),
            device,
        });
    }
}

/// One device's wake-up state.
#[derive(Default)]
struct DeviceState {
    /// A wake-up is wanted.
    pending: bool,
    /// The wanted one is urgent.
    urgent: bool,
    /// A delivery is under way.
    in_flight: bool,
    /// Failed attempts of the current wake-up.
    failures: u32,
    /// No normal wake-up before this (the last one sent + interval, or a retry's delay).
    not_before: Option<Instant>,
    /// No urgent wake-up before this.
    urgent_not_before: Option<Instant>,
    /// The earliest time this device has in the heap: one entry per device and time, so the
    /// heap grows with devices, not with envelopes.
    scheduled: Option<Instant>,
}

impl DeviceState {
    /// When the wanted wake-up may go.
    fn due_at(&self, now: Instant) -> Instant {
        let gate = if self.urgent && self.failures == 0 {
            self.urgent_not_before
        } else {
            self.not_before
        };
        gate.map_or(now, |g| g.max(now))
    }

    /// Nothing wanted, nothing under way, no interval running: the state can go.
    fn idle(&self, now: Instant) -> bool {
        !self.pending
            && !self.in_flight
            && self.not_before.is_none_or(|t| t <= now)
            && self.urgent_not_before.is_none_or(|t| t <= now)
    }

    /// When this device must be looked at next: its wake-up's time, or the end of its
    /// intervals (to forget it).
    fn next_look(&self, now: Instant) -> Option<Instant> {
        if self.in_flight {
            None
        } else if self.pending {
            Some(self.due_at(now))
        } else {
            self.not_before.max(self.urgent_not_before)
        }
    }
}

type Key = (String, u32);

/// The pusher's state: devices, and when to look at each.
#[derive(Default)]
struct Schedule {
    devices: HashMap<Key, DeviceState>,
    /// (when, device); an entry whose time is not the device's `scheduled` is stale.
    due: BinaryHeap<Reverse<(Instant, Key)>>,
}

impl Schedule {
    /// Puts `key` in the heap for its next look, unless an entry at that time or earlier is
    /// there already.
    fn reschedule(&mut self, key: &Key, now: Instant) {
        let Some(state) = self.devices.get_mut(key) else {
            return;
        };
        let Some(at) = state.next_look(now) else {
            return;
        };
        if state.scheduled.is_some_and(|s| s <= at) {
            return;
        }
        state.scheduled = Some(at);
        self.due.push(Reverse((at, key.clone())));
    }

    /// The next device whose wake-up is due now, forgetting idle devices on the way.
    fn next_due(&mut self, now: Instant) -> Option<Key> {
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > now {
                return None;
            }
            let Reverse((at, key)) = self.due.pop()?;
            let Some(state) = self.devices.get_mut(&key) else {
                continue;
            };
            if state.scheduled != Some(at) {
                continue; // stale: a later entry holds the device's time
            }
            state.scheduled = None;
            if state.idle(now) {
                self.devices.remove(&key);
                continue;
            }
            if state.pending && !state.in_flight && state.due_at(now) <= now {
                return Some(key);
            }
            self.reschedule(&key, now);
        }
        None
    }
}

/// The pusher's loop: takes notices, schedules each device's next wake-up, starts due
/// deliveries (at most [`MAX_IN_FLIGHT`]) and books their outcomes.
async fn run(settings: PushSettings, sender: Sender, mut notices: mpsc::Receiver<Notice>) {
    let sender = Arc::new(sender);
    let mut schedule = Schedule::default();
    let (done_tx, mut done) = mpsc::channel::<(Key, Outcome)>(MAX_IN_FLIGHT);
    let mut in_flight = 0usize;
    loop {
        let now = Instant::now();
        while in_flight < MAX_IN_FLIGHT {
            let Some(key) = schedule.next_due(now) else {
                break;
            };
            let Some(state) = schedule.devices.get_mut(&key) else {
                continue;
            };
            state.pending = false;
            state.in_flight = true;
            let urgent = std::mem::take(&mut state.urgent);
            in_flight += 1;
            let sender = Arc::clone(&sender);
            let done_tx = done_tx.clone();
            actix_web::rt::spawn(async move {
                // A panic in one delivery must not leave its device in flight for ever.
                let outcome = AssertUnwindSafe(sender.deliver(&key.0, key.1, urgent))
                    .catch_unwind()
                    .await
                    .unwrap_or(Outcome::Finished("refused"));
                let _ = done_tx.send((key, outcome)).await;
            });
        }
        // While every slot is taken, only a finished delivery (or a notice) moves things.
        let next_due = (in_flight < MAX_IN_FLIGHT)
            .then(|| schedule.due.peek().map(|Reverse((at, _))| *at))
            .flatten();
        tokio::select! {
            notice = notices.recv() => {
                let Some(notice) = notice else { break };
                let now = Instant::now();
                match notice {
                    Notice::Wake { user, device, urgent } => {
                        let key = (user, device);
                        let state = schedule.devices.entry(key.clone()).or_default();
                        state.pending = true;
                        state.urgent |= urgent;
                        schedule.reschedule(&key, now);
                    }
                    Notice::Connected { user, device } => {
                        if let Some(state) = schedule.devices.get_mut(&(user, device)) {
                            state.pending = false;
                            state.urgent = false;
                        }
                    }
                }
            }
            Some((key, outcome)) = done.recv() => {
                in_flight -= 1;
                let now = Instant::now();
                if let Some(state) = schedule.devices.get_mut(&key) {
                    book(&settings, state, outcome, now);
                }
                schedule.reschedule(&key, now);
            }
            () = sleep_until(next_due) => {}
        }
    }
    debug!("pusher stopped");
}

/// Books a delivery's outcome on its device: every outcome starts an interval, so a device
/// without a subscription costs one lookup per interval and a refusing service one request.
fn book(settings: &PushSettings, state: &mut DeviceState, outcome: Outcome, now: Instant) {
    state.in_flight = false;
    match outcome {
        Outcome::Sent { urgent } => {
            metrics::counter!("sealpost_push_total", "result" => "sent").increment(1);
            state.failures = 0;
            state.not_before = Some(now + settings.interval);
            if urgent {
                state.urgent_not_before = Some(now + settings.urgent_interval);
            }
        }
        Outcome::Retry { urgent } => {
            state.failures += 1;
            if state.failures >= MAX_ATTEMPTS {
                metrics::counter!("sealpost_push_total", "result" => "gave_up").increment(1);
                info!(attempts = state.failures, "push wake-up given up");
                state.failures = 0;
                state.not_before = Some(now + settings.interval);
            } else {
                metrics::counter!("sealpost_push_total", "result" => "retry").increment(1);
                state.pending = true;
                state.urgent |= urgent;
                state.not_before = Some(now + backoff(settings, state.failures));
            }
        }
        Outcome::Finished(result) => {
            metrics::counter!("sealpost_push_total", "result" => result).increment(1);
            state.failures = 0;
            state.not_before = Some(now + settings.interval);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The delay before retry `failures` (1, 2, …): doubling from `backoff_min`, capped, with up to
/// a quarter of jitter so that retries to one push service spread out.
fn backoff(settings: &PushSettings, failures: u32) -> Duration {
    let base = settings
        .backoff_min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(settings.backoff_max);
    let jitter = rand::random::<f64>() * 0.25;
    base.mul_f64(1.0 + jitter).min(settings.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PushSettings {
        PushSettings {
            interval: Duration::from_secs(30),
            urgent_interval: Duration::from_secs(5),
            contact: "mailto:ops@example.com".into(),
            allow_private_endpoints: false,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let s = settings();
        let first = backoff(&s, 1);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
        let third = backoff(&s, 3);
        assert!(third >= Duration::from_millis(400) && third <= Duration::from_millis(500));
        assert!(backoff(&s, 30) <= Duration::from_secs(10));
    }

    #[test]
    fn many_wakes_of_one_device_keep_one_heap_entry_and_idle_devices_are_forgotten() {
        let s = settings();
        let now = Instant::now();
        let mut schedule = Schedule::default();
        let key = ("a@x".to_owned(), 1);
        schedule.devices.insert(
            key.clone(),
            DeviceState {
                not_before: Some(now + Duration::from_secs(30)),
                ..Default::default()
            },
        );
        for _ in 0..1000 {
            schedule.devices.get_mut(&key).expect("state").pending = true;
            schedule.reschedule(&key, now);
        }
        assert_eq!(schedule.due.len(), 1);
        assert_eq!(schedule.next_due(now), None, "gated by the interval");
        let later = now + Duration::from_secs(31);
        assert_eq!(schedule.next_due(later), Some(key.clone()));
        // Sent: booked, then forgotten once its interval is over.
        let state = schedule.devices.get_mut(&key).expect("state");
        state.pending = false;
        state.in_flight = true;
        book(&s, state, Outcome::Sent { urgent: false }, later);
        schedule.reschedule(&key, later);
        assert_eq!(schedule.next_due(later + Duration::from_secs(31)), None);
        assert!(schedule.devices.is_empty(), "forgotten");
        assert!(schedule.due.is_empty());
    }

    #[test]
    fn a_device_without_a_subscription_is_looked_up_once_per_interval() {
        let s = settings();
        let now = Instant::now();
        let mut state = DeviceState {
            in_flight: true,
            ..Default::default()
        };
        book(&s, &mut state, Outcome::Finished("no_subscription"), now);
        state.pending = true;
        assert_eq!(state.due_at(now), now + s.interval);
    }

    #[test]
    fn an_urgent_wake_up_waits_only_for_the_urgent_interval() {
        let now = Instant::now();
        let state = DeviceState {
            pending: true,
            urgent: true,
            not_before: Some(now + Duration::from_secs(30)),
            ..Default::default()
        };
        assert_eq!(state.due_at(now), now);
        let normal = DeviceState {
            urgent: false,
            ..state
        };
        assert_eq!(normal.due_at(now), now + Duration::from_secs(30));
    }
}
