//! Tests of the sled backend that look below its seams: write order, expiry index, reopening.

use super::{
    SledStore, StoreOptions,
    queues::{QueueOp, QueueWrite, plan},
};
use crate::store::{
    DeviceRecord, Directory, Due, EnvelopeRecord, Inbox, Outbox, OutboxEntry, OutboxRecord,
    QueueLimits, StoreError, keys,
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
fn the_seams_contract_holds() {
    let dir = tempfile::tempdir().unwrap();
    let stores = crate::store::Stores::from_backend(std::sync::Arc::new(open(dir.path())));
    block_on(crate::store::contract::all(&stores, ""));
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
        envelopes_expire_ms: 5,
    };
    let w = QueueWrite {
        ops: vec![
            QueueOp::IndexSend {
                user: "a@x".into(),
                id: [0; 16],
                at_ms: 5,
            },
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
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let keyring = &s.inner().keyring;
    let tags: Vec<u8> = plan(keyring, w).iter().map(|(k, _)| k[0]).collect();
    // the send's expiry index entry, envelope, head, dedup record.
    assert_eq!(tags, vec![b'Y', b'E', b'H', b'D']);
    let rm = QueueWrite {
        ops: vec![QueueOp::Remove {
            user: "a@x".into(),
            device: 1,
            seq: 1,
        }],
    };
    let tags: Vec<u8> = plan(keyring, rm).iter().map(|(k, _)| k[0]).collect();
    assert_eq!(
        tags,
        vec![b'E'],
        "an envelope has no index entry of its own"
    );
    let moved = QueueWrite {
        ops: vec![QueueOp::Reindex {
            user: "a@x".into(),
            id: [0; 16],
            from_ms: 5,
            to_ms: 9,
        }],
    };
    let planned = plan(keyring, moved);
    let times: Vec<Option<u64>> = planned
        .iter()
        .map(|(k, _)| crate::store::keys::split_expiry(k).map(|(t, _)| t))
        .collect();
    assert_eq!(times, vec![Some(9), Some(5)], "the new entry goes first");
    assert!(matches!(planned[1].1, super::queues::Value::Delete));
}

/// The writes of a committed one-copy send of `record` at `seq` of device 1 of `user`, its
/// dedup record kept until `dedup_expires_ms` (layout 3).
fn committed_send(
    store: &SledStore,
    user: &str,
    seq: u64,
    record: EnvelopeRecord,
    dedup_expires_ms: u64,
) -> Vec<QueueOp> {
    let id = store.inner().keyring.id(&record.id);
    let envelopes_expire_ms = record.expires_ms;
    vec![
        QueueOp::IndexSend {
            user: user.into(),
            id,
            at_ms: envelopes_expire_ms,
        },
        QueueOp::Append {
            user: user.into(),
            device: 1,
            seq,
            record,
        },
        QueueOp::Dedup {
            user: user.into(),
            id,
            record: DedupRecord {
                version: 1,
                expires_ms: dedup_expires_ms,
                stored: vec![(1, seq)],
                envelopes_expire_ms,
            },
        },
    ]
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
        group: None,
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
    for (seq, tag, exp) in [(1, 1, 100), (2, 2, 200), (3, 3, 300)] {
        let mut record = rec(exp);
        record.id = [tag; 16];
        w.ops.extend(committed_send(&s, "a@x", seq, record, exp));
    }
    s.inner().write(w).unwrap();
    let due = block_on(s.due(200, 10)).unwrap();
    assert_eq!(due.len(), 2);
    assert!(matches!(
        due[1],
        Due::Dedup {
            expires_ms: 200,
            ..
        }
    ));
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
    let hashed = store.inner().keyring.id(&id);
    let dedup = |expires_ms| QueueOp::Dedup {
        user: USER.into(),
        id: hashed,
        record: DedupRecord {
            version: 1,
            expires_ms,
            stored: vec![(1, 1)],
            envelopes_expire_ms: expires_ms,
        },
    };
    let index = |at_ms| QueueOp::IndexSend {
        user: USER.into(),
        id: hashed,
        at_ms,
    };
    let ops = vec![
        // What survives of the torn send is indistinguishable from this after the
        // retry overwrote both records.
        index(torn),
        envelope(torn),
        dedup(torn),
        index(committed),
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
        assert_eq!(due.len(), 1, "{due:?}");
        assert!(due.iter().all(|e| match e {
            Due::Envelope { expires_ms, .. } | Due::Dedup { expires_ms, .. } => *expires_ms == torn,
            Due::Sends { .. } | Due::Page { .. } => false,
        }));
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        assert!(queues.expire(due).expect("expire").is_empty());
        let queue = store.inner().read(USER, 1, 0, 10).expect("read");
        assert_eq!(queue.len(), 1, "the committed envelope was expired");
        assert_eq!(queue[0].1.expires_ms, committed);
        let hashed = store.inner().keyring.id(&id);
        assert!(store.inner().dedup(USER, &hashed).expect("dedup").is_some());
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
        let record = EnvelopeRecord {
            version: 1,
            id: [tag; 16],
            class: 0,
            accepted_ms: now,
            expires_ms: now - 1,
            ciphertext: vec![1; 10],
        };
        w.ops
            .extend(committed_send(&store, USER, seq, record, now - 1));
    }
    store.inner().write(w).expect("write");
    // The first envelope's bytes are damaged on disk.
    store
        .inner()
        .queues
        .insert(
            crate::store::keys::envelope(&store.inner().keyring.user(USER), 1, 1),
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
        let mut expired = queues.expire(due).expect("one bad record fails nothing");
        // Entries of one time sort by the keyed hash of their id: in no particular order.
        expired.sort_unstable();
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
        // (Layout 4's entries are due at the end of their second.)
        let due = store.due(now + 1_000, 100).await.expect("due");
        assert!(
            due.iter().any(|d| matches!(d, Due::Sends { .. })),
            "{due:?}"
        );
        queues.expire(due).expect("expire");
        assert!(
            store
                .inner()
                .dedup(USER, &store.inner().keyring.id(&[5; 16]))
                .expect("dedup")
                .is_none(),
            "the dedup record was kept"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Shredding: nothing of an acknowledged envelope can be recovered from the data directory.

mod shredding {
    use std::collections::HashMap;

    use rand::RngCore as _;

    use super::{block_on, open};
    use crate::store::{
        Health, Inbox, NewEnvelope, Outbox, OutboxRecord, QueueLimits, SledStore, Trim, keys,
        sled::keyring,
    };

    const USER: &str = "carol-4471@shred.example";
    const LIMITS: QueueLimits = QueueLimits {
        count: 1000,
        bytes: u64::MAX,
    };

    fn random(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::rngs::OsRng.fill_bytes(&mut v);
        v
    }

    /// Which of `secrets` has any 16-byte window in any file under `dir`.
    fn found_in(dir: &std::path::Path, secrets: &[Vec<u8>]) -> Vec<usize> {
        let mut windows: HashMap<&[u8], usize> = HashMap::new();
        for (n, s) in secrets.iter().enumerate() {
            for w in s.windows(16) {
                windows.insert(w, n);
            }
        }
        let mut found = std::collections::BTreeSet::new();
        for path in SledStore::data_files(dir) {
            let bytes = std::fs::read(&path).unwrap_or_default();
            for w in bytes.windows(16) {
                if let Some(n) = windows.get(w) {
                    found.insert(*n);
                }
            }
        }
        found.into_iter().collect()
    }

    /// Two flushes: the first makes the deletions durable (and destroys the drained keys
    /// after it), the second returns once the first one's key work is done.
    fn settle(store: &SledStore) {
        block_on(async {
            Health::flush(store).await.expect("flush");
            Health::flush(store).await.expect("flush");
        });
    }

    struct Sent {
        id: [u8; 16],
        ciphertext: Vec<u8>,
        /// (key, sealed value) of each device's copy as it was stored: what old sled
        /// segments keep.
        stored: Vec<(Vec<u8>, Vec<u8>)>,
    }

    /// Appends `n` envelopes to devices 1 and 2; answers them with the raw stored copies.
    fn send(store: &SledStore, n: usize) -> Vec<Sent> {
        let now = crate::clock::now_ms();
        let mut inbox = block_on(store.open(USER, &[1, 2], LIMITS)).expect("open");
        let mut sent = Vec::new();
        for _ in 0..n {
            let id: [u8; 16] = random(16).try_into().expect("16");
            let ciphertext = random(200);
            let answer = inbox
                .append(NewEnvelope {
                    id,
                    class: 0,
                    accepted_ms: now,
                    expires_ms: now + 3_600_000,
                    remember_until_ms: now + 3_600_000,
                    copies: vec![(1, &ciphertext), (2, &ciphertext)],
                })
                .expect("append");
            let appended = block_on(answer).expect("durable");
            let u = store.inner().keyring.user(USER);
            let stored = appended
                .stored
                .iter()
                .map(|(device, seq)| {
                    let k = keys::envelope(&u, *device, *seq);
                    let v = store.inner().queues.get(&k).expect("get").expect("stored");
                    (k, v.to_vec())
                })
                .collect();
            sent.push(Sent {
                id,
                ciphertext,
                stored,
            });
        }
        sent
    }

    /// Acknowledges the first `n` envelopes of both device queues.
    fn ack(store: &SledStore, sent: &[Sent], n: usize) {
        let mut inbox = block_on(store.open(USER, &[1, 2], LIMITS)).expect("open");
        for device in [1, 2] {
            let read = block_on(inbox.read(device, 0, n)).expect("read");
            let trims: Vec<Trim> = read
                .iter()
                .map(|(seq, r)| Trim {
                    seq: *seq,
                    expires_ms: r.expires_ms,
                    bytes: r.ciphertext.len() as u64,
                })
                .collect();
            assert_eq!(trims.len(), n.min(sent.len()));
            block_on(inbox.trim(device, &trims).expect("trim")).expect("durable");
        }
    }

    fn assert_shredded(dir: &std::path::Path, sent: &[Sent]) {
        let mut secrets = Vec::new();
        for s in sent {
            secrets.push(s.ciphertext.clone());
            secrets.push(s.id.to_vec());
        }
        let found = found_in(dir, &secrets);
        assert!(
            found.is_empty(),
            "{} ciphertexts or ids of acknowledged envelopes are in the data directory",
            found.len()
        );
        for s in sent {
            for (k, v) in &s.stored {
                assert!(
                    !keyring::file_opens(dir, k, v),
                    "a key left in the keyring opens an acknowledged envelope"
                );
            }
        }
    }

    #[test]
    fn acknowledged_envelopes_leave_nothing_recoverable_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let sent = send(&store, 20);
        ack(&store, &sent, 20);
        settle(&store);
        drop(store);
        assert_shredded(dir.path(), &sent);
        // The store goes on: the drained queues have fresh keys.
        let store = SledStore::open_waiting(&super::super::StoreOptions {
            fsync: true,
            ..super::super::StoreOptions::for_tests(dir.path())
        })
        .expect("reopen");
        let more = send(&store, 2);
        let inbox = block_on(store.open(USER, &[1, 2], LIMITS)).expect("open");
        let read = block_on(inbox.read(1, 0, 10)).expect("read");
        assert_eq!(
            read.iter().map(|(_, r)| r.id).collect::<Vec<_>>(),
            more.iter().map(|s| s.id).collect::<Vec<_>>()
        );
        assert_eq!(read[0].0, 21, "sequence numbers go on");
    }

    /// A queue that never drains: once its key is older than the limit, the survivors are
    /// re-sealed under a new key and the old key (which opens every acknowledged one) goes.
    #[test]
    fn an_aged_key_of_a_queue_that_never_drains_is_rotated_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let sent = send(&store, 12);
        ack(&store, &sent, 9);
        settle(&store);
        store.inner().keyring.age_all(2 * 3_600_000);
        let now = crate::clock::now_ms();
        // The sweep drives the rotation.
        block_on(store.due(now, 10)).expect("due");
        settle(&store);
        drop(store);
        assert_shredded(dir.path(), &sent[..9]);
        let store = SledStore::open_waiting(&super::super::StoreOptions {
            fsync: true,
            ..super::super::StoreOptions::for_tests(dir.path())
        })
        .expect("reopen");
        let inbox = block_on(store.open(USER, &[1, 2], LIMITS)).expect("open");
        for device in [1, 2] {
            let read = block_on(inbox.read(device, 0, 10)).expect("read");
            assert_eq!(
                read.iter()
                    .map(|(seq, r)| (*seq, r.id, r.ciphertext.clone()))
                    .collect::<Vec<_>>(),
                sent[9..]
                    .iter()
                    .enumerate()
                    .map(|(n, s)| (10 + n as u64, s.id, s.ciphertext.clone()))
                    .collect::<Vec<_>>(),
                "the unacknowledged part is still deliverable"
            );
        }
    }

    #[test]
    fn a_removed_outbox_entry_leaves_nothing_recoverable_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut secrets = Vec::new();
        let mut stored = Vec::new();
        let domain = store.inner().keyring.domain("b.example");
        for seq in 1..=5u64 {
            let id: [u8; 16] = random(16).try_into().expect("16");
            let ciphertext = random(300);
            let token = random(32);
            let record = OutboxRecord {
                version: 1,
                id,
                to: "bob@b.example".into(),
                class: 0,
                accepted_ms: 1,
                expires_ms: u64::MAX,
                copies: vec![(1, serde_bytes::ByteBuf::from(ciphertext.clone()))],
                admission: 1,
                token: Some(serde_bytes::ByteBuf::from(token.clone())),
                group: None,
            };
            block_on(store.put("b.example", seq, &record).expect("put")).expect("durable");
            let k = keys::outbox(&domain, seq);
            let v = store.inner().outbox.get(&k).expect("get").expect("stored");
            stored.push((k, v.to_vec()));
            secrets.extend([id.to_vec(), ciphertext, token]);
        }
        assert_eq!(
            block_on(store.read("b.example", 1, 10))
                .expect("read")
                .len(),
            5
        );
        block_on(store.remove("b.example", &[1, 2, 3, 4, 5]).expect("remove")).expect("durable");
        settle(&store);
        drop(store);
        let found = found_in(dir.path(), &secrets);
        assert!(
            found.is_empty(),
            "{} outbox secrets left on disk",
            found.len()
        );
        for (k, v) in &stored {
            assert!(
                !keyring::file_opens(dir.path(), k, v),
                "a removed entry still opens"
            );
        }
    }

    fn reopen(dir: &std::path::Path, failpoint: Option<std::path::PathBuf>) -> SledStore {
        SledStore::open_waiting(&super::super::StoreOptions {
            fsync: true,
            failpoint_sync: failpoint,
            ..super::super::StoreOptions::for_tests(dir)
        })
        .expect("reopen")
    }

    fn queue(store: &SledStore, device: u32) -> Vec<(u64, [u8; 16])> {
        let inbox = block_on(store.open(USER, &[1, 2], LIMITS)).expect("open");
        block_on(inbox.read(device, 0, 100))
            .expect("read")
            .into_iter()
            .map(|(seq, r)| (seq, r.id))
            .collect()
    }

    /// A crash in the middle of a rotation — survivors partly re-sealed, the new key synced,
    /// the old one not yet destroyed (its flush failed) — loses nothing: after reopening both
    /// keys open what they sealed, and the rotation finishes and destroys the old key.
    #[test]
    fn a_crash_in_the_middle_of_a_rotation_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let failpoint = dir.path().join("failpoint");
        let store = reopen(dir.path(), Some(failpoint.clone()));
        let sent = send(&store, 6);
        ack(&store, &sent, 2);
        let want: Vec<(u64, [u8; 16])> = sent[2..]
            .iter()
            .enumerate()
            .map(|(n, s)| (3 + n as u64, s.id))
            .collect();
        store.inner().keyring.age_all(2 * 3_600_000);
        std::fs::write(&failpoint, b"").expect("failpoint");
        // Three of the eight survivors re-sealed; the flush that would let the old key go fails.
        store
            .inner()
            .keyring
            .rotate(crate::clock::now_ms(), 3)
            .expect("rotate");
        assert!(block_on(Health::flush(&store)).is_err());
        drop(store);
        std::fs::remove_file(&failpoint).expect("failpoint");
        let store = reopen(dir.path(), None);
        assert_eq!(
            store.inner().keyring.live_keys(),
            4,
            "old and new key per queue"
        );
        for device in [1, 2] {
            assert_eq!(queue(&store, device), want, "device {device}");
        }
        // The rotation goes on from the start and destroys the old keys.
        block_on(store.due(crate::clock::now_ms(), 10)).expect("due");
        settle(&store);
        assert_eq!(store.inner().keyring.live_keys(), 2);
        for device in [1, 2] {
            assert_eq!(queue(&store, device), want, "device {device}");
        }
        drop(store);
        assert_shredded(dir.path(), &sent[..2]);
    }

    /// The one way a record can outlive its key: deleted after the flush that preceded the
    /// key's destruction, and brought back by a crash before that deletion was durable. It was
    /// acknowledged: it is not delivered, its sequence number is not reused, and it goes.
    #[test]
    fn a_record_under_a_destroyed_key_is_never_delivered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let sent = send(&store, 3);
        ack(&store, &sent, 3);
        settle(&store);
        // The crash brings back the deleted records (as they were stored).
        for s in &sent {
            for (k, v) in &s.stored {
                store
                    .inner()
                    .queues
                    .insert(k, v.as_slice())
                    .expect("insert");
            }
        }
        block_on(Health::flush(&store)).expect("flush");
        drop(store);
        let store = reopen(dir.path(), None);
        let mut inbox = block_on(store.open(USER, &[1, 2], LIMITS)).expect("open");
        assert_eq!(inbox.ends(), vec![(1, 4), (2, 4)]);
        assert!(block_on(inbox.read(1, 0, 10)).expect("read").is_empty());
        let now = crate::clock::now_ms();
        let answer = inbox
            .append(NewEnvelope {
                id: [9; 16],
                class: 0,
                accepted_ms: now,
                expires_ms: now + 60_000,
                remember_until_ms: now + 60_000,
                copies: vec![(1, b"after")],
            })
            .expect("append");
        assert_eq!(block_on(answer).expect("durable").stored, vec![(1, 4)]);
        let read = block_on(inbox.read(1, 0, 10)).expect("read");
        assert_eq!(
            read.iter().map(|(seq, r)| (*seq, r.id)).collect::<Vec<_>>(),
            vec![(4, [9; 16])]
        );
    }

    /// A device queue's first message takes a spare key: the keyring file is not written (no
    /// `fdatasync` on the writer's thread); the committer tops the spares up later.
    #[test]
    fn a_new_queue_adopts_a_spare_key_without_writing_the_keyring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let spares = store.inner().keyring.spare_keys();
        assert_eq!(spares, keyring::SPARES, "spares are made on open");
        let before = std::fs::read(dir.path().join(keyring::FILE)).expect("keyring");
        send(&store, 3);
        let after = std::fs::read(dir.path().join(keyring::FILE)).expect("keyring");
        assert!(before == after, "the keyring file was written");
        assert_eq!(store.inner().keyring.live_keys(), 2);
        assert_eq!(store.inner().keyring.spare_keys(), spares - 2);
    }

    /// Reopened with its queue not drained (its slot in the file still naming no queue), a
    /// spare a queue adopted is that queue's key again (its `A` entry says so): what it sealed
    /// is read, and draining the queue destroys it. Were it taken for a spare again, nothing
    /// would destroy it and it would open every acknowledged envelope. (The same after a
    /// failed flush and a reopen: `a_crash_in_the_middle_of_a_rotation_loses_nothing`.)
    #[test]
    fn an_adopted_spare_is_its_queues_key_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let sent = send(&store, 4);
        drop(store);
        let store = reopen(dir.path(), None);
        assert_eq!(
            store.inner().keyring.live_keys(),
            2,
            "both queues own their key"
        );
        assert_eq!(store.inner().keyring.spare_keys(), keyring::SPARES - 2);
        let want: Vec<(u64, [u8; 16])> = (1..).zip(sent.iter().map(|s| s.id)).collect();
        for device in [1, 2] {
            assert_eq!(queue(&store, device), want, "device {device}");
        }
        ack(&store, &sent, 4);
        settle(&store);
        let adoptions = store.inner().queues.scan_prefix([keys::ADOPTION]).count();
        assert_eq!(
            adoptions, 0,
            "the file names the replaced keys: no `A` entry is left"
        );
        drop(store);
        assert_shredded(dir.path(), &sent);
    }

    /// More new queues at once than there are spares: the writer makes a batch itself.
    #[test]
    fn more_new_queues_than_spares_are_served() {
        let spares = keyring::SPARES;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let devices: Vec<u32> = (1..=u32::try_from(spares).expect("small") + 44).collect();
        let mut inbox = block_on(store.open(USER, &devices, LIMITS)).expect("open");
        let now = crate::clock::now_ms();
        let copies: Vec<(u32, &[u8])> = devices.iter().map(|d| (*d, &b"to all"[..])).collect();
        let answer = inbox
            .append(NewEnvelope {
                id: [7; 16],
                class: 0,
                accepted_ms: now,
                expires_ms: now + 60_000,
                remember_until_ms: now + 60_000,
                copies,
            })
            .expect("append");
        block_on(answer).expect("durable");
        assert_eq!(
            store.inner().keyring.spare_keys(),
            2 * spares - devices.len(),
            "a second batch was made when the first ran out"
        );
        drop(inbox);
        drop(store);
        let store = reopen(dir.path(), None);
        assert_eq!(store.inner().keyring.live_keys(), devices.len());
        let inbox = block_on(store.open(USER, &devices, LIMITS)).expect("open");
        for device in devices {
            let read = block_on(inbox.read(device, 0, 10)).expect("read");
            assert_eq!(read.len(), 1, "device {device}");
            assert_eq!(read[0].1.ciphertext, b"to all");
        }
    }

    /// `A` entries that name no spare (left by a crash between a slot's rewrite and the
    /// entry's removal: the slot has another generation now, or the file names its queue; or
    /// naming a slot the file does not have) are ignored and removed on open; spares stay
    /// spares.
    #[test]
    fn stale_adoptions_are_removed_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        // Queues adopt two spares, drain, and have them replaced: the file names both slots.
        let sent = send(&store, 1);
        ack(&store, &sent, 1);
        settle(&store);
        let named: Vec<u32> = sent[0]
            .stored
            .iter()
            .map(|(_, v)| u32::from_be_bytes(v[1..5].try_into().expect("4 bytes")))
            .collect();
        let mut value = vec![29u8];
        value.extend_from_slice(&[b'E'; 29]);
        value.extend_from_slice(&1u64.to_be_bytes());
        let stale = [
            // The generation each named slot had when adopted: it was replaced since.
            keys::adoption(named[0], 1),
            keys::adoption(named[1], 1),
            // A spare (the first made, the last handed out), with a generation it never had.
            keys::adoption(1, 99),
            // Past the end of the file.
            keys::adoption(1_000_000, 1),
        ];
        for k in &stale {
            store
                .inner()
                .queues
                .insert(k, value.clone())
                .expect("insert");
        }
        block_on(Health::flush(&store)).expect("flush");
        drop(store);
        let store = reopen(dir.path(), None);
        for k in &stale {
            assert!(store.inner().queues.get(k).expect("get").is_none());
        }
        assert_eq!(store.inner().keyring.live_keys(), 2);
        assert_eq!(store.inner().keyring.spare_keys(), keyring::SPARES - 2);
    }
}

// ---------------------------------------------------------------------------------------
// Migration of a layout-1 data directory.

mod migration {
    use super::block_on;
    use crate::store::{
        Due, EnvelopeRecord, Inbox, Outbox, OutboxRecord, QueueLimits, SledStore, StoreOptions,
        keys::{self, v1},
        records::{self, DedupRecord, HeadRecord},
    };

    const USER: &str = "olduser@x.example";
    const LIMITS: QueueLimits = QueueLimits {
        count: 100,
        bytes: u64::MAX,
    };

    /// Writes what the layout-1 build stored after two sends to device 1 and one outbox entry.
    fn write_layout_1(dir: &std::path::Path, now: u64) {
        let db = sled::Config::new()
            .path(dir)
            .segment_size(8 * 1024 * 1024)
            .open()
            .expect("sled");
        let queues = db.open_tree("queues").expect("tree");
        let outbox = db.open_tree("outbox").expect("tree");
        for n in 1..=2u8 {
            let (seq, id) = (u64::from(n), [n; 16]);
            let expires = now + 60_000;
            let seq_key = [&1u32.to_be_bytes()[..], &seq.to_be_bytes()].concat();
            queues
                .insert(
                    v1::key(v1::EXPIRY_ENVELOPE, Some(expires), USER, &seq_key),
                    &[],
                )
                .expect("x");
            let record = EnvelopeRecord {
                version: 1,
                id,
                class: 0,
                accepted_ms: now,
                expires_ms: expires,
                ciphertext: vec![0xc0 + n; 40],
            };
            queues
                .insert(
                    v1::key(v1::ENVELOPE, None, USER, &seq_key),
                    records::encode(&record),
                )
                .expect("e");
            queues
                .insert(v1::key(v1::EXPIRY_DEDUP, Some(expires), USER, &id), &[])
                .expect("y");
            let dedup = DedupRecord {
                version: 1,
                expires_ms: expires,
                stored: vec![(1, seq)],
                envelopes_expire_ms: 0,
            };
            queues
                .insert(v1::key(v1::DEDUP, None, USER, &id), records::encode(&dedup))
                .expect("d");
        }
        let head = HeadRecord {
            version: 1,
            next_seq: 3,
            count: 2,
            bytes: 80,
        };
        queues
            .insert(
                v1::key(v1::HEAD, None, USER, &1u32.to_be_bytes()),
                records::encode(&head),
            )
            .expect("h");
        let entry = OutboxRecord {
            version: 1,
            id: [7; 16],
            to: "bob@b.example".into(),
            class: 0,
            accepted_ms: now,
            expires_ms: now + 60_000,
            copies: vec![(1, serde_bytes::ByteBuf::from(vec![1, 2, 3]))],
            admission: 1,
            token: Some(serde_bytes::ByteBuf::from(vec![4; 32])),
            group: None,
        };
        outbox
            .insert(
                v1::key(v1::OUTBOX, None, "b.example", &5u64.to_be_bytes()),
                records::encode(&entry),
            )
            .expect("q");
        db.flush().expect("flush");
    }

    fn check_migrated(store: &SledStore, now: u64) {
        for tag in [
            v1::HEAD,
            v1::ENVELOPE,
            v1::DEDUP,
            v1::EXPIRY_ENVELOPE,
            v1::EXPIRY_DEDUP,
        ] {
            assert!(store.inner().queues.scan_prefix([tag]).next().is_none());
        }
        assert!(
            store
                .inner()
                .outbox
                .scan_prefix([v1::OUTBOX])
                .next()
                .is_none()
        );
        let mut inbox = block_on(store.open(USER, &[1], LIMITS)).expect("open");
        assert_eq!(inbox.ends(), vec![(1, 3)]);
        let read = block_on(inbox.read(1, 0, 10)).expect("read");
        assert_eq!(
            read.iter()
                .map(|(seq, r)| (*seq, r.id, r.ciphertext.clone()))
                .collect::<Vec<_>>(),
            vec![(1, [1; 16], vec![0xc1; 40]), (2, [2; 16], vec![0xc2; 40])]
        );
        // Old ids are still known: a retry is a duplicate.
        let dup = inbox.duplicate(&[2; 16]).expect("dup").expect("known");
        assert_eq!(block_on(dup).expect("durable").stored, vec![(1, 2)]);
        // The expiry index still names the user; the migrated queues were never closed, so
        // opening them listed their sends anew too.
        // (`Z` entries fall due at the end of their second.)
        let due = block_on(store.due(now + 61_000, 100)).expect("due");
        assert!(due.iter().all(|d| d.user() == USER));
        let count = |f: fn(&Due) -> bool| due.iter().filter(|d| f(d)).count();
        assert_eq!(count(|d| matches!(d, Due::Envelope { .. })), 2, "{due:?}");
        assert_eq!(count(|d| matches!(d, Due::Dedup { .. })), 2, "{due:?}");
        let listed: std::collections::BTreeSet<_> = due
            .iter()
            .flat_map(|d| match d {
                Due::Sends { ids, .. } => ids.clone(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(listed.len(), 2, "{due:?}");
        let entries = block_on(store.read("b.example", 0, 10)).expect("outbox");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, 5);
        assert_eq!(entries[0].1.token.as_deref(), Some(&vec![4u8; 32]));
        // Keys name no handle, id or domain.
        for kv in store.inner().queues.iter() {
            let (k, _) = kv.expect("kv");
            assert!(!k.windows(USER.len()).any(|w| w == USER.as_bytes()));
            assert!(!k.windows(16).any(|w| w == [1; 16] || w == [2; 16]));
        }
        let d = store.inner().keyring.domain("b.example");
        assert!(
            store
                .inner()
                .outbox
                .get(keys::outbox(&d, 5))
                .expect("get")
                .is_some()
        );
    }

    #[test]
    fn a_layout_1_directory_is_migrated_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::clock::now_ms();
        write_layout_1(dir.path(), now);
        let options = StoreOptions::for_tests(dir.path());
        let store = SledStore::open_waiting(&options).expect("open");
        check_migrated(&store, now);
        drop(store);
        // Reopening migrates nothing more and reads the same.
        let store = SledStore::open_waiting(&options).expect("reopen");
        check_migrated(&store, now);
    }

    /// A crash after some records were written under their new keys but before their old
    /// keys were removed: the next open finishes the pass, nothing doubled.
    #[test]
    fn an_interrupted_migration_finishes_on_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::clock::now_ms();
        write_layout_1(dir.path(), now);
        let options = StoreOptions::for_tests(dir.path());
        drop(SledStore::open_waiting(&options).expect("open"));
        // Put the layout-1 records back beside their migrated copies.
        write_layout_1(dir.path(), now);
        let store = SledStore::open_waiting(&options).expect("reopen");
        check_migrated(&store, now);
    }
}

/// Heads are stored every `CHECKPOINT_EVERY` appends and at close only: reopening a queue
/// after a crash (no close) counts it again, so its count, bytes and next sequence number come
/// back exact however many sends and trims came after the last checkpoint.
#[test]
fn reopening_counts_the_appends_since_the_last_stored_head() {
    const USER: &str = "bob@test.example";
    let dir = tempfile::tempdir().expect("tempdir");
    let now = crate::clock::now_ms();
    let limits = QueueLimits {
        count: 1_000,
        bytes: u64::MAX,
    };
    let len = |n: u64| 1 + (n % 7) as usize;
    let store = open(dir.path());
    block_on(async {
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        for n in 1..=150u64 {
            let ciphertext = vec![9; len(n)];
            let mut id = [0; 16];
            id[..8].copy_from_slice(&n.to_be_bytes());
            queues
                .append(crate::store::NewEnvelope {
                    id,
                    class: 0,
                    accepted_ms: now,
                    expires_ms: now + 60_000,
                    remember_until_ms: now + 60_000,
                    copies: vec![(1, &ciphertext[..])],
                })
                .expect("append")
                .await
                .expect("durable");
            if n == 100 {
                // Acknowledged: 11..=20 go; no head is stored with the trim.
                let acked: Vec<crate::store::Trim> = (11..=20)
                    .map(|seq| crate::store::Trim {
                        seq,
                        expires_ms: now + 60_000,
                        bytes: len(seq) as u64,
                    })
                    .collect();
                queues
                    .trim(1, &acked)
                    .expect("trim")
                    .await
                    .expect("durable");
            }
        }
    });
    drop(store);
    let store = open(dir.path());
    let heads = super::recovery::recover_heads(&store.inner(), USER, &[1], now).expect("heads");
    let want_bytes: u64 = (1..=150u64)
        .filter(|n| !(11..=20).contains(n))
        .map(|n| len(n) as u64)
        .sum();
    assert_eq!(heads[&1].next_seq, 151);
    assert_eq!(heads[&1].count, 140);
    assert_eq!(heads[&1].bytes, want_bytes);
}

/// A send's one index entry serves both of its expiries: its envelopes go when they expire
/// (an urgent ring), its dedup record stays — a retry is still a duplicate — until it is due
/// too.
#[test]
fn a_send_whose_envelopes_expire_first_is_still_deduplicated_until_its_record_expires() {
    const USER: &str = "bob@test.example";
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let now = crate::clock::now_ms();
    // Layout 4's entries are due at the end of their second.
    let second = super::recovery::due_second;
    let (ring, remember) = (second(now + 30_000), second(now + 3_600_000));
    let limits = QueueLimits {
        count: 10,
        bytes: u64::MAX,
    };
    block_on(async {
        let mut queues = store.open(USER, &[1, 2], limits).await.expect("open");
        queues
            .append(crate::store::NewEnvelope {
                id: [3; 16],
                class: 2,
                accepted_ms: now,
                expires_ms: ring,
                remember_until_ms: remember,
                copies: vec![(1, &b"ring"[..]), (2, &b"ring"[..])],
            })
            .expect("append")
            .await
            .expect("durable");
        let due = store.due(ring, 100).await.expect("due");
        assert_eq!(due.len(), 1, "one entry per send: {due:?}");
        let expired = queues.expire(due).expect("expire");
        assert_eq!(expired, vec![(1, 1), (2, 1)]);
        assert!(store.inner().read(USER, 1, 0, 10).expect("read").is_empty());
        assert!(store.due(ring, 100).await.expect("due").is_empty());
        let retry = queues
            .duplicate(&[3; 16])
            .expect("dup")
            .expect("still known");
        assert!(retry.await.expect("durable").duplicate);
        let due = store.due(remember, 100).await.expect("due");
        assert_eq!(due.len(), 1, "{due:?}");
        assert!(queues.expire(due).expect("expire").is_empty());
        assert!(store.due(u64::MAX - 1, 100).await.expect("due").is_empty());
        // Its page is gone: a writer that opens the queues anew no longer knows it.
        queues.close();
        let mut queues = store.open(USER, &[1, 2], limits).await.expect("open");
        assert!(queues.duplicate(&[3; 16]).expect("dup").is_none());
    });
}

/// A queue's end survives the send that reached it: a send acknowledged (no head stored), then
/// expired and forgotten by the sweep, leaves its number in `L`. Reopened after a crash (no
/// close), the queue goes on past it.
#[test]
fn a_queue_end_outlives_the_sends_the_sweep_forgets() {
    const USER: &str = "bob@test.example";
    let dir = tempfile::tempdir().expect("tempdir");
    let now = crate::clock::now_ms();
    let limits = QueueLimits {
        count: 10,
        bytes: u64::MAX,
    };
    let store = open(dir.path());
    block_on(async {
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        queues
            .append(crate::store::NewEnvelope {
                id: [3; 16],
                class: 0,
                accepted_ms: now,
                expires_ms: now + 10,
                remember_until_ms: now + 10,
                copies: vec![(1, &[5u8; 4][..])],
            })
            .expect("append")
            .await
            .expect("durable");
        let acked = [crate::store::Trim {
            seq: 1,
            expires_ms: now + 10,
            bytes: 4,
        }];
        queues
            .trim(1, &acked)
            .expect("trim")
            .await
            .expect("durable");
        // Its wake entry is due at the end of the second it falls due in.
        let due = store.due(now + 2_000, 100).await.expect("due");
        assert_eq!(due.len(), 1, "the send's wake entry");
        queues.expire(due).expect("expire");
        let pages = store.inner().queues.scan_prefix([keys::PAGE]).count();
        assert_eq!(pages, 0, "the send is forgotten");
        store.inner().sync().await.expect("durable");
        // The writer crashes: no close.
        std::mem::forget(queues);
    });
    let heads = super::recovery::recover_heads(&store.inner(), USER, &[1], now).expect("heads");
    assert_eq!(heads[&1].next_seq, 2, "number 1 is never handed out again");
    assert_eq!(heads[&1].count, 0);
}

/// A send whose envelopes were all acknowledged before its writer crashed, and before it was
/// listed in a page, is still known after the crash: `L` lists it. A retry of it is answered
/// as a duplicate and stored nowhere again.
#[test]
fn a_retry_after_a_crash_of_a_send_acknowledged_before_its_page_is_a_duplicate() {
    const USER: &str = "bob@test.example";
    let dir = tempfile::tempdir().expect("tempdir");
    let now = crate::clock::now_ms();
    let limits = QueueLimits {
        count: 10,
        bytes: u64::MAX,
    };
    let store = open(dir.path());
    let send = |n: u8| crate::store::NewEnvelope {
        id: [n; 16],
        class: 0,
        accepted_ms: now,
        expires_ms: now + 3_600_000,
        remember_until_ms: now + 3_600_000,
        copies: vec![(1, &[5u8; 4][..])],
    };
    block_on(async {
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        for n in 1..=3 {
            queues
                .append(send(n))
                .expect("append")
                .await
                .expect("durable");
        }
        let acked: Vec<_> = (1..=2)
            .map(|seq| crate::store::Trim {
                seq,
                expires_ms: now + 3_600_000,
                bytes: 4,
            })
            .collect();
        queues
            .trim(1, &acked)
            .expect("trim")
            .await
            .expect("durable");
        assert_eq!(store.inner().queues.scan_prefix([keys::PAGE]).count(), 0);
        // The writer crashes: dropped without a close.
        drop(queues);
    });
    drop(store);
    let store = open(dir.path());
    block_on(async {
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        for n in 1..=3 {
            let retry = queues
                .append(send(n))
                .expect("append")
                .await
                .expect("durable");
            assert!(retry.duplicate, "send {n} forgotten");
        }
        assert_eq!(queues.ends(), vec![(1, 4)]);
        let queued = store.inner().read(USER, 1, 0, 10).expect("read");
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].0, 3);
    });
}

/// A user whose sends layout 4 stored (a dedup record each, no `L`) keeps them after the
/// upgrade: a retry is a duplicate, a crash rolls back neither them nor the sends after.
#[test]
fn sends_stored_by_layout_4_are_kept_and_deduplicated() {
    const USER: &str = "bob@test.example";
    let dir = tempfile::tempdir().expect("tempdir");
    let now = crate::clock::now_ms();
    let limits = QueueLimits {
        count: 10,
        bytes: u64::MAX,
    };
    let store = open(dir.path());
    let heads = std::collections::BTreeMap::from([(1, super::recovery::empty_head())]);
    let old = super::recovery::tests::layout_4_send(&store, USER, [4; 16], now + 60_000, &heads);
    store.inner().write(old).expect("write");
    let send = |n: u8| crate::store::NewEnvelope {
        id: [n; 16],
        class: 0,
        accepted_ms: now,
        expires_ms: now + 60_000,
        remember_until_ms: now + 60_000,
        copies: vec![(1, &[5u8; 4][..])],
    };
    block_on(async {
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        assert_eq!(queues.ends(), vec![(1, 2)], "the layout-4 send is kept");
        let retry = queues
            .append(send(4))
            .expect("append")
            .await
            .expect("durable");
        assert!(retry.duplicate);
        assert_eq!(retry.stored, vec![(1, 1)]);
        let new = queues
            .append(send(5))
            .expect("append")
            .await
            .expect("durable");
        assert_eq!(new.stored, vec![(1, 2)]);
        // Dropped without a close, as in a crash.
        drop(queues);
    });
    drop(store);
    let store = open(dir.path());
    block_on(async {
        let mut queues = store.open(USER, &[1], limits).await.expect("open");
        assert_eq!(queues.ends(), vec![(1, 3)]);
        let ids: Vec<_> = store
            .inner()
            .read(USER, 1, 0, 10)
            .expect("read")
            .into_iter()
            .map(|(seq, r)| (seq, r.id[0]))
            .collect();
        assert_eq!(ids, vec![(1, 4), (2, 5)]);
        for n in [4, 5] {
            let retry = queues
                .append(send(n))
                .expect("append")
                .await
                .expect("durable");
            assert!(retry.duplicate, "send {n}");
        }
    });
}

/// The data directory names the layout that wrote it: a build refuses one a newer build
/// wrote, rather than taking what it does not know for damage.
#[test]
fn a_directory_a_newer_layout_wrote_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    assert_eq!(
        store
            .inner()
            .queues
            .get(keys::LAYOUT)
            .expect("get")
            .as_deref(),
        Some(&[5u8][..])
    );
    store
        .inner()
        .queues
        .insert(keys::LAYOUT, &[6u8])
        .expect("insert");
    store.inner().db.flush().expect("flush");
    drop(store);
    let refused = SledStore::open_waiting(&StoreOptions::for_tests(dir.path()));
    let Err(StoreError::Corruption(why)) = refused else {
        panic!("opened a layout-6 directory");
    };
    assert!(why.contains("newer build"), "{why}");
}

#[test]
fn a_flush_at_a_low_rate_starts_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open_waiting(&StoreOptions {
        commit_delay: std::time::Duration::from_secs(60),
        ..StoreOptions::for_tests(dir.path())
    })
    .unwrap();
    let inner = s.inner();
    block_on(async {
        // A flush that serves several requests (an acknowledgement's and two sends') made the
        // next one linger, whatever the rate; only a rate of thousands a second does now.
        let lazy = inner.flushed(false);
        let (a, b) = (inner.sync(), inner.sync());
        for flushed in [lazy, a, b] {
            flushed.await.unwrap();
        }
        let started = std::time::Instant::now();
        inner.sync().await.unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "lingered {:?}",
            started.elapsed()
        );
    });
}

/// Layout 5's pages: a writer lists its sends in memory and stores the list in a page with
/// one `W` index entry every `INDEX_EVERY` sends and when it closes; until then a wake entry
/// (a `Z` entry listing nothing) is due when the first listed send is.
mod index {
    use super::*;
    use crate::store::{AppendError, UserInbox, keys, sled::inbox::INDEX_EVERY};

    const USER: &str = "bob@test.example";
    const LIMITS: QueueLimits = QueueLimits {
        count: 10_000,
        bytes: u64::MAX,
    };

    fn id(n: u32) -> [u8; 16] {
        let mut id = [0; 16];
        id[..4].copy_from_slice(&n.to_be_bytes());
        id
    }

    /// Appends envelope `n` to device 1, expiring at `expires_ms`, its id remembered until
    /// `remember_ms`; resolves once it is durable.
    async fn send(queues: &mut dyn UserInbox, n: u32, expires_ms: u64, remember_ms: u64) {
        try_send(queues, n, expires_ms, remember_ms)
            .await
            .expect("append");
    }

    /// [`send`], refusals returned.
    async fn try_send(
        queues: &mut dyn UserInbox,
        n: u32,
        expires_ms: u64,
        remember_ms: u64,
    ) -> Result<(), AppendError> {
        let answer = queues.append(crate::store::NewEnvelope {
            id: id(n),
            class: 0,
            accepted_ms: 0,
            expires_ms,
            remember_until_ms: remember_ms,
            copies: vec![(1, &b"ciphertext"[..])],
        })?;
        answer.await.expect("durable");
        Ok(())
    }

    /// Makes `sends` ((n, expires_ms, remember_ms)) through a writer that closes, then opens
    /// the queues again.
    async fn sent_and_closed(store: &SledStore, sends: &[(u32, u64, u64)]) -> Box<dyn UserInbox> {
        let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
        for &(n, expires_ms, remember_ms) in sends {
            send(queues.as_mut(), n, expires_ms, remember_ms).await;
        }
        queues.close();
        store.open(USER, &[1], LIMITS).await.expect("open")
    }

    /// Makes three sends due at `now + 1_000` through a writer that then closes the queues
    /// (`close`) or is dropped as in a crash, and opens the store again.
    fn three_sends_then(dir: &std::path::Path, now: u64, close: bool) -> SledStore {
        let store = open(dir);
        block_on(async {
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            for n in 0..3 {
                send(queues.as_mut(), n, now + 1_000, now + 1_000).await;
            }
            if close {
                queues.close();
            }
        });
        drop(store);
        open(dir)
    }

    fn entries(store: &SledStore, tag: u8) -> usize {
        store.inner().queues.scan_prefix([tag]).count()
    }

    /// The stored index entries: how many are wake entries, and the keyed ids the others
    /// list (through their pages).
    fn stored(store: &SledStore) -> (usize, Vec<[u8; 16]>) {
        let due = store.inner().due(u64::MAX - 1, 10_000).expect("due");
        let mut wakes = 0;
        let mut ids = Vec::new();
        for d in due {
            match d {
                Due::Sends { ids: listed, .. } if listed.is_empty() => wakes += 1,
                Due::Page { page, .. } => {
                    let page = store
                        .inner()
                        .page(USER, page)
                        .expect("page")
                        .expect("stored");
                    ids.extend(page.sends.iter().map(|s| s.id));
                }
                other => panic!("{other:?}"),
            }
        }
        (wakes, ids)
    }

    /// The keyed id of envelope `n`.
    fn hashed(store: &SledStore, n: u32) -> [u8; 16] {
        store.inner().keyring.id(&id(n))
    }

    #[test]
    fn sends_share_index_entries_stored_every_index_every_sends_and_at_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let now = crate::clock::now_ms();
        block_on(async {
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            let last = u32::try_from(INDEX_EVERY).expect("small") - 1;
            for n in 0..last {
                send(queues.as_mut(), n, now + 60_000, now + 60_000).await;
            }
            // No entry of its own per send: one wake entry, due with the first.
            assert_eq!(entries(&store, keys::EXPIRY_DEDUP), 0);
            assert_eq!(stored(&store), (1, Vec::new()));
            let due = store.due(now + 61_000, 100).await.expect("due");
            assert!(
                matches!(&due[..], [Due::Sends { user, ids, .. }] if user == USER && ids.is_empty()),
                "{due:?}"
            );
            assert!(store.due(now, 100).await.expect("due").is_empty());
            // The list's last send stores it, one page and its entry, and takes the wake
            // entry away. No send stored a record of its own besides its envelope.
            send(queues.as_mut(), last, now + 60_000, now + 60_000).await;
            assert_eq!(entries(&store, keys::PAGE), 1);
            assert_eq!(entries(&store, keys::EXPIRY_PAGE), 1);
            assert_eq!(entries(&store, keys::DEDUP), 0);
            assert_eq!(entries(&store, keys::LAST_SEND), 1);
            let (wakes, ids) = stored(&store);
            assert_eq!((wakes, ids.len()), (0, INDEX_EVERY));
            // Closing stores what it lists since, and its wake entry goes.
            send(queues.as_mut(), last + 1, now + 60_000, now + 60_000).await;
            assert_eq!(stored(&store).0, 1);
            queues.close();
            let (wakes, ids) = stored(&store);
            assert_eq!((wakes, ids.len()), (0, INDEX_EVERY + 1));
        });
    }

    #[test]
    fn sends_listed_in_memory_expire_through_their_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let now = crate::clock::now_ms();
        block_on(async {
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            send(queues.as_mut(), 1, now + 1_000, now + 1_000).await;
            send(queues.as_mut(), 2, now + 5_000, now + 5_000).await;
            let due = store.due(now + 2_000, 100).await.expect("due");
            assert_eq!(queues.expire(due).expect("expire"), vec![(1, 1)]);
            assert_eq!(store.inner().read(USER, 1, 0, 10).expect("read").len(), 1);
            // The wake entry paged both; the page lists the other, due with it.
            assert!(store.due(now + 4_000, 100).await.expect("due").is_empty());
            assert_eq!(stored(&store), (0, vec![hashed(&store, 2)]));
            let due = store.due(now + 6_000, 100).await.expect("due");
            assert_eq!(queues.expire(due).expect("expire"), vec![(1, 2)]);
            assert_eq!(
                entries(&store, keys::PAGE),
                0,
                "the page went with its sends"
            );
            assert!(store.due(u64::MAX - 1, 100).await.expect("due").is_empty());
        });
    }

    #[test]
    fn undecodable_index_entries_are_skipped_and_the_rest_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let now = crate::clock::now_ms();
        // Damaged entries of each layout, due before the good one: sealed values that do
        // not open, and a key cut short.
        let user = store.inner().keyring.user(USER);
        let damaged = [
            keys::expiry_envelope(now - 5_000, &user, 1, 1),
            keys::expiry_dedup(now - 5_000, &user, &[0; 16]),
            keys::expiry_sends(now - 5_000, &user, 7),
            vec![keys::EXPIRY_SENDS, 0, 0],
        ];
        for key in &damaged {
            store
                .inner()
                .queues
                .insert(key, &b"not an index entry"[..])
                .expect("insert");
        }
        block_on(async {
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            send(queues.as_mut(), 1, now + 1_000, now + 1_000).await;
            let due = store.due(now + 2_000, 100).await.expect("the scan goes on");
            assert!(
                matches!(&due[..], [Due::Sends { user, .. }] if user == USER),
                "{due:?}"
            );
            assert_eq!(queues.expire(due).expect("expire"), vec![(1, 1)]);
            // Skipped, not deleted: what cannot be read is not destroyed on a guess.
            for key in &damaged {
                assert!(store.inner().queues.contains_key(key).expect("read"));
            }
            assert_eq!(
                store
                    .inner()
                    .undecodable_index
                    .load(std::sync::atomic::Ordering::Relaxed),
                4
            );
        });
    }

    #[test]
    fn a_scan_passes_over_at_most_limit_undecodable_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let now = crate::clock::now_ms();
        let user = store.inner().keyring.user(USER);
        for nonce in 0..3 {
            let key = keys::expiry_sends(now - 5_000, &user, nonce);
            store.inner().queues.insert(key, &b"x"[..]).expect("insert");
        }
        let counted = || {
            store
                .inner()
                .undecodable_index
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        block_on(async {
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            send(queues.as_mut(), 1, now + 1_000, now + 1_000).await;
            // Two passed over fill a batch of two: the scan stops, knowing at least two.
            assert!(store.due(now + 2_000, 2).await.expect("due").is_empty());
            assert_eq!(counted(), 2);
            // A batch with room sees them all, and the entry behind them.
            let due = store.due(now + 2_000, 10).await.expect("due");
            assert!(matches!(&due[..], [Due::Sends { .. }]), "{due:?}");
            assert_eq!(counted(), 3);
            // One that fills the batch with a good entry counts no less than it knew.
            for nonce in 0..3 {
                let key = keys::expiry_sends(now - 5_000, &user, nonce);
                store.inner().queues.remove(key).expect("remove");
            }
            assert_eq!(store.due(now + 2_000, 1).await.expect("due").len(), 1);
            assert_eq!(counted(), 3);
            // A whole scan again: the count is exact.
            assert_eq!(store.due(now + 2_000, 10).await.expect("due").len(), 1);
            assert_eq!(counted(), 0);
        });
    }

    #[test]
    fn a_closed_writers_sends_expire_through_their_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::clock::now_ms();
        let store = three_sends_then(dir.path(), now, true);
        block_on(async {
            let due = store.due(now + 2_000, 100).await.expect("due");
            assert!(matches!(&due[..], [Due::Page { .. }]), "{due:?}");
            assert_eq!(stored(&store).1.len(), 3);
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            let mut expired = queues.expire(due).expect("expire");
            expired.sort_unstable();
            assert_eq!(expired, vec![(1, 1), (1, 2), (1, 3)]);
            assert!(store.inner().read(USER, 1, 0, 10).expect("read").is_empty());
            assert_eq!(entries(&store, keys::PAGE), 0);
            assert_eq!(entries(&store, keys::EXPIRY_PAGE), 0);
        });
    }

    /// A writer that dies without closing takes its list along. Its wake entry brings the
    /// sweep to the user (no mailbox open), and opening the queues then pages what is queued
    /// past the last page `L` names, so nothing stays stored for ever.
    #[test]
    fn a_crashed_writers_sends_are_found_by_its_wake_entry_and_listed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::clock::now_ms();
        // Dropped without `close`, as in a crash: no list stored, no `K` mark.
        let store = three_sends_then(dir.path(), now, false);
        block_on(async {
            let due = store.due(now + 2_000, 100).await.expect("due");
            assert!(matches!(&due[..], [d] if d.user() == USER), "{due:?}");
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            assert_eq!(stored(&store).1.len(), 3, "paged by the recount");
            // What was queued of them is remembered: a retry is a duplicate.
            assert!(queues.duplicate(&id(2)).expect("dup").is_some());
            let due = store.due(now + 2_000, 100).await.expect("due");
            let mut expired = queues.expire(due).expect("expire");
            expired.sort_unstable();
            assert_eq!(expired, vec![(1, 1), (1, 2), (1, 3)]);
            assert_eq!(entries(&store, keys::PAGE), 0);
            assert_eq!(entries(&store, keys::EXPIRY_SENDS), 0);
            assert_eq!(entries(&store, keys::EXPIRY_PAGE), 0);
        });
    }

    /// A send paged twice (its writer stored its list in the send that filled it, whose `L`
    /// still names the sends as not paged, then died; the recount pages them again) is
    /// counted off its queue once.
    #[test]
    fn a_send_listed_twice_is_expired_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::clock::now_ms();
        let listed = u32::try_from(INDEX_EVERY).expect("small");
        {
            let store = open(dir.path());
            block_on(async {
                let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
                send(queues.as_mut(), 0, now + 100_000, now + 100_000).await;
                for n in 1..listed {
                    send(queues.as_mut(), n, now + 1_000, now + 1_000).await;
                }
                assert_eq!(entries(&store, keys::PAGE), 1);
                drop(queues);
            });
        }
        let store = open(dir.path());
        block_on(async {
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            assert_eq!(stored(&store).1.len(), 2 * INDEX_EVERY);
            let due = store.due(now + 2_000, 100).await.expect("due");
            let mut expired = queues.expire(due).expect("expire");
            expired.sort_unstable();
            let once: Vec<_> = (2..=u64::from(listed)).map(|seq| (1, seq)).collect();
            assert_eq!(expired, once);
            queues.close();
            // One envelope is left, and the stored head counts it: a quota of two takes one more.
            let two = QueueLimits {
                count: 2,
                bytes: u64::MAX,
            };
            let mut queues = store.open(USER, &[1], two).await.expect("open");
            try_send(queues.as_mut(), 1000, now + 100_000, now + 100_000)
                .await
                .expect("room for one");
            assert!(matches!(
                try_send(queues.as_mut(), 1001, now + 100_000, now + 100_000).await,
                Err(AppendError::Full(_))
            ));
        });
    }

    /// A page is swept as its sends fall due: each send's envelopes when they expire, the
    /// page once the last send's dedup window has ended too.
    #[test]
    fn a_page_is_swept_as_its_sends_fall_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let now = crate::clock::now_ms();
        block_on(async {
            let sends = [(1, now + 1_000, now + 2_500), (2, now + 5_000, now + 5_000)];
            let mut queues = sent_and_closed(&store, &sends).await;
            let due = store.due(now + 7_000, 100).await.expect("due");
            assert_eq!(due.len(), 1, "{due:?}");
            assert_eq!(queues.expire(due).expect("expire"), vec![(1, 1)]);
            let both = vec![hashed(&store, 1), hashed(&store, 2)];
            assert_eq!(stored(&store), (0, both), "both still listed");
            let due = store.due(now + 7_000, 100).await.expect("due");
            assert_eq!(queues.expire(due).expect("expire"), vec![(1, 2)]);
            assert_eq!(entries(&store, keys::PAGE), 0);
            assert_eq!(entries(&store, keys::EXPIRY_PAGE), 0);
        });
    }

    /// A send made again with the same id after its dedup window is another send: the
    /// envelopes of both expire, also when one sweep finds both due.
    #[test]
    fn two_sends_with_one_id_both_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let now = crate::clock::now_ms();
        block_on(async {
            // Remembered until `now`: the second is not a duplicate.
            let sends = [(1, now + 1_000, now), (1, now + 1_000, now)];
            let mut queues = sent_and_closed(&store, &sends).await;
            assert_eq!(store.inner().read(USER, 1, 0, 10).expect("read").len(), 2);
            let due = store.due(now + 3_000, 100).await.expect("due");
            let mut expired = queues.expire(due).expect("expire");
            expired.sort_unstable();
            assert_eq!(expired, vec![(1, 1), (1, 2)]);
            assert_eq!(entries(&store, keys::PAGE), 0);
        });
    }

    /// A send remembered past its envelopes' expiry keeps its page until its window ends.
    #[test]
    fn a_send_remembered_past_its_envelopes_keeps_its_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let now = crate::clock::now_ms();
        block_on(async {
            let mut queues = sent_and_closed(&store, &[(1, now + 1_000, now + 9_000)]).await;
            let due = store.due(now + 2_000, 100).await.expect("due");
            assert_eq!(queues.expire(due).expect("expire"), vec![(1, 1)]);
            assert_eq!(stored(&store), (0, vec![hashed(&store, 1)]), "still listed");
            // A retry now is still a duplicate, also for a writer that opens the queues anew.
            assert!(queues.duplicate(&id(1)).expect("dup").is_some());
            queues.close();
            let mut queues = store.open(USER, &[1], LIMITS).await.expect("open");
            assert!(queues.duplicate(&id(1)).expect("dup").is_some());
            assert!(store.due(now + 8_000, 100).await.expect("due").is_empty());
            let due = store.due(now + 10_000, 100).await.expect("due");
            assert!(queues.expire(due).expect("expire").is_empty());
            assert_eq!(entries(&store, keys::PAGE), 0);
            assert_eq!(entries(&store, keys::EXPIRY_PAGE), 0);
            queues.close();
            assert_eq!(entries(&store, keys::EXPIRY_SENDS), 0);
        });
    }
}
