//! Tests of the sled backend that look below its seams: write order, expiry index, reopening.

use super::{
    SledStore, StoreOptions,
    queues::{QueueOp, QueueWrite, plan},
};
use crate::store::{
    DeviceRecord, Directory, Due, EnvelopeRecord, Inbox, Outbox, OutboxEntry, OutboxRecord,
    QueueLimits, StoreError,
    records::{DedupRecord, HeadRecord},
};

fn open(dir: &std::path::Path) -> SledStore {
    SledStore::open_waiting(&StoreOptions {
        fsync: true,
        ..StoreOptions::for_tests(dir)
    })
    .unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn device() -> DeviceRecord {
    DeviceRecord {
        version: 1,
        token_hash: [1; 32],
        identity_keys: vec![2],
        created_ms: 0,
    }
}

#[test]
fn accounts_and_devices() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    block_on(async {
        assert_eq!(s.create_account("a@x", 1, device()).await.unwrap(), 1);
        assert!(matches!(
            s.create_account("a@x", 1, device()).await,
            Err(StoreError::AccountExists)
        ));
        assert_eq!(s.add_device("a@x", device(), 16).await.unwrap(), 2);
        s.remove_device("a@x", 1).await.unwrap();
        assert_eq!(
            s.add_device("a@x", device(), 16).await.unwrap(),
            3,
            "ids are never reused"
        );
        let ids: Vec<u32> = s
            .devices("a@x")
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![2, 3]);
        assert!(matches!(
            s.add_device("b@x", device(), 16).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            s.add_device("a@x", device(), 2).await,
            Err(StoreError::TooManyDevices)
        ));
    });
}

#[test]
fn writes_are_ordered_so_every_prefix_is_consistent() {
    let rec = EnvelopeRecord {
        version: 1,
        id: [0; 16],
        class: 0,
        accepted_ms: 0,
        expires_ms: 5,
        ciphertext: vec![],
    };
    let head = HeadRecord {
        version: 1,
        next_seq: 2,
        count: 1,
        bytes: 0,
    };
    let dedup = DedupRecord {
        version: 1,
        expires_ms: 9,
        stored: vec![(1, 1)],
    };
    let w = QueueWrite {
        ops: vec![
            QueueOp::Append {
                user: "a@x".into(),
                device: 1,
                seq: 1,
                record: rec,
            },
            QueueOp::Head {
                user: "a@x".into(),
                device: 1,
                head,
            },
            QueueOp::Dedup {
                user: "a@x".into(),
                id: [0; 16],
                record: dedup,
            },
        ],
    };
    let tags: Vec<u8> = plan(w).iter().map(|(k, _)| k[0]).collect();
    // expiry index, envelope, head, dedup index, dedup record.
    assert_eq!(tags, vec![b'x', b'e', b'h', b'y', b'd']);
    let rm = QueueWrite {
        ops: vec![QueueOp::Remove {
            user: "a@x".into(),
            device: 1,
            seq: 1,
            expires_ms: 5,
        }],
    };
    let tags: Vec<u8> = plan(rm).iter().map(|(k, _)| k[0]).collect();
    assert_eq!(
        tags,
        vec![b'e', b'x'],
        "the record goes before its index entry"
    );
}

#[test]
fn outboxes_are_per_domain_ordered_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let rec = |n: u8| OutboxRecord {
        version: 1,
        id: [n; 16],
        to: "bob@b.example".into(),
        class: 0,
        accepted_ms: u64::from(n),
        expires_ms: 1000,
        copies: vec![(1, serde_bytes::ByteBuf::from(vec![n; 3]))],
        admission: 0,
        token: None,
    };
    let entry = |seq, accepted_ms| OutboxEntry {
        seq,
        accepted_ms,
        bytes: 3,
    };
    block_on(async {
        {
            let s = open(dir.path());
            for seq in 1..=3u8 {
                s.put("b.example", u64::from(seq), &rec(seq))
                    .unwrap()
                    .await
                    .unwrap();
            }
            // A domain that is a prefix of another does not share its entries.
            s.put("b.exampl", 1, &rec(9)).unwrap().await.unwrap();
            s.remove("b.example", &[2]).unwrap().await.unwrap();
        }
        let s = open(dir.path());
        let read = s.read("b.example", 1, 10).await.unwrap();
        assert_eq!(
            read.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(read[1].1, rec(3));
        assert_eq!(s.read("b.example", 2, 10).await.unwrap().len(), 1);
        assert_eq!(
            s.index("b.example").await.unwrap(),
            vec![entry(1, 1), entry(3, 3)]
        );
        assert_eq!(s.index("b.exampl").await.unwrap(), vec![entry(1, 9)]);
    });
}

#[test]
fn expiry_index_finds_due_entries_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = |expires_ms| EnvelopeRecord {
        version: 1,
        id: [0; 16],
        class: 0,
        accepted_ms: 0,
        expires_ms,
        ciphertext: vec![],
    };
    let mut w = QueueWrite::default();
    for (seq, exp) in [(1, 100), (2, 200), (3, 300)] {
        w.ops.push(QueueOp::Append {
            user: "a@x".into(),
            device: 1,
            seq,
            record: rec(exp),
        });
    }
    s.inner().write(w).unwrap();
    let due = block_on(s.due(200, 10)).unwrap();
    assert_eq!(due.len(), 2);
    assert!(matches!(due[1], Due::Envelope { seq: 2, .. }));
    assert_eq!(s.inner().read("a@x", 1, 2, 10).unwrap().len(), 2);
}

/// A crash can leave expiry index entries whose records were never written (entries go
/// first), and the retry of that send then commits the same envelope and dedup record with a
/// later expiry. When the stale entries fall due they must expire nothing but themselves.
#[test]
fn stale_expiry_entries_left_by_a_crash_expire_nothing_else() {
    const USER: &str = "bob@test.example";
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let now = crate::clock::now_ms();
    let (torn, committed) = (now - 1_000, now + 3_600_000);
    let id = [7; 16];
    let envelope = |expires_ms| QueueOp::Append {
        user: USER.into(),
        device: 1,
        seq: 1,
        record: EnvelopeRecord {
            version: 1,
            id,
            class: 0,
            accepted_ms: now,
            expires_ms,
            ciphertext: vec![1; 10],
        },
    };
    let dedup = |expires_ms| QueueOp::Dedup {
        user: USER.into(),
        id,
        record: DedupRecord {
            version: 1,
            expires_ms,
            stored: vec![(1, 1)],
        },
    };
    let ops = vec![
        // What survives of the torn send is indistinguishable from this after the
        // retry overwrote both records.
        envelope(torn),
        dedup(torn),
        envelope(committed),
        QueueOp::Head {
            user: USER.into(),
            device: 1,
            head: HeadRecord {
                version: 1,
                next_seq: 2,
                count: 1,
                bytes: 10,
            },
        },
        dedup(committed),
    ];
    store.inner().write(QueueWrite { ops }).expect("write");
    let limits = QueueLimits {
        count: 10,
        bytes: u64::MAX,
    };
    block_on(async {
        let due = store.due(now, 100).await.expect("due");
        assert_eq!(due.len(), 2, "{due:?}");
        assert!(due.iter().all(|e| match e {
            Due::Envelope { expires_ms, .. } | Due::Dedup { expires_ms, .. } => *expires_ms == torn,
        }));
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        assert!(queues.expire(due).expect("expire").is_empty());
        let queue = store.inner().read(USER, 1, 0, 10).expect("read");
        assert_eq!(queue.len(), 1, "the committed envelope was expired");
        assert_eq!(queue[0].1.expires_ms, committed);
        assert!(store.inner().dedup(USER, &id).expect("dedup").is_some());
        assert!(store.due(now, 100).await.expect("due").is_empty());
        assert!(!store.due(committed, 100).await.expect("due").is_empty());
    });
}

/// An undecodable envelope met by the expiry sweep is deleted (and counted), instead of
/// failing the whole batch and holding up every later entry on every sweep.
#[test]
fn an_undecodable_expired_envelope_is_deleted_and_the_rest_expire() {
    const USER: &str = "bob@test.example";
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let now = crate::clock::now_ms();
    let mut w = QueueWrite::default();
    for (seq, tag) in [(1, 1u8), (2, 2)] {
        w.ops.push(QueueOp::Append {
            user: USER.into(),
            device: 1,
            seq,
            record: EnvelopeRecord {
                version: 1,
                id: [tag; 16],
                class: 0,
                accepted_ms: now,
                expires_ms: now - 1,
                ciphertext: vec![1; 10],
            },
        });
    }
    store.inner().write(w).expect("write");
    // The first envelope's bytes are damaged on disk.
    store
        .inner()
        .queues
        .insert(
            crate::store::keys::envelope(USER, 1, 1),
            &b"\xffgarbage"[..],
        )
        .expect("damage");
    let limits = QueueLimits {
        count: 10,
        bytes: u64::MAX,
    };
    block_on(async {
        let due = store.due(now, 100).await.expect("due");
        assert_eq!(due.len(), 2);
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        let expired = queues.expire(due).expect("one bad record fails nothing");
        assert_eq!(expired, vec![(1, 1), (1, 2)]);
        assert!(store.inner().read(USER, 1, 0, 10).expect("read").is_empty());
        assert!(store.due(now, 100).await.expect("due").is_empty());
    });
}

/// A send whose answer the caller drops unawaited leaves its user's pending sends all the
/// same: otherwise the expiry sweep would skip its dedup record for ever.
#[test]
fn a_dropped_append_answer_does_not_keep_its_dedup_record_forever() {
    const USER: &str = "bob@test.example";
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let now = crate::clock::now_ms();
    let limits = QueueLimits {
        count: 10,
        bytes: u64::MAX,
    };
    block_on(async {
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        let answer = queues
            .append(crate::store::NewEnvelope {
                id: [5; 16],
                class: 0,
                accepted_ms: now,
                expires_ms: now + 1,
                remember_until_ms: now + 1,
                copies: vec![(1, &b"x"[..])],
            })
            .expect("append");
        drop(answer);
        crate::store::Health::flush(&store).await.expect("flush");
        let due = store.due(now + 10, 100).await.expect("due");
        assert!(
            due.iter().any(|d| matches!(d, Due::Dedup { .. })),
            "{due:?}"
        );
        queues.expire(due).expect("expire");
        assert!(
            store
                .inner()
                .dedup(USER, &[5; 16])
                .expect("dedup")
                .is_none(),
            "the dedup record was kept"
        );
    });
}
