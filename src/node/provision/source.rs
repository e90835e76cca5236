//! Where a node's Ignition config comes from, in this order: QEMU's fw_cfg entry
//! `opt/com.coreos/config` (as Fedora CoreOS reads it; set by whoever runs the hypervisor), then
//! `keel/config.ign` on the EFI system partition of the disk the machine booted from (written by
//! `keel build --ignition` or `keel embed-config`).
//!
//! An ESP is a FAT file system anyone holding the disk can write, so a config found there is
//! used only when `keel/config.ign.sig` next to it is the operator's signature over it (a
//! container-signing key of the image's policy, over [`signed_payload`]), or when the image
//! allows unsigned ESP configs (`/usr/lib/keel/provisioning.json`, written by `keel build`). Once
//! applied, the config and its signature are removed from the ESP: what it carries (keys, hashes)
//! does not stay readable on the disk.

use crate::container::signature::TrustedKey;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The fw_cfg file QEMU's `-fw_cfg name=opt/com.coreos/config,file=...` creates.
pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/com.coreos/config/raw";
/// The config's path on the ESP, and its signature's.
pub const ESP_PATH: &str = "keel/config.ign";
pub const ESP_SIG_PATH: &str = "keel/config.ign.sig";
/// What the image says about ESP configs (relative to the node's root).
pub const SETTINGS: &str = "usr/lib/keel/provisioning.json";
/// systemd-boot's variable naming the partition it was started from.
pub const LOADER_DEVICE_PART_UUID: &str =
    "/sys/firmware/efi/efivars/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// What the signature covers: this prefix, then the config's bytes (so no image or list
/// signature made with the same key can pass for a config signature, nor the reverse).
const PAYLOAD_PREFIX: &[u8] = b"keel-esp-config/1\n";

/// The bytes an ESP config's signature covers.
pub fn signed_payload(config: &[u8]) -> Vec<u8> {
    let mut p = PAYLOAD_PREFIX.to_vec();
    p.extend_from_slice(config);
    p
}

/// The image's provisioning settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Apply an ESP config without the operator's signature.
    pub unsigned_esp_configs: bool,
}

/// Places to look (the real ones on a node; directories under a temp dir in tests).
pub struct Sources {
    pub fw_cfg: PathBuf,
    /// A mounted ESP, or `None` to find and mount the ESP of the disk the machine booted from.
    pub esp: Option<PathBuf>,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            fw_cfg: PathBuf::from(FW_CFG),
            esp: None,
        }
    }
}

/// A config and where it came from.
#[derive(Debug)]
pub struct Found {
    pub bytes: Vec<u8>,
    /// Shown in messages and recorded in the stamp.
    pub from: String,
    /// The ESP it was read from (to remove it there once applied).
    pub esp: Option<EspPlace>,
}

/// An ESP a config was read from: a directory (tests) or a device mounted for the occasion.
#[derive(Debug, Clone)]
pub enum EspPlace {
    Dir(PathBuf),
    Device(PathBuf),
}

/// Why an ESP config was not used.
#[derive(Debug, thiserror::Error)]
pub enum EspConfigError {
    #[error("{ESP_PATH} on the ESP is not signed (no {ESP_SIG_PATH}); nothing of it was applied. Sign it with the operator's container-signing key (`keel embed-config IMAGE CONFIG --key KEY`), or build the image with [trust] unsigned-esp-configs = true")]
    Unsigned,
    #[error("{ESP_SIG_PATH} on the ESP does not verify with any key of this image's policy ({keys}); nothing of it was applied: it was signed with another key, or the config was changed after signing")]
    BadSignature { keys: String },
    #[error("{ESP_SIG_PATH} is there but this image carries no key to check it with (no container policy) and does not allow unsigned ESP configs; nothing of it was applied")]
    NoKeys,
}

/// Finds the config. `root` is the node's root (its /usr holds the policy keys and settings).
pub fn find(s: &Sources, root: &Path) -> Result<Option<Found>> {
    if s.fw_cfg.exists() {
        let b = fs::read(&s.fw_cfg).with_context(|| format!("reading {}", s.fw_cfg.display()))?;
        return Ok(Some(Found {
            bytes: b,
            from: "fw_cfg opt/com.coreos/config".into(),
            esp: None,
        }));
    }
    let (place, dir, mounted) = match &s.esp {
        Some(dir) => (EspPlace::Dir(dir.clone()), dir.clone(), false),
        None => {
            let Some(dev) = boot_esp_device()? else {
                return Ok(None);
            };
            let mnt = mount_esp(&dev, false)?;
            (EspPlace::Device(dev), mnt, true)
        }
    };
    let r = read_esp(&dir, root);
    if mounted {
        let _ = Command::new("umount").arg(&dir).status();
    }
    Ok(r?.map(|bytes| Found {
        bytes,
        from: format!("ESP {ESP_PATH}"),
        esp: Some(place),
    }))
}

/// The settings the image carries; none (an image built before them): unsigned refused.
pub fn settings(root: &Path) -> Result<Settings> {
    let p = root.join(SETTINGS);
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn read_esp(dir: &Path, root: &Path) -> Result<Option<Vec<u8>>> {
    let p = dir.join(ESP_PATH);
    let bytes = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let sig = match fs::read_to_string(dir.join(ESP_SIG_PATH)) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {ESP_SIG_PATH} on the ESP")),
    };
    check_signature(&bytes, sig.as_deref(), root)?;
    Ok(Some(bytes))
}

/// Accepts `config` when its signature verifies with a key of the image's container policy, or
/// when unsigned ESP configs are allowed and there is no signature.
pub fn check_signature(config: &[u8], sig: Option<&str>, root: &Path) -> Result<()> {
    let allowed = settings(root)?.unsigned_esp_configs;
    let keys: Vec<TrustedKey> = match crate::container::policy::load(root) {
        Ok(p) => p.keys,
        Err(_) => Vec::new(),
    };
    match sig {
        None if allowed => Ok(()),
        None => Err(EspConfigError::Unsigned.into()),
        Some(_) if keys.is_empty() => Err(EspConfigError::NoKeys.into()),
        Some(s) => {
            if crate::container::policy::verify_blob(&signed_payload(config), s, &keys) {
                Ok(())
            } else {
                Err(EspConfigError::BadSignature {
                    keys: keys
                        .iter()
                        .map(|k| k.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
                .into())
            }
        }
    }
}

/// Removes the config and its signature from the ESP they were read from.
pub fn remove_from_esp(place: &EspPlace) -> Result<()> {
    let (dir, mounted) = match place {
        EspPlace::Dir(d) => (d.clone(), false),
        EspPlace::Device(dev) => (mount_esp(dev, true)?, true),
    };
    let mut r = Ok(());
    for p in [ESP_PATH, ESP_SIG_PATH] {
        // FAT keeps a removed file's clusters as they were: overwrite them first.
        if let Err(e) = zero_file(&dir.join(p)) {
            r = Err(e).with_context(|| format!("overwriting {p} on the ESP"));
        }
        match fs::remove_file(dir.join(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => r = Err(e).with_context(|| format!("removing {p} from the ESP")),
        }
    }
    if mounted {
        let _ = Command::new("sync").status();
        let _ = Command::new("umount").arg(&dir).status();
    }
    r
}

/// Overwrites a file's bytes with zeros in place and syncs them; a missing file is fine.
fn zero_file(p: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = match fs::OpenOptions::new().write(true).open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let zeros = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

fn mount_esp(dev: &Path, writable: bool) -> Result<PathBuf> {
    let mnt = PathBuf::from("/run/keel/esp");
    fs::create_dir_all(&mnt).context("creating /run/keel/esp")?;
    let ok = Command::new("mount")
        .args(["-t", "vfat", "-o", if writable { "rw" } else { "ro" }])
        .arg(dev)
        .arg(&mnt)
        .status()
        .with_context(|| format!("mounting the ESP {}", dev.display()))?
        .success();
    if !ok {
        anyhow::bail!("mounting the ESP {} failed", dev.display());
    }
    Ok(mnt)
}

/// The partition UUID systemd-boot says it was started from (lowercase), from the EFI variable's
/// bytes: 4 bytes of attributes, then UTF-16LE text.
pub fn loader_part_uuid(var: &[u8]) -> Option<String> {
    let text: Vec<u16> = var
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|c| *c != 0)
        .collect();
    let s = String::from_utf16(&text).ok()?.to_ascii_lowercase();
    (s.len() == 36).then_some(s)
}

/// The ESP of the disk the machine booted from: the partition whose UUID systemd-boot recorded
/// in `LoaderDevicePartUUID` (udev's `ID_PART_ENTRY_UUID`). A machine booted otherwise reads no
/// ESP config: another disk's (a USB stick's) is never taken.
fn boot_esp_device() -> Result<Option<PathBuf>> {
    let Ok(var) = fs::read(LOADER_DEVICE_PART_UUID) else {
        tracing::warn!("the boot loader did not record its partition (LoaderDevicePartUUID): no ESP config is read");
        return Ok(None);
    };
    let Some(uuid) = loader_part_uuid(&var) else {
        return Ok(None);
    };
    let Ok(entries) = fs::read_dir("/sys/class/block") else {
        return Ok(None);
    };
    for e in entries.flatten() {
        let Ok(dev) = fs::read_to_string(e.path().join("dev")) else {
            continue;
        };
        let db = format!("/run/udev/data/b{}", dev.trim());
        let Ok(text) = fs::read_to_string(&db) else {
            continue;
        };
        if text
            .lines()
            .any(|l| l.eq_ignore_ascii_case(&format!("E:ID_PART_ENTRY_UUID={uuid}")))
        {
            return Ok(Some(PathBuf::from("/dev").join(e.file_name())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_variable_names_the_boot_partition() {
        let mut var = vec![6, 0, 0, 0];
        for c in "A1B2C3D4-0000-4000-8000-00000000ABCD".encode_utf16() {
            var.extend_from_slice(&c.to_le_bytes());
        }
        var.extend_from_slice(&[0, 0]);
        assert_eq!(
            loader_part_uuid(&var).as_deref(),
            Some("a1b2c3d4-0000-4000-8000-00000000abcd")
        );
        assert_eq!(loader_part_uuid(&[6, 0, 0, 0, b'x', 0]), None);
    }
}
