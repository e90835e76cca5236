//! Host tools keel needs, and the Debian package that provides each, so a missing tool is
//! reported with the exact fix.

use super::ToolError;
use std::path::PathBuf;

/// A program keel runs on the host (everything else runs inside the tools tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostTool {
    Mmdebstrap,
    QemuSystem,
    QemuImg,
    Swtpm,
    VdeSwitch,
}

impl HostTool {
    pub fn program(self) -> &'static str {
        match self {
            HostTool::Mmdebstrap => "mmdebstrap",
            HostTool::QemuSystem => "qemu-system-x86_64",
            HostTool::QemuImg => "qemu-img",
            HostTool::Swtpm => "swtpm",
            HostTool::VdeSwitch => "vde_switch",
        }
    }

    pub fn package(self) -> &'static str {
        match self {
            HostTool::Mmdebstrap => "mmdebstrap",
            HostTool::QemuSystem => "qemu-system-x86",
            HostTool::QemuImg => "qemu-utils",
            HostTool::Swtpm => "swtpm",
            HostTool::VdeSwitch => "vde2",
        }
    }
}

/// Finds `tool` on `PATH` (plus the sbin directories root uses).
pub fn require_host_tool(tool: HostTool) -> Result<PathBuf, ToolError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/sbin", "/usr/bin"]
            .into_iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let candidate = dir.join(tool.program());
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(ToolError::Missing {
        program: tool.program().into(),
        package: tool.package().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        let err = ToolError::Missing {
            program: HostTool::VdeSwitch.program().into(),
            package: HostTool::VdeSwitch.package().into(),
        };
        assert!(err.to_string().contains("apt-get install vde2"));
    }
}
