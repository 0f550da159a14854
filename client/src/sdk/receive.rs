//! Receiving: reads the authenticated connection, has the engine open each envelope (fetching
//! what it asks for: only our own or a first contact's list), saves, then acks; tries held
//! envelopes again after each backlog and on a deadline. While waiting it also runs the timed
//! jobs of [`crate::engine::schedule`]: queued transcripts, the refresh of contacts' lists
//! (after which held envelopes are read again), and of our own list.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use sealpost_proto::{ClientFrame, EnvelopeId, Notice, ServerFrame, limits::MAX_ACKS_PER_FRAME};

use super::{Client, ClientError, Event, now_ms};
use crate::{
    conn::Connection,
    crypto::group::GroupWire,
    engine::{Failure, GroupEvent, HoldReason, Need, SenderList, Unread, receive::sender_domain},
    error::EnvelopeError,
};

/// Most envelopes handled per batch (one save, one ack).
const BATCH: usize = 128;

impl Client {
    /// Waits for the next event: messages, rejections, links, notices. Reconnects when the
    /// connection drops.
    ///
    /// Not cancel-safe: a call abandoned midway (by `select!` or a timeout) may have decrypted
    /// envelopes without saving or acknowledging them; use the client no further after that
    /// (drop it and [`Client::open`] again, which resumes from the last save). To stop waiting
    /// safely, use [`Client::next_event_or`].
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.next_event_or(std::future::pending()).await? {
                return Ok(event);
            }
        }
    }

    /// As [`Client::next_event`], but gives up waiting when `interrupt` completes: `Ok(None)`,
    /// with nothing lost, so that the caller can use the client (send, verify) and then wait
    /// again. It stops only while waiting for the broker (for a frame, or while reconnecting
    /// to it: a half-open connection is dropped), never in the middle of handling what
    /// arrived (a daemon serving other commands between events). An interrupt that fires
    /// again and again would keep frames waiting; a daemon's requests are rare.
    pub async fn next_event_or(
        &mut self,
        interrupt: impl std::future::Future<Output = ()>,
    ) -> Result<Option<Event>, ClientError> {
        let mut interrupt = std::pin::pin!(interrupt);
        // What sends found to tell the user (unlisted devices) comes first.
        self.events.extend(self.engine.take_notices());
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(Some(event));
            }
            let frame = match self.inbox.pop_front() {
                Some(frame) => frame,
                None => {
                    // Wait for a frame only until the next timed job is due (a deadline: a
                    // busy connection must not put it off). The wait is cancel-safe: a frame
                    // taken off the connection is returned in the same poll.
                    let due = self.next_job_due();
                    let read = tokio::select! {
                        biased;
                        () = &mut interrupt => return Ok(None),
                        read = self.read_frame(Some(due)) => read?,
                    };
                    match read {
                        Some(frame) => frame,
                        None => {
                            self.run_due_jobs().await?;
                            continue;
                        }
                    }
                }
            };
            self.reconnects = 0;
            self.handle_frames(frame).await?;
            self.group_upkeep().await?;
            self.send_receipts().await;
        }
    }

    /// What receiving asked of groups, done outside the batch that asked: removals of members
    /// that asked to leave.
    pub(super) async fn group_upkeep(&mut self) -> Result<(), ClientError> {
        for (group, user) in std::mem::take(&mut self.leaves) {
            self.honour_leave(&group, &user).await?;
        }
        Ok(())
    }

    /// Reads and handles what arrives until `done` holds (checked before each frame), for at
    /// most `within`: a driver that must see something arrive before it goes on.
    pub(super) async fn receive_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + within;
        while !done(self) {
            let frame = match self.inbox.pop_front() {
                Some(frame) => frame,
                None => match self.read_frame(Some(deadline)).await? {
                    Some(frame) => frame,
                    None => {
                        return Err(ClientError::Invalid(
                            "timed out waiting for the broker".into(),
                        ));
                    }
                },
            };
            self.handle_frames(frame).await?;
        }
        Ok(())
    }

    /// The next frame; `None` if none came before `due` (when given).
    async fn read_frame(
        &mut self,
        due: Option<Instant>,
    ) -> Result<Option<ServerFrame>, ClientError> {
        loop {
            // The connection stays in `self` while waiting on it, so that a caller that stops
            // waiting (`next_event_or`) keeps it.
            let conn = self.take_conn().await?;
            let conn = self.conn.insert(conn);
            let next = match due {
                // `Connection::next` is cancel-safe: nothing is lost when the wait runs out.
                Some(due) => match tokio::time::timeout_at(due.into(), conn.next()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(None),
                },
                None => conn.next().await,
            };
            match next {
                Ok(frame) => return Ok(Some(frame)),
                Err(e) if e.is_device_revoked() => {
                    self.on_conn_lost();
                    return Err(ClientError::DeviceRevoked);
                }
                Err(e) => {
                    self.on_conn_lost();
                    self.reconnects += 1;
                    if self.reconnects > 3 {
                        return Err(e.into());
                    }
                    tokio::time::sleep(Duration::from_millis(100 << self.reconnects)).await;
                }
            }
        }
    }

    /// Handles `first` and whatever else has already arrived, as one batch.
    async fn handle_frames(&mut self, first: ServerFrame) -> Result<(), ClientError> {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            let next = match self.inbox.pop_front() {
                Some(frame) => frame,
                None => match self.conn.as_mut().and_then(Connection::try_next) {
                    Some(Ok(frame)) => frame,
                    Some(Err(_)) => {
                        self.on_conn_lost();
                        break;
                    }
                    None => break,
                },
            };
            batch.push(next);
        }
        let mut acks = Vec::new();
        // Ratchets moved without an ack to save for (ephemeral envelopes).
        let mut dirty = false;
        let mut retry_held = false;
        let mut result = Ok(());
        for frame in batch {
            if result.is_err() {
                // After a transient failure, the rest comes again on the next connection.
                continue;
            }
            match frame {
                ServerFrame::Deliver { seq, envelope } => {
                    match self
                        .handle_envelope(envelope.id, &envelope.ciphertext, false)
                        .await
                    {
                        Ok(()) => acks.push(seq),
                        Err(e) => result = Err(e),
                    }
                }
                ServerFrame::DeliverEphemeral { envelope } => {
                    // Nothing to ack; errors are reported like for stored envelopes.
                    match self
                        .handle_envelope(envelope.id, &envelope.ciphertext, true)
                        .await
                    {
                        Ok(()) => dirty = true,
                        Err(e) => result = Err(e),
                    }
                }
                ServerFrame::QueueEmpty => {
                    // The backlog is handled: time to try the held envelopes again (after
                    // this batch is acknowledged: a retry may take a while).
                    retry_held = true;
                    self.events.push_back(Event::QueueEmpty);
                }
                ServerFrame::Notice { notice, .. } => match notice {
                    Notice::KeysLow => {
                        if let Err(e) = self.replenish_keys().await {
                            result = Err(e);
                        }
                    }
                    Notice::MailboxFull => self.events.push_back(Event::MailboxFull),
                    Notice::KeyPackagesLow => {
                        if let Err(e) = self.publish_key_packages().await {
                            result = Err(e);
                        }
                    }
                },
                // Answers to sends are consumed where they are awaited; errors about acks are
                // of no use to the application.
                _ => {}
            }
        }
        if !acks.is_empty() || dirty {
            // Save before acknowledging: a crash now redelivers, and the ids deduplicate. An
            // ephemeral envelope is not acknowledged, but decrypting it moved the ratchet.
            self.save()?;
            for chunk in acks.chunks(MAX_ACKS_PER_FRAME) {
                if let Some(conn) = self.conn.as_mut()
                    && conn
                        .send(&ClientFrame::Ack {
                            seqs: chunk.to_vec(),
                        })
                        .await
                        .is_err()
                {
                    self.on_conn_lost();
                }
            }
        }
        if result.is_err() {
            self.on_conn_lost();
        } else if retry_held {
            self.retry_held().await?;
        }
        result
    }

    /// When the next timed job is due: trying held envelopes, a queued transcript, the
    /// refresh of contacts' lists, of our own list, the next disappearing message.
    fn next_job_due(&mut self) -> Instant {
        let now = Instant::now();
        let at_ms = |ms: u64| now + Duration::from_millis(ms.saturating_sub(now_ms()));
        let mut due = self.own_list_due;
        if self.engine.has_held() {
            due = due.min(self.next_held_retry);
        }
        if let Some(ms) = self.engine.next_transcript_due_ms() {
            due = due.min(at_ms(ms));
        }
        if let Some(ms) = self.engine.next_expiry_ms() {
            due = due.min(at_ms(ms));
        }
        if let Some(ms) = self.engine.next_receipts_due_ms() {
            due = due.min(at_ms(ms));
        }
        due.min(at_ms(self.engine.lists_refresh_due_ms(now_ms())))
    }

    /// Runs the timed jobs that are due.
    pub(super) async fn run_due_jobs(&mut self) -> Result<(), ClientError> {
        if self.engine.has_held() && Instant::now() >= self.next_held_retry {
            self.retry_held().await?;
        }
        let expired = self.expire_messages()?;
        self.events.extend(expired);
        self.send_due_transcripts().await?;
        self.refresh_own_list_if_due().await?;
        self.refresh_lists_if_due().await?;
        // Held envelopes read just now may owe receipts.
        self.send_receipts().await;
        Ok(())
    }

    /// Tries the held envelopes again now, saves what that changed, and schedules the next
    /// try.
    async fn retry_held(&mut self) -> Result<(), ClientError> {
        self.next_held_retry = Instant::now() + self.held_retry;
        if self.read_held(None, None).await {
            self.save()?;
        }
        Ok(())
    }

    /// Handles one newly delivered envelope. `Ok` means: handled (events queued, possibly a
    /// rejection or a hold) and to be acked; `Err` means a transient failure: do not ack.
    async fn handle_envelope(
        &mut self,
        id: EnvelopeId,
        ciphertext: &[u8],
        ephemeral: bool,
    ) -> Result<(), ClientError> {
        if self.engine.is_seen(id) {
            return Ok(());
        }
        if GroupWire::is_group(ciphertext) {
            let events = self.engine.open_group(id, ciphertext);
            for event in events {
                match &event {
                    Event::Group(GroupEvent::LeaveRequested { group, user }) => {
                        self.leaves.push((group.clone(), user.clone()));
                    }
                    // A member whose account's list we do not hold yet: fetched now, and the
                    // warning stays only if the list does not vouch for the device.
                    Event::Group(GroupEvent::Unverified {
                        group,
                        user,
                        device,
                    }) => {
                        let _ = self.verified_list(user, false).await;
                        if self.engine.member_vouched(group, user, *device) {
                            continue;
                        }
                    }
                    _ => {}
                }
                self.events.push_back(event);
            }
            return Ok(());
        }
        let result = self
            .open_envelope(id, ciphertext, SenderList::Cached)
            .await?;
        let events = self.engine.settle(id, ciphertext, ephemeral, result);
        self.events.extend(events);
        Ok(())
    }

    /// Tries the held envelopes again (of `only`, or of every sender), each sender's in
    /// order: the first that still cannot be read keeps its place and the rest stay behind
    /// it. `refreshed`: what came of a refresh of each sender's list just now (then a device
    /// still not in its list is rejected, a list that did not come keeps it held). Returns
    /// whether any was read (or rejected), i.e. whether there is state to save.
    pub(super) async fn read_held(
        &mut self,
        only: Option<&str>,
        mut refreshed: Option<&mut BTreeMap<String, Result<(), ClientError>>>,
    ) -> bool {
        let mut progress = false;
        // A domain found unreachable is not asked again in this pass: one slow lookup per
        // domain, however many of its senders are held.
        let mut unreachable: Vec<String> = Vec::new();
        for sender in self.engine.held_senders(only) {
            if unreachable.contains(&sender_domain(&sender)) {
                continue;
            }
            let mut queue = self.engine.take_held(&sender).into_iter();
            while let Some(held) = queue.next() {
                let id = held.id();
                let list = match refreshed.as_deref_mut().and_then(|r| r.remove(&sender)) {
                    None => SenderList::Cached,
                    Some(Ok(())) => {
                        // Kept for the sender's next envelope.
                        if let Some(r) = refreshed.as_deref_mut() {
                            r.insert(sender.clone(), Ok(()));
                        }
                        SenderList::Refetched
                    }
                    Some(Err(ClientError::Api(e))) if e.is_transient() => {
                        SenderList::Unavailable(ClientError::Api(e))
                    }
                    Some(Err(e)) => SenderList::Failed(e),
                };
                let refresh_failed = matches!(list, SenderList::Failed(_));
                match self.open_envelope(id, held.ciphertext(), list).await {
                    Ok(Ok(events)) => self.events.extend(events),
                    Ok(Err(Failure::Rejected(error))) => {
                        self.events.push_back(Event::Rejected { id, error });
                    }
                    failed @ (Ok(Err(Failure::Hold { .. })) | Err(_)) => {
                        if let (
                            true,
                            Ok(Err(Failure::Hold {
                                why: why @ HoldReason::KeyChanged,
                                ..
                            })),
                        ) = (refresh_failed, &failed)
                        {
                            // Held for its list, which came under another master key: the
                            // application is told, as for a fresh delivery.
                            self.events.push_back(Event::Held {
                                id,
                                user: sender.clone(),
                                why: *why,
                            });
                        }
                        if let Ok(Err(Failure::Hold {
                            why: HoldReason::SenderUnavailable,
                            ..
                        })) = failed
                        {
                            unreachable.push(sender_domain(&sender));
                        }
                        self.engine
                            .put_back_held(std::iter::once(held).chain(queue));
                        break;
                    }
                }
                progress = true;
            }
        }
        progress
    }

    /// Opens one envelope with the engine, fetching what it needs: the claimed sender's
    /// device list, or the broker's keys of our own account for a link request (which is then
    /// approved). `Err` is a transient failure of our own: the envelope is not settled.
    async fn open_envelope(
        &mut self,
        id: EnvelopeId,
        ciphertext: &[u8],
        list: SenderList,
    ) -> Result<Result<Vec<Event>, Failure>, ClientError> {
        let started = Instant::now();
        let mut opened = self.engine.open(id, ciphertext, list, now_ms());
        if let Err(Unread::Need(Need::List(user))) = &opened {
            let user = user.clone();
            let list = match self.verified_list(&user, true).await {
                Ok(_) => SenderList::Refetched,
                Err(e @ ClientError::Store(_)) => return Err(e),
                // A broker (ours, or the sender's behind it) that cannot answer now: kept
                // and read later, without holding up everyone else's envelopes behind it.
                Err(ClientError::Api(e)) if e.is_transient() => {
                    SenderList::Unavailable(ClientError::Api(e))
                }
                Err(e) => SenderList::Failed(e),
            };
            opened = self.engine.open(id, ciphertext, list, now_ms());
        }
        self.stats.open_decrypt += started.elapsed();
        match opened {
            Ok(opened) => Ok(Ok(opened.events)),
            Err(Unread::Failed(failure)) => Ok(Err(failure)),
            Err(Unread::Need(Need::BrokerKeys)) => self.open_link_request(ciphertext).await,
            Err(Unread::Need(Need::List(user))) => {
                Ok(Err(Failure::Rejected(EnvelopeError::SenderUnverified {
                    user: user.clone(),
                    error: Box::new(ClientError::ListNotVerified(user)),
                })))
            }
        }
    }

    /// A message from a device of our account that the signed list does not vouch for: only
    /// a link request with a valid proof is accepted, and then approved.
    async fn open_link_request(
        &mut self,
        ciphertext: &[u8],
    ) -> Result<Result<Vec<Event>, Failure>, ClientError> {
        let own = self.engine.user().to_owned();
        let broker = match self.api.devices(&own).await {
            Ok(devices) => devices,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(_) => Vec::new(),
        };
        let (device, keys) = match self.engine.open_link_request(ciphertext, &broker, now_ms()) {
            Ok(approved) => approved,
            Err(failure) => return Ok(Err(failure)),
        };
        // The request is decrypted (its session advanced), so a failure from here on cannot be
        // retried by redelivery: it is reported, and the user links again.
        Ok(match self.approve_link(device, keys).await {
            Ok(()) => Ok(vec![Event::DeviceLinked { device }]),
            Err(e) => Err(Failure::Rejected(EnvelopeError::LinkFailed(Box::new(e)))),
        })
    }
}
