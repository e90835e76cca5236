//! The GPT disk image: ESP with systemd-boot and the UKI, usr slot A with its verity partition,
//! and an empty slot B, written by systemd-repart offline from the tools tree.

use crate::disk::layout::PartitionDef;
use crate::disk::uki::factory_uki_name;
use crate::host::tools::{run, run_capture, ToolsTree};
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;

pub const LOADER_CONF: &str = "timeout 0\neditor no\nconsole-mode keep\n";

/// Lays out the ESP directory: systemd-boot as the removable-media loader and under
/// EFI/systemd, the UKI under EFI/Linux (no boot counter: nothing to fall back to), and loader.conf.
pub fn prepare_esp(
    tools: &ToolsTree,
    esp: &Path,
    uki: &Path,
    version: &str,
    epoch: u64,
    keys: Option<&crate::trust::Keys>,
) -> Result<()> {
    let mut sdboot = tools.file("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if let Some(k) = keys {
        // Signed next to the ESP directory (in the build's work dir), then copied in.
        let signed = esp.with_extension("systemd-bootx64.signed.efi");
        // sbsign runs inside the tools tree, where systemd-boot has its plain path.
        super::uki::sbsign(
            tools,
            k,
            Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
            &signed,
        )?;
        sdboot = signed;
    }
    for dir in ["EFI/BOOT", "EFI/systemd", "EFI/Linux", "loader"] {
        fs::create_dir_all(esp.join(dir))
            .with_context(|| format!("creating {}/{dir}", esp.display()))?;
    }
    fs::copy(&sdboot, esp.join("EFI/BOOT/BOOTX64.EFI"))
        .with_context(|| format!("copying {}", sdboot.display()))?;
    fs::copy(&sdboot, esp.join("EFI/systemd/systemd-bootx64.efi"))
        .with_context(|| format!("copying {}", sdboot.display()))?;
    fs::copy(uki, esp.join("EFI/Linux").join(factory_uki_name(version)))
        .context("copying the UKI into the ESP")?;
    fs::write(esp.join("loader/loader.conf"), LOADER_CONF).context("writing loader.conf")?;
    // FAT directory entries carry times; mcopy takes them from the files, so pin them.
    set_times(esp, epoch)
}

/// Sets the modification and access time of everything under `dir` (itself included) to `epoch`.
pub fn set_times(dir: &Path, epoch: u64) -> Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(i64::try_from(epoch).context("epoch out of range")?, 0);
    for entry in walkdir::WalkDir::new(dir).contents_first(true) {
        let entry = entry.with_context(|| format!("walking {}", dir.display()))?;
        utimensat(
            nix::fcntl::AT_FDCWD,
            entry.path(),
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .with_context(|| format!("setting times of {}", entry.path().display()))?;
    }
    Ok(())
}

/// Writes the repart definitions into `defs` and runs systemd-repart to create `disk`.
/// `seed` makes the disk GUID and the UUIDs repart picks reproducible.
pub fn write_disk(
    tools: &ToolsTree,
    parts: &[PartitionDef],
    defs: &Path,
    disk: &Path,
    seed: &str,
) -> Result<String> {
    fs::create_dir_all(defs).with_context(|| format!("creating {}", defs.display()))?;
    for p in parts {
        fs::write(defs.join(&p.file), p.to_repart())
            .with_context(|| format!("writing {}", p.file))?;
    }
    crate::host::cache::remove_path(disk)?;
    let out = run_capture(
        tools
            .command("systemd-repart")?
            .arg("--offline=yes")
            .arg("--sector-size=512")
            .arg("--empty=create")
            .arg("--size=auto")
            .arg(format!("--seed={seed}"))
            .arg(format!("--definitions={}", defs.display()))
            .arg("--dry-run=no")
            .arg("--json=short")
            .arg(disk),
    )
    .context("writing the disk image with systemd-repart")?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Converts the raw disk to qcow2.
pub fn to_qcow2(tools: &ToolsTree, raw: &Path, qcow2: &Path) -> Result<()> {
    run(tools
        .command("qemu-img")?
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow2))
    .context("converting the disk image to qcow2")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn times_are_pinned_recursively() {
        let t = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(t.path().join("EFI/Linux")).expect("mkdir");
        fs::write(t.path().join("EFI/Linux/a.efi"), "x").expect("write");
        set_times(t.path(), 1_000_000).expect("set");
        for p in ["", "EFI", "EFI/Linux", "EFI/Linux/a.efi"] {
            assert_eq!(
                fs::metadata(t.path().join(p)).expect("meta").mtime(),
                1_000_000,
                "{p}"
            );
        }
    }
}
