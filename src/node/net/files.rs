//! What keel-net leaves on the node for others: `/run/flannel/subnet.env` (flannel's format, read
//! by CNI and scripts), a CNI network config for containers, its own state (the subnet it held
//! and its WireGuard key, under /var so they survive reboots) and its status for `keel-net status`.

use super::config::NetworkConfig;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}")]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Write a file whole or not at all (see [`crate::atomic`]).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    crate::atomic::write(path, contents, mode).map_err(|e| FileError {
        path: e.path,
        source: e.source,
    })
}

/// flannel's subnet.env: the network, this node's subnet with its gateway address, the MTU,
/// whether keel-net masquerades traffic leaving the overlay.
pub fn subnet_env(config: &NetworkConfig, subnet: &Ipv4Net, mtu: u32, ip_masq: bool) -> String {
    let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    format!(
        "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n",
        config.network,
        gateway,
        subnet.prefix_len()
    )
}

/// The name of the CNI network keel-net writes.
pub const CNI_NETWORK: &str = "keel-net";
/// The bridge containers are attached to.
pub const CNI_BRIDGE: &str = "cni0";
/// Where host-local keeps its address reservations.
pub const IPAM_DIR: &str = "/run/keel-net/ipam";

/// A CNI network config: a bridge (gateway = first address of the subnet) with host-local
/// addresses from this node's subnet; the bridge is the containers' default route.
pub fn cni_conflist(subnet: &Ipv4Net, mtu: u32) -> String {
    let v = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": CNI_BRIDGE,
            // The bridge is the containers' default gateway (as in flannel's CNI config):
            // other nodes' subnets are reached through it, and with --ip-masq so is the world.
            "isDefaultGateway": true,
            // keel-net masquerades (table ip keel-net), never the plugin, whose rule would
            // hide containers' addresses from each other.
            "ipMasq": false,
            "hairpinMode": true,
            "mtu": mtu,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet.to_string()}]],
                // Reservations live as long as the containers' namespaces (/run/netns): a
                // reboot leaves none behind.
                "dataDir": IPAM_DIR
            }
        }]
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// What keel-net remembers across restarts and reboots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedLease {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
}

pub fn load_saved_lease(state_dir: &Path) -> Option<SavedLease> {
    let text = std::fs::read(state_dir.join("lease.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

pub fn save_lease(state_dir: &Path, lease: &SavedLease) -> Result<(), FileError> {
    let text = serde_json::to_vec_pretty(lease).unwrap_or_default();
    write_atomic(&state_dir.join("lease.json"), &text, 0o644)
}

/// The node's WireGuard private key: made on first use, kept under the state directory (0600).
pub fn wireguard_key(state_dir: &Path) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let path = state_dir.join("wireguard.key");
    let b64 = base64::engine::general_purpose::STANDARD;
    match std::fs::read_to_string(&path) {
        Ok(text) => b64
            .decode(text.trim())
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| {
                format!(
                    "{}: not a base64 WireGuard key; remove it to make a new one",
                    path.display()
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (private, _) = super::kernel::wg_keypair()?;
            write_atomic(
                &path,
                format!("{}\n", b64.encode(private)).as_bytes(),
                0o600,
            )
            .map_err(|e| crate::error::chain(&e))?;
            Ok(private)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The daemon's report, read by `keel-net status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// starting, running, etcd-unreachable, config-error, network-full, kernel-error.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub pid: u32,
    pub updated_unix: u64,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub underlay: Option<StatusUnderlay>,
    #[serde(default)]
    pub lease: Option<StatusLease>,
    #[serde(default)]
    pub device: Option<StatusDevice>,
    #[serde(default)]
    pub peers: Vec<StatusPeer>,
    #[serde(default)]
    pub skipped: Vec<StatusSkipped>,
    #[serde(default)]
    pub invalid_entries: Vec<String>,
    /// The masquerading rule in force (`nft` syntax), when --ip-masq is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_masq: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusUnderlay {
    pub interface: String,
    pub address: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusLease {
    pub subnet: Ipv4Net,
    pub etcd_lease_id: i64,
    pub ttl_s: u64,
    pub renewed_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDevice {
    pub name: String,
    pub address: Ipv4Addr,
    #[serde(default)]
    pub mac: Option<String>,
    pub mtu: u32,
    #[serde(default)]
    pub wireguard_public_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusPeer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    #[serde(default)]
    pub hostname: Option<String>,
    /// vxlan with DirectRouting: routed through its underlay address, not encapsulated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusSkipped {
    pub subnet: Ipv4Net,
    pub reason: String,
}

pub fn status_path(run_dir: &Path) -> PathBuf {
    run_dir.join("status.json")
}

pub fn write_status(run_dir: &Path, status: &Status) -> Result<(), FileError> {
    let text = serde_json::to_vec_pretty(status).unwrap_or_default();
    write_atomic(&status_path(run_dir), &text, 0o644)
}

/// The status as text for `keel-net status`.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!("state:    {}", s.state));
    if let Some(m) = &s.message {
        out.push_str(&format!(" ({m})"));
    }
    out.push('\n');
    if let (Some(n), Some(b)) = (&s.network, &s.backend) {
        out.push_str(&format!("network:  {n}, backend {b}\n"));
    }
    if let Some(u) = &s.underlay {
        out.push_str(&format!(
            "underlay: {} {} mtu {}\n",
            u.interface, u.address, u.mtu
        ));
    }
    if let Some(l) = &s.lease {
        out.push_str(&format!(
            "lease:    {} (etcd lease {:x}, ttl {} s, renewed {} s ago)\n",
            l.subnet,
            l.etcd_lease_id,
            l.ttl_s,
            s.updated_unix.saturating_sub(l.renewed_unix)
        ));
    }
    if let Some(d) = &s.device {
        out.push_str(&format!(
            "device:   {} {}/32 mtu {}",
            d.name, d.address, d.mtu
        ));
        if let Some(m) = &d.mac {
            out.push_str(&format!(" mac {m}"));
        }
        if let Some(k) = &d.wireguard_public_key {
            out.push_str(&format!(" public key {k}"));
        }
        out.push('\n');
    }
    if let Some(m) = &s.ip_masq {
        out.push_str(&format!("ip-masq:  {m}\n"));
    }
    out.push_str(&format!("peers:    {}\n", s.peers.len()));
    for p in &s.peers {
        out.push_str(&format!(
            "  {:<18} via {:<15} {}{}\n",
            p.subnet.to_string(),
            p.public_ip,
            p.hostname.as_deref().unwrap_or(""),
            if p.direct { " (direct, no vxlan)" } else { "" }
        ));
    }
    for k in &s.skipped {
        out.push_str(&format!("  skipped {}: {}\n", k.subnet, k.reason));
    }
    for i in &s.invalid_entries {
        out.push_str(&format!("  invalid entry: {i}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_env_and_cni() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        let s: Ipv4Net = "10.5.7.0/24".parse().unwrap();
        assert_eq!(
            subnet_env(&c, &s, 1450, false),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        assert!(subnet_env(&c, &s, 1450, true).ends_with("FLANNEL_IPMASQ=true\n"));
        let v: serde_json::Value = serde_json::from_str(&cni_conflist(&s, 1450)).unwrap();
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.5.7.0/24"
        );
        assert_eq!(v["plugins"][0]["mtu"], 1450);
        assert_eq!(v["plugins"][0]["isDefaultGateway"], true);
        assert_eq!(v["plugins"][0]["ipMasq"], false);
    }

    #[test]
    fn state_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_saved_lease(dir.path()), None);
        let l = SavedLease {
            subnet: "10.5.7.0/24".parse().unwrap(),
            public_ip: "192.168.1.2".parse().unwrap(),
        };
        save_lease(dir.path(), &l).unwrap();
        assert_eq!(load_saved_lease(dir.path()), Some(l));
        let k1 = wireguard_key(dir.path()).unwrap();
        assert_eq!(wireguard_key(dir.path()).unwrap(), k1);
        std::fs::write(dir.path().join("wireguard.key"), "garbage").unwrap();
        assert!(wireguard_key(dir.path())
            .unwrap_err()
            .contains("wireguard.key"));
    }
}
