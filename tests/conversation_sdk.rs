//! Receipts, typing and disappearing messages through a real broker process, driven by the
//! client SDK: the states a sent message goes through, a typing indicator on the ephemeral
//! class, and a disappearing-messages timer honoured (and run) by both sides.

mod common;

use std::time::Duration;

use common::{
    Broker,
    sdk::{next, register},
};
use sealpost_client::{Client, Event, sdk::MessageState};
use sealpost_proto::EnvelopeId;

const ALICE: &str = "alice@test.example";
const BOB: &str = "bob@test.example";

/// Reads events until `pick` returns something (other events are skipped; a rejection
/// fails the test).
async fn wait_for<T>(client: &mut Client, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    loop {
        let event = next(client).await;
        if let Event::Rejected { error, .. } = &event {
            panic!("rejected: {error}");
        }
        if let Some(found) = pick(&event) {
            return found;
        }
    }
}

/// The state of the message `id` in `client`'s conversation with `peer`.
fn state_of(client: &Client, peer: &str, id: EnvelopeId) -> Option<MessageState> {
    client
        .conversations()
        .into_iter()
        .find(|c| c.with == peer)?
        .messages
        .into_iter()
        .find(|m| m.id == Some(id))
        .map(|m| m.state)
}

#[tokio::test]
async fn receipts_typing_and_disappearing_messages_between_two_accounts() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, ALICE).await;
    let mut bob = register(&broker, BOB).await;
    // Receipts at once (by default they wait a random 2 to 15 s).
    for dev in [&mut alice, &mut bob] {
        dev.client.set_receipt_delay(Duration::ZERO, Duration::ZERO);
    }

    // Sent → delivered → read, each by an end-to-end encrypted receipt.
    let id = alice.client.send_text(BOB, "hello").await.expect("send");
    assert_eq!(state_of(&alice.client, BOB, id), Some(MessageState::Sent));
    let got = wait_for(&mut bob.client, |e| match e {
        Event::Message(m) => Some(m.id),
        _ => None,
    })
    .await;
    assert_eq!(got, id, "the same id on both sides");
    let delivered = |state| {
        move |e: &Event| match e {
            Event::Receipt {
                peer,
                ids,
                state: s,
            } if *s == state => {
                assert_eq!(peer, BOB);
                Some(ids.clone())
            }
            _ => None,
        }
    };
    assert_eq!(
        wait_for(&mut alice.client, delivered(MessageState::Delivered)).await,
        [id]
    );
    assert_eq!(bob.client.conversations()[0].unread, 1);
    assert_eq!(bob.client.mark_read(ALICE).await.expect("read"), [id]);
    assert_eq!(
        wait_for(&mut alice.client, delivered(MessageState::Read)).await,
        [id]
    );
    assert_eq!(state_of(&alice.client, BOB, id), Some(MessageState::Read));

    // Typing: delivered to a connected device, stored nowhere.
    bob.client.send_typing(ALICE, true).await.expect("typing");
    let on = wait_for(&mut alice.client, |e| match e {
        Event::Typing { peer, on, .. } if peer == BOB => Some(*on),
        _ => None,
    })
    .await;
    assert!(on);
    assert_eq!(alice.client.conversations()[0].messages.len(), 1);

    // Alice sets a 30 s timer; Bob's device honours it, and both delete the message after it.
    alice
        .client
        .set_disappearing(BOB, Some(Duration::from_secs(30)))
        .await
        .expect("timer");
    let secs = wait_for(&mut bob.client, |e| match e {
        Event::Disappearing { peer, by, secs } if peer == ALICE && by == ALICE => Some(*secs),
        _ => None,
    })
    .await;
    assert_eq!(secs, Some(30));
    assert_eq!(
        bob.client.disappearing(ALICE),
        Some(Duration::from_secs(30))
    );
    let secret = alice.client.send_text(BOB, "secret").await.expect("send");
    wait_for(&mut bob.client, |e| match e {
        Event::Message(m) if m.id == secret => Some(()),
        _ => None,
    })
    .await;
    let stored = bob.client.conversations()[0]
        .messages
        .iter()
        .find(|m| m.id == Some(secret))
        .and_then(|m| m.expires_ms);
    assert!(stored.is_some(), "it will disappear");
    for client in [&mut bob.client, &mut alice.client] {
        // Nothing else arrives meanwhile: `next_event` returns when its expiry job runs.
        let expired = tokio::time::timeout(Duration::from_secs(45), async {
            loop {
                match client.next_event().await.expect("next_event") {
                    Event::Expired { ids, .. } if ids.contains(&secret) => break,
                    Event::Rejected { error, .. } => panic!("rejected: {error}"),
                    _ => {}
                }
            }
        })
        .await;
        assert!(expired.is_ok(), "the message did not disappear");
        assert!(
            client
                .conversations()
                .iter()
                .flat_map(|c| &c.messages)
                .all(|m| m.id != Some(secret)),
            "gone from the stored conversation"
        );
    }
    // The earlier message, sent before the timer, stays.
    assert_eq!(state_of(&alice.client, BOB, id), Some(MessageState::Read));
}
