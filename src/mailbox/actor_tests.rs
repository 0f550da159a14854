//! Unit tests of the mailbox actor on the in-memory store: each names one behaviour and fails
//! if it breaks.

use std::{sync::Arc, time::Duration};

use actix::{Arbiter, System};
use sealpost_proto::{
    Class, CloseCode, Copy, DeviceId, EnvelopeId, ErrorCode, Notice, SendOutcome, ServerFrame,
};
use tokio::sync::oneshot;

use super::{
    Conn, MailboxConfig, Registry,
    messages::{Ack, AddDevice, Attach, ClaimKey, Expire, RemoveDevice, Submit, UploadKeys},
    push_queue,
};
use crate::store::{DeviceRecord, Inbox, KeyKind, Stores, live::LiveEvent, memory::MemoryStore};

const USER: &str = "bob@test.example";
const WINDOW: usize = 2;

struct Fixture {
    memory: MemoryStore,
    registry: Arc<Registry>,
}

/// `USER` with devices 1 and 2, and a mailbox allowing `quota` envelopes per device queue.
async fn fixture(quota: u64) -> Fixture {
    let memory = MemoryStore::new();
    let stores = Stores::from_backend(Arc::new(memory.clone()));
    super::model_tests::seed_account(stores.directory.as_ref(), USER).await;
    let registry = Registry::new(
        vec![Arbiter::current()],
        stores,
        MailboxConfig::for_tests(quota, WINDOW, Duration::from_secs(3600)),
    );
    Fixture { memory, registry }
}

fn send(id: u8, devices: &[u32], origin: Option<&str>) -> Submit {
    Submit {
        id: EnvelopeId([id; 16]),
        class: Class::Durable,
        ttl_secs: 60,
        copies: Arc::new(
            devices
                .iter()
                .map(|d| Copy {
                    device: DeviceId(*d),
                    ciphertext: vec![id; 3],
                })
                .collect(),
        ),
        origin: origin.map(Into::into),
    }
}

struct Connection {
    id: u64,
    rx: push_queue::Receiver,
    kick: oneshot::Receiver<CloseCode>,
}

impl Fixture {
    async fn memory_key_count(&self, kind: KeyKind) -> u64 {
        use crate::store::Directory as _;
        let count = self.memory.key_count(USER, 1, kind).await;
        count.expect("count").one_time
    }

    async fn submit(&self, msg: Submit) -> SendOutcome {
        self.registry.call(USER, msg).await.expect("mailbox")
    }

    async fn connect(&self, device: u32, id: u64) -> Connection {
        let (tx, rx) = push_queue::channel(64);
        let (kick, kick_rx) = oneshot::channel();
        let attach = Attach {
            device: DeviceId(device),
            conn: Conn { id, tx, kick },
        };
        self.registry
            .call_once(USER, attach)
            .await
            .expect("mailbox")
            .expect("attach");
        Connection {
            id,
            rx,
            kick: kick_rx,
        }
    }

    async fn ack(&self, device: u32, conn: u64, seqs: Vec<u64>) -> Vec<u64> {
        let ack = Ack {
            device: DeviceId(device),
            conn,
            seqs,
            report: false,
        };
        self.registry.call_once(USER, ack).await.expect("mailbox")
    }
}

/// Frames pushed so far, after letting deferred work run.
async fn frames(conn: &mut Connection) -> Vec<ServerFrame> {
    for _ in 0..5 {
        actix::clock::sleep(Duration::from_millis(2)).await;
    }
    let mut out = Vec::new();
    while let Ok(bytes) = conn.rx.try_recv() {
        out.push(ServerFrame::decode(&bytes).expect("frame"));
    }
    out
}

fn delivered(frames: &[ServerFrame]) -> Vec<(u64, u8)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Deliver { seq, envelope } => Some((*seq, envelope.id.0[0])),
            _ => None,
        })
        .collect()
}

const ACCEPTED: SendOutcome = SendOutcome::Accepted { duplicate: false };

fn refused(code: ErrorCode) -> SendOutcome {
    SendOutcome::Rejected {
        code,
        current_devices: Vec::new(),
    }
}

fn run<F: Future<Output = ()>>(test: impl FnOnce() -> F) {
    System::new().block_on(test());
}

fn set(flag: &std::sync::atomic::AtomicBool, on: bool) {
    flag.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn a_retried_send_is_stored_once_and_answered_duplicate() {
    run(|| async {
        let f = fixture(10).await;
        assert_eq!(f.submit(send(1, &[1, 2], None)).await, ACCEPTED);
        assert_eq!(
            f.submit(send(1, &[1, 2], None)).await,
            SendOutcome::Accepted { duplicate: true }
        );
        // Even if the devices changed since, a retry gets the first answer.
        assert_eq!(
            f.submit(send(1, &[1], None)).await,
            SendOutcome::Accepted { duplicate: true }
        );
        for device in [1, 2] {
            assert_eq!(f.memory.queue(USER, device).len(), 1, "device {device}");
        }
    });
}

#[test]
fn what_becomes_durable_is_notified_on_the_live_delivery_seam() {
    run(|| async {
        let f = fixture(10).await;
        let mut one = f.registry.live_delivery().subscribe(USER, 1);
        let mut two = f.registry.live_delivery().subscribe(USER, 2);
        assert_eq!(f.submit(send(1, &[1, 2], None)).await, ACCEPTED);
        assert_eq!(f.submit(send(2, &[1, 2], None)).await, ACCEPTED);
        for sub in [&mut one, &mut two] {
            assert_eq!(sub.next().await, Some(LiveEvent::Ready));
            assert_eq!(sub.next().await, Some(LiveEvent::Durable(2)));
            assert_eq!(
                sub.next().await,
                Some(LiveEvent::Durable(3)),
                "durable below seq 3"
            );
        }
    });
}

#[test]
fn a_full_queue_refuses_the_send_and_tells_the_device() {
    run(|| async {
        let f = fixture(2).await;
        let mut conn = f.connect(1, 1).await;
        assert_eq!(f.submit(send(1, &[1, 2], None)).await, ACCEPTED);
        assert_eq!(f.submit(send(2, &[1, 2], None)).await, ACCEPTED);
        assert_eq!(
            f.submit(send(3, &[1, 2], None)).await,
            refused(ErrorCode::MailboxFull)
        );
        assert_eq!(f.memory.queue(USER, 2).len(), 2, "nothing half-written");
        let pushed = frames(&mut conn).await;
        assert!(pushed.contains(&ServerFrame::Notice {
            notice: Notice::MailboxFull,
            device: DeviceId(1),
        }));
    });
}

#[test]
fn a_send_naming_a_stale_device_set_is_refused_with_the_current_one() {
    run(|| async {
        let f = fixture(10).await;
        assert_eq!(
            f.submit(send(1, &[1], None)).await,
            SendOutcome::Rejected {
                code: ErrorCode::StaleDevices,
                current_devices: vec![DeviceId(1), DeviceId(2)],
            }
        );
        assert!(f.memory.queue(USER, 1).is_empty());
    });
}

#[test]
fn deliveries_are_pushed_in_order_within_the_window_and_trimmed_on_ack() {
    run(|| async {
        let f = fixture(10).await;
        for id in 1..=3 {
            assert_eq!(f.submit(send(id, &[1, 2], None)).await, ACCEPTED);
        }
        let mut conn = f.connect(1, 1).await;
        assert_eq!(delivered(&frames(&mut conn).await), vec![(1, 1), (2, 2)]);
        assert!(f.ack(1, conn.id, vec![1, 2]).await.is_empty());
        let pushed = frames(&mut conn).await;
        assert_eq!(delivered(&pushed), vec![(3, 3)]);
        assert!(pushed.contains(&ServerFrame::QueueEmpty));
        let left: Vec<u64> = f.memory.queue(USER, 1).iter().map(|(s, _)| *s).collect();
        assert_eq!(left, vec![3], "acknowledged envelopes are deleted");
    });
}

#[test]
fn reads_answered_later_keep_the_order() {
    run(|| async {
        let f = fixture(10).await;
        for id in 1..=3 {
            assert_eq!(f.submit(send(id, &[1, 2], None)).await, ACCEPTED);
        }
        set(&f.memory.faults.deferred, true);
        let mut conn = f.connect(1, 1).await;
        assert_eq!(delivered(&frames(&mut conn).await), vec![(1, 1), (2, 2)]);
        assert!(f.ack(1, conn.id, vec![1, 2]).await.is_empty());
        assert_eq!(f.submit(send(4, &[1, 2], None)).await, ACCEPTED);
        let pushed = frames(&mut conn).await;
        assert_eq!(delivered(&pushed), vec![(3, 3), (4, 4)]);
        assert!(pushed.contains(&ServerFrame::QueueEmpty));
    });
}

#[test]
fn unknown_acks_are_answered_and_change_nothing() {
    run(|| async {
        let f = fixture(10).await;
        assert_eq!(f.submit(send(1, &[1, 2], None)).await, ACCEPTED);
        let mut conn = f.connect(1, 7).await;
        assert_eq!(delivered(&frames(&mut conn).await), vec![(1, 1)]);
        // Never delivered, and from another connection of the device.
        assert_eq!(f.ack(1, conn.id, vec![1, 9]).await, vec![9]);
        assert_eq!(f.ack(1, 8, vec![1]).await, vec![1]);
        assert!(f.memory.queue(USER, 1).is_empty());
        assert_eq!(f.memory.queue(USER, 2).len(), 1);
    });
}

#[test]
fn a_second_connection_displaces_the_first() {
    run(|| async {
        let f = fixture(10).await;
        let first = f.connect(1, 1).await;
        let _second = f.connect(1, 2).await;
        assert_eq!(first.kick.await, Ok(CloseCode::Displaced));
    });
}

#[test]
fn expired_envelopes_are_deleted_and_their_late_acks_are_not_unknown() {
    run(|| async {
        let f = fixture(10).await;
        assert_eq!(f.submit(send(1, &[1, 2], None)).await, ACCEPTED);
        let mut conn = f.connect(1, 1).await;
        assert_eq!(delivered(&frames(&mut conn).await), vec![(1, 1)]);
        let later = crate::clock::now_ms() + 120_000;
        let due = f.memory.due(later, 100).await.expect("due");
        assert!(!due.is_empty());
        f.registry
            .call_once(USER, Expire { due })
            .await
            .expect("mailbox");
        assert!(f.memory.queue(USER, 1).is_empty());
        assert!(f.memory.queue(USER, 2).is_empty());
        assert!(f.ack(1, conn.id, vec![1]).await.is_empty());
    });
}

/// An envelope that expires while it waits behind the window (in the pushed-next tail kept in
/// memory) is never pushed: an expired call ring does not ring.
#[test]
fn envelopes_expired_while_waiting_behind_the_window_are_not_pushed() {
    run(|| async {
        let f = fixture(10).await;
        let mut conn = f.connect(1, 1).await;
        for id in 1..=4 {
            assert_eq!(f.submit(send(id, &[1, 2], None)).await, ACCEPTED);
        }
        assert_eq!(delivered(&frames(&mut conn).await), vec![(1, 1), (2, 2)]);
        let later = crate::clock::now_ms() + 120_000;
        let due = f.memory.due(later, 100).await.expect("due");
        f.registry
            .call_once(USER, Expire { due })
            .await
            .expect("mailbox");
        assert!(f.ack(1, conn.id, vec![1, 2]).await.is_empty());
        let pushed = frames(&mut conn).await;
        assert_eq!(delivered(&pushed), vec![], "expired envelopes were pushed");
        assert!(f.memory.queue(USER, 1).is_empty());
    });
}

#[test]
fn nothing_is_acknowledged_or_pushed_that_is_not_durable() {
    run(|| async {
        let f = fixture(10).await;
        let mut conn = f.connect(1, 1).await;
        set(&f.memory.faults.flush, true);
        assert_eq!(
            f.submit(send(1, &[1, 2], None)).await,
            refused(ErrorCode::StoreUnavailable)
        );
        assert!(delivered(&frames(&mut conn).await).is_empty());
    });
}

/// A device whose backlog cannot be read for now stays connected and gets it once the store
/// answers again (a NATS stream between leaders), rather than being sent away: a failover
/// must not make every client reconnect at once.
#[test]
fn a_device_whose_backlog_cannot_be_read_gets_it_once_the_store_answers() {
    run(|| async {
        let f = fixture(10).await;
        assert_eq!(f.submit(send(1, &[1, 2], None)).await, ACCEPTED);
        set(&f.memory.faults.io, true);
        let mut conn = f.connect(1, 1).await;
        assert!(delivered(&frames(&mut conn).await).is_empty());
        assert!(conn.kick.try_recv().is_err(), "still connected");
        set(&f.memory.faults.io, false);
        let mut got = Vec::new();
        for _ in 0..200 {
            got.extend(delivered(&frames(&mut conn).await));
            if !got.is_empty() {
                break;
            }
        }
        assert_eq!(got, vec![(1, 1)]);
    });
}

#[test]
fn a_store_short_of_room_or_failing_refuses_sends() {
    run(|| async {
        let f = fixture(10).await;
        let faults = f.memory.faults.clone();
        set(&faults.no_room, true);
        assert_eq!(
            f.submit(send(1, &[1, 2], None)).await,
            refused(ErrorCode::StoreUnavailable)
        );
        set(&faults.no_room, false);
        set(&faults.io, true);
        assert_eq!(
            f.submit(send(2, &[1, 2], None)).await,
            refused(ErrorCode::StoreUnavailable)
        );
        set(&faults.io, false);
        assert!(f.memory.queue(USER, 1).is_empty());
        assert_eq!(f.submit(send(2, &[1, 2], None)).await, ACCEPTED);
    });
}

#[test]
fn an_origin_refused_as_full_keeps_its_order() {
    run(|| async {
        let f = fixture(1).await;
        assert_eq!(
            f.submit(send(1, &[1, 2], Some("b.example"))).await,
            ACCEPTED
        );
        let full = refused(ErrorCode::MailboxFull);
        assert_eq!(f.submit(send(2, &[1, 2], Some("b.example"))).await, full);
        // Room appears; what the origin sent after the refused one waits for it.
        let mut conn1 = f.connect(1, 1).await;
        let mut conn2 = f.connect(2, 2).await;
        frames(&mut conn1).await;
        frames(&mut conn2).await;
        assert!(f.ack(1, 1, vec![1]).await.is_empty());
        assert!(f.ack(2, 2, vec![1]).await.is_empty());
        assert_eq!(f.submit(send(3, &[1, 2], Some("b.example"))).await, full);
        assert_eq!(
            f.submit(send(2, &[1, 2], Some("b.example"))).await,
            ACCEPTED
        );
    });
}

#[test]
fn added_and_removed_devices_change_the_device_set() {
    run(|| async {
        let f = fixture(10).await;
        let added = AddDevice {
            record: DeviceRecord::for_tests(),
            max_devices: 16,
        };
        let id = f
            .registry
            .call_once(USER, added)
            .await
            .expect("mailbox")
            .expect("added");
        assert_eq!(id, DeviceId(3));
        assert_eq!(f.submit(send(1, &[1, 2, 3], None)).await, ACCEPTED);
        let conn = f.connect(2, 1).await;
        let removed = RemoveDevice {
            device: DeviceId(2),
        };
        f.registry
            .call_once(USER, removed)
            .await
            .expect("mailbox")
            .expect("removed");
        assert_eq!(conn.kick.await, Ok(CloseCode::DeviceRevoked));
        assert!(f.memory.queue(USER, 2).is_empty(), "its queue is dropped");
        assert_eq!(f.submit(send(2, &[1, 3], None)).await, ACCEPTED);
    });
}

#[test]
fn a_claimed_one_time_key_is_handed_out_once_then_the_fallback() {
    run(|| async {
        let f = fixture(10).await;
        let upload = |one_time: &[u64], fallback| UploadKeys {
            device: DeviceId(1),
            kind: KeyKind::Olm,
            max_held: 2,
            one_time: one_time.iter().map(|id| (*id, vec![1])).collect(),
            fallback,
        };
        let held = f
            .registry
            .call_once(USER, upload(&[1, 2], Some((9, vec![9]))));
        assert_eq!(held.await.expect("mailbox").expect("stored"), 2);
        let refused = f.registry.call_once(USER, upload(&[3], None));
        assert!(refused.await.expect("mailbox").is_err(), "the limit holds");
        let mut ids = Vec::new();
        for _ in 0..3 {
            let claim = ClaimKey {
                device: DeviceId(1),
                kind: KeyKind::Olm,
            };
            let claimed = f.registry.call(USER, claim).await.expect("mailbox");
            let claimed = claimed.expect("claim").expect("a key");
            ids.push((claimed.key_id, claimed.fallback));
        }
        assert_eq!(ids, vec![(1, false), (2, false), (9, true)]);
    });
}

#[test]
fn a_device_running_low_on_key_packages_is_told_so_and_not_about_olm_keys() {
    run(|| async {
        let f = fixture(10).await;
        let mut conn = f.connect(1, 1).await;
        for kind in [KeyKind::Olm, KeyKind::Mls] {
            let upload = UploadKeys {
                device: DeviceId(1),
                kind,
                max_held: 100,
                one_time: (1..=10).map(|id| (id, vec![1])).collect(),
                fallback: None,
            };
            let held = f.registry.call_once(USER, upload).await.expect("mailbox");
            assert_eq!(held.expect("stored"), 10);
        }
        let claim = |kind| ClaimKey {
            device: DeviceId(1),
            kind,
        };
        let claimed = f.registry.call(USER, claim(KeyKind::Mls)).await;
        assert!(claimed.expect("mailbox").expect("claim").is_some());
        let notices: Vec<ServerFrame> = frames(&mut conn)
            .await
            .into_iter()
            .filter(|f| matches!(f, ServerFrame::Notice { .. }))
            .collect();
        assert_eq!(
            notices,
            vec![ServerFrame::Notice {
                notice: Notice::KeyPackagesLow,
                device: DeviceId(1),
            }],
            "9 KeyPackages left"
        );
        assert_eq!(
            f.memory_key_count(KeyKind::Olm).await,
            10,
            "Olm keys untouched"
        );
    });
}
