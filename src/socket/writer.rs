//! Frames out: the sending half of a WebSocket, written straight to its TCP connection, with a
//! deadline on every write.
//!
//! Each message is one frame (server frames are never masked nor fragmented), written with one
//! vectored write of its header and payload: nothing is buffered here, so an idle connection
//! holds no write buffer. (Queueing frames until the driver had nothing else ready, then
//! writing them together, cut the writes per delivered envelope from 1.8 to 1.4 in W1, but
//! not the CPU per envelope: see the README's performance notes.)
//!
//! Behind a write are only the kernel's socket buffers. A peer that stops reading fills them,
//! and from then on a write waits for as long as the peer likes. A task waiting there sees
//! nothing else: not a kick, not its heartbeat, not shutdown, and it keeps everything it holds
//! (a device session keeps its queue of pushed envelopes). So every write has a deadline; past
//! it the writer is *stalled*, every later write fails at once, and the task ends, dropping the
//! connection without a close frame (a peer that reads nothing would not read that either).

use std::{future::poll_fn, pin::pin, task::Poll, time::Duration};

use actix_web::web::Buf as _;
use tokio::{io::AsyncWriteExt as _, net::tcp::OwnedWriteHalf};

/// A close frame's payload is at most 125 bytes, two of them the code.
const MAX_CLOSE_DESCRIPTION: usize = 123;

/// Opcodes of the frames a server sends (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy)]
enum Opcode {
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xa,
}

/// The peer took no data within the deadline, or the connection is already closed.
#[derive(Debug)]
pub struct Gone;

/// A WebSocket's sending half whose writes give up after a deadline.
pub struct Writer {
    io: OwnedWriteHalf,
    deadline: Duration,
    stalled: bool,
    /// A close frame was sent (or the peer was too stalled to take one): nothing follows it.
    closed: bool,
}

impl Writer {
    /// `deadline` bounds how long one write may wait for the peer to take data.
    pub fn new(io: OwnedWriteHalf, deadline: Duration) -> Self {
        Writer {
            io,
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
    pub async fn binary(&mut self, bytes: impl AsRef<[u8]>) -> Result<(), Gone> {
        self.send(Opcode::Binary, bytes.as_ref()).await
    }

    /// Sends a ping.
    pub async fn ping(&mut self, payload: &[u8]) -> Result<(), Gone> {
        self.send(Opcode::Ping, payload).await
    }

    /// Answers a ping.
    pub async fn pong(&mut self, payload: &[u8]) -> Result<(), Gone> {
        self.send(Opcode::Pong, payload).await
    }

    /// Answers the peer's close frame with one of ours (the closing handshake), after which
    /// nothing more is sent.
    pub async fn echo_close(&mut self) {
        let _ = self.send(Opcode::Close, &[]).await;
        self.closed = true;
    }

    /// Sends a close frame with `code` and `description`, unless the peer has stopped reading;
    /// nothing is sent after it. The description is cut to what a close frame can carry (123
    /// bytes, on a character boundary): a longer one would make the frame invalid and the peer
    /// would lose the reason.
    ///
    /// The connection stays open until the writer is dropped, so that the caller can read
    /// what the peer still sends before the connection goes (see `Socket::finish`).
    pub async fn close(&mut self, code: u16, description: &str) {
        let description = truncate_utf8(description, MAX_CLOSE_DESCRIPTION);
        let mut payload = Vec::with_capacity(2 + description.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(description.as_bytes());
        let _ = self.send(Opcode::Close, &payload).await;
        self.closed = true;
    }

    /// Writes one whole frame. Most writes find room in the socket's buffer at once: those
    /// need no timer.
    async fn send(&mut self, opcode: Opcode, payload: &[u8]) -> Result<(), Gone> {
        if self.stalled || self.closed {
            return Err(Gone);
        }
        let (header, size) = header(opcode, payload.len());
        let mut frame = (&header[..size]).chain(payload);
        let sent = {
            let mut write = pin!(self.io.write_all_buf(&mut frame));
            match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
                Poll::Ready(done) => Ok(done),
                Poll::Pending => tokio::time::timeout(self.deadline, write).await,
            }
        };
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_io)) => {
                self.closed = true;
                Err(Gone)
            }
            Err(_elapsed) => {
                self.stalled = true;
                metrics::counter!("sealpost_disconnects_total", "reason" => "write_stalled")
                    .increment(1);
                Err(Gone)
            }
        }
    }
}

/// A server frame's header: FIN, the opcode, and the payload length in 7, 7+16 or 7+64 bits
/// (no mask: only clients mask). Returns the bytes and how many of them are used.
fn header(opcode: Opcode, len: usize) -> ([u8; 10], usize) {
    let mut header = [0u8; 10];
    header[0] = 0x80 | opcode as u8;
    let size = match len {
        0..=125 => {
            header[1] = u8::try_from(len).expect("at most 125");
            2
        }
        126..=0xffff => {
            header[1] = 126;
            let len = u16::try_from(len).expect("at most 0xffff");
            header[2..4].copy_from_slice(&len.to_be_bytes());
            4
        }
        _ => {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    (header, size)
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_descriptions_are_cut_on_a_character_boundary() {
        assert_eq!(
            truncate_utf8("slow consumer", MAX_CLOSE_DESCRIPTION),
            "slow consumer"
        );
        // 61 two-byte characters and one more: 124 bytes, cut to 122.
        let long = "é".repeat(62);
        let cut = truncate_utf8(&long, MAX_CLOSE_DESCRIPTION);
        assert_eq!(cut.len(), 122);
        assert_eq!(cut, "é".repeat(61));
    }

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        assert_eq!(
            header(Opcode::Binary, 0),
            ([0x82, 0, 0, 0, 0, 0, 0, 0, 0, 0], 2)
        );
        assert_eq!(header(Opcode::Pong, 125).0[..2], [0x8a, 125]);
        assert_eq!(header(Opcode::Binary, 126).0[..4], [0x82, 126, 0, 126]);
        assert_eq!(
            header(Opcode::Binary, 0xffff).0[..4],
            [0x82, 126, 0xff, 0xff]
        );
        let (long, size) = header(Opcode::Close, 0x1_0000);
        assert_eq!(
            (size, &long[..]),
            (10, &[0x88, 127, 0, 0, 0, 0, 0, 1, 0, 0][..])
        );
    }
}
