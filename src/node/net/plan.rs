//! What the kernel should hold for the current set of leases: computed on plain data, so the
//! rules (which peers count, which routes, which FDB/ARP entries, which WireGuard peers) are
//! tested without a kernel. `kernel.rs` makes the kernel match.

use super::config::{Backend, NetworkConfig};
use super::lease::Lease;
use base64::Engine as _;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Which device a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dev {
    /// The backend's own device (flannel.VNI or flannel-wg).
    Overlay,
    /// The node's underlay interface (host-gw).
    Underlay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteSpec {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub dev: Dev,
    /// The gateway is reachable on the device without a covering route (vxlan's peer VTEPs).
    pub onlink: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WgPeer {
    pub public_key: [u8; 32],
    pub endpoint: SocketAddrV4,
    pub allowed: Ipv4Net,
    /// Seconds between keepalives (0: none).
    pub keepalive: u16,
}

/// The kernel state for one set of leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeSet<RouteSpec>,
    /// vxlan: overlay address of each peer's VTEP → its MAC (permanent ARP entries).
    pub neighbours: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// vxlan: peer VTEP MAC → the peer's underlay address (permanent FDB entries).
    pub fdb: BTreeMap<[u8; 6], Ipv4Addr>,
    pub wg_peers: BTreeSet<WgPeer>,
}

/// A lease that was left out, and why (shown by `keel-net status`, logged once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub subnet: Ipv4Net,
    pub reason: String,
}

/// The address this node's overlay device carries: the first address of its subnet, as flannel.
pub fn overlay_address(own: &Ipv4Net) -> Ipv4Addr {
    own.network()
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_wg_key(text: &str) -> Option<[u8; 32]> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?
        .try_into()
        .ok()
}

/// The kernel state for `leases`, seen from the node holding `own`, whose underlay address is
/// on `underlay_net` (vxlan's DirectRouting routes peers on that subnet without encapsulation).
pub fn plan(
    config: &NetworkConfig,
    own: &Lease,
    leases: &[Lease],
    underlay_net: Option<Ipv4Net>,
) -> (Desired, Vec<Skipped>) {
    let mut desired = Desired::default();
    let mut skipped = Vec::new();
    let backend_name = config.backend.type_name();
    for peer in leases {
        if peer.subnet == own.subnet {
            continue;
        }
        let mut skip = |reason: String| {
            skipped.push(Skipped {
                subnet: peer.subnet,
                reason,
            })
        };
        // Only subnets this network hands out: the exact SubnetLen, aligned, inside
        // SubnetMin..SubnetMax. Such leases cannot overlap each other or this node's own; a
        // shorter prefix (covering other nodes' subnets) or a longer one (taking part of one)
        // would route their traffic to whoever wrote it.
        if !config.contains_subnet(&peer.subnet) {
            skip(format!(
                "not a subnet this network hands out (/{} inside {}, {}..{})",
                config.subnet_len, config.network, config.subnet_min, config.subnet_max
            ));
            continue;
        }
        if peer.attrs.public_ip == own.attrs.public_ip {
            skip(format!(
                "has this node's own public address {} (a stale lease of this node?)",
                own.attrs.public_ip
            ));
            continue;
        }
        if peer.attrs.backend_type != backend_name {
            skip(format!(
                "backend {} differs from the network's {backend_name}",
                peer.attrs.backend_type
            ));
            continue;
        }
        let data = &peer.attrs.backend_data;
        match &config.backend {
            Backend::Vxlan {
                vni,
                direct_routing,
                ..
            } => {
                let Some(mac) = data["VtepMAC"].as_str().and_then(parse_mac) else {
                    skip("BackendData.VtepMAC missing or not a MAC address".into());
                    continue;
                };
                if let Some(peer_vni) = data["VNI"].as_u64() {
                    if peer_vni != u64::from(*vni) {
                        skip(format!("VNI {peer_vni} differs from the network's {vni}"));
                        continue;
                    }
                }
                let direct = *direct_routing
                    && underlay_net.is_some_and(|n| n.contains(&peer.attrs.public_ip));
                if direct {
                    // Same L2 segment: as host-gw, no VXLAN entries for this peer.
                    desired.routes.insert(RouteSpec {
                        dst: peer.subnet,
                        gateway: Some(peer.attrs.public_ip),
                        dev: Dev::Underlay,
                        onlink: false,
                    });
                    continue;
                }
                let vtep = overlay_address(&peer.subnet);
                desired.routes.insert(RouteSpec {
                    dst: peer.subnet,
                    gateway: Some(vtep),
                    dev: Dev::Overlay,
                    onlink: true,
                });
                desired.neighbours.insert(vtep, mac);
                desired.fdb.insert(mac, peer.attrs.public_ip);
            }
            Backend::HostGw => {
                desired.routes.insert(RouteSpec {
                    dst: peer.subnet,
                    gateway: Some(peer.attrs.public_ip),
                    dev: Dev::Underlay,
                    onlink: false,
                });
            }
            Backend::Wireguard {
                listen_port,
                keepalive,
            } => {
                let Some(key) = data["PublicKey"].as_str().and_then(parse_wg_key) else {
                    skip("BackendData.PublicKey missing or not a base64 WireGuard key".into());
                    continue;
                };
                let port = data["ListenPort"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(*listen_port);
                desired.routes.insert(RouteSpec {
                    dst: peer.subnet,
                    gateway: None,
                    dev: Dev::Overlay,
                    onlink: false,
                });
                desired.wg_peers.insert(WgPeer {
                    public_key: key,
                    endpoint: SocketAddrV4::new(peer.attrs.public_ip, port),
                    allowed: peer.subnet,
                    keepalive: *keepalive,
                });
            }
        }
    }
    (desired, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::net::lease::LeaseAttrs;
    use serde_json::json;

    fn lease(subnet: &str, ip: &str, kind: &str, data: serde_json::Value) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                backend_type: kind.into(),
                backend_data: data,
                hostname: None,
            },
        }
    }

    #[test]
    fn vxlan_peers_get_route_arp_and_fdb() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        let own = lease(
            "10.5.1.0/24",
            "192.168.7.11",
            "vxlan",
            json!({"VNI":1,"VtepMAC":"02:00:00:00:00:01"}),
        );
        let leases = vec![
            own.clone(),
            lease(
                "10.5.2.0/24",
                "192.168.7.12",
                "vxlan",
                json!({"VNI":1,"VtepMAC":"02:00:00:00:00:02"}),
            ),
            lease(
                "10.5.3.0/24",
                "192.168.7.13",
                "vxlan",
                json!({"VNI":2,"VtepMAC":"02:00:00:00:00:03"}),
            ),
            lease("10.5.4.0/24", "192.168.7.14", "host-gw", json!(null)),
            lease(
                "10.5.5.0/24",
                "192.168.7.15",
                "vxlan",
                json!({"VNI":1,"VtepMAC":"nope"}),
            ),
            lease(
                "10.5.6.0/24",
                "192.168.7.11",
                "vxlan",
                json!({"VNI":1,"VtepMAC":"02:00:00:00:00:06"}),
            ),
        ];
        let (d, skipped) = plan(&c, &own, &leases, None);
        assert_eq!(d.routes.len(), 1);
        let r = d.routes.iter().next().unwrap();
        assert_eq!(r.dst.to_string(), "10.5.2.0/24");
        assert_eq!(r.gateway, Some(Ipv4Addr::new(10, 5, 2, 0)));
        assert!(r.onlink && r.dev == Dev::Overlay);
        assert_eq!(
            d.neighbours[&Ipv4Addr::new(10, 5, 2, 0)],
            [2, 0, 0, 0, 0, 2]
        );
        assert_eq!(d.fdb[&[2, 0, 0, 0, 0, 2]], Ipv4Addr::new(192, 168, 7, 12));
        let reasons: Vec<String> = skipped
            .iter()
            .map(|s| format!("{} {}", s.subnet, s.reason))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons[0].starts_with("10.5.3.0/24 VNI 2"), "{reasons:?}");
        assert!(
            reasons[1].contains("backend host-gw differs"),
            "{reasons:?}"
        );
        assert!(reasons[2].contains("VtepMAC"), "{reasons:?}");
        assert!(reasons[3].contains("own public address"), "{reasons:?}");
    }

    /// DirectRouting: a peer on the node's underlay subnet gets a plain route and no VXLAN
    /// entries; a peer behind a router keeps the encapsulated path; without the option (or
    /// without a known underlay subnet) every peer is encapsulated.
    #[test]
    fn vxlan_direct_routing_for_peers_on_the_same_subnet() {
        let data = |n: u8| json!({"VNI":1,"VtepMAC":format!("02:00:00:00:00:0{n}")});
        let own = lease("10.5.1.0/24", "192.168.7.11", "vxlan", data(1));
        let near = lease("10.5.2.0/24", "192.168.7.12", "vxlan", data(2));
        let far = lease("10.5.3.0/24", "192.168.9.13", "vxlan", data(3));
        let leases = [own.clone(), near, far];
        let underlay: Ipv4Net = "192.168.7.0/24".parse().unwrap();
        let direct = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        )
        .unwrap();
        let (d, skipped) = plan(&direct, &own, &leases, Some(underlay));
        assert!(skipped.is_empty());
        let routes: Vec<(String, Option<Ipv4Addr>, Dev)> = d
            .routes
            .iter()
            .map(|r| (r.dst.to_string(), r.gateway, r.dev))
            .collect();
        assert_eq!(
            routes,
            [
                (
                    "10.5.2.0/24".to_string(),
                    Some(Ipv4Addr::new(192, 168, 7, 12)),
                    Dev::Underlay
                ),
                (
                    "10.5.3.0/24".to_string(),
                    Some(Ipv4Addr::new(10, 5, 3, 0)),
                    Dev::Overlay
                ),
            ]
        );
        assert_eq!(d.fdb.len(), 1);
        assert_eq!(d.fdb[&[2, 0, 0, 0, 0, 3]], Ipv4Addr::new(192, 168, 9, 13));
        assert_eq!(d.neighbours.len(), 1);

        let plain = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        let (d, _) = plan(&plain, &own, &leases, Some(underlay));
        assert!(d.routes.iter().all(|r| r.dev == Dev::Overlay));
        assert_eq!(d.fdb.len(), 2);
        let (d, _) = plan(&direct, &own, &leases, None);
        assert!(d.routes.iter().all(|r| r.dev == Dev::Overlay));
    }

    #[test]
    fn host_gw_and_wireguard() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        let own = lease("10.5.1.0/24", "192.168.7.11", "host-gw", json!(null));
        let peer = lease("10.5.2.0/24", "192.168.7.12", "host-gw", json!(null));
        let (d, _) = plan(&c, &own, &[own.clone(), peer], None);
        let r = d.routes.iter().next().unwrap();
        assert_eq!(
            (r.gateway, r.dev, r.onlink),
            (Some(Ipv4Addr::new(192, 168, 7, 12)), Dev::Underlay, false)
        );

        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}"#)
            .unwrap();
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let own = lease(
            "10.5.1.0/24",
            "192.168.7.11",
            "wireguard",
            json!({"PublicKey": key}),
        );
        let peer = lease(
            "10.5.2.0/24",
            "192.168.7.12",
            "wireguard",
            json!({"PublicKey": key, "ListenPort": 51999}),
        );
        let bad = lease(
            "10.5.3.0/24",
            "192.168.7.13",
            "wireguard",
            json!({"PublicKey": "c2hvcnQ="}),
        );
        let (d, skipped) = plan(&c, &own, &[own.clone(), peer.clone(), bad], None);
        let p = d.wg_peers.iter().next().unwrap();
        assert_eq!(p.endpoint.to_string(), "192.168.7.12:51999");
        assert_eq!(p.allowed.to_string(), "10.5.2.0/24");
        assert_eq!(p.keepalive, 0);
        assert_eq!(d.routes.iter().next().unwrap().gateway, None);
        assert_eq!(skipped.len(), 1);
        let c = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":25}}"#,
        )
        .unwrap();
        let (d, _) = plan(&c, &own, &[own.clone(), peer], None);
        assert_eq!(d.wg_peers.iter().next().unwrap().keepalive, 25);
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("0a:1B:00:ff:10:01"),
            Some([10, 27, 0, 255, 16, 1])
        );
        assert_eq!(parse_mac("0a:1b:00:ff:10"), None);
        assert_eq!(parse_mac("0a:1b:00:ff:10:01:02"), None);
        assert_eq!(parse_mac("0a:1b:00:ff:10:1"), None);
        assert_eq!(format_mac(&[10, 27, 0, 255, 16, 1]), "0a:1b:00:ff:10:01");
    }

    /// Review H2: leases that cover other nodes' subnets (a shorter prefix), take part of one (a
    /// longer prefix, also of this node's own), or lie outside SubnetMin..SubnetMax are never
    /// routed; a proper peer still is.
    #[test]
    fn overlapping_and_covering_leases_are_refused() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        let own = lease("10.5.1.0/24", "192.168.77.11", "host-gw", json!(null));
        let attacker = |s: &str| lease(s, "192.168.77.66", "host-gw", json!(null));
        let leases = vec![
            own.clone(),
            lease("10.5.2.0/24", "192.168.77.12", "host-gw", json!(null)),
            attacker("10.5.2.128/25"),
            attacker("10.5.1.0/25"),
            attacker("10.5.0.0/16"),
            attacker("10.5.9.7/32"),
            attacker("10.5.0.0/24"),
        ];
        let (d, skipped) = plan(&c, &own, &leases, None);
        let routes: Vec<String> = d.routes.iter().map(|r| r.dst.to_string()).collect();
        assert_eq!(routes, ["10.5.2.0/24"], "{skipped:?}");
        assert_eq!(skipped.len(), 5, "{skipped:?}");
        assert!(skipped
            .iter()
            .all(|s| s.reason.contains("not a subnet this network hands out")));
    }
}
