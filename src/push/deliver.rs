//! One wake-up to one device: read its subscription, encrypt [`WAKE_PAYLOAD`] to it (RFC 8291
//! `aes128gcm`), sign with VAPID (RFC 8292), POST it to the push service (RFC 8030), and sort
//! the answer into done, retry later, or subscription gone.

use std::{sync::Arc, time::Duration};

use reqwest::{StatusCode, header::HeaderValue};
use tracing::{info, warn};
use web_push_native::{Auth, WebPushBuilder, p256::PublicKey};

use super::{PushSettings, WAKE_PAYLOAD, endpoint::VapidKey};
use crate::store::{Directory, PushRecord};

/// How long a push service keeps an undelivered urgent wake-up (a ringing call).
const URGENT_TTL: Duration = Duration::from_secs(60);

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
    pub fn new(
        settings: PushSettings,
        vapid: VapidKey,
        directory: Arc<dyn Directory>,
    ) -> Result<Sender, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            // A push service answers; it never sends the broker elsewhere (and a redirect
            // could point at a host the subscription check refused).
            .redirect(reqwest::redirect::Policy::none())
            // Names are resolved here, so that the resolver below sees every address: a proxy
            // would resolve them itself.
            .no_proxy()
            .dns_resolver(Arc::new(PublicOnly {
                allow_private: settings.allow_private_endpoints,
            }))
            .build()?;
        Ok(Sender {
            settings,
            vapid,
            directory,
            http,
        })
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
        if record.auth.len() != 16 {
            return Err("the stored authentication secret is not 16 bytes".into());
        }
        let auth = Auth::clone_from_slice(&record.auth);
        // A call's wake-up is worth nothing once the call stopped ringing.
        let ttl = if urgent {
            URGENT_TTL
        } else {
            self.settings.ttl
        };
        let built = WebPushBuilder::new(record.endpoint.parse()?, public, auth)
            .with_valid_duration(ttl)
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
    /// another meanwhile. (A registration racing between the read and the delete is lost;
    /// the device registers again when it next finds itself without wake-ups.)
    async fn forget(&self, user: &str, device: u32, gone: &PushRecord) {
        match self.directory.push_subscription(user, device).await {
            Ok(Some(current)) if current == *gone => {
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

/// Resolves push services' names to public addresses only: a name that resolves to this host,
/// a private network or a link-local address (the cloud's metadata service) is refused, so a
/// device cannot make the broker post into the operator's network by registering such a
/// name. Addresses given as literals are checked when the subscription is registered.
struct PublicOnly {
    allow_private: bool,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found = tokio::net::lookup_host((name.as_str(), 0)).await?;
            let public: Vec<std::net::SocketAddr> = found
                .filter(|a| allow_private || super::endpoint::is_public(a.ip()))
                .collect();
            if public.is_empty() {
                return Err("the push service's name resolves to no public address".into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use reqwest::dns::{Name, Resolve};

    use super::PublicOnly;

    #[tokio::test]
    async fn a_name_that_resolves_to_this_host_is_refused_unless_allowed() {
        let name = || Name::from_str("localhost").expect("name");
        let refused = PublicOnly {
            allow_private: false,
        }
        .resolve(name())
        .await;
        assert!(refused.is_err());
        let allowed = PublicOnly {
            allow_private: true,
        }
        .resolve(name())
        .await
        .expect("resolves");
        assert!(allowed.into_iter().all(|a| a.ip().is_loopback()));
    }
}
