//! The client engine: the protocol of one device of one account, sans I/O.
//!
//! The engine owns the device's state (keys, ratchets, pins and the [record]) and
//! makes every protocol decision; it never touches a socket, a file or a clock. A driver feeds
//! it what the broker said and carries out what it asks for. Two drivers use it: the network
//! SDK (`sdk`, tokio and reqwest) and the browser client (`web/`, whose page does
//! the networking in JavaScript). Time comes in as `now_ms` arguments.
//!
//! # Driving it
//!
//! ```text
//! send:     start_send(to, Outgoing, devices) ─▶ send_step ─┬─ ClaimKey{user, device}
//!             ▲                                               │    claim ─▶ create_session
//!             │                                               └─ Transmit(frame)
//!             │                                                    save ─▶ broker ─▶ answer
//!             └── Stale: fetch + accept_device_list ◀─ send_answer(answer) ─▶ Sent(id)
//!
//! receive:  open(id, ciphertext, SenderList::Cached) ─┬─ Ok(events)          ─▶ settle ─▶ ack
//!                                                      ├─ Need(List(user))    fetch + accept,
//!                                                      │                      open(.., Refetched)
//!                                                      ├─ Need(BrokerKeys)    GET devices ─▶
//!                                                      │                      open_link_request
//!                                                      └─ Failed(hold/reject) ─▶ settle ─▶ ack
//! ```
//!
//! Save the state ([`Engine::to_encrypted_bytes`] / [`Engine::save_file`]) after anything
//! that moved a ratchet and before anything leaves the device or is acknowledged: a crash
//! then redelivers, and envelope ids deduplicate.
//!
//! # Layout
//!
//! - [`record`]: the persisted record (one format for SDK and browser; the browser's older
//!   one is migrated on load).
//! - [`events`]: what the application is told ([`Event`], conversations, devices).
//! - [`lists`]: verified device lists (trust on first use, rollback, changed master keys),
//!   this account's own list, safety numbers.
//! - [`keys`]: one-time and fallback keys to publish.
//! - [`send`]: envelopes to every device of an account: sessions, sealing, placeholders,
//!   routes, stale device sets.
//! - [`receive`]: opening, checking the sender's claim, decrypting, deduplicating, applying,
//!   holding envelopes that cannot be read yet.
//! - [`schedule`]: when transcripts go and contacts' lists are refreshed, so that nothing
//!   the broker sees around a sealed send names its sender.
//! - [`link`]: link codes, requests and grants.
//! - [`calls`]: call signaling payloads.
//! - [`receipts`]: delivery and read receipts, message states, the typing indicator.
//! - [`disappearing`]: per-conversation disappearing-messages timers and expiry.
//! - [`groups`]: group conversations over MLS: create, add, remove, leave, texts, and
//!   receiving Welcomes, Commits and messages (held until their epoch is reached).

pub mod calls;
pub mod chain;
pub mod disappearing;
pub mod events;
pub mod groups;
pub mod history;
pub mod keys;
pub mod link;
pub mod lists;
pub mod receipts;
pub mod receive;
pub mod record;
pub mod schedule;
pub mod send;
pub mod transparency;

use std::path::Path;

use rand::RngCore as _;
use sealpost_proto::Handle;
use zeroize::Zeroizing;

use self::record::{Record, Secret};
pub use self::{
    calls::CALL_TTL_SECS,
    disappearing::{MAX_DISAPPEARING_SECS, MIN_DISAPPEARING_SECS},
    events::{
        CallSignal, Conversation, ConversationMessage, DeviceInfo, Event, HoldReason, MessageState,
        ReceivedMessage,
    },
    groups::{
        GroupChange, GroupEvent, GroupInfo, GroupSend, MAX_ADDS_PER_COMMIT,
        MAX_GROUP_MEMBER_DEVICES,
    },
    keys::{KeyUpload, ONE_TIME_KEYS},
    link::{LinkCode, link_secret, split_link_code},
    lists::{BrokerDevice, KeyChange, MasterRotation},
    receive::{Failure, Need, Opened, SenderList, Unread},
    schedule::Timing,
    send::{ClaimWith, Delivery, Outgoing, PreparedEnvelope, Send, SendProgress, SendStep},
};
use crate::{
    crypto::{ClientState, DeviceKeys, LocalKey, MasterKey, StoreError, link::LINK_SECRET_BYTES},
    error::ClientError,
};

/// Length of the delivery token.
const DELIVERY_TOKEN_BYTES: usize = 32;
/// How long a fetched device list is used before it is fetched again, by default.
pub const DEFAULT_LIST_MAX_AGE_MS: u64 = 60_000;

/// Checks that `handle` is a valid handle.
pub fn check_handle(handle: &str) -> Result<(), ClientError> {
    Handle::parse(handle)
        .map(|_| ())
        .map_err(|e| ClientError::InvalidHandle(handle.to_owned(), e.to_string()))
}

/// A new device's keys, before the broker has assigned it an id: the identity keys to
/// register, a master key (used only if this device starts a new account), one-time keys.
pub struct NewDevice {
    master: MasterKey,
    keys: DeviceKeys,
}

impl NewDevice {
    /// Generates the keys, with [`ONE_TIME_KEYS`] one-time keys.
    pub fn generate() -> Self {
        let mut keys = DeviceKeys::generate();
        keys.generate_one_time_keys(ONE_TIME_KEYS);
        Self {
            master: MasterKey::generate(),
            keys,
        }
    }

    /// The device's public keys, to register with the broker.
    pub fn identity_keys(&self) -> Vec<u8> {
        self.keys.public_keys().to_bytes().to_vec()
    }

    /// The first device of a new account `handle`: `device` and `device_token` as the broker
    /// assigned them, `server` the broker's base URL (empty in a browser). Draws the account's
    /// delivery token.
    pub fn register(self, handle: &str, device: u32, device_token: &[u8], server: &str) -> Engine {
        let mut delivery_token = Zeroizing::new([0u8; DELIVERY_TOKEN_BYTES]);
        rand::rngs::OsRng.fill_bytes(delivery_token.as_mut());
        self.into_engine(
            handle,
            device,
            Record {
                delivery_token: Secret::new(delivery_token.as_ref()),
                ..Record::new(server, device_token)
            },
        )
    }

    /// A device added to the existing account `handle` with a link code whose secret part is
    /// `secret`: it waits for an existing device's grant (see [`link`]). Its own master key
    /// is replaced by the grant's, so it is never used.
    pub fn link(
        self,
        handle: &str,
        device: u32,
        device_token: &[u8],
        secret: &[u8; LINK_SECRET_BYTES],
        server: &str,
    ) -> Engine {
        self.into_engine(
            handle,
            device,
            Record {
                linking: Some(Secret::new(secret)),
                ..Record::new(server, device_token)
            },
        )
    }

    fn into_engine(self, handle: &str, device: u32, record: Record) -> Engine {
        let state = ClientState::new(handle.to_owned(), device, self.master, self.keys);
        Engine::new(state, record)
    }
}

/// Counts of the engine's cryptographic work since it was created (for benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Copies encrypted (Olm) and sealed (HPKE), one per recipient device.
    pub copies_sealed: u64,
    /// Envelopes opened and decrypted successfully.
    pub envelopes_opened: u64,
}

/// One device of one account, sans I/O. See the module doc.
pub struct Engine {
    state: ClientState,
    record: Record,
    /// How long a cached device list is used before it is asked for again.
    list_max_age_ms: u64,
    /// A claimed sender whose list was asked for while opening an envelope, with no pin for
    /// them before: if that envelope then does not authenticate, the pin and list are dropped
    /// again, so that mere claims cannot grow the state (nor pin a key before the contact
    /// ever writes). Not persisted: it lives between the two calls of one opening.
    unpinned_claim: Option<String>,
    /// What to tell the user that is not the answer to one call ([`Engine::take_notices`]).
    notices: Vec<Event>,
    counters: Counters,
    /// When transcripts go and contacts' lists are refreshed (see [`schedule`]).
    timing: Timing,
    /// When contacts' lists are next refreshed; `None` until first asked. Not persisted: a
    /// restarted device draws a new time.
    refresh_due_ms: Option<u64>,
    /// Whether an envelope waits for a refresh of its sender's list (held as
    /// [`HoldReason::AwaitingList`] since the last refresh).
    refresh_wanted: bool,
    /// Whether the next refresh was already brought forward for it.
    refresh_brought_forward: bool,
    /// The device's MLS state, loaded from the record on first use (see [`groups`]).
    mls: Option<crate::crypto::group::GroupKeys>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.state.device_id())
            .finish_non_exhaustive()
    }
}

impl Engine {
    fn new(state: ClientState, record: Record) -> Self {
        Self {
            state,
            record,
            list_max_age_ms: DEFAULT_LIST_MAX_AGE_MS,
            unpinned_claim: None,
            notices: Vec::new(),
            counters: Counters::default(),
            timing: Timing::default(),
            refresh_due_ms: None,
            refresh_wanted: false,
            refresh_brought_forward: false,
            mls: None,
        }
    }

    /// The engine of a loaded state (its record in [`ClientState::app_data`], in this
    /// format or an older one).
    pub fn from_state(state: ClientState) -> Result<Self, StoreError> {
        let record = Record::decode(&state.app_data).ok_or(StoreError::Malformed)?;
        Ok(Self::new(state, record))
    }

    /// Decrypts a state saved with [`Engine::to_encrypted_bytes`] (or by the SDK or browser
    /// before the engine).
    pub fn from_encrypted_bytes(bytes: &[u8], key: &LocalKey) -> Result<Self, StoreError> {
        Self::from_state(ClientState::from_encrypted_bytes(bytes, key)?)
    }

    /// Loads the state file at `path`; `Ok(None)` if there is none.
    pub fn load_file(path: &Path, key: &LocalKey) -> Result<Option<Self>, StoreError> {
        ClientState::load(path, key)?
            .map(Self::from_state)
            .transpose()
    }

    fn sync_record(&mut self) {
        self.state.app_data = self.record.encode();
    }

    /// The whole state, encrypted under `key`.
    pub fn to_encrypted_bytes(&mut self, key: &LocalKey) -> Vec<u8> {
        self.sync_record();
        self.state.to_encrypted_bytes(key)
    }

    /// Saves the whole state to `path`, crash-safely.
    pub fn save_file(&mut self, path: &Path, key: &LocalKey) -> Result<(), StoreError> {
        self.sync_record();
        self.state.save(path, key)
    }

    /// Sets how long a fetched device list is used before it is fetched again (zero: fetch
    /// it every time it is needed).
    pub fn set_list_max_age_ms(&mut self, age_ms: u64) {
        self.list_max_age_ms = age_ms;
    }

    /// This account's handle.
    pub fn user(&self) -> &str {
        self.state.user()
    }

    /// This device's id.
    pub fn device_id(&self) -> u32 {
        self.state.device_id()
    }

    /// The broker's base URL this device registered with (empty in a browser).
    pub fn server(&self) -> &str {
        &self.record.server
    }

    /// This device's auth token.
    pub fn device_token(&self) -> &Zeroizing<Vec<u8>> {
        &self.record.device_token.0
    }

    /// The account's delivery token (empty while this device is being linked).
    pub fn delivery_token(&self) -> &Zeroizing<Vec<u8>> {
        &self.record.delivery_token.0
    }

    /// The engine's cryptographic work so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }
}

#[cfg(test)]
mod tests;
