//! A running machine saved to a file and started again from it, through QEMU's migration to a
//! file. The stream holds the RAM, the devices and the software TPM's state (QEMU's
//! tpm-emulator fetches it from swtpm on save and hands it to a fresh swtpm on restore); the disk
//! is not in it: the caller keeps the disk as it was at the save, and restores onto a
//! copy-on-write overlay of it.

use super::qmp;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Pauses the machine and writes its state to `file`; the machine stays paused (quit it after).
pub fn save(qmp_socket: &Path, file: &Path) -> Result<()> {
    qmp::command(qmp_socket, "stop").context("pausing the machine")?;
    let uri = format!("file:{}", file.display());
    qmp::execute(qmp_socket, "migrate", Some(json!({ "uri": uri })))
        .with_context(|| format!("saving the machine to {}", file.display()))?;
    wait(qmp_socket).with_context(|| format!("saving the machine to {}", file.display()))
}

/// Loads `file` into a QEMU started with `-incoming defer` and lets the machine run.
pub fn restore(qmp_socket: &Path, file: &Path) -> Result<()> {
    let uri = format!("file:{}", file.display());
    qmp::execute(qmp_socket, "migrate-incoming", Some(json!({ "uri": uri })))
        .with_context(|| format!("loading the machine from {}", file.display()))?;
    wait(qmp_socket).with_context(|| format!("loading the machine from {}", file.display()))?;
    // The saved machine was paused; so is the loaded one until told to go on.
    qmp::command(qmp_socket, "cont").context("resuming the loaded machine")?;
    Ok(())
}

/// Waits for the migration to complete.
fn wait(qmp_socket: &Path) -> Result<()> {
    let until = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let v = qmp::command(qmp_socket, "query-migrate")?;
        match status(&v) {
            Status::Done => return Ok(()),
            Status::Failed(why) => bail!("QEMU: migration failed: {why}"),
            Status::Going => {}
        }
        if Instant::now() > until {
            bail!(
                "migration still not complete after {}s",
                MIGRATION_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Debug, PartialEq)]
enum Status {
    Going,
    Done,
    Failed(String),
}

/// The state of a migration from `query-migrate`'s reply (an empty reply: not started yet).
fn status(reply: &Value) -> Status {
    match reply.get("status").and_then(Value::as_str) {
        Some("completed") => Status::Done,
        Some("failed") | Some("cancelled") => Status::Failed(
            reply
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_string(),
        ),
        _ => Status::Going,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_status_from_query_migrate() {
        assert_eq!(status(&json!({})), Status::Going);
        assert_eq!(status(&json!({"status": "active"})), Status::Going);
        assert_eq!(status(&json!({"status": "completed"})), Status::Done);
        assert_eq!(
            status(&json!({"status": "failed", "error-desc": "disk full"})),
            Status::Failed("disk full".into())
        );
    }
}
