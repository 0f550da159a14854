//! History for a newly linked device: the conversations as an archive (its bytes travel as an
//! encrypted attachment, see `sdk::files`), and their import on the new device.

use std::collections::VecDeque;

use super::{
    Engine,
    record::{MESSAGES_PER_CONVERSATION, StoredMessage},
};

/// The version of a history archive ([`super::Engine::history_archive`]).
const HISTORY_VERSION: u8 = 1;

impl Engine {
    /// The account's conversations as this device has them, for a device just linked (see
    /// [`crate::crypto::Payload::History`]): at most [`MESSAGES_PER_CONVERSATION`] messages
    /// with each contact. MessagePack `[version, [[contact, [message]]]]`.
    pub fn history_archive(&self) -> Vec<u8> {
        let own = self.user();
        let conversations: Vec<(&String, &VecDeque<StoredMessage>)> = self
            .record
            .contacts
            .iter()
            .filter(|(with, c)| *with != own && !c.messages.is_empty())
            .map(|(with, c)| (with, &c.messages))
            .collect();
        rmp_serde::to_vec(&(HISTORY_VERSION, conversations)).expect("history always serializes")
    }

    /// Adds an archive's conversations to this device's: merged by time, each message once,
    /// the newest kept. Answers how many messages were new here.
    pub fn import_history(&mut self, archive: &[u8]) -> Result<usize, crate::error::ClientError> {
        let malformed = || crate::error::ClientError::Invalid("malformed history archive".into());
        let (version, conversations): (u8, Vec<(String, Vec<StoredMessage>)>) =
            rmp_serde::from_slice(archive).map_err(|_| malformed())?;
        if version != HISTORY_VERSION {
            return Err(malformed());
        }
        let mut added = 0;
        for (with, messages) in conversations {
            if with == self.user() || super::check_handle(&with).is_err() {
                continue;
            }
            let contact = self.record.contacts.entry(with).or_default();
            let mut all: Vec<StoredMessage> = contact.messages.drain(..).collect();
            let before = all.len();
            all.extend(messages);
            all.sort_by(|a, b| {
                (a.time_ms, a.outgoing, a.device, &a.body)
                    .cmp(&(b.time_ms, b.outgoing, b.device, &b.body))
            });
            all.dedup_by(|a, b| {
                (a.time_ms, a.outgoing, a.device, &a.body)
                    == (b.time_ms, b.outgoing, b.device, &b.body)
            });
            added += all.len().saturating_sub(before);
            let skip = all.len().saturating_sub(MESSAGES_PER_CONVERSATION);
            contact.messages = all.into_iter().skip(skip).collect();
        }
        Ok(added)
    }
}
