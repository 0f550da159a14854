//! Sealed sender: an Olm message and its sender's identity, sealed to one recipient device.
//!
//! The broker needs the recipient (it is in the frame around this) but never the sender, so
//! the sender's handle and device travel *inside* the ciphertext. The recipient opens the
//! envelope with its X25519 seal key, then [`Sessions::decrypt`](super::Sessions::decrypt)
//! proves the claimed sender by checking that the Olm session belongs to that sender's device.
//!
//! # Construction
//!
//! HPKE (RFC 9180), base mode, suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
//! ChaCha20Poly1305, single shot, with
//!
//! - `info` = `"sealpost sealed sender v1"` (a constant: binds the key schedule to this use);
//! - `aad`  = `version ‖ u16 BE len(recipient user) ‖ recipient user ‖ u32 BE recipient
//!   device`, so an envelope re-addressed to another device (or user) does not open there.
//!
//! # Bytes
//!
//! ```text
//! +-----------+-----------------------------+--------------------------------------+
//! | u8 = 1    | HPKE encapsulated key [32]  | ciphertext of the padded content     |
//! | version   | (fresh per envelope)        | + 16-byte Poly1305 tag               |
//! +-----------+-----------------------------+--------------------------------------+
//! ```
//!
//! Nothing outside the ciphertext depends on the sender: the encapsulated key is a fresh
//! ephemeral key and the length is padded. The content is MessagePack (positional)
//! `[str sender user, u32 sender device, u64 timestamp ms, u8 Olm kind, bin Olm message]`
//! followed by zero bytes up to a multiple of [`PADDING_BLOCK`], which hides the length of
//! the sender's handle and rounds the message size.

use hpke::{
    Deserializable as _, OpModeR, OpModeS, Serializable as _, aead::ChaCha20Poly1305,
    kdf::HkdfSha256, kem::X25519HkdfSha256,
};
use sealpost_proto::{Handle, limits::MAX_CIPHERTEXT_BYTES};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{decode_prefix, identity::SealSecretKey, message::OlmMessage};

/// HPKE `info` for sealed sender.
pub const SEALED_SENDER_INFO: &[u8] = b"sealpost sealed sender v1";

/// The version byte this build writes.
pub const SEALED_VERSION: u8 = 1;

/// Padded content lengths are multiples of this.
pub const PADDING_BLOCK: usize = 128;

/// Length of an X25519 encapsulated key.
const ENCAPPED_LEN: usize = 32;
/// Length of the AEAD tag.
const TAG_LEN: usize = 16;

/// Why sealing or opening failed. `Display` never names users.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// The envelope starts with a version this build does not know.
    #[error("unsupported sealed envelope version {0}")]
    UnsupportedVersion(u8),
    /// Too short to be a sealed envelope.
    #[error("sealed envelope truncated")]
    Truncated,
    /// Larger than the broker accepts (`MAX_CIPHERTEXT_BYTES`).
    #[error("sealed envelope too large")]
    TooLarge,
    /// The recipient's seal key is unusable (all-zero shared secret: a low-order point).
    #[error("invalid recipient seal key")]
    InvalidRecipientKey,
    /// The envelope does not open with this device's key and address: it is for another
    /// device, or was altered.
    #[error("sealed envelope does not open")]
    OpenFailed,
    /// It opened, but the content is malformed (only a buggy or hostile sender does this).
    #[error("malformed sealed content")]
    Malformed,
}

/// Who a sealed envelope says it is from. Unauthenticated until the Olm session check in
/// [`Sessions::decrypt`](super::Sessions::decrypt) passes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SenderInfo {
    /// The sender's handle.
    pub user: String,
    /// The sender's device id.
    pub device: u32,
}

impl std::fmt::Debug for SenderInfo {
    /// Handles are user data: `Debug` shows the device only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderInfo")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// An opened envelope. `sender` is a *claim* (see [`SenderInfo`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsealed {
    /// The claimed sender.
    pub sender: SenderInfo,
    /// The sender's clock when sealing, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The Olm message to give to [`Sessions::decrypt`](super::Sessions::decrypt).
    pub olm_message: OlmMessage,
}

/// Sealed content (see the module doc).
#[derive(Serialize, Deserialize)]
struct Content(String, u32, u64, u8, ByteBuf);

fn aad(user: &str, device: u32) -> Result<Vec<u8>, SealError> {
    let len = u16::try_from(user.len()).map_err(|_| SealError::TooLarge)?;
    let mut aad = Vec::with_capacity(1 + 2 + user.len() + 4);
    aad.push(SEALED_VERSION);
    aad.extend_from_slice(&len.to_be_bytes());
    aad.extend_from_slice(user.as_bytes());
    aad.extend_from_slice(&device.to_be_bytes());
    Ok(aad)
}

/// Size of a placeholder copy when no real copy gives the size: version byte, encapsulated
/// key, one padding block, tag.
pub const PLACEHOLDER_BYTES: usize = 1 + ENCAPPED_LEN + PADDING_BLOCK + TAG_LEN;

/// A copy for a device that gets no real one (the sending device, in its own account's
/// fan-out): `size` random bytes behind a sealed envelope's version byte, so that the broker
/// cannot tell it from the real copies of the same send.
pub fn placeholder(size: usize) -> Vec<u8> {
    use rand::RngCore as _;
    let mut bytes = vec![0u8; size.max(1)];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] = SEALED_VERSION;
    bytes
}

/// Seals `olm_message` and the sender's identity to one recipient device.
pub fn seal(
    recipient_user: &str,
    recipient_device: u32,
    recipient_seal_pk: &[u8; 32],
    sender: &SenderInfo,
    timestamp_ms: u64,
    olm_message: &OlmMessage,
) -> Result<Vec<u8>, SealError> {
    let (kind, olm_bytes) = olm_message.to_parts();
    let content = Content(
        sender.user.clone(),
        sender.device,
        timestamp_ms,
        kind,
        ByteBuf::from(olm_bytes),
    );
    let mut plaintext = rmp_serde::to_vec(&content).expect("sealed content always encodes");
    plaintext.resize(plaintext.len().div_ceil(PADDING_BLOCK) * PADDING_BLOCK, 0);
    if 1 + ENCAPPED_LEN + plaintext.len() + TAG_LEN > MAX_CIPHERTEXT_BYTES {
        return Err(SealError::TooLarge);
    }

    let recipient = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(recipient_seal_pk)
        .map_err(|_| SealError::InvalidRecipientKey)?;
    let (encapped, ciphertext) =
        hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeS::Base,
            &recipient,
            SEALED_SENDER_INFO,
            &plaintext,
            &aad(recipient_user, recipient_device)?,
        )
        .map_err(|_| SealError::InvalidRecipientKey)?;

    let mut out = Vec::with_capacity(1 + ENCAPPED_LEN + ciphertext.len());
    out.push(SEALED_VERSION);
    out.extend_from_slice(&encapped.to_bytes());
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Opens an envelope addressed to (`own_user`, `own_device`).
pub fn open(
    own_user: &str,
    own_device: u32,
    own_seal_sk: &SealSecretKey,
    bytes: &[u8],
) -> Result<Unsealed, SealError> {
    if bytes.len() > MAX_CIPHERTEXT_BYTES {
        return Err(SealError::TooLarge);
    }
    let (version, rest) = bytes.split_first().ok_or(SealError::Truncated)?;
    if *version != SEALED_VERSION {
        return Err(SealError::UnsupportedVersion(*version));
    }
    if rest.len() < ENCAPPED_LEN + TAG_LEN {
        return Err(SealError::Truncated);
    }
    let (encapped, ciphertext) = rest.split_at(ENCAPPED_LEN);
    let encapped = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(encapped)
        .map_err(|_| SealError::OpenFailed)?;
    let plaintext = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        own_seal_sk.hpke_key(),
        &encapped,
        SEALED_SENDER_INFO,
        ciphertext,
        &aad(own_user, own_device).map_err(|_| SealError::OpenFailed)?,
    )
    .map_err(|_| SealError::OpenFailed)?;

    let (Content(user, device, timestamp_ms, kind, olm_bytes), padding) =
        decode_prefix::<Content>(&plaintext).ok_or(SealError::Malformed)?;
    if padding.iter().any(|&b| b != 0) || plaintext.len() % PADDING_BLOCK != 0 {
        return Err(SealError::Malformed);
    }
    Handle::parse(&user).map_err(|_| SealError::Malformed)?;
    let olm_message = OlmMessage::from_parts(kind, &olm_bytes).ok_or(SealError::Malformed)?;
    Ok(Unsealed {
        sender: SenderInfo { user, device },
        timestamp_ms,
        olm_message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{
        identity::{DeviceKeys, SignedOneTimeKey},
        payload::Payload,
        session::{SessionError, Sessions},
    };

    const ALICE: &str = "alice@a.example";
    const BOB: &str = "bob@b.example";
    const CAROL: &str = "carol@c.example";

    /// A device with its Olm sessions, as a client holds it.
    struct Device {
        user: &'static str,
        id: u32,
        keys: DeviceKeys,
        sessions: Sessions,
        /// What the key directory holds for this device: one-time keys (claimed from the
        /// end) and the fallback key (never consumed).
        one_time: Vec<SignedOneTimeKey>,
        fallback: SignedOneTimeKey,
    }

    impl Device {
        fn new(user: &'static str, id: u32) -> Self {
            let mut keys = DeviceKeys::generate();
            keys.generate_one_time_keys(3);
            let published = keys.unpublished_keys();
            keys.mark_keys_as_published();
            Self {
                user,
                id,
                keys,
                sessions: Sessions::new(user.into(), id),
                one_time: published.one_time,
                fallback: published.fallback.expect("fallback key"),
            }
        }

        /// A claim at the key directory: a one-time key while any is left, else the fallback.
        fn claim(&mut self) -> SignedOneTimeKey {
            self.one_time.pop().unwrap_or(self.fallback)
        }

        fn info(&self) -> SenderInfo {
            SenderInfo {
                user: self.user.into(),
                device: self.id,
            }
        }

        /// Encrypts and seals a text for `to` (starting a session if needed).
        fn send(&mut self, to: &mut Device, body: &str, at: u64) -> Vec<u8> {
            if !self.sessions.has_session(to.user, to.id) {
                let otk = to.claim();
                self.sessions
                    .create_outbound(&self.keys, to.user, to.id, &to.keys.public_keys(), &otk)
                    .expect("session");
            }
            let olm = self
                .sessions
                .encrypt(
                    to.user,
                    to.id,
                    &Payload::Text {
                        body: body.into(),
                        link: None,
                    },
                )
                .expect("encrypts");
            seal(
                to.user,
                to.id,
                &to.keys.public_keys().seal_x25519,
                &self.info(),
                at,
                &olm,
            )
            .expect("seals")
        }

        /// Opens and decrypts, looking the claimed sender up in `directory` (the verified
        /// device lists this device knows).
        fn receive(
            &mut self,
            directory: &[&Device],
            sealed: &[u8],
        ) -> Result<(SenderInfo, u64, Payload), SessionError> {
            let unsealed =
                open(self.user, self.id, self.keys.seal_secret(), sealed).expect("opens");
            let sender_keys = directory
                .iter()
                .find(|d| d.user == unsealed.sender.user && d.id == unsealed.sender.device)
                .map(|d| d.keys.public_keys())
                .ok_or(SessionError::NoSession)?;
            let payload = self.sessions.decrypt(
                &mut self.keys,
                &unsealed.sender,
                &sender_keys,
                &unsealed.olm_message,
            )?;
            Ok((unsealed.sender, unsealed.timestamp_ms, payload))
        }
    }

    fn text(body: &str) -> Payload {
        Payload::Text {
            body: body.into(),
            link: None,
        }
    }

    #[test]
    fn conversation_through_sealed_envelopes() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        let mut at = 1_700_000_000_000;
        // Alice speaks first (pre-key messages), then they alternate (normal messages), with
        // runs of several messages in one direction.
        let script: &[(bool, &str)] = &[
            (true, "hi bob"),
            (true, "are you there?"),
            (false, "hi alice"),
            (false, "yes"),
            (true, "great"),
            (false, "see you"),
            (true, "bye"),
            (true, "really bye"),
        ];
        for &(from_alice, body) in script {
            at += 1;
            let (sender, receiver) = if from_alice {
                (&mut alice, &mut bob)
            } else {
                (&mut bob, &mut alice)
            };
            let sealed = sender.send(receiver, body, at);
            let directory = [&*sender];
            let (claimed, timestamp, payload) =
                receiver.receive(&directory, &sealed).expect("delivered");
            assert_eq!(claimed, sender.info());
            assert_eq!(timestamp, at);
            assert_eq!(payload, text(body));
        }
    }

    #[test]
    fn sealed_bytes_do_not_reveal_the_sender() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        let sealed = alice.send(&mut bob, "hello", 5);
        assert_eq!(sealed[0], SEALED_VERSION);
        assert_eq!(
            (sealed.len() - 1 - ENCAPPED_LEN - TAG_LEN) % PADDING_BLOCK,
            0
        );
        let contains = |needle: &[u8]| sealed.windows(needle.len()).any(|w| w == needle);
        assert!(!contains(ALICE.as_bytes()));
        assert!(!contains(&alice.keys.public_keys().curve25519));
        assert!(!contains(&alice.keys.public_keys().ed25519));
        assert!(!contains(b"hello"));

        // Handles of different lengths give the same envelope size.
        let mut al = Device::new("al@a.example", 1);
        let mut bob2 = Device::new(BOB, 3);
        let mut alexandria = Device::new("alexandria-the-great@a.example", 1);
        assert_eq!(
            al.send(&mut bob2, "hello", 5).len(),
            alexandria.send(&mut bob2, "hello", 5).len()
        );
    }

    #[test]
    fn a_placeholder_is_shaped_like_a_sealed_envelope() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        let sealed = alice.send(&mut bob, "hi", 5);
        let decoy = placeholder(sealed.len());
        assert_eq!((decoy.len(), decoy[0]), (sealed.len(), sealed[0]));
        assert_ne!(
            placeholder(PLACEHOLDER_BYTES),
            placeholder(PLACEHOLDER_BYTES)
        );
    }

    #[test]
    fn fallback_key_once_one_time_keys_run_out() {
        let mut bob = Device::new(BOB, 2);
        let before = bob.keys.stored_one_time_key_count();
        let mut senders: Vec<Device> = (1..=5).map(|id| Device::new(ALICE, id)).collect();
        for sender in &mut senders {
            let sealed = sender.send(&mut bob, "hello", 1);
            let (_, _, payload) = bob.receive(&[&*sender], &sealed).expect("delivered");
            assert_eq!(payload, text("hello"));
        }
        // Three sessions used the three one-time keys, two used the fallback key.
        assert_eq!(before, 3);
        assert_eq!(bob.keys.stored_one_time_key_count(), 0);
        assert!(bob.one_time.is_empty());
        for sender in &mut senders {
            let reply = bob.send(sender, "ack", 2);
            assert_eq!(
                sender.receive(&[&bob], &reply).map(|r| r.2),
                Ok(text("ack"))
            );
        }
    }

    #[test]
    fn forged_sender_is_rejected() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        let carol = Device::new(CAROL, 1);

        // Alice encrypts with her own Olm session but seals claiming to be Carol.
        let otk = bob.claim();
        alice
            .sessions
            .create_outbound(&alice.keys, BOB, 2, &bob.keys.public_keys(), &otk)
            .expect("session");
        let olm = alice
            .sessions
            .encrypt(BOB, 2, &text("it's Carol"))
            .expect("encrypts");
        let sealed = seal(
            BOB,
            2,
            &bob.keys.public_keys().seal_x25519,
            &carol.info(),
            9,
            &olm,
        )
        .expect("seals");
        let directory = [&alice, &carol];
        assert_eq!(
            bob.receive(&directory, &sealed),
            Err(SessionError::ForgedSender)
        );

        // The same Olm message, honestly sealed, is accepted.
        let honest = seal(
            BOB,
            2,
            &bob.keys.public_keys().seal_x25519,
            &alice.info(),
            9,
            &olm,
        )
        .expect("seals");
        assert_eq!(
            bob.receive(&directory, &honest).map(|r| r.2),
            Ok(text("it's Carol"))
        );
    }

    #[test]
    fn tampered_envelope_is_rejected() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        let sealed = alice.send(&mut bob, "hello", 5);
        let seal_key = bob.keys.seal_secret();
        for index in [1, 1 + ENCAPPED_LEN, sealed.len() / 2, sealed.len() - 1] {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x40;
            assert_eq!(
                open(BOB, 2, seal_key, &tampered),
                Err(SealError::OpenFailed),
                "byte {index}"
            );
        }
        let mut version = sealed.clone();
        version[0] = 9;
        assert_eq!(
            open(BOB, 2, seal_key, &version),
            Err(SealError::UnsupportedVersion(9))
        );
        assert_eq!(
            open(BOB, 2, seal_key, &sealed[..40]),
            Err(SealError::Truncated)
        );
        assert_eq!(open(BOB, 2, seal_key, &[]), Err(SealError::Truncated));
        assert_eq!(
            open(BOB, 2, seal_key, &sealed[..sealed.len() - 1]),
            Err(SealError::OpenFailed)
        );
        open(BOB, 2, seal_key, &sealed).expect("the original still opens");
    }

    #[test]
    fn envelope_for_another_device_does_not_open() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        let sealed = alice.send(&mut bob, "hello", 5);
        // Bob's other device (own key) cannot open it.
        let bob_laptop = Device::new(BOB, 3);
        assert_eq!(
            open(BOB, 3, bob_laptop.keys.seal_secret(), &sealed),
            Err(SealError::OpenFailed)
        );
        // Even with the right key, a different address does not open (the AAD binds it).
        assert_eq!(
            open(BOB, 3, bob.keys.seal_secret(), &sealed),
            Err(SealError::OpenFailed)
        );
        assert_eq!(
            open(CAROL, 2, bob.keys.seal_secret(), &sealed),
            Err(SealError::OpenFailed)
        );
        assert!(open(BOB, 2, bob.keys.seal_secret(), &sealed).is_ok());
    }

    #[test]
    fn replayed_envelope_is_rejected() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        let first = alice.send(&mut bob, "pre-key", 1);
        bob.receive(&[&alice], &first).expect("delivered");
        assert_eq!(bob.receive(&[&alice], &first), Err(SessionError::Replay));

        let reply = bob.send(&mut alice, "reply", 2);
        alice.receive(&[&bob], &reply).expect("delivered");
        let normal = alice.send(&mut bob, "normal", 3);
        bob.receive(&[&alice], &normal).expect("delivered");
        assert_eq!(bob.receive(&[&alice], &normal), Err(SessionError::Replay));
    }

    #[test]
    fn low_order_recipient_key_is_refused() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        alice.send(&mut bob, "start", 1);
        let olm = alice
            .sessions
            .encrypt(BOB, 2, &text("x"))
            .expect("encrypts");
        assert_eq!(
            seal(BOB, 2, &[0; 32], &alice.info(), 1, &olm),
            Err(SealError::InvalidRecipientKey)
        );
    }

    #[test]
    fn oversized_message_is_refused() {
        let mut alice = Device::new(ALICE, 1);
        let mut bob = Device::new(BOB, 2);
        alice.send(&mut bob, "start", 1);
        let big = "x".repeat(MAX_CIPHERTEXT_BYTES);
        let olm = alice
            .sessions
            .encrypt(BOB, 2, &text(&big))
            .expect("encrypts");
        assert_eq!(
            seal(
                BOB,
                2,
                &bob.keys.public_keys().seal_x25519,
                &alice.info(),
                1,
                &olm
            ),
            Err(SealError::TooLarge)
        );
        assert_eq!(
            open(
                BOB,
                2,
                bob.keys.seal_secret(),
                &vec![1; MAX_CIPHERTEXT_BYTES + 1]
            ),
            Err(SealError::TooLarge)
        );
    }
}
