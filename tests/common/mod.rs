//! Test harness: spawns the real `sealpost` binary on 127.0.0.1:0 with a temp data dir, and
//! speaks real HTTP and WebSocket frames to it.

#![allow(dead_code, unreachable_pub, clippy::cast_possible_truncation)]

pub mod nats;
pub mod sdk;
pub mod site;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use futures_util::{SinkExt, StreamExt};
use sealpost_proto::{Class, ClientFrame, Copy, DeviceId, EnvelopeId, SendOutcome, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

/// How long any single wait in a test may take before the test fails. Generous: the machine is
/// shared; tests wait on conditions, this is only the give-up point.
pub const WAIT: Duration = Duration::from_secs(20);

/// The sync failpoint's file name in a test broker's directory.
const SYNC_FAILPOINT: &str = "fail-sync";

/// The withholding failpoint's file name in a test broker's directory.
const WITHHOLD_FAILPOINT: &str = "withhold-next";

/// The equivocation hook's file name in a test broker's directory.
const EQUIVOCATE_FAILPOINT: &str = "equivocate-to";

/// A broker process.
pub struct Broker {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Child,
    args: Vec<String>,
    /// Everything the broker wrote to stderr (its logs), for privacy scans.
    pub logs: Arc<Mutex<Vec<u8>>>,
    pub log_path: PathBuf,
}

impl Broker {
    /// Starts a broker with test-friendly defaults plus `args`.
    pub fn start(args: &[&str]) -> Broker {
        Broker::start_with(tempfile::tempdir().expect("tempdir"), None, args)
    }

    /// Starts a broker in `dir` (its data dir is `dir/data`), listening on `listen` (default
    /// 127.0.0.1:0).
    pub fn start_with(dir: tempfile::TempDir, listen: Option<SocketAddr>, args: &[&str]) -> Broker {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let log_path = dir.path().join("broker.log");
        let (child, addr, logs) = spawn(dir.path(), &args, &log_path, listen);
        Broker {
            dir,
            addr,
            child,
            args,
            logs,
            log_path,
        }
    }

    /// Everything the broker has logged so far. Panics if the log cannot be read or holds
    /// nothing (not even the start-up lines): a scan of the logs for secrets must not pass on
    /// an empty or missing file.
    pub fn read_logs(&self) -> Vec<u8> {
        let logs = std::fs::read(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.log_path.display()));
        assert!(
            logs.windows(b"listening".len()).any(|w| w == b"listening"),
            "the broker's log {} lacks its start-up lines",
            self.log_path.display()
        );
        logs
    }

    /// While this file exists, every flush of the broker's store fails (a test-only hook of
    /// debug builds, `SEALPOST_FAILPOINT_SYNC_FILE`).
    pub fn sync_failpoint(&self) -> PathBuf {
        self.dir.path().join(SYNC_FAILPOINT)
    }

    /// Makes the broker answer the next durable envelope as accepted and drop it, as a broker
    /// withholding a message would (a test-only hook of debug builds).
    pub fn withhold_next(&self) {
        std::fs::write(self.dir.path().join(WITHHOLD_FAILPOINT), b"").expect("arm withholding");
    }

    /// Makes the broker, from its next start, show `peers` a forked key-transparency log (a
    /// split view; a test-only hook of debug builds, read at start).
    pub fn equivocate_to(&self, peers: &[&str]) {
        std::fs::write(self.dir.path().join(EQUIVOCATE_FAILPOINT), peers.join("\n"))
            .expect("arm equivocation");
    }

    /// As [`Broker::withhold_next`], for the next envelope to `user` only.
    pub fn withhold_next_to(&self, user: &str) {
        std::fs::write(self.dir.path().join(WITHHOLD_FAILPOINT), user).expect("arm withholding");
    }

    /// Whether the envelope `withhold_next` asked for was dropped.
    pub fn withheld(&self) -> bool {
        !self.dir.path().join(WITHHOLD_FAILPOINT).exists()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The sled store of this broker's data directory, opened as the broker does (stop the
    /// broker first): what an intruder with the disk, or a damaged disk, would change.
    pub fn open_store(&self) -> sealpost::store::SledStore {
        sealpost::store::SledStore::open(&sealpost::store::StoreOptions {
            dir: self.data_dir(),
            group_commit: false,
            fsync: true,
            cache_bytes: 4 << 20,
            commit_delay: Duration::ZERO,
            min_free_bytes: 0,
            failpoint_sync: None,
            key_max_age: sealpost::store::sled::DEFAULT_KEY_MAX_AGE,
        })
        .expect("open the broker's store")
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        self.signal_term();
        self.wait_exit()
    }

    /// Sends SIGTERM without waiting: graceful shutdown begins.
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits (blocking) for the process to exit; returns the exit status success.
    pub fn wait_exit(&mut self) -> bool {
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Starts the broker again on the same data dir and port, with different extra flags.
    pub fn restart_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Starts the broker again on the same data dir and port.
    pub fn restart(&mut self) {
        let (child, addr, logs) =
            spawn(self.dir.path(), &self.args, &self.log_path, Some(self.addr));
        self.child = child;
        self.addr = addr;
        self.logs = logs;
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let body = reqwest::get(format!("{}/metrics", self.http()))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sum of the series of `name` whose labels contain `label` (e.g. `reason="idle_timeout"`).
    pub async fn metric_labeled(&self, name: &str, label: &str) -> f64 {
        let body = reqwest::get(format!("{}/metrics", self.http()))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('{'))
                    .and_then(|rest| rest.split_once('}'))
                    .is_some_and(|(labels, _)| labels.contains(label))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until the series of `name` with `label` reaches at least `value`.
    pub async fn wait_metric_labeled(&self, name: &str, label: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.metric_labeled(name, label).await >= value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metric {name}{{{label}}} never reached {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `metric` reaches at least `value`.
    pub async fn wait_metric(&self, name: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.metric(name).await >= value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metric {name} never reached {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Test-friendly defaults, each left out when `args` sets the same flag (clap refuses a flag
/// given twice).
fn defaults_not_in(args: &[String]) -> Vec<&'static str> {
    const DEFAULTS: [(&str, &str); 9] = [
        ("--domain", "test.example"),
        ("--log-level", "debug"),
        ("--ip-rate", "0"),
        ("--device-rate", "0"),
        ("--stranger-rate", "0"),
        ("--claim-rate", "0"),
        ("--shutdown-drain-ms", "200"),
        // Key transparency: an epoch as soon as a list changes, peers audited often.
        ("--transparency-epoch-ms", "20"),
        ("--transparency-audit-ms", "300"),
    ];
    DEFAULTS
        .iter()
        .filter(|(flag, _)| {
            !args
                .iter()
                .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
        })
        .flat_map(|(flag, value)| [*flag, *value])
        .collect()
}

fn spawn(
    dir: &Path,
    args: &[String],
    log_path: &Path,
    addr: Option<SocketAddr>,
) -> (Child, SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listen = addr.map_or("127.0.0.1:0".to_string(), |a| a.to_string());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("log");
    // With SEALPOST_TEST_STORE (NATS URLs, as scripts/test-all sets for a second run of the
    // delivery tests), brokers keep their state in that cluster instead of sled. Each has
    // its own server.key, so its names in the shared cluster are its own.
    let store: Vec<String> = match std::env::var("SEALPOST_TEST_STORE") {
        Ok(urls) if !urls.is_empty() && !args.iter().any(|a| a.starts_with("--store")) => {
            vec!["--store".into(), urls]
        }
        _ => Vec::new(),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        // Every flush fails while this file exists (debug builds): see `Broker::sync_failpoint`.
        .env("SEALPOST_FAILPOINT_SYNC_FILE", dir.join(SYNC_FAILPOINT))
        // The next durable envelope is dropped once this file exists: see `Broker::withhold_next`.
        .env(
            "SEALPOST_FAILPOINT_WITHHOLD_FILE",
            dir.join(WITHHOLD_FAILPOINT),
        )
        // The peers named in this file are shown a forked transparency log (debug builds): see
        // `Broker::equivocate_to`.
        .env(
            "SEALPOST_FAILPOINT_EQUIVOCATE_FILE",
            dir.join(EQUIVOCATE_FAILPOINT),
        )
        .arg("serve")
        .args(["--listen", &listen])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(defaults_not_in(args))
        .args(&store)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn sealpost");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listen line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            // The log lives in a temporary directory that is gone once the test fails: say
            // what it held (a broker that exits at start says why there).
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "unexpected first line {line:?}; the broker's log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .parse()
        .expect("address");
    (child, addr, Arc::new(Mutex::new(Vec::new())))
}

/// Whether brokers run on a NATS cluster (`SEALPOST_TEST_STORE`) rather than sled: tests
/// that look below the store (sled's files) have nothing to look at then.
pub fn nats_store() -> bool {
    std::env::var("SEALPOST_TEST_STORE").is_ok_and(|s| !s.is_empty())
}

/// Credentials of a registered device.
#[derive(Clone, Debug)]
pub struct Creds {
    pub user: String,
    pub device: DeviceId,
    pub token: Vec<u8>,
}

impl Creds {
    pub fn bearer(&self) -> String {
        format!(
            "Bearer {}.{}",
            self.device.0,
            URL_SAFE_NO_PAD.encode(&self.token)
        )
    }
}

/// Registers `user` (open registration) and returns its first device.
pub async fn register(broker: &Broker, user: &str) -> Creds {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/accounts", broker.http()))
        .json(&serde_json::json!({ "handle": user, "identity_keys": STANDARD.encode(b"keys") }))
        .send()
        .await
        .expect("register");
    assert_eq!(
        resp.status(),
        201,
        "register {user}: {}",
        resp.text().await.unwrap_or_default()
    );
    creds(resp.json().await.expect("json"))
}

/// A one-time session ticket for `creds`' device (`POST …/session-ticket`).
pub async fn session_ticket(broker: &Broker, creds: &Creds) -> Vec<u8> {
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/accounts/{}/session-ticket",
            broker.http(),
            creds.user
        ))
        .header("authorization", creds.bearer())
        .send()
        .await
        .expect("session ticket");
    assert_eq!(resp.status(), 201, "session ticket");
    let answer: serde_json::Value = resp.json().await.expect("json");
    URL_SAFE_NO_PAD
        .decode(answer["ticket"].as_str().expect("ticket"))
        .expect("base64url")
}

/// Credentials from a `201` answer of a registration or device creation.
pub fn creds(v: serde_json::Value) -> Creds {
    Creds {
        user: v["handle"].as_str().expect("handle").to_owned(),
        device: DeviceId(v["device_id"].as_u64().expect("device_id") as u32),
        token: URL_SAFE_NO_PAD
            .decode(v["token"].as_str().expect("token"))
            .expect("b64"),
    }
}

/// Adds a device to the account of `by`.
pub async fn add_device(broker: &Broker, by: &Creds) -> Creds {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/accounts/{}/devices", broker.http(), by.user))
        .header("authorization", by.bearer())
        .json(&serde_json::json!({ "identity_keys": STANDARD.encode(b"keys2") }))
        .send()
        .await
        .expect("add device");
    assert_eq!(resp.status(), 201);
    creds(resp.json().await.expect("json"))
}

pub async fn remove_device(broker: &Broker, by: &Creds, device: DeviceId) -> reqwest::StatusCode {
    reqwest::Client::new()
        .delete(format!(
            "{}/v1/accounts/{}/devices/{}",
            broker.http(),
            by.user,
            device.0
        ))
        .header("authorization", by.bearer())
        .send()
        .await
        .expect("remove device")
        .status()
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A device connection speaking raw frames.
pub struct Device {
    pub creds: Creds,
    pub ws: Ws,
}

/// A raw WebSocket connection to the broker.
pub async fn connect_raw(broker: &Broker) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(broker.ws_url())
        .await
        .expect("connect");
    ws
}

/// Opens a device WebSocket; `None` if the upgrade is refused.
pub async fn connect_raw_checked(broker: &Broker) -> Option<Ws> {
    tokio_tungstenite::connect_async(broker.ws_url())
        .await
        .ok()
        .map(|(ws, _)| ws)
}

/// What came out of the socket.
#[derive(Debug)]
pub enum Event {
    Frame(ServerFrame),
    Closed(Option<(u16, String)>),
}

/// Next event: a decoded frame or the close (with code and reason).
pub async fn next_event(ws: &mut Ws) -> Event {
    // One deadline for the whole wait: the broker's pings must not extend it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("timed out waiting for a frame");
        match msg {
            Some(Ok(Message::Binary(b))) => {
                return Event::Frame(ServerFrame::decode(&b).expect("broker frame decodes"));
            }
            Some(Ok(Message::Close(c))) => {
                return Event::Closed(c.map(|c| (u16::from(c.code), c.reason.to_string())));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Event::Closed(None),
        }
    }
}

/// Reads until the connection ends; returns the frames seen before, and the close code and
/// reason (`None` when the connection ended without a close frame).
pub async fn until_close(ws: &mut Ws) -> (Vec<ServerFrame>, Option<(u16, String)>) {
    let mut frames = Vec::new();
    loop {
        match next_event(ws).await {
            Event::Frame(f) => frames.push(f),
            Event::Closed(c) => return (frames, c),
        }
    }
}

impl Device {
    pub async fn connect(broker: &Broker, creds: &Creds) -> Device {
        Device::authenticate(connect_raw(broker).await, creds).await
    }

    /// Authenticates an open connection as `creds` and waits for `auth_ok`.
    /// Logs in on `/v1/ws` with a one-time session ticket, as the SDK does (the token goes
    /// only on the ticket request).
    pub async fn connect_with_ticket(broker: &Broker, creds: &Creds) -> Device {
        let by_ticket = Creds {
            token: session_ticket(broker, creds).await,
            ..creds.clone()
        };
        let mut device = Device::authenticate(connect_raw(broker).await, &by_ticket).await;
        device.creds = creds.clone();
        device
    }

    pub async fn authenticate(ws: Ws, creds: &Creds) -> Device {
        Device::try_authenticate(ws, creds)
            .await
            .unwrap_or_else(|other| panic!("expected auth_ok, got {other:?}"))
    }

    /// Authenticates an open connection as `creds`; `Err` with what came instead of `auth_ok`.
    pub async fn try_authenticate(mut ws: Ws, creds: &Creds) -> Result<Device, Event> {
        let auth = ClientFrame::Auth {
            user: creds.user.clone(),
            device: creds.device,
            token: creds.token.clone(),
        };
        ws.send(Message::Binary(auth.encode().into()))
            .await
            .expect("send auth");
        match next_event(&mut ws).await {
            Event::Frame(ServerFrame::AuthOk { device, .. }) => {
                assert_eq!(device, creds.device);
                Ok(Device {
                    creds: creds.clone(),
                    ws,
                })
            }
            other => Err(other),
        }
    }

    pub async fn send_frame(&mut self, frame: &ClientFrame) {
        self.ws
            .send(Message::Binary(frame.encode().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send raw");
    }

    pub async fn next(&mut self) -> Event {
        next_event(&mut self.ws).await
    }

    pub async fn frame(&mut self) -> ServerFrame {
        match self.next().await {
            Event::Frame(f) => f,
            Event::Closed(c) => panic!("connection closed: {c:?}"),
        }
    }

    /// Sends one envelope to `to` with a copy per device in `devices`.
    pub async fn send_to(
        &mut self,
        id: EnvelopeId,
        to: &str,
        devices: &[DeviceId],
        class: Class,
        ttl_secs: u32,
        body: &[u8],
    ) {
        assert!(
            self.try_send_to(id, to, devices, class, ttl_secs, body)
                .await,
            "send"
        );
    }

    /// As [`Device::send_to`]; false if the connection is gone (a broker killed under it).
    pub async fn try_send_to(
        &mut self,
        id: EnvelopeId,
        to: &str,
        devices: &[DeviceId],
        class: Class,
        ttl_secs: u32,
        body: &[u8],
    ) -> bool {
        let copies = devices
            .iter()
            .map(|d| Copy {
                device: *d,
                ciphertext: body.to_vec(),
            })
            .collect();
        let frame = ClientFrame::Send {
            id,
            to: to.to_owned(),
            class,
            ttl_secs,
            copies,
        };
        self.ws
            .send(Message::Binary(frame.encode().into()))
            .await
            .is_ok()
    }

    /// Reads frames until the send result for `id`, returning it and any other frames seen.
    pub async fn result_for(&mut self, id: EnvelopeId) -> (SendOutcome, Vec<ServerFrame>) {
        let mut others = Vec::new();
        loop {
            match self.frame().await {
                ServerFrame::SendResult { id: got, outcome } if got == id => {
                    return (outcome, others);
                }
                other => others.push(other),
            }
        }
    }

    /// Reads frames until the send result for `id` (`Some`), or the end of the connection
    /// (`None`): what a client that reconnects and retries needs.
    pub async fn result_or_close(&mut self, id: EnvelopeId) -> Option<SendOutcome> {
        loop {
            match next_event(&mut self.ws).await {
                Event::Frame(ServerFrame::SendResult { id: got, outcome }) if got == id => {
                    return Some(outcome);
                }
                Event::Frame(_) => {}
                Event::Closed(_) => return None,
            }
        }
    }

    /// Sends and waits for the result.
    pub async fn send_and_wait(
        &mut self,
        id: EnvelopeId,
        to: &str,
        devices: &[DeviceId],
        body: &[u8],
    ) -> SendOutcome {
        self.send_to(id, to, devices, Class::Durable, 3600, body)
            .await;
        self.result_for(id).await.0
    }

    pub async fn ack(&mut self, seqs: Vec<u64>) {
        self.send_frame(&ClientFrame::Ack { seqs }).await;
    }

    /// Collects deliveries until `queue_empty`, acking nothing.
    pub async fn backlog(&mut self) -> Vec<(u64, sealpost_proto::Envelope)> {
        let mut out = Vec::new();
        loop {
            match self.frame().await {
                ServerFrame::Deliver { seq, envelope } => out.push((seq, envelope)),
                ServerFrame::QueueEmpty => return out,
                other => panic!("unexpected frame in backlog: {other:?}"),
            }
        }
    }

    /// Reads deliveries, acking each, until `queue_empty`; returns (seq, id) in order.
    pub async fn drain(&mut self) -> Vec<(u64, EnvelopeId)> {
        let mut out = Vec::new();
        loop {
            match self.frame().await {
                ServerFrame::Deliver { seq, envelope } => {
                    self.ack(vec![seq]).await;
                    out.push((seq, envelope.id));
                }
                ServerFrame::QueueEmpty => return out,
                other => panic!("unexpected frame while draining: {other:?}"),
            }
        }
    }

    /// Reads deliveries, acking each, until `want` have arrived (skipping `queue_empty` and
    /// notices); returns (seq, envelope) in order.
    pub async fn collect(&mut self, want: usize) -> Vec<(u64, sealpost_proto::Envelope)> {
        let mut out = Vec::new();
        while out.len() < want {
            match self.frame().await {
                ServerFrame::Deliver { seq, envelope } => {
                    self.ack(vec![seq]).await;
                    out.push((seq, envelope));
                }
                ServerFrame::QueueEmpty | ServerFrame::Notice { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    /// The next delivery (skipping nothing else).
    pub async fn deliver(&mut self) -> (u64, sealpost_proto::Envelope) {
        match self.frame().await {
            ServerFrame::Deliver { seq, envelope } => (seq, envelope),
            other => panic!("expected deliver, got {other:?}"),
        }
    }
}

/// Two healthy devices of two accounts, connected with an empty backlog, used to prove that
/// one client's bad input leaves everybody else unaffected.
pub struct Pair {
    pub a: Device,
    pub b: Device,
}

impl Pair {
    /// Registers `a` and `b` (open registration) and connects one device of each.
    pub async fn connect(broker: &Broker, a: &str, b: &str) -> Pair {
        let a = register(broker, a).await;
        let b = register(broker, b).await;
        Pair::connect_creds(broker, &a, &b).await
    }

    /// Connects already registered devices and drains their (empty) backlogs.
    pub async fn connect_creds(broker: &Broker, a: &Creds, b: &Creds) -> Pair {
        let mut a = Device::connect(broker, a).await;
        let mut b = Device::connect(broker, b).await;
        assert!(a.backlog().await.is_empty());
        assert!(b.backlog().await.is_empty());
        Pair { a, b }
    }

    /// A durable send a → b and one b → a, each accepted, delivered intact and acked.
    pub async fn round_trip(&mut self) {
        one_way(&mut self.a, &mut self.b).await;
        one_way(&mut self.b, &mut self.a).await;
    }
}

/// `from` sends one envelope to `to`'s device, which receives it and acks it.
pub async fn one_way(from: &mut Device, to: &mut Device) {
    let id = eid();
    let body = id.0.to_vec();
    let (user, device) = (to.creds.user.clone(), to.creds.device);
    assert_eq!(
        from.send_and_wait(id, &user, &[device], &body).await,
        SendOutcome::Accepted { duplicate: false },
        "healthy send refused"
    );
    let (seq, envelope) = to.deliver().await;
    assert_eq!(envelope.id, id);
    assert_eq!(envelope.ciphertext, body);
    to.ack(vec![seq]).await;
}

/// A fresh random envelope id.
pub fn eid() -> EnvelopeId {
    EnvelopeId(rand::random())
}

/// Whether any file under `dir` contains `needle`.
pub fn dir_contains(dir: &Path, needle: &[u8]) -> bool {
    sealpost::store::SledStore::data_files(dir).iter().any(|p| {
        std::fs::read(p).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
    })
}

/// The key directory entry of `c`'s device.
pub fn keys_url(broker: &Broker, c: &Creds) -> String {
    format!(
        "{}/v1/accounts/{}/devices/{}/keys",
        broker.http(),
        c.user,
        c.device.0
    )
}

/// Claims a key of `target`'s device as a local device of `by` (`Sealpost-Account`).
pub async fn claim(broker: &Broker, target: &Creds, by: &Creds) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!(
            "{}/v1/accounts/{}/devices/{}/keys/claim",
            broker.http(),
            target.user,
            target.device.0
        ))
        .header("sealpost-account", &by.user)
        .header("authorization", by.bearer())
        .send()
        .await
        .expect("claim")
}

/// The signed device list of `user` as `broker` serves it (JSON `{signed}`).
pub async fn device_list(broker: &Broker, user: &str) -> serde_json::Value {
    reqwest::get(format!("{}/v1/accounts/{user}/device-list", broker.http()))
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}
