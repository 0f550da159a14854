//! History for a newly linked device, through a real broker: the existing device sends the
//! conversations (an encrypted archive uploaded as an attachment, its key in an Olm message),
//! the new device imports them. Nothing of it is readable at the broker.

mod common;

use common::{
    Broker,
    sdk::{link, next, register},
};
use sealpost_client::{Client, Event};

/// Waits for a message from `from` with `text`.
async fn received(client: &mut Client, text: &str) {
    loop {
        if let Event::Message(m) = next(client).await
            && m.text == text
        {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_gets_the_history_its_user_chose_to_send() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, "alice@test.example").await;
    let mut bob = register(&broker, "bob@test.example").await;
    let canary = "CANARY-before-the-new-phone";
    alice
        .client
        .send_text("bob@test.example", canary)
        .await
        .expect("send");
    received(&mut bob.client, canary).await;
    bob.client
        .send_text("alice@test.example", "and a reply")
        .await
        .expect("send");
    received(&mut alice.client, "and a reply").await;

    let mut phone = link(&broker, &mut alice).await;
    assert!(
        phone.client.conversations().is_empty(),
        "a new device starts empty"
    );
    let bytes = alice
        .client
        .send_history(phone.client.device_id(), |_, _| {})
        .await
        .expect("send_history");
    assert!(bytes > 0);
    let file = loop {
        if let Event::History { from_device, file } = next(&mut phone.client).await {
            assert_eq!(from_device, alice.client.device_id());
            break file;
        }
    };
    assert_eq!(phone.client.import_history(&file).await.expect("import"), 2);
    let conversations = phone.client.conversations();
    let with_bob = conversations
        .iter()
        .find(|c| c.with == "bob@test.example")
        .expect("the conversation with bob");
    let texts: Vec<(bool, &str)> = with_bob
        .messages
        .iter()
        .map(|m| (m.outgoing, m.text.as_str()))
        .collect();
    assert_eq!(texts, vec![(true, canary), (false, "and a reply")]);
    // Imported twice, nothing doubles.
    assert_eq!(phone.client.import_history(&file).await.expect("import"), 0);
    // The archive at the broker is ciphertext.
    let data = broker.data_dir();
    let mut stack = vec![data];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                assert!(
                    memchr::memmem::find(&bytes, canary.as_bytes()).is_none(),
                    "{}",
                    path.display()
                );
            }
        }
    }
}
