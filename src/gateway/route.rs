//! One route per envelope. Every send — from an authenticated device (`/v1/ws`), from the
//! anonymous endpoint (`/v1/sealed`) or from a peer broker over its link — becomes one
//! [`Send`], is checked once by [`AppState::route`] and goes to exactly one place: the
//! recipient's mailbox, or the federation peer of the recipient's domain.
//!
//! ```text
//! ClientFrame::Send ─────┐
//! ClientFrame::SealedSend ─▶ Send { .., from } ─▶ route: fields ─▶ domain ─▶ admission ─┬─▶ Mailboxes::submit
//! FedEnvelope (inbound) ─┘                                   (account exists, local)    └─▶ Federation::submit
//! ```

use std::{net::IpAddr, sync::Arc};

use sealpost_proto::{
    Class, Copy, DeviceId, EnvelopeId, ErrorCode, Handle, SendOutcome,
    federation::Admission,
    limits::{
        MAX_DEVICES_PER_USER, MAX_DURABLE_TTL_SECS, MAX_GROUP_CIPHERTEXT_BYTES, MAX_URGENT_TTL_SECS,
    },
};

use super::AppState;

/// A send awaiting its answer from the recipient's mailbox or federation peer.
pub(crate) type PendingSend = std::pin::Pin<Box<dyn Future<Output = (EnvelopeId, SendOutcome)>>>;
use crate::{
    crypto::{TokenHasher, delivery_proof},
    mailbox::Delivery,
};

/// Where a send came from, which decides how it is admitted.
#[derive(Debug, Clone)]
pub(crate) enum From {
    /// An authenticated device of this broker (its account is known to the connection, not
    /// to the envelope).
    Device,
    /// The anonymous endpoint: admitted by the recipient's delivery token, or without one for
    /// a recipient who accepts sealed envelopes from anyone (limited per source address).
    Sealed {
        token: Option<Vec<u8>>,
        ip: Option<IpAddr>,
    },
    /// A peer broker over its authenticated link, with how that broker admitted it.
    Peer {
        origin: Arc<str>,
        admission: Admission,
    },
}

/// An envelope on its way to a recipient: one ciphertext per recipient device.
#[derive(Debug)]
pub(crate) struct Send {
    pub(crate) id: EnvelopeId,
    /// The recipient, as the sender wrote it (parsed here).
    pub(crate) to: String,
    pub(crate) class: Class,
    pub(crate) ttl_secs: u32,
    pub(crate) copies: Vec<Copy>,
    pub(crate) from: From,
    /// Largest ciphertext of one copy: `MAX_CIPHERTEXT_BYTES` for a `send`,
    /// [`MAX_GROUP_CIPHERTEXT_BYTES`] for a recipient of a `group_send` (an MLS Commit or
    /// Welcome can be hundreds of KiB). A peer's envelopes were checked by its broker against
    /// the kind of send they came in, so the larger limit applies to them.
    pub(crate) copy_limit: usize,
}

impl AppState {
    /// Checks `send` once and hands it to the recipient's mailbox or its domain's federation
    /// peer; resolves once it is handed over, to the future of its answer. A connection
    /// awaits this before it routes its next send, so that its sends keep their order (the
    /// checks may ask the store: at once for sled, over the network for NATS). A send refused
    /// by the checks resolves to the reason.
    pub(crate) async fn route(&self, send: Send) -> Result<PendingSend, ErrorCode> {
        let Send {
            id,
            to,
            class,
            ttl_secs,
            copies,
            from,
            copy_limit,
        } = send;
        let copy_limit = match from {
            From::Peer { .. } => MAX_GROUP_CIPHERTEXT_BYTES,
            _ => copy_limit,
        };
        let to = Handle::parse(&to).map_err(|_| ErrorCode::InvalidHandle)?;
        if to.domain() != self.settings.domain {
            // A peer delivers to its own users here, never through us to a third domain.
            if matches!(from, From::Peer { .. }) || !self.federation.is_peer(to.domain()) {
                return Err(ErrorCode::UnknownDomain);
            }
            // The recipient's broker knows the account and its devices; the federation peer
            // checks the device set against what it learns from there.
            check_fields(class, ttl_secs, &copies, copy_limit)?;
            let admission = self.remote_admission(from)?;
            let answer = self
                .federation
                .submit(&to, id, class, ttl_secs, copies, admission);
            return Ok(Box::pin(async move { (id, answer.await) }));
        }
        check_fields(class, ttl_secs, &copies, copy_limit)?;
        self.check_account(&to).await?;
        let origin = match from {
            From::Device => None,
            From::Sealed { token, ip } => {
                admit_sealed(self, &to, token.as_deref().map(Presented::Token), ip).await?;
                None
            }
            From::Peer { origin, admission } => {
                match admission {
                    // The origin broker authenticated the sender; which account it is, it does
                    // not say. The per-origin rate limit applies on the link.
                    Admission::Origin => {}
                    Admission::Token(proof) => {
                        admit_sealed(self, &to, Some(Presented::Proof(&proof)), None).await?;
                    }
                    Admission::Open => admit_sealed(self, &to, None, None).await?,
                }
                // The origin checked the device set when it accepted the envelope; devices
                // may have changed since (while it sat in the outbox): the mailbox gives the
                // devices that remain their copies rather than nobody any.
                Some(origin)
            }
        };
        let delivery = Delivery {
            id,
            class,
            ttl_secs,
            copies: Arc::new(copies),
            origin,
        };
        let answer = self.mailboxes.submit(to.as_str(), delivery);
        Ok(Box::pin(async move { (id, answer.await) }))
    }

    /// How a send from `from` to a user of a peer domain is admitted there. The recipient's
    /// broker holds the token's hash and checks the token's proof, which travels with the
    /// envelope; only the source limit of a sealed send without a token applies here.
    pub(super) fn remote_admission(&self, from: From) -> Result<Admission, ErrorCode> {
        match from {
            // A peer delivers to its own users here, never through us to a third domain.
            From::Peer { .. } => Err(ErrorCode::UnknownDomain),
            From::Device => Ok(Admission::Origin),
            From::Sealed { token, ip } => {
                if token.is_none()
                    && let Some(ip) = ip
                    && !self.limits.allow_stranger(ip)
                {
                    return Err(ErrorCode::RateLimited);
                }
                // What travels and waits in the outbox is the token's proof, never the token:
                // it is no use on anyone's `/v1/sealed`.
                Ok(token.map_or(Admission::Open, |t| {
                    Admission::Token(delivery_proof(&t).to_vec())
                }))
            }
        }
    }

    /// Room for `bytes` of group-message copies in the fan-out budget (at most the whole
    /// budget), held until the permit is dropped: once the copies are stored or refused.
    pub(super) async fn fanout_room(&self, bytes: usize) -> tokio::sync::OwnedSemaphorePermit {
        let n = bytes.min(self.settings.fanout_buffer_bytes);
        self.fanout
            .clone()
            .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
            .await
            .expect("the fan-out budget is never closed")
    }

    /// Whether a local recipient's account exists.
    async fn check_account(&self, to: &Handle) -> Result<(), ErrorCode> {
        // A live mailbox means the account exists (mailboxes are spawned only for accounts).
        if self.mailboxes.is_live(to.as_str()) {
            return Ok(());
        }
        match self.store.directory.account(to.as_str()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ErrorCode::UnknownRecipient),
            Err(_) => Err(ErrorCode::StoreUnavailable),
        }
    }
}

/// The checks of a send that need no account.
fn check_fields(
    class: Class,
    ttl_secs: u32,
    copies: &[Copy],
    copy_limit: usize,
) -> Result<(), ErrorCode> {
    check_ttl(class, ttl_secs)?;
    check_devices(copies.iter().map(|c| c.device))?;
    if copies.iter().any(|c| c.ciphertext.len() > copy_limit) {
        return Err(ErrorCode::EnvelopeTooLarge);
    }
    Ok(())
}

/// Awaits `answer` on a task of its own and gives its room in the fan-out budget back then:
/// the room must come back once the mailbox answers, not when someone gets round to polling
/// (a fan-out waiting for room would otherwise wait for itself).
pub(super) fn give_back_on_answer(
    answer: PendingSend,
    room: tokio::sync::OwnedSemaphorePermit,
) -> impl Future<Output = (EnvelopeId, SendOutcome)> {
    let task = actix::spawn(async move {
        let outcome = answer.await;
        drop(room);
        outcome
    });
    async move {
        task.await.unwrap_or_else(|_| {
            let outcome = SendOutcome::Rejected {
                code: ErrorCode::Internal,
                current_devices: Vec::new(),
            };
            (EnvelopeId([0; 16]), outcome)
        })
    }
}

/// A time-to-live within its class's limit.
pub(super) fn check_ttl(class: Class, ttl_secs: u32) -> Result<(), ErrorCode> {
    let max_ttl = match class {
        Class::Durable => MAX_DURABLE_TTL_SECS,
        Class::Urgent | Class::Ephemeral => MAX_URGENT_TTL_SECS,
    };
    if ttl_secs == 0 || ttl_secs > max_ttl {
        return Err(ErrorCode::InvalidTtl);
    }
    Ok(())
}

/// 1 to [`MAX_DEVICES_PER_USER`] devices of one recipient, each once.
pub(super) fn check_devices(devices: impl Iterator<Item = DeviceId>) -> Result<(), ErrorCode> {
    let mut devices: Vec<u32> = devices.map(|d| d.0).collect();
    let named = devices.len();
    devices.sort_unstable();
    devices.dedup();
    if named == 0 || named > MAX_DEVICES_PER_USER || devices.len() != named {
        return Err(ErrorCode::InvalidCopies);
    }
    Ok(())
}

/// A delivery token as it reaches the broker.
#[derive(Clone, Copy)]
pub(crate) enum Presented<'a> {
    /// From a client (`/v1/sealed`, a key claim): the token itself.
    Token(&'a [u8]),
    /// From a peer broker, over an authenticated link: the token's proof
    /// ([`delivery_proof`]), or the token itself from a peer of an earlier release.
    Proof(&'a [u8]),
}

impl Presented<'_> {
    /// Whether this matches the stored hash `stored` (of a proof if `of_proof`, else of a
    /// token), in constant time.
    fn matches(self, hasher: &TokenHasher, stored: &[u8; 32], of_proof: bool) -> bool {
        match (self, of_proof) {
            (Presented::Token(token), true) => {
                hasher.verify_delivery_token(&delivery_proof(token), stored)
            }
            (Presented::Token(token), false) => hasher.verify_delivery_token(token, stored),
            (Presented::Proof(proof), true) => {
                hasher.verify_delivery_token(proof, stored)
                    | hasher.verify_delivery_token(&delivery_proof(proof), stored)
            }
            (Presented::Proof(token), false) => hasher.verify_delivery_token(token, stored),
        }
    }
}

/// Admits a sealed envelope (or a key claim) for a local recipient `to`: a valid delivery
/// token (or a peer's proof of one), or none for a recipient that accepts sealed envelopes
/// from anyone (then limited per source IP).
pub(crate) async fn admit_sealed(
    state: &AppState,
    to: &Handle,
    presented: Option<Presented<'_>>,
    ip: Option<IpAddr>,
) -> Result<(), ErrorCode> {
    let record = state
        .store
        .directory
        .delivery_token(to.as_str())
        .await
        .map_err(|_| ErrorCode::StoreUnavailable)?;
    let (stored, of_proof, unrestricted) = record.map_or((None, false, false), |r| {
        (r.token_hash, r.of_proof, r.unrestricted)
    });
    match presented {
        Some(presented) => {
            let ok =
                stored.is_some_and(|stored| presented.matches(&state.hasher, &stored, of_proof));
            if ok {
                Ok(())
            } else {
                Err(ErrorCode::BadDeliveryToken)
            }
        }
        None if unrestricted => match ip {
            Some(ip) if !state.limits.allow_stranger(ip) => Err(ErrorCode::RateLimited),
            _ => Ok(()),
        },
        None => Err(ErrorCode::BadDeliveryToken),
    }
}

/// A send's answer where only the refusal matters (inbound federation).
pub(crate) fn refusal(outcome: SendOutcome) -> Option<ErrorCode> {
    match outcome {
        SendOutcome::Accepted { .. } => None,
        SendOutcome::Rejected { code, .. } => Some(code),
    }
}
