//! Mailboxes: one actor per user, the single writer of that user's device queues.
//!
//! - [`handle`]: [`Mailboxes`], the typed handle the rest of the broker uses (async methods;
//!   no actor types).
//! - [`messages`]: the actor messages behind it.
//! - [`actor`]: the [`Mailbox`] actor — idempotent append, group-committed durability,
//!   per-device gap-free sequence numbers, windowed push, ack, expiry, quota.
//! - [`push_queue`]: the bounded queue of frames from a mailbox to a connected session (not
//!   to be confused with a federation outbox).
//! - live delivery ([`crate::store::live`]): a mailbox announces what became durable, that a
//!   device connected, and ephemeral envelopes, for sockets held in other processes (the
//!   scale-out store), and listens for them for the devices it holds.
//! - [`registry`]: finds or spawns the mailbox of a user, spreads them over threads, and
//!   forgets them when they stop idle.

pub mod actor;
mod device_map;
pub mod handle;
pub mod messages;
pub mod push_queue;
pub mod registry;

#[cfg(test)]
mod actor_tests;
#[cfg(test)]
mod model_tests;

pub use actor::{Mailbox, MailboxConfig};
pub use handle::{Delivery, MailboxError, Mailboxes};
pub use messages::{AttachError, ClaimedKey, Conn, ConnId, UploadError, UploadKeys};
pub use registry::{Registry, RegistryError};

/// Wakes devices that are not connected when their queue grows (push notifications), behind
/// a trait so that mailboxes do not depend on how; `server` plugs the pusher in.
pub trait Wakeups: Send + Sync + 'static {
    /// `user`'s `device` got a durable envelope while no session of it is here; `urgent`: a
    /// call rings.
    fn wake(&self, user: &str, device: u32, urgent: bool);
    /// `user`'s `device` connected here: a wake-up it still waits for is not needed.
    fn connected(&self, user: &str, device: u32);
}

/// No wake-ups (a broker without push, and unit tests).
pub struct NoWakeups;

impl Wakeups for NoWakeups {
    fn wake(&self, _user: &str, _device: u32, _urgent: bool) {}
    fn connected(&self, _user: &str, _device: u32) {}
}
