//! Blobs in memory, for unit tests and the non-durable benchmark store.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::{Bytes, BytesMut};

use super::{BlobId, BlobInfo, BlobWrite, Blobs, NewBlob, OwnerKey};
use crate::store::{StoreError, StoreFuture, ready};

/// Blobs in memory (see the module docs).
#[derive(Clone, Default)]
pub struct MemoryBlobs {
    blobs: Arc<Mutex<HashMap<BlobId, (BlobInfo, BytesMut)>>>,
}

impl MemoryBlobs {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<BlobId, (BlobInfo, BytesMut)>> {
        self.blobs.lock().expect("blob map lock")
    }
}

impl Blobs for MemoryBlobs {
    fn create(&self, blob: NewBlob) -> StoreFuture<()> {
        let info = BlobInfo {
            owner: blob.owner,
            size: blob.size,
            received: 0,
            expires_ms: blob.expires_ms,
        };
        self.map().insert(blob.id, (info, BytesMut::new()));
        ready(Ok(()))
    }

    fn append(&self, id: BlobId, offset: u64, piece: Bytes) -> StoreFuture<BlobWrite> {
        let mut map = self.map();
        let Some((info, bytes)) = map.get_mut(&id) else {
            return ready(Ok(BlobWrite::Unknown));
        };
        let answer = if offset != info.received {
            BlobWrite::WrongOffset {
                received: info.received,
            }
        } else if offset + piece.len() as u64 > info.size {
            BlobWrite::TooLong
        } else {
            bytes.extend_from_slice(&piece);
            info.received += piece.len() as u64;
            BlobWrite::Stored {
                received: info.received,
            }
        };
        ready(Ok(answer))
    }

    fn info(&self, id: BlobId) -> StoreFuture<Option<BlobInfo>> {
        ready(Ok(self.map().get(&id).map(|(info, _)| *info)))
    }

    fn read(&self, id: BlobId, offset: u64, len: usize) -> StoreFuture<Bytes> {
        let map = self.map();
        let answer = match map.get(&id) {
            Some((info, bytes)) if info.whole() => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let end = start.saturating_add(len).min(bytes.len());
                Ok(Bytes::copy_from_slice(&bytes[start..end]))
            }
            _ => Err(StoreError::NotFound),
        };
        ready(answer)
    }

    fn usage(&self, owner: OwnerKey) -> StoreFuture<u64> {
        let used = self
            .map()
            .values()
            .filter(|(info, _)| info.owner == owner)
            .map(|(info, _)| info.size)
            .sum();
        ready(Ok(used))
    }

    fn expire(&self, now_ms: u64) -> StoreFuture<usize> {
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, (info, _)| info.expires_ms > now_ms);
        ready(Ok(before - map.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::blobs::contract;

    #[tokio::test]
    async fn keeps_the_blob_contract() {
        contract::resumable_upload(&MemoryBlobs::new()).await;
        contract::usage_and_expiry(&MemoryBlobs::new()).await;
    }
}
