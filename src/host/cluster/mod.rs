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
    },
    /// Issue DIR/NAME.ign for a new member joining the cluster in DIR; run
    /// `etcdctl member add NAME --peer-urls=https://IP:2380` on the cluster first.
    AddNode {
        #[arg(long)]
        dir: PathBuf,
        /// NAME=IP[/PREFIX][@MAC]
        #[arg(long = "node")]
        node: crate::host::cluster::init::NodeSpec,
    },
}

/// `keel cluster …`.
pub fn command(c: ClusterCommand) -> Result<()> {
    match c {
        ClusterCommand::Init {
            dir,
            nodes,
            network_config,
        } => {
            init::init(&dir, &nodes, &network_config)?;
            println!(
                "{}: CA, admin certificate and {} node config(s) written",
                dir.display(),
                nodes.len()
            );
        }
        ClusterCommand::AddNode { dir, node } => {
            init::add_node(&dir, &node)?;
            println!(
                "{}/{}.ign written (state existing)",
                dir.display(),
                node.name
            );
        }
    }
    Ok(())
}
