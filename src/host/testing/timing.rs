//! Where a scenario's time goes: wall time split into set-up, boots (firmware, kernel, initrd,
//! userspace, as the host sees them on the console), restores of saved states, image builds in
//! steps, the steps themselves and teardown; and the suite's summary.

use serde::Serialize;
use std::time::{Duration, Instant};

/// Console lines that mark the phases of a boot, in the order they appear.
const KERNEL_STARTS: &str = "Linux version ";
const INIT_STARTS: &str = "Run /init as init process";
/// systemd prints this once in the initrd and once more from the real root.
const SYSTEMD_STARTS: &str = "running in system mode";

/// Follows one boot on its console (from `from`, the console's length when the boot began) and
/// notes when each phase began, to the poll's resolution.
#[derive(Debug, Clone)]
pub struct BootWatch {
    started: Instant,
    from: usize,
    kernel: Option<Instant>,
    init: Option<Instant>,
    root: Option<Instant>,
}

/// One boot's phases in seconds; `None` where the console did not show the phase's start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BootTimes {
    pub wall: f64,
    pub firmware: Option<f64>,
    pub kernel: Option<f64>,
    pub initrd: Option<f64>,
    pub userspace: Option<f64>,
}

impl BootWatch {
    pub fn new(started: Instant, from: usize) -> Self {
        BootWatch {
            started,
            from,
            kernel: None,
            init: None,
            root: None,
        }
    }

    /// Looks at the console text (the whole log; only what follows `from` counts) at `now`.
    pub fn observe(&mut self, console: &str, now: Instant) {
        let text = console.get(self.from..).unwrap_or("");
        if self.kernel.is_none() && text.contains(KERNEL_STARTS) {
            self.kernel = Some(now);
        }
        if self.init.is_none() && text.contains(INIT_STARTS) {
            self.init = Some(now);
        }
        if self.root.is_none() && text.matches(SYSTEMD_STARTS).count() >= 2 {
            self.root = Some(now);
        }
    }

    /// The boot's phases, the last ending at `ready` (the guest agent answered).
    pub fn finish(&self, ready: Instant) -> BootTimes {
        let span = |a: Option<Instant>, b: Option<Instant>| {
            a.zip(b)
                .map(|(a, b)| b.saturating_duration_since(a).as_secs_f64())
        };
        BootTimes {
            wall: ready.saturating_duration_since(self.started).as_secs_f64(),
            firmware: span(Some(self.started), self.kernel),
            kernel: span(self.kernel, self.init),
            initrd: span(self.init, self.root),
            userspace: span(self.root, Some(ready)),
        }
    }
}

/// Accumulated seconds of one scenario, by kind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioTimes {
    pub scenario: String,
    /// The lane (0-based) the scenario ran in.
    pub lane: usize,
    pub wall_s: f64,
    /// Disks, firmware variables, switch, the file's `setup` command.
    pub setup_s: f64,
    pub boots: u32,
    /// Host time spent waiting for boots (nodes that boot together count once).
    pub boot_s: f64,
    /// VM time of the boots, each from QEMU's start (or the reboot request) to the guest agent's
    /// first answer, summed over nodes; split into the four phases below.
    pub boot_vm_s: f64,
    pub firmware_s: f64,
    pub kernel_s: f64,
    pub initrd_s: f64,
    pub userspace_s: f64,
    /// Boot time the console did not let the watch split.
    pub boot_unsplit_s: f64,
    pub restores: u32,
    /// Starting from a saved state: QEMU start, loading the state, the agent's answer.
    pub restore_s: f64,
    /// Saving this scenario's node for others.
    pub save_s: f64,
    /// Image builds in steps (`install-update`).
    pub build_s: f64,
    /// Everything else the steps did.
    pub steps_s: f64,
    /// Journals, power-off, removing disks.
    pub teardown_s: f64,
}

impl ScenarioTimes {
    pub fn add_boot(&mut self, b: &BootTimes) {
        self.boots += 1;
        self.boot_vm_s += b.wall;
        let parts = [b.firmware, b.kernel, b.initrd, b.userspace];
        let split: f64 = parts.iter().flatten().sum();
        self.firmware_s += b.firmware.unwrap_or(0.0);
        self.kernel_s += b.kernel.unwrap_or(0.0);
        self.initrd_s += b.initrd.unwrap_or(0.0);
        self.userspace_s += b.userspace.unwrap_or(0.0);
        self.boot_unsplit_s += (b.wall - split).max(0.0);
    }
}

fn mmss(s: f64) -> String {
    let s = s.round() as u64;
    format!("{}m{:02}s", s / 60, s % 60)
}

/// The suite's time table: one row per scenario (in report order) and where the total went.
pub fn table(times: &[ScenarioTimes]) -> String {
    let mut out = String::from(
        "scenario                  lane    wall  setup  boots(n)  firmware kernel initrd user  restore  save  build  steps  teardown\n\
         (boots: host seconds waiting; firmware..user: VM seconds, summed over nodes)\n",
    );
    let mut total = ScenarioTimes::default();
    for t in times {
        out.push_str(&format!(
            "{:<25} {:>4} {:>7} {:>6} {:>6.0}({}) {:>8.0} {:>6.0} {:>6.0} {:>5.0} {:>7.0} {:>5.0} {:>6.0} {:>6.0} {:>9.0}\n",
            t.scenario,
            t.lane + 1,
            mmss(t.wall_s),
            t.setup_s.round(),
            t.boot_s,
            t.boots,
            t.firmware_s,
            t.kernel_s,
            t.initrd_s,
            t.userspace_s,
            t.restore_s,
            t.save_s,
            t.build_s,
            t.steps_s,
            t.teardown_s,
        ));
        total.wall_s += t.wall_s;
        total.setup_s += t.setup_s;
        total.boots += t.boots;
        total.boot_s += t.boot_s;
        total.boot_vm_s += t.boot_vm_s;
        total.firmware_s += t.firmware_s;
        total.kernel_s += t.kernel_s;
        total.initrd_s += t.initrd_s;
        total.userspace_s += t.userspace_s;
        total.boot_unsplit_s += t.boot_unsplit_s;
        total.restores += t.restores;
        total.restore_s += t.restore_s;
        total.save_s += t.save_s;
        total.build_s += t.build_s;
        total.steps_s += t.steps_s;
        total.teardown_s += t.teardown_s;
    }
    let sum = total.wall_s.max(1.0);
    let pct = |v: f64| 100.0 * v / sum;
    let vm = total.boot_vm_s.max(1.0);
    let of_boots = |v: f64| 100.0 * v / vm;
    out.push_str(&format!(
        "scenario time {} in all: waiting for boots {:.0}% ({} boots; of their VM time firmware {:.0}%, kernel {:.0}%, initrd {:.0}%, userspace {:.0}%), \
         restores {:.0}% ({}), saves {:.0}%, builds {:.0}%, steps {:.0}%, set-up {:.0}%, teardown {:.0}%\n",
        mmss(total.wall_s),
        pct(total.boot_s),
        total.boots,
        of_boots(total.firmware_s),
        of_boots(total.kernel_s),
        of_boots(total.initrd_s),
        of_boots(total.userspace_s),
        pct(total.restore_s),
        total.restores,
        pct(total.save_s),
        pct(total.build_s),
        pct(total.steps_s),
        pct(total.setup_s),
        pct(total.teardown_s),
    ));
    out
}

/// The budget line and the slowest scenarios: the suite's wall time against `budget`.
pub fn budget_line(wall: Duration, budget: Duration, times: &[ScenarioTimes]) -> String {
    let mut slow: Vec<&ScenarioTimes> = times.iter().collect();
    slow.sort_by(|a, b| b.wall_s.total_cmp(&a.wall_s));
    let names: Vec<String> = slow
        .iter()
        .take(3)
        .map(|t| format!("{} {}", t.scenario, mmss(t.wall_s)))
        .collect();
    let verdict = if wall <= budget { "within" } else { "OVER" };
    format!(
        "QEMU suite: {} of a {} budget ({verdict}); slowest: {}",
        mmss(wall.as_secs_f64()),
        mmss(budget.as_secs_f64()),
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_is_split_at_the_console_marks() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let earlier = "old boot: Linux version 6.12 ... Run /init as init process ... running in system mode\n";
        let mut w = BootWatch::new(t0, earlier.len());
        let mut console = earlier.to_string();
        w.observe(&console, at(1));
        console.push_str("BdsDxe: loading\n");
        w.observe(&console, at(5));
        console.push_str("[    0.000000] Linux version 6.12.1\n");
        w.observe(&console, at(9));
        console.push_str(
            "[    5.1] Run /init as init process\n[ 5.3] systemd 257 running in system mode\n",
        );
        w.observe(&console, at(14));
        console.push_str("[   30.0] systemd 257 running in system mode\n");
        w.observe(&console, at(40));
        let b = w.finish(at(70));
        assert_eq!(
            b,
            BootTimes {
                wall: 70.0,
                firmware: Some(9.0),
                kernel: Some(5.0),
                initrd: Some(26.0),
                userspace: Some(30.0),
            }
        );
        let mut times = ScenarioTimes::default();
        times.add_boot(&b);
        assert_eq!((times.boot_vm_s, times.boot_unsplit_s), (70.0, 0.0));
        // A console that shows nothing: the whole boot is unsplit.
        let quiet = BootWatch::new(t0, 0).finish(at(60));
        times.add_boot(&quiet);
        assert_eq!((times.boots, times.boot_unsplit_s), (2, 60.0));
    }

    #[test]
    fn the_budget_names_the_slowest() {
        let t = |n: &str, w: f64| ScenarioTimes {
            scenario: n.into(),
            wall_s: w,
            ..Default::default()
        };
        let times = [t("a", 60.0), t("b", 300.0), t("c", 120.0), t("d", 10.0)];
        let line = budget_line(
            Duration::from_secs(400),
            Duration::from_secs(45 * 60),
            &times,
        );
        assert_eq!(
            line,
            "QEMU suite: 6m40s of a 45m00s budget (within); slowest: b 5m00s, c 2m00s, a 1m00s"
        );
        let over = budget_line(
            Duration::from_secs(46 * 60),
            Duration::from_secs(45 * 60),
            &times,
        );
        assert!(over.contains("(OVER)"), "{over}");
        assert!(table(&times).contains("scenario time 8m10s in all"));
    }
}
