//! Keys, device lists, this account's devices, contacts' master keys and safety numbers: the
//! engine decides, this fetches and publishes.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use sealpost_proto::transparency::{MAX_AUDIT_EPOCHS, SignedRoot};

use super::{Client, ClientError, DeviceInfo, Event, now_ms};
use crate::{
    api::{ApiError, ClaimAuth, FetchedList},
    crypto::{
        DeviceList, SafetyNumber, SignedDeviceList,
        transparency::{Step, TransparencyError},
    },
    engine::{ClaimWith, KeyChange, check_handle},
};

fn own_domain(user: &str) -> &str {
    user.rsplit_once('@').map_or("", |(_, d)| d)
}

/// Most epochs a client follows with append-only proofs it fetches itself; a longer jump is
/// vouched for by the auditors' co-signatures.
const CLIENT_AUDIT_EPOCHS: u64 = 4 * MAX_AUDIT_EPOCHS;

/// How often this account's own list is fetched again while connected (plus up to half as
/// much again, at random).
const OWN_LIST_REFRESH: Duration = Duration::from_secs(15 * 60);

impl Client {
    /// Uploads keys generated but not yet published, then marks them published. Returns how
    /// many one-time keys the directory holds (0 if there was nothing to upload).
    pub(super) async fn upload_new_keys(&mut self) -> Result<u64, ClientError> {
        let Some(upload) = self.engine.key_upload() else {
            return Ok(0);
        };
        let count = self
            .api
            .upload_keys(&self.creds(), &upload.one_time, upload.fallback.as_ref())
            .await?;
        self.engine.mark_keys_published();
        self.save()?;
        Ok(count)
    }

    /// Tops the published one-time keys up to [`ONE_TIME_KEYS`](super::ONE_TIME_KEYS) (and publishes a fallback key
    /// if the directory has none). Returns how many one-time keys the directory holds.
    pub async fn replenish_keys(&mut self) -> Result<u64, ClientError> {
        let (count, fallback) = self.api.key_count(&self.creds()).await?;
        if !self.engine.top_up_keys(count, fallback) {
            return Ok(count);
        }
        self.upload_new_keys().await
    }

    /// How many one-time keys the directory holds for this device, and whether it has a
    /// fallback key.
    pub async fn published_key_count(&self) -> Result<(u64, bool), ClientError> {
        Ok(self.api.key_count(&self.creds()).await?)
    }

    /// Publishes a list of our own the engine signed, and records it as published.
    pub(super) async fn publish_own_list(
        &mut self,
        signed: &SignedDeviceList,
    ) -> Result<(), ClientError> {
        let bytes = signed.to_bytes();
        self.api.put_device_list(&self.creds(), &bytes).await?;
        self.engine.confirm_own_list(&bytes, now_ms())?;
        self.save()
    }

    /// The verified device list of `user`: the cached one if fresh (and `force` is false),
    /// else fetched, verified against the pin (pinning on first use) and cached.
    pub(super) async fn verified_list(
        &mut self,
        user: &str,
        force: bool,
    ) -> Result<DeviceList, ClientError> {
        if !force && let Some(list) = self.engine.fresh_list(user, now_ms()) {
            return Ok(list);
        }
        let signed = self.fetch_signed_list(user).await?;
        self.accept_list(user, &signed)
    }

    /// Verifies and keeps a fetched list. A changed master key drops the list we held: from
    /// then on, nothing of `user` is read (it is held) until the user accepts the new key,
    /// however the change was found (a send, a refresh).
    fn accept_list(&mut self, user: &str, signed: &[u8]) -> Result<DeviceList, ClientError> {
        let accepted = self.engine.accept_device_list(user, signed, now_ms());
        if let Err(ClientError::MasterKeyChanged { .. }) = &accepted {
            self.engine.forget_list(user);
        }
        accepted
    }

    /// `user`'s signed device list as the broker has it, checked against its domain's
    /// key-transparency log (its signature is checked by the caller): our own on the
    /// authenticated channel, anyone else's on the anonymous one.
    async fn fetch_signed_list(&mut self, user: &str) -> Result<Vec<u8>, ClientError> {
        let fetched = if user == self.engine.user() {
            self.api.own_proved_device_list(&self.creds()).await?
        } else {
            self.anon.proved_device_list(user).await?
        };
        let fetched = fetched.ok_or_else(|| ClientError::NoDeviceList(user.to_owned()))?;
        self.verify_in_log(user, &fetched).await?;
        Ok(fetched.signed)
    }

    /// The key-transparency checks of a fetched list: its lookup proof, then that its root
    /// extends the roots seen of its domain (fetching the append-only proof), then the
    /// auditors' co-signatures of it.
    async fn verify_in_log(
        &mut self,
        user: &str,
        fetched: &FetchedList,
    ) -> Result<(), ClientError> {
        let checked =
            self.engine
                .check_transparency(user, &fetched.signed, fetched.evidence.as_deref())?;
        let Some((root, step)) = checked else {
            return Ok(());
        };
        // The earliest root still awaiting auditors (a busy log publishes faster than it is
        // audited): its co-signatures vouch for the log up to it.
        if let Some(awaited) = self.engine.log_pins().awaited(&root.domain)
            && let Ok(cosignatures) = self
                .anon
                .transparency_cosignatures(&awaited.domain, awaited.epoch)
                .await
        {
            self.engine
                .check_cosignatures(user, &awaited, &cosignatures, now_ms())?;
        }
        self.follow_root(user, &root, step).await?;
        // Best effort: an unreachable broker leaves the root "not audited yet".
        if let Ok(cosignatures) = self
            .anon
            .transparency_cosignatures(&root.domain, root.epoch)
            .await
        {
            self.engine
                .check_cosignatures(user, &root, &cosignatures, now_ms())?;
        }
        Ok(())
    }

    /// Moves this device's view of `root`'s domain to `root`, where `step` (from
    /// [`LogPins::place`](crate::crypto::transparency::LogPins::place)) says it stands.
    async fn follow_root(
        &mut self,
        user: &str,
        root: &SignedRoot,
        step: Step,
    ) -> Result<(), ClientError> {
        let fail = |error| ClientError::Transparency {
            user: user.to_owned(),
            error,
        };
        match step {
            Step::None => self.engine.accept_root(root, now_ms()),
            // Too many epochs apart to fetch every append-only proof (about 1.6 KiB per
            // changed list): the auditors, who verify every epoch in order, vouch for the jump
            // with their co-signatures; until one co-signs, the log is pending.
            Step::Advance { from, to } if to - from > CLIENT_AUDIT_EPOCHS => {
                self.engine.accept_root_unproved(root, now_ms());
            }
            Step::Advance { .. } => {
                let newest = self
                    .engine
                    .log_pins()
                    .newest(&root.domain)
                    .ok_or_else(|| fail(TransparencyError::Malformed))?;
                self.verify_roots(user, &root.domain, newest, (root.epoch, root.root_hash))
                    .await?;
                self.engine.accept_root(root, now_ms());
            }
        }
        Ok(())
    }

    /// Fetches and verifies that `domain`'s log went from root `first` to root `last` only by
    /// appending (signed roots of every epoch between, akd's append-only proofs).
    async fn verify_roots(
        &self,
        user: &str,
        domain: &str,
        first: (u64, [u8; 32]),
        last: (u64, [u8; 32]),
    ) -> Result<(), ClientError> {
        let fork = |epoch| ClientError::Transparency {
            user: user.to_owned(),
            error: TransparencyError::Fork {
                domain: domain.to_owned(),
                epoch,
            },
        };
        let mut at = first;
        while at.0 < last.0 {
            let end = at.0.saturating_add(MAX_AUDIT_EPOCHS).min(last.0);
            let (roots, proof) = self.anon.transparency_audit(domain, at.0, end).await?;
            let roots = roots
                .iter()
                .map(|r| SignedRoot::from_bytes(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| fork(at.0))?;
            self.engine
                .log_pins()
                .verify_extension(domain, at, &roots, &proof)
                .await
                .map_err(|error| ClientError::Transparency {
                    user: user.to_owned(),
                    error,
                })?;
            match roots.last() {
                Some(r) if r.epoch == end => at = (r.epoch, r.root_hash),
                _ => return Err(fork(end)),
            }
        }
        if at != last {
            return Err(fork(last.0));
        }
        Ok(())
    }

    /// The key-transparency logs as this device has seen them (the newest root of each
    /// domain, pinned log keys).
    pub fn transparency(&self) -> &crate::crypto::transparency::LogPins {
        self.engine.log_pins()
    }

    /// Checks this account's own entry in its domain's log: warns (an
    /// [`Event::ForeignKeyPublished`] each) of every master key in it that this account did
    /// not make, and returns how many it found that it had not warned of before.
    pub async fn check_own_log(&mut self) -> Result<usize, ClientError> {
        let (root, proof) = match self.api.transparency_history(&self.creds()).await {
            Ok(answer) => answer,
            // A broker without a log (the NATS store) has nothing to check; one that had a log
            // and says it has none now is switching this check off.
            Err(ApiError::Refused { status: 404, .. })
                if self
                    .engine
                    .log_pins()
                    .newest(own_domain(self.engine.user()))
                    .is_none() =>
            {
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        let root = SignedRoot::from_bytes(&root).map_err(|_| ClientError::Transparency {
            user: self.engine.user().to_owned(),
            error: TransparencyError::Malformed,
        })?;
        let own = self.engine.user().to_owned();
        let step =
            self.engine
                .log_pins()
                .place(&root)
                .map_err(|error| ClientError::Transparency {
                    user: own.clone(),
                    error,
                })?;
        self.follow_root(&own, &root, step).await?;
        // The root this device is shown must be the one auditors verified: a log that shows
        // this account a clean branch and its contacts another is caught here.
        if let Ok(cosignatures) = self
            .anon
            .transparency_cosignatures(&root.domain, root.epoch)
            .await
        {
            self.engine
                .check_cosignatures(&own, &root, &cosignatures, now_ms())?;
        }
        let warnings = self.engine.check_own_history(&root, &proof)?;
        let found = warnings.len();
        self.events.extend(warnings);
        self.save()?;
        Ok(found)
    }

    /// This account's own list as last fetched, whatever its age; fetched (authenticated) only
    /// if there is none.
    pub(super) async fn own_list(&mut self) -> Result<(), ClientError> {
        let own = self.engine.user().to_owned();
        if self.engine.known_list(&own).is_none() {
            self.verified_list(&own, true).await?;
        }
        Ok(())
    }

    /// Fetches this account's own list again (authenticated channel), when it is due: at each
    /// new connection and periodically, never right after a send.
    pub(super) async fn refresh_own_list_if_due(&mut self) -> Result<(), ClientError> {
        if Instant::now() < self.own_list_due {
            return Ok(());
        }
        let jitter = OWN_LIST_REFRESH.mul_f64(rand::random::<f64>() / 2.0);
        self.own_list_due = Instant::now() + OWN_LIST_REFRESH + jitter;
        let own = self.engine.user().to_owned();
        match self.verified_list(&own, true).await {
            Ok(_) => {}
            Err(ClientError::Api(e)) if e.is_transient() => return Ok(()),
            Err(e) => return Err(e),
        }
        match self.check_own_log().await {
            Err(ClientError::Api(e)) if e.is_transient() => Ok(()),
            other => other.map(drop),
        }
    }

    /// Refreshes contacts' lists if due (see [`crate::engine::schedule`]): every one, in
    /// random order, on the anonymous channel; then reads the held envelopes again with what
    /// came of each.
    pub(super) async fn refresh_lists_if_due(&mut self) -> Result<(), ClientError> {
        if now_ms() < self.engine.lists_refresh_due_ms(now_ms()) {
            return Ok(());
        }
        self.refresh_lists().await
    }

    /// Refreshes every contact's list now, in random order, on the anonymous channel, then
    /// reads the held envelopes again with what came of each.
    pub(super) async fn refresh_lists(&mut self) -> Result<(), ClientError> {
        let mut outcomes = BTreeMap::new();
        for user in self.engine.lists_to_refresh(now_ms()) {
            let outcome = match self.fetch_signed_list(&user).await {
                Ok(signed) => self.accept_list(&user, &signed).map(drop),
                Err(e) => Err(e),
            };
            outcomes.insert(user, outcome);
        }
        self.read_held(None, Some(&mut outcomes)).await;
        self.save()
    }

    /// Claims a key of `user`'s `device` and starts a session with it.
    pub(super) async fn claim_session(
        &mut self,
        user: &str,
        device: u32,
        with: ClaimWith,
    ) -> Result<(), ClientError> {
        let creds = self.creds();
        let auth = match &with {
            ClaimWith::DeliveryToken(token) => ClaimAuth::DeliveryToken(token),
            ClaimWith::Device => ClaimAuth::Device(&creds),
        };
        // With a delivery token the claim names nobody: anonymous channel.
        let api = match &with {
            ClaimWith::DeliveryToken(_) => &self.anon,
            ClaimWith::Device => &self.api,
        };
        let claimed = api.claim_key(user, device, auth).await?;
        self.engine.create_session(user, device, &claimed.key)
    }

    /// This account's devices: the signed list, plus devices the broker has that the list
    /// does not vouch for.
    pub async fn devices(&mut self) -> Result<Vec<DeviceInfo>, ClientError> {
        let own = self.engine.user().to_owned();
        self.verified_list(&own, true).await?;
        self.save()?;
        let broker = self.api.devices(&own).await?;
        Ok(self.engine.devices(&broker))
    }

    /// Removes another device of this account: drops it from the signed list (so contacts
    /// stop encrypting to it), then deletes it at the broker (its queue is deleted and its
    /// connection closed).
    pub async fn remove_device(&mut self, device: u32) -> Result<(), ClientError> {
        self.engine.check_removable(device)?;
        let own = self.engine.user().to_owned();
        self.verified_list(&own, true).await?;
        if let Some(signed) = self.engine.own_list_without(device)? {
            self.publish_own_list(&signed).await?;
        }
        match self.api.remove_device(&self.creds(), device).await {
            Ok(()) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
        self.engine.forget_own_device(device);
        self.save()
    }

    /// The safety number with `with` (fetching and pinning its master key on first use).
    pub async fn safety_number(&mut self, with: &str) -> Result<SafetyNumber, ClientError> {
        check_handle(with)?;
        let list = self.verified_list(with, false).await?;
        self.save()?;
        Ok(self.engine.safety_number_for(with, &list.master_key))
    }

    /// Records that the user compared the safety number with `with` and it matched.
    pub async fn mark_verified(&mut self, with: &str) -> Result<SafetyNumber, ClientError> {
        let number = self.safety_number(with).await?;
        self.engine.mark_verified(with);
        self.save()?;
        Ok(number)
    }

    /// Whether the user verified `with`'s current master key (not while a changed one is
    /// pending).
    pub fn is_verified(&self, with: &str) -> bool {
        self.engine.is_verified(with)
    }

    /// `with`'s changed master key that the user has not accepted yet: the old and the new
    /// safety number, to show instead of "verified" (see [`Client::accept_master_key_change`]).
    pub fn key_change(&self, with: &str) -> Option<KeyChange> {
        self.engine.key_change(with)
    }

    /// What the last sends found to tell the user ([`Event::UnlistedDevices`]: devices the
    /// broker has for an account that its signed list does not contain), each device once.
    /// Call it after a send; [`Client::next_event`] returns those not taken.
    pub fn take_notices(&mut self) -> Vec<Event> {
        self.engine.take_notices()
    }

    /// Accepts `with`'s new master key after [`ClientError::MasterKeyChanged`] (only once the
    /// user compared the new safety number). The contact is no longer marked verified.
    pub async fn accept_master_key_change(
        &mut self,
        with: &str,
        new_master_key: &[u8; 32],
    ) -> Result<SafetyNumber, ClientError> {
        self.engine.accept_master_key_change(with, new_master_key);
        let number = self.safety_number(with).await?;
        // What arrived under the new key meanwhile is read now; its events come next.
        self.read_held(Some(with), None).await;
        self.save()?;
        Ok(number)
    }

    /// The master key `with`'s current device list is signed by, checked against nothing but
    /// the list's own signature, and the safety number it gives — for showing the user a
    /// changed key before [`Client::accept_master_key_change`].
    pub async fn fetch_master_key(
        &mut self,
        with: &str,
    ) -> Result<([u8; 32], SafetyNumber), ClientError> {
        check_handle(with)?;
        let signed = self.fetch_signed_list(with).await?;
        self.engine.inspect_device_list(with, &signed)
    }

    /// Replaces this account's master key (after a suspected compromise): signs a new device
    /// list with a new key. Contacts see [`ClientError::MasterKeyChanged`] until they accept
    /// it. Only for single-device accounts: other devices would not learn the new key.
    pub async fn rotate_master_key(&mut self) -> Result<(), ClientError> {
        let own = self.engine.user().to_owned();
        self.verified_list(&own, true).await?;
        let rotation = self.engine.prepare_master_rotation()?;
        let bytes = rotation.signed.to_bytes();
        // Published before this device switches to it: if the broker refuses, nothing has
        // changed here and the old key still signs the account's list.
        if let Err(e) = self.api.put_device_list(&self.creds(), &bytes).await {
            // Unless the broker stored it and only its answer was lost: then switch all the
            // same, or no device would hold the key the published list names.
            match self.fetch_signed_list(&own).await {
                Ok(published) if published == bytes => {}
                _ => return Err(e.into()),
            }
        }
        self.engine.finish_master_rotation(rotation, now_ms())?;
        self.save()
    }
}
