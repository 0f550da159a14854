//! Call signaling through a real broker with SDK clients: an offer rings every device of the
//! callee (also one that connects while it rings), answering on one stops the others, ICE and
//! hang-up reach the right peer, and the broker's files and logs hold no SDP or candidate.

mod common;

use std::time::Duration;

use common::{
    Broker,
    sdk::{link, next, register},
};
use sealpost_client::{CallSignal, Client, Event, crypto::Payload};

/// The next call signal, skipping notices; panics on a rejected envelope.
async fn next_call(client: &mut Client) -> CallSignal {
    loop {
        match next(client).await {
            Event::Call(signal) => return signal,
            Event::Rejected { error, .. } => panic!("rejected: {error}"),
            _ => {}
        }
    }
}

const ALICE: &str = "alice@test.example";
const BOB: &str = "bob@test.example";
const OFFER_SDP: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=canary-offer-sdp\r\n";
const ANSWER_SDP: &str = "v=0\r\no=- 3 4 IN IP4 127.0.0.1\r\ns=canary-answer-sdp\r\n";
const CANDIDATE: &str = "candidate:842163049 1 udp 1677729535 198.51.100.77 53705 typ srflx";
const ALICE_FP: &str = "sha-256 AA:11:22:33";
const BOB_FP: &str = "sha-256 BB:44:55:66";

#[tokio::test]
async fn an_offer_rings_every_device_and_answering_on_one_stops_the_others() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, ALICE).await;
    let mut bob1 = register(&broker, BOB).await;
    let mut bob2 = link(&broker, &mut bob1).await;
    let call_id = [7u8; 16];

    alice
        .client
        .send_call_signal(
            BOB,
            Payload::CallOffer {
                call_id,
                sdp: OFFER_SDP.into(),
                dtls_fingerprint: ALICE_FP.into(),
                video: true,
            },
        )
        .await
        .expect("offer");
    // Both of Bob's devices ring, with the offer from Alice's verified device.
    for bob in [&mut bob1, &mut bob2] {
        let ring = next_call(&mut bob.client).await;
        assert_eq!(ring.from, ALICE);
        assert_eq!(ring.device, alice.client.device_id());
        assert_eq!(
            ring.payload,
            Payload::CallOffer {
                call_id,
                sdp: OFFER_SDP.into(),
                dtls_fingerprint: ALICE_FP.into(),
                video: true,
            }
        );
    }

    // Bob answers on device 1: Alice gets the answer, device 2 stops ringing.
    bob1.client
        .answer_call(ALICE, call_id, ANSWER_SDP.into(), BOB_FP.into())
        .await
        .expect("answer");
    let answer = next_call(&mut alice.client).await;
    assert_eq!(answer.from, BOB);
    assert_eq!(answer.device, bob1.client.device_id());
    assert_eq!(
        answer.payload,
        Payload::CallAnswer {
            call_id,
            sdp: ANSWER_SDP.into(),
            dtls_fingerprint: BOB_FP.into(),
        }
    );
    let elsewhere = next_call(&mut bob2.client).await;
    assert_eq!(elsewhere.from, BOB);
    assert_eq!(
        elsewhere.payload,
        Payload::AnsweredElsewhere {
            call_id,
            device: bob1.client.device_id(),
        }
    );

    // Trickle ICE and hang-up.
    let candidate = Payload::IceCandidate {
        call_id,
        candidate: CANDIDATE.into(),
        sdp_mid: "0".into(),
        sdp_m_line_index: 0,
    };
    alice
        .client
        .send_call_signal(BOB, candidate.clone())
        .await
        .expect("candidate");
    assert_eq!(next_call(&mut bob1.client).await.payload, candidate);
    bob1.client
        .send_call_signal(ALICE, Payload::HangUp { call_id })
        .await
        .expect("hang up");
    assert_eq!(
        next_call(&mut alice.client).await.payload,
        Payload::HangUp { call_id }
    );
    // Device 2 also saw the candidate (it is sent to all devices) and ignores it by call id.
    assert_eq!(next_call(&mut bob2.client).await.payload, candidate);

    // Not a call kind: refused before anything is sent.
    assert!(
        alice
            .client
            .send_call_signal(
                BOB,
                Payload::Text {
                    body: "x".into(),
                    link: None
                }
            )
            .await
            .is_err()
    );

    // The broker holds no SDP, candidate or fingerprint, in its files or its logs.
    let dir = broker.data_dir();
    let logs = broker.read_logs();
    for canary in [
        "canary-offer-sdp",
        "canary-answer-sdp",
        "198.51.100.77",
        "AA:11:22:33",
        "BB:44:55:66",
    ] {
        assert!(
            !common::dir_contains(&dir, canary.as_bytes()),
            "{canary} in data dir"
        );
        assert!(
            !logs.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "{canary} in logs"
        );
    }
}

#[tokio::test]
async fn a_device_that_connects_while_the_call_rings_still_rings() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, ALICE).await;
    let bob = register(&broker, BOB).await;
    let bob_dir = bob._dir;
    // Bob's device is offline when Alice calls (a fresh contact: the first signal carries
    // Alice's delivery token, in its own envelope).
    bob.client.close().await;
    let call_id = [9u8; 16];
    alice
        .client
        .send_call_signal(
            BOB,
            Payload::CallOffer {
                call_id,
                sdp: OFFER_SDP.into(),
                dtls_fingerprint: ALICE_FP.into(),
                video: false,
            },
        )
        .await
        .expect("offer");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Bob's device wakes within the ring time: the urgent envelope is still queued.
    let mut bob = Client::open(bob_dir.path()).await.expect("open");
    let ring = next_call(&mut bob).await;
    assert!(
        matches!(ring.payload, Payload::CallOffer { call_id: id, video: false, .. } if id == call_id)
    );
    assert!(ring.sent_ms > 0);
    // Busy, back to Alice (sealed now: Bob holds Alice's token).
    assert!(bob.sends_sealed_to(ALICE));
    bob.send_call_signal(ALICE, Payload::Busy { call_id })
        .await
        .expect("busy");
    assert_eq!(
        next_call(&mut alice.client).await.payload,
        Payload::Busy { call_id }
    );
}
