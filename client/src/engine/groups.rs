//! Group conversations over MLS: what a device does, sans I/O.
//!
//! ```text
//! create_group(name) ──────────────────────────────▶ a group of this device alone (hub: our domain)
//! add_to_group(group, claimed KeyPackages) ─▶ GroupChange { commit: GroupSend (ordered),
//!                                                          welcome: GroupSend, then name }
//! remove_from_group(group, user) ───────────▶ GroupChange { commit }
//!     driver: send commit ─▶ accepted: commit_answer(true), then the welcome
//!                         └▶ stale_epoch: commit_answer(false), receive what arrived, retry
//! group_text(group, text) ─▶ GroupSend (to every member device, this one too)
//! open_group (a group envelope) ─▶ events (Message, Joined, Changed, Removed, …) ─▶ ack
//! ```
//!
//! Members are devices. Each member's credential is checked against its account's verified
//! device list when it is added here and whenever the group's members are listed: a member
//! whose device the list does not vouch for is shown unverified, and no KeyPackage is added
//! unless it verifies. A Commit's own device merges it only once the hub took its epoch
//! (`commit_answer`); a message for an epoch this device has not reached waits (held) until
//! the Commit before it arrives, so deliveries from different domains may come out of order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sealpost_proto::{
    Class, ClientFrame, EnvelopeId, ErrorCode, GroupRecipient, Order, RecipientRefusal,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use zeroize::Zeroizing;

use super::{
    Engine, Event, KeyUpload,
    record::{GroupEntry, GroupMessage, HeldGroupMessage, Secret},
};
use crate::{
    crypto::{
        Link,
        group::{GroupError, GroupKeys, GroupWire, Member, MemberId, Processed},
        payload::LinkFields,
    },
    error::{ClientError, EnvelopeError},
};

/// Most devices one `group_send` may address (the broker's fan-out cap).
pub use sealpost_proto::limits::MAX_GROUP_DEVICES;
/// Most member devices of a group in the clients, below the broker's fan-out cap
/// ([`MAX_GROUP_DEVICES`]): a Welcome carries the group's whole ratchet tree (about 0.3 KiB
/// a member) and must fit one `group_send` (`MAX_GROUP_CIPHERTEXT_BYTES`, 448 KiB). At 2,000
/// devices a new member's Welcome is about 560 KiB. Measured by the ignored test
/// `crypto::group::tests::mls_groups_measured` (README, "A message to a group").
pub const MAX_GROUP_MEMBER_DEVICES: usize = 1000;
/// Most devices one Commit adds (the SDK adds more in several): a Commit carries each added
/// device's KeyPackage, and its Welcome an encrypted secret for each, on top of the tree.
pub const MAX_ADDS_PER_COMMIT: usize = 250;
/// Longest group message text, in bytes.
pub const MAX_GROUP_TEXT_BYTES: usize = 32 * 1024;
/// Messages kept per group.
const MESSAGES_PER_GROUP: usize = 1000;
/// Messages from later epochs kept until their Commit arrives.
const HELD_GROUP_MESSAGES: usize = 256;
/// How long a group message lives at the broker.
const GROUP_TTL_SECS: u32 = 7 * 24 * 3600;

/// What members say inside a group (MLS application data).
#[derive(Serialize, Deserialize)]
enum GroupPayload {
    /// A text message, with the sender's clock, and its place in the sending device's chain
    /// to the group (withheld-message detection; absent from older clients).
    Text {
        body: String,
        sent_ms: u64,
        #[serde(default)]
        link: Option<LinkFields>,
    },
    /// The group's name (sent by whoever adds members, so the new ones learn it).
    Name { name: String },
    /// The sender's account is leaving: another member commits its removal.
    Leave,
    /// The sender account's delivery token: members send to it sealed from then on.
    Token { token: ByteBuf },
}

/// A group as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Its id, hex.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The hub's domain.
    pub hub: String,
    /// The epoch this device is in.
    pub epoch: u64,
    /// Member devices, each with whether its account's verified device list vouches for it.
    pub members: Vec<(String, u32, bool)>,
    /// This device is no longer a member.
    pub left: bool,
}

/// A group event for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// A text in a group.
    Message {
        /// The group (hex id).
        group: String,
        /// The sender account and device.
        from: String,
        /// Its device.
        device: u32,
        /// The text.
        text: String,
        /// The sender's clock.
        sent_ms: u64,
    },
    /// This device joined a group (someone added it).
    Joined {
        /// The group.
        group: String,
        /// Who added us.
        by: String,
    },
    /// Members were added or removed.
    Changed {
        /// The group.
        group: String,
        /// Who committed the change.
        by: String,
        /// Devices added.
        added: Vec<(String, u32)>,
        /// Devices removed.
        removed: Vec<(String, u32)>,
    },
    /// This device was removed from the group.
    Removed {
        /// The group.
        group: String,
    },
    /// A member's device is not vouched for by its account's verified device list.
    Unverified {
        /// The group.
        group: String,
        /// The account and device.
        user: String,
        /// Its device.
        device: u32,
    },
    /// A member account's master key changed (its device list is signed by a key other than
    /// the one pinned), and the user has not accepted the new key. Until they do
    /// (`Client::accept_master_key_change`, after comparing the new safety number) or remove
    /// the member, texts to the group are refused with
    /// [`ClientError::MasterKeyChanged`], as sends to that account are in a 1:1
    /// conversation: the account's new devices are never added on the new key's word alone.
    /// Reported once per group and new key, as a notice
    /// ([`Engine::take_notices`]).
    KeyChanged {
        /// The group.
        group: String,
        /// The member account.
        user: String,
    },
    /// A member account asked to leave; this device committed its removal if it is the
    /// group's remover (see [`Engine::receive_group`]).
    LeaveRequested {
        /// The group.
        group: String,
        /// The leaving account.
        user: String,
    },
    /// Texts of `from` in the group that a later text of theirs names were never received:
    /// the broker may have withheld them (see the `chain` module). `count` is how many are
    /// missing now; 0 once they all arrived.
    MaybeMissing {
        /// The group.
        group: String,
        /// The member account.
        from: String,
        /// Its texts named and not received.
        count: usize,
    },
}

/// A `group_send` to make: the frame, its envelope id, and its channel.
#[derive(Debug)]
pub struct GroupSend {
    /// Its envelope id (retries keep it).
    pub id: EnvelopeId,
    /// The frame.
    pub frame: ClientFrame,
    /// Over the anonymous `/v1/sealed` (every recipient admitted by its delivery token),
    /// else the authenticated connection.
    pub sealed: bool,
}

/// A change of members: the Commit (ordered at the hub) and, for additions, the Welcome and
/// the group's name for the new members.
#[derive(Debug)]
pub struct GroupChange {
    /// The group (hex id).
    pub group: String,
    /// The Commit, to every current member device (a sealed part, and an authenticated
    /// one for members whose delivery token this device lacks; the first part is the one
    /// the hub orders).
    pub commit: Vec<GroupSend>,
    /// After the Commit was accepted: the Welcome to the added devices.
    pub welcome: Vec<GroupSend>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn group_error(e: GroupError) -> ClientError {
    ClientError::Invalid(format!("group: {e}"))
}

fn send_frame(
    id: EnvelopeId,
    ciphertext: Vec<u8>,
    recipients: Vec<GroupRecipient>,
    order: Option<Order>,
    sealed: bool,
) -> GroupSend {
    let frame = ClientFrame::GroupSend {
        id,
        class: Class::Durable,
        ttl_secs: GROUP_TTL_SECS,
        ciphertext,
        recipients,
        order,
    };
    GroupSend { id, frame, sealed }
}

/// A group's recipients split by channel: those whose delivery token this device holds
/// (sealed: the broker learns no sender) and the others (authenticated).
struct Split {
    sealed: Vec<GroupRecipient>,
    open: Vec<GroupRecipient>,
}

impl GroupSend {
    /// The same send again, for the recipients of `stale` (answered `stale_devices`), to
    /// their current devices: same id, bytes, channel and tokens. `None` if nothing is stale.
    pub fn resend_to_current(&self, stale: &[RecipientRefusal]) -> Option<GroupSend> {
        let ClientFrame::GroupSend {
            id,
            class,
            ttl_secs,
            ciphertext,
            recipients,
            ..
        } = &self.frame
        else {
            return None;
        };
        let again: Vec<GroupRecipient> = stale
            .iter()
            .filter(|r| r.code == ErrorCode::StaleDevices)
            .map(|r| GroupRecipient {
                to: r.to.clone(),
                devices: r.current_devices.clone(),
                delivery_token: recipients
                    .iter()
                    .find(|x| x.to == r.to)
                    .and_then(|x| x.delivery_token.clone()),
            })
            .collect();
        if again.is_empty() {
            return None;
        }
        Some(GroupSend {
            id: *id,
            frame: ClientFrame::GroupSend {
                id: *id,
                class: *class,
                ttl_secs: *ttl_secs,
                ciphertext: ciphertext.clone(),
                recipients: again,
                // The hub took the epoch already: this only delivers.
                order: None,
            },
            sealed: self.sealed,
        })
    }
}

impl Engine {
    /// Whether this device has made its KeyPackages yet (else: publish some).
    pub fn has_key_packages(&self) -> bool {
        self.record.next_key_package_id != 0
    }

    /// This device's MLS state, made on first use.
    fn group_keys(&mut self) -> Result<&GroupKeys, ClientError> {
        if self.mls.is_none() {
            let keys = match &self.record.mls {
                Some(saved) => GroupKeys::from_bytes(&saved.0).map_err(group_error)?,
                None => GroupKeys::new(
                    self.state.user(),
                    self.state.device_id(),
                    &self.state.device,
                ),
            };
            self.mls = Some(keys);
        }
        Ok(self.mls.as_ref().expect("set above"))
    }

    /// Writes the MLS state into the record (after anything that changed it).
    fn save_group_keys(&mut self) {
        if let Some(keys) = &self.mls {
            self.record.mls = Some(Secret::new(&keys.to_bytes()));
        }
    }

    fn entry(&self, group: &str) -> Result<&GroupEntry, ClientError> {
        self.record
            .groups
            .get(group)
            .ok_or_else(|| ClientError::Invalid("no such group".into()))
    }

    /// `count` new one-time KeyPackages (and a last-resort one, as the fallback, the first
    /// time) to upload, with their ids.
    pub fn key_packages(&mut self, count: usize) -> Result<KeyUpload, ClientError> {
        let first = self.record.next_key_package_id == 0;
        let keys = self.group_keys()?;
        let packages = keys.key_packages(count).map_err(group_error)?;
        let last_resort = if first {
            Some(keys.last_resort_key_package().map_err(group_error)?)
        } else {
            None
        };
        let start = self.record.next_key_package_id.max(1);
        self.record.next_key_package_id = start + packages.len() as u64 + 1;
        self.save_group_keys();
        Ok(KeyUpload {
            one_time: (start..).zip(packages).collect(),
            fallback: last_resort.map(|p| (0, p)),
        })
    }

    /// Creates a group named `name`, this device its only member, its Commits ordered by this
    /// account's domain; answers its id (hex).
    pub fn create_group(&mut self, name: &str) -> Result<String, ClientError> {
        let id = self.group_keys()?.create().map_err(group_error)?;
        self.save_group_keys();
        let hub = self
            .state
            .user()
            .rsplit_once('@')
            .map(|(_, d)| d.to_owned())
            .unwrap_or_default();
        let key = hex(&id);
        self.record.groups.insert(
            key.clone(),
            GroupEntry {
                id: ByteBuf::from(id),
                hub,
                name: name.to_owned(),
                messages: VecDeque::new(),
                left: false,
                tokens: BTreeMap::new(),
                token_shared: false,
            },
        );
        Ok(key)
    }

    /// The groups this device is (or was) in.
    pub fn groups(&mut self) -> Vec<GroupInfo> {
        let keys: Vec<String> = self.record.groups.keys().cloned().collect();
        keys.iter()
            .filter_map(|g| self.group_info(g).ok())
            .collect()
    }

    /// One group, with its members and whether each is vouched for.
    pub fn group_info(&mut self, group: &str) -> Result<GroupInfo, ClientError> {
        let entry = self.entry(group)?.clone();
        let (epoch, members) = if entry.left {
            (0, Vec::new())
        } else {
            let keys = self.group_keys()?;
            let epoch = keys.epoch(&entry.id).map_err(group_error)?;
            let members = keys.members(&entry.id).map_err(group_error)?;
            let members = members
                .iter()
                .map(|m| (m.id.user.clone(), m.id.device, self.vouched(m)))
                .collect();
            (epoch, members)
        };
        Ok(GroupInfo {
            id: group.to_owned(),
            name: entry.name,
            hub: entry.hub,
            epoch,
            members,
            left: entry.left,
        })
    }

    /// A group's last messages: (sender, device, sender's clock, text).
    pub fn group_messages(
        &self,
        group: &str,
    ) -> Result<Vec<(String, u32, u64, String)>, ClientError> {
        Ok(self
            .entry(group)?
            .messages
            .iter()
            .map(|m| (m.from.clone(), m.device, m.time_ms, m.body.clone()))
            .collect())
    }

    /// Whether `member`'s credential verifies with the key its account's verified list has
    /// for that device.
    fn vouched(&self, member: &Member) -> bool {
        self.listed_keys(&member.id.user, member.id.device)
            .is_some_and(|keys| member.verify(&keys.ed25519))
    }

    /// Every member device of a group, by account: the recipients of a group send.
    fn recipients(&mut self, id: &[u8]) -> Result<BTreeMap<String, BTreeSet<u32>>, ClientError> {
        let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for m in self.group_keys()?.members(id).map_err(group_error)? {
            out.entry(m.id.user).or_default().insert(m.id.device);
        }
        Ok(out)
    }

    fn live_entry(&self, group: &str) -> Result<GroupEntry, ClientError> {
        let entry = self.entry(group)?.clone();
        if entry.left {
            return Err(ClientError::Invalid(
                "this device is no longer in the group".into(),
            ));
        }
        Ok(entry)
    }

    /// A text for the group: a `group_send` to every member device (this one too: its copy
    /// comes back and is recognised). Save before sending.
    pub fn group_text(
        &mut self,
        group: &str,
        text: &str,
        now_ms: u64,
    ) -> Result<Vec<GroupSend>, ClientError> {
        if text.len() > MAX_GROUP_TEXT_BYTES {
            return Err(ClientError::Invalid(format!(
                "a group message is at most {MAX_GROUP_TEXT_BYTES} bytes"
            )));
        }
        let entry = self.live_entry(group)?;
        // The text's own id (the first part's envelope id), numbered in this device's chain.
        let id = EnvelopeId(rand::random());
        let expires_ms = now_ms.saturating_add(u64::from(GROUP_TTL_SECS) * 1000);
        let link = self.group_link(group, id, expires_ms);
        let payload = GroupPayload::Text {
            body: text.to_owned(),
            sent_ms: now_ms,
            link: link.as_ref().map(Link::to_fields),
        };
        let sends = self.group_payload_as(&entry, &payload, Some(id))?;
        let (user, device) = (self.state.user().to_owned(), self.state.device_id());
        self.push_group_message(group, &user, device, now_ms, text);
        Ok(sends)
    }

    /// Splits `recipients` by channel. This account is always sealed, under its own token:
    /// every group send names every member account, so naming ours says nothing of who sent.
    fn split(&self, entry: &GroupEntry, recipients: &BTreeMap<String, BTreeSet<u32>>) -> Split {
        let mut split = Split {
            sealed: Vec::new(),
            open: Vec::new(),
        };
        for (to, devices) in recipients {
            let token = if to == self.state.user() {
                Some(self.record.delivery_token.0.to_vec()).filter(|t| !t.is_empty())
            } else {
                entry
                    .tokens
                    .get(to)
                    .or_else(|| {
                        self.record
                            .contacts
                            .get(to)
                            .and_then(|c| c.delivery_token.as_ref())
                    })
                    .map(|t| t.0.to_vec())
            };
            let devices = devices
                .iter()
                .copied()
                .map(sealpost_proto::DeviceId)
                .collect();
            match token {
                Some(t) => split.sealed.push(GroupRecipient {
                    to: to.clone(),
                    devices,
                    delivery_token: Some(t),
                }),
                None => split.open.push(GroupRecipient {
                    to: to.clone(),
                    devices,
                    delivery_token: None,
                }),
            }
        }
        split
    }

    /// The sends of one message whose bytes are the same for everyone (a Commit, a
    /// Welcome): a sealed part and an authenticated part under one id (the hub takes an
    /// epoch once per id). The authenticated part names the sender of the sealed one too:
    /// it exists only while some member's delivery token has not reached this device.
    fn same_bytes(
        &mut self,
        entry: &GroupEntry,
        recipients: &BTreeMap<String, BTreeSet<u32>>,
        bytes: Vec<u8>,
        order: Option<Order>,
    ) -> Vec<GroupSend> {
        let Split { sealed, open } = self.split(entry, recipients);
        let id = EnvelopeId(rand::random());
        let mut sends = Vec::new();
        // The first part is the one the hub orders; once it took the epoch, the second only
        // delivers (unordered, so that a later Commit of another member cannot refuse it).
        let mut order = order;
        if !sealed.is_empty() {
            sends.push(send_frame(id, bytes.clone(), sealed, order.take(), true));
        }
        if !open.is_empty() {
            sends.push(send_frame(id, bytes, open, order, false));
        }
        // Our own copy comes back: recognised by id, acked unread.
        self.record.seen.insert(id.0);
        sends
    }

    /// The sends of an application message: one MLS message for the members this device
    /// sends to sealed, another (its own bytes and id, so that nothing ties the two) for the
    /// others.
    fn group_payload(
        &mut self,
        entry: &GroupEntry,
        payload: &GroupPayload,
    ) -> Result<Vec<GroupSend>, ClientError> {
        self.group_payload_as(entry, payload, None)
    }

    /// [`Engine::group_payload`], its first part sent as envelope `first` if given.
    fn group_payload_as(
        &mut self,
        entry: &GroupEntry,
        payload: &GroupPayload,
        mut first: Option<EnvelopeId>,
    ) -> Result<Vec<GroupSend>, ClientError> {
        let data = Zeroizing::new(
            rmp_serde::to_vec(payload).map_err(|e| ClientError::Invalid(e.to_string()))?,
        );
        let recipients = self.recipients(&entry.id)?;
        let Split { sealed, open } = self.split(entry, &recipients);
        let mut sends = Vec::new();
        for (part, is_sealed) in [(sealed, true), (open, false)] {
            if part.is_empty() {
                continue;
            }
            let message = self
                .group_keys()?
                .encrypt(&entry.id, &data)
                .map_err(group_error)?;
            let id = first.take().unwrap_or_else(|| EnvelopeId(rand::random()));
            self.record.seen.insert(id.0);
            let wire = GroupWire::Message(message).to_bytes();
            sends.push(send_frame(id, wire, part, None, is_sealed));
        }
        self.save_group_keys();
        Ok(sends)
    }

    fn push_group_message(
        &mut self,
        group: &str,
        from: &str,
        device: u32,
        time_ms: u64,
        body: &str,
    ) {
        if let Some(entry) = self.record.groups.get_mut(group) {
            entry.messages.push_back(GroupMessage {
                from: from.to_owned(),
                device,
                time_ms,
                body: body.to_owned(),
            });
            while entry.messages.len() > MESSAGES_PER_GROUP {
                entry.messages.pop_front();
            }
        }
    }

    /// Adds devices to a group from their claimed KeyPackages (user, device, KeyPackage):
    /// each must be for that device and certified by the key its account's verified device
    /// list has for it (fetch the lists first). Answers the Commit to send (ordered at the
    /// hub) and the Welcome to send once it is accepted ([`Engine::commit_answer`]).
    pub fn add_to_group(
        &mut self,
        group: &str,
        claimed: &[(String, u32, Vec<u8>)],
    ) -> Result<GroupChange, ClientError> {
        let entry = self.live_entry(group)?;
        let mut packages = Vec::new();
        let mut added: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for (user, device, bytes) in claimed {
            let id = MemberId {
                user: user.clone(),
                device: *device,
            };
            let (package, member) = self
                .group_keys()?
                .check_key_package(bytes, &id)
                .map_err(group_error)?;
            if !self.vouched(&member) {
                return Err(ClientError::Invalid(format!(
                    "{user}'s device {device} is not in {user}'s verified device list"
                )));
            }
            packages.push(package);
            added.entry(user.clone()).or_default().insert(*device);
        }
        let members = self.recipients(&entry.id)?;
        let devices = members.values().map(BTreeSet::len).sum::<usize>() + packages.len();
        if devices > MAX_GROUP_MEMBER_DEVICES {
            return Err(ClientError::Invalid(format!(
                "a group has at most {MAX_GROUP_MEMBER_DEVICES} member devices"
            )));
        }
        let commit = self
            .group_keys()?
            .add(&entry.id, packages)
            .map_err(group_error)?;
        Ok(self.change(group, &entry, &members, commit, &added))
    }

    /// The sends of this device's Commit: to the group's current members (`members`),
    /// ordered at the hub; its Welcome, if any, to the `added` devices.
    fn change(
        &mut self,
        group: &str,
        entry: &GroupEntry,
        members: &BTreeMap<String, BTreeSet<u32>>,
        commit: crate::crypto::group::Commit,
        added: &BTreeMap<String, BTreeSet<u32>>,
    ) -> GroupChange {
        self.save_group_keys();
        let order = Order {
            group: entry.id.to_vec(),
            epoch: commit.epoch,
            hub: entry.hub.clone(),
        };
        let wire = GroupWire::Message(commit.commit).to_bytes();
        let commit_sends = self.same_bytes(entry, members, wire, Some(order));
        let welcome = match commit.welcome {
            Some(welcome) => {
                let wire = GroupWire::Welcome {
                    welcome,
                    hub: entry.hub.clone(),
                };
                self.same_bytes(entry, added, wire.to_bytes(), None)
            }
            None => Vec::new(),
        };
        GroupChange {
            group: group.to_owned(),
            commit: commit_sends,
            welcome,
        }
    }

    /// Removes every device of `user` from a group (or, with `devices`, only those).
    pub fn remove_from_group(
        &mut self,
        group: &str,
        user: &str,
        devices: Option<&[u32]>,
    ) -> Result<GroupChange, ClientError> {
        let entry = self.live_entry(group)?;
        let members = self.group_keys()?.members(&entry.id).map_err(group_error)?;
        let leaves: Vec<u32> = members
            .iter()
            .filter(|m| m.id.user == user && devices.is_none_or(|d| d.contains(&m.id.device)))
            .map(|m| m.leaf)
            .collect();
        if leaves.is_empty() {
            return Err(ClientError::Invalid(format!("{user} is not in the group")));
        }
        let recipients = self.recipients(&entry.id)?;
        let commit = self
            .group_keys()?
            .remove(&entry.id, &leaves)
            .map_err(group_error)?;
        Ok(self.change(group, &entry, &recipients, commit, &BTreeMap::new()))
    }

    /// The hub's answer to this device's Commit: `accepted` merges it (the group moves on);
    /// otherwise it is dropped, and the change must be made again once what arrived is
    /// received (it was made on an epoch another Commit took).
    pub fn commit_answer(&mut self, group: &str, accepted: bool) -> Result<(), ClientError> {
        let id = self.entry(group)?.id.to_vec();
        let keys = self.group_keys()?;
        if accepted {
            keys.merge_pending(&id).map_err(group_error)?;
        } else {
            keys.clear_pending(&id).map_err(group_error)?;
        }
        self.save_group_keys();
        Ok(())
    }

    /// The group's name for its new members, sent after their Welcome.
    pub fn group_name_for_members(&mut self, group: &str) -> Result<Vec<GroupSend>, ClientError> {
        let entry = self.live_entry(group)?;
        let payload = GroupPayload::Name {
            name: entry.name.clone(),
        };
        self.group_payload(&entry, &payload)
    }

    /// This account's delivery token for the group's members, so that they send to it
    /// sealed: sent once this device is in the group (created or joined).
    pub fn group_token_share(&mut self, group: &str) -> Result<Vec<GroupSend>, ClientError> {
        let entry = self.live_entry(group)?;
        let token = ByteBuf::from(self.record.delivery_token.0.to_vec());
        let sends = self.group_payload(&entry, &GroupPayload::Token { token })?;
        if let Some(entry) = self.record.groups.get_mut(group) {
            entry.token_shared = true;
        }
        Ok(sends)
    }

    /// Whether this account's delivery token went to the group already.
    pub fn group_token_shared(&self, group: &str) -> bool {
        self.record
            .groups
            .get(group)
            .is_some_and(|g| g.token_shared)
    }

    /// Leaving: tells the group, whose remover (the member at the lowest leaf of another
    /// account) commits this account's removal.
    pub fn leave_group(&mut self, group: &str) -> Result<Vec<GroupSend>, ClientError> {
        let entry = self.live_entry(group)?;
        self.group_payload(&entry, &GroupPayload::Leave)
    }

    /// Opens a group envelope: its events, or a rejection (malformed, a group this device is
    /// not in, an epoch whose secrets are gone). A message for a later epoch is held and read
    /// once the Commit before it arrives. Either way the envelope is handled: ack it.
    pub fn open_group(&mut self, id: EnvelopeId, ciphertext: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        match self.receive_group(id, ciphertext, &mut events) {
            // A group's envelopes reach every device of a member account; a device that is
            // not in the group (linked since, or a Welcome for another device) drops them.
            Ok(()) | Err(GroupError::NotMember) => {}
            Err(error) => events.push(Event::Rejected {
                id,
                error: EnvelopeError::Group(error),
            }),
        }
        self.record.seen.insert(id.0);
        events
    }

    fn receive_group(
        &mut self,
        id: EnvelopeId,
        ciphertext: &[u8],
        events: &mut Vec<Event>,
    ) -> Result<(), GroupError> {
        match GroupWire::from_bytes(ciphertext)? {
            GroupWire::Welcome { welcome, hub } => {
                let keys = self
                    .group_keys()
                    .map_err(|_| GroupError::Malformed("group state"))?;
                let (group_id, adder) = keys.join(&welcome)?;
                let members = keys.members(&group_id)?;
                self.save_group_keys();
                let key = hex(&group_id);
                // Added again after being removed (or leaving): the conversation goes on from
                // what this device had.
                let before = self.record.groups.remove(&key);
                let entry = GroupEntry {
                    id: ByteBuf::from(group_id),
                    hub,
                    name: before.as_ref().map(|b| b.name.clone()).unwrap_or_default(),
                    messages: before.map(|b| b.messages).unwrap_or_default(),
                    left: false,
                    tokens: BTreeMap::new(),
                    token_shared: false,
                };
                self.record.groups.insert(key.clone(), entry);
                events.push(Event::Group(GroupEvent::Joined {
                    group: key.clone(),
                    by: adder.id.user,
                }));
                for m in members.iter().filter(|m| !self.vouched(m)) {
                    events.push(Event::Group(GroupEvent::Unverified {
                        group: key.clone(),
                        user: m.id.user.clone(),
                        device: m.id.device,
                    }));
                }
            }
            GroupWire::Message(mls) => match self.process_group(&mls, events) {
                Err(GroupError::FutureEpoch) => {
                    if self.record.group_held.len() >= HELD_GROUP_MESSAGES {
                        return Err(GroupError::FutureEpoch);
                    }
                    self.record.group_held.push_back(HeldGroupMessage {
                        id: id.0,
                        mls: ByteBuf::from(mls),
                    });
                    return Ok(());
                }
                other => other?,
            },
        }
        self.retry_held_group(events);
        Ok(())
    }

    /// Held messages whose epoch may now be reached, oldest first, until none moves.
    fn retry_held_group(&mut self, events: &mut Vec<Event>) {
        loop {
            let held: Vec<HeldGroupMessage> = self.record.group_held.drain(..).collect();
            let before = held.len();
            for h in held {
                match self.process_group(&h.mls, events) {
                    Err(GroupError::FutureEpoch) => self.record.group_held.push_back(h),
                    Ok(()) => {}
                    Err(error) => events.push(Event::Rejected {
                        id: EnvelopeId(h.id),
                        error: EnvelopeError::Group(error),
                    }),
                }
            }
            if self.record.group_held.len() == before {
                return;
            }
        }
    }

    fn process_group(&mut self, mls: &[u8], events: &mut Vec<Event>) -> Result<(), GroupError> {
        let (group_id, _) = GroupKeys::route(mls)?;
        let key = hex(&group_id);
        if self.record.groups.get(&key).is_none_or(|g| g.left) {
            return Err(GroupError::NotMember);
        }
        let keys = self
            .group_keys()
            .map_err(|_| GroupError::Malformed("group state"))?;
        let processed = keys.process(mls);
        self.save_group_keys();
        match processed? {
            Processed::Own => {}
            Processed::Application { sender, data } => {
                let payload: GroupPayload = rmp_serde::from_slice(&data)
                    .map_err(|_| GroupError::Malformed("group message"))?;
                match payload {
                    GroupPayload::Text {
                        body,
                        sent_ms,
                        link,
                    } => {
                        // The sender's clock stands for now when judging what its link names
                        // (the periodic expiry sweep uses this device's clock).
                        let missing = link
                            .and_then(|l| Link::from_fields(l).ok())
                            .and_then(|link| {
                                self.group_chain_received(
                                    &key,
                                    &sender.id.user,
                                    sender.id.device,
                                    &link,
                                    sent_ms,
                                )
                            })
                            .map(|count| {
                                Event::Group(GroupEvent::MaybeMissing {
                                    group: key.clone(),
                                    from: sender.id.user.clone(),
                                    count,
                                })
                            });
                        self.push_group_message(
                            &key,
                            &sender.id.user,
                            sender.id.device,
                            sent_ms,
                            &body,
                        );
                        events.push(Event::Group(GroupEvent::Message {
                            group: key,
                            from: sender.id.user,
                            device: sender.id.device,
                            text: body,
                            sent_ms,
                        }));
                        events.extend(missing);
                    }
                    GroupPayload::Name { name } => {
                        if let Some(entry) = self.record.groups.get_mut(&key) {
                            entry.name = name;
                        }
                    }
                    // Acting on a member's word (removing its account, sealing to it) needs
                    // the member to be a device its account's verified list vouches for.
                    GroupPayload::Leave | GroupPayload::Token { .. } if !self.vouched(&sender) => {}
                    GroupPayload::Leave => {
                        events.push(Event::Group(GroupEvent::LeaveRequested {
                            group: key,
                            user: sender.id.user,
                        }));
                    }
                    GroupPayload::Token { token } => {
                        if let Some(entry) = self.record.groups.get_mut(&key)
                            && !token.is_empty()
                            && token.len() <= 64
                        {
                            entry.tokens.insert(sender.id.user, Secret::new(&token));
                        }
                    }
                }
            }
            Processed::Commit { sender, changes } => {
                if changes.self_removed {
                    if let Some(entry) = self.record.groups.get_mut(&key) {
                        entry.left = true;
                    }
                    events.push(Event::Group(GroupEvent::Removed { group: key }));
                    return Ok(());
                }
                for m in changes.added.iter().filter(|m| !self.vouched(m)) {
                    events.push(Event::Group(GroupEvent::Unverified {
                        group: key.clone(),
                        user: m.id.user.clone(),
                        device: m.id.device,
                    }));
                }
                events.push(Event::Group(GroupEvent::Changed {
                    group: key,
                    by: sender.id.user,
                    added: changes
                        .added
                        .into_iter()
                        .map(|m| (m.id.user, m.id.device))
                        .collect(),
                    removed: changes
                        .removed
                        .into_iter()
                        .map(|m| (m.user, m.device))
                        .collect(),
                }));
            }
        }
        Ok(())
    }

    /// `user`'s master key changed (seen for the first time): a [`GroupEvent::KeyChanged`]
    /// notice for each group this device is in that has `user` as a member.
    pub(crate) fn note_group_key_change(&mut self, user: &str) {
        if user == self.state.user() {
            return;
        }
        let live: Vec<(String, Vec<u8>)> = self
            .record
            .groups
            .iter()
            .filter(|(_, g)| !g.left)
            .map(|(k, g)| (k.clone(), g.id.to_vec()))
            .collect();
        for (group, id) in live {
            let Ok(keys) = self.group_keys() else { return };
            let member = keys
                .members(&id)
                .is_ok_and(|ms| ms.iter().any(|m| m.id.user == user));
            if member {
                self.notices.push(Event::Group(GroupEvent::KeyChanged {
                    group,
                    user: user.to_owned(),
                }));
            }
        }
    }

    /// Whether `user`'s `device` in a group is vouched for by the verified list held now.
    pub fn member_vouched(&mut self, group: &str, user: &str, device: u32) -> bool {
        let Ok(entry) = self.live_entry(group) else {
            return false;
        };
        let Ok(members) = self
            .group_keys()
            .and_then(|k| k.members(&entry.id).map_err(group_error))
        else {
            return false;
        };
        members
            .iter()
            .filter(|m| m.id.user == user && m.id.device == device)
            .any(|m| self.vouched(m))
    }

    /// Whether this device should commit the removal of `user`, who asked to leave: it is
    /// the member of another account at the lowest leaf (so that one member does it).
    pub fn is_group_remover(&mut self, group: &str, leaving: &str) -> Result<bool, ClientError> {
        let entry = self.live_entry(group)?;
        let me = (self.state.user().to_owned(), self.state.device_id());
        let members = self.group_keys()?.members(&entry.id).map_err(group_error)?;
        Ok(members
            .iter()
            .filter(|m| m.id.user != leaving)
            .min_by_key(|m| m.leaf)
            .is_some_and(|m| (m.id.user.clone(), m.id.device) == me))
    }

    /// Devices of `user` in the group that its current device list (`current`) no longer
    /// has, and listed devices not in the group: what a `stale_devices` answer asks to fix.
    pub fn group_device_drift(
        &mut self,
        group: &str,
        user: &str,
        current: &[u32],
    ) -> Result<(Vec<u32>, Vec<u32>), ClientError> {
        let entry = self.live_entry(group)?;
        let members = self.group_keys()?.members(&entry.id).map_err(group_error)?;
        let have: BTreeSet<u32> = members
            .iter()
            .filter(|m| m.id.user == user)
            .map(|m| m.id.device)
            .collect();
        let current: BTreeSet<u32> = current.iter().copied().collect();
        Ok((
            have.difference(&current).copied().collect(),
            current.difference(&have).copied().collect(),
        ))
    }
}
