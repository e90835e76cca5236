//! A private L2 switch per test (vde_switch on a unix socket): the VMs on it reach each other and
//! nothing else.

use crate::host::tools::{require_host_tool, HostTool};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Switch {
    pub socket: PathBuf,
    child: Child,
}

impl Switch {
    pub fn start(dir: &Path) -> Result<Switch> {
        let bin = require_host_tool(HostTool::VdeSwitch)?;
        let socket = dir.join("switch");
        // vde_switch reads management commands from stdin and exits at EOF: keep the pipe open.
        let mut child = Command::new(bin)
            .arg("--sock")
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting vde_switch")?;
        let start = Instant::now();
        while !socket.join("ctl").exists() {
            if let Some(s) = child.try_wait()? {
                bail!(
                    "vde_switch exited ({s}) before creating {}",
                    socket.display()
                );
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                bail!("vde_switch did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Switch { socket, child })
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
