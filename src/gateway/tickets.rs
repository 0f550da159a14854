//! One-time session tickets: how a device logs in on `/v1/ws` without its token ever sitting
//! in a long-lived connection's buffers.
//!
//! ```text
//! POST /v1/accounts/{h}/session-ticket     authorization: Bearer <device>.<token>
//!   ◀─ 201 {"ticket", "expires_ms"}        then the connection closes (see super::secrets)
//! GET /v1/ws, first frame auth{user, device, token: ticket}
//!   ◀─ auth_ok                             the ticket is spent
//! ```
//!
//! A WebSocket's first frame passes through the socket's buffers (`crate::socket`), which
//! keep it only until it is handled; when actix-http served our WebSockets it stayed in the
//! connection's read buffer for as long as the connection was open. Either way, what a memory
//! dump might find of it is a spent ticket, worth nothing. The token travels only on the short
//! HTTP request, whose buffers are freed and zeroed when the connection closes.
//!
//! Tickets are MACs (see [`crate::crypto::TokenHasher::issue_ticket`]): nothing is kept when
//! one is issued, so any broker holding the same secret redeems it. Redeeming records its
//! nonce until it expires, so each works once here. A device token in the `auth` frame is
//! still accepted, for clients older than tickets.

use std::{collections::HashMap, sync::Mutex};

use actix_web::{HttpResponse, web};
use serde_json::json;
use zeroize::Zeroizing;

use super::{AppState, error::ApiError, extract::Authenticated};
use crate::{
    clock::now_ms,
    crypto::{TICKET_NONCE_BYTES, TICKET_WINDOW_MS},
};

type State = web::Data<std::sync::Arc<AppState>>;

/// How many redeemed, unexpired tickets are remembered at most. Issuing is rate-limited per
/// address; past this, logins by ticket are refused until old ones expire (device tokens
/// still work).
const MAX_REMEMBERED: usize = 1 << 20;

/// Registers the route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/v1/accounts/{handle}/session-ticket",
        web::post().to(issue),
    );
}

async fn issue(me: Authenticated, state: State) -> Result<HttpResponse, ApiError> {
    let now = now_ms();
    let ticket = state
        .hasher
        .issue_ticket(me.handle.as_str(), me.device.0, now);
    let text = Zeroizing::new(ticket.to_text());
    Ok(HttpResponse::Created()
        .insert_header(("Cache-Control", "no-store"))
        .json(json!({ "ticket": text.as_str(), "expires_ms": expires_ms(now) })))
}

/// When a ticket issued at `issued_ms` stops being accepted.
fn expires_ms(issued_ms: u64) -> u64 {
    (issued_ms / TICKET_WINDOW_MS + 2) * TICKET_WINDOW_MS
}

/// What redeeming a valid ticket gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Redeemed {
    /// First use: the device is logged in.
    Fresh,
    /// Used before: refused like a wrong token.
    Spent,
    /// Too many remembered: refused for now.
    Full,
}

/// The nonces of redeemed tickets, until they expire.
#[derive(Default)]
pub(crate) struct Spent {
    nonces: Mutex<HashMap<[u8; TICKET_NONCE_BYTES], u64>>,
}

impl Spent {
    /// Marks the ticket with `nonce` (valid at `now_ms`) as used, unless it was.
    pub(crate) fn redeem(&self, nonce: [u8; TICKET_NONCE_BYTES], now_ms: u64) -> Redeemed {
        let mut nonces = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        if nonces.len() >= MAX_REMEMBERED / 2 {
            nonces.retain(|_, expires| *expires > now_ms);
        }
        if nonces.contains_key(&nonce) {
            return Redeemed::Spent;
        }
        if nonces.len() >= MAX_REMEMBERED {
            return Redeemed::Full;
        }
        // Remembered as long as the ticket could be valid, whenever in its window it was issued.
        nonces.insert(nonce, expires_ms(now_ms));
        Redeemed::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_redeemed_once_and_forgotten_after_it_expires() {
        let spent = Spent::default();
        let now = 7 * TICKET_WINDOW_MS;
        assert_eq!(spent.redeem([1; 16], now), Redeemed::Fresh);
        assert_eq!(spent.redeem([1; 16], now + 1), Redeemed::Spent);
        assert_eq!(spent.redeem([2; 16], now), Redeemed::Fresh);
        let later = expires_ms(now) + 1;
        spent.nonces.lock().unwrap().retain(|_, e| *e > later);
        assert!(spent.nonces.lock().unwrap().is_empty());
    }
}
