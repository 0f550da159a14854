//! `sealpost-loadtest`: load generator for the Sealpost broker.
//!
//! Scenarios (see `loadtest/README.md`):
//! - `appends`: pipelined senders to recipients that never connect — durable appends/s.
//! - `e2e`: N connected devices send to each other and ack — send→deliver latency.
//! - `federated`: devices on two federated brokers send across the domain boundary —
//!   cross-domain delivered/s and send→deliver latency.
//! - `idle`: N authenticated idle connections — broker RSS per connection.
//! - `encrypted`: pairs of real SDK clients exchanging sealed, end-to-end encrypted texts —
//!   client crypto cost per message and delivered messages/s.
//! - `fanout`: one message to a group of N accounts as one `group_send` and as N `send`s —
//!   upload bytes, time until every device has it, broker CPU per delivered copy.
//! - `ejabberd <e2e|appends|idle>` and `nats <e2e|appends|idle>`: the same workloads, measured
//!   by the same engine, against ejabberd (XMPP over WebSocket) and NATS JetStream, for the
//!   side-by-side comparison of issue 11 (`loadtest/compare.sh`).
//! - `plot`: no load; draws the scaling curves `loadtest/scaling.sh` measured as an SVG.
//!
//! Every scenario prints human-readable lines and, last, one JSON line `{"scenario":...}`.
//! Only loopback targets are accepted.

#![allow(clippy::print_stdout)]

mod api;
mod blobs;
mod client;
mod encrypted;
mod fanout;
mod idle;
mod jetstream;
mod other;
mod plot;
mod scenarios;
mod traffic;
mod util;
mod xmpp;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::util::{CpuClass, Target, Targets, json_line, parse_cpu_class, parse_duration};

/// Load generator for the Sealpost broker (loopback targets only).
#[derive(Parser)]
#[command(name = "sealpost-loadtest", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Pipelined senders to recipients that never connect: durable appends/s and
    /// send→send_result latency.
    Appends(AppendsArgs),
    /// Connected devices send to random other accounts and ack what they receive:
    /// send→deliver and send→send_result latency.
    E2e(E2eArgs),
    /// Devices on two federated brokers (`--url` and `--peer-url`) send only to accounts of
    /// the other domain and ack what they receive: cross-domain send→deliver latency.
    Federated(FederatedArgs),
    /// Many authenticated idle connections: broker RSS per connection.
    Idle(IdleArgs),
    /// Pairs of SDK clients exchange end-to-end encrypted, sealed-sender texts: client
    /// encrypt+seal and open+decrypt cost per message, delivered messages/s.
    Encrypted(EncryptedArgs),
    /// One message to a group of N accounts, as one group_send and as N sends: upload
    /// bytes, time until every device has it, broker CPU per delivered copy.
    Fanout(FanoutArgs),
    /// Attachments: one large upload in pieces and its download, then many small uploads at
    /// once: MiB/s.
    Blobs(BlobsArgs),
    /// The same workloads against ejabberd, XMPP over WebSocket (RFC 7395), for issue 11's
    /// side-by-side comparison (`loadtest/compare.sh`).
    Ejabberd {
        #[command(subcommand)]
        workload: Workload,
    },
    /// The same workloads against NATS JetStream (a stream over `dm.<user>`, a pull consumer
    /// per user), for issue 11's side-by-side comparison (`loadtest/compare.sh`).
    Nats {
        #[command(subcommand)]
        workload: Workload,
    },
    /// No load: draws the scaling curves (delivered/s and p99 against connected devices and
    /// against envelopes queued) from the CSV `loadtest/scaling.sh` writes, as an SVG.
    Plot(PlotArgs),
}

#[derive(Args, Clone)]
struct PlotArgs {
    /// The CSV: series,x,delivered_per_s,p99_ms[,startup_ms] (see loadtest/src/plot.rs).
    #[arg(long, default_value = "loadtest/scaling.csv")]
    input: std::path::PathBuf,
    /// The SVG to write.
    #[arg(long, default_value = "loadtest/scaling.svg")]
    output: std::path::PathBuf,
}

/// A workload of another server (ejabberd, NATS), measured like the Sealpost scenario of the
/// same name.
#[derive(Subcommand, Clone)]
enum Workload {
    /// Like `e2e`: connected users send to random other users and ack what they receive.
    E2e(OtherE2eArgs),
    /// Like `appends`: pipelined senders to users who are offline; with --drain, the users
    /// then log in and read their queues.
    Appends(OtherAppendsArgs),
    /// Like `idle`: many authenticated idle sessions, the server's RSS per session.
    Idle(OtherIdleArgs),
}

impl Workload {
    fn common(&self) -> &OtherCommon {
        match self {
            Workload::E2e(a) => &a.common,
            Workload::Appends(a) => &a.common,
            Workload::Idle(a) => &a.common,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Workload::E2e(_) => "e2e",
            Workload::Appends(_) => "appends",
            Workload::Idle(_) => "idle",
        }
    }
}

// Options of every workload against another server.
#[derive(Args, Clone)]
struct OtherCommon {
    /// The server: ws://127.0.0.1:PORT/ws for ejabberd, nats://127.0.0.1:PORT for NATS
    /// (loopback only).
    #[arg(long)]
    url: String,
    /// The XMPP domain (ejabberd's host); for NATS it only names the users.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Concurrent account registrations (ejabberd) or consumer creations (NATS).
    #[arg(long, default_value_t = 64)]
    register_concurrency: usize,
    /// Concurrent connects (connect + auth + backlog each).
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Upper bound for one connect + auth + backlog drain.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Worker threads of the load generator (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args, Clone)]
struct OtherE2eArgs {
    #[command(flatten)]
    common: OtherCommon,
    #[command(flatten)]
    traffic: TrafficArgs,
    /// Users, one session each.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Payload bytes per message (at least 8; the first 8 carry the send timestamp).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Total sends per second, spread evenly over the users (open loop); 0: closed loop.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Sends outstanding per user [default: 1 in closed loop, 64 (a cap) in open loop].
    #[arg(long)]
    pipeline: Option<usize>,
}

#[derive(Args, Clone)]
struct OtherAppendsArgs {
    #[command(flatten)]
    common: OtherCommon,
    #[command(flatten)]
    traffic: TrafficArgs,
    /// Sender sessions.
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// Offline recipients.
    #[arg(long, default_value_t = 1000)]
    recipients: usize,
    /// Sends outstanding per sender session.
    #[arg(long, default_value_t = 32)]
    pipeline: usize,
    /// Payload bytes per message (at least 8).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Then every recipient logs in and reads (and acks) its queue: how long that took.
    #[arg(long)]
    drain: bool,
    /// Send exactly this many to every recipient instead of sending for --duration (as
    /// `appends --per-recipient`).
    #[arg(long)]
    per_recipient: Option<u64>,
}

#[derive(Args, Clone)]
struct OtherIdleArgs {
    #[command(flatten)]
    common: OtherCommon,
    /// Idle authenticated sessions to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// The server's process id, to read its VmRSS from /proc/PID/status.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Bound on waiting for the server's RSS to stop changing (before and after connecting).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    settle_timeout: Duration,
    /// Keep the sessions open this long after RSS settled.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hold: Duration,
}

// Options every scenario takes. (Plain comments on flattened structs: clap would take a doc
// comment as the subcommand's description.)
#[derive(Args, Clone)]
struct Common {
    /// The broker's base URL, e.g. http://127.0.0.1:8080 (loopback only); for `appends`,
    /// `e2e` and `idle` also several pods of one domain, comma-separated: accounts register
    /// through them and their devices connect to them round-robin.
    #[arg(long, env = "SEALPOST_URL")]
    url: String,
    /// Domain of the generated handles (the broker's --domain).
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Concurrent account registrations.
    #[arg(long, default_value_t = 32)]
    register_concurrency: usize,
    /// Concurrent WebSocket connects (connect + auth + backlog each).
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Upper bound for one connect + auth + backlog drain.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Worker threads of the load generator (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

impl Common {
    /// Every broker of `--url`.
    fn targets(&self) -> Result<Targets> {
        Targets::parse(&self.url)
    }

    /// The one broker of `--url`, for a scenario (`what`) that measures a single broker.
    fn target(&self, what: &str) -> Result<Target> {
        self.targets()?.single(what)
    }
}

// Options of the scenarios that send traffic.
#[derive(Args, Clone)]
struct TrafficArgs {
    /// How long the measured window lasts.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Sending before the measured window; its sends count in no figure.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// After sending stops, wait at most this long for outstanding results and deliveries.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Time-to-live of the durable envelopes, in seconds.
    #[arg(long = "ttl", default_value_t = 3600)]
    ttl_secs: u32,
    /// Ack as soon as this many deliveries are pending...
    #[arg(long, default_value_t = 64)]
    ack_batch: usize,
    /// ...or when the oldest pending delivery has waited this long.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    ack_delay: Duration,
    /// Report the CPU time these processes use during the measured window, summed per
    /// class: `--cpu brokers=PID,PID --cpu nats=PID` (this process is reported as `loadgen`).
    #[arg(long = "cpu", value_name = "CLASS=PID,...", value_parser = parse_cpu_class)]
    cpu: Vec<CpuClass>,
}

#[derive(Args, Clone)]
struct AppendsArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    traffic: TrafficArgs,
    /// Sender accounts, one connection each.
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// Recipient accounts (never connected); each send picks one at random. Many recipients
    /// keep queues below their quota.
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Sends outstanding per connection.
    #[arg(long, default_value_t = 32)]
    pipeline: usize,
    /// Ciphertext bytes per envelope (at least 8).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// After sending stops, connect every recipient's device and drain (and ack) its queue:
    /// reports how long draining all of them took.
    #[arg(long)]
    drain: bool,
    /// Send exactly this many envelopes to every recipient (send number k to recipient
    /// k mod --recipients), with no warm-up, instead of sending for --duration (which then
    /// only caps the run): issue 11's W2 (1,000 offline users x 100).
    #[arg(long)]
    per_recipient: Option<u64>,
}

#[derive(Args, Clone)]
struct E2eArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    traffic: TrafficArgs,
    /// Accounts, one device and one connection each.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Ciphertext bytes per envelope (at least 8; the first 8 carry the send timestamp).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Total sends per second, spread evenly over the devices (open loop); 0: closed loop,
    /// as fast as the pipeline allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Sends outstanding per device [default: 1 in closed loop, 64 (a cap) in open loop].
    #[arg(long)]
    pipeline: Option<usize>,
}

#[derive(Args, Clone)]
struct FederatedArgs {
    #[command(flatten)]
    e2e: E2eArgs,
    /// The second broker's base URL (loopback only); it federates with the first.
    #[arg(long)]
    peer_url: String,
    /// The second broker's domain.
    #[arg(long)]
    peer_domain: String,
}

#[derive(Args, Clone)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Idle authenticated connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// The broker's process id, to read its VmRSS from /proc/PID/status.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Devices per account (connections are spread over connections/this accounts).
    #[arg(long, default_value_t = 1)]
    devices_per_account: usize,
    /// Bound on waiting for the broker's RSS to stop changing (before and after connecting).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    settle_timeout: Duration,
    /// Keep the connections open this long after RSS settled, then check they are still open.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hold: Duration,
}

#[derive(Args, Clone)]
struct EncryptedArgs {
    #[command(flatten)]
    common: Common,
    /// Sender/receiver pairs; each client is its own account with one device.
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// How long the senders send.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Text bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// After sending stops, bound on waiting for the receivers.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

#[derive(Args, Clone)]
struct BlobsArgs {
    #[command(flatten)]
    common: Common,
    /// MiB of the large attachment.
    #[arg(long, default_value_t = 200)]
    large_mib: usize,
    /// MiB of each upload piece (at most 4).
    #[arg(long, default_value_t = 4)]
    piece_mib: usize,
    /// Small attachments uploaded at once.
    #[arg(long, default_value_t = 100)]
    small_count: usize,
    /// KiB of each small attachment.
    #[arg(long, default_value_t = 1024)]
    small_kib: usize,
}

#[derive(Args, Clone)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Group sizes (member accounts besides the sender), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    members: Vec<usize>,
    /// Connected devices per member account.
    #[arg(long, default_value_t = 2)]
    devices_per_account: usize,
    /// Messages per group size and mode.
    #[arg(long, default_value_t = 20)]
    messages: usize,
    /// Ciphertext bytes of the group message (an MLS application message).
    #[arg(long, default_value_t = 250)]
    group_size: usize,
    /// Ciphertext bytes of one device's copy of a 1:1 message (Olm, sealed).
    #[arg(long, default_value_t = 400)]
    copy_size: usize,
    /// The broker's process id, for its CPU time.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Bound on waiting for one message to reach every device.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
}

fn main() -> Result<()> {
    util::init_clock();
    let cli = Cli::parse();
    if let Scenario::Plot(a) = &cli.scenario {
        return plot::plot(&a.input, &a.output);
    }
    let threads = match &cli.scenario {
        Scenario::Appends(a) => a.common.threads,
        Scenario::E2e(a) => a.common.threads,
        Scenario::Federated(a) => a.e2e.common.threads,
        Scenario::Idle(a) => a.common.threads,
        Scenario::Encrypted(a) => a.common.threads,
        Scenario::Fanout(a) => a.common.threads,
        Scenario::Blobs(a) => a.common.threads,
        Scenario::Ejabberd { workload } | Scenario::Nats { workload } => workload.common().threads,
        Scenario::Plot(_) => 1,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = builder.build().context("starting the tokio runtime")?;
    let (name, fields) = runtime.block_on(async {
        match &cli.scenario {
            Scenario::Appends(a) => {
                Ok::<_, anyhow::Error>(("appends", scenarios::appends(a).await?))
            }
            Scenario::E2e(a) => Ok(("e2e", scenarios::e2e(a).await?)),
            Scenario::Federated(a) => Ok(("federated", scenarios::federated(a).await?)),
            Scenario::Idle(a) => Ok(("idle", idle::idle(a).await?)),
            Scenario::Encrypted(a) => Ok(("encrypted", encrypted::encrypted(a).await?)),
            Scenario::Fanout(a) => Ok(("fanout", fanout::fanout(a).await?)),
            Scenario::Blobs(a) => Ok(("blobs", blobs::blobs(a).await?)),
            Scenario::Ejabberd { workload } => Ok((
                match workload.name() {
                    "e2e" => "ejabberd-e2e",
                    "appends" => "ejabberd-appends",
                    _ => "ejabberd-idle",
                },
                xmpp::run(workload).await?,
            )),
            Scenario::Nats { workload } => Ok((
                match workload.name() {
                    "e2e" => "nats-e2e",
                    "appends" => "nats-appends",
                    _ => "nats-idle",
                },
                jetstream::run(workload).await?,
            )),
            Scenario::Plot(_) => unreachable!("drawn above, without a runtime"),
        }
    })?;
    println!("{}", json_line(name, fields));
    // Connections still closing must not hold the process up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cli_parses_the_documented_invocations() {
        let url = "--url=http://127.0.0.1:1";
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "appends",
            url,
            "--senders",
            "64",
            "--duration",
            "10s",
            "--size",
            "256",
            "--pipeline",
            "32",
            "--recipients",
            "100",
        ])
        .unwrap();
        assert!(matches!(cli.scenario, Scenario::Appends(ref a) if a.recipients == 100));
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "e2e",
            url,
            "--devices",
            "1000",
            "--size",
            "256",
            "--duration",
            "10s",
            "--rate",
            "5000",
            "--cpu",
            "brokers=10,11",
            "--cpu",
            "nats=12",
        ])
        .unwrap();
        assert!(
            matches!(cli.scenario, Scenario::E2e(ref a) if a.rate == 5000 && a.pipeline.is_none()
                && a.traffic.cpu.len() == 2)
        );
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "e2e",
            "--url",
            "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3",
            "--devices",
            "200",
        ])
        .unwrap();
        assert!(
            matches!(cli.scenario, Scenario::E2e(ref a) if a.common.targets().unwrap().len() == 3)
        );
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "idle",
            url,
            "--connections",
            "10000",
            "--broker-pid",
            "42",
        ])
        .unwrap();
        assert!(matches!(cli.scenario, Scenario::Idle(ref a) if a.broker_pid == Some(42)));
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "federated",
            url,
            "--domain",
            "a.example",
            "--peer-url",
            "http://127.0.0.2:1",
            "--peer-domain",
            "b.example",
            "--devices",
            "200",
        ])
        .unwrap();
        assert!(matches!(cli.scenario, Scenario::Federated(ref a) if a.e2e.devices == 200));
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "encrypted",
            url,
            "--pairs",
            "4",
            "--duration",
            "5s",
        ])
        .unwrap();
        assert!(matches!(cli.scenario, Scenario::Encrypted(ref a) if a.pairs == 4));
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "fanout",
            url,
            "--members",
            "10,100",
            "--broker-pid",
            "7",
        ])
        .unwrap();
        assert!(matches!(cli.scenario, Scenario::Fanout(ref a)
            if a.members == [10, 100] && a.broker_pid == Some(7) && a.devices_per_account == 2));
    }

    #[test]
    fn cli_parses_the_comparison_invocations() {
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "appends",
            "--url=http://127.0.0.1:1",
            "--recipients",
            "1000",
            "--per-recipient",
            "100",
            "--drain",
        ])
        .unwrap();
        assert!(
            matches!(cli.scenario, Scenario::Appends(ref a) if a.per_recipient == Some(100) && a.drain)
        );
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "ejabberd",
            "e2e",
            "--url",
            "ws://127.0.0.1:5280/ws",
            "--devices",
            "1000",
            "--rate",
            "1500",
            "--cpu",
            "server=42",
        ])
        .unwrap();
        assert!(matches!(cli.scenario,
            Scenario::Ejabberd { workload: Workload::E2e(ref a) } if a.rate == 1500 && a.devices == 1000));
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "nats",
            "appends",
            "--url",
            "nats://127.0.0.1:4222",
            "--per-recipient",
            "100",
            "--drain",
        ])
        .unwrap();
        assert!(matches!(cli.scenario,
            Scenario::Nats { workload: Workload::Appends(ref a) } if a.recipients == 1000 && a.drain));
        let cli = Cli::try_parse_from([
            "sealpost-loadtest",
            "nats",
            "idle",
            "--url",
            "nats://127.0.0.1:4222",
            "--connections",
            "19500",
            "--server-pid",
            "7",
        ])
        .unwrap();
        assert!(matches!(cli.scenario,
            Scenario::Nats { workload: Workload::Idle(ref a) } if a.server_pid == Some(7)));
    }
}
