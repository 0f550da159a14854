//! The receiving side of a link (`/v1/federation`): authenticate the calling broker, then
//! persist its transactions into local mailboxes and answer its lookups.
//!
//! ```text
//! hello ──▶ target is us? origin a known peer? KK handshake with origin's pinned key ──▶ welcome
//!   (any failure: refuse frame, close `peer_refused`, one log line with the claimed origin and
//!    the reason — never content)
//! txn   ──▶ per envelope, in order: per-origin rate limit, then LocalDelivery::deliver
//!           (enqueued at once, so order is kept) ──▶ all durable ──▶ txn_ack
//! get_devices / get_device_list / claim_key / take_epoch ──▶ LocalDelivery::answer ──▶ reply
//! ```
//!
//! Transactions are pipelined up to `inbound_txns` and acknowledged in order. A frame that
//! does not decrypt or decode ends the link with a `link_error`; whatever was acknowledged
//! before stays acknowledged, and what was not is resent by the sending broker.

use std::{
    rc::Rc,
    time::{Duration, Instant},
};

use actix_web::web::Bytes;
use futures_util::{
    StreamExt,
    future::{LocalBoxFuture, join_all},
    stream::{FuturesOrdered, FuturesUnordered},
};
use sealpost_proto::{
    Class, CloseCode, EnvelopeId, ErrorCode,
    federation::{FedEnvelope, FedGroupEnvelope, HandshakeFrame, LinkFrame},
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    Federation,
    link::{self, Cipher},
};
use crate::socket::{Close, Drain, Flow, Service, Socket, Writer};

/// Local delivery, as the receiving side of a link needs it. Implemented by the gateway with
/// mailboxes, so that federation does not depend on them.
pub trait LocalDelivery {
    /// Stores an envelope for a local user. Called in transaction order, and awaited before
    /// the next envelope is given: it resolves once the envelope is queued for its mailbox
    /// (so that order is kept), to the future of its answer: durable (`None`) or refused.
    fn deliver(&self, origin: &str, envelope: FedEnvelope) -> LocalBoxFuture<'static, Routed>;
    /// Answers a lookup (`GetDevices`, `GetDeviceList`, `ClaimKey`) or an order (`TakeEpoch`)
    /// with its reply frame.
    fn answer(&self, origin: &str, request: LinkFrame) -> LocalBoxFuture<'static, LinkFrame>;
}

/// An envelope handed to its mailbox: the future of its answer (`None`: durable).
pub type Routed = LocalBoxFuture<'static, Option<ErrorCode>>;

/// How often hellos that do not authenticate may make us fetch a peer's key again.
const UNAUTHENTICATED_REFRESH: Duration = Duration::from_secs(60);

fn refused(reason: &'static str) {
    metrics::counter!("sealpost_federation_links_refused_total", "reason" => reason).increment(1);
}

async fn refuse(
    session: &mut Writer,
    origin: Option<&str>,
    code: ErrorCode,
    reason: &'static str,
) -> Option<Close> {
    refused(reason);
    warn!(
        origin = origin.unwrap_or("-"),
        reason, "federation link refused"
    );
    let frame = HandshakeFrame::Refuse {
        code,
        message: reason.to_owned(),
    };
    let _ = session.binary(frame.encode()).await;
    Some(Close::new(CloseCode::PeerRefused, reason))
}

/// An inbound link whose peer has authenticated, ready to [serve](Inbound::serve).
pub struct Inbound {
    origin: String,
    cipher: Cipher,
}

/// Authenticates the calling broker: its hello, the Noise `KK` handshake with the key pinned
/// for its domain, our welcome.
pub async fn handshake(fed: &Federation, socket: &mut Socket) -> Result<Inbound, Option<Close>> {
    let deadline = tokio::time::sleep(fed.settings().request_timeout);
    tokio::pin!(deadline);
    let bytes = loop {
        tokio::select! {
            () = &mut deadline => return Err(refuse(socket.writer(), None, ErrorCode::PeerAuthFailed, "no hello in time").await),
            read = socket.recv() => match read? {
                Some(bytes) => break bytes,
                None => continue,
            },
        }
    };
    let session = socket.writer();
    let (origin, target, noise) = match HandshakeFrame::decode(&bytes) {
        Ok(HandshakeFrame::Hello {
            origin,
            target,
            noise,
        }) => (origin, target, noise),
        _ => {
            return Err(refuse(
                session,
                None,
                ErrorCode::MalformedFrame,
                "not a federation hello",
            )
            .await);
        }
    };
    if target != fed.local_domain() {
        return Err(refuse(
            session,
            None,
            ErrorCode::UnknownPeer,
            "addressed to another domain",
        )
        .await);
    }
    if !fed.resolver().is_peer(&origin) {
        // The claimed origin is not a valid peer name: log it only if it is a peer's shape.
        let shown = sealpost_proto::Handle::parse(&format!("x@{origin}"))
            .ok()
            .map(|_| origin.as_str());
        return Err(refuse(
            session,
            shown,
            ErrorCode::UnknownPeer,
            "unknown peer domain",
        )
        .await);
    }
    let key = match fed.resolver().resolve(&origin).await {
        Ok((key, _)) => key,
        Err(reason) => {
            warn!(origin = %origin, reason = %reason, "peer key unavailable");
            return Err(refuse(
                session,
                Some(&origin),
                ErrorCode::PeerUnavailable,
                "peer key unavailable",
            )
            .await);
        }
    };
    let mut hs = match link::responder(fed.key(), &origin, &target, &key) {
        Ok(hs) => hs,
        Err(e) => {
            warn!(error = %e, "federation handshake could not start");
            return Err(Some(Close::new(CloseCode::GoingAway, "internal error")));
        }
    };
    let mut buf = [0u8; 256];
    if hs.read_message(&noise, &mut buf).is_err() {
        fed.resolver()
            .forget_older_than(&origin, UNAUTHENTICATED_REFRESH);
        return Err(refuse(
            session,
            Some(&origin),
            ErrorCode::PeerAuthFailed,
            "peer key does not match its domain",
        )
        .await);
    }
    let written = hs.write_message(&[], &mut buf);
    let cipher = match written.map_err(|e| e.to_string()).and_then(|n| {
        link::transport(hs)
            .map(|c| (n, c))
            .map_err(|e| e.to_string())
    }) {
        Ok((n, cipher)) => {
            let welcome = HandshakeFrame::Welcome {
                noise: buf[..n].to_vec(),
            };
            if session.binary(welcome.encode()).await.is_err() {
                return Err(None);
            }
            cipher
        }
        Err(e) => {
            warn!(error = %e, "federation handshake failed locally");
            return Err(Some(Close::new(CloseCode::GoingAway, "internal error")));
        }
    };
    Ok(Inbound { origin, cipher })
}

type TxnDone = LocalBoxFuture<'static, (u64, Vec<Option<ErrorCode>>)>;

impl Inbound {
    /// Serves the link to its end; returns the close to send, if any.
    pub async fn serve(
        self,
        fed: &Federation,
        local: Rc<dyn LocalDelivery>,
        socket: &mut Socket,
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<Close> {
        let Inbound { origin, cipher } = self;
        info!(origin = %origin, "federation link accepted");
        metrics::gauge!("sealpost_federation_inbound_links", "origin" => origin.clone())
            .increment(1.0);
        let mut link = InboundLink {
            fed,
            local,
            origin: &origin,
            cipher,
            txns: FuturesOrdered::new(),
            replies: FuturesUnordered::new(),
            rate_held: None,
        };
        let end = socket.drive(&mut link, &mut shutdown).await;
        metrics::gauge!("sealpost_federation_inbound_links", "origin" => origin.clone())
            .decrement(1.0);
        let reason = end.as_ref().map_or("closed", |c| c.code.as_str());
        info!(origin = %origin, reason, "federation link ended");
        end
    }
}

async fn send(session: &mut Writer, cipher: &mut Cipher, frame: &LinkFrame) -> bool {
    match cipher.seal(&frame.encode()) {
        Ok(sealed) => session.binary(sealed).await.is_ok(),
        Err(e) => {
            warn!(error = %e, "sealing a federation frame failed");
            false
        }
    }
}

/// Lookups answered at once on one link, at most.
const MAX_REPLIES: usize = 64;

/// The authenticated part of an inbound link.
struct InboundLink<'a> {
    fed: &'a Federation,
    local: Rc<dyn LocalDelivery>,
    origin: &'a str,
    cipher: Cipher,
    /// Transactions being persisted, acknowledged in order.
    txns: FuturesOrdered<TxnDone>,
    /// Lookups being answered.
    replies: FuturesUnordered<LocalBoxFuture<'static, LinkFrame>>,
    /// The first entry refused for the origin's rate (its id, and the recipient of an
    /// envelope: a group message has the id of its 1:1 copies elsewhere), until it comes back
    /// or expires.
    rate_held: Option<(EnvelopeId, Option<String>, Instant)>,
}

/// What became ready on an inbound link.
enum LinkEvent {
    /// A transaction is durable (or refused, envelope by envelope): acknowledge it.
    Persisted(u64, Vec<Option<ErrorCode>>),
    /// A lookup's answer.
    Reply(LinkFrame),
}

/// An entry of a transaction: an envelope, or a group message for all its recipients here.
enum Entry {
    One(FedEnvelope),
    Group(FedGroupEnvelope),
}

impl InboundLink<'_> {
    /// Hands a transaction's entries to their mailboxes, in order; its acknowledgement
    /// follows once every one is durable or refused (one answer per recipient).
    async fn persist(&mut self, txn_id: u64, entries: Vec<Entry>) {
        let origin = self.origin;
        let mut done: Vec<Routed> = Vec::with_capacity(entries.len());
        for entry in entries {
            // An entry counts once against the origin's rate, a group message too: its
            // recipients are bounded by the group limits, and its answers must all be the
            // same for the origin's resend to be able to pass.
            let (id, to, class, ttl_secs, answers) = match &entry {
                Entry::One(e) => (e.id, Some(e.to.clone()), e.class, e.ttl_secs, 1),
                Entry::Group(g) => (g.id, None, g.class, g.ttl_secs, g.recipients.len()),
            };
            let now = Instant::now();
            if self
                .rate_held
                .as_ref()
                .is_some_and(|(held, held_to, until)| {
                    (*held == id && *held_to == to) || *until <= now
                })
            {
                self.rate_held = None;
            }
            // Once one entry is over the limit, everything after it on this link is refused
            // too until it comes back (the origin resends from there) or expires, so that
            // nothing overtakes it.
            let mut over = false;
            if self.rate_held.is_none() && !self.fed.allow_origin(origin) {
                // An ephemeral envelope is never resent: refuse only it.
                over = true;
                if class != Class::Ephemeral {
                    let until = now + Duration::from_secs(ttl_secs.into());
                    self.rate_held = Some((id, to, until));
                }
            }
            if over || self.rate_held.is_some() {
                for _ in 0..answers {
                    crate::telemetry::reject(ErrorCode::RateLimited.as_str());
                    done.push(Box::pin(std::future::ready(Some(ErrorCode::RateLimited))));
                }
                continue;
            }
            match entry {
                Entry::One(e) => done.push(self.local.deliver(origin, e).await),
                // Each recipient gets its copies as if its envelope had come alone.
                Entry::Group(g) => {
                    for e in g.into_envelopes() {
                        done.push(self.local.deliver(origin, e).await);
                    }
                }
            }
        }
        self.txns
            .push_back(Box::pin(async move { (txn_id, join_all(done).await) }));
    }
}

impl Service for InboundLink<'_> {
    type Event = LinkEvent;

    async fn event(&mut self) -> LinkEvent {
        tokio::select! {
            Some((txn_id, codes)) = self.txns.next(), if !self.txns.is_empty() => {
                LinkEvent::Persisted(txn_id, codes)
            }
            Some(reply) = self.replies.next(), if !self.replies.is_empty() => LinkEvent::Reply(reply),
            else => std::future::pending().await,
        }
    }

    async fn on_event(&mut self, event: LinkEvent, out: &mut Writer) -> Flow {
        let frame = match event {
            LinkEvent::Persisted(txn_id, codes) => LinkFrame::TxnAck { txn_id, codes },
            LinkEvent::Reply(reply) => reply,
        };
        if send(out, &mut self.cipher, &frame).await {
            Ok(())
        } else {
            Err(None)
        }
    }

    fn reading(&self) -> bool {
        self.txns.len() < self.fed.settings().inbound_txns && self.replies.len() < MAX_REPLIES
    }

    async fn on_message(&mut self, sealed: Bytes, session: &mut Writer) -> Flow {
        let (fed, origin) = (self.fed, self.origin);
        let frame = match self
            .cipher
            .open(&sealed)
            .map_err(|e| e.to_string())
            .and_then(|plain| LinkFrame::decode(&plain).map_err(|e| e.to_string()))
        {
            Ok(frame) => frame,
            Err(reason) => {
                refused("malformed_frame");
                warn!(origin = %origin, reason = %reason, "federation frame refused; closing the link");
                let error = LinkFrame::LinkError {
                    code: ErrorCode::MalformedFrame,
                    message: "frame does not decode".into(),
                };
                let _ = send(session, &mut self.cipher, &error).await;
                return Err(Some(Close::new(
                    CloseCode::ProtocolError,
                    "malformed federation frame",
                )));
            }
        };
        match frame {
            LinkFrame::Txn { txn_id, envelopes } => {
                metrics::counter!("sealpost_federation_received_total", "origin" => origin.to_owned())
                    .increment(envelopes.len() as u64);
                self.persist(txn_id, envelopes.into_iter().map(Entry::One).collect())
                    .await;
            }
            LinkFrame::GroupTxn { txn_id, entries } => {
                metrics::counter!("sealpost_federation_received_total", "origin" => origin.to_owned())
                    .increment(entries.len() as u64);
                self.persist(txn_id, entries.into_iter().map(Entry::Group).collect())
                    .await;
            }
            request @ (LinkFrame::GetDevices { .. }
            | LinkFrame::GetDeviceList { .. }
            | LinkFrame::GetRoots { .. }
            | LinkFrame::Cosign { .. }
            | LinkFrame::ClaimKey { .. }
            | LinkFrame::TakeEpoch { .. }) => {
                if fed.allow_origin(origin) {
                    self.replies.push(self.local.answer(origin, request));
                } else {
                    let req_id = match request {
                        LinkFrame::GetDevices { req_id, .. }
                        | LinkFrame::GetDeviceList { req_id, .. }
                        | LinkFrame::GetRoots { req_id, .. }
                        | LinkFrame::Cosign { req_id, .. }
                        | LinkFrame::ClaimKey { req_id, .. }
                        | LinkFrame::TakeEpoch { req_id, .. } => req_id,
                        _ => 0,
                    };
                    let refusal = LinkFrame::Refused {
                        req_id,
                        code: ErrorCode::RateLimited,
                    };
                    if !send(session, &mut self.cipher, &refusal).await {
                        return Err(None);
                    }
                }
            }
            _ => {
                refused("wrong_direction");
                debug!(origin = %origin, "reply frame on an inbound link");
                let error = LinkFrame::LinkError {
                    code: ErrorCode::UnknownFrameType,
                    message: "only requests are accepted on this link".into(),
                };
                let _ = send(session, &mut self.cipher, &error).await;
                return Err(Some(Close::new(
                    CloseCode::ProtocolError,
                    "wrong frame direction",
                )));
            }
        }
        Ok(())
    }

    /// Acknowledges what is being persisted; the sender resends the rest elsewhere or later.
    async fn on_shutdown(&mut self, session: &mut Writer) -> Drain {
        let mut close = Some(Close::new(CloseCode::GoingAway, "server shutting down"));
        while let Some((txn_id, codes)) = self.txns.next().await {
            let ack = LinkFrame::TxnAck { txn_id, codes };
            if !send(session, &mut self.cipher, &ack).await {
                close = None;
                break;
            }
        }
        Drain {
            read_for: Duration::ZERO,
            close,
        }
    }
}
