//! Running images in QEMU: acceleration probe, the QEMU and swtpm command lines, VM processes
//! with clean teardown, the guest agent (a command channel that needs no guest network), QMP
//! (power control), and per-test virtual switches.

pub mod accel;
pub mod cmdline;
pub mod firmware;
pub mod qga;
pub mod qmp;
pub mod snapshot;
pub mod switch;
pub mod vm;

pub use cmdline::{Firmware, NetSpec, VmSpec};
pub use vm::Vm;

use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

static INTERRUPTED: OnceLock<&'static AtomicBool> = OnceLock::new();

/// A flag set on Ctrl-C, SIGTERM or SIGHUP, so VMs are stopped and temporary files removed
/// before keel exits. Installed once per process.
pub fn interrupt_flag() -> anyhow::Result<&'static AtomicBool> {
    if let Some(f) = INTERRUPTED.get() {
        return Ok(f);
    }
    let flag: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    ctrlc::set_handler(move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .map_err(|e| anyhow::anyhow!("installing the Ctrl-C handler: {e}"))?;
    Ok(INTERRUPTED.get_or_init(|| flag))
}
