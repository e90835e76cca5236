//! The systemd seam: keel-agent starts, lists and stops containers as transient units through
//! systemd's D-Bus API (zbus), so systemd supervises them, puts them in their own cgroup with
//! limits, and sends their output to the journal.

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use zbus::blocking::{Connection, Proxy};
use zbus::zvariant::{OwnedObjectPath, Value};

/// How long a container gets to exit after SIGTERM before systemd kills it.
const STOP_TIMEOUT_USEC: u64 = 10_000_000;

/// Prefix of the units keel-agent creates.
pub const UNIT_PREFIX: &str = "keel-ctr-";

pub fn unit_name(container: &str) -> String {
    format!("{UNIT_PREFIX}{container}.service")
}

/// How a container unit is started.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    pub name: String,
    pub description: String,
    /// The program and its argv (argv\[0\] included).
    pub exec: (String, Vec<String>),
    /// Run after the main process exits, in order, failures ignored.
    pub exec_stop_post: Vec<(String, Vec<String>)>,
    pub memory_max: u64,
    pub tasks_max: u64,
}

/// A unit as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnitState {
    pub name: String,
    pub active: String,
    pub sub: String,
    pub description: String,
}

/// What keel-agent needs from systemd.
pub trait Units {
    fn start(&self, spec: &UnitSpec) -> Result<()>;
    fn stop(&self, unit: &str) -> Result<()>;
    fn list(&self) -> Result<Vec<UnitState>>;
    fn state(&self, unit: &str) -> Result<Option<UnitState>>;
}

/// systemd over the system bus.
pub struct Systemd {
    conn: Connection,
}

type UnitRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

impl Systemd {
    pub fn connect() -> Result<Systemd> {
        Ok(Systemd {
            conn: Connection::system()
                .context("connecting to the system D-Bus (is dbus running?)")?,
        })
    }

    fn manager(&self) -> Result<Proxy<'_>> {
        Proxy::new(
            &self.conn,
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
        )
        .context("systemd manager proxy")
    }
}

impl Units for Systemd {
    fn start(&self, spec: &UnitSpec) -> Result<()> {
        let exec = |cmds: &[(String, Vec<String>)], ignore: bool| {
            Value::from(
                cmds.iter()
                    .map(|(path, argv)| (path.clone(), argv.clone(), ignore))
                    .collect::<Vec<_>>(),
            )
        };
        let mut props: Vec<(&str, Value)> = vec![
            ("Description", Value::from(spec.description.clone())),
            ("ExecStart", exec(std::slice::from_ref(&spec.exec), false)),
            ("Type", Value::from("exec")),
            ("KillMode", Value::from("mixed")),
            ("MemoryMax", Value::from(spec.memory_max)),
            ("TasksMax", Value::from(spec.tasks_max)),
            ("CollectMode", Value::from("inactive-or-failed")),
            ("TimeoutStopUSec", Value::from(STOP_TIMEOUT_USEC)),
            ("SyslogIdentifier", Value::from(spec.name.clone())),
        ];
        if !spec.exec_stop_post.is_empty() {
            props.push(("ExecStopPost", exec(&spec.exec_stop_post, true)));
        }
        let aux: Vec<(&str, Vec<(&str, Value)>)> = Vec::new();
        let unit = unit_name(&spec.name);
        let manager = self.manager()?;
        // Listen for the end of the start job before queueing it (Type=exec: the job is done
        // once the process runs, failed when it could not be started).
        let _: () = manager
            .call("Subscribe", &())
            .context("subscribing to systemd's job signals")?;
        let signals = manager
            .receive_signal("JobRemoved")
            .context("listening for systemd's JobRemoved")?;
        let job: OwnedObjectPath = manager
            .call("StartTransientUnit", &(unit.as_str(), "fail", props, aux))
            .with_context(|| format!("starting {unit} through systemd"))?;
        for msg in signals {
            let (_, path, _, result): (u32, OwnedObjectPath, String, String) = msg
                .body()
                .deserialize()
                .context("reading a JobRemoved signal")?;
            if path == job {
                if result == "done" {
                    return Ok(());
                }
                anyhow::bail!(
                    "{unit} did not start (job {result}); see `keel-agent logs {}`",
                    spec.name
                );
            }
        }
        anyhow::bail!("the system bus closed while {unit} was starting")
    }

    fn stop(&self, unit: &str) -> Result<()> {
        let _job: OwnedObjectPath = self
            .manager()?
            .call("StopUnit", &(unit, "replace"))
            .with_context(|| format!("stopping {unit}"))?;
        // Return once it is gone (SIGTERM, then SIGKILL after the stop timeout).
        let deadline =
            Instant::now() + Duration::from_micros(STOP_TIMEOUT_USEC) + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.state(unit)? {
                None => return Ok(()),
                Some(s) if s.active == "inactive" || s.active == "failed" => return Ok(()),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        anyhow::bail!("{unit} did not stop in time")
    }

    fn list(&self) -> Result<Vec<UnitState>> {
        let rows: Vec<UnitRow> = self
            .manager()?
            .call(
                "ListUnitsByPatterns",
                &(Vec::<&str>::new(), vec![format!("{UNIT_PREFIX}*.service")]),
            )
            .context("listing container units")?;
        Ok(rows
            .into_iter()
            .map(|r| UnitState {
                name: r.0,
                description: r.1,
                active: r.3,
                sub: r.4,
            })
            .collect())
    }

    fn state(&self, unit: &str) -> Result<Option<UnitState>> {
        Ok(self.list()?.into_iter().find(|u| u.name == unit))
    }
}
