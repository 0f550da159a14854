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
    exec::{Answer, Mode, Request, exec},
    output::{event_lines, format_time, progress_bar},
};

/// The socket's name in the state directory.
const SOCKET: &str = "daemon.sock";

/// First and longest wait before reconnecting to a broker that was lost.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// How long a command waits for the daemon's answer (a large file takes a while).
const ASK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

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
    let (server, bound) = serve_socket(dir, requests_tx, Arc::clone(&arrived))?;
    let result = run(client, &until, &mut requests, &arrived).await;
    server.abort();
    // Only our own socket: never one another listener bound since.
    let path = socket_path(dir);
    if std::fs::metadata(&path).is_ok_and(|m| identity(&m) == bound) {
        let _ = std::fs::remove_file(&path);
    }
    result
}

/// A file's identity (device, inode).
fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (m.dev(), m.ino())
}

/// Answers the requests waiting now.
async fn serve_waiting(client: &mut Client, requests: &mut mpsc::Receiver<Pending>) {
    while let Ok((request, reply)) = requests.try_recv() {
        let answer = exec(client, request, Mode::Daemon).await;
        let _ = reply.send(answer.map_err(|e| e.to_string()));
    }
}

async fn run(
    mut client: Client,
    until: &Until,
    requests: &mut mpsc::Receiver<Pending>,
    arrived: &Notify,
) -> Result<(), CliError> {
    match connect(&mut client, None).await {
        Ok(()) => {}
        Err(e) if transient(&e) => client = reconnect(client.reopen()?, &e, requests).await?,
        Err(e) => return Err(e.into()),
    }
    let mut messages = 0usize;
    loop {
        if until.count.is_some_and(|c| messages >= c) {
            return Ok(());
        }
        serve_waiting(&mut client, requests).await;
        let next = client.next_event_or(arrived.notified()).await;
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(e) if transient(&e) => {
                // The state is read again (keeping the directory's lock), so that whatever
                // the failed call had decrypted without saving comes again from the broker
                // (nothing is acknowledged before it is saved).
                client = reconnect(client.reopen()?, &e, requests).await?;
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

/// Reconnects with growing pauses, saying when the next attempt is, and answers the socket's
/// requests meanwhile (what needs the broker fails at once, in words; the rest works).
async fn reconnect(
    mut client: Client,
    lost: &ClientError,
    requests: &mut mpsc::Receiver<Pending>,
) -> Result<Client, CliError> {
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
        let attempt = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(attempt) => break,
                request = requests.recv() => {
                    let Some((request, reply)) = request else { break };
                    let answer = exec(&mut client, request, Mode::Daemon).await;
                    let _ = reply.send(answer.map_err(|e| e.to_string()));
                }
            }
        }
        pause = (pause * 2).min(RECONNECT_MAX);
        match connect(&mut client, Some(&why)).await {
            Ok(()) => return Ok(client),
            Err(e) if transient(&e) => {
                why = format!("Still no broker ({e})");
                client = client.reopen()?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Binds the socket (replacing one a dead process left: this one holds the state's lock, so
/// no other listener is alive) and serves it on a task. Returns the task and the socket
/// file's identity.
fn serve_socket(
    dir: &Path,
    requests: mpsc::Sender<Pending>,
    arrived: Arc<Notify>,
) -> Result<(tokio::task::JoinHandle<()>, (u64, u64)), CliError> {
    use std::os::unix::fs::MetadataExt as _;
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| CliError::msg(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )?;
    let meta = std::fs::metadata(&path)?;
    let (bound, owner) = (identity(&meta), meta.uid());
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // Only the user who owns the state (the directory is 0700 and the socket 0600;
            // this also holds should either be loosened).
            if stream.peer_cred().map(|c| c.uid()).ok() != Some(owner) {
                continue;
            }
            tokio::spawn(serve_connection(
                stream,
                requests.clone(),
                Arc::clone(&arrived),
            ));
        }
    });
    Ok((task, bound))
}

/// One socket client: requests line by line, each answered in order; a line longer than
/// [`MAX_REQUEST`] is answered with an error and ends the connection.
async fn serve_connection(
    stream: UnixStream,
    requests: mpsc::Sender<Pending>,
    arrived: Arc<Notify>,
) {
    use tokio::io::AsyncReadExt as _;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let limit = u64::try_from(MAX_REQUEST).unwrap_or(u64::MAX) + 1;
        let read = match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let too_long = read > MAX_REQUEST && line.last() != Some(&b'\n');
        let answer = if too_long {
            Some(rpc_error(Value::Null, -32600, "request too large"))
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => answer_line(text, &requests, &arrived).await,
                Err(_) => Some(rpc_error(Value::Null, -32700, "not UTF-8")),
            }
        };
        if let Some(answer) = answer {
            let mut text = answer.to_string();
            text.push('\n');
            if write.write_all(text.as_bytes()).await.is_err() {
                return;
            }
        }
        if too_long {
            return;
        }
    }
}

/// The JSON-RPC 2.0 answer to one request line; `None` for a notification (no `id`), which
/// is carried out but not answered.
async fn answer_line(
    line: &str,
    requests: &mpsc::Sender<Pending>,
    arrived: &Notify,
) -> Option<Value> {
    let Ok(value) = serde_json::from_str::<Value>(line) else {
        return Some(rpc_error(Value::Null, -32700, "not JSON"));
    };
    if value.is_array() {
        return Some(rpc_error(Value::Null, -32600, "batches are not supported"));
    }
    let id = match value.get("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id.clone()),
        Some(_) => {
            return Some(rpc_error(
                Value::Null,
                -32600,
                "id must be a number or a string",
            ));
        }
    };
    let reply_to = id.clone().unwrap_or(Value::Null);
    if value.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(rpc_error(reply_to, -32600, "not a JSON-RPC 2.0 request"));
    }
    let method = value.get("method").cloned().unwrap_or(Value::Null);
    let call = json!({
        "method": method,
        "params": value.get("params").cloned().unwrap_or(Value::Null),
    });
    let request = match serde_json::from_value::<Request>(call) {
        Ok(request) => request,
        // Unknown method, or known with wrong params.
        Err(e) if e.to_string().contains("unknown variant") => {
            return id.map(|_| rpc_error(reply_to, -32601, &format!("unknown method {method}")));
        }
        Err(e) => {
            return id.map(|_| rpc_error(reply_to, -32602, &format!("bad params: {e}")));
        }
    };
    let (reply, answer) = oneshot::channel();
    if requests.send((request, reply)).await.is_err() {
        return id.map(|_| rpc_error(reply_to, -32000, "the daemon is stopping"));
    }
    arrived.notify_one();
    let answer = answer.await;
    id?;
    Some(match answer {
        Ok(Ok(answer)) => json!({ "jsonrpc": "2.0", "id": reply_to, "result": answer }),
        Ok(Err(message)) => rpc_error(reply_to, -32000, &message),
        Err(_) => rpc_error(reply_to, -32000, "the daemon stopped"),
    })
}

fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

/// Asks the daemon of `dir`, if one runs: `None` when none does (the caller opens the state
/// itself).
pub(crate) async fn call(dir: &Path, request: &Request) -> Option<Result<Answer, CliError>> {
    let stream = UnixStream::connect(socket_path(dir)).await.ok()?;
    Some(
        tokio::time::timeout(ASK_TIMEOUT, ask(stream, request))
            .await
            .unwrap_or_else(|_| Err(CliError::msg("the daemon did not answer in time"))),
    )
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
