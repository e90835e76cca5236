//! Running external tools: on the host (mmdebstrap, QEMU) and inside the cached Debian trixie
//! tools tree (systemd-repart, ukify, mkfs.erofs, veritysetup, ...).

mod host;
mod run;
pub mod sandbox;
mod tree;

pub use host::{require_host_tool, HostTool};
pub use run::{display_cmd, run, run_capture, tail_lines, ToolError};
pub use tree::ToolsTree;
