//! Least privilege in etcd for an attested cluster. etcd, with client-certificate
//! authentication and auth enabled, takes a certificate's CN as the user: every machine in the
//! admission list gets a user of its name and a role that lets it read the network config, the
//! leases, the published admission list and the other nodes' records, and write only its own
//! lease key (its subnet is assigned in the list, so the key is known in advance) and its own
//! records under `/keel/nodes/NAME/`. `root` and the operator's `admin` hold the root role:
//! only they change membership, users, roles, the network config or the admission list.
//!
//! The first issuer sets this up once, while auth is still off (every certificate is root
//! then), right after etcd has quorum; `bootstrap` is idempotent and stops at once when auth is
//! already on.

use crate::attest::admission::Admission;
use etcd_client::{Client, Permission, UserAddOptions};
use ipnet::Ipv4Net;

/// Where each node keeps its own records (`/keel/nodes/NAME/`).
pub const NODES_PREFIX: &str = "/keel/nodes/";
/// The published admission list and anything else of the attestation's.
pub const ATTEST_PREFIX: &str = "/keel/attest/";
/// The operator's user: `keel cluster init` writes its certificate (`admin.pem`).
pub const ADMIN: &str = "admin";

/// One permission of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub key: String,
    /// The key is a prefix (every key under it).
    pub prefix: bool,
    pub write: bool,
}

impl Grant {
    fn read_prefix(key: &str) -> Grant {
        Grant {
            key: key.into(),
            prefix: true,
            write: false,
        }
    }

    fn permission(&self) -> Permission {
        let p = if self.write {
            Permission::read_write(self.key.as_str())
        } else {
            Permission::read(self.key.as_str())
        };
        if self.prefix {
            p.with_prefix()
        } else {
            p
        }
    }
}

pub fn role_name(machine: &str) -> String {
    format!("node-{machine}")
}

/// The etcd key of the lease for `subnet` under keel-net's `net_prefix`.
pub fn lease_key(net_prefix: &str, subnet: &Ipv4Net) -> String {
    crate::node::net::lease::key(net_prefix, subnet)
}

/// What machine `name` may do: read the network's keys, the attestation's and the nodes'
/// records; write its own records and, when the list assigns it a subnet, that one lease key.
pub fn grants(name: &str, subnet: Option<&Ipv4Net>, net_prefix: &str) -> Vec<Grant> {
    let net = format!("{}/", net_prefix.trim_end_matches('/'));
    let mut g = vec![
        Grant::read_prefix(&net),
        Grant::read_prefix(ATTEST_PREFIX),
        Grant::read_prefix(NODES_PREFIX),
        Grant {
            key: format!("{NODES_PREFIX}{name}/"),
            prefix: true,
            write: true,
        },
    ];
    if let Some(s) = subnet {
        g.push(Grant {
            key: lease_key(net_prefix, s),
            prefix: false,
            write: true,
        });
    }
    g
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("etcd: {what}: {source}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
}

/// What `bootstrap` found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Auth was already on (this certificate is no longer root): nothing to do.
    AlreadyOn,
    /// Users and roles made, the network config stored (if it was missing), auth enabled.
    Enabled { users: usize },
}

/// etcd's refusal of an operation this user may not do ("etcdserver: permission denied").
pub fn permission_denied(e: &etcd_client::Error) -> bool {
    e.to_string().contains("permission denied")
}

fn already_exists(e: &etcd_client::Error) -> bool {
    e.to_string().contains("already exists")
}

/// Makes the users and roles for every machine in `admission`, stores `net_config` at
/// `NET_PREFIX/config` when no config is there yet (only root may write it once auth is on),
/// and enables auth. Run with a certificate that is root because auth is still off.
pub async fn bootstrap(
    client: &mut Client,
    admission: &Admission,
    net_prefix: &str,
    net_config: Option<&str>,
) -> Result<Bootstrap, AuthError> {
    let err = |what: String| move |source| AuthError::Etcd { what, source };
    // With auth on, listing roles needs the root role this certificate no longer has.
    match client.role_list().await {
        Ok(_) => {}
        Err(e) if permission_denied(&e) => return Ok(Bootstrap::AlreadyOn),
        Err(e) => return Err(err("listing roles".into())(e)),
    }
    if let Some(cfg) = net_config {
        let key = format!("{}/config", net_prefix.trim_end_matches('/'));
        let txn = etcd_client::Txn::new()
            .when([etcd_client::Compare::create_revision(
                key.as_str(),
                etcd_client::CompareOp::Equal,
                0,
            )])
            .and_then([etcd_client::TxnOp::put(key.as_str(), cfg, None)]);
        client
            .txn(txn)
            .await
            .map_err(err(format!("storing the network config at {key}")))?;
    }
    for user in ["root", ADMIN] {
        add_user(client, user).await?;
        client
            .user_grant_role(user, "root")
            .await
            .map_err(err(format!("granting {user} the root role")))?;
    }
    for m in &admission.machines {
        let role = role_name(&m.name);
        match client.role_add(role.as_str()).await {
            Ok(_) => {}
            Err(e) if already_exists(&e) => {}
            Err(e) => return Err(err(format!("adding role {role}"))(e)),
        }
        for g in grants(&m.name, m.subnet.as_ref(), net_prefix) {
            client
                .role_grant_permission(role.as_str(), g.permission())
                .await
                .map_err(err(format!("granting {role} {}", g.key)))?;
        }
        add_user(client, &m.name).await?;
        client
            .user_grant_role(m.name.as_str(), role.as_str())
            .await
            .map_err(err(format!("granting {} the role {role}", m.name)))?;
    }
    client
        .auth_enable()
        .await
        .map_err(err("enabling auth".into()))?;
    Ok(Bootstrap::Enabled {
        users: admission.machines.len() + 2,
    })
}

async fn add_user(client: &mut Client, name: &str) -> Result<(), AuthError> {
    match client
        .user_add(name, "", Some(UserAddOptions::new().with_no_pwd()))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if already_exists(&e) => Ok(()),
        Err(source) => Err(AuthError::Etcd {
            what: format!("adding user {name}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_writes_only_its_lease_key_and_its_own_records() {
        let subnet: Ipv4Net = "10.5.3.0/24".parse().expect("net");
        let g = grants("node3", Some(&subnet), "/coreos.com/network");
        let writes: Vec<(&str, bool)> = g
            .iter()
            .filter(|g| g.write)
            .map(|g| (g.key.as_str(), g.prefix))
            .collect();
        assert_eq!(
            writes,
            [
                ("/keel/nodes/node3/", true),
                ("/coreos.com/network/subnets/10.5.3.0-24", false)
            ],
            "no prefix write outside its own records; its lease is one exact key"
        );
        let reads: Vec<&str> = g
            .iter()
            .filter(|g| !g.write)
            .map(|g| g.key.as_str())
            .collect();
        assert_eq!(
            reads,
            ["/coreos.com/network/", "/keel/attest/", "/keel/nodes/"]
        );
        // "node1" must not be a prefix of "node10"'s records: the prefix ends with `/`.
        assert!(grants("node1", None, "/coreos.com/network")
            .iter()
            .all(|g| !g.write || g.key.ends_with('/')));
    }
}
