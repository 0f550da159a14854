//! Delivery and read receipts, and the typing indicator: end-to-end encrypted payloads between
//! the two sides of a conversation, never shown to the broker in clear.
//!
//! ```text
//! alice: start_send ─▶ Sending ─▶ broker accepts ─▶ Sent
//! bob:   decrypts a text/file ─▶ owes "delivered" ─┐   mark_read(alice) ─▶ owes "read"
//!                                                  ▼                        ▼
//!                           take_receipts ─▶ Receipt{Delivered|Read, ids} to alice's devices
//! alice: Receipt ─▶ Delivered / Read on the stored messages, Event::Receipt
//! ```
//!
//! - **Which messages.** Only texts and files from a contact are acknowledged. Receipts,
//!   typing, timers, tokens and calls are not: a receipt never causes a receipt, so two
//!   devices cannot loop.
//! - **Batched and delayed.** Receipts owed to a contact wait in the record (a crash keeps
//!   them) for a random delay drawn when the first of them is owed
//!   ([`Timing::receipt_delay_ms`](super::Timing::receipt_delay_ms), default
//!   [`DEFAULT_RECEIPT_DELAY_MS`](super::schedule::DEFAULT_RECEIPT_DELAY_MS)); then the
//!   driver takes them ([`Engine::take_receipts`], at [`Engine::next_receipts_due_ms`]): one
//!   payload per contact and kind names up to [`MAX_RECEIPT_IDS`] messages. Taken receipts
//!   are the driver's to send; one lost with a failed send is not sent again (a receipt is a
//!   courtesy, not a message).
//! - **Read receipts off** ([`Engine::set_read_receipts`]): none are sent, and — as in
//!   Signal — others' read receipts are not shown either (the messages stay
//!   [`MessageState::Delivered`]), so that nobody learns more than they tell. Delivered
//!   receipts always go.
//! - **Who gets them.** The sender's account (all its devices), like any payload: the sending
//!   device moves its message on. Other devices of the sender stored the message from a
//!   transcript under the transcript's id, so they do not match it and show it as sent.
//! - **Metadata.** A receipt travels sealed when this device holds the sender's delivery token
//!   (the usual case: a contact shares it before its first message). Still, a receipt is a
//!   sealed send *to the original sender*, and one sent right after a delivery would let the
//!   broker pair the delivery with the account that answers it — the attack on Signal's
//!   sealed sender through its delivery receipts (Martiny et al., NDSS 2021). The random delay
//!   and batching blur that pairing for a single message; over many messages the correlation
//!   remains statistical, which is the price of showing "delivered" at all. (Read receipts
//!   follow the user's reading, not the delivery, and take the same delay.)
//!
//! Typing ([`Engine::typing_outgoing`]) goes in the ephemeral class (only connected devices get
//! it, never stored) and produces [`Event::Typing`] only: nothing is stored.

use sealpost_proto::EnvelopeId;
use serde_bytes::ByteBuf;

use super::{
    Engine, Event, MessageState,
    send::{Delivery, Outgoing},
};
use crate::crypto::{MAX_RECEIPT_IDS, Payload, ReceiptKind};

impl Engine {
    /// Whether this user sends read receipts (and sees others'); on by default.
    pub fn read_receipts(&self) -> bool {
        !self.record.read_receipts_off
    }

    /// Turns read receipts on or off (persisted; see the module doc). Turning them off drops
    /// read receipts not yet taken.
    pub fn set_read_receipts(&mut self, on: bool) {
        self.record.read_receipts_off = !on;
        if !on {
            for owed in self.record.receipts.values_mut() {
                owed.read.clear();
            }
            self.record
                .receipts
                .retain(|_, o| !o.delivered.is_empty() || !o.read.is_empty());
        }
    }

    /// The user has seen the conversation with `peer`: its incoming messages become
    /// [`MessageState::Read`], and a read receipt is owed for them (unless read receipts are
    /// off; then [`Engine::take_receipts`]). Returns the messages newly read. Save afterwards.
    pub fn mark_read(&mut self, peer: &str, now_ms: u64) -> Vec<EnvelopeId> {
        let Some(contact) = self.record.contacts.get_mut(peer) else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for m in &mut contact.messages {
            if m.outgoing
                || m.timer_secs.is_some()
                || MessageState::from_wire(m.state, false) == MessageState::Read
            {
                continue;
            }
            m.state = MessageState::Read.to_wire();
            if let Some(id) = m.envelope_id() {
                ids.push(id);
            }
        }
        if !ids.is_empty() && self.read_receipts() {
            let owed = self.owed_to(peer, now_ms);
            owed.read
                .extend(ids.iter().map(|id| ByteBuf::from(id.0.to_vec())));
        }
        ids
    }

    /// What is owed to `peer`, its delay drawn if nothing was owed yet.
    fn owed_to(&mut self, peer: &str, now_ms: u64) -> &mut super::record::OwedReceipts {
        let delay = super::schedule::between(self.timing.receipt_delay_ms);
        self.record
            .receipts
            .entry(peer.to_owned())
            .or_insert_with(|| super::record::OwedReceipts {
                due_ms: now_ms.saturating_add(delay),
                ..Default::default()
            })
    }

    /// When the first owed receipts are due (ms since the Unix epoch), if any are owed.
    pub fn next_receipts_due_ms(&self) -> Option<u64> {
        self.record.receipts.values().map(|o| o.due_ms).min()
    }

    /// Whether receipts are owed, due or not (see [`Engine::take_receipts`]).
    pub fn owes_receipts(&self) -> bool {
        !self.record.receipts.is_empty()
    }

    /// The receipts due by `now_ms`, taken out of the record: (contact, envelope) pairs to send
    /// to each contact's account (durable). Save afterwards.
    pub fn take_receipts(&mut self, now_ms: u64) -> Vec<(String, Outgoing)> {
        let mut out = Vec::new();
        let (due, later) = std::mem::take(&mut self.record.receipts)
            .into_iter()
            .partition::<Vec<_>, _>(|(_, owed)| owed.due_ms <= now_ms);
        self.record.receipts = later.into_iter().collect();
        for (peer, owed) in due {
            for (kind, ids) in [
                (ReceiptKind::Delivered, owed.delivered),
                (ReceiptKind::Read, owed.read),
            ] {
                let ids: Vec<[u8; 16]> = ids
                    .iter()
                    .filter_map(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
                    .collect();
                for chunk in ids.chunks(MAX_RECEIPT_IDS) {
                    let payload = Payload::Receipt {
                        kind,
                        ids: chunk.to_vec(),
                    };
                    out.push((peer.clone(), Outgoing::payload(payload)));
                }
            }
        }
        out
    }

    /// The typing indicator for a contact (`on`: typing now): an ephemeral envelope, see
    /// [`Outgoing::typing`].
    pub fn typing_outgoing(&self, on: bool) -> Outgoing {
        Outgoing::typing(on)
    }

    /// A received message of `from` (a text or a file) was stored: a delivered receipt is
    /// owed for it.
    pub(crate) fn owe_delivered(&mut self, from: &str, id: EnvelopeId, now_ms: u64) {
        let owed = self.owed_to(from, now_ms);
        owed.delivered.push(ByteBuf::from(id.0.to_vec()));
    }

    /// A receipt from `peer` for messages this account sent it.
    pub(crate) fn apply_receipt(
        &mut self,
        peer: &str,
        kind: ReceiptKind,
        ids: &[[u8; 16]],
    ) -> Vec<Event> {
        let state = match kind {
            ReceiptKind::Delivered => MessageState::Delivered,
            // Not shown while our own read receipts are off (see the module doc).
            ReceiptKind::Read if !self.read_receipts() => return Vec::new(),
            ReceiptKind::Read => MessageState::Read,
        };
        let Some(contact) = self.record.contacts.get_mut(peer) else {
            return Vec::new();
        };
        let mut changed = Vec::new();
        for m in contact.messages.iter_mut().filter(|m| m.outgoing) {
            let Some(id) = ids.iter().find(|id| m.has_id(id)) else {
                continue;
            };
            if MessageState::from_wire(m.state, true) < state {
                m.state = state.to_wire();
                changed.push(EnvelopeId(*id));
            }
        }
        if changed.is_empty() {
            return Vec::new();
        }
        vec![Event::Receipt {
            peer: peer.to_owned(),
            ids: changed,
            state,
        }]
    }

    /// The broker accepted the envelope `id`: the message it carries (if this device stored
    /// one) becomes [`MessageState::Sent`]. Returns the event for the application, if a
    /// message changed. The SDK calls it on every accepted send; a driver that reads the
    /// broker's answers itself (the browser page) calls it on `send_result`.
    pub fn message_accepted(&mut self, id: EnvelopeId) -> Option<Event> {
        self.chain_accepted(id);
        for (peer, contact) in &mut self.record.contacts {
            if let Some(m) = contact
                .messages
                .iter_mut()
                .rev()
                .find(|m| m.outgoing && m.has_id(&id.0))
            {
                if MessageState::from_wire(m.state, true) >= MessageState::Sent {
                    return None;
                }
                m.state = MessageState::Sent.to_wire();
                return Some(Event::Receipt {
                    peer: peer.clone(),
                    ids: vec![id],
                    state: MessageState::Sent,
                });
            }
        }
        None
    }
}

impl Outgoing {
    /// The typing indicator (`on`: typing now), in the ephemeral class: delivered only to
    /// connected devices, never stored, and so possibly lost.
    ///
    /// Losing it cannot desynchronise the pairwise session. It is an ordinary Olm message of
    /// the session the next text uses, and the Olm Double Ratchet is built for lost and
    /// reordered messages: the receiver derives and keeps the keys of skipped messages of a
    /// chain (vodozemac bounds how many), a new ratchet step only needs the next message that
    /// arrives, and until the peer has replied every message — this one or the next — is a
    /// pre-key message that carries what is needed to start the session. So a lost typing
    /// envelope costs one skipped message key, never the conversation; the engine tests send
    /// one that is dropped before the first text of a session and after it.
    pub fn typing(on: bool) -> Self {
        Self::with(Payload::Typing { on }, Delivery::EPHEMERAL)
    }
}
