//! Lookups about users of peer domains, answered by their brokers over the federation link:
//! device lists, signed device lists and key claims. The account and key endpoints call these
//! for handles of peer domains.

use actix_web::HttpResponse;
use base64::{Engine, engine::general_purpose::STANDARD};
use sealpost_proto::{
    ErrorCode, Handle,
    federation::{Admission, LinkFrame},
};

use super::{
    AppState,
    error::ApiError,
    json::{DeviceEntry, DeviceList},
};
use tracing::warn;

use crate::{federation::messages::Request, store::KeyKind, transparency::audit::check_relayed};

/// The handle named in a path, if it is a user of a peer domain (`None` for anything else,
/// which the local handlers deal with).
pub(crate) fn remote_handle(state: &AppState, raw: &str) -> Result<Option<Handle>, ApiError> {
    let handle = Handle::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(
        (handle.domain() != state.settings.domain && state.federation.is_peer(handle.domain()))
            .then_some(handle),
    )
}

fn lookup_error(code: ErrorCode) -> ApiError {
    match code {
        ErrorCode::UnknownRecipient | ErrorCode::NotFound | ErrorCode::InvalidHandle => {
            ApiError::NotFound
        }
        ErrorCode::RateLimited => ApiError::RateLimited,
        ErrorCode::BadDeliveryToken => ApiError::Unauthorized,
        _ => ApiError::Unavailable,
    }
}

async fn remote(
    state: &AppState,
    handle: &Handle,
    request: Request,
) -> Result<LinkFrame, ApiError> {
    match state.federation.request(handle.domain(), request).await {
        Ok(LinkFrame::Refused { code, .. }) | Err(code) => Err(lookup_error(code)),
        Ok(frame) => Ok(frame),
    }
}

/// `GET /v1/accounts/{remote}/devices`, answered by the user's broker.
pub(crate) async fn remote_devices(
    state: &AppState,
    handle: Handle,
) -> Result<HttpResponse, ApiError> {
    let user = handle.to_string();
    match remote(state, &handle, Request::GetDevices { user }).await? {
        LinkFrame::Devices { devices, .. } => Ok(HttpResponse::Ok().json(DeviceList {
            handle: handle.to_string(),
            devices: devices
                .into_iter()
                .map(|d| DeviceEntry {
                    device_id: d.device,
                    identity_keys: STANDARD.encode(d.identity_keys),
                })
                .collect(),
        })),
        _ => Err(ApiError::Unavailable),
    }
}

/// The signed device list of a remote user, from its broker, with its key-transparency evidence
/// (`None` from a broker that keeps no log).
pub(crate) async fn remote_device_list(
    state: &AppState,
    handle: Handle,
) -> Result<(Vec<u8>, Option<Vec<u8>>), ApiError> {
    let user = handle.to_string();
    match remote(state, &handle, Request::GetDeviceList { user }).await? {
        LinkFrame::DeviceList {
            signed, evidence, ..
        } => {
            // This broker audits the peer's log: it checks what it relays too. A failure is
            // logged and counted, and the answer still goes to the client, whose own check
            // refuses it with a clear error.
            if let Some(log) = &state.transparency
                && !evidence.is_empty()
                && let Err(e) = check_relayed(log, handle.as_str(), &signed, &evidence).await
            {
                metrics::counter!("sealpost_transparency_bad_evidence_total", "domain" => handle.domain().to_owned())
                    .increment(1);
                warn!(domain = handle.domain(), error = %e, "a peer served a device list its transparency log does not prove");
            }
            Ok((signed, (!evidence.is_empty()).then_some(evidence)))
        }
        _ => Err(ApiError::Unavailable),
    }
}

/// Claims a key (or a KeyPackage) of a remote user's device through its broker: (key id,
/// key, fallback).
pub(crate) async fn remote_claim(
    state: &AppState,
    handle: Handle,
    device: u32,
    kind: KeyKind,
    admission: Admission,
) -> Result<(u64, Vec<u8>, bool), ApiError> {
    let request = Request::ClaimKey {
        user: handle.to_string(),
        device,
        admission,
        key_package: kind == KeyKind::Mls,
    };
    match remote(state, &handle, request).await? {
        LinkFrame::Claimed {
            key_id,
            key,
            fallback,
            ..
        } => Ok((key_id, key, fallback)),
        _ => Err(ApiError::Unavailable),
    }
}
