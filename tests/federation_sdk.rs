//! Three federated domains, each with its own broker process, driven by the client SDK: users
//! with two devices each write to each other across domains; every device decrypts every
//! message, in order per sender. Clients talk only to their own broker: device lists, key
//! claims and envelopes for remote users travel over the federation links.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::{collections::HashMap, net::TcpListener, process::Command};

use common::{
    Broker,
    sdk::{Dev, link, next},
};
use sealpost_client::{Client, Event, sdk::HoldReason};

/// Starts one broker per domain on 127.0.0.1/2/3, each pinning the others' keys.
fn start(domains: &[(&'static str, &str)]) -> Vec<Broker> {
    plan(domains).into_iter().map(Planned::start).collect()
}

/// A broker to start: its domain, address, data directory and peers.
struct Planned {
    name: &'static str,
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
    peers: String,
}

impl Planned {
    fn start(self) -> Broker {
        Broker::start_with(
            self.dir,
            Some(self.addr),
            &[
                "--domain",
                self.name,
                "--federation-peers",
                &self.peers,
                "--federation-backoff-min-ms",
                "50",
            ],
        )
    }
}

/// One broker per domain, each with an address and a key, pinning the others', not started.
fn plan(domains: &[(&'static str, &str)]) -> Vec<Planned> {
    let mut sites = Vec::new();
    for (name, ip) in domains {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_sealpost"))
            .arg("federation-key")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("federation-key");
        let key = String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_owned();
        let port = TcpListener::bind((*ip, 0))
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().expect("addr");
        sites.push((*name, addr, dir, key));
    }
    let entries: Vec<String> = sites
        .iter()
        .map(|(name, addr, _, key)| format!("{name}=ws://{addr}/v1/federation#{key}"))
        .collect();
    sites
        .into_iter()
        .enumerate()
        .map(|(i, (name, addr, dir, _))| Planned {
            name,
            addr,
            dir,
            peers: entries
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, e)| e.as_str())
                .collect::<Vec<_>>()
                .join(","),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_asked_before_the_peer_was_ever_reached_waits_for_the_link() {
    let mut planned = plan(&[("a.example", "127.0.0.1"), ("b.example", "127.0.0.2")]);
    let b = planned.pop().expect("b");
    let a = planned.pop().expect("a").start();
    // Asked while b.example's broker is not running yet: answered once the link is up
    // (here: no such account there), not refused at once as unavailable.
    let ask = tokio::spawn(reqwest::get(format!(
        "{}/v1/accounts/bob@b.example/device-list",
        a.http()
    )));
    // a.example fails to reach b.example again after the request came in: still waiting.
    let label = "destination=\"b.example\"";
    let failures = a
        .metric_labeled("sealpost_federation_link_failures_total", label)
        .await;
    a.wait_metric_labeled(
        "sealpost_federation_link_failures_total",
        label,
        failures + 2.0,
    )
    .await;
    assert!(
        !ask.is_finished(),
        "answered while the peer was never reached"
    );
    let b = b.start();
    let answer = ask.await.expect("task").expect("answer");
    assert_eq!(answer.status(), 404);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(body["error"], "not_found", "{body}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_domains_decrypt_everything_in_order() {
    let brokers = start(&[
        ("a.example", "127.0.0.1"),
        ("b.example", "127.0.0.2"),
        ("c.example", "127.0.0.3"),
    ]);
    let users = ["alice@a.example", "bob@b.example", "carol@c.example"];
    let mut devices: Vec<Vec<Dev>> = Vec::new();
    for (user, broker) in users.iter().zip(&brokers) {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = Client::register(&broker.http(), user, dir.path(), None)
            .await
            .expect("register");
        let mut first = Dev { client, _dir: dir };
        let second = link(broker, &mut first).await;
        devices.push(vec![first, second]);
    }
    // Round 0: first contact, each user writes to each other user from its first device; the
    // texts go authenticated to the home broker and carry the sender's delivery token. Then
    // every device reads them, and later rounds go sealed over the anonymous endpoint.
    const N: usize = 4;
    let mut next_from: Vec<Vec<HashMap<String, usize>>> =
        vec![vec![HashMap::new(), HashMap::new()]; users.len()];
    for round in 0..N {
        for (i, from) in users.iter().enumerate() {
            for to in users.iter().filter(|u| *u != from) {
                if round > 0 {
                    assert!(devices[i][0].client.sends_sealed_to(to), "{from} -> {to}");
                }
                let text = format!("{from}->{to} #{round}");
                devices[i][0]
                    .client
                    .send_text(to, &text)
                    .await
                    .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            }
        }
        // Every device of every user decrypts this round's texts from the other two users,
        // in order per sender.
        for (j, to) in users.iter().enumerate() {
            for (k, dev) in devices[j].iter_mut().enumerate() {
                let mut received = 0;
                while received < 2 {
                    match next(&mut dev.client).await {
                        Event::Message(m) => {
                            let expected = next_from[j][k].entry(m.from.clone()).or_default();
                            assert_eq!(
                                m.text,
                                format!("{}->{to} #{expected}", m.from),
                                "order of {}'s texts on a device of {to}",
                                m.from
                            );
                            *expected += 1;
                            received += 1;
                        }
                        Event::Rejected { error, .. } => panic!("rejected on {to}: {error}"),
                        _ => {}
                    }
                }
            }
        }
    }
    for per_user in &next_from {
        for per_device in per_user {
            assert_eq!(per_device.len(), 2);
            assert!(per_device.values().all(|n| *n == N));
        }
    }
    for broker in &brokers {
        assert_eq!(
            broker.metric("sealpost_federation_refused_total").await,
            0.0
        );
    }
}

/// A first message whose sender's broker is down when it arrives cannot be verified yet (the
/// sender's device list comes from that broker). It is neither rejected nor left blocking
/// the queue: it is held, others' messages are read meanwhile, and it is read once the
/// sender's broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_a_domain_that_is_down_is_held_until_it_is_back() {
    let mut brokers = start(&[("a.example", "127.0.0.1"), ("b.example", "127.0.0.2")]);
    for (broker, peer) in brokers.iter().zip(["b.example", "a.example"]) {
        let label = format!("destination=\"{peer}\"");
        broker
            .wait_metric_labeled("sealpost_federation_link_up", &label, 1.0)
            .await;
    }
    let mut alice = common::sdk::register(&brokers[0], "alice@a.example").await;
    let mut bob = common::sdk::register(&brokers[1], "bob@b.example").await;
    let mut carol = common::sdk::register(&brokers[1], "carol@b.example").await;
    bob.client
        .set_held_retry(std::time::Duration::from_millis(100));
    alice
        .client
        .send_text("bob@b.example", "while you can")
        .await
        .expect("send");
    brokers[0]
        .wait_metric_labeled(
            "sealpost_federation_delivered_total",
            "destination=\"b.example\"",
            1.0,
        )
        .await;
    brokers[0].kill9();
    // Bob's broker cannot get Alice's list from hers: the envelope is held...
    loop {
        match next(&mut bob.client).await {
            Event::Held {
                user,
                why: HoldReason::SenderUnavailable,
                ..
            } => {
                assert_eq!(user, "alice@a.example");
                break;
            }
            Event::QueueEmpty => {}
            other => panic!("expected the envelope held, got {other:?}"),
        }
    }
    // ... and does not hold up anyone else.
    carol
        .client
        .send_text("bob@b.example", "meanwhile")
        .await
        .expect("send");
    loop {
        match next(&mut bob.client).await {
            Event::Message(m) => {
                assert_eq!(m.text, "meanwhile");
                break;
            }
            // Alice's first contact also carries her delivery token: held behind the text.
            Event::Held { user, .. } if user == "alice@a.example" => {}
            Event::QueueEmpty => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    brokers[0].restart();
    loop {
        match next(&mut bob.client).await {
            Event::Message(m) => {
                assert_eq!(
                    (m.from.as_str(), m.text.as_str()),
                    ("alice@a.example", "while you can")
                );
                break;
            }
            Event::Held { user, .. } if user == "alice@a.example" => {}
            Event::QueueEmpty => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A file sent across domains: uploaded to the sender's broker, announced over the
/// federation link, and fetched by the recipient through its own broker (the sender's broker
/// sees the recipient's broker ask, not the recipient).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_crosses_domains_through_the_recipients_own_broker() {
    let brokers = start(&[("a.example", "127.0.0.1"), ("b.example", "127.0.0.2")]);
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let mut alice = Client::register(&brokers[0].http(), "alice@a.example", dir_a.path(), None)
        .await
        .expect("register");
    let mut bob = Client::register(&brokers[1].http(), "bob@b.example", dir_b.path(), None)
        .await
        .expect("register");
    let files = tempfile::tempdir().expect("tempdir");
    let path = files.path().join("plans.pdf");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&path, &data).expect("write");
    let mut seen = Vec::new();
    alice
        .send_file("bob@b.example", &path, |done, total| {
            seen.push((done, total))
        })
        .await
        .expect("send_file");
    assert_eq!(seen.last().map(|(d, t)| d == t), Some(true), "{seen:?}");
    let file = loop {
        match next(&mut bob).await {
            Event::File { from, file, .. } => {
                assert_eq!(from, "alice@a.example");
                break file;
            }
            _ => continue,
        }
    };
    assert_eq!(
        (file.name.as_str(), file.media_type.as_str()),
        ("plans.pdf", "application/pdf")
    );
    let out = tempfile::tempdir().expect("tempdir");
    let saved = bob
        .save_file(&file, out.path(), |_, _| {})
        .await
        .expect("save_file");
    assert_eq!(std::fs::read(saved).expect("read"), data);
}
