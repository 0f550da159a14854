//! What the engine reports to the application: events of received envelopes, conversations,
//! devices. Shared by the network SDK and the browser wrapper.

use sealpost_proto::EnvelopeId;

use crate::{
    crypto::{FileRef, Payload},
    error::EnvelopeError,
};

/// What reading the broker's frames produced (the SDK's `Client::next_event`).
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A message from a contact.
    Message(ReceivedMessage),
    /// A file from a contact: where it is and how to open it (the SDK downloads it).
    File {
        /// The sender (verified).
        from: String,
        /// The sender's device.
        device: u32,
        /// The sender's clock, ms since the Unix epoch.
        sent_ms: u64,
        /// The attachment.
        file: FileRef,
    },
    /// The account's history, sent by another of its devices for this one (just linked):
    /// fetch it and [`import`](super::Engine::import_history) it (the SDK's
    /// `Client::import_history`).
    History {
        /// The device that sent it.
        from_device: u32,
        /// The archive.
        file: FileRef,
    },
    /// A message this account sent from another of its devices.
    SentElsewhere {
        /// The recipient.
        to: String,
        /// The sending device.
        device: u32,
        /// The text.
        text: String,
        /// The sender's clock, ms since the Unix epoch.
        sent_ms: u64,
    },
    /// A device was linked to this account (by this device or another one).
    DeviceLinked {
        /// The new device.
        device: u32,
    },
    /// This device, being linked, received the account's keys: it is now a full device.
    Linked,
    /// An envelope that cannot be read yet, for a reason about its sender: it is kept,
    /// still sealed, acked, and read later, its messages then coming as usual. Later
    /// envelopes from the same sender wait behind it, so they stay in order.
    Held {
        /// Its id.
        id: EnvelopeId,
        /// The claimed sender.
        user: String,
        /// Why, and so when it is read again.
        why: HoldReason,
    },
    /// A delivered envelope was rejected (and acked).
    Rejected {
        /// Its id.
        id: EnvelopeId,
        /// Why.
        error: EnvelopeError,
    },
    /// Call signaling from a contact's verified device, or (for
    /// [`Payload::AnsweredElsewhere`]) from another device of this account.
    Call(CallSignal),
    /// Something happened in a group (a message, a member change, joining or leaving).
    Group(super::groups::GroupEvent),
    /// Messages this account sent to `peer` moved on: decrypted by a device of `peer`
    /// ([`MessageState::Delivered`]) or read there ([`MessageState::Read`]); or, from
    /// [`Engine::message_accepted`](super::Engine::message_accepted) only, accepted by the
    /// broker ([`MessageState::Sent`]: the SDK's sends return then, and report no event for
    /// it). `ids` are the ids of [`ConversationMessage::id`]; the stored messages carry the
    /// new state already.
    Receipt {
        /// The conversation.
        peer: String,
        /// The messages whose state advanced.
        ids: Vec<EnvelopeId>,
        /// Their state now.
        state: MessageState,
    },
    /// A contact is (or stopped) typing to this account. Nothing is stored; an "off" may be
    /// lost (ephemeral), so a UI hides the indicator after a few seconds by itself.
    Typing {
        /// The contact.
        peer: String,
        /// Its device.
        device: u32,
        /// Typing now.
        on: bool,
    },
    /// The disappearing-messages timer of the conversation with `peer` was set by `by` (the
    /// peer, or this account on another device). The change is in the conversation as a
    /// line ([`ConversationMessage::timer_secs`]).
    Disappearing {
        /// The conversation.
        peer: String,
        /// Who set it.
        by: String,
        /// The timer, seconds; `None`: off.
        secs: Option<u32>,
    },
    /// Messages disappeared (their timer ran out) and are gone from the stored
    /// conversation: drop them from the screen.
    Expired {
        /// The conversation.
        peer: String,
        /// The messages ([`ConversationMessage::id`]).
        ids: Vec<EnvelopeId>,
    },
    /// Messages from `peer` that a later message of theirs named have not arrived: the
    /// broker may have withheld them (see the `chain` module). `count` is how many are
    /// missing now; 0 once they all arrived. A UI shows "a message from … may be missing"
    /// while it is above 0.
    MaybeMissing {
        /// The contact.
        peer: String,
        /// Messages from them named and not received.
        count: usize,
    },
    /// This account's own entry in its domain's key-transparency log holds a master key this
    /// device never made or saw made (its own devices' keys are known): someone with the
    /// broker may be impersonating the account. A UI says "a new key for your account was
    /// published at … — if it wasn't you, your contacts may be talking to someone else".
    ForeignKeyPublished {
        /// The log epoch that published it.
        epoch: u64,
        /// The entry's version.
        version: u64,
    },
    /// Everything queued when the connection opened has been handled.
    QueueEmpty,
    /// The broker refused a sender because this device's queue is full.
    MailboxFull,
    /// A send to `user` found devices the broker lists for that account but its signed
    /// device list does not contain: a device being linked right now, or one someone added
    /// with a stolen device token. They got a random placeholder, never the message (the
    /// engine encrypts only to keys the signed list vouches for). Reported once per device
    /// (see [`Engine::take_notices`](super::Engine::take_notices)), so a UI can show it
    /// every time it comes without nagging.
    ///
    /// What to tell the user: for a contact, ask them whether they are linking a device
    /// (then it is harmless and passes once it is linked); for this account
    /// (`own_account`), finish linking it, or remove it if it is not one of yours.
    UnlistedDevices {
        /// The account sent to.
        user: String,
        /// The devices, not reported before.
        devices: Vec<u32>,
        /// Whether `user` is this account.
        own_account: bool,
    },
}

/// Why an envelope is [held](Event::Held).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HoldReason {
    /// The sender's master key changed: read once the user accepts the new key
    /// (`Client::accept_master_key_change`).
    KeyChanged,
    /// The sender's device list cannot be had now (a broker, ours or the sender's behind it,
    /// did not answer): read again after the next backlog is handled.
    SenderUnavailable,
    /// Earlier envelopes from the same sender are held: read after them.
    Behind,
    /// The claimed device is not in the sender's list we hold (a new device, or a sender we
    /// hold no list of): read after the next refresh of contacts' lists, which is brought
    /// forward to a short random delay (see `engine::schedule`).
    AwaitingList,
}

/// A message received from a contact.
#[derive(Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The envelope id.
    pub id: EnvelopeId,
    /// The sender (verified).
    pub from: String,
    /// The sender's device.
    pub device: u32,
    /// The sender's clock, ms since the Unix epoch.
    pub sent_ms: u64,
    /// The text.
    pub text: String,
}

impl std::fmt::Debug for ReceivedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceivedMessage")
            .field("id", &self.id)
            .field("device", &self.device)
            .field("text_len", &self.text.len())
            .finish_non_exhaustive()
    }
}

/// Call signaling received ([`Event::Call`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSignal {
    /// The sender (verified): the peer, or this account for
    /// [`Payload::AnsweredElsewhere`].
    pub from: String,
    /// The sender's device. Answers, candidates and hang-ups of a call should come from the
    /// device that answered (or offered) it.
    pub device: u32,
    /// The sender's clock, ms since the Unix epoch: an offer older than
    /// [`CALL_TTL_SECS`](super::CALL_TTL_SECS) is no longer ringing.
    pub sent_ms: u64,
    /// One of the call kinds of [`Payload`].
    pub payload: Payload,
}

/// Where a message is on its way. Outgoing messages go `Sending` → `Sent` → `Delivered` →
/// `Read` (never back); incoming ones are `Delivered` until the user marks the conversation
/// read ([`Engine::mark_read`](super::Engine::mark_read)), then `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MessageState {
    /// Encrypted here, not (yet) accepted by the broker.
    Sending,
    /// Accepted by the broker (stored for every device of the recipient).
    Sent,
    /// Decrypted by a device of the recipient (an end-to-end encrypted receipt said so); for
    /// an incoming message: received, not yet read.
    Delivered,
    /// Read by the recipient (only shown while this user's read receipts are on); for an
    /// incoming message: read here.
    Read,
}

impl MessageState {
    pub(crate) fn to_wire(self) -> u8 {
        match self {
            MessageState::Sending => 0,
            MessageState::Sent => 1,
            MessageState::Delivered => 2,
            MessageState::Read => 3,
        }
    }

    /// The state stored as `byte`; messages stored before states were kept show as sent
    /// (outgoing) or read (incoming).
    pub(crate) fn from_wire(byte: u8, outgoing: bool) -> Self {
        match byte {
            0 => MessageState::Sending,
            1 => MessageState::Sent,
            2 => MessageState::Delivered,
            3 => MessageState::Read,
            _ if outgoing => MessageState::Sent,
            _ => MessageState::Read,
        }
    }

    /// A short lower-case name (`"sending"`, `"sent"`, `"delivered"`, `"read"`).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Sending => "sending",
            MessageState::Sent => "sent",
            MessageState::Delivered => "delivered",
            MessageState::Read => "read",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationMessage {
    /// Its envelope id: stable across restarts, named by [`Event::Receipt`] and
    /// [`Event::Expired`]. `None` for messages stored before ids were kept.
    pub id: Option<EnvelopeId>,
    /// Its delivery state (see [`MessageState`]).
    pub state: MessageState,
    /// When it disappears (ms since the Unix epoch, local clock), if it does.
    pub expires_ms: Option<u64>,
    /// `Some`: this line is not a message but a change of the disappearing-messages timer
    /// (seconds; 0: turned off), made by this account if `outgoing`, else by the contact.
    pub timer_secs: Option<u32>,
    /// True if this account sent it.
    pub outgoing: bool,
    /// The sending device.
    pub device: u32,
    /// The sender's clock, ms since the Unix epoch.
    pub time_ms: u64,
    /// The text.
    pub text: String,
    /// The file it was, if it was one (`text` then says how it shows).
    pub file: Option<FileRef>,
}

/// A conversation with one contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The contact.
    pub with: String,
    /// Whether the user verified the contact's safety number (false while the contact's
    /// master key changed and the new one is not accepted: the number verified is no longer
    /// theirs).
    pub verified: bool,
    /// Whether the contact's master key changed and the user has not accepted the new one
    /// ([`Engine::key_change`](super::Engine::key_change) tells the old and new safety
    /// numbers).
    pub key_changed: bool,
    /// The disappearing-messages timer, seconds (`None`: off).
    pub disappearing_secs: Option<u32>,
    /// Incoming messages not yet marked read.
    pub unread: usize,
    /// Messages from the contact that a later one named and that have not arrived (the
    /// broker may have withheld them).
    pub missing: usize,
    /// Messages, oldest first.
    pub messages: Vec<ConversationMessage>,
}

/// A device of this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device id.
    pub device: u32,
    /// Whether it is this device.
    pub this_device: bool,
    /// Whether the signed device list vouches for it (false: registered at the broker but
    /// not (yet) linked).
    pub signed: bool,
    /// Its Ed25519 key, hex (for telling devices apart).
    pub fingerprint: String,
}

impl super::Engine {
    /// Conversations, most recent first.
    pub fn conversations(&self) -> Vec<Conversation> {
        let own = self.user();
        let mut out: Vec<Conversation> = self
            .record
            .contacts
            .iter()
            .filter(|(with, c)| *with != own && !c.messages.is_empty())
            .map(|(with, c)| Conversation {
                with: with.clone(),
                verified: c.verified && c.pending_master_key.is_none(),
                key_changed: c.pending_master_key.is_some(),
                disappearing_secs: c.disappearing.map(|t| t.secs).filter(|s| *s > 0),
                unread: c
                    .messages
                    .iter()
                    .filter(|m| {
                        !m.outgoing
                            && m.timer_secs.is_none()
                            && MessageState::from_wire(m.state, false) != MessageState::Read
                    })
                    .count(),
                missing: self.missing_from(with),
                messages: c
                    .messages
                    .iter()
                    .map(|m| ConversationMessage {
                        id: m.envelope_id(),
                        state: MessageState::from_wire(m.state, m.outgoing),
                        expires_ms: m.expires_ms,
                        timer_secs: m.timer_secs,
                        outgoing: m.outgoing,
                        device: m.device,
                        time_ms: m.time_ms,
                        text: m.body.clone(),
                        file: m.file.clone(),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.messages.last().map_or(0, |m| m.time_ms)));
        out
    }
}
