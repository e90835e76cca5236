//! Tools on the build machine: host programs and the Debian packages that provide them
//! (`host.rs`), the cached Debian trixie tools tree that runs systemd-repart, ukify, mkfs.erofs
//! and veritysetup (`tree.rs`), and the mount namespace the tree runs in (`sandbox.rs`).

mod host;
pub mod sandbox;
mod tree;

pub use crate::tools::{display_cmd, run, run_capture, tail_lines, ToolError};
pub use host::{require_host_tool, HostTool};
pub use tree::ToolsTree;

/// `keel __tools-path`: prints the tools tree's path, bootstrapping it when missing.
pub fn print_path() -> anyhow::Result<()> {
    let cache = crate::host::cache::Cache::from_env()?;
    let t = ToolsTree::ensure(&cache, crate::image::DEFAULT_MIRROR)?;
    println!("{}", t.root().display());
    Ok(())
}
