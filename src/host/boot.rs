//! `keel boot`: run an image in QEMU with OVMF and a fresh software TPM, on a throwaway overlay
//! (or a kept one), with the console on the terminal or in a file. Everything keel started is
//! stopped, and its temporary files removed, when QEMU exits, on Ctrl-C or on error.

use crate::host::build::{self, BuildOptions};
use crate::host::qemu::cmdline::{Firmware, NetSpec, VmSpec};
use crate::host::qemu::vm::{create_overlay, require_file, virtual_size, Vm};
use crate::manifest::Manifest;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// An image to run: its disk file and, when it came from a build, the manifest.
pub struct ResolvedImage {
    pub disk: PathBuf,
    pub dir: Option<PathBuf>,
    pub manifest: Option<Manifest>,
}

/// Resolves a disk file, a build directory, or an image name from `images/` (built first unless
/// `no_build`).
pub fn resolve_image(spec: &str, no_build: bool) -> Result<ResolvedImage> {
    let p = Path::new(spec);
    if p.is_dir() {
        let m = Manifest::find(p)?;
        let disk = p.join(format!("{}.raw", m.name));
        let disk = if disk.exists() {
            disk
        } else {
            p.join(format!("{}.qcow2", m.name))
        };
        return Ok(ResolvedImage {
            disk,
            dir: Some(p.to_path_buf()),
            manifest: Some(m),
        });
    }
    if p.is_file() {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "raw" && ext != "qcow2" && ext != "img" {
            bail!("{spec} is not a disk image (.raw or .qcow2) nor a build directory");
        }
        let dir = p.parent().map(Path::to_path_buf);
        let manifest = dir.as_ref().and_then(|d| Manifest::find(d).ok());
        return Ok(ResolvedImage {
            disk: p.to_path_buf(),
            dir,
            manifest,
        });
    }
    let def = PathBuf::from("images").join(format!("{spec}.toml"));
    if !def.exists() {
        bail!(
            "`{spec}` is neither a disk image, a build directory, nor an image in images/ (no {})",
            def.display()
        );
    }
    let out = build::default_out(spec);
    if !no_build {
        build::build(&BuildOptions {
            out: Some(out.clone()),
            ..BuildOptions::of(def)
        })?;
    } else if !out.join(crate::manifest::MANIFEST_FILE).exists() {
        bail!(
            "{spec} has not been built yet (no {}): drop --no-build",
            out.display()
        );
    }
    resolve_image(&out.display().to_string(), true)
}

#[derive(Debug, Clone, clap::Args)]
pub struct BootOptions {
    /// An image name from images/ (built first), a build directory, or a .raw/.qcow2 file.
    #[arg(default_value = "cluster-node")]
    pub image: String,
    /// Use the existing build of an image name instead of building it.
    #[arg(long)]
    pub no_build: bool,
    /// Write the serial console to FILE instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// Keep the VM's disk (a qcow2 overlay) at PATH and reuse it on the next boot.
    #[arg(long, value_name = "PATH")]
    pub persist: Option<PathBuf>,
    /// Keep the software TPM's state in DIR (default: a fresh TPM per boot).
    #[arg(long, value_name = "DIR")]
    pub tpm_state: Option<PathBuf>,
    /// Ignition config passed to the guest as fw_cfg opt/com.coreos/config.
    #[arg(long, value_name = "FILE")]
    pub ignition: Option<PathBuf>,
    /// Forward a host TCP port to the guest, HOST:GUEST (repeatable).
    #[arg(long = "forward", value_name = "HOST:GUEST", value_parser = parse_forward)]
    pub forwards: Vec<(u16, u16)>,
    /// Memory of the VM in MiB.
    #[arg(long = "memory", default_value_t = 2048)]
    pub memory_mib: u32,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// kvm or tcg (default: probe KVM, fall back to tcg).
    #[arg(long, value_parser = ["kvm", "tcg"])]
    pub accel: Option<String>,
    /// GiB of disk beyond the image, for the root partition created on first boot.
    #[arg(long, default_value_t = 6)]
    pub disk_gib: u64,
    /// Secure Boot on, with the image's PK/KEK/db enrolled in the VM's firmware variables.
    #[arg(long)]
    pub secure_boot: bool,
}

/// Firmware and a fresh variable store for a VM in `dir`: plain OVMF, or the Secure Boot build
/// with the image's PK/KEK/db enrolled.
pub fn firmware_for(
    manifest: Option<&Manifest>,
    secure_boot: bool,
    dir: &Path,
) -> Result<(Firmware, PathBuf)> {
    let vars = dir.join("OVMF_VARS.fd");
    if !secure_boot {
        std::fs::copy(Firmware::VARS, &vars)
            .with_context(|| format!("copying {}", Firmware::VARS))?;
        return Ok((Firmware::debian(), vars));
    }
    require_file(Path::new(Firmware::CODE_SECBOOT), "ovmf")?;
    let certs = manifest
        .and_then(|m| m.trust.as_ref())
        .map(|t| &t.secure_boot)
        .context("--secure-boot needs an image built with a [trust] table (its manifest names the keys to enrol)")?;
    let cache = crate::host::cache::Cache::from_env()?;
    let tools = crate::host::tools::ToolsTree::ensure(&cache, crate::image::DEFAULT_MIRROR)?;
    crate::host::qemu::firmware::enroll(
        &tools,
        Path::new(Firmware::VARS),
        certs,
        &dir.join("sb-enroll"),
        &vars,
    )?;
    Ok((Firmware::debian_secure_boot(), vars))
}

/// Parses `HOST:GUEST` port forwards.
pub fn parse_forward(s: &str) -> Result<(u16, u16)> {
    let (h, g) = s
        .split_once(':')
        .with_context(|| format!("`{s}` is not HOST:GUEST (e.g. 2222:22)"))?;
    Ok((
        h.parse().with_context(|| format!("`{h}` is not a port"))?,
        g.parse().with_context(|| format!("`{g}` is not a port"))?,
    ))
}

pub fn boot(opts: &BootOptions) -> Result<()> {
    let image = resolve_image(&opts.image, opts.no_build)?;
    require_file(Path::new(Firmware::CODE), "ovmf")?;
    require_file(Path::new(Firmware::VARS), "ovmf")?;
    if let Some(i) = &opts.ignition {
        if !i.is_file() {
            bail!("--ignition {}: no such file", i.display());
        }
    }
    let interrupted = crate::host::qemu::interrupt_flag()?;
    let tmp = tempfile::Builder::new()
        .prefix("keel-boot-")
        .tempdir()
        .context("creating a temporary VM directory")?;
    let overlay = match &opts.persist {
        Some(p) => p.clone(),
        None => tmp.path().join("disk.qcow2"),
    };
    if !overlay.exists() {
        let size = virtual_size(&image.disk)? + (opts.disk_gib << 30);
        create_overlay(&image.disk, &overlay, size)?;
        if opts.persist.is_some() {
            eprintln!(
                "keel: keeping the VM disk in {} (the built image stays untouched)",
                overlay.display()
            );
        }
    } else {
        eprintln!("keel: reusing the VM disk {}", overlay.display());
    }
    let (firmware, vars) = firmware_for(image.manifest.as_ref(), opts.secure_boot, tmp.path())?;
    let tpm = opts
        .tpm_state
        .clone()
        .unwrap_or_else(|| tmp.path().join("tpm"));
    let choice = crate::host::qemu::accel::choose(opts.accel.as_deref())?;
    eprintln!("keel: acceleration {}: {}", choice.accel, choice.reason);
    let spec = VmSpec {
        name: image
            .manifest
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_else(|| "keel".into()),
        accel: choice.accel,
        memory_mib: opts.memory_mib,
        cpus: opts.cpus,
        firmware,
        vars,
        disk: overlay,
        swtpm_socket: Some(tmp.path().join("swtpm.sock")),
        console: opts.console.clone(),
        console_input: None,
        qga_socket: Some(tmp.path().join("qga.sock")),
        qmp_socket: Some(tmp.path().join("qmp.sock")),
        ignition: opts.ignition.clone(),
        nets: vec![NetSpec::User {
            forwards: opts.forwards.clone(),
        }],
        incoming: false,
        rtc_base: None,
    };
    match &opts.console {
        None => eprintln!(
            "keel: booting {}; console on this terminal (Ctrl-A X quits)",
            image.disk.display()
        ),
        Some(c) => eprintln!(
            "keel: booting {}; console in {} (Ctrl-C stops)",
            image.disk.display(),
            c.display()
        ),
    }
    let mut vm = Vm::start(spec, &tpm)?;
    let status = vm.wait(interrupted)?;
    drop(vm);
    match status {
        None => eprintln!("keel: stopped"),
        Some(s) if s.success() => {}
        Some(s) => bail!("QEMU exited with {s}"),
    }
    Ok(())
}
