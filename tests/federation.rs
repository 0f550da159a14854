//! Federation between real broker processes on 127.0.0.x with pinned peers: delivery in every
//! direction, remote lookups, privacy of the receiving side, `kill -9` of the receiver, a cut
//! link, and bad peers.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::{
    collections::{HashMap, HashSet},
    process::Command,
    time::Duration,
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use common::{
    site::{Site, admin, wait_peer, wait_up},
    *,
};
use futures_util::{SinkExt, StreamExt};
use sealpost_proto::{
    Class, ClientFrame, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome, ServerFrame,
    federation::HandshakeFrame,
};
use tokio_tungstenite::tungstenite::Message;

/// Device ids of `user` as its home broker `via` reports them (over federation if remote).
async fn devices_via(via: &Broker, user: &str) -> Vec<DeviceId> {
    let v: serde_json::Value = reqwest::get(format!("{}/v1/accounts/{user}/devices", via.http()))
        .await
        .expect("devices")
        .json()
        .await
        .expect("json");
    v["devices"]
        .as_array()
        .expect("devices array")
        .iter()
        .map(|d| DeviceId(d["device_id"].as_u64().expect("id") as u32))
        .collect()
}

fn body(from: &str, to: &str, n: u32) -> Vec<u8> {
    format!("{from}->{to}#{n:05}").into_bytes()
}

/// Reads deliveries until `want` have arrived, acking each; returns (seq, id, ciphertext).
async fn collect(dev: &mut Device, want: usize) -> Vec<(u64, EnvelopeId, Vec<u8>)> {
    dev.collect(want)
        .await
        .into_iter()
        .map(|(seq, e)| (seq, e.id, e.ciphertext))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_domains_exchange_in_every_direction() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let mut c = Site::new("c.example", "127.0.0.3");
    let (pa, pb, pc) = (a.peer_entry(), b.peer_entry(), c.peer_entry());
    let ba = a.start_raw(&format!("{pb},{pc}"), &[]);
    let bb = b.start_raw(&format!("{pa},{pc}"), &[]);
    let bc = c.start_raw(&format!("{pa},{pb}"), &[]);
    let brokers = [&ba, &bb, &bc];
    for (broker, others) in [
        (&ba, ["b.example", "c.example"]),
        (&bb, ["a.example", "c.example"]),
        (&bc, ["a.example", "b.example"]),
    ] {
        for d in others {
            wait_up(broker, d).await;
        }
    }
    // Well-known document.
    let wk: serde_json::Value = reqwest::get(format!("{}/.well-known/sealpost/server", bb.http()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(wk["domain"], "b.example");
    assert_eq!(wk["x25519"].as_str().unwrap(), b.key);

    let users = ["alice@a.example", "bob@b.example", "carol@c.example"];
    let mut creds = Vec::new();
    for (user, broker) in users.iter().zip(brokers) {
        let first = register(broker, user).await;
        let second = add_device(broker, &first).await;
        creds.push(vec![first, second]);
    }
    let mut devices: Vec<Vec<Device>> = Vec::new();
    for (i, broker) in brokers.iter().enumerate() {
        let mut devs = Vec::new();
        for cr in &creds[i] {
            let mut d = Device::connect(broker, cr).await;
            assert!(d.backlog().await.is_empty());
            devs.push(d);
        }
        devices.push(devs);
    }

    // Remote lookups through the home broker.
    assert_eq!(
        devices_via(&ba, "bob@b.example").await,
        vec![DeviceId(1), DeviceId(2)]
    );
    let missing = reqwest::get(format!(
        "{}/v1/accounts/nobody@b.example/devices",
        ba.http()
    ))
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);
    let signed = b"bob's list, signed by bob's master key".to_vec();
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/v1/accounts/bob@b.example/device-list",
            bb.http()
        ))
        .header("authorization", creds[1][0].bearer())
        .json(&serde_json::json!({ "signed": STANDARD.encode(&signed) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let got: serde_json::Value = reqwest::get(format!(
        "{}/v1/accounts/bob@b.example/device-list",
        bc.http()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        STANDARD.decode(got["signed"].as_str().unwrap()).unwrap(),
        signed
    );
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/v1/accounts/bob@b.example/devices/2/keys",
            bb.http()
        ))
        .header("authorization", creds[1][1].bearer())
        .json(&serde_json::json!({
            "one_time_keys": [{ "key_id": 7, "key": STANDARD.encode(b"otk-7") }],
            "fallback_key": { "key_id": 1, "key": STANDARD.encode(b"fallback") },
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let claim = |with_account: bool| {
        let mut req = reqwest::Client::new().post(format!(
            "{}/v1/accounts/bob@b.example/devices/2/keys/claim",
            ba.http()
        ));
        if with_account {
            req = req
                .header("sealpost-account", "alice@a.example")
                .header("authorization", creds[0][0].bearer());
        }
        req.send()
    };
    let claimed: serde_json::Value = claim(true).await.unwrap().json().await.unwrap();
    assert_eq!(claimed["key_id"], 7);
    assert_eq!(claimed["fallback"], false);
    let claimed: serde_json::Value = claim(true).await.unwrap().json().await.unwrap();
    assert_eq!(claimed["fallback"], true, "the one-time key was consumed");
    // Without credentials and without a delivery token, bob's broker refuses.
    assert_eq!(claim(false).await.unwrap().status(), 401);
    // MLS KeyPackages are claimed the same way, from their own set.
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/v1/accounts/bob@b.example/devices/2/key-packages",
            bb.http()
        ))
        .header("authorization", creds[1][1].bearer())
        .json(&serde_json::json!({
            "one_time_keys": [{ "key_id": 7, "key": STANDARD.encode(b"kp-7") }],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let claimed: serde_json::Value = reqwest::Client::new()
        .post(format!(
            "{}/v1/accounts/bob@b.example/devices/2/key-packages/claim",
            ba.http()
        ))
        .header("sealpost-account", "alice@a.example")
        .header("authorization", creds[0][0].bearer())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        STANDARD.decode(claimed["key"].as_str().unwrap()).unwrap(),
        b"kp-7"
    );

    // Device-set refusals work as they do locally.
    let id = eid();
    let outcome = devices[0][0]
        .send_and_wait(id, "bob@b.example", &[DeviceId(1)], b"x")
        .await;
    assert_eq!(
        outcome,
        SendOutcome::Rejected {
            code: ErrorCode::StaleDevices,
            current_devices: vec![DeviceId(1), DeviceId(2)],
        }
    );
    let outcome = devices[0][0]
        .send_and_wait(eid(), "nobody@b.example", &[DeviceId(1)], b"x")
        .await;
    assert!(matches!(
        outcome,
        SendOutcome::Rejected {
            code: ErrorCode::UnknownRecipient,
            ..
        }
    ));
    let outcome = devices[0][0]
        .send_and_wait(eid(), "dave@elsewhere.example", &[DeviceId(1)], b"x")
        .await;
    assert!(matches!(
        outcome,
        SendOutcome::Rejected {
            code: ErrorCode::UnknownDomain,
            ..
        }
    ));

    // Every user sends N messages to every other user, pipelined, to all their devices.
    const N: u32 = 20;
    let mut sent: Vec<HashSet<EnvelopeId>> = Vec::new();
    for (i, from) in users.iter().enumerate() {
        let mut ids = HashSet::new();
        for n in 0..N {
            for (j, to) in users.iter().enumerate() {
                if i == j {
                    continue;
                }
                let id = eid();
                let targets = [DeviceId(1), DeviceId(2)];
                devices[i][0]
                    .send_to(id, to, &targets, Class::Durable, 3600, &body(from, to, n))
                    .await;
                ids.insert(id);
            }
        }
        sent.push(ids);
    }
    // Every device of every user gets N from each other user, in order per sender; the
    // sending devices also get every send_result (in any order: destinations are independent).
    for (j, to) in users.iter().enumerate() {
        for (k, dev) in devices[j].iter_mut().enumerate() {
            let mut results = if k == 0 {
                sent[j].clone()
            } else {
                HashSet::new()
            };
            let mut got = Vec::new();
            while got.len() < 2 * N as usize || !results.is_empty() {
                match dev.frame().await {
                    ServerFrame::Deliver { seq, envelope } => {
                        dev.ack(vec![seq]).await;
                        got.push(envelope.ciphertext);
                    }
                    ServerFrame::SendResult { id, outcome } => {
                        assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
                        assert!(results.remove(&id), "unexpected send_result");
                    }
                    ServerFrame::QueueEmpty | ServerFrame::Notice { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            let mut next: HashMap<String, u32> = HashMap::new();
            for ct in got {
                let text = String::from_utf8(ct).unwrap();
                let (head, n) = text.split_once('#').unwrap();
                let (from, dest) = head.split_once("->").unwrap();
                assert_eq!(dest, *to);
                let expected = next.entry(from.to_owned()).or_default();
                assert_eq!(n.parse::<u32>().unwrap(), *expected, "order from {from}");
                *expected += 1;
            }
            assert_eq!(next.len(), 2);
            assert!(next.values().all(|n| *n == N));
        }
    }
    for broker in brokers {
        for peer in admin(broker).await["peers"].as_array().unwrap() {
            assert_eq!(peer["link"], "up");
        }
    }
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
    assert!(ba.metric("sealpost_federation_delivered_total").await >= f64::from(2 * N));
}

/// Sealed sends across federation: the receiving broker's files and logs never name the
/// sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiving_broker_never_learns_the_sender() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let ba = a.start(&[&b], &[]);
    let mut bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    wait_up(&bb, "a.example").await;
    let sender = "zq-sender-4417@a.example";
    let s1 = register(&ba, sender).await;
    let _s2 = add_device(&ba, &s1).await;
    let s3 = add_device(&ba, &s1).await; // device 3 sends
    let bob = register(&bb, "bob@b.example").await;
    let token = [0x42u8; 32];
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/v1/accounts/bob@b.example/delivery-token",
            bb.http()
        ))
        .header("authorization", bob.bearer())
        .json(&serde_json::json!({ "token": URL_SAFE_NO_PAD.encode(token) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let mut bob_dev = Device::connect(&bb, &bob).await;
    assert!(bob_dev.backlog().await.is_empty());

    // Authenticated sends from the sender's device 3 ...
    let mut dev = Device::connect(&ba, &s3).await;
    assert!(dev.backlog().await.is_empty());
    for n in 0..5 {
        let out = dev
            .send_and_wait(
                eid(),
                "bob@b.example",
                &[DeviceId(1)],
                &body("sealed", "bob", n),
            )
            .await;
        assert_eq!(out, SendOutcome::Accepted { duplicate: false });
    }
    // ... and sealed sends over the anonymous endpoint, with bob's delivery token.
    let (mut anon, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/sealed", ba.addr))
        .await
        .unwrap();
    // One sealed send and its answer from `ba`.
    let mut sealed = async |n: u32, token: &[u8]| {
        let id = eid();
        let frame = ClientFrame::SealedSend {
            id,
            to: "bob@b.example".into(),
            class: Class::Durable,
            ttl_secs: 3600,
            copies: vec![Copy {
                device: DeviceId(1),
                ciphertext: body("sealed", "bob", n),
            }],
            delivery_token: Some(token.to_vec()),
        };
        anon.send(Message::Binary(frame.encode().into()))
            .await
            .unwrap();
        loop {
            let Some(Ok(Message::Binary(b))) = anon.next().await else {
                panic!("sealed connection ended")
            };
            if let ServerFrame::SendResult { id: got, outcome } = ServerFrame::decode(&b).unwrap() {
                assert_eq!(got, id);
                return outcome;
            }
        }
    };
    for n in 5..10 {
        let outcome = sealed(n, &token).await;
        assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    }
    // A wrong token cannot be checked by the sender's broker (it holds no token of bob's): its
    // outbox accepts it, bob's broker refuses it, and the sender's broker counts the refusal.
    let outcome = sealed(99, &[0x13; 32]).await;
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    let deadline = tokio::time::Instant::now() + WAIT;
    while ba
        .metric_labeled(
            "sealpost_federation_refused_total",
            "reason=\"bad_delivery_token\"",
        )
        .await
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refusal was never counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let got = collect(&mut bob_dev, 10).await;
    assert_eq!(
        got.len(),
        10,
        "bob gets the ten, not the wrongly admitted one"
    );
    // Flush bob's broker's state to disk and its logs, then scan.
    assert!(bb.terminate());
    let log = std::fs::read(&bb.log_path).unwrap();
    let needle = b"zq-sender-4417";
    assert!(
        !log.windows(needle.len()).any(|w| w == needle),
        "the receiving broker's log names the sender"
    );
    assert!(
        !dir_contains(&bb.data_dir(), needle),
        "the receiving broker's data names the sender"
    );
    let log = String::from_utf8_lossy(&log);
    assert!(
        !log.contains("device=3") && !log.contains("device: 3"),
        "the receiving broker's log names the sending device"
    );
    // The sending broker knows its own account, of course; the envelope went over the link.
    assert!(ba.metric("sealpost_federation_delivered_total").await >= 10.0);
    bb.restart();
}

/// Pipelines `total` sends (32 in flight) and returns their ids in send order, all accepted.
async fn pipeline(
    dev: Device,
    to: String,
    targets: Vec<DeviceId>,
    total: usize,
) -> Vec<EnvelopeId> {
    let (sent, accepted) = pipeline_until_gone(dev, to, targets, total).await;
    assert_eq!(accepted.len(), total, "the connection ended early");
    sent
}

/// Reads until every id of `ids` arrived on `dev`; asserts exactly once (by id) and in order.
async fn expect_exactly_once(dev: &mut Device, ids: &[EnvelopeId]) {
    let want: HashSet<EnvelopeId> = ids.iter().copied().collect();
    let mut seen: HashMap<EnvelopeId, u64> = HashMap::new();
    let mut order = Vec::new();
    while seen.len() < want.len() {
        match dev.frame().await {
            ServerFrame::Deliver { seq, envelope } => {
                assert!(want.contains(&envelope.id), "unknown envelope");
                match seen.get(&envelope.id) {
                    Some(s) => assert_eq!(*s, seq, "envelope stored twice"),
                    None => {
                        seen.insert(envelope.id, seq);
                        order.push(envelope.id);
                    }
                }
                dev.ack(vec![seq]).await;
            }
            ServerFrame::QueueEmpty | ServerFrame::Notice { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    if let Some(at) = order.iter().zip(ids).position(|(a, b)| a != b) {
        panic!(
            "per-device order differs from the send order at {at} of {}",
            ids.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_receiving_broker_loses_and_duplicates_nothing() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let ba = a.start(&[&b], &[]);
    let mut bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let bob1 = register(&bb, "bob@b.example").await;
    let bob2 = add_device(&bb, &bob1).await;
    let dev = Device::connect(&ba, &alice).await;
    let targets = vec![bob1.device, bob2.device];
    const TOTAL: usize = 1500;
    let sender = tokio::spawn(pipeline(dev, "bob@b.example".into(), targets, TOTAL));
    // Kill bob's broker once it has stored a good part, while transactions are in flight.
    bb.wait_metric("sealpost_appends_total", 400.0).await;
    bb.kill9();
    // The sender's broker keeps accepting into its outbox meanwhile.
    let accepted = sender.await.expect("sender");
    assert_eq!(accepted.len(), TOTAL);
    bb.restart();
    for creds in [&bob1, &bob2] {
        let mut dev = Device::connect(&bb, creds).await;
        expect_exactly_once(&mut dev, &accepted).await;
    }
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
}

/// Pipelines sends until `total` are answered or the broker goes away; returns every id sent
/// (in order) and those accepted.
async fn pipeline_until_gone(
    mut dev: Device,
    to: String,
    targets: Vec<DeviceId>,
    total: usize,
) -> (Vec<EnvelopeId>, HashSet<EnvelopeId>) {
    let mut sent = Vec::new();
    let mut accepted = HashSet::new();
    let mut outstanding = 0usize;
    while accepted.len() < total {
        while outstanding < 32 && sent.len() < total {
            let id = eid();
            let n = sent.len() as u32;
            // The broker may be killed under a send (which may have reached it): then it is
            // over.
            sent.push(id);
            let body = n.to_be_bytes();
            if !dev
                .try_send_to(id, &to, &targets, Class::Durable, 3600, &body)
                .await
            {
                return (sent, accepted);
            }
            outstanding += 1;
        }
        match dev.next().await {
            Event::Frame(ServerFrame::SendResult { id, outcome }) => {
                assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
                accepted.insert(id);
                outstanding -= 1;
            }
            Event::Frame(ServerFrame::QueueEmpty) => {}
            Event::Frame(other) => panic!("unexpected {other:?}"),
            Event::Closed(_) => break,
        }
    }
    (sent, accepted)
}

/// Invariant: `kill -9` of the *sending* broker mid-stream loses no envelope whose
/// `send_result` said accepted (its outbox is durable first) and stores none twice at the
/// receiver (transactions are resent after the restart and deduplicated by envelope id). An
/// envelope sent but not answered before the crash may or may not arrive; if it does, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_sending_broker_loses_and_duplicates_nothing() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let mut ba = a.start(&[&b], &[]);
    let bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let bob = register(&bb, "bob@b.example").await;
    let dev = Device::connect(&ba, &alice).await;
    let sender = tokio::spawn(pipeline_until_gone(
        dev,
        "bob@b.example".into(),
        vec![bob.device],
        3000,
    ));
    // Kill alice's broker once bob's has stored a good part: transactions are in flight.
    bb.wait_metric("sealpost_appends_total", 400.0).await;
    ba.kill9();
    let (sent, accepted) = sender.await.expect("sender");
    assert!(
        accepted.len() >= 400 && accepted.len() < 3000,
        "{}",
        accepted.len()
    );
    ba.restart();
    wait_up(&ba, "b.example").await;
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
    let mut dev = Device::connect(&bb, &bob).await;
    let position: HashMap<EnvelopeId, usize> =
        sent.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut last = None;
    let mut seen = HashSet::new();
    for (_, id) in dev.drain().await {
        let at = *position.get(&id).expect("an envelope nobody sent");
        assert!(seen.insert(id), "stored twice");
        assert!(last < Some(at), "out of send order");
        last = Some(at);
    }
    let lost = accepted.difference(&seen).count();
    assert_eq!(lost, 0, "{lost} accepted envelopes lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_drains_its_backlog_in_order_when_restored() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let mut ba = a.start(&[&b], &[]);
    let mut bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let bob1 = register(&bb, "bob@b.example").await;
    let bob2 = add_device(&bb, &bob1).await;
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    // Learn bob's devices while the link is up (later sends are checked against them).
    let out = dev
        .send_and_wait(
            eid(),
            "bob@b.example",
            &[bob1.device, bob2.device],
            b"first",
        )
        .await;
    assert_eq!(out, SendOutcome::Accepted { duplicate: false });
    // Stop bob's broker: the link goes down, sends still get accepted into the outbox.
    assert!(bb.terminate());
    wait_peer(&ba, "b.example", "a link down", |p| p["link"] != "up").await;
    let targets = vec![bob1.device, bob2.device];
    let mut ids = Vec::new();
    for n in 0..200u32 {
        let id = eid();
        dev.send_to(
            id,
            "bob@b.example",
            &targets,
            Class::Durable,
            3600,
            &n.to_be_bytes(),
        )
        .await;
        ids.push(id);
    }
    let mut waiting: HashSet<EnvelopeId> = ids.iter().copied().collect();
    while !waiting.is_empty() {
        match dev.frame().await {
            ServerFrame::SendResult { id, outcome } => {
                assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
                assert!(waiting.remove(&id));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    wait_peer(&ba, "b.example", "a backlog", |p| {
        p["backlog"].as_u64() >= Some(200)
    })
    .await;
    ba.wait_metric("sealpost_federation_backlog", 200.0).await;
    let view = admin(&ba).await;
    let peer = &view["peers"][0];
    assert!(peer["failures"].as_u64().unwrap() >= 1);
    assert!(peer["oldest_age_ms"].as_u64().is_some());
    // The outbox survives a crash of the sending broker too.
    drop(dev);
    ba.kill9();
    ba.restart();
    wait_peer(&ba, "b.example", "its backlog back", |p| {
        p["backlog"].as_u64() >= Some(200)
    })
    .await;
    // Restore: the backlog drains, in order for every device.
    bb.restart();
    for creds in [&bob1, &bob2] {
        let mut dev = Device::connect(&bb, creds).await;
        let mut all = vec![];
        // The first envelope (sent before the cut) may still be queued for this device.
        loop {
            match dev.frame().await {
                ServerFrame::Deliver { seq, envelope } => {
                    dev.ack(vec![seq]).await;
                    if envelope.ciphertext != b"first" {
                        all.push(envelope.id);
                    }
                    if all.len() == ids.len() {
                        break;
                    }
                }
                ServerFrame::QueueEmpty => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        if let Some(at) = all.iter().zip(&ids).position(|(a, b)| a != b) {
            panic!("per-device order differs from the send order at {at}");
        }
        assert_eq!(all.len(), ids.len());
    }
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
}

/// The arguments `Site::start_raw` gives a broker of `name`, with `peers`.
fn site_args(name: &str, peers: &str) -> Vec<String> {
    [
        "--domain",
        name,
        "--federation-peers",
        peers,
        "--federation-backoff-min-ms",
        "50",
        "--federation-backoff-max-ms",
        "1000",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_changed_while_envelopes_wait_in_the_outbox_still_get_their_copies() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let ba = a.start(&[&b], &[]);
    let mut bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let bob1 = register(&bb, "bob@b.example").await;
    let bob2 = add_device(&bb, &bob1).await;
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    let targets = [bob1.device, bob2.device];
    let mut ids = vec![eid()];
    let out = dev
        .send_and_wait(ids[0], "bob@b.example", &targets, b"first")
        .await;
    assert_eq!(out, SendOutcome::Accepted { duplicate: false });

    // b stops federating for a while; what Alice sends meanwhile waits in a's outbox.
    let alone = site_args("b.example", "");
    let alone: Vec<&str> = alone.iter().map(String::as_str).collect();
    assert!(bb.terminate());
    bb.restart_with(&alone);
    wait_peer(&ba, "b.example", "a link down", |p| p["link"] != "up").await;
    for n in 0..5u8 {
        let id = eid();
        let out = dev.send_and_wait(id, "bob@b.example", &targets, &[n]).await;
        assert_eq!(out, SendOutcome::Accepted { duplicate: false });
        ids.push(id);
    }
    // Meanwhile Bob links a third device and removes the second.
    let bob3 = add_device(&bb, &bob1).await;
    assert!(remove_device(&bb, &bob1, bob2.device).await.is_success());

    // Federation back: the device that remains gets every copy, nothing is refused.
    let peers = site_args("b.example", &a.peer_entry());
    let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
    assert!(bb.terminate());
    bb.restart_with(&peers);
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
    assert_eq!(admin(&ba).await["peers"][0]["refused"], 0);
    let mut d1 = Device::connect(&bb, &bob1).await;
    let got: Vec<EnvelopeId> = d1.drain().await.into_iter().map(|(_, id)| id).collect();
    assert_eq!(got, ids);
    // The device linked later has none of them, as with a local send accepted before it.
    let mut d3 = Device::connect(&bb, &bob3).await;
    assert!(d3.backlog().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_local_traffic_carries_on() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    // Mallory runs c.example, which b does not know at all.
    let mut mallory = Site::new("c.example", "127.0.0.3");
    // An impostor claims a.example with a key of its own.
    let mut impostor = Site::new("a.example", "127.0.0.3");
    // e.example is a peer of b, but b pinned a wrong key for it.
    let mut wrong = Site::new("e.example", "127.0.0.3");
    let wrong_pin = format!(
        "e.example=ws://{}/v1/federation#{}",
        wrong.addr,
        STANDARD.encode([9u8; 32])
    );
    let ba = a.start(&[&b], &[]);
    let bb = b.start_raw(&format!("{},{wrong_pin}", a.peer_entry()), &[]);
    wait_up(&ba, "b.example").await;
    let bm = mallory.start(&[&b], &[]);
    let bi = impostor.start(&[&b], &[]);
    let bw = wrong.start(&[&b], &[]);
    for broker in [&bm, &bi, &bw] {
        wait_peer(broker, "b.example", "a refused link", |p| {
            p["failures"].as_u64() >= Some(2) && p["link"] != "up"
        })
        .await;
        let view = admin(broker).await;
        assert!(
            view["peers"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused") || e.contains("closed")),
            "{view}"
        );
    }
    // Garbage on the federation endpoint: refused with peer_refused.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/federation", bb.addr))
        .await
        .unwrap();
    ws.send(Message::Binary(vec![0xde, 0xad, 0xbe, 0xef].into()))
        .await
        .unwrap();
    let (frames, close) = read_close(&mut ws).await;
    assert!(matches!(
        frames.first().map(|f| HandshakeFrame::decode(f)),
        Some(Ok(HandshakeFrame::Refuse { .. }))
    ));
    assert_eq!(close.map(|c| c.0), Some(4007));
    // A hello with a forged handshake message for a real peer: refused too.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/federation", bb.addr))
        .await
        .unwrap();
    let hello = HandshakeFrame::Hello {
        origin: "a.example".into(),
        target: "b.example".into(),
        noise: vec![7; 48],
    };
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .unwrap();
    let (_, close) = read_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(4007));
    // Text garbage.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/federation", bb.addr))
        .await
        .unwrap();
    ws.send(Message::Text("GET / HTTP/1.1".into()))
        .await
        .unwrap();
    let (_, close) = read_close(&mut ws).await;
    assert!(close.is_some());

    assert!(bb.metric("sealpost_federation_links_refused_total").await >= 5.0);
    let log = std::fs::read_to_string(&bb.log_path).unwrap();
    assert!(log.contains("federation link refused"));
    assert!(log.contains("unknown peer domain"));
    assert!(log.contains("peer key does not match its domain"));

    // The real a.example still reaches b, and b's local traffic carries on.
    let alice = register(&ba, "alice@a.example").await;
    let bob = register(&bb, "bob@b.example").await;
    let mut alice_dev = Device::connect(&ba, &alice).await;
    assert!(alice_dev.backlog().await.is_empty());
    let mut bob_dev = Device::connect(&bb, &bob).await;
    assert!(bob_dev.backlog().await.is_empty());
    one_way(&mut alice_dev, &mut bob_dev).await;
    let mut pair = Pair::connect(&bb, "carol@b.example", "dave@b.example").await;
    pair.round_trip().await;
    wait_up(&ba, "b.example").await;
}

async fn read_close(ws: &mut Ws) -> (Vec<Vec<u8>>, Option<(u16, String)>) {
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timeout")
        {
            Some(Ok(Message::Binary(b))) => frames.push(b.to_vec()),
            Some(Ok(Message::Close(c))) => {
                return (frames, c.map(|c| (u16::from(c.code), c.reason.to_string())));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (frames, None),
        }
    }
}

/// A peer speaking the protocol as a.example (with a.example's real key): refused envelopes
/// get their codes in the acknowledgement, a frame that does not decode closes the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_transactions_get_errors_or_a_closed_link() {
    use sealpost::federation::{identity, link};
    use sealpost_proto::federation::{Admission, FedEnvelope, LinkFrame};
    let a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let a_key = identity::ServerKey::load_or_create(
        &a.dir.as_ref().expect("not started").path().join("data"),
    )
    .expect("a's key");
    let b_pub = identity::parse_public_key(&b.key).expect("b's key");
    let bb = b.start(&[&a], &[]);
    let bob = register(&bb, "bob@b.example").await;
    let mut bob_dev = Device::connect(&bb, &bob).await;
    assert!(bob_dev.backlog().await.is_empty());

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/federation", bb.addr))
        .await
        .unwrap();
    let mut hs = link::initiator(&a_key, "a.example", "b.example", &b_pub).unwrap();
    let mut buf = [0u8; 256];
    let n = hs.write_message(&[], &mut buf).unwrap();
    let hello = HandshakeFrame::Hello {
        origin: "a.example".into(),
        target: "b.example".into(),
        noise: buf[..n].to_vec(),
    };
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .unwrap();
    let Some(Ok(Message::Binary(welcome))) = ws.next().await else {
        panic!("no welcome")
    };
    let HandshakeFrame::Welcome { noise } = HandshakeFrame::decode(&welcome).unwrap() else {
        panic!("not a welcome")
    };
    hs.read_message(&noise, &mut buf).unwrap();
    let mut cipher = link::transport(hs).unwrap();

    let envelope = |to: &str, ttl_secs: u32, device: u32| FedEnvelope {
        id: eid(),
        to: to.into(),
        class: Class::Durable,
        ttl_secs,
        copies: vec![Copy {
            device: DeviceId(device),
            ciphertext: b"sealed".to_vec(),
        }],
        admission: Admission::Origin,
    };
    let good = envelope("bob@b.example", 60, 1);
    let txn = LinkFrame::Txn {
        txn_id: 7,
        envelopes: vec![
            good.clone(),
            envelope("nobody@b.example", 60, 1),
            envelope("bob@c.example", 60, 1),
            envelope("bob@b.example", 0, 1),
            envelope("bob@b.example", 60, 9),
            FedEnvelope {
                admission: Admission::Token(vec![1; 32]),
                ..envelope("bob@b.example", 60, 1)
            },
            envelope("not a handle", 60, 1),
        ],
    };
    let sealed = cipher.seal(&txn.encode()).unwrap();
    ws.send(Message::Binary(sealed.into())).await.unwrap();
    let ack = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                break LinkFrame::decode(&cipher.open(&b).unwrap()).unwrap();
            }
            Some(Ok(_)) => continue,
            other => panic!("link ended: {other:?}"),
        }
    };
    assert_eq!(
        ack,
        LinkFrame::TxnAck {
            txn_id: 7,
            codes: vec![
                None,
                Some(ErrorCode::UnknownRecipient),
                Some(ErrorCode::UnknownDomain),
                Some(ErrorCode::InvalidTtl),
                Some(ErrorCode::StaleDevices),
                Some(ErrorCode::BadDeliveryToken),
                Some(ErrorCode::InvalidHandle),
            ],
        }
    );
    let (_, delivered) = bob_dev.deliver().await;
    assert_eq!(delivered.id, good.id);

    // An encrypted frame that does not decode: link_error, then the link closes.
    let sealed = cipher.seal(&[1, 0x7f, 0xc1]).unwrap();
    ws.send(Message::Binary(sealed.into())).await.unwrap();
    let (frames, close) = read_close(&mut ws).await;
    let errors: Vec<LinkFrame> = frames
        .iter()
        .map(|f| LinkFrame::decode(&cipher.open(f).unwrap()).unwrap())
        .collect();
    assert!(matches!(
        errors.as_slice(),
        [LinkFrame::LinkError {
            code: ErrorCode::MalformedFrame,
            ..
        }]
    ));
    assert_eq!(close.map(|c| c.0), Some(1002));
    // The broker carries on.
    let mut pair = Pair::connect(&bb, "carol@b.example", "dave@b.example").await;
    pair.round_trip().await;
}

/// Peers without pinned keys: each broker reads the other's key and endpoint from its
/// well-known document (here over plain HTTP on loopback; `https://domain` by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_can_be_discovered_from_their_well_known_document() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let (a_base, b_base) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let ba = a.start_raw(&format!("b.example={b_base}"), &[]);
    let bb = b.start_raw(&format!("a.example={a_base}"), &[]);
    wait_up(&ba, "b.example").await;
    wait_up(&bb, "a.example").await;
    let view = admin(&ba).await;
    assert_eq!(view["peers"][0]["url"], b_base.as_str());
    let alice = register(&ba, "alice@a.example").await;
    let bob = register(&bb, "bob@b.example").await;
    let mut alice_dev = Device::connect(&ba, &alice).await;
    assert!(alice_dev.backlog().await.is_empty());
    let mut bob_dev = Device::connect(&bb, &bob).await;
    assert!(bob_dev.backlog().await.is_empty());
    one_way(&mut alice_dev, &mut bob_dev).await;
    one_way(&mut bob_dev, &mut alice_dev).await;
    // A base that serves another domain's document is not taken for the peer.
    let mut c = Site::new("c.example", "127.0.0.3");
    let bc = c.start_raw(&format!("b.example={a_base}"), &[]);
    wait_peer(&bc, "b.example", "a failed discovery", |p| {
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("names another domain"))
    })
    .await;
}

/// A receiving broker that limits an origin's rate refuses the excess for now; the sending
/// broker backs off and resends from the first refused envelope, so everything arrives once
/// and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_over_its_rate_is_slowed_down_not_lost() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let ba = a.start(&[&b], &[]);
    let bb = b.start(&[&a], &["--federation-origin-rate", "10"]);
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let bob = register(&bb, "bob@b.example").await;
    let mut bob_dev = Device::connect(&bb, &bob).await;
    assert!(bob_dev.backlog().await.is_empty());
    let dev = Device::connect(&ba, &alice).await;
    let ids = pipeline(dev, "bob@b.example".into(), vec![bob.device], 60).await;
    expect_exactly_once(&mut bob_dev, &ids).await;
    assert!(
        bb.metric_labeled("sealpost_rejects_total", "reason=\"rate_limited\"")
            .await
            >= 1.0
    );
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
}

/// An unreachable destination fills its outbox only up to the quota; then its senders are
/// told to retry later, and other traffic carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_refuses_with_peer_unavailable() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let b = Site::new("b.example", "127.0.0.2"); // never started
    let ba = a.start(&[&b], &["--federation-outbox-quota", "3"]);
    let alice = register(&ba, "alice@a.example").await;
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    for _ in 0..3 {
        let out = dev
            .send_and_wait(eid(), "bob@b.example", &[DeviceId(1)], b"x")
            .await;
        assert_eq!(out, SendOutcome::Accepted { duplicate: false });
    }
    let out = dev
        .send_and_wait(eid(), "bob@b.example", &[DeviceId(1)], b"x")
        .await;
    assert!(matches!(
        out,
        SendOutcome::Rejected {
            code: ErrorCode::PeerUnavailable,
            ..
        }
    ));
    wait_peer(&ba, "b.example", "a full backlog", |p| p["backlog"] == 3).await;
    let mut pair = Pair::connect(&ba, "carol@a.example", "dave@a.example").await;
    pair.round_trip().await;
}

/// A recipient whose mailbox is full holds back only its own envelopes: everyone else's keep
/// flowing, and its own arrive, in order, once it has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_at_the_destination_holds_back_only_its_recipient() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    // One transaction of two envelopes in flight at a time: a stuck head of the stream would
    // show at once.
    let ba = a.start(
        &[&b],
        &["--federation-window", "1", "--federation-batch", "2"],
    );
    let bb = b.start(&[&a], &["--queue-quota", "2"]);
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let bob = register(&bb, "bob@b.example").await;
    let carol = register(&bb, "carol@b.example").await;
    let mut carol_dev = Device::connect(&bb, &carol).await;
    assert!(carol_dev.backlog().await.is_empty());
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    // Bob is offline with room for two: his third envelope is refused as mailbox_full.
    let mut to_bob = Vec::new();
    for n in 0..3 {
        let id = eid();
        let out = dev
            .send_and_wait(id, &bob.user, &[bob.device], &body("alice", "bob", n))
            .await;
        assert_eq!(out, SendOutcome::Accepted { duplicate: false });
        to_bob.push(id);
    }
    // Carol reads as her envelopes arrive.
    let reader = tokio::spawn(async move {
        let got: Vec<EnvelopeId> = collect(&mut carol_dev, 6)
            .await
            .into_iter()
            .map(|(_, id, _)| id)
            .collect();
        got
    });
    let mut to_carol = Vec::new();
    for n in 0..6 {
        let id = eid();
        let out = dev
            .send_and_wait(id, &carol.user, &[carol.device], &body("alice", "carol", n))
            .await;
        assert_eq!(out, SendOutcome::Accepted { duplicate: false });
        to_carol.push(id);
    }
    let got = reader.await.expect("carol's reader");
    assert_eq!(
        got, to_carol,
        "carol's envelopes do not wait for bob's mailbox"
    );
    assert!(ba.metric("sealpost_federation_parked").await >= 1.0);
    // Bob reads his two; his third follows once there is room, in order.
    let mut bob_dev = Device::connect(&bb, &bob).await;
    let got: Vec<EnvelopeId> = collect(&mut bob_dev, 3)
        .await
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(got, to_bob);
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
    assert_eq!(ba.metric("sealpost_federation_parked").await, 0.0);
}

/// An outbox that cannot be read at start (here a record of a version this broker does not
/// know) is never overwritten: sends to its domain are refused until it loads, and local
/// traffic carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_outbox_refuses_sends_instead_of_overwriting_its_entries() {
    use sealpost::store::{Outbox, OutboxRecord};
    // It damages the sled data file under a stopped broker: nothing of the kind on NATS.
    if common::nats_store() {
        return;
    }
    let mut a = Site::new("a.example", "127.0.0.1");
    let b = Site::new("b.example", "127.0.0.2"); // never started
    let mut ba = a.start(&[&b], &[]);
    let alice = register(&ba, "alice@a.example").await;
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    let first = eid();
    let out = dev
        .send_and_wait(first, "bob@b.example", &[DeviceId(1)], b"first")
        .await;
    assert_eq!(out, SendOutcome::Accepted { duplicate: false });
    drop(dev);
    assert!(ba.terminate());
    {
        let store = ba.open_store();
        let unreadable = OutboxRecord {
            version: 99,
            id: [7; 16],
            to: "bob@b.example".into(),
            class: 0,
            accepted_ms: 1,
            expires_ms: u64::MAX,
            copies: vec![(1, serde_bytes::ByteBuf::from(b"x".to_vec()))],
            admission: 0,
            token: None,
            group: None,
        };
        store
            .put("b.example", 2, &unreadable)
            .expect("write")
            .await
            .expect("sync");
    }
    ba.restart();
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    let out = dev
        .send_and_wait(eid(), "bob@b.example", &[DeviceId(1)], b"second")
        .await;
    assert_eq!(
        out,
        SendOutcome::Rejected {
            code: ErrorCode::StoreUnavailable,
            current_devices: vec![],
        }
    );
    let mut pair = Pair::connect(&ba, "carol@a.example", "dave@a.example").await;
    pair.round_trip().await;
    drop((dev, pair));
    assert!(ba.terminate());
    let store = ba.open_store();
    let entries = store.read("b.example", 1, 1).await.expect("read");
    assert_eq!(
        (entries[0].0, entries[0].1.id),
        (1, first.0),
        "the first entry is intact"
    );
    assert!(
        store
            .read("b.example", 3, 10)
            .await
            .expect("read")
            .is_empty(),
        "nothing was added"
    );
}

/// A receiving broker that acknowledges a transaction it was never sent is cut off: the
/// acknowledgement never reaches the peer actor, and nothing leaves the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_of_no_transaction_in_flight_ends_the_link() {
    use sealpost_proto::federation::LinkFrame;
    let mut a = Site::new("a.example", "127.0.0.1");
    let b = Site::new("b.example", "127.0.0.2");
    // A fake b.example that acknowledges every transaction under another id.
    fake_receiver(&b, &a.key, |txn_id, n| {
        Some(LinkFrame::TxnAck {
            txn_id: txn_id + 1000,
            codes: vec![None; n],
        })
    })
    .await;
    let ba = a.start(&[&b], &[]);
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    let out = dev
        .send_and_wait(eid(), "bob@b.example", &[DeviceId(1)], b"x")
        .await;
    assert_eq!(out, SendOutcome::Accepted { duplicate: false });
    wait_peer(&ba, "b.example", "the link cut for a false ack", |p| {
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("acknowledgement of no transaction in flight"))
    })
    .await;
    let view = admin(&ba).await;
    assert_eq!(view["peers"][0]["backlog"], 1, "{view}");
    assert_eq!(view["peers"][0]["delivered"], 0, "{view}");
}

/// Serves `b`'s address as a fake broker of its domain for `a_key`'s domain (a.example): it
/// authenticates properly, answers device lookups with device 1, and answers each
/// transaction with what `on_txn` makes of its id and size (nothing for `None`).
async fn fake_receiver(
    b: &Site,
    a_key: &str,
    on_txn: impl Fn(u64, usize) -> Option<sealpost_proto::federation::LinkFrame> + Send + 'static,
) {
    use sealpost::federation::{identity, link};
    use sealpost_proto::federation::{LinkFrame, RemoteDevice};
    let b_key = identity::ServerKey::load_or_create(
        &b.dir.as_ref().expect("not started").path().join("data"),
    )
    .expect("b's key");
    let a_pub = identity::parse_public_key(a_key).expect("a's key");
    let listener = tokio::net::TcpListener::bind(b.addr).await.expect("bind");
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
            let Some(Ok(Message::Binary(hello))) = ws.next().await else {
                continue;
            };
            let Ok(HandshakeFrame::Hello { noise, .. }) = HandshakeFrame::decode(&hello) else {
                continue;
            };
            let mut hs = link::responder(&b_key, "a.example", "b.example", &a_pub).unwrap();
            let mut buf = [0u8; 256];
            hs.read_message(&noise, &mut buf).expect("a's hello");
            let n = hs.write_message(&[], &mut buf).expect("welcome");
            let welcome = HandshakeFrame::Welcome {
                noise: buf[..n].to_vec(),
            };
            if ws
                .send(Message::Binary(welcome.encode().into()))
                .await
                .is_err()
            {
                continue;
            }
            let mut cipher = link::transport(hs).expect("transport");
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Binary(sealed) = msg else {
                    continue;
                };
                let reply = match LinkFrame::decode(&cipher.open(&sealed).unwrap()).unwrap() {
                    LinkFrame::GetDevices { req_id, .. } => LinkFrame::Devices {
                        req_id,
                        devices: vec![RemoteDevice {
                            device: 1,
                            identity_keys: b"keys".to_vec(),
                        }],
                    },
                    LinkFrame::Txn { txn_id, envelopes } => match on_txn(txn_id, envelopes.len()) {
                        Some(reply) => reply,
                        None => continue,
                    },
                    _ => continue,
                };
                let sealed = cipher.seal(&reply.encode()).unwrap();
                if ws.send(Message::Binary(sealed.into())).await.is_err() {
                    break;
                }
            }
        }
    });
}

/// Ephemeral envelopes for a peer that acknowledges nothing are queued only up to one
/// transaction's worth; the rest are dropped (and counted), as for a device that is offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_envelopes_for_a_stalled_peer_are_bounded() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let b = Site::new("b.example", "127.0.0.2");
    fake_receiver(&b, &a.key, |_, _| None).await;
    let ba = a.start(
        &[&b],
        &["--federation-window", "1", "--federation-batch", "4"],
    );
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    // One goes out in the only transaction the window allows; four wait; the rest are
    // dropped.
    send_ephemerals(&mut dev, "bob@b.example", DeviceId(1), 20).await;
    assert_eq!(ephemerals_dropped(&ba).await, 15.0);
}

/// Sends `n` ephemeral envelopes to `to`'s `device`, each accepted.
async fn send_ephemerals(dev: &mut Device, to: &str, device: DeviceId, n: usize) {
    for _ in 0..n {
        let id = eid();
        dev.send_to(id, to, &[device], Class::Ephemeral, 30, b"typing")
            .await;
        assert_eq!(
            dev.result_for(id).await.0,
            SendOutcome::Accepted { duplicate: false }
        );
    }
}

/// Ephemeral envelopes for b.example that `broker` dropped.
async fn ephemerals_dropped(broker: &Broker) -> f64 {
    broker
        .metric_labeled(
            "sealpost_federation_ephemeral_dropped_total",
            "destination=\"b.example\"",
        )
        .await
}

/// Ephemeral envelopes are never written to the outbox: sent while the peer is down they are
/// answered, dropped and counted, and neither survive in the backlog nor reach the recipient
/// once the link is back (only the durable envelope sent after them does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_envelopes_sent_while_the_link_is_down_are_never_stored() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let mut bb = b.start(&[&a], &[]);
    let bob = register(&bb, "bob@b.example").await;
    assert!(bb.terminate());
    let ba = a.start(&[&b], &[]);
    let alice = register(&ba, "alice@a.example").await;
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    send_ephemerals(&mut dev, &bob.user, bob.device, 5).await;
    assert_eq!(ephemerals_dropped(&ba).await, 5.0);
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
    // The link comes back; a durable envelope sent now is the only thing bob gets.
    bb.restart();
    wait_up(&ba, "b.example").await;
    let marker = eid();
    let outcome = dev
        .send_and_wait(marker, &bob.user, &[bob.device], b"durable")
        .await;
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    let mut bob_dev = Device::connect(&bb, &bob).await;
    let got = collect(&mut bob_dev, 1).await;
    assert_eq!(
        got[0].1, marker,
        "an ephemeral envelope was stored and sent later"
    );
    assert_eq!(got[0].2, b"durable");
}

/// Sends the `n`-th probe (`size` bytes, at least 4) to `to` and returns how long its
/// `send_result` took.
async fn timed_send(dev: &mut Device, id: EnvelopeId, to: &Creds, n: u32, size: usize) -> Duration {
    let started = std::time::Instant::now();
    let mut body = n.to_be_bytes().to_vec();
    body.resize(size.max(4), 0x5a);
    let outcome = dev.send_and_wait(id, &to.user, &[to.device], &body).await;
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    started.elapsed()
}

/// How a peer is cut off in [`sends_keep_flowing_while_the_peer_is_cut_off`].
#[derive(Clone, Copy, Debug)]
enum Cutoff {
    /// `SIGSTOP`: its kernel still accepts bytes, nothing answers.
    Freeze,
    /// nftables drops every packet to and from its listening port: nothing arrives, nothing
    /// is refused.
    Partition,
}

/// nftables rules dropping the traffic of one loopback listener, removed when dropped.
struct Partition {
    table: String,
}

impl Partition {
    /// Drops packets to and from `addr`; `None` where nftables cannot be used here.
    fn start(addr: std::net::SocketAddr) -> Option<Partition> {
        let table = format!("sealpost_test_{}_{}", std::process::id(), addr.port());
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} out {{ type filter hook output priority 0 ; }}\n\
             add rule inet {table} out ip daddr {ip} tcp dport {port} drop\n\
             add rule inet {table} out ip saddr {ip} tcp sport {port} drop\n",
            ip = addr.ip(),
            port = addr.port()
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        use std::io::Write as _;
        child.stdin.take()?.write_all(script.as_bytes()).ok()?;
        child.wait().ok()?.success().then_some(Partition { table })
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// A peer that is frozen or partitioned away must not stall sends to its domain: each is
/// accepted into the outbox within 500 ms at p99 (~20 ms on a quiet machine): a lookup waits
/// at most `federation_lookup_wait_ms`, then the devices known so far are used, and the
/// silent link is declared dead within three keepalives. The admin view answers at once, and
/// once the peer is back everything arrives, once and in order.
async fn sends_keep_flowing_while_the_peer_is_cut_off(cutoff: Cutoff, size: usize) {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let ba = a.start(&[&b], &[]);
    let bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let bob = register(&bb, "bob@b.example").await;
    let mut dev = Device::connect(&ba, &alice).await;
    assert!(dev.backlog().await.is_empty());
    let mut ids = vec![eid()];
    timed_send(&mut dev, ids[0], &bob, 0, size).await;

    let signal = |sig: &str| {
        let status = Command::new("kill")
            .args([sig, &bb.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    let mut partition = None;
    match cutoff {
        Cutoff::Freeze => signal("-STOP"),
        Cutoff::Partition => {
            partition = Partition::start(bb.addr);
            if partition.is_none() {
                eprintln!("skipped: nftables is not usable here (needs root and the nft command)");
                return;
            }
        }
    }
    let cut = std::time::Instant::now();
    let mut took = Vec::new();
    let mut slowest_admin = Duration::ZERO;
    while cut.elapsed() < Duration::from_secs(10) {
        let id = eid();
        took.push(timed_send(&mut dev, id, &bob, ids.len() as u32, size).await);
        ids.push(id);
        if ids.len() % 50 == 0 {
            let asked = std::time::Instant::now();
            admin(&ba).await;
            slowest_admin = slowest_admin.max(asked.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Declared dead: within three keepalives of silence, or, with writes blocked, the write
    // timeout (10 s) after the first write that could not finish.
    wait_peer(&ba, "b.example", "its silent link declared dead", |p| {
        p["link"] != "up"
    })
    .await;
    let noticed = cut.elapsed();
    match cutoff {
        Cutoff::Freeze => signal("-CONT"),
        Cutoff::Partition => drop(partition),
    }
    took.sort_unstable();
    let p99 = took[took.len() * 99 / 100];
    eprintln!(
        "{cutoff:?}, {size} B: {} sends: p50 {:?}, p99 {p99:?}, max {:?}; slowest admin view {slowest_admin:?}; link dead after {noticed:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    // Bounds with room for a busy CI machine (quiet, p99 is ~20 ms); a send held by a lookup
    // to the frozen peer used to wait its full 10 s timeout, and every send behind it too.
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    assert!(
        took[took.len() - 1] < Duration::from_millis(2500),
        "max {:?}",
        took[took.len() - 1]
    );
    assert!(
        slowest_admin < Duration::from_millis(500),
        "{slowest_admin:?}"
    );
    assert!(
        noticed < Duration::from_secs(18),
        "noticed after {noticed:?}"
    );

    wait_up(&ba, "b.example").await;
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
    let mut bob_dev = Device::connect(&bb, &bob).await;
    expect_exactly_once(&mut bob_dev, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_peer_does_not_stall_sends_to_its_domain() {
    sends_keep_flowing_while_the_peer_is_cut_off(Cutoff::Freeze, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_peer_does_not_stall_sends_to_its_domain() {
    sends_keep_flowing_while_the_peer_is_cut_off(Cutoff::Partition, 4).await;
}

/// The sending broker's outbox holds a proof of the recipient's delivery token, never the
/// token: an envelope waiting for a broker that is down leaves nothing in the sender's data
/// directory that a client could use on anyone's `/v1/sealed`; the recipient's broker still
/// admits it once back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sending_brokers_outbox_holds_a_proof_not_the_delivery_token() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let ba = a.start(&[&b], &[]);
    let mut bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    let bob = register(&bb, "bob@b.example").await;
    let token: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(73) ^ 0xc5).collect();
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/v1/accounts/bob@b.example/delivery-token",
            bb.http()
        ))
        .header("authorization", bob.bearer())
        .json(&serde_json::json!({ "token": URL_SAFE_NO_PAD.encode(&token) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    bb.kill9();

    let (mut anon, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/sealed", ba.addr))
        .await
        .unwrap();
    let id = eid();
    let frame = ClientFrame::SealedSend {
        id,
        to: "bob@b.example".into(),
        class: Class::Durable,
        ttl_secs: 3600,
        copies: vec![Copy {
            device: bob.device,
            ciphertext: body("anon", "bob", 1),
        }],
        delivery_token: Some(token.clone()),
    };
    anon.send(Message::Binary(frame.encode().into()))
        .await
        .unwrap();
    let outcome = loop {
        let Some(Ok(Message::Binary(b))) = anon.next().await else {
            panic!("sealed connection ended")
        };
        if let ServerFrame::SendResult { id: got, outcome } = ServerFrame::decode(&b).unwrap() {
            assert_eq!(got, id);
            break outcome;
        }
    };
    // Accepted means durable in the outbox.
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    for form in [
        token.clone(),
        URL_SAFE_NO_PAD.encode(&token).into_bytes(),
        STANDARD.encode(&token).into_bytes(),
    ] {
        assert!(
            !dir_contains(&ba.data_dir(), &form),
            "the sender's data directory holds bob's delivery token"
        );
    }

    bb.restart();
    let mut dev = Device::connect(&bb, &bob).await;
    let got = collect(&mut dev, 1).await;
    assert_eq!(got[0].1, id, "bob's broker admits the proof");
}
