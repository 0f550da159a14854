//! WebSocket connections to the broker (tokio-tungstenite), speaking `sealpost-proto` frames.
//!
//! Two kinds, never mixed ([`Connection::authenticated`] and [`Connection::anonymous`]):
//!
//! - `/v1/ws`, authenticated as one device: receives that device's deliveries, acks them, and
//!   carries (non-sealed-sender) `send` frames — used only where the broker may know the sender
//!   (first contact, the device's own account while linking).
//! - `/v1/sealed`, anonymous: only `sealed_send`, admitted by the recipient's delivery token.
//!   Nothing on it names this device's account.
//!
//! The broker's WebSocket pings are answered by tungstenite whenever the connection is read;
//! a connection left unread longer than the broker's client timeout is closed by the broker,
//! and the SDK reconnects on next use.

use std::time::Duration;

use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use sealpost_proto::{ClientFrame, DeviceId, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};

use crate::api::{Api, DeviceCreds};

/// How long connecting plus authenticating may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

pub use crate::error::ConnError;

/// One WebSocket connection to the broker.
pub struct Connection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The rest of a `batch` message, in order.
    ready: std::collections::VecDeque<ServerFrame>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Connection {
    async fn open(url: &str) -> Result<Self, ConnError> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(sealpost_proto::limits::MAX_FRAME_BYTES * 2));
        let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
        let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ConnError::Timeout)?
            .map_err(|e| ConnError::Transport(e.to_string()))?;
        Ok(Self {
            ws,
            ready: std::collections::VecDeque::new(),
        })
    }

    /// Opens the anonymous sealed-send endpoint (`ws_url` ends in `/v1/sealed`).
    pub async fn anonymous(ws_url: &str) -> Result<Self, ConnError> {
        Self::open(ws_url).await
    }

    /// Opens `/v1/ws` and authenticates as `creds`; returns the connection and the broker's
    /// clock (ms since the Unix epoch).
    pub async fn authenticated(api: &Api, creds: &DeviceCreds) -> Result<(Self, u64), ConnError> {
        // The token goes only on a short HTTP request; the socket gets a one-time ticket.
        let ticket = api
            .session_ticket(creds)
            .await
            .map_err(ConnError::from_api)?;
        // This client reads `batch` messages: a backlog arrives in a few of them.
        let mut conn = Self::open(&api.ws_url("/v1/ws?batch=1")).await?;
        conn.send(&ClientFrame::Auth {
            user: creds.handle.clone(),
            device: DeviceId(creds.device),
            token: ticket.to_vec(),
        })
        .await?;
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, conn.next())
            .await
            .map_err(|_| ConnError::Timeout)??;
        match answer {
            ServerFrame::AuthOk { server_time_ms, .. } => Ok((conn, server_time_ms)),
            ServerFrame::Error { code, message, .. } => {
                Err(ConnError::AuthRefused { code, message })
            }
            _ => Err(ConnError::Decode("expected auth_ok".into())),
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ConnError> {
        self.ws
            .send(Message::Binary(frame.encode().into()))
            .await
            .map_err(|e| ConnError::Transport(e.to_string()))
    }

    /// The next frame from the broker (control frames are handled underneath).
    pub async fn next(&mut self) -> Result<ServerFrame, ConnError> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(frame);
            }
            let message = self.ws.next().await;
            self.ready.extend(Self::on_message(message)?);
        }
    }

    /// The next frame if one has already arrived, without waiting.
    pub fn try_next(&mut self) -> Option<Result<ServerFrame, ConnError>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Some(Ok(frame));
            }
            let message = self.ws.next().now_or_never()?;
            match Self::on_message(message) {
                Ok(frames) => self.ready.extend(frames),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The frames a message carries: none for a control frame, one, or a `batch`'s.
    fn on_message(
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<Vec<ServerFrame>, ConnError> {
        match message {
            Some(Ok(Message::Binary(bytes))) => {
                ServerFrame::decode_all(&bytes).map_err(|e| ConnError::Decode(e.to_string()))
            }
            Some(Ok(Message::Close(close))) => Err(ConnError::Closed {
                code: close.as_ref().map(|c| u16::from(c.code)),
                reason: close.map(|c| c.reason.to_string()).unwrap_or_default(),
            }),
            Some(Ok(_)) => Ok(Vec::new()),
            Some(Err(e)) => Err(ConnError::Transport(e.to_string())),
            None => Err(ConnError::Closed {
                code: None,
                reason: "connection ended".into(),
            }),
        }
    }

    /// Closes politely (best effort).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
