//! One WebSocket device session: authenticate, attach to the mailbox, then relay frames.
//!
//! ```text
//! socket ──frames──▶ decode ─▶ auth ─▶ Attach(mailbox) ──▶ loop:
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
    time::{Duration, Instant},
};

use actix_web::{HttpRequest, HttpResponse, web, web::Bytes};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseReason};
use futures_util::{Stream, StreamExt, stream::FuturesUnordered};
use rand::Rng;
use sealpost_proto::{
    ClientFrame, CloseCode, DecodeError, DeviceId, EnvelopeId, ErrorCode, Handle, SendOutcome,
    ServerFrame,
    limits::{MAX_ACKS_PER_FRAME, MAX_FRAME_BYTES},
};
use tokio::sync::oneshot;
use tracing::debug;

use super::{
    AppState,
    error::ApiError,
    submit::{PendingSend, submit, validate_send},
};
use crate::{
    clock::now_ms,
    crypto::DeviceToken,
    mailbox::{
        Conn,
        messages::{Ack, Attach, Detach},
        outbox,
    },
    telemetry,
    ws::Writer,
};

/// `GET /v1/ws`: upgrades and spawns the session task.
pub async fn upgrade(
    state: web::Data<Arc<AppState>>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, session, stream, _) = accept(&state, &req, body)?;
    let state: Arc<AppState> = Arc::clone(state.get_ref());
    actix_web::rt::spawn(run(state, session, stream));
    Ok(response)
}

/// The admission and set-up every device-facing WebSocket shares: refused while shutting down
/// or over the per-IP limit; frames capped at [`MAX_FRAME_BYTES`], continuations aggregated.
pub(crate) fn accept(
    state: &AppState,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<
    (
        HttpResponse,
        Writer,
        AggregatedMessageStream,
        Option<IpAddr>,
    ),
    actix_web::Error,
> {
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable.into());
    }
    let ip = state.client_ip(req);
    if let Some(ip) = ip
        && !state.limits.allow_ip(ip)
    {
        return Err(ApiError::RateLimited.into());
    }
    let (response, session, stream) = actix_ws::handle(req, body)?;
    let stream = stream
        .max_frame_size(MAX_FRAME_BYTES)
        .aggregate_continuations()
        .max_continuation_size(MAX_FRAME_BYTES);
    // A client that takes nothing off the connection for as long as it may stay silent is gone.
    let write_deadline = Duration::from_millis(state.settings.client_timeout_ms);
    Ok((response, Writer::new(session, write_deadline), stream, ip))
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

pub(crate) async fn close(session: Writer, code: CloseCode, description: Option<String>) {
    metrics::counter!("sealpost_disconnects_total", "reason" => code.as_str()).increment(1);
    send_close(session, code, description).await;
}

/// Closes without counting: for kicks, which the mailbox counted when it kicked.
async fn send_close(session: Writer, code: CloseCode, description: Option<String>) {
    let reason = CloseReason {
        code: actix_ws::CloseCode::Other(code.as_u16()),
        description: Some(description.unwrap_or_else(|| code.as_str().to_owned())),
    };
    session.close(reason).await;
}

/// What authentication established.
struct Authed {
    user: Handle,
    device: DeviceId,
}

/// The result of one step of reading: a frame, or the connection should end with a close.
pub(crate) enum Incoming {
    Frame(Bytes),
    Control,
    /// The client sent a close frame: answer it (the closing handshake), then end.
    Closed,
    End(Option<(CloseCode, String)>),
}

/// Reads and [settles](settle) the next message.
pub(crate) async fn next_incoming(
    session: &mut Writer,
    stream: &mut AggregatedMessageStream,
) -> Incoming {
    settle(session, stream.recv().await).await
}

/// What one read means, with a ping or a close frame answered. Call it outside `select!`
/// (in a branch's body): an answer cancelled halfway would be lost.
pub(crate) async fn settle(
    session: &mut Writer,
    read: Option<Result<AggregatedMessage, actix_ws::ProtocolError>>,
) -> Incoming {
    match classify(read) {
        Ok(Incoming::Closed) => {
            session.echo_close().await;
            Incoming::End(None)
        }
        Ok(incoming) => incoming,
        Err(ping) => match session.pong(&ping).await {
            Ok(()) => Incoming::Control,
            Err(_) => Incoming::End(None),
        },
    }
}

/// What one read from the socket means; a ping is returned as its payload, to be answered.
fn classify(
    read: Option<Result<AggregatedMessage, actix_ws::ProtocolError>>,
) -> Result<Incoming, Bytes> {
    Ok(match read {
        Some(Ok(AggregatedMessage::Binary(bytes))) => Incoming::Frame(bytes),
        Some(Ok(AggregatedMessage::Ping(p))) => return Err(p),
        Some(Ok(AggregatedMessage::Pong(_))) => Incoming::Control,
        Some(Ok(AggregatedMessage::Text(_))) => Incoming::End(Some((
            CloseCode::ProtocolError,
            "frames are binary MessagePack, not text".into(),
        ))),
        Some(Ok(AggregatedMessage::Close(_))) => Incoming::Closed,
        None => Incoming::End(None),
        Some(Err(actix_ws::ProtocolError::Overflow)) => Incoming::End(Some((
            CloseCode::TooBig,
            format!("frames are limited to {MAX_FRAME_BYTES} bytes"),
        ))),
        Some(Err(e)) => Incoming::End(Some((CloseCode::ProtocolError, e.to_string()))),
    })
}

/// Reads frames until `auth` arrives and verifies it.
async fn authenticate(
    state: &AppState,
    session: &mut Writer,
    stream: &mut AggregatedMessageStream,
) -> Result<Authed, Option<(CloseCode, String)>> {
    let deadline = tokio::time::sleep(Duration::from_millis(state.settings.auth_timeout_ms));
    tokio::pin!(deadline);
    let bytes = loop {
        tokio::select! {
            () = &mut deadline => {
                return Err(Some((CloseCode::AuthFailed, "no auth frame in time".into())));
            }
            incoming = next_incoming(session, stream) => match incoming {
                Incoming::Frame(bytes) => break bytes,
                Incoming::Control => continue,
                Incoming::End(reason) => return Err(reason),
                Incoming::Closed => return Err(None), // answered by next_incoming
            },
        }
    };
    let (user, device, token) = match ClientFrame::decode(&bytes) {
        Ok(ClientFrame::Auth {
            user,
            device,
            token,
        }) => (user, device, token),
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
    let Some(token) = DeviceToken::from_bytes(&token) else {
        return refuse(session, ErrorCode::BadToken, "bad credentials").await;
    };
    let record = match state.store.device(user.as_str(), device.0) {
        Ok(r) => r,
        Err(_) => return refuse(session, ErrorCode::StoreUnavailable, "store unavailable").await,
    };
    let ok = record.is_some_and(|r| state.hasher.verify(&token, &r.token_hash));
    if !ok {
        return refuse(session, ErrorCode::BadToken, "bad credentials").await;
    }
    Ok(Authed { user, device })
}

/// Refuses authentication: an `error` frame saying why, then a close with `auth_failed`.
async fn refuse(
    session: &mut Writer,
    code: ErrorCode,
    msg: &str,
) -> Result<Authed, Option<(CloseCode, String)>> {
    let _ = session.binary(error_frame(code, msg, None)).await;
    Err(Some((CloseCode::AuthFailed, msg.to_owned())))
}

/// The close for a frame that does not decode. The caller has already sent (and counted) the
/// `error` frame.
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

pub(crate) fn decode_close(e: &DecodeError) -> (CloseCode, String) {
    match e {
        DecodeError::TooLarge(_) => (CloseCode::TooBig, e.to_string()),
        _ => (CloseCode::ProtocolError, e.to_string()),
    }
}

/// Runs one connection to its end.
#[allow(clippy::manual_async_fn)] // an `async fn` would store its arguments twice
fn run(
    state: Arc<AppState>,
    mut session: Writer,
    mut stream: AggregatedMessageStream,
) -> impl Future<Output = ()> {
    async move {
        let _open = OpenGuard::new(&state);
        // Boxed, here and for the closes below: the task keeps its largest state for its whole
        // life, and these run once.
        let authed = match Box::pin(authenticate(&state, &mut session, &mut stream)).await {
            Ok(a) => a,
            Err(reason) => {
                if let Some((code, text)) = reason {
                    Box::pin(close(session, code, Some(text))).await;
                }
                return;
            }
        };
        let conn_id = state.next_conn.fetch_add(1, Ordering::Relaxed);
        let capacity = state.settings.delivery_window * 2 + 16;
        let (tx, mut rx) = outbox::channel(capacity);
        let (kick_tx, mut kick_rx) = oneshot::channel();
        let attach = Attach {
            device: authed.device,
            conn: Conn {
                id: conn_id,
                tx,
                kick: kick_tx,
            },
        };
        match state.registry.call_once(authed.user.as_str(), attach).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // Removed between authentication and attaching.
                let text = Some("device unavailable".into());
                Box::pin(close(session, CloseCode::AuthFailed, text)).await;
                return;
            }
            Err(_) => {
                // The mailbox could not start (the store is failing): not the client's fault,
                // so it reconnects later rather than treating its credentials as bad.
                let text = Some("mailbox unavailable, try again later".into());
                Box::pin(close(session, CloseCode::GoingAway, text)).await;
                return;
            }
        }
        let hello = ServerFrame::AuthOk {
            user: authed.user.to_string(),
            device: authed.device,
            server_time_ms: now_ms(),
        };
        if session.binary(hello.encode()).await.is_err() {
            detach(&state, &authed, conn_id);
            return;
        }
        debug!(device = authed.device.0, "device connected");

        let mut s = Live {
            state: &state,
            authed: &authed,
            conn_id,
            violations: 0,
            kicked: false,
        };
        let end = s
            .relay(&mut session, &mut stream, &mut rx, &mut kick_rx)
            .await;
        detach(&state, &authed, conn_id);
        if let Some((code, text)) = end {
            if s.kicked {
                Box::pin(send_close(session, code, Some(text))).await;
            } else {
                Box::pin(close(session, code, Some(text))).await;
            }
        }
    }
}

/// Sends awaiting their results. Allocated on the first send and released once all are answered:
/// most connections are idle most of the time, and an empty `FuturesUnordered` already holds
/// two allocations.
#[derive(Default)]
struct Pending(Option<FuturesUnordered<PendingSend>>);

impl Pending {
    fn push(&mut self, send: PendingSend) {
        self.0.get_or_insert_with(FuturesUnordered::new).push(send);
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesUnordered::len)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Stream for Pending {
    type Item = (EnvelopeId, SendOutcome);

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let Some(pending) = &mut self.0 else {
            return std::task::Poll::Ready(None);
        };
        let next = pending.poll_next_unpin(cx);
        if pending.is_empty() {
            self.0 = None;
        }
        next
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
    if let Some(addr) = state.registry.get(authed.user.as_str()) {
        addr.do_send(Detach {
            device: authed.device,
            conn,
        });
    }
}

/// The authenticated part of a session.
struct Live<'a> {
    state: &'a Arc<AppState>,
    authed: &'a Authed,
    conn_id: u64,
    /// Rate-limit violations so far; past the configured maximum the connection is closed.
    violations: u32,
    /// Whether the mailbox kicked this connection (and already counted the disconnect).
    kicked: bool,
}

impl Live<'_> {
    /// Relays until the connection ends; returns the close to send, if any.
    async fn relay(
        &mut self,
        session: &mut Writer,
        stream: &mut AggregatedMessageStream,
        rx: &mut outbox::Receiver,
        kick_rx: &mut oneshot::Receiver<CloseCode>,
    ) -> Option<(CloseCode, String)> {
        let settings = &self.state.settings;
        let mut pending = Pending::default();
        let mut heartbeat = tokio::time::interval(Duration::from_millis(settings.heartbeat_ms));
        heartbeat.tick().await;
        let client_timeout = Duration::from_millis(settings.client_timeout_ms);
        let mut last_heard = Instant::now();
        let mut shutdown = self.state.shutdown.clone();
        loop {
            if session.stalled() {
                return None;
            }
            tokio::select! {
                biased;
                reason = &mut *kick_rx => {
                    // A dropped sender means the mailbox stopped (shutdown).
                    self.kicked = reason.is_ok();
                    let code = reason.unwrap_or(CloseCode::GoingAway);
                    return Some((code, code.as_str().to_owned()));
                }
                _ = shutdown.changed() => {
                    return Box::pin(self.drain_for_shutdown(session, &mut pending)).await;
                }
                frame = rx.recv() => match frame {
                    Some(frame) => if session.binary(frame).await.is_err() { return None },
                    None => return Some((CloseCode::GoingAway, "mailbox stopped".into())),
                },
                Some((id, outcome)) = pending.next(), if !pending.is_empty() => {
                    let frame = ServerFrame::SendResult { id, outcome }.encode();
                    if session.binary(frame).await.is_err() { return None }
                }
                // Reads here and answers pings below, so that the waiting state stays small.
                read = stream.recv(), if pending.len() < settings.max_pending_sends => {
                    last_heard = Instant::now();
                    match classify(read) {
                        Ok(Incoming::Frame(bytes)) => {
                            // Boxed: its state is larger than all the rest of the loop's, and
                            // the task would carry it while idle too.
                            let handled = Box::pin(self.on_frame(session, &bytes, &mut pending));
                            if let Some(end) = handled.await {
                                return Some(end);
                            }
                        }
                        Ok(Incoming::Control) => {}
                        Ok(Incoming::Closed) => {
                            session.echo_close().await;
                            return None;
                        }
                        Ok(Incoming::End(reason)) => return reason,
                        Err(ping) => {
                            let _ = session.pong(&ping).await;
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > client_timeout && pending.len() >= settings.max_pending_sends {
                        // Not reading was our doing (its sends wait for the store): not the
                        // client's silence. Still bounded: the client retries elsewhere.
                        return Some((CloseCode::GoingAway, "sends are not being answered in time; reconnect".into()));
                    }
                    if last_heard.elapsed() > client_timeout {
                        return Some((CloseCode::IdleTimeout, "no traffic within the client timeout".into()));
                    }
                    if session.ping(b"").await.is_err() { return None }
                }
            }
        }
    }

    /// On shutdown: stop reading, answer sends already accepted, then close after a jitter so
    /// that clients do not all reconnect at once.
    async fn drain_for_shutdown(
        &self,
        session: &mut Writer,
        pending: &mut Pending,
    ) -> Option<(CloseCode, String)> {
        while let Some((id, outcome)) = pending.next().await {
            let _ = session
                .binary(ServerFrame::SendResult { id, outcome }.encode())
                .await;
        }
        let window = self.state.settings.shutdown_drain_ms.max(1);
        let jitter = rand::thread_rng().gen_range(0..window);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        Some((CloseCode::GoingAway, "server shutting down".into()))
    }

    /// Handles one binary frame; returns a close if the protocol was violated.
    async fn on_frame(
        &mut self,
        session: &mut Writer,
        bytes: &[u8],
        pending: &mut Pending,
    ) -> Option<(CloseCode, String)> {
        // Every frame counts against the device's rate, also one that is refused below.
        let decoded = ClientFrame::decode(bytes);
        if !self
            .state
            .limits
            .allow_device(self.authed.user.as_str(), self.authed.device.0)
        {
            self.violations += 1;
            if self.violations > self.state.settings.max_violations {
                return Some((CloseCode::RateLimited, "too many frames".into()));
            }
            // Counted once: `error_frame` counts the refusals it builds.
            let answer = match &decoded {
                Ok(ClientFrame::Send { id, .. } | ClientFrame::SealedSend { id, .. }) => {
                    telemetry::reject(ErrorCode::RateLimited.as_str());
                    ServerFrame::SendResult {
                        id: *id,
                        outcome: SendOutcome::Rejected {
                            code: ErrorCode::RateLimited,
                            current_devices: Vec::new(),
                        },
                    }
                    .encode()
                    .into()
                }
                _ => error_frame(ErrorCode::RateLimited, "slow down", None),
            };
            let _ = session.binary(answer).await;
            return None;
        }
        let frame = match decoded {
            Ok(frame) => frame,
            Err(DecodeError::UnknownFrameType(kind)) => {
                // Possibly a newer client: refuse the frame, keep the connection.
                let msg = format!("unknown frame type {kind:#04x}");
                let _ = session
                    .binary(error_frame(ErrorCode::UnknownFrameType, msg, None))
                    .await;
                return None;
            }
            Err(e) => {
                let _ = session
                    .binary(error_frame(e.code(), e.to_string(), None))
                    .await;
                return Some(decode_close(&e));
            }
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
            ClientFrame::Send {
                id,
                to,
                class,
                ttl_secs,
                copies,
            } => match validate_send(self.state, &to, class, ttl_secs, &copies) {
                Ok(to) => pending.push(submit(self.state, to, id, class, ttl_secs, copies)),
                Err(code) => reject_send(session, id, code).await,
            },
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
                    return None;
                }
                let ack = Ack {
                    device: self.authed.device,
                    conn: self.conn_id,
                    seqs,
                };
                let unknown = self
                    .state
                    .registry
                    .call_once(self.authed.user.as_str(), ack)
                    .await
                    .unwrap_or_default();
                // Report a few; a client acking garbage learns enough from those.
                for seq in unknown.into_iter().take(8) {
                    let frame = error_frame(ErrorCode::UnknownSeq, "not outstanding", Some(seq));
                    let _ = session.binary(frame).await;
                }
            }
        }
        None
    }
}
