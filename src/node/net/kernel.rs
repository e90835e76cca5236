//! Making the kernel match a [`Desired`] state over netlink (rtnetlink for links, addresses,
//! routes, ARP and FDB entries; generic netlink for WireGuard). Nothing here shells out.
//!
//! keel-net marks its routes with its own route protocol number ([`ROUTE_PROTO`], shown by
//! `ip route` as `proto 107`), so it removes only what it added; neighbour and FDB entries are
//! only touched on its own overlay device.

use super::plan::{format_mac, Desired, Dev, RouteSpec, WgPeer};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, LinkWireguard, RouteMessageBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The route protocol number that marks keel-net's routes.
pub const ROUTE_PROTO: u8 = 107;
/// The WireGuard device's name.
pub const WG_DEVICE: &str = "flannel-wg";

/// The vxlan device's MAC: derived from the node's underlay address and the VNI, locally
/// administered. Set explicitly because a MAC the kernel picks at random is replaced by udev
/// (MACAddressPolicy=persistent) right after creation, behind the back of the lease that already
/// published it; stable across reboots too, so peers' FDB entries stay right.
pub fn vtep_mac(addr: Ipv4Addr, vni: u32) -> [u8; 6] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"keel-net vtep ");
    h.update(addr.octets());
    h.update(vni.to_be_bytes());
    let d = h.finalize();
    [(d[0] & 0xfe) | 0x02, d[1], d[2], d[3], d[4], d[5]]
}

/// The name of the vxlan device for a VNI, as flannel names it.
pub fn vxlan_device(vni: u32) -> String {
    format!("flannel.{vni}")
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, KernelError>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Netlink { what, source }
}

/// Whether a netlink error is "no such object" (ENOENT / ESRCH), which deletions may ignore.
fn is_missing(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.code.map(|c| matches!(-c.get(), libc::ENOENT | libc::ESRCH | libc::ENODEV)).unwrap_or(false))
}

/// The interface that carries traffic between nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Underlay {
    pub index: u32,
    pub name: String,
    pub addr: Ipv4Addr,
    pub mtu: u32,
    /// The subnet the address is on (its prefix on the interface), when the interface holds it.
    pub net: Option<Ipv4Net>,
}

/// The backend's own device once set up.
#[derive(Debug, Clone, PartialEq)]
pub struct OverlayDevice {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
}

/// What one synchronisation changed (for the log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added == 0 && self.removed == 0
    }
    fn merge(&mut self, other: Changes) {
        self.added += other.added;
        self.removed += other.removed;
    }
}

/// Which per-peer state besides routes [`Kernel::sync`] maintains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// FDB and ARP entries on the vxlan device.
    Vxlan,
    /// Replace the WireGuard device's peers.
    WireguardPeers,
    /// Routes only (host-gw, or WireGuard peers unchanged).
    RoutesOnly,
}

pub struct Kernel {
    handle: Handle,
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mtu(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn link_mac(msg: &LinkMessage) -> Option<[u8; 6]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => a.as_slice().try_into().ok(),
        _ => None,
    })
}

fn link_info(msg: &LinkMessage) -> (Option<&InfoKind>, Option<&InfoData>) {
    let infos = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    });
    let mut kind = None;
    let mut data = None;
    for i in infos.into_iter().flatten() {
        match i {
            LinkInfo::Kind(k) => kind = Some(k),
            LinkInfo::Data(d) => data = Some(d),
            _ => {}
        }
    }
    (kind, data)
}

impl Kernel {
    /// Open a netlink connection (its task runs on the current tokio runtime).
    pub fn connect() -> Result<Kernel> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| KernelError::Other(format!("cannot open a netlink socket: {e}")))?;
        tokio::spawn(conn);
        Ok(Kernel { handle })
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        match self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
        {
            Ok(m) => Ok(m),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(nl(format!("looking up link {name}"))(e)),
        }
    }

    async fn link_by_index(&self, index: u32) -> Result<LinkMessage> {
        self.handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(nl(format!("looking up link #{index}")))?
            .ok_or_else(|| KernelError::Other(format!("link #{index} vanished")))
    }

    async fn ipv4_addresses(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
        let mut out = Vec::new();
        let mut s = self.handle.address().get().execute();
        while let Some(m) = s.try_next().await.map_err(nl("listing addresses"))? {
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(v4)) = a {
                    out.push((m.header.index, *v4, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Find the underlay: the named interface, else the one holding `public_ip`, else the one
    /// the default route leaves through.
    pub async fn underlay(
        &self,
        iface: Option<&str>,
        public_ip: Option<Ipv4Addr>,
    ) -> Result<Underlay> {
        let addrs = self.ipv4_addresses().await?;
        let index = if let Some(name) = iface {
            let link = self
                .link_by_name(name)
                .await?
                .ok_or_else(|| KernelError::Other(format!("--iface {name}: no such interface")))?;
            link.header.index
        } else if let Some(ip) = public_ip {
            addrs
                .iter()
                .find(|(_, a, _)| *a == ip)
                .map(|(i, _, _)| *i)
                .ok_or_else(|| {
                    KernelError::Other(format!("--public-ip {ip}: no interface has this address"))
                })?
        } else {
            let mut routes = self
                .handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            let mut found = None;
            while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
                if r.header.destination_prefix_length == 0 && r.header.table == 254 {
                    found = r.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    });
                    if found.is_some() {
                        break;
                    }
                }
            }
            found.ok_or_else(|| {
                KernelError::Other(
                    "no default route to pick the underlay interface from; pass --iface or --public-ip"
                        .into(),
                )
            })?
        };
        let link = self.link_by_index(index).await?;
        let name = link_name(&link).unwrap_or("?").to_string();
        let addr = match public_ip {
            Some(ip) => ip,
            None => addrs
                .iter()
                .find(|(i, _, _)| *i == index)
                .map(|(_, a, _)| *a)
                .ok_or_else(|| {
                    KernelError::Other(format!("interface {name} has no IPv4 address"))
                })?,
        };
        let net = addrs
            .iter()
            .find(|(i, a, _)| *i == index && *a == addr)
            .and_then(|(_, a, len)| Ipv4Net::new(*a, *len).ok())
            .map(|n| n.trunc());
        Ok(Underlay {
            index,
            name,
            addr,
            mtu: link_mtu(&link).unwrap_or(1500),
            net,
        })
    }

    /// Create (or keep, when it already has these settings) the vxlan device, up, with the
    /// overlay MTU. An existing device is kept so that restarting keel-net drops no traffic.
    pub async fn ensure_vxlan(
        &self,
        vni: u32,
        port: u16,
        underlay: &Underlay,
    ) -> Result<OverlayDevice> {
        let name = vxlan_device(vni);
        let mtu = underlay.mtu.saturating_sub(50);
        if let Some(link) = self.link_by_name(&name).await? {
            let (kind, data) = link_info(&link);
            let matches = matches!(kind, Some(InfoKind::Vxlan))
                && match data {
                    Some(InfoData::Vxlan(v)) => {
                        v.contains(&InfoVxlan::Id(vni))
                            && v.contains(&InfoVxlan::Local(underlay.addr))
                            && v.contains(&InfoVxlan::Port(port))
                            && v.contains(&InfoVxlan::Link(underlay.index))
                    }
                    _ => false,
                }
                && link_mac(&link) == Some(vtep_mac(underlay.addr, vni));
            if matches {
                self.set_up(link.header.index, mtu).await?;
                return self.overlay_device(link.header.index).await;
            }
            tracing::info!("{name}: settings differ from the network config; recreating it");
            self.delete_link(link.header.index, &name).await?;
        }
        let msg = LinkVxlan::new(&name, vni)
            .address(vtep_mac(underlay.addr, vni).to_vec())
            .dev(underlay.index)
            .local(underlay.addr)
            .port(port)
            .learning(false)
            .mtu(mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!(
                "creating {name} (is the vxlan module available?)"
            )))?;
        let link = self
            .link_by_name(&name)
            .await?
            .ok_or_else(|| KernelError::Other(format!("{name} vanished after creation")))?;
        self.overlay_device(link.header.index).await
    }

    /// Create (or keep) the WireGuard device and give it the node's private key and port.
    pub async fn ensure_wireguard(
        &self,
        private_key: &[u8; 32],
        listen_port: u16,
        underlay: &Underlay,
    ) -> Result<OverlayDevice> {
        let mtu = underlay.mtu.saturating_sub(60);
        let index = match self.link_by_name(WG_DEVICE).await? {
            Some(link) if matches!(link_info(&link).0, Some(InfoKind::Wireguard)) => {
                link.header.index
            }
            other => {
                if let Some(link) = other {
                    self.delete_link(link.header.index, WG_DEVICE).await?;
                }
                self.handle
                    .link()
                    .add(LinkWireguard::new(WG_DEVICE).mtu(mtu).build())
                    .execute()
                    .await
                    .map_err(nl(format!(
                        "creating {WG_DEVICE} (does this kernel have WireGuard?)"
                    )))?;
                self.link_by_name(WG_DEVICE)
                    .await?
                    .ok_or_else(|| {
                        KernelError::Other(format!("{WG_DEVICE} vanished after creation"))
                    })?
                    .header
                    .index
            }
        };
        wg_set(vec![
            WireguardAttribute::IfName(WG_DEVICE.to_string()),
            WireguardAttribute::PrivateKey(*private_key),
            WireguardAttribute::ListenPort(listen_port),
        ])
        .await?;
        self.set_up(index, mtu).await?;
        self.overlay_device(index).await
    }

    async fn overlay_device(&self, index: u32) -> Result<OverlayDevice> {
        let link = self.link_by_index(index).await?;
        Ok(OverlayDevice {
            index,
            name: link_name(&link).unwrap_or("?").to_string(),
            mac: link_mac(&link),
            mtu: link_mtu(&link).unwrap_or(0),
        })
    }

    async fn set_up(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting link #{index} up")))
    }

    async fn delete_link(&self, index: u32, name: &str) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(nl(format!("deleting {name}"))(e)),
        }
    }

    /// Remove keel-net devices of backends other than the current one (after a backend change).
    pub async fn remove_other_devices(&self, keep: Option<&str>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut links = self.handle.link().get().execute();
        let mut stale = Vec::new();
        while let Some(l) = links.try_next().await.map_err(nl("listing links"))? {
            if let Some(name) = link_name(&l) {
                let ours = name == WG_DEVICE
                    || (name.starts_with("flannel.")
                        && matches!(link_info(&l).0, Some(InfoKind::Vxlan)));
                if ours && Some(name) != keep {
                    stale.push((l.header.index, name.to_string()));
                }
            }
        }
        for (index, name) in stale {
            self.delete_link(index, &name).await?;
            removed.push(name);
        }
        Ok(removed)
    }

    /// Give the overlay device exactly `addr/32`, removing any other IPv4 address it has
    /// (a previous lease's).
    pub async fn ensure_address(&self, index: u32, addr: Ipv4Addr) -> Result<Changes> {
        let mut changes = Changes::default();
        let mut have = false;
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut stale = Vec::new();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(nl("listing overlay addresses"))?
        {
            let v4 = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            });
            match v4 {
                Some(a) if a == addr && m.header.prefix_len == 32 => have = true,
                Some(_) => stale.push(m),
                None => {}
            }
        }
        for m in stale {
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(nl("removing an old overlay address"))?;
            changes.removed += 1;
        }
        if !have {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr), 32)
                .execute()
                .await
                .map_err(nl(format!("adding {addr}/32 to the overlay device")))?;
            changes.added += 1;
        }
        Ok(changes)
    }

    /// Make the kernel hold exactly the desired routes, FDB and ARP entries (vxlan), and
    /// WireGuard peers (when `mode` says they changed: replacing them resets handshakes).
    pub async fn sync(
        &self,
        desired: &Desired,
        overlay: Option<&OverlayDevice>,
        underlay: &Underlay,
        mode: SyncMode,
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        match (overlay, mode) {
            (Some(dev), SyncMode::Vxlan) => {
                changes.merge(self.sync_fdb(dev.index, &desired.fdb).await?);
                changes.merge(self.sync_neighbours(dev.index, &desired.neighbours).await?);
            }
            (Some(_), SyncMode::WireguardPeers) => {
                changes.merge(sync_wg_peers(&desired.wg_peers).await?);
            }
            _ => {}
        }
        changes.merge(
            self.sync_routes(&desired.routes, overlay.map(|d| d.index), underlay.index)
                .await?,
        );
        Ok(changes)
    }

    /// The routes keel-net installed (its protocol number, main table).
    pub async fn own_routes(&self) -> Result<Vec<RouteMessage>> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = s.try_next().await.map_err(nl("listing routes"))? {
            if r.header.protocol == RouteProtocol::Other(ROUTE_PROTO) {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn sync_routes(
        &self,
        desired: &BTreeSet<RouteSpec>,
        overlay: Option<u32>,
        underlay: u32,
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        let dev_index = |d: Dev| match d {
            Dev::Overlay => overlay,
            Dev::Underlay => Some(underlay),
        };
        // What each desired route looks like as (dst, gateway, oif).
        let wanted: BTreeMap<(Ipv4Net, Option<Ipv4Addr>, Option<u32>), &RouteSpec> = desired
            .iter()
            .map(|r| ((r.dst, r.gateway, dev_index(r.dev)), r))
            .collect();
        let mut present = BTreeSet::new();
        for r in self.own_routes().await? {
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(*a),
                _ => None,
            });
            let gw = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => Some(*a),
                _ => None,
            });
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            let key = dst
                .and_then(|d| Ipv4Net::new(d, r.header.destination_prefix_length).ok())
                .map(|d| (d, gw, oif));
            match key {
                Some(k) if wanted.contains_key(&k) => {
                    present.insert(k);
                }
                _ => {
                    match self.handle.route().del(r).execute().await {
                        Ok(()) => {}
                        Err(e) if is_missing(&e) => {}
                        Err(e) => return Err(nl("removing a stale route")(e)),
                    }
                    changes.removed += 1;
                }
            }
        }
        for (key, spec) in wanted {
            if present.contains(&key) {
                continue;
            }
            let Some(oif) = key.2 else { continue };
            tracing::debug!("route {} via {:?} dev #{oif}", spec.dst, spec.gateway);
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(spec.dst.network(), spec.dst.prefix_len())
                .output_interface(oif)
                .protocol(RouteProtocol::Other(ROUTE_PROTO));
            match spec.gateway {
                Some(gw) => b = b.gateway(gw),
                None => b = b.scope(RouteScope::Link),
            }
            let mut msg = b.build();
            if spec.onlink {
                msg.header.flags |= RouteFlags::Onlink;
            }
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(nl(format!(
                    "adding the route to {} via {}",
                    spec.dst,
                    spec.gateway
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "the overlay".into())
                )))?;
            changes.added += 1;
        }
        Ok(changes)
    }

    async fn neighbours(&self, family: AddressFamily, index: u32) -> Result<Vec<NeighbourMessage>> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(n) = s.try_next().await.map_err(nl("listing neighbours"))? {
            if n.header.ifindex == index {
                out.push(n);
            }
        }
        Ok(out)
    }

    async fn sync_neighbours(
        &self,
        index: u32,
        desired: &BTreeMap<Ipv4Addr, [u8; 6]>,
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        let mut present = BTreeSet::new();
        for n in self.neighbours(AddressFamily::Inet, index).await? {
            let dst = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(*a),
                _ => None,
            });
            let lla = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => None,
            });
            match (dst, lla) {
                (Some(d), Some(l))
                    if desired.get(&d) == Some(&l)
                        && n.header.state == NeighbourState::Permanent =>
                {
                    present.insert(d);
                }
                _ => {
                    match self.handle.neighbours().del(n).execute().await {
                        Ok(()) => {}
                        Err(e) if is_missing(&e) => {}
                        Err(e) => return Err(nl("removing a stale ARP entry")(e)),
                    }
                    changes.removed += 1;
                }
            }
        }
        for (addr, mac) in desired {
            if present.contains(addr) {
                continue;
            }
            tracing::debug!("ARP {addr} -> {}", format_mac(mac));
            self.handle
                .neighbours()
                .add(index, IpAddr::V4(*addr))
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl(format!(
                    "adding the ARP entry {addr} → {}",
                    format_mac(mac)
                )))?;
            changes.added += 1;
        }
        Ok(changes)
    }

    async fn sync_fdb(&self, index: u32, desired: &BTreeMap<[u8; 6], Ipv4Addr>) -> Result<Changes> {
        let mut changes = Changes::default();
        let mut present = BTreeSet::new();
        for n in self.neighbours(AddressFamily::Bridge, index).await? {
            let lla = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => None,
            });
            // For AF_BRIDGE entries the parser leaves the VTEP address as raw bytes.
            let dst = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(*a),
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                }
                _ => None,
            });
            // Entries without a destination are the kernel's own (e.g. the all-zero default).
            let Some(dst) = dst else { continue };
            match lla {
                Some(l) if desired.get(&l) == Some(&dst) => {
                    present.insert(l);
                }
                _ => {
                    match self.handle.neighbours().del(n).execute().await {
                        Ok(()) => {}
                        Err(e) if is_missing(&e) => {}
                        Err(e) => return Err(nl("removing a stale FDB entry")(e)),
                    }
                    changes.removed += 1;
                }
            }
        }
        for (mac, dst) in desired {
            if present.contains(mac) {
                continue;
            }
            tracing::debug!("FDB {} -> {dst}", format_mac(mac));
            self.handle
                .neighbours()
                .add_bridge(index, mac)
                .destination(IpAddr::V4(*dst))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl(format!(
                    "adding the FDB entry {} → {dst}",
                    format_mac(mac)
                )))?;
            changes.added += 1;
        }
        Ok(changes)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("wireguard netlink: {0}")]
struct WgError(String);

async fn wg_request(attributes: Vec<WireguardAttribute>) -> std::result::Result<(), WgError> {
    let (conn, mut handle, _) = genetlink::new_connection().map_err(|e| WgError(e.to_string()))?;
    let task = tokio::spawn(conn);
    let genl = GenlMessage::from_payload(WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes,
    });
    let mut msg = NetlinkMessage::from(genl);
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let result = async {
        let mut responses = handle
            .request(msg)
            .await
            .map_err(|e| WgError(format!("{e} (is the wireguard module loaded?)")))?;
        while let Some(r) = futures::StreamExt::next(&mut responses).await {
            let r = r.map_err(|e| WgError(e.to_string()))?;
            if let NetlinkPayload::Error(e) = r.payload {
                if e.code.is_some() {
                    return Err(WgError(e.to_io().to_string()));
                }
            }
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}

async fn wg_set(attributes: Vec<WireguardAttribute>) -> Result<()> {
    wg_request(attributes)
        .await
        .map_err(|e| KernelError::Other(format!("configuring {WG_DEVICE}: {e}")))
}

async fn sync_wg_peers(peers: &BTreeSet<WgPeer>) -> Result<Changes> {
    let list = peers
        .iter()
        .map(|p| {
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(p.public_key),
                WireguardPeerAttribute::Endpoint(SocketAddr::V4(p.endpoint)),
                WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                    WireguardAllowedIpAttr::IpAddr(IpAddr::V4(p.allowed.network())),
                    WireguardAllowedIpAttr::Cidr(p.allowed.prefix_len()),
                ])]),
                // 0 switches keepalives off, so a config change takes effect either way.
                WireguardPeerAttribute::PersistentKeepalive(p.keepalive),
            ])
        })
        .collect();
    wg_set(vec![
        WireguardAttribute::IfName(WG_DEVICE.to_string()),
        WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
        WireguardAttribute::Peers(list),
    ])
    .await?;
    Ok(Changes {
        added: peers.len(),
        removed: 0,
    })
}

/// A new WireGuard key pair (private, public), made with OpenSSL's X25519.
pub fn wg_keypair() -> std::result::Result<([u8; 32], [u8; 32]), String> {
    let key = openssl::pkey::PKey::generate_x25519().map_err(|e| e.to_string())?;
    let private = key.raw_private_key().map_err(|e| e.to_string())?;
    let public = key.raw_public_key().map_err(|e| e.to_string())?;
    Ok((
        private
            .try_into()
            .map_err(|_| "X25519 private key is not 32 bytes")?,
        public
            .try_into()
            .map_err(|_| "X25519 public key is not 32 bytes")?,
    ))
}

/// The public key of a WireGuard private key.
pub fn wg_public_key(private: &[u8; 32]) -> std::result::Result<[u8; 32], String> {
    let key = openssl::pkey::PKey::private_key_from_raw_bytes(private, openssl::pkey::Id::X25519)
        .map_err(|e| e.to_string())?;
    key.raw_public_key()
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|_| "X25519 public key is not 32 bytes".to_string())
}

/// What keel-net asks of the kernel: the seam its daemon's decisions are tested through
/// (`Kernel` is the netlink implementation). keel-net runs on a single-threaded runtime, so the
/// futures need not be Send.
#[allow(async_fn_in_trait)]
pub trait NetKernel {
    /// Create or keep the vxlan device.
    async fn ensure_vxlan(&self, vni: u32, port: u16, underlay: &Underlay)
        -> Result<OverlayDevice>;
    /// Create or keep the WireGuard device with this key and port.
    async fn ensure_wireguard(
        &self,
        private_key: &[u8; 32],
        listen_port: u16,
        underlay: &Underlay,
    ) -> Result<OverlayDevice>;
    /// Remove the overlay devices of other backends; their names.
    async fn remove_other_devices(&self, keep: Option<&str>) -> Result<Vec<String>>;
    /// Give the overlay device its address.
    async fn ensure_address(&self, index: u32, addr: Ipv4Addr) -> Result<Changes>;
    /// Make the kernel hold exactly the desired routes, FDB, ARP entries and peers.
    async fn sync(
        &self,
        desired: &Desired,
        overlay: Option<&OverlayDevice>,
        underlay: &Underlay,
        mode: SyncMode,
    ) -> Result<Changes>;
    /// Masquerade traffic leaving the overlay by `rule` (nftables), or remove the table.
    fn apply_masq(&self, rule: Option<&super::masq::MasqRule>) -> Result<()>;
}

impl NetKernel for Kernel {
    async fn ensure_vxlan(
        &self,
        vni: u32,
        port: u16,
        underlay: &Underlay,
    ) -> Result<OverlayDevice> {
        Kernel::ensure_vxlan(self, vni, port, underlay).await
    }
    async fn ensure_wireguard(
        &self,
        private_key: &[u8; 32],
        listen_port: u16,
        underlay: &Underlay,
    ) -> Result<OverlayDevice> {
        Kernel::ensure_wireguard(self, private_key, listen_port, underlay).await
    }
    async fn remove_other_devices(&self, keep: Option<&str>) -> Result<Vec<String>> {
        Kernel::remove_other_devices(self, keep).await
    }
    async fn ensure_address(&self, index: u32, addr: Ipv4Addr) -> Result<Changes> {
        Kernel::ensure_address(self, index, addr).await
    }
    async fn sync(
        &self,
        desired: &Desired,
        overlay: Option<&OverlayDevice>,
        underlay: &Underlay,
        mode: SyncMode,
    ) -> Result<Changes> {
        Kernel::sync(self, desired, overlay, underlay, mode).await
    }
    fn apply_masq(&self, rule: Option<&super::masq::MasqRule>) -> Result<()> {
        super::masq::apply(rule).map_err(|e| KernelError::Other(crate::error::chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_stable_unicast_and_local() {
        let a = vtep_mac(Ipv4Addr::new(10, 77, 0, 1), 1);
        assert_eq!(a, vtep_mac(Ipv4Addr::new(10, 77, 0, 1), 1));
        assert_ne!(a, vtep_mac(Ipv4Addr::new(10, 77, 0, 2), 1));
        assert_ne!(a, vtep_mac(Ipv4Addr::new(10, 77, 0, 1), 2));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn wireguard_keys() {
        let (private, public) = wg_keypair().unwrap();
        assert_eq!(wg_public_key(&private).unwrap(), public);
        assert_ne!(private, public);
    }
}
