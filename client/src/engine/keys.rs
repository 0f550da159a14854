//! One-time and fallback keys to publish in the broker's key directory.

use super::Engine;

/// One-time keys a device keeps published.
pub const ONE_TIME_KEYS: usize = 50;

/// Keys generated but not yet published, with the ids to upload them under
/// (`PUT /v1/accounts/{h}/devices/{id}/keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUpload {
    /// (key id, `SignedOneTimeKey` encoding)
    pub one_time: Vec<(u64, Vec<u8>)>,
    /// The fallback key, if a new one was made.
    pub fallback: Option<(u64, Vec<u8>)>,
}

impl Engine {
    /// The keys to publish, or `None` if all are published. Once the broker stored them,
    /// call [`Engine::mark_keys_published`]; if it did not, the same keys come again (with
    /// new ids: the directory ignores ids it has, keys it has not are added).
    pub fn key_upload(&mut self) -> Option<KeyUpload> {
        let unpublished = self.state.device.unpublished_keys();
        if unpublished.one_time.is_empty() && unpublished.fallback.is_none() {
            return None;
        }
        let mut next = self.record.next_key_id;
        let mut take_id = || {
            next += 1;
            next
        };
        let one_time = unpublished
            .one_time
            .iter()
            .map(|k| (take_id(), k.to_bytes().to_vec()))
            .collect();
        let fallback = unpublished
            .fallback
            .map(|k| (take_id(), k.to_bytes().to_vec()));
        self.record.next_key_id = next;
        Some(KeyUpload { one_time, fallback })
    }

    /// The keys of [`Engine::key_upload`] are published.
    pub fn mark_keys_published(&mut self) {
        self.state.device.mark_keys_as_published();
    }

    /// Generates one-time keys up to [`ONE_TIME_KEYS`] when the directory holds `have`, and a
    /// fallback key if it has none. Returns whether there is anything to upload.
    pub fn top_up_keys(&mut self, have: u64, has_fallback: bool) -> bool {
        let have = usize::try_from(have).unwrap_or(usize::MAX);
        if have >= ONE_TIME_KEYS && has_fallback {
            return false;
        }
        if have < ONE_TIME_KEYS {
            let missing = ONE_TIME_KEYS - have;
            let device = &mut self.state.device;
            device.generate_one_time_keys(missing.min(device.max_published_one_time_keys()));
        }
        if !has_fallback {
            self.state.device.rotate_fallback_key();
        }
        true
    }
}
