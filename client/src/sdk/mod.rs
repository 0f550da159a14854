//! The network SDK: a [`Client`] is one device of one account, with its encrypted state in a
//! directory, talking to one broker. It drives the [engine](crate::engine), which makes every
//! protocol decision; the SDK adds HTTP (reqwest), WebSockets (tokio-tungstenite), the state
//! directory and the waiting.
//!
//! # State directory
//!
//! ```text
//! state_dir/local.key      32 random bytes (owner-only): encrypts client.state
//! state_dir/client.state   ClientState (keys, ratchets, pins) + the engine's record, one file
//! state_dir/lock           held (flock) while a Client is open: one process per device
//! ```
//!
//! # Sending (`sdk/send.rs`)
//!
//! [`Client::send_text`] verifies the recipient's signed device list (trust on first use:
//! the first master key seen is pinned; a different one later is
//! [`ClientError::MasterKeyChanged`] and nothing is sent until the user accepts it with
//! [`Client::accept_master_key_change`]), shares this account's delivery token with a new
//! contact, then has the engine encrypt and seal one copy per device (claiming keys for
//! devices it has no session with) and sends one envelope per recipient account, following
//! `stale_devices` answers (see [`crate::engine::send`]). The account's own other devices get
//! a transcript ([`Payload::Sent`](crate::crypto::Payload::Sent)) in a second envelope, so every device shows the
//! conversation.
//!
//! # Receiving (`sdk/receive.rs`)
//!
//! [`Client::next_event`] reads the authenticated connection. Each delivered envelope is
//! opened by the engine (see [`crate::engine::receive`]), which asks for the claimed sender's
//! list when it needs it; then the state is saved and the envelope acked. Envelopes that
//! arrive together are handled as a batch with one save and one ack.
//!
//! An envelope that can never be read is reported as [`Event::Rejected`] and acked, so one
//! bad envelope cannot jam the queue. One that cannot be read *yet* for a reason about its
//! sender is held ([`Event::Held`]). A *transient* failure of our own (the broker's HTTP API
//! unreachable while fetching what is needed to read it) is returned as an error without
//! acking: the connection is dropped and the envelope comes again on the next connection.
//!
//! # Linking a device (`sdk/link.rs`)
//!
//! See [`crate::engine::link`] for the protocol: [`Client::create_link_code`] on an existing
//! device, [`Client::link`] on the new one, while the existing device runs
//! [`Client::next_event`].
//!
//! # Calls (`sdk/calls.rs`), devices and keys (`sdk/devices.rs`)
//!
//! # Receipts, typing, disappearing messages (`sdk/conversation.rs`)
//!
//! Delivered receipts for what [`Client::next_event`] decrypts go after each batch; read
//! receipts after [`Client::mark_read`]. [`Client::next_event`] also deletes messages whose
//! disappearing timer ran out ([`Event::Expired`]).

mod calls;
mod conversation;
mod devices;
mod files;
mod groups;
mod link;
mod push;
mod receive;
mod send;

use std::{
    collections::VecDeque,
    fs::{self, File},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sealpost_proto::ServerFrame;

pub use self::push::PushService;
use crate::{
    api::{Api, DeviceCreds},
    conn::Connection,
    crypto::LocalKey,
    engine::{Engine, NewDevice, check_handle},
};
pub use crate::{
    engine::{
        CALL_TTL_SECS, CallSignal, Conversation, ConversationMessage, DeviceInfo, Event,
        HoldReason, LinkCode, MessageState, ONE_TIME_KEYS, PreparedEnvelope, ReceivedMessage,
    },
    error::{ClientError, EnvelopeError},
};

const KEY_FILE: &str = "local.key";
const STATE_FILE: &str = "client.state";
const LOCK_FILE: &str = "lock";

/// One device of one account. See the module doc.
pub struct Client {
    /// The authenticated channel's HTTP client: what concerns this account (its own list and
    /// keys, its credentials, first-contact key claims).
    api: Api,
    /// The anonymous channel's HTTP client, its own connection pool, never given a credential
    /// of this account: contacts' lists and key claims with their delivery tokens (see
    /// [`crate::engine::schedule`]).
    anon: Api,
    dir: PathBuf,
    key: LocalKey,
    _lock: File,
    engine: Engine,
    conn: Option<Connection>,
    sealed: Option<Connection>,
    /// Frames read from `conn` while waiting for something else.
    inbox: VecDeque<ServerFrame>,
    events: VecDeque<Event>,
    /// While envelopes are held, how often they are tried again.
    held_retry: Duration,
    /// How long a log root may go without an auditor's co-signature before the log counts as
    /// unverified ([`Client::log_status`]).
    audit_grace: Duration,
    /// When they are tried next.
    next_held_retry: Instant,
    /// Consecutive reconnects without a frame in between.
    reconnects: u32,
    /// When this account's own list is fetched next (authenticated channel): at each new
    /// connection and then periodically.
    own_list_due: Instant,
    stats: Stats,
    /// Accounts that asked to leave a group (group, account): this device commits their
    /// removal if it is the group's remover, outside the receive batch that saw the request.
    leaves: Vec<(String, String)>,
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
            .field("device", &self.engine.device_id())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |error| ClientError::Io {
        path: path.to_owned(),
        error,
    }
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

impl Client {
    fn assemble(
        api: Api,
        dir: &Path,
        key: LocalKey,
        lock: File,
        engine: Engine,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            anon: Api::new(api.base())?,
            api,
            dir: dir.to_owned(),
            key,
            _lock: lock,
            engine,
            conn: None,
            sealed: None,
            inbox: VecDeque::new(),
            events: VecDeque::new(),
            held_retry: Duration::from_secs(30),
            audit_grace: Duration::from_secs(10 * 60),
            next_held_retry: Instant::now(),
            reconnects: 0,
            own_list_due: Instant::now(),
            stats: Stats::default(),
            leaves: Vec::new(),
        })
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
        let device = NewDevice::generate();
        let creds = api
            .register(handle, &device.identity_keys(), registration_token)
            .await?;
        let key = LocalKey::create_file(&key_path)?;
        let engine = device.register(handle, creds.device, &creds.token, api.base());
        let mut client = Self::assemble(api, state_dir, key, lock, engine)?;
        client.save()?;
        client.upload_new_keys().await?;
        client.publish_key_packages().await?;
        let list = client.engine.first_own_list()?;
        client.publish_own_list(&list).await?;
        client
            .api
            .put_delivery_token(&client.creds(), Some(client.engine.delivery_token()), false)
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
        let engine = Engine::load_file(&state_dir.join(STATE_FILE), &key)?
            .ok_or_else(|| ClientError::NotRegistered(state_dir.to_owned()))?;
        let api = Api::new(engine.server())?;
        Self::assemble(api, state_dir, key, lock, engine)
    }

    /// Reads the saved state again, keeping this process's hold on the state directory: after
    /// an error that may have left unsaved progress in memory (a call abandoned midway), what
    /// was not saved comes again from the broker. Unlike dropping the client and opening it
    /// again, no other process can take the directory in between. Settings made with the
    /// `set_*` methods are those of a fresh [`Client::open`].
    pub fn reopen(self) -> Result<Self, ClientError> {
        let Self {
            api,
            dir,
            key,
            _lock: lock,
            ..
        } = self;
        let engine = Engine::load_file(&dir.join(STATE_FILE), &key)?
            .ok_or_else(|| ClientError::NotRegistered(dir.clone()))?;
        Self::assemble(api, &dir, key, lock, engine)
    }

    /// Sets how long a fetched device list is used before it is fetched again when sending
    /// (default 60 s; zero fetches it for every send). A stale list is also refreshed
    /// whenever the broker says the device set changed.
    pub fn set_device_list_max_age(&mut self, age: Duration) {
        self.engine
            .set_list_max_age_ms(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    }

    /// Sets how long a transcript of a sent text waits before it goes to this account's other
    /// devices: a random delay between `min` and `max` (default 1 to 5 s), so that it does not
    /// travel in the same burst as the sealed send (see [`crate::engine::schedule`]).
    pub fn set_transcript_delay(&mut self, min: Duration, max: Duration) {
        let mut timing = self.engine.timing();
        timing.transcript_delay_ms = (millis(min), millis(max));
        self.engine.set_timing(timing);
    }

    /// Sets how often contacts' device lists are refreshed (`every` on average, default one
    /// hour) and, while an envelope is held for a list, the random delay the refresh is
    /// brought forward to (between `held_min` and `held_max`, default 5 to 60 s).
    pub fn set_list_refresh(&mut self, every: Duration, held_min: Duration, held_max: Duration) {
        let mut timing = self.engine.timing();
        timing.list_refresh_ms = millis(every);
        timing.held_refresh_ms = (millis(held_min), millis(held_max));
        self.engine.set_timing(timing);
    }

    /// Sets how often held envelopes ([`Event::Held`]) are tried again (default 30 s, at
    /// least 10 ms); they are also tried after every backlog.
    pub fn set_held_retry(&mut self, every: Duration) {
        self.held_retry = every.max(Duration::from_millis(10));
        self.next_held_retry = Instant::now() + self.held_retry;
    }

    /// Sets how long a key-transparency root may go without an auditor's co-signature before
    /// its log counts as unverified (default 10 minutes; brokers audit their peers every 10 s).
    pub fn set_audit_grace(&mut self, grace: Duration) {
        self.audit_grace = grace;
    }

    /// How far `user`'s domain's key-transparency log is verified by auditors, as this device
    /// has seen it.
    pub fn log_status(&self, user: &str) -> crate::crypto::transparency::LogStatus {
        let grace = u64::try_from(self.audit_grace.as_millis()).unwrap_or(u64::MAX);
        self.engine.log_status(user, now_ms(), grace)
    }

    /// This account's handle.
    pub fn handle(&self) -> &str {
        self.engine.user()
    }

    /// This device's id.
    pub fn device_id(&self) -> u32 {
        self.engine.device_id()
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

    /// This device's auth token, for tests that check it appears nowhere it should not (a
    /// memory dump of the broker). Keep it secret.
    #[doc(hidden)]
    pub fn device_token_for_tests(&self) -> &[u8] {
        self.engine.device_token()
    }

    fn creds(&self) -> DeviceCreds {
        DeviceCreds {
            handle: self.engine.user().to_owned(),
            device: self.engine.device_id(),
            token: self.engine.device_token().clone(),
        }
    }

    fn save(&mut self) -> Result<(), ClientError> {
        let started = Instant::now();
        self.engine
            .save_file(&self.dir.join(STATE_FILE), &self.key)?;
        self.stats.saves += 1;
        self.stats.save_time += started.elapsed();
        Ok(())
    }

    /// Cumulative cost of this client's cryptographic work and state saves since it was
    /// opened (for benchmarks).
    pub fn stats(&self) -> Stats {
        let counters = self.engine.counters();
        Stats {
            copies_sealed: counters.copies_sealed,
            envelopes_opened: counters.envelopes_opened,
            ..self.stats
        }
    }

    /// Conversations, most recent first.
    pub fn conversations(&self) -> Vec<Conversation> {
        self.engine.conversations()
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

#[cfg(test)]
mod tests {
    use super::*;

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
