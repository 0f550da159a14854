//! Starting and stopping a broker.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use actix::Arbiter;
use actix_web::{App, HttpServer, web};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    clock::now_ms,
    config::Settings,
    crypto::{TokenHasher, parse_platform_key},
    federation::{Federation, PeerSettings, identity::ServerKey, parse_peers},
    gateway::{
        AppState,
        limits::{Limits, PreAuth},
    },
    mailbox::{MailboxConfig, Registry, messages::Expire},
    socket::Budget,
    store::{SledStore, StoreOptions, Stores},
};

/// Runs a broker until SIGTERM or SIGINT, then shuts down gracefully. `on_listen` is called
/// with the bound address once the broker accepts connections.
pub async fn run(settings: Settings, on_listen: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let opened = Instant::now();
    let store = Stores::from_backend(Arc::new(SledStore::open(&StoreOptions {
        dir: settings.data_dir.clone(),
        group_commit: settings.group_commit,
        fsync: settings.fsync,
        cache_bytes: settings.cache_mb * 1024 * 1024,
        commit_delay: Duration::from_micros(settings.commit_delay_us),
        min_free_bytes: settings.min_free_disk_mb.saturating_mul(1024 * 1024),
        failpoint_sync: (!settings.failpoint_sync_file.is_empty())
            .then(|| settings.failpoint_sync_file.clone().into()),
    })?));
    info!(
        elapsed_ms = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX),
        "store opened"
    );
    let hasher = TokenHasher::load_or_create(&settings.data_dir)?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mailbox_threads = if settings.mailbox_threads == 0 {
        cores
    } else {
        settings.mailbox_threads
    };
    let arbiters: Vec<Arbiter> = (0..mailbox_threads).map(|_| Arbiter::new()).collect();
    let registry = Registry::new(
        arbiters.iter().map(|a| a.handle()).collect(),
        store.clone(),
        MailboxConfig {
            queue_quota: settings.queue_quota,
            queue_quota_bytes: settings.queue_quota_bytes,
            window: settings.delivery_window,
            ack_timeout: Duration::from_millis(settings.ack_timeout_ms),
            idle: Duration::from_millis(settings.mailbox_idle_ms),
            dedup_secs: settings.dedup_secs,
        },
    );
    let federation_arbiter = Arbiter::new();
    let federation = Federation::start(
        PeerSettings {
            local_domain: settings.domain.clone(),
            batch: settings.federation_batch,
            max_txn_bytes: 1024 * 1024,
            window: settings.federation_window,
            backoff_min: Duration::from_millis(settings.federation_backoff_min_ms),
            backoff_max: Duration::from_millis(settings.federation_backoff_max_ms),
            request_timeout: Duration::from_millis(settings.federation_timeout_ms),
            device_cache: Duration::from_millis(settings.federation_device_cache_ms),
            heartbeat: Duration::from_millis(settings.heartbeat_ms),
            idle_timeout: Duration::from_millis(settings.client_timeout_ms),
            origin_rate: settings.federation_origin_rate,
            inbound_txns: settings.federation_window.max(4),
            outbox_quota: settings.federation_outbox_quota,
        },
        ServerKey::load_or_create(&settings.data_dir)?,
        parse_peers(&settings.federation_peers, &settings.domain)
            .map_err(|e| anyhow::anyhow!("federation_peers: {e}"))?,
        store.clone(),
        &federation_arbiter.handle(),
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(AppState {
        limits: Limits::new(
            settings.ip_rate,
            settings.ip_burst,
            settings.device_rate,
            settings.device_burst,
            settings.stranger_rate,
            settings.claim_rate,
        ),
        proxies: crate::gateway::client_ip::TrustedProxies::parse(&settings.trusted_proxies)
            .map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?,
        platform_key: parse_platform_key(&settings.platform_public_key),
        turn: crate::gateway::turn::Turn::from_settings(&settings)?,
        metrics: crate::telemetry::init_metrics(),
        store: store.clone(),
        registry: registry.clone(),
        federation: federation.clone(),
        hasher,
        shutting_down: AtomicBool::new(false),
        shutdown: shutdown_rx,
        next_conn: AtomicU64::new(1),
        open_sessions: AtomicUsize::new(0),
        socket_budget: Budget::new(
            usize::try_from(settings.socket_buffer_mb.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
        ),
        pre_auth: PreAuth::new(
            settings.max_unauthenticated_per_ip,
            settings.max_unauthenticated,
        ),
        settings: settings.clone(),
    });

    let workers = if settings.workers == 0 {
        cores
    } else {
        settings.workers
    };
    let data = web::Data::new(state.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(crate::gateway::http::routes)
    })
    // Small frames must not wait for the peer's delayed ACK (Nagle): that added 40 ms to the
    // tail latency of deliveries.
    .on_connect(|conn, _ext| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
    })
    .workers(workers)
    .max_connections(settings.max_connections)
    .backlog(4096)
    .disable_signals()
    .shutdown_timeout(settings.shutdown_drain_ms.div_ceil(1000) + 5)
    .bind(settings.listen)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("bound no address"))?;
    federation.set_public_url(if settings.federation_url.is_empty() {
        format!("ws://{addr}/v1/federation")
    } else {
        settings.federation_url.clone()
    });
    let server = server.run();
    let handle = server.handle();
    let sweeper = actix_web::rt::spawn(sweep(state.clone()));
    info!(%addr, domain = %settings.domain, "listening");
    on_listen(addr);

    let serving = actix_web::rt::spawn(server);
    wait_for_signal().await;

    info!("shutting down: refusing new connections, closing sessions");
    state.shutting_down.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    // Sessions answer in-flight sends, then close with jitter inside the drain window.
    let drain = Duration::from_millis(settings.shutdown_drain_ms + 500);
    let deadline = Instant::now() + drain;
    while Instant::now() < deadline && state.open_sessions.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    registry.kick_all(sealpost_proto::CloseCode::GoingAway);
    handle.stop(true).await;
    let _ = serving.await;
    sweeper.abort();
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

/// Periodically hands due expiry-index entries to their mailboxes.
async fn sweep(state: Arc<AppState>) {
    let period = Duration::from_millis(state.settings.expiry_sweep_ms);
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        state.limits.housekeep();
        state.turn.housekeep();
        state.federation.housekeep();
        state.store.health.check_room();
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
                let _ = state.registry.call_once(&user, Expire { due }).await;
            }
            if !full {
                break;
            }
        }
    }
}
