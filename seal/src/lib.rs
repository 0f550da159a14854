//! The broker's storage AEAD: XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`) with detached
//! tags, behind two non-generic functions.
//!
//! It is a crate of its own only so that debug builds compile it optimized
//! (`[profile.dev.package.sealpost-seal]` in the workspace `Cargo.toml`): the cipher is generic
//! code, compiled in the crate that names the concrete type, and at the broker's `opt-level` 0
//! it seals about 2 MB/s, which slows a debug broker's large backlogs to a crawl.
//!
//! The workspace builds `poly1305` with its portable backend (`.cargo/config.toml`): the AVX2
//! one, selected at run time, does not inline its intrinsics and made a short record's seal
//! cost 2.2 µs instead of 0.66 µs, a tenth of the broker's CPU per envelope.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use chacha20poly1305::{AeadInOut as _, KeyInit as _, XChaCha20Poly1305, XNonce};

/// Nonce length: 192 bits, so random nonces never repeat in practice.
pub const NONCE_LEN: usize = 24;
/// Tag length.
pub const TAG_LEN: usize = 16;

/// A key, ready to seal and open. No `Debug`; the key schedule is zeroized on drop (the
/// `zeroize` feature of `chacha20poly1305`).
pub struct SealKey(XChaCha20Poly1305);

impl SealKey {
    /// A key from its 32 bytes (the caller wipes its copy).
    pub fn new(key: &[u8; 32]) -> Self {
        SealKey(XChaCha20Poly1305::new(&(*key).into()))
    }

    /// Encrypts `buf` in place; answers the tag.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        self.0
            .encrypt_inout_detached(&XNonce::from(*nonce), aad, buf.into())
            .expect("records are far below the AEAD's length limit")
            .into()
    }

    /// Decrypts `buf` in place if `tag` authenticates it (and `aad`); false otherwise (then
    /// `buf` is unspecified).
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> bool {
        self.0
            .decrypt_inout_detached(&XNonce::from(*nonce), aad, buf.into(), &(*tag).into())
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let key = SealKey::new(&[7; 32]);
        let mut buf = *b"hello, storage";
        let tag = key.seal(&[1; 24], b"aad", &mut buf);
        assert_ne!(&buf, b"hello, storage");
        let mut opened = buf;
        assert!(key.open(&[1; 24], b"aad", &mut opened, &tag));
        assert_eq!(&opened, b"hello, storage");
        let mut other = buf;
        assert!(!key.open(&[1; 24], b"other", &mut other, &tag));
        assert!(!SealKey::new(&[8; 32]).open(&[1; 24], b"aad", &mut buf, &tag));
    }
}
