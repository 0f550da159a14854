//! One upload, many recipients (`group_send`), and Commits ordered at a group's hub — against
//! real broker processes, with real frames: locally, sealed, and across domains.

mod common;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{site::*, *};
use futures_util::SinkExt;
use sealpost_proto::{
    Class, ClientFrame, DeviceId, EnvelopeId, ErrorCode, GroupRecipient, Order, RecipientRefusal,
    ServerFrame,
    limits::{MAX_GROUP_CIPHERTEXT_BYTES, MAX_GROUP_RECIPIENTS},
};
use tokio_tungstenite::tungstenite::Message;

fn recipient(c: &[&Creds]) -> GroupRecipient {
    GroupRecipient {
        to: c[0].user.clone(),
        devices: c.iter().map(|c| c.device).collect(),
        delivery_token: None,
    }
}

fn group_send(
    id: EnvelopeId,
    ciphertext: &[u8],
    recipients: Vec<GroupRecipient>,
    order: Option<Order>,
) -> ClientFrame {
    ClientFrame::GroupSend {
        id,
        class: Class::Durable,
        ttl_secs: 600,
        ciphertext: ciphertext.to_vec(),
        recipients,
        order,
    }
}

/// Sends a frame and waits for its `group_send_result`: (code, refused, epoch).
async fn result(
    ws: &mut Ws,
    frame: ClientFrame,
) -> (Option<ErrorCode>, Vec<RecipientRefusal>, Option<u64>) {
    let ClientFrame::GroupSend { id, .. } = &frame else {
        panic!("not a group send");
    };
    let id = *id;
    ws.send(Message::Binary(frame.encode().into()))
        .await
        .expect("send");
    loop {
        match next_event(ws).await {
            Event::Frame(ServerFrame::GroupSendResult {
                id: got,
                code,
                refused,
                epoch,
            }) if got == id => return (code, refused, epoch),
            Event::Frame(_) => continue,
            Event::Closed(c) => panic!("closed: {c:?}"),
        }
    }
}

fn order(group: u8, epoch: u64, hub: &str) -> Option<Order> {
    Some(Order {
        group: vec![group; 16],
        epoch,
        hub: hub.into(),
    })
}

/// Collects `want` deliveries, acking each: their ciphertexts, in order.
async fn bodies(d: &mut Device, want: usize) -> Vec<Vec<u8>> {
    d.collect(want)
        .await
        .into_iter()
        .map(|(_, e)| e.ciphertext)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upload_reaches_every_listed_device_and_stale_sets_are_named() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let alice2 = add_device(&broker, &alice).await;
    let bob = register(&broker, "bob@test.example").await;
    let bob2 = add_device(&broker, &bob).await;
    let carol = register(&broker, "carol@test.example").await;
    let carol2 = add_device(&broker, &carol).await;
    let mut sender = Device::connect(&broker, &alice).await;
    assert!(sender.backlog().await.is_empty());

    // The sender's own account has every device listed, the sending one too (it recognises
    // its own send by id), as for a `send`.
    let everyone = || {
        vec![
            recipient(&[&alice, &alice2]),
            recipient(&[&bob, &bob2]),
            recipient(&[&carol, &carol2]),
        ]
    };
    for n in 0..3u8 {
        let (code, refused, _) = result(
            &mut sender.ws,
            group_send(eid(), &[b'm', n], everyone(), None),
        )
        .await;
        assert_eq!((code, refused), (None, vec![]));
    }
    for creds in [&alice2, &bob, &bob2, &carol, &carol2] {
        let mut d = Device::connect(&broker, creds).await;
        assert_eq!(
            bodies(&mut d, 3).await,
            vec![b"m\0".to_vec(), b"m\x01".to_vec(), b"m\x02".to_vec()],
            "every listed device, in order"
        );
    }

    // Carol's second device is left out: carol is refused with her devices, the others get it.
    let id = eid();
    let partial = vec![
        recipient(&[&bob, &bob2]),
        recipient(&[&carol]),
        GroupRecipient {
            to: "nobody@test.example".into(),
            devices: vec![DeviceId(1)],
            delivery_token: None,
        },
    ];
    let (code, mut refused, _) = result(&mut sender.ws, group_send(id, b"p", partial, None)).await;
    refused.sort_by(|a, b| a.to.cmp(&b.to));
    assert_eq!(code, None);
    assert_eq!(
        refused,
        vec![
            RecipientRefusal {
                to: carol.user.clone(),
                code: ErrorCode::StaleDevices,
                current_devices: vec![carol.device, carol2.device],
            },
            RecipientRefusal {
                to: "nobody@test.example".into(),
                code: ErrorCode::UnknownRecipient,
                current_devices: vec![],
            },
        ]
    );
    // The retry to carol alone, same id, completes the send; bob's copy is not doubled.
    let (code, refused, _) = result(
        &mut sender.ws,
        group_send(id, b"p", vec![recipient(&[&carol, &carol2])], None),
    )
    .await;
    assert_eq!((code, refused), (None, vec![]));
    let (code, refused, _) = result(
        &mut sender.ws,
        group_send(id, b"p", vec![recipient(&[&bob, &bob2])], None),
    )
    .await;
    assert_eq!((code, refused), (None, vec![]), "a duplicate is accepted");
    let mut b = Device::connect(&broker, &bob).await;
    assert_eq!(b.backlog().await.len(), 1, "bob has it once");
    let mut c = Device::connect(&broker, &carol2).await;
    assert_eq!(c.backlog().await.len(), 1);
}

/// A fan-out larger than the memory its copies may hold at once (`fanout_buffer_mb`) waits
/// for room recipient by recipient, and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_larger_than_its_memory_budget_completes() {
    let broker = Broker::start(&["--fanout-buffer-mb", "1"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let bob2 = add_device(&broker, &bob).await;
    let carol = register(&broker, "carol@test.example").await;
    let carol2 = add_device(&broker, &carol).await;
    let mut sender = Device::connect(&broker, &alice).await;
    assert!(sender.backlog().await.is_empty());
    // 300 KiB to four devices: 1.2 MiB of copies.
    let big = vec![7u8; 300 * 1024];
    let members = vec![recipient(&[&bob, &bob2]), recipient(&[&carol, &carol2])];
    let (code, refused, _) = result(&mut sender.ws, group_send(eid(), &big, members, None)).await;
    assert_eq!((code, refused), (None, vec![]));
    for creds in [&bob, &bob2, &carol, &carol2] {
        let mut d = Device::connect(&broker, creds).await;
        assert_eq!(bodies(&mut d, 1).await, vec![big.clone()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_group_sends_admit_each_recipient_by_its_own_token() {
    let broker = Broker::start(&[]);
    let bob = register(&broker, "bob@test.example").await;
    let carol = register(&broker, "carol@test.example").await;
    let token = |c: &Creds| format!("token of {}!!", c.user).into_bytes();
    for c in [&bob, &carol] {
        let resp = reqwest::Client::new()
            .put(format!(
                "{}/v1/accounts/{}/delivery-token",
                broker.http(),
                c.user
            ))
            .header("authorization", c.bearer())
            .json(&serde_json::json!({ "token": URL_SAFE_NO_PAD.encode(token(c)) }))
            .send()
            .await
            .expect("token");
        assert_eq!(resp.status(), 204);
    }
    let (mut anon, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/sealed", broker.addr))
        .await
        .expect("connect sealed");
    let with = |c: &Creds, t: Vec<u8>| GroupRecipient {
        delivery_token: Some(t),
        ..recipient(&[c])
    };
    let (code, refused, _) = result(
        &mut anon,
        group_send(
            eid(),
            b"sealed group message",
            vec![
                with(&bob, token(&bob)),
                with(&carol, b"a wrong token!".to_vec()),
            ],
            None,
        ),
    )
    .await;
    assert_eq!(code, None);
    assert_eq!(
        refused,
        vec![RecipientRefusal {
            to: carol.user.clone(),
            code: ErrorCode::BadDeliveryToken,
            current_devices: vec![],
        }]
    );
    let mut b = Device::connect(&broker, &bob).await;
    let got = b.backlog().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.ciphertext, b"sealed group message");
    let mut c = Device::connect(&broker, &carol).await;
    assert!(c.backlog().await.is_empty(), "nothing for a wrong token");

    // A sealed Commit takes its epoch at the hub only if a recipient here admits it by a
    // valid token and none refuses it: junk from someone who only knows the group's id takes
    // nothing, and the members' own Commit still has the epoch.
    let hub = "test.example";
    for (junk, why) in [
        (
            vec![with(&carol, b"a wrong token!".to_vec())],
            "a bad token",
        ),
        (vec![recipient(&[&carol])], "no token"),
        (
            vec![with(&bob, token(&bob)), with(&carol, b"wrong!".to_vec())],
            "one bad token",
        ),
        (
            vec![GroupRecipient {
                to: "dave@elsewhere.example".into(),
                devices: vec![DeviceId(1)],
                delivery_token: Some(b"unchecked there".to_vec()),
            }],
            "no recipient here",
        ),
    ] {
        let (code, refused, epoch) = result(
            &mut anon,
            group_send(eid(), b"junk commit", junk, order(5, 0, hub)),
        )
        .await;
        assert_eq!(
            (code, refused, epoch),
            (Some(ErrorCode::BadDeliveryToken), vec![], None),
            "{why}"
        );
    }
    let (code, refused, _) = result(
        &mut anon,
        group_send(
            eid(),
            b"the members' commit",
            vec![with(&bob, token(&bob)), with(&carol, token(&carol))],
            order(5, 0, hub),
        ),
    )
    .await;
    assert_eq!((code, refused), (None, vec![]), "epoch 0 is still free");
    assert_eq!(
        bodies(&mut b, 1).await,
        vec![b"the members' commit".to_vec()]
    );
    assert_eq!(
        bodies(&mut c, 1).await,
        vec![b"the members' commit".to_vec()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_commit_of_an_epoch_wins_at_the_hub() {
    // One Commit a second per group (bursts of 4): the storm below is limited however slowly
    // this machine sends it.
    let broker = Broker::start(&["--commit-rate", "1"]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let carol = register(&broker, "carol@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    let mut c = Device::connect(&broker, &carol).await;
    assert!(a.backlog().await.is_empty() && c.backlog().await.is_empty());
    let hub = "test.example";

    // Alice and carol both commit on epoch 0: alice first.
    let alice_commit = eid();
    let (code, _, _) = result(
        &mut a.ws,
        group_send(
            alice_commit,
            b"alice's commit",
            vec![recipient(&[&bob])],
            order(7, 0, hub),
        ),
    )
    .await;
    assert_eq!(code, None);
    let (code, refused, epoch) = result(
        &mut c.ws,
        group_send(
            eid(),
            b"carol's commit",
            vec![recipient(&[&bob])],
            order(7, 0, hub),
        ),
    )
    .await;
    assert_eq!(
        (code, refused, epoch),
        (Some(ErrorCode::StaleEpoch), vec![], Some(1))
    );
    // Alice's retry (same id) is taken again, and stored once.
    let (code, _, _) = result(
        &mut a.ws,
        group_send(
            alice_commit,
            b"alice's commit",
            vec![recipient(&[&bob])],
            order(7, 0, hub),
        ),
    )
    .await;
    assert_eq!(code, None);
    // Carol rebases on epoch 1 and wins it; another group is apart.
    let (code, _, _) = result(
        &mut c.ws,
        group_send(
            eid(),
            b"carol's rebased commit",
            vec![recipient(&[&bob])],
            order(7, 1, hub),
        ),
    )
    .await;
    assert_eq!(code, None);
    let (code, _, _) = result(
        &mut c.ws,
        group_send(
            eid(),
            b"other group",
            vec![recipient(&[&bob])],
            order(8, 0, hub),
        ),
    )
    .await;
    assert_eq!(code, None);
    let mut b = Device::connect(&broker, &bob).await;
    assert_eq!(
        bodies(&mut b, 3).await,
        vec![
            b"alice's commit".to_vec(),
            b"carol's rebased commit".to_vec(),
            b"other group".to_vec()
        ],
        "the loser's Commit was stored for nobody"
    );

    // A commit storm in one group is limited; the limit is per group.
    let mut limited = 0;
    for epoch in 2..40 {
        let (code, _, _) = result(
            &mut c.ws,
            group_send(
                eid(),
                b"storm",
                vec![recipient(&[&bob])],
                order(7, epoch, hub),
            ),
        )
        .await;
        match code {
            None => {}
            Some(ErrorCode::RateLimited) => limited += 1,
            Some(ErrorCode::StaleEpoch) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(limited > 0, "a commit storm is rate-limited");
    let (code, _, _) = result(
        &mut a.ws,
        group_send(
            eid(),
            b"calm group",
            vec![recipient(&[&bob])],
            order(9, 0, hub),
        ),
    )
    .await;
    assert_eq!(code, None, "other groups are unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_sends_are_refused_whole_and_store_nothing() {
    let broker = Broker::start(&[]);
    let alice = register(&broker, "alice@test.example").await;
    let bob = register(&broker, "bob@test.example").await;
    let mut a = Device::connect(&broker, &alice).await;
    assert!(a.backlog().await.is_empty());
    let bob_once = || vec![recipient(&[&bob])];
    let refused_with = |code| (Some(code), vec![], None);

    let cases: Vec<(ClientFrame, ErrorCode)> = vec![
        (
            group_send(eid(), b"x", vec![], None),
            ErrorCode::InvalidRecipients,
        ),
        (
            group_send(
                eid(),
                b"x",
                vec![recipient(&[&bob]), recipient(&[&bob])],
                None,
            ),
            ErrorCode::InvalidRecipients,
        ),
        (
            group_send(
                eid(),
                b"x",
                (0..=MAX_GROUP_RECIPIENTS)
                    .map(|i| GroupRecipient {
                        to: format!("u{i}@test.example"),
                        devices: vec![DeviceId(1)],
                        delivery_token: None,
                    })
                    .collect(),
                None,
            ),
            ErrorCode::InvalidRecipients,
        ),
        (
            group_send(
                eid(),
                b"x",
                vec![GroupRecipient {
                    devices: vec![],
                    ..recipient(&[&bob])
                }],
                None,
            ),
            ErrorCode::InvalidCopies,
        ),
        (
            group_send(
                eid(),
                b"x",
                vec![GroupRecipient {
                    devices: vec![bob.device, bob.device],
                    ..recipient(&[&bob])
                }],
                None,
            ),
            ErrorCode::InvalidCopies,
        ),
        // More devices in all than a group may have (251 × 16 > 4,000).
        (
            group_send(
                eid(),
                b"x",
                (0..251)
                    .map(|i| GroupRecipient {
                        to: format!("u{i}@test.example"),
                        devices: (1..=16).map(DeviceId).collect(),
                        delivery_token: None,
                    })
                    .collect(),
                None,
            ),
            ErrorCode::InvalidRecipients,
        ),
        (
            group_send(
                eid(),
                &vec![0; MAX_GROUP_CIPHERTEXT_BYTES + 1],
                bob_once(),
                None,
            ),
            ErrorCode::EnvelopeTooLarge,
        ),
        (
            group_send(eid(), b"x", bob_once(), order(1, 0, "elsewhere.example")),
            ErrorCode::UnknownDomain,
        ),
        (
            group_send(
                eid(),
                b"x",
                vec![GroupRecipient {
                    to: "not a handle".into(),
                    devices: vec![DeviceId(1)],
                    delivery_token: None,
                }],
                order(2, 0, "test.example"),
            ),
            ErrorCode::InvalidHandle,
        ),
    ];
    // ... and took no epoch: a valid Commit for that group's epoch 0 is taken.
    let (code, _, _) = result(
        &mut a.ws,
        group_send(eid(), b"commit", bob_once(), order(2, 0, "test.example")),
    )
    .await;
    assert_eq!(code, None);
    for (frame, code) in cases {
        assert_eq!(result(&mut a.ws, frame).await, refused_with(code));
    }
    // A large Commit (more than a 1:1 envelope may carry) is fine in a group send.
    let big = vec![7u8; 300 * 1024];
    let (code, refused, _) = result(&mut a.ws, group_send(eid(), &big, bob_once(), None)).await;
    assert_eq!((code, refused), (None, vec![]));
    let mut b = Device::connect(&broker, &bob).await;
    let got = b.backlog().await;
    assert_eq!(got.len(), 2, "only the valid sends were stored");
    assert_eq!(got[0].1.ciphertext, b"commit");
    assert_eq!(got[1].1.ciphertext.len(), big.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_sends_cross_domains_and_commits_are_ordered_at_a_remote_hub() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let ba = a.start(&[&b], &[]);
    // b.example fans a peer's group messages out within 1 MiB of copies at a time.
    let bb = b.start(&[&a], &["--fanout-buffer-mb", "1"]);
    wait_up(&ba, "b.example").await;
    wait_up(&bb, "a.example").await;
    let alice = register(&ba, "alice@a.example").await;
    let alice2 = add_device(&ba, &alice).await;
    let bob = register(&bb, "bob@b.example").await;
    let bob2 = add_device(&bb, &bob).await;
    let erin = register(&bb, "erin@b.example").await;
    let mut sender = Device::connect(&ba, &alice).await;
    assert!(sender.backlog().await.is_empty());
    // Two recipients on b.example under one envelope id: each gets its copy.
    let members = || {
        vec![
            recipient(&[&alice, &alice2]),
            recipient(&[&bob, &bob2]),
            recipient(&[&erin]),
        ]
    };

    // The hub is b.example: alice's Commit is ordered there, through her own broker.
    let commit = eid();
    let (code, refused, _) = result(
        &mut sender.ws,
        group_send(commit, b"commit 0", members(), order(3, 0, "b.example")),
    )
    .await;
    assert_eq!((code, refused), (None, vec![]));
    // The link is up (the hub answered over it): from here on it must stay up. Attempts made
    // while b.example was still starting count for nothing.
    let to_b = "destination=\"b.example\"";
    let failures_before = ba
        .metric_labeled("sealpost_federation_link_failures_total", to_b)
        .await;
    // Dave, at the hub, loses epoch 0 and is told the group is in epoch 1.
    let dave = register(&bb, "dave@b.example").await;
    let mut at_hub = Device::connect(&bb, &dave).await;
    assert!(at_hub.backlog().await.is_empty());
    let (code, _, epoch) = result(
        &mut at_hub.ws,
        group_send(
            eid(),
            b"dave's commit 0",
            vec![recipient(&[&alice, &alice2])],
            order(3, 0, "b.example"),
        ),
    )
    .await;
    assert_eq!((code, epoch), (Some(ErrorCode::StaleEpoch), Some(1)));
    let (code, _, _) = result(
        &mut sender.ws,
        group_send(eid(), b"hello group", members(), None),
    )
    .await;
    assert_eq!(code, None);
    for d in [&bob, &bob2] {
        let mut dev = Device::connect(&bb, d).await;
        assert_eq!(
            bodies(&mut dev, 2).await,
            vec![b"commit 0".to_vec(), b"hello group".to_vec()]
        );
    }
    let mut e = Device::connect(&bb, &erin).await;
    assert_eq!(
        bodies(&mut e, 2).await,
        vec![b"commit 0".to_vec(), b"hello group".to_vec()]
    );
    let mut own = Device::connect(&ba, &alice2).await;
    assert_eq!(
        bodies(&mut own, 2).await,
        vec![b"commit 0".to_vec(), b"hello group".to_vec()]
    );
    // Each message crossed the link once for its two recipients (three devices) on b.example.
    let from_a = "origin=\"a.example\"";
    assert_eq!(
        ba.metric_labeled("sealpost_federation_enqueued_total", to_b)
            .await,
        2.0
    );
    assert_eq!(
        bb.metric_labeled("sealpost_federation_received_total", from_a)
            .await,
        2.0
    );
    // Acknowledged with an answer per recipient, the link staying up.
    ba.wait_metric_labeled("sealpost_federation_delivered_total", to_b, 4.0)
        .await;
    let failures = ba
        .metric_labeled("sealpost_federation_link_failures_total", to_b)
        .await;
    assert_eq!(
        failures, failures_before,
        "the link failed during the exchange"
    );
    // A stale device set on the other domain is named per recipient; the others get theirs.
    let stale = GroupRecipient {
        devices: vec![DeviceId(erin.device.0 + 7)],
        ..recipient(&[&erin])
    };
    let (code, refused, _) = result(
        &mut sender.ws,
        group_send(
            eid(),
            b"to bob, not erin",
            vec![recipient(&[&bob, &bob2]), stale],
            None,
        ),
    )
    .await;
    assert_eq!(code, None);
    assert_eq!(
        refused,
        vec![RecipientRefusal {
            to: erin.user.clone(),
            code: ErrorCode::StaleDevices,
            current_devices: vec![erin.device],
        }]
    );
    let mut b1 = Device::connect(&bb, &bob).await;
    assert_eq!(bodies(&mut b1, 1).await, vec![b"to bob, not erin".to_vec()]);
    // 400 KiB to three devices there: 1.2 MiB of copies, made as room comes.
    let big = vec![9u8; 400 * 1024];
    let (code, refused, _) = result(
        &mut sender.ws,
        group_send(
            eid(),
            &big,
            vec![recipient(&[&bob, &bob2]), recipient(&[&erin])],
            None,
        ),
    )
    .await;
    assert_eq!((code, refused), (None, vec![]));
    assert_eq!(bodies(&mut b1, 1).await, vec![big.clone()]);
    assert_eq!(bodies(&mut e, 1).await, vec![big.clone()]);
}
