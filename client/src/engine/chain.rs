//! Withheld-message detection, end to end: the broker numbers what it delivers, so it could
//! drop one message of a conversation and renumber the rest unnoticed. Instead each sending
//! device numbers its own messages to each conversation and, inside the encrypted text, names
//! the earlier ones the broker accepted ([`Link`]). A recipient that is named a message it
//! never received knows it is missing, says so ([`Event::MaybeMissing`]), and stops saying so
//! once it arrives.
//!
//! ```text
//!  alice's device          broker            bob's device
//!  #1 "hi"            ──▶  delivers   ──▶    #1 received
//!  #2 "see you"       ──▶  WITHHOLDS
//!  #3 "?" names #2    ──▶  delivers   ──▶    #3 names #2, never received: "may be missing"
//! ```
//!
//! - Only messages the broker accepted are named, so a send that failed for good never shows
//!   up as missing; a message whose send is abandoned gives its names to the next one.
//! - Texts carry the link; files are numbered and named by the next text. A text's link says
//!   its own envelope id, so what was received is recorded by an id the broker cannot change.
//! - A named message the broker would have let expire (a disappearing timer, the usual TTL)
//!   is not missing, and a missing one stops being reported once it would have expired.
//! - What was received is remembered per sending device, so a busy device forgetting old
//!   envelope ids cannot make an old message look missing.
//! - A chain is judged from the first linked text this device sees of it (its number is the
//!   floor): messages sent before (to a device linked later) are not missing.
//! - Redelivery and retries reuse the envelope id, which the engine deduplicates before this
//!   runs: they can never look like a gap.

use std::collections::{BTreeMap, VecDeque};

use sealpost_proto::EnvelopeId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{Engine, Event};
use crate::crypto::{Link, MAX_LINK_PREV, Named, Payload};

/// Most accepted messages kept waiting to be named, sends waiting for an answer, and missing
/// messages remembered per sending device: a chain that long is a broker withholding a lot,
/// which one warning covers.
const MAX_KEPT: usize = 64;

/// Ids of messages received from one sending device that are remembered to judge what its
/// texts name. A text names what its device sent since its previous text (a few messages),
/// so this is ample.
const MAX_RECEIVED: usize = 1024;

/// One numbered message: its number, envelope id and when the broker lets it expire.
#[derive(Clone, Serialize, Deserialize)]
struct Numbered {
    n: u64,
    id: ByteBuf,
    expires_ms: u64,
}

impl Numbered {
    fn named(&self) -> Option<Named> {
        Some(Named {
            n: self.n,
            id: self.id.as_slice().try_into().ok()?,
            expires_ms: self.expires_ms,
        })
    }
}

/// A send waiting for the broker's answer.
#[derive(Clone, Serialize, Deserialize)]
struct PendingSend {
    message: Numbered,
    /// What its text named (given to the next text if the send is abandoned).
    named: Vec<Numbered>,
}

/// This device's chain to one conversation.
#[derive(Clone, Default, Serialize, Deserialize)]
pub(crate) struct ChainOut {
    /// The next message's number.
    next: u64,
    /// Messages the broker accepted that no text has named yet, oldest first.
    unreferenced: Vec<Numbered>,
    /// Sends not answered yet, by envelope id.
    pending: BTreeMap<ByteBuf, PendingSend>,
}

/// How many of a group member's texts may be missing now (see `Engine::expire_missing`).
pub(crate) struct GroupMissing {
    pub(crate) group: String,
    pub(crate) from: String,
    pub(crate) count: usize,
}

/// What this device knows of one contact device's chain to it.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct ChainIn {
    /// Messages numbered below this were sent before this device saw the chain.
    floor: u64,
    /// Envelope ids of its texts (as the texts themselves say) and files received, newest
    /// last.
    received: VecDeque<ByteBuf>,
    /// Named by a later text and not received: envelope id → (number, expiry).
    missing: BTreeMap<ByteBuf, (u64, u64)>,
}

impl Engine {
    /// Numbers a text or file to `to` sent as envelope `id` (kept by the broker until
    /// `expires_ms`), and links a text to what came before it. Other payloads are left alone.
    pub(crate) fn link_outgoing(
        &mut self,
        to: &str,
        id: EnvelopeId,
        payload: &mut Payload,
        expires_ms: u64,
    ) {
        if to == self.state.user()
            || !matches!(payload, Payload::Text { .. } | Payload::File { .. })
        {
            return;
        }
        let text = matches!(payload, Payload::Text { .. });
        let (message, named) = self.number(to, id, text, expires_ms);
        set_link(payload, &message, &named);
    }

    /// The link of a text this device sends to `group` (the text's own id `id`): numbered in
    /// this device's chain to the group, naming its texts the broker accepted for every
    /// member ([`Engine::chain_accepted`]) since the last one.
    pub(crate) fn group_link(
        &mut self,
        group: &str,
        id: EnvelopeId,
        expires_ms: u64,
    ) -> Option<Link> {
        let (message, named) = self.number(&group_key(group), id, true, expires_ms);
        Some(Link {
            n: message.n,
            id: message.id.as_slice().try_into().ok()?,
            prev: named.iter().filter_map(Numbered::named).collect(),
        })
    }

    /// The next message of this device's chain `key`: its number, and for a text what it
    /// names. It waits for the broker's answer ([`Engine::chain_accepted`]).
    fn number(
        &mut self,
        key: &str,
        id: EnvelopeId,
        text: bool,
        expires_ms: u64,
    ) -> (Numbered, Vec<Numbered>) {
        let chain = self.record.chains_out.entry(key.to_owned()).or_default();
        let message = Numbered {
            n: chain.next,
            id: ByteBuf::from(id.0.to_vec()),
            expires_ms,
        };
        chain.next += 1;
        let named: Vec<Numbered> = if text {
            let count = chain.unreferenced.len().min(MAX_LINK_PREV);
            chain.unreferenced.drain(..count).collect()
        } else {
            Vec::new()
        };
        // Sends never answered (a crash, a lost page) must not pile up: the oldest goes.
        if chain.pending.len() >= MAX_KEPT
            && let Some(oldest) = chain
                .pending
                .iter()
                .min_by_key(|(_, p)| p.message.n)
                .map(|(k, _)| k.clone())
        {
            chain.pending.remove(&oldest);
        }
        chain.pending.insert(
            message.id.clone(),
            PendingSend {
                message: message.clone(),
                named: named.clone(),
            },
        );
        (message, named)
    }

    /// A send of envelope `id` started again (its first start's state was lost, as a page's
    /// retry after `stale_devices`): it carries the same link as the first time.
    pub(crate) fn relink(&mut self, to: &str, id: EnvelopeId, payload: &mut Payload) {
        if let Some(pending) = self
            .record
            .chains_out
            .get(to)
            .and_then(|c| c.pending.get(&ByteBuf::from(id.0.to_vec())))
        {
            set_link(payload, &pending.message, &pending.named);
        }
    }

    /// The broker accepted envelope `id`: if it is a numbered message, the next text names it.
    pub(crate) fn chain_accepted(&mut self, id: EnvelopeId) {
        for chain in self.record.chains_out.values_mut() {
            if let Some(pending) = chain.pending.remove(&ByteBuf::from(id.0.to_vec())) {
                chain.unreferenced.push(pending.message);
                trim_front(&mut chain.unreferenced, MAX_KEPT);
                return;
            }
        }
    }

    /// The group text sent as `id` (its first part's envelope id) was taken for every member
    /// device (no part refused, no stale device set): this device's next text to the group
    /// names it.
    pub fn group_text_accepted(&mut self, id: EnvelopeId) {
        self.chain_accepted(id);
    }

    /// A driver that keeps no `Send` (a page) gave up sending envelope `id` to `to`: what it
    /// named goes to the next text.
    pub fn send_given_up(&mut self, to: &str, id: EnvelopeId) {
        self.chain_abandoned(to, id);
    }

    /// The send of envelope `id` to `to` was given up: what it named goes to the next text.
    pub(crate) fn chain_abandoned(&mut self, to: &str, id: EnvelopeId) {
        let Some(chain) = self.record.chains_out.get_mut(to) else {
            return;
        };
        if let Some(pending) = chain.pending.remove(&ByteBuf::from(id.0.to_vec())) {
            chain.unreferenced.splice(0..0, pending.named);
            trim_front(&mut chain.unreferenced, MAX_KEPT);
        }
    }

    /// A text or file from `from`'s `device` arrived as envelope `id`, with `link` if a text
    /// carried one. Returns the event to report if the number of messages from `from` that
    /// may be missing changed.
    pub(crate) fn chain_received(
        &mut self,
        from: &str,
        device: u32,
        id: EnvelopeId,
        link: Option<&Link>,
        now_ms: u64,
    ) -> Option<Event> {
        let (before, after) = self.receive_link(from, device, id, link, now_ms);
        (after != before).then(|| Event::MaybeMissing {
            peer: from.to_owned(),
            count: after,
        })
    }

    /// A text from `from`'s `device` in `group`, with its link. Returns how many of `from`'s
    /// texts in the group may be missing now, if that changed.
    pub(crate) fn group_chain_received(
        &mut self,
        group: &str,
        from: &str,
        device: u32,
        link: &Link,
        now_ms: u64,
    ) -> Option<usize> {
        let key = group_member_key(group, from);
        let (before, after) =
            self.receive_link(&key, device, EnvelopeId(link.id), Some(link), now_ms);
        (after != before).then_some(after)
    }

    /// Records a received message of chain `key` (a contact, or a group member) and what its
    /// link names: (missing before, missing after).
    fn receive_link(
        &mut self,
        key: &str,
        device: u32,
        id: EnvelopeId,
        link: Option<&Link>,
        now_ms: u64,
    ) -> (usize, usize) {
        let before = self.missing_from(key);
        let chains = self.record.chains_in.entry(key.to_owned()).or_default();
        let chain = chains.entry(device).or_insert_with(|| ChainIn {
            floor: link.map_or(u64::MAX, |l| l.n),
            received: VecDeque::new(),
            missing: BTreeMap::new(),
        });
        // A text says its own id (the broker could deliver it under another one).
        let own = ByteBuf::from(link.map_or(id.0, |l| l.id).to_vec());
        chain.missing.remove(&own);
        chain
            .missing
            .retain(|_, (_, expires_ms)| *expires_ms > now_ms);
        chain.received.push_back(own);
        if chain.received.len() > MAX_RECEIVED {
            chain.received.pop_front();
        }
        if let Some(link) = link {
            chain.floor = chain.floor.min(link.n);
            for named in &link.prev {
                let key = ByteBuf::from(named.id.to_vec());
                if named.n >= chain.floor
                    && named.expires_ms > now_ms
                    && !chain.received.contains(&key)
                    && chain.missing.len() < MAX_KEPT
                {
                    chain.missing.insert(key, (named.n, named.expires_ms));
                }
            }
        }
        (before, self.missing_from(key))
    }

    /// Forgets missing messages the broker would have let expire by now (a disappearing
    /// timer, or the usual time-to-live): not having them is no sign of anything any more.
    /// Returns the 1:1 events, and the group chains whose count changed.
    pub(crate) fn expire_missing(&mut self, now_ms: u64) -> (Vec<Event>, Vec<GroupMissing>) {
        let mut events = Vec::new();
        let mut groups = Vec::new();
        for (peer, devices) in &mut self.record.chains_in {
            let before: usize = devices.values().map(|c| c.missing.len()).sum();
            for chain in devices.values_mut() {
                chain
                    .missing
                    .retain(|_, (_, expires_ms)| *expires_ms > now_ms);
            }
            let after: usize = devices.values().map(|c| c.missing.len()).sum();
            if after != before {
                match split_group_member_key(peer) {
                    Some((group, from)) => groups.push(GroupMissing {
                        group: group.to_owned(),
                        from: from.to_owned(),
                        count: after,
                    }),
                    None => events.push(Event::MaybeMissing {
                        peer: peer.clone(),
                        count: after,
                    }),
                }
            }
        }
        (events, groups)
    }

    /// How many messages from `peer` (any of its devices) were named and not received.
    pub fn missing_from(&self, peer: &str) -> usize {
        self.record
            .chains_in
            .get(peer)
            .map_or(0, |devices| devices.values().map(|c| c.missing.len()).sum())
    }
}

/// The chain key of this device's texts to a group (no handle starts with `#`).
fn group_key(group: &str) -> String {
    format!("#group:{group}")
}

/// The chain key of a group member's texts to this device.
fn group_member_key(group: &str, member: &str) -> String {
    format!("#group:{group}/{member}")
}

/// (group, member) of a [`group_member_key`].
fn split_group_member_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix("#group:")?.split_once('/')
}

/// Gives a text `message`'s link, naming `named`; a file has no link (the next text names it).
fn set_link(payload: &mut Payload, message: &Numbered, named: &[Numbered]) {
    if let (Payload::Text { link, .. }, Ok(id)) = (payload, message.id.as_slice().try_into()) {
        *link = Some(Link {
            n: message.n,
            id,
            prev: named.iter().filter_map(Numbered::named).collect(),
        });
    }
}

/// Keeps the newest `most` entries.
fn trim_front<T>(list: &mut Vec<T>, most: usize) {
    if list.len() > most {
        let extra = list.len() - most;
        list.drain(..extra);
    }
}
