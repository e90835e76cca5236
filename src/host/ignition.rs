//! Ignition configs on the operator's machine: `keel ignition validate` (the node's own parser)
//! and `keel embed-config`, which puts a config on a built image's ESP (`keel/config.ign`) for
//! machines that have no fw_cfg (bare metal, clouds without user data), like
//! `coreos-installer iso customize`. The config is checked first; in a build directory the
//! qcow2 is made again from the changed raw image and the manifest's checksums are updated.

use anyhow::{Context, Result};
use clap::Subcommand;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum IgnitionCommand {
    /// Parse and check a config (spec 3.0–3.6) with the node's code: every unsupported or bad
    /// field is named. Exit status 1 on error.
    Validate { file: PathBuf },
}

/// `keel embed-config`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbedArgs {
    /// A .raw image or a build output directory.
    pub image: PathBuf,
    pub config: PathBuf,
    /// Sign the config with this container-signing key (PEM, ECDSA P-256): trusted images
    /// apply an ESP config only when a key of their policy signed it. Without it, CONFIG.sig
    /// (made by `keel cluster init --key`) is used when it is there.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Embed the config without a signature (for images built with
    /// [trust] unsigned-esp-configs = true, or without [trust]).
    #[arg(long, conflicts_with = "key")]
    pub unsigned: bool,
}

/// The signature to put next to an embedded config: made with `key`, or read from CONFIG.sig.
fn embed_signature(a: &EmbedArgs, bytes: &[u8]) -> Result<Option<String>> {
    if a.unsigned {
        return Ok(None);
    }
    if let Some(k) = &a.key {
        return Ok(Some(sign_config(
            bytes,
            &crate::host::container::private_key(k)?,
        )?));
    }
    let beside = crate::container::policy::sig_path(&a.config);
    match fs::read_to_string(&beside) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(_) => anyhow::bail!(
            "{}: no signature: pass --key KEYDIR/container-signing.key (trusted images apply only signed ESP configs), or --unsigned for an image that allows unsigned ones",
            a.config.display()
        ),
    }
}

/// The signature of a config for an ESP (over
/// [`crate::node::provision::source::signed_payload`]), as base64 text.
pub fn sign_config(
    bytes: &[u8],
    key: &openssl::pkey::PKey<openssl::pkey::Private>,
) -> Result<String> {
    Ok(crate::container::signature::sign(
        &crate::node::provision::source::signed_payload(bytes),
        key,
    )?)
}

/// Signs `config` for an ESP and writes `CONFIG.sig` (what `keel cluster init --key` gives each
/// node's config).
pub fn write_config_signature(
    config: &Path,
    bytes: &[u8],
    key: &openssl::pkey::PKey<openssl::pkey::Private>,
) -> Result<()> {
    let sig = sign_config(bytes, key)?;
    let p = crate::container::policy::sig_path(config);
    crate::atomic::write(&p, format!("{sig}\n").as_bytes(), 0o600)
        .map_err(|e| anyhow::anyhow!("{}", crate::error::chain(&e)))
}

/// `keel ignition …`.
pub fn command(c: IgnitionCommand) -> Result<()> {
    match c {
        IgnitionCommand::Validate { file } => {
            let bytes = fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let p = crate::node::provision::config::parse(&bytes)
                .with_context(|| file.display().to_string())?;
            println!(
                "{}: valid (spec {}, sha256 {}): files {}, directories {}, links {}, units {}, users {}, groups {}",
                file.display(), p.version, p.sha256, p.files.len(), p.directories.len(), p.links.len(), p.units.len(), p.users.len(), p.groups.len()
            );
            Ok(())
        }
    }
}

pub fn embed(a: &EmbedArgs) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (image, config) = (&a.image, &a.config);
    let bytes = fs::read(config).with_context(|| format!("reading {}", config.display()))?;
    let plan = crate::node::provision::config::parse(&bytes)
        .with_context(|| config.display().to_string())?;
    let resolved = crate::host::boot::resolve_image(&image.display().to_string(), true)?;
    let raw = &resolved.disk;
    if raw.extension().is_some_and(|e| e != "raw") {
        anyhow::bail!(
            "{}: embed-config changes raw images (give the .raw or its build directory)",
            raw.display()
        );
    }
    let sig = embed_signature(a, &bytes)?;
    // The disk now carries the config (and whatever secrets it holds): its owner's only.
    fs::set_permissions(raw, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", raw.display()))?;
    crate::disk::esp::write_file(raw, crate::node::provision::source::ESP_PATH, &bytes)?;
    match &sig {
        Some(s) => crate::disk::esp::write_file(
            raw,
            crate::node::provision::source::ESP_SIG_PATH,
            format!("{s}\n").as_bytes(),
        )?,
        None => {
            // A signature left from an earlier config would not match this one.
            let esp = crate::disk::esp::Esp::open(raw, true)?;
            let _ = esp.remove(crate::node::provision::source::ESP_SIG_PATH);
            esp.close()?;
        }
    }
    println!(
        "wrote {} on the ESP of {} (config sha256 {}, {})",
        crate::node::provision::source::ESP_PATH,
        raw.display(),
        plan.sha256,
        if sig.is_some() { "signed" } else { "unsigned" }
    );
    let (Some(dir), Some(mut m)) = (resolved.dir, resolved.manifest) else {
        return Ok(());
    };
    let qcow2 = dir.join(format!("{}.qcow2", m.name));
    if qcow2.exists() {
        let cache = crate::host::cache::Cache::from_env()?;
        let tools =
            crate::host::tools::ToolsTree::ensure(&cache, crate::image::DEFAULT_MIRROR)?.bind(&dir);
        crate::host::render::disk::to_qcow2(&tools, raw, &qcow2)?;
        fs::set_permissions(&qcow2, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", qcow2.display()))?;
        println!("made {} again", qcow2.display());
    }
    for a in &mut m.artifacts {
        let p = dir.join(&a.file);
        if let Ok(f) = fs::File::open(&p) {
            let mut h = Sha256::new();
            let mut r = std::io::BufReader::new(f);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            a.sha256 = hex::encode(h.finalize());
            a.size = fs::metadata(&p)?.len();
        }
    }
    let mp = dir.join(crate::manifest::MANIFEST_FILE);
    crate::atomic::write(&mp, &serde_json::to_vec_pretty(&m)?, 0o644)?;
    Ok(())
}
