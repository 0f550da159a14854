//! Rate limits: per source IP (HTTP requests and new connections) and per device (frames).
//!
//! An IPv6 client is limited per /64, the block one subscriber line or host is handed: with
//! one limit per address, anyone could rotate through 2^64 addresses of their own, each with a
//! fresh burst.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{Arc, Mutex},
};

use governor::{DefaultKeyedRateLimiter, Quota};

use super::settings::Rates;

/// The broker's rate limiters. A rate of 0 disables a limiter.
pub struct Limits {
    ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    device: Option<DefaultKeyedRateLimiter<(String, u32)>>,
    /// Sealed sends without a delivery token (to users who accept them from anyone) and
    /// anonymous key claims, per source IP.
    stranger: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Key claims per target device, so nobody drains a device's one-time keys.
    claim: Option<DefaultKeyedRateLimiter<(String, u32)>>,
    /// Commits per group at its hub, so that one member's commit storm cannot keep the
    /// others from ever taking an epoch.
    commit: Option<DefaultKeyedRateLimiter<Vec<u8>>>,
    /// Attachments started per account.
    blob: Option<DefaultKeyedRateLimiter<String>>,
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
    pub fn new(r: &Rates) -> Self {
        let burst4 = |rate: u32| quota(rate, rate.saturating_mul(4));
        Limits {
            ip: quota(r.ip_rate, r.ip_burst).map(DefaultKeyedRateLimiter::keyed),
            device: quota(r.device_rate, r.device_burst).map(DefaultKeyedRateLimiter::keyed),
            stranger: burst4(r.stranger_rate).map(DefaultKeyedRateLimiter::keyed),
            claim: burst4(r.claim_rate).map(DefaultKeyedRateLimiter::keyed),
            commit: burst4(r.commit_rate).map(DefaultKeyedRateLimiter::keyed),
            blob: NonZeroU32::new(r.blob_rate_per_min)
                .map(|rate| DefaultKeyedRateLimiter::keyed(Quota::per_minute(rate))),
        }
    }

    /// Whether `user` may start one more attachment now.
    pub fn allow_blob(&self, user: &str) -> bool {
        self.blob
            .as_ref()
            .is_none_or(|l| l.check_key(&user.to_owned()).is_ok())
    }

    /// Whether one more Commit for `group` may take an epoch at its hub now.
    pub fn allow_commit(&self, group: &[u8]) -> bool {
        self.commit
            .as_ref()
            .is_none_or(|l| l.check_key(&group.to_vec()).is_ok())
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
        if let Some(l) = &self.commit {
            l.retain_recent();
        }
        if let Some(l) = &self.blob {
            l.retain_recent();
        }
    }
}

/// Connections that have not authenticated yet (`/v1/ws` before `auth`, `/v1/federation`
/// before its handshake), counted per source and in total. Each costs a task and buffers
/// before anyone is known; these caps keep one address, or everyone together, from holding
/// more than that many.
pub struct PreAuth {
    counts: Mutex<PreAuthCounts>,
    max_per_source: usize,
    max_total: usize,
}

#[derive(Default)]
struct PreAuthCounts {
    per_source: HashMap<IpAddr, usize>,
    total: usize,
}

/// Why a connection was not admitted before authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreAuthFull {
    /// Its address holds as many unauthenticated connections as one may.
    Source,
    /// The broker holds as many unauthenticated connections as it may.
    Total,
}

impl PreAuth {
    /// At most `max_per_source` unauthenticated connections from one address (an IPv6 /64)
    /// and `max_total` together; 0 is no limit.
    pub fn new(max_per_source: usize, max_total: usize) -> Arc<PreAuth> {
        Arc::new(PreAuth {
            counts: Mutex::default(),
            max_per_source,
            max_total,
        })
    }

    /// Takes a slot for a connection from `ip` (`None`: unknown, counted in the total only);
    /// the slot is given back when dropped.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<PreAuthSlot, PreAuthFull> {
        let source = ip.map(source);
        let mut counts = self.lock();
        if self.max_total != 0 && counts.total >= self.max_total {
            return Err(PreAuthFull::Total);
        }
        if let Some(source) = source {
            let n = counts.per_source.entry(source).or_default();
            if self.max_per_source != 0 && *n >= self.max_per_source {
                return Err(PreAuthFull::Source);
            }
            *n += 1;
        }
        counts.total += 1;
        Ok(PreAuthSlot {
            table: Arc::clone(self),
            source,
        })
    }

    /// Unauthenticated connections now.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PreAuthCounts> {
        // Nothing panics while holding the lock; a poisoned table is still consistent.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One unauthenticated connection's place in [`PreAuth`]; dropped once it authenticates or
/// ends.
pub struct PreAuthSlot {
    table: Arc<PreAuth>,
    source: Option<IpAddr>,
}

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        let mut counts = self.table.lock();
        counts.total -= 1;
        if let Some(source) = self.source
            && let Some(n) = counts.per_source.get_mut(&source)
        {
            *n -= 1;
            if *n == 0 {
                counts.per_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_connections_are_capped_per_source_and_in_total() {
        let table = PreAuth::new(2, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b_same_64: IpAddr = "2001:db8::2".parse().unwrap();
        let a1 = table.admit(Some(a)).unwrap();
        let _a2 = table.admit(Some(a)).unwrap();
        assert_eq!(table.admit(Some(a)).err(), Some(PreAuthFull::Source));
        let _b1 = table.admit(Some(b)).unwrap();
        assert_eq!(table.admit(Some(b_same_64)).err(), Some(PreAuthFull::Total));
        drop(a1);
        assert_eq!(table.total(), 2);
        let _b2 = table.admit(Some(b_same_64)).unwrap();
        assert_eq!(table.admit(None).err(), Some(PreAuthFull::Total));
    }

    #[test]
    fn ipv6_clients_share_a_limit_per_64() {
        let limits = Limits::new(&Rates {
            ip_rate: 1,
            ip_burst: 1,
            stranger_rate: 1,
            ..Rates::default()
        });
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
        let limits = Limits::new(&Rates {
            ip_rate: 1,
            ip_burst: 1,
            ..Rates::default()
        });
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(limits.allow_ip(v4));
        assert!(!limits.allow_ip(mapped));
        assert!(limits.allow_ip("192.0.2.8".parse().unwrap()));
    }
}

#[cfg(test)]
mod commit_tests {
    use super::*;

    #[test]
    fn commits_are_limited_per_group() {
        let limits = Limits::new(&Rates {
            commit_rate: 1,
            ..Rates::default()
        });
        for _ in 0..4 {
            assert!(limits.allow_commit(b"group a"));
        }
        assert!(!limits.allow_commit(b"group a"), "past the burst");
        assert!(limits.allow_commit(b"group b"), "another group is apart");
    }
}
