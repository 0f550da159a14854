//! Group conversations: MLS (RFC 9420) with `openmls`, contained here.
//!
//! Each device is one MLS member (a leaf). Its credential names the account and the device
//! and carries a certificate: the device's Ed25519 identity key (the one its account's signed
//! device list vouches for) signs the leaf's MLS signature key. A member is verified when its
//! certificate checks against the device list the client verified, so the group's members
//! are exactly the devices that account lists, never a key the broker slipped in.
//!
//! # Credential (the `BasicCredential` identity)
//!
//! ```text
//! +------------------------------+------------------------------------------------------+
//! | "sealpost mls credential v1" | MessagePack [user str, device u32, cert bin 64]      |
//! +------------------------------+------------------------------------------------------+
//! cert = Ed25519 (device identity key) over
//!        "sealpost mls credential v1" ‖ u16 BE len(user) ‖ user ‖ u32 BE device ‖ MLS signature key [32]
//! ```
//!
//! # Group wire (the ciphertext of a `group_send`)
//!
//! ```text
//! +-----------+---------+------------------------------------------------------+
//! | u8 = 0x10 | kind u8 | body                                                 |
//! +-----------+---------+------------------------------------------------------+
//! kind 1: an MLS message (PrivateMessage: application data, or a Commit)
//! kind 2: a Welcome, then the hub's domain: MessagePack [bin welcome, str hub]
//! ```
//!
//! The first byte tells a group envelope from a sealed 1:1 one (`sealed::SEALED_VERSION` = 1).
//! Handshake and application messages are MLS `PrivateMessage`s: the broker sees the group id
//! and the epoch, never the sender, the members added or removed, or the content.
//!
//! # State
//!
//! All of a device's MLS state (groups, epoch secrets, KeyPackage private keys) lives in one
//! `openmls` memory store, saved whole with the device's state file ([`GroupKeys::to_bytes`]):
//! simple and atomic with the rest of the state, at a cost that grows with the groups' sizes
//! (about 1 MB for a member of a 1,000-member group; see the README).

use std::collections::HashMap;

use openmls::prelude::{
    BasicCredential, Ciphersuite, Credential, CredentialWithKey, GroupId, KeyPackage, KeyPackageIn,
    LeafNodeIndex, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig, MlsMessageBodyIn,
    MlsMessageIn, ProcessedMessageContent, ProtocolMessage, ProtocolVersion, StagedWelcome,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::{
    OpenMlsProvider as _,
    signatures::{Signer, SignerError},
    types::SignatureScheme,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tls_codec::{Deserialize as _, Serialize as _};
use vodozemac::{Ed25519PublicKey, Ed25519Signature};
use zeroize::Zeroizing;

use super::identity::DeviceKeys;

/// The ciphersuite of every group.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// The first byte of a group envelope.
pub const GROUP_WIRE_VERSION: u8 = 0x10;
/// Context of the credential and its certificate.
const CREDENTIAL_CONTEXT: &[u8] = b"sealpost mls credential v1";
/// Epochs whose secrets a member keeps, so that a message sent just before a Commit it
/// processed first still decrypts (at the cost of keeping those secrets that long).
const MAX_PAST_EPOCHS: usize = 5;
/// Group ids are random, this long.
pub const GROUP_ID_BYTES: usize = 16;

const WIRE_MESSAGE: u8 = 1;
const WIRE_WELCOME: u8 = 2;

/// Why a group operation failed. `Display` never names users or content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupError {
    /// Bytes that are not what they claim (a malformed MLS message, KeyPackage or wire).
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A credential whose certificate does not verify with the device's listed key.
    #[error("a member's credential does not match its device's verified key")]
    BadCredential,
    /// This device is not (or no longer) in the group.
    #[error("not a member of this group")]
    NotMember,
    /// The message is for an epoch this device has not reached yet: keep it until it has.
    #[error("message from a later epoch")]
    FutureEpoch,
    /// The message is for an epoch whose secrets are gone (or a Commit that lost).
    #[error("message from an old epoch")]
    OldEpoch,
    /// A message from a device that is no longer in the group (sent in an epoch before its
    /// removal, whose secrets members keep a while).
    #[error("message from a device no longer in the group")]
    FormerMember,
    /// openmls refused; the text says why (never content).
    #[error("MLS: {0}")]
    Mls(String),
}

fn mls<E: std::fmt::Debug>(e: E) -> GroupError {
    GroupError::Mls(format!("{e:?}"))
}

/// A member device as its credential names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId {
    /// The account.
    pub user: String,
    /// The device.
    pub device: u32,
}

/// A member of a group: who, its leaf, and what vouches for it.
#[derive(Debug, Clone)]
pub struct Member {
    /// The device.
    pub id: MemberId,
    /// Its leaf in the tree (reused after removals: never a key for anything lasting).
    pub leaf: u32,
    /// The credential's certificate, checked by [`Member::verify`].
    cert: [u8; 64],
    /// The leaf's MLS signature key.
    signature_key: [u8; 32],
}

impl Member {
    /// Whether the certificate verifies with `ed25519`, the device's identity key from its
    /// account's verified device list.
    pub fn verify(&self, ed25519: &[u8; 32]) -> bool {
        verify_cert(&self.id, &self.signature_key, &self.cert, ed25519)
    }
}

#[derive(Serialize, Deserialize)]
struct CredentialBody(String, u32, ByteBuf);

fn cert_message(id: &MemberId, signature_key: &[u8; 32]) -> Vec<u8> {
    let mut m = CREDENTIAL_CONTEXT.to_vec();
    let len = u16::try_from(id.user.len()).unwrap_or(u16::MAX);
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(id.user.as_bytes());
    m.extend_from_slice(&id.device.to_be_bytes());
    m.extend_from_slice(signature_key);
    m
}

fn verify_cert(
    id: &MemberId,
    signature_key: &[u8; 32],
    cert: &[u8; 64],
    ed25519: &[u8; 32],
) -> bool {
    let Ok(key) = Ed25519PublicKey::from_slice(ed25519) else {
        return false;
    };
    let Ok(signature) = Ed25519Signature::from_slice(cert) else {
        return false;
    };
    key.verify(&cert_message(id, signature_key), &signature)
        .is_ok()
}

/// Reads a member out of a leaf's credential and signature key.
fn member(credential: &Credential, signature_key: &[u8], leaf: u32) -> Result<Member, GroupError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| GroupError::Malformed("credential"))?;
    let body = basic
        .identity()
        .strip_prefix(CREDENTIAL_CONTEXT)
        .ok_or(GroupError::Malformed("credential"))?;
    let CredentialBody(user, device, cert) =
        rmp_serde::from_slice(body).map_err(|_| GroupError::Malformed("credential"))?;
    let cert: [u8; 64] = cert
        .as_slice()
        .try_into()
        .map_err(|_| GroupError::Malformed("credential"))?;
    let signature_key: [u8; 32] = signature_key
        .try_into()
        .map_err(|_| GroupError::Malformed("signature key"))?;
    Ok(Member {
        id: MemberId { user, device },
        leaf,
        cert,
        signature_key,
    })
}

/// The leaf signer: an Ed25519 key of MLS's own (never the device identity key, which only
/// certifies it).
struct MlsSigner(ed25519_dalek::SigningKey);

impl Signer for MlsSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        use ed25519_dalek::Signer as _;
        Ok(self.0.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// A group envelope, decoded.
pub enum GroupWire {
    /// An MLS message of a group this device is in (or is about to be).
    Message(Vec<u8>),
    /// A Welcome into a group whose Commits are ordered by `hub`.
    Welcome {
        /// The MLS Welcome.
        welcome: Vec<u8>,
        /// The hub's domain.
        hub: String,
    },
}

#[derive(Serialize, Deserialize)]
struct WelcomeBody(ByteBuf, String);

impl GroupWire {
    /// Whether `ciphertext` is a group envelope (not a sealed 1:1 one).
    pub fn is_group(ciphertext: &[u8]) -> bool {
        ciphertext.first() == Some(&GROUP_WIRE_VERSION)
    }

    /// The bytes of the envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            GroupWire::Message(m) => {
                let mut out = vec![GROUP_WIRE_VERSION, WIRE_MESSAGE];
                out.extend_from_slice(m);
                out
            }
            GroupWire::Welcome { welcome, hub } => {
                let mut out = vec![GROUP_WIRE_VERSION, WIRE_WELCOME];
                let body = WelcomeBody(ByteBuf::from(welcome.clone()), hub.clone());
                out.extend(rmp_serde::to_vec(&body).unwrap_or_default());
                out
            }
        }
    }

    /// Decodes a group envelope.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GroupError> {
        match bytes {
            [GROUP_WIRE_VERSION, WIRE_MESSAGE, rest @ ..] => Ok(GroupWire::Message(rest.to_vec())),
            [GROUP_WIRE_VERSION, WIRE_WELCOME, rest @ ..] => {
                let WelcomeBody(welcome, hub) =
                    rmp_serde::from_slice(rest).map_err(|_| GroupError::Malformed("welcome"))?;
                Ok(GroupWire::Welcome {
                    welcome: welcome.into_vec(),
                    hub,
                })
            }
            _ => Err(GroupError::Malformed("group envelope")),
        }
    }
}

/// What a Commit (of another member) changed, once merged.
#[derive(Debug, Default)]
pub struct Changes {
    /// Devices added.
    pub added: Vec<Member>,
    /// Devices removed.
    pub removed: Vec<MemberId>,
    /// This device was removed: the group is over for it.
    pub self_removed: bool,
}

/// An incoming group message, processed.
pub enum Processed {
    /// Application data from a member.
    Application {
        /// The sending member.
        sender: Member,
        /// The plaintext.
        data: Zeroizing<Vec<u8>>,
    },
    /// A Commit of another member, merged: the group is in a new epoch.
    Commit {
        /// Who committed.
        sender: Member,
        /// What changed.
        changes: Changes,
    },
    /// This device's own message, echoed: nothing to do.
    Own,
}

/// A Commit this device made, not yet merged: merge it once the hub took its epoch
/// ([`GroupKeys::merge_pending`]), or drop it when another Commit won
/// ([`GroupKeys::clear_pending`]).
pub struct Commit {
    /// The Commit, for the group's current members.
    pub commit: Vec<u8>,
    /// The Welcome for added members, if any.
    pub welcome: Option<Vec<u8>>,
    /// The epoch it moves the group from (what the hub is asked to take).
    pub epoch: u64,
}

/// All MLS state of one device: its groups and its KeyPackages' private keys.
pub struct GroupKeys {
    provider: OpenMlsRustCrypto,
    signer: MlsSigner,
    /// This device's credential and leaf signature key.
    credential: CredentialWithKey,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    signer: ByteBuf,
    credential: ByteBuf,
    values: Vec<(ByteBuf, ByteBuf)>,
}

impl GroupKeys {
    /// New MLS state for device `device` of `user`: a fresh leaf signature key, certified by
    /// the device's identity key.
    pub fn new(user: &str, device: u32, keys: &DeviceKeys) -> Self {
        let signer = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let signature_key = signer.verifying_key().to_bytes();
        let id = MemberId {
            user: user.to_owned(),
            device,
        };
        let cert = keys.account.sign(cert_message(&id, &signature_key));
        let body = CredentialBody(
            user.to_owned(),
            device,
            ByteBuf::from(cert.to_bytes().to_vec()),
        );
        let mut identity = CREDENTIAL_CONTEXT.to_vec();
        identity.extend(rmp_serde::to_vec(&body).unwrap_or_default());
        let credential = CredentialWithKey {
            credential: BasicCredential::new(identity).into(),
            signature_key: signature_key.to_vec().into(),
        };
        Self {
            provider: OpenMlsRustCrypto::default(),
            signer: MlsSigner(signer),
            credential,
        }
    }

    /// The whole state, to save with the device's state file.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let values = self
            .provider
            .storage()
            .values
            .read()
            .map(|v| {
                v.iter()
                    .map(|(k, v)| (ByteBuf::from(k.clone()), ByteBuf::from(v.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let credential = self
            .credential
            .credential
            .tls_serialize_detached()
            .unwrap_or_default();
        let snapshot = Snapshot {
            signer: ByteBuf::from(self.signer.0.to_bytes().to_vec()),
            credential: ByteBuf::from(credential),
            values,
        };
        Zeroizing::new(rmp_serde::to_vec(&snapshot).unwrap_or_default())
    }

    /// The state saved by [`GroupKeys::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GroupError> {
        let snapshot: Snapshot =
            rmp_serde::from_slice(bytes).map_err(|_| GroupError::Malformed("group state"))?;
        let secret: Zeroizing<[u8; 32]> = Zeroizing::new(
            snapshot
                .signer
                .as_slice()
                .try_into()
                .map_err(|_| GroupError::Malformed("group state"))?,
        );
        let signer = ed25519_dalek::SigningKey::from_bytes(&secret);
        let credential = Credential::tls_deserialize_exact(snapshot.credential.as_slice())
            .map_err(|_| GroupError::Malformed("group state"))?;
        let provider = OpenMlsRustCrypto::default();
        if let Ok(mut values) = provider.storage().values.write() {
            *values = snapshot
                .values
                .into_iter()
                .map(|(k, v)| (k.into_vec(), v.into_vec()))
                .collect::<HashMap<_, _>>();
        }
        let signature_key = signer.verifying_key().to_bytes().to_vec().into();
        Ok(Self {
            provider,
            signer: MlsSigner(signer),
            credential: CredentialWithKey {
                credential,
                signature_key,
            },
        })
    }

    /// `count` one-time KeyPackages, to upload (see also
    /// [`GroupKeys::last_resort_key_package`]).
    pub fn key_packages(&self, count: usize) -> Result<Vec<Vec<u8>>, GroupError> {
        (0..count).map(|_| self.key_package(false)).collect()
    }

    /// A last-resort KeyPackage (claimed when no one-time one is left).
    pub fn last_resort_key_package(&self) -> Result<Vec<u8>, GroupError> {
        self.key_package(true)
    }

    fn key_package(&self, last_resort: bool) -> Result<Vec<u8>, GroupError> {
        let mut builder = KeyPackage::builder();
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .map_err(mls)?;
        bundle.key_package().tls_serialize_detached().map_err(mls)
    }

    /// Checks a claimed KeyPackage: well-formed, self-signed, and for the device `id`; its
    /// member, to verify against the device's listed key ([`Member::verify`]).
    pub fn check_key_package(
        &self,
        bytes: &[u8],
        id: &MemberId,
    ) -> Result<(KeyPackage, Member), GroupError> {
        let package = KeyPackageIn::tls_deserialize_exact(bytes)
            .map_err(|_| GroupError::Malformed("KeyPackage"))?
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|_| GroupError::Malformed("KeyPackage"))?;
        let leaf = package.leaf_node();
        let member = member(leaf.credential(), leaf.signature_key().as_slice(), 0)?;
        if &member.id != id {
            return Err(GroupError::BadCredential);
        }
        Ok((package, member))
    }

    fn config() -> MlsGroupCreateConfig {
        MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build()
    }

    fn load(&self, group: &[u8]) -> Result<MlsGroup, GroupError> {
        MlsGroup::load(self.provider.storage(), &GroupId::from_slice(group))
            .map_err(mls)?
            .filter(MlsGroup::is_active)
            .ok_or(GroupError::NotMember)
    }

    /// Creates a group of this device alone, with a fresh random id (returned).
    pub fn create(&self) -> Result<Vec<u8>, GroupError> {
        let mut id = [0u8; GROUP_ID_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &Self::config(),
            GroupId::from_slice(&id),
            self.credential.clone(),
        )
        .map_err(mls)?;
        Ok(id.to_vec())
    }

    /// The group's epoch.
    pub fn epoch(&self, group: &[u8]) -> Result<u64, GroupError> {
        Ok(self.load(group)?.epoch().as_u64())
    }

    /// The group's members, by leaf.
    pub fn members(&self, group: &[u8]) -> Result<Vec<Member>, GroupError> {
        self.load(group)?
            .members()
            .map(|m| member(&m.credential, &m.signature_key, m.index.u32()))
            .collect()
    }

    /// A Commit adding the devices of `packages` (checked with
    /// [`GroupKeys::check_key_package`]), with their Welcome.
    pub fn add(&self, group: &[u8], packages: Vec<KeyPackage>) -> Result<Commit, GroupError> {
        let mut g = self.load(group)?;
        let epoch = g.epoch().as_u64();
        let (commit, welcome, _) = g
            .add_members(&self.provider, &self.signer, &packages)
            .map_err(mls)?;
        Ok(Commit {
            commit: commit.tls_serialize_detached().map_err(mls)?,
            welcome: Some(welcome.tls_serialize_detached().map_err(mls)?),
            epoch,
        })
    }

    /// A Commit removing the members at `leaves`.
    pub fn remove(&self, group: &[u8], leaves: &[u32]) -> Result<Commit, GroupError> {
        let mut g = self.load(group)?;
        let epoch = g.epoch().as_u64();
        let leaves: Vec<LeafNodeIndex> = leaves.iter().copied().map(LeafNodeIndex::new).collect();
        let (commit, _, _) = g
            .remove_members(&self.provider, &self.signer, &leaves)
            .map_err(mls)?;
        Ok(Commit {
            commit: commit.tls_serialize_detached().map_err(mls)?,
            welcome: None,
            epoch,
        })
    }

    /// Merges this device's pending Commit: the hub took its epoch.
    pub fn merge_pending(&self, group: &[u8]) -> Result<(), GroupError> {
        self.load(group)?
            .merge_pending_commit(&self.provider)
            .map_err(mls)
    }

    /// Drops this device's pending Commit: another Commit took its epoch.
    pub fn clear_pending(&self, group: &[u8]) -> Result<(), GroupError> {
        self.load(group)?
            .clear_pending_commit(self.provider.storage())
            .map_err(mls)
    }

    /// Encrypts application data for the group's current epoch.
    pub fn encrypt(&self, group: &[u8], data: &[u8]) -> Result<Vec<u8>, GroupError> {
        let mut g = self.load(group)?;
        g.create_message(&self.provider, &self.signer, data)
            .map_err(mls)?
            .tls_serialize_detached()
            .map_err(mls)
    }

    /// Joins a group from a Welcome addressed to one of this device's KeyPackages; answers
    /// the group's id and the member that added this device. A device removed from a group
    /// (or that left it) may be added again; one that is in it cannot be "added" over its
    /// state.
    pub fn join(&self, welcome: &[u8]) -> Result<(Vec<u8>, Member), GroupError> {
        let MlsMessageBodyIn::Welcome(welcome) = MlsMessageIn::tls_deserialize_exact(welcome)
            .map_err(|_| GroupError::Malformed("welcome"))?
            .extract()
        else {
            return Err(GroupError::Malformed("welcome"));
        };
        let config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let welcome_error = |e| match e {
            // A Welcome for another device of this account (the broker delivers a group's
            // envelopes to every device of a member account).
            openmls::prelude::WelcomeError::NoMatchingKeyPackage => GroupError::NotMember,
            e => mls(e),
        };
        let join = StagedWelcome::build_from_welcome(&self.provider, &config, welcome)
            .map_err(welcome_error)?;
        let id = join.processed_welcome().unverified_group_info().group_id();
        let join = match MlsGroup::load(self.provider.storage(), id).map_err(mls)? {
            Some(old) if old.is_active() => return Err(GroupError::Malformed("welcome")),
            Some(_) => join.replace_old_group(),
            None => join,
        };
        let staged = join.build().map_err(welcome_error)?;
        // Who added us: the member that signed the Welcome.
        let adder = staged.welcome_sender().map_err(mls).and_then(|leaf| {
            member(
                leaf.credential(),
                leaf.signature_key().as_slice(),
                staged.welcome_sender_index().u32(),
            )
        })?;
        let group = staged.into_group(&self.provider).map_err(mls)?;
        Ok((group.group_id().as_slice().to_vec(), adder))
    }

    /// The group id and epoch an MLS message is for (readable without being a member).
    pub fn route(message: &[u8]) -> Result<(Vec<u8>, u64), GroupError> {
        let message = protocol_message(message)?;
        Ok((
            message.group_id().as_slice().to_vec(),
            message.epoch().as_u64(),
        ))
    }

    /// Processes an MLS message of a group this device is in: application data, or another
    /// member's Commit (merged here).
    pub fn process(&self, message: &[u8]) -> Result<Processed, GroupError> {
        let message = protocol_message(message)?;
        let mut g = self.load(message.group_id().as_slice())?;
        let (epoch, current) = (message.epoch().as_u64(), g.epoch().as_u64());
        if epoch > current {
            return Err(GroupError::FutureEpoch);
        }
        let processed = match g.process_message(&self.provider, message) {
            Ok(p) => p,
            Err(_) if epoch < current => return Err(GroupError::OldEpoch),
            Err(e) => return Err(mls(e)),
        };
        let sender = match processed.sender() {
            openmls::prelude::Sender::Member(leaf) => {
                let credential = processed.credential().clone();
                // A message of a past epoch (whose secrets are kept a while) may come from a
                // device removed since, or whose leaf another has taken: only a sender that
                // is still the member at its leaf counts.
                let Some(now) = g.member_at(*leaf).filter(|m| m.credential == credential) else {
                    return Err(GroupError::FormerMember);
                };
                member(&credential, &now.signature_key, leaf.u32())?
            }
            _ => return Err(GroupError::Malformed("sender")),
        };
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(Processed::Application {
                sender,
                data: Zeroizing::new(app.into_bytes()),
            }),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let mut changes = Changes {
                    self_removed: staged.self_removed(),
                    ..Changes::default()
                };
                for add in staged.add_proposals() {
                    let leaf = add.add_proposal().key_package().leaf_node();
                    changes.added.push(member(
                        leaf.credential(),
                        leaf.signature_key().as_slice(),
                        0,
                    )?);
                }
                for remove in staged.remove_proposals() {
                    let leaf = remove.remove_proposal().removed();
                    if let Some(m) = g.member_at(leaf) {
                        changes
                            .removed
                            .push(member(&m.credential, &m.signature_key, leaf.u32())?.id);
                    }
                }
                g.merge_staged_commit(&self.provider, *staged)
                    .map_err(mls)?;
                Ok(Processed::Commit { sender, changes })
            }
            ProcessedMessageContent::OwnPrivateMessage
            | ProcessedMessageContent::OwnPendingCommit => Ok(Processed::Own),
            ProcessedMessageContent::ProposalMessage(_)
            | ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                // Members here only commit; a bare proposal is not acted on.
                Err(GroupError::Malformed("proposal"))
            }
        }
    }
}

fn protocol_message(bytes: &[u8]) -> Result<ProtocolMessage, GroupError> {
    MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| GroupError::Malformed("MLS message"))?
        .try_into_protocol_message()
        .map_err(|_| GroupError::Malformed("MLS message"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(user: &str, device: u32) -> (DeviceKeys, GroupKeys) {
        let keys = DeviceKeys::generate();
        let group = GroupKeys::new(user, device, &keys);
        (keys, group)
    }

    fn id(user: &str, device: u32) -> MemberId {
        MemberId {
            user: user.into(),
            device,
        }
    }

    fn text(p: Processed) -> (MemberId, Vec<u8>) {
        match p {
            Processed::Application { sender, data } => (sender.id, data.to_vec()),
            _ => panic!("not application data"),
        }
    }

    #[test]
    fn members_create_add_talk_remove_and_restore() {
        let (alice_keys, alice) = device("alice@a", 1);
        let (bob_keys, bob) = device("bob@b", 3);
        let (_, carol) = device("carol@c", 2);
        let group = alice.create().unwrap();

        let packages = [
            (bob.key_packages(1).unwrap().remove(0), id("bob@b", 3)),
            (carol.key_packages(1).unwrap().remove(0), id("carol@c", 2)),
        ];
        let mut checked = Vec::new();
        for (bytes, who) in &packages {
            let (package, member) = alice.check_key_package(bytes, who).unwrap();
            checked.push(package);
            let _ = member;
        }
        // A KeyPackage claimed for one device but made by another is refused.
        assert_eq!(
            alice
                .check_key_package(&packages[0].0, &id("bob@b", 4))
                .err(),
            Some(GroupError::BadCredential)
        );
        let commit = alice.add(&group, checked).unwrap();
        assert_eq!(commit.epoch, 0);
        alice.merge_pending(&group).unwrap();
        let welcome = commit.welcome.unwrap();
        let (joined, adder) = bob.join(&welcome).unwrap();
        assert_eq!((joined, adder.id), (group.clone(), id("alice@a", 1)));
        assert_eq!(carol.join(&welcome).unwrap().0, group);

        // Members are verified against the device's listed key, and only that one.
        let members = bob.members(&group).unwrap();
        assert_eq!(members.len(), 3);
        let alice_member = members.iter().find(|m| m.id.user == "alice@a").unwrap();
        assert!(alice_member.verify(&alice_keys.public_keys().ed25519));
        assert!(!alice_member.verify(&bob_keys.public_keys().ed25519));

        let hello = alice.encrypt(&group, b"hello group").unwrap();
        assert_eq!(GroupKeys::route(&hello).unwrap(), (group.clone(), 1));
        assert_eq!(
            text(bob.process(&hello).unwrap()),
            (id("alice@a", 1), b"hello group".to_vec())
        );
        assert_eq!(text(carol.process(&hello).unwrap()).1, b"hello group");

        let carol_before = GroupKeys::from_bytes(&carol.to_bytes()).unwrap();
        // Bob removes carol; alice processes it, carol learns she is out.
        let carol_leaf = members
            .iter()
            .find(|m| m.id.user == "carol@c")
            .unwrap()
            .leaf;
        let removal = bob.remove(&group, &[carol_leaf]).unwrap();
        bob.merge_pending(&group).unwrap();
        match alice.process(&removal.commit).unwrap() {
            Processed::Commit { sender, changes } => {
                assert_eq!(sender.id, id("bob@b", 3));
                assert_eq!(changes.removed, vec![id("carol@c", 2)]);
            }
            _ => panic!("not a commit"),
        }
        match carol.process(&removal.commit).unwrap() {
            Processed::Commit { changes, .. } => assert!(changes.self_removed),
            _ => panic!("not a commit"),
        }
        let after = alice.encrypt(&group, b"after carol").unwrap();
        assert!(
            carol.process(&after).is_err(),
            "a removed member reads nothing"
        );
        // A removed member posting with the keys it had (its state from before): refused by
        // every member, who are past that epoch.
        assert!(carol.encrypt(&group, b"still here?").is_err());
        let forged = carol_before.encrypt(&group, b"still here?").unwrap();
        assert!(matches!(
            alice.process(&forged),
            Err(GroupError::FormerMember)
        ));

        // Bob's state survives a save and a load.
        let bob = GroupKeys::from_bytes(&bob.to_bytes()).unwrap();
        assert_eq!(text(bob.process(&after).unwrap()).1, b"after carol");
        let reply = bob.encrypt(&group, b"still here").unwrap();
        assert_eq!(text(alice.process(&reply).unwrap()).1, b"still here");
    }

    #[test]
    fn a_removed_device_can_be_added_again_and_a_member_cannot_be_added_over() {
        let (_, alice) = device("alice@a", 1);
        let (_, bob) = device("bob@b", 3);
        let group = alice.create().unwrap();
        let add = |alice: &GroupKeys| {
            let package = bob.key_packages(1).unwrap().remove(0);
            let (package, _) = alice.check_key_package(&package, &id("bob@b", 3)).unwrap();
            let commit = alice.add(&group, vec![package]).unwrap();
            alice.merge_pending(&group).unwrap();
            commit.welcome.unwrap()
        };
        let welcome = add(&alice);
        bob.join(&welcome).unwrap();
        let leaf = |who: &str| {
            alice
                .members(&group)
                .unwrap()
                .into_iter()
                .find(|m| m.id.user == who)
                .unwrap()
                .leaf
        };
        let removal = alice.remove(&group, &[leaf("bob@b")]).unwrap();
        alice.merge_pending(&group).unwrap();
        match bob.process(&removal.commit).unwrap() {
            Processed::Commit { changes, .. } => assert!(changes.self_removed),
            _ => panic!("not a commit"),
        }
        // Added again: bob joins over his old, inactive state and reads from then on.
        let welcome = add(&alice);
        assert_eq!(bob.join(&welcome).unwrap().0, group);
        let hello = alice.encrypt(&group, b"welcome back").unwrap();
        assert_eq!(text(bob.process(&hello).unwrap()).1, b"welcome back");
        // Alice removes and adds him once more, and the Welcome overtakes the removal: over
        // a group he is still in, it would reset his state, so it is refused.
        alice.remove(&group, &[leaf("bob@b")]).unwrap();
        alice.merge_pending(&group).unwrap();
        let again = add(&alice);
        assert_eq!(
            bob.join(&again).err(),
            Some(GroupError::Malformed("welcome")),
            "not over a group he is in"
        );
    }

    #[test]
    fn the_loser_of_an_epoch_rebases_and_nobody_forks() {
        let (_, alice) = device("alice@a", 1);
        let (_, bob) = device("bob@b", 1);
        let (_, carol) = device("carol@c", 1);
        let (_, dave) = device("dave@d", 1);
        let group = alice.create().unwrap();
        let package = |k: &GroupKeys, who: MemberId| {
            let bytes = k.key_packages(1).unwrap().remove(0);
            alice.check_key_package(&bytes, &who).unwrap().0
        };
        let add = alice
            .add(
                &group,
                vec![
                    package(&bob, id("bob@b", 1)),
                    package(&carol, id("carol@c", 1)),
                ],
            )
            .unwrap();
        alice.merge_pending(&group).unwrap();
        bob.join(add.welcome.as_ref().unwrap()).unwrap();
        carol.join(add.welcome.as_ref().unwrap()).unwrap();

        // Bob and carol commit on epoch 1; the hub takes bob's.
        let dave_package = dave.key_packages(1).unwrap().remove(0);
        let (dave_kp, _) = carol
            .check_key_package(&dave_package, &id("dave@d", 1))
            .unwrap();
        let bobs = bob.remove(&group, &[0]).unwrap_or_else(|_| panic!());
        let carols = carol.add(&group, vec![dave_kp]).unwrap();
        assert_eq!((bobs.epoch, carols.epoch), (1, 1));
        bob.merge_pending(&group).unwrap();
        carol.clear_pending(&group).unwrap();
        assert!(matches!(
            carol.process(&bobs.commit).unwrap(),
            Processed::Commit { .. }
        ));
        // Carol rebases her add on epoch 2.
        let (dave_kp, _) = carol
            .check_key_package(&dave_package, &id("dave@d", 1))
            .unwrap();
        let rebased = carol.add(&group, vec![dave_kp]).unwrap();
        assert_eq!(rebased.epoch, 2);
        carol.merge_pending(&group).unwrap();
        assert!(matches!(
            bob.process(&rebased.commit).unwrap(),
            Processed::Commit { .. }
        ));
        dave.join(rebased.welcome.as_ref().unwrap()).unwrap();
        for k in [&bob, &carol, &dave] {
            assert_eq!(k.epoch(&group).unwrap(), 3, "one history");
        }
        let m = dave.encrypt(&group, b"hi from dave").unwrap();
        assert_eq!(text(bob.process(&m).unwrap()).1, b"hi from dave");
        // Alice (removed by bob) cannot read it.
        assert!(alice.process(&m).is_err());
    }

    #[test]
    fn malformed_input_is_refused_without_panicking() {
        let (_, alice) = device("alice@a", 1);
        let group = alice.create().unwrap();
        for bytes in [&[][..], &[0x10][..], &[1, 2, 3][..], &[0x10, 2, 0xc1][..]] {
            assert!(GroupWire::from_bytes(bytes).is_err());
            assert!(alice.process(bytes).is_err());
            assert!(alice.join(bytes).is_err());
            assert!(alice.check_key_package(bytes, &id("a@a", 1)).is_err());
        }
        let (_, bob) = device("bob@b", 1);
        let bytes = bob.key_packages(1).unwrap().remove(0);
        let (package, _) = alice.check_key_package(&bytes, &id("bob@b", 1)).unwrap();
        let add = alice.add(&group, vec![package]).unwrap();
        alice.merge_pending(&group).unwrap();
        bob.join(add.welcome.as_ref().unwrap()).unwrap();
        let m = alice.encrypt(&group, b"x").unwrap();
        let mut flipped = m.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(bob.process(&flipped).is_err(), "a tampered message");
        assert!(bob.process(&m).is_ok(), "the message itself, after it");
        let wire = GroupWire::Welcome {
            welcome: vec![1, 2],
            hub: "a.example".into(),
        };
        assert!(matches!(
            GroupWire::from_bytes(&wire.to_bytes()),
            Ok(GroupWire::Welcome { .. })
        ));
    }

    /// Real MLS groups of `SEALPOST_MLS_MEMBERS` member devices (default 100, 1,000, 2,000
    /// and 4,000, the broker's fan-out cap), each member a device with its own identity key
    /// and credential as in the clients: the Commit that adds everyone at once, the group
    /// built as the SDK builds it (`MAX_ADDS_PER_COMMIT` devices a Commit), then one more
    /// device added to the full group (its Welcome carries the whole tree), joining, a 100 B
    /// text, a removal, and a member's saved state. Prints sizes and times, and whether each
    /// ciphertext fits a `group_send` (`MAX_GROUP_CIPHERTEXT_BYTES`); up to the clients' cap
    /// (`MAX_GROUP_MEMBER_DEVICES`) each must. Minutes in a debug build; run it in release:
    ///
    /// `cargo test --release -p sealpost-client --lib -- --ignored --nocapture mls_groups_measured`
    #[test]
    #[ignore = "a measurement, run in release (see the README, \"A message to a group\")"]
    #[allow(clippy::print_stdout)] // a measurement prints what it measured
    fn mls_groups_measured() {
        use std::time::Instant;

        use sealpost_proto::limits::MAX_GROUP_CIPHERTEXT_BYTES;

        use crate::engine::{MAX_ADDS_PER_COMMIT, MAX_GROUP_MEMBER_DEVICES};

        let sizes: Vec<usize> = std::env::var("SEALPOST_MLS_MEMBERS")
            .unwrap_or_else(|_| "100,1000,2000,4000".into())
            .split(',')
            .map(|n| n.trim().parse().expect("SEALPOST_MLS_MEMBERS: numbers"))
            .collect();
        let kib = |n: usize| n as f64 / 1024.0;
        let fits = |n: usize| {
            if n <= MAX_GROUP_CIPHERTEXT_BYTES {
                "fits"
            } else {
                "TOO LARGE"
            }
        };
        let welcome_wire = |welcome: &[u8]| {
            GroupWire::Welcome {
                welcome: welcome.to_vec(),
                hub: "a.example".into(),
            }
            .to_bytes()
            .len()
        };
        println!(
            "cap for one group_send ciphertext: {:.0} KiB",
            kib(MAX_GROUP_CIPHERTEXT_BYTES)
        );
        for n in sizes {
            let (_, owner) = device("owner@a.example", 1);
            let group = owner.create().unwrap();
            // The other members: devices of their own, each a KeyPackage as claimed.
            let members: Vec<(MemberId, GroupKeys, Vec<u8>)> = (1..n)
                .map(|i| {
                    // Handles of a realistic length (they are in every leaf's credential).
                    let who = id(&format!("member{i:04}.name@chat.example.com"), 1);
                    let (_, keys) = device(&who.user, 1);
                    let package = keys.key_packages(1).unwrap().remove(0);
                    (who, keys, package)
                })
                .collect();
            let checked: Vec<KeyPackage> = members
                .iter()
                .map(|(who, _, bytes)| owner.check_key_package(bytes, who).unwrap().0)
                .collect();

            let t = Instant::now();
            let all = owner.add(&group, checked).unwrap();
            let build_all = t.elapsed();
            owner.merge_pending(&group).unwrap();
            let all_commit = GroupWire::Message(all.commit.clone()).to_bytes().len();
            let all_welcome = welcome_wire(all.welcome.as_deref().unwrap());

            // The same group built as the SDK builds it: at most `MAX_ADDS_PER_COMMIT` devices
            // added per Commit.
            let (_, builder) = device("owner@a.example", 1);
            let batched = builder.create().unwrap();
            let (mut batch_commit, mut batch_welcome) = (0, 0);
            let t = Instant::now();
            for chunk in members.chunks(MAX_ADDS_PER_COMMIT) {
                let packages = chunk
                    .iter()
                    .map(|(who, keys, _)| {
                        let bytes = keys.key_packages(1).unwrap().remove(0);
                        builder.check_key_package(&bytes, who).unwrap().0
                    })
                    .collect();
                let commit = builder.add(&batched, packages).unwrap();
                builder.merge_pending(&batched).unwrap();
                batch_commit = batch_commit.max(GroupWire::Message(commit.commit).to_bytes().len());
                batch_welcome = batch_welcome.max(welcome_wire(&commit.welcome.unwrap()));
            }
            let build_batched = t.elapsed();

            // A member joins from the single Welcome and reads a text.
            let (_, first, _) = &members[0];
            let t = Instant::now();
            first.join(all.welcome.as_deref().unwrap()).unwrap();
            let join_all = t.elapsed();

            // One more device added to the full group.
            let late = id("late@c.example", 1);
            let (_, late_keys) = device(&late.user, 1);
            let package = late_keys.key_packages(1).unwrap().remove(0);
            let (package, _) = owner.check_key_package(&package, &late).unwrap();
            let t = Instant::now();
            let one = owner.add(&group, vec![package]).unwrap();
            let build_one = t.elapsed();
            owner.merge_pending(&group).unwrap();
            let one_commit = GroupWire::Message(one.commit.clone()).to_bytes().len();
            let one_welcome = welcome_wire(one.welcome.as_deref().unwrap());
            let t = Instant::now();
            first.process(&one.commit).unwrap();
            let process_one = t.elapsed();
            let t = Instant::now();
            late_keys.join(one.welcome.as_deref().unwrap()).unwrap();
            let join_one = t.elapsed();

            // A 100 B text, encrypted once for the whole group.
            let body = [b'x'; 100];
            let rounds: u32 = 200;
            let t = Instant::now();
            let mut text = Vec::new();
            for _ in 0..rounds {
                text = owner.encrypt(&group, &body).unwrap();
            }
            let encrypt = t.elapsed() / rounds;
            let t = Instant::now();
            let read = late_keys.process(&text).unwrap();
            let decrypt = t.elapsed();
            assert_eq!(text_of(read), body.to_vec());

            // A removal, and a member's saved state.
            let leaf = owner
                .members(&group)
                .unwrap()
                .iter()
                .find(|m| m.id == members[1].0)
                .unwrap()
                .leaf;
            let t = Instant::now();
            let removal = owner.remove(&group, &[leaf]).unwrap();
            let build_removal = t.elapsed();
            owner.merge_pending(&group).unwrap();
            let state = late_keys.to_bytes().len();
            if n <= MAX_GROUP_MEMBER_DEVICES {
                for (what, size) in [
                    ("a batch's Commit", batch_commit),
                    ("a batch's Welcome", batch_welcome),
                    ("a late member's Welcome", one_welcome),
                    ("a late member's Commit", one_commit),
                ] {
                    assert!(
                        size <= MAX_GROUP_CIPHERTEXT_BYTES,
                        "{n} members: {what} is {size} B"
                    );
                }
            }

            println!(
                "{n} members: Commit adding {} at once {:.0} KiB ({}), built in {} ms; its \
                 Welcome {:.0} KiB ({}), joined in {} ms",
                n - 1,
                kib(all_commit),
                fits(all_commit),
                build_all.as_millis(),
                kib(all_welcome),
                fits(all_welcome),
                join_all.as_millis()
            );
            println!(
                "{n} members: built {MAX_ADDS_PER_COMMIT} devices per Commit: largest Commit \
                 {:.0} KiB ({}), largest Welcome {:.0} KiB ({}), {} ms in all",
                kib(batch_commit),
                fits(batch_commit),
                kib(batch_welcome),
                fits(batch_welcome),
                build_batched.as_millis()
            );
            println!(
                "{n} members: one more added: Commit {:.1} KiB built in {} ms (a member \
                 processes it in {} ms), Welcome {:.0} KiB ({}), joined in {} ms",
                kib(one_commit),
                build_one.as_millis(),
                process_one.as_millis(),
                kib(one_welcome),
                fits(one_welcome),
                join_one.as_millis()
            );
            println!(
                "{n} members: a 100 B text is {} B, encrypted in {} µs, decrypted in {} µs; a \
                 removal Commit {:.1} KiB built in {} ms; a member's saved MLS state {:.0} KiB",
                text.len(),
                encrypt.as_micros(),
                decrypt.as_micros(),
                kib(removal.commit.len()),
                build_removal.as_millis(),
                kib(state)
            );
        }
    }

    fn text_of(p: Processed) -> Vec<u8> {
        text(p).1
    }
}
