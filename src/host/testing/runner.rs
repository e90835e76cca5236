//! Runs test scenarios against a built image: fresh overlay and TPM per node (or a saved, running
//! node restored copy-on-write), steps through the guest agent, host-side actions, implicit
//! checks, consoles and journals saved per node, and where the scenario's time went.

use super::definition::{expand, Command, Step, StepKind, TestFile, UkiEdit};
use super::report::{self, Outcome, TestResult};
use super::tamper;
use super::timing::{BootWatch, ScenarioTimes};
use crate::disk::esp::{Esp, UKI_DIR};
use crate::host::cache::Cache;
use crate::host::qemu::cmdline::{node_mac, Firmware, NetSpec, VmSpec};
use crate::host::qemu::qga::{ExecResult, Qga};
use crate::host::qemu::switch::Switch;
use crate::host::qemu::vm::{create_overlay, virtual_size, Vm};
use crate::host::tools::{tail_lines, ToolsTree};
use crate::manifest::Manifest;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Extra virtual disk beyond the image, for the root partition made on first boot.
const ROOT_SPACE: u64 = 6 << 30;
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(120);
const REBOOT_TIMEOUT: Duration = Duration::from_secs(360);

/// Console lines that fail every test unless the test allows failures.
pub const CONSOLE_FAILURES: &[&str] = &[
    "Kernel panic",
    "You are in emergency mode",
    "Entering emergency mode",
    "Failed to start ",
];

/// What every scenario of a run shares.
pub struct RunContext<'a> {
    pub manifest: &'a Manifest,
    pub raw: PathBuf,
    pub results: &'a Path,
    pub accel: String,
    pub interrupted: &'a AtomicBool,
    pub cache: &'a Cache,
    /// vCPUs per VM (1 when scenarios run side by side on two cores).
    pub cpus: u32,
    /// Running nodes saved by one scenario for others to start from.
    pub states: &'a Mutex<BTreeMap<String, std::result::Result<SavedState, String>>>,
    /// Image builds in steps run one at a time (they share the store and the cache).
    pub build_lock: &'a Mutex<()>,
}

/// A running node saved after a scenario: its disk as it was at the save (never written again),
/// firmware variables, and the machine's state (RAM, devices, TPM).
#[derive(Debug, Clone)]
pub struct SavedState {
    pub disk: PathBuf,
    pub vars: PathBuf,
    pub machine: PathBuf,
    pub boot_id: String,
}

/// The state a scenario `saves` lives under the results directory, apart from any scenario's.
pub fn state_dir(results: &Path, name: &str) -> PathBuf {
    results.join("saved-states").join(name)
}

struct Node {
    index: usize,
    dir: PathBuf,
    overlay: PathBuf,
    vars: PathBuf,
    tpm: PathBuf,
    qga_socket: PathBuf,
    qmp_socket: PathBuf,
    ignition: Option<PathBuf>,
    /// The directory of the test file (relative paths in steps).
    test_dir: PathBuf,
    memory_mib: u32,
    cpus: u32,
    nets: Vec<NetSpec>,
    vm: Option<Vm>,
    boots: usize,
    started: Instant,
    consoles: Vec<PathBuf>,
    /// Consoles of boots meant to stop early (checked by their own step, not implicitly).
    expected_failures: Vec<PathBuf>,
    firmware: Firmware,
    /// False for a machine without a TPM (`tpm = false`).
    tpm_enabled: bool,
    autostart: bool,
    /// The UKI as built, saved by the first `tamper-uki` for `restore-uki`.
    saved_uki: Option<(String, Vec<u8>)>,
    /// The connection `type` steps write to, kept for as long as the VM runs: QEMU takes typed
    /// bytes from it only as fast as the guest reads its UART, and drops those it has not taken
    /// when the connection closes (a guest busy probing SATA ports at a passphrase prompt lost
    /// the end of a recovery key that way).
    console_in: Option<UnixStream>,
    /// The current boot, followed on the console until the guest agent answers.
    watch: Option<BootWatch>,
}

impl Node {
    fn spec(&self, accel: &str, console: PathBuf) -> VmSpec {
        VmSpec {
            name: format!("node{}", self.index),
            accel: accel.to_string(),
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            firmware: self.firmware.clone(),
            vars: self.vars.clone(),
            disk: self.overlay.clone(),
            swtpm_socket: self.tpm_enabled.then(|| self.dir.join("swtpm.sock")),
            console: Some(console),
            console_input: Some(self.dir.join("console.sock")),
            qga_socket: Some(self.qga_socket.clone()),
            qmp_socket: Some(self.qmp_socket.clone()),
            ignition: self.ignition.clone(),
            nets: self.nets.clone(),
            incoming: false,
            rtc_base: None,
        }
    }

    /// Starts the VM: a boot, or with `saved`, a machine that waits for that state.
    fn launch(&mut self, accel: &str, saved: bool) -> Result<()> {
        self.launch_at(accel, saved, None)
    }

    /// `launch`, with the machine's clock `ahead` of the host's when given.
    fn launch_at(&mut self, accel: &str, saved: bool, ahead: Option<Duration>) -> Result<()> {
        self.boots += 1;
        let console = self
            .dir
            .join(format!("node{}.boot{}.console.log", self.index, self.boots));
        self.consoles.push(console.clone());
        self.console_in = None;
        let rtc_base = match ahead {
            Some(d) => Some(rtc_time(std::time::SystemTime::now() + d)?),
            None => None,
        };
        let spec = VmSpec {
            incoming: saved,
            rtc_base,
            ..self.spec(accel, console)
        };
        let vm = Vm::start(spec, &self.tpm)?;
        self.vm = Some(vm);
        self.started = Instant::now();
        self.watch = Some(BootWatch::new(self.started, 0));
        Ok(())
    }

    fn start(&mut self, accel: &str) -> Result<()> {
        self.launch(accel, false)
    }

    fn start_ahead(&mut self, accel: &str, ahead: Option<Duration>) -> Result<()> {
        self.launch_at(accel, false, ahead)
    }

    /// A boot of the running machine (reboot, reset) begins now: follow it from here on.
    fn rebooting(&mut self) {
        let from = self
            .consoles
            .last()
            .map(|c| console_text(c).len())
            .unwrap_or(0);
        self.started = Instant::now();
        self.watch = Some(BootWatch::new(self.started, from));
    }

    fn qga(&self) -> Qga {
        Qga::new(&self.qga_socket)
    }

    fn running(&mut self) -> bool {
        self.vm.as_mut().is_some_and(|v| v.is_running())
    }

    fn power_off(&mut self) {
        self.console_in = None;
        self.watch = None;
        if let Some(mut vm) = self.vm.take() {
            vm.kill();
        }
    }

    /// Types `text` into the serial console (see `console_in`).
    fn type_text(&mut self, text: &str) -> Result<()> {
        let stream = match &mut self.console_in {
            Some(s) => s,
            None => self
                .console_in
                .insert(open_console_input(&self.dir.join("console.sock"))?),
        };
        type_into_console(stream, text)
    }
}

/// QEMU's `-rtc base=` form of a time (UTC, whole seconds).
fn rtc_time(t: std::time::SystemTime) -> Result<String> {
    let ts = jiff::Timestamp::try_from(t).context("a clock time QEMU can take")?;
    Ok(ts.strftime("%Y-%m-%dT%H:%M:%S").to_string())
}

/// The state of one named test while its scenario runs.
struct TestState {
    started: Option<Instant>,
    finished: Option<Instant>,
    failed: Option<String>,
    ran: bool,
    timings: BTreeMap<String, f64>,
}

fn tenths(secs: f64) -> f64 {
    (secs * 10.0).round() / 10.0
}

/// Checks one command result against a step's expectations; `None` means it passed.
pub fn judge(
    step: &Command,
    r: &ExecResult,
    vars: &BTreeMap<String, String>,
) -> Result<Option<String>> {
    let want = step.expect_exit.unwrap_or(0);
    if r.code != want {
        return Ok(Some(format!(
            "exit status {} (expected {want})\nstdout: {}\nstderr: {}",
            r.code,
            tail_lines(r.stdout.as_bytes(), 15),
            tail_lines(r.stderr.as_bytes(), 15)
        )));
    }
    for e in &step.expect {
        let e = expand(e, vars)?;
        if !r.stdout.contains(&e) {
            return Ok(Some(format!(
                "stdout lacks `{e}`\nstdout: {}",
                tail_lines(r.stdout.as_bytes(), 15)
            )));
        }
    }
    for e in &step.expect_stderr {
        let e = expand(e, vars)?;
        if !r.stderr.contains(&e) {
            return Ok(Some(format!(
                "stderr lacks `{e}`\nstderr: {}",
                tail_lines(r.stderr.as_bytes(), 15)
            )));
        }
    }
    for e in &step.expect_not {
        let e = expand(e, vars)?;
        if r.stdout.contains(&e) || r.stderr.contains(&e) {
            return Ok(Some(format!("output contains `{e}`")));
        }
    }
    Ok(None)
}

/// Console text that fails a test: a panic, emergency mode, or a unit that failed to start.
pub fn console_problem(text: &str) -> Option<String> {
    text.lines()
        .find(|l| CONSOLE_FAILURES.iter().any(|f| l.contains(f)))
        .map(|l| format!("console: {}", l.trim()))
}

fn run_command(
    node: &Node,
    step: &Command,
    vars: &BTreeMap<String, String>,
    deadline: Instant,
) -> Result<(ExecResult, Option<String>)> {
    let cmd = expand(&step.command, vars)?;
    let timeout = step.timeout.map(|s| s.0).unwrap_or(DEFAULT_STEP_TIMEOUT);
    let retry_until = step
        .retry_for
        .map(|r| Instant::now() + r.0)
        .unwrap_or_else(Instant::now)
        .min(deadline);
    loop {
        let attempt = node.qga().sh(&cmd, timeout);
        let (r, verdict) = match attempt {
            Ok(r) => {
                let v = judge(step, &r, vars)?;
                (r, v)
            }
            Err(e) => (
                ExecResult {
                    code: -1,
                    stdout: String::new(),
                    stderr: format!("{e:#}"),
                },
                Some(format!("could not run `{cmd}`: {e:#}")),
            ),
        };
        if verdict.is_none() || Instant::now() >= retry_until {
            return Ok((
                r,
                verdict.map(|v| format!("`{cmd}` on node{}: {v}", node.index)),
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Runs a step's `host` command on the host (sh -c, templates expanded) and judges it.
fn run_host(
    step: &Command,
    vars: &BTreeMap<String, String>,
) -> Result<(ExecResult, Option<String>)> {
    let cmd = expand(&step.command, vars)?;
    let timeout = step.timeout.map(|s| s.0).unwrap_or(DEFAULT_STEP_TIMEOUT);
    let out = std::process::Command::new("timeout")
        .arg(timeout.as_secs().to_string())
        .args(["sh", "-c", &cmd])
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running `{cmd}` on the host"))?;
    let r = ExecResult {
        code: i64::from(out.status.code().unwrap_or(-1)),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let verdict = judge(step, &r, vars)?.map(|v| format!("`{cmd}` on the host: {v}"));
    Ok((r, verdict))
}

/// `wait_boot`, with the host time it took counted as time spent waiting for boots.
fn wait_boot_counted(
    node: &mut Node,
    old_boot: Option<&str>,
    deadline: Instant,
    times: &mut ScenarioTimes,
) -> Result<String> {
    let t = Instant::now();
    let r = wait_boot(node, old_boot, deadline, times);
    times.boot_s += t.elapsed().as_secs_f64();
    r
}

/// Waits for the guest agent to answer with a boot ID other than `old_boot`, following the boot
/// on the console, and adds the boot to `times`. Gives up early when the current boot's console
/// shows a panic or emergency mode (nothing will answer then).
fn wait_boot(
    node: &mut Node,
    old_boot: Option<&str>,
    deadline: Instant,
    times: &mut ScenarioTimes,
) -> Result<String> {
    let qga = node.qga();
    loop {
        if Instant::now() > deadline {
            bail!("node{} did not come back (guest agent silent)", node.index);
        }
        if let Some(console) = node.consoles.last() {
            let text = console_text(console);
            if let Some(w) = node.watch.as_mut() {
                w.observe(&text, Instant::now());
            }
            if let Some(line) = text
                .lines()
                .find(|l| l.contains("Kernel panic") || l.contains("You are in emergency mode"))
            {
                bail!(
                    "node{} will not come back: console shows `{}` (see {})",
                    node.index,
                    line.trim(),
                    console.display()
                );
            }
        }
        if qga.ping(Duration::from_secs(2)) {
            if let Ok(id) = qga.boot_id() {
                if old_boot != Some(id.as_str()) {
                    if let Some(w) = node.watch.take() {
                        times.add_boot(&w.finish(Instant::now()));
                    }
                    return Ok(id);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A sparse copy of `src`, grown to `size` bytes.
fn sparse_copy(src: &Path, dst: &Path, size: u64) -> Result<()> {
    crate::host::tools::run(
        std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(src)
            .arg(dst),
    )
    .with_context(|| format!("copying {}", src.display()))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dst)
        .with_context(|| format!("opening {}", dst.display()))?;
    f.set_len(size)
        .with_context(|| format!("growing {}", dst.display()))
}

fn slot_a_offset(raw: &Path, root_hash: &str) -> Result<u64> {
    let (_, parts) = crate::disk::gpt::read(raw)?;
    let (data, _) = crate::disk::slot::by_root_hash(&parts, root_hash)
        .with_context(|| format!("finding usr slot A in {}", raw.display()))?;
    Ok(data.offset)
}

/// What a step's action works with besides its node.
struct Env<'e, 'c> {
    ctx: &'e RunContext<'c>,
    vars: &'e BTreeMap<String, String>,
    deadline: Instant,
    times: &'e mut ScenarioTimes,
}

fn action(env: &mut Env, node: &mut Node, step: &Step) -> Result<()> {
    match &step.kind {
        StepKind::Run(_) | StepKind::Host(_) => Ok(()),
        StepKind::Reboot
        | StepKind::Reset
        | StepKind::PowerOff
        | StepKind::Start { .. }
        | StepKind::Type { .. } => power_action(env, node, &step.kind),
        StepKind::TamperUki { .. }
        | StepKind::RestoreUki
        | StepKind::TamperUsr { .. }
        | StepKind::InstallUpdate { .. } => disk_action(env, node, &step.kind),
        StepKind::SetIgnition { .. } | StepKind::ClearIgnition | StepKind::Push { .. } => {
            config_action(env, node, &step.kind)
        }
        StepKind::NewMachine => new_machine(env, node),
        StepKind::Build {
            version,
            definition,
            out,
        } => {
            let dir = PathBuf::from(
                env.vars
                    .get("work")
                    .context("the scenario has no {work} directory")?,
            )
            .join(out);
            build_version(env, node, version, definition.as_deref(), &dir).map(|_| ())
        }
    }
}

/// Reboot, reset, power-off, start, typing on the console.
fn power_action(env: &mut Env, node: &mut Node, kind: &StepKind) -> Result<()> {
    let reboot_deadline = env.deadline.min(Instant::now() + REBOOT_TIMEOUT);
    match kind {
        StepKind::Reboot => {
            let old = node
                .qga()
                .boot_id()
                .context("reading boot ID before reboot")?;
            node.rebooting();
            // The command may not return: the agent goes down with the system.
            let _ = node.qga().sh("systemctl reboot", Duration::from_secs(10));
            let new = wait_boot_counted(node, Some(&old), reboot_deadline, env.times)?;
            tracing::info!(node = node.index, boot_id = %new, "rebooted");
            Ok(())
        }
        StepKind::Reset => {
            let old = node
                .qga()
                .boot_id()
                .context("reading boot ID before reset")?;
            node.rebooting();
            crate::host::qemu::qmp::command(&node.qmp_socket, "system_reset")?;
            wait_boot_counted(node, Some(&old), reboot_deadline, env.times)?;
            Ok(())
        }
        StepKind::PowerOff => {
            node.power_off();
            Ok(())
        }
        StepKind::Start {
            console: want,
            console_not: never,
            timeout,
            clock_ahead,
        } => {
            if node.running() {
                bail!("node{} is already running", node.index);
            }
            node.start_ahead(&env.ctx.accel, clock_ahead.map(|c| c.0))?;
            let limit = Instant::now() + timeout.map(|t| t.0).unwrap_or(REBOOT_TIMEOUT);
            if want.is_empty() {
                return wait_boot_counted(node, None, limit.min(env.deadline), env.times)
                    .map(|_| ());
            }
            let console = node.consoles.last().cloned().context("no console")?;
            node.expected_failures.push(console.clone());
            let want = want
                .iter()
                .map(|c| expand(c, env.vars))
                .collect::<Result<Vec<_>>>()?;
            let never = never
                .iter()
                .map(|c| expand(c, env.vars))
                .collect::<Result<Vec<_>>>()?;
            let limit = limit.min(env.deadline);
            let t = Instant::now();
            let r = wait_console(node, &console, (&want, &never), limit, env);
            env.times.boot_s += t.elapsed().as_secs_f64();
            r
        }
        StepKind::Type { text } => {
            if !node.running() {
                bail!("node{} is not running: nothing to type into", node.index);
            }
            let text = expand(text, env.vars)?;
            node.type_text(&text)
                .with_context(|| format!("typing into node{}'s console", node.index))
        }
        other => bail!("{} is not a power action", other.name()),
    }
}

/// Changes to a powered-off node's disk: the UKI, an A/B update, /usr on disk.
fn disk_action(env: &mut Env, node: &mut Node, kind: &StepKind) -> Result<()> {
    let ctx = env.ctx;
    require_off(node, kind.name())?;
    match kind {
        StepKind::TamperUki { edit, version } => {
            let esp = Esp::open(&node.overlay, true)?;
            let version = match version {
                Some(v) => expand(v, env.vars)?,
                None => ctx.manifest.version.clone(),
            };
            let name = esp.find_uki(&version)?;
            let original = esp.read(&format!("{UKI_DIR}/{name}"))?;
            let changed = match edit {
                UkiEdit::FlipByte => tamper::flip_linux_byte(&original)?,
                UkiEdit::Cmdline { from, to } => tamper::replace_cmdline(&original, from, to)?,
                UkiEdit::ForeignKey => {
                    let tools = ToolsTree::ensure(ctx.cache, crate::image::DEFAULT_MIRROR)?;
                    tamper::resign_foreign(&tools, &original, &node.dir)?
                }
            };
            if node.saved_uki.is_none() {
                node.saved_uki = Some((name.clone(), original));
            }
            esp.write(&format!("{UKI_DIR}/{name}"), &changed)?;
            esp.close()?;
            tracing::info!(node = node.index, uki = %name, how = ?edit, "changed the UKI in the ESP");
            Ok(())
        }
        StepKind::RestoreUki => {
            let (_, data) = node
                .saved_uki
                .take()
                .context("restore-uki before any tamper-uki")?;
            // systemd-boot may have renamed the file since (boot counting): restore in place.
            let esp = Esp::open(&node.overlay, true)?;
            let name = esp.find_uki(&ctx.manifest.version)?;
            esp.write(&format!("{UKI_DIR}/{name}"), &data)?;
            esp.close()?;
            Ok(())
        }
        StepKind::InstallUpdate {
            version,
            definition,
        } => install_update(env, node, version, definition.as_deref()),
        StepKind::TamperUsr { path } => {
            let path = path.as_str();
            let tools = ToolsTree::ensure(ctx.cache, crate::image::DEFAULT_MIRROR)?;
            let offset = slot_a_offset(&ctx.raw, &ctx.manifest.usr_root_hash)?;
            let at = tamper::tamper(&tools, &ctx.raw, offset, path, &node.overlay)?;
            tracing::info!(
                node = node.index,
                path,
                at,
                "overwrote {} bytes of usr slot A",
                tamper::LEN
            );
            Ok(())
        }
        other => bail!("{} is not a disk action", other.name()),
    }
}

/// Builds `definition` (default: the image under test) as `version`, one build at a time, and
/// writes it into the node's empty usr slot.
fn install_update(
    env: &mut Env,
    node: &mut Node,
    version: &str,
    definition: Option<&Path>,
) -> Result<()> {
    let out = node
        .dir
        .join(format!("update-{}", expand(version, env.vars)?));
    let m = build_version(env, node, version, definition, &out)?;
    let uki =
        std::fs::read(out.join(format!("{}.efi", m.name))).context("reading the update's UKI")?;
    crate::disk::slot::install(
        &node.overlay,
        &crate::disk::slot::Release {
            raw: &out.join(format!("{}.raw", m.name)),
            root_hash: &m.usr_root_hash,
            label: &format!("{}_{}", m.name, m.version),
            uki_name: &crate::disk::uki::trial_uki_name(&m.version, 3),
            uki: &uki,
        },
    )?;
    tracing::info!(
        node = node.index,
        version = m.version,
        "installed the update into slot B"
    );
    Ok(())
}

/// Builds `definition` (default: the image under test) as `version` with the image's keys into
/// `out`, one build at a time across scenarios.
fn build_version(
    env: &mut Env,
    node: &Node,
    version: &str,
    definition: Option<&Path>,
    out: &Path,
) -> Result<crate::manifest::Manifest> {
    let version = &expand(version, env.vars)?;
    let out = out.to_path_buf();
    let definition = match definition {
        Some(d) => node.test_dir.join(d),
        None => PathBuf::from(&env.ctx.manifest.definition),
    };
    let started = Instant::now();
    let built = {
        let _one_at_a_time = env
            .ctx
            .build_lock
            .lock()
            .map_err(|_| anyhow::anyhow!("another scenario's build panicked"))?;
        crate::host::build::build(&crate::host::build::BuildOptions {
            out: Some(out.clone()),
            quiet: true,
            version: Some(version.to_string()),
            ..crate::host::build::BuildOptions::of(definition.clone())
        })
    };
    env.times.build_s += started.elapsed().as_secs_f64();
    built.with_context(|| format!("building {} as version {version}", definition.display()))
}

/// The node's Ignition config (for its next start) and files pushed into it.
fn config_action(env: &mut Env, node: &mut Node, kind: &StepKind) -> Result<()> {
    match kind {
        StepKind::SetIgnition { ignition } => {
            require_off(node, "set-ignition")?;
            let p = node.test_dir.join(ignition);
            if !p.is_file() {
                bail!("set-ignition: {} does not exist", p.display());
            }
            node.ignition = Some(p);
            Ok(())
        }
        StepKind::ClearIgnition => {
            require_off(node, "clear-ignition")?;
            node.ignition = None;
            Ok(())
        }
        StepKind::Push { source, dest } => {
            if !node.running() {
                bail!("push: node{} is not running", node.index);
            }
            let src = expand(source, env.vars)?;
            let dest = expand(dest, env.vars)?;
            let data = std::fs::read(&src).with_context(|| format!("push: reading {src}"))?;
            node.qga()
                .write_file(&dest, &data, Duration::from_secs(60))
                .with_context(|| format!("push: writing {dest} in node{}", node.index))?;
            Ok(())
        }
        other => bail!("{} is not a config action", other.name()),
    }
}

/// Another machine in the node's place: a new software TPM (new endorsement seed) and a fresh
/// copy of the image as its disk; the Ignition config stays, as a stolen config would.
fn new_machine(env: &mut Env, node: &mut Node) -> Result<()> {
    require_off(node, "new-machine")?;
    crate::host::cache::remove_path(&node.tpm)?;
    std::fs::create_dir_all(&node.tpm)
        .with_context(|| format!("creating {}", node.tpm.display()))?;
    let size = virtual_size(&env.ctx.raw)? + ROOT_SPACE;
    if node.overlay.extension().is_some_and(|e| e == "raw") {
        sparse_copy(&env.ctx.raw, &node.overlay, size)?;
    } else {
        crate::host::cache::remove_path(&node.overlay)?;
        create_overlay(&env.ctx.raw, &node.overlay, size)?;
    }
    Ok(())
}

fn open_console_input(sock: &Path) -> Result<UnixStream> {
    let stream =
        UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    let mut output = stream
        .try_clone()
        .context("cloning the console connection")?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut output, &mut std::io::sink());
    });
    Ok(stream)
}

/// Sends `text` to the serial console, a character at a time as a person would type (a line end
/// is a carriage return, as a terminal sends it).
fn type_into_console(s: &mut UnixStream, text: &str) -> Result<()> {
    use std::io::Write;
    for b in text.replace('\n', "\r").bytes() {
        s.write_all(&[b]).context("writing to the console")?;
        std::thread::sleep(Duration::from_millis(5));
    }
    s.flush().context("flushing the console")?;
    Ok(())
}

fn require_off(node: &Node, what: &str) -> Result<()> {
    if node.vm.is_some() {
        bail!(
            "{what} needs node{} powered off (add an action = \"power-off\" step first)",
            node.index
        );
    }
    Ok(())
}

/// Console text without terminal escape sequences (systemd colours unit names inside status
/// lines, so `Starting foo.service` is only found once they are gone).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in @..~.
            for n in chars.by_ref() {
                if ('@'..='~').contains(&n) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A console log as text, without escape sequences (empty while QEMU has not created it).
fn console_text(console: &Path) -> String {
    strip_ansi(&String::from_utf8_lossy(
        &std::fs::read(console).unwrap_or_default(),
    ))
}

/// Waits until the console shows every string of `want`; fails on any of `never`. The boot it
/// watches ends there (for the timings).
fn wait_console(
    node: &mut Node,
    console: &Path,
    (want, never): (&[String], &[String]),
    deadline: Instant,
    env: &mut Env,
) -> Result<()> {
    loop {
        if env.ctx.interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let text = console_text(console);
        if let Some(w) = node.watch.as_mut() {
            w.observe(&text, Instant::now());
        }
        if let Some(bad) = never.iter().find(|n| text.contains(n.as_str())) {
            bail!("node{} console shows `{bad}`", node.index);
        }
        let missing: Vec<&String> = want.iter().filter(|w| !text.contains(w.as_str())).collect();
        if missing.is_empty() {
            if let Some(w) = node.watch.take() {
                env.times.add_boot(&w.finish(Instant::now()));
            }
            return Ok(());
        }
        if Instant::now() > deadline || !node.running() {
            bail!(
                "node{}: console never showed {:?} (see {})\n{}",
                node.index,
                missing,
                console.display(),
                tail_lines(text.as_bytes(), 15)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Failed units and console problems on every running node.
/// Failed units and console problems on every running node.
fn implicit_checks(nodes: &mut [Node]) -> Option<String> {
    for n in nodes.iter_mut() {
        for c in n
            .consoles
            .iter()
            .filter(|c| !n.expected_failures.contains(c))
        {
            if let Some(p) = std::fs::read_to_string(c)
                .ok()
                .as_deref()
                .and_then(console_problem)
            {
                return Some(format!("node{}: {p}", n.index));
            }
        }
        if n.running() {
            match n.qga().sh(
                "systemctl --failed --no-legend --plain",
                Duration::from_secs(60),
            ) {
                Ok(r) if !r.stdout.trim().is_empty() => {
                    return Some(format!(
                        "node{}: failed units:\n{}",
                        n.index,
                        r.stdout.trim()
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Some(format!(
                        "node{}: could not list failed units: {e:#}",
                        n.index
                    ))
                }
            }
        }
    }
    None
}

fn collect_journals(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        if !n.running() {
            continue;
        }
        let path = n.dir.join(format!("node{}.journal.txt", n.index));
        match n.qga().sh(
            "journalctl --no-pager -o short-monotonic",
            Duration::from_secs(120),
        ) {
            Ok(r) => {
                let _ = std::fs::write(&path, r.stdout);
            }
            Err(e) => tracing::warn!(node = n.index, "could not collect the journal: {e:#}"),
        }
    }
}

/// One scenario's run: its machines, its tests' states, its variables and its clock.
struct Scenario<'s, 'c> {
    ctx: &'s RunContext<'c>,
    file: &'s TestFile,
    vars: BTreeMap<String, String>,
    nodes: Vec<Node>,
    tests: BTreeMap<String, TestState>,
    deadline: Instant,
    aborted: Option<String>,
    times: ScenarioTimes,
    _switch: Option<Switch>,
}

/// What a scenario's run gives back: a result per named test and where its time went.
pub struct ScenarioRun {
    pub results: Vec<TestResult>,
    pub times: ScenarioTimes,
}

/// Free space a scenario needs to start.
const SCENARIO_SPACE: u64 = 2 << 30;

/// Files a passing scenario made that are deleted when it ends: disks, images, UKIs and
/// published repositories are gigabytes a scenario (one CI run filled its disk with them);
/// what a person reads after a run (consoles, journals, logs, reports) is small and stays.
/// A failed scenario keeps everything.
const PRUNE_FROM_BYTES: u64 = 8 << 20;

/// Deletes the large files under `dir` (see [`PRUNE_FROM_BYTES`]) but for logs and reports;
/// returns the bytes freed. Best effort: a file that cannot be removed is left.
fn prune_outputs(dir: &Path) -> u64 {
    let mut freed = 0u64;
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if !entry.file_type().is_file() {
            continue;
        }
        let keep = entry
            .path()
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "log" | "txt" | "json"));
        let Ok(meta) = entry.metadata() else { continue };
        if keep || meta.len() < PRUNE_FROM_BYTES {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            freed = freed.saturating_add(meta.len());
        }
    }
    freed
}

/// Runs one test file; returns a result per named test in it.
pub fn run_scenario(ctx: &RunContext, file: &TestFile) -> Result<ScenarioRun> {
    let started = Instant::now();
    let mut sc = Scenario::prepare(ctx, file)?;
    sc.start_nodes();
    for si in 0..file.spec.step.len() {
        sc.run_step(si)?;
    }
    sc.finish()?;
    sc.times.wall_s = started.elapsed().as_secs_f64();
    Ok(ScenarioRun {
        results: sc.results(),
        times: sc.times,
    })
}

/// The templates every step may use: the image, the work directory, keel, keys, tools, the
/// build's PCR 11 predictions.
fn scenario_vars(ctx: &RunContext, dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    vars.insert("usr_root_hash".into(), ctx.manifest.usr_root_hash.clone());
    vars.insert("image_name".into(), ctx.manifest.name.clone());
    vars.insert("image_version".into(), ctx.manifest.version.clone());
    // The build directory of the image under test (its manifest, raw image and UKI).
    if let Some(dir) = ctx.raw.parent() {
        vars.insert(
            "image_dir".into(),
            std::path::absolute(dir)
                .with_context(|| format!("resolving {}", dir.display()))?
                .display()
                .to_string(),
        );
    }
    // Absolute: {work} is used on the host and joined to test-file paths (node ignition).
    let work = std::path::absolute(dir.join("work"))
        .with_context(|| format!("resolving {}", dir.join("work").display()))?;
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    vars.insert("work".into(), work.display().to_string());
    vars.insert(
        "keel".into(),
        crate::host::tools::keel_exe()?.display().to_string(),
    );
    if let Ok(def) = crate::image::Definition::load(Path::new(&ctx.manifest.definition)) {
        if let Some(t) = def.trust {
            vars.insert("keys".into(), t.keys.display().to_string());
        }
    }
    let tools = crate::host::tools::ToolsTree::ensure(ctx.cache, crate::image::DEFAULT_MIRROR)?;
    vars.insert("tools".into(), tools.root().display().to_string());
    // {pcr11_enter_initrd}, {pcr11_leave_initrd}, {pcr11_sysinit}, {pcr11_ready}: the build's
    // predictions for the phase a path ends in.
    for p in ctx.manifest.trust.iter().flat_map(|t| &t.pcr11) {
        let last = p.phase.rsplit(':').next().unwrap_or(&p.phase);
        vars.insert(
            format!("pcr11_{}", last.replace('-', "_")),
            p.sha256.clone(),
        );
    }
    Ok(vars)
}

/// Runs the file's `setup` command on the host.
fn run_setup(setup: &str, vars: &BTreeMap<String, String>) -> Result<()> {
    let cmd = expand(setup, vars)?;
    tracing::info!("setup: {cmd}");
    let out = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running the setup command `{cmd}`"))?;
    if !out.status.success() {
        bail!(
            "setup command `{cmd}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Node `i` (1-based) of `file`: its directory, disk (an overlay of the image, a raw copy, or
/// an overlay of a saved state's disk), firmware variables and networks.
fn make_node(
    ctx: &RunContext,
    file: &TestFile,
    dir: &Path,
    i: usize,
    vars: &BTreeMap<String, String>,
    switch: Option<&Switch>,
) -> Result<Node> {
    // Absolute: host steps get the node's disk as `{disk}`.
    let ndir = std::path::absolute(dir.join(format!("node{i}")))
        .with_context(|| format!("resolving {}", dir.display()))?;
    std::fs::create_dir_all(&ndir).with_context(|| format!("creating {}", ndir.display()))?;
    let test_dir = file.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let cfg = file.node_config(i - 1);
    let size = virtual_size(&ctx.raw)? + ROOT_SPACE;
    let overlay = if cfg.raw_disk {
        let raw = ndir.join("disk.raw");
        sparse_copy(&ctx.raw, &raw, size)?;
        if let Some(c) = &cfg.esp_ignition {
            let p = test_dir.join(c);
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            crate::disk::esp::write_file(&raw, crate::node::provision::source::ESP_PATH, &bytes)?;
        }
        raw
    } else {
        ndir.join("disk.qcow2")
    };
    let (firmware, vars_fd) =
        crate::host::boot::firmware_for(Some(ctx.manifest), cfg.secure_boot, &ndir)?;
    if !cfg.raw_disk {
        match saved_state(ctx, file)? {
            Some(s) => {
                create_overlay(&s.disk, &overlay, size)?;
                std::fs::copy(&s.vars, &vars_fd)
                    .with_context(|| format!("copying {}", s.vars.display()))?;
            }
            None => create_overlay(&ctx.raw, &overlay, size)?,
        }
    }
    let ignition = match cfg.ignition {
        Some(p) => Some(test_dir.join(expand(&p.display().to_string(), vars)?)),
        None => None,
    };
    let mut nets = vec![NetSpec::User { forwards: vec![] }];
    if let Some(sw) = switch {
        nets.push(NetSpec::Vde {
            switch: sw.socket.clone(),
            mac: node_mac(i - 1),
        });
    }
    Ok(Node {
        index: i,
        dir: ndir.clone(),
        overlay,
        vars: vars_fd,
        tpm: ndir.join("tpm"),
        qga_socket: ndir.join("qga.sock"),
        qmp_socket: ndir.join("qmp.sock"),
        ignition,
        test_dir,
        memory_mib: cfg.memory_mib.unwrap_or(2048),
        cpus: ctx.cpus,
        nets,
        vm: None,
        boots: 0,
        started: Instant::now(),
        consoles: Vec::new(),
        expected_failures: Vec::new(),
        firmware,
        tpm_enabled: cfg.tpm,
        autostart: cfg.autostart,
        saved_uki: None,
        console_in: None,
        watch: None,
    })
}

/// The saved state a file starts from, if it names one; an error when it was not saved.
fn saved_state(ctx: &RunContext, file: &TestFile) -> Result<Option<SavedState>> {
    let Some(name) = &file.spec.start else {
        return Ok(None);
    };
    let states = ctx
        .states
        .lock()
        .map_err(|_| anyhow::anyhow!("a scenario panicked while saving a state"))?;
    match states.get(name) {
        Some(Ok(s)) => Ok(Some(s.clone())),
        Some(Err(why)) => bail!("state {name} was not saved: {why}"),
        None => bail!("state {name} was not saved (its scenario did not run first)"),
    }
}

impl<'s, 'c> Scenario<'s, 'c> {
    fn prepare(ctx: &'s RunContext<'c>, file: &'s TestFile) -> Result<Self> {
        let started = Instant::now();
        let dir = ctx.results.join(&file.scenario);
        // A results directory used before still holds that run's consoles; QEMU appends to a
        // console log, and the console checks would read the old boot's text. Start empty.
        crate::host::cache::remove_path(&dir)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A node's disk overlay takes what its boots write (up to about 1 GiB when the root
        // file system is made); builds in steps check their own needs.
        crate::host::space::require(&dir, SCENARIO_SPACE, "a scenario's disks")?;
        let tests = file
            .test_names()
            .into_iter()
            .map(|n| {
                let st = TestState {
                    started: None,
                    finished: None,
                    failed: None,
                    ran: false,
                    timings: BTreeMap::new(),
                };
                (n, st)
            })
            .collect();
        let deadline = Instant::now() + file.spec.timeout.0;
        let mut vars = scenario_vars(ctx, &dir)?;
        // {state_boot_id}: the boot the saved state a file starts from was saved in.
        if let Ok(Some(s)) = saved_state(ctx, file) {
            vars.insert("state_boot_id".into(), s.boot_id);
        }
        let switch = if file.spec.network || file.spec.nodes > 1 {
            Some(Switch::start(&dir)?)
        } else {
            None
        };
        if let Some(setup) = &file.spec.setup {
            run_setup(setup, &vars)?;
        }
        let nodes = (1..=file.spec.nodes)
            .map(|i| make_node(ctx, file, &dir, i, &vars, switch.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let times = ScenarioTimes {
            scenario: file.scenario.clone(),
            setup_s: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        Ok(Scenario {
            ctx,
            file,
            vars,
            nodes,
            tests,
            deadline,
            aborted: None,
            times,
            _switch: switch,
        })
    }

    /// Starts the nodes that start with the scenario and waits for each to answer: boots, or
    /// restores of the saved state the file starts from.
    fn start_nodes(&mut self) {
        let accel = self.ctx.accel.clone();
        let restore = match saved_state(self.ctx, self.file) {
            Ok(s) => s,
            Err(e) => {
                self.aborted = Some(format!("{e:#}"));
                return;
            }
        };
        for n in self.nodes.iter_mut().filter(|n| n.autostart) {
            let started = match &restore {
                Some(s) => restore_node(n, &accel, s),
                None => n.start(&accel),
            };
            if let Err(e) = started {
                self.aborted = Some(format!("starting node{}: {e:#}", n.index));
                return;
            }
        }
        for n in self.nodes.iter_mut().filter(|n| n.autostart) {
            let answered = if restore.is_some() {
                let r = wait_boot(n, None, self.deadline, &mut self.times);
                self.times.restores += 1;
                self.times.restore_s += n.started.elapsed().as_secs_f64();
                set_guest_clock(n);
                r
            } else {
                wait_boot_counted(n, None, self.deadline, &mut self.times)
            };
            if let Err(e) = answered {
                self.aborted = Some(format!("{e:#}"));
                return;
            }
        }
    }

    fn run_step(&mut self, si: usize) -> Result<()> {
        let file = self.file;
        let steps = &file.spec.step;
        let step = &steps[si];
        if self.ctx.interrupted.load(Ordering::SeqCst) {
            self.aborted.get_or_insert_with(|| "interrupted".into());
        }
        let st = self
            .tests
            .get_mut(&step.test)
            .context("step of an unknown test")?;
        st.started.get_or_insert_with(Instant::now);
        st.ran = true;
        if let Some(why) = &self.aborted {
            st.failed.get_or_insert_with(|| format!("not run: {why}"));
            return Ok(());
        }
        if st.failed.is_some() {
            return Ok(());
        }
        if Instant::now() > self.deadline {
            let why = format!(
                "scenario timeout of {}s reached at step {}",
                self.file.spec.timeout.0.as_secs(),
                si + 1
            );
            st.failed = Some(why.clone());
            self.aborted = Some(why);
            return Ok(());
        }
        match &step.kind {
            StepKind::Run(c) | StepKind::Host(c) => {
                tracing::info!(test = %step.test, step = si + 1, "{}", c.command)
            }
            kind => tracing::info!(test = %step.test, step = si + 1, "{}", kind.name()),
        }
        let step_started = Instant::now();
        let nested_before = self.times.boot_s + self.times.build_s;
        let targets: Vec<usize> = step
            .node
            .numbers(self.nodes.len())
            .into_iter()
            .map(|k| k - 1)
            .collect();
        let side_by_side = targets.len() > 1
            && matches!(&step.kind, StepKind::Start { console, .. } if console.is_empty());
        if side_by_side {
            self.start_side_by_side(si, &targets)?;
        } else {
            for t in targets {
                if !self.step_on_node(si, t)? {
                    break;
                }
            }
        }
        let nested = self.times.boot_s + self.times.build_s - nested_before;
        self.times.steps_s += (step_started.elapsed().as_secs_f64() - nested).max(0.0);
        if let Some(st) = self.tests.get_mut(&step.test) {
            st.finished = Some(Instant::now());
        }
        // After a test's last step: the implicit checks.
        let last_of_test = !steps[si + 1..].iter().any(|s| s.test == step.test);
        if last_of_test
            && self.aborted.is_none()
            && !self.file.spec.allow_failures.contains(&step.test)
        {
            let st = self.tests.get_mut(&step.test).context("unknown test")?;
            if st.failed.is_none() {
                if let Some(p) = implicit_checks(&mut self.nodes) {
                    st.failed = Some(format!("implicit check: {p}"));
                }
            }
        }
        Ok(())
    }

    /// A `start` of several nodes: every machine is powered on first, then each is waited for,
    /// so their boots overlap (a cold start of the whole cluster, or two new machines).
    fn start_side_by_side(&mut self, si: usize, targets: &[usize]) -> Result<()> {
        let step = &self.file.spec.step[si];
        let (timeout, ahead) = match &step.kind {
            StepKind::Start {
                timeout,
                clock_ahead,
                ..
            } => (
                timeout.map(|t| t.0).unwrap_or(REBOOT_TIMEOUT),
                clock_ahead.map(|c| c.0),
            ),
            _ => (REBOOT_TIMEOUT, None),
        };
        let limit = (Instant::now() + timeout).min(self.deadline);
        let mut failure = None;
        for &t in targets {
            let node = &mut self.nodes[t];
            let r = if node.running() {
                Err(anyhow::anyhow!("node{} is already running", node.index))
            } else {
                node.start_ahead(&self.ctx.accel, ahead)
            };
            if let Err(e) = r {
                failure = Some(format!(
                    "step {} (start) failed on node{}: {e:#}",
                    si + 1,
                    t + 1
                ));
                break;
            }
        }
        if failure.is_none() {
            for &t in targets {
                let node = &mut self.nodes[t];
                if let Err(e) = wait_boot_counted(node, None, limit, &mut self.times) {
                    failure = Some(format!("step {} (start) failed: {e:#}", si + 1));
                    break;
                }
            }
        }
        if let Some(why) = failure {
            let st = self.tests.get_mut(&step.test).context("unknown test")?;
            st.failed = Some(why.clone());
            self.aborted = Some(why);
        }
        Ok(())
    }

    /// Runs step `si` on node `t`; false when the step failed there (the rest of its nodes are
    /// skipped).
    fn step_on_node(&mut self, si: usize, t: usize) -> Result<bool> {
        let file = self.file;
        let step = &file.spec.step[si];
        let node = &mut self.nodes[t];
        self.vars.insert("node".into(), node.index.to_string());
        self.vars.insert("mac".into(), node_mac(node.index - 1));
        self.vars
            .insert("disk".into(), node.overlay.display().to_string());
        let vars = &mut self.vars;
        let save = |vars: &mut BTreeMap<String, String>, c: &Command, r: &ExecResult| {
            if let Some(name) = &c.save {
                vars.insert(name.clone(), r.stdout.trim().to_string());
            }
        };
        let outcome: Result<Option<String>> = match &step.kind {
            StepKind::Host(c) => run_host(c, vars).map(|(r, verdict)| {
                if verdict.is_none() {
                    save(vars, c, &r);
                }
                verdict
            }),
            StepKind::Run(_) if !node.running() => {
                Ok(Some(format!("node{} is not running", node.index)))
            }
            StepKind::Run(c) => run_command(node, c, vars, self.deadline).map(|(r, verdict)| {
                if verdict.is_none() {
                    save(vars, c, &r);
                }
                verdict
            }),
            _ => {
                let mut env = Env {
                    ctx: self.ctx,
                    vars,
                    deadline: self.deadline,
                    times: &mut self.times,
                };
                action(&mut env, node, step).map(|_| None)
            }
        };
        let st = self.tests.get_mut(&step.test).context("unknown test")?;
        match outcome {
            Ok(None) => {
                record_timings(st, node, &step.kind);
                Ok(true)
            }
            Ok(Some(why)) => {
                st.failed = Some(format!("step {}: {why}", si + 1));
                Ok(false)
            }
            Err(e) => {
                // A failed action leaves the machines in an unknown state: stop here.
                let why = format!("step {} ({}) failed: {e:#}", si + 1, step.kind.name());
                st.failed = Some(why.clone());
                self.aborted = Some(why);
                Ok(false)
            }
        }
    }

    /// Journals, then the saved state when the file saves one and all went well, then power-off.
    fn finish(&mut self) -> Result<()> {
        let started = Instant::now();
        collect_journals(&mut self.nodes);
        let all_passed = self.aborted.is_none() && self.tests.values().all(|t| t.failed.is_none());
        if let Some(name) = &self.file.spec.saves {
            let t = Instant::now();
            let saved = if all_passed {
                save_node(&mut self.nodes[0], &state_dir(self.ctx.results, name))
                    .map_err(|e| format!("{e:#}"))
            } else {
                Err(format!("a test of {} failed", self.file.path.display()))
            };
            if let Err(why) = &saved {
                tracing::warn!(state = %name, "not saved: {why}");
            }
            self.ctx
                .states
                .lock()
                .map_err(|_| anyhow::anyhow!("a scenario panicked while saving a state"))?
                .insert(name.clone(), saved);
            self.times.save_s = t.elapsed().as_secs_f64();
        }
        for n in self.nodes.iter_mut() {
            n.power_off();
            // A saved node's disk has moved into the state's directory.
            let _ = std::fs::remove_file(&n.overlay);
        }
        self._switch = None;
        if all_passed {
            let dir = self.ctx.results.join(&self.file.scenario);
            let freed = prune_outputs(&dir);
            tracing::debug!(scenario = %self.file.scenario, freed_mib = freed >> 20, "pruned");
        }
        self.times.teardown_s = started.elapsed().as_secs_f64() - self.times.save_s;
        Ok(())
    }

    fn results(&self) -> Vec<TestResult> {
        self.file
            .test_names()
            .iter()
            .map(|name| {
                let st = &self.tests[name];
                TestResult {
                    name: name.clone(),
                    result: if st.failed.is_some() {
                        Outcome::Fail
                    } else if st.ran {
                        Outcome::Pass
                    } else {
                        Outcome::Skip
                    },
                    duration_s: match (st.started, st.finished) {
                        (Some(s), Some(f)) => tenths((f - s).as_secs_f64()),
                        _ => 0.0,
                    },
                    reason: st.failed.clone(),
                    scenario: self.file.path.display().to_string(),
                    timings: st.timings.clone(),
                }
            })
            .collect()
    }
}

/// A passed step's timings: its `mark`, and after `systemctl is-system-running`, the boot's
/// phases as systemd saw them.
fn record_timings(st: &mut TestState, node: &Node, kind: &StepKind) {
    let command = match kind {
        StepKind::Run(c) | StepKind::Host(c) => Some(c),
        _ => None,
    };
    if let Some(m) = command.and_then(|c| c.mark.as_ref()) {
        st.timings
            .insert(m.clone(), tenths(node.started.elapsed().as_secs_f64()));
    }
    if !matches!(kind, StepKind::Run(c) if c.command.contains("is-system-running")) {
        return;
    }
    if let Ok(r) = node
        .qga()
        .sh("systemd-analyze time", Duration::from_secs(60))
    {
        for (k, v) in report::parse_startup(&r.stdout) {
            st.timings.entry(k).or_insert(v);
        }
        let wall = tenths(node.started.elapsed().as_secs_f64());
        if let Some(total) = st.timings.get("total").copied() {
            // Firmware and boot loader, which systemd-analyze does not see under OVMF: QEMU
            // start to ready, minus what it does see.
            st.timings
                .entry("before_kernel_approx".into())
                .or_insert(tenths(wall - total));
        }
        st.timings.entry("ready_wall".into()).or_insert(wall);
    }
}

/// The guest's clock after a restore still says when the state was saved: set it to now.
/// (qemu-ga's guest-set-time also writes the hardware clock with hwclock, which the image lacks.)
fn set_guest_clock(node: &Node) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let set = node.qga().sh(
        &format!("date -u -s @{now} >/dev/null"),
        Duration::from_secs(10),
    );
    match set {
        Ok(r) if r.code == 0 => {}
        Ok(r) => tracing::warn!(
            node = node.index,
            "could not set the restored guest's clock: {}",
            r.stderr.trim()
        ),
        Err(e) => tracing::warn!(
            node = node.index,
            "could not set the restored guest's clock: {e:#}"
        ),
    }
}

/// Starts `node` from a saved state: a fresh swtpm (the state carries the TPM's), QEMU waiting
/// for the state, the state loaded.
fn restore_node(node: &mut Node, accel: &str, s: &SavedState) -> Result<()> {
    node.launch(accel, true)?;
    // Not a boot: the time until the agent answers is the restore's.
    node.watch = None;
    let vm = node.vm.as_mut().context("the VM just started")?;
    vm.wait_for_qmp()?;
    crate::host::qemu::snapshot::restore(&node.qmp_socket, &s.machine)?;
    Ok(())
}

/// Saves the running node: the machine's state next to its disk and firmware variables, which
/// are moved (not copied) into `dir`; the node is off afterwards.
fn save_node(node: &mut Node, dir: &Path) -> Result<SavedState> {
    if !node.running() {
        bail!("node{} is not running", node.index);
    }
    let boot_id = node.qga().boot_id().context("reading the boot ID")?;
    // What the guest has written is on the disk before the disk is frozen.
    node.qga()
        .sh("sync", Duration::from_secs(60))
        .context("sync in the guest")?;
    crate::host::cache::remove_path(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let machine = dir.join("machine.state");
    crate::host::qemu::snapshot::save(&node.qmp_socket, &machine)?;
    let _ = crate::host::qemu::qmp::command(&node.qmp_socket, "quit");
    node.power_off();
    let disk = dir.join("disk.qcow2");
    let vars = dir.join("OVMF_VARS.fd");
    std::fs::rename(&node.overlay, &disk)
        .with_context(|| format!("moving {} to {}", node.overlay.display(), disk.display()))?;
    std::fs::copy(&node.vars, &vars).with_context(|| format!("copying {}", node.vars.display()))?;
    tracing::info!(state = %dir.display(), "saved the running node");
    Ok(SavedState {
        disk,
        vars,
        machine,
        boot_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rtc_base_is_utc_to_the_second() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_796_601_780);
        assert_eq!(rtc_time(t).expect("time"), "2026-12-07T00:03:00");
    }

    #[test]
    fn a_passed_scenario_keeps_its_logs_and_loses_its_disks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("node1/update-1");
        std::fs::create_dir_all(&node).expect("mkdir");
        let big = vec![0u8; (PRUNE_FROM_BYTES as usize) + 1];
        for name in [
            "node1/update-1/x.raw",
            "node1/update-1/x.efi",
            "work/repo/t.usr",
        ] {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, &big).expect("write");
        }
        std::fs::write(dir.path().join("node1/node1.boot1.console.log"), &big).expect("write");
        std::fs::write(dir.path().join("node1/node1.journal.txt"), &big).expect("write");
        std::fs::write(dir.path().join("node1/OVMF_VARS.fd"), [0u8; 4096]).expect("write");
        let freed = prune_outputs(dir.path());
        assert_eq!(freed, 3 * big.len() as u64);
        assert!(!dir.path().join("node1/update-1/x.raw").exists());
        assert!(!dir.path().join("work/repo/t.usr").exists());
        assert!(dir.path().join("node1/node1.boot1.console.log").exists());
        assert!(dir.path().join("node1/node1.journal.txt").exists());
        assert!(dir.path().join("node1/OVMF_VARS.fd").exists());
    }

    /// Typed text stays on a connection that remains open after the step, for a guest that reads
    /// it late, and the console's output is read (and dropped) meanwhile so it never backs up.
    #[test]
    fn typed_text_stays_on_an_open_connection_for_a_late_reader() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let peer = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().expect("accept");
            // The console's output, far more than a socket buffer holds.
            c.write_all(&vec![b'x'; 4 << 20])
                .expect("console output is drained");
            std::thread::sleep(Duration::from_millis(200));
            let mut got = vec![0u8; 8];
            c.read_exact(&mut got).expect("read typed text");
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            let mut more = [0u8; 1];
            let still_open =
                matches!(c.read(&mut more), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            (got, still_open)
        });
        let mut s = open_console_input(&sock).expect("connect");
        type_into_console(&mut s, "abc-def\n").expect("type");
        let (got, still_open) = peer.join().expect("peer");
        assert_eq!(got, b"abc-def\r");
        assert!(
            still_open,
            "the typing connection closed while the guest might still read"
        );
    }

    #[test]
    fn ansi_sequences_are_removed_from_console_text() {
        let line =
            "         Starting \u{1b}[0;1;39msystemd-cryptsetup@root.s…ce\u{1b}[0m - Cryptography";
        assert_eq!(
            strip_ansi(line),
            "         Starting systemd-cryptsetup@root.s…ce - Cryptography"
        );
        assert_eq!(strip_ansi("plain [brackets]"), "plain [brackets]");
    }
    use crate::host::testing::definition::parse;

    fn step(toml_step: &str) -> Command {
        let text =
            format!("description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"t.x\"\n{toml_step}\n");
        match parse(Path::new("t.toml"), &text).expect("parse").spec.step[0]
            .kind
            .clone()
        {
            StepKind::Run(c) => c,
            other => panic!("not a run step: {other:?}"),
        }
    }

    #[test]
    fn judge_checks_exit_expect_and_expect_not() {
        let mut vars = BTreeMap::new();
        vars.insert("usr_root_hash".to_string(), "abc".to_string());
        let r = |code, out: &str, err: &str| ExecResult {
            code,
            stdout: out.into(),
            stderr: err.into(),
        };
        let s = step("run = \"x\"\nexpect = [\"hash {usr_root_hash}\"]\nexpect-not = [\"ZZZZ\"]");
        assert_eq!(
            judge(&s, &r(0, "hash abc", ""), &vars).expect("judge"),
            None
        );
        assert!(judge(&s, &r(0, "hash xyz", ""), &vars)
            .expect("judge")
            .is_some_and(|w| w.contains("lacks `hash abc`")));
        assert!(judge(&s, &r(1, "hash abc", ""), &vars)
            .expect("judge")
            .is_some_and(|w| w.contains("exit status 1")));
        assert!(judge(&s, &r(0, "hash abc ZZZZ", ""), &vars)
            .expect("judge")
            .is_some());
        let e = step("run = \"cat f\"\nexpect-exit = 1\nexpect-stderr = [\"Input/output error\"]");
        assert_eq!(
            judge(&e, &r(1, "", "cat: f: Input/output error"), &vars).expect("judge"),
            None
        );
        assert!(judge(&e, &r(0, "", ""), &vars).expect("judge").is_some());
    }

    #[test]
    fn console_problems_are_found() {
        assert!(console_problem("[ 1.0] ok\n[ 2.0] Kernel panic - not syncing: VFS").is_some());
        assert!(console_problem("You are in emergency mode. After logging in").is_some());
        assert!(console_problem("[FAILED] Failed to start etcd.service - etcd").is_some());
        assert_eq!(
            console_problem("[  OK  ] Reached target multi-user.target"),
            None
        );
    }
}
