//! [`Directory`] on tree `accounts`. Reads and writes run inline (sled is fast and local);
//! writes answer once the group commit that covers them is done.

use super::{Inner, SledStore, by_device};
use crate::store::{
    AccountRecord, Claimed, DeliveryTokenRecord, DeviceRecord, Directory, EpochTaken,
    FallbackKeyRecord, GroupRecord, KeyCount, KeyKind, KeyUpload, KeysPut, LinkCodeRecord,
    PushRecord, Result, StoreError, StoreFuture, keys, ready,
    records::{self, RECORD_VERSION},
};

impl Inner {
    fn account(&self, user: &str) -> Result<Option<AccountRecord>> {
        self.accounts
            .get(keys::account(user))?
            .map(|v| records::decode(&v))
            .transpose()
    }

    pub(super) fn devices(&self, user: &str) -> Result<Vec<(u32, DeviceRecord)>> {
        by_device(&self.accounts, &keys::device_prefix(user))
    }

    fn key_count(&self, user: &str, device: u32, kind: KeyKind) -> Result<KeyCount> {
        let one_time = self
            .accounts
            .scan_prefix(keys::one_time_key_prefix(kind, user, device))
            .count() as u64;
        let fallback = self
            .accounts
            .contains_key(keys::fallback_key(kind, user, device))?;
        Ok(KeyCount { one_time, fallback })
    }

    fn create_account(&self, user: &str, created_ms: u64, first: DeviceRecord) -> Result<u32> {
        let _guard = self.lock();
        if self.accounts.contains_key(keys::account(user))? {
            return Err(StoreError::AccountExists);
        }
        let account = AccountRecord {
            version: RECORD_VERSION,
            created_ms,
            next_device: 2,
        };
        // Device first: an account record always has its first device, even after a crash
        // between the two writes (a device record without an account is overwritten when the
        // handle registers again).
        self.accounts
            .insert(keys::device(user, 1), records::encode(&first))?;
        self.accounts
            .insert(keys::account(user), records::encode(&account))?;
        Ok(1)
    }

    fn add_device(&self, user: &str, device: DeviceRecord, max_devices: usize) -> Result<u32> {
        let _guard = self.lock();
        let mut account = self.account(user)?.ok_or(StoreError::NotFound)?;
        if self.accounts.scan_prefix(keys::device_prefix(user)).count() >= max_devices {
            return Err(StoreError::TooManyDevices);
        }
        let id = account.next_device;
        account.next_device = id.checked_add(1).ok_or(StoreError::TooManyDevices)?;
        // Counter first: a crash in between skips an id, never reuses one.
        self.accounts
            .insert(keys::account(user), records::encode(&account))?;
        self.accounts
            .insert(keys::device(user, id), records::encode(&device))?;
        Ok(id)
    }

    fn remove_device(&self, user: &str, device: u32) -> Result<()> {
        let _guard = self.lock();
        if self.accounts.remove(keys::device(user, device))?.is_none() {
            return Err(StoreError::NotFound);
        }
        for kind in [KeyKind::Olm, KeyKind::Mls] {
            for kv in self
                .accounts
                .scan_prefix(keys::one_time_key_prefix(kind, user, device))
            {
                self.accounts.remove(kv?.0)?;
            }
            self.accounts
                .remove(keys::fallback_key(kind, user, device))?;
        }
        self.accounts.remove(keys::push(user, device))?;
        Ok(())
    }

    fn put_keys(
        &self,
        user: &str,
        device: u32,
        kind: KeyKind,
        upload: KeyUpload,
    ) -> Result<KeysPut> {
        let _guard = self.lock();
        // Keys re-uploaded under ids already held (a retry) replace them and do not count
        // twice.
        let held = self.key_count(user, device, kind)?.one_time;
        let mut added = 0u64;
        for (id, _) in &upload.one_time {
            if !self
                .accounts
                .contains_key(keys::one_time_key(kind, user, device, *id))?
            {
                added += 1;
            }
        }
        if held + added > upload.max_held {
            return Ok(KeysPut::OverLimit);
        }
        if let Some(fallback) = &upload.fallback {
            self.accounts.insert(
                keys::fallback_key(kind, user, device),
                records::encode(fallback),
            )?;
        }
        for (id, key) in upload.one_time {
            self.accounts
                .insert(keys::one_time_key(kind, user, device, id), key)?;
        }
        Ok(KeysPut::Held(held + added))
    }

    /// Takes the lowest one-time key, or answers the fallback key; and whether a key was
    /// consumed (then the caller waits for durability, or it could be handed out twice).
    fn claim_key(&self, user: &str, device: u32, kind: KeyKind) -> Result<(Option<Claimed>, bool)> {
        let _guard = self.lock();
        if !self.accounts.contains_key(keys::device(user, device))? {
            return Ok((None, false));
        }
        let prefix = keys::one_time_key_prefix(kind, user, device);
        if let Some(kv) = self.accounts.scan_prefix(&prefix).next() {
            let (k, v) = kv?;
            let key_id = keys::envelope_seq(&k)
                .ok_or_else(|| StoreError::Corruption("bad key id".into()))?;
            self.accounts.remove(&k)?;
            let left = self.key_count(user, device, kind)?.one_time;
            let claimed = Claimed {
                key_id,
                key: v.to_vec(),
                fallback: false,
                left,
            };
            return Ok((Some(claimed), true));
        }
        let fallback: Option<FallbackKeyRecord> = self
            .accounts
            .get(keys::fallback_key(kind, user, device))?
            .map(|v| records::decode(&v))
            .transpose()?;
        Ok((
            fallback.map(|f| Claimed {
                key_id: f.key_id,
                key: f.key,
                fallback: true,
                left: 0,
            }),
            false,
        ))
    }

    fn take_epoch(
        &self,
        group: &[u8],
        epoch: u64,
        id: [u8; 16],
        now_ms: u64,
    ) -> Result<(EpochTaken, bool)> {
        let _guard = self.lock();
        let key = keys::group(group);
        let stored: Option<GroupRecord> = self
            .accounts
            .get(&key)?
            .map(|v| records::decode(&v))
            .transpose()?;
        let (answer, write) = GroupRecord::take(stored.as_ref(), epoch, id, now_ms);
        if let Some(record) = &write {
            self.accounts.insert(key, records::encode(record))?;
        }
        Ok((answer, write.is_some()))
    }

    fn take_link_code(&self, user: &str, code_hash: &[u8; 32], now_ms: u64) -> Result<bool> {
        let _guard = self.lock();
        let Some(v) = self.accounts.remove(keys::link_code(user, code_hash))? else {
            return Ok(false);
        };
        let record: LinkCodeRecord = records::decode(&v)?;
        Ok(record.expires_ms > now_ms)
    }
}

impl Directory for SledStore {
    fn account(&self, user: &str) -> StoreFuture<Option<AccountRecord>> {
        ready(self.inner().account(user))
    }

    fn create_account(&self, user: &str, created_ms: u64, first: DeviceRecord) -> StoreFuture<u32> {
        self.inner()
            .durably(|| self.inner().create_account(user, created_ms, first))
    }

    fn add_device(&self, user: &str, device: DeviceRecord, max_devices: usize) -> StoreFuture<u32> {
        self.inner()
            .durably(|| self.inner().add_device(user, device, max_devices))
    }

    fn remove_device(&self, user: &str, device: u32) -> StoreFuture<()> {
        self.inner()
            .durably(|| self.inner().remove_device(user, device))
    }

    fn device(&self, user: &str, device: u32) -> StoreFuture<Option<DeviceRecord>> {
        ready((|| {
            self.inner()
                .accounts
                .get(keys::device(user, device))?
                .map(|v| records::decode(&v))
                .transpose()
        })())
    }

    fn devices(&self, user: &str) -> StoreFuture<Vec<(u32, DeviceRecord)>> {
        ready(self.inner().devices(user))
    }

    fn put_keys(
        &self,
        user: &str,
        device: u32,
        kind: KeyKind,
        upload: KeyUpload,
    ) -> StoreFuture<KeysPut> {
        match self.inner().put_keys(user, device, kind, upload) {
            Ok(KeysPut::OverLimit) => ready(Ok(KeysPut::OverLimit)),
            result => self.inner().durably(|| result),
        }
    }

    fn key_count(&self, user: &str, device: u32, kind: KeyKind) -> StoreFuture<KeyCount> {
        ready(self.inner().key_count(user, device, kind))
    }

    fn claim_key(&self, user: &str, device: u32, kind: KeyKind) -> StoreFuture<Option<Claimed>> {
        match self.inner().claim_key(user, device, kind) {
            Ok((claimed, true)) => self.inner().durably(|| Ok(claimed)),
            Ok((claimed, false)) => ready(Ok(claimed)),
            Err(e) => ready(Err(e)),
        }
    }

    fn take_epoch(
        &self,
        group: &[u8],
        epoch: u64,
        id: [u8; 16],
        now_ms: u64,
    ) -> StoreFuture<EpochTaken> {
        match self.inner().take_epoch(group, epoch, id, now_ms) {
            Ok((answer, true)) => self.inner().durably(|| Ok(answer)),
            // A retry of the winner: answered once its record is durable, like the first.
            Ok((EpochTaken::Taken, false)) => self.inner().durably(|| Ok(EpochTaken::Taken)),
            Ok((answer, false)) => ready(Ok(answer)),
            Err(e) => ready(Err(e)),
        }
    }

    fn device_list(&self, user: &str) -> StoreFuture<Option<Vec<u8>>> {
        ready((|| {
            Ok(self
                .inner()
                .accounts
                .get(keys::device_list(user))?
                .map(|v| v.to_vec()))
        })())
    }

    fn set_device_list(&self, user: &str, signed: Vec<u8>) -> StoreFuture<()> {
        self.inner().durably(|| {
            self.inner()
                .accounts
                .insert(keys::device_list(user), signed)?;
            Ok(())
        })
    }

    fn push_subscription(&self, user: &str, device: u32) -> StoreFuture<Option<PushRecord>> {
        ready((|| {
            self.inner()
                .accounts
                .get(keys::push(user, device))?
                .map(|v| records::decode(&v))
                .transpose()
        })())
    }

    fn set_push_subscription(
        &self,
        user: &str,
        device: u32,
        record: Option<PushRecord>,
    ) -> StoreFuture<()> {
        self.inner().durably(|| {
            let key = keys::push(user, device);
            match &record {
                Some(record) => {
                    self.inner().accounts.insert(key, records::encode(record))?;
                }
                None => {
                    self.inner().accounts.remove(key)?;
                }
            }
            Ok(())
        })
    }

    fn delivery_token(&self, user: &str) -> StoreFuture<Option<DeliveryTokenRecord>> {
        ready((|| {
            self.inner()
                .accounts
                .get(keys::delivery_token(user))?
                .map(|v| records::decode(&v))
                .transpose()
        })())
    }

    fn set_delivery_token(&self, user: &str, record: DeliveryTokenRecord) -> StoreFuture<()> {
        self.inner().durably(|| {
            self.inner()
                .accounts
                .insert(keys::delivery_token(user), records::encode(&record))?;
            Ok(())
        })
    }

    fn put_link_code(
        &self,
        user: &str,
        code_hash: [u8; 32],
        record: LinkCodeRecord,
    ) -> StoreFuture<()> {
        self.inner().durably(|| {
            self.inner()
                .accounts
                .insert(keys::link_code(user, &code_hash), records::encode(&record))?;
            Ok(())
        })
    }

    fn take_link_code(&self, user: &str, code_hash: [u8; 32], now_ms: u64) -> StoreFuture<bool> {
        self.inner()
            .durably(|| self.inner().take_link_code(user, &code_hash, now_ms))
    }
}
