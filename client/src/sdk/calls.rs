//! Call signaling (see [`crate::engine::calls`]).

use sealpost_proto::EnvelopeId;

use super::{Client, ClientError};
use crate::{
    crypto::{CallId, Payload},
    engine::Outgoing,
};

impl Client {
    /// Sends call signaling to every device of `to` (urgent class,
    /// [`CALL_TTL_SECS`](super::CALL_TTL_SECS)): an offer rings all of them. `payload` must be
    /// a call kind ([`Payload::CallOffer`], [`Payload::CallAnswer`],
    /// [`Payload::IceCandidate`], [`Payload::HangUp`], [`Payload::Busy`],
    /// [`Payload::Decline`]); to answer or decline use [`Client::answer_call`] /
    /// [`Client::decline_call`], which also stop this account's other devices ringing.
    ///
    /// Media keys are bound to identities by the DTLS fingerprint inside offers and answers:
    /// check the fingerprint of the DTLS connection against the one in the peer's
    /// [`Event::Call`](super::Event::Call) (it comes from a device in the peer's verified
    /// list).
    pub async fn send_call_signal(
        &mut self,
        to: &str,
        payload: Payload,
    ) -> Result<EnvelopeId, ClientError> {
        self.check_contact(to, "calling your own account is not supported")?;
        let outgoing = Outgoing::call(payload)?;
        self.share_token_once(to).await?;
        self.send_outgoing(to, outgoing).await
    }

    /// Answers `caller`'s call on this device: sends the answer, and tells this account's
    /// other devices ([`Payload::AnsweredElsewhere`]) so they stop ringing.
    pub async fn answer_call(
        &mut self,
        caller: &str,
        call_id: CallId,
        sdp: String,
        dtls_fingerprint: String,
    ) -> Result<EnvelopeId, ClientError> {
        let answer = Payload::CallAnswer {
            call_id,
            sdp,
            dtls_fingerprint,
        };
        let id = self.send_call_signal(caller, answer).await?;
        self.send_to_own_devices(self.engine.answered_elsewhere(call_id))
            .await?;
        Ok(id)
    }

    /// Declines `caller`'s call and stops this account's other devices ringing.
    pub async fn decline_call(
        &mut self,
        caller: &str,
        call_id: CallId,
    ) -> Result<EnvelopeId, ClientError> {
        let id = self
            .send_call_signal(caller, Payload::Decline { call_id })
            .await?;
        self.send_to_own_devices(self.engine.answered_elsewhere(call_id))
            .await?;
        Ok(id)
    }
}
