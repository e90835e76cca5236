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
}

/// `keel keys …`.
pub fn command(c: KeysCommand) -> Result<()> {
    match c {
        KeysCommand::Init { dir, label } => {
            crate::trust::keys::init(&dir, &label)?;
            println!(
                "created keys in {}: keep the *.key files secret (mode 0600); name the directory in an image definition as [trust] keys = \"...\"",
                dir.display()
            );
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
