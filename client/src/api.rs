//! The broker's HTTP API, as a typed client (reqwest). Everything here is public data or a
//! credential the broker issued; no plaintext and no private key ever passes through.
//!
//! | method | path | used for |
//! |---|---|---|
//! | POST | `/v1/accounts` | [`Api::register`] |
//! | GET | `/v1/accounts/{h}/devices` | [`Api::devices`] (the broker's view: ids and keys, unsigned) |
//! | POST | `/v1/accounts/{h}/devices` | [`Api::add_device_with_code`] |
//! | DELETE | `/v1/accounts/{h}/devices/{id}` | [`Api::remove_device`] |
//! | PUT, GET | `/v1/accounts/{h}/devices/{id}/keys` | [`Api::upload_keys`], [`Api::key_count`] |
//! | POST | `/v1/accounts/{h}/devices/{id}/keys/claim` | [`Api::claim_key`] |
//! | GET, PUT | `/v1/accounts/{h}/device-list` | [`Api::device_list`], [`Api::put_device_list`] |
//! | PUT | `/v1/accounts/{h}/delivery-token` | [`Api::put_delivery_token`] |
//! | POST | `/v1/accounts/{h}/link-codes` | [`Api::new_link_code`] |
//! | POST | `/v1/accounts/{h}/session-ticket` | [`Api::session_ticket`] (to log in on `/v1/ws`) |
//! | POST, PATCH | `/v1/accounts/{h}/blobs[/{id}]` | [`Api::start_blob`], [`Api::put_blob_piece`] (attachments) |
//! | HEAD, GET | `/v1/blobs/{id}` | [`Api::blob_offset`], [`Api::blob_range`] (anonymous) |
//! | GET | `/v1/domains/{d}/blobs/{id}` | [`Api::blob_range`] of another domain's attachment, through this broker |
//!
//! Errors carry the broker's stable `{"error", "message"}` answer; their `Display` never
//! contains a token.

use std::{fmt, time::Duration};

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::{engine::KeyUpload, http};

/// A device list as the broker serves it: the signed blob and its key-transparency evidence
/// (`None` from a domain without a log). Neither is verified yet.
#[derive(Debug, Clone)]
pub struct FetchedList {
    /// The signed list.
    pub signed: Vec<u8>,
    /// `sealpost_proto::transparency::Evidence`, encoded.
    pub evidence: Option<Vec<u8>>,
}

/// How long one HTTP request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one piece of an attachment (up to 4 MiB) may take to go up or come down.
const BLOB_PIECE_TIMEOUT: Duration = Duration::from_secs(120);

/// The `Upload-Offset` of an answer.
fn upload_offset(resp: &Response) -> Option<u64> {
    resp.headers()
        .get("upload-offset")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

pub use crate::error::ApiError;

impl From<reqwest::Error> for ApiError {
    fn from(e: reqwest::Error) -> Self {
        // Without the URL (it names accounts), with the cause ("error sending request" alone
        // says nothing: refused, a TLS failure, a name that does not resolve).
        let e = e.without_url();
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        ApiError::Transport(text)
    }
}

/// A device's credentials: its account, its id, and the auth token the broker issued once.
/// No `Debug` that shows the token; wiped on drop.
#[derive(Clone)]
pub struct DeviceCreds {
    /// The account handle.
    pub handle: String,
    /// The device id.
    pub device: u32,
    /// The 32-byte auth token.
    pub token: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for DeviceCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCreds")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl DeviceCreds {
    /// `Bearer <device>.<token>`.
    fn bearer(&self) -> Zeroizing<String> {
        http::bearer(self.device, &self.token)
    }
}

/// How a key claim is admitted by the broker.
pub enum ClaimAuth<'a> {
    /// The target account's delivery token: the claim does not name the claimant.
    DeliveryToken(&'a [u8]),
    /// An authenticated device of a local account (used for first contact and for one's own
    /// devices).
    Device(&'a DeviceCreds),
    /// No credential (targets that accept anyone).
    None,
}

/// A claimed one-time (or fallback) key, as the directory stores it (opaque bytes the device
/// signed; see [`SignedOneTimeKey`](crate::crypto::SignedOneTimeKey)).
#[derive(Debug, Clone)]
pub struct ClaimedKey {
    /// The key's id, as uploaded.
    pub key_id: u64,
    /// The key bytes.
    pub key: Vec<u8>,
    /// True when the one-time keys ran out and this is the fallback key.
    pub fallback: bool,
}

/// A device as the broker lists it (unsigned).
pub use crate::engine::BrokerDevice;

/// A link code as the broker issued it.
pub struct IssuedLinkCode {
    /// The code (single use).
    pub code: Zeroizing<String>,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// A typed client of the broker's HTTP API.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api").field("base", &self.base).finish()
    }
}

#[derive(Deserialize)]
struct NewDeviceAnswer {
    handle: String,
    device_id: u32,
    token: String,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
    #[serde(default)]
    message: String,
}

impl Api {
    /// A client for the broker at `base` (`http://host:port` or `https://...`).
    pub fn new(base: &str) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The WebSocket URL of `path` (`/v1/ws` or `/v1/sealed`).
    pub fn ws_url(&self, path: &str) -> String {
        let rest = self
            .base
            .strip_prefix("https://")
            .map(|r| format!("wss://{r}"))
            .or_else(|| {
                self.base
                    .strip_prefix("http://")
                    .map(|r| format!("ws://{r}"))
            })
            .unwrap_or_else(|| self.base.clone());
        format!("{rest}{path}")
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    fn authed(&self, method: Method, path: &str, creds: &DeviceCreds) -> RequestBuilder {
        self.request(method, path)
            .header("authorization", creds.bearer().as_str())
    }

    async fn check(resp: Response, what: &'static str) -> Result<Response, ApiError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let (code, message) = match resp.json::<ErrorAnswer>().await {
            Ok(e) => (e.error, e.message),
            Err(_) => ("unknown".into(), String::new()),
        };
        Err(ApiError::Refused {
            what,
            status,
            code,
            message,
        })
    }

    async fn json<T: DeserializeOwned>(resp: Response, what: &'static str) -> Result<T, ApiError> {
        resp.json().await.map_err(|_| ApiError::BadAnswer(what))
    }

    fn creds_from(answer: NewDeviceAnswer, what: &'static str) -> Result<DeviceCreds, ApiError> {
        let token = Zeroizing::new(answer.token);
        Ok(DeviceCreds {
            handle: answer.handle,
            device: answer.device_id,
            token: http::decode_token(&token).ok_or(ApiError::BadAnswer(what))?,
        })
    }

    /// `POST /v1/accounts`: creates the account with its first device.
    pub async fn register(
        &self,
        handle: &str,
        identity_keys: &[u8],
        registration_token: Option<&str>,
    ) -> Result<DeviceCreds, ApiError> {
        const WHAT: &str = "registration";
        let mut body =
            json!({ "handle": handle, "identity_keys": http::identity_keys(identity_keys) });
        if let Some(t) = registration_token {
            body["registration_token"] = Value::from(t);
        }
        let resp = self
            .request(Method::POST, "/v1/accounts")
            .json(&body)
            .send()
            .await?;
        let answer = Self::json(Self::check(resp, WHAT).await?, WHAT).await?;
        Self::creds_from(answer, WHAT)
    }

    /// `POST /v1/accounts/{h}/devices` with a link code: adds this device to `handle`.
    pub async fn add_device_with_code(
        &self,
        handle: &str,
        identity_keys: &[u8],
        link_code: &str,
    ) -> Result<DeviceCreds, ApiError> {
        const WHAT: &str = "adding a device";
        let resp = self
            .request(Method::POST, &format!("/v1/accounts/{handle}/devices"))
            .json(
                &json!({ "identity_keys": http::identity_keys(identity_keys), "link_code": link_code }),
            )
            .send()
            .await?;
        let answer = Self::json(Self::check(resp, WHAT).await?, WHAT).await?;
        Self::creds_from(answer, WHAT)
    }

    /// `GET /v1/accounts/{h}/devices`: the broker's (unsigned) device list.
    pub async fn devices(&self, handle: &str) -> Result<Vec<BrokerDevice>, ApiError> {
        const WHAT: &str = "listing devices";
        let resp = self
            .request(Method::GET, &format!("/v1/accounts/{handle}/devices"))
            .send()
            .await?;
        let answer: Value = Self::json(Self::check(resp, WHAT).await?, WHAT).await?;
        http::broker_devices(&answer).ok_or(ApiError::BadAnswer(WHAT))
    }

    /// `POST .../blobs`: starts an attachment upload of `size` bytes; its id (base64url).
    pub async fn start_blob(&self, creds: &DeviceCreds, size: u64) -> Result<String, ApiError> {
        let path = format!("/v1/accounts/{}/blobs", creds.handle);
        let resp = self
            .authed(Method::POST, &path, creds)
            .json(&json!({ "size": size }))
            .send()
            .await?;
        let answer: Value = Self::json(
            Self::check(resp, "starting an upload").await?,
            "starting an upload",
        )
        .await?;
        answer["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or(ApiError::BadAnswer("starting an upload"))
    }

    /// `PATCH .../blobs/{id}`: appends `piece` at `offset`; the bytes the broker holds after
    /// it. A piece at the wrong offset answers where the upload ends instead (`Err` only for
    /// other refusals).
    pub async fn put_blob_piece(
        &self,
        creds: &DeviceCreds,
        id: &str,
        offset: u64,
        piece: Vec<u8>,
    ) -> Result<u64, ApiError> {
        let path = format!("/v1/accounts/{}/blobs/{id}", creds.handle);
        let resp = self
            .authed(Method::PATCH, &path, creds)
            .header("upload-offset", offset.to_string())
            .timeout(BLOB_PIECE_TIMEOUT)
            .body(piece)
            .send()
            .await?;
        let at = upload_offset(&resp);
        match (resp.status(), at) {
            (StatusCode::NO_CONTENT | StatusCode::CONFLICT, Some(at)) => Ok(at),
            _ => Err(Self::check(resp, "uploading a file")
                .await
                .err()
                .unwrap_or(ApiError::BadAnswer("uploading a file"))),
        }
    }

    /// `HEAD /v1/blobs/{id}`: the bytes of an upload the broker holds (where to resume).
    pub async fn blob_offset(&self, id: &str) -> Result<u64, ApiError> {
        let resp = self
            .request(Method::HEAD, &format!("/v1/blobs/{id}"))
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(ApiError::Refused {
                what: "resuming an upload",
                status: resp.status().as_u16(),
                code: "not_found".into(),
                message: "no such upload (expired?)".into(),
            });
        }
        upload_offset(&resp).ok_or(ApiError::BadAnswer("resuming an upload"))
    }

    /// `GET /v1/blobs/{id}` with `Range: bytes={start}-{end - 1}`: those bytes of a whole
    /// attachment, fetched without credentials; one kept by another domain's broker
    /// (`remote`) through this broker (`/v1/domains/{domain}/blobs/{id}`).
    pub async fn blob_range(
        &self,
        remote: Option<&str>,
        id: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, ApiError> {
        let path = match remote {
            Some(domain) => format!("/v1/domains/{domain}/blobs/{id}"),
            None => format!("/v1/blobs/{id}"),
        };
        let resp = self
            .request(Method::GET, &path)
            .header("range", format!("bytes={start}-{}", end - 1))
            .timeout(BLOB_PIECE_TIMEOUT)
            .send()
            .await?;
        let resp = Self::check(resp, "downloading a file").await?;
        Ok(resp.bytes().await?.to_vec())
    }

    /// `DELETE /v1/accounts/{h}/devices/{id}`.
    pub async fn remove_device(&self, creds: &DeviceCreds, device: u32) -> Result<(), ApiError> {
        let path = format!("/v1/accounts/{}/devices/{device}", creds.handle);
        let resp = self.authed(Method::DELETE, &path, creds).send().await?;
        Self::check(resp, "removing a device").await?;
        Ok(())
    }

    /// `GET /v1/push/vapid`: the broker's VAPID public key (base64url), the
    /// `applicationServerKey` of a subscription; `None` when the broker does not push.
    pub async fn push_key(&self) -> Result<Option<String>, ApiError> {
        const WHAT: &str = "fetching the push key";
        let resp = self.request(Method::GET, "/v1/push/vapid").send().await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let v: Value = Self::json(Self::check(resp, WHAT).await?, WHAT).await?;
        v["public_key"]
            .as_str()
            .map(|k| Some(k.to_owned()))
            .ok_or(ApiError::BadAnswer(WHAT))
    }

    /// `PUT .../devices/{id}/push` (`Some`: a subscription as `PushSubscription.toJSON()`
    /// gives it, plus `kind`) or `DELETE` (`None`).
    pub async fn set_push(
        &self,
        creds: &DeviceCreds,
        subscription: Option<&Value>,
    ) -> Result<(), ApiError> {
        let path = format!(
            "/v1/accounts/{}/devices/{}/push",
            creds.handle, creds.device
        );
        let resp = match subscription {
            Some(body) => self.authed(Method::PUT, &path, creds).json(body),
            None => self.authed(Method::DELETE, &path, creds),
        }
        .send()
        .await?;
        Self::check(resp, "registering for push wake-ups").await?;
        Ok(())
    }

    /// `PUT .../keys`: uploads one-time keys (and a fallback key); returns how many one-time
    /// keys the device now holds.
    pub async fn upload_keys(
        &self,
        creds: &DeviceCreds,
        one_time: &[(u64, Vec<u8>)],
        fallback: Option<&(u64, Vec<u8>)>,
    ) -> Result<u64, ApiError> {
        self.upload(creds, "keys", "uploading keys", one_time, fallback)
            .await
    }

    /// `PUT .../key-packages`: uploads MLS KeyPackages (and a last-resort one); returns how
    /// many one-time KeyPackages the device now holds.
    pub async fn upload_key_packages(
        &self,
        creds: &DeviceCreds,
        packages: &[(u64, Vec<u8>)],
        last_resort: Option<&(u64, Vec<u8>)>,
    ) -> Result<u64, ApiError> {
        let what = "uploading KeyPackages";
        self.upload(creds, "key-packages", what, packages, last_resort)
            .await
    }

    async fn upload(
        &self,
        creds: &DeviceCreds,
        set: &str,
        what: &'static str,
        one_time: &[(u64, Vec<u8>)],
        fallback: Option<&(u64, Vec<u8>)>,
    ) -> Result<u64, ApiError> {
        let body = http::key_upload_body(&KeyUpload {
            one_time: one_time.to_vec(),
            fallback: fallback.cloned(),
        });
        let path = format!(
            "/v1/accounts/{}/devices/{}/{set}",
            creds.handle, creds.device
        );
        let resp = self
            .authed(Method::PUT, &path, creds)
            .json(&body)
            .send()
            .await?;
        let v: Value = Self::json(Self::check(resp, what).await?, what).await?;
        v["one_time"].as_u64().ok_or(ApiError::BadAnswer(what))
    }

    /// `GET .../keys`: this device's one-time key count and whether it has a fallback key.
    pub async fn key_count(&self, creds: &DeviceCreds) -> Result<(u64, bool), ApiError> {
        const WHAT: &str = "counting keys";
        let path = format!(
            "/v1/accounts/{}/devices/{}/keys",
            creds.handle, creds.device
        );
        let resp = self.authed(Method::GET, &path, creds).send().await?;
        let v: Value = Self::json(Self::check(resp, WHAT).await?, WHAT).await?;
        Ok((
            v["one_time"].as_u64().ok_or(ApiError::BadAnswer(WHAT))?,
            v["fallback"].as_bool().ok_or(ApiError::BadAnswer(WHAT))?,
        ))
    }

    /// `POST .../keys/claim`: claims one of a device's keys (a one-time key, or the
    /// fallback key once they ran out).
    pub async fn claim_key(
        &self,
        handle: &str,
        device: u32,
        auth: ClaimAuth<'_>,
    ) -> Result<ClaimedKey, ApiError> {
        self.claim(handle, device, "keys", "claiming a key", auth)
            .await
    }

    /// `POST .../key-packages/claim`: claims one of a device's MLS KeyPackages (a one-time
    /// one, or the last-resort one once they ran out).
    pub async fn claim_key_package(
        &self,
        handle: &str,
        device: u32,
        auth: ClaimAuth<'_>,
    ) -> Result<ClaimedKey, ApiError> {
        let what = "claiming a KeyPackage";
        self.claim(handle, device, "key-packages", what, auth).await
    }

    async fn claim(
        &self,
        handle: &str,
        device: u32,
        set: &str,
        what: &'static str,
        auth: ClaimAuth<'_>,
    ) -> Result<ClaimedKey, ApiError> {
        #[derive(Deserialize)]
        struct Answer {
            key_id: u64,
            key: String,
            fallback: bool,
        }
        let path = format!("/v1/accounts/{handle}/devices/{device}/{set}/claim");
        let request = match auth {
            ClaimAuth::DeliveryToken(token) => self
                .request(Method::POST, &path)
                .header("sealpost-delivery-token", http::token(token).as_str()),
            ClaimAuth::Device(creds) => self
                .authed(Method::POST, &path, creds)
                .header("sealpost-account", creds.handle.as_str()),
            ClaimAuth::None => self.request(Method::POST, &path),
        };
        let resp = request.send().await?;
        let a: Answer = Self::json(Self::check(resp, what).await?, what).await?;
        Ok(ClaimedKey {
            key_id: a.key_id,
            key: http::claimed_key(&json!({ "key": a.key })).ok_or(ApiError::BadAnswer(what))?,
            fallback: a.fallback,
        })
    }

    /// `GET .../device-list`: the signed device list blob, `None` if the account has none.
    pub async fn device_list(&self, handle: &str) -> Result<Option<Vec<u8>>, ApiError> {
        Ok(self.proved_device_list(handle).await?.map(|l| l.signed))
    }

    /// `GET .../device-list` with its key-transparency evidence.
    pub async fn proved_device_list(&self, handle: &str) -> Result<Option<FetchedList>, ApiError> {
        let request = self.request(Method::GET, &format!("/v1/accounts/{handle}/device-list"));
        Self::device_list_answer(request).await
    }

    /// `GET .../device-list` of the account of `creds`, with its credentials: asked on the
    /// authenticated channel, where the broker knows the account anyway.
    pub async fn own_device_list(&self, creds: &DeviceCreds) -> Result<Option<Vec<u8>>, ApiError> {
        Ok(self.own_proved_device_list(creds).await?.map(|l| l.signed))
    }

    /// [`Api::own_device_list`] with its key-transparency evidence.
    pub async fn own_proved_device_list(
        &self,
        creds: &DeviceCreds,
    ) -> Result<Option<FetchedList>, ApiError> {
        let path = format!("/v1/accounts/{}/device-list", creds.handle);
        Self::device_list_answer(self.authed(Method::GET, &path, creds)).await
    }

    /// `GET /v1/transparency/audit`: signed roots `from..=to` of `domain`'s log (this broker's
    /// own with `None`) and the append-only proof between them.
    pub async fn transparency_audit(
        &self,
        domain: &str,
        from: u64,
        to: u64,
    ) -> Result<(Vec<Vec<u8>>, Vec<u8>), ApiError> {
        const WHAT: &str = "fetching a transparency audit";
        let request = self
            .request(Method::GET, "/v1/transparency/audit")
            .query(&[("domain", domain)])
            .query(&[("from", from), ("to", to)]);
        let v: Value = Self::json(Self::check(request.send().await?, WHAT).await?, WHAT).await?;
        let roots = http::records(&v, "roots").ok_or(ApiError::BadAnswer(WHAT))?;
        let proof = http::record(&v, "proof").ok_or(ApiError::BadAnswer(WHAT))?;
        Ok((roots, proof))
    }

    /// `GET /v1/transparency/cosignatures`: auditors' co-signatures of `domain`'s root at
    /// `epoch`, as this broker has them.
    pub async fn transparency_cosignatures(
        &self,
        domain: &str,
        epoch: u64,
    ) -> Result<Vec<Vec<u8>>, ApiError> {
        const WHAT: &str = "fetching co-signatures";
        let request = self
            .request(Method::GET, "/v1/transparency/cosignatures")
            .query(&[("domain", domain)])
            .query(&[("epoch", epoch)]);
        let v: Value = Self::json(Self::check(request.send().await?, WHAT).await?, WHAT).await?;
        http::records(&v, "cosignatures").ok_or(ApiError::BadAnswer(WHAT))
    }

    /// `GET /v1/accounts/{h}/transparency-history`: the history proof of this account's own log entry and
    /// the root it is for.
    pub async fn transparency_history(
        &self,
        creds: &DeviceCreds,
    ) -> Result<(Vec<u8>, Vec<u8>), ApiError> {
        const WHAT: &str = "fetching this account's transparency history";
        let path = format!("/v1/accounts/{}/transparency-history", creds.handle);
        let request = self.authed(Method::GET, &path, creds);
        let v: Value = Self::json(Self::check(request.send().await?, WHAT).await?, WHAT).await?;
        let root = http::record(&v, "root").ok_or(ApiError::BadAnswer(WHAT))?;
        let proof = http::record(&v, "proof").ok_or(ApiError::BadAnswer(WHAT))?;
        Ok((root, proof))
    }

    async fn device_list_answer(request: RequestBuilder) -> Result<Option<FetchedList>, ApiError> {
        const WHAT: &str = "fetching a device list";
        let resp = request.send().await?;
        let resp = match Self::check(resp, WHAT).await {
            Ok(resp) => resp,
            // No such account; a domain the broker does not federate with is an error of its
            // own (`unknown_domain`), so that the two are told apart.
            Err(ApiError::Refused {
                status: 404, code, ..
            }) if code == "not_found" => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let v: Value = Self::json(resp, WHAT).await?;
        let signed = http::signed_list(&v).ok_or(ApiError::BadAnswer(WHAT))?;
        Ok(Some(FetchedList {
            signed,
            evidence: http::list_evidence(&v),
        }))
    }

    /// `PUT .../device-list`: publishes a signed device list blob.
    pub async fn put_device_list(
        &self,
        creds: &DeviceCreds,
        signed: &[u8],
    ) -> Result<(), ApiError> {
        let path = format!("/v1/accounts/{}/device-list", creds.handle);
        let resp = self
            .authed(Method::PUT, &path, creds)
            .json(&http::device_list_body(signed))
            .send()
            .await?;
        Self::check(resp, "publishing the device list").await?;
        Ok(())
    }

    /// `PUT .../delivery-token`: sets what admits sealed envelopes (and key claims) to the
    /// account; `unrestricted` admits them from anyone (rate-limited per source by the broker).
    pub async fn put_delivery_token(
        &self,
        creds: &DeviceCreds,
        token: Option<&[u8]>,
        unrestricted: bool,
    ) -> Result<(), ApiError> {
        let path = format!("/v1/accounts/{}/delivery-token", creds.handle);
        let resp = self
            .authed(Method::PUT, &path, creds)
            .json(&http::delivery_token_body(token, unrestricted))
            .send()
            .await?;
        Self::check(resp, "setting the delivery token").await?;
        Ok(())
    }

    /// `POST .../session-ticket`: a one-time ticket to log in on `/v1/ws` with, valid for
    /// 30 to 60 seconds, so that the device token itself is never in a long-lived connection.
    pub async fn session_ticket(
        &self,
        creds: &DeviceCreds,
    ) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        const WHAT: &str = "getting a session ticket";
        #[derive(Deserialize)]
        struct Answer {
            ticket: String,
        }
        let path = format!("/v1/accounts/{}/session-ticket", creds.handle);
        let resp = self.authed(Method::POST, &path, creds).send().await?;
        let a: Answer = Self::json(Self::check(resp, WHAT).await?, WHAT).await?;
        let ticket = Zeroizing::new(a.ticket);
        http::decode_token(&ticket).ok_or(ApiError::BadAnswer(WHAT))
    }

    /// `POST .../link-codes`: a single-use code for adding a device.
    pub async fn new_link_code(&self, creds: &DeviceCreds) -> Result<IssuedLinkCode, ApiError> {
        const WHAT: &str = "creating a link code";
        #[derive(Deserialize)]
        struct Answer {
            code: String,
            expires_ms: u64,
        }
        let path = format!("/v1/accounts/{}/link-codes", creds.handle);
        let resp = self.authed(Method::POST, &path, creds).send().await?;
        let a: Answer = Self::json(Self::check(resp, WHAT).await?, WHAT).await?;
        Ok(IssuedLinkCode {
            code: Zeroizing::new(a.code),
            expires_ms: a.expires_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls() {
        let api = Api::new("http://127.0.0.1:8080/").unwrap();
        assert_eq!(api.ws_url("/v1/ws"), "ws://127.0.0.1:8080/v1/ws");
        let api = Api::new("https://chat.example.com").unwrap();
        assert_eq!(api.ws_url("/v1/sealed"), "wss://chat.example.com/v1/sealed");
    }

    #[test]
    fn creds_debug_hides_the_token() {
        let creds = DeviceCreds {
            handle: "alice@a.example".into(),
            device: 3,
            token: Zeroizing::new(vec![0xab; 32]),
        };
        let shown = format!("{creds:?}");
        assert!(
            !shown.contains("alice") && !shown.contains("171"),
            "{shown}"
        );
        assert!(creds.bearer().starts_with("Bearer 3."));
    }
}
