//! Property test: a mailbox (real actor; a real sled store, and the in-memory store) against
//! an in-memory model of per-device queues, across restarts.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use actix::{Arbiter, System};
use proptest::prelude::*;
use sealpost_proto::{Class, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome, ServerFrame};
use tokio::sync::oneshot;

use super::{
    MailboxConfig, Registry,
    messages::{Ack, Attach, Detach, Submit},
};
use crate::store::{DeviceRecord, Directory, SledStore, StoreOptions, Stores, memory::MemoryStore};

const USER: &str = "bob@test.example";
const DEVICES: [DeviceId; 2] = [DeviceId(1), DeviceId(2)];
const WINDOW: usize = 3;
const QUOTA: u64 = 6;

#[derive(Debug, Clone)]
enum Op {
    /// A new send (fresh id).
    Send,
    /// A retry of the n-th earlier send id.
    Retry(usize),
    /// A send naming only the first device (stale set).
    Stale,
    Connect(usize),
    Disconnect(usize),
    /// Ack the first n in-flight deliveries of a device.
    Ack(usize, usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Send),
        1 => (0usize..8).prop_map(Op::Retry),
        1 => Just(Op::Stale),
        2 => (0usize..2).prop_map(Op::Connect),
        1 => (0usize..2).prop_map(Op::Disconnect),
        3 => (0usize..2, 1usize..4).prop_map(|(d, n)| Op::Ack(d, n)),
        1 => Just(Op::Restart),
    ]
}

/// The model of one device queue and its connection.
#[derive(Default)]
struct ModelDevice {
    /// Stored, unacknowledged: (seq, id).
    queue: VecDeque<(u64, EnvelopeId)>,
    next_seq: u64,
    conn: Option<ModelConn>,
}

struct ModelConn {
    id: u64,
    rx: super::push_queue::Receiver,
    _kick: oneshot::Receiver<sealpost_proto::CloseCode>,
    /// Delivered on this connection, not yet acked, in order.
    in_flight: VecDeque<(u64, EnvelopeId)>,
    /// Index into the queue of the next expected delivery.
    expect: usize,
    queue_empty_due: bool,
}

struct Broker {
    registry: Arc<Registry>,
    arbiter: Arbiter,
}

fn open(dir: &std::path::Path) -> Broker {
    open_with(dir, None, Duration::from_secs(3600))
}

/// A broker whose flushes fail while `failpoint` exists, and whose mailboxes stop after
/// `idle`.
fn open_with(
    dir: &std::path::Path,
    failpoint: Option<std::path::PathBuf>,
    idle: Duration,
) -> Broker {
    let options = StoreOptions {
        failpoint_sync: failpoint,
        ..StoreOptions::for_tests(dir)
    };
    let store = SledStore::open_waiting(&options).expect("open store");
    open_stores(Stores::from_backend(Arc::new(store)), idle)
}

/// A broker on `stores`, whose mailboxes stop after `idle`.
fn open_stores(stores: Stores, idle: Duration) -> Broker {
    let arbiter = Arbiter::new();
    let registry = Registry::new(
        vec![arbiter.handle()],
        stores,
        MailboxConfig::for_tests(QUOTA, WINDOW, idle),
    );
    Broker { registry, arbiter }
}

fn close(b: Broker) {
    b.arbiter.stop();
    b.arbiter.join().expect("arbiter joins");
    drop(b.registry);
}

/// Reads every frame already pushed to a connection and checks it against the model.
fn check_pushes(m: &mut ModelDevice) {
    let Some(conn) = m.conn.as_mut() else { return };
    while let Ok(bytes) = conn.rx.try_recv() {
        match ServerFrame::decode(&bytes).expect("frame") {
            ServerFrame::Deliver { seq, envelope } => {
                let expected = m.queue.get(conn.expect).copied();
                assert_eq!(
                    Some((seq, envelope.id)),
                    expected,
                    "delivery out of model order"
                );
                conn.expect += 1;
                conn.in_flight.push_back((seq, envelope.id));
                assert!(conn.in_flight.len() <= WINDOW, "window exceeded");
            }
            ServerFrame::QueueEmpty => {
                assert!(conn.queue_empty_due, "queue_empty twice");
                conn.queue_empty_due = false;
            }
            ServerFrame::Notice { .. } => {}
            other => panic!("unexpected push {other:?}"),
        }
    }
    // The window is full, or everything stored has been pushed.
    assert!(conn.in_flight.len() == WINDOW || conn.expect == m.queue.len());
    assert!(!conn.queue_empty_due || conn.expect < m.queue.len());
}

/// Runs `ops` against brokers made by `open` (again at each restart).
async fn run(ops: Vec<Op>, open: impl Fn() -> Broker) {
    let mut broker = open();
    // Seed the account through the registry's store.
    seed(&broker).await;
    let mut model: Vec<ModelDevice> = (0..2)
        .map(|_| ModelDevice {
            next_seq: 1,
            ..Default::default()
        })
        .collect();
    let mut ids: Vec<EnvelopeId> = Vec::new();
    let mut conn_ids = 1u64;
    for op in ops {
        match op {
            Op::Send | Op::Retry(_) | Op::Stale => {
                let (id, fresh) = match op {
                    Op::Retry(n) if !ids.is_empty() => (ids[n % ids.len()], false),
                    _ => (EnvelopeId(rand::random()), true),
                };
                let devices: &[DeviceId] = if matches!(op, Op::Stale) {
                    &DEVICES[..1]
                } else {
                    &DEVICES
                };
                let copies = devices
                    .iter()
                    .map(|d| Copy {
                        device: *d,
                        ciphertext: id.0.to_vec(),
                    })
                    .collect();
                let msg = Submit {
                    id,
                    class: Class::Durable,
                    ttl_secs: 3600,
                    copies: Arc::new(copies),
                    origin: None,
                };
                let outcome = broker.registry.call(USER, msg).await.expect("mailbox");
                let full = model.iter().any(|m| m.queue.len() as u64 >= QUOTA);
                let expected = if matches!(op, Op::Stale) {
                    SendOutcome::Rejected {
                        code: ErrorCode::StaleDevices,
                        current_devices: DEVICES.to_vec(),
                    }
                } else if !fresh {
                    SendOutcome::Accepted { duplicate: true }
                } else if full {
                    SendOutcome::Rejected {
                        code: ErrorCode::MailboxFull,
                        current_devices: vec![],
                    }
                } else {
                    SendOutcome::Accepted { duplicate: false }
                };
                assert_eq!(outcome, expected);
                if expected == (SendOutcome::Accepted { duplicate: false }) {
                    ids.push(id);
                    for m in &mut model {
                        m.queue.push_back((m.next_seq, id));
                        m.next_seq += 1;
                    }
                }
            }
            Op::Connect(d) => {
                let (tx, rx) = super::push_queue::channel(64);
                let (kick, kick_rx) = oneshot::channel();
                conn_ids += 1;
                let conn = super::Conn {
                    id: conn_ids,
                    tx,
                    kick,
                };
                broker
                    .registry
                    .call_once(
                        USER,
                        Attach {
                            device: DEVICES[d],
                            conn,
                        },
                    )
                    .await
                    .expect("mailbox")
                    .expect("attach");
                let m = &mut model[d];
                m.conn = Some(ModelConn {
                    id: conn_ids,
                    rx,
                    _kick: kick_rx,
                    in_flight: VecDeque::new(),
                    expect: 0,
                    queue_empty_due: true,
                });
            }
            Op::Disconnect(d) => {
                if let Some(conn) = model[d].conn.take() {
                    broker
                        .registry
                        .call_once(
                            USER,
                            Detach {
                                device: DEVICES[d],
                                conn: conn.id,
                            },
                        )
                        .await
                        .expect("mailbox");
                }
            }
            Op::Ack(d, n) => {
                let m = &mut model[d];
                let Some(conn) = m.conn.as_mut() else {
                    continue;
                };
                let acked: Vec<(u64, EnvelopeId)> = (0..n.min(conn.in_flight.len()))
                    .filter_map(|_| conn.in_flight.pop_front())
                    .collect();
                let seqs = acked.iter().map(|(s, _)| *s).collect();
                let unknown = broker
                    .registry
                    .call_once(
                        USER,
                        Ack {
                            device: DEVICES[d],
                            conn: conn.id,
                            seqs,
                            report: false,
                        },
                    )
                    .await
                    .expect("mailbox");
                assert!(unknown.is_empty());
                for a in acked {
                    assert_eq!(
                        m.queue.pop_front(),
                        Some(a),
                        "acked out of order in the model"
                    );
                    conn.expect -= 1;
                }
            }
            Op::Restart => {
                for m in &mut model {
                    m.conn = None;
                }
                close(broker);
                broker = open();
            }
        }
        for m in &mut model {
            check_pushes(m);
        }
    }
    close(broker);
}

/// A durable send of one byte to both `DEVICES`, from `origin` if federated.
fn durable_to_both(id: EnvelopeId, origin: Option<&str>) -> Submit {
    Submit {
        id,
        class: Class::Durable,
        ttl_secs: 3600,
        copies: Arc::new(
            DEVICES
                .iter()
                .map(|d| Copy {
                    device: *d,
                    ciphertext: vec![1],
                })
                .collect(),
        ),
        origin: origin.map(Into::into),
    }
}

/// Creates `USER` with the two `DEVICES`.
async fn seed(broker: &Broker) {
    seed_account(broker.registry.stores().directory.as_ref(), USER).await;
}

/// Creates `user` with devices 1 and 2.
pub(super) async fn seed_account(directory: &dyn Directory, user: &str) {
    directory
        .create_account(user, 0, DeviceRecord::for_tests())
        .await
        .expect("create");
    directory
        .add_device(user, DeviceRecord::for_tests(), 16)
        .await
        .expect("add");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn mailbox_matches_model_across_restarts(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        System::new().block_on(run(ops, || open(dir.path())));
    }

    #[test]
    fn mailbox_on_the_memory_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let memory = MemoryStore::new();
        let open = || open_stores(
            Stores::from_backend(Arc::new(memory.clone())),
            Duration::from_secs(3600),
        );
        System::new().block_on(run(ops, open));
    }
}

/// A send whose flush failed was refused, but its writes may still sit in the store's memory.
/// A mailbox that starts later must not push them before they are durable.
#[test]
fn a_restarted_mailbox_pushes_nothing_that_is_not_durable() {
    System::new().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let failpoint = dir.path().join("fail-sync");
        let broker = open_with(
            dir.path(),
            Some(failpoint.clone()),
            Duration::from_millis(50),
        );
        seed(&broker).await;
        let send = || durable_to_both(EnvelopeId(rand::random()), None);
        let accepted = broker.registry.call(USER, send()).await.expect("mailbox");
        assert_eq!(accepted, SendOutcome::Accepted { duplicate: false });
        std::fs::write(&failpoint, b"").expect("failpoint");
        let refused = broker.registry.call(USER, send()).await.expect("mailbox");
        assert!(
            matches!(
                refused,
                SendOutcome::Rejected {
                    code: ErrorCode::StoreUnavailable,
                    ..
                }
            ),
            "{refused:?}"
        );
        // The mailbox stops idle; a device connects while flushes still fail.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !broker.registry.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the mailbox never stopped"
            );
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        let attach = |id: u64| {
            let (tx, rx) = super::push_queue::channel(64);
            let (kick, kick_rx) = oneshot::channel();
            let conn = super::Conn { id, tx, kick };
            (
                Attach {
                    device: DEVICES[0],
                    conn,
                },
                rx,
                kick_rx,
            )
        };
        let (msg, mut rx, _kick) = attach(1);
        let attached = broker.registry.call_once(USER, msg).await;
        assert!(attached.is_err(), "a mailbox started on a failing store");
        assert!(rx.try_recv().is_err(), "something was pushed");
        // Once flushes work again, both envelopes are durable and delivered.
        std::fs::remove_file(&failpoint).expect("failpoint");
        let (msg, mut rx, _kick) = attach(2);
        broker
            .registry
            .call_once(USER, msg)
            .await
            .expect("mailbox")
            .expect("attach");
        let mut seqs = Vec::new();
        while seqs.len() < 2 {
            match rx.try_recv() {
                Ok(bytes) => {
                    if let ServerFrame::Deliver { seq, .. } =
                        ServerFrame::decode(&bytes).expect("frame")
                    {
                        seqs.push(seq);
                    }
                }
                Err(_) => {
                    assert!(std::time::Instant::now() < deadline, "not delivered");
                    actix::clock::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        assert_eq!(seqs, vec![1, 2]);
        close(broker);
    });
}

#[test]
fn a_federation_origin_keeps_its_order_across_a_refusal_as_full() {
    System::new().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = open(dir.path());
        seed(&broker).await;
        let send = |id: EnvelopeId, origin: &str| durable_to_both(id, Some(origin));
        let submit = |msg: Submit| broker.registry.call(USER, msg);
        let accepted = SendOutcome::Accepted { duplicate: false };
        let full = SendOutcome::Rejected {
            code: ErrorCode::MailboxFull,
            current_devices: Vec::new(),
        };
        for _ in 0..QUOTA {
            let id = EnvelopeId(rand::random());
            assert_eq!(
                submit(send(id, "b.example")).await.expect("mailbox"),
                accepted
            );
        }
        let (k, after_k) = (EnvelopeId(rand::random()), EnvelopeId(rand::random()));
        assert_eq!(submit(send(k, "b.example")).await.expect("mailbox"), full);
        // Both devices connect, read and acknowledge three envelopes (the window): room for
        // three.
        let mut conns = Vec::new();
        for (n, device) in DEVICES.iter().enumerate() {
            let (tx, rx) = super::push_queue::channel(64);
            let (kick, kick_rx) = oneshot::channel();
            let conn_id = n as u64 + 1;
            let conn = super::Conn {
                id: conn_id,
                tx,
                kick,
            };
            let attach = Attach {
                device: *device,
                conn,
            };
            broker
                .registry
                .call_once(USER, attach)
                .await
                .expect("mailbox")
                .expect("attach");
            conns.push((*device, conn_id, rx, kick_rx));
        }
        let make_room = async |conns: &mut Vec<(DeviceId, u64, super::push_queue::Receiver, _)>| {
            for (device, conn_id, rx, _) in conns.iter_mut() {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                let mut seqs = Vec::new();
                while seqs.len() < WINDOW {
                    match rx.try_recv() {
                        Ok(bytes) => {
                            if let ServerFrame::Deliver { seq, .. } =
                                ServerFrame::decode(&bytes).expect("frame")
                            {
                                seqs.push(seq);
                            }
                        }
                        Err(_) => {
                            assert!(std::time::Instant::now() < deadline, "not delivered");
                            actix::clock::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                let ack = Ack {
                    device: *device,
                    conn: *conn_id,
                    seqs,
                    report: false,
                };
                let unknown = broker.registry.call_once(USER, ack).await;
                assert!(unknown.expect("mailbox").is_empty());
            }
        };
        make_room(&mut conns).await;
        // What the origin sent after k must not overtake it, though it would fit now; other
        // origins are not held back.
        assert_eq!(
            submit(send(after_k, "b.example")).await.expect("mailbox"),
            full
        );
        let other = EnvelopeId(rand::random());
        assert_eq!(
            submit(send(other, "c.example")).await.expect("mailbox"),
            accepted
        );
        // k comes back first, then the rest, in order.
        assert_eq!(
            submit(send(k, "b.example")).await.expect("mailbox"),
            accepted
        );
        assert_eq!(
            submit(send(after_k, "b.example")).await.expect("mailbox"),
            accepted
        );
        // Full again. A refused envelope that comes back and is refused for another reason
        // (here: none of its devices exists any more) releases the hold as well.
        let (k2, after_k2) = (EnvelopeId(rand::random()), EnvelopeId(rand::random()));
        assert_eq!(submit(send(k2, "b.example")).await.expect("mailbox"), full);
        make_room(&mut conns).await;
        let stale = Submit {
            copies: Arc::new(vec![Copy {
                device: DeviceId(99),
                ciphertext: vec![1],
            }]),
            ..send(k2, "b.example")
        };
        assert!(matches!(
            submit(stale).await.expect("mailbox"),
            SendOutcome::Rejected {
                code: ErrorCode::StaleDevices,
                ..
            }
        ));
        assert_eq!(
            submit(send(after_k2, "b.example")).await.expect("mailbox"),
            accepted
        );
        drop(conns);
        close(broker);
    });
}
