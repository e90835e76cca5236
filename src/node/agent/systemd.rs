//! The systemd seam: keel-agent starts, lists and stops containers as transient units through
//! systemd's D-Bus API (zbus), so systemd supervises them, puts them in their own cgroup with
//! limits, and sends their output to the journal.

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use zbus::blocking::{Connection, Proxy};
use zbus::zvariant::{OwnedObjectPath, Value};

/// How long a container gets to exit after SIGTERM before systemd kills it.
const STOP_TIMEOUT_USEC: u64 = 10_000_000;

/// How long keel-agent waits for systemd to finish a container's start job. systemd finishes a
/// Type=exec start as soon as the process runs; a job still queued after this (a manager stuck
/// in a reload, or behind a long queue at boot) is cancelled rather than waited for forever.
const START_TIMEOUT: Duration = Duration::from_secs(90);

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
    start_timeout: Duration,
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
        Ok(Systemd::on(
            Connection::system().context("connecting to the system D-Bus (is dbus running?)")?,
            START_TIMEOUT,
        ))
    }

    /// systemd's manager on `conn`, waiting at most `start_timeout` for a start job.
    pub fn on(conn: Connection, start_timeout: Duration) -> Systemd {
        Systemd {
            conn,
            start_timeout,
        }
    }

    fn manager(&self) -> Result<Proxy<'static>> {
        Proxy::new_owned(
            self.conn.clone(),
            "org.freedesktop.systemd1".to_string(),
            "/org/freedesktop/systemd1".to_string(),
            "org.freedesktop.systemd1.Manager".to_string(),
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
            // crun runs the container in this unit's cgroup (--cgroup-manager=disabled): the
            // device controller allows only the standard pseudo devices (null, zero, full,
            // random, urandom, tty, pts).
            ("DevicePolicy", Value::from("closed")),
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
        // The signal stream has no timeout of its own: read it on a thread and wait here. The
        // thread ends with the job's signal, an error, or the first signal after the deadline.
        let deadline = Instant::now() + self.start_timeout;
        let (tx, rx) = std::sync::mpsc::channel();
        let wanted = job.clone();
        std::thread::spawn(move || {
            for msg in signals {
                let end = match msg
                    .body()
                    .deserialize::<(u32, OwnedObjectPath, String, String)>()
                {
                    Ok((_, path, _, result)) if path == wanted => Ok(result),
                    Ok(_) if Instant::now() < deadline => continue,
                    Ok(_) => return,
                    Err(e) => Err(anyhow::Error::new(e).context("reading a JobRemoved signal")),
                };
                let _ = tx.send(end);
                return;
            }
            let _ = tx.send(Err(anyhow::anyhow!(
                "the system bus closed while the container was starting"
            )));
        });
        match rx.recv_timeout(self.start_timeout) {
            // The job's result as systemd's JobRemoved reported it.
            Ok(Ok(r)) if r == "done" => Ok(()),
            Ok(Ok(r)) => anyhow::bail!(
                "{unit} did not start (job {r}); see `keel-agent logs {}`",
                spec.name
            ),
            Ok(Err(e)) => Err(e.context(format!("waiting for {unit} to start"))),
            Err(_) => {
                // Cancel the queued start (a stop job replaces it), so the unit does not start
                // later from a bundle the caller removes.
                let cancelled = manager
                    .call::<_, _, OwnedObjectPath>("StopUnit", &(unit.as_str(), "replace"))
                    .map(|_| "cancelled it".to_string())
                    .unwrap_or_else(|e| format!("could not cancel it: {e}"));
                anyhow::bail!(
                    "systemd did not finish starting {unit} within {} s (job {}); {cancelled}. \
                     Is systemd busy? See `systemctl list-jobs`",
                    self.start_timeout.as_secs(),
                    job.as_str()
                )
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use zbus::object_server::SignalEmitter;
    use zbus::zvariant::{ObjectPath, OwnedValue};

    /// A private message bus: Debian's dbus-daemon, as on a node, for a fake systemd.
    struct Bus {
        child: Child,
        address: String,
    }

    impl Bus {
        fn start() -> Bus {
            let mut child = Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--print-address=1"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("starting dbus-daemon (scripts/host-setup installs it)");
            let mut address = String::new();
            BufReader::new(child.stdout.take().expect("dbus-daemon's stdout"))
                .read_line(&mut address)
                .expect("reading the bus address");
            Bus {
                child,
                address: address.trim().to_string(),
            }
        }

        fn connection(&self) -> zbus::blocking::connection::Builder<'_> {
            zbus::blocking::connection::Builder::address(self.address.as_str())
                .expect("bus address")
        }
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// What the fake systemd does with a start job.
    #[derive(Clone, Copy)]
    enum Answer {
        Done,
        Failed,
        Never,
    }

    struct FakeManager {
        answer: Answer,
        stopped: Arc<Mutex<Vec<String>>>,
    }

    const JOB: &str = "/org/freedesktop/systemd1/job/7";

    #[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
    impl FakeManager {
        fn subscribe(&self) {}

        async fn start_transient_unit(
            &self,
            #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
            name: String,
            _mode: String,
            _props: Vec<(String, OwnedValue)>,
            _aux: Vec<(String, Vec<(String, OwnedValue)>)>,
        ) -> zbus::fdo::Result<OwnedObjectPath> {
            let job = ObjectPath::from_static_str_unchecked(JOB);
            // Another job ends first: the agent must wait for its own.
            let other = ObjectPath::from_static_str_unchecked("/org/freedesktop/systemd1/job/6");
            Self::job_removed(&emitter, 6, other, "other.service", "done").await?;
            match self.answer {
                Answer::Done => Self::job_removed(&emitter, 7, job.clone(), &name, "done").await?,
                Answer::Failed => {
                    Self::job_removed(&emitter, 7, job.clone(), &name, "failed").await?
                }
                Answer::Never => {}
            }
            Ok(job.into())
        }

        fn stop_unit(&self, name: String, _mode: String) -> OwnedObjectPath {
            self.stopped.lock().expect("lock").push(name);
            ObjectPath::from_static_str_unchecked("/org/freedesktop/systemd1/job/8").into()
        }

        #[zbus(signal)]
        async fn job_removed(
            emitter: &SignalEmitter<'_>,
            id: u32,
            job: ObjectPath<'_>,
            unit: &str,
            result: &str,
        ) -> zbus::Result<()>;
    }

    fn spec() -> UnitSpec {
        UnitSpec {
            name: "web".into(),
            description: "test".into(),
            exec: ("/bin/true".into(), vec!["true".into()]),
            exec_stop_post: vec![],
            memory_max: 1 << 20,
            tasks_max: 8,
        }
    }

    /// Starts a container unit against a fake systemd that answers `answer`.
    fn start_with(answer: Answer, timeout: Duration) -> (Result<()>, Vec<String>, Duration) {
        let bus = Bus::start();
        let stopped = Arc::new(Mutex::new(Vec::new()));
        let _systemd = bus
            .connection()
            .name("org.freedesktop.systemd1")
            .expect("name")
            .serve_at(
                "/org/freedesktop/systemd1",
                FakeManager {
                    answer,
                    stopped: stopped.clone(),
                },
            )
            .expect("serve")
            .build()
            .expect("fake systemd on the bus");
        let agent = Systemd::on(
            bus.connection().build().expect("agent's connection"),
            timeout,
        );
        let t = Instant::now();
        let result = agent.start(&spec());
        let elapsed = t.elapsed();
        let stopped = stopped.lock().expect("lock").clone();
        (result, stopped, elapsed)
    }

    #[test]
    fn start_returns_when_systemd_reports_the_job_done() {
        let (result, stopped, _) = start_with(Answer::Done, Duration::from_secs(30));
        result.expect("started");
        assert!(stopped.is_empty());
    }

    #[test]
    fn a_failed_start_job_is_an_error_naming_the_unit() {
        let (result, _, _) = start_with(Answer::Failed, Duration::from_secs(30));
        let err = format!("{:#}", result.expect_err("failed job"));
        assert!(
            err.contains("keel-ctr-web.service did not start (job failed)"),
            "{err}"
        );
    }

    /// A start job systemd never finishes: the agent gives up after its timeout, cancels the
    /// job, and says so, instead of waiting forever.
    #[test]
    fn a_start_job_that_never_ends_times_out_and_is_cancelled() {
        let (result, stopped, elapsed) = start_with(Answer::Never, Duration::from_secs(1));
        let err = format!("{:#}", result.expect_err("no answer"));
        assert!(
            err.contains("systemd did not finish starting keel-ctr-web.service within 1 s"),
            "{err}"
        );
        assert!(err.contains(JOB) && err.contains("cancelled it"), "{err}");
        assert_eq!(stopped, vec!["keel-ctr-web.service".to_string()]);
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    }
}
