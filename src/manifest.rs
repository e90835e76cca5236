//! `manifest.json`: what a build produced and from what. Read by `keel inspect`, `keel diff`,
//! `keel boot`/`keel test` (the expected root hash) and, later, the update and trust tooling.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// A Debian package and its version, as installed in an image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// How long one stage of a build took.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
}

pub const MANIFEST_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a trusted image's UKI was measured and signed as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustInfo {
    /// PCR 11 (sha256 bank) per boot phase, with its PolicyPCR digest.
    pub pcr11: Vec<crate::trust::measure::PhasePrediction>,
    /// `pkfp` of the key that signs the initrd phase (the root volume is sealed to it).
    pub pcr_initrd_key: String,
    /// `pkfp` of the key that signs the later phases.
    pub pcr_boot_key: String,
    /// systemd-boot and the UKI carry Authenticode signatures by the db key.
    pub secure_boot_signed: bool,
    /// `trust.without-tpm` of the definition.
    pub without_tpm: String,
    /// The certificates to enrol for Secure Boot (public; `keel boot --secure-boot` uses them).
    pub secure_boot: SecureBootCerts,
}

/// Secure Boot certificates (PEM) and the EFI signature owner GUID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureBootCerts {
    pub owner_guid: String,
    pub pk: String,
    pub kek: String,
    pub db: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Artifact {
    pub file: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartitionInfo {
    pub label: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub uuid: Option<String>,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: String,
    pub description: String,
    /// The definition file, as given to `keel build`.
    pub definition: String,
    pub ostree_commit: String,
    /// The cached base tree the image was composed on (same packages, same base).
    pub ostree_base_commit: String,
    pub ostree_repo: String,
    pub usr_root_hash: String,
    /// Bytes of the erofs /usr file system (the slot itself is `usr-size`).
    pub usr_filesystem_bytes: u64,
    pub cmdline: String,
    pub kernel: String,
    pub source_date_epoch: u64,
    pub uki: String,
    pub partitions: Vec<PartitionInfo>,
    pub packages: Vec<Package>,
    /// Trusted boot: predicted PCR 11 values and the keys that signed them (absent for unsigned
    /// images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustInfo>,
    pub artifacts: Vec<Artifact>,
    pub timings: Vec<StageTiming>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let m: Manifest =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if m.format != MANIFEST_FORMAT {
            bail!(
                "{}: manifest format {} is not the supported {MANIFEST_FORMAT}",
                path.display(),
                m.format
            );
        }
        Ok(m)
    }

    /// Loads from a manifest file or a build output directory.
    pub fn find(path: &Path) -> Result<Manifest> {
        if path.is_dir() {
            Manifest::load(&path.join(MANIFEST_FILE))
        } else {
            Manifest::load(path)
        }
    }
}

/// sha256 and size of a file. Holes of sparse files (disk images are mostly holes) are hashed
/// as zeros without reading them, which is what reading them would give.
pub fn digest_file(path: &Path) -> Result<(String, u64)> {
    use nix::unistd::{lseek, Whence};
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsFd;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let zeros = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < size {
        let at = i64::try_from(pos).context("file too large")?;
        // Next data at or after pos; everything before it is a hole. ENXIO: no more data.
        let data = match lseek(f.as_fd(), at, Whence::SeekData) {
            Ok(d) => u64::try_from(d).unwrap_or(size).min(size),
            Err(nix::errno::Errno::ENXIO) => size,
            Err(_) => pos, // no hole support: read everything
        };
        let mut hole = data - pos;
        while hole > 0 {
            let n = hole.min(zeros.len() as u64) as usize;
            h.update(&zeros[..n]);
            hole -= n as u64;
        }
        pos = data;
        if pos >= size {
            break;
        }
        let end = match lseek(
            f.as_fd(),
            i64::try_from(pos).context("file too large")?,
            Whence::SeekHole,
        ) {
            Ok(e) => u64::try_from(e).unwrap_or(size).min(size),
            Err(_) => size,
        };
        f.seek(SeekFrom::Start(pos))
            .with_context(|| format!("seeking in {}", path.display()))?;
        let mut left = end - pos;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f
                .read(&mut buf[..want])
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                bail!("{} shrank while being hashed", path.display());
            }
            h.update(&buf[..n]);
            left -= n as u64;
        }
        pos = end;
    }
    tracing::debug!(file = %path.display(), size, "sha256 computed");
    Ok((hex::encode(h.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "x".into(),
            version: "1".into(),
            description: String::new(),
            definition: "images/x.toml".into(),
            ostree_commit: "c".into(),
            ostree_base_commit: "b".into(),
            ostree_repo: "/r".into(),
            usr_root_hash: "h".into(),
            usr_filesystem_bytes: 1,
            cmdline: "usrhash=h rw".into(),
            kernel: "6.12".into(),
            source_date_epoch: 0,
            uki: "keel-1.efi".into(),
            partitions: vec![],
            packages: vec![Package {
                name: "systemd".into(),
                version: "257".into(),
            }],
            trust: None,
            artifacts: vec![Artifact {
                file: "x.raw".into(),
                sha256: "00".into(),
                size: 3,
            }],
            timings: vec![],
        }
    }

    #[test]
    fn round_trips_through_a_file_and_a_directory() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            t.path().join(MANIFEST_FILE),
            serde_json::to_string(&sample()).expect("json"),
        )
        .expect("write");
        assert_eq!(Manifest::find(t.path()).expect("load"), sample());
        assert_eq!(
            Manifest::find(&t.path().join(MANIFEST_FILE))
                .expect("load")
                .artifacts
                .iter()
                .find(|a| a.file == "x.raw")
                .map(|a| a.size),
            Some(3)
        );
    }

    #[test]
    fn other_formats_are_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut m = sample();
        m.format = 99;
        std::fs::write(
            t.path().join(MANIFEST_FILE),
            serde_json::to_string(&m).expect("json"),
        )
        .expect("write");
        let err = format!("{:#}", Manifest::find(t.path()).expect_err("refused"));
        assert!(err.contains("format 99"), "{err}");
    }

    #[test]
    fn sparse_files_hash_like_their_bytes() {
        use std::io::{Seek, SeekFrom, Write};
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("sparse");
        let mut f = std::fs::File::create(&p).expect("create");
        f.set_len(9 << 20).expect("len");
        f.seek(SeekFrom::Start(3 << 20)).expect("seek");
        f.write_all(&[7u8; 5000]).expect("write");
        f.seek(SeekFrom::Start((9 << 20) - 3)).expect("seek");
        f.write_all(b"end").expect("write");
        drop(f);
        let bytes = std::fs::read(&p).expect("read");
        let want = hex::encode(<Sha256 as Digest>::digest(&bytes));
        assert_eq!(digest_file(&p).expect("digest"), (want, bytes.len() as u64));
    }

    #[test]
    fn digest_matches_sha256sum() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("f");
        std::fs::write(&p, "abc").expect("write");
        let (h, n) = digest_file(&p).expect("digest");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(n, 3);
    }
}
