//! `keel keys …`: the operator's signing keys (see `trust::keys` and docs/trusted-boot.md).

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a new key directory: PK, KEK, db (key + certificate), the PCR policy keys for the
    /// initrd and for the running system, and the EFI owner GUID. Private keys are mode 0600.
    Init {
        dir: PathBuf,
        /// Names the owner in certificate subjects.
        #[arg(long, default_value = "Keel operator")]
        label: String,
    },
    /// Add the container-signing key (ECDSA P-256) to a key directory made before keel had it.
    AddContainerKey { dir: PathBuf },
    /// Add the recovery escrow key (RSA-3072) to a key directory made before keel had it.
    AddRecoveryKey { dir: PathBuf },
    /// Add the update repository keys (tuf/: root, targets, snapshot, timestamp and root.json)
    /// to a key directory made before keel had them.
    AddUpdateKeys { dir: PathBuf },
    /// Decrypt a node's escrowed recovery key (its /var/lib/keel/recovery-key.escrow) with the
    /// key directory's recovery key, and print it.
    Recover {
        /// The key directory.
        #[arg(long)]
        keys: PathBuf,
        /// The escrow file copied from the node.
        file: PathBuf,
    },
}

/// `keel keys …`.
pub fn command(c: KeysCommand) -> Result<()> {
    match c {
        KeysCommand::Init { dir, label } => {
            crate::trust::keys::init(&dir, &label)?;
            crate::host::publish::keys::ensure(&dir)?;
            println!(
                "created keys in {}: keep the *.key files secret (mode 0600); name the directory in an image definition as [trust] keys = \"...\"",
                dir.display()
            );
        }
        KeysCommand::AddRecoveryKey { dir } => {
            if crate::trust::keys::ensure_recovery_key(&dir)? {
                println!("created {}/recovery.key and .pub.pem", dir.display());
            } else {
                println!("{} already has a recovery key; kept it", dir.display());
            }
        }
        KeysCommand::AddUpdateKeys { dir } => {
            if crate::host::publish::keys::ensure(&dir)? {
                println!(
                    "created {}/tuf: keep tuf/root.key offline once the repository exists",
                    dir.display()
                );
            } else {
                println!("{} already has update keys; kept them", dir.display());
            }
        }
        KeysCommand::Recover { keys, file } => {
            use anyhow::Context;
            let k = crate::trust::keys::recovery_key(&keys)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let secret = crate::trust::escrow::open(&k, &text)
                .with_context(|| format!("decrypting {}", file.display()))?;
            println!("{secret}");
        }
        KeysCommand::AddContainerKey { dir } => {
            if crate::trust::keys::ensure_container_key(&dir)? {
                println!(
                    "created {}/container-signing.key and .pub.pem",
                    dir.display()
                );
            } else {
                println!(
                    "{} already has a container-signing key; kept it",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}
