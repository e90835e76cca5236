//! `keel cluster init`: everything a set of nodes needs to form a cluster, as one Ignition
//! config per node: name, static address (optional), etcd membership with TLS on the client and
//! peer ports, the keel-net settings and the overlay's network config, plus the CA and an admin
//! client certificate for the operator. The CA stays in the output directory (its key 0600) so
//! later members can be issued from it (`keel cluster add-node`).

use super::pki::{self, CertPair};
use crate::node::net::config::NetworkConfig;
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

/// One node as given on the command line: `NAME=IP[/PREFIX][@MAC]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub ip: Ipv4Addr,
    /// With a MAC, the node gets this address statically on the NIC with that MAC.
    pub prefix: Option<u8>,
    pub mac: Option<String>,
}

impl std::str::FromStr for NodeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("--node {s:?}: {why} (expected NAME=IP[/PREFIX][@MAC], e.g. node1=10.77.0.1/24@52:54:00:4b:00:01)")
        };
        let (name, rest) = s.split_once('=').ok_or_else(|| bad("no `=`"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad("the name must be letters, digits and `-`"));
        }
        if crate::attest::admission::RESERVED_NAMES.contains(&name) {
            return Err(bad(
                "this name is the operator's: etcd takes a certificate's name as its user, so a node called that would be the cluster's administrator",
            ));
        }
        let (addr, mac) = match rest.split_once('@') {
            Some((a, m)) => {
                if crate::node::net::plan::parse_mac(m).is_none() {
                    return Err(bad("not a MAC address after `@`"));
                }
                (a, Some(m.to_ascii_lowercase()))
            }
            None => (rest, None),
        };
        let (ip, prefix) = match addr.split_once('/') {
            Some((ip, p)) => (
                ip,
                Some(
                    p.parse::<u8>()
                        .ok()
                        .filter(|p| *p <= 32)
                        .ok_or_else(|| bad("bad prefix length"))?,
                ),
            ),
            None => (addr, None),
        };
        let ip = ip.parse().map_err(|_| bad("not an IPv4 address"))?;
        if mac.is_some() && prefix.is_none() {
            return Err(bad(
                "a static address (with @MAC) needs a prefix length, e.g. /24",
            ));
        }
        Ok(NodeSpec {
            name: name.to_string(),
            ip,
            prefix,
            mac,
        })
    }
}

/// What `init` records in DIR/cluster.json for later `add-node` runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub token: String,
    pub network_config: Value,
    pub nodes: Vec<NodeSpec>,
    /// Nodes get their certificates by TPM attestation (no key in any config).
    #[serde(default)]
    pub attested: bool,
    /// Attested clusters: each node's overlay subnet, assigned here so that etcd can let a node
    /// write that one lease key and no other (docs/attestation.md).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub subnets: std::collections::BTreeMap<String, ipnet::Ipv4Net>,
}

pub const PKI_DIR: &str = "/etc/keel/pki";
/// Where an attested node's certificate and key live (tmpfs; made at every boot).
pub const RUN_PKI_DIR: &str = "/run/keel/pki";

/// How the nodes of a cluster get their TLS credentials.
pub enum Credentials {
    /// Each node's key and certificate travel in its config (machines without a TPM).
    InConfig,
    /// Each node proves with its TPM that it is enrolled and runs a signed boot
    /// (docs/attestation.md): the configs hold public material only.
    Attested(AttestInit),
}

/// What `keel cluster init --ek …` needs for attested clusters.
pub struct AttestInit {
    /// Each node's endorsement key (from `keel-agent ek` or `keel cluster ek`), by name.
    pub eks: std::collections::BTreeMap<String, crate::attest::tpm2::EkPublic>,
    /// The members that hold an issuer and serve the verifier.
    pub issuers: Vec<String>,
    /// The operator's PCR boot key (pcr-boot.pub.pem): the issuers' keys open only in states
    /// it signed.
    pub boot_key: openssl::pkey::PKey<openssl::pkey::Public>,
    /// Lifetime of the nodes' certificates, seconds.
    pub cert_ttl: u64,
    /// Admit nodes that booted without Secure Boot (or with other keys in db).
    pub allow_secure_boot_off: bool,
}

pub(super) fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

pub(super) fn file(path: &str, contents: &[u8], mode: u32, owner: Option<&str>) -> Value {
    let mut v = json!({
        "path": path,
        "overwrite": true,
        "mode": mode,
        "contents": {"source": data_url(contents)}
    });
    if let Some(o) = owner {
        v["user"] = json!({"name": o});
        v["group"] = json!({"name": o});
    }
    v
}

fn peer_url(n: &NodeSpec) -> String {
    format!("https://{}:2380", n.ip)
}

fn client_url(n: &NodeSpec) -> String {
    format!("https://{}:2379", n.ip)
}

/// etcd's settings for `node` in a cluster whose members (including it) are `members`.
pub fn etcd_env(
    node: &NodeSpec,
    members: &[NodeSpec],
    state: &str,
    token: &str,
    node_pki: &str,
) -> String {
    let initial: Vec<String> = members
        .iter()
        .map(|m| format!("{}={}", m.name, peer_url(m)))
        .collect();
    format!(
        "# etcd member {name}, written by `keel cluster` (docs/etcd.md).\n\
ETCD_NAME={name}\n\
ETCD_DATA_DIR=/var/lib/etcd/{name}\n\
ETCD_LISTEN_CLIENT_URLS={client},https://127.0.0.1:2379\n\
ETCD_ADVERTISE_CLIENT_URLS={client}\n\
ETCD_LISTEN_PEER_URLS={peer}\n\
ETCD_INITIAL_ADVERTISE_PEER_URLS={peer}\n\
ETCD_INITIAL_CLUSTER={initial}\n\
ETCD_INITIAL_CLUSTER_STATE={state}\n\
ETCD_INITIAL_CLUSTER_TOKEN={token}\n\
ETCD_CERT_FILE={node_pki}/node.pem\n\
ETCD_KEY_FILE={node_pki}/node-key.pem\n\
ETCD_TRUSTED_CA_FILE={PKI_DIR}/ca.pem\n\
ETCD_CLIENT_CERT_AUTH=true\n\
ETCD_PEER_CERT_FILE={node_pki}/node.pem\n\
ETCD_PEER_KEY_FILE={node_pki}/node-key.pem\n\
ETCD_PEER_TRUSTED_CA_FILE={PKI_DIR}/ca.pem\n\
ETCD_PEER_CLIENT_CERT_AUTH=true\n",
        name = node.name,
        client = client_url(node),
        peer = peer_url(node),
        initial = initial.join(","),
    )
}

/// The Ignition config (spec 3.4.0) for one node.
/// A node's credentials in its config: its key and certificate, or (attested) the files that
/// let it obtain them.
pub enum NodeCreds<'a> {
    Keys(&'a CertPair),
    Attested(Vec<Value>),
}

pub fn node_config(
    node: &NodeSpec,
    members: &[NodeSpec],
    state: &str,
    record: &ClusterRecord,
    ca: &CertPair,
    creds: NodeCreds,
) -> Result<Value> {
    let node_pki = match creds {
        NodeCreds::Keys(_) => PKI_DIR,
        NodeCreds::Attested(_) => RUN_PKI_DIR,
    };
    let endpoints: Vec<String> = members.iter().map(client_url).collect();
    let endpoints = endpoints.join(",");
    let net = serde_json::to_vec_pretty(&record.network_config)?;
    let keel_net = format!(
        "# keel-net settings, written by `keel cluster` (docs/networking.md).\n\
KEEL_NET_ETCD_ENDPOINTS={endpoints}\n\
KEEL_NET_ETCD_CAFILE={PKI_DIR}/ca.pem\n\
KEEL_NET_ETCD_CERTFILE={node_pki}/node.pem\n\
KEEL_NET_ETCD_KEYFILE={node_pki}/node-key.pem\n\
KEEL_NET_PUBLIC_IP={ip}\n\
KEEL_NET_HOSTNAME={name}\n\
KEEL_NET_BOOTSTRAP_CONFIG=/etc/keel/net-config.json\n{subnet}",
        ip = node.ip,
        name = node.name,
        subnet = record
            .subnets
            .get(&node.name)
            .map(|s| format!("KEEL_NET_SUBNET={s}\n"))
            .unwrap_or_default()
    );
    let etcdctl = format!(
        "ETCDCTL_API=3\nETCDCTL_ENDPOINTS={endpoints}\nETCDCTL_CACERT={PKI_DIR}/ca.pem\nETCDCTL_CERT={node_pki}/node.pem\nETCDCTL_KEY={node_pki}/node-key.pem\n"
    );
    let mut files = vec![
        file(
            "/etc/hostname",
            format!("{}\n", node.name).as_bytes(),
            0o644,
            None,
        ),
        file(
            "/etc/keel/etcd.env",
            etcd_env(node, members, state, &record.token, node_pki).as_bytes(),
            0o644,
            None,
        ),
        file(&format!("{PKI_DIR}/ca.pem"), &ca.cert_pem, 0o644, None),
        file("/etc/keel/keel-net.env", keel_net.as_bytes(), 0o644, None),
        file("/etc/keel/net-config.json", &net, 0o644, None),
        file("/etc/keel/etcdctl.env", etcdctl.as_bytes(), 0o644, None),
    ];
    // etcd binds its peer and client ports to the node's address: start it only once that
    // address is configured (networkd may still be bringing the cluster link up).
    let wait_addr = format!(
        "# Written by `keel cluster`: etcd binds to {ip}; wait until an interface has it.\n\
[Unit]\nWants=network-online.target\nAfter=network-online.target\n\n[Service]\n\
ExecStartPre=/bin/sh -c 'for i in $$(seq 120); do ip -4 -o addr show | grep -q \" {ip}/\" && exit 0; sleep 1; done; echo \"{ip} is not configured on any interface\" >&2; exit 1'\n",
        ip = node.ip
    );
    files.push(file(
        "/etc/systemd/system/etcd.service.d/20-keel-cluster.conf",
        wait_addr.as_bytes(),
        0o644,
        None,
    ));
    match creds {
        NodeCreds::Keys(cert) => {
            files.push(file(
                &format!("{PKI_DIR}/node.pem"),
                &cert.cert_pem,
                0o644,
                None,
            ));
            files.push(file(
                &format!("{PKI_DIR}/node-key.pem"),
                &cert.key_pem,
                0o600,
                Some("etcd"),
            ));
        }
        NodeCreds::Attested(extra) => {
            // etcd and keel-net start once keel-attest has this boot's certificate.
            let after = "# Written by `keel cluster`: the node's certificate comes from keel-attest (docs/attestation.md).\n[Unit]\nWants=keel-attest.service\nAfter=keel-attest.service\n";
            for unit in ["etcd.service", "keel-net.service"] {
                files.push(file(
                    &format!("/etc/systemd/system/{unit}.d/30-keel-attest.conf"),
                    after.as_bytes(),
                    0o644,
                    None,
                ));
            }
            files.extend(extra);
        }
    }
    if let (Some(mac), Some(prefix)) = (&node.mac, node.prefix) {
        let network = format!(
            "# Static cluster address, written by `keel cluster`.\n[Match]\nMACAddress={mac}\n\n[Network]\nAddress={}/{prefix}\nLinkLocalAddressing=no\n",
            node.ip
        );
        files.push(file(
            "/etc/systemd/network/10-keel-cluster.network",
            network.as_bytes(),
            0o644,
            None,
        ));
    }
    Ok(json!({
        "ignition": {"version": "3.4.0"},
        "storage": {"files": files}
    }))
}

fn check_attest_init(nodes: &[NodeSpec], a: &AttestInit) -> Result<()> {
    for n in nodes {
        if !a.eks.contains_key(&n.name) {
            bail!(
                "--ek: no endorsement key for {} (give --ek {}=FILE; `keel-agent ek` prints it on the machine)",
                n.name,
                n.name
            );
        }
    }
    for name in a.eks.keys().chain(a.issuers.iter()) {
        if !nodes.iter().any(|n| &n.name == name) {
            bail!("--ek/--issuers: {name} is not one of the --node names");
        }
    }
    if a.issuers.is_empty() {
        bail!("--issuers: at least one first member must hold an issuer");
    }
    // Until the first issuer has turned etcd's auth on, verifiers certify no other node (every
    // certificate would be etcd's root then): the issuers alone must make a quorum.
    let quorum = nodes.len() / 2 + 1;
    if a.issuers.len() < quorum {
        bail!(
            "--issuers: {} of {} members; the issuers alone must be a majority ({quorum}), because until etcd's auth is on no other node is certified and etcd needs a quorum to turn it on",
            a.issuers.len(),
            nodes.len()
        );
    }
    Ok(())
}

pub fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    crate::node::net::files::write_atomic(path, data, mode)
        .with_context(|| format!("writing {}", path.display()))
}

fn issue_for(ca: &CertPair, n: &NodeSpec) -> Result<CertPair> {
    let ips = [IpAddr::V4(n.ip), IpAddr::V4(Ipv4Addr::LOCALHOST)];
    Ok(pki::issue(
        ca,
        &n.name,
        &ips,
        &["localhost", &n.name],
        3650,
    )?)
}

fn load_ca(dir: &Path) -> Result<CertPair> {
    let read = |n: &str| {
        std::fs::read(dir.join(n)).with_context(|| format!("reading {}", dir.join(n).display()))
    };
    Ok(CertPair {
        cert_pem: read("ca.pem")?,
        key_pem: read("ca-key.pem")?,
    })
}

/// One overlay subnet per node, in the order given, from the network config's first.
pub fn assign_subnets(
    nodes: &[NodeSpec],
    network_config: &str,
) -> Result<std::collections::BTreeMap<String, ipnet::Ipv4Net>> {
    let cfg = NetworkConfig::parse(network_config).context("--network-config")?;
    let mut free = cfg.subnets();
    nodes
        .iter()
        .map(|n| {
            let s = free.next().with_context(|| {
                format!(
                    "--network-config: network {} has no /{} subnet left for {}",
                    cfg.network, cfg.subnet_len, n.name
                )
            })?;
            Ok((n.name.clone(), s))
        })
        .collect()
}

/// Make DIR/{ca.pem, ca-key.pem, admin.pem, admin-key.pem, cluster.json, NAME.ign...}.
pub fn init(
    dir: &Path,
    nodes: &[NodeSpec],
    network_config: &str,
    creds: &Credentials,
) -> Result<()> {
    if nodes.is_empty() {
        bail!("give at least one --node");
    }
    for (i, n) in nodes.iter().enumerate() {
        if nodes[..i].iter().any(|m| m.name == n.name || m.ip == n.ip) {
            bail!("--node {}: name or address given twice", n.name);
        }
    }
    NetworkConfig::parse(network_config).context("--network-config")?;
    let network_value: Value = serde_json::from_str(network_config)?;
    if dir.join("ca-key.pem").exists() {
        bail!("{} already holds a cluster (ca-key.pem); use `keel cluster add-node` or another directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = pki::new_ca("keel cluster CA", 3650)?;
    let admin = pki::issue(&ca, "admin", &[], &[], 3650)?;
    let mut token = [0u8; 8];
    openssl::rand::rand_bytes(&mut token)?;
    if let Credentials::Attested(a) = creds {
        check_attest_init(nodes, a)?;
    }
    let record = ClusterRecord {
        token: format!("keel-{}", hex::encode(token)),
        network_config: network_value,
        nodes: nodes.to_vec(),
        attested: matches!(creds, Credentials::Attested(_)),
        subnets: match creds {
            Credentials::Attested(_) => assign_subnets(nodes, network_config)?,
            Credentials::InConfig => Default::default(),
        },
    };
    write(&dir.join("ca.pem"), &ca.cert_pem, 0o644)?;
    write(&dir.join("ca-key.pem"), &ca.key_pem, 0o600)?;
    write(&dir.join("admin.pem"), &admin.cert_pem, 0o644)?;
    write(&dir.join("admin-key.pem"), &admin.key_pem, 0o600)?;
    match creds {
        Credentials::InConfig => {
            for n in nodes {
                let cert = issue_for(&ca, n)?;
                let cfg = node_config(n, nodes, "new", &record, &ca, NodeCreds::Keys(&cert))?;
                write(
                    &dir.join(format!("{}.ign", n.name)),
                    serde_json::to_string_pretty(&cfg)?.as_bytes(),
                    0o600,
                )?;
            }
        }
        Credentials::Attested(a) => {
            let (configs, list, sig) = super::attested::configs(nodes, &record, &ca, a)?;
            write(&dir.join("admission.json"), &list, 0o644)?;
            write(
                &dir.join("admission.json.sig"),
                format!("{sig}\n").as_bytes(),
                0o644,
            )?;
            for (name, cfg) in configs {
                write(&dir.join(format!("{name}.ign")), &cfg, 0o644)?;
            }
        }
    }
    write(
        &dir.join("cluster.json"),
        serde_json::to_string_pretty(&record)?.as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Issue NAME.ign for a member joining the existing cluster in DIR (after `etcdctl member add`).
pub fn add_node(dir: &Path, node: &NodeSpec) -> Result<()> {
    let ca = load_ca(dir)?;
    let path = dir.join("cluster.json");
    let mut record: ClusterRecord = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not a keel cluster record", path.display()))?;
    if record
        .nodes
        .iter()
        .any(|m| m.name == node.name || m.ip == node.ip)
    {
        bail!(
            "{}: a member with this name or address is already recorded",
            node.name
        );
    }
    if record.attested {
        bail!(
            "{}: this cluster admits nodes by attestation; adding a machine to it is not supported yet (docs/attestation.md)",
            path.display()
        );
    }
    record.nodes.push(node.clone());
    let cert = issue_for(&ca, node)?;
    let cfg = node_config(
        node,
        &record.nodes,
        "existing",
        &record,
        &ca,
        NodeCreds::Keys(&cert),
    )?;
    write(
        &dir.join(format!("{}.ign", node.name)),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
        0o600,
    )?;
    write(
        &path,
        serde_json::to_string_pretty(&record)?.as_bytes(),
        0o644,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs() {
        let n: NodeSpec = "node1=10.77.0.1/24@52:54:00:4B:00:01".parse().unwrap();
        assert_eq!(
            (n.ip, n.prefix, n.mac.as_deref()),
            (
                Ipv4Addr::new(10, 77, 0, 1),
                Some(24),
                Some("52:54:00:4b:00:01")
            )
        );
        let n: NodeSpec = "a=10.0.0.9".parse().unwrap();
        assert_eq!((n.prefix, n.mac), (None, None));
        for bad in [
            "node1",
            "=1.2.3.4",
            "n=1.2.3",
            "n=1.2.3.4/40",
            "n=1.2.3.4@zz",
            "n=1.2.3.4@52:54:00:4b:00:01",
            "n_1=1.2.3.4",
        ] {
            assert!(bad.parse::<NodeSpec>().is_err(), "{bad}");
        }
        let e = "admin=10.0.0.9".parse::<NodeSpec>().expect_err("reserved");
        assert!(e.contains("the operator's"), "{e}");
    }

    #[test]
    fn configs_pass_the_node_validator() {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<NodeSpec> = [
            "n1=10.77.0.1/24@52:54:00:4b:00:01",
            "n2=10.77.0.2/24@52:54:00:4b:00:02",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        init(
            dir.path(),
            &nodes,
            r#"{"Network":"10.5.0.0/16"}"#,
            &Credentials::InConfig,
        )
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("n2.ign")).unwrap();
        let plan = crate::node::provision::config::parse(text.as_bytes()).unwrap();
        let etcd = plan
            .files
            .iter()
            .find(|f| f.path.ends_with("etcd.env"))
            .unwrap();
        let etcd = String::from_utf8(etcd.contents.clone()).unwrap();
        assert!(
            etcd.contains(
                "ETCD_INITIAL_CLUSTER=n1=https://10.77.0.1:2380,n2=https://10.77.0.2:2380\n"
            ),
            "{etcd}"
        );
        assert!(
            etcd.contains("ETCD_INITIAL_CLUSTER_STATE=new\n")
                && etcd.contains("ETCD_CLIENT_CERT_AUTH=true")
        );
        // A second init into the same directory is refused; add-node extends the cluster.
        assert!(init(
            dir.path(),
            &nodes,
            r#"{"Network":"10.5.0.0/16"}"#,
            &Credentials::InConfig
        )
        .is_err());
        add_node(
            dir.path(),
            &"n3=10.77.0.3/24@52:54:00:4b:00:03".parse().unwrap(),
        )
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("n3.ign")).unwrap();
        let plan = crate::node::provision::config::parse(text.as_bytes()).unwrap();
        let etcd = plan
            .files
            .iter()
            .find(|f| f.path.ends_with("etcd.env"))
            .unwrap();
        let etcd = String::from_utf8(etcd.contents.clone()).unwrap();
        assert!(
            etcd.contains("ETCD_INITIAL_CLUSTER_STATE=existing\n")
                && etcd.contains("n3=https://10.77.0.3:2380"),
            "{etcd}"
        );
        assert!(add_node(dir.path(), &"n3=10.77.0.4".parse().unwrap()).is_err());
        assert!(init(
            tempfile::tempdir().unwrap().path(),
            &nodes,
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#,
            &Credentials::InConfig
        )
        .is_err());
    }
}
