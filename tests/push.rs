//! Push wake-ups against a push service double on 127.0.0.1 that speaks RFC 8030: it checks
//! each request's VAPID signature (RFC 8292) against the broker's published key, decrypts the
//! body with the subscription's keys (RFC 8291) and checks that it carries nothing but "you
//! have mail"; it answers 201, or what a test tells it to (410, 503).

mod common;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{Broker, Creds, Device, WAIT, add_device, register};
use sealpost_proto::{Class, DeviceId, EnvelopeId};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use web_push_native::{
    Auth,
    jwt_simple::{
        algorithms::{ECDSAP256PublicKeyLike, ES256PublicKey},
        claims::NoCustomClaims,
    },
    p256::{SecretKey, elliptic_curve::sec1::ToEncodedPoint},
};

/// One request the push service took.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    at: Instant,
    /// Every header line, lower-cased names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The push service double.
#[derive(Clone, Default)]
struct PushService {
    received: Arc<Mutex<Vec<Received>>>,
    /// Status codes to answer, in order; 201 once they run out.
    answers: Arc<Mutex<VecDeque<u16>>>,
}

impl PushService {
    async fn start() -> (PushService, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let service = PushService::default();
        let s = service.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(s.clone().serve(stream));
            }
        });
        (service, base)
    }

    /// HTTP/1.1 requests on one connection, one after the other.
    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let request_line = lines.next().unwrap_or_default().to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let start = head_end + 4;
            while buf.len() < start + length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = buf[start..start + length].to_vec();
            buf.drain(..start + length);
            let mut parts = request_line.split(' ');
            assert_eq!(parts.next(), Some("POST"), "RFC 8030 push is a POST");
            let path = parts.next().unwrap_or_default().to_owned();
            self.received.lock().expect("lock").push(Received {
                path,
                at: Instant::now(),
                headers,
                body,
            });
            let status = self
                .answers
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(201);
            let answer = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nLocation: /m/{}\r\n\r\n",
                rand::random::<u32>()
            );
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn received(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    async fn wait_for(&self, path: &str, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.received(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {} of {n} wake-ups",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A browser's side of a subscription: its key pair and secret.
struct Subscriber {
    secret: SecretKey,
    auth: [u8; 16],
    path: String,
}

impl Subscriber {
    fn new(path: &str) -> Subscriber {
        Subscriber {
            secret: SecretKey::random(&mut rand::rngs::OsRng),
            auth: rand::random(),
            path: path.to_owned(),
        }
    }

    /// `PushSubscription.toJSON()` for this subscriber at `base`.
    fn json(&self, base: &str) -> serde_json::Value {
        let public = self.secret.public_key().to_encoded_point(false);
        serde_json::json!({
            "endpoint": format!("{base}{}", self.path),
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(public.as_bytes()),
                "auth": URL_SAFE_NO_PAD.encode(self.auth),
            }
        })
    }

    /// Checks a request as a push service and the browser would: VAPID signed by `vapid`
    /// for this service, `aes128gcm`, and a body that decrypts to the content-free wake-up.
    fn check(&self, r: &Received, vapid: &str, base: &str, forbidden: &[&str]) {
        assert_eq!(r.header("content-encoding"), Some("aes128gcm"));
        assert!(r.header("ttl").is_some_and(|t| t.parse::<u64>().is_ok()));
        assert_eq!(r.header("topic"), Some("sealpost-wake"));
        let authorization = r.header("authorization").expect("VAPID authorization");
        let rest = authorization.strip_prefix("vapid ").expect("vapid scheme");
        let (t, k) = rest.split_once(", k=").expect("t and k");
        let token = t.strip_prefix("t=").expect("t=");
        assert_eq!(k, vapid, "signed with the key the broker publishes");
        let key =
            ES256PublicKey::from_bytes(&URL_SAFE_NO_PAD.decode(k).expect("b64")).expect("key");
        let claims = key
            .verify_token::<NoCustomClaims>(token, None)
            .expect("a valid VAPID signature");
        let audience = claims
            .audiences
            .expect("aud")
            .into_string()
            .expect("one aud");
        assert!(base.starts_with(&audience), "aud {audience} is the service");
        assert!(claims.subject.is_some_and(|s| s.starts_with("mailto:")));
        let plain = web_push_native::decrypt(
            r.body.clone(),
            &self.secret,
            &Auth::clone_from_slice(&self.auth),
        )
        .expect("the body decrypts with the subscription's keys");
        assert_eq!(plain, br#"{"sealpost":"wake"}"#, "a wake-up says only that");
        let everything = format!("{:?} {} {:?}", r.headers, r.path, plain);
        for word in forbidden {
            assert!(
                !everything.contains(word),
                "{word} reached the push service"
            );
        }
    }
}

async fn vapid_key(broker: &Broker) -> String {
    let answer: serde_json::Value = reqwest::get(format!("{}/v1/push/vapid", broker.http()))
        .await
        .expect("vapid")
        .json()
        .await
        .expect("json");
    answer["public_key"]
        .as_str()
        .expect("public_key")
        .to_owned()
}

async fn subscribe(broker: &Broker, who: &Creds, body: serde_json::Value) -> reqwest::StatusCode {
    reqwest::Client::new()
        .put(format!(
            "{}/v1/accounts/{}/devices/{}/push",
            broker.http(),
            who.user,
            who.device.0
        ))
        .header("authorization", who.bearer())
        .json(&body)
        .send()
        .await
        .expect("subscribe")
        .status()
}

fn start_broker(interval_secs: &str) -> Broker {
    Broker::start(&[
        "--push-allow-private-endpoints",
        "true",
        "--push-interval-secs",
        interval_secs,
        "--push-urgent-interval-secs",
        "1",
    ])
}

async fn send(from: &mut Device, to: &str, devices: &[DeviceId], class: Class) {
    let id = EnvelopeId(rand::random());
    let ttl = if class == Class::Urgent { 60 } else { 3600 };
    from.send_to(id, to, devices, class, ttl, b"sealed bytes of a secret")
        .await;
    let (outcome, _) = from.result_for(id).await;
    assert!(
        matches!(outcome, sealpost_proto::SendOutcome::Accepted { .. }),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn an_offline_device_gets_one_content_free_wake_up_per_interval_and_a_connected_one_none() {
    let (service, base) = PushService::start().await;
    let broker = start_broker("2");
    let vapid = vapid_key(&broker).await;
    let alice = register(&broker, "alice@test.example").await;
    let bob_phone = register(&broker, "bob@test.example").await;
    let bob_laptop = add_device(&broker, &bob_phone).await;
    let phone = Subscriber::new("/push/phone");
    let laptop = Subscriber::new("/push/laptop");
    assert_eq!(subscribe(&broker, &bob_phone, phone.json(&base)).await, 204);
    assert_eq!(
        subscribe(&broker, &bob_laptop, laptop.json(&base)).await,
        204
    );
    // Another device may not register for the phone.
    let mut by_other = bob_laptop.clone();
    by_other.device = bob_phone.device;
    by_other.token = bob_laptop.token.clone();
    assert_eq!(subscribe(&broker, &by_other, phone.json(&base)).await, 401);

    // The laptop is connected, the phone is not.
    let _laptop_socket = Device::connect(&broker, &bob_laptop).await;
    let mut a = Device::connect(&broker, &alice).await;
    let bob = bob_phone.user.clone();
    let devices = [bob_phone.device, bob_laptop.device];
    for _ in 0..3 {
        send(&mut a, &bob, &devices, Class::Durable).await;
    }
    let first = service.wait_for(&phone.path, 1).await;
    let forbidden = [alice.user.as_str(), bob.as_str(), "sealed bytes"];
    phone.check(&first[0], &vapid, &base, &forbidden);
    assert_eq!(first[0].header("urgency"), Some("normal"));

    // Three envelopes, one wake-up; the next one waits for the interval.
    send(&mut a, &bob, &devices, Class::Durable).await;
    let two = service.wait_for(&phone.path, 2).await;
    let gap = two[1].at.duration_since(two[0].at);
    assert!(gap >= Duration::from_millis(1_900), "coalesced: {gap:?}");
    phone.check(&two[1], &vapid, &base, &forbidden);
    assert!(
        service.received(&laptop.path).is_empty(),
        "the connected laptop was not woken"
    );

    // A ringing call is urgent: it waits only for the (1 s) urgent interval, not the 2 s one.
    send(&mut a, &bob, &devices, Class::Urgent).await;
    let three = service.wait_for(&phone.path, 3).await;
    assert_eq!(three[2].header("urgency"), Some("high"));
    assert!(three[2].at.duration_since(three[1].at) < Duration::from_millis(1_900));

    // Nothing more is owed: a full interval later there is still no fourth wake-up.
    let quiet_until = three[2].at + Duration::from_millis(2_500);
    while Instant::now() < quiet_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(service.received(&phone.path).len(), 3, "no fourth wake-up");
}

#[tokio::test]
async fn a_gone_subscription_is_deleted_and_a_failing_service_is_retried() {
    let (service, base) = PushService::start().await;
    let broker = start_broker("1");
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let carol = register(&broker, "carol@test.example").await;
    let bob_sub = Subscriber::new("/push/bob");
    let carol_sub = Subscriber::new("/push/carol");
    assert_eq!(subscribe(&broker, &bob, bob_sub.json(&base)).await, 204);
    assert_eq!(subscribe(&broker, &carol, carol_sub.json(&base)).await, 204);
    let mut a = Device::connect(&broker, &alice).await;

    // Carol's push service fails twice, then takes it.
    service.answers.lock().expect("lock").extend([503, 503]);
    send(&mut a, &carol.user, &[carol.device], Class::Durable).await;
    let tries = service.wait_for(&carol_sub.path, 3).await;
    assert!(
        tries[2].at.duration_since(tries[1].at) >= Duration::from_millis(900),
        "retried with backoff"
    );
    broker
        .wait_metric_labeled("sealpost_push_total", "result=\"sent\"", 1.0)
        .await;

    // Bob's subscription is gone (410): deleted, never tried again.
    service.answers.lock().expect("lock").push_back(410);
    send(&mut a, &bob.user, &[bob.device], Class::Durable).await;
    service.wait_for(&bob_sub.path, 1).await;
    broker
        .wait_metric_labeled("sealpost_push_total", "result=\"gone\"", 1.0)
        .await;
    send(&mut a, &bob.user, &[bob.device], Class::Durable).await;
    broker
        .wait_metric_labeled("sealpost_push_total", "result=\"no_subscription\"", 1.0)
        .await;
    assert_eq!(service.received(&bob_sub.path).len(), 1);
}

#[tokio::test]
async fn bad_subscriptions_are_refused_in_words() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let sub = Subscriber::new("/p");
    for (endpoint, words) in [
        ("http://127.0.0.1:9/p", "https URL"),
        ("https://127.0.0.1/p", "public host"),
        ("not a url", "https URL"),
    ] {
        let mut body = sub.json("");
        body["endpoint"] = endpoint.into();
        let answer = reqwest::Client::new()
            .put(format!(
                "{}/v1/accounts/{}/devices/{}/push",
                broker.http(),
                bob.user,
                bob.device.0
            ))
            .header("authorization", bob.bearer())
            .json(&body)
            .send()
            .await
            .expect("subscribe");
        assert_eq!(answer.status(), 400);
        let text = answer.text().await.expect("body");
        assert!(text.contains(words), "{endpoint}: {text}");
    }
    let mut body = sub.json("https://push.example.com");
    body["keys"]["p256dh"] = "AAAA".into();
    assert_eq!(subscribe(&broker, &bob, body).await, 400);
}

#[tokio::test]
async fn a_client_registers_a_unifiedpush_endpoint_with_the_sdk_and_is_woken() {
    let (service, base) = PushService::start().await;
    let broker = start_broker("1");
    let mut alice = common::sdk::register(&broker, "alice@test.example").await;
    let bob = common::sdk::register(&broker, "bob@test.example").await;
    let key = bob.client.push_key().await.expect("push key");
    assert_eq!(key.as_deref(), Some(vapid_key(&broker).await.as_str()));
    let sub = Subscriber::new("/up/bob");
    let json = sub.json(&base);
    bob.client
        .register_push(
            json["endpoint"].as_str().expect("endpoint"),
            json["keys"]["p256dh"].as_str().expect("p256dh"),
            json["keys"]["auth"].as_str().expect("auth"),
            sealpost_client::sdk::PushService::UnifiedPush,
        )
        .await
        .expect("registered");
    // Bob's client is not connected: Alice's message wakes it.

    alice
        .client
        .send_text("bob@test.example", "wake up")
        .await
        .expect("send");
    let got = service.wait_for(&sub.path, 1).await;
    sub.check(
        &got[0],
        key.as_deref().expect("key"),
        &base,
        &["alice", "wake up"],
    );

    // Unregistered: the next one wakes nobody (counted against what was counted before).
    bob.client.unregister_push().await.expect("unregistered");
    let before = broker
        .metric_labeled("sealpost_push_total", "result=\"no_subscription\"")
        .await;
    alice
        .client
        .send_text("bob@test.example", "again")
        .await
        .expect("send");
    broker
        .wait_metric_labeled(
            "sealpost_push_total",
            "result=\"no_subscription\"",
            before + 1.0,
        )
        .await;
    assert_eq!(service.received(&sub.path).len(), 1);
}
