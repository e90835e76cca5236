//! QMP, QEMU's control socket: host-side power operations (reset, power button, quit).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends one QMP command and returns its `return` value.
pub fn command(socket: &Path, cmd: &str) -> Result<Value> {
    execute(socket, cmd, None)
}

/// Sends one QMP command with arguments and returns its `return` value.
pub fn execute(socket: &Path, cmd: &str, args: Option<Value>) -> Result<Value> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to QMP at {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the QMP greeting")?;
    for c in ["qmp_capabilities", cmd] {
        let msg = match (&args, c == cmd) {
            (Some(a), true) => json!({"execute": c, "arguments": a}),
            _ => json!({"execute": c}),
        };
        w.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                if c == "quit" {
                    return Ok(Value::Null);
                }
                bail!("QMP closed the connection during {c}");
            }
            let v: Value =
                serde_json::from_str(line.trim()).with_context(|| format!("QMP sent {line}"))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {c}: {e}");
            }
            if c == cmd {
                return Ok(v.get("return").cloned().unwrap_or(Value::Null));
            }
            break;
        }
    }
    Ok(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QEMU: greeting, capabilities, an event before the reply.
    #[test]
    fn command_skips_events_and_returns_the_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(stream.try_clone().expect("clone"));
            let mut w = stream;
            w.write_all(b"{\"QMP\": {\"version\": {}}}\n")
                .expect("greeting");
            let mut line = String::new();
            r.read_line(&mut line).expect("caps");
            w.write_all(b"{\"return\": {}}\n").expect("caps reply");
            line.clear();
            r.read_line(&mut line).expect("cmd");
            assert!(line.contains("system_reset"), "{line}");
            w.write_all(b"{\"event\": \"RESET\"}\n{\"return\": {\"ok\": 1}}\n")
                .expect("reply");
        });
        let v = command(&sock, "system_reset").expect("command");
        assert_eq!(v["ok"], 1);
        server.join().expect("server");
    }
}
