//! `GET /v1/sealed`: the anonymous WebSocket for sealed sends.
//!
//! Nothing on this connection names an account: it carries only `sealed_send` frames, each
//! admitted by the recipient's delivery token (or the recipient's choice to accept sealed
//! envelopes from anyone, limited per source IP). So even while an envelope arrives the broker
//! can tie it to a network address only, never to the sender's account. Clients keep this
//! connection separate from their authenticated one.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::AggregatedMessageStream;
use futures_util::{StreamExt, stream::FuturesUnordered};
use sealpost_proto::{ClientFrame, CloseCode, DecodeError, ErrorCode, ServerFrame};

use super::{
    AppState,
    session::{Incoming, OpenGuard, accept, close, decode_close, error_frame, reject_send, settle},
    submit::{PendingSend, admit_sealed, submit_sealed, validate_send},
};
use crate::ws::Writer;

/// `GET /v1/sealed`: upgrades and spawns the anonymous session.
pub async fn upgrade(
    state: web::Data<Arc<AppState>>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, mut session, stream, ip) = accept(&state, &req, body)?;
    let state: Arc<AppState> = Arc::clone(state.get_ref());
    actix_web::rt::spawn(async move {
        let _open = OpenGuard::new(&state);
        let end = run(&state, &mut session, stream, ip).await;
        if let Some((code, text)) = end {
            close(session, code, Some(text)).await;
        }
    });
    Ok(response)
}

async fn run(
    state: &AppState,
    session: &mut Writer,
    mut stream: AggregatedMessageStream,
    ip: Option<IpAddr>,
) -> Option<(CloseCode, String)> {
    let settings = &state.settings;
    let mut pending: FuturesUnordered<PendingSend> = FuturesUnordered::new();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(settings.heartbeat_ms));
    heartbeat.tick().await;
    let client_timeout = Duration::from_millis(settings.client_timeout_ms);
    let mut last_heard = Instant::now();
    let mut shutdown = state.shutdown.clone();
    let mut violations = 0u32;
    loop {
        if session.stalled() {
            return None;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                while let Some((id, outcome)) = pending.next().await {
                    let _ = session.binary(ServerFrame::SendResult { id, outcome }.encode()).await;
                }
                return Some((CloseCode::GoingAway, "server shutting down".into()));
            }
            Some((id, outcome)) = pending.next(), if !pending.is_empty() => {
                let frame = ServerFrame::SendResult { id, outcome }.encode();
                if session.binary(frame).await.is_err() { return None }
            }
            read = stream.recv(), if pending.len() < settings.max_pending_sends => {
                last_heard = Instant::now();
                let bytes = match settle(session, read).await {
                    Incoming::Frame(bytes) => bytes,
                    Incoming::Control => continue,
                    Incoming::End(reason) => return reason,
                    Incoming::Closed => return None, // answered by settle
                };
                // Every frame counts against the address's rate, also one refused below.
                let decoded = ClientFrame::decode(&bytes);
                if let Some(ip) = ip
                    && !state.limits.allow_ip(ip)
                {
                    violations += 1;
                    if violations > settings.max_violations {
                        return Some((CloseCode::RateLimited, "too many frames".into()));
                    }
                    match &decoded {
                        Ok(ClientFrame::SealedSend { id, .. }) => reject_send(session, *id, ErrorCode::RateLimited).await,
                        _ => { let _ = session.binary(error_frame(ErrorCode::RateLimited, "slow down", None)).await; }
                    }
                    continue;
                }
                let frame = match decoded {
                    Ok(frame) => frame,
                    Err(DecodeError::UnknownFrameType(kind)) => {
                        let msg = format!("unknown frame type {kind:#04x}");
                        let _ = session.binary(error_frame(ErrorCode::UnknownFrameType, msg, None)).await;
                        continue;
                    }
                    Err(e) => {
                        let _ = session.binary(error_frame(e.code(), e.to_string(), None)).await;
                        return Some(decode_close(&e));
                    }
                };
                let ClientFrame::SealedSend { id, to, class, ttl_secs, copies, delivery_token } = frame else {
                    let msg = "only sealed_send is accepted here; authenticate on /v1/ws";
                    let _ = session.binary(error_frame(ErrorCode::WrongEndpoint, msg, None)).await;
                    continue;
                };
                let admitted = validate_send(state, &to, class, ttl_secs, &copies)
                    .and_then(|to| admit_sealed(state, &to, delivery_token.as_deref(), ip).map(|()| to));
                match admitted {
                    Ok(to) => pending.push(submit_sealed(state, to, id, class, ttl_secs, copies, delivery_token)),
                    Err(code) => reject_send(session, id, code).await,
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > client_timeout && pending.len() >= settings.max_pending_sends {
                    // Not reading was our doing, as on /v1/ws.
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
