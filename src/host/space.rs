//! Free space, checked before the steps that write large files. Some tools do not stop when
//! their disk fills: mkfs.erofs retried a failed write for 50 minutes in one CI run until the
//! run's time ran out. Checking first turns that into an error that names the directory, what
//! was about to be written, how much it needs and how much there is.

use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error(
        "not enough free space for {what} in {dir}: about {need} MiB needed, {free} MiB free; \
         free some space on that file system (old runs under build/test-results, unused \
         images under build/) or point KEEL_CACHE at a larger one",
        need = .need / MIB,
        free = .free / MIB
    )]
    Short {
        what: String,
        dir: PathBuf,
        need: u64,
        free: u64,
    },
    #[error("reading the free space of {dir}: {source}")]
    Stat {
        dir: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("measuring {path}: {source}")]
    Walk {
        path: PathBuf,
        #[source]
        source: walkdir::Error,
    },
}

/// Bytes an unprivileged writer may still use on the file system holding `dir` (the nearest
/// existing ancestor, so a directory about to be created can be asked about).
pub fn free_bytes(dir: &Path) -> Result<u64, SpaceError> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p,
            _ => {
                probe = Path::new(".");
                break;
            }
        }
    }
    crate::disk::free_bytes(probe).map_err(|source| SpaceError::Stat {
        dir: dir.to_path_buf(),
        source,
    })
}

/// Fails unless the file system holding `dir` has `need` bytes free for `what`.
pub fn require(dir: &Path, need: u64, what: &str) -> Result<(), SpaceError> {
    check(dir, need, free_bytes(dir)?, what)
}

fn check(dir: &Path, need: u64, free: u64, what: &str) -> Result<(), SpaceError> {
    if free < need {
        return Err(SpaceError::Short {
            what: what.to_string(),
            dir: dir.to_path_buf(),
            need,
            free,
        });
    }
    Ok(())
}

/// The bytes the regular files under `dir` hold (apparent sizes; links not followed).
pub fn tree_bytes(dir: &Path) -> Result<u64, SpaceError> {
    let mut total = 0u64;
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(|source| SpaceError::Walk {
            path: dir.to_path_buf(),
            source,
        })?;
        if entry.file_type().is_file() {
            let meta = entry.metadata().map_err(|source| SpaceError::Walk {
                path: entry.path().to_path_buf(),
                source,
            })?;
            total = total.saturating_add(meta.len());
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_space_names_the_directory_the_need_and_the_fix() {
        let err = check(
            Path::new("/cache/work"),
            3 << 30,
            300 << 20,
            "the erofs /usr image",
        )
        .expect_err("short");
        let msg = err.to_string();
        assert!(msg.contains("the erofs /usr image"), "{msg}");
        assert!(msg.contains("/cache/work"), "{msg}");
        assert!(msg.contains("3072 MiB needed, 300 MiB free"), "{msg}");
        assert!(msg.contains("KEEL_CACHE"), "{msg}");
        assert!(check(Path::new("/x"), 10, 10, "y").is_ok());
    }

    #[test]
    fn free_space_of_a_missing_directory_is_its_ancestors() {
        let dir = tempfile::tempdir().expect("tmp");
        // statvfs of the path itself would fail (ENOENT).
        assert!(nix::sys::statvfs::statvfs(&dir.path().join("not/yet")).is_err());
        free_bytes(&dir.path().join("not/yet")).expect("statvfs of the ancestor");
    }

    #[test]
    fn tree_bytes_sums_regular_files() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("d")).expect("mkdir");
        std::fs::write(dir.path().join("a"), [0u8; 100]).expect("write");
        std::fs::write(dir.path().join("d/b"), [0u8; 23]).expect("write");
        std::os::unix::fs::symlink("a", dir.path().join("l")).expect("symlink");
        assert_eq!(tree_bytes(dir.path()).expect("walk"), 123);
    }
}
