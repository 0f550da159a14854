//! State written before the client engine existed still loads, keeps its conversations,
//! contacts and link codes, and its ratchets still work: the SDK's state files
//! (`fixtures/sdk-v1`, written by the SDK through a real broker) and what the browser saved in
//! its own record format (`fixtures/browser-v1`, migrated on load).

use std::path::{Path, PathBuf};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use sealpost_client::{
    Client, Event,
    crypto::LocalKey,
    engine::{Engine, Outgoing, SendStep, SenderList},
};
use sealpost_proto::{ClientFrame, DeviceId};

const ALICE: &str = "alice@test.example";
const BOB: &str = "bob@test.example";
/// Later than the fixtures were written; the link code alice issued expires in 2100.
const NOW: u64 = 1_900_000_000_000;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A copy of an SDK state directory (opening takes a lock file in it).
fn sdk_state(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in ["local.key", "client.state"] {
        std::fs::copy(
            fixtures().join("sdk-v1").join(name).join(file),
            dir.path().join(file),
        )
        .expect("copy fixture");
    }
    dir
}

fn sdk_engine(dir: &Path) -> Engine {
    let key = LocalKey::read_file(&dir.join("local.key")).expect("key");
    Engine::load_file(&dir.join("client.state"), &key)
        .expect("loads")
        .expect("exists")
}

fn browser_engine(name: &str) -> Engine {
    let dir = fixtures().join("browser-v1");
    let key = std::fs::read_to_string(dir.join(format!("{name}.key"))).expect("key");
    let key: [u8; 32] = STANDARD
        .decode(key.trim())
        .expect("base64")
        .try_into()
        .expect("32 bytes");
    let state = std::fs::read(dir.join(format!("{name}.state"))).expect("state");
    Engine::from_encrypted_bytes(&state, &LocalKey::from_bytes(&key)).expect("loads")
}

fn texts(engine: &Engine, with: &str) -> Vec<(bool, String)> {
    engine
        .conversations()
        .into_iter()
        .find(|c| c.with == with)
        .map(|c| {
            c.messages
                .into_iter()
                .map(|m| (m.outgoing, m.text))
                .collect()
        })
        .unwrap_or_default()
}

/// `from` writes `to` on the sessions the old code saved, and `to` reads it.
fn exchange(from: &mut Engine, to: &mut Engine, text: &str) {
    from.set_list_max_age_ms(u64::MAX);
    to.set_list_max_age_ms(u64::MAX);
    let mut send = from
        .start_send(to.user(), Outgoing::text(text), None, None, NOW)
        .expect("starts");
    let SendStep::Transmit(frame) = from.send_step(&mut send, NOW).expect("step") else {
        panic!("the saved session is used, no key is claimed");
    };
    let ClientFrame::SealedSend { id, copies, .. } = frame else {
        panic!("sealed: the saved delivery token is used");
    };
    let copy = copies
        .iter()
        .find(|c| c.device == DeviceId(to.device_id()))
        .expect("a copy");
    let opened = to
        .open(id, &copy.ciphertext, SenderList::Cached, NOW)
        .unwrap_or_else(|_| panic!("opens with the saved list and session"));
    let events = to.settle(id, &copy.ciphertext, false, Ok(opened.events));
    assert!(
        matches!(&events[..], [Event::Message(m)] if m.text == text && m.from == from.user()),
        "{events:?}"
    );
}

#[tokio::test]
async fn sdk_state_files_written_before_the_engine_open() {
    let alice_dir = sdk_state("alice");
    let bob_dir = sdk_state("bob");
    {
        let alice = Client::open(alice_dir.path()).await.expect("opens");
        assert_eq!(alice.handle(), ALICE);
        assert!(alice.server().starts_with("http://127.0.0.1:"));
        assert!(alice.is_verified(BOB));
        assert!(alice.sends_sealed_to(BOB));
        let conversations = alice.conversations();
        assert_eq!(conversations.len(), 1);
        let texts: Vec<(bool, &str)> = conversations[0]
            .messages
            .iter()
            .map(|m| (m.outgoing, m.text.as_str()))
            .collect();
        assert_eq!(texts, [(true, "hello bob"), (false, "hello alice")]);
    }
    let mut alice = sdk_engine(alice_dir.path());
    let mut bob = sdk_engine(bob_dir.path());
    assert!(alice.has_pending_link(0), "the link code issued before");
    assert_eq!(
        alice.safety_number(BOB).expect("list"),
        bob.safety_number(ALICE).expect("list")
    );
    exchange(&mut alice, &mut bob, "after the upgrade");
    exchange(&mut bob, &mut alice, "and back");
    // Saved in the current format, it loads again.
    let key = LocalKey::generate();
    let bytes = bob.to_encrypted_bytes(&key);
    let bob = Engine::from_encrypted_bytes(&bytes, &key).expect("loads");
    assert_eq!(
        texts(&bob, ALICE),
        [
            (false, "hello bob".into()),
            (true, "hello alice".into()),
            (false, "after the upgrade".into()),
            (true, "and back".into())
        ]
    );
}

#[test]
fn browser_states_saved_before_the_engine_are_migrated() {
    let mut alice = browser_engine("alice");
    let mut bob = browser_engine("bob");
    assert_eq!(alice.user(), ALICE);
    assert_eq!(texts(&alice, BOB), [(true, "hello bob".into())]);
    assert_eq!(texts(&bob, ALICE), [(false, "hello bob".into())]);
    assert!(alice.is_verified(BOB));
    assert!(alice.token_shared(BOB));
    assert!(
        bob.sends_sealed_to(ALICE),
        "bob kept alice's delivery token"
    );
    assert!(alice.has_pending_link(NOW), "alice's link code");
    assert!(
        alice.known_list(BOB).is_some(),
        "lists move out of the contacts"
    );
    exchange(&mut bob, &mut alice, "hello again");
    // Saved again, it is in the shared format.
    let key = LocalKey::generate();
    let bytes = alice.to_encrypted_bytes(&key);
    let alice = Engine::from_encrypted_bytes(&bytes, &key).expect("loads");
    assert_eq!(
        texts(&alice, BOB),
        [(true, "hello bob".into()), (false, "hello again".into())]
    );
}
