//! Key transparency on the client: every device list comes with a lookup proof against its
//! domain's signed log root, and the client checks that the roots it sees only ever extend each
//! other, that auditors (other domains' brokers) co-signed the same roots, and that its own
//! account's entry holds no key it did not make.
//!
//! ```text
//! device list + Evidence ──check()──▶ root signed by the domain's pinned log key?
//!                                     lookup proof (akd, VRF) gives this list's value?
//!                                     root vs. the newest one seen of that domain:
//!                                       same epoch, other hash ─▶ Fork
//!                                       newer ─▶ Step::Advance: fetch roots + append-only proof,
//!                                                 verify_extension(), then accept()
//!                                       older ─▶ Rollback
//! co-signatures of that root ──check_cosignatures()──▶ another hash co-signed ─▶ SplitView
//! own entry's history ──own_history()──▶ a master key that is not ours ─▶ ForeignKey
//! ```
//!
//! Pins are trust on first use: the first root seen of a domain pins its log key and VRF key,
//! as the first master key seen of a contact is pinned.

use std::collections::BTreeMap;

use akd::{AkdLabel, HistoryParams, HistoryVerificationParams, LookupProof};
use ed25519_dalek::{Signature, VerifyingKey};
use sealpost_proto::transparency::{
    AKD_DOMAIN_LABEL, Cosignature, Evidence, SignedRoot, VALUE_BYTES, value, value_master_key,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// akd's configuration of Sealpost logs (the broker's, `sealpost::transparency::Config`).
pub type Config = akd::ExperimentalConfiguration<Label>;

/// akd's domain label of Sealpost logs.
#[derive(Clone)]
pub struct Label;

impl akd::configuration::DomainLabel for Label {
    fn domain_label() -> &'static [u8] {
        AKD_DOMAIN_LABEL
    }
}

/// Why a list's transparency evidence, or a log, was refused. `Display` names domains and
/// epochs, never keys.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransparencyError {
    /// The evidence does not decode.
    #[error("malformed transparency evidence")]
    Malformed,
    /// A root is not signed by the key it names, or is of another domain.
    #[error("a transparency root of {0} is not validly signed")]
    BadSignature(String),
    /// The domain's log key or VRF key is not the one pinned.
    #[error("the transparency log key of {0} changed")]
    LogKeyChanged(String),
    /// The lookup proof does not verify, or proves another value than this list's.
    #[error("the device list is not the one {0}'s transparency log publishes")]
    NotInLog(String),
    /// A domain that had a log served a list without evidence.
    #[error("{0} served a device list without transparency evidence")]
    Missing(String),
    /// An older root than the newest seen of the domain: a log proves lookups at its newest
    /// root, so an older one is a rollback (a stale list passed off as current).
    #[error("the transparency log of {domain} was rolled back to epoch {epoch}")]
    Rollback {
        /// The domain.
        domain: String,
        /// The epoch shown.
        epoch: u64,
    },
    /// A root that does not extend the roots seen before (another hash for a seen epoch, or an
    /// append-only proof that fails).
    #[error("the transparency log of {domain} forked at epoch {epoch}")]
    Fork {
        /// The domain.
        domain: String,
        /// The epoch.
        epoch: u64,
    },
    /// An auditor co-signed another root for the same epoch: the log shows different roots to
    /// different parties.
    #[error(
        "the transparency log of {domain} shows different roots to different parties \
         (epoch {epoch}, co-signed by {auditor})"
    )]
    SplitView {
        /// The domain.
        domain: String,
        /// The epoch.
        epoch: u64,
        /// The auditor whose co-signature differs.
        auditor: String,
    },
}

/// What a client must still do with a root before it [`LogPins::accept`]s it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing: it is the newest root seen, or the first of its domain.
    None,
    /// It is newer than the newest seen (`from`): fetch roots `from..=to` with their
    /// append-only proof and [`LogPins::verify_extension`] them.
    Advance {
        /// The newest epoch seen.
        from: u64,
        /// The root's epoch.
        to: u64,
    },
}

/// How far a root is vouched for by auditors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audit {
    /// Co-signed by these auditor domains.
    CoSigned(Vec<String>),
    /// No auditor co-signed it yet.
    NotYet,
}

/// A domain's log as this client has seen it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DomainView {
    log_key: ByteBuf,
    vrf_key: ByteBuf,
    epoch: u64,
    root_hash: ByteBuf,
    /// When a root of this domain was first co-signed by an auditor (0: never).
    cosigned_ms: u64,
    /// When the first root that no auditor co-signed yet was seen (0: none is waiting).
    unaudited_since_ms: u64,
    /// The auditors that co-signed the last co-signed root.
    #[serde(default)]
    cosigners: Vec<String>,
    /// The first root seen since the last co-signed one (a `SignedRoot`): its co-signature is
    /// awaited. A busy log publishes faster than auditors audit, so the newest root is rarely
    /// co-signed yet; this one soon is ([`LogPins::awaited`]).
    #[serde(default)]
    awaited: Option<ByteBuf>,
}

/// How far a domain's log is verified, as this client has seen it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogStatus {
    /// No root of the domain seen: it keeps no log (or none was fetched yet).
    NoLog,
    /// Its last co-signed root was co-signed by these auditors, and no root has gone without
    /// a co-signature for longer than the grace time since.
    CoSigned(Vec<String>),
    /// A root was seen that no auditor has co-signed yet, within the grace time.
    Pending,
    /// A root has gone without any auditor's co-signature for longer than the grace time:
    /// the domain's log counts as unverified.
    Unaudited,
}

/// The logs this client has seen, and the auditors' keys (persisted with the client's state).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogPins {
    domains: BTreeMap<String, DomainView>,
    auditors: BTreeMap<String, ByteBuf>,
}

fn verify_signature(key: &[u8; 32], bytes: &[u8], signature: &[u8; 64]) -> bool {
    VerifyingKey::from_bytes(key)
        .and_then(|k| k.verify_strict(bytes, &Signature::from_bytes(signature)))
        .is_ok()
}

fn domain_of(user: &str) -> &str {
    user.rsplit_once('@').map_or("", |(_, d)| d)
}

/// The log's value for a signed device list: its master key and the digest of its bytes.
pub fn list_value(signed_list: &[u8]) -> Option<[u8; VALUE_BYTES]> {
    let master = sealpost_proto::transparency::device_list_master_key(signed_list)?;
    Some(value(&master, blake3::hash(signed_list).as_bytes()))
}

/// A root that is validly signed by the key it names and is of `domain`.
pub fn check_root(root: &SignedRoot, domain: &str) -> Result<(), TransparencyError> {
    if root.domain != domain
        || !verify_signature(&root.log_key, &root.signed_bytes(), &root.signature)
    {
        return Err(TransparencyError::BadSignature(domain.to_owned()));
    }
    Ok(())
}

impl LogPins {
    /// Checks `user`'s `signed_list` against its `evidence` (`None`: the broker sent none).
    /// `Ok(None)`: the domain has no log (never had one that this client saw).
    pub fn check(
        &self,
        user: &str,
        signed_list: &[u8],
        evidence: Option<&[u8]>,
    ) -> Result<Option<(SignedRoot, Step)>, TransparencyError> {
        let domain = domain_of(user);
        let Some(evidence) = evidence else {
            return match self.domains.contains_key(domain) {
                true => Err(TransparencyError::Missing(domain.to_owned())),
                false => Ok(None),
            };
        };
        let evidence = Evidence::from_bytes(evidence).map_err(|_| TransparencyError::Malformed)?;
        let root = evidence.root;
        check_root(&root, domain)?;
        let step = self.place(&root)?;
        let proof: LookupProof =
            rmp_serde::from_slice(&evidence.proof).map_err(|_| TransparencyError::Malformed)?;
        let proved = akd::verify::lookup::lookup_verify::<Config>(
            &root.vrf_key,
            root.root_hash,
            root.epoch,
            AkdLabel(user.as_bytes().to_vec()),
            proof,
        )
        .map_err(|_| TransparencyError::NotInLog(domain.to_owned()))?;
        if list_value(signed_list).map(|v| v.to_vec()) != Some(proved.value.0) {
            return Err(TransparencyError::NotInLog(domain.to_owned()));
        }
        Ok(Some((root, step)))
    }

    /// Where `root` stands against the newest root seen of its domain (its keys must be the
    /// pinned ones).
    pub fn place(&self, root: &SignedRoot) -> Result<Step, TransparencyError> {
        let Some(view) = self.domains.get(&root.domain) else {
            return Ok(Step::None);
        };
        if view.log_key.as_slice() != root.log_key || view.vrf_key.as_slice() != root.vrf_key {
            return Err(TransparencyError::LogKeyChanged(root.domain.clone()));
        }
        Ok(match root.epoch.cmp(&view.epoch) {
            std::cmp::Ordering::Equal if view.root_hash.as_slice() == root.root_hash => Step::None,
            std::cmp::Ordering::Equal => {
                return Err(TransparencyError::Fork {
                    domain: root.domain.clone(),
                    epoch: root.epoch,
                });
            }
            std::cmp::Ordering::Greater => Step::Advance {
                from: view.epoch,
                to: root.epoch,
            },
            std::cmp::Ordering::Less => {
                return Err(TransparencyError::Rollback {
                    domain: root.domain.clone(),
                    epoch: root.epoch,
                });
            }
        })
    }

    /// The newest root seen of `domain`: (epoch, root hash).
    pub fn newest(&self, domain: &str) -> Option<(u64, [u8; 32])> {
        let view = self.domains.get(domain)?;
        Some((view.epoch, view.root_hash.as_slice().try_into().ok()?))
    }

    /// Verifies that `roots` (consecutive epochs of one domain, signed by its pinned key) run
    /// from `first` to `last` as known, and that akd's append-only `proof` holds between them.
    pub async fn verify_extension(
        &self,
        domain: &str,
        first: (u64, [u8; 32]),
        roots: &[SignedRoot],
        proof: &[u8],
    ) -> Result<(), TransparencyError> {
        let fork = |epoch| TransparencyError::Fork {
            domain: domain.to_owned(),
            epoch,
        };
        let Some(head) = roots.first() else {
            return Err(fork(first.0));
        };
        if (head.epoch, head.root_hash) != first {
            return Err(fork(first.0));
        }
        for root in roots {
            check_root(root, domain)?;
            if let Some(view) = self.domains.get(domain)
                && view.log_key.as_slice() != root.log_key
            {
                return Err(TransparencyError::LogKeyChanged(domain.to_owned()));
            }
        }
        if roots
            .windows(2)
            .any(|w| w[0].epoch.checked_add(1) != Some(w[1].epoch))
        {
            return Err(fork(head.epoch));
        }
        if roots.len() == 1 {
            return Ok(());
        }
        let proof: akd::AppendOnlyProof =
            rmp_serde::from_slice(proof).map_err(|_| TransparencyError::Malformed)?;
        // akd checks each step against the epoch the proof names: it must be the signed one.
        if proof.epochs.len() + 1 != roots.len()
            || proof.epochs.iter().zip(roots).any(|(e, r)| *e != r.epoch)
        {
            return Err(fork(head.epoch));
        }
        akd::auditor::audit_verify::<Config>(roots.iter().map(|r| r.root_hash).collect(), proof)
            .await
            .map_err(|_| fork(head.epoch))
    }

    /// Makes `root` the newest seen of its domain if it is newer (pinning the domain's keys on
    /// first sight). Call only once its [`Step`] is done.
    pub fn accept(&mut self, root: &SignedRoot, now_ms: u64) {
        let view = self
            .domains
            .entry(root.domain.clone())
            .or_insert_with(|| DomainView {
                log_key: ByteBuf::from(root.log_key.to_vec()),
                vrf_key: ByteBuf::from(root.vrf_key.to_vec()),
                epoch: root.epoch,
                root_hash: ByteBuf::from(root.root_hash.to_vec()),
                cosigned_ms: 0,
                unaudited_since_ms: 0,
                cosigners: Vec::new(),
                awaited: None,
            });
        if root.epoch >= view.epoch {
            view.epoch = root.epoch;
            view.root_hash = ByteBuf::from(root.root_hash.to_vec());
        }
        if view.unaudited_since_ms == 0 {
            view.unaudited_since_ms = now_ms.max(1);
            view.awaited = Some(ByteBuf::from(root.to_bytes()));
        }
    }

    /// The earliest root of `domain` seen since its last co-signed one, if it is older than
    /// the newest: ask for its co-signatures too ([`LogPins::check_cosignatures`]).
    pub fn awaited(&self, domain: &str) -> Option<SignedRoot> {
        let view = self.domains.get(domain)?;
        let root = SignedRoot::from_bytes(view.awaited.as_ref()?).ok()?;
        (root.epoch < view.epoch).then_some(root)
    }

    /// Makes `root` the newest seen of its domain without this client having verified the
    /// epochs between (too many to fetch): until an auditor co-signs a root of the domain, its
    /// log counts as [`LogStatus::Pending`], then [`LogStatus::Unaudited`].
    pub fn accept_unproved(&mut self, root: &SignedRoot, now_ms: u64) {
        self.accept(root, now_ms);
        if let Some(view) = self.domains.get_mut(&root.domain) {
            view.cosigners.clear();
            if view.unaudited_since_ms == 0 {
                view.unaudited_since_ms = now_ms.max(1);
                view.awaited = Some(ByteBuf::from(root.to_bytes()));
            }
        }
    }

    /// Checks auditors' co-signatures of `root` (as the client's broker gave them): any that
    /// co-signs another hash for this epoch is a split view. Auditors' keys are pinned on first
    /// use.
    pub fn check_cosignatures(
        &mut self,
        root: &SignedRoot,
        cosignatures: &[Vec<u8>],
        now_ms: u64,
    ) -> Result<Audit, TransparencyError> {
        let mut by = Vec::new();
        for bytes in cosignatures {
            let Ok(c) = Cosignature::from_bytes(bytes) else {
                continue;
            };
            let theirs = &c.root;
            // A co-signature of this domain and epoch, by another domain, of a root this
            // domain signed (with the key pinned for it: `root` passed `place`).
            if theirs.domain != root.domain
                || theirs.epoch != root.epoch
                || c.auditor == root.domain
                || theirs.log_key != root.log_key
                || !verify_signature(&root.log_key, &theirs.signed_bytes(), &theirs.signature)
                || !verify_signature(&c.auditor_key, &c.signed_bytes(), &c.signature)
            {
                continue;
            }
            // The auditor's key: its own log's if this client has seen that log, else the
            // first one seen for it.
            let pinned = match self.domains.get(&c.auditor) {
                Some(view) => view.log_key.clone(),
                None => self
                    .auditors
                    .entry(c.auditor.clone())
                    .or_insert_with(|| ByteBuf::from(c.auditor_key.to_vec()))
                    .clone(),
            };
            if pinned.as_slice() != c.auditor_key {
                continue;
            }
            if theirs.root_hash != root.root_hash {
                // Two roots of one epoch, both signed by the domain: it equivocated.
                return Err(TransparencyError::SplitView {
                    domain: root.domain.clone(),
                    epoch: root.epoch,
                    auditor: c.auditor,
                });
            }
            by.push(c.auditor);
        }
        if let Some(view) = self.domains.get_mut(&root.domain)
            && !by.is_empty()
        {
            view.cosigned_ms = now_ms.max(1);
            view.cosigners = by.clone();
            // Auditors vouch for the log up to this root: what was awaited up to here is done.
            let awaited = view
                .awaited
                .as_ref()
                .and_then(|b| SignedRoot::from_bytes(b).ok())
                .map_or(0, |r| r.epoch);
            if root.epoch >= awaited {
                view.unaudited_since_ms = 0;
                view.awaited = None;
            }
        }
        Ok(if by.is_empty() {
            Audit::NotYet
        } else {
            Audit::CoSigned(by)
        })
    }

    /// How far `domain`'s log is verified: a root that no auditor co-signed within
    /// `grace_ms` of being seen makes it [`LogStatus::Unaudited`].
    pub fn status(&self, domain: &str, now_ms: u64, grace_ms: u64) -> LogStatus {
        let Some(v) = self.domains.get(domain) else {
            return LogStatus::NoLog;
        };
        if v.unaudited_since_ms != 0 {
            if now_ms.saturating_sub(v.unaudited_since_ms) > grace_ms {
                return LogStatus::Unaudited;
            }
            if v.cosigners.is_empty() {
                return LogStatus::Pending;
            }
        }
        LogStatus::CoSigned(v.cosigners.clone())
    }
}

/// A value of this account's own log entry, as its history proof shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey {
    /// The epoch that published it.
    pub epoch: u64,
    /// The entry's version.
    pub version: u64,
    /// The master key in it.
    pub master_key: [u8; 32],
}

/// Verifies the history proof of `user`'s entry at `root` (its newest `versions` values) and
/// returns them, newest first.
pub fn own_history(
    root: &SignedRoot,
    user: &str,
    proof: &[u8],
    versions: usize,
) -> Result<Vec<PublishedKey>, TransparencyError> {
    check_root(root, domain_of(user))?;
    let proof = rmp_serde::from_slice(proof).map_err(|_| TransparencyError::Malformed)?;
    let results = akd::verify::history::key_history_verify::<Config>(
        &root.vrf_key,
        root.root_hash,
        root.epoch,
        AkdLabel(user.as_bytes().to_vec()),
        proof,
        HistoryVerificationParams::Default {
            history_params: HistoryParams::MostRecent(versions),
        },
    )
    .map_err(|_| TransparencyError::NotInLog(domain_of(user).to_owned()))?;
    Ok(results
        .into_iter()
        .filter_map(|r| {
            Some(PublishedKey {
                epoch: r.epoch,
                version: r.version,
                master_key: value_master_key(&r.value.0)?,
            })
        })
        .collect())
}
