//! The gateway's side of federation:
//!
//! | method | path | auth | what |
//! |---|---|---|---|
//! | GET | `/v1/federation` | Noise `KK` handshake | inbound link from a peer broker ([`crate::federation::inbound`]) |
//! | GET | `/.well-known/sealpost/server` | none | `{domain, x25519, federation, noise}`: this broker's public key and endpoint |
//! | GET | `/admin/federation` | admin token, or loopback | peers, link states, backlogs |
//!
//! and [`Local`], the [`LocalDelivery`] of inbound links: envelopes into mailboxes, lookups
//! from the store, key claims through mailboxes — with the same checks as local requests.

use std::{rc::Rc, sync::Arc};

use actix_web::{HttpRequest, HttpResponse, ResponseError as _, web};
use futures_util::future::LocalBoxFuture;
use sealpost_proto::{
    DeviceId, ErrorCode, Handle,
    federation::{Admission, FedEnvelope, LinkFrame, NOISE_PATTERN, RemoteDevice},
};
use subtle::ConstantTimeEq;
use tracing::warn;

use super::{
    AppState,
    error::ApiError,
    route::{From, Presented, Send, admit_sealed, give_back_on_answer, refusal},
    secrets::secret_header,
    session::{OpenGuard, admit, admit_unauthenticated},
};
use crate::{
    federation::{
        inbound::{self, LocalDelivery, Routed},
        link::MAX_SEALED_BYTES,
    },
    socket::{self, Upgrade},
    store::KeyKind,
};

type State = web::Data<Arc<AppState>>;

/// `GET /v1/federation`: admits the upgrade, answers it, and serves an inbound link on the
/// connection.
pub(crate) async fn serve(state: Arc<AppState>, upgrade: Upgrade) {
    let admitted = admit(&state, upgrade.head()).and_then(|ip| admit_unauthenticated(&state, ip));
    let slot = match admitted {
        Ok(slot) => slot,
        Err(refused) => return upgrade.refuse(refused.error_response()).await,
    };
    let settings = state.federation.settings();
    let limits = socket::Limits {
        max_message: MAX_SEALED_BYTES,
        // Pinged at the link's keepalive whether or not it reads: the sending side hears us.
        heartbeat: settings.keepalive,
        // A peer that takes nothing off the link for as long as it may stay silent is gone.
        idle_timeout: settings.idle_timeout,
        budget: Arc::clone(&state.socket_budget),
    };
    let Some(mut socket) = upgrade.accept(limits).await else {
        return;
    };
    let _open = OpenGuard::new(&state);
    let end = match inbound::handshake(&state.federation, &mut socket).await {
        Ok(link) => {
            drop(slot);
            let local: Rc<dyn LocalDelivery> = Rc::new(Local(state.clone()));
            let shutdown = state.shutdown.clone();
            link.serve(&state.federation, local, &mut socket, shutdown)
                .await
        }
        Err(end) => end,
    };
    socket.finish(end).await;
}

/// Local delivery for inbound links.
pub struct Local(pub Arc<AppState>);

impl Local {
    async fn local_user(&self, user: &str) -> Result<Handle, ErrorCode> {
        let handle = Handle::parse(user).map_err(|_| ErrorCode::InvalidHandle)?;
        if handle.domain() != self.0.settings.domain {
            return Err(ErrorCode::UnknownDomain);
        }
        match self.0.store.directory.account(handle.as_str()).await {
            Ok(Some(_)) => Ok(handle),
            Ok(None) => Err(ErrorCode::UnknownRecipient),
            Err(_) => Err(ErrorCode::StoreUnavailable),
        }
    }

    async fn admit(&self, to: &Handle, admission: &Admission) -> Result<(), ErrorCode> {
        match admission {
            // The origin broker authenticated the sender; which account it is, it does not
            // say. The per-origin rate limit applies.
            Admission::Origin => Ok(()),
            Admission::Token(proof) => {
                admit_sealed(&self.0, to, Some(Presented::Proof(proof)), None).await
            }
            Admission::Open => admit_sealed(&self.0, to, None, None).await,
        }
    }

    async fn answer_now(&self, origin: &str, request: LinkFrame) -> LinkFrame {
        let state = &self.0;
        match request {
            LinkFrame::GetDevices { req_id, user } => {
                let answer = match self.local_user(&user).await {
                    Ok(h) => state
                        .store
                        .directory
                        .devices(h.as_str())
                        .await
                        .map_err(|_| ErrorCode::StoreUnavailable),
                    Err(code) => Err(code),
                };
                match answer {
                    Ok(devices) => LinkFrame::Devices {
                        req_id,
                        devices: devices
                            .into_iter()
                            .map(|(device, d)| RemoteDevice {
                                device,
                                identity_keys: d.identity_keys,
                            })
                            .collect(),
                    },
                    Err(code) => LinkFrame::Refused { req_id, code },
                }
            }
            LinkFrame::GetDeviceList { req_id, user } => {
                let h = match self.local_user(&user).await {
                    Ok(h) => h,
                    Err(code) => return LinkFrame::Refused { req_id, code },
                };
                let directory = &*state.store.directory;
                let answer = match &state.transparency {
                    Some(log) => match log.evidence_of(directory, h.as_str(), Some(origin)).await {
                        Ok(found) => Ok(found.map(|(s, e)| (s, e.map(|e| e.to_bytes())))),
                        Err(e) => {
                            warn!(error = %e, "no transparency evidence for a peer's lookup");
                            Err(ErrorCode::StoreUnavailable)
                        }
                    },
                    None => directory
                        .device_list(h.as_str())
                        .await
                        .map(|found| found.map(|s| (s, None)))
                        .map_err(|_| ErrorCode::StoreUnavailable),
                };
                match answer {
                    Ok(Some((signed, evidence))) => LinkFrame::DeviceList {
                        req_id,
                        signed,
                        evidence: evidence.unwrap_or_default(),
                    },
                    Ok(None) => LinkFrame::Refused {
                        req_id,
                        code: ErrorCode::NotFound,
                    },
                    Err(code) => LinkFrame::Refused { req_id, code },
                }
            }
            LinkFrame::GetRoots { req_id, from, to } => {
                crate::transparency::audit::answer_roots(
                    state.transparency.as_ref(),
                    origin,
                    req_id,
                    from,
                    to,
                )
                .await
            }
            LinkFrame::Cosign {
                req_id,
                cosignatures,
            } => {
                if let Some(log) = &state.transparency {
                    crate::transparency::audit::receive(log, origin, cosignatures).await;
                }
                LinkFrame::Noted { req_id }
            }
            LinkFrame::ClaimKey {
                req_id,
                user,
                device,
                admission,
                key_package,
            } => {
                let handle = match self.local_user(&user).await {
                    Ok(h) => h,
                    Err(code) => return LinkFrame::Refused { req_id, code },
                };
                if let Err(code) = self.admit(&handle, &admission).await {
                    return LinkFrame::Refused { req_id, code };
                }
                if !state.limits.allow_claim(handle.as_str(), device) {
                    return LinkFrame::Refused {
                        req_id,
                        code: ErrorCode::RateLimited,
                    };
                }
                let claimed = state
                    .mailboxes
                    .claim_key(handle.as_str(), DeviceId(device), KeyKind::of(key_package))
                    .await;
                match claimed {
                    Ok(Some(k)) => LinkFrame::Claimed {
                        req_id,
                        key_id: k.key_id,
                        key: k.key,
                        fallback: k.fallback,
                    },
                    Ok(None) => LinkFrame::Refused {
                        req_id,
                        code: ErrorCode::NotFound,
                    },
                    _ => LinkFrame::Refused {
                        req_id,
                        code: ErrorCode::StoreUnavailable,
                    },
                }
            }
            LinkFrame::TakeEpoch {
                req_id,
                group,
                epoch,
                id,
            } => match state.take_epoch_here(&group, epoch, id).await {
                Ok(()) => LinkFrame::Epoch {
                    req_id,
                    taken: true,
                    current: epoch.saturating_add(1),
                },
                Err((ErrorCode::StaleEpoch, Some(current))) => LinkFrame::Epoch {
                    req_id,
                    taken: false,
                    current,
                },
                Err((code, _)) => LinkFrame::Refused { req_id, code },
            },
            other => {
                // Not a request: the link code never hands these over.
                let _ = other;
                LinkFrame::LinkError {
                    code: ErrorCode::UnknownFrameType,
                    message: "not a request".into(),
                }
            }
        }
    }
}

impl LocalDelivery for Local {
    fn deliver(&self, origin: &str, envelope: FedEnvelope) -> LocalBoxFuture<'static, Routed> {
        let state = self.0.clone();
        let bytes = envelope.copies.iter().map(|c| c.ciphertext.len()).sum();
        let FedEnvelope {
            id,
            to,
            class,
            ttl_secs,
            copies,
            admission,
        } = envelope;
        let send = Send {
            id,
            to,
            class,
            ttl_secs,
            copies,
            from: From::Peer {
                origin: origin.into(),
                admission,
            },
            copy_limit: sealpost_proto::limits::MAX_GROUP_CIPHERTEXT_BYTES,
        };
        // Resolves once handed over, to the future of the answer (awaited later, in order).
        #[allow(clippy::async_yields_async)]
        Box::pin(async move {
            // A peer's group message is fanned out here: its copies wait for room.
            let room = state.fanout_room(bytes).await;
            match state.route(send).await {
                Ok(pending) => {
                    let answer = give_back_on_answer(pending, room);
                    Box::pin(async move { refusal(answer.await.1) }) as LocalBoxFuture<'_, _>
                }
                Err(code) => Box::pin(std::future::ready(Some(code))),
            }
        })
    }

    fn answer(&self, origin: &str, request: LinkFrame) -> LocalBoxFuture<'static, LinkFrame> {
        let local = Local(self.0.clone());
        let origin = origin.to_owned();
        Box::pin(async move { local.answer_now(&origin, request).await })
    }
}

/// `GET /.well-known/sealpost/server`: this broker's federation identity.
pub async fn well_known(state: State) -> HttpResponse {
    let fed = &state.federation;
    HttpResponse::Ok().json(serde_json::json!({
        "domain": fed.local_domain(),
        "x25519": fed.public_key_b64(),
        "federation": fed.public_url(),
        "noise": NOISE_PATTERN,
    }))
}

/// Admin endpoints need the admin token when one is configured, and come from loopback
/// otherwise (directly, not through a proxy on this host).
pub(crate) fn authorize_admin(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let expected = state.settings.admin_token.as_bytes();
    if expected.is_empty() {
        // A proxy on this host connects from loopback too: a request that passed one (it
        // carries a forwarding header, as nginx and ingress-nginx add) is not local.
        let forwarded = ["x-forwarded-for", "forwarded", "x-real-ip"]
            .iter()
            .any(|h| req.headers().contains_key(*h));
        let local = req
            .peer_addr()
            .is_some_and(|a| a.ip().to_canonical().is_loopback());
        return if local && !forwarded {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "admin endpoints answer loopback clients unless admin_token is set".into(),
            ))
        };
    }
    // Moved out of the header map by `secrets::scrub`.
    let header = secret_header(req, "authorization");
    let given = header
        .as_deref()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// `GET /admin/federation`: peers, link states and backlogs.
pub async fn admin(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &req)?;
    let fed = &state.federation;
    let peers = fed.status().await;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "domain": fed.local_domain(),
        "x25519": fed.public_key_b64(),
        "peers": peers,
    })))
}

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/federation", web::get().to(super::websocket_only))
        .route("/.well-known/sealpost/server", web::get().to(well_known))
        .route("/admin/federation", web::get().to(admin));
}
