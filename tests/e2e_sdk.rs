//! End-to-end encryption through a real broker process, driven by the client SDK
//! (`sealpost-client`): multi-device exchange, the privacy promise, attacks crafted at the
//! frame level, key changes, key exhaustion, linking and removing devices.

mod common;

use std::{collections::HashSet, time::Duration};

use common::{
    Broker, WAIT,
    sdk::{link, next, register},
};
use sealpost_client::{
    Client, ClientError, EnvelopeError, Event,
    api::{Api, ClaimAuth},
    conn::Connection,
    crypto::{
        DeviceKeys, Payload, SealError, SenderInfo, SessionError, Sessions, SignedDeviceList,
        SignedOneTimeKey, seal,
    },
    sdk::HoldReason,
};
use sealpost_proto::{Class, ClientFrame, Copy, EnvelopeId, SendOutcome, ServerFrame};

/// What a device saw, in a comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    From(String, String),
    SentTo(String, String),
}

/// Collects `n` messages (received or sent elsewhere), skipping notices and link events;
/// panics on a rejected envelope.
async fn messages(client: &mut Client, n: usize) -> Vec<Seen> {
    let mut out = Vec::new();
    while out.len() < n {
        match next(client).await {
            Event::Message(m) => out.push(Seen::From(m.from, m.text)),
            Event::SentElsewhere { to, text, .. } => out.push(Seen::SentTo(to, text)),
            Event::Rejected { error, .. } => panic!("rejected: {error}"),
            _ => {}
        }
    }
    out
}

/// Reads until the queue is empty, returning everything else that came.
async fn drain(client: &mut Client) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        match next(client).await {
            Event::QueueEmpty => return out,
            other => out.push(other),
        }
    }
}

/// Reads events until a rejection; returns its error (messages before it are returned too).
async fn rejection(client: &mut Client) -> (EnvelopeError, Vec<Event>) {
    let mut others = Vec::new();
    loop {
        match next(client).await {
            Event::Rejected { error, .. } => return (error, others),
            Event::QueueEmpty => {}
            other => others.push(other),
        }
    }
}

const ALICE: &str = "alice@test.example";
const BOB: &str = "bob@test.example";

/// Scans the broker's `queues` tree (the broker must be stopped: sled locks its directory):
/// no record stored for one account names another account, and no record holds a canary.
fn scan_queues(broker: &Broker, handles: &[&str], canaries: &[String]) -> usize {
    // The broker's sled settings (a different segment size is refused).
    let db = sled::Config::new()
        .path(broker.data_dir())
        .segment_size(8 * 1024 * 1024)
        .open()
        .expect("open the broker's store");
    let queues = db.open_tree("queues").expect("queues tree");
    let mut envelopes = 0;
    for entry in queues.iter() {
        let (key, value) = entry.expect("entry");
        // Keys are kind ‖ [expiry ‖] keyed hash of the handle ‖ ... (see `store::keys`): no
        // handle should be found in them at all, nor in a value.
        let owner = handles
            .iter()
            .find(|h| contains(&key, h.as_bytes()))
            .copied();
        if key.first() == Some(&b'E') {
            envelopes += 1;
        }
        for other in handles.iter().filter(|h| Some(**h) != owner) {
            assert!(
                !contains(&key, other.as_bytes()) && !contains(&value, other.as_bytes()),
                "a queue record of {owner:?} names {other}"
            );
        }
        for canary in canaries {
            assert!(!contains(&value, canary.as_bytes()), "canary in the store");
        }
    }
    envelopes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_two_devices_exchange_in_order_and_the_broker_learns_nothing() {
    let mut broker = Broker::start(&[]);
    let mut a1 = register(&broker, ALICE).await;
    let mut a2 = link(&broker, &mut a1).await;
    let mut b1 = register(&broker, BOB).await;
    let mut b2 = link(&broker, &mut b1).await;
    assert_eq!((a1.client.device_id(), a2.client.device_id()), (1, 2));
    assert_eq!((b1.client.device_id(), b2.client.device_id()), (1, 2));

    // Warm-up: first contact (authenticated route) shares the delivery tokens with all of
    // the other account's devices.
    a1.client.send_text(BOB, "hello bob").await.expect("send");
    a1.client.flush_transcripts().await.expect("transcripts");
    b1.client
        .send_text(ALICE, "hello alice")
        .await
        .expect("send");
    b1.client.flush_transcripts().await.expect("transcripts");
    let hello_bob = || "hello bob".to_string();
    let hello_alice = || "hello alice".to_string();
    assert_eq!(
        messages(&mut a1.client, 1).await,
        [Seen::From(BOB.into(), hello_alice())]
    );
    assert_eq!(
        messages(&mut a2.client, 2).await,
        [
            Seen::SentTo(BOB.into(), hello_bob()),
            Seen::From(BOB.into(), hello_alice())
        ]
    );
    assert_eq!(
        messages(&mut b1.client, 1).await,
        [Seen::From(ALICE.into(), hello_bob())]
    );
    assert_eq!(
        messages(&mut b2.client, 2).await,
        [
            Seen::From(ALICE.into(), hello_bob()),
            Seen::SentTo(ALICE.into(), hello_alice())
        ]
    );
    for (dev, to) in [(&a1, BOB), (&a2, BOB), (&b1, ALICE), (&b2, ALICE)] {
        assert!(dev.client.sends_sealed_to(to), "tokens were shared");
    }

    // The measured round: every message sealed, with canaries.
    let window_start = std::fs::metadata(&broker.log_path).expect("log").len();
    let tag: u64 = rand::random();
    let canary = |i: usize| format!("canary-{tag:016x}-{i}");
    let script: Vec<(usize, &str, String)> = vec![
        (0, BOB, canary(1)),
        (2, ALICE, canary(2)),
        (1, BOB, canary(3)),
        (3, ALICE, canary(4)),
        (0, BOB, canary(5)),
        (2, ALICE, canary(6)),
        (3, ALICE, canary(7)),
        (1, BOB, canary(8)),
    ];
    {
        let devs = [&mut a1, &mut a2, &mut b1, &mut b2];
        for (from, to, text) in &script {
            let client = &mut devs[*from].client;
            assert!(client.sends_sealed_to(to));
            client.send_text(to, text).await.expect("send");
            client.flush_transcripts().await.expect("transcripts");
        }
    }
    let canaries: Vec<String> = script.iter().map(|(_, _, t)| t.clone()).collect();
    let window_end = std::fs::metadata(&broker.log_path).expect("log").len();

    // The privacy promise, checked on the stored state while every envelope is still queued.
    assert!(broker.terminate(), "graceful stop");
    let stored = scan_queues(&broker, &[ALICE, BOB], &canaries);
    // 8 messages x 2 recipient devices + 8 transcripts x 2 own devices (one a placeholder).
    assert!(stored >= 32, "envelopes are queued: {stored}");
    let logs = std::fs::read(&broker.log_path).expect("broker log");
    for canary in &canaries {
        assert!(!common::dir_contains(&broker.data_dir(), canary.as_bytes()));
        assert!(!contains(&logs, canary.as_bytes()), "canary in the logs");
    }
    for handle in [ALICE, BOB] {
        assert!(!contains(&logs, handle.as_bytes()), "{handle} in the logs");
    }
    // While the sealed messages flowed, the broker logged nothing about any device.
    let window =
        &logs[usize::try_from(window_start).unwrap()..usize::try_from(window_end).unwrap()];
    let window = String::from_utf8_lossy(window);
    let about_devices: Vec<&str> = window
        .lines()
        .filter(|l| l.contains("sealpost") && l.contains("device"))
        .collect();
    assert!(about_devices.is_empty(), "{about_devices:#?}");
    broker.restart();

    // Every device decrypts everything meant for it, in order.
    let handle_of = [ALICE, ALICE, BOB, BOB];
    let devs = [&mut a1, &mut a2, &mut b1, &mut b2];
    for (index, dev) in devs.into_iter().enumerate() {
        let own = handle_of[index];
        let expected: Vec<Seen> = script
            .iter()
            .filter(|(from, _, _)| *from != index)
            .map(|(from, to, text)| {
                if handle_of[*from] == own {
                    Seen::SentTo(to.to_string(), text.clone())
                } else {
                    Seen::From(handle_of[*from].to_owned(), text.clone())
                }
            })
            .collect();
        let got = messages(&mut dev.client, expected.len()).await;
        assert_eq!(got, expected, "device {index}");
    }

    // Each device shows the whole conversation.
    let conversation = &b2.client.conversations()[0];
    assert_eq!(conversation.with, ALICE);
    let texts: Vec<&str> = conversation
        .messages
        .iter()
        .map(|m| m.text.as_str())
        .collect();
    for canary in &canaries {
        assert!(texts.contains(&canary.as_str()), "b2 shows {canary}");
    }

    // Both sides compute the same safety number.
    let ab = a2.client.safety_number(BOB).await.expect("safety number");
    let ba = b1.client.safety_number(ALICE).await.expect("safety number");
    assert_eq!(ab, ba);
}

/// Mallory, a registered user who builds frames by hand with the crypto core.
struct Mallory {
    api: Api,
    keys: DeviceKeys,
    sessions: Sessions,
    conn: Connection,
}

impl Mallory {
    async fn new(broker: &Broker) -> Mallory {
        let api = Api::new(&broker.http()).expect("api");
        let keys = DeviceKeys::generate();
        let handle = "mallory@test.example";
        let creds = api
            .register(handle, &keys.public_keys().to_bytes(), None)
            .await
            .expect("register mallory");
        let (conn, _) = Connection::authenticated(&api, &creds)
            .await
            .expect("connect");
        // Claims are admitted as a device of a local account.
        let mut mallory = Mallory {
            api,
            keys,
            sessions: Sessions::new(handle.into(), creds.device),
            conn,
        };
        mallory.claim_sessions(BOB, &creds).await;
        mallory
    }

    async fn claim_sessions(&mut self, to: &str, creds: &sealpost_client::api::DeviceCreds) {
        let blob = self
            .api
            .device_list(to)
            .await
            .expect("list")
            .expect("exists");
        let list = SignedDeviceList::from_bytes(&blob)
            .and_then(|s| s.verify(to, None, None))
            .expect("verifies");
        for (device, keys) in &list.devices {
            let claimed = self
                .api
                .claim_key(to, *device, ClaimAuth::Device(creds))
                .await
                .expect("claim");
            let key = SignedOneTimeKey::from_bytes(&claimed.key).expect("key");
            self.sessions
                .create_outbound(&self.keys, to, *device, keys, &key)
                .expect("session");
        }
    }

    /// Sends `text` to every device of Bob, sealed with a forged sender claim.
    async fn send_forged(&mut self, as_sender: SenderInfo, text: &str) {
        let blob = self
            .api
            .device_list(BOB)
            .await
            .expect("list")
            .expect("exists");
        let list = SignedDeviceList::from_bytes(&blob)
            .and_then(|s| s.verify(BOB, None, None))
            .expect("verifies");
        let copies = list
            .devices
            .iter()
            .map(|(device, keys)| {
                let olm = self
                    .sessions
                    .encrypt(
                        BOB,
                        *device,
                        &Payload::Text {
                            body: text.into(),
                            link: None,
                        },
                    )
                    .expect("encrypt");
                Copy {
                    device: sealpost_proto::DeviceId(*device),
                    ciphertext: seal(BOB, *device, &keys.seal_x25519, &as_sender, 1, &olm)
                        .expect("seal"),
                }
            })
            .collect();
        let id = EnvelopeId(rand::random());
        self.conn
            .send(&ClientFrame::Send {
                id,
                to: BOB.into(),
                class: Class::Durable,
                ttl_secs: 3600,
                copies,
            })
            .await
            .expect("send");
        loop {
            if let ServerFrame::SendResult { id: got, outcome } =
                self.conn.next().await.expect("frame")
                && got == id
            {
                assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_replayed_and_misaddressed_envelopes_are_rejected() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, ALICE).await;
    let mut b1 = register(&broker, BOB).await;
    let mut b2 = link(&broker, &mut b1).await;
    alice.client.send_text(BOB, "first").await.expect("send");
    alice.client.flush_transcripts().await.expect("transcripts");
    for b in [&mut b1, &mut b2] {
        assert_eq!(
            messages(&mut b.client, 1).await,
            [Seen::From(ALICE.into(), "first".into())]
        );
    }

    // Forged sender: Mallory's Olm session, sealed claiming to be Alice's device.
    let mut mallory = Mallory::new(&broker).await;
    let alice_device = SenderInfo {
        user: ALICE.into(),
        device: alice.client.device_id(),
    };
    mallory.send_forged(alice_device, "forged").await;
    for b in [&mut b1, &mut b2] {
        let (error, others) = rejection(&mut b.client).await;
        assert!(others.is_empty(), "{others:?}");
        assert!(
            matches!(
                &error,
                EnvelopeError::Session {
                    error: SessionError::ForgedSender,
                    user,
                    ..
                } if user == ALICE
            ),
            "{error}"
        );
        assert!(
            error.to_string().contains("does not own the Olm session"),
            "{error}"
        );
    }

    // Tampered ciphertext: one byte of the copy for Bob's first device.
    let mut tampered = alice
        .client
        .prepare_text(BOB, "tampered")
        .await
        .expect("prepare");
    assert_eq!(tampered.copies[0].device.0, 1);
    let last = tampered.copies[0].ciphertext.len() - 5;
    tampered.copies[0].ciphertext[last] ^= 1;
    let outcome = alice.client.send_prepared(&tampered).await.expect("send");
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    let (error, _) = rejection(&mut b1.client).await;
    assert!(
        matches!(error, EnvelopeError::Unseal(SealError::OpenFailed)),
        "{error}"
    );
    assert_eq!(
        messages(&mut b2.client, 1).await,
        [Seen::From(ALICE.into(), "tampered".into())],
        "the untouched copy still reads"
    );

    // Replay: the same sealed copies again, under a new envelope id.
    let original = alice
        .client
        .prepare_text(BOB, "once")
        .await
        .expect("prepare");
    alice.client.send_prepared(&original).await.expect("send");
    let mut replay = original.clone();
    replay.id = EnvelopeId(rand::random());
    alice.client.send_prepared(&replay).await.expect("send");
    for b in [&mut b1, &mut b2] {
        assert_eq!(
            messages(&mut b.client, 1).await,
            [Seen::From(ALICE.into(), "once".into())]
        );
        let (error, others) = rejection(&mut b.client).await;
        assert!(others.is_empty());
        assert!(
            matches!(
                error,
                EnvelopeError::Session {
                    error: SessionError::Replay,
                    ..
                }
            ),
            "{error}"
        );
    }
    // The same envelope id again is a duplicate at the broker and stores nothing.
    assert_eq!(
        alice.client.send_prepared(&original).await.expect("send"),
        SendOutcome::Accepted { duplicate: true }
    );

    // Another device's envelope: the two copies swapped.
    let mut swapped = alice
        .client
        .prepare_text(BOB, "swapped")
        .await
        .expect("prepare");
    let first = std::mem::take(&mut swapped.copies[0].ciphertext);
    swapped.copies[0].ciphertext = std::mem::replace(&mut swapped.copies[1].ciphertext, first);
    alice.client.send_prepared(&swapped).await.expect("send");
    for b in [&mut b1, &mut b2] {
        let (error, others) = rejection(&mut b.client).await;
        assert!(others.is_empty());
        assert!(
            matches!(error, EnvelopeError::Unseal(SealError::OpenFailed)),
            "{error}"
        );
        assert!(
            error.to_string().contains("addressed to another device"),
            "{error}"
        );
    }

    // Nothing jammed: a normal message still arrives on both devices.
    alice.client.send_text(BOB, "after").await.expect("send");
    alice.client.flush_transcripts().await.expect("transcripts");
    for b in [&mut b1, &mut b2] {
        assert_eq!(
            messages(&mut b.client, 1).await,
            [Seen::From(ALICE.into(), "after".into())]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_master_key_is_a_warning_and_blocks_sending() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, ALICE).await;
    let mut bob = register(&broker, BOB).await;
    alice.client.set_device_list_max_age(Duration::ZERO);
    alice.client.send_text(BOB, "hi").await.expect("send");
    alice.client.flush_transcripts().await.expect("transcripts");
    let before = alice.client.safety_number(BOB).await.expect("number");
    assert_eq!(messages(&mut bob.client, 1).await.len(), 1);

    bob.client.rotate_master_key().await.expect("rotate");
    let error = alice
        .client
        .send_text(BOB, "should not be sent")
        .await
        .expect_err("a changed master key must stop the send");
    let ClientError::MasterKeyChanged {
        user,
        new_safety_number,
        new_master_key,
    } = &error
    else {
        panic!("expected MasterKeyChanged, got {error}");
    };
    assert_eq!(user, BOB);
    assert!(
        error
            .to_string()
            .starts_with("WARNING: the master key of bob@test.example has changed")
    );
    assert_ne!(*new_safety_number, before);
    assert_eq!(
        *new_safety_number,
        bob.client.safety_number(ALICE).await.expect("number"),
        "the warning shows the number Bob's device shows"
    );
    // Still refused until accepted (and nothing reached Bob: his next message, below, is the
    // one sent after accepting).
    assert!(matches!(
        alice.client.send_text(BOB, "again").await,
        Err(ClientError::MasterKeyChanged { .. })
    ));

    let (key, number) = alice.client.fetch_master_key(BOB).await.expect("fetch");
    assert_eq!((&key, &number), (new_master_key, new_safety_number));
    alice
        .client
        .accept_master_key_change(BOB, &key)
        .await
        .expect("accept");
    alice
        .client
        .send_text(BOB, "after the change")
        .await
        .expect("send");
    assert_eq!(
        messages(&mut bob.client, 1).await,
        [Seen::From(ALICE.into(), "after the change".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_sender_claim_pins_nothing() {
    const CAROL: &str = "carol@test.example";
    let broker = Broker::start(&[]);
    let mut bob = register(&broker, BOB).await;
    bob.client.set_device_list_max_age(Duration::ZERO);
    let mut carol = register(&broker, CAROL).await;
    let mut mallory = Mallory::new(&broker).await;
    // Mallory claims to be Carol, whom Bob has never heard from: rejected.
    let claimed = SenderInfo {
        user: CAROL.into(),
        device: carol.client.device_id(),
    };
    mallory.send_forged(claimed, "forged").await;
    let (error, _) = rejection(&mut bob.client).await;
    assert!(
        matches!(
            &error,
            EnvelopeError::Session {
                error: SessionError::ForgedSender,
                ..
            }
        ),
        "{error}"
    );
    // Carol then resets her master key and writes for real. The forgery pinned nothing, so
    // this is the first key Bob sees for her: no key-change warning.
    carol.client.rotate_master_key().await.expect("rotate");
    carol
        .client
        .send_text(BOB, "hello bob")
        .await
        .expect("send");
    assert_eq!(
        messages(&mut bob.client, 1).await,
        [Seen::From(CAROL.into(), "hello bob".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_under_a_changed_master_key_wait_for_its_acceptance() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, ALICE).await;
    let mut bob = register(&broker, BOB).await;
    alice.client.set_device_list_max_age(Duration::ZERO);
    alice.client.send_text(BOB, "hi").await.expect("send");
    alice.client.flush_transcripts().await.expect("transcripts");
    assert_eq!(messages(&mut bob.client, 1).await.len(), 1);
    bob.client.rotate_master_key().await.expect("rotate");
    // Alice finds the new key when she next fetches Bob's list (here: to write to him; else
    // the next refresh of her contacts' lists), not because a message of his came.
    assert!(matches!(
        alice.client.send_text(BOB, "are you there?").await,
        Err(ClientError::MasterKeyChanged { .. })
    ));
    bob.client
        .send_text(ALICE, "new key, same me")
        .await
        .expect("send");
    bob.client.flush_transcripts().await.expect("transcripts");
    // Alice cannot verify Bob under the new key yet: the message is kept (for the list, then
    // for the key), not rejected.
    let held = loop {
        match next(&mut alice.client).await {
            Event::Held {
                user,
                why: HoldReason::KeyChanged,
                ..
            } => break user,
            Event::Held {
                why: HoldReason::AwaitingList | HoldReason::Behind,
                ..
            } => {}
            Event::Rejected { error, .. } => panic!("rejected: {error}"),
            Event::QueueEmpty => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(held, BOB);
    let (key, _) = alice.client.fetch_master_key(BOB).await.expect("fetch");
    alice
        .client
        .accept_master_key_change(BOB, &key)
        .await
        .expect("accept");
    assert_eq!(
        messages(&mut alice.client, 1).await,
        [Seen::From(BOB.into(), "new key, same me".into())]
    );
    // The conversation goes on in both directions.
    bob.client
        .send_text(ALICE, "and after")
        .await
        .expect("send");
    bob.client.flush_transcripts().await.expect("transcripts");
    assert_eq!(
        messages(&mut alice.client, 1).await,
        [Seen::From(BOB.into(), "and after".into())]
    );
    alice
        .client
        .send_text(BOB, "welcome back")
        .await
        .expect("send");
    assert_eq!(
        messages(&mut bob.client, 1).await,
        [Seen::From(ALICE.into(), "welcome back".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_rotation_the_broker_never_got_changes_nothing() {
    let mut broker = Broker::start(&[]);
    let mut alice = register(&broker, ALICE).await;
    let mut bob = register(&broker, BOB).await;
    alice.client.send_text(BOB, "hi").await.expect("send");
    alice.client.flush_transcripts().await.expect("transcripts");
    assert_eq!(messages(&mut bob.client, 1).await.len(), 1);
    let before = bob.client.safety_number(ALICE).await.expect("number");
    // The broker is down: the rotation fails...
    assert!(broker.terminate());
    bob.client
        .rotate_master_key()
        .await
        .expect_err("no broker to publish to");
    broker.restart();
    // ... and changed nothing: Bob's device still signs and sends under the old key.
    bob.client.send_text(ALICE, "still me").await.expect("send");
    bob.client.flush_transcripts().await.expect("transcripts");
    assert_eq!(
        messages(&mut alice.client, 1).await,
        [Seen::From(BOB.into(), "still me".into())]
    );
    assert_eq!(
        bob.client.safety_number(ALICE).await.expect("number"),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_rotation_the_broker_stored_without_saying_so_is_completed() {
    let broker = Broker::start(&[]);
    let fail = broker.sync_failpoint();
    let mut alice = register(&broker, ALICE).await;
    let mut bob = register(&broker, BOB).await;
    alice.client.set_device_list_max_age(Duration::ZERO);
    alice.client.send_text(BOB, "hi").await.expect("send");
    alice.client.flush_transcripts().await.expect("transcripts");
    assert_eq!(messages(&mut bob.client, 1).await.len(), 1);
    let before = bob.client.safety_number(ALICE).await.expect("number");
    // The broker keeps the new list but its flush fails, so it answers 503.
    std::fs::write(&fail, b"").expect("arm failpoint");
    bob.client
        .rotate_master_key()
        .await
        .expect("the list the broker serves is the new one: the rotation took place");
    std::fs::remove_file(&fail).expect("disarm failpoint");
    let after = bob.client.safety_number(ALICE).await.expect("number");
    assert_ne!(
        after, before,
        "Bob's device switched to the key the broker publishes"
    );
    // Alice sees the change as a changed key, with the number Bob's device shows.
    match alice.client.send_text(BOB, "who is this?").await {
        Err(ClientError::MasterKeyChanged {
            new_safety_number, ..
        }) => assert_eq!(new_safety_number, after),
        other => panic!("expected MasterKeyChanged, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_exhaustion_falls_back_and_concurrent_claims_never_share() {
    let broker = Broker::start(&[]);
    let mut bob = register(&broker, BOB).await;
    assert_eq!(
        bob.client.published_key_count().await.expect("count"),
        (sealpost_client::sdk::ONE_TIME_KEYS as u64, true)
    );
    drain(&mut bob.client).await; // connected: the broker can tell it keys run low

    // A registered account drains Bob's one-time keys with concurrent claims.
    let api = Api::new(&broker.http()).expect("api");
    let eve_keys = DeviceKeys::generate();
    let eve = api
        .register("eve@test.example", &eve_keys.public_keys().to_bytes(), None)
        .await
        .expect("register");
    let blob = api.device_list(BOB).await.expect("list").expect("exists");
    let bob_keys = *SignedDeviceList::from_bytes(&blob)
        .and_then(|s| s.verify(BOB, None, None))
        .expect("verifies")
        .device(1)
        .expect("device 1");
    let claims = (0..sealpost_client::sdk::ONE_TIME_KEYS).map(|_| {
        let (api, eve) = (api.clone(), eve.clone());
        tokio::spawn(async move { api.claim_key(BOB, 1, ClaimAuth::Device(&eve)).await })
    });
    let mut ids = HashSet::new();
    let mut keys = HashSet::new();
    for claim in claims {
        let claimed = claim.await.expect("task").expect("claim");
        assert!(!claimed.fallback);
        let key = SignedOneTimeKey::from_bytes(&claimed.key).expect("key");
        key.verify(&bob_keys).expect("signed by Bob's device");
        assert!(ids.insert(claimed.key_id), "a key id was handed out twice");
        assert!(keys.insert(key.key), "a key was handed out twice");
    }

    // The next claimant gets the fallback key, and its message still decrypts.
    let mut alice = register(&broker, ALICE).await;
    alice
        .client
        .send_text(BOB, "via the fallback key")
        .await
        .expect("send");
    assert_eq!(
        messages(&mut bob.client, 1).await,
        [Seen::From(ALICE.into(), "via the fallback key".into())]
    );
    // Bob was told keys ran low and topped them up without being asked.
    assert_eq!(
        bob.client.published_key_count().await.expect("count"),
        (sealpost_client::sdk::ONE_TIME_KEYS as u64, true)
    );
    let claimed = api
        .claim_key(BOB, 1, ClaimAuth::Device(&eve))
        .await
        .expect("claim");
    assert!(!claimed.fallback, "one-time keys are back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_receives_and_a_removed_device_gets_nothing_new() {
    let broker = Broker::start(&[]);
    let mut a1 = register(&broker, ALICE).await;
    let mut bob = register(&broker, BOB).await;
    bob.client
        .send_text(ALICE, "before linking")
        .await
        .expect("send");
    bob.client.flush_transcripts().await.expect("transcripts");
    assert_eq!(messages(&mut a1.client, 1).await.len(), 1);
    a1.client.send_text(BOB, "reply").await.expect("send");
    a1.client.flush_transcripts().await.expect("transcripts");

    let mut a2 = link(&broker, &mut a1).await;
    // The new device is in the signed list, as every client verifies it.
    let devices = a2.client.devices().await.expect("devices");
    assert_eq!(
        devices
            .iter()
            .map(|d| (d.device, d.signed))
            .collect::<Vec<_>>(),
        [(1, true), (2, true)]
    );
    let blob = bob
        .client
        .api()
        .device_list(ALICE)
        .await
        .expect("list")
        .expect("exists");
    let list = SignedDeviceList::from_bytes(&blob)
        .and_then(|s| s.verify(ALICE, None, None))
        .expect("verifies");
    assert_eq!(list.version, 2);
    assert!(list.device(a2.client.device_id()).is_some());
    // The grant carried the contacts: the new device writes to Bob sealed at once.
    assert!(a2.client.sends_sealed_to(BOB));

    bob.client
        .send_text(ALICE, "after linking")
        .await
        .expect("send");
    bob.client.flush_transcripts().await.expect("transcripts");
    for a in [&mut a1, &mut a2] {
        assert_eq!(
            messages(&mut a.client, 1).await,
            [Seen::From(BOB.into(), "after linking".into())]
        );
    }
    a2.client
        .send_text(BOB, "from the new device")
        .await
        .expect("send");
    a2.client.flush_transcripts().await.expect("transcripts");
    let got = messages(&mut bob.client, 2).await;
    assert_eq!(
        got[1],
        Seen::From(ALICE.into(), "from the new device".into())
    );
    assert_eq!(
        messages(&mut a1.client, 1).await,
        [Seen::SentTo(BOB.into(), "from the new device".into())]
    );

    // Removing a2: out of the signed list, revoked at the broker.
    a1.client.remove_device(2).await.expect("remove");
    loop {
        match tokio::time::timeout(WAIT, a2.client.next_event()).await {
            Ok(Err(ClientError::DeviceRevoked)) => break,
            // Bob's delivered receipt for what a2 sent, queued before the removal.
            Ok(Ok(Event::Receipt { .. })) => {}
            other => panic!("expected DeviceRevoked, got {other:?}"),
        }
    }
    bob.client
        .send_text(ALICE, "after removal")
        .await
        .expect("send");
    bob.client.flush_transcripts().await.expect("transcripts");
    assert_eq!(
        messages(&mut a1.client, 1).await,
        [Seen::From(BOB.into(), "after removal".into())]
    );
    assert!(matches!(
        tokio::time::timeout(WAIT, a2.client.next_event()).await,
        Ok(Err(ClientError::DeviceRevoked))
    ));
    let blob = bob
        .client
        .api()
        .device_list(ALICE)
        .await
        .expect("list")
        .expect("exists");
    let list = SignedDeviceList::from_bytes(&blob)
        .and_then(|s| s.verify(ALICE, None, None))
        .expect("verifies");
    assert_eq!(list.version, 3);
    assert!(list.device(2).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_code_without_its_secret_links_nothing() {
    let broker = Broker::start(&[]);
    let mut a1 = register(&broker, ALICE).await;
    let code = a1.client.create_link_code().await.expect("link code");
    // The broker part is right (as the operator would know it); the secret is not.
    let (broker_part, _) = code.code.rsplit_once('.').expect("two parts");
    let forged = format!("{broker_part}.{}", "A".repeat(22));
    let dir = tempfile::tempdir().expect("tempdir");
    let server = broker.http();
    let linking = Client::link(&server, ALICE, &forged, dir.path(), WAIT);
    let refused = async {
        loop {
            match next(&mut a1.client).await {
                Event::Rejected {
                    error: EnvelopeError::BadLinkProof,
                    ..
                } => break,
                Event::QueueEmpty => {}
                other => panic!("unexpected event: {other:?}"),
            }
        }
    };
    tokio::select! {
        () = refused => {}
        linked = linking => panic!("linked without the secret: {:?}", linked.map(|c| c.device_id())),
    }
    // The device exists at the broker but no one encrypts to it: it is not in the signed list.
    let devices = a1.client.devices().await.expect("devices");
    assert_eq!(
        devices
            .iter()
            .map(|d| (d.device, d.signed))
            .collect::<Vec<_>>(),
        [(1, true), (2, false)]
    );
    a1.client
        .remove_device(2)
        .await
        .expect("remove the stray device");
    let devices = a1.client.devices().await.expect("devices");
    assert_eq!(devices.len(), 1);
}
