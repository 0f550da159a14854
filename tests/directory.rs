//! Key directory, signed device lists, delivery tokens with the anonymous sealed-send
//! endpoint, and link codes — against a real broker process.

mod common;

use std::collections::HashSet;

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use common::*;
use futures_util::SinkExt;
use sealpost_proto::{Class, ClientFrame, Copy, ErrorCode, Notice, SendOutcome, ServerFrame};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn upload(broker: &Broker, c: &Creds, ids: std::ops::Range<u64>, fallback: bool) -> Value {
    let keys: Vec<Value> = ids
        .map(|i| json!({ "key_id": i, "key": STANDARD.encode(format!("otk-{i}")) }))
        .collect();
    let mut body = json!({ "one_time_keys": keys });
    if fallback {
        body["fallback_key"] = json!({ "key_id": 9999, "key": STANDARD.encode("fallback") });
    }
    let resp = client()
        .put(keys_url(broker, c))
        .header("authorization", c.bearer())
        .json(&body)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_share_a_key_and_fall_back() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let alice = register(&broker, "alice@test.example").await;
    let count = upload(&broker, &bob, 0..30, true).await;
    assert_eq!(count, json!({ "one_time": 30, "fallback": true }));

    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (b, a) = (bob.clone(), alice.clone());
        let url = broker.http();
        tasks.push(tokio::spawn(async move {
            let resp = client()
                .post(format!(
                    "{url}/v1/accounts/{}/devices/{}/keys/claim",
                    b.user, b.device.0
                ))
                .header("sealpost-account", &a.user)
                .header("authorization", a.bearer())
                .send()
                .await
                .expect("claim");
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.expect("json")
        }));
    }
    let mut one_time = HashSet::new();
    let mut fallbacks = 0;
    for t in tasks {
        let v = t.await.expect("task");
        if v["fallback"] == json!(true) {
            assert_eq!(v["key_id"], json!(9999));
            fallbacks += 1;
        } else {
            assert!(
                one_time.insert(v["key_id"].as_u64().expect("id")),
                "a key was handed out twice"
            );
        }
    }
    assert_eq!(one_time.len(), 30);
    assert_eq!(fallbacks, 10);
    // Only the device itself may read its count.
    let resp = client()
        .get(keys_url(&broker, &bob))
        .header("authorization", bob.bearer())
        .send()
        .await
        .expect("count");
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({ "one_time": 0, "fallback": true })
    );
    let resp = client()
        .get(keys_url(&broker, &bob))
        .header("authorization", alice.bearer())
        .send()
        .await
        .expect("count");
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn a_connected_device_is_told_when_its_keys_run_low() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let alice = register(&broker, "alice@test.example").await;
    upload(&broker, &bob, 0..11, false).await;
    let mut b = Device::connect(&broker, &bob).await;
    assert!(b.backlog().await.is_empty());
    assert_eq!(claim(&broker, &bob, &alice).await.status(), 200);
    assert_eq!(claim(&broker, &bob, &alice).await.status(), 200);
    match b.frame().await {
        ServerFrame::Notice {
            notice: Notice::KeysLow,
            device,
        } => assert_eq!(device, bob.device),
        other => panic!("expected keys_low, got {other:?}"),
    }
    // Without any credential, a claim for a user who does not accept strangers is refused.
    let resp = client()
        .post(format!(
            "{}/v1/accounts/{}/devices/{}/keys/claim",
            broker.http(),
            bob.user,
            bob.device.0
        ))
        .send()
        .await
        .expect("claim");
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn key_packages_are_a_set_of_their_own_with_a_last_resort() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let alice = register(&broker, "alice@test.example").await;
    upload(&broker, &bob, 0..3, true).await;
    let url = format!("{}-packages", keys_url(&broker, &bob).trim_end_matches('s'));
    let put = |body: Value| {
        client()
            .put(&url)
            .header("authorization", bob.bearer())
            .json(&body)
            .send()
    };
    let packages: Vec<Value> = (0..11)
        .map(|i| json!({ "key_id": i, "key": STANDARD.encode(format!("kp-{i}")) }))
        .collect();
    let resp = put(json!({
        "one_time_keys": packages,
        "fallback_key": { "key_id": 500, "key": STANDARD.encode("last resort") },
    }))
    .await
    .expect("upload");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({ "one_time": 11, "fallback": true })
    );
    // A KeyPackage is bigger than an Olm key, up to a cap.
    let big =
        json!({ "one_time_keys": [{ "key_id": 99, "key": STANDARD.encode(vec![7u8; 4096]) }] });
    assert_eq!(put(big).await.expect("upload").status(), 200);
    let too_big =
        json!({ "one_time_keys": [{ "key_id": 98, "key": STANDARD.encode(vec![7u8; 4097]) }] });
    let resp = put(too_big).await.expect("upload");
    assert_eq!(resp.status(), 400);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("KeyPackages must be 1..=4096 bytes")
    );

    let mut b = Device::connect(&broker, &bob).await;
    assert!(b.backlog().await.is_empty());
    let claim_package = || {
        client()
            .post(format!("{url}/claim"))
            .header("sealpost-account", &alice.user)
            .header("authorization", alice.bearer())
            .send()
    };
    let mut seen = HashSet::new();
    for _ in 0..12 {
        let v: Value = claim_package()
            .await
            .expect("claim")
            .json()
            .await
            .expect("json");
        assert_eq!(v["fallback"], json!(false));
        let key = STANDARD
            .decode(v["key"].as_str().expect("key"))
            .expect("b64");
        assert!(seen.insert(key), "a KeyPackage was handed out twice");
    }
    let v: Value = claim_package()
        .await
        .expect("claim")
        .json()
        .await
        .expect("json");
    assert_eq!(v["fallback"], json!(true));
    assert_eq!(
        STANDARD.decode(v["key"].as_str().unwrap()).unwrap(),
        b"last resort"
    );
    // Told once the set runs low, as key_packages_low (not keys_low).
    match b.frame().await {
        ServerFrame::Notice {
            notice: Notice::KeyPackagesLow,
            device,
        } => assert_eq!(device, bob.device),
        other => panic!("expected key_packages_low, got {other:?}"),
    }
    // The Olm keys are untouched.
    let count: Value = client()
        .get(keys_url(&broker, &bob))
        .header("authorization", bob.bearer())
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("json");
    assert_eq!(count, json!({ "one_time": 3, "fallback": true }));
}

#[tokio::test]
async fn signed_device_lists_are_stored_opaquely_and_only_by_the_account() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let alice = register(&broker, "alice@test.example").await;
    let url = format!("{}/v1/accounts/{}/device-list", broker.http(), bob.user);
    assert_eq!(client().get(&url).send().await.expect("get").status(), 404);
    let signed = STANDARD.encode(b"opaque signed list bytes");
    let put = |who: &Creds| {
        client()
            .put(&url)
            .header("authorization", who.bearer())
            .json(&json!({ "signed": signed }))
    };
    assert_eq!(put(&alice).send().await.expect("put").status(), 401);
    assert_eq!(put(&bob).send().await.expect("put").status(), 204);
    let got = device_list(&broker, &bob.user).await;
    assert_eq!(got["signed"], json!(signed));
}

#[tokio::test]
async fn full_size_key_uploads_and_device_lists_are_accepted() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    // The largest upload allowed: 200 keys of 512 bytes, and a fallback key.
    let keys: Vec<Value> = (0..200u64)
        .map(|i| json!({ "key_id": i, "key": STANDARD.encode([i.to_le_bytes()[0]; 512]) }))
        .collect();
    let body = json!({
        "one_time_keys": keys,
        "fallback_key": { "key_id": 9999, "key": STANDARD.encode([9u8; 512]) },
    });
    let resp = client()
        .put(keys_url(&broker, &bob))
        .header("authorization", bob.bearer())
        .json(&body)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({ "one_time": 200, "fallback": true })
    );
    // The largest signed device list allowed: 64 KiB.
    let url = format!("{}/v1/accounts/{}/device-list", broker.http(), bob.user);
    let signed = STANDARD.encode(vec![7u8; 64 * 1024]);
    let resp = client()
        .put(&url)
        .header("authorization", bob.bearer())
        .json(&json!({ "signed": signed }))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 204);
    let got = device_list(&broker, &bob.user).await;
    assert_eq!(got["signed"], json!(signed));
    // Routes without an account take small bodies only.
    let resp = client()
        .post(format!("{}/v1/accounts", broker.http()))
        .json(&json!({ "handle": "eve@test.example", "identity_keys": "A".repeat(20 * 1024) }))
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid JSON body")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_never_pass_the_per_device_key_limit() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    // Eight uploads of 200 keys at once against a limit of 1,000: five fit, whatever the
    // interleaving, and the rest are refused whole.
    let uploads = (0..8u64).map(|n| {
        let keys: Vec<Value> = (n * 200..(n + 1) * 200)
            .map(|i| json!({ "key_id": i, "key": STANDARD.encode(format!("otk-{i}")) }))
            .collect();
        client()
            .put(keys_url(&broker, &bob))
            .header("authorization", bob.bearer())
            .json(&json!({ "one_time_keys": keys }))
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(uploads)
        .await
        .into_iter()
        .map(|r| r.expect("upload").status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        3,
        "{statuses:?}"
    );
    let resp = client()
        .get(keys_url(&broker, &bob))
        .header("authorization", bob.bearer())
        .send()
        .await
        .expect("count");
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({ "one_time": 1000, "fallback": false })
    );
    // A retried upload (ids already held) replaces keys and adds none: not refused.
    let stored = statuses.iter().position(|s| *s == 200).expect("one stored") as u64;
    let keys: Vec<Value> = (stored * 200..(stored + 1) * 200)
        .map(|i| json!({ "key_id": i, "key": STANDARD.encode(format!("otk-{i}")) }))
        .collect();
    let resp = client()
        .put(keys_url(&broker, &bob))
        .header("authorization", bob.bearer())
        .json(&json!({ "one_time_keys": keys }))
        .send()
        .await
        .expect("retry");
    assert_eq!(resp.status(), 200);
}

async fn sealed_send(ws: &mut Ws, to: &Creds, token: Option<Vec<u8>>, body: &[u8]) -> SendOutcome {
    let id = eid();
    let frame = ClientFrame::SealedSend {
        id,
        to: to.user.clone(),
        class: Class::Durable,
        ttl_secs: 60,
        copies: vec![Copy {
            device: to.device,
            ciphertext: body.to_vec(),
        }],
        delivery_token: token,
    };
    ws.send(Message::Binary(frame.encode().into()))
        .await
        .expect("send");
    loop {
        match next_event(ws).await {
            Event::Frame(ServerFrame::SendResult { id: got, outcome }) if got == id => {
                return outcome;
            }
            Event::Frame(_) => continue,
            Event::Closed(c) => panic!("closed: {c:?}"),
        }
    }
}

#[tokio::test]
async fn sealed_sends_need_the_delivery_token_on_the_anonymous_endpoint() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let token = b"0123456789abcdef0123456789abcdef".to_vec();
    let set = |body: Value| {
        client()
            .put(format!(
                "{}/v1/accounts/{}/delivery-token",
                broker.http(),
                bob.user
            ))
            .header("authorization", bob.bearer())
            .json(&body)
            .send()
    };
    assert_eq!(
        set(json!({ "token": URL_SAFE_NO_PAD.encode(&token) }))
            .await
            .expect("set")
            .status(),
        204
    );

    let (mut anon, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/sealed", broker.addr))
        .await
        .expect("connect sealed");
    let refused = SendOutcome::Rejected {
        code: ErrorCode::BadDeliveryToken,
        current_devices: vec![],
    };
    assert_eq!(
        sealed_send(&mut anon, &bob, None, b"no token").await,
        refused
    );
    assert_eq!(
        sealed_send(
            &mut anon,
            &bob,
            Some(b"wrong-token-wrong-token!".to_vec()),
            b"x"
        )
        .await,
        refused
    );
    let ok = SendOutcome::Accepted { duplicate: false };
    assert_eq!(
        sealed_send(&mut anon, &bob, Some(token.clone()), b"sealed-1").await,
        ok
    );
    // Other frames are refused on this endpoint, which stays usable.
    anon.send(Message::Binary(
        ClientFrame::Ack { seqs: vec![1] }.encode().into(),
    ))
    .await
    .expect("send");
    match next_event(&mut anon).await {
        Event::Frame(ServerFrame::Error { code, .. }) => assert_eq!(code, ErrorCode::WrongEndpoint),
        other => panic!("expected wrong_endpoint, got {other:?}"),
    }
    // A sealed send on the authenticated connection is refused: it would name its sender.
    let alice = register(&broker, "alice@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    assert_eq!(
        sealed_send(&mut a.ws, &bob, Some(token.clone()), b"named").await,
        SendOutcome::Rejected {
            code: ErrorCode::WrongEndpoint,
            current_devices: vec![],
        }
    );
    // Accept-from-anyone admits tokenless sealed sends.
    assert_eq!(
        set(json!({ "unrestricted": true }))
            .await
            .expect("set")
            .status(),
        204
    );
    assert_eq!(sealed_send(&mut anon, &bob, None, b"sealed-2").await, ok);

    let mut b = Device::connect(&broker, &bob).await;
    let got: Vec<Vec<u8>> = b
        .backlog()
        .await
        .into_iter()
        .map(|(_, e)| e.ciphertext)
        .collect();
    assert_eq!(got, vec![b"sealed-1".to_vec(), b"sealed-2".to_vec()]);
}

#[tokio::test]
async fn frames_refused_on_the_anonymous_endpoint_still_count_against_its_rate() {
    let broker = Broker::start(&["--ip-rate", "1", "--ip-burst", "3", "--max-violations", "5"]);
    let (mut anon, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/sealed", broker.addr))
        .await
        .expect("connect sealed");
    // Frames this endpoint refuses anyway (wrong endpoint, unknown type) cost as much to answer
    // as any other: they are limited like sealed sends, and a flood of them is closed.
    let (mut refused, mut limited) = (0, 0);
    let close = loop {
        assert!(refused + limited < 100, "never limited");
        let frame = if (refused + limited) % 2 == 0 {
            ClientFrame::Ack { seqs: vec![1] }.encode()
        } else {
            vec![1, 0x7e, 0x90]
        };
        anon.send(Message::Binary(frame.into()))
            .await
            .expect("send");
        match next_event(&mut anon).await {
            Event::Frame(ServerFrame::Error {
                code: ErrorCode::WrongEndpoint | ErrorCode::UnknownFrameType,
                ..
            }) => refused += 1,
            Event::Frame(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            }) => limited += 1,
            Event::Frame(other) => panic!("unexpected {other:?}"),
            Event::Closed(close) => break close,
        }
    };
    assert_eq!(close, Some((4005, "too many frames".to_owned())));
    assert_eq!(limited, 5);
}

#[tokio::test]
async fn a_link_code_adds_one_device_once() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let resp = client()
        .post(format!(
            "{}/v1/accounts/{}/link-codes",
            broker.http(),
            bob.user
        ))
        .header("authorization", bob.bearer())
        .send()
        .await
        .expect("link code");
    assert_eq!(resp.status(), 201);
    let code = resp.json::<Value>().await.expect("json")["code"]
        .as_str()
        .expect("code")
        .to_owned();
    let join = || {
        client()
            .post(format!(
                "{}/v1/accounts/{}/devices",
                broker.http(),
                bob.user
            ))
            .json(
                &json!({ "identity_keys": STANDARD.encode("new device keys"), "link_code": code }),
            )
            .send()
    };
    // A malformed request does not use the code up.
    let bad = client()
        .post(format!(
            "{}/v1/accounts/{}/devices",
            broker.http(),
            bob.user
        ))
        .json(&json!({ "identity_keys": "not base64!", "link_code": code }))
        .send()
        .await
        .expect("join");
    assert_eq!(bad.status(), 400);
    let first = join().await.expect("join");
    assert_eq!(first.status(), 201);
    let new = creds(first.json().await.expect("json"));
    assert_eq!(new.device.0, 2);
    let _ = Device::connect(&broker, &new).await;
    assert_eq!(
        join().await.expect("join").status(),
        401,
        "a link code works once"
    );
}
