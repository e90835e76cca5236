//! Cluster-wide material made on the operator's machine: TLS for etcd and keel-net.

pub mod admission;
pub mod attested;
pub mod ek;
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
        /// NAME=FILE: the machine's TPM endorsement key (PEM, as `keel-agent ek` or
        /// `keel cluster ek` print it). Given for every node, the cluster admits nodes by TPM
        /// attestation and no config holds a private key (docs/attestation.md).
        #[arg(long = "ek", value_parser = parse_ek)]
        eks: Vec<(String, PathBuf)>,
        /// The first members that hold an issuer and serve the verifier (default: all nodes).
        #[arg(long, value_delimiter = ',')]
        issuers: Vec<String>,
        /// The key directory whose pcr-boot.pub.pem signs the images' boot states (`keel keys
        /// init`); the issuers' keys open only in states it signed.
        #[arg(long)]
        trust_keys: Option<PathBuf>,
        /// Lifetime of the certificates verifiers issue, in seconds (renewed at half).
        #[arg(long, default_value_t = 86400)]
        cert_ttl: u64,
        /// Admit nodes that booted without Secure Boot, or whose firmware db trusts other keys
        /// than the operator's. On such machines anyone who boots their own code can forge a
        /// signed PCR 11 by hand: for test rigs only.
        #[arg(long)]
        allow_secure_boot_off: bool,
        /// Put each node's private key into its config instead (machines without a TPM): anyone
        /// who reads a config holds that node's cluster credentials.
        #[arg(long, conflicts_with_all = ["eks", "issuers", "trust_keys", "allow_secure_boot_off"])]
        keys_in_configs: bool,
    },
    /// Print the endorsement key of a VM's software TPM (state directory DIR, created when
    /// missing) before its first boot, for `--ek`. On a machine, `keel-agent ek` prints it.
    Ek {
        #[arg(long)]
        swtpm_state: PathBuf,
        /// Write the PEM here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Change who is admitted (attested clusters): re-sign DIR/admission.json under the next
    /// serial and write DIR/admission.bundle.json for the verifiers, which take it from etcd
    /// (the printed `etcdctl put`). A removed machine gets no new certificate; the one it holds
    /// lasts until it expires (docs/attestation.md, "Revocation").
    Admission {
        #[arg(long)]
        dir: PathBuf,
        /// Take this machine out of the list.
        #[arg(long)]
        remove: Vec<String>,
        /// Put a removed machine back, as the newest earlier list had it.
        #[arg(long)]
        restore: Vec<String>,
        /// Refuse this PCR 11 value (64 hex digits): a withdrawn image's boot state.
        #[arg(long)]
        deny_pcr11: Vec<String>,
        /// Admit a deny-listed PCR 11 value again.
        #[arg(long)]
        allow_pcr11: Vec<String>,
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

fn parse_ek(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s
        .split_once('=')
        .ok_or_else(|| format!("--ek {s:?}: expected NAME=FILE"))?;
    Ok((name.to_string(), PathBuf::from(file)))
}

fn attest_init(
    nodes: &[init::NodeSpec],
    eks: &[(String, PathBuf)],
    issuers: Vec<String>,
    trust_keys: Option<PathBuf>,
    cert_ttl: u64,
    allow_secure_boot_off: bool,
) -> Result<init::AttestInit> {
    use anyhow::Context;
    let mut map = std::collections::BTreeMap::new();
    for (name, path) in eks {
        let pem = std::fs::read(path)
            .with_context(|| format!("--ek {name}: reading {}", path.display()))?;
        let ek = crate::attest::tpm2::EkPublic::from_pem(&pem)
            .with_context(|| format!("--ek {name}: {}", path.display()))?;
        map.insert(name.clone(), ek);
    }
    let dir = trust_keys.context(
        "--trust-keys: the key directory whose pcr-boot.pub.pem signs the images' boot states",
    )?;
    let boot = dir.join(crate::trust::keys::file::PCR_BOOT_PUB);
    let pem = std::fs::read(&boot).with_context(|| format!("reading {}", boot.display()))?;
    let boot_key = openssl::pkey::PKey::public_key_from_pem(&pem)
        .with_context(|| format!("{}: not a PEM public key", boot.display()))?;
    let issuers = if issuers.is_empty() {
        nodes.iter().map(|n| n.name.clone()).collect()
    } else {
        issuers
    };
    Ok(init::AttestInit {
        eks: map,
        issuers,
        boot_key,
        cert_ttl,
        allow_secure_boot_off,
    })
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
            eks,
            issuers,
            trust_keys,
            cert_ttl,
            allow_secure_boot_off,
            keys_in_configs,
        } => {
            let creds = if keys_in_configs {
                init::Credentials::InConfig
            } else if eks.is_empty() {
                anyhow::bail!(
                    "give --ek NAME=FILE for every node (its TPM endorsement key: `keel-agent ek` on the machine, `keel cluster ek` for a VM's software TPM) so nodes are admitted by attestation, or --keys-in-configs for machines without a TPM (each config then holds that node's private key)"
                );
            } else {
                init::Credentials::Attested(attest_init(
                    &nodes,
                    &eks,
                    issuers,
                    trust_keys,
                    cert_ttl,
                    allow_secure_boot_off,
                )?)
            };
            init::init(&dir, &nodes, &network_config, &creds)?;
            let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            sign_configs(&dir, &names, key.as_ref())?;
            match creds {
                init::Credentials::InConfig => println!(
                    "{}: CA, admin certificate and {} node config(s) written (each holds its node's private key)",
                    dir.display(),
                    nodes.len()
                ),
                init::Credentials::Attested(a) => println!(
                    "{}: CA, admin certificate, admission list (serial 1) and {} node config(s) written; no config holds a private key; issuers (sealed to their TPMs): {}",
                    dir.display(),
                    nodes.len(),
                    a.issuers.join(", ")
                ),
            }
        }
        ClusterCommand::Ek { swtpm_state, out } => {
            let pem = ek::swtpm_ek_pem(&swtpm_state)?;
            match out {
                Some(p) => {
                    init::write(&p, pem.as_bytes(), 0o644)?;
                    println!(
                        "{}: EK of the TPM in {}",
                        p.display(),
                        swtpm_state.display()
                    );
                }
                None => print!("{pem}"),
            }
        }
        ClusterCommand::Admission {
            dir,
            remove,
            restore,
            deny_pcr11,
            allow_pcr11,
        } => {
            let old = admission::current(&dir)?;
            let new = admission::change(
                &dir,
                &admission::Change {
                    remove,
                    restore,
                    deny_pcr11,
                    allow_pcr11,
                },
            )?;
            print!("{}", admission::summary(&dir, &old, &new));
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
        init::init(
            &out,
            &nodes,
            r#"{"Network":"10.5.0.0/16"}"#,
            &init::Credentials::InConfig,
        )
        .expect("init");
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
