//! The bounded queue of encoded frames from a mailbox to one connected session.
//!
//! One per connected device, so its idle cost counts: tokio's bounded `mpsc` channel allocates
//! a cache-padded shared state and a first block of 32 slots up front (1.5 KB per connection,
//! idle or not). This queue allocates only its small shared state up front; its
//! buffer exists while frames wait and is given back once the session has drained it.
//!
//! The interface is the subset of tokio's `mpsc` the mailbox and the session use: the mailbox
//! only ever `try_send`s (a full queue means a slow consumer), the session `recv`s. One
//! addition: the mailbox can [`cork`](Sender::cork) the queue while it pushes a page of the
//! backlog, so the session sees the page at once (and writes it as one `batch` message)
//! instead of racing the mailbox frame by frame.

use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use actix_web::web::Bytes;

struct State {
    queue: VecDeque<Bytes>,
    /// Frames at the back of `queue` the receiver cannot see yet: queued while corked.
    held: usize,
    /// Live [`Cork`]s; the held frames show when the last one goes.
    corks: u32,
    /// The receiver's waker, while it waits for a frame.
    waker: Option<Waker>,
    sender_alive: bool,
    receiver_alive: bool,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A bounded queue holding at most `capacity` frames.
pub fn channel(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            held: 0,
            corks: 0,
            waker: None,
            sender_alive: true,
            receiver_alive: true,
        }),
        capacity,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    /// The queue holds `capacity` frames.
    #[error("queue full")]
    Full,
    /// The receiver is gone.
    #[error("receiver gone")]
    Closed,
}

/// Why no frame was received.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing queued.
    #[error("queue empty")]
    Empty,
    /// Nothing queued and the sender is gone.
    #[error("sender gone")]
    Disconnected,
}

/// The mailbox's end.
pub struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Queues a frame unless the queue is full or the receiver is gone.
    pub fn try_send(&self, frame: Bytes) -> Result<(), TrySendError> {
        let waker = {
            let mut state = self.shared.lock();
            if !state.receiver_alive {
                return Err(TrySendError::Closed);
            }
            if state.queue.len() >= self.shared.capacity {
                return Err(TrySendError::Full);
            }
            state.queue.push_back(frame);
            if state.corks > 0 {
                state.held += 1;
                return Ok(());
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Holds back what is sent from now until the returned guard drops; then the receiver
    /// sees it all at once. Corks nest.
    pub fn cork(&self) -> Cork {
        self.shared.lock().corks += 1;
        Cork {
            shared: self.shared.clone(),
        }
    }

    /// Free slots.
    pub fn capacity(&self) -> usize {
        self.shared
            .capacity
            .saturating_sub(self.shared.lock().queue.len())
    }
}

/// Frames sent while this lives are held back; see [`Sender::cork`].
pub struct Cork {
    shared: Arc<Shared>,
}

impl Drop for Cork {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.corks = state.corks.saturating_sub(1);
            if state.corks > 0 || state.held == 0 {
                return;
            }
            state.held = 0;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.sender_alive = false;
            // Nothing more is coming: what was held shows now.
            state.held = 0;
            state.corks = 0;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The session's end.
pub struct Receiver {
    shared: Arc<Shared>,
}

impl Receiver {
    fn pop(state: &mut State) -> Option<Bytes> {
        if state.queue.len() == state.held {
            return None;
        }
        let frame = state.queue.pop_front()?;
        if state.queue.is_empty() {
            // Drained: give the buffer back, so an idle connection holds none.
            state.queue = VecDeque::new();
        }
        Some(frame)
    }

    /// The next frame; `None` once the queue is empty and the sender is gone.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut state = self.shared.lock();
        if let Some(frame) = Self::pop(&mut state) {
            return Poll::Ready(Some(frame));
        }
        if !state.sender_alive {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Waits for the next frame; `None` once the queue is empty and the sender is gone.
    pub async fn recv(&mut self) -> Option<Bytes> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Result<Bytes, TryRecvError> {
        let mut state = self.shared.lock();
        match Self::pop(&mut state) {
            Some(frame) => Ok(frame),
            None if state.sender_alive => Err(TryRecvError::Empty),
            None => Err(TryRecvError::Disconnected),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let queued = {
            let mut state = self.shared.lock();
            state.receiver_alive = false;
            state.waker = None;
            state.held = 0;
            std::mem::take(&mut state.queue)
        };
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use std::task::Wake;

    use super::*;

    struct Flag(std::sync::atomic::AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn bounded_fifo_that_wakes_and_closes() {
        let (tx, mut rx) = channel(2);
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(tx.capacity(), 2);
        tx.try_send(Bytes::from_static(b"a")).expect("room");
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst), "woken");
        tx.try_send(Bytes::from_static(b"b")).expect("room");
        assert_eq!(tx.capacity(), 0);
        assert_eq!(
            tx.try_send(Bytes::from_static(b"c")),
            Err(TrySendError::Full)
        );
        assert_eq!(
            rx.poll_recv(&mut cx),
            Poll::Ready(Some(Bytes::from_static(b"a")))
        );
        assert_eq!(rx.try_recv(), Ok(Bytes::from_static(b"b")));
        assert_eq!(rx.shared.lock().queue.capacity(), 0, "buffer given back");
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        tx.try_send(Bytes::from_static(b"d")).expect("room");
        drop(tx);
        assert_eq!(rx.try_recv(), Ok(Bytes::from_static(b"d")));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));

        let (tx, rx) = channel(2);
        drop(rx);
        assert_eq!(
            tx.try_send(Bytes::from_static(b"e")),
            Err(TrySendError::Closed)
        );
    }

    #[test]
    fn a_cork_shows_what_was_sent_under_it_at_once() {
        let (tx, mut rx) = channel(8);
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        tx.try_send(Bytes::from_static(b"a")).expect("room");
        let outer = tx.cork();
        let inner = tx.cork();
        tx.try_send(Bytes::from_static(b"b")).expect("room");
        tx.try_send(Bytes::from_static(b"c")).expect("room");
        assert_eq!(tx.capacity(), 5, "held frames take room");
        assert_eq!(rx.try_recv(), Ok(Bytes::from_static(b"a")), "sent before");
        assert!(rx.poll_recv(&mut cx).is_pending(), "held back");
        drop(inner);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty), "corks nest");
        assert!(!flag.0.load(std::sync::atomic::Ordering::SeqCst));
        drop(outer);
        assert!(
            flag.0.load(std::sync::atomic::Ordering::SeqCst),
            "woken once"
        );
        assert_eq!(rx.try_recv(), Ok(Bytes::from_static(b"b")));
        assert_eq!(rx.try_recv(), Ok(Bytes::from_static(b"c")));

        // A sender that goes while corked leaves nothing hidden.
        let _cork = tx.cork();
        tx.try_send(Bytes::from_static(b"d")).expect("room");
        drop(tx);
        assert_eq!(rx.try_recv(), Ok(Bytes::from_static(b"d")));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }
}
