//! The A/B slot writer: a new version's /usr and verity partitions written into the disk's empty
//! slot, with the partition UUIDs derived from its root hash and its label, and its UKI into the
//! ESP — as `keel build` lays out slot A, and as an updater installs a release.

use super::esp::{Esp, UKI_DIR};
use super::gpt::{self, Partition};
use super::layout::verity_uuids;
use super::partition::{PartitionType, EMPTY_LABEL};
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// A release to install: its built raw image (slot A holds its /usr), root hash, slot label and
/// UKI.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    pub raw: &'a Path,
    pub root_hash: &'a str,
    pub label: &'a str,
    pub uki_name: &'a str,
    pub uki: &'a [u8],
}

/// The partitions of `parts` carrying the data and hash UUIDs derived from `root_hash`.
pub fn by_root_hash<'p>(
    parts: &'p [Partition],
    root_hash: &str,
) -> Result<(&'p Partition, &'p Partition)> {
    let (data_uuid, hash_uuid) = verity_uuids(root_hash)?;
    let data = parts
        .iter()
        .find(|p| p.is(PartitionType::Usr) && p.uuid == data_uuid)
        .with_context(|| {
            format!("no usr partition has the UUID {data_uuid} of root hash {root_hash}")
        })?;
    let hash = parts
        .iter()
        .find(|p| p.is(PartitionType::UsrVerity) && p.uuid == hash_uuid)
        .with_context(|| {
            format!("no usr verity partition has the UUID {hash_uuid} of root hash {root_hash}")
        })?;
    Ok((data, hash))
}

/// The empty slot's data and hash partitions (label `_empty`).
pub fn empty_slot(parts: &[Partition]) -> Result<(&Partition, &Partition)> {
    let data = parts
        .iter()
        .find(|p| p.is(PartitionType::Usr) && p.label == EMPTY_LABEL)
        .with_context(|| format!("the disk has no empty usr slot (label {EMPTY_LABEL})"))?;
    let hash = parts
        .iter()
        .find(|p| p.is(PartitionType::UsrVerity) && p.label == EMPTY_LABEL)
        .with_context(|| format!("the disk has no empty usr verity slot (label {EMPTY_LABEL})"))?;
    Ok((data, hash))
}

fn copy_range(src: &Path, src_off: u64, dst: &Path, dst_off: u64, len: u64) -> Result<()> {
    let mut i = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut o = OpenOptions::new()
        .write(true)
        .open(dst)
        .with_context(|| format!("opening {}", dst.display()))?;
    i.seek(SeekFrom::Start(src_off))
        .with_context(|| format!("seeking in {}", src.display()))?;
    o.seek(SeekFrom::Start(dst_off))
        .with_context(|| format!("seeking in {}", dst.display()))?;
    let copied = std::io::copy(&mut i.take(len), &mut o).with_context(|| {
        format!(
            "copying {len} bytes from {} to {}",
            src.display(),
            dst.display()
        )
    })?;
    if copied != len {
        bail!("copied {copied} of {len} bytes from {}", src.display());
    }
    o.sync_all()
        .with_context(|| format!("syncing {}", dst.display()))?;
    Ok(())
}

/// Installs `release` onto `disk` as an A/B update: its /usr and verity partitions into the empty
/// slot, whose partitions then get the UUIDs derived from the new root hash and the new label;
/// last, its UKI into `EFI/Linux`. The data is synced before the GPT names it, and the GPT
/// before the UKI that boots it is written, so an interrupted install leaves a disk that boots
/// the old version.
pub fn install(disk: &Path, release: &Release) -> Result<()> {
    let (_, new_parts) = gpt::read(release.raw)?;
    let (src_data, src_hash) = by_root_hash(&new_parts, release.root_hash)
        .with_context(|| format!("reading the release {}", release.raw.display()))?;
    let (_, cur_parts) = gpt::read(disk)?;
    let (dst_data, dst_hash) =
        empty_slot(&cur_parts).with_context(|| format!("installing onto {}", disk.display()))?;
    if src_data.size > dst_data.size || src_hash.size > dst_hash.size {
        bail!(
            "the release's /usr ({} + {} bytes) does not fit the empty slot of {} ({} + {} bytes)",
            src_data.size,
            src_hash.size,
            disk.display(),
            dst_data.size,
            dst_hash.size
        );
    }
    copy_range(
        release.raw,
        src_data.offset,
        disk,
        dst_data.offset,
        src_data.size,
    )?;
    copy_range(
        release.raw,
        src_hash.offset,
        disk,
        dst_hash.offset,
        src_hash.size,
    )?;
    gpt::relabel(
        disk,
        &[
            (dst_data.number, src_data.uuid.as_str(), release.label),
            (dst_hash.number, src_hash.uuid.as_str(), release.label),
        ],
    )?;
    let esp = Esp::open(disk, true)?;
    esp.write(&format!("{UKI_DIR}/{}", release.uki_name), release.uki)?;
    esp.close()
}
