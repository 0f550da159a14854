//! Mailboxes: one actor per user, the single writer of that user's device queues.
//!
//! - [`messages`]: what the gateway asks of a mailbox.
//! - [`actor`]: the [`Mailbox`] actor — idempotent append, group-committed durability,
//!   per-device gap-free sequence numbers, windowed push, ack, expiry, quota.
//! - [`outbox`]: the bounded queue of frames from a mailbox to a connected session.
//! - [`live`]: the live-delivery seam — a mailbox wakes whoever holds a device's socket, in
//!   this process today, in another one with a scale-out backend.
//! - [`registry`]: finds or spawns the mailbox of a user, spreads them over threads, and
//!   forgets them when they stop idle.

pub mod actor;
mod device_map;
pub mod live;
pub mod messages;
pub mod outbox;
pub mod registry;

#[cfg(test)]
mod actor_tests;
#[cfg(test)]
mod model_tests;

pub use actor::{Mailbox, MailboxConfig};
pub use messages::{Conn, ConnId};
pub use registry::{Registry, RegistryError};
