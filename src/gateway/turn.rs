//! TURN credentials for a coturn relay in its `use-auth-secret` mode (the "TURN REST API"
//! scheme, draft-uberti-behave-turn-rest):
//!
//! ```text
//! username   = "<expiry, Unix seconds>:<opaque id>"
//! credential = base64(HMAC-SHA1(shared secret, username))
//! ```
//!
//! coturn recomputes the credential from the username with the same secret and refuses it
//! after the expiry. The opaque id is 16 random bytes (base64url), fresh for every request: the
//! relay's logs and allocations name neither the user nor the device, and two requests of the
//! same device cannot be linked by their usernames.
//!
//! | method | path | auth | what |
//! |---|---|---|---|
//! | GET | `/v1/accounts/{h}/turn` | a device of `h` | `{urls, username, credential, ttl}` |
//!
//! Rate-limited per device (`turn_rate_per_min`). When no relay is configured (`turn_urls`
//! empty) the endpoint answers 404 `not_found` and clients connect without a relay.

use std::{num::NonZeroU32, sync::Arc};

use actix_web::{HttpResponse, web};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use governor::{DefaultKeyedRateLimiter, Quota};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::Serialize;
use sha1::Sha1;
use zeroize::Zeroizing;

use super::settings::TurnSettings;
use super::{AppState, error::ApiError, extract::Authenticated};
use crate::clock::now_ms;

type State = web::Data<Arc<AppState>>;

/// Longest credential lifetime accepted in the settings: TURN credentials are meant to be
/// short-lived (a call's set-up plus its refreshes).
pub const MAX_TTL_SECS: u64 = 24 * 3600;

/// The relay's configuration and the per-device limiter.
pub struct Turn {
    urls: Vec<String>,
    /// The shared secret (coturn's `static-auth-secret`); empty when no relay is configured.
    secret: Zeroizing<Vec<u8>>,
    ttl_secs: u64,
    limiter: Option<DefaultKeyedRateLimiter<(String, u32)>>,
}

/// Parses `turn_urls`: comma-separated `turn:`/`turns:`/`stun:` URLs.
pub fn parse_urls(raw: &str) -> Result<Vec<String>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            if ["turn:", "turns:", "stun:"]
                .iter()
                .any(|p| u.starts_with(p))
            {
                Ok(u.to_owned())
            } else {
                Err(format!("{u:?} is not a turn:, turns: or stun: URL"))
            }
        })
        .collect()
}

impl Turn {
    /// The relay of `settings`, with its per-device limiter.
    pub fn new(settings: &TurnSettings) -> Self {
        Turn {
            urls: settings.urls.clone(),
            secret: settings.secret.clone(),
            ttl_secs: settings.ttl_secs,
            limiter: NonZeroU32::new(settings.rate_per_min).map(|rate| {
                DefaultKeyedRateLimiter::keyed(Quota::per_minute(rate).allow_burst(rate))
            }),
        }
    }

    /// Whether a relay is configured.
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty() && !self.secret.is_empty()
    }

    /// Forgets devices that have been quiet long enough.
    pub fn housekeep(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
        }
    }

    fn allow(&self, user: &str, device: u32) -> bool {
        self.limiter
            .as_ref()
            .is_none_or(|l| l.check_key(&(user.to_owned(), device)).is_ok())
    }
}

/// The credential for `username` under `secret`: base64(HMAC-SHA1(secret, username)).
pub fn credential(secret: &[u8], username: &str) -> String {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any size");
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// A fresh username: expiry and 16 random bytes, naming nobody.
fn username(expiry_secs: u64) -> String {
    let mut opaque = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut opaque);
    format!("{expiry_secs}:{}", URL_SAFE_NO_PAD.encode(opaque))
}

#[derive(Serialize)]
struct Credentials {
    urls: Vec<String>,
    username: String,
    credential: String,
    /// Seconds the credential is valid for.
    ttl: u64,
}

/// Registers the route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/accounts/{handle}/turn", web::get().to(get_credentials));
}

async fn get_credentials(me: Authenticated, state: State) -> Result<HttpResponse, ApiError> {
    let Authenticated { handle, device } = me;
    let turn = &state.turn;
    if !turn.enabled() {
        return Err(ApiError::NotFound);
    }
    if !turn.allow(handle.as_str(), device.0) {
        return Err(ApiError::RateLimited);
    }
    let username = username(now_ms() / 1000 + turn.ttl_secs);
    let credential = credential(&turn.secret, &username);
    metrics::counter!("sealpost_turn_credentials_total").increment(1);
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(Credentials {
            urls: turn.urls.clone(),
            username,
            credential,
            ttl: turn.ttl_secs,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values computed independently with coturn's documented recipe,
    /// `echo -n USERNAME | openssl dgst -sha1 -hmac SECRET -binary | base64`.
    #[test]
    fn credential_matches_the_turn_rest_scheme() {
        assert_eq!(
            credential(b"north", "1433895918506:my_username"),
            "Gx/rOncp1ZXBdeBo0S3RrYQnHDA="
        );
        assert_eq!(
            credential(b"logen", "1600000000:bob"),
            "qSPZQgl4fbDVyXlN4S4RB0LrUHE="
        );
    }

    #[test]
    fn usernames_are_expiry_and_an_opaque_id() {
        let a = username(1_700_000_000);
        let b = username(1_700_000_000);
        assert_ne!(a, b);
        let (expiry, opaque) = a.split_once(':').expect("separator");
        assert_eq!(expiry, "1700000000");
        assert_eq!(URL_SAFE_NO_PAD.decode(opaque).expect("base64url").len(), 16);
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_urls(" turn:127.0.0.1:3478?transport=udp, stun:x:3478 ,").unwrap(),
            vec!["turn:127.0.0.1:3478?transport=udp", "stun:x:3478"]
        );
        assert!(parse_urls("http://x").is_err());
        assert!(parse_urls("").unwrap().is_empty());
    }

    #[test]
    fn rate_limited_per_device() {
        let turn = Turn::new(&TurnSettings {
            urls: vec!["turn:127.0.0.1:3478".into()],
            secret: Zeroizing::new(b"s".to_vec()),
            ttl_secs: 600,
            rate_per_min: 2,
        });
        assert!(turn.enabled());
        assert!(turn.allow("a@x.y", 1));
        assert!(turn.allow("a@x.y", 1));
        assert!(!turn.allow("a@x.y", 1));
        assert!(turn.allow("a@x.y", 2));
    }
}
