//! [`Outbox`] on the stream `SEALPOST_OUTBOX`: one subject per (destination domain, pod), so
//! that each domain's outbox has the one writer the seam promises (that pod's peer actor).
//! A domain's puts and removes go through one writer task in call order: when a put
//! resolves, every earlier put to that outbox has been acknowledged by the stream.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use async_nats::jetstream::message::PublishMessage;
use tokio::sync::{mpsc, oneshot};

use super::{Inner, NatsStore, header_u64, subjects};
use crate::store::{
    Outbox, OutboxEntry, OutboxRecord, Result, StoreError, StoreFuture,
    records::{self},
};

/// One domain's outbox as this pod knows it.
struct DomainOutbox {
    /// seq → stream sequence.
    index: Arc<Mutex<BTreeMap<u64, u64>>>,
    jobs: mpsc::UnboundedSender<Job>,
}

enum Job {
    Put(u64, Vec<u8>, oneshot::Sender<Result<()>>),
    Remove(Vec<u64>, oneshot::Sender<Result<()>>),
    Durable(oneshot::Sender<Result<()>>),
}

/// The outboxes this pod writes, by hashed domain.
#[derive(Default)]
pub(super) struct Outboxes {
    domains: Mutex<HashMap<String, DomainOutbox>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Bookkeeping only; a panic elsewhere cannot leave it half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NatsStore {
    fn outbox_subject(&self, domain: &str) -> (String, String) {
        let d = self.inner.names.hashed(domain);
        let subject = subjects::Names::outbox(&d, &self.inner.pod);
        (d, subject)
    }

    /// The writer of `domain`'s outbox (started on first use).
    fn domain(&self, domain: &str) -> (Arc<Mutex<BTreeMap<u64, u64>>>, mpsc::UnboundedSender<Job>) {
        let (d, subject) = self.outbox_subject(domain);
        let mut domains = lock(&self.inner.outboxes.domains);
        let entry = domains.entry(d).or_insert_with(|| {
            let index = Arc::new(Mutex::new(BTreeMap::new()));
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(writer(self.inner.clone(), subject, index.clone(), rx));
            DomainOutbox { index, jobs: tx }
        });
        (entry.index.clone(), entry.jobs.clone())
    }

    fn job<T: Send + 'static>(
        &self,
        domain: &str,
        job: impl FnOnce(oneshot::Sender<Result<T>>) -> Job,
    ) -> Result<StoreFuture<T>> {
        let (_, jobs) = self.domain(domain);
        let (tx, rx) = oneshot::channel();
        jobs.send(job(tx))
            .map_err(|_| StoreError::Io("outbox writer stopped".into()))?;
        Ok(Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Io("outbox writer stopped".into())))
        }))
    }
}

async fn writer(
    inner: Arc<Inner>,
    subject: String,
    index: Arc<Mutex<BTreeMap<u64, u64>>>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Put(seq, record, reply) => {
                let message = PublishMessage::build()
                    .payload(record.into())
                    .message_id(format!("{}.{seq}", subject.replace('.', "-")))
                    .header(subjects::SEQ, seq.to_string().as_str());
                let acked = match inner.js.send_publish(subject.clone(), message).await {
                    Ok(ack) => ack.await.map_err(|e| inner.failed("outbox publish", e)),
                    Err(e) => Err(inner.failed("outbox publish", e)),
                };
                let _ = reply.send(acked.map(|ack| {
                    inner.succeeded();
                    lock(&index).insert(seq, ack.sequence);
                }));
            }
            Job::Remove(seqs, reply) => {
                let sequences: Vec<u64> = {
                    let index = lock(&index);
                    seqs.iter().filter_map(|s| index.get(s).copied()).collect()
                };
                let mut result = Ok(());
                for s in sequences {
                    if let Err(e) =
                        super::inbox::delete_message(&inner, subjects::OUTBOX_STREAM, s, true).await
                    {
                        result = Err(e);
                        break;
                    }
                }
                if result.is_ok() {
                    let mut index = lock(&index);
                    for s in &seqs {
                        index.remove(s);
                    }
                }
                let _ = reply.send(result);
            }
            Job::Durable(reply) => {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

/// Every entry of an outbox subject as one replica has them: (seq, stream sequence, record),
/// and the last stream sequence it had.
async fn index_once(inner: &Inner, subject: &str) -> Result<(Vec<(u64, u64, OutboxRecord)>, u64)> {
    let mut entries = Vec::new();
    let reached = inner
        .scan(subjects::OUTBOX_STREAM, subject, 1, |m| {
            entries.push((seq_of(m)?, m.sequence, records::decode(&m.payload)?));
            Ok(true)
        })
        .await?;
    Ok((entries, reached))
}

/// Up to `limit` entries with `seq >= from` of an outbox subject, from stream sequence
/// `start` on, as one replica has them.
async fn read_subject(
    inner: &Inner,
    subject: &str,
    start: u64,
    from: u64,
    limit: usize,
) -> Result<Vec<(u64, OutboxRecord)>> {
    let mut out = Vec::new();
    inner
        .scan(subjects::OUTBOX_STREAM, subject, start, |m| {
            let seq = seq_of(m)?;
            if seq >= from {
                out.push((seq, records::decode(&m.payload)?));
            }
            Ok(out.len() < limit)
        })
        .await?;
    Ok(out)
}

fn seq_of(m: &super::Stored) -> Result<u64> {
    header_u64(&m.headers, subjects::SEQ)
        .ok_or_else(|| StoreError::Corruption("outbox message without seq".into()))
}

impl Outbox for NatsStore {
    fn index(&self, domain: &str) -> StoreFuture<Vec<OutboxEntry>> {
        let (_, subject) = self.outbox_subject(domain);
        let (index, _) = self.domain(domain);
        let inner = self.inner.clone();
        Box::pin(async move {
            // Read until a replica has reached the subject's last message as the leader has
            // it: a stale answer would make the peer number new entries over old ones.
            let end = inner
                .last_on_subject(subjects::OUTBOX_STREAM, &subject)
                .await?
                .map_or(0, |m| m.sequence);
            let deadline = tokio::time::Instant::now() + inner.timeout;
            loop {
                let (entries, reached) = index_once(&inner, &subject).await?;
                if reached >= end || tokio::time::Instant::now() >= deadline {
                    if reached < end {
                        return Err(StoreError::Io(
                            "outbox: no replica has caught up with its leader".into(),
                        ));
                    }
                    let mut known = lock(&index);
                    let mut out = Vec::with_capacity(entries.len());
                    for (seq, sequence, record) in entries {
                        known.insert(seq, sequence);
                        out.push(OutboxEntry {
                            seq,
                            accepted_ms: record.accepted_ms,
                            bytes: record.size(),
                        });
                    }
                    out.sort_by_key(|e| e.seq);
                    return Ok(out);
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    }

    fn put(&self, domain: &str, seq: u64, record: &OutboxRecord) -> Result<StoreFuture<()>> {
        if !self.inner.connected() {
            return Err(StoreError::Io("not connected to NATS".into()));
        }
        let bytes = records::encode(record);
        self.job(domain, |tx| Job::Put(seq, bytes, tx))
    }

    fn durable(&self, domain: &str) -> StoreFuture<()> {
        self.job(domain, Job::Durable)
            .unwrap_or_else(|e| super::ready(Err(e)))
    }

    fn read(&self, domain: &str, from: u64, limit: usize) -> StoreFuture<Vec<(u64, OutboxRecord)>> {
        let (_, subject) = self.outbox_subject(domain);
        let (index, _) = self.domain(domain);
        let inner = self.inner.clone();
        Box::pin(async move {
            // This pod is the outbox's only writer: its index says exactly what is stored.
            // Direct gets are answered by any replica, and one may be behind (not have an
            // entry just put, still have one just removed): the answer is taken only when
            // it agrees with the index, asked again for a moment otherwise.
            let deadline = tokio::time::Instant::now() + inner.timeout;
            loop {
                let (start, want): (u64, Vec<u64>) = {
                    let index = lock(&index);
                    let start = index.range(..from).next_back().map_or(1, |(_, s)| s + 1);
                    (
                        start,
                        index
                            .range(from..)
                            .take(limit)
                            .map(|(seq, _)| *seq)
                            .collect(),
                    )
                };
                let read = read_subject(&inner, &subject, start, from, limit).await?;
                let mut out: Vec<(u64, OutboxRecord)> = read
                    .into_iter()
                    .filter(|(seq, _)| want.contains(seq))
                    .collect();
                out.sort_by_key(|(seq, _)| *seq);
                if out.len() == want.len() {
                    return Ok(out);
                }
                // Never a partial answer: the peer would take the gap for entries gone.
                if tokio::time::Instant::now() >= deadline {
                    return Err(StoreError::Io(
                        "outbox read: no replica has caught up with the stream's leader".into(),
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    }

    fn remove(&self, domain: &str, seqs: &[u64]) -> Result<StoreFuture<()>> {
        let seqs = seqs.to_vec();
        self.job(domain, |tx| Job::Remove(seqs, tx))
    }
}
