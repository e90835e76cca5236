//! The keel-net daemon: take a subnet lease in etcd, keep it alive, and keep the kernel's
//! routes (and the backend's per-peer state) in line with every other node's lease.
//!
//! Failure rules: when etcd cannot be reached, or the config in etcd is bad, the kernel state
//! is left as it is (traffic between running containers keeps flowing) and the daemon retries
//! with backoff, logging once per change of state. Stopping the daemon tears nothing down
//! either, so a restart drops no traffic; a node that goes away for good loses its lease when
//! the TTL runs out, and the other nodes then remove its routes.

use super::config::{Backend, NetworkConfig};
use super::files::{
    self, SavedLease, Status, StatusDevice, StatusLease, StatusPeer, StatusSkipped, StatusUnderlay,
};
use super::kernel::{Kernel, NetKernel, OverlayDevice, SyncMode, Underlay};
use super::lease::{self, LeaseAttrs};
use super::masq;
use super::plan::{self, format_mac, WgPeer};
use super::state::{Event, Machine, Next, State};
use super::store::{Acquired, EtcdOptions, KeyChange, LeaseStore, Store, StoreError, WatchChanges};
use base64::Engine as _;
use ipnet::Ipv4Net;
use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Clone)]
pub struct Options {
    pub etcd: EtcdOptions,
    pub iface: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub lease_ttl: Duration,
    pub resync: Duration,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub subnet_env: PathBuf,
    pub cni_conf: Option<PathBuf>,
    /// A checked network config to store when etcd has none.
    pub bootstrap_config: Option<String>,
    pub hostname: Option<String>,
    /// Masquerade traffic from this node's containers that leaves the overlay network.
    pub ip_masq: bool,
    /// The one subnet this node may lease (assigned by the cluster), instead of choosing one.
    pub subnet: Option<Ipv4Net>,
}

/// Why one pass with a connected store ended.
enum Exit {
    Stop,
    /// Read the config again (it changed, or the lease must be taken again).
    Again,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Local(String),
}

struct Held {
    config: NetworkConfig,
    subnet: Ipv4Net,
    lease_id: i64,
    attrs: LeaseAttrs,
    device: Option<OverlayDevice>,
}

struct Daemon<K: NetKernel> {
    opts: Options,
    kernel: K,
    underlay: Underlay,
    held: Option<Held>,
    status: Status,
    wg_applied: Option<BTreeSet<WgPeer>>,
    /// The masquerading rule last applied (`Some(None)`: the table removed), for the log.
    masq_applied: Option<Option<String>>,
    logged_skips: Vec<StatusSkipped>,
    machine: Machine,
    term: Signal,
    int: Signal,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Run until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let kernel = Kernel::connect()?;
    let underlay = kernel
        .underlay(opts.iface.as_deref(), opts.public_ip)
        .await?;
    tracing::info!(
        "underlay {} {} mtu {}; etcd {}",
        underlay.name,
        underlay.addr,
        underlay.mtu,
        opts.etcd.endpoints.join(",")
    );
    // Containers' packets to other nodes are forwarded from the CNI bridge to the overlay.
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "1" => {}
        _ => {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")
                .map_err(|e| anyhow::anyhow!("enabling net.ipv4.ip_forward: {e}"))?;
            tracing::info!("enabled net.ipv4.ip_forward");
        }
    }
    let mut d = Daemon::new(opts, kernel, underlay)?;
    d.publish();
    d.main_loop().await;
    tracing::info!("stopping; routes and devices stay in place");
    Ok(())
}

impl<K: NetKernel> Daemon<K> {
    fn new(opts: Options, kernel: K, underlay: Underlay) -> std::io::Result<Daemon<K>> {
        Ok(Daemon {
            status: Status {
                state: State::Starting.as_str().into(),
                pid: std::process::id(),
                underlay: Some(StatusUnderlay {
                    interface: underlay.name.clone(),
                    address: underlay.addr,
                    mtu: underlay.mtu,
                }),
                ..Status::default()
            },
            opts,
            kernel,
            underlay,
            held: None,
            wg_applied: None,
            masq_applied: None,
            logged_skips: Vec::new(),
            machine: Machine::default(),
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    fn publish(&mut self) {
        self.status.updated_unix = now();
        if let Err(e) = files::write_status(&self.opts.run_dir, &self.status) {
            tracing::warn!("cannot write the status file: {}", crate::error::chain(&e));
        }
    }

    /// Record the daemon's state; logged only when it changes.
    fn set_state(&mut self, state: State, message: Option<String>) {
        let name = state.as_str();
        if self.status.state != name || self.status.message != message {
            match (&message, state) {
                (Some(m), State::Running) => tracing::info!("{m}"),
                (Some(m), _) => tracing::error!("{name}: {m}"),
                (None, _) => tracing::info!("{name}"),
            }
        }
        self.machine.state = state;
        self.status.state = name.to_string();
        self.status.message = message;
        self.publish();
    }

    /// Sleep, or return true when asked to stop.
    async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.term.recv() => true,
            _ = self.int.recv() => true,
        }
    }

    /// Drives the state machine ([`Machine::on`]): does what it says next, and reports what
    /// happened as the next event.
    async fn main_loop(&mut self) {
        let mut store: Option<Store> = None;
        let mut next = Next::Connect;
        loop {
            let event = match next {
                Next::Stop => return,
                Next::Connect => {
                    store = None;
                    let connect = Store::connect(&self.opts.etcd);
                    tokio::select! {
                        r = connect => match r {
                            Ok(s) => {
                                store = Some(s);
                                Event::Connected
                            }
                            Err(e) => Event::EtcdLost(crate::error::chain(&e)),
                        },
                        _ = self.term.recv() => Event::StopRequested,
                        _ = self.int.recv() => Event::StopRequested,
                    }
                }
                Next::Session => match store.as_mut() {
                    None => Event::EtcdLost("no connection to etcd".into()),
                    Some(s) => match self.session(s).await {
                        Ok(Exit::Stop) => Event::StopRequested,
                        Ok(Exit::Again) => Event::Again,
                        Err(SessionError::Store(e)) => {
                            store = None;
                            Event::EtcdLost(crate::error::chain(&e))
                        }
                        Err(SessionError::Config(m)) => Event::ConfigInvalid(m),
                        Err(SessionError::Local(m)) => Event::KernelFailed(m),
                    },
                },
                Next::WaitForConfig => match store.as_mut() {
                    None => Event::EtcdLost("no connection to etcd".into()),
                    Some(s) => {
                        if self.wait_for_config_change(s).await {
                            Event::StopRequested
                        } else {
                            Event::ConfigChanged
                        }
                    }
                },
                Next::Retry { after, reconnect } => {
                    if self.sleep_or_stop(after).await {
                        Event::StopRequested
                    } else {
                        next = if reconnect || store.is_none() {
                            Next::Connect
                        } else {
                            Next::Session
                        };
                        continue;
                    }
                }
            };
            let t = self.machine.on(event, self.held.is_some());
            if let Some((state, message)) = t.status {
                self.set_state(state, message);
            }
            next = t.next;
        }
    }

    /// Block until the config key changes (or a stop signal: returns true). Keeps renewing the
    /// lease held under the previous config so that peers keep their routes to this node.
    async fn wait_for_config_change<S: LeaseStore>(&mut self, store: &mut S) -> bool {
        let config_key = store.config_key();
        let mut watch = match store.watch(0).await {
            Ok(w) => w,
            Err(_) => return self.sleep_or_stop(Duration::from_secs(5)).await,
        };
        let mut renew = tokio::time::interval(self.renew_interval());
        loop {
            tokio::select! {
                msg = watch.next() => match msg {
                    Ok(Some(r)) => {
                        if r.changes.iter().any(|c| c.key == config_key.as_bytes()) {
                            return false;
                        }
                    }
                    _ => return self.sleep_or_stop(Duration::from_secs(5)).await,
                },
                _ = renew.tick() => {
                    if let Some(h) = &self.held {
                        let _ = store.renew(h.lease_id).await;
                    }
                }
                _ = self.term.recv() => return true,
                _ = self.int.recv() => return true,
            }
        }
    }

    fn renew_interval(&self) -> Duration {
        (self.opts.lease_ttl / 3).max(Duration::from_secs(1))
    }

    /// One session with a connected store: take (or keep) the lease and set the node up, then
    /// follow the peers until something ends it.
    async fn session<S: LeaseStore>(&mut self, store: &mut S) -> Result<Exit, SessionError> {
        let (subnet, revision) = self.establish(store).await?;
        self.follow(store, subnet, revision).await
    }

    /// Reads the config, sets up the backend's device, takes or keeps the lease, and writes
    /// what containers need (masquerading, subnet.env, the CNI config). Returns the subnet and
    /// the store revision the lease list was read at.
    async fn establish<S: LeaseStore>(
        &mut self,
        store: &mut S,
    ) -> Result<(Ipv4Net, i64), SessionError> {
        if let Some(boot) = &self.opts.bootstrap_config {
            if store.config().await?.is_none()
                && store.put_if_absent(&store.config_key(), boot).await?
            {
                tracing::info!(
                    "stored the bootstrap network config at {}",
                    store.config_key()
                );
            }
        }
        let text = store.config().await?.ok_or_else(|| {
            SessionError::Config(format!(
                "no network config at {} (put one there, e.g. etcdctl put {} '{{\"Network\":\"10.5.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}')",
                store.config_key(),
                store.config_key()
            ))
        })?;
        let config = NetworkConfig::parse(&text).map_err(|e| {
            SessionError::Config(format!("{} in {}; fix it in etcd", e, store.config_key()))
        })?;
        if self
            .held
            .as_ref()
            .map(|h| h.config != config)
            .unwrap_or(false)
        {
            tracing::info!("network config changed: taking a new lease");
            self.held = None;
            self.wg_applied = None;
        }
        self.status.network = Some(config.network.to_string());
        self.status.backend = Some(config.backend.type_name().to_string());

        let (device, backend_data) = self.setup_backend(&config).await?;
        let attrs = LeaseAttrs {
            public_ip: self.underlay.addr,
            backend_type: config.backend.type_name().to_string(),
            backend_data,
            hostname: self.opts.hostname.clone(),
        };

        // Keep the lease this process holds when it is still alive and describes this node.
        let mut keep = None;
        if let Some(h) = self.held.take() {
            if h.attrs == attrs && store.renew(h.lease_id).await? > 0 {
                keep = Some((h.subnet, h.lease_id));
            }
        }
        let list = store.leases().await?;
        let (subnet, lease_id) = match keep {
            Some(k) => k,
            None => self.acquire(store, &config, &attrs, &list.leases).await?,
        };
        if let Some(dev) = &device {
            self.kernel
                .ensure_address(dev.index, plan::overlay_address(&subnet))
                .await
                .map_err(|e| SessionError::Local(crate::error::chain(&e)))?;
        }
        // Before the CNI config is written: the first container already gets out.
        let masq_rule = self
            .opts
            .ip_masq
            .then(|| masq::rule_for(&subnet, &config.network));
        self.kernel
            .apply_masq(masq_rule.as_ref())
            .map_err(|e| SessionError::Local(crate::error::chain(&e)))?;
        let described = masq_rule.as_ref().map(masq::MasqRule::describe);
        if self.masq_applied.as_ref() != Some(&described) {
            match &described {
                Some(d) => tracing::info!("masquerading traffic leaving the overlay: {d}"),
                None => tracing::info!("not masquerading (--ip-masq=false)"),
            }
            self.masq_applied = Some(described.clone());
        }
        self.status.ip_masq = described;
        let mtu = device.as_ref().map(|d| d.mtu).unwrap_or(self.underlay.mtu);
        files::write_atomic(
            &self.opts.subnet_env,
            files::subnet_env(&config, &subnet, mtu, self.opts.ip_masq).as_bytes(),
            0o644,
        )
        .map_err(|e| SessionError::Local(crate::error::chain(&e)))?;
        if let Some(cni) = &self.opts.cni_conf {
            files::write_atomic(cni, files::cni_conflist(&subnet, mtu).as_bytes(), 0o644)
                .map_err(|e| SessionError::Local(crate::error::chain(&e)))?;
        }
        self.status.device = device.as_ref().map(|d| StatusDevice {
            name: d.name.clone(),
            address: plan::overlay_address(&subnet),
            mac: d.mac.as_ref().map(format_mac),
            mtu: d.mtu,
            wireguard_public_key: attrs.backend_data["PublicKey"].as_str().map(str::to_string),
        });
        self.status.lease = Some(StatusLease {
            subnet,
            etcd_lease_id: lease_id,
            ttl_s: self.opts.lease_ttl.as_secs(),
            renewed_unix: now(),
        });
        self.held = Some(Held {
            config,
            subnet,
            lease_id,
            attrs,
            device,
        });
        Ok((subnet, list.revision))
    }

    /// Keeps the lease alive and the kernel in line with the peers' leases, until the config
    /// changes, the lease is lost, etcd fails, or a stop is asked for.
    async fn follow<S: LeaseStore>(
        &mut self,
        store: &mut S,
        subnet: Ipv4Net,
        revision: i64,
    ) -> Result<Exit, SessionError> {
        let mut watch = store.watch(revision + 1).await?;
        self.resync(store).await?;
        let mut renew = tokio::time::interval(self.renew_interval());
        renew.tick().await;
        let mut resync = tokio::time::interval(self.opts.resync);
        resync.tick().await;
        let config_key = store.config_key();
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    let id = self.held.as_ref().map(|h| h.lease_id).unwrap_or(0);
                    let ttl = store.renew(id).await?;
                    if ttl <= 0 {
                        tracing::warn!("the lease on {subnet} expired in etcd; taking it again");
                        self.held = None;
                        return Ok(Exit::Again);
                    }
                    if let Some(l) = self.status.lease.as_mut() {
                        l.renewed_unix = now();
                    }
                    self.publish();
                }
                msg = watch.next() => {
                    let Some(r) = msg? else {
                        return Err(StoreError::Other("etcd ended the watch".into()).into());
                    };
                    if r.canceled {
                        return Ok(Exit::Again);
                    }
                    let config_changed = r.changes.iter().any(|c| c.key == config_key.as_bytes());
                    if config_changed {
                        tracing::info!("{config_key} changed");
                        return Ok(Exit::Again);
                    }
                    let own_key = lease::key(store.prefix(), &subnet);
                    let own_deleted = r
                        .changes
                        .iter()
                        .any(|c| c.deleted && c.key == own_key.as_bytes());
                    if own_deleted {
                        tracing::warn!("{own_key} was deleted in etcd; taking the subnet again");
                        self.held = None;
                        return Ok(Exit::Again);
                    }
                    if let Some(other) = self.overwritten(&r.changes, own_key.as_bytes()) {
                        tracing::warn!(
                            "{own_key}, this node's lease, was overwritten in etcd by another writer ({other}); taking a lease again"
                        );
                        self.held = None;
                        return Ok(Exit::Again);
                    }
                    self.resync(store).await?;
                }
                _ = resync.tick() => self.resync(store).await?,
                _ = self.term.recv() => return Ok(Exit::Stop),
                _ = self.int.recv() => return Ok(Exit::Stop),
            }
        }
    }

    /// What a put on this node's own lease key says, when it is not what this node wrote
    /// (another public address, another key): someone else took the lease over.
    fn overwritten(&self, changes: &[KeyChange], own_key: &[u8]) -> Option<String> {
        let held = self.held.as_ref()?;
        changes
            .iter()
            .filter(|c| !c.deleted && c.key == own_key)
            .find_map(|c| match serde_json::from_slice::<LeaseAttrs>(&c.value) {
                Ok(a) if a == held.attrs => None,
                Ok(a) => Some(format!("public address {}", a.public_ip)),
                Err(e) => Some(format!("a value that is not a lease: {e}")),
            })
    }

    async fn setup_backend(
        &mut self,
        config: &NetworkConfig,
    ) -> Result<(Option<OverlayDevice>, serde_json::Value), SessionError> {
        let local = |e: super::kernel::KernelError| SessionError::Local(crate::error::chain(&e));
        let (device, data) = match &config.backend {
            Backend::Vxlan { vni, port, .. } => {
                let dev = self
                    .kernel
                    .ensure_vxlan(*vni, *port, &self.underlay)
                    .await
                    .map_err(local)?;
                let mac = dev.mac.map(|m| format_mac(&m)).unwrap_or_default();
                (Some(dev), serde_json::json!({"VNI": vni, "VtepMAC": mac}))
            }
            Backend::HostGw => (None, serde_json::Value::Null),
            Backend::Wireguard { listen_port, .. } => {
                let private =
                    files::wireguard_key(&self.opts.state_dir).map_err(SessionError::Local)?;
                let public = super::kernel::wg_public_key(&private).map_err(SessionError::Local)?;
                let dev = self
                    .kernel
                    .ensure_wireguard(&private, *listen_port, &self.underlay)
                    .await
                    .map_err(local)?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(public);
                (
                    Some(dev),
                    serde_json::json!({"PublicKey": b64, "ListenPort": listen_port}),
                )
            }
        };
        let removed = self
            .kernel
            .remove_other_devices(device.as_ref().map(|d| d.name.as_str()))
            .await
            .map_err(local)?;
        for name in removed {
            tracing::info!("removed {name}, which belonged to another backend");
        }
        Ok((device, data))
    }

    async fn acquire<S: LeaseStore>(
        &mut self,
        store: &mut S,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        leases: &[lease::Lease],
    ) -> Result<(Ipv4Net, i64), SessionError> {
        if let Some(subnet) = self.opts.subnet {
            return self.acquire_assigned(store, config, attrs, subnet).await;
        }
        let saved = files::load_saved_lease(&self.opts.state_dir)
            .filter(|s| s.public_ip == attrs.public_ip)
            .map(|s| s.subnet);
        // A lease with this node's address is this node's from before (a restart or reboot).
        let mine = leases
            .iter()
            .find(|l| l.attrs.public_ip == attrs.public_ip && config.contains_subnet(&l.subnet))
            .map(|l| l.subnet);
        let mut taken: HashSet<Ipv4Net> = leases
            .iter()
            .filter(|l| l.attrs.public_ip != attrs.public_ip)
            .map(|l| l.subnet)
            .collect();
        let mut previous = mine.or(saved);
        let seed = u32::from(attrs.public_ip).wrapping_mul(2_654_435_761);
        for _ in 0..16 {
            let Some(subnet) = lease::choose_subnet(config, &taken, previous, seed) else {
                return Err(SessionError::Config(format!(
                    "network {} has no free /{} subnet left (SubnetMin {} .. SubnetMax {})",
                    config.network, config.subnet_len, config.subnet_min, config.subnet_max
                )));
            };
            match store.acquire(&subnet, attrs, self.opts.lease_ttl).await? {
                Acquired::Yes { lease_id } => {
                    tracing::info!(
                        "leased {subnet} (etcd lease {lease_id:x}, ttl {} s)",
                        self.opts.lease_ttl.as_secs()
                    );
                    return self.remember_lease(subnet, attrs, lease_id);
                }
                Acquired::Taken => {
                    taken.insert(subnet);
                    previous = None;
                }
            }
        }
        Err(SessionError::Config(
            "could not take a subnet after 16 tries (many nodes racing?)".into(),
        ))
    }

    /// Records a lease just taken (for the next boot) and returns it.
    fn remember_lease(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        lease_id: i64,
    ) -> Result<(Ipv4Net, i64), SessionError> {
        files::save_lease(
            &self.opts.state_dir,
            &SavedLease {
                subnet,
                public_ip: attrs.public_ip,
            },
        )
        .map_err(|e| SessionError::Local(crate::error::chain(&e)))?;
        Ok((subnet, lease_id))
    }

    /// Takes the subnet the cluster assigned to this node: no other subnet, ever.
    async fn acquire_assigned<S: LeaseStore>(
        &mut self,
        store: &mut S,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        subnet: Ipv4Net,
    ) -> Result<(Ipv4Net, i64), SessionError> {
        if !config.contains_subnet(&subnet) {
            return Err(SessionError::Config(format!(
                "the assigned subnet {subnet} (KEEL_NET_SUBNET) is not one network {} hands out (/{} subnets from {} to {}): the network config in etcd and the cluster's assignment disagree",
                config.network, config.subnet_len, config.subnet_min, config.subnet_max
            )));
        }
        match store.acquire(&subnet, attrs, self.opts.lease_ttl).await? {
            Acquired::Yes { lease_id } => {
                tracing::info!(
                    "leased the assigned subnet {subnet} (etcd lease {lease_id:x}, ttl {} s)",
                    self.opts.lease_ttl.as_secs()
                );
                self.remember_lease(subnet, attrs, lease_id)
            }
            Acquired::Taken => Err(SessionError::Config(format!(
                "the assigned subnet {subnet} is leased by another address ({}): only this node and the cluster's administrators may write that key; remove the stale lease with the admin certificate",
                lease::key(store.prefix(), &subnet)
            ))),
        }
    }

    async fn resync<S: LeaseStore>(&mut self, store: &mut S) -> Result<(), SessionError> {
        let list = store.leases().await?;
        let Some(held) = &self.held else {
            return Ok(());
        };
        let own = lease::Lease {
            subnet: held.subnet,
            attrs: held.attrs.clone(),
        };
        let (desired, skipped) = plan::plan(&held.config, &own, &list.leases, self.underlay.net);
        let mode = match held.config.backend {
            Backend::Vxlan { .. } => SyncMode::Vxlan,
            Backend::Wireguard { .. } if self.wg_applied.as_ref() != Some(&desired.wg_peers) => {
                SyncMode::WireguardPeers
            }
            _ => SyncMode::RoutesOnly,
        };
        let changes = self
            .kernel
            .sync(&desired, held.device.as_ref(), &self.underlay, mode)
            .await
            .map_err(|e| SessionError::Local(crate::error::chain(&e)))?;
        if mode == SyncMode::WireguardPeers {
            self.wg_applied = Some(desired.wg_peers.clone());
        }
        let skipped: Vec<StatusSkipped> = skipped
            .into_iter()
            .map(|s| StatusSkipped {
                subnet: s.subnet,
                reason: s.reason,
            })
            .collect();
        if skipped != self.logged_skips {
            for s in &skipped {
                tracing::warn!("ignoring the lease of {}: {}", s.subnet, s.reason);
            }
            self.logged_skips = skipped.clone();
        }
        let skipped_set: HashSet<Ipv4Net> = skipped.iter().map(|s| s.subnet).collect();
        self.status.peers = list
            .leases
            .iter()
            .filter(|l| l.subnet != held.subnet && !skipped_set.contains(&l.subnet))
            .map(|l| StatusPeer {
                subnet: l.subnet,
                public_ip: l.attrs.public_ip,
                hostname: l.attrs.hostname.clone(),
                direct: matches!(held.config.backend, Backend::Vxlan { .. })
                    && desired
                        .routes
                        .iter()
                        .any(|r| r.dst == l.subnet && r.dev == plan::Dev::Underlay),
            })
            .collect();
        self.status.skipped = skipped;
        self.status.invalid_entries = list.invalid;
        let peers = self.status.peers.len();
        let subnet = held.subnet;
        if !changes.is_empty() {
            tracing::info!(
                "{peers} peer(s); kernel entries added {}, removed {}",
                changes.added,
                changes.removed
            );
        }
        self.set_state(State::Running, Some(format!("{subnet}, {peers} peer(s)")));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The daemon's decisions through its seams: a fake etcd and a fake kernel that records
    //! every call.

    use super::*;
    use crate::node::net::kernel::{Changes, KernelError};
    use crate::node::net::lease::Lease;
    use crate::node::net::plan::Desired;
    use crate::node::net::store::{KeyChange, LeaseList, WatchBatch};
    use std::cell::RefCell;
    use std::collections::VecDeque;

    #[derive(Default)]
    struct FakeKernel {
        calls: RefCell<Vec<String>>,
    }

    impl FakeKernel {
        fn log(&self, s: String) {
            self.calls.borrow_mut().push(s);
        }
    }

    type KResult<T> = std::result::Result<T, KernelError>;

    impl NetKernel for FakeKernel {
        async fn ensure_vxlan(&self, vni: u32, _: u16, _: &Underlay) -> KResult<OverlayDevice> {
            self.log(format!("ensure_vxlan {vni}"));
            Ok(OverlayDevice {
                index: 7,
                name: "flannel.1".into(),
                mac: Some([2, 0, 0, 0, 0, 1]),
                mtu: 1450,
            })
        }
        async fn ensure_wireguard(
            &self,
            _: &[u8; 32],
            _: u16,
            _: &Underlay,
        ) -> KResult<OverlayDevice> {
            self.log("ensure_wireguard".into());
            Err(KernelError::Other("not in these tests".into()))
        }
        async fn remove_other_devices(&self, keep: Option<&str>) -> KResult<Vec<String>> {
            self.log(format!("remove_other_devices {keep:?}"));
            Ok(vec![])
        }
        async fn ensure_address(&self, index: u32, addr: Ipv4Addr) -> KResult<Changes> {
            self.log(format!("ensure_address {index} {addr}"));
            Ok(Changes::default())
        }
        async fn sync(
            &self,
            desired: &Desired,
            _: Option<&OverlayDevice>,
            _: &Underlay,
            mode: SyncMode,
        ) -> KResult<Changes> {
            let dsts: Vec<String> = desired.routes.iter().map(|r| r.dst.to_string()).collect();
            self.log(format!("sync {mode:?} {}", dsts.join(",")));
            Ok(Changes::default())
        }
        fn apply_masq(&self, rule: Option<&masq::MasqRule>) -> KResult<()> {
            self.log(format!("apply_masq {}", rule.is_some()));
            Ok(())
        }
    }

    const PREFIX: &str = "/coreos.com/network";

    /// etcd as the daemon sees it: the config, the lease lists it returns one after the other
    /// (the last one again when they run out), watch batches, and renewals that fail after a
    /// number of successes.
    struct FakeStore {
        config: Option<String>,
        lease_lists: VecDeque<Vec<Lease>>,
        batches: VecDeque<WatchBatch>,
        renewals_ok: usize,
    }

    struct FakeWatch(VecDeque<WatchBatch>);

    impl WatchChanges for FakeWatch {
        async fn next(&mut self) -> std::result::Result<Option<WatchBatch>, StoreError> {
            match self.0.pop_front() {
                Some(b) => Ok(Some(b)),
                None => std::future::pending().await,
            }
        }
    }

    impl LeaseStore for FakeStore {
        type Watch = FakeWatch;
        fn config_key(&self) -> String {
            format!("{PREFIX}/config")
        }
        fn prefix(&self) -> &str {
            PREFIX
        }
        async fn config(&mut self) -> std::result::Result<Option<String>, StoreError> {
            Ok(self.config.clone())
        }
        async fn leases(&mut self) -> std::result::Result<LeaseList, StoreError> {
            let leases = if self.lease_lists.len() > 1 {
                self.lease_lists.pop_front().unwrap_or_default()
            } else {
                self.lease_lists.front().cloned().unwrap_or_default()
            };
            Ok(LeaseList {
                leases,
                invalid: vec![],
                revision: 10,
            })
        }
        async fn acquire(
            &mut self,
            _: &Ipv4Net,
            _: &LeaseAttrs,
            _: Duration,
        ) -> std::result::Result<Acquired, StoreError> {
            Ok(Acquired::Yes { lease_id: 0x42 })
        }
        async fn put_if_absent(
            &mut self,
            _: &str,
            _: &str,
        ) -> std::result::Result<bool, StoreError> {
            Ok(false)
        }
        async fn renew(&mut self, _: i64) -> std::result::Result<i64, StoreError> {
            if self.renewals_ok == 0 {
                return Err(StoreError::Other("etcd went away".into()));
            }
            self.renewals_ok -= 1;
            Ok(9)
        }
        async fn watch(&mut self, _: i64) -> std::result::Result<FakeWatch, StoreError> {
            Ok(FakeWatch(std::mem::take(&mut self.batches)))
        }
    }

    fn peer(n: u8) -> Lease {
        Lease {
            subnet: format!("10.5.{n}.0/24").parse().expect("subnet"),
            attrs: LeaseAttrs {
                public_ip: Ipv4Addr::new(192, 0, 2, n),
                backend_type: "vxlan".into(),
                backend_data: serde_json::json!({"VNI": 1, "VtepMAC": format!("02:00:00:00:00:{n:02x}")}),
                hostname: None,
            },
        }
    }

    fn daemon(dir: &std::path::Path) -> Daemon<FakeKernel> {
        let opts = Options {
            etcd: EtcdOptions {
                endpoints: vec!["http://127.0.0.1:1".into()],
                ca_file: None,
                cert_file: None,
                key_file: None,
                prefix: PREFIX.into(),
            },
            iface: None,
            public_ip: None,
            lease_ttl: Duration::from_secs(3),
            resync: Duration::from_secs(3600),
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            subnet_env: dir.join("run/subnet.env"),
            cni_conf: None,
            bootstrap_config: None,
            hostname: None,
            ip_masq: true,
            subnet: None,
        };
        let underlay = Underlay {
            index: 2,
            name: "eth0".into(),
            addr: Ipv4Addr::new(192, 0, 2, 1),
            mtu: 1500,
            net: Some("192.0.2.0/24".parse().expect("net")),
        };
        Daemon::new(opts, FakeKernel::default(), underlay).expect("daemon")
    }

    const VXLAN: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;

    /// A new peer's lease makes the daemon program a route to it; when etcd then goes away the
    /// session ends with a store error and the kernel is not touched again: the routes stay.
    #[tokio::test]
    async fn peers_are_followed_and_losing_etcd_keeps_the_routes() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut d = daemon(t.path());
        let mut store = FakeStore {
            config: Some(VXLAN.into()),
            lease_lists: VecDeque::from(vec![vec![peer(2)], vec![peer(2)], vec![peer(2), peer(3)]]),
            batches: VecDeque::from(vec![WatchBatch {
                canceled: false,
                changes: vec![KeyChange {
                    key: format!("{PREFIX}/subnets/10.5.3.0-24").into_bytes(),
                    deleted: false,
                    value: vec![],
                }],
            }]),
            renewals_ok: 0,
        };
        let r = d.session(&mut store).await;
        assert!(
            matches!(r, Err(SessionError::Store(_))),
            "ends on the etcd error"
        );
        let calls = d.kernel.calls.borrow().clone();
        let syncs: Vec<&String> = calls.iter().filter(|c| c.starts_with("sync")).collect();
        assert_eq!(syncs.len(), 2, "{calls:?}");
        assert!(syncs[0].ends_with(" 10.5.2.0/24"), "{calls:?}");
        assert!(syncs[1].ends_with(" 10.5.2.0/24,10.5.3.0/24"), "{calls:?}");
        assert_eq!(
            calls.last(),
            Some(syncs[1]),
            "nothing touched the kernel after etcd went away: {calls:?}"
        );
        assert!(
            d.held.is_some(),
            "the lease is still held (its routes stay)"
        );
        // The state machine then says so and retries.
        let tr = d
            .machine
            .on(Event::EtcdLost("etcd went away".into()), d.held.is_some());
        assert_eq!(
            tr.status,
            Some((
                State::EtcdUnreachable,
                Some("etcd went away; keeping the current routes; retrying".into())
            ))
        );
    }

    /// A missing or invalid config in etcd is a config error, before anything touches the
    /// kernel: the routes of a previous config stay.
    #[tokio::test]
    async fn a_bad_config_touches_nothing() {
        for (case, config, want) in [
            (
                "missing",
                None,
                "no network config at /coreos.com/network/config",
            ),
            (
                "not JSON",
                Some("{"),
                "in /coreos.com/network/config; fix it in etcd",
            ),
            (
                "bad network",
                Some(r#"{"Network":"10.5.0.0/33"}"#),
                "Network",
            ),
        ] {
            let t = tempfile::tempdir().expect("tempdir");
            let mut d = daemon(t.path());
            let mut store = FakeStore {
                config: config.map(str::to_string),
                lease_lists: VecDeque::new(),
                batches: VecDeque::new(),
                renewals_ok: 1,
            };
            match d.session(&mut store).await {
                Err(SessionError::Config(m)) => assert!(m.contains(want), "{case}: {m}"),
                Err(e) => panic!("{case}: not a config error: {e}"),
                Ok(_) => panic!("{case}: the session ran"),
            }
            assert!(
                d.kernel.calls.borrow().is_empty(),
                "{case}: kernel untouched"
            );
        }
    }

    /// The config changing in etcd ends the session to start over with the new config.
    #[tokio::test]
    async fn a_config_change_starts_over() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut d = daemon(t.path());
        let mut store = FakeStore {
            config: Some(VXLAN.into()),
            lease_lists: VecDeque::from(vec![vec![]]),
            batches: VecDeque::from(vec![WatchBatch {
                canceled: false,
                changes: vec![KeyChange {
                    key: format!("{PREFIX}/config").into_bytes(),
                    deleted: false,
                    value: vec![],
                }],
            }]),
            renewals_ok: 10,
        };
        assert!(matches!(d.session(&mut store).await, Ok(Exit::Again)));
    }

    /// Review H2: a put on this node's own lease key with another node's address or key (one
    /// node hijacking another's subnet) is noticed; the node's own renewal is not.
    #[tokio::test]
    async fn an_overwritten_own_lease_is_noticed() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut d = daemon(t.path());
        let own = peer(1);
        d.held = Some(Held {
            config: NetworkConfig::parse(VXLAN).expect("config"),
            subnet: own.subnet,
            lease_id: 1,
            attrs: own.attrs.clone(),
            device: None,
        });
        let key = lease::key(PREFIX, &own.subnet);
        let change = |attrs: &LeaseAttrs| KeyChange {
            key: key.clone().into_bytes(),
            deleted: false,
            value: serde_json::to_vec(attrs).expect("json"),
        };
        assert_eq!(d.overwritten(&[change(&own.attrs)], key.as_bytes()), None);
        let by = d
            .overwritten(&[change(&peer(9).attrs)], key.as_bytes())
            .expect("noticed");
        assert!(by.contains("192.0.2.9"), "{by}");
        let mut other_key = own.attrs.clone();
        other_key.backend_data = serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:66"});
        assert!(d
            .overwritten(&[change(&other_key)], key.as_bytes())
            .is_some());
    }
}
