//! A minimal device client: connect, authenticate, drain the stored backlog.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt, stream};
use sealpost_proto::{ClientFrame, DeviceId, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async_with_config,
    tungstenite::{Message, protocol::CloseFrame, protocol::WebSocketConfig},
};

use crate::util::Targets;

/// An open WebSocket connection to the broker.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Credentials of one device of an account.
#[derive(Clone)]
pub(crate) struct Account {
    pub(crate) handle: String,
    pub(crate) device: u32,
    /// The token as the HTTP API returned it (base64url, no padding).
    pub(crate) token_text: String,
    /// The raw 32 token bytes, as the `auth` frame carries them.
    pub(crate) token: Vec<u8>,
}

impl Account {
    /// The HTTP `Authorization` header value for this device.
    pub(crate) fn bearer(&self) -> String {
        format!("Bearer {}.{}", self.device, self.token_text)
    }
}

/// How connections are opened.
#[derive(Clone, Copy)]
pub(crate) struct ConnectOptions {
    /// Read buffer per connection. Small for many idle connections, large for throughput.
    pub(crate) read_buffer: usize,
    /// Upper bound for connect + auth + backlog drain.
    pub(crate) timeout: Duration,
}

/// A binary protocol frame as a WebSocket message.
pub(crate) fn message(frame: &ClientFrame) -> Message {
    Message::binary(frame.encode())
}

/// A close frame as `name (code)`, naming Sealpost's close codes.
pub(crate) fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        None => "close_without_code".to_owned(),
        Some(f) => {
            let code = u16::from(f.code);
            match sealpost_proto::CloseCode::from_u16(code) {
                Some(c) => format!("{c} ({code})"),
                None => format!("close_{code}"),
            }
        }
    }
}

/// Connects `account`'s device, authenticates it and reads (and acks) its stored backlog up to
/// `queue_empty`. Returns the connection and how many backlog envelopes it drained.
pub(crate) async fn connect(
    url: &str,
    account: &Account,
    opts: ConnectOptions,
) -> Result<(Ws, u64)> {
    tokio::time::timeout(opts.timeout, connect_inner(url, account, opts))
        .await
        .map_err(|_| {
            anyhow!(
                "connect, auth and backlog timed out after {:?}",
                opts.timeout
            )
        })?
}

async fn connect_inner(url: &str, account: &Account, opts: ConnectOptions) -> Result<(Ws, u64)> {
    let config = WebSocketConfig::default()
        .read_buffer_size(opts.read_buffer)
        .write_buffer_size(0);
    let (mut ws, _response) = connect_async_with_config(url, Some(config), true)
        .await
        .with_context(|| format!("WebSocket connect to {url}"))?;
    ws.send(message(&ClientFrame::Auth {
        user: account.handle.clone(),
        device: DeviceId(account.device),
        token: account.token.clone(),
    }))
    .await
    .context("sending auth")?;

    match next_frame(&mut ws).await? {
        ServerFrame::AuthOk { .. } => {}
        ServerFrame::Error { code, message, .. } => {
            bail!("auth refused: {code}: {message}")
        }
        other => bail!("expected auth_ok, got {other:?}"),
    }

    let mut backlog = 0;
    let mut acks = Vec::new();
    let mut frames = std::collections::VecDeque::new();
    let mut drained = false;
    loop {
        if frames.is_empty() {
            if drained {
                break;
            }
            frames.extend(next_frames(&mut ws).await?);
        }
        let Some(frame) = frames.pop_front() else {
            continue;
        };
        match frame {
            ServerFrame::Deliver { seq, .. } => {
                backlog += 1;
                acks.push(seq);
                if acks.len() >= 64 {
                    ws.send(message(&ClientFrame::Ack {
                        seqs: std::mem::take(&mut acks),
                    }))
                    .await?;
                }
            }
            // Deliveries batched behind it are acked too.
            ServerFrame::QueueEmpty => drained = true,
            ServerFrame::Error { code, message, .. } => {
                bail!("error while draining the backlog: {code}: {message}")
            }
            _ => {}
        }
    }
    if !acks.is_empty() {
        ws.send(message(&ClientFrame::Ack { seqs: acks })).await?;
    }
    Ok((ws, backlog))
}

/// The next protocol frame, skipping control frames (not for a `batch`: see
/// [`next_frames`]).
async fn next_frame(ws: &mut Ws) -> Result<ServerFrame> {
    let mut frames = next_frames(ws).await?;
    if frames.len() != 1 {
        bail!("expected one frame, got a batch of {}", frames.len());
    }
    Ok(frames.remove(0))
}

/// The frames of the next message (one, or a `batch`), skipping control frames.
async fn next_frames(ws: &mut Ws) -> Result<Vec<ServerFrame>> {
    loop {
        match ws.next().await {
            None => bail!("connection ended"),
            Some(Err(e)) => return Err(e).context("reading from the broker"),
            Some(Ok(Message::Binary(bytes))) => {
                return ServerFrame::decode_all(&bytes)
                    .context("undecodable frame from the broker");
            }
            Some(Ok(Message::Close(frame))) => {
                bail!(
                    "broker closed the connection: {}",
                    describe_close(frame.as_ref())
                )
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Connects every account, `concurrency` at a time, account `i` to broker `targets.of(i)`
/// (round-robin), failing on the first error. Prints progress.
pub(crate) async fn connect_all(
    targets: &Targets,
    accounts: &[Account],
    opts: ConnectOptions,
    concurrency: usize,
) -> Result<Vec<Ws>> {
    let total = accounts.len();
    let started = Instant::now();
    let mut backlog = 0;
    let mut conns = Vec::with_capacity(total);
    let mut results = stream::iter(accounts.iter().enumerate())
        .map(|(i, a)| connect(&targets.of(i).ws, a, opts))
        .buffered(concurrency.max(1));
    let step = (total / 10).max(1);
    while let Some(result) = results.next().await {
        let (ws, drained) = result?;
        backlog += drained;
        conns.push(ws);
        if conns.len() % step == 0 && conns.len() < total {
            println!("  connected {}/{total}", conns.len());
        }
    }
    println!(
        "  connected and authenticated {total} devices in {:.2}s (backlog drained: {backlog})",
        started.elapsed().as_secs_f64()
    );
    Ok(conns)
}
