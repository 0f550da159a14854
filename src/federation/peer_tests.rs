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
use tokio::sync::{mpsc, oneshot};

use super::{
    PeerConfig, PeerSettings, PeerSource, Resolver,
    identity::ServerKey,
    messages::{Enqueue, GroupEnqueue, GroupTo, LinkUp, Outgoing, Request, TxnAcked},
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

fn group(id: u8, to: &[&str]) -> GroupEnqueue {
    GroupEnqueue {
        id: EnvelopeId([id; 16]),
        class: Class::Durable,
        ttl_secs: 600,
        ciphertext: Arc::new(vec![id; 4]),
        recipients: to
            .iter()
            .map(|to| GroupTo {
                to: (*to).to_owned(),
                devices: vec![DeviceId(if to.starts_with("dave") { 2 } else { 1 })],
                admission: Admission::Origin,
            })
            .collect(),
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
        self.answering_lookups(answer).await.expect("peer")
    }

    /// Awaits `answer` while answering the device lookups it may make (every user has
    /// device 1) and keeping the frames sent meanwhile.
    async fn answering_lookups<T>(&mut self, answer: impl Future<Output = T>) -> T {
        tokio::pin!(answer);
        loop {
            tokio::select! {
                biased;
                out = &mut answer => return out,
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
            // One answer per recipient of each group message.
            LinkFrame::GroupTxn { txn_id, entries } => (
                txn_id,
                entries
                    .into_iter()
                    .flat_map(|e| {
                        assert_eq!(e.ciphertext, vec![e.id.0[0]; 4], "the ciphertext, once");
                        let id = e.id.0[0];
                        e.recipients.into_iter().map(move |r| (r.to, id))
                    })
                    .collect(),
            ),
            other => panic!("unexpected frame {other:?}"),
        }
    }

    /// Enqueues a group message to `to` (device 1 each) while answering the device lookups
    /// it may make (every user has device 1); the outcomes, by recipient.
    async fn send_group(&mut self, id: u8, to: &[&str]) -> Vec<(String, SendOutcome)> {
        let answer = self.peer.send(group(id, to));
        let mut outcomes = self.answering_lookups(answer).await.expect("peer");
        outcomes.sort_by(|a, b| a.0.cmp(&b.0));
        outcomes
    }

    /// The next device lookup, with the way to answer it.
    async fn lookup(&mut self) -> (String, oneshot::Sender<LinkFrame>) {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.link.recv())
                .await
                .expect("a lookup in time")
                .expect("link open")
            {
                Outgoing::Request(Request::GetDevices { user }, reply) => return (user, reply),
                Outgoing::Request(other, _) => panic!("unexpected request {other:?}"),
                Outgoing::Frame(frame) => self.frames.push_back(frame),
            }
        }
    }

    /// Acknowledges every transaction sent until `n` answers came: (recipient, id) each.
    async fn ack_all(&mut self, n: usize) -> Vec<(String, u8)> {
        let mut sent = Vec::new();
        while sent.len() < n {
            let (txn, more) = self.txn().await;
            self.ack(txn, vec![None; more.len()]);
            sent.extend(more);
        }
        sent
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
        let resent: Vec<u8> = f.ack_all(2).await.into_iter().map(|(_, id)| id).collect();
        assert_eq!(resent, vec![1, 3]);
        f.quiet(Duration::from_millis(100)).await;
        assert!(f.outbox().is_empty());
    });
}

#[test]
fn a_group_message_is_one_entry_for_its_recipients_on_the_domain_each_answered() {
    System::new().block_on(async {
        let mut f = fixture().await;
        let outcomes = f
            .send_group(5, &["bob@b.example", "carol@b.example", "dave@b.example"])
            .await;
        assert_eq!(outcomes[0], ("bob@b.example".to_owned(), ACCEPTED));
        assert_eq!(outcomes[1], ("carol@b.example".to_owned(), ACCEPTED));
        // Dave has device 1, not the 2 the sender named: refused with the current set.
        assert_eq!(
            outcomes[2],
            (
                "dave@b.example".to_owned(),
                SendOutcome::Rejected {
                    code: ErrorCode::StaleDevices,
                    current_devices: vec![DeviceId(1)],
                }
            )
        );
        assert_eq!(f.outbox(), vec![5], "one entry for both recipients");
        let retry = f.send_group(5, &["bob@b.example", "carol@b.example"]).await;
        assert!(
            retry
                .iter()
                .all(|(_, o)| *o == SendOutcome::Accepted { duplicate: true })
        );
        let (txn, sent) = f.txn().await;
        assert_eq!(
            sent,
            vec![
                ("bob@b.example".to_owned(), 5),
                ("carol@b.example".to_owned(), 5)
            ]
        );
        f.ack(txn, vec![None, None]);
        f.quiet(Duration::from_millis(50)).await;
        assert!(f.outbox().is_empty());
    });
}

#[test]
fn a_group_message_refused_as_full_for_one_recipient_is_resent_to_it_alone() {
    System::new().block_on(async {
        let mut f = fixture().await;
        f.send_group(6, &["bob@b.example", "carol@b.example"]).await;
        let (txn, _) = f.txn().await;
        f.ack(txn, vec![Some(ErrorCode::MailboxFull), None]);
        // Carol's next envelope goes at once; bob's waits behind the group message.
        assert_eq!(f.send(7, "carol@b.example").await, ACCEPTED);
        assert_eq!(f.send(8, "bob@b.example").await, ACCEPTED);
        let (txn, sent) = f.txn().await;
        assert_eq!(sent, vec![("carol@b.example".to_owned(), 7)]);
        f.ack(txn, vec![None]);
        actix::clock::sleep(Duration::from_millis(20)).await;
        assert_eq!(f.outbox(), vec![6, 8], "kept until bob has it");
        let resent = f.ack_all(2).await;
        assert_eq!(
            resent,
            vec![
                ("bob@b.example".to_owned(), 6),
                ("bob@b.example".to_owned(), 8)
            ],
            "to bob alone, in order"
        );
        f.quiet(Duration::from_millis(100)).await;
        assert!(f.outbox().is_empty());
    });
}

#[test]
fn a_group_message_waits_for_its_recipients_lookups_and_keeps_each_recipients_order() {
    System::new().block_on(async {
        let mut f = fixture().await;
        // Bob's envelope waits for his lookup; the group message then waits for bob's and
        // carol's; carol's envelope after it waits behind it, though her lookup ends first.
        let one = f.peer.send(enqueue(1, "bob@b.example"));
        let (user, bob) = f.lookup().await;
        assert_eq!(user, "bob@b.example");
        let many = f.peer.send(group(2, &["bob@b.example", "carol@b.example"]));
        let (user, carol) = f.lookup().await;
        assert_eq!(user, "carol@b.example");
        let devices = || LinkFrame::Devices {
            req_id: 0,
            devices: vec![RemoteDevice {
                device: 1,
                identity_keys: vec![1],
            }],
        };
        carol.send(devices()).expect("peer waits");
        let after = f.peer.send(enqueue(3, "carol@b.example"));
        actix::clock::sleep(Duration::from_millis(50)).await;
        assert!(f.outbox().is_empty(), "all wait for bob's lookup");
        bob.send(devices()).expect("peer waits");
        assert_eq!(one.await.expect("peer"), ACCEPTED);
        assert!(
            many.await
                .expect("peer")
                .iter()
                .all(|(_, outcome)| *outcome == ACCEPTED)
        );
        assert_eq!(after.await.expect("peer"), ACCEPTED);
        assert_eq!(f.outbox(), vec![1, 2, 3], "in the order they came");
    });
}

#[test]
fn a_group_message_waiting_for_one_recipient_holds_back_later_sends_to_the_others() {
    System::new().block_on(async {
        let mut f = fixture().await;
        // Carol's devices are known (fresh); bob's are not.
        assert_eq!(f.send(1, "carol@b.example").await, ACCEPTED);
        let many = f.peer.send(group(2, &["bob@b.example", "carol@b.example"]));
        let (user, bob) = f.lookup().await;
        assert_eq!(user, "bob@b.example");
        // Carol's next envelope must not overtake the group message (a Commit, say).
        let after = f.peer.send(enqueue(3, "carol@b.example"));
        actix::clock::sleep(Duration::from_millis(50)).await;
        assert_eq!(f.outbox(), vec![1], "both wait for bob's lookup");
        let devices = vec![RemoteDevice {
            device: 1,
            identity_keys: vec![1],
        }];
        bob.send(LinkFrame::Devices { req_id: 0, devices })
            .expect("peer waits");
        assert!(
            many.await
                .expect("peer")
                .iter()
                .all(|(_, outcome)| *outcome == ACCEPTED)
        );
        assert_eq!(after.await.expect("peer"), ACCEPTED);
        assert_eq!(f.outbox(), vec![1, 2, 3]);
    });
}
