//! `keel container …` and `keel machines …`: the operator's side of signed containers.

use crate::container::{build, oci, policy, signature};
use anyhow::{Context, Result};
use clap::Subcommand;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// Make an OCI image layout whose one layer is a directory tree.
    Build {
        /// The directory that becomes the container's root.
        #[arg(long)]
        from_tree: PathBuf,
        /// Output layout directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Also write an oci-archive (tar) of the layout here, for nodes' spool directories.
        #[arg(long)]
        archive: Option<PathBuf>,
        /// Environment variables (KEY=VALUE), repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        entrypoint: Vec<String>,
    },
    /// Sign an image layout with a container-signing key (stored in the layout as cosign does).
    Sign {
        image: PathBuf,
        /// PEM private key (ECDSA P-256), e.g. KEYDIR/container-signing.key.
        #[arg(long)]
        key: PathBuf,
        /// The reference named in the payload.
        #[arg(long, default_value = "keel/local")]
        reference: String,
        /// Also write an oci-archive (tar) of the signed layout here.
        #[arg(long)]
        archive: Option<PathBuf>,
    },
    /// Print the simple-signing payload of an image, to sign with `cosign sign-blob --key`.
    Payload {
        image: PathBuf,
        #[arg(long, default_value = "keel/local")]
        reference: String,
    },
    /// Store a signature made with cosign (`cosign sign-blob` over `keel container payload`).
    Attach {
        image: PathBuf,
        #[arg(long)]
        payload: PathBuf,
        /// File with the base64 signature cosign printed.
        #[arg(long)]
        signature: PathBuf,
        #[arg(long)]
        archive: Option<PathBuf>,
    },
    /// Check an image's signature and digests with public keys, as a node would.
    Verify {
        image: PathBuf,
        /// PEM public keys (cosign.pub or container-signing.pub.pem), repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// Add a machine (its EK hash from `keel-agent ek-hash`) and sign the list again.
    Add {
        /// The list (created when missing); its signature goes to LIST.sig.
        #[arg(long)]
        list: PathBuf,
        /// Container-signing private key.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        name: String,
        /// sha256:<hex>, as `keel-agent ek-hash` prints it.
        #[arg(long)]
        ek: String,
        /// The cluster the list is for (the image's `[containers] cluster`, by default its
        /// name); needed when the list is new, checked when it exists.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Remove a machine by name or EK hash and sign the list again.
    Remove {
        #[arg(long)]
        list: PathBuf,
        #[arg(long)]
        key: PathBuf,
        what: String,
    },
    /// Print a list after checking its signature.
    List {
        #[arg(long)]
        list: PathBuf,
        /// Public key to check the signature with.
        #[arg(long = "pub")]
        public: PathBuf,
    },
}

pub(crate) fn private_key(p: &Path) -> Result<openssl::pkey::PKey<openssl::pkey::Private>> {
    let pem = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    let k = openssl::pkey::PKey::private_key_from_pem(&pem)
        .with_context(|| format!("{}: not a PEM private key (cosign's encrypted keys: sign with `cosign sign-blob` and use `keel container attach`)", p.display()))?;
    let ec = k
        .ec_key()
        .with_context(|| format!("{}: not an ECDSA key", p.display()))?;
    if ec.group().curve_name() != Some(openssl::nid::Nid::X9_62_PRIME256V1) {
        anyhow::bail!("{}: not a P-256 key", p.display());
    }
    Ok(k)
}

fn public_keys(paths: &[std::path::PathBuf]) -> Result<Vec<signature::TrustedKey>> {
    paths
        .iter()
        .map(|p| {
            let pem = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            signature::TrustedKey::from_pem(&p.display().to_string(), &pem)
                .with_context(|| p.display().to_string())
        })
        .collect()
}

fn archive(image: &Path, to: Option<&Path>) -> Result<()> {
    if let Some(a) = to {
        oci::write_archive(&oci::Layout::open(image)?, a)?;
        println!("wrote {}", a.display());
    }
    Ok(())
}

pub fn run(c: ContainerCommand) -> Result<()> {
    match c {
        ContainerCommand::Build {
            from_tree,
            out,
            archive: a,
            env,
            entrypoint,
        } => {
            let d = build::from_tree(&from_tree, &out, &entrypoint, &env)?;
            println!("built {} (manifest {d})", out.display());
            archive(&out, a.as_deref())
        }
        ContainerCommand::Sign {
            image,
            key,
            reference,
            archive: a,
        } => {
            let d = build::sign(&image, &private_key(&key)?, &reference)?;
            println!("signed {d} with {}", key.display());
            archive(&image, a.as_deref())
        }
        ContainerCommand::Payload { image, reference } => {
            let p = build::payload(&oci::Layout::open(&image)?, &reference)?;
            use std::io::Write;
            std::io::stdout().write_all(&p)?;
            Ok(())
        }
        ContainerCommand::Attach {
            image,
            payload,
            signature: sig,
            archive: a,
        } => {
            let p = fs::read(&payload).with_context(|| format!("reading {}", payload.display()))?;
            let s =
                fs::read_to_string(&sig).with_context(|| format!("reading {}", sig.display()))?;
            let d = build::attach(&image, &p, &s)?;
            println!("attached the signature for {d}");
            archive(&image, a.as_deref())
        }
        ContainerCommand::Verify { image, keys } => {
            let scratch = tempfile::tempdir()?;
            let layout = build::open(&image, scratch.path())?;
            let v = oci::verify(&layout, &public_keys(&keys)?)?;
            println!(
                "verified {}: signed by {} for `{}`, {} layer(s), digests match",
                v.manifest_digest,
                v.signed_by,
                v.reference,
                v.layers.len()
            );
            Ok(())
        }
    }
}

pub fn machines(c: MachinesCommand) -> Result<()> {
    match c {
        MachinesCommand::Add {
            list,
            key,
            name,
            ek,
            cluster,
        } => {
            let k = private_key(&key)?;
            let mut m = load_own(&list, &k)?;
            match (&cluster, m.cluster.is_empty()) {
                (None, true) => anyhow::bail!(
                    "{}: a new list needs --cluster NAME (the image's [containers] cluster, by default the image's name): nodes refuse a list for another cluster",
                    list.display()
                ),
                (Some(c), true) => m.cluster = c.clone(),
                (Some(c), false) if *c != m.cluster => anyhow::bail!(
                    "{}: the list is for cluster `{}`, not `{c}`",
                    list.display(),
                    m.cluster
                ),
                _ => {}
            }
            m.add(&name, &ek).map_err(anyhow::Error::msg)?;
            policy::write_signed(&list, &m, &k)?;
            println!(
                "{}: {} machine(s), serial {}; signed ({})",
                list.display(),
                m.machines.len(),
                m.serial,
                policy::sig_path(&list).display()
            );
            Ok(())
        }
        MachinesCommand::Remove { list, key, what } => {
            let k = private_key(&key)?;
            let mut m = load_own(&list, &k)?;
            if !m.remove(&what) {
                anyhow::bail!("{}: no machine named or with EK `{what}`", list.display());
            }
            policy::write_signed(&list, &m, &k)?;
            println!("{}: removed {what}; serial {}", list.display(), m.serial);
            Ok(())
        }
        MachinesCommand::List { list, public } => {
            let keys = public_keys(&[public])?;
            let m = policy::read_signed(&list, &keys)?
                .with_context(|| format!("{}: no such file", list.display()))?;
            println!("cluster {}, serial {}", m.cluster, m.serial);
            for x in &m.machines {
                println!("{:<24} {}", x.name, x.ek_sha256);
            }
            Ok(())
        }
    }
}

/// The list at `path` (empty when missing), its signature checked with the key's public half.
fn load_own(
    path: &Path,
    k: &openssl::pkey::PKey<openssl::pkey::Private>,
) -> Result<policy::Machines> {
    let pem = k.public_key_to_pem()?;
    let keys = [signature::TrustedKey::from_pem("key", &pem)?];
    Ok(policy::read_signed(path, &keys)?.unwrap_or_default())
}
