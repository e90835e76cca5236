//! Tools on the build machine: host programs and the Debian packages that provide them
//! (`host.rs`), the cached Debian trixie tools tree that runs systemd-repart, ukify, mkfs.erofs
//! and veritysetup (`tree.rs`), and the mount namespace the tree runs in (`sandbox.rs`).

mod host;
pub mod sandbox;
mod tree;

pub use crate::tools::{display_cmd, run, run_capture, tail_lines, ToolError};
pub use host::{require_host_tool, HostTool};
pub use tree::ToolsTree;

use anyhow::Context;
use std::path::{Path, PathBuf};

static PINNED_EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The keel executable that runs helpers (the sandbox, `{keel}` in test steps): a copy pinned
/// by [`pin_keel_exe`] when there is one, else this process's own file.
pub fn keel_exe() -> anyhow::Result<PathBuf> {
    match PINNED_EXE.get() {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe().context("locating the keel executable"),
    }
}

/// Copies this executable to `dir/keel` and runs helpers from the copy from now on: a long run
/// (`keel test`) keeps working when `cargo build` replaces target/release/keel meanwhile (it
/// used to fail every later step with "keel (deleted)": no such file).
pub fn pin_keel_exe(dir: &Path) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the keel executable")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = dir.join("keel");
    let part = dir.join("keel.part");
    std::fs::copy(&me, &part)
        .with_context(|| format!("copying {} to {}", me.display(), part.display()))?;
    std::fs::rename(&part, &copy).with_context(|| format!("renaming {}", part.display()))?;
    let copy =
        std::path::absolute(&copy).with_context(|| format!("resolving {}", copy.display()))?;
    let _ = PINNED_EXE.set(copy.clone());
    Ok(copy)
}

/// `keel __tools-path`: prints the tools tree's path, bootstrapping it when missing.
pub fn print_path() -> anyhow::Result<()> {
    let cache = crate::host::cache::Cache::from_env()?;
    let t = ToolsTree::ensure(&cache, crate::image::DEFAULT_MIRROR)?;
    println!("{}", t.root().display());
    Ok(())
}
