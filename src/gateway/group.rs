//! One upload, many recipients: a `group_send` (an MLS group message) becomes one [`Send`] per
//! local recipient, routed to its mailbox as a `send` to it would be, and one outbox entry per
//! peer domain holding the ciphertext once for all the recipients there (the receiving broker
//! fans it out), all under the same envelope id. Every recipient's copies are stored with the
//! guarantees of a 1:1 send (idempotent by id, durable before the answer, quota, TTL, its
//! device set checked); the answer lists the recipients that were refused.
//!
//! ```text
//!                                                              ┌─▶ local recipient: route(Send) ─▶ mailbox ──────┐
//! ClientFrame::GroupSend ─▶ check fields ─▶ [order at the hub] ┤                                                  ├─▶ join ─▶ group_send_result
//!                                                              └─▶ peer domain: GroupEnqueue ─▶ one outbox entry ─┘
//! ```
//!
//! Handshake messages carry an [`Order`]: the group's hub (a broker of the creator's domain)
//! takes the epoch for the first send that asks, and refuses every other with `stale_epoch`
//! (see `hub`), before anything is stored.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use futures_util::future::join_all;
use sealpost_proto::{
    Class, ClientFrame, Copy, EnvelopeId, ErrorCode, GroupRecipient, Handle, Order,
    RecipientRefusal, SendOutcome, ServerFrame,
    federation::LinkFrame,
    limits::{
        MAX_DURABLE_TTL_SECS, MAX_GROUP_CIPHERTEXT_BYTES, MAX_GROUP_DEVICES, MAX_GROUP_RECIPIENTS,
    },
};

use super::{
    AppState,
    pending::{Answer, Pending, PendingGroup},
    route::{From, Presented, Send, admit_sealed, check_devices, check_ttl, give_back_on_answer},
};
use crate::{
    clock::now_ms,
    federation::messages::{GroupEnqueue, GroupTo, Request},
    socket::Writer,
    store::EpochTaken,
};

/// The outcomes of a group send for some of its recipients: one local recipient, or the
/// recipients on one peer domain.
type RecipientAnswers = crate::federation::PendingOutcomes;

/// A `group_send` as it reaches the gateway.
pub(crate) struct GroupSend {
    pub(crate) id: EnvelopeId,
    pub(crate) class: Class,
    pub(crate) ttl_secs: u32,
    pub(crate) ciphertext: Vec<u8>,
    pub(crate) recipients: Vec<GroupRecipient>,
    pub(crate) order: Option<Order>,
}

/// Where a group send came from.
#[derive(Clone, Copy)]
pub(crate) enum GroupFrom {
    /// An authenticated device (`/v1/ws`): its connection admits every recipient.
    Device,
    /// The anonymous endpoint: each recipient is admitted by its own delivery token.
    Sealed { ip: Option<IpAddr> },
}

/// Takes a decoded `group_send` from a connection: routed (its answer comes through
/// `pending`), or refused whole at once.
pub(crate) async fn take(
    state: &AppState,
    frame: ClientFrame,
    from: GroupFrom,
    pending: &mut Pending,
    out: &mut Writer,
) {
    let ClientFrame::GroupSend {
        id,
        class,
        ttl_secs,
        ciphertext,
        recipients,
        order,
    } = frame
    else {
        return;
    };
    let send = GroupSend {
        id,
        class,
        ttl_secs,
        ciphertext,
        recipients,
        order,
    };
    match state.route_group(send, from).await {
        Ok(answer) => pending.push(Answer::Group(answer)),
        Err((code, epoch)) => {
            let _ = out.binary(refused(id, code, epoch).encode()).await;
        }
    }
}

/// The answer to a group send refused as a whole.
pub(crate) fn refused(id: EnvelopeId, code: ErrorCode, epoch: Option<u64>) -> ServerFrame {
    crate::telemetry::reject(code.as_str());
    ServerFrame::GroupSendResult {
        id,
        code: Some(code),
        refused: Vec::new(),
        epoch,
    }
}

impl AppState {
    /// Checks a group send, has its order taken at the hub if it asks, and routes it to every
    /// recipient; resolves once each is handed over, to the future of the answer. Refused as a
    /// whole: the code, and with `stale_epoch` the group's current epoch.
    pub(crate) async fn route_group(
        &self,
        send: GroupSend,
        from: GroupFrom,
    ) -> Result<PendingGroup, (ErrorCode, Option<u64>)> {
        let GroupSend {
            id,
            class,
            ttl_secs,
            ciphertext,
            recipients,
            order,
        } = send;
        check_recipients(class, ttl_secs, &ciphertext, &recipients).map_err(|code| (code, None))?;
        if let Some(order) = order {
            // Everything a recipient's route would refuse for the send itself is refused
            // before the hub takes an epoch for it: a junk Commit takes none.
            check_ordered(class, ttl_secs, &recipients).map_err(|code| (code, None))?;
            if let GroupFrom::Sealed { .. } = from {
                self.admit_sealed_commit(&recipients)
                    .await
                    .map_err(|code| (code, None))?;
            }
            self.order_epoch(&order, id).await?;
        }
        let ciphertext = Arc::new(ciphertext);
        let mut answers: Vec<RecipientAnswers> = Vec::with_capacity(recipients.len());
        let mut refused = Vec::new();
        // Recipients of other domains, by domain: one outbox entry for each domain.
        let mut remote: BTreeMap<String, Vec<GroupTo>> = BTreeMap::new();
        for recipient in recipients {
            let to = recipient.to.clone();
            let from = match from {
                GroupFrom::Device => From::Device,
                GroupFrom::Sealed { ip } => From::Sealed {
                    token: recipient.delivery_token,
                    ip,
                },
            };
            let domain = match Handle::parse(&to) {
                Ok(handle) => handle.domain().to_owned(),
                Err(_) => {
                    refused.push(refusal(to, ErrorCode::InvalidHandle, Vec::new()));
                    continue;
                }
            };
            if domain != self.settings.domain {
                let admission = if self.federation.is_peer(&domain) {
                    self.remote_admission(from)
                } else {
                    Err(ErrorCode::UnknownDomain)
                };
                match admission {
                    Ok(admission) => remote.entry(domain).or_default().push(GroupTo {
                        to,
                        devices: recipient.devices,
                        admission,
                    }),
                    Err(code) => refused.push(refusal(to, code, Vec::new())),
                }
                continue;
            }
            // The copies are made once there is room for them.
            let room = self
                .fanout_room(ciphertext.len() * recipient.devices.len())
                .await;
            let send = Send {
                id,
                to: recipient.to,
                class,
                ttl_secs,
                copies: recipient
                    .devices
                    .iter()
                    .map(|&device| Copy {
                        device,
                        ciphertext: ciphertext.as_ref().clone(),
                    })
                    .collect(),
                from,
                copy_limit: MAX_GROUP_CIPHERTEXT_BYTES,
            };
            match self.route(send).await {
                Ok(answer) => {
                    let answer = give_back_on_answer(answer, room);
                    answers.push(Box::pin(async move { vec![(to, answer.await.1)] }));
                }
                Err(code) => refused.push(refusal(to, code, Vec::new())),
            }
        }
        for (domain, recipients) in remote {
            let send = GroupEnqueue {
                id,
                class,
                ttl_secs,
                ciphertext: ciphertext.clone(),
                recipients,
            };
            answers.push(self.federation.submit_group(&domain, send));
        }
        Ok(Box::pin(async move {
            for (to, outcome) in join_all(answers).await.into_iter().flatten() {
                if let SendOutcome::Rejected {
                    code,
                    current_devices,
                } = outcome
                {
                    refused.push(refusal(to, code, current_devices));
                }
            }
            ServerFrame::GroupSendResult {
                id,
                code: None,
                refused,
                epoch: None,
            }
        }))
    }
}

impl AppState {
    /// Admits a sealed Commit before its epoch is taken: at least one recipient of this
    /// domain presents a valid delivery token, and none presents a bad one. A member's
    /// Commit always does: it addresses the member's own account under its own token, on its
    /// own broker. Without it, anyone who learnt a group's id could take the group's epochs
    /// with junk sealed Commits whose every recipient is then refused, and the members'
    /// own Commits would lose to a winner that never arrives. (Recipients without a token,
    /// of accounts that accept anyone, are admitted by their route as before: checking them
    /// here would spend their sender's allowance twice.)
    async fn admit_sealed_commit(&self, recipients: &[GroupRecipient]) -> Result<(), ErrorCode> {
        let mut admitted = false;
        for recipient in recipients {
            let Some(token) = recipient.delivery_token.as_deref() else {
                continue;
            };
            let Ok(to) = Handle::parse(&recipient.to) else {
                continue;
            };
            if to.domain() != self.settings.domain {
                continue;
            }
            admit_sealed(self, &to, Some(Presented::Token(token)), None).await?;
            admitted = true;
        }
        if admitted {
            Ok(())
        } else {
            Err(ErrorCode::BadDeliveryToken)
        }
    }

    /// Has `order` taken at the group's hub: here, or asked of the hub's broker over the
    /// federation link. `Err((stale_epoch, Some(current)))` when another Commit has it.
    async fn order_epoch(
        &self,
        order: &Order,
        id: EnvelopeId,
    ) -> Result<(), (ErrorCode, Option<u64>)> {
        if order.hub == self.settings.domain {
            return self.take_epoch_here(&order.group, order.epoch, id).await;
        }
        if !self.federation.is_peer(&order.hub) {
            return Err((ErrorCode::UnknownDomain, None));
        }
        let request = Request::TakeEpoch {
            group: order.group.clone(),
            epoch: order.epoch,
            id,
        };
        match self.federation.request(&order.hub, request).await {
            Ok(LinkFrame::Epoch { taken: true, .. }) => Ok(()),
            Ok(LinkFrame::Epoch { current, .. }) => Err((ErrorCode::StaleEpoch, Some(current))),
            Ok(LinkFrame::Refused { code, .. }) | Err(code) => Err((code, None)),
            Ok(_) => Err((ErrorCode::PeerUnavailable, None)),
        }
    }

    /// At the hub: takes the epoch for a Commit of one of this broker's groups, from a local
    /// device or a peer's. Commits are limited per group.
    pub(crate) async fn take_epoch_here(
        &self,
        group: &[u8],
        epoch: u64,
        id: EnvelopeId,
    ) -> Result<(), (ErrorCode, Option<u64>)> {
        if !self.limits.allow_commit(group) {
            return Err((ErrorCode::RateLimited, None));
        }
        let taken = self
            .store
            .directory
            .take_epoch(group, epoch, id.0, now_ms())
            .await;
        match taken {
            Ok(EpochTaken::Taken) => {
                metrics::counter!("sealpost_group_epochs_total").increment(1);
                Ok(())
            }
            Ok(EpochTaken::Stale { current }) => Err((ErrorCode::StaleEpoch, Some(current))),
            Err(_) => Err((ErrorCode::StoreUnavailable, None)),
        }
    }
}

fn refusal(
    to: String,
    code: ErrorCode,
    current_devices: Vec<sealpost_proto::DeviceId>,
) -> RecipientRefusal {
    crate::telemetry::reject(code.as_str());
    RecipientRefusal {
        to,
        code,
        current_devices,
    }
}

/// The checks of an ordered group send (a Commit) before its epoch is taken: a durable class
/// and time-to-live, and valid recipient handles.
fn check_ordered(
    class: Class,
    ttl_secs: u32,
    recipients: &[GroupRecipient],
) -> Result<(), ErrorCode> {
    if class != Class::Durable || ttl_secs == 0 || ttl_secs > MAX_DURABLE_TTL_SECS {
        return Err(ErrorCode::InvalidTtl);
    }
    if recipients
        .iter()
        .any(|r| sealpost_proto::Handle::parse(&r.to).is_err())
    {
        return Err(ErrorCode::InvalidHandle);
    }
    Ok(())
}

/// The checks of a group send that need no account: its time-to-live and size, and each
/// recipient once with 1 to `MAX_DEVICES_PER_USER` distinct devices (per-recipient checks
/// follow in `route`, or at the recipient's broker).
fn check_recipients(
    class: Class,
    ttl_secs: u32,
    ciphertext: &[u8],
    recipients: &[GroupRecipient],
) -> Result<(), ErrorCode> {
    check_ttl(class, ttl_secs)?;
    if ciphertext.len() > MAX_GROUP_CIPHERTEXT_BYTES {
        return Err(ErrorCode::EnvelopeTooLarge);
    }
    if recipients.is_empty() || recipients.len() > MAX_GROUP_RECIPIENTS {
        return Err(ErrorCode::InvalidRecipients);
    }
    let devices: usize = recipients.iter().map(|r| r.devices.len()).sum();
    if devices > MAX_GROUP_DEVICES {
        return Err(ErrorCode::InvalidRecipients);
    }
    let mut seen = HashSet::with_capacity(recipients.len());
    for r in recipients {
        if !seen.insert(r.to.as_str()) {
            return Err(ErrorCode::InvalidRecipients);
        }
        check_devices(r.devices.iter().copied())?;
    }
    Ok(())
}
