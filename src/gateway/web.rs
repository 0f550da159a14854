//! `GET /web/...`: the browser client's static files (`web/dist`: the page, its script and the
//! SDK compiled to wasm), when `web_root` is set.
//!
//! Served with a strict Content-Security-Policy: scripts only from this origin (plus
//! `wasm-unsafe-eval`, which compiling the wasm module needs), connections only to this
//! origin (the HTTP API and the WebSockets), no inline script or style, no frames, no forms,
//! no plugins. The page holds keys and plaintext; nothing else may run in it.
//!
//! This is for loopback and development. In production, serve `web/dist` from the TLS proxy
//! with the same headers (see `deploy/`).

use std::{path::PathBuf, sync::Arc};

use actix_web::{HttpResponse, web};

use super::{AppState, error::ApiError, extract::Admitted};

type State = web::Data<Arc<AppState>>;

/// The policy every file is served with.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self' \
     'wasm-unsafe-eval'; connect-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
     media-src 'self' blob: mediastream:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'; object-src 'none'";

/// Largest file served.
const MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/web", web::get().to(redirect))
        .route("/web/{tail:.*}", web::get().to(serve));
}

async fn redirect() -> HttpResponse {
    HttpResponse::MovedPermanently()
        .insert_header(("Location", "/web/"))
        .finish()
}

/// `tail` as a relative path inside the web root, or `None` if it tries to leave it or names
/// a hidden file.
fn relative_path(tail: &str) -> Option<PathBuf> {
    let tail = if tail.is_empty() || tail.ends_with('/') {
        format!("{tail}index.html")
    } else {
        tail.to_owned()
    };
    let mut out = PathBuf::new();
    for segment in tail.split('/') {
        let ok = !segment.is_empty()
            && !segment.starts_with('.')
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !ok {
            return None;
        }
        out.push(segment);
    }
    Some(out)
}

fn content_type(path: &std::path::Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

async fn serve(
    _: Admitted,
    state: State,
    tail: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let Some(root) = &state.settings.web_root else {
        return Err(ApiError::NotFound);
    };
    let relative = relative_path(&tail).ok_or(ApiError::NotFound)?;
    let path = root.join(relative);
    let bytes = web::block(move || -> std::io::Result<(Vec<u8>, PathBuf)> {
        let meta = std::fs::metadata(&path)?;
        if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        Ok((std::fs::read(&path)?, path))
    })
    .await
    .map_err(|_| ApiError::Unavailable)?;
    let (bytes, path) = bytes.map_err(|_| ApiError::NotFound)?;
    Ok(HttpResponse::Ok()
        .content_type(content_type(&path))
        .insert_header(("Content-Security-Policy", CONTENT_SECURITY_POLICY))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Cross-Origin-Opener-Policy", "same-origin"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        assert_eq!(relative_path(""), Some(PathBuf::from("index.html")));
        assert_eq!(
            relative_path("pkg/sealpost_web_bg.wasm"),
            Some(PathBuf::from("pkg/sealpost_web_bg.wasm"))
        );
        assert_eq!(relative_path("pkg/"), Some(PathBuf::from("pkg/index.html")));
        for bad in [
            "../x",
            "a/../../x",
            ".env",
            "a//b",
            "a/.git/config",
            "%2e%2e/x",
            "a\\b",
        ] {
            assert_eq!(relative_path(bad), None, "{bad}");
        }
    }
}
