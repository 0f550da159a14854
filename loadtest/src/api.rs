//! The broker's HTTP JSON API: account and device registration.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use futures_util::{StreamExt, TryStreamExt, stream};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use crate::{client::Account, util::Targets};

/// A client of the broker's HTTP API.
#[derive(Clone)]
pub(crate) struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    pub(crate) fn new(base: &str) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            client,
            base: base.to_owned(),
        })
    }

    /// One client per broker of `targets`, in the same order (see [`register_many`]).
    pub(crate) fn each(targets: &Targets) -> Result<Vec<Self>> {
        targets.iter().map(|t| Api::new(&t.http)).collect()
    }

    /// `POST /v1/accounts`: creates `handle` with its first device.
    pub(crate) async fn register(&self, handle: &str) -> Result<Account> {
        let body = json!({"handle": handle, "identity_keys": identity_keys()});
        let resp = self
            .client
            .post(format!("{}/v1/accounts", self.base))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST /v1/accounts for {handle}"))?;
        let v = created(resp, "POST /v1/accounts").await?;
        account_from(handle, &v)
    }

    /// `POST /v1/accounts/{handle}/devices`, authorized as `owner`: adds one device.
    pub(crate) async fn add_device(&self, owner: &Account) -> Result<Account> {
        let body = json!({"identity_keys": identity_keys()});
        let resp = self
            .client
            .post(format!(
                "{}/v1/accounts/{}/devices",
                self.base, owner.handle
            ))
            .header("Authorization", owner.bearer())
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST /v1/accounts/{}/devices", owner.handle))?;
        let v = created(resp, "POST /v1/accounts/{handle}/devices").await?;
        account_from(&owner.handle, &v)
    }
}

impl Api {
    /// `POST /v1/accounts/{h}/blobs`: starts an attachment of `size` bytes; its id.
    pub(crate) async fn start_blob(&self, owner: &Account, size: u64) -> Result<String> {
        let resp = self
            .client
            .post(format!("{}/v1/accounts/{}/blobs", self.base, owner.handle))
            .header("Authorization", owner.bearer())
            .json(&json!({ "size": size }))
            .send()
            .await
            .context("POST /v1/accounts/{h}/blobs")?;
        let v = created(resp, "POST /v1/accounts/{h}/blobs").await?;
        v["id"]
            .as_str()
            .map(str::to_owned)
            .context("no id in the answer")
    }

    /// `PATCH /v1/accounts/{h}/blobs/{id}`: one piece at `offset`, durable when it returns.
    pub(crate) async fn put_piece(
        &self,
        owner: &Account,
        id: &str,
        offset: u64,
        piece: Vec<u8>,
    ) -> Result<()> {
        let resp = self
            .client
            .patch(format!(
                "{}/v1/accounts/{}/blobs/{id}",
                self.base, owner.handle
            ))
            .header("Authorization", owner.bearer())
            .header("upload-offset", offset.to_string())
            .body(piece)
            .send()
            .await
            .context("PATCH /v1/accounts/{h}/blobs/{id}")?;
        if resp.status() != reqwest::StatusCode::NO_CONTENT {
            bail!("PATCH /v1/accounts/{{h}}/blobs/{{id}}: {}", resp.status());
        }
        Ok(())
    }

    /// `GET /v1/blobs/{id}`: the whole attachment, streamed; its length.
    pub(crate) async fn get_blob(&self, id: &str) -> Result<u64> {
        let resp = self
            .client
            .get(format!("{}/v1/blobs/{id}", self.base))
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .context("GET /v1/blobs/{id}")?;
        if !resp.status().is_success() {
            bail!("GET /v1/blobs/{{id}}: {}", resp.status());
        }
        let mut body = resp.bytes_stream();
        let mut len = 0u64;
        while let Some(piece) = body.next().await {
            len += piece.context("reading the download")?.len() as u64;
        }
        Ok(len)
    }
}

/// Opaque identity keys for a synthetic device: 32 random bytes, base64 (standard, padded).
fn identity_keys() -> String {
    let mut keys = [0u8; 32];
    StdRng::from_entropy().fill_bytes(&mut keys);
    STANDARD.encode(keys)
}

async fn created(resp: reqwest::Response, what: &str) -> Result<Value> {
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!(
            "{what} answered {status}: {}",
            text.chars().take(300).collect::<String>()
        );
    }
    resp.json()
        .await
        .with_context(|| format!("{what}: response is not JSON"))
}

fn account_from(handle: &str, v: &Value) -> Result<Account> {
    let device = v
        .get("device_id")
        .and_then(Value::as_u64)
        .and_then(|d| u32::try_from(d).ok())
        .with_context(|| format!("no device_id in {v}"))?;
    let token_text = v
        .get("token")
        .and_then(Value::as_str)
        .context("no token in response")?;
    let token = URL_SAFE_NO_PAD
        .decode(token_text)
        .context("token is not base64url without padding")?;
    Ok(Account {
        handle: handle.to_owned(),
        device,
        token_text: token_text.to_owned(),
        token,
    })
}

/// Registers every handle, `concurrency` at a time, each with `devices_per_account` devices;
/// handle `i` through `apis[i % apis.len()]` (round-robin over the brokers). Returns the
/// devices account by account, in the order of `handles`, and prints progress.
pub(crate) async fn register_many(
    apis: &[Api],
    handles: Vec<String>,
    devices_per_account: usize,
    concurrency: usize,
) -> Result<Vec<Vec<Account>>> {
    let total = handles.len();
    if total == 0 {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let step = (total / 10).max(1);
    let done = std::sync::atomic::AtomicUsize::new(0);
    if apis.is_empty() {
        bail!("no broker to register through");
    }
    let accounts: Vec<Vec<Account>> = stream::iter(handles.into_iter().enumerate())
        .map(|(i, handle)| {
            let done = &done;
            let api = &apis[i % apis.len()];
            async move {
                let first = api.register(&handle).await?;
                let mut devices = Vec::with_capacity(devices_per_account);
                for _ in 1..devices_per_account {
                    devices.push(api.add_device(&first).await?);
                }
                devices.insert(0, first);
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_multiple_of(step) && n < total {
                    println!("  registered {n}/{total} accounts");
                }
                anyhow::Ok(devices)
            }
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await?;
    let secs = started.elapsed().as_secs_f64();
    let devices: usize = accounts.iter().map(Vec::len).sum();
    #[allow(clippy::cast_precision_loss)]
    let rate = devices as f64 / secs.max(1e-9);
    println!(
        "  registered {total} accounts ({devices} devices) in {secs:.2}s ({rate:.0} devices/s)"
    );
    Ok(accounts)
}
