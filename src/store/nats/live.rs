//! [`LiveDelivery`] over core NATS: one subject per device, `sp.live.<U>.<device>`, never
//! stored. The pods whose mailbox holds the device's socket subscribe; any pod publishes.
//!
//! A message is one tag byte and its fields (integers big-endian):
//!
//! ```text
//! 1 Durable    seq:u64                 the queue is durable below seq
//! 2 Attached   origin:u64 at_ms:u64    the device connected at that process
//! 3 Ephemeral  frame…                  a `deliver_ephemeral` frame for the device
//! ```

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;

use super::{Inner, NatsStore};
use crate::store::live::{LiveDelivery, LiveEvent, Subscription};

const DURABLE: u8 = 1;
const ATTACHED: u8 = 2;
const EPHEMERAL: u8 = 3;

/// The live-delivery seam of a NATS store.
pub struct NatsLive {
    inner: Arc<Inner>,
    /// This process among the pods (random at start).
    origin: u64,
}

impl NatsStore {
    /// The live-delivery seam sharing this store's connection.
    pub fn live(&self) -> NatsLive {
        NatsLive {
            inner: self.inner.clone(),
            origin: rand::random(),
        }
    }
}

impl NatsLive {
    fn subject(&self, user: &str, device: u32) -> String {
        format!("sp.live.{}.{device}", self.inner.names.hashed(user))
    }

    /// Publishes without waiting: the client queues it (in order) on its connection.
    fn publish(&self, subject: String, payload: Bytes) {
        let client = self.inner.client.clone();
        tokio::spawn(async move {
            let _ = client.publish(subject, payload).await;
        });
    }
}

fn decode(payload: &[u8]) -> Option<LiveEvent> {
    let (&tag, rest) = payload.split_first()?;
    let u64_at = |i: usize| -> Option<u64> {
        Some(u64::from_be_bytes(rest.get(i..i + 8)?.try_into().ok()?))
    };
    match tag {
        DURABLE => Some(LiveEvent::Durable(u64_at(0)?)),
        ATTACHED => Some(LiveEvent::Attached {
            origin: u64_at(0)?,
            at_ms: u64_at(8)?,
        }),
        EPHEMERAL => Some(LiveEvent::Ephemeral(Bytes::copy_from_slice(rest))),
        _ => None,
    }
}

impl LiveDelivery for NatsLive {
    fn spans_processes(&self) -> bool {
        true
    }

    fn origin(&self) -> u64 {
        self.origin
    }

    fn subscribe(&self, user: &str, device: u32) -> Subscription {
        let (tx, sub) = Subscription::channel();
        let subject = self.subject(user, device);
        let client = self.inner.client.clone();
        tokio::spawn(async move {
            let Ok(mut messages) = client.subscribe(subject).await else {
                return;
            };
            // The SUB is on the wire; a flush makes sure the server has it before anyone is
            // told that nothing is missed from now on.
            let _ = client.flush().await;
            if tx.send(LiveEvent::Ready).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else { return };
                        if let Some(event) = decode(&message.payload) {
                            // Best effort: a subscriber that is behind loses events.
                            let _ = tx.try_send(event);
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        sub
    }

    fn notify(&self, user: &str, device: u32, up_to_seq: u64) {
        let mut b = BytesMut::with_capacity(9);
        b.put_u8(DURABLE);
        b.put_u64(up_to_seq);
        self.publish(self.subject(user, device), b.freeze());
    }

    fn attached(&self, user: &str, device: u32, at_ms: u64) {
        let mut b = BytesMut::with_capacity(17);
        b.put_u8(ATTACHED);
        b.put_u64(self.origin);
        b.put_u64(at_ms);
        self.publish(self.subject(user, device), b.freeze());
    }

    fn ephemeral(&self, user: &str, device: u32, frame: Bytes) {
        let mut b = BytesMut::with_capacity(1 + frame.len());
        b.put_u8(EPHEMERAL);
        b.put_slice(&frame);
        self.publish(self.subject(user, device), b.freeze());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_as_written_and_garbage_does_not() {
        assert_eq!(
            decode(&[DURABLE, 0, 0, 0, 0, 0, 0, 1, 2]),
            Some(LiveEvent::Durable(258))
        );
        let mut attached = vec![ATTACHED];
        attached.extend_from_slice(&7u64.to_be_bytes());
        attached.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            decode(&attached),
            Some(LiveEvent::Attached {
                origin: 7,
                at_ms: 9
            })
        );
        assert_eq!(
            decode(&[EPHEMERAL, 1, 2]),
            Some(LiveEvent::Ephemeral(Bytes::from_static(&[1, 2])))
        );
        assert_eq!(decode(&[DURABLE, 1]), None);
        assert_eq!(decode(&[9]), None);
        assert_eq!(decode(&[]), None);
    }
}
