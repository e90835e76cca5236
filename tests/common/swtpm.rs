//! A software TPM (swtpm) per test, on loopback, for the attestation tests.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use keel::node::attest::tpm::Tpm;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;
use tss_esapi::tcti_ldr::{NetworkTPMConfig, TctiNameConf};

/// A swtpm process with its own state, killed when dropped.
pub struct SoftTpm {
    child: Child,
    port: u16,
    _state: tempfile::TempDir,
}

impl SoftTpm {
    pub fn start() -> SoftTpm {
        for _ in 0..20 {
            let state = tempfile::tempdir().expect("state dir");
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
                l.local_addr().expect("addr").port()
            };
            if port == u16::MAX || std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
                continue;
            }
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting swtpm: {e} (run scripts/host-setup)"));
            let t = SoftTpm {
                child,
                port,
                _state: state,
            };
            let up = (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(50));
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up {
                return t;
            }
        }
        panic!("swtpm did not start on any of 20 ports");
    }

    pub fn open(&self) -> Tpm {
        let conf = TctiNameConf::Swtpm(
            NetworkTPMConfig::from_str(&format!("host=127.0.0.1,port={}", self.port))
                .expect("tcti"),
        );
        Tpm::open(conf).expect("open swtpm")
    }
}

impl Drop for SoftTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
