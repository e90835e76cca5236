//! The endorsement key of a VM's software TPM, read before the VM first boots: enrolment needs
//! each machine's EK before its config exists (`keel cluster init --ek NAME=FILE`). swtpm is
//! started on the state directory the VM will use (created when missing), asked for its EK
//! through tss-esapi, and stopped; the endorsement seed stays in the state, so the VM's TPM
//! has the same EK. A real machine prints its EK with `keel-agent ek`.

use crate::host::tools::{require_host_tool, HostTool};
use crate::node::attest::tpm::Tpm;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Duration;
use tss_esapi::tcti_ldr::{NetworkTPMConfig, TctiNameConf};

/// A swtpm process serving the TPM whose state is in a directory over TCP on loopback (the
/// transport tss-esapi can open), stopped with SIGTERM when dropped so its state is saved.
pub struct SwtpmTcp {
    child: std::process::Child,
    port: u16,
}

impl SwtpmTcp {
    /// Starts swtpm on `state` (created when missing) on a free pair of loopback ports.
    pub fn start(state: &Path) -> Result<Self> {
        let swtpm = require_host_tool(HostTool::Swtpm)?;
        std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
        for _ in 0..20 {
            let port = {
                let l =
                    std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
                l.local_addr()?.port()
            };
            if port == u16::MAX || std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
                continue;
            }
            let child = Command::new(&swtpm)
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting swtpm")?;
            let t = SwtpmTcp { child, port };
            let up = (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(50));
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up {
                return Ok(t);
            }
        }
        bail!("swtpm did not start on any of 20 port pairs")
    }

    /// Opens this TPM (and its endorsement key).
    pub fn open(&self) -> Result<Tpm> {
        let conf = TctiNameConf::Swtpm(
            NetworkTPMConfig::from_str(&format!("host=127.0.0.1,port={}", self.port))
                .context("swtpm TCTI")?,
        );
        Tpm::open(conf)
    }
}

impl Drop for SwtpmTcp {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// The EK (PEM public key) of the software TPM whose state is in `state`.
pub fn swtpm_ek_pem(state: &Path) -> Result<String> {
    let swtpm = SwtpmTcp::start(state)?;
    let tpm = swtpm.open()?;
    let ek = crate::attest::tpm2::EkPublic::parse(tpm.ek_public())
        .with_context(|| format!("reading the EK of the TPM in {}", state.display()))?;
    Ok(ek.pem()?)
}
