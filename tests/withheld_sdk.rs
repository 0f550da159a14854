//! End-to-end detection of a withheld message, through a real broker process that drops one
//! envelope (a test-only hook of debug builds) while answering its sender that it took it:
//! the recipient's client says a message may be missing, and does not when nothing was
//! dropped.

mod common;

use common::{
    Broker,
    sdk::{next, register, run_with_big_stacks},
};
use sealpost_client::{Client, Event, engine::GroupEvent};

const ALICE: &str = "alice@test.example";
const BOB: &str = "bob@test.example";

/// Reads events until the text `text` arrives; returns every event seen on the way.
async fn until_text(client: &mut Client, text: &str) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = next(client).await;
        if let Event::Rejected { error, .. } = &event {
            panic!("rejected: {error}");
        }
        let done = matches!(&event, Event::Message(m) if m.text == text);
        seen.push(event);
        if done {
            // What the same envelope produced comes right behind it.
            return seen;
        }
    }
}

fn missing(events: &[Event]) -> Option<usize> {
    events.iter().rev().find_map(|e| match e {
        Event::MaybeMissing { peer, count } if peer == ALICE => Some(*count),
        _ => None,
    })
}

#[tokio::test]
async fn a_withheld_message_is_noticed_by_the_recipient_and_nothing_else_looks_missing() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, ALICE).await;
    let mut bob = register(&broker, BOB).await;

    // Loss-free: nothing is missing. (A redelivered envelope has the id of the first
    // delivery, which the engine sets aside before chains are looked at; the engine's unit
    // tests deliver one twice.)
    for text in ["one", "two", "three"] {
        alice.client.send_text(BOB, text).await.expect("send");
        let events = until_text(&mut bob.client, text).await;
        assert_eq!(missing(&events), None, "{events:?}");
        assert_eq!(missing_now(&bob.client), 0);
    }

    // The broker answers "four" as taken and drops it; "five" names it.
    broker.withhold_next();
    alice.client.send_text(BOB, "four").await.expect("send");
    assert!(broker.withheld(), "the hook took the send");
    alice.client.send_text(BOB, "five").await.expect("send");
    let events = until_text(&mut bob.client, "five").await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Message(m) if m.text == "four")),
        "four never arrived"
    );
    // The envelope that brought "five" also says one message from Alice may be missing.
    let said = next(&mut bob.client).await;
    assert!(
        matches!(&said, Event::MaybeMissing { peer, count: 1 } if peer == ALICE),
        "{said:?}"
    );
    assert_eq!(missing_now(&bob.client), 1);
}

/// How many messages from Alice the conversation says may be missing.
fn missing_now(client: &Client) -> usize {
    client
        .conversations()
        .into_iter()
        .find(|c| c.with == ALICE)
        .map_or(0, |c| c.missing)
}

/// Reads bob's events until `text` arrives in a group; returns what came on the way.
async fn until_group_text(client: &mut Client, text: &str) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = next(client).await;
        let done = matches!(&event, Event::Group(GroupEvent::Message { text: t, .. }) if t == text);
        seen.push(event);
        if done {
            return seen;
        }
    }
}

fn group_missing(events: &[Event]) -> Option<usize> {
    events.iter().rev().find_map(|e| match e {
        Event::Group(GroupEvent::MaybeMissing { from, count, .. }) if from == ALICE => Some(*count),
        _ => None,
    })
}

#[test]
fn a_withheld_group_text_is_noticed_by_the_other_members_and_nothing_else_looks_missing() {
    run_with_big_stacks(async {
        let broker = Broker::start(&[]);
        let mut alice = register(&broker, ALICE).await;
        let mut bob = register(&broker, BOB).await;
        let group = alice
            .client
            .create_group("Chains", &[BOB])
            .await
            .expect("create");
        // Loss-free: texts arrive, nothing is missing.
        for text in ["one", "two", "three"] {
            alice
                .client
                .send_group_text(&group, text)
                .await
                .expect("send");
            let events = until_group_text(&mut bob.client, text).await;
            assert_eq!(group_missing(&events), None, "{events:?}");
        }
        // The broker answers bob's copy of "four" as taken and drops it; "five" names it.
        broker.withhold_next_to(BOB);
        alice
            .client
            .send_group_text(&group, "four")
            .await
            .expect("send");
        assert!(broker.withheld(), "the hook took bob's copy");
        alice
            .client
            .send_group_text(&group, "five")
            .await
            .expect("send");
        let mut events = until_group_text(&mut bob.client, "five").await;
        assert!(
            !events.iter().any(
                |e| matches!(e, Event::Group(GroupEvent::Message { text, .. }) if text == "four")
            ),
            "four never arrived"
        );
        // The envelope that brought "five" also says one text of alice's may be missing.
        events.push(next(&mut bob.client).await);
        assert_eq!(group_missing(&events), Some(1), "{events:?}");
    });
}
