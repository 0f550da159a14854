//! Attachments: a file encrypted under a fresh key, chunk by chunk, for the broker's blob
//! store; the key, the ciphertext's digest and the file's name and type go inside the end-to-end
//! encrypted message ([`FileRef`]).
//!
//! The construction is STREAM (Hoang, Reyhanitabar, Rogaway, Vizár 2015; the `aead-stream`
//! crate, big-endian 32-bit counter) over ChaCha20-Poly1305: the file is cut into chunks of
//! [`CHUNK`] bytes, each sealed with its index and whether it is the last in the nonce, so a
//! chunk that was changed, moved, dropped or cut short fails to open, and so does a file cut
//! at a chunk boundary. Each key seals one file only, so the nonce prefix is zero: sealing the
//! same file with the same key again gives the same bytes, which is what lets an interrupted
//! upload resume without keeping the ciphertext.
//!
//! ```text
//! file:   [ chunk 0 (64 KiB) ][ chunk 1 ] … [ last chunk (≤ 64 KiB, may be empty) ]
//! blob:   [ chunk 0 + tag    ][ chunk 1 + tag ] … [ last + tag ]      tag = 16 bytes
//! ```

use aead_stream::{DecryptorBE32, EncryptorBE32, KeyInit as _};
use chacha20poly1305::ChaCha20Poly1305;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use zeroize::Zeroizing;

/// Plaintext bytes of a chunk (all but the last are this long).
pub const CHUNK: usize = 64 * 1024;

/// What sealing adds to each chunk (the Poly1305 tag).
pub const TAG: usize = 16;

/// Ciphertext bytes of a whole chunk.
pub const SEALED_CHUNK: usize = CHUNK + TAG;

/// Why an attachment could not be opened (or sealed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachmentError {
    /// A chunk did not authenticate: it was changed, or the key is not this file's.
    #[error("part {0} of the attachment does not open: it was changed, or the key is wrong")]
    Tampered(u64),
    /// The ciphertext is not as long as the message said.
    #[error("the attachment is not the length its message gives")]
    Length,
    /// The ciphertext's digest is not the one the message gave.
    #[error("the attachment's digest does not match: it was changed in storage or on the way")]
    Digest,
    /// A malformed description of a file.
    #[error("malformed attachment description")]
    Malformed,
}

/// The key of one attachment (32 random bytes). No `Debug`; zeroized on drop.
#[derive(Clone)]
pub struct FileKey(Zeroizing<[u8; 32]>);

impl FileKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        FileKey(key)
    }

    /// A key from its bytes (as a [`FileRef`] carries it).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let key: [u8; 32] = bytes.try_into().ok()?;
        Some(FileKey(Zeroizing::new(key)))
    }

    /// The key's bytes (not zeroized: the caller's copy is its own).
    pub fn to_bytes(&self) -> [u8; 32] {
        *self.0
    }

    fn aead(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new((&*self.0).into())
    }
}

/// The nonce prefix of every attachment: zero (each key seals one file).
const NONCE_PREFIX: [u8; 7] = [0; 7];

/// The ciphertext length of a file of `plain` bytes.
pub fn sealed_size(plain: u64) -> u64 {
    let chunks = plain.div_ceil(CHUNK as u64).max(1);
    plain + chunks * TAG as u64
}

/// The plaintext length of `sealed` ciphertext bytes, if that is a length sealing can give.
pub fn plain_size(sealed: u64) -> Option<u64> {
    let chunks = sealed.div_ceil(SEALED_CHUNK as u64).max(1);
    let plain = sealed.checked_sub(chunks * TAG as u64)?;
    (sealed_size(plain) == sealed).then_some(plain)
}

/// Seals a file of a known length, chunk by chunk.
pub struct FileSealer {
    stream: Option<EncryptorBE32<ChaCha20Poly1305>>,
    /// Plaintext bytes still to come.
    left: u64,
}

impl FileSealer {
    /// A sealer for a file of `size` bytes.
    pub fn new(key: &FileKey, size: u64) -> Self {
        let stream = EncryptorBE32::from_aead(key.aead(), (&NONCE_PREFIX).into());
        FileSealer {
            stream: Some(stream),
            left: size,
        }
    }

    /// Seals the next chunk: [`CHUNK`] bytes, or what is left of the file for the last one.
    /// `None` once the file is sealed, or for a chunk of the wrong length.
    pub fn seal(&mut self, chunk: &[u8]) -> Option<Vec<u8>> {
        let last = self.left <= CHUNK as u64;
        let want = if last { self.left } else { CHUNK as u64 };
        if chunk.len() as u64 != want {
            return None;
        }
        self.left -= want;
        if last {
            self.stream.take()?.encrypt_last(chunk).ok()
        } else {
            self.stream.as_mut()?.encrypt_next(chunk).ok()
        }
    }
}

/// Opens a sealed file chunk by chunk, checking each.
pub struct FileOpener {
    stream: Option<DecryptorBE32<ChaCha20Poly1305>>,
    /// Ciphertext bytes still to come.
    left: u64,
    /// The index of the next chunk.
    index: u64,
}

impl FileOpener {
    /// An opener for `sealed` ciphertext bytes.
    pub fn new(key: &FileKey, sealed: u64) -> Result<Self, AttachmentError> {
        plain_size(sealed).ok_or(AttachmentError::Length)?;
        let stream = DecryptorBE32::from_aead(key.aead(), (&NONCE_PREFIX).into());
        Ok(FileOpener {
            stream: Some(stream),
            left: sealed,
            index: 0,
        })
    }

    /// Opens the next sealed chunk: [`SEALED_CHUNK`] bytes, or what is left for the last one.
    pub fn open(&mut self, chunk: &[u8]) -> Result<Vec<u8>, AttachmentError> {
        let last = self.left <= SEALED_CHUNK as u64;
        let want = if last { self.left } else { SEALED_CHUNK as u64 };
        if chunk.len() as u64 != want {
            return Err(AttachmentError::Length);
        }
        let index = self.index;
        self.left -= want;
        self.index += 1;
        let opened = if last {
            self.stream
                .take()
                .ok_or(AttachmentError::Length)?
                .decrypt_last(chunk)
        } else {
            self.stream
                .as_mut()
                .ok_or(AttachmentError::Length)?
                .decrypt_next(chunk)
        };
        opened.map_err(|_| AttachmentError::Tampered(index))
    }

    /// Whether every chunk has been opened.
    pub fn done(&self) -> bool {
        self.stream.is_none()
    }
}

/// What a message tells its recipient about an attachment: where it is, how to open it and
/// check it, and what it is. Travels only inside end-to-end encryption.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// The blob's id at the sender's broker.
    pub id: ByteBuf,
    /// The file's key.
    pub key: ByteBuf,
    /// The blob's length (ciphertext), bytes.
    pub size: u64,
    /// BLAKE3 of the blob (ciphertext).
    pub digest: ByteBuf,
    /// The file's name, as the sender had it (no path).
    pub name: String,
    /// Its media type (`image/png`, `application/octet-stream`, …).
    pub media_type: String,
    /// The domain whose broker holds it (the sender's).
    pub domain: String,
    /// A small preview of a picture (JPEG, made and sent by the sender's client), if any.
    #[serde(default)]
    pub thumbnail: Option<ByteBuf>,
}

impl std::fmt::Debug for FileRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key opens the file and the name may say what it is: neither is printed.
        f.debug_struct("FileRef")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FileRef {
    /// The file's key.
    pub fn file_key(&self) -> Result<FileKey, AttachmentError> {
        FileKey::from_bytes(&self.key).ok_or(AttachmentError::Malformed)
    }

    /// The file's length once opened.
    pub fn plain_size(&self) -> Result<u64, AttachmentError> {
        plain_size(self.size).ok_or(AttachmentError::Length)
    }

    /// How the file shows in a conversation's history: its name and length (the file itself
    /// is wherever the application saved it).
    pub fn summary(&self) -> String {
        let bytes = self.plain_size().unwrap_or(self.size);
        format!("[file] {} ({bytes} bytes)", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal_all(key: &FileKey, file: &[u8]) -> Vec<u8> {
        let mut sealer = FileSealer::new(key, file.len() as u64);
        let mut out = Vec::new();
        let mut chunks = file.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            out.extend(sealer.seal(&[]).unwrap());
        }
        for chunk in chunks {
            out.extend(sealer.seal(chunk).unwrap());
        }
        assert!(sealer.seal(&[]).is_none(), "sealed once");
        out
    }

    fn open_all(key: &FileKey, sealed: &[u8]) -> Result<Vec<u8>, AttachmentError> {
        let mut opener = FileOpener::new(key, sealed.len() as u64)?;
        let mut out = Vec::new();
        for chunk in sealed.chunks(SEALED_CHUNK) {
            out.extend(opener.open(chunk)?);
        }
        if sealed.is_empty() {
            return Err(AttachmentError::Length);
        }
        assert!(opener.done());
        Ok(out)
    }

    #[test]
    fn files_of_every_shape_round_trip_and_the_sizes_agree() {
        let key = FileKey::generate();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7] {
            let file: Vec<u8> = (0..len).map(|i| (i % 251).to_le_bytes()[0]).collect();
            let sealed = seal_all(&key, &file);
            assert_eq!(sealed.len() as u64, sealed_size(len as u64), "{len}");
            assert_eq!(plain_size(sealed.len() as u64), Some(len as u64));
            assert_eq!(open_all(&key, &sealed).unwrap(), file);
            // Deterministic under one key: an interrupted upload resumes from the bytes.
            assert_eq!(seal_all(&key, &file), sealed);
        }
    }

    #[test]
    fn a_changed_moved_or_cut_chunk_and_a_wrong_key_are_refused() {
        let key = FileKey::generate();
        let file = vec![7u8; 3 * CHUNK];
        let sealed = seal_all(&key, &file);
        let mut changed = sealed.clone();
        changed[SEALED_CHUNK + 5] ^= 1;
        assert_eq!(open_all(&key, &changed), Err(AttachmentError::Tampered(1)));
        assert_eq!(
            open_all(&FileKey::generate(), &sealed),
            Err(AttachmentError::Tampered(0))
        );
        // Two chunks swapped.
        let mut swapped = sealed[SEALED_CHUNK..2 * SEALED_CHUNK].to_vec();
        swapped.extend(&sealed[..SEALED_CHUNK]);
        swapped.extend(&sealed[2 * SEALED_CHUNK..]);
        assert_eq!(open_all(&key, &swapped), Err(AttachmentError::Tampered(0)));
        // Cut after two whole chunks: the second is not sealed as the last.
        let cut = &sealed[..2 * SEALED_CHUNK];
        assert_eq!(open_all(&key, cut), Err(AttachmentError::Tampered(1)));
        assert_eq!(plain_size(5), None, "shorter than a tag");
    }
}
