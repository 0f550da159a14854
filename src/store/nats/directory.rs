//! [`Directory`] on the KV bucket `sealpost_directory` (and `sealpost_link_codes`). Every
//! read-modify-write is a compare-and-set on the key's revision, retried on a conflict, so
//! pods need no lock between them: device ids are never handed out twice, a one-time key is
//! claimed once, a link code is taken once.

use std::sync::Arc;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use super::{Inner, NatsStore, subjects};
use crate::store::{
    AccountRecord, Claimed, DeliveryTokenRecord, DeviceRecord, Directory, EpochTaken,
    FallbackKeyRecord, GroupRecord, KeyCount, KeyKind, KeyUpload, KeysPut, LinkCodeRecord,
    PushRecord, Result, StoreError, StoreFuture,
    records::{self, RECORD_VERSION, Versioned},
};

/// An account and its devices: one document, so that adding a device (a fresh id, the limit)
/// is one compare-and-set.
#[derive(Serialize, Deserialize)]
struct AccountDoc {
    version: u8,
    account: AccountRecord,
    devices: Vec<(u32, DeviceRecord)>,
}

/// A device's keys: one document, so that a claim is one compare-and-set.
#[derive(Serialize, Deserialize, Default)]
struct KeysDoc {
    version: u8,
    /// (key id, key), ordered by id.
    one_time: Vec<(u64, serde_bytes::ByteBuf)>,
    fallback: Option<FallbackKeyRecord>,
}

impl Versioned for AccountDoc {
    fn version(&self) -> u8 {
        self.version
    }
}

impl Versioned for KeysDoc {
    fn version(&self) -> u8 {
        self.version
    }
}

/// How often a compare-and-set is retried against concurrent writers before giving up.
const CAS_ATTEMPTS: usize = 32;

/// A key's current value (if it holds one) and revision (if it ever existed).
struct Current {
    value: Option<bytes::Bytes>,
    revision: Option<u64>,
}

async fn current(kv: &kv::Store, key: &str) -> Result<Current> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| StoreError::Io(format!("directory read: {e}")))?;
    Ok(match entry {
        Some(e) if e.operation == kv::Operation::Put => Current {
            value: Some(e.value),
            revision: Some(e.revision),
        },
        Some(e) => Current {
            value: None,
            revision: Some(e.revision),
        },
        None => Current {
            value: None,
            revision: None,
        },
    })
}

/// Whether an error is a lost race: besides "already exists" and "wrong last revision", the
/// client reports the stream's "wrong last sequence" (a create of a deleted key, a delete
/// with a revision) wrapped in other kinds.
fn lost_race(text: &str) -> bool {
    text.contains("wrong last sequence")
}

/// Writes `value` if the key is still at `revision` (or absent, for `None`). `Ok(false)`: a
/// concurrent writer got there first; read again.
async fn cas(
    inner: &Inner,
    kv: &kv::Store,
    key: &str,
    revision: Option<u64>,
    value: Vec<u8>,
) -> Result<bool> {
    let result = match revision {
        None => kv.create(key, value.into()).await.map_err(|e| {
            let text = e.to_string();
            (
                e.kind() == kv::CreateErrorKind::AlreadyExists || lost_race(&text),
                text,
            )
        }),
        Some(r) => kv.update(key, value.into(), r).await.map_err(|e| {
            let text = e.to_string();
            (
                e.kind() == kv::UpdateErrorKind::WrongLastRevision || lost_race(&text),
                text,
            )
        }),
    };
    match result {
        Ok(_) => {
            inner.succeeded();
            Ok(true)
        }
        Err((true, _)) => Ok(false),
        Err((false, e)) => Err(inner.failed("directory write", e)),
    }
}

async fn put(inner: &Inner, kv: &kv::Store, key: &str, value: Vec<u8>) -> Result<()> {
    kv.put(key, value.into())
        .await
        .map_err(|e| inner.failed("directory write", e))?;
    inner.succeeded();
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned + Versioned>(
    v: Option<bytes::Bytes>,
) -> Result<Option<T>> {
    v.map(|v| records::decode(&v)).transpose()
}

fn conflict() -> StoreError {
    StoreError::Io("directory write kept conflicting with other writers".into())
}

impl NatsStore {
    fn user(&self, user: &str) -> String {
        self.inner.names.hashed(user)
    }

    /// Runs `op` on a clone of this store inside a `'static` future.
    fn run<T, F, Fut>(&self, op: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move { op(inner).await })
    }
}

async fn account_doc(inner: &Inner, u: &str) -> Result<(Option<AccountDoc>, Option<u64>)> {
    let c = current(&inner.directory, &subjects::account(u)).await?;
    Ok((decode(c.value)?, c.revision))
}

/// Changes the account document with `change` under compare-and-set; `change` answers what
/// the caller gets, or an error that stops the attempt.
async fn change_account<T>(
    inner: &Inner,
    u: &str,
    mut change: impl FnMut(&mut AccountDoc) -> Result<T>,
) -> Result<T> {
    let key = subjects::account(u);
    for _ in 0..CAS_ATTEMPTS {
        let (doc, revision) = account_doc(inner, u).await?;
        let mut doc = doc.ok_or(StoreError::NotFound)?;
        let answer = change(&mut doc)?;
        if cas(
            inner,
            &inner.directory,
            &key,
            revision,
            records::encode(&doc),
        )
        .await?
        {
            return Ok(answer);
        }
    }
    Err(conflict())
}

async fn keys_doc(inner: &Inner, key: &str) -> Result<(KeysDoc, Option<u64>)> {
    let c = current(&inner.directory, key).await?;
    let doc = decode(c.value)?.unwrap_or(KeysDoc {
        version: RECORD_VERSION,
        ..Default::default()
    });
    Ok((doc, c.revision))
}

/// What a change of a document decided: write it and answer, or answer without writing.
enum Change<T> {
    Write(T),
    Keep(T),
}

/// Changes a device's keys document with `change` under compare-and-set.
async fn change_keys<T>(
    inner: &Inner,
    key: &str,
    mut change: impl FnMut(&mut KeysDoc) -> Change<T>,
) -> Result<T> {
    for _ in 0..CAS_ATTEMPTS {
        let (mut doc, revision) = keys_doc(inner, key).await?;
        match change(&mut doc) {
            Change::Keep(answer) => return Ok(answer),
            Change::Write(answer) => {
                let encoded = records::encode(&doc);
                if cas(inner, &inner.directory, key, revision, encoded).await? {
                    return Ok(answer);
                }
            }
        }
    }
    Err(conflict())
}

impl Directory for NatsStore {
    fn account(&self, user: &str) -> StoreFuture<Option<AccountRecord>> {
        let u = self.user(user);
        self.run(
            move |inner| async move { Ok(account_doc(&inner, &u).await?.0.map(|d| d.account)) },
        )
    }

    fn create_account(&self, user: &str, created_ms: u64, first: DeviceRecord) -> StoreFuture<u32> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let doc = AccountDoc {
                version: RECORD_VERSION,
                account: AccountRecord {
                    version: RECORD_VERSION,
                    created_ms,
                    next_device: 2,
                },
                devices: vec![(1, first)],
            };
            let key = subjects::account(&u);
            let c = current(&inner.directory, &key).await?;
            if c.value.is_some() {
                return Err(StoreError::AccountExists);
            }
            // Of two pods creating the same account, one wins the compare-and-set.
            if cas(
                &inner,
                &inner.directory,
                &key,
                c.revision,
                records::encode(&doc),
            )
            .await?
            {
                Ok(1)
            } else {
                Err(StoreError::AccountExists)
            }
        })
    }

    fn add_device(&self, user: &str, device: DeviceRecord, max_devices: usize) -> StoreFuture<u32> {
        let u = self.user(user);
        self.run(move |inner| async move {
            change_account(&inner, &u, |doc| {
                if doc.devices.len() >= max_devices {
                    return Err(StoreError::TooManyDevices);
                }
                let id = doc.account.next_device;
                doc.account.next_device = id.checked_add(1).ok_or(StoreError::TooManyDevices)?;
                doc.devices.push((id, device.clone()));
                Ok(id)
            })
            .await
        })
    }

    fn remove_device(&self, user: &str, device: u32) -> StoreFuture<()> {
        let u = self.user(user);
        self.run(move |inner| async move {
            change_account(&inner, &u, |doc| {
                let before = doc.devices.len();
                doc.devices.retain(|(id, _)| *id != device);
                if doc.devices.len() == before {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            })
            .await?;
            for kind in [KeyKind::Olm, KeyKind::Mls] {
                inner
                    .directory
                    .purge(subjects::keys(&u, device, kind))
                    .await
                    .map_err(|e| inner.failed("directory write", e))?;
            }
            inner
                .directory
                .purge(subjects::push(&u, device))
                .await
                .map_err(|e| inner.failed("directory write", e))?;
            Ok(())
        })
    }

    fn device(&self, user: &str, device: u32) -> StoreFuture<Option<DeviceRecord>> {
        let u = self.user(user);
        self.run(move |inner| async move {
            Ok(account_doc(&inner, &u).await?.0.and_then(|d| {
                d.devices
                    .into_iter()
                    .find(|(id, _)| *id == device)
                    .map(|(_, r)| r)
            }))
        })
    }

    fn devices(&self, user: &str) -> StoreFuture<Vec<(u32, DeviceRecord)>> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let mut devices = account_doc(&inner, &u)
                .await?
                .0
                .map(|d| d.devices)
                .unwrap_or_default();
            devices.sort_by_key(|(id, _)| *id);
            Ok(devices)
        })
    }

    fn put_keys(
        &self,
        user: &str,
        device: u32,
        kind: KeyKind,
        upload: KeyUpload,
    ) -> StoreFuture<KeysPut> {
        let u = self.user(user);
        self.run(move |inner| async move {
            change_keys(&inner, &subjects::keys(&u, device, kind), |doc| {
                // Keys re-uploaded under ids already held (a retry) replace them and do not
                // count twice.
                for (id, k) in &upload.one_time {
                    let k = serde_bytes::ByteBuf::from(k.clone());
                    match doc.one_time.binary_search_by_key(id, |(i, _)| *i) {
                        Ok(at) => doc.one_time[at].1 = k,
                        Err(at) => doc.one_time.insert(at, (*id, k)),
                    }
                }
                let held = doc.one_time.len() as u64;
                if held > upload.max_held {
                    return Change::Keep(KeysPut::OverLimit);
                }
                if let Some(fallback) = &upload.fallback {
                    doc.fallback = Some(fallback.clone());
                }
                Change::Write(KeysPut::Held(held))
            })
            .await
        })
    }

    fn key_count(&self, user: &str, device: u32, kind: KeyKind) -> StoreFuture<KeyCount> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let (doc, _) = keys_doc(&inner, &subjects::keys(&u, device, kind)).await?;
            Ok(KeyCount {
                one_time: doc.one_time.len() as u64,
                fallback: doc.fallback.is_some(),
            })
        })
    }

    fn claim_key(&self, user: &str, device: u32, kind: KeyKind) -> StoreFuture<Option<Claimed>> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let exists = account_doc(&inner, &u)
                .await?
                .0
                .is_some_and(|d| d.devices.iter().any(|(id, _)| *id == device));
            if !exists {
                return Ok(None);
            }
            change_keys(&inner, &subjects::keys(&u, device, kind), |doc| {
                if doc.one_time.is_empty() {
                    return Change::Keep(doc.fallback.clone().map(|f| Claimed {
                        key_id: f.key_id,
                        key: f.key,
                        fallback: true,
                        left: 0,
                    }));
                }
                let (key_id, claimed) = doc.one_time.remove(0);
                Change::Write(Some(Claimed {
                    key_id,
                    key: claimed.into_vec(),
                    fallback: false,
                    left: doc.one_time.len() as u64,
                }))
            })
            .await
        })
    }

    fn push_subscription(&self, user: &str, device: u32) -> StoreFuture<Option<PushRecord>> {
        let u = self.user(user);
        self.run(move |inner| async move {
            decode(
                current(&inner.directory, &subjects::push(&u, device))
                    .await?
                    .value,
            )
        })
    }

    fn set_push_subscription(
        &self,
        user: &str,
        device: u32,
        record: Option<PushRecord>,
    ) -> StoreFuture<()> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let key = subjects::push(&u, device);
            match record {
                Some(record) => put(&inner, &inner.directory, &key, records::encode(&record)).await,
                None => {
                    inner
                        .directory
                        .purge(key)
                        .await
                        .map_err(|e| inner.failed("directory write", e))?;
                    inner.succeeded();
                    Ok(())
                }
            }
        })
    }

    fn device_list(&self, user: &str) -> StoreFuture<Option<Vec<u8>>> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let c = current(&inner.directory, &subjects::device_list(&u)).await?;
            Ok(c.value.map(|v| v.to_vec()))
        })
    }

    fn set_device_list(&self, user: &str, signed: Vec<u8>) -> StoreFuture<()> {
        let u = self.user(user);
        self.run(move |inner| async move {
            put(&inner, &inner.directory, &subjects::device_list(&u), signed).await
        })
    }

    fn delivery_token(&self, user: &str) -> StoreFuture<Option<DeliveryTokenRecord>> {
        let u = self.user(user);
        self.run(move |inner| async move {
            decode(
                current(&inner.directory, &subjects::delivery_token(&u))
                    .await?
                    .value,
            )
        })
    }

    fn set_delivery_token(&self, user: &str, record: DeliveryTokenRecord) -> StoreFuture<()> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let key = subjects::delivery_token(&u);
            put(&inner, &inner.directory, &key, records::encode(&record)).await
        })
    }

    fn put_link_code(
        &self,
        user: &str,
        code_hash: [u8; 32],
        record: LinkCodeRecord,
    ) -> StoreFuture<()> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let key = subjects::link_code(&u, &code_hash);
            put(&inner, &inner.link_codes, &key, records::encode(&record)).await
        })
    }

    fn spend_ticket(&self, nonce: [u8; 16], _until_ms: u64) -> StoreFuture<Option<bool>> {
        // The bucket forgets entries after two minutes, past any ticket's validity.
        self.run(move |inner| async move {
            let key = format!("n.{}", subjects::hex(&nonce));
            match inner.tickets.create(&key, "1".into()).await {
                Ok(_) => Ok(Some(true)),
                Err(e)
                    if e.kind() == kv::CreateErrorKind::AlreadyExists
                        || lost_race(&e.to_string()) =>
                {
                    Ok(Some(false))
                }
                Err(e) => Err(inner.failed("ticket", e)),
            }
        })
    }

    fn take_epoch(
        &self,
        group: &[u8],
        epoch: u64,
        id: [u8; 16],
        now_ms: u64,
    ) -> StoreFuture<EpochTaken> {
        let key = subjects::group(group);
        self.run(move |inner| async move {
            // Of two pods taking the same epoch, one wins the compare-and-set; the other
            // reads the winner's record and is answered from it.
            for _ in 0..CAS_ATTEMPTS {
                let c = current(&inner.directory, &key).await?;
                let stored: Option<GroupRecord> = decode(c.value)?;
                let (answer, write) = GroupRecord::take(stored.as_ref(), epoch, id, now_ms);
                let Some(record) = write else {
                    return Ok(answer);
                };
                if cas(
                    &inner,
                    &inner.directory,
                    &key,
                    c.revision,
                    records::encode(&record),
                )
                .await?
                {
                    return Ok(answer);
                }
            }
            Err(conflict())
        })
    }

    fn take_link_code(&self, user: &str, code_hash: [u8; 32], now_ms: u64) -> StoreFuture<bool> {
        let u = self.user(user);
        self.run(move |inner| async move {
            let key = subjects::link_code(&u, &code_hash);
            let c = current(&inner.link_codes, &key).await?;
            let (Some(value), Some(revision)) = (c.value, c.revision) else {
                return Ok(false);
            };
            let record: LinkCodeRecord = records::decode(&value)?;
            // Taken once: of two pods taking the same code, one deletes this revision.
            match inner
                .link_codes
                .delete_expect_revision(&key, Some(revision))
                .await
            {
                Ok(()) => Ok(record.expires_ms > now_ms),
                Err(e)
                    if e.kind() == kv::DeleteErrorKind::WrongLastRevision
                        || lost_race(&e.to_string()) =>
                {
                    Ok(false)
                }
                Err(e) => Err(inner.failed("directory write", e)),
            }
        })
    }
}
