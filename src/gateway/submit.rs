//! Checks and submission shared by the authenticated device session and the anonymous
//! sealed-send endpoint.

use std::{net::IpAddr, pin::Pin, sync::Arc};

use sealpost_proto::{
    Class, Copy, EnvelopeId, ErrorCode, Handle, SendOutcome,
    limits::{
        MAX_CIPHERTEXT_BYTES, MAX_DEVICES_PER_USER, MAX_DURABLE_TTL_SECS, MAX_URGENT_TTL_SECS,
    },
};

use super::AppState;
use crate::mailbox::messages::Submit;

/// A send awaiting its result from the recipient's mailbox.
pub(crate) type PendingSend = Pin<Box<dyn Future<Output = (EnvelopeId, SendOutcome)>>>;

/// Checks a send's fields before it reaches a mailbox; returns the recipient.
pub(crate) fn validate_send(
    state: &AppState,
    to: &str,
    class: Class,
    ttl_secs: u32,
    copies: &[Copy],
) -> Result<Handle, ErrorCode> {
    let to = Handle::parse(to).map_err(|_| ErrorCode::InvalidHandle)?;
    if to.domain() != state.settings.domain {
        return Err(ErrorCode::UnknownDomain);
    }
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
    // A live mailbox means the account exists (mailboxes are spawned only for accounts).
    if state.registry.get(to.as_str()).is_some() {
        return Ok(to);
    }
    match state.store.account(to.as_str()) {
        Ok(Some(_)) => Ok(to),
        Ok(None) => Err(ErrorCode::UnknownRecipient),
        Err(_) => Err(ErrorCode::StoreUnavailable),
    }
}

/// Admits a sealed envelope (or a key claim) for `to`: a valid delivery token, or no token
/// for a recipient that accepts sealed envelopes from anyone (then limited per source IP).
pub(crate) fn admit_sealed(
    state: &AppState,
    to: &Handle,
    token: Option<&[u8]>,
    ip: Option<IpAddr>,
) -> Result<(), ErrorCode> {
    let record = state
        .store
        .delivery_token(to.as_str())
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

/// Enqueues a send to the recipient's mailbox now (so a connection's sends keep their order)
/// and returns the future of its result.
pub(crate) fn submit(
    state: &AppState,
    to: Handle,
    id: EnvelopeId,
    class: Class,
    ttl_secs: u32,
    copies: Vec<Copy>,
) -> PendingSend {
    let registry = state.registry.clone();
    let msg = Submit {
        id,
        class,
        ttl_secs,
        copies: Arc::new(copies),
    };
    let first = registry.get_or_spawn(to.as_str()).send(msg.clone());
    Box::pin(async move {
        // Only a retry (the mailbox stopped meanwhile) goes through the registry again.
        let outcome = match first.await {
            Ok(outcome) => Ok(outcome),
            Err(_) => registry.call(to.as_str(), msg).await,
        };
        let outcome = outcome.unwrap_or_else(|_| SendOutcome::Rejected {
            code: ErrorCode::Internal,
            current_devices: Vec::new(),
        });
        (id, outcome)
    })
}
