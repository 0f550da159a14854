//! The live-delivery seam: how the writer of a device's queue (its mailbox) wakes whoever holds
//! that device's socket.
//!
//! ```text
//!  Mailbox(user) ── append durable ──▶ notify(user, device, up_to_seq)
//!                                            │
//!                      in-process: a watch per subscribed device; the mailbox also pushes
//!                      to sessions attached to it directly (it holds their `Conn`)
//!                      scale-out:  a core NATS subject `live.<user>.<device>` — the pod
//!                      holding the socket subscribes, reads the inbox from its cursor and
//!                      pushes; the writer's pod need not know where the socket is
//!                                            │
//!  holder of the socket ◀── Subscription::changed() ── subscribe(user, device)
//! ```
//!
//! A notification carries no content, only the sequence number below which the device's queue
//! is durable; a subscriber that misses some sees the latest (notifications coalesce), and
//! reads what it lacks from the store. Today every socket is held in the process of its
//! mailbox, which pushes to it directly; subscribers are what a socket held elsewhere needs.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

/// Wakes the holders of devices' sockets when their queues grow.
pub trait LiveDelivery: Send + Sync + 'static {
    /// Subscribes to a device's queue: the subscription sees each durable end notified from
    /// now on.
    fn subscribe(&self, user: &str, device: u32) -> Subscription;
    /// `device`'s queue is durable below `up_to_seq`: wakes its subscribers, wherever they are.
    fn notify(&self, user: &str, device: u32, up_to_seq: u64);
}

/// A subscription to one device's queue; dropping it unsubscribes.
pub struct Subscription {
    rx: watch::Receiver<u64>,
}

impl Subscription {
    /// Waits for the next notification; answers the latest durable end, or `None` once the
    /// seam has dropped the subscription.
    pub async fn changed(&mut self) -> Option<u64> {
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }

    /// The latest durable end notified (0 before any).
    pub fn latest(&self) -> u64 {
        *self.rx.borrow()
    }
}

/// The seam inside one process: a watch channel per subscribed device.
#[derive(Default)]
pub struct InProcess {
    /// user → device → sender. Entries go when their last subscriber does (on the next
    /// notification or subscription of that user).
    devices: Mutex<HashMap<String, HashMap<u32, watch::Sender<u64>>>>,
}

impl InProcess {
    /// A seam with no subscribers.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u32, watch::Sender<u64>>>> {
        // Holds only channels; a panic elsewhere cannot leave it half-updated.
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LiveDelivery for InProcess {
    fn subscribe(&self, user: &str, device: u32) -> Subscription {
        let mut devices = self.lock();
        let of_user = devices.entry(user.to_owned()).or_default();
        of_user.retain(|_, tx| tx.receiver_count() > 0);
        let tx = of_user.entry(device).or_insert_with(|| watch::channel(0).0);
        Subscription { rx: tx.subscribe() }
    }

    fn notify(&self, user: &str, device: u32, up_to_seq: u64) {
        let mut devices = self.lock();
        // The common case: nobody outside the mailbox's process listens.
        let Some(of_user) = devices.get_mut(user) else {
            return;
        };
        if let Some(tx) = of_user.get(&device) {
            if tx.send(up_to_seq).is_err() {
                of_user.remove(&device);
            }
        }
        if of_user.is_empty() {
            devices.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_sees_its_device_notified_and_nothing_else() {
        let live = InProcess::new();
        let mut one = live.subscribe("a@x", 1);
        let two = live.subscribe("a@x", 2);
        live.notify("a@x", 1, 5);
        live.notify("b@x", 1, 9);
        live.notify("a@x", 1, 7);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(
            rt.block_on(one.changed()),
            Some(7),
            "notifications coalesce"
        );
        assert_eq!(two.latest(), 0);
        drop((one, two));
        live.notify("a@x", 1, 8);
        live.notify("a@x", 2, 8);
        assert!(live.lock().is_empty(), "unsubscribed devices are forgotten");
    }
}
