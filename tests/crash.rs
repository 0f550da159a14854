//! Crash safety: the real binary is killed with SIGKILL under load and restarted. Every
//! envelope whose `send_result` arrived must be delivered, in order, and nothing acknowledged
//! may come back.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use futures_util::{SinkExt, StreamExt};
use sealpost_proto::{Class, ClientFrame, Copy, EnvelopeId, SendOutcome, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

/// What one sender did before the broker died, in the order it sent.
struct Sent {
    /// Every id sent.
    all: Vec<EnvelopeId>,
    /// The ids whose `send_result` said accepted.
    accepted: Vec<EnvelopeId>,
}

impl Sent {
    fn new(all: Vec<EnvelopeId>, accepted: &HashSet<EnvelopeId>) -> Self {
        let accepted = all
            .iter()
            .filter(|id| accepted.contains(id))
            .copied()
            .collect();
        Sent { all, accepted }
    }
}

/// The copies of a test envelope: each carries the envelope id as its ciphertext, so a retry
/// sends exactly the same bytes.
fn copies(id: EnvelopeId, targets: &[sealpost_proto::DeviceId]) -> Vec<Copy> {
    targets
        .iter()
        .map(|d| Copy {
            device: *d,
            ciphertext: id.0.to_vec(),
        })
        .collect()
}

/// One sender connection pipelining sends until the broker dies.
async fn sender(
    mut dev: Device,
    to: String,
    targets: Vec<sealpost_proto::DeviceId>,
    tag: u8,
) -> Sent {
    let mut sent: Vec<EnvelopeId> = Vec::new();
    let mut accepted: HashSet<EnvelopeId> = HashSet::new();
    let mut outstanding = 0usize;
    let mut n: u32 = 0;
    loop {
        while outstanding < 16 {
            let mut id = [0u8; 16];
            id[0] = tag;
            id[1..5].copy_from_slice(&n.to_be_bytes());
            id[5..].copy_from_slice(&rand::random::<[u8; 11]>());
            let id = EnvelopeId(id);
            let frame = ClientFrame::Send {
                id,
                to: to.clone(),
                class: Class::Durable,
                ttl_secs: 3600,
                copies: copies(id, &targets),
            };
            if dev
                .ws
                .send(Message::Binary(frame.encode().into()))
                .await
                .is_err()
            {
                return Sent::new(sent, &accepted);
            }
            sent.push(id);
            outstanding += 1;
            n += 1;
        }
        match dev.ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                if let Ok(ServerFrame::SendResult { id, outcome }) = ServerFrame::decode(&b) {
                    outstanding -= 1;
                    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
                    accepted.insert(id);
                }
            }
            Some(Ok(_)) => {}
            _ => return Sent::new(sent, &accepted),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let mut broker = Broker::start(&[]);
    let bob1 = register(&broker, "bob@test.example").await;
    let bob2 = add_device(&broker, &bob1).await;
    let targets = vec![bob1.device, bob2.device];
    let mut senders = Vec::new();
    for i in 0..4u8 {
        let creds = register(&broker, &format!("sender{i}@test.example")).await;
        let dev = Device::connect(&broker, &creds).await;
        senders.push(tokio::spawn(sender(
            dev,
            bob1.user.clone(),
            targets.clone(),
            i,
        )));
    }
    // Kill once a good number of sends have been made durable, while more are in flight.
    broker.wait_metric("sealpost_appends_total", 1500.0).await;
    broker.kill9();
    let mut accepted: Vec<Vec<EnvelopeId>> = Vec::new();
    for s in senders {
        accepted.push(s.await.expect("sender task").accepted);
    }
    let total: usize = accepted.iter().map(Vec::len).sum();
    assert!(
        total >= 500,
        "only {total} sends were acknowledged before the kill"
    );

    broker.restart();
    let mut delivered = 0;
    for creds in [&bob1, &bob2] {
        let mut dev = Device::connect(&broker, creds).await;
        let got = dev.drain().await;
        delivered += got.len();
        // Gap-free, strictly increasing sequence numbers.
        for w in got.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "sequence gap after recovery");
        }
        // No id twice.
        let ids: Vec<EnvelopeId> = got.iter().map(|(_, id)| *id).collect();
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            ids.len(),
            "duplicate delivery"
        );
        // Every acknowledged send is there, and each sender's sends keep their order.
        let pos: HashMap<EnvelopeId, usize> =
            ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        for per_sender in &accepted {
            let mut last = None;
            for id in per_sender {
                let p = *pos
                    .get(id)
                    .unwrap_or_else(|| panic!("acknowledged {id:?} lost"));
                assert!(last.is_none_or(|l| p > l), "order broken for {id:?}");
                last = Some(p);
            }
        }
    }

    // Acks were written and flushed as they came; once a later durable send is acknowledged
    // every earlier deletion is durable too. Kill again: nothing acked comes back.
    let probe_sender = register(&broker, "probe@test.example").await;
    let mut probe = Device::connect(&broker, &probe_sender).await;
    broker
        .wait_metric("sealpost_acks_total", delivered as f64)
        .await;
    let last = eid();
    assert_eq!(
        probe
            .send_and_wait(last, &bob1.user, &targets, b"after")
            .await,
        SendOutcome::Accepted { duplicate: false }
    );
    broker.kill9();
    broker.restart();
    for creds in [&bob1, &bob2] {
        let mut dev = Device::connect(&broker, creds).await;
        let got = dev.drain().await;
        let ids: Vec<EnvelopeId> = got.iter().map(|(_, id)| *id).collect();
        assert_eq!(
            ids,
            vec![last],
            "acknowledged envelopes were delivered again"
        );
    }
}

/// Resends `ids` (pipelined, same bytes as before); returns each one's outcome.
async fn resend(
    dev: &mut Device,
    to: &str,
    targets: &[sealpost_proto::DeviceId],
    ids: &[EnvelopeId],
) -> HashMap<EnvelopeId, SendOutcome> {
    let mut outcomes = HashMap::new();
    let mut next = ids.iter();
    let mut outstanding = 0usize;
    loop {
        while outstanding < 16 {
            let Some(&id) = next.next() else { break };
            let frame = ClientFrame::Send {
                id,
                to: to.to_owned(),
                class: Class::Durable,
                ttl_secs: 3600,
                copies: copies(id, targets),
            };
            dev.ws
                .send(Message::Binary(frame.encode().into()))
                .await
                .expect("resend");
            outstanding += 1;
        }
        if outstanding == 0 {
            return outcomes;
        }
        match dev.frame().await {
            ServerFrame::SendResult { id, outcome } => {
                outstanding -= 1;
                outcomes.insert(id, outcome);
            }
            ServerFrame::QueueEmpty => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A sender whose `send_result` was lost to a crash retries with the same id. Whether the
/// send's writes survived whole, in part or not at all, it ends up stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_after_kill_9_are_stored_exactly_once() {
    let mut broker = Broker::start(&[]);
    let bob1 = register(&broker, "bob@test.example").await;
    let bob2 = add_device(&broker, &bob1).await;
    let targets = vec![bob1.device, bob2.device];
    let mut senders = Vec::new();
    let mut creds = Vec::new();
    for i in 0..4u8 {
        let c = register(&broker, &format!("sender{i}@test.example")).await;
        let dev = Device::connect(&broker, &c).await;
        senders.push(tokio::spawn(sender(
            dev,
            bob1.user.clone(),
            targets.clone(),
            i,
        )));
        creds.push(c);
    }
    broker.wait_metric("sealpost_appends_total", 1000.0).await;
    broker.kill9();
    let mut sent = Vec::new();
    for s in senders {
        sent.push(s.await.expect("sender task"));
    }
    broker.restart();

    let mut all = HashSet::new();
    for (c, s) in creds.iter().zip(&sent) {
        let mut dev = Device::connect(&broker, c).await;
        let outcomes = resend(&mut dev, &bob1.user, &targets, &s.all).await;
        for id in &s.all {
            let outcome = &outcomes[id];
            assert!(
                matches!(outcome, SendOutcome::Accepted { .. }),
                "retry refused: {outcome:?}"
            );
            if s.accepted.contains(id) {
                assert_eq!(
                    outcome,
                    &SendOutcome::Accepted { duplicate: true },
                    "an acknowledged send was not recognised"
                );
            }
        }
        all.extend(s.all.iter().copied());
    }
    for c in [&bob1, &bob2] {
        let mut dev = Device::connect(&broker, c).await;
        let got = dev.drain().await;
        for w in got.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "sequence gap after recovery");
        }
        let mut counts: HashMap<EnvelopeId, usize> = HashMap::new();
        for (_, id) in &got {
            *counts.entry(*id).or_default() += 1;
        }
        assert!(
            counts.values().all(|&n| n == 1),
            "an envelope was stored twice"
        );
        assert_eq!(
            counts.keys().copied().collect::<HashSet<_>>(),
            all,
            "every send is stored once its retry is accepted"
        );
    }
}

#[tokio::test]
async fn restart_keeps_sequence_numbers_and_tokens() {
    let mut broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    for _ in 0..3 {
        a.send_and_wait(eid(), &bob.user, &[bob.device], b"x").await;
    }
    drop(a);
    assert!(broker.terminate(), "graceful shutdown exits 0");
    broker.restart();
    let mut b = Device::connect(&broker, &bob).await;
    let got = b.drain().await;
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let mut a = Device::connect(&broker, &alice).await;
    a.send_and_wait(eid(), &bob.user, &[bob.device], b"y").await;
    let (seq, _) = b.deliver().await;
    assert_eq!(seq, 4, "sequence numbers continue after a restart");
}

/// Invariant: an ack whose deletion the broker made durable is never undone by a crash. Acks
/// have no answer, so the test waits on `sealpost_acks_durable_total` (counted once the
/// deletion is flushed), then kills the broker with nothing else in between that could flush
/// it: no send, no other traffic.
#[tokio::test]
async fn acknowledged_envelopes_stay_deleted_after_kill_9() {
    let mut broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let ids: Vec<_> = (0..4).map(|_| eid()).collect();
    for id in &ids {
        a.send_and_wait(*id, &bob.user, &[bob.device], b"x").await;
    }
    drop(a);
    let mut b = Device::connect(&broker, &bob).await;
    let backlog = b.backlog().await;
    assert_eq!(backlog.len(), 4);
    // Ack the first three; the fourth stays.
    b.ack(backlog[..3].iter().map(|(seq, _)| *seq).collect())
        .await;
    broker.wait_metric("sealpost_acks_durable_total", 3.0).await;
    broker.kill9();
    broker.restart();
    let mut b = Device::connect(&broker, &bob).await;
    let again: Vec<_> = b.backlog().await.into_iter().map(|(_, e)| e.id).collect();
    assert_eq!(again, vec![ids[3]], "acknowledged envelopes came back");
}

/// Heads live in memory (an ack stores none): a graceful restart hands them back and the
/// next start believes them; after `kill -9` the queues are counted again, and a queue that
/// acknowledgements emptied goes on after its last number, never reusing it.
#[tokio::test]
async fn queue_ends_survive_acks_without_stored_heads() {
    let mut broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    for _ in 0..5 {
        a.send_and_wait(eid(), &bob.user, &[bob.device], b"x").await;
    }
    drop(a);
    let mut b = Device::connect(&broker, &bob).await;
    let backlog = b.backlog().await;
    b.ack(backlog.iter().map(|(seq, _)| *seq).collect()).await;
    broker.wait_metric("sealpost_acks_durable_total", 5.0).await;
    drop(b);
    assert!(broker.terminate(), "graceful shutdown exits 0");
    broker.restart();
    let mut b = Device::connect(&broker, &bob).await;
    assert!(b.backlog().await.is_empty());
    // The sled store's heads (the NATS store keeps its queue ends in the stream itself).
    let sled = !nats_store();
    if sled {
        assert_eq!(
            broker.metric("sealpost_queues_recounted_total").await,
            0.0,
            "closed queues open from their heads"
        );
    }
    let mut a = Device::connect(&broker, &alice).await;
    a.send_and_wait(eid(), &bob.user, &[bob.device], b"y").await;
    let (seq, _) = b.deliver().await;
    assert_eq!(seq, 6);
    b.ack(vec![seq]).await;
    broker.wait_metric("sealpost_acks_durable_total", 1.0).await;
    // Bob stays connected, so his mailbox cannot stop (and close his queues) when idle:
    // the kill finds them open.
    broker.kill9();
    drop((a, b));
    broker.restart();
    let mut b = Device::connect(&broker, &bob).await;
    assert!(
        b.backlog().await.is_empty(),
        "acknowledged envelopes came back"
    );
    if sled {
        assert!(broker.metric("sealpost_queues_recounted_total").await >= 1.0);
    }
    let mut a = Device::connect(&broker, &alice).await;
    a.send_and_wait(eid(), &bob.user, &[bob.device], b"z").await;
    let (seq, _) = b.deliver().await;
    assert_eq!(seq, 7, "sequence numbers are never handed out twice");
}
