//! Frames out: the sending half of a WebSocket, written straight to its TCP connection, with a
//! deadline on every write.
//!
//! Each message is one frame (server frames are never masked nor fragmented), written with one
//! vectored write of its header and payload: nothing is buffered here, so an idle connection
//! holds no write buffer. (Queueing frames until the driver had nothing else ready, then
//! writing them together, cut the writes per delivered envelope from 1.8 to 1.4 in W1, but
//! not the CPU per envelope: see `loadtest/JOURNAL.md`.)
//!
//! Behind a write are only the kernel's socket buffers. A peer that stops reading fills them,
//! and from then on a write waits for as long as the peer likes. A task waiting there sees
//! nothing else: not a kick, not its heartbeat, not shutdown, and it keeps everything it holds
//! (a device session keeps its queue of pushed envelopes). So the peer must take some of a
//! frame within a deadline, and again within the deadline after each piece it takes (a slow
//! link is not a stalled one); past it the writer is *stalled*, every later write fails at
//! once, and the task ends, dropping the connection without a close frame (a peer that reads
//! nothing would not read that either).
//!
//! A write cancelled halfway (its future dropped inside a `select!`) would leave half a frame
//! on the wire; the writer notices at its next write and treats the connection as gone.

use std::{future::poll_fn, pin::pin, task::Poll, time::Duration};

use actix_web::web::Buf;
use tokio::net::tcp::OwnedWriteHalf;

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
    /// A close frame was sent (or the peer was too stalled to take one, or the connection
    /// failed): nothing follows it.
    closed: bool,
    /// A frame is being written; still true when the next write starts, the last one was
    /// cancelled partway and the stream is no longer whole.
    writing: bool,
}

impl Writer {
    /// `deadline` bounds how long one write may wait for the peer to take data.
    pub fn new(io: OwnedWriteHalf, deadline: Duration) -> Self {
        Writer {
            io,
            deadline,
            stalled: false,
            closed: false,
            writing: false,
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

    /// Writes one whole frame.
    async fn send(&mut self, opcode: Opcode, payload: &[u8]) -> Result<(), Gone> {
        if self.writing {
            self.closed = true;
        }
        if self.stalled || self.closed {
            return Err(Gone);
        }
        let (header, size) = header(opcode, payload.len());
        let mut frame = (&header[..size]).chain(payload);
        self.writing = true;
        while frame.has_remaining() {
            self.write_some(&mut frame).await?;
        }
        self.writing = false;
        Ok(())
    }

    /// One write of what is left of `frame`, within the deadline. Most find room in the
    /// socket's buffer at once: those need no timer.
    async fn write_some(&mut self, frame: &mut impl Buf) -> Result<(), Gone> {
        let written = {
            let mut write = pin!(tokio::io::AsyncWriteExt::write_buf(&mut self.io, frame));
            match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
                Poll::Ready(done) => Ok(done),
                Poll::Pending => tokio::time::timeout(self.deadline, write).await,
            }
        };
        match written {
            Ok(Ok(n)) if n > 0 => Ok(()),
            Ok(_) => {
                // An error, or a connection that takes nothing more.
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

    /// A writer over loopback whose socket buffers are small, so that a large frame needs the
    /// peer to read; and the peer's end.
    async fn small_buffered_pair(deadline: Duration) -> (Writer, tokio::net::TcpStream) {
        // Accepted connections inherit the listening socket's send buffer size.
        let listening = tokio::net::TcpSocket::new_v4().expect("socket");
        listening.set_send_buffer_size(4096).expect("sndbuf");
        listening
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = listening.listen(4).expect("listen");
        let connecting = tokio::net::TcpSocket::new_v4().expect("socket");
        connecting.set_recv_buffer_size(4096).expect("rcvbuf");
        let peer = connecting
            .connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        let (_, write) = ours.into_split();
        (Writer::new(write, deadline), peer)
    }

    #[tokio::test]
    async fn a_slow_reader_is_not_a_stalled_one() {
        use tokio::io::AsyncReadExt as _;
        let (mut writer, mut peer) = small_buffered_pair(Duration::from_millis(300)).await;
        let frame = vec![7u8; 512 * 1024];
        // The peer takes 16 KiB every 20 ms: the frame takes about 650 ms, twice the deadline,
        // but the peer never leaves the writer waiting for as long as the deadline.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut chunk = vec![0u8; 16 * 1024];
            while got < 512 * 1024 + 10 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                got += peer.read(&mut chunk).await.expect("read");
            }
            got
        });
        assert!(writer.binary(&frame).await.is_ok());
        assert!(!writer.stalled());
        assert_eq!(reader.await.expect("reader"), 512 * 1024 + 10);
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_stalls_the_writer() {
        let (mut writer, _peer) = small_buffered_pair(Duration::from_millis(100)).await;
        assert!(writer.binary(vec![7u8; 512 * 1024]).await.is_err());
        assert!(writer.stalled());
        assert!(writer.binary(b"more").await.is_err());
    }

    #[tokio::test]
    async fn a_write_cancelled_halfway_ends_the_connection() {
        let (mut writer, _peer) = small_buffered_pair(Duration::from_secs(10)).await;
        let frame = vec![7u8; 512 * 1024];
        let cancelled =
            tokio::time::timeout(Duration::from_millis(50), writer.binary(&frame)).await;
        assert!(
            cancelled.is_err(),
            "the peer reads nothing: the write waits"
        );
        // Half a frame is on the wire: another frame after it would be garbage.
        assert!(writer.binary(b"after").await.is_err());
        assert!(!writer.stalled(), "not the peer's doing");
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
