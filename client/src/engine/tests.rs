//! The engine on its own: engines talk through an in-memory broker (a directory of signed
//! lists and keys, and the copies of each envelope), with no I/O at all.

use std::collections::BTreeMap;

use sealpost_proto::{ClientFrame, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome};

use super::*;
use crate::crypto::{
    DeviceKeys, Payload, SenderInfo, SessionError, Sessions, SignedOneTimeKey, seal,
};

const NOW: u64 = 1_700_000_000_000;

/// The broker, as far as engines see it.
#[derive(Default)]
struct Broker {
    lists: BTreeMap<String, Vec<u8>>,
    keys: BTreeMap<(String, u32), Vec<Vec<u8>>>,
    identity: BTreeMap<(String, u32), Vec<u8>>,
}

impl Broker {
    fn publish_keys(&mut self, engine: &mut Engine) {
        let upload = engine.key_upload().expect("keys to publish");
        engine.mark_keys_published();
        let at = (engine.user().to_owned(), engine.device_id());
        self.keys
            .entry(at)
            .or_default()
            .extend(upload.one_time.into_iter().map(|(_, k)| k));
    }

    /// A new account with one device, its list and keys published.
    fn register(&mut self, handle: &str, device: u32) -> Engine {
        let new = NewDevice::generate();
        self.identity
            .insert((handle.into(), device), new.identity_keys());
        let mut engine = new.register(handle, device, &[7; 32], "");
        let signed = engine.first_own_list().expect("signs").to_bytes();
        engine.confirm_own_list(&signed, NOW).expect("own list");
        self.lists.insert(handle.into(), signed);
        self.publish_keys(&mut engine);
        engine
    }

    /// Runs a send until its frame is ready, claiming keys as asked.
    fn prepare(&mut self, from: &mut Engine, to: &str, outgoing: Outgoing) -> (Send, ClientFrame) {
        let mut send = from
            .start_send(to, outgoing, None, None, NOW)
            .expect("starts");
        let frame = self.steps(from, &mut send);
        (send, frame)
    }

    fn steps(&mut self, from: &mut Engine, send: &mut Send) -> ClientFrame {
        loop {
            match from.send_step(send, NOW).expect("step") {
                SendStep::ClaimKey { user, device, .. } => {
                    let key = self
                        .keys
                        .get_mut(&(user.clone(), device))
                        .and_then(Vec::pop)
                        .expect("a key left");
                    from.create_session(&user, device, &key).expect("session");
                }
                SendStep::Transmit(frame) => return frame,
            }
        }
    }

    /// Delivers `frame`'s copy for `to`'s device and has the engine read it (fetching the
    /// lists it asks for); returns the events, or `None` for a duplicate.
    fn deliver(&self, frame: &ClientFrame, to: &mut Engine) -> Option<Vec<Event>> {
        let (id, copy) = copy_for(frame, to.device_id());
        self.read(to, id, &copy)
    }

    fn read(&self, to: &mut Engine, id: EnvelopeId, ciphertext: &[u8]) -> Option<Vec<Event>> {
        if to.is_seen(id) {
            return None;
        }
        let mut opened = to.open(id, ciphertext, SenderList::Cached, NOW);
        if let Err(Unread::Need(Need::List(user))) = &opened {
            let user = user.clone();
            let list = match to.accept_device_list(&user, &self.lists[&user], NOW) {
                Ok(_) => SenderList::Refetched,
                Err(e) => SenderList::Failed(e),
            };
            opened = to.open(id, ciphertext, list, NOW);
        }
        let result = match opened {
            Ok(opened) => Ok(opened.events),
            Err(Unread::Failed(failure)) => Err(failure),
            Err(Unread::Need(Need::BrokerKeys)) => {
                let own = to.user().to_owned();
                let broker: Vec<BrokerDevice> = self
                    .identity
                    .iter()
                    .filter(|((u, _), _)| *u == own)
                    .map(|((_, d), k)| BrokerDevice {
                        device: *d,
                        identity_keys: k.clone(),
                    })
                    .collect();
                to.open_link_request(ciphertext, &broker, NOW)
                    .map(|(device, _)| vec![Event::DeviceLinked { device }])
            }
            Err(Unread::Need(need)) => panic!("unexpected need {need:?}"),
        };
        Some(to.settle(id, ciphertext, false, result))
    }
}

fn copy_for(frame: &ClientFrame, device: u32) -> (EnvelopeId, Vec<u8>) {
    let (ClientFrame::Send { id, copies, .. } | ClientFrame::SealedSend { id, copies, .. }) = frame
    else {
        panic!("not a send");
    };
    let copy = copies
        .iter()
        .find(|c| c.device == DeviceId(device))
        .expect("a copy for the device");
    (*id, copy.ciphertext.clone())
}

fn copies(frame: &ClientFrame) -> &[Copy] {
    match frame {
        ClientFrame::Send { copies, .. } | ClientFrame::SealedSend { copies, .. } => copies,
        _ => panic!("not a send"),
    }
}

fn text_of(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.from.clone(), m.text.clone())),
            _ => None,
        })
        .collect()
}

const ALICE: &str = "alice@a.example";
const BOB: &str = "bob@b.example";

/// Alice and Bob registered, Alice holding Bob's verified list.
fn alice_knows_bob() -> (Broker, Engine, Engine) {
    let mut broker = Broker::default();
    let mut alice = broker.register(ALICE, 1);
    let bob = broker.register(BOB, 1);
    alice
        .accept_device_list(BOB, &broker.lists[BOB].clone(), NOW)
        .expect("verifies");
    (broker, alice, bob)
}

#[test]
fn two_engines_exchange_messages_sealed_after_the_token_and_redeliveries_are_duplicates() {
    let (mut broker, mut alice, mut bob) = alice_knows_bob();

    // First contact: the token travels authenticated, then bob can write sealed.
    assert!(!alice.token_shared(BOB));
    let token = alice.delivery_token_outgoing();
    let (_, frame) = broker.prepare(&mut alice, BOB, token);
    assert!(matches!(frame, ClientFrame::Send { .. }));
    let events = broker.deliver(&frame, &mut bob).expect("new");
    assert!(
        events.is_empty(),
        "a delivery token shows nothing: {events:?}"
    );
    alice.mark_token_shared(BOB);
    assert!(bob.sends_sealed_to(ALICE));

    let (send, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("hello bob"));
    let events = broker.deliver(&frame, &mut bob).expect("new");
    assert_eq!(
        text_of(&events),
        [(ALICE.to_owned(), "hello bob".to_owned())]
    );
    assert!(matches!(&events[0], Event::Message(m) if m.id == send.id()));
    assert!(
        broker.deliver(&frame, &mut bob).is_none(),
        "a redelivery is a duplicate"
    );

    let (_, reply) = broker.prepare(&mut bob, ALICE, Outgoing::text("hello alice"));
    assert!(
        matches!(reply, ClientFrame::SealedSend { .. }),
        "sealed with the token"
    );
    let events = broker.deliver(&reply, &mut alice).expect("new");
    assert_eq!(
        text_of(&events),
        [(BOB.to_owned(), "hello alice".to_owned())]
    );

    // Both sides keep the conversation, and the state survives a save and load.
    let key = LocalKey::generate();
    let bytes = alice.to_encrypted_bytes(&key);
    let alice = Engine::from_encrypted_bytes(&bytes, &key).expect("loads");
    let conversation = &alice.conversations()[0];
    assert_eq!(conversation.with, BOB);
    let texts: Vec<(bool, &str)> = conversation
        .messages
        .iter()
        .map(|m| (m.outgoing, m.text.as_str()))
        .collect();
    assert_eq!(texts, [(true, "hello bob"), (false, "hello alice")]);
    assert_eq!(
        alice.safety_number(BOB).expect("list"),
        bob.safety_number(ALICE).expect("list")
    );
}

#[test]
fn a_stale_device_set_is_sent_again_with_the_same_id_and_placeholders_for_unlisted_devices() {
    let (mut broker, mut alice, mut bob) = alice_knows_bob();
    let (mut send, first) = broker.prepare(&mut alice, BOB, Outgoing::text("hi"));
    assert_eq!(copies(&first).len(), 1);

    // The broker has a second device of bob's that his signed list does not vouch for.
    let stale = SendOutcome::Rejected {
        code: ErrorCode::StaleDevices,
        current_devices: vec![DeviceId(1), DeviceId(2)],
    };
    assert_eq!(
        alice.send_answer(&mut send, stale.clone()).expect("retry"),
        SendProgress::Stale
    );
    alice
        .accept_device_list(BOB, &broker.lists[BOB].clone(), NOW)
        .expect("refetched");
    let second = broker.steps(&mut alice, &mut send);
    let (id1, copy1) = copy_for(&first, 1);
    let (id2, copy1_again) = copy_for(&second, 1);
    assert_eq!(id1, id2, "the same envelope id, idempotent at the broker");
    assert_eq!(copy1, copy1_again, "copies already made are kept");
    let (_, placeholder) = copy_for(&second, 2);
    assert_eq!(
        placeholder.len(),
        copy1.len(),
        "a placeholder of the same size"
    );
    assert!(
        bob.open(id1, &placeholder, SenderList::Cached, NOW)
            .is_err(),
        "nobody can open a placeholder"
    );
    assert_eq!(
        text_of(&broker.deliver(&second, &mut bob).expect("new")),
        [(ALICE.to_owned(), "hi".to_owned())]
    );
    assert_eq!(
        alice
            .send_answer(&mut send, SendOutcome::Accepted { duplicate: false })
            .expect("sent"),
        SendProgress::Sent(id1)
    );

    // A device set that keeps changing ends the send.
    let (mut send, _) = broker.prepare(&mut alice, BOB, Outgoing::text("again"));
    let mut answers = Vec::new();
    for _ in 0..send::STALE_RETRIES {
        answers.push(
            alice
                .send_answer(&mut send, stale.clone())
                .map_err(|e| e.to_string()),
        );
    }
    assert!(
        answers[..send::STALE_RETRIES - 1]
            .iter()
            .all(|a| *a == Ok(SendProgress::Stale))
    );
    assert!(matches!(
        answers.last(),
        Some(Err(e)) if e.contains("kept changing")
    ));
    // Abandoned: its text leaves the conversation, the first one stays.
    alice.abandon_send(send);
    let texts: Vec<String> = alice.conversations()[0]
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect();
    assert_eq!(texts, ["hi"]);
}

#[test]
fn a_linked_device_gets_the_grant_and_both_devices_read_what_comes_next() {
    let mut broker = Broker::default();
    let mut alice = broker.register(ALICE, 1);
    let mut bob1 = broker.register(BOB, 1);
    let code = bob1.new_link_code("brokercode", NOW + 600_000, NOW);
    let (broker_code, secret) = split_link_code(&code.code).expect("code");
    assert_eq!(broker_code, "brokercode");

    // The new device: added at the broker, pins the account's key, asks to be linked.
    let new = NewDevice::generate();
    broker.identity.insert((BOB.into(), 2), new.identity_keys());
    let mut bob2 = new.link(BOB, 2, &[8; 32], &secret, "");
    broker.publish_keys(&mut bob2);
    bob2.accept_device_list(BOB, &broker.lists[BOB].clone(), NOW)
        .expect("pins bob's key");
    assert!(bob2.is_linking());
    let request = bob2.link_request_outgoing().expect("linking");
    let (_, frame) = broker.prepare(&mut bob2, BOB, request);
    assert_eq!(
        copies(&frame).len(),
        2,
        "device 1, and a placeholder for itself"
    );

    // The existing device accepts it with the broker's keys and publishes the new list.
    let events = broker.deliver(&frame, &mut bob1).expect("new");
    assert!(matches!(events[..], [Event::DeviceLinked { device: 2 }]));
    let keys = crate::crypto::PublicDeviceKeys::from_bytes(&broker.identity[&(BOB.into(), 2)])
        .expect("broker keys");
    let signed = bob1
        .approved_list(2, keys)
        .expect("signs")
        .expect("a new version")
        .to_bytes();
    broker.lists.insert(BOB.into(), signed.clone());
    bob1.confirm_own_list(&signed, NOW).expect("published");
    let grant = bob1.link_grant_outgoing().expect("approving");
    let (_, frame) = broker.prepare(&mut bob1, BOB, grant);
    bob1.finish_approval();
    let events = broker.deliver(&frame, &mut bob2).expect("new");
    assert!(matches!(events[..], [Event::Linked]), "{events:?}");
    assert!(!bob2.is_linking());
    assert_eq!(bob2.delivery_token(), bob1.delivery_token());

    // Alice now writes to both devices.
    alice
        .accept_device_list(BOB, &broker.lists[BOB].clone(), NOW)
        .expect("verifies");
    let (_, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("to both"));
    for bob in [&mut bob1, &mut bob2] {
        assert_eq!(
            text_of(&broker.deliver(&frame, bob).expect("new")),
            [(ALICE.to_owned(), "to both".to_owned())]
        );
    }

    // A second request (no pending code any more) is rejected.
    let new = NewDevice::generate();
    broker.identity.insert((BOB.into(), 3), new.identity_keys());
    let mut bob3 = new.link(BOB, 3, &[9; 32], &secret, "");
    broker.publish_keys(&mut bob3);
    bob3.accept_device_list(BOB, &broker.lists[BOB].clone(), NOW)
        .expect("pins");
    let request = bob3.link_request_outgoing().expect("linking");
    let (_, frame) = broker.prepare(&mut bob3, BOB, request);
    let events = broker.deliver(&frame, &mut bob1).expect("new");
    assert!(
        matches!(
            &events[..],
            [Event::Rejected {
                error: crate::error::EnvelopeError::UnknownSenderDevice { device: 3, .. },
                ..
            }]
        ),
        "{events:?}"
    );
}

#[test]
fn a_forged_sender_claim_is_rejected_and_pins_nothing() {
    let mut broker = Broker::default();
    let mut bob = broker.register(BOB, 1);
    let _alice = broker.register(ALICE, 1);
    // Mallory has her own session with bob's device and seals claiming to be alice.
    let mallory = DeviceKeys::generate();
    let mut sessions = Sessions::new("mallory@m.example".into(), 1);
    let (list, _) = {
        let mut probe = broker.register("probe@p.example", 1);
        probe
            .accept_device_list(BOB, &broker.lists[BOB].clone(), NOW)
            .expect("verifies");
        probe.known_list(BOB).expect("cached")
    };
    let bob_keys = *list.device(1).expect("device 1");
    let key = broker
        .keys
        .get_mut(&(BOB.to_owned(), 1))
        .and_then(Vec::pop)
        .expect("key");
    let key = SignedOneTimeKey::from_bytes(&key).expect("key");
    sessions
        .create_outbound(&mallory, BOB, 1, &bob_keys, &key)
        .expect("session");
    let olm = sessions
        .encrypt(
            BOB,
            1,
            &Payload::Text {
                body: "forged".into(),
                link: None,
            },
        )
        .expect("encrypts");
    let claim = SenderInfo {
        user: ALICE.into(),
        device: 1,
    };
    let sealed = seal(BOB, 1, &bob_keys.seal_x25519, &claim, NOW, &olm).expect("seals");
    let id = EnvelopeId([5; 16]);
    let events = broker.read(&mut bob, id, &sealed).expect("new");
    assert!(
        matches!(
            &events[..],
            [Event::Rejected {
                error: crate::error::EnvelopeError::Session {
                    error: SessionError::ForgedSender | SessionError::NoSession,
                    ..
                },
                ..
            }]
        ),
        "{events:?}"
    );
    assert!(bob.known_list(ALICE).is_none(), "the claim pinned nothing");
    assert!(bob.is_seen(id), "and it is not read again");
}

#[test]
fn envelopes_under_a_changed_master_key_are_held_in_order_and_calls_are_not() {
    let (mut broker, mut alice, mut bob) = alice_knows_bob();
    let (_, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("one"));
    broker.deliver(&frame, &mut bob).expect("new");
    // Bob's pin of alice's key no longer matches what the broker serves.
    let other = broker.register("other@a.example", 1);
    drop(other);
    let mut fake = Broker::default();
    let impostor = fake.register(ALICE, 1);
    drop(impostor);
    let (_, second) = broker.prepare(&mut alice, BOB, Outgoing::text("two"));
    let (_, third) = broker.prepare(&mut alice, BOB, Outgoing::text("three"));
    let (id2, copy2) = copy_for(&second, 1);
    // A refresh of contacts' lists (not the delivery) fetches alice's again; it has another
    // key.
    assert_eq!(bob.lists_to_refresh(NOW), [ALICE]);
    let changed = bob
        .accept_device_list(ALICE, &fake.lists[ALICE], NOW)
        .expect_err("another master key");
    assert!(matches!(changed, ClientError::MasterKeyChanged { .. }));
    let Err(Unread::Failed(failure)) = bob.open(id2, &copy2, SenderList::Failed(changed), NOW)
    else {
        panic!("held");
    };
    let events = bob.settle(id2, &copy2, false, Err(failure));
    assert!(matches!(
        &events[..],
        [Event::Held {
            why: HoldReason::KeyChanged,
            ..
        }]
    ));
    // The next one waits behind it.
    let (id3, copy3) = copy_for(&third, 1);
    let Err(Unread::Failed(failure)) = bob.open(id3, &copy3, SenderList::Cached, NOW) else {
        panic!("behind");
    };
    let events = bob.settle(id3, &copy3, false, Err(failure));
    assert!(matches!(
        &events[..],
        [Event::Held {
            why: HoldReason::Behind,
            ..
        }]
    ));
    assert_eq!(bob.held_senders(None), [ALICE]);
    // Call signaling is ephemeral: rejected, not held.
    let offer = Outgoing::call(Payload::HangUp { call_id: [1; 16] }).expect("a call kind");
    assert_eq!(offer.delivery(), Delivery::CALL);
    let (_, call) = broker.prepare(&mut alice, BOB, offer);
    let (id4, copy4) = copy_for(&call, 1);
    let Err(Unread::Failed(failure)) = bob.open(id4, &copy4, SenderList::Cached, NOW) else {
        panic!("behind");
    };
    assert!(matches!(
        &bob.settle(id4, &copy4, true, Err(failure))[..],
        [Event::Rejected { .. }]
    ));
    assert!(
        Outgoing::call(Payload::Text {
            body: "x".into(),
            link: None
        })
        .is_err()
    );
}

/// The `UnlistedDevices` notices taken from `engine`: (account, devices, own account).
fn unlisted(engine: &mut Engine) -> Vec<(String, Vec<u32>, bool)> {
    engine
        .take_notices()
        .into_iter()
        .filter_map(|e| match e {
            Event::UnlistedDevices {
                user,
                devices,
                own_account,
            } => Some((user, devices, own_account)),
            _ => None,
        })
        .collect()
}

/// Runs a send of `text` to `to`'s `devices` (as the broker has them) until its frame is ready.
fn send_to(broker: &mut Broker, from: &mut Engine, to: &str, devices: &[u32], text: &str) {
    let mut send = from
        .start_send(to, Outgoing::text(text), Some(devices.to_vec()), None, NOW)
        .expect("starts");
    broker.steps(from, &mut send);
}

#[test]
fn a_device_the_signed_list_lacks_is_reported_once_when_sending_to_its_account() {
    let (mut broker, mut alice, _bob) = alice_knows_bob();
    send_to(&mut broker, &mut alice, BOB, &[1], "listed only");
    assert!(unlisted(&mut alice).is_empty(), "nothing to say");

    // The broker has a device 2 of bob's that his signed list does not contain.
    send_to(&mut broker, &mut alice, BOB, &[1, 2], "one");
    assert_eq!(unlisted(&mut alice), [(BOB.to_owned(), vec![2], false)]);
    assert!(unlisted(&mut alice).is_empty(), "taken");
    // Not again for the same device, not even after a save and load...
    send_to(&mut broker, &mut alice, BOB, &[1, 2], "two");
    assert!(unlisted(&mut alice).is_empty(), "reported once");
    let key = LocalKey::generate();
    let bytes = alice.to_encrypted_bytes(&key);
    let mut alice = Engine::from_encrypted_bytes(&bytes, &key).expect("loads");
    send_to(&mut broker, &mut alice, BOB, &[1, 2], "three");
    assert!(
        unlisted(&mut alice).is_empty(),
        "reported once, across restarts"
    );
    // ...but a new one is.
    send_to(&mut broker, &mut alice, BOB, &[1, 2, 3], "four");
    assert_eq!(unlisted(&mut alice), [(BOB.to_owned(), vec![3], false)]);

    // Our own account: another device not in our list is reported, the sending device
    // itself (which gets a placeholder of its own copy) never.
    let mut own = alice
        .start_send(
            ALICE,
            Outgoing::transcript(BOB, "x"),
            Some(vec![1, 4]),
            None,
            NOW,
        )
        .expect("starts");
    broker.steps(&mut alice, &mut own);
    assert_eq!(unlisted(&mut alice), [(ALICE.to_owned(), vec![4], true)]);
}

#[test]
fn a_changed_master_key_unverifies_the_contact_and_shows_both_numbers_until_accepted() {
    let (mut broker, mut alice, _bob) = alice_knows_bob();
    send_to(&mut broker, &mut alice, BOB, &[1], "hi");
    alice.mark_verified(BOB);
    let old_number = alice.safety_number(BOB).expect("list");
    assert!(alice.conversations()[0].verified);
    assert!(!alice.conversations()[0].key_changed);
    assert_eq!(alice.key_change(BOB), None);

    // The broker now serves a list of bob's under another master key.
    let mut other = Broker::default();
    drop(other.register(BOB, 1));
    let changed = alice
        .accept_device_list(BOB, &other.lists[BOB], NOW)
        .expect_err("another master key");
    let ClientError::MasterKeyChanged {
        new_safety_number,
        new_master_key,
        ..
    } = changed
    else {
        panic!("{changed:?}");
    };
    let shown = |alice: &Engine| {
        let c = &alice.conversations()[0];
        (c.verified, c.key_changed, alice.is_verified(BOB))
    };
    assert_eq!(shown(&alice), (false, true, false), "no longer verified");
    let expected = KeyChange {
        old_safety_number: old_number,
        new_safety_number,
        new_master_key,
        was_verified: true,
    };
    assert_eq!(alice.key_change(BOB).as_ref(), Some(&expected));
    assert_ne!(expected.old_safety_number, expected.new_safety_number);
    // It is remembered.
    let key = LocalKey::generate();
    let bytes = alice.to_encrypted_bytes(&key);
    let mut alice = Engine::from_encrypted_bytes(&bytes, &key).expect("loads");
    assert_eq!(alice.key_change(BOB).as_ref(), Some(&expected));
    assert_eq!(shown(&alice), (false, true, false));

    // The broker serves the pinned key's list again: nothing is pending, the verified
    // number is bob's again.
    alice
        .accept_device_list(BOB, &broker.lists[BOB].clone(), NOW)
        .expect("the pinned key");
    assert_eq!(alice.key_change(BOB), None);
    assert_eq!(shown(&alice), (true, false, true));

    // Accepting the new key ends the change; the new number is not verified yet.
    alice
        .accept_device_list(BOB, &other.lists[BOB], NOW)
        .expect_err("changed again");
    let change = alice.key_change(BOB).expect("pending");
    alice.accept_master_key_change(BOB, &change.new_master_key);
    assert_eq!(alice.key_change(BOB), None);
    assert_eq!(shown(&alice), (false, false, false));
    alice
        .accept_device_list(BOB, &other.lists[BOB], NOW)
        .expect("the accepted key");
    assert_eq!(
        alice.safety_number(BOB).expect("list"),
        change.new_safety_number
    );
}

#[test]
fn sender_claims_are_checked_against_held_lists_and_an_unknown_device_waits_for_a_refresh() {
    let (mut broker, mut alice, mut bob) = alice_knows_bob();
    // A first contact: bob knows nothing of alice, so her list is asked for at once.
    let (_, first) = broker.prepare(&mut alice, BOB, Outgoing::text("one"));
    let (id, copy) = copy_for(&first, 1);
    assert!(matches!(
        bob.open(id, &copy, SenderList::Cached, NOW),
        Err(Unread::Need(Need::List(ref u))) if u == ALICE
    ));
    assert_eq!(
        text_of(&broker.deliver(&first, &mut bob).expect("new")).len(),
        1
    );
    // A list of any age is used: no fetch after a delivery.
    bob.set_list_max_age_ms(0);
    let (_, second) = broker.prepare(&mut alice, BOB, Outgoing::text("two"));
    let (id, copy) = copy_for(&second, 1);
    let opened = bob.open(id, &copy, SenderList::Cached, NOW + 3_600_000);
    assert!(opened.is_ok_and(|o| o.from == ALICE));
    // A device not in the list held (as for a new device of hers): held, not fetched.
    bob.record
        .lists
        .get_mut(ALICE)
        .expect("held")
        .devices
        .clear();
    let (_, third) = broker.prepare(&mut alice, BOB, Outgoing::text("three"));
    let (id, copy) = copy_for(&third, 1);
    let Err(Unread::Failed(failure)) = bob.open(id, &copy, SenderList::Cached, NOW) else {
        panic!("held");
    };
    let events = bob.settle(id, &copy, false, Err(failure));
    assert!(matches!(
        &events[..],
        [Event::Held {
            why: HoldReason::AwaitingList,
            ..
        }]
    ));
    // The refresh is brought forward to a short random delay, and fetches every contact's
    // list (never our own: that one comes from the authenticated channel).
    let due = bob.lists_refresh_due_ms(NOW);
    let (low, high) = schedule::DEFAULT_HELD_REFRESH_MS;
    assert!((NOW + low..=NOW + high).contains(&due), "{due}");
    assert_eq!(bob.lists_to_refresh(due), [ALICE]);
    assert!(
        bob.lists_refresh_due_ms(due) > due + high,
        "then periodic again"
    );
    bob.accept_device_list(ALICE, &broker.lists[ALICE], due)
        .expect("verifies");
    let held = bob.take_held(ALICE);
    assert_eq!(held.len(), 1);
    let opened = bob
        .open(
            held[0].id(),
            held[0].ciphertext(),
            SenderList::Refetched,
            due,
        )
        .unwrap_or_else(|_| panic!("read after the refresh"));
    assert_eq!(
        text_of(&opened.events),
        [(ALICE.to_owned(), "three".to_owned())]
    );
}

#[test]
fn transcripts_wait_in_the_record_and_own_sends_go_authenticated() {
    let (_, mut alice, _) = alice_knows_bob();
    assert!(
        !alice.sends_sealed_to(ALICE),
        "our own account: authenticated"
    );
    // A single device: nothing to queue.
    alice.queue_transcript(BOB, "hi", NOW);
    assert!(alice.next_transcript_due_ms().is_none());
    // Our own list not known: queued (whether it goes is decided when it is due).
    alice.forget_list(ALICE);
    alice.queue_transcript(BOB, "hi", NOW);
    let due = alice.next_transcript_due_ms().expect("queued");
    let (low, high) = schedule::DEFAULT_TRANSCRIPT_DELAY_MS;
    assert!((NOW + low..=NOW + high).contains(&due), "{due}");
    assert!(alice.due_transcript(due - 1).is_none());
    // Kept across a restart (a crash before it went).
    let key = LocalKey::generate();
    let mut reloaded =
        Engine::from_encrypted_bytes(&alice.to_encrypted_bytes(&key), &key).expect("loads");
    assert!(reloaded.due_transcript(due).is_some());
    reloaded.transcript_sent();
    assert!(reloaded.next_transcript_due_ms().is_none());
}

/// The ciphertext of a group send, for any recipient.
fn group_ciphertext(send: &GroupSend) -> (EnvelopeId, Vec<u8>) {
    match &send.frame {
        ClientFrame::GroupSend { id, ciphertext, .. } => (*id, ciphertext.clone()),
        other => panic!("not a group send: {other:?}"),
    }
}

fn recipients_of(send: &GroupSend) -> Vec<String> {
    match &send.frame {
        ClientFrame::GroupSend { recipients, .. } => {
            recipients.iter().map(|r| r.to.clone()).collect()
        }
        other => panic!("not a group send: {other:?}"),
    }
}

#[test]
fn group_sends_go_sealed_to_members_whose_token_was_shared_in_the_group() {
    let (broker, mut alice, mut bob) = alice_knows_bob();
    bob.accept_device_list(ALICE, &broker.lists[ALICE].clone(), NOW)
        .expect("verifies");
    let group = alice.create_group("Plans").expect("create");
    let package = bob.key_packages(1).expect("packages").one_time.remove(0).1;
    let change = alice
        .add_to_group(&group, &[(BOB.into(), 1, package)])
        .expect("add");
    // Alice holds only her own token: the Commit goes sealed to her own account alone, and
    // the Welcome to bob (a stranger to her so far) authenticated.
    assert!(change.commit.iter().all(|s| s.sealed));
    assert_eq!(change.welcome.len(), 1);
    assert!(!change.welcome[0].sealed);
    alice.commit_answer(&group, true).expect("merge");
    let (id, welcome) = group_ciphertext(&change.welcome[0]);
    let events = bob.open_group(id, &welcome);
    assert!(
        matches!(&events[0], Event::Group(GroupEvent::Joined { .. })),
        "{events:?}"
    );

    // Before bob's token arrives, alice's text has a sealed part (her own account) and an
    // authenticated one (bob), each its own MLS message.
    let sends = alice.group_text(&group, "first", NOW).expect("text");
    assert_eq!(sends.len(), 2);
    assert_eq!(recipients_of(&sends[0]), vec![ALICE.to_owned()]);
    assert!(sends[0].sealed && !sends[1].sealed);
    assert_ne!(group_ciphertext(&sends[0]).1, group_ciphertext(&sends[1]).1);
    let (id, text) = group_ciphertext(&sends[1]);
    let events = bob.open_group(id, &text);
    assert!(
        matches!(&events[..], [Event::Group(GroupEvent::Message { text, .. })] if text == "first")
    );

    // Bob shares his token in the group; from then on one sealed send reaches everyone.
    let share = bob.group_token_share(&group).expect("share");
    let (id, token) = group_ciphertext(&share[0]);
    assert!(alice.open_group(id, &token).is_empty());
    let sends = alice.group_text(&group, "second", NOW).expect("text");
    assert_eq!(sends.len(), 1);
    assert!(sends[0].sealed);
    assert_eq!(
        recipients_of(&sends[0]),
        vec![ALICE.to_owned(), BOB.to_owned()]
    );
    let (id, text) = group_ciphertext(&sends[0]);
    let events = bob.open_group(id, &text);
    assert!(
        matches!(&events[..], [Event::Group(GroupEvent::Message { text, .. })] if text == "second")
    );
    // Alice's own copy comes back and is recognised.
    assert!(alice.is_seen(id));
}

/// A time after every receipt delay.
const LATER: u64 = NOW + 60_000;

/// The class and time-to-live of a send frame.
fn delivery_of(frame: &ClientFrame) -> (sealpost_proto::Class, u32) {
    match frame {
        ClientFrame::Send {
            class, ttl_secs, ..
        }
        | ClientFrame::SealedSend {
            class, ttl_secs, ..
        } => (*class, *ttl_secs),
        _ => panic!("not a send"),
    }
}

/// The broker accepts `send`.
fn accepted(engine: &mut Engine, send: &mut Send) {
    let progress = engine
        .send_answer(send, SendOutcome::Accepted { duplicate: false })
        .expect("answer");
    assert_eq!(progress, SendProgress::Sent(send.id()));
}

/// The state of the message `id` in `engine`'s conversation with `peer`.
fn state_of(engine: &Engine, peer: &str, id: EnvelopeId) -> MessageState {
    engine
        .conversations()
        .into_iter()
        .find(|c| c.with == peer)
        .and_then(|c| c.messages.into_iter().find(|m| m.id == Some(id)))
        .expect("the message is stored")
        .state
}

fn reloaded(engine: &mut Engine) -> Engine {
    let key = LocalKey::generate();
    Engine::from_encrypted_bytes(&engine.to_encrypted_bytes(&key), &key).expect("loads")
}

/// Sends every receipt `from` owes through the broker to its recipients' `to` engine;
/// returns the events there.
fn send_receipts(broker: &mut Broker, from: &mut Engine, to: &mut Engine) -> Vec<Event> {
    let mut events = Vec::new();
    for (peer, outgoing) in from.take_receipts(LATER) {
        assert_eq!(peer, to.user());
        let (_, frame) = broker.prepare(from, &peer, outgoing);
        assert_eq!(delivery_of(&frame).0, sealpost_proto::Class::Durable);
        events.extend(broker.deliver(&frame, to).expect("new"));
    }
    events
}

/// Alice and Bob, each holding the other's list, Alice's token with Bob (so he writes sealed).
fn alice_and_bob_talking() -> (Broker, Engine, Engine) {
    let (mut broker, mut alice, mut bob) = alice_knows_bob();
    let token = alice.delivery_token_outgoing();
    let (_, frame) = broker.prepare(&mut alice, BOB, token);
    broker.deliver(&frame, &mut bob).expect("new");
    alice.mark_token_shared(BOB);
    (broker, alice, bob)
}

#[test]
fn receipts_move_a_sent_message_through_its_states_and_survive_a_restart() {
    let (mut broker, mut alice, mut bob) = alice_and_bob_talking();
    let (mut send, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("hi bob"));
    let id = send.id();
    assert_eq!(state_of(&alice, BOB, id), MessageState::Sending);
    accepted(&mut alice, &mut send);
    assert_eq!(state_of(&alice, BOB, id), MessageState::Sent);
    assert!(alice.message_accepted(id).is_none(), "once");

    // Bob decrypts it: unread, and a delivered receipt is owed.
    broker.deliver(&frame, &mut bob).expect("new");
    let conversation = &bob.conversations()[0];
    assert_eq!(conversation.unread, 1);
    assert_eq!(
        conversation.messages[0].id,
        Some(id),
        "the same id on both sides"
    );
    assert!(bob.owes_receipts());
    // Not at once: after a random delay, so that the broker cannot pair the two sends.
    let due = bob.next_receipts_due_ms().expect("owed");
    let (low, high) = schedule::DEFAULT_RECEIPT_DELAY_MS;
    assert!((NOW + low..=NOW + high).contains(&due), "{due}");
    assert!(bob.take_receipts(due - 1).is_empty());
    let events = send_receipts(&mut broker, &mut bob, &mut alice);
    assert!(
        matches!(&events[..], [Event::Receipt { peer, ids, state: MessageState::Delivered }]
            if peer == BOB && ids == &[id]),
        "{events:?}"
    );
    assert_eq!(state_of(&alice, BOB, id), MessageState::Delivered);
    // No receipt for a receipt, on either side.
    assert!(!alice.owes_receipts() && !bob.owes_receipts());
    let mut alice = reloaded(&mut alice);
    assert_eq!(state_of(&alice, BOB, id), MessageState::Delivered, "kept");

    // Two more, then Bob reads the conversation: one read receipt for all three.
    let mut ids = vec![id];
    for text in ["two", "three"] {
        let (send, frame) = broker.prepare(&mut alice, BOB, Outgoing::text(text));
        ids.push(send.id());
        broker.deliver(&frame, &mut bob).expect("new");
    }
    send_receipts(&mut broker, &mut bob, &mut alice);
    assert_eq!(bob.mark_read(ALICE, NOW), ids);
    assert_eq!(bob.conversations()[0].unread, 0);
    assert!(bob.mark_read(ALICE, NOW).is_empty(), "read once");
    let receipts = bob.take_receipts(LATER);
    assert_eq!(receipts.len(), 1, "batched");
    assert!(matches!(
        receipts[0].1.contents(),
        Payload::Receipt { kind: crate::crypto::ReceiptKind::Read, ids: read } if read.len() == 3
    ));
    let (_, frame) = broker.prepare(&mut bob, ALICE, receipts.into_iter().next().unwrap().1);
    let events = broker.deliver(&frame, &mut alice).expect("new");
    assert!(
        matches!(&events[..], [Event::Receipt { ids: read, state: MessageState::Read, .. }]
            if read == &ids),
        "{events:?}"
    );
    assert!(broker.deliver(&frame, &mut alice).is_none(), "a duplicate");
    // A late delivered receipt does not move a message back.
    assert!(
        alice
            .apply_receipt(BOB, crate::crypto::ReceiptKind::Delivered, &[id.0])
            .is_empty()
    );
    let alice = reloaded(&mut alice);
    for id in ids {
        assert_eq!(state_of(&alice, BOB, id), MessageState::Read);
    }
    assert!(!alice.owes_receipts());
}

#[test]
fn with_read_receipts_off_none_are_sent_nor_shown_and_delivered_ones_still_go() {
    let (mut broker, mut alice, mut bob) = alice_and_bob_talking();
    assert!(bob.read_receipts(), "on by default");
    bob.set_read_receipts(false);
    let mut bob = reloaded(&mut bob);
    assert!(!bob.read_receipts(), "kept across a restart");

    let (send, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("hi"));
    broker.deliver(&frame, &mut bob).expect("new");
    let events = send_receipts(&mut broker, &mut bob, &mut alice);
    assert!(matches!(
        &events[..],
        [Event::Receipt {
            state: MessageState::Delivered,
            ..
        }]
    ));
    assert_eq!(
        bob.mark_read(ALICE, NOW),
        [send.id()],
        "read here all the same"
    );
    assert!(!bob.owes_receipts(), "but nobody is told");

    // Bob writes; Alice reads it. Bob, with his own read receipts off, does not see hers.
    let (reply, frame) = broker.prepare(&mut bob, ALICE, Outgoing::text("hello"));
    broker.deliver(&frame, &mut alice).expect("new");
    alice.mark_read(BOB, NOW);
    let events = send_receipts(&mut broker, &mut alice, &mut bob);
    assert!(
        matches!(
            &events[..],
            [Event::Receipt {
                state: MessageState::Delivered,
                ..
            }]
        ),
        "only the delivered one shows: {events:?}"
    );
    assert_eq!(state_of(&bob, ALICE, reply.id()), MessageState::Delivered);
}

#[test]
fn typing_is_ephemeral_stored_nowhere_and_a_lost_one_does_not_break_the_session() {
    let (mut broker, mut alice, mut bob) = alice_knows_bob();
    // The very first envelope of the session is a typing indicator, and it is lost.
    let (_, lost) = broker.prepare(&mut alice, BOB, Outgoing::typing(true));
    assert_eq!(
        delivery_of(&lost),
        (
            sealpost_proto::Class::Ephemeral,
            Delivery::EPHEMERAL.ttl_secs
        )
    );
    let (_, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("first"));
    assert_eq!(
        text_of(&broker.deliver(&frame, &mut bob).expect("new")),
        [(ALICE.to_owned(), "first".to_owned())]
    );
    // Bob replies (the session is confirmed), then Alice's next typing is lost too, and
    // another one arrives after the text sent behind it.
    let token = bob.delivery_token_outgoing();
    let (_, frame) = broker.prepare(&mut bob, ALICE, token);
    broker.deliver(&frame, &mut alice).expect("new");
    broker.prepare(&mut alice, BOB, Outgoing::typing(true));
    let (_, late) = broker.prepare(&mut alice, BOB, Outgoing::typing(false));
    let (_, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("second"));
    assert_eq!(
        text_of(&broker.deliver(&frame, &mut bob).expect("new")),
        [(ALICE.to_owned(), "second".to_owned())]
    );
    let events = broker.deliver(&late, &mut bob).expect("new");
    assert!(
        matches!(&events[..], [Event::Typing { peer, device: 1, on: false }] if peer == ALICE),
        "{events:?}"
    );
    // Nothing of typing is stored or acknowledged.
    let messages = &bob.conversations()[0].messages;
    assert_eq!(messages.len(), 2, "only the texts");
    let receipts = bob.take_receipts(LATER);
    assert!(matches!(
        receipts[..],
        [(_, ref o)] if matches!(o.contents(), Payload::Receipt { ids, .. } if ids.len() == 2)
    ));
    assert!(
        alice.conversations()[0].messages.len() == 2,
        "alice: her two texts"
    );
}

/// A second device for `first`'s account (linked as in
/// `a_linked_device_gets_the_grant_and_both_devices_read_what_comes_next`).
fn link_second_device(broker: &mut Broker, first: &mut Engine) -> Engine {
    let handle = first.user().to_owned();
    let code = first.new_link_code("brokercode", NOW + 600_000, NOW);
    let (_, secret) = split_link_code(&code.code).expect("code");
    let new = NewDevice::generate();
    broker
        .identity
        .insert((handle.clone(), 2), new.identity_keys());
    let mut second = new.link(&handle, 2, &[8; 32], &secret, "");
    broker.publish_keys(&mut second);
    second
        .accept_device_list(&handle, &broker.lists[&handle].clone(), NOW)
        .expect("pins");
    let request = second.link_request_outgoing().expect("linking");
    let (_, frame) = broker.prepare(&mut second, &handle, request);
    broker.deliver(&frame, first).expect("new");
    let keys = crate::crypto::PublicDeviceKeys::from_bytes(&broker.identity[&(handle.clone(), 2)])
        .expect("broker keys");
    let signed = first
        .approved_list(2, keys)
        .expect("signs")
        .expect("a new version")
        .to_bytes();
    broker.lists.insert(handle.clone(), signed.clone());
    first.confirm_own_list(&signed, NOW).expect("published");
    let grant = first.link_grant_outgoing().expect("approving");
    let (_, frame) = broker.prepare(first, &handle, grant);
    first.finish_approval();
    let events = broker.deliver(&frame, &mut second).expect("new");
    assert!(matches!(events[..], [Event::Linked]), "{events:?}");
    second
}

#[test]
fn a_disappearing_timer_set_on_one_device_is_honoured_by_the_peer_and_the_other_device() {
    let (mut broker, mut alice, mut bob) = alice_and_bob_talking();
    let mut alice2 = link_second_device(&mut broker, &mut alice);
    bob.accept_device_list(ALICE, &broker.lists[ALICE].clone(), NOW)
        .expect("alice's new list");
    alice2
        .accept_device_list(BOB, &broker.lists[BOB].clone(), NOW)
        .expect("bob's list");
    assert!(
        alice.set_disappearing(BOB, Some(10), NOW).is_err(),
        "too short"
    );
    assert!(
        alice.set_disappearing(ALICE, Some(60), NOW).is_err(),
        "not a contact"
    );

    let envelopes = alice.set_disappearing(BOB, Some(3600), NOW).expect("set");
    assert_eq!(alice.disappearing(BOB), Some(3600));
    assert_eq!(
        envelopes
            .iter()
            .map(|(to, _)| to.as_str())
            .collect::<Vec<_>>(),
        [BOB, ALICE],
        "the peer and our other device"
    );
    for (to, outgoing) in envelopes {
        let (_, frame) = broker.prepare(&mut alice, &to, outgoing);
        let (peer, engine) = if to == BOB {
            (ALICE, &mut bob)
        } else {
            (BOB, &mut alice2)
        };
        let events = broker.deliver(&frame, engine).expect("new");
        assert!(
            matches!(&events[..], [Event::Disappearing { peer: p, by, secs: Some(3600) }]
                if p == peer && by == ALICE),
            "{events:?}"
        );
        assert_eq!(engine.disappearing(peer), Some(3600));
    }
    // Every device shows the change as a line, which is not a message.
    for (engine, peer) in [(&alice, BOB), (&alice2, BOB), (&bob, ALICE)] {
        let conversation = engine
            .conversations()
            .into_iter()
            .find(|c| c.with == peer)
            .expect("conversation");
        assert_eq!(conversation.disappearing_secs, Some(3600));
        let line = conversation.messages.last().expect("the line");
        assert_eq!(line.timer_secs, Some(3600));
        assert_eq!(line.text, "messages disappear after 1 hour");
        assert_eq!(conversation.unread, 0);
    }
    assert!(!bob.owes_receipts(), "a timer is not acknowledged");

    // Messages both ways (and the transcript) go with the timer as their broker TTL, and
    // expire on every device.
    let (sent, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("secret"));
    assert_eq!(delivery_of(&frame).1, 3600);
    broker.deliver(&frame, &mut bob).expect("new");
    alice.queue_transcript(BOB, "secret", NOW);
    let due = alice.next_transcript_due_ms().expect("queued");
    let transcript = alice.due_transcript(due).expect("due");
    let (transcript_send, frame) = broker.prepare(&mut alice, ALICE, transcript);
    assert_eq!(delivery_of(&frame).1, 3600, "the transcript too");
    broker.deliver(&frame, &mut alice2).expect("new");
    let (reply, frame) = broker.prepare(&mut bob, ALICE, Outgoing::text("gone soon"));
    assert_eq!(delivery_of(&frame).1, 3600, "bob honours it");
    broker.deliver(&frame, &mut alice).expect("new");
    assert_eq!(
        text_of(&broker.deliver(&frame, &mut alice2).expect("new")),
        [(BOB.to_owned(), "gone soon".to_owned())]
    );

    let expiry = NOW + 3_600_000;
    for engine in [&mut alice, &mut alice2, &mut bob] {
        assert_eq!(engine.next_expiry_ms(), Some(expiry));
        assert!(engine.expire_messages(expiry - 1).is_empty());
        let mut engine = reloaded(engine);
        let events = engine.expire_messages(expiry);
        let Some(Event::Expired { ids, .. }) = events.first() else {
            panic!("{events:?}");
        };
        assert!(
            ids.contains(&reply.id()),
            "{} {events:?}",
            engine.device_id()
        );
        assert!(
            ids.iter()
                .all(|id| [sent.id(), transcript_send.id(), reply.id()].contains(id))
        );
        let conversation = &engine.conversations()[0];
        assert!(
            conversation.messages.iter().all(|m| m.timer_secs.is_some()),
            "only the timer line stays"
        );
        assert_eq!(engine.next_expiry_ms(), None);
    }

    // Bob turns it off; an older setting that arrives late changes nothing.
    let envelopes = bob.set_disappearing(ALICE, None, NOW + 10).expect("off");
    assert_eq!(envelopes.len(), 1, "bob has no other device");
    let (_, frame) = broker.prepare(&mut bob, ALICE, envelopes.into_iter().next().unwrap().1);
    let events = broker.deliver(&frame, &mut alice).expect("new");
    assert!(matches!(
        &events[..],
        [Event::Disappearing { secs: None, .. }]
    ));
    assert_eq!(alice.disappearing(BOB), None);
    let bob_info = SenderInfo {
        user: BOB.into(),
        device: 1,
    };
    assert!(
        alice
            .apply_timer(BOB, &bob_info, EnvelopeId([9; 16]), NOW - 5, 60)
            .is_empty()
    );
    assert_eq!(alice.disappearing(BOB), None);
    let (_, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("kept"));
    assert_eq!(delivery_of(&frame).1, send::MESSAGE_TTL_SECS);
}

#[test]
fn a_payload_kind_this_build_does_not_know_is_rejected_and_the_session_goes_on() {
    // What an older client meets when a newer one sends a receipt, typing or a timer.
    let (mut broker, mut alice, mut bob) = alice_and_bob_talking();
    let (_, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("before"));
    broker.deliver(&frame, &mut bob).expect("new");
    let keys = alice.listed_keys(BOB, 1).expect("bob's keys");
    let olm = alice
        .state
        .sessions
        .encrypt_encoded(BOB, 1, vec![1, 0x7f, 0xff, 0x90])
        .expect("encrypts");
    let me = SenderInfo {
        user: ALICE.into(),
        device: 1,
    };
    let sealed = seal(BOB, 1, &keys.seal_x25519, &me, NOW, &olm).expect("seals");
    let events = broker
        .read(&mut bob, EnvelopeId([6; 16]), &sealed)
        .expect("new");
    assert!(
        matches!(
            &events[..],
            [Event::Rejected {
                error: crate::error::EnvelopeError::Session {
                    error: SessionError::Payload(crate::crypto::PayloadError::UnknownKind(0x7fff)),
                    ..
                },
                ..
            }]
        ),
        "{events:?}"
    );
    let (_, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("after"));
    assert_eq!(
        text_of(&broker.deliver(&frame, &mut bob).expect("new")),
        [(ALICE.to_owned(), "after".to_owned())]
    );
    assert_eq!(
        bob.conversations()[0].messages.len(),
        2,
        "nothing stored of it"
    );
}

/// How many messages from `peer` the `events` say may be missing, if they say.
fn missing_in(events: &[Event], peer: &str) -> Option<usize> {
    events.iter().rev().find_map(|e| match e {
        Event::MaybeMissing { peer: p, count } if p == peer => Some(*count),
        _ => None,
    })
}

#[test]
fn a_message_the_broker_withholds_is_named_by_the_next_and_reported_until_it_arrives() {
    let (mut broker, mut alice, mut bob) = alice_and_bob_talking();
    let mut sent = Vec::new();
    for text in ["one", "two", "three", "four"] {
        let (mut send, frame) = broker.prepare(&mut alice, BOB, Outgoing::text(text));
        accepted(&mut alice, &mut send);
        sent.push(frame);
    }
    // Loss-free, and a redelivery of "one": nothing is missing.
    let events = broker.deliver(&sent[0], &mut bob).expect("new");
    assert_eq!(missing_in(&events, ALICE), None, "{events:?}");
    assert!(broker.deliver(&sent[0], &mut bob).is_none(), "a duplicate");
    // "two" is withheld; "three" names it.
    let events = broker.deliver(&sent[2], &mut bob).expect("new");
    assert_eq!(missing_in(&events, ALICE), Some(1), "{events:?}");
    assert_eq!(bob.conversations()[0].missing, 1);
    let bob = &mut reloaded(&mut bob);
    assert_eq!(bob.missing_from(ALICE), 1, "kept across a restart");
    // "four" names only "three": still one missing, no new event.
    let events = broker.deliver(&sent[3], bob).expect("new");
    assert_eq!(missing_in(&events, ALICE), None, "{events:?}");
    // The broker delivers "two" late: nothing is missing any more.
    let events = broker.deliver(&sent[1], bob).expect("new");
    assert_eq!(missing_in(&events, ALICE), Some(0), "{events:?}");
    assert_eq!(bob.conversations()[0].missing, 0);
}

#[test]
fn a_send_that_failed_or_came_before_the_recipient_saw_the_chain_is_never_missing() {
    let (mut broker, mut alice, mut bob) = alice_and_bob_talking();
    // Sent before Bob's device saw anything of Alice's chain, and never delivered to him.
    let (mut early, _) = broker.prepare(&mut alice, BOB, Outgoing::text("early"));
    accepted(&mut alice, &mut early);
    // A send the broker refused for good, then given up.
    let (refused, _) = broker.prepare(&mut alice, BOB, Outgoing::text("refused"));
    alice.abandon_send(refused);
    let (mut send, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("first seen"));
    accepted(&mut alice, &mut send);
    let events = broker.deliver(&frame, &mut bob).expect("new");
    assert_eq!(missing_in(&events, ALICE), None, "{events:?}");
    let (mut send, frame) = broker.prepare(&mut alice, BOB, Outgoing::text("next"));
    accepted(&mut alice, &mut send);
    let events = broker.deliver(&frame, &mut bob).expect("new");
    assert_eq!(missing_in(&events, ALICE), None, "{events:?}");
    assert_eq!(bob.missing_from(ALICE), 0);
}

#[test]
fn a_broker_that_delivers_a_later_message_under_the_withheld_ones_id_is_still_caught() {
    let (mut broker, mut alice, mut bob) = alice_and_bob_talking();
    let mut sent = Vec::new();
    for text in ["one", "two", "three"] {
        let (mut send, frame) = broker.prepare(&mut alice, BOB, Outgoing::text(text));
        accepted(&mut alice, &mut send);
        sent.push(frame);
    }
    broker.deliver(&sent[0], &mut bob).expect("new");
    // "two" is withheld, and "three" is delivered under its id: the text's own id (inside
    // the encryption) says which message it is.
    let (two_id, _) = copy_for(&sent[1], bob.device_id());
    let (_, three) = copy_for(&sent[2], bob.device_id());
    let events = broker.read(&mut bob, two_id, &three).expect("new");
    assert_eq!(missing_in(&events, ALICE), Some(1), "{events:?}");
}

#[test]
fn a_retried_send_keeps_its_link_and_a_missing_message_past_its_expiry_is_forgotten() {
    let (mut broker, mut alice, mut bob) = alice_and_bob_talking();
    let (mut send, first) = broker.prepare(&mut alice, BOB, Outgoing::text("one"));
    accepted(&mut alice, &mut send);
    broker.deliver(&first, &mut bob).expect("new");
    let (mut send, _) = broker.prepare(&mut alice, BOB, Outgoing::text("two"));
    accepted(&mut alice, &mut send);
    // "three" is started, its state lost (a reloaded page), and started again under the
    // same id with a fresh payload, as a page retries after stale_devices.
    let (lost, _) = broker.prepare(&mut alice, BOB, Outgoing::text("three"));
    let id = lost.id();
    let mut retry = alice
        .start_send(BOB, Outgoing::text("three"), None, Some(id), NOW)
        .expect("starts");
    let frame = broker.steps(&mut alice, &mut retry);
    // "two" was withheld: the retried "three" still names it.
    let events = broker.deliver(&frame, &mut bob).expect("new");
    assert_eq!(missing_in(&events, ALICE), Some(1), "{events:?}");
    // Once the broker would have let "two" expire anyway, not having it means nothing.
    let far = NOW + 400 * 24 * 3600 * 1000;
    let events = bob.expire_messages(far);
    assert_eq!(missing_in(&events, ALICE), Some(0), "{events:?}");
    assert_eq!(bob.missing_from(ALICE), 0);
}
