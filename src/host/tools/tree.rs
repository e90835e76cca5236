//! The tools tree: a Debian trixie tree with systemd 257-era tools (systemd-repart, ukify,
//! systemd-measure, mkfs.erofs, veritysetup, sbsign, ...), bootstrapped once with mmdebstrap,
//! cached, and entered through [`super::sandbox`] — the same idea as mkosi's ToolsTree, so a
//! Debian 12 host can build images that need newer tools than it has.

use super::{require_host_tool, run, HostTool};
use crate::host::cache::{self, Cache};
use anyhow::{Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages of the tools tree. Changing this list changes the cache key.
pub const TOOLS_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-repart",
    "systemd-ukify",
    "systemd-boot-efi",
    "erofs-utils",
    "cryptsetup-bin",
    "dosfstools",
    "mtools",
    "fdisk",
    "sbsigntool",
    "python3-virt-firmware",
    "qemu-utils",
    "zstd",
    "cpio",
    "kmod",
    "openssl",
    "tpm2-tools",
    "util-linux",
    "mkosi",
    // Signed containers: cosign to make and check signatures (tests, fixtures), busybox-static
    // as the content of the test image.
    "cosign",
    "busybox-static",
];
pub const TOOLS_SUITE: &str = "trixie";

#[derive(Debug, Clone)]
pub struct ToolsTree {
    root: PathBuf,
    binds: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

impl ToolsTree {
    /// Returns the cached tools tree for `mirror`, bootstrapping it first when absent.
    pub fn ensure(cache: &Cache, mirror: &str) -> Result<ToolsTree> {
        let key = cache::key(
            [TOOLS_SUITE, mirror]
                .into_iter()
                .chain(TOOLS_PACKAGES.iter().copied()),
        );
        let entry = cache.entry("tools", &key);
        if !entry.join("usr/bin/systemd-repart").exists() {
            let mmdebstrap = require_host_tool(HostTool::Mmdebstrap)?;
            let staging = cache.staging("tools", &key)?;
            cache::remove_path(&staging)?;
            tracing::info!(path = %entry.display(), "bootstrapping the tools tree (Debian {TOOLS_SUITE}), once");
            run(Command::new(mmdebstrap)
                .arg("--variant=apt")
                .arg("--mode=root")
                .arg(format!("--include={}", TOOLS_PACKAGES.join(",")))
                .arg("--dpkgopt=path-exclude=/usr/share/man/*")
                .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
                .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
                .arg("--skip=output/dev")
                .arg(TOOLS_SUITE)
                .arg(&staging)
                .arg(mirror))
            .context("bootstrapping the tools tree")?;
            cache::publish(&staging, &entry)?;
        }
        Ok(ToolsTree {
            root: entry,
            binds: Vec::new(),
            env: Vec::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes `dir` (a host path) visible at the same path inside the tree.
    pub fn bind(mut self, dir: &Path) -> Self {
        self.binds.push(dir.to_path_buf());
        self
    }

    /// Sets an environment variable for every tool run (e.g. SOURCE_DATE_EPOCH).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A command that runs `program` inside the tree. Arguments are added by the caller.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut cmd = Command::new(super::keel_exe()?);
        cmd.arg("__sandbox").arg("--root").arg(&self.root);
        for b in &self.binds {
            cmd.arg("--bind").arg(b);
        }
        for (k, v) in &self.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        cmd.arg("--").arg(program);
        Ok(cmd)
    }

    /// A file inside the tree (e.g. the systemd-boot EFI binary).
    pub fn file(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}
