//! A real "no space left on device" under the broker, on a small file system the test mounts
//! (tmpfs, as root; skipped with a message otherwise), with the free-space guard off so that
//! sled itself hits the full disk: sends are refused with `store_unavailable` while it is
//! full, and once space is freed the broker is ready again and accepts sends without a
//! restart; every accepted envelope is delivered once.
//!
//! sled 0.34 keeps the error of the failed write until the database is opened again: the
//! broker stops its mailboxes (their devices are sent away and reconnect) and reopens the
//! store once there is room.

mod common;

use std::{collections::HashSet, path::Path, process::Command, time::Duration};

use common::*;
use sealpost_proto::{Class, ClientFrame, Copy, EnvelopeId, ErrorCode, SendOutcome, ServerFrame};
use tokio_tungstenite::tungstenite;

/// A tmpfs of `mb` MiB mounted under a fresh temp dir, unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(mb: u32) -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "sealpost-test"])
            .arg(dir.path())
            .status()
            .ok()?
            .success();
        ok.then_some(SmallFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Connects as `from` and sends one envelope to `to`; its id if it was accepted.
async fn try_send(broker: &Broker, from: &Creds, to: &Creds) -> Option<EnvelopeId> {
    use futures_util::SinkExt;
    let mut ws = connect_raw_checked(broker).await?;
    let auth = ClientFrame::Auth {
        user: from.user.clone(),
        device: from.device,
        token: from.token.clone(),
    };
    ws.send(tungstenite::Message::Binary(auth.encode().into()))
        .await
        .ok()?;
    let id = eid();
    let send = ClientFrame::Send {
        id,
        to: to.user.clone(),
        class: Class::Durable,
        ttl_secs: 3600,
        copies: vec![Copy {
            device: to.device,
            ciphertext: b"back".to_vec(),
        }],
    };
    ws.send(tungstenite::Message::Binary(send.encode().into()))
        .await
        .ok()?;
    loop {
        match next_event(&mut ws).await {
            Event::Frame(ServerFrame::SendResult { outcome, .. }) => {
                return matches!(outcome, SendOutcome::Accepted { .. }).then_some(id);
            }
            Event::Frame(_) => {}
            Event::Closed(_) => return None,
        }
    }
}

async fn ready(broker: &Broker) -> bool {
    reqwest::get(format!("{}/readyz", broker.http()))
        .await
        .is_ok_and(|r| r.status() == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_and_recovers_without_a_restart_once_space_is_freed() {
    let Some(fs) = SmallFs::mount(128) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // Ballast, deleted later to free space.
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 64 << 20]).expect("ballast");
    let dir = tempfile::tempdir_in(fs.path()).expect("dir");
    let broker = Broker::start_with(dir, None, &["--min-free-disk-mb", "0", "--cache-mb", "16"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    assert!(a.backlog().await.is_empty());

    let body = vec![0x5a; 60 * 1024];
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..2000 {
        let id = eid();
        match a.send_and_wait(id, &bob.user, &[bob.device], &body).await {
            SendOutcome::Accepted { .. } => accepted.push(id),
            SendOutcome::Rejected {
                code: ErrorCode::StoreUnavailable,
                ..
            } => {
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        refused >= 3,
        "the disk never filled ({} accepted)",
        accepted.len()
    );
    assert!(!ready(&broker).await, "ready while the disk is full");

    // Space comes back: the broker recovers by itself. Alice's connection is sent away while
    // the store is reopened; she reconnects.
    std::fs::remove_file(&ballast).expect("free space");
    drop(a);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(id) = try_send(&broker, &alice, &bob).await {
            accepted.push(id);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sends still refused after space was freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ready(&broker).await,
        "not ready again after space was freed"
    );
    assert!(broker.metric("sealpost_store_reopens_total").await >= 1.0);
    eprintln!("{} accepted before the disk was full", accepted.len() - 1);

    // Everything accepted is delivered, once.
    let mut b = Device::connect(&broker, &bob).await;
    let got: Vec<_> = b.drain().await.into_iter().map(|(_, id)| id).collect();
    let unique: HashSet<_> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "delivered twice");
    for id in &accepted {
        assert!(unique.contains(id), "an accepted envelope was lost");
    }
}
