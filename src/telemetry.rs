//! Logs and metrics.
//!
//! Logs carry metadata only — sizes, counts, digests, device ids of the authenticated
//! connection — never ciphertext, tokens, keys or who sent what to whom.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use serde::Deserialize;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber (stderr).
pub fn init_tracing(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        // Colour codes only for a person at a terminal (unless NO_COLOR), never into files or
        // journald.
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(
                        std::io::IsTerminal::is_terminal(&std::io::stderr())
                            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
                    )
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    // Already installed (tests starting several brokers in one process): keep the first.
    let _ = result;
}

/// Bucket bounds, in seconds, of `sealpost_append_seconds` (send received → durable) and of
/// any latency histogram without bounds of its own. The alert thresholds (250 ms for appends)
/// are bounds, so `histogram_quantile` is exact there.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds, in seconds, of `sealpost_flush_seconds` (one flush + fsync): from a fast
/// NVMe fsync (~100 µs) to a stalling network volume; 100 ms is the alert threshold.
const FLUSH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Bucket bounds of `sealpost_flush_batch_size` (durability requests per flush).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// Bucket bounds of `sealpost_queue_depth` (envelopes queued for a device after an append).
/// 40,000 and 50,000 are 80 % and 100 % of the example configs' `queue_quota`.
const QUEUE_DEPTH_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1_000.0,
    5_000.0,
    10_000.0,
    20_000.0,
    30_000.0,
    40_000.0,
    50_000.0,
    100_000.0,
    1_000_000.0,
];

/// Bucket bounds of `sealpost_batch_frames` (deliveries carried by one batched WebSocket
/// message; a batch has at least two, at most `MAX_BATCH_FRAMES`).
const BATCH_FRAME_BUCKETS: &[f64] = &[2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Send received → durable, for every send and federation put: one per delivered envelope.
pub static APPEND_SECONDS: FixedHistogram = FixedHistogram::new(
    "sealpost_append_seconds",
    "Send received to durable",
    LATENCY_BUCKETS,
    1e9,
);

/// A device queue's depth after each append: one per stored copy.
pub static QUEUE_DEPTH: FixedHistogram = FixedHistogram::new(
    "sealpost_queue_depth",
    "Per-device queue depth after each append",
    QUEUE_DEPTH_BUCKETS,
    1.0,
);

/// Deliveries carried by one batched WebSocket message.
pub static BATCH_FRAMES: FixedHistogram = FixedHistogram::new(
    "sealpost_batch_frames",
    "Deliveries carried by one batched WebSocket message (single deliveries are not counted)",
    BATCH_FRAME_BUCKETS,
    1.0,
);

/// The histograms kept by [`FixedHistogram`] rather than the exporter, rendered after it.
const FIXED_HISTOGRAMS: [&FixedHistogram; 3] = [&APPEND_SECONDS, &QUEUE_DEPTH, &BATCH_FRAMES];

/// The [`FixedHistogram`]s in Prometheus's text format, for the `/metrics` body.
pub fn fixed_histograms() -> String {
    let mut out = String::new();
    for histogram in FIXED_HISTOGRAMS {
        histogram.render(&mut out);
    }
    out
}

/// Most bounds a [`FixedHistogram`] takes.
const MAX_BOUNDS: usize = 16;

/// A Prometheus histogram whose buckets are atomic counters: recording a value is a search
/// of the bounds and two relaxed additions, with nothing allocated and nothing kept per
/// sample. The distributions recorded for every envelope use it. The exporter's histograms
/// keep each sample in a shared list until an upkeep folds it into buckets; three of those
/// per delivered envelope took 2.2 % of the broker's CPU at 10,000/s (`loadtest/JOURNAL.md`,
/// "2026-12-08 (11)").
pub struct FixedHistogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    /// From a recorded value to the integer units `sum` is kept in (nanoseconds for
    /// seconds): an atomic float would need a compare-and-swap loop per addition.
    scale: f64,
    /// Observations per bucket, not cumulative: `counts[i]` holds the values at most
    /// `bounds[i]` and above the bound before it; `counts[bounds.len()]` the values above
    /// every bound.
    counts: [AtomicU64; MAX_BOUNDS + 1],
    sum: AtomicU64,
}

impl FixedHistogram {
    /// A histogram with empty buckets. `bounds` ascend; `scale` turns a value into the
    /// integer units its sum is kept in.
    pub const fn new(
        name: &'static str,
        help: &'static str,
        bounds: &'static [f64],
        scale: f64,
    ) -> Self {
        assert!(bounds.len() <= MAX_BOUNDS, "too many bounds");
        FixedHistogram {
            name,
            help,
            bounds,
            scale,
            counts: [const { AtomicU64::new(0) }; MAX_BOUNDS + 1],
            sum: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn record(&self, value: f64) {
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        // `as` saturates, which is the rounding wanted: a negative or NaN value adds nothing
        // to the sum, a huge one at most `u64::MAX` units.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let units = (value * self.scale).round() as u64;
        self.sum.fetch_add(units, Ordering::Relaxed);
    }

    /// Records a duration, in seconds.
    pub fn record_duration(&self, elapsed: Duration) {
        self.record(elapsed.as_secs_f64());
    }

    /// Appends the histogram in Prometheus's text format: cumulative buckets, the sum and
    /// the count (the `+Inf` bucket's, so that a scrape racing a record stays consistent).
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = self.name;
        let _ = write!(
            out,
            "# HELP {name} {}\n# TYPE {name} histogram\n",
            self.help
        );
        let mut total = 0;
        for (i, count) in self.counts[..=self.bounds.len()].iter().enumerate() {
            total += count.load(Ordering::Relaxed);
            // Writing to a String cannot fail.
            let _ = match self.bounds.get(i) {
                Some(bound) => writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {total}"),
                None => writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}"),
            };
        }
        let sum = self.sum.load(Ordering::Relaxed) as f64 / self.scale;
        let _ = write!(out, "{name}_sum {sum}\n{name}_count {total}\n\n");
    }
}

/// How often the histograms' recorded samples are folded into their buckets.
pub const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The Prometheus exporter with the broker's bucket bounds, not yet installed.
///
/// Distributions are Prometheus histograms, not summaries: quantiles are computed by
/// `histogram_quantile` over any window and can be aggregated across brokers (scale-out).
fn metrics_builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("sealpost_flush_seconds".into()),
            FLUSH_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("sealpost_flush_batch_size".into()),
            BATCH_BUCKETS,
        )
}

/// Installs the global Prometheus recorder, keeps it up (`keep_up`), describes every
/// metric and registers the series that exist from the start (`register`). `None` if
/// a recorder is already installed (tests start several brokers in one process) or cannot
/// be built.
pub fn init_metrics() -> Option<PrometheusHandle> {
    let handle = metrics_builder().ok()?.install_recorder().ok()?;
    keep_up(handle.clone(), METRICS_UPKEEP_EVERY);
    describe();
    register();
    Some(handle)
}

/// Folds the samples recorded into `handle`'s histograms into their buckets every `every`,
/// on a thread of its own, for as long as the process runs.
///
/// The exporter keeps every sample it is given until then (a scrape does it too, which is
/// all that did it before): a broker that nobody scraped held two 16-byte samples per
/// delivered envelope for good (`loadtest/JOURNAL.md`, "2026-12-07 (8)").
fn keep_up(handle: PrometheusHandle, every: Duration) {
    let every = every.max(Duration::from_millis(1));
    let started = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                handle.run_upkeep();
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
    }
}

/// Counters that carry no label and start at zero.
const COUNTERS: &[&str] = &[
    "sealpost_appends_total",
    "sealpost_deliveries_total",
    "sealpost_redeliveries_total",
    "sealpost_acks_total",
    "sealpost_acks_durable_total",
    "sealpost_expirations_total",
    "sealpost_ephemeral_total",
    "sealpost_flush_failures_total",
    "sealpost_sends_to_changed_devices_total",
    "sealpost_turn_credentials_total",
    "sealpost_store_keys_created_total",
    "sealpost_store_keys_adopted_total",
    "sealpost_store_keys_destroyed_total",
    "sealpost_store_key_rotations_total",
    "sealpost_store_reopens_total",
    "sealpost_corrupt_records_total",
    "sealpost_shredded_records_removed_total",
    "sealpost_torn_sends_rolled_back_total",
    "sealpost_queues_recounted_total",
];

/// Gauges that are zero until something happens (the scrape handler sets the rest).
const GAUGES: &[&str] = &[
    "sealpost_connections",
    "sealpost_mailboxes",
    "sealpost_undecodable_index_entries",
];

/// The exporter's histograms (the per-envelope ones are [`FixedHistogram`]s), present with
/// empty buckets before their first observation.
const HISTOGRAMS: &[&str] = &[
    "sealpost_flush_seconds",
    "sealpost_nats_publish_seconds",
    "sealpost_flush_batch_size",
];

/// Makes every series that does not depend on configuration exist from the first scrape:
/// counters at 0 (so `rate()` and `increase()` see the first event after the first scrape),
/// gauges at 0, histograms with empty buckets, the
/// reject and disconnect counters for every reason the wire protocol knows, and
/// `sealpost_build_info`. Per-peer federation series appear with their peer actors.
fn register() {
    use sealpost_proto::{CloseCode, ErrorCode};
    for name in COUNTERS {
        metrics::counter!(*name).increment(0);
    }
    for name in GAUGES {
        metrics::gauge!(*name).set(0.0);
    }
    for name in HISTOGRAMS {
        // Registering is enough: the exporter renders a registered histogram's buckets at 0.
        let _ = metrics::histogram!(*name);
    }
    register_labels(
        "sealpost_rejects_total",
        "reason",
        ErrorCode::ALL.iter().map(|c| c.as_str()),
    );
    register_labels(
        "sealpost_disconnects_total",
        "reason",
        CloseCode::ALL
            .iter()
            .map(|c| c.as_str())
            .chain(["write_stalled"]),
    );
    register_labels(
        "sealpost_unauthenticated_refused_total",
        "scope",
        ["source", "total"],
    );
    metrics::gauge!("sealpost_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Registers `name{label=value}` at 0 for each value.
pub fn register_labels(
    name: &'static str,
    label: &'static str,
    values: impl IntoIterator<Item = &'static str>,
) {
    for value in values {
        metrics::counter!(name, label => value).increment(0);
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("sealpost_connections", "Authenticated device connections");
    describe_gauge!("sealpost_mailboxes", "Live mailbox actors");
    describe_gauge!("sealpost_mailboxes_registered", "Mailboxes in the registry");
    describe_gauge!(
        "sealpost_websocket_sessions",
        "WebSocket session tasks running: device, sealed and inbound federation, authenticated or not"
    );
    describe_gauge!(
        "sealpost_unauthenticated_sessions",
        "WebSocket connections not authenticated yet (/v1/ws before auth, /v1/federation before its handshake)"
    );
    describe_counter!(
        "sealpost_unauthenticated_refused_total",
        "Upgrades refused because too many connections were unauthenticated (scope: source or total)"
    );
    describe_gauge!(
        "sealpost_socket_buffered_bytes",
        Unit::Bytes,
        "Bytes of partly received WebSocket messages held by all connections (capped by socket_buffer_mb)"
    );
    describe_counter!(
        "sealpost_acks_durable_total",
        "Acknowledged envelopes whose deletion is durable (acks are not answered; this is when a crash can no longer bring them back)"
    );
    describe_gauge!("sealpost_ready", "1 when /readyz answers 200, else 0");
    describe_gauge!(
        "sealpost_disk_free_bytes",
        Unit::Bytes,
        "Free space on the data directory's file system"
    );
    describe_histogram!("sealpost_flush_seconds", Unit::Seconds, "One flush + fsync");
    describe_histogram!(
        "sealpost_nats_publish_seconds",
        Unit::Seconds,
        "With the NATS store: one envelope copy published until the stream acknowledged it (replicated)"
    );
    describe_histogram!(
        "sealpost_flush_batch_size",
        "Durability requests served by one flush"
    );
    describe_counter!("sealpost_appends_total", "Envelope copies made durable");
    describe_counter!("sealpost_deliveries_total", "Envelopes pushed to devices");
    describe_counter!(
        "sealpost_redeliveries_total",
        "Pushes of envelopes pushed before"
    );
    describe_counter!("sealpost_acks_total", "Envelopes acknowledged and deleted");
    describe_counter!(
        "sealpost_expirations_total",
        "Envelopes deleted by TTL expiry"
    );
    describe_counter!(
        "sealpost_ephemeral_total",
        "Ephemeral envelopes pushed (never stored)"
    );
    describe_counter!("sealpost_rejects_total", "Refused requests, by reason");
    describe_counter!(
        "sealpost_disconnects_total",
        "Connections closed by the broker, by reason"
    );
    describe_counter!("sealpost_flush_failures_total", "Flushes that failed");
    describe_counter!(
        "sealpost_sends_to_changed_devices_total",
        "Federated sends naming a device set that had changed, delivered to its devices that remain"
    );
    describe_counter!(
        "sealpost_turn_credentials_total",
        "TURN credentials minted for devices"
    );
    describe_counter!(
        "sealpost_store_keys_created_total",
        "Queue keys created in the keyring (crypto-shredding), spares included"
    );
    describe_counter!(
        "sealpost_store_keys_adopted_total",
        "Spare keys taken by new device queues (no keyring sync on the writer's thread)"
    );
    describe_counter!(
        "sealpost_store_keys_destroyed_total",
        "Queue keys destroyed, shredding what they sealed"
    );
    describe_counter!(
        "sealpost_store_key_rotations_total",
        "Queue keys retired because they reached store_key_max_age_secs"
    );
    describe_counter!(
        "sealpost_store_reopens_total",
        "Times the store was reopened after an I/O error"
    );
    describe_counter!(
        "sealpost_corrupt_records_total",
        "Expired records that did not decode, deleted by the expiry sweep"
    );
    describe_gauge!(
        "sealpost_undecodable_index_entries",
        "Due expiry index entries the last whole scan could not decode (skipped and kept)"
    );
    describe_counter!(
        "sealpost_shredded_records_removed_total",
        "Deleted records brought back by a crash without their (destroyed) key, removed at open"
    );
    describe_counter!(
        "sealpost_torn_sends_rolled_back_total",
        "Envelopes of sends cut short by a crash, rolled back at open"
    );
    describe_counter!(
        "sealpost_queues_recounted_total",
        "Users whose queues were counted again on opening: their last writer did not close them (a crash, or an older data directory)"
    );
    describe_gauge!(
        "sealpost_build_info",
        "Always 1; the version label is the broker's version"
    );
}

/// The standard `process_*` metrics of the Prometheus client libraries, read from
/// `/proc/self` at each scrape and rendered in the text format (appended to the recorder's
/// output: the `metrics` crate has no floating-point counter for CPU seconds). Empty where
/// `/proc` cannot be read (not Linux).
pub fn process_metrics() -> String {
    let Some(p) = ProcessStats::read() else {
        return String::new();
    };
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: f64| {
        use std::fmt::Write;
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    };
    put(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    put(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes as f64,
    );
    put(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_bytes as f64,
    );
    put(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
    put(
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        p.threads as f64,
    );
    if let Some(fds) = p.open_fds {
        put(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds as f64,
        );
    }
    if let Some(max) = p.max_fds {
        put(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max as f64,
        );
    }
    out
}

/// What [`process_metrics`] reports, read from `/proc/self/stat`, `/proc/stat`,
/// `/proc/self/fd` and `/proc/self/limits`.
#[derive(Debug, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
    threads: u64,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

impl ProcessStats {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let mut stats = Self::parse(
            &stat,
            &boot,
            rustix::param::clock_ticks_per_second(),
            rustix::param::page_size() as u64,
        )?;
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64);
        stats.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| parse_max_open_files(&l));
        Some(stats)
    }

    /// Parses `/proc/self/stat` (proc(5): fields after the parenthesised command name,
    /// which may itself hold spaces and parentheses) and the `btime` line of `/proc/stat`.
    fn parse(stat: &str, proc_stat: &str, ticks_per_second: u64, page_size: u64) -> Option<Self> {
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        // fields[0] is field 3 (state): field n is fields[n - 3].
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks = ticks_per_second.max(1) as f64;
        let boot_time: u64 = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            threads: field(20)?,
            start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page_size,
            open_fds: None,
            max_fds: None,
        })
    }
}

/// The soft limit of the `Max open files` line of `/proc/self/limits`.
fn parse_max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Counts a refused request; `reason` is a stable error-code name.
pub fn reject(reason: &'static str) {
    metrics::counter!("sealpost_rejects_total", "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_histogram_renders_cumulative_buckets_its_sum_and_count() {
        static BOUNDS: &[f64] = &[0.001, 0.01, 1.0];
        let h = FixedHistogram::new("t_seconds", "A test", BOUNDS, 1e9);
        // A value equal to a bound belongs to that bound's bucket (Prometheus's `le`).
        for v in [0.0005, 0.001, 0.005, 0.5, 2.0] {
            h.record(v);
        }
        h.record_duration(Duration::from_millis(3));
        let mut text = String::new();
        h.render(&mut text);
        assert_eq!(
            text,
            "# HELP t_seconds A test\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{le=\"0.001\"} 2\n\
             t_seconds_bucket{le=\"0.01\"} 4\n\
             t_seconds_bucket{le=\"1\"} 5\n\
             t_seconds_bucket{le=\"+Inf\"} 6\n\
             t_seconds_sum 2.5095\n\
             t_seconds_count 6\n\n"
        );
    }

    #[test]
    fn the_per_envelope_histograms_are_rendered_beside_the_exporters() {
        let text = fixed_histograms();
        for name in [
            "sealpost_append_seconds",
            "sealpost_queue_depth",
            "sealpost_batch_frames",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} histogram\n")),
                "{text}"
            );
            assert!(
                text.contains(&format!("{name}_bucket{{le=\"+Inf\"}} ")),
                "{text}"
            );
        }
        // The alert rules' thresholds are bounds, so their quantiles are exact there.
        assert!(
            text.contains("sealpost_append_seconds_bucket{le=\"0.25\"} "),
            "{text}"
        );
        assert!(
            text.contains("sealpost_queue_depth_bucket{le=\"40000\"} "),
            "{text}"
        );
        assert!(
            text.contains("sealpost_queue_depth_bucket{le=\"50000\"} "),
            "{text}"
        );
    }

    #[test]
    fn proc_stat_is_parsed_past_a_command_name_with_spaces_and_parentheses() {
        // proc(5) fields 1..=24 of a process whose command is "a) b (c": utime 250 ticks,
        // stime 50, 7 threads, started 1000 ticks after boot, 4 MiB virtual, 300 pages resident.
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 \
                    4194304 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let got = ProcessStats::parse(stat, proc_stat, 100, 4096).expect("parses");
        assert_eq!(
            got,
            ProcessStats {
                cpu_seconds: 3.0,
                resident_bytes: 300 * 4096,
                virtual_bytes: 4_194_304,
                start_time_seconds: 1_700_000_010.0,
                threads: 7,
                open_fds: None,
                max_fds: None,
            }
        );
        assert_eq!(
            ProcessStats::parse("42 (x) S 1", proc_stat, 100, 4096),
            None
        );
    }

    #[test]
    fn max_open_files_is_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files("Max open files unlimited unlimited files"),
            None
        );
    }

    #[test]
    fn this_process_reports_its_memory_cpu_and_descriptors() {
        let text = process_metrics();
        if !std::path::Path::new("/proc/self/stat").exists() {
            assert!(text.is_empty());
            return;
        }
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            let value: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing from {text}"))
                .parse()
                .expect("a number");
            assert!(value >= 0.0, "{name} = {value}");
        }
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
    }
}
