//! NATS JetStream, for issue 11's comparison: the [`Server`] behind
//! `sealpost-loadtest nats <e2e|appends|idle>`.
//!
//! - One stream `DM` over the subjects `dm.<user>`, file storage, work-queue retention (a
//!   message is removed once acknowledged, as a Sealpost envelope is), replicas 1; with the
//!   server's default sync (`sync_interval` 2 min): no fsync per message.
//! - A user is a durable pull consumer on its own subject (`filter_subject: dm.<user>`,
//!   explicit acks), created up front like an account, so messages to an offline user wait
//!   in the stream. The stream allows 1,000,000 consumers (nats-server 2.15's default is
//!   1,000 per stream).
//! - Pull, not push: a pull consumer's `messages()` stream keeps a pull request outstanding
//!   and the server sends what arrives at once (the latency of push), but with flow control
//!   the client asks for (at most 200 messages in flight per request), idle heartbeats (every
//!   15 s, the client's default) and no delivery subject per user to manage; it is what the
//!   NATS documentation recommends for new applications.
//! - A session is one NATS connection per user: it publishes its sends and consumes its own
//!   subject. A send is *taken* (the counterpart of Sealpost's durable `send_result`) when its
//!   PubAck arrives: the stream stored it (in the page cache; NATS syncs every 2 minutes). A
//!   delivery is the message arriving from the consumer; the receiver then acks it (one ack
//!   per message, not waited for).
//!
//! Only loopback `nats://` URLs are accepted.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, PullConsumer, pull},
    stream::{self as js_stream, RetentionPolicy, StorageType},
};
use futures_util::{
    StreamExt,
    stream::{self, FuturesUnordered},
};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use serde_json::Value;
use tokio::{
    sync::{OnceCell, Semaphore, watch},
    task::JoinHandle,
};

use crate::{
    OtherCommon, Workload,
    idle::IdleStats,
    other::{self, Server, bounded},
    traffic::{Pacer, Plan, Stats, Window, pick_recipient, stamp_of},
    util::loopback_url,
};

const STREAM: &str = "DM";
/// The stream's consumer limit: more than any run's users.
const MAX_CONSUMERS: i32 = 1_000_000;
/// Messages one pull request asks for (async-nats's default).
const BATCH: usize = 200;

/// Runs one workload against NATS.
pub(crate) async fn run(workload: &Workload) -> Result<Value> {
    other::run(&Nats::new(workload.common())?, workload).await
}

/// A NATS server with JetStream on loopback.
pub(crate) struct Nats {
    common: OtherCommon,
    url: String,
    /// The connection that creates the stream and the consumers.
    admin: OnceCell<jetstream::Context>,
}

/// A logged-in session: a connection and its user's consumer.
pub(crate) struct Session {
    /// Kept so the connection lives as long as the session.
    _client: async_nats::Client,
    js: jetstream::Context,
    messages: pull::Stream,
}

impl Nats {
    fn new(common: &OtherCommon) -> Result<Self> {
        Ok(Nats {
            url: loopback_url(&common.url, "nats")?,
            common: common.clone(),
            admin: OnceCell::new(),
        })
    }

    async fn connect(&self, read_buffer: u16) -> Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .read_buffer_capacity(read_buffer)
            .connect(self.url.as_str())
            .await
            .with_context(|| format!("connecting to {}", self.url))
    }

    /// The admin connection, with the stream created on first use.
    async fn admin(&self) -> Result<&jetstream::Context> {
        self.admin
            .get_or_try_init(|| async {
                let js = jetstream::new(self.connect(u16::MAX).await?);
                js.get_or_create_stream(js_stream::Config {
                    name: STREAM.to_owned(),
                    subjects: vec!["dm.*".to_owned()],
                    retention: RetentionPolicy::WorkQueue,
                    storage: StorageType::File,
                    num_replicas: 1,
                    // A consumer per user. nats-server 2.15 caps a stream at 1,000 consumers
                    // unless the stream sets its own limit (and takes 0 or -1 as "the
                    // default"), so this is a large positive number.
                    max_consumers: MAX_CONSUMERS,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating stream {STREAM}: {e}"))?;
                Ok::<_, anyhow::Error>(js)
            })
            .await
    }

    async fn login_inner(&self, user: &str, backlog: u64, idle: bool) -> Result<Session> {
        let client = self.connect(if idle { 4096 } else { u16::MAX }).await?;
        let js = jetstream::new(client.clone());
        let consumer: PullConsumer = js
            .get_consumer_from_stream(user, STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("consumer {user}: {e}"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("consuming {user}: {e}"))?;
        let mut read = 0;
        while read < backlog {
            match messages.next().await {
                Some(Ok(msg)) => {
                    msg.ack()
                        .await
                        .map_err(|e| anyhow::anyhow!("acking: {e}"))?;
                    read += 1;
                }
                Some(Err(e)) => bail!("reading {user}'s backlog: {e}"),
                None => bail!("{user}'s consumer ended"),
            }
        }
        Ok(Session {
            _client: client,
            js,
            messages,
        })
    }
}

impl Server for Nats {
    type Session = Session;
    const NAME: &'static str = "nats";

    async fn create_users(&self, users: &[String]) -> Result<()> {
        let js = self.admin().await?;
        let stream = js
            .get_stream(STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("stream {STREAM}: {e}"))?;
        let stream = &stream;
        stream::iter(users)
            .map(|user| async move {
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some(user.clone()),
                        filter_subject: format!("dm.{user}"),
                        ack_policy: AckPolicy::Explicit,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow::anyhow!("creating consumer {user}: {e}"))
            })
            .buffer_unordered(self.common.register_concurrency.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    fn address(&self, user: &str) -> String {
        format!("dm.{user}")
    }

    async fn login(&self, user: &str, backlog: u64, idle: bool) -> Result<Session> {
        bounded(&self.common, "login", self.login_inner(user, backlog, idle)).await
    }

    fn spawn_traffic(
        &self,
        session: Session,
        plan: &Arc<Plan>,
        stats: &Arc<Stats>,
        window: Window,
        me: Option<usize>,
        done: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let Session {
            _client,
            js,
            messages,
        } = session;
        vec![
            tokio::spawn(reader(messages, Arc::clone(stats), done.clone())),
            tokio::spawn(writer(
                js,
                Arc::clone(plan),
                Arc::clone(stats),
                window,
                me,
                done,
                _client,
            )),
        ]
    }

    fn spawn_idle(
        &self,
        session: Session,
        stats: Arc<IdleStats>,
        done: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(keep_alive(session, stats, done))
    }
}

async fn writer(
    js: jetstream::Context,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    window: Window,
    me: Option<usize>,
    mut done: watch::Receiver<bool>,
    _client: async_nats::Client,
) {
    let mut rng = StdRng::from_entropy();
    let mut template = vec![0u8; plan.size.max(8)];
    rng.fill_bytes(&mut template);
    let mut pacer = Pacer::new(&plan, window, &mut rng);
    let permits = Arc::new(Semaphore::new(plan.pipeline));
    let mut acks = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            _ = done.changed() => break,
            Some((stamp, result)) = acks.next(), if !acks.is_empty() => {
                match result {
                    Ok(()) => {
                        stats.record(&stats.result_latency, stamp);
                        stats.accepted.fetch_add(1, Relaxed);
                    }
                    Err(e) => stats.fail(format!("puback: {e}")),
                }
                stats.results.fetch_add(1, Relaxed);
                permits.add_permits(1);
            }
            () = pacer.tick(), if pacer.sending() => {}
            permit = Arc::clone(&permits).acquire_owned(), if pacer.ready() => {
                let Ok(permit) = permit else { break };
                let Some((stamp, number)) = pacer.take(&stats) else { continue };
                permit.forget();
                let to = pick_recipient(plan.recipients.len(), me, number, &mut rng);
                template[..8].copy_from_slice(&stamp.to_le_bytes());
                let subject = plan.recipients[to].handle.clone();
                match js.publish(subject, template.clone().into()).await {
                    Ok(ack) => acks.push(async move {
                        (stamp, ack.await.map(|_| ()).map_err(|e| e.to_string()))
                    }),
                    Err(e) => {
                        stats.close(format!("publish: {e}"));
                        break;
                    }
                }
                stats.sent.fetch_add(1, Relaxed);
            }
        }
    }
}

async fn reader(mut messages: pull::Stream, stats: Arc<Stats>, mut done: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            _ = done.changed() => break,
            msg = messages.next() => match msg {
                Some(Ok(msg)) => {
                    match stamp_of(&msg.payload) {
                        Some(stamp) => stats.record(&stats.deliver_latency, stamp),
                        None => {
                            stats.decode_errors.fetch_add(1, Relaxed);
                        }
                    }
                    stats.delivered.fetch_add(1, Relaxed);
                    if let Err(e) = msg.ack().await {
                        stats.close(format!("ack: {e}"));
                        break;
                    }
                }
                // Missed heartbeats and the like: the stream carries on.
                Some(Err(e)) => stats.fail(format!("consumer: {e}")),
                None => {
                    stats.close("consumer ended".to_owned());
                    break;
                }
            },
        }
    }
}

/// Keeps an idle session open: its consumer's pull request outstanding (renewed by the
/// client, with the server's idle heartbeats), the connection answering NATS PINGs.
async fn keep_alive(session: Session, stats: Arc<IdleStats>, mut done: watch::Receiver<bool>) {
    let Session {
        _client,
        mut messages,
        ..
    } = session;
    loop {
        tokio::select! {
            biased;
            _ = done.changed() => return,
            msg = messages.next() => match msg {
                Some(Ok(_)) => {
                    stats.frames.fetch_add(1, Relaxed);
                }
                Some(Err(e)) => {
                    stats.close(format!("consumer: {e}"));
                    return;
                }
                None => {
                    stats.close("consumer ended".to_owned());
                    return;
                }
            },
        }
    }
}
