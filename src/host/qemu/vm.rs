//! A running VM: its swtpm and QEMU processes, stopped (and waited for) when the `Vm` is dropped,
//! so no emulator outlives keel on error or Ctrl-C.

use super::cmdline::VmSpec;
use crate::host::tools::{require_host_tool, run, run_capture, HostTool};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Requires a firmware or data file that a Debian package provides.
pub fn require_file(path: &Path, package: &str) -> Result<()> {
    if path.exists() {
        Ok(())
    } else {
        bail!(
            "{} is missing: install the Debian package `{package}` (apt-get install {package})",
            path.display()
        )
    }
}

/// Virtual size in bytes of a raw or qcow2 image.
pub fn virtual_size(image: &Path) -> Result<u64> {
    let qemu_img = require_host_tool(HostTool::QemuImg)?;
    let out = run_capture(
        Command::new(qemu_img)
            .args(["info", "--output=json"])
            .arg(image),
    )
    .with_context(|| format!("reading {}", image.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&out).context("parsing qemu-img info")?;
    v["virtual-size"]
        .as_u64()
        .with_context(|| format!("qemu-img reports no size for {}", image.display()))
}

/// Creates a qcow2 overlay over `image` (never modified) with `size` bytes of virtual disk.
pub fn create_overlay(image: &Path, overlay: &Path, size: u64) -> Result<()> {
    let qemu_img = require_host_tool(HostTool::QemuImg)?;
    let image = image
        .canonicalize()
        .with_context(|| format!("resolving {}", image.display()))?;
    let format = if image.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    run(Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(&image)
        .arg(overlay)
        .arg(size.to_string()))
    .with_context(|| {
        format!(
            "creating overlay {} over {}",
            overlay.display(),
            image.display()
        )
    })
}

fn wait_for_path(path: &Path, child: &mut Child, what: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited ({status}) before creating {}",
                path.display()
            );
        }
        if start.elapsed() > timeout {
            bail!(
                "{what} did not create {} within {}s",
                path.display(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Stops a child: SIGTERM, a grace period, then SIGKILL; always reaps it.
fn stop(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts swtpm (TPM 2.0) with its state in `tpm_dir` and waits for its socket.
fn start_swtpm(sock: &Path, tpm_dir: &Path) -> Result<Child> {
    let swtpm_bin = require_host_tool(HostTool::Swtpm)?;
    std::fs::create_dir_all(tpm_dir).with_context(|| format!("creating {}", tpm_dir.display()))?;
    let tpm_dir = tpm_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", tpm_dir.display()))?;
    let _ = std::fs::remove_file(sock);
    let mut swtpm = Command::new(swtpm_bin)
        .arg("socket")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(format!("dir={}", tpm_dir.display()))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", sock.display()))
        .arg("--log")
        .arg(format!(
            "file={},level=1",
            tpm_dir.join("swtpm.log").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting swtpm")?;
    if let Err(e) = wait_for_path(sock, &mut swtpm, "swtpm", Duration::from_secs(10)) {
        stop(&mut swtpm, Duration::from_secs(1));
        return Err(e);
    }
    Ok(swtpm)
}

pub struct Vm {
    pub spec: VmSpec,
    qemu: Child,
    swtpm: Option<Child>,
}

impl Vm {
    /// Starts swtpm with state in `tpm_dir`, then QEMU. Interactive VMs (no console file) inherit
    /// the terminal.
    pub fn start(spec: VmSpec, tpm_dir: &Path) -> Result<Vm> {
        let qemu_bin = require_host_tool(HostTool::QemuSystem)?;
        require_file(&spec.firmware.code, "ovmf")?;
        let mut swtpm = match &spec.swtpm_socket {
            Some(sock) => Some(start_swtpm(sock, tpm_dir)?),
            None => None,
        };
        let mut cmd = Command::new(qemu_bin);
        cmd.args(spec.args());
        tracing::debug!(command = %crate::host::tools::display_cmd(&cmd), "starting QEMU");
        if spec.console.is_some() {
            cmd.stdin(Stdio::null()).stdout(Stdio::null());
            let log = spec.console.as_ref().map(|c| c.with_extension("qemu.log"));
            match log.map(std::fs::File::create) {
                Some(Ok(f)) => {
                    cmd.stderr(f);
                }
                _ => {
                    cmd.stderr(Stdio::null());
                }
            }
        }
        let qemu = match cmd.spawn() {
            Ok(q) => q,
            Err(e) => {
                if let Some(t) = swtpm.as_mut() {
                    stop(t, Duration::from_secs(1));
                }
                return Err(e).context("starting qemu-system-x86_64");
            }
        };
        Ok(Vm { spec, qemu, swtpm })
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(None))
    }

    /// Waits until QEMU exits or `interrupted` turns true.
    pub fn wait(
        &mut self,
        interrupted: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(s) = self.qemu.try_wait().context("waiting for QEMU")? {
                if let Some(t) = self.swtpm.as_mut() {
                    stop(t, Duration::from_secs(2));
                }
                return Ok(Some(s));
            }
            if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                self.kill();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until QEMU's control socket exists (before QMP commands to a machine that is not
    /// running yet, e.g. one waiting for a saved state).
    pub fn wait_for_qmp(&mut self) -> Result<()> {
        let sock = self
            .spec
            .qmp_socket
            .clone()
            .context("this machine has no QMP socket")?;
        wait_for_path(&sock, &mut self.qemu, "QEMU", Duration::from_secs(30))
    }

    /// Stops QEMU and swtpm (hard power-off).
    pub fn kill(&mut self) {
        stop(&mut self.qemu, Duration::from_secs(5));
        if let Some(t) = self.swtpm.as_mut() {
            stop(t, Duration::from_secs(2));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
