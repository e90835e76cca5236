//! Subnet leases, stored as flannel stores them: key `<prefix>/subnets/10.5.34.0-24`, value
//! `{"PublicIP": "192.168.1.11", "BackendType": "vxlan", "BackendData": {...}}`, attached to an
//! etcd lease with a TTL that the owning node keeps alive. When a node goes away and stops
//! renewing, etcd deletes the key and every other node removes its routes.

use super::config::NetworkConfig;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// What a lease records about its node, in flannel's JSON field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    #[serde(rename = "BackendData", default)]
    pub backend_data: Value,
    /// keel-net's addition: the node's name, for `keel-net status` (flannel ignores it).
    #[serde(rename = "Hostname", default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
}

/// The etcd key of a subnet's lease.
pub fn key(prefix: &str, subnet: &Ipv4Net) -> String {
    format!(
        "{}/subnets/{}-{}",
        prefix.trim_end_matches('/'),
        subnet.network(),
        subnet.prefix_len()
    )
}

/// The key prefix under which all leases live.
pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

/// The subnet a lease key names, or None for a key that is not a lease.
pub fn subnet_of_key(prefix: &str, key: &str) -> Option<Ipv4Net> {
    let rest = key.strip_prefix(&subnets_prefix(prefix))?;
    let (addr, len) = rest.split_once('-')?;
    let net = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    (net.network() == net.addr()).then_some(net)
}

/// Parse one stored lease; a value that is not a lease is reported with its key.
pub fn parse(prefix: &str, key: &str, value: &[u8]) -> Result<Lease, String> {
    let subnet = subnet_of_key(prefix, key).ok_or_else(|| format!("{key}: not a subnet key"))?;
    let attrs: LeaseAttrs =
        serde_json::from_slice(value).map_err(|e| format!("{key}: not a lease: {e}"))?;
    Ok(Lease { subnet, attrs })
}

/// Choose the subnet for this node: the one it held before when that is still free and valid,
/// else the first free one starting from a position derived from `seed` (the node's address), so
/// that nodes starting together rarely race for the same subnet. None when the network is full.
pub fn choose_subnet(
    config: &NetworkConfig,
    taken: &HashSet<Ipv4Net>,
    previous: Option<Ipv4Net>,
    seed: u32,
) -> Option<Ipv4Net> {
    if let Some(prev) = previous {
        if config.contains_subnet(&prev) && !taken.contains(&prev) {
            return Some(prev);
        }
    }
    let all: Vec<Ipv4Net> = config.subnets().collect();
    if all.is_empty() {
        return None;
    }
    let start = (seed as usize) % all.len();
    all.iter()
        .cycle()
        .skip(start)
        .take(all.len())
        .find(|s| !taken.contains(s))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","SubnetLen":24,"SubnetMax":"10.5.3.0"}"#)
            .unwrap()
    }

    #[test]
    fn keys_round_trip() {
        let s: Ipv4Net = "10.5.34.0/24".parse().unwrap();
        let k = key("/coreos.com/network/", &s);
        assert_eq!(k, "/coreos.com/network/subnets/10.5.34.0-24");
        assert_eq!(subnet_of_key("/coreos.com/network", &k), Some(s));
        assert_eq!(
            subnet_of_key("/coreos.com/network", "/coreos.com/network/config"),
            None
        );
        assert_eq!(
            subnet_of_key(
                "/coreos.com/network",
                "/coreos.com/network/subnets/10.5.34.1-24"
            ),
            None
        );
    }

    #[test]
    fn parses_flannel_leases() {
        let v = br#"{"PublicIP":"192.168.1.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"8a:1f:00:00:00:01"}}"#;
        let l = parse(
            "/coreos.com/network",
            "/coreos.com/network/subnets/10.5.2.0-24",
            v,
        )
        .unwrap();
        assert_eq!(l.attrs.public_ip, Ipv4Addr::new(192, 168, 1, 11));
        assert_eq!(l.attrs.backend_data["VtepMAC"], "8a:1f:00:00:00:01");
        assert!(parse(
            "/coreos.com/network",
            "/coreos.com/network/subnets/10.5.2.0-24",
            b"{}"
        )
        .is_err());
    }

    #[test]
    fn allocation() {
        let c = config();
        let mut taken = HashSet::new();
        let prev: Ipv4Net = "10.5.2.0/24".parse().unwrap();
        assert_eq!(choose_subnet(&c, &taken, Some(prev), 0), Some(prev));
        // A previous subnet outside the current config is not reused.
        let outside: Ipv4Net = "10.9.2.0/24".parse().unwrap();
        assert_eq!(
            choose_subnet(&c, &taken, Some(outside), 0),
            "10.5.1.0/24".parse().ok()
        );
        taken.insert(prev);
        assert_eq!(
            choose_subnet(&c, &taken, Some(prev), 1),
            "10.5.3.0/24".parse().ok()
        );
        taken.insert("10.5.3.0/24".parse().unwrap());
        assert_eq!(
            choose_subnet(&c, &taken, None, 1),
            "10.5.1.0/24".parse().ok()
        );
        taken.insert("10.5.1.0/24".parse().unwrap());
        assert_eq!(choose_subnet(&c, &taken, None, 7), None);
    }
}
