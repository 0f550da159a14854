//! The comparison workloads of issue 11 against servers other than Sealpost (ejabberd in
//! [`crate::xmpp`], NATS JetStream in [`crate::jetstream`]), run by the same engine as the
//! Sealpost scenarios: the same pacing ([`crate::traffic::Pacer`]: closed-loop pipeline, open
//! loop on a schedule without coordinated omission), the same measured window, drain and
//! counters ([`crate::traffic::drive`], [`Stats`]), the same payload timestamps (the first 8
//! bytes, little-endian nanoseconds since the process-wide base) and the same reports
//! ([`report_e2e`], [`report_appends`], [`crate::idle::hold_idle`]).
//!
//! A [`Server`] only says how to create users, log one in, and run a logged-in session's
//! sending and receiving tasks.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    OtherAppendsArgs, OtherCommon, OtherE2eArgs, OtherIdleArgs, Workload,
    idle::{Hold, IdleStats, hold_idle},
    scenarios::{
        AppendsShape, E2eShape, Pacing, appends_plan, check_size, check_traffic,
        print_appends_banner, report_appends, report_e2e,
    },
    traffic::{Plan, Recipient, Stats, Window, drive},
    util::{check_nofile, fmt_duration, read_rss_kib, run_tag},
};

/// Runs one workload against `server`.
pub(crate) async fn run<S: Server>(server: &S, workload: &Workload) -> Result<Value> {
    match workload {
        Workload::E2e(a) => e2e(server, a).await,
        Workload::Appends(a) => appends(server, a).await,
        Workload::Idle(a) => idle(server, a).await,
    }
}

/// What the engine needs from a server.
pub(crate) trait Server {
    /// A logged-in session.
    type Session: Send + 'static;

    /// For banners and JSON: `ejabberd`, `nats`.
    const NAME: &'static str;

    /// Creates these users (accounts, consumers), `register_concurrency` at a time.
    async fn create_users(&self, users: &[String]) -> Result<()>;

    /// Where messages to `user` go (a JID, a subject).
    fn address(&self, user: &str) -> String;

    /// Logs `user` in and reads the `backlog` messages it should find waiting (acking them),
    /// as a client would before it counts as connected.
    async fn login(&self, user: &str, backlog: u64, idle: bool) -> Result<Self::Session>;

    /// Spawns the tasks that send on `plan`'s schedule (to recipients other than `me`) and
    /// receive and ack deliveries, counting into `stats`, until `done`.
    fn spawn_traffic(
        &self,
        session: Self::Session,
        plan: &Arc<Plan>,
        stats: &Arc<Stats>,
        window: Window,
        me: Option<usize>,
        done: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>>;

    /// Spawns the task that keeps an idle session open (answering heartbeats) until `done`.
    fn spawn_idle(
        &self,
        session: Self::Session,
        stats: Arc<IdleStats>,
        done: watch::Receiver<bool>,
    ) -> JoinHandle<()>;
}

/// `n` user names of this run: `lt<tag><kind><i>` (lower-case letters and digits, valid as
/// an XMPP local part and a NATS subject token).
fn users(tag: &str, kind: char, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("lt{tag}{kind}{i}")).collect()
}

/// Creates users and prints how long it took.
async fn create<S: Server>(server: &S, users: &[String]) -> Result<()> {
    let started = Instant::now();
    server.create_users(users).await?;
    println!(
        "  created {} users in {:.2}s",
        users.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Logs users in, `concurrency` at a time, in order, failing on the first error; each reads
/// `backlog` waiting messages first. Prints progress.
async fn login_all<S: Server>(
    server: &S,
    users: &[String],
    backlog: u64,
    concurrency: usize,
) -> Result<Vec<S::Session>> {
    let total = users.len();
    let started = Instant::now();
    let mut sessions = Vec::with_capacity(total);
    let mut results = stream::iter(users)
        .map(|u| server.login(u, backlog, false))
        .buffered(concurrency.max(1));
    let step = (total / 10).max(1);
    while let Some(result) = results.next().await {
        sessions.push(result?);
        if sessions.len() % step == 0 && sessions.len() < total {
            println!("  connected {}/{total}", sessions.len());
        }
    }
    println!(
        "  connected and authenticated {total} sessions in {:.2}s (backlog drained: {})",
        started.elapsed().as_secs_f64(),
        backlog * u64::try_from(total).unwrap_or(0),
    );
    Ok(sessions)
}

/// Runs the sessions on `plan` through the shared engine.
async fn run_traffic<S: Server>(
    server: &S,
    sessions: Vec<S::Session>,
    self_index: Vec<Option<usize>>,
    plan: &Arc<Plan>,
    stats: &Arc<Stats>,
) -> crate::traffic::Outcome {
    drive(plan, stats, |window, done| {
        sessions
            .into_iter()
            .zip(self_index)
            .flat_map(|(session, me)| {
                server.spawn_traffic(session, plan, stats, window, me, done.clone())
            })
            .collect()
    })
    .await
}

fn recipients<S: Server>(server: &S, users: &[String]) -> Vec<Recipient> {
    users
        .iter()
        .map(|u| Recipient {
            handle: server.address(u),
            devices: Vec::new(),
        })
        .collect()
}

/// W1 / W1r: every user sends to random other users and acks what it receives.
pub(crate) async fn e2e<S: Server>(server: &S, args: &OtherE2eArgs) -> Result<Value> {
    let (common, t) = (&args.common, &args.traffic);
    let pacing = Pacing::new(args.devices, args.size, args.rate, args.pipeline, t)?;
    let tag = run_tag();
    println!(
        "{}-e2e: {} users, {} B payload, {}, warm-up {}, duration {} (run {tag})",
        S::NAME,
        args.devices,
        args.size,
        pacing.mode,
        fmt_duration(t.warmup),
        fmt_duration(t.duration),
    );
    let names = users(&tag, 'd', args.devices);
    create(server, &names).await?;
    let sessions = login_all(server, &names, 0, common.connect_concurrency).await?;
    let plan = pacing.plan_to(recipients(server, &names), args.size, t);
    let stats = Arc::new(Stats::new());
    let self_index = (0..sessions.len()).map(Some).collect();
    let out = run_traffic(server, sessions, self_index, &plan, &stats).await;
    let shape = E2eShape {
        devices: args.devices,
        size: args.size,
        rate: args.rate,
        pipeline: pacing.pipeline,
        warmup: t.warmup,
    };
    let mut fields = report_e2e(&shape, &stats, &out);
    fields["server"] = json!(S::NAME);
    Ok(fields)
}

/// W2: pipelined senders to offline users; with `--drain`, the users then log in and read
/// their queues.
pub(crate) async fn appends<S: Server>(server: &S, args: &OtherAppendsArgs) -> Result<Value> {
    let (common, t) = (&args.common, &args.traffic);
    check_size(args.size)?;
    check_traffic(t)?;
    ensure!(
        args.senders > 0 && args.recipients > 0 && args.pipeline > 0,
        "--senders, --recipients and --pipeline must be > 0"
    );
    ensure!(
        !args.drain || args.per_recipient.is_some(),
        "--drain needs --per-recipient (a drained queue is recognized by its count)"
    );
    check_nofile(u64::try_from(args.senders.max(args.recipients)).unwrap_or(u64::MAX) + 256)?;
    let tag = run_tag();
    let shape = AppendsShape::new(
        args.senders,
        args.recipients,
        args.size,
        args.pipeline,
        args.per_recipient,
        t,
    );
    print_appends_banner(&format!("{}-appends", S::NAME), &shape, t, &tag);
    let recipient_names = users(&tag, 'r', args.recipients);
    let sender_names = users(&tag, 's', args.senders);
    create(server, &recipient_names).await?;
    create(server, &sender_names).await?;
    let sessions = login_all(server, &sender_names, 0, common.connect_concurrency).await?;
    let plan = appends_plan(&shape, recipients(server, &recipient_names), t);
    let stats = Arc::new(Stats::new());
    let self_index = vec![None; sessions.len()];
    let out = run_traffic(server, sessions, self_index, &plan, &stats).await;
    let mut fields = report_appends(&shape, &stats, &out);
    fields["server"] = json!(S::NAME);
    if args.drain
        && let Some(n) = args.per_recipient
    {
        if out.total.accepted < shape.total.unwrap_or(0) {
            bail!(
                "only {} of {} sends were taken; not draining",
                out.total.accepted,
                shape.total.unwrap_or(0)
            );
        }
        // Every recipient logs in (as many at once as connects are allowed) and reads its
        // n messages, acking them.
        let started = Instant::now();
        let sessions = login_all(server, &recipient_names, n, common.connect_concurrency).await?;
        let drain_s = started.elapsed().as_secs_f64();
        println!("  drained {} queues in {drain_s:.2}s", sessions.len());
        fields["drain_s"] = json!(drain_s);
    }
    Ok(fields)
}

/// W3: many authenticated idle sessions; the server's RSS per session.
pub(crate) async fn idle<S: Server>(server: &S, args: &OtherIdleArgs) -> Result<Value> {
    let common = &args.common;
    ensure!(args.connections > 0, "--connections must be > 0");
    check_nofile(u64::try_from(args.connections).unwrap_or(u64::MAX) + 256)?;
    if let Some(pid) = args.server_pid {
        read_rss_kib(pid)?;
    }
    let tag = run_tag();
    println!(
        "{}-idle: {} sessions, hold {} (run {tag})",
        S::NAME,
        args.connections,
        fmt_duration(args.hold),
    );
    let names = users(&tag, 'i', args.connections);
    create(server, &names).await?;
    let hold = Hold {
        server_pid: args.server_pid,
        settle_timeout: args.settle_timeout,
        hold: args.hold,
        concurrency: common.connect_concurrency,
    };
    let names = &names;
    let mut fields = hold_idle(names.len(), &hold, |i, stats, done| async move {
        let session = server.login(&names[i], 0, true).await?;
        Ok(server.spawn_idle(session, stats, done))
    })
    .await?;
    fields["server"] = json!(S::NAME);
    Ok(fields)
}

/// Bounds `fut` by the connect timeout of `common`, naming `what` when it runs out.
pub(crate) async fn bounded<T>(
    common: &OtherCommon,
    what: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    bounded_by(common.connect_timeout, what, fut).await
}

/// Bounds `fut` by `limit`, naming `what` when it runs out.
pub(crate) async fn bounded_by<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => bail!("{what} timed out after {limit:?}"),
    }
}
