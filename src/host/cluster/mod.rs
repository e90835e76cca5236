//! Cluster-wide material made on the operator's machine: TLS for etcd and keel-net.

pub mod init;
pub mod pki;

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a CA, an admin client certificate and one Ignition config per node (DIR/NAME.ign).
    Init {
        /// Output directory (must not hold a cluster yet); keep it: it holds the CA key.
        #[arg(long)]
        dir: PathBuf,
        /// NAME=IP[/PREFIX][@MAC]; with @MAC the node gets IP/PREFIX statically on that NIC.
        #[arg(long = "node", required = true)]
        nodes: Vec<crate::host::cluster::init::NodeSpec>,
        /// The overlay's network config (flannel's format), stored in etcd by the first node.
        #[arg(
            long,
            default_value = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#
        )]
        network_config: String,
        /// Also sign each NAME.ign for an ESP (NAME.ign.sig) with this container-signing key,
        /// which `keel embed-config` puts next to it: trusted images apply only signed ESP
        /// configs.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Issue DIR/NAME.ign for a new member joining the cluster in DIR; run
    /// `etcdctl member add NAME --peer-urls=https://IP:2380` on the cluster first.
    AddNode {
        #[arg(long)]
        dir: PathBuf,
        /// NAME=IP[/PREFIX][@MAC]
        #[arg(long = "node")]
        node: crate::host::cluster::init::NodeSpec,
        /// Sign NAME.ign for an ESP (NAME.ign.sig) with this container-signing key.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

/// Signs DIR/NAME.ign with `key`, when one is given.
fn sign_configs(dir: &std::path::Path, names: &[&str], key: Option<&PathBuf>) -> Result<()> {
    use anyhow::Context;
    let Some(k) = key else { return Ok(()) };
    let pem = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
    let key = openssl::pkey::PKey::private_key_from_pem(&pem)
        .with_context(|| format!("{}: not a PEM private key", k.display()))?;
    for n in names {
        let p = dir.join(format!("{n}.ign"));
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        crate::host::ignition::write_config_signature(&p, &bytes, &key)?;
    }
    Ok(())
}

/// `keel cluster …`.
pub fn command(c: ClusterCommand) -> Result<()> {
    match c {
        ClusterCommand::Init {
            dir,
            nodes,
            network_config,
            key,
        } => {
            init::init(&dir, &nodes, &network_config)?;
            let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            sign_configs(&dir, &names, key.as_ref())?;
            println!(
                "{}: CA, admin certificate and {} node config(s) written",
                dir.display(),
                nodes.len()
            );
        }
        ClusterCommand::AddNode { dir, node, key } => {
            init::add_node(&dir, &node)?;
            sign_configs(&dir, &[node.name.as_str()], key.as_ref())?;
            println!(
                "{}/{}.ign written (state existing)",
                dir.display(),
                node.name
            );
        }
    }
    Ok(())
}
