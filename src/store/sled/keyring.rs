//! Crypto-shredding: every stored envelope body is sealed under a key of its queue, and a
//! queue's keys are destroyed once nothing stored needs them.
//!
//! # Why keys, and why not in sled
//!
//! sled 0.34 is log-structured: an insert or remove appends a new version of a page to the
//! current segment, and the old version stays on disk until sled happens to reuse the segment
//! (possibly never, for a quiet store). Deleting an acknowledged envelope from sled therefore
//! does not erase it. What does: the envelope was only ever written sealed (XChaCha20-Poly1305,
//! a random 192-bit nonce per record, the sled key as associated data) under a key that never
//! touches sled, and that key is overwritten once the envelope is acknowledged. Every old page
//! version in every segment then holds only ciphertext under a key that no longer exists.
//!
//! Keys live in `keyring` in the data directory: a header, then fixed-size slots overwritten
//! in place (`pwrite` + `fdatasync`). On a file system that overwrites in place (ext4, xfs: the
//! deployment default) destroying a key = writing zeros over its slot; on a copy-on-write file
//! system (btrfs, zfs) or a wear-levelling SSD's flash the old block may survive below the file
//! system, which only full-disk encryption under a key the operator destroys covers.
//!
//! ```text
//! offset 0         header: magic "SPKR", format 1, index secret [32], check [16]
//! offset 128 * n   slot n: state u8 (1 live, 0 free), prefix_len u8, prefix [32] (the queue's
//!                  sled key prefix), generation u64, created_ms u64, key [32], check [16]
//! ```
//!
//! A slot is 128 bytes at a 128-byte offset, so it never straddles a sector; its check (BLAKE3
//! of the rest) catches a torn write, which makes it free. A record names its key by (slot,
//! generation): a free slot, another generation or a failed tag mean its key was destroyed: the
//! record is *shredded* and read as absent.
//!
//! # Keys per queue
//!
//! A queue is a device queue (prefix `E` user-hash device) or a destination's federation
//! outbox (prefix `Q` domain-hash). Its *current* key seals its new records.
//!
//! - **Drained** (a trim, expiry or removal left it empty): the writer reports it; after the
//!   *next* flush (which makes the deletion durable) the committer checks, under the queue's
//!   lock, that it is still empty and overwrites the key's slot with a fresh key (new
//!   generation), synced before anyone may seal under it. A queue that drains after every
//!   message costs one keyring `fdatasync` per group commit (under load, per
//!   `committer::SETTLE_INTERVAL`), shared by all queues drained in it, and no slot churn.
//! - **New** (no key yet: a device's first message, or its first since its key was freed for
//!   age): the queue adopts a *spare*, a key made and synced ahead of need whose slot names no
//!   queue. The adoption is an `A` entry in sled (`store::keys`), inserted before the first
//!   record sealed under the key, so the writer's thread waits for no keyring `fdatasync`
//!   (with one synced key per new queue, 10,000 new device queues cost the mailbox thread
//!   10,000 syncs). About [`SPARES`] spares are kept ready: the committer makes more after a
//!   flush once fewer than [`SPARES_LOW`] are left (opening the store, and a writer that
//!   finds none, make them too). The slot names its queue itself once rewritten (replaced on a
//!   drain), and the `A` entry goes. Outboxes (one per destination domain, rarely new) still
//!   get a key synced on the spot. An older build must not open a keyring that has spares: it
//!   would read them as keys of a queue with an empty name and churn through re-sealing
//!   (nothing is lost, but shredding waits).
//! - **Aged** (its current key is older than `key_max_age`): [`Keyring::rotate`], run by the
//!   expiry sweep, gives the queue a new current key (synced first), re-seals the survivors
//!   under it with compare-and-swap (a record deleted meanwhile stays deleted), a bounded
//!   number per sweep, and marks the old key for destruction after the next flush. An aged
//!   key of an empty queue is destroyed and its slot freed.
//!
//! # Crash ordering
//!
//! - A key is durable before anything is sealed under it. A spare is synced when made, before
//!   it can be adopted; other new keys (an outbox's, a rotation's, a drained queue's
//!   replacement) are written and synced while the queue's lock is held for writing, and
//!   sealing takes it for reading. So no envelope acknowledged to its sender (or only written)
//!   refers to a key a crash can lose. Opening the keyring syncs it before reading it: what a
//!   process wrote and did not sync is not taken for a key that exists.
//! - Which queue adopted a spare is an `A` entry written in sled's log before any record
//!   sealed under it. sled recovers a prefix of its log, so a record
//!   that survives a crash finds its key's queue named, and opening the keyring gives each
//!   adopted spare its queue again (a spare no `A` entry names was never used: it stays a
//!   spare). Without the name, draining that queue would never destroy the key.
//! - A key is destroyed only after the flush that followed the deletions that emptied its
//!   queue (or moved its records to another key). Should a crash still show a record under a
//!   destroyed key — a deletion that happened after that flush and was not yet durable, the
//!   only way — that record had been deleted (acknowledged, expired, dropped or rolled back)
//!   before its key went: recovery and reads treat it as acknowledged and delete it. We chose
//!   this over "never destroy before the emptying trim is durable" alone because the checked
//!   emptiness is of the live tree, which may run ahead of the disk; both hold here.
//! - Keys in memory are `sealpost_seal::SealKey` (XChaCha20-Poly1305), which zeroize on drop; raw key bytes
//!   only ever sit in `Zeroizing` buffers.
//!
//! # Keyed hashes
//!
//! Handles, envelope ids and destination domains in sled keys are 16-byte keyed BLAKE3 hashes
//! under keys derived from the header's index secret (never destroyed), so the data file does
//! not list who has mail or which envelope ids were seen. The expiry index stores the handle
//! it needs, sealed under a key derived from the same secret.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

use rand::{RngCore as _, rngs::OsRng};
use sealpost_seal::{NONCE_LEN, SealKey, TAG_LEN};
use zeroize::Zeroizing;

use crate::store::{Result, StoreError, keys};

/// File name of the keyring in the data directory.
pub(crate) const FILE: &str = "keyring";
const MAGIC: &[u8; 4] = b"SPKR";
const FORMAT: u8 = 1;
const SLOT: usize = 128;
const PREFIX_MAX: usize = 32;
/// First byte of a sealed record (stored record version 2: a sealed version-1 record).
pub(crate) const SEALED: u8 = 2;
const HEADER: usize = 1 + 4 + 8 + NONCE_LEN;
const TAG: usize = TAG_LEN;
const SHARDS: usize = 64;
/// Spares the committer tops the keyring up to, one `fdatasync` for all of them.
pub(super) const SPARES: usize = 256;
/// Fewer spares than this and the committer makes more.
pub(super) const SPARES_LOW: usize = 64;

const USER_HASH_CONTEXT: &str = "sealpost 2026-12-06 store handle hash v1";
const ID_HASH_CONTEXT: &str = "sealpost 2026-12-06 store envelope id hash v1";
const DOMAIN_HASH_CONTEXT: &str = "sealpost 2026-12-06 store domain hash v1";
const INDEX_SEAL_CONTEXT: &str = "sealpost 2026-12-06 store expiry index seal v1";

/// A 16-byte keyed hash that stands for a handle, an envelope id or a domain in sled keys.
pub(crate) type Hashed = [u8; 16];

/// A hash map keyed by [`Hashed`] values. They are keyed BLAKE3 output: uniform, and not
/// predictable without the keyring's key, so FxHash spreads them as well as SipHash would
/// (at a fraction of its cost: these maps are looked up on every send), and nobody can pick
/// ids that collide.
pub(crate) type HashedMap<V> = std::collections::HashMap<Hashed, V, rustc_hash::FxBuildHasher>;

/// How a drained queue's key is settled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Overwrite the key with a fresh one in the same slot (the queue is in use).
    Replace,
    /// Destroy the key and free its slot (the queue has been idle for `key_max_age`).
    Free,
}

/// A live key in memory.
struct Live {
    prefix: Vec<u8>,
    generation: u64,
    created_ms: u64,
    cipher: Arc<SealKey>,
}

/// A rotation in progress: records under `(slot, generation)` are being re-sealed from `cursor` on.
struct Retiring {
    prefix: Vec<u8>,
    slot: u32,
    generation: u64,
    cursor: Vec<u8>,
}

/// Everything the keyring keeps in memory, under one short-held lock.
struct Slots {
    /// By slot number (0 is the header).
    live: Vec<Option<Live>>,
    /// The last generation of each slot, live or not, so (slot, generation) is never reused.
    gens: Vec<u64>,
    free: Vec<u32>,
    /// Queue prefix → slot of its current key.
    current: HashMap<Vec<u8>, u32>,
    /// Queues reported drained since the last flush began.
    drained: Vec<(Vec<u8>, Drain)>,
    retiring: Vec<Retiring>,
    /// Keys whose records all moved: destroyed after the next flush.
    doomed: Vec<(u32, u64)>,
    /// Spare keys (live, synced, their slot naming no queue), ready to be adopted.
    spares: Vec<u32>,
    /// Adopted spares whose queue only their `A` entry names: slot → that entry's generation.
    adopted: HashMap<u32, u64>,
}

impl Slots {
    /// Makes the live key in `slot` a key of the queue `prefix`, created at `created_ms`, as
    /// the keyring opens. The newest key of a queue (by creation time; generations count per
    /// slot) is its current one; older ones were being rotated away when the process stopped:
    /// finish that. Either choice is safe: both keys are live until the records under the
    /// other one have moved.
    fn own(&mut self, slot: u32, prefix: Vec<u8>, created_ms: u64) {
        let Some(live) = self.live[slot as usize].as_mut() else {
            return;
        };
        live.prefix.clone_from(&prefix);
        live.created_ms = created_ms;
        let generation = live.generation;
        let other = self.current.get(&prefix).copied().and_then(|other| {
            let l = self.live[other as usize].as_ref()?;
            Some((other, l.generation, l.created_ms))
        });
        match other {
            Some((_, _, other_created)) if other_created >= created_ms => {
                self.retiring.push(Retiring {
                    cursor: prefix.clone(),
                    prefix,
                    slot,
                    generation,
                });
            }
            Some((other, other_gen, _)) => {
                self.retiring.push(Retiring {
                    cursor: prefix.clone(),
                    prefix: prefix.clone(),
                    slot: other,
                    generation: other_gen,
                });
                self.current.insert(prefix, slot);
            }
            None => {
                self.current.insert(prefix, slot);
            }
        }
    }

    /// A slot for a new key: a free one, or one more at the end of the file.
    fn take_slot(&mut self) -> Result<u32> {
        if let Some(slot) = self.free.pop() {
            return Ok(slot);
        }
        self.live.push(None);
        self.gens.push(0);
        u32::try_from(self.live.len() - 1).map_err(|_| StoreError::Io("keyring full".into()))
    }
}

/// The value of an `A` entry: the adopting queue's prefix and when it adopted the key.
fn adoption_bytes(prefix: &[u8], adopted_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + prefix.len() + 8);
    v.push(u8::try_from(prefix.len()).expect("prefixes are short"));
    v.extend_from_slice(prefix);
    v.extend_from_slice(&adopted_ms.to_be_bytes());
    v
}

/// The (slot, generation) an `A` entry's key names.
fn adoption_key(key: &[u8]) -> Option<(u32, u64)> {
    let slot = u32::from_be_bytes(key.get(1..5)?.try_into().ok()?);
    let generation = u64::from_be_bytes(key.get(5..13)?.try_into().ok()?);
    (key.len() == 13).then_some((slot, generation))
}

/// The (prefix, adopted_ms) of an `A` entry's value.
fn adoption_value(value: &[u8]) -> Option<(Vec<u8>, u64)> {
    let len = usize::from(*value.first()?);
    let prefix = value.get(1..1 + len)?;
    let adopted_ms = u64::from_be_bytes(value.get(1 + len..)?.try_into().ok()?);
    (len > 0 && len <= PREFIX_MAX).then(|| (prefix.to_vec(), adopted_ms))
}

/// What was pending when a flush began: settled once it succeeded.
pub(super) struct Pending {
    drained: Vec<(Vec<u8>, Drain)>,
    doomed: Vec<(u32, u64)>,
}

/// The keyring: the file, its slots in memory, per-queue locks and the index keys.
pub(crate) struct Keyring {
    file: File,
    slots: Mutex<Slots>,
    /// Sealing under a queue's current key holds its shard for reading (lookup, seal,
    /// insert); changing which key is current holds it for writing.
    shards: Vec<RwLock<()>>,
    user_key: Zeroizing<[u8; 32]>,
    id_key: Zeroizing<[u8; 32]>,
    domain_key: Zeroizing<[u8; 32]>,
    index_cipher: SealKey,
    max_age_ms: u64,
    queues: sled::Tree,
    outbox: sled::Tree,
}

/// The key a record is sealed under, held with its queue's shard read lock.
pub(super) struct Sealer<'a> {
    slot: u32,
    generation: u64,
    cipher: Arc<SealKey>,
    _shard: std::sync::RwLockReadGuard<'a, ()>,
}

impl Sealer<'_> {
    /// `plaintext` sealed for the sled key `key`.
    pub(super) fn seal(&self, key: &[u8], plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.cipher, self.slot, self.generation, key, plaintext)
    }
}

fn seal_with(
    cipher: &SealKey,
    slot: u32,
    generation: u64,
    key: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    // Random 192-bit nonces need uniqueness, not a system call each: the thread's CSPRNG
    // (seeded from the OS) gives that at a twentieth of `getrandom`'s cost.
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let mut out = Vec::with_capacity(HEADER + plaintext.len() + TAG);
    out.push(SEALED);
    out.extend_from_slice(&slot.to_be_bytes());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = cipher.seal(&nonce, key, &mut out[HEADER..]);
    out.extend_from_slice(&tag);
    out
}

/// The (slot, generation) a sealed value names.
fn sealed_by(value: &[u8]) -> Option<(u32, u64)> {
    if value.len() < HEADER + TAG || value[0] != SEALED {
        return None;
    }
    let slot = u32::from_be_bytes(value[1..5].try_into().ok()?);
    let generation = u64::from_be_bytes(value[5..13].try_into().ok()?);
    Some((slot, generation))
}

fn open_with(cipher: &SealKey, key: &[u8], value: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let nonce: [u8; NONCE_LEN] = value.get(13..HEADER)?.try_into().ok()?;
    let body = value.get(HEADER..value.len().checked_sub(TAG)?)?;
    let tag: [u8; TAG] = value.get(value.len() - TAG..)?.try_into().ok()?;
    let mut plain = Zeroizing::new(body.to_vec());
    cipher
        .open(&nonce, key, plain.as_mut_slice(), &tag)
        .then_some(plain)
}

fn check(bytes: &[u8]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c.copy_from_slice(&blake3::hash(bytes).as_bytes()[..16]);
    c
}

/// The bytes of slot: live (prefix, generation, created, key) or free (generation kept).
fn slot_bytes(live: Option<(&[u8], &[u8; 32], u64)>, generation: u64) -> Zeroizing<[u8; SLOT]> {
    let mut b = Zeroizing::new([0u8; SLOT]);
    if let Some((prefix, key, created_ms)) = live {
        b[0] = 1;
        b[1] = u8::try_from(prefix.len()).expect("prefixes are short");
        b[2..2 + prefix.len()].copy_from_slice(prefix);
        b[42..50].copy_from_slice(&created_ms.to_be_bytes());
        b[50..82].copy_from_slice(key);
    }
    b[34..42].copy_from_slice(&generation.to_be_bytes());
    let c = check(&b[..82]);
    b[82..98].copy_from_slice(&c);
    b
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(format!("keyring: {e}"))
}

fn fresh_key() -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(k.as_mut());
    k
}

fn cipher(key: &[u8; 32]) -> SealKey {
    SealKey::new(key)
}

fn offset(slot: u32) -> u64 {
    u64::from(slot) * SLOT as u64
}

/// Which sled tree a queue prefix lives in.
fn tree_tag(prefix: &[u8]) -> Option<u8> {
    prefix.first().copied()
}

impl Keyring {
    /// Opens `dir/keyring`, creating it if absent. `has_data`: the sled trees already hold
    /// sealed or hashed records, which a new keyring could not open: refused.
    pub(super) fn open(
        dir: &Path,
        max_age_ms: u64,
        queues: sled::Tree,
        outbox: sled::Tree,
        has_data: bool,
    ) -> Result<Self> {
        let path = dir.join(FILE);
        if !path.exists() {
            if has_data {
                return Err(StoreError::Corruption(
                    "the data directory holds sealed records but its keyring is missing".into(),
                ));
            }
            let mut header = Zeroizing::new([0u8; SLOT]);
            header[..4].copy_from_slice(MAGIC);
            header[4] = FORMAT;
            OsRng.fill_bytes(&mut header[8..40]);
            let c = check(&header[..40]);
            header[40..56].copy_from_slice(&c);
            let tmp = dir.join("keyring.tmp");
            let mut opts = OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let f = opts.open(&tmp).map_err(io)?;
            f.write_all_at(header.as_ref(), 0).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        // What is read next must be on disk, not only in the page cache: slots an earlier
        // process (or this one, before a failed sync and a reopen) wrote and did not sync
        // would otherwise be taken for keys that exist, and records sealed under them lost.
        file.sync_data().map_err(io)?;
        let bytes = Zeroizing::new(std::fs::read(&path).map_err(io)?);
        if bytes.len() < SLOT || &bytes[..4] != MAGIC || bytes[4] != FORMAT {
            return Err(StoreError::Corruption("keyring header".into()));
        }
        if check(&bytes[..40]) != bytes[40..56] {
            return Err(StoreError::Corruption("keyring header checksum".into()));
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&bytes[8..40]);
        let derive = |context: &str| Zeroizing::new(blake3::derive_key(context, secret.as_ref()));
        let index_key = derive(INDEX_SEAL_CONTEXT);
        let mut slots = Slots {
            live: vec![None],
            gens: vec![0],
            free: Vec::new(),
            current: HashMap::new(),
            drained: Vec::new(),
            retiring: Vec::new(),
            doomed: Vec::new(),
            spares: Vec::new(),
            adopted: HashMap::new(),
        };
        for (n, chunk) in bytes.chunks_exact(SLOT).enumerate().skip(1) {
            let slot = u32::try_from(n).map_err(|_| StoreError::Corruption("keyring".into()))?;
            let intact = check(&chunk[..82]) == chunk[82..98];
            let generation = if intact {
                u64::from_be_bytes(chunk[34..42].try_into().expect("8 bytes"))
            } else {
                0
            };
            slots.gens.push(generation);
            let len = usize::from(chunk[1]);
            if !intact || chunk[0] != 1 || len > PREFIX_MAX {
                slots.live.push(None);
                slots.free.push(slot);
                continue;
            }
            let mut key = Zeroizing::new([0u8; 32]);
            key.copy_from_slice(&chunk[50..82]);
            let prefix = chunk[2..2 + len].to_vec();
            let created_ms = u64::from_be_bytes(chunk[42..50].try_into().expect("8 bytes"));
            slots.live.push(Some(Live {
                prefix: Vec::new(),
                generation,
                created_ms,
                cipher: Arc::new(cipher(&key)),
            }));
            if prefix.is_empty() {
                slots.spares.push(slot);
            } else {
                slots.own(slot, prefix, created_ms);
            }
        }
        // Spares that a queue adopted before the process stopped: named by their `A` entry.
        // An entry names a spare if the slot is live, names no queue in the file, and has the
        // entry's generation; any other entry is stale (its slot was rewritten since).
        let is_spare = |slots: &Slots, slot: u32, generation: u64| {
            slots
                .live
                .get(slot as usize)
                .and_then(Option::as_ref)
                .is_some_and(|l| l.prefix.is_empty() && l.generation == generation)
        };
        let mut stale = Vec::new();
        let mut taken = HashSet::new();
        for entry in queues.scan_prefix([keys::ADOPTION]) {
            let (k, v) = entry?;
            let Some((slot, generation)) = adoption_key(&k) else {
                stale.push(k);
                continue;
            };
            if !is_spare(&slots, slot, generation) {
                stale.push(k);
                continue;
            }
            taken.insert(slot);
            match adoption_value(&v) {
                Some((prefix, adopted_ms)) => {
                    slots.adopted.insert(slot, generation);
                    slots.own(slot, prefix, adopted_ms);
                }
                // Records may be sealed under it, for a queue no longer known: kept live (not
                // destroyed, not handed out again) and left as it is.
                None => tracing::warn!(slot, "a key adoption record does not decode"),
            }
        }
        slots.spares.retain(|s| !taken.contains(s));
        for k in stale {
            queues.remove(k)?;
        }
        let keyring = Keyring {
            file,
            slots: Mutex::new(slots),
            shards: (0..SHARDS).map(|_| RwLock::new(())).collect(),
            user_key: derive(USER_HASH_CONTEXT),
            id_key: derive(ID_HASH_CONTEXT),
            domain_key: derive(DOMAIN_HASH_CONTEXT),
            index_cipher: cipher(&index_key),
            max_age_ms,
            queues,
            outbox,
        };
        // Best effort: with none left, the first new queue makes them (a full disk fails that
        // append, not the store's opening).
        if let Err(e) = keyring.refill_spares() {
            tracing::warn!(error = %e, "making spare keys failed");
        }
        Ok(keyring)
    }

    fn state(&self) -> MutexGuard<'_, Slots> {
        // Every update of the slots is completed before the lock is released.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_of(prefix: &[u8]) -> usize {
        let h = blake3::hash(prefix);
        usize::from(h.as_bytes()[0]) % SHARDS
    }

    fn tree(&self, prefix: &[u8]) -> &sled::Tree {
        if tree_tag(prefix) == Some(super::super::keys::OUTBOX) {
            &self.outbox
        } else {
            &self.queues
        }
    }

    fn hash(key: &[u8; 32], data: &[u8]) -> Hashed {
        let mut out = [0u8; 16];
        out.copy_from_slice(&blake3::keyed_hash(key, data).as_bytes()[..16]);
        out
    }

    /// The keyed hash that stands for a handle in sled keys.
    pub(crate) fn user(&self, handle: &str) -> Hashed {
        Self::hash(&self.user_key, handle.as_bytes())
    }

    /// The keyed hash that stands for an envelope id in sled keys.
    pub(crate) fn id(&self, id: &[u8; 16]) -> Hashed {
        Self::hash(&self.id_key, id)
    }

    /// The keyed hash that stands for a destination domain in sled keys.
    pub(crate) fn domain(&self, domain: &str) -> Hashed {
        Self::hash(&self.domain_key, domain.as_bytes())
    }

    /// A handle sealed for the expiry index entry `key`.
    pub(crate) fn seal_index(&self, key: &[u8], handle: &str) -> Vec<u8> {
        seal_with(&self.index_cipher, 0, 0, key, handle.as_bytes())
    }

    /// The handle sealed in the expiry index entry `key`.
    pub(crate) fn open_index(&self, key: &[u8], value: &[u8]) -> Option<String> {
        let plain = open_with(&self.index_cipher, key, value)?;
        String::from_utf8(plain.to_vec()).ok()
    }

    /// A handle and the keyed ids of its sends, sealed for the expiry index entry `key`
    /// (`Z`): `handle_len:u16 handle id*`.
    pub(crate) fn seal_index_list(&self, key: &[u8], handle: &str, ids: &[Hashed]) -> Vec<u8> {
        let mut plain = Zeroizing::new(Vec::with_capacity(2 + handle.len() + 16 * ids.len()));
        let len = u16::try_from(handle.len()).expect("handles are short");
        plain.extend_from_slice(&len.to_be_bytes());
        plain.extend_from_slice(handle.as_bytes());
        for id in ids {
            plain.extend_from_slice(id);
        }
        seal_with(&self.index_cipher, 0, 0, key, &plain)
    }

    /// The handle and keyed ids sealed in the expiry index entry `key` (`Z`).
    pub(crate) fn open_index_list(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> Option<(String, Vec<Hashed>)> {
        let plain = open_with(&self.index_cipher, key, value)?;
        let len = usize::from(u16::from_be_bytes(plain.get(..2)?.try_into().ok()?));
        let handle = std::str::from_utf8(plain.get(2..2 + len)?).ok()?.to_owned();
        let ids = plain.get(2 + len..)?;
        if ids.len() % 16 != 0 {
            return None;
        }
        let ids = ids
            .chunks_exact(16)
            .map(|id| id.try_into().expect("16 bytes"))
            .collect();
        Some((handle, ids))
    }

    /// Runs `f` with the current key of the queue `prefix` (a spare adopted, or for an outbox
    /// a key created durably, if it has none), holding the queue's lock so that the key stays
    /// current until `f` returns: `f` seals and inserts.
    pub(super) fn with_sealer<T>(
        &self,
        prefix: &[u8],
        f: impl FnOnce(&Sealer<'_>) -> Result<T>,
    ) -> Result<T> {
        let shard = &self.shards[Self::shard_of(prefix)];
        loop {
            let guard = shard.read().unwrap_or_else(|p| p.into_inner());
            let found = {
                let state = self.state();
                state.current.get(prefix).and_then(|&slot| {
                    state.live[slot as usize]
                        .as_ref()
                        .map(|l| (slot, l.generation, l.cipher.clone()))
                })
            };
            if let Some((slot, generation, cipher)) = found {
                return f(&Sealer {
                    slot,
                    generation,
                    cipher,
                    _shard: guard,
                });
            }
            drop(guard);
            let _write = shard.write().unwrap_or_else(|p| p.into_inner());
            if self.state().current.contains_key(prefix) {
                continue;
            }
            if tree_tag(prefix) == Some(keys::OUTBOX) {
                self.new_currents(&[prefix.to_vec()], crate::clock::now_ms())?;
            } else {
                self.adopt(prefix, crate::clock::now_ms())?;
            }
        }
    }

    /// Makes a spare the current key of the queue `prefix` (whose shard the caller holds for
    /// writing): its `A` entry first, so that nothing sealed under it is stored before it.
    /// With no spare left, makes a batch of them here (one `fdatasync`).
    fn adopt(&self, prefix: &[u8], now_ms: u64) -> Result<()> {
        let slot = loop {
            let spare = self.state().spares.pop();
            match spare {
                Some(slot) => break slot,
                // Others may take what this makes before it pops one: then it makes more.
                None => self.make_spares(SPARES)?,
            }
        };
        let generation = self.state().gens[slot as usize];
        let named = self.queues.insert(
            keys::adoption(slot, generation),
            adoption_bytes(prefix, now_ms),
        );
        let mut state = self.state();
        if let Err(e) = named {
            state.spares.push(slot);
            return Err(e.into());
        }
        if let Some(live) = state.live[slot as usize].as_mut() {
            live.prefix = prefix.to_vec();
            live.created_ms = now_ms;
        }
        state.adopted.insert(slot, generation);
        state.current.insert(prefix.to_vec(), slot);
        metrics::counter!("sealpost_store_keys_adopted_total").increment(1);
        Ok(())
    }

    /// Tops the spares up to [`SPARES`] once fewer than [`SPARES_LOW`] are left (one
    /// `fdatasync`). Run by the committer, off the writers' threads, and on open.
    pub(super) fn refill_spares(&self) -> Result<()> {
        let have = self.state().spares.len();
        if have >= SPARES_LOW {
            return Ok(());
        }
        self.make_spares(SPARES - have)
    }

    /// Makes `n` spare keys, synced before any can be adopted.
    fn make_spares(&self, n: usize) -> Result<()> {
        let mut made = Vec::with_capacity(n);
        let mut writes = Vec::with_capacity(n);
        let now_ms = crate::clock::now_ms();
        // Drawn before the slots' lock is taken: sealing and opening wait on that lock.
        let mut keys: Vec<Zeroizing<[u8; 32]>> = (0..n).map(|_| fresh_key()).collect();
        {
            let mut state = self.state();
            for key in keys.drain(..) {
                let slot = state.take_slot()?;
                let generation = state.gens[slot as usize] + 1;
                // Taken now, so that nobody else takes it while it is written.
                state.gens[slot as usize] = generation;
                writes.push((slot, slot_bytes(Some((&[], &key, now_ms)), generation)));
                made.push((slot, generation, key));
            }
        }
        let written = self.write_slots(&writes);
        let mut state = self.state();
        if let Err(e) = written {
            state.free.extend(made.iter().map(|(slot, ..)| *slot));
            return Err(e);
        }
        for (slot, generation, key) in made {
            state.live[slot as usize] = Some(Live {
                prefix: Vec::new(),
                generation,
                created_ms: now_ms,
                cipher: Arc::new(cipher(&key)),
            });
            state.spares.push(slot);
        }
        metrics::counter!("sealpost_store_keys_created_total").increment(n as u64);
        Ok(())
    }

    /// Gives each of `prefixes` a new current key in a new slot, all durable (one
    /// `fdatasync`) before anyone can seal under them: the caller holds their shards for
    /// writing.
    fn new_currents(&self, prefixes: &[Vec<u8>], now_ms: u64) -> Result<()> {
        let mut fresh = Vec::with_capacity(prefixes.len());
        let mut writes = Vec::with_capacity(prefixes.len());
        {
            let mut state = self.state();
            for prefix in prefixes {
                assert!(prefix.len() <= PREFIX_MAX, "queue prefixes are short");
                let slot = state.take_slot()?;
                let generation = state.gens[slot as usize] + 1;
                let key = fresh_key();
                writes.push((slot, slot_bytes(Some((prefix, &key, now_ms)), generation)));
                fresh.push((prefix, slot, generation, key));
            }
        }
        let written = self.write_slots(&writes);
        let mut state = self.state();
        if let Err(e) = written {
            state.free.extend(fresh.iter().map(|(_, slot, ..)| *slot));
            return Err(e);
        }
        for (prefix, slot, generation, key) in fresh {
            state.gens[slot as usize] = generation;
            state.live[slot as usize] = Some(Live {
                prefix: prefix.clone(),
                generation,
                created_ms: now_ms,
                cipher: Arc::new(cipher(&key)),
            });
            state.current.insert(prefix.clone(), slot);
        }
        metrics::counter!("sealpost_store_keys_created_total").increment(prefixes.len() as u64);
        Ok(())
    }

    fn write_slots(&self, slots: &[(u32, Zeroizing<[u8; SLOT]>)]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        for (slot, bytes) in slots {
            self.file
                .write_all_at(bytes.as_ref(), offset(*slot))
                .map_err(io)?;
        }
        self.file.sync_data().map_err(io)
    }

    /// Opens a sealed record stored at `key`: `None` if its key was destroyed (the record was
    /// acknowledged or otherwise deleted before: it is shredded).
    pub(super) fn unseal(&self, key: &[u8], value: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let Some((slot, generation)) = sealed_by(value) else {
            return Err(StoreError::Corruption("unsealed record".into()));
        };
        let cipher = {
            let state = self.state();
            match state.live.get(slot as usize) {
                Some(Some(l)) if l.generation == generation => l.cipher.clone(),
                _ => return Ok(None),
            }
        };
        Ok(open_with(&cipher, key, value))
    }

    /// Reports that the queue `prefix` may be empty now: its key is replaced after the next
    /// flush if it still is then.
    pub(super) fn drained(&self, prefix: Vec<u8>) {
        let mut state = self.state();
        if state.current.contains_key(&prefix) {
            state.drained.push((prefix, Drain::Replace));
        }
    }

    /// Takes what is pending, before a flush begins.
    pub(super) fn take_pending(&self) -> Pending {
        let mut state = self.state();
        Pending {
            drained: std::mem::take(&mut state.drained),
            doomed: std::mem::take(&mut state.doomed),
        }
    }

    /// Puts back what a failed flush did not settle.
    pub(super) fn restore_pending(&self, pending: Pending) {
        let mut state = self.state();
        state.drained.extend(pending.drained);
        state.doomed.extend(pending.doomed);
    }

    /// After a successful flush that began after `pending` was taken: destroys the keys of
    /// drained queues that are still empty (replacing them, or freeing idle ones) and of
    /// rotated-away keys, with one `fdatasync` of the keyring.
    pub(super) fn settle(&self, pending: Pending) -> Result<()> {
        if pending.drained.is_empty() && pending.doomed.is_empty() {
            return Ok(());
        }
        let mut shards = BTreeSet::new();
        {
            let state = self.state();
            for (prefix, _) in &pending.drained {
                shards.insert(Self::shard_of(prefix));
            }
            for (slot, _) in &pending.doomed {
                if let Some(Some(l)) = state.live.get(*slot as usize) {
                    shards.insert(Self::shard_of(&l.prefix));
                }
            }
        }
        // In ascending order: the only place that holds more than one.
        let _guards: Vec<_> = shards
            .into_iter()
            .map(|s| self.shards[s].write().unwrap_or_else(|p| p.into_inner()))
            .collect();
        // Decided under the slots' lock, written and synced without it (the shard locks keep
        // anyone from sealing into these queues meanwhile), then applied.
        let mut writes = Vec::new();
        let mut changes = Vec::new();
        {
            let state = self.state();
            let now_ms = crate::clock::now_ms();
            let mut seen = BTreeSet::new();
            for (prefix, how) in pending.drained {
                if !seen.insert(prefix.clone()) {
                    continue;
                }
                let Some(&slot) = state.current.get(&prefix) else {
                    continue;
                };
                // Still empty, under the lock that keeps anyone from sealing into it.
                if self.tree(&prefix).scan_prefix(&prefix).next().is_some() {
                    continue;
                }
                // Keys being rotated away from this queue go too: nothing is left under them.
                for r in state.retiring.iter().filter(|r| r.prefix == prefix) {
                    writes.push((r.slot, slot_bytes(None, state.gens[r.slot as usize])));
                    changes.push(Change::Free(r.slot, None));
                }
                match how {
                    Drain::Replace => {
                        let key = fresh_key();
                        let generation = state.gens[slot as usize] + 1;
                        writes.push((slot, slot_bytes(Some((&prefix, &key, now_ms)), generation)));
                        changes.push(Change::Replace(slot, generation, now_ms, key));
                    }
                    Drain::Free => {
                        writes.push((slot, slot_bytes(None, state.gens[slot as usize])));
                        changes.push(Change::Free(slot, Some(prefix)));
                    }
                }
            }
            for (slot, generation) in pending.doomed {
                let Some(Some(l)) = state.live.get(slot as usize) else {
                    continue;
                };
                if l.generation == generation
                    && state.current.get(&l.prefix) != Some(&slot)
                    && !changes.iter().any(|c| c.slot() == slot)
                {
                    writes.push((slot, slot_bytes(None, generation)));
                    changes.push(Change::Free(slot, None));
                }
            }
        }
        self.write_slots(&writes)?;
        let mut state = self.state();
        // Adopted spares rewritten now: the file names their queue (or the key is gone), and
        // their `A` entries are stale.
        let rewritten: Vec<(u32, u64)> = changes
            .iter()
            .filter_map(|c| Some((c.slot(), state.adopted.remove(&c.slot())?)))
            .collect();
        for change in changes {
            match change {
                Change::Replace(slot, generation, created_ms, key) => {
                    state.gens[slot as usize] = generation;
                    if let Some(l) = state.live[slot as usize].as_mut() {
                        l.generation = generation;
                        l.created_ms = created_ms;
                        l.cipher = Arc::new(cipher(&key));
                    }
                }
                Change::Free(slot, current_of) => {
                    if let Some(prefix) = current_of {
                        state.current.remove(&prefix);
                    }
                    if let Some(l) = state.live[slot as usize].take() {
                        let prefix = l.prefix;
                        state
                            .retiring
                            .retain(|r| !(r.prefix == prefix && r.slot == slot));
                    }
                    state.free.push(slot);
                }
            }
        }
        drop(state);
        metrics::counter!("sealpost_store_keys_destroyed_total").increment(writes.len() as u64);
        for (slot, generation) in rewritten {
            // A stale entry left behind (this failed, or a crash came first) goes on open.
            if let Err(e) = self.queues.remove(keys::adoption(slot, generation)) {
                tracing::warn!(error = %e, "removing a stale key adoption failed");
            }
        }
        Ok(())
    }

    /// The age-based rotation, bounded to about `budget` records re-sealed: starts rotating
    /// queues whose current key is older than `key_max_age` (freeing the keys of empty ones)
    /// and continues the rotations under way.
    /// Answers whether something now waits for a flush to be destroyed.
    pub(super) fn rotate(&self, now_ms: u64, budget: usize) -> Result<bool> {
        let aged: Vec<(Vec<u8>, u32)> = {
            let state = self.state();
            state
                .current
                .iter()
                .filter(|(_, slot)| {
                    state.live[**slot as usize]
                        .as_ref()
                        .is_some_and(|l| l.created_ms.saturating_add(self.max_age_ms) <= now_ms)
                })
                .filter(|(prefix, _)| !state.retiring.iter().any(|r| &r.prefix == *prefix))
                .take(budget.max(1))
                .map(|(p, s)| (p.clone(), *s))
                .collect()
        };
        // New keys for the aged queues that hold something, one keyring sync per shard.
        let mut by_shard: BTreeMap<usize, Vec<(Vec<u8>, u32)>> = BTreeMap::new();
        for (prefix, slot) in aged {
            if self.tree(&prefix).scan_prefix(&prefix).next().is_none() {
                self.state().drained.push((prefix, Drain::Free));
            } else {
                by_shard
                    .entry(Self::shard_of(&prefix))
                    .or_default()
                    .push((prefix, slot));
            }
        }
        for (shard, queues) in by_shard {
            let _write = self.shards[shard]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let queues: Vec<(Vec<u8>, u32)> = {
                let state = self.state();
                queues
                    .into_iter()
                    .filter(|(prefix, slot)| state.current.get(prefix) == Some(slot))
                    .collect()
            };
            let prefixes: Vec<Vec<u8>> = queues.iter().map(|(p, _)| p.clone()).collect();
            self.new_currents(&prefixes, now_ms)?;
            let mut state = self.state();
            for (prefix, slot) in queues {
                let generation = state.gens[slot as usize];
                state.retiring.push(Retiring {
                    cursor: prefix.clone(),
                    prefix,
                    slot,
                    generation,
                });
            }
            metrics::counter!("sealpost_store_key_rotations_total")
                .increment(prefixes.len() as u64);
        }
        let mut left = budget;
        let retiring = std::mem::take(&mut self.state().retiring);
        let mut keep = Vec::new();
        for mut r in retiring {
            if left == 0 {
                keep.push(r);
                continue;
            }
            let done = self.reseal(&mut r, &mut left)?;
            if done {
                self.state().doomed.push((r.slot, r.generation));
            } else {
                keep.push(r);
            }
        }
        let mut state = self.state();
        state.retiring.extend(keep);
        Ok(!state.drained.is_empty() || !state.doomed.is_empty())
    }

    /// Re-seals up to `left` records of `r`'s queue still under its old key; true when none
    /// is left.
    fn reseal(&self, r: &mut Retiring, left: &mut usize) -> Result<bool> {
        let tree = self.tree(&r.prefix).clone();
        loop {
            let Some(kv) = tree.range(r.cursor.as_slice()..).next() else {
                return Ok(true);
            };
            let (k, v) = kv?;
            if !k.starts_with(&r.prefix) {
                return Ok(true);
            }
            let mut next = k.to_vec();
            next.push(0);
            r.cursor = next;
            if sealed_by(&v) != Some((r.slot, r.generation)) {
                continue;
            }
            if *left == 0 {
                r.cursor = k.to_vec();
                return Ok(false);
            }
            *left -= 1;
            let Some(plain) = self.unseal(&k, &v)? else {
                continue;
            };
            self.with_sealer(&r.prefix, |sealer| {
                let new = sealer.seal(&k, &plain);
                // A record deleted (or rewritten) meanwhile is left as it is now.
                let _ = tree.compare_and_swap(&k, Some(&v), Some(new))?;
                Ok(())
            })?;
        }
    }

    /// Test hook: pretends every key is `by_ms` older.
    #[cfg(test)]
    pub(super) fn age_all(&self, by_ms: u64) {
        let mut state = self.state();
        for l in state.live.iter_mut().flatten() {
            l.created_ms = l.created_ms.saturating_sub(by_ms);
        }
    }

    /// Test hook: live keys of queues (spares not counted).
    #[cfg(test)]
    pub(super) fn live_keys(&self) -> usize {
        self.state()
            .live
            .iter()
            .flatten()
            .filter(|l| !l.prefix.is_empty())
            .count()
    }

    /// Test hook: spare keys ready.
    #[cfg(test)]
    pub(super) fn spare_keys(&self) -> usize {
        self.state().spares.len()
    }
}

/// Test hook, the attacker's view: whether any key left in the keyring file of `dir` (any
/// slot, live or not, whatever its check says) opens `value`, as stored at `key` once.
#[cfg(test)]
pub(super) fn file_opens(dir: &Path, key: &[u8], value: &[u8]) -> bool {
    let bytes = std::fs::read(dir.join(FILE)).expect("keyring file");
    bytes.chunks_exact(SLOT).skip(1).any(|slot| {
        let k: [u8; 32] = slot[50..82].try_into().expect("32 bytes");
        open_with(&cipher(&k), key, value).is_some()
    })
}

/// A settled change of a slot, applied once the keyring is synced.
enum Change {
    /// A fresh key (generation, created_ms, key) in the same slot.
    Replace(u32, u64, u64, Zeroizing<[u8; 32]>),
    /// Destroyed and freed; the queue it was current for, if it was.
    Free(u32, Option<Vec<u8>>),
}

impl Change {
    fn slot(&self) -> u32 {
        match self {
            Change::Replace(slot, ..) | Change::Free(slot, _) => *slot,
        }
    }
}
