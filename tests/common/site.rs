//! A domain's broker for federation tests: its data directory with a federation key made in
//! advance, and a free address on its own loopback IP, so that peers can pin each other before
//! either starts.

use std::{
    net::{SocketAddr, TcpListener},
    process::Command,
    time::Duration,
};

use super::{Broker, WAIT};

/// A domain's broker before it starts: its data dir with a federation key, and its address.
pub struct Site {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub dir: Option<tempfile::TempDir>,
    pub key: String,
}

impl Site {
    pub fn new(name: &'static str, ip: &str) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_sealpost"))
            .arg("federation-key")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("federation-key");
        assert!(out.status.success(), "federation-key failed");
        let key = String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_owned();
        // A free port on this loopback address (the broker binds it right after).
        let port = TcpListener::bind((ip, 0))
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        Site {
            name,
            addr: SocketAddr::new(ip.parse().expect("ip"), port),
            dir: Some(dir),
            key,
        }
    }

    pub fn peer_entry(&self) -> String {
        format!(
            "{}=ws://{}/v1/federation#{}",
            self.name, self.addr, self.key
        )
    }

    pub fn start(&mut self, peers: &[&Site], extra: &[&str]) -> Broker {
        let peers: Vec<String> = peers.iter().map(|p| p.peer_entry()).collect();
        self.start_raw(&peers.join(","), extra)
    }

    pub fn start_raw(&mut self, peers: &str, extra: &[&str]) -> Broker {
        let mut args = vec![
            "--domain",
            self.name,
            "--federation-peers",
            peers,
            "--federation-backoff-min-ms",
            "50",
            "--federation-backoff-max-ms",
            "1000",
        ];
        args.extend_from_slice(extra);
        Broker::start_with(
            self.dir.take().expect("started once"),
            Some(self.addr),
            &args,
        )
    }
}

/// The admin view of the broker's federation peers.
pub async fn admin(broker: &Broker) -> serde_json::Value {
    reqwest::get(format!("{}/admin/federation", broker.http()))
        .await
        .expect("admin")
        .json()
        .await
        .expect("admin json")
}

/// Waits until `check` holds for the admin view's peer `domain`.
pub async fn wait_peer(
    broker: &Broker,
    domain: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let view = admin(broker).await;
        let peer = view["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["domain"] == domain))
            .cloned()
            .unwrap_or_default();
        if check(&peer) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "peer {domain} never got {what}: {peer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the link to `domain` is up.
pub async fn wait_up(broker: &Broker, domain: &str) {
    wait_peer(broker, domain, "link up", |p| p["link"] == "up").await;
}
