//! `keel-update`'s commands. Each prints what it did or why it did nothing; `--json` gives the
//! same to programs.

use super::check;
use super::health::{self, Verdict};
use super::loader::{BootInfo, Entries};
use super::node::Node;
use super::probe::Machine;
use super::state::{phase_name, step, Action, Event, LastCheck, Phase, Record};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "keel-update",
    about = "Keel's updater: signed A/B updates (docs/updates.md)"
)]
pub struct Cli {
    /// The node's root directory (for testing against a copy of a node's files).
    #[arg(long, global = true, default_value = "/")]
    pub root: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the update state: running version, what is in progress, failed versions, the last
    /// check, and why the node is not updating when it is not.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Read the repository (TUF) and say which release this node would install, or why none.
    /// Exits 0 when one is offered or the node is up to date, 1 when the repository is refused.
    Check {
        #[arg(long)]
        json: bool,
        /// Another repository address than the configured one (a mirror).
        #[arg(long)]
        repository: Option<String>,
        /// The clock is right and the newest time seen in signed metadata is wrong (the clock
        /// once ran ahead): forget that time. Only an operator who checked the clock says so;
        /// a synchronised clock alone is not trusted for it (an unauthenticated NTP answer
        /// could set it back to make expired metadata valid again).
        #[arg(long)]
        clock_is_right: bool,
    },
    /// Install the newest eligible release (or --version V) into the free slot and activate it:
    /// the next boot tries it. An installed release waiting for activation is activated.
    Apply {
        #[arg(long)]
        version: Option<String>,
        /// Another repository address than the configured one (a mirror).
        #[arg(long)]
        repository: Option<String>,
        /// Activate but do not reboot (the next boot tries the new version).
        #[arg(long)]
        no_reboot: bool,
        /// As the timer runs it: install when updates are enabled; activate and reboot only
        /// when the strategy is `reboot = "immediate"`.
        #[arg(long)]
        auto: bool,
    },
    /// Hold the node at its version (checks still report), or let it update again with --off.
    Hold {
        #[arg(long)]
        off: bool,
    },
    /// Go back to the other slot's version (it must still have a good boot entry): this
    /// version's entry is marked bad, recorded as rolled back (never offered again), and the
    /// node reboots.
    Rollback {
        /// Do not reboot (the next boot goes back).
        #[arg(long)]
        no_reboot: bool,
    },
    /// Run once per boot (keel-update-boot.service): what the boot loader did since the last
    /// run — a trial started, a trial that fell back (recorded as failed, its entry removed).
    Reconcile,
    /// On a trial boot, before boot-complete.target: wait until this version is healthy (then
    /// systemd-bless-boot keeps it), or reject it. Does nothing on a boot that was not counted.
    Health {
        /// Seconds to wait (default: the image's health-timeout-secs).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Reject this trial boot: mark its entry bad, record why, reboot (the loader then starts
    /// the previous version). Run by keel-update-health's OnFailure=.
    Reject {
        #[arg(long, default_value = "the health check did not pass")]
        reason: String,
    },
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let node = Node::new(&cli.root);
    // Every command that changes the record holds the lock for as long as it runs; `apply`
    // does not wait for another one (the timer's and an operator's must not both install),
    // `health` takes it only to record its verdict.
    let _lock = match &cli.command {
        Command::Status { .. } | Command::Health { .. } => None,
        Command::Apply { .. } => Some(node.lock(false)?),
        _ => Some(node.lock(true)?),
    };
    match cli.command {
        Command::Status { json } => status(&node, json),
        Command::Check {
            json,
            repository,
            clock_is_right,
        } => {
            if clock_is_right {
                crate::update::tuf::forget_latest_time(&node.tuf_store())?;
                println!("forgot the newest time seen in signed metadata; checking with the clock as it is");
            }
            run_check(&node, json, repository.as_deref())
        }
        Command::Apply {
            version,
            repository,
            no_reboot,
            auto,
        } => apply(
            &node,
            version.as_deref(),
            repository.as_deref(),
            no_reboot,
            auto,
        ),
        Command::Rollback { no_reboot } => rollback(&node, no_reboot),
        Command::Reconcile => reconcile(&node),
        Command::Health { timeout } => health(&node, timeout),
        Command::Reject { reason } => reject(&node, &reason),
        Command::Hold { off } => {
            let mut rec = node.record()?;
            rec.held = !off;
            node.save(&rec)?;
            println!(
                "{}",
                if off {
                    "the node updates again"
                } else {
                    "the node is held at its version (`keel-update hold --off` releases it)"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One usr slot as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotView {
    pub partition: u32,
    /// The slot's label: `IMAGE_VERSION`, or `_empty`.
    pub label: String,
    pub running: bool,
}

/// The usr slots of a disk's partitions; `running_data_uuid` marks the running one.
pub fn slots(parts: &[crate::disk::gpt::Partition], running_data_uuid: &str) -> Vec<SlotView> {
    parts
        .iter()
        .filter(|p| p.is(crate::disk::PartitionType::Usr))
        .map(|p| SlotView {
            partition: p.number,
            label: p.label.clone(),
            running: p.uuid.eq_ignore_ascii_case(running_data_uuid),
        })
        .collect()
}

fn slot_views(node: &Node) -> Result<Vec<SlotView>> {
    let hash = super::install::running_root_hash(node)?;
    let (data_uuid, _) = crate::disk::layout::verity_uuids(&hash)?;
    let (disk, _) = super::install::boot_disk(node)?;
    let (_, parts) = crate::disk::gpt::read(&disk)?;
    Ok(slots(&parts, &data_uuid))
}

fn status(node: &Node, json: bool) -> Result<ExitCode> {
    let rec = node.record()?;
    let running = node.running()?;
    let cfg = node.config()?;
    let clock = node.clock_synchronised();
    let blocked = why_not_updating(&rec, &cfg, clock);
    let slots = slot_views(node).map_err(|e| format!("{e:#}"));
    if json {
        let v = serde_json::json!({
            "running": running,
            "slots": slots.as_ref().ok(),
            "state": rec,
            "config": cfg,
            "clock-synchronised": clock,
            "not-updating-because": blocked,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("running {} {}", running.image, running.version);
    match &slots {
        Ok(slots) => {
            for s in slots {
                println!(
                    "slot (partition {}): {}{}",
                    s.partition,
                    s.label,
                    if s.running { " (running)" } else { "" }
                );
            }
        }
        Err(e) => println!("slots: unknown ({e})"),
    }
    println!("state: {}", phase_name(&rec.phase));
    if let Some(hw) = &rec.high_water {
        println!("newest blessed: {hw}");
    }
    for f in &rec.failed {
        println!("failed: {} at {}: {}", f.version, f.at, f.reason);
    }
    match &rec.last_check {
        Some(c) => println!("last check {}: {}", c.at, c.outcome),
        None => println!("never checked"),
    }
    if let Some(b) = blocked {
        println!("not updating: {b}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Why automatic updates do nothing right now, if they do nothing.
pub fn why_not_updating(
    rec: &super::state::Record,
    cfg: &super::config::Config,
    clock_synchronised: bool,
) -> Option<String> {
    if !cfg.enabled {
        return Some("updates are off (`enabled = false` in /etc/keel/update.toml)".into());
    }
    if cfg.repository.is_none() {
        return Some(
            "no repository is configured ([update] repository, or /etc/keel/update.toml)".into(),
        );
    }
    if rec.held {
        return Some("held by the operator (`keel-update hold --off` releases it)".into());
    }
    if let Some(c) = &rec.last_check {
        if c.outcome.starts_with("refused") {
            return Some(format!("the last check was refused: {}", c.outcome));
        }
    }
    if !clock_synchronised {
        return Some("the clock is not synchronised: update metadata expiry is judged by it, so checks may refuse fresh metadata or accept stale metadata until it is (is NTP reachable?)".into());
    }
    None
}

fn run_check(node: &Node, json: bool, repository: Option<&str>) -> Result<ExitCode> {
    let mut rec = node.record()?;
    let running = node.running()?;
    let address = check::address(node, repository)?;
    if !node.clock_synchronised() {
        tracing::warn!("the clock is not synchronised; metadata expiry is judged by it as it is");
    }
    let rt = crate::update::tuf::runtime()?;
    let found = rt.block_on(check::check(node, &address, &running, &rec, None));
    let (code, outcome, offered) = match &found {
        Ok(f) => match &f.choice {
            Ok(r) => (
                ExitCode::SUCCESS,
                format!("offered {}", r.version),
                Some(r.version.clone()),
            ),
            Err(e) => (ExitCode::SUCCESS, format!("nothing to install: {e}"), None),
        },
        Err(e) => (
            ExitCode::FAILURE,
            format!("refused: {}", crate::error::chain(e.as_ref())),
            None,
        ),
    };
    rec.last_check = Some(LastCheck {
        at: now(),
        outcome: outcome.clone(),
    });
    node.save(&rec)?;
    if json {
        let v = serde_json::json!({
            "repository": address.base.as_str(),
            "running": running.version,
            "offered": offered,
            "outcome": outcome,
            "published": found.as_ref().map(|f| f.index.releases.iter().map(|r| r.version.clone()).collect::<Vec<_>>()).unwrap_or_default(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if code == ExitCode::SUCCESS {
        println!("{outcome}");
    } else {
        eprintln!("error: {outcome}");
    }
    Ok(code)
}

/// The mounted ESP: `$SYSTEMD_ESP_PATH`, `/efi` or `/boot` (the first holding `EFI/Linux`).
fn esp(node: &Node) -> Result<std::path::PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("SYSTEMD_ESP_PATH") {
        candidates.push(node.path(&p));
    }
    candidates.extend([node.path("/efi"), node.path("/boot")]);
    candidates
        .into_iter()
        .find(|c| c.join("EFI/Linux").is_dir())
        .context("the ESP is not mounted (no EFI/Linux below /efi or /boot)")
}

fn efivars(node: &Node) -> std::path::PathBuf {
    node.path("/sys/firmware/efi/efivars")
}

/// Carries out the state machine's side effects.
fn carry_out(node: &Node, actions: &[Action]) -> Result<()> {
    for a in actions {
        tracing::info!("{a:?}");
        match a {
            Action::ActivateUki { version } => {
                let snap = node.state_dir().join("etcd-before-update.db");
                match super::probe::etcd_snapshot(&node.root, &snap) {
                    Ok(true) => println!("saved an etcd snapshot to {}", snap.display()),
                    Ok(false) => {}
                    // Not a reason to stay: the member may be down, which the update may fix.
                    Err(e) => tracing::warn!("no etcd snapshot before the update: {e:#}"),
                }
                let name = Entries::new(&esp(node)?).activate(version)?;
                println!("activated {name}: the next boot tries {version}");
            }
            // systemd-bless-boot.service does it once boot-complete.target is reached.
            Action::Bless => {}
            Action::MarkBad => {
                let out = std::process::Command::new("/usr/lib/systemd/systemd-bless-boot")
                    .arg("bad")
                    .status()
                    .context("running systemd-bless-boot bad")?;
                if !out.success() {
                    bail!("systemd-bless-boot bad failed ({out})");
                }
            }
            Action::MarkBadEntry { version } => Entries::new(&esp(node)?).mark_bad(version)?,
            Action::RemoveUki { version } => Entries::new(&esp(node)?).remove(version)?,
            Action::Reboot => {
                let out = std::process::Command::new("systemctl")
                    .args(["reboot", "--no-block"])
                    .status()
                    .context("asking systemd to reboot")?;
                if !out.success() {
                    bail!("systemctl reboot failed ({out})");
                }
            }
        }
    }
    Ok(())
}

/// Applies an event: the next record is saved before its side effects run, so an interrupted
/// run is finished by the next reconcile rather than repeated.
fn apply_event(node: &Node, ev: &Event) -> Result<Record> {
    let rec = node.record()?;
    let (next, actions) = step(&rec, ev, &now())?;
    node.save(&next)?;
    carry_out(node, &actions)?;
    Ok(next)
}

/// The boot as the state machine sees it: also the floor, and whether an activated release's
/// entry is still untried.
fn booted_event(node: &Node, running: &str, counted: bool) -> Result<Event> {
    let rec = node.record()?;
    let target_untried = match &rec.phase {
        Phase::Activated { version } => Entries::new(&esp(node)?).untried(version)?,
        _ => false,
    };
    Ok(Event::Booted {
        running: running.to_string(),
        counted,
        floor: node.config()?.min_version,
        target_untried,
    })
}

fn reconcile(node: &Node) -> Result<ExitCode> {
    let running = node.running()?;
    let boot = BootInfo::read(&efivars(node));
    let next = apply_event(node, &booted_event(node, &running.version, boot.counted())?)?;
    for f in next.failed.iter().filter(|f| f.version != running.version) {
        tracing::info!("{} stays failed: {}", f.version, f.reason);
    }
    println!(
        "running {} ({}): {}",
        running.version,
        if boot.counted() {
            "trial boot"
        } else {
            "not a trial"
        },
        phase_name(&next.phase)
    );
    Ok(ExitCode::SUCCESS)
}

fn health(node: &Node, timeout: Option<u64>) -> Result<ExitCode> {
    let boot = BootInfo::read(&efivars(node));
    if !boot.counted() {
        println!("not a trial boot: nothing to decide");
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = node.config()?;
    let deadline = Duration::from_secs(timeout.unwrap_or(cfg.health_timeout_secs));
    let mut probe = Machine {
        root: node.root.clone(),
        units: cfg.health_units.clone(),
    };
    let verdict = health::wait(
        &mut probe,
        deadline,
        || std::thread::sleep(Duration::from_secs(5)),
        Instant::now,
    );
    let _lock = node.lock(true)?;
    match verdict {
        Verdict::Healthy => {
            apply_event(node, &Event::Healthy)?;
            println!("healthy: systemd-bless-boot keeps this version");
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Unhealthy(why) | Verdict::Wait(why) => {
            eprintln!("unhealthy: {why}");
            reject(node, &why)?;
            Ok(ExitCode::FAILURE)
        }
    }
}

fn reject(node: &Node, reason: &str) -> Result<ExitCode> {
    let rec = node.record()?;
    if !matches!(rec.phase, Phase::Trial { .. }) {
        let boot = BootInfo::read(&efivars(node));
        if !boot.counted() {
            println!("not a trial boot: nothing to reject");
            return Ok(ExitCode::SUCCESS);
        }
    }
    let running = node.running()?;
    if !matches!(rec.phase, Phase::Trial { .. }) {
        apply_event(node, &booted_event(node, &running.version, true)?)?;
    }
    eprintln!(
        "rejecting {}: {reason}; rebooting into the previous version",
        running.version
    );
    apply_event(
        node,
        &Event::Unhealthy {
            reason: reason.to_string(),
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

fn rollback(node: &Node, no_reboot: bool) -> Result<ExitCode> {
    let running = node.running()?;
    let entries = Entries::new(&esp(node)?);
    let to = entries.other_good(&running.version)?.with_context(|| {
        format!(
            "no other good boot entry than {}: nothing to roll back to",
            running.version
        )
    })?;
    let cfg = node.config()?;
    if let Some(floor) = &cfg.min_version {
        if crate::update::version::compare(&to, floor) == std::cmp::Ordering::Less {
            bail!("{to} is older than the image's floor {floor}: refused");
        }
    }
    let rec = node.record()?;
    if rec.failed.iter().any(|f| f.version == to) {
        bail!("{to} failed on this node before: refused");
    }
    let (next, mut actions) = step(
        &rec,
        &Event::Rollback {
            running: running.version.clone(),
            to: to.clone(),
        },
        &now(),
    )?;
    if no_reboot {
        actions.retain(|a| *a != Action::Reboot);
    }
    node.save(&next)?;
    carry_out(node, &actions)?;
    println!(
        "rolled back from {} to {to}{}",
        running.version,
        if no_reboot {
            " at the next boot"
        } else {
            ": rebooting"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Activation: the UKI is renamed first and the record saved after, so a failure or a power
/// cut in between leaves either an installed release (nothing renamed) or a counted entry the
/// next boot tries, never a record that claims an activation that did not happen.
fn activate(node: &Node, no_reboot: bool) -> Result<()> {
    let rec = node.record()?;
    let (next, actions) = step(&rec, &Event::Activate, &now())?;
    let (now_, later): (Vec<Action>, Vec<Action>) =
        actions.into_iter().partition(|a| *a != Action::Reboot);
    carry_out(node, &now_)?;
    node.save(&next)?;
    if !no_reboot {
        carry_out(node, &later)?;
    }
    Ok(())
}

fn apply(
    node: &Node,
    version: Option<&str>,
    repository: Option<&str>,
    no_reboot: bool,
    auto: bool,
) -> Result<ExitCode> {
    let cfg = node.config()?;
    if auto && !cfg.enabled {
        println!("updates are off (enabled = false)");
        return Ok(ExitCode::SUCCESS);
    }
    if auto && repository.is_none() && cfg.repository.is_none() {
        println!("no update repository is configured: nothing to do");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rec = node.record()?;
    // Activation waits for the operator unless the strategy reboots by itself (and the node is
    // not held).
    let go = !auto || (cfg.reboot == super::config::Reboot::Immediate && !rec.held);
    let running = node.running()?;
    // After a rollback without its reboot (or a rejected trial) the running version is
    // recorded as failed and the other slot holds where the node goes next: writing that slot
    // now would take the way back away.
    if rec.is_failed(&running.version) {
        bail!(
            "{} is being left (rolled back from or failed here; `keel-update status`): reboot first, then update",
            running.version
        );
    }
    // The floor may have been raised since an install: such a release is not activated, and
    // the check below looks for a newer one to install over it.
    let below_floor = |v: &str| {
        cfg.min_version.as_deref().is_some_and(|floor| {
            crate::update::version::compare(v, floor) == std::cmp::Ordering::Less
        })
    };
    // An installed release whose staged UKI is gone (a power cut between activation's rename
    // and its record, then a failed try) is installed again below.
    let staged = |v: &str| {
        esp(node)
            .and_then(|e| Entries::new(&e).has_staged(v))
            .unwrap_or(false)
    };
    match &rec.phase {
        Phase::Installed { version: v }
            if version.is_none_or(|want| want == v) && !below_floor(v) && staged(v) =>
        {
            if go {
                activate(node, no_reboot)?;
            } else {
                println!("{v} is installed and waits for `keel-update apply` (reboot = \"off\")");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Phase::Steady | Phase::Installed { .. } => {}
        other => bail!("an update is in progress: {}", phase_name(other)),
    }
    let address = check::address(node, repository)?;
    let rt = crate::update::tuf::runtime()?;
    let found = match rt.block_on(check::check(node, &address, &running, &rec, version)) {
        Ok(f) => f,
        Err(e) => {
            rec.last_check = Some(LastCheck {
                at: now(),
                outcome: format!("refused: {}", crate::error::chain(e.as_ref())),
            });
            node.save(&rec)?;
            return Err(e);
        }
    };
    let release = match found.choice {
        Ok(r) => r,
        Err(why) => {
            rec.last_check = Some(LastCheck {
                at: now(),
                outcome: format!("nothing to install: {why}"),
            });
            node.save(&rec)?;
            if version.is_some() {
                bail!("{why}");
            }
            println!("{why}");
            return Ok(ExitCode::SUCCESS);
        }
    };
    rec.last_check = Some(LastCheck {
        at: now(),
        outcome: format!("offered {}", release.version),
    });
    node.save(&rec)?;
    println!(
        "installing {} {} from {}",
        running.image, release.version, address.base
    );
    let pause_at = std::env::var("KEEL_UPDATE_PAUSE_AT")
        .ok()
        .and_then(|v| v.parse().ok());
    let esp = esp(node)?;
    let plan = super::install::Plan {
        release: &release,
        image: &running.image,
        tries: cfg.tries,
        esp: &esp,
        pause_at,
    };
    let downloaded = rt
        .block_on(super::install::install(node, &found.repo, &plan))
        .with_context(|| format!("installing {}", release.version))?;
    apply_event(
        node,
        &Event::Installed {
            version: release.version.clone(),
        },
    )?;
    println!(
        "installed {} into the free slot ({downloaded} bytes of targets downloaded)",
        release.version
    );
    if go {
        activate(node, no_reboot)?;
    } else {
        println!(
            "{} waits for `keel-update apply` (reboot = \"off\")",
            release.version
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::gpt::Partition;

    fn part(number: u32, kind: crate::disk::PartitionType, uuid: &str, label: &str) -> Partition {
        Partition {
            number,
            type_: kind.name().into(),
            kind: Some(kind),
            uuid: uuid.into(),
            label: label.into(),
            offset: 0,
            size: 0,
            flags: 0,
        }
    }

    #[test]
    fn both_slots_are_shown_with_the_running_one_marked() {
        use crate::disk::PartitionType::{Esp, Usr, UsrVerity};
        let parts = [
            part(1, Esp, "e", "ESP"),
            part(2, Usr, "AAAA", "img_0.1.0"),
            part(3, UsrVerity, "aaab", "img_0.1.0"),
            part(4, Usr, "bbbb", "_empty"),
        ];
        let s = slots(&parts, "aaaa");
        assert_eq!(
            s,
            vec![
                SlotView {
                    partition: 2,
                    label: "img_0.1.0".into(),
                    running: true
                },
                SlotView {
                    partition: 4,
                    label: "_empty".into(),
                    running: false
                },
            ]
        );
    }
}
