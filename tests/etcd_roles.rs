#![allow(clippy::expect_used, clippy::unwrap_used)]
//! Least privilege in etcd, against a real etcd (Debian's, on loopback, TLS with client
//! certificates as the cluster's members run it): the first issuer's bootstrap makes the users
//! and roles from the admission list and enables auth; then a node's certificate writes its own
//! lease and records and nothing else, keel-net's own lease code works under those rights, the
//! operator's admin certificate administers, and revoking a node's role cuts even a connection
//! it already has open. Needs etcd.

mod common;
use common::wait_until;
use keel::attest::admission::{Admission, Entry, Role};
use keel::host::cluster::pki::{self, CertPair};
use keel::node::attest::etcd_auth::{self, Bootstrap};
use keel::node::net::store::{Acquired, EtcdOptions, Store};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const NET: &str = "/coreos.com/network";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Etcd {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "--- etcd.log\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write");
    p
}

fn start_etcd(ca: &CertPair) -> Etcd {
    let dir = tempfile::tempdir().expect("tmp");
    let server = pki::issue(
        ca,
        "etcd",
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        &["localhost"],
        1,
    )
    .expect("server cert");
    let d = dir.path();
    let ca_file = write(d, "ca.pem", &ca.cert_pem);
    let cert = write(d, "server.pem", &server.cert_pem);
    let key = write(d, "server-key.pem", &server.key_pem);
    let (client, peer) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(d.join("etcd.log")).expect("log");
    let child = Command::new("etcd")
        .args(["--name", "e1", "--data-dir"])
        .arg(d.join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("e1={peer_url}")])
        .arg("--cert-file")
        .arg(&cert)
        .arg("--key-file")
        .arg(&key)
        .arg("--trusted-ca-file")
        .arg(&ca_file)
        .arg("--client-cert-auth")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("etcd (package etcd-server) must be installed");
    Etcd { child, url, dir }
}

fn opts(etcd: &Etcd, ca: &CertPair, who: &CertPair, name: &str) -> EtcdOptions {
    let d = etcd.dir.path();
    EtcdOptions {
        endpoints: vec![etcd.url.clone()],
        ca_file: Some(write(d, "ca.pem", &ca.cert_pem)),
        cert_file: Some(write(d, &format!("{name}.pem"), &who.cert_pem)),
        key_file: Some(write(d, &format!("{name}-key.pem"), &who.key_pem)),
        prefix: NET.into(),
    }
}

fn entry(i: u8) -> Entry {
    Entry {
        name: format!("node{i}"),
        ek_sha256: format!("sha256:{}", i.to_string().repeat(64)),
        ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, i)),
        role: Role::Member,
        config_sha256: None,
        subnet: Some(format!("10.5.{i}.0/24").parse().expect("subnet")),
    }
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, etcd_client::Error>) {
    match r {
        Err(e) if etcd_auth::permission_denied(&e) => {}
        other => panic!("{what}: expected etcd to refuse (permission denied), got {other:?}"),
    }
}

#[test]
fn a_node_certificate_holds_its_own_role_and_no_more() {
    let ca = pki::new_ca("test cluster CA", 1).expect("ca");
    let cert = |cn: &str| pki::issue(&ca, cn, &[], &[], 1).expect("cert");
    let (node1, node2, admin) = (cert("node1"), cert("node2"), cert("admin"));
    let etcd = start_etcd(&ca);
    let admission = Admission {
        cluster: String::new(),
        serial: 1,
        cert_ttl: 120,
        machines: vec![entry(1), entry(2)],
        deny_pcr11: vec![],
        allow_secure_boot_off: false,
    };
    admission.check().expect("a valid list");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let o1 = opts(&etcd, &ca, &node1, "node1");
    wait_until("etcd to answer", Duration::from_secs(30), || {
        rt.block_on(Store::connect(&o1)).is_ok()
    });
    rt.block_on(async {
        // The first issuer, root while auth is off, sets everything up.
        let mut s1 = Store::connect(&o1).await.expect("node1");
        let config = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
        let done = etcd_auth::bootstrap(s1.client(), &admission, NET, Some(config))
            .await
            .expect("bootstrap");
        assert_eq!(done, Bootstrap::Enabled { users: 4 });
        // Run again (a restart, a cold start): auth is on, node1 is no longer root.
        let again = etcd_auth::bootstrap(s1.client(), &admission, NET, Some(config))
            .await
            .expect("second run");
        assert_eq!(again, Bootstrap::AlreadyOn);

        let mut s2 = Store::connect(&opts(&etcd, &ca, &node2, "node2"))
            .await
            .expect("node2 connects and reads the config");
        assert_eq!(s2.config().await.expect("read").as_deref(), Some(config));

        // keel-net's own lease code: node2 takes its assigned subnet; node1's is not writable.
        let attrs = keel::node::net::lease::LeaseAttrs {
            public_ip: Ipv4Addr::new(10, 77, 0, 2),
            backend_type: "vxlan".into(),
            backend_data: serde_json::json!({}),
            hostname: Some("node2".into()),
        };
        let mine = entry(2).subnet.unwrap();
        assert!(matches!(
            s2.acquire(&mine, &attrs, Duration::from_secs(30))
                .await
                .expect("own lease"),
            Acquired::Yes { .. }
        ));
        let theirs = entry(1).subnet.unwrap();
        let stolen = s2.acquire(&theirs, &attrs, Duration::from_secs(30)).await;
        assert!(
            format!("{:?}", stolen.as_ref().err()).contains("permission denied"),
            "node2 took node1's subnet: {stolen:?}"
        );
        assert!(s2.leases().await.expect("list").leases.len() == 1);

        let c2 = s2.client();
        c2.put("/keel/nodes/node2/probe", "ok", None)
            .await
            .expect("own records");
        denied(
            "node1's records",
            c2.put("/keel/nodes/node1/probe", "x", None).await,
        );
        denied(
            "the network config",
            c2.put(format!("{NET}/config"), "{}", None).await,
        );
        denied(
            "the admission list",
            c2.put(keel::attest::admission::ETCD_KEY, "x", None).await,
        );
        denied("a new user", c2.user_add("intruder", "", None).await);
        denied("node2 made root", c2.user_grant_role("node2", "root").await);
        denied("auth off", c2.auth_disable().await);
        let members = c2.member_list().await.expect("member list is open to all");
        let id = members.members()[0].id();
        denied("member removal", c2.member_remove(id).await);
        denied(
            "a member added",
            c2.member_add(["https://10.77.0.9:2380"], None).await,
        );

        // The operator administers: the network config, and cutting node2 off at once, even
        // on the connection node2 already has open (etcd checks the role at every request).
        let mut sa = Store::connect(&opts(&etcd, &ca, &admin, "admin"))
            .await
            .expect("admin");
        let ca_client = sa.client();
        ca_client
            .put(format!("{NET}/config"), config, None)
            .await
            .expect("admin writes the config");
        ca_client
            .user_revoke_role("node2", etcd_auth::role_name("node2"))
            .await
            .expect("revoke");
        let c2 = s2.client();
        denied(
            "node2 after its role was revoked",
            c2.get("/keel/nodes/node2/probe", None).await,
        );
    });
}
