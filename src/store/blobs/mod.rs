//! Attachment blobs: opaque ciphertext a device uploads in pieces (resumably), that anyone
//! holding its unguessable id may read once it is whole, until it expires.
//!
//! ```text
//! create(id, owner, size) ─▶ append(offset = received, piece) … ─▶ received == size: whole ─▶ read(range)
//!        (durable)                  (each durable before it answers)        (never before)
//! ```
//!
//! Clients encrypt before they upload (a fresh key per attachment, sent inside the end-to-end
//! encrypted message); the store holds bytes it cannot read. It keeps, per blob, its size, the
//! bytes received so far, its expiry and an owner key: a keyed hash of the uploading account
//! (for its quota), never the handle.
//!
//! | backend | where the bytes are |
//! |---|---|
//! | [`files::FileBlobs`] (with sled, the embedded default) | one file per blob in `attachments/` of the data directory, `fsync`ed before each answer |
//! | [`memory::MemoryBlobs`] (unit tests, `--store memory`) | memory |
//! | `nats::NatsBlobs` (scale-out) | chunks on a JetStream stream, records in a KV bucket, shared by the pods |

pub mod files;
pub mod memory;

use bytes::Bytes;

use super::StoreFuture;

/// A blob's id: random, 32 bytes (unguessable: holding it is what allows reading it).
pub type BlobId = [u8; 32];

/// A keyed hash of the account a blob counts against.
pub type OwnerKey = [u8; 32];

/// A blob being started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewBlob {
    /// Its id.
    pub id: BlobId,
    /// Whose quota it counts against.
    pub owner: OwnerKey,
    /// Its length once whole, in bytes (at least 1).
    pub size: u64,
    /// When it is deleted, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// What the store knows of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Whose quota it counts against.
    pub owner: OwnerKey,
    /// Its length once whole.
    pub size: u64,
    /// Bytes received (and durable) so far; the next piece starts here.
    pub received: u64,
    /// When it is deleted, ms since the Unix epoch.
    pub expires_ms: u64,
}

impl BlobInfo {
    /// Whether every byte has arrived: only then may it be read.
    pub fn whole(&self) -> bool {
        self.received == self.size
    }
}

/// The answer to an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobWrite {
    /// Stored and durable: the bytes received now.
    Stored {
        /// Bytes received.
        received: u64,
    },
    /// The piece does not start where the blob ends (a lost answer, a second uploader):
    /// nothing written; the next piece starts at `received`.
    WrongOffset {
        /// Bytes received.
        received: u64,
    },
    /// The piece would make the blob longer than its size: nothing written.
    TooLong,
    /// Another append to this blob is running: nothing written.
    Busy,
    /// No such blob (never made, or expired).
    Unknown,
}

/// Attachment blobs (see the module docs). Writes resolve once durable.
pub trait Blobs: Send + Sync + 'static {
    /// Starts a blob, empty. Its id must be new.
    fn create(&self, blob: NewBlob) -> StoreFuture<()>;
    /// Appends `piece` at `offset`, which must be the bytes received so far.
    fn append(&self, id: BlobId, offset: u64, piece: Bytes) -> StoreFuture<BlobWrite>;
    /// What is known of a blob; `None` if there is no such blob (an expired one is gone once
    /// [`Blobs::expire`] ran; callers check [`BlobInfo::expires_ms`] meanwhile).
    fn info(&self, id: BlobId) -> StoreFuture<Option<BlobInfo>>;
    /// Up to `len` bytes of a whole blob from `offset` (fewer at its end); `NotFound` unless
    /// it is whole.
    fn read(&self, id: BlobId, offset: u64, len: usize) -> StoreFuture<Bytes>;
    /// Bytes of the unexpired blobs counting against `owner` (their sizes, whole or not).
    fn usage(&self, owner: OwnerKey) -> StoreFuture<u64>;
    /// Deletes the blobs expired at `now_ms`; answers how many.
    fn expire(&self, now_ms: u64) -> StoreFuture<usize>;
}

#[doc(hidden)]
pub mod contract {
    //! What every backend of [`Blobs`] must do, run against each.

    use super::*;

    fn blob(id: u8, owner: u8, size: u64) -> NewBlob {
        NewBlob {
            id: [id; 32],
            owner: [owner; 32],
            size,
            expires_ms: 10_000,
        }
    }

    /// Pieces in order make a whole blob; nothing before that is readable.
    pub async fn resumable_upload(b: &dyn Blobs) {
        b.create(blob(1, 7, 10)).await.unwrap();
        assert_eq!(b.info([1; 32]).await.unwrap().unwrap().received, 0);
        let first = b.append([1; 32], 0, Bytes::from_static(b"hello")).await;
        assert_eq!(first.unwrap(), BlobWrite::Stored { received: 5 });
        assert!(
            b.read([1; 32], 0, 5).await.is_err(),
            "half a blob is not readable"
        );
        // A retry of a piece that was stored: told where the blob ends.
        let again = b.append([1; 32], 0, Bytes::from_static(b"hello")).await;
        assert_eq!(again.unwrap(), BlobWrite::WrongOffset { received: 5 });
        let long = b.append([1; 32], 5, Bytes::from_static(b"world!")).await;
        assert_eq!(long.unwrap(), BlobWrite::TooLong);
        let last = b.append([1; 32], 5, Bytes::from_static(b"world")).await;
        assert_eq!(last.unwrap(), BlobWrite::Stored { received: 10 });
        let info = b.info([1; 32]).await.unwrap().unwrap();
        assert!(info.whole());
        assert_eq!(&b.read([1; 32], 0, 100).await.unwrap()[..], b"helloworld");
        assert_eq!(&b.read([1; 32], 3, 4).await.unwrap()[..], b"lowo");
        let unknown = b.append([9; 32], 0, Bytes::from_static(b"x")).await;
        assert_eq!(unknown.unwrap(), BlobWrite::Unknown);
        assert!(b.info([9; 32]).await.unwrap().is_none());
    }

    /// Usage counts unexpired blobs per owner; expiry deletes them.
    pub async fn usage_and_expiry(b: &dyn Blobs) {
        b.create(blob(2, 8, 100)).await.unwrap();
        b.create(NewBlob {
            expires_ms: 20_000,
            ..blob(3, 8, 50)
        })
        .await
        .unwrap();
        b.create(blob(4, 9, 1)).await.unwrap();
        assert_eq!(b.usage([8; 32]).await.unwrap(), 150);
        assert_eq!(b.expire(10_000).await.unwrap(), 2);
        assert!(b.info([2; 32]).await.unwrap().is_none());
        assert_eq!(b.usage([8; 32]).await.unwrap(), 50);
        assert_eq!(b.usage([9; 32]).await.unwrap(), 0);
    }
}
