//! The gateway: HTTP routes and WebSocket device sessions. It translates wire frames and
//! HTTP requests into calls on mailboxes ([`crate::mailbox::Mailboxes`], a typed handle) and
//! federation peers, and their answers back into frames, close codes and status codes. It
//! never touches the store's queues directly.
//!
//! - [`route`]: one route per envelope: every send (device, sealed, inbound federation) is
//!   checked once and goes to one mailbox or one federation peer.
//! - [`group`]: one upload, many recipients (MLS group messages): a route per recipient, and
//!   Commits ordered at the group's hub.
//! - [`http`]: account and device endpoints, health, readiness, metrics.
//! - [`keys`]: key directory, signed device lists, delivery tokens, link codes.
//! - [`session`]: a device's WebSocket session, on the upgraded connection ([`serve_upgrade`]).
//! - [`pending`]: the sends a connection has handed on, until it has answered them.
//! - [`error`]: API errors and their status codes.
//! - [`extract`]: the admission and authentication every HTTP handler starts with.
//! - [`client_ip`]: the client's address, behind trusted reverse proxies too.
//! - [`limits`]: per-IP and per-device rate limits.
//! - [`sealed`]: the anonymous endpoint for sealed sends (no account, no deliveries).
//! - [`federation`]: the inbound federation endpoint, the well-known key document, the admin
//!   view of peers, and local delivery for inbound links.
//! - [`remote`]: device lists and key claims of users of peer domains, asked of their brokers.
//! - [`json`]: JSON shapes and body limits shared by several endpoints.
//! - [`push`]: push subscriptions of devices and the VAPID key they subscribe with.
//! - [`turn`]: short-lived TURN credentials for the call relay (coturn, shared secret).
//! - [`web`]: the browser client's static files, when `web_root` is set.
//! - [`secrets`]: how every secret that reaches the broker leaves its memory again.
//! - [`tickets`]: one-time session tickets, presented on `/v1/ws` instead of the token.

pub mod blobs;
pub mod client_ip;
pub mod error;
pub(crate) mod extract;
pub mod federation;
pub(crate) mod group;
pub mod http;
pub(crate) mod json;
pub mod keys;
pub mod limits;
pub(crate) mod pending;
pub mod push;
pub(crate) mod remote;
pub(crate) mod route;
pub mod sealed;
pub mod secrets;
pub mod session;
#[cfg(test)]
mod session_tests;
pub mod settings;
pub mod tickets;
pub mod transparency;
pub mod turn;
pub mod web;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, AtomicUsize},
};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

pub use self::settings::{BlobSettings, PushDoor, Registration, Settings};
use crate::{
    crypto::TokenHasher,
    federation::Federation,
    mailbox::Mailboxes,
    socket::{self, Budget},
    store::Stores,
};

/// Registers every route of the broker.
pub fn routes(cfg: &mut actix_web::web::ServiceConfig) {
    use actix_web::web::get;
    cfg.app_data(json::JsonLimit(json::MAX_JSON_BODY))
        .configure(http::routes)
        .route("/v1/ws", get().to(websocket_only))
        .route("/v1/sealed", get().to(websocket_only))
        .configure(keys::routes)
        .configure(blobs::routes)
        .configure(federation::routes)
        .configure(turn::routes)
        .configure(push::routes)
        .configure(tickets::routes)
        .configure(transparency::routes)
        .configure(self::web::routes)
        .default_service(actix_web::web::to(unknown_path));
}

/// Any path no route claims gets the documented JSON error (`not_found`), not an empty 404.
async fn unknown_path() -> Result<actix_web::HttpResponse, error::ApiError> {
    Err(error::ApiError::NotFound)
}

/// A WebSocket endpoint asked for without `Upgrade: websocket`. Requests with it never reach
/// the routes: the HTTP server hands them, with their connection, to [`serve_upgrade`].
async fn websocket_only() -> Result<actix_web::HttpResponse, error::ApiError> {
    Err(error::ApiError::BadRequest(
        "this endpoint takes a WebSocket upgrade (Upgrade: websocket)".into(),
    ))
}

/// Serves a WebSocket upgrade request, which the HTTP server hands over with its connection:
/// `/v1/ws` (device sessions), `/v1/sealed` (sealed sends) and `/v1/federation` (inbound
/// links). The returned future serves the connection until it closes.
///
/// Each endpoint's future is boxed on its own: the connection's task holds it for the
/// socket's whole life, and one future for all three would be as large as the largest
/// (an inbound federation link's) for every idle device too.
pub fn serve_upgrade(
    state: Arc<AppState>,
    req: actix_http::Request,
    connection: actix_codec::Framed<actix_web::rt::net::TcpStream, actix_http::h1::Codec>,
) -> futures_util::future::LocalBoxFuture<'static, ()> {
    use actix_web::ResponseError as _;
    enum Endpoint {
        Device,
        Sealed,
        Federation,
    }
    let upgrade = socket::Upgrade::new(req, connection);
    let endpoint = match upgrade.path() {
        "/v1/ws" => Endpoint::Device,
        "/v1/sealed" => Endpoint::Sealed,
        "/v1/federation" => Endpoint::Federation,
        _ => return Box::pin(upgrade.refuse(error::ApiError::NotFound.error_response())),
    };
    if let Err(why) = upgrade.verify() {
        let refusal = error::ApiError::BadRequest(why).error_response();
        return Box::pin(upgrade.refuse(refusal));
    }
    match endpoint {
        Endpoint::Device => Box::pin(session::serve(state, upgrade)),
        Endpoint::Sealed => Box::pin(sealed::serve(state, upgrade)),
        Endpoint::Federation => Box::pin(federation::serve(state, upgrade)),
    }
}

/// State shared by every route and session.
pub struct AppState {
    /// Validated settings.
    pub settings: Settings,
    /// The store's seams (the directory and health are used here; queues go through
    /// mailboxes).
    pub store: Stores,
    /// The mailboxes, through their typed handle.
    pub mailboxes: Mailboxes,
    /// Federation peers (one actor per remote domain) and this broker's federation key.
    pub federation: Arc<Federation>,
    /// Device token hashing.
    pub hasher: TokenHasher,
    /// Rate limits.
    pub limits: limits::Limits,
    /// Prometheus renderer (absent when another recorder was installed first).
    pub metrics: Option<PrometheusHandle>,
    /// Set once shutdown begins: readiness fails and new connections are refused.
    pub shutting_down: AtomicBool,
    /// Flips to true when sessions must close.
    pub shutdown: watch::Receiver<bool>,
    /// WebSocket sessions running (authenticated or not); shutdown waits for them.
    pub open_sessions: AtomicUsize,
    /// Source of connection ids.
    pub next_conn: AtomicU64,
    /// The call relay's credentials minting (TURN REST scheme).
    pub turn: turn::Turn,
    /// Memory all WebSocket readers together may hold in partly received messages.
    pub socket_budget: Arc<Budget>,
    /// Bytes of group-message copies on their way to mailboxes (a group send's local
    /// fan-out, a peer's deliveries), one permit a byte: a fan-out waits for room rather than
    /// holding gigabytes (a 448 KiB Commit to 4,000 devices would be 1.7 GiB at once).
    pub fanout: Arc<tokio::sync::Semaphore>,
    /// Fetches attachments from peers' brokers for this broker's users (see `blobs`).
    pub peer_http: reqwest::Client,
    /// Connections not authenticated yet, capped per address and in total.
    pub pre_auth: Arc<limits::PreAuth>,
    /// Session tickets already used to log in, until they expire.
    pub(crate) spent_tickets: tickets::Spent,
    /// This domain's key-transparency log (`None` with the NATS store, which has none yet).
    pub transparency: Option<crate::transparency::Log>,
}

impl AppState {
    /// The gateway's state over the layers below it; `shutdown` flips to true when sessions
    /// must close.
    pub fn new(
        settings: Settings,
        store: Stores,
        mailboxes: Mailboxes,
        federation: Arc<Federation>,
        hasher: TokenHasher,
        shutdown: watch::Receiver<bool>,
    ) -> AppState {
        let r = &settings.rates;
        AppState {
            limits: limits::Limits::new(r),
            turn: turn::Turn::new(&settings.turn),
            metrics: crate::telemetry::init_metrics().inspect(|_| {
                crate::telemetry::register_labels(
                    "sealpost_rejects_total",
                    "reason",
                    error::ApiError::CODES.iter().copied(),
                );
            }),
            socket_budget: Budget::new(settings.socket_buffer_bytes),
            fanout: Arc::new(tokio::sync::Semaphore::new(settings.fanout_buffer_bytes)),
            peer_http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .read_timeout(std::time::Duration::from_secs(60))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            pre_auth: limits::PreAuth::new(
                settings.max_unauthenticated_per_ip,
                settings.max_unauthenticated,
            ),
            store,
            mailboxes,
            federation,
            hasher,
            shutting_down: AtomicBool::new(false),
            shutdown,
            open_sessions: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            spent_tickets: tickets::Spent::default(),
            transparency: None,
            settings,
        }
    }

    /// Limits for a device-facing socket whose messages are at most `max_message` bytes.
    pub(crate) fn socket_limits(&self, max_message: usize) -> socket::Limits {
        socket::Limits {
            max_message,
            heartbeat: self.settings.heartbeat,
            // A client that takes nothing off the connection for as long as it may stay
            // silent is gone.
            idle_timeout: self.settings.client_timeout,
            budget: Arc::clone(&self.socket_budget),
        }
    }

    /// The client's address: the TCP peer, or what a trusted proxy forwarded.
    pub fn client_ip(&self, req: &actix_web::dev::RequestHead) -> Option<std::net::IpAddr> {
        self.settings.trusted_proxies.client_ip(req)
    }
}
