//! Groups over the network: KeyPackages published and claimed, Commits sent for the hub to
//! order (retried on top of the Commit that won), Welcomes, texts, and the device changes a
//! `stale_devices` answer reveals (see [`crate::engine::groups`]).
//!
//! Group sends are sealed: one `group_send` on the anonymous `/v1/sealed` to every member
//! device whose account's delivery token this device holds (members share theirs inside the
//! group when they join; this account's own devices are addressed under its own token, as
//! every member's send addresses them). Members whose token has not arrived yet get theirs
//! on the authenticated connection: a separate MLS message for texts; for a Commit or a
//! Welcome, whose bytes are the same for everyone, the same bytes, which names the sender of
//! both parts (until every token has arrived).

use std::time::Duration;

use sealpost_proto::{EnvelopeId, ErrorCode, RecipientRefusal, ServerFrame};

use super::{Client, ClientError, now_ms};
use crate::{
    api::ClaimAuth,
    conn::Connection,
    crypto::DeviceList,
    engine::{GroupChange, GroupInfo, GroupSend, MAX_ADDS_PER_COMMIT},
};

/// KeyPackages kept published per device (topped up when the broker says they run low).
pub(super) const KEY_PACKAGES: usize = 20;
/// How often a Commit is rebuilt on top of another member's before giving up.
const COMMIT_ATTEMPTS: usize = 8;

/// How long a group send's answer is waited for.
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// How long a Commit that lost waits for the one that won to arrive.
const WINNER_WAIT: Duration = Duration::from_secs(20);

/// The broker's answer to a group send.
struct GroupAnswer {
    code: Option<ErrorCode>,
    refused: Vec<RecipientRefusal>,
    /// With `stale_epoch`: the group's epoch at the hub.
    epoch: Option<u64>,
    /// Recipients whose device set had changed (sent again on their current devices).
    stale: Vec<RecipientRefusal>,
}

impl Client {
    /// Publishes [`KEY_PACKAGES`] new KeyPackages (and a last-resort one the first time), so
    /// that others can add this device to groups.
    pub async fn publish_key_packages(&mut self) -> Result<u64, ClientError> {
        let upload = self.engine.key_packages(KEY_PACKAGES)?;
        // The private keys are saved before the public halves leave the device.
        self.save()?;
        Ok(self
            .api
            .upload_key_packages(&self.creds(), &upload.one_time, upload.fallback.as_ref())
            .await?)
    }

    /// Creates a group named `name` of this account's devices and every device of each of
    /// `members`; returns its id. Its Commits are ordered by this account's domain.
    pub async fn create_group(
        &mut self,
        name: &str,
        members: &[&str],
    ) -> Result<String, ClientError> {
        let id = self.engine.create_group(name)?;
        self.save()?;
        let own = self.engine.user().to_owned();
        let mut users = vec![own.as_str()];
        users.extend(members.iter().copied().filter(|m| *m != own));
        self.add_to_group(&id, &users).await?;
        self.share_group_token(&id).await?;
        Ok(id)
    }

    /// The groups this device is (or was) in.
    pub fn groups(&mut self) -> Vec<GroupInfo> {
        self.engine.groups()
    }

    /// One group, its members each with whether their account's verified list vouches for
    /// them (lists are fetched when not fresh).
    pub async fn group_info(&mut self, group: &str) -> Result<GroupInfo, ClientError> {
        let users: Vec<String> = self
            .engine
            .group_info(group)?
            .members
            .into_iter()
            .map(|(user, _, _)| user)
            .collect();
        for user in dedup(users) {
            // A list that cannot be had leaves its members shown unverified.
            let _ = self.verified_list(&user, false).await;
        }
        self.engine.group_info(group)
    }

    /// A group's last messages: (sender, device, sender's clock, text).
    pub fn group_messages(
        &self,
        group: &str,
    ) -> Result<Vec<(String, u32, u64, String)>, ClientError> {
        self.engine.group_messages(group)
    }

    /// Adds every device of each of `users` (their verified lists) that is not in the group
    /// yet.
    pub async fn add_to_group(&mut self, group: &str, users: &[&str]) -> Result<(), ClientError> {
        let members = self.engine.group_info(group)?.members;
        let mut devices = Vec::new();
        for user in users {
            let list = self.verified_list(user, true).await?;
            devices.extend(
                list.devices
                    .iter()
                    .map(|d| ((*user).to_owned(), d.0))
                    .filter(|(u, d)| !members.iter().any(|(mu, md, _)| mu == u && md == d)),
            );
        }
        if devices.is_empty() {
            return Ok(());
        }
        self.add_devices(group, &devices).await
    }

    /// Adds the given devices: claims a KeyPackage of each (checked against its account's
    /// verified list by the engine), then commits, at most [`MAX_ADDS_PER_COMMIT`] devices
    /// a Commit (so that each Commit and its Welcome fit one `group_send`).
    async fn add_devices(
        &mut self,
        group: &str,
        devices: &[(String, u32)],
    ) -> Result<(), ClientError> {
        for batch in devices.chunks(MAX_ADDS_PER_COMMIT) {
            self.add_batch(group, batch).await?;
        }
        Ok(())
    }

    async fn add_batch(
        &mut self,
        group: &str,
        devices: &[(String, u32)],
    ) -> Result<(), ClientError> {
        let creds = self.creds();
        let mut claimed = Vec::new();
        for (user, device) in devices {
            let key = self
                .api
                .claim_key_package(user, *device, ClaimAuth::Device(&creds))
                .await?;
            claimed.push((user.clone(), *device, key.key));
        }
        let mut attempts = 0;
        loop {
            let change = self.engine.add_to_group(group, &claimed)?;
            if self.commit(change).await? {
                return Ok(());
            }
            attempts += 1;
            if attempts == COMMIT_ATTEMPTS {
                return Err(ClientError::Invalid(
                    "other members' changes kept taking the group's epoch; try again".into(),
                ));
            }
        }
    }

    /// Removes every device of `user` from a group: it reads nothing sent after.
    pub async fn remove_from_group(&mut self, group: &str, user: &str) -> Result<(), ClientError> {
        self.remove_devices(group, user, None).await
    }

    async fn remove_devices(
        &mut self,
        group: &str,
        user: &str,
        devices: Option<&[u32]>,
    ) -> Result<(), ClientError> {
        for _ in 0..COMMIT_ATTEMPTS {
            let change = self.engine.remove_from_group(group, user, devices)?;
            if self.commit(change).await? {
                return Ok(());
            }
        }
        Err(ClientError::Invalid(
            "other members' changes kept taking the group's epoch; try again".into(),
        ))
    }

    /// Leaves a group: the other members are told, and one of them commits this account's
    /// removal.
    pub async fn leave_group(&mut self, group: &str) -> Result<(), ClientError> {
        let sends = self.engine.leave_group(group)?;
        self.save()?;
        self.send_parts(&sends).await?;
        Ok(())
    }

    /// Sends a text to a group; returns its envelope id. A member account whose devices
    /// changed is brought up to date (its new devices added, its removed ones removed). A
    /// member account whose master key changed and was not accepted refuses the text with
    /// [`ClientError::MasterKeyChanged`] (see [`crate::engine::GroupEvent::KeyChanged`]):
    /// accept the new key ([`Client::accept_master_key_change`]) or remove the member.
    pub async fn send_group_text(
        &mut self,
        group: &str,
        text: &str,
    ) -> Result<EnvelopeId, ClientError> {
        self.sync_member_devices(group).await?;
        if !self.engine.group_token_shared(group) {
            // Writing to a group is taking part in it: its members may now send to us sealed.
            self.share_group_token(group).await?;
        }
        let sends = self.engine.group_text(group, text, now_ms())?;
        self.save()?;
        let answer = self.send_parts(&sends).await?;
        if let Some(code) = answer.code {
            return Err(ClientError::Invalid(format!(
                "the broker refused the group message: {}",
                code.as_str()
            )));
        }
        if let Some(r) = answer.refused.first() {
            return Err(ClientError::Invalid(format!(
                "the broker refused the group message for {}: {}",
                r.to,
                r.code.as_str()
            )));
        }
        // Taken for every member device: the next text names it (withheld-message detection).
        // A text some devices missed (a stale set) is never named, so it never looks missing.
        if answer.stale.is_empty()
            && let Some(first) = sends.first()
        {
            self.engine.group_text_accepted(first.id);
            self.save()?;
        }
        for r in answer.stale {
            self.update_member_devices(group, &r.to).await?;
        }
        Ok(sends.first().map_or(EnvelopeId([0; 16]), |s| s.id))
    }

    /// Brings every member account's devices in the group in line with its verified device
    /// list (fetched when not fresh: see [`Client::set_device_list_max_age`]): a device
    /// linked since is added, a removed one removed, before anything more is sent. A member
    /// whose master key changed is [`ClientError::MasterKeyChanged`].
    async fn sync_member_devices(&mut self, group: &str) -> Result<(), ClientError> {
        let users: Vec<String> = dedup(
            self.engine
                .group_info(group)?
                .members
                .into_iter()
                .map(|(user, _, _)| user)
                .collect(),
        );
        for user in users {
            match self.verified_list(&user, false).await {
                Ok(list) => self.apply_list(group, &user, &list).await?,
                // A member's master key changed: nothing goes to the group until the user
                // accepts the new key or removes the member, as nothing goes to that account
                // in a 1:1 conversation (the engine told the app: `GroupEvent::KeyChanged`).
                Err(e @ ClientError::MasterKeyChanged { .. }) => {
                    self.save()?;
                    return Err(e);
                }
                // A list that cannot be had now changes nothing; the next text tries again.
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Brings `user`'s devices in a group in line with its verified device list, fetched
    /// again: the broker's answer said its devices changed. (The list, signed by the
    /// account's master key, decides; a peer broker's view of a remote account's devices
    /// may lag behind it.)
    async fn update_member_devices(&mut self, group: &str, user: &str) -> Result<(), ClientError> {
        let list = self.verified_list(user, true).await?;
        self.apply_list(group, user, &list).await
    }

    /// Adds the devices of `list` the group lacks and removes those it no longer has.
    async fn apply_list(
        &mut self,
        group: &str,
        user: &str,
        list: &DeviceList,
    ) -> Result<(), ClientError> {
        let listed: Vec<u32> = list.devices.iter().map(|d| d.0).collect();
        let (gone, new) = self.engine.group_device_drift(group, user, &listed)?;
        if !gone.is_empty() {
            self.remove_devices(group, user, Some(&gone)).await?;
        }
        if !new.is_empty() {
            let devices: Vec<(String, u32)> =
                new.into_iter().map(|d| (user.to_owned(), d)).collect();
            self.add_devices(group, &devices).await?;
        }
        Ok(())
    }

    /// Sends a member change: the Commit, ordered at the hub. Accepted: merged, then the
    /// Welcome and the group's name go to the added devices; `Ok(false)` when another
    /// member's Commit took the epoch (it is received, so the change can be made again).
    async fn commit(&mut self, change: GroupChange) -> Result<bool, ClientError> {
        // The pending Commit is saved before it leaves, so that a crash can drop it cleanly.
        self.save()?;
        // The first part is the one the hub orders: its answer decides.
        let Some((ordered, rest)) = change.commit.split_first() else {
            return Ok(true);
        };
        let answer = self.group_send(ordered).await?;
        match answer.code {
            None => {}
            Some(ErrorCode::StaleEpoch) => {
                self.engine.commit_answer(&change.group, false)?;
                self.save()?;
                // The winner's Commit is on its way here: receive up to the hub's epoch.
                let epoch = answer.epoch.unwrap_or(0);
                let group = change.group.clone();
                self.receive_until(WINNER_WAIT, |c| {
                    c.engine
                        .group_info(&group)
                        .map_or(true, |g| g.left || g.epoch >= epoch)
                })
                .await?;
                return Ok(false);
            }
            Some(code) => {
                self.engine.commit_answer(&change.group, false)?;
                self.save()?;
                return Err(ClientError::Invalid(format!(
                    "the broker refused the group change: {}",
                    code.as_str()
                )));
            }
        }
        self.engine.commit_answer(&change.group, true)?;
        self.save()?;
        // The epoch is taken: the rest only delivers (best effort: a member it misses gets the
        // group's next Commit on top, and is told of it then by its epoch).
        for part in rest {
            let _ = self.group_send(part).await;
        }
        if !change.welcome.is_empty() {
            self.send_parts(&change.welcome).await?;
            let name = self.engine.group_name_for_members(&change.group)?;
            self.save()?;
            self.send_parts(&name).await?;
        }
        Ok(true)
    }

    /// This account's delivery token for a group this device just entered, so that its
    /// members send to it sealed.
    pub(super) async fn share_group_token(&mut self, group: &str) -> Result<(), ClientError> {
        let sends = self.engine.group_token_share(group)?;
        self.save()?;
        self.send_parts(&sends).await?;
        Ok(())
    }

    /// Sends the parts of one group message (sealed, then authenticated), merging their
    /// answers. A part refused as a whole (an epoch another Commit took) ends it.
    async fn send_parts(&mut self, sends: &[GroupSend]) -> Result<GroupAnswer, ClientError> {
        let mut merged = GroupAnswer {
            code: None,
            refused: Vec::new(),
            epoch: None,
            stale: Vec::new(),
        };
        for send in sends {
            let answer = self.group_send(send).await?;
            merged.refused.extend(answer.refused);
            merged.stale.extend(answer.stale);
            if answer.code.is_some() {
                merged.code = answer.code;
                merged.epoch = answer.epoch;
                break;
            }
        }
        Ok(merged)
    }

    /// Sends a group frame and waits for its answer. A member account whose devices at the
    /// broker are not the ones addressed (a device linked or removed since the group last
    /// changed) is sent the same envelope on its current devices: those not in the group
    /// drop it, and the group's members are brought up to date by the next text
    /// ([`Client::send_group_text`]). Those recipients are answered as refused-and-redone.
    async fn group_send(&mut self, send: &GroupSend) -> Result<GroupAnswer, ClientError> {
        let mut answer = self.send_once(send).await?;
        let stale: Vec<RecipientRefusal> = answer
            .refused
            .iter()
            .filter(|r| r.code == ErrorCode::StaleDevices)
            .cloned()
            .collect();
        if answer.code.is_some() || stale.is_empty() {
            return Ok(answer);
        }
        let Some(again) = send.resend_to_current(&stale) else {
            return Ok(answer);
        };
        let retried = self.send_once(&again).await?;
        if let Some(code) = retried.code {
            return Err(ClientError::Invalid(format!(
                "the broker refused the group message: {}",
                code.as_str()
            )));
        }
        answer.stale = stale;
        answer.refused.retain(|r| r.code != ErrorCode::StaleDevices);
        answer.refused.extend(retried.refused);
        Ok(answer)
    }

    /// Sends a group frame on its channel and waits for its answer.
    async fn send_once(&mut self, send: &GroupSend) -> Result<GroupAnswer, ClientError> {
        // A broker that never answers (one without group sends answers `unknown_frame_type`
        // and keeps the connection) must not hold the caller forever.
        match tokio::time::timeout(ANSWER_WAIT, self.send_once_inner(send)).await {
            Ok(answer) => answer,
            Err(_) => {
                self.on_conn_lost();
                self.sealed = None;
                Err(ClientError::Invalid(
                    "the broker did not answer the group send".into(),
                ))
            }
        }
    }

    async fn send_once_inner(&mut self, send: &GroupSend) -> Result<GroupAnswer, ClientError> {
        if send.sealed {
            return self.send_sealed(send).await;
        }
        let mut conn = self.take_conn().await?;
        if let Err(e) = conn.send(&send.frame).await {
            self.on_conn_lost();
            return Err(e.into());
        }
        loop {
            match conn.next().await {
                Ok(ServerFrame::GroupSendResult {
                    id,
                    code,
                    refused,
                    epoch,
                }) if id == send.id => {
                    self.conn = Some(conn);
                    return Ok(GroupAnswer {
                        code,
                        refused,
                        epoch,
                        stale: Vec::new(),
                    });
                }
                Ok(ServerFrame::GroupSendResult { .. } | ServerFrame::SendResult { .. }) => {}
                Ok(frame) => self.inbox.push_back(frame),
                Err(e) => {
                    self.on_conn_lost();
                    return Err(e.into());
                }
            }
        }
    }

    /// Sends a group frame on the anonymous connection (`/v1/sealed`) and waits for its
    /// answer.
    async fn send_sealed(&mut self, send: &GroupSend) -> Result<GroupAnswer, ClientError> {
        let mut conn = match self.sealed.take() {
            Some(c) => c,
            None => Connection::anonymous(&self.api.ws_url("/v1/sealed")).await?,
        };
        conn.send(&send.frame).await?;
        loop {
            match conn.next().await? {
                ServerFrame::GroupSendResult {
                    id,
                    code,
                    refused,
                    epoch,
                } if id == send.id => {
                    self.sealed = Some(conn);
                    return Ok(GroupAnswer {
                        code,
                        refused,
                        epoch,
                        stale: Vec::new(),
                    });
                }
                // Answers to earlier, abandoned sends carry nothing for us.
                _ => {}
            }
        }
    }

    /// Commits the removal of an account that asked to leave, if this device is the group's
    /// remover (one member does it; see [`crate::engine::Engine::is_group_remover`]).
    pub(super) async fn honour_leave(
        &mut self,
        group: &str,
        user: &str,
    ) -> Result<(), ClientError> {
        if self.engine.is_group_remover(group, user)? {
            self.remove_from_group(group, user).await?;
        }
        Ok(())
    }
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}
