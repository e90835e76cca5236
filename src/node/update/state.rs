//! keel-update's state machine: one record persisted on the node's root
//! (`/var/lib/keel/update/state.json`), one transition function from a record and an event to
//! the next record and the side effects to carry out. Nothing here touches the machine, so
//! every transition is a row of a table test.
//!
//! ```text
//! Steady ──install──► Installed{v} ──activate──► Activated{v} ──(reboot)──► Trial{v} ──healthy──► Steady (v blessed)
//!   ▲                    │ (a reboot here changes nothing)              │ unhealthy: mark bad, reboot
//!   │                    ▼                                              ▼
//!   └────── booted the older version: v recorded as failed, never offered again
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Phase {
    /// Running a version; nothing in progress.
    Steady,
    /// A release written to the other slot and read back through dm-verity; its UKI staged
    /// under a name the boot loader ignores, so a reboot changes nothing.
    Installed { version: String },
    /// Its UKI renamed to a counted boot entry: the next boot tries it.
    Activated { version: String },
    /// Booted into it, with the boot loader counting: the health check decides.
    Trial { version: String },
}

// Records are read back by other versions of keel-update (after a fall back to an older
// release, by the older one): fields they do not know are ignored, not refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Failure {
    pub version: String,
    pub reason: String,
    /// RFC 3339.
    pub at: String,
}

/// Everything keel-update remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Record {
    pub schema: u32,
    pub phase: Phase,
    /// The newest version this node ever blessed.
    pub high_water: Option<String>,
    /// Versions that failed here or were rolled back from: never offered again.
    pub failed: Vec<Failure>,
    /// Held by the operator: checks report, nothing installs.
    pub held: bool,
    /// The last check: when and what it found.
    pub last_check: Option<LastCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LastCheck {
    pub at: String,
    pub outcome: String,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            schema: 1,
            phase: Phase::Steady,
            high_water: None,
            failed: Vec::new(),
            held: false,
            last_check: None,
        }
    }
}

impl Record {
    pub fn failed_versions(&self) -> Vec<String> {
        self.failed.iter().map(|f| f.version.clone()).collect()
    }

    /// Whether `version` (or an alias of it in dpkg's order) failed here.
    pub fn is_failed(&self, version: &str) -> bool {
        self.failed
            .iter()
            .any(|f| crate::update::version::same(&f.version, version))
    }

    fn fail(&mut self, version: &str, reason: String, at: &str) {
        if !self.is_failed(version) {
            self.failed.push(Failure {
                version: version.to_string(),
                reason,
                at: at.to_string(),
            });
        }
    }

    fn bless(&mut self, version: &str) {
        if self
            .high_water
            .as_deref()
            .is_none_or(|hw| crate::update::version::newer(version, hw))
        {
            self.high_water = Some(version.to_string());
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The first run in a boot: the running version, whether the boot loader counted this
    /// boot (a trial: its entry still has a counter), the image's floor (`min-version`), and
    /// whether the activated version's entry is still untried (someone chose another entry
    /// at the boot menu: that is no failure of it).
    Booted {
        running: String,
        counted: bool,
        floor: Option<String>,
        target_untried: bool,
    },
    /// A release was written and read back, its UKI staged.
    Installed { version: String },
    /// The operator's or the strategy's go: make the staged UKI bootable and reboot.
    Activate,
    /// The health check passed on this boot.
    Healthy,
    /// The health check failed (or timed out) on this boot.
    Unhealthy { reason: String },
    /// The operator returns from `running` to the other slot's older version `to`.
    Rollback { running: String, to: String },
}

/// Side effects, carried out in order by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make the staged UKI of `version` a counted boot entry.
    ActivateUki {
        version: String,
    },
    /// Remove the counter from the running entry (systemd-bless-boot good).
    Bless,
    /// Mark the running entry bad (systemd-bless-boot bad): the loader never picks it again
    /// while an older entry is good.
    MarkBad,
    /// Mark a blessed entry bad by name (an operator's rollback).
    MarkBadEntry {
        version: String,
    },
    /// Remove `version`'s boot entry (it failed and stays failed).
    RemoveUki {
        version: String,
    },
    Reboot,
}

/// Why an event does not apply in the current phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Phase(String),
}

/// The phase as `status` prints it.
pub fn phase_name(p: &Phase) -> String {
    match p {
        Phase::Steady => "steady".into(),
        Phase::Installed { version } => format!("installed {version} (not yet activated)"),
        Phase::Activated { version } => format!("activated {version} (waiting for the reboot)"),
        Phase::Trial { version } => format!("trying {version}"),
    }
}

/// The transition function. `now` is the time recorded with failures (RFC 3339).
pub fn step(rec: &Record, ev: &Event, now: &str) -> Result<(Record, Vec<Action>), Refused> {
    let mut r = rec.clone();
    let mut actions = Vec::new();
    let refuse = |what: &str| {
        Err(Refused::Phase(format!(
            "{what}: the node is {}",
            phase_name(&rec.phase)
        )))
    };
    match (&rec.phase, ev) {
        (
            phase,
            Event::Booted {
                running,
                counted,
                floor,
                target_untried,
            },
        ) => {
            // A counted boot of a version that failed here, or of one below the floor (an
            // entry chosen by hand at the menu, or planted on the ESP): never kept, never
            // blessed. Its entry is marked bad and the node reboots into a good one.
            let below_floor = floor.as_deref().is_some_and(|f| {
                crate::update::version::compare(running, f) == std::cmp::Ordering::Less
            });
            if *counted && (r.is_failed(running) || below_floor) {
                let why = if below_floor {
                    format!(
                        "{running} is older than the floor {}",
                        floor.as_deref().unwrap_or_default()
                    )
                } else {
                    format!("{running} was booted again after it failed here")
                };
                r.fail(running, why, now);
                actions.push(Action::MarkBad);
                actions.push(Action::Reboot);
                if matches!(phase, Phase::Trial { version } if version == running) {
                    r.phase = Phase::Steady;
                }
                return Ok((r, actions));
            }
            let target = match phase {
                Phase::Activated { version } | Phase::Trial { version } => Some(version),
                _ => None,
            };
            r.phase = match (target, *counted) {
                (Some(v), true) if v == running => Phase::Trial { version: v.clone() },
                (Some(v), false) if v == running => {
                    // Blessed outside keel-update (by hand): take it as blessed.
                    r.bless(v);
                    Phase::Steady
                }
                // Another entry was chosen at the menu before the new one was ever tried: it
                // stays activated, and the next boot tries it.
                (Some(_), _) if *target_untried && matches!(phase, Phase::Activated { .. }) => {
                    phase.clone()
                }
                (Some(v), _) => {
                    let why = match phase {
                        Phase::Activated { .. } => format!(
                            "{v} did not come up (the boot loader fell back to {running}: it stopped before userspace, or was never tried)"
                        ),
                        _ => format!(
                            "{v} failed its trial boot (the node came back on {running})"
                        ),
                    };
                    r.fail(v, why, now);
                    actions.push(Action::RemoveUki { version: v.clone() });
                    Phase::Steady
                }
                (None, true) => Phase::Trial {
                    version: running.clone(),
                },
                (None, false) => match phase {
                    Phase::Installed { version } if version != running => phase.clone(),
                    _ => Phase::Steady,
                },
            };
        }
        // Installing another release over one that waits for activation replaces it (the
        // slot was written again, the earlier staged UKI removed).
        (Phase::Steady | Phase::Installed { .. }, Event::Installed { version }) => {
            r.phase = Phase::Installed {
                version: version.clone(),
            };
        }
        (_, Event::Installed { .. }) => return refuse("cannot install another release"),
        (Phase::Installed { version }, Event::Activate) => {
            actions.push(Action::ActivateUki {
                version: version.clone(),
            });
            actions.push(Action::Reboot);
            r.phase = Phase::Activated {
                version: version.clone(),
            };
        }
        (_, Event::Activate) => return refuse("nothing to activate"),
        (Phase::Trial { version }, Event::Healthy) => {
            r.bless(version);
            actions.push(Action::Bless);
            r.phase = Phase::Steady;
        }
        (_, Event::Healthy) => {}
        (Phase::Trial { version }, Event::Unhealthy { reason }) => {
            r.fail(version, reason.clone(), now);
            actions.push(Action::MarkBad);
            actions.push(Action::Reboot);
        }
        // Outside a trial a failed check only reports: a blessed version never reboots itself.
        (_, Event::Unhealthy { .. }) => {}
        (Phase::Steady, Event::Rollback { running, to }) => {
            r.fail(running, format!("rolled back by the operator to {to}"), now);
            actions.push(Action::MarkBadEntry {
                version: running.clone(),
            });
            actions.push(Action::Reboot);
        }
        (_, Event::Rollback { .. }) => return refuse("finish or abandon the update first"),
    }
    Ok((r, actions))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-12-07T00:00:00Z";

    fn rec(phase: Phase) -> Record {
        Record {
            phase,
            high_water: Some("1".into()),
            ..Record::default()
        }
    }
    fn installed(v: &str) -> Phase {
        Phase::Installed { version: v.into() }
    }
    fn activated(v: &str) -> Phase {
        Phase::Activated { version: v.into() }
    }
    fn trial(v: &str) -> Phase {
        Phase::Trial { version: v.into() }
    }
    fn booted(running: &str, counted: bool) -> Event {
        Event::Booted {
            running: running.into(),
            counted,
            floor: None,
            target_untried: false,
        }
    }

    #[test]
    fn transitions() {
        use Action::*;
        let unhealthy = Event::Unhealthy {
            reason: "etcd.service failed".into(),
        };
        // (from, event) → (to, actions, newly failed version, high-water after)
        type Row = (
            Phase,
            Event,
            Phase,
            Vec<Action>,
            Option<&'static str>,
            &'static str,
        );
        let rows: Vec<Row> = vec![
            (
                Phase::Steady,
                booted("1", false),
                Phase::Steady,
                vec![],
                None,
                "1",
            ),
            (
                Phase::Steady,
                Event::Installed {
                    version: "2".into(),
                },
                installed("2"),
                vec![],
                None,
                "1",
            ),
            // A reboot (or power cut) before activation changes nothing.
            (
                installed("2"),
                booted("1", false),
                installed("2"),
                vec![],
                None,
                "1",
            ),
            (
                installed("2"),
                Event::Activate,
                activated("2"),
                vec![
                    ActivateUki {
                        version: "2".into(),
                    },
                    Reboot,
                ],
                None,
                "1",
            ),
            (
                activated("2"),
                booted("2", true),
                trial("2"),
                vec![],
                None,
                "1",
            ),
            (
                trial("2"),
                Event::Healthy,
                Phase::Steady,
                vec![Bless],
                None,
                "2",
            ),
            (
                trial("2"),
                unhealthy.clone(),
                trial("2"),
                vec![MarkBad, Reboot],
                Some("2"),
                "1",
            ),
            // After the unhealthy trial the loader falls back: failure already recorded.
            (
                trial("2"),
                booted("1", false),
                Phase::Steady,
                vec![RemoveUki {
                    version: "2".into(),
                }],
                Some("2"),
                "1",
            ),
            // A trial that stopped in the initrd: the loader counted down and fell back.
            (
                activated("2"),
                booted("1", false),
                Phase::Steady,
                vec![RemoveUki {
                    version: "2".into(),
                }],
                Some("2"),
                "1",
            ),
            // Another try of the same trial (a reboot during the health window).
            (trial("2"), booted("2", true), trial("2"), vec![], None, "1"),
            // Blessed by hand before keel-update ran.
            (
                trial("2"),
                booted("2", false),
                Phase::Steady,
                vec![],
                None,
                "2",
            ),
            // A counted boot keel-update did not install (written by other means): a trial.
            (
                Phase::Steady,
                booted("3", true),
                trial("3"),
                vec![],
                None,
                "1",
            ),
            // Someone chose the running version at the menu before the activated one was ever
            // tried: no failure, still activated.
            (
                activated("2"),
                Event::Booted {
                    running: "1".into(),
                    counted: false,
                    floor: None,
                    target_untried: true,
                },
                activated("2"),
                vec![],
                None,
                "1",
            ),
            // A counted boot of a version below the floor (an old signed UKI planted on the
            // ESP, or a bad entry chosen by hand): marked bad, recorded, rebooted; never a
            // trial, never blessed.
            (
                Phase::Steady,
                Event::Booted {
                    running: "0.5".into(),
                    counted: true,
                    floor: Some("0.9".into()),
                    target_untried: false,
                },
                Phase::Steady,
                vec![MarkBad, Reboot],
                Some("0.5"),
                "1",
            ),
            // Another release installed over one waiting for activation replaces it.
            (
                installed("2"),
                Event::Installed {
                    version: "3".into(),
                },
                installed("3"),
                vec![],
                None,
                "1",
            ),
            // Health failures outside a trial report only.
            (
                Phase::Steady,
                unhealthy.clone(),
                Phase::Steady,
                vec![],
                None,
                "1",
            ),
            (
                Phase::Steady,
                Event::Rollback {
                    running: "1".into(),
                    to: "0.9".into(),
                },
                Phase::Steady,
                vec![
                    MarkBadEntry {
                        version: "1".into(),
                    },
                    Reboot,
                ],
                Some("1"),
                "1",
            ),
        ];
        for (n, (from, ev, to, actions, failed, hw)) in rows.into_iter().enumerate() {
            let (r, a) =
                step(&rec(from.clone()), &ev, NOW).unwrap_or_else(|e| panic!("row {n}: {e}"));
            assert_eq!(r.phase, to, "row {n}: {from:?} + {ev:?}");
            assert_eq!(a, actions, "row {n}");
            assert_eq!(
                r.failed.first().map(|f| f.version.as_str()),
                failed,
                "row {n}"
            );
            assert_eq!(r.high_water.as_deref(), Some(hw), "row {n}");
        }
    }

    #[test]
    fn refusals_name_the_phase() {
        let e = step(
            &rec(activated("2")),
            &Event::Installed {
                version: "3".into(),
            },
            NOW,
        )
        .expect_err("busy");
        assert!(e.to_string().contains("activated 2"), "{e}");
        assert!(step(&rec(Phase::Steady), &Event::Activate, NOW).is_err());
        assert!(step(
            &rec(trial("2")),
            &Event::Rollback {
                running: "2".into(),
                to: "1".into()
            },
            NOW
        )
        .is_err());
    }

    #[test]
    fn a_failure_is_recorded_once_and_the_record_round_trips() {
        let (r, _) = step(
            &rec(trial("2")),
            &Event::Unhealthy { reason: "x".into() },
            NOW,
        )
        .expect("step");
        let (r, _) = step(&r, &booted("1", false), NOW).expect("step");
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].reason, "x");
        let json = serde_json::to_string(&r).expect("json");
        let back: Record = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
        assert!(json.contains("\"phase\":{\"name\":\"steady\"}"), "{json}");
    }

    #[test]
    fn a_failed_version_booted_again_is_never_blessed() {
        let (r, _) = step(
            &rec(trial("2")),
            &Event::Unhealthy { reason: "x".into() },
            NOW,
        )
        .expect("step");
        let (r, _) = step(&r, &booted("1", false), NOW).expect("step");
        // Its bad entry chosen by hand at the menu (counted, `+0-1`), or written back.
        let (r, a) = step(&r, &booted("2", true), NOW).expect("step");
        assert_eq!(a, vec![Action::MarkBad, Action::Reboot]);
        assert_eq!(r.phase, Phase::Steady);
        let (r, a) = step(&r, &Event::Healthy, NOW).expect("step");
        assert!(a.is_empty());
        assert_eq!(r.high_water.as_deref(), Some("1"));
        // An alias of the failed version is the same version.
        let (_, a) = step(&r, &booted("02", true), NOW).expect("step");
        assert_eq!(a, vec![Action::MarkBad, Action::Reboot]);
    }

    #[test]
    fn high_water_only_rises() {
        let mut r = rec(trial("0.5"));
        r.high_water = Some("2".into());
        let (r, _) = step(&r, &Event::Healthy, NOW).expect("step");
        assert_eq!(r.high_water.as_deref(), Some("2"));
    }
}
