#![allow(clippy::cast_possible_truncation)]
//! The HTTP API against a real broker process: registration under each policy, device lists,
//! adding and removing devices, operations endpoints and graceful shutdown.

mod common;

use std::process::Command;

use base64::{Engine, engine::general_purpose::STANDARD};
use common::*;
use futures_util::SinkExt;
use sealpost_proto::{
    Class, ClientFrame, CloseCode, DeviceId, ErrorCode, SendOutcome, ServerFrame,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// POSTs `body` to `/v1/accounts`; returns the status and the JSON answer.
async fn post_account(broker: &Broker, body: Value) -> (u16, Value) {
    let resp = client()
        .post(format!("{}/v1/accounts", broker.http()))
        .json(&body)
        .send()
        .await
        .unwrap();
    status_json(resp).await
}

async fn status_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    (status, json)
}

/// Asserts a JSON API error: `{"error": code, "message": non-empty}`.
fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"], code, "{}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        got.1
    );
}

fn keys(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

async fn list_devices(broker: &Broker, handle: &str) -> (u16, Value) {
    let resp = client()
        .get(format!("{}/v1/accounts/{handle}/devices", broker.http()))
        .send()
        .await
        .unwrap();
    status_json(resp).await
}

/// POSTs a new device for `handle` with the given Authorization header, if any.
async fn post_device(
    broker: &Broker,
    handle: &str,
    auth: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut req = client()
        .post(format!("{}/v1/accounts/{handle}/devices", broker.http()))
        .json(&body);
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    status_json(req.send().await.unwrap()).await
}

async fn delete_device(
    broker: &Broker,
    handle: &str,
    device: u32,
    auth: Option<&str>,
) -> reqwest::Response {
    let mut req = client().delete(format!(
        "{}/v1/accounts/{handle}/devices/{device}",
        broker.http()
    ));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    req.send().await.unwrap()
}

/// Connects with `creds` and expects the refusal of bad credentials.
async fn expect_bad_token(broker: &Broker, creds: &Creds) {
    let mut raw = connect_raw(broker).await;
    let auth = ClientFrame::Auth {
        user: creds.user.clone(),
        device: creds.device,
        token: creds.token.clone(),
    };
    raw.send(auth.encode().into()).await.unwrap();
    let (frames, close) = until_close(&mut raw).await;
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame::Error {
                code: ErrorCode::BadToken,
                ..
            }]
        ),
        "{frames:?}"
    );
    assert_eq!(close.map(|c| c.0), Some(CloseCode::AuthFailed.as_u16()));
}

#[tokio::test]
async fn open_registration_returns_a_device_whose_token_works() {
    let broker = Broker::start(&[]);
    let (status, body) = post_account(
        &broker,
        json!({ "handle": "alice@test.example", "identity_keys": keys(b"alice keys") }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["handle"], "alice@test.example");
    assert_eq!(body["device_id"], 1);
    let alice = creds(body);
    assert_eq!(alice.token.len(), 32, "a 256-bit token");
    let mut dev = Device::connect(&broker, &alice).await;
    assert!(dev.backlog().await.is_empty());
    // A second account gets its own token; tokens are not shared or guessable from each other.
    let (status, body) = post_account(
        &broker,
        json!({ "handle": "bob@test.example", "identity_keys": keys(b"bob keys") }),
    )
    .await;
    assert_eq!(status, 201);
    let bob = creds(body);
    assert_ne!(bob.token, alice.token);
    let mut b = Device::connect(&broker, &bob).await;
    assert!(b.backlog().await.is_empty());
    one_way(&mut dev, &mut b).await;
}

#[tokio::test]
async fn a_taken_handle_is_409_and_the_first_account_is_untouched() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let again = post_account(
        &broker,
        json!({ "handle": "alice@test.example", "identity_keys": keys(b"impostor") }),
    )
    .await;
    assert_error(&again, 409, "conflict");
    let (status, list) = list_devices(&broker, "alice@test.example").await;
    assert_eq!(status, 200);
    assert_eq!(
        list["devices"],
        json!([{ "device_id": 1, "identity_keys": keys(b"keys") }])
    );
    let mut dev = Device::connect(&broker, &alice).await;
    assert!(dev.backlog().await.is_empty());
}

#[tokio::test]
async fn bad_registrations_are_400_with_a_json_error_and_create_nothing() {
    let broker = Broker::start(&[]);
    let good_keys = keys(b"keys");
    for handle in [
        "Alice@test.example",
        "alice",
        "alice@",
        "@test.example",
        "a@b@test.example",
        "alice smith@test.example",
        "alice@test..example",
        "",
    ] {
        let got = post_account(
            &broker,
            json!({ "handle": handle, "identity_keys": good_keys }),
        )
        .await;
        assert_error(&got, 400, "bad_request");
    }
    let long_name = format!("{}@test.example", "a".repeat(65));
    let got = post_account(
        &broker,
        json!({ "handle": long_name, "identity_keys": good_keys }),
    )
    .await;
    assert_error(&got, 400, "bad_request");
    // A handle on a domain this broker does not serve.
    let got = post_account(
        &broker,
        json!({ "handle": "carol@other.example", "identity_keys": good_keys }),
    )
    .await;
    assert_error(&got, 400, "bad_request");
    assert!(got.1["message"].as_str().unwrap().contains("test.example"));
    // Identity keys that are not base64, empty, or too large.
    for bad in ["not base64!".to_owned(), String::new(), keys(&[1u8; 4097])] {
        let got = post_account(
            &broker,
            json!({ "handle": "carol@test.example", "identity_keys": bad }),
        )
        .await;
        assert_error(&got, 400, "bad_request");
    }
    // Bodies that are not the expected JSON.
    let url = format!("{}/v1/accounts", broker.http());
    let raw_bodies: [(&str, &str); 5] = [
        (
            "application/json",
            r#"{"handle": "carol@test.example", "identity_keys": "#,
        ),
        ("application/json", "not json at all"),
        ("application/json", r#"{"handle": "carol@test.example"}"#),
        (
            "application/json",
            r#"{"handle": 7, "identity_keys": "a2V5cw=="}"#,
        ),
        (
            "text/plain",
            r#"{"handle": "carol@test.example", "identity_keys": "a2V5cw=="}"#,
        ),
    ];
    for (content_type, body) in raw_bodies {
        let resp = client()
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let got = status_json(resp).await;
        assert_error(&got, 400, "bad_request");
    }
    // None of that created an account.
    let got = list_devices(&broker, "carol@test.example").await;
    assert_error(&got, 404, "not_found");
    // And the valid request still works afterwards.
    let (status, _) = post_account(
        &broker,
        json!({ "handle": "carol@test.example", "identity_keys": good_keys }),
    )
    .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn the_device_list_shows_ids_and_identity_keys() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let second = add_device(&broker, &alice).await;
    assert_eq!(second.device, DeviceId(2));
    let (status, list) = list_devices(&broker, "alice@test.example").await;
    assert_eq!(status, 200);
    assert_eq!(
        list,
        json!({
            "handle": "alice@test.example",
            "devices": [
                { "device_id": 1, "identity_keys": keys(b"keys") },
                { "device_id": 2, "identity_keys": keys(b"keys2") },
            ]
        })
    );
    assert_error(
        &list_devices(&broker, "nobody@test.example").await,
        404,
        "not_found",
    );
    // Another domain, which this broker does not federate with, is said to be one.
    assert_error(
        &list_devices(&broker, "alice@other.example").await,
        404,
        "unknown_domain",
    );
    assert_error(
        &list_devices(&broker, "Not%20A%20Handle").await,
        400,
        "bad_request",
    );
}

#[tokio::test]
async fn adding_a_device_needs_a_valid_bearer_of_that_account() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let handle = alice.user.as_str();
    let body = json!({ "identity_keys": keys(b"new device") });
    let wrong_token = format!("Bearer {}.{}", alice.device.0, "A".repeat(43));
    let unknown_device = alice.bearer().replacen("Bearer 1.", "Bearer 9.", 1);
    let no_device = format!("Bearer {}", alice.bearer().rsplit('.').next().unwrap());
    let basic = alice.bearer().replacen("Bearer", "Basic", 1);
    let bad_auths: Vec<Option<String>> = vec![
        None,
        Some(String::new()),
        Some("Bearer".into()),
        Some("Bearer x.y".into()),
        Some(no_device),
        Some(basic),
        Some(wrong_token),
        Some(unknown_device),
        // Another account's valid credentials.
        Some(bob.bearer()),
    ];
    for auth in &bad_auths {
        let got = post_device(&broker, handle, auth.as_deref(), body.clone()).await;
        assert_error(&got, 401, "unauthorized");
    }
    // With valid credentials: bad identity keys are 400, good ones 201.
    let bearer = alice.bearer();
    let got = post_device(
        &broker,
        handle,
        Some(&bearer),
        json!({ "identity_keys": "%%%" }),
    )
    .await;
    assert_error(&got, 400, "bad_request");
    let (status, created) = post_device(&broker, handle, Some(&bearer), body.clone()).await;
    assert_eq!(status, 201, "{created}");
    let new = creds(created);
    assert_eq!(new.user, alice.user);
    assert_eq!(new.device, DeviceId(2));
    // The refused requests added nothing; the new device's token works, and itself can add.
    let (_, list) = list_devices(&broker, handle).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 2);
    let mut dev = Device::connect(&broker, &new).await;
    assert!(dev.backlog().await.is_empty());
    let (status, _) = post_device(&broker, handle, Some(&new.bearer()), body).await;
    assert_eq!(status, 201);
    // Adding to an unknown account is refused the same way.
    let got = post_device(
        &broker,
        "nobody@test.example",
        Some(&bearer),
        json!({ "identity_keys": keys(b"k") }),
    )
    .await;
    assert_error(&got, 401, "unauthorized");
}

#[tokio::test]
async fn removing_a_device_revokes_its_live_session() {
    let broker = Broker::start(&[]);
    let alice1 = register(&broker, "alice@test.example").await;
    let alice2 = add_device(&broker, &alice1).await;
    let carol = register(&broker, "carol@test.example").await;
    let mut d1 = Device::connect(&broker, &alice1).await;
    let mut d2 = Device::connect(&broker, &alice2).await;
    let mut c = Device::connect(&broker, &carol).await;
    for d in [&mut d1, &mut d2, &mut c] {
        assert!(d.backlog().await.is_empty());
    }
    // Without or with wrong credentials: refused, nothing happens.
    let resp = delete_device(&broker, &alice1.user, 2, None).await;
    assert_error(&status_json(resp).await, 401, "unauthorized");
    let resp = delete_device(&broker, &alice1.user, 2, Some(&carol.bearer())).await;
    assert_error(&status_json(resp).await, 401, "unauthorized");
    // An unknown device: 404.
    let resp = delete_device(&broker, &alice1.user, 9, Some(&alice1.bearer())).await;
    assert_error(&status_json(resp).await, 404, "not_found");

    let resp = delete_device(&broker, &alice1.user, 2, Some(&alice1.bearer())).await;
    assert_eq!(resp.status(), 204);
    assert!(resp.text().await.unwrap().is_empty());
    let (frames, close) = until_close(&mut d2.ws).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(
        close,
        Some((
            CloseCode::DeviceRevoked.as_u16(),
            "device_revoked".to_owned()
        ))
    );
    assert_eq!(
        broker
            .metric_labeled("sealpost_disconnects_total", "reason=\"device_revoked\"")
            .await,
        1.0,
        "one revoked connection is counted once"
    );
    // The list shrinks; the removed token no longer works on WS or HTTP.
    let (_, list) = list_devices(&broker, &alice1.user).await;
    assert_eq!(
        list["devices"],
        json!([{ "device_id": 1, "identity_keys": keys(b"keys") }])
    );
    expect_bad_token(&broker, &alice2).await;
    let got = post_device(
        &broker,
        &alice1.user,
        Some(&alice2.bearer()),
        json!({ "identity_keys": keys(b"k") }),
    )
    .await;
    assert_error(&got, 401, "unauthorized");
    // The remaining device and the other account carry on; sends now name only device 1.
    let id = eid();
    let outcome = c
        .send_and_wait(id, &alice1.user, &[alice1.device, alice2.device], b"x")
        .await;
    assert_eq!(
        outcome,
        SendOutcome::Rejected {
            code: ErrorCode::StaleDevices,
            current_devices: vec![alice1.device]
        }
    );
    one_way(&mut c, &mut d1).await;
    one_way(&mut d1, &mut c).await;
}

#[tokio::test]
async fn closed_registration_is_403() {
    let broker = Broker::start(&["--registration", "closed"]);
    let got = post_account(
        &broker,
        json!({ "handle": "alice@test.example", "identity_keys": keys(b"k") }),
    )
    .await;
    assert_error(&got, 403, "forbidden");
    assert_eq!(got.1["message"], "registration is closed");
    assert_error(
        &list_devices(&broker, "alice@test.example").await,
        404,
        "not_found",
    );
}

/// Runs the `sealpost` binary with `args`; returns its stdout.
fn sealpost(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .args(args)
        .output()
        .expect("run sealpost");
    assert!(
        out.status.success(),
        "sealpost {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `sealpost platform-keygen`: (secret key, public key).
fn platform_keygen() -> (String, String) {
    let out = sealpost(&["platform-keygen"]);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(" = "))
            .unwrap_or_else(|| panic!("no {name} in {out:?}"))
            .trim()
            .to_owned()
    };
    (field("secret_key"), field("public_key"))
}

fn mint(secret_key: &str, handle: &str, extra: &[&str]) -> String {
    let mut args = vec!["mint-token", "--secret-key", secret_key, "--handle", handle];
    args.extend_from_slice(extra);
    sealpost(&args).trim().to_owned()
}

#[tokio::test]
async fn platform_registration_needs_a_token_for_that_handle() {
    let (secret, public) = platform_keygen();
    let (other_secret, _) = platform_keygen();
    let broker = Broker::start(&[
        "--registration",
        "platform",
        "--platform-public-key",
        &public,
    ]);
    let register_with = |handle: &str, token: Option<String>| {
        let mut body = json!({ "handle": handle, "identity_keys": keys(b"k") });
        if let Some(token) = token {
            body["registration_token"] = json!(token);
        }
        post_account(&broker, body)
    };
    let alice = "alice@test.example";
    // No token, a token for another handle, a token signed by another key, an expired token,
    // garbage: all 403, nothing created.
    let refusals = [
        None,
        Some(mint(&secret, "bob@test.example", &[])),
        Some(mint(&other_secret, alice, &[])),
        Some(mint(&secret, alice, &["--ttl-secs", "0"])),
        Some("garbage".to_owned()),
        Some("e30.AAAA".to_owned()),
    ];
    for token in refusals {
        let got = register_with(alice, token.clone()).await;
        assert_error(&got, 403, "forbidden");
    }
    assert_error(&list_devices(&broker, alice).await, 404, "not_found");

    let token = mint(&secret, alice, &[]);
    let (status, body) = register_with(alice, Some(token.clone())).await;
    assert_eq!(status, 201, "{body}");
    let creds = creds(body);
    let mut dev = Device::connect(&broker, &creds).await;
    assert!(dev.backlog().await.is_empty());
    // The token attested alice, who now exists: reusing it is a conflict, not a second account.
    assert_error(&register_with(alice, Some(token)).await, 409, "conflict");
    // Bob with bob's own token works.
    let (status, _) = register_with(
        "bob@test.example",
        Some(mint(&secret, "bob@test.example", &[])),
    )
    .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let broker = Broker::start(&[]);
    let get = |path: &str| client().get(format!("{}{path}", broker.http())).send();
    let resp = get("/healthz").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok\n");
    let resp = get("/readyz").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ready\n");
    let alice = register(&broker, "alice@test.example").await;
    let mut dev = Device::connect(&broker, &alice).await;
    assert!(dev.backlog().await.is_empty());
    broker.wait_metric("sealpost_connections", 1.0).await;
    let resp = get("/metrics").await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("sealpost_connections"), "{text}");
    assert!(text.contains("# TYPE sealpost_connections gauge"), "{text}");
    drop(dev);
    // Disconnecting is reflected too.
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.metric("sealpost_connections").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection gauge stuck"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A fresh broker exports every series before any traffic: histograms (not summaries) with
/// their buckets, counters at 0 (so `rate()` and the alerts see the first event), the
/// `process_*` metrics and `sealpost_build_info`.
#[tokio::test]
async fn fresh_broker_exports_histograms_counters_and_process_metrics_before_traffic() {
    let broker = Broker::start(&[]);
    let resp = client()
        .get(format!("{}/metrics", broker.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let value = |series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    };
    for name in [
        "sealpost_append_seconds",
        "sealpost_flush_seconds",
        "sealpost_flush_batch_size",
        "sealpost_queue_depth",
        "sealpost_batch_frames",
    ] {
        // Once: the per-envelope histograms are rendered beside the exporter's, not by it too.
        assert_eq!(
            text.matches(&format!("# TYPE {name} histogram\n")).count(),
            1,
            "{name} is not one histogram: {text}"
        );
        assert!(
            value(&format!("{name}_bucket{{le=\"+Inf\"}}")).is_some(),
            "{name} has no buckets: {text}"
        );
        assert!(!text.contains(&format!("{name}{{quantile=")), "{text}");
    }
    assert_eq!(
        value("sealpost_append_seconds_bucket{le=\"0.25\"}"),
        Some(0.0),
        "{text}"
    );
    for series in [
        "sealpost_appends_total",
        "sealpost_deliveries_total",
        "sealpost_acks_total",
        "sealpost_expirations_total",
        "sealpost_flush_failures_total",
        "sealpost_connections",
        "sealpost_undecodable_index_entries",
        "sealpost_rejects_total{reason=\"store_unavailable\"}",
        "sealpost_rejects_total{reason=\"internal\"}",
        "sealpost_rejects_total{reason=\"unauthorized\"}",
        "sealpost_disconnects_total{reason=\"slow_consumer\"}",
        "sealpost_disconnects_total{reason=\"write_stalled\"}",
    ] {
        assert_eq!(value(series), Some(0.0), "{series} in {text}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(&format!("sealpost_build_info{{version=\"{version}\"}}")),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );
    for name in [
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
    ] {
        assert!(value(name).is_some_and(|v| v > 0.0), "{name} in {text}");
    }
}

#[tokio::test]
async fn graceful_shutdown_closes_sessions_with_going_away_and_keeps_accepted_envelopes() {
    let mut broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    assert!(a.backlog().await.is_empty());
    let id = eid();
    let outcome = a
        .send_and_wait(id, &bob.user, &[bob.device], b"before shutdown")
        .await;
    assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });

    assert!(broker.terminate(), "the broker exits 0");
    let (frames, close) = until_close(&mut a.ws).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(close.map(|c| c.0), Some(CloseCode::GoingAway.as_u16()));

    broker.restart();
    let mut b = Device::connect(&broker, &bob).await;
    let backlog = b.backlog().await;
    assert_eq!(backlog.len(), 1);
    assert_eq!(backlog[0].1.id, id);
    assert_eq!(backlog[0].1.ciphertext, b"before shutdown");
}

/// Waits until `/readyz` answers 503: the broker has begun shutting down.
async fn wait_not_ready(broker: &Broker) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let resp = client()
            .get(format!("{}/readyz", broker.http()))
            .send()
            .await
            .unwrap();
        if resp.status() == 503 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never turned 503"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The promise of the shutdown paragraph, on traffic: sends in flight when SIGTERM arrives
/// are each answered (accepted, or refused `shutting_down` once the drain began, never
/// silently dropped), accepted ones survive the restart, and acks sent during the drain are
/// kept, so what was acknowledged is not delivered again.
#[tokio::test]
async fn sends_and_acks_around_sigterm_are_answered_and_kept() {
    let mut broker = Broker::start(&["--shutdown-drain-ms", "4000"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    assert!(a.backlog().await.is_empty());
    for i in 0..5u8 {
        let outcome = a.send_and_wait(eid(), &bob.user, &[bob.device], &[i]).await;
        assert_eq!(outcome, SendOutcome::Accepted { duplicate: false });
    }
    let mut b = Device::connect(&broker, &bob).await;
    let delivered = b.backlog().await;
    assert_eq!(delivered.len(), 5);

    // Twenty sends in flight, then SIGTERM.
    let in_flight: Vec<_> = (0..20).map(|_| eid()).collect();
    for id in &in_flight {
        a.send_to(
            *id,
            &bob.user,
            &[bob.device],
            Class::Durable,
            3600,
            b"in flight",
        )
        .await;
    }
    broker.signal_term();
    wait_not_ready(&broker).await;
    // Bob acknowledges what he was delivered, after shutdown began.
    b.ack(delivered.iter().map(|(seq, _)| *seq).collect()).await;
    // A send during the drain is refused, not lost.
    let late = eid();
    a.send_to(
        late,
        &bob.user,
        &[bob.device],
        Class::Durable,
        3600,
        b"late",
    )
    .await;

    let (frames, close) = until_close(&mut a.ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::GoingAway.as_u16()));
    let mut accepted = Vec::new();
    let mut answered = std::collections::HashSet::new();
    for frame in frames {
        let ServerFrame::SendResult { id, outcome } = frame else {
            panic!("unexpected {frame:?}");
        };
        assert!(answered.insert(id), "{id:?} answered twice");
        match outcome {
            SendOutcome::Accepted { duplicate: false } => accepted.push(id),
            SendOutcome::Rejected {
                code: ErrorCode::ShuttingDown,
                ..
            } => {}
            other => panic!("{id:?}: {other:?}"),
        }
    }
    for id in in_flight.iter().chain([&late]) {
        assert!(answered.contains(id), "{id:?} got no answer");
    }
    assert!(
        !accepted.contains(&late),
        "a send during the drain was accepted"
    );
    let (_, close) = until_close(&mut b.ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::GoingAway.as_u16()));
    assert!(broker.wait_exit(), "the broker exits 0");

    broker.restart();
    let mut b = Device::connect(&broker, &bob).await;
    let backlog: Vec<_> = b.backlog().await.into_iter().map(|(_, e)| e.id).collect();
    // Answers may come in any order; the queue keeps the order of the sends.
    let expected: Vec<_> = in_flight
        .iter()
        .filter(|id| accepted.contains(id))
        .copied()
        .collect();
    assert_eq!(
        backlog, expected,
        "exactly the accepted sends, in send order, and none of the acknowledged ones"
    );
}

#[tokio::test]
async fn readiness_is_503_and_new_work_refused_while_shutting_down() {
    // A long drain window, held open by a connection that has not authenticated yet (such a
    // session only ends when it authenticates, times out or goes away).
    let mut broker = Broker::start(&["--shutdown-drain-ms", "5000"]);
    let alice = register(&broker, "alice@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    assert!(a.backlog().await.is_empty());
    let mut holder = connect_raw(&broker).await;

    broker.signal_term();
    wait_not_ready(&broker).await;
    let resp = client()
        .get(format!("{}/readyz", broker.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "not ready\n");
    // Liveness is unaffected; new accounts and new connections are refused.
    let resp = client()
        .get(format!("{}/healthz", broker.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = post_account(
        &broker,
        json!({ "handle": "bob@test.example", "identity_keys": keys(b"k") }),
    )
    .await;
    assert_error(&got, 503, "unavailable");
    match tokio_tungstenite::connect_async(broker.ws_url()).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    // The authenticated session is closed going_away within the drain window.
    let (frames, close) = until_close(&mut a.ws).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(close.map(|c| c.0), Some(CloseCode::GoingAway.as_u16()));
    // Once the last session is gone the broker exits 0.
    holder.close(None).await.unwrap();
    drop(holder);
    assert!(broker.wait_exit(), "the broker exits 0");
}

#[tokio::test]
async fn a_session_ticket_logs_its_device_in_once() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let alice2 = add_device(&broker, &alice).await;
    let ticket = session_ticket(&broker, &alice).await;
    let by_ticket = |who: &Creds| Creds {
        token: ticket.clone(),
        ..who.clone()
    };
    // Not for another device of the same account.
    let refused = Device::try_authenticate(connect_raw(&broker).await, &by_ticket(&alice2)).await;
    assert!(refused.is_err(), "a ticket is bound to its device");
    let first = Device::try_authenticate(connect_raw(&broker).await, &by_ticket(&alice)).await;
    assert!(first.is_ok(), "the ticket logs alice's device in");
    let again = Device::try_authenticate(connect_raw(&broker).await, &by_ticket(&alice)).await;
    assert!(again.is_err(), "a spent ticket is refused");
    // A removed device's tickets die with it.
    let ticket2 = session_ticket(&broker, &alice2).await;
    assert_eq!(remove_device(&broker, &alice, alice2.device).await, 204);
    let removed = Creds {
        token: ticket2,
        ..alice2.clone()
    };
    assert!(
        Device::try_authenticate(connect_raw(&broker).await, &removed)
            .await
            .is_err()
    );
    // Without the device token, no ticket.
    let resp = client()
        .post(format!(
            "{}/v1/accounts/{}/session-ticket",
            broker.http(),
            alice.user
        ))
        .header(
            "authorization",
            "Bearer 1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn the_admin_token_opens_the_admin_endpoints() {
    let broker = Broker::start(&["--admin-token", "admin-secret-0123456789"]);
    let get = |auth: Option<&'static str>| {
        let mut req = client().get(format!("{}/admin/federation", broker.http()));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        req.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some("Bearer wrong")).await.unwrap().status(), 401);
    let resp = get(Some("Bearer admin-secret-0123456789")).await.unwrap();
    assert_eq!(resp.status(), 200);
}
