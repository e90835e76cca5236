//! Helpers shared by the integration tests: running commands with errors that show their output,
//! and waiting for a condition. Each test file uses a part of them.
#![allow(dead_code)]

pub mod swtpm;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The keel binary built with these tests.
pub fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

/// `out`'s stdout, after asserting that `what` succeeded (stdout and stderr shown if not).
pub fn succeeded(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd`; a command that cannot be started (a missing host tool) fails the test.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/host-setup)"))
}

/// Runs `cmd` and returns its stdout; it must succeed.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    succeeded(out, &format!("{cmd:?}"))
}

/// Polls `f` until it holds; fails the test after `timeout`, naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
