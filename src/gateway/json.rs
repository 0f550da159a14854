//! JSON request bodies, and the JSON shapes shared by several endpoints.
//!
//! Bodies are read by [`Json`], not actix-web's extractor, for two reasons. A body over its
//! route's limit is read to its end (up to [`DRAIN_LIMIT`]) and dropped before the 400 is
//! sent: answering while the client is still writing makes the connection close with unread
//! bytes, the kernel then sends a reset, and the client sees the reset instead of the answer.
//! And the buffer that held the body (link codes, registration tokens) is wiped once parsed.

use std::time::Duration;

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, mime};
use futures_util::{StreamExt, future::LocalBoxFuture};
use serde::{Serialize, de::DeserializeOwned};
use zeroize::Zeroizing;

use super::error::ApiError;

/// Largest JSON request body. Routes that take more (key uploads, signed device lists) set
/// their own [`JsonLimit`].
pub(crate) const MAX_JSON_BODY: usize = 16 * 1024;

/// How much of an over-long body is read and dropped so that its client gets the answer.
/// Past it (or past [`DRAIN_TIME`]) the connection is closed as it is.
pub(crate) const DRAIN_LIMIT: usize = 4 * 1024 * 1024;

/// How long an over-long body may take to arrive before the connection is closed.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// A route's body limit, set as app data on the route or its scope.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JsonLimit(pub(crate) usize);

/// A JSON request body (`Content-Type: application/json`), parsed into `T`.
pub(crate) struct Json<T>(pub(crate) T);

impl<T> Json<T> {
    /// The parsed body.
    pub(crate) fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Json<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

fn invalid(why: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("invalid JSON body: {why}"))
}

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req.app_data::<JsonLimit>().map_or(MAX_JSON_BODY, |l| l.0);
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<mime::Mime>().ok())
            .is_some_and(|m| {
                m.type_() == mime::APPLICATION
                    && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
            });
        let mut payload = payload.take();
        Box::pin(async move {
            let mut body = Zeroizing::new(Vec::new());
            let mut received = 0usize;
            let read = tokio::time::timeout(DRAIN_TIME, async {
                while let Some(chunk) = payload.next().await {
                    let chunk = chunk.map_err(invalid)?;
                    received = received.saturating_add(chunk.len());
                    if received > DRAIN_LIMIT {
                        break;
                    }
                    if received <= limit {
                        body.extend_from_slice(&chunk);
                    }
                }
                Ok::<(), ApiError>(())
            })
            .await;
            match read {
                Ok(result) => result?,
                Err(_) => return Err(invalid("the body did not arrive in time")),
            }
            if received > limit {
                return Err(invalid(format!("larger than {limit} bytes")));
            }
            if !json {
                return Err(invalid("Content-Type must be application/json"));
            }
            serde_json::from_slice(&body).map(Json).map_err(invalid)
        })
    }
}

#[derive(Serialize)]
pub(crate) struct DeviceList {
    pub(crate) handle: String,
    pub(crate) devices: Vec<DeviceEntry>,
}

#[derive(Serialize)]
pub(crate) struct DeviceEntry {
    pub(crate) device_id: u32,
    pub(crate) identity_keys: String,
}
