//! Blobs as files in the data directory: the embedded default, next to sled.
//!
//! ```text
//! attachments/<id hex>.meta   its size, expiry and owner key (rmp, versioned), written whole
//!                             (tmp + fsync + rename + directory fsync) before `create` answers
//! attachments/<id hex>.part   the bytes received so far; each append is fsync'ed before it
//!                             answers, so what it reports received survives a crash
//! attachments/<id hex>.blob   the same file once whole (renamed, directory fsync'ed): only
//!                             these are read
//! ```
//!
//! At open the directory is read into an index in memory (id → size, received, expiry,
//! owner): the bytes received are the data file's length, which after a crash may include a
//! piece that was written but never acknowledged (its uploader asks where the blob ends and
//! goes on from there). Files without a `.meta` (a crash mid-create or mid-delete) are
//! removed. Deleting removes the `.meta` first.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{BlobId, BlobInfo, BlobWrite, Blobs, NewBlob, OwnerKey};
use crate::store::{StoreError, StoreFuture, ready};

/// The version of `.meta` records.
const META_VERSION: u8 = 1;

/// A blob's `.meta` file.
#[derive(Serialize, Deserialize)]
struct Meta {
    version: u8,
    #[serde(with = "serde_bytes")]
    owner: [u8; 32],
    size: u64,
    expires_ms: u64,
}

/// What the index keeps of a blob.
struct Entry {
    info: BlobInfo,
    /// An append is writing to it.
    busy: bool,
}

/// Blobs as files (see the module docs).
#[derive(Clone)]
pub struct FileBlobs {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    index: Mutex<HashMap<BlobId, Entry>>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl FileBlobs {
    /// Opens (or creates) the blobs under `dir`, reading what is there.
    pub fn open(dir: &Path) -> Result<FileBlobs, StoreError> {
        fs::create_dir_all(dir).map_err(io)?;
        let mut index = HashMap::new();
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            names.push(entry.map_err(io)?.file_name());
        }
        for name in &names {
            let name = name.to_string_lossy();
            let Some(hex) = name.strip_suffix(".meta") else {
                continue;
            };
            let Some(id) = parse_id(hex) else { continue };
            let meta: Meta = rmp_serde::from_slice(&fs::read(dir.join(&*name)).map_err(io)?)
                .map_err(|e| StoreError::Corruption(format!("blob record: {e}")))?;
            if meta.version != META_VERSION {
                return Err(StoreError::Corruption(format!(
                    "unknown blob record version {}",
                    meta.version
                )));
            }
            let whole = dir.join(format!("{hex}.blob"));
            let received = if whole.exists() {
                meta.size
            } else {
                let part = dir.join(format!("{hex}.part"));
                match fs::metadata(&part) {
                    Ok(m) => m.len().min(meta.size),
                    Err(_) => {
                        File::create(&part).map_err(io)?;
                        0
                    }
                }
            };
            let info = BlobInfo {
                owner: meta.owner,
                size: meta.size,
                received,
                expires_ms: meta.expires_ms,
            };
            index.insert(id, Entry { info, busy: false });
        }
        // What no record names: a crash between writing a file and its record, or between
        // deleting a record and its file.
        for name in &names {
            let name = name.to_string_lossy();
            let stem = name.split('.').next().unwrap_or_default();
            let known = parse_id(stem).is_some_and(|id| index.contains_key(&id));
            if (!known || name.ends_with(".tmp"))
                && let Err(e) = fs::remove_file(dir.join(&*name))
            {
                warn!(error = %e, "removing a stray attachment file failed");
            }
        }
        Ok(FileBlobs {
            shared: Arc::new(Shared {
                dir: dir.to_owned(),
                index: Mutex::new(index),
            }),
        })
    }
}

impl Shared {
    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<BlobId, Entry>> {
        self.index.lock().expect("blob index lock")
    }

    fn path(&self, id: &BlobId, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", hex(id)))
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)
    }

    /// Writes the record and the empty data file, durably.
    fn create(&self, blob: &NewBlob) -> Result<(), StoreError> {
        let meta = Meta {
            version: META_VERSION,
            owner: blob.owner,
            size: blob.size,
            expires_ms: blob.expires_ms,
        };
        let bytes = rmp_serde::to_vec(&meta).expect("a blob record always serializes");
        let tmp = self.path(&blob.id, "meta.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        File::create(self.path(&blob.id, "part")).map_err(io)?;
        fs::rename(&tmp, self.path(&blob.id, "meta")).map_err(io)?;
        self.sync_dir()
    }

    /// Appends `piece` to the data file, durably; the blob's length after it.
    fn append(&self, id: &BlobId, piece: &[u8], whole_at: u64) -> Result<u64, StoreError> {
        let part = self.path(id, "part");
        let mut f = OpenOptions::new().append(true).open(&part).map_err(io)?;
        let written = f.write_all(piece).and_then(|()| f.sync_data());
        let received = f.metadata().map_err(io)?.len();
        written.map_err(io)?;
        if received == whole_at {
            fs::rename(&part, self.path(id, "blob")).map_err(io)?;
            self.sync_dir()?;
        }
        Ok(received)
    }

    fn delete(&self, id: &BlobId) {
        for ext in ["meta", "part", "blob"] {
            match fs::remove_file(self.path(id, ext)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    warn!(error = %e, "deleting an attachment file failed");
                }
                _ => {}
            }
        }
    }
}

/// Runs blocking file work off the async threads.
fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> StoreFuture<T> {
    Box::pin(async move {
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| Err(io(e)))
    })
}

impl Blobs for FileBlobs {
    fn create(&self, blob: NewBlob) -> StoreFuture<()> {
        let shared = self.shared.clone();
        blocking(move || {
            shared.create(&blob)?;
            let info = BlobInfo {
                owner: blob.owner,
                size: blob.size,
                received: 0,
                expires_ms: blob.expires_ms,
            };
            shared.index().insert(blob.id, Entry { info, busy: false });
            Ok(())
        })
    }

    fn append(&self, id: BlobId, offset: u64, piece: Bytes) -> StoreFuture<BlobWrite> {
        let size = {
            let mut index = self.shared.index();
            let Some(entry) = index.get_mut(&id) else {
                return ready(Ok(BlobWrite::Unknown));
            };
            let info = entry.info;
            if entry.busy {
                return ready(Ok(BlobWrite::Busy));
            }
            if offset != info.received {
                return ready(Ok(BlobWrite::WrongOffset {
                    received: info.received,
                }));
            }
            if offset + piece.len() as u64 > info.size {
                return ready(Ok(BlobWrite::TooLong));
            }
            entry.busy = true;
            info.size
        };
        let shared = self.shared.clone();
        blocking(move || {
            let appended = shared.append(&id, &piece, size);
            let mut index = shared.index();
            let entry = index.get_mut(&id).expect("a busy blob is not expired");
            entry.busy = false;
            // After a failed write the file may hold part of the piece: its length is what
            // was received.
            let received = match appended {
                Ok(received) => received,
                Err(e) => {
                    if let Ok(m) = fs::metadata(shared.path(&id, "part")) {
                        entry.info.received = m.len().min(size);
                    }
                    return Err(e);
                }
            };
            entry.info.received = received;
            Ok(BlobWrite::Stored { received })
        })
    }

    fn info(&self, id: BlobId) -> StoreFuture<Option<BlobInfo>> {
        ready(Ok(self.shared.index().get(&id).map(|e| e.info)))
    }

    fn read(&self, id: BlobId, offset: u64, len: usize) -> StoreFuture<Bytes> {
        let size = match self.shared.index().get(&id) {
            Some(entry) if entry.info.whole() => entry.info.size,
            _ => return ready(Err(StoreError::NotFound)),
        };
        let shared = self.shared.clone();
        blocking(move || {
            let len = usize::try_from(size.saturating_sub(offset))
                .unwrap_or(usize::MAX)
                .min(len);
            let mut buf = vec![0; len];
            let f = File::open(shared.path(&id, "blob")).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StoreError::NotFound,
                _ => io(e),
            })?;
            f.read_exact_at(&mut buf, offset).map_err(io)?;
            Ok(Bytes::from(buf))
        })
    }

    fn usage(&self, owner: OwnerKey) -> StoreFuture<u64> {
        let used = self
            .shared
            .index()
            .values()
            .filter(|e| e.info.owner == owner)
            .map(|e| e.info.size)
            .sum();
        ready(Ok(used))
    }

    fn expire(&self, now_ms: u64) -> StoreFuture<usize> {
        let due: Vec<BlobId> = {
            let mut index = self.shared.index();
            let due: Vec<BlobId> = index
                .iter()
                .filter(|(_, e)| e.info.expires_ms <= now_ms && !e.busy)
                .map(|(id, _)| *id)
                .collect();
            for id in &due {
                index.remove(id);
            }
            due
        };
        if due.is_empty() {
            return ready(Ok(0));
        }
        let shared = self.shared.clone();
        blocking(move || {
            for id in &due {
                shared.delete(id);
            }
            Ok(due.len())
        })
    }
}

fn hex(id: &BlobId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_id(hex: &str) -> Option<BlobId> {
    if hex.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::blobs::contract;

    #[tokio::test]
    async fn keeps_the_blob_contract() {
        let dir = tempfile::tempdir().unwrap();
        contract::resumable_upload(&FileBlobs::open(&dir.path().join("a")).unwrap()).await;
        contract::usage_and_expiry(&FileBlobs::open(&dir.path().join("b")).unwrap()).await;
    }

    #[tokio::test]
    async fn what_was_received_survives_reopening_and_strays_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FileBlobs::open(dir.path()).unwrap();
        let blob = NewBlob {
            id: [5; 32],
            owner: [1; 32],
            size: 6,
            expires_ms: u64::MAX,
        };
        blobs.create(blob).await.unwrap();
        let stored = blobs.append([5; 32], 0, Bytes::from_static(b"abc")).await;
        assert_eq!(stored.unwrap(), BlobWrite::Stored { received: 3 });
        fs::write(dir.path().join(format!("{}.part", hex(&[6; 32]))), b"x").unwrap();
        drop(blobs);

        let blobs = FileBlobs::open(dir.path()).unwrap();
        assert_eq!(blobs.info([5; 32]).await.unwrap().unwrap().received, 3);
        assert!(
            !dir.path().join(format!("{}.part", hex(&[6; 32]))).exists(),
            "a data file without a record is removed"
        );
        let rest = blobs.append([5; 32], 3, Bytes::from_static(b"def")).await;
        assert_eq!(rest.unwrap(), BlobWrite::Stored { received: 6 });
        drop(blobs);
        let blobs = FileBlobs::open(dir.path()).unwrap();
        assert_eq!(&blobs.read([5; 32], 0, 6).await.unwrap()[..], b"abcdef");
        assert_eq!(blobs.expire(u64::MAX).await.unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "no file left");
    }

    #[test]
    fn ids_round_trip_through_file_names() {
        let id = [0xab; 32];
        assert_eq!(parse_id(&hex(&id)), Some(id));
        assert_eq!(parse_id("zz"), None);
    }
}
