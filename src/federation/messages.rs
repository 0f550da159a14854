//! Messages the federation peer actor (`peer.rs`) handles: from the gateway
//! (envelopes to forward, lookups, status) and from its link task (up, down, acknowledgements).

use std::sync::Arc;

use actix::{Message, Recipient};
use sealpost_proto::{
    Class, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome,
    federation::{Admission, LinkFrame},
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Forward an envelope to a user of the peer's domain. Answered once it is durable in the
/// outbox (or at once when refused, or for the ephemeral class, which is never stored).
#[derive(Message)]
#[rtype(result = "SendOutcome")]
pub struct Enqueue {
    /// Client envelope id.
    pub id: EnvelopeId,
    /// Recipient handle (on the peer's domain).
    pub to: String,
    /// Delivery class.
    pub class: Class,
    /// Time-to-live, validated against the class limits.
    pub ttl_secs: u32,
    /// One ciphertext per recipient device.
    pub copies: Arc<Vec<Copy>>,
    /// How this broker admitted it.
    pub admission: Admission,
}

/// Forward one group message to its recipients on the peer's domain: the ciphertext goes
/// once, in one outbox entry, and the peer's broker stores a copy for each recipient device.
/// Answered with one outcome per recipient once it is durable in the outbox (or refused).
#[derive(Message)]
#[rtype(result = "Vec<(String, SendOutcome)>")]
pub struct GroupEnqueue {
    /// Client envelope id.
    pub id: EnvelopeId,
    /// Delivery class.
    pub class: Class,
    /// Time-to-live, validated against the class limits.
    pub ttl_secs: u32,
    /// The one ciphertext of every recipient device.
    pub ciphertext: Arc<Vec<u8>>,
    /// The recipients (on the peer's domain), each once.
    pub recipients: Vec<GroupTo>,
}

/// A recipient of a [`GroupEnqueue`].
pub struct GroupTo {
    /// Recipient handle.
    pub to: String,
    /// Its devices that get a copy.
    pub devices: Vec<DeviceId>,
    /// How this broker admitted it for this recipient.
    pub admission: Admission,
}

/// A lookup answered by the peer's broker.
#[derive(Debug, Clone)]
pub enum Request {
    /// The devices (ids and identity keys) of a user.
    GetDevices {
        /// The user.
        user: String,
    },
    /// The signed device list of a user.
    GetDeviceList {
        /// The user.
        user: String,
    },
    /// Claim a key (or a KeyPackage) of a device.
    ClaimKey {
        /// The user.
        user: String,
        /// The device.
        device: u32,
        /// How this broker admitted the claim.
        admission: Admission,
        /// An MLS KeyPackage rather than an Olm key.
        key_package: bool,
    },
    /// Signed roots of the peer's key-transparency log and the append-only proof between them
    /// (see `LinkFrame::GetRoots`).
    GetRoots {
        /// First epoch (`federation::NEWEST`: only the newest root).
        from: u64,
        /// Last epoch (0: the newest).
        to: u64,
    },
    /// Co-signatures this broker made, for the peer to keep.
    Cosign {
        /// Encoded co-signatures.
        cosignatures: Vec<Vec<u8>>,
    },
    /// At a group's hub: take an epoch for a Commit.
    TakeEpoch {
        /// The group's id.
        group: Vec<u8>,
        /// The epoch the Commit names.
        epoch: u64,
        /// The Commit's envelope id.
        id: sealpost_proto::EnvelopeId,
    },
}

impl Request {
    /// The link frame of this request with its id.
    pub(crate) fn frame(&self, req_id: u64) -> LinkFrame {
        match self.clone() {
            Request::GetDevices { user } => LinkFrame::GetDevices { req_id, user },
            Request::GetDeviceList { user } => LinkFrame::GetDeviceList { req_id, user },
            Request::ClaimKey {
                user,
                device,
                admission,
                key_package,
            } => LinkFrame::ClaimKey {
                req_id,
                user,
                device,
                admission,
                key_package,
            },
            Request::GetRoots { from, to } => LinkFrame::GetRoots { req_id, from, to },
            Request::Cosign { cosignatures } => LinkFrame::Cosign {
                req_id,
                cosignatures,
            },
            Request::TakeEpoch { group, epoch, id } => LinkFrame::TakeEpoch {
                req_id,
                group,
                epoch,
                id,
            },
        }
    }
}

/// The answer to a [`Query`]: the reply frame, or why there is none.
pub type QueryResult = Result<LinkFrame, ErrorCode>;

/// Send a lookup over the link; answered with the reply frame.
#[derive(Message)]
#[rtype(result = "QueryResult")]
pub struct Query(pub Request);

/// What the peer hands its link task.
pub(crate) enum Outgoing {
    /// A frame to send as is (transactions).
    Frame(LinkFrame),
    /// A request: the link assigns its id and routes the reply back.
    Request(Request, oneshot::Sender<LinkFrame>),
}

/// The link task connected and authenticated its peer.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct LinkUp {
    /// Which connection attempt this is.
    pub(crate) generation: u64,
    /// Where to send frames.
    pub(crate) tx: mpsc::Sender<Outgoing>,
}

/// The link task ended (or never came up).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct LinkDown {
    /// Which connection attempt this was.
    pub(crate) generation: u64,
    /// Why, without content.
    pub(crate) reason: String,
}

/// The peer acknowledged a transaction.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct TxnAcked {
    /// Which connection attempt carried it.
    pub(crate) generation: u64,
    /// The transaction.
    pub(crate) txn_id: u64,
    /// One per envelope.
    pub(crate) codes: Vec<Option<ErrorCode>>,
}

/// Where a link task reports to its peer actor. Recipients rather than the actor's address, so
/// that the link knows the messages, not the actor.
#[derive(Clone)]
pub(crate) struct LinkReports {
    pub(crate) up: Recipient<LinkUp>,
    pub(crate) down: Recipient<LinkDown>,
    pub(crate) acked: Recipient<TxnAcked>,
}

/// Report the peer's state (admin view).
#[derive(Message)]
#[rtype(result = "PeerStatus")]
pub struct Status;

/// One destination as the admin view shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    /// Destination domain.
    pub domain: String,
    /// Its federation endpoint.
    pub url: String,
    /// `up`, `connecting` or `down` (`unanswered`: the peer actor did not answer in time).
    pub link: &'static str,
    /// Envelopes in the outbox.
    pub backlog: u64,
    /// Ciphertext bytes in the outbox.
    pub backlog_bytes: u64,
    /// Age of the oldest outbox entry, ms (0 when empty).
    pub oldest_age_ms: u64,
    /// Transactions sent and not yet acknowledged.
    pub in_flight_txns: usize,
    /// Connection attempts since start.
    pub attempts: u64,
    /// Failed connections and lost links since start.
    pub failures: u64,
    /// Consecutive failures (drives the backoff).
    pub consecutive_failures: u32,
    /// Envelopes acknowledged by the peer since start.
    pub delivered: u64,
    /// Envelopes the peer refused for good since start.
    pub refused: u64,
    /// Why the link last went down, if it did.
    pub last_error: Option<String>,
}

impl PeerStatus {
    /// The entry of a peer whose actor did not answer in time.
    pub(crate) fn unanswered(domain: &str) -> PeerStatus {
        PeerStatus {
            domain: domain.to_owned(),
            link: "unanswered",
            ..PeerStatus::default()
        }
    }
}
