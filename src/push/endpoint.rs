//! What a device registers and what the broker signs with: a subscription is checked at the
//! door (an https endpoint on a public host, a P-256 key that is a point of the curve, a
//! 16-byte secret), and the VAPID key (RFC 8292) is derived from the server secret, so every
//! pod of a deployment signs with the same key and a restart keeps subscriptions valid.

use std::net::IpAddr;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use web_push_native::jwt_simple::algorithms::{ECDSAP256PublicKeyLike, ES256KeyPair};

use crate::store::{PushKind, PushRecord, records::RECORD_VERSION};

/// Longest endpoint URL accepted (push services' URLs are a few hundred bytes).
pub const MAX_ENDPOINT_LEN: usize = 1024;

/// The broker's VAPID signing key. No `Debug`: it is a secret.
pub struct VapidKey {
    pair: ES256KeyPair,
}

impl VapidKey {
    /// The key whose secret scalar is `secret` (32 bytes derived from the server secret).
    /// `None` in the negligible case that the bytes are not a valid scalar.
    pub fn from_secret(secret: &[u8; 32]) -> Option<VapidKey> {
        ES256KeyPair::from_bytes(secret)
            .ok()
            .map(|pair| VapidKey { pair })
    }

    /// The public key as browsers' `applicationServerKey` takes it: the uncompressed point,
    /// base64url without padding.
    pub fn public_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.pair.public_key().public_key().to_bytes_uncompressed())
    }

    pub(crate) fn pair(&self) -> &ES256KeyPair {
        &self.pair
    }
}

/// Why a subscription is refused (said to the device that registers it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscriptionError {
    /// The endpoint is not an absolute https URL of reasonable length.
    #[error("endpoint must be an https URL of at most {MAX_ENDPOINT_LEN} bytes")]
    Endpoint,
    /// The endpoint names this host, a private network or a link-local address.
    #[error("endpoint must be on a public host")]
    PrivateHost,
    /// `keys.p256dh` is not a base64url P-256 public key.
    #[error("keys.p256dh must be a base64url P-256 public key (65 bytes, uncompressed)")]
    P256dh,
    /// `keys.auth` is not 16 base64url bytes.
    #[error("keys.auth must be 16 bytes, base64url")]
    Auth,
}

/// Checks a subscription as a device sends it and makes the record to store.
/// `allow_private`: loopback and private hosts, and plain http, are accepted (tests, a
/// distributor on the same network).
pub fn check(
    endpoint: &str,
    p256dh: &str,
    auth: &str,
    kind: PushKind,
    allow_private: bool,
) -> Result<PushRecord, SubscriptionError> {
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(SubscriptionError::Endpoint);
    }
    let url = reqwest::Url::parse(endpoint).map_err(|_| SubscriptionError::Endpoint)?;
    let scheme_ok = url.scheme() == "https" || (allow_private && url.scheme() == "http");
    if !scheme_ok || url.username() != "" || url.password().is_some() {
        return Err(SubscriptionError::Endpoint);
    }
    let public = match url.host() {
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            // Names only private networks use; any other name is checked again when it is
            // resolved (`deliver::PublicOnly`).
            const PRIVATE: [&str; 6] = [
                ".localhost",
                ".local",
                ".internal",
                ".lan",
                ".home.arpa",
                ".svc",
            ];
            d.contains('.') && !PRIVATE.iter().any(|p| d.ends_with(p))
        }
        Some(url::Host::Ipv4(ip)) => is_public(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_public(IpAddr::V6(ip)),
        None => return Err(SubscriptionError::Endpoint),
    };
    if !public && !allow_private {
        return Err(SubscriptionError::PrivateHost);
    }
    let p256dh = URL_SAFE_NO_PAD
        .decode(p256dh.trim_end_matches('='))
        .ok()
        .filter(|k| k.len() == 65 && web_push_native::p256::PublicKey::from_sec1_bytes(k).is_ok())
        .ok_or(SubscriptionError::P256dh)?;
    let auth = URL_SAFE_NO_PAD
        .decode(auth.trim_end_matches('='))
        .ok()
        .filter(|a| a.len() == 16)
        .ok_or(SubscriptionError::Auth)?;
    Ok(PushRecord {
        version: RECORD_VERSION,
        endpoint: url.to_string(),
        p256dh,
        auth,
        kind,
    })
}

/// Whether an address is one the public internet routes to (not this host, a private or
/// shared network, link-local, multicast, reserved or documentation ranges). IPv6 forms that
/// carry an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by that address.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || a >= 224 // multicast 224/4, reserved 240/4
                || (a == 100 && (64..128).contains(&b)) // shared 100.64/10
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0/24
                || (a == 198 && (b == 18 || b == 19))) // benchmarking 198.18/15
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                is_public(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            match seg {
                // IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks).
                [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => embedded(hi, lo),
                // NAT64 64:ff9b::/96 reaches the IPv4 address it embeds.
                [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => embedded(hi, lo),
                // 6to4 2002:a.b.c.d::/48.
                [0x2002, hi, lo, ..] => embedded(hi, lo),
                _ => {
                    let first = seg[0];
                    !(v6.is_loopback()
                        || v6.is_unspecified()
                        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
                        || (first & 0xffc0) == 0xfec0 // site-local fec0::/10
                        || (first & 0xff00) == 0xff00 // multicast ff00::/8
                        || (first == 0x2001 && seg[1] == 0x0db8) // documentation
                        || (first == 0x64 && seg[1] == 0xff9b)) // local-use NAT64 64:ff9b:1::/48
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM";
    const AUTH: &str = "tBHItJI5svbpez7KI4CCXg";

    fn check_at(endpoint: &str) -> Result<PushRecord, SubscriptionError> {
        check(endpoint, KEY, AUTH, PushKind::WebPush, false)
    }

    #[test]
    fn a_browser_subscription_is_accepted() {
        let r = check_at("https://fcm.googleapis.com/fcm/send/abc:def").expect("accepted");
        assert_eq!(r.p256dh.len(), 65);
        assert_eq!(r.auth.len(), 16);
    }

    #[test]
    fn private_hosts_and_plain_http_are_refused_unless_allowed() {
        for endpoint in [
            "https://127.0.0.1/push",
            "https://10.1.2.3/push",
            "https://192.168.0.1/push",
            "https://169.254.169.254/latest",
            "https://[::1]/push",
            "https://[fd00::1]/push",
            "https://[::ffff:127.0.0.1]/push",
            "https://[::7f00:1]/push",
            "https://[64:ff9b::a00:1]/push",
            "https://[2002:a00:1::1]/push",
            "https://[ff02::1]/push",
            "https://224.0.0.1/push",
            "https://2130706433/push",
            "https://0x7f.1/push",
            "https://0.0.0.0/push",
            "https://localhost/push",
            "https://printer.local/push",
            "https://metadata.google.internal/computeMetadata",
            "https://kubernetes.default.svc/api",
        ] {
            assert_eq!(
                check_at(endpoint).err(),
                Some(SubscriptionError::PrivateHost),
                "{endpoint}"
            );
        }
        assert_eq!(
            check_at("http://push.example.com/x").err(),
            Some(SubscriptionError::Endpoint)
        );
        assert_eq!(
            check_at("https://user:pw@push.example.com/x").err(),
            Some(SubscriptionError::Endpoint)
        );
        assert!(
            check(
                "http://127.0.0.1:9/x",
                KEY,
                AUTH,
                PushKind::UnifiedPush,
                true
            )
            .is_ok()
        );
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "8.8.8.8",
            "2606:4700::1111",
            "[64:ff9b::808:808]",
            "[2002:808:808::1]",
        ] {
            let ip: IpAddr = ip.trim_matches(['[', ']']).parse().expect("ip");
            assert!(is_public(ip), "{ip}");
        }
    }

    #[test]
    fn keys_are_checked() {
        let at = "https://push.example.com/x";
        assert_eq!(
            check(at, "AAAA", AUTH, PushKind::WebPush, false).err(),
            Some(SubscriptionError::P256dh)
        );
        let not_a_point = URL_SAFE_NO_PAD.encode([4u8; 65]);
        assert_eq!(
            check(at, &not_a_point, AUTH, PushKind::WebPush, false).err(),
            Some(SubscriptionError::P256dh)
        );
        assert_eq!(
            check(at, KEY, "c2hvcnQ", PushKind::WebPush, false).err(),
            Some(SubscriptionError::Auth)
        );
    }
}
