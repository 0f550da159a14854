//! The `fanout` scenario: one message to a group of N member accounts (each with D connected
//! devices), sent as one `group_send` (one ciphertext for every device, as an MLS message is)
//! and, for comparison in the same run, as N `send`s (one ciphertext per device, as Olm with
//! sealed sender makes them). For each it reports the sender's upload bytes per message, the
//! time until every member device has it (p50/max over the messages), and the broker's CPU
//! time per delivered copy. Real frames, real connections; the ciphertexts are random bytes of
//! the sizes the clients produce (an MLS application message of a short text: about 250 B; an
//! Olm message sealed for one device: about 400 B).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use rand::RngCore as _;
use sealpost_proto::{
    Class, ClientFrame, Copy, DeviceId, EnvelopeId, GroupRecipient, SendOutcome, ServerFrame,
};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::{
    FanoutArgs,
    api::{Api, register_many},
    client::{Account, ConnectOptions, Ws, connect_all, message},
    util::{check_nofile, read_cpu_time, run_tag},
};

/// Deliveries still missing per message, and when each message was complete. A message is
/// known by its first envelope id; `alias` maps the ids of its other sends (1:1) to it.
#[derive(Default)]
struct Arrivals {
    missing: HashMap<EnvelopeId, usize>,
    done: HashMap<EnvelopeId, Instant>,
    alias: HashMap<EnvelopeId, EnvelopeId>,
}

pub(crate) async fn fanout(args: &FanoutArgs) -> Result<Value> {
    ensure!(
        args.devices_per_account >= 1,
        "--devices-per-account must be >= 1"
    );
    ensure!(args.messages >= 1, "--messages must be >= 1");
    let target = args.common.target("fanout")?;
    let api = Api::new(&target.http)?;
    let tag = run_tag();
    let mut results = Vec::new();
    for &members in &args.members {
        ensure!(
            (1..=sealpost_proto::limits::MAX_GROUP_RECIPIENTS).contains(&members),
            "--members must be 1..={}",
            sealpost_proto::limits::MAX_GROUP_RECIPIENTS
        );
        let devices = members * args.devices_per_account;
        check_nofile(devices as u64 + 64)?;
        println!(
            "fanout: a group of {members} accounts x {} devices ({devices} connections)",
            args.devices_per_account
        );
        let handles: Vec<String> = (0..=members)
            .map(|i| format!("fan{tag}m{members}n{i}@{}", args.common.domain))
            .collect();
        let mut accounts = register_many(
            std::slice::from_ref(&api),
            handles,
            args.devices_per_account,
            args.common.register_concurrency,
        )
        .await?;
        let sender = accounts.remove(0).remove(0);
        let opts = ConnectOptions {
            read_buffer: 16 * 1024,
            timeout: args.common.connect_timeout,
        };
        let (mut sender_ws, _) = crate::client::connect(&target.ws, &sender, opts).await?;
        let mut sender_frames = std::collections::VecDeque::new();
        let flat: Vec<Account> = accounts.iter().flatten().cloned().collect();
        let conns = connect_all(
            &crate::util::Targets::one(target.clone()),
            &flat,
            opts,
            args.common.connect_concurrency,
        )
        .await?;
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let complete = Arc::new(Notify::new());
        let readers: Vec<_> = conns
            .into_iter()
            .map(|ws| tokio::spawn(read_and_ack(ws, arrivals.clone(), complete.clone())))
            .collect();

        let mut modes = serde_json::Map::new();
        for mode in ["group_send", "one_to_one"] {
            let cpu_before = args.broker_pid.map(read_cpu_time).transpose()?;
            let mut upload = 0u64;
            let mut latencies = Vec::new();
            for _ in 0..args.messages {
                let frames = match mode {
                    "group_send" => vec![group_frame(&accounts, args.group_size)],
                    _ => one_to_one_frames(&accounts, args.copy_size),
                };
                let ids: Vec<EnvelopeId> = frames.iter().map(frame_id).collect();
                {
                    // Every device's copy counts against the message's first id.
                    let mut a = arrivals.lock().expect("arrivals");
                    a.missing.insert(ids[0], devices);
                    a.alias = ids.iter().map(|id| (*id, ids[0])).collect();
                }
                let started = Instant::now();
                for frame in &frames {
                    let bytes = frame.encode();
                    upload += bytes.len() as u64;
                    sender_ws.send(Message::binary(bytes)).await?;
                }
                // Every send's answer: all accepted.
                let mut answers = 0;
                while answers < frames.len() {
                    match next(&mut sender_ws, &mut sender_frames).await? {
                        ServerFrame::SendResult {
                            outcome: SendOutcome::Accepted { .. },
                            ..
                        } => answers += 1,
                        ServerFrame::GroupSendResult {
                            code: None,
                            refused,
                            ..
                        } if refused.is_empty() => answers += 1,
                        other => bail!("a send was refused: {other:?}"),
                    }
                }
                let deadline = started + args.timeout;
                loop {
                    let notified = complete.notified();
                    if let Some(at) = arrivals.lock().expect("arrivals").done.get(&ids[0]) {
                        latencies.push(at.duration_since(started));
                        break;
                    }
                    if tokio::time::timeout_at(deadline.into(), notified)
                        .await
                        .is_err()
                    {
                        bail!(
                            "{mode}: not every device got the message within {:?}",
                            args.timeout
                        );
                    }
                }
            }
            let cpu = match (cpu_before, args.broker_pid) {
                (Some(before), Some(pid)) => Some(read_cpu_time(pid)?.saturating_sub(before)),
                _ => None,
            };
            latencies.sort_unstable();
            let p50 = latencies[latencies.len() / 2];
            let max = *latencies.last().expect("at least one message");
            let copies = (args.messages * devices) as u64;
            let upload_per = upload / args.messages as u64;
            #[allow(clippy::cast_precision_loss)]
            let cpu_per_copy_us = cpu.map(|c| c.as_secs_f64() * 1e6 / copies as f64);
            println!(
                "  {mode}: upload {upload_per} B per message; every device had it after p50 {:.1} ms, max {:.1} ms; broker CPU {}",
                p50.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3,
                cpu_per_copy_us.map_or("(no --broker-pid)".to_owned(), |us| format!(
                    "{us:.1} µs per delivered copy"
                ))
            );
            modes.insert(
                mode.to_owned(),
                json!({
                    "upload_bytes_per_message": upload_per,
                    "all_devices_p50_ms": p50.as_secs_f64() * 1e3,
                    "all_devices_max_ms": max.as_secs_f64() * 1e3,
                    "broker_cpu_us_per_copy": cpu_per_copy_us,
                    "copies": copies,
                }),
            );
        }
        for r in readers {
            r.abort();
        }
        results.push(json!({
            "members": members,
            "devices_per_account": args.devices_per_account,
            "modes": modes,
        }));
    }
    Ok(json!({ "scenario": "fanout", "messages": args.messages, "runs": results }))
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

fn eid() -> EnvelopeId {
    EnvelopeId(rand::random())
}

fn group_frame(accounts: &[Vec<Account>], size: usize) -> ClientFrame {
    ClientFrame::GroupSend {
        id: eid(),
        class: Class::Durable,
        ttl_secs: 3600,
        ciphertext: random(size),
        recipients: accounts
            .iter()
            .map(|devices| GroupRecipient {
                to: devices[0].handle.clone(),
                devices: devices.iter().map(|d| DeviceId(d.device)).collect(),
                delivery_token: None,
            })
            .collect(),
        order: None,
    }
}

fn one_to_one_frames(accounts: &[Vec<Account>], size: usize) -> Vec<ClientFrame> {
    accounts
        .iter()
        .map(|devices| ClientFrame::Send {
            id: eid(),
            to: devices[0].handle.clone(),
            class: Class::Durable,
            ttl_secs: 3600,
            copies: devices
                .iter()
                .map(|d| Copy {
                    device: DeviceId(d.device),
                    ciphertext: random(size),
                })
                .collect(),
        })
        .collect()
}

fn frame_id(frame: &ClientFrame) -> EnvelopeId {
    match frame {
        ClientFrame::Send { id, .. } | ClientFrame::GroupSend { id, .. } => *id,
        _ => EnvelopeId([0; 16]),
    }
}

/// The next frame, from `buf` (the rest of a batch) or the connection.
async fn next(
    ws: &mut Ws,
    buf: &mut std::collections::VecDeque<ServerFrame>,
) -> Result<ServerFrame> {
    loop {
        if let Some(frame) = buf.pop_front() {
            return Ok(frame);
        }
        match ws
            .next()
            .await
            .context("the broker closed the connection")??
        {
            Message::Binary(bytes) => buf.extend(ServerFrame::decode_all(&bytes)?),
            Message::Close(_) => bail!("the broker closed the connection"),
            _ => {}
        }
    }
}

/// One member device: counts each delivery against its message and acks it.
async fn read_and_ack(ws: Ws, arrivals: Arc<Mutex<Arrivals>>, complete: Arc<Notify>) -> Result<()> {
    let (mut tx, mut rx) = ws.split();
    while let Some(msg) = rx.next().await {
        let Message::Binary(bytes) = msg? else {
            continue;
        };
        for frame in ServerFrame::decode_all(&bytes)? {
            let ServerFrame::Deliver { seq, envelope } = frame else {
                continue;
            };
            {
                let mut a = arrivals.lock().expect("arrivals");
                let id = a.alias.get(&envelope.id).copied().unwrap_or(envelope.id);
                if let Some(left) = a.missing.get_mut(&id) {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        a.done.insert(id, Instant::now());
                        complete.notify_waiters();
                    }
                }
            }
            ack(&mut tx, seq).await?;
        }
    }
    Ok(())
}

async fn ack(tx: &mut SplitSink<Ws, Message>, seq: u64) -> Result<()> {
    tx.send(message(&ClientFrame::Ack { seqs: vec![seq] }))
        .await?;
    Ok(())
}
