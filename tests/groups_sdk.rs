//! Group conversations end to end: MLS in the real client SDK, real broker processes on three
//! federated domains. Members with two devices each create a group, talk, add a fourth
//! member, remove one (who reads nothing after), commit at the same time (one wins, the other
//! rebases, nobody forks), a device linked later is added and reads from then on, and a device
//! its account removes is taken out of the group and reads nothing after. A member whose
//! master key changes is warned of, and stops the group's texts until the key is accepted.

mod common;

use std::collections::BTreeMap;

use common::{
    Broker,
    sdk::{Dev, link, next, register, run_with_big_stacks},
    site::*,
};
use sealpost_client::{Client, ClientError, Event, engine::GroupEvent};

/// Three domains, each pinning the others.
async fn domains() -> (Broker, Broker, Broker) {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let mut c = Site::new("c.example", "127.0.0.3");
    let ba = a.start(&[&b, &c], &[]);
    let bb = b.start(&[&a, &c], &[]);
    let bc = c.start(&[&a, &b], &[]);
    for (broker, others) in [
        (&ba, ["b.example", "c.example"]),
        (&bb, ["a.example", "c.example"]),
        (&bc, ["a.example", "b.example"]),
    ] {
        for d in others {
            wait_up(broker, d).await;
        }
    }
    (ba, bb, bc)
}

/// Handles events until `done` holds.
async fn until(client: &mut Client, mut done: impl FnMut(&mut Client) -> bool) {
    while !done(client) {
        let _ = next(client).await;
    }
}

/// The texts of `group` this device has, in the order it received them: (sender, text).
fn texts(client: &Client, group: &str) -> Vec<(String, String)> {
    client
        .group_messages(group)
        .map(|m| m.into_iter().map(|(from, _, _, t)| (from, t)).collect())
        .unwrap_or_default()
}

/// Waits until this device is in `group` and has `want` texts of it.
async fn has_texts(dev: &mut Dev, group: &str, want: usize) -> Vec<(String, String)> {
    until(&mut dev.client, |c| texts(c, group).len() >= want).await;
    texts(&dev.client, group)
}

/// Waits until this device has joined `group` (its Welcome and name arrived).
async fn joined(dev: &mut Dev, group: &str, name: &str) {
    until(&mut dev.client, |c| {
        c.groups().iter().any(|g| g.id == group && g.name == name)
    })
    .await;
}

fn epoch(client: &mut Client, group: &str) -> u64 {
    client
        .groups()
        .into_iter()
        .find(|g| g.id == group)
        .map_or(0, |g| g.epoch)
}

/// Each sender's texts, in order: what every device must agree on.
fn by_sender(texts: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (from, text) in texts {
        out.entry(from.clone()).or_default().push(text.clone());
    }
    out
}

#[test]
fn a_group_across_three_domains_talks_grows_shrinks_and_never_forks() {
    run_with_big_stacks(three_domains());
}

#[test]
fn a_device_linked_later_is_added_and_reads_from_then_on_and_once_removed_reads_nothing() {
    run_with_big_stacks(linked_later());
}

#[test]
fn a_members_changed_master_key_is_warned_of_and_holds_the_group_until_accepted() {
    run_with_big_stacks(key_changed());
}

async fn three_domains() {
    let (ba, bb, bc) = domains().await;
    let mut alice = register(&ba, "alice@a.example").await;
    let mut alice2 = link(&ba, &mut alice).await;
    let mut bob = register(&bb, "bob@b.example").await;
    let mut bob2 = link(&bb, &mut bob).await;
    let mut carol = register(&bc, "carol@c.example").await;
    let mut carol2 = link(&bc, &mut carol).await;
    let mut dave = register(&ba, "dave@a.example").await;

    // Alice creates the group with bob and carol: all six devices are members.
    let group = alice
        .client
        .create_group("Trip to Lisbon", &["bob@b.example", "carol@c.example"])
        .await
        .expect("create");
    for d in [&mut alice2, &mut bob, &mut bob2, &mut carol, &mut carol2] {
        joined(d, &group, "Trip to Lisbon").await;
    }
    let info = alice.client.group_info(&group).await.expect("info");
    assert_eq!(info.members.len(), 6);
    assert!(
        info.members.iter().all(|(_, _, verified)| *verified),
        "every member vouched for by its account's verified list: {:?}",
        info.members
    );

    // Everyone talks; every device has every text, each sender's in order.
    alice
        .client
        .send_group_text(&group, "hello from alice")
        .await
        .expect("send");
    bob.client
        .send_group_text(&group, "hi from bob")
        .await
        .expect("send");
    carol2
        .client
        .send_group_text(&group, "hey from carol")
        .await
        .expect("send");
    alice
        .client
        .send_group_text(&group, "alice again")
        .await
        .expect("send");
    let mut seen = Vec::new();
    for d in [
        &mut alice,
        &mut alice2,
        &mut bob,
        &mut bob2,
        &mut carol,
        &mut carol2,
    ] {
        seen.push(by_sender(&has_texts(d, &group, 4).await));
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    assert_eq!(
        seen[0]["alice@a.example"],
        vec!["hello from alice", "alice again"]
    );

    // Alice adds dave: he reads from then on, nothing from before.
    alice
        .client
        .add_to_group(&group, &["dave@a.example"])
        .await
        .expect("add dave");
    joined(&mut dave, &group, "Trip to Lisbon").await;
    // Bob writes once his client has the Commit that added dave (a text sent in the epoch
    // before reaches the members of that epoch only, as MLS has it).
    until(&mut bob.client, |c| epoch(c, &group) >= 2).await;
    bob.client
        .send_group_text(&group, "welcome dave")
        .await
        .expect("send");
    assert_eq!(
        has_texts(&mut dave, &group, 1).await,
        vec![("bob@b.example".to_owned(), "welcome dave".to_owned())]
    );

    // Bob removes carol: her devices are told, and read nothing sent after.
    bob.client
        .remove_from_group(&group, "carol@c.example")
        .await
        .expect("remove carol");
    for d in [&mut carol, &mut carol2] {
        until(&mut d.client, |c| {
            c.groups().iter().any(|g| g.id == group && g.left)
        })
        .await;
    }
    until(&mut alice.client, |c| epoch(c, &group) >= 3).await;
    alice
        .client
        .send_group_text(&group, "carol cannot read this")
        .await
        .expect("send");
    has_texts(&mut dave, &group, 2).await;
    for d in [&mut carol, &mut carol2] {
        assert!(
            !texts(&d.client, &group)
                .iter()
                .any(|(_, t)| t == "carol cannot read this")
        );
        assert!(
            d.client
                .send_group_text(&group, "still here?")
                .await
                .is_err()
        );
    }

    // Bob and dave commit at once (bob adds carol back, dave removes alice): one wins at
    // the hub, the other rebases on it; both changes are made, and nobody forks.
    until(&mut dave.client, |c| epoch(c, &group) >= 3).await;
    let (a, b) = tokio::join!(
        bob.client.add_to_group(&group, &["carol@c.example"]),
        dave.client.remove_from_group(&group, "alice@a.example"),
    );
    a.expect("bob's change");
    b.expect("dave's change");
    for d in [&mut bob, &mut bob2, &mut dave] {
        until(&mut d.client, |c| epoch(c, &group) >= 5).await;
    }
    let epochs: Vec<u64> = [&mut bob, &mut bob2, &mut dave]
        .into_iter()
        .map(|d| epoch(&mut d.client, &group))
        .collect();
    assert!(
        epochs.windows(2).all(|w| w[0] == w[1]),
        "one history: {epochs:?}"
    );
    dave.client
        .send_group_text(&group, "after both")
        .await
        .expect("send");
    // Carol, added back, reads again (her devices join over their removed state) and keeps
    // what she had.
    for d in [&mut bob, &mut bob2, &mut carol, &mut carol2] {
        until(&mut d.client, |c| {
            texts(c, &group).iter().any(|(_, t)| t == "after both")
        })
        .await;
    }
    assert!(
        texts(&carol.client, &group)
            .iter()
            .any(|(_, t)| t == "hello from alice")
    );

    // The brokers' data directories and logs hold neither the group's name nor any text.
    let canaries = [
        "Trip to Lisbon",
        "hello from alice",
        "hey from carol",
        "after both",
    ];
    for broker in [&ba, &bb, &bc] {
        let mut found = Vec::new();
        for (what, bytes) in files(broker.dir.path())
            .into_iter()
            .chain([("log".to_owned(), broker.read_logs())])
        {
            for canary in canaries {
                if memchr::memmem::find(&bytes, canary.as_bytes()).is_some() {
                    found.push(format!("{canary} in {what}"));
                }
            }
        }
        assert!(found.is_empty(), "{found:?}");
    }
}

/// Every file under `dir`, read whole: (path, bytes).
fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
    out
}

async fn linked_later() {
    let (ba, bb, _bc) = domains().await;
    let mut alice = register(&ba, "alice@a.example").await;
    let mut bob = register(&bb, "bob@b.example").await;
    let group = alice
        .client
        .create_group("Two of us", &["bob@b.example"])
        .await
        .expect("create");
    joined(&mut bob, &group, "Two of us").await;
    alice
        .client
        .send_group_text(&group, "before")
        .await
        .expect("send");
    has_texts(&mut bob, &group, 1).await;

    // Bob links a second device. Alice's client, before her next text, finds it in bob's
    // verified list (fetched again once it is older than the maximum age, here zero) and
    // adds it to the group: the text is the first thing it reads.
    let mut bob2 = link(&bb, &mut bob).await;
    // Alice's client fetches lists again before a group text once they are this old.
    alice
        .client
        .set_device_list_max_age(std::time::Duration::ZERO);
    alice
        .client
        .send_group_text(&group, "after linking")
        .await
        .expect("send");
    joined(&mut bob2, &group, "Two of us").await;
    alice
        .client
        .send_group_text(&group, "for both of bob's devices")
        .await
        .expect("send");
    let got: Vec<String> = has_texts(&mut bob2, &group, 2)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        got,
        vec!["after linking", "for both of bob's devices"],
        "nothing from before it joined"
    );
    until(&mut bob.client, |c| texts(c, &group).len() >= 3).await;
    let info = alice.client.group_info(&group).await.expect("info");
    assert_eq!(info.members.len(), 3);
    let epoch_with_bob2 = epoch(&mut alice.client, &group);

    // Bob removes that device from his account (a new signed list without it, then the
    // broker deletes it). Alice's client, before her next text, finds it gone from bob's
    // verified list and commits its removal: the text is sent in an epoch it is not in.
    let bob2_id = bob2.client.device_id();
    bob.client
        .remove_device(bob2_id)
        .await
        .expect("remove bob2");
    alice
        .client
        .send_group_text(&group, "after bob2 was removed")
        .await
        .expect("send");
    let info = alice.client.group_info(&group).await.expect("info");
    assert!(
        !info
            .members
            .iter()
            .any(|(u, d, _)| u == "bob@b.example" && *d == bob2_id),
        "the removed device is out of alice's group: {:?}",
        info.members
    );
    assert_eq!(info.members.len(), 2);
    assert!(info.epoch > epoch_with_bob2, "a Commit removed it");
    // Bob's remaining device merged the same Commit and reads the text.
    until(&mut bob.client, |c| {
        texts(c, &group)
            .iter()
            .any(|(_, t)| t == "after bob2 was removed")
    })
    .await;
    let bob_view = bob.client.group_info(&group).await.expect("info");
    assert_eq!(bob_view.epoch, info.epoch);
    assert!(!bob_view.members.iter().any(|(_, d, _)| *d == bob2_id));
    // The removed device gets nothing more: its connection is refused (`device_revoked`),
    // and whatever it holds is from before.
    let end = tokio::time::timeout(common::WAIT, async {
        loop {
            match bob2.client.next_event().await {
                Ok(_) => {}
                Err(e) => break e,
            }
        }
    })
    .await
    .expect("the removed device is refused");
    assert!(
        matches!(end, sealpost_client::ClientError::DeviceRevoked),
        "{end:?}"
    );
    assert_eq!(
        texts(&bob2.client, &group)
            .into_iter()
            .map(|(_, t)| t)
            .collect::<Vec<_>>(),
        vec!["after linking", "for both of bob's devices"]
    );
}

async fn key_changed() {
    let mut a = Site::new("a.example", "127.0.0.1");
    let mut b = Site::new("b.example", "127.0.0.2");
    let ba = a.start(&[&b], &[]);
    let bb = b.start(&[&a], &[]);
    wait_up(&ba, "b.example").await;
    wait_up(&bb, "a.example").await;
    let mut alice = register(&ba, "alice@a.example").await;
    let mut bob = register(&bb, "bob@b.example").await;
    let group = alice
        .client
        .create_group("Keys", &["bob@b.example"])
        .await
        .expect("create");
    joined(&mut bob, &group, "Keys").await;
    alice
        .client
        .send_group_text(&group, "before")
        .await
        .expect("send");
    has_texts(&mut bob, &group, 1).await;

    // Bob's account gets a new master key, and under it a new device (what someone who took
    // over the account at the broker would also show).
    bob.client.rotate_master_key().await.expect("rotate");
    let mut bob2 = link(&bb, &mut bob).await;
    let bob2_id = bob2.client.device_id();

    // Alice's next text finds the change: refused, as a 1:1 send to bob would be, with one
    // warning naming the group and bob; the new device is not added and nothing is sent.
    alice
        .client
        .set_device_list_max_age(std::time::Duration::ZERO);
    let refused = alice
        .client
        .send_group_text(&group, "while the key is new")
        .await
        .expect_err("refused while bob's key change is not accepted");
    assert!(
        matches!(&refused, ClientError::MasterKeyChanged { user, .. } if user == "bob@b.example"),
        "{refused:?}"
    );
    let warned = |notices: Vec<Event>| {
        notices
            .into_iter()
            .filter(|e| {
                matches!(e, Event::Group(GroupEvent::KeyChanged { group: g, user })
                    if *g == group && user == "bob@b.example")
            })
            .count()
    };
    assert_eq!(warned(alice.client.take_notices()), 1);
    // Again: refused again, but warned of once per new key.
    assert!(matches!(
        alice.client.send_group_text(&group, "again").await,
        Err(ClientError::MasterKeyChanged { .. })
    ));
    assert_eq!(warned(alice.client.take_notices()), 0);
    assert!(
        texts(&alice.client, &group)
            .iter()
            .all(|(_, t)| t == "before"),
        "nothing was encrypted for the group"
    );
    let info = alice.client.group_info(&group).await.expect("info");
    assert!(
        info.members
            .iter()
            .filter(|(u, _, _)| u == "bob@b.example")
            .all(|(_, d, vouched)| *d != bob2_id && !vouched),
        "bob's devices show unverified and the new one is not in: {:?}",
        info.members
    );

    // Alice compares and accepts the new key: the group follows bob's new list (bob2 added),
    // and the text goes to both of his devices.
    let change = alice.client.key_change("bob@b.example").expect("pending");
    alice
        .client
        .accept_master_key_change("bob@b.example", &change.new_master_key)
        .await
        .expect("accept");
    alice
        .client
        .send_group_text(&group, "after accepting")
        .await
        .expect("send");
    joined(&mut bob2, &group, "Keys").await;
    for d in [&mut bob, &mut bob2] {
        until(&mut d.client, |c| {
            texts(c, &group).iter().any(|(_, t)| t == "after accepting")
        })
        .await;
        assert!(
            !texts(&d.client, &group)
                .iter()
                .any(|(_, t)| t == "while the key is new")
        );
    }
    let info = alice.client.group_info(&group).await.expect("info");
    assert_eq!(info.members.len(), 3);
    assert!(info.members.iter().all(|(_, _, vouched)| *vouched));
}
