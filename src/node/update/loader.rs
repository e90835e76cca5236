//! The boot loader's side: what systemd-boot says about this boot (its EFI variables), and the
//! boot entries in the ESP's `EFI/Linux` that keel-update renames, blesses and removes.

use crate::disk::uki::{parse_entry_name, EntryName};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// A string EFI variable of systemd-boot (4 attribute bytes, then UTF-16LE, NUL-terminated).
pub fn efi_string(efivars: &Path, name: &str) -> Option<String> {
    let bytes = std::fs::read(efivars.join(format!("{name}-{LOADER_GUID}"))).ok()?;
    let units: Vec<u16> = bytes
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

/// What systemd-boot says about this boot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BootInfo {
    /// The entry booted (`LoaderEntrySelected`), e.g. `keel-0.2.0+1-0.efi`.
    pub entry: Option<String>,
    /// Set when the boot was counted (`LoaderBootCountPath`): a trial.
    pub count_path: Option<String>,
}

impl BootInfo {
    pub fn read(efivars: &Path) -> BootInfo {
        BootInfo {
            entry: efi_string(efivars, "LoaderEntrySelected"),
            count_path: efi_string(efivars, "LoaderBootCountPath"),
        }
    }
    pub fn counted(&self) -> bool {
        self.count_path.is_some()
    }
}

/// The ESP's `EFI/Linux` as keel-update edits it.
pub struct Entries {
    pub dir: PathBuf,
}

impl Entries {
    pub fn new(esp: &Path) -> Entries {
        Entries {
            dir: esp.join("EFI/Linux"),
        }
    }

    /// Keel's entries: file name and parsed name.
    pub fn list(&self) -> Result<Vec<(String, EntryName)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {} (is the ESP mounted?)", self.dir.display()))?
        {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(p) = parse_entry_name(&name) {
                out.push((name, p));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn of(&self, version: &str) -> Result<Vec<(String, EntryName)>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|(_, e)| e.version == version)
            .collect())
    }

    /// Whether `version` has a staged UKI (installed, not yet activated).
    pub fn has_staged(&self, version: &str) -> Result<bool> {
        Ok(self.of(version)?.iter().any(|(_, e)| e.staged))
    }

    /// Whether `version` has a counted entry the loader never tried (tries left, none done).
    pub fn untried(&self, version: &str) -> Result<bool> {
        Ok(self
            .of(version)?
            .iter()
            .any(|(_, e)| !e.staged && e.left.is_some_and(|l| l > 0) && e.done.is_none()))
    }

    /// Renames `version`'s staged UKI to its counted name: from now on the loader tries it.
    pub fn activate(&self, version: &str) -> Result<String> {
        let staged = self.of(version)?.into_iter().find(|(_, e)| e.staged);
        let (name, _) = staged.with_context(|| {
            format!(
                "no staged UKI of {version} in {} (install it first)",
                self.dir.display()
            )
        })?;
        let to = name.trim_end_matches(".staged").to_string();
        rename_synced(&self.dir, &name, &to)?;
        Ok(to)
    }

    /// Removes every entry of `version` (staged, counted, bad).
    pub fn remove(&self, version: &str) -> Result<()> {
        for (name, _) in self.of(version)? {
            std::fs::remove_file(self.dir.join(&name))
                .with_context(|| format!("removing {}", self.dir.join(&name).display()))?;
        }
        sync_dir(&self.dir)
    }

    /// Marks a blessed (uncounted) entry bad, `keel-V.efi` → `keel-V+0-1.efi`, so the loader
    /// sorts it after every good entry (an operator's rollback).
    pub fn mark_bad(&self, version: &str) -> Result<()> {
        let entries = self.of(version)?;
        let Some((name, e)) = entries.into_iter().find(|(_, e)| !e.staged) else {
            bail!("no boot entry of {version} in {}", self.dir.display());
        };
        if e.bad() {
            return Ok(());
        }
        rename_synced(&self.dir, &name, &format!("keel-{version}+0-1.efi"))
    }

    /// Whether a good (or still counting) entry other than `version` exists: somewhere to go
    /// back to.
    pub fn other_good(&self, version: &str) -> Result<Option<String>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|(_, e)| e.version != version && !e.staged && !e.bad())
            .map(|(_, e)| e.version))
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn rename_synced(dir: &Path, from: &str, to: &str) -> Result<()> {
    std::fs::rename(dir.join(from), dir.join(to))
        .with_context(|| format!("renaming {from} to {to} in {}", dir.display()))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn efivar(dir: &Path, name: &str, value: &str) {
        let mut b = vec![6, 0, 0, 0];
        for u in value.encode_utf16().chain([0]) {
            b.extend_from_slice(&u.to_le_bytes());
        }
        std::fs::write(dir.join(format!("{name}-{LOADER_GUID}")), b).expect("write");
    }

    #[test]
    fn boot_info_from_efivars() {
        let t = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            BootInfo::read(t.path()),
            BootInfo {
                entry: None,
                count_path: None
            }
        );
        efivar(t.path(), "LoaderEntrySelected", "keel-0.2.0+1-0.efi");
        efivar(
            t.path(),
            "LoaderBootCountPath",
            "\\EFI\\Linux\\keel-0.2.0+1-0.efi",
        );
        let b = BootInfo::read(t.path());
        assert!(b.counted());
        assert_eq!(b.entry.as_deref(), Some("keel-0.2.0+1-0.efi"));
    }

    #[test]
    fn activate_mark_bad_and_remove() {
        let t = tempfile::tempdir().expect("tempdir");
        let e = Entries::new(t.path());
        std::fs::create_dir_all(&e.dir).expect("mkdir");
        for f in ["keel-0.1.0.efi", "keel-0.2.0+2.efi.staged", "other.efi"] {
            std::fs::write(e.dir.join(f), b"x").expect("write");
        }
        assert!(e.activate("0.3.0").is_err());
        assert_eq!(e.activate("0.2.0").expect("activate"), "keel-0.2.0+2.efi");
        assert!(e.dir.join("keel-0.2.0+2.efi").exists());
        assert_eq!(e.other_good("0.2.0").expect("list"), Some("0.1.0".into()));
        e.mark_bad("0.1.0").expect("bad");
        assert!(e.dir.join("keel-0.1.0+0-1.efi").exists());
        assert_eq!(e.other_good("0.2.0").expect("list"), None);
        e.remove("0.2.0").expect("remove");
        let left: Vec<String> = e
            .list()
            .expect("list")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(left, ["keel-0.1.0+0-1.efi"]);
        assert!(e.dir.join("other.efi").exists());
    }
}
