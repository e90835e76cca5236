#![allow(clippy::expect_used, clippy::unwrap_used)]
//! The etcd procedures of docs/etcd.md, run for real on the host with the configs
//! `keel cluster init` / `add-node` make: each node is a network namespace holding the node's
//! address, and etcd runs with the environment and TLS files from that node's Ignition config
//! (paths moved under a temporary root). Debian 12's etcd here is 3.4; the image has 3.5; the
//! commands used are the same in both. Needs root, iproute2, etcd and etcdctl.

mod common;
use common::{ok, run, wait_until};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

struct Cluster {
    id: String,
    dir: tempfile::TempDir,
    etcd: BTreeMap<String, Child>,
    namespaces: Vec<String>,
}

impl Cluster {
    fn new() -> Cluster {
        assert!(
            nix::unistd::geteuid().is_root(),
            "tests/etcd_cluster.rs needs root"
        );
        let c = Cluster {
            id: format!("ke{}", std::process::id()),
            dir: tempfile::tempdir().unwrap(),
            etcd: BTreeMap::new(),
            namespaces: Vec::new(),
        };
        let hub = format!("{}-hub", c.id);
        ok(Command::new("ip").args(["netns", "add", &hub]));
        ok(Command::new("ip").args(["-n", &hub, "link", "add", "br0", "type", "bridge"]));
        ok(Command::new("ip").args(["-n", &hub, "link", "set", "br0", "up"]));
        c
    }

    fn keel(&self, args: &[&str]) -> String {
        ok(Command::new(env!("CARGO_BIN_EXE_keel")).args(args))
    }

    fn cfg_dir(&self) -> String {
        self.dir.path().join("cluster").display().to_string()
    }

    fn root(&self, name: &str) -> PathBuf {
        self.dir.path().join("roots").join(name)
    }

    /// A namespace for node `n` (10.77.0.n) on the hub's bridge.
    fn add_host(&mut self, n: u8) {
        let ns = format!("{}-{n}", self.id);
        let hub = format!("{}-hub", self.id);
        ok(Command::new("ip").args(["netns", "add", &ns]));
        ok(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &format!("p{n}"),
            "netns",
            &hub,
        ]));
        ok(Command::new("ip").args([
            "-n",
            &hub,
            "link",
            "set",
            &format!("p{n}"),
            "master",
            "br0",
            "up",
        ]));
        ok(Command::new("ip").args([
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.77.0.{n}/24"),
            "dev",
            "eth0",
        ]));
        ok(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]));
        ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        self.namespaces.push(ns);
    }

    /// Unpack node `name`'s Ignition files under its root; return etcd's environment from it.
    fn provision(&self, name: &str) -> Vec<(String, String)> {
        let text = fs::read(Path::new(&self.cfg_dir()).join(format!("{name}.ign"))).unwrap();
        let plan = keel::node::provision::config::parse(&text).unwrap();
        let root = self.root(name);
        for f in &plan.files {
            let p = root.join(f.path.trim_start_matches('/'));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, &f.contents).unwrap();
        }
        let env = fs::read_to_string(root.join("etc/keel/etcd.env")).unwrap();
        env.lines()
            .filter(|l| !l.starts_with('#') && l.contains('='))
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                let v = v
                    .replace("/etc/keel/", &format!("{}/etc/keel/", root.display()))
                    .replace(
                        "/var/lib/etcd/",
                        &format!("{}/var/lib/etcd/", root.display()),
                    );
                (k.to_string(), v)
            })
            .collect()
    }

    fn start(&mut self, name: &str, n: u8, env: &[(String, String)]) {
        let log = fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &format!("{}-{n}", self.id), "etcd"])
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd");
        self.etcd.insert(name.to_string(), child);
    }

    fn stop(&mut self, name: &str) {
        if let Some(mut c) = self.etcd.remove(name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// etcdctl from node n's namespace with the admin certificate `keel cluster init` made.
    fn etcdctl(&self, n: u8, endpoints: &str, args: &[&str]) -> Output {
        let d = self.cfg_dir();
        run(Command::new("ip")
            .args(["netns", "exec", &format!("{}-{n}", self.id), "etcdctl"])
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoints, "--command-timeout", "5s"])
            .args([
                "--cacert",
                &format!("{d}/ca.pem"),
                "--cert",
                &format!("{d}/admin.pem"),
                "--key",
                &format!("{d}/admin-key.pem"),
            ])
            .args(args))
    }

    fn ctl_ok(&self, n: u8, endpoints: &str, args: &[&str]) -> String {
        let out = self.etcdctl(n, endpoints, args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let names: Vec<String> = self.etcd.keys().cloned().collect();
        for n in names {
            self.stop(&n);
        }
        if std::thread::panicking() {
            for e in fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if e.path().extension().map(|x| x == "log").unwrap_or(false) {
                    let t = fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = t.lines().rev().take(15).collect();
                    eprintln!(
                        "--- {}\n{}",
                        e.path().display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        self.namespaces.push(format!("{}-hub", self.id));
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

const ALL3: &str = "https://10.77.0.1:2379,https://10.77.0.2:2379,https://10.77.0.3:2379";

/// Bootstrap three members, add a fourth, remove one, take a snapshot and restore it into a
/// new one-member cluster: the procedures of docs/etcd.md with keel's generated configs.
#[test]
fn bootstrap_add_remove_backup_restore() {
    let mut c = Cluster::new();
    let dir = c.cfg_dir();
    c.keel(&[
        "cluster",
        "init",
        "--dir",
        &dir,
        "--node",
        "node1=10.77.0.1",
        "--node",
        "node2=10.77.0.2",
        "--node",
        "node3=10.77.0.3",
        // The etcd procedures, not admission (tests/attest_*.rs): keys in the configs.
        "--keys-in-configs",
    ]);
    for n in 1..=3u8 {
        c.add_host(n);
        let env = c.provision(&format!("node{n}"));
        c.start(&format!("node{n}"), n, &env);
    }
    wait_until("three healthy members", Duration::from_secs(60), || {
        c.etcdctl(1, ALL3, &["endpoint", "health"]).status.success()
    });
    assert!(c
        .ctl_ok(1, ALL3, &["put", "/k/before-backup", "v1"])
        .contains("OK"));
    // TLS is required: plain HTTP and a client without a certificate get nothing.
    let plain = run(Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}-1", c.id),
            "etcdctl",
            "--endpoints",
            "http://10.77.0.1:2379",
            "--command-timeout",
            "3s",
            "put",
            "/k/plain",
            "x",
        ])
        .env("ETCDCTL_API", "3"));
    assert!(!plain.status.success(), "plain HTTP must be refused");

    // Backup.
    let snap = c.dir.path().join("backup.db");
    c.ctl_ok(
        1,
        "https://10.77.0.1:2379",
        &["snapshot", "save", &snap.display().to_string()],
    );
    assert!(c
        .ctl_ok(1, ALL3, &["put", "/k/after-backup", "v2"])
        .contains("OK"));

    // Add a member: announce it, issue its config, start it; it catches up.
    // etcd refuses reconfiguration until all members have been connected for a few seconds.
    wait_until("member add to be accepted", Duration::from_secs(30), || {
        c.etcdctl(
            1,
            ALL3,
            &[
                "member",
                "add",
                "node4",
                "--peer-urls=https://10.77.0.4:2380",
            ],
        )
        .status
        .success()
    });
    c.keel(&[
        "cluster",
        "add-node",
        "--dir",
        &dir,
        "--node",
        "node4=10.77.0.4",
    ]);
    c.add_host(4);
    let env4 = c.provision("node4");
    assert!(env4
        .iter()
        .any(|(k, v)| k == "ETCD_INITIAL_CLUSTER_STATE" && v == "existing"));
    c.start("node4", 4, &env4);
    wait_until("node4 to serve the data", Duration::from_secs(60), || {
        let o = c.etcdctl(
            4,
            "https://10.77.0.4:2379",
            &[
                "get",
                "--consistency=s",
                "--print-value-only",
                "/k/after-backup",
            ],
        );
        String::from_utf8_lossy(&o.stdout).trim() == "v2"
    });
    let members = c.ctl_ok(4, "https://10.77.0.4:2379", &["member", "list"]);
    assert_eq!(members.lines().count(), 4, "{members}");

    // Remove a member.
    let id3 = members
        .lines()
        .find(|l| l.contains("node3"))
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .to_string();
    c.ctl_ok(1, "https://10.77.0.1:2379", &["member", "remove", &id3]);
    c.stop("node3");
    let members = c.ctl_ok(1, "https://10.77.0.1:2379", &["member", "list"]);
    assert_eq!(members.lines().count(), 3, "{members}");
    assert!(!members.contains("node3"));
    // Removing the leader triggers an election: the write goes through once it is over.
    wait_until("a write after the removal", Duration::from_secs(30), || {
        c.etcdctl(
            1,
            "https://10.77.0.1:2379",
            &["put", "/k/after-remove", "v3"],
        )
        .status
        .success()
    });

    // Disaster: every member gone. Restore the snapshot into a new one-member cluster on node1.
    for n in ["node1", "node2", "node4"] {
        c.stop(n);
    }
    let mut env = c.provision("node1");
    let data = c.root("node1").join("var/lib/etcd/restored");
    let out = run(Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "snapshot",
            "restore",
            &snap.display().to_string(),
            "--name",
            "node1",
        ])
        .args([
            "--initial-cluster",
            "node1=https://10.77.0.1:2380",
            "--initial-advertise-peer-urls",
            "https://10.77.0.1:2380",
        ])
        .args([
            "--initial-cluster-token",
            "keel-restored",
            "--data-dir",
            &data.display().to_string(),
        ]));
    assert!(
        out.status.success(),
        "snapshot restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (k, v) in env.iter_mut() {
        match k.as_str() {
            "ETCD_DATA_DIR" => *v = data.display().to_string(),
            "ETCD_INITIAL_CLUSTER" => *v = "node1=https://10.77.0.1:2380".into(),
            _ => {}
        }
    }
    c.start("node1", 1, &env);
    wait_until("the restored member", Duration::from_secs(60), || {
        c.etcdctl(1, "https://10.77.0.1:2379", &["endpoint", "health"])
            .status
            .success()
    });
    let got = c.ctl_ok(1, "https://10.77.0.1:2379", &["get", "--prefix", "/k/"]);
    assert!(got.contains("/k/before-backup\nv1"), "{got}");
    assert!(
        !got.contains("after-backup"),
        "the restore holds the snapshot's state: {got}"
    );
    let members = c.ctl_ok(1, "https://10.77.0.1:2379", &["member", "list"]);
    assert_eq!(members.lines().count(), 1, "{members}");
}
