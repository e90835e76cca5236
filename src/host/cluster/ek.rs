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

/// The EK (PEM public key) of the software TPM whose state is in `state`.
pub fn swtpm_ek_pem(state: &Path) -> Result<String> {
    let swtpm = require_host_tool(HostTool::Swtpm)?;
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    for _ in 0..10 {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
            l.local_addr()?.port()
        };
        if port == u16::MAX || std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
            continue;
        }
        let mut child = Command::new(&swtpm)
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
        let up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let result = if up {
            (|| -> Result<String> {
                let conf = TctiNameConf::Swtpm(
                    NetworkTPMConfig::from_str(&format!("host=127.0.0.1,port={port}"))
                        .context("swtpm TCTI")?,
                );
                let tpm = Tpm::open(conf)?;
                let ek = crate::attest::tpm2::EkPublic::parse(tpm.ek_public())?;
                Ok(ek.pem()?)
            })()
        } else {
            Err(anyhow::anyhow!("swtpm did not listen on port {port}"))
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        if up {
            return result
                .with_context(|| format!("reading the EK of the TPM in {}", state.display()));
        }
    }
    bail!("could not start swtpm on a free port")
}
