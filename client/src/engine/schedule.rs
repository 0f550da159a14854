//! When this device does the things that could tie it to a sealed send: transcripts to its own
//! other devices, and refreshing contacts' device lists.
//!
//! The broker sees every request, on which connection, and when. A sealed send names no
//! sender, but the requests around it could: the sender's own device list fetched right after
//! it, its transcript sent right behind it, the recipient fetching the sender's list right
//! after the delivery. The drivers keep two channels (an anonymous one for what names no
//! sender: contacts' lists, key claims with a delivery token, sealed sends; an authenticated
//! one for what concerns this account); this module decides the *times*.
//!
//! # Transcripts
//!
//! A text sent to a contact is queued here as a transcript for the account's other devices
//! ([`Engine::queue_transcript`]), in the persisted record (a crash keeps it queued), and sent
//! after a random delay ([`DEFAULT_TRANSCRIPT_DELAY_MS`]) on the authenticated connection, where
//! the broker knows the account anyway. It never travels on the sealed socket nor in the same
//! burst as the sealed send: the broker sees "alice's device wrote to alice's devices" some
//! seconds later, among everything else alice's connection carries. Whether there are other
//! devices is read from the account's own list as last fetched (at connect and on a timer,
//! on the authenticated channel), never fetched right after a send.
//!
//! # Contacts' device lists
//!
//! A recipient checks a sender's claim against the sender's list it already holds, whatever
//! its age, when the claimed device is in it. When it is not (a contact's new device, or a
//! sealed sender we hold no list of), the envelope is held and read after the next refresh,
//! which fetches *every* contact's list (and those of held senders), in random order, on the
//! anonymous channel. Refreshes happen periodically, each after a random interval (half to one
//! and a half [`DEFAULT_LIST_REFRESH_MS`]), and the next one is brought forward to a random
//! delay ([`DEFAULT_HELD_REFRESH_MS`]) when something is held.
//!
//! Why this choice: what the broker learns from a refresh is the set of this account's
//! contacts (which it learns from every periodic refresh anyway) and, for a brought-forward
//! one, that *something* was held a little earlier — not from whom: every list is fetched, in
//! an order drawn afresh each time, none first because of the delivery. A refresh at a random
//! delay rather than at once also means it does not sit right behind a delivery, so a
//! delivery and a refresh cannot be paired by timing alone; the cost is a delay of seconds for
//! the first message from a contact's new device, which is rare. (An account with a single
//! contact has nothing to hide behind; a non-contact held sender stands out in the set, which
//! is why such senders are rare by construction, see below.)
//!
//! A first contact is the exception: an envelope from an account we hold no list of and know
//! nothing about can only have come over the authenticated route, since sealed sends need our
//! delivery token, which this account gives only to accounts it writes to (their list is then
//! held) and which other devices of ours share with their contacts only after those show up in
//! our record (transcripts, link grants). There the broker already knows the sender from the
//! live connection, so its list is fetched at once ([`Need::List`](super::Need::List)). The
//! same holds for our own account's lists (fetched on the authenticated channel).
//!
//! Remote contacts' lists go through our broker's lookup endpoint like local ones; the
//! master-key and rollback checks of [`Engine::accept_device_list`] apply to refreshed lists
//! as to any other.

use rand::{Rng as _, seq::SliceRandom as _};

use super::{Engine, record::QueuedTranscript, send::Outgoing};

/// The default delay of a transcript, ms: uniform in this range.
pub const DEFAULT_TRANSCRIPT_DELAY_MS: (u64, u64) = (1_000, 5_000);
/// The default mean interval of the periodic refresh of contacts' lists, ms (each interval is
/// drawn from half to one and a half of it).
pub const DEFAULT_LIST_REFRESH_MS: u64 = 60 * 60 * 1000;
/// The default delay of a refresh brought forward by a held envelope, ms: uniform in this
/// range.
pub const DEFAULT_HELD_REFRESH_MS: (u64, u64) = (5_000, 60_000);
/// The default delay of receipts, ms: uniform in this range (why: the `receipts` module).
pub const DEFAULT_RECEIPT_DELAY_MS: (u64, u64) = (2_000, 15_000);

/// The timing settings ([`Engine::set_timing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Transcript delay range, ms.
    pub transcript_delay_ms: (u64, u64),
    /// Mean interval of the periodic refresh of contacts' lists, ms.
    pub list_refresh_ms: u64,
    /// Delay range of a refresh brought forward by a held envelope, ms.
    pub held_refresh_ms: (u64, u64),
    /// Delay range of receipts (from when the first of a batch is owed), ms.
    pub receipt_delay_ms: (u64, u64),
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            transcript_delay_ms: DEFAULT_TRANSCRIPT_DELAY_MS,
            list_refresh_ms: DEFAULT_LIST_REFRESH_MS,
            held_refresh_ms: DEFAULT_HELD_REFRESH_MS,
            receipt_delay_ms: DEFAULT_RECEIPT_DELAY_MS,
        }
    }
}

pub(crate) fn between((low, high): (u64, u64)) -> u64 {
    if high <= low {
        low
    } else {
        rand::thread_rng().gen_range(low..=high)
    }
}

impl Engine {
    /// Sets the timing of transcripts and list refreshes.
    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = timing;
        self.refresh_due_ms = None;
    }

    /// The timing settings.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Queues a transcript of `body` sent to `to` for this account's other devices, due after
    /// a random delay. Save the state afterwards. Nothing is queued if the account's own list
    /// as last fetched has no other device (no text waits in the record for nobody).
    pub fn queue_transcript(&mut self, to: &str, body: &str, now_ms: u64) {
        self.queue(to, body, None, now_ms);
    }

    /// Queues a transcript of a file sent to `to`, as [`Engine::queue_transcript`] does a
    /// text's.
    pub fn queue_file_transcript(&mut self, to: &str, file: &crate::crypto::FileRef, now_ms: u64) {
        let line = file.summary();
        self.queue(to, &line, Some(file.clone()), now_ms);
    }

    fn queue(&mut self, to: &str, body: &str, file: Option<crate::crypto::FileRef>, now_ms: u64) {
        if self.record.lists.contains_key(self.state.user()) && !self.has_other_devices() {
            return;
        }
        let due_ms = now_ms + between(self.timing.transcript_delay_ms);
        // Kept in order of sending: a later one is never due before an earlier one.
        let due_ms = self
            .record
            .transcripts
            .back()
            .map_or(due_ms, |last| due_ms.max(last.due_ms));
        self.record.transcripts.push_back(QueuedTranscript {
            to: to.to_owned(),
            body: body.to_owned(),
            due_ms,
            file,
        });
    }

    /// When the first queued transcript is due (ms since the Unix epoch), if any is queued.
    pub fn next_transcript_due_ms(&self) -> Option<u64> {
        self.record.transcripts.front().map(|t| t.due_ms)
    }

    /// The first queued transcript if it is due: send it to our own account (authenticated),
    /// then [`Engine::transcript_sent`].
    pub fn due_transcript(&self, now_ms: u64) -> Option<Outgoing> {
        self.record
            .transcripts
            .front()
            .filter(|t| t.due_ms <= now_ms)
            .map(|t| match &t.file {
                Some(file) => Outgoing::file_transcript(&t.to, file),
                None => Outgoing::transcript(&t.to, &t.body),
            })
    }

    /// The recipient and file of the first queued transcript if it is due and of a file.
    pub fn due_transcript_file(&self, now_ms: u64) -> Option<(&str, &crate::crypto::FileRef)> {
        let t = self.record.transcripts.front()?;
        (t.due_ms <= now_ms).then_some(())?;
        Some((t.to.as_str(), t.file.as_ref()?))
    }

    /// The recipient and text of the first queued transcript if it is due (for a driver that
    /// builds the payload itself, as the browser page does).
    pub fn due_transcript_text(&self, now_ms: u64) -> Option<(&str, &str)> {
        self.record
            .transcripts
            .front()
            .filter(|t| t.due_ms <= now_ms)
            .map(|t| (t.to.as_str(), t.body.as_str()))
    }

    /// The first queued transcript was sent (or there is no other device to send it to).
    pub fn transcript_sent(&mut self) {
        self.record.transcripts.pop_front();
    }

    /// When contacts' lists are next refreshed (ms since the Unix epoch): a periodic refresh,
    /// brought forward to a short random delay once an envelope is held for its sender's
    /// list ([`HoldReason::AwaitingList`](super::HoldReason::AwaitingList)).
    pub fn lists_refresh_due_ms(&mut self, now_ms: u64) -> u64 {
        let due = *self.refresh_due_ms.get_or_insert_with(|| {
            now_ms
                + between((
                    self.timing.list_refresh_ms / 2,
                    self.timing.list_refresh_ms * 3 / 2,
                ))
        });
        if !self.refresh_wanted || self.refresh_brought_forward {
            return due;
        }
        self.refresh_brought_forward = true;
        let soon = now_ms + between(self.timing.held_refresh_ms);
        let due = due.min(soon);
        self.refresh_due_ms = Some(due);
        due
    }

    /// The lists to refresh now, in random order: every contact's (whether or not we hold its
    /// list yet), every other list we hold, and every held sender's (never our own: that one comes from the authenticated channel). Schedules
    /// the next periodic refresh. Give each fetched list to
    /// [`Engine::accept_device_list`], then read the held envelopes again with what came of
    /// each (`SenderList::Refetched`, `Unavailable` or `Failed`).
    pub fn lists_to_refresh(&mut self, now_ms: u64) -> Vec<String> {
        let own = self.state.user();
        let mut users: Vec<String> = self
            .record
            .lists
            .keys()
            .chain(self.record.contacts.keys())
            .chain(self.record.held.iter().map(|h| &h.from))
            .filter(|u| u.as_str() != own)
            .cloned()
            .collect();
        users.sort();
        users.dedup();
        users.shuffle(&mut rand::thread_rng());
        self.refresh_due_ms = Some(
            now_ms
                + between((
                    self.timing.list_refresh_ms / 2,
                    self.timing.list_refresh_ms * 3 / 2,
                )),
        );
        self.refresh_wanted = false;
        self.refresh_brought_forward = false;
        users
    }

    /// Whether `user` is a first contact: nothing about them is known, so an envelope of theirs
    /// came over the authenticated route and their list may be fetched at once (see the module
    /// doc).
    pub(crate) fn is_first_contact(&self, user: &str) -> bool {
        !self.record.lists.contains_key(user)
            && !self.record.contacts.contains_key(user)
            && self.state.pins.pinned(user).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_in_their_range() {
        for _ in 0..100 {
            let d = between((10, 20));
            assert!((10..=20).contains(&d));
        }
        assert_eq!(between((5, 5)), 5);
        assert_eq!(between((7, 3)), 7);
    }
}
