//! The key directory and the other per-account public records clients need to encrypt:
//!
//! | method | path | auth | what |
//! |---|---|---|---|
//! | PUT | `/v1/accounts/{h}/devices/{id}/keys` | that device | upload one-time keys and a fallback key |
//! | GET | `/v1/accounts/{h}/devices/{id}/keys` | that device | `{one_time, fallback}` counts |
//! | POST | `/v1/accounts/{h}/devices/{id}/keys/claim` | delivery token, any local device, or open | claim one key |
//! | PUT | `/v1/accounts/{h}/devices/{id}/key-packages` | that device | upload MLS KeyPackages and a last-resort one |
//! | GET | `/v1/accounts/{h}/devices/{id}/key-packages` | that device | `{one_time, fallback}` counts |
//! | POST | `/v1/accounts/{h}/devices/{id}/key-packages/claim` | as for keys | claim one KeyPackage |
//! | GET | `/v1/accounts/{h}/device-list` | none | the signed device list (opaque to the broker) |
//! | PUT | `/v1/accounts/{h}/device-list` | a device of `h` | replace it |
//! | PUT | `/v1/accounts/{h}/delivery-token` | a device of `h` | set the sealed-sender admission |
//! | POST | `/v1/accounts/{h}/link-codes` | a device of `h` | a single-use code to add a device |
//!
//! For a handle of a peer domain, claims and signed device lists are asked of its broker over
//! the federation link: clients talk only to their own broker.
//!
//! Keys and device lists are opaque bytes signed by clients; clients verify them, the broker
//! does not. A claim consumes a one-time key atomically (the account's mailbox is the only
//! writer of its keys) and falls back to the fallback key. Claims are admitted like sealed
//! sends, by the target's delivery token, so a claim does not name the claimant either.
//!
//! MLS KeyPackages (groups) are a second set of the same shape with the same JSON: one-time
//! KeyPackages, each handed out once, and a last-resort one (`fallback_key` in an upload,
//! `fallback` in counts and claims) answered when none is left. Olm keys and KeyPackages are
//! counted, claimed and topped up separately (`keys_low`, `key_packages_low`).

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rand::RngCore;
use sealpost_proto::{DeviceId, ErrorCode, Handle};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    AppState,
    error::ApiError,
    extract::{Admitted, Authenticated, authenticate, existing_account, local_handle},
    json::{Json, JsonLimit},
    route::{Presented, admit_sealed},
    secrets::secret_header,
};
use crate::{
    clock::now_ms,
    crypto::delivery_proof,
    mailbox::UploadKeys,
    store::{DeliveryTokenRecord, KeyKind, LinkCodeRecord, records::RECORD_VERSION},
};

type State = web::Data<Arc<AppState>>;

/// Most one-time keys one upload may carry.
const MAX_KEYS_PER_UPLOAD: usize = 200;
/// Most one-time keys a device may hold.
const MAX_KEYS_PER_DEVICE: u64 = 1000;
/// Largest Olm key, in bytes.
const MAX_KEY_BYTES: usize = 512;
/// Largest MLS KeyPackage, in bytes (one with a basic credential is about 300).
const MAX_KEY_PACKAGE_BYTES: usize = 4096;
/// Most KeyPackages one upload may carry.
const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 100;
/// Largest signed device list, in bytes.
const MAX_DEVICE_LIST_BYTES: usize = 64 * 1024;
/// How long a link code is valid.
const LINK_CODE_TTL_MS: u64 = 10 * 60 * 1000;

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    // A full upload (200 keys of 512 bytes, base64) and a 64 KiB signed list (base64) fit.
    cfg.service(
        web::resource("/v1/accounts/{handle}/devices/{id}/keys")
            .app_data(JsonLimit(256 * 1024))
            .route(
                web::put()
                    .to(|me, state, path, body| upload_keys(me, state, path, body, KeyKind::Olm)),
            )
            .route(web::get().to(|me, state, path| key_count(me, state, path, KeyKind::Olm))),
    )
    .service(
        web::resource("/v1/accounts/{handle}/device-list")
            .app_data(JsonLimit(128 * 1024))
            .route(web::get().to(get_device_list))
            .route(web::put().to(put_device_list)),
    )
    .route(
        "/v1/accounts/{handle}/devices/{id}/keys/claim",
        web::post()
            .to(|admitted, state, req, path| claim_key(admitted, state, req, path, KeyKind::Olm)),
    )
    // A full upload (100 KeyPackages of 4 KiB, base64).
    .service(
        web::resource("/v1/accounts/{handle}/devices/{id}/key-packages")
            .app_data(JsonLimit(600 * 1024))
            .route(
                web::put()
                    .to(|me, state, path, body| upload_keys(me, state, path, body, KeyKind::Mls)),
            )
            .route(web::get().to(|me, state, path| key_count(me, state, path, KeyKind::Mls))),
    )
    .route(
        "/v1/accounts/{handle}/devices/{id}/key-packages/claim",
        web::post()
            .to(|admitted, state, req, path| claim_key(admitted, state, req, path, KeyKind::Mls)),
    )
    .route(
        "/v1/accounts/{handle}/delivery-token",
        web::put().to(put_delivery_token),
    )
    .route(
        "/v1/accounts/{handle}/link-codes",
        web::post().to(new_link_code),
    );
}

#[derive(Deserialize, Serialize)]
struct Key {
    key_id: u64,
    /// base64
    key: String,
}

#[derive(Deserialize)]
struct UploadRequest {
    #[serde(default)]
    one_time_keys: Vec<Key>,
    #[serde(default)]
    fallback_key: Option<Key>,
}

#[derive(Serialize)]
struct KeyCount {
    one_time: u64,
    fallback: bool,
}

#[derive(Serialize)]
struct Claimed {
    key_id: u64,
    key: String,
    fallback: bool,
}

#[derive(Deserialize, Serialize)]
struct SignedList {
    /// base64 of the signed device list.
    signed: String,
}

/// `GET …/device-list`: the list and the proof that it is the list the domain's
/// key-transparency log publishes.
#[derive(Serialize)]
struct ProvedList {
    /// base64 of the signed device list.
    signed: String,
    /// base64 of `sealpost_proto::transparency::Evidence`; absent from a domain without a log.
    #[serde(skip_serializing_if = "Option::is_none")]
    evidence: Option<String>,
}

#[derive(Deserialize)]
struct DeliveryTokenRequest {
    /// base64url of the token; absent or null to remove it.
    #[serde(default)]
    token: Option<String>,
    /// Accept sealed envelopes without a token (rate-limited per source).
    #[serde(default)]
    unrestricted: bool,
}

#[derive(Serialize)]
struct LinkCode {
    code: String,
    expires_ms: u64,
}

fn decode_key(k: &Key, kind: KeyKind) -> Result<(u64, Vec<u8>), ApiError> {
    let (what, max) = match kind {
        KeyKind::Olm => ("keys", MAX_KEY_BYTES),
        KeyKind::Mls => ("KeyPackages", MAX_KEY_PACKAGE_BYTES),
    };
    let bytes = STANDARD
        .decode(&k.key)
        .map_err(|_| ApiError::BadRequest("key is not base64".into()))?;
    if bytes.is_empty() || bytes.len() > max {
        return Err(ApiError::BadRequest(format!(
            "{what} must be 1..={max} bytes"
        )));
    }
    Ok((k.key_id, bytes))
}

async fn upload_keys(
    me: Authenticated,
    state: State,
    path: web::Path<(String, u32)>,
    body: Json<UploadRequest>,
    kind: KeyKind,
) -> Result<HttpResponse, ApiError> {
    let (_, device) = path.into_inner();
    me.require_device(device)?;
    let handle = me.handle;
    let (what, most) = match kind {
        KeyKind::Olm => ("keys", MAX_KEYS_PER_UPLOAD),
        KeyKind::Mls => ("KeyPackages", MAX_KEY_PACKAGES_PER_UPLOAD),
    };
    if body.one_time_keys.len() > most {
        return Err(ApiError::BadRequest(format!(
            "at most {most} {what} per upload"
        )));
    }
    let one_time = body
        .one_time_keys
        .iter()
        .map(|k| decode_key(k, kind))
        .collect::<Result<Vec<_>, _>>()?;
    let fallback = body
        .fallback_key
        .as_ref()
        .map(|k| decode_key(k, kind))
        .transpose()?;
    let msg = UploadKeys {
        device: DeviceId(device),
        kind,
        max_held: MAX_KEYS_PER_DEVICE,
        one_time,
        fallback,
    };
    let count = state.mailboxes.upload_keys(handle.as_str(), msg).await?;
    let fallback = state
        .store
        .directory
        .key_count(handle.as_str(), device, kind)
        .await?
        .fallback;
    Ok(HttpResponse::Ok().json(KeyCount {
        one_time: count,
        fallback,
    }))
}

async fn key_count(
    me: Authenticated,
    state: State,
    path: web::Path<(String, u32)>,
    kind: KeyKind,
) -> Result<HttpResponse, ApiError> {
    let (_, device) = path.into_inner();
    me.require_device(device)?;
    let crate::store::KeyCount { one_time, fallback } = state
        .store
        .directory
        .key_count(me.handle.as_str(), device, kind)
        .await?;
    Ok(HttpResponse::Ok().json(KeyCount { one_time, fallback }))
}

/// Admits a claim: the target's delivery token (`Sealpost-Delivery-Token`, base64url), an
/// authenticated device of any local account (`Sealpost-Account` + `Authorization`), or no
/// credential for a target that accepts anyone.
async fn admit_claim(state: &AppState, req: &HttpRequest, target: &Handle) -> Result<(), ApiError> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(account) = header("sealpost-account") {
        let claimant = local_handle(state, account)?;
        authenticate(state, req, &claimant).await?;
        return Ok(());
    }
    let token = match secret_header(req, "sealpost-delivery-token") {
        Some(t) => Some(Zeroizing::new(URL_SAFE_NO_PAD.decode(t.as_str()).map_err(
            |_| ApiError::BadRequest("delivery token is not base64url".into()),
        )?)),
        None => None,
    };
    let ip = state.client_ip(req.head());
    let presented = token.as_ref().map(|t| Presented::Token(t));
    match admit_sealed(state, target, presented, ip).await {
        Ok(()) => Ok(()),
        Err(ErrorCode::RateLimited) => Err(ApiError::RateLimited),
        Err(ErrorCode::StoreUnavailable) => Err(ApiError::Unavailable),
        Err(_) => Err(ApiError::Unauthorized),
    }
}

/// How a claim for a user of a peer domain is admitted here, to be checked again by that
/// user's broker: a local device vouches (`Sealpost-Account` + `Authorization`), or the
/// target's delivery token is forwarded, or neither (limited per source IP here).
async fn remote_admission(
    state: &AppState,
    req: &HttpRequest,
) -> Result<sealpost_proto::federation::Admission, ApiError> {
    use sealpost_proto::federation::Admission;
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(account) = header("sealpost-account") {
        let claimant = local_handle(state, account)?;
        authenticate(state, req, &claimant).await?;
        return Ok(Admission::Origin);
    }
    if let Some(t) = secret_header(req, "sealpost-delivery-token") {
        let token = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(t.as_str())
                .map_err(|_| ApiError::BadRequest("delivery token is not base64url".into()))?,
        );
        // The peer checks the token's proof; the token itself stays here.
        return Ok(Admission::Token(delivery_proof(&token).to_vec()));
    }
    match state.client_ip(req.head()) {
        Some(ip) if !state.limits.allow_stranger(ip) => Err(ApiError::RateLimited),
        _ => Ok(Admission::Open),
    }
}

async fn claim_key(
    _: Admitted,
    state: State,
    req: HttpRequest,
    path: web::Path<(String, u32)>,
    kind: KeyKind,
) -> Result<HttpResponse, ApiError> {
    let (raw, device) = path.into_inner();
    if let Some(remote) = super::remote::remote_handle(&state, &raw)? {
        let admission = remote_admission(&state, &req).await?;
        let (key_id, key, fallback) =
            super::remote::remote_claim(&state, remote, device, kind, admission).await?;
        return Ok(HttpResponse::Ok().json(Claimed {
            key_id,
            key: STANDARD.encode(&key),
            fallback,
        }));
    }
    let handle = local_handle(&state, &raw)?;
    admit_claim(&state, &req, &handle).await?;
    if !state.limits.allow_claim(handle.as_str(), device) {
        return Err(ApiError::RateLimited);
    }
    existing_account(&state, &handle).await?;
    let claimed = state
        .mailboxes
        .claim_key(handle.as_str(), DeviceId(device), kind)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(Claimed {
        key_id: claimed.key_id,
        key: STANDARD.encode(&claimed.key),
        fallback: claimed.fallback,
    }))
}

async fn get_device_list(
    _: Admitted,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (signed, evidence) = match super::remote::remote_handle(&state, &path)? {
        // The list is signed by the user's master key, and its evidence by the peer's log key,
        // so a relaying broker cannot alter either unnoticed: clients verify both as they
        // verify a local one.
        Some(remote) => super::remote::remote_device_list(&state, remote).await?,
        None => {
            let handle = local_handle(&state, &path)?;
            let directory = &*state.store.directory;
            match &state.transparency {
                Some(log) => {
                    let (signed, evidence) = log
                        .evidence_of(directory, handle.as_str(), None)
                        .await
                        .map_err(super::transparency::unavailable)?
                        .ok_or(ApiError::NotFound)?;
                    (signed, evidence.map(|e| e.to_bytes()))
                }
                None => (
                    directory
                        .device_list(handle.as_str())
                        .await?
                        .ok_or(ApiError::NotFound)?,
                    None,
                ),
            }
        }
    };
    Ok(HttpResponse::Ok().json(ProvedList {
        signed: STANDARD.encode(signed),
        evidence: evidence.map(|e| STANDARD.encode(e)),
    }))
}

async fn put_device_list(
    me: Authenticated,
    state: State,
    body: Json<SignedList>,
) -> Result<HttpResponse, ApiError> {
    let handle = me.handle;
    let signed = STANDARD
        .decode(&body.signed)
        .map_err(|_| ApiError::BadRequest("signed is not base64".into()))?;
    if signed.is_empty() || signed.len() > MAX_DEVICE_LIST_BYTES {
        return Err(ApiError::BadRequest(format!(
            "a signed device list is 1..={MAX_DEVICE_LIST_BYTES} bytes"
        )));
    }
    state
        .store
        .directory
        .set_device_list(handle.as_str(), signed.clone())
        .await?;
    if let Some(log) = &state.transparency {
        log.update(handle.as_str(), &signed);
    }
    Ok(HttpResponse::NoContent().finish())
}

async fn put_delivery_token(
    me: Authenticated,
    state: State,
    body: Json<DeliveryTokenRequest>,
) -> Result<HttpResponse, ApiError> {
    let handle = me.handle;
    let token_hash = match &body.token {
        Some(t) => {
            let bytes = Zeroizing::new(
                URL_SAFE_NO_PAD
                    .decode(t)
                    .map_err(|_| ApiError::BadRequest("token is not base64url".into()))?,
            );
            if bytes.len() < 16 || bytes.len() > 64 {
                return Err(ApiError::BadRequest(
                    "a delivery token is 16..=64 bytes".into(),
                ));
            }
            Some(state.hasher.hash_delivery_token(&delivery_proof(&bytes)))
        }
        None => None,
    };
    let record = DeliveryTokenRecord {
        version: RECORD_VERSION,
        token_hash,
        unrestricted: body.unrestricted,
        of_proof: true,
    };
    state
        .store
        .directory
        .set_delivery_token(handle.as_str(), record)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn new_link_code(me: Authenticated, state: State) -> Result<HttpResponse, ApiError> {
    let handle = me.handle;
    let mut raw = Zeroizing::new([0u8; 16]);
    rand::rngs::OsRng.fill_bytes(raw.as_mut());
    let code = URL_SAFE_NO_PAD.encode(raw.as_ref());
    let expires_ms = now_ms() + LINK_CODE_TTL_MS;
    let hash = state.hasher.hash_link_code(&code);
    state
        .store
        .directory
        .put_link_code(
            handle.as_str(),
            hash,
            LinkCodeRecord {
                version: RECORD_VERSION,
                expires_ms,
            },
        )
        .await?;
    Ok(HttpResponse::Created().json(LinkCode { code, expires_ms }))
}
