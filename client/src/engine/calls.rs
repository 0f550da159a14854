//! Call signaling: offers, answers, ICE candidates and hang-ups travel as sealed envelopes of
//! the urgent class with a short time-to-live (about the ring time), to every device of the
//! peer, so an offer rings all of them. Answering or declining on one device tells this
//! account's other devices ([`Payload::AnsweredElsewhere`]) so they stop ringing.
//!
//! Media keys are bound to identities by the DTLS fingerprint inside offers and answers: the
//! application checks the fingerprint of the DTLS connection against the one in the peer's
//! [`Event::Call`](super::Event::Call), which comes from a device in the peer's verified list.

use super::{
    Engine,
    send::{Delivery, Outgoing},
};
use crate::{
    crypto::{CallId, Payload},
    error::ClientError,
};

/// Time-to-live of call signaling (urgent class): about the ring time, so a device that
/// connects while the caller still waits rings, and a stale offer is never delivered.
pub const CALL_TTL_SECS: u32 = 60;

impl Outgoing {
    /// Call signaling to a peer: one of [`Payload::CallOffer`], [`Payload::CallAnswer`],
    /// [`Payload::IceCandidate`], [`Payload::HangUp`], [`Payload::Busy`],
    /// [`Payload::Decline`].
    pub fn call(payload: Payload) -> Result<Self, ClientError> {
        if !payload.is_call_signal() {
            return Err(ClientError::Invalid("not a call signaling payload".into()));
        }
        Ok(Self::with(payload, Delivery::CALL))
    }
}

impl Engine {
    /// To this account's other devices: the call `call_id` was answered or declined here.
    pub fn answered_elsewhere(&self, call_id: CallId) -> Outgoing {
        Outgoing::with(
            Payload::AnsweredElsewhere {
                call_id,
                device: self.state.device_id(),
            },
            Delivery::CALL,
        )
    }

    /// Whether this account has other devices (in its cached verified list) that should hear
    /// of calls handled and messages sent here.
    pub fn has_other_devices(&self) -> bool {
        let me = self.state.device_id();
        self.listed_devices(self.state.user())
            .iter()
            .any(|d| *d != me)
    }
}
