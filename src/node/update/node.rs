//! The files keel-update reads and keeps, below a root directory (`/` on a node; a directory in
//! tests): its settings, the trusted root.json, the running image from os-release, the state
//! record, the TUF metadata store and the staging directory.

use super::config::{self, Config};
use super::state::Record;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub struct Node {
    pub root: PathBuf,
}

/// Held while a command changes keel-update's state (released when dropped).
pub struct Lock {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

/// The running image: os-release's IMAGE_ID and IMAGE_VERSION.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Running {
    pub image: String,
    pub version: String,
}

/// The value of `key` in os-release text (quotes removed).
pub fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim().trim_matches('"').trim_matches('\'').to_string())
    })
}

impl Node {
    pub fn new(root: &Path) -> Node {
        Node {
            root: root.to_path_buf(),
        }
    }

    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    pub fn config(&self) -> Result<Config> {
        Ok(Config::load(
            &self.path(config::IMAGE_CONFIG),
            &self.path(config::NODE_CONFIG),
        )?)
    }

    pub fn trusted_root(&self) -> Result<Vec<u8>> {
        let p = self.path(config::IMAGE_ROOT);
        std::fs::read(&p).with_context(|| {
            format!(
                "reading {}: the image has no update repository root (its definition has no [update])",
                p.display()
            )
        })
    }

    pub fn running(&self) -> Result<Running> {
        let p = self.path("/usr/lib/os-release");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let get = |k| {
            os_release_value(&text, k)
                .with_context(|| format!("{}: no {k} (not a Keel image?)", p.display()))
        };
        Ok(Running {
            image: get("IMAGE_ID")?,
            version: get("IMAGE_VERSION")?,
        })
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path(config::STATE_DIR)
    }

    pub fn tuf_store(&self) -> PathBuf {
        self.state_dir().join("tuf")
    }

    pub fn staging(&self) -> PathBuf {
        self.state_dir().join("staging")
    }

    fn record_path(&self) -> PathBuf {
        self.state_dir().join("state.json")
    }

    /// The state record; a node that never updated has the default one.
    pub fn record(&self) -> Result<Record> {
        let p = self.record_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{}: unreadable update state (move it aside to start over; the failed-version list in it is lost then)",
                    p.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save(&self, r: &Record) -> Result<()> {
        crate::atomic::write_json(&self.record_path(), r, 0o600)?;
        Ok(())
    }

    /// Takes keel-update's lock (`/var/lib/keel/update/lock`): one command that changes the state
    /// at a time, so the timer's apply and an operator's, or a check and the health verdict,
    /// never write over each other's record or download into the same files. `wait`: block
    /// until it is free; else fail at once naming the holder's command.
    pub fn lock(&self, wait: bool) -> Result<Lock> {
        use nix::fcntl::{Flock, FlockArg};
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        let lock = Flock::lock(file, arg).map_err(|(_, e)| {
            anyhow::anyhow!(
                "another keel-update command is running (it holds {}: {e}); try again when it is done",
                path.display()
            )
        })?;
        Ok(Lock { _flock: lock })
    }

    /// Whether systemd-timesyncd (or another NTP client telling systemd) synchronised the clock.
    pub fn clock_synchronised(&self) -> bool {
        self.path("/run/systemd/timesync/synchronized").exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_state_changing_command_at_a_time() {
        let t = tempfile::tempdir().expect("tempdir");
        let node = Node::new(t.path());
        let held = node.lock(false).expect("free");
        let e = node.lock(false).err().expect("held by the first");
        assert!(
            e.to_string()
                .contains("another keel-update command is running"),
            "{e}"
        );
        drop(held);
        node.lock(false).expect("free again");
    }

    #[test]
    fn os_release_values() {
        let t = "ID=debian\nIMAGE_ID=cluster-node\nIMAGE_VERSION=\"0.2.0\"\n";
        assert_eq!(
            os_release_value(t, "IMAGE_ID").as_deref(),
            Some("cluster-node")
        );
        assert_eq!(
            os_release_value(t, "IMAGE_VERSION").as_deref(),
            Some("0.2.0")
        );
        assert_eq!(os_release_value(t, "IMAGE"), None);
    }
}
