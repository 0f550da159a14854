//! One driver for every server-side WebSocket: device sessions (`/v1/ws`), anonymous sealed
//! sends (`/v1/sealed`) and inbound federation links (`/v1/federation`).
//!
//! ```text
//! upgrade ─▶ Upgrade::accept ─▶ first phase (auth, handshake): Socket::recv under a deadline
//!                           ─▶ Socket::drive(service), until one side ends it:
//!                                  shutdown            ─▶ Service::on_shutdown (answer what was accepted),
//!                                                         then go on reading for its drain window
//!                                  Service::event      ─▶ Service::on_event    (pushes, answers)
//!                                  whole message       ─▶ Service::on_message  (while Service::reading)
//!                                  ping / close frame  ─▶ pong / closing handshake
//!                                  heartbeat           ─▶ ping; idle past the timeout ─▶ close
//!                                  a write past its deadline ─▶ dropped
//!                           ─▶ Socket::finish: close frame, read out what the peer still sends
//! ```
//!
//! Everything a connection does with its socket is written here once; a service only says what
//! its messages mean. [`upgrade`] answers the HTTP handshake and takes the TCP connection over,
//! [`reader`] decodes frames with every limit checked at the header, and [`writer`] puts a
//! deadline on every write.

pub mod reader;
pub mod upgrade;
pub mod writer;

use std::{
    borrow::Cow,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{
    rt::net::TcpStream,
    web::{Bytes, BytesMut},
};
use sealpost_proto::CloseCode;
use tokio::sync::watch;

pub use self::{
    reader::{Budget, Message, Reader, Refusal, TcpBody},
    upgrade::Upgrade,
    writer::{Gone, Writer},
};

/// How long a connection we close may go on sending before we drop it: long enough for a
/// client to read our close frame and answer it, short enough not to matter at shutdown.
const LINGER: Duration = Duration::from_secs(2);

/// A close frame to send: a code and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The close code.
    pub code: CloseCode,
    /// The reason shown to the peer (cut to 123 bytes when sent).
    pub reason: Cow<'static, str>,
    /// Whether [`Socket::finish`] counts it in `sealpost_disconnects_total` (not when whoever
    /// decided on it already did).
    pub counted: bool,
}

impl Close {
    /// A close with `code` and `reason`, counted when sent.
    pub fn new(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Close {
        Close {
            code,
            reason: reason.into(),
            counted: true,
        }
    }

    /// A close with the code's own name as its reason.
    pub fn code(code: CloseCode) -> Close {
        Close::new(code, code.as_str())
    }

    /// The same close, not counted again when sent.
    pub fn already_counted(mut self) -> Close {
        self.counted = false;
        self
    }
}

/// How a handler's step ends: carry on, or end the connection with a close (`Some`) or
/// without one (`None`: the peer is gone or has already been answered).
pub type Flow = Result<(), Option<Close>>;

/// A socket's limits and timers, from the settings of the endpoint that accepts it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The longest message accepted, whole or in fragments.
    pub max_message: usize,
    /// How often to ping.
    pub heartbeat: Duration,
    /// Silence longer than this closes the connection; also the deadline of every write.
    pub idle_timeout: Duration,
    /// What all readers together may buffer.
    pub budget: Arc<Budget>,
}

/// What a connection means to its endpoint. The driver calls one method at a time, never two
/// at once, so a service needs no locking of its own.
pub trait Service {
    /// Something the service itself has to say: a push, an answer that became ready.
    type Event;

    /// The next event. Must be cancel-safe: the driver drops it when a message arrives first.
    /// A service with nothing pending returns a future that never resolves.
    fn event(&mut self) -> impl Future<Output = Self::Event>;

    /// Writes what `event` means.
    fn on_event(&mut self, event: Self::Event, out: &mut Writer) -> impl Future<Output = Flow>;

    /// Whether to read more now: false while the answers it owes are at their limit. A
    /// connection not read for that reason and then silent past the timeout is closed with
    /// `going_away` (our doing), not `idle_timeout`.
    fn reading(&self) -> bool;

    /// Handles one binary message.
    fn on_message(&mut self, message: Bytes, out: &mut Writer) -> impl Future<Output = Flow>;

    /// Shutdown began: answer what was accepted, and say how long to go on reading (for acks:
    /// the service refuses new requests from now on) and how to close then.
    fn on_shutdown(&mut self, out: &mut Writer) -> impl Future<Output = Drain>;
}

/// How a connection ends at shutdown.
#[derive(Debug)]
pub struct Drain {
    /// How long to go on reading and answering before closing.
    pub read_for: Duration,
    /// The close to send then.
    pub close: Option<Close>,
}

/// A server-side WebSocket: the reading and the writing half, and its timers.
pub struct Socket {
    writer: Writer,
    reader: Reader,
    heartbeat: Duration,
    idle_timeout: Duration,
}

impl Socket {
    /// A socket over an upgraded connection; `received` is what arrived behind the upgrade
    /// request.
    fn new(io: TcpStream, received: Bytes, limits: Limits) -> Socket {
        let (read, write) = io.into_split();
        let body = Box::pin(TcpBody::new(read, received));
        Socket {
            writer: Writer::new(write, limits.idle_timeout),
            reader: Reader::new(body, limits.max_message, limits.budget),
            heartbeat: limits.heartbeat,
            idle_timeout: limits.idle_timeout,
        }
    }

    /// The sending half.
    pub fn writer(&mut self) -> &mut Writer {
        &mut self.writer
    }

    /// The next binary message, with pings answered and a close frame answered: `Ok(None)`
    /// after a control frame, `Err` when the connection ends (with the close to send). The
    /// message is the reader's own buffer: a secret in it can be wiped in place.
    pub async fn recv(&mut self) -> Result<Option<BytesMut>, Option<Close>> {
        let read = self.reader.next().await;
        self.handle_read(read).await
    }

    /// What one read means. Best run outside `select!`: an answer cancelled halfway leaves the
    /// writer unusable (see `writer`).
    async fn handle_read(
        &mut self,
        read: Option<Result<Message, Refusal>>,
    ) -> Result<Option<BytesMut>, Option<Close>> {
        match read {
            Some(Ok(Message::Binary(bytes))) => Ok(Some(bytes)),
            Some(Ok(Message::Ping(payload))) => match self.writer.pong(&payload).await {
                Ok(()) => Ok(None),
                Err(Gone) => Err(None),
            },
            Some(Ok(Message::Pong)) => Ok(None),
            Some(Ok(Message::Text)) => Err(Some(Close::new(
                CloseCode::ProtocolError,
                "frames are binary, not text",
            ))),
            Some(Ok(Message::Close)) => {
                self.writer.echo_close().await;
                Err(None)
            }
            Some(Err(Refusal::Close(close))) => Err(Some(close)),
            Some(Err(Refusal::Gone)) | None => Err(None),
        }
    }

    /// Runs `service` until the connection ends; returns the close to send, if any.
    pub async fn drive<S: Service>(
        &mut self,
        service: &mut S,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Close> {
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.tick().await;
        let mut last_heard = Instant::now();
        // One wait for the whole session: made anew in every turn of the loop, it registered
        // and dropped a waiter on the shutdown channel per frame (1.6 % of the broker's samples
        // in W1).
        let shutdown = shutdown.changed();
        tokio::pin!(shutdown);
        loop {
            if self.writer.stalled() {
                return None;
            }
            let reading = service.reading();
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    let drain = Box::pin(service.on_shutdown(&mut self.writer)).await;
                    return Box::pin(self.drain(service, drain)).await;
                }
                event = service.event() => {
                    if let Err(end) = service.on_event(event, &mut self.writer).await {
                        return end;
                    }
                }
                read = self.reader.next(), if reading => {
                    last_heard = Instant::now();
                    if let Err(end) = self.serve_read(service, read).await {
                        return end;
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > self.idle_timeout {
                        return Some(if reading {
                            Close::new(CloseCode::IdleTimeout, "no traffic within the idle timeout")
                        } else {
                            // Not reading was our doing (its requests wait for the store): not
                            // the peer's silence. Still bounded: the peer retries elsewhere.
                            Close::new(CloseCode::GoingAway, "requests are not being answered in time; reconnect")
                        });
                    }
                    if self.writer.ping(b"").await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// After shutdown began: reads and answers for the service's drain window (acks sent
    /// just before or during shutdown are taken, not lost), then closes.
    async fn drain<S: Service>(&mut self, service: &mut S, drain: Drain) -> Option<Close> {
        let deadline = tokio::time::sleep(drain.read_for);
        tokio::pin!(deadline);
        loop {
            if self.writer.stalled() {
                return None;
            }
            let reading = service.reading();
            tokio::select! {
                biased;
                () = &mut deadline => return drain.close,
                event = service.event() => {
                    if let Err(end) = service.on_event(event, &mut self.writer).await {
                        return end;
                    }
                }
                read = self.reader.next(), if reading => {
                    if let Err(end) = self.serve_read(service, read).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Answers what one read brought: a control frame here, a message by the service.
    async fn serve_read<S: Service>(
        &mut self,
        service: &mut S,
        read: Option<Result<Message, Refusal>>,
    ) -> Flow {
        match self.handle_read(read).await? {
            // Boxed: its state is larger than the rest of the loop's, and the task would carry
            // it while idle too.
            Some(message) => Box::pin(service.on_message(message.freeze(), &mut self.writer)).await,
            None => Ok(()),
        }
    }

    /// Ends the connection: sends `close` (counted unless it says otherwise), then reads out
    /// what the peer still sends for a moment, so that the kernel does not answer those bytes
    /// with a reset that could destroy the close frame before the peer reads it.
    pub async fn finish(mut self, close: Option<Close>) {
        let Some(close) = close else { return };
        if close.counted {
            metrics::counter!("sealpost_disconnects_total", "reason" => close.code.as_str())
                .increment(1);
        }
        self.writer.close(close.code.as_u16(), &close.reason).await;
        self.reader.discard(LINGER).await;
    }
}
