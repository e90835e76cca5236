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

/// A release present on this machine as verified files: what an updater hands the slot writer.
#[derive(Debug, Clone, Copy)]
pub struct Staged<'a> {
    pub usr: &'a Path,
    pub verity: &'a Path,
    pub root_hash: &'a str,
    pub label: &'a str,
}

/// Where a release was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub data: Partition,
    pub hash: Partition,
    /// The label the slot had before (`_empty`, or the version it held).
    pub previous_label: String,
}

/// The usr slot an update may write: the data and hash partitions that do not hold the running
/// root hash (Keel's disks have exactly two slots).
pub fn free_slot<'p>(
    parts: &'p [Partition],
    running_root_hash: &str,
) -> Result<(&'p Partition, &'p Partition)> {
    let (run_data, run_hash) = by_root_hash(parts, running_root_hash)
        .context("finding the running slot by its root hash")?;
    let others = |t: PartitionType, running: &Partition| -> Result<&'p Partition> {
        let mut it = parts
            .iter()
            .filter(|p| p.is(t) && p.number != running.number);
        let first = it
            .next()
            .with_context(|| format!("the disk has no second {t:?} partition (no slot B)"))?;
        if it.next().is_some() {
            bail!("the disk has more than two {t:?} partitions; Keel's layout has two slots");
        }
        Ok(first)
    };
    Ok((
        others(PartitionType::Usr, run_data)?,
        others(PartitionType::UsrVerity, run_hash)?,
    ))
}

fn copy_into(
    src: &Path,
    disk: &Path,
    at: u64,
    room: u64,
    done: &mut u64,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let len = std::fs::metadata(src)
        .with_context(|| format!("reading {}", src.display()))?
        .len();
    if len > room {
        bail!(
            "{} ({len} bytes) does not fit its partition ({room} bytes)",
            src.display()
        );
    }
    let mut i = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut o = OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    o.seek(SeekFrom::Start(at))
        .with_context(|| format!("seeking in {}", disk.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = i
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut o, &buf[..n])
            .with_context(|| format!("writing {} at {at}", disk.display()))?;
        *done += n as u64;
        progress(*done, total);
    }
    o.sync_all()
        .with_context(|| format!("syncing {}", disk.display()))
}

/// Writes a staged release into the free slot of `disk` (a disk image or the node's disk):
/// first the slot is labelled `_empty` (while it is written it holds nothing any boot entry
/// names), then /usr and its hash tree are written and synced, and only then does the slot get
/// the UUIDs derived from the new root hash and the release's label. `progress` gets bytes
/// written and the total (an updater's tests pause there to cut the power mid-write).
pub fn write_free_slot(
    disk: &Path,
    release: &Staged,
    running_root_hash: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Written> {
    let (_, parts) = gpt::read(disk)?;
    let (data, hash) = free_slot(&parts, running_root_hash)?;
    let (data, hash) = (data.clone(), hash.clone());
    let previous_label = data.label.clone();
    for (file, part) in [(release.usr, &data), (release.verity, &hash)] {
        let len = std::fs::metadata(file)
            .with_context(|| format!("reading {}", file.display()))?
            .len();
        if len > part.size {
            bail!(
                "{} ({len} bytes) does not fit partition {} of {} ({} bytes)",
                file.display(),
                part.number,
                disk.display(),
                part.size
            );
        }
    }
    gpt::relabel(
        disk,
        &[
            (data.number, data.uuid.as_str(), EMPTY_LABEL),
            (hash.number, hash.uuid.as_str(), EMPTY_LABEL),
        ],
    )?;
    sync(disk)?;
    let total = std::fs::metadata(release.usr)?.len() + std::fs::metadata(release.verity)?.len();
    let mut done = 0;
    copy_into(
        release.usr,
        disk,
        data.offset,
        data.size,
        &mut done,
        total,
        progress,
    )?;
    copy_into(
        release.verity,
        disk,
        hash.offset,
        hash.size,
        &mut done,
        total,
        progress,
    )?;
    let (data_uuid, hash_uuid) = verity_uuids(release.root_hash)?;
    gpt::relabel(
        disk,
        &[
            (data.number, data_uuid.as_str(), release.label),
            (hash.number, hash_uuid.as_str(), release.label),
        ],
    )?;
    sync(disk)?;
    Ok(Written {
        data,
        hash,
        previous_label,
    })
}

fn sync(disk: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", disk.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HASH_A: &str = "1111111111111111111111111111111122222222222222222222222222222222";
    const HASH_B: &str = "3333333333333333333333333333333344444444444444444444444444444444";

    /// A small disk in Keel's layout, made by the host's sfdisk: ESP, slot A (holding HASH_A),
    /// slot B (`_empty`).
    fn disk(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("disk.img");
        File::create(&path)
            .and_then(|f| f.set_len(16 << 20))
            .expect("disk file");
        let (a_data, a_hash) = verity_uuids(HASH_A).expect("uuids");
        let usr = PartitionType::Usr.guid();
        let verity = PartitionType::UsrVerity.guid();
        let script = format!(
            "label: gpt\n\
             size=2MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP\n\
             size=4MiB, type={usr}, uuid={a_data}, name=img_1\n\
             size=1MiB, type={verity}, uuid={a_hash}, name=img_1\n\
             size=4MiB, type={usr}, name={EMPTY_LABEL}\n\
             size=1MiB, type={verity}, name={EMPTY_LABEL}\n"
        );
        let mut child = std::process::Command::new("sfdisk")
            .arg("--quiet")
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk runs (fdisk is a host package: scripts/host-setup installs it)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("script");
        assert!(child.wait().expect("sfdisk").success());
        path
    }

    #[test]
    fn writes_the_free_slot_labels_it_last_and_never_the_running_one() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = disk(t.path());
        let (usr, verity) = (t.path().join("usr"), t.path().join("verity"));
        std::fs::write(&usr, vec![0xAB; 3 << 20]).expect("usr");
        std::fs::write(&verity, vec![0xCD; 8192]).expect("verity");
        let staged = Staged {
            usr: &usr,
            verity: &verity,
            root_hash: HASH_B,
            label: "img_2",
        };
        // Seen from inside the writer: while data is written the slot is labelled _empty.
        let mut labels_during = Vec::new();
        let mut seen = 0u64;
        let w = write_free_slot(&d, &staged, HASH_A, &mut |done, total| {
            seen = done;
            assert!(done <= total);
            if labels_during.is_empty() {
                let (_, parts) = gpt::read(&d).expect("gpt");
                labels_during = parts.iter().map(|p| p.label.clone()).collect();
            }
        })
        .expect("written");
        assert_eq!(seen, (3 << 20) + 8192);
        assert_eq!(labels_during[3], EMPTY_LABEL);
        assert_eq!(w.previous_label, EMPTY_LABEL);
        let (_, parts) = gpt::read(&d).expect("gpt");
        let (data, hash) = by_root_hash(&parts, HASH_B).expect("new slot found by root hash");
        assert_eq!((data.number, hash.number), (4, 5));
        assert_eq!(
            (data.label.as_str(), hash.label.as_str()),
            ("img_2", "img_2")
        );
        let mut f = File::open(&d).expect("open");
        let mut head = [0u8; 4];
        f.seek(SeekFrom::Start(data.offset)).expect("seek");
        f.read_exact(&mut head).expect("read");
        assert_eq!(head, [0xAB; 4]);
        // The running slot is untouched, and the next update goes to the other slot: now A.
        assert!(by_root_hash(&parts, HASH_A).is_ok());
        let (next, _) = free_slot(&parts, HASH_B).expect("free slot");
        assert_eq!(next.number, 2);
    }

    #[test]
    fn a_release_larger_than_the_slot_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = disk(t.path());
        let (usr, verity) = (t.path().join("usr"), t.path().join("verity"));
        std::fs::write(&usr, vec![0; 5 << 20]).expect("usr");
        std::fs::write(&verity, vec![0; 10]).expect("verity");
        let staged = Staged {
            usr: &usr,
            verity: &verity,
            root_hash: HASH_B,
            label: "img_2",
        };
        let before = gpt::read(&d).expect("gpt").1;
        let e = write_free_slot(&d, &staged, HASH_A, &mut |_, _| {}).expect_err("too big");
        assert!(e.to_string().contains("does not fit partition 4"), "{e:#}");
        let after = gpt::read(&d).expect("gpt").1;
        let labels = |p: &[Partition]| {
            p.iter()
                .map(|p| (p.uuid.clone(), p.label.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(labels(&before), labels(&after), "nothing changed");
        assert!(free_slot(&gpt::read(&d).expect("gpt").1, "9".repeat(64).as_str()).is_err());
    }
}
