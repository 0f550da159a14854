//! Attachments over HTTP: a device uploads an encrypted attachment in pieces (resumable), and
//! anyone holding its id downloads it, whole or by range, without naming themselves.
//!
//! | method | path | auth | what |
//! |---|---|---|---|
//! | POST | `/v1/accounts/{h}/blobs` | a device of `h` | start one: `{size}` → `{id, expires_ms, piece_max}` |
//! | PATCH | `/v1/accounts/{h}/blobs/{id}` | a device of `h` (its uploader's account) | append a piece at `Upload-Offset`; answers the new `Upload-Offset` once durable |
//! | HEAD | `/v1/blobs/{id}` | none | `Upload-Length`, `Upload-Offset` (where to resume) |
//! | GET | `/v1/blobs/{id}` | none | the whole attachment, or one `Range: bytes=…` (206); only once every byte arrived |
//! | GET | `/v1/domains/{domain}/blobs/{id}` | none | the same, of an attachment kept by a peer domain's broker: this broker fetches it there (the peer sees this broker, not the client) |
//!
//! ```text
//! POST (size) ─▶ id ─▶ PATCH @0 ─▶ PATCH @n … ─▶ whole ─▶ GET [Range]
//!                       ▲ lost answer or crash: HEAD ─▶ Upload-Offset ─┘
//! ```
//!
//! A piece answered is durable (fsync'ed): a client that lost the answer, or a broker that
//! restarted, resumes from `Upload-Offset`. Ids are 32 random bytes (base64url): holding one
//! is what allows a download, so a download says nothing of who asks. What the broker keeps
//! of an upload: its size, bytes received, expiry and a keyed hash of the account (for its
//! quota); never a name, a type or a key. Logs hold no ids.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, http::StatusCode, web};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use rand::RngCore;
use sealpost_proto::limits::MAX_BLOB_PIECE_BYTES;
use serde::Deserialize;
use serde_json::json;

use super::{
    AppState,
    error::ApiError,
    extract::{Admitted, Authenticated},
};
use crate::{
    clock::now_ms,
    store::blobs::{BlobId, BlobInfo, BlobWrite, Blobs, NewBlob},
};

type State = web::Data<Arc<AppState>>;

/// Bytes read from the store for each part of a download's body.
const READ_PIECE: usize = 1024 * 1024;

/// Routes of this module.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/accounts/{handle}/blobs", web::post().to(start))
        .service(
            web::resource("/v1/accounts/{handle}/blobs/{id}")
                .app_data(web::PayloadConfig::new(MAX_BLOB_PIECE_BYTES))
                .route(web::patch().to(append)),
        )
        .service(
            web::resource("/v1/blobs/{id}")
                .route(web::head().to(status))
                .route(web::get().to(download)),
        )
        .route(
            "/v1/domains/{domain}/blobs/{id}",
            web::get().to(download_from),
        );
}

#[derive(Deserialize)]
struct StartRequest {
    /// The attachment's length once uploaded (its ciphertext), bytes.
    size: u64,
}

fn store(state: &AppState) -> Result<&Arc<dyn Blobs>, ApiError> {
    state.store.blobs.as_ref().ok_or(ApiError::Unavailable)
}

fn parse_id(text: &str) -> Result<BlobId, ApiError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| ApiError::NotFound)?;
    bytes.try_into().map_err(|_| ApiError::NotFound)
}

/// A blob that exists and has not expired.
async fn live_blob(blobs: &Arc<dyn Blobs>, id: BlobId) -> Result<BlobInfo, ApiError> {
    match blobs.info(id).await? {
        Some(info) if info.expires_ms > now_ms() => Ok(info),
        _ => Err(ApiError::NotFound),
    }
}

async fn start(
    state: State,
    auth: Authenticated,
    body: web::Json<StartRequest>,
) -> Result<HttpResponse, ApiError> {
    let blobs = store(&state)?;
    let limits = &state.settings.blobs;
    let size = body.size;
    if size == 0 {
        return Err(ApiError::BadRequest(
            "an attachment has at least one byte".into(),
        ));
    }
    if size > limits.max_bytes {
        return Err(ApiError::TooLarge(format!(
            "an attachment is at most {} bytes",
            limits.max_bytes
        )));
    }
    if !state.limits.allow_blob(auth.handle.as_str()) {
        return Err(ApiError::RateLimited);
    }
    if !state.store.health.has_room() {
        return Err(ApiError::Unavailable);
    }
    let owner = state.hasher.blob_owner(auth.handle.as_str());
    if blobs.usage(owner).await?.saturating_add(size) > limits.quota_bytes {
        return Err(ApiError::QuotaExceeded);
    }
    let mut id = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let ttl_ms = u64::try_from(limits.ttl.as_millis()).unwrap_or(u64::MAX);
    let expires_ms = now_ms().saturating_add(ttl_ms);
    blobs
        .create(NewBlob {
            id,
            owner,
            size,
            expires_ms,
        })
        .await?;
    metrics::counter!("sealpost_blobs_started_total").increment(1);
    Ok(HttpResponse::Created().json(json!({
        "id": URL_SAFE_NO_PAD.encode(id),
        "expires_ms": expires_ms,
        "piece_max": MAX_BLOB_PIECE_BYTES,
    })))
}

async fn append(
    state: State,
    auth: Authenticated,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    piece: Bytes,
) -> Result<HttpResponse, ApiError> {
    let blobs = store(&state)?;
    let id = parse_id(&path.1)?;
    let offset: u64 = req
        .headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            ApiError::BadRequest("Upload-Offset (bytes received so far) is required".into())
        })?;
    if piece.is_empty() {
        return Err(ApiError::BadRequest("an empty piece".into()));
    }
    // Only the uploader's account may add to it; to anyone else it does not exist.
    let info = live_blob(blobs, id).await?;
    if info.owner != state.hasher.blob_owner(auth.handle.as_str()) {
        return Err(ApiError::NotFound);
    }
    if !state.store.health.has_room() {
        return Err(ApiError::Unavailable);
    }
    let len = piece.len() as u64;
    match blobs.append(id, offset, piece).await? {
        BlobWrite::Stored { received } => {
            metrics::counter!("sealpost_blob_bytes_received_total").increment(len);
            Ok(HttpResponse::NoContent()
                .insert_header(("Upload-Offset", received.to_string()))
                .finish())
        }
        BlobWrite::WrongOffset { received } => Ok(HttpResponse::Conflict()
            .insert_header(("Upload-Offset", received.to_string()))
            .json(json!({
                "error": "wrong_offset",
                "message": "the piece does not start where the attachment ends; resume from Upload-Offset",
                "received": received,
            }))),
        BlobWrite::Busy => Ok(HttpResponse::Conflict().json(json!({
            "error": "upload_busy",
            "message": "another piece of this attachment is being written; try again",
        }))),
        BlobWrite::TooLong => Err(ApiError::BadRequest(
            "the piece runs past the attachment's size".into(),
        )),
        BlobWrite::Unknown => Err(ApiError::NotFound),
    }
}

async fn status(
    state: State,
    _: Admitted,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let blobs = store(&state)?;
    let info = live_blob(blobs, parse_id(&path)?).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("Upload-Length", info.size.to_string()))
        .insert_header(("Upload-Offset", info.received.to_string()))
        .insert_header(("Cache-Control", "no-store"))
        .finish())
}

async fn download(
    state: State,
    _: Admitted,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    serve(&state, &path, &req).await
}

/// An attachment of `domain`: served here if it is this broker's, else fetched from that
/// domain's broker and passed on as it comes. The peer learns that this broker asked for the
/// id, not which client; this broker, what it would learn of a download of its own.
async fn download_from(
    state: State,
    _: Admitted,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (domain, id) = path.into_inner();
    if domain == state.settings.domain {
        return serve(&state, &id, &req).await;
    }
    if !state.federation.is_peer(&domain) {
        return Err(ApiError::NotFound);
    }
    parse_id(&id)?;
    let base = state
        .federation
        .http_base(&domain)
        .await
        .map_err(|_| ApiError::Unavailable)?;
    let mut fetch = state.peer_http.get(format!("{base}/v1/blobs/{id}"));
    if let Some(range) = req.headers().get("range") {
        fetch = fetch.header("range", range.as_bytes());
    }
    let answer = fetch.send().await.map_err(|_| ApiError::Unavailable)?;
    let status = answer.status().as_u16();
    let passed = |name: &str| {
        answer
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_range = passed("content-range");
    let mut out = match status {
        200 => HttpResponse::Ok(),
        206 => HttpResponse::PartialContent(),
        416 => HttpResponse::RangeNotSatisfiable(),
        404 => return Err(ApiError::NotFound),
        _ => return Err(ApiError::Unavailable),
    };
    if let Some(range) = content_range {
        out.insert_header(("Content-Range", range));
    }
    out.insert_header(("Content-Type", "application/octet-stream"))
        .insert_header(("Accept-Ranges", "bytes"))
        .insert_header(("Cache-Control", "no-store"));
    let length = answer.content_length();
    let body = futures_util::StreamExt::map(answer.bytes_stream(), |piece| {
        piece.map_err(|e| crate::store::StoreError::Io(e.without_url().to_string()))
    });
    Ok(match length {
        Some(length) => out.no_chunking(length).streaming(body),
        None => out.streaming(body),
    })
}

/// A download of one of this broker's attachments.
async fn serve(state: &AppState, id: &str, req: &HttpRequest) -> Result<HttpResponse, ApiError> {
    let blobs = store(state)?.clone();
    let id = parse_id(id)?;
    let info = live_blob(&blobs, id).await?;
    // Half an upload is never served: to a downloader it does not exist yet.
    if !info.whole() {
        return Err(ApiError::NotFound);
    }
    let size = info.size;
    let range = req
        .headers()
        .get("range")
        .map(|v| v.to_str().ok().and_then(|v| byte_range(v, size)));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Some(None) => {
            return Ok(HttpResponse::RangeNotSatisfiable()
                .insert_header(("Content-Range", format!("bytes */{size}")))
                .finish());
        }
    };
    metrics::counter!("sealpost_blob_bytes_sent_total").increment(end - start);
    let body = futures_util::stream::unfold(start, move |at| {
        let blobs = blobs.clone();
        async move {
            if at >= end {
                return None;
            }
            let want = usize::try_from(end - at)
                .unwrap_or(READ_PIECE)
                .min(READ_PIECE);
            match blobs.read(id, at, want).await {
                Ok(bytes) if !bytes.is_empty() => {
                    let next = at + bytes.len() as u64;
                    Some((Ok(bytes), next))
                }
                Ok(_) => Some((Err(crate::store::StoreError::NotFound), end)),
                Err(e) => Some((Err(e), end)),
            }
        }
    });
    let mut answer = HttpResponse::build(status);
    answer
        .insert_header(("Content-Type", "application/octet-stream"))
        .insert_header(("Accept-Ranges", "bytes"))
        .insert_header(("Cache-Control", "no-store"));
    if status == StatusCode::PARTIAL_CONTENT {
        answer.insert_header(("Content-Range", format!("bytes {start}-{}/{size}", end - 1)));
    }
    Ok(answer.no_chunking(end - start).streaming(body))
}

/// The byte range (start, end exclusive) a `Range` header asks of `size` bytes: one range,
/// `bytes=a-b`, `bytes=a-` or `bytes=-n`; `None` if it cannot be served.
fn byte_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.strip_prefix("bytes=")?.trim();
    let (first, last) = spec.split_once('-')?;
    let (start, end) = match (first.trim(), last.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().ok()?, size),
        (a, b) => {
            let b: u64 = b.parse().ok()?;
            (a.parse().ok()?, b.saturating_add(1).min(size))
        }
    };
    (start < end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        assert_eq!(byte_range("bytes=0-9", 100), Some((0, 10)));
        assert_eq!(byte_range("bytes=90-", 100), Some((90, 100)));
        assert_eq!(byte_range("bytes=-10", 100), Some((90, 100)));
        assert_eq!(byte_range("bytes=95-200", 100), Some((95, 100)));
        assert_eq!(byte_range("bytes=100-", 100), None);
        assert_eq!(byte_range("bytes=5-2", 100), None);
        assert_eq!(byte_range("bytes=0-1,5-6", 100), None);
        assert_eq!(byte_range("items=0-1", 100), None);
    }
}
