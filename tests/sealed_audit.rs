//! The operator's audit of sealed sender, as a test: a recording TCP proxy sits in front of each
//! broker's client port and writes down every HTTP request and every client WebSocket frame the
//! broker receives, per connection, in order, with times. Real SDK clients (alice with two
//! devices, bob with one) exchange sealed messages through it, on one broker and across two
//! federating ones, and the recording must not let the operator name the sender of a sealed
//! envelope:
//!
//! 1. no connection that carries a sealed send, nor any connection whose requests prepared it
//!    (the recipient's device list and key claims just before), ever names the sender (its
//!    handle, a credential of one of its devices, an account-scoped request of it);
//! 2. the sender's transcript for its other devices does not travel on the sealed socket, nor
//!    in the same burst as the sealed send: it goes authenticated, a moment later;
//! 3. after a sealed envelope is delivered, the recipient asks nothing about the sender.
//!
//! The clients use device lists of any age for everything they can (`set_device_list_max_age`
//! zero): within the test's few seconds this stands for lists older than the SDK's cache.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpListener as StdListener},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{
    Broker, WAIT,
    sdk::{Dev, next},
};
use sealpost_client::{Client, Event, engine::GroupEvent};
use sealpost_proto::ClientFrame;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

// ---------------------------------------------------------------------------------------------
// The recording proxy.

/// One thing the broker received.
#[derive(Debug, Clone)]
enum Item {
    /// An HTTP/1.1 request (a WebSocket handshake included).
    Http {
        method: String,
        path: String,
        /// Header names lower-cased.
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A client WebSocket binary frame, unmasked and decoded.
    Frame(ClientFrame),
    /// A client WebSocket binary frame that does not decode.
    Undecodable,
}

#[derive(Debug, Clone)]
struct Rec {
    /// Connection number (unique across proxies).
    conn: usize,
    at: Instant,
    item: Item,
}

#[derive(Clone, Default)]
struct Recording {
    recs: Arc<Mutex<Vec<Rec>>>,
    next_conn: Arc<Mutex<usize>>,
}

impl Recording {
    fn push(&self, conn: usize, item: Item) {
        self.recs.lock().expect("lock").push(Rec {
            conn,
            at: Instant::now(),
            item,
        });
    }

    fn snapshot(&self) -> Vec<Rec> {
        self.recs.lock().expect("lock").clone()
    }

    fn new_conn(&self) -> usize {
        let mut n = self.next_conn.lock().expect("lock");
        *n += 1;
        *n
    }
}

/// Starts a proxy to `upstream`; returns its base URL.
async fn proxy(upstream: SocketAddr, recording: Recording) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let recording = recording.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let conn = recording.new_conn();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                });
                let mut parser = Parser::default();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    // Recorded before it reaches the broker: the order is what the broker sees.
                    for item in parser.feed(&buf[..n]) {
                        recording.push(conn, item);
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown().await;
                let _ = down.await;
            });
        }
    });
    format!("http://{addr}")
}

/// Client-to-server byte stream parser: HTTP/1.1 requests until a WebSocket upgrade, then
/// WebSocket frames (masked, as clients send them).
#[derive(Default)]
struct Parser {
    buf: Vec<u8>,
    websocket: bool,
    /// A fragmented message being assembled.
    fragments: Vec<u8>,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<Item> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let item = if self.websocket {
                self.ws_frame()
            } else {
                self.http_request()
            };
            match item {
                Some(Some(item)) => out.push(item),
                Some(None) => {}
                None => return out,
            }
        }
    }

    /// `None`: incomplete. `Some(None)`: consumed something not recorded.
    fn http_request(&mut self) -> Option<Option<Item>> {
        let end = self.buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_owned();
        let path = first.next().unwrap_or("").to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let start = end + 4;
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut pos = start;
            let mut body = Vec::new();
            loop {
                let line_end = self.buf[pos..].windows(2).position(|w| w == b"\r\n")? + pos;
                let size_text = String::from_utf8_lossy(&self.buf[pos..line_end]).to_string();
                let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                let data = line_end + 2;
                if self.buf.len() < data + size + 2 {
                    return None;
                }
                body.extend_from_slice(&self.buf[data..data + size]);
                pos = data + size + 2;
                if size == 0 {
                    break;
                }
            }
            self.buf.drain(..pos);
            body
        } else {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if self.buf.len() < start + len {
                return None;
            }
            let body = self.buf[start..start + len].to_vec();
            self.buf.drain(..start + len);
            body
        };
        if header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
            self.websocket = true;
        }
        Some(Some(Item::Http {
            method,
            path,
            headers,
            body,
        }))
    }

    fn ws_frame(&mut self) -> Option<Option<Item>> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let (len, mut pos) = match b[1] & 0x7f {
            126 => {
                if b.len() < 4 {
                    return None;
                }
                (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
            }
            127 => {
                if b.len() < 10 {
                    return None;
                }
                (
                    u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
                    10,
                )
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            if b.len() < pos + 4 {
                return None;
            }
            let m: [u8; 4] = b[pos..pos + 4].try_into().expect("4 bytes");
            pos += 4;
            Some(m)
        } else {
            None
        };
        let len = len as usize;
        if b.len() < pos + len {
            return None;
        }
        let mut payload = b[pos..pos + len].to_vec();
        if let Some(m) = mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= m[i % 4];
            }
        }
        self.buf.drain(..pos + len);
        match opcode {
            0x0 | 0x2 => {
                self.fragments.extend_from_slice(&payload);
                if !fin {
                    return Some(None);
                }
                let message = std::mem::take(&mut self.fragments);
                Some(Some(
                    ClientFrame::decode(&message).map_or(Item::Undecodable, Item::Frame),
                ))
            }
            _ => Some(None),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the recording.

/// Byte strings that name one account: its handle, and credentials its devices were seen using.
struct Names {
    handle: String,
    secrets: BTreeSet<Vec<u8>>,
}

impl Names {
    /// `handle`'s names as the recording shows them: the tokens of `Authorization` headers on
    /// requests about its own account's devices and of `auth` frames as it.
    fn learn(handle: &str, recs: &[Rec]) -> Names {
        let mut secrets = BTreeSet::new();
        for r in recs {
            match &r.item {
                Item::Http { path, headers, .. } if contains_handle(path, handle) => {
                    for (k, v) in headers {
                        if k == "authorization" {
                            secrets.insert(v.as_bytes().to_vec());
                        }
                    }
                }
                Item::Frame(ClientFrame::Auth { user, token, .. }) if user == handle => {
                    secrets.insert(token.clone());
                }
                _ => {}
            }
        }
        Names {
            handle: handle.to_owned(),
            secrets,
        }
    }

    /// Whether `item` names this account.
    fn named_by(&self, item: &Item) -> bool {
        match item {
            Item::Http {
                path,
                headers,
                body,
                ..
            } => {
                contains_handle(path, &self.handle)
                    || headers.iter().any(|(_, v)| {
                        contains_handle(v, &self.handle) || self.secrets.contains(v.as_bytes())
                    })
                    || contains_handle(&String::from_utf8_lossy(body), &self.handle)
            }
            Item::Frame(ClientFrame::Auth { user, token, .. }) => {
                *user == self.handle || self.secrets.contains(token)
            }
            Item::Frame(ClientFrame::Send { to, .. } | ClientFrame::SealedSend { to, .. }) => {
                *to == self.handle
            }
            Item::Frame(_) | Item::Undecodable => false,
        }
    }
}

fn contains_handle(text: &str, handle: &str) -> bool {
    let text = text.to_ascii_lowercase();
    let handle = handle.to_ascii_lowercase();
    text.contains(&handle) || text.contains(&handle.replace('@', "%40"))
}

/// The connections authenticated as `handle` (an `auth` frame as it, or a credential of it).
fn conns_of(names: &Names, recs: &[Rec]) -> BTreeSet<usize> {
    recs.iter()
        .filter(|r| match &r.item {
            Item::Frame(ClientFrame::Auth { user, .. }) => *user == names.handle,
            Item::Http { headers, .. } => headers
                .iter()
                .any(|(k, v)| k == "authorization" && names.secrets.contains(v.as_bytes())),
            _ => false,
        })
        .map(|r| r.conn)
        .collect()
}

fn describe(r: &Rec, t0: Instant) -> String {
    let what = match &r.item {
        Item::Http { method, path, .. } => format!("{method} {path}"),
        Item::Frame(ClientFrame::Auth { user, .. }) => format!("ws auth as {user}"),
        Item::Frame(ClientFrame::Send { to, .. }) => format!("ws send to {to}"),
        Item::Frame(ClientFrame::SealedSend { to, .. }) => format!("ws sealed_send to {to}"),
        Item::Frame(f) => format!("ws {f:?}").chars().take(60).collect(),
        Item::Undecodable => "ws undecodable".into(),
    };
    format!(
        "conn {} +{}ms {what}",
        r.conn,
        r.at.saturating_duration_since(t0).as_millis()
    )
}

/// The audit of one sealed phase: sealed sends by `sender` to `recipient` after `from`.
/// Returns the violations found (empty: the operator cannot name the sender).
fn audit(
    recs: &[Rec],
    sender: &str,
    recipient: &str,
    from: Instant,
    transcript_gap: Duration,
) -> Vec<String> {
    let names = Names::learn(sender, recs);
    let recipient_names = Names::learn(recipient, recs);
    let senders_conns = conns_of(&names, recs);
    let mut bad = Vec::new();
    let sealed: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.at >= from)
        .filter(|r| matches!(&r.item, Item::Frame(ClientFrame::SealedSend { to, .. }) if to == recipient))
        .collect();
    assert!(!sealed.is_empty(), "no sealed send from {sender} recorded");
    for s in &sealed {
        // The connection that carried it, and those whose requests about the recipient
        // prepared it (the burst just before it, within this phase).
        let mut related = BTreeSet::from([s.conn]);
        let burst =
            s.at.checked_sub(Duration::from_secs(2))
                .unwrap_or(from)
                .max(from);
        for r in recs.iter().filter(|r| r.at >= burst && r.at <= s.at) {
            if matches!(r.item, Item::Http { .. }) && recipient_names.named_by(&r.item) {
                related.insert(r.conn);
            }
        }
        for r in recs.iter().filter(|r| related.contains(&r.conn)) {
            if names.named_by(&r.item) {
                bad.push(format!(
                    "rule 1: {} names {sender} on a connection of its sealed send ({})",
                    describe(r, from),
                    describe(s, from)
                ));
            }
        }
        // Rule 2: what goes to the sender's own account (its transcripts).
        for r in recs.iter().filter(|r| r.at >= from) {
            let Item::Frame(frame) = &r.item else {
                continue;
            };
            let to_own = match frame {
                ClientFrame::SealedSend { to, .. } | ClientFrame::Send { to, .. } => to == sender,
                _ => false,
            };
            if !to_own {
                continue;
            }
            if matches!(frame, ClientFrame::SealedSend { .. }) || r.conn == s.conn {
                bad.push(format!(
                    "rule 2: transcript sealed or on the sealed socket: {}",
                    describe(r, from)
                ));
            } else if !senders_conns.contains(&r.conn) {
                bad.push(format!(
                    "rule 2: transcript not on an authenticated connection: {}",
                    describe(r, from)
                ));
            } else if r.at > s.at && r.at.duration_since(s.at) < transcript_gap {
                bad.push(format!(
                    "rule 2: transcript {} ms after the sealed send ({})",
                    r.at.duration_since(s.at).as_millis(),
                    describe(r, from)
                ));
            }
        }
        // Rule 3: after the delivery, nothing names the sender but its own connections.
        for r in recs.iter().filter(|r| r.at > s.at) {
            if !senders_conns.contains(&r.conn) && names.named_by(&r.item) {
                bad.push(format!(
                    "rule 3: {} names {sender} after its sealed send ({})",
                    describe(r, from),
                    describe(s, from)
                ));
            }
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

// ---------------------------------------------------------------------------------------------
// The exchanges.

/// The shortest gap between a sealed send and the sender's transcript that the test accepts as
/// "not the same burst" (the clients' own minimum delay is set above it).
const TRANSCRIPT_GAP: Duration = Duration::from_millis(250);

fn tune(client: &mut Client) {
    client.set_device_list_max_age(Duration::ZERO);
    client.set_transcript_delay(Duration::from_millis(300), Duration::from_millis(700));
    // A contact's list we do not hold (alice's second device learns of bob from a
    // transcript) is fetched in a refresh of all lists, brought forward to a short delay.
    client.set_list_refresh(
        Duration::from_secs(3600),
        Duration::from_millis(200),
        Duration::from_millis(600),
    );
}

async fn register_at(server: &str, handle: &str) -> Dev {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut client = Client::register(server, handle, dir.path(), None)
        .await
        .expect("register");
    tune(&mut client);
    Dev { client, _dir: dir }
}

/// Waits until `client` produced an event matching `want` (others are skipped).
async fn until(client: &mut Client, want: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "timed out");
        let event = next(client).await;
        if want(&event) {
            return;
        }
    }
}

fn message(text: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Message(m) if m.text == text)
}

fn transcript(text: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::SentElsewhere { text: t, .. } if t == text)
}

/// alice (two devices) and bob, each on the broker behind its proxy URL: a first contact
/// (authenticated, may name alice), then sealed messages both ways, each audited.
async fn exchange(
    recording: &Recording,
    alice_server: &str,
    alice: &str,
    bob_server: &str,
    bob: &str,
) {
    let mut a1 = register_at(alice_server, alice).await;
    let mut a2 = link_at(alice_server, &mut a1).await;
    let mut b = register_at(bob_server, bob).await;

    // First contact: authenticated; bob learns alice's token and alice learns bob's.
    a1.client.send_text(bob, "hello").await.expect("first");
    let (_, _, _) = tokio::join!(
        a1.client.flush_transcripts(),
        until(&mut b.client, message("hello")),
        until(&mut a2.client, transcript("hello")),
    );
    b.client.send_text(alice, "hi alice").await.expect("reply");
    tokio::join!(
        until(&mut a1.client, message("hi alice")),
        until(&mut a2.client, message("hi alice")),
    );

    // Sealed, alice to bob.
    let from = Instant::now();
    a1.client
        .send_text(bob, "sealed one")
        .await
        .expect("sealed");
    let (flushed, _, _) = tokio::join!(
        a1.client.flush_transcripts(),
        until(&mut b.client, message("sealed one")),
        until(&mut a2.client, transcript("sealed one")),
    );
    flushed.expect("transcripts");
    a2.client
        .send_text(bob, "sealed two")
        .await
        .expect("sealed");
    let (flushed, _, _) = tokio::join!(
        a2.client.flush_transcripts(),
        until(&mut b.client, message("sealed two")),
        until(&mut a1.client, transcript("sealed two")),
    );
    flushed.expect("transcripts");
    let bad = audit(&recording.snapshot(), alice, bob, from, TRANSCRIPT_GAP);

    // Sealed, bob to alice.
    let from_bob = Instant::now();
    b.client
        .send_text(alice, "sealed three")
        .await
        .expect("sealed");
    tokio::join!(
        until(&mut a1.client, message("sealed three")),
        until(&mut a2.client, message("sealed three")),
    );
    let mut bad2 = audit(&recording.snapshot(), bob, alice, from_bob, TRANSCRIPT_GAP);
    let mut all = bad;
    all.append(&mut bad2);
    if !all.is_empty() {
        let recs = recording.snapshot();
        let t0 = recs.first().map_or(from, |r| r.at);
        let log: Vec<String> = recs
            .iter()
            .filter(|r| r.at >= from)
            .map(|r| describe(r, t0))
            .collect();
        panic!(
            "the operator can name the sender of sealed envelopes:\n  {}\n\nrecording (from the sealed phase):\n  {}",
            all.join("\n  "),
            log.join("\n  ")
        );
    }
    a1.client.close().await;
    a2.client.close().await;
    b.client.close().await;
}

async fn link_at(server: &str, existing: &mut Dev) -> Dev {
    let broker_less = link_via(server, existing).await;
    let mut dev = broker_less;
    tune(&mut dev.client);
    dev
}

/// `common::sdk::link` against a URL (the proxy) rather than a broker.
async fn link_via(server: &str, existing: &mut Dev) -> Dev {
    let dir = tempfile::tempdir().expect("tempdir");
    let code = existing.client.create_link_code().await.expect("link code");
    let handle = existing.client.handle().to_owned();
    let linking = Client::link(server, &handle, &code.code, dir.path(), WAIT);
    let approve = async {
        loop {
            match next(&mut existing.client).await {
                Event::DeviceLinked { .. } => break,
                Event::QueueEmpty => {}
                other => panic!("unexpected event while linking: {other:?}"),
            }
        }
    };
    let (linked, ()) = tokio::join!(linking, approve);
    Dev {
        client: linked.expect("link"),
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cannot_name_the_sender_on_one_broker() {
    let broker = Broker::start(&[]);
    let recording = Recording::default();
    let url = proxy(broker.addr, recording.clone()).await;
    tokio::time::timeout(
        Duration::from_secs(50),
        Box::pin(exchange(
            &recording,
            &url,
            "alice@test.example",
            &url,
            "bob@test.example",
        )),
    )
    .await
    .expect("the exchange took too long");
}

/// Two brokers on 127.0.0.1/2, each pinning the other's federation key; clients reach each
/// through its own proxy, brokers reach each other directly.
fn federated() -> (Broker, Broker) {
    let mut sites = Vec::new();
    for (name, ip) in [("a.example", "127.0.0.1"), ("b.example", "127.0.0.2")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_sealpost"))
            .arg("federation-key")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("federation-key");
        let key = String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_owned();
        let port = StdListener::bind((ip, 0))
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
        sites.push((name, addr, dir, key));
    }
    let entries: BTreeMap<&str, String> = sites
        .iter()
        .map(|(name, addr, _, key)| (*name, format!("{name}=ws://{addr}/v1/federation#{key}")))
        .collect();
    let mut brokers = sites.into_iter().map(|(name, addr, dir, _)| {
        let peers: Vec<&str> = entries
            .iter()
            .filter(|(n, _)| **n != name)
            .map(|(_, e)| e.as_str())
            .collect();
        Broker::start_with(
            dir,
            Some(addr),
            &[
                "--domain",
                name,
                "--federation-peers",
                &peers.join(","),
                "--federation-backoff-min-ms",
                "50",
            ],
        )
    });
    let a = brokers.next().expect("a");
    let b = brokers.next().expect("b");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cannot_name_the_sender_across_federation() {
    let (a, b) = federated();
    let recording = Recording::default();
    let url_a = proxy(a.addr, recording.clone()).await;
    let url_b = proxy(b.addr, recording.clone()).await;
    tokio::time::timeout(
        Duration::from_secs(50),
        Box::pin(exchange(
            &recording,
            &url_a,
            "alice@a.example",
            &url_b,
            "bob@b.example",
        )),
    )
    .await
    .expect("the exchange took too long");
}

#[test]
fn the_parser_reads_requests_and_masked_frames() {
    let mut p = Parser::default();
    let req = b"POST /v1/x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /v1/sealed HTTP/1.1\r\nUpgrade: websocket\r\n\r\n";
    let items = p.feed(req);
    assert_eq!(items.len(), 2);
    let frame = ClientFrame::Ack { seqs: vec![7] }.encode();
    let mask = [1u8, 2, 3, 4];
    let mut bytes = vec![0x82, 0x80 | frame.len() as u8];
    bytes.extend_from_slice(&mask);
    bytes.extend(frame.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    // In two pieces, cut anywhere.
    assert!(p.feed(&bytes[..3]).is_empty());
    let items = p.feed(&bytes[3..]);
    assert!(matches!(&items[..], [Item::Frame(ClientFrame::Ack { seqs })] if seqs == &[7]));
}

/// The group audit: every `group_send` from `from` on arrived on a connection that never names
/// `sender` (rule 1, as for 1:1), and after it nothing names the sender but its own
/// connections (rule 3). A group send names every member account as a recipient, the
/// sender's too, whoever sends: that names nobody as its sender.
fn audit_group(recs: &[Rec], sender: &str, from: Instant) -> Vec<String> {
    let names = Names::learn(sender, recs);
    let senders_conns = conns_of(&names, recs);
    let sends: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.at >= from)
        .filter(|r| matches!(&r.item, Item::Frame(ClientFrame::GroupSend { .. })))
        .collect();
    assert!(!sends.is_empty(), "no group send recorded");
    let mut bad = Vec::new();
    for s in &sends {
        if senders_conns.contains(&s.conn) {
            bad.push(format!(
                "a group send on a connection authenticated as {sender}: {}",
                describe(s, from)
            ));
        }
        for r in recs
            .iter()
            .filter(|r| r.conn == s.conn && names.named_by(&r.item))
        {
            bad.push(format!(
                "rule 1: {} names {sender} on the connection of its group send",
                describe(r, from)
            ));
        }
        for r in recs.iter().filter(|r| r.at > s.at) {
            if !senders_conns.contains(&r.conn) && names.named_by(&r.item) {
                bad.push(format!(
                    "rule 3: {} names {sender} after its group send",
                    describe(r, from)
                ));
            }
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

fn group_text(text: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Group(GroupEvent::Message { text: t, .. }) if t == text)
}

/// alice, bob and carol in a group; once bob's and carol's delivery tokens reached alice (they
/// shared them on joining, before their first texts), alice's group message goes sealed.
async fn group_exchange(recording: &Recording, url: &str) {
    let (alice, bob, carol) = (
        "alice@test.example",
        "bob@test.example",
        "carol@test.example",
    );
    let mut a = register_at(url, alice).await;
    let mut b = register_at(url, bob).await;
    let mut c = register_at(url, carol).await;
    let group = a
        .client
        .create_group("audit", &[bob, carol])
        .await
        .expect("create");
    let joined = |e: &Event| matches!(e, Event::Group(GroupEvent::Joined { .. }));
    tokio::join!(until(&mut b.client, joined), until(&mut c.client, joined));
    b.client
        .send_group_text(&group, "bob here")
        .await
        .expect("bob");
    c.client
        .send_group_text(&group, "carol here")
        .await
        .expect("carol");
    until(&mut a.client, group_text("bob here")).await;
    until(&mut a.client, group_text("carol here")).await;

    let from = Instant::now();
    a.client
        .send_group_text(&group, "sealed to the group")
        .await
        .expect("alice");
    tokio::join!(
        until(&mut b.client, group_text("sealed to the group")),
        until(&mut c.client, group_text("sealed to the group")),
    );
    let bad = audit_group(&recording.snapshot(), alice, from);
    if !bad.is_empty() {
        let recs = recording.snapshot();
        let log: Vec<String> = recs
            .iter()
            .filter(|r| r.at >= from)
            .map(|r| describe(r, from))
            .collect();
        panic!(
            "the operator can name the sender of a group message:\n  {}\n\nrecording:\n  {}",
            bad.join("\n  "),
            log.join("\n  ")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cannot_name_the_sender_of_a_group_message() {
    let broker = Broker::start(&[]);
    let recording = Recording::default();
    let url = proxy(broker.addr, recording.clone()).await;
    tokio::time::timeout(
        Duration::from_secs(60),
        Box::pin(group_exchange(&recording, &url)),
    )
    .await
    .expect("the exchange took too long");
}
