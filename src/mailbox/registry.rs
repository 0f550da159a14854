//! Finds or spawns the mailbox of a user.
//!
//! Mailboxes run on a small pool of arbiters (threads), chosen by a hash of the handle. A
//! mailbox stops itself when idle and leaves the registry in the same step, so a later call
//! spawns a fresh one; a message that raced with the stop fails with `Closed` and is retried
//! against the successor ([`Registry::call`]). At most one live mailbox exists per user.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use actix::{Actor, Addr, ArbiterHandle, Handler, Message, dev::ToEnvelope};

use super::{
    Mailbox, MailboxConfig, NoWakeups, Wakeups,
    messages::{KickAll, Retire},
};
use crate::store::{Stores, live::LiveDelivery};

/// Why a mailbox call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The mailbox kept stopping under the call (its state could not be loaded).
    #[error("mailbox unavailable")]
    Unavailable,
}

/// The directory of live mailboxes.
pub struct Registry {
    live: Mutex<HashMap<String, (u64, Addr<Mailbox>)>>,
    arbiters: Vec<ArbiterHandle>,
    hasher: RandomState,
    next_incarnation: AtomicU64,
    stores: Stores,
    config: Arc<MailboxConfig>,
    wakeups: Arc<dyn Wakeups>,
}

impl Registry {
    /// A registry spawning mailboxes on `arbiters` (at least one), with `stores` (whose
    /// live-delivery seam reaches sockets held in other processes).
    pub fn new(arbiters: Vec<ArbiterHandle>, stores: Stores, config: MailboxConfig) -> Arc<Self> {
        Registry::with_wakeups(arbiters, stores, config, Arc::new(NoWakeups))
    }

    /// [`Registry::new`] whose mailboxes wake devices that are not connected through
    /// `wakeups` (push notifications).
    pub fn with_wakeups(
        arbiters: Vec<ArbiterHandle>,
        stores: Stores,
        config: MailboxConfig,
        wakeups: Arc<dyn Wakeups>,
    ) -> Arc<Self> {
        assert!(
            !arbiters.is_empty(),
            "the registry needs at least one arbiter"
        );
        Arc::new(Registry {
            live: Mutex::new(HashMap::new()),
            arbiters,
            hasher: RandomState::new(),
            next_incarnation: AtomicU64::new(1),
            stores,
            config: Arc::new(config),
            wakeups,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Addr<Mailbox>)>> {
        // The map holds only addresses; a panic elsewhere cannot leave it half-updated.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live mailbox of `user`, spawning one if needed. The caller has checked that the
    /// account exists (or is creating it).
    pub fn get_or_spawn(self: &Arc<Self>, user: &str) -> Addr<Mailbox> {
        let mut live = self.lock();
        if let Some((_, addr)) = live.get(user)
            && addr.connected()
        {
            return addr.clone();
        }
        let incarnation = self.next_incarnation.fetch_add(1, Ordering::Relaxed);
        let slot = self.hasher.hash_one(user) % self.arbiters.len() as u64;
        // In range: the remainder is below the arbiter count, a usize.
        let arbiter = &self.arbiters[usize::try_from(slot).unwrap_or(0)];
        let (name, stores, registry, config) = (
            user.to_owned(),
            self.stores.clone(),
            self.clone(),
            self.config.clone(),
        );
        let addr = Mailbox::start_in_arbiter(arbiter, move |_| {
            Mailbox::new(name, incarnation, stores, registry, config)
        });
        live.insert(user.to_owned(), (incarnation, addr.clone()));
        addr
    }

    /// The live mailbox of `user`, if there is one.
    pub fn get(&self, user: &str) -> Option<Addr<Mailbox>> {
        self.lock().get(user).map(|(_, a)| a.clone())
    }

    /// Removes `user`'s entry if it is still the given incarnation (called by a stopping
    /// mailbox).
    pub(crate) fn forget(&self, user: &str, incarnation: u64) {
        let mut live = self.lock();
        if live.get(user).is_some_and(|(i, _)| *i == incarnation) {
            live.remove(user);
        }
    }

    /// Sends `msg` to `user`'s mailbox, retrying against a successor if the mailbox stopped
    /// before handling it.
    pub async fn call<M>(self: &Arc<Self>, user: &str, msg: M) -> Result<M::Result, RegistryError>
    where
        M: Message + Clone + Send + 'static,
        M::Result: Send,
        Mailbox: Handler<M>,
        <Mailbox as Actor>::Context: ToEnvelope<Mailbox, M>,
    {
        for _ in 0..3 {
            let addr = self.get_or_spawn(user);
            match addr.send(msg.clone()).await {
                Ok(r) => return Ok(r),
                Err(_) => continue,
            }
        }
        Err(RegistryError::Unavailable)
    }

    /// Sends a message that cannot be retried (it carries a one-shot channel): fails if the
    /// mailbox stops under it.
    pub async fn call_once<M>(
        self: &Arc<Self>,
        user: &str,
        msg: M,
    ) -> Result<M::Result, RegistryError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        Mailbox: Handler<M>,
        <Mailbox as Actor>::Context: ToEnvelope<Mailbox, M>,
    {
        self.get_or_spawn(user)
            .send(msg)
            .await
            .map_err(|_| RegistryError::Unavailable)
    }

    /// The stores mailboxes use.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// How mailboxes wake devices that are not connected.
    pub fn wakeups(&self) -> &dyn Wakeups {
        self.wakeups.as_ref()
    }

    /// The live-delivery seam mailboxes notify.
    pub fn live_delivery(&self) -> &Arc<dyn LiveDelivery> {
        &self.stores.live
    }

    /// Number of live mailboxes.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no mailbox is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every live mailbox (see [`Retire`]).
    pub fn retire_all(&self) {
        for (_, addr) in self.lock().values() {
            addr.do_send(Retire);
        }
    }

    /// Closes every device connection with `reason` (shutdown).
    pub fn kick_all(&self, reason: sealpost_proto::CloseCode) {
        for (_, addr) in self.lock().values() {
            addr.do_send(KickAll { reason });
        }
    }
}
