//! A user's device list, signed by the account's master key.
//!
//! The broker publishes each user's [`SignedDeviceList`]; clients trust a device's keys only
//! after [`SignedDeviceList::verify`] (and, for a contact, the master key pin in
//! [`Pins`](super::Pins)).
//!
//! # Encoding
//!
//! [`SignedDeviceList::bytes`] is MessagePack with structs as positional arrays:
//!
//! ```text
//! [ u8 format = 1, str user, u64 version, bin master_key (32),
//!   [ [u32 device_id, bin PublicDeviceKeys (97, its own versioned encoding)], ... ] ]
//! ```
//!
//! The signature is Ed25519 (strict verification) by the master key over
//! `"sealpost device list v1" ‖ 0x00 ‖ bytes`, so a device-list signature can never be
//! mistaken for a signature made in any other context. The verifier checks the exact bytes
//! it was given and decodes those; no canonical re-encoding is needed.
//!
//! # Versions
//!
//! `version` increases by at least one with every change the user's devices sign. A verifier
//! remembers, per contact, the last version it accepted and a BLAKE3 digest of its bytes
//! ([`SeenDeviceList`]); a lower version is a rollback, and the same version with different
//! bytes is equivocation (two lists for one version). Both are rejected.
//!
//! Limitation: two of the user's own devices editing the list at once would sign two lists
//! with the same version. The broker stores the list as opaque bytes and cannot arbitrate, so
//! the SDK must serialize edits (re-fetch, verify, bump, sign, upload).
//!
//! # Published blob
//!
//! What the broker stores and serves (`/v1/accounts/{h}/device-list`, opaque to it) is
//! [`SignedDeviceList::to_bytes`]:
//!
//! ```text
//! +--------+-----------------+----------------------------+
//! | u8 = 1 | signature [64]  | bytes (the list, as above) |
//! +--------+-----------------+----------------------------+
//! ```

use std::collections::HashSet;

use ed25519_dalek::{Signature, VerifyingKey};
use sealpost_proto::limits::{MAX_DEVICES_PER_USER, MAX_HANDLE_BYTES};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{
    decode_exact,
    identity::{MasterKey, PublicDeviceKeys},
};

/// Domain-separation context of device-list signatures.
pub const DEVICE_LIST_CONTEXT: &str = "sealpost device list v1";

/// Format byte at the start of the signed MessagePack array.
const FORMAT: u8 = 1;

/// Upper bound on a signed list's bytes (16 devices of 97-byte keys fit many times over);
/// checked before decoding anything.
pub const MAX_DEVICE_LIST_BYTES: usize = 16 * 1024;

/// Why a device list was refused. `Display` never names users or keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceListError {
    /// The bytes are not a device list this build understands.
    #[error("malformed device list")]
    Malformed,
    /// The list declares a format this build does not know.
    #[error("unsupported device list format {0}")]
    UnsupportedFormat(u8),
    /// Larger than [`MAX_DEVICE_LIST_BYTES`].
    #[error("device list too large")]
    TooLarge,
    /// The master key in the list is not a valid Ed25519 key, or the signature does not
    /// verify under it.
    #[error("device list signature does not verify")]
    BadSignature,
    /// The list is for a different user than the one asked for.
    #[error("device list is for a different user")]
    WrongUser {
        /// The user the caller asked for.
        expected: String,
        /// The user the list names.
        got: String,
    },
    /// The list is signed by a master key other than the pinned one.
    #[error("device list is signed by a master key other than the pinned one")]
    MasterKeyMismatch {
        /// The pinned master key.
        expected: [u8; 32],
        /// The master key that signed this list.
        got: [u8; 32],
    },
    /// The version is lower than one already accepted.
    #[error("device list version {got} is older than the accepted version {seen}")]
    Rollback {
        /// Last accepted version.
        seen: u64,
        /// Version of this list.
        got: u64,
    },
    /// Same version as the accepted list, different contents.
    #[error("two different device lists claim version {0}")]
    Equivocation(u64),
    /// A device id appears twice.
    #[error("device {0} listed twice")]
    DuplicateDevice(u32),
    /// More devices than `MAX_DEVICES_PER_USER`.
    #[error("too many devices in list")]
    TooManyDevices,
    /// [`DeviceList::sign`] was given a master key other than the list's `master_key`.
    #[error("signing key does not match the list's master key")]
    WrongSigningKey,
}

/// A user's devices and their public keys, as the master key vouches for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    /// The user's handle (`name@domain`).
    pub user: String,
    /// Monotonic version: every signed change increases it.
    pub version: u64,
    /// Devices by id, with their public keys.
    pub devices: Vec<(u32, PublicDeviceKeys)>,
    /// The public master key that signs this list.
    pub master_key: [u8; 32],
}

/// Wire form of [`DeviceList`] (see the module doc).
#[derive(Serialize, Deserialize)]
struct ListWire(u8, String, u64, ByteBuf, Vec<(u32, ByteBuf)>);

impl DeviceList {
    /// The keys of device `id`, if listed.
    pub fn device(&self, id: u32) -> Option<&PublicDeviceKeys> {
        self.devices
            .iter()
            .find(|(d, _)| *d == id)
            .map(|(_, keys)| keys)
    }

    fn check_devices(&self) -> Result<(), DeviceListError> {
        if self.devices.len() > MAX_DEVICES_PER_USER {
            return Err(DeviceListError::TooManyDevices);
        }
        let mut ids = HashSet::with_capacity(self.devices.len());
        for (id, _) in &self.devices {
            if !ids.insert(*id) {
                return Err(DeviceListError::DuplicateDevice(*id));
            }
        }
        Ok(())
    }

    /// Encodes and signs with `master`, whose public key must be `self.master_key`.
    pub fn sign(&self, master: &MasterKey) -> Result<SignedDeviceList, DeviceListError> {
        if master.public_key() != self.master_key {
            return Err(DeviceListError::WrongSigningKey);
        }
        self.check_devices()?;
        if self.user.len() > MAX_HANDLE_BYTES {
            return Err(DeviceListError::Malformed);
        }
        let wire = ListWire(
            FORMAT,
            self.user.clone(),
            self.version,
            ByteBuf::from(self.master_key.to_vec()),
            self.devices
                .iter()
                .map(|(id, keys)| (*id, ByteBuf::from(keys.to_bytes().to_vec())))
                .collect(),
        );
        let bytes = rmp_serde::to_vec(&wire).expect("a device list always encodes");
        if bytes.len() > MAX_DEVICE_LIST_BYTES {
            return Err(DeviceListError::TooLarge);
        }
        let signature = master.sign(&signed_message(&bytes));
        Ok(SignedDeviceList { bytes, signature })
    }
}

fn signed_message(bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(DEVICE_LIST_CONTEXT.len() + 1 + bytes.len());
    message.extend_from_slice(DEVICE_LIST_CONTEXT.as_bytes());
    message.push(0);
    message.extend_from_slice(bytes);
    message
}

/// What a verifier remembers of the last device list it accepted for a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenDeviceList {
    /// The accepted version.
    pub version: u64,
    /// BLAKE3 of the accepted list's signed bytes.
    pub digest: [u8; 32],
}

/// A device list as published: the signed bytes and the master key's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDeviceList {
    /// The encoded [`DeviceList`] (see the module doc).
    pub bytes: Vec<u8>,
    /// Ed25519 signature by the list's master key.
    pub signature: [u8; 64],
}

impl SignedDeviceList {
    /// Version byte of the published blob.
    pub const BLOB_VERSION: u8 = 1;

    /// The published blob (see the module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 64 + self.bytes.len());
        out.push(Self::BLOB_VERSION);
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.bytes);
        out
    }

    /// Splits a published blob; nothing is verified yet (see [`SignedDeviceList::verify`]).
    pub fn from_bytes(blob: &[u8]) -> Result<Self, DeviceListError> {
        let (&version, rest) = blob.split_first().ok_or(DeviceListError::Malformed)?;
        if version != Self::BLOB_VERSION {
            return Err(DeviceListError::UnsupportedFormat(version));
        }
        let (signature, bytes) = rest
            .split_first_chunk::<64>()
            .ok_or(DeviceListError::Malformed)?;
        if bytes.len() > MAX_DEVICE_LIST_BYTES {
            return Err(DeviceListError::TooLarge);
        }
        Ok(Self {
            bytes: bytes.to_vec(),
            signature: *signature,
        })
    }

    /// The [`SeenDeviceList`] to remember once this list (with `version`) is accepted.
    pub fn seen(&self, version: u64) -> SeenDeviceList {
        SeenDeviceList {
            version,
            digest: *blake3::hash(&self.bytes).as_bytes(),
        }
    }

    /// Verifies and decodes the list.
    ///
    /// Checks, in order: size and format, the signature under the master key the list names,
    /// that the list is for `expected_user`, that the master key is `expected_master` (the
    /// pin; `None` on first contact), that the version is not below `previous` (nor equal with
    /// different bytes), and that device ids are unique and within limits.
    pub fn verify(
        &self,
        expected_user: &str,
        expected_master: Option<&[u8; 32]>,
        previous: Option<&SeenDeviceList>,
    ) -> Result<DeviceList, DeviceListError> {
        if self.bytes.len() > MAX_DEVICE_LIST_BYTES {
            return Err(DeviceListError::TooLarge);
        }
        let wire: ListWire = decode_exact(&self.bytes).ok_or(DeviceListError::Malformed)?;
        let ListWire(format, user, version, master, devices) = wire;
        if format != FORMAT {
            return Err(DeviceListError::UnsupportedFormat(format));
        }
        let master_key: [u8; 32] = master
            .as_slice()
            .try_into()
            .map_err(|_| DeviceListError::Malformed)?;

        let verifying_key =
            VerifyingKey::from_bytes(&master_key).map_err(|_| DeviceListError::BadSignature)?;
        verifying_key
            .verify_strict(
                &signed_message(&self.bytes),
                &Signature::from_bytes(&self.signature),
            )
            .map_err(|_| DeviceListError::BadSignature)?;

        if user != expected_user {
            return Err(DeviceListError::WrongUser {
                expected: expected_user.to_owned(),
                got: user,
            });
        }
        if let Some(expected) = expected_master
            && *expected != master_key
        {
            return Err(DeviceListError::MasterKeyMismatch {
                expected: *expected,
                got: master_key,
            });
        }
        if let Some(previous) = previous {
            if version < previous.version {
                return Err(DeviceListError::Rollback {
                    seen: previous.version,
                    got: version,
                });
            }
            if version == previous.version && self.seen(version) != *previous {
                return Err(DeviceListError::Equivocation(version));
            }
        }

        let devices = devices
            .into_iter()
            .map(|(id, keys)| {
                PublicDeviceKeys::from_bytes(&keys)
                    .map(|keys| (id, keys))
                    .map_err(|_| DeviceListError::Malformed)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let list = DeviceList {
            user,
            version,
            devices,
            master_key,
        };
        list.check_devices()?;
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::identity::DeviceKeys;

    fn list(master: &MasterKey, version: u64, devices: u32) -> DeviceList {
        DeviceList {
            user: "alice@a.example".into(),
            version,
            devices: (1..=devices)
                .map(|id| (id, DeviceKeys::generate().public_keys()))
                .collect(),
            master_key: master.public_key(),
        }
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let master = MasterKey::generate();
        let list = list(&master, 3, 2);
        let signed = list.sign(&master).expect("signs");
        let verified = signed
            .verify("alice@a.example", Some(&master.public_key()), None)
            .expect("verifies");
        assert_eq!(verified, list);
        assert_eq!(verified.device(2), Some(&list.devices[1].1));
        assert_eq!(verified.device(9), None);
        // First contact: no pin yet.
        assert_eq!(signed.verify("alice@a.example", None, None), Ok(list));
    }

    #[test]
    fn published_blob_round_trips() {
        let master = MasterKey::generate();
        let signed = list(&master, 1, 2).sign(&master).expect("signs");
        let blob = signed.to_bytes();
        assert_eq!(blob[0], 1);
        assert_eq!(SignedDeviceList::from_bytes(&blob), Ok(signed.clone()));
        assert_eq!(
            SignedDeviceList::from_bytes(&blob[..64]),
            Err(DeviceListError::Malformed)
        );
        assert_eq!(
            SignedDeviceList::from_bytes(&[]),
            Err(DeviceListError::Malformed)
        );
        let mut newer = blob.clone();
        newer[0] = 2;
        assert_eq!(
            SignedDeviceList::from_bytes(&newer),
            Err(DeviceListError::UnsupportedFormat(2))
        );
        // Well within the broker's 64 KiB limit for a full list.
        let full = list(
            &master,
            1,
            u32::try_from(MAX_DEVICES_PER_USER).expect("small"),
        );
        assert!(full.sign(&master).expect("signs").to_bytes().len() < 4096);
    }

    #[test]
    fn bad_signature_is_rejected() {
        let master = MasterKey::generate();
        let signed = list(&master, 1, 1).sign(&master).expect("signs");

        let mut bad_sig = signed.clone();
        bad_sig.signature[0] ^= 1;
        assert_eq!(
            bad_sig.verify("alice@a.example", None, None),
            Err(DeviceListError::BadSignature)
        );

        // Changing any signed byte (here: inside the last device's keys) breaks the signature.
        let mut tampered = signed.clone();
        let last = tampered.bytes.len() - 1;
        tampered.bytes[last] ^= 1;
        assert_eq!(
            tampered.verify("alice@a.example", None, None),
            Err(DeviceListError::BadSignature)
        );

        // A signature over the bare bytes (no context) does not verify: domain separation.
        let mut no_context = signed.clone();
        no_context.signature = master.sign(&signed.bytes);
        assert_eq!(
            no_context.verify("alice@a.example", None, None),
            Err(DeviceListError::BadSignature)
        );

        // Garbage is malformed, not a panic.
        let garbage = SignedDeviceList {
            bytes: vec![0xc1, 0xff, 0x00],
            signature: [0; 64],
        };
        assert_eq!(
            garbage.verify("alice@a.example", None, None),
            Err(DeviceListError::Malformed)
        );
    }

    #[test]
    fn wrong_user_and_master_change_are_rejected() {
        let master = MasterKey::generate();
        let signed = list(&master, 1, 1).sign(&master).expect("signs");
        assert_eq!(
            signed.verify("mallory@a.example", None, None),
            Err(DeviceListError::WrongUser {
                expected: "mallory@a.example".into(),
                got: "alice@a.example".into()
            })
        );

        // A list signed by a new master key (say, the operator's) for the same user.
        let other = MasterKey::generate();
        let forged = list(&other, 2, 1).sign(&other).expect("signs");
        assert_eq!(
            forged.verify("alice@a.example", Some(&master.public_key()), None),
            Err(DeviceListError::MasterKeyMismatch {
                expected: master.public_key(),
                got: other.public_key()
            })
        );

        // Signing with a key other than the list's master key is refused up front.
        assert_eq!(
            list(&master, 1, 1).sign(&other),
            Err(DeviceListError::WrongSigningKey)
        );
    }

    #[test]
    fn rollback_and_equivocation_are_rejected() {
        let master = MasterKey::generate();
        let v5 = list(&master, 5, 2).sign(&master).expect("signs");
        let seen = v5.seen(5);

        // Same list again: fine.
        v5.verify("alice@a.example", Some(&master.public_key()), Some(&seen))
            .expect("same list");

        let v4 = list(&master, 4, 1).sign(&master).expect("signs");
        assert_eq!(
            v4.verify("alice@a.example", Some(&master.public_key()), Some(&seen)),
            Err(DeviceListError::Rollback { seen: 5, got: 4 })
        );

        let other_v5 = list(&master, 5, 3).sign(&master).expect("signs");
        assert_eq!(
            other_v5.verify("alice@a.example", Some(&master.public_key()), Some(&seen)),
            Err(DeviceListError::Equivocation(5))
        );

        let v6 = list(&master, 6, 3).sign(&master).expect("signs");
        assert_eq!(
            v6.verify("alice@a.example", None, Some(&seen))
                .map(|l| l.version),
            Ok(6)
        );
    }

    #[test]
    fn duplicate_and_too_many_devices_are_rejected() {
        let master = MasterKey::generate();
        let mut dup = list(&master, 1, 2);
        dup.devices[1].0 = 1;
        assert_eq!(dup.sign(&master), Err(DeviceListError::DuplicateDevice(1)));

        // A signed list with duplicates (made by hand) is refused by the verifier too.
        let keys = DeviceKeys::generate().public_keys().to_bytes().to_vec();
        let wire = ListWire(
            FORMAT,
            "alice@a.example".into(),
            1,
            ByteBuf::from(master.public_key().to_vec()),
            vec![(1, ByteBuf::from(keys.clone())), (1, ByteBuf::from(keys))],
        );
        let bytes = rmp_serde::to_vec(&wire).expect("encodes");
        let signature = master.sign(&signed_message(&bytes));
        let signed = SignedDeviceList { bytes, signature };
        assert_eq!(
            signed.verify("alice@a.example", None, None),
            Err(DeviceListError::DuplicateDevice(1))
        );

        let too_many = list(
            &master,
            1,
            u32::try_from(MAX_DEVICES_PER_USER + 1).expect("small"),
        );
        assert_eq!(too_many.sign(&master), Err(DeviceListError::TooManyDevices));
    }
}
