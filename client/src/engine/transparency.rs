//! Key transparency in the engine: what the logs seen are, what a list's evidence says, and
//! whether this account's own log entry holds a key it did not make. The checks themselves are
//! in [`crate::crypto::transparency`]; the fetching (roots, append-only proofs, co-signatures,
//! own history) is the SDK's or the page's:
//!
//! ```text
//! fetch list + evidence ─▶ check_transparency ─▶ Step::Advance: fetch audit, verify_extension
//!                                              ─▶ accept_root ─▶ fetch co-signatures ─▶ check_cosignatures
//! periodically: fetch own history ─▶ check_own_history ─▶ Event::ForeignKeyPublished
//! ```

use sealpost_proto::transparency::SignedRoot;

use super::{Engine, events::Event};
use crate::{
    crypto::transparency::{Audit, LogPins, LogStatus, Step, TransparencyError, own_history},
    error::ClientError,
};

/// How many of its own entry's newest values a device checks.
pub const OWN_HISTORY_VERSIONS: usize = 64;

fn failed(user: &str, error: TransparencyError) -> ClientError {
    ClientError::Transparency {
        user: user.to_owned(),
        error,
    }
}

impl Engine {
    /// The logs as this device has seen them.
    pub fn log_pins(&self) -> &LogPins {
        &self.record.logs
    }

    /// Checks `user`'s fetched list against its transparency evidence (`None`: the broker
    /// sent none). `Ok(None)`: the domain keeps no log (none was ever seen).
    pub fn check_transparency(
        &self,
        user: &str,
        signed_list: &[u8],
        evidence: Option<&[u8]>,
    ) -> Result<Option<(SignedRoot, Step)>, ClientError> {
        self.record
            .logs
            .check(user, signed_list, evidence)
            .map_err(|e| failed(user, e))
    }

    /// Records `root` as seen (the newest of its domain if it is newer): call once its
    /// [`Step`] is done.
    pub fn accept_root(&mut self, root: &SignedRoot, now_ms: u64) {
        self.record.logs.accept(root, now_ms);
    }

    /// [`Engine::accept_root`] for a root too far from the newest seen to verify the epochs
    /// between: the domain's log is pending until an auditor co-signs one of its roots.
    pub fn accept_root_unproved(&mut self, root: &SignedRoot, now_ms: u64) {
        self.record.logs.accept_unproved(root, now_ms);
    }

    /// Checks the auditors' co-signatures of `root` (for `user`'s list).
    pub fn check_cosignatures(
        &mut self,
        user: &str,
        root: &SignedRoot,
        cosignatures: &[Vec<u8>],
        now_ms: u64,
    ) -> Result<Audit, ClientError> {
        self.record
            .logs
            .check_cosignatures(root, cosignatures, now_ms)
            .map_err(|e| failed(user, e))
    }

    /// Checks this account's own entry (the history proof at `root`): every master key in it
    /// must be one this account made. Returns the warnings for values not checked before.
    pub fn check_own_history(
        &mut self,
        root: &SignedRoot,
        proof: &[u8],
    ) -> Result<Vec<Event>, ClientError> {
        let own = self.state.user().to_owned();
        let keys =
            own_history(root, &own, proof, OWN_HISTORY_VERSIONS).map_err(|e| failed(&own, e))?;
        let current = self.state.master_key.public_key();
        let ours = |master: &[u8; 32]| {
            *master == current
                || self
                    .record
                    .own_masters
                    .iter()
                    .any(|m| m.as_slice() == master)
        };
        // A device's first check (a device linked later never saw the keys its account had
        // before it, e.g. before a master-key rotation): what came before the newest value is
        // history, if the newest value is this account's own.
        let baseline = match keys.iter().max_by_key(|k| k.version) {
            Some(newest) if self.record.own_log_version == 0 && ours(&newest.master_key) => {
                newest.version
            }
            _ => self.record.own_log_version,
        };
        let mut events = Vec::new();
        let mut newest = self.record.own_log_version;
        for key in keys {
            newest = newest.max(key.version);
            if key.version <= baseline {
                continue;
            }
            if !ours(&key.master_key) {
                events.push(Event::ForeignKeyPublished {
                    epoch: key.epoch,
                    version: key.version,
                });
            }
        }
        self.record.own_log_version = newest;
        Ok(events)
    }

    /// How far `user`'s domain's log is verified (see [`LogStatus`]).
    pub fn log_status(&self, user: &str, now_ms: u64, grace_ms: u64) -> LogStatus {
        let domain = user.rsplit_once('@').map_or("", |(_, d)| d);
        self.record.logs.status(domain, now_ms, grace_ms)
    }
}
