//! Receipts, typing and disappearing messages (see [`crate::engine::receipts`] and
//! [`crate::engine::disappearing`]): the engine decides, this sends and saves.

use std::time::Duration;

use sealpost_proto::EnvelopeId;

use super::{Client, ClientError, Event, now_ms};

impl Client {
    /// The user has seen the conversation with `peer`: its incoming messages become read
    /// ([`MessageState::Read`](crate::engine::MessageState::Read) in
    /// [`Client::conversations`]) and, unless read receipts are off, `peer` gets a read receipt
    /// for them (after the receipt delay, [`Client::set_receipt_delay`], while
    /// [`Client::next_event`] runs). Returns the messages newly read.
    pub async fn mark_read(&mut self, peer: &str) -> Result<Vec<EnvelopeId>, ClientError> {
        let ids = self.engine.mark_read(peer, now_ms());
        self.save()?;
        self.send_receipts().await;
        Ok(ids)
    }

    /// Whether this user sends read receipts (and sees others'; default on).
    pub fn read_receipts(&self) -> bool {
        self.engine.read_receipts()
    }

    /// Turns read receipts on or off (kept in the state). Off: none are sent and, as in
    /// Signal, others' are not shown either. Delivered receipts always go.
    pub fn set_read_receipts(&mut self, on: bool) -> Result<(), ClientError> {
        self.engine.set_read_receipts(on);
        self.save()
    }

    /// Tells `peer` this user is typing (`on`) or stopped. Ephemeral: only `peer`'s connected
    /// devices get it, nothing is stored anywhere.
    pub async fn send_typing(&mut self, peer: &str, on: bool) -> Result<EnvelopeId, ClientError> {
        self.check_contact(peer, "typing to your own account is not supported")?;
        self.share_token_once(peer).await?;
        let outgoing = self.engine.typing_outgoing(on);
        self.send_outgoing(peer, outgoing).await
    }

    /// Sets the disappearing-messages timer of the conversation with `peer` (`None`: off; else
    /// 30 s to 4 weeks, whole seconds) and tells `peer`'s devices and this account's other
    /// devices, which all honour it.
    pub async fn set_disappearing(
        &mut self,
        peer: &str,
        timer: Option<Duration>,
    ) -> Result<(), ClientError> {
        self.check_contact(peer, "disappearing messages are set per contact")?;
        let secs = timer
            .map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX))
            .filter(|s| *s > 0);
        if secs.is_none() && timer.is_some() {
            return Err(ClientError::Invalid(
                "a disappearing-messages timer is at least 30 s".into(),
            ));
        }
        self.share_token_once(peer).await?;
        let envelopes = self.engine.set_disappearing(peer, secs, now_ms())?;
        self.save()?;
        let own = self.engine.user().to_owned();
        for (to, outgoing) in envelopes {
            if to == own {
                self.send_to_own_devices(outgoing).await?;
            } else {
                self.send_outgoing(&to, outgoing).await?;
            }
        }
        self.save()
    }

    /// The disappearing-messages timer of the conversation with `peer` (`None`: off).
    pub fn disappearing(&self, peer: &str) -> Option<Duration> {
        self.engine
            .disappearing(peer)
            .map(|s| Duration::from_secs(u64::from(s)))
    }

    /// Deletes the messages whose timer ran out now and returns what went
    /// ([`Event::Expired`]). [`Client::next_event`] also does this when they are due and
    /// returns the same events.
    pub fn expire_messages(&mut self) -> Result<Vec<Event>, ClientError> {
        let events = self.engine.expire_messages(now_ms());
        if !events.is_empty() {
            self.save()?;
        }
        Ok(events)
    }

    /// Sets the random delay of receipts, between `min` and `max` (default 2 to 15 s): a
    /// receipt right after a delivery would let the broker pair the two (see
    /// [`crate::engine::receipts`]).
    pub fn set_receipt_delay(&mut self, min: Duration, max: Duration) {
        let mut timing = self.engine.timing();
        timing.receipt_delay_ms = (super::millis(min), super::millis(max));
        self.engine.set_timing(timing);
    }

    /// Sends the receipts that are due (see [`crate::engine::receipts`]). Best effort: a
    /// receipt that cannot be sent now is dropped, never a reason to fail the receive loop.
    pub(super) async fn send_receipts(&mut self) {
        if self
            .engine
            .next_receipts_due_ms()
            .is_none_or(|due| due > now_ms())
        {
            return;
        }
        let receipts = self.engine.take_receipts(now_ms());
        // Taken: saved so that a crash does not send them twice.
        if self.save().is_err() {
            return;
        }
        for (to, outgoing) in receipts {
            let _ = self.send_outgoing(&to, outgoing).await;
        }
    }
}
