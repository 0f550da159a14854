//! Disappearing messages, per conversation.
//!
//! Either side sets a timer ([`Engine::set_disappearing`]): off, or
//! [`MIN_DISAPPEARING_SECS`] to [`MAX_DISAPPEARING_SECS`]. The setting is an end-to-end
//! encrypted payload ([`Payload::Disappearing`]) sent to the peer's devices and to this
//! account's other devices, and shows in the conversation of every one of them as a line
//! ([`ConversationMessage::timer_secs`](super::ConversationMessage::timer_secs)). When two
//! devices set it at about the same time, the setting with the later sender clock wins
//! everywhere (ties: the one read last).
//!
//! A message stored while a timer is set gets its expiry when it is stored, and keeps it if
//! the timer changes later (as in Signal, a change applies to what comes after it):
//!
//! - on the sending device and, from the transcript, on the sender's other devices: counted
//!   from when it was sent (the sender's clock);
//! - on every device of the recipient: counted from when it arrived there (the local clock).
//!   Signal counts from when it was read; arrival is simpler to reason about (a device that is
//!   never opened still forgets) and needs no read state on every device.
//!
//! The broker's copies are bounded the same way: a message envelope (and its transcript) is
//! sent with a time-to-live of the timer (at most the usual 30 days), so an undelivered copy
//! expires too. [`Engine::expire_messages`] deletes what is due from the stored conversations
//! and reports it ([`Event::Expired`]); the drivers run it at [`Engine::next_expiry_ms`].
//! Timer lines themselves stay, so the conversation says what happened.

use sealpost_proto::EnvelopeId;
use serde_bytes::ByteBuf;

use super::{
    Engine, Event, GroupEvent, MessageState,
    record::{DisappearingTimer, StoredMessage},
    send::Outgoing,
};
use crate::{crypto::Payload, crypto::SenderInfo, error::ClientError};

/// The shortest timer, seconds.
pub const MIN_DISAPPEARING_SECS: u32 = 30;
/// The longest timer, seconds (four weeks).
pub const MAX_DISAPPEARING_SECS: u32 = 4 * 7 * 24 * 3600;

/// Checks a timer: 0 (off) or within the bounds.
pub(crate) fn check_timer(secs: u32) -> Result<(), ClientError> {
    if secs == 0 || (MIN_DISAPPEARING_SECS..=MAX_DISAPPEARING_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(ClientError::Invalid(format!(
            "a disappearing-messages timer is off or {MIN_DISAPPEARING_SECS} s to \
             {MAX_DISAPPEARING_SECS} s"
        )))
    }
}

/// How a timer shows in a conversation line.
fn describe(secs: u32) -> String {
    if secs == 0 {
        return "disappearing messages off".into();
    }
    let (n, unit) = match secs {
        s if s % (7 * 24 * 3600) == 0 => (s / (7 * 24 * 3600), "week"),
        s if s % (24 * 3600) == 0 => (s / (24 * 3600), "day"),
        s if s % 3600 == 0 => (s / 3600, "hour"),
        s if s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    let plural = if n == 1 { "" } else { "s" };
    format!("messages disappear after {n} {unit}{plural}")
}

impl Engine {
    /// The disappearing-messages timer of the conversation with `peer`, seconds (`None`: off).
    pub fn disappearing(&self, peer: &str) -> Option<u32> {
        self.record
            .contacts
            .get(peer)
            .and_then(|c| c.disappearing)
            .map(|t| t.secs)
            .filter(|s| *s > 0)
    }

    /// Sets the timer of the conversation with `peer` (`None` or 0: off; else
    /// [`MIN_DISAPPEARING_SECS`] ..= [`MAX_DISAPPEARING_SECS`]), adds its line to the
    /// conversation, and returns the envelopes that tell the others: one to `peer`, and one to
    /// this account if it may have other devices. Send both, then save.
    pub fn set_disappearing(
        &mut self,
        peer: &str,
        secs: Option<u32>,
        now_ms: u64,
    ) -> Result<Vec<(String, Outgoing)>, ClientError> {
        super::check_handle(peer)?;
        let own = self.state.user().to_owned();
        if peer == own {
            return Err(ClientError::Invalid(
                "disappearing messages are set per contact".into(),
            ));
        }
        let secs = secs.unwrap_or(0);
        check_timer(secs)?;
        let me = SenderInfo {
            user: own.clone(),
            device: self.state.device_id(),
        };
        self.apply_timer(peer, &me, EnvelopeId(rand::random()), now_ms, secs);
        let mut out = vec![(
            peer.to_owned(),
            Outgoing::payload(Payload::Disappearing { secs, with: None }),
        )];
        if !self.record.lists.contains_key(&own) || self.has_other_devices() {
            out.push((
                own,
                Outgoing::payload(Payload::Disappearing {
                    secs,
                    with: Some(peer.to_owned()),
                }),
            ));
        }
        Ok(out)
    }

    /// A timer for the conversation with `peer`, set by `by` at `set_ms` (its clock): kept
    /// unless a later one is, with its line in the conversation.
    pub(crate) fn apply_timer(
        &mut self,
        peer: &str,
        by: &SenderInfo,
        id: EnvelopeId,
        set_ms: u64,
        secs: u32,
    ) -> Vec<Event> {
        let own = by.user == self.state.user();
        let contact = self.record.contacts.entry(peer.to_owned()).or_default();
        if contact.disappearing.is_some_and(|t| t.set_ms > set_ms) {
            return Vec::new(); // a later setting is in force
        }
        contact.disappearing = Some(DisappearingTimer { secs, set_ms });
        let mut line = StoredMessage::new(own, by.device, set_ms, describe(secs), None);
        line.id = Some(ByteBuf::from(id.0.to_vec()));
        line.state = if own {
            MessageState::Sent
        } else {
            MessageState::Read
        }
        .to_wire();
        line.timer_secs = Some(secs);
        self.record.add_message(peer, line);
        vec![Event::Disappearing {
            peer: peer.to_owned(),
            by: by.user.clone(),
            secs: (secs > 0).then_some(secs),
        }]
    }

    /// When a message stored now with `peer`, counted from `from_ms`, disappears.
    pub(crate) fn expiry_for(&self, peer: &str, from_ms: u64) -> Option<u64> {
        self.disappearing(peer)
            .map(|secs| from_ms.saturating_add(u64::from(secs) * 1000))
    }

    /// The broker time-to-live for a message to (or a transcript about) `peer`: `ttl_secs`,
    /// shortened to the conversation's timer.
    pub(crate) fn ttl_for(&self, peer: &str, ttl_secs: u32) -> u32 {
        self.disappearing(peer)
            .map_or(ttl_secs, |secs| secs.min(ttl_secs))
    }

    /// Deletes the messages whose time ran out by `now_ms`, reporting them per conversation.
    /// Save afterwards if anything was returned.
    pub fn expire_messages(&mut self, now_ms: u64) -> Vec<Event> {
        let (mut out, groups) = self.expire_missing(now_ms);
        out.extend(groups.into_iter().map(|g| {
            Event::Group(GroupEvent::MaybeMissing {
                group: g.group,
                from: g.from,
                count: g.count,
            })
        }));
        for (peer, contact) in &mut self.record.contacts {
            if !contact
                .messages
                .iter()
                .any(|m| m.expires_ms.is_some_and(|e| e <= now_ms))
            {
                continue;
            }
            let mut ids = Vec::new();
            contact.messages.retain(|m| {
                let expired = m.expires_ms.is_some_and(|e| e <= now_ms);
                if expired && let Some(id) = m.envelope_id() {
                    ids.push(id);
                }
                !expired
            });
            out.push(Event::Expired {
                peer: peer.clone(),
                ids,
            });
        }
        out
    }

    /// When the next stored message disappears (ms since the Unix epoch), if any will.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.record
            .contacts
            .values()
            .flat_map(|c| c.messages.iter())
            .filter_map(|m| m.expires_ms)
            .min()
    }

    /// Stores a message received from `from` (a text or a file) under its envelope id, with
    /// its expiry counted from now, and owes `from` a delivered receipt.
    pub(crate) fn store_received(
        &mut self,
        from: &str,
        id: EnvelopeId,
        mut message: StoredMessage,
        now_ms: u64,
    ) {
        message.id = Some(ByteBuf::from(id.0.to_vec()));
        message.state = MessageState::Delivered.to_wire();
        message.expires_ms = self.expiry_for(from, now_ms);
        self.record.add_message(from, message);
        self.owe_delivered(from, id, now_ms);
    }

    /// Stores a message this account sent to `to` from another device (a transcript), under
    /// the transcript's id, expiring as on the sending device (from when it was sent).
    pub(crate) fn store_transcript(
        &mut self,
        to: &str,
        id: EnvelopeId,
        mut message: StoredMessage,
    ) {
        message.id = Some(ByteBuf::from(id.0.to_vec()));
        message.state = MessageState::Sent.to_wire();
        message.expires_ms = self.expiry_for(to, message.time_ms);
        self.record.add_message(to, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_are_checked_and_described() {
        assert!(check_timer(0).is_ok());
        assert!(check_timer(29).is_err());
        assert!(check_timer(30).is_ok());
        assert!(check_timer(MAX_DISAPPEARING_SECS).is_ok());
        assert!(check_timer(MAX_DISAPPEARING_SECS + 1).is_err());
        assert_eq!(describe(3600), "messages disappear after 1 hour");
        assert_eq!(describe(90), "messages disappear after 90 seconds");
        assert_eq!(describe(14 * 24 * 3600), "messages disappear after 2 weeks");
        assert_eq!(describe(0), "disappearing messages off");
    }
}
