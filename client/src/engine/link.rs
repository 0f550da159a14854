//! Linking a new device to an account.
//!
//! 1. An existing device asks the broker for a single-use code and adds a 16-byte secret the
//!    broker never sees ([`Engine::new_link_code`]); the user types `<broker code>.<secret>`
//!    into the new device.
//! 2. The new device adds itself to the account with the broker part
//!    ([`NewDevice::link`](super::NewDevice::link)), fetches and pins the account's signed
//!    list, and sends every listed device a [`Payload::LinkRequest`]
//!    ([`Engine::link_request_outgoing`]): its public keys and a BLAKE3 keyed hash (key derived
//!    from the secret) over its handle, device id and keys.
//! 3. The existing device decrypts it with the keys the *broker* lists for that device — it
//!    is not in the signed list yet, so a request is the only payload accepted that way
//!    ([`Engine::open_link_request`]) — checks the proof against its pending codes, adds the
//!    device to the signed list ([`Engine::approved_list`], version + 1), publishes it, and
//!    sends the account [`Engine::link_grant_outgoing`]: the new device gets a
//!    [`Payload::LinkGrant`] (master key, delivery token, contacts, and a proof of the
//!    secret over the grant), the others [`Payload::DeviceLinked`].
//! 4. The new device checks the grant's proof and that its master key is the one that signs
//!    the list it pinned, and is then a full device of the account ([`Event::Linked`]).
//!
//! An operator who knows the broker part of the code still cannot link a device of their
//! own, nor impersonate the existing device to the new one: both proofs need the secret.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::{
    Engine,
    events::Event,
    lists::BrokerDevice,
    receive::{Failure, Unread},
    record::{Approving, PendingLink, Secret},
    send::Outgoing,
};
use crate::{
    crypto::{
        GrantContact, MasterKey, Payload, PinResult, PublicDeviceKeys, SignedDeviceList,
        link::{LINK_SECRET_BYTES, link_proof, proof_matches},
    },
    error::{ClientError, EnvelopeError},
};

/// A link code to show on the existing device.
pub struct LinkCode {
    /// `<broker code>.<secret>`: type it into the new device.
    pub code: Zeroizing<String>,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// Splits a link code as typed into the new device into its broker part and its secret.
pub fn split_link_code(
    code: &str,
) -> Result<(&str, Zeroizing<[u8; LINK_SECRET_BYTES]>), ClientError> {
    let (broker_code, secret) = code
        .trim()
        .rsplit_once('.')
        .ok_or(ClientError::BadLinkCode)?;
    Ok((broker_code, link_secret(secret)?))
}

/// Decodes the secret part of a link code.
pub fn link_secret(secret: &str) -> Result<Zeroizing<[u8; LINK_SECRET_BYTES]>, ClientError> {
    URL_SAFE_NO_PAD
        .decode(secret)
        .ok()
        .and_then(|s| <[u8; LINK_SECRET_BYTES]>::try_from(s.as_slice()).ok())
        .map(Zeroizing::new)
        .ok_or(ClientError::BadLinkCode)
}

impl Engine {
    /// A link code to show for linking a new device: `broker_code` as the broker issued it
    /// (`POST …/link-codes`), valid until `expires_ms`, plus a secret the broker never sees.
    pub fn new_link_code(&mut self, broker_code: &str, expires_ms: u64, now_ms: u64) -> LinkCode {
        let mut secret = Zeroizing::new([0u8; LINK_SECRET_BYTES]);
        rand::rngs::OsRng.fill_bytes(secret.as_mut());
        self.record.pending_links.retain(|p| p.expires_ms > now_ms);
        self.record.pending_links.push(PendingLink {
            secret: Secret::new(secret.as_ref()),
            expires_ms,
        });
        LinkCode {
            code: Zeroizing::new(format!(
                "{broker_code}.{}",
                URL_SAFE_NO_PAD.encode(secret.as_ref())
            )),
            expires_ms,
        }
    }

    /// Whether a link code this device issued is still valid.
    pub fn has_pending_link(&self, now_ms: u64) -> bool {
        self.record
            .pending_links
            .iter()
            .any(|p| p.expires_ms > now_ms)
    }

    /// Whether this device is being linked (waiting for the grant).
    pub fn is_linking(&self) -> bool {
        self.record.linking.is_some()
    }

    /// On the new device: the link request to send to this account's listed devices.
    pub fn link_request_outgoing(&self) -> Result<Outgoing, ClientError> {
        let secret = self
            .record
            .linking
            .as_ref()
            .ok_or_else(|| ClientError::Invalid("this device is not being linked".into()))?;
        let keys = self.state.device.public_keys().to_bytes();
        Ok(Outgoing::payload(Payload::LinkRequest {
            keys: keys.to_vec(),
            proof: link_proof(
                &secret.0,
                b"request",
                self.state.user(),
                self.state.device_id(),
                &[&keys],
            ),
        }))
    }

    /// After [`Need::BrokerKeys`](super::Need::BrokerKeys): opens the envelope with the keys
    /// the broker lists for the sending device of our own account (`broker`). Only a link
    /// request whose proof matches a code this device issued is accepted; the device then
    /// waits for its grant. Returns the new device and its keys, for
    /// [`Engine::approved_list`]. Settle the envelope with what this returns.
    pub fn open_link_request(
        &mut self,
        ciphertext: &[u8],
        broker: &[BrokerDevice],
        now_ms: u64,
    ) -> Result<(u32, PublicDeviceKeys), Failure> {
        let unsealed = self.unseal(ciphertext).map_err(|unread| match unread {
            Unread::Failed(failure) => failure,
            Unread::Need(_) => Failure::Rejected(EnvelopeError::BadLinkProof),
        })?;
        let sender = unsealed.sender;
        let (user, device) = (sender.user.clone(), sender.device);
        let unknown = || {
            Failure::Rejected(EnvelopeError::UnknownSenderDevice {
                user: user.clone(),
                device,
            })
        };
        if user != self.state.user() || !self.has_pending_link(now_ms) {
            return Err(unknown());
        }
        let Some(keys) = broker
            .iter()
            .find(|d| d.device == device)
            .and_then(|d| PublicDeviceKeys::from_bytes(&d.identity_keys).ok())
        else {
            return Err(unknown());
        };
        let payload = self.decrypt_from(&sender, &keys, &unsealed.olm_message)?;
        let Payload::LinkRequest {
            keys: claimed,
            proof,
        } = payload
        else {
            self.state.sessions.forget(&user, device);
            return Err(unknown());
        };
        let key_bytes = keys.to_bytes();
        let matching = self.record.pending_links.iter().position(|p| {
            p.expires_ms > now_ms
                && claimed == key_bytes
                && proof_matches(
                    &proof,
                    &link_proof(&p.secret.0, b"request", &user, device, &[&key_bytes]),
                )
        });
        let Some(index) = matching else {
            self.state.sessions.forget(&user, device);
            return Err(Failure::Rejected(EnvelopeError::BadLinkProof));
        };
        let pending = self.record.pending_links.remove(index);
        self.record.approving = Some(Approving {
            device,
            secret: pending.secret,
        });
        Ok((device, keys))
    }

    /// This account's list with the approved `device` added, signed as the next version;
    /// `None` if it is listed already. Publish it, then
    /// [`Engine::confirm_own_list`](super::Engine::confirm_own_list).
    pub fn approved_list(
        &self,
        device: u32,
        keys: PublicDeviceKeys,
    ) -> Result<Option<SignedDeviceList>, ClientError> {
        self.own_list_changed(|devices| {
            if !devices.iter().any(|(d, _)| *d == device) {
                devices.push((device, keys));
            }
        })
    }

    /// The grant for the approved device (once this account's published list has it): to
    /// send to this account, the grant going to the new device and
    /// [`Payload::DeviceLinked`] to the others.
    pub fn link_grant_outgoing(&self) -> Result<Outgoing, ClientError> {
        let own = self.state.user();
        let Some(Approving { device, secret }) = &self.record.approving else {
            return Err(ClientError::Invalid(
                "no device is waiting for a grant".into(),
            ));
        };
        let keys = self.listed_keys(own, *device).ok_or_else(|| {
            ClientError::Invalid("the new device is not in the signed list".into())
        })?;
        let master_public = self.state.master_key.public_key();
        let contacts = self
            .record
            .contacts
            .iter()
            .filter(|(handle, _)| *handle != own)
            .filter_map(|(handle, c)| {
                Some(GrantContact {
                    handle: handle.clone(),
                    master_key: self.state.pins.pinned(handle)?,
                    delivery_token: c.delivery_token.as_ref().map(|t| t.0.clone()),
                    verified: c.verified,
                })
            })
            .collect();
        let grant = Payload::LinkGrant {
            master_key: self.state.master_key.to_bytes(),
            delivery_token: self.record.delivery_token.0.clone(),
            contacts,
            proof: link_proof(
                &secret.0,
                b"grant",
                own,
                *device,
                &[&keys.to_bytes(), &master_public],
            ),
        };
        Ok(Outgoing::payload(Payload::DeviceLinked { device: *device }).only_for(*device, grant))
    }

    /// The grant was sent: the approval is over.
    pub fn finish_approval(&mut self) {
        self.record.approving = None;
    }

    /// On the new device: checks the grant (proof of the code's secret, and the master key
    /// that signs the list we pinned) and becomes a full device of the account.
    pub(crate) fn accept_grant(
        &mut self,
        master_key: &[u8; 32],
        delivery_token: Zeroizing<Vec<u8>>,
        contacts: Vec<GrantContact>,
        proof: &[u8; 32],
    ) -> Result<Vec<Event>, Failure> {
        let own = self.state.user().to_owned();
        let Some(secret) = &self.record.linking else {
            return Err(Failure::Rejected(EnvelopeError::Unexpected {
                kind: "link grant (this device is not being linked)",
                user: own,
            }));
        };
        let master = MasterKey::from_bytes(master_key);
        let master_public = master.public_key();
        let keys = self.state.device.public_keys().to_bytes();
        let expected = link_proof(
            &secret.0,
            b"grant",
            &own,
            self.state.device_id(),
            &[&keys, &master_public],
        );
        if !proof_matches(proof, &expected) || self.state.pins.pinned(&own) != Some(master_public) {
            return Err(Failure::Rejected(EnvelopeError::BadLinkProof));
        }
        self.record.linking = None;
        self.state.master_key = master;
        self.record.delivery_token = Secret(delivery_token);
        for c in contacts {
            // The grant comes from our own account: it overrides anything pinned meanwhile.
            if let PinResult::Changed { .. } = self.state.pins.check(&c.handle, &c.master_key) {
                self.state.pins.accept_change(&c.handle, &c.master_key);
                self.record.lists.remove(&c.handle);
            }
            let contact = self.record.contacts.entry(c.handle).or_default();
            contact.delivery_token = c.delivery_token.map(Secret);
            contact.verified = c.verified;
        }
        // Our list is fetched again on next use: it now lists this device.
        self.record.lists.remove(&own);
        Ok(vec![Event::Linked])
    }
}
