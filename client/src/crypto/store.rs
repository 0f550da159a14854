//! Client state persisted across runs, encrypted under a local key and written crash-safely.
//!
//! # File layout
//!
//! ```text
//! +------------+-----------+-------------+------------------------------------------+
//! | "SPCS" [4] | u8 format | nonce [12]  | ChaCha20Poly1305(StoredState) + tag [16] |
//! |   magic    |   = 1     | random      |   AAD = magic ‖ format                   |
//! +------------+-----------+-------------+------------------------------------------+
//! ```
//!
//! The plaintext is `StoredState`, MessagePack with structs as positional arrays: user,
//! device id, master key seed, the vodozemac `AccountPickle`, the seal key, every Olm
//! `SessionPickle` with its peer and peer identity key, the contact pins, and (appended later,
//! absent in older files) the SDK's own opaque record ([`ClientState::app_data`]). vodozemac's
//! pickles are serde structs, stored as-is inside our encrypted record (we do not use
//! vodozemac's own pickle encryption on top). Live objects are converted to and from this
//! record; they are never serialized directly.
//!
//! A fresh random nonce is drawn for every write. With 96-bit random nonces the chance of a
//! repeat stays below 2⁻³² for up to 2³² writes under one key; a device writes far fewer.
//!
//! # Crash safety
//!
//! [`ClientState::save`] writes `.<name>.tmp` beside the target, fsyncs it, renames it over
//! the target and fsyncs the directory. A crash at any point leaves either the old or the new
//! complete file; a leftover temp file is ignored by [`ClientState::load`] and replaced by
//! the next save. One process at a time may own a state file (the SDK holds a lock).
//!
//! # Secrets in memory
//!
//! The plaintext record is built in a buffer that wipes itself, including the copies left
//! behind when it grows, and is decrypted into a wiping buffer. No type here has `Debug`.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use chacha20poly1305::{AeadInOut as _, ChaCha20Poly1305, Key, KeyInit as _, Nonce, Tag};
use rand::{RngCore as _, rngs::OsRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vodozemac::{
    Curve25519PublicKey,
    olm::{Account, AccountPickle, Session, SessionPickle},
};
use zeroize::Zeroizing;

use super::{
    device_list::SeenDeviceList,
    identity::{DeviceKeys, MasterKey, SealSecretKey},
    pins::{Pin, Pins},
    session::{PeerSession, Sessions},
};

const MAGIC: &[u8; 4] = b"SPCS";
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + 1 + NONCE_LEN;

/// Why state or a key file could not be read or written. `Display` is safe to log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file system refused (permissions, disk full, …).
    #[error("state file I/O: {0}")]
    Io(#[from] io::Error),
    /// The file does not start with the state file magic: not a Sealpost state file.
    #[error("not a Sealpost state file")]
    NotAStateFile,
    /// The state file is from a newer (or unknown) format.
    #[error("unsupported state file format {0}")]
    UnsupportedFormat(u8),
    /// The file is shorter than its header and tag.
    #[error("state file truncated")]
    Truncated,
    /// Authentication failed: the local key is wrong, or the file was altered or corrupted.
    #[error("state file does not decrypt (wrong local key, or the file was altered)")]
    Decryption,
    /// It decrypted but does not decode: written by an incompatible build.
    #[error("state file contents are malformed")]
    Malformed,
    /// A key file is not exactly 32 bytes.
    #[error("local key file must hold exactly 32 bytes, found {0}")]
    BadKeyFile(u64),
}

/// The 32-byte key that encrypts the state file. No `Debug`; wiped on drop.
pub struct LocalKey(Zeroizing<[u8; 32]>);

impl LocalKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(key.as_mut());
        Self(key)
    }

    /// A key the caller already holds (e.g. from the OS keychain).
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Zeroizing::new(*bytes))
    }

    /// Reads a key file: exactly 32 raw bytes.
    pub fn read_file(path: &Path) -> Result<Self, StoreError> {
        let bytes = Zeroizing::new(fs::read(path)?);
        let key: &[u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::BadKeyFile(u64::try_from(bytes.len()).unwrap_or(u64::MAX)))?;
        Ok(Self::from_bytes(key))
    }

    /// Creates a key file with a new random key (owner-only permissions on Unix), durably and
    /// atomically: the key is written and fsynced under a temp name, then hard-linked into
    /// place, which fails if `path` exists — an existing key is never overwritten, and a crash
    /// never leaves a partial key file.
    pub fn create_file(path: &Path) -> Result<Self, StoreError> {
        let key = Self::generate();
        let temp = write_temp(path, key.0.as_ref())?;
        let linked = fs::hard_link(&temp, path);
        fs::remove_file(&temp)?;
        linked?;
        sync_parent(path)?;
        Ok(key)
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        let mut key = Key::from(*self.0);
        let cipher = ChaCha20Poly1305::new(&key);
        zeroize::Zeroize::zeroize(key.as_mut_slice());
        cipher
    }
}

/// Everything a device must remember between runs. No `Debug`.
///
/// The device's own address (handle and device id) lives in [`Sessions`], which writes it
/// into every Olm plaintext; [`ClientState::user`] and [`ClientState::device_id`] read it.
pub struct ClientState {
    /// The account's master signing key.
    pub master_key: MasterKey,
    /// This device's Olm account and seal key.
    pub device: DeviceKeys,
    /// Olm sessions with peer devices.
    pub sessions: Sessions,
    /// Contacts' pinned master keys and last accepted device lists.
    pub pins: Pins,
    /// The application's own record (the SDK keeps credentials, contacts' delivery tokens,
    /// recently seen envelope ids and conversations here), opaque to this module. It is saved
    /// in the same file, so it is always consistent with the ratchets it was saved with.
    pub app_data: Zeroizing<Vec<u8>>,
}

impl ClientState {
    /// A fresh state for device `device_id` (as the broker assigned it) of account `user`,
    /// with no sessions and no pins.
    pub fn new(user: String, device_id: u32, master_key: MasterKey, device: DeviceKeys) -> Self {
        Self {
            master_key,
            device,
            sessions: Sessions::new(user, device_id),
            pins: Pins::new(),
            app_data: Zeroizing::new(Vec::new()),
        }
    }

    /// This account's handle.
    pub fn user(&self) -> &str {
        self.sessions.own_user()
    }

    /// This device's id.
    pub fn device_id(&self) -> u32 {
        self.sessions.own_device()
    }

    /// Encrypts the state into the file format described in the module doc.
    pub fn to_encrypted_bytes(&self, key: &LocalKey) -> Vec<u8> {
        let mut plaintext = WipingWriter(Zeroizing::new(Vec::with_capacity(16 * 1024)));
        rmp_serde::encode::write(&mut plaintext, &StoredState::from_state(self))
            .expect("state always encodes into memory");
        let mut buffer = plaintext.0;

        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let aad = aad();
        let tag = key
            .cipher()
            .encrypt_inout_detached(&Nonce::from(nonce), &aad, buffer.as_mut_slice().into())
            .expect("state is far below ChaCha20Poly1305's message limit");

        let mut out = Vec::with_capacity(HEADER_LEN + buffer.len() + TAG_LEN);
        out.extend_from_slice(&aad);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buffer);
        out.extend_from_slice(&tag);
        out
    }

    /// Decrypts and decodes bytes produced by [`ClientState::to_encrypted_bytes`].
    pub fn from_encrypted_bytes(bytes: &[u8], key: &LocalKey) -> Result<Self, StoreError> {
        if bytes.len() < MAGIC.len() + 1 {
            return Err(if MAGIC.starts_with(bytes) {
                StoreError::Truncated
            } else {
                StoreError::NotAStateFile
            });
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(StoreError::NotAStateFile);
        }
        let format = bytes[MAGIC.len()];
        if format != FORMAT {
            return Err(StoreError::UnsupportedFormat(format));
        }
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err(StoreError::Truncated);
        }
        let nonce = Nonce::try_from(&bytes[MAGIC.len() + 1..HEADER_LEN]).expect("12 bytes");
        let (ciphertext, tag) = bytes[HEADER_LEN..].split_at(bytes.len() - HEADER_LEN - TAG_LEN);
        let tag = Tag::try_from(tag).expect("16 bytes");

        let mut plaintext = Zeroizing::new(ciphertext.to_vec());
        key.cipher()
            .decrypt_inout_detached(&nonce, &aad(), plaintext.as_mut_slice().into(), &tag)
            .map_err(|_| StoreError::Decryption)?;
        // Borrowing decode: secret byte strings are copied straight into wiping buffers.
        let stored: StoredState =
            rmp_serde::from_slice(&plaintext).map_err(|_| StoreError::Malformed)?;
        stored.into_state()
    }

    /// Saves crash-safely to `path` (see the module doc).
    pub fn save(&self, path: &Path, key: &LocalKey) -> Result<(), StoreError> {
        let bytes = self.to_encrypted_bytes(key);
        let temp = write_temp(path, &bytes)?;
        fs::rename(&temp, path)?;
        sync_parent(path)?;
        Ok(())
    }

    /// Loads from `path`; `Ok(None)` if there is no state file yet.
    pub fn load(path: &Path, key: &LocalKey) -> Result<Option<Self>, StoreError> {
        match fs::read(path) {
            Ok(bytes) => Self::from_encrypted_bytes(&bytes, key).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn aad() -> [u8; 5] {
    let mut aad = [0u8; 5];
    aad[..4].copy_from_slice(MAGIC);
    aad[4] = FORMAT;
    aad
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// First half of a save: the complete new file, durable, under the temp name.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    let temp = temp_path(path);
    let mut file = new_file_options().create(true).truncate(true).open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(temp)
}

fn new_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Makes a rename or creation in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::File::open(parent)?.sync_all()?;
    }
    // Elsewhere (Windows) directories cannot be opened for fsync; rename is the best we have.
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A `Write` sink whose buffer wipes itself, including when it grows: a plain `Vec` would
/// free its old allocation (holding secrets) without wiping it.
pub(crate) struct WipingWriter(pub(crate) Zeroizing<Vec<u8>>);

impl io::Write for WipingWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let needed = self.0.len() + data.len();
        if needed > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(needed.max(self.0.capacity() * 2)));
            bigger.extend_from_slice(&self.0);
            // The old buffer is wiped as it drops.
            self.0 = bigger;
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// 32 secret bytes, (de)serialized as MessagePack `bin` straight from and into a wiping array.
struct Secret32(Zeroizing<[u8; 32]>);

impl Serialize for Secret32 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0.as_ref())
    }
}

impl<'de> Deserialize<'de> for Secret32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret32;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Secret32, E> {
                let array: &[u8; 32] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Secret32(Zeroizing::new(*array)))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// Secret bytes of any length, (de)serialized as MessagePack `bin` from and into a wiping
/// buffer (also the engine's record's secrets).
#[derive(Clone, Default)]
pub(crate) struct SecretBytes(pub(crate) Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub(crate) fn new(bytes: &[u8]) -> Self {
        Self(Zeroizing::new(bytes.to_vec()))
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SecretBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<SecretBytes, E> {
                Ok(SecretBytes(Zeroizing::new(v.to_vec())))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// The persisted record (format 1). Positional: append new fields at the end with
/// `#[serde(default)]`, or bump the format.
#[derive(Serialize, Deserialize)]
struct StoredState {
    user: String,
    device_id: u32,
    master_key: Secret32,
    account: AccountPickle,
    seal_key: Secret32,
    sessions: Vec<StoredSession>,
    pins: Vec<StoredPin>,
    #[serde(default)]
    app_data: SecretBytes,
}

#[derive(Serialize, Deserialize)]
struct StoredSession {
    user: String,
    device: u32,
    #[serde(with = "serde_bytes")]
    remote_identity: [u8; 32],
    pickle: SessionPickle,
}

#[derive(Serialize, Deserialize)]
struct StoredPin {
    user: String,
    #[serde(with = "serde_bytes")]
    master_key: [u8; 32],
    device_list: Option<StoredSeen>,
}

#[derive(Serialize, Deserialize)]
struct StoredSeen {
    version: u64,
    #[serde(with = "serde_bytes")]
    digest: [u8; 32],
}

impl StoredState {
    fn from_state(state: &ClientState) -> Self {
        let sessions = state
            .sessions
            .peers
            .iter()
            .flat_map(|((user, device), list)| {
                list.iter().map(move |peer| StoredSession {
                    user: user.clone(),
                    device: *device,
                    remote_identity: peer.remote_identity.to_bytes(),
                    pickle: peer.session.pickle(),
                })
            })
            .collect();
        let pins = state
            .pins
            .contacts
            .iter()
            .map(|(user, pin)| StoredPin {
                user: user.clone(),
                master_key: pin.master_key,
                device_list: pin.device_list.map(|seen| StoredSeen {
                    version: seen.version,
                    digest: seen.digest,
                }),
            })
            .collect();
        Self {
            user: state.sessions.own_user.clone(),
            device_id: state.sessions.own_device,
            master_key: Secret32(state.master_key.to_bytes()),
            account: state.device.account.pickle(),
            seal_key: Secret32(state.device.seal.to_bytes()),
            sessions,
            pins,
            app_data: SecretBytes(Zeroizing::new(state.app_data.to_vec())),
        }
    }

    fn into_state(self) -> Result<ClientState, StoreError> {
        let mut sessions = Sessions::new(self.user, self.device_id);
        for stored in self.sessions {
            // Sessions were written most recently used first; pushing keeps that order.
            sessions
                .peers
                .entry((stored.user, stored.device))
                .or_default()
                .push(PeerSession {
                    session: Session::from_pickle(stored.pickle),
                    remote_identity: Curve25519PublicKey::from_bytes(stored.remote_identity),
                });
        }
        let mut pins = Pins::new();
        for stored in self.pins {
            pins.contacts.insert(
                stored.user,
                Pin {
                    master_key: stored.master_key,
                    device_list: stored.device_list.map(|s| SeenDeviceList {
                        version: s.version,
                        digest: s.digest,
                    }),
                },
            );
        }
        Ok(ClientState {
            master_key: MasterKey::from_bytes(&self.master_key.0),
            device: DeviceKeys::from_parts(
                Account::from_pickle(self.account),
                SealSecretKey::from_bytes(&self.seal_key.0),
            ),
            sessions,
            pins,
            app_data: self.app_data.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{
        Payload,
        identity::PublicDeviceKeys,
        sealed::{SenderInfo, open, seal},
        session::SessionError,
    };

    fn state(user: &str, device_id: u32) -> ClientState {
        let mut device = DeviceKeys::generate();
        device.generate_one_time_keys(4);
        ClientState::new(user.into(), device_id, MasterKey::generate(), device)
    }

    fn sender(state: &ClientState) -> SenderInfo {
        SenderInfo {
            user: state.user().to_owned(),
            device: state.device_id(),
        }
    }

    fn public(state: &ClientState) -> PublicDeviceKeys {
        state.device.public_keys()
    }

    /// Alice sends Bob one sealed text; Bob receives it.
    fn exchange(
        from: &mut ClientState,
        to: &mut ClientState,
        body: &str,
    ) -> Result<Payload, SessionError> {
        if !from.sessions.has_session(to.user(), to.device_id()) {
            let otk = to.device.unpublished_keys().one_time[0];
            to.device.mark_keys_as_published();
            from.sessions
                .create_outbound(&from.device, to.user(), to.device_id(), &public(to), &otk)
                .expect("session");
        }
        let olm = from
            .sessions
            .encrypt(
                to.user(),
                to.device_id(),
                &Payload::Text {
                    body: body.into(),
                    link: None,
                },
            )
            .expect("encrypts");
        let sealed = seal(
            to.user(),
            to.device_id(),
            &public(to).seal_x25519,
            &sender(from),
            1,
            &olm,
        )
        .expect("seals");
        let unsealed =
            open(to.user(), to.device_id(), to.device.seal_secret(), &sealed).expect("opens");
        let from_keys = public(from);
        to.sessions.decrypt(
            &mut to.device,
            &unsealed.sender,
            &from_keys,
            &unsealed.olm_message,
        )
    }

    fn text(body: &str) -> Payload {
        Payload::Text {
            body: body.into(),
            link: None,
        }
    }

    #[test]
    fn state_round_trips_and_sessions_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (alice_path, bob_path) = (dir.path().join("alice.state"), dir.path().join("bob.state"));
        let key = LocalKey::create_file(&dir.path().join("local.key")).expect("key file");

        let mut alice = state("alice@a.example", 1);
        let mut bob = state("bob@b.example", 2);
        alice
            .pins
            .check("bob@b.example", &bob.master_key.public_key());
        assert_eq!(exchange(&mut alice, &mut bob, "before"), Ok(text("before")));
        assert_eq!(exchange(&mut bob, &mut alice, "reply"), Ok(text("reply")));

        alice.save(&alice_path, &key).expect("saves");
        bob.save(&bob_path, &key).expect("saves");
        let alice_public = public(&alice);
        let alice_master = alice.master_key.public_key();
        let alice_pins = alice.pins.clone();
        drop((alice, bob));

        let key = LocalKey::read_file(&dir.path().join("local.key")).expect("key file");
        let mut alice = ClientState::load(&alice_path, &key)
            .expect("loads")
            .expect("exists");
        let mut bob = ClientState::load(&bob_path, &key)
            .expect("loads")
            .expect("exists");
        assert_eq!(alice.user(), "alice@a.example");
        assert_eq!(alice.device_id(), 1);
        assert_eq!(public(&alice), alice_public);
        assert_eq!(alice.master_key.public_key(), alice_master);
        assert_eq!(alice.pins, alice_pins);
        assert!(alice.app_data.is_empty());
        assert_eq!(bob.device.stored_one_time_key_count(), 3);

        // The ratchets resume where they were.
        assert_eq!(exchange(&mut alice, &mut bob, "after"), Ok(text("after")));
        assert_eq!(
            exchange(&mut bob, &mut alice, "after too"),
            Ok(text("after too"))
        );
    }

    #[test]
    fn app_data_round_trips_and_older_files_load() {
        let key = LocalKey::generate();
        let mut alice = state("alice@a.example", 1);
        alice.app_data = Zeroizing::new(b"sdk record".to_vec());
        let loaded = ClientState::from_encrypted_bytes(&alice.to_encrypted_bytes(&key), &key)
            .expect("loads");
        assert_eq!(loaded.app_data.as_slice(), b"sdk record");

        // A file written before `app_data` existed (seven fields) still loads.
        let stored = StoredState::from_state(&alice);
        let old = (
            &stored.user,
            stored.device_id,
            &stored.master_key,
            &stored.account,
            &stored.seal_key,
            &stored.sessions,
            &stored.pins,
        );
        let bytes = rmp_serde::to_vec(&old).expect("encodes");
        let decoded: StoredState = rmp_serde::from_slice(&bytes).expect("decodes");
        assert!(decoded.app_data.0.is_empty());
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let loaded = ClientState::load(&dir.path().join("nothing"), &LocalKey::generate());
        assert!(matches!(loaded, Ok(None)));
    }

    #[test]
    fn survives_a_crash_mid_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("client.state");
        let key = LocalKey::generate();
        let mut alice = state("alice@a.example", 1);
        alice.save(&path, &key).expect("first save");

        // Crash 1: the temp file was being written when the process died (partial bytes).
        let mut bob = state("bob@b.example", 2);
        assert_eq!(exchange(&mut alice, &mut bob, "x"), Ok(text("x")));
        let full = alice.to_encrypted_bytes(&key);
        fs::write(temp_path(&path), &full[..full.len() / 2]).expect("partial temp");
        let loaded = ClientState::load(&path, &key)
            .expect("old state")
            .expect("exists");
        assert!(
            !loaded.sessions.has_session("bob@b.example", 2),
            "the old, complete state"
        );

        // Crash 2: the temp file is complete and durable, but the rename never happened.
        write_temp(&path, &full).expect("temp written");
        let loaded = ClientState::load(&path, &key)
            .expect("old state")
            .expect("exists");
        assert!(!loaded.sessions.has_session("bob@b.example", 2));

        // The next save replaces both the leftover temp file and the state.
        alice.save(&path, &key).expect("save after crash");
        assert!(!temp_path(&path).exists());
        let loaded = ClientState::load(&path, &key)
            .expect("new state")
            .expect("exists");
        assert!(loaded.sessions.has_session("bob@b.example", 2));
    }

    #[test]
    fn tampered_truncated_or_foreign_files_are_errors() {
        let key = LocalKey::generate();
        let bytes = state("alice@a.example", 1).to_encrypted_bytes(&key);
        assert_eq!(&bytes[..5], b"SPCS\x01");

        for index in [5, HEADER_LEN, bytes.len() / 2, bytes.len() - 1] {
            let mut tampered = bytes.clone();
            tampered[index] ^= 1;
            assert!(
                matches!(
                    ClientState::from_encrypted_bytes(&tampered, &key),
                    Err(StoreError::Decryption)
                ),
                "byte {index}"
            );
        }
        assert!(matches!(
            ClientState::from_encrypted_bytes(&bytes, &LocalKey::generate()),
            Err(StoreError::Decryption)
        ));
        assert!(matches!(
            ClientState::from_encrypted_bytes(&bytes[..bytes.len() - 1], &key),
            Err(StoreError::Decryption)
        ));
        assert!(matches!(
            ClientState::from_encrypted_bytes(&bytes[..HEADER_LEN + 3], &key),
            Err(StoreError::Truncated)
        ));
        assert!(matches!(
            ClientState::from_encrypted_bytes(b"SP", &key),
            Err(StoreError::Truncated)
        ));
        assert!(matches!(
            ClientState::from_encrypted_bytes(b"", &key),
            Err(StoreError::Truncated)
        ));
        assert!(matches!(
            ClientState::from_encrypted_bytes(b"{\"json\": true}", &key),
            Err(StoreError::NotAStateFile)
        ));
        let mut newer = bytes.clone();
        newer[4] = 2;
        assert!(matches!(
            ClientState::from_encrypted_bytes(&newer, &key),
            Err(StoreError::UnsupportedFormat(2))
        ));

        // Authentic but undecodable contents (a buggy writer): an error, not a panic.
        let mut garbage = Zeroizing::new(vec![0xc1u8; 40]);
        let nonce = [7u8; NONCE_LEN];
        let tag = key
            .cipher()
            .encrypt_inout_detached(&Nonce::from(nonce), &aad(), garbage.as_mut_slice().into())
            .expect("encrypts");
        let mut file = aad().to_vec();
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&garbage);
        file.extend_from_slice(&tag);
        assert!(matches!(
            ClientState::from_encrypted_bytes(&file, &key),
            Err(StoreError::Malformed)
        ));
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("local.key");
        let created = LocalKey::create_file(&path).expect("created");
        assert!(
            LocalKey::create_file(&path).is_err(),
            "never overwrites a key"
        );
        assert!(!temp_path(&path).exists(), "no temp file left behind");
        let read = LocalKey::read_file(&path).expect("read");
        assert_eq!(*created.0, *read.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o077, 0, "owner-only");
        }
        fs::write(&path, [1u8; 31]).expect("write");
        assert!(matches!(
            LocalKey::read_file(&path),
            Err(StoreError::BadKeyFile(31))
        ));
    }

    #[test]
    fn wiping_writer_keeps_all_bytes_across_growth() {
        let mut writer = WipingWriter(Zeroizing::new(Vec::with_capacity(1)));
        for chunk in 0..100u8 {
            writer.write_all(&[chunk; 7]).expect("writes");
        }
        assert_eq!(writer.0.len(), 700);
        assert!(
            writer
                .0
                .chunks(7)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| usize::from(b) == i))
        );
    }
}
