//! [`Inbox`] on the streams `SEALPOST_INBOX_<p>`: one subject per device queue.
//!
//! A user's open queues ([`NatsUserInbox`]) have one writer task: appends, trims and drops go
//! to it through a channel, in call order, and it runs them one after the other, so its
//! answers resolve in call order. Copies of one envelope to several devices are published
//! together. Reads do not go through the task: they ask the stream directly (a batched
//! direct get from where the cursor is).
//!
//! ```text
//!  append ─┐                      ┌─▶ publish copy → dev 1  (Expected-Last-Subject-Sequence,
//!  trim   ─┼─▶ jobs (call order) ─┤                          Nats-Msg-Id, Nats-TTL)
//!  drop   ─┘   writer task        └─▶ publish copy → dev 2   … on "wrong last sequence":
//!                                                             reload the queue's end, renumber
//! ```

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_nats::jetstream::{context::PublishErrorKind, message::PublishMessage};
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::{Inner, NatsStore, Stored, header_u64, now_ms, subjects};
use crate::store::{
    AppendError, Appended, Due, EnvelopeRecord, Inbox, NewEnvelope, QueueLimits, Result,
    StoreError, StoreFuture, Trim, UserInbox, records::RECORD_VERSION,
};

/// The longest TTL given to the stream (a year; envelopes live days).
const MAX_TTL_SECS: u64 = 366 * 24 * 3600;
/// Envelope ids this writer remembers answering (a retry is answered without a publish).
const RECENT_IDS: usize = 4096;

/// An envelope known to be stored.
struct Known {
    /// Its stream sequence.
    sequence: u64,
    /// Its ciphertext bytes.
    bytes: u64,
    /// When the stream expires it.
    expires_ms: u64,
}

impl Known {
    fn of(m: &Stored) -> Self {
        Known {
            sequence: m.sequence,
            bytes: m.payload.len() as u64,
            expires_ms: header_u64(&m.headers, subjects::EXPIRES).unwrap_or(u64::MAX),
        }
    }
}

/// What the writer knows of one device queue.
#[derive(Default)]
struct Queue {
    /// The number the next envelope gets.
    next_seq: u64,
    /// Stream sequence of the subject's last message (0: none): what the next publish expects.
    last: u64,
    /// Stream sequence of the head marker, if the subject holds one.
    marker: Option<u64>,
    /// seq → (stream sequence, ciphertext bytes) of the envelopes known to be stored.
    index: BTreeMap<u64, Known>,
    /// Envelopes appended but not yet acknowledged by the stream: (count, bytes).
    reserved: (u64, u64),
    /// Seqs this writer deleted lately: a replica that has not applied the deletion yet
    /// must not hand them out again.
    trimmed: std::collections::BTreeSet<u64>,
}

impl Queue {
    fn fresh() -> Self {
        Queue {
            next_seq: 1,
            ..Default::default()
        }
    }

    fn held(&self) -> (u64, u64) {
        let now = now_ms();
        let live = || self.index.values().filter(|k| k.expires_ms > now);
        let bytes: u64 = live().map(|k| k.bytes).sum();
        (
            live().count() as u64 + self.reserved.0,
            bytes + self.reserved.1,
        )
    }
}

#[derive(Default)]
struct Queues {
    devices: BTreeMap<u32, Queue>,
    /// Recently appended ids and where they went, oldest first.
    recent: HashMap<[u8; 16], Vec<(u32, u64)>>,
    recent_order: VecDeque<[u8; 16]>,
}

impl Queues {
    fn ends(&self) -> Vec<(u32, u64)> {
        self.devices.iter().map(|(d, q)| (*d, q.next_seq)).collect()
    }

    fn remember(&mut self, id: [u8; 16], stored: Vec<(u32, u64)>) {
        if self.recent.insert(id, stored).is_none() {
            self.recent_order.push_back(id);
        }
        while self.recent_order.len() > RECENT_IDS {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }
}

/// Shared between the handle and its writer task.
struct Shared {
    inner: Arc<Inner>,
    /// The user's name in NATS.
    user: String,
    queues: Mutex<Queues>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        // Bookkeeping only; a panic elsewhere cannot leave it half-updated.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subject(&self, device: u32) -> String {
        self.inner.names.queue(&self.user, device)
    }

    fn stream(&self) -> String {
        subjects::inbox_stream(self.inner.names.partition(&self.user))
    }

    /// Reads a whole device queue from the stream: its envelopes, its head, its end.
    async fn load(&self, device: u32) -> Result<Queue> {
        let (end, _) = self.reload_end(device).await?;
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        loop {
            let queue = self.load_once(device).await?;
            // A replica behind the leader answered: read again until it has caught up.
            if queue.last >= end {
                return Ok(queue);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Io(
                    "inbox load: no replica has caught up with the stream's leader".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn load_once(&self, device: u32) -> Result<Queue> {
        let mut queue = Queue::fresh();
        let (stream, subject) = (self.stream(), self.subject(device));
        self.inner
            .scan(&stream, &subject, 1, |m| {
                queue.last = m.sequence;
                if let Some(head) = header_u64(&m.headers, subjects::HEAD) {
                    queue.marker = Some(m.sequence);
                    queue.next_seq = queue.next_seq.max(head);
                } else if let Some(seq) = header_u64(&m.headers, subjects::SEQ) {
                    queue.index.insert(seq, Known::of(m));
                    queue.next_seq = queue.next_seq.max(seq + 1);
                }
                Ok(true)
            })
            .await?;
        Ok(queue)
    }

    /// The end of a device queue as the stream has it now (after another writer's append):
    /// (last stream sequence, next seq).
    async fn reload_end(&self, device: u32) -> Result<(u64, u64)> {
        let last = self
            .inner
            .last_on_subject(&self.stream(), &self.subject(device))
            .await?;
        let Some(m) = last else {
            return Ok((0, 1));
        };
        let next = header_u64(&m.headers, subjects::HEAD)
            .or_else(|| header_u64(&m.headers, subjects::SEQ).map(|s| s + 1))
            .ok_or_else(|| StoreError::Corruption("queue message without seq".into()))?;
        Ok((m.sequence, next))
    }

    /// The seq a stored copy got, from the message at stream sequence `sequence`.
    async fn seq_at(&self, sequence: u64) -> Result<u64> {
        let stream = self
            .inner
            .js
            .get_stream_no_info(self.stream())
            .await
            .map_err(|e| StoreError::Io(format!("inbox stream: {e}")))?;
        let m = stream
            .direct_get(sequence)
            .await
            .map_err(|e| StoreError::Io(format!("inbox read: {e}")))?;
        header_u64(&m.headers, subjects::SEQ)
            .ok_or_else(|| StoreError::Corruption("queue message without seq".into()))
    }

    /// Publishes one copy, renumbering it if another writer appended first. Answers its seq
    /// and whether it was a duplicate.
    async fn publish_copy(
        &self,
        envelope: &Owned,
        device: u32,
        ciphertext: &[u8],
    ) -> Result<(u64, bool)> {
        let subject = self.subject(device);
        // Clamped: the server takes a TTL in seconds as a duration, and one that overflows
        // it would expire at once.
        let ttl = envelope
            .expires_ms
            .saturating_sub(now_ms())
            .div_ceil(1000)
            .clamp(1, MAX_TTL_SECS);
        let mut contended = 0u32;
        // Renumbered for as long as one request may take: writers of one queue on several
        // pods (senders on several pods to one recipient) take turns.
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        while tokio::time::Instant::now() < deadline {
            if contended > 1 {
                // Still losing: back off a little, randomly, so that the writers spread out.
                let most = 2u64 << contended.min(6);
                let jitter = rand::random::<u64>() % most;
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let (seq, expect) = {
                let mut queues = self.lock();
                let q = queues
                    .devices
                    .get_mut(&device)
                    .ok_or(StoreError::NotFound)?;
                (q.next_seq, q.last)
            };
            let message = PublishMessage::build()
                .payload(bytes::Bytes::copy_from_slice(ciphertext))
                .message_id(subjects::msg_id(&envelope.id, device))
                .expected_last_subject_sequence(expect)
                .ttl(Duration::from_secs(ttl))
                .header(subjects::SEQ, seq.to_string().as_str())
                .header(subjects::ID, subjects::hex(&envelope.id).as_str())
                .header(subjects::CLASS, envelope.class.to_string().as_str())
                .header(
                    subjects::ACCEPTED,
                    envelope.accepted_ms.to_string().as_str(),
                )
                .header(subjects::EXPIRES, envelope.expires_ms.to_string().as_str());
            let started = std::time::Instant::now();
            let acked = match self.inner.js.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await,
                Err(e) => return Err(self.inner.failed("inbox publish", e)),
            };
            metrics::histogram!("sealpost_nats_publish_seconds").record(started.elapsed());
            match acked {
                Ok(ack) if ack.duplicate => {
                    // Stored before (a retry after a failure, or by another pod): its seq.
                    return Ok((self.seq_at(ack.sequence).await?, true));
                }
                Ok(ack) => {
                    self.inner.succeeded();
                    let mut queues = self.lock();
                    if let Some(q) = queues.devices.get_mut(&device) {
                        q.index.insert(
                            seq,
                            Known {
                                sequence: ack.sequence,
                                bytes: ciphertext.len() as u64,
                                expires_ms: envelope.expires_ms,
                            },
                        );
                        q.last = ack.sequence;
                        q.next_seq = seq + 1;
                    }
                    return Ok((seq, false));
                }
                Err(e) if wrong_last(&e) => {
                    // Another pod appended to this queue: take up its numbering.
                    contended += 1;
                    let (last, next) = self.reload_end(device).await?;
                    let mut queues = self.lock();
                    if let Some(q) = queues.devices.get_mut(&device) {
                        q.last = last;
                        q.next_seq = q.next_seq.max(next);
                        q.marker = None;
                    }
                }
                Err(e) => return Err(self.inner.failed("inbox publish", e)),
            }
        }
        Err(StoreError::Io(
            "inbox append kept conflicting with another writer".into(),
        ))
    }

    async fn append(&self, envelope: Owned) -> Result<Appended> {
        let results = join_all(
            envelope
                .copies
                .iter()
                .map(|(device, ciphertext)| self.publish_copy(&envelope, *device, ciphertext)),
        )
        .await;
        let mut queues = self.lock();
        for (device, ciphertext) in &envelope.copies {
            if let Some(q) = queues.devices.get_mut(device) {
                q.reserved.0 = q.reserved.0.saturating_sub(1);
                q.reserved.1 = q.reserved.1.saturating_sub(ciphertext.len() as u64);
            }
        }
        let mut stored = Vec::with_capacity(results.len());
        let mut duplicate = true;
        for ((device, _), result) in envelope.copies.iter().zip(results) {
            let (seq, dup) = result?;
            duplicate &= dup;
            stored.push((*device, seq));
        }
        queues.remember(envelope.id, stored.clone());
        Ok(Appended {
            duplicate,
            stored,
            durable: queues.ends(),
        })
    }

    /// Deletes acknowledged envelopes. A queue left empty first gets a head marker, so that
    /// its numbering survives the deletion of its last envelope.
    /// Deletes acknowledged envelopes: `known` are the stream sequences of those this writer
    /// had indexed (already taken out of its index and counts), `unknown` the seqs of the
    /// others (appended by another pod), looked up here.
    async fn trim(
        &self,
        device: u32,
        known: Vec<u64>,
        unknown: Vec<u64>,
        max_seq: u64,
    ) -> Result<()> {
        let mut delete = known;
        delete.extend(self.locate(device, &unknown).await?);
        let (drains, last, next, old_marker) = {
            let queues = self.lock();
            let Some(q) = queues.devices.get(&device) else {
                return Ok(());
            };
            // The subject's last message must never go: the stream checks the next append
            // against it (`Nats-Expected-Last-Subject-Sequence`), and with it gone a writer
            // that had not seen it could append again under its seq. So whenever the last
            // message is deleted (the queue drains, or acks come out of order, or an append of
            // this writer is in flight), a head marker takes its place first.
            let replaces_last = delete.contains(&q.last);
            (replaces_last, q.last, q.next_seq.max(max_seq + 1), q.marker)
        };
        let mut superseded = None;
        if drains {
            let marker = PublishMessage::build()
                .expected_last_subject_sequence(last)
                .header(subjects::HEAD, next.to_string().as_str());
            let acked = match self
                .inner
                .js
                .send_publish(self.subject(device), marker)
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => return Err(self.inner.failed("inbox head", e)),
            };
            match acked {
                Ok(ack) => {
                    let mut queues = self.lock();
                    if let Some(q) = queues.devices.get_mut(&device) {
                        q.marker = Some(ack.sequence);
                        q.last = ack.sequence;
                    }
                    superseded = old_marker;
                }
                // Another writer appended meanwhile: the queue does not drain, no marker.
                Err(e) if wrong_last(&e) => {}
                Err(e) => return Err(self.inner.failed("inbox head", e)),
            }
        }
        let stream = self.stream();
        // Envelopes are erased (overwritten on every replica: nothing of them left after the
        // ack); a superseded head marker holds nothing but a number, and is only unlinked.
        let results = join_all(
            delete
                .iter()
                .map(|s| delete_message(&self.inner, &stream, *s, true))
                .chain(superseded.map(|s| delete_message(&self.inner, &stream, s, false))),
        )
        .await;
        for r in results {
            r?;
        }
        self.inner.succeeded();
        Ok(())
    }

    /// The stream sequences of envelopes `seqs` (appended by another pod, so not in this
    /// writer's index), read from the stream.
    async fn locate(&self, device: u32, seqs: &[u64]) -> Result<Vec<u64>> {
        let Some(&low) = seqs.iter().min() else {
            return Ok(Vec::new());
        };
        let (subject, stream) = (self.subject(device), self.stream());
        let start = self.start_below(device, low);
        let mut found = Vec::new();
        self.inner
            .scan(&stream, &subject, start, |m| {
                let seq = header_u64(&m.headers, subjects::SEQ);
                if seq.is_some_and(|seq| seqs.contains(&seq)) {
                    found.push(m.sequence);
                }
                // What another writer appended moves this one's end too: a head marker must
                // not number below it.
                if let Some(q) = self.lock().devices.get_mut(&device) {
                    q.last = q.last.max(m.sequence);
                    if let Some(seq) = seq {
                        q.next_seq = q.next_seq.max(seq + 1);
                    }
                }
                Ok(found.len() < seqs.len())
            })
            .await?;
        Ok(found)
    }

    /// Where to start reading a device queue for seqs from `from` on: after the last
    /// envelope below `from` this writer knows of (what lies after it, its own appends and
    /// another pod's, is on the subject in order), or at the start.
    fn start_below(&self, device: u32, from: u64) -> u64 {
        self.lock()
            .devices
            .get(&device)
            .and_then(|q| {
                q.index
                    .range(..from)
                    .next_back()
                    .map(|(_, k)| k.sequence + 1)
            })
            .unwrap_or(1)
    }

    async fn drop_queue(&self, device: u32) -> Result<()> {
        let stream = self
            .inner
            .js
            .get_stream_no_info(self.stream())
            .await
            .map_err(|e| StoreError::Io(format!("inbox stream: {e}")))?;
        stream
            .purge()
            .filter(self.subject(device))
            .await
            .map_err(|e| self.inner.failed("inbox purge", e))?;
        self.lock().devices.remove(&device);
        Ok(())
    }

    /// Up to `limit` envelopes of a device queue from `from` on. Direct gets are answered
    /// by any replica, and one may be behind the quorum that acknowledged a write (or, just
    /// restarted, far behind): a short answer is checked against the queue's last message as
    /// the stream's leader has it, and asked again until a replica has caught up. Envelopes
    /// this writer deleted are never answered, even by a replica that has not deleted them
    /// yet.
    async fn read(
        &self,
        device: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, EnvelopeRecord)>> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let mut wait = Duration::from_millis(5);
        loop {
            let (read, reached) = self.read_once(device, from, limit).await?;
            if read.len() >= limit || reached >= self.reload_end(device).await?.0 {
                return Ok(read);
            }
            // Never a partial answer: the caller would take the gap for the queue's end.
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Io(
                    "inbox read: no replica has caught up with the stream's leader".into(),
                ));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// One pass of [`Shared::read`]: the envelopes, and the last stream sequence the
    /// answering replica had on the subject.
    async fn read_once(
        &self,
        device: u32,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, EnvelopeRecord)>, u64)> {
        let (subject, stream) = (self.subject(device), self.stream());
        let start = self.start_below(device, from);
        let mut out = Vec::new();
        let reached = self
            .inner
            .scan(&stream, &subject, start, |m| {
                // Trimmed ones are skipped before counting: a full answer must not look short.
                if let Some(record) = envelope(m)?
                    && record.0 >= from
                    && !self
                        .lock()
                        .devices
                        .get(&device)
                        .is_some_and(|q| q.trimmed.contains(&record.0))
                {
                    out.push(record);
                }
                Ok(out.len() < limit)
            })
            .await?;
        Ok((out, reached))
    }
}

/// Whether a publish was refused because the subject's last message is not the expected one
/// (another writer was first). The server says so with error code 10071 or, in a constant
/// form, 10164; the client names only the first.
fn wrong_last(e: &async_nats::jetstream::context::PublishError) -> bool {
    e.kind() == PublishErrorKind::WrongLastSequence || e.to_string().contains("wrong last sequence")
}

/// Deletes one stored message, erasing it (overwritten on every replica) if `erase`; one
/// already gone is fine.
pub(super) async fn delete_message(
    inner: &Inner,
    stream: &str,
    sequence: u64,
    erase: bool,
) -> Result<()> {
    let request = serde_json::json!({ "seq": sequence, "no_erase": !erase });
    let answer: async_nats::jetstream::response::Response<serde_json::Value> = inner
        .js
        .request(format!("STREAM.MSG.DELETE.{stream}"), &request)
        .await
        .map_err(|e| inner.failed("inbox delete", e))?;
    match answer {
        async_nats::jetstream::response::Response::Ok(_) => Ok(()),
        // No message at that sequence (expired, or deleted by a retry).
        async_nats::jetstream::response::Response::Err { error }
            if error.error_code() == async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND
                || error.error_code()
                    == async_nats::jetstream::ErrorCode::STREAM_MESSAGE_DELETE_FAILED =>
        {
            Ok(())
        }
        async_nats::jetstream::response::Response::Err { error } => {
            Err(inner.failed("inbox delete", error))
        }
    }
}

/// A stored envelope as (seq, record); `None` for a head marker.
fn envelope(m: &Stored) -> Result<Option<(u64, EnvelopeRecord)>> {
    if m.headers.get(subjects::HEAD).is_some() {
        return Ok(None);
    }
    let corrupt = || StoreError::Corruption("queue message without its headers".into());
    let seq = header_u64(&m.headers, subjects::SEQ).ok_or_else(corrupt)?;
    let id = m
        .headers
        .get(subjects::ID)
        .and_then(|v| subjects::unhex::<16>(v.as_str()))
        .ok_or_else(corrupt)?;
    let class = header_u64(&m.headers, subjects::CLASS)
        .and_then(|c| u8::try_from(c).ok())
        .ok_or_else(corrupt)?;
    Ok(Some((
        seq,
        EnvelopeRecord {
            version: RECORD_VERSION,
            id,
            class,
            accepted_ms: header_u64(&m.headers, subjects::ACCEPTED).ok_or_else(corrupt)?,
            expires_ms: header_u64(&m.headers, subjects::EXPIRES).ok_or_else(corrupt)?,
            ciphertext: m.payload.to_vec(),
        },
    )))
}

/// An envelope as the writer task holds it.
struct Owned {
    id: [u8; 16],
    class: u8,
    accepted_ms: u64,
    expires_ms: u64,
    copies: Vec<(u32, Vec<u8>)>,
}

enum Job {
    Append(Owned, oneshot::Sender<Result<Appended>>),
    Trim(u32, Vec<u64>, Vec<u64>, u64, oneshot::Sender<Result<()>>),
    Drop(u32, oneshot::Sender<Result<()>>),
}

/// The writer task of one user's queues: runs jobs in the order they were given.
async fn writer(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Append(envelope, reply) => {
                let _ = reply.send(shared.append(envelope).await);
            }
            Job::Trim(device, known, unknown, max_seq, reply) => {
                let _ = reply.send(shared.trim(device, known, unknown, max_seq).await);
            }
            Job::Drop(device, reply) => {
                let _ = reply.send(shared.drop_queue(device).await);
            }
        }
    }
}

fn answer<T: Send + 'static>(rx: oneshot::Receiver<Result<T>>) -> StoreFuture<T> {
    Box::pin(async move {
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Io("inbox writer stopped".into())))
    })
}

/// One user's device queues in JetStream.
pub(super) struct NatsUserInbox {
    shared: Arc<Shared>,
    limits: QueueLimits,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Inbox for NatsStore {
    fn open(
        &self,
        user: &str,
        devices: &[u32],
        limits: QueueLimits,
    ) -> StoreFuture<Box<dyn UserInbox>> {
        let shared = Arc::new(Shared {
            inner: self.inner.clone(),
            user: self.inner.names.hashed(user),
            queues: Mutex::new(Queues::default()),
        });
        let devices = devices.to_vec();
        Box::pin(async move {
            let loaded = join_all(devices.iter().map(|d| shared.load(*d))).await;
            {
                let mut queues = shared.lock();
                for (device, queue) in devices.iter().zip(loaded) {
                    queues.devices.insert(*device, queue?);
                }
            }
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(writer(shared.clone(), rx));
            Ok(Box::new(NatsUserInbox {
                shared,
                limits,
                jobs: tx,
            }) as Box<dyn UserInbox>)
        })
    }

    fn due(&self, _now_ms: u64, _limit: usize) -> StoreFuture<Vec<Due>> {
        // The streams expire envelopes by their TTL.
        super::ready(Ok(Vec::new()))
    }
}

impl UserInbox for NatsUserInbox {
    fn ends(&self) -> Vec<(u32, u64)> {
        self.shared.lock().ends()
    }

    fn add_queue(&mut self, device: u32) -> u64 {
        // A new device's subject is empty: device ids are never reused.
        self.shared
            .lock()
            .devices
            .entry(device)
            .or_insert_with(Queue::fresh)
            .next_seq
    }

    fn duplicate(&mut self, id: &[u8; 16]) -> Result<Option<StoreFuture<Appended>>> {
        let queues = self.shared.lock();
        Ok(queues.recent.get(id).map(|stored| {
            super::ready(Ok(Appended {
                duplicate: true,
                stored: stored.clone(),
                durable: queues.ends(),
            }))
        }))
    }

    fn append(&mut self, envelope: NewEnvelope<'_>) -> Result<StoreFuture<Appended>, AppendError> {
        if let Some(original) = self.duplicate(&envelope.id)? {
            return Ok(original);
        }
        if !self.shared.inner.connected() {
            return Err(AppendError::Store(StoreError::Io(
                "not connected to NATS".into(),
            )));
        }
        {
            let mut queues = self.shared.lock();
            let mut full = Vec::new();
            for &(device, ciphertext) in &envelope.copies {
                let q = queues.devices.get(&device).ok_or(StoreError::NotFound)?;
                let (count, bytes) = q.held();
                if count >= self.limits.count || bytes + ciphertext.len() as u64 > self.limits.bytes
                {
                    full.push(device);
                }
            }
            if !full.is_empty() {
                return Err(AppendError::Full(full));
            }
            for &(device, ciphertext) in &envelope.copies {
                if let Some(q) = queues.devices.get_mut(&device) {
                    q.reserved.0 += 1;
                    q.reserved.1 += ciphertext.len() as u64;
                }
            }
        }
        let owned = Owned {
            id: envelope.id,
            class: envelope.class,
            accepted_ms: envelope.accepted_ms,
            expires_ms: envelope.expires_ms,
            copies: envelope
                .copies
                .iter()
                .map(|(d, c)| (*d, c.to_vec()))
                .collect(),
        };
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Append(owned, tx))
            .map_err(|_| StoreError::Io("inbox writer stopped".into()))?;
        Ok(answer(rx))
    }

    fn read(
        &self,
        device: u32,
        from: u64,
        limit: usize,
    ) -> StoreFuture<Vec<(u64, EnvelopeRecord)>> {
        let shared = self.shared.clone();
        Box::pin(async move { shared.read(device, from, limit).await })
    }

    fn trim(&mut self, device: u32, acked: &[Trim]) -> Result<StoreFuture<()>> {
        // Out of the counts and reads at once (as sled's trim is): an acknowledged envelope
        // is not handed out again by this writer, even before its deletion is durable.
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        {
            let mut queues = self.shared.lock();
            if let Some(q) = queues.devices.get_mut(&device) {
                for t in acked {
                    match q.index.remove(&t.seq) {
                        Some(k) => known.push(k.sequence),
                        None => unknown.push(t.seq),
                    }
                    q.trimmed.insert(t.seq);
                }
                while q.trimmed.len() > RECENT_IDS {
                    q.trimmed.pop_first();
                }
            }
        }
        let max_seq = acked.iter().map(|t| t.seq).max().unwrap_or(0);
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Trim(device, known, unknown, max_seq, tx))
            .map_err(|_| StoreError::Io("inbox writer stopped".into()))?;
        Ok(answer(rx))
    }

    fn drop_queue(&mut self, device: u32) -> Result<StoreFuture<()>> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Drop(device, tx))
            .map_err(|_| StoreError::Io("inbox writer stopped".into()))?;
        Ok(answer(rx))
    }

    fn expire(&mut self, _due: Vec<Due>) -> Result<Vec<(u32, u64)>> {
        Ok(Vec::new())
    }

    fn end(&self, device: u32) -> StoreFuture<u64> {
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.reload_end(device).await?.1) })
    }
}
