//! One place that starts child processes: logs the command line, captures stderr, and turns a
//! failure into an error that carries the tool's last words.

use std::process::{Command, Output, Stdio};

/// A child process that could not be started or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("could not start `{program}`")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{cmdline}` failed ({status}){}", fmt_tail(.stderr_tail))]
    Failed {
        cmdline: String,
        status: String,
        stderr_tail: String,
    },
    #[error("`{program}` is not installed on this machine: install the Debian package `{package}` (apt-get install {package})")]
    Missing { program: String, package: String },
}

fn fmt_tail(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{tail}")
    }
}

/// The command line as a user could paste it (arguments with spaces quoted).
pub fn display_cmd(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let s = a.to_string_lossy();
            if s.contains(char::is_whitespace) || s.is_empty() {
                format!("'{s}'")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Last `n` non-empty lines of a tool's output.
pub fn tail_lines(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn execute(cmd: &mut Command, capture_stdout: bool) -> Result<Output, ToolError> {
    let cmdline = display_cmd(cmd);
    tracing::debug!(command = %cmdline, "running");
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    if capture_stdout {
        cmd.stdout(Stdio::piped());
    } else {
        cmd.stdout(Stdio::null());
    }
    let out = cmd.output().map_err(|source| ToolError::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !out.status.success() {
        let mut tail = tail_lines(&out.stderr, 25);
        if tail.is_empty() && capture_stdout {
            tail = tail_lines(&out.stdout, 25);
        }
        return Err(ToolError::Failed {
            cmdline,
            status: out.status.to_string(),
            stderr_tail: tail,
        });
    }
    Ok(out)
}

/// Runs a command to completion; its stdout is discarded, its stderr kept for errors.
pub fn run(cmd: &mut Command) -> Result<(), ToolError> {
    execute(cmd, false).map(|_| ())
}

/// Runs a command and returns its stdout.
pub fn run_capture(cmd: &mut Command) -> Result<Vec<u8>, ToolError> {
    execute(cmd, true).map(|o| o.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_stderr_tail_and_command() {
        let err = run(Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]))
            .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.ends_with("one\ntwo"), "{msg}");
    }

    #[test]
    fn capture_returns_stdout() {
        let out = run_capture(Command::new("sh").args(["-c", "printf hi"])).expect("runs");
        assert_eq!(out, b"hi");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines(b"a\n\nb\nc\n", 2), "b\nc");
    }
}
