//! Verified device lists: contacts' (trust on first use of the master key, rollback checks,
//! changed keys), this account's own (signed here), and safety numbers.
//!
//! A list is only ever used after it verified against the pinned master key; the engine caches
//! the verified list with the time it was fetched, and [`Engine::fresh_list`] says when to ask
//! the broker again.

use std::collections::BTreeSet;

use serde_bytes::ByteBuf;

use super::{
    Engine,
    events::{DeviceInfo, Event},
    record::CachedList,
};
use crate::{
    crypto::{
        DeviceList, DeviceListError, MasterKey, PublicDeviceKeys, SafetyNumber, SignedDeviceList,
        safety_number,
    },
    error::ClientError,
};

/// A device as the broker lists it (`GET /v1/accounts/{h}/devices`): unsigned, so only ever
/// trusted for a link request or for display.
#[derive(Debug, Clone)]
pub struct BrokerDevice {
    /// The device id.
    pub device: u32,
    /// Its `PublicDeviceKeys` encoding.
    pub identity_keys: Vec<u8>,
}

/// A new master key and this account's list signed by it, not yet published
/// ([`Engine::prepare_master_rotation`]).
pub struct MasterRotation {
    master: MasterKey,
    list: DeviceList,
    /// The list signed by the new key: publish it, then
    /// [`Engine::finish_master_rotation`].
    pub signed: SignedDeviceList,
}

/// A contact's master key that changed and that the user has not accepted yet
/// ([`Engine::key_change`]): what to show them instead of "verified".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The safety number under the pinned (old) master key: the one the user may have
    /// compared before.
    pub old_safety_number: SafetyNumber,
    /// The safety number under the new master key: the one to compare now.
    pub new_safety_number: SafetyNumber,
    /// The new master key, for [`Engine::accept_master_key_change`] once the user compared.
    pub new_master_key: [u8; 32],
    /// Whether the user had verified the old safety number.
    pub was_verified: bool,
}

pub(crate) fn cached(list: &DeviceList, now_ms: u64) -> CachedList {
    CachedList {
        version: list.version,
        devices: list
            .devices
            .iter()
            .map(|(id, keys)| (*id, ByteBuf::from(keys.to_bytes().to_vec())))
            .collect(),
        master_key: ByteBuf::from(list.master_key.to_vec()),
        fetched_ms: now_ms,
    }
}

pub(crate) fn uncached(user: &str, c: &CachedList) -> Option<DeviceList> {
    Some(DeviceList {
        user: user.to_owned(),
        version: c.version,
        devices: c
            .devices
            .iter()
            .map(|(id, keys)| PublicDeviceKeys::from_bytes(keys).ok().map(|k| (*id, k)))
            .collect::<Option<_>>()?,
        master_key: c.master_key.as_slice().try_into().ok()?,
    })
}

fn decode_signed(user: &str, signed: &[u8]) -> Result<SignedDeviceList, ClientError> {
    SignedDeviceList::from_bytes(signed).map_err(|error| ClientError::DeviceList {
        user: user.to_owned(),
        error,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Engine {
    /// `user`'s verified list if it is cached and was fetched less than the maximum age ago;
    /// `None`: fetch it and give it to [`Engine::accept_device_list`].
    pub fn fresh_list(&self, user: &str, now_ms: u64) -> Option<DeviceList> {
        let c = self.record.lists.get(user)?;
        if now_ms.saturating_sub(c.fetched_ms) >= self.list_max_age_ms {
            return None;
        }
        uncached(user, c)
    }

    /// `user`'s verified list as last accepted, whatever its age, and when it was fetched.
    pub fn known_list(&self, user: &str) -> Option<(DeviceList, u64)> {
        let c = self.record.lists.get(user)?;
        Some((uncached(user, c)?, c.fetched_ms))
    }

    /// The devices of `user`'s verified list (empty if there is none).
    pub(crate) fn listed_devices(&self, user: &str) -> Vec<u32> {
        self.record
            .lists
            .get(user)
            .map(|c| c.devices.iter().map(|(d, _)| *d).collect())
            .unwrap_or_default()
    }

    /// The verified keys of `user`'s `device`, from the cached list.
    pub(crate) fn listed_keys(&self, user: &str, device: u32) -> Option<PublicDeviceKeys> {
        self.record
            .lists
            .get(user)?
            .devices
            .iter()
            .find(|(d, _)| *d == device)
            .and_then(|(_, k)| PublicDeviceKeys::from_bytes(k).ok())
    }

    /// Verifies `user`'s signed device list as the broker served it (the decoded `signed`
    /// field of `GET …/device-list`) against the pinned master key (pinning it if this is the
    /// first), its signature and version rollback, and caches it. Sessions with devices that
    /// left the list are dropped.
    ///
    /// A list signed by another master key than the pinned one is
    /// [`ClientError::MasterKeyChanged`]: nothing may be sent to or accepted from `user`
    /// until the user accepts the new key ([`Engine::accept_master_key_change`]).
    pub fn accept_device_list(
        &mut self,
        user: &str,
        signed: &[u8],
        now_ms: u64,
    ) -> Result<DeviceList, ClientError> {
        let signed = decode_signed(user, signed)?;
        let list = match self.state.pins.verify_device_list(user, &signed) {
            Ok(list) => list,
            Err(DeviceListError::MasterKeyMismatch { got, .. }) => {
                let pending = &mut self
                    .record
                    .contacts
                    .entry(user.to_owned())
                    .or_default()
                    .pending_master_key;
                let new_change = pending.as_ref().is_none_or(|p| p.as_slice() != got);
                *pending = Some(ByteBuf::from(got.to_vec()));
                if new_change {
                    self.note_group_key_change(user);
                }
                return Err(ClientError::MasterKeyChanged {
                    user: user.to_owned(),
                    new_safety_number: self.safety_number_for(user, &got),
                    new_master_key: got,
                });
            }
            Err(error) => {
                return Err(ClientError::DeviceList {
                    user: user.to_owned(),
                    error,
                });
            }
        };
        if let Some(old) = self.record.lists.get(user) {
            for (id, _) in &old.devices {
                if list.device(*id).is_none() {
                    self.state.sessions.forget(user, *id);
                }
            }
        }
        self.record
            .lists
            .insert(user.to_owned(), cached(&list, now_ms));
        // Under the pinned key again: no change is pending (any more).
        if let Some(c) = self.record.contacts.get_mut(user) {
            c.pending_master_key = None;
        }
        // Devices reported as unlisted that the list now vouches for: done with.
        if let Some(reported) = self.record.reported_unlisted.get_mut(user) {
            reported.retain(|d| list.device(*d).is_none());
            if reported.is_empty() {
                self.record.reported_unlisted.remove(user);
            }
        }
        Ok(list)
    }

    /// A send to `user` addresses `devices` that its verified list does not contain (they get
    /// placeholders): those not reported before become one [`Event::UnlistedDevices`] for
    /// [`Engine::take_notices`]. This device itself (in a send to our own account) is not one.
    pub(crate) fn note_unlisted(&mut self, user: &str, devices: &[u32]) {
        let own_account = user == self.state.user();
        let me = self.state.device_id();
        let reported = self
            .record
            .reported_unlisted
            .entry(user.to_owned())
            .or_default();
        let new: Vec<u32> = devices
            .iter()
            .copied()
            .filter(|d| !(own_account && *d == me))
            .filter(|d| reported.insert(*d))
            .collect();
        if reported.is_empty() {
            self.record.reported_unlisted.remove(user);
        }
        if !new.is_empty() {
            self.notices.push(Event::UnlistedDevices {
                user: user.to_owned(),
                devices: new,
                own_account,
            });
        }
    }

    /// What sending found that the user should be told ([`Event::UnlistedDevices`]), oldest
    /// first, each once. Drivers show these after a send (and the SDK's `next_event` returns
    /// them first). Save the state after taking them: that they were reported is persisted,
    /// so a device is reported once, not on every send.
    pub fn take_notices(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.notices)
    }

    /// `with`'s master key changed (a list signed by another key than the pinned one was
    /// seen) and the user has not accepted the new key: the old and new safety numbers.
    /// `None` if no change is pending.
    pub fn key_change(&self, with: &str) -> Option<KeyChange> {
        let contact = self.record.contacts.get(with)?;
        let new: [u8; 32] = contact
            .pending_master_key
            .as_ref()?
            .as_slice()
            .try_into()
            .ok()?;
        let old = self.state.pins.pinned(with)?;
        Some(KeyChange {
            old_safety_number: self.safety_number_for(with, &old),
            new_safety_number: self.safety_number_for(with, &new),
            new_master_key: new,
            was_verified: contact.verified,
        })
    }

    /// Drops the cached list of `user`: it is fetched again on next use.
    pub fn forget_list(&mut self, user: &str) {
        self.record.lists.remove(user);
    }

    /// Checks `user`'s signed list against nothing but its own signature, and returns its
    /// master key and the safety number it gives: for showing the user a changed key before
    /// [`Engine::accept_master_key_change`].
    pub fn inspect_device_list(
        &self,
        user: &str,
        signed: &[u8],
    ) -> Result<([u8; 32], SafetyNumber), ClientError> {
        let list = decode_signed(user, signed)?
            .verify(user, None, None)
            .map_err(|error| ClientError::DeviceList {
                user: user.to_owned(),
                error,
            })?;
        Ok((
            list.master_key,
            self.safety_number_for(user, &list.master_key),
        ))
    }

    /// The safety number with `with` if its master key were `master_key`.
    pub fn safety_number_for(&self, with: &str, master_key: &[u8; 32]) -> SafetyNumber {
        safety_number(
            self.state.user(),
            &self.state.master_key.public_key(),
            with,
            master_key,
        )
    }

    /// The safety number with `with`, whose verified list this device holds.
    pub fn safety_number(&self, with: &str) -> Result<SafetyNumber, ClientError> {
        let (list, _) = self
            .known_list(with)
            .ok_or_else(|| ClientError::ListNotVerified(with.to_owned()))?;
        Ok(self.safety_number_for(with, &list.master_key))
    }

    /// The user compared the safety number with `with` and it matched.
    pub fn mark_verified(&mut self, with: &str) {
        self.record
            .contacts
            .entry(with.to_owned())
            .or_default()
            .verified = true;
    }

    /// Whether the user verified `with`'s current master key (not while a changed key is
    /// pending: the number they compared is no longer `with`'s).
    pub fn is_verified(&self, with: &str) -> bool {
        self.record
            .contacts
            .get(with)
            .is_some_and(|c| c.verified && c.pending_master_key.is_none())
    }

    /// Accepts `with`'s new master key after [`ClientError::MasterKeyChanged`] (only once the
    /// user compared the new safety number). The contact is no longer marked verified; its
    /// list is fetched again on next use.
    pub fn accept_master_key_change(&mut self, with: &str, new_master_key: &[u8; 32]) {
        self.state.pins.accept_change(with, new_master_key);
        self.record.lists.remove(with);
        if let Some(c) = self.record.contacts.get_mut(with) {
            c.verified = false;
            c.pending_master_key = None;
        }
        // Sessions stay: each is bound to a device identity key and is used only with a device
        // the verified list (now under the new key) gives that key. Dropping them would make
        // the contact's next messages on them undecryptable.
    }

    fn sign_own(
        &self,
        list: &DeviceList,
        key: &MasterKey,
    ) -> Result<SignedDeviceList, ClientError> {
        list.sign(key).map_err(|error| ClientError::DeviceList {
            user: self.state.user().to_owned(),
            error,
        })
    }

    /// The first list of a new account: this device alone, version 1. Publish it, then
    /// [`Engine::confirm_own_list`].
    pub fn first_own_list(&self) -> Result<SignedDeviceList, ClientError> {
        let list = DeviceList {
            user: self.state.user().to_owned(),
            version: 1,
            devices: vec![(self.state.device_id(), self.state.device.public_keys())],
            master_key: self.state.master_key.public_key(),
        };
        self.sign_own(&list, &self.state.master_key)
    }

    /// This account's cached list with `change` applied, signed as the next version; `None`
    /// if the change changes nothing. Publish it, then [`Engine::confirm_own_list`].
    pub(crate) fn own_list_changed(
        &self,
        change: impl FnOnce(&mut Vec<(u32, PublicDeviceKeys)>),
    ) -> Result<Option<SignedDeviceList>, ClientError> {
        let own = self.state.user();
        let (mut list, _) = self
            .known_list(own)
            .ok_or_else(|| ClientError::ListNotVerified(own.to_owned()))?;
        let before = list.devices.clone();
        change(&mut list.devices);
        if list.devices == before {
            return Ok(None);
        }
        list.devices.sort_by_key(|(d, _)| *d);
        list.version += 1;
        list.master_key = self.state.master_key.public_key();
        self.sign_own(&list, &self.state.master_key).map(Some)
    }

    /// This account's list without `device`, to publish before removing it at the broker
    /// (then [`Engine::forget_own_device`]); `None` if the list does not have it.
    pub fn own_list_without(&self, device: u32) -> Result<Option<SignedDeviceList>, ClientError> {
        self.check_removable(device)?;
        self.own_list_changed(|devices| devices.retain(|(d, _)| *d != device))
    }

    /// Whether `device` may be removed from this account by this device: any but itself.
    pub fn check_removable(&self, device: u32) -> Result<(), ClientError> {
        if device == self.state.device_id() {
            return Err(ClientError::Invalid(
                "a device cannot remove itself; remove it from another device".into(),
            ));
        }
        Ok(())
    }

    /// `device` of this account was removed: drops the sessions with it.
    pub fn forget_own_device(&mut self, device: u32) {
        let own = self.state.user().to_owned();
        self.state.sessions.forget(&own, device);
    }

    /// Records our own list (one this engine signed) as published, once the broker stored
    /// it: its version is pinned only then, so a refused publication leaves the broker's list
    /// and ours in agreement.
    pub fn confirm_own_list(&mut self, signed: &[u8], now_ms: u64) -> Result<(), ClientError> {
        let own = self.state.user().to_owned();
        self.accept_device_list(&own, signed, now_ms).map(drop)
    }

    /// A new master key and this account's list signed by it (after a suspected compromise).
    /// Only for single-device accounts: other devices would not learn the new key.
    pub fn prepare_master_rotation(&self) -> Result<MasterRotation, ClientError> {
        let own = self.state.user();
        let (list, _) = self
            .known_list(own)
            .ok_or_else(|| ClientError::ListNotVerified(own.to_owned()))?;
        if list.devices.len() > 1 {
            return Err(ClientError::Invalid(
                "remove the other devices before rotating the master key".into(),
            ));
        }
        let master = MasterKey::generate();
        let list = DeviceList {
            user: own.to_owned(),
            version: 1,
            devices: list.devices,
            master_key: master.public_key(),
        };
        let signed = self.sign_own(&list, &master)?;
        Ok(MasterRotation {
            master,
            list,
            signed,
        })
    }

    /// The rotated list is published: this device switches to the new master key.
    pub fn finish_master_rotation(
        &mut self,
        rotation: MasterRotation,
        now_ms: u64,
    ) -> Result<(), ClientError> {
        let own = self.state.user().to_owned();
        let old = self.state.master_key.public_key();
        self.record.own_masters.push(ByteBuf::from(old.to_vec()));
        self.state.master_key = rotation.master;
        self.state
            .pins
            .accept_change(&own, &rotation.list.master_key);
        self.confirm_own_list(&rotation.signed.to_bytes(), now_ms)
    }

    /// This account's devices: its verified list (as cached), plus devices the broker has
    /// that the list does not vouch for.
    pub fn devices(&self, broker: &[BrokerDevice]) -> Vec<DeviceInfo> {
        let me = self.state.device_id();
        let listed = self
            .known_list(self.state.user())
            .map(|(l, _)| l.devices)
            .unwrap_or_default();
        let mut out: Vec<DeviceInfo> = listed
            .iter()
            .map(|(d, keys)| DeviceInfo {
                device: *d,
                this_device: *d == me,
                signed: true,
                fingerprint: hex(&keys.ed25519),
            })
            .collect();
        let signed: BTreeSet<u32> = out.iter().map(|d| d.device).collect();
        for d in broker {
            if !signed.contains(&d.device) {
                out.push(DeviceInfo {
                    device: d.device,
                    this_device: d.device == me,
                    signed: false,
                    fingerprint: PublicDeviceKeys::from_bytes(&d.identity_keys)
                        .map_or_else(|_| "?".into(), |k| hex(&k.ed25519)),
                });
            }
        }
        out.sort_by_key(|d| d.device);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DeviceKeys;

    #[test]
    fn cached_lists_round_trip() {
        let master = MasterKey::generate();
        let list = DeviceList {
            user: "a@x.y".into(),
            version: 3,
            devices: vec![
                (1, DeviceKeys::generate().public_keys()),
                (4, DeviceKeys::generate().public_keys()),
            ],
            master_key: master.public_key(),
        };
        assert_eq!(uncached("a@x.y", &cached(&list, 9)), Some(list));
    }
}
