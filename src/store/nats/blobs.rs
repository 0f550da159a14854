//! Attachment blobs on JetStream, shared by every pod: any pod takes a piece of an upload and
//! any pod serves a download.
//!
//! ```text
//! KV sealpost_blobs   b.<id hex>     → size, received, expiry, owner key (rmp), updated by
//!                                      compare-and-set on its revision
//!                     o.<owner hex>  → [(id, size, expiry)] of that owner's blobs (its quota)
//! SEALPOST_BLOBS      sp.blob.<id hex>.<n>   chunk n: CHUNK bytes (the last may be shorter);
//!                                      a chunk that grows is published again, and the last
//!                                      message of its subject is the chunk
//! ```
//!
//! An append publishes the chunks it fills (each acknowledged by a quorum: durable as the
//! rest of this backend) and only then moves `received` forward with a compare-and-set, so a
//! crash between the two leaves `received` where it was and the uploader sends that piece
//! again. A read takes chunks by direct get of the last message of their subjects. Expiry
//! (the server's sweep) purges a blob's subjects and deletes its records.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, kv, stream};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::store::{
    StoreError, StoreFuture,
    blobs::{BlobId, BlobInfo, BlobWrite, Blobs, NewBlob, OwnerKey},
};

/// The stream of chunks.
const STREAM: &str = "SEALPOST_BLOBS";
/// The bucket of records.
const BUCKET: &str = "sealpost_blobs";
/// Bytes of a chunk: well under NATS's default message limit of 1 MiB.
const CHUNK: usize = 256 * 1024;
/// The version of the records.
const VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
struct Record {
    version: u8,
    #[serde(with = "serde_bytes")]
    owner: [u8; 32],
    size: u64,
    received: u64,
    expires_ms: u64,
}

/// An owner's blobs: (id, size, expiry).
#[derive(Serialize, Deserialize, Default)]
struct Owned(Vec<(serde_bytes::ByteBuf, u64, u64)>);

/// Blobs on JetStream (see the module docs). Clones share the connection.
#[derive(Clone)]
pub struct NatsBlobs {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    records: kv::Store,
    chunks: stream::Stream,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl NatsBlobs {
    /// Creates (or checks) the stream and bucket on `js`.
    pub(super) async fn open(js: jetstream::Context, replicas: usize) -> Result<Self, StoreError> {
        let name = STREAM.to_owned();
        let chunks = js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec!["sp.blob.>".into()],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| io(format!("stream {name}: {e}")))?;
        let records = super::ensure_bucket(
            &js,
            kv::Config {
                bucket: BUCKET.into(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(NatsBlobs {
            inner: Arc::new(Inner {
                js,
                records,
                chunks,
            }),
        })
    }
}

impl Inner {
    async fn record(&self, id: &BlobId) -> Result<Option<(Record, u64)>, StoreError> {
        match self
            .records
            .entry(format!("b.{}", hex(id)))
            .await
            .map_err(io)?
        {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let record: Record = rmp_serde::from_slice(&entry.value)
                    .map_err(|e| StoreError::Corruption(format!("blob record: {e}")))?;
                Ok(Some((record, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn chunk(&self, id: &BlobId, n: u64) -> Result<Bytes, StoreError> {
        let subject = format!("sp.blob.{}.{n}", hex(id));
        match self.chunks.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(m.payload),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(Bytes::new())
            }
            Err(e) => Err(io(format!("read: {e}"))),
        }
    }

    /// Changes an owner's list with compare-and-set, trying again while others change it.
    async fn change_owned(
        &self,
        owner: &OwnerKey,
        change: impl Fn(&mut Owned),
    ) -> Result<(), StoreError> {
        let key = format!("o.{}", hex(owner));
        for _ in 0..16 {
            let (mut owned, revision) = match self.records.entry(&key).await.map_err(io)? {
                Some(e) if e.operation == kv::Operation::Put => (
                    rmp_serde::from_slice(&e.value)
                        .map_err(|e| StoreError::Corruption(format!("owner record: {e}")))?,
                    e.revision,
                ),
                Some(e) => (Owned::default(), e.revision),
                None => (Owned::default(), 0),
            };
            change(&mut owned);
            let bytes: Bytes = rmp_serde::to_vec(&owned).expect("serializes").into();
            if self.records.update(&key, bytes, revision).await.is_ok() {
                return Ok(());
            }
        }
        Err(io("an owner's blob list kept changing"))
    }

    async fn create(&self, blob: NewBlob) -> Result<(), StoreError> {
        let id = blob.id;
        self.change_owned(&blob.owner, |o| {
            o.0.push((
                serde_bytes::ByteBuf::from(id.to_vec()),
                blob.size,
                blob.expires_ms,
            ));
        })
        .await?;
        let record = Record {
            version: VERSION,
            owner: blob.owner,
            size: blob.size,
            received: 0,
            expires_ms: blob.expires_ms,
        };
        self.records
            .create(
                format!("b.{}", hex(&id)),
                rmp_serde::to_vec(&record).expect("serializes").into(),
            )
            .await
            .map_err(io)?;
        Ok(())
    }

    async fn append(&self, id: BlobId, offset: u64, piece: Bytes) -> Result<BlobWrite, StoreError> {
        let Some((mut record, revision)) = self.record(&id).await? else {
            return Ok(BlobWrite::Unknown);
        };
        if offset != record.received {
            return Ok(BlobWrite::WrongOffset {
                received: record.received,
            });
        }
        if offset + piece.len() as u64 > record.size {
            return Ok(BlobWrite::TooLong);
        }
        // The chunk the piece starts in may be partly there: it is published again, whole.
        let first = offset / CHUNK as u64;
        let mut data = BytesMut::new();
        let start = offset % CHUNK as u64;
        if start > 0 {
            let have = self.chunk(&id, first).await?;
            data.extend_from_slice(&have[..usize::try_from(start).unwrap_or(0).min(have.len())]);
        }
        data.extend_from_slice(&piece);
        let mut acks = Vec::new();
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let subject = format!("sp.blob.{}.{}", hex(&id), first + i as u64);
            let ack = self
                .js
                .publish(subject, Bytes::copy_from_slice(chunk))
                .await
                .map_err(io)?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(io)?;
        }
        record.received += piece.len() as u64;
        let bytes: Bytes = rmp_serde::to_vec(&record).expect("serializes").into();
        match self
            .records
            .update(format!("b.{}", hex(&id)), bytes, revision)
            .await
        {
            Ok(_) => Ok(BlobWrite::Stored {
                received: record.received,
            }),
            // Another append to it went first.
            Err(_) => Ok(BlobWrite::Busy),
        }
    }

    async fn read(&self, id: BlobId, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let Some((record, _)) = self.record(&id).await? else {
            return Err(StoreError::NotFound);
        };
        if record.received != record.size {
            return Err(StoreError::NotFound);
        }
        let end = (offset + len as u64).min(record.size);
        let mut out = BytesMut::new();
        let mut at = offset;
        while at < end {
            let n = at / CHUNK as u64;
            let chunk = self.chunk(&id, n).await?;
            let from = usize::try_from(at % CHUNK as u64).unwrap_or(0);
            let to = usize::try_from((end - n * CHUNK as u64).min(CHUNK as u64)).unwrap_or(0);
            if chunk.len() < to {
                return Err(StoreError::Corruption("a blob chunk is missing".into()));
            }
            out.extend_from_slice(&chunk[from..to]);
            at = (n + 1) * CHUNK as u64;
        }
        Ok(out.freeze())
    }

    async fn usage(&self, owner: OwnerKey) -> Result<u64, StoreError> {
        match self
            .records
            .entry(format!("o.{}", hex(&owner)))
            .await
            .map_err(io)?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let owned: Owned = rmp_serde::from_slice(&e.value)
                    .map_err(|e| StoreError::Corruption(format!("owner record: {e}")))?;
                Ok(owned.0.iter().map(|(_, size, _)| size).sum())
            }
            _ => Ok(0),
        }
    }

    async fn expire(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut keys = self.records.keys().await.map_err(io)?;
        let mut owners = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(io)?;
            if let Some(owner) = key.strip_prefix("o.") {
                owners.push(owner.to_owned());
            }
        }
        let mut expired = 0;
        for owner_hex in owners {
            let Some(entry) = self
                .records
                .entry(format!("o.{owner_hex}"))
                .await
                .map_err(io)?
            else {
                continue;
            };
            let Ok(owned) = rmp_serde::from_slice::<Owned>(&entry.value) else {
                continue;
            };
            let due: Vec<Vec<u8>> = owned
                .0
                .iter()
                .filter(|(_, _, expires)| *expires <= now_ms)
                .map(|(id, _, _)| id.to_vec())
                .collect();
            if due.is_empty() {
                continue;
            }
            for id in &due {
                let id_hex = hex(id);
                self.chunks
                    .purge()
                    .filter(format!("sp.blob.{id_hex}.>"))
                    .await
                    .map_err(io)?;
                self.records
                    .purge(format!("b.{id_hex}"))
                    .await
                    .map_err(io)?;
            }
            let Ok(owner) = <[u8; 32]>::try_from(
                (0..32)
                    .filter_map(|i| u8::from_str_radix(owner_hex.get(2 * i..2 * i + 2)?, 16).ok())
                    .collect::<Vec<u8>>(),
            ) else {
                continue;
            };
            self.change_owned(&owner, |o| {
                o.0.retain(|(id, _, _)| !due.contains(&id.to_vec()))
            })
            .await?;
            expired += due.len();
        }
        Ok(expired)
    }
}

impl Blobs for NatsBlobs {
    fn create(&self, blob: NewBlob) -> StoreFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.create(blob).await })
    }

    fn append(&self, id: BlobId, offset: u64, piece: Bytes) -> StoreFuture<BlobWrite> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.append(id, offset, piece).await })
    }

    fn info(&self, id: BlobId) -> StoreFuture<Option<BlobInfo>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            Ok(inner.record(&id).await?.map(|(r, _)| BlobInfo {
                owner: r.owner,
                size: r.size,
                received: r.received,
                expires_ms: r.expires_ms,
            }))
        })
    }

    fn read(&self, id: BlobId, offset: u64, len: usize) -> StoreFuture<Bytes> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.read(id, offset, len).await })
    }

    fn usage(&self, owner: OwnerKey) -> StoreFuture<u64> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.usage(owner).await })
    }

    fn expire(&self, now_ms: u64) -> StoreFuture<usize> {
        let inner = self.inner.clone();
        let expire = async move { inner.expire(now_ms).await };
        Box::pin(async move {
            // A sweep that cannot finish in a while tries again on the next tick.
            tokio::time::timeout(Duration::from_secs(30), expire)
                .await
                .unwrap_or(Ok(0))
        })
    }
}
