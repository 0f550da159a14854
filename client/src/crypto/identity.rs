//! Account and device identities.
//!
//! - [`MasterKey`]: the account's Ed25519 signing key. Every device of the user holds it (a
//!   new device receives it when it is linked) and it signs the user's [`DeviceList`]. Its
//!   public half is what contacts pin and what safety numbers are made from.
//! - [`DeviceKeys`]: one device's secrets — a vodozemac Olm [`Account`] (Curve25519 identity
//!   key, Ed25519 signing key, one-time keys, fallback key) and a separate X25519 key pair
//!   used only as the HPKE recipient key of sealed sender ([`SealSecretKey`]). Keeping the
//!   sealing key apart from the Olm identity key means neither protocol ever uses the other's
//!   key in a second role.
//! - [`PublicDeviceKeys`]: the public halves, with a versioned byte encoding; this blob is
//!   what the broker publishes as a device's opaque `identity_keys`.
//! - [`SignedOneTimeKey`]: a one-time or fallback key signed by the device's Ed25519 key, so
//!   that the key directory cannot hand out Curve25519 keys of its own.
//!
//! Secret types here have no `Debug` and are zeroized on drop (by ed25519-dalek, vodozemac
//! and x25519-dalek respectively); byte exports are returned as [`Zeroizing`].
//!
//! [`DeviceList`]: super::DeviceList

use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey};
use hpke::{Deserializable as _, Kem as _, Serializable as _, kem::X25519HkdfSha256};
use rand::rngs::OsRng;
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature, olm::Account};
use zeroize::{Zeroize as _, Zeroizing};

/// Errors from decoding or checking public key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The encoding starts with a version byte this build does not know.
    #[error("unsupported key encoding version {0}")]
    UnsupportedVersion(u8),
    /// The encoding has the wrong length for its version.
    #[error("key encoding has {got} bytes, expected {expected}")]
    BadLength {
        /// Length the version requires.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// An Ed25519 public key is not a valid curve point.
    #[error("invalid Ed25519 public key")]
    InvalidEd25519Key,
    /// A one-time key's kind byte is neither one-time nor fallback.
    #[error("unknown one-time key kind {0}")]
    UnknownKind(u8),
    /// A signature does not verify under the device's Ed25519 key.
    #[error("bad signature on a one-time key")]
    BadSignature,
}

/// The account's master signing key (Ed25519).
///
/// Held by each of the user's devices; signs the user's device list. No `Debug`; the inner
/// ed25519-dalek key zeroizes itself on drop.
pub struct MasterKey(SigningKey);

impl MasterKey {
    /// A new random master key, from the operating system's RNG.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut OsRng))
    }

    /// Imports a master key exported by [`MasterKey::to_bytes`] (device linking).
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(secret))
    }

    /// Exports the 32-byte secret seed, for linking a new device. The caller must move it only
    /// over an end-to-end encrypted channel; the copy is wiped when dropped.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public master key (Ed25519), as contacts pin it.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs `message` as-is; callers prepend their own domain-separation context.
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

/// The X25519 secret key that opens sealed envelopes addressed to this device (HPKE
/// recipient key). No `Debug`; zeroized on drop.
#[derive(Clone)]
pub struct SealSecretKey(<X25519HkdfSha256 as hpke::Kem>::PrivateKey);

impl SealSecretKey {
    /// A new random key pair from the operating system's RNG (via hpke's `getrandom`).
    fn generate() -> Self {
        let (secret, _public) = X25519HkdfSha256::gen_keypair();
        Self(secret)
    }

    /// Restores a key saved with [`SealSecretKey::to_bytes`].
    pub(crate) fn from_bytes(bytes: &[u8; 32]) -> Self {
        // hpke accepts (and clamps) any 32 bytes, so this cannot fail.
        Self(
            <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(bytes)
                .expect("any 32 bytes are an X25519 secret key"),
        )
    }

    /// The secret key bytes, for the encrypted state file.
    pub(crate) fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        let mut array = self.0.to_bytes();
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&array);
        array.as_mut_slice().zeroize();
        out
    }

    /// The matching public key, published as [`PublicDeviceKeys::seal_x25519`].
    pub fn public_key(&self) -> [u8; 32] {
        let public = X25519HkdfSha256::sk_to_pk(&self.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(&public.to_bytes());
        out
    }

    pub(crate) fn hpke_key(&self) -> &<X25519HkdfSha256 as hpke::Kem>::PrivateKey {
        &self.0
    }
}

/// The public keys of one device, as published by the broker and listed in the user's
/// signed device list.
///
/// # Encoding (version 1, 97 bytes)
///
/// ```text
/// +---------+-------------------+-----------------+--------------------+
/// | u8 = 1  | curve25519 [32]   | ed25519 [32]    | seal_x25519 [32]   |
/// +---------+-------------------+-----------------+--------------------+
/// ```
///
/// A future version changes the first byte; decoders reject versions they do not know.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicDeviceKeys {
    /// The Olm identity key (Curve25519) of the device's vodozemac account.
    pub curve25519: [u8; 32],
    /// The device's Ed25519 signing key (signs its one-time keys).
    pub ed25519: [u8; 32],
    /// The X25519 HPKE recipient key for sealed sender.
    pub seal_x25519: [u8; 32],
}

impl PublicDeviceKeys {
    /// The encoding version this build writes.
    pub const VERSION: u8 = 1;
    /// Length of a version-1 encoding.
    pub const ENCODED_LEN: usize = 1 + 3 * 32;

    /// Encodes as described in the type's documentation.
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0] = Self::VERSION;
        out[1..33].copy_from_slice(&self.curve25519);
        out[33..65].copy_from_slice(&self.ed25519);
        out[65..97].copy_from_slice(&self.seal_x25519);
        out
    }

    /// Decodes and validates (version, length, Ed25519 point).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        match bytes.first() {
            Some(&Self::VERSION) => {}
            Some(&other) => return Err(KeyError::UnsupportedVersion(other)),
            None => {
                return Err(KeyError::BadLength {
                    expected: Self::ENCODED_LEN,
                    got: 0,
                });
            }
        }
        let bytes: &[u8; Self::ENCODED_LEN] =
            bytes.try_into().map_err(|_| KeyError::BadLength {
                expected: Self::ENCODED_LEN,
                got: bytes.len(),
            })?;
        let keys = Self {
            curve25519: array32(&bytes[1..33]),
            ed25519: array32(&bytes[33..65]),
            seal_x25519: array32(&bytes[65..97]),
        };
        keys.ed25519_key()?;
        Ok(keys)
    }

    pub(crate) fn ed25519_key(&self) -> Result<Ed25519PublicKey, KeyError> {
        Ed25519PublicKey::from_slice(&self.ed25519).map_err(|_| KeyError::InvalidEd25519Key)
    }

    pub(crate) fn curve25519_key(&self) -> Curve25519PublicKey {
        Curve25519PublicKey::from_bytes(self.curve25519)
    }
}

impl fmt::Debug for PublicDeviceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicDeviceKeys")
            .field("curve25519", &Hex(&self.curve25519))
            .field("ed25519", &Hex(&self.ed25519))
            .field("seal_x25519", &Hex(&self.seal_x25519))
            .finish()
    }
}

/// Lower-case hex for `Debug` of public keys.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

pub(crate) fn array32(slice: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(slice);
    out
}

/// Domain separation for one-time key signatures (Ed25519 over context ‖ 0x00 ‖ kind ‖ key).
const ONE_TIME_KEY_CONTEXT: &[u8] = b"sealpost one-time key v1";

/// A one-time (or fallback) Curve25519 key, signed by its device's Ed25519 key.
///
/// # Encoding (version 1, 98 bytes)
///
/// ```text
/// +--------+----------------------------+-----------+----------------+
/// | u8 = 1 | u8 kind: 0 one-time,       | key [32]  | signature [64] |
/// |        |          1 fallback        |           |                |
/// +--------+----------------------------+-----------+----------------+
/// ```
///
/// The signature is Ed25519 over `"sealpost one-time key v1" ‖ 0x00 ‖ kind ‖ key`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignedOneTimeKey {
    /// The Curve25519 public key.
    pub key: [u8; 32],
    /// Whether this is the device's fallback key (reused until replaced) rather than a
    /// one-time key (consumed by one claim).
    pub fallback: bool,
    /// The device's Ed25519 signature.
    pub signature: [u8; 64],
}

impl SignedOneTimeKey {
    /// The encoding version this build writes.
    pub const VERSION: u8 = 1;
    /// Length of a version-1 encoding.
    pub const ENCODED_LEN: usize = 1 + 1 + 32 + 64;

    fn signed_message(key: &[u8; 32], fallback: bool) -> Vec<u8> {
        let mut message = Vec::with_capacity(ONE_TIME_KEY_CONTEXT.len() + 2 + 32);
        message.extend_from_slice(ONE_TIME_KEY_CONTEXT);
        message.push(0);
        message.push(u8::from(fallback));
        message.extend_from_slice(key);
        message
    }

    fn sign(account: &Account, key: Curve25519PublicKey, fallback: bool) -> Self {
        let key = key.to_bytes();
        let signature = account
            .sign(Self::signed_message(&key, fallback))
            .to_bytes();
        Self {
            key,
            fallback,
            signature,
        }
    }

    /// Checks the signature against the device's published Ed25519 key.
    pub fn verify(&self, device: &PublicDeviceKeys) -> Result<(), KeyError> {
        let signer = device.ed25519_key()?;
        let signature =
            Ed25519Signature::from_slice(&self.signature).map_err(|_| KeyError::BadSignature)?;
        signer
            .verify(&Self::signed_message(&self.key, self.fallback), &signature)
            .map_err(|_| KeyError::BadSignature)
    }

    /// Encodes as described in the type's documentation.
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0] = Self::VERSION;
        out[1] = u8::from(self.fallback);
        out[2..34].copy_from_slice(&self.key);
        out[34..98].copy_from_slice(&self.signature);
        out
    }

    /// Decodes (the signature is checked separately, by [`SignedOneTimeKey::verify`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        match bytes.first() {
            Some(&Self::VERSION) => {}
            Some(&other) => return Err(KeyError::UnsupportedVersion(other)),
            None => {
                return Err(KeyError::BadLength {
                    expected: Self::ENCODED_LEN,
                    got: 0,
                });
            }
        }
        if bytes.len() != Self::ENCODED_LEN {
            return Err(KeyError::BadLength {
                expected: Self::ENCODED_LEN,
                got: bytes.len(),
            });
        }
        let fallback = match bytes[1] {
            0 => false,
            1 => true,
            other => return Err(KeyError::UnknownKind(other)),
        };
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[34..98]);
        Ok(Self {
            key: array32(&bytes[2..34]),
            fallback,
            signature,
        })
    }
}

impl fmt::Debug for SignedOneTimeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedOneTimeKey")
            .field("key", &Hex(&self.key))
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

/// Keys generated but not yet uploaded to the key directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpublishedKeys {
    /// One-time keys, oldest first.
    pub one_time: Vec<SignedOneTimeKey>,
    /// A new fallback key, if one was generated since the last publication.
    pub fallback: Option<SignedOneTimeKey>,
}

/// One device's secret keys: the vodozemac Olm account and the sealed-sender key.
///
/// No `Debug`; persisted only through [`ClientState`](super::ClientState).
pub struct DeviceKeys {
    /// Olm identity (Curve25519 + Ed25519), one-time keys and fallback keys.
    pub(crate) account: Account,
    /// HPKE recipient key for sealed sender; deliberately not an Olm key.
    pub(crate) seal: SealSecretKey,
}

impl DeviceKeys {
    /// New random device keys with one fallback key (so a peer can always start a session,
    /// even before any one-time key is uploaded) and no one-time keys yet.
    pub fn generate() -> Self {
        let mut account = Account::new();
        account.generate_fallback_key();
        Self {
            account,
            seal: SealSecretKey::generate(),
        }
    }

    pub(crate) fn from_parts(account: Account, seal: SealSecretKey) -> Self {
        Self { account, seal }
    }

    /// The public keys to publish and to list in the signed device list.
    pub fn public_keys(&self) -> PublicDeviceKeys {
        let identity = self.account.identity_keys();
        PublicDeviceKeys {
            curve25519: identity.curve25519.to_bytes(),
            ed25519: *identity.ed25519.as_bytes(),
            seal_x25519: self.seal.public_key(),
        }
    }

    /// The secret key that opens sealed envelopes addressed to this device.
    pub fn seal_secret(&self) -> &SealSecretKey {
        &self.seal
    }

    /// Generates `count` one-time keys. If the account's store is full, the oldest unused
    /// keys are dropped to make room (vodozemac keeps at most 100 locally).
    pub fn generate_one_time_keys(&mut self, count: usize) {
        self.account.generate_one_time_keys(count);
    }

    /// How many one-time keys the device should keep published (vodozemac's advice: 50).
    pub fn max_published_one_time_keys(&self) -> usize {
        self.account.max_number_of_one_time_keys()
    }

    /// Number of one-time keys stored locally (published or not, but not yet used).
    pub fn stored_one_time_key_count(&self) -> usize {
        self.account.stored_one_time_key_count()
    }

    /// Replaces the fallback key. The previous one stays usable until
    /// [`DeviceKeys::forget_previous_fallback_key`], so sessions started from it in flight
    /// still open.
    pub fn rotate_fallback_key(&mut self) {
        self.account.generate_fallback_key();
    }

    /// Drops the previous fallback key's secret.
    pub fn forget_previous_fallback_key(&mut self) -> bool {
        self.account.forget_fallback_key()
    }

    /// The keys to upload, signed by this device's Ed25519 key.
    pub fn unpublished_keys(&self) -> UnpublishedKeys {
        let mut one_time: Vec<_> = self.account.one_time_keys().into_iter().collect();
        one_time.sort_by_key(|(id, _)| *id);
        UnpublishedKeys {
            one_time: one_time
                .into_iter()
                .map(|(_, key)| SignedOneTimeKey::sign(&self.account, key, false))
                .collect(),
            fallback: self
                .account
                .fallback_key()
                .into_values()
                .next()
                .map(|key| SignedOneTimeKey::sign(&self.account, key, true)),
        }
    }

    /// Marks everything [`DeviceKeys::unpublished_keys`] returned as uploaded. Call this only
    /// after the broker acknowledged the upload.
    pub fn mark_keys_as_published(&mut self) {
        self.account.mark_keys_as_published();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_round_trips_through_bytes() {
        let master = MasterKey::generate();
        let copy = MasterKey::from_bytes(&master.to_bytes());
        assert_eq!(master.public_key(), copy.public_key());
        assert_eq!(master.sign(b"x"), copy.sign(b"x"));
        assert_ne!(MasterKey::generate().public_key(), master.public_key());
    }

    #[test]
    fn public_device_keys_encoding() {
        let device = DeviceKeys::generate();
        let public = device.public_keys();
        let bytes = public.to_bytes();
        assert_eq!(bytes.len(), 97);
        assert_eq!(bytes[0], 1);
        assert_eq!(PublicDeviceKeys::from_bytes(&bytes), Ok(public));

        assert_eq!(
            PublicDeviceKeys::from_bytes(&bytes[..96]),
            Err(KeyError::BadLength {
                expected: 97,
                got: 96
            })
        );
        assert_eq!(
            PublicDeviceKeys::from_bytes(&[]),
            Err(KeyError::BadLength {
                expected: 97,
                got: 0
            })
        );
        let mut wrong_version = bytes;
        wrong_version[0] = 2;
        assert_eq!(
            PublicDeviceKeys::from_bytes(&wrong_version),
            Err(KeyError::UnsupportedVersion(2))
        );

        // The seal key is separate from the Olm identity key.
        assert_ne!(public.seal_x25519, public.curve25519);
    }

    #[test]
    fn invalid_ed25519_point_is_rejected() {
        let mut bytes = DeviceKeys::generate().public_keys().to_bytes();
        // y = 2 is not on the curve (its x² is not a square).
        let mut y = [0u8; 32];
        y[0] = 2;
        bytes[33..65].copy_from_slice(&y);
        assert_eq!(
            PublicDeviceKeys::from_bytes(&bytes),
            Err(KeyError::InvalidEd25519Key)
        );
    }

    #[test]
    fn seal_key_round_trips() {
        let seal = SealSecretKey::generate();
        let copy = SealSecretKey::from_bytes(&seal.to_bytes());
        assert_eq!(seal.public_key(), copy.public_key());
    }

    #[test]
    fn one_time_keys_are_signed_and_published_once() {
        let mut device = DeviceKeys::generate();
        device.generate_one_time_keys(3);
        let public = device.public_keys();
        let unpublished = device.unpublished_keys();
        assert_eq!(unpublished.one_time.len(), 3);
        let fallback = unpublished
            .fallback
            .expect("generate() creates a fallback key");
        assert!(fallback.fallback);
        for key in unpublished.one_time.iter().chain([&fallback]) {
            key.verify(&public).expect("signed by the device");
            let decoded = SignedOneTimeKey::from_bytes(&key.to_bytes()).expect("decodes");
            assert_eq!(&decoded, key);
        }

        device.mark_keys_as_published();
        let after = device.unpublished_keys();
        assert!(after.one_time.is_empty());
        assert!(after.fallback.is_none());
        assert_eq!(device.stored_one_time_key_count(), 3);
    }

    #[test]
    fn one_time_key_signature_is_checked() {
        let mut device = DeviceKeys::generate();
        device.generate_one_time_keys(1);
        let key = device.unpublished_keys().one_time[0];
        let other = DeviceKeys::generate().public_keys();
        assert_eq!(key.verify(&other), Err(KeyError::BadSignature));

        // Flipping the kind (one-time → fallback) breaks the signature.
        let mut as_fallback = key;
        as_fallback.fallback = true;
        assert_eq!(
            as_fallback.verify(&device.public_keys()),
            Err(KeyError::BadSignature)
        );

        let mut bytes = key.to_bytes();
        bytes[1] = 7;
        assert_eq!(
            SignedOneTimeKey::from_bytes(&bytes),
            Err(KeyError::UnknownKind(7))
        );
    }
}
