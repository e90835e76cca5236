//! Installing a release on the node: every byte downloaded through TUF and checked, the UKI's
//! PCR policy key checked against the key the root is sealed to, /usr checked against its
//! hash tree, the free slot written (`disk::slot`), read back through the kernel's dm-verity,
//! and the UKI staged in the ESP under a name the boot loader ignores.
//!
//! Nothing here makes the release bootable: that is activation (`Entries::activate`), done
//! only when the operator or the strategy says so. A power cut at any point leaves the running
//! version booting; the next `apply` starts the install again.

use super::loader::Entries;
use super::node::Node;
use crate::disk::{gpt, slot, uki, verity};
use crate::update::release::Release;
use crate::update::tuf;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The running /usr's root hash, from the kernel command line's `usrhash=`.
pub fn running_root_hash(node: &Node) -> Result<String> {
    let p = node.path("/proc/cmdline");
    let cmdline =
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    uki::usrhash(&cmdline).with_context(|| format!("{}: no usrhash=", p.display()))
}

/// The whole disk the running /usr comes from: the partition below the dm-verity device
/// `/dev/mapper/usr` (not a lookup by partition UUID, which a second disk holding the same
/// version, an installer stick or a clone, would share), and that partition's device.
pub fn boot_disk(node: &Node) -> Result<(PathBuf, PathBuf)> {
    let usr = node.path("/dev/mapper/usr");
    let dm = usr
        .canonicalize()
        .with_context(|| format!("resolving {}", usr.display()))?;
    let dm_name = dm
        .file_name()
        .context("dm device name")?
        .to_string_lossy()
        .into_owned();
    let slaves = node.path(&format!("/sys/class/block/{dm_name}/slaves"));
    let mut below: Vec<String> = std::fs::read_dir(&slaves)
        .with_context(|| format!("reading {}", slaves.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    below.sort();
    // dm-verity has two: the data and the hash partition, on the same disk.
    let name = below
        .first()
        .with_context(|| format!("{} has no device below it", usr.display()))?
        .clone();
    let part = node.path(&format!("/dev/{name}"));
    let sys = node
        .path(&format!("/sys/class/block/{name}"))
        .canonicalize()
        .with_context(|| format!("finding {name} in sysfs"))?;
    let disk = sys
        .parent()
        .and_then(Path::file_name)
        .context("the partition's disk in sysfs")?
        .to_string_lossy()
        .into_owned();
    Ok((node.path(&format!("/dev/{disk}")), part))
}

/// The device of partition `number` of `disk` (from sysfs: `/dev/vda3`, `/dev/nvme0n1p3`, …).
pub fn partition_device(node: &Node, disk: &Path, number: u32) -> Result<PathBuf> {
    let name = disk
        .file_name()
        .context("disk device name")?
        .to_string_lossy()
        .into_owned();
    let dir = node.path(&format!("/sys/class/block/{name}"));
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let p = e.path().join("partition");
        if std::fs::read_to_string(&p).is_ok_and(|n| n.trim() == number.to_string()) {
            return Ok(node.path(&format!("/dev/{}", e.file_name().to_string_lossy())));
        }
    }
    bail!("{} has no partition {number} in sysfs", disk.display())
}

/// The fingerprint (`trust::measure::key_fingerprint`) of a PEM public key.
fn fingerprint(pem: &[u8]) -> Result<String> {
    let key = crate::trust::keys::public_from_pem(pem).context("not a PEM public key")?;
    Ok(crate::trust::measure::key_fingerprint(&key)?)
}

/// The fingerprints of the keys the root volume is sealed to (its LUKS2 header), or, when the
/// root is not a sealed volume, of the running image's PCR key.
pub fn sealed_fingerprints(node: &Node) -> Result<(Vec<String>, String)> {
    let root = node.path("/dev/mapper/root");
    if let Ok(dm) = root.canonicalize() {
        let name = dm
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let slaves = node.path(&format!("/sys/class/block/{name}/slaves"));
        if let Some(Ok(slave)) = std::fs::read_dir(&slaves).ok().and_then(|mut d| d.next()) {
            let dev = node.path(&format!("/dev/{}", slave.file_name().to_string_lossy()));
            let mut header = vec![0u8; 1 << 20];
            let n = std::io::Read::read(
                &mut std::fs::File::open(&dev)
                    .with_context(|| format!("opening {}", dev.display()))?,
                &mut header,
            )?;
            header.truncate(n);
            let keys = super::sealed::sealed_keys(&header);
            if !keys.is_empty() {
                let fps = keys
                    .iter()
                    .map(crate::trust::measure::key_fingerprint)
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok((fps, format!("the TPM2 token of {}", dev.display())));
            }
        }
    }
    let p = node.path("/usr/lib/keel/trust/pcr-initrd.pub.pem");
    let pem = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok((vec![fingerprint(&pem)?], p.display().to_string()))
}

/// Checks a downloaded UKI before anything is written: its `usrhash=` is the release's root
/// hash, and its PCR policy key is one the root is sealed to (else the new version could not
/// unlock the root and would stop at a recovery prompt).
pub fn check_uki(
    bytes: &[u8],
    release: &Release,
    image: &str,
    sealed: &[String],
    sealed_from: &str,
) -> Result<()> {
    let view = uki::read(&release.uki, bytes)?;
    // The index is signed by the online TUF keys; the UKI by the build. An older signed
    // release listed under a new version number says its real version here.
    let osrel = |k| super::node::os_release_value(&view.os_release, k);
    let (id, ver) = (osrel("IMAGE_ID"), osrel("IMAGE_VERSION"));
    if id.as_deref() != Some(image) || ver.as_deref() != Some(release.version.as_str()) {
        bail!(
            "{}: its os-release says image {} version {}, but the release index lists it as {image} {}; refused before anything was written",
            release.uki,
            id.as_deref().unwrap_or("(none)"),
            ver.as_deref().unwrap_or("(none)"),
            release.version
        );
    }
    if uki::usrhash(&view.cmdline).as_deref() != Some(release.root_hash.as_str()) {
        bail!(
            "{}: its command line does not pin the release's /usr (usrhash= is not {})",
            release.uki,
            release.root_hash
        );
    }
    let (off, len) = uki::section_range(bytes, ".pcrpkey")?;
    let fp = fingerprint(&bytes[off..off + len])
        .with_context(|| format!("{}: the .pcrpkey section", release.uki))?;
    if fp != release.pcr_initrd_key {
        bail!(
            "{}: its .pcrpkey ({fp}) is not the key the release index names ({})",
            release.uki,
            release.pcr_initrd_key
        );
    }
    if !sealed.contains(&fp) {
        bail!(
            "{} {} is signed with PCR key {fp}, but this node's root is sealed to {} ({sealed_from}): it would not unlock here; refused before anything was written (re-seal the root to the new key first, docs/trusted-boot.md)",
            release.uki,
            release.version,
            sealed.join(", ")
        );
    }
    let key = crate::trust::keys::public_from_pem(&bytes[off..off + len])
        .with_context(|| format!("{}: the .pcrpkey section", release.uki))?;
    check_pcrsig(bytes, &release.uki, &key, &fp)
}

/// The UKI's `.pcrsig` must hold a signature by `key` (fingerprint `fp`) over the policy for
/// the PCR 11 value its own sections give when the initrd starts: what the TPM checks before
/// it releases the root's key. A UKI whose signature is missing, stale (sections changed
/// after signing) or made with another key would stop at the recovery prompt.
fn check_pcrsig(
    bytes: &[u8],
    name: &str,
    key: &openssl::pkey::PKey<openssl::pkey::Public>,
    fp: &str,
) -> Result<()> {
    use crate::trust::measure;
    let sections = measure::measured_sections(bytes)
        .with_context(|| format!("{name}: reading its measured sections"))?;
    let want = measure::predict(&sections)
        .into_iter()
        .find(|p| p.phase == "enter-initrd")
        .context("no enter-initrd prediction")?
        .policy;
    let (off, len) = uki::section_range(bytes, ".pcrsig")
        .with_context(|| format!("{name}: no .pcrsig section (an unsigned PCR policy)"))?;
    let text = std::str::from_utf8(&bytes[off..off + len])
        .with_context(|| format!("{name}: .pcrsig is not text"))?;
    let doc =
        measure::parse_pcrsig(text).with_context(|| format!("{name}: reading its .pcrsig"))?;
    let signed = doc.get("sha256").into_iter().flatten().any(|e| {
        e.pcrs == [measure::PCR_KERNEL_BOOT]
            && e.pkfp == fp
            && e.pol == want
            && measure::verify_entry(e, key).unwrap_or(false)
    });
    if !signed {
        bail!(
            "{name}: its .pcrsig holds no valid signature by {fp} for the PCR 11 value its own sections give when the initrd starts (policy {want}): the TPM would not release the root's key to it; refused before anything was written"
        );
    }
    Ok(())
}

/// Reads the written slot through a dm-verity device the kernel sets up with the trusted root
/// hash: any block that differs is an I/O error.
pub fn read_back(data: &Path, hash: &Path, root_hash: &str) -> Result<()> {
    let name = "keel-update-check";
    let veritysetup = "/usr/lib/systemd/systemd-veritysetup";
    let _ = Command::new(veritysetup).args(["detach", name]).output();
    let out = Command::new(veritysetup)
        .args(["attach", name])
        .arg(data)
        .arg(hash)
        .arg(root_hash)
        .output()
        .context("running systemd-veritysetup attach")?;
    if !out.status.success() {
        bail!(
            "the written slot does not verify: systemd-veritysetup attach failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dev = PathBuf::from(format!("/dev/mapper/{name}"));
    let read = std::fs::File::open(&dev)
        .and_then(|mut f| std::io::copy(&mut f, &mut std::io::sink()))
        .with_context(|| format!("reading {} back through dm-verity", dev.display()));
    let _ = Command::new(veritysetup).args(["detach", name]).output();
    read.map(|_| ())
}

/// The signed lengths of a release's targets.
#[derive(Clone, Copy)]
struct Lengths {
    uki: u64,
    usr: u64,
    verity: u64,
}

/// Where they go: the free slot's two partitions, the staging directory's file system (/var),
/// and the ESP (the staged UKI).
#[derive(Clone, Copy)]
struct Room {
    slot: u64,
    hash_slot: u64,
    staging: u64,
    esp: u64,
}

/// Space left for others on /var (etcd's data lives there) after the downloads.
const STAGING_RESERVE: u64 = 256 << 20;

fn fits(version: &str, l: &Lengths, room: &Room) -> Result<()> {
    let mib = |b: u64| b >> 20;
    if l.usr > room.slot || l.verity > room.hash_slot {
        bail!(
            "{version} does not fit the free slot: /usr {} MiB and its hash tree {} MiB, the slot's partitions {} MiB and {} MiB; nothing downloaded",
            mib(l.usr),
            mib(l.verity),
            mib(room.slot),
            mib(room.hash_slot)
        );
    }
    let staged = l.uki.saturating_add(l.usr).saturating_add(l.verity);
    if staged.saturating_add(STAGING_RESERVE) > room.staging {
        bail!(
            "{version} needs {} MiB in /var/lib/keel/update/staging and {} MiB more left free; {} MiB are free; nothing downloaded",
            mib(staged),
            mib(STAGING_RESERVE),
            mib(room.staging)
        );
    }
    if l.uki > room.esp {
        bail!(
            "{version}'s UKI ({} MiB) does not fit the ESP ({} MiB free); nothing downloaded",
            mib(l.uki),
            mib(room.esp)
        );
    }
    Ok(())
}

/// Bytes free for unprivileged writers on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    crate::disk::free_bytes(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))
}

/// The steps of an install, for progress lines and for the tests' pause hook.
pub fn log_progress(what: &str) -> impl FnMut(u64) + '_ {
    let mut last = 0u64;
    move |done| {
        let mib = done >> 20;
        if mib >= last + 32 {
            last = mib;
            tracing::info!("{what}: {mib} MiB");
        }
    }
}

/// What an install writes: the release (as found by a check), the image's name (slot labels),
/// the boot attempts it gets, the mounted ESP, and `pause_at`: stop (sleep until killed) once
/// this many bytes were written to the slot — the hook the interrupted-install test uses to cut
/// the power at a known point.
pub struct Plan<'a> {
    pub release: &'a Release,
    pub image: &'a str,
    pub tries: u32,
    pub esp: &'a Path,
    pub pause_at: Option<u64>,
}

/// Installs a release into the free slot; returns the bytes of targets downloaded. A failure
/// leaves no downloaded file behind.
pub async fn install(node: &Node, repo: &tough::Repository, plan: &Plan<'_>) -> Result<u64> {
    let r = install_steps(node, repo, plan).await;
    if r.is_err() {
        let _ = std::fs::remove_dir_all(node.staging().join(&plan.release.version));
    }
    r
}

async fn install_steps(node: &Node, repo: &tough::Repository, plan: &Plan<'_>) -> Result<u64> {
    let Plan {
        release,
        image,
        tries,
        esp,
        pause_at,
    } = *plan;
    // What an install cut off by a power cut or a kill left, of any version, goes first.
    let _ = std::fs::remove_dir_all(node.staging());
    let staging = node.staging().join(&release.version);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    // 0. Before any byte is fetched: the signed lengths fit the free slot and /var.
    let running = running_root_hash(node)?;
    let (disk, _) = boot_disk(node)?;
    let (_, parts) = gpt::read(&disk)?;
    let (free, free_hash) = slot::free_slot(&parts, &running)?;
    let lengths = Lengths {
        uki: tuf::target_length(repo, &release.uki)?,
        usr: tuf::target_length(repo, &release.usr)?,
        verity: tuf::target_length(repo, &release.verity)?,
    };
    let room = Room {
        slot: free.size,
        hash_slot: free_hash.size,
        staging: free_bytes(&staging)?,
        esp: free_bytes(esp)?,
    };
    fits(&release.version, &lengths, &room)?;
    // 1. The UKI first: small, and it says whether this node can boot the release at all.
    let uki_file = staging.join("uki.efi");
    let mut downloaded = tuf::save(repo, &release.uki, &uki_file, log_progress("UKI")).await?;
    let uki_bytes = std::fs::read(&uki_file)?;
    let (sealed, from) = sealed_fingerprints(node)?;
    check_uki(&uki_bytes, release, image, &sealed, &from)?;
    // 2. /usr and its tree, each checked by TUF, then against each other and the root hash.
    let (usr, tree) = (staging.join("usr"), staging.join("verity"));
    downloaded += tuf::save(repo, &release.usr, &usr, log_progress("/usr")).await?;
    downloaded += tuf::save(repo, &release.verity, &tree, log_progress("hash tree")).await?;
    let tree_bytes = std::fs::read(&tree)?;
    let mut reader = std::io::BufReader::new(std::fs::File::open(&usr)?);
    let root = verity::check(&mut reader, &tree_bytes).context("checking the downloaded /usr")?;
    if root != release.root_hash {
        bail!(
            "the downloaded /usr hashes to {root}, the release says {}",
            release.root_hash
        );
    }
    // 3. The free slot: whatever version it held loses its boot entry first.
    let entries = Entries::new(esp);
    if let Some(v) = free.label.strip_prefix(&format!("{image}_")) {
        tracing::info!("slot {} held {v}; removing its boot entry", free.number);
        entries.remove(v)?;
    }
    let label = format!("{image}_{}", release.version);
    let staged = slot::Staged {
        usr: &usr,
        verity: &tree,
        root_hash: &release.root_hash,
        label: &label,
    };
    let mut progress = log_progress("writing the slot");
    let written = slot::write_free_slot(&disk, &staged, &running, &mut |done, _total| {
        progress(done);
        if pause_at.is_some_and(|p| done >= p) {
            tracing::warn!("paused after {done} bytes (KEEL_UPDATE_PAUSE_AT)");
            let _ = std::fs::write("/run/keel-update-paused", done.to_string());
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    })?;
    // 4. Read back through the kernel's dm-verity, as the next boot will.
    let data_dev = partition_device(node, &disk, written.data.number)?;
    let hash_dev = partition_device(node, &disk, written.hash.number)?;
    read_back(&data_dev, &hash_dev, &release.root_hash)?;
    // 5. The UKI, staged: invisible to the boot loader until activated.
    for (name, e) in entries.list()? {
        if e.version == release.version {
            std::fs::remove_file(entries.dir.join(&name))?;
        }
    }
    let name = uki::staged_uki_name(&release.version, tries);
    crate::atomic::write(&entries.dir.join(&name), &uki_bytes, 0o644)
        .with_context(|| format!("staging the UKI as {name}"))?;
    std::fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    tracing::info!(
        "installed {} into partitions {} and {}; UKI staged as {name}",
        release.version,
        written.data.number,
        written.hash.number
    );
    Ok(downloaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_disk_is_the_one_below_the_usr_verity_device() {
        let t = tempfile::tempdir().expect("tempdir");
        let node = Node::new(t.path());
        let sys = t.path().join("sys/class/block");
        std::fs::create_dir_all(sys.join("dm-0/slaves/vda2")).expect("mkdir");
        std::fs::create_dir_all(sys.join("dm-0/slaves/vda3")).expect("mkdir");
        std::fs::create_dir_all(sys.join("vda/vda2")).expect("mkdir");
        std::os::unix::fs::symlink("vda/vda2", sys.join("vda2")).expect("link");
        std::fs::create_dir_all(t.path().join("dev/mapper")).expect("mkdir");
        std::fs::write(t.path().join("dev/dm-0"), b"").expect("dev");
        std::os::unix::fs::symlink("../dm-0", t.path().join("dev/mapper/usr")).expect("link");
        let (disk, part) = boot_disk(&node).expect("found");
        assert_eq!(disk, t.path().join("dev/vda"));
        assert_eq!(part, t.path().join("dev/vda2"));
    }

    #[test]
    fn partition_devices_come_from_sysfs() {
        let t = tempfile::tempdir().expect("tempdir");
        let node = Node::new(t.path());
        let sys = t.path().join("sys/class/block/nvme0n1");
        for (part, n) in [("nvme0n1p1", 1), ("nvme0n1p4", 4)] {
            std::fs::create_dir_all(sys.join(part)).expect("mkdir");
            std::fs::write(sys.join(part).join("partition"), format!("{n}\n")).expect("w");
        }
        let disk = t.path().join("dev/nvme0n1");
        assert_eq!(
            partition_device(&node, &disk, 4).expect("found"),
            t.path().join("dev/nvme0n1p4")
        );
        assert!(partition_device(&node, &disk, 5).is_err());
    }

    /// A minimal PE32+ file with the given sections (what `uki::read` and `section_range` need).
    fn pe(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let n = sections.len();
        let headers = 0x80 + 24 + 240 + 40 * n;
        let align = |x: usize| x.div_ceil(512) * 512;
        let mut out = vec![0u8; align(headers)];
        out[..2].copy_from_slice(b"MZ");
        out[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        out[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        out[coff..coff + 2].copy_from_slice(&0x8664u16.to_le_bytes());
        out[coff + 2..coff + 4].copy_from_slice(&(n as u16).to_le_bytes());
        out[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        out[coff + 18..coff + 20].copy_from_slice(&0x22u16.to_le_bytes());
        let opt = coff + 20;
        out[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        out[opt + 32..opt + 36].copy_from_slice(&0x1000u32.to_le_bytes());
        out[opt + 36..opt + 40].copy_from_slice(&0x200u32.to_le_bytes());
        out[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        let mut table = opt + 240;
        let mut va = 0x1000u32;
        for (name, data) in sections {
            let at = out.len();
            out.extend_from_slice(data);
            out.resize(align(out.len()), 0);
            let mut h = [0u8; 40];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
            h[12..16].copy_from_slice(&va.to_le_bytes());
            h[16..20].copy_from_slice(&(align(data.len()) as u32).to_le_bytes());
            h[20..24].copy_from_slice(&(at as u32).to_le_bytes());
            h[36..40].copy_from_slice(&0x4000_0040u32.to_le_bytes());
            out[table..table + 40].copy_from_slice(&h);
            table += 40;
            va += align(data.len()).max(0x1000) as u32;
        }
        out
    }

    #[test]
    fn a_release_too_big_for_the_slot_or_var_is_refused_before_downloading() {
        const M: u64 = 1 << 20;
        let l = Lengths {
            uki: 31 * M,
            usr: 340 * M,
            verity: 3 * M,
        };
        let room = Room {
            slot: 1024 * M,
            hash_slot: 64 * M,
            staging: 2048 * M,
            esp: 400 * M,
        };
        fits("0.2.0", &l, &room).expect("fits");
        let e = fits("0.2.0", &Lengths { usr: 2048 * M, ..l }, &room).expect_err("slot");
        assert!(
            format!("{e:#}").contains("does not fit the free slot"),
            "{e:#}"
        );
        let e = fits(
            "0.2.0",
            &l,
            &Room {
                staging: 500 * M,
                ..room
            },
        )
        .expect_err("var");
        assert!(
            format!("{e:#}").contains("374 MiB in /var/lib/keel/update/staging"),
            "{e:#}"
        );
        let e = fits(
            "0.2.0",
            &l,
            &Room {
                esp: 10 * M,
                ..room
            },
        )
        .expect_err("esp");
        assert!(format!("{e:#}").contains("does not fit the ESP"), "{e:#}");
    }

    #[test]
    fn an_update_signed_with_another_pcr_key_is_refused_before_anything_is_written() {
        let sealed_key =
            openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).expect("rsa"))
                .expect("key");
        let other_key =
            openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).expect("rsa"))
                .expect("key");
        let fp = |k: &openssl::pkey::PKey<openssl::pkey::Private>| {
            crate::trust::measure::key_fingerprint(k).expect("fp")
        };
        let hash = "cd".repeat(32);
        let release = |key: &str| Release {
            version: "0.2.0".into(),
            root_hash: hash.clone(),
            usr: "img_0.2.0.usr".into(),
            verity: "img_0.2.0.verity".into(),
            uki: "img_0.2.0.efi".into(),
            manifest: "img_0.2.0.manifest.json".into(),
            pcr_initrd_key: key.into(),
        };
        // Sections, then a .pcrsig signed by `signer` over what those sections predict.
        let signed_uki = |k: &openssl::pkey::PKey<openssl::pkey::Private>,
                          signer: &openssl::pkey::PKey<openssl::pkey::Private>,
                          cmdline: &str,
                          tamper_after_signing: bool| {
            let osrel = "ID=debian\nIMAGE_ID=img\nIMAGE_VERSION=0.2.0\n";
            let pem = k.public_key_to_pem().expect("pem");
            let mut secs: Vec<(&str, Vec<u8>)> = vec![
                (".linux", b"a kernel".to_vec()),
                (".osrel", osrel.as_bytes().to_vec()),
                (".cmdline", cmdline.as_bytes().to_vec()),
                (".pcrpkey", pem),
            ];
            let unsigned: Vec<(&str, &[u8])> =
                secs.iter().map(|(n, d)| (*n, d.as_slice())).collect();
            let preds = crate::trust::measure::predict(
                &crate::trust::measure::measured_sections(&pe(&unsigned)).expect("sections"),
            );
            let entries = crate::trust::measure::sign_phases(&preds, &["enter-initrd"], signer)
                .expect("sign");
            if tamper_after_signing {
                secs[0].1 = b"another kernel".to_vec();
            }
            let sig = crate::trust::measure::pcrsig_json(entries).expect("json");
            secs.push((".pcrsig", sig.into_bytes()));
            let all: Vec<(&str, &[u8])> = secs.iter().map(|(n, d)| (*n, d.as_slice())).collect();
            pe(&all)
        };
        let uki_with = |k: &openssl::pkey::PKey<openssl::pkey::Private>, cmdline: &str| {
            signed_uki(k, k, cmdline, false)
        };
        let good_cmdline = format!("usrhash={hash} rw");
        let sealed = vec![fp(&sealed_key)];
        // Signed with the key the root is sealed to: accepted.
        check_uki(
            &uki_with(&sealed_key, &good_cmdline),
            &release(&fp(&sealed_key)),
            "img",
            &sealed,
            "token",
        )
        .expect("same key");
        // Another key (the index honestly names it): refused, both fingerprints named.
        let e = check_uki(
            &uki_with(&other_key, &good_cmdline),
            &release(&fp(&other_key)),
            "img",
            &sealed,
            "the TPM2 token of /dev/vda6",
        )
        .expect_err("other key");
        let text = format!("{e:#}");
        assert!(
            text.contains(&fp(&other_key)) && text.contains(&fp(&sealed_key)),
            "{text}"
        );
        assert!(text.contains("would not unlock here"), "{text}");
        // The index lies about the key: refused.
        let e = check_uki(
            &uki_with(&other_key, &good_cmdline),
            &release(&fp(&sealed_key)),
            "img",
            &sealed,
            "token",
        )
        .expect_err("index mismatch");
        assert!(
            format!("{e:#}").contains("is not the key the release index names"),
            "{e:#}"
        );
        // A UKI that pins another /usr: refused.
        let e = check_uki(
            &uki_with(&sealed_key, &format!("usrhash={} rw", "ee".repeat(32))),
            &release(&fp(&sealed_key)),
            "img",
            &sealed,
            "token",
        )
        .expect_err("other usr");
        assert!(
            format!("{e:#}").contains("does not pin the release's /usr"),
            "{e:#}"
        );
        // The right .pcrpkey, but the policy signed by another key (a build that mixed keys):
        // the TPM would refuse it, so it is refused here.
        let e = check_uki(
            &signed_uki(&sealed_key, &other_key, &good_cmdline, false),
            &release(&fp(&sealed_key)),
            "img",
            &sealed,
            "token",
        )
        .expect_err("signed by another key");
        assert!(
            format!("{e:#}").contains("holds no valid signature"),
            "{e:#}"
        );
        // Signed, then a measured section changed: the signature is for other PCR 11 values.
        let e = check_uki(
            &signed_uki(&sealed_key, &sealed_key, &good_cmdline, true),
            &release(&fp(&sealed_key)),
            "img",
            &sealed,
            "token",
        )
        .expect_err("stale signature");
        assert!(
            format!("{e:#}").contains("holds no valid signature"),
            "{e:#}"
        );
        // The online keys list an older signed release under a new version number (or under
        // another image's name): the UKI's own os-release gives it away.
        let mut relisted = release(&fp(&sealed_key));
        relisted.version = "9.0.0".into();
        let e = check_uki(
            &uki_with(&sealed_key, &good_cmdline),
            &relisted,
            "img",
            &sealed,
            "token",
        )
        .expect_err("relisted");
        assert!(
            format!("{e:#}").contains("version 0.2.0, but the release index lists it as img 9.0.0"),
            "{e:#}"
        );
        let e = check_uki(
            &uki_with(&sealed_key, &good_cmdline),
            &release(&fp(&sealed_key)),
            "another-image",
            &sealed,
            "token",
        )
        .expect_err("other image");
        assert!(format!("{e:#}").contains("says image img"), "{e:#}");
    }

    #[test]
    fn the_running_root_hash_comes_from_the_command_line() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("proc")).expect("mkdir");
        let h = "ab".repeat(32);
        std::fs::write(t.path().join("proc/cmdline"), format!("usrhash={h} rw\n")).expect("w");
        assert_eq!(running_root_hash(&Node::new(t.path())).expect("hash"), h);
    }
}
