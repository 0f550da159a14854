//! HTTP API errors: a stable code, a message without user content, and a status.

use actix_web::{HttpResponse, ResponseError, http::StatusCode};

/// An HTTP API error. The JSON body is `{"error": code, "message": text}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong credentials.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// Registration is not allowed, or the registration token is wrong.
    #[error("{0}")]
    Forbidden(String),
    /// No such account or device.
    #[error("not found")]
    NotFound,
    /// A handle on a domain this broker neither serves nor federates with.
    #[error("this broker does not exchange messages with {0}")]
    UnknownDomain(String),
    /// The handle is taken.
    #[error("handle already registered")]
    Conflict,
    /// Too many requests from this address.
    #[error("rate limited")]
    RateLimited,
    /// Larger than allowed (an attachment over the cap, a piece over its limit).
    #[error("{0}")]
    TooLarge(String),
    /// The account holds as many attachment bytes as it may.
    #[error("attachment quota exceeded; wait for earlier attachments to expire")]
    QuotaExceeded,
    /// The broker is shutting down or its store failed.
    #[error("service unavailable")]
    Unavailable,
}

impl ApiError {
    /// Every code [`ApiError::code`] can return, so that their reject counters exist (at 0)
    /// from the first scrape.
    pub(crate) const CODES: &'static [&'static str] = &[
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "unknown_domain",
        "conflict",
        "rate_limited",
        "too_large",
        "quota_exceeded",
        "unavailable",
    ];

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::UnknownDomain(_) => "unknown_domain",
            ApiError::Conflict => "conflict",
            ApiError::RateLimited => "rate_limited",
            ApiError::TooLarge(_) => "too_large",
            ApiError::QuotaExceeded => "quota_exceeded",
            ApiError::Unavailable => "unavailable",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::UnknownDomain(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict => StatusCode::CONFLICT,
            ApiError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooLarge(_) | ApiError::QuotaExceeded => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        crate::telemetry::reject(self.code());
        HttpResponse::build(self.status_code())
            .json(serde_json::json!({ "error": self.code(), "message": self.to_string() }))
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::AccountExists => ApiError::Conflict,
            StoreError::NotFound => ApiError::NotFound,
            StoreError::TooManyDevices => ApiError::BadRequest("too many devices".into()),
            StoreError::Io(_) | StoreError::Corruption(_) => {
                tracing::warn!(error = %e, "store failed during an API call");
                ApiError::Unavailable
            }
        }
    }
}

impl<E: Into<ApiError>> From<crate::mailbox::MailboxError<E>> for ApiError {
    fn from(e: crate::mailbox::MailboxError<E>) -> Self {
        match e {
            crate::mailbox::MailboxError::Unavailable => ApiError::Unavailable,
            crate::mailbox::MailboxError::Refused(e) => e.into(),
        }
    }
}

impl From<crate::mailbox::UploadError> for ApiError {
    fn from(e: crate::mailbox::UploadError) -> Self {
        use crate::mailbox::UploadError;
        match e {
            UploadError::TooManyKeys(_) => ApiError::BadRequest(e.to_string()),
            UploadError::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ApiError;

    #[test]
    fn every_code_is_in_codes() {
        for e in [
            ApiError::BadRequest(String::new()),
            ApiError::Unauthorized,
            ApiError::Forbidden(String::new()),
            ApiError::NotFound,
            ApiError::UnknownDomain(String::new()),
            ApiError::Conflict,
            ApiError::RateLimited,
            ApiError::TooLarge(String::new()),
            ApiError::QuotaExceeded,
            ApiError::Unavailable,
        ] {
            assert!(ApiError::CODES.contains(&e.code()), "{}", e.code());
        }
    }
}
