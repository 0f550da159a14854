//! Checks and submission shared by the authenticated device session and the anonymous
//! sealed-send endpoint.

use std::{net::IpAddr, pin::Pin, sync::Arc};

use sealpost_proto::{
    Class, Copy, EnvelopeId, ErrorCode, Handle, SendOutcome,
    federation::Admission,
    limits::{
        MAX_CIPHERTEXT_BYTES, MAX_DEVICES_PER_USER, MAX_DURABLE_TTL_SECS, MAX_URGENT_TTL_SECS,
    },
};

use super::AppState;
use crate::{mailbox::Delivery, store::answered_inline};

/// A send awaiting its result from the recipient's mailbox.
pub(crate) type PendingSend = Pin<Box<dyn Future<Output = (EnvelopeId, SendOutcome)>>>;

/// Checks a send's fields before it reaches a mailbox (or, for a recipient on a peer domain,
/// its federation peer); returns the recipient.
pub(crate) fn validate_send(
    state: &AppState,
    to: &str,
    class: Class,
    ttl_secs: u32,
    copies: &[Copy],
) -> Result<Handle, ErrorCode> {
    let to = Handle::parse(to).map_err(|_| ErrorCode::InvalidHandle)?;
    if to.domain() != state.settings.domain {
        if !state.federation.is_peer(to.domain()) {
            return Err(ErrorCode::UnknownDomain);
        }
        // The recipient's broker knows the account and its devices; the federation peer
        // checks the device set against what it learns from there.
        check_fields(class, ttl_secs, copies)?;
        return Ok(to);
    }
    validate_local(state, to, class, ttl_secs, copies)
}

/// Checks a send to a local recipient (from a device, or from a federation peer).
pub(crate) fn validate_local(
    state: &AppState,
    to: Handle,
    class: Class,
    ttl_secs: u32,
    copies: &[Copy],
) -> Result<Handle, ErrorCode> {
    if to.domain() != state.settings.domain {
        return Err(ErrorCode::UnknownDomain);
    }
    check_fields(class, ttl_secs, copies)?;
    // A live mailbox means the account exists (mailboxes are spawned only for accounts).
    if state.mailboxes.is_live(to.as_str()) {
        return Ok(to);
    }
    match answered_inline(state.store.directory.account(to.as_str())) {
        Ok(Some(_)) => Ok(to),
        Ok(None) => Err(ErrorCode::UnknownRecipient),
        Err(_) => Err(ErrorCode::StoreUnavailable),
    }
}

/// The checks of a send that need no account.
fn check_fields(class: Class, ttl_secs: u32, copies: &[Copy]) -> Result<(), ErrorCode> {
    let max_ttl = match class {
        Class::Durable => MAX_DURABLE_TTL_SECS,
        Class::Urgent | Class::Ephemeral => MAX_URGENT_TTL_SECS,
    };
    if ttl_secs == 0 || ttl_secs > max_ttl {
        return Err(ErrorCode::InvalidTtl);
    }
    if copies.is_empty() || copies.len() > MAX_DEVICES_PER_USER {
        return Err(ErrorCode::InvalidCopies);
    }
    let mut devices: Vec<u32> = copies.iter().map(|c| c.device.0).collect();
    devices.sort_unstable();
    devices.dedup();
    if devices.len() != copies.len() {
        return Err(ErrorCode::InvalidCopies);
    }
    if copies
        .iter()
        .any(|c| c.ciphertext.len() > MAX_CIPHERTEXT_BYTES)
    {
        return Err(ErrorCode::EnvelopeTooLarge);
    }
    Ok(())
}

/// Admits a sealed envelope (or a key claim) for `to`: a valid delivery token, or no token
/// for a recipient that accepts sealed envelopes from anyone (then limited per source IP).
///
/// For a recipient on a peer domain only the source limit applies here: its own broker holds
/// the token's hash and checks the token, which travels with the envelope.
pub(crate) fn admit_sealed(
    state: &AppState,
    to: &Handle,
    token: Option<&[u8]>,
    ip: Option<IpAddr>,
) -> Result<(), ErrorCode> {
    if to.domain() != state.settings.domain {
        return match (token, ip) {
            (None, Some(ip)) if !state.limits.allow_stranger(ip) => Err(ErrorCode::RateLimited),
            _ => Ok(()),
        };
    }
    let record = answered_inline(state.store.directory.delivery_token(to.as_str()))
        .map_err(|_| ErrorCode::StoreUnavailable)?
        .unwrap_or(crate::store::DeliveryTokenRecord {
            version: crate::store::records::RECORD_VERSION,
            token_hash: None,
            unrestricted: false,
        });
    match token {
        Some(token) => {
            let ok = record
                .token_hash
                .is_some_and(|stored| state.hasher.verify_delivery_token(token, &stored));
            if ok {
                Ok(())
            } else {
                Err(ErrorCode::BadDeliveryToken)
            }
        }
        None if record.unrestricted => match ip {
            Some(ip) if !state.limits.allow_stranger(ip) => Err(ErrorCode::RateLimited),
            _ => Ok(()),
        },
        None => Err(ErrorCode::BadDeliveryToken),
    }
}

/// Enqueues a send from an authenticated device to the recipient's mailbox (or federation
/// peer) now, so a connection's sends keep their order, and returns the future of its result.
pub(crate) fn submit(
    state: &AppState,
    to: Handle,
    id: EnvelopeId,
    class: Class,
    ttl_secs: u32,
    copies: Vec<Copy>,
) -> PendingSend {
    submit_as(state, to, id, class, ttl_secs, copies, Admission::Origin)
}

/// [`submit`] for a sealed send, admitted by `delivery_token` (or none).
pub(crate) fn submit_sealed(
    state: &AppState,
    to: Handle,
    id: EnvelopeId,
    class: Class,
    ttl_secs: u32,
    copies: Vec<Copy>,
    delivery_token: Option<Vec<u8>>,
) -> PendingSend {
    let admission = delivery_token.map_or(Admission::Open, Admission::Token);
    submit_as(state, to, id, class, ttl_secs, copies, admission)
}

fn submit_as(
    state: &AppState,
    to: Handle,
    id: EnvelopeId,
    class: Class,
    ttl_secs: u32,
    copies: Vec<Copy>,
    admission: Admission,
) -> PendingSend {
    if to.domain() != state.settings.domain {
        let answer = state
            .federation
            .submit(&to, id, class, ttl_secs, copies, admission);
        return Box::pin(async move { (id, answer.await) });
    }
    submit_local(state, to, id, class, ttl_secs, copies, None)
}

/// Enqueues a send to a local mailbox now and returns the future of its result.
pub(crate) fn submit_local(
    state: &AppState,
    to: Handle,
    id: EnvelopeId,
    class: Class,
    ttl_secs: u32,
    copies: Vec<Copy>,
    origin: Option<Arc<str>>,
) -> PendingSend {
    let delivery = Delivery {
        id,
        class,
        ttl_secs,
        copies: Arc::new(copies),
        origin,
    };
    let answer = state.mailboxes.submit(to.as_str(), delivery);
    Box::pin(async move { (id, answer.await) })
}
