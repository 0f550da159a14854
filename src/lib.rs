//! Sealpost: a broker for end-to-end encrypted direct messages and call signaling.
//!
//! The broker stores and forwards sealed envelopes. It never holds a key that opens one, and
//! no type in it can hold a plaintext message: ciphertext is opaque bytes end to end.
//!
//! # Layout
//!
//! - [`config`]: settings from defaults, TOML file, environment and flags, checked and parsed
//!   once into each layer's own settings ([`server::Config`]).
//! - [`server`]: wires the store, the mailboxes and the gateway together; start and shutdown.
//! - [`gateway`]: HTTP routes (actix-web) and WebSocket device sessions (on the upgraded TCP
//!   connection, through [`socket`]).
//! - [`mailbox`]: one actor per user, the single writer of its device queues.
//! - [`federation`]: one actor per remote domain with a durable outbox, Noise links between
//!   brokers, and the receiving side of those links.
//! - [`store`]: durable state behind seams by intent ([`store::Inbox`], [`store::Directory`],
//!   [`store::Outbox`], [`store::Health`]) and live delivery between processes
//!   ([`store::live`]); the sled backend (the embedded default) is the only importer of sled,
//!   the NATS JetStream one (scale-out) the only importer of async-nats, an in-memory one
//!   serves unit tests.
//! - [`push`]: content-free wake-ups (Web Push, UnifiedPush) for devices that are not
//!   connected when an envelope arrives; mailboxes ask through [`mailbox::Wakeups`].
//! - [`transparency`]: this domain's key-transparency log (akd), published in signed epochs,
//!   the evidence that comes with every device list, and the auditing of peers' logs over the
//!   federation links (`transparency → {federation, store}`; the gateway serves it).
//! - [`crypto`]: device token hashing and platform registration tokens (BLAKE3, Ed25519).
//! - [`telemetry`]: tracing and Prometheus metrics.
//! - [`socket`]: one driver for every server-side WebSocket, on the TCP connection the HTTP
//!   server hands over with the upgrade request: the handshake, frame limits checked at the
//!   header, heartbeats, idle timeouts, write deadlines, closing handshakes, shutdown.
//!
//! Wire frames live in the `sealpost-proto` crate, shared with clients.
//!
//! # Dependency rules
//!
//! `main → config → server → gateway → {mailbox, federation} → {store, proto}`, and
//! `{gateway, federation} → socket` for their WebSockets. Nothing imports `config` but `main`:
//! each layer owns its settings type (`gateway::Settings`, `federation::PeerSettings`,
//! `mailbox::MailboxConfig`, `store::StoreOptions`) and `config` builds them. No module cycles,
//! between layers or between sibling files (`python3 ../shared/tools/modcycles.py src`).
//!
//! The gateway reads accounts and devices from the store's directory but reaches queues only
//! through mailboxes and outboxes only through federation peers. The store never sees a wire
//! type; mailboxes and peers convert
//! between stored records and frames. Federation reaches local mailboxes only through the
//! [`federation::inbound::LocalDelivery`] trait, which the gateway implements.

pub mod clock;
pub mod config;
pub mod crypto;
pub mod federation;
pub mod gateway;
pub mod mailbox;
pub mod push;
pub mod server;
pub mod socket;
pub mod store;
pub mod telemetry;
pub mod transparency;
