//! [`Mailboxes`]: what the rest of the broker asks of mailboxes, as async methods. Callers
//! never see an actor, an address or a message type: the actix plumbing (finding or spawning
//! a user's mailbox, retrying against its successor when it stopped under a call) stays here.

use std::sync::Arc;

use sealpost_proto::{Class, CloseCode, Copy, DeviceId, EnvelopeId, ErrorCode, SendOutcome};

use super::{
    Conn, ConnId, Registry, RegistryError,
    messages::{
        Ack, AddDevice, Attach, AttachError, ClaimKey, ClaimedKey, Detach, Expire, RemoveDevice,
        Submit, UploadError, UploadKeys,
    },
};
use crate::store::{DeviceRecord, Due, KeyKind, StoreError};

/// An envelope for every device of one local user, as its mailbox stores it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Client envelope id (appends are idempotent by it).
    pub id: EnvelopeId,
    /// Delivery class.
    pub class: Class,
    /// Time-to-live, already validated against the class limits.
    pub ttl_secs: u32,
    /// One ciphertext per recipient device.
    pub copies: Arc<Vec<Copy>>,
    /// The peer domain a federated envelope came from (`None` for a local send).
    pub origin: Option<Arc<str>>,
}

/// Why a call could not reach a mailbox, or what it refused.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError<E> {
    /// The mailbox kept stopping under the call (its state could not be loaded).
    #[error("mailbox unavailable")]
    Unavailable,
    /// The mailbox refused.
    #[error(transparent)]
    Refused(E),
}

impl<E> From<RegistryError> for MailboxError<E> {
    fn from(RegistryError::Unavailable: RegistryError) -> Self {
        MailboxError::Unavailable
    }
}

/// The typed handle on every mailbox.
#[derive(Clone)]
pub struct Mailboxes(Arc<Registry>);

impl Mailboxes {
    /// A handle on the mailboxes of `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Mailboxes(registry)
    }

    /// Hands `delivery` to `user`'s mailbox now (so that a connection's sends reach it in
    /// order) and returns the future of its answer, resolved once durable.
    pub fn submit(
        &self,
        user: &str,
        delivery: Delivery,
    ) -> impl Future<Output = SendOutcome> + 'static {
        let registry = self.0.clone();
        let user = user.to_owned();
        let msg = Submit {
            id: delivery.id,
            class: delivery.class,
            ttl_secs: delivery.ttl_secs,
            copies: delivery.copies,
            origin: delivery.origin,
        };
        let first = registry.get_or_spawn(&user).send(msg.clone());
        async move {
            // Only a retry (the mailbox stopped meanwhile) goes through the registry again.
            let outcome = match first.await {
                Ok(outcome) => Ok(outcome),
                Err(_) => registry.call(&user, msg).await,
            };
            outcome.unwrap_or_else(|_| {
                crate::telemetry::reject(ErrorCode::Internal.as_str());
                SendOutcome::Rejected {
                    code: ErrorCode::Internal,
                    current_devices: Vec::new(),
                }
            })
        }
    }

    /// Attaches a connected device: its backlog starts flowing to `conn`.
    pub async fn attach(
        &self,
        user: &str,
        device: DeviceId,
        conn: Conn,
    ) -> Result<(), MailboxError<AttachError>> {
        self.0
            .call_once(user, Attach { device, conn })
            .await?
            .map_err(MailboxError::Refused)
    }

    /// A connection ended (ignored if the device has reconnected since).
    pub fn detach(&self, user: &str, device: DeviceId, conn: ConnId) {
        if let Some(addr) = self.0.get(user) {
            addr.do_send(Detach { device, conn });
        }
    }

    /// Acknowledges deliveries; answers the seqs that were not outstanding on `conn`.
    pub async fn ack(
        &self,
        user: &str,
        device: DeviceId,
        conn: ConnId,
        seqs: Vec<u64>,
    ) -> Result<Vec<u64>, MailboxError<()>> {
        let ack = Ack {
            device,
            conn,
            seqs,
            report: false,
        };
        Ok(self.0.call_once(user, ack).await?)
    }

    /// Hands a device's acknowledgements to its mailbox without waiting for it to take them:
    /// the session goes on reading while the mailbox trims. Sequence numbers that were not
    /// outstanding are reported on the connection (see [`Ack::report`]). Waits only while the
    /// mailbox's queue is full, so a device cannot pile acks up in it.
    pub async fn ack_pipelined(
        &self,
        user: &str,
        device: DeviceId,
        conn: ConnId,
        seqs: Vec<u64>,
    ) -> Result<(), MailboxError<()>> {
        let ack = Ack {
            device,
            conn,
            seqs,
            report: true,
        };
        let addr = self.0.get_or_spawn(user);
        match addr.try_send(ack) {
            Ok(()) => Ok(()),
            Err(actix::prelude::SendError::Full(ack)) => addr
                .send(ack)
                .await
                .map(drop)
                .map_err(|_| MailboxError::Unavailable),
            Err(actix::prelude::SendError::Closed(_)) => Err(MailboxError::Unavailable),
        }
    }

    /// Adds a device to `user`'s account (at most `max_devices`).
    pub async fn add_device(
        &self,
        user: &str,
        record: DeviceRecord,
        max_devices: usize,
    ) -> Result<DeviceId, MailboxError<StoreError>> {
        let msg = AddDevice {
            record,
            max_devices,
        };
        self.0
            .call_once(user, msg)
            .await?
            .map_err(MailboxError::Refused)
    }

    /// Removes a device: its queue is deleted and its connection closed.
    pub async fn remove_device(
        &self,
        user: &str,
        device: DeviceId,
    ) -> Result<(), MailboxError<StoreError>> {
        self.0
            .call_once(user, RemoveDevice { device })
            .await?
            .map_err(MailboxError::Refused)
    }

    /// Stores one-time keys (and a fallback key) of a device; answers how many it holds.
    pub async fn upload_keys(
        &self,
        user: &str,
        upload: UploadKeys,
    ) -> Result<u64, MailboxError<UploadError>> {
        self.0
            .call_once(user, upload)
            .await?
            .map_err(MailboxError::Refused)
    }

    /// Claims a key of a device: a one-time key (consumed) or the fallback key; `None` if the
    /// device has neither.
    pub async fn claim_key(
        &self,
        user: &str,
        device: DeviceId,
        kind: KeyKind,
    ) -> Result<Option<ClaimedKey>, MailboxError<StoreError>> {
        self.0
            .call(user, ClaimKey { device, kind })
            .await?
            .map_err(MailboxError::Refused)
    }

    /// Deletes `user`'s entries whose time-to-live has passed.
    pub async fn expire(&self, user: &str, due: Vec<Due>) -> Result<(), MailboxError<()>> {
        Ok(self.0.call_once(user, Expire { due }).await?)
    }

    /// Whether `user` has a live mailbox (which means the account exists).
    pub fn is_live(&self, user: &str) -> bool {
        self.0.get(user).is_some()
    }

    /// Live mailboxes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no mailbox is live.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Stops every mailbox and waits (at most `within`) until none is live: each holds its
    /// user's open queues, which a store reopen needs closed. Their devices are sent away
    /// (`going_away`) and reconnect. True if none was left.
    pub async fn retire_all(&self, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.0.retire_all();
            if self.0.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Closes every device connection with `reason` (shutdown).
    pub fn kick_all(&self, reason: CloseCode) {
        self.0.kick_all(reason);
    }
}
