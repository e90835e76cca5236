//! `manifest.json`: what a build produced and from what. Read by `keel inspect`, `keel diff`,
//! `keel boot`/`keel test` (the expected root hash) and, later, the update and trust tooling.

use crate::compose::dpkg::Package;
use crate::progress::StageTiming;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

pub const MANIFEST_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

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

    pub fn artifact(&self, file: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.file == file)
    }
}

/// sha256 and size of a file.
pub fn digest_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
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
            uki: "keel-1+3.efi".into(),
            partitions: vec![],
            packages: vec![Package {
                name: "systemd".into(),
                version: "257".into(),
            }],
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
                .artifact("x.raw")
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
