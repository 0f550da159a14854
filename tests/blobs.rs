//! Attachments against a real broker process: resumable uploads in pieces (across a client
//! that goes away and a broker killed with `kill -9`), downloads whole and by range, and the
//! limits (cap, quota, expiry, unknown ids, half uploads).

mod common;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::*;
use reqwest::{Client, StatusCode};
use serde_json::Value;

/// Starts an attachment of `size` bytes for `who`: its id.
async fn start(http: &Client, broker: &Broker, who: &Creds, size: u64) -> (StatusCode, Value) {
    let r = http
        .post(format!("{}/v1/accounts/{}/blobs", broker.http(), who.user))
        .header("authorization", who.bearer())
        .json(&serde_json::json!({ "size": size }))
        .send()
        .await
        .expect("start");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn started(http: &Client, broker: &Broker, who: &Creds, size: u64) -> String {
    let (status, body) = start(http, broker, who, size).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

/// Appends a piece at `offset`: (status, Upload-Offset answered).
async fn put(
    http: &Client,
    broker: &Broker,
    who: &Creds,
    id: &str,
    offset: u64,
    piece: &[u8],
) -> (StatusCode, Option<u64>) {
    let r = http
        .patch(format!(
            "{}/v1/accounts/{}/blobs/{id}",
            broker.http(),
            who.user
        ))
        .header("authorization", who.bearer())
        .header("upload-offset", offset.to_string())
        .body(piece.to_vec())
        .send()
        .await
        .expect("patch");
    let at = r
        .headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (r.status(), at)
}

/// Where an upload stands: (size, received), or the status when there is none.
async fn head(http: &Client, broker: &Broker, id: &str) -> Result<(u64, u64), StatusCode> {
    let r = http
        .head(format!("{}/v1/blobs/{id}", broker.http()))
        .send()
        .await
        .expect("head");
    if r.status() != StatusCode::OK {
        return Err(r.status());
    }
    let number = |name: &str| -> u64 { r.headers()[name].to_str().unwrap().parse().unwrap() };
    Ok((number("upload-length"), number("upload-offset")))
}

async fn get(
    http: &Client,
    broker: &Broker,
    id: &str,
    range: Option<&str>,
) -> (StatusCode, Vec<u8>) {
    let mut request = http.get(format!("{}/v1/blobs/{id}", broker.http()));
    if let Some(range) = range {
        request = request.header("range", range);
    }
    let r = request.send().await.expect("get");
    let status = r.status();
    (status, r.bytes().await.expect("body").to_vec())
}

/// Uploads `data` from wherever the broker says the upload stands, `piece` bytes at a time.
async fn upload_rest(
    http: &Client,
    broker: &Broker,
    who: &Creds,
    id: &str,
    data: &[u8],
    piece: usize,
) {
    let (_, at) = head(http, broker, id).await.expect("the upload exists");
    let mut at = usize::try_from(at).expect("fits");
    while at < data.len() {
        let end = (at + piece).min(data.len());
        let (status, received) = put(http, broker, who, id, at as u64, &data[at..end]).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        at = usize::try_from(received.expect("Upload-Offset")).expect("fits");
    }
}

/// Waits (up to 30 s) until `check` holds.
async fn waiting_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Bytes that are not all alike (a stand-in for an encrypted file).
fn noise(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_goes_up_in_pieces_resumes_and_comes_down_whole_or_by_range() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let http = Client::new();
    let data = noise(1024 * 1024, 1);
    let id = started(&http, &broker, &alice, data.len() as u64).await;
    assert_eq!(URL_SAFE_NO_PAD.decode(&id).expect("base64url").len(), 32);

    // Half of it, then the uploader goes away: nothing of it can be downloaded.
    let (status, at) = put(&http, &broker, &alice, &id, 0, &data[..300_000]).await;
    assert_eq!((status, at), (StatusCode::NO_CONTENT, Some(300_000)));
    assert_eq!(
        get(&http, &broker, &id, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(head(&http, &broker, &id).await, Ok((1024 * 1024, 300_000)));
    // A piece that does not start where the upload ends is refused, with where it ends.
    let (status, at) = put(&http, &broker, &alice, &id, 0, &data[..10]).await;
    assert_eq!((status, at), (StatusCode::CONFLICT, Some(300_000)));
    // Another account cannot add to it (for it, there is no such upload).
    let (status, _) = put(&http, &broker, &bob, &id, 300_000, &data[300_000..300_010]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Past its size: refused.
    let mut long = data[300_000..].to_vec();
    long.push(0);
    assert_eq!(
        put(&http, &broker, &alice, &id, 300_000, &long).await.0,
        StatusCode::BAD_REQUEST
    );

    // The uploader comes back: it asks where to go on from, and finishes.
    upload_rest(&http, &broker, &alice, &id, &data, 256 * 1024).await;
    let (status, body) = get(&http, &broker, &id, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(blake3::hash(&body), blake3::hash(&data));
    let (status, body) = get(&http, &broker, &id, Some("bytes=1000-1999")).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &data[1000..2000])
    );
    let (status, body) = get(&http, &broker, &id, Some("bytes=-5")).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &data[data.len() - 5..])
    );
    assert_eq!(
        get(&http, &broker, &id, Some("bytes=2000000-")).await.0,
        StatusCode::RANGE_NOT_SATISFIABLE
    );
    // Unknown and malformed ids are simply not found.
    let unknown = URL_SAFE_NO_PAD.encode([7u8; 32]);
    assert_eq!(
        get(&http, &broker, &unknown, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&http, &broker, "not-an-id", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        head(&http, &broker, &unknown).await,
        Err(StatusCode::NOT_FOUND)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_upload_survives_kill_9_of_the_broker_and_nothing_acknowledged_is_lost() {
    // Above the default cap of 100 MiB.
    let mut broker = Broker::start(&["--blob-max-mb", "256"]);
    let alice = register(&broker, "alice@test.example").await;
    let http = Client::new();
    let data = noise(200 * 1024 * 1024, 2);
    let id = started(&http, &broker, &alice, data.len() as u64).await;
    let piece = 4 * 1024 * 1024;
    let mut acked = 0usize;
    while acked < 90 * 1024 * 1024 {
        let end = (acked + piece).min(data.len());
        let (status, at) = put(&http, &broker, &alice, &id, acked as u64, &data[acked..end]).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        acked = usize::try_from(at.expect("Upload-Offset")).expect("fits");
    }
    broker.kill9();
    broker.restart();
    let (size, received) = head(&http, &broker, &id)
        .await
        .expect("the upload survived");
    assert_eq!(size, data.len() as u64);
    assert!(
        received >= acked as u64,
        "{received} < {acked} acknowledged"
    );
    upload_rest(&http, &broker, &alice, &id, &data, piece).await;
    let (status, body) = get(&http, &broker, &id, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), data.len());
    assert_eq!(blake3::hash(&body), blake3::hash(&data), "the same bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_quotas_and_expiry_are_kept() {
    let broker = Broker::start(&[
        "--blob-max-mb",
        "1",
        "--blob-quota-mb",
        "2",
        "--blob-ttl-secs",
        "2",
        "--expiry-sweep-ms",
        "200",
    ]);
    let alice = register(&broker, "alice@test.example").await;
    let http = Client::new();
    let (status, body) = start(&http, &broker, &alice, 1024 * 1024 + 1).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large"))
    );
    assert_eq!(
        start(&http, &broker, &alice, 0).await.0,
        StatusCode::BAD_REQUEST
    );
    let (status, _) = start(&http, &broker, &alice, 1).await;
    assert_eq!(status, StatusCode::CREATED);
    // Unauthenticated, or for another account: refused.
    let anonymous = http
        .post(format!(
            "{}/v1/accounts/{}/blobs",
            broker.http(),
            alice.user
        ))
        .json(&serde_json::json!({ "size": 1 }))
        .send()
        .await
        .expect("post");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // Two of 1 MiB fit in 2 MiB with the first byte; a third does not until they expire.
    let a = started(&http, &broker, &alice, 1024 * 1024 - 1).await;
    let b = started(&http, &broker, &alice, 1024 * 1024).await;
    let (status, body) = start(&http, &broker, &alice, 1024 * 1024).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("quota_exceeded"))
    );
    let data = noise(1024 * 1024, 3);
    upload_rest(&http, &broker, &alice, &b, &data, 512 * 1024).await;
    assert_eq!(get(&http, &broker, &b, None).await.0, StatusCode::OK);
    let _ = a;

    // After its time-to-live it is gone, and its file with it; the quota is free again.
    waiting_until("the attachments expire", || async {
        get(&http, &broker, &b, None).await.0 == StatusCode::NOT_FOUND
    })
    .await;
    waiting_until("their files are deleted", || async {
        std::fs::read_dir(broker.data_dir().join("attachments"))
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    })
    .await;
    assert_eq!(
        start(&http, &broker, &alice, 1024 * 1024).await.0,
        StatusCode::CREATED
    );
}
