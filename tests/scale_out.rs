//! Many broker pods for one domain over a real 3-node NATS JetStream cluster, all on
//! 127.0.0.1: a send accepted by one pod reaches a socket held by another without polling, a
//! device connecting to a second pod displaces its session on the first, ephemeral envelopes
//! cross pods, and a killed pod loses nothing acknowledged: its clients reconnect elsewhere.

mod common;

use std::{collections::BTreeSet, process::Command};

use common::{
    Broker, Device, WAIT, add_device,
    nats::{NatsCluster, available},
    register, until_close,
};
use sealpost_proto::{Class, CloseCode, DeviceId, EnvelopeId, SendOutcome, ServerFrame};

/// `n` broker pods on `cluster`, sharing one key directory (as a Kubernetes Secret).
fn pods(cluster: &NatsCluster, n: usize) -> (tempfile::TempDir, Vec<Broker>) {
    pods_with(cluster, n, &[])
}

/// [`pods`] with more flags.
fn pods_with(cluster: &NatsCluster, n: usize, more: &[&str]) -> (tempfile::TempDir, Vec<Broker>) {
    let keys = tempfile::tempdir().expect("key dir");
    let made = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .arg("keygen")
        .arg(keys.path())
        .output()
        .expect("sealpost keygen");
    assert!(made.status.success(), "keygen: {made:?}");
    let urls = cluster.urls();
    let key_dir = keys.path().to_str().expect("utf-8 path").to_owned();
    let pods = (0..n)
        .map(|i| {
            let pod = format!("pod-{i}");
            let mut args = vec!["--store", &urls, "--key-dir", &key_dir, "--pod-name", &pod];
            args.extend_from_slice(more);
            Broker::start(&args)
        })
        .collect();
    (keys, pods)
}

fn id(n: u8) -> EnvelopeId {
    EnvelopeId([n; 16])
}

async fn accepted(device: &mut Device, id: EnvelopeId, to: &str, devices: &[DeviceId]) {
    let outcome = device.send_and_wait(id, to, devices, b"hello").await;
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_on_one_pod_reaches_the_socket_on_another_and_a_second_pod_displaces_the_first() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time_async().await;
    let cluster = NatsCluster::start(3);
    let (_keys, pods) = pods(&cluster, 2);
    let (a, b) = (&pods[0], &pods[1]);
    // One directory: an account made through one pod is known to the other.
    let alice = register(a, "alice@test.example").await;
    let bob = register(b, "bob@test.example").await;
    let mut alice_dev = Device::connect(a, &alice).await;
    let mut bob_dev = Device::connect(b, &bob).await;
    assert!(matches!(bob_dev.frame().await, ServerFrame::QueueEmpty));

    // Accepted by pod A (durable in the cluster), pushed by pod B to bob's socket.
    for n in 1..=5 {
        accepted(&mut alice_dev, id(n), &bob.user, &[DeviceId(1)]).await;
    }
    let got = bob_dev.collect(5).await;
    assert_eq!(
        got.iter().map(|(s, e)| (*s, e.id)).collect::<Vec<_>>(),
        (1..=5).map(|n| (u64::from(n), id(n))).collect::<Vec<_>>(),
        "in order, gap-free, across pods"
    );

    // An ephemeral envelope reaches bob's socket on the other pod.
    alice_dev
        .send_to(
            id(9),
            &bob.user,
            &[DeviceId(1)],
            Class::Ephemeral,
            30,
            b"typing",
        )
        .await;
    assert_eq!(
        alice_dev.result_for(id(9)).await.0,
        SendOutcome::Accepted { duplicate: false }
    );
    match bob_dev.frame().await {
        ServerFrame::DeliverEphemeral { envelope } => assert_eq!(envelope.ciphertext, b"typing"),
        other => panic!("expected the ephemeral envelope, got {other:?}"),
    }

    // Bob's device connects to pod A too: its session on pod B closes as displaced. (Once
    // its acks are durable: what is acknowledged but not yet deleted may come again.)
    b.wait_metric("sealpost_acks_durable_total", 5.0).await;
    let mut again = Device::connect(a, &bob).await;
    let (_, close) = tokio::time::timeout(WAIT, until_close(&mut bob_dev.ws))
        .await
        .expect("the older session closed");
    assert_eq!(
        close.map(|(code, _)| code),
        Some(CloseCode::Displaced.as_u16()),
        "displaced across pods"
    );
    accepted(&mut alice_dev, id(6), &bob.user, &[DeviceId(1)]).await;
    let (seq, envelope) = again.collect(1).await.remove(0);
    assert_eq!((seq, envelope.id), (6, id(6)));

    // A one-time session ticket spent at one pod is spent at every pod.
    let ticket = common::Creds {
        token: common::session_ticket(a, &alice).await,
        ..alice.clone()
    };
    let first = Device::try_authenticate(common::connect_raw(a).await, &ticket).await;
    assert!(first.is_ok(), "the ticket logs in once");
    let replayed = Device::try_authenticate(common::connect_raw(b).await, &ticket).await;
    assert!(replayed.is_err(), "and not again, at another pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pod_loses_nothing_acknowledged_and_its_clients_resume_on_another() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time_async().await;
    let cluster = NatsCluster::start(3);
    let (_keys, mut pods) = pods(&cluster, 3);
    let alice = register(&pods[0], "alice@test.example").await;
    let bob = register(&pods[1], "bob@test.example").await;
    let bob2 = add_device(&pods[1], &bob).await;
    let devices = [DeviceId(1), DeviceId(2)];
    // Bob's devices on different pods; alice sends through the pod that will die.
    let mut bob1 = Device::connect(&pods[1], &bob).await;
    let mut bob2_dev = Device::connect(&pods[2], &bob2).await;
    let mut alice_dev = Device::connect(&pods[0], &alice).await;
    let mut sent = Vec::new();
    for n in 1..=20u8 {
        accepted(&mut alice_dev, id(n), &bob.user, &devices).await;
        sent.push(id(n));
    }
    pods[0].kill9();
    // Alice reconnects to another pod and goes on; a retry of her last send is a duplicate.
    let mut alice_dev = Device::connect(&pods[2], &alice).await;
    let retry = alice_dev
        .send_and_wait(id(20), &bob.user, &devices, b"hello")
        .await;
    assert_eq!(retry, SendOutcome::Accepted { duplicate: true });
    for n in 21..=30u8 {
        accepted(&mut alice_dev, id(n), &bob.user, &devices).await;
        sent.push(id(n));
    }
    // Every acknowledged envelope reaches both devices once, in order.
    for dev in [&mut bob1, &mut bob2_dev] {
        let got = dev.collect(sent.len()).await;
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<u64>>());
        assert_eq!(got.iter().map(|(_, e)| e.id).collect::<Vec<_>>(), sent);
    }
    // Nothing comes again once the acks are durable: a fresh session finds the queue empty.
    pods[1]
        .wait_metric("sealpost_acks_durable_total", 30.0)
        .await;
    drop(bob1);
    let mut bob1 = Device::connect(&pods[2], &bob).await;
    let backlog = bob1.backlog().await;
    assert!(
        backlog.is_empty(),
        "nothing delivered again after its ack: {:?}",
        backlog.iter().map(|(s, _)| *s).collect::<BTreeSet<_>>()
    );
}

/// Sends `id` until it is acknowledged: through `pods[*at]`, reconnecting to the next pod when
/// the connection goes, waiting while the store is unavailable (as a client would).
async fn send_until_acknowledged(
    pods: &[Broker],
    alive: &[bool],
    at: &mut usize,
    alice: &common::Creds,
    dev: &mut Option<Device>,
    id: EnvelopeId,
    to: &str,
) {
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "never acknowledged");
        if dev.is_none() {
            while !alive[*at] {
                *at = (*at + 1) % pods.len();
            }
            match common::connect_raw_checked(&pods[*at]).await {
                Some(ws) => *dev = Device::try_authenticate(ws, alice).await.ok(),
                None => *at = (*at + 1) % pods.len(),
            }
            if dev.is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        }
        let d = dev.as_mut().expect("connected");
        let frame = sealpost_proto::ClientFrame::Send {
            id,
            to: to.to_owned(),
            class: Class::Durable,
            ttl_secs: 3600,
            copies: vec![sealpost_proto::Copy {
                device: DeviceId(1),
                ciphertext: b"load".to_vec(),
            }],
        };
        use futures_util::SinkExt;
        let sent =
            d.ws.send(tokio_tungstenite::tungstenite::Message::Binary(
                frame.encode().into(),
            ))
            .await;
        if sent.is_err() {
            *dev = None;
            continue;
        }
        match d.result_or_close(id).await {
            Some(SendOutcome::Accepted { .. }) => return,
            Some(SendOutcome::Rejected { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            None => *dev = None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_a_killed_stream_leader_then_a_killed_pod_lose_nothing_acknowledged() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time_async().await;
    let mut cluster = NatsCluster::start(3);
    let (_keys, mut pods) = pods_with(&cluster, 2, &["--nats-partitions", "1"]);
    let alice = register(&pods[0], "alice@test.example").await;
    let bob = register(&pods[1], "bob@test.example").await;
    let mut bob_dev = Device::connect(&pods[1], &bob).await;
    assert!(matches!(bob_dev.frame().await, ServerFrame::QueueEmpty));
    let receiver = tokio::spawn(async move {
        let mut got: Vec<(u64, EnvelopeId)> = Vec::new();
        while got.len() < 150 {
            let Ok(event) =
                tokio::time::timeout(WAIT / 2, common::next_event(&mut bob_dev.ws)).await
            else {
                break;
            };
            let common::Event::Frame(frame) = event else {
                break;
            };
            match frame {
                ServerFrame::Deliver { seq, envelope } => {
                    bob_dev.ack(vec![seq]).await;
                    got.push((seq, envelope.id));
                }
                ServerFrame::QueueEmpty | ServerFrame::Notice { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        got
    });
    let mut alive = vec![true, true];
    let mut at = 0;
    let mut dev = None;
    let mut failover = None;
    for n in 1..=150u32 {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&n.to_be_bytes());
        let started = std::time::Instant::now();
        send_until_acknowledged(
            &pods,
            &alive,
            &mut at,
            &alice,
            &mut dev,
            EnvelopeId(raw),
            &bob.user,
        )
        .await;
        if n == 51 {
            failover = Some(started.elapsed());
        }
        if n == 50 {
            let leader = cluster
                .stream_leader("SEALPOST_INBOX_0")
                .and_then(|l| cluster.index_of(&l))
                .expect("the inbox stream has a leader");
            cluster.kill9(leader);
        }
        if n == 100 {
            // Alice's pod dies; she goes on through the other one.
            pods[0].kill9();
            alive[0] = false;
        }
    }
    eprintln!("failover: the first send after the stream leader was killed took {failover:?}");
    let got = tokio::time::timeout(3 * WAIT, receiver)
        .await
        .expect("bob got everything")
        .expect("receiver");
    eprintln!(
        "bob got {} envelopes, the last {:?}",
        got.len(),
        got.last().map(|(s, _)| *s)
    );
    if got.len() < 150 {
        let logs = String::from_utf8_lossy(&pods[1].read_logs()).into_owned();
        let tail: String = logs
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n");
        eprintln!("pod-1 warnings:\n{tail}");
    }
    let ids: Vec<EnvelopeId> = got.iter().map(|(_, id)| *id).collect();
    let want: Vec<EnvelopeId> = (1..=150u32)
        .map(|n| {
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&n.to_be_bytes());
            EnvelopeId(raw)
        })
        .collect();
    if let Some(at) = ids.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "envelope {at}: got {:?} (seq {}), wanted {:?}; {} received",
            ids[at],
            got[at].0,
            want[at],
            ids.len()
        );
    }
    assert_eq!(ids, want, "every acknowledged envelope once, in order");
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=150).collect::<Vec<u64>>(), "gap-free");
}

// Run by hand (`cargo test --test scale_out -- --ignored`): on a loaded CI machine the
// recovery after the quorum returns sometimes outlasts the harness's 20 s wait for a frame
// (open; the store-level test in tests/store_nats.rs covers the same refusal and recovery).
#[ignore = "recovery after a lost quorum sometimes outlasts the 20 s frame wait on a busy machine"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_nats_quorum_sends_are_refused_and_delivery_resumes_when_it_returns() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time_async().await;
    let mut cluster = NatsCluster::start(3);
    let (_keys, pods) = pods_with(&cluster, 1, &["--nats-timeout-ms", "1500"]);
    let pod = &pods[0];
    let alice = register(pod, "alice@test.example").await;
    let bob = register(pod, "bob@test.example").await;
    let mut alice_dev = Device::connect(pod, &alice).await;
    let mut bob_dev = Device::connect(pod, &bob).await;
    accepted(&mut alice_dev, id(1), &bob.user, &[DeviceId(1)]).await;
    assert_eq!(bob_dev.collect(1).await[0].1.id, id(1));

    cluster.kill9(0);
    cluster.kill9(1);
    let refused = alice_dev
        .send_and_wait(id(2), &bob.user, &[DeviceId(1)], b"hello")
        .await;
    assert_eq!(
        refused,
        SendOutcome::Rejected {
            code: sealpost_proto::ErrorCode::StoreUnavailable,
            current_devices: vec![]
        },
        "never acknowledged without a quorum"
    );
    let ready = reqwest::get(format!("{}/readyz", pod.http()))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready while writes fail");

    cluster.restart(0);
    cluster.restart(1);
    cluster.wait_healthy();
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    loop {
        match alice_dev
            .send_and_wait(id(2), &bob.user, &[DeviceId(1)], b"hello")
            .await
        {
            SendOutcome::Accepted { .. } => break,
            SendOutcome::Rejected { code, .. } => {
                assert_eq!(code, sealpost_proto::ErrorCode::StoreUnavailable);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "writes never resumed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(bob_dev.collect(1).await[0].1.id, id(2), "delivery resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_of_a_gone_pod_is_taken_over_and_delivered() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time_async().await;
    let cluster = NatsCluster::start(3);
    // The peer domain, on sled, not started yet: what a.test sends it waits in outboxes.
    let mut b_site = common::site::Site::new("b.test", "127.0.0.1");
    let keys = tempfile::tempdir().expect("key dir");
    let a_key = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .arg("keygen")
        .arg(keys.path())
        .output()
        .expect("sealpost keygen");
    let a_key = String::from_utf8(a_key.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    let (urls, key_dir, peer) = (
        cluster.urls(),
        keys.path().to_str().expect("utf-8").to_owned(),
        b_site.peer_entry(),
    );
    let pod = |name: &str| {
        Broker::start(&[
            "--store",
            &urls,
            "--key-dir",
            &key_dir,
            "--pod-name",
            name,
            "--domain",
            "a.test",
            "--federation-peers",
            &peer,
            "--federation-backoff-min-ms",
            "50",
            "--federation-backoff-max-ms",
            "500",
        ])
    };
    let mut gone = pod("pod-0");
    let stays = pod("pod-1");
    let alice = register(&gone, "alice@a.test").await;
    let mut alice_dev = Device::connect(&gone, &alice).await;
    for n in 1..=5 {
        // Accepted into pod-0's outbox, unchecked: b.test cannot be asked.
        accepted(&mut alice_dev, id(n), "bob@b.test", &[DeviceId(1)]).await;
    }
    gone.kill9();
    let a_entry = format!("a.test=ws://{}/v1/federation#{a_key}", stays.addr);
    let b = b_site.start_raw(&a_entry, &[]);
    let bob = register(&b, "bob@b.test").await;
    let mut bob_dev = Device::connect(&b, &bob).await;
    // pod-1 sees pod-0 gone (no heartbeat for 30 s), adopts its outbox and delivers it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut got = Vec::new();
    while got.len() < 5 {
        if tokio::time::Instant::now() > deadline {
            let logs = String::from_utf8_lossy(&stays.read_logs()).into_owned();
            let warnings: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("adopt"))
                .take(20)
                .collect();
            panic!("not all adopted in time: got {got:?}; pod-1 said {warnings:#?}");
        }
        match tokio::time::timeout(WAIT / 2, common::next_event(&mut bob_dev.ws)).await {
            Ok(common::Event::Frame(ServerFrame::Deliver { seq, envelope })) => {
                bob_dev.ack(vec![seq]).await;
                got.push(envelope.id);
            }
            Ok(common::Event::Closed(c)) => panic!("bob's connection closed: {c:?}"),
            _ => {}
        }
    }
    assert_eq!(got, (1..=5).map(id).collect::<Vec<_>>(), "in order, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_senders_on_every_pod_to_recipients_on_every_pod_all_arrive() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time_async().await;
    let cluster = NatsCluster::start(3);
    let (_keys, pods) = pods(&cluster, 3);
    const USERS: usize = 12;
    const EACH: usize = 15;
    let mut users = Vec::new();
    for u in 0..USERS {
        users.push(register(&pods[u % 3], &format!("u{u}@test.example")).await);
    }
    let mut devices = Vec::new();
    for (u, creds) in users.iter().enumerate() {
        devices.push(Device::connect(&pods[u % 3], creds).await);
    }
    // Every user sends EACH envelopes to each of the next three users (so every queue has
    // writers on every pod), all at once.
    let mut tasks = Vec::new();
    for (u, mut dev) in devices.into_iter().enumerate() {
        let targets: Vec<String> = (1..=3)
            .map(|k| users[(u + k) % USERS].user.clone())
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut n = 0u32;
            let mut pending = std::collections::BTreeSet::new();
            for round in 0..EACH {
                for to in &targets {
                    let mut raw = [0u8; 16];
                    raw[0] = u8::try_from(u).unwrap();
                    raw[1..5].copy_from_slice(&n.to_be_bytes());
                    n += 1;
                    dev.send_to(
                        EnvelopeId(raw),
                        to,
                        &[DeviceId(1)],
                        Class::Durable,
                        3600,
                        b"x",
                    )
                    .await;
                    pending.insert(EnvelopeId(raw));
                }
                let _ = round;
            }
            // Read until every result is in and 3 * EACH envelopes arrived.
            let deadline = tokio::time::Instant::now() + 3 * WAIT;
            while !pending.is_empty() || got.len() < 3 * EACH {
                if tokio::time::Instant::now() > deadline {
                    break;
                }
                match tokio::time::timeout(WAIT / 4, common::next_event(&mut dev.ws)).await {
                    Ok(common::Event::Frame(ServerFrame::SendResult { id, outcome })) => {
                        assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
                        pending.remove(&id);
                    }
                    Ok(common::Event::Frame(ServerFrame::Deliver { seq, envelope })) => {
                        dev.ack(vec![seq]).await;
                        got.push((seq, envelope.id));
                    }
                    Ok(common::Event::Frame(_)) => {}
                    Ok(common::Event::Closed(c)) => panic!("user {u} closed: {c:?}"),
                    Err(_) => break,
                }
            }
            (u, got, pending.len())
        }));
    }
    let mut short = Vec::new();
    for t in tasks {
        let (u, got, unanswered) = t.await.expect("task");
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        if got.len() != 3 * EACH || unanswered > 0 {
            short.push((u, got.len(), unanswered, seqs));
        }
    }
    assert!(short.is_empty(), "short: {short:?}");
}
