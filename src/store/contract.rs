//! The seams' contract as executable checks, run against every backend: the in-memory one and
//! sled (unit tests), and NATS JetStream on a real cluster (`tests/store_nats.rs`). A backend
//! passes when every check does. Each check works under its own handles (`prefix`), so that
//! several can share one store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures_util::future::join_all;

use super::{
    AppendError, DeliveryTokenRecord, DeviceRecord, EpochTaken,
    KeyKind::{Mls, Olm},
    KeyUpload, KeysPut, LinkCodeRecord, NewEnvelope, OutboxRecord, PushKind, PushRecord,
    QueueLimits, StoreError, Stores, Trim,
    records::RECORD_VERSION,
};

const LIMITS: QueueLimits = QueueLimits {
    count: 1000,
    bytes: 1 << 20,
};

fn device() -> DeviceRecord {
    DeviceRecord {
        version: RECORD_VERSION,
        token_hash: [1; 32],
        identity_keys: vec![2],
        created_ms: 0,
    }
}

/// Every check, one after the other.
pub async fn all(stores: &Stores, prefix: &str) {
    directory(stores, prefix).await;
    keys(stores, prefix).await;
    group_epochs(stores, prefix).await;
    inbox(stores, prefix).await;
    quota(stores, prefix).await;
    outbox(stores, prefix).await;
}

/// Accounts and devices: ids are never reused, limits and absent accounts are refused.
pub async fn directory(stores: &Stores, prefix: &str) {
    let d = &stores.directory;
    let a = format!("{prefix}a@x");
    assert_eq!(d.create_account(&a, 1, device()).await.unwrap(), 1);
    assert!(matches!(
        d.create_account(&a, 1, device()).await,
        Err(StoreError::AccountExists)
    ));
    assert!(d.account(&a).await.unwrap().is_some());
    assert!(
        d.account(&format!("{prefix}nobody@x"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(d.add_device(&a, device(), 16).await.unwrap(), 2);
    d.remove_device(&a, 1).await.unwrap();
    assert!(matches!(
        d.remove_device(&a, 1).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        d.add_device(&a, device(), 16).await.unwrap(),
        3,
        "ids are never reused"
    );
    let ids: Vec<u32> = d
        .devices(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, vec![2, 3]);
    assert!(d.device(&a, 2).await.unwrap().is_some());
    assert!(d.device(&a, 1).await.unwrap().is_none());
    assert!(matches!(
        d.add_device(&format!("{prefix}b@x"), device(), 16).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        d.add_device(&a, device(), 2).await,
        Err(StoreError::TooManyDevices)
    ));
    // Concurrent adds get distinct ids.
    let added = join_all((0..4).map(|_| d.add_device(&a, device(), 16))).await;
    let mut ids: Vec<u32> = added.into_iter().map(|r| r.unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "concurrent adds got distinct ids");

    assert!(d.device_list(&a).await.unwrap().is_none());
    d.set_device_list(&a, vec![9, 9]).await.unwrap();
    assert_eq!(d.device_list(&a).await.unwrap(), Some(vec![9, 9]));
    let token = DeliveryTokenRecord {
        version: RECORD_VERSION,
        token_hash: Some([3; 32]),
        unrestricted: false,
        of_proof: true,
    };
    d.set_delivery_token(&a, token.clone()).await.unwrap();
    assert!(d.delivery_token(&a).await.unwrap() == Some(token));

    let code = LinkCodeRecord {
        version: RECORD_VERSION,
        expires_ms: 1_000,
    };
    d.put_link_code(&a, [5; 32], code.clone()).await.unwrap();
    let taken = join_all((0..3).map(|_| d.take_link_code(&a, [5; 32], 10))).await;
    assert_eq!(
        taken.into_iter().filter(|t| *t.as_ref().unwrap()).count(),
        1,
        "a link code is taken once"
    );
    d.put_link_code(&a, [6; 32], code).await.unwrap();
    assert!(
        !d.take_link_code(&a, [6; 32], 2_000).await.unwrap(),
        "expired"
    );
    assert!(!d.take_link_code(&a, [7; 32], 10).await.unwrap(), "unknown");

    // Push subscriptions: per device, replaced, removed, and gone with their device.
    let push = |endpoint: &str| PushRecord {
        version: RECORD_VERSION,
        endpoint: endpoint.into(),
        p256dh: vec![4; 65],
        auth: vec![8; 16],
        kind: PushKind::WebPush,
    };
    assert!(d.push_subscription(&a, 2).await.unwrap().is_none());
    d.set_push_subscription(&a, 2, Some(push("https://p.example/1")))
        .await
        .unwrap();
    d.set_push_subscription(&a, 3, Some(push("https://p.example/3")))
        .await
        .unwrap();
    d.set_push_subscription(&a, 2, Some(push("https://p.example/2")))
        .await
        .unwrap();
    assert!(d.push_subscription(&a, 2).await.unwrap() == Some(push("https://p.example/2")));
    d.set_push_subscription(&a, 2, None).await.unwrap();
    assert!(d.push_subscription(&a, 2).await.unwrap().is_none());
    d.remove_device(&a, 3).await.unwrap();
    assert!(
        d.push_subscription(&a, 3).await.unwrap().is_none(),
        "a removed device's subscription goes with it"
    );
}

/// One-time keys: lowest first, each handed out once even to concurrent claims, then the
/// fallback key; uploads over the limit store nothing. Olm keys and MLS KeyPackages are two
/// separate sets: claiming one kind never hands out the other.
pub async fn keys(stores: &Stores, prefix: &str) {
    let d = &stores.directory;
    let a = format!("{prefix}k@x");
    d.create_account(&a, 1, device()).await.unwrap();
    let upload = |ids: std::ops::Range<u64>, max_held, fallback_id: u64| KeyUpload {
        one_time: ids.map(|i| (i, vec![u8::try_from(i).unwrap()])).collect(),
        fallback: Some(super::FallbackKeyRecord {
            version: RECORD_VERSION,
            key_id: fallback_id,
            key: vec![u8::try_from(fallback_id).unwrap()],
        }),
        max_held,
    };
    assert_eq!(
        d.put_keys(&a, 1, Olm, upload(1..6, 10, 100)).await.unwrap(),
        KeysPut::Held(5)
    );
    assert_eq!(
        d.put_keys(&a, 1, Olm, upload(4..6, 10, 100)).await.unwrap(),
        KeysPut::Held(5),
        "a retry does not count twice"
    );
    assert_eq!(
        d.put_keys(&a, 1, Olm, upload(6..12, 10, 100))
            .await
            .unwrap(),
        KeysPut::OverLimit
    );
    // The same ids as KeyPackages: a set of their own.
    assert_eq!(
        d.put_keys(&a, 1, Mls, upload(1..4, 10, 200)).await.unwrap(),
        KeysPut::Held(3)
    );
    let count = d.key_count(&a, 1, Olm).await.unwrap();
    assert_eq!((count.one_time, count.fallback), (5, true));
    let first = d.claim_key(&a, 1, Olm).await.unwrap().unwrap();
    assert_eq!((first.key_id, first.fallback, first.left), (1, false, 4));
    let claims = join_all((0..6).map(|_| d.claim_key(&a, 1, Olm))).await;
    let mut ids: Vec<u64> = Vec::new();
    let mut fallbacks = 0;
    for c in claims {
        let c = c.unwrap().unwrap();
        if c.fallback {
            fallbacks += 1;
            assert_eq!(c.key_id, 100);
        } else {
            ids.push(c.key_id);
        }
    }
    ids.sort_unstable();
    assert_eq!(ids, vec![2, 3, 4, 5], "each one-time key once");
    assert_eq!(fallbacks, 2);
    let count = d.key_count(&a, 1, Mls).await.unwrap();
    assert_eq!(
        (count.one_time, count.fallback),
        (3, true),
        "Olm claims leave the KeyPackages"
    );
    let claims = join_all((0..4).map(|_| d.claim_key(&a, 1, Mls))).await;
    let claimed: Vec<(u64, Vec<u8>, bool)> = claims
        .into_iter()
        .map(|c| c.unwrap().unwrap())
        .map(|c| (c.key_id, c.key, c.fallback))
        .collect();
    assert_eq!(
        claimed.iter().filter(|c| c.2).count(),
        1,
        "then the last resort"
    );
    assert!(claimed.contains(&(200, vec![200], true)));
    assert!(
        d.claim_key(&a, 9, Mls).await.unwrap().is_none(),
        "no such device"
    );
    d.add_device(&a, device(), 16).await.unwrap();
    d.remove_device(&a, 1).await.unwrap();
    for kind in [Olm, Mls] {
        let count = d.key_count(&a, 1, kind).await.unwrap();
        assert_eq!(
            (count.one_time, count.fallback),
            (0, false),
            "removed with the device"
        );
    }
}

/// A group's epochs at its hub: the first Commit of an epoch (and its retries) takes it, even
/// among concurrent ones; later and earlier ones are told the current epoch; groups are apart.
pub async fn group_epochs(stores: &Stores, prefix: &str) {
    let d = &stores.directory;
    let group = |n: u8| {
        let mut g = prefix.as_bytes().to_vec();
        g.resize(16, n);
        g
    };
    let (a, b) = (group(1), group(2));
    // A group never seen starts at its first Commit's epoch.
    assert_eq!(
        d.take_epoch(&a, 0, [1; 16], 5).await.unwrap(),
        EpochTaken::Taken
    );
    assert_eq!(
        d.take_epoch(&a, 0, [1; 16], 6).await.unwrap(),
        EpochTaken::Taken,
        "a retry of the winner"
    );
    assert_eq!(
        d.take_epoch(&a, 0, [2; 16], 6).await.unwrap(),
        EpochTaken::Stale { current: 1 },
        "the loser of epoch 0"
    );
    assert_eq!(
        d.take_epoch(&a, 7, [3; 16], 6).await.unwrap(),
        EpochTaken::Stale { current: 1 },
        "an epoch the group is not in"
    );
    // Eight concurrent Commits for epoch 1: exactly one wins.
    let racers = join_all((10..18u8).map(|i| d.take_epoch(&a, 1, [i; 16], 7))).await;
    let won = racers
        .into_iter()
        .filter(|r| *r.as_ref().unwrap() == EpochTaken::Taken)
        .count();
    assert_eq!(won, 1);
    assert_eq!(
        d.take_epoch(&a, 1, [99; 16], 8).await.unwrap(),
        EpochTaken::Stale { current: 2 }
    );
    assert_eq!(
        d.take_epoch(&b, 5, [1; 16], 5).await.unwrap(),
        EpochTaken::Taken
    );
    assert_eq!(
        d.take_epoch(&a, 2, [4; 16], 9).await.unwrap(),
        EpochTaken::Taken,
        "another group's Commit changes nothing here"
    );
}

fn envelope<'a>(id: u8, copies: Vec<(u32, &'a [u8])>) -> NewEnvelope<'a> {
    NewEnvelope {
        id: [id; 16],
        class: 0,
        accepted_ms: 1,
        expires_ms: u64::MAX / 2,
        remember_until_ms: u64::MAX / 2,
        copies,
    }
}

fn seqs(read: &[(u64, super::EnvelopeRecord)]) -> Vec<u64> {
    read.iter().map(|(s, _)| *s).collect()
}

fn trims(read: &[(u64, super::EnvelopeRecord)]) -> Vec<Trim> {
    read.iter()
        .map(|(seq, e)| Trim {
            seq: *seq,
            expires_ms: e.expires_ms,
            bytes: e.ciphertext.len() as u64,
        })
        .collect()
}

/// Device queues: per-device order and numbering (gap-free, going on after a queue drains
/// and after reopening), idempotent appends, trims, dropped queues.
pub async fn inbox(stores: &Stores, prefix: &str) {
    let user = format!("{prefix}i@x");
    let mut inbox = stores.inbox.open(&user, &[1, 2], LIMITS).await.unwrap();
    assert_eq!(inbox.ends(), vec![(1, 1), (2, 1)]);
    let appended = inbox
        .append(envelope(1, vec![(1, b"one-1"), (2, b"one-2")]))
        .unwrap()
        .await
        .unwrap();
    assert!(!appended.duplicate);
    assert_eq!(appended.stored, vec![(1, 1), (2, 1)]);
    assert!(appended.durable.contains(&(1, 2)) && appended.durable.contains(&(2, 2)));
    let again = inbox
        .append(envelope(1, vec![(1, b"one-1"), (2, b"one-2")]))
        .unwrap()
        .await
        .unwrap();
    assert!(again.duplicate, "appends are idempotent by id");
    assert_eq!(again.stored, vec![(1, 1), (2, 1)]);
    // Several appends in flight resolve in call order, numbered in that order.
    let pending: Vec<_> = (2..6)
        .map(|i| inbox.append(envelope(i, vec![(1, b"more")])).unwrap())
        .collect();
    let mut placed = Vec::new();
    for p in pending {
        placed.push(p.await.unwrap().stored[0]);
    }
    assert_eq!(placed, vec![(1, 2), (1, 3), (1, 4), (1, 5)]);
    let read = inbox.read(1, 1, 100).await.unwrap();
    assert_eq!(seqs(&read), vec![1, 2, 3, 4, 5]);
    assert_eq!(read[0].1.ciphertext, b"one-1");
    assert_eq!(read[0].1.id, [1; 16]);
    assert_eq!(
        seqs(&inbox.read(1, 3, 2).await.unwrap()),
        vec![3, 4],
        "from, limit"
    );
    inbox.trim(1, &trims(&read[..2])).unwrap().await.unwrap();
    assert_eq!(seqs(&inbox.read(1, 1, 100).await.unwrap()), vec![3, 4, 5]);
    // Drained: numbering goes on.
    inbox.trim(1, &trims(&read[2..])).unwrap().await.unwrap();
    assert!(inbox.read(1, 1, 100).await.unwrap().is_empty());
    let next = inbox
        .append(envelope(6, vec![(1, b"six")]))
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        next.stored,
        vec![(1, 6)],
        "a drained queue keeps its numbering"
    );
    drop(inbox);

    // Reopened: what is stored, and where numbering stands.
    let mut inbox = stores.inbox.open(&user, &[1, 2], LIMITS).await.unwrap();
    let mut ends = inbox.ends();
    ends.sort_unstable();
    assert_eq!(ends, vec![(1, 7), (2, 2)]);
    assert_eq!(seqs(&inbox.read(1, 1, 100).await.unwrap()), vec![6]);
    assert_eq!(seqs(&inbox.read(2, 1, 100).await.unwrap()), vec![1]);
    let read = inbox.read(1, 1, 100).await.unwrap();
    inbox.trim(1, &trims(&read)).unwrap().await.unwrap();
    drop(inbox);
    let mut inbox = stores.inbox.open(&user, &[1, 2], LIMITS).await.unwrap();
    assert!(
        inbox.ends().contains(&(1, 7)),
        "numbering survives a drain and a reopen"
    );
    assert_eq!(inbox.add_queue(3), 1, "a new device's queue starts at 1");
    inbox.drop_queue(2).unwrap().await.unwrap();
    drop(inbox);
    let inbox = stores.inbox.open(&user, &[1, 2], LIMITS).await.unwrap();
    assert!(
        inbox.read(2, 1, 100).await.unwrap().is_empty(),
        "a dropped queue is gone"
    );
}

/// Quotas: a full queue refuses at once and stores nothing.
pub async fn quota(stores: &Stores, prefix: &str) {
    let user = format!("{prefix}q@x");
    let limits = QueueLimits {
        count: 2,
        bytes: 1 << 20,
    };
    let mut inbox = stores.inbox.open(&user, &[1, 2], limits).await.unwrap();
    for i in 1..3 {
        inbox
            .append(envelope(i, vec![(1, b"x")]))
            .unwrap()
            .await
            .unwrap();
    }
    match inbox.append(envelope(3, vec![(1, b"x"), (2, b"y")])) {
        Err(AppendError::Full(devices)) => assert_eq!(devices, vec![1]),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a full queue took an envelope"),
    }
    assert!(
        inbox.read(2, 1, 10).await.unwrap().is_empty(),
        "nothing of it stored"
    );
    let bytes = QueueLimits {
        count: 100,
        bytes: 4,
    };
    let mut inbox = stores
        .inbox
        .open(&format!("{prefix}qb@x"), &[1], bytes)
        .await
        .unwrap();
    assert!(matches!(
        inbox.append(envelope(1, vec![(1, b"12345")])),
        Err(AppendError::Full(_))
    ));
}

fn outbox_record(id: u8) -> OutboxRecord {
    OutboxRecord {
        version: RECORD_VERSION,
        id: [id; 16],
        to: "bob@y".into(),
        class: 0,
        accepted_ms: u64::from(id),
        expires_ms: u64::MAX / 2,
        copies: vec![(1, serde_bytes::ByteBuf::from(vec![id; 3]))],
        admission: 0,
        token: None,
        group: None,
    }
}

/// Federation outboxes: per domain, ordered, removable.
pub async fn outbox(stores: &Stores, prefix: &str) {
    let o = &stores.outbox;
    let (x, y) = (format!("{prefix}x.example"), format!("{prefix}y.example"));
    assert!(o.index(&x).await.unwrap().is_empty());
    for seq in 1..4 {
        o.put(&x, seq, &outbox_record(u8::try_from(seq).unwrap()))
            .unwrap()
            .await
            .unwrap();
    }
    // A group message: one ciphertext, its recipients on the domain.
    let group = OutboxRecord {
        to: String::new(),
        group: Some(vec![crate::store::records::OutboxRecipient {
            to: "carol@y".into(),
            devices: vec![1, 2],
            admission: 1,
            token: Some(serde_bytes::ByteBuf::from(vec![7; 32])),
        }]),
        ..outbox_record(9)
    };
    o.put(&y, 1, &group).unwrap().await.unwrap();
    o.durable(&x).await.unwrap();
    let index = o.index(&x).await.unwrap();
    assert_eq!(
        index.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!((index[1].accepted_ms, index[1].bytes), (2, 3));
    let read = o.read(&x, 2, 10).await.unwrap();
    assert_eq!(read.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(read[0].1.id, [2; 16]);
    o.remove(&x, &[1, 2]).unwrap().await.unwrap();
    let left: Vec<u64> = o.index(&x).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(left, vec![3]);
    assert_eq!(o.index(&y).await.unwrap().len(), 1, "domains are separate");
    assert_eq!(o.read(&y, 1, 1).await.unwrap()[0].1, group);
}
