//! The server's long-term federation key: a static X25519 key pair, generated on first start
//! in the data directory (`federation.key`, mode 0600) and published at
//! `/.well-known/sealpost/server`. It authenticates this broker's links (Noise `KK`); it opens
//! no envelope.

use std::{io::Write, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD};
use sealpost_proto::federation::NOISE_PATTERN;
use zeroize::Zeroizing;

/// File name of the key pair in the data directory: 32 private bytes then 32 public bytes.
pub const KEY_FILE: &str = "federation.key";

/// This broker's static X25519 key pair. No `Debug`, no `Clone`: the private half stays here
/// and is zeroized on drop.
pub struct ServerKey {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl ServerKey {
    /// Loads `dir/federation.key`, creating it if absent.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                Self::from_file_bytes(&bytes).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "federation.key is not 64 bytes",
                    )
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)?;
                let key = Self::generate()?;
                let mut bytes = Zeroizing::new(Vec::with_capacity(64));
                bytes.extend_from_slice(key.private.as_ref());
                bytes.extend_from_slice(&key.public);
                let tmp = dir.join("federation.key.tmp");
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(dir)?.sync_all()?;
                Ok(key)
            }
            Err(e) => Err(e),
        }
    }

    /// A fresh key pair.
    pub fn generate() -> std::io::Result<Self> {
        let params = NOISE_PATTERN
            .parse()
            .map_err(|_| std::io::Error::other("unsupported noise pattern"))?;
        let pair = snow::Builder::new(params)
            .generate_keypair()
            .map_err(|e| std::io::Error::other(format!("key generation failed: {e}")))?;
        let private = Zeroizing::new(pair.private);
        let mut bytes = Zeroizing::new([0u8; 64]);
        bytes[..32].copy_from_slice(private.get(..32).unwrap_or(&[0; 32]));
        bytes[32..].copy_from_slice(pair.public.get(..32).unwrap_or(&[0; 32]));
        Self::from_file_bytes(bytes.as_ref())
            .ok_or_else(|| std::io::Error::other("generated key has the wrong size"))
    }

    fn from_file_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 64 {
            return None;
        }
        let mut private = Zeroizing::new([0u8; 32]);
        private.copy_from_slice(&bytes[..32]);
        let public: [u8; 32] = bytes[32..].try_into().ok()?;
        Some(ServerKey { private, public })
    }

    /// The public key.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// The public key as published (standard base64).
    pub fn public_b64(&self) -> String {
        STANDARD.encode(self.public)
    }

    /// The private key, for the Noise handshake only.
    pub(crate) fn private(&self) -> &[u8; 32] {
        &self.private
    }
}

/// Parses a published or pinned public key: base64 (standard or url-safe) of 32 bytes.
pub fn parse_public_key(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let bytes = STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
        .ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = ServerKey::load_or_create(dir.path()).unwrap();
        let b = ServerKey::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        assert_eq!(parse_public_key(&a.public_b64()), Some(*a.public()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
