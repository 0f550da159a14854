//! Rate limits: per source IP (HTTP requests and new connections) and per device (frames).

use std::{net::IpAddr, num::NonZeroU32};

use governor::{DefaultKeyedRateLimiter, Quota};

/// The broker's rate limiters. A rate of 0 disables a limiter.
pub struct Limits {
    ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    device: Option<DefaultKeyedRateLimiter<(String, u32)>>,
    /// Sealed sends without a delivery token (to users who accept them from anyone) and
    /// anonymous key claims, per source IP.
    stranger: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Key claims per target device, so nobody drains a device's one-time keys.
    claim: Option<DefaultKeyedRateLimiter<(String, u32)>>,
}

fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst.max(rate.get())).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

impl Limits {
    /// Limiters for the given rates (per second) and bursts.
    pub fn new(
        ip_rate: u32,
        ip_burst: u32,
        device_rate: u32,
        device_burst: u32,
        stranger_rate: u32,
        claim_rate: u32,
    ) -> Self {
        Limits {
            ip: quota(ip_rate, ip_burst).map(DefaultKeyedRateLimiter::keyed),
            device: quota(device_rate, device_burst).map(DefaultKeyedRateLimiter::keyed),
            stranger: quota(stranger_rate, stranger_rate.saturating_mul(4))
                .map(DefaultKeyedRateLimiter::keyed),
            claim: quota(claim_rate, claim_rate.saturating_mul(4))
                .map(DefaultKeyedRateLimiter::keyed),
        }
    }

    /// Whether one more tokenless sealed send or anonymous claim from `ip` is allowed now.
    pub fn allow_stranger(&self, ip: IpAddr) -> bool {
        self.stranger
            .as_ref()
            .is_none_or(|l| l.check_key(&ip).is_ok())
    }

    /// Whether one more key claim for this device is allowed now.
    pub fn allow_claim(&self, user: &str, device: u32) -> bool {
        self.claim
            .as_ref()
            .is_none_or(|l| l.check_key(&(user.to_owned(), device)).is_ok())
    }

    /// Whether one more request from `ip` is allowed now.
    pub fn allow_ip(&self, ip: IpAddr) -> bool {
        self.ip.as_ref().is_none_or(|l| l.check_key(&ip).is_ok())
    }

    /// Whether one more frame from this device is allowed now.
    pub fn allow_device(&self, user: &str, device: u32) -> bool {
        self.device
            .as_ref()
            .is_none_or(|l| l.check_key(&(user.to_owned(), device)).is_ok())
    }

    /// Forgets keys that have been quiet long enough to be back at full burst.
    pub fn housekeep(&self) {
        if let Some(l) = &self.ip {
            l.retain_recent();
        }
        for l in [&self.device, &self.claim].into_iter().flatten() {
            l.retain_recent();
        }
        if let Some(l) = &self.stranger {
            l.retain_recent();
        }
    }
}
