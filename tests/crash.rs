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

/// One sender connection pipelining sends until the broker dies; returns the ids whose
/// `send_result` said accepted, in the order they were sent.
async fn sender(
    mut dev: Device,
    to: String,
    targets: Vec<sealpost_proto::DeviceId>,
    tag: u8,
) -> Vec<EnvelopeId> {
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
            let copies = targets
                .iter()
                .map(|d| Copy {
                    device: *d,
                    ciphertext: id.0.to_vec(),
                })
                .collect();
            let frame = ClientFrame::Send {
                id,
                to: to.clone(),
                class: Class::Durable,
                ttl_secs: 3600,
                copies,
            };
            if dev
                .ws
                .send(Message::Binary(frame.encode().into()))
                .await
                .is_err()
            {
                return sent
                    .into_iter()
                    .filter(|id| accepted.contains(id))
                    .collect();
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
            _ => {
                return sent
                    .into_iter()
                    .filter(|id| accepted.contains(id))
                    .collect();
            }
        }
    }
}

/// Reads a device's backlog to `queue_empty`, acking everything; returns (seq, id) in order.
async fn drain(dev: &mut Device) -> Vec<(u64, EnvelopeId)> {
    let mut out = Vec::new();
    loop {
        match dev.frame().await {
            ServerFrame::Deliver { seq, envelope } => {
                dev.ack(vec![seq]).await;
                out.push((seq, envelope.id));
            }
            ServerFrame::QueueEmpty => return out,
            other => panic!("unexpected {other:?}"),
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
        accepted.push(s.await.expect("sender task"));
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
        let got = drain(&mut dev).await;
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
        let got = drain(&mut dev).await;
        let ids: Vec<EnvelopeId> = got.iter().map(|(_, id)| *id).collect();
        assert_eq!(
            ids,
            vec![last],
            "acknowledged envelopes were delivered again"
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
    let got = drain(&mut b).await;
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let mut a = Device::connect(&broker, &alice).await;
    a.send_and_wait(eid(), &bob.user, &[bob.device], b"y").await;
    let (seq, _) = b.deliver().await;
    assert_eq!(seq, 4, "sequence numbers continue after a restart");
}
