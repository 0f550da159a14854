//! Federation errors, by source. Their messages name domains and reasons, never content.

/// Why a `federation_peers` entry is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerListError {
    /// The domain is not a lower-case DNS name.
    #[error("{0:?} is not a lower-case DNS name")]
    NotADomain(String),
    /// A broker does not federate with itself.
    #[error("{0} is this broker's own domain")]
    OwnDomain(String),
    /// The same domain appears twice.
    #[error("{0} is listed twice")]
    Duplicate(String),
    /// A discovery base URL with a key: keys are pinned on ws:// endpoints only.
    #[error("the discovery base of {0} takes no key (pin a ws:// endpoint instead)")]
    KeyOnDiscoveryBase(String),
    /// Neither `domain`, `domain=http[s]://base` nor `domain=ws[s]://endpoint#key`.
    #[error("{0:?} is not domain=url#key")]
    Malformed(String),
    /// A pinned endpoint that is not a WebSocket URL.
    #[error("the endpoint of {0} is not a ws:// or wss:// URL")]
    NotWebSocket(String),
    /// A pinned key that is not base64 of 32 bytes.
    #[error("the key of {0} is not base64 of 32 bytes")]
    BadKey(String),
}

/// Why a peer's static key and endpoint are not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The domain is not a configured peer.
    #[error("{0} is not a peer")]
    NotAPeer(String),
    /// Another lookup of the domain is running and no key is known yet.
    #[error("discovery of {0} is in progress")]
    InProgress(String),
    /// The well-known document could not be fetched.
    #[error("discovery of {domain} failed: {reason}")]
    Fetch {
        /// The peer.
        domain: String,
        /// The HTTP or TLS error.
        reason: String,
    },
    /// The document is not what a Sealpost broker of that domain publishes.
    #[error("the well-known document of {domain} is invalid: {what}")]
    Invalid {
        /// The peer.
        domain: String,
        /// What is wrong with it.
        what: &'static str,
    },
}
