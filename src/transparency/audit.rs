//! Federated auditing: each broker checks its peers' logs over the federation link and signs
//! what it verified; the co-signatures go to every peer, so that a log that shows one peer one
//! root and another peer another (a split view) is caught where the two meet.
//!
//! ```text
//! every audit interval, per peer:
//!   GetRoots(from = last audited epoch) ──▶ roots from..=newest, one append-only proof
//!   check: same domain, signed by the key pinned at the first audit, epochs consecutive, the
//!          first root is the one audited last, akd's append-only proof verifies
//!   ──▶ co-sign each new root ──▶ keep ──▶ Cosign to every peer
//! a peer's Cosign ──▶ signed by that peer's pinned key ──▶ keep; a root hash that differs from
//!   one already co-signed for the same domain and epoch is a split view: logged and counted
//! ```
//!
//! The first audit of a peer trusts its newest root (as a client trusts a first master key);
//! from then on every root must extend it.

use std::{sync::Arc, time::Duration};

use sealpost_proto::{
    ErrorCode,
    federation::{LinkFrame, NEWEST},
    transparency::{Cosignature, Evidence, MAX_AUDIT_EPOCHS, SignedRoot},
};
use tracing::{debug, warn};

use super::{Config, Log, LogError};
use crate::{
    crypto::verify_log_signature,
    federation::{Federation, messages::Request},
};

/// Co-signatures are kept for this many epochs behind the newest audited one (at one epoch a
/// second, about a day); older ones are dropped.
pub const KEEP_COSIGNED_EPOCHS: u64 = 100_000;

/// What went wrong auditing a peer (each is logged and counted, none stops the auditor).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The peer could not be asked.
    #[error("peer unreachable ({0:?})")]
    Unreachable(ErrorCode),
    /// The peer's answer broke the protocol or a check.
    #[error("{0}")]
    Invalid(String),
    /// The peer showed a root that does not extend what it showed before: a fork.
    #[error("fork: {0}")]
    Fork(String),
    /// This broker's own store failed.
    #[error(transparent)]
    Local(#[from] LogError),
}

impl From<crate::store::StoreError> for AuditError {
    fn from(e: crate::store::StoreError) -> Self {
        AuditError::Local(e.into())
    }
}

/// Audits every peer every `interval` until the process ends.
pub fn start(log: Log, federation: Arc<Federation>, interval: Duration) {
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Ok(own) = log.latest(None).await {
                let keep_from = own.epoch.saturating_sub(KEEP_COSIGNED_EPOCHS);
                if let Err(e) = log
                    .store()
                    .prune_cosignatures(log.domain(), keep_from)
                    .await
                {
                    warn!(error = %e, "pruning co-signatures failed");
                }
            }
            for peer in federation.peer_domains() {
                match audit_peer(&log, &federation, &peer).await {
                    Ok(fresh) if !fresh.is_empty() => gossip(&federation, fresh).await,
                    Ok(_) => {}
                    Err(AuditError::Unreachable(code)) => {
                        debug!(peer = %peer, code = code.as_str(), "audit: peer unreachable");
                    }
                    Err(e) => {
                        metrics::counter!("sealpost_transparency_audit_failures_total", "peer" => peer.clone())
                            .increment(1);
                        warn!(peer = %peer, error = %e, "audit of a peer's transparency log failed");
                    }
                }
            }
        }
    });
}

/// One audit of `peer`: the co-signatures made of its new roots.
pub async fn audit_peer(
    log: &Log,
    federation: &Federation,
    peer: &str,
) -> Result<Vec<Cosignature>, AuditError> {
    let store = log.store();
    let last = match store.audited(peer).await? {
        Some(bytes) => Some(decode(&bytes)?),
        None => None,
    };
    let from = last.as_ref().map_or(NEWEST, |r| r.epoch);
    let (roots, proof) = match federation
        .request(peer, Request::GetRoots { from, to: 0 })
        .await
    {
        Ok(LinkFrame::Roots { roots, proof, .. }) => (roots, proof),
        Ok(LinkFrame::Refused { code, .. }) | Err(code) => {
            return Err(AuditError::Unreachable(code));
        }
        Ok(_) => return Err(AuditError::Invalid("not a roots answer".into())),
    };
    let roots = roots
        .iter()
        .map(|r| decode(r))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(newest) = roots.last().cloned() else {
        return Err(AuditError::Invalid("no roots".into()));
    };
    let pinned = last.as_ref().map_or(newest.log_key, |r| r.log_key);
    for root in &roots {
        if root.domain != peer {
            return Err(AuditError::Invalid("a root of another domain".into()));
        }
        if root.log_key != pinned
            || !verify_log_signature(&pinned, &root.signed_bytes(), &root.signature)
        {
            return Err(AuditError::Invalid(
                "a root not signed by the peer's log key".into(),
            ));
        }
    }
    let fresh: Vec<SignedRoot> = match &last {
        None => vec![newest.clone()],
        Some(last) => {
            let first = &roots[0];
            if first.epoch != last.epoch || first.root_hash != last.root_hash {
                return Err(AuditError::Fork(format!(
                    "epoch {} has another root hash than the one audited before",
                    last.epoch
                )));
            }
            if roots.len() == 1 {
                return Ok(Vec::new());
            }
            if roots
                .windows(2)
                .any(|w| w[0].epoch.checked_add(1) != Some(w[1].epoch))
                || roots.len() as u64 > MAX_AUDIT_EPOCHS + 1
            {
                return Err(AuditError::Invalid(
                    "roots are not consecutive epochs".into(),
                ));
            }
            verify_append_only(&roots, &proof).await?;
            roots[1..].to_vec()
        }
    };
    let mut made = Vec::new();
    for root in &fresh {
        let cosignature = log.cosign(root);
        keep(log, &cosignature).await?;
        made.push(cosignature);
    }
    store.set_audited(peer, newest.to_bytes()).await?;
    store
        .prune_cosignatures(peer, newest.epoch.saturating_sub(KEEP_COSIGNED_EPOCHS))
        .await?;
    metrics::gauge!("sealpost_transparency_audited_epoch", "peer" => peer.to_owned())
        .set(newest.epoch as f64);
    Ok(made)
}

/// akd's append-only proof over consecutive `roots`.
pub async fn verify_append_only(roots: &[SignedRoot], proof: &[u8]) -> Result<(), AuditError> {
    let proof: akd::AppendOnlyProof = rmp_serde::from_slice(proof)
        .map_err(|e| AuditError::Invalid(format!("append-only proof does not decode: {e}")))?;
    // akd checks each step against the epoch the proof names: it must be the signed one.
    if proof.epochs.len() + 1 != roots.len()
        || proof.epochs.iter().zip(roots).any(|(e, r)| *e != r.epoch)
    {
        return Err(AuditError::Invalid(
            "the append-only proof is for other epochs than the roots".into(),
        ));
    }
    let hashes = roots.iter().map(|r| r.root_hash).collect();
    akd::auditor::audit_verify::<Config>(hashes, proof)
        .await
        .map_err(|e| AuditError::Fork(format!("append-only proof fails: {e}")))
}

/// Sends `cosignatures` to every peer (best effort: the next round sends newer ones).
async fn gossip(federation: &Federation, cosignatures: Vec<Cosignature>) {
    let encoded: Vec<Vec<u8>> = cosignatures.iter().map(Cosignature::to_bytes).collect();
    for peer in federation.peer_domains() {
        for chunk in encoded.chunks(sealpost_proto::federation::MAX_COSIGNATURES) {
            let request = Request::Cosign {
                cosignatures: chunk.to_vec(),
            };
            if let Err(code) = federation.request(&peer, request).await {
                debug!(peer = %peer, code = code.as_str(), "co-signatures not sent");
            }
        }
    }
}

/// Keeps a co-signature whose root is already known to be signed by its domain, and reports
/// a split view: another root of that domain, signed by it, for the same epoch (co-signed by
/// anyone, or this domain's own).
async fn keep(log: &Log, cosignature: &Cosignature) -> Result<(), AuditError> {
    let store = log.store();
    let root = &cosignature.root;
    let known = store.cosignatures(&root.domain, root.epoch).await?;
    let conflict = known
        .iter()
        .filter_map(|b| Cosignature::from_bytes(b).ok())
        .any(|c| c.root.root_hash != root.root_hash);
    let own_conflict = if root.domain == log.domain() {
        let own = store.roots(root.epoch, root.epoch).await?;
        own.first()
            .and_then(|b| SignedRoot::from_bytes(b).ok())
            .is_some_and(|r| r.root_hash != root.root_hash)
    } else {
        false
    };
    if conflict || own_conflict {
        metrics::counter!("sealpost_transparency_split_views_total", "domain" => root.domain.clone())
            .increment(1);
        warn!(
            domain = %root.domain,
            epoch = root.epoch,
            auditor = %cosignature.auditor,
            "SPLIT VIEW: a transparency log signed two different roots for one epoch"
        );
    }
    store
        .put_cosignature(
            &root.domain,
            root.epoch,
            &cosignature.auditor,
            cosignature.to_bytes(),
        )
        .await?;
    Ok(())
}

/// The log key this broker pinned for `domain`: its own, or the one of its first audit.
async fn pinned_key(log: &Log, domain: &str) -> Option<[u8; 32]> {
    if domain == log.domain() {
        return Some(log.log_key());
    }
    let bytes = log.store().audited(domain).await.ok()??;
    SignedRoot::from_bytes(&bytes).ok().map(|r| r.log_key)
}

/// A peer's `Cosign`: keeps those that `origin` made of another domain's root, signed with the
/// log key this broker pinned for `origin`, of a root signed by the log key it pinned for that
/// domain (this one, or one it audits). Anything else is dropped: a peer can neither speak for
/// another auditor, vouch for itself, nor attribute to a domain a root it did not sign.
pub async fn receive(log: &Log, origin: &str, cosignatures: Vec<Vec<u8>>) {
    let Some(origin_key) = pinned_key(log, origin)
        .await
        .filter(|_| origin != log.domain())
    else {
        return;
    };
    for bytes in cosignatures {
        let Ok(c) = Cosignature::from_bytes(&bytes) else {
            continue;
        };
        let root = &c.root;
        let root_key = match pinned_key(log, &root.domain).await {
            Some(key) if root.domain != origin => key,
            _ => continue,
        };
        if c.auditor != origin
            || c.auditor_key != origin_key
            || !verify_log_signature(&origin_key, &c.signed_bytes(), &c.signature)
            || root.log_key != root_key
            || !verify_log_signature(&root_key, &root.signed_bytes(), &root.signature)
        {
            debug!(origin = %origin, "a co-signature that does not verify was dropped");
            continue;
        }
        if let Err(e) = keep(log, &c).await {
            warn!(error = %e, "keeping a peer's co-signature failed");
        }
    }
}

/// The answer to a peer's `GetRoots`.
pub async fn answer_roots(
    log: Option<&Log>,
    origin: &str,
    req_id: u64,
    from: u64,
    to: u64,
) -> LinkFrame {
    let Some(log) = log else {
        return LinkFrame::Refused {
            req_id,
            code: ErrorCode::NotFound,
        };
    };
    let answer = async {
        let newest = log.latest(Some(origin)).await?;
        if from >= newest.epoch {
            let root = if from > newest.epoch {
                newest
            } else {
                log.root_for(Some(origin), from)
                    .await?
                    .ok_or(LogError::BadRange)?
            };
            return Ok((vec![root.to_bytes()], Vec::new()));
        }
        let to = if to == 0 { newest.epoch } else { to };
        let (roots, proof) = log.audit(from, to, Some(origin)).await?;
        Ok::<_, LogError>((roots.iter().map(SignedRoot::to_bytes).collect(), proof))
    };
    match answer.await {
        Ok((roots, proof)) => LinkFrame::Roots {
            req_id,
            roots,
            proof,
        },
        Err(LogError::BadRange) => LinkFrame::Refused {
            req_id,
            code: ErrorCode::NotFound,
        },
        Err(e) => {
            warn!(error = %e, "answering a peer's audit failed");
            LinkFrame::Refused {
                req_id,
                code: ErrorCode::StoreUnavailable,
            }
        }
    }
}

fn decode(bytes: &[u8]) -> Result<SignedRoot, AuditError> {
    SignedRoot::from_bytes(bytes).map_err(|e| AuditError::Invalid(format!("root: {e}")))
}

/// Checks a device list a peer's broker served (before it is passed on to a client, who checks
/// it again): its root is signed by the peer's pinned log key, does not contradict the root
/// audited for the same epoch, and its lookup proof proves this very list.
pub async fn check_relayed(
    log: &Log,
    user: &str,
    signed_list: &[u8],
    evidence: &[u8],
) -> Result<(), AuditError> {
    let invalid = |what: &str| AuditError::Invalid(what.to_owned());
    let evidence =
        Evidence::from_bytes(evidence).map_err(|_| invalid("evidence does not decode"))?;
    let root = &evidence.root;
    let domain = user.rsplit_once('@').map_or("", |(_, d)| d);
    let audited = match log.store().audited(domain).await? {
        Some(bytes) => Some(decode(&bytes)?),
        None => None,
    };
    let key = audited.as_ref().map_or(root.log_key, |a| a.log_key);
    if root.domain != domain
        || root.log_key != key
        || !verify_log_signature(&key, &root.signed_bytes(), &root.signature)
    {
        return Err(invalid("a root not signed by the domain's log key"));
    }
    if let Some(a) = &audited
        && a.epoch == root.epoch
        && a.root_hash != root.root_hash
    {
        return Err(AuditError::Fork(format!(
            "epoch {} served with another root hash than the one audited",
            root.epoch
        )));
    }
    let proof: akd::LookupProof =
        rmp_serde::from_slice(&evidence.proof).map_err(|_| invalid("proof does not decode"))?;
    let proved = akd::verify::lookup::lookup_verify::<Config>(
        &root.vrf_key,
        root.root_hash,
        root.epoch,
        akd::AkdLabel(user.as_bytes().to_vec()),
        proof,
    )
    .map_err(|e| invalid(&format!("lookup proof fails: {e}")))?;
    if super::list_value(signed_list).map(|v| v.to_vec()) != Some(proved.value.0) {
        return Err(invalid("the lookup proof is for another list"));
    }
    Ok(())
}
