//! ejabberd over XMPP over WebSocket (RFC 7395, subprotocol `xmpp`), for issue 11's
//! comparison: the [`Server`] behind `sealpost-loadtest ejabberd <e2e|appends|idle>`.
//!
//! - Users are created by in-band registration (XEP-0077): each of `--register-concurrency`
//!   unauthenticated streams registers its share of the accounts one `<iq>` after another
//!   (ejabberd needs `registration_timeout: infinity` and `mod_register` open to loopback,
//!   as `loadtest/ejabberd/ejabberd.yml` has).
//! - A login is SASL PLAIN, a stream restart, resource bind, stream management (XEP-0198
//!   `<enable/>`) and initial presence, which also makes ejabberd hand over the offline
//!   messages (mod_offline) that W2's drain reads.
//! - A send is `<message type='chat'>` to the recipient's bare JID whose `<body>` is the
//!   payload (with its timestamp) in base64, followed by `<r/>`. The send counts as *taken*
//!   (the counterpart of Sealpost's durable `send_result` and NATS's PubAck) when ejabberd's
//!   `<a h=.../>` covers it: ejabberd handles a stream's stanzas in order and answers `<r/>`
//!   after routing what came before it, i.e. after the message was handed to the recipient's
//!   session or stored by mod_offline (in RAM with compare.sh's set-up). Nothing is on disk.
//! - Delivery is the `<message>` arriving at the recipient, who acknowledges with `<a h=.../>`
//!   when ejabberd asks (`<r/>`), `--ack-delay` (5 ms) later, as Sealpost devices batch acks.
//!
//! Only loopback `ws://` URLs are accepted. The XML is handled as text: each WebSocket
//! message is one complete top-level element (RFC 7395), and ejabberd's are predictable.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD};
use futures_util::{
    SinkExt, StreamExt,
    stream::{self, SplitSink, SplitStream},
};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use serde_json::Value;
use tokio::{
    net::TcpStream,
    sync::{Semaphore, mpsc, watch},
    task::JoinHandle,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async_with_config,
    tungstenite::{
        Message, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig,
    },
};

use crate::{
    OtherCommon, Workload,
    idle::IdleStats,
    other::{self, Server, bounded},
    traffic::{Pacer, Plan, Stats, Window, pick_recipient},
    util::loopback_url,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const FRAMING_NS: &str = "urn:ietf:params:xml:ns:xmpp-framing";
/// Asks the server to acknowledge what it has handled (XEP-0198).
const ACK_REQUEST: &str = "<r xmlns='urn:xmpp:sm:3'/>";
/// Read buffer of sessions that carry traffic (small: see `scenarios::BUSY_READ_BUFFER`), and
/// of idle ones.
const BUSY_READ_BUFFER: usize = crate::scenarios::BUSY_READ_BUFFER;
const IDLE_READ_BUFFER: usize = 4 * 1024;

/// Runs one workload against ejabberd.
pub(crate) async fn run(workload: &Workload) -> Result<Value> {
    other::run(&Ejabberd::new(workload.common())?, workload).await
}

/// An ejabberd server on loopback.
pub(crate) struct Ejabberd {
    common: OtherCommon,
    url: String,
}

/// A logged-in session.
pub(crate) struct Session {
    ws: Ws,
    /// Stanzas received since `<enabled/>` (the `h` of our acks).
    received: u32,
}

impl Ejabberd {
    fn new(common: &OtherCommon) -> Result<Self> {
        Ok(Ejabberd {
            url: loopback_url(&common.url, "ws")?,
            common: common.clone(),
        })
    }

    fn password(user: &str) -> String {
        format!("pw-{user}")
    }

    /// A WebSocket with subprotocol `xmpp` and an opened stream, its features read.
    async fn open(&self, read_buffer: usize) -> Result<Ws> {
        let mut request = self.url.as_str().into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("xmpp"));
        let config = WebSocketConfig::default()
            .read_buffer_size(read_buffer)
            .write_buffer_size(0);
        let (mut ws, _) = connect_async_with_config(request, Some(config), true)
            .await
            .with_context(|| format!("WebSocket connect to {}", self.url))?;
        self.restart(&mut ws).await?;
        Ok(ws)
    }

    /// Sends `<open/>` and reads up to the stream features.
    async fn restart(&self, ws: &mut Ws) -> Result<()> {
        ws.send(Message::text(format!(
            "<open xmlns='{FRAMING_NS}' to='{}' version='1.0'/>",
            self.common.domain
        )))
        .await?;
        loop {
            let text = next_text(ws).await?;
            if text.contains("features") {
                return Ok(());
            }
            if text.starts_with("<close") || text.contains("stream:error") {
                bail!("stream refused: {text}");
            }
        }
    }

    /// Registers `users` in order on one unauthenticated stream.
    async fn register_on(&self, users: &[String]) -> Result<()> {
        let mut ws = bounded(&self.common, "opening a stream", self.open(4096)).await?;
        for (i, user) in users.iter().enumerate() {
            ws.send(Message::text(format!(
                "<iq type='set' id='reg{i}'><query xmlns='jabber:iq:register'>\
                 <username>{user}</username><password>{}</password></query></iq>",
                Self::password(user)
            )))
            .await?;
            let id = format!("'reg{i}'");
            loop {
                let text = bounded(&self.common, "registering", next_text(&mut ws)).await?;
                if text.starts_with("<iq") && text.contains(&id) {
                    if !text.contains("type='result'") && !text.contains("type=\"result\"") {
                        bail!("registering {user} failed: {text}");
                    }
                    break;
                }
            }
        }
        let _ = ws.close(None).await;
        Ok(())
    }
}

impl Server for Ejabberd {
    type Session = Session;
    const NAME: &'static str = "ejabberd";

    async fn create_users(&self, users: &[String]) -> Result<()> {
        let workers = self.common.register_concurrency.max(1);
        let share = users.len().div_ceil(workers).max(1);
        stream::iter(users.chunks(share))
            .map(|chunk| self.register_on(chunk))
            .buffer_unordered(workers)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    fn address(&self, user: &str) -> String {
        format!("{user}@{}", self.common.domain)
    }

    async fn login(&self, user: &str, backlog: u64, idle: bool) -> Result<Session> {
        let buffer = if idle {
            IDLE_READ_BUFFER
        } else {
            BUSY_READ_BUFFER
        };
        bounded(
            &self.common,
            "login",
            self.login_inner(user, backlog, buffer),
        )
        .await
    }

    fn spawn_traffic(
        &self,
        session: Session,
        plan: &Arc<Plan>,
        stats: &Arc<Stats>,
        window: Window,
        me: Option<usize>,
        done: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let (sink, stream) = session.ws.split();
        let permits = Arc::new(Semaphore::new(plan.pipeline));
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        vec![
            tokio::spawn(reader(
                stream,
                plan.ack_delay,
                Arc::clone(stats),
                Arc::clone(&permits),
                Arc::clone(&pending),
                out_tx,
                session.received,
                done.clone(),
            )),
            tokio::spawn(writer(
                sink,
                Arc::clone(plan),
                Arc::clone(stats),
                permits,
                pending,
                out_rx,
                window,
                me,
                done,
            )),
        ]
    }

    fn spawn_idle(
        &self,
        session: Session,
        stats: Arc<IdleStats>,
        done: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(keep_alive(session, stats, done))
    }
}

impl Ejabberd {
    async fn login_inner(&self, user: &str, backlog: u64, read_buffer: usize) -> Result<Session> {
        let mut ws = self.open(read_buffer).await?;
        let plain = STANDARD.encode(format!("\0{user}\0{}", Self::password(user)));
        ws.send(Message::text(format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"
        )))
        .await?;
        loop {
            let text = next_text(&mut ws).await?;
            if text.starts_with("<success") {
                break;
            }
            if text.starts_with("<failure") || text.starts_with("<close") {
                bail!("authentication of {user} refused: {text}");
            }
        }
        self.restart(&mut ws).await?;
        // Bind, stream management and initial presence in one go; ejabberd handles them in
        // order.
        for element in [
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>lt</resource></bind></iq>",
            "<enable xmlns='urn:xmpp:sm:3'/>",
            "<presence/>",
        ] {
            ws.feed(Message::text(element)).await?;
        }
        ws.flush().await?;
        let mut bound = false;
        let mut enabled = false;
        let mut received: u32 = 0;
        let mut messages = 0;
        while !(bound && enabled && messages >= backlog) {
            let text = next_text(&mut ws).await?;
            if text.starts_with("<iq") && (text.contains("'bind'") || text.contains("\"bind\"")) {
                if !text.contains("result") {
                    bail!("binding a resource for {user} failed: {text}");
                }
                bound = true;
            } else if text.starts_with("<enabled") {
                enabled = true;
            } else if text.starts_with("<failed") {
                bail!("stream management refused for {user}: {text}");
            } else if text.starts_with("<r ") || text.starts_with("<r/") {
                ws.send(Message::text(ack(received))).await?;
            } else if is_stanza(&text) {
                if enabled {
                    received = received.wrapping_add(1);
                }
                if text.starts_with("<message") && body(&text).is_some() {
                    messages += 1;
                }
            } else if text.starts_with("<close") {
                bail!("ejabberd closed the stream of {user}: {text}");
            }
        }
        Ok(Session { ws, received })
    }
}

/// The next text message, skipping control frames.
async fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        match ws.next().await {
            None => bail!("connection ended"),
            Some(Err(e)) => return Err(e).context("reading from ejabberd"),
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => bail!("ejabberd closed the WebSocket: {frame:?}"),
            Some(Ok(_)) => {}
        }
    }
}

fn ack(received: u32) -> String {
    format!("<a xmlns='urn:xmpp:sm:3' h='{received}'/>")
}

/// Whether a top-level element is a stanza (counted by stream management).
fn is_stanza(text: &str) -> bool {
    text.starts_with("<message") || text.starts_with("<presence") || text.starts_with("<iq")
}

/// The text of a stanza's `<body>`.
fn body(text: &str) -> Option<&str> {
    let start = text.find("<body>")? + "<body>".len();
    let len = text[start..].find("</body>")?;
    Some(&text[start..start + len])
}

/// The value of attribute `name` of the element that `text` starts with.
fn attr<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let head = &text[..text.find('>').unwrap_or(text.len())];
    for quote in ['\'', '"'] {
        let key = format!(" {name}={quote}");
        if let Some(at) = head.find(&key) {
            let rest = &head[at + key.len()..];
            return rest.find(quote).map(|end| &rest[..end]);
        }
    }
    None
}

/// The send timestamp of a delivered message: the first 8 payload bytes, from its base64 body.
fn stamp_of_body(body: &str) -> Option<u64> {
    // 12 base64 characters are 9 bytes, enough for the 8-byte stamp.
    let bytes = STANDARD.decode(body.get(..12)?).ok()?;
    crate::traffic::stamp_of(&bytes)
}

#[allow(clippy::too_many_arguments)]
async fn writer(
    mut sink: SplitSink<Ws, Message>,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    permits: Arc<Semaphore>,
    pending: Arc<Mutex<VecDeque<u64>>>,
    mut out: mpsc::UnboundedReceiver<String>,
    window: Window,
    me: Option<usize>,
    mut done: watch::Receiver<bool>,
) {
    let mut rng = StdRng::from_entropy();
    let mut template = vec![0u8; plan.size.max(8)];
    rng.fill_bytes(&mut template);
    let mut pacer = Pacer::new(&plan, window, &mut rng);
    loop {
        tokio::select! {
            biased;
            _ = done.changed() => break,
            element = out.recv() => {
                let Some(element) = element else { break };
                if sink.send(Message::text(element)).await.is_err() {
                    break;
                }
            }
            () = pacer.tick(), if pacer.sending() => {}
            permit = Arc::clone(&permits).acquire_owned(), if pacer.ready() => {
                let Ok(permit) = permit else { break };
                let Some((stamp, number)) = pacer.take(&stats) else { continue };
                permit.forget();
                let to = pick_recipient(plan.recipients.len(), me, number, &mut rng);
                template[..8].copy_from_slice(&stamp.to_le_bytes());
                let stanza = format!(
                    "<message to='{}' type='chat'><body>{}</body></message>",
                    plan.recipients[to].handle,
                    STANDARD.encode(&template)
                );
                pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_back(stamp);
                if sink.feed(Message::text(stanza)).await.is_err()
                    || sink.send(Message::text(ACK_REQUEST)).await.is_err()
                {
                    break;
                }
                stats.sent.fetch_add(1, Relaxed);
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

/// Reads a traffic session: deliveries, ejabberd's acks of our sends (`<a/>`) and its ack
/// requests (`<r/>`). A request is answered `ack_delay` later (`--ack-delay`, as Sealpost
/// devices batch their acks): ejabberd asks again only after our answer, so the deliveries
/// of that time share one `<a/>`.
#[allow(clippy::too_many_arguments)]
async fn reader(
    mut stream: SplitStream<Ws>,
    ack_delay: Duration,
    stats: Arc<Stats>,
    permits: Arc<Semaphore>,
    pending: Arc<Mutex<VecDeque<u64>>>,
    out: mpsc::UnboundedSender<String>,
    mut received: u32,
    mut done: watch::Receiver<bool>,
) {
    // `h` counts every stanza this session sent since <enable/>: the initial presence, then
    // the messages.
    let mut acked: u32 = 1;
    let ack_sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(ack_sleep);
    let mut armed = false;
    loop {
        tokio::select! {
            biased;
            _ = done.changed() => break,
            () = &mut ack_sleep, if armed => {
                armed = false;
                if out.send(ack(received)).is_err() {
                    break;
                }
            }
            msg = stream.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(frame))) => {
                        stats.close(format!("ws_close {frame:?}"));
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        stats.close(format!("read_error: {e}"));
                        break;
                    }
                    None => {
                        stats.close("eof".to_owned());
                        break;
                    }
                };
                let text = text.as_str();
                if text.starts_with("<message") {
                    received = received.wrapping_add(1);
                    match body(text).and_then(stamp_of_body) {
                        Some(stamp) => stats.record(&stats.deliver_latency, stamp),
                        None => {
                            stats.decode_errors.fetch_add(1, Relaxed);
                        }
                    }
                    stats.delivered.fetch_add(1, Relaxed);
                } else if text.starts_with("<a ") {
                    let Some(h) = attr(text, "h").and_then(|h| h.parse::<u32>().ok()) else {
                        stats.decode_errors.fetch_add(1, Relaxed);
                        continue;
                    };
                    let new = h.wrapping_sub(acked);
                    acked = h;
                    let stamps: Vec<u64> = {
                        let mut queue = pending.lock().unwrap_or_else(PoisonError::into_inner);
                        let n = usize::try_from(new).unwrap_or(usize::MAX).min(queue.len());
                        queue.drain(..n).collect()
                    };
                    for stamp in &stamps {
                        stats.record(&stats.result_latency, *stamp);
                    }
                    let n = u64::try_from(stamps.len()).unwrap_or(0);
                    stats.accepted.fetch_add(n, Relaxed);
                    stats.results.fetch_add(n, Relaxed);
                    permits.add_permits(stamps.len());
                } else if text.starts_with("<r ") || text.starts_with("<r/") {
                    if !armed {
                        ack_sleep
                            .as_mut()
                            .reset(tokio::time::Instant::now() + ack_delay);
                        armed = true;
                    }
                } else if is_stanza(text) {
                    received = received.wrapping_add(1);
                } else if text.starts_with("<close") || text.contains("stream:error") {
                    stats.close(format!("stream closed: {text}"));
                    break;
                }
            }
        }
    }
}

/// Keeps an idle session open: answers ejabberd's ack requests and XMPP pings, counts its
/// WebSocket pings (tungstenite answers those).
async fn keep_alive(session: Session, stats: Arc<IdleStats>, mut done: watch::Receiver<bool>) {
    let Session {
        mut ws,
        mut received,
    } = session;
    loop {
        tokio::select! {
            biased;
            _ = done.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Ping(_))) => {
                    stats.pings.fetch_add(1, Relaxed);
                }
                Some(Ok(Message::Text(t))) => {
                    let text = t.as_str();
                    let reply = if text.starts_with("<r ") || text.starts_with("<r/") {
                        Some(ack(received))
                    } else if is_stanza(text) {
                        received = received.wrapping_add(1);
                        // An XMPP ping (XEP-0199) wants an empty result.
                        (text.starts_with("<iq") && text.contains("urn:xmpp:ping")).then(|| {
                            stats.pings.fetch_add(1, Relaxed);
                            format!(
                                "<iq type='result' id='{}' to='{}'/>",
                                attr(text, "id").unwrap_or_default(),
                                attr(text, "from").unwrap_or_default()
                            )
                        })
                    } else {
                        None
                    };
                    if reply.is_none() {
                        stats.frames.fetch_add(1, Relaxed);
                    }
                    if let Some(reply) = reply
                        && ws.send(Message::text(reply)).await.is_err()
                    {
                        stats.close("write_error".to_owned());
                        return;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    stats.close(format!("ws_close {frame:?}"));
                    return;
                }
                Some(Ok(_)) => {
                    stats.frames.fetch_add(1, Relaxed);
                }
                Some(Err(e)) => {
                    stats.close(format!("read_error: {e}"));
                    return;
                }
                None => {
                    stats.close("eof".to_owned());
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_ejabberd_sends() {
        assert_eq!(attr("<a xmlns='urn:xmpp:sm:3' h='42'/>", "h"), Some("42"));
        assert_eq!(attr("<a xmlns=\"urn:xmpp:sm:3\" h=\"7\"/>", "h"), Some("7"));
        assert_eq!(attr("<a xmlns='x'/><b h='1'/>", "h"), None);
        let mut payload = vec![0u8; 256];
        payload[..8].copy_from_slice(&123_456_789u64.to_le_bytes());
        let stanza = format!(
            "<message from='a@localhost/lt' to='b@localhost' type='chat'><body>{}</body></message>",
            STANDARD.encode(&payload)
        );
        assert_eq!(body(&stanza).and_then(stamp_of_body), Some(123_456_789));
        assert!(is_stanza("<presence/>"));
        assert!(!is_stanza("<r xmlns='urn:xmpp:sm:3'/>"));
    }
}
