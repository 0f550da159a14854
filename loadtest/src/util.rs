//! Small helpers: the process-wide clock, argument parsing, target checks, `/proc` readers,
//! latency histograms and the output format.

use std::{
    net::IpAddr,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::StdRng};
use reqwest::Url;
use serde_json::{Value, json};

static BASE: OnceLock<Instant> = OnceLock::new();

/// Fixes the process-wide time base. Called first thing in `main`.
pub(crate) fn init_clock() {
    BASE.get_or_init(Instant::now);
}

/// Nanoseconds since the process-wide base. Timestamps carried in ciphertexts and envelope ids
/// use this clock, so they are only meaningful inside this process.
pub(crate) fn now_ns() -> u64 {
    instant_ns(Instant::now())
}

/// An instant as nanoseconds since the process-wide base (0 for instants before it).
pub(crate) fn instant_ns(t: Instant) -> u64 {
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// Parses `10s`, `500ms`, `2m`, `1.5s`, `250us` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} (use ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Displays a duration the way the CLI accepts it.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The broker's base URL, checked to be plain HTTP on a loopback address: this tool never
/// sends load anywhere else.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `http://host:port`, without a trailing slash.
    pub(crate) http: String,
    /// `ws://host:port/v1/ws?batch=1`: this client reads `batch` messages.
    pub(crate) ws: String,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        // The load generator speaks no TLS, and sends load to loopback addresses only.
        let parsed = Url::parse(&loopback_url(url, "http")?)?;
        let host = parsed.host_str().context("--url has no host")?;
        let port = parsed
            .port_or_known_default()
            .context("--url has no port")?;
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Target {
            http: format!("http://{authority}"),
            ws: format!("ws://{authority}/v1/ws?batch=1"),
        })
    }
}

/// Checks that `url` (the broker's, or another server's for the comparison scenarios) uses
/// `scheme` and a loopback host; returns it unchanged.
pub(crate) fn loopback_url(url: &str, scheme: &str) -> Result<String> {
    let parsed = Url::parse(url).with_context(|| format!("invalid --url {url:?}"))?;
    if parsed.scheme() != scheme {
        bail!("--url must be {scheme}://, got {url:?}");
    }
    let host = parsed.host_str().context("--url has no host")?;
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("--url must point at a loopback address (127.0.0.0/8, ::1, localhost), got {host}");
    }
    Ok(url.to_owned())
}

/// The brokers a run targets, from `--url`: one, or several pods serving the same domain
/// over a shared store (NATS JetStream). Account `i` registers through, and its device
/// connects to, broker `i mod n` (round-robin), so with `n` pods a random recipient sits on
/// another pod than its sender `(n - 1) / n` of the time.
#[derive(Debug, Clone)]
pub(crate) struct Targets(Vec<Target>);

impl Targets {
    /// One URL or several, comma-separated; each is checked like [`Target::parse`].
    pub(crate) fn parse(list: &str) -> Result<Self> {
        let targets = list
            .split(',')
            .map(|url| Target::parse(url.trim()))
            .collect::<Result<Vec<_>>>()?;
        for (i, t) in targets.iter().enumerate() {
            if targets[..i].iter().any(|earlier| earlier.http == t.http) {
                bail!("--url names {} twice", t.http);
            }
        }
        Ok(Targets(targets))
    }

    /// A single broker.
    pub(crate) fn one(target: Target) -> Self {
        Targets(vec![target])
    }

    /// How many brokers (at least 1).
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The broker of account or connection number `i`: round-robin.
    pub(crate) fn of(&self, i: usize) -> &Target {
        &self.0[i % self.0.len()]
    }

    /// All of them, in `--url` order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Target> {
        self.0.iter()
    }

    /// The only broker, for what measures one broker; `what` says why in the error.
    pub(crate) fn single(mut self, what: &str) -> Result<Target> {
        if self.0.len() != 1 {
            bail!("{what} takes one --url, got {}", self.0.len());
        }
        Ok(self.0.remove(0))
    }

    /// The base URLs, comma-separated, for banners.
    pub(crate) fn describe(&self) -> String {
        let urls: Vec<&str> = self.0.iter().map(|t| t.http.as_str()).collect();
        urls.join(", ")
    }
}

/// A short random tag that keeps this run's handles apart from any earlier run's on the same
/// broker.
pub(crate) fn run_tag() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = StdRng::from_entropy();
    (0..6)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

/// Fails early, with the fix, when this process may not open `needed` file descriptors.
pub(crate) fn check_nofile(needed: u64) -> Result<()> {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return Ok(());
    };
    let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) else {
        return Ok(());
    };
    let soft = line["Max open files".len()..]
        .split_whitespace()
        .next()
        .unwrap_or("unlimited");
    if soft == "unlimited" {
        return Ok(());
    }
    let soft: u64 = soft.parse().unwrap_or(u64::MAX);
    if soft < needed {
        bail!(
            "this run needs about {needed} open files but RLIMIT_NOFILE is {soft}; \
             run `ulimit -n 65536` in the shell that starts both the broker and the load \
             generator (loadtest/run.sh does)"
        );
    }
    Ok(())
}

/// The resident set size of process `pid`, in KiB, from `/proc/PID/status`.
pub(crate) fn read_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS line in {path}"))?;
    let kib = line["VmRSS:".len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unparsable VmRSS line {line:?}"))?;
    Ok(kib)
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/<pid>/stat`.
pub(crate) fn read_cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces; count from the `)` that ends it.
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("unparsable {path}"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no field {} in {path}", i + 3))
    };
    // In USER_HZ, which Linux fixes at 100 for /proc.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// Processes whose CPU time a traffic run reports over its measured window, summed as one
/// class: `--cpu brokers=PID,PID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuClass {
    pub(crate) name: String,
    pub(crate) pids: Vec<u32>,
}

/// The name of this process's own class in CPU reports.
pub(crate) const LOADGEN_CLASS: &str = "loadgen";

/// Parses `NAME=PID,PID,...`.
pub(crate) fn parse_cpu_class(s: &str) -> Result<CpuClass, String> {
    let (name, pids) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID,PID..., got {s:?}"))?;
    let name = name.trim();
    if name.is_empty() || name == LOADGEN_CLASS {
        return Err(format!("class name {name:?} is empty or reserved"));
    }
    let pids = pids
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad pid list in {s:?}: {e}"))?;
    Ok(CpuClass {
        name: name.to_owned(),
        pids,
    })
}

/// CPU time used so far by each class (summed over its processes; one that has exited counts
/// 0), then by this process.
pub(crate) fn cpu_sample(classes: &[CpuClass]) -> Vec<Duration> {
    let mut sample: Vec<Duration> = classes
        .iter()
        .map(|c| {
            c.pids
                .iter()
                .map(|&pid| read_cpu_time(pid).unwrap_or_default())
                .sum()
        })
        .collect();
    sample.push(read_cpu_time(std::process::id()).unwrap_or_default());
    sample
}

/// A latency histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

fn us_to_ms(us: u64) -> f64 {
    // Latencies are far below 2^52 µs, so the conversion is exact.
    #[allow(clippy::cast_precision_loss)]
    let us = us as f64;
    us / 1000.0
}

/// One human-readable line of latency quantiles.
pub(crate) fn latency_line(name: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("  {name}: no samples");
    }
    format!(
        "  {name} (ms): p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}  (n={})",
        us_to_ms(h.value_at_quantile(0.5)),
        us_to_ms(h.value_at_quantile(0.99)),
        us_to_ms(h.value_at_quantile(0.999)),
        us_to_ms(h.max()),
        h.mean() / 1000.0,
        h.len(),
    )
}

/// Latency quantiles as JSON, in milliseconds (null when there are no samples).
pub(crate) fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0, "p50_ms": null, "p99_ms": null, "p999_ms": null,
                      "max_ms": null, "mean_ms": null});
    }
    json!({
        "count": h.len(),
        "p50_ms": us_to_ms(h.value_at_quantile(0.5)),
        "p99_ms": us_to_ms(h.value_at_quantile(0.99)),
        "p999_ms": us_to_ms(h.value_at_quantile(0.999)),
        "max_ms": us_to_ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

/// `count / secs`, rounded to 0.1 (0 for an empty window).
pub(crate) fn per_sec(count: u64, window: Duration) -> f64 {
    let secs = window.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let count = count as f64;
    (count / secs * 10.0).round() / 10.0
}

/// The final machine-readable line: `{"scenario":NAME, ...fields}` with `scenario` first.
pub(crate) fn json_line(scenario: &str, fields: Value) -> String {
    let name = Value::String(scenario.to_owned()).to_string();
    let rest = fields.to_string();
    match rest.strip_prefix('{') {
        Some("}") | None => format!("{{\"scenario\":{name}}}"),
        Some(tail) => format!("{{\"scenario\":{name},{tail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5parsecs").is_err());
    }

    #[test]
    fn targets_are_loopback_only() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.http, "http://127.0.0.1:8080");
        assert_eq!(t.ws, "ws://127.0.0.1:8080/v1/ws?batch=1");
        assert!(Target::parse("http://localhost:1/").is_ok());
        assert_eq!(
            Target::parse("http://[::1]:9/").unwrap().ws,
            "ws://[::1]:9/v1/ws?batch=1"
        );
        assert!(Target::parse("http://10.0.0.1:80").is_err());
        assert!(Target::parse("http://example.com:80").is_err());
        assert!(Target::parse("https://127.0.0.1:443").is_err());
        assert!(loopback_url("ws://127.0.0.1:5280/ws", "ws").is_ok());
        assert!(loopback_url("nats://localhost:4222", "nats").is_ok());
        assert!(loopback_url("nats://10.0.0.1:4222", "nats").is_err());
        assert!(loopback_url("wss://127.0.0.1:5280/ws", "ws").is_err());
    }

    #[test]
    fn url_lists_are_checked_and_used_round_robin() {
        let one = Targets::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one.of(0).http, one.of(7).http);
        let pods =
            Targets::parse("http://127.0.0.1:1, http://127.0.0.1:2,http://localhost:3").unwrap();
        assert_eq!(pods.len(), 3);
        let picked: Vec<&str> = (0..5).map(|i| pods.of(i).http.as_str()).collect();
        assert_eq!(
            picked,
            [
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://localhost:3",
                "http://127.0.0.1:1",
                "http://127.0.0.1:2"
            ]
        );
        assert_eq!(pods.of(4).ws, "ws://127.0.0.1:2/v1/ws?batch=1");
        // The loopback check holds for every entry; empty entries and repeats are refused.
        assert!(Targets::parse("http://127.0.0.1:1,http://10.0.0.1:2").is_err());
        assert!(Targets::parse("http://127.0.0.1:1,").is_err());
        assert!(Targets::parse("http://127.0.0.1:1,http://127.0.0.1:1/").is_err());
        assert!(pods.clone().single("idle").is_err());
        assert_eq!(one.single("idle").unwrap().http, "http://127.0.0.1:8080");
    }

    #[test]
    fn cpu_classes() {
        assert_eq!(
            parse_cpu_class("brokers=12, 34"),
            Ok(CpuClass {
                name: "brokers".into(),
                pids: vec![12, 34]
            })
        );
        assert!(parse_cpu_class("brokers").is_err());
        assert!(parse_cpu_class("=1").is_err());
        assert!(parse_cpu_class("loadgen=1").is_err());
        assert!(parse_cpu_class("nats=1,x").is_err());
        let own = cpu_sample(&[]);
        assert_eq!(own.len(), 1, "this process only");
    }

    #[test]
    fn json_line_puts_scenario_first() {
        assert_eq!(json_line("x", json!({})), r#"{"scenario":"x"}"#);
        assert_eq!(json_line("x", json!({"a": 1})), r#"{"scenario":"x","a":1}"#);
    }
}
