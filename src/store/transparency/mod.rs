//! The key-transparency log's storage: akd's records (tree nodes, the azks, each handle's value
//! states), the roots the log signed, and what auditing learned of other domains' logs.
//!
//! The key-transparency log (the top-level `transparency` module) is the only user. Records
//! are opaque bytes here: akd's records encoded by the log, and the signed roots and
//! co-signatures of `sealpost_proto::transparency`.
//!
//! | backend | where |
//! |---|---|
//! | [`sled::SledTransparency`] (the embedded default) | its own sled database in `transparency/` of the data directory, flushed before each write answers |
//! | [`memory::MemoryTransparency`] (unit tests, `--store memory`) | memory |
//!
//! The NATS JetStream backend has no log yet: a scale-out deployment runs without key
//! transparency, and its clients say so (README, "Key transparency").

pub mod memory;
pub mod sled;

use super::StoreFuture;

/// One durable write of the log: akd records, and value states by handle and epoch.
#[derive(Debug, Default)]
pub struct KtBatch {
    /// akd records (tree nodes, the azks) by akd's binary id.
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
    /// Value states: (label, epoch, record).
    pub states: Vec<(Vec<u8>, u64, Vec<u8>)>,
}

/// The log's storage (see the module docs). Every write resolves once durable.
pub trait TransparencyStore: Send + Sync + 'static {
    /// Writes a batch atomically.
    fn write(&self, batch: KtBatch) -> StoreFuture<()>;
    /// akd records by id; `None` where there is none.
    fn records(&self, ids: Vec<Vec<u8>>) -> StoreFuture<Vec<Option<Vec<u8>>>>;
    /// A handle's value states, in epoch order.
    fn states(&self, label: Vec<u8>) -> StoreFuture<Vec<Vec<u8>>>;
    /// Every record and state (akd's `batch_get_all_direct`, used only on small logs in tests).
    fn everything(&self) -> StoreFuture<Vec<Vec<u8>>>;
    /// Keeps the signed root of `epoch`.
    fn put_root(&self, epoch: u64, root: Vec<u8>) -> StoreFuture<()>;
    /// Signed roots with `from <= epoch <= to`, in order.
    fn roots(&self, from: u64, to: u64) -> StoreFuture<Vec<Vec<u8>>>;
    /// The newest signed root.
    fn latest_root(&self) -> StoreFuture<Option<Vec<u8>>>;
    /// Keeps a co-signature of `domain`'s root at `epoch` by `auditor` (one per auditor and
    /// epoch: a second one replaces the first).
    fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        auditor: &str,
        cosignature: Vec<u8>,
    ) -> StoreFuture<()>;
    /// The co-signatures of `domain`'s root at `epoch`.
    fn cosignatures(&self, domain: &str, epoch: u64) -> StoreFuture<Vec<Vec<u8>>>;
    /// Drops co-signatures of epochs before `epoch` (all domains).
    fn prune_cosignatures(&self, domain: &str, before_epoch: u64) -> StoreFuture<()>;
    /// The last root of `domain`'s log this broker verified as an auditor.
    fn audited(&self, domain: &str) -> StoreFuture<Option<Vec<u8>>>;
    /// Records it.
    fn set_audited(&self, domain: &str, root: Vec<u8>) -> StoreFuture<()>;
}

/// `u16-BE length ‖ bytes`: a prefix that no longer or shorter name can share.
pub(crate) fn prefixed(name: &[u8]) -> Vec<u8> {
    let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let mut key = Vec::with_capacity(2 + name.len() + 8);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(&name[..usize::from(len)]);
    key
}

/// `prefixed(name) ‖ u64-BE epoch`.
pub(crate) fn name_epoch(name: &[u8], epoch: u64) -> Vec<u8> {
    let mut key = prefixed(name);
    key.extend_from_slice(&epoch.to_be_bytes());
    key
}

#[cfg(test)]
pub(crate) mod contract {
    //! What every backend must do, run against each.

    use super::*;

    pub(crate) async fn holds_what_it_was_given(store: &dyn TransparencyStore) {
        store
            .write(KtBatch {
                records: vec![(b"n1".to_vec(), b"one".to_vec())],
                states: vec![
                    (b"bob".to_vec(), 2, b"b2".to_vec()),
                    (b"bob".to_vec(), 1, b"b1".to_vec()),
                    (b"bo".to_vec(), 3, b"x".to_vec()),
                ],
            })
            .await
            .unwrap();
        let got = store
            .records(vec![b"n1".to_vec(), b"n2".to_vec()])
            .await
            .unwrap();
        assert_eq!(got, vec![Some(b"one".to_vec()), None]);
        assert_eq!(
            store.states(b"bob".to_vec()).await.unwrap(),
            vec![b"b1".to_vec(), b"b2".to_vec()]
        );
        assert_eq!(store.everything().await.unwrap().len(), 4);
        assert_eq!(store.latest_root().await.unwrap(), None);
        for epoch in 1..=3u8 {
            store.put_root(u64::from(epoch), vec![epoch]).await.unwrap();
        }
        assert_eq!(store.roots(2, 9).await.unwrap(), vec![vec![2], vec![3]]);
        assert_eq!(store.latest_root().await.unwrap(), Some(vec![3]));
        store
            .put_cosignature("b.example", 3, "c.example", vec![1])
            .await
            .unwrap();
        store
            .put_cosignature("b.example", 3, "a.example", vec![2])
            .await
            .unwrap();
        store
            .put_cosignature("b.example", 4, "a.example", vec![3])
            .await
            .unwrap();
        assert_eq!(store.cosignatures("b.example", 3).await.unwrap().len(), 2);
        store.prune_cosignatures("b.example", 4).await.unwrap();
        assert!(store.cosignatures("b.example", 3).await.unwrap().is_empty());
        assert_eq!(
            store.cosignatures("b.example", 4).await.unwrap(),
            vec![vec![3]]
        );
        assert_eq!(store.audited("b.example").await.unwrap(), None);
        store.set_audited("b.example", vec![5]).await.unwrap();
        assert_eq!(store.audited("b.example").await.unwrap(), Some(vec![5]));
    }
}
