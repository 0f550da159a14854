//! Linking devices (see [`crate::engine::link`]): the new device's side ([`Client::link`])
//! and the existing device's ([`Client::create_link_code`], then approving the request when
//! it arrives while [`Client::next_event`] runs).

use std::{path::Path, time::Duration};

use super::{Client, ClientError, Event, KEY_FILE, LinkCode, STATE_FILE, lock_dir, now_ms};
use crate::{
    api::Api,
    crypto::{LocalKey, PublicDeviceKeys},
    engine::{NewDevice, check_handle, split_link_code},
};

impl Client {
    /// Links a new device to the existing account `handle`, with the code an existing device
    /// showed ([`Client::create_link_code`]), and waits (at most `wait`) until an existing
    /// device has accepted it. An existing device must be running [`Client::next_event`].
    pub async fn link(
        server: &str,
        handle: &str,
        code: &str,
        state_dir: &Path,
        wait: Duration,
    ) -> Result<Self, ClientError> {
        check_handle(handle)?;
        let (broker_code, secret) = split_link_code(code)?;
        let lock = lock_dir(state_dir)?;
        let key_path = state_dir.join(KEY_FILE);
        if state_dir.join(STATE_FILE).exists() {
            return Err(ClientError::AlreadyRegistered(state_dir.to_owned()));
        }
        let api = Api::new(server)?;
        let device = NewDevice::generate();
        let creds = api
            .add_device_with_code(handle, &device.identity_keys(), broker_code)
            .await?;
        // A key file left by an earlier attempt that never completed is reused.
        let key = if key_path.exists() {
            LocalKey::read_file(&key_path)?
        } else {
            LocalKey::create_file(&key_path)?
        };
        let engine = device.link(handle, creds.device, &creds.token, &secret, api.base());
        let mut client = Self::assemble(api, state_dir, key, lock, engine)?;
        client.upload_new_keys().await?;
        client.publish_key_packages().await?;
        // Trust on first use of our own master key, confirmed by the grant's proof.
        client.verified_list(handle, true).await?;
        let request = client.engine.link_request_outgoing()?;
        client.send_outgoing(handle, request).await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let event = tokio::time::timeout_at(deadline, client.next_event())
                .await
                .map_err(|_| ClientError::Timeout("an existing device to accept the link"))??;
            if matches!(event, Event::Linked) {
                break;
            }
        }
        // The grant named the account's contacts: their lists are fetched now, all of them
        // in random order (anonymous channel), as part of linking rather than later behind
        // some delivery of theirs.
        client.refresh_lists().await?;
        Ok(client)
    }

    /// Creates a link code for a new device (valid 10 minutes, single use). Show it to the
    /// user; then keep [`Client::next_event`] running until [`Event::DeviceLinked`].
    pub async fn create_link_code(&mut self) -> Result<LinkCode, ClientError> {
        let issued = self.api.new_link_code(&self.creds()).await?;
        let code = self
            .engine
            .new_link_code(&issued.code, issued.expires_ms, now_ms());
        self.save()?;
        Ok(code)
    }

    /// A link request was accepted by the engine: adds `device` to the signed list, publishes
    /// it and sends the grant.
    pub(super) async fn approve_link(
        &mut self,
        device: u32,
        keys: PublicDeviceKeys,
    ) -> Result<(), ClientError> {
        let own = self.engine.user().to_owned();
        self.verified_list(&own, true).await?;
        if let Some(signed) = self.engine.approved_list(device, keys)? {
            self.publish_own_list(&signed).await?;
        }
        let grant = self.engine.link_grant_outgoing()?;
        self.send_outgoing(&own, grant).await?;
        self.engine.finish_approval();
        Ok(())
    }
}
