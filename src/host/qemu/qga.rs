//! The QEMU guest agent over virtio-serial: run commands in the guest and read their output
//! without any guest networking. Protocol: one JSON object per line; `guest-sync` with a random
//! id first, so replies left over from an earlier connection are skipped.

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a command run in the guest returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

impl ExecResult {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

pub struct Qga {
    socket: PathBuf,
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn send(&mut self, v: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(v)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .context("writing to the guest agent")?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .context("reading from the guest agent")?;
            if n == 0 {
                bail!("guest agent connection closed");
            }
            let t = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{ff}');
            if t.is_empty() {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(t) {
                return Ok(v);
            }
        }
    }
}

/// Decodes the `return` of a reply or turns its `error` into an error.
pub fn reply_value(v: Value) -> Result<Value> {
    if let Some(e) = v.get("error") {
        bail!(
            "guest agent error: {}",
            e.get("desc").and_then(|d| d.as_str()).unwrap_or("unknown")
        );
    }
    v.get("return")
        .cloned()
        .ok_or_else(|| anyhow!("guest agent reply without return: {v}"))
}

/// Output fields of guest-exec-status are base64.
pub fn decode_output(v: &Value, field: &str) -> String {
    v.get(field)
        .and_then(|d| d.as_str())
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl Qga {
    pub fn new(socket: &Path) -> Qga {
        Qga {
            socket: socket.to_path_buf(),
        }
    }

    fn connect(&self, timeout: Duration) -> Result<Conn> {
        let stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut conn = Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let id: u32 =
            std::process::id() ^ (Instant::now().elapsed().subsec_nanos() | 1) ^ rand_u32();
        conn.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}))?;
        loop {
            let v = conn.recv()?;
            if v.get("return").and_then(|r| r.as_u64()) == Some(u64::from(id)) {
                return Ok(conn);
            }
        }
    }

    /// One request and its reply.
    pub fn call(&self, cmd: &str, args: Value, timeout: Duration) -> Result<Value> {
        let mut c = self.connect(timeout)?;
        c.send(&json!({"execute": cmd, "arguments": args}))?;
        reply_value(c.recv()?)
    }

    /// True when the agent answers within `timeout`.
    pub fn ping(&self, timeout: Duration) -> bool {
        self.connect(timeout).is_ok()
    }

    /// Waits until the agent answers (the guest is up far enough to run commands).
    pub fn wait_ready(&self, deadline: Instant) -> Result<()> {
        while Instant::now() < deadline {
            if self.ping(Duration::from_secs(3)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        bail!("the guest agent did not answer in time (is qemu-guest-agent in the image?)")
    }

    /// Runs `argv` in the guest and waits up to `timeout` for it to finish.
    pub fn exec(&self, argv: &[&str], timeout: Duration) -> Result<ExecResult> {
        let (path, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let r = self.call(
            "guest-exec",
            json!({"path": path, "arg": args, "capture-output": true}),
            Duration::from_secs(20),
        )?;
        let pid = r
            .get("pid")
            .and_then(|p| p.as_i64())
            .ok_or_else(|| anyhow!("guest-exec returned no pid: {r}"))?;
        let start = Instant::now();
        loop {
            let s = self.call(
                "guest-exec-status",
                json!({"pid": pid}),
                Duration::from_secs(20),
            )?;
            if s.get("exited").and_then(|e| e.as_bool()) == Some(true) {
                let code = s
                    .get("exitcode")
                    .and_then(|c| c.as_i64())
                    .or_else(|| {
                        s.get("signal")
                            .and_then(|c| c.as_i64())
                            .map(|sig| 128 + sig)
                    })
                    .unwrap_or(-1);
                return Ok(ExecResult {
                    code,
                    stdout: decode_output(&s, "out-data"),
                    stderr: decode_output(&s, "err-data"),
                });
            }
            if start.elapsed() > timeout {
                bail!(
                    "`{}` did not finish within {}s in the guest",
                    argv.join(" "),
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Writes `data` to `path` in the guest (guest-file-open/write/close, 48 KiB per request);
    /// the file is written under `path.keel-part` and renamed, so a reader never sees half of it.
    pub fn write_file(&self, path: &str, data: &[u8], timeout: Duration) -> Result<()> {
        use base64::Engine;
        let part = format!("{path}.keel-part");
        let h = self.call(
            "guest-file-open",
            json!({"path": part, "mode": "w"}),
            timeout,
        )?;
        let handle = h
            .as_i64()
            .ok_or_else(|| anyhow!("guest-file-open returned no handle: {h}"))?;
        let written = (|| -> Result<()> {
            for chunk in data.chunks(48 << 10) {
                let b64 = base64::engine::general_purpose::STANDARD.encode(chunk);
                self.call(
                    "guest-file-write",
                    json!({"handle": handle, "buf-b64": b64}),
                    timeout,
                )?;
            }
            Ok(())
        })();
        self.call("guest-file-close", json!({"handle": handle}), timeout)?;
        written?;
        let r = self.exec(&["/bin/mv", "-f", &part, path], timeout)?;
        if !r.ok() {
            bail!("moving {part} to {path} in the guest: {}", r.stderr.trim());
        }
        Ok(())
    }

    /// Runs a shell command line in the guest.
    pub fn sh(&self, script: &str, timeout: Duration) -> Result<ExecResult> {
        self.exec(&["/bin/sh", "-c", script], timeout)
    }

    /// The guest's current boot ID.
    pub fn boot_id(&self) -> Result<String> {
        let r = self.exec(
            &["/bin/cat", "/proc/sys/kernel/random/boot_id"],
            Duration::from_secs(30),
        )?;
        if !r.ok() {
            bail!("reading boot_id failed: {}", r.stderr);
        }
        Ok(r.stdout.trim().to_string())
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u32::from_le_bytes(b) & 0x7fff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_status_output_is_decoded() {
        let v = json!({"exited": true, "exitcode": 0, "out-data": "aGVsbG8K"});
        assert_eq!(decode_output(&v, "out-data"), "hello\n");
        assert_eq!(decode_output(&v, "err-data"), "");
    }

    #[test]
    fn errors_are_reported() {
        let err = reply_value(json!({"error": {"class": "GenericError", "desc": "no such file"}}))
            .expect_err("error");
        assert!(err.to_string().contains("no such file"));
        assert_eq!(reply_value(json!({"return": 5})).expect("ok"), json!(5));
    }

    /// A fake agent on a socket pair: answers sync and exec like qemu-ga does.
    #[test]
    fn exec_round_trip_against_a_fake_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qga.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let server = std::thread::spawn(move || {
            for stream in listener.incoming().take(2) {
                let stream = stream.expect("accept");
                let mut r = BufReader::new(stream.try_clone().expect("clone"));
                let mut w = stream;
                let mut line = String::new();
                // A stale reply from an earlier client comes first.
                w.write_all(b"{\"return\": 12345}\n").expect("write");
                while r.read_line(&mut line).expect("read") > 0 {
                    let v: Value = serde_json::from_str(line.trim()).expect("json");
                    let reply = match v["execute"].as_str() {
                        Some("guest-sync") => json!({"return": v["arguments"]["id"]}),
                        Some("guest-exec") => json!({"return": {"pid": 7}}),
                        Some("guest-exec-status") => {
                            json!({"return": {"exited": true, "exitcode": 3, "out-data": "b2s="}})
                        }
                        _ => json!({"error": {"desc": "unknown"}}),
                    };
                    w.write_all(format!("{reply}\n").as_bytes()).expect("write");
                    line.clear();
                }
            }
        });
        let q = Qga::new(&sock);
        let r = q
            .exec(&["/bin/true"], Duration::from_secs(5))
            .expect("exec");
        assert_eq!(
            r,
            ExecResult {
                code: 3,
                stdout: "ok".into(),
                stderr: String::new()
            }
        );
        drop(server);
    }
}
