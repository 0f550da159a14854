//! `kill -9` on every delivery path but the plain durable send (see `crash.rs`) and the
//! federation links (see `federation.rs`). Each test states the invariant it checks; each kills
//! the broker right after the answer that makes the promise, with nothing in between that
//! could make it durable by accident.

#![allow(clippy::cast_possible_truncation)]

mod common;

use base64::{Engine, engine::general_purpose::STANDARD};
use common::*;
use sealpost_proto::{Class, CloseCode, ErrorCode, SendOutcome, ServerFrame};
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Invariant: an urgent envelope (call ringing) is stored like a durable one until its short
/// TTL: accepted, then a crash, and a device that connects within the TTL still rings.
#[tokio::test]
async fn urgent_envelopes_survive_kill_9_within_their_ttl() {
    let mut broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let id = eid();
    a.send_to(id, &bob.user, &[bob.device], Class::Urgent, 120, b"ring")
        .await;
    assert_eq!(
        a.result_for(id).await.0,
        SendOutcome::Accepted { duplicate: false }
    );
    broker.kill9();
    broker.restart();
    let mut b = Device::connect(&broker, &bob).await;
    let backlog = b.backlog().await;
    assert_eq!(backlog.len(), 1);
    assert_eq!(backlog[0].1.id, id);
    assert_eq!(backlog[0].1.class, Class::Urgent);
}

/// Invariant: an ephemeral envelope (typing, presence) is never written: a connected device
/// gets it, an offline one never does, also not after a crash and restart.
#[tokio::test]
async fn ephemeral_envelopes_do_not_come_back_after_kill_9() {
    let mut broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let bob2 = add_device(&broker, &bob).await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut b = Device::connect(&broker, &bob).await;
    assert!(b.backlog().await.is_empty());
    let id = eid();
    a.send_to(
        id,
        &bob.user,
        &[bob.device, bob2.device],
        Class::Ephemeral,
        30,
        b"typing",
    )
    .await;
    assert_eq!(
        a.result_for(id).await.0,
        SendOutcome::Accepted { duplicate: false }
    );
    match b.frame().await {
        ServerFrame::DeliverEphemeral { envelope } => assert_eq!(envelope.id, id),
        other => panic!("expected the ephemeral envelope, got {other:?}"),
    }
    // A durable marker after it, so that the restart below is known to have the queue.
    let marker = eid();
    a.send_and_wait(marker, &bob.user, &[bob.device, bob2.device], b"marker")
        .await;
    broker.kill9();
    broker.restart();
    for creds in [&bob, &bob2] {
        let mut dev = Device::connect(&broker, creds).await;
        let ids: Vec<_> = dev.backlog().await.into_iter().map(|(_, e)| e.id).collect();
        assert_eq!(ids, vec![marker], "device {:?}", creds.device);
    }
}

/// Invariant: a queue at its quota stays at its quota across a crash (its count is stored
/// with it): the refused send was not stored, the next one is refused too, and once the device
/// drains, sends are accepted again with sequence numbers that continue.
#[tokio::test]
async fn a_full_mailbox_is_still_full_after_kill_9_and_refused_sends_were_never_stored() {
    let mut broker = Broker::start(&["--queue-quota", "5"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut stored = Vec::new();
    for _ in 0..5 {
        let id = eid();
        let got = a.send_and_wait(id, &bob.user, &[bob.device], b"x").await;
        assert_eq!(got, SendOutcome::Accepted { duplicate: false });
        stored.push(id);
    }
    let refused = eid();
    let got = a
        .send_and_wait(refused, &bob.user, &[bob.device], b"x")
        .await;
    assert!(
        matches!(
            got,
            SendOutcome::Rejected {
                code: ErrorCode::MailboxFull,
                ..
            }
        ),
        "{got:?}"
    );
    drop(a);
    broker.kill9();
    broker.restart();
    let mut a = Device::connect(&broker, &alice).await;
    let got = a.send_and_wait(eid(), &bob.user, &[bob.device], b"x").await;
    assert!(
        matches!(
            got,
            SendOutcome::Rejected {
                code: ErrorCode::MailboxFull,
                ..
            }
        ),
        "still full after the restart: {got:?}"
    );
    let mut b = Device::connect(&broker, &bob).await;
    let drained = b.drain().await;
    assert_eq!(
        drained.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
        stored
    );
    assert_eq!(
        drained.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    // Acks have no answer: wait until the broker has applied them before sending again.
    broker.wait_metric("sealpost_acks_durable_total", 5.0).await;
    let id = eid();
    let got = a.send_and_wait(id, &bob.user, &[bob.device], b"x").await;
    assert_eq!(got, SendOutcome::Accepted { duplicate: false });
    assert_eq!(b.deliver().await.0, 6, "sequence numbers continue");
}

/// Invariant: what a connection was delivered but did not acknowledge, whether it was then
/// displaced by a second connection or dropped as a slow consumer, is delivered again after a
/// crash, in order and with the same sequence numbers.
#[tokio::test]
async fn unacknowledged_deliveries_of_displaced_and_slow_connections_survive_kill_9() {
    let mut broker = Broker::start(&["--delivery-window", "4", "--ack-timeout-ms", "300"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let id = eid();
        a.send_and_wait(id, &bob.user, &[bob.device], b"x").await;
        ids.push(id);
    }
    // A slow consumer: takes its window of four, acks the first, then nothing.
    let mut slow = Device::connect(&broker, &bob).await;
    let (first, _) = slow.deliver().await;
    slow.ack(vec![first]).await;
    let (frames, close) = until_close(&mut slow.ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::SlowConsumer.as_u16()));
    assert!(frames.len() >= 3, "{frames:?}");
    broker.wait_metric("sealpost_acks_durable_total", 1.0).await;
    // A connection that is displaced with deliveries in flight.
    let mut old = Device::connect(&broker, &bob).await;
    let (seq, _) = old.deliver().await;
    assert_eq!(seq, 2);
    let mut new = Device::connect(&broker, &bob).await;
    let (_, close) = until_close(&mut old.ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Displaced.as_u16()));
    assert_eq!(
        new.deliver().await.0,
        2,
        "the displaced one's delivery again"
    );
    drop(new);
    broker.kill9();
    broker.restart();
    let mut b = Device::connect(&broker, &bob).await;
    let got = b.drain().await;
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (2..=10).collect::<Vec<_>>()
    );
    assert_eq!(got.iter().map(|(_, id)| *id).collect::<Vec<_>>(), ids[1..]);
}

/// A claim answered 200, as JSON.
async fn claimed(broker: &Broker, target: &Creds, by: &Creds) -> Value {
    let resp = claim(broker, target, by).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

/// Invariant: a one-time key handed out by a claim is never handed out again, also when the
/// broker crashes right after answering; and a key upload or a signed device list that was
/// answered 2xx is there after the crash.
#[tokio::test]
async fn claimed_keys_uploads_and_device_lists_hold_across_kill_9() {
    let mut broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let keys: Vec<Value> = (0..6)
        .map(|i| json!({ "key_id": i, "key": STANDARD.encode(format!("otk-{i}")) }))
        .collect();
    let resp = client()
        .put(keys_url(&broker, &bob))
        .header("authorization", bob.bearer())
        .json(&json!({
            "one_time_keys": keys,
            "fallback_key": { "key_id": 9999, "key": STANDARD.encode("fallback") },
        }))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    broker.kill9();
    broker.restart();
    let mut handed_out = Vec::new();
    for _ in 0..3 {
        let got = claimed(&broker, &bob, &alice).await;
        assert_eq!(got["fallback"], json!(false));
        handed_out.push(got["key_id"].as_u64().unwrap());
        // Killed right after each answer.
        broker.kill9();
        broker.restart();
    }
    let url = format!("{}/v1/accounts/{}/device-list", broker.http(), bob.user);
    let signed = STANDARD.encode(b"signed list v2");
    let resp = client()
        .put(&url)
        .header("authorization", bob.bearer())
        .json(&json!({ "signed": signed }))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 204);
    broker.kill9();
    broker.restart();
    let got = device_list(&broker, &bob.user).await;
    assert_eq!(got["signed"], json!(signed));
    for _ in 0..3 {
        handed_out.push(
            claimed(&broker, &bob, &alice).await["key_id"]
                .as_u64()
                .unwrap(),
        );
    }
    handed_out.sort_unstable();
    assert_eq!(
        handed_out,
        vec![0, 1, 2, 3, 4, 5],
        "a one-time key was handed out twice"
    );
    let got = claimed(&broker, &bob, &alice).await;
    assert_eq!(got["fallback"], json!(true));
    assert_eq!(got["key_id"], json!(9999));
}
