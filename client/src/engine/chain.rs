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
//! - Texts carry the link; files are numbered and named by the next text.
//! - A chain is judged from the first linked text this device sees of it (its number is the
//!   floor): messages sent before (to a device linked later) are not missing.
//! - Redelivery and retries reuse the envelope id, which the engine deduplicates before this
//!   runs: they can never look like a gap.

use std::collections::BTreeMap;

use sealpost_proto::EnvelopeId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{Engine, Event};
use crate::crypto::{Link, MAX_LINK_PREV, Payload};

/// Most accepted messages kept waiting to be named, and most missing ones remembered per
/// sending device: a chain that long is a broker withholding a lot, which one warning covers.
const MAX_KEPT: usize = 64;

/// This device's chain to one conversation.
#[derive(Clone, Default, Serialize, Deserialize)]
pub(crate) struct ChainOut {
    /// The next message's number.
    next: u64,
    /// Messages the broker accepted that no text has named yet: (number, envelope id).
    unreferenced: Vec<(u64, ByteBuf)>,
    /// Messages sent and not answered yet: envelope id → (number, what it named).
    pending: BTreeMap<ByteBuf, (u64, Vec<(u64, ByteBuf)>)>,
}

/// What this device knows of one contact device's chain to it.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct ChainIn {
    /// Messages numbered below this were sent before this device saw the chain.
    floor: u64,
    /// Named by a later message and not received: number → envelope id.
    missing: BTreeMap<u64, ByteBuf>,
}

impl Engine {
    /// Numbers a text or file to `to` sent as envelope `id`, and links a text to what came
    /// before it. Other payloads are left alone.
    pub(crate) fn link_outgoing(&mut self, to: &str, id: EnvelopeId, payload: &mut Payload) {
        if to == self.state.user() {
            return;
        }
        let chain = self.record.chains_out.entry(to.to_owned()).or_default();
        let n = chain.next;
        let named = match payload {
            Payload::Text { link, .. } => {
                let count = chain.unreferenced.len().min(MAX_LINK_PREV);
                let named: Vec<(u64, ByteBuf)> = chain.unreferenced.drain(..count).collect();
                *link = Some(Link {
                    n,
                    prev: named
                        .iter()
                        .filter_map(|(n, id)| Some((*n, <[u8; 16]>::try_from(id.as_slice()).ok()?)))
                        .collect(),
                });
                named
            }
            Payload::File { .. } => Vec::new(),
            _ => return,
        };
        chain.next += 1;
        // Sends never answered (a crash, a lost page) must not pile up.
        if chain.pending.len() >= MAX_KEPT {
            chain.pending.pop_first();
        }
        chain
            .pending
            .insert(ByteBuf::from(id.0.to_vec()), (n, named));
    }

    /// The broker accepted envelope `id`: if it is a numbered message, the next text names it.
    pub(crate) fn chain_accepted(&mut self, id: EnvelopeId) {
        let key = ByteBuf::from(id.0.to_vec());
        for chain in self.record.chains_out.values_mut() {
            if let Some((n, _)) = chain.pending.remove(&key) {
                chain.unreferenced.push((n, key));
                if chain.unreferenced.len() > MAX_KEPT {
                    chain.unreferenced.remove(0);
                }
                return;
            }
        }
    }

    /// The send of envelope `id` to `to` was given up: what it named goes to the next text.
    pub(crate) fn chain_abandoned(&mut self, to: &str, id: EnvelopeId) {
        let Some(chain) = self.record.chains_out.get_mut(to) else {
            return;
        };
        if let Some((_, named)) = chain.pending.remove(&ByteBuf::from(id.0.to_vec())) {
            chain.unreferenced.splice(0..0, named);
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
    ) -> Option<Event> {
        let before = self.missing_from(from);
        let seen = &self.record.seen;
        let chains = self.record.chains_in.entry(from.to_owned()).or_default();
        let chain = chains.entry(device).or_insert_with(|| ChainIn {
            floor: link.map_or(u64::MAX, |l| l.n),
            missing: BTreeMap::new(),
        });
        chain
            .missing
            .retain(|_, missing| missing.as_slice() != id.0);
        if let Some(link) = link {
            chain.floor = chain.floor.min(link.n);
            for (n, named) in &link.prev {
                if *n >= chain.floor
                    && !seen.contains(named)
                    && *named != id.0
                    && chain.missing.len() < MAX_KEPT
                {
                    chain.missing.insert(*n, ByteBuf::from(named.to_vec()));
                }
            }
        }
        let after = self.missing_from(from);
        (after != before).then(|| Event::MaybeMissing {
            peer: from.to_owned(),
            count: after,
        })
    }

    /// How many messages from `peer` (any of its devices) were named and not received.
    pub fn missing_from(&self, peer: &str) -> usize {
        self.record
            .chains_in
            .get(peer)
            .map_or(0, |devices| devices.values().map(|c| c.missing.len()).sum())
    }
}
