//! QMP, QEMU's control socket: host-side power operations (reset, power button, quit).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends one QMP command and returns its `return` value.
pub fn command(socket: &Path, cmd: &str) -> Result<Value> {
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
        w.write_all(format!("{}\n", json!({"execute": c})).as_bytes())?;
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
