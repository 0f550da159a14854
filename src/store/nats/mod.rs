//! The scale-out backend: every seam served by a NATS JetStream cluster, so that broker pods
//! keep no state of their own and any pod serves any user. NATS does membership, replication
//! (R3 streams and buckets), leader failover and routing; nothing here does any of that.
//!
//! ```text
//!  mailbox(user) on any pod ─▶ NatsUserInbox ─ its writer task ─▶ publish sp.in.<p>.<U>.<dev>
//!                                                                  (expected last subject seq)
//!  gateway ─▶ Directory ─▶ KV sealpost_directory (compare-and-set on the revision)
//!  federation peer ─▶ Outbox ─▶ sp.out.<D>.<pod> in SEALPOST_OUTBOX
//! ```
//!
//! Names are in [`subjects`]. How each promise of the seams is kept:
//!
//! - **Durable before acknowledged**: every write resolves on JetStream's acknowledgement,
//!   which the stream leader sends once a quorum of replicas has the write. NATS syncs its
//!   files every `sync_interval` (2 min by default), so durability against a crash rests on
//!   the quorum: an acknowledged write survives the loss of any one of three servers.
//! - **Per-device FIFO with gap-free numbers across pods**: two pods may each run a mailbox
//!   of the same user (a device of it connected to each). Every envelope is published with
//!   `Nats-Expected-Last-Subject-Sequence`: the stream refuses it unless the writer knew the
//!   queue's last message. The loser reloads the queue's end and numbers again. A per-user
//!   owner lease would also work, but needs fencing, a hand-over and its expiry tuned; the
//!   compare-and-set on the stream itself needs none of that and costs nothing when there
//!   is no contention (the common case: one user, one pod).
//! - **Idempotent by envelope id**: `Nats-Msg-Id` per copy, within the stream's duplicate
//!   window (`dedup_secs`); a duplicate answers the original copy's number.
//! - **Expiry**: `Nats-TTL` per envelope; the server deletes it. Nothing is ever due for
//!   the broker's sweep.
//! - **Nothing left after an ack**: acknowledged envelopes are deleted with the server's
//!   default erase (the message is overwritten, on every replica), not just unlinked.
//!
//! Limits, said plainly: per-device counts for the quota are what the writer saw at open
//! plus its own appends (another pod's appends to the same user count once this writer
//! reopens); a queue that drains by expiry alone (every envelope's TTL passed with no
//! ack) restarts its numbering from its last head marker.

mod blobs;
mod directory;
mod inbox;
pub mod live;
mod outbox;
pub mod subjects;
pub mod takeover;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use async_nats::{
    HeaderMap,
    jetstream::{self, kv, stream},
};
use futures_util::StreamExt;

pub use self::blobs::NatsBlobs;
use self::subjects::Names;
use super::{Health, Result, StoreError, StoreFuture, ready};

/// How to reach and lay out the JetStream store.
#[derive(Clone)]
pub struct NatsOptions {
    /// Server URLs, comma-separated (`nats://a:4222,nats://b:4222`).
    pub urls: String,
    /// Inbox streams (`SEALPOST_INBOX_0..`): each has one leader, so more spread the writes.
    pub partitions: u32,
    /// Replicas of every stream and bucket (3 in production; 1 only for a single server).
    pub replicas: usize,
    /// How long envelope ids are remembered for deduplication.
    pub dedup_window: Duration,
    /// The broker's secret, from which subject names are keyed (the same on every pod).
    pub secret: [u8; 32],
    /// This pod's name (its outbox subjects carry it).
    pub pod: String,
    /// How long one request to NATS may take.
    pub timeout: Duration,
}

/// The JetStream store. Clones share one connection.
#[derive(Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    directory: kv::Store,
    link_codes: kv::Store,
    /// Spent session tickets, shared by the pods.
    tickets: kv::Store,
    names: Names,
    pod: String,
    /// The federation outboxes this pod writes.
    outboxes: outbox::Outboxes,
    /// The last write failed (a publish refused or timed out); cleared by the next success.
    write_failed: AtomicBool,
    /// How long one request may take.
    timeout: Duration,
}

impl NatsStore {
    /// The attachment blobs on this cluster, with `replicas` replicas (their stream and bucket
    /// are created if missing).
    pub async fn blobs(&self, replicas: usize) -> Result<NatsBlobs> {
        NatsBlobs::open(self.inner.js.clone(), replicas).await
    }

    /// Connects and checks (creating what is missing) the streams and buckets. Fails with a
    /// message naming the stream or bucket whose configuration is not what this broker needs.
    pub async fn connect(options: &NatsOptions) -> Result<Self> {
        if !subjects::valid_token(&options.pod) {
            return Err(StoreError::Io(format!(
                "pod name {:?} is not usable in a NATS subject (letters, digits, - and _)",
                options.pod
            )));
        }
        let servers = options
            .urls
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Io(format!("bad NATS URL in {:?}: {e}", options.urls)))?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("sealpost {}", options.pod))
            .connection_timeout(options.timeout)
            .request_timeout(Some(options.timeout))
            .max_reconnects(None)
            .connect(servers)
            .await
            .map_err(|e| StoreError::Io(format!("cannot reach NATS at {}: {e}", options.urls)))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(options.timeout)
            .build(client.clone());
        // Several pods starting at once on a fresh cluster make its meta leader busy creating
        // R3 streams: a request may time out or find a stream half made. That is tried again
        // (for a minute); a stream with the wrong configuration is final.
        let mut patience = Patience::for_a_minute(options.timeout);
        let (directory, link_codes, tickets) = loop {
            match setup(&js, options).await {
                Ok(buckets) => break buckets,
                Err(e) if e.to_string().contains("wrong configuration") => return Err(e),
                Err(e) => patience.pause("setting up the NATS streams", e).await?,
            }
        };
        let store = NatsStore {
            inner: Arc::new(Inner {
                client,
                js,
                directory,
                link_codes,
                tickets,
                names: Names::new(&options.secret, options.partitions),
                pod: options.pod.clone(),
                outboxes: outbox::Outboxes::default(),
                write_failed: AtomicBool::new(false),
                timeout: options.timeout,
            }),
        };
        // Alive before it takes any traffic: no other pod may take its outboxes over. On a
        // fresh cluster the pod bucket's stream may not be known yet to the server this pod
        // talks to ("no stream found for given subject", seen in CI): tried again, as above.
        while let Err(e) = store.heartbeat().await {
            patience.pause("the first heartbeat", e).await?;
        }
        Ok(store)
    }
}

/// How long start-up keeps trying the steps a fresh cluster may not be ready for: a doubling
/// pause (up to 2 s) between tries, until one deadline for all of them.
struct Patience {
    deadline: tokio::time::Instant,
    wait: Duration,
}

impl Patience {
    /// Twelve request timeouts (a minute with the default).
    fn for_a_minute(timeout: Duration) -> Self {
        Patience {
            deadline: tokio::time::Instant::now() + timeout * 12,
            wait: Duration::from_millis(100),
        }
    }

    /// Waits before `step` is tried again after `error`, or gives the error back if the
    /// deadline would pass first.
    async fn pause(&mut self, step: &str, error: StoreError) -> Result<()> {
        if tokio::time::Instant::now() + self.wait >= self.deadline {
            return Err(error);
        }
        tracing::warn!(error = %error, step, "a start-up step failed; trying again");
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(Duration::from_secs(2));
        Ok(())
    }
}

/// Creates what is missing and checks what exists: the streams and buckets, each with a
/// leader. Answers the buckets the store uses.
async fn setup(
    js: &jetstream::Context,
    options: &NatsOptions,
) -> Result<(kv::Store, kv::Store, kv::Store)> {
    for p in 0..options.partitions.max(1) {
        ensure_stream(js, inbox_config(options, p)).await?;
    }
    ensure_stream(js, outbox_config(options)).await?;
    let directory = ensure_bucket(
        js,
        kv::Config {
            bucket: subjects::DIRECTORY_BUCKET.into(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        },
    )
    .await?;
    let link_codes = ensure_bucket(
        js,
        kv::Config {
            bucket: subjects::LINK_CODE_BUCKET.into(),
            history: 1,
            max_age: Duration::from_secs(3600),
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        },
    )
    .await?;
    let tickets = ensure_bucket(
        js,
        kv::Config {
            bucket: subjects::TICKET_BUCKET.into(),
            history: 1,
            max_age: Duration::from_secs(120),
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        },
    )
    .await?;
    ensure_bucket(
        js,
        kv::Config {
            bucket: subjects::POD_BUCKET.into(),
            history: 1,
            max_age: takeover::POD_TTL,
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        },
    )
    .await?;
    let mut names: Vec<String> = (0..options.partitions.max(1))
        .map(subjects::inbox_stream)
        .collect();
    names.push(subjects::OUTBOX_STREAM.into());
    names.push(format!("KV_{}", subjects::DIRECTORY_BUCKET));
    names.push(format!("KV_{}", subjects::LINK_CODE_BUCKET));
    names.push(format!("KV_{}", subjects::POD_BUCKET));
    names.push(format!("KV_{}", subjects::TICKET_BUCKET));
    wait_for_leaders(js, &names, options.timeout * 6).await?;
    Ok((directory, link_codes, tickets))
}

fn inbox_config(options: &NatsOptions, p: u32) -> stream::Config {
    stream::Config {
        name: subjects::inbox_stream(p),
        subjects: vec![subjects::inbox_subjects(p)],
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        duplicate_window: options.dedup_window,
        allow_direct: true,
        allow_message_ttl: true,
        ..Default::default()
    }
}

fn outbox_config(options: &NatsOptions) -> stream::Config {
    stream::Config {
        name: subjects::OUTBOX_STREAM.into(),
        subjects: vec![subjects::OUTBOX_SUBJECTS.into()],
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates `want` if missing; else checks that what exists keeps the promises this backend
/// relies on.
async fn ensure_stream(js: &jetstream::Context, want: stream::Config) -> Result<()> {
    let name = want.name.clone();
    let mut stream = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(want)
                .await
                .map_err(|e| StoreError::Io(format!("cannot create stream {name}: {e}")))?;
            return Ok(());
        }
        Err(e) => return Err(StoreError::Io(format!("cannot look up stream {name}: {e}"))),
    };
    let have = &stream
        .info()
        .await
        .map_err(|e| StoreError::Io(format!("stream {name}: {e}")))?
        .config;
    let wrong = |what: &str| {
        Err(StoreError::Io(format!(
            "stream {name} exists with the wrong configuration ({what}); fix or delete it"
        )))
    };
    if have.subjects != want.subjects {
        return wrong("subjects");
    }
    if have.storage != stream::StorageType::File {
        return wrong("storage must be file");
    }
    if have.num_replicas != want.num_replicas {
        return wrong("replicas");
    }
    if !have.allow_direct {
        return wrong("direct get must be allowed");
    }
    if want.allow_message_ttl && !have.allow_message_ttl {
        return wrong("per-message TTL must be allowed");
    }
    if have.duplicate_window < want.duplicate_window {
        return wrong("duplicate window shorter than dedup_secs");
    }
    if have.max_age != Duration::ZERO || have.max_messages_per_subject > 0 {
        return wrong("limits would delete unacknowledged envelopes");
    }
    Ok(())
}

/// Waits until every named stream has a leader (a stream just created, or a cluster just
/// restarted, takes a moment to elect one): until then writes would fail.
async fn wait_for_leaders(
    js: &jetstream::Context,
    names: &[String],
    patience: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    for name in names {
        loop {
            let led = match js.get_stream(name).await {
                Ok(mut stream) => stream.info().await.ok().is_some_and(|info| {
                    // A single server (no cluster) has no leader to elect.
                    info.cluster.as_ref().is_none_or(|c| c.leader.is_some())
                }),
                Err(_) => false,
            };
            if led {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Io(format!("stream {name} has no leader")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn ensure_bucket(js: &jetstream::Context, want: kv::Config) -> Result<kv::Store> {
    let name = want.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(store) => {
            let mut stream = js
                .get_stream(format!("KV_{name}"))
                .await
                .map_err(|e| StoreError::Io(format!("bucket {name}: {e}")))?;
            let info = stream
                .info()
                .await
                .map_err(|e| StoreError::Io(format!("bucket {name}: {e}")))?;
            if info.config.num_replicas != want.num_replicas
                || info.config.storage != stream::StorageType::File
                || info.config.max_age != want.max_age
            {
                return Err(StoreError::Io(format!(
                    "bucket {name} exists with the wrong configuration (replicas, storage or \
                     max age); fix or delete it"
                )));
            }
            Ok(store)
        }
        Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => js
            .create_key_value(want)
            .await
            .map_err(|e| StoreError::Io(format!("cannot create bucket {name}: {e}"))),
        Err(e) => Err(StoreError::Io(format!("cannot look up bucket {name}: {e}"))),
    }
}

impl Inner {
    fn failed<E: std::fmt::Display>(&self, what: &str, e: E) -> StoreError {
        self.write_failed.store(true, Relaxed);
        StoreError::Io(format!("{what}: {e}"))
    }

    fn succeeded(&self) {
        self.write_failed.store(false, Relaxed);
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Up to `max` messages of `subject` in stream `stream` from stream sequence `from` on,
    /// in order, in one batched direct get (one request, many answers).
    async fn batch(&self, stream: &str, subject: &str, from: u64, max: usize) -> Result<Batch> {
        // No responders (503): the stream is between leaders, or its replicas are catching
        // up after a restart; asked again for as long as one request may take.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut wait = Duration::from_millis(25);
        loop {
            match self.batch_once(stream, subject, from, max).await {
                Err(Unanswered) if tokio::time::Instant::now() + wait < deadline => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(Unanswered) => {
                    return Err(StoreError::Io(format!("stream {stream} does not answer")));
                }
                Ok(answer) => return answer,
            }
        }
    }

    /// One batched direct get; `Err(Unanswered)` if nobody answered it (503).
    async fn batch_once(
        &self,
        stream: &str,
        subject: &str,
        from: u64,
        max: usize,
    ) -> std::result::Result<Result<Batch>, Unanswered> {
        let inbox = self.client.new_inbox();
        let io = |e: String| Ok(Err(StoreError::Io(format!("direct get: {e}"))));
        let mut answers = match self.client.subscribe(inbox.clone()).await {
            Ok(answers) => answers,
            Err(e) => return io(e.to_string()),
        };
        let request = serde_json::json!({
            "seq": from.max(1),
            "next_by_subj": subject,
            "batch": max,
        });
        if let Err(e) = self
            .client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                inbox,
                serde_json::to_vec(&request)
                    .expect("a JSON object serializes")
                    .into(),
            )
            .await
        {
            return io(e.to_string());
        }
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let more = loop {
            let message = match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => return io("connection closed".into()),
                Err(_) => return io("timed out".into()),
            };
            if let Some(status) = message.status {
                // 204: end of the batch, saying how many more match (a server may end a
                // batch before `max`, e.g. by size); 404: nothing (more) on the subject.
                match status.as_u16() {
                    204 => {
                        let pending = message
                            .headers
                            .as_ref()
                            .and_then(|h| header_u64(h, "Nats-Num-Pending"))
                            .unwrap_or(0);
                        break pending > 0;
                    }
                    404 => break false,
                    503 => return Err(Unanswered),
                    code => {
                        return io(format!(
                            "answered {code} {}",
                            message.description.unwrap_or_default()
                        ));
                    }
                }
            }
            let headers = message.headers.unwrap_or_default();
            let Some(sequence) = header_u64(&headers, "Nats-Sequence") else {
                return Ok(Err(StoreError::Corruption(
                    "direct get answer without its sequence".into(),
                )));
            };
            out.push(Stored {
                sequence,
                headers,
                payload: message.payload,
            });
            if out.len() >= max {
                break true;
            }
        };
        Ok(Ok(Batch {
            messages: out,
            more,
        }))
    }
}

/// One batched direct get's answer.
struct Batch {
    messages: Vec<Stored>,
    /// Whether more messages of the subject follow the last one.
    more: bool,
}

/// A request nobody answered (no responders).
struct Unanswered;

/// Messages asked for per batched direct get.
const BATCH: usize = 256;

impl Inner {
    /// Visits the messages of `subject` in `stream` from stream sequence `from` on, in order,
    /// in batched direct gets, until `visit` answers false or the subject ends; answers the
    /// last stream sequence visited (`from - 1` if none): how far the answering replica had
    /// the subject.
    async fn scan(
        &self,
        stream: &str,
        subject: &str,
        from: u64,
        mut visit: impl FnMut(&Stored) -> Result<bool>,
    ) -> Result<u64> {
        let mut at = from.max(1);
        let mut reached = from.saturating_sub(1);
        loop {
            let Batch { messages, more } = self.batch(stream, subject, at, BATCH).await?;
            let done = !more || messages.is_empty();
            for m in messages {
                at = m.sequence + 1;
                reached = m.sequence;
                if !visit(&m)? {
                    return Ok(reached);
                }
            }
            if done {
                return Ok(reached);
            }
        }
    }

    /// The last message of `subject` in `stream`, from the stream's leader (a direct get may
    /// be answered by a replica that is behind): what the next write is checked against.
    async fn last_on_subject(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>> {
        let stream = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| StoreError::Io(format!("stream {stream}: {e}")))?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(StoreError::Io(format!("read: {e}"))),
        }
    }
}

/// A stored message, as read back.
struct Stored {
    sequence: u64,
    headers: HeaderMap,
    payload: bytes::Bytes,
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

impl Health for NatsStore {
    fn has_room(&self) -> bool {
        self.inner.connected()
    }

    fn flush_ok(&self) -> bool {
        !self.inner.write_failed.load(Relaxed)
    }

    fn check_room(&self) {}

    fn size_on_disk(&self) -> Result<u64> {
        // On the NATS servers, not here; their own metrics say it.
        Ok(0)
    }

    fn flush(&self) -> StoreFuture<()> {
        // Every write resolved only once the stream had it on a quorum.
        ready(Ok(()))
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
