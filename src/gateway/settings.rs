//! The gateway's settings: typed values, parsed once by the broker's configuration (which
//! builds them; the gateway never reads the raw configuration).

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use zeroize::Zeroizing;

use super::client_ip::TrustedProxies;

/// How accounts may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    /// Anyone may register any free handle on a served domain (self-hosted domains, tests).
    Open,
    /// A registration token signed by the platform key must attest the handle.
    Platform,
    /// No new accounts.
    Closed,
}

/// Requests and frames per second, and their bursts. A rate of 0 disables that limit.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    /// HTTP requests and new connections per second from one IP (an IPv6 /64).
    pub ip_rate: u32,
    /// Burst above `ip_rate`.
    pub ip_burst: u32,
    /// Frames per second from one device.
    pub device_rate: u32,
    /// Burst above `device_rate`.
    pub device_burst: u32,
    /// Tokenless sealed sends and anonymous key claims per second from one IP.
    pub stranger_rate: u32,
    /// Key claims per second for one target device.
    pub claim_rate: u32,
    /// Commits per second for one group at its hub (bursts of four times that).
    pub commit_rate: u32,
    /// Attachments one account may start per minute.
    pub blob_rate_per_min: u32,
}

/// Attachments (`/v1/accounts/{h}/blobs`, `/v1/blobs/{id}`).
#[derive(Debug, Clone)]
pub struct BlobSettings {
    /// Largest attachment, bytes.
    pub max_bytes: u64,
    /// Bytes of unexpired attachments one account may hold.
    pub quota_bytes: u64,
    /// How long an attachment is kept after it is started.
    pub ttl: Duration,
}

impl Default for BlobSettings {
    fn default() -> Self {
        BlobSettings {
            max_bytes: 100 << 20,
            quota_bytes: 2 << 30,
            ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Push subscriptions as the gateway takes them (`/v1/push/vapid`,
/// `/v1/accounts/{h}/devices/{id}/push`).
#[derive(Debug, Clone, Default)]
pub struct PushDoor {
    /// The VAPID public key devices subscribe with (base64url); `None`: push is off and the
    /// routes answer 404.
    pub vapid_public_key: Option<String>,
    /// Endpoints on loopback and private networks, and plain http, are accepted.
    pub allow_private_endpoints: bool,
}

/// The call relay (coturn, TURN REST scheme).
#[derive(Default)]
pub struct TurnSettings {
    /// `turn:`/`turns:`/`stun:` URLs handed to clients; empty: no relay.
    pub urls: Vec<String>,
    /// The relay's shared secret (coturn's `static-auth-secret`).
    pub secret: Zeroizing<Vec<u8>>,
    /// Lifetime of minted credentials, s.
    pub ttl_secs: u64,
    /// Credentials one device may fetch per minute (0 = unlimited).
    pub rate_per_min: u32,
}

/// Everything the gateway is configured with.
pub struct Settings {
    /// The domain whose accounts this broker serves.
    pub domain: String,
    /// Account creation policy.
    pub registration: Registration,
    /// The host platform's key for registration tokens (`registration = platform`).
    pub platform_key: Option<ed25519_dalek::VerifyingKey>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    /// Rate limits.
    pub rates: Rates,
    /// Attachments.
    pub blobs: BlobSettings,
    /// The call relay.
    pub turn: TurnSettings,
    /// The browser client's files, served at `/web/` when set.
    pub web_root: Option<PathBuf>,
    /// Interval of WebSocket pings.
    pub heartbeat: Duration,
    /// A connection silent this long is closed; also the deadline of every write.
    pub client_timeout: Duration,
    /// Time a new connection has to authenticate.
    pub auth_timeout: Duration,
    /// Unacknowledged deliveries in flight per connected device.
    pub delivery_window: usize,
    /// Sends one connection may have awaiting their results.
    pub max_pending_sends: usize,
    /// Rate-limit violations after which a connection is closed.
    pub max_violations: u32,
    /// Sessions close over this window on shutdown, with random jitter.
    pub shutdown_drain: Duration,
    /// Memory all WebSocket readers together may hold in partly received messages.
    pub socket_buffer_bytes: usize,
    /// Memory copies of group messages on their way to mailboxes may hold (1..=u32::MAX).
    pub fanout_buffer_bytes: usize,
    /// Unauthenticated connections per IP (an IPv6 /64); 0 = unlimited.
    pub max_unauthenticated_per_ip: usize,
    /// Unauthenticated connections in total; 0 = unlimited.
    pub max_unauthenticated: usize,
    /// Bearer token of the admin endpoints; empty: they answer loopback clients only.
    pub admin_token: Zeroizing<String>,
    /// Push subscriptions.
    pub push: PushDoor,
}

#[cfg(test)]
impl Settings {
    /// The defaults of `sealpost serve` for `domain`, with no rate limits, for unit tests.
    pub(crate) fn for_tests(domain: &str) -> Settings {
        Settings {
            domain: domain.to_owned(),
            registration: Registration::Open,
            platform_key: None,
            trusted_proxies: TrustedProxies::default(),
            rates: Rates::default(),
            blobs: BlobSettings::default(),
            turn: TurnSettings::default(),
            web_root: None,
            heartbeat: Duration::from_secs(15),
            client_timeout: Duration::from_secs(45),
            auth_timeout: Duration::from_secs(10),
            delivery_window: 8,
            max_pending_sends: 64,
            max_violations: 50,
            shutdown_drain: Duration::from_millis(100),
            socket_buffer_bytes: 16 << 20,
            fanout_buffer_bytes: 16 << 20,
            max_unauthenticated_per_ip: 0,
            max_unauthenticated: 0,
            admin_token: Zeroizing::new(String::new()),
            push: PushDoor::default(),
        }
    }
}
