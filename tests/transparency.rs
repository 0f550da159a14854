//! Key transparency end to end: real broker processes keep their domain's log, serve lookup
//! proofs with every device list, and audit each other's logs over the federation links;
//! clients (the real SDK) verify every proof, follow the roots with append-only proofs, check
//! auditors' co-signatures, and monitor their own account's entry.
//!
//! The forgeries a broker could try (a tampered proof, a forked root, a rolled-back root, a
//! split view) are also checked below against the log code itself, where each can be made
//! exactly.

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    Broker, WAIT,
    sdk::{Dev, next, register},
    site::Site,
};
use sealpost::{
    crypto::LogKeys,
    store::transparency::memory::MemoryTransparency,
    transparency::{Log, LogSettings},
};
use sealpost_client::{
    ClientError, Event,
    crypto::{
        DeviceList, MasterKey,
        transparency::{Audit, LogPins, LogStatus, Step, TransparencyError},
    },
};
use sealpost_proto::transparency::{Cosignature, Evidence, SignedRoot};

/// Waits until `cond` holds (checking every 50 ms), within the tests' patience.
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn json(url: String) -> serde_json::Value {
    reqwest::get(url)
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// The co-signatures `broker` holds of `domain`'s root at `epoch`.
async fn cosignatures(broker: &Broker, domain: &str, epoch: u64) -> Vec<Cosignature> {
    let v = json(format!(
        "{}/v1/transparency/cosignatures?domain={domain}&epoch={epoch}",
        broker.http()
    ))
    .await;
    sealpost_client::http::records(&v, "cosignatures")
        .expect("records")
        .iter()
        .map(|b| Cosignature::from_bytes(b).expect("cosignature"))
        .collect()
}

async fn newest_root(broker: &Broker) -> SignedRoot {
    let v = json(format!("{}/v1/transparency/root", broker.http())).await;
    SignedRoot::from_bytes(&sealpost_client::http::record(&v, "root").expect("root"))
        .expect("decode")
}

/// Three domains, each broker pinning the others.
fn three(equivocating_a_to: &[&str]) -> (Broker, Broker, Broker) {
    let a = Site::new("a.example", "127.0.0.1");
    let b = Site::new("b.example", "127.0.0.2");
    let c = Site::new("c.example", "127.0.0.3");
    let entries = [a.peer_entry(), b.peer_entry(), c.peer_entry()];
    let peers = |i: usize| {
        entries
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, e)| e.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut sites = [a, b, c];
    if !equivocating_a_to.is_empty() {
        let dir = sites[0].dir.as_ref().expect("not started");
        std::fs::write(
            dir.path().join("equivocate-to"),
            equivocating_a_to.join("\n"),
        )
        .expect("arm equivocation");
    }
    let [a, b, c] = &mut sites;
    (
        a.start_raw(&peers(0), &[]),
        b.start_raw(&peers(1), &[]),
        c.start_raw(&peers(2), &[]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_across_domains_are_proved_followed_and_cosigned_by_the_other_domains() {
    if common::nats_store() {
        return; // the NATS store keeps no log yet
    }
    let (ba, bb, _bc) = three(&[]);
    let mut alice = register(&ba, "alice@a.example").await;
    let mut bob = register(&bb, "bob@b.example").await;

    alice
        .client
        .send_text("bob@b.example", "hi")
        .await
        .expect("send");
    assert!(matches!(next(&mut bob.client).await, Event::Message(m) if m.text == "hi"));
    // Alice's client checked bob's list against b.example's log, through her own broker.
    let (first, _) = alice
        .client
        .transparency()
        .newest("b.example")
        .expect("b's root seen");
    assert!(first >= 1);

    // Bob's account changes (a second device): b.example publishes new epochs, and alice's
    // client follows them with append-only proofs.
    let bob2 = common::sdk::link(&bb, &mut bob).await;
    alice.client.set_device_list_max_age(Duration::ZERO);
    alice
        .client
        .send_text("bob@b.example", "both")
        .await
        .expect("send");
    let (later, _) = alice
        .client
        .transparency()
        .newest("b.example")
        .expect("root");
    assert!(later > first, "{later} > {first}");
    drop(bob2);

    // Both other domains audit a.example and co-sign its roots; a holds their co-signatures.
    let root = newest_root(&ba).await;
    until("b and c co-signed a's root", async || {
        let mut by: Vec<String> = cosignatures(&ba, "a.example", root.epoch)
            .await
            .into_iter()
            .map(|c| c.auditor)
            .collect();
        by.sort();
        by == ["b.example", "c.example"]
    })
    .await;
    for c in cosignatures(&ba, "a.example", root.epoch).await {
        assert_eq!(c.root.root_hash, root.root_hash);
    }
    // Alice's client sees b.example's log audited by the other two domains once they have
    // co-signed the root it holds.
    let bob_root = newest_root(&bb).await;
    until("a and c co-signed b's root", async || {
        cosignatures(&ba, "b.example", bob_root.epoch).await.len() == 2
    })
    .await;
    alice
        .client
        .send_text("bob@b.example", "audited")
        .await
        .expect("send");
    assert_eq!(
        alice.client.log_status("bob@b.example"),
        LogStatus::CoSigned(vec!["a.example".into(), "c.example".into()])
    );

    // Alice's own entry holds nothing she did not make.
    assert_eq!(alice.client.check_own_log().await.expect("own log"), 0);
    assert!(!has_foreign_key(&mut alice).await);
}

async fn has_foreign_key(dev: &mut Dev) -> bool {
    // Events already queued come at once; wait a moment for nothing else.
    let mut found = false;
    while let Ok(Ok(event)) =
        tokio::time::timeout(Duration::from_millis(300), dev.client.next_event()).await
    {
        found |= matches!(event, Event::ForeignKeyPublished { .. });
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_operator_injects_through_the_store_is_caught_by_the_accounts_own_device() {
    if common::nats_store() {
        return;
    }
    let mut broker = Broker::start(&[]);
    let mut alice = register(&broker, "alice@test.example").await;
    let mut bob = register(&broker, "bob@test.example").await;
    alice
        .client
        .send_text("bob@test.example", "hi")
        .await
        .expect("send");
    assert!(matches!(next(&mut bob.client).await, Event::Message(_)));
    assert_eq!(alice.client.check_own_log().await.expect("own log"), 0);
    assert!(!has_foreign_key(&mut alice).await);

    // An intruder with the data directory (or the operator) replaces alice's list with one
    // of a master key they hold, as if she had rotated it.
    assert!(broker.terminate());
    {
        use sealpost::store::Directory;
        let store = broker.open_store();
        let theirs = MasterKey::generate();
        let list = DeviceList {
            user: "alice@test.example".into(),
            version: 99,
            devices: Vec::new(),
            master_key: theirs.public_key(),
        };
        let signed = list.sign(&theirs).expect("sign");
        store
            .set_device_list("alice@test.example", signed.to_bytes())
            .await
            .expect("inject");
    }
    broker.restart();

    // Bob's client sees the new key (as it would without a log, for a pinned contact)...
    bob.client.set_device_list_max_age(Duration::ZERO);
    let err = bob
        .client
        .send_text("alice@test.example", "still you?")
        .await
        .expect_err("a changed key is not used silently");
    assert!(matches!(err, ClientError::MasterKeyChanged { .. }), "{err}");
    // ...and alice's own device, which would otherwise never know, is warned: the key is in
    // the log that everyone's clients check.
    assert_eq!(alice.client.check_own_log().await.expect("own log"), 1);
    assert!(has_foreign_key(&mut alice).await, "alice was not warned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_equivocating_broker_is_caught_by_its_auditors_and_by_clients() {
    if common::nats_store() {
        return;
    }
    // a.example shows c.example a forked log, and everyone else the real one.
    let (ba, bb, bc) = three(&["c.example"]);
    let mut alice = register(&ba, "alice@a.example").await;
    let mut bob = register(&bb, "bob@b.example").await;
    alice
        .client
        .send_text("bob@b.example", "hi")
        .await
        .expect("send");
    assert!(matches!(next(&mut bob.client).await, Event::Message(_)));

    // b and c each co-signed what they were shown and told each other: at b, the epoch now
    // has two co-signed root hashes, and both auditors logged the split view.
    let epoch = newest_root(&ba).await.epoch;
    until("b holds co-signatures of two different roots", async || {
        let found = cosignatures(&bb, "a.example", epoch).await;
        found.len() == 2 && found[0].root.root_hash != found[1].root.root_hash
    })
    .await;
    until("the auditors logged the split view", async || {
        String::from_utf8_lossy(&bb.read_logs()).contains("SPLIT VIEW")
            && String::from_utf8_lossy(&bc.read_logs()).contains("SPLIT VIEW")
    })
    .await;

    // Bob's client, given alice's list with b's (real) view, finds c's co-signature of
    // another root for the same epoch, and refuses to use the list.
    bob.client.set_device_list_max_age(Duration::ZERO);
    let err = bob
        .client
        .send_text("alice@a.example", "who are you?")
        .await
        .expect_err("a split view blocks sending");
    assert!(
        matches!(
            &err,
            ClientError::Transparency {
                error: TransparencyError::SplitView { domain, .. },
                ..
            } if domain == "a.example"
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_log_is_caught_by_its_auditors_and_by_clients() {
    if common::nats_store() {
        return;
    }
    let (mut ba, bb, _bc) = three(&[]);
    let _alice = register(&ba, "alice@a.example").await;
    let carol = register(&ba, "carol@a.example").await;
    let mut bob = register(&bb, "bob@b.example").await;
    bob.client.set_device_list_max_age(Duration::ZERO);
    // Bob's client checks carol's list against a.example's newest root; b.example audits it.
    bob.client
        .send_text("carol@a.example", "hi")
        .await
        .expect("send");
    let (seen, _) = bob
        .client
        .transparency()
        .newest("a.example")
        .expect("a's root");
    assert!(seen >= 2, "both accounts are in the log");
    until("b audited a's newest root", async || {
        cosignatures(&bb, "a.example", seen)
            .await
            .iter()
            .any(|c| c.auditor == "b.example")
    })
    .await;
    drop(carol);

    // The operator of a.example throws its log away (or restores an old copy): the new log
    // starts again and publishes lists as they are fetched.
    assert!(ba.terminate());
    std::fs::remove_dir_all(ba.data_dir().join("transparency")).expect("wipe the log");
    ba.restart();

    // Bob's client was shown epoch `seen`; the log now proves carol's list at an earlier
    // epoch. It refuses, whatever the list.
    // (b.example's link to a.example comes back first: until then the lookup is refused.)
    let deadline = tokio::time::Instant::now() + WAIT;
    let err = loop {
        match bob
            .client
            .send_text("carol@a.example", "still there?")
            .await
        {
            Err(ClientError::Api(e)) if e.is_transient() => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the link never came back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => break e,
            Ok(_) => panic!("a rolled-back log was accepted"),
        }
    };
    assert!(
        matches!(
            &err,
            ClientError::Transparency {
                error: TransparencyError::Rollback { .. } | TransparencyError::Fork { .. },
                ..
            }
        ),
        "{err}"
    );
    // b.example's auditor finds that a.example no longer extends the root it verified.
    until("b's auditor reported the fork", async || {
        String::from_utf8_lossy(&bb.read_logs())
            .contains("audit of a peer's transparency log failed peer=a.example error=fork")
    })
    .await;
}

/// A log of a.example and a client's view of it, in this process.
async fn log() -> Log {
    Log::open(
        "a.example".into(),
        Arc::new(MemoryTransparency::new()),
        LogKeys::from_seeds([1; 32], [2; 32]),
        LogSettings {
            epoch_interval: Duration::from_millis(5),
            wait: WAIT,
            equivocate_to: vec!["fork.example".into()],
        },
    )
    .await
    .expect("log")
}

fn signed_list(user: &str, version: u64) -> (MasterKey, Vec<u8>) {
    let master = MasterKey::generate();
    let list = DeviceList {
        user: user.into(),
        version,
        devices: Vec::new(),
        master_key: master.public_key(),
    };
    let bytes = list.sign(&master).expect("sign").to_bytes();
    (master, bytes)
}

#[tokio::test]
async fn clients_refuse_a_tampered_proof_a_fork_a_rollback_and_a_split_view() {
    const ALICE: &str = "alice@a.example";
    let log = log().await;
    let (_, first) = signed_list(ALICE, 1);
    let ev1 = log
        .evidence(ALICE, &first, None, true)
        .await
        .expect("evidence");
    let mut pins = LogPins::default();
    let (root1, step) = pins
        .check(ALICE, &first, Some(&ev1.to_bytes()))
        .expect("ok")
        .expect("log");
    assert_eq!(step, Step::None);
    pins.accept(&root1, 1);

    // A proof of another list, or a tampered root, does not pass.
    let (_, other) = signed_list(ALICE, 2);
    assert!(matches!(
        pins.check(ALICE, &other, Some(&ev1.to_bytes())),
        Err(TransparencyError::NotInLog(_))
    ));
    let mut bad = ev1.clone();
    bad.root.root_hash[3] ^= 1;
    assert!(matches!(
        pins.check(ALICE, &first, Some(&bad.to_bytes())),
        Err(TransparencyError::BadSignature(_))
    ));
    // A domain with a log cannot drop the evidence.
    assert!(matches!(
        pins.check(ALICE, &first, None),
        Err(TransparencyError::Missing(_))
    ));

    // Later epochs are followed with append-only proofs.
    let (_, second) = signed_list(ALICE, 2);
    let ev2 = log
        .evidence(ALICE, &second, None, true)
        .await
        .expect("evidence");
    let (root2, step) = pins
        .check(ALICE, &second, Some(&ev2.to_bytes()))
        .unwrap()
        .unwrap();
    let Step::Advance { from, to } = step else {
        panic!("{step:?}")
    };
    let (roots, proof) = log.audit(from, to, None).await.expect("audit");
    pins.verify_extension("a.example", (root1.epoch, root1.root_hash), &roots, &proof)
        .await
        .expect("extends");
    pins.accept(&root2, 2);

    // The fork the log shows fork.example: same epoch, other hash: a fork.
    let forked = log.latest(Some("fork.example")).await.expect("fork");
    assert_eq!(forked.epoch, root2.epoch);
    assert!(matches!(
        pins.place(&forked),
        Err(TransparencyError::Fork { .. })
    ));
    // Its roots do not extend what this client saw either.
    let (fork_roots, fork_proof) = log
        .audit(from, to, Some("fork.example"))
        .await
        .expect("audit");
    assert!(
        pins.verify_extension(
            "a.example",
            (root1.epoch, root1.root_hash),
            &fork_roots,
            &fork_proof
        )
        .await
        .is_err()
    );

    // A rolled-back root: alice's first list, genuinely proved at the earlier root, passed off
    // as current (she has changed it since) is refused.
    assert!(matches!(
        pins.check(ALICE, &first, Some(&ev1.to_bytes())),
        Err(TransparencyError::Rollback { epoch, .. }) if epoch == root1.epoch
    ));

    // Auditors: the real root co-signed passes; a co-signature of the fork for the same
    // epoch is a split view.
    let auditor = |name: &str, seed: u8, root: &SignedRoot| {
        let keys = LogKeys::from_seeds([seed; 32], [seed; 32]);
        let mut c = Cosignature {
            auditor: name.into(),
            auditor_key: keys.public(),
            root: root.clone(),
            signature: [0; 64],
        };
        c.signature = keys.sign(&c.signed_bytes());
        c.to_bytes()
    };
    // Not co-signed yet: pending within the grace time, unverified after it. The first root
    // seen since is the one whose co-signatures are awaited (a busy log's newest root is
    // rarely co-signed yet).
    assert_eq!(
        pins.awaited("a.example").map(|r| r.epoch),
        Some(root1.epoch)
    );
    assert_eq!(pins.status("a.example", 2, 1_000), LogStatus::Pending);
    assert_eq!(pins.status("a.example", 5_000, 1_000), LogStatus::Unaudited);
    let honest = auditor("b.example", 7, &root2);
    assert_eq!(
        pins.check_cosignatures(&root2, std::slice::from_ref(&honest), 3),
        Ok(Audit::CoSigned(vec!["b.example".into()]))
    );
    assert_eq!(
        pins.status("a.example", 5_000, 1_000),
        LogStatus::CoSigned(vec!["b.example".into()])
    );
    assert_eq!(pins.awaited("a.example"), None);
    // Nobody can frame the domain: a co-signature of a root it never signed, or one it
    // makes of itself, counts for nothing.
    let mut unsigned = forked.clone();
    unsigned.root_hash[0] ^= 1;
    let framing = auditor("d.example", 9, &unsigned);
    let selfish = auditor("a.example", 1, &root2);
    assert_eq!(
        pins.check_cosignatures(&root2, &[framing, selfish], 4),
        Ok(Audit::NotYet)
    );
    // A root the domain did sign for the same epoch, co-signed by another auditor: proof
    // that the domain showed two logs.
    let fooled = auditor("c.example", 8, &forked);
    assert!(matches!(
        pins.check_cosignatures(&root2, &[honest, fooled], 4),
        Err(TransparencyError::SplitView { .. })
    ));
    let _ = Evidence::from_bytes(&ev2.to_bytes()).expect("round trip");
}
