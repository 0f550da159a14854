//! Writes the SDK state fixtures in `client/tests/fixtures/sdk-v1/` with the SDK as it is at
//! this commit (before the client engine was split out of `sdk.rs`), so that later code can be
//! checked to read state files written by it. Run once by hand:
//!
//! ```text
//! cargo test --test write_state_fixtures -- --ignored
//! ```

mod common;

use std::path::Path;

use common::{
    Broker,
    sdk::{next, register},
};
use sealpost_client::Event;

fn copy_state(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("fixture dir");
    for file in ["local.key", "client.state"] {
        std::fs::copy(from.join(file), to.join(file)).expect("copy state");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes fixtures; run by hand"]
async fn write_sdk_state_fixtures() {
    let broker = Broker::start(&[]);
    let mut alice = register(&broker, "alice@test.example").await;
    let mut bob = register(&broker, "bob@test.example").await;
    alice
        .client
        .send_text("bob@test.example", "hello bob")
        .await
        .expect("send");
    loop {
        if let Event::Message(m) = next(&mut bob.client).await {
            assert_eq!(m.text, "hello bob");
            break;
        }
    }
    bob.client
        .send_text("alice@test.example", "hello alice")
        .await
        .expect("send");
    loop {
        if let Event::Message(m) = next(&mut alice.client).await {
            assert_eq!(m.text, "hello alice");
            break;
        }
    }
    alice
        .client
        .mark_verified("bob@test.example")
        .await
        .expect("verify");
    let code = alice.client.create_link_code().await.expect("link code");
    drop(code);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("client/tests/fixtures/sdk-v1");
    copy_state(alice.client.state_dir(), &out.join("alice"));
    copy_state(bob.client.state_dir(), &out.join("bob"));
}
