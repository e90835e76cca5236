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
    let key = crate::host::container::private_key(k)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Review H1 (interim, until node keys are made on the node): a node's config, which holds
    /// its etcd key, is its owner's only, and `--key` signs it for an ESP so a node applies it
    /// there and nothing else; a changed config no longer verifies.
    #[test]
    fn cluster_configs_are_private_and_signed_for_the_esp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let nodes: Vec<init::NodeSpec> = ["n1=10.77.0.1/24@52:54:00:4b:00:01"]
            .iter()
            .map(|s| s.parse().expect("spec"))
            .collect();
        let out = dir.path().join("cluster");
        init::init(&out, &nodes, r#"{"Network":"10.5.0.0/16"}"#).expect("init");
        let key = crate::container::signature::generate_key().expect("key");
        let key_file = dir.path().join("container-signing.key");
        std::fs::write(&key_file, key.private_key_to_pem_pkcs8().expect("pem")).expect("key");
        sign_configs(&out, &["n1"], Some(&key_file)).expect("signed");
        let ign = out.join("n1.ign");
        let mode = std::fs::metadata(&ign).expect("ign").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let bytes = std::fs::read(&ign).expect("ign");
        let sig = std::fs::read_to_string(out.join("n1.ign.sig")).expect("sig");
        let trusted = [crate::container::signature::TrustedKey::from_pem(
            "ops",
            &key.public_key_to_pem().expect("pem"),
        )
        .expect("trusted")];
        let payload = crate::node::provision::source::signed_payload(&bytes);
        assert!(crate::container::policy::verify_blob(
            &payload, &sig, &trusted
        ));
        let mut changed = bytes.clone();
        changed.push(b' ');
        let payload = crate::node::provision::source::signed_payload(&changed);
        assert!(!crate::container::policy::verify_blob(
            &payload, &sig, &trusted
        ));
    }
}
