//! The checks HTTP handlers start with, as actix extractors, so that a handler's signature
//! says what it requires and none can forget one:
//!
//! - [`Admitted`]: the broker is not shutting down and the client's address is within its
//!   rate (`ip_rate_per_sec`). Every public route takes it, or [`Authenticated`].
//! - [`Authenticated`]: admitted, the `{handle}` path segment names an account of this
//!   broker's domain, and `Authorization: Bearer <device_id>.<token>` is one of its devices.
//!
//! Extractors run in the order of the handler's arguments and the first error answers, so
//! these come before any body extractor: a refused request is not read any further.

use std::sync::{Arc, atomic::Ordering};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use futures_util::future::{LocalBoxFuture, Ready, ready};
use sealpost_proto::{DeviceId, Handle};

use super::{AppState, error::ApiError, secrets::secret_header};
use crate::crypto::DeviceToken;

/// A request the broker is willing to serve (see the module docs).
pub(crate) struct Admitted;

impl FromRequest for Admitted {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(app_state(req).and_then(|state| admit(state, req)))
    }
}

/// A device of a local account, authenticated for the account named in the path.
pub(crate) struct Authenticated {
    /// The account (`{handle}` in the route), on this broker's domain.
    pub(crate) handle: Handle,
    /// The device whose token was presented.
    pub(crate) device: DeviceId,
}

impl Authenticated {
    /// Refuses unless the authenticated device is `device` itself (for a device's own keys).
    pub(crate) fn require_device(&self, device: u32) -> Result<(), ApiError> {
        if self.device != DeviceId(device) {
            return Err(ApiError::Forbidden(
                "only the device itself manages its keys".into(),
            ));
        }
        Ok(())
    }
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = app_state(&req)?;
            admit(state, &req)?;
            let raw = req.match_info().get("handle").ok_or(ApiError::NotFound)?;
            let handle = local_handle(state, raw)?;
            let device = authenticate(state, &req, &handle).await?;
            Ok(Authenticated { handle, device })
        })
    }
}

fn app_state(req: &HttpRequest) -> Result<&AppState, ApiError> {
    req.app_data::<web::Data<Arc<AppState>>>()
        .map(|data| data.as_ref().as_ref())
        .ok_or(ApiError::Unavailable)
}

fn admit(state: &AppState, req: &HttpRequest) -> Result<Admitted, ApiError> {
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable);
    }
    match state.client_ip(req.head()) {
        Some(ip) if !state.limits.allow_ip(ip) => Err(ApiError::RateLimited),
        _ => Ok(Admitted),
    }
}

/// Parses `raw` as a handle of this broker's domain; a handle of another domain is not
/// found here.
pub(crate) fn local_handle(state: &AppState, raw: &str) -> Result<Handle, ApiError> {
    let handle = Handle::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if handle.domain() != state.settings.domain {
        // A peer's users are found through their own broker, not here; any other domain is
        // one this broker has nothing to do with, and the answer says so.
        return Err(if state.federation.is_peer(handle.domain()) {
            ApiError::NotFound
        } else {
            ApiError::UnknownDomain(handle.domain().to_owned())
        });
    }
    Ok(handle)
}

/// Answers `NotFound` unless `handle` has an account here.
pub(crate) async fn existing_account(state: &AppState, handle: &Handle) -> Result<(), ApiError> {
    match state.store.directory.account(handle.as_str()).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::NotFound),
    }
}

/// Checks `Authorization: Bearer <device>.<token>` against a device of `handle`. The header
/// was moved out of actix's header map by [`super::secrets::scrub`], which every request
/// passes through.
pub(crate) async fn authenticate(
    state: &AppState,
    req: &HttpRequest,
    handle: &Handle,
) -> Result<DeviceId, ApiError> {
    // The `authorization` header, moved aside by `secrets::scrub`.
    let header = secret_header(req, "authorization").ok_or(ApiError::Unauthorized)?;
    let cred = header
        .strip_prefix("Bearer ")
        .ok_or(ApiError::Unauthorized)?;
    let (device, token) = cred.split_once('.').ok_or(ApiError::Unauthorized)?;
    let device: u32 = device.parse().map_err(|_| ApiError::Unauthorized)?;
    let token = DeviceToken::from_text(token).ok_or(ApiError::Unauthorized)?;
    let record = state
        .store
        .directory
        .device(handle.as_str(), device)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if !state.hasher.verify(&token, &record.token_hash) {
        return Err(ApiError::Unauthorized);
    }
    Ok(DeviceId(device))
}
