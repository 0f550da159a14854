//! Receiving: one delivered envelope at a time.
//!
//! ```text
//! sealed bytes ──open──▶ claimed sender ──its verified list──▶ keys of the claimed device
//!      ──Olm decrypt (the session must belong to those keys, else ForgedSender)──▶ Payload
//!      ──apply──▶ events, record updated
//! ```
//!
//! [`Engine::open`] does all of that without I/O. The sender's list it uses is the one held,
//! whatever its age; when the claimed device is not in it, the envelope is held until the next
//! refresh of contacts' lists ([`HoldReason::AwaitingList`], see [`schedule`](super::schedule)).
//! Only for our own account and a first contact does it ask for the list at once
//! ([`Need::List`]), and the driver fetches it, gives it to
//! [`Engine::accept_device_list`](super::Engine::accept_device_list) and opens again with
//! [`SenderList::Refetched`] (or says why it could not). A device of our own account that the
//! signed list does not vouch for may only send a link request, and only while a link code of
//! ours is pending ([`Need::BrokerKeys`], then
//! [`Engine::open_link_request`](super::Engine::open_link_request)).
//!
//! [`Engine::settle`] then decides what becomes of the envelope: read (its events), held
//! (unreadable for a reason about its sender: kept sealed, read later, in order), or rejected
//! (never readable) — and records its id, so a redelivery is recognised
//! ([`Engine::is_seen`]). Save the state before acknowledging.

use sealpost_proto::EnvelopeId;

use super::{
    Engine,
    events::{CallSignal, Event, HoldReason, ReceivedMessage},
    record::{HeldEnvelope, Secret, StoredMessage, domain},
};
use crate::{
    crypto::{OlmMessage, Payload, PublicDeviceKeys, SenderInfo, SessionError, Unsealed, open},
    error::{ClientError, EnvelopeError},
};

/// What the driver knows of the claimed sender's device list when it opens an envelope.
pub enum SenderList {
    /// Nothing new: use the list held (of any age) if it has the device; else ask for it if
    /// it is our own or a first contact's, or hold the envelope until the next refresh of
    /// contacts' lists (see [`schedule`](super::schedule)).
    Cached,
    /// Fetched and accepted just now (or the fetch failed and the envelope is to be judged
    /// with what is cached).
    Refetched,
    /// The list cannot be had now (the broker, or the sender's behind it, did not answer):
    /// the envelope is held and read later.
    Unavailable(ClientError),
    /// The list was fetched and does not verify (a changed master key holds the envelope
    /// until the user accepts the key; anything else rejects it).
    Failed(ClientError),
}

/// What the driver must get before an envelope can be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// This user's signed device list: fetch it, accept it, open again with
    /// [`SenderList::Refetched`].
    List(String),
    /// The broker's (unsigned) device keys of our own account, for
    /// [`Engine::open_link_request`](super::Engine::open_link_request).
    BrokerKeys,
}

/// Why an envelope is not read now.
pub enum Failure {
    /// Not readable yet, for a reason about its sender: keep it (sealed), read it later.
    Hold {
        /// The claimed sender.
        user: String,
        /// Why.
        why: HoldReason,
        /// The error behind it.
        error: Box<ClientError>,
    },
    /// Never readable.
    Rejected(EnvelopeError),
}

/// What the engine knows of an envelope being applied, besides its payload.
#[derive(Clone, Copy)]
struct Received {
    /// Its envelope id (the stored message's id).
    id: EnvelopeId,
    /// The sender's clock.
    sent_ms: u64,
    /// This device's clock.
    now_ms: u64,
}

/// Why [`Engine::open`] did not read an envelope.
pub enum Unread {
    /// Something must be fetched first.
    Need(Need),
    /// It cannot be read now or ever: give it to [`Engine::settle`].
    Failed(Failure),
}

/// An envelope read ([`Engine::open`]).
pub struct Opened {
    /// The authenticated sender.
    pub from: String,
    /// Its device.
    pub device: u32,
    /// What it produced (nothing for a delivery token: the sender is now a contact we can
    /// write to sealed).
    pub events: Vec<Event>,
}

impl From<Failure> for Unread {
    fn from(failure: Failure) -> Self {
        Unread::Failed(failure)
    }
}

fn rejected(error: EnvelopeError) -> Unread {
    Unread::Failed(Failure::Rejected(error))
}

impl Engine {
    /// Whether the envelope `id` was handled already (a redelivery, or our own copy of a send
    /// to our account): acknowledge it unread.
    pub fn is_seen(&self, id: EnvelopeId) -> bool {
        self.record.seen.contains(&id.0)
    }

    pub(crate) fn unseal(&self, ciphertext: &[u8]) -> Result<Unsealed, Unread> {
        open(
            self.state.user(),
            self.state.device_id(),
            self.state.device.seal_secret(),
            ciphertext,
        )
        .map_err(|e| rejected(EnvelopeError::Unseal(e)))
    }

    /// Opens the envelope `id`, checks its claimed sender against the sender's verified
    /// device list and decrypts and applies it. See the module doc.
    pub fn open(
        &mut self,
        id: EnvelopeId,
        ciphertext: &[u8],
        list: SenderList,
        now_ms: u64,
    ) -> Result<Opened, Unread> {
        if matches!(list, SenderList::Cached) {
            self.unpinned_claim = None;
        }
        let unsealed = self.unseal(ciphertext)?;
        let (user, device) = (unsealed.sender.user.clone(), unsealed.sender.device);
        if user == self.state.user() && device == self.state.device_id() {
            return Err(rejected(EnvelopeError::Session {
                user,
                device,
                error: SessionError::ForgedSender,
            }));
        }
        if self.record.holds_from(&user) {
            return Err(Unread::Failed(Failure::Hold {
                user,
                why: HoldReason::Behind,
                error: Box::new(ClientError::Invalid(
                    "earlier envelopes from this sender are held".into(),
                )),
            }));
        }
        let was_pinned = self.state.pins.pinned(&user).is_some()
            && self.unpinned_claim.as_deref() != Some(user.as_str());
        let opened = self.verify_and_decrypt(id, unsealed, list, now_ms);
        if let Err(Unread::Failed(Failure::Hold {
            why: HoldReason::AwaitingList,
            ..
        })) = opened
        {
            self.refresh_wanted = true;
        }
        if let Err(Unread::Need(need)) = opened {
            if matches!(need, Need::List(_)) && !was_pinned {
                self.unpinned_claim = Some(user);
            }
            return Err(Unread::Need(need));
        }
        self.unpinned_claim = None;
        if !was_pinned && matches!(opened, Err(Unread::Failed(Failure::Rejected(_)))) {
            // The claimed sender was pinned for this envelope only, and it did not
            // authenticate: forget the pin and the list.
            self.state.pins.forget(&user);
            self.record.lists.remove(&user);
        }
        opened.map(|events| Opened {
            from: user,
            device,
            events: with_id(id, events),
        })
    }

    fn verify_and_decrypt(
        &mut self,
        id: EnvelopeId,
        unsealed: Unsealed,
        list: SenderList,
        now_ms: u64,
    ) -> Result<Vec<Event>, Unread> {
        let sender = unsealed.sender;
        let (user, device) = (sender.user.clone(), sender.device);
        let Some(keys) = self.sender_keys(&user, device, list)? else {
            if user == self.state.user() && self.has_pending_link(now_ms) {
                // Possibly a device being linked: only a link request is accepted this way.
                return Err(Unread::Need(Need::BrokerKeys));
            }
            return Err(rejected(EnvelopeError::UnknownSenderDevice {
                user,
                device,
            }));
        };
        let payload = self
            .decrypt_from(&sender, &keys, &unsealed.olm_message)
            .map_err(Unread::Failed)?;
        let received = Received {
            id,
            sent_ms: unsealed.timestamp_ms,
            now_ms,
        };
        self.apply(&sender, received, payload)
            .map_err(Unread::Failed)
    }

    /// Decrypts an Olm message of `sender`, whose device's keys are `keys`: the session must
    /// belong to those keys (else [`SessionError::ForgedSender`]).
    pub(crate) fn decrypt_from(
        &mut self,
        sender: &SenderInfo,
        keys: &PublicDeviceKeys,
        message: &OlmMessage,
    ) -> Result<Payload, Failure> {
        let payload = self
            .state
            .sessions
            .decrypt(&mut self.state.device, sender, keys, message)
            .map_err(|error| {
                Failure::Rejected(EnvelopeError::Session {
                    user: sender.user.clone(),
                    device: sender.device,
                    error,
                })
            })?;
        self.counters.envelopes_opened += 1;
        Ok(payload)
    }

    /// The verified keys of the claimed sender's device; `None` if its (fresh) list does not
    /// have it.
    fn sender_keys(
        &self,
        user: &str,
        device: u32,
        list: SenderList,
    ) -> Result<Option<PublicDeviceKeys>, Unread> {
        let hold = |why, error| {
            Unread::Failed(Failure::Hold {
                user: user.to_owned(),
                why,
                error: Box::new(error),
            })
        };
        match list {
            // The list we hold, whatever its age (see `schedule`): a fetch now would follow
            // the delivery and name its sender.
            SenderList::Cached => match self.known_list(user) {
                Some((list, _)) if list.device(device).is_some() => {
                    Ok(list.device(device).copied())
                }
                // Our own account (fetched on the authenticated channel), or a first contact
                // (its envelope came authenticated): fetched at once.
                _ if user == self.state.user() || self.is_first_contact(user) => {
                    Err(Unread::Need(Need::List(user.to_owned())))
                }
                _ => Err(hold(
                    HoldReason::AwaitingList,
                    ClientError::ListNotVerified(user.to_owned()),
                )),
            },
            SenderList::Refetched => match self.known_list(user) {
                Some((list, _)) => Ok(list.device(device).copied()),
                None => Err(rejected(EnvelopeError::SenderUnverified {
                    user: user.to_owned(),
                    error: Box::new(ClientError::ListNotVerified(user.to_owned())),
                })),
            },
            SenderList::Unavailable(error) => Err(hold(HoldReason::SenderUnavailable, error)),
            SenderList::Failed(error @ ClientError::MasterKeyChanged { .. }) => {
                Err(hold(HoldReason::KeyChanged, error))
            }
            SenderList::Failed(error) => Err(rejected(EnvelopeError::SenderUnverified {
                user: user.to_owned(),
                error: Box::new(error),
            })),
        }
    }

    /// Applies an authentic payload.
    fn apply(
        &mut self,
        sender: &SenderInfo,
        received: Received,
        payload: Payload,
    ) -> Result<Vec<Event>, Failure> {
        let Received {
            id,
            sent_ms,
            now_ms,
        } = received;
        let own = sender.user == self.state.user();
        let unexpected = |kind| {
            Failure::Rejected(EnvelopeError::Unexpected {
                kind,
                user: sender.user.clone(),
            })
        };
        let call = |payload| {
            Ok(vec![Event::Call(CallSignal {
                from: sender.user.clone(),
                device: sender.device,
                sent_ms,
                payload,
            })])
        };
        match payload {
            Payload::Text { body, link } if !own => {
                let message = StoredMessage::new(false, sender.device, sent_ms, body.clone(), None);
                self.store_received(&sender.user, id, message, now_ms);
                let gap =
                    self.chain_received(&sender.user, sender.device, id, link.as_ref(), now_ms);
                let mut events = vec![Event::Message(ReceivedMessage {
                    id: EnvelopeId([0; 16]),
                    from: sender.user.clone(),
                    device: sender.device,
                    sent_ms,
                    text: body,
                })];
                events.extend(gap);
                Ok(events)
            }
            Payload::File { file } if !own => {
                let message = StoredMessage::new(
                    false,
                    sender.device,
                    sent_ms,
                    file.summary(),
                    Some(file.clone()),
                );
                self.store_received(&sender.user, id, message, now_ms);
                let gap = self.chain_received(&sender.user, sender.device, id, None, now_ms);
                let mut events = vec![Event::File {
                    from: sender.user.clone(),
                    device: sender.device,
                    sent_ms,
                    file,
                }];
                events.extend(gap);
                Ok(events)
            }
            Payload::SentFile { to, file } if own => {
                let text = file.summary();
                let message =
                    StoredMessage::new(true, sender.device, sent_ms, text.clone(), Some(file));
                self.store_transcript(&to, id, message);
                Ok(vec![Event::SentElsewhere {
                    to,
                    device: sender.device,
                    text,
                    sent_ms,
                }])
            }
            Payload::History { device, file } if own => {
                if device != self.state.device_id() {
                    return Ok(Vec::new()); // for the account's new device, not this one
                }
                Ok(vec![Event::History {
                    from_device: sender.device,
                    file,
                }])
            }
            Payload::DeliveryToken { token } if !own => {
                self.record
                    .contacts
                    .entry(sender.user.clone())
                    .or_default()
                    .delivery_token = Some(Secret(token));
                Ok(Vec::new())
            }
            Payload::Sent { to, body } if own => {
                let message = StoredMessage::new(true, sender.device, sent_ms, body.clone(), None);
                self.store_transcript(&to, id, message);
                Ok(vec![Event::SentElsewhere {
                    to,
                    device: sender.device,
                    text: body,
                    sent_ms,
                }])
            }
            Payload::DeviceLinked { device } if own => {
                // Our list changed: fetched again on next use.
                self.record.lists.remove(&sender.user);
                Ok(vec![Event::DeviceLinked { device }])
            }
            Payload::LinkGrant {
                master_key,
                delivery_token,
                contacts,
                proof,
            } if own => self.accept_grant(&master_key, delivery_token, contacts, &proof),
            Payload::Receipt { kind, ids } if !own => {
                Ok(self.apply_receipt(&sender.user, kind, &ids))
            }
            Payload::Typing { on } if !own => Ok(vec![Event::Typing {
                peer: sender.user.clone(),
                device: sender.device,
                on,
            }]),
            Payload::Disappearing { secs, with } => {
                // From the peer: the conversation with it; from another device of ours: the
                // conversation it names.
                let peer = match (own, with) {
                    (false, None) => sender.user.clone(),
                    (true, Some(peer))
                        if peer != sender.user && super::check_handle(&peer).is_ok() =>
                    {
                        peer
                    }
                    _ => return Err(unexpected("disappearing timer for no conversation")),
                };
                if super::disappearing::check_timer(secs).is_err() {
                    return Err(unexpected("disappearing timer out of range"));
                }
                Ok(self.apply_timer(&peer, sender, id, sent_ms, secs))
            }
            Payload::AnsweredElsewhere { .. } if own => call(payload),
            payload if payload.is_call_signal() && !own => call(payload),
            Payload::AnsweredElsewhere { .. } => {
                Err(unexpected("answered-elsewhere from another account"))
            }
            Payload::CallOffer { .. }
            | Payload::CallAnswer { .. }
            | Payload::IceCandidate { .. }
            | Payload::HangUp { .. }
            | Payload::Busy { .. }
            | Payload::Decline { .. } => Err(unexpected("call signaling from our own account")),
            Payload::Text { .. } => Err(unexpected("text from our own account")),
            Payload::File { .. } => Err(unexpected("file from our own account")),
            Payload::SentFile { .. } => Err(unexpected("file transcript from another account")),
            Payload::History { .. } => Err(unexpected("history from another account")),
            Payload::DeliveryToken { .. } => Err(unexpected("delivery token from our own account")),
            Payload::Sent { .. } => Err(unexpected("sent transcript from another account")),
            Payload::DeviceLinked { .. } => Err(unexpected("device notice from another account")),
            Payload::LinkGrant { .. } => Err(unexpected("link grant from another account")),
            Payload::LinkRequest { .. } => Err(unexpected("link request from a listed device")),
            Payload::Receipt { .. } => Err(unexpected("receipt from our own account")),
            Payload::Typing { .. } => Err(unexpected("typing from our own account")),
        }
    }

    /// Decides what becomes of a newly delivered envelope once opened (or not): its events,
    /// or held (unless `ephemeral`: call signaling is stale long before it could be read),
    /// or rejected; and records its id as handled. Save the state, then acknowledge it.
    pub fn settle(
        &mut self,
        id: EnvelopeId,
        ciphertext: &[u8],
        ephemeral: bool,
        result: Result<Vec<Event>, Failure>,
    ) -> Vec<Event> {
        let events = match result {
            Ok(events) => events,
            Err(Failure::Hold { user, error, .. }) if ephemeral => {
                let error = EnvelopeError::SenderUnverified { user, error };
                vec![Event::Rejected { id, error }]
            }
            Err(Failure::Hold { user, why, .. }) => {
                if self.record.hold(&user, id.0, ciphertext) {
                    vec![Event::Held { id, user, why }]
                } else {
                    let error = EnvelopeError::HoldDropped { user };
                    vec![Event::Rejected { id, error }]
                }
            }
            Err(Failure::Rejected(error)) => vec![Event::Rejected { id, error }],
        };
        self.record.seen.insert(id.0);
        events
    }

    /// Whether envelopes are held.
    pub fn has_held(&self) -> bool {
        !self.record.held.is_empty()
    }

    /// The senders whose envelopes are held (`only` that one, if given), in the order their
    /// first envelope came.
    pub fn held_senders(&self, only: Option<&str>) -> Vec<String> {
        let mut senders: Vec<String> = Vec::new();
        for held in &self.record.held {
            if only.is_none_or(|u| u == held.from) && !senders.contains(&held.from) {
                senders.push(held.from.clone());
            }
        }
        senders
    }

    /// Takes the envelopes held for `from`, oldest first, to try them again; what still
    /// cannot be read goes back with [`Engine::put_back_held`].
    pub fn take_held(&mut self, from: &str) -> Vec<HeldEnvelope> {
        self.record.take_held(from)
    }

    /// Puts taken envelopes back, in the given order.
    pub fn put_back_held(&mut self, envelopes: impl IntoIterator<Item = HeldEnvelope>) {
        self.record.put_back(envelopes);
    }
}

/// The domain of a sender's handle (a held envelope's sender whose domain did not answer need
/// not be tried again in the same pass).
pub fn sender_domain(user: &str) -> String {
    domain(user).to_owned()
}

/// Sets the envelope id of the messages among `events`.
fn with_id(id: EnvelopeId, mut events: Vec<Event>) -> Vec<Event> {
    for event in &mut events {
        if let Event::Message(m) = event {
            m.id = id;
        }
    }
    events
}
