//! `listen` and `daemon`: hold the device's state, print what arrives, and serve the everyday
//! commands of other `sealpost-cli` processes over a Unix socket in the state directory, so
//! that one can reply, verify or list conversations while listening.
//!
//! ```text
//!  sealpost-cli send ──┐ JSON-RPC 2.0, one request per line      ┌─▶ Client::next_event_or
//!  sealpost-cli verify ┼──▶ STATE_DIR/daemon.sock ──▶ requests ───┤     (stops waiting for a
//!  scripts (socat, nc) ┘     (mode 0600)               + notify   └─▶ exec(request) request)
//! ```
//!
//! The wire is what signal-cli's users know: `{"jsonrpc":"2.0","id":1,"method":"send",
//! "params":{"to":"bob@example.com","message":"hi"}}` answered by `{"jsonrpc":"2.0","id":1,
//! "result":{"lines":[{"stream":"out","text":"Sent to bob@example.com."}]}}`, or an `error`
//! with a message. Methods and params are [`Request`]'s.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sealpost_client::{Client, ClientError, Event, engine::GroupEvent};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Notify, mpsc, oneshot},
};

use crate::{
    errors::CliError,
    exec::{Answer, Request, exec},
    output::{event_lines, format_time, progress_bar},
};

/// The socket's name in the state directory.
const SOCKET: &str = "daemon.sock";

/// First and longest wait before reconnecting to a broker that was lost.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Longest request line accepted on the socket.
const MAX_REQUEST: usize = 1 << 20;

/// The socket of the state directory `dir`.
pub(crate) fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

/// When `listen` stops.
pub(crate) struct Until {
    /// After this many messages.
    pub(crate) count: Option<usize>,
    /// Once everything queued has been received.
    pub(crate) empty: bool,
    /// Where received files go.
    pub(crate) files_dir: PathBuf,
}

type Pending = (Request, oneshot::Sender<Result<Answer, String>>);

/// Listens (and serves the socket) until `until` says so, or forever.
pub(crate) async fn listen(dir: &Path, until: Until) -> Result<(), CliError> {
    let client = Client::open(dir).await?;
    let (requests_tx, mut requests) = mpsc::channel::<Pending>(64);
    let arrived = Arc::new(Notify::new());
    let server = serve_socket(dir, requests_tx, Arc::clone(&arrived))?;
    let result = run(dir, client, &until, &mut requests, &arrived).await;
    server.abort();
    let _ = std::fs::remove_file(socket_path(dir));
    result
}

async fn run(
    dir: &Path,
    mut client: Client,
    until: &Until,
    requests: &mut mpsc::Receiver<Pending>,
    arrived: &Notify,
) -> Result<(), CliError> {
    match connect(&mut client, None).await {
        Ok(()) => {}
        Err(e) if transient(&e) => {
            drop(client);
            client = reconnect(dir, &e).await?;
        }
        Err(e) => return Err(e.into()),
    }
    let mut messages = 0usize;
    loop {
        if until.count.is_some_and(|c| messages >= c) {
            return Ok(());
        }
        while let Ok((request, reply)) = requests.try_recv() {
            let answer = exec(&mut client, request, false).await;
            let _ = reply.send(answer.map_err(|e| e.to_string()));
        }
        let next = client.next_event_or(arrived.notified()).await;
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(e) if transient(&e) => {
                // The state is reopened (the lock let go first), so that whatever the failed
                // call had decrypted without saving comes again from the broker (nothing is
                // acknowledged before it is saved).
                drop(client);
                client = reconnect(dir, &e).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match &event {
            Event::Message(_) | Event::Group(GroupEvent::Message { .. }) | Event::File { .. } => {
                messages += 1
            }
            Event::QueueEmpty if until.empty => {
                if messages == 0 {
                    eprintln!("No new messages.");
                }
                return Ok(());
            }
            _ => {}
        }
        for line in event_lines(&event) {
            line.print();
        }
        match &event {
            Event::History { from_device, file } => match client.import_history(file).await {
                Ok(n) => println!("* history from device {from_device}: {n} messages added"),
                Err(e) => {
                    eprintln!("! the history from device {from_device} was not imported: {e}")
                }
            },
            Event::File { from, file, .. } => {
                let bar = progress_bar(&format!("Receiving {}", file.name));
                let saved = client
                    .save_file(file, &until.files_dir, |done, total| {
                        bar.set_length(total);
                        bar.set_position(done);
                    })
                    .await;
                bar.finish_and_clear();
                match saved {
                    Ok(path) => println!("Saved {}'s file to {}.", from, path.display()),
                    Err(e) => eprintln!("The file {} from {from} was not saved: {e}", file.name),
                }
            }
            _ => {}
        }
    }
}

/// Connects and says so; `after` is the error that dropped an earlier connection.
async fn connect(client: &mut Client, after: Option<&str>) -> Result<(), ClientError> {
    client.connect().await?;
    match after {
        None => eprintln!(
            "Connected to {} as {} (device {}). Listening; Ctrl-C stops.",
            client.server(),
            client.handle(),
            client.device_id()
        ),
        Some(_) => eprintln!("Reconnected."),
    }
    Ok(())
}

/// Whether an error means the broker cannot be reached for now (restarting, network down), as
/// opposed to refusing this device or a fault in the local state.
fn transient(error: &ClientError) -> bool {
    use sealpost_client::{api::ApiError, conn::ConnError};
    match error {
        ClientError::Api(ApiError::Transport(_)) => true,
        ClientError::Conn(ConnError::Transport(_) | ConnError::Timeout) => true,
        // Closed for any reason but bad credentials, a revoked device or another connection
        // of this device taking over (going away for a restart, idle timeout, ...).
        ClientError::Conn(e @ ConnError::Closed { code, .. }) => {
            !e.is_device_revoked() && !matches!(code, Some(4000 | 4001))
        }
        _ => false,
    }
}

/// Reconnects with growing pauses, saying when the next attempt is; the state is opened anew.
async fn reconnect(dir: &Path, lost: &ClientError) -> Result<Client, CliError> {
    let lost = lost.to_string();
    let mut pause = RECONNECT_MIN;
    let mut why = format!("Connection to the broker lost ({lost})");
    loop {
        let at = std::time::SystemTime::now() + pause;
        let at_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        eprintln!(
            "{why}; reconnecting at {} UTC (in {} s)...",
            &format_time(at_ms)[11..],
            pause.as_secs()
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RECONNECT_MAX);
        let mut client = Client::open(dir).await?;
        match connect(&mut client, Some(&lost)).await {
            Ok(()) => return Ok(client),
            Err(e) if transient(&e) => why = format!("Still no broker ({e})"),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Binds the socket (replacing one a dead process left: this one holds the state's lock, so
/// no other listener is alive) and serves it on a task.
fn serve_socket(
    dir: &Path,
    requests: mpsc::Sender<Pending>,
    arrived: Arc<Notify>,
) -> Result<tokio::task::JoinHandle<()>, CliError> {
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| CliError::msg(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_connection(
                stream,
                requests.clone(),
                Arc::clone(&arrived),
            ));
        }
    }))
}

/// One socket client: requests line by line, each answered in order.
async fn serve_connection(
    stream: UnixStream,
    requests: mpsc::Sender<Pending>,
    arrived: Arc<Notify>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let answer = answer_line(&line, &requests, &arrived).await;
        let mut text = answer.to_string();
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The JSON-RPC answer to one request line.
async fn answer_line(line: &str, requests: &mpsc::Sender<Pending>, arrived: &Notify) -> Value {
    if line.len() > MAX_REQUEST {
        return rpc_error(Value::Null, -32600, "request too large");
    }
    let Ok(value) = serde_json::from_str::<Value>(line) else {
        return rpc_error(Value::Null, -32700, "not JSON");
    };
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let call = json!({
        "method": value.get("method").cloned().unwrap_or(Value::Null),
        "params": value.get("params").cloned().unwrap_or(Value::Null),
    });
    let request = match serde_json::from_value::<Request>(call) {
        Ok(request) => request,
        Err(e) => return rpc_error(id, -32601, &format!("unknown method or bad params: {e}")),
    };
    let (reply, answer) = oneshot::channel();
    if requests.send((request, reply)).await.is_err() {
        return rpc_error(id, -32000, "the daemon is stopping");
    }
    arrived.notify_one();
    match answer.await {
        Ok(Ok(answer)) => json!({ "jsonrpc": "2.0", "id": id, "result": answer }),
        Ok(Err(message)) => rpc_error(id, -32000, &message),
        Err(_) => rpc_error(id, -32000, "the daemon stopped"),
    }
}

fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

/// Asks the daemon of `dir`, if one runs: `None` when none does (the caller opens the state
/// itself).
pub(crate) async fn call(dir: &Path, request: &Request) -> Option<Result<Answer, CliError>> {
    let stream = UnixStream::connect(socket_path(dir)).await.ok()?;
    Some(ask(stream, request).await)
}

async fn ask(stream: UnixStream, request: &Request) -> Result<Answer, CliError> {
    let lost = |e: std::io::Error| CliError::msg(format!("the daemon did not answer: {e}"));
    let mut call = serde_json::to_value(request).map_err(|e| CliError::msg(e.to_string()))?;
    call["jsonrpc"] = "2.0".into();
    call["id"] = 1.into();
    let (read, mut write) = stream.into_split();
    let mut text = call.to_string();
    text.push('\n');
    write.write_all(text.as_bytes()).await.map_err(lost)?;
    let line = BufReader::new(read)
        .lines()
        .next_line()
        .await
        .map_err(lost)?
        .ok_or_else(|| CliError::msg("the daemon closed the connection"))?;
    let mut answer: Value = serde_json::from_str(&line)
        .map_err(|_| CliError::msg("the daemon's answer is not JSON"))?;
    if let Some(message) = answer["error"]["message"].as_str() {
        return Err(CliError::msg(message));
    }
    serde_json::from_value(answer["result"].take())
        .map_err(|_| CliError::msg("the daemon's answer is not what this version expects"))
}
