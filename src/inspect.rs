//! `keel inspect`: what is in an image — partitions, the UKI's sections and command line, the /usr
//! root hash and whether the verity partitions are where the initrd will look for them. Reads
//! the GPT, the FAT ESP and the PE file directly; runs no tool for raw images.

use crate::render::layout;
use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Discoverable Partitions Specification type GUIDs keel uses, with their systemd names.
pub const PARTITION_TYPES: &[(&str, &str)] = &[
    ("c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "esp"),
    ("8484680c-9521-48c6-9c11-b0720656f69e", "usr-x86-64"),
    ("77ff5f63-e7b6-4633-acf4-1565b864c0e6", "usr-x86-64-verity"),
    ("4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "root-x86-64"),
    ("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5", "root-x86-64-verity"),
    ("4d21b016-b534-45c2-a9fb-5c16e091fd2d", "var"),
];

pub fn type_name(guid: &str) -> String {
    let g = guid.to_ascii_lowercase();
    PARTITION_TYPES
        .iter()
        .find(|(k, _)| *k == g)
        .map(|(_, n)| n.to_string())
        .unwrap_or(g)
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionView {
    pub number: u32,
    #[serde(rename = "type")]
    pub type_: String,
    pub uuid: String,
    pub label: String,
    pub offset: u64,
    pub size: u64,
    pub flags: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SectionView {
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UkiView {
    pub path: String,
    pub sections: Vec<SectionView>,
    pub cmdline: String,
    pub uname: String,
    pub os_release: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub image: String,
    pub disk_guid: Option<String>,
    pub partitions: Vec<PartitionView>,
    pub ukis: Vec<UkiView>,
    pub usr_root_hash: Option<String>,
    /// Slot A's data and hash partitions carry the UUIDs derived from the root hash.
    pub verity_partitions_found: Option<bool>,
}

/// A partition of an image file as a byte range. Writes are refused unless `writable` (inspect
/// only reads; the test harness edits ESPs of throwaway disks).
pub(crate) struct Slice {
    pub file: File,
    pub start: u64,
    pub len: u64,
    pub pos: u64,
    pub writable: bool,
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Slice {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => p as i64,
            SeekFrom::End(d) => self.len as i64 + d,
            SeekFrom::Current(d) => self.pos as i64 + d,
        };
        if new < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

impl Write for Slice {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.writable {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "inspect never writes",
            ));
        }
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.file.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads the sections, command line, uname and os-release of a UKI.
pub fn read_uki(name: &str, data: &[u8]) -> Result<UkiView> {
    let pe = object::File::parse(data).with_context(|| format!("{name} is not a PE file"))?;
    let mut view = UkiView {
        path: name.to_string(),
        sections: Vec::new(),
        cmdline: String::new(),
        uname: String::new(),
        os_release: String::new(),
    };
    for s in pe.sections() {
        let sname = s.name().unwrap_or("?").to_string();
        let bytes = s.data().unwrap_or_default();
        let text = || {
            String::from_utf8_lossy(bytes)
                .trim_end_matches('\0')
                .trim()
                .to_string()
        };
        match sname.as_str() {
            ".cmdline" => view.cmdline = text(),
            ".uname" => view.uname = text(),
            ".osrel" => view.os_release = text(),
            _ => {}
        }
        view.sections.push(SectionView {
            name: sname,
            size: s.size(),
        });
    }
    Ok(view)
}

/// The `usrhash=` of a kernel command line.
pub fn usrhash(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("usrhash="))
        .map(|s| s.to_string())
}

/// Inspects a raw disk image, a UKI (`.efi`), or a build directory (its raw image).
pub fn inspect(path: &Path) -> Result<Inspection> {
    let path = if path.is_dir() {
        let m = crate::manifest::Manifest::find(path)?;
        let raw = path.join(format!("{}.raw", m.name));
        if !raw.exists() {
            bail!("{} has no {}.raw to inspect", path.display(), m.name);
        }
        raw
    } else {
        path.to_path_buf()
    };
    if path.extension().is_some_and(|e| e == "efi") {
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let uki = read_uki(&path.display().to_string(), &data)?;
        return Ok(Inspection {
            image: path.display().to_string(),
            disk_guid: None,
            partitions: vec![],
            usr_root_hash: usrhash(&uki.cmdline),
            ukis: vec![uki],
            verity_partitions_found: None,
        });
    }
    if path.extension().is_some_and(|e| e == "qcow2") {
        bail!("{} is qcow2: inspect the .raw image next to it (or convert with qemu-img convert -O raw)", path.display());
    }
    inspect_raw(&path)
}

fn inspect_raw(path: &Path) -> Result<Inspection> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(path)
        .with_context(|| format!("reading the GPT of {}", path.display()))?;
    let mut parts = Vec::new();
    for (n, p) in disk.partitions() {
        parts.push(PartitionView {
            number: *n,
            type_: type_name(&p.part_type_guid.guid.to_string()),
            uuid: p.part_guid.to_string(),
            label: p.name.clone(),
            offset: p.first_lba * 512,
            size: (p.last_lba + 1 - p.first_lba) * 512,
            flags: p.flags,
        });
    }
    let mut ukis = Vec::new();
    if let Some(esp) = parts.iter().find(|p| p.type_ == "esp") {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let fs = fatfs::FileSystem::new(
            Slice {
                file,
                start: esp.offset,
                len: esp.size,
                pos: 0,
                writable: false,
            },
            fatfs::FsOptions::new(),
        )
        .with_context(|| {
            format!(
                "reading the ESP (partition {}) of {}",
                esp.number,
                path.display()
            )
        })?;
        let dir = fs
            .root_dir()
            .open_dir("EFI/Linux")
            .context("the ESP has no EFI/Linux directory")?;
        let mut names: Vec<String> = dir
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_ascii_lowercase().ends_with(".efi"))
            .collect();
        names.sort();
        for n in names {
            let mut data = Vec::new();
            dir.open_file(&n)
                .and_then(|mut f| f.read_to_end(&mut data))
                .with_context(|| format!("reading EFI/Linux/{n} from the ESP"))?;
            ukis.push(read_uki(&format!("EFI/Linux/{n}"), &data)?);
        }
    }
    let root_hash = ukis.first().and_then(|u| usrhash(&u.cmdline));
    let found = root_hash.as_deref().map(|h| {
        layout::verity_uuids(h).is_ok_and(|(d, v)| {
            parts.iter().any(|p| p.type_ == "usr-x86-64" && p.uuid == d)
                && parts
                    .iter()
                    .any(|p| p.type_ == "usr-x86-64-verity" && p.uuid == v)
        })
    });
    Ok(Inspection {
        image: path.display().to_string(),
        disk_guid: Some(disk.guid().to_string()),
        partitions: parts,
        ukis,
        usr_root_hash: root_hash,
        verity_partitions_found: found,
    })
}

/// Human-readable rendering of an inspection.
pub fn render_text(i: &Inspection) -> String {
    let mut s = format!("image: {}\n", i.image);
    if let Some(g) = &i.disk_guid {
        s.push_str(&format!("disk GUID: {g}\n"));
    }
    if !i.partitions.is_empty() {
        s.push_str("partitions:\n");
        for p in &i.partitions {
            s.push_str(&format!(
                "  {:>2}  {:<18} {:<16} {:>10} MiB  {}\n",
                p.number,
                p.type_,
                p.label,
                p.size >> 20,
                p.uuid
            ));
        }
    }
    for u in &i.ukis {
        s.push_str(&format!(
            "UKI {}:\n  uname: {}\n  cmdline: {}\n  sections:",
            u.path, u.uname, u.cmdline
        ));
        for sec in &u.sections {
            s.push_str(&format!(" {}({})", sec.name, sec.size));
        }
        s.push('\n');
    }
    if let Some(h) = &i.usr_root_hash {
        s.push_str(&format!("usr root hash: {h}\n"));
    }
    if let Some(f) = i.verity_partitions_found {
        s.push_str(&format!(
            "verity partitions for that hash: {}\n",
            if f {
                "found (slot A)"
            } else {
                "NOT FOUND: the initrd will not find /usr"
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_cover_dps_types() {
        assert_eq!(
            type_name("8484680C-9521-48C6-9C11-B0720656F69E"),
            "usr-x86-64"
        );
        assert_eq!(
            type_name("00000000-0000-0000-0000-000000000001"),
            "00000000-0000-0000-0000-000000000001"
        );
    }

    #[test]
    fn usrhash_is_found_in_cmdline() {
        assert_eq!(
            usrhash("rw usrhash=abc console=ttyS0").as_deref(),
            Some("abc")
        );
        assert_eq!(usrhash("rw"), None);
    }

    #[test]
    fn garbage_is_not_a_uki() {
        assert!(read_uki("x", b"not a pe file").is_err());
    }
}
