//! The receiving side of a link (`/v1/federation`): authenticate the calling broker, then
//! persist its transactions into local mailboxes and answer its lookups.
//!
//! ```text
//! hello ──▶ target is us? origin a known peer? KK handshake with origin's pinned key ──▶ welcome
//!   (any failure: refuse frame, close `peer_refused`, one log line with the claimed origin and
//!    the reason — never content)
//! txn   ──▶ per envelope, in order: per-origin rate limit, then LocalDelivery::deliver
//!           (enqueued at once, so order is kept) ──▶ all durable ──▶ txn_ack
//! get_devices / get_device_list / claim_key ──▶ LocalDelivery::answer ──▶ reply
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
use actix_ws::{AggregatedMessage, AggregatedMessageStream};
use futures_util::{
    StreamExt,
    future::{LocalBoxFuture, join_all},
    stream::{FuturesOrdered, FuturesUnordered},
};
use sealpost_proto::{
    Class, CloseCode, EnvelopeId, ErrorCode,
    federation::{FedEnvelope, HandshakeFrame, LinkFrame},
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    Federation,
    link::{self, Cipher},
};
use crate::ws::Writer;

/// Local delivery, as the receiving side of a link needs it. Implemented by the gateway with
/// mailboxes, so that federation does not depend on them.
pub trait LocalDelivery {
    /// Stores an envelope for a local user. Called in transaction order; the envelope must be
    /// queued for its mailbox before this returns, so that order is kept. The future resolves
    /// once it is durable (`None`) or refused.
    fn deliver(
        &self,
        origin: &str,
        envelope: FedEnvelope,
    ) -> LocalBoxFuture<'static, Option<ErrorCode>>;
    /// Answers a lookup (`GetDevices`, `GetDeviceList`, `ClaimKey`) with its reply frame.
    fn answer(&self, origin: &str, request: LinkFrame) -> LocalBoxFuture<'static, LinkFrame>;
}

/// How often hellos that do not authenticate may make us fetch a peer's key again.
const UNAUTHENTICATED_REFRESH: Duration = Duration::from_secs(60);

fn refused(reason: &'static str) {
    metrics::counter!("sealpost_federation_links_refused_total", "reason" => reason).increment(1);
}

/// Reads the next binary message; `Err` carries the close to send (if any).
async fn next_binary(
    session: &mut Writer,
    stream: &mut AggregatedMessageStream,
) -> Result<Option<Bytes>, Option<(CloseCode, String)>> {
    binary_of(session, stream.recv().await).await
}

/// What one read means, with a ping or a close frame answered. Call it outside `select!`
/// (in a branch's body): an answer cancelled halfway would be lost.
async fn binary_of(
    session: &mut Writer,
    read: Option<Result<AggregatedMessage, actix_ws::ProtocolError>>,
) -> Result<Option<Bytes>, Option<(CloseCode, String)>> {
    match read {
        Some(Ok(AggregatedMessage::Binary(bytes))) => Ok(Some(bytes)),
        Some(Ok(AggregatedMessage::Ping(p))) => match session.pong(&p).await {
            Ok(()) => Ok(None),
            Err(_) => Err(None),
        },
        Some(Ok(AggregatedMessage::Pong(_))) => Ok(None),
        Some(Ok(AggregatedMessage::Text(_))) => Err(Some((
            CloseCode::ProtocolError,
            "federation frames are binary".into(),
        ))),
        Some(Ok(AggregatedMessage::Close(_))) => {
            session.echo_close().await;
            Err(None)
        }
        None => Err(None),
        Some(Err(e)) => Err(Some((CloseCode::ProtocolError, e.to_string()))),
    }
}

async fn refuse(
    session: &mut Writer,
    origin: Option<&str>,
    code: ErrorCode,
    reason: &'static str,
) -> Option<(CloseCode, String)> {
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
    Some((CloseCode::PeerRefused, reason.to_owned()))
}

/// Authenticates the calling broker; returns its domain and the link's cipher.
async fn handshake(
    fed: &Federation,
    session: &mut Writer,
    stream: &mut AggregatedMessageStream,
) -> Result<(String, Cipher), Option<(CloseCode, String)>> {
    let deadline = tokio::time::sleep(fed.settings().request_timeout);
    tokio::pin!(deadline);
    let bytes = loop {
        tokio::select! {
            () = &mut deadline => return Err(refuse(session, None, ErrorCode::PeerAuthFailed, "no hello in time").await),
            next = next_binary(session, stream) => match next? {
                Some(bytes) => break bytes,
                None => continue,
            },
        }
    };
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
            return Err(Some((CloseCode::GoingAway, "internal error".into())));
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
            return Err(Some((CloseCode::GoingAway, "internal error".into())));
        }
    };
    Ok((origin, cipher))
}

type TxnDone = LocalBoxFuture<'static, (u64, Vec<Option<ErrorCode>>)>;

/// Serves one inbound link to its end; returns the close to send, if any.
pub async fn serve(
    fed: &Federation,
    local: Rc<dyn LocalDelivery>,
    session: &mut Writer,
    mut stream: AggregatedMessageStream,
    mut shutdown: watch::Receiver<bool>,
) -> Option<(CloseCode, String)> {
    let (origin, mut cipher) = match handshake(fed, session, &mut stream).await {
        Ok(ok) => ok,
        Err(end) => return end,
    };
    info!(origin = %origin, "federation link accepted");
    metrics::gauge!("sealpost_federation_inbound_links", "origin" => origin.clone()).increment(1.0);
    let end = relay(
        fed,
        local,
        session,
        &mut stream,
        &mut shutdown,
        &origin,
        &mut cipher,
    )
    .await;
    metrics::gauge!("sealpost_federation_inbound_links", "origin" => origin.clone()).decrement(1.0);
    info!(origin = %origin, reason = end.as_ref().map_or("closed", |(c, _)| c.as_str()), "federation link ended");
    end
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

async fn relay(
    fed: &Federation,
    local: Rc<dyn LocalDelivery>,
    session: &mut Writer,
    stream: &mut AggregatedMessageStream,
    shutdown: &mut watch::Receiver<bool>,
    origin: &str,
    cipher: &mut Cipher,
) -> Option<(CloseCode, String)> {
    let settings = fed.settings();
    let mut txns: FuturesOrdered<TxnDone> = FuturesOrdered::new();
    let mut replies: FuturesUnordered<LocalBoxFuture<'static, LinkFrame>> = FuturesUnordered::new();
    let mut heartbeat = tokio::time::interval(settings.heartbeat);
    heartbeat.tick().await;
    let mut last_heard = Instant::now();
    let max_replies = 64;
    // The first envelope refused for the origin's rate, until it comes back or expires.
    let mut rate_held: Option<(EnvelopeId, Instant)> = None;
    loop {
        if session.stalled() {
            return None;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                // Acknowledge what is being persisted; the sender resends the rest elsewhere
                // or later.
                while let Some((txn_id, codes)) = txns.next().await {
                    if !send(session, cipher, &LinkFrame::TxnAck { txn_id, codes }).await { return None }
                }
                return Some((CloseCode::GoingAway, "server shutting down".into()));
            }
            Some((txn_id, codes)) = txns.next(), if !txns.is_empty() => {
                if !send(session, cipher, &LinkFrame::TxnAck { txn_id, codes }).await { return None }
            }
            Some(reply) = replies.next(), if !replies.is_empty() => {
                if !send(session, cipher, &reply).await { return None }
            }
            read = stream.recv(), if txns.len() < settings.inbound_txns && replies.len() < max_replies => {
                last_heard = Instant::now();
                let next = binary_of(session, read).await;
                let sealed = match next {
                    Ok(Some(b)) => b,
                    Ok(None) => continue,
                    Err(end) => return end,
                };
                let frame = match cipher.open(&sealed).map_err(|e| e.to_string())
                    .and_then(|plain| LinkFrame::decode(&plain).map_err(|e| e.to_string()))
                {
                    Ok(frame) => frame,
                    Err(reason) => {
                        refused("malformed_frame");
                        warn!(origin = %origin, reason = %reason, "federation frame refused; closing the link");
                        let _ = send(session, cipher, &LinkFrame::LinkError {
                            code: ErrorCode::MalformedFrame,
                            message: "frame does not decode".into(),
                        }).await;
                        return Some((CloseCode::ProtocolError, "malformed federation frame".into()));
                    }
                };
                match frame {
                    LinkFrame::Txn { txn_id, envelopes } => {
                        metrics::counter!("sealpost_federation_received_total", "origin" => origin.to_owned())
                            .increment(envelopes.len() as u64);
                        // Once one envelope is over the limit, everything after it on this
                        // link is refused too until it comes back (the origin resends from
                        // there) or expires, so that nothing overtakes it.
                        let done: Vec<_> = envelopes
                            .into_iter()
                            .map(|e| {
                                let now = Instant::now();
                                if rate_held.is_some_and(|(first, until)| first == e.id || until <= now) {
                                    rate_held = None;
                                }
                                let mut over = false;
                                if rate_held.is_none() && !fed.allow_origin(origin) {
                                    // An ephemeral envelope is never resent: refuse only it.
                                    over = true;
                                    if e.class != Class::Ephemeral {
                                        rate_held = Some((e.id, now + Duration::from_secs(e.ttl_secs.into())));
                                    }
                                }
                                if over || rate_held.is_some() {
                                    crate::telemetry::reject(ErrorCode::RateLimited.as_str());
                                    Box::pin(std::future::ready(Some(ErrorCode::RateLimited)))
                                } else {
                                    local.deliver(origin, e)
                                }
                            })
                            .collect();
                        txns.push_back(Box::pin(async move { (txn_id, join_all(done).await) }));
                    }
                    request @ (LinkFrame::GetDevices { .. }
                    | LinkFrame::GetDeviceList { .. }
                    | LinkFrame::ClaimKey { .. }) => {
                        if fed.allow_origin(origin) {
                            replies.push(local.answer(origin, request));
                        } else {
                            let req_id = match request {
                                LinkFrame::GetDevices { req_id, .. }
                                | LinkFrame::GetDeviceList { req_id, .. }
                                | LinkFrame::ClaimKey { req_id, .. } => req_id,
                                _ => 0,
                            };
                            let refusal = LinkFrame::Refused { req_id, code: ErrorCode::RateLimited };
                            if !send(session, cipher, &refusal).await { return None }
                        }
                    }
                    _ => {
                        refused("wrong_direction");
                        debug!(origin = %origin, "reply frame on an inbound link");
                        let _ = send(session, cipher, &LinkFrame::LinkError {
                            code: ErrorCode::UnknownFrameType,
                            message: "only requests are accepted on this link".into(),
                        }).await;
                        return Some((CloseCode::ProtocolError, "wrong frame direction".into()));
                    }
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > settings.idle_timeout
                    && (txns.len() >= settings.inbound_txns || replies.len() >= max_replies)
                {
                    // Not reading was our doing (transactions wait for local mailboxes).
                    return Some((CloseCode::GoingAway, "transactions are not being answered in time".into()));
                }
                if last_heard.elapsed() > settings.idle_timeout {
                    return Some((CloseCode::IdleTimeout, "no traffic within the link timeout".into()));
                }
                if session.ping(b"").await.is_err() { return None }
            }
        }
    }
}
