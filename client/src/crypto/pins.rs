//! Trust on first use: the master key first seen for each contact is pinned, and later
//! device lists must be signed by it.
//!
//! A changed master key is never accepted silently: [`Pins::check`] reports
//! [`PinResult::Changed`] and [`Pins::verify_device_list`] fails with
//! [`DeviceListError::MasterKeyMismatch`]; the app warns the user (and shows the new safety
//! number), and only [`Pins::accept_change`] moves the pin.

use std::collections::BTreeMap;

use super::device_list::{DeviceList, DeviceListError, SeenDeviceList, SignedDeviceList};

/// What [`Pins::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinResult {
    /// No pin existed; this key is now pinned.
    FirstUse,
    /// The key equals the pin.
    Match,
    /// The key differs from the pin, which is left unchanged.
    Changed {
        /// The pinned key.
        old: [u8; 32],
        /// The key just presented.
        new: [u8; 32],
    },
}

/// One contact's pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pin {
    pub(crate) master_key: [u8; 32],
    /// The last device list accepted under this master key.
    pub(crate) device_list: Option<SeenDeviceList>,
}

/// Pinned master keys and last-accepted device lists, by contact handle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    pub(crate) contacts: BTreeMap<String, Pin>,
}

impl Pins {
    /// No pins.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compares `master_key` with the pin for `user`, pinning it if there was none.
    pub fn check(&mut self, user: &str, master_key: &[u8; 32]) -> PinResult {
        match self.contacts.get(user) {
            None => {
                self.contacts.insert(
                    user.to_owned(),
                    Pin {
                        master_key: *master_key,
                        device_list: None,
                    },
                );
                PinResult::FirstUse
            }
            Some(pin) if pin.master_key == *master_key => PinResult::Match,
            Some(pin) => PinResult::Changed {
                old: pin.master_key,
                new: *master_key,
            },
        }
    }

    /// The pinned master key of `user`.
    pub fn pinned(&self, user: &str) -> Option<[u8; 32]> {
        self.contacts.get(user).map(|pin| pin.master_key)
    }

    /// Replaces the pin after the user accepted a changed master key. Forgets the last seen
    /// device list: versions restart under a new master key.
    pub fn accept_change(&mut self, user: &str, new_master: &[u8; 32]) {
        self.contacts.insert(
            user.to_owned(),
            Pin {
                master_key: *new_master,
                device_list: None,
            },
        );
    }

    /// Removes everything known about `user`.
    pub fn forget(&mut self, user: &str) {
        self.contacts.remove(user);
    }

    /// The last device list accepted for `user`.
    pub fn seen_device_list(&self, user: &str) -> Option<SeenDeviceList> {
        self.contacts.get(user).and_then(|pin| pin.device_list)
    }

    /// Verifies `user`'s device list against the pin (pinning its master key on first use) and
    /// the last accepted version, and records it as the latest.
    pub fn verify_device_list(
        &mut self,
        user: &str,
        signed: &SignedDeviceList,
    ) -> Result<DeviceList, DeviceListError> {
        let pin = self.contacts.get(user).copied();
        let list = signed.verify(
            user,
            pin.as_ref().map(|p| &p.master_key),
            pin.as_ref().and_then(|p| p.device_list.as_ref()),
        )?;
        self.contacts.insert(
            user.to_owned(),
            Pin {
                master_key: list.master_key,
                device_list: Some(signed.seen(list.version)),
            },
        );
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::identity::{DeviceKeys, MasterKey};

    const BOB: &str = "bob@b.example";

    #[test]
    fn trust_on_first_use() {
        let mut pins = Pins::new();
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        assert_eq!(pins.check(BOB, &k1), PinResult::FirstUse);
        assert_eq!(pins.check(BOB, &k1), PinResult::Match);
        assert_eq!(
            pins.check(BOB, &k2),
            PinResult::Changed { old: k1, new: k2 }
        );
        assert_eq!(pins.pinned(BOB), Some(k1), "a change does not move the pin");
        pins.accept_change(BOB, &k2);
        assert_eq!(pins.check(BOB, &k2), PinResult::Match);
        assert_eq!(pins.check("carol@c.example", &k2), PinResult::FirstUse);
    }

    #[test]
    fn device_lists_through_pins() {
        let master = MasterKey::generate();
        let list = |version| {
            DeviceList {
                user: BOB.into(),
                version,
                devices: vec![(1, DeviceKeys::generate().public_keys())],
                master_key: master.public_key(),
            }
            .sign(&master)
            .expect("signs")
        };
        let mut pins = Pins::new();
        let v2 = list(2);
        pins.verify_device_list(BOB, &v2).expect("first use");
        assert_eq!(pins.pinned(BOB), Some(master.public_key()));
        assert_eq!(pins.seen_device_list(BOB), Some(v2.seen(2)));

        assert_eq!(
            pins.verify_device_list(BOB, &list(1)).map(|l| l.version),
            Err(DeviceListError::Rollback { seen: 2, got: 1 })
        );
        pins.verify_device_list(BOB, &list(3)).expect("newer");

        let other = MasterKey::generate();
        let forged = DeviceList {
            user: BOB.into(),
            version: 9,
            devices: vec![],
            master_key: other.public_key(),
        }
        .sign(&other)
        .expect("signs");
        assert!(matches!(
            pins.verify_device_list(BOB, &forged),
            Err(DeviceListError::MasterKeyMismatch { .. })
        ));
        assert_eq!(pins.pinned(BOB), Some(master.public_key()));

        // After the user accepts the change, the new key's lists verify.
        pins.accept_change(BOB, &other.public_key());
        pins.verify_device_list(BOB, &forged).expect("accepted");
    }
}
