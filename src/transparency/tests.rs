//! The log on the in-memory store: proofs that verify, and forgeries that do not.

use std::{sync::Arc, time::Duration};

use akd::{AkdLabel, LookupProof};
use sealpost_proto::transparency::{SignedRoot, value_master_key};
use serde_bytes::ByteBuf;

use super::{Config, Log, LogSettings, audit::verify_append_only};
use crate::{
    crypto::{LogKeys, verify_log_signature},
    store::{
        StoreFuture,
        transparency::{KtBatch, TransparencyStore, memory::MemoryTransparency},
    },
};

/// A signed device-list blob as clients publish it (the signature is not checked by the log).
fn list(user: &str, version: u64, master: u8) -> Vec<u8> {
    let body = rmp_serde::to_vec(&(
        1u8,
        user,
        version,
        ByteBuf::from(vec![master; 32]),
        Vec::<(u32, ByteBuf)>::new(),
    ))
    .unwrap();
    let mut blob = vec![1u8];
    blob.extend([0u8; 64]);
    blob.extend(body);
    blob
}

async fn open(equivocate_to: Vec<String>) -> Log {
    open_on(Arc::new(MemoryTransparency::new()), equivocate_to).await
}

async fn open_on(store: Arc<dyn TransparencyStore>, equivocate_to: Vec<String>) -> Log {
    Log::open(
        "a.example".into(),
        store,
        LogKeys::from_seeds([1; 32], [2; 32]),
        LogSettings {
            epoch_interval: Duration::from_millis(10),
            wait: Duration::from_secs(10),
            equivocate_to,
        },
    )
    .await
    .unwrap()
}

fn verify(root: &SignedRoot, handle: &str, proof: &[u8]) -> Result<Vec<u8>, String> {
    let proof: LookupProof = rmp_serde::from_slice(proof).map_err(|e| e.to_string())?;
    akd::verify::lookup::lookup_verify::<Config>(
        &root.vrf_key,
        root.root_hash,
        root.epoch,
        AkdLabel(handle.as_bytes().to_vec()),
        proof,
    )
    .map(|r| r.value.0)
    .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_fetched_list_comes_with_a_lookup_proof_that_verifies_against_a_signed_root() {
    let log = open(Vec::new()).await;
    let alice = list("alice@a.example", 1, 7);
    log.update("alice@a.example", &alice);
    log.update("bob@a.example", &list("bob@a.example", 1, 8));
    let evidence = log
        .evidence("alice@a.example", &alice, None, true)
        .await
        .unwrap();
    let root = &evidence.root;
    assert!(root.epoch >= 1);
    assert!(verify_log_signature(
        &log.log_key(),
        &root.signed_bytes(),
        &root.signature
    ));
    let value = verify(root, "alice@a.example", &evidence.proof).unwrap();
    assert_eq!(value_master_key(&value), Some([7; 32]));
    assert_eq!(value, super::list_value(&alice).unwrap().to_vec());

    // The proof is for alice only, under this root only.
    assert!(verify(root, "bob@a.example", &evidence.proof).is_err());
    let mut other = root.clone();
    other.root_hash[0] ^= 1;
    assert!(verify(&other, "alice@a.example", &evidence.proof).is_err());
    let mut tampered: LookupProof = rmp_serde::from_slice(&evidence.proof).unwrap();
    tampered.value.0[5] ^= 1;
    let tampered = rmp_serde::to_vec(&tampered).unwrap();
    assert!(verify(root, "alice@a.example", &tampered).is_err());
}

#[tokio::test]
async fn a_list_the_log_was_never_told_of_is_published_before_it_is_served() {
    let log = open(Vec::new()).await;
    // Written to the directory behind the log's back (an intruder, or a list older than the
    // log): fetching it publishes it, so it is in the log that its owner monitors.
    let injected = list("alice@a.example", 9, 66);
    let evidence = log
        .evidence("alice@a.example", &injected, None, true)
        .await
        .unwrap();
    let value = verify(&evidence.root, "alice@a.example", &evidence.proof).unwrap();
    assert_eq!(value_master_key(&value), Some([66; 32]));
    let (root, history) = log.history("alice@a.example", 8).await.unwrap();
    assert!(!history.is_empty());
    assert_eq!(root.epoch, evidence.root.epoch);
}

#[tokio::test]
async fn roots_extend_each_other_and_a_fork_fails_the_append_only_proof() {
    let log = open(vec!["b.example".into()]).await;
    for v in 1..=3u8 {
        let l = list("alice@a.example", u64::from(v), v);
        log.update("alice@a.example", &l);
        log.evidence("alice@a.example", &l, None, true)
            .await
            .unwrap();
    }
    let newest = log.latest(None).await.unwrap().epoch;
    assert!(newest >= 3);
    let (roots, proof) = log.audit(1, newest, None).await.unwrap();
    assert_eq!(roots.len() as u64, newest);
    verify_append_only(&roots, &proof).await.unwrap();

    // The equivocation hook shows b.example another log: same key, other roots.
    let forked = log.latest(Some("b.example")).await.unwrap();
    assert_eq!(forked.epoch, newest);
    assert_ne!(forked.root_hash, roots.last().unwrap().root_hash);
    assert!(verify_log_signature(
        &log.log_key(),
        &forked.signed_bytes(),
        &forked.signature
    ));
    // Real roots with a forked last one: the proof does not hold.
    let mut mixed = roots.clone();
    *mixed.last_mut().unwrap() = forked;
    assert!(verify_append_only(&mixed, &proof).await.is_err());
}

#[tokio::test]
async fn a_relaying_broker_refuses_a_tampered_proof_a_foreign_list_and_a_forged_root() {
    use super::audit::check_relayed;
    let log = open(Vec::new()).await;
    let alice = list("alice@a.example", 1, 7);
    let evidence = log
        .evidence("alice@a.example", &alice, None, true)
        .await
        .unwrap();
    // The auditing broker is another log (here: the same code, as b.example would run it).
    let auditor = open(Vec::new()).await;
    check_relayed(&auditor, "alice@a.example", &alice, &evidence.to_bytes())
        .await
        .unwrap();
    let other = list("alice@a.example", 2, 9);
    assert!(
        check_relayed(&auditor, "alice@a.example", &other, &evidence.to_bytes())
            .await
            .is_err()
    );
    let mut tampered = evidence.clone();
    let mut proof: LookupProof = rmp_serde::from_slice(&tampered.proof).unwrap();
    proof.existence_vrf_proof[0] ^= 1;
    tampered.proof = rmp_serde::to_vec(&proof).unwrap();
    assert!(
        check_relayed(&auditor, "alice@a.example", &alice, &tampered.to_bytes())
            .await
            .is_err()
    );
    let mut forged = evidence.clone();
    forged.root.epoch += 1;
    assert!(
        check_relayed(&auditor, "alice@a.example", &alice, &forged.to_bytes())
            .await
            .is_err()
    );
}

/// The in-memory log store, whose next `states` read or `put_root` write can be held at a
/// gate: it says when it got there and waits to be let through.
struct Gated {
    store: MemoryTransparency,
    gate: std::sync::Mutex<Option<Gate>>,
    root_gate: std::sync::Mutex<Option<Gate>>,
}

/// Tells the test a call reached the gate; waits for the test to let it through.
type Gate = (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<()>,
);

impl Gated {
    fn new() -> Arc<Gated> {
        Arc::new(Gated {
            store: MemoryTransparency::new(),
            gate: std::sync::Mutex::default(),
            root_gate: std::sync::Mutex::default(),
        })
    }

    /// Arms `gate`: the receiver says when a call got there, the sender lets it through.
    fn arm(
        gate: &std::sync::Mutex<Option<Gate>>,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (reached, at_gate) = tokio::sync::oneshot::channel();
        let (let_through, through) = tokio::sync::oneshot::channel();
        *gate.lock().expect("gate lock") = Some((reached, through));
        (at_gate, let_through)
    }
}

/// Waits at `gate` if it is armed, then runs `call`.
fn gated<T: Send + 'static>(
    gate: &std::sync::Mutex<Option<Gate>>,
    call: StoreFuture<T>,
) -> StoreFuture<T> {
    let gate = gate.lock().expect("gate lock").take();
    Box::pin(async move {
        if let Some((reached, through)) = gate {
            let _ = reached.send(());
            let _ = through.await;
        }
        call.await
    })
}

impl TransparencyStore for Gated {
    fn write(&self, batch: KtBatch) -> StoreFuture<()> {
        self.store.write(batch)
    }
    fn records(&self, ids: Vec<Vec<u8>>) -> StoreFuture<Vec<Option<Vec<u8>>>> {
        self.store.records(ids)
    }
    fn states(&self, label: Vec<u8>) -> StoreFuture<Vec<Vec<u8>>> {
        gated(&self.gate, self.store.states(label))
    }
    fn everything(&self) -> StoreFuture<Vec<Vec<u8>>> {
        self.store.everything()
    }
    fn put_root(&self, epoch: u64, root: Vec<u8>) -> StoreFuture<()> {
        // The memory store writes when called: the write itself must wait.
        let store = self.store.clone();
        gated(
            &self.root_gate,
            Box::pin(async move { store.put_root(epoch, root).await }),
        )
    }
    fn roots(&self, from: u64, to: u64) -> StoreFuture<Vec<Vec<u8>>> {
        self.store.roots(from, to)
    }
    fn latest_root(&self) -> StoreFuture<Option<Vec<u8>>> {
        self.store.latest_root()
    }
    fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        auditor: &str,
        cosignature: Vec<u8>,
    ) -> StoreFuture<()> {
        self.store
            .put_cosignature(domain, epoch, auditor, cosignature)
    }
    fn cosignatures(&self, domain: &str, epoch: u64) -> StoreFuture<Vec<Vec<u8>>> {
        self.store.cosignatures(domain, epoch)
    }
    fn prune_cosignatures(&self, domain: &str, before_epoch: u64) -> StoreFuture<()> {
        self.store.prune_cosignatures(domain, before_epoch)
    }
    fn audited(&self, domain: &str) -> StoreFuture<Option<Vec<u8>>> {
        self.store.audited(domain)
    }
    fn set_audited(&self, domain: &str, root: Vec<u8>) -> StoreFuture<()> {
        self.store.set_audited(domain, root)
    }
}

/// A log on a [`Gated`] store whose signed root holds alice's list (master key 7s).
async fn gated_log_with_alice() -> (Arc<Gated>, Log) {
    let store = Gated::new();
    let log = open_on(store.clone(), Vec::new()).await;
    let alice = list("alice@a.example", 1, 7);
    log.update("alice@a.example", &alice);
    log.evidence("alice@a.example", &alice, None, true)
        .await
        .unwrap();
    (store, log)
}

/// akd builds a history proof from several reads of the tree; an epoch published between
/// them (here, for another user) must not leave a proof that no signed root verifies
/// (CI once saw a linking device refuse its own account's log for this).
#[tokio::test]
async fn a_history_proof_built_across_a_publish_still_verifies() {
    let (store, log) = gated_log_with_alice().await;

    // The history read stops between akd's reads of the tree; bob's list is published.
    let (at_gate, let_through) = Gated::arm(&store.gate);
    let history = tokio::spawn({
        let log = log.clone();
        async move { log.history("alice@a.example", 8).await }
    });
    at_gate.await.expect("the history read reached the gate");
    let before = *log.inner.epoch.borrow();
    let mut epochs = log.inner.epoch.subscribe();
    log.update("bob@a.example", &list("bob@a.example", 1, 8));
    epochs.wait_for(|&e| e > before).await.unwrap();
    let_through.send(()).unwrap();

    let (root, proof) = history.await.unwrap().unwrap();
    let proof = rmp_serde::from_slice(&proof).unwrap();
    let versions = akd::verify::history::key_history_verify::<Config>(
        &root.vrf_key,
        root.root_hash,
        root.epoch,
        AkdLabel(b"alice@a.example".to_vec()),
        proof,
        akd::HistoryVerificationParams::Default {
            history_params: akd::HistoryParams::MostRecent(8),
        },
    )
    .expect("the proof verifies against the root it came with");
    assert_eq!(value_master_key(&versions[0].value.0), Some([7; 32]));
}

/// A history asked for between akd's commit of an epoch and the log's signature of its root
/// waits for the signature instead of failing.
#[tokio::test]
async fn a_history_asked_for_before_its_epoch_is_signed_waits_for_the_signature() {
    let (store, log) = gated_log_with_alice().await;

    // Bob's epoch is committed; its root is held before it is stored.
    let (at_gate, let_through) = Gated::arm(&store.root_gate);
    log.update("bob@a.example", &list("bob@a.example", 1, 8));
    at_gate
        .await
        .expect("the publisher reached the root's write");
    let waiting = log.inner.epoch.receiver_count();
    let history = tokio::spawn({
        let log = log.clone();
        async move { log.history("alice@a.example", 8).await }
    });
    // Once it waits for the signature (it watches the signed epochs), the root is stored.
    while log.inner.epoch.receiver_count() == waiting && !history.is_finished() {
        tokio::task::yield_now().await;
    }
    let_through.send(()).unwrap();
    let (root, _) = history.await.unwrap().expect("the history, once signed");
    assert_eq!(root.epoch, *log.inner.epoch.borrow());
}
