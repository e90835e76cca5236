//! Running external programs: the command line logged, the tool's stderr tail in the error.
//! Shared by the node programs and the host commands; the host's tools tree (Debian trixie's
//! systemd-repart, ukify, ...) lives in `host::tools`.

mod run;

pub use run::{display_cmd, run, run_capture, tail_lines, ToolError};
