//! The overlay's network configuration, as flannel stores it in etcd at
//! `<prefix>/config` (default prefix `/coreos.com/network`):
//!
//! ```json
//! {"Network": "10.5.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1}}
//! ```
//!
//! Fields and defaults follow flannel's: `SubnetLen` defaults to 24, `SubnetMin` is the
//! network's second subnet, `SubnetMax` its last one; vxlan's `VNI` defaults to 1 and `Port` to
//! the kernel's 8472; wireguard's `ListenPort` to 51820. Unknown fields are errors, so a typo
//! is reported rather than silently ignored.

use ipnet::Ipv4Net;
use serde_json::{Map, Value};
use std::net::Ipv4Addr;

/// A configuration that cannot be used; the message names the field and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("network config: {field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

fn err(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// How packets between nodes travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A VXLAN device (`flannel.<vni>`) with one FDB and one neighbour entry per peer.
    /// With `direct_routing`, peers on the node's own underlay subnet get a plain route
    /// through their underlay address instead (flannel's `DirectRouting`).
    Vxlan {
        vni: u32,
        port: u16,
        direct_routing: bool,
    },
    /// Plain routes to each peer's subnet through the peer's underlay address (one L2 segment).
    HostGw,
    /// Kernel WireGuard (`flannel-wg`), keys generated on each node, public keys in the leases.
    /// `keepalive`: seconds between keepalive packets to each peer (0: none), for nodes behind
    /// NAT or stateful firewalls (flannel's `PersistentKeepaliveInterval`).
    Wireguard { listen_port: u16, keepalive: u16 },
}

impl Backend {
    /// The name used in leases' `BackendType`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Vxlan { .. } => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Wireguard { .. } => "wireguard",
        }
    }

    /// Bytes of each underlay packet the encapsulation takes (the overlay MTU is the underlay's
    /// minus this).
    pub fn overhead(&self) -> u32 {
        match self {
            Backend::Vxlan { .. } => 50,
            Backend::HostGw => 0,
            // IPv4 outer header 20 + UDP 8 + WireGuard data header 32.
            Backend::Wireguard { .. } => 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: Backend,
}

const VXLAN_DEFAULT_PORT: u16 = 8472;
const WIREGUARD_DEFAULT_PORT: u16 = 51820;

/// Where an overlay network may lie: RFC 1918 and the shared address space of RFC 6598.
pub const PRIVATE_RANGES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

impl NetworkConfig {
    /// Parse and check a configuration document.
    pub fn parse(text: &str) -> Result<NetworkConfig, ConfigError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| err("(document)", format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| err("(document)", "must be a JSON object"))?;
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "Network" | "SubnetLen" | "SubnetMin" | "SubnetMax" | "Backend" | "EnableIPv4"
            ) {
                return Err(err(
                    key,
                    "unknown field (known: Network, SubnetLen, SubnetMin, SubnetMax, Backend)",
                ));
            }
        }
        if let Some(v) = obj.get("EnableIPv4") {
            if v.as_bool() == Some(false) {
                return Err(err(
                    "EnableIPv4",
                    "false is not supported: keel-net is IPv4 only",
                ));
            }
        }
        let network: Ipv4Net = str_field(obj, "Network")?
            .ok_or_else(|| err("Network", "missing (e.g. \"10.5.0.0/16\")"))?
            .parse()
            .map_err(|e| err("Network", format!("not an IPv4 CIDR: {e}")))?;
        if !PRIVATE_RANGES
            .iter()
            .any(|r| r.parse::<Ipv4Net>().is_ok_and(|r| r.contains(&network)))
        {
            return Err(err(
                "Network",
                format!(
                    "{network} is not inside a private range ({}); an overlay over public or whole-Internet space would route other hosts' traffic into the cluster",
                    PRIVATE_RANGES.join(", ")
                ),
            ));
        }
        if network.network() != network.addr() {
            return Err(err(
                "Network",
                format!(
                    "{network} has host bits set; did you mean {}?",
                    network.trunc()
                ),
            ));
        }
        let subnet_len = match obj.get("SubnetLen") {
            None => 24,
            Some(v) => v
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| err("SubnetLen", "must be a number from 1 to 30"))?,
        };
        if subnet_len > 30 || subnet_len <= network.prefix_len() {
            return Err(err(
                "SubnetLen",
                format!(
                    "{subnet_len} must be longer than the network's /{} and at most 30",
                    network.prefix_len()
                ),
            ));
        }
        let first = u32::from(network.network());
        let step = 1u32 << (32 - subnet_len);
        let count = 1u64 << (subnet_len - network.prefix_len());
        let last = first + ((count - 1) as u32) * step;
        let subnet_min = match str_field(obj, "SubnetMin")? {
            Some(s) => parse_subnet_bound("SubnetMin", s, &network, subnet_len)?,
            None if count > 1 => Ipv4Addr::from(first + step),
            None => Ipv4Addr::from(first),
        };
        let subnet_max = match str_field(obj, "SubnetMax")? {
            Some(s) => parse_subnet_bound("SubnetMax", s, &network, subnet_len)?,
            None => Ipv4Addr::from(last),
        };
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(err(
                "SubnetMin",
                format!("{subnet_min} is above SubnetMax {subnet_max}"),
            ));
        }
        let backend = parse_backend(obj.get("Backend"))?;
        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }

    /// Every subnet a node may lease, in address order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let step = 1u32 << (32 - self.subnet_len);
        let min = u32::from(self.subnet_min);
        let max = u32::from(self.subnet_max);
        (0..=((max - min) / step))
            .filter_map(move |i| Ipv4Net::new(Ipv4Addr::from(min + i * step), self.subnet_len).ok())
    }

    /// Whether `subnet` is one this configuration hands out.
    pub fn contains_subnet(&self, subnet: &Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.network() == subnet.addr()
            && u32::from(subnet.addr()) >= u32::from(self.subnet_min)
            && u32::from(subnet.addr()) <= u32::from(self.subnet_max)
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(err(field, "must be a string")),
    }
}

fn parse_subnet_bound(
    field: &str,
    text: &str,
    network: &Ipv4Net,
    subnet_len: u8,
) -> Result<Ipv4Addr, ConfigError> {
    let addr: Ipv4Addr = text
        .parse()
        .map_err(|e| err(field, format!("{text:?} is not an IPv4 address: {e}")))?;
    if !network.contains(&addr) {
        return Err(err(field, format!("{addr} is outside Network {network}")));
    }
    let step = 1u32 << (32 - subnet_len);
    if u32::from(addr) % step != 0 {
        return Err(err(
            field,
            format!("{addr} is not the start of a /{subnet_len} subnet"),
        ));
    }
    Ok(addr)
}

fn port_field(obj: &Map<String, Value>, field: &str, default: u16) -> Result<u16, ConfigError> {
    match obj.get(field) {
        None => Ok(default),
        Some(v) => match v.as_u64().and_then(|n| u16::try_from(n).ok()) {
            Some(0) => Ok(default),
            Some(p) => Ok(p),
            None => Err(err(&format!("Backend.{field}"), "must be a port number")),
        },
    }
}

fn parse_backend(value: Option<&Value>) -> Result<Backend, ConfigError> {
    let Some(value) = value else {
        return Ok(Backend::Vxlan {
            vni: 1,
            port: VXLAN_DEFAULT_PORT,
            direct_routing: false,
        });
    };
    let obj = value
        .as_object()
        .ok_or_else(|| err("Backend", "must be an object like {\"Type\": \"vxlan\"}"))?;
    let kind = str_field(obj, "Type")
        .map_err(|_| err("Backend.Type", "must be a string"))?
        .unwrap_or("vxlan");
    let allowed: &[&str] = match kind {
        "vxlan" => &["Type", "VNI", "Port", "DirectRouting", "MTU"],
        "host-gw" => &["Type"],
        "wireguard" | "extension-wireguard" => {
            &["Type", "ListenPort", "PersistentKeepaliveInterval", "Mode"]
        }
        other => {
            return Err(err(
                "Backend.Type",
                format!("{other:?} is not supported (supported: vxlan, host-gw, wireguard)"),
            ))
        }
    };
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(err(
                &format!("Backend.{key}"),
                format!("unknown for backend {kind} (known: {})", allowed.join(", ")),
            ));
        }
        if matches!(key.as_str(), "MTU" | "Mode") {
            return Err(err(
                &format!("Backend.{key}"),
                "not supported by keel-net yet",
            ));
        }
    }
    Ok(match kind {
        "vxlan" => {
            let vni = match obj.get("VNI") {
                None => 1,
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n < (1 << 24))
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| err("Backend.VNI", "must be a number below 16777216"))?,
            };
            let direct_routing = match obj.get("DirectRouting") {
                None => false,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| err("Backend.DirectRouting", "must be true or false"))?,
            };
            Backend::Vxlan {
                vni,
                port: port_field(obj, "Port", VXLAN_DEFAULT_PORT)?,
                direct_routing,
            }
        }
        "host-gw" => Backend::HostGw,
        _ => Backend::Wireguard {
            listen_port: port_field(obj, "ListenPort", WIREGUARD_DEFAULT_PORT)?,
            keepalive: match obj.get("PersistentKeepaliveInterval") {
                None => 0,
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| {
                        err(
                            "Backend.PersistentKeepaliveInterval",
                            "must be a number of seconds (0 to 65535)",
                        )
                    })?,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_flannel() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 255, 0));
        assert_eq!(
            c.backend,
            Backend::Vxlan {
                vni: 1,
                port: 8472,
                direct_routing: false
            }
        );
        assert_eq!(c.subnets().count(), 255);
        assert!(c.contains_subnet(&"10.5.7.0/24".parse().unwrap()));
        assert!(!c.contains_subnet(&"10.5.0.0/24".parse().unwrap()));
        assert!(!c.contains_subnet(&"10.5.7.0/25".parse().unwrap()));
    }

    #[test]
    fn backends() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.6.0.0/16","SubnetLen":26,"SubnetMin":"10.6.0.64","SubnetMax":"10.6.1.0","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.backend, Backend::HostGw);
        let subnets: Vec<String> = c.subnets().map(|s| s.to_string()).collect();
        assert_eq!(
            subnets,
            [
                "10.6.0.64/26",
                "10.6.0.128/26",
                "10.6.0.192/26",
                "10.6.1.0/26"
            ]
        );
        let backends = [
            (
                r#"{"Type":"wireguard","ListenPort":51000}"#,
                Backend::Wireguard {
                    listen_port: 51000,
                    keepalive: 0,
                },
            ),
            (
                r#"{"Type":"wireguard","PersistentKeepaliveInterval":25}"#,
                Backend::Wireguard {
                    listen_port: 51820,
                    keepalive: 25,
                },
            ),
            (
                r#"{"Type":"vxlan","VNI":42,"Port":4789,"DirectRouting":true}"#,
                Backend::Vxlan {
                    vni: 42,
                    port: 4789,
                    direct_routing: true,
                },
            ),
        ];
        for (backend, expected) in backends {
            let text = format!(r#"{{"Network":"10.7.0.0/16","Backend":{backend}}}"#);
            assert_eq!(
                NetworkConfig::parse(&text).unwrap().backend,
                expected,
                "{text}"
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[]", "(document)"),
            ("{", "(document)"),
            (r#"{"SubnetLen":24}"#, "Network"),
            (r#"{"Network":"10.5.0.1/16"}"#, "Network"),
            (r#"{"Network":"10.5.0.0/33"}"#, "Network"),
            // Review H2: the whole Internet, or public space, as the overlay.
            (r#"{"Network":"0.0.0.0/0","SubnetLen":1}"#, "Network"),
            (r#"{"Network":"8.8.0.0/16"}"#, "Network"),
            (r#"{"Network":"10.0.0.0/7"}"#, "Network"),
            (r#"{"Network":"10.5.0.0/16","SubnetLen":16}"#, "SubnetLen"),
            (r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#, "SubnetLen"),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.7"}"#,
                "SubnetMax",
            ),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.3.0"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#,
                "Backend.Type",
            ),
            (
                r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":-1}}"#,
                "Backend.VNI",
            ),
            (
                r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw","VNI":1}}"#,
                "Backend.VNI",
            ),
            (
                r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":-5}}"#,
                "Backend.PersistentKeepaliveInterval",
            ),
            (
                r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":"yes"}}"#,
                "Backend.DirectRouting",
            ),
            (
                r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw","DirectRouting":true}}"#,
                "Backend.DirectRouting",
            ),
            (r#"{"Network":"10.5.0.0/16","Netwrok":"x"}"#, "Netwrok"),
            (
                r#"{"Network":"10.5.0.0/16","EnableIPv4":false}"#,
                "EnableIPv4",
            ),
        ];
        for (text, field) in cases {
            let e = NetworkConfig::parse(text).expect_err(text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
    }
}
