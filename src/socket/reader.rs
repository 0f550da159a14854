//! Frames in: an RFC 6455 decoder for the client-to-server direction, with every limit checked
//! as early as the bytes allow.
//!
//! actix-ws (which served our sockets before) checks a frame's size only once the whole frame
//! has arrived, and buffers whatever comes before that: one header announcing a 1 GiB payload
//! made the broker buffer a gigabyte.
//! This reader refuses a message as soon as a header announces more than the limit (counting
//! the fragments already received), holds at most one message's worth of bytes, and charges
//! what it holds to a broker-wide [`Budget`].
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| length (7)  |  extended length (16 or 64)   |
//! |I|S|S|S|  (4)  |A|  126: u16   |  big-endian; 64-bit MSB = 0   |
//! |N|V|V|V|       |S|  127: u64   |                               |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |      masking key (4 bytes, always present from a client)      |
//! +---------------------------------------------------------------+
//! |                   payload (length bytes, masked)              |
//! +---------------------------------------------------------------+
//! ```
//!
//! Refused with *protocol error* (1002): a reserved bit set (no extension is negotiated), a
//! reserved opcode, an unmasked frame, a 64-bit length with its top bit set, a control frame
//! that is fragmented or longer than 125 bytes, a continuation with no message to continue, a
//! new message before the previous one's last fragment, a close frame with a one-byte payload,
//! an invalid close code or a reason that is not UTF-8. Refused with *message too big* (1009):
//! a message longer than the limit, whole or in fragments, as soon as a header says so.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use actix_web::web::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use sealpost_proto::CloseCode;
use tokio::{
    io::{AsyncRead, ReadBuf},
    net::tcp::OwnedReadHalf,
};

use super::Close;

/// A whole message from the client. Text messages are reported, not decoded: every Sealpost
/// endpoint speaks binary frames only and closes on text.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// A binary message (fragments joined), mutable so that a caller can wipe a secret it
    /// carried (the `auth` frame's token) in place.
    Binary(BytesMut),
    /// A text message.
    Text,
    /// A ping, with its payload to echo.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// The client started the closing handshake.
    Close,
}

/// Why the reader stopped: the close to send, if the peer can still take one.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client broke the protocol or a limit; send this close.
    Close(Close),
    /// The connection failed underneath (reset, I/O error): nothing more can be sent.
    Gone,
}

/// Bytes buffered by every reader together, and the most they may be. When a reader cannot
/// get room for the bytes it has been sent, its connection is closed with *try again later*
/// (1013) rather than letting buffers grow the broker's memory without bound.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held by readers now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A WebSocket's incoming bytes, as they arrive.
pub type Body = Pin<Box<dyn Stream<Item = io::Result<Bytes>>>>;

/// Most bytes taken from the kernel in one read.
const READ_CHUNK: usize = 16 * 1024;

/// The bytes of an upgraded TCP connection, read only when the kernel has some: a read waits
/// for readiness with no buffer, then copies what arrived out of a stack buffer (wiped after).
/// An idle connection holds no read buffer at all; actix-http's dispatcher held 8 KiB per
/// connection, idle or not.
pub struct TcpBody {
    io: OwnedReadHalf,
    /// What arrived behind the upgrade request, before the socket was handed over.
    first: Option<Bytes>,
}

impl TcpBody {
    /// Reads `io`, starting with `first`.
    pub fn new(io: OwnedReadHalf, first: Bytes) -> TcpBody {
        TcpBody {
            io,
            first: (!first.is_empty()).then_some(first),
        }
    }
}

impl Stream for TcpBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let mut space = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut space);
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => {
                let chunk = Bytes::copy_from_slice(buf.filled());
                // One memset, kept by `black_box` (zeroize's volatile writes go byte by byte).
                let filled = buf.filled_mut();
                filled.fill(0);
                std::hint::black_box(filled);
                Poll::Ready(Some(Ok(chunk)))
            }
        }
    }
}

/// Reads whole messages from a WebSocket's incoming bytes.
pub struct Reader {
    payload: Body,
    /// Bytes received and not yet decoded: at most one frame, plus what arrived with its end.
    buf: BytesMut,
    /// A fragmented binary or text message being put together: (is binary, bytes so far).
    fragments: Option<(bool, BytesMut)>,
    /// The longest message accepted.
    max_message: usize,
    budget: Arc<Budget>,
    /// What this reader has taken from the budget.
    charged: usize,
    /// The body ended (the client closed its side).
    ended: bool,
}

impl Reader {
    /// Reads `payload`, refusing messages longer than `max_message` and charging buffered
    /// bytes to `budget`.
    pub fn new(payload: Body, max_message: usize, budget: Arc<Budget>) -> Reader {
        Reader {
            payload,
            buf: BytesMut::new(),
            fragments: None,
            max_message,
            budget,
            charged: 0,
            ended: false,
        }
    }

    /// The next whole message; `None` once the client's side has ended. Cancel-safe: every
    /// byte received is kept in `self` before the next await.
    pub async fn next(&mut self) -> Option<Result<Message, Refusal>> {
        loop {
            match self.decode() {
                Ok(Some(message)) => return Some(Ok(message)),
                Ok(None) => {}
                Err(close) => return Some(Err(Refusal::Close(close))),
            }
            if self.ended {
                return None;
            }
            if self.buf.is_empty() {
                // Let go of the allocation the last message was cut from: a quiet connection
                // keeps no buffer.
                self.buf = BytesMut::new();
            }
            match self.payload.next().await {
                Some(Ok(chunk)) => {
                    if !self.charge(self.held() + chunk.len()) {
                        return Some(Err(Refusal::Close(Close::new(
                            CloseCode::TryAgainLater,
                            "the server is short of memory; try again later",
                        ))));
                    }
                    if self.buf.is_empty() {
                        self.buf = BytesMut::from(chunk);
                    } else {
                        self.buf.extend_from_slice(&chunk);
                    }
                }
                Some(Err(_)) => return Some(Err(Refusal::Gone)),
                None => self.ended = true,
            }
        }
    }

    /// After our close frame: reads on until the client answers with its close frame (the
    /// closing handshake), ends its side, or `within` passes; past a frame that breaks a limit,
    /// bytes are dropped unread. Closing a socket with unread bytes in it makes the kernel
    /// reset the connection, and a reset can destroy our close frame before the client reads
    /// it.
    pub async fn discard(&mut self, within: std::time::Duration) {
        let _ = tokio::time::timeout(within, async {
            loop {
                match self.next().await {
                    Some(Ok(Message::Close)) | None => return,
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break,
                }
            }
            self.buf = BytesMut::new();
            self.fragments = None;
            self.charge(0);
            while let Some(Ok(_)) = self.payload.next().await {}
        })
        .await;
        self.buf = BytesMut::new();
        self.fragments = None;
        self.charge(0);
    }

    fn held(&self) -> usize {
        self.buf.len() + self.fragments.as_ref().map_or(0, |(_, f)| f.len())
    }

    /// Sets this reader's share of the budget to `bytes`; false if the budget has no room.
    fn charge(&mut self, bytes: usize) -> bool {
        if bytes > self.charged {
            if !self.budget.try_take(bytes - self.charged) {
                return false;
            }
        } else {
            self.budget.give_back(self.charged - bytes);
        }
        self.charged = bytes;
        true
    }

    /// Decodes one message from the buffer, if a whole one is there.
    fn decode(&mut self) -> Result<Option<Message>, Close> {
        loop {
            let Some(header) = Header::parse(&self.buf)? else {
                return Ok(None);
            };
            let assembled = self.fragments.as_ref().map_or(0, |(_, f)| f.len());
            if !header.opcode.is_control()
                && assembled.saturating_add(header.len) > self.max_message
            {
                return Err(Close::new(
                    CloseCode::TooBig,
                    format!("messages are limited to {} bytes", self.max_message),
                ));
            }
            let frame_len = header.size + header.len; // header.len <= max_message here
            if self.buf.len() < frame_len {
                return Ok(None);
            }
            let _ = self.buf.split_to(header.size);
            let mut payload = self.buf.split_to(header.len);
            unmask(&mut payload, header.mask);
            let message = self.assemble(&header, payload)?;
            self.charge(self.held());
            if let Some(message) = message {
                return Ok(Some(message));
            }
        }
    }

    /// Applies one frame: a whole message, or a fragment kept until its message is complete.
    fn assemble(&mut self, header: &Header, payload: BytesMut) -> Result<Option<Message>, Close> {
        Ok(Some(match header.opcode {
            Opcode::Ping => Message::Ping(payload.freeze()),
            Opcode::Pong => Message::Pong,
            Opcode::Close => {
                validate_close(&payload)?;
                Message::Close
            }
            Opcode::Binary | Opcode::Text => {
                if self.fragments.is_some() {
                    return Err(protocol("a new message began before the last one ended"));
                }
                let binary = header.opcode == Opcode::Binary;
                if !header.fin {
                    self.fragments = Some((binary, payload));
                    return Ok(None);
                }
                if binary {
                    Message::Binary(payload)
                } else {
                    Message::Text
                }
            }
            Opcode::Continuation => {
                let Some((_, so_far)) = &mut self.fragments else {
                    return Err(protocol("a continuation frame with no message to continue"));
                };
                so_far.extend_from_slice(&payload);
                if !header.fin {
                    return Ok(None);
                }
                let (binary, whole) = self.fragments.take().expect("checked above");
                if binary {
                    Message::Binary(whole)
                } else {
                    Message::Text
                }
            }
        }))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.budget.give_back(self.charged);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A frame header, parsed and checked.
#[derive(Debug)]
struct Header {
    fin: bool,
    opcode: Opcode,
    mask: [u8; 4],
    /// Payload length.
    len: usize,
    /// Header length: 6, 8 or 14 bytes.
    size: usize,
}

impl Header {
    /// Parses the header at the start of `buf`: `None` if it is not all there yet.
    fn parse(buf: &[u8]) -> Result<Option<Header>, Close> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(protocol(
                "reserved bits set, and no extension was negotiated",
            ));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = match b0 & 0x0f {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xa => Opcode::Pong,
            _ => return Err(protocol("reserved opcode")),
        };
        if b1 & 0x80 == 0 {
            return Err(protocol("frames from a client must be masked"));
        }
        let short = usize::from(b1 & 0x7f);
        if opcode.is_control() && (!fin || short > 125) {
            return Err(protocol(
                "control frames are unfragmented and at most 125 bytes",
            ));
        }
        let (len, at) = match short {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                    if len >> 63 != 0 {
                        return Err(protocol("the top bit of a 64-bit length must be 0"));
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            n => (n as u64, 2),
        };
        let Some(mask) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask: mask.try_into().expect("4 bytes"),
            // Saturating: a length past usize is over any limit anyway.
            len: usize::try_from(len).unwrap_or(usize::MAX),
            size: at + 4,
        }))
    }
}

/// Checks a close frame's payload: empty, or a valid code and a UTF-8 reason.
fn validate_close(payload: &[u8]) -> Result<(), Close> {
    match payload {
        [] => Ok(()),
        [_] => Err(protocol(
            "a close frame's payload is empty or at least a code",
        )),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // RFC 6455 section 7.4: the codes an endpoint may send (1004-1006 and 1015 are
            // reserved for reporting, never sent), and 3000-4999 for registered and private use.
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(protocol("a close reason must be UTF-8"));
            }
            Ok(())
        }
    }
}

fn protocol(reason: &'static str) -> Close {
    Close::new(CloseCode::ProtocolError, reason)
}

/// XORs the payload with the client's masking key.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let x = u32::from_ne_bytes(chunk.try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&x.to_ne_bytes());
    }
    for (b, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *b ^= m;
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // lengths in tests are small
mod tests {
    use super::*;

    const MAX: usize = 1024;

    /// A client frame: FIN/RSV/opcode byte, masked, with the length in the shortest form.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        out
    }

    /// A header announcing `len` bytes, and nothing of them.
    fn header_only(first: u8, len: u64) -> Vec<u8> {
        let mut out = vec![first, 0x80 | 127];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out
    }

    fn reader(chunks: Vec<Vec<u8>>, budget: &Arc<Budget>) -> Reader {
        let body = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))));
        Reader::new(Box::pin(body), MAX, Arc::clone(budget))
    }

    async fn read_all(chunks: Vec<Vec<u8>>) -> Vec<Result<Message, Refusal>> {
        let budget = Budget::new(usize::MAX);
        let mut r = reader(chunks, &budget);
        let mut out = Vec::new();
        while let Some(m) = r.next().await {
            let end = m.is_err();
            out.push(m);
            if end {
                break;
            }
        }
        out
    }

    fn closed_with(code: CloseCode) -> impl Fn(&Result<Message, Refusal>) -> bool {
        move |m| matches!(m, Err(Refusal::Close(c)) if c.code == code)
    }

    #[tokio::test]
    async fn whole_fragmented_and_split_messages_are_read() {
        let mut bytes = frame(0x82, b"one");
        bytes.extend(frame(0x02, b"tw"));
        bytes.extend(frame(0x89, b"p")); // a ping between fragments is allowed
        bytes.extend(frame(0x80, b"o"));
        bytes.extend(frame(0x88, &[0x03, 0xe8]));
        // Delivered one byte at a time: every header and payload split everywhere.
        let chunks = bytes.into_iter().map(|b| vec![b]).collect();
        let got = read_all(chunks).await;
        assert_eq!(
            got,
            vec![
                Ok(Message::Binary(BytesMut::from(&b"one"[..]))),
                Ok(Message::Ping(Bytes::from_static(b"p"))),
                Ok(Message::Binary(BytesMut::from(&b"two"[..]))),
                Ok(Message::Close),
            ]
        );
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_at_the_header() {
        // Only the header arrives: the refusal cannot have waited for the payload.
        for len in [MAX as u64 + 1, 1 << 30, (1 << 62) + 5] {
            let got = read_all(vec![header_only(0x82, len)]).await;
            assert!(closed_with(CloseCode::TooBig)(&got[0]), "{len}: {got:?}");
        }
    }

    #[tokio::test]
    async fn fragments_adding_up_past_the_limit_are_refused_at_the_header() {
        let mut bytes = frame(0x02, &[0; MAX - 10]);
        bytes.extend(header_only(0x80, 11));
        let got = read_all(vec![bytes]).await;
        assert!(closed_with(CloseCode::TooBig)(&got[0]), "{got:?}");
        // Exactly the limit is fine.
        let mut bytes = frame(0x02, &[0; MAX - 10]);
        bytes.extend(frame(0x80, &[0; 10]));
        let got = read_all(vec![bytes]).await;
        assert!(matches!(&got[0], Ok(Message::Binary(b)) if b.len() == MAX));
    }

    #[tokio::test]
    async fn protocol_violations_are_refused_with_protocol_error() {
        let unmasked = vec![0x82, 0x01, 0xff];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("rsv1", frame(0xc2, b"x")),
            ("rsv3", frame(0x92, b"x")),
            ("reserved opcode", frame(0x83, b"x")),
            ("reserved control opcode", frame(0x8b, b"x")),
            ("unmasked", unmasked),
            ("64-bit length with the top bit", header_only(0x82, 1 << 63)),
            ("fragmented ping", frame(0x09, b"x")),
            ("long ping", frame(0x89, &[0; 126])),
            ("continuation first", frame(0x80, b"x")),
            ("one-byte close", frame(0x88, &[3])),
            ("close code 5", frame(0x88, &[0, 5])),
            ("close code 1005", frame(0x88, &[0x03, 0xed])),
            ("close code 2999", frame(0x88, &[0x0b, 0xb7])),
            ("close reason not utf-8", frame(0x88, &[0x03, 0xe8, 0xff])),
        ];
        for (name, bytes) in cases {
            let got = read_all(vec![bytes]).await;
            assert!(
                closed_with(CloseCode::ProtocolError)(&got[0]),
                "{name}: {got:?}"
            );
        }
        let mut interleaved = frame(0x02, b"a");
        interleaved.extend(frame(0x82, b"b"));
        let got = read_all(vec![interleaved]).await;
        assert!(closed_with(CloseCode::ProtocolError)(&got[0]), "{got:?}");
    }

    #[tokio::test]
    async fn valid_close_codes_and_text_are_reported() {
        for code in [1000u16, 1001, 1011, 3000, 4999] {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice("bye é".as_bytes());
            let got = read_all(vec![frame(0x88, &payload)]).await;
            assert_eq!(got, vec![Ok(Message::Close)], "{code}");
        }
        let got = read_all(vec![frame(0x81, b"hello")]).await;
        assert_eq!(got, vec![Ok(Message::Text)]);
    }

    #[tokio::test]
    async fn buffered_bytes_are_charged_to_the_budget_and_given_back() {
        let budget = Budget::new(1000);
        // 600 bytes of a 1,000-byte message: charged while waiting for the rest.
        let partial = frame(0x82, &[7; 1000])[..600].to_vec();
        let first = futures_util::stream::iter([Ok(Bytes::from(partial))])
            .chain(futures_util::stream::pending());
        let mut a = Reader::new(Box::pin(first), MAX, Arc::clone(&budget));
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), a.next()).await;
        assert!(waiting.is_err(), "the message is incomplete");
        assert_eq!(budget.used(), 600);
        // A second reader cannot take more than what is left.
        let mut b = reader(vec![frame(0x82, &[1; 500])], &budget);
        let got = b.next().await;
        assert!(
            matches!(&got, Some(Err(Refusal::Close(c))) if c.code == CloseCode::TryAgainLater),
            "{got:?}"
        );
        drop(b);
        drop(a);
        assert_eq!(budget.used(), 0);
        // What a decoded message held is given back once it is handed out.
        let mut c = reader(vec![frame(0x82, &[1; 500])], &budget);
        assert!(matches!(c.next().await, Some(Ok(Message::Binary(_)))));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_buffer() {
        let budget = Budget::new(1 << 20);
        // Two messages, the first cut across two chunks (so the buffer had to grow), then
        // silence.
        let mut bytes = frame(0x82, &[1; 1000]);
        bytes.extend(frame(0x82, &[2; 10]));
        let rest = bytes.split_off(600);
        let chunks = [Ok(Bytes::from(bytes)), Ok(Bytes::from(rest))];
        let body = futures_util::stream::iter(chunks).chain(futures_util::stream::pending());
        let mut reader = Reader::new(Box::pin(body), MAX, Arc::clone(&budget));
        let Some(Ok(Message::Binary(first))) = reader.next().await else {
            panic!("the first message");
        };
        assert_eq!(first.len(), 1000);
        let Some(Ok(Message::Binary(second))) = reader.next().await else {
            panic!("the second message");
        };
        assert_eq!(&second[..], &[2; 10]);
        drop((first, second));
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), reader.next());
        assert!(waiting.await.is_err(), "nothing more was sent");
        // Waiting for the next bytes, the reader keeps nothing of the chunk it cut them from.
        assert_eq!(reader.buf.capacity(), 0);
        assert_eq!(budget.used(), 0);
    }

    proptest::proptest! {
        /// Any sequence of binary messages (some fragmented) and pings, cut into chunks at any
        /// points, reads back as exactly those messages: nothing lost, merged or mistaken for
        /// a close.
        #[test]
        fn any_chunking_reads_back_the_same_messages(
            messages in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0usize..3, proptest::bool::ANY),
                1..20,
            ),
            cuts in proptest::collection::vec(1usize..97, 1..40),
        ) {
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            for (payload, fragments, ping) in &messages {
                if *ping && payload.len() <= 125 {
                    bytes.extend(frame(0x89, payload));
                    expected.push(Message::Ping(Bytes::copy_from_slice(payload)));
                    continue;
                }
                let payload = &payload[..payload.len().min(MAX)];
                let parts = (*fragments + 1).min(payload.len().max(1));
                let size = payload.len().div_ceil(parts).max(1);
                let chunks: Vec<&[u8]> = if payload.is_empty() { vec![&[][..]] } else { payload.chunks(size).collect() };
                for (i, part) in chunks.iter().enumerate() {
                    let fin = if i + 1 == chunks.len() { 0x80 } else { 0 };
                    let op = if i == 0 { 0x2 } else { 0x0 };
                    bytes.extend(frame(fin | op, part));
                }
                expected.push(Message::Binary(BytesMut::from(payload)));
            }
            let mut split = Vec::new();
            let mut rest = &bytes[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*cut).min(rest.len());
                split.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let got = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
                .block_on(read_all(split));
            let got: Vec<Message> = got.into_iter().map(|m| m.expect("no refusal")).collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn unmasking_matches_the_definition_at_every_length() {
        let mask = [1, 2, 3, 4];
        for len in 0..20 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }
}
