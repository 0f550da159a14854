//! HTTP endpoints.
//!
//! | method | path | auth | what |
//! |---|---|---|---|
//! | POST | `/v1/accounts` | registration policy | create an account with its first device |
//! | GET | `/v1/accounts/{handle}/devices` | none | the device list (ids + identity keys); for a handle of a peer domain, asked of its broker over the federation link |
//! | POST | `/v1/accounts/{handle}/devices` | a device of the account | add a device |
//! | DELETE | `/v1/accounts/{handle}/devices/{id}` | a device of the account | remove a device |
//! | GET | `/healthz`, `/readyz`, `/metrics` | none | operations |
//!
//! Device credentials are sent as `Authorization: Bearer <device_id>.<token>`.

use std::sync::{Arc, atomic::Ordering};

use actix_web::{HttpRequest, HttpResponse, web};
use base64::{Engine, engine::general_purpose::STANDARD};
use sealpost_proto::{DeviceId, Handle};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::ApiError,
    extract::{Admitted, Authenticated, authenticate, existing_account, local_handle},
    json::{DeviceEntry, DeviceList, Json},
    secrets::secret_header,
    settings::Registration,
};
use crate::{
    clock::now_ms,
    crypto::{DeviceToken, verify_registration_token},
    store::{DeviceRecord, records::RECORD_VERSION},
};

/// Largest identity-key blob a device may publish.
const MAX_IDENTITY_KEYS: usize = 4096;

type State = web::Data<Arc<AppState>>;

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/accounts", web::post().to(register))
        .route("/v1/accounts/{handle}/devices", web::get().to(list_devices))
        .route("/v1/accounts/{handle}/devices", web::post().to(add_device))
        .route(
            "/v1/accounts/{handle}/devices/{id}",
            web::delete().to(remove_device),
        )
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

#[derive(Deserialize)]
struct RegisterRequest {
    handle: String,
    /// The first device's public identity keys, base64.
    identity_keys: String,
    /// Platform attestation, when registration = platform.
    #[serde(default)]
    registration_token: Option<String>,
}

#[derive(Serialize)]
struct NewDevice {
    handle: String,
    device_id: u32,
    /// The device's auth token: shown once, stored by the broker only as a keyed hash.
    token: String,
}

#[derive(Deserialize)]
struct AddDeviceRequest {
    identity_keys: String,
    /// A link code from an existing device, instead of that device's credentials.
    #[serde(default)]
    link_code: Option<String>,
}

fn identity_keys(b64: &str) -> Result<Vec<u8>, ApiError> {
    let bytes = STANDARD
        .decode(b64)
        .map_err(|_| ApiError::BadRequest("identity_keys is not base64".into()))?;
    if bytes.is_empty() || bytes.len() > MAX_IDENTITY_KEYS {
        return Err(ApiError::BadRequest(format!(
            "identity_keys must be 1..={MAX_IDENTITY_KEYS} bytes"
        )));
    }
    Ok(bytes)
}

async fn register(
    _: Admitted,
    state: State,
    body: Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let handle = Handle::parse(&body.handle).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if handle.domain() != state.settings.domain {
        return Err(ApiError::BadRequest(format!(
            "this broker serves accounts on {}",
            state.settings.domain
        )));
    }
    match state.settings.registration {
        Registration::Open => {}
        Registration::Closed => return Err(ApiError::Forbidden("registration is closed".into())),
        Registration::Platform => {
            let key = state
                .settings
                .platform_key
                .as_ref()
                .ok_or(ApiError::Unavailable)?;
            let token = body.registration_token.as_deref().ok_or_else(|| {
                ApiError::Forbidden("a platform registration token is required".into())
            })?;
            verify_registration_token(key, token, handle.as_str(), now_ms() / 1000)
                .map_err(|e| ApiError::Forbidden(e.to_string()))?;
        }
    }
    let keys = identity_keys(&body.identity_keys)?;
    if !state.store.health.has_room() {
        return Err(ApiError::Unavailable);
    }
    let token = DeviceToken::generate();
    let record = DeviceRecord {
        version: RECORD_VERSION,
        token_hash: state.hasher.hash(&token),
        identity_keys: keys,
        created_ms: now_ms(),
    };
    let device = state
        .store
        .directory
        .create_account(handle.as_str(), now_ms(), record)
        .await?;
    tracing::info!("account registered");
    Ok(HttpResponse::Created().json(NewDevice {
        handle: handle.to_string(),
        device_id: device,
        token: token.to_text(),
    }))
}

async fn list_devices(
    _: Admitted,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    if let Some(remote) = super::remote::remote_handle(&state, &path)? {
        return super::remote::remote_devices(&state, remote).await;
    }
    let handle = local_handle(&state, &path)?;
    existing_account(&state, &handle).await?;
    let devices = state
        .store
        .directory
        .devices(handle.as_str())
        .await?
        .into_iter()
        .map(|(id, d)| DeviceEntry {
            device_id: id,
            identity_keys: STANDARD.encode(d.identity_keys),
        })
        .collect();
    Ok(HttpResponse::Ok().json(DeviceList {
        handle: handle.to_string(),
        devices,
    }))
}

async fn add_device(
    _: Admitted,
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
    body: Json<AddDeviceRequest>,
) -> Result<HttpResponse, ApiError> {
    let handle = local_handle(&state, &path)?;
    // Checked first: a malformed request must not use up a single-use link code.
    let keys = identity_keys(&body.identity_keys)?;
    match &body.link_code {
        // A new device joining with a code an existing device created (single use).
        Some(code) if secret_header(&req, "authorization").is_none() => {
            // A code is single use: refuse what would fail anyway before using it up.
            if state.store.directory.devices(handle.as_str()).await?.len()
                >= sealpost_proto::limits::MAX_DEVICES_PER_USER
            {
                return Err(ApiError::BadRequest("too many devices".into()));
            }
            let hash = state.hasher.hash_link_code(code);
            if !state
                .store
                .directory
                .take_link_code(handle.as_str(), hash, now_ms())
                .await?
            {
                return Err(ApiError::Unauthorized);
            }
        }
        _ => {
            authenticate(&state, &req, &handle).await?;
        }
    }
    let token = DeviceToken::generate();
    let record = DeviceRecord {
        version: RECORD_VERSION,
        token_hash: state.hasher.hash(&token),
        identity_keys: keys,
        created_ms: now_ms(),
    };
    let device = state
        .mailboxes
        .add_device(
            handle.as_str(),
            record,
            sealpost_proto::limits::MAX_DEVICES_PER_USER,
        )
        .await?;
    tracing::info!(device = device.0, "device added");
    Ok(HttpResponse::Created().json(NewDevice {
        handle: handle.to_string(),
        device_id: device.0,
        token: token.to_text(),
    }))
}

async fn remove_device(
    me: Authenticated,
    state: State,
    path: web::Path<(String, u32)>,
) -> Result<HttpResponse, ApiError> {
    let (_, device) = path.into_inner();
    state
        .mailboxes
        .remove_device(me.handle.as_str(), DeviceId(device))
        .await?;
    tracing::info!(device, "device removed");
    Ok(HttpResponse::NoContent().finish())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Not ready while shutting down, after a failed flush, or with the disk nearly full.
fn is_ready(state: &AppState) -> bool {
    !state.shutting_down.load(Ordering::Relaxed)
        && state.store.health.flush_ok()
        && state.store.health.has_room()
}

async fn readyz(state: State) -> HttpResponse {
    let ready = is_ready(&state);
    if ready {
        HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body("not ready\n")
    }
}

async fn metrics(state: State) -> HttpResponse {
    match &state.metrics {
        Some(handle) => {
            handle.run_upkeep();
            metrics::gauge!("sealpost_mailboxes_registered").set(state.mailboxes.len() as f64);
            metrics::gauge!("sealpost_websocket_sessions")
                .set(state.open_sessions.load(Ordering::Relaxed) as f64);
            metrics::gauge!("sealpost_unauthenticated_sessions").set(state.pre_auth.total() as f64);
            metrics::gauge!("sealpost_socket_buffered_bytes")
                .set(state.socket_budget.used() as f64);
            metrics::gauge!("sealpost_ready").set(if is_ready(&state) { 1.0 } else { 0.0 });
            let mut body = handle.render();
            body.push_str(&crate::telemetry::fixed_histograms());
            body.push_str(&crate::telemetry::process_metrics());
            HttpResponse::Ok()
                .content_type("text/plain; version=0.0.4")
                .body(body)
        }
        None => HttpResponse::ServiceUnavailable().body("metrics recorder not installed\n"),
    }
}
