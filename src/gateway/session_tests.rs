//! Unit tests of the device and sealed sessions and of inbound federation delivery, on the
//! in-memory store: a real `AppState` over `MemoryStore` and mailbox actors, each session on
//! a loopback TCP connection handed over as the HTTP server hands over an upgrade, fed masked
//! client frames and read back as raw bytes.

use std::{sync::Arc, time::Duration};

use actix::{Arbiter, System};
use actix_web::rt::net::{TcpListener, TcpStream};
use sealpost_proto::{
    Class, ClientFrame, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome, ServerFrame,
    federation::{Admission, FedEnvelope},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::{mpsc, watch},
};

use super::{AppState, Settings, federation::Local};
use crate::{
    crypto::{DeviceToken, TokenHasher},
    federation::{Federation, PeerSettings, identity::ServerKey, inbound::LocalDelivery},
    mailbox::{MailboxConfig, Mailboxes, Registry},
    store::{DeviceRecord, Directory, Stores, memory::MemoryStore, records::RECORD_VERSION},
};

const ALICE: &str = "alice@test.example";
const BOB: &str = "bob@test.example";
const TOKEN: [u8; 32] = [9; 32];

struct Harness {
    state: Arc<AppState>,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

/// A broker of `test.example` on the in-memory store with `ALICE` (one device) and `BOB`
/// (devices 1 and 2), every device's token being `TOKEN`.
async fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let hasher = TokenHasher::load_or_create(dir.path()).expect("hasher");
    let stores = Stores::from_backend(Arc::new(MemoryStore::new()));
    let record = DeviceRecord {
        version: RECORD_VERSION,
        token_hash: hasher.hash(&DeviceToken::from_bytes(&TOKEN).expect("token")),
        identity_keys: vec![1],
        created_ms: 0,
    };
    let directory: &dyn Directory = stores.directory.as_ref();
    directory
        .create_account(ALICE, 0, record.clone())
        .await
        .expect("alice");
    directory
        .create_account(BOB, 0, record.clone())
        .await
        .expect("bob");
    directory.add_device(BOB, record, 16).await.expect("bob 2");
    let mailboxes = Mailboxes::new(Registry::new(
        vec![Arbiter::current()],
        stores.clone(),
        MailboxConfig::for_tests(10, 8, Duration::from_secs(3600)),
    ));
    let hour = Duration::from_secs(3600);
    let federation = Federation::start(
        PeerSettings {
            local_domain: "test.example".into(),
            batch: 8,
            max_txn_bytes: 1 << 20,
            window: 4,
            backoff_min: hour,
            backoff_max: hour,
            request_timeout: hour,
            device_cache: hour,
            keepalive: hour,
            link_timeout: hour,
            idle_timeout: hour,
            lookup_wait: hour,
            origin_rate: 0,
            inbound_txns: 4,
            outbox_quota: 100,
        },
        ServerKey::generate().expect("key"),
        Vec::new(),
        stores.clone(),
        &Arbiter::current(),
    );
    let (shutdown_tx, shutdown) = watch::channel(false);
    let state = Arc::new(AppState::new(
        Settings::for_tests("test.example"),
        stores,
        mailboxes,
        federation,
        hasher,
        shutdown,
    ));
    Harness {
        state,
        _dir: dir,
        _shutdown: shutdown_tx,
    }
}

/// A WebSocket upgrade request for `path` and its server-side connection, as the HTTP server
/// hands them over.
fn handed_over(
    path: &str,
    server: TcpStream,
) -> (
    actix_http::Request,
    actix_codec::Framed<TcpStream, actix_http::h1::Codec>,
) {
    let req = actix_http::test::TestRequest::with_uri(path)
        .insert_header(("upgrade", "websocket"))
        .insert_header(("connection", "upgrade"))
        .insert_header(("sec-websocket-version", "13"))
        .insert_header(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="))
        .finish();
    let codec = actix_http::h1::Codec::new(actix_http::ServiceConfig::default());
    (req, actix_codec::Framed::new(server, codec))
}

/// A client's end of a session: masked frames out, the broker's frames read off the socket.
struct Client {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    read: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
}

impl Client {
    /// Opens `/v1/sealed` or `/v1/ws` on a loopback connection served by the session.
    async fn open(state: &Arc<AppState>, sealed: bool) -> Client {
        let path = if sealed { "/v1/sealed" } else { "/v1/ws" };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (req, connection) = handed_over(path, server);
        actix_web::rt::spawn(super::serve_upgrade(state.clone(), req, connection));
        let (read, mut write) = client.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        actix_web::rt::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let mut client = Client {
            tx,
            read,
            buf: Vec::new(),
        };
        let head_end = loop {
            if let Some(at) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(client.fill().await, "the handshake's answer");
        };
        let head: Vec<u8> = client.buf.drain(..head_end).collect();
        assert!(
            head.starts_with(b"HTTP/1.1 101 "),
            "{}",
            String::from_utf8_lossy(&head)
        );
        client
    }

    /// Reads what the broker sent next into `buf`; false once the connection has ended.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), self.read.read(&mut chunk))
            .await
            .expect("bytes in time");
        match read {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    fn send(&self, frame: &ClientFrame) {
        let payload = frame.encode();
        let mask = [3u8, 1, 4, 1];
        let mut out = vec![0x82];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | u8::try_from(n).expect("short")),
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        self.tx.send(out).expect("the writer task runs");
    }

    /// The next frame from the broker: `Ok(frame)`, or `Err(close code)`.
    async fn next(&mut self) -> Result<ServerFrame, Option<u16>> {
        loop {
            if let Some((opcode, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                match opcode {
                    0x2 => return Ok(ServerFrame::decode(&payload).expect("frame")),
                    0x8 => {
                        return Err(payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])));
                    }
                    _ => continue, // pings
                }
            }
            if !self.fill().await {
                return Err(None);
            }
        }
    }

    async fn auth(&mut self, user: &str, device: u32) {
        self.send(&ClientFrame::Auth {
            user: user.into(),
            device: DeviceId(device),
            token: TOKEN.to_vec(),
        });
        assert!(matches!(self.next().await, Ok(ServerFrame::AuthOk { .. })));
    }

    /// The send result for `id`, skipping other frames.
    async fn result(&mut self, id: EnvelopeId) -> SendOutcome {
        loop {
            match self.next().await {
                Ok(ServerFrame::SendResult { id: got, outcome }) if got == id => return outcome,
                Ok(_) => {}
                Err(close) => panic!("closed: {close:?}"),
            }
        }
    }
}

/// A server frame at the start of `buf`: (opcode, payload, bytes used).
fn parse_server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let [b0, b1, ..] = *buf else { return None };
    let (len, at) = match b1 & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some((b0 & 0x0f, payload, at + len))
}

fn send_to(id: u8, to: &str, devices: &[u32]) -> ClientFrame {
    ClientFrame::Send {
        id: EnvelopeId([id; 16]),
        to: to.into(),
        class: Class::Durable,
        ttl_secs: 60,
        copies: devices
            .iter()
            .map(|d| Copy {
                device: DeviceId(*d),
                ciphertext: vec![id; 4],
            })
            .collect(),
    }
}

fn run<F: Future<Output = ()>>(test: impl FnOnce() -> F) {
    System::new().block_on(test());
}

#[test]
fn a_device_session_authenticates_sends_and_is_delivered_to() {
    run(|| async {
        let h = harness().await;
        let mut alice = Client::open(&h.state, false).await;
        alice.auth(ALICE, 1).await;
        assert_eq!(alice.next().await, Ok(ServerFrame::QueueEmpty));
        let mut bob = Client::open(&h.state, false).await;
        bob.auth(BOB, 1).await;
        assert_eq!(bob.next().await, Ok(ServerFrame::QueueEmpty));
        alice.send(&send_to(1, BOB, &[1, 2]));
        assert_eq!(
            alice.result(EnvelopeId([1; 16])).await,
            SendOutcome::Accepted { duplicate: false }
        );
        match bob.next().await {
            Ok(ServerFrame::Deliver { seq: 1, envelope }) => {
                assert_eq!(envelope.id, EnvelopeId([1; 16]));
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_wrong_token_and_a_stale_device_set_are_refused() {
    run(|| async {
        let h = harness().await;
        let mut eve = Client::open(&h.state, false).await;
        eve.send(&ClientFrame::Auth {
            user: ALICE.into(),
            device: DeviceId(1),
            token: vec![7; 32],
        });
        assert!(matches!(
            eve.next().await,
            Ok(ServerFrame::Error {
                code: ErrorCode::BadToken,
                ..
            })
        ));
        assert_eq!(eve.next().await, Err(Some(4001)));
        let mut alice = Client::open(&h.state, false).await;
        alice.auth(ALICE, 1).await;
        alice.send(&send_to(2, BOB, &[1]));
        match alice.result(EnvelopeId([2; 16])).await {
            SendOutcome::Rejected {
                code: ErrorCode::StaleDevices,
                current_devices,
            } => assert_eq!(current_devices, vec![DeviceId(1), DeviceId(2)]),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_second_connection_of_a_device_displaces_the_first() {
    run(|| async {
        let h = harness().await;
        let mut first = Client::open(&h.state, false).await;
        first.auth(BOB, 1).await;
        assert_eq!(first.next().await, Ok(ServerFrame::QueueEmpty));
        let mut second = Client::open(&h.state, false).await;
        second.auth(BOB, 1).await;
        loop {
            match first.next().await {
                Ok(_) => {}
                Err(code) => {
                    assert_eq!(code, Some(4000), "displaced");
                    break;
                }
            }
        }
    });
}

#[test]
fn sealed_sends_need_the_recipients_delivery_token() {
    run(|| async {
        let h = harness().await;
        let mut anon = Client::open(&h.state, true).await;
        let ClientFrame::Send {
            id,
            to,
            class,
            ttl_secs,
            copies,
        } = send_to(3, BOB, &[1, 2])
        else {
            unreachable!()
        };
        anon.send(&ClientFrame::SealedSend {
            id,
            to,
            class,
            ttl_secs,
            copies,
            delivery_token: Some(vec![1; 32]),
        });
        match anon.result(id).await {
            SendOutcome::Rejected {
                code: ErrorCode::BadDeliveryToken,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        // An authenticated send is refused on the anonymous endpoint.
        anon.send(&send_to(4, BOB, &[1, 2]));
        assert!(matches!(
            anon.next().await,
            Ok(ServerFrame::Error {
                code: ErrorCode::WrongEndpoint,
                ..
            })
        ));
    });
}

#[test]
fn inbound_federation_delivery_stores_for_the_devices_that_remain() {
    run(|| async {
        let h = harness().await;
        let local = Local(h.state.clone());
        let envelope = |id: u8, devices: &[u32], admission| FedEnvelope {
            id: EnvelopeId([id; 16]),
            to: BOB.into(),
            class: Class::Durable,
            ttl_secs: 60,
            copies: devices
                .iter()
                .map(|d| Copy {
                    device: DeviceId(*d),
                    ciphertext: vec![id; 4],
                })
                .collect(),
            admission,
        };
        // The origin checked the device set; bob's device 3 is gone since: 1 and 2 get theirs.
        let answer = local
            .deliver("peer.example", envelope(5, &[1, 2, 3], Admission::Origin))
            .await
            .await;
        assert_eq!(answer, None);
        // A token that is not bob's is refused.
        let answer = local
            .deliver(
                "peer.example",
                envelope(6, &[1, 2], Admission::Token(vec![1; 32])),
            )
            .await
            .await;
        assert_eq!(answer, Some(ErrorCode::BadDeliveryToken));
        // A recipient on another domain is not relayed.
        let mut elsewhere = envelope(7, &[1], Admission::Origin);
        elsewhere.to = "carol@other.example".into();
        assert_eq!(
            local.deliver("peer.example", elsewhere).await.await,
            Some(ErrorCode::UnknownDomain)
        );
        let mut bob = Client::open(&h.state, false).await;
        bob.auth(BOB, 2).await;
        match bob.next().await {
            Ok(ServerFrame::Deliver { seq: 1, envelope }) => {
                assert_eq!(envelope.id, EnvelopeId([5; 16]));
            }
            other => panic!("{other:?}"),
        }
    });
}

/// What an idle device connection holds for its whole life is its task's future: boxed per
/// endpoint, a device session's is not as large as an inbound federation link's, which the
/// three shared while one future served them all (W3: 12.4 KiB per idle session at 19,500
/// before, about 6 KiB after; `loadtest/JOURNAL.md`, "2026-12-07 (5)").
#[test]
fn an_idle_device_connection_holds_no_larger_future_than_its_own() {
    run(|| async {
        let h = harness().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut sizes = Vec::new();
        for path in ["/v1/ws", "/v1/federation"] {
            let _client = TcpStream::connect(addr).await.expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            let (req, connection) = handed_over(path, server);
            let serving = super::serve_upgrade(h.state.clone(), req, connection);
            sizes.push(std::mem::size_of_val(&*serving));
        }
        let [device, federation] = sizes[..] else {
            unreachable!("two endpoints")
        };
        assert!(
            device < federation,
            "a device session holds {device} bytes, an inbound link {federation}"
        );
    });
}
