//! One WebSocket device session: authenticate, attach to the mailbox, then relay frames.
//!
//! ```text
//! socket ──frames──▶ decode ─▶ auth ─▶ attach(mailbox) ──▶ loop:
//!                                        incoming: send ─▶ Submit(recipient mailbox), answered when durable
//!                                                  ack  ─▶ Ack(own mailbox)
//!                                        outgoing: deliveries pushed by the mailbox (bounded channel)
//!                                        timers:   ping every heartbeat, close when silent
//! ```
//!
//! Protocol violations (undecodable frames, text frames, unsupported versions) get an `error`
//! frame and a close with a reason; request-level problems (unknown recipient, bad ttl, ...)
//! get an error answer and the connection carries on.

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use actix_web::{ResponseError as _, dev::RequestHead, web::Bytes};
use rand::Rng;
use sealpost_proto::{
    ClientFrame, CloseCode, DecodeError, DeviceId, EnvelopeId, ErrorCode, Handle, SendOutcome,
    ServerFrame,
    limits::{MAX_ACKS_PER_FRAME, MAX_BATCH_BYTES, MAX_BATCH_FRAMES, MAX_FRAME_BYTES},
};
use tokio::sync::oneshot;
use tracing::debug;
use zeroize::{Zeroize, Zeroizing};

use super::{
    AppState,
    error::ApiError,
    group::{self, GroupFrom},
    limits::{PreAuthFull, PreAuthSlot},
    pending::{Answer, Pending},
    route::{From, Send},
    tickets::Redeemed,
};
use crate::{
    clock::now_ms,
    crypto::DeviceToken,
    mailbox::{Conn, MailboxError, push_queue},
    socket::{Close, Drain, Flow, Service, Socket, Upgrade, Writer},
    telemetry,
};

/// `GET /v1/ws`: admits the upgrade, answers it, and runs the session on the connection.
pub(crate) async fn serve(state: Arc<AppState>, upgrade: Upgrade) {
    let admitted = admit(&state, upgrade.head()).and_then(|ip| admit_unauthenticated(&state, ip));
    let slot = match admitted {
        Ok(slot) => slot,
        Err(refused) => return upgrade.refuse(refused.error_response()).await,
    };
    // A client that reads `batch` messages says so (older ones do not: see the protocol doc).
    let batching = upgrade.query().split('&').any(|p| p == "batch=1");
    if let Some(socket) = upgrade.accept(state.socket_limits(MAX_FRAME_BYTES)).await {
        run(state, socket, slot, batching).await;
    }
}

/// A slot among the connections that have not authenticated yet: over the per-address cap is
/// `rate_limited` (429), over the broker's `unavailable` (503).
pub(crate) fn admit_unauthenticated(
    state: &AppState,
    ip: Option<IpAddr>,
) -> Result<PreAuthSlot, ApiError> {
    state.pre_auth.admit(ip).map_err(|full| {
        metrics::counter!("sealpost_unauthenticated_refused_total", "scope" => match full {
            PreAuthFull::Source => "source",
            PreAuthFull::Total => "total",
        })
        .increment(1);
        match full {
            PreAuthFull::Source => ApiError::RateLimited,
            PreAuthFull::Total => ApiError::Unavailable,
        }
    })
}

/// The admission every WebSocket endpoint shares: refused while shutting down or over the
/// per-IP rate. Returns the client's address.
pub(crate) fn admit(state: &AppState, req: &RequestHead) -> Result<Option<IpAddr>, ApiError> {
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable);
    }
    let ip = state.client_ip(req);
    if let Some(ip) = ip
        && !state.limits.allow_ip(ip)
    {
        return Err(ApiError::RateLimited);
    }
    Ok(ip)
}

pub(crate) fn error_frame(code: ErrorCode, message: impl Into<String>, seq: Option<u64>) -> Bytes {
    telemetry::reject(code.as_str());
    Bytes::from(
        ServerFrame::Error {
            code,
            message: message.into(),
            seq,
        }
        .encode(),
    )
}

/// What authentication established.
struct Authed {
    user: Handle,
    device: DeviceId,
}

/// Reads frames until `auth` arrives and verifies it.
async fn authenticate(state: &AppState, socket: &mut Socket) -> Result<Authed, Option<Close>> {
    let deadline = tokio::time::sleep(state.settings.auth_timeout);
    tokio::pin!(deadline);
    let bytes = loop {
        tokio::select! {
            () = &mut deadline => {
                return Err(Some(Close::new(CloseCode::AuthFailed, "no auth frame in time")));
            }
            read = socket.recv() => match read? {
                Some(bytes) => break bytes,
                None => continue,
            },
        }
    };
    let session = socket.writer();
    let mut bytes = bytes;
    let decoded = ClientFrame::decode(&bytes);
    // The frame carried the device's token: wipe it rather than leave it in freed memory.
    bytes.as_mut().zeroize();
    let (user, device, token) = match decoded {
        Ok(ClientFrame::Auth {
            user,
            device,
            token,
        }) => (user, device, Zeroizing::new(token)),
        Ok(_) => {
            let msg = "the first frame must be auth";
            return refuse(session, ErrorCode::NotAuthenticated, msg).await;
        }
        Err(e) => {
            let _ = session
                .binary(error_frame(e.code(), e.to_string(), None))
                .await;
            return Err(Some(decode_close(&e)));
        }
    };
    // Malformed handle, malformed token, unknown user, unknown device and wrong token all look
    // the same to the client.
    let Ok(user) = Handle::parse(&user) else {
        return refuse(session, ErrorCode::BadToken, "bad credentials").await;
    };
    let Some(secret) = DeviceToken::from_bytes(&token) else {
        return refuse(session, ErrorCode::BadToken, "bad credentials").await;
    };
    let record = match state.store.directory.device(user.as_str(), device.0).await {
        Ok(r) => r,
        Err(_) => return refuse(session, ErrorCode::StoreUnavailable, "store unavailable").await,
    };
    // The device must exist either way: a removed device's tickets die with it.
    let Some(record) = record else {
        return refuse(session, ErrorCode::BadToken, "bad credentials").await;
    };
    if state.hasher.verify(&secret, &record.token_hash) {
        return Ok(Authed { user, device });
    }
    let now = now_ms();
    match state
        .hasher
        .check_ticket(user.as_str(), device.0, &token, now)
    {
        Some(nonce) => match state.spent_tickets.redeem(nonce, now) {
            // Fresh here; with pods sharing a store, fresh everywhere only if the store says.
            Redeemed::Fresh => match state
                .store
                .directory
                .spend_ticket(nonce, now + 2 * crate::crypto::TICKET_WINDOW_MS)
                .await
            {
                Ok(None | Some(true)) => Ok(Authed { user, device }),
                Ok(Some(false)) => refuse(session, ErrorCode::BadToken, "bad credentials").await,
                Err(_) => refuse(session, ErrorCode::StoreUnavailable, "try again shortly").await,
            },
            Redeemed::Spent => refuse(session, ErrorCode::BadToken, "bad credentials").await,
            Redeemed::Full => {
                let msg = "too many logins by ticket; try again shortly";
                refuse(session, ErrorCode::RateLimited, msg).await
            }
        },
        None => refuse(session, ErrorCode::BadToken, "bad credentials").await,
    }
}

/// Refuses authentication: an `error` frame saying why, then a close with `auth_failed`.
async fn refuse(session: &mut Writer, code: ErrorCode, msg: &str) -> Result<Authed, Option<Close>> {
    let _ = session.binary(error_frame(code, msg, None)).await;
    Err(Some(Close::new(CloseCode::AuthFailed, msg.to_owned())))
}

/// Answers a refused send.
pub(crate) async fn reject_send(session: &mut Writer, id: EnvelopeId, code: ErrorCode) {
    telemetry::reject(code.as_str());
    let outcome = SendOutcome::Rejected {
        code,
        current_devices: Vec::new(),
    };
    let _ = session
        .binary(ServerFrame::SendResult { id, outcome }.encode())
        .await;
}

/// Answers a frame over the rate limit: a send gets its `send_result`, anything else an
/// `error` frame.
pub(crate) async fn refuse_over_rate(
    session: &mut Writer,
    decoded: &Result<ClientFrame, DecodeError>,
) {
    match decoded {
        Ok(ClientFrame::Send { id, .. } | ClientFrame::SealedSend { id, .. }) => {
            reject_send(session, *id, ErrorCode::RateLimited).await;
        }
        Ok(ClientFrame::GroupSend { id, .. }) => {
            let answer = group::refused(*id, ErrorCode::RateLimited, None);
            let _ = session.binary(answer.encode()).await;
        }
        _ => {
            let _ = session
                .binary(error_frame(ErrorCode::RateLimited, "slow down", None))
                .await;
        }
    }
}

/// The frame, if it decoded. An unknown frame type (possibly from a newer client) is refused
/// and the connection kept (`Ok(None)`); anything else undecodable gets an `error` frame and
/// ends the connection.
pub(crate) async fn accept_decoded(
    session: &mut Writer,
    decoded: Result<ClientFrame, DecodeError>,
) -> Result<Option<ClientFrame>, Option<Close>> {
    match decoded {
        Ok(frame) => Ok(Some(frame)),
        Err(DecodeError::UnknownFrameType(kind)) => {
            let msg = format!("unknown frame type {kind:#04x}");
            let frame = error_frame(ErrorCode::UnknownFrameType, msg, None);
            let _ = session.binary(frame).await;
            Ok(None)
        }
        Err(e) => {
            let _ = session
                .binary(error_frame(e.code(), e.to_string(), None))
                .await;
            Err(Some(decode_close(&e)))
        }
    }
}

/// The close for a frame that does not decode. The caller has already sent (and counted) the
/// `error` frame.
pub(crate) fn decode_close(e: &DecodeError) -> Close {
    match e {
        DecodeError::TooLarge(_) => Close::new(CloseCode::TooBig, e.to_string()),
        _ => Close::new(CloseCode::ProtocolError, e.to_string()),
    }
}

/// Runs one connection to its end.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn run(
    state: Arc<AppState>,
    mut socket: Socket,
    slot: PreAuthSlot,
    batching: bool,
) -> impl Future<Output = ()> {
    async move {
        let _open = OpenGuard::new(&state);
        // Boxed, here and for the closes below: the task keeps its largest state for its whole
        // life, and these run once.
        let authed = match Box::pin(authenticate(&state, &mut socket)).await {
            Ok(a) => a,
            Err(close) => return Box::pin(socket.finish(close)).await,
        };
        drop(slot);
        let conn_id = state.next_conn.fetch_add(1, Ordering::Relaxed);
        let capacity = state.settings.delivery_window * 2 + 16;
        let (tx, pushes) = push_queue::channel(capacity);
        let (kick_tx, kick) = oneshot::channel();
        let conn = Conn {
            id: conn_id,
            tx,
            kick: kick_tx,
        };
        let attached = state
            .mailboxes
            .attach(authed.user.as_str(), authed.device, conn)
            .await;
        match attached {
            Ok(()) => {}
            Err(MailboxError::Refused(_)) => {
                // Removed between authentication and attaching.
                let close = Close::new(CloseCode::AuthFailed, "device unavailable");
                return Box::pin(socket.finish(Some(close))).await;
            }
            Err(MailboxError::Unavailable) => {
                // The mailbox could not start (the store is failing): not the client's fault,
                // so it reconnects later rather than treating its credentials as bad.
                let close =
                    Close::new(CloseCode::GoingAway, "mailbox unavailable, try again later");
                return Box::pin(socket.finish(Some(close))).await;
            }
        }
        let hello = ServerFrame::AuthOk {
            user: authed.user.to_string(),
            device: authed.device,
            server_time_ms: now_ms(),
        };
        if socket.writer().binary(hello.encode()).await.is_err() {
            detach(&state, &authed, conn_id);
            return;
        }
        debug!(device = authed.device.0, "device connected");

        let mut session = DeviceSession {
            state: &state,
            authed: &authed,
            conn_id,
            violations: 0,
            pending: Pending::default(),
            pushes,
            kick,
            draining: false,
            batching,
        };
        let mut shutdown = state.shutdown.clone();
        let end = socket.drive(&mut session, &mut shutdown).await;
        detach(&state, &authed, conn_id);
        Box::pin(socket.finish(end)).await;
    }
}

/// Counts a session as open until dropped (also when its task panics): shutdown waits for
/// open sessions, and `/metrics` reports them.
pub(crate) struct OpenGuard<'a>(&'a AppState);

impl<'a> OpenGuard<'a> {
    pub(crate) fn new(state: &'a AppState) -> Self {
        state.open_sessions.fetch_add(1, Ordering::Relaxed);
        OpenGuard(state)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

fn detach(state: &AppState, authed: &Authed, conn: u64) {
    state
        .mailboxes
        .detach(authed.user.as_str(), authed.device, conn);
}

/// The authenticated part of a device session.
struct DeviceSession<'a> {
    state: &'a Arc<AppState>,
    authed: &'a Authed,
    conn_id: u64,
    /// Rate-limit violations so far; past the configured maximum the connection is closed.
    violations: u32,
    /// This device's sends awaiting their results.
    pending: Pending,
    /// Deliveries the mailbox pushes to this connection.
    pushes: push_queue::Receiver,
    /// The mailbox closing this connection (displaced, revoked, slow consumer).
    kick: oneshot::Receiver<CloseCode>,
    /// Shutdown began: acks are still taken, sends are refused.
    draining: bool,
    /// The client reads `batch` messages: pushes that are ready together go as one.
    batching: bool,
}

impl DeviceSession<'_> {
    /// Writes a pushed frame, with the others already queued behind it in one `batch` message
    /// when the client reads those: a backlog or a burst costs one WebSocket message and one
    /// socket write per batch instead of per frame.
    async fn write_pushes(&mut self, first: Bytes, out: &mut Writer) -> Flow {
        if !self.batching {
            return out.binary(first).await.map_err(|_| None);
        }
        // What is queued now (a corked page of a backlog, a burst) goes in as few messages as
        // the batch limits allow; a frame that does not fit starts the next one.
        let mut next = Some(first);
        while let Some(first) = next.take() {
            let mut bytes = first.len();
            let mut frames = vec![first];
            while frames.len() < MAX_BATCH_FRAMES {
                let Ok(frame) = self.pushes.try_recv() else {
                    break;
                };
                if bytes + frame.len() > MAX_BATCH_BYTES {
                    next = Some(frame);
                    break;
                }
                bytes += frame.len();
                frames.push(frame);
            }
            if frames.len() == MAX_BATCH_FRAMES {
                next = self.pushes.try_recv().ok();
            }
            let message = match frames.len() {
                // Alone (nothing else was ready, or it is large: a group message).
                1 => frames.pop().expect("one frame"),
                n => {
                    crate::telemetry::BATCH_FRAMES.record(n as f64);
                    Bytes::from(ServerFrame::encode_batch(&frames))
                }
            };
            drop(frames);
            out.binary(message).await.map_err(|_| None)?;
        }
        Ok(())
    }
}

/// What the mailbox or the store has for a device session.
enum DeviceEvent {
    /// The mailbox closed the connection (`None`: the mailbox stopped, at shutdown).
    Kicked(Option<CloseCode>),
    /// A frame the mailbox pushed (`None`: the mailbox stopped).
    Push(Option<Bytes>),
    /// A send's result.
    Answer(ServerFrame),
}

impl Service for DeviceSession<'_> {
    type Event = DeviceEvent;

    async fn event(&mut self) -> DeviceEvent {
        tokio::select! {
            biased;
            reason = &mut self.kick => DeviceEvent::Kicked(reason.ok()),
            frame = self.pushes.recv() => DeviceEvent::Push(frame),
            answer = self.pending.answer() => DeviceEvent::Answer(answer),
        }
    }

    async fn on_event(&mut self, event: DeviceEvent, out: &mut Writer) -> Flow {
        match event {
            // The mailbox counted the disconnect when it kicked.
            DeviceEvent::Kicked(Some(code)) => Err(Some(Close::code(code).already_counted())),
            DeviceEvent::Kicked(None) => Err(Some(Close::code(CloseCode::GoingAway))),
            DeviceEvent::Push(Some(frame)) => self.write_pushes(frame, out).await,
            DeviceEvent::Push(None) => {
                Err(Some(Close::new(CloseCode::GoingAway, "mailbox stopped")))
            }
            DeviceEvent::Answer(answer) => out.binary(answer.encode()).await.map_err(|_| None),
        }
    }

    fn reading(&self) -> bool {
        self.pending.len() < self.state.settings.max_pending_sends
    }

    async fn on_message(&mut self, bytes: Bytes, session: &mut Writer) -> Flow {
        // Every frame counts against the device's rate, also one that is refused below.
        let decoded = ClientFrame::decode(&bytes);
        if !self
            .state
            .limits
            .allow_device(self.authed.user.as_str(), self.authed.device.0)
        {
            self.violations += 1;
            if self.violations > self.state.settings.max_violations {
                return Err(Some(Close::new(CloseCode::RateLimited, "too many frames")));
            }
            refuse_over_rate(session, &decoded).await;
            return Ok(());
        }
        let Some(frame) = accept_decoded(session, decoded).await? else {
            return Ok(());
        };
        match frame {
            ClientFrame::Auth { .. } => {
                let frame = error_frame(
                    ErrorCode::AlreadyAuthenticated,
                    "already authenticated",
                    None,
                );
                let _ = session.binary(frame).await;
            }
            ClientFrame::Send { id, .. } if self.draining => {
                reject_send(session, id, ErrorCode::ShuttingDown).await;
            }
            ClientFrame::Send {
                id,
                to,
                class,
                ttl_secs,
                copies,
            } => {
                let send = Send {
                    id,
                    to,
                    class,
                    ttl_secs,
                    copies,
                    from: From::Device,
                    copy_limit: sealpost_proto::limits::MAX_CIPHERTEXT_BYTES,
                };
                match self.state.route(send).await {
                    Ok(pending) => self.pending.push(Answer::Send(pending)),
                    Err(code) => reject_send(session, id, code).await,
                }
            }
            ClientFrame::GroupSend { id, .. } if self.draining => {
                let answer = group::refused(id, ErrorCode::ShuttingDown, None);
                let _ = session.binary(answer.encode()).await;
            }
            frame @ ClientFrame::GroupSend { .. } => {
                group::take(
                    self.state,
                    frame,
                    GroupFrom::Device,
                    &mut self.pending,
                    session,
                )
                .await;
            }
            // A sealed send on the connection that names its sender would undo the sealing:
            // sealed sends belong on the anonymous `/v1/sealed`.
            ClientFrame::SealedSend { id, .. } => {
                reject_send(session, id, ErrorCode::WrongEndpoint).await;
            }
            ClientFrame::Ack { seqs } => {
                if seqs.len() > MAX_ACKS_PER_FRAME {
                    let msg = format!("at most {MAX_ACKS_PER_FRAME} seqs per ack");
                    let _ = session
                        .binary(error_frame(ErrorCode::MalformedFrame, msg, None))
                        .await;
                    return Ok(());
                }
                // Not awaited: the mailbox reports unknown seqs on this connection itself.
                let acked = self.state.mailboxes.ack_pipelined(
                    self.authed.user.as_str(),
                    self.authed.device,
                    self.conn_id,
                    seqs,
                );
                if acked.await.is_err() {
                    return Err(Some(Close::new(
                        CloseCode::GoingAway,
                        "mailbox unavailable, try again later",
                    )));
                }
            }
        }
        Ok(())
    }

    /// On shutdown: answer the sends already accepted, then go on taking acks (new sends are
    /// refused with `shutting_down`) and close after a jitter, so that clients do not all
    /// reconnect at once. The jitter is at least half the drain window: every client has
    /// that long to acknowledge what it was just delivered.
    async fn on_shutdown(&mut self, session: &mut Writer) -> Drain {
        self.draining = true;
        self.pending.drain(session).await;
        let window = self
            .state
            .settings
            .shutdown_drain
            .max(Duration::from_millis(2));
        Drain {
            read_for: rand::thread_rng().gen_range(window / 2..window),
            close: Some(Close::new(CloseCode::GoingAway, "server shutting down")),
        }
    }
}
