//! TURN credentials (`GET /v1/accounts/{h}/turn`) and the browser client's static files
//! (`/web/`), against the real broker binary.

mod common;

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use common::{Broker, register};
use hmac::{Hmac, Mac};
use sha1::Sha1;

const SECRET: &str = "test-turn-secret";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn turn_broker(extra: &[&str]) -> Broker {
    let mut args = vec![
        "--turn-urls",
        "turn:127.0.0.1:3478?transport=udp,turn:127.0.0.1:3478?transport=tcp",
        "--turn-secret",
        SECRET,
        "--turn-ttl-secs",
        "300",
    ];
    args.extend_from_slice(extra);
    Broker::start(&args)
}

async fn get_turn(broker: &Broker, user: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("{}/v1/accounts/{user}/turn", broker.http()));
    if let Some(b) = bearer {
        req = req.header("authorization", b);
    }
    req.send().await.expect("turn request")
}

#[tokio::test]
async fn credentials_follow_the_turn_rest_scheme_and_name_nobody() {
    let broker = turn_broker(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let before = now_secs();
    let resp = get_turn(&broker, &alice.user, Some(&alice.bearer())).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["ttl"], 300);
    assert_eq!(body["urls"].as_array().expect("urls").len(), 2);
    let username = body["username"].as_str().expect("username");
    let (expiry, opaque) = username.split_once(':').expect("expiry:opaque");
    let expiry: u64 = expiry.parse().expect("expiry");
    assert!((before + 295..=now_secs() + 305).contains(&expiry));
    // The opaque part is 16 random bytes: it cannot name the user or the device.
    assert!(!username.contains("alice"));
    assert_eq!(URL_SAFE_NO_PAD.decode(opaque).expect("base64url").len(), 16);
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    assert_eq!(
        body["credential"].as_str(),
        Some(STANDARD.encode(mac.finalize().into_bytes()).as_str())
    );
    // A second request gets an unrelated username.
    let again: serde_json::Value = get_turn(&broker, &alice.user, Some(&alice.bearer()))
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(again["username"], body["username"]);
    // The logs never hold a credential.
    let logs = String::from_utf8_lossy(&broker.read_logs()).into_owned();
    assert!(!logs.contains(opaque) && !logs.contains(body["credential"].as_str().unwrap()));
}

#[tokio::test]
async fn only_a_device_of_the_account_gets_credentials_and_only_so_often() {
    let broker = turn_broker(&["--turn-rate-per-min", "3"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    assert_eq!(get_turn(&broker, &alice.user, None).await.status(), 401);
    assert_eq!(
        get_turn(&broker, &alice.user, Some(&bob.bearer()))
            .await
            .status(),
        401
    );
    assert_eq!(
        get_turn(&broker, &alice.user, Some("Bearer 1.AAAA"))
            .await
            .status(),
        401
    );
    for _ in 0..3 {
        assert_eq!(
            get_turn(&broker, &alice.user, Some(&alice.bearer()))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        get_turn(&broker, &alice.user, Some(&alice.bearer()))
            .await
            .status(),
        429
    );
    // Limited per device: Bob is not affected by Alice's requests.
    assert_eq!(
        get_turn(&broker, &bob.user, Some(&bob.bearer()))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn without_a_relay_the_endpoint_is_absent_and_bad_settings_are_refused() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    assert_eq!(
        get_turn(&broker, &alice.user, Some(&alice.bearer()))
            .await
            .status(),
        404
    );
    for args in [
        &["--turn-urls", "turn:127.0.0.1:3478"][..],
        &["--turn-urls", "http://x", "--turn-secret", "s"][..],
        &[
            "--turn-urls",
            "turn:x",
            "--turn-secret",
            "s",
            "--turn-ttl-secs",
            "5",
        ][..],
    ] {
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_sealpost"))
            .arg("serve")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run");
        assert!(!status.success(), "{args:?} must be refused");
    }
}

#[tokio::test]
async fn the_web_root_is_served_with_a_strict_policy_and_nothing_outside_it() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("index.html"), "<!doctype html><p>hi</p>").unwrap();
    std::fs::create_dir(root.path().join("pkg")).unwrap();
    std::fs::write(root.path().join("pkg/app_bg.wasm"), b"\0asm").unwrap();
    std::fs::write(root.path().join(".secret"), "no").unwrap();
    let broker = Broker::start(&["--web-root", root.path().to_str().unwrap()]);
    let client = reqwest::Client::new();
    let index = client
        .get(format!("{}/web/", broker.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(index.status(), 200);
    let csp = index.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert!(!csp.contains("unsafe-inline"));
    assert!(index.text().await.unwrap().contains("hi"));
    let wasm = client
        .get(format!("{}/web/pkg/app_bg.wasm", broker.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(wasm.headers()["content-type"], "application/wasm");
    for bad in [
        "/web/.secret",
        "/web/..%2f..%2fetc/passwd",
        "/web/pkg/missing.js",
    ] {
        let resp = client
            .get(format!("{}{bad}", broker.http()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{bad}");
    }
    // Off by default.
    let plain = Broker::start(&[]);
    let resp = client
        .get(format!("{}/web/", plain.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}
