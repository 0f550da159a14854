//! Migration of a layout-1 data directory (plain handles and ids in keys, plain records; see
//! [`keys::v1`]) to layout 2, in one pass when the store opens, before anything is served.
//!
//! Each record is written under its new key (sealed, or with its handle index-sealed) and then
//! its old key is removed, so a crash at any point leaves every record under its old key, its
//! new key or both; the next open finishes the pass (writing the new one again is harmless:
//! it holds the same record). The pass ends with a flush + fsync. Recovery of torn sends runs
//! afterwards, on layout 2, as for any open. The migrated directory stays readable by nothing
//! older (the old build finds no records it knows and would treat the queues as empty), so
//! migration is one-way.
//!
//! What layout 1 wrote in plain remains in sled's old segments until sled reuses them: a
//! migrated directory is shredded from the migration on, not retroactively.

use zeroize::Zeroizing;

use super::{committer, keyring::Keyring};
use crate::store::{Result, StoreError, keys};

/// Records migrated per scan (the scan restarts after each batch: migrated keys are gone).
const BATCH: usize = 10_000;

/// Migrates every layout-1 record of `queues` and `outbox`; answers how many it migrated.
pub(super) fn layout_1(
    db: &sled::Db,
    dir: &std::path::Path,
    queues: &sled::Tree,
    outbox: &sled::Tree,
    keyring: &Keyring,
) -> Result<u64> {
    let mut moved = 0u64;
    for (tree, tag) in [
        (queues, keys::v1::ENVELOPE),
        (queues, keys::v1::HEAD),
        (queues, keys::v1::DEDUP),
        (queues, keys::v1::EXPIRY_ENVELOPE),
        (queues, keys::v1::EXPIRY_DEDUP),
        (outbox, keys::v1::OUTBOX),
    ] {
        loop {
            let batch: Vec<(sled::IVec, sled::IVec)> = tree
                .scan_prefix([tag])
                .take(BATCH)
                .collect::<std::result::Result<_, _>>()?;
            if batch.is_empty() {
                break;
            }
            for (old, value) in batch {
                migrate_one(tree, keyring, tag, &old, &value)?;
                tree.remove(&old)?;
                moved += 1;
            }
        }
    }
    if moved > 0 {
        db.flush()?;
        std::fs::File::open(dir.join("db"))
            .and_then(|f| f.sync_data())
            .and_then(|()| committer::sync_dir_and(dir, &[]))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        tracing::info!(records = moved, "migrated the data directory to layout 2");
    }
    Ok(moved)
}

fn migrate_one(
    tree: &sled::Tree,
    keyring: &Keyring,
    tag: u8,
    old: &[u8],
    value: &[u8],
) -> Result<()> {
    let timed = matches!(tag, keys::v1::EXPIRY_ENVELOPE | keys::v1::EXPIRY_DEDUP);
    let bad = || StoreError::Corruption("bad layout-1 key".into());
    let (expires_ms, name, rest) = keys::v1::split(old, timed).ok_or_else(bad)?;
    let device_seq = |rest: &[u8]| keys::device_seq(rest).ok_or_else(bad);
    let id = |rest: &[u8]| -> Result<[u8; 16]> { rest.try_into().map_err(|_| bad()) };
    match tag {
        keys::v1::ENVELOPE => {
            let (device, seq) = device_seq(rest)?;
            let u = keyring.user(name);
            let key = keys::envelope(&u, device, seq);
            seal_into(
                tree,
                keyring,
                &keys::envelope_prefix(&u, device),
                &key,
                value,
            )
        }
        keys::v1::HEAD => {
            let device = u32::from_be_bytes(rest.try_into().map_err(|_| bad())?);
            tree.insert(keys::head(&keyring.user(name), device), value)?;
            Ok(())
        }
        keys::v1::DEDUP => {
            let key = keys::dedup(&keyring.user(name), &keyring.id(&id(rest)?));
            tree.insert(key, value)?;
            Ok(())
        }
        keys::v1::EXPIRY_ENVELOPE => {
            let (device, seq) = device_seq(rest)?;
            let key = keys::expiry_envelope(expires_ms, &keyring.user(name), device, seq);
            tree.insert(&key, keyring.seal_index(&key, name))?;
            Ok(())
        }
        keys::v1::EXPIRY_DEDUP => {
            let key = keys::expiry_dedup(expires_ms, &keyring.user(name), &keyring.id(&id(rest)?));
            tree.insert(&key, keyring.seal_index(&key, name))?;
            Ok(())
        }
        _ => {
            let seq = u64::from_be_bytes(rest.try_into().map_err(|_| bad())?);
            let d = keyring.domain(name);
            seal_into(
                tree,
                keyring,
                &keys::outbox_prefix(&d),
                &keys::outbox(&d, seq),
                value,
            )
        }
    }
}

/// Stores a plain layout-1 record (itself a versioned record) sealed at `key`.
fn seal_into(
    tree: &sled::Tree,
    keyring: &Keyring,
    prefix: &[u8],
    key: &[u8],
    plain: &[u8],
) -> Result<()> {
    let plain = Zeroizing::new(plain.to_vec());
    keyring.with_sealer(prefix, |sealer| {
        tree.insert(key, sealer.seal(key, &plain))?;
        Ok(())
    })
}
