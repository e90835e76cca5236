//! keel-net's states and the one function that moves between them. The daemon (`daemon.rs`)
//! does the I/O — connecting to etcd, running a session, waiting for the config, sleeping — and
//! reports what happened as an [`Event`]; [`Machine::on`] decides the next state, what the log
//! and `keel-net status` say, and what the daemon does next. None of the failure states tears
//! anything down: routes, devices and the lease stay as they are (traffic between running
//! containers keeps flowing), which is why no transition asks for it.

use std::time::Duration;

/// The first delay after a failure; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between retries after an etcd or kernel failure.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What keel-net is doing, as `keel-net status` reports it (`state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started; no etcd session yet.
    Starting,
    /// Holding a lease, the kernel in line with every other node's lease, watching for changes.
    Running,
    /// etcd cannot be reached. Routes, devices and the lease file stay; connecting again after a
    /// delay that doubles.
    EtcdUnreachable,
    /// The network config in etcd is missing or invalid: waiting for it to change, renewing the
    /// lease held under the previous config; routes stay.
    ConfigError,
    /// A kernel operation (netlink, nftables, a file keel-net writes) failed: trying the
    /// session again after a delay that doubles; routes stay.
    KernelError,
    /// Asked to stop (SIGTERM, SIGINT). Nothing is torn down, so a restart drops no traffic.
    /// Not written to the status file, whose pid then names a process that is gone.
    Stopped,
}

impl State {
    /// The name in the status file and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::EtcdUnreachable => "etcd-unreachable",
            State::ConfigError => "config-error",
            State::KernelError => "kernel-error",
            State::Stopped => "stopped",
        }
    }
}

/// What the daemon's last step found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Connected to etcd.
    Connected,
    /// etcd could not be reached, when connecting or during a session (the store is gone).
    EtcdLost(String),
    /// The session ended to start over with the same store (the config changed, the lease
    /// expired or was deleted, etcd cancelled the watch).
    Again,
    /// The config is missing or invalid (or no subnet is free).
    ConfigInvalid(String),
    /// The config key changed while the daemon waited for it.
    ConfigChanged,
    /// A kernel operation failed.
    KernelFailed(String),
    /// SIGTERM or SIGINT.
    StopRequested,
}

/// What the daemon does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Connect to etcd (dropping the old connection).
    Connect,
    /// Run a session with the connected store: lease, kernel, watch.
    Session,
    /// Wait for the config key to change.
    WaitForConfig,
    /// Sleep, then connect again (`reconnect`) or run the session again.
    Retry { after: Duration, reconnect: bool },
    /// Return; nothing is torn down.
    Stop,
}

/// The outcome of one transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The new state and its message, when the status changes (`None`: as it was).
    pub status: Option<(State, Option<String>)>,
    pub next: Next,
}

/// keel-net's state machine: the state and the retry delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub state: State,
    pub backoff: Duration,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            state: State::Starting,
            backoff: FIRST_BACKOFF,
        }
    }
}

impl Machine {
    /// The one transition function. `holding_lease`: this process holds a lease (its routes
    /// are in the kernel), which the etcd-unreachable message says are kept.
    pub fn on(&mut self, event: Event, holding_lease: bool) -> Transition {
        let (status, next) = match event {
            Event::Connected => (None, Next::Session),
            Event::EtcdLost(reason) => {
                let note = if holding_lease {
                    "; keeping the current routes"
                } else {
                    ""
                };
                let next = self.retry(true);
                (
                    Some((
                        State::EtcdUnreachable,
                        Some(format!("{reason}{note}; retrying")),
                    )),
                    next,
                )
            }
            Event::Again => {
                self.backoff = FIRST_BACKOFF;
                (None, Next::Session)
            }
            Event::ConfigInvalid(reason) => (
                Some((State::ConfigError, Some(reason))),
                Next::WaitForConfig,
            ),
            Event::ConfigChanged => (None, Next::Session),
            Event::KernelFailed(reason) => {
                let next = self.retry(false);
                (Some((State::KernelError, Some(reason))), next)
            }
            Event::StopRequested => {
                // The status file keeps what it said last (with the pid of a process that is
                // gone, which `keel-net status` reports as not running).
                self.state = State::Stopped;
                (None, Next::Stop)
            }
        };
        if let Some((s, _)) = &status {
            self.state = *s;
        }
        Transition { status, next }
    }

    /// A retry after the current delay, which doubles for the next one (up to the maximum).
    fn retry(&mut self, reconnect: bool) -> Next {
        let after = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Next::Retry { after, reconnect }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn losing_etcd_keeps_the_routes_and_retries_with_a_doubling_delay_up_to_30s() {
        let mut m = Machine::default();
        let t = m.on(Event::EtcdLost("connection refused".into()), true);
        assert_eq!(
            t.status,
            Some((
                State::EtcdUnreachable,
                Some("connection refused; keeping the current routes; retrying".into())
            ))
        );
        assert_eq!(
            t.next,
            Next::Retry {
                after: secs(1),
                reconnect: true
            }
        );
        let delays: Vec<Duration> = (0..6)
            .map(|_| match m.on(Event::EtcdLost("x".into()), true).next {
                Next::Retry { after, .. } => after,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            delays,
            vec![secs(2), secs(4), secs(8), secs(16), secs(30), secs(30)]
        );
        // Connected again: a session; the delay starts over once a session ends normally.
        assert_eq!(m.on(Event::Connected, true).next, Next::Session);
        assert_eq!(m.on(Event::Again, true).next, Next::Session);
        assert_eq!(m.backoff, FIRST_BACKOFF);
    }

    #[test]
    fn without_a_lease_the_message_promises_nothing() {
        let mut m = Machine::default();
        let t = m.on(Event::EtcdLost("timeout".into()), false);
        assert_eq!(
            t.status,
            Some((State::EtcdUnreachable, Some("timeout; retrying".into())))
        );
    }

    #[test]
    fn a_bad_config_waits_for_the_config_to_change_with_the_same_store() {
        let mut m = Machine::default();
        let t = m.on(
            Event::ConfigInvalid("Network: not an IPv4 CIDR".into()),
            true,
        );
        assert_eq!(
            t.status,
            Some((State::ConfigError, Some("Network: not an IPv4 CIDR".into())))
        );
        assert_eq!(t.next, Next::WaitForConfig);
        let t = m.on(Event::ConfigChanged, true);
        assert_eq!(
            t.status, None,
            "the state stays until the session says running"
        );
        assert_eq!(t.next, Next::Session);
        assert_eq!(m.state, State::ConfigError);
    }

    #[test]
    fn a_kernel_failure_retries_the_session_without_reconnecting() {
        let mut m = Machine::default();
        let t = m.on(Event::KernelFailed("netlink: adding a route".into()), true);
        assert_eq!(t.status.map(|s| s.0), Some(State::KernelError));
        assert_eq!(
            t.next,
            Next::Retry {
                after: secs(1),
                reconnect: false
            }
        );
        assert_eq!(
            m.on(Event::KernelFailed("again".into()), true).next,
            Next::Retry {
                after: secs(2),
                reconnect: false
            }
        );
    }

    #[test]
    fn stopping_tears_nothing_down() {
        for state_event in [
            Event::EtcdLost("x".into()),
            Event::ConfigInvalid("x".into()),
            Event::KernelFailed("x".into()),
            Event::Connected,
        ] {
            let mut m = Machine::default();
            m.on(state_event, true);
            let t = m.on(Event::StopRequested, true);
            assert_eq!(t.next, Next::Stop);
            assert_eq!(m.state, State::Stopped);
        }
    }

    #[test]
    fn state_names_are_the_status_file_words() {
        let names: Vec<&str> = [
            State::Starting,
            State::Running,
            State::EtcdUnreachable,
            State::ConfigError,
            State::KernelError,
            State::Stopped,
        ]
        .iter()
        .map(|s| s.as_str())
        .collect();
        assert_eq!(
            names,
            vec![
                "starting",
                "running",
                "etcd-unreachable",
                "config-error",
                "kernel-error",
                "stopped"
            ]
        );
    }
}
