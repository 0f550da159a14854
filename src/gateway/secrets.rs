//! Secrets that reach the broker, and how each one leaves its memory again.
//!
//! An intruder with a memory dump of the running broker must not find a credential it could
//! use. The broker keeps none in cleartext after checking it: tokens are stored only as keyed
//! hashes, and what carried them is wiped.
//!
//! | secret | arrives in | wiped by |
//! |---|---|---|
//! | device token, delivery token | HTTP `authorization`, `sealpost-delivery-token` headers | [`scrub`]: moved into our own zeroized copy; the connection closes after the answer |
//! | device token | (not any more) the WebSocket `auth` frame | a one-time ticket goes there instead (see the `tickets` module) |
//! | delivery token | `sealed_send` frame | freed with the frame (the allocator zeroes it) |
//! | delivery token, link code, registration token | HTTP body | the connection closes after the answer; our body buffer is `Zeroizing` |
//! | everything above | freed buffers, copies moved by a growing `Vec` | the zeroizing global allocator (`main.rs`) |
//!
//! actix-http parses a request in place in its per-connection read buffer, shares that buffer
//! with the request's headers, and keeps finished requests' headers in a pool; our code
//! cannot wipe that buffer. [`scrub`] makes the request stop pointing into it, and closing the
//! connection frees it, zeroed. Requests without a secret (public lookups) keep their
//! connection alive.
//!
//! WebSocket frames do not stay: the socket reads them from the kernel into a stack buffer it
//! wipes, and holds their copy only until the message is handled (`socket::reader`); then it
//! is freed, zeroed. Frames a client sends right behind its upgrade request arrive in
//! actix-http's buffer with the request; the socket empties the request's head before
//! actix-http pools it (`socket::upgrade`), so that buffer too is freed once they are read. `auth` frames carry one-time tickets anyway; `sealed_send` frames carry
//! the recipient's delivery token, which admits sealed envelopes to that one account and
//! nothing else.

use actix_web::{
    Error, HttpMessage as _, HttpRequest,
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::{
        ConnectionType, Method,
        header::{AUTHORIZATION, HeaderMap, HeaderValue},
    },
    middleware::Next,
};
use zeroize::Zeroizing;

/// Headers that carry secrets: the device token (`authorization`) and a delivery token (key
/// claims).
const SECRET_HEADERS: [&str; 2] = ["authorization", "sealpost-delivery-token"];

/// A request's secret headers, moved out of actix's header map by [`scrub`] into memory of
/// our own, wiped when the request ends.
struct SecretHeaders(Vec<(&'static str, Zeroizing<String>)>);

/// The value of the secret header `name` (one of [`SECRET_HEADERS`]) as the client sent it.
pub(crate) fn secret_header(req: &HttpRequest, name: &str) -> Option<Zeroizing<String>> {
    let extensions = req.extensions();
    let headers = extensions.get::<SecretHeaders>()?;
    headers
        .0
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.clone())
}

/// Whether a request may carry a secret: a credential header, or a body (every body the API
/// takes is sent with a method other than `GET`).
fn may_carry_secret(req: &ServiceRequest) -> bool {
    req.headers().contains_key(AUTHORIZATION) || req.method() != Method::GET
}

/// Middleware for every request that may carry a secret:
///
/// - its secret headers move into memory of our own (read them with [`secret_header`]);
/// - every other header is copied into memory of its own: actix keeps finished requests'
///   headers in a pool for reuse, and headers that point into the connection's read buffer
///   would keep that whole buffer (with the secret in it) alive;
/// - the answer says `Connection: close`, so that the read buffer is freed (and zeroed by the
///   allocator) once the answer is written.
pub async fn scrub(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let secret = may_carry_secret(&req);
    if secret {
        let headers = req.headers_mut();
        let moved: Vec<_> = SECRET_HEADERS
            .iter()
            .filter_map(|name| {
                let value = headers.remove(*name).next()?;
                Some((
                    *name,
                    Zeroizing::new(String::from_utf8_lossy(value.as_bytes()).into_owned()),
                ))
            })
            .collect();
        own_values(headers);
        req.extensions_mut().insert(SecretHeaders(moved));
    }
    let mut res = next.call(req).await?;
    if secret {
        res.response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
    }
    Ok(res)
}

/// Replaces every header value by a copy in its own allocation.
fn own_values(headers: &mut HeaderMap) {
    for (name, value) in std::mem::take(headers) {
        let owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or(value);
        headers.append(name, owned);
    }
}
