//! `GET /v1/sealed`: the anonymous WebSocket for sealed sends.
//!
//! Nothing on this connection names an account: it carries only `sealed_send` and
//! `group_send` frames, each (each recipient) admitted by the recipient's delivery token (or the recipient's choice to accept sealed
//! envelopes from anyone, limited per source IP). So even while an envelope arrives the broker
//! can tie it to a network address only, never to the sender's account. Clients keep this
//! connection separate from their authenticated one.

use std::{net::IpAddr, sync::Arc, time::Duration};

use actix_web::{ResponseError as _, web::Bytes};
use sealpost_proto::{ClientFrame, CloseCode, ErrorCode, ServerFrame, limits::MAX_FRAME_BYTES};

use super::{
    AppState,
    group::{self, GroupFrom},
    pending::{Answer, Pending},
    route::{From, Send},
    session::{OpenGuard, accept_decoded, admit, error_frame, refuse_over_rate, reject_send},
};
use crate::socket::{Close, Drain, Flow, Service, Upgrade, Writer};

/// `GET /v1/sealed`: admits the upgrade, answers it, and runs the anonymous session.
pub(crate) async fn serve(state: Arc<AppState>, upgrade: Upgrade) {
    let ip = match admit(&state, upgrade.head()) {
        Ok(ip) => ip,
        Err(refused) => return upgrade.refuse(refused.error_response()).await,
    };
    let Some(mut socket) = upgrade.accept(state.socket_limits(MAX_FRAME_BYTES)).await else {
        return;
    };
    let _open = OpenGuard::new(&state);
    let mut session = SealedSession {
        state: &state,
        ip,
        pending: Pending::default(),
        violations: 0,
    };
    let mut shutdown = state.shutdown.clone();
    let end = socket.drive(&mut session, &mut shutdown).await;
    socket.finish(end).await;
}

/// An anonymous connection: sealed sends in, their results out.
struct SealedSession<'a> {
    state: &'a AppState,
    /// The only thing known of the sender: its address, for the per-address limits.
    ip: Option<IpAddr>,
    pending: Pending,
    /// Rate-limit violations so far; past the configured maximum the connection is closed.
    violations: u32,
}

impl Service for SealedSession<'_> {
    type Event = ServerFrame;

    async fn event(&mut self) -> Self::Event {
        self.pending.answer().await
    }

    async fn on_event(&mut self, answer: Self::Event, out: &mut Writer) -> Flow {
        out.binary(answer.encode()).await.map_err(|_| None)
    }

    fn reading(&self) -> bool {
        self.pending.len() < self.state.settings.max_pending_sends
    }

    async fn on_message(&mut self, bytes: Bytes, session: &mut Writer) -> Flow {
        let state = self.state;
        // Every frame counts against the address's rate, also one refused below.
        let decoded = ClientFrame::decode(&bytes);
        if let Some(ip) = self.ip
            && !state.limits.allow_ip(ip)
        {
            self.violations += 1;
            if self.violations > state.settings.max_violations {
                return Err(Some(Close::new(CloseCode::RateLimited, "too many frames")));
            }
            refuse_over_rate(session, &decoded).await;
            return Ok(());
        }
        let Some(frame) = accept_decoded(session, decoded).await? else {
            return Ok(());
        };
        let (id, to, class, ttl_secs, copies, delivery_token) = match frame {
            ClientFrame::SealedSend {
                id,
                to,
                class,
                ttl_secs,
                copies,
                delivery_token,
            } => (id, to, class, ttl_secs, copies, delivery_token),
            frame @ ClientFrame::GroupSend { .. } => {
                let from = GroupFrom::Sealed { ip: self.ip };
                group::take(state, frame, from, &mut self.pending, session).await;
                return Ok(());
            }
            _ => {
                let msg =
                    "only sealed_send and group_send are accepted here; authenticate on /v1/ws";
                let frame = error_frame(ErrorCode::WrongEndpoint, msg, None);
                let _ = session.binary(frame).await;
                return Ok(());
            }
        };
        let send = Send {
            id,
            to,
            class,
            ttl_secs,
            copies,
            from: From::Sealed {
                token: delivery_token,
                ip: self.ip,
            },
            copy_limit: sealpost_proto::limits::MAX_CIPHERTEXT_BYTES,
        };
        match state.route(send).await {
            Ok(pending) => self.pending.push(Answer::Send(pending)),
            Err(code) => reject_send(session, id, code).await,
        }
        Ok(())
    }

    async fn on_shutdown(&mut self, session: &mut Writer) -> Drain {
        self.pending.drain(session).await;
        Drain {
            read_for: Duration::ZERO,
            close: Some(Close::new(CloseCode::GoingAway, "server shutting down")),
        }
    }
}
