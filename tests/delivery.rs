#![allow(clippy::cast_possible_truncation)]
//! Delivery contract against a real broker process: online fan-out, offline backlog,
//! idempotent retries, displacement, quota, TTL, stale device sets, ephemeral class.

mod common;

use common::*;
use sealpost_proto::{Class, CloseCode, DeviceId, ErrorCode, Notice, SendOutcome, ServerFrame};

#[tokio::test]
async fn online_delivery_reaches_every_device_in_order() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob1 = register(&broker, "bob@test.example").await;
    let bob2 = add_device(&broker, &bob1).await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut b1 = Device::connect(&broker, &bob1).await;
    let mut b2 = Device::connect(&broker, &bob2).await;
    assert!(b1.backlog().await.is_empty());
    assert!(b2.backlog().await.is_empty());
    let devices = [bob1.device, bob2.device];
    let mut ids = Vec::new();
    for i in 0..20u8 {
        let id = eid();
        ids.push(id);
        assert_eq!(
            a.send_and_wait(id, &bob1.user, &devices, &[i; 32]).await,
            SendOutcome::Accepted { duplicate: false }
        );
    }
    for dev in [&mut b1, &mut b2] {
        let mut seqs = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (seq, env) = dev.deliver().await;
            assert_eq!(env.id, *id);
            assert_eq!(env.ciphertext, vec![i as u8; 32]);
            seqs.push(seq);
        }
        assert_eq!(
            seqs,
            (1..=20).collect::<Vec<u64>>(),
            "gap-free per-device sequence"
        );
        dev.ack(seqs).await;
    }
    broker.wait_metric("sealpost_acks_total", 40.0).await;
}

#[tokio::test]
async fn offline_backlog_then_queue_empty_and_acked_not_redelivered() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    for i in 0..10u8 {
        let outcome = a.send_and_wait(eid(), &bob.user, &[bob.device], &[i]).await;
        assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    }
    let mut b = Device::connect(&broker, &bob).await;
    let backlog = b.backlog().await;
    assert_eq!(backlog.len(), 10);
    let bodies: Vec<u8> = backlog.iter().map(|(_, e)| e.ciphertext[0]).collect();
    assert_eq!(bodies, (0..10).collect::<Vec<u8>>());
    // Ack the first half, reconnect: only the second half comes back, same seqs.
    b.ack(backlog[..5].iter().map(|(s, _)| *s).collect()).await;
    broker.wait_metric("sealpost_acks_total", 5.0).await;
    drop(b);
    let mut b = Device::connect(&broker, &bob).await;
    let again = b.backlog().await;
    let seqs: Vec<u64> = again.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        backlog[5..].iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_retried_send_is_stored_once() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let id = eid();
    assert_eq!(
        a.send_and_wait(id, &bob.user, &[bob.device], b"x").await,
        SendOutcome::Accepted { duplicate: false }
    );
    assert_eq!(
        a.send_and_wait(id, &bob.user, &[bob.device], b"x").await,
        SendOutcome::Accepted { duplicate: true }
    );
    let mut b = Device::connect(&broker, &bob).await;
    assert_eq!(b.backlog().await.len(), 1);
    assert_eq!(broker.metric("sealpost_appends_total").await, 1.0);
}

#[tokio::test]
async fn a_retry_gets_the_first_answer_even_after_the_devices_changed() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let id = eid();
    assert_eq!(
        a.send_and_wait(id, &bob.user, &[bob.device], b"x").await,
        SendOutcome::Accepted { duplicate: false }
    );
    // Bob links a second device; Alice, who never saw the answer, retries.
    let bob2 = add_device(&broker, &bob).await;
    assert_eq!(
        a.send_and_wait(id, &bob.user, &[bob.device], b"x").await,
        SendOutcome::Accepted { duplicate: true },
        "an accepted send is not refused as stale on retry"
    );
    // A new send to the old set is refused with the current list.
    match a.send_and_wait(eid(), &bob.user, &[bob.device], b"y").await {
        SendOutcome::Rejected {
            code: ErrorCode::StaleDevices,
            current_devices,
        } => assert_eq!(current_devices, vec![bob.device, bob2.device]),
        other => panic!("unexpected {other:?}"),
    }
    let mut b = Device::connect(&broker, &bob).await;
    assert_eq!(b.backlog().await.len(), 1);
}

#[tokio::test]
async fn a_second_connection_displaces_the_first() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let mut first = Device::connect(&broker, &bob).await;
    assert!(first.backlog().await.is_empty());
    let mut second = Device::connect(&broker, &bob).await;
    assert!(second.backlog().await.is_empty());
    match first.next().await {
        Event::Closed(Some((code, reason))) => {
            assert_eq!(code, CloseCode::Displaced.as_u16());
            assert_eq!(reason, "displaced");
        }
        other => panic!("expected displaced close, got {other:?}"),
    }
}

#[tokio::test]
async fn quota_refuses_with_mailbox_full_and_notifies_the_recipient() {
    let broker = Broker::start(&["--queue-quota", "3"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut b = Device::connect(&broker, &bob).await;
    assert!(b.backlog().await.is_empty());
    for _ in 0..3 {
        let outcome = a.send_and_wait(eid(), &bob.user, &[bob.device], b"m").await;
        assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    }
    let outcome = a.send_and_wait(eid(), &bob.user, &[bob.device], b"m").await;
    assert_eq!(
        outcome,
        SendOutcome::Rejected {
            code: ErrorCode::MailboxFull,
            current_devices: vec![]
        }
    );
    // The recipient sees its 3 envelopes, then the notice; nothing was dropped.
    let mut seqs = Vec::new();
    loop {
        match b.frame().await {
            ServerFrame::Deliver { seq, .. } => seqs.push(seq),
            ServerFrame::Notice {
                notice: Notice::MailboxFull,
                device,
            } => {
                assert_eq!(device, bob.device);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs, vec![1, 2, 3]);
    // Draining makes room again.
    b.ack(seqs).await;
    broker.wait_metric("sealpost_acks_total", 3.0).await;
    let outcome = a.send_and_wait(eid(), &bob.user, &[bob.device], b"m").await;
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
}

#[tokio::test]
async fn expired_envelopes_are_deleted() {
    let broker = Broker::start(&["--expiry-sweep-ms", "50"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let ring = eid();
    a.send_to(ring, &bob.user, &[bob.device], Class::Urgent, 1, b"ring")
        .await;
    assert_eq!(
        a.result_for(ring).await.0,
        SendOutcome::Accepted { duplicate: false }
    );
    let keep = eid();
    a.send_to(
        keep,
        &bob.user,
        &[bob.device],
        Class::Durable,
        3600,
        b"keep",
    )
    .await;
    assert_eq!(
        a.result_for(keep).await.0,
        SendOutcome::Accepted { duplicate: false }
    );
    // Expired by the broker's sweep (sled) or by the stream's TTL (NATS): a fresh session
    // finds only what has not expired.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let backlog = loop {
        let mut b = Device::connect(&broker, &bob).await;
        let backlog = b.backlog().await;
        if backlog.len() == 1 {
            break backlog;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ring never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(backlog[0].1.id, keep);
    assert_eq!(
        backlog[0].0, 2,
        "sequence numbers are not reused after expiry"
    );
}

#[tokio::test]
async fn stale_device_set_is_refused_with_the_current_list() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob1 = register(&broker, "bob@test.example").await;
    let bob2 = add_device(&broker, &bob1).await;
    let mut a = Device::connect(&broker, &alice).await;
    let outcome = a
        .send_and_wait(eid(), &bob1.user, &[bob1.device], b"x")
        .await;
    assert_eq!(
        outcome,
        SendOutcome::Rejected {
            code: ErrorCode::StaleDevices,
            current_devices: vec![bob1.device, bob2.device]
        }
    );
    // A device named that does not exist is also stale.
    let outcome = a
        .send_and_wait(
            eid(),
            &bob1.user,
            &[bob1.device, bob2.device, DeviceId(9)],
            b"x",
        )
        .await;
    assert!(matches!(
        outcome,
        SendOutcome::Rejected {
            code: ErrorCode::StaleDevices,
            ..
        }
    ));
    // After removing a device the list shrinks and its token stops working.
    assert_eq!(remove_device(&broker, &bob1, bob2.device).await, 204);
    let outcome = a
        .send_and_wait(eid(), &bob1.user, &[bob1.device], b"x")
        .await;
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    let mut raw = connect_raw(&broker).await;
    let auth = sealpost_proto::ClientFrame::Auth {
        user: bob2.user.clone(),
        device: bob2.device,
        token: bob2.token.clone(),
    };
    futures_util::SinkExt::send(&mut raw, auth.encode().into())
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut raw).await,
        Event::Frame(ServerFrame::Error {
            code: ErrorCode::BadToken,
            ..
        })
    ));
}

#[tokio::test]
async fn ephemeral_reaches_connected_devices_and_never_touches_disk() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob1 = register(&broker, "bob@test.example").await;
    let bob2 = add_device(&broker, &bob1).await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut b1 = Device::connect(&broker, &bob1).await;
    assert!(b1.backlog().await.is_empty());
    let canary = b"EPHEMERAL-CANARY-7f3a9c1e-typing";
    let id = eid();
    a.send_to(
        id,
        &bob1.user,
        &[bob1.device, bob2.device],
        Class::Ephemeral,
        10,
        canary,
    )
    .await;
    assert_eq!(
        a.result_for(id).await.0,
        SendOutcome::Accepted { duplicate: false }
    );
    match b1.frame().await {
        ServerFrame::DeliverEphemeral { envelope } => assert_eq!(envelope.ciphertext, canary),
        other => panic!("expected ephemeral delivery, got {other:?}"),
    }
    // A durable send afterwards forces a flush; the ephemeral bytes are still nowhere on disk.
    let durable = a
        .send_and_wait(eid(), &bob1.user, &[bob1.device, bob2.device], b"d")
        .await;
    assert_eq!(durable, SendOutcome::Accepted { duplicate: false });
    // The offline device gets only the durable one.
    let mut b2 = Device::connect(&broker, &bob2).await;
    let backlog = b2.backlog().await;
    assert_eq!(backlog.len(), 1);
    assert_eq!(backlog[0].1.ciphertext, b"d");
    assert!(
        !dir_contains(&broker.data_dir(), canary),
        "ephemeral envelope written to disk"
    );
}

/// Waits until the gauge `name` reads exactly `value`.
async fn wait_gauge(broker: &Broker, name: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = broker.metric(name).await;
        if now == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {now}, not {value}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_device_that_stops_acking_is_disconnected_and_resumes_from_the_store() {
    let broker = Broker::start(&["--delivery-window", "4", "--ack-timeout-ms", "300"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut sent = Vec::new();
    for n in 0..10u8 {
        let id = eid();
        a.send_and_wait(id, &bob.user, &[bob.device], &[n]).await;
        sent.push(id);
    }
    // Bob reads but never acks: no more than the window is pushed, then he is closed.
    let mut b = Device::connect(&broker, &bob).await;
    let mut pushed = Vec::new();
    let close = loop {
        match b.next().await {
            Event::Frame(ServerFrame::Deliver { seq, envelope }) => pushed.push((seq, envelope.id)),
            Event::Frame(other) => panic!("unexpected {other:?}"),
            Event::Closed(close) => break close,
        }
    };
    assert_eq!(
        close.map(|(code, _)| code),
        Some(CloseCode::SlowConsumer as u16)
    );
    assert_eq!(
        pushed.len(),
        4,
        "the in-flight window bounds what is pushed"
    );
    // Counted as the session ends, which may be just after the close frame left.
    broker
        .wait_metric_labeled(
            "sealpost_disconnects_total",
            "reason=\"slow_consumer\"",
            1.0,
        )
        .await;
    // Reconnecting resumes from the store: everything in order, the unacknowledged four
    // again under their sequence numbers.
    let mut b = Device::connect(&broker, &bob).await;
    let got = b.drain().await;
    assert_eq!(got[..4], pushed[..]);
    assert_eq!(got.iter().map(|(_, id)| *id).collect::<Vec<_>>(), sent);
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u64>>()
    );
}

#[tokio::test]
async fn a_device_that_stops_reading_is_dropped_and_resumes_from_the_store() {
    // The client timeout also bounds how long one write may wait for the device to read.
    let broker = Broker::start(&[
        "--client-timeout-ms",
        "1500",
        "--heartbeat-ms",
        "500",
        "--delivery-window",
        "1024",
    ]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    // 12 MB waiting for Bob: far more than the socket buffers hold for a reader that reads
    // nothing with a 4 KiB receive buffer.
    let mut sent = Vec::new();
    for n in 0..200u8 {
        let id = eid();
        a.send_and_wait(id, &bob.user, &[bob.device], &[n; 60 * 1024])
            .await;
        sent.push(id);
    }
    // Alice goes too: a connection this test does not read while it waits below would miss
    // the broker's pings and be closed for silence as well, sooner or later on a busy machine.
    drop(a);
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(broker.addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(
        broker.ws_url(),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("handshake");
    let stalled = Device::authenticate(ws, &bob).await;
    // Bob reads nothing more. The broker's writes to him stall; it gives up on the connection
    // instead of holding its session and outbox forever.
    broker
        .wait_metric_labeled(
            "sealpost_disconnects_total",
            "reason=\"write_stalled\"",
            1.0,
        )
        .await;
    wait_gauge(&broker, "sealpost_websocket_sessions", 0.0).await;
    // Everyone else is still served, and nothing of Bob's was lost.
    let mut a = Device::connect(&broker, &alice).await;
    assert!(a.backlog().await.is_empty());
    let id = eid();
    a.send_and_wait(id, &bob.user, &[bob.device], b"still here")
        .await;
    sent.push(id);
    drop(stalled);
    let mut b = Device::connect(&broker, &bob).await;
    let got = b.drain().await;
    assert_eq!(got.iter().map(|(_, id)| *id).collect::<Vec<_>>(), sent);
}

#[tokio::test]
async fn idle_mailboxes_stop_and_start_again_when_needed() {
    let broker = Broker::start(&["--mailbox-idle-ms", "200"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    assert!(a.backlog().await.is_empty());
    for n in 0..3u8 {
        a.send_and_wait(eid(), &bob.user, &[bob.device], &[n]).await;
    }
    // Bob is offline: his mailbox stops once idle; Alice's stays while she is connected.
    wait_gauge(&broker, "sealpost_mailboxes", 1.0).await;
    drop(a);
    wait_gauge(&broker, "sealpost_mailboxes", 0.0).await;
    // Both start again on demand, from the store.
    let mut b = Device::connect(&broker, &bob).await;
    let got = b.drain().await;
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let mut a = Device::connect(&broker, &alice).await;
    a.send_and_wait(eid(), &bob.user, &[bob.device], b"again")
        .await;
    let (seq, _) = b.deliver().await;
    assert_eq!(
        seq, 4,
        "sequence numbers continue after the mailbox restarts"
    );
    wait_gauge(&broker, "sealpost_mailboxes", 2.0).await;
}

#[tokio::test]
async fn a_client_that_closes_gets_the_closing_handshake() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    assert!(a.backlog().await.is_empty());
    a.ws.close(None).await.expect("send close");
    // The broker answers the close frame with its own before the connection ends.
    let answer = tokio::time::timeout(WAIT, a.ws.next())
        .await
        .expect("an answer in time");
    assert!(
        matches!(answer, Some(Ok(Message::Close(_)))),
        "got {answer:?}"
    );
    // Not counted as a disconnect by the broker: the client chose it. Read once the session
    // has ended (and would have counted), so that a late count cannot pass unseen.
    drop(a);
    wait_gauge(&broker, "sealpost_websocket_sessions", 0.0).await;
    wait_gauge(&broker, "sealpost_connections", 0.0).await;
    assert_eq!(broker.metric("sealpost_disconnects_total").await, 0.0);
    // The counter does count a close the broker decides on: the test can see one.
    let mut raw = connect_raw(&broker).await;
    raw.send(Message::Text("not binary".into())).await.unwrap();
    let _ = until_close(&mut raw).await;
    wait_gauge(&broker, "sealpost_websocket_sessions", 0.0).await;
    assert_eq!(broker.metric("sealpost_disconnects_total").await, 1.0);
}

/// Connects `user`'s device asking for batches and reads its backlog: the WebSocket messages
/// it came in, and the sequence numbers of its deliveries.
async fn batched_backlog(broker: &Broker, user: &Creds) -> (usize, Vec<u64>) {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;

    let (ws, _) = tokio_tungstenite::connect_async(format!("{}?batch=1", broker.ws_url()))
        .await
        .expect("connect");
    let mut device = Device::authenticate(ws, user).await;
    let (mut messages, mut frames) = (0, Vec::new());
    while !frames.contains(&ServerFrame::QueueEmpty) {
        let bytes = match tokio::time::timeout(WAIT, device.ws.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => bytes,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no backlog: {other:?}"),
        };
        messages += 1;
        frames.extend(ServerFrame::decode_all(&bytes).expect("frames decode"));
    }
    let seqs = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Deliver { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    (messages, seqs)
}

/// A device that asks for batches (`/v1/ws?batch=1`) gets its backlog in a few `batch`
/// messages, every frame in order; one that does not gets one frame per message, as before.
#[tokio::test]
async fn a_backlog_comes_in_batches_to_a_client_that_asks_for_them() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let carol = register(&broker, "carol@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    for i in 0..200u8 {
        a.send_and_wait(eid(), &bob.user, &[bob.device], &[i]).await;
    }
    for i in 0..20u8 {
        let large = vec![i; 60 * 1024];
        a.send_and_wait(eid(), &carol.user, &[carol.device], &large)
            .await;
    }

    let (messages, seqs) = batched_backlog(&broker, &bob).await;
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<u64>>(),
        "every frame, in order"
    );
    // The mailbox pushes a page of the backlog at once (corked): however slow the machine,
    // the session finds it all queued.
    assert!(messages <= 2, "200 deliveries came in {messages} messages");

    // Large frames: four fit in a batch's 256 KiB, and the one that does not starts the
    // next batch (not a message of its own).
    let (messages, seqs) = batched_backlog(&broker, &carol).await;
    assert_eq!(
        seqs,
        (1..=20).collect::<Vec<u64>>(),
        "every frame, in order"
    );
    assert!(
        messages <= 6,
        "20 large deliveries came in {messages} messages"
    );

    // Without asking: one frame per message (the helper decodes each with `decode`).
    let mut old = Device::connect(&broker, &bob).await;
    assert_eq!(old.backlog().await.len(), 200);
}
