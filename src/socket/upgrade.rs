//! The HTTP side of a WebSocket: the upgrade request, handed over by the HTTP server together
//! with its connection, and our answer to it.
//!
//! actix-http gives every request that asks for `Upgrade: websocket` to the server's upgrade
//! service, with the connection itself (`server` wires it). From then on the connection is
//! ours: its read and write buffers are dropped, and the socket reads and writes the TCP
//! stream directly ([`TcpBody`](super::reader::TcpBody), [`Writer`](super::Writer)). Serving
//! it through actix-web's response stream (actix-ws) kept actix-http's dispatcher and its two
//! fixed 8 KiB buffers alive for as long as the socket was open.

use actix_codec::Framed;
use actix_http::{
    ConnectionType, Request, RequestHead,
    body::{BodySize, MessageBody as _},
    h1::{self, Message},
    ws,
};
use actix_web::{HttpResponse, rt::net::TcpStream};
use futures_util::SinkExt as _;

use super::{Limits, Socket};

/// A WebSocket upgrade request and the connection it came on.
pub struct Upgrade {
    req: Request,
    framed: Framed<TcpStream, h1::Codec>,
}

impl Upgrade {
    /// What the HTTP server handed over.
    pub fn new(req: Request, framed: Framed<TcpStream, h1::Codec>) -> Upgrade {
        Upgrade { req, framed }
    }

    /// The request's method, path, headers and peer address.
    pub fn head(&self) -> &RequestHead {
        self.req.head()
    }

    /// The request's path.
    pub fn path(&self) -> &str {
        self.req.path()
    }

    /// The request's query string (empty if none).
    pub fn query(&self) -> &str {
        self.req.uri().query().unwrap_or_default()
    }

    /// Whether the request is a WebSocket handshake we can answer (RFC 6455 §4.2.1: `GET`,
    /// `Upgrade: websocket`, `Connection: upgrade`, version 13 and a key); why not otherwise.
    pub fn verify(&self) -> Result<(), String> {
        ws::verify_handshake(self.head()).map_err(|e| e.to_string())
    }

    /// Answers with `response` (a refusal) and closes the connection.
    pub async fn refuse(mut self, response: HttpResponse) {
        let (mut head, body) = actix_http::Response::from(response).into_parts();
        head.head_mut().set_connection_type(ConnectionType::Close);
        let body = body.try_into_bytes().unwrap_or_default();
        let size = BodySize::Sized(body.len() as u64);
        // The peer may be gone already; there is nothing left to do then.
        let _ = self.framed.feed(Message::Item((head, size))).await;
        let _ = self.framed.feed(Message::Chunk(Some(body))).await;
        let _ = self.framed.send(Message::Chunk(None)).await;
        forget(&mut self.req);
    }

    /// Completes the handshake (`101 Switching Protocols`) and takes the connection over;
    /// `None` if the peer is gone. The request must have passed [`Upgrade::verify`].
    pub async fn accept(mut self, limits: Limits) -> Option<Socket> {
        let response = ws::handshake_response(self.req.head())
            .message_body(())
            .ok()?;
        self.framed
            .send(Message::Item((response, BodySize::None)))
            .await
            .ok()?;
        forget(&mut self.req);
        let parts = self.framed.into_parts();
        // What the client sent behind its request (frames, if it did not wait for our answer)
        // is the socket's first read; the HTTP buffers go.
        let received = parts.read_buf.freeze();
        Some(Socket::new(parts.io, received, limits))
    }
}

/// Empties the request before actix-http takes its head back into a pool, where the head's
/// headers and target would keep the connection's read buffer alive (and in it whatever the
/// client sent behind the request) until the head is reused.
fn forget(req: &mut Request) {
    let head = req.head_mut();
    head.headers_mut().clear();
    head.uri = actix_http::Uri::default();
}
