//! Rate limits: per source IP (HTTP requests and new connections) and per device (frames).
//!
//! An IPv6 client is limited per /64, the block one subscriber line or host is handed: with
//! one limit per address, anyone could rotate through 2^64 addresses of their own, each with a
//! fresh burst.

use std::{
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
};

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

/// The key an address is limited under: an IPv4 address itself (also when written as an
/// IPv4-mapped IPv6 address), the /64 of an IPv6 address.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
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
            .is_none_or(|l| l.check_key(&source(ip)).is_ok())
    }

    /// Whether one more key claim for this device is allowed now.
    pub fn allow_claim(&self, user: &str, device: u32) -> bool {
        self.claim
            .as_ref()
            .is_none_or(|l| l.check_key(&(user.to_owned(), device)).is_ok())
    }

    /// Whether one more request from `ip` is allowed now.
    pub fn allow_ip(&self, ip: IpAddr) -> bool {
        self.ip
            .as_ref()
            .is_none_or(|l| l.check_key(&source(ip)).is_ok())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_a_limit_per_64() {
        let limits = Limits::new(1, 1, 0, 0, 1, 0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let next_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limits.allow_ip(a));
        assert!(!limits.allow_ip(same_64), "another address of the same /64");
        assert!(limits.allow_ip(next_64));
        // Strangers get a burst of four times their rate.
        for _ in 0..4 {
            assert!(limits.allow_stranger(a));
        }
        assert!(!limits.allow_stranger(same_64));
    }

    #[test]
    fn ipv4_clients_are_limited_per_address_also_when_mapped() {
        let limits = Limits::new(1, 1, 0, 0, 0, 0);
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(limits.allow_ip(v4));
        assert!(!limits.allow_ip(mapped));
        assert!(limits.allow_ip("192.0.2.8".parse().unwrap()));
    }
}
