//! Sending: one envelope to every current device of one account.
//!
//! A send addresses the devices the broker has for the recipient (at first: those of its
//! verified list). Devices in the verified list get a real copy: an Olm message (a session is
//! started from a claimed key where there is none) sealed to the device's seal key, so the
//! broker never learns the sender. Devices the broker has that the signed list does not vouch
//! for (a device being linked) get a random placeholder of the same size, which they cannot
//! open: the engine never encrypts to an unverified key. A send to our own account includes
//! the sending device too; it gets a placeholder, recognised on arrival by its envelope id.
//!
//! The broker refuses a send whose device set is not exactly the recipient's current devices
//! (`stale_devices`, with the current set): the driver then fetches and accepts the list again
//! and the send goes again with the same envelope id (idempotent at the broker), at most
//! [`STALE_RETRIES`] times. Copies already made are kept.
//!
//! Routes: an account whose delivery token we hold gets `sealed_send` on the anonymous
//! `/v1/sealed` connection, admitted by that token; a first contact gets the authenticated
//! `send` on `/v1/ws` (the envelope is sealed all the same, but the live connection names the
//! sending device once). Our own account: always authenticated (transcripts, notices, grants:
//! the broker knows the account there anyway, and on the sealed socket they would name the
//! sender of the sealed sends beside them; see the `schedule` module).

use std::collections::BTreeMap;

use sealpost_proto::{Class, ClientFrame, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome};
use zeroize::Zeroizing;

use super::{
    Engine,
    record::{Secret, StoredMessage},
};
use crate::{
    crypto::{
        PLACEHOLDER_BYTES, Payload, PublicDeviceKeys, SenderInfo, SignedOneTimeKey, placeholder,
        seal,
    },
    error::ClientError,
};

/// Time-to-live of message envelopes: 30 days.
pub const MESSAGE_TTL_SECS: u32 = 30 * 24 * 3600;
/// How many `stale_devices` answers one send takes before it gives up.
pub const STALE_RETRIES: usize = 4;

/// The class and time-to-live an envelope is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The delivery class.
    pub class: Class,
    /// Time-to-live at the broker.
    pub ttl_secs: u32,
}

impl Delivery {
    /// Messages and everything that must not be lost.
    pub const DURABLE: Delivery = Delivery {
        class: Class::Durable,
        ttl_secs: MESSAGE_TTL_SECS,
    };
    /// Call signaling: stored briefly, so a waking device still rings.
    pub const CALL: Delivery = Delivery {
        class: Class::Urgent,
        ttl_secs: super::CALL_TTL_SECS,
    };
    /// Typing: only to connected devices, never stored (the broker still wants a valid
    /// time-to-live).
    pub const EPHEMERAL: Delivery = Delivery {
        class: Class::Ephemeral,
        ttl_secs: 60,
    };
}

/// What one envelope carries.
pub struct Outgoing {
    payload: Payload,
    /// This device gets this payload instead (a link grant goes to the new device only).
    only_for: Option<(u32, Payload)>,
    delivery: Delivery,
    /// A text to add to the conversation with the recipient when the send starts.
    text: Option<String>,
    /// The file the text stands for, if it is one.
    file: Option<crate::crypto::FileRef>,
}

impl Outgoing {
    /// `payload`, durable.
    pub fn payload(payload: Payload) -> Self {
        Self::with(payload, Delivery::DURABLE)
    }

    pub(crate) fn with(payload: Payload, delivery: Delivery) -> Self {
        Self {
            payload,
            only_for: None,
            delivery,
            text: None,
            file: None,
        }
    }

    pub(crate) fn only_for(mut self, device: u32, payload: Payload) -> Self {
        self.only_for = Some((device, payload));
        self
    }

    /// A text message to a contact; it joins the conversation when the send starts (and
    /// leaves it again if the send is abandoned).
    pub fn text(body: &str) -> Self {
        Self {
            text: Some(body.to_owned()),
            ..Self::payload(Payload::Text {
                body: body.to_owned(),
                link: None,
            })
        }
    }

    /// A file to a contact (its line joins the conversation as a text's would).
    pub fn file(file: crate::crypto::FileRef) -> Self {
        Self {
            text: Some(file.summary()),
            file: Some(file.clone()),
            ..Self::payload(Payload::File { file })
        }
    }

    /// A transcript of a file sent to `to`, for this account's other devices.
    pub fn file_transcript(to: &str, file: &crate::crypto::FileRef) -> Self {
        Self::payload(Payload::SentFile {
            to: to.to_owned(),
            file: file.clone(),
        })
    }

    /// A transcript of a text sent to `to`, for this account's other devices.
    pub fn transcript(to: &str, body: &str) -> Self {
        Self::payload(Payload::Sent {
            to: to.to_owned(),
            body: body.to_owned(),
        })
    }

    /// The class and time-to-live.
    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// What it carries (for a driver that hands payloads to its page as data, as the
    /// browser's does, before they come back to be encrypted).
    pub fn contents(&self) -> &Payload {
        &self.payload
    }

    fn payload_for(&self, device: u32) -> &Payload {
        match &self.only_for {
            Some((d, special)) if *d == device => special,
            _ => &self.payload,
        }
    }
}

/// How an envelope reaches the broker.
#[derive(Clone)]
enum Route {
    /// Anonymous `/v1/sealed`, with the recipient's delivery token.
    Sealed(Secret),
    /// Authenticated `/v1/ws` `send`.
    Authenticated,
}

/// An envelope encrypted and sealed for every device of one account (one copy each).
#[derive(Clone)]
pub struct PreparedEnvelope {
    /// The envelope id.
    pub id: EnvelopeId,
    /// The recipient account.
    pub to: String,
    /// One sealed copy per device.
    pub copies: Vec<Copy>,
}

impl std::fmt::Debug for PreparedEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedEnvelope")
            .field("id", &self.id)
            .field("copies", &self.copies)
            .finish_non_exhaustive()
    }
}

/// How a key claim is authorised.
pub enum ClaimWith {
    /// The recipient's delivery token: the claim names nobody.
    DeliveryToken(Zeroizing<Vec<u8>>),
    /// This device's credentials (no token yet, or our own account).
    Device,
}

/// What a send needs next ([`Engine::send_step`]).
pub enum SendStep {
    /// Claim one of `user`'s `device`'s keys and give it to [`Engine::create_session`].
    ClaimKey {
        /// The recipient account.
        user: String,
        /// Its device without a session.
        device: u32,
        /// How to authorise the claim.
        with: ClaimWith,
    },
    /// Save the state (the ratchets moved), then transmit this frame
    /// ([`Send::is_sealed`]: on `/v1/sealed`, else `/v1/ws`) and give the answer to
    /// [`Engine::send_answer`].
    Transmit(ClientFrame),
}

/// What a broker's answer means for a send ([`Engine::send_answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProgress {
    /// Stored for every device.
    Sent(EnvelopeId),
    /// The recipient's device set changed: fetch and accept its list again, then step again.
    Stale,
}

/// One envelope on its way ([`Engine::start_send`]).
pub struct Send {
    id: EnvelopeId,
    to: String,
    outgoing: Outgoing,
    route: Route,
    /// The device set to address: the broker's, as far as we know it.
    devices: Vec<u32>,
    /// Copies made so far, kept across `stale_devices` answers.
    copies: BTreeMap<u32, Vec<u8>>,
    stale_answers: usize,
    /// Whether a text joined the conversation when the send started.
    recorded: bool,
}

impl Send {
    /// The envelope id.
    pub fn id(&self) -> EnvelopeId {
        self.id
    }

    /// The recipient.
    pub fn to(&self) -> &str {
        &self.to
    }

    /// Whether it goes on the anonymous `/v1/sealed` connection (else `/v1/ws`).
    pub fn is_sealed(&self) -> bool {
        matches!(self.route, Route::Sealed(_))
    }

    /// The copies made so far.
    pub fn envelope(&self) -> PreparedEnvelope {
        PreparedEnvelope {
            id: self.id,
            to: self.to.clone(),
            copies: self
                .copies
                .iter()
                .map(|(d, c)| Copy {
                    device: DeviceId(*d),
                    ciphertext: c.clone(),
                })
                .collect(),
        }
    }
}

impl Engine {
    fn route_to(&self, to: &str) -> Route {
        if to == self.state.user() {
            // Our own account: authenticated, where the broker knows the account anyway. On
            // the sealed socket, a copy to our own account would name the sender of the
            // sealed sends around it.
            return Route::Authenticated;
        }
        self.record
            .contacts
            .get(to)
            .and_then(|c| c.delivery_token.clone())
            .map_or(Route::Authenticated, Route::Sealed)
    }

    /// Whether this device holds `to`'s delivery token, i.e. whether envelopes to `to` travel
    /// sealed over the anonymous connection (otherwise the first one goes authenticated).
    pub fn sends_sealed_to(&self, to: &str) -> bool {
        matches!(self.route_to(to), Route::Sealed(_))
    }

    /// The frame that sends `envelope` as it is, by its route, with `delivery`.
    pub fn frame_for(&self, envelope: &PreparedEnvelope, delivery: Delivery) -> ClientFrame {
        frame(&self.route_to(&envelope.to), envelope, delivery)
    }

    /// Starts an envelope carrying `outgoing` to `to`'s `devices` (`None`: those of its
    /// verified list). `retry_of`: the id of an earlier attempt of the same send whose state
    /// was lost (a reloaded page); its text is not added to the conversation again.
    pub fn start_send(
        &mut self,
        to: &str,
        outgoing: Outgoing,
        devices: Option<Vec<u32>>,
        retry_of: Option<EnvelopeId>,
        now_ms: u64,
    ) -> Result<Send, ClientError> {
        super::check_handle(to)?;
        if !self.record.lists.contains_key(to) {
            return Err(ClientError::ListNotVerified(to.to_owned()));
        }
        let mut devices = devices.unwrap_or_else(|| self.listed_devices(to));
        let id = retry_of.unwrap_or_else(|| EnvelopeId(rand::random()));
        if to == self.state.user() {
            // Our own copy comes back to us: recognised by its id and acked unread.
            self.record.seen.insert(id.0);
            if !devices.contains(&self.state.device_id()) {
                devices.push(self.state.device_id());
            }
        }
        let mut outgoing = outgoing;
        // A message (or a transcript of one) in a conversation with a disappearing-messages
        // timer: the broker's copies expire with it (see `disappearing`).
        let about = match &outgoing.payload {
            Payload::Text { .. } | Payload::File { .. } => Some(to),
            Payload::Sent { to, .. } | Payload::SentFile { to, .. } => Some(to.as_str()),
            _ => None,
        };
        if let Some(peer) = about {
            outgoing.delivery.ttl_secs = self.ttl_for(peer, outgoing.delivery.ttl_secs);
        }
        // A message's place in its chain; a retry that lost its send gets the same place again
        // (another would look like a new message).
        if retry_of.is_none() {
            let expires_ms =
                now_ms.saturating_add(u64::from(outgoing.delivery.ttl_secs).saturating_mul(1000));
            self.link_outgoing(to, id, &mut outgoing.payload, expires_ms);
        } else {
            self.relink(to, id, &mut outgoing.payload);
        }
        let recorded = retry_of.is_none() && outgoing.text.is_some();
        if let (true, Some(text)) = (recorded, &outgoing.text) {
            let mut message = StoredMessage::new(
                true,
                self.state.device_id(),
                now_ms,
                text.clone(),
                outgoing.file.clone(),
            );
            message.id = Some(serde_bytes::ByteBuf::from(id.0.to_vec()));
            message.state = super::MessageState::Sending.to_wire();
            message.expires_ms = self.expiry_for(to, now_ms);
            self.record.add_message(to, message);
        }
        Ok(Send {
            id,
            to: to.to_owned(),
            route: self.route_to(to),
            outgoing,
            devices,
            copies: BTreeMap::new(),
            stale_answers: 0,
            recorded,
        })
    }

    /// The send could not be completed: its text leaves the conversation again.
    pub fn abandon_send(&mut self, send: Send) {
        self.chain_abandoned(&send.to, send.id);
        if send.recorded
            && let Some(c) = self.record.contacts.get_mut(&send.to)
        {
            c.messages.pop_back();
        }
    }

    /// How a key of `user` is claimed: with its delivery token if we hold it (the claim then
    /// names nobody), else with this device's credentials.
    pub fn claim_with(&self, user: &str) -> ClaimWith {
        match self
            .record
            .contacts
            .get(user)
            .and_then(|c| c.delivery_token.as_ref())
        {
            Some(t) if user != self.state.user() => ClaimWith::DeliveryToken(t.0.clone()),
            _ => ClaimWith::Device,
        }
    }

    /// Devices in `user`'s verified list this device has no current Olm session with (never
    /// this device itself).
    pub fn devices_without_session(&mut self, user: &str) -> Vec<u32> {
        let me = (user == self.state.user()).then(|| self.state.device_id());
        let listed: Vec<(u32, PublicDeviceKeys)> = self
            .listed_devices(user)
            .into_iter()
            .filter(|d| Some(*d) != me)
            .filter_map(|d| Some((d, self.listed_keys(user, d)?)))
            .collect();
        let sessions = &mut self.state.sessions;
        listed
            .into_iter()
            .filter(|(d, keys)| !sessions.has_current_session(user, *d, keys))
            .map(|(d, _)| d)
            .collect()
    }

    /// Starts an Olm session with `user`'s `device` from a claimed key (the
    /// `SignedOneTimeKey` encoding), after checking its signature by that device's verified
    /// keys.
    pub fn create_session(
        &mut self,
        user: &str,
        device: u32,
        key: &[u8],
    ) -> Result<(), ClientError> {
        let keys = self
            .listed_keys(user, device)
            .ok_or_else(|| ClientError::ListNotVerified(user.to_owned()))?;
        let key = SignedOneTimeKey::from_bytes(key).map_err(|error| ClientError::BadKey {
            user: user.to_owned(),
            device,
            error,
        })?;
        self.state
            .sessions
            .create_outbound(&self.state.device, user, device, &keys, &key)?;
        Ok(())
    }

    /// What `send` needs next: a session with a device, or (all copies made) transmission.
    pub fn send_step(&mut self, send: &mut Send, now_ms: u64) -> Result<SendStep, ClientError> {
        let to = send.to.clone();
        let me = self.state.device_id();
        let own = to == self.state.user();
        let mut real = Vec::new();
        let mut placeholders = Vec::new();
        for &device in &send.devices {
            if send.copies.contains_key(&device) {
                continue;
            }
            match self.listed_keys(&to, device) {
                Some(keys) if !(own && device == me) => {
                    if !self.state.sessions.has_current_session(&to, device, &keys) {
                        return Ok(SendStep::ClaimKey {
                            with: self.claim_with(&to),
                            user: to,
                            device,
                        });
                    }
                    real.push((device, keys));
                }
                _ => placeholders.push(device),
            }
        }
        let sender = SenderInfo {
            user: self.state.user().to_owned(),
            device: me,
        };
        for (device, keys) in real {
            let olm =
                self.state
                    .sessions
                    .encrypt(&to, device, send.outgoing.payload_for(device))?;
            let sealed = seal(&to, device, &keys.seal_x25519, &sender, now_ms, &olm)?;
            self.counters.copies_sealed += 1;
            send.copies.insert(device, sealed);
        }
        let size = send
            .copies
            .values()
            .next()
            .map_or(PLACEHOLDER_BYTES, Vec::len);
        self.note_unlisted(&to, &placeholders);
        for device in placeholders {
            send.copies.insert(device, placeholder(size));
        }
        let devices = &send.devices;
        send.copies.retain(|d, _| devices.contains(d));
        Ok(SendStep::Transmit(frame(
            &send.route,
            &send.envelope(),
            send.outgoing.delivery,
        )))
    }

    /// The broker's answer to a send.
    pub fn send_answer(
        &mut self,
        send: &mut Send,
        outcome: SendOutcome,
    ) -> Result<SendProgress, ClientError> {
        match outcome {
            SendOutcome::Accepted { .. } => {
                self.chain_accepted(send.id);
                // The caller learns it from the answer (the SDK's send returns the id): the
                // stored message moves on without an event of its own.
                if send.recorded {
                    self.message_accepted(send.id);
                }
                Ok(SendProgress::Sent(send.id))
            }
            SendOutcome::Rejected {
                code: ErrorCode::StaleDevices,
                current_devices,
            } => {
                send.stale_answers += 1;
                if send.stale_answers >= STALE_RETRIES {
                    return Err(ClientError::DevicesUnstable(send.to.clone()));
                }
                send.devices = current_devices.iter().map(|d| d.0).collect();
                Ok(SendProgress::Stale)
            }
            SendOutcome::Rejected { code, .. } => Err(ClientError::SendRefused(code)),
        }
    }

    /// Whether this device already sent `to` the account's delivery token.
    pub fn token_shared(&self, to: &str) -> bool {
        self.record.contacts.get(to).is_some_and(|c| c.token_shared)
    }

    /// The envelope that shares the account's delivery token with `to` (before the first
    /// thing this device sends it, so that its replies travel sealed).
    pub fn delivery_token_outgoing(&self) -> Outgoing {
        Outgoing::payload(Payload::DeliveryToken {
            token: self.record.delivery_token.0.clone(),
        })
    }

    /// The delivery token reached `to`.
    pub fn mark_token_shared(&mut self, to: &str) {
        self.record
            .contacts
            .entry(to.to_owned())
            .or_default()
            .token_shared = true;
    }
}

fn frame(route: &Route, envelope: &PreparedEnvelope, delivery: Delivery) -> ClientFrame {
    match route {
        Route::Sealed(token) => ClientFrame::SealedSend {
            id: envelope.id,
            to: envelope.to.clone(),
            class: delivery.class,
            ttl_secs: delivery.ttl_secs,
            copies: envelope.copies.clone(),
            delivery_token: Some(token.0.to_vec()),
        },
        Route::Authenticated => ClientFrame::Send {
            id: envelope.id,
            to: envelope.to.clone(),
            class: delivery.class,
            ttl_secs: delivery.ttl_secs,
            copies: envelope.copies.clone(),
        },
    }
}

impl super::Engine {
    /// The unfinished upload of the file `file` identifies (path, length, modification time).
    pub fn pending_upload(&self, file: &str) -> Option<super::record::PendingUpload> {
        self.record.uploads.get(file).cloned()
    }

    /// Remembers an upload started for `file` (saved with the state: the key stays secret).
    pub fn remember_upload(&mut self, file: &str, id: &str, key: &crate::crypto::FileKey) {
        let upload = super::record::PendingUpload {
            id: id.to_owned(),
            key: super::record::Secret(zeroize::Zeroizing::new(key.to_bytes().to_vec())),
        };
        self.record.uploads.insert(file.to_owned(), upload);
    }

    /// Forgets an upload that finished (or that the broker no longer has).
    pub fn forget_upload(&mut self, file: &str) {
        self.record.uploads.remove(file);
    }
}
