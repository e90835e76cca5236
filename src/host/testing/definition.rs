//! QEMU test files (`qemu-tests/*.toml`): a scenario of one or more VMs and an ordered list of
//! steps, each belonging to a named test. Several named tests may share one scenario when they
//! need the same machine state (one boot serves them all). Files are discovered, not registered.

use crate::image::definition_line_col as line_col;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A duration written as `"90s"`, `"5m"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let secs = match Raw::deserialize(d)? {
            Raw::N(n) => n,
            Raw::S(s) => parse_secs(&s).map_err(serde::de::Error::custom)?,
        };
        Ok(Secs(Duration::from_secs(secs)))
    }
}

pub fn parse_secs(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1)
    } else {
        (t, 1)
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{s}` is not a duration (e.g. \"90s\" or \"5m\")"))
}

/// Which nodes a step runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSel {
    One(usize),
    /// `node = [2, 3]`: these nodes, in this order (a `start` boots them side by side).
    Some(Vec<usize>),
    All,
}

impl NodeSel {
    /// The 1-based node numbers this selects among `nodes`.
    pub fn numbers(&self, nodes: usize) -> Vec<usize> {
        match self {
            NodeSel::One(k) => vec![*k],
            NodeSel::Some(ks) => ks.clone(),
            NodeSel::All => (1..=nodes).collect(),
        }
    }
}

impl<'de> Deserialize<'de> for NodeSel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            L(Vec<usize>),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if n >= 1 => Ok(NodeSel::One(n)),
            Raw::L(ns) if !ns.is_empty() && ns.iter().all(|&n| n >= 1) => {
                let mut seen = std::collections::BTreeSet::new();
                if ns.iter().all(|n| seen.insert(*n)) {
                    Ok(NodeSel::Some(ns))
                } else {
                    Err(serde::de::Error::custom("node list names a node twice"))
                }
            }
            Raw::S(s) if s == "all" => Ok(NodeSel::All),
            _ => Err(serde::de::Error::custom(
                "node must be a number from 1, a list of them ([2, 3]) or \"all\"",
            )),
        }
    }
}

/// The `action` a step names in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Action {
    /// Reboot from inside the guest and wait until it is back with a new boot ID.
    Reboot,
    /// Press the reset button (QMP `system_reset`) and wait for a new boot ID.
    Reset,
    /// Cut the power (QEMU stops; disk and TPM state stay).
    PowerOff,
    /// Start a powered-off node on the same disk and TPM.
    Start,
    /// Change bytes of a file's data in usr slot A on the node's disk (node must be off).
    TamperUsr,
    /// Replace the UKI in the node's ESP with a changed copy (`how`); node off, `raw-disk` node.
    TamperUki,
    /// Put the UKI saved before the first `tamper-uki` back.
    RestoreUki,
    /// Type `text` on the serial console (e.g. a passphrase at a prompt); node running.
    Type,
    /// Build the image again as `version` with the same keys, and install it as an A/B update:
    /// /usr into slot B, the new UKI into the ESP. Node off, `raw-disk` node.
    InstallUpdate,
    /// Build the image again as `version` (or build `definition`) with the same keys, into
    /// `{work}/DEST` (one build at a time across scenarios), e.g. a release to publish.
    Build,
    /// Copy the host file `source` to `dest` in the guest (through the guest agent); node running.
    Push,
    /// Give the node another Ignition config (`ignition`, relative to the test file) for its
    /// next start; node off.
    SetIgnition,
    /// Pass no Ignition config through fw_cfg from the node's next start; node off.
    ClearIgnition,
    /// Give the node a new, empty software TPM (another machine's TPM, as far as anyone can
    /// tell) and a fresh copy of the image as its disk; node off. Its Ignition config stays.
    NewMachine,
}

/// `how` of a `tamper-uki` step in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum UkiTamper {
    /// One byte of the kernel (.linux) flipped; signatures and .pcrsig left as they were.
    FlipByte,
    /// Signature removed and the UKI signed again with a key the firmware does not know.
    ForeignKey,
    /// `.cmdline` text changed (`replace = [from, to]`, same length or shorter), .pcrsig kept.
    Cmdline,
}

/// One step of a scenario: which test it belongs to, which node(s) it acts on, and what it does.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The named test this step belongs to (`boot.basic`); reported by this name.
    pub test: String,
    pub node: NodeSel,
    /// What the step checks, for the report.
    pub why: Option<String>,
    pub kind: StepKind,
}

/// What a step does, with exactly the fields that kind of step takes.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// A shell command run in the guest through the guest agent.
    Run(Command),
    /// A shell command run on the host (templates expanded; `{keel}` is this keel binary,
    /// `{work}` a scratch directory of the scenario, `{keys}` the image's key directory,
    /// `{tools}` keel's tools tree).
    Host(Command),
    /// Reboot from inside the guest and wait until it is back with a new boot ID.
    Reboot,
    /// Press the reset button (QMP `system_reset`) and wait for a new boot ID.
    Reset,
    /// Cut the power (QEMU stops; disk and TPM state stay).
    PowerOff,
    /// Start a powered-off node on the same disk and TPM. With `console`, wait until the
    /// console shows all of it instead of waiting for the guest agent (a boot that is meant to
    /// stop early; the implicit console checks skip that boot), and fail on `console_not`.
    Start {
        console: Vec<String>,
        console_not: Vec<String>,
        timeout: Option<Secs>,
        /// `clock-ahead`: the machine's clock (its RTC) starts this far ahead of the host's, as
        /// if it had stayed off that much longer (certificates that expire meanwhile).
        clock_ahead: Option<Secs>,
    },
    /// Change bytes of a file's data in usr slot A on the node's disk (node off).
    TamperUsr {
        path: String,
    },
    /// Replace the UKI in the node's ESP with a changed copy; node off, `raw-disk` node. The
    /// UKI of `version` (templates expanded), default the image's own.
    TamperUki {
        edit: UkiEdit,
        version: Option<String>,
    },
    /// Put the UKI saved before the first `tamper-uki` back.
    RestoreUki,
    /// Type `text` on the serial console (templates expanded; `\n` is Enter); node running.
    Type {
        text: String,
    },
    /// Build the image again as `version` (or build `definition`, relative to the test file),
    /// with the same keys, and install it as an A/B update: /usr into slot B, the new UKI into
    /// the ESP. Node off, `raw-disk` node.
    InstallUpdate {
        version: String,
        definition: Option<PathBuf>,
    },
    /// Build the image as `version` (or build `definition`, relative to the test file) with the
    /// same keys into `{work}/out`; the node may run meanwhile.
    Build {
        version: String,
        definition: Option<PathBuf>,
        out: String,
    },
    /// Copy the host file `source` to `dest` in the guest (through the guest agent).
    Push {
        source: String,
        dest: String,
    },
    /// Give the node another Ignition config (relative to the test file) for its next start;
    /// node off.
    SetIgnition {
        ignition: PathBuf,
    },
    /// Pass no Ignition config through fw_cfg from the node's next start; node off.
    ClearIgnition,
    NewMachine,
}

/// How `tamper-uki` changes the UKI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UkiEdit {
    /// One byte of the kernel (.linux) flipped; signatures and .pcrsig left as they were.
    FlipByte,
    /// Signature removed and the UKI signed again with a key the firmware does not know.
    ForeignKey,
    /// `.cmdline` text `from` changed to `to` (same length or shorter), .pcrsig kept.
    Cmdline { from: String, to: String },
}

/// A command (in the guest or on the host) and what its result must be.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Command {
    pub command: String,
    /// Substrings that must all appear in stdout (templates like `{usr_root_hash}` expanded).
    pub expect: Vec<String>,
    /// Substrings that must not appear in stdout or stderr.
    pub expect_not: Vec<String>,
    /// Substrings that must appear in stderr.
    pub expect_stderr: Vec<String>,
    /// Required exit status (default 0).
    pub expect_exit: Option<i64>,
    /// Repeat the command until it passes, for at most this long (guest commands).
    pub retry_for: Option<Secs>,
    /// Time limit of one run of the command.
    pub timeout: Option<Secs>,
    /// Save trimmed stdout under this name for later `{name}` templates.
    pub save: Option<String>,
    /// Record the time from the node's start until this step passed, under this name.
    pub mark: Option<String>,
}

impl StepKind {
    /// Whether the step edits the node's disk image in place (needs a `raw-disk` node).
    pub fn edits_disk(&self) -> bool {
        matches!(
            self,
            StepKind::TamperUki { .. } | StepKind::RestoreUki | StepKind::InstallUpdate { .. }
        )
    }

    /// The name the step has in a test file (`run`, `host`, or the action).
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Run(_) => "run",
            StepKind::Host(_) => "host",
            StepKind::Reboot => "reboot",
            StepKind::Reset => "reset",
            StepKind::PowerOff => "power-off",
            StepKind::Start { .. } => "start",
            StepKind::TamperUsr { .. } => "tamper-usr",
            StepKind::TamperUki { .. } => "tamper-uki",
            StepKind::RestoreUki => "restore-uki",
            StepKind::Type { .. } => "type",
            StepKind::InstallUpdate { .. } => "install-update",
            StepKind::Build { .. } => "build",
            StepKind::Push { .. } => "push",
            StepKind::SetIgnition { .. } => "set-ignition",
            StepKind::ClearIgnition => "clear-ignition",
            StepKind::NewMachine => "new-machine",
        }
    }
}

/// A step as written in the file: every field any step may have. [`parse`] turns it into a
/// [`Step`], refusing fields that do not belong to its kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawStep {
    /// The named test this step belongs to (`boot.basic`); reported by this name.
    test: String,
    #[serde(default = "default_node")]
    node: NodeSel,
    /// A shell command run in the guest through the guest agent.
    run: Option<String>,
    /// A shell command run on the host (templates expanded; `{keel}` is this keel binary,
    /// `{work}` a scratch directory of the scenario, `{keys}` the image's key directory,
    /// `{tools}` keel's tools tree). Judged like `run`.
    host: Option<String>,
    /// For `set-ignition`: the config file, relative to the test file.
    ignition: Option<PathBuf>,
    /// For `push`: the host file (templates expanded).
    source: Option<String>,
    /// For `push`: the path in the guest.
    dest: Option<String>,
    action: Option<Action>,
    /// For `tamper-usr`: the file under /usr whose data is changed.
    path: Option<String>,
    /// For `tamper-uki`.
    how: Option<UkiTamper>,
    /// For `tamper-uki` with `how = "cmdline"`: `[from, to]`.
    #[serde(default)]
    replace: Vec<String>,
    /// For `install-update`: the version the image is built as.
    version: Option<String>,
    /// For `install-update`: build this image definition (relative to the test file) instead of
    /// the one under test, e.g. a variant that changes one setting.
    definition: Option<PathBuf>,
    /// For `type`: the text, templates expanded; `\n` is sent as Enter.
    text: Option<String>,
    /// For `start`: wait until the console shows all of these instead of waiting for the guest
    /// agent (a boot that is meant to stop early). Implicit console checks skip that boot.
    #[serde(default)]
    console: Vec<String>,
    /// For `start` with `console`: text that must not appear on that boot's console.
    #[serde(default)]
    console_not: Vec<String>,
    /// For `start`: the machine's clock starts this far ahead of the host's ("3m").
    clock_ahead: Option<Secs>,
    /// Substrings that must all appear in stdout (templates like `{usr_root_hash}` expanded).
    #[serde(default)]
    expect: Vec<String>,
    /// Substrings that must not appear in stdout or stderr.
    #[serde(default)]
    expect_not: Vec<String>,
    /// Substrings that must appear in stderr.
    #[serde(default)]
    expect_stderr: Vec<String>,
    /// Required exit status (default 0).
    expect_exit: Option<i64>,
    /// Repeat the command until it passes, for at most this long.
    retry_for: Option<Secs>,
    /// Time limit of one run of the command.
    timeout: Option<Secs>,
    /// Save trimmed stdout under this name for later `{name}` templates.
    save: Option<String>,
    /// Record the time from the node's start until this step passed, under this name.
    mark: Option<String>,
    /// What the step checks, for the report.
    why: Option<String>,
}

impl RawStep {
    /// The optional fields this step sets, by their names in the file.
    fn present(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |set: bool, name: &'static str| {
            if set {
                v.push(name);
            }
        };
        add(self.ignition.is_some(), "ignition");
        add(self.source.is_some(), "source");
        add(self.dest.is_some(), "dest");
        add(self.path.is_some(), "path");
        add(self.how.is_some(), "how");
        add(!self.replace.is_empty(), "replace");
        add(self.version.is_some(), "version");
        add(self.definition.is_some(), "definition");
        add(self.text.is_some(), "text");
        add(!self.console.is_empty(), "console");
        add(!self.console_not.is_empty(), "console-not");
        add(self.clock_ahead.is_some(), "clock-ahead");
        add(!self.expect.is_empty(), "expect");
        add(!self.expect_not.is_empty(), "expect-not");
        add(!self.expect_stderr.is_empty(), "expect-stderr");
        add(self.expect_exit.is_some(), "expect-exit");
        add(self.retry_for.is_some(), "retry-for");
        add(self.timeout.is_some(), "timeout");
        add(self.save.is_some(), "save");
        add(self.mark.is_some(), "mark");
        v
    }

    fn command(&self, command: String) -> Command {
        Command {
            command,
            expect: self.expect.clone(),
            expect_not: self.expect_not.clone(),
            expect_stderr: self.expect_stderr.clone(),
            expect_exit: self.expect_exit,
            retry_for: self.retry_for,
            timeout: self.timeout,
            save: self.save.clone(),
            mark: self.mark.clone(),
        }
    }

    /// The typed step; the error says what is missing or does not belong (without the file
    /// and step number, which the caller adds).
    fn into_step(self) -> Result<Step, String> {
        let kinds = usize::from(self.run.is_some())
            + usize::from(self.action.is_some())
            + usize::from(self.host.is_some());
        if kinds != 1 {
            return Err("must have exactly one of `run`, `host` or `action`".into());
        }
        let (kind, allowed): (StepKind, &[&str]) = match (&self.run, &self.host, self.action) {
            (Some(r), _, _) => (
                StepKind::Run(self.command(r.clone())),
                &[
                    "expect",
                    "expect-not",
                    "expect-stderr",
                    "expect-exit",
                    "retry-for",
                    "timeout",
                    "save",
                    "mark",
                ],
            ),
            (_, Some(h), _) => (
                StepKind::Host(self.command(h.clone())),
                &[
                    "expect",
                    "expect-not",
                    "expect-stderr",
                    "expect-exit",
                    "timeout",
                    "save",
                    "mark",
                ],
            ),
            (_, _, Some(a)) => self.action_kind(a)?,
            (None, None, None) => {
                return Err("must have exactly one of `run`, `host` or `action`".into())
            }
        };
        let stray: Vec<&str> = self
            .present()
            .into_iter()
            .filter(|f| !allowed.contains(f))
            .collect();
        if let Some(field) = stray.first() {
            return Err(format!(
                "`{field}` belongs to {}, not to a `{}` step",
                owner(field),
                kind.name()
            ));
        }
        Ok(Step {
            test: self.test,
            node: self.node,
            why: self.why,
            kind,
        })
    }

    fn action_kind(&self, a: Action) -> Result<(StepKind, &'static [&'static str]), String> {
        Ok(match a {
            Action::Reboot => (StepKind::Reboot, &[]),
            Action::Reset => (StepKind::Reset, &[]),
            Action::PowerOff => (StepKind::PowerOff, &[]),
            Action::RestoreUki => (StepKind::RestoreUki, &[]),
            Action::ClearIgnition => (StepKind::ClearIgnition, &[]),
            Action::NewMachine => (StepKind::NewMachine, &[]),
            Action::Start => (
                StepKind::Start {
                    console: self.console.clone(),
                    console_not: self.console_not.clone(),
                    timeout: self.timeout,
                    clock_ahead: self.clock_ahead,
                },
                &["console", "console-not", "timeout", "clock-ahead"],
            ),
            Action::TamperUsr => match &self.path {
                Some(p) if p.starts_with("/usr/") => {
                    (StepKind::TamperUsr { path: p.clone() }, &["path"])
                }
                _ => return Err("tamper-usr needs `path` of a file under /usr/".into()),
            },
            Action::TamperUki => {
                let edit = match self.how {
                    None => {
                        return Err(
                            "tamper-uki needs `how` (flip-byte, foreign-key or cmdline)".into()
                        )
                    }
                    Some(UkiTamper::FlipByte) => UkiEdit::FlipByte,
                    Some(UkiTamper::ForeignKey) => UkiEdit::ForeignKey,
                    Some(UkiTamper::Cmdline) => match self.replace.as_slice() {
                        [from, to] => UkiEdit::Cmdline {
                            from: from.clone(),
                            to: to.clone(),
                        },
                        _ => {
                            return Err(
                                "how = \"cmdline\" needs replace = [\"from\", \"to\"]".into()
                            )
                        }
                    },
                };
                (
                    StepKind::TamperUki {
                        edit,
                        version: self.version.clone(),
                    },
                    &["how", "replace", "version"],
                )
            }
            Action::Type => match &self.text {
                Some(text) => (StepKind::Type { text: text.clone() }, &["text"]),
                None => return Err("type needs `text`".into()),
            },
            Action::InstallUpdate => match &self.version {
                Some(v) => (
                    StepKind::InstallUpdate {
                        version: v.clone(),
                        definition: self.definition.clone(),
                    },
                    &["version", "definition"],
                ),
                None => return Err("install-update needs `version`".into()),
            },
            Action::Build => match (&self.version, &self.dest) {
                (Some(v), Some(d)) if !d.contains('/') && !d.starts_with('.') => (
                    StepKind::Build {
                        version: v.clone(),
                        definition: self.definition.clone(),
                        out: d.clone(),
                    },
                    &["version", "definition", "dest"],
                ),
                _ => {
                    return Err(
                        "build needs `version` and `dest` (a directory name under {work})".into(),
                    )
                }
            },
            Action::Push => match (&self.source, &self.dest) {
                (Some(s), Some(d)) => (
                    StepKind::Push {
                        source: s.clone(),
                        dest: d.clone(),
                    },
                    &["source", "dest"],
                ),
                _ => return Err("push needs `source` (host) and `dest` (guest)".into()),
            },
            Action::SetIgnition => match &self.ignition {
                Some(i) => (
                    StepKind::SetIgnition {
                        ignition: i.clone(),
                    },
                    &["ignition"],
                ),
                None => return Err("set-ignition needs `ignition` (a config file)".into()),
            },
        })
    }
}

/// Where a step field belongs, for the error that finds it elsewhere.
fn owner(field: &str) -> &'static str {
    match field {
        "ignition" => "action = \"set-ignition\"",
        "source" | "dest" => "action = \"push\"",
        "path" => "action = \"tamper-usr\"",
        "how" | "replace" => "action = \"tamper-uki\"",
        "version" | "definition" => "action = \"install-update\" or \"build\"",
        "text" => "action = \"type\"",
        "console" | "console-not" => "action = \"start\"",
        "retry-for" => "`run` steps",
        _ => "`run` and `host` steps",
    }
}

fn default_node() -> NodeSel {
    NodeSel::One(1)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// Ignition config passed through fw_cfg, relative to the test file; may use templates
    /// such as {work} (for configs the file's `setup` command made).
    pub ignition: Option<PathBuf>,
    /// Ignition config written to the node's ESP (keel/config.ign) before its first start, as
    /// `keel embed-config` does; needs `raw-disk`.
    pub esp_ignition: Option<PathBuf>,
    pub memory_mib: Option<u32>,
    /// Secure Boot on, with the image's keys enrolled.
    #[serde(default)]
    pub secure_boot: bool,
    /// A sparse raw copy of the image instead of a qcow2 overlay, for steps that edit the ESP.
    #[serde(default)]
    pub raw_disk: bool,
    /// A software TPM 2.0 (default); `false` gives a machine without one.
    #[serde(default = "yes")]
    pub tpm: bool,
    /// Start with the scenario and wait for the guest agent (default); `false` leaves the node
    /// off until an `action = "start"` step (e.g. one that waits for console text).
    #[serde(default = "yes")]
    pub autostart: bool,
}

fn yes() -> bool {
    true
}

impl Default for NodeConfig {
    /// A node as a test gets it without a `[[node]]` table: 2 GiB, a TPM, a qcow2 overlay.
    fn default() -> Self {
        NodeConfig {
            ignition: None,
            esp_ignition: None,
            memory_mib: None,
            secure_boot: false,
            raw_disk: false,
            tpm: true,
            autostart: true,
        }
    }
}

/// A test file, checked: every step typed.
#[derive(Debug, Clone)]
pub struct TestSpec {
    pub description: String,
    pub nodes: usize,
    pub timeout: Secs,
    pub tags: Vec<String>,
    /// Checks for failed units / emergency mode are skipped for these tests.
    pub allow_failures: Vec<String>,
    /// Nodes share a private switch (in addition to user networking on node 1... none).
    pub network: bool,
    /// A host command run once before any node starts (templates as in host steps), e.g. to
    /// make the nodes' Ignition configs under {work}; its failure fails every test of the file.
    pub setup: Option<String>,
    pub node: Vec<NodeConfig>,
    pub step: Vec<Step>,
    /// Start from a state another file saved (its node, running, as it was when saved) instead
    /// of booting the image for the first time.
    pub start: Option<String>,
    /// After the last step, when every test passed, save the running node under this name for
    /// the files that `start` from it.
    pub saves: Option<String>,
    /// Run alone: no other scenario's VMs share the machine meanwhile (timings, many nodes).
    pub exclusive: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTestFile {
    description: String,
    #[serde(default = "default_nodes")]
    nodes: usize,
    timeout: Secs,
    #[serde(default)]
    tags: Vec<String>,
    /// Checks for failed units / emergency mode are skipped for these tests.
    #[serde(default)]
    allow_failures: Vec<String>,
    /// Nodes share a private switch (in addition to user networking on node 1... none).
    #[serde(default)]
    network: bool,
    /// A host command run once before any node starts (templates as in host steps), e.g. to
    /// make the nodes' Ignition configs under {work}; its failure fails every test of the file.
    setup: Option<String>,
    #[serde(default)]
    node: Vec<NodeConfig>,
    step: Vec<RawStep>,
    start: Option<String>,
    saves: Option<String>,
    #[serde(default)]
    exclusive: bool,
}

fn default_nodes() -> usize {
    1
}

/// One test file, validated.
#[derive(Debug, Clone)]
pub struct TestFile {
    pub path: PathBuf,
    /// The file name without extension: names the scenario's results directory.
    pub scenario: String,
    pub spec: TestSpec,
}

impl TestFile {
    /// The named tests this file reports, in order of first appearance.
    pub fn test_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for s in &self.spec.step {
            if !names.contains(&s.test) {
                names.push(s.test.clone());
            }
        }
        names
    }

    pub fn node_config(&self, index: usize) -> NodeConfig {
        self.spec.node.get(index).cloned().unwrap_or_default()
    }

    /// True when any of `filters` names one of its tests (prefix or exact), its scenario or a tag.
    pub fn matches(&self, filters: &[String]) -> bool {
        filters.is_empty()
            || filters.iter().any(|f| {
                self.scenario == *f
                    || self.spec.tags.contains(f)
                    || self
                        .test_names()
                        .iter()
                        .any(|n| n == f || n.starts_with(&format!("{f}.")) || glob_match(f, n))
            })
    }
}

/// `*` matches any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == name;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(p) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else if let Some(pos) = rest.find(p) {
            rest = &rest[pos + p.len()..];
        } else {
            return false;
        }
    }
    true
}

pub fn parse(path: &Path, text: &str) -> Result<TestFile> {
    let spec: RawTestFile = toml::from_str(text).map_err(|e| {
        let (l, c) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        anyhow::anyhow!("{}:{l}:{c}: {}", path.display(), e.message())
    })?;
    let scenario = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if spec.nodes == 0 || spec.nodes > 8 {
        bail!("{}: nodes must be 1 to 8", path.display());
    }
    if spec.step.is_empty() {
        bail!("{}: a test needs at least one [[step]]", path.display());
    }
    check_states(path, &spec)?;
    for (k, c) in spec.node.iter().enumerate() {
        if c.esp_ignition.is_some() && !c.raw_disk {
            bail!(
                "{}: node {}: esp-ignition writes the disk's ESP: give it raw-disk = true",
                path.display(),
                k + 1
            );
        }
    }
    let mut steps = Vec::with_capacity(spec.step.len());
    for (i, raw) in spec.step.into_iter().enumerate() {
        let n = i + 1;
        let test = raw.test.clone();
        if test.is_empty() || test.contains(char::is_whitespace) {
            bail!(
                "{}: step {n}: `test` must be a name like boot.basic",
                path.display()
            );
        }
        let s = raw
            .into_step()
            .map_err(|e| anyhow::anyhow!("{}: step {n} ({test}): {e}", path.display()))?;
        if let Some(k) = s
            .node
            .numbers(spec.nodes)
            .into_iter()
            .find(|&k| k > spec.nodes)
        {
            bail!(
                "{}: step {n} ({}) names node {k} but the test has {} node(s)",
                path.display(),
                s.test,
                spec.nodes
            );
        }
        if let StepKind::InstallUpdate {
            definition: Some(d),
            ..
        }
        | StepKind::Build {
            definition: Some(d),
            ..
        } = &s.kind
        {
            let full = path.parent().unwrap_or(Path::new(".")).join(d);
            if !full.is_file() {
                bail!(
                    "{}: step {n} ({}): definition {} does not exist (paths are relative to the test file)",
                    path.display(),
                    s.test,
                    full.display()
                );
            }
        }
        if s.kind.edits_disk() {
            let ks = s.node.numbers(spec.nodes);
            if let Some(k) = ks
                .into_iter()
                .find(|k| !spec.node.get(k - 1).is_some_and(|c| c.raw_disk))
            {
                bail!(
                    "{}: step {n} ({}): {} edits the disk in place: give node {k} raw-disk = true",
                    path.display(),
                    s.test,
                    s.kind.name()
                );
            }
        }
        steps.push(s);
    }
    let spec = TestSpec {
        description: spec.description,
        nodes: spec.nodes,
        timeout: spec.timeout,
        tags: spec.tags,
        allow_failures: spec.allow_failures,
        network: spec.network,
        setup: spec.setup,
        node: spec.node,
        step: steps,
        start: spec.start,
        saves: spec.saves,
        exclusive: spec.exclusive,
    };
    Ok(TestFile {
        path: path.to_path_buf(),
        scenario,
        spec,
    })
}

/// A saved state is one default node (no `[[node]]` table, no switch): the node a file that
/// starts from it gets is exactly the one that was saved.
fn check_states(path: &Path, spec: &RawTestFile) -> Result<()> {
    for (key, name) in [("saves", &spec.saves), ("start", &spec.start)] {
        let Some(name) = name else { continue };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!(
                "{}: {key} = {name:?}: a state name is letters, digits and dashes",
                path.display()
            );
        }
        if spec.nodes != 1 || !spec.node.is_empty() || spec.network {
            bail!(
                "{}: {key} = \"{name}\" needs one default node: remove `nodes`, `network` and \
                 the [[node]] tables (a saved state is a single node with the default settings)",
                path.display()
            );
        }
    }
    if spec.start.is_some() && spec.saves.is_some() {
        bail!(
            "{}: a file either starts from a state or saves one, not both",
            path.display()
        );
    }
    Ok(())
}

/// Every `start` names a state exactly one file `saves`.
fn check_state_links(files: &[TestFile]) -> Result<()> {
    let mut savers: std::collections::BTreeMap<&str, &Path> = std::collections::BTreeMap::new();
    for f in files {
        if let Some(n) = &f.spec.saves {
            if let Some(other) = savers.insert(n, &f.path) {
                bail!(
                    "state {n} is saved by both {} and {}",
                    other.display(),
                    f.path.display()
                );
            }
        }
    }
    for f in files {
        if let Some(n) = &f.spec.start {
            if !savers.contains_key(n.as_str()) {
                bail!(
                    "{}: start = \"{n}\", but no test file saves a state of that name (saves = \"{n}\")",
                    f.path.display()
                );
            }
        }
    }
    Ok(())
}

/// The files `filters` select, plus the files that save the states they start from (run first).
pub fn select(files: Vec<TestFile>, filters: &[String]) -> Vec<TestFile> {
    let chosen: Vec<bool> = files.iter().map(|f| f.matches(filters)).collect();
    let needed: Vec<String> = files
        .iter()
        .zip(&chosen)
        .filter(|(_, c)| **c)
        .filter_map(|(f, _)| f.spec.start.clone())
        .collect();
    files
        .into_iter()
        .zip(chosen)
        .filter(|(f, c)| *c || f.spec.saves.as_ref().is_some_and(|s| needed.contains(s)))
        .map(|(f, _)| f)
        .collect()
}

/// All test files under `dir` (recursively), sorted by path.
pub fn discover(dir: &Path) -> Result<Vec<TestFile>> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        if e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(e.path())
                .with_context(|| format!("reading {}", e.path().display()))?;
            out.push(parse(e.path(), &text)?);
        }
    }
    let mut seen = std::collections::BTreeMap::new();
    for f in &out {
        for n in f.test_names() {
            if let Some(other) = seen.insert(n.clone(), f.path.clone()) {
                bail!(
                    "test {n} is defined in both {} and {}",
                    other.display(),
                    f.path.display()
                );
            }
        }
    }
    check_state_links(&out)?;
    Ok(out)
}

/// Expands `{name}` templates from `vars`; unknown names are an error (a typo must not pass).
pub fn expand(text: &str, vars: &std::collections::BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end)
                if after[..end]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && end > 0 =>
            {
                let key = &after[..end];
                let v = vars
                    .get(key)
                    .with_context(|| format!("unknown template {{{key}}} in `{text}`"))?;
                out.push_str(v);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const GOOD: &str = r#"
description = "one node"
timeout = "10m"
tags = ["boot"]

[[step]]
test = "boot.basic"
run = "systemctl is-system-running --wait"
expect = ["running"]

[[step]]
test = "boot.persist"
action = "reboot"

[[step]]
test = "boot.persist"
run = "cat /var/x"
retry-for = "30s"
"#;

    #[test]
    fn parses_and_lists_test_names_in_order() {
        let f = parse(Path::new("qemu-tests/single.toml"), GOOD).expect("parse");
        assert_eq!(f.scenario, "single");
        assert_eq!(f.test_names(), vec!["boot.basic", "boot.persist"]);
        assert_eq!(f.spec.timeout, Secs(Duration::from_secs(600)));
        match &f.spec.step[2].kind {
            StepKind::Run(c) => assert_eq!(c.retry_for, Some(Secs(Duration::from_secs(30)))),
            other => panic!("step 3 is a run step, not {other:?}"),
        }
        assert_eq!(f.spec.step[1].kind, StepKind::Reboot);
        let n = f.node_config(0);
        assert!(
            n.tpm && !n.raw_disk && !n.secure_boot,
            "default node: TPM, overlay, no SB"
        );
    }

    #[test]
    fn saved_states_link_savers_and_starters() {
        let saver = GOOD.replace("tags = [\"boot\"]", "saves = \"booted\"");
        let starter = |name: &str| {
            format!(
                "description = \"d\"\ntimeout = \"5m\"\nstart = \"{name}\"\n[[step]]\ntest = \"agent.x\"\nrun = \"true\"\n"
            )
        };
        let a = parse(Path::new("a.toml"), &saver).expect("saver");
        let b = parse(Path::new("b.toml"), &starter("booted")).expect("starter");
        assert_eq!(a.spec.saves.as_deref(), Some("booted"));
        assert_eq!(b.spec.start.as_deref(), Some("booted"));
        check_state_links(&[a.clone(), b.clone()]).expect("linked");
        // Selecting the starter brings its saver along, ahead of it (file order kept).
        let picked = select(vec![a.clone(), b.clone()], &["agent".to_string()]);
        let names: Vec<&str> = picked.iter().map(|f| f.scenario.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        let only_a = select(vec![a.clone(), b.clone()], &["boot".to_string()]);
        assert_eq!(only_a.len(), 1);

        let orphan = parse(Path::new("c.toml"), &starter("other")).expect("parses alone");
        let e = check_state_links(&[a.clone(), orphan]).expect_err("unknown state");
        assert!(format!("{e:#}").contains("no test file saves"), "{e:#}");
        let twice = parse(Path::new("d.toml"), &saver).expect("second saver");
        let e = check_state_links(&[a, twice]).expect_err("two savers");
        assert!(format!("{e:#}").contains("saved by both"), "{e:#}");

        // A state is one default node.
        let e = parse(
            Path::new("e.toml"),
            &format!("{}[[node]]\nmemory-mib = 1024\n", starter("booted")),
        )
        .expect_err("node table");
        assert!(format!("{e:#}").contains("one default node"), "{e:#}");
        let e = parse(
            Path::new("f.toml"),
            &starter("booted").replace("start =", "nodes = 2\nstart ="),
        )
        .expect_err("two nodes");
        assert!(format!("{e:#}").contains("one default node"), "{e:#}");
    }

    #[test]
    fn filters_by_name_prefix_tag_and_glob() {
        let f = parse(Path::new("single.toml"), GOOD).expect("parse");
        for (filter, want) in [
            ("boot", true),
            ("boot.basic", true),
            ("boot.*", true),
            ("etcd", false),
            ("single", true),
            ("*.persist", true),
            ("net.two-nodes", false),
        ] {
            assert_eq!(f.matches(&[filter.to_string()]), want, "filter {filter}");
        }
        assert!(f.matches(&[]));
    }

    #[test]
    fn a_step_names_one_node_a_list_or_all() {
        let f = parse(
            Path::new("t.toml"),
            "description = \"x\"\ntimeout = 5\nnodes = 3\n[[step]]\ntest = \"a\"\nnode = [3, 2]\naction = \"start\"\n[[step]]\ntest = \"a\"\nnode = \"all\"\nrun = \"true\"\n",
        )
        .expect("parses");
        assert_eq!(f.spec.step[0].node.numbers(3), vec![3, 2]);
        assert_eq!(f.spec.step[1].node.numbers(3), vec![1, 2, 3]);
        assert_eq!(NodeSel::One(2).numbers(3), vec![2]);
    }

    #[test]
    fn bad_files_are_refused_with_position() {
        let cases = [
            ("unknown field", "description = \"x\"\ntimeout = 5\nbogus = 1\n[[step]]\ntest = \"a\"\nrun = \"true\"\n", "t.toml:3:1"),
            ("run and action", "description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"a\"\nrun = \"true\"\naction = \"reboot\"\n", "exactly one of"),
            ("node out of range", "description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"a\"\nnode = 3\nrun = \"true\"\n", "names node 3"),
            ("node list out of range", "description = \"x\"\ntimeout = 5\nnodes = 2\n[[step]]\ntest = \"a\"\nnode = [1, 3]\naction = \"start\"\n", "names node 3"),
            ("node listed twice", "description = \"x\"\ntimeout = 5\nnodes = 2\n[[step]]\ntest = \"a\"\nnode = [2, 2]\naction = \"start\"\n", "names a node twice"),
            ("empty node list", "description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"a\"\nnode = []\naction = \"start\"\n", "a list of them"),
            ("tamper without path", "description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"a\"\naction = \"tamper-usr\"\n", "tamper-usr needs"),
            ("bad duration", "description = \"x\"\ntimeout = \"5h\"\n[[step]]\ntest = \"a\"\nrun = \"true\"\n", "not a duration"),
            ("tamper-uki without how", "description = \"x\"\ntimeout = 5\n[[node]]\nraw-disk = true\n[[step]]\ntest = \"a\"\naction = \"tamper-uki\"\n", "needs `how`"),
            ("cmdline without replace", "description = \"x\"\ntimeout = 5\n[[node]]\nraw-disk = true\n[[step]]\ntest = \"a\"\naction = \"tamper-uki\"\nhow = \"cmdline\"\n", "replace = ["),
            ("uki edit on an overlay", "description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"a\"\naction = \"tamper-uki\"\nhow = \"flip-byte\"\n", "raw-disk = true"),
            ("update without version", "description = \"x\"\ntimeout = 5\n[[node]]\nraw-disk = true\n[[step]]\ntest = \"a\"\naction = \"install-update\"\n", "needs `version`"),
            ("type without text", "description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"a\"\naction = \"type\"\n", "type needs `text`"),
            ("console on a command", "description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"a\"\nrun = \"true\"\nconsole = [\"x\"]\n", "belongs to action"),
            ("expect on an action", "description = \"x\"\ntimeout = 5\n[[step]]\ntest = \"a\"\naction = \"reboot\"\nexpect = [\"x\"]\n", "`expect` belongs to `run` and `host` steps, not to a `reboot` step"),
            ("timeout on an update", "description = \"x\"\ntimeout = 5\n[[node]]\nraw-disk = true\n[[step]]\ntest = \"a\"\naction = \"install-update\"\nversion = \"2\"\ntimeout = \"5m\"\n", "not to a `install-update` step"),
        ];
        for (name, text, want) in cases {
            let err = format!("{:#}", parse(Path::new("t.toml"), text).expect_err(name));
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn templates_expand_and_unknown_names_fail() {
        let mut v = BTreeMap::new();
        v.insert("usr_root_hash".to_string(), "abc".to_string());
        assert_eq!(
            expand("hash {usr_root_hash} ok", &v).expect("expand"),
            "hash abc ok"
        );
        assert_eq!(
            expand("printf '{a b}'", &v).expect("expand"),
            "printf '{a b}'"
        );
        assert!(expand("{nope}", &v).is_err());
    }

    #[test]
    fn install_update_may_name_another_definition() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path();
        std::fs::create_dir_all(d.join("images")).expect("mkdir");
        std::fs::create_dir_all(d.join("tests")).expect("mkdir");
        std::fs::write(d.join("images/variant.toml"), "extends = \"x.toml\"\n").expect("write");
        let test = |definition: &str, action: &str| {
            format!(
                "description = \"d\"\ntimeout = \"5m\"\n[[node]]\nraw-disk = true\n\
                 [[step]]\ntest = \"u.x\"\naction = \"{action}\"\nversion = \"2\"\n\
                 definition = \"{definition}\"\n"
            )
        };
        let file = d.join("tests/u.toml");
        let f = parse(&file, &test("../images/variant.toml", "install-update")).expect("parses");
        assert!(matches!(
            &f.spec.step[0].kind,
            StepKind::InstallUpdate { definition: Some(d), .. } if d == Path::new("../images/variant.toml")
        ));
        let err = parse(&file, &test("../images/absent.toml", "install-update"))
            .expect_err("a missing definition is refused")
            .to_string();
        assert!(err.contains("images/absent.toml does not exist"), "{err}");
        let err = parse(&file, &test("../images/variant.toml", "power-off"))
            .expect_err("definition only with install-update")
            .to_string();
        assert!(
            err.contains("belongs to action = \"install-update\""),
            "{err}"
        );
        // `build` writes below {work}: it needs a plain directory name.
        let build = |dest: &str| {
            format!(
                "description = \"d\"\ntimeout = \"5m\"\n[[node]]\n[[step]]\ntest = \"u.x\"\n\
                 action = \"build\"\nversion = \"2\"\ndefinition = \"../images/variant.toml\"\n{dest}"
            )
        };
        let f = parse(&file, &build("dest = \"v2\"\n")).expect("parses");
        assert!(matches!(
            &f.spec.step[0].kind,
            StepKind::Build { out, definition: Some(_), .. } if out == "v2"
        ));
        for bad in ["", "dest = \"../x\"\n", "dest = \"a/b\"\n"] {
            let err = parse(&file, &build(bad))
                .expect_err("dest is required and plain")
                .to_string();
            assert!(err.contains("build needs `version` and `dest`"), "{err}");
        }
    }

    /// The benchmarks' scenarios (bench/, run by scripts/bench) parse like the suite's.
    #[test]
    fn benchmark_scenarios_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench");
        let files = discover(&root).expect("discover bench/");
        let names: Vec<String> = files.iter().flat_map(|f| f.test_names()).collect();
        for want in ["bench.agent-overhead", "bench.cluster-net"] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
    }

    #[test]
    fn shipped_tests_parse_and_cover_the_required_names() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-tests");
        let files = discover(&root).expect("discover");
        let names: Vec<String> = files.iter().flat_map(|f| f.test_names()).collect();
        for want in [
            "boot.basic",
            "boot.persist",
            "boot.verity-tamper",
            "etcd.single-node",
            "net.two-nodes",
            "trust.pcr11-prediction",
            "trust.secureboot",
            "trust.tampered-uki-no-unlock",
            "trust.update-same-key-unlocks",
            "trust.no-tpm-refused",
            "trust.no-tpm-unencrypted",
            "trust.recovery-key",
            "agent.signed-runs",
            "agent.unsigned-refused",
            "agent.tampered-refused",
            "agent.unenrolled-tpm-refused",
            "ignition.apply",
            "ignition.bad-config",
            "ignition.esp-source",
            "cluster.etcd-three-nodes",
            "cluster.overlay",
            "cluster.overlay-encrypted",
            "attest.cluster-forms",
            "attest.renewal",
            "attest.cold-start",
            "attest.revoked",
            "attest.stolen-config-refused",
            "attest.unknown-tpm-refused",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from qemu-tests: {names:?}"
            );
        }
    }
}
