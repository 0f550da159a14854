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
            Broker::start(&[
                "--store",
                &urls,
                "--key-dir",
                &key_dir,
                "--pod-name",
                &format!("pod-{i}"),
            ])
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pod_loses_nothing_acknowledged_and_its_clients_resume_on_another() {
    if !available() {
        return;
    }
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
