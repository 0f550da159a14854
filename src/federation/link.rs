//! A link: Noise over WebSocket between two brokers.
//!
//! - [`Cipher`]: the Noise transport of an established link, cutting frames into Noise messages
//!   as documented in `sealpost_proto::federation`.
//! - [`initiator`] / [`responder`]: the `KK` handshake states, bound to both domain names.
//! - [`run`]: the outbound link task of a [`FederationPeer`]: connect, authenticate, then carry
//!   the peer's frames out and the acknowledgements and replies back.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use sealpost_proto::{
    DecodeError, ErrorCode,
    federation::{
        HandshakeFrame, LinkFrame, MAX_LINK_FRAME_BYTES, NOISE_CHUNK_PLAINTEXT, NOISE_MAX_MESSAGE,
        NOISE_PATTERN, NOISE_TAG, prologue,
    },
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};

use super::{
    PeerConfig, Resolver,
    identity::ServerKey,
    messages::{LinkDown, LinkReports, LinkUp, Outgoing, TxnAcked},
};

/// Largest encrypted WebSocket message of a link: a maximal frame plus one tag per chunk.
pub const MAX_SEALED_BYTES: usize =
    MAX_LINK_FRAME_BYTES + MAX_LINK_FRAME_BYTES.div_ceil(NOISE_CHUNK_PLAINTEXT) * NOISE_TAG;

/// Why a link failed. Messages carry no content: domains, codes and library errors only.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer could not be reached or the WebSocket failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The peer did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The link heard nothing for its timeout: the peer is frozen or partitioned away.
    #[error("silent past the link timeout")]
    Silent,
    /// The handshake failed: the peer's static key is not the one expected for its domain.
    #[error("peer authentication failed")]
    PeerAuth,
    /// The peer refused the link.
    #[error("refused by peer: {0} ({1})")]
    Refused(ErrorCode, String),
    /// A frame did not decrypt or decode.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Noise failed locally (a bug or bad key material).
    #[error("noise: {0}")]
    Noise(String),
}

impl From<DecodeError> for LinkError {
    fn from(e: DecodeError) -> Self {
        LinkError::Protocol(e.to_string())
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for LinkError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        LinkError::Transport(e.to_string())
    }
}

/// The Noise transport of an established link.
pub struct Cipher(snow::TransportState);

impl Cipher {
    /// Encrypts one frame into one WebSocket message.
    pub fn seal(&mut self, plain: &[u8]) -> Result<Vec<u8>, LinkError> {
        if plain.len() > MAX_LINK_FRAME_BYTES {
            return Err(LinkError::Protocol(format!(
                "frame of {} bytes exceeds the limit",
                plain.len()
            )));
        }
        let chunks = plain.len().div_ceil(NOISE_CHUNK_PLAINTEXT);
        let mut out = vec![0u8; plain.len() + chunks * NOISE_TAG];
        let mut at = 0;
        for chunk in plain.chunks(NOISE_CHUNK_PLAINTEXT) {
            let n = self
                .0
                .write_message(chunk, &mut out[at..])
                .map_err(|e| LinkError::Noise(e.to_string()))?;
            at += n;
        }
        out.truncate(at);
        Ok(out)
    }

    /// Decrypts one WebSocket message into one frame.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, LinkError> {
        if sealed.is_empty() || sealed.len() > MAX_SEALED_BYTES {
            return Err(LinkError::Protocol("bad encrypted message size".into()));
        }
        let mut out = vec![0u8; sealed.len()];
        let mut at = 0;
        for chunk in sealed.chunks(NOISE_MAX_MESSAGE) {
            let n = self
                .0
                .read_message(chunk, &mut out[at..])
                .map_err(|_| LinkError::Protocol("a message did not decrypt".into()))?;
            at += n;
        }
        out.truncate(at);
        Ok(out)
    }
}

fn builder<'a>(
    key: &'a ServerKey,
    remote: &'a [u8; 32],
    prologue: &'a [u8],
) -> Result<snow::Builder<'a>, LinkError> {
    let params = NOISE_PATTERN
        .parse()
        .map_err(|e: snow::Error| LinkError::Noise(e.to_string()))?;
    let noise = |e: snow::Error| LinkError::Noise(e.to_string());
    snow::Builder::new(params)
        .local_private_key(key.private())
        .map_err(noise)?
        .remote_public_key(remote)
        .map_err(noise)?
        .prologue(prologue)
        .map_err(noise)
}

/// The initiator's handshake for a link from `origin` to `target`, whose key is `remote`.
pub fn initiator(
    key: &ServerKey,
    origin: &str,
    target: &str,
    remote: &[u8; 32],
) -> Result<snow::HandshakeState, LinkError> {
    let p = prologue(origin, target);
    builder(key, remote, &p)?
        .build_initiator()
        .map_err(|e| LinkError::Noise(e.to_string()))
}

/// The responder's handshake for a link from `origin` (whose key is `remote`) to `target`.
pub fn responder(
    key: &ServerKey,
    origin: &str,
    target: &str,
    remote: &[u8; 32],
) -> Result<snow::HandshakeState, LinkError> {
    let p = prologue(origin, target);
    builder(key, remote, &p)?
        .build_responder()
        .map_err(|e| LinkError::Noise(e.to_string()))
}

/// Finishes a handshake.
pub fn transport(hs: snow::HandshakeState) -> Result<Cipher, LinkError> {
    hs.into_transport_mode()
        .map(Cipher)
        .map_err(|e| LinkError::Noise(e.to_string()))
}

/// What the outbound link task needs.
pub(crate) struct LinkParams {
    pub(crate) local_domain: String,
    pub(crate) peer: Arc<PeerConfig>,
    pub(crate) key: Arc<ServerKey>,
    pub(crate) resolver: Arc<Resolver>,
    pub(crate) connect_timeout: Duration,
    pub(crate) keepalive: Duration,
    pub(crate) link_timeout: Duration,
    /// The longest one write may take: a transaction of `max_txn_bytes` on a slow but live
    /// link must fit in it.
    pub(crate) write_timeout: Duration,
    pub(crate) queue: usize,
}

/// Runs one outbound link to its end and reports the end to the peer actor.
pub(crate) async fn run(params: LinkParams, peer: LinkReports, generation: u64) {
    let reason = match serve(&params, &peer, generation).await {
        Ok(()) => "closed".to_owned(),
        Err(e) => e.to_string(),
    };
    peer.down.do_send(LinkDown { generation, reason });
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_binary(ws: &mut Ws) -> Result<Vec<u8>, LinkError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
            Some(Ok(Message::Close(c))) => {
                let why = c.map(|c| c.reason.to_string()).unwrap_or_default();
                return Err(LinkError::Transport(format!("closed by peer: {why}")));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(LinkError::Transport("connection ended".into())),
        }
    }
}

/// Sends a frame. A write that cannot finish within `deadline` means the peer takes nothing
/// off the connection (frozen or partitioned once the socket buffers are full): the link is
/// silent, even though the keepalive check, which waits behind the write, could not see it.
async fn send(
    ws: &mut Ws,
    cipher: &mut Cipher,
    frame: &LinkFrame,
    deadline: Duration,
) -> Result<(), LinkError> {
    let sealed = cipher.seal(&frame.encode())?;
    write(ws, Message::Binary(sealed.into()), deadline).await
}

async fn write(ws: &mut Ws, message: Message, deadline: Duration) -> Result<(), LinkError> {
    match tokio::time::timeout(deadline, ws.send(message)).await {
        Ok(sent) => Ok(sent?),
        Err(_) => Err(LinkError::Silent),
    }
}

async fn serve(params: &LinkParams, peer: &LinkReports, generation: u64) -> Result<(), LinkError> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_SEALED_BYTES))
        .max_frame_size(Some(MAX_SEALED_BYTES));
    let (peer_key, url) = params
        .resolver
        .resolve(&params.peer.domain)
        .await
        .map_err(|e| LinkError::Transport(e.to_string()))?;
    let connect = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true);
    let (mut ws, _) = tokio::time::timeout(params.connect_timeout, connect)
        .await
        .map_err(|_| LinkError::Timeout)??;
    let mut hs = initiator(
        &params.key,
        &params.local_domain,
        &params.peer.domain,
        &peer_key,
    )?;
    let mut buf = [0u8; 256];
    let n = hs
        .write_message(&[], &mut buf)
        .map_err(|e| LinkError::Noise(e.to_string()))?;
    let hello = HandshakeFrame::Hello {
        origin: params.local_domain.clone(),
        target: params.peer.domain.clone(),
        noise: buf[..n].to_vec(),
    };
    ws.send(Message::Binary(hello.encode().into())).await?;
    let reply = tokio::time::timeout(params.connect_timeout, next_binary(&mut ws))
        .await
        .map_err(|_| LinkError::Timeout)??;
    match HandshakeFrame::decode(&reply)? {
        HandshakeFrame::Welcome { noise } => {
            if hs.read_message(&noise, &mut buf).is_err() {
                params.resolver.forget(&params.peer.domain);
                return Err(LinkError::PeerAuth);
            }
        }
        HandshakeFrame::Refuse { code, message } => return Err(LinkError::Refused(code, message)),
        HandshakeFrame::Hello { .. } => {
            return Err(LinkError::Protocol("hello from the responder".into()));
        }
    }
    let mut cipher = transport(hs)?;
    let (tx, mut rx) = mpsc::channel(params.queue);
    peer.up.do_send(LinkUp { generation, tx });

    let mut pending: HashMap<u64, oneshot::Sender<LinkFrame>> = HashMap::new();
    // Transactions sent and not yet acknowledged, with their sizes: the receiving broker
    // acknowledges each once, in order, with at most one code per envelope. Anything else is
    // a protocol violation and never reaches the peer actor (whose queue it would flood).
    let mut unacked: VecDeque<(u64, usize)> = VecDeque::new();
    let mut next_req = 1u64;
    let mut heartbeat = tokio::time::interval(params.keepalive);
    heartbeat.tick().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                // The peer actor let go of this link (a newer one replaced it, or shutdown).
                None => {
                    let _ = ws.close(None).await;
                    return Ok(());
                }
                Some(Outgoing::Frame(frame)) => {
                    // How many answers its acknowledgement may hold: one per envelope, one per
                    // recipient of a group message.
                    match &frame {
                        LinkFrame::Txn { txn_id, envelopes } => {
                            unacked.push_back((*txn_id, envelopes.len()));
                        }
                        LinkFrame::GroupTxn { txn_id, entries } => {
                            let answers = entries.iter().map(|e| e.recipients.len()).sum();
                            unacked.push_back((*txn_id, answers));
                        }
                        _ => {}
                    }
                    send(&mut ws, &mut cipher, &frame, params.write_timeout).await?;
                }
                Some(Outgoing::Request(request, reply)) => {
                    let req_id = next_req;
                    next_req += 1;
                    pending.retain(|_, tx| !tx.is_closed());
                    pending.insert(req_id, reply);
                    send(&mut ws, &mut cipher, &request.frame(req_id), params.write_timeout).await?;
                }
            },
            msg = ws.next() => {
                last_heard = Instant::now();
                match msg {
                    Some(Ok(Message::Binary(sealed))) => {
                        let frame = LinkFrame::decode(&cipher.open(&sealed)?)?;
                        match frame {
                            LinkFrame::TxnAck { txn_id, codes } => match unacked.pop_front() {
                                Some((sent, size)) if sent == txn_id && codes.len() <= size => {
                                    peer.acked.do_send(TxnAcked { generation, txn_id, codes });
                                }
                                _ => return Err(LinkError::Protocol("acknowledgement of no transaction in flight".into())),
                            },
                            LinkFrame::Devices { req_id, .. }
                            | LinkFrame::DeviceList { req_id, .. }
                            | LinkFrame::Claimed { req_id, .. }
                            | LinkFrame::Epoch { req_id, .. }
                            | LinkFrame::Roots { req_id, .. }
                            | LinkFrame::Noted { req_id, .. }
                            | LinkFrame::Refused { req_id, .. } => {
                                if let Some(reply) = pending.remove(&req_id) {
                                    let _ = reply.send(frame);
                                }
                            }
                            LinkFrame::LinkError { code, message } => {
                                return Err(LinkError::Refused(code, message));
                            }
                            _ => return Err(LinkError::Protocol("request frame from the receiving broker".into())),
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => {
                        return Err(LinkError::Transport("closed by peer".into()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > params.link_timeout {
                    return Err(LinkError::Silent);
                }
                write(&mut ws, Message::Ping(Vec::new().into()), params.write_timeout).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: &ServerKey, b: &ServerKey, b_claims: &str) -> Result<(Cipher, Cipher), LinkError> {
        let mut i = initiator(a, "a.example", "b.example", b.public())?;
        let mut r = responder(b, "a.example", b_claims, a.public())?;
        let mut m1 = [0u8; 256];
        let mut m2 = [0u8; 256];
        let mut p = [0u8; 256];
        let n = i.write_message(&[], &mut m1).unwrap();
        r.read_message(&m1[..n], &mut p)
            .map_err(|_| LinkError::PeerAuth)?;
        let n = r.write_message(&[], &mut m2).unwrap();
        i.read_message(&m2[..n], &mut p)
            .map_err(|_| LinkError::PeerAuth)?;
        Ok((transport(i)?, transport(r)?))
    }

    #[test]
    fn large_frames_cross_in_chunks() {
        let a = ServerKey::generate().unwrap();
        let b = ServerKey::generate().unwrap();
        let (mut ca, mut cb) = pair(&a, &b, "b.example").unwrap();
        for len in [2, NOISE_CHUNK_PLAINTEXT, NOISE_CHUNK_PLAINTEXT + 1, 300_000] {
            let plain: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
            let sealed = ca.seal(&plain).unwrap();
            assert_eq!(cb.open(&sealed).unwrap(), plain);
        }
        // Tampering is detected.
        let mut sealed = ca.seal(b"hello").unwrap();
        sealed[3] ^= 1;
        assert!(cb.open(&sealed).is_err());
    }

    #[test]
    fn wrong_keys_and_wrong_domains_fail() {
        let a = ServerKey::generate().unwrap();
        let b = ServerKey::generate().unwrap();
        let mallory = ServerKey::generate().unwrap();
        assert!(pair(&a, &b, "b.example").is_ok());
        // Mallory claims to be a.example: the responder expects a's key.
        let mut i = initiator(&mallory, "a.example", "b.example", b.public()).unwrap();
        let mut r = responder(&b, "a.example", "b.example", a.public()).unwrap();
        let mut m = [0u8; 256];
        let mut p = [0u8; 256];
        let n = i.write_message(&[], &mut m).unwrap();
        assert!(r.read_message(&m[..n], &mut p).is_err());
        // A responder that believes it is another domain (prologue mismatch) fails too.
        assert!(pair(&a, &b, "c.example").is_err());
    }
}
