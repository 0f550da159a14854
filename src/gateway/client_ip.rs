//! The client's address, for per-IP limits and the loopback check of admin endpoints.
//!
//! It is the TCP peer, unless the peer is a reverse proxy named in `trusted_proxies`: then it
//! is the address that proxy saw, read from `X-Forwarded-For` right to left, skipping trusted
//! hops (as nginx's `real_ip_recursive` does). Everything left of the first untrusted address
//! was written by the client and is ignored, so a client cannot pick its own bucket.

use std::net::{IpAddr, SocketAddr};

use actix_web::{dev::RequestHead, http::header::HeaderValue};
use ipnet::IpNet;

/// The reverse proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses a comma-separated list of addresses and CIDR ranges (empty: trust none).
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client address of a request (`None` only when the peer address is unknown).
    pub fn client_ip(&self, req: &RequestHead) -> Option<IpAddr> {
        let peer = req.peer_addr?.ip();
        Some(self.resolve(peer, req.headers().get_all("x-forwarded-for")))
    }

    fn resolve<'a>(
        &self,
        peer: IpAddr,
        forwarded: impl Iterator<Item = &'a HeaderValue>,
    ) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        // Several header lines form one list, in order. An entry that is not valid text is
        // an unreadable hop, not a reason to ignore the line (the proxy's own entry is in it).
        let hops: Vec<Option<IpAddr>> = forwarded
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|hop| {
                std::str::from_utf8(hop)
                    .ok()
                    .and_then(|h| parse_hop(h.trim()))
            })
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            // A hop we cannot read ends what we can vouch for: the last proxy saw `client`.
            let Some(ip) = *hop else { break };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(trusted: &str, peer: &str, forwarded: &[&str]) -> String {
        let values: Vec<HeaderValue> = forwarded
            .iter()
            .map(|v| HeaderValue::from_str(v).unwrap())
            .collect();
        TrustedProxies::parse(trusted)
            .unwrap()
            .resolve(peer.parse().unwrap(), values.iter())
            .to_string()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(resolve("", "192.0.2.7", &["203.0.113.1"]), "192.0.2.7");
        assert_eq!(
            resolve("127.0.0.1", "192.0.2.7", &["203.0.113.1"]),
            "192.0.2.7"
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_client_written_hops_are_ignored() {
        assert_eq!(
            resolve("127.0.0.1", "127.0.0.1", &["203.0.113.1"]),
            "203.0.113.1"
        );
        // The client forged the first entry; nginx appended the address it saw.
        assert_eq!(
            resolve("127.0.0.1", "127.0.0.1", &["127.0.0.1, 203.0.113.1"]),
            "203.0.113.1"
        );
        // Two trusted hops (a load balancer, then nginx), over two header lines.
        assert_eq!(
            resolve(
                "127.0.0.1, 10.0.0.0/8",
                "127.0.0.1",
                &["198.51.100.9, 203.0.113.1", "10.1.2.3"]
            ),
            "203.0.113.1"
        );
        assert_eq!(
            resolve("::1", "::1", &["[2001:db8::5]:4711"]),
            "2001:db8::5"
        );
    }

    #[test]
    fn without_a_readable_hop_the_nearest_known_address_is_used() {
        assert_eq!(resolve("127.0.0.1", "127.0.0.1", &[]), "127.0.0.1");
        assert_eq!(
            resolve("127.0.0.1, 10.0.0.0/8", "127.0.0.1", &["garbage, 10.0.0.2"]),
            "10.0.0.2"
        );
        // An IPv4 peer seen through an IPv6 socket is still trusted.
        assert_eq!(
            resolve("127.0.0.1", "::ffff:127.0.0.1", &["203.0.113.1"]),
            "203.0.113.1"
        );
    }

    #[test]
    fn a_client_written_non_text_entry_does_not_hide_the_proxys_own_entry() {
        let forwarded = [HeaderValue::from_bytes(b"\x80, 203.0.113.1").unwrap()];
        let ip = TrustedProxies::parse("127.0.0.1")
            .unwrap()
            .resolve("127.0.0.1".parse().unwrap(), forwarded.iter());
        assert_eq!(ip.to_string(), "203.0.113.1");
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(TrustedProxies::parse("127.0.0.1, 10.0.0.0/8, ::1").is_ok());
        assert!(TrustedProxies::parse("nginx").is_err());
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
    }
}
