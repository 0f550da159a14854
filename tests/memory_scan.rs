//! What an intruder with a memory dump of the running broker finds: no device token, no
//! delivery token, no plaintext. The dump is taken with `gcore` (Debian `gdb`) while every
//! connection that carried a secret is still open or has just closed, after authenticated
//! HTTP calls, WebSocket logins, sealed sends and an end-to-end encrypted exchange.
//!
//! Skipped where `gcore` is missing or may not attach, unless `SEALPOST_MEMORY_SCAN_REQUIRED`
//! is set (`scripts/test-all` installs gdb and sets it).

mod common;

use std::{path::Path, process::Command};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use common::{Broker, Creds, Device, add_device, eid, register, sdk};
use futures_util::SinkExt as _;
use sealpost_client::{Event, engine::GroupEvent};
use sealpost_proto::{Class, ClientFrame, Copy, SendOutcome, ServerFrame};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Every form a secret could take in the broker's memory: raw bytes and the text forms the
/// API carries (unpadded base64url), plus standard base64 and hex for good measure.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    vec![
        secret.to_vec(),
        URL_SAFE_NO_PAD.encode(secret).into_bytes(),
        STANDARD.encode(secret).into_bytes(),
        secret
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
    ]
}

/// Dumps the memory of process `pid` with gcore; `None` if gcore cannot (not installed, or
/// not allowed to attach).
fn dump(pid: u32, dir: &Path) -> Option<Vec<u8>> {
    let prefix = dir.join("core");
    let out = Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .output()
        .ok()?;
    let path = dir.join(format!("core.{pid}"));
    if !out.status.success() || !path.exists() {
        eprintln!(
            "gcore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let bytes = std::fs::read(&path).expect("read core");
    std::fs::remove_file(&path).expect("remove core");
    Some(without_zero_pages(&bytes))
}

/// The dump without its all-zero pages (most of it: reserved, untouched memory), so that the
/// unoptimized scans below take seconds. A page of zeros holds no part of a secret.
fn without_zero_pages(bytes: &[u8]) -> Vec<u8> {
    const ZERO: [u8; 4096] = [0; 4096];
    let mut out = Vec::new();
    for page in bytes.chunks(ZERO.len()) {
        if page != &ZERO[..page.len()] {
            out.extend_from_slice(page);
        }
    }
    out
}

fn required() -> bool {
    std::env::var_os("SEALPOST_MEMORY_SCAN_REQUIRED").is_some()
}

async fn put_delivery_token(broker: &Broker, who: &Creds, token: &[u8], http: &reqwest::Client) {
    let resp = http
        .put(format!(
            "{}/v1/accounts/{}/delivery-token",
            broker.http(),
            who.user
        ))
        .header("authorization", who.bearer())
        .json(&json!({ "token": URL_SAFE_NO_PAD.encode(token) }))
        .send()
        .await
        .expect("put delivery token");
    assert_eq!(resp.status(), 204);
}

async fn sealed_send(broker: &Broker, to: &Creds, token: &[u8], body: &[u8]) {
    let (mut anon, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/sealed", broker.addr))
        .await
        .expect("connect sealed");
    let id = eid();
    let frame = ClientFrame::SealedSend {
        id,
        to: to.user.clone(),
        class: Class::Durable,
        ttl_secs: 600,
        copies: vec![Copy {
            device: to.device,
            ciphertext: body.to_vec(),
        }],
        delivery_token: Some(token.to_vec()),
    };
    anon.send(Message::Binary(frame.encode().into()))
        .await
        .expect("send");
    loop {
        match common::next_event(&mut anon).await {
            common::Event::Frame(ServerFrame::SendResult { id: got, outcome }) if got == id => {
                assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
                return;
            }
            common::Event::Frame(_) => {}
            common::Event::Closed(c) => panic!("closed: {c:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_dump_of_the_live_broker_holds_no_token_and_no_plaintext() {
    let broker = Broker::start(&[]);
    let scratch = tempfile::tempdir().expect("tempdir");
    // A keep-alive HTTP client that stays open across the dump, as a real client's pool does.
    let http = reqwest::Client::new();

    // Device tokens: issued in registration answers, presented in `authorization` headers
    // and in WebSocket auth frames.
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let alice2 = add_device(&broker, &alice).await;
    let keys = json!({ "one_time_keys": [{ "key_id": 1, "key": STANDARD.encode(b"otk-1") }] });
    for who in [&alice, &bob] {
        let resp = http
            .put(common::keys_url(&broker, who))
            .header("authorization", who.bearer())
            .json(&keys)
            .send()
            .await
            .expect("upload keys");
        assert_eq!(resp.status(), 200);
    }
    let bob_delivery: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    put_delivery_token(&broker, &bob, &bob_delivery, &http).await;

    let mut a1 = Device::connect_with_ticket(&broker, &alice).await;
    let _a2 = Device::connect_with_ticket(&broker, &alice2).await;
    let outcome = a1
        .send_and_wait(eid(), &bob.user, &[bob.device], b"first")
        .await;
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    for i in 0..3 {
        sealed_send(
            &broker,
            &bob,
            &bob_delivery,
            format!("sealed-{i}").as_bytes(),
        )
        .await;
    }
    let mut b = Device::connect_with_ticket(&broker, &bob).await;
    let delivered = b.drain().await;
    assert_eq!(delivered.len(), 4);

    // An end-to-end encrypted exchange through the SDK: its plaintexts are canaries.
    let mut carol = sdk::register(&broker, "carol@test.example").await;
    let mut dave = sdk::register(&broker, "dave@test.example").await;
    let canaries: Vec<String> = (0..3)
        .map(|i| format!("MEMORY-CANARY-{:016x}-{i}", rand_tag()))
        .collect();
    for canary in &canaries {
        carol
            .client
            .send_text("dave@test.example", canary)
            .await
            .expect("send");
    }
    let mut seen = 0;
    while seen < canaries.len() {
        if let Event::Message(m) = sdk::next(&mut dave.client).await {
            assert!(canaries.contains(&m.text));
            seen += 1;
        }
    }
    // A group of carol and dave: its name and its texts are canaries too.
    let group_name = format!("MEMORY-CANARY-GROUP-NAME-{:016x}", rand_tag());
    let group_text = format!("MEMORY-CANARY-GROUP-TEXT-{:016x}", rand_tag());
    let group = carol
        .client
        .create_group(&group_name, &["dave@test.example"])
        .await
        .expect("create group");
    carol
        .client
        .send_group_text(&group, &group_text)
        .await
        .expect("group text");
    loop {
        if let Event::Group(GroupEvent::Message { text, .. }) = sdk::next(&mut dave.client).await {
            assert_eq!(text, group_text);
            break;
        }
    }
    let sdk_tokens = [
        carol.client.device_token_for_tests(),
        dave.client.device_token_for_tests(),
    ];

    let Some(core) = dump(broker.pid(), scratch.path()) else {
        assert!(!required(), "gcore could not dump the broker");
        eprintln!("skipped: gcore unavailable");
        return;
    };
    let found = |needle: &[u8]| memchr::memmem::find(&core, needle).is_some();
    let masked = MaskedScan::new(&core);
    let mut leaks = Vec::new();
    for (name, secret) in [
        ("alice's device token", alice.token.clone()),
        ("alice's second device token", alice2.token.clone()),
        ("bob's device token", bob.token.clone()),
        ("bob's delivery token", bob_delivery.clone()),
        ("carol's device token", sdk_tokens[0].to_vec()),
        ("dave's device token", sdk_tokens[1].to_vec()),
    ] {
        for (i, form) in forms(&secret).iter().enumerate() {
            if found(form) {
                if let Some(at) = memchr::memmem::find(&core, form) {
                    let ctx = &core[at.saturating_sub(300)..(at + 200).min(core.len())];
                    eprintln!("CTX {name}: {:?}", String::from_utf8_lossy(ctx));
                }
                leaks.push(format!("{name} (form {i})"));
            }
        }
        if masked.finds(&secret) {
            leaks.push(format!("{name} (under a WebSocket mask)"));
        }
    }
    for canary in canaries.iter().chain([&group_name, &group_text]) {
        if found(canary.as_bytes()) {
            leaks.push(format!("plaintext {canary}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "found in a memory dump of the broker ({} MiB not zero): {leaks:?}",
        core.len() >> 20
    );
    // The scan is real: what the broker must hold is there (bob's handle, his device list).
    assert!(
        found(bob.user.as_bytes()),
        "the dump holds the broker's data"
    );
}

/// Finds a secret in a dump even where it sits XOR-masked with a 4-byte key, as in a client's
/// WebSocket frame still in a read buffer: for masked bytes `c[j] = t[j] ^ m[j % 4]`,
/// `c[j] ^ c[j + 4] = t[j] ^ t[j + 4]` whatever the mask, so the dump's own differences are
/// searched for the secret's.
struct MaskedScan(Vec<u8>);

impl MaskedScan {
    fn new(core: &[u8]) -> Self {
        Self(differences(core))
    }

    fn finds(&self, secret: &[u8]) -> bool {
        memchr::memmem::find(&self.0, &differences(secret)).is_some()
    }
}

/// `d[i] = bytes[i] ^ bytes[i + 4]`, eight at a time (a dump is gigabytes, tests run unoptimized).
fn differences(bytes: &[u8]) -> Vec<u8> {
    let n = bytes.len().saturating_sub(4);
    let mut out = vec![0u8; n];
    let word = |i: usize| u64::from_ne_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let whole = n.saturating_sub(4) / 8 * 8;
    for i in (0..whole).step_by(8) {
        out[i..i + 8].copy_from_slice(&(word(i) ^ word(i + 4)).to_ne_bytes());
    }
    for i in whole..n {
        out[i] = bytes[i] ^ bytes[i + 4];
    }
    out
}

fn rand_tag() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) ^ (u64::from(std::process::id()) << 32)
}
