//! The `encrypted` scenario: real SDK clients (`sealpost-client`) in pairs; each sender
//! writes sealed, end-to-end encrypted texts to its partner as fast as the broker accepts them
//! (closed loop, one outstanding send per sender), each receiver decrypts, saves its state and
//! acks. Reports delivered messages per second, send→decrypt latency, and the client-side cost
//! per message of Olm encryption + sealing, of opening + Olm decryption, and of state saves.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use sealpost_client::{Client, Event, Stats};
use serde_json::{Value, json};

use crate::{
    EncryptedArgs,
    util::{fmt_duration, latency_json, latency_line, new_histogram, per_sec, run_tag},
};

/// The text that ends a run: FIFO per sender, so everything before it has arrived.
const STOP: &str = "\u{0}stop";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn micros_per(total: Duration, count: u64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let per = total.as_secs_f64() * 1e6 / count as f64;
    (per * 10.0).round() / 10.0
}

/// What one receiver saw.
struct Received {
    messages: u64,
    latency: Histogram<u64>,
    stats: Stats,
}

pub(crate) async fn encrypted(args: &EncryptedArgs) -> Result<Value> {
    ensure!(args.pairs > 0, "--pairs must be > 0");
    ensure!(!args.duration.is_zero(), "--duration must be > 0");
    ensure!(
        (1..=16 * 1024).contains(&args.size),
        "--size must be 1..=16384 (text bytes)"
    );
    let target = args.common.target("encrypted")?;
    let tag = run_tag();
    let root: PathBuf = std::env::temp_dir().join(format!("sealpost-loadtest-{tag}"));
    println!(
        "encrypted: {} sender/receiver pairs of SDK clients, {} B texts, duration {} (run {tag})",
        args.pairs,
        args.size,
        fmt_duration(args.duration)
    );
    let result = run(args, &target.http, &tag, &root).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn run(
    args: &EncryptedArgs,
    server: &str,
    tag: &str,
    root: &std::path::Path,
) -> Result<Value> {
    let domain = &args.common.domain;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let setup = Instant::now();
    for i in 0..args.pairs {
        for (role, list) in [("s", &mut senders), ("r", &mut receivers)] {
            let handle = format!("lt-{tag}-{role}{i}@{domain}");
            let client = Client::register(server, &handle, &root.join(&handle), None)
                .await
                .with_context(|| format!("registering {handle}"))?;
            list.push(client);
        }
    }
    // First contact both ways, so that the measured messages all travel sealed.
    for (s, r) in senders.iter_mut().zip(receivers.iter_mut()) {
        let (s_handle, r_handle) = (s.handle().to_owned(), r.handle().to_owned());
        s.send_text(&r_handle, "hello").await?;
        wait_message(r).await?;
        r.send_text(&s_handle, "hello").await?;
        wait_message(s).await?;
        ensure!(
            s.sends_sealed_to(&r_handle),
            "the warm-up did not share tokens"
        );
    }
    println!(
        "  setup: {} accounts in {:.1}s",
        2 * args.pairs,
        setup.elapsed().as_secs_f64()
    );

    let text = "x".repeat(args.size);
    let sender_base: Vec<Stats> = senders.iter().map(Client::stats).collect();
    let receiver_base: Vec<Stats> = receivers.iter().map(Client::stats).collect();
    let start = Instant::now();
    let end = start + args.duration;
    let receiving: Vec<_> = receivers
        .into_iter()
        .map(|mut r| {
            tokio::spawn(async move {
                let mut latency = new_histogram();
                let mut messages = 0u64;
                loop {
                    match r.next_event().await? {
                        Event::Message(m) if m.text == STOP => break,
                        Event::Message(m) => {
                            messages += 1;
                            let ms = now_ms().saturating_sub(m.sent_ms).max(1);
                            latency.saturating_record(ms * 1000);
                        }
                        Event::Rejected { error, .. } => bail!("rejected: {error}"),
                        _ => {}
                    }
                }
                Ok(Received {
                    messages,
                    latency,
                    stats: r.stats(),
                })
            })
        })
        .collect();
    let sending: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let to = format!("lt-{tag}-r{i}@{domain}");
            let text = text.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < end {
                    s.send_text(&to, &text).await?;
                    sent += 1;
                }
                s.send_text(&to, STOP).await?;
                Ok::<_, anyhow::Error>((sent, s.stats()))
            })
        })
        .collect();

    let mut sent = 0;
    let mut send_stats = Vec::new();
    for task in sending {
        let (n, stats) = task.await.context("sender task")??;
        sent += n;
        send_stats.push(stats);
    }
    let drain_deadline = tokio::time::Instant::now() + args.drain_timeout;
    let mut delivered = 0;
    let mut latency = new_histogram();
    let mut receive_stats = Vec::new();
    for task in receiving {
        let received = tokio::time::timeout_at(drain_deadline, task)
            .await
            .context("receivers did not finish within --drain-timeout")?
            .context("receiver task")??;
        delivered += received.messages;
        latency.add(&received.latency).context("histogram")?;
        receive_stats.push(received.stats);
    }
    let elapsed = start.elapsed();
    ensure!(
        delivered == sent,
        "sent {sent} but {delivered} were delivered"
    );

    // Differences over the measured window (the warm-up's first-contact work excluded).
    let diff = |now: &[Stats], base: &[Stats]| {
        now.iter()
            .zip(base)
            .fold(Stats::default(), |mut acc, (n, b)| {
                acc.copies_sealed += n.copies_sealed - b.copies_sealed;
                acc.encrypt_seal += n.encrypt_seal - b.encrypt_seal;
                acc.envelopes_opened += n.envelopes_opened - b.envelopes_opened;
                acc.open_decrypt += n.open_decrypt - b.open_decrypt;
                acc.saves += n.saves - b.saves;
                acc.save_time += n.save_time - b.save_time;
                acc
            })
    };
    let send = diff(&send_stats, &sender_base);
    let recv = diff(&receive_stats, &receiver_base);
    let encrypt_us = micros_per(send.encrypt_seal, send.copies_sealed);
    let decrypt_us = micros_per(recv.open_decrypt, recv.envelopes_opened);
    let send_save_us = micros_per(send.save_time, send.saves);
    let recv_save_us = micros_per(recv.save_time, recv.saves);
    let rate = per_sec(delivered, elapsed);
    println!(
        "  delivered {delivered} of {sent} sent in {:.2}s: {rate} msg/s end to end",
        elapsed.as_secs_f64()
    );
    println!("{}", latency_line("send -> decrypted (ms clock)", &latency));
    println!(
        "  client crypto per message: encrypt+seal {encrypt_us} us, open+decrypt {decrypt_us} us"
    );
    println!(
        "  state saves: sender {send_save_us} us each ({} saves), receiver {recv_save_us} us each \
         ({} saves, one per batch)",
        send.saves, recv.saves
    );
    Ok(json!({
        "pairs": args.pairs,
        "size": args.size,
        "duration_s": args.duration.as_secs_f64(),
        "sent": sent,
        "delivered": delivered,
        "delivered_per_s": rate,
        "latency": latency_json(&latency),
        "encrypt_seal_us_per_copy": encrypt_us,
        "open_decrypt_us_per_envelope": decrypt_us,
        "sender_save_us": send_save_us,
        "receiver_save_us": recv_save_us,
        "receiver_saves": recv.saves,
    }))
}

/// Waits for one text message (skipping notices).
async fn wait_message(client: &mut Client) -> Result<()> {
    loop {
        match client.next_event().await? {
            Event::Message(_) => return Ok(()),
            Event::Rejected { error, .. } => bail!("rejected: {error}"),
            _ => {}
        }
    }
}
