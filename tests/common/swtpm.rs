//! A software TPM (swtpm) per test, on loopback, for the attestation tests: the host's
//! `SwtpmTcp` on a state directory of its own.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use keel::host::cluster::ek::SwtpmTcp;
use keel::node::attest::tpm::Tpm;

/// A swtpm process with its own (temporary) state, stopped when dropped.
pub struct SoftTpm {
    swtpm: SwtpmTcp,
    _state: tempfile::TempDir,
}

impl SoftTpm {
    pub fn start() -> SoftTpm {
        let state = tempfile::tempdir().expect("state dir");
        let swtpm = SwtpmTcp::start(state.path())
            .unwrap_or_else(|e| panic!("starting swtpm: {e:#} (run scripts/host-setup)"));
        SoftTpm {
            swtpm,
            _state: state,
        }
    }

    pub fn open(&self) -> Tpm {
        self.swtpm.open().expect("open swtpm")
    }
}
