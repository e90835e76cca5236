//! Running images in QEMU: acceleration probe, the QEMU and swtpm command lines, VM processes
//! with clean teardown, the guest agent (a command channel that needs no guest network), QMP
//! (power control), and per-test virtual switches.

pub mod accel;
pub mod cmdline;
pub mod qga;
pub mod qmp;
pub mod switch;
pub mod vm;

pub use cmdline::{Firmware, NetSpec, VmSpec};
pub use vm::Vm;
