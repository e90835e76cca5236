//! Host-side edits of a test node's raw disk between boots: changed UKIs in the ESP (to check
//! that firmware and TPM refuse them) and A/B updates (a new /usr in slot B plus its UKI).
//! The byte-level changes are pure functions; the disk access is a FAT file system on a slice of
//! the raw file (the `fatfs` crate) and the GPT through the `gpt` crate.

use crate::inspect::Slice;
use crate::tools::{run, ToolsTree};
use anyhow::{bail, Context, Result};
use object::read::pe::PeFile64;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// File offset and length of a PE section's raw data.
fn section_range(pe: &[u8], name: &str) -> Result<(usize, usize)> {
    let file = PeFile64::parse(pe).map_err(|e| anyhow::anyhow!("not a PE image: {e}"))?;
    for s in file.section_table().iter() {
        let n = String::from_utf8_lossy(s.raw_name())
            .trim_end_matches('\0')
            .to_string();
        if n == name {
            let off = s.pointer_to_raw_data.get(object::LittleEndian) as usize;
            let raw = s.size_of_raw_data.get(object::LittleEndian) as usize;
            let vsize = s.virtual_size.get(object::LittleEndian) as usize;
            return Ok((off, raw.min(vsize)));
        }
    }
    bail!("the UKI has no {name} section")
}

/// A copy of `pe` with one byte in the middle of the kernel flipped.
pub fn flip_linux_byte(pe: &[u8]) -> Result<Vec<u8>> {
    let (off, len) = section_range(pe, ".linux")?;
    let mut out = pe.to_vec();
    let at = off + len / 2;
    out[at] ^= 0x01;
    Ok(out)
}

/// A copy of `pe` whose `.cmdline` has `from` replaced by `to` (padded with spaces to the same
/// length), leaving every other byte, the signature and `.pcrsig` as they were.
pub fn replace_cmdline(pe: &[u8], from: &str, to: &str) -> Result<Vec<u8>> {
    if to.len() > from.len() {
        bail!("cmdline replacement `{to}` is longer than `{from}`; the section keeps its size");
    }
    let (off, len) = section_range(pe, ".cmdline")?;
    let text = std::str::from_utf8(&pe[off..off + len]).context(".cmdline is not UTF-8")?;
    let at = text
        .find(from)
        .with_context(|| format!("the UKI's command line has no `{from}`: {text}"))?;
    let mut out = pe.to_vec();
    let padded = format!("{to:<width$}", width = from.len());
    out[off + at..off + at + from.len()].copy_from_slice(padded.as_bytes());
    Ok(out)
}

/// The UKI stripped of its signature and signed again with a new, unenrolled key.
pub fn resign_foreign(tools: &ToolsTree, pe: &[u8], work: &Path) -> Result<Vec<u8>> {
    let keys = work.join("foreign-keys");
    if !keys.exists() {
        crate::trust::keys::init(&keys, "Foreign")?;
    }
    let unsigned = work.join("foreign-unsigned.efi");
    let signed = work.join("foreign-signed.efi");
    std::fs::write(&unsigned, pe).context("writing the UKI copy")?;
    let tools = tools.clone().bind(work);
    run(tools.command("sbattach")?.arg("--remove").arg(&unsigned))
        .context("removing the UKI's signature (sbattach)")?;
    run(tools
        .command("sbsign")?
        .arg("--key")
        .arg(keys.join("db.key"))
        .arg("--cert")
        .arg(keys.join("db.crt"))
        .arg("--output")
        .arg(&signed)
        .arg(&unsigned))
    .context("signing the UKI with a foreign key (sbsign)")?;
    std::fs::read(&signed).context("reading the re-signed UKI")
}

fn esp_slice(raw: &Path) -> Result<Slice> {
    let info = crate::inspect::inspect(raw)?;
    let esp = info
        .partitions
        .iter()
        .find(|p| p.type_ == "esp")
        .with_context(|| format!("{} has no ESP", raw.display()))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)
        .with_context(|| format!("opening {}", raw.display()))?;
    Ok(Slice {
        file,
        start: esp.offset,
        len: esp.size,
        pos: 0,
        writable: true,
    })
}

/// Times written into FAT entries. Without a provider fatfs writes the date 0 (month 0, day 0),
/// which OVMF's FAT driver rejects when systemd-boot later renames the file for boot counting.
#[derive(Debug)]
struct FixedTime;

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 2025,
            month: 1,
            day: 1,
        }
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

fn open_fs(raw: &Path) -> Result<fatfs::FileSystem<Slice>> {
    fatfs::FileSystem::new(
        esp_slice(raw)?,
        fatfs::FsOptions::new().time_provider(&FIXED_TIME),
    )
    .with_context(|| format!("opening the ESP of {}", raw.display()))
}

/// The file name under EFI/Linux of the UKI of `version` (its boot counter suffix varies).
pub fn find_uki(raw: &Path, version: &str) -> Result<String> {
    let fs = open_fs(raw)?;
    let dir = fs
        .root_dir()
        .open_dir("EFI/Linux")
        .context("no EFI/Linux")?;
    let prefix = format!("keel-{version}");
    let mut found = Vec::new();
    for e in dir.iter() {
        let name = e.context("reading EFI/Linux")?.file_name();
        let rest = name.strip_prefix(&prefix).unwrap_or("x");
        if rest.starts_with('+') || rest == ".efi" {
            found.push(name);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "no UKI of version {version} in EFI/Linux of {}",
            raw.display()
        ),
        _ => bail!("several UKIs of version {version}: {found:?}"),
    }
}

pub fn read_uki(raw: &Path, name: &str) -> Result<Vec<u8>> {
    let fs = open_fs(raw)?;
    let mut f = fs
        .root_dir()
        .open_file(&format!("EFI/Linux/{name}"))
        .with_context(|| format!("opening EFI/Linux/{name}"))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)
        .with_context(|| format!("reading EFI/Linux/{name}"))?;
    Ok(data)
}

/// Writes (creates or replaces) the file `path` (`dir/name`, directories created) in the ESP of
/// the raw image `raw`.
pub fn write_file(raw: &Path, path: &str, data: &[u8]) -> Result<()> {
    let fs = open_fs(raw)?;
    let mut dir = fs.root_dir();
    let (dirs, name) = path.rsplit_once('/').unwrap_or(("", path));
    for d in dirs.split('/').filter(|d| !d.is_empty()) {
        dir = match dir.open_dir(d) {
            Ok(x) => x,
            Err(_) => dir
                .create_dir(d)
                .with_context(|| format!("creating {d} on the ESP"))?,
        };
    }
    let mut f = dir
        .create_file(name)
        .with_context(|| format!("creating {path} on the ESP"))?;
    f.truncate().context("truncating")?;
    f.write_all(data)
        .with_context(|| format!("writing {path} on the ESP"))?;
    f.flush().context("flushing the ESP")?;
    drop(f);
    drop(dir);
    fs.unmount().context("unmounting the ESP")?;
    Ok(())
}

/// Writes (creates or replaces) EFI/Linux/`name` in the ESP.
pub fn write_uki(raw: &Path, name: &str, data: &[u8]) -> Result<()> {
    let fs = open_fs(raw)?;
    let mut f = fs
        .root_dir()
        .create_file(&format!("EFI/Linux/{name}"))
        .with_context(|| format!("creating EFI/Linux/{name}"))?;
    f.truncate().context("truncating the UKI file")?;
    f.write_all(data)
        .with_context(|| format!("writing EFI/Linux/{name}"))?;
    f.flush().context("flushing the ESP")?;
    drop(f);
    fs.unmount().context("unmounting the ESP")?;
    Ok(())
}

fn copy_range(src: &Path, src_off: u64, dst: &Path, dst_off: u64, len: u64) -> Result<()> {
    let mut i = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut o = OpenOptions::new()
        .write(true)
        .open(dst)
        .with_context(|| format!("opening {}", dst.display()))?;
    i.seek(SeekFrom::Start(src_off))?;
    o.seek(SeekFrom::Start(dst_off))?;
    let copied = std::io::copy(&mut i.take(len), &mut o).context("copying partition data")?;
    if copied != len {
        bail!("copied {copied} of {len} bytes");
    }
    o.sync_all().context("syncing the disk")?;
    Ok(())
}

/// Installs the build `new_raw` (usr slot A of that image, with its verity partition, and
/// `uki` under `uki_name`) onto `disk` as an A/B update: written into slot B, whose partitions get
/// the UUIDs derived from the new root hash and the new label, as `keel build` gives slot A.
pub fn install_update(
    disk: &Path,
    new_raw: &Path,
    new_root_hash: &str,
    label: &str,
    uki_name: &str,
    uki: &[u8],
) -> Result<()> {
    let new = crate::inspect::inspect(new_raw)?;
    let (data_uuid, hash_uuid) = crate::render::layout::verity_uuids(new_root_hash)?;
    let src_data = new
        .partitions
        .iter()
        .find(|p| p.uuid == data_uuid)
        .context("the update has no usr partition for its root hash")?;
    let src_hash = new
        .partitions
        .iter()
        .find(|p| p.uuid == hash_uuid)
        .context("the update has no verity partition for its root hash")?;
    let cur = crate::inspect::inspect(disk)?;
    let slot_b: Vec<_> = cur
        .partitions
        .iter()
        .filter(|p| p.label == "_empty")
        .collect();
    let dst_data = slot_b
        .iter()
        .find(|p| p.type_ == "usr-x86-64")
        .context("the disk has no empty usr slot (label _empty)")?;
    let dst_hash = slot_b
        .iter()
        .find(|p| p.type_ == "usr-x86-64-verity")
        .context("the disk has no empty usr verity slot (label _empty)")?;
    if src_data.size > dst_data.size || src_hash.size > dst_hash.size {
        bail!("the update's /usr does not fit slot B");
    }
    copy_range(
        new_raw,
        src_data.offset,
        disk,
        dst_data.offset,
        src_data.size,
    )?;
    copy_range(
        new_raw,
        src_hash.offset,
        disk,
        dst_hash.offset,
        src_hash.size,
    )?;
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(disk)
        .with_context(|| format!("opening the GPT of {}", disk.display()))?;
    let mut parts = gpt.partitions().clone();
    for (num, uuid) in [(dst_data.number, &data_uuid), (dst_hash.number, &hash_uuid)] {
        let p = parts
            .get_mut(&num)
            .with_context(|| format!("partition {num} vanished"))?;
        p.part_guid = uuid
            .parse()
            .with_context(|| format!("`{uuid}` is not a UUID"))?;
        p.name = label.to_string();
    }
    gpt.update_partitions(parts)
        .context("updating slot B's partition entries")?;
    gpt.write().context("writing the GPT")?;
    write_uki(disk, uki_name, uki)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ with `.linux` and `.cmdline`, built with the object crate's writer is not
    /// available here; the UKI built by the integration tests exercises the PE paths. This checks
    /// the text logic of a cmdline replacement on a fake section layout.
    #[test]
    fn cmdline_replacement_must_not_grow() {
        let e = replace_cmdline(b"not a pe", "a", "bb").expect_err("must fail");
        assert!(e.to_string().contains("longer"), "{e}");
    }
}
