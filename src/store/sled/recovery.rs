//! How a send is written, and how a mailbox recovers the one send a crash may have torn.
//!
//! sled keeps, across a crash, a prefix of the writes that were not yet flushed
//! (`Inner::write`). A send is written as its envelopes, the queue heads due for a
//! checkpoint, then the user's `L` record naming every queue's end past them ([`send_write`];
//! before them the writer's wake entry, if it stores one then). A user's queues have one
//! writer, which writes its sends one after another, so only its last send can be torn, and
//! `L` commits it:
//!
//! - a surviving `L` naming the send's ends means every envelope and head of the send
//!   survived;
//! - a send past the ends `L` names was never acknowledged (its sender hears back only after
//!   the flush) nor delivered (pushes stop at the durable point), so [`recover_heads`], run
//!   when the queues are opened, removes what survived of it: envelopes at or past their
//!   queue's end. Its retry then stores it exactly once.
//!
//! A user with no send since layout 4 has no `L`: a send of theirs was committed by its
//! dedup record, and an envelope without one is taken for torn.
//!
//! # Heads are checkpoints
//!
//! A queue's head (next sequence number, count, bytes) lives in the writer's memory. It is
//! stored every [`CHECKPOINT_EVERY`] appends and when the writer closes the user's queues
//! ([`close_write`]: the heads, then the user's `closed` mark), never by a trim: that was one
//! of a delivered envelope's writes. Opening the queues takes the mark away before anything
//! else is written ([`recover_heads`]), so the mark stands exactly when nothing changed the
//! queues since their heads were stored:
//!
//! - marked: each stored head is exact but for the appends since it (fewer than
//!   `CHECKPOINT_EVERY`, read and counted in);
//! - not marked (the writer crashed, or the data directory predates the mark): every queue is
//!   counted again, and its next sequence number is past its last envelope and past every
//!   number a committed send gave out (`L` names them, and layout 4's dedup records), so
//!   acknowledgements that emptied a queue after its checkpoint never let a number be handed
//!   out twice.
//!
//! # The list of sends is a checkpoint too
//!
//! The writer lists its sends in memory (for the expiry sweep, which finds a send's envelopes
//! through it, and to answer retries) and stores the list in a page every
//! `inbox::INDEX_EVERY` sends and when it closes, before the mark; until then a stored wake
//! entry is due with the first listed send. `L` names, per queue, where the sends not yet
//! paged begin. Unmarked queues were left by a writer whose list may have died with it: its
//! wake entry brings the sweep, which opens the queues, and the recount pages again what is
//! still queued of those sends ([`page_again`]). A send paged twice is dealt with once per
//! sweep (`inbox`'s `Sweep` remembers what it saw); the sweep removes an envelope only if it
//! still holds the id and expiry the page lists.

use std::collections::BTreeMap;

use tracing::info;

use super::{
    Inner,
    queues::{QueueOp, QueueWrite},
};
use crate::store::{
    EnvelopeRecord, Result, StoreError,
    keys::Hashed,
    records::{HeadRecord, LastSendRecord, PageRecord, PagedSend},
};

/// One device's copy of a send: the device, its queue head before the send, the ciphertext.
pub(super) struct DeviceCopy<'a> {
    pub(super) device: u32,
    pub(super) head: HeadRecord,
    pub(super) ciphertext: &'a [u8],
}

/// A queue's head is stored at least once per this many appends (see the module doc): it
/// bounds what opening the queue reads to find the appends since.
pub(super) const CHECKPOINT_EVERY: u64 = 64;

/// The writes of a send, in commit order, and each copy's new head (in the order of
/// `copies`): `index` (the wake entry its writer stores now, if any), the envelopes, the heads
/// due for a checkpoint. [`last_send`] follows them: it commits the send. `template` is the
/// envelope record without its ciphertext.
pub(super) fn send_write(
    user: &str,
    index: Vec<QueueOp>,
    template: &EnvelopeRecord,
    copies: &[DeviceCopy<'_>],
) -> (QueueWrite, Vec<HeadRecord>) {
    let mut ops = index;
    ops.reserve(copies.len() + 2);
    let mut heads = Vec::with_capacity(copies.len());
    for copy in copies {
        let seq = copy.head.next_seq;
        ops.push(QueueOp::Append {
            user: user.to_owned(),
            device: copy.device,
            seq,
            record: EnvelopeRecord {
                ciphertext: copy.ciphertext.to_vec(),
                ..template.clone()
            },
        });
        heads.push(HeadRecord {
            next_seq: seq + 1,
            count: copy.head.count + 1,
            bytes: copy.head.bytes + copy.ciphertext.len() as u64,
            ..copy.head
        });
    }
    for (copy, head) in copies.iter().zip(&heads) {
        if head.next_seq % CHECKPOINT_EVERY == 0 {
            ops.push(QueueOp::Head {
                user: user.to_owned(),
                device: copy.device,
                head: *head,
            });
        }
    }
    (QueueWrite { ops }, heads)
}

/// The write that commits a send: `heads`, every open queue's head after it; `paged_from`,
/// where each queue's sends not yet in a page begin; `unpaged`, those sends (this one last).
pub(super) fn last_send(
    user: &str,
    heads: &BTreeMap<u32, HeadRecord>,
    paged_from: &BTreeMap<u32, u64>,
    unpaged: &[PagedSend],
    dedup_window_ms: u64,
) -> QueueOp {
    QueueOp::LastSend {
        user: user.to_owned(),
        record: LastSendRecord {
            version: crate::store::records::RECORD_VERSION,
            queues: heads
                .iter()
                .map(|(&device, head)| {
                    let paged = paged_from.get(&device).copied().unwrap_or(0);
                    (device, head.next_seq, paged)
                })
                .collect(),
            unpaged: unpaged.iter().flat_map(|s| s.id).collect(),
            dedup_window_ms,
        },
    }
}

/// The writes of a trim: the deletions alone. The head stays in memory (see the module doc);
/// deletions cut short by a crash leave acknowledged envelopes stored, delivered again and
/// acked again.
pub(super) fn trim_write(user: &str, device: u32, removed: &[u64]) -> QueueWrite {
    QueueWrite {
        ops: removed
            .iter()
            .map(|&seq| QueueOp::Remove {
                user: user.to_owned(),
                device,
                seq,
            })
            .collect(),
    }
}

/// The writes that close a user's queues: every head, then the mark that they are exact.
pub(super) fn close_write(user: &str, heads: &BTreeMap<u32, HeadRecord>) -> QueueWrite {
    let mut ops: Vec<QueueOp> = heads
        .iter()
        .map(|(&device, &head)| QueueOp::Head {
            user: user.to_owned(),
            device,
            head,
        })
        .collect();
    ops.push(QueueOp::Close {
        user: user.to_owned(),
    });
    QueueWrite { ops }
}

/// The queue heads of `user`'s devices, after removing what a crash left of a send that was
/// not committed (and zeroing the counts of empty queues), for a writer that opens the
/// queues now (the `closed` mark is taken away). With the mark, this reads the stored heads
/// and fewer than [`CHECKPOINT_EVERY`] envelopes per device; without it, every envelope of
/// the user (and any layout-4 dedup record), and it pages the sends `L` names as not yet
/// paged (see the module doc).
pub(super) fn recover_heads(
    store: &Inner,
    user: &str,
    devices: &[u32],
    now_ms: u64,
) -> Result<BTreeMap<u32, HeadRecord>> {
    let closed = store.closed(user)?;
    let (last, ends) = match store.last_send(user) {
        Ok(Some(last)) => (Some(last), Ends::Named),
        Ok(None) => (None, Ends::Layout4),
        // Our own record, damaged on disk: nothing is rolled back (a torn send's envelope
        // stays, and is delivered although its sender was never answered: the client drops
        // a retry's copy by its id), and it is written anew below.
        Err(StoreError::Corruption(e)) => {
            tracing::warn!(error = %e, "the record of a user's queue ends does not decode");
            metrics::counter!("sealpost_corrupt_records_total").increment(1);
            let every = devices.iter().map(|&device| (device, 0, 0)).collect();
            let repair = LastSendRecord {
                version: crate::store::records::RECORD_VERSION,
                queues: every,
                unpaged: Vec::new(),
                dedup_window_ms: 0,
            };
            (Some(repair), Ends::Unknown)
        }
        Err(e) => return Err(e),
    };
    let stored: BTreeMap<u32, HeadRecord> = store.heads(user)?.into_iter().collect();
    // The numbers committed sends gave out: only needed when the heads may be behind.
    let given_out = if closed {
        BTreeMap::new()
    } else {
        metrics::counter!("sealpost_queues_recounted_total").increment(1);
        // Layout 4's writer listed its sends' dedup records in memory: each is listed anew.
        let (mut ends, sends) = store.dedup_ends(user, now_ms + UNKNOWN_EXPIRY_MS)?;
        store.write(QueueWrite {
            ops: index_entries(user, sends),
        })?;
        for &(device, end, _) in last.iter().flat_map(|l| &l.queues) {
            let given = ends.entry(device).or_insert(0);
            *given = (*given).max(end.saturating_sub(1));
        }
        ends
    };
    let mut heads = BTreeMap::new();
    for &device in devices {
        let mut head = stored.get(&device).copied().unwrap_or_else(empty_head);
        let last = loop {
            let Some((seq, record)) = store.last_envelope(user, device)? else {
                break None;
            };
            let Some(record) = record else {
                // Shredded: its key is destroyed only after it was deleted (acknowledged,
                // expired or rolled back), and a crash brought back the record but not the
                // key. It stays deleted; its sequence number is never reused: the head moves
                // past it, counting what was appended since the stored head first.
                let mut ops = Vec::with_capacity(2);
                if head.next_seq <= seq {
                    let (count, bytes) = store.count_from(user, device, head.next_seq)?;
                    head.count += count;
                    head.bytes += bytes;
                    head.next_seq = seq + 1;
                    ops.push(QueueOp::Head {
                        user: user.to_owned(),
                        device,
                        head,
                    });
                }
                ops.push(QueueOp::Remove {
                    user: user.to_owned(),
                    device,
                    seq,
                });
                store.write(QueueWrite { ops })?;
                metrics::counter!("sealpost_shredded_records_removed_total").increment(1);
                continue;
            };
            let torn = match ends {
                Ends::Named => last.as_ref().is_some_and(|l| past_end(l, device, seq)),
                Ends::Unknown => false,
                Ends::Layout4 => torn(store, user, device, seq, &record, now_ms)?,
            };
            if !torn {
                break Some(seq);
            }
            // The head goes back first: should this be cut short too, the envelope is still
            // there to be found torn again, and no sequence number is skipped.
            let mut ops = Vec::with_capacity(2);
            if head.next_seq > seq {
                head.next_seq = seq;
                head.count = head.count.saturating_sub(1);
                head.bytes = head.bytes.saturating_sub(record.ciphertext.len() as u64);
                ops.push(QueueOp::Head {
                    user: user.to_owned(),
                    device,
                    head,
                });
            }
            ops.push(QueueOp::Remove {
                user: user.to_owned(),
                device,
                seq,
            });
            store.write(QueueWrite { ops })?;
            metrics::counter!("sealpost_torn_sends_rolled_back_total").increment(1);
            info!(
                device,
                seq, "removed an uncommitted envelope left by a crash"
            );
        };
        match last {
            // An empty queue holds nothing, whatever its head says: an ack deletes the
            // envelope before it writes the head that stops counting it.
            None => {
                head.count = 0;
                head.bytes = 0;
            }
            // Not closed: the stored counts may include what was acknowledged since.
            Some(last) if !closed => {
                let (count, bytes) = store.count_from(user, device, 0)?;
                head.count = count;
                head.bytes = bytes;
                head.next_seq = head.next_seq.max(last + 1);
            }
            // Appended since the head was stored: counted in. Never reuse their numbers.
            Some(last) if last >= head.next_seq => {
                let (count, bytes) = store.count_from(user, device, head.next_seq)?;
                head.count += count;
                head.bytes += bytes;
                head.next_seq = last + 1;
            }
            Some(_) => {}
        }
        if let Some(&end) = given_out.get(&device) {
            head.next_seq = head.next_seq.max(end + 1);
        }
        heads.insert(device, head);
    }
    // The writer's list of sends not yet paged died with it: `L` names them, and they are
    // paged now (with a damaged `L`, everything queued is, and `L` is written anew).
    let repair = matches!(ends, Ends::Unknown);
    if let Some(last) = last.as_ref().filter(|_| !closed || repair) {
        let mut ops = page_again(store, user, devices, last, now_ms)?;
        if !ops.is_empty() || repair {
            // Then `L` says they are paged, so that another crash does not page them again.
            let paged_from = heads.iter().map(|(d, h)| (*d, h.next_seq)).collect();
            ops.push(last_send(
                user,
                &heads,
                &paged_from,
                &[],
                last.dedup_window_ms,
            ));
            store.write(QueueWrite { ops })?;
        }
    }
    // A writer opens the queues: from now on its trims store no heads, so the mark goes first.
    if closed {
        store.write(QueueWrite {
            ops: vec![QueueOp::Open {
                user: user.to_owned(),
            }],
        })?;
    }
    Ok(heads)
}

/// An undecodable dedup record is listed this long after a recount: it cannot say when its
/// envelopes expire, and it must not go before them (an envelope without its dedup record is
/// taken for a torn send). Longer than any time-to-live.
const UNKNOWN_EXPIRY_MS: u64 = 366 * 24 * 3600 * 1000;

/// At most this many sends in one index entry.
const INDEX_ENTRY_MAX: usize = 1024;

/// Entries of the expiry index list the sends falling due in one second, by its end.
pub(super) fn due_second(ms: u64) -> u64 {
    ms.div_ceil(1000).saturating_mul(1000)
}

/// Index entries listing `sends` (when each falls due, keyed id) of `user`, by the second
/// they fall due in.
pub(super) fn index_entries(
    user: &str,
    sends: impl IntoIterator<Item = (u64, Hashed)>,
) -> Vec<QueueOp> {
    let mut by_second: BTreeMap<u64, Vec<Hashed>> = BTreeMap::new();
    for (due_ms, id) in sends {
        by_second.entry(due_second(due_ms)).or_default().push(id);
    }
    let mut ops = Vec::with_capacity(by_second.len());
    for (due_ms, ids) in by_second {
        for ids in ids.chunks(INDEX_ENTRY_MAX) {
            ops.push(QueueOp::IndexSends {
                user: user.to_owned(),
                due_ms,
                nonce: rand::random(),
                ids: ids.to_vec(),
            });
        }
    }
    ops
}

/// The page listing the sends of `user` that `last` names as not yet paged, and its index
/// entry: the ids `last` lists, remembered for the dedup window from `now_ms` (when they were
/// accepted is not stored with them), and the envelopes still queued past where `last` says
/// each queue's unpaged sends begin (in `devices` and any queue `last` names: a device whose
/// removal a crash cut short), by send: by id and acceptance time, since a retry after the
/// dedup window is another send with the same id.
fn page_again(
    store: &Inner,
    user: &str,
    devices: &[u32],
    last: &LastSendRecord,
    now_ms: u64,
) -> Result<Vec<QueueOp>> {
    let window = last.dedup_window_ms;
    let mut sends: Vec<PagedSend> = last
        .unpaged()
        .map(|id| PagedSend {
            id,
            dedup_until_ms: now_ms.saturating_add(window),
            envelopes_expire_ms: 0,
            stored: Vec::new(),
        })
        .collect();
    let mut queues: Vec<u32> = devices.to_vec();
    queues.extend(last.queues.iter().map(|(device, _, _)| *device));
    queues.sort_unstable();
    queues.dedup();
    // The ids `last` lists, not yet matched with their envelopes.
    let mut listed: std::collections::HashMap<Hashed, usize> =
        sends.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let mut by_send: std::collections::HashMap<(Hashed, u64), usize> = Default::default();
    for device in queues {
        for (seq, record) in store.read(user, device, last.paged_from(device), usize::MAX)? {
            let id = store.keyring.id(&record.id);
            let at = *by_send.entry((id, record.accepted_ms)).or_insert_with(|| {
                let at = listed.remove(&id).unwrap_or_else(|| {
                    sends.push(PagedSend {
                        id,
                        dedup_until_ms: 0,
                        envelopes_expire_ms: 0,
                        stored: Vec::new(),
                    });
                    sends.len() - 1
                });
                sends[at].dedup_until_ms = record.accepted_ms.saturating_add(window);
                sends[at].envelopes_expire_ms = record.expires_ms;
                at
            });
            sends[at].stored.push((device, seq));
        }
    }
    if sends.is_empty() {
        return Ok(Vec::new());
    }
    metrics::counter!("sealpost_sends_paged_again_total").increment(sends.len() as u64);
    let first = store.pages_back(user, |_| false)?;
    let mut ops = Vec::new();
    for (page, chunk) in (first..).zip(sends.chunks(INDEX_ENTRY_MAX)) {
        ops.extend(page_write(user, page, chunk.to_vec()));
    }
    Ok(ops)
}

/// The writes storing a new page of `sends`: its index entry first (one whose page is
/// missing is dropped by the sweep; a page without one would stay for ever), then the page.
pub(super) fn page_write(user: &str, page: u64, sends: Vec<PagedSend>) -> Vec<QueueOp> {
    let mut ops = Vec::with_capacity(2);
    if let Some(due_ms) = page_due(&sends) {
        ops.push(QueueOp::PageDue {
            user: user.to_owned(),
            page,
            due_ms,
        });
    }
    ops.push(QueueOp::Page {
        user: user.to_owned(),
        page,
        record: PageRecord {
            version: crate::store::records::RECORD_VERSION,
            sends,
        },
    });
    ops
}

/// When a page next needs the sweep: when its first envelopes still stored expire, or once
/// all have, when its last send is forgotten (then it goes). `None` for an empty page.
pub(super) fn page_due(sends: &[PagedSend]) -> Option<u64> {
    sends
        .iter()
        .filter(|s| !s.stored.is_empty())
        .map(|s| s.envelopes_expire_ms)
        .min()
        .or_else(|| sends.iter().map(|s| s.dedup_until_ms).max())
}

/// What tells a torn send's envelopes at open.
#[derive(Clone, Copy)]
enum Ends {
    /// `L`: they are at or past their queue's end in it.
    Named,
    /// `L` does not decode: none is taken for torn.
    Unknown,
    /// No send since layout 4: their dedup record is missing ([`torn`]).
    Layout4,
}

/// Whether the envelope at `seq` of `device` is at or past the queue's end in `last` (the
/// record naming the queue ends after the user's last committed send): a torn send's.
fn past_end(last: &LastSendRecord, device: u32, seq: u64) -> bool {
    last.end(device).is_none_or(|end| seq >= end)
}

/// Whether `record`, stored at `seq` of `device`, belongs to a send layout 4 never
/// committed: its dedup record is missing. A send's dedup record goes only in the sweep step that removes
/// its envelopes (after them), so one without it was torn — also once it has expired: nothing
/// indexes it then, and it would stay for ever. Layout 2 is the exception: it forgot an
/// expired envelope's dedup record apart from the envelope, which its own index entry still
/// finds; such a one is left to the sweep.
fn torn(
    store: &Inner,
    user: &str,
    device: u32,
    seq: u64,
    record: &EnvelopeRecord,
    now_ms: u64,
) -> Result<bool> {
    if store.dedup(user, &store.keyring.id(&record.id))?.is_some() {
        return Ok(false);
    }
    Ok(record.expires_ms > now_ms || !store.indexed_alone(user, device, seq, record.expires_ms)?)
}

/// The head of a queue that never held anything.
pub(super) fn empty_head() -> HeadRecord {
    HeadRecord {
        version: crate::store::records::RECORD_VERSION,
        next_seq: 1,
        count: 0,
        bytes: 0,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::{SledStore, StoreOptions};

    const USER: &str = "bob@test.example";
    const NOW: u64 = 1_000_000;

    fn open(dir: &std::path::Path) -> SledStore {
        SledStore::open_waiting(&StoreOptions::for_tests(dir)).expect("open store")
    }

    fn envelope(id: u8) -> EnvelopeRecord {
        EnvelopeRecord {
            version: 1,
            id: [id; 16],
            class: 0,
            accepted_ms: NOW,
            expires_ms: NOW + 60_000,
            ciphertext: Vec::new(),
        }
    }

    /// The writes of a send of envelope `id` to devices 1 and 2, given their current heads,
    /// as when the writer's list fills with it: its wake entry first, its page last.
    fn send(
        store: &SledStore,
        id: u8,
        heads: &BTreeMap<u32, HeadRecord>,
    ) -> (QueueWrite, Vec<HeadRecord>) {
        let copies: Vec<DeviceCopy<'_>> = heads
            .iter()
            .map(|(&device, &head)| DeviceCopy {
                device,
                head,
                ciphertext: &[7; 10],
            })
            .collect();
        let hashed = store.inner().keyring.id(&[id; 16]);
        let index = vec![QueueOp::IndexSends {
            user: USER.into(),
            due_ms: NOW + 60_000,
            nonce: u64::from(id),
            ids: Vec::new(),
        }];
        let (mut write, new) = send_write(USER, index, &envelope(id), &copies);
        let sends = vec![PagedSend {
            id: hashed,
            dedup_until_ms: NOW + 60_000,
            envelopes_expire_ms: NOW + 60_000,
            stored: heads.iter().map(|(d, h)| (*d, h.next_seq)).collect(),
        }];
        let after = heads.keys().copied().zip(new.iter().copied()).collect();
        // Where the unpaged sends begin: at this one.
        let paged_from = heads.iter().map(|(d, h)| (*d, h.next_seq)).collect();
        write
            .ops
            .push(last_send(USER, &after, &paged_from, &sends, 60_000));
        write.ops.extend(page_write(USER, u64::from(id), sends));
        (write, new)
    }

    /// The writes of a send of envelope `id` to the queues `heads` as layout 4 made it: the
    /// envelopes, then the dedup record that commits it.
    pub(in crate::store::sled) fn layout_4_send(
        store: &SledStore,
        user: &str,
        id: [u8; 16],
        expires_ms: u64,
        heads: &BTreeMap<u32, HeadRecord>,
    ) -> QueueWrite {
        let mut ops = Vec::new();
        let mut stored = Vec::new();
        for (&device, head) in heads {
            ops.push(QueueOp::Append {
                user: user.into(),
                device,
                seq: head.next_seq,
                record: EnvelopeRecord {
                    id,
                    expires_ms,
                    ciphertext: vec![7; 10],
                    ..envelope(0)
                },
            });
            stored.push((device, head.next_seq));
        }
        ops.push(QueueOp::Dedup {
            user: user.into(),
            id: store.inner().keyring.id(&id),
            record: crate::store::records::DedupRecord {
                version: 1,
                expires_ms,
                stored,
                envelopes_expire_ms: expires_ms,
            },
        });
        QueueWrite { ops }
    }

    /// Whether a stored page lists the send of envelope `id`.
    fn paged(store: &SledStore, id: u8) -> bool {
        let hashed = store.inner().keyring.id(&[id; 16]);
        let mut found = false;
        store
            .inner()
            .pages_back(USER, |page| {
                found |= page.sends.iter().any(|s| s.id == hashed);
                true
            })
            .unwrap();
        found
    }

    fn queue(store: &SledStore, device: u32) -> Vec<(u64, [u8; 16])> {
        store
            .inner()
            .read(USER, device, 0, 100)
            .unwrap()
            .into_iter()
            .map(|(seq, r)| (seq, r.id))
            .collect()
    }

    fn kinds(write: &QueueWrite) -> Vec<&'static str> {
        write
            .ops
            .iter()
            .map(|op| match op {
                QueueOp::IndexSends { .. } => "index",
                QueueOp::Append { .. } => "append",
                QueueOp::Head { .. } => "head",
                QueueOp::LastSend { .. } => "last",
                QueueOp::Page { .. } => "page",
                QueueOp::PageDue { .. } => "page due",
                _ => "other",
            })
            .collect()
    }

    /// Two queues whose next sequence number is `next`, as stored heads.
    fn start_at(store: &SledStore, next: u64) {
        let ops = [1, 2]
            .map(|device| QueueOp::Head {
                user: USER.into(),
                device,
                head: HeadRecord {
                    next_seq: next,
                    ..empty_head()
                },
            })
            .into();
        store.inner().write(QueueWrite { ops }).unwrap();
    }

    #[test]
    fn a_send_is_written_wake_envelopes_checkpoints_the_ends_then_its_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let heads = BTreeMap::from([(1, empty_head()), (2, empty_head())]);
        let (write, new_heads) = send(&store, 1, &heads);
        assert_eq!(
            kinds(&write),
            ["index", "append", "append", "last", "page due", "page"]
        );
        assert!(
            new_heads
                .iter()
                .all(|h| h.next_seq == 2 && h.count == 1 && h.bytes == 10)
        );
        // Every CHECKPOINT_EVERY appends, the heads are stored too.
        let at = HeadRecord {
            next_seq: CHECKPOINT_EVERY - 1,
            ..empty_head()
        };
        let (write, _) = send(&store, 2, &BTreeMap::from([(1, at), (2, at)]));
        assert_eq!(
            kinds(&write),
            [
                "index", "append", "append", "head", "head", "last", "page due", "page"
            ]
        );
    }

    /// Every prefix of a send's writes that a crash can leave: after recovery, each device
    /// holds the send exactly once, and a page lists it (a retry is a duplicate), if the
    /// record naming the queue ends past it survived; otherwise neither (a retry stores it
    /// once). The committed send before it is intact,
    /// and counted although no head was stored with it. Both for a send that checkpoints the
    /// heads and one that does not.
    #[test]
    fn every_crash_prefix_of_a_send_recovers_to_all_or_nothing() {
        for start in [1, CHECKPOINT_EVERY - 2] {
            // wake, two envelopes, (two heads), the queue ends, the page and its index entry
            let ops = if start == 1 { 6 } else { 8 };
            for cut in 0..=ops {
                let dir = tempfile::tempdir().unwrap();
                let store = open(dir.path());
                start_at(&store, start);
                let heads = recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap();
                let (first, _) = send(&store, 1, &heads);
                store.inner().write(first).unwrap();
                let heads = recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap();
                let (mut second, _) = send(&store, 2, &heads);
                assert_eq!(second.ops.len(), ops);
                second.ops.truncate(cut);
                store.inner().write(second).unwrap();

                // Also recovered after the envelopes expired: a torn send is removed all the
                // same (nothing would ever expire it), a committed one is left to the sweep.
                let at = if cut % 2 == 0 { NOW } else { NOW + 120_000 };
                let heads = recover_heads(&store.inner(), USER, &[1, 2], at).unwrap();
                let committed = cut >= ops - 2;
                assert_eq!(paged(&store, 2), committed, "cut {cut}");
                for device in [1, 2] {
                    let mut want = vec![(start, [1; 16])];
                    if committed {
                        want.push((start + 1, [2; 16]));
                    }
                    let what = format!("start {start}, cut {cut}, device {device}");
                    assert_eq!(queue(&store, device), want, "{what}");
                    let head = heads[&device];
                    assert_eq!(head.next_seq, start + want.len() as u64, "{what}");
                    assert_eq!(head.count, want.len() as u64, "{what}");
                    assert_eq!(head.bytes, 10 * want.len() as u64, "{what}");
                }
                // Recovery is idempotent: it finds nothing more to remove.
                assert_eq!(
                    recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap(),
                    heads
                );
            }
        }
    }

    /// Sends 1, 2 and 3 to devices 1 and 2 of a fresh store; answers the heads after them.
    fn sends_1_to_3(store: &SledStore) -> BTreeMap<u32, HeadRecord> {
        let mut heads = recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap();
        for id in 1..=3 {
            let (write, new) = send(store, id, &heads);
            store.inner().write(write).unwrap();
            heads = BTreeMap::from([(1, new[0]), (2, new[1])]);
        }
        heads
    }

    /// Every prefix of a trim that acknowledges a queue's whole content, appended after its
    /// last stored head (trims store no head): the queue's end never goes back below what was
    /// handed out, and the counts are exact.
    #[test]
    fn no_crash_prefix_of_a_trim_takes_the_queue_end_back() {
        for cut in 0..=3 {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            sends_1_to_3(&store);
            let mut trim = trim_write(USER, 1, &[1, 2, 3]);
            assert_eq!(trim.ops.len(), 3);
            trim.ops.truncate(cut);
            store.inner().write(trim).unwrap();
            let recovered = recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap();
            assert_eq!(recovered[&1].next_seq, 4, "cut {cut}");
            assert_eq!(recovered[&1].count, 3 - cut as u64, "cut {cut}");
            assert_eq!(recovered[&1].bytes, 10 * (3 - cut as u64), "cut {cut}");
            assert_eq!(recovered[&2].next_seq, 4, "cut {cut}");
            assert_eq!(recovered[&2].count, 3, "cut {cut}");
        }
    }

    /// Closed queues open from their stored heads without recounting; the mark goes as they
    /// open, so a writer that then crashes leaves them to be counted again.
    #[test]
    fn closed_queues_open_from_their_heads_and_lose_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut heads = sends_1_to_3(&store);
        // What the writer holds in memory differs from the queue on purpose: the stored heads
        // are believed when the mark stands.
        let believed = HeadRecord {
            count: 7,
            ..heads[&1]
        };
        heads.insert(1, believed);
        store.inner().write(close_write(USER, &heads)).unwrap();
        assert!(store.inner().closed(USER).unwrap());
        let opened = recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap();
        assert_eq!(opened[&1], believed);
        assert!(
            !store.inner().closed(USER).unwrap(),
            "opening takes the mark"
        );
        // Without the mark the queues are counted again.
        let recounted = recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap();
        assert_eq!(recounted[&1].count, 3);
        assert_eq!(recounted[&1].next_seq, 4);
    }

    /// A damaged `L` does not keep the user's queues from opening: nothing is rolled back
    /// (a torn send is kept rather than anything committed lost), everything queued is paged,
    /// and `L` is written anew.
    #[test]
    fn a_damaged_queue_end_record_rolls_nothing_back_and_is_written_anew() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let heads = sends_1_to_3(&store);
        // A fourth send torn after its envelopes, then `L` damaged.
        let (mut fourth, _) = send(&store, 4, &heads);
        fourth.ops.truncate(3);
        store.inner().write(fourth).unwrap();
        let u = store.inner().keyring.user(USER);
        store
            .inner()
            .queues
            .insert(crate::store::keys::last_send(&u), &[0xc1][..])
            .unwrap();
        let heads = recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap();
        let ids: Vec<u8> = queue(&store, 1).iter().map(|(_, id)| id[0]).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(heads[&1].next_seq, 5);
        let last = store
            .inner()
            .last_send(USER)
            .unwrap()
            .expect("written anew");
        assert_eq!(last.end(1), Some(5));
        assert!(paged(&store, 4));
    }

    /// Envelopes of a send not yet paged on a queue that is no longer opened (its device's
    /// removal was cut short by a crash) are paged all the same: they expire.
    #[test]
    fn unpaged_envelopes_of_a_queue_no_longer_opened_are_paged() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let heads = recover_heads(&store.inner(), USER, &[1, 2], NOW).unwrap();
        let (mut write, _) = send(&store, 1, &heads);
        // Committed, not paged: the page and its entry did not survive.
        write.ops.truncate(write.ops.len() - 2);
        store.inner().write(write).unwrap();
        recover_heads(&store.inner(), USER, &[1], NOW).unwrap();
        let mut copies = Vec::new();
        store
            .inner()
            .pages_back(USER, |page| {
                copies.extend(page.sends.into_iter().flat_map(|s| s.stored));
                true
            })
            .unwrap();
        copies.sort_unstable();
        assert_eq!(copies, [(1, 1), (2, 1)]);
    }

    #[test]
    fn an_empty_queue_counts_nothing_whatever_its_head_says() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // Acks deleted every envelope; the crash took the last head update.
        let stale = HeadRecord {
            next_seq: 4,
            count: 1,
            bytes: 10,
            ..empty_head()
        };
        store
            .inner()
            .write(QueueWrite {
                ops: vec![QueueOp::Head {
                    user: USER.into(),
                    device: 1,
                    head: stale,
                }],
            })
            .unwrap();
        let head = recover_heads(&store.inner(), USER, &[1], NOW).unwrap()[&1];
        assert_eq!((head.next_seq, head.count, head.bytes), (4, 0, 0));
    }

    /// Layout 2 forgot an expired envelope's dedup record apart from the envelope, which its
    /// own index entry (`X`) still finds: such an envelope is not torn, and is left to the
    /// sweep with its sequence number kept. Without that entry (layout 3) it is torn.
    #[test]
    fn an_expired_layout_2_envelope_whose_dedup_record_is_gone_is_left_to_the_sweep() {
        for layout_2 in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            let heads = recover_heads(&store.inner(), USER, &[1], NOW).unwrap();
            let write = layout_4_send(&store, USER, [1; 16], NOW + 60_000, &heads);
            store.inner().write(write).unwrap();
            store
                .inner()
                .write(QueueWrite {
                    ops: vec![QueueOp::ForgetDedup {
                        user: USER.into(),
                        id: store.inner().keyring.id(&[1; 16]),
                        expires_ms: NOW + 60_000,
                    }],
                })
                .unwrap();
            if layout_2 {
                let u = store.inner().keyring.user(USER);
                let x = crate::store::keys::expiry_envelope(NOW + 60_000, &u, 1, 1);
                let v = store.inner().keyring.seal_index(&x, USER);
                store.inner().queues.insert(x, v).unwrap();
            }
            let later = NOW + 60_000;
            let heads = recover_heads(&store.inner(), USER, &[1], later).unwrap();
            if layout_2 {
                assert_eq!(queue(&store, 1), vec![(1, [1; 16])], "left to the sweep");
                assert_eq!(heads[&1].next_seq, 2);
            } else {
                assert_eq!(queue(&store, 1), vec![], "torn");
                assert_eq!(heads[&1].next_seq, 1);
            }
        }
    }
}
