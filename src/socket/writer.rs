//! Frames out: the sending half of a WebSocket, with a deadline on every write.
//!
//! actix-ws buffers 32 outgoing messages; behind them are the connection's write buffer and
//! the kernel's socket buffers. A peer that stops reading fills all of them, and from then on
//! a write waits for as long as the peer likes. A task waiting there sees nothing else: not a
//! kick, not its heartbeat, not shutdown, and it keeps everything it holds (a device session
//! keeps its queue of pushed envelopes). So every write here has a deadline; past it the
//! writer is *stalled*, every later write fails at once, and the task ends, dropping the
//! connection without a close frame (a peer that reads nothing would not read that either).

use std::time::Duration;

use actix_web::web::Bytes;
use actix_ws::{CloseReason, Session};

/// A close frame's payload is at most 125 bytes, two of them the code.
const MAX_CLOSE_DESCRIPTION: usize = 123;

/// The peer took no data within the deadline, or the connection is already closed.
#[derive(Debug)]
pub struct Gone;

/// A WebSocket's sending half whose writes give up after a deadline.
pub struct Writer {
    /// actix-ws's handle; clones of it keep the response stream open.
    session: Session,
    deadline: Duration,
    stalled: bool,
    /// A close frame was sent (or the peer was too stalled to take one): nothing follows it.
    closed: bool,
}

impl Writer {
    /// `deadline` bounds how long one write may wait for the peer to take data.
    pub fn new(session: Session, deadline: Duration) -> Self {
        Writer {
            session,
            deadline,
            stalled: false,
            closed: false,
        }
    }

    /// Whether a write ran past its deadline: the connection should be dropped.
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// Sends a binary message.
    pub async fn binary(&mut self, bytes: impl Into<Bytes>) -> Result<(), Gone> {
        if self.stalled || self.closed {
            return Err(Gone);
        }
        let sent = {
            let mut write = std::pin::pin!(self.session.binary(bytes.into()));
            // Most writes find room in actix-ws's queue at once: those need no timer.
            let first =
                std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
            match first {
                std::task::Poll::Ready(done) => Ok(done),
                std::task::Poll::Pending => tokio::time::timeout(self.deadline, write).await,
            }
        };
        self.finish_write(sent)
    }

    /// Sends a ping.
    pub async fn ping(&mut self, payload: &[u8]) -> Result<(), Gone> {
        if self.stalled || self.closed {
            return Err(Gone);
        }
        let sent = tokio::time::timeout(self.deadline, self.session.ping(payload)).await;
        self.finish_write(sent)
    }

    /// Answers a ping.
    pub async fn pong(&mut self, payload: &[u8]) -> Result<(), Gone> {
        if self.stalled || self.closed {
            return Err(Gone);
        }
        let sent = tokio::time::timeout(self.deadline, self.session.pong(payload)).await;
        self.finish_write(sent)
    }

    /// Answers the peer's close frame with one of ours (the closing handshake), after which
    /// nothing more is sent.
    pub async fn echo_close(&mut self) {
        if !self.stalled && !self.closed {
            let session = self.session.clone();
            let _ = tokio::time::timeout(self.deadline, session.close(None)).await;
        }
        self.closed = true;
    }

    /// Sends a close frame, unless the peer has stopped reading; nothing is sent after it. The
    /// description is cut to what a close frame can carry (123 bytes, on a character
    /// boundary): a longer one would make the frame invalid and the peer would lose the reason.
    ///
    /// The connection stays open until the writer is dropped, so that the caller can read
    /// what the peer still sends before the connection goes (see `Socket::finish`).
    pub async fn close(&mut self, mut reason: CloseReason) {
        if let Some(text) = &mut reason.description {
            truncate_utf8(text, MAX_CLOSE_DESCRIPTION);
        }
        if !self.stalled && !self.closed {
            // A clone, so that our own handle keeps the response stream open.
            let session = self.session.clone();
            let _ = tokio::time::timeout(self.deadline, session.close(Some(reason))).await;
        }
        self.closed = true;
    }

    fn finish_write(
        &mut self,
        sent: Result<Result<(), actix_ws::Closed>, tokio::time::error::Elapsed>,
    ) -> Result<(), Gone> {
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(actix_ws::Closed)) => Err(Gone),
            Err(_elapsed) => {
                self.stalled = true;
                metrics::counter!("sealpost_disconnects_total", "reason" => "write_stalled")
                    .increment(1);
                Err(Gone)
            }
        }
    }
}

fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_descriptions_are_cut_on_a_character_boundary() {
        let mut short = "slow consumer".to_owned();
        truncate_utf8(&mut short, MAX_CLOSE_DESCRIPTION);
        assert_eq!(short, "slow consumer");
        // 61 two-byte characters and one more: 124 bytes, cut to 122.
        let mut long = "é".repeat(62);
        truncate_utf8(&mut long, MAX_CLOSE_DESCRIPTION);
        assert_eq!(long.len(), 122);
        assert_eq!(long, "é".repeat(61));
    }
}
