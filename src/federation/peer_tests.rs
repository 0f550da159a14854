//! Unit tests of the federation peer actor on the in-memory store, with the test standing in
//! for the link task: it brings the link up, answers device lookups and acknowledges
//! transactions. Each test names one behaviour and fails if it breaks.

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use actix::{Actor, Addr, System};
use sealpost_proto::{
    Class, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome,
    federation::{Admission, LinkFrame, RemoteDevice},
};
use tokio::sync::mpsc;

use super::{
    PeerConfig, PeerSettings, PeerSource, Resolver,
    identity::ServerKey,
    messages::{Enqueue, LinkUp, Outgoing, TxnAcked},
    peer::FederationPeer,
};
use crate::store::{Stores, memory::MemoryStore};

const DOMAIN: &str = "b.example";

struct Fixture {
    memory: MemoryStore,
    peer: Addr<FederationPeer>,
    link: mpsc::Receiver<Outgoing>,
    /// Frames the link received while the test waited for something else.
    frames: VecDeque<LinkFrame>,
    /// Accepts nothing: the peer's own link task waits on it until the test ends, so that
    /// the link the test brings up is the only one.
    _listener: std::net::TcpListener,
}

async fn fixture() -> Fixture {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let config = Arc::new(PeerConfig {
        domain: DOMAIN.into(),
        source: PeerSource::Pinned {
            url: format!("ws://127.0.0.1:{port}/v1/federation"),
            key: [7; 32],
        },
    });
    let timeout = Duration::from_secs(3600);
    let settings = Arc::new(PeerSettings {
        local_domain: "a.example".into(),
        batch: 8,
        max_txn_bytes: 1 << 20,
        window: 4,
        backoff_min: Duration::from_millis(300),
        backoff_max: Duration::from_millis(300),
        request_timeout: timeout,
        device_cache: timeout,
        keepalive: timeout,
        link_timeout: timeout,
        idle_timeout: timeout,
        lookup_wait: timeout,
        origin_rate: 0,
        inbound_txns: 4,
        outbox_quota: 100,
    });
    let resolver = Arc::new(Resolver::new(std::slice::from_ref(&config), timeout));
    let key = Arc::new(ServerKey::generate().expect("key"));
    let memory = MemoryStore::new();
    let stores = Stores::from_backend(Arc::new(memory.clone()));
    let peer = FederationPeer::new(config, settings, key, stores, resolver).start();
    let (tx, link) = mpsc::channel(64);
    // The peer's first connection attempt is generation 1.
    peer.send(LinkUp { generation: 1, tx }).await.expect("peer");
    Fixture {
        memory,
        peer,
        link,
        frames: VecDeque::new(),
        _listener: listener,
    }
}

fn enqueue(id: u8, to: &str) -> Enqueue {
    Enqueue {
        id: EnvelopeId([id; 16]),
        to: to.into(),
        class: Class::Durable,
        ttl_secs: 600,
        copies: Arc::new(vec![Copy {
            device: DeviceId(1),
            ciphertext: vec![id; 4],
        }]),
        admission: Admission::Origin,
    }
}

impl Fixture {
    /// Enqueues a send while answering the device lookup it may make.
    async fn send(&mut self, id: u8, to: &str) -> SendOutcome {
        let answer = self.peer.send(enqueue(id, to));
        tokio::pin!(answer);
        loop {
            tokio::select! {
                biased;
                outcome = &mut answer => return outcome.expect("peer"),
                Some(out) = self.link.recv() => match out {
                    Outgoing::Request(_, reply) => {
                        let devices = vec![RemoteDevice { device: 1, identity_keys: vec![1] }];
                        let _ = reply.send(LinkFrame::Devices { req_id: 0, devices });
                    }
                    Outgoing::Frame(frame) => self.frames.push_back(frame),
                },
            }
        }
    }

    /// The next transaction sent: its id and (recipient, envelope id byte) per envelope.
    async fn txn(&mut self) -> (u64, Vec<(String, u8)>) {
        let frame = match self.frames.pop_front() {
            Some(frame) => frame,
            None => match tokio::time::timeout(Duration::from_secs(10), self.link.recv())
                .await
                .expect("a transaction in time")
                .expect("link open")
            {
                Outgoing::Frame(frame) => frame,
                Outgoing::Request(..) => panic!("unexpected request"),
            },
        };
        match frame {
            LinkFrame::Txn { txn_id, envelopes } => (
                txn_id,
                envelopes.into_iter().map(|e| (e.to, e.id.0[0])).collect(),
            ),
            other => panic!("unexpected frame {other:?}"),
        }
    }

    /// Nothing is sent for a while.
    async fn quiet(&mut self, wait: Duration) {
        assert!(self.frames.is_empty(), "unexpected {:?}", self.frames);
        if let Ok(Some(Outgoing::Frame(frame))) = tokio::time::timeout(wait, self.link.recv()).await
        {
            panic!("unexpected frame {frame:?}");
        }
    }

    fn ack(&self, txn_id: u64, codes: Vec<Option<ErrorCode>>) {
        self.peer.do_send(TxnAcked {
            generation: 1,
            txn_id,
            codes,
        });
    }

    fn outbox(&self) -> Vec<u8> {
        self.memory
            .outbox_entries(DOMAIN)
            .into_iter()
            .map(|(_, r)| r.id[0])
            .collect()
    }
}

const ACCEPTED: SendOutcome = SendOutcome::Accepted { duplicate: false };

#[test]
fn an_envelope_is_in_the_outbox_before_it_is_accepted_and_leaves_it_once_acknowledged() {
    System::new().block_on(async {
        let mut f = fixture().await;
        assert_eq!(f.send(1, "bob@b.example").await, ACCEPTED);
        assert_eq!(f.outbox(), vec![1]);
        assert_eq!(
            f.send(1, "bob@b.example").await,
            SendOutcome::Accepted { duplicate: true }
        );
        let (txn, sent) = f.txn().await;
        assert_eq!(sent, vec![("bob@b.example".to_owned(), 1)]);
        f.ack(txn, vec![None]);
        actix::clock::sleep(Duration::from_millis(20)).await;
        assert!(f.outbox().is_empty());
    });
}

#[test]
fn a_failing_store_refuses_the_send() {
    System::new().block_on(async {
        let mut f = fixture().await;
        f.memory.faults.io.store(true, Relaxed);
        assert_eq!(
            f.send(1, "bob@b.example").await,
            SendOutcome::Rejected {
                code: ErrorCode::StoreUnavailable,
                current_devices: Vec::new(),
            }
        );
        f.memory.faults.io.store(false, Relaxed);
        f.memory.faults.no_room.store(true, Relaxed);
        assert!(matches!(
            f.send(2, "bob@b.example").await,
            SendOutcome::Rejected {
                code: ErrorCode::StoreUnavailable,
                ..
            }
        ));
        assert!(f.outbox().is_empty());
    });
}

#[test]
fn a_recipient_refused_as_full_is_parked_while_others_flow_and_resent_in_order() {
    System::new().block_on(async {
        let mut f = fixture().await;
        assert_eq!(f.send(1, "bob@b.example").await, ACCEPTED);
        let (txn, _) = f.txn().await;
        assert_eq!(f.send(2, "carol@b.example").await, ACCEPTED);
        let (txn2, sent2) = f.txn().await;
        assert_eq!(sent2, vec![("carol@b.example".to_owned(), 2)]);
        f.ack(txn, vec![Some(ErrorCode::MailboxFull)]);
        f.ack(txn2, vec![None]);
        // Bob's next envelope waits behind the refused one; carol's goes at once.
        assert_eq!(f.send(3, "bob@b.example").await, ACCEPTED);
        assert_eq!(f.send(4, "carol@b.example").await, ACCEPTED);
        let (txn3, sent3) = f.txn().await;
        assert_eq!(sent3, vec![("carol@b.example".to_owned(), 4)]);
        f.ack(txn3, vec![None]);
        actix::clock::sleep(Duration::from_millis(20)).await;
        assert_eq!(f.outbox(), vec![1, 3], "bob's entries are kept");
        // After bob's backoff, his entries go out in order.
        let mut resent = Vec::new();
        while resent.len() < 2 {
            let (txn, sent) = f.txn().await;
            f.ack(txn, vec![None; sent.len()]);
            resent.extend(sent.into_iter().map(|(_, id)| id));
        }
        assert_eq!(resent, vec![1, 3]);
        f.quiet(Duration::from_millis(100)).await;
        assert!(f.outbox().is_empty());
    });
}
