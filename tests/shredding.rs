//! Nothing of an acknowledged envelope is left in a broker's data directory: real brokers,
//! real devices over WebSocket, local sends and a federated send (authenticated and sealed,
//! with a delivery token), every queue drained and acknowledged, then every file of both
//! brokers' data directories is scanned for any 16-byte window of each ciphertext, each
//! envelope id, and (in the sender's broker) the recipient's delivery token.

mod common;

use std::collections::{BTreeSet, HashMap};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{
    site::{Site, wait_peer, wait_up},
    *,
};
use futures_util::{SinkExt, StreamExt};
use sealpost_proto::{Class, ClientFrame, Copy, DeviceId, SendOutcome, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

/// Which of `secrets` (by name) has any 16-byte window in any file under `dir`.
fn found_in(dir: &std::path::Path, secrets: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut windows: HashMap<&[u8], &str> = HashMap::new();
    for (name, s) in secrets {
        for w in s.windows(16) {
            windows.insert(w, name);
        }
    }
    let mut found = BTreeSet::new();
    for path in sealpost::store::SledStore::data_files(dir) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        for w in bytes.windows(16) {
            if let Some(name) = windows.get(w) {
                found.insert(format!("{name} in {}", path.display()));
            }
        }
    }
    found.into_iter().collect()
}

fn random(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_envelopes_leave_nothing_in_either_data_directory() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let mut ba = a.start(&[&b], &[]);
    let mut bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    wait_up(&bb, "a.example").await;

    let alice = register(&ba, "alice@a.example").await;
    let carol = register(&ba, "carol@a.example").await;
    let bob = register(&bb, "bob@b.example").await;
    let token = random(32);
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/v1/accounts/bob@b.example/delivery-token",
            bb.http()
        ))
        .header("authorization", bob.bearer())
        .json(&serde_json::json!({ "token": URL_SAFE_NO_PAD.encode(&token) }))
        .send()
        .await
        .expect("set delivery token");
    assert_eq!(resp.status(), 204);

    let mut a_secrets: Vec<(String, Vec<u8>)> =
        vec![("bob's delivery token".into(), token.clone())];
    let mut b_secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let mut alice_dev = Device::connect(&ba, &alice).await;
    assert!(alice_dev.backlog().await.is_empty());

    // Local: alice → carol.
    for n in 0..10 {
        let id = eid();
        let body = random(120);
        let out = alice_dev
            .send_and_wait(id, "carol@a.example", &[DeviceId(1)], &body)
            .await;
        assert_eq!(out, SendOutcome::Accepted { duplicate: false });
        a_secrets.push((format!("local ciphertext {n}"), body));
        a_secrets.push((format!("local id {n}"), id.0.to_vec()));
    }
    // Federated, authenticated: alice → bob.
    for n in 0..5 {
        let id = eid();
        let body = random(120);
        let out = alice_dev
            .send_and_wait(id, "bob@b.example", &[DeviceId(1)], &body)
            .await;
        assert_eq!(out, SendOutcome::Accepted { duplicate: false });
        for s in [&mut a_secrets, &mut b_secrets] {
            s.push((format!("federated ciphertext {n}"), body.clone()));
            s.push((format!("federated id {n}"), id.0.to_vec()));
        }
    }
    // Federated, sealed with bob's delivery token.
    let (mut anon, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/sealed", ba.addr))
        .await
        .expect("sealed endpoint");
    for n in 0..5 {
        let id = eid();
        let body = random(120);
        let frame = ClientFrame::SealedSend {
            id,
            to: "bob@b.example".into(),
            class: Class::Durable,
            ttl_secs: 3600,
            copies: vec![Copy {
                device: DeviceId(1),
                ciphertext: body.clone(),
            }],
            delivery_token: Some(token.clone()),
        };
        anon.send(Message::Binary(frame.encode().into()))
            .await
            .expect("send");
        loop {
            let Some(Ok(Message::Binary(bytes))) = anon.next().await else {
                panic!("sealed connection ended")
            };
            if let ServerFrame::SendResult { id: got, outcome } =
                ServerFrame::decode(&bytes).expect("frame")
            {
                assert_eq!(got, id);
                assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
                break;
            }
        }
        for s in [&mut a_secrets, &mut b_secrets] {
            s.push((format!("sealed ciphertext {n}"), body.clone()));
            s.push((format!("sealed id {n}"), id.0.to_vec()));
        }
    }

    // Every queue drained and acknowledged: carol's, bob's, and a.example's outbox to b.
    let mut carol_dev = Device::connect(&ba, &carol).await;
    assert_eq!(carol_dev.collect(10).await.len(), 10);
    let mut bob_dev = Device::connect(&bb, &bob).await;
    assert_eq!(bob_dev.collect(10).await.len(), 10);
    wait_peer(&ba, "b.example", "an empty backlog", |p| p["backlog"] == 0).await;
    // Every ack is durable (the trims are done).
    ba.wait_metric("sealpost_acks_durable_total", 10.0).await;
    bb.wait_metric("sealpost_acks_durable_total", 10.0).await;
    drop((carol_dev, bob_dev, alice_dev, anon));
    assert!(ba.terminate(), "a.example stops cleanly");
    assert!(bb.terminate(), "b.example stops cleanly");

    let left_a = found_in(&ba.data_dir(), &a_secrets);
    let left_b = found_in(&bb.data_dir(), &b_secrets);
    assert!(
        left_a.is_empty() && left_b.is_empty(),
        "left behind after every ack: {left_a:#?} {left_b:#?}"
    );
}
