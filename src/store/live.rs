//! The live-delivery seam: how whoever holds a device's socket learns, without polling and
//! without anything being stored, that the device's queue grew (an append by a mailbox in
//! another process), that the device connected elsewhere (so its older session closes with
//! `displaced`), and what ephemeral envelopes it should get now.
//!
//! ```text
//!  Mailbox(user) on pod A ── notify / attached / ephemeral ──▶ seam
//!                                            │
//!                      in-process: nothing crosses a process, nothing to tell anyone
//!                      NATS: a core subject per device (`sp.live.<U>.<device>`); the
//!                      pods whose mailbox holds that device's socket subscribe
//!                                            │
//!  Mailbox(user) on pod B ◀── Subscription (Ready, Durable, Attached, Ephemeral) ──┘
//! ```
//!
//! Everything here is best effort: a lost `Durable` is made up by the next one or by the
//! next read of the queue; a lost `Attached` leaves two sessions of one device for a while,
//! each served from the store in order. Nothing depends on it for what is acknowledged.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::sync::mpsc;

/// What a subscriber to a device hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    /// The subscription is in place: from now on nothing is missed. A subscriber reads the
    /// queue's end once now, for what was announced before.
    Ready,
    /// The device's queue is durable below this seq.
    Durable(u64),
    /// The device connected in another process (`origin`) at `at_ms`.
    Attached {
        /// The process, as [`LiveDelivery::origin`] there.
        origin: u64,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// An ephemeral envelope for the device: its encoded `deliver_ephemeral` frame.
    Ephemeral(Bytes),
}

/// Events for the holders of devices' sockets, wherever they are.
pub trait LiveDelivery: Send + Sync + 'static {
    /// Whether events cross processes. When they do not, a device's socket is always held by
    /// its mailbox's own process, and mailboxes need not subscribe.
    fn spans_processes(&self) -> bool;
    /// This process's id in [`LiveEvent::Attached`].
    fn origin(&self) -> u64;
    /// Subscribes to a device's events; dropping the subscription ends it.
    fn subscribe(&self, user: &str, device: u32) -> Subscription;
    /// `device`'s queue is durable below `up_to_seq`.
    fn notify(&self, user: &str, device: u32, up_to_seq: u64);
    /// `device` connected here at `at_ms`: its sessions elsewhere are displaced.
    fn attached(&self, user: &str, device: u32, at_ms: u64);
    /// An ephemeral envelope for `device`, wherever it is connected.
    fn ephemeral(&self, user: &str, device: u32, frame: Bytes);
}

/// How many events may wait for a slow subscriber; more are dropped (best effort: a later
/// `Durable` covers an earlier one).
pub const SUBSCRIPTION_BUFFER: usize = 256;

/// A subscription to one device's events.
pub struct Subscription {
    rx: mpsc::Receiver<LiveEvent>,
}

impl Subscription {
    /// A subscription fed through `tx`.
    pub fn channel() -> (mpsc::Sender<LiveEvent>, Subscription) {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        (tx, Subscription { rx })
    }

    /// The next event; `None` once the seam ended the subscription.
    pub async fn next(&mut self) -> Option<LiveEvent> {
        self.rx.recv().await
    }

    /// The events as a stream.
    pub fn into_stream(self) -> futures_util::stream::BoxStream<'static, LiveEvent> {
        use futures_util::StreamExt;
        futures_util::stream::unfold(
            self.rx,
            |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
        )
        .boxed()
    }
}

type Subscribers = HashMap<String, HashMap<u32, Vec<mpsc::Sender<LiveEvent>>>>;

/// The seam inside one process (the embedded store): `Durable` reaches subscribers in this
/// process; nothing else has anyone to reach.
#[derive(Default)]
pub struct InProcess {
    /// user → device → subscribers. Closed ones go on the next event or subscription.
    devices: Mutex<Subscribers>,
}

impl InProcess {
    /// A seam with no subscribers.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        // Holds only channels; a panic elsewhere cannot leave it half-updated.
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LiveDelivery for InProcess {
    fn spans_processes(&self) -> bool {
        false
    }

    fn origin(&self) -> u64 {
        0
    }

    fn subscribe(&self, user: &str, device: u32) -> Subscription {
        let (tx, sub) = Subscription::channel();
        let _ = tx.try_send(LiveEvent::Ready);
        let mut devices = self.lock();
        let of_user = devices.entry(user.to_owned()).or_default();
        let subs = of_user.entry(device).or_default();
        subs.retain(|s| !s.is_closed());
        subs.push(tx);
        sub
    }

    fn notify(&self, user: &str, device: u32, up_to_seq: u64) {
        let mut devices = self.lock();
        // The common case: nobody listens.
        let Some(of_user) = devices.get_mut(user) else {
            return;
        };
        if let Some(subs) = of_user.get_mut(&device) {
            subs.retain(|s| !s.is_closed());
            for s in subs.iter() {
                let _ = s.try_send(LiveEvent::Durable(up_to_seq));
            }
            if subs.is_empty() {
                of_user.remove(&device);
            }
        }
        if of_user.is_empty() {
            devices.remove(user);
        }
    }

    fn attached(&self, _user: &str, _device: u32, _at_ms: u64) {}

    fn ephemeral(&self, _user: &str, _device: u32, _frame: Bytes) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_hears_its_device_and_nothing_else() {
        let live = InProcess::new();
        let mut one = live.subscribe("a@x", 1);
        let mut two = live.subscribe("a@x", 2);
        live.notify("a@x", 1, 5);
        live.notify("b@x", 1, 9);
        live.notify("a@x", 1, 7);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            assert_eq!(one.next().await, Some(LiveEvent::Ready));
            assert_eq!(one.next().await, Some(LiveEvent::Durable(5)));
            assert_eq!(one.next().await, Some(LiveEvent::Durable(7)));
            assert_eq!(two.next().await, Some(LiveEvent::Ready));
        });
        drop((one, two));
        live.notify("a@x", 1, 8);
        live.notify("a@x", 2, 8);
        assert!(live.lock().is_empty(), "unsubscribed devices are forgotten");
    }
}
