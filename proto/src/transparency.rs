//! Key transparency: what a domain's log publishes, what its auditors sign, and what comes
//! with every device list.
//!
//! Each domain keeps a verifiable append-only directory (`akd`) mapping each handle to a
//! [`value`]: its master key and the BLAKE3 digest of its signed device list. The log publishes
//! epochs; each epoch's root hash is signed by the domain's log key ([`SignedRoot`]). Brokers of
//! other domains audit the log (append-only proofs over the federation link) and sign the roots
//! they verified ([`Cosignature`]); a client checks a lookup proof against a signed root
//! ([`Evidence`]) before it trusts a device list.
//!
//! # Encodings
//!
//! Every record is MessagePack with structs as positional arrays, byte fields as `bin`, and a
//! format byte first:
//!
//! ```text
//! SignedRoot:  [ u8 = 1, str domain, u64 epoch, bin root_hash (32), bin vrf_key (32),
//!                bin log_key (32), bin signature (64) ]
//! Cosignature: [ u8 = 1, str auditor, bin auditor_key (32), bin root (a SignedRoot),
//!                bin signature (64) ]
//! Evidence:    [ u8 = 1, bin root (a SignedRoot), bin proof (akd LookupProof, MessagePack) ]
//! value:       u8 = 1 ‖ master_key (32) ‖ BLAKE3(signed device list blob) (32)
//! ```
//!
//! Signatures are Ed25519 over `context ‖ 0x00 ‖ MessagePack[the fields before the
//! signature, without the format byte]` (a co-signature's root as the root's own signed
//! bytes), with [`ROOT_CONTEXT`] or [`COSIGN_CONTEXT`], so that neither can be taken for the
//! other or for any other signature.

use serde::{Deserialize, Serialize, de::IgnoredAny};
use serde_bytes::ByteBuf;

use crate::{codec::body, error::DecodeError};

/// Domain separation of a log's root signatures.
pub const ROOT_CONTEXT: &str = "sealpost kt root v1";
/// Domain separation of an auditor's co-signatures.
pub const COSIGN_CONTEXT: &str = "sealpost kt cosignature v1";

/// akd's domain label (its hashes' separator) for every Sealpost log.
pub const AKD_DOMAIN_LABEL: &[u8] = b"sealpost kt 2026-12-06";

/// Most epochs one audit answer covers (roots and one append-only proof); an auditor that is
/// further behind asks again from where the answer ended.
pub const MAX_AUDIT_EPOCHS: u64 = 64;

const FORMAT: u8 = 1;

/// Bytes of a [`value`].
pub const VALUE_BYTES: usize = 65;

/// An epoch of a domain's log, signed by its log key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRoot {
    /// The domain whose log this is.
    pub domain: String,
    /// The epoch (1 is the first publication).
    pub epoch: u64,
    /// The directory's root hash at that epoch.
    pub root_hash: [u8; 32],
    /// The log's VRF public key (lookup proofs are checked with it).
    pub vrf_key: [u8; 32],
    /// The Ed25519 key that signed this root.
    pub log_key: [u8; 32],
    /// Ed25519 over [`SignedRoot::signed_bytes`].
    pub signature: [u8; 64],
}

#[derive(Serialize, Deserialize)]
struct RootWire(u8, String, u64, ByteBuf, ByteBuf, ByteBuf, ByteBuf);

impl SignedRoot {
    /// What the log key signs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let fields = (
            &self.domain,
            self.epoch,
            serde_bytes::Bytes::new(&self.root_hash),
            serde_bytes::Bytes::new(&self.vrf_key),
            serde_bytes::Bytes::new(&self.log_key),
        );
        context_bytes(ROOT_CONTEXT, &fields)
    }

    /// The encoding above.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_vec(&RootWire(
            FORMAT,
            self.domain.clone(),
            self.epoch,
            ByteBuf::from(self.root_hash.to_vec()),
            ByteBuf::from(self.vrf_key.to_vec()),
            ByteBuf::from(self.log_key.to_vec()),
            ByteBuf::from(self.signature.to_vec()),
        ))
    }

    /// Decodes [`SignedRoot::to_bytes`] (the signature is not checked here).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let RootWire(format, domain, epoch, root_hash, vrf_key, log_key, signature) = body(bytes)?;
        check_format(format)?;
        Ok(SignedRoot {
            domain,
            epoch,
            root_hash: fixed(&root_hash)?,
            vrf_key: fixed(&vrf_key)?,
            log_key: fixed(&log_key)?,
            signature: fixed(&signature)?,
        })
    }
}

/// An auditor's statement: "I verified that this root of its domain's log extends every
/// earlier root of it I verified." It carries the audited root itself, signed by that domain's
/// log key, so that nobody can attribute to a domain a root it never signed: two co-signatures
/// of one domain and epoch with different root hashes prove that the domain equivocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cosignature {
    /// The auditing domain.
    pub auditor: String,
    /// Its log key, which made this signature.
    pub auditor_key: [u8; 32],
    /// The audited root, as its domain signed it.
    pub root: SignedRoot,
    /// Ed25519 over [`Cosignature::signed_bytes`].
    pub signature: [u8; 64],
}

#[derive(Serialize, Deserialize)]
struct CosignWire(u8, String, ByteBuf, ByteBuf, ByteBuf);

impl Cosignature {
    /// What the auditor's key signs: its name and key, and the root's signed bytes.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let root = self.root.signed_bytes();
        let fields = (
            &self.auditor,
            serde_bytes::Bytes::new(&self.auditor_key),
            serde_bytes::Bytes::new(&root),
        );
        context_bytes(COSIGN_CONTEXT, &fields)
    }

    /// The encoding above.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_vec(&CosignWire(
            FORMAT,
            self.auditor.clone(),
            ByteBuf::from(self.auditor_key.to_vec()),
            ByteBuf::from(self.root.to_bytes()),
            ByteBuf::from(self.signature.to_vec()),
        ))
    }

    /// Decodes [`Cosignature::to_bytes`] (no signature is checked here).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let CosignWire(format, auditor, auditor_key, root, signature) = body(bytes)?;
        check_format(format)?;
        Ok(Cosignature {
            auditor,
            auditor_key: fixed(&auditor_key)?,
            root: SignedRoot::from_bytes(&root)?,
            signature: fixed(&signature)?,
        })
    }
}

/// What comes with a device list: the root it was looked up against and the lookup proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The signed root of the list's domain.
    pub root: SignedRoot,
    /// akd's `LookupProof` for the handle at that root, MessagePack (serde).
    pub proof: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct EvidenceWire(u8, ByteBuf, ByteBuf);

impl Evidence {
    /// The encoding above.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_vec(&EvidenceWire(
            FORMAT,
            ByteBuf::from(self.root.to_bytes()),
            ByteBuf::from(self.proof.clone()),
        ))
    }

    /// Decodes [`Evidence::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let EvidenceWire(format, root, proof) = body(bytes)?;
        check_format(format)?;
        Ok(Evidence {
            root: SignedRoot::from_bytes(&root)?,
            proof: proof.into_vec(),
        })
    }
}

/// The log's value for a handle: its master key and the digest of its signed device list.
pub fn value(master_key: &[u8; 32], list_digest: &[u8; 32]) -> [u8; VALUE_BYTES] {
    let mut out = [0u8; VALUE_BYTES];
    out[0] = FORMAT;
    out[1..33].copy_from_slice(master_key);
    out[33..].copy_from_slice(list_digest);
    out
}

/// The master key inside a [`value`], if it is one.
pub fn value_master_key(value: &[u8]) -> Option<[u8; 32]> {
    match value {
        [FORMAT, rest @ ..] if rest.len() == VALUE_BYTES - 1 => rest[..32].try_into().ok(),
        _ => None,
    }
}

/// The master key a signed device-list blob names (`u8 = 1 ‖ signature (64) ‖ MessagePack
/// [u8 format = 1, str user, u64 version, bin master_key (32), devices]`), without checking its
/// signature: the log records what it was given, and clients verify the signature.
pub fn device_list_master_key(signed_list: &[u8]) -> Option<[u8; 32]> {
    let list = match signed_list {
        [1, rest @ ..] if rest.len() > 64 => &rest[64..],
        _ => return None,
    };
    let (format, _user, _version, master, _devices): (u8, IgnoredAny, u64, ByteBuf, IgnoredAny) =
        rmp_serde::from_slice(list).ok()?;
    if format != 1 {
        return None;
    }
    master.as_slice().try_into().ok()
}

fn context_bytes<T: Serialize>(context: &str, fields: &T) -> Vec<u8> {
    let mut out = context.as_bytes().to_vec();
    out.push(0);
    rmp_serde::encode::write(&mut out, fields).expect("records always serialize into a Vec");
    out
}

fn to_vec<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec(value).expect("records always serialize into a Vec")
}

fn check_format(format: u8) -> Result<(), DecodeError> {
    if format == FORMAT {
        Ok(())
    } else {
        Err(DecodeError::Malformed(format!(
            "unknown transparency record format {format}"
        )))
    }
}

fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], DecodeError> {
    bytes
        .try_into()
        .map_err(|_| DecodeError::Malformed(format!("expected {N} bytes, got {}", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> SignedRoot {
        SignedRoot {
            domain: "a.example".into(),
            epoch: 7,
            root_hash: [1; 32],
            vrf_key: [2; 32],
            log_key: [3; 32],
            signature: [4; 64],
        }
    }

    #[test]
    fn records_round_trip_and_refuse_trailing_bytes() {
        let r = root();
        assert_eq!(SignedRoot::from_bytes(&r.to_bytes()).unwrap(), r);
        let e = Evidence {
            root: r.clone(),
            proof: vec![9; 10],
        };
        assert_eq!(Evidence::from_bytes(&e.to_bytes()).unwrap(), e);
        let c = Cosignature {
            auditor: "b.example".into(),
            auditor_key: [5; 32],
            root: r.clone(),
            signature: [6; 64],
        };
        assert_eq!(Cosignature::from_bytes(&c.to_bytes()).unwrap(), c);
        let mut long = r.to_bytes();
        long.push(0);
        assert!(SignedRoot::from_bytes(&long).is_err());
    }

    #[test]
    fn signed_bytes_depend_on_every_field_and_context() {
        let r = root();
        let mut other = r.clone();
        other.epoch = 8;
        assert_ne!(r.signed_bytes(), other.signed_bytes());
        assert!(r.signed_bytes().starts_with(b"sealpost kt root v1\0"));
    }

    #[test]
    fn the_master_key_is_read_from_a_signed_list() {
        let list = rmp_serde::to_vec(&(
            1u8,
            "alice@a.example",
            3u64,
            ByteBuf::from(vec![7u8; 32]),
            Vec::<(u32, ByteBuf)>::new(),
        ))
        .unwrap();
        let mut blob = vec![1u8];
        blob.extend([0u8; 64]);
        blob.extend(list);
        assert_eq!(device_list_master_key(&blob), Some([7; 32]));
        assert_eq!(device_list_master_key(&blob[..40]), None);
        let v = value(&[7; 32], &[8; 32]);
        assert_eq!(value_master_key(&v), Some([7; 32]));
    }
}
