//! The `blobs` scenario: attachment throughput through the broker. One large attachment
//! uploaded in pieces (each durable before the next goes) and downloaded whole, then many
//! small ones uploaded at once. Real HTTP requests to a real broker; the bytes are random (as
//! ciphertext is). `loadtest/run.sh` measures the disk's own direct-write speed next to it.

use std::time::Instant;

use anyhow::{Result, ensure};
use futures_util::future::try_join_all;
use rand::RngCore as _;
use serde_json::{Value, json};

use crate::{BlobsArgs, api::Api, util::run_tag};

const MIB: f64 = 1024.0 * 1024.0;

pub(crate) async fn blobs(args: &BlobsArgs) -> Result<Value> {
    let target = args.common.target("blobs")?;
    let api = Api::new(&target.http)?;
    let owner = api
        .register(&format!("blobs-{}@localhost", run_tag()))
        .await?;
    let piece = args.piece_mib * 1024 * 1024;
    ensure!(
        piece > 0 && piece <= 4 * 1024 * 1024,
        "--piece-mib must be 1..=4"
    );

    // One large attachment, piece by piece.
    let size = args.large_mib * 1024 * 1024;
    let mut data = vec![0u8; piece];
    rand::thread_rng().fill_bytes(&mut data);
    let id = api.start_blob(&owner, size as u64).await?;
    let started = Instant::now();
    let mut at = 0usize;
    while at < size {
        let len = piece.min(size - at);
        api.put_piece(&owner, &id, at as u64, data[..len].to_vec())
            .await?;
        at += len;
    }
    let upload = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let got = api.get_blob(&id).await?;
    let download = started.elapsed().as_secs_f64();
    ensure!(got == size as u64, "downloaded {got} of {size} bytes");
    println!(
        "large: {} MiB up in {upload:.2} s ({:.0} MiB/s), down in {download:.2} s ({:.0} MiB/s)",
        args.large_mib,
        size as f64 / MIB / upload,
        size as f64 / MIB / download
    );

    // Many small ones at once, each one piece.
    let small = args.small_kib * 1024;
    let mut ids = Vec::with_capacity(args.small_count);
    for _ in 0..args.small_count {
        ids.push(api.start_blob(&owner, small as u64).await?);
    }
    let mut body = vec![0u8; small];
    rand::thread_rng().fill_bytes(&mut body);
    let started = Instant::now();
    try_join_all(
        ids.iter()
            .map(|id| api.put_piece(&owner, id, 0, body.clone())),
    )
    .await?;
    let concurrent = started.elapsed().as_secs_f64();
    let total = (small * args.small_count) as f64 / MIB;
    println!(
        "small: {} × {} KiB up at once in {concurrent:.2} s ({:.0} MiB/s, {:.0} uploads/s)",
        args.small_count,
        args.small_kib,
        total / concurrent,
        args.small_count as f64 / concurrent
    );
    Ok(json!({
        "large_mib": args.large_mib,
        "large_upload_mib_per_s": size as f64 / MIB / upload,
        "large_download_mib_per_s": size as f64 / MIB / download,
        "small_count": args.small_count,
        "small_kib": args.small_kib,
        "small_upload_mib_per_s": total / concurrent,
        "small_uploads_per_s": args.small_count as f64 / concurrent,
    }))
}
