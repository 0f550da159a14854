//! Storage faults: a failing flush and a nearly full disk refuse sends with a clear error;
//! nothing acknowledged is lost, and the broker recovers when the fault clears.

mod common;

use common::*;
use sealpost_proto::{ErrorCode, SendOutcome};

async fn readyz(broker: &Broker) -> u16 {
    reqwest::get(format!("{}/readyz", broker.http()))
        .await
        .expect("readyz")
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_failing_flush_refuses_the_send_and_a_retry_stores_it_once() {
    let broker = Broker::start(&[]);
    let fail = broker.sync_failpoint();
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let carol = register(&broker, "carol@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut b = Device::connect(&broker, &bob).await;
    assert!(b.backlog().await.is_empty());
    let before = eid();
    assert_eq!(
        a.send_and_wait(before, &bob.user, &[bob.device], b"before")
            .await,
        SendOutcome::Accepted { duplicate: false }
    );

    std::fs::write(&fail, b"").expect("arm failpoint");
    let id = eid();
    assert_eq!(
        a.send_and_wait(id, &bob.user, &[bob.device], b"during")
            .await,
        SendOutcome::Rejected {
            code: ErrorCode::StoreUnavailable,
            current_devices: vec![]
        }
    );
    assert_eq!(readyz(&broker).await, 503, "not ready after a failed flush");
    // A device whose mailbox must start now is told to come back later, not that its
    // credentials are bad: what the store holds may not be durable.
    let mut ws = connect_raw(&broker).await;
    let auth = sealpost_proto::ClientFrame::Auth {
        user: carol.user.clone(),
        device: carol.device,
        token: carol.token.clone(),
    };
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::Binary(auth.encode().into()),
    )
    .await
    .expect("send auth");
    match next_event(&mut ws).await {
        Event::Closed(Some((code, reason))) => {
            assert_eq!(
                code,
                sealpost_proto::CloseCode::GoingAway as u16,
                "{reason}"
            );
        }
        other => panic!("expected a close, got {other:?}"),
    }

    std::fs::remove_file(&fail).expect("disarm failpoint");
    // The client retries with the same id: stored once, delivered once.
    let retry = a
        .send_and_wait(id, &bob.user, &[bob.device], b"during")
        .await;
    assert!(matches!(retry, SendOutcome::Accepted { .. }), "{retry:?}");
    assert_eq!(readyz(&broker).await, 200);
    let (_, first) = b.deliver().await;
    let (_, second) = b.deliver().await;
    assert_eq!((first.id, second.id), (before, id));
    let after = eid();
    assert_eq!(
        a.send_and_wait(after, &bob.user, &[bob.device], b"after")
            .await,
        SendOutcome::Accepted { duplicate: false }
    );
    let (_, third) = b.deliver().await;
    assert_eq!(
        third.id, after,
        "the refused-then-retried envelope came exactly once"
    );
}

#[tokio::test]
async fn a_nearly_full_disk_refuses_new_envelopes_and_accounts() {
    let mut broker = Broker::start(&[]);
    assert_eq!(broker.metric("sealpost_ready").await, 1.0);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let kept = eid();
    a.send_and_wait(kept, &bob.user, &[bob.device], b"kept")
        .await;
    drop(a);

    // Demand more free space than any disk has.
    assert!(broker.terminate());
    broker.restart_with(&["--min-free-disk-mb", "1000000000000"]);
    assert_eq!(readyz(&broker).await, 503);
    assert_eq!(broker.metric("sealpost_ready").await, 0.0);
    assert!(broker.metric("sealpost_disk_free_bytes").await > 0.0);
    let mut a = Device::connect(&broker, &alice).await;
    assert_eq!(
        a.send_and_wait(eid(), &bob.user, &[bob.device], b"refused")
            .await,
        SendOutcome::Rejected {
            code: ErrorCode::StoreUnavailable,
            current_devices: vec![]
        }
    );
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/accounts", broker.http()))
        .json(&serde_json::json!({ "handle": "carol@test.example", "identity_keys": "a2V5cw==" }))
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status(), 503);
    // What was acknowledged before is still delivered.
    let mut b = Device::connect(&broker, &bob).await;
    let backlog = b.backlog().await;
    assert_eq!(
        backlog.iter().map(|(_, e)| e.id).collect::<Vec<_>>(),
        vec![kept]
    );
}
