//! Key-transparency routes: this domain's signed roots and their append-only proofs, the
//! account's own history, and co-signatures; the same of a peer domain's log, fetched over the
//! federation link (clients ask their own broker, never another domain's).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/transparency/root[?domain=D]` | `{root}`: the newest signed root |
//! | GET | `/v1/transparency/audit?from=E1&to=E2[&domain=D]` | `{roots, proof}`: roots `E1..=E2` (at most 64 epochs) and akd's append-only proof |
//! | GET | `/v1/accounts/{h}/transparency-history` (device auth) | `{root, proof}`: akd's history proof of the caller's own entry |
//! | GET | `/v1/transparency/cosignatures?domain=D&epoch=E` | `{cosignatures}`: what auditors signed of D's root at E |
//!
//! Every record is base64 of its `sealpost_proto::transparency` encoding.

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use base64::{Engine, engine::general_purpose::STANDARD};
use sealpost_proto::{
    ErrorCode,
    federation::{LinkFrame, NEWEST},
    transparency::SignedRoot,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    AppState,
    error::ApiError,
    extract::{Admitted, Authenticated},
};
use crate::{
    federation::messages::Request,
    transparency::{Log, LogError},
};

type State = web::Data<Arc<AppState>>;

/// How many of its newest values an account's history answer covers.
const HISTORY_VERSIONS: usize = 64;

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/transparency/root", web::get().to(root))
        .route("/v1/transparency/audit", web::get().to(audit))
        .route(
            "/v1/accounts/{handle}/transparency-history",
            web::get().to(history),
        )
        .route("/v1/transparency/cosignatures", web::get().to(cosignatures));
}

/// A log failure as the client sees it.
pub(crate) fn unavailable(e: LogError) -> ApiError {
    match e {
        LogError::BadRange => ApiError::NotFound,
        LogError::NotAList => ApiError::BadRequest("not a signed device list".into()),
        e => {
            warn!(error = %e, "transparency log unavailable");
            ApiError::Unavailable
        }
    }
}

fn log(state: &AppState) -> Result<&Log, ApiError> {
    state.transparency.as_ref().ok_or(ApiError::NotFound)
}

#[derive(Deserialize)]
struct DomainQuery {
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    from: u64,
    #[serde(default)]
    to: u64,
    #[serde(default)]
    epoch: u64,
}

#[derive(Serialize)]
struct RootAnswer {
    root: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    proof: Option<String>,
}

#[derive(Serialize)]
struct AuditAnswer {
    roots: Vec<String>,
    proof: String,
}

/// The peer domain a query names, if it names one other than this.
fn peer<'a>(state: &AppState, q: &'a DomainQuery) -> Result<Option<&'a str>, ApiError> {
    match q.domain.as_deref() {
        None => Ok(None),
        Some(d) if d == state.settings.domain => Ok(None),
        Some(d) if state.federation.is_peer(d) => Ok(Some(d)),
        Some(d) => Err(ApiError::UnknownDomain(d.to_owned())),
    }
}

async fn peer_roots(
    state: &AppState,
    domain: &str,
    from: u64,
    to: u64,
) -> Result<(Vec<Vec<u8>>, Vec<u8>), ApiError> {
    match state
        .federation
        .request(domain, Request::GetRoots { from, to })
        .await
    {
        Ok(LinkFrame::Roots { roots, proof, .. }) => Ok((roots, proof)),
        Ok(LinkFrame::Refused {
            code: ErrorCode::NotFound,
            ..
        }) => Err(ApiError::NotFound),
        _ => Err(ApiError::Unavailable),
    }
}

async fn root(
    _: Admitted,
    state: State,
    q: web::Query<DomainQuery>,
) -> Result<HttpResponse, ApiError> {
    let root = match peer(&state, &q)? {
        Some(domain) => {
            let (roots, _) = peer_roots(&state, domain, NEWEST, 0).await?;
            roots.into_iter().next_back().ok_or(ApiError::Unavailable)?
        }
        None => log(&state)?
            .latest(None)
            .await
            .map_err(unavailable)?
            .to_bytes(),
    };
    Ok(HttpResponse::Ok().json(RootAnswer {
        root: STANDARD.encode(root),
        proof: None,
    }))
}

async fn audit(
    _: Admitted,
    state: State,
    q: web::Query<DomainQuery>,
) -> Result<HttpResponse, ApiError> {
    if q.to <= q.from {
        return Err(ApiError::BadRequest("from must be below to".into()));
    }
    let (roots, proof) = match peer(&state, &q)? {
        Some(domain) => peer_roots(&state, domain, q.from, q.to).await?,
        None => {
            let (roots, proof) = log(&state)?
                .audit(q.from, q.to, None)
                .await
                .map_err(unavailable)?;
            (roots.iter().map(SignedRoot::to_bytes).collect(), proof)
        }
    };
    Ok(HttpResponse::Ok().json(AuditAnswer {
        roots: roots.iter().map(|r| STANDARD.encode(r)).collect(),
        proof: STANDARD.encode(proof),
    }))
}

async fn history(me: Authenticated, state: State) -> Result<HttpResponse, ApiError> {
    let (root, proof) = log(&state)?
        .history(me.handle.as_str(), HISTORY_VERSIONS)
        .await
        .map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(RootAnswer {
        root: STANDARD.encode(root.to_bytes()),
        proof: Some(STANDARD.encode(proof)),
    }))
}

#[derive(Serialize)]
struct Cosignatures {
    cosignatures: Vec<String>,
}

async fn cosignatures(
    _: Admitted,
    state: State,
    q: web::Query<DomainQuery>,
) -> Result<HttpResponse, ApiError> {
    let domain = q.domain.as_deref().unwrap_or(&state.settings.domain);
    let found = log(&state)?.store().cosignatures(domain, q.epoch).await?;
    Ok(HttpResponse::Ok().json(Cosignatures {
        cosignatures: found.iter().map(|c| STANDARD.encode(c)).collect(),
    }))
}
