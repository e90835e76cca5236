//! Choosing KVM or TCG. /dev/kvm may exist and still not work (on this project's machines QEMU
//! aborts with `-cpu host` or the guest hangs), so KVM is used only after a short probe boots the
//! firmware far enough to print on the serial console. The answer is remembered for this host boot.

use super::cmdline::Firmware;
use crate::host::tools::{require_host_tool, HostTool};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PROBE_TIMEOUT: Duration = Duration::from_secs(12);

fn cache_file() -> PathBuf {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    std::env::temp_dir().join(format!("keel-accel-{}", boot.trim()))
}

/// Why an accelerator was chosen, for the log line the user sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub accel: String,
    pub reason: String,
}

/// `forced` ("kvm" or "tcg") skips the probe.
pub fn choose(forced: Option<&str>) -> Result<Choice> {
    if let Some(f) = forced {
        return Ok(Choice {
            accel: f.to_string(),
            reason: "requested with --accel".into(),
        });
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(Choice {
            accel: "tcg".into(),
            reason: "/dev/kvm is not usable".into(),
        });
    }
    let cache = cache_file();
    if let Ok(c) = std::fs::read_to_string(&cache) {
        let c = c.trim();
        if c == "kvm" || c == "tcg" {
            return Ok(Choice {
                accel: c.into(),
                reason: format!("probed earlier this boot ({})", cache.display()),
            });
        }
    }
    let works = probe_kvm()?;
    let accel = if works { "kvm" } else { "tcg" };
    let _ = std::fs::write(&cache, accel);
    let reason = if works {
        "KVM probe booted the firmware".to_string()
    } else {
        format!(
            "KVM probe did not reach the firmware within {}s; using software emulation",
            PROBE_TIMEOUT.as_secs()
        )
    };
    Ok(Choice {
        accel: accel.into(),
        reason,
    })
}

fn probe_kvm() -> Result<bool> {
    let qemu = require_host_tool(HostTool::QemuSystem)?;
    let fw = Firmware::debian();
    let dir = tempfile::tempdir().context("creating a probe directory")?;
    let vars = dir.path().join("vars.fd");
    std::fs::copy(&fw.vars_template, &vars)
        .with_context(|| format!("copying {}", fw.vars_template.display()))?;
    let log = dir.path().join("serial.log");
    let mut child = Command::new(qemu)
        .args([
            "-machine",
            "q35",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256M",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            fw.code.display()
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the KVM probe")?;
    let start = Instant::now();
    let mut ok = false;
    while start.elapsed() < PROBE_TIMEOUT {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if std::fs::metadata(&log)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
        {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(ok)
}
