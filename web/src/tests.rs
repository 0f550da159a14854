//! Host-side tests of the engine: two engines talk through hand-made broker frames.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sealpost_client::engine::CALL_TTL_SECS;
use sealpost_proto::{Class, Envelope};

use super::*;

struct Side {
    engine: Engine,
    list: String,
    keys: Value,
}

fn side(handle: &str, device: u32) -> Side {
    let pending = PendingAccount::create(handle).unwrap();
    assert!(!pending.identity_keys().is_empty());
    let mut engine = pending
        .finish(
            device,
            &URL_SAFE_NO_PAD.encode([u8::try_from(device).unwrap(); 32]),
        )
        .unwrap();
    let body = engine.own_device_list().unwrap();
    engine.confirm_own_list(&body).unwrap();
    let list: Value = serde_json::from_str(&body).unwrap();
    let keys: Value = serde_json::from_str(&engine.key_upload()).unwrap();
    engine.mark_keys_published();
    assert_eq!(engine.key_upload(), "");
    Side {
        engine,
        list: list["signed"].as_str().unwrap().to_owned(),
        keys,
    }
}

/// What the broker would deliver to `device` of an encrypted frame (base64).
fn deliver(frame_b64: &str, device: u32, seq: u64) -> Vec<u8> {
    let frame = ClientFrame::decode(&STANDARD.decode(frame_b64).unwrap()).unwrap();
    let (id, class, copies) = match frame {
        ClientFrame::Send {
            id, class, copies, ..
        }
        | ClientFrame::SealedSend {
            id, class, copies, ..
        } => (id, class, copies),
        other => panic!("not a send: {other:?}"),
    };
    let copy = copies.into_iter().find(|c| c.device.0 == device).unwrap();
    ServerFrame::Deliver {
        seq,
        envelope: Envelope {
            id,
            class,
            accepted_ms: 1,
            expires_ms: 2,
            ciphertext: copy.ciphertext,
        },
    }
    .encode()
}

fn receive(engine: &mut Engine, frame: &[u8], sender_list: &str) -> Value {
    let first: Value = serde_json::from_str(&engine.receive(frame, false).unwrap()).unwrap();
    if let Some(user) = first["need_list"].as_str() {
        engine.accept_device_list(user, sender_list).unwrap();
        serde_json::from_str(&engine.receive(frame, true).unwrap()).unwrap()
    } else {
        first
    }
}

#[test]
fn two_engines_exchange_messages_and_call_signaling() {
    let mut alice = side("alice@test.example", 1);
    let mut bob = side("bob@test.example", 1);
    let summary: Value = serde_json::from_str(
        &alice
            .engine
            .accept_device_list("bob@test.example", &bob.list)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(summary["devices"], json!([1]));
    assert_eq!(
        alice.engine.devices_without_session("bob@test.example"),
        "[1]"
    );
    let claim: Value =
        serde_json::from_str(&alice.engine.claim_headers("bob@test.example")).unwrap();
    assert!(
        claim["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer 1.")
    );
    let key = bob.keys["one_time_keys"][0]["key"].as_str().unwrap();
    alice
        .engine
        .create_session("bob@test.example", 1, key)
        .unwrap();
    assert_eq!(
        alice.engine.devices_without_session("bob@test.example"),
        "[]"
    );

    // First contact: the delivery token, authenticated route.
    let out: Value = serde_json::from_str(
        &alice
            .engine
            .encrypt("bob@test.example", r#"{"kind":"delivery_token"}"#, "", "")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(out["sealed"], false);
    let got = receive(
        &mut bob.engine,
        &deliver(out["frame"].as_str().unwrap(), 1, 1),
        &alice.list,
    );
    assert_eq!(got["event"]["event"], "contact");
    assert!(bob.engine.sends_sealed_to("alice@test.example"));
    // Redelivery of the same envelope is a duplicate.
    let again = receive(
        &mut bob.engine,
        &deliver(out["frame"].as_str().unwrap(), 1, 1),
        &alice.list,
    );
    assert_eq!(again["event"]["event"], "duplicate");

    let out: Value = serde_json::from_str(
        &alice
            .engine
            .encrypt(
                "bob@test.example",
                r#"{"kind":"text","body":"hello bob"}"#,
                "",
                "",
            )
            .unwrap(),
    )
    .unwrap();
    let got = receive(
        &mut bob.engine,
        &deliver(out["frame"].as_str().unwrap(), 1, 2),
        &alice.list,
    );
    assert_eq!(got["event"]["text"], "hello bob");
    assert_eq!(got["event"]["from"], "alice@test.example");

    // Bob replies sealed (he holds Alice's token) with a call offer.
    bob.engine
        .create_session(
            "alice@test.example",
            1,
            alice.keys["one_time_keys"][0]["key"].as_str().unwrap(),
        )
        .unwrap();
    let call_id = Engine::new_call_id();
    let offer = json!({"kind": "call_offer", "call_id": call_id, "sdp": "v=0 sdp",
                       "fingerprint": "sha-256 AB:CD", "video": true});
    let out: Value = serde_json::from_str(
        &bob.engine
            .encrypt("alice@test.example", &offer.to_string(), "", "")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(out["sealed"], true);
    let frame = ClientFrame::decode(&STANDARD.decode(out["frame"].as_str().unwrap()).unwrap());
    assert!(matches!(
        frame,
        Ok(ClientFrame::SealedSend {
            class: Class::Urgent,
            ttl_secs: CALL_TTL_SECS,
            ..
        })
    ));
    let got = receive(
        &mut alice.engine,
        &deliver(out["frame"].as_str().unwrap(), 1, 1),
        &bob.list,
    );
    assert_eq!(got["event"]["event"], "call");
    assert_eq!(got["event"]["payload"]["kind"], "call_offer");
    assert_eq!(got["event"]["payload"]["call_id"], json!(call_id));
    assert_eq!(got["event"]["payload"]["fingerprint"], "sha-256 AB:CD");

    // Safety numbers agree on both sides.
    assert_eq!(
        alice.engine.safety_number("bob@test.example").unwrap(),
        bob.engine.safety_number("alice@test.example").unwrap()
    );

    // State survives a save and load.
    let key = Engine::new_local_key();
    let saved = bob.engine.save(&key).unwrap();
    let restored = Engine::load(&saved, &key).unwrap();
    let conversations: Value = serde_json::from_str(&restored.conversations()).unwrap();
    assert_eq!(conversations[0]["with"], "alice@test.example");
    assert_eq!(conversations[0]["messages"][0]["text"], "hello bob");
    assert!(restored.sends_sealed_to("alice@test.example"));
}

#[test]
fn an_envelope_for_another_device_is_rejected() {
    let mut alice = side("alice@test.example", 1);
    let bob = side("bob@test.example", 1);
    // Another device that got hold of device 1's copy (same account name, other keys).
    let mut other = side("bob@test.example", 2);
    alice
        .engine
        .accept_device_list("bob@test.example", &bob.list)
        .unwrap();
    alice
        .engine
        .create_session(
            "bob@test.example",
            1,
            bob.keys["one_time_keys"][0]["key"].as_str().unwrap(),
        )
        .unwrap();
    let out: Value = serde_json::from_str(
        &alice
            .engine
            .encrypt("bob@test.example", r#"{"kind":"text","body":"x"}"#, "", "")
            .unwrap(),
    )
    .unwrap();
    let frame = deliver(out["frame"].as_str().unwrap(), 1, 1);
    let got: Value = serde_json::from_str(&other.engine.receive(&frame, false).unwrap()).unwrap();
    assert_eq!(got["event"]["event"], "rejected");
    assert!(!got.to_string().contains("\"x\""));
}

#[test]
fn fingerprints_come_from_the_sdp() {
    let sdp =
        "v=0\r\na=fingerprint:SHA-256 ab:cd:ef\r\nm=audio\r\na=fingerprint:sha-256 AB:CD:EF\r\n";
    assert_eq!(sdp_fingerprint(sdp), "sha-256 AB:CD:EF");
    assert!(fingerprints_match(
        &sdp_fingerprint(sdp),
        "sha-256 AB:CD:EF"
    ));
    assert!(!fingerprints_match(
        &sdp_fingerprint(sdp),
        "sha-256 AB:CD:EE"
    ));
    assert_eq!(
        sdp_fingerprint("a=fingerprint:sha-256 AA\r\na=fingerprint:sha-256 BB\r\n"),
        ""
    );
    assert_eq!(sdp_fingerprint("v=0\r\n"), "");
    assert!(!fingerprints_match("", ""));
}

#[test]
fn unlisted_devices_and_a_changed_master_key_reach_the_page() {
    const BOB: &str = "bob@test.example";
    let mut alice = side("alice@test.example", 1);
    let bob = side(BOB, 1);
    alice.engine.accept_device_list(BOB, &bob.list).unwrap();
    let key = bob.keys["one_time_keys"][0]["key"].as_str().unwrap();
    alice.engine.create_session(BOB, 1, key).unwrap();
    assert_eq!(alice.engine.take_notices(), "[]");
    let text = r#"{"kind":"text","body":"hi"}"#;
    alice.engine.encrypt(BOB, text, "", "[1,2]").unwrap();
    let notices: Value = serde_json::from_str(&alice.engine.take_notices()).unwrap();
    assert_eq!(
        notices,
        json!([{"user": BOB, "devices": [2], "own_account": false}])
    );
    alice.engine.encrypt(BOB, text, "", "[1,2]").unwrap();
    assert_eq!(alice.engine.take_notices(), "[]", "once");

    // Bob's list under another master key.
    alice.engine.mark_verified(BOB);
    assert_eq!(alice.engine.key_change(BOB), "");
    let impostor = side(BOB, 1);
    // (Through the core: a `JsError` cannot be made off wasm.)
    let signed = http::signed_list(&json!({ "signed": impostor.list })).unwrap();
    let changed = alice.engine.core.accept_device_list(BOB, &signed, now_ms());
    assert!(matches!(changed, Err(ClientError::MasterKeyChanged { .. })));
    let change: Value = serde_json::from_str(&alice.engine.key_change(BOB)).unwrap();
    assert_eq!(change["was_verified"], json!(true));
    assert_ne!(change["old_safety_number"], change["new_safety_number"]);
    let conversations: Value = serde_json::from_str(&alice.engine.conversations()).unwrap();
    assert_eq!(conversations[0]["verified"], json!(false));
    assert_eq!(conversations[0]["key_changed"], json!(true));
    alice
        .engine
        .accept_key_change(BOB, change["new_master_key"].as_str().unwrap())
        .unwrap();
    assert_eq!(alice.engine.key_change(BOB), "");
    let summary: Value = serde_json::from_str(
        &alice
            .engine
            .accept_device_list(BOB, &impostor.list)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(summary["safety_number"], change["new_safety_number"]);
    assert_eq!(summary["verified"], json!(false));
}

/// Encrypts `payload` (JSON) from `from` to `to`: the frame (base64) and the envelope id.
fn encrypt(from: &mut Engine, to: &str, payload: &Value) -> (String, String) {
    let out: Value =
        serde_json::from_str(&from.encrypt(to, &payload.to_string(), "", "").unwrap()).unwrap();
    (
        out["frame"].as_str().unwrap().to_owned(),
        out["id"].as_str().unwrap().to_owned(),
    )
}

/// The message `id` of `engine`'s first conversation, as the page gets it.
fn message(engine: &Engine, id: &str) -> Value {
    let conversations: Value = serde_json::from_str(&engine.conversations()).unwrap();
    conversations[0]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn receipts_typing_and_disappearing_messages_reach_the_page() {
    const ALICE: &str = "alice@test.example";
    const BOB: &str = "bob@test.example";
    let mut alice = side(ALICE, 1);
    let mut bob = side(BOB, 1);
    alice.engine.accept_device_list(BOB, &bob.list).unwrap();
    let key = bob.keys["one_time_keys"][0]["key"].as_str().unwrap();
    alice.engine.create_session(BOB, 1, key).unwrap();
    let (frame, _) = encrypt(&mut alice.engine, BOB, &json!({"kind": "delivery_token"}));
    receive(&mut bob.engine, &deliver(&frame, 1, 1), &alice.list);
    let key = alice.keys["one_time_keys"][0]["key"].as_str().unwrap();
    bob.engine.create_session(ALICE, 1, key).unwrap();
    bob.engine.set_receipt_delay(0.0, 0.0);

    // Sending → sent (the broker's answer) → delivered → read.
    let (frame, id) = encrypt(
        &mut alice.engine,
        BOB,
        &json!({"kind": "text", "body": "hi"}),
    );
    assert_eq!(message(&alice.engine, &id)["state"], "sending");
    let accepted = ServerFrame::SendResult {
        id: EnvelopeId(unhex::<16>(&id).unwrap()),
        outcome: SendOutcome::Accepted { duplicate: false },
    }
    .encode();
    let answer: Value =
        serde_json::from_str(&alice.engine.receive(&accepted, false).unwrap()).unwrap();
    assert_eq!(
        answer["receipt"],
        json!({"event": "receipt", "peer": BOB, "ids": [id], "state": "sent"})
    );
    assert_eq!(message(&alice.engine, &id)["state"], "sent");
    let got = receive(&mut bob.engine, &deliver(&frame, 1, 2), &alice.list);
    assert_eq!(got["id"], id.as_str());
    assert_eq!(message(&bob.engine, &id)["state"], "received");
    let conversations: Value = serde_json::from_str(&bob.engine.conversations()).unwrap();
    assert_eq!(conversations[0]["unread"], 1);
    assert!(bob.engine.next_receipts_due_ms() >= 0.0);
    let receipts: Value = serde_json::from_str(&bob.engine.take_receipts()).unwrap();
    assert_eq!(
        receipts,
        json!([{"to": ALICE, "payload": {"kind": "receipt", "state": "delivered", "ids": [id]}}])
    );
    let (frame, _) = encrypt(&mut bob.engine, ALICE, &receipts[0]["payload"]);
    let got = receive(&mut alice.engine, &deliver(&frame, 1, 1), &bob.list);
    assert_eq!(
        got["event"],
        json!({"event": "receipt", "peer": BOB, "ids": [id], "state": "delivered"})
    );
    assert_eq!(bob.engine.mark_read(ALICE), json!([id]).to_string());
    assert_eq!(message(&bob.engine, &id)["state"], "read");
    let receipts: Value = serde_json::from_str(&bob.engine.take_receipts()).unwrap();
    let (frame, _) = encrypt(&mut bob.engine, ALICE, &receipts[0]["payload"]);
    let got = receive(&mut alice.engine, &deliver(&frame, 1, 2), &bob.list);
    assert_eq!(got["event"]["state"], "read");
    assert_eq!(message(&alice.engine, &id)["state"], "read");
    assert!(bob.engine.read_receipts());
    bob.engine.set_read_receipts(false);
    assert!(!bob.engine.read_receipts());

    // Typing: ephemeral, shown, not stored.
    let (frame, _) = encrypt(
        &mut alice.engine,
        BOB,
        &json!({"kind": "typing", "on": true}),
    );
    let decoded = ClientFrame::decode(&STANDARD.decode(&frame).unwrap()).unwrap();
    assert!(matches!(
        decoded,
        ClientFrame::Send {
            class: Class::Ephemeral,
            ..
        } | ClientFrame::SealedSend {
            class: Class::Ephemeral,
            ..
        }
    ));
    let got = receive(&mut bob.engine, &deliver(&frame, 1, 3), &alice.list);
    assert_eq!(
        got["event"],
        json!({"event": "typing", "from": ALICE, "device": 1, "on": true})
    );
    let conversations: Value = serde_json::from_str(&bob.engine.conversations()).unwrap();
    assert_eq!(conversations[0]["messages"].as_array().unwrap().len(), 1);

    // A disappearing-messages timer, honoured by the peer.
    // (An out-of-range timer throws; `JsError` cannot be made off wasm: the engine's tests
    // check the bounds.)
    let envelopes: Value =
        serde_json::from_str(&alice.engine.set_disappearing(BOB, 3600).unwrap()).unwrap();
    assert_eq!(envelopes[0]["to"], BOB);
    assert_eq!(
        envelopes[0]["payload"],
        json!({"kind": "disappearing", "secs": 3600, "with": null})
    );
    let (frame, _) = encrypt(&mut alice.engine, BOB, &envelopes[0]["payload"]);
    let got = receive(&mut bob.engine, &deliver(&frame, 1, 4), &alice.list);
    assert_eq!(
        got["event"],
        json!({"event": "disappearing", "with": ALICE, "by": ALICE, "secs": 3600})
    );
    assert_eq!(bob.engine.disappearing(ALICE), 3600);
    let conversations: Value = serde_json::from_str(&bob.engine.conversations()).unwrap();
    assert_eq!(conversations[0]["disappearing_secs"], 3600);
    let line = conversations[0]["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(line["timer_secs"], 3600);
    assert_eq!(line["outgoing"], false);
    let (frame, id) = encrypt(
        &mut alice.engine,
        BOB,
        &json!({"kind": "text", "body": "gone"}),
    );
    let decoded = ClientFrame::decode(&STANDARD.decode(&frame).unwrap()).unwrap();
    assert!(matches!(
        decoded,
        ClientFrame::Send { ttl_secs: 3600, .. } | ClientFrame::SealedSend { ttl_secs: 3600, .. }
    ));
    receive(&mut bob.engine, &deliver(&frame, 1, 5), &alice.list);
    assert!(message(&bob.engine, &id)["expires_ms"].as_u64().is_some());
    assert!(bob.engine.next_expiry_ms() > 0.0);
    assert_eq!(bob.engine.expire_messages(), "[]", "not yet");
}
