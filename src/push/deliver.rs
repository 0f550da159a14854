//! One wake-up to one device: read its subscription, encrypt [`WAKE_PAYLOAD`] to it (RFC 8291
//! `aes128gcm`), sign with VAPID (RFC 8292), POST it to the push service (RFC 8030), and sort
//! the answer into done, retry later, or subscription gone.

use std::{sync::Arc, time::Duration};

use reqwest::{StatusCode, header::HeaderValue};
use tracing::{info, warn};
use web_push_native::{Auth, WebPushBuilder, p256::PublicKey};

use super::{PushSettings, WAKE_PAYLOAD, endpoint::VapidKey};
use crate::store::{Directory, PushRecord};

/// How long one POST to a push service may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Topic` of every wake-up: a push service replaces a wake-up still waiting for the
/// device with a newer one of the same topic (RFC 8030 §5.4), so an offline phone gets one.
const TOPIC: &str = "sealpost-wake";

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The push service took it.
    Sent {
        /// It was an urgent one.
        urgent: bool,
    },
    /// No answer, 429 or 5xx: try again later.
    Retry {
        /// It was an urgent one.
        urgent: bool,
    },
    /// Nothing more to do; the metric label says why (`no_subscription`, `gone`, `refused`).
    Finished(&'static str),
}

/// Sends wake-ups.
pub struct Sender {
    settings: PushSettings,
    vapid: VapidKey,
    directory: Arc<dyn Directory>,
    http: reqwest::Client,
}

impl Sender {
    /// A sender signing with `vapid`, reading subscriptions from `directory`.
    pub fn new(settings: PushSettings, vapid: VapidKey, directory: Arc<dyn Directory>) -> Sender {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            // A push service answers; it never sends the broker elsewhere (and a redirect
            // could point at a host the subscription check refused).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Sender {
            settings,
            vapid,
            directory,
            http,
        }
    }

    /// Delivers one wake-up to `user`'s `device`.
    pub async fn deliver(&self, user: &str, device: u32, urgent: bool) -> Outcome {
        let record = match self.directory.push_subscription(user, device).await {
            Ok(Some(record)) => record,
            Ok(None) => return Outcome::Finished("no_subscription"),
            Err(e) => {
                warn!(error = %e, "reading a push subscription failed");
                return Outcome::Retry { urgent };
            }
        };
        let request = match self.request(&record, urgent) {
            Ok(request) => request,
            Err(e) => {
                warn!(error = %e, "a push subscription cannot be sent to");
                return Outcome::Finished("refused");
            }
        };
        let status = match self.http.execute(request).await {
            Ok(answer) => answer.status(),
            Err(e) => {
                info!(timeout = e.is_timeout(), "a push service did not answer");
                return Outcome::Retry { urgent };
            }
        };
        if status.is_success() {
            Outcome::Sent { urgent }
        } else if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            self.forget(user, device, &record).await;
            Outcome::Finished("gone")
        } else if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            Outcome::Retry { urgent }
        } else {
            // 400 (malformed), 401/403 (VAPID refused), 413: the same request would fail again.
            warn!(status = status.as_u16(), "a push service refused a wake-up");
            Outcome::Finished("refused")
        }
    }

    /// The POST for `record`: encrypted payload, VAPID, TTL, Topic and Urgency headers.
    fn request(
        &self,
        record: &PushRecord,
        urgent: bool,
    ) -> Result<reqwest::Request, Box<dyn std::error::Error + Send + Sync>> {
        let public = PublicKey::from_sec1_bytes(&record.p256dh)?;
        let auth = Auth::clone_from_slice(&record.auth);
        let built = WebPushBuilder::new(record.endpoint.parse()?, public, auth)
            .with_valid_duration(self.settings.ttl)
            .with_vapid(self.vapid.pair(), &self.settings.contact)
            .build(WAKE_PAYLOAD.to_vec())?;
        let mut request = reqwest::Request::try_from(built)?;
        let headers = request.headers_mut();
        headers.insert("topic", HeaderValue::from_static(TOPIC));
        headers.insert(
            "urgency",
            HeaderValue::from_static(if urgent { "high" } else { "normal" }),
        );
        Ok(request)
    }

    /// Deletes a subscription the push service says is gone, unless the device registered
    /// another meanwhile.
    async fn forget(&self, user: &str, device: u32, gone: &PushRecord) {
        match self.directory.push_subscription(user, device).await {
            Ok(Some(current)) if current.endpoint == gone.endpoint => {
                if let Err(e) = self
                    .directory
                    .set_push_subscription(user, device, None)
                    .await
                {
                    warn!(error = %e, "deleting a gone push subscription failed");
                }
            }
            _ => {}
        }
    }
}
