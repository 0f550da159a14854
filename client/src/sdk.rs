//! The network SDK: a [`Client`] is one device of one account, with its encrypted state in a
//! directory, talking to one broker.
//!
//! # State directory
//!
//! ```text
//! state_dir/local.key      32 random bytes (owner-only): encrypts client.state
//! state_dir/client.state   ClientState (keys, ratchets, pins) + the SDK record, one file
//! state_dir/lock           held (flock) while a Client is open: one process per device
//! ```
//!
//! # Sending
//!
//! [`Client::send_text`] verifies the recipient's signed device list (trust on first use:
//! the first master key seen is pinned; a different one later is
//! [`ClientError::MasterKeyChanged`] and nothing is sent until the user accepts it with
//! [`Client::accept_master_key_change`]), starts Olm sessions with devices it has none with
//! (claiming a one-time key, or the fallback key when they ran out), encrypts once per device,
//! seals each copy to the device's seal key (sealed sender) and sends one envelope per
//! recipient account. The account's own other devices get a transcript
//! ([`Payload::Sent`]) in a second envelope, so every device shows the conversation.
//!
//! Routes:
//!
//! - a contact whose delivery token we hold: `sealed_send` on the anonymous `/v1/sealed`
//!   connection, admitted by that token. The broker learns a recipient, a size and a time.
//! - first contact (no token yet): the authenticated `send` frame on `/v1/ws`. The envelope is
//!   still sealed — the stored copy names no sender — but the live connection does name the
//!   sending device, once. Accounts register with `unrestricted = false`, so strangers cannot
//!   spam sealed envelopes; this is the price (Signal makes the same trade: first messages to
//!   non-contacts are not sealed-sender).
//! - our own account: sealed with our own delivery token.
//!
//! Every device shares the account's delivery token ([`Payload::DeliveryToken`]) with a
//! contact, in its own envelope, before its first message to that contact; the contact's
//! devices store it and from then on write to us sealed. Linked devices receive all tokens in
//! the link grant.
//!
//! The broker refuses a send whose device set is not exactly the recipient's current devices
//! (`stale_devices`, with the current set). The SDK then refetches and verifies the signed list
//! and retries with the same envelope id (idempotent at the broker): devices in the verified
//! list get real copies, devices the broker has that the signed list does not vouch for (a
//! device being linked) get a random placeholder of the same size, which they cannot open —
//! we never encrypt to an unverified key. A send to our own account must include the sending
//! device too: it gets a placeholder, recognised on arrival by its envelope id and acked
//! unread.
//!
//! # Receiving
//!
//! [`Client::next_event`] reads the authenticated connection. For each delivered envelope:
//! open the sealed layer → look up the claimed sender's device in its *verified* device list
//! (fetching and pinning it if needed) → Olm-decrypt, which checks that the claimed sender owns
//! the session ([`SessionError::ForgedSender`]) and that the message is addressed to this
//! device → drop duplicates by envelope id → apply the payload → **save the state** → ack.
//! Envelopes that arrive together are handled as a batch with one save and one ack.
//!
//! An envelope that can never be read (does not open, forged, replayed, from a device its
//! owner does not vouch for, ...) is reported as [`Event::Rejected`] and acked, so one bad
//! envelope cannot jam the queue. A *transient* failure (the broker's HTTP API unreachable
//! while fetching a sender's list) is returned as an error without acking: the connection is
//! dropped and the envelope comes again on the next connection.
//!
//! # Linking a device
//!
//! 1. An existing device calls [`Client::create_link_code`]: the broker issues a single-use
//!    code, and the device adds a 16-byte secret the broker never sees. The user types
//!    `<broker code>.<secret>` into the new device.
//! 2. The new device ([`Client::link`]) adds itself to the account with the broker part,
//!    fetches the account's signed device list, and sends every listed device a
//!    [`Payload::LinkRequest`]: its public keys and a BLAKE3 keyed hash (key derived from the
//!    secret) over its handle, device id and keys.
//! 3. The existing device (while [`Client::next_event`] runs) decrypts it with the keys the
//!    *broker* lists for that device — it is not in the signed list yet, so a request is the
//!    only payload accepted that way — checks the proof against its pending codes, adds the
//!    device to the signed list (version + 1), publishes it, and answers with a
//!    [`Payload::LinkGrant`]: master key, delivery token, contacts (pins, tokens, verified
//!    flags) and a proof of the secret over the grant. The other devices get
//!    [`Payload::DeviceLinked`].
//! 4. The new device checks the grant's proof and that the master key is the one that signs
//!    the list it fetched, and is then a full device of the account.
//!
//! An operator who knows the broker part of the code still cannot link a device of their
//! own, nor impersonate the existing device to the new one: both proofs need the secret.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs::{self, File},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore as _;
use sealpost_proto::{
    Class, ClientFrame, Copy, DeviceId, EnvelopeId, ErrorCode, Handle, Notice, SendOutcome,
    ServerFrame, limits::MAX_ACKS_PER_FRAME,
};
use serde_bytes::ByteBuf;
use zeroize::Zeroizing;

use crate::{
    api::{Api, ApiError, ClaimAuth, DeviceCreds},
    conn::{ConnError, Connection},
    crypto::{
        CallId, ClientState, DeviceKeys, DeviceList, DeviceListError, GrantContact, KeyError,
        LocalKey, MasterKey, PLACEHOLDER_BYTES, Payload, PinResult, PublicDeviceKeys, SafetyNumber,
        SealError, SenderInfo, SessionError, SignedDeviceList, SignedOneTimeKey, StoreError,
        link::{LINK_SECRET_BYTES, link_proof},
        open, placeholder, safety_number, seal,
    },
    record::{CachedList, PendingLink, Record, Secret, StoredMessage},
};

/// One-time keys a device keeps published.
pub const ONE_TIME_KEYS: usize = 50;
/// Time-to-live of message envelopes: 30 days.
const MESSAGE_TTL_SECS: u32 = 30 * 24 * 3600;
/// Time-to-live of call signaling (urgent class): about the ring time, so a device that
/// connects while the caller still waits rings, and a stale offer is never delivered.
pub const CALL_TTL_SECS: u32 = 60;
/// How many times a send is retried after `stale_devices`.
const STALE_RETRIES: usize = 4;
/// How many times a send is retried on a new connection after the old one failed.
const CONNECTION_RETRIES: usize = 3;
/// Most envelopes handled per batch (one save, one ack).
const BATCH: usize = 128;
/// Length of the delivery token.
const DELIVERY_TOKEN_BYTES: usize = 32;

const KEY_FILE: &str = "local.key";
const STATE_FILE: &str = "client.state";
const LOCK_FILE: &str = "lock";

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker's HTTP API refused or could not be reached.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A WebSocket connection failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The local state could not be read or written.
    #[error("local state: {0}")]
    Store(#[from] StoreError),
    /// The state directory could not be used.
    #[error("state directory {path}: {error}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// There is no account in the state directory.
    #[error("no Sealpost account in {0}; run register or link first")]
    NotRegistered(PathBuf),
    /// The state directory already holds an account.
    #[error("{0} already holds a Sealpost account")]
    AlreadyRegistered(PathBuf),
    /// Another process has the state directory open.
    #[error("another process is using {0}")]
    Locked(PathBuf),
    /// A contact's device list is signed by a master key other than the pinned one.
    #[error(
        "WARNING: the master key of {user} has changed. This happens when they reset their \
         account, or when someone (including the broker) is trying to intercept your messages. \
         Nothing was sent. Compare the new safety number with them ({new_safety_number}) and \
         accept the change only if it matches."
    )]
    MasterKeyChanged {
        /// The contact.
        user: String,
        /// The safety number with the new master key.
        new_safety_number: SafetyNumber,
        /// The new master key.
        new_master_key: [u8; 32],
    },
    /// A device list does not verify (signature, user, rollback, ...).
    #[error("the device list of {user} does not verify: {error}")]
    DeviceList {
        /// Whose list.
        user: String,
        /// Why.
        error: DeviceListError,
    },
    /// The account has published no device list.
    #[error("{0} has not published a device list")]
    NoDeviceList(String),
    /// Not a valid handle.
    #[error("invalid handle {0:?}: {1}")]
    InvalidHandle(String, String),
    /// The broker refused a send.
    #[error("the broker refused the message: {0}")]
    SendRefused(ErrorCode),
    /// The recipient's devices kept changing during the send.
    #[error("the device list of {0} kept changing; try again")]
    DevicesUnstable(String),
    /// A key from the directory is not valid for its device.
    #[error("bad key from the directory for {user} device {device}: {error}")]
    BadKey {
        /// Whose.
        user: String,
        /// Which device.
        device: u32,
        /// Why.
        error: KeyError,
    },
    /// An Olm operation failed while sending.
    #[error("encryption failed: {0}")]
    Session(#[from] SessionError),
    /// Sealing failed.
    #[error("sealing failed: {0}")]
    Seal(#[from] SealError),
    /// The link code is not `<code>.<secret>` as shown by the existing device.
    #[error("malformed link code: expected the code exactly as the existing device shows it")]
    BadLinkCode,
    /// Waited too long.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// This device was removed from its account.
    #[error("this device was removed from the account")]
    DeviceRevoked,
    /// The request does not make sense (for example removing this device from itself).
    #[error("{0}")]
    Invalid(String),
}

/// Why one delivered envelope was rejected. It has been acked: it will not come again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// An envelope that could not be read yet could not be kept either: too many are held
    /// for its sender (or its domain, or in all).
    #[error("an envelope from {user} could not be kept for later: too many are held")]
    HoldDropped {
        /// The claimed sender.
        user: String,
    },
    /// The sealed layer does not open with this device's key and address: the envelope is
    /// for another device, or was altered in transit.
    #[error("envelope does not open on this device (addressed to another device, or altered): {0}")]
    Unseal(SealError),
    /// The claimed sender's device is not in its signed device list.
    #[error("sender {user} device {device} is not in their signed device list")]
    UnknownSenderDevice {
        /// The claimed sender.
        user: String,
        /// The claimed device.
        device: u32,
    },
    /// The claimed sender's device list could not be verified.
    #[error("cannot verify sender {user}: {error}")]
    SenderUnverified {
        /// The claimed sender.
        user: String,
        /// Why (for example a changed master key).
        error: Box<ClientError>,
    },
    /// Decryption refused the message: forged sender, replay, wrong recipient, tampering.
    #[error("rejected envelope claiming to come from {user} device {device}: {error}")]
    Session {
        /// The claimed sender.
        user: String,
        /// The claimed device.
        device: u32,
        /// The Olm check that failed.
        error: SessionError,
    },
    /// An authentic message of a kind that makes no sense from this sender now.
    #[error("unexpected {kind} from {user}")]
    Unexpected {
        /// The kind of payload.
        kind: &'static str,
        /// The sender.
        user: String,
    },
    /// A link request or grant whose proof does not match any code this device knows.
    #[error("link message with a wrong code proof (or an expired code)")]
    BadLinkProof,
    /// A valid link request could not be completed (publishing the list or sending the
    /// grant failed); link the device again.
    #[error("could not complete linking a device: {0}")]
    LinkFailed(Box<ClientError>),
}

/// What [`Client::next_event`] reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A message from a contact.
    Message(ReceivedMessage),
    /// A message this account sent from another of its devices.
    SentElsewhere {
        /// The recipient.
        to: String,
        /// The sending device.
        device: u32,
        /// The text.
        text: String,
        /// The sender's clock, ms since the Unix epoch.
        sent_ms: u64,
    },
    /// A device was linked to this account (by this device or another one).
    DeviceLinked {
        /// The new device.
        device: u32,
    },
    /// This device, being linked, received the account's keys: it is now a full device.
    Linked,
    /// An envelope that cannot be read yet, for a reason about its sender: it is kept,
    /// still sealed, acked, and read later, its messages then coming as usual. Later
    /// envelopes from the same sender wait behind it, so they stay in order.
    Held {
        /// Its id.
        id: EnvelopeId,
        /// The claimed sender.
        user: String,
        /// Why, and so when it is read again.
        why: HoldReason,
    },
    /// A delivered envelope was rejected (and acked).
    Rejected {
        /// Its id.
        id: EnvelopeId,
        /// Why.
        error: EnvelopeError,
    },
    /// Call signaling from a contact's verified device, or (for
    /// [`Payload::AnsweredElsewhere`]) from another device of this account.
    Call(CallSignal),
    /// Everything queued when the connection opened has been handled.
    QueueEmpty,
    /// The broker refused a sender because this device's queue is full.
    MailboxFull,
}

/// Why an envelope is [held](Event::Held).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HoldReason {
    /// The sender's master key changed: read once the user accepts the new key
    /// ([`Client::accept_master_key_change`]).
    KeyChanged,
    /// The sender's device list cannot be had now (a broker, ours or the sender's behind it,
    /// did not answer): read again after the next backlog is handled.
    SenderUnavailable,
    /// Earlier envelopes from the same sender are held: read after them.
    Behind,
}

/// A message received from a contact.
#[derive(Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The envelope id.
    pub id: EnvelopeId,
    /// The sender (verified).
    pub from: String,
    /// The sender's device.
    pub device: u32,
    /// The sender's clock, ms since the Unix epoch.
    pub sent_ms: u64,
    /// The text.
    pub text: String,
}

impl std::fmt::Debug for ReceivedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceivedMessage")
            .field("id", &self.id)
            .field("device", &self.device)
            .field("text_len", &self.text.len())
            .finish_non_exhaustive()
    }
}

/// Call signaling received ([`Event::Call`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSignal {
    /// The sender (verified): the peer, or this account for
    /// [`Payload::AnsweredElsewhere`].
    pub from: String,
    /// The sender's device. Answers, candidates and hang-ups of a call should come from the
    /// device that answered (or offered) it.
    pub device: u32,
    /// The sender's clock, ms since the Unix epoch: an offer older than [`CALL_TTL_SECS`] is
    /// no longer ringing.
    pub sent_ms: u64,
    /// One of the call kinds of [`Payload`].
    pub payload: Payload,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationMessage {
    /// True if this account sent it.
    pub outgoing: bool,
    /// The sending device.
    pub device: u32,
    /// The sender's clock, ms since the Unix epoch.
    pub time_ms: u64,
    /// The text.
    pub text: String,
}

/// A conversation with one contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The contact.
    pub with: String,
    /// Whether the user verified the contact's safety number.
    pub verified: bool,
    /// Messages, oldest first.
    pub messages: Vec<ConversationMessage>,
}

/// A device of this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device id.
    pub device: u32,
    /// Whether it is this device.
    pub this_device: bool,
    /// Whether the signed device list vouches for it (false: registered at the broker but
    /// not (yet) linked).
    pub signed: bool,
    /// Its Ed25519 key, hex (for telling devices apart).
    pub fingerprint: String,
}

/// A link code to show on the existing device.
pub struct LinkCode {
    /// `<broker code>.<secret>`: type it into the new device.
    pub code: Zeroizing<String>,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// An envelope encrypted and sealed for every device of one account, not yet sent
/// ([`Client::prepare_text`]). Sending it is [`Client::send_prepared`].
#[derive(Clone)]
pub struct PreparedEnvelope {
    /// The envelope id.
    pub id: EnvelopeId,
    /// The recipient account.
    pub to: String,
    /// One sealed copy per device.
    pub copies: Vec<Copy>,
}

impl std::fmt::Debug for PreparedEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedEnvelope")
            .field("id", &self.id)
            .field("copies", &self.copies)
            .finish_non_exhaustive()
    }
}

/// How an envelope reaches the broker.
#[derive(Clone)]
enum Route {
    /// Anonymous `/v1/sealed`, with the recipient's delivery token.
    Sealed(Secret),
    /// Authenticated `/v1/ws` `send`.
    Authenticated,
}

/// The class and time-to-live an envelope is sent with.
#[derive(Clone, Copy)]
struct Delivery {
    class: Class,
    ttl_secs: u32,
}

impl Delivery {
    /// Messages and everything that must not be lost.
    const DURABLE: Delivery = Delivery {
        class: Class::Durable,
        ttl_secs: MESSAGE_TTL_SECS,
    };
    /// Call signaling: stored briefly, so a waking device still rings.
    const CALL: Delivery = Delivery {
        class: Class::Urgent,
        ttl_secs: CALL_TTL_SECS,
    };
}

/// A device being linked, waiting for its grant.
struct Linking {
    secret: Zeroizing<[u8; LINK_SECRET_BYTES]>,
    done: bool,
}

/// One device of one account. See the module doc.
pub struct Client {
    api: Api,
    dir: PathBuf,
    key: LocalKey,
    _lock: File,
    state: ClientState,
    record: Record,
    conn: Option<Connection>,
    sealed: Option<Connection>,
    /// Frames read from `conn` while waiting for something else.
    inbox: VecDeque<ServerFrame>,
    events: VecDeque<Event>,
    linking: Option<Linking>,
    list_max_age: Duration,
    /// While envelopes are held, how often they are tried again.
    held_retry: Duration,
    /// When they are tried next.
    next_held_retry: Instant,
    /// Consecutive reconnects without a frame in between.
    reconnects: u32,
    stats: Stats,
}

/// Cumulative client-side costs ([`Client::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Copies encrypted (Olm) and sealed (HPKE), one per recipient device.
    pub copies_sealed: u64,
    /// Time spent in Olm encryption plus sealing.
    pub encrypt_seal: Duration,
    /// Envelopes opened and decrypted successfully.
    pub envelopes_opened: u64,
    /// Time spent opening the sealed layer plus Olm decryption.
    pub open_decrypt: Duration,
    /// State saves (each an encrypted write plus fsyncs).
    pub saves: u64,
    /// Time spent saving.
    pub save_time: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("device", &self.state.device_id())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random_id() -> EnvelopeId {
    EnvelopeId(rand::random())
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |error| ClientError::Io {
        path: path.to_owned(),
        error,
    }
}

fn check_handle(handle: &str) -> Result<(), ClientError> {
    Handle::parse(handle)
        .map(|_| ())
        .map_err(|e| ClientError::InvalidHandle(handle.to_owned(), e.to_string()))
}

/// Creates the state directory (owner-only) and takes its lock.
fn lock_dir(dir: &Path) -> Result<File, ClientError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(ClientError::Locked(dir.to_owned())),
        Err(fs::TryLockError::Error(e)) => Err(ClientError::Io { path, error: e }),
    }
}

fn cached(list: &DeviceList) -> CachedList {
    CachedList {
        version: list.version,
        devices: list
            .devices
            .iter()
            .map(|(id, keys)| (*id, ByteBuf::from(keys.to_bytes().to_vec())))
            .collect(),
        master_key: ByteBuf::from(list.master_key.to_vec()),
        fetched_ms: now_ms(),
    }
}

fn uncached(user: &str, c: &CachedList) -> Option<DeviceList> {
    Some(DeviceList {
        user: user.to_owned(),
        version: c.version,
        devices: c
            .devices
            .iter()
            .map(|(id, keys)| PublicDeviceKeys::from_bytes(keys).ok().map(|k| (*id, k)))
            .collect::<Option<_>>()?,
        master_key: c.master_key.as_slice().try_into().ok()?,
    })
}

impl Client {
    // ----------------------------------------------------------------------------------------
    // Setup

    fn assemble(
        api: Api,
        dir: &Path,
        key: LocalKey,
        lock: File,
        state: ClientState,
        record: Record,
    ) -> Self {
        Self {
            api,
            dir: dir.to_owned(),
            key,
            _lock: lock,
            state,
            record,
            conn: None,
            sealed: None,
            inbox: VecDeque::new(),
            events: VecDeque::new(),
            linking: None,
            list_max_age: Duration::from_secs(60),
            held_retry: Duration::from_secs(30),
            next_held_retry: Instant::now(),
            reconnects: 0,
            stats: Stats::default(),
        }
    }

    /// Creates a new account `handle` on the broker at `server` with this as its first device,
    /// and keeps its state in `state_dir` (which must not hold an account yet).
    pub async fn register(
        server: &str,
        handle: &str,
        state_dir: &Path,
        registration_token: Option<&str>,
    ) -> Result<Self, ClientError> {
        check_handle(handle)?;
        let lock = lock_dir(state_dir)?;
        let key_path = state_dir.join(KEY_FILE);
        if key_path.exists() {
            return Err(ClientError::AlreadyRegistered(state_dir.to_owned()));
        }
        let api = Api::new(server)?;
        let master = MasterKey::generate();
        let mut device = DeviceKeys::generate();
        device.generate_one_time_keys(ONE_TIME_KEYS);
        let public = device.public_keys();
        let creds = api
            .register(handle, &public.to_bytes(), registration_token)
            .await?;
        let key = LocalKey::create_file(&key_path)?;
        let state = ClientState::new(handle.to_owned(), creds.device, master, device);
        let mut delivery_token = Zeroizing::new([0u8; DELIVERY_TOKEN_BYTES]);
        rand::rngs::OsRng.fill_bytes(delivery_token.as_mut());
        let record = Record {
            server: api.base().to_owned(),
            device_token: Secret::new(&creds.token),
            delivery_token: Secret::new(delivery_token.as_ref()),
            ..Record::default()
        };
        let mut client = Self::assemble(api, state_dir, key, lock, state, record);
        client.save()?;
        client.upload_new_keys().await?;
        let list = DeviceList {
            user: handle.to_owned(),
            version: 1,
            devices: vec![(creds.device, public)],
            master_key: client.state.master_key.public_key(),
        };
        client.publish_own_list(&list).await?;
        client
            .api
            .put_delivery_token(&client.creds(), Some(delivery_token.as_ref()), false)
            .await?;
        client.save()?;
        Ok(client)
    }

    /// Opens the account kept in `state_dir`.
    pub async fn open(state_dir: &Path) -> Result<Self, ClientError> {
        let key_path = state_dir.join(KEY_FILE);
        if !key_path.exists() {
            return Err(ClientError::NotRegistered(state_dir.to_owned()));
        }
        let lock = lock_dir(state_dir)?;
        let key = LocalKey::read_file(&key_path)?;
        let state = ClientState::load(&state_dir.join(STATE_FILE), &key)?
            .ok_or_else(|| ClientError::NotRegistered(state_dir.to_owned()))?;
        let record = Record::decode(&state.app_data).ok_or(StoreError::Malformed)?;
        let api = Api::new(&record.server)?;
        Ok(Self::assemble(api, state_dir, key, lock, state, record))
    }

    /// Links a new device to the existing account `handle`, with the code an existing device
    /// showed ([`Client::create_link_code`]), and waits (at most `wait`) until an existing
    /// device has accepted it. An existing device must be running [`Client::next_event`].
    pub async fn link(
        server: &str,
        handle: &str,
        code: &str,
        state_dir: &Path,
        wait: Duration,
    ) -> Result<Self, ClientError> {
        check_handle(handle)?;
        let (broker_code, secret) = code
            .trim()
            .rsplit_once('.')
            .ok_or(ClientError::BadLinkCode)?;
        let secret = URL_SAFE_NO_PAD
            .decode(secret)
            .ok()
            .and_then(|s| <[u8; LINK_SECRET_BYTES]>::try_from(s.as_slice()).ok())
            .map(Zeroizing::new)
            .ok_or(ClientError::BadLinkCode)?;
        let lock = lock_dir(state_dir)?;
        let key_path = state_dir.join(KEY_FILE);
        let state_path = state_dir.join(STATE_FILE);
        if state_path.exists() {
            return Err(ClientError::AlreadyRegistered(state_dir.to_owned()));
        }
        let api = Api::new(server)?;
        let mut device = DeviceKeys::generate();
        device.generate_one_time_keys(ONE_TIME_KEYS);
        let public = device.public_keys();
        let creds = api
            .add_device_with_code(handle, &public.to_bytes(), broker_code)
            .await?;
        // A key file left by an earlier attempt that never completed is reused.
        let key = if key_path.exists() {
            LocalKey::read_file(&key_path)?
        } else {
            LocalKey::create_file(&key_path)?
        };
        // The master key is replaced by the grant; this one is never used.
        let state = ClientState::new(
            handle.to_owned(),
            creds.device,
            MasterKey::generate(),
            device,
        );
        let record = Record {
            server: api.base().to_owned(),
            device_token: Secret::new(&creds.token),
            ..Record::default()
        };
        let mut client = Self::assemble(api, state_dir, key, lock, state, record);
        client.upload_new_keys().await?;
        // Trust on first use of our own master key, confirmed by the grant's proof.
        let list = client.verified_list(handle, true).await?;
        let own = creds.device;
        let proof = link_proof(
            secret.as_ref(),
            b"request",
            handle,
            own,
            &[&public.to_bytes()],
        );
        client.linking = Some(Linking {
            secret,
            done: false,
        });
        let keys = public.to_bytes().to_vec();
        let devices: Vec<u32> = list.devices.iter().map(|(d, _)| *d).collect();
        client
            .send_payloads(handle, Route::Authenticated, devices, &|_| {
                Payload::LinkRequest {
                    keys: keys.clone(),
                    proof,
                }
            })
            .await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let event = tokio::time::timeout_at(deadline, client.next_event())
                .await
                .map_err(|_| ClientError::Timeout("an existing device to accept the link"))??;
            if matches!(event, Event::Linked) {
                break;
            }
        }
        client.linking = None;
        Ok(client)
    }

    /// Sets how long a fetched device list is used before it is fetched again when sending
    /// (default 60 s; zero fetches it for every send). A stale list is also refreshed
    /// whenever the broker says the device set changed.
    pub fn set_device_list_max_age(&mut self, age: Duration) {
        self.list_max_age = age;
    }

    /// Sets how often held envelopes ([`Event::Held`]) are tried again (default 30 s, at
    /// least 10 ms); they are also tried after every backlog.
    pub fn set_held_retry(&mut self, every: Duration) {
        self.held_retry = every.max(Duration::from_millis(10));
        self.next_held_retry = Instant::now() + self.held_retry;
    }

    /// This account's handle.
    pub fn handle(&self) -> &str {
        self.state.user()
    }

    /// This device's id.
    pub fn device_id(&self) -> u32 {
        self.state.device_id()
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// The broker's base URL.
    pub fn server(&self) -> &str {
        self.api.base()
    }

    /// The HTTP API client (public endpoints; useful for tools and tests).
    pub fn api(&self) -> &Api {
        &self.api
    }

    fn creds(&self) -> DeviceCreds {
        DeviceCreds {
            handle: self.state.user().to_owned(),
            device: self.state.device_id(),
            token: self.record.device_token.0.clone(),
        }
    }

    fn save(&mut self) -> Result<(), ClientError> {
        let started = Instant::now();
        self.state.app_data = self.record.encode();
        self.state.save(&self.dir.join(STATE_FILE), &self.key)?;
        self.stats.saves += 1;
        self.stats.save_time += started.elapsed();
        Ok(())
    }

    /// Cumulative cost of this client's cryptographic work and state saves since it was
    /// opened (for benchmarks).
    pub fn stats(&self) -> Stats {
        self.stats
    }

    // ----------------------------------------------------------------------------------------
    // Keys and device lists

    /// Uploads keys generated but not yet published, then marks them published.
    async fn upload_new_keys(&mut self) -> Result<u64, ClientError> {
        let unpublished = self.state.device.unpublished_keys();
        if unpublished.one_time.is_empty() && unpublished.fallback.is_none() {
            return Ok(0);
        }
        let mut next = self.record.next_key_id;
        let mut take_id = || {
            next += 1;
            next
        };
        let one_time: Vec<(u64, Vec<u8>)> = unpublished
            .one_time
            .iter()
            .map(|k| (take_id(), k.to_bytes().to_vec()))
            .collect();
        let fallback = unpublished
            .fallback
            .map(|k| (take_id(), k.to_bytes().to_vec()));
        self.record.next_key_id = next;
        let count = self
            .api
            .upload_keys(&self.creds(), &one_time, fallback.as_ref())
            .await?;
        self.state.device.mark_keys_as_published();
        self.save()?;
        Ok(count)
    }

    /// Tops the published one-time keys up to [`ONE_TIME_KEYS`] (and publishes a fallback key
    /// if the directory has none). Returns how many one-time keys the directory holds.
    pub async fn replenish_keys(&mut self) -> Result<u64, ClientError> {
        let (count, fallback) = self.api.key_count(&self.creds()).await?;
        let have = usize::try_from(count).unwrap_or(usize::MAX);
        if have >= ONE_TIME_KEYS && fallback {
            return Ok(count);
        }
        if have < ONE_TIME_KEYS {
            self.state
                .device
                .generate_one_time_keys(ONE_TIME_KEYS - have);
        }
        if !fallback {
            self.state.device.rotate_fallback_key();
        }
        self.upload_new_keys().await
    }

    /// How many one-time keys the directory holds for this device, and whether it has a
    /// fallback key.
    pub async fn published_key_count(&self) -> Result<(u64, bool), ClientError> {
        Ok(self.api.key_count(&self.creds()).await?)
    }

    /// Signs and publishes our own list, and records it as seen.
    async fn publish_own_list(&mut self, list: &DeviceList) -> Result<(), ClientError> {
        let signed = self.sign_own_list(list, &self.state.master_key)?;
        self.api
            .put_device_list(&self.creds(), &signed.to_bytes())
            .await?;
        self.adopt_own_list(&signed)
    }

    fn sign_own_list(
        &self,
        list: &DeviceList,
        key: &MasterKey,
    ) -> Result<SignedDeviceList, ClientError> {
        list.sign(key).map_err(|error| ClientError::DeviceList {
            user: self.state.user().to_owned(),
            error,
        })
    }

    /// Records our own list, once published, as seen (pinning its version) and saves.
    fn adopt_own_list(&mut self, signed: &SignedDeviceList) -> Result<(), ClientError> {
        let user = self.state.user().to_owned();
        let verified = self
            .state
            .pins
            .verify_device_list(&user, signed)
            .map_err(|error| ClientError::DeviceList {
                user: user.clone(),
                error,
            })?;
        self.record.lists.insert(user, cached(&verified));
        self.save()
    }

    /// The verified device list of `user`: the cached one if fresh (and `force` is false),
    /// else fetched, verified against the pin (pinning on first use) and cached.
    async fn verified_list(&mut self, user: &str, force: bool) -> Result<DeviceList, ClientError> {
        if !force
            && let Some(c) = self.record.lists.get(user)
            && now_ms().saturating_sub(c.fetched_ms)
                < u64::try_from(self.list_max_age.as_millis()).unwrap_or(u64::MAX)
            && let Some(list) = uncached(user, c)
        {
            return Ok(list);
        }
        let signed = self.fetch_signed_list(user).await?;
        let list_error = |error| ClientError::DeviceList {
            user: user.to_owned(),
            error,
        };
        let list = match self.state.pins.verify_device_list(user, &signed) {
            Ok(list) => list,
            Err(DeviceListError::MasterKeyMismatch { got, .. }) => {
                return Err(ClientError::MasterKeyChanged {
                    user: user.to_owned(),
                    new_safety_number: safety_number(
                        self.state.user(),
                        &self.state.master_key.public_key(),
                        user,
                        &got,
                    ),
                    new_master_key: got,
                });
            }
            Err(error) => return Err(list_error(error)),
        };
        // Sessions with devices that left the list are of no further use.
        if let Some(old) = self.record.lists.get(user) {
            for (id, _) in &old.devices {
                if list.device(*id).is_none() {
                    self.state.sessions.forget(user, *id);
                }
            }
        }
        self.record.lists.insert(user.to_owned(), cached(&list));
        Ok(list)
    }

    /// `user`'s signed device list as the broker has it, decoded but not yet verified.
    async fn fetch_signed_list(&self, user: &str) -> Result<SignedDeviceList, ClientError> {
        let blob = self
            .api
            .device_list(user)
            .await?
            .ok_or_else(|| ClientError::NoDeviceList(user.to_owned()))?;
        SignedDeviceList::from_bytes(&blob).map_err(|error| ClientError::DeviceList {
            user: user.to_owned(),
            error,
        })
    }

    /// Makes sure we have an Olm session with `user`'s `device`, claiming a key if needed.
    async fn ensure_session(
        &mut self,
        user: &str,
        device: u32,
        keys: &PublicDeviceKeys,
    ) -> Result<(), ClientError> {
        if self.state.sessions.has_current_session(user, device, keys) {
            return Ok(());
        }
        let creds = self.creds();
        let token = self
            .record
            .contacts
            .get(user)
            .and_then(|c| c.delivery_token.clone());
        let auth = match &token {
            Some(t) if user != self.state.user() => ClaimAuth::DeliveryToken(&t.0),
            _ => ClaimAuth::Device(&creds),
        };
        let claimed = self.api.claim_key(user, device, auth).await?;
        let bad_key = |error| ClientError::BadKey {
            user: user.to_owned(),
            device,
            error,
        };
        let key = SignedOneTimeKey::from_bytes(&claimed.key).map_err(bad_key)?;
        self.state
            .sessions
            .create_outbound(&self.state.device, user, device, keys, &key)?;
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Sending

    /// Encrypts and seals one copy per device of `devices` (the broker's current set).
    async fn build_copies(
        &mut self,
        to: &str,
        list: &DeviceList,
        devices: &[u32],
        have: &mut BTreeMap<u32, Vec<u8>>,
        payload: &(dyn Fn(u32) -> Payload + Sync),
    ) -> Result<(), ClientError> {
        let own = to == self.state.user();
        let sender = SenderInfo {
            user: self.state.user().to_owned(),
            device: self.state.device_id(),
        };
        let mut placeholders = Vec::new();
        for &device in devices {
            if have.contains_key(&device) {
                continue;
            }
            let keys = match list.device(device) {
                Some(keys) if !(own && device == sender.device) => *keys,
                _ => {
                    placeholders.push(device);
                    continue;
                }
            };
            self.ensure_session(to, device, &keys).await?;
            let started = Instant::now();
            let olm = self.state.sessions.encrypt(to, device, &payload(device))?;
            let sealed = seal(to, device, &keys.seal_x25519, &sender, now_ms(), &olm)?;
            self.stats.copies_sealed += 1;
            self.stats.encrypt_seal += started.elapsed();
            have.insert(device, sealed);
        }
        let size = have.values().next().map_or(PLACEHOLDER_BYTES, Vec::len);
        for device in placeholders {
            have.insert(device, placeholder(size));
        }
        have.retain(|d, _| devices.contains(d));
        Ok(())
    }

    /// Sends `payload(device)` to every current device of `to` as one envelope, following
    /// device-list changes. Returns the envelope id.
    async fn send_payloads(
        &mut self,
        to: &str,
        route: Route,
        devices: Vec<u32>,
        payload: &(dyn Fn(u32) -> Payload + Sync),
    ) -> Result<EnvelopeId, ClientError> {
        self.send_payloads_as(to, route, devices, payload, Delivery::DURABLE)
            .await
    }

    /// [`Client::send_payloads`] with a delivery class and time-to-live.
    async fn send_payloads_as(
        &mut self,
        to: &str,
        route: Route,
        mut devices: Vec<u32>,
        payload: &(dyn Fn(u32) -> Payload + Sync),
        delivery: Delivery,
    ) -> Result<EnvelopeId, ClientError> {
        let id = random_id();
        let own = to == self.state.user();
        if own {
            // Our own copy comes back to us: recognised by its id and acked unread.
            self.record.seen.insert(id.0);
            if !devices.contains(&self.state.device_id()) {
                devices.push(self.state.device_id());
            }
        }
        let mut list = self.verified_list(to, false).await?;
        let mut copies = BTreeMap::new();
        for _ in 0..STALE_RETRIES {
            self.build_copies(to, &list, &devices, &mut copies, payload)
                .await?;
            // The ratchets advanced: save before anything leaves this device.
            self.save()?;
            let envelope = PreparedEnvelope {
                id,
                to: to.to_owned(),
                copies: copies
                    .iter()
                    .map(|(d, c)| Copy {
                        device: DeviceId(*d),
                        ciphertext: c.clone(),
                    })
                    .collect(),
            };
            match self.transmit(&envelope, &route, delivery).await? {
                SendOutcome::Accepted { .. } => return Ok(id),
                SendOutcome::Rejected {
                    code: ErrorCode::StaleDevices,
                    current_devices,
                } => {
                    list = self.verified_list(to, true).await?;
                    devices = current_devices.iter().map(|d| d.0).collect();
                }
                SendOutcome::Rejected { code, .. } => return Err(ClientError::SendRefused(code)),
            }
        }
        Err(ClientError::DevicesUnstable(to.to_owned()))
    }

    /// Sends one envelope on its route and waits for the broker's answer, reconnecting (same
    /// envelope id, so at most once at the broker) if the connection fails.
    async fn transmit(
        &mut self,
        envelope: &PreparedEnvelope,
        route: &Route,
        delivery: Delivery,
    ) -> Result<SendOutcome, ClientError> {
        let mut last = None;
        for _ in 0..CONNECTION_RETRIES {
            let result = match route {
                Route::Sealed(token) => self.transmit_sealed(envelope, token, delivery).await,
                Route::Authenticated => self.transmit_authenticated(envelope, delivery).await,
            };
            match result {
                Ok(outcome) => return Ok(outcome),
                Err(ClientError::Conn(e)) if !e.is_device_revoked() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Conn(last.expect("at least one attempt")))
    }

    async fn transmit_sealed(
        &mut self,
        envelope: &PreparedEnvelope,
        token: &Secret,
        delivery: Delivery,
    ) -> Result<SendOutcome, ClientError> {
        let mut conn = match self.sealed.take() {
            Some(c) => c,
            None => Connection::anonymous(&self.api.ws_url("/v1/sealed")).await?,
        };
        conn.send(&ClientFrame::SealedSend {
            id: envelope.id,
            to: envelope.to.clone(),
            class: delivery.class,
            ttl_secs: delivery.ttl_secs,
            copies: envelope.copies.clone(),
            delivery_token: Some(token.0.to_vec()),
        })
        .await?;
        loop {
            match conn.next().await? {
                ServerFrame::SendResult { id, outcome } if id == envelope.id => {
                    self.sealed = Some(conn);
                    return Ok(outcome);
                }
                // Answers to earlier, abandoned sends and error notes carry nothing for us.
                _ => {}
            }
        }
    }

    async fn transmit_authenticated(
        &mut self,
        envelope: &PreparedEnvelope,
        delivery: Delivery,
    ) -> Result<SendOutcome, ClientError> {
        let mut conn = self.take_conn().await?;
        let sent = conn
            .send(&ClientFrame::Send {
                id: envelope.id,
                to: envelope.to.clone(),
                class: delivery.class,
                ttl_secs: delivery.ttl_secs,
                copies: envelope.copies.clone(),
            })
            .await;
        if let Err(e) = sent {
            self.on_conn_lost();
            return Err(e.into());
        }
        loop {
            match conn.next().await {
                Ok(ServerFrame::SendResult { id, outcome }) if id == envelope.id => {
                    self.conn = Some(conn);
                    return Ok(outcome);
                }
                Ok(ServerFrame::SendResult { .. }) => {}
                Ok(frame) => self.inbox.push_back(frame),
                Err(e) => {
                    self.on_conn_lost();
                    return Err(e.into());
                }
            }
        }
    }

    /// The authenticated connection, opened if needed (taken out; put it back when done).
    async fn take_conn(&mut self) -> Result<Connection, ClientError> {
        if let Some(conn) = self.conn.take() {
            return Ok(conn);
        }
        match Connection::authenticated(&self.api.ws_url("/v1/ws"), &self.creds()).await {
            Ok((conn, _)) => Ok(conn),
            Err(e) if e.is_device_revoked() => Err(ClientError::DeviceRevoked),
            Err(e) => Err(e.into()),
        }
    }

    /// A connection ended: whatever it delivered and we did not ack comes again on the next.
    fn on_conn_lost(&mut self) {
        self.conn = None;
        self.inbox
            .retain(|f| !matches!(f, ServerFrame::Deliver { .. }));
    }

    /// The route to `to`: sealed if we hold its delivery token.
    fn route_to(&self, to: &str) -> Route {
        let token = if to == self.state.user() {
            Some(self.record.delivery_token.clone()).filter(|t| !t.0.is_empty())
        } else {
            self.record
                .contacts
                .get(to)
                .and_then(|c| c.delivery_token.clone())
        };
        token.map_or(Route::Authenticated, Route::Sealed)
    }

    /// Whether this device holds `to`'s delivery token, i.e. whether messages to `to` travel
    /// sealed over the anonymous connection (otherwise the first one goes authenticated).
    pub fn sends_sealed_to(&self, to: &str) -> bool {
        matches!(self.route_to(to), Route::Sealed(_))
    }

    /// Sends a text message to `to` (and a transcript to this account's other devices).
    pub async fn send_text(&mut self, to: &str, text: &str) -> Result<EnvelopeId, ClientError> {
        check_handle(to)?;
        if to == self.state.user() {
            return Err(ClientError::Invalid(
                "sending to your own account is not supported".into(),
            ));
        }
        let devices = self.share_token_once(to).await?;
        let sent_ms = now_ms();
        self.record.add_message(
            to,
            StoredMessage {
                outgoing: true,
                device: self.state.device_id(),
                time_ms: sent_ms,
                body: text.to_owned(),
            },
        );
        let body = text.to_owned();
        let id = match self
            .send_payloads(to, self.route_to(to), devices, &|_| Payload::Text {
                body: body.clone(),
            })
            .await
        {
            Ok(id) => id,
            Err(e) => {
                // Not sent: take it out of the conversation again.
                if let Some(c) = self.record.contacts.get_mut(to) {
                    c.messages.pop_back();
                }
                self.save()?;
                return Err(e);
            }
        };
        self.send_transcript(to, text).await?;
        Ok(id)
    }

    /// Sends `to` this account's delivery token before the first thing we send it (so its
    /// replies travel sealed); returns `to`'s devices in its verified list.
    async fn share_token_once(&mut self, to: &str) -> Result<Vec<u32>, ClientError> {
        let list = self.verified_list(to, false).await?;
        let devices: Vec<u32> = list.devices.iter().map(|(d, _)| *d).collect();
        let first_contact = !self.record.contacts.get(to).is_some_and(|c| c.token_shared);
        if first_contact {
            let token = self.record.delivery_token.0.clone();
            self.send_payloads(to, self.route_to(to), devices.clone(), &|_| {
                Payload::DeliveryToken {
                    token: token.clone(),
                }
            })
            .await?;
            self.record
                .contacts
                .entry(to.to_owned())
                .or_default()
                .token_shared = true;
        }
        Ok(devices)
    }

    // ----------------------------------------------------------------------------------------
    // Calls

    /// Sends call signaling to every device of `to` (urgent class, [`CALL_TTL_SECS`]): an
    /// offer rings all of them. `payload` must be a call kind ([`Payload::CallOffer`],
    /// [`Payload::CallAnswer`], [`Payload::IceCandidate`], [`Payload::HangUp`],
    /// [`Payload::Busy`], [`Payload::Decline`]); to answer or decline use
    /// [`Client::answer_call`] / [`Client::decline_call`], which also stop this account's
    /// other devices ringing.
    ///
    /// Media keys are bound to identities by the DTLS fingerprint inside offers and answers:
    /// check the fingerprint of the DTLS connection against the one in the peer's
    /// [`Event::Call`] (it comes from a device in the peer's verified list).
    pub async fn send_call_signal(
        &mut self,
        to: &str,
        payload: Payload,
    ) -> Result<EnvelopeId, ClientError> {
        check_handle(to)?;
        if to == self.state.user() {
            return Err(ClientError::Invalid(
                "calling your own account is not supported".into(),
            ));
        }
        if !matches!(
            payload,
            Payload::CallOffer { .. }
                | Payload::CallAnswer { .. }
                | Payload::IceCandidate { .. }
                | Payload::HangUp { .. }
                | Payload::Busy { .. }
                | Payload::Decline { .. }
        ) {
            return Err(ClientError::Invalid("not a call signaling payload".into()));
        }
        let devices = self.share_token_once(to).await?;
        self.send_payloads_as(
            to,
            self.route_to(to),
            devices,
            &|_| payload.clone(),
            Delivery::CALL,
        )
        .await
    }

    /// Answers `caller`'s call on this device: sends the answer, and tells this account's
    /// other devices ([`Payload::AnsweredElsewhere`]) so they stop ringing.
    pub async fn answer_call(
        &mut self,
        caller: &str,
        call_id: CallId,
        sdp: String,
        dtls_fingerprint: String,
    ) -> Result<EnvelopeId, ClientError> {
        let id = self
            .send_call_signal(
                caller,
                Payload::CallAnswer {
                    call_id,
                    sdp,
                    dtls_fingerprint,
                },
            )
            .await?;
        self.stop_ringing_elsewhere(call_id).await?;
        Ok(id)
    }

    /// Declines `caller`'s call and stops this account's other devices ringing.
    pub async fn decline_call(
        &mut self,
        caller: &str,
        call_id: CallId,
    ) -> Result<EnvelopeId, ClientError> {
        let id = self
            .send_call_signal(caller, Payload::Decline { call_id })
            .await?;
        self.stop_ringing_elsewhere(call_id).await?;
        Ok(id)
    }

    async fn stop_ringing_elsewhere(&mut self, call_id: CallId) -> Result<(), ClientError> {
        let own = self.state.user().to_owned();
        let list = self.verified_list(&own, false).await?;
        let me = self.state.device_id();
        if list.devices.iter().all(|(d, _)| *d == me) {
            return Ok(());
        }
        let devices = list.devices.iter().map(|(d, _)| *d).collect();
        self.send_payloads_as(
            &own,
            self.route_to(&own),
            devices,
            &|_| Payload::AnsweredElsewhere {
                call_id,
                device: me,
            },
            Delivery::CALL,
        )
        .await?;
        Ok(())
    }

    /// Sends our other devices a transcript of a message we sent.
    async fn send_transcript(&mut self, to: &str, text: &str) -> Result<(), ClientError> {
        let own = self.state.user().to_owned();
        let list = self.verified_list(&own, false).await?;
        let me = self.state.device_id();
        if list.devices.iter().all(|(d, _)| *d == me) {
            return Ok(());
        }
        let devices = list.devices.iter().map(|(d, _)| *d).collect();
        let (to, body) = (to.to_owned(), text.to_owned());
        self.send_payloads(&own, self.route_to(&own), devices, &|_| Payload::Sent {
            to: to.clone(),
            body: body.clone(),
        })
        .await?;
        Ok(())
    }

    /// Encrypts and seals a text for every device of `to` in its verified list without
    /// sending it (for tools that keep an outbox, and for tests that need to see or alter
    /// envelopes). The ratchets advance and are saved. Send it with
    /// [`Client::send_prepared`].
    pub async fn prepare_text(
        &mut self,
        to: &str,
        text: &str,
    ) -> Result<PreparedEnvelope, ClientError> {
        check_handle(to)?;
        let list = self.verified_list(to, false).await?;
        let devices: Vec<u32> = list.devices.iter().map(|(d, _)| *d).collect();
        let mut copies = BTreeMap::new();
        let body = text.to_owned();
        self.build_copies(to, &list, &devices, &mut copies, &|_| Payload::Text {
            body: body.clone(),
        })
        .await?;
        self.save()?;
        Ok(PreparedEnvelope {
            id: random_id(),
            to: to.to_owned(),
            copies: copies
                .into_iter()
                .map(|(d, c)| Copy {
                    device: DeviceId(d),
                    ciphertext: c,
                })
                .collect(),
        })
    }

    /// Sends a prepared envelope exactly as it is (sealed if we hold the recipient's delivery
    /// token, else authenticated) and returns the broker's answer.
    pub async fn send_prepared(
        &mut self,
        envelope: &PreparedEnvelope,
    ) -> Result<SendOutcome, ClientError> {
        let route = self.route_to(&envelope.to);
        self.transmit(envelope, &route, Delivery::DURABLE).await
    }

    // ----------------------------------------------------------------------------------------
    // Receiving

    /// Waits for the next event: messages, rejections, links, notices. Reconnects when the
    /// connection drops.
    ///
    /// Not cancel-safe: a call abandoned midway (by `select!` or a timeout) may have decrypted
    /// envelopes without saving or acknowledging them; use the client no further after that
    /// (drop it and [`Client::open`] again, which resumes from the last save).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let frame = match self.inbox.pop_front() {
                Some(frame) => frame,
                None => {
                    // With envelopes held, wait for a frame only until their next try is due
                    // (a deadline: a busy connection must not put it off).
                    let due = (!self.record.held.is_empty()).then_some(self.next_held_retry);
                    match self.read_frame(due).await? {
                        Some(frame) => frame,
                        None => {
                            self.retry_held().await?;
                            continue;
                        }
                    }
                }
            };
            self.reconnects = 0;
            self.handle_frames(frame).await?;
        }
    }

    /// The next frame; `None` if none came before `due` (when given).
    async fn read_frame(
        &mut self,
        due: Option<Instant>,
    ) -> Result<Option<ServerFrame>, ClientError> {
        loop {
            let mut conn = self.take_conn().await?;
            let next = match due {
                // `Connection::next` is cancel-safe: nothing is lost when the wait runs out.
                Some(due) => match tokio::time::timeout_at(due.into(), conn.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.conn = Some(conn);
                        return Ok(None);
                    }
                },
                None => conn.next().await,
            };
            match next {
                Ok(frame) => {
                    self.conn = Some(conn);
                    return Ok(Some(frame));
                }
                Err(e) if e.is_device_revoked() => {
                    self.on_conn_lost();
                    return Err(ClientError::DeviceRevoked);
                }
                Err(e) => {
                    self.on_conn_lost();
                    self.reconnects += 1;
                    if self.reconnects > 3 {
                        return Err(e.into());
                    }
                    tokio::time::sleep(Duration::from_millis(100 << self.reconnects)).await;
                }
            }
        }
    }

    /// Handles `first` and whatever else has already arrived, as one batch.
    async fn handle_frames(&mut self, first: ServerFrame) -> Result<(), ClientError> {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            let next = match self.inbox.pop_front() {
                Some(frame) => frame,
                None => match self.conn.as_mut().and_then(Connection::try_next) {
                    Some(Ok(frame)) => frame,
                    Some(Err(_)) => {
                        self.on_conn_lost();
                        break;
                    }
                    None => break,
                },
            };
            batch.push(next);
        }
        let mut acks = Vec::new();
        // Ratchets moved without an ack to save for (ephemeral envelopes).
        let mut dirty = false;
        let mut retry_held = false;
        let mut result = Ok(());
        for frame in batch {
            if result.is_err() {
                // After a transient failure, the rest comes again on the next connection.
                continue;
            }
            match frame {
                ServerFrame::Deliver { seq, envelope } => {
                    match self
                        .handle_envelope(envelope.id, &envelope.ciphertext, false)
                        .await
                    {
                        Ok(()) => acks.push(seq),
                        Err(e) => result = Err(e),
                    }
                }
                ServerFrame::DeliverEphemeral { envelope } => {
                    // Nothing to ack; errors are reported like for stored envelopes.
                    match self
                        .handle_envelope(envelope.id, &envelope.ciphertext, true)
                        .await
                    {
                        Ok(()) => dirty = true,
                        Err(e) => result = Err(e),
                    }
                }
                ServerFrame::QueueEmpty => {
                    // The backlog is handled: time to try the held envelopes again (after
                    // this batch is acknowledged: a retry may take a while).
                    retry_held = true;
                    self.events.push_back(Event::QueueEmpty);
                }
                ServerFrame::Notice { notice, .. } => match notice {
                    Notice::KeysLow => {
                        if let Err(e) = self.replenish_keys().await {
                            result = Err(e);
                        }
                    }
                    Notice::MailboxFull => self.events.push_back(Event::MailboxFull),
                },
                // Answers to sends are consumed where they are awaited; errors about acks are
                // of no use to the application.
                _ => {}
            }
        }
        if !acks.is_empty() || dirty {
            // Save before acknowledging: a crash now redelivers, and the ids deduplicate. An
            // ephemeral envelope is not acknowledged, but decrypting it moved the ratchet.
            self.save()?;
            for chunk in acks.chunks(MAX_ACKS_PER_FRAME) {
                if let Some(conn) = self.conn.as_mut()
                    && conn
                        .send(&ClientFrame::Ack {
                            seqs: chunk.to_vec(),
                        })
                        .await
                        .is_err()
                {
                    self.on_conn_lost();
                }
            }
        }
        if result.is_err() {
            self.on_conn_lost();
        } else if retry_held {
            self.retry_held().await?;
        }
        result
    }

    /// Tries the held envelopes again now, saves what that changed, and schedules the next
    /// try.
    async fn retry_held(&mut self) -> Result<(), ClientError> {
        self.next_held_retry = Instant::now() + self.held_retry;
        if self.read_held(None).await {
            self.save()?;
        }
        Ok(())
    }

    /// Handles one envelope. `Ok` means: handled (events pushed, possibly a rejection) and to
    /// be acked; `Err` means a transient failure: do not ack.
    async fn handle_envelope(
        &mut self,
        id: EnvelopeId,
        ciphertext: &[u8],
        ephemeral: bool,
    ) -> Result<(), ClientError> {
        if self.record.seen.contains(&id.0) {
            return Ok(());
        }
        match self.open_envelope(ciphertext).await {
            Ok(events) => self.push_events(id, events),
            Err(Failure::Transient(e)) => return Err(e),
            // An ephemeral envelope (call signaling) is stale long before it could be read.
            Err(Failure::Hold { user, error, .. }) if ephemeral => {
                let error = EnvelopeError::SenderUnverified { user, error };
                self.events.push_back(Event::Rejected { id, error });
            }
            Err(Failure::Hold { user, why, .. }) => {
                if self.record.hold(&user, id.0, ciphertext) {
                    self.events.push_back(Event::Held { id, user, why });
                } else {
                    let error = EnvelopeError::HoldDropped { user };
                    self.events.push_back(Event::Rejected { id, error });
                }
            }
            Err(Failure::Permanent(error)) => self.events.push_back(Event::Rejected { id, error }),
        }
        self.record.seen.insert(id.0);
        Ok(())
    }

    fn push_events(&mut self, id: EnvelopeId, events: Vec<Event>) {
        self.events.extend(events.into_iter().map(|mut e| {
            if let Event::Message(m) = &mut e {
                m.id = id;
            }
            e
        }));
    }

    /// Tries the held envelopes again (of `only`, or of every sender), each sender's in
    /// order: the first that still cannot be read keeps its place and the rest stay behind
    /// it. Returns whether any was read (or rejected), i.e. whether there is state to save.
    async fn read_held(&mut self, only: Option<&str>) -> bool {
        let mut senders: Vec<String> = Vec::new();
        for held in &self.record.held {
            if only.is_none_or(|u| u == held.from) && !senders.contains(&held.from) {
                senders.push(held.from.clone());
            }
        }
        let mut progress = false;
        // A domain found unreachable is not asked again in this pass: one slow lookup per
        // domain, however many of its senders are held.
        let mut unreachable: Vec<String> = Vec::new();
        let domain = |user: &str| user.rsplit_once('@').map_or("", |(_, d)| d).to_owned();
        for sender in senders {
            if unreachable.contains(&domain(&sender)) {
                continue;
            }
            let mut queue = self.record.take_held(&sender).into_iter();
            while let Some(held) = queue.next() {
                let id = EnvelopeId(held.id);
                match self.open_envelope(&held.ciphertext).await {
                    Ok(events) => self.push_events(id, events),
                    Err(Failure::Permanent(error)) => {
                        self.events.push_back(Event::Rejected { id, error });
                    }
                    Err(failure @ (Failure::Hold { .. } | Failure::Transient(_))) => {
                        if let Failure::Hold {
                            why: HoldReason::SenderUnavailable,
                            ..
                        } = failure
                        {
                            unreachable.push(domain(&sender));
                        }
                        self.record.put_back(std::iter::once(held).chain(queue));
                        break;
                    }
                }
                progress = true;
            }
        }
        progress
    }

    async fn open_envelope(&mut self, ciphertext: &[u8]) -> Result<Vec<Event>, Failure> {
        let own_user = self.state.user().to_owned();
        let started = Instant::now();
        let unsealed = open(
            &own_user,
            self.state.device_id(),
            self.state.device.seal_secret(),
            ciphertext,
        )
        .map_err(|e| Failure::Permanent(EnvelopeError::Unseal(e)))?;
        let crypto_time = started.elapsed();
        let (user, device) = (unsealed.sender.user.clone(), unsealed.sender.device);
        if user == own_user && device == self.state.device_id() {
            return Err(Failure::Permanent(EnvelopeError::Session {
                user,
                device,
                error: SessionError::ForgedSender,
            }));
        }
        if self.record.holds_from(&user) {
            return Err(Failure::Hold {
                user,
                why: HoldReason::Behind,
                error: Box::new(ClientError::Invalid(
                    "earlier envelopes from this sender are held".into(),
                )),
            });
        }
        let was_pinned = self.state.pins.pinned(&user).is_some();
        let opened = self.verify_and_decrypt(unsealed, crypto_time).await;
        if !was_pinned && matches!(opened, Err(Failure::Permanent(_))) {
            // The claimed sender was pinned for this envelope only, and it did not
            // authenticate: forget the pin and the list, so that mere claims cannot grow the
            // state (nor pin a key before the contact ever writes).
            self.state.pins.forget(&user);
            self.record.lists.remove(&user);
        }
        opened
    }

    /// Verifies the claimed sender against its device list and decrypts.
    async fn verify_and_decrypt(
        &mut self,
        unsealed: crate::crypto::Unsealed,
        mut crypto_time: Duration,
    ) -> Result<Vec<Event>, Failure> {
        let own_user = self.state.user().to_owned();
        let sender = unsealed.sender;
        let (user, device) = (sender.user.clone(), sender.device);
        let session_error = |error| {
            Failure::Permanent(EnvelopeError::Session {
                user: user.clone(),
                device,
                error,
            })
        };
        let keys = match self.sender_keys(&user, device).await? {
            Some(keys) => keys,
            None if user == own_user => {
                // Possibly a device being linked: only a link request is accepted this way.
                return self
                    .open_link_request(&sender, unsealed.olm_message, unsealed.timestamp_ms)
                    .await;
            }
            None => {
                return Err(Failure::Permanent(EnvelopeError::UnknownSenderDevice {
                    user,
                    device,
                }));
            }
        };
        let started = Instant::now();
        let payload = self
            .state
            .sessions
            .decrypt(
                &mut self.state.device,
                &sender,
                &keys,
                &unsealed.olm_message,
            )
            .map_err(session_error)?;
        crypto_time += started.elapsed();
        self.stats.envelopes_opened += 1;
        self.stats.open_decrypt += crypto_time;
        self.apply(&sender, unsealed.timestamp_ms, payload).await
    }

    /// The verified keys of a sender's device; refetches the list once if the device is not
    /// in the cached one.
    async fn sender_keys(
        &mut self,
        user: &str,
        device: u32,
    ) -> Result<Option<PublicDeviceKeys>, Failure> {
        for force in [false, true] {
            let list = match self.verified_list(user, force).await {
                Ok(list) => list,
                Err(e @ ClientError::Store(_)) => return Err(Failure::Transient(e)),
                // A broker (ours, or the sender's behind it) that cannot answer now: kept
                // and read later, without holding up everyone else's envelopes behind it.
                Err(ClientError::Api(e)) if e.is_transient() => {
                    return Err(Failure::Hold {
                        user: user.to_owned(),
                        why: HoldReason::SenderUnavailable,
                        error: Box::new(e.into()),
                    });
                }
                Err(error @ ClientError::MasterKeyChanged { .. }) => {
                    return Err(Failure::Hold {
                        user: user.to_owned(),
                        why: HoldReason::KeyChanged,
                        error: Box::new(error),
                    });
                }
                Err(e) => {
                    return Err(Failure::Permanent(EnvelopeError::SenderUnverified {
                        user: user.to_owned(),
                        error: Box::new(e),
                    }));
                }
            };
            if let Some(keys) = list.device(device) {
                return Ok(Some(*keys));
            }
        }
        Ok(None)
    }

    /// Applies an authentic payload.
    async fn apply(
        &mut self,
        sender: &SenderInfo,
        sent_ms: u64,
        payload: Payload,
    ) -> Result<Vec<Event>, Failure> {
        let own = sender.user == self.state.user();
        let unexpected = |kind| {
            Failure::Permanent(EnvelopeError::Unexpected {
                kind,
                user: sender.user.clone(),
            })
        };
        match payload {
            Payload::Text { body } if !own => {
                self.record.add_message(
                    &sender.user,
                    StoredMessage {
                        outgoing: false,
                        device: sender.device,
                        time_ms: sent_ms,
                        body: body.clone(),
                    },
                );
                Ok(vec![Event::Message(ReceivedMessage {
                    id: EnvelopeId([0; 16]),
                    from: sender.user.clone(),
                    device: sender.device,
                    sent_ms,
                    text: body,
                })])
            }
            Payload::DeliveryToken { token } if !own => {
                self.record
                    .contacts
                    .entry(sender.user.clone())
                    .or_default()
                    .delivery_token = Some(Secret(token));
                Ok(Vec::new())
            }
            Payload::Sent { to, body } if own => {
                self.record.add_message(
                    &to,
                    StoredMessage {
                        outgoing: true,
                        device: sender.device,
                        time_ms: sent_ms,
                        body: body.clone(),
                    },
                );
                Ok(vec![Event::SentElsewhere {
                    to,
                    device: sender.device,
                    text: body,
                    sent_ms,
                }])
            }
            Payload::DeviceLinked { device } if own => {
                // Refetched on next use (the message is decrypted: no transient failure here).
                self.record.lists.remove(&sender.user);
                Ok(vec![Event::DeviceLinked { device }])
            }
            Payload::LinkGrant {
                master_key,
                delivery_token,
                contacts,
                proof,
            } if own => self.accept_grant(master_key, delivery_token, contacts, proof),
            Payload::AnsweredElsewhere { .. } if own => Ok(vec![Event::Call(CallSignal {
                from: sender.user.clone(),
                device: sender.device,
                sent_ms,
                payload,
            })]),
            Payload::CallOffer { .. }
            | Payload::CallAnswer { .. }
            | Payload::IceCandidate { .. }
            | Payload::HangUp { .. }
            | Payload::Busy { .. }
            | Payload::Decline { .. }
                if !own =>
            {
                Ok(vec![Event::Call(CallSignal {
                    from: sender.user.clone(),
                    device: sender.device,
                    sent_ms,
                    payload,
                })])
            }
            Payload::AnsweredElsewhere { .. } => {
                Err(unexpected("answered-elsewhere from another account"))
            }
            Payload::CallOffer { .. }
            | Payload::CallAnswer { .. }
            | Payload::IceCandidate { .. }
            | Payload::HangUp { .. }
            | Payload::Busy { .. }
            | Payload::Decline { .. } => Err(unexpected("call signaling from our own account")),
            Payload::Text { .. } => Err(unexpected("text from our own account")),
            Payload::DeliveryToken { .. } => Err(unexpected("delivery token from our own account")),
            Payload::Sent { .. } => Err(unexpected("sent transcript from another account")),
            Payload::DeviceLinked { .. } => Err(unexpected("device notice from another account")),
            Payload::LinkGrant { .. } => Err(unexpected("link grant from another account")),
            Payload::LinkRequest { .. } => Err(unexpected("link request from a listed device")),
        }
    }

    // ----------------------------------------------------------------------------------------
    // Linking

    /// Creates a link code for a new device (valid 10 minutes, single use). Show it to the
    /// user; then keep [`Client::next_event`] running until [`Event::DeviceLinked`].
    pub async fn create_link_code(&mut self) -> Result<LinkCode, ClientError> {
        let issued = self.api.new_link_code(&self.creds()).await?;
        let mut secret = Zeroizing::new([0u8; LINK_SECRET_BYTES]);
        rand::rngs::OsRng.fill_bytes(secret.as_mut());
        let now = now_ms();
        self.record.pending_links.retain(|p| p.expires_ms > now);
        self.record.pending_links.push(PendingLink {
            secret: Secret::new(secret.as_ref()),
            expires_ms: issued.expires_ms,
        });
        self.save()?;
        Ok(LinkCode {
            code: Zeroizing::new(format!(
                "{}.{}",
                issued.code.as_str(),
                URL_SAFE_NO_PAD.encode(secret.as_ref())
            )),
            expires_ms: issued.expires_ms,
        })
    }

    /// A message from a device of our account that the signed list does not vouch for: only
    /// a link request with a valid proof is accepted.
    async fn open_link_request(
        &mut self,
        sender: &SenderInfo,
        olm: crate::crypto::OlmMessage,
        _sent_ms: u64,
    ) -> Result<Vec<Event>, Failure> {
        let user = sender.user.clone();
        let device = sender.device;
        let unknown = || {
            Failure::Permanent(EnvelopeError::UnknownSenderDevice {
                user: user.clone(),
                device,
            })
        };
        let now = now_ms();
        if !self.record.pending_links.iter().any(|p| p.expires_ms > now) {
            return Err(unknown());
        }
        let broker_keys = match self.api.devices(&user).await {
            Ok(devices) => devices,
            Err(e) if e.is_transient() => return Err(Failure::Transient(e.into())),
            Err(_) => return Err(unknown()),
        };
        let Some(keys) = broker_keys
            .iter()
            .find(|d| d.device == device)
            .and_then(|d| PublicDeviceKeys::from_bytes(&d.identity_keys).ok())
        else {
            return Err(unknown());
        };
        let payload = match self
            .state
            .sessions
            .decrypt(&mut self.state.device, sender, &keys, &olm)
        {
            Ok(p) => p,
            Err(error) => {
                return Err(Failure::Permanent(EnvelopeError::Session {
                    user,
                    device,
                    error,
                }));
            }
        };
        let Payload::LinkRequest {
            keys: claimed,
            proof,
        } = payload
        else {
            self.state.sessions.forget(&user, device);
            return Err(unknown());
        };
        let key_bytes = keys.to_bytes();
        let matching = self.record.pending_links.iter().position(|p| {
            p.expires_ms > now
                && claimed == key_bytes
                && blake3::Hash::from(proof)
                    == blake3::Hash::from(link_proof(
                        &p.secret.0,
                        b"request",
                        &user,
                        device,
                        &[&key_bytes],
                    ))
        });
        let Some(index) = matching else {
            self.state.sessions.forget(&user, device);
            return Err(Failure::Permanent(EnvelopeError::BadLinkProof));
        };
        let pending = self.record.pending_links.remove(index);
        // The request is decrypted (its session advanced), so a failure from here on cannot be
        // retried by redelivery: it is reported, and the user links again.
        self.approve_link(device, keys, &pending.secret.0)
            .await
            .map_err(|e| Failure::Permanent(EnvelopeError::LinkFailed(Box::new(e))))?;
        Ok(vec![Event::DeviceLinked { device }])
    }

    /// Adds `device` to the signed list and sends it the grant.
    async fn approve_link(
        &mut self,
        device: u32,
        keys: PublicDeviceKeys,
        secret: &[u8],
    ) -> Result<(), ClientError> {
        let own = self.state.user().to_owned();
        let mut list = self.verified_list(&own, true).await?;
        if list.device(device).is_none() {
            list.devices.push((device, keys));
            list.devices.sort_by_key(|(d, _)| *d);
            list.version += 1;
            self.publish_own_list(&list).await?;
        }
        let master_public = self.state.master_key.public_key();
        let proof = link_proof(
            secret,
            b"grant",
            &own,
            device,
            &[&keys.to_bytes(), &master_public],
        );
        let master_key = self.state.master_key.to_bytes();
        let delivery_token = self.record.delivery_token.0.clone();
        let contacts: Vec<GrantContact> = self
            .record
            .contacts
            .iter()
            .filter_map(|(handle, c)| {
                Some(GrantContact {
                    handle: handle.clone(),
                    master_key: self.state.pins.pinned(handle)?,
                    delivery_token: c.delivery_token.as_ref().map(|t| t.0.clone()),
                    verified: c.verified,
                })
            })
            .collect();
        let devices = list.devices.iter().map(|(d, _)| *d).collect();
        self.send_payloads(&own, self.route_to(&own), devices, &|d| {
            if d == device {
                Payload::LinkGrant {
                    master_key: master_key.clone(),
                    delivery_token: delivery_token.clone(),
                    contacts: contacts.clone(),
                    proof,
                }
            } else {
                Payload::DeviceLinked { device }
            }
        })
        .await?;
        Ok(())
    }

    /// On the new device: checks and applies the grant.
    fn accept_grant(
        &mut self,
        master_key: Zeroizing<[u8; 32]>,
        delivery_token: Zeroizing<Vec<u8>>,
        contacts: Vec<GrantContact>,
        proof: [u8; 32],
    ) -> Result<Vec<Event>, Failure> {
        let own = self.state.user().to_owned();
        let me = self.state.device_id();
        let Some(linking) = self.linking.as_mut().filter(|l| !l.done) else {
            return Err(Failure::Permanent(EnvelopeError::Unexpected {
                kind: "link grant (this device is not being linked)",
                user: own,
            }));
        };
        let master = MasterKey::from_bytes(&master_key);
        let master_public = master.public_key();
        let keys = self.state.device.public_keys().to_bytes();
        let expected = link_proof(
            linking.secret.as_ref(),
            b"grant",
            &own,
            me,
            &[&keys, &master_public],
        );
        let pinned = self.state.pins.pinned(&own);
        if blake3::Hash::from(proof) != blake3::Hash::from(expected)
            || pinned != Some(master_public)
        {
            return Err(Failure::Permanent(EnvelopeError::BadLinkProof));
        }
        linking.done = true;
        self.state.master_key = master;
        self.record.delivery_token = Secret(delivery_token);
        for c in contacts {
            // The grant comes from our own account: it overrides anything pinned meanwhile.
            if let PinResult::Changed { .. } = self.state.pins.check(&c.handle, &c.master_key) {
                self.state.pins.accept_change(&c.handle, &c.master_key);
                self.record.lists.remove(&c.handle);
            }
            let contact = self.record.contacts.entry(c.handle).or_default();
            contact.delivery_token = c.delivery_token.map(Secret);
            contact.verified = c.verified;
        }
        // Our list is refetched on next use: it now lists this device.
        self.record.lists.remove(&own);
        Ok(vec![Event::Linked])
    }

    // ----------------------------------------------------------------------------------------
    // Devices, contacts, safety numbers

    /// This account's devices: the signed list, plus devices the broker has that the list
    /// does not vouch for.
    pub async fn devices(&mut self) -> Result<Vec<DeviceInfo>, ClientError> {
        let own = self.state.user().to_owned();
        let list = self.verified_list(&own, true).await?;
        self.save()?;
        let me = self.state.device_id();
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut out: Vec<DeviceInfo> = list
            .devices
            .iter()
            .map(|(d, keys)| DeviceInfo {
                device: *d,
                this_device: *d == me,
                signed: true,
                fingerprint: hex(&keys.ed25519),
            })
            .collect();
        let signed: BTreeSet<u32> = out.iter().map(|d| d.device).collect();
        for d in self.api.devices(&own).await? {
            if !signed.contains(&d.device) {
                out.push(DeviceInfo {
                    device: d.device,
                    this_device: d.device == me,
                    signed: false,
                    fingerprint: PublicDeviceKeys::from_bytes(&d.identity_keys)
                        .map_or_else(|_| "?".into(), |k| hex(&k.ed25519)),
                });
            }
        }
        out.sort_by_key(|d| d.device);
        Ok(out)
    }

    /// Removes another device of this account: drops it from the signed list (so contacts
    /// stop encrypting to it), then deletes it at the broker (its queue is deleted and its
    /// connection closed).
    pub async fn remove_device(&mut self, device: u32) -> Result<(), ClientError> {
        if device == self.state.device_id() {
            return Err(ClientError::Invalid(
                "a device cannot remove itself; remove it from another device".into(),
            ));
        }
        let own = self.state.user().to_owned();
        let mut list = self.verified_list(&own, true).await?;
        if list.device(device).is_some() {
            list.devices.retain(|(d, _)| *d != device);
            list.version += 1;
            self.publish_own_list(&list).await?;
        }
        match self.api.remove_device(&self.creds(), device).await {
            Ok(()) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
        self.state.sessions.forget(&own, device);
        self.save()
    }

    /// The safety number with `with` (fetching and pinning its master key on first use).
    pub async fn safety_number(&mut self, with: &str) -> Result<SafetyNumber, ClientError> {
        check_handle(with)?;
        let list = self.verified_list(with, false).await?;
        self.save()?;
        Ok(safety_number(
            self.state.user(),
            &self.state.master_key.public_key(),
            with,
            &list.master_key,
        ))
    }

    /// Records that the user compared the safety number with `with` and it matched.
    pub async fn mark_verified(&mut self, with: &str) -> Result<SafetyNumber, ClientError> {
        let number = self.safety_number(with).await?;
        self.record
            .contacts
            .entry(with.to_owned())
            .or_default()
            .verified = true;
        self.save()?;
        Ok(number)
    }

    /// Whether the user verified `with`.
    pub fn is_verified(&self, with: &str) -> bool {
        self.record.contacts.get(with).is_some_and(|c| c.verified)
    }

    /// Accepts `with`'s new master key after [`ClientError::MasterKeyChanged`] (only once the
    /// user compared the new safety number). The contact is no longer marked verified.
    pub async fn accept_master_key_change(
        &mut self,
        with: &str,
        new_master_key: &[u8; 32],
    ) -> Result<SafetyNumber, ClientError> {
        self.state.pins.accept_change(with, new_master_key);
        self.record.lists.remove(with);
        if let Some(c) = self.record.contacts.get_mut(with) {
            c.verified = false;
        }
        // Sessions stay: each is bound to a device identity key and is used only with a device
        // the verified list (now under the new key) gives that key. Dropping them would make
        // the contact's next messages on them undecryptable.
        let number = self.safety_number(with).await?;
        // What arrived under the new key meanwhile is read now; its events come next.
        self.read_held(Some(with)).await;
        self.save()?;
        Ok(number)
    }

    /// The master key `with`'s current device list is signed by, checked against nothing but
    /// the list's own signature, and the safety number it gives — for showing the user a
    /// changed key before [`Client::accept_master_key_change`].
    pub async fn fetch_master_key(
        &mut self,
        with: &str,
    ) -> Result<([u8; 32], SafetyNumber), ClientError> {
        check_handle(with)?;
        let list = self
            .fetch_signed_list(with)
            .await?
            .verify(with, None, None)
            .map_err(|error| ClientError::DeviceList {
                user: with.to_owned(),
                error,
            })?;
        let number = safety_number(
            self.state.user(),
            &self.state.master_key.public_key(),
            with,
            &list.master_key,
        );
        Ok((list.master_key, number))
    }

    /// Replaces this account's master key (after a suspected compromise): signs a new device
    /// list with a new key. Contacts see [`ClientError::MasterKeyChanged`] until they accept
    /// it. Only for single-device accounts: other devices would not learn the new key.
    pub async fn rotate_master_key(&mut self) -> Result<(), ClientError> {
        let own = self.state.user().to_owned();
        let list = self.verified_list(&own, true).await?;
        if list.devices.len() > 1 {
            return Err(ClientError::Invalid(
                "remove the other devices before rotating the master key".into(),
            ));
        }
        let master = MasterKey::generate();
        let new_list = DeviceList {
            user: own.clone(),
            version: 1,
            devices: list.devices,
            master_key: master.public_key(),
        };
        let signed = self.sign_own_list(&new_list, &master)?;
        // Published before this device switches to it: if the broker refuses, nothing has
        // changed here and the old key still signs the account's list.
        if let Err(e) = self
            .api
            .put_device_list(&self.creds(), &signed.to_bytes())
            .await
        {
            // Unless the broker stored it and only its answer was lost: then switch all the
            // same, or no device would hold the key the published list names.
            match self.fetch_signed_list(&own).await {
                Ok(published) if published.to_bytes() == signed.to_bytes() => {}
                _ => return Err(e.into()),
            }
        }
        self.state.master_key = master;
        self.state.pins.accept_change(&own, &new_list.master_key);
        self.adopt_own_list(&signed)
    }

    /// Conversations, most recent first.
    pub fn conversations(&self) -> Vec<Conversation> {
        let mut out: Vec<Conversation> = self
            .record
            .contacts
            .iter()
            .filter(|(_, c)| !c.messages.is_empty())
            .map(|(with, c)| Conversation {
                with: with.clone(),
                verified: c.verified,
                messages: c
                    .messages
                    .iter()
                    .map(|m| ConversationMessage {
                        outgoing: m.outgoing,
                        device: m.device,
                        time_ms: m.time_ms,
                        text: m.body.clone(),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.messages.last().map_or(0, |m| m.time_ms)));
        out
    }

    /// Closes the connections politely.
    pub async fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        if let Some(conn) = self.sealed.take() {
            conn.close().await;
        }
    }
}

/// How handling one envelope failed.
enum Failure {
    /// Try again later: do not ack.
    Transient(ClientError),
    /// Not readable yet for a reason about its sender: keep it (sealed), ack it, read later.
    Hold {
        user: String,
        why: HoldReason,
        error: Box<ClientError>,
    },
    /// Never readable: report and ack.
    Permanent(EnvelopeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_proofs_bind_secret_label_device_and_keys() {
        let secret = [7u8; LINK_SECRET_BYTES];
        let keys = DeviceKeys::generate().public_keys().to_bytes();
        let proof = link_proof(&secret, b"request", "a@x.y", 2, &[&keys]);
        assert_eq!(proof, link_proof(&secret, b"request", "a@x.y", 2, &[&keys]));
        assert_ne!(
            proof,
            link_proof(&[8; 16], b"request", "a@x.y", 2, &[&keys])
        );
        assert_ne!(proof, link_proof(&secret, b"grant", "a@x.y", 2, &[&keys]));
        assert_ne!(proof, link_proof(&secret, b"request", "b@x.y", 2, &[&keys]));
        assert_ne!(proof, link_proof(&secret, b"request", "a@x.y", 3, &[&keys]));
        let other = DeviceKeys::generate().public_keys().to_bytes();
        assert_ne!(
            proof,
            link_proof(&secret, b"request", "a@x.y", 2, &[&other])
        );
        // Part boundaries are length-prefixed.
        assert_ne!(
            link_proof(&secret, b"grant", "a@x.y", 2, &[b"ab", b"c"]),
            link_proof(&secret, b"grant", "a@x.y", 2, &[b"a", b"bc"])
        );
    }

    #[test]
    fn cached_lists_round_trip() {
        let master = MasterKey::generate();
        let list = DeviceList {
            user: "a@x.y".into(),
            version: 3,
            devices: vec![
                (1, DeviceKeys::generate().public_keys()),
                (4, DeviceKeys::generate().public_keys()),
            ],
            master_key: master.public_key(),
        };
        assert_eq!(uncached("a@x.y", &cached(&list)), Some(list));
    }

    #[tokio::test]
    async fn opening_needs_an_account_and_register_checks_the_handle() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Client::open(dir.path()).await,
            Err(ClientError::NotRegistered(_))
        ));
        assert!(matches!(
            Client::register("http://127.0.0.1:1", "Not A Handle", dir.path(), None).await,
            Err(ClientError::InvalidHandle(..))
        ));
        assert!(matches!(
            Client::link(
                "http://127.0.0.1:1",
                "a@x.y",
                "no-secret",
                dir.path(),
                Duration::ZERO
            )
            .await,
            Err(ClientError::BadLinkCode)
        ));
    }

    #[test]
    fn the_state_directory_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock_dir(dir.path()).expect("lock");
        assert!(matches!(lock_dir(dir.path()), Err(ClientError::Locked(_))));
        drop(held);
        lock_dir(dir.path()).expect("free again");
    }
}
