//! Sending: the engine prepares each envelope (see [`crate::engine::send`]); this claims keys,
//! saves, transmits on the right connection and follows the broker's answers.

use std::time::Instant;

use sealpost_proto::{ClientFrame, EnvelopeId, SendOutcome, ServerFrame};

use super::{Client, ClientError, PreparedEnvelope, now_ms};
use crate::{
    conn::Connection,
    engine::{Delivery, Outgoing, SendProgress, SendStep, check_handle},
};

/// How many times a send is retried on a new connection after the old one failed.
const CONNECTION_RETRIES: usize = 3;

impl Client {
    /// Sends `outgoing` to every current device of `to` (those of its verified list, fetched
    /// if not fresh) as one envelope, following device-list changes. Returns the envelope id.
    pub(super) async fn send_outgoing(
        &mut self,
        to: &str,
        outgoing: Outgoing,
    ) -> Result<EnvelopeId, ClientError> {
        if to == self.engine.user() {
            // Our own list as we hold it: fetched at connect and on a timer, never right
            // after a send.
            self.own_list().await?;
        } else {
            self.verified_list(to, false).await?;
        }
        let mut send = self.engine.start_send(to, outgoing, None, None, now_ms())?;
        let result = async {
            loop {
                let started = Instant::now();
                match self.engine.send_step(&mut send, now_ms())? {
                    SendStep::ClaimKey { user, device, with } => {
                        self.claim_session(&user, device, with).await?;
                    }
                    SendStep::Transmit(frame) => {
                        self.stats.encrypt_seal += started.elapsed();
                        // The ratchets advanced: save before anything leaves this device.
                        self.save()?;
                        let outcome = self.transmit(&frame, send.id()).await?;
                        match self.engine.send_answer(&mut send, outcome)? {
                            SendProgress::Sent(id) => return Ok(id),
                            SendProgress::Stale => {
                                self.verified_list(to, true).await?;
                            }
                        }
                    }
                }
            }
        }
        .await;
        if result.is_err() {
            // Not sent: a text leaves the conversation again.
            self.engine.abandon_send(send);
            self.save()?;
        }
        result
    }

    /// Sends one frame and waits for the broker's answer, reconnecting (same envelope id, so
    /// at most once at the broker) if the connection fails.
    async fn transmit(
        &mut self,
        frame: &ClientFrame,
        id: EnvelopeId,
    ) -> Result<SendOutcome, ClientError> {
        let mut last = None;
        for _ in 0..CONNECTION_RETRIES {
            let result = match frame {
                ClientFrame::SealedSend { .. } => self.transmit_sealed(frame, id).await,
                _ => self.transmit_authenticated(frame, id).await,
            };
            match result {
                Ok(outcome) => return Ok(outcome),
                Err(ClientError::Conn(e)) if !e.is_device_revoked() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Conn(last.expect("at least one attempt")))
    }

    async fn transmit_sealed(
        &mut self,
        frame: &ClientFrame,
        envelope: EnvelopeId,
    ) -> Result<SendOutcome, ClientError> {
        let mut conn = match self.sealed.take() {
            Some(c) => c,
            None => Connection::anonymous(&self.api.ws_url("/v1/sealed")).await?,
        };
        conn.send(frame).await?;
        loop {
            match conn.next().await? {
                ServerFrame::SendResult { id, outcome } if id == envelope => {
                    self.sealed = Some(conn);
                    return Ok(outcome);
                }
                // Answers to earlier, abandoned sends and error notes carry nothing for us.
                _ => {}
            }
        }
    }

    async fn transmit_authenticated(
        &mut self,
        frame: &ClientFrame,
        envelope: EnvelopeId,
    ) -> Result<SendOutcome, ClientError> {
        let mut conn = self.take_conn().await?;
        if let Err(e) = conn.send(frame).await {
            self.on_conn_lost();
            return Err(e.into());
        }
        loop {
            match conn.next().await {
                Ok(ServerFrame::SendResult { id, outcome }) if id == envelope => {
                    self.conn = Some(conn);
                    return Ok(outcome);
                }
                Ok(ServerFrame::SendResult { .. }) => {}
                Ok(frame) => self.inbox.push_back(frame),
                Err(e) => {
                    self.on_conn_lost();
                    return Err(e.into());
                }
            }
        }
    }

    /// The authenticated connection, opened if needed (taken out; put it back when done).
    pub(super) async fn take_conn(&mut self) -> Result<Connection, ClientError> {
        if let Some(conn) = self.conn.take() {
            return Ok(conn);
        }
        match Connection::authenticated(&self.api, &self.creds()).await {
            Ok((conn, _)) => {
                // A new connection: our own list is fetched again (on this channel).
                self.own_list_due = Instant::now();
                Ok(conn)
            }
            Err(e) if e.is_device_revoked() => Err(ClientError::DeviceRevoked),
            Err(e) => Err(e.into()),
        }
    }

    /// Connects to the broker now (authenticated), if not connected: to tell the user that
    /// it worked, or that this device was removed from its account
    /// ([`ClientError::DeviceRevoked`]) before anything else is tried.
    pub async fn connect(&mut self) -> Result<(), ClientError> {
        let conn = self.take_conn().await?;
        self.conn = Some(conn);
        Ok(())
    }

    /// A connection ended: whatever it delivered and we did not ack comes again on the next.
    pub(super) fn on_conn_lost(&mut self) {
        self.conn = None;
        self.inbox
            .retain(|f| !matches!(f, ServerFrame::Deliver { .. }));
    }

    /// Whether this device holds `to`'s delivery token, i.e. whether messages to `to` travel
    /// sealed over the anonymous connection (otherwise the first one goes authenticated).
    pub fn sends_sealed_to(&self, to: &str) -> bool {
        self.engine.sends_sealed_to(to)
    }

    /// Sends a text message to `to`, and queues a transcript for this account's other devices:
    /// it goes after a random delay ([`Client::set_transcript_delay`]), authenticated, while
    /// [`Client::next_event`] or [`Client::flush_transcripts`] runs (see
    /// [`crate::engine::schedule`]).
    pub async fn send_text(&mut self, to: &str, text: &str) -> Result<EnvelopeId, ClientError> {
        self.check_contact(to, "sending to your own account is not supported")?;
        self.share_token_once(to).await?;
        let id = self.send_outgoing(to, Outgoing::text(text)).await?;
        self.engine.queue_transcript(to, text, now_ms());
        self.save()?;
        Ok(id)
    }

    /// Waits until every queued transcript is due and sends it (a one-shot program calls this
    /// before it exits; a crash keeps them queued for the next run).
    pub async fn flush_transcripts(&mut self) -> Result<(), ClientError> {
        while let Some(due_ms) = self.engine.next_transcript_due_ms() {
            let wait = due_ms.saturating_sub(now_ms());
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            self.send_due_transcripts().await?;
        }
        Ok(())
    }

    /// Sends the queued transcripts that are due, authenticated, each removed from the queue
    /// once the broker has it.
    pub(super) async fn send_due_transcripts(&mut self) -> Result<(), ClientError> {
        while let Some(transcript) = self.engine.due_transcript(now_ms()) {
            self.send_to_own_devices(transcript).await?;
            self.engine.transcript_sent();
            self.save()?;
        }
        Ok(())
    }

    /// `to` is a valid handle of another account.
    pub(super) fn check_contact(&self, to: &str, own: &str) -> Result<(), ClientError> {
        check_handle(to)?;
        if to == self.engine.user() {
            return Err(ClientError::Invalid(own.into()));
        }
        Ok(())
    }

    /// Sends `to` this account's delivery token before the first thing we send it (so its
    /// replies travel sealed).
    pub(super) async fn share_token_once(&mut self, to: &str) -> Result<(), ClientError> {
        self.verified_list(to, false).await?;
        if !self.engine.token_shared(to) {
            let token = self.engine.delivery_token_outgoing();
            self.send_outgoing(to, token).await?;
            self.engine.mark_token_shared(to);
        }
        Ok(())
    }

    /// Sends this account's other devices `outgoing` (a transcript, a call handled here), if
    /// it has any.
    pub(super) async fn send_to_own_devices(
        &mut self,
        outgoing: Outgoing,
    ) -> Result<(), ClientError> {
        let own = self.engine.user().to_owned();
        self.own_list().await?;
        if self.engine.has_other_devices() {
            self.send_outgoing(&own, outgoing).await?;
        }
        Ok(())
    }

    /// Encrypts and seals a text for every device of `to` in its verified list without
    /// sending it (for tools that keep an outbox, and for tests that need to see or alter
    /// envelopes). The ratchets advance and are saved. Send it with
    /// [`Client::send_prepared`].
    pub async fn prepare_text(
        &mut self,
        to: &str,
        text: &str,
    ) -> Result<PreparedEnvelope, ClientError> {
        check_handle(to)?;
        self.verified_list(to, false).await?;
        let outgoing = Outgoing::payload(crate::crypto::Payload::Text {
            body: text.to_owned(),
            link: None,
        });
        let mut send = self.engine.start_send(to, outgoing, None, None, now_ms())?;
        while let SendStep::ClaimKey { user, device, with } =
            self.engine.send_step(&mut send, now_ms())?
        {
            self.claim_session(&user, device, with).await?;
        }
        self.save()?;
        Ok(send.envelope())
    }

    /// Sends a prepared envelope exactly as it is (sealed if we hold the recipient's delivery
    /// token, else authenticated) and returns the broker's answer.
    pub async fn send_prepared(
        &mut self,
        envelope: &PreparedEnvelope,
    ) -> Result<SendOutcome, ClientError> {
        let frame = self.engine.frame_for(envelope, Delivery::DURABLE);
        self.transmit(&frame, envelope.id).await
    }
}
