//! Sends a connection has handed on and whose answers it still owes its client: a `send`'s
//! (from [`AppState::route`](super::AppState::route)) or a `group_send`'s (from
//! [`AppState::route_group`](super::AppState::route_group)), answered in the order they
//! resolve.

use futures_util::{Stream, StreamExt, stream::FuturesUnordered};
use sealpost_proto::ServerFrame;

use super::route::PendingSend;
use crate::socket::Writer;

/// A group send's answer, once every recipient has answered.
pub(crate) type PendingGroup = std::pin::Pin<Box<dyn Future<Output = ServerFrame>>>;

/// A send's answer on its way: a `send`'s (from [`AppState::route`]) or a `group_send`'s.
pub(crate) enum Answer {
    Send(PendingSend),
    Group(PendingGroup),
}

impl Future for Answer {
    type Output = ServerFrame;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<ServerFrame> {
        match self.get_mut() {
            Answer::Send(send) => send
                .as_mut()
                .poll(cx)
                .map(|(id, outcome)| ServerFrame::SendResult { id, outcome }),
            Answer::Group(group) => group.as_mut().poll(cx),
        }
    }
}

/// Sends awaiting their results. Allocated on the first send and released once all are answered:
/// most connections are idle most of the time, and an empty `FuturesUnordered` already holds
/// two allocations.
#[derive(Default)]
pub(crate) struct Pending(Option<FuturesUnordered<Answer>>);

impl Pending {
    pub(crate) fn push(&mut self, answer: Answer) {
        self.0
            .get_or_insert_with(FuturesUnordered::new)
            .push(answer);
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesUnordered::len)
    }

    /// The next answer; never resolves while no send is waiting.
    pub(crate) async fn answer(&mut self) -> ServerFrame {
        match self.next().await {
            Some(answer) => answer,
            None => std::future::pending().await,
        }
    }

    /// Answers every send still waiting.
    pub(crate) async fn drain(&mut self, session: &mut Writer) {
        while let Some(answer) = self.next().await {
            let _ = session.binary(answer.encode()).await;
        }
    }
}

impl Stream for Pending {
    type Item = ServerFrame;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let Some(pending) = &mut self.0 else {
            return std::task::Poll::Ready(None);
        };
        let next = pending.poll_next_unpin(cx);
        if pending.is_empty() {
            self.0 = None;
        }
        next
    }
}
