//! Starting and stopping a broker.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use actix::Arbiter;
use actix_web::{App, rt::net::TcpStream, web};
use futures_util::{FutureExt as _, future::LocalBoxFuture};
use tokio::sync::watch;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::{
    clock::now_ms,
    crypto::TokenHasher,
    federation::{Federation, PeerConfig, PeerSettings, identity::ServerKey},
    gateway::{self, AppState},
    mailbox::{MailboxConfig, Mailboxes, Registry},
    push::{Pusher, endpoint::VapidKey},
    store::{
        SledStore, StoreOptions, Stores,
        blobs::{files::FileBlobs, memory::MemoryBlobs},
        memory::MemoryStore,
        nats::{NatsOptions, NatsStore},
    },
};

/// Everything a broker is started with: each layer's own settings, typed and validated (the
/// configuration module builds this from defaults, file, environment and flags).
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory (store, server secret, federation key).
    pub data_dir: PathBuf,
    /// HTTP worker threads (0 = one per core).
    pub workers: usize,
    /// Threads running mailbox actors (0 = one per core).
    pub mailbox_threads: usize,
    /// Most concurrent connections per HTTP worker.
    pub max_connections: usize,
    /// Interval of the expiry sweep.
    pub expiry_sweep: Duration,
    /// This broker's federation endpoint as peers reach it (`None`: ws://LISTEN/v1/federation).
    pub federation_url: Option<String>,
    /// Directory of `server.key` and `federation.key` (the data directory by default; a
    /// mounted secret shared by every pod in a scale-out deployment).
    pub key_dir: PathBuf,
    /// Which store serves the seams.
    pub backend: Backend,
    /// The embedded store's options (with [`Backend::Sled`]).
    pub store: StoreOptions,
    /// Every mailbox.
    pub mailbox: MailboxConfig,
    /// Every federation peer.
    pub federation: PeerSettings,
    /// The peers this broker federates with.
    pub peers: Vec<PeerConfig>,
    /// The gateway.
    pub gateway: gateway::Settings,
    /// Push wake-ups (`None`: off).
    pub push: Option<crate::push::PushSettings>,
    /// The key-transparency log (with the sled and memory stores).
    pub transparency: crate::transparency::LogSettings,
    /// How often each peer's log is audited.
    pub audit_interval: Duration,
}

/// Which store serves the seams.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The embedded sled store in the data directory (one process per domain).
    Sled,
    /// A NATS JetStream cluster (many pods per domain).
    Nats(NatsSettings),
    /// Everything in this process's memory, lost on exit: nothing is durable. For measuring
    /// what the layers above the store cost (`--store memory`), never for serving users.
    Memory,
}

/// How to reach the NATS JetStream store.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// Server URLs, comma-separated.
    pub urls: String,
    /// Inbox streams.
    pub partitions: u32,
    /// Replicas of every stream and bucket.
    pub replicas: usize,
    /// This pod's name.
    pub pod: String,
    /// How long one request may take.
    pub timeout: Duration,
}

/// Opens the configured store; the NATS store also on its own, for the pod's upkeep.
async fn open_store(
    config: &Config,
    hasher: &TokenHasher,
) -> anyhow::Result<(Stores, Option<NatsStore>)> {
    Ok(match &config.backend {
        Backend::Sled => {
            let blobs = FileBlobs::open(&config.store.dir.join("attachments"))?;
            let stores = Stores::from_backend(Arc::new(SledStore::open(&config.store)?));
            (stores.with_blobs(Arc::new(blobs)), None)
        }
        Backend::Memory => {
            warn!("store: memory; nothing is durable and everything is lost on exit");
            let stores = Stores::from_backend(Arc::new(MemoryStore::new()));
            (stores.with_blobs(Arc::new(MemoryBlobs::new())), None)
        }
        Backend::Nats(nats) => {
            let options = NatsOptions {
                urls: nats.urls.clone(),
                partitions: nats.partitions,
                replicas: nats.replicas,
                dedup_window: Duration::from_secs(config.mailbox.dedup_secs),
                secret: hasher.derive_secret("sealpost 2026-12 nats store"),
                pod: nats.pod.clone(),
                timeout: nats.timeout,
            };
            // NATS may come up after us (a pod starting with its cluster), and a fresh
            // cluster's JetStream may time out while pods create their streams and buckets:
            // wait for it, not ready meanwhile. A configuration error is final.
            let mut wait = Duration::from_millis(200);
            loop {
                let opened = async {
                    let store = NatsStore::connect(&options).await?;
                    let blobs = store.blobs(nats.replicas).await?;
                    Ok::<_, crate::store::StoreError>((store, blobs))
                };
                match opened.await {
                    Ok((store, blobs)) => {
                        let live = Arc::new(store.live());
                        let stores = Stores::from_backend(Arc::new(store.clone()))
                            .with_live(live)
                            .with_blobs(Arc::new(blobs));
                        break (stores, Some(store));
                    }
                    Err(e) if nats_config_error(&e) => return Err(e.into()),
                    Err(e) => {
                        warn!(error = %e, "waiting for NATS");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    })
}

/// The key-transparency log: its own sled database in the data directory, or memory with the
/// memory store. The NATS store has no log yet (`None`).
async fn open_log(
    backend: &Backend,
    dir: &std::path::Path,
    domain: &str,
    hasher: &TokenHasher,
    settings: crate::transparency::LogSettings,
) -> anyhow::Result<Option<crate::transparency::Log>> {
    use crate::store::transparency::{
        TransparencyStore, memory::MemoryTransparency, sled::SledTransparency,
    };
    let store: Arc<dyn TransparencyStore> = match backend {
        Backend::Sled => Arc::new(SledTransparency::open(&dir.join("transparency"))?),
        Backend::Memory => Arc::new(MemoryTransparency::new()),
        Backend::Nats(_) => {
            warn!("key transparency is not available with the NATS store yet");
            return Ok(None);
        }
    };
    let keys = crate::crypto::LogKeys::derive(hasher);
    let log = crate::transparency::Log::open(domain.to_owned(), store, keys, settings).await?;
    Ok(Some(log))
}

/// Whether opening the NATS store failed for a reason waiting cannot mend (a bad URL or pod
/// name, a stream of another configuration).
fn nats_config_error(e: &crate::store::StoreError) -> bool {
    let text = e.to_string();
    ["bad NATS URL", "pod name", "wrong configuration"]
        .iter()
        .any(|m| text.contains(m))
}

/// With the NATS store: keeps this pod marked alive, and adopts the federation outboxes of
/// pods that are gone (see `store::nats::takeover`).
async fn pod_upkeep(store: NatsStore, federation: Arc<Federation>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        if let Err(e) = store.heartbeat().await {
            warn!(error = %e, "pod heartbeat failed");
            continue;
        }
        let orphans = match store.orphaned_outbox(256).await {
            Ok(orphans) => orphans,
            Err(e) => {
                warn!(error = %e, "looking for outboxes of gone pods failed");
                continue;
            }
        };
        if !orphans.is_empty() {
            info!(
                entries = orphans.len(),
                "adopting outbox entries of a gone pod"
            );
        }
        for orphan in orphans {
            match federation.adopt(orphan.record.clone()).await {
                sealpost_proto::SendOutcome::Accepted { .. } => {
                    if let Err(e) = store.forget_orphan(&orphan).await {
                        warn!(error = %e, "deleting an adopted outbox entry failed");
                    }
                }
                sealpost_proto::SendOutcome::Rejected { code, .. } => {
                    warn!(
                        code = code.as_str(),
                        "adopting an outbox entry was refused; kept"
                    );
                }
            }
        }
    }
}

/// Mailboxes wake devices through the pusher (neither layer knows the other).
impl crate::mailbox::Wakeups for Pusher {
    fn wake(&self, user: &str, device: u32, urgent: bool) {
        Pusher::wake(self, user, device, urgent);
    }

    fn connected(&self, user: &str, device: u32) {
        Pusher::connected(self, user, device);
    }
}

/// What derives the VAPID signing key of push wake-ups from the server secret (BLAKE3
/// `derive_key` context: hard-coded, unique, application-specific).
const VAPID_CONTEXT: &str = "sealpost 2026-12-06 push VAPID ES256 signing key";

/// Runs a broker until SIGTERM or SIGINT, then shuts down gracefully. `on_listen` is called
/// with the bound address once the broker accepts connections.
pub async fn run(config: Config, on_listen: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.key_dir)?;
    let hasher = TokenHasher::load_or_create(&config.key_dir)?;
    let opened = Instant::now();
    let (store, nats) = open_store(&config, &hasher).await?;
    info!(
        elapsed_ms = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX),
        "store opened"
    );
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mailbox_threads = if config.mailbox_threads == 0 {
        cores
    } else {
        config.mailbox_threads
    };
    let arbiters: Vec<Arbiter> = (0..mailbox_threads).map(|_| Arbiter::new()).collect();
    let mut gateway_settings = config.gateway;
    let wakeups: Arc<dyn crate::mailbox::Wakeups> = match config.push {
        Some(push) => {
            let vapid = VapidKey::from_secret(&Zeroizing::new(hasher.derive_secret(VAPID_CONTEXT)))
                .ok_or_else(|| anyhow::anyhow!("the server secret gives no VAPID key"))?;
            gateway_settings.push.vapid_public_key = Some(vapid.public_b64());
            Arc::new(
                Pusher::start(push, vapid, store.directory.clone())
                    .map_err(|e| anyhow::anyhow!("cannot set up push wake-ups: {e}"))?,
            )
        }
        None => Arc::new(crate::mailbox::NoWakeups),
    };
    let mailboxes = Mailboxes::new(Registry::with_wakeups(
        arbiters.iter().map(|a| a.handle()).collect(),
        store.clone(),
        config.mailbox,
        wakeups,
    ));
    let federation_arbiter = Arbiter::new();
    let federation = Federation::start(
        config.federation,
        ServerKey::load_or_create(&config.key_dir)?,
        config.peers,
        store.clone(),
        &federation_arbiter.handle(),
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_drain = gateway_settings.shutdown_drain;
    let domain = gateway_settings.domain.clone();
    let transparency = open_log(
        &config.backend,
        &config.store.dir,
        &domain,
        &hasher,
        config.transparency,
    )
    .await?;
    if let Some(log) = &transparency {
        crate::transparency::audit::start(log.clone(), federation.clone(), config.audit_interval);
    }
    let mut state = AppState::new(
        gateway_settings,
        store.clone(),
        mailboxes.clone(),
        federation.clone(),
        hasher,
        shutdown_rx,
    );
    state.transparency = transparency;
    let state = Arc::new(state);

    let workers = if config.workers == 0 {
        cores
    } else {
        config.workers
    };
    let listener = listen(config.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let server = actix_server::Server::build()
        .workers(workers)
        .max_concurrent_connections(config.max_connections)
        .disable_signals()
        .shutdown_timeout(shutdown_drain.as_secs() + 6)
        .listen("sealpost", listener, {
            let state = state.clone();
            move || http_service(state.clone(), addr)
        })?;
    federation.set_public_url(
        config
            .federation_url
            .unwrap_or_else(|| format!("ws://{addr}/v1/federation")),
    );
    let server = server.run();
    let handle = server.handle();
    let sweeper = actix_web::rt::spawn(sweep(state.clone(), config.expiry_sweep));
    let upkeep = nats.map(|nats| actix_web::rt::spawn(pod_upkeep(nats, federation.clone())));
    let medic = actix_web::rt::spawn(recover_store(state.clone()));
    info!(%addr, %domain, "listening");
    on_listen(addr);

    let serving = actix_web::rt::spawn(server);
    wait_for_signal().await;

    info!("shutting down: refusing new connections, closing sessions");
    state.shutting_down.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    // Sessions answer in-flight sends, then close with jitter inside the drain window.
    let drain = shutdown_drain + Duration::from_millis(500);
    let deadline = Instant::now() + drain;
    while Instant::now() < deadline && state.open_sessions.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mailboxes.kick_all(sealpost_proto::CloseCode::GoingAway);
    handle.stop(true).await;
    let _ = serving.await;
    sweeper.abort();
    if let Some(upkeep) = upkeep {
        upkeep.abort();
    }
    medic.abort();
    // Stopped mailboxes hand their queues back (the store keeps their heads), so the next
    // start opens them without counting them again; then one flush makes it all durable.
    if !mailboxes.retire_all(Duration::from_secs(2)).await {
        warn!("mailboxes did not stop in time; their queues are counted again when next opened");
    }
    if let Err(e) = store.health.flush().await {
        warn!(error = %e, "final flush failed");
    }
    federation_arbiter.stop();
    for a in arbiters {
        a.stop();
    }
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            warn!("cannot install signal handlers; running until killed");
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Brings the store back after a failure that outlived its cause: once it reports that its
/// writes failed and there is room again, every mailbox (each holds its user's open queues) is
/// stopped, and the store reopened. Their devices reconnect to fresh mailboxes, which repair
/// and load their queues from what is on disk.
async fn recover_store(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if !state.store.health.wants_reopen() {
            continue;
        }
        warn!("the store failed and there is room again: reopening it");
        if !state.mailboxes.retire_all(Duration::from_secs(5)).await {
            warn!("mailboxes did not stop in time; trying again");
            continue;
        }
        if let Err(e) = state.store.health.reopen().await {
            warn!(error = %e, "reopening the store failed; trying again");
        }
    }
}

/// Periodically hands due expiry-index entries to their mailboxes.
async fn sweep(state: Arc<AppState>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        state.limits.housekeep();
        state.turn.housekeep();
        state.federation.housekeep();
        state.store.health.check_room();
        if let Some(blobs) = &state.store.blobs {
            match blobs.expire(now_ms()).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics::counter!("sealpost_blobs_expired_total").increment(n as u64);
                }
                Err(e) => warn!(error = %e, "expiring attachments failed"),
            }
        }
        const BATCH: usize = 10_000;
        let mut previous_first = None;
        loop {
            let due = match state.store.inbox.due(now_ms(), BATCH).await {
                Ok(due) => due,
                Err(e) => {
                    warn!(error = %e, "expiry scan failed");
                    break;
                }
            };
            // A batch that starts where the last one did made no progress (its mailboxes
            // could not start, or skipped entries for now): wait for the next tick.
            if due.is_empty() || due.first() == previous_first.as_ref() {
                break;
            }
            previous_first = due.first().cloned();
            let full = due.len() >= BATCH;
            let mut by_user: BTreeMap<String, Vec<_>> = BTreeMap::new();
            for entry in due {
                by_user
                    .entry(entry.user().to_owned())
                    .or_default()
                    .push(entry);
            }
            for (user, due) in by_user {
                let _ = state.mailboxes.expire(&user, due).await;
            }
            if !full {
                break;
            }
        }
    }
}

/// The listening socket, with the backlog a burst of reconnecting devices needs.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)?.into_std()
}

/// One worker's HTTP service: actix-web serves every route, and a request for
/// `Upgrade: websocket` is handed, with its connection, to the gateway, which serves the
/// WebSocket on the TCP stream itself (`socket::upgrade`). actix-web's `HttpServer` builds the
/// same service but cannot take an upgrade hook.
fn http_service(
    state: Arc<AppState>,
    addr: SocketAddr,
) -> impl actix_service::ServiceFactory<
    TcpStream,
    Config = (),
    Response = (),
    Error = actix_http::error::DispatchError,
    InitError = (),
> {
    let app = App::new()
        .app_data(web::Data::new(state.clone()))
        .wrap(actix_web::middleware::from_fn(
            crate::gateway::secrets::scrub,
        ))
        .configure(crate::gateway::routes);
    let upgrade = actix_service::fn_service(
        move |(req, connection): (
            actix_http::Request,
            actix_codec::Framed<TcpStream, actix_http::h1::Codec>,
        )|
              -> LocalBoxFuture<'static, Result<(), std::convert::Infallible>> {
            // Boxed (by the gateway, per endpoint): the connection's task holds this for the
            // socket's whole life, and actix-http keeps it in the same slot as an HTTP
            // connection's state.
            Box::pin(gateway::serve_upgrade(state.clone(), req, connection).map(Ok))
        },
    );
    actix_http::HttpService::build()
        // actix-web's defaults.
        .keep_alive(actix_http::KeepAlive::default())
        .client_request_timeout(Duration::from_secs(5))
        .client_disconnect_timeout(Duration::from_secs(1))
        .local_addr(addr)
        // Small frames must not wait for the peer's delayed ACK (Nagle): that added 40 ms to
        // the tail latency of deliveries.
        .on_connect_ext(|tcp: &TcpStream, _: &mut actix_http::Extensions| {
            let _ = tcp.set_nodelay(true);
        })
        .upgrade(upgrade)
        // The host and address are for URL generation, which no route uses.
        .finish(actix_service::map_config(app, |()| {
            actix_web::dev::AppConfig::default()
        }))
        .tcp()
}

/// How the kernel schedules the broker's threads (`cpu_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CpuPolicy {
    /// Linux's `SCHED_BATCH`: a thread that wakes does not preempt the one running; it runs
    /// when that one waits or its time slice ends. A send crosses several threads (the
    /// connection's, the mailbox's, the commit thread, sled's I/O pool), and with the default
    /// policy each hand-off could preempt the thread that handed over, one context switch per
    /// message; batched, each thread works through what has queued for it. On one core this
    /// cut the CPU per delivered envelope by a quarter to a third (`loadtest/JOURNAL.md`,
    /// "2026-12-07 (4)").
    /// Threads still share the CPU fairly, and an idle core runs a woken thread at once.
    Batch,
    /// The kernel's default (`SCHED_OTHER`).
    Normal,
}

/// Puts the calling thread under `policy`, and with it every thread it starts from then on
/// (threads inherit their creator's policy): `main` calls it before anything starts a
/// thread. The nice value stays what it was.
pub fn set_cpu_policy(policy: CpuPolicy) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let policy = match policy {
            CpuPolicy::Batch => uapi::c::SCHED_BATCH,
            CpuPolicy::Normal => uapi::c::SCHED_OTHER,
        };
        // Normal policies take no static priority: it must be 0.
        let param = uapi::c::sched_param { sched_priority: 0 };
        uapi::sched_setscheduler(0, policy, &param)
            .map(drop)
            .map_err(|e| std::io::Error::from_raw_os_error(e.0))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = policy;
        Ok(())
    }
}
