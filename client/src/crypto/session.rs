//! Pairwise Olm sessions (vodozemac Double Ratchet), keyed by (peer user, peer device).
//!
//! # Starting a session
//!
//! The initiator claims one of the peer device's one-time keys (or, when none is left, its
//! fallback key) from the key directory and calls [`Sessions::create_outbound`]; the key's
//! signature is checked against the peer's Ed25519 key from its verified device list. Until
//! the peer answers, every message is an Olm *pre-key* message, which lets the peer create
//! the matching inbound session in [`Sessions::decrypt`]. After the first reply, messages are
//! *normal* Olm messages.
//!
//! # Who sent it, and to whom
//!
//! A sealed envelope only *claims* a sender. [`Sessions::decrypt`] is given the claimed sender
//! and that sender's keys from its verified device list, and accepts a message only if
//!
//! 1. the Olm session that decrypts it was established with exactly that device's Curve25519
//!    identity key (for a pre-key message: the identity key inside the message) — checked
//!    before any ratchet state changes; and
//! 2. the addresses inside the Olm plaintext — sender (user, device) and recipient (user,
//!    device), written by the sender — name the claimed sender and this device.
//!
//! Either failure is [`SessionError::ForgedSender`] (or [`SessionError::WrongRecipient`]).
//! Olm authenticates keys, not handles; the inner addresses close the gap where one
//! user's device list lists another user's device keys (an unknown-key-share), which the
//! Matrix Olm spec closes the same way.
//!
//! # Olm plaintext
//!
//! MessagePack, positional: `[u8 format = 1, str sender user, u32 sender device,
//! str recipient user, u32 recipient device, bin payload]`, where `payload` is a
//! [`Payload`] encoding.
//!
//! # Replays
//!
//! Olm deletes each message key after use, so a replayed message for a live session fails
//! with [`SessionError::Replay`]. A replayed pre-key message whose session is still kept
//! hits the same check; one whose session is gone needs its one-time key, which was deleted
//! when first used ([`SessionError::UnknownOneTimeKey`]). The residual case is a pre-key
//! message built on a *fallback* key, replayed after its session has been evicted (we keep
//! [`MAX_SESSIONS_PER_PEER`] per peer device): it would open a fresh session. Clients also
//! deduplicate envelopes by id (the delivery contract), which covers redelivery.
//!
//! # Persisting
//!
//! Decrypting uses up message keys and one-time keys. Save the
//! [`ClientState`](super::ClientState) after a successful decrypt and *before* acknowledging
//! the envelope to the broker, or a crash loses the message and desynchronizes the ratchet.
//!
//! # Several sessions per peer
//!
//! Two devices that start sessions to each other at the same time each end up with two.
//! We keep up to [`MAX_SESSIONS_PER_PEER`] per peer device, most recently used first; we
//! encrypt with the first and decrypt with whichever matches, moving it to the front.
//!
//! vodozemac quirks worth knowing: `Session::session_keys().identity_key` is the *initiator's*
//! identity key (ours for outbound sessions), so we record the remote identity key ourselves;
//! a failed `Session::decrypt` leaves the session unchanged, so trying several sessions is
//! safe; and only `SessionConfig::version_1` (libolm-compatible, 8-byte truncated MAC) exists
//! without vodozemac's `experimental-session-config` feature.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use vodozemac::{
    Curve25519PublicKey,
    olm::{self, DecryptionError, SessionConfig, SessionCreationError},
};
use zeroize::{Zeroize, Zeroizing};

use super::{
    decode_exact,
    identity::{DeviceKeys, PublicDeviceKeys, SignedOneTimeKey},
    message::OlmMessage,
    payload::{Payload, PayloadError},
    sealed::SenderInfo,
};

/// Sessions kept per peer device (see the module doc).
pub const MAX_SESSIONS_PER_PEER: usize = 4;

/// Format byte of the Olm plaintext.
const INNER_FORMAT: u8 = 1;

/// Why a session operation failed. `Display` never names users or keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// No session with this peer device; create one with [`Sessions::create_outbound`] (to
    /// send) or wait for the peer's pre-key message (to receive).
    #[error("no Olm session with this device")]
    NoSession,
    /// The envelope's claimed sender is not the device the Olm session belongs to, or not the
    /// sender named inside the Olm plaintext.
    #[error("claimed sender does not own the Olm session")]
    ForgedSender,
    /// The Olm plaintext names another recipient: the message was encrypted for a different
    /// user or device that shares (or copied) this device's identity key.
    #[error("message is addressed to another device")]
    WrongRecipient,
    /// The message key was already used (a replay) or has been discarded.
    #[error("replayed or expired message")]
    Replay,
    /// The message does not decrypt (bad MAC, bad padding, unknown chain, gap too large).
    #[error("Olm message does not decrypt")]
    DecryptionFailed,
    /// A pre-key message names a one-time key this device does not have (used up already,
    /// possibly by an earlier copy of the same message, or never ours).
    #[error("pre-key message uses an unknown one-time key")]
    UnknownOneTimeKey,
    /// The claimed one-time key is not signed by the peer device.
    #[error("one-time key is not signed by the peer device")]
    BadOneTimeKey,
    /// A key exchange produced an all-zero (non-contributory) secret: a malicious key.
    #[error("non-contributory key exchange")]
    NonContributoryKey,
    /// The session config of a pre-key message is not the one we use.
    #[error("unsupported Olm session version")]
    UnsupportedSessionVersion,
    /// The Olm plaintext is not in a format this build reads.
    #[error("malformed Olm plaintext")]
    MalformedPlaintext,
    /// The message is authentic but its payload cannot be read (e.g. a kind from a newer
    /// client). The session has advanced: the message must not be retried.
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

/// The Olm plaintext (see the module doc).
#[derive(Serialize, Deserialize)]
struct Inner(u8, String, u32, String, u32, ByteBuf);

/// One Olm session and the peer identity key it was established with.
pub(crate) struct PeerSession {
    pub(crate) session: olm::Session,
    /// The peer device's Curve25519 identity key. vodozemac's `SessionKeys::identity_key` is
    /// the *initiator's* key, so for sessions we started it would be our own.
    pub(crate) remote_identity: Curve25519PublicKey,
}

/// All Olm sessions of one device. No `Debug` (ratchet secrets).
pub struct Sessions {
    /// This device's handle; written into, and expected in, every Olm plaintext.
    pub(crate) own_user: String,
    /// This device's id, likewise.
    pub(crate) own_device: u32,
    /// Per (peer user, peer device), most recently used first.
    pub(crate) peers: BTreeMap<(String, u32), Vec<PeerSession>>,
}

impl Sessions {
    /// No sessions yet, for the device (`own_user`, `own_device`).
    pub fn new(own_user: String, own_device: u32) -> Self {
        Self {
            own_user,
            own_device,
            peers: BTreeMap::new(),
        }
    }

    /// The handle of the device these sessions belong to.
    pub fn own_user(&self) -> &str {
        &self.own_user
    }

    /// The id of the device these sessions belong to.
    pub fn own_device(&self) -> u32 {
        self.own_device
    }

    /// Whether we can encrypt to this device now.
    pub fn has_session(&self, user: &str, device: u32) -> bool {
        self.peers
            .get(&(user.to_owned(), device))
            .is_some_and(|s| !s.is_empty())
    }

    /// Whether we can encrypt to this device, whose verified keys are `keys`. Sessions made
    /// with an earlier identity key of the device (reset, or re-registered under the same id)
    /// are dropped first: what they encrypt, the device could no longer decrypt.
    pub fn has_current_session(
        &mut self,
        user: &str,
        device: u32,
        keys: &PublicDeviceKeys,
    ) -> bool {
        let peer = (user.to_owned(), device);
        let Some(list) = self.peers.get_mut(&peer) else {
            return false;
        };
        let identity = keys.curve25519_key();
        list.retain(|s| s.remote_identity == identity);
        if list.is_empty() {
            self.peers.remove(&peer);
            return false;
        }
        true
    }

    /// Drops every session with this device (e.g. it left the user's device list).
    pub fn forget(&mut self, user: &str, device: u32) {
        self.peers.remove(&(user.to_owned(), device));
    }

    /// Drops every session with every device of `user` (e.g. after accepting a new master
    /// key: its devices were vouched for by the old one).
    pub fn forget_user(&mut self, user: &str) {
        self.peers.retain(|(u, _), _| u != user);
    }

    fn insert_front(&mut self, user: &str, device: u32, session: PeerSession) {
        let list = self.peers.entry((user.to_owned(), device)).or_default();
        list.insert(0, session);
        list.truncate(MAX_SESSIONS_PER_PEER);
    }

    /// Starts a session with a peer device from its verified keys and a one-time (or
    /// fallback) key claimed from the key directory. Becomes the session used to send.
    pub fn create_outbound(
        &mut self,
        own: &DeviceKeys,
        peer_user: &str,
        peer_device: u32,
        peer_keys: &PublicDeviceKeys,
        one_time_key: &SignedOneTimeKey,
    ) -> Result<(), SessionError> {
        one_time_key
            .verify(peer_keys)
            .map_err(|_| SessionError::BadOneTimeKey)?;
        let remote_identity = peer_keys.curve25519_key();
        let session = own
            .account
            .create_outbound_session(
                SessionConfig::version_1(),
                remote_identity,
                Curve25519PublicKey::from_bytes(one_time_key.key),
            )
            .map_err(creation_error)?;
        self.insert_front(
            peer_user,
            peer_device,
            PeerSession {
                session,
                remote_identity,
            },
        );
        Ok(())
    }

    /// Encrypts `payload` for a peer device with the most recently used session.
    pub fn encrypt(
        &mut self,
        peer_user: &str,
        peer_device: u32,
        payload: &Payload,
    ) -> Result<OlmMessage, SessionError> {
        self.encrypt_encoded(peer_user, peer_device, payload.encode())
    }

    /// Encrypts a payload encoding as it is: in tests, one of a kind this build does not know
    /// (what a newer client sends).
    pub(crate) fn encrypt_encoded(
        &mut self,
        peer_user: &str,
        peer_device: u32,
        payload: Vec<u8>,
    ) -> Result<OlmMessage, SessionError> {
        let mut inner = Inner(
            INNER_FORMAT,
            self.own_user.clone(),
            self.own_device,
            peer_user.to_owned(),
            peer_device,
            ByteBuf::from(payload),
        );
        // Plaintext buffers are wiped: a payload may carry the account's secrets (a link
        // grant carries the master key).
        let plaintext =
            Zeroizing::new(rmp_serde::to_vec(&inner).expect("Olm plaintext always encodes"));
        inner.5.zeroize();
        let peer = self
            .peers
            .get_mut(&(peer_user.to_owned(), peer_device))
            .and_then(|list| list.first_mut())
            .ok_or(SessionError::NoSession)?;
        let message = peer
            .session
            .encrypt(plaintext.as_slice())
            .map_err(|_| SessionError::NonContributoryKey)?;
        Ok(OlmMessage(message))
    }

    /// Checks the addresses inside an Olm plaintext and returns the payload bytes.
    fn open_inner(
        &self,
        plaintext: &[u8],
        sender: &SenderInfo,
    ) -> Result<Zeroizing<Vec<u8>>, SessionError> {
        let Inner(format, from_user, from_device, to_user, to_device, payload) =
            decode_exact(plaintext).ok_or(SessionError::MalformedPlaintext)?;
        if format != INNER_FORMAT {
            return Err(SessionError::MalformedPlaintext);
        }
        if from_user != sender.user || from_device != sender.device {
            return Err(SessionError::ForgedSender);
        }
        if to_user != self.own_user || to_device != self.own_device {
            return Err(SessionError::WrongRecipient);
        }
        Ok(Zeroizing::new(payload.into_vec()))
    }

    /// Decrypts a message from `sender` (as claimed by the sealed envelope), whose keys the
    /// caller took from the sender's *verified* device list. Creates an inbound session for a
    /// new pre-key message (consuming the one-time key in `own`).
    ///
    /// State on error: `NoSession`, `Replay`, `DecryptionFailed`, `UnknownOneTimeKey` and a
    /// `ForgedSender` found from the identity key leave every session as it was. If the
    /// message decrypts but its inner addresses are wrong, the message key is used up (a new
    /// inbound session is not kept). A `Payload` error comes from an authentic message: the
    /// session has advanced and is kept.
    pub fn decrypt(
        &mut self,
        own: &mut DeviceKeys,
        sender: &SenderInfo,
        sender_keys: &PublicDeviceKeys,
        message: &OlmMessage,
    ) -> Result<Payload, SessionError> {
        let identity = sender_keys.curve25519_key();
        let key = (sender.user.clone(), sender.device);
        let plaintext = match &message.0 {
            olm::OlmMessage::Normal(_) => {
                let list = self.peers.get_mut(&key).ok_or(SessionError::NoSession)?;
                let mut matching = list
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, s)| s.remote_identity == identity)
                    .peekable();
                if matching.peek().is_none() {
                    // Sessions exist for this (user, device), but with another identity key:
                    // the keys in its device list are not the ones we talk to.
                    return Err(SessionError::ForgedSender);
                }
                let mut error = SessionError::DecryptionFailed;
                let mut found = None;
                for (index, peer) in matching {
                    match peer.session.decrypt(&message.0) {
                        Ok(plaintext) => {
                            found = Some((index, Zeroizing::new(plaintext)));
                            break;
                        }
                        Err(e) => {
                            if decryption_error(e) == SessionError::Replay {
                                error = SessionError::Replay;
                            }
                        }
                    }
                }
                let (index, plaintext) = found.ok_or(error)?;
                let session = list.remove(index);
                list.insert(0, session);
                self.open_inner(&plaintext, sender)?
            }
            olm::OlmMessage::PreKey(pre_key) => {
                if pre_key.identity_key() != identity {
                    return Err(SessionError::ForgedSender);
                }
                let session_id = pre_key.session_id();
                let existing = self.peers.get_mut(&key).and_then(|list| {
                    list.iter()
                        .position(|s| s.session.session_id() == session_id)
                        .map(|index| (list, index))
                });
                if let Some((list, index)) = existing {
                    // A later pre-key message of a session we already have (the peer has not
                    // seen our reply yet), or a replay of one.
                    let plaintext = Zeroizing::new(
                        list[index]
                            .session
                            .decrypt(&message.0)
                            .map_err(decryption_error)?,
                    );
                    let session = list.remove(index);
                    list.insert(0, session);
                    self.open_inner(&plaintext, sender)?
                } else {
                    let created = own
                        .account
                        .create_inbound_session(SessionConfig::version_1(), identity, pre_key)
                        .map_err(creation_error)?;
                    let plaintext = Zeroizing::new(created.plaintext);
                    let payload = self.open_inner(&plaintext, sender)?;
                    self.insert_front(
                        &sender.user,
                        sender.device,
                        PeerSession {
                            session: created.session,
                            remote_identity: identity,
                        },
                    );
                    payload
                }
            }
        };
        Ok(Payload::decode(&plaintext)?)
    }
}

fn decryption_error(error: DecryptionError) -> SessionError {
    match error {
        DecryptionError::MissingMessageKey(_) => SessionError::Replay,
        DecryptionError::NonContributoryKey => SessionError::NonContributoryKey,
        _ => SessionError::DecryptionFailed,
    }
}

fn creation_error(error: SessionCreationError) -> SessionError {
    match error {
        SessionCreationError::MissingOneTimeKey(_) => SessionError::UnknownOneTimeKey,
        SessionCreationError::MismatchedIdentityKey(..) => SessionError::ForgedSender,
        SessionCreationError::MismatchedSessionConfig { .. } => {
            SessionError::UnsupportedSessionVersion
        }
        SessionCreationError::Decryption(e) => decryption_error(e),
        SessionCreationError::NonContributoryKey => SessionError::NonContributoryKey,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::OlmMessageKind;

    struct Device {
        user: &'static str,
        id: u32,
        keys: DeviceKeys,
        sessions: Sessions,
    }

    impl Device {
        fn new(user: &'static str, id: u32) -> Self {
            let mut keys = DeviceKeys::generate();
            keys.generate_one_time_keys(5);
            Self {
                user,
                id,
                keys,
                sessions: Sessions::new(user.into(), id),
            }
        }

        fn sender(&self) -> SenderInfo {
            SenderInfo {
                user: self.user.into(),
                device: self.id,
            }
        }

        /// Claims one of this device's published keys, as the key directory would.
        fn claim(&mut self, fallback: bool) -> SignedOneTimeKey {
            let keys = self.keys.unpublished_keys();
            if fallback {
                keys.fallback.expect("has fallback")
            } else {
                keys.one_time[0]
            }
        }

        fn start_with(&mut self, peer: &mut Device, fallback: bool) {
            let otk = peer.claim(fallback);
            self.sessions
                .create_outbound(
                    &self.keys,
                    peer.user,
                    peer.id,
                    &peer.keys.public_keys(),
                    &otk,
                )
                .expect("outbound session");
        }

        fn send(&mut self, to: &Device, text: &str) -> OlmMessage {
            self.sessions
                .encrypt(
                    to.user,
                    to.id,
                    &Payload::Text {
                        body: text.into(),
                        link: None,
                    },
                )
                .expect("encrypts")
        }

        fn receive(
            &mut self,
            from: &Device,
            message: &OlmMessage,
        ) -> Result<Payload, SessionError> {
            self.sessions.decrypt(
                &mut self.keys,
                &from.sender(),
                &from.keys.public_keys(),
                message,
            )
        }
    }

    fn text(body: &str) -> Payload {
        Payload::Text {
            body: body.into(),
            link: None,
        }
    }

    #[test]
    fn pre_key_then_normal_messages_both_ways() {
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        alice.start_with(&mut bob, false);

        let m1 = alice.send(&bob, "one");
        let m2 = alice.send(&bob, "two");
        assert_eq!(m1.kind(), OlmMessageKind::PreKey);
        assert_eq!(m2.kind(), OlmMessageKind::PreKey);
        assert_eq!(bob.receive(&alice, &m1), Ok(text("one")));
        assert_eq!(bob.receive(&alice, &m2), Ok(text("two")));

        let r1 = bob.send(&alice, "hi");
        assert_eq!(r1.kind(), OlmMessageKind::Normal);
        assert_eq!(alice.receive(&bob, &r1), Ok(text("hi")));

        let m3 = alice.send(&bob, "three");
        assert_eq!(m3.kind(), OlmMessageKind::Normal);
        assert_eq!(bob.receive(&alice, &m3), Ok(text("three")));
        assert_eq!(
            bob.sessions.peers[&("alice@a.example".to_owned(), 1)].len(),
            1
        );
    }

    #[test]
    fn one_time_key_is_consumed() {
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        let before = bob.keys.stored_one_time_key_count();
        alice.start_with(&mut bob, false);
        {
            let m = alice.send(&bob, "x");
            bob.receive(&alice, &m)
        }
        .expect("decrypts");
        assert_eq!(bob.keys.stored_one_time_key_count(), before - 1);
    }

    #[test]
    fn fallback_key_when_no_one_time_key() {
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device {
            user: "bob@b.example",
            id: 7,
            keys: DeviceKeys::generate(), // fallback key only
            sessions: Sessions::new("bob@b.example".into(), 7),
        };
        assert!(bob.keys.unpublished_keys().one_time.is_empty());
        alice.start_with(&mut bob, true);
        let m = alice.send(&bob, "via fallback");
        assert_eq!(bob.receive(&alice, &m), Ok(text("via fallback")));
        let r = bob.send(&alice, "ok");
        assert_eq!(alice.receive(&bob, &r), Ok(text("ok")));

        // The fallback key is not consumed: Carol can use it too.
        let mut carol = Device::new("carol@c.example", 2);
        carol.start_with(&mut bob, true);
        assert_eq!(
            {
                let m = carol.send(&bob, "me too");
                bob.receive(&carol, &m)
            },
            Ok(text("me too"))
        );
    }

    #[test]
    fn replays_are_rejected() {
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        alice.start_with(&mut bob, false);
        let pre_key = alice.send(&bob, "one");
        bob.receive(&alice, &pre_key).expect("decrypts");
        assert_eq!(bob.receive(&alice, &pre_key), Err(SessionError::Replay));

        {
            let m = bob.send(&alice, "ack");
            alice.receive(&bob, &m)
        }
        .expect("decrypts");
        let normal = alice.send(&bob, "two");
        bob.receive(&alice, &normal).expect("decrypts");
        assert_eq!(bob.receive(&alice, &normal), Err(SessionError::Replay));

        // A replayed pre-key message after its session is gone: the one-time key is spent.
        bob.sessions.forget("alice@a.example", 1);
        assert_eq!(
            bob.receive(&alice, &pre_key),
            Err(SessionError::UnknownOneTimeKey)
        );
    }

    #[test]
    fn claimed_sender_must_own_the_session() {
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        let carol = Device::new("carol@c.example", 3);
        alice.start_with(&mut bob, false);
        let pre_key = alice.send(&bob, "I am Carol");
        let as_carol = |bob: &mut Device, m: &OlmMessage| {
            bob.sessions
                .decrypt(&mut bob.keys, &carol.sender(), &carol.keys.public_keys(), m)
        };
        assert_eq!(
            as_carol(&mut bob, &pre_key),
            Err(SessionError::ForgedSender)
        );
        assert_eq!(bob.keys.stored_one_time_key_count(), 5, "nothing consumed");

        // Established session, normal message, claimed to be from Carol.
        bob.receive(&alice, &pre_key).expect("decrypts");
        {
            let m = bob.send(&alice, "ack");
            alice.receive(&bob, &m)
        }
        .expect("decrypts");
        let normal = alice.send(&bob, "still Carol");
        assert_eq!(as_carol(&mut bob, &normal), Err(SessionError::NoSession));
        // Claimed to be Alice's device, but Alice's list now has other keys for it.
        let replaced = DeviceKeys::generate().public_keys();
        assert_eq!(
            bob.sessions
                .decrypt(&mut bob.keys, &alice.sender(), &replaced, &normal),
            Err(SessionError::ForgedSender)
        );
        // The real thing still works: the failed attempts changed nothing.
        assert_eq!(bob.receive(&alice, &normal), Ok(text("still Carol")));
    }

    #[test]
    fn copied_device_keys_cannot_rebind_sender() {
        // Carol's (signed, by Carol) device list lists Alice's device keys as Carol's device 3.
        // Alice's Olm message to Bob, presented as Carol's, passes the identity-key check but
        // names Alice inside: refused, and no session is kept under Carol's name.
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        alice.start_with(&mut bob, true); // fallback key: not consumed, so replayable
        let m = alice.send(&bob, "from Alice");
        let carol = SenderInfo {
            user: "carol@c.example".into(),
            device: 3,
        };
        let alices_keys = alice.keys.public_keys();
        assert_eq!(
            bob.sessions
                .decrypt(&mut bob.keys, &carol, &alices_keys, &m),
            Err(SessionError::ForgedSender)
        );
        assert!(!bob.sessions.has_session("carol@c.example", 3));
        assert_eq!(bob.receive(&alice, &m), Ok(text("from Alice")));
    }

    #[test]
    fn copied_device_keys_cannot_redirect_recipient() {
        // Carol lists Bob's device keys as her own device 3. Alice, writing to "Carol", in
        // fact encrypts to Bob's device; Bob sees a message addressed to someone else.
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        let otk = bob.claim(false);
        alice
            .sessions
            .create_outbound(
                &alice.keys,
                "carol@c.example",
                3,
                &bob.keys.public_keys(),
                &otk,
            )
            .expect("session");
        let m = alice
            .sessions
            .encrypt("carol@c.example", 3, &text("for Carol"))
            .expect("encrypts");
        assert_eq!(bob.receive(&alice, &m), Err(SessionError::WrongRecipient));
        assert!(!bob.sessions.has_session("alice@a.example", 1));
    }

    #[test]
    fn unsigned_one_time_key_is_refused() {
        let alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        let mut otk = bob.claim(false);
        otk.key = DeviceKeys::generate().public_keys().curve25519; // directory swapped it
        let mut sessions = Sessions::new(alice.user.into(), alice.id);
        assert_eq!(
            sessions.create_outbound(&alice.keys, bob.user, bob.id, &bob.keys.public_keys(), &otk),
            Err(SessionError::BadOneTimeKey)
        );
        assert!(!sessions.has_session(bob.user, bob.id));
    }

    #[test]
    fn simultaneous_sessions_converge() {
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        alice.start_with(&mut bob, false);
        bob.start_with(&mut alice, false);
        let a1 = alice.send(&bob, "a1");
        let b1 = bob.send(&alice, "b1");
        assert_eq!(bob.receive(&alice, &a1), Ok(text("a1")));
        assert_eq!(alice.receive(&bob, &b1), Ok(text("b1")));
        for round in 0..3 {
            let a = alice.send(&bob, &format!("a{round}"));
            assert_eq!(bob.receive(&alice, &a), Ok(text(&format!("a{round}"))));
            let b = bob.send(&alice, &format!("b{round}"));
            assert_eq!(alice.receive(&bob, &b), Ok(text(&format!("b{round}"))));
        }
    }

    #[test]
    fn tampered_olm_message_fails_without_state_change() {
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 7);
        alice.start_with(&mut bob, false);
        {
            let m = alice.send(&bob, "x");
            bob.receive(&alice, &m)
        }
        .expect("decrypts");
        {
            let m = bob.send(&alice, "y");
            alice.receive(&bob, &m)
        }
        .expect("decrypts");
        let m = alice.send(&bob, "z");
        let (kind, mut bytes) = m.to_parts();
        let last = bytes.len() - 1;
        bytes[last] ^= 1; // inside the MAC
        let tampered = OlmMessage::from_parts(kind, &bytes).expect("still parses");
        assert_eq!(
            bob.receive(&alice, &tampered),
            Err(SessionError::DecryptionFailed)
        );
        assert_eq!(bob.receive(&alice, &m), Ok(text("z")));
        assert!(OlmMessage::from_parts(5, &bytes).is_none());
    }

    #[test]
    fn sessions_with_an_earlier_identity_of_a_device_are_not_used() {
        let mut alice = Device::new("alice@a.example", 1);
        let mut bob = Device::new("bob@b.example", 1);
        alice.start_with(&mut bob, false);
        let bob_keys = bob.keys.public_keys();
        assert!(
            alice
                .sessions
                .has_current_session(bob.user, bob.id, &bob_keys)
        );
        // Bob's device 1 comes back with new keys (reset, or re-registered).
        let reset = Device::new("bob@b.example", 1);
        let new_keys = reset.keys.public_keys();
        assert!(
            !alice
                .sessions
                .has_current_session(bob.user, bob.id, &new_keys)
        );
        assert!(
            !alice.sessions.has_session(bob.user, bob.id),
            "the old session was dropped"
        );
    }
}
