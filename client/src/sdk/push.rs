//! Push wake-ups for a device that is not always connected: register where its push service
//! (a UnifiedPush distributor, or a browser's) takes them. The broker then posts a
//! content-free wake-up (RFC 8030, encrypted to `p256dh`/`auth` per RFC 8291) when an envelope
//! arrives while this device is offline; the device connects and fetches as usual.

use serde_json::json;

use super::{Client, ClientError};

/// Who serves a push subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushService {
    /// A browser's push service.
    WebPush,
    /// A UnifiedPush distributor (ntfy, NextPush, …).
    UnifiedPush,
}

impl Client {
    /// The key push subscriptions must be made for (base64url), or `None` when the broker
    /// sends no wake-ups.
    pub async fn push_key(&self) -> Result<Option<String>, ClientError> {
        Ok(self.api.push_key().await?)
    }

    /// Registers this device's push endpoint with its encryption keys (`p256dh`: the P-256
    /// public key, uncompressed, base64url; `auth`: 16 bytes, base64url), replacing any.
    pub async fn register_push(
        &self,
        endpoint: &str,
        p256dh: &str,
        auth: &str,
        service: PushService,
    ) -> Result<(), ClientError> {
        let kind = match service {
            PushService::WebPush => "webpush",
            PushService::UnifiedPush => "unifiedpush",
        };
        let body = json!({
            "endpoint": endpoint,
            "keys": { "p256dh": p256dh, "auth": auth },
            "kind": kind,
        });
        Ok(self.api.set_push(&self.creds(), Some(&body)).await?)
    }

    /// Stops wake-ups for this device.
    pub async fn unregister_push(&self) -> Result<(), ClientError> {
        Ok(self.api.set_push(&self.creds(), None).await?)
    }
}
