//! Is this version healthy enough to keep? Asked on trial boots only (the boot loader counted
//! the boot), before `boot-complete.target`: the verdict is a pure function of what was observed,
//! so every rule is a row of a table test; `Probe` observes the machine.
//!
//! Healthy: every unit the image names is running (or was skipped by its own condition, e.g.
//! keel-net on a node without overlay settings), etcd's local member answers a read through
//! quorum, and — on trusted images — `keel-agent boot-state` says the boot is one the operator
//! signed. A unit still starting means "wait"; a failed one, or a wait past the deadline, means
//! unhealthy.

use std::time::{Duration, Instant};

/// A unit as systemd reports it (`systemctl show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitObs {
    pub name: String,
    pub active: String,
    pub sub: String,
    /// `yes`/`no`: whether its conditions held when it was last started.
    pub condition: String,
    /// How often systemd restarted it since the boot.
    pub restarts: u32,
    /// `LoadState=loaded` (a unit file exists and parsed).
    pub loaded: bool,
    /// Its conditions were evaluated this boot (a skipped unit; not one never started).
    pub condition_checked: bool,
}

/// A unit restarted this often during a trial is failing, not starting.
pub const RESTARTS_FAILING: u32 = 5;

/// What was observed at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub units: Vec<UnitObs>,
    /// etcd's answer to a read through quorum: Ok, or why not. None: the node runs no etcd.
    pub etcd: Option<Result<(), String>>,
    /// The boot-state verdict on a trusted image; None on an image without trusted boot.
    pub trusted: Option<Result<(), String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Not yet: what is still coming up.
    Wait(String),
    Unhealthy(String),
}

pub fn judge(o: &Observed) -> Verdict {
    let mut waiting = Vec::new();
    for u in &o.units {
        if !u.loaded {
            return Verdict::Unhealthy(format!(
                "{} is not loaded (no such unit, or it does not parse)",
                u.name
            ));
        }
        if u.restarts >= RESTARTS_FAILING {
            return Verdict::Unhealthy(format!(
                "{} keeps failing (restarted {} times)",
                u.name, u.restarts
            ));
        }
        match (u.active.as_str(), u.sub.as_str()) {
            ("active", _) => {}
            ("failed", _) => return Verdict::Unhealthy(format!("{} failed ({})", u.name, u.sub)),
            ("inactive", _) if u.condition == "no" && u.condition_checked => {}
            ("inactive", "dead") if u.condition == "yes" => {
                return Verdict::Unhealthy(format!(
                    "{} is not running (it ran and stopped)",
                    u.name
                ))
            }
            // auto-restart (crash loop), activating, reloading, inactive before its start.
            (a, s) => waiting.push(format!("{} is {a} ({s})", u.name)),
        }
    }
    if let Some(Err(e)) = &o.etcd {
        waiting.push(format!("etcd's member does not answer a quorum read: {e}"));
    }
    if let Some(Err(e)) = &o.trusted {
        // The verdict does not change by waiting: the PCRs are what they are.
        return Verdict::Unhealthy(format!("the boot is not one the operator signed: {e}"));
    }
    if waiting.is_empty() {
        Verdict::Healthy
    } else {
        Verdict::Wait(waiting.join("; "))
    }
}

/// Observes the machine.
pub trait Probe {
    fn observe(&mut self) -> Observed;
}

/// Observes until healthy, unhealthy, or `deadline` passes with something still waiting (then
/// unhealthy, naming what was still waited for). `pause` sleeps between observations.
pub fn wait(
    probe: &mut dyn Probe,
    deadline: Duration,
    mut pause: impl FnMut(),
    now: impl Fn() -> Instant,
) -> Verdict {
    let start = now();
    loop {
        match judge(&probe.observe()) {
            Verdict::Wait(why) => {
                if now().duration_since(start) >= deadline {
                    return Verdict::Unhealthy(format!(
                        "not healthy within {} s: {why}",
                        deadline.as_secs()
                    ));
                }
                tracing::info!("waiting: {why}");
                pause();
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, active: &str, sub: &str, condition: &str) -> UnitObs {
        UnitObs {
            name: name.into(),
            active: active.into(),
            sub: sub.into(),
            condition: condition.into(),
            restarts: 0,
            loaded: true,
            condition_checked: true,
        }
    }

    #[test]
    fn verdicts() {
        let ok_units = vec![
            unit("etcd.service", "active", "running", "yes"),
            unit("keel-net.service", "inactive", "dead", "no"),
        ];
        let rows: Vec<(Observed, &str)> = vec![
            (
                Observed {
                    units: ok_units.clone(),
                    etcd: Some(Ok(())),
                    trusted: Some(Ok(())),
                },
                "healthy",
            ),
            (
                Observed {
                    units: ok_units.clone(),
                    etcd: None,
                    trusted: None,
                },
                "healthy",
            ),
            (
                Observed {
                    units: vec![unit("etcd.service", "failed", "failed", "yes")],
                    etcd: None,
                    trusted: None,
                },
                "unhealthy: etcd.service failed",
            ),
            (
                Observed {
                    units: vec![unit("etcd.service", "activating", "auto-restart", "yes")],
                    etcd: None,
                    trusted: None,
                },
                "wait: etcd.service is activating (auto-restart)",
            ),
            (
                Observed {
                    units: vec![unit("etcd.service", "inactive", "dead", "yes")],
                    etcd: None,
                    trusted: None,
                },
                "unhealthy: etcd.service is not running",
            ),
            (
                Observed {
                    units: ok_units.clone(),
                    etcd: Some(Err("no leader".into())),
                    trusted: None,
                },
                "wait: etcd's member does not answer a quorum read: no leader",
            ),
            (
                Observed {
                    units: ok_units,
                    etcd: Some(Ok(())),
                    trusted: Some(Err("PCR 11 not signed".into())),
                },
                "unhealthy: the boot is not one the operator signed",
            ),
        ];
        for (n, (o, want)) in rows.iter().enumerate() {
            let got = match judge(o) {
                Verdict::Healthy => "healthy".to_string(),
                Verdict::Wait(w) => format!("wait: {w}"),
                Verdict::Unhealthy(w) => format!("unhealthy: {w}"),
            };
            assert!(got.starts_with(want), "row {n}: {got} / {want}");
        }
    }

    struct Seq(Vec<Observed>);
    impl Probe for Seq {
        fn observe(&mut self) -> Observed {
            if self.0.len() > 1 {
                self.0.remove(0)
            } else {
                self.0[0].clone()
            }
        }
    }

    #[test]
    fn waits_then_decides_or_times_out() {
        let starting = Observed {
            units: vec![unit("etcd.service", "activating", "start", "yes")],
            etcd: None,
            trusted: None,
        };
        let up = Observed {
            units: vec![unit("etcd.service", "active", "running", "yes")],
            etcd: None,
            trusted: None,
        };
        let t0 = Instant::now();
        let clock = std::cell::Cell::new(t0);
        let step = || clock.set(clock.get() + Duration::from_secs(10));
        let mut p = Seq(vec![starting.clone(), starting.clone(), up]);
        assert_eq!(
            wait(&mut p, Duration::from_secs(60), step, || clock.get()),
            Verdict::Healthy
        );
        clock.set(t0);
        let mut p = Seq(vec![starting]);
        let v = wait(
            &mut p,
            Duration::from_secs(30),
            || clock.set(clock.get() + Duration::from_secs(10)),
            || clock.get(),
        );
        assert!(
            matches!(&v, Verdict::Unhealthy(w) if w.contains("within 30 s") && w.contains("etcd.service")),
            "{v:?}"
        );
    }
}
