//! Where a node's Ignition config comes from, in this order: QEMU's fw_cfg entry
//! `opt/com.coreos/config` (as Fedora CoreOS reads it), then `keel/config.ign` on the EFI system
//! partition (written by `keel build --ignition` or `keel embed-config`).

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The fw_cfg file QEMU's `-fw_cfg name=opt/com.coreos/config,file=...` creates.
pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/com.coreos/config/raw";
/// The config's path on the ESP.
pub const ESP_PATH: &str = "keel/config.ign";
/// GPT type of the EFI system partition.
const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";

/// Places to look (the real ones on a node; directories under a temp dir in tests).
pub struct Sources {
    pub fw_cfg: PathBuf,
    /// A mounted ESP, or `None` to find and mount the ESP of this machine.
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

/// The config bytes and a description of where they came from.
pub fn find(s: &Sources) -> Result<Option<(Vec<u8>, String)>> {
    if s.fw_cfg.exists() {
        let b = fs::read(&s.fw_cfg).with_context(|| format!("reading {}", s.fw_cfg.display()))?;
        return Ok(Some((b, "fw_cfg opt/com.coreos/config".into())));
    }
    match &s.esp {
        Some(dir) => read_esp(dir),
        None => {
            let Some(dev) = esp_device()? else {
                return Ok(None);
            };
            let mnt = PathBuf::from("/run/keel/esp");
            fs::create_dir_all(&mnt).context("creating /run/keel/esp")?;
            let ok = Command::new("mount")
                .args(["-t", "vfat", "-o", "ro"])
                .arg(&dev)
                .arg(&mnt)
                .status()
                .with_context(|| format!("mounting the ESP {}", dev.display()))?
                .success();
            if !ok {
                anyhow::bail!("mounting the ESP {} read-only failed", dev.display());
            }
            let r = read_esp(&mnt);
            let _ = Command::new("umount").arg(&mnt).status();
            r
        }
    }
}

fn read_esp(dir: &Path) -> Result<Option<(Vec<u8>, String)>> {
    let p = dir.join(ESP_PATH);
    match fs::read(&p) {
        Ok(b) => Ok(Some((b, format!("ESP {ESP_PATH}")))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// The ESP among the block devices udev knows (partition type from udev's database).
fn esp_device() -> Result<Option<PathBuf>> {
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
            .any(|l| l.eq_ignore_ascii_case(&format!("E:ID_PART_ENTRY_TYPE={ESP_TYPE}")))
        {
            return Ok(Some(PathBuf::from("/dev").join(e.file_name())));
        }
    }
    Ok(None)
}
