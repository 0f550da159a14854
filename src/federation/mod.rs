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
//! - [`error`]: why a peer list or a peer's key discovery failed.
//!
//! Dependency rule: federation uses the store and proto only. Local delivery on the receiving
//! side goes through the [`inbound::LocalDelivery`] trait, which the gateway implements with
//! mailboxes.
//!
//! What the receiving broker learns of a cross-domain envelope: the recipient device, the size,
//! the time, and the origin domain of the link. No federation frame has a field for the sender.

pub mod backoff;
pub mod error;
pub mod identity;
pub mod inbound;
pub mod link;
pub mod messages;
pub mod peer;
#[cfg(test)]
mod peer_tests;

use std::{collections::HashMap, num::NonZeroU32, pin::Pin, sync::Arc, time::Duration};

use actix::{Actor, Addr, ArbiterHandle};
use governor::{DefaultKeyedRateLimiter, Quota};
use sealpost_proto::{
    Class, Copy, EnvelopeId, ErrorCode, Handle, SendOutcome, federation::Admission,
};

pub use self::error::{DiscoveryError, PeerListError};
use self::{
    identity::ServerKey,
    messages::{Enqueue, GroupEnqueue, GroupTo, PeerStatus, Query, QueryResult, Request, Status},
    peer::FederationPeer,
};
use crate::store::Stores;

/// Where a peer's endpoint and static key come from (the key is public).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSource {
    /// Pinned in the config.
    Pinned {
        /// Its federation endpoint, `ws://` or `wss://…/v1/federation`.
        url: String,
        /// Its static X25519 public key.
        key: [u8; 32],
    },
    /// Read from `{base}/.well-known/sealpost/server` (normally `https://domain`), which
    /// names the endpoint and the key; fetched again after an hour, or when a handshake with
    /// the cached key fails.
    Discover {
        /// Base URL of the well-known document.
        base: String,
    },
}

/// A remote domain this broker federates with.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The domain.
    pub domain: String,
    /// Where its endpoint and key come from.
    pub source: PeerSource,
}

impl PeerConfig {
    /// The endpoint, or the discovery base, for display.
    pub fn location(&self) -> &str {
        match &self.source {
            PeerSource::Pinned { url, .. } => url,
            PeerSource::Discover { base } => base,
        }
    }
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("domain", &self.domain)
            .field("location", &self.location())
            .finish_non_exhaustive()
    }
}

/// Parses the `federation_peers` setting: comma-separated entries, each
///
/// - `domain=ws[s]://host:port/v1/federation#BASE64KEY`: pinned endpoint and key;
/// - `domain`: discovered from `https://domain/.well-known/sealpost/server`;
/// - `domain=http[s]://host:port`: discovered from that base URL instead.
pub fn parse_peers(text: &str, local_domain: &str) -> Result<Vec<PeerConfig>, PeerListError> {
    let mut out: Vec<PeerConfig> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (domain, rest) = match entry.split_once('=') {
            Some((d, r)) => (d.trim(), Some(r.trim())),
            None => (entry, None),
        };
        if Handle::parse(&format!("x@{domain}")).is_err() {
            return Err(PeerListError::NotADomain(domain.to_owned()));
        }
        if domain == local_domain {
            return Err(PeerListError::OwnDomain(domain.to_owned()));
        }
        if out.iter().any(|p| p.domain == domain) {
            return Err(PeerListError::Duplicate(domain.to_owned()));
        }
        let source = match rest {
            None => PeerSource::Discover {
                base: format!("https://{domain}"),
            },
            Some(base) if base.starts_with("https://") || base.starts_with("http://") => {
                if base.contains('#') {
                    return Err(PeerListError::KeyOnDiscoveryBase(domain.to_owned()));
                }
                PeerSource::Discover {
                    base: base.trim_end_matches('/').to_owned(),
                }
            }
            Some(rest) => {
                let (url, key) = rest
                    .rsplit_once('#')
                    .ok_or_else(|| PeerListError::Malformed(entry.to_owned()))?;
                let url = url.trim();
                if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                    return Err(PeerListError::NotWebSocket(domain.to_owned()));
                }
                let key = identity::parse_public_key(key)
                    .ok_or_else(|| PeerListError::BadKey(domain.to_owned()))?;
                PeerSource::Pinned {
                    url: url.to_owned(),
                    key,
                }
            }
        };
        out.push(PeerConfig {
            domain: domain.to_owned(),
            source,
        });
    }
    Ok(out)
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// A discovered key and endpoint, and when they were fetched.
type Discovered = (std::time::Instant, [u8; 32], String);

/// Resolves peers' endpoints and keys: pinned ones at once, discovered ones from their
/// well-known document (cached).
pub struct Resolver {
    peers: HashMap<String, Arc<PeerConfig>>,
    http: reqwest::Client,
    cache: std::sync::Mutex<HashMap<String, Discovered>>,
    /// Domains whose document is being fetched: one fetch at a time per domain.
    fetching: std::sync::Mutex<std::collections::HashSet<String>>,
    /// How long a discovered key is used before it is fetched again.
    ttl: Duration,
}

/// The well-known document (`GET /.well-known/sealpost/server`).
#[derive(serde::Deserialize)]
struct WellKnown {
    domain: String,
    x25519: String,
    federation: String,
}

impl Resolver {
    fn new(peers: &[Arc<PeerConfig>], timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Resolver {
            peers: peers
                .iter()
                .map(|p| (p.domain.clone(), p.clone()))
                .collect(),
            http,
            cache: std::sync::Mutex::new(HashMap::new()),
            fetching: std::sync::Mutex::new(std::collections::HashSet::new()),
            ttl: Duration::from_secs(3600),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Discovered>> {
        // Holds only fetched keys; a panic elsewhere cannot leave it half-updated.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `domain` is a configured peer.
    pub fn is_peer(&self, domain: &str) -> bool {
        self.peers.contains_key(domain)
    }

    /// The static key and endpoint of a configured peer.
    pub async fn resolve(&self, domain: &str) -> Result<([u8; 32], String), DiscoveryError> {
        let peer = self
            .peers
            .get(domain)
            .ok_or_else(|| DiscoveryError::NotAPeer(domain.to_owned()))?;
        let base = match &peer.source {
            PeerSource::Pinned { url, key } => return Ok((*key, url.clone())),
            PeerSource::Discover { base } => base,
        };
        let cached = self.cache().get(domain).cloned();
        if let Some((at, key, url)) = &cached
            && at.elapsed() < self.ttl
        {
            return Ok((*key, url.clone()));
        }
        // One fetch at a time per domain; meanwhile, and if the fetch fails, a key we had
        // stays in use.
        let stale = cached.map(|(_, key, url)| (key, url));
        if !self.lock_fetching().insert(domain.to_owned()) {
            return stale.ok_or_else(|| DiscoveryError::InProgress(domain.to_owned()));
        }
        // Released however the fetch ends, also if this future is dropped midway.
        let _fetching = scopeguard(|| {
            self.lock_fetching().remove(domain);
        });
        let fetched = self.fetch(domain, base).await;
        match (fetched, stale) {
            (Ok(found), _) => Ok(found),
            (Err(e), Some(stale)) => {
                tracing::warn!(domain, error = %e, "discovery failed; the key known so far stays in use");
                Ok(stale)
            }
            (Err(e), None) => Err(e),
        }
    }

    fn lock_fetching(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.fetching.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches and checks `domain`'s well-known document, and caches its key and endpoint.
    async fn fetch(&self, domain: &str, base: &str) -> Result<([u8; 32], String), DiscoveryError> {
        let invalid = |what| DiscoveryError::Invalid {
            domain: domain.to_owned(),
            what,
        };
        let doc: WellKnown = self
            .http
            .get(format!("{base}/.well-known/sealpost/server"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| DiscoveryError::Fetch {
                domain: domain.to_owned(),
                reason: e.to_string(),
            })?
            .json()
            .await
            .map_err(|_| invalid("not a well-known document"))?;
        if doc.domain != domain {
            return Err(invalid("it names another domain"));
        }
        let key = identity::parse_public_key(&doc.x25519)
            .ok_or_else(|| invalid("its key is not 32 bytes"))?;
        if !(doc.federation.starts_with("ws://") || doc.federation.starts_with("wss://")) {
            return Err(invalid("its endpoint is not ws:// or wss://"));
        }
        self.cache().insert(
            domain.to_owned(),
            (std::time::Instant::now(), key, doc.federation.clone()),
        );
        Ok((key, doc.federation))
    }

    /// Drops a discovered key after a failed handshake, so the next attempt fetches it again
    /// (the peer may have rotated its key).
    pub fn forget(&self, domain: &str) {
        self.cache().remove(domain);
    }

    /// Marks a discovered key that has been used for at least `age` as due for a refresh:
    /// after a hello that did not authenticate. Anyone can send one naming any peer, so such
    /// hellos may cause a fetch of the peer's document at most once per `age`, one at a
    /// time, and the key stays in use if the fetch fails (a real key rotation is also noticed
    /// by our own next outbound handshake, which forgets the key at once).
    pub fn forget_older_than(&self, domain: &str, age: Duration) {
        let ttl = self.ttl;
        if let Some((at, _, _)) = self.cache().get_mut(domain)
            && at.elapsed() >= age
        {
            *at = std::time::Instant::now().checked_sub(ttl).unwrap_or(*at);
        }
    }
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
    /// Interval of pings on a link, in both directions: each side pings whether or not it is
    /// reading, so a live peer is heard at least this often.
    pub keepalive: Duration,
    /// An outbound link that hears nothing (no frame, no ping, no pong) for this long is dead:
    /// a frozen or partitioned peer is noticed within seconds. A few keepalives.
    pub link_timeout: Duration,
    /// An inbound link silent this long (for its reads) is closed.
    pub idle_timeout: Duration,
    /// How long a send waits for the recipient's device set from its broker before it is
    /// checked against the set known so far (or none). After such a timeout the peer asks no
    /// more until `link_timeout` has passed: a silent link is declared dead by then.
    pub lookup_wait: Duration,
    /// Envelopes (and lookups) per second accepted from one origin domain (0 = unlimited).
    pub origin_rate: u32,
    /// Transactions one inbound link may have being persisted at once.
    pub inbound_txns: usize,
    /// Most envelopes one destination's outbox may hold; further sends to that domain are
    /// refused with `peer_unavailable`.
    pub outbox_quota: u64,
}

/// How long the admin view waits for one peer's status.
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// Handle on a running peer.
struct PeerHandle {
    addr: Addr<FederationPeer>,
}

/// The federation side of a broker: its key, its peers (one actor each) and the limits of
/// inbound links.
pub struct Federation {
    settings: Arc<PeerSettings>,
    key: Arc<ServerKey>,
    peers: HashMap<String, PeerHandle>,
    /// Endpoints and keys of the peers.
    resolver: Arc<Resolver>,
    /// The endpoint published at the well-known path (known once the listener is bound).
    public_url: std::sync::OnceLock<String>,
    /// Per-origin limit of inbound envelopes and lookups.
    origin_limit: Option<DefaultKeyedRateLimiter<String>>,
}

/// A send being forwarded: resolves with its answer.
pub type PendingOutcome = Pin<Box<dyn Future<Output = SendOutcome>>>;

/// The outcomes of a group message for its recipients on one domain, by recipient.
pub type PendingOutcomes = Pin<Box<dyn Future<Output = Vec<(String, SendOutcome)>>>>;

impl Federation {
    /// Starts one peer actor per configured peer on `arbiter`.
    pub fn start(
        settings: PeerSettings,
        key: ServerKey,
        peers: Vec<PeerConfig>,
        store: Stores,
        arbiter: &ArbiterHandle,
    ) -> Arc<Self> {
        let settings = Arc::new(settings);
        let key = Arc::new(key);
        let origin_limit = NonZeroU32::new(settings.origin_rate).map(|rate| {
            let burst = NonZeroU32::new(rate.get().saturating_mul(2)).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let configs: Vec<Arc<PeerConfig>> = peers.into_iter().map(Arc::new).collect();
        let resolver = Arc::new(Resolver::new(&configs, settings.request_timeout));
        let peers = configs
            .into_iter()
            .map(|config| {
                let (c, s, k, st, r) = (
                    config.clone(),
                    settings.clone(),
                    key.clone(),
                    store.clone(),
                    resolver.clone(),
                );
                let addr = FederationPeer::start_in_arbiter(arbiter, move |_| {
                    FederationPeer::new(c, s, k, st, r)
                });
                (config.domain.clone(), PeerHandle { addr })
            })
            .collect();
        Arc::new(Federation {
            settings,
            key,
            peers,
            resolver,
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

    /// The peer domains, sorted.
    pub fn peer_domains(&self) -> Vec<String> {
        let mut domains: Vec<String> = self.peers.keys().cloned().collect();
        domains.sort();
        domains
    }

    /// The HTTP base of a peer's broker (its federation endpoint's scheme and host: `wss://`
    /// is `https://`), for fetching what it serves anonymously (attachments).
    pub async fn http_base(&self, domain: &str) -> Result<String, DiscoveryError> {
        let (_, endpoint) = self.resolver.resolve(domain).await?;
        let invalid = || DiscoveryError::Invalid {
            domain: domain.to_owned(),
            what: "its endpoint is not a ws:// or wss:// URL",
        };
        let (scheme, rest) = if let Some(rest) = endpoint.strip_prefix("wss://") {
            ("https", rest)
        } else if let Some(rest) = endpoint.strip_prefix("ws://") {
            ("http", rest)
        } else {
            return Err(invalid());
        };
        let host = rest
            .split('/')
            .next()
            .filter(|h| !h.is_empty())
            .ok_or_else(invalid)?;
        Ok(format!("{scheme}://{host}"))
    }

    /// Endpoints and keys of the peers.
    pub(crate) fn resolver(&self) -> &Resolver {
        &self.resolver
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

    /// Takes an entry of another pod's outbox (that pod is gone; see the NATS store's
    /// takeover) into this pod's outbox for its destination, as it was accepted there.
    pub fn adopt(&self, record: crate::store::OutboxRecord) -> PendingOutcome {
        let refused = |code| -> PendingOutcome {
            Box::pin(std::future::ready(SendOutcome::Rejected {
                code,
                current_devices: Vec::new(),
            }))
        };
        match peer::to_wire(record, crate::clock::now_ms(), |_| true) {
            Some(peer::Wire::One(envelope)) => {
                let Ok(to) = Handle::parse(&envelope.to) else {
                    return refused(ErrorCode::InvalidHandle);
                };
                self.submit(
                    &to,
                    envelope.id,
                    envelope.class,
                    envelope.ttl_secs,
                    envelope.copies,
                    envelope.admission,
                )
            }
            Some(peer::Wire::Group(group)) => {
                let domain = group
                    .recipients
                    .first()
                    .and_then(|r| Handle::parse(&r.to).ok())
                    .map(|h| h.domain().to_owned());
                let Some(domain) = domain else {
                    return refused(ErrorCode::InvalidHandle);
                };
                let recipients = group
                    .recipients
                    .into_iter()
                    .map(|r| GroupTo {
                        to: r.to,
                        devices: r.devices,
                        admission: r.admission,
                    })
                    .collect();
                let answer = self.submit_group(
                    &domain,
                    GroupEnqueue {
                        id: group.id,
                        class: group.class,
                        ttl_secs: group.ttl_secs,
                        ciphertext: Arc::new(group.ciphertext),
                        recipients,
                    },
                );
                // Kept (and adopted again later) while any recipient's refusal may pass then.
                Box::pin(async move {
                    answer
                        .await
                        .into_iter()
                        .find_map(|(_, outcome)| match outcome {
                            SendOutcome::Rejected { code, .. } if peer::retryable(code) => {
                                Some(SendOutcome::Rejected {
                                    code,
                                    current_devices: Vec::new(),
                                })
                            }
                            _ => None,
                        })
                        .unwrap_or(SendOutcome::Accepted { duplicate: false })
                })
            }
            None => refused(ErrorCode::InvalidRecipients),
        }
    }

    /// Forwards a group message to its recipients on `domain`, a peer domain, in one outbox
    /// entry. Queued now, like [`Federation::submit`]; the future resolves to one outcome per
    /// recipient once the entry is durable in the outbox (or refused).
    pub fn submit_group(&self, domain: &str, send: GroupEnqueue) -> PendingOutcomes {
        let names: Vec<String> = send.recipients.iter().map(|r| r.to.clone()).collect();
        let refused = move |code| {
            names
                .into_iter()
                .map(|to| {
                    let outcome = SendOutcome::Rejected {
                        code,
                        current_devices: Vec::new(),
                    };
                    (to, outcome)
                })
                .collect()
        };
        let Some(peer) = self.peers.get(domain) else {
            return Box::pin(std::future::ready(refused(ErrorCode::UnknownDomain)));
        };
        let answer = peer.addr.send(send);
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| refused(ErrorCode::Internal))
        })
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
        for (domain, peer) in &self.peers {
            // Peers answer from memory and never block on their link; the bound is for a
            // peer actor too busy to answer (it is then shown as such).
            match tokio::time::timeout(STATUS_WAIT, peer.addr.send(Status)).await {
                Ok(Ok(status)) => out.push(status),
                _ => out.push(PeerStatus::unanswered(domain)),
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
        assert_eq!(
            peers[1].source,
            PeerSource::Pinned {
                url: "wss://c.example/v1/federation".into(),
                key: [7; 32]
            }
        );
        let discovered =
            parse_peers("d.example, e.example=http://127.0.0.5:80/", "a.example").unwrap();
        assert_eq!(
            discovered[0].source,
            PeerSource::Discover {
                base: "https://d.example".into()
            }
        );
        assert_eq!(discovered[1].location(), "http://127.0.0.5:80");
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
        assert!(parse_peers(&format!("b.example=ftp://x#{key}"), "a.example").is_err());
        assert!(
            parse_peers(
                &format!("b.example=ws://x#{key},b.example=ws://y#{key}"),
                "a.example"
            )
            .is_err()
        );
    }

    #[test]
    fn unauthenticated_hellos_refresh_a_discovered_key_at_most_once_per_period() {
        let resolver = Resolver::new(&[], Duration::from_secs(1));
        let fetched = |at| (at, [1u8; 32], "ws://b/v1/federation".to_owned());
        let now = std::time::Instant::now();
        let due = |r: &Resolver| r.cache()["b.example"].0.elapsed() >= r.ttl;
        resolver.cache().insert("b.example".into(), fetched(now));
        resolver.forget_older_than("b.example", Duration::from_secs(60));
        assert!(!due(&resolver), "fetched just now: kept as it is");
        let earlier = now.checked_sub(Duration::from_secs(61)).expect("uptime");
        resolver
            .cache()
            .insert("b.example".into(), fetched(earlier));
        resolver.forget_older_than("b.example", Duration::from_secs(60));
        assert!(due(&resolver), "due for a refresh, but still known");
    }

    #[test]
    fn a_failed_refresh_keeps_the_key_known_so_far() {
        // b.example's document is on a port nothing listens on.
        let peers: Vec<Arc<PeerConfig>> = parse_peers("b.example=http://127.0.0.1:9", "a.example")
            .unwrap()
            .into_iter()
            .map(Arc::new)
            .collect();
        let resolver = Resolver::new(&peers, Duration::from_secs(5));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            assert!(
                resolver.resolve("b.example").await.is_err(),
                "nothing known yet"
            );
            let stale = std::time::Instant::now()
                .checked_sub(Duration::from_secs(7200))
                .expect("uptime");
            resolver.cache().insert(
                "b.example".into(),
                (stale, [3u8; 32], "ws://127.0.0.1:9/v1/federation".into()),
            );
            let (key, url) = resolver.resolve("b.example").await.expect("the stale key");
            assert_eq!(
                (key, url.as_str()),
                ([3u8; 32], "ws://127.0.0.1:9/v1/federation")
            );
            assert!(
                resolver.lock_fetching().is_empty(),
                "the fetch slot is released"
            );
        });
    }
}
