//! IP masquerading for containers' traffic that leaves the overlay (flannel's `--ip-masq`).
//!
//! A container's address belongs to the overlay network, which nothing outside the cluster
//! routes back to: without masquerading, a container reaches other nodes' containers but not
//! a registry, a resolver or any host on the underlay that is not a node. keel-net owns one
//! nftables table, `ip keel-net`, with one NAT chain on the post-routing hook:
//!
//! ```text
//! table ip keel-net {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr <node subnet> ip daddr != <network> ip daddr != 224.0.0.0/4 masquerade
//!     }
//! }
//! ```
//!
//! Traffic between containers (destination inside the overlay network) keeps its source
//! address, so a container sees its peers' real addresses; multicast is left alone. The table
//! is replaced in one netlink transaction (add, delete, add), so there is no moment without
//! the rule; replacing it leaves the kernel's connection tracking, which holds the translations
//! of connections already made, as it is.

use ipnet::Ipv4Net;
use nftnl::{
    nft_expr, Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, Policy, ProtoFamily,
};
use nftnl::{Rule, Table};
use std::ffi::CStr;
use std::net::Ipv4Addr;

/// The table keel-net owns.
pub const TABLE: &CStr = c"keel-net";
const CHAIN: &CStr = c"postrouting";
/// nftables' `srcnat` priority.
const SRCNAT_PRIORITY: i32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("{what} (does the kernel have nf_tables with NAT? run keel-net with --ip-masq=false to go without masquerading)")]
    Netlink {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What gets masqueraded: packets from `source` to anywhere outside `keep` (and not multicast).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqRule {
    pub source: Ipv4Net,
    pub keep: Vec<Ipv4Net>,
}

/// The rule for a node: its containers' subnet, the overlay network and multicast kept.
pub fn rule_for(subnet: &Ipv4Net, network: &Ipv4Net) -> MasqRule {
    MasqRule {
        source: subnet.trunc(),
        keep: vec![
            network.trunc(),
            Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 4).unwrap_or_default(),
        ],
    }
}

impl MasqRule {
    /// As `nft list table` would print the rule (status and logs).
    pub fn describe(&self) -> String {
        let keep: Vec<String> = self
            .keep
            .iter()
            .map(|n| format!("ip daddr != {n}"))
            .collect();
        format!("ip saddr {} {} masquerade", self.source, keep.join(" "))
    }
}

/// The transaction that makes the table hold exactly `rule` (or, with `None`, removes it).
/// The table is added first so that deleting it cannot fail when it is not there yet.
fn batch(rule: Option<&MasqRule>) -> FinalizedBatch {
    let mut batch = Batch::new();
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    if let Some(r) = rule {
        batch.add(&table, MsgType::Add);
        let mut chain = Chain::new(CHAIN, &table);
        chain.set_type(ChainType::Nat);
        chain.set_hook(Hook::PostRouting, SRCNAT_PRIORITY);
        chain.set_policy(Policy::Accept);
        batch.add(&chain, MsgType::Add);
        let mut masq = Rule::new(&chain);
        masq.add_expr(&nft_expr!(payload ipv4 saddr));
        masq.add_expr(&nft_expr!(bitwise mask r.source.netmask(), xor 0u32));
        masq.add_expr(&nft_expr!(cmp == r.source.network()));
        for keep in &r.keep {
            masq.add_expr(&nft_expr!(payload ipv4 daddr));
            masq.add_expr(&nft_expr!(bitwise mask keep.netmask(), xor 0u32));
            masq.add_expr(&nft_expr!(cmp != keep.network()));
        }
        masq.add_expr(&nft_expr!(masquerade));
        batch.add(&masq, MsgType::Add);
    }
    batch.finalize()
}

/// Apply (or with `None` remove) the masquerading rule in the current network namespace.
pub fn apply(rule: Option<&MasqRule>) -> Result<(), MasqError> {
    let err = |what| move |source| MasqError::Netlink { what, source };
    let batch = batch(rule);
    let socket =
        mnl::Socket::new(mnl::Bus::Netfilter).map_err(err("opening a netfilter socket"))?;
    let portid = socket.portid();
    socket
        .send_all(&batch)
        .map_err(err("sending the nftables transaction"))?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    let what = if rule.is_some() {
        "installing table ip keel-net"
    } else {
        "removing table ip keel-net"
    };
    // The kernel acknowledges each message of the transaction, or reports the first failure.
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..]).map_err(err(what))? {
            let message = message.map_err(err(what))?;
            let Some(seq) = expected.next() else { break };
            mnl::cb_run(message, seq, portid).map_err(err(what))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_masquerades_the_node_subnet_to_outside_the_network() {
        let r = rule_for(
            &"10.5.80.1/24".parse().unwrap(),
            &"10.5.0.0/16".parse().unwrap(),
        );
        assert_eq!(r.source, "10.5.80.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(
            r.describe(),
            "ip saddr 10.5.80.0/24 ip daddr != 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade"
        );
    }
}
