//! Configuration: defaults ← TOML file ← `SEALPOST_*` environment variables ← flags.
//!
//! Every key is declared once, in the [`settings!`] table below, which generates both the
//! TOML-facing [`Settings`] (with defaults) and the flags of `sealpost serve` (each with its
//! environment variable), so `sealpost serve --help` documents every key.
//!
//! [`Settings::into_config`] then checks every value and parses it, once, into the typed
//! settings each layer owns ([`server::Config`]). Nothing but `main` imports this module: the
//! layers know their own settings types, not this table.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::{
    federation::{PeerSettings, parse_peers},
    gateway::{
        self,
        client_ip::TrustedProxies,
        settings::{Rates, TurnSettings},
        turn,
    },
    mailbox::MailboxConfig,
    push::PushSettings,
    server,
    server::{Backend, NatsSettings},
    store::StoreOptions,
    transparency::LogSettings,
};
pub use crate::{gateway::Registration, server::CpuPolicy, telemetry::LogFormat};

macro_rules! settings {
    ($($(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, $env:literal;)*) => {
        /// Validated broker settings. See `sealpost serve --help` for each key.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Settings {
            $($(#[doc = $doc])* pub $name: $ty,)*
        }

        impl Default for Settings {
            fn default() -> Self {
                Settings { $($name: $default,)* }
            }
        }

        /// Flags of `sealpost serve`. Each overrides the same key of the config file and is
        /// itself overridden by nothing; each can also be given as an environment variable.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct ServeArgs {
            /// TOML config file; its keys are the flag names with `_` for `-`.
            #[arg(long, env = "SEALPOST_CONFIG")]
            pub config: Option<PathBuf>,
            // `hide_env_values`: `--help` never prints a secret set in the environment.
            $($(#[doc = $doc])* #[arg(long, env = $env, hide_env_values = true)] pub $name: Option<$ty>,)*
        }

        impl ServeArgs {
            fn apply(self, s: &mut Settings) {
                $(if let Some(v) = self.$name { s.$name = v; })*
            }
        }

        impl Settings {
            /// Each key's flag id with its default, as `sealpost serve --help` shows it.
            fn defaults_for_help() -> Vec<(&'static str, String)> {
                let d = Settings::default();
                vec![$((stringify!($name), ShowDefault::show(&d.$name)),)*]
            }
        }
    };
}

/// Adds `[default: …]` to the help of every flag of `sealpost serve` in `cli` (the command
/// that has `serve` as a subcommand). The flags themselves stay without a clap default: a
/// clap default would override the config file, whose keys rank below flags.
pub fn document_defaults(cli: clap::Command) -> clap::Command {
    cli.mut_subcommand("serve", |mut serve| {
        for (id, default) in Settings::defaults_for_help() {
            serve = serve.mut_arg(id, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                let long = arg.get_long_help().map(ToString::to_string);
                let arg = arg.help(format!("{help} [default: {default}]"));
                match long {
                    Some(long) => arg.long_help(format!("{long}\n\n[default: {default}]")),
                    None => arg,
                }
            });
        }
        serve
    })
}

/// How a setting's default reads in `--help`.
trait ShowDefault {
    fn show(&self) -> String;
}

impl ShowDefault for String {
    fn show(&self) -> String {
        if self.is_empty() {
            "\"\" (unset)".into()
        } else {
            self.clone()
        }
    }
}

impl ShowDefault for PathBuf {
    fn show(&self) -> String {
        if self.as_os_str().is_empty() {
            "\"\" (unset)".into()
        } else {
            self.display().to_string()
        }
    }
}

macro_rules! show_by_display {
    ($($ty:ty),*) => {$(
        impl ShowDefault for $ty {
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
show_by_display!(SocketAddr, bool, u32, u64, usize);

macro_rules! show_by_value_name {
    ($($ty:ty),*) => {$(
        impl ShowDefault for $ty {
            fn show(&self) -> String {
                clap::ValueEnum::to_possible_value(self)
                    .map(|v| v.get_name().to_owned())
                    .unwrap_or_default()
            }
        }
    )*};
}
show_by_value_name!(Registration, LogFormat, CpuPolicy);

settings! {
    /// Address to listen on (HTTP API, WebSocket, health and metrics).
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)), "SEALPOST_LISTEN";
    /// Data directory (embedded sled store and the server secret).
    data_dir: PathBuf = PathBuf::from("sealpost-data"), "SEALPOST_DATA_DIR";
    /// The store: `sled` (embedded, in data_dir) or NATS JetStream server URLs for scale-out
    /// (`nats://a:4222,nats://b:4222`): many broker pods then serve one domain. `memory` keeps
    /// everything in this process and loses it on exit: for benchmarks only.
    store: String = "sled".into(), "SEALPOST_STORE";
    /// With the NATS store: inbox streams (each has one leader; more spread the writes).
    nats_partitions: u32 = 4, "SEALPOST_NATS_PARTITIONS";
    /// With the NATS store: replicas of every stream and bucket (1 only for a single server).
    nats_replicas: usize = 3, "SEALPOST_NATS_REPLICAS";
    /// With the NATS store: how long one request to NATS may take, ms.
    nats_timeout_ms: u64 = 5_000, "SEALPOST_NATS_TIMEOUT_MS";
    /// This pod's name (empty: the host name); with the NATS store its outboxes carry it.
    pod_name: String = String::new(), "SEALPOST_POD_NAME";
    /// Directory of server.key and federation.key (empty: the data directory). Every pod of
    /// a scale-out deployment must have the same two files (`sealpost keygen DIR`).
    key_dir: PathBuf = PathBuf::new(), "SEALPOST_KEY_DIR";
    /// Domain whose accounts this broker serves.
    domain: String = "localhost".into(), "SEALPOST_DOMAIN";
    /// Account creation: open, platform (token signed by platform_public_key) or closed.
    registration: Registration = Registration::Open, "SEALPOST_REGISTRATION";
    /// Ed25519 public key (base64) of the host platform, for registration = platform.
    platform_public_key: String = String::new(), "SEALPOST_PLATFORM_PUBLIC_KEY";
    /// HTTP worker threads (0 = one per core).
    workers: usize = 0, "SEALPOST_WORKERS";
    /// Threads running mailbox actors (0 = one per core).
    mailbox_threads: usize = 0, "SEALPOST_MAILBOX_THREADS";
    /// CPU scheduling of the broker's threads: batch (Linux SCHED_BATCH: a thread that wakes
    /// does not preempt the one running, so work crosses threads in batches) or normal.
    cpu_policy: CpuPolicy = CpuPolicy::Batch, "SEALPOST_CPU_POLICY";
    /// Log format: text or json.
    log_format: LogFormat = LogFormat::Text, "SEALPOST_LOG_FORMAT";
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "sealpost=debug".
    log_level: String = "info".into(), "SEALPOST_LOG_LEVEL";
    /// Share one flush among concurrent appends (group commit).
    group_commit: bool = true, "SEALPOST_GROUP_COMMIT";
    /// fsync the data file on every commit (sled's own flush is only sync_file_range).
    fsync: bool = true, "SEALPOST_FSYNC";
    /// Under load (more than 4,000 sends a second), microseconds a flush lingers for more
    /// appends to join it; below that rate a flush starts at once. 0: never linger.
    commit_delay_us: u64 = 1000, "SEALPOST_COMMIT_DELAY_US";
    /// Free disk space, in MiB, below which new envelopes and accounts are refused
    /// (store_unavailable) instead of risking a full disk.
    min_free_disk_mb: u64 = 256, "SEALPOST_MIN_FREE_DISK_MB";
    /// sled page cache, in MiB.
    cache_mb: u64 = 256, "SEALPOST_CACHE_MB";
    /// Oldest, in seconds, a queue's storage key may grow: then the envelopes still queued
    /// are re-sealed under a new key and the old one is destroyed, so that acknowledged
    /// envelopes of a queue that never drains do not stay readable on disk.
    store_key_max_age_secs: u64 = 3600, "SEALPOST_STORE_KEY_MAX_AGE_SECS";
    /// Most envelopes one device queue may hold; further sends get mailbox_full.
    queue_quota: u64 = 50_000, "SEALPOST_QUEUE_QUOTA";
    /// Most ciphertext bytes one device queue may hold.
    queue_quota_bytes: u64 = 256 * 1024 * 1024, "SEALPOST_QUEUE_QUOTA_BYTES";
    /// Unacknowledged deliveries in flight per connected device.
    delivery_window: usize = 256, "SEALPOST_DELIVERY_WINDOW";
    /// Sends one connection may have awaiting their results.
    max_pending_sends: usize = 64, "SEALPOST_MAX_PENDING_SENDS";
    /// Interval of WebSocket pings, ms.
    heartbeat_ms: u64 = 15_000, "SEALPOST_HEARTBEAT_MS";
    /// A connection silent this long (no frame, no pong) is closed, ms.
    client_timeout_ms: u64 = 45_000, "SEALPOST_CLIENT_TIMEOUT_MS";
    /// Time a new connection has to authenticate, ms.
    auth_timeout_ms: u64 = 10_000, "SEALPOST_AUTH_TIMEOUT_MS";
    /// A device that leaves a full window unacknowledged this long is a slow consumer and is
    /// disconnected, ms.
    ack_timeout_ms: u64 = 60_000, "SEALPOST_ACK_TIMEOUT_MS";
    /// A mailbox actor with no connected device stops after this long without traffic, ms.
    mailbox_idle_ms: u64 = 60_000, "SEALPOST_MAILBOX_IDLE_MS";
    /// Interval of the expiry sweep, ms.
    expiry_sweep_ms: u64 = 10_000, "SEALPOST_EXPIRY_SWEEP_MS";
    /// How long a send id is remembered for deduplication (a retry within it is answered
    /// as a duplicate), s. The embedded store keeps these ids in memory while a user's
    /// mailbox is open (about 45 bytes a send).
    dedup_secs: u64 = 24 * 3600, "SEALPOST_DEDUP_SECS";
    /// Sessions close over this window on shutdown, with random jitter, ms.
    shutdown_drain_ms: u64 = 2_000, "SEALPOST_SHUTDOWN_DRAIN_MS";
    /// Frames per second one device may send (0 = unlimited).
    device_rate: u32 = 200, "SEALPOST_DEVICE_RATE";
    /// Burst of frames above device_rate.
    device_burst: u32 = 400, "SEALPOST_DEVICE_BURST";
    /// HTTP requests and new connections per second from one IP, an IPv6 client counted per
    /// /64 (0 = unlimited).
    ip_rate: u32 = 50, "SEALPOST_IP_RATE";
    /// Burst above ip_rate.
    ip_burst: u32 = 200, "SEALPOST_IP_BURST";
    /// Reverse proxies whose X-Forwarded-For names the client, comma-separated addresses or
    /// CIDR ranges (e.g. 127.0.0.1 for nginx on this host). Per-IP limits and the loopback
    /// check of admin endpoints then apply to the client's address; empty: to the TCP peer.
    trusted_proxies: String = String::new(), "SEALPOST_TRUSTED_PROXIES";
    /// Sealed sends without a delivery token, and anonymous key claims, per second from one IP
    /// (an IPv6 /64) (0 = unlimited).
    stranger_rate: u32 = 5, "SEALPOST_STRANGER_RATE";
    /// Key claims per second for one target device (0 = unlimited).
    claim_rate: u32 = 5, "SEALPOST_CLAIM_RATE";
    /// Commits per second for one group at its hub, bursts of four times that (0 = unlimited).
    commit_rate: u32 = 5, "SEALPOST_COMMIT_RATE";
    /// Attachments one account may start per minute (0 = unlimited).
    blob_rate_per_min: u32 = 60, "SEALPOST_BLOB_RATE_PER_MIN";
    /// Largest attachment, MiB.
    blob_max_mb: u64 = 100, "SEALPOST_BLOB_MAX_MB";
    /// Attachments one account may hold at once (unexpired, whole or not), MiB.
    blob_quota_mb: u64 = 2048, "SEALPOST_BLOB_QUOTA_MB";
    /// How long an attachment is kept after it is started, s (then deleted, read or not).
    blob_ttl_secs: u64 = 30 * 24 * 3600, "SEALPOST_BLOB_TTL_SECS";
    /// Rate-limit violations after which a connection is closed.
    max_violations: u32 = 50, "SEALPOST_MAX_VIOLATIONS";
    /// Most concurrent connections per HTTP worker.
    max_connections: usize = 50_000, "SEALPOST_MAX_CONNECTIONS";
    /// WebSocket connections not authenticated yet (/v1/ws before auth, /v1/federation before
    /// its handshake) from one IP (an IPv6 /64); more are refused with 429 (0 = unlimited, e.g.
    /// for a load generator on one address).
    max_unauthenticated_per_ip: usize = 64, "SEALPOST_MAX_UNAUTHENTICATED_PER_IP";
    /// WebSocket connections not authenticated yet, in total; more are refused with 503
    /// (0 = unlimited).
    max_unauthenticated: usize = 4_096, "SEALPOST_MAX_UNAUTHENTICATED";
    /// Memory, in MiB, that all WebSocket connections together may hold in partly received
    /// messages; a connection that would need more is closed with try_again_later (1013).
    socket_buffer_mb: u64 = 256, "SEALPOST_SOCKET_BUFFER_MB";
    /// Memory, in MiB, that copies of group messages on their way to mailboxes may hold (a
    /// group send's fan-out here, a peer's deliveries); a fan-out past it waits for room.
    fanout_buffer_mb: u64 = 256, "SEALPOST_FANOUT_BUFFER_MB";
    /// Federation peers, comma-separated. `domain`: key and endpoint from
    /// https://domain/.well-known/sealpost/server; `domain=https://host:port`: the same from
    /// another base; `domain=wss://host/v1/federation#KEY`: pinned, KEY being the peer's X25519
    /// public key in base64 (`sealpost federation-key` prints a broker's). Sends to other
    /// domains are refused with unknown_domain, links from them refused.
    federation_peers: String = String::new(), "SEALPOST_FEDERATION_PEERS";
    /// This broker's federation endpoint as peers reach it, published at the well-known path
    /// (default: ws://LISTEN/v1/federation).
    federation_url: String = String::new(), "SEALPOST_FEDERATION_URL";
    /// Most envelopes per federation transaction.
    federation_batch: usize = 256, "SEALPOST_FEDERATION_BATCH";
    /// Federation transactions in flight per destination.
    federation_window: usize = 4, "SEALPOST_FEDERATION_WINDOW";
    /// First delay before reconnecting a federation link or retrying a transaction, ms; it
    /// doubles per failure (with jitter) up to federation_backoff_max_ms.
    federation_backoff_min_ms: u64 = 250, "SEALPOST_FEDERATION_BACKOFF_MIN_MS";
    /// Longest delay between federation attempts, ms.
    federation_backoff_max_ms: u64 = 60_000, "SEALPOST_FEDERATION_BACKOFF_MAX_MS";
    /// Federation connects, handshakes and remote lookups give up after this long, ms.
    federation_timeout_ms: u64 = 10_000, "SEALPOST_FEDERATION_TIMEOUT_MS";
    /// Pings on federation links every this many ms, both ways; an outbound link that hears
    /// nothing for three of them is dead (a frozen or partitioned peer), ms.
    federation_keepalive_ms: u64 = 2_000, "SEALPOST_FEDERATION_KEEPALIVE_MS";
    /// A send to a peer domain waits at most this long for the recipient's current devices
    /// before it is checked against the set known so far, ms.
    federation_lookup_wait_ms: u64 = 1_000, "SEALPOST_FEDERATION_LOOKUP_WAIT_MS";
    /// How long a remote user's device set, learned over the link, is trusted for
    /// stale_devices checks before it is asked again, ms.
    federation_device_cache_ms: u64 = 2_000, "SEALPOST_FEDERATION_DEVICE_CACHE_MS";
    /// Most envelopes waiting in one destination's outbox; further sends to that domain get
    /// peer_unavailable until it drains.
    federation_outbox_quota: u64 = 1_000_000, "SEALPOST_FEDERATION_OUTBOX_QUOTA";
    /// Envelopes and lookups per second accepted from one origin domain (0 = unlimited).
    federation_origin_rate: u32 = 5_000, "SEALPOST_FEDERATION_ORIGIN_RATE";
    /// Bearer token for the admin endpoints (/admin/...). Empty: they answer loopback clients
    /// only.
    admin_token: String = String::new(), "SEALPOST_ADMIN_TOKEN";
    /// TURN/STUN URLs of the coturn relay handed to clients for calls, comma-separated
    /// (e.g. "turn:turn.example.com:3478?transport=udp,turns:turn.example.com:5349"). Empty:
    /// no relay; GET /v1/accounts/{h}/turn answers 404.
    turn_urls: String = String::new(), "SEALPOST_TURN_URLS";
    /// The relay's shared secret (coturn `static-auth-secret` with `use-auth-secret`).
    /// Prefer turn_secret_file.
    turn_secret: String = String::new(), "SEALPOST_TURN_SECRET";
    /// File holding the relay's shared secret (overrides turn_secret).
    turn_secret_file: String = String::new(), "SEALPOST_TURN_SECRET_FILE";
    /// Lifetime of minted TURN credentials, s.
    turn_ttl_secs: u64 = 600, "SEALPOST_TURN_TTL_SECS";
    /// TURN credentials one device may fetch per minute (0 = unlimited).
    turn_rate_per_min: u32 = 10, "SEALPOST_TURN_RATE_PER_MIN";
    /// Directory of the browser client (web/dist) to serve at /web/, with a strict
    /// Content-Security-Policy. Empty: not served. Meant for loopback and development; in
    /// production serve the page from the TLS proxy.
    web_root: String = String::new(), "SEALPOST_WEB_ROOT";
    /// Wake devices that registered a push subscription (Web Push, UnifiedPush) when an
    /// envelope arrives while they are not connected. The wake-up carries no content.
    push: bool = true, "SEALPOST_PUSH";
    /// At most one wake-up per device in this many seconds.
    push_interval_secs: u64 = 30, "SEALPOST_PUSH_INTERVAL_SECS";
    /// At most one urgent wake-up (a ringing call) per device in this many seconds.
    push_urgent_interval_secs: u64 = 5, "SEALPOST_PUSH_URGENT_INTERVAL_SECS";
    /// The VAPID contact push services see, a mailto: or https: URL (empty:
    /// mailto:postmaster@DOMAIN).
    push_contact: String = String::new(), "SEALPOST_PUSH_CONTACT";
    /// Accept push endpoints on loopback and private networks, and over plain http (a
    /// UnifiedPush distributor on the same network; tests). Off: https on public hosts only.
    push_allow_private_endpoints: bool = false, "SEALPOST_PUSH_ALLOW_PRIVATE_ENDPOINTS";
    /// Key transparency: publish at most one epoch of the log every this many ms (none while
    /// no device list changes).
    transparency_epoch_ms: u64 = 1_000, "SEALPOST_TRANSPARENCY_EPOCH_MS";
    /// How long a device-list fetch waits for its list to be in a published epoch, ms.
    transparency_wait_ms: u64 = 5_000, "SEALPOST_TRANSPARENCY_WAIT_MS";
    /// How often this broker audits each peer's log (and co-signs what it verified), ms.
    transparency_audit_ms: u64 = 10_000, "SEALPOST_TRANSPARENCY_AUDIT_MS";
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A file a setting names could not be read.
    #[error("cannot read {key} {path}: {source}")]
    File {
        /// The key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A test-only failpoint file named by the environment variable `var`, honoured by debug
/// builds only. Deliberately not settings: operators never see them in `--help` or in the
/// list of keys a config file may hold.
///
/// - `SEALPOST_FAILPOINT_SYNC_FILE`: while the file exists every flush fails.
/// - `SEALPOST_FAILPOINT_WITHHOLD_FILE`: while it exists, the next durable envelope is
///   answered as accepted and dropped (a withholding broker), and the file removed; if the
///   file names an account, only that account's next envelope.
/// - `SEALPOST_FAILPOINT_EQUIVOCATE_FILE`: the peer domains (one a line) this broker shows a
///   forked key-transparency log (a split view), read at start.
fn failpoint_file(var: &str) -> Option<PathBuf> {
    if cfg!(debug_assertions) {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    } else {
        None
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl Settings {
    /// Resolves the settings of `sealpost serve`: defaults, then the config file, then the
    /// environment and flags (clap has already merged those two).
    pub fn load(args: ServeArgs) -> Result<Self, ConfigError> {
        let mut s = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => Settings::default(),
        };
        args.apply(&mut s);
        Ok(s)
    }

    /// Checks every value and cross-key rule, and builds each layer's typed settings.
    pub fn into_config(self) -> Result<server::Config, ConfigError> {
        if sealpost_proto::Handle::parse(&format!("x@{}", self.domain)).is_err() {
            return Err(invalid("domain", "not a lower-case DNS name"));
        }
        let platform_key = crate::crypto::parse_platform_key(&self.platform_public_key);
        if self.registration == Registration::Platform && platform_key.is_none() {
            return Err(invalid(
                "platform_public_key",
                "registration = platform needs a base64 Ed25519 public key",
            ));
        }
        if self.delivery_window == 0 || self.delivery_window > 65_536 {
            return Err(invalid("delivery_window", "must be 1..=65536"));
        }
        if self.max_pending_sends == 0 || self.max_pending_sends > 4096 {
            return Err(invalid("max_pending_sends", "must be 1..=4096"));
        }
        if self.queue_quota == 0 {
            return Err(invalid("queue_quota", "must be at least 1"));
        }
        for (key, v) in [
            ("heartbeat_ms", self.heartbeat_ms),
            ("client_timeout_ms", self.client_timeout_ms),
            ("auth_timeout_ms", self.auth_timeout_ms),
            ("ack_timeout_ms", self.ack_timeout_ms),
            ("mailbox_idle_ms", self.mailbox_idle_ms),
            ("expiry_sweep_ms", self.expiry_sweep_ms),
            ("store_key_max_age_secs", self.store_key_max_age_secs),
            ("transparency_epoch_ms", self.transparency_epoch_ms),
            ("transparency_wait_ms", self.transparency_wait_ms),
            ("transparency_audit_ms", self.transparency_audit_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be above 0"));
            }
        }
        if self.transparency_wait_ms >= self.federation_timeout_ms {
            return Err(invalid(
                "transparency_wait_ms",
                "must be below federation_timeout_ms (a peer's lookup waits for it)",
            ));
        }
        if self.client_timeout_ms <= self.heartbeat_ms {
            return Err(invalid("client_timeout_ms", "must exceed heartbeat_ms"));
        }
        let trusted_proxies = TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|m| invalid("trusted_proxies", m))?;
        let peers = parse_peers(&self.federation_peers, &self.domain)
            .map_err(|e| invalid("federation_peers", e.to_string()))?;
        let max_batch = sealpost_proto::federation::MAX_TXN_ENVELOPES;
        if self.federation_batch == 0 || self.federation_batch > max_batch {
            return Err(invalid(
                "federation_batch",
                format!("must be 1..={max_batch}"),
            ));
        }
        if self.federation_window == 0 || self.federation_window > 64 {
            return Err(invalid("federation_window", "must be 1..=64"));
        }
        if self.federation_backoff_min_ms == 0
            || self.federation_timeout_ms == 0
            || self.federation_keepalive_ms == 0
            || self.federation_lookup_wait_ms == 0
        {
            return Err(invalid(
                "federation_backoff_min_ms",
                "federation delays must be above 0",
            ));
        }
        let turn = self.turn()?;
        let backend = self.backend()?;
        if !self.push_contact.is_empty()
            && !self.push_contact.starts_with("mailto:")
            && !self.push_contact.starts_with("https://")
        {
            return Err(invalid("push_contact", "must be a mailto: or https: URL"));
        }
        if self.push_interval_secs == 0 || self.push_urgent_interval_secs == 0 {
            return Err(invalid(
                "push_interval_secs",
                "push intervals must be at least 1 s (they bound the wake-ups per device)",
            ));
        }
        let push_domain = self.domain.clone();
        let ms = Duration::from_millis;
        let mib = |n: u64| n.saturating_mul(1024 * 1024);
        Ok(server::Config {
            listen: self.listen,
            workers: self.workers,
            mailbox_threads: self.mailbox_threads,
            max_connections: self.max_connections,
            expiry_sweep: ms(self.expiry_sweep_ms),
            federation_url: (!self.federation_url.is_empty()).then_some(self.federation_url),
            key_dir: if self.key_dir.as_os_str().is_empty() {
                self.data_dir.clone()
            } else {
                self.key_dir.clone()
            },
            backend,
            store: StoreOptions {
                dir: self.data_dir.clone(),
                group_commit: self.group_commit,
                fsync: self.fsync,
                cache_bytes: mib(self.cache_mb),
                commit_delay: Duration::from_micros(self.commit_delay_us),
                min_free_bytes: mib(self.min_free_disk_mb),
                failpoint_sync: failpoint_file("SEALPOST_FAILPOINT_SYNC_FILE"),
                key_max_age: Duration::from_secs(self.store_key_max_age_secs),
            },
            mailbox: MailboxConfig {
                queue_quota: self.queue_quota,
                queue_quota_bytes: self.queue_quota_bytes,
                window: self.delivery_window,
                ack_timeout: ms(self.ack_timeout_ms),
                idle: ms(self.mailbox_idle_ms),
                dedup_secs: self.dedup_secs,
                failpoint_withhold: failpoint_file("SEALPOST_FAILPOINT_WITHHOLD_FILE"),
            },
            federation: PeerSettings {
                local_domain: self.domain.clone(),
                batch: self.federation_batch,
                max_txn_bytes: 1024 * 1024,
                window: self.federation_window,
                backoff_min: ms(self.federation_backoff_min_ms),
                backoff_max: ms(self.federation_backoff_max_ms),
                request_timeout: ms(self.federation_timeout_ms),
                device_cache: ms(self.federation_device_cache_ms),
                keepalive: ms(self.federation_keepalive_ms),
                link_timeout: ms(self.federation_keepalive_ms.saturating_mul(3)),
                idle_timeout: ms(self.client_timeout_ms),
                lookup_wait: ms(self.federation_lookup_wait_ms),
                origin_rate: self.federation_origin_rate,
                inbound_txns: self.federation_window.max(4),
                outbox_quota: self.federation_outbox_quota,
            },
            peers,
            gateway: gateway::Settings {
                domain: self.domain,
                registration: self.registration,
                platform_key,
                trusted_proxies,
                rates: Rates {
                    ip_rate: self.ip_rate,
                    ip_burst: self.ip_burst,
                    device_rate: self.device_rate,
                    device_burst: self.device_burst,
                    stranger_rate: self.stranger_rate,
                    claim_rate: self.claim_rate,
                    commit_rate: self.commit_rate,
                    blob_rate_per_min: self.blob_rate_per_min,
                },
                blobs: gateway::BlobSettings {
                    max_bytes: mib(self.blob_max_mb),
                    quota_bytes: mib(self.blob_quota_mb),
                    ttl: Duration::from_secs(self.blob_ttl_secs),
                },
                turn,
                web_root: (!self.web_root.is_empty()).then(|| self.web_root.into()),
                heartbeat: ms(self.heartbeat_ms),
                client_timeout: ms(self.client_timeout_ms),
                auth_timeout: ms(self.auth_timeout_ms),
                delivery_window: self.delivery_window,
                max_pending_sends: self.max_pending_sends,
                max_violations: self.max_violations,
                shutdown_drain: ms(self.shutdown_drain_ms),
                socket_buffer_bytes: usize::try_from(mib(self.socket_buffer_mb))
                    .unwrap_or(usize::MAX),
                fanout_buffer_bytes: usize::try_from(mib(self.fanout_buffer_mb))
                    .unwrap_or(usize::MAX)
                    .clamp(1, u32::MAX as usize),
                max_unauthenticated_per_ip: self.max_unauthenticated_per_ip,
                max_unauthenticated: self.max_unauthenticated,
                admin_token: Zeroizing::new(self.admin_token),
                push: gateway::PushDoor {
                    vapid_public_key: None,
                    allow_private_endpoints: self.push_allow_private_endpoints,
                },
            },
            push: self.push.then(|| PushSettings {
                interval: Duration::from_secs(self.push_interval_secs),
                urgent_interval: Duration::from_secs(self.push_urgent_interval_secs),
                contact: if self.push_contact.is_empty() {
                    format!("mailto:postmaster@{}", push_domain)
                } else {
                    self.push_contact.clone()
                },
                allow_private_endpoints: self.push_allow_private_endpoints,
                backoff_min: Duration::from_secs(1),
                backoff_max: Duration::from_secs(600),
                ttl: Duration::from_secs(12 * 3600),
            }),
            transparency: LogSettings {
                epoch_interval: ms(self.transparency_epoch_ms),
                wait: ms(self.transparency_wait_ms),
                equivocate_to: failpoint_file("SEALPOST_FAILPOINT_EQUIVOCATE_FILE")
                    .and_then(|path| std::fs::read_to_string(path).ok())
                    .map(|t| {
                        t.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            audit_interval: ms(self.transparency_audit_ms),
            data_dir: self.data_dir,
        })
    }

    /// Which store serves the seams.
    fn backend(&self) -> Result<Backend, ConfigError> {
        match self.store.as_str() {
            "sled" => return Ok(Backend::Sled),
            "memory" => return Ok(Backend::Memory),
            _ => {}
        }
        if !self
            .store
            .split(',')
            .all(|u| u.trim().starts_with("nats://") || u.trim().starts_with("tls://"))
        {
            return Err(invalid(
                "store",
                "must be sled, memory or NATS URLs (nats://host:4222, comma-separated)",
            ));
        }
        if self.nats_partitions == 0 || self.nats_partitions > 256 {
            return Err(invalid("nats_partitions", "must be 1..=256"));
        }
        if !matches!(self.nats_replicas, 1 | 3 | 5) {
            return Err(invalid("nats_replicas", "must be 1, 3 or 5"));
        }
        let pod = if self.pod_name.is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "broker".into())
        } else {
            self.pod_name.clone()
        };
        let pod: String = pod
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Ok(Backend::Nats(NatsSettings {
            urls: self.store.clone(),
            partitions: self.nats_partitions,
            replicas: self.nats_replicas,
            pod,
            timeout: Duration::from_millis(self.nats_timeout_ms.max(1)),
        }))
    }

    /// The call relay: URLs checked, the secret read from its file if one is named.
    fn turn(&self) -> Result<TurnSettings, ConfigError> {
        let urls = turn::parse_urls(&self.turn_urls).map_err(|m| invalid("turn_urls", m))?;
        if !urls.is_empty()
            && self.turn_secret.trim().is_empty()
            && self.turn_secret_file.is_empty()
        {
            return Err(invalid(
                "turn_secret",
                "turn_urls needs turn_secret or turn_secret_file",
            ));
        }
        if self.turn_ttl_secs < 60 || self.turn_ttl_secs > turn::MAX_TTL_SECS {
            return Err(invalid("turn_ttl_secs", "must be 60..=86400"));
        }
        let secret = if self.turn_secret_file.is_empty() {
            Zeroizing::new(self.turn_secret.trim().as_bytes().to_vec())
        } else {
            let path = PathBuf::from(&self.turn_secret_file);
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::File {
                key: "turn_secret_file",
                path,
                source,
            })?;
            let text = Zeroizing::new(text);
            Zeroizing::new(text.trim().as_bytes().to_vec())
        };
        Ok(TurnSettings {
            urls,
            secret,
            ttl_secs: self.turn_ttl_secs,
            rate_per_min: self.turn_rate_per_min,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "domain = \"a.example\"\nqueue_quota = 7\ngroup_commit = false\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            queue_quota: Some(9),
            ..Default::default()
        };
        let s = Settings::load(args).unwrap();
        assert_eq!(s.domain, "a.example");
        let config = s.clone().into_config().unwrap();
        assert_eq!(config.mailbox.queue_quota, 9);
        assert!(!config.store.group_commit);
        assert_eq!(s.queue_quota, 9);
        assert!(!s.group_commit);
        assert_eq!(s.delivery_window, 256);
    }

    #[test]
    fn store_names_a_backend() {
        let backend = |store: &str| {
            Settings::load(ServeArgs {
                store: Some(store.into()),
                ..Default::default()
            })
            .and_then(Settings::into_config)
            .map(|c| c.backend)
        };
        assert!(matches!(backend("sled"), Ok(Backend::Sled)));
        assert!(matches!(backend("memory"), Ok(Backend::Memory)));
        assert!(matches!(
            backend("nats://127.0.0.1:4222"),
            Ok(Backend::Nats(_))
        ));
        assert!(matches!(
            backend("postgres://x"),
            Err(ConfigError::Invalid { key: "store", .. })
        ));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        let err = Settings::load(ServeArgs {
            config: Some(path),
            ..Default::default()
        });
        assert!(matches!(err, Err(ConfigError::Parse { .. })));
        let args = ServeArgs {
            registration: Some(Registration::Platform),
            ..Default::default()
        };
        assert!(matches!(
            Settings::load(args).and_then(Settings::into_config),
            Err(ConfigError::Invalid {
                key: "platform_public_key",
                ..
            })
        ));
    }
}
