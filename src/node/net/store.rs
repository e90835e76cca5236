//! keel-net's view of etcd: the network config, the subnet leases, and a watch on both.

use super::lease::{self, Lease, LeaseAttrs};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, OpenSslClientConfig, PutOptions, Txn,
    TxnOp, WatchOptions, WatchStream,
};
use ipnet::Ipv4Net;
use std::path::PathBuf;
use std::time::Duration;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, `https://…` when TLS files are given.
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Key prefix, flannel's `/coreos.com/network` by default.
    pub prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd ({endpoints}): {what}")]
    Etcd {
        endpoints: String,
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("reading {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, StoreError>;

pub struct Store {
    client: Client,
    opts: EtcdOptions,
}

/// The leases found under the prefix, the entries that are not leases, and the revision read.
pub struct LeaseList {
    pub leases: Vec<Lease>,
    pub invalid: Vec<String>,
    pub revision: i64,
}

/// The result of trying to take a subnet.
#[derive(Debug, PartialEq)]
pub enum Acquired {
    /// The key is ours, attached to this etcd lease.
    Yes { lease_id: i64 },
    /// Another node holds it.
    Taken,
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| StoreError::File {
        path: path.clone(),
        source,
    })
}

impl Store {
    pub async fn connect(opts: &EtcdOptions) -> Result<Store> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if opts.ca_file.is_some() || opts.cert_file.is_some() {
            let mut tls = OpenSslClientConfig::default();
            if let Some(ca) = &opts.ca_file {
                tls = tls.ca_cert_pem(&read(ca)?);
            }
            match (&opts.cert_file, &opts.key_file) {
                (Some(c), Some(k)) => {
                    // The certificate file may hold a chain (an attested node's leaf, then the
                    // issuer that signed it): etcd knows only the root, so the issuer is sent too.
                    let (chain, key) = (read(c)?, read(k)?);
                    tls = tls.manually(move |b| {
                        let mut certs = openssl::x509::X509::stack_from_pem(&chain)?.into_iter();
                        if let Some(leaf) = certs.next() {
                            b.set_certificate(&leaf)?;
                        }
                        for extra in certs {
                            b.add_extra_chain_cert(extra)?;
                        }
                        let key = openssl::pkey::PKey::private_key_from_pem(&key)?;
                        b.set_private_key(&key)?;
                        Ok(())
                    });
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Other(
                        "--etcd-certfile and --etcd-keyfile go together".into(),
                    ))
                }
            }
            connect = connect.with_openssl_tls(tls);
        }
        let client = Client::connect(&opts.endpoints, Some(connect))
            .await
            .map_err(|source| StoreError::Etcd {
                endpoints: opts.endpoints.join(","),
                what: "connecting".into(),
                source,
            })?;
        let mut store = Store {
            client,
            opts: opts.clone(),
        };
        // Connecting is lazy; one read proves the endpoint answers and the TLS material works.
        store.get(&store.config_key()).await?;
        Ok(store)
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> StoreError {
        let endpoints = self.opts.endpoints.join(",");
        let what = what.into();
        move |source| StoreError::Etcd {
            endpoints,
            what,
            source,
        }
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.opts.prefix.trim_end_matches('/'))
    }

    pub fn prefix(&self) -> &str {
        &self.opts.prefix
    }

    /// The connected etcd client, for what the lease store does not cover (users and roles).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// One key's value, if it is set.
    pub async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let what = format!("reading {key}");
        let r = self.client.get(key, None).await.map_err(self.err(what))?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// The network config document, if one is stored.
    pub async fn config(&mut self) -> Result<Option<String>> {
        let key = self.config_key();
        Ok(self
            .get(&key)
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub async fn leases(&mut self) -> Result<LeaseList> {
        let prefix = lease::subnets_prefix(&self.opts.prefix);
        let r = self
            .client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err(format!("listing {prefix}")))?;
        let mut leases = Vec::new();
        let mut invalid = Vec::new();
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            match lease::parse(&self.opts.prefix, &key, kv.value()) {
                Ok(l) => leases.push(l),
                Err(e) => invalid.push(e),
            }
        }
        Ok(LeaseList {
            leases,
            invalid,
            revision: r.header().map(|h| h.revision()).unwrap_or(0),
        })
    }

    /// Take `subnet` for a node with `attrs`, attached to a new etcd lease of `ttl` seconds.
    /// A key that already holds a lease with the same public address (this node's own lease
    /// from before a restart) is taken over.
    pub async fn acquire(
        &mut self,
        subnet: &Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Acquired> {
        let key = lease::key(&self.opts.prefix, subnet);
        let value = serde_json::to_vec(attrs).map_err(|e| StoreError::Other(e.to_string()))?;
        let grant = self
            .client
            .lease_grant(ttl.as_secs().max(1) as i64, None)
            .await
            .map_err(self.err("granting a lease"))?;
        let lease_id = grant.id();
        let put = TxnOp::put(
            key.as_str(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease_id)),
        );
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([put.clone()]);
        let r = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("creating {key}")))?;
        if r.succeeded() {
            return Ok(Acquired::Yes { lease_id });
        }
        // Someone holds it: ours from before a restart?
        let existing = self
            .client
            .get(key.as_str(), None)
            .await
            .map_err(self.err(format!("reading {key}")))?;
        if let Some(kv) = existing.kvs().first() {
            let same_node = serde_json::from_slice::<LeaseAttrs>(kv.value())
                .map(|a| a.public_ip == attrs.public_ip)
                .unwrap_or(false);
            if same_node {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([put]);
                let r = self
                    .client
                    .txn(txn)
                    .await
                    .map_err(self.err(format!("taking over {key}")))?;
                if r.succeeded() {
                    return Ok(Acquired::Yes { lease_id });
                }
            }
        }
        let _ = self.client.lease_revoke(lease_id).await;
        Ok(Acquired::Taken)
    }

    /// Store `value` at `key` unless the key exists; true when this call stored it.
    pub async fn put_if_absent(&mut self, key: &str, value: &str) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let r = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("creating {key}")))?;
        Ok(r.succeeded())
    }

    /// Renew an etcd lease once; returns the remaining TTL in seconds, 0 or less when it expired.
    pub async fn renew(&mut self, lease_id: i64) -> Result<i64> {
        let (mut keeper, mut stream) = self
            .client
            .lease_keep_alive(lease_id)
            .await
            .map_err(self.err("renewing the lease"))?;
        keeper
            .keep_alive()
            .await
            .map_err(self.err("renewing the lease"))?;
        match stream
            .message()
            .await
            .map_err(self.err("renewing the lease"))?
        {
            Some(r) => Ok(r.ttl()),
            None => Err(StoreError::Other(
                "etcd closed the lease keep-alive stream".into(),
            )),
        }
    }

    /// Watch everything under the prefix (config and leases) from `revision` on.
    pub async fn watch(&mut self, revision: i64) -> Result<WatchStream> {
        let prefix = format!("{}/", self.opts.prefix.trim_end_matches('/'));
        self.client
            .watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision),
                ),
            )
            .await
            .map_err(self.err(format!("watching {prefix}")))
    }
}

/// One batch of changes a watch reports: whether etcd cancelled the watch, and the keys that
/// were put or deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchBatch {
    pub canceled: bool,
    pub changes: Vec<KeyChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    pub key: Vec<u8>,
    pub deleted: bool,
    /// The new value of a put (empty for a delete).
    pub value: Vec<u8>,
}

/// What keel-net needs from etcd (flannel's key layout): the seam its daemon's decisions are
/// tested through. keel-net runs on a single-threaded runtime, so the futures need not be Send.
#[allow(async_fn_in_trait)]
pub trait LeaseStore {
    type Watch: WatchChanges;
    /// The network config's key (`PREFIX/config`).
    fn config_key(&self) -> String;
    /// The key prefix (`/coreos.com/network`).
    fn prefix(&self) -> &str;
    /// The network config's text, if there is one.
    async fn config(&mut self) -> Result<Option<String>>;
    /// Every lease under the prefix.
    async fn leases(&mut self) -> Result<LeaseList>;
    /// Take `subnet`, attached to a new etcd lease of `ttl`.
    async fn acquire(
        &mut self,
        subnet: &Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Acquired>;
    /// Put `value` at `key` unless the key exists; whether it was put.
    async fn put_if_absent(&mut self, key: &str, value: &str) -> Result<bool>;
    /// Renew an etcd lease; its remaining TTL (0 or less: gone).
    async fn renew(&mut self, lease_id: i64) -> Result<i64>;
    /// Watch everything under the prefix from `revision` on.
    async fn watch(&mut self, revision: i64) -> Result<Self::Watch>;
}

/// A watch's changes, batch by batch; `None` when etcd ended the watch.
#[allow(async_fn_in_trait)]
pub trait WatchChanges {
    async fn next(&mut self) -> Result<Option<WatchBatch>>;
}

/// A watch on the real etcd.
pub struct EtcdWatch(WatchStream);

impl WatchChanges for EtcdWatch {
    async fn next(&mut self) -> Result<Option<WatchBatch>> {
        let msg = self
            .0
            .message()
            .await
            .map_err(|e| StoreError::Other(format!("watch: {e}")))?;
        Ok(msg.map(|r| WatchBatch {
            canceled: r.canceled(),
            changes: r
                .events()
                .iter()
                .filter_map(|e| {
                    e.kv().map(|kv| KeyChange {
                        key: kv.key().to_vec(),
                        deleted: e.event_type() == etcd_client::EventType::Delete,
                        value: kv.value().to_vec(),
                    })
                })
                .collect(),
        }))
    }
}

impl LeaseStore for Store {
    type Watch = EtcdWatch;
    fn config_key(&self) -> String {
        Store::config_key(self)
    }
    fn prefix(&self) -> &str {
        Store::prefix(self)
    }
    async fn config(&mut self) -> Result<Option<String>> {
        Store::config(self).await
    }
    async fn leases(&mut self) -> Result<LeaseList> {
        Store::leases(self).await
    }
    async fn acquire(
        &mut self,
        subnet: &Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Acquired> {
        Store::acquire(self, subnet, attrs, ttl).await
    }
    async fn put_if_absent(&mut self, key: &str, value: &str) -> Result<bool> {
        Store::put_if_absent(self, key, value).await
    }
    async fn renew(&mut self, lease_id: i64) -> Result<i64> {
        Store::renew(self, lease_id).await
    }
    async fn watch(&mut self, revision: i64) -> Result<EtcdWatch> {
        Store::watch(self, revision).await.map(EtcdWatch)
    }
}
