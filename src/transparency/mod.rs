//! Key transparency: this domain's verifiable append-only log of handle → (master key,
//! device-list digest), published in epochs whose roots the log key signs, and the auditing of
//! peers' logs ([`audit`]).
//!
//! ```text
//! PUT device-list ──▶ Log::update ──▶ pending ──(at most one epoch per interval)──▶ akd publish
//!                                                                   └──▶ sign the root ──▶ store
//! GET device-list ──▶ Log::evidence(handle, list): the lookup proof at the newest signed root,
//!                     once that root holds this very list (a list not queued yet is queued)
//! peer's auditor ──▶ Log::audit(from, to): signed roots and one append-only proof
//! ```
//!
//! The log follows the directory: whatever list the broker serves is what the log publishes,
//! so a key the operator (or an intruder with the store) puts in the directory is in the log
//! too, where the account's own devices see it ([`Log::history`]) and auditors keep it.
//!
//! akd (WhatsApp's auditable key directory) does the tree, the VRF and the proofs; its records
//! live on the store's [`TransparencyStore`] seam ([`storage`]).

pub mod audit;
mod storage;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use akd::{
    AkdLabel, AkdValue, AzksParallelismConfig, Directory, HistoryParams,
    ecvrf::{VRFKeyStorage, VrfError},
    storage::StorageManager,
};
use async_trait::async_trait;
use sealpost_proto::transparency::{
    AKD_DOMAIN_LABEL, Cosignature, Evidence, MAX_AUDIT_EPOCHS, SignedRoot, VALUE_BYTES,
    device_list_master_key, value,
};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};
use zeroize::Zeroizing;

use self::storage::AkdStore;
use crate::{
    crypto::LogKeys,
    store::{
        StoreError,
        transparency::{TransparencyStore, memory::MemoryTransparency},
    },
};

/// akd's configuration for Sealpost logs (its hashes are BLAKE3).
pub type Config = akd::ExperimentalConfiguration<Label>;

/// akd's domain label of Sealpost logs.
#[derive(Clone)]
pub struct Label;

impl akd::configuration::DomainLabel for Label {
    fn domain_label() -> &'static [u8] {
        AKD_DOMAIN_LABEL
    }
}

/// The VRF key, as akd asks for it.
#[derive(Clone)]
struct Vrf(Arc<Zeroizing<[u8; 32]>>);

#[async_trait]
impl VRFKeyStorage for Vrf {
    async fn retrieve(&self) -> Result<Vec<u8>, VrfError> {
        Ok(self.0.to_vec())
    }
}

/// How many times [`Log::history`] builds a proof that an epoch published meanwhile spoilt.
const HISTORY_ATTEMPTS: usize = 8;

/// Why the log could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// akd failed (its storage, or a proof it could not build). Only where: akd's own
    /// messages can name handles, and this error is logged.
    #[error("transparency log: {0} failed")]
    Akd(&'static str),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log holds another list for the handle than the one asked about, and nothing is
    /// pending for it: the caller read the directory before a change; read it again.
    #[error("the device list changed meanwhile")]
    Superseded,
    /// The list was not published within the wait (the log is behind or failing).
    #[error("the transparency log has not published this device list yet")]
    NotPublished,
    /// The bytes are not a signed device list.
    #[error("not a signed device list")]
    NotAList,
    /// An audit range that is empty, reversed, or beyond the newest epoch.
    #[error("no such epoch range")]
    BadRange,
}

/// An akd failure, without akd's message (it can name a handle).
fn akd(what: &'static str) -> impl FnOnce(akd::errors::AkdError) -> LogError {
    move |_| LogError::Akd(what)
}

fn encoding(_: rmp_serde::encode::Error) -> LogError {
    LogError::Akd("encoding a proof")
}

/// When epochs are published.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// At most one epoch per interval; none while nothing changes.
    pub epoch_interval: Duration,
    /// How long a device-list fetch waits for its list to be published.
    pub wait: Duration,
    /// Debug builds' test hook only (`SEALPOST_FAILPOINT_EQUIVOCATE_FILE`): peers shown a
    /// forked log, a split view that auditors must catch. Empty otherwise.
    pub equivocate_to: Vec<String>,
}

/// This domain's log (a cheap handle).
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

struct Inner {
    domain: String,
    keys: LogKeys,
    vrf_key: [u8; 32],
    settings: LogSettings,
    view: View,
    /// Debug builds only: a second, forked log shown to the peers the equivocation hook names.
    fork: Option<(View, Vec<String>)>,
    /// Values waiting for the next epoch, by handle.
    pending: Mutex<HashMap<String, [u8; VALUE_BYTES]>>,
    wake: Notify,
    /// The newest signed epoch.
    epoch: watch::Sender<u64>,
}

/// One directory and the store it lives in.
struct View {
    directory: Directory<Config, AkdStore, Vrf>,
    states: AkdStore,
    store: Arc<dyn TransparencyStore>,
}

impl View {
    async fn open(store: Arc<dyn TransparencyStore>, vrf: Vrf) -> Result<View, LogError> {
        let states = AkdStore::new(store.clone());
        let directory = Directory::new(
            StorageManager::new_no_cache(states.clone()),
            vrf,
            AzksParallelismConfig::default(),
        )
        .await
        .map_err(akd("opening the directory"))?;
        Ok(View {
            directory,
            states,
            store,
        })
    }

    async fn root(&self, epoch: u64) -> Result<Option<SignedRoot>, LogError> {
        let raw = self.store.roots(epoch, epoch).await?;
        raw.first().map(|r| decode_root(r)).transpose()
    }
}

fn decode_root(bytes: &[u8]) -> Result<SignedRoot, LogError> {
    SignedRoot::from_bytes(bytes)
        .map_err(|e| LogError::Store(StoreError::Corruption(e.to_string())))
}

/// The log's value for a signed device list.
pub fn list_value(signed_list: &[u8]) -> Option<[u8; VALUE_BYTES]> {
    let master = device_list_master_key(signed_list)?;
    Some(value(&master, blake3::hash(signed_list).as_bytes()))
}

impl Log {
    /// Opens the log in `store` (creating its first epoch if it is new) and starts publishing.
    pub async fn open(
        domain: String,
        store: Arc<dyn TransparencyStore>,
        keys: LogKeys,
        settings: LogSettings,
    ) -> Result<Log, LogError> {
        let vrf = Vrf(Arc::new(Zeroizing::new(*keys.vrf_secret())));
        let view = View::open(store, vrf.clone()).await?;
        let vrf_key: [u8; 32] = *view
            .directory
            .get_public_key()
            .await
            .map_err(akd("reading the VRF key"))?
            .as_bytes();
        let fork = if settings.equivocate_to.is_empty() {
            None
        } else {
            warn!("transparency: EQUIVOCATING to some peers (debug test hook)");
            let fork = View::open(Arc::new(MemoryTransparency::new()), vrf).await?;
            Some((fork, settings.equivocate_to.clone()))
        };
        let (epoch, _) = watch::channel(0);
        let log = Log {
            inner: Arc::new(Inner {
                domain,
                keys,
                vrf_key,
                settings,
                view,
                fork,
                pending: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                epoch,
            }),
        };
        // A crash between akd's publication and the root's signature leaves the newest epoch
        // unsigned: sign it now.
        for view in log.views() {
            log.sign_current(view).await?;
        }
        let current = log
            .inner
            .view
            .directory
            .get_epoch_hash()
            .await
            .map_err(akd("reading the epoch"))?;
        log.inner.epoch.send_replace(current.0);
        tokio::spawn(log.clone().publisher());
        Ok(log)
    }

    fn views(&self) -> impl Iterator<Item = &View> {
        std::iter::once(&self.inner.view).chain(self.inner.fork.as_ref().map(|(v, _)| v))
    }

    /// The view `peer` is shown (the fork only under the debug equivocation hook).
    fn view_for(&self, peer: Option<&str>) -> &View {
        match (&self.inner.fork, peer) {
            (Some((fork, peers)), Some(peer)) if peers.iter().any(|p| p == peer) => fork,
            _ => &self.inner.view,
        }
    }

    /// This domain.
    pub fn domain(&self) -> &str {
        &self.inner.domain
    }

    /// The log's signing key (public).
    pub fn log_key(&self) -> [u8; 32] {
        self.inner.keys.public()
    }

    /// The log's store (roots, co-signatures, audit progress).
    pub fn store(&self) -> &Arc<dyn TransparencyStore> {
        &self.inner.view.store
    }

    /// This broker's co-signature of another domain's root.
    pub fn cosign(&self, root: &SignedRoot) -> Cosignature {
        let mut c = Cosignature {
            auditor: self.inner.domain.clone(),
            auditor_key: self.inner.keys.public(),
            root: root.clone(),
            signature: [0; 64],
        };
        c.signature = self.inner.keys.sign(&c.signed_bytes());
        c
    }

    /// The signed root of `epoch` (as `peer` is shown it).
    pub async fn root_for(
        &self,
        peer: Option<&str>,
        epoch: u64,
    ) -> Result<Option<SignedRoot>, LogError> {
        self.view_for(peer).root(epoch).await
    }

    async fn sign_current(&self, view: &View) -> Result<SignedRoot, LogError> {
        let current = view
            .directory
            .get_epoch_hash()
            .await
            .map_err(akd("reading the epoch"))?;
        if let Some(root) = view.root(current.0).await? {
            return Ok(root);
        }
        let mut root = SignedRoot {
            domain: self.inner.domain.clone(),
            epoch: current.0,
            root_hash: current.1,
            vrf_key: self.inner.vrf_key,
            log_key: self.inner.keys.public(),
            signature: [0; 64],
        };
        root.signature = self.inner.keys.sign(&root.signed_bytes());
        view.store.put_root(root.epoch, root.to_bytes()).await?;
        Ok(root)
    }

    /// Queues `handle`'s new list for the next epoch.
    pub fn update(&self, handle: &str, signed_list: &[u8]) {
        if let Some(v) = list_value(signed_list) {
            self.queue(handle, v);
        }
    }

    fn queue(&self, handle: &str, v: [u8; VALUE_BYTES]) {
        let mut pending = self.inner.pending.lock().expect("pending lock");
        pending.insert(handle.to_owned(), v);
        drop(pending);
        self.inner.wake.notify_one();
    }

    /// The newest signed root (shown to `peer`, for auditors).
    pub async fn latest(&self, peer: Option<&str>) -> Result<SignedRoot, LogError> {
        let view = self.view_for(peer);
        match view.store.latest_root().await? {
            Some(bytes) => decode_root(&bytes),
            None => self.sign_current(view).await,
        }
    }

    /// The proof that `signed_list` is `handle`'s entry at the newest signed root: waits (up
    /// to the configured wait) for the epoch that publishes it, queueing it if the log has
    /// nothing for `handle`, or if `requeue` (the caller read the directory again after a
    /// [`LogError::Superseded`] and still found this list). Use [`Log::evidence_of`].
    pub async fn evidence(
        &self,
        handle: &str,
        signed_list: &[u8],
        peer: Option<&str>,
        requeue: bool,
    ) -> Result<Evidence, LogError> {
        let wanted = list_value(signed_list).ok_or(LogError::NotAList)?;
        let deadline = Instant::now() + self.inner.settings.wait;
        let mut epochs = self.inner.epoch.subscribe();
        loop {
            epochs.mark_unchanged();
            if let Some(evidence) = self.lookup(handle, &wanted, peer).await? {
                return Ok(evidence);
            }
            let label = AkdLabel(handle.as_bytes().to_vec());
            let held = self.inner.view.states.latest_value(&label).await?;
            let pending = self
                .inner
                .pending
                .lock()
                .expect("pending lock")
                .get(handle)
                .copied();
            match (held, pending) {
                // Published or on its way: wait for its epoch.
                (_, Some(v)) if v == wanted => {}
                (Some(v), _) if v[..] == wanted[..] => {}
                // The log holds another list and nothing is pending: the caller's list is
                // older or newer than the log's; only the directory can say which.
                (Some(_), None) if !requeue => return Err(LogError::Superseded),
                _ => self.queue(handle, wanted),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, epochs.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(LogError::NotPublished),
            }
        }
    }

    /// `handle`'s current list in `directory` and its evidence (`None`: no list). A list the
    /// log holds another value for is read again before it is queued: a fetch that read the
    /// directory before a change never publishes the older list after the newer one.
    pub async fn evidence_of(
        &self,
        directory: &dyn crate::store::Directory,
        handle: &str,
        peer: Option<&str>,
    ) -> Result<Option<(Vec<u8>, Option<Evidence>)>, LogError> {
        let Some(mut signed) = directory.device_list(handle).await? else {
            return Ok(None);
        };
        let mut requeue = false;
        loop {
            match self.evidence(handle, &signed, peer, requeue).await {
                Ok(evidence) => return Ok(Some((signed, Some(evidence)))),
                // Lists are opaque to the broker: bytes that are no device list have no entry.
                Err(LogError::NotAList) => return Ok(Some((signed, None))),
                Err(LogError::Superseded) => {
                    let Some(again) = directory.device_list(handle).await? else {
                        return Ok(None);
                    };
                    requeue = again == signed;
                    signed = again;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn lookup(
        &self,
        handle: &str,
        wanted: &[u8; VALUE_BYTES],
        peer: Option<&str>,
    ) -> Result<Option<Evidence>, LogError> {
        let view = self.view_for(peer);
        let label = AkdLabel(handle.as_bytes().to_vec());
        if view.states.latest_value(&label).await?.as_deref() != Some(&wanted[..]) {
            return Ok(None);
        }
        let (proof, epoch) = view
            .directory
            .lookup(label)
            .await
            .map_err(akd("a lookup"))?;
        let Some(root) = view.root(epoch.0).await? else {
            return Ok(None); // published, not signed yet: the next signal is for it
        };
        if root.root_hash != epoch.1 || proof.value.0 != wanted[..] {
            return Ok(None);
        }
        let proof = rmp_serde::to_vec(&proof).map_err(encoding)?;
        Ok(Some(Evidence { root, proof }))
    }

    /// Signed roots of epochs `from..=to` and the append-only proof from `from` to `to` (as
    /// `peer` is shown them). At most [`MAX_AUDIT_EPOCHS`] epochs: a longer range is cut.
    pub async fn audit(
        &self,
        from: u64,
        to: u64,
        peer: Option<&str>,
    ) -> Result<(Vec<SignedRoot>, Vec<u8>), LogError> {
        let view = self.view_for(peer);
        let newest = self.latest(peer).await?.epoch;
        if from >= to || to > newest {
            return Err(LogError::BadRange);
        }
        let to = to.min(from + MAX_AUDIT_EPOCHS);
        let roots = view
            .store
            .roots(from, to)
            .await?
            .iter()
            .map(|r| decode_root(r))
            .collect::<Result<Vec<_>, _>>()?;
        let proof = view
            .directory
            .audit(from, to)
            .await
            .map_err(akd("an audit proof"))?;
        let proof = rmp_serde::to_vec(&proof).map_err(encoding)?;
        Ok((roots, proof))
    }

    /// The history of `handle`'s entry (its last `versions` values) with its proof, at the
    /// newest signed root: what an account's own devices check.
    pub async fn history(
        &self,
        handle: &str,
        versions: usize,
    ) -> Result<(SignedRoot, Vec<u8>), LogError> {
        let view = &self.inner.view;
        let label = AkdLabel(handle.as_bytes().to_vec());
        // akd's `key_history` reads the tree's epoch once for the root it names and again
        // for each version's proof: an epoch published in between leaves proofs that match
        // no root. Epochs only grow, so a proof whose epoch is still the newest when it is
        // done was built at that epoch throughout; otherwise it is built again.
        for _ in 0..HISTORY_ATTEMPTS {
            let (proof, epoch) = view
                .directory
                .key_history(&label, HistoryParams::MostRecent(versions.max(1)))
                .await
                .map_err(akd("a history proof"))?;
            let now = view
                .directory
                .get_epoch_hash()
                .await
                .map_err(akd("reading the epoch"))?;
            if now.0 != epoch.0 {
                continue;
            }
            let root = match view.root(epoch.0).await? {
                Some(root) => root,
                // Published, not signed yet: the publisher signs it next.
                None => {
                    let mut epochs = self.inner.epoch.subscribe();
                    let signed = epochs.wait_for(|&signed| signed >= epoch.0);
                    match tokio::time::timeout(self.inner.settings.wait, signed).await {
                        Ok(Ok(_)) => {}
                        _ => return Err(LogError::NotPublished),
                    }
                    view.root(epoch.0).await?.ok_or(LogError::NotPublished)?
                }
            };
            return Ok((root, rmp_serde::to_vec(&proof).map_err(encoding)?));
        }
        // Epochs came faster than proofs could be built: the client asks again later.
        Err(LogError::NotPublished)
    }

    /// Publishes what is pending, at most one epoch per interval, until the process ends.
    async fn publisher(self) {
        let mut last = Instant::now()
            .checked_sub(self.inner.settings.epoch_interval)
            .unwrap_or_else(Instant::now);
        let mut backoff = Duration::from_millis(100);
        loop {
            self.inner.wake.notified().await;
            let since = last.elapsed();
            if since < self.inner.settings.epoch_interval {
                tokio::time::sleep(self.inner.settings.epoch_interval - since).await;
            }
            let batch = std::mem::take(&mut *self.inner.pending.lock().expect("pending lock"));
            if batch.is_empty() {
                continue;
            }
            last = Instant::now();
            match self.publish(&batch).await {
                Ok(Some(epoch)) => {
                    metrics::histogram!("sealpost_transparency_publish_seconds")
                        .record(last.elapsed().as_secs_f64());
                    metrics::gauge!("sealpost_transparency_epoch").set(epoch as f64);
                    info!(
                        epoch,
                        updates = batch.len(),
                        "transparency: epoch published"
                    );
                    self.inner.epoch.send_replace(epoch);
                    backoff = Duration::from_millis(100);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, updates = batch.len(), "transparency: publishing failed; retrying");
                    {
                        let mut pending = self.inner.pending.lock().expect("pending lock");
                        for (handle, v) in batch {
                            pending.entry(handle).or_insert(v);
                        }
                    }
                    // The next round signs what akd may have committed before it takes more.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    self.inner.wake.notify_one();
                }
            }
        }
    }

    /// One epoch: the values that differ from what the log holds. `None`: nothing differed.
    async fn publish(
        &self,
        batch: &HashMap<String, [u8; VALUE_BYTES]>,
    ) -> Result<Option<u64>, LogError> {
        // An epoch akd committed but that was not signed (a failed write of its root) is signed
        // before anything else: the roots have no gaps.
        for view in self.views() {
            self.sign_current(view).await?;
        }
        let mut updates = Vec::new();
        for (handle, v) in batch {
            let label = AkdLabel(handle.as_bytes().to_vec());
            if self
                .inner
                .view
                .states
                .latest_value(&label)
                .await?
                .as_deref()
                != Some(&v[..])
            {
                updates.push((label, AkdValue(v.to_vec())));
            }
        }
        if updates.is_empty() {
            return Ok(None);
        }
        let mut epoch = 0;
        for (i, view) in self.views().enumerate() {
            let mut updates = updates.clone();
            if i > 0 {
                // The fork differs from the real log by one entry that changes every epoch.
                let n = self
                    .inner
                    .view
                    .directory
                    .get_epoch_hash()
                    .await
                    .map_err(akd("reading the epoch"))?
                    .0;
                updates.push((
                    AkdLabel(b"equivocation@fork".to_vec()),
                    AkdValue(n.to_be_bytes().to_vec()),
                ));
            }
            let published = view
                .directory
                .publish(updates)
                .await
                .map_err(akd("publishing"))?;
            self.sign_current(view).await?;
            if i == 0 {
                epoch = published.0;
            }
        }
        Ok(Some(epoch))
    }
}

#[cfg(test)]
mod tests;
