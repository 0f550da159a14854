//! Logs and metrics.
//!
//! Logs carry metadata only — sizes, counts, digests, device ids of the authenticated
//! connection — never ciphertext, tokens, keys or who sent what to whom.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
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
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    // Already installed (tests starting several brokers in one process): keep the first.
    let _ = result;
}

/// Installs the global Prometheus recorder and describes every metric.
pub fn init_metrics() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_quantiles(&[0.5, 0.9, 0.99, 0.999, 1.0])
        .ok()?
        .install_recorder()
        .ok()?;
    describe();
    Some(handle)
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
    describe_histogram!(
        "sealpost_queue_depth",
        "Per-device queue depth after each append"
    );
    describe_histogram!(
        "sealpost_append_seconds",
        Unit::Seconds,
        "Send received to durable"
    );
    describe_histogram!("sealpost_flush_seconds", Unit::Seconds, "One flush + fsync");
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
}

/// Counts a refused request; `reason` is a stable error-code name.
pub fn reject(reason: &'static str) {
    metrics::counter!("sealpost_rejects_total", "reason" => reason).increment(1);
}
