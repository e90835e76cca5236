//! The cache under `~/.cache/keel` (or `$KEEL_CACHE`): tools trees, bootstrapped trees,
//! downloaded packages and initrds, each under a key derived from everything that shaped it.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Bump when the layout or meaning of cached entries changes, so old entries are not reused.
const CACHE_FORMAT: &str = "keel-cache-1";

#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// `$KEEL_CACHE`, else `$XDG_CACHE_HOME/keel`, else `~/.cache/keel`.
    pub fn from_env() -> Result<Cache> {
        let dir = if let Some(d) = std::env::var_os("KEEL_CACHE") {
            PathBuf::from(d)
        } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            PathBuf::from(d).join("keel")
        } else {
            let home = std::env::var_os("HOME").context("neither KEEL_CACHE nor HOME is set")?;
            PathBuf::from(home).join(".cache/keel")
        };
        Cache::at(dir)
    }

    pub fn at(dir: PathBuf) -> Result<Cache> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cache directory {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        Ok(Cache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of a cached entry of `kind` under `key`.
    pub fn entry(&self, kind: &str, key: &str) -> PathBuf {
        self.dir.join(kind).join(key)
    }

    /// A scratch path next to the entry, on the same file system, for building it before the
    /// rename that publishes it.
    pub fn staging(&self, kind: &str, key: &str) -> Result<PathBuf> {
        let dir = self.dir.join(kind);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir.join(format!(".{key}.partial-{}", std::process::id())))
    }
}

/// A short, stable key from the inputs of a cached step.
pub fn key<I, S>(parts: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<[u8]>,
{
    let mut h = Sha256::new();
    h.update(CACHE_FORMAT.as_bytes());
    for p in parts {
        let p = p.as_ref();
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..16])
}

/// Moves a finished staging directory or file into place; if another build published the same
/// entry first, keeps that one.
pub fn publish(staging: &Path, entry: &Path) -> Result<()> {
    if let Some(parent) = entry.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::rename(staging, entry) {
        Ok(()) => Ok(()),
        Err(_) if entry.exists() => {
            remove_path(staging)?;
            Ok(())
        }
        Err(e) => {
            Err(e).with_context(|| format!("moving {} to {}", staging.display(), entry.display()))
        }
    }
}

/// Removes a file or a directory tree if it exists.
pub fn remove_path(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))
        }
        Ok(_) => std::fs::remove_file(p).with_context(|| format!("removing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", p.display())),
    }
}

/// The entries of `dir`, or none when it does not exist.
pub fn dir_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.with_context(|| format!("reading {}", dir.display())))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_part_boundaries() {
        assert_ne!(key(["ab", "c"]), key(["a", "bc"]));
        assert_eq!(key(["ab", "c"]), key(["ab", "c"]));
        assert_eq!(key(["x"]).len(), 32);
    }
}
