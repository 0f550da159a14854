//! Push subscriptions: a device registers where its push service (a browser's, or a
//! UnifiedPush distributor) takes wake-ups for it, and the key those are signed with.
//!
//! | method | path | who | answer |
//! |---|---|---|---|
//! | GET | `/v1/push/vapid` | anyone | `{"public_key": base64url}` (the `applicationServerKey`) |
//! | PUT | `/v1/accounts/{h}/devices/{id}/push` | that device | 204; body `{endpoint, keys: {p256dh, auth}, kind?}` |
//! | DELETE | `/v1/accounts/{h}/devices/{id}/push` | that device | 204 |
//!
//! `kind` is `webpush` (default) or `unifiedpush`. All answer 404 when push is off.

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::{AppState, error::ApiError, extract::Authenticated, json::Json};
use crate::{push::endpoint, store::PushKind};

type State = web::Data<Arc<AppState>>;

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/push/vapid", web::get().to(vapid)).service(
        web::resource("/v1/accounts/{handle}/devices/{id}/push")
            .route(web::put().to(subscribe))
            .route(web::delete().to(unsubscribe)),
    );
}

/// A subscription as `PushSubscription.toJSON()` gives it, plus its kind.
#[derive(Deserialize)]
struct SubscribeRequest {
    endpoint: String,
    keys: SubscriptionKeys,
    #[serde(default)]
    kind: Kind,
}

#[derive(Deserialize)]
struct SubscriptionKeys {
    p256dh: String,
    auth: String,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Kind {
    #[default]
    WebPush,
    UnifiedPush,
}

async fn vapid(state: State) -> Result<HttpResponse, ApiError> {
    let key = state
        .settings
        .push
        .vapid_public_key
        .as_ref()
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "public_key": key })))
}

async fn subscribe(
    me: Authenticated,
    state: State,
    path: web::Path<(String, u32)>,
    body: Json<SubscribeRequest>,
) -> Result<HttpResponse, ApiError> {
    let (_, device) = path.into_inner();
    me.require_device(device)?;
    let door = &state.settings.push;
    if door.vapid_public_key.is_none() {
        return Err(ApiError::NotFound);
    }
    let body = body.0;
    let kind = match body.kind {
        Kind::WebPush => PushKind::WebPush,
        Kind::UnifiedPush => PushKind::UnifiedPush,
    };
    let record = endpoint::check(
        &body.endpoint,
        &body.keys.p256dh,
        &body.keys.auth,
        kind,
        door.allow_private_endpoints,
    )
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    state
        .store
        .directory
        .set_push_subscription(me.handle.as_str(), device, Some(record))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn unsubscribe(
    me: Authenticated,
    state: State,
    path: web::Path<(String, u32)>,
) -> Result<HttpResponse, ApiError> {
    let (_, device) = path.into_inner();
    me.require_device(device)?;
    if state.settings.push.vapid_public_key.is_none() {
        return Err(ApiError::NotFound);
    }
    state
        .store
        .directory
        .set_push_subscription(me.handle.as_str(), device, None)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
