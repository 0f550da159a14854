//! Helpers for tests that drive the real client SDK against broker processes.

use std::time::Duration;

use sealpost_client::{Client, Event};
use tempfile::TempDir;

use super::{Broker, WAIT};

/// One device: its client and its state directory.
pub struct Dev {
    pub client: Client,
    pub _dir: TempDir,
}

/// Registers a new account with one device.
pub async fn register(broker: &Broker, handle: &str) -> Dev {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut client = Client::register(&broker.http(), handle, dir.path(), None)
        .await
        .expect("register");
    quick(&mut client);
    Dev { client, _dir: dir }
}

/// Short delays for transcripts and for the refresh of contacts' lists a held envelope
/// brings forward: tests wait on them.
pub fn quick(client: &mut Client) {
    client.set_transcript_delay(Duration::from_millis(5), Duration::from_millis(30));
    client.set_list_refresh(
        Duration::from_secs(3600),
        Duration::from_millis(10),
        Duration::from_millis(100),
    );
}

/// Links a new device to `existing`'s account; `existing` approves it.
pub async fn link(broker: &Broker, existing: &mut Dev) -> Dev {
    let dir = tempfile::tempdir().expect("tempdir");
    let code = existing.client.create_link_code().await.expect("link code");
    let handle = existing.client.handle().to_owned();
    let server = broker.http();
    let linking = Client::link(&server, &handle, &code.code, dir.path(), WAIT);
    let approve = async {
        loop {
            match next(&mut existing.client).await {
                Event::DeviceLinked { .. } => break,
                Event::QueueEmpty => {}
                other => panic!("unexpected event while linking: {other:?}"),
            }
        }
    };
    let (linked, ()) = tokio::join!(linking, approve);
    let mut client = linked.expect("link");
    quick(&mut client);
    Dev { client, _dir: dir }
}

/// The next event, within the test's patience.
pub async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("timed out waiting for an event")
        .expect("next_event")
}

/// Runs a test on threads with room for openmls's stack frames (large in debug builds).
pub fn run_with_big_stacks(test: impl Future<Output = ()> + Send + 'static) {
    const STACK: usize = 64 << 20;
    std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_stack_size(STACK)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(test);
        })
        .expect("test thread")
        .join()
        .expect("the test passed");
}
