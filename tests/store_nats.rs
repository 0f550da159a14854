//! The NATS JetStream backend on a real cluster (3 `nats-server` processes on 127.0.0.1):
//! the seams' contract (the same checks the in-memory and sled backends pass), two pods
//! writing one user's queues at the same moment, a killed stream leader, and a lost quorum.

mod common;

use std::{sync::Arc, time::Duration};

use common::nats::{NatsCluster, available};
use futures_util::future::join_all;
use sealpost::store::{
    Inbox, NewEnvelope, QueueLimits, Stores, contract,
    nats::{NatsOptions, NatsStore},
};

fn options(urls: String, replicas: usize, pod: &str) -> NatsOptions {
    NatsOptions {
        urls,
        partitions: 2,
        replicas,
        dedup_window: Duration::from_secs(600),
        secret: [7; 32],
        pod: pod.into(),
        timeout: Duration::from_secs(5),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

const LIMITS: QueueLimits = QueueLimits {
    count: 100_000,
    bytes: 1 << 30,
};

fn envelope(id: [u8; 16], ciphertext: &[u8]) -> NewEnvelope<'_> {
    NewEnvelope {
        id,
        class: 0,
        accepted_ms: 1,
        expires_ms: u64::MAX / 2,
        remember_until_ms: u64::MAX / 2,
        copies: vec![(1, ciphertext)],
    }
}

#[test]
fn the_seams_contract_holds_on_a_three_node_cluster() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time();
    let cluster = NatsCluster::start(3);
    runtime().block_on(async {
        let store = NatsStore::connect(&options(cluster.urls(), 3, "pod-a"))
            .await
            .expect("connect");
        contract::all(&Stores::from_backend(Arc::new(store)), "").await;
    });
}

#[test]
fn two_pods_appending_to_one_user_at_once_keep_gap_free_order() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time();
    let cluster = NatsCluster::start(1);
    runtime().block_on(async {
        let (a, b) = two_pods(&cluster).await;
        let mut ia = a.open("u@x", &[1], LIMITS).await.unwrap();
        let mut ib = b.open("u@x", &[1], LIMITS).await.unwrap();
        let mut from_a = Vec::new();
        let mut from_b = Vec::new();
        for i in 0..40u8 {
            from_a.push(ia.append(envelope([i; 16], b"a")).unwrap());
            from_b.push(ib.append(envelope([100 + i; 16], b"b")).unwrap());
        }
        let (placed_a, placed_b) = tokio::join!(join_all(from_a), join_all(from_b));
        let mut seqs: Vec<u64> = placed_a
            .iter()
            .chain(&placed_b)
            .map(|r| r.as_ref().expect("appended").stored[0].1)
            .collect();
        let a_order: Vec<u64> = placed_a
            .iter()
            .map(|r| r.as_ref().unwrap().stored[0].1)
            .collect();
        assert!(
            a_order.windows(2).all(|w| w[0] < w[1]),
            "each pod's own order is kept"
        );
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=80).collect::<Vec<u64>>(), "gap-free, none twice");
        // Both see the one queue, in one order.
        let read = ia.read(1, 1, 1000).await.unwrap();
        assert_eq!(read.len(), 80);
        assert!(read.windows(2).all(|w| w[0].0 + 1 == w[1].0));
        assert_eq!(ib.read(1, 1, 1000).await.unwrap().len(), 80);
        // A retry through the other pod is a duplicate with the original's number.
        let retry = ib.append(envelope([3; 16], b"a")).unwrap().await.unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.stored, placed_a[3].as_ref().unwrap().stored);

        // A fresh writer on pod B (it appended nothing) drains what pod A appended: the
        // queue's numbering goes on from A's, on both pods.
        let mut ib = b.open("v@x", &[1], LIMITS).await.unwrap();
        for i in 0..3u8 {
            ia_append(&a, i).await;
        }
        let read = ib.read(1, 1, 100).await.unwrap();
        let acked: Vec<sealpost::store::Trim> = read
            .iter()
            .map(|(seq, e)| sealpost::store::Trim {
                seq: *seq,
                expires_ms: e.expires_ms,
                bytes: e.ciphertext.len() as u64,
            })
            .collect();
        assert_eq!(acked.len(), 3);
        ib.trim(1, &acked).unwrap().await.unwrap();
        let next = ib.append(envelope([50; 16], b"b")).unwrap().await.unwrap();
        assert_eq!(next.stored, vec![(1, 4)], "no number is used twice");
    });
}

#[test]
fn an_out_of_order_ack_of_the_last_envelope_does_not_let_another_pod_reuse_its_number() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time();
    let cluster = NatsCluster::start(1);
    runtime().block_on(async {
        let (a, b) = two_pods(&cluster).await;
        let mut ia = a.open("w@x", &[1], LIMITS).await.unwrap();
        let mut ib = b.open("w@x", &[1], LIMITS).await.unwrap();
        for i in 1..=2u8 {
            ia.append(envelope([i; 16], b"a")).unwrap().await.unwrap();
        }
        // The device acks envelope 2 before envelope 1: the queue's last message goes.
        let read = ia.read(1, 2, 1).await.unwrap();
        let last = sealpost::store::Trim {
            seq: read[0].0,
            expires_ms: read[0].1.expires_ms,
            bytes: read[0].1.ciphertext.len() as u64,
        };
        assert_eq!(last.seq, 2);
        ia.trim(1, &[last]).unwrap().await.unwrap();
        // Pod B, which saw nothing of this queue, appends: after 2, not as 2 again.
        let next = ib.append(envelope([9; 16], b"b")).unwrap().await.unwrap();
        assert_eq!(next.stored, vec![(1, 3)], "seq 2 is not used twice");
        let seqs: Vec<u64> = ia
            .read(1, 1, 10)
            .await
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(seqs, vec![1, 3]);
    });
}

/// Two stores on one single-server cluster, as two pods would have.
async fn two_pods(cluster: &NatsCluster) -> (NatsStore, NatsStore) {
    let a = NatsStore::connect(&options(cluster.urls(), 1, "pod-a"))
        .await
        .unwrap();
    let b = NatsStore::connect(&options(cluster.urls(), 1, "pod-b"))
        .await
        .unwrap();
    (a, b)
}

/// Appends envelope `[200 + i; 16]` to `v@x` through a fresh writer of `store`.
async fn ia_append(store: &NatsStore, i: u8) {
    let mut inbox = store.open("v@x", &[1], LIMITS).await.unwrap();
    inbox
        .append(envelope([200 + i; 16], b"a"))
        .unwrap()
        .await
        .unwrap();
}

#[test]
fn a_killed_stream_leader_loses_no_acknowledged_envelope_and_a_lost_quorum_refuses() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time();
    let mut cluster = NatsCluster::start(3);
    let rt = runtime();
    let store = rt
        .block_on(NatsStore::connect(&options(cluster.urls(), 3, "pod-a")))
        .unwrap();
    let mut inbox = rt.block_on(store.open("f@x", &[1], LIMITS)).unwrap();
    let mut acked = Vec::new();
    let append = |inbox: &mut Box<dyn sealpost::store::UserInbox>, i: u32| {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        match inbox.append(envelope(id, b"payload")) {
            Ok(answer) => rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(20), answer)
                    .await
                    .ok()
            }),
            Err(_) => None,
        }
        .and_then(Result::ok)
        .map(|a| (i, a.stored[0].1))
    };
    for i in 0..50 {
        acked.extend(append(&mut inbox, i));
    }
    let partition = "SEALPOST_INBOX_0";
    let leader = cluster
        .stream_leader(partition)
        .or_else(|| cluster.stream_leader("SEALPOST_INBOX_1"));
    let leader = cluster
        .index_of(&leader.expect("a stream leader"))
        .expect("leader is one of ours");
    assert_eq!(acked.len(), 50, "all acknowledged before the kill");
    assert_eq!(rt.block_on(inbox.read(1, 1, 10_000)).unwrap().len(), 50);
    cluster.kill9(leader);
    let killed_at = std::time::Instant::now();
    let mut first_after = None;
    let mut i = 50;
    // Appends go on (each failed one is a new envelope, as a client would send it again)
    // until 30 more are acknowledged.
    while acked.len() < 80 {
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "writes resumed after failover"
        );
        if let Some(a) = append(&mut inbox, i) {
            first_after.get_or_insert(killed_at.elapsed());
            acked.push(a);
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        i += 1;
    }
    eprintln!(
        "failover: first acknowledged append {first_after:?} after the stream leader was killed"
    );
    cluster.restart(leader);
    cluster.wait_healthy();
    let stored = rt.block_on(inbox.read(1, 1, 10_000)).unwrap();
    let stored_seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    eprintln!("held after the restart: {:?}", cluster.stream_messages());
    for (_, seq) in &acked {
        assert!(
            stored_seqs.contains(seq),
            "acknowledged seq {seq} survived; stored {stored_seqs:?}"
        );
    }
    assert!(stored_seqs.windows(2).all(|w| w[0] < w[1]), "in order");

    // Two of three gone: no quorum, nothing acknowledged.
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    cluster.kill9(others[0]);
    cluster.kill9(others[1]);
    assert!(
        append(&mut inbox, 1000).is_none(),
        "refused without a quorum"
    );
    cluster.restart(others[0]);
    cluster.restart(others[1]);
    cluster.wait_healthy();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut i = 2000;
    loop {
        if append(&mut inbox, i).is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "writes resumed after the quorum came back"
        );
        i += 1;
    }
}

#[test]
fn a_stream_with_the_wrong_configuration_is_a_start_up_error_naming_it() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time();
    let cluster = NatsCluster::start(1);
    runtime().block_on(async {
        // Someone made the first inbox stream with a limit that would delete envelopes.
        let client = async_nats::connect(cluster.urls()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "SEALPOST_INBOX_0".into(),
            subjects: vec!["sp.in.0.>".into()],
            max_age: Duration::from_secs(60),
            allow_direct: true,
            allow_message_ttl: true,
            duplicate_window: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .unwrap();
        let refused = NatsStore::connect(&options(cluster.urls(), 1, "pod-a")).await;
        let message = match refused {
            Ok(_) => panic!("a store on a wrongly configured stream"),
            Err(e) => e.to_string(),
        };
        assert!(message.contains("SEALPOST_INBOX_0"), "{message}");
    });
}

#[test]
fn pods_starting_at_once_on_a_fresh_cluster_all_come_up() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time();
    let cluster = NatsCluster::start(3);
    runtime().block_on(async {
        let starts = (0..6).map(|i| {
            let options = options(cluster.urls(), 3, &format!("pod-{i}"));
            async move { NatsStore::connect(&options).await }
        });
        for (i, started) in join_all(starts).await.into_iter().enumerate() {
            if let Err(e) = started {
                panic!("pod {i} did not start: {e}");
            }
        }
    });
}

/// Attachments on JetStream keep the blob contract: pieces in order make a whole blob, half a
/// blob is not readable, usage per owner, expiry; and a second pod reads what the first
/// wrote (a multi-chunk blob, resumed across pods).
#[test]
fn attachments_keep_the_blob_contract_across_pods() {
    if !available() {
        return;
    }
    let _one = common::nats::one_at_a_time();
    let cluster = NatsCluster::start(1);
    runtime().block_on(async {
        use sealpost::store::blobs::{BlobWrite, Blobs, NewBlob, contract};
        let a = NatsStore::connect(&options(cluster.urls(), 1, "pod-a"))
            .await
            .expect("connect");
        let b = NatsStore::connect(&options(cluster.urls(), 1, "pod-b"))
            .await
            .expect("connect");
        let (a, b) = (
            a.blobs(1).await.expect("blobs"),
            b.blobs(1).await.expect("blobs"),
        );
        // (One store for both: the expiry check goes first, before other blobs exist.)
        contract::usage_and_expiry(&a).await;
        contract::resumable_upload(&a).await;
        // 700 KiB in three pieces not aligned to anything, the last through the other pod.
        let data: Vec<u8> = (0..700 * 1024u32).map(|i| (i % 251) as u8).collect();
        let id = [42u8; 32];
        a.create(NewBlob {
            id,
            owner: [1; 32],
            size: data.len() as u64,
            expires_ms: u64::MAX,
        })
        .await
        .expect("create");
        let cuts = [0, 100_001, 500_003, data.len()];
        for (i, w) in cuts.windows(2).enumerate() {
            let pod: &dyn Blobs = if i == 2 { &b } else { &a };
            let stored = pod
                .append(id, w[0] as u64, data[w[0]..w[1]].to_vec().into())
                .await
                .expect("append");
            assert_eq!(
                stored,
                BlobWrite::Stored {
                    received: w[1] as u64
                }
            );
        }
        let whole = b.read(id, 0, data.len()).await.expect("read");
        assert_eq!(&whole[..], &data[..]);
        let part = a.read(id, 262_140, 10).await.expect("read");
        assert_eq!(&part[..], &data[262_140..262_150]);
    });
}
