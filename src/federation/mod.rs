//! Federation: brokers of different domains exchange sealed envelopes.
//!
//! `alice@a.example` writes to `bob@b.example`: alice's broker (a.example) accepts the send once
//! the envelope is durable in its outbox for b.example, then forwards it over an authenticated
//! link to bob's broker, which stores it in bob's mailbox before it acknowledges. Only then does
//! a.example delete it from the outbox.
//!
//! - [`identity`]: this broker's static X25519 key (`federation.key`), published at
//!   `/.well-known/sealpost/server`.
//! - [`link`]: Noise `KK` over WebSocket; the outbound link task.
//! - [`peer`]: one [`FederationPeer`](peer::FederationPeer) actor per destination domain, with
//!   a durable outbox, batching into transactions, capped exponential backoff.
//! - [`inbound`]: the receiving side of `/v1/federation`: handshake, limits, transactions into
//!   local mailboxes (persist, then acknowledge), lookups.
//! - [`messages`]: what the peer actor handles.
//! - [`backoff`]: delays between attempts.
//!
//! Dependency rule: federation uses the store and proto only. Local delivery on the receiving
//! side goes through the [`inbound::LocalDelivery`] trait, which the gateway implements with
//! mailboxes.
//!
//! What the receiving broker learns of a cross-domain envelope: the recipient device, the size,
//! the time, and the origin domain of the link. No federation frame has a field for the sender.

pub mod backoff;
pub mod identity;
pub mod inbound;
pub mod link;
pub mod messages;
pub mod peer;

use std::{collections::HashMap, num::NonZeroU32, pin::Pin, sync::Arc, time::Duration};

use actix::{Actor, Addr, ArbiterHandle};
use governor::{DefaultKeyedRateLimiter, Quota};
use sealpost_proto::{
    Class, Copy, EnvelopeId, ErrorCode, Handle, SendOutcome, federation::Admission,
};

use self::{
    identity::ServerKey,
    messages::{Enqueue, PeerStatus, Query, QueryResult, Request, Status},
    peer::FederationPeer,
};
use crate::store::Store;

/// A remote domain this broker federates with: where its endpoint is and which static key it
/// must prove to hold.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The domain.
    pub domain: String,
    /// Its federation endpoint, `ws://` or `wss://…/v1/federation`.
    pub url: String,
    /// Its static X25519 public key.
    pub key: [u8; 32],
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("domain", &self.domain)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Parses the `federation_peers` setting: comma-separated `domain=url#base64-key` entries.
pub fn parse_peers(text: &str, local_domain: &str) -> Result<Vec<PeerConfig>, String> {
    let mut out: Vec<PeerConfig> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (domain, rest) = entry
            .split_once('=')
            .ok_or_else(|| format!("{entry:?} is not domain=url#key"))?;
        let (url, key) = rest
            .rsplit_once('#')
            .ok_or_else(|| format!("{entry:?} is not domain=url#key"))?;
        let domain = domain.trim();
        if Handle::parse(&format!("x@{domain}")).is_err() {
            return Err(format!("{domain:?} is not a lower-case DNS name"));
        }
        if domain == local_domain {
            return Err(format!("{domain} is this broker's own domain"));
        }
        if out.iter().any(|p| p.domain == domain) {
            return Err(format!("{domain} is listed twice"));
        }
        let url = url.trim();
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return Err(format!(
                "the endpoint of {domain} is not a ws:// or wss:// URL"
            ));
        }
        let key = identity::parse_public_key(key)
            .ok_or_else(|| format!("the key of {domain} is not base64 of 32 bytes"))?;
        out.push(PeerConfig {
            domain: domain.to_owned(),
            url: url.to_owned(),
            key,
        });
    }
    Ok(out)
}

/// Tunables of the federation actors and links, from the broker settings.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// This broker's domain.
    pub local_domain: String,
    /// Most envelopes per transaction.
    pub batch: usize,
    /// Most ciphertext bytes per transaction (a single larger envelope still goes alone).
    pub max_txn_bytes: u64,
    /// Transactions in flight per link.
    pub window: usize,
    /// First reconnection / retry delay.
    pub backoff_min: Duration,
    /// Longest reconnection / retry delay.
    pub backoff_max: Duration,
    /// Connecting, handshaking and lookups give up after this long.
    pub request_timeout: Duration,
    /// How long a remote user's device set is trusted for stale-set checks.
    pub device_cache: Duration,
    /// Interval of pings on a link.
    pub heartbeat: Duration,
    /// A link silent this long is closed.
    pub idle_timeout: Duration,
    /// Envelopes (and lookups) per second accepted from one origin domain (0 = unlimited).
    pub origin_rate: u32,
    /// Transactions one inbound link may have being persisted at once.
    pub inbound_txns: usize,
}

/// Handle on a running peer.
struct PeerHandle {
    config: Arc<PeerConfig>,
    addr: Addr<FederationPeer>,
}

/// The federation side of a broker: its key, its peers (one actor each) and the limits of
/// inbound links.
pub struct Federation {
    settings: Arc<PeerSettings>,
    key: Arc<ServerKey>,
    peers: HashMap<String, PeerHandle>,
    /// The endpoint published at the well-known path (known once the listener is bound).
    public_url: std::sync::OnceLock<String>,
    /// Per-origin limit of inbound envelopes and lookups.
    origin_limit: Option<DefaultKeyedRateLimiter<String>>,
}

/// A send being forwarded: resolves with its answer.
pub type PendingOutcome = Pin<Box<dyn Future<Output = SendOutcome>>>;

impl Federation {
    /// Starts one peer actor per configured peer on `arbiter`.
    pub fn start(
        settings: PeerSettings,
        key: ServerKey,
        peers: Vec<PeerConfig>,
        store: Arc<dyn Store>,
        arbiter: &ArbiterHandle,
    ) -> Arc<Self> {
        let settings = Arc::new(settings);
        let key = Arc::new(key);
        let origin_limit = NonZeroU32::new(settings.origin_rate).map(|rate| {
            let burst = NonZeroU32::new(rate.get().saturating_mul(2)).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let peers = peers
            .into_iter()
            .map(|config| {
                let config = Arc::new(config);
                let (c, s, k, st) = (config.clone(), settings.clone(), key.clone(), store.clone());
                let addr = FederationPeer::start_in_arbiter(arbiter, move |_| {
                    FederationPeer::new(c, s, k, st)
                });
                (config.domain.clone(), PeerHandle { config, addr })
            })
            .collect();
        Arc::new(Federation {
            settings,
            key,
            peers,
            public_url: std::sync::OnceLock::new(),
            origin_limit,
        })
    }

    /// This broker's domain.
    pub fn local_domain(&self) -> &str {
        &self.settings.local_domain
    }

    /// This broker's public key, base64.
    pub fn public_key_b64(&self) -> String {
        self.key.public_b64()
    }

    /// The endpoint published at the well-known path.
    pub fn public_url(&self) -> &str {
        self.public_url.get().map_or("", String::as_str)
    }

    /// Sets the published endpoint (once, after the listener is bound).
    pub fn set_public_url(&self, url: String) {
        let _ = self.public_url.set(url);
    }

    /// Whether `domain` is a peer this broker forwards to.
    pub fn is_peer(&self, domain: &str) -> bool {
        self.peers.contains_key(domain)
    }

    /// The pinned key of `domain`, if it is a peer.
    pub(crate) fn peer_key(&self, domain: &str) -> Option<[u8; 32]> {
        self.peers.get(domain).map(|p| p.config.key)
    }

    pub(crate) fn key(&self) -> &ServerKey {
        &self.key
    }

    pub(crate) fn settings(&self) -> &PeerSettings {
        &self.settings
    }

    /// Whether one more envelope or lookup from `origin` is allowed now.
    pub(crate) fn allow_origin(&self, origin: &str) -> bool {
        self.origin_limit
            .as_ref()
            .is_none_or(|l| l.check_key(&origin.to_owned()).is_ok())
    }

    /// Forgets quiet rate-limit keys.
    pub fn housekeep(&self) {
        if let Some(l) = &self.origin_limit {
            l.retain_recent();
        }
    }

    /// Forwards an envelope to `to`, a user of a peer domain. The envelope is queued now, so a
    /// connection's sends keep their order; the future resolves once it is durable in the
    /// outbox (or refused).
    pub fn submit(
        &self,
        to: &Handle,
        id: EnvelopeId,
        class: Class,
        ttl_secs: u32,
        copies: Vec<Copy>,
        admission: Admission,
    ) -> PendingOutcome {
        let Some(peer) = self.peers.get(to.domain()) else {
            return Box::pin(std::future::ready(SendOutcome::Rejected {
                code: ErrorCode::UnknownDomain,
                current_devices: Vec::new(),
            }));
        };
        let answer = peer.addr.send(Enqueue {
            id,
            to: to.to_string(),
            class,
            ttl_secs,
            copies: Arc::new(copies),
            admission,
        });
        Box::pin(async move {
            answer.await.unwrap_or(SendOutcome::Rejected {
                code: ErrorCode::Internal,
                current_devices: Vec::new(),
            })
        })
    }

    /// A lookup answered by the broker of `domain`.
    pub async fn request(&self, domain: &str, request: Request) -> QueryResult {
        let peer = self.peers.get(domain).ok_or(ErrorCode::UnknownDomain)?;
        peer.addr
            .send(Query(request))
            .await
            .unwrap_or(Err(ErrorCode::Internal))
    }

    /// The state of every peer, ordered by domain.
    pub async fn status(&self) -> Vec<PeerStatus> {
        let mut out = Vec::with_capacity(self.peers.len());
        for peer in self.peers.values() {
            if let Ok(status) = peer.addr.send(Status).await {
                out.push(status);
            }
        }
        out.sort_by(|a, b| a.domain.cmp(&b.domain));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_are_checked() {
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
        let text = format!(
            "b.example=ws://127.0.0.2:9000/v1/federation#{key}, c.example = wss://c.example/v1/federation#{key}"
        );
        let peers = parse_peers(&text, "a.example").unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].domain, "b.example");
        assert_eq!(peers[1].url, "wss://c.example/v1/federation");
        assert_eq!(peers[1].key, [7; 32]);
        assert!(parse_peers("", "a.example").unwrap().is_empty());
        assert!(
            parse_peers(
                &format!("a.example=ws://x/v1/federation#{key}"),
                "a.example"
            )
            .is_err()
        );
        assert!(parse_peers(&format!("B=ws://x#{key}"), "a.example").is_err());
        assert!(parse_peers("b.example=ws://x#short", "a.example").is_err());
        assert!(parse_peers(&format!("b.example=http://x#{key}"), "a.example").is_err());
        assert!(
            parse_peers(
                &format!("b.example=ws://x#{key},b.example=ws://y#{key}"),
                "a.example"
            )
            .is_err()
        );
    }
}
