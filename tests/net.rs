#![allow(clippy::expect_used, clippy::unwrap_used)]
//! keel-net on the host, for real: network namespaces as nodes on one bridge (the underlay),
//! Debian's etcd with TLS in a namespace of its own, keel-net in each node namespace, and
//! "containers" attached by the real CNI bridge plugin using the config keel-net writes.
//! Needs root, iproute2, etcd/etcdctl and containernetworking-plugins (`scripts/host-setup`);
//! a missing tool fails the test, it does not skip it.

mod common;
use common::{ok, run, wait_until};
use keel::host::cluster::pki;
use keel::node::agent::network;
use serde_json::Value;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const HUB_IP: &str = "192.168.77.1";
const CNI_PATH: &str = "/usr/lib/cni";

fn node_ip(i: usize) -> String {
    format!("192.168.77.{}", 10 + i)
}

/// A little lab: a hub namespace with the bridge and etcd, and node namespaces.
struct Lab {
    id: String,
    dir: tempfile::TempDir,
    etcd: Option<Child>,
    daemons: Vec<Option<Child>>,
    containers: Vec<String>,
    /// The attachment of container c{i}, by node.
    attached: std::collections::HashMap<usize, network::Attachment>,
    nodes: usize,
    /// Passed as --bootstrap-config when set.
    bootstrap: Option<PathBuf>,
    /// Further keel-net arguments, by node.
    extra_args: std::collections::HashMap<usize, Vec<String>>,
}

impl Lab {
    fn new(tag: &str, nodes: usize) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "tests/net.rs needs root (network namespaces)"
        );
        for tool in ["ip", "etcd", "etcdctl", "ping"] {
            assert!(
                run(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
                    .status
                    .success(),
                "{tool} is missing: run scripts/host-setup"
            );
        }
        assert!(
            Path::new(CNI_PATH).join("bridge").exists(),
            "{CNI_PATH}/bridge missing: run scripts/host-setup"
        );
        let id = format!("kn{}{}", tag, std::process::id());
        let lab = Lab {
            dir: tempfile::tempdir().unwrap(),
            etcd: None,
            daemons: (0..=nodes).map(|_| None).collect(),
            containers: Vec::new(),
            attached: Default::default(),
            nodes,
            bootstrap: None,
            extra_args: Default::default(),
            id,
        };
        let hub = lab.ns("hub");
        ok(Command::new("ip").args(["netns", "add", &hub]));
        lab.ip(&hub, &["link", "add", "br0", "type", "bridge"]);
        lab.ip(
            &hub,
            &["addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"],
        );
        lab.ip(&hub, &["link", "set", "br0", "up"]);
        lab.ip(&hub, &["link", "set", "lo", "up"]);
        for i in 1..=nodes {
            let ns = lab.ns(&i.to_string());
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
                &format!("p{i}"),
                "netns",
                &hub,
            ]));
            lab.ip(
                &hub,
                &["link", "set", &format!("p{i}"), "master", "br0", "up"],
            );
            lab.ip(
                &ns,
                &["addr", "add", &format!("{}/24", node_ip(i)), "dev", "eth0"],
            );
            lab.ip(&ns, &["link", "set", "eth0", "up"]);
            lab.ip(&ns, &["link", "set", "lo", "up"]);
            lab.ip(&ns, &["route", "add", "default", "via", HUB_IP]);
        }
        // TLS for etcd (server) and for keel-net and etcdctl (clients).
        let ca = pki::new_ca("keel-net test CA", 2).unwrap();
        let hub_ip: IpAddr = HUB_IP.parse().unwrap();
        let server = pki::issue(&ca, "etcd", &[hub_ip], &[], 2).unwrap();
        let client = pki::issue(&ca, "client", &[], &[], 2).unwrap();
        let w = |name: &str, data: &[u8]| fs::write(lab.dir.path().join(name), data).unwrap();
        w("ca.pem", &ca.cert_pem);
        w("server.pem", &server.cert_pem);
        w("server-key.pem", &server.key_pem);
        w("client.pem", &client.cert_pem);
        w("client-key.pem", &client.key_pem);
        lab
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ip(&self, ns: &str, args: &[&str]) -> String {
        ok(Command::new("ip").arg("-n").arg(ns).args(args))
    }

    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    fn start_etcd(&mut self) {
        let log = fs::File::create(self.path("etcd.log")).unwrap();
        let p = |n: &str| self.path(n).display().to_string();
        let child = self
            .exec(&self.ns("hub"), "etcd")
            .args(["--name", "hub", "--data-dir", &p("etcd-data")])
            .args(["--listen-client-urls", &format!("https://{HUB_IP}:2379")])
            .args(["--advertise-client-urls", &format!("https://{HUB_IP}:2379")])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "hub=http://127.0.0.1:2380"])
            .args([
                "--cert-file",
                &p("server.pem"),
                "--key-file",
                &p("server-key.pem"),
            ])
            .args(["--trusted-ca-file", &p("ca.pem"), "--client-cert-auth"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd");
        self.etcd = Some(child);
        wait_until("etcd to answer", Duration::from_secs(30), || {
            self.etcdctl(&["endpoint", "health"]).status.success()
        });
    }

    fn stop_etcd(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn etcdctl(&self, args: &[&str]) -> Output {
        let p = |n: &str| self.path(n).display().to_string();
        run(self
            .exec(&self.ns("hub"), "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &format!("https://{HUB_IP}:2379")])
            .args([
                "--cacert",
                &p("ca.pem"),
                "--cert",
                &p("client.pem"),
                "--key",
                &p("client-key.pem"),
            ])
            .args(["--command-timeout", "3s"])
            .args(args))
    }

    fn put_config(&self, config: &str) {
        let out = self.etcdctl(&["put", "/coreos.com/network/config", config]);
        assert!(
            out.status.success(),
            "etcdctl put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_node(&mut self, i: usize) {
        let p = |n: String| self.path(&n).display().to_string();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("keel-net{i}.log")))
            .unwrap();
        let child = self
            .exec(&self.ns(&i.to_string()), env!("CARGO_BIN_EXE_keel-net"))
            .args(["--run-dir", &p(format!("run{i}")), "run"])
            .args(["--etcd-endpoints", &format!("https://{HUB_IP}:2379")])
            .args(["--etcd-cafile", &p("ca.pem".into())])
            .args([
                "--etcd-certfile",
                &p("client.pem".into()),
                "--etcd-keyfile",
                &p("client-key.pem".into()),
            ])
            .args(["--state-dir", &p(format!("state{i}"))])
            .args(["--subnet-file", &p(format!("subnet{i}.env"))])
            .args(["--cni-conf", &p(format!("cni{i}.conflist"))])
            .args([
                "--hostname",
                &format!("node{i}"),
                "--lease-ttl",
                "4",
                "--resync",
                "2",
            ])
            .args(
                self.bootstrap
                    .iter()
                    .flat_map(|b| [PathBuf::from("--bootstrap-config"), b.clone()]),
            )
            .args(self.extra_args.get(&i).into_iter().flatten())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("keel-net");
        self.daemons[i] = Some(child);
    }

    /// Stop node i's keel-net: SIGTERM (a clean stop) or SIGKILL (the node is gone).
    fn stop_node(&mut self, i: usize, kill: bool) {
        if let Some(mut c) = self.daemons[i].take() {
            let sig = if kill {
                nix::sys::signal::SIGKILL
            } else {
                nix::sys::signal::SIGTERM
            };
            // `ip netns exec` execs the program, so the child's pid is keel-net's.
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).unwrap();
            let _ = c.wait();
        }
    }

    fn status(&self, i: usize) -> Value {
        let out = run(self
            .exec(&self.ns(&i.to_string()), env!("CARGO_BIN_EXE_keel-net"))
            .args([
                "--run-dir",
                &self.path(&format!("run{i}")).display().to_string(),
                "status",
                "--json",
            ]));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn wait_running(&self, i: usize, peers: usize) -> Value {
        let mut last = Value::Null;
        let what = format!("node {i} to run with {peers} peer(s)");
        wait_until(&what, Duration::from_secs(30), || {
            last = self.status(i);
            last["state"] == "running" && last["peers"].as_array().map(|p| p.len()) == Some(peers)
        });
        last
    }

    fn subnet(&self, i: usize) -> String {
        self.status(i)["lease"]["subnet"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A container namespace on node i, attached the way keel-agent attaches a container: its
    /// network code ([`keel::node::agent::network`]) with the real plugins, run inside node i's
    /// namespace, reading keel-net's config from a node root of its own (the host-local
    /// reservations kept per node, as they would be on separate machines).
    fn add_container(&mut self, i: usize) -> Ipv4Addr {
        let att = self.attach(i).expect("attach");
        self.containers.push(
            att.netns
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        );
        let addr = att.addresses[0].split('/').next().unwrap().parse().unwrap();
        self.attached.insert(i, att);
        addr
    }

    fn attach_record(&self, i: usize) -> network::Attachment {
        self.attached[&i].clone()
    }

    /// The namespace keel-agent makes for container c{i} (`keel-` + its name).
    fn ctr_ns(&self, i: usize) -> String {
        format!("keel-{}", self.ns(&format!("c{i}")))
    }

    fn node_root(&self, i: usize) -> PathBuf {
        self.path(&format!("root{i}"))
    }

    /// The agent's attach of container `c{i}` inside node i's namespace.
    fn attach(&self, i: usize) -> anyhow::Result<network::Attachment> {
        let root = self.node_root(i);
        let conf_dir = root.join(network::CNI_CONF_DIR);
        fs::create_dir_all(&conf_dir).unwrap();
        let mut list: Value =
            serde_json::from_slice(&fs::read(self.path(&format!("cni{i}.conflist"))).unwrap())
                .unwrap();
        list["plugins"][0]["ipam"]["dataDir"] = Value::String(self.ipam_dir(i));
        fs::write(conf_dir.join("10-keel-net.conflist"), list.to_string()).unwrap();
        let name = self.ns(&format!("c{i}"));
        self.in_node(i, move || {
            network::attach(&root, &name, &network::RealHost)
                .map(|a| a.expect("a CNI config is there"))
        })
    }

    fn detach(&self, i: usize, att: network::Attachment) -> anyhow::Result<()> {
        self.in_node(i, move || network::detach(&att, &network::RealHost))
    }

    fn ipam_dir(&self, i: usize) -> String {
        self.path(&format!("ipam{i}")).display().to_string()
    }

    /// Runs `f` on a thread inside node i's network namespace (plugins it starts run there too).
    fn in_node<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let node = fs::File::open(format!("/run/netns/{}", self.ns(&i.to_string()))).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&node, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn ping(&self, ns: &str, target: Ipv4Addr, count: u32, interval: &str) -> Output {
        run(self.exec(ns, "ping").args([
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "2",
            &target.to_string(),
        ]))
    }

    fn reaches(&self, from_ctr: usize, to: Ipv4Addr) -> bool {
        self.ping(&self.ctr_ns(from_ctr), to, 1, "0.2")
            .status
            .success()
    }

    /// Connects by TCP from namespace `client` to `addr` (a listener in namespace `server`) and
    /// returns the source address the listener saw, or None when the connection failed.
    fn source_seen(&self, server: &str, addr: &str, client: &str) -> Option<String> {
        use std::io::BufRead;
        const LISTEN: &str = "import socket,sys\ns=socket.socket()\ns.settimeout(15)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((sys.argv[1],7777))\ns.listen()\nprint('ready',flush=True)\nc,a=s.accept()\nprint(a[0],flush=True)";
        let mut srv = self
            .exec(server, "python3")
            .args(["-c", LISTEN, addr])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 listener");
        let mut lines = std::io::BufReader::new(srv.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().and_then(|l| l.ok()).as_deref(), Some("ready"));
        let connected = run(self.exec(client, "python3").args([
            "-c",
            "import socket,sys; socket.create_connection((sys.argv[1],7777),timeout=3)",
            addr,
        ]))
        .status
        .success();
        if !connected {
            let _ = srv.kill();
            let _ = srv.wait();
            return None;
        }
        let seen = lines.next().and_then(|l| l.ok());
        let _ = srv.wait();
        seen
    }

    fn own_routes(&self, i: usize) -> String {
        self.ip(&self.ns(&i.to_string()), &["route", "show", "proto", "107"])
    }

    fn log(&self, i: usize) -> String {
        fs::read_to_string(self.path(&format!("keel-net{i}.log"))).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.daemons.len() {
            self.stop_node(i, true);
        }
        self.stop_etcd();
        if std::thread::panicking() {
            for i in 1..=self.nodes {
                eprintln!("--- keel-net{i}.log\n{}", self.log(i));
            }
        }
        let mut names: Vec<String> = self.containers.clone();
        names.push(self.ns("hub"));
        names.extend((1..=self.nodes).map(|i| self.ns(&i.to_string())));
        for ns in names {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

/// Three nodes; the config is put into etcd by hand, or (`bootstrap`) by keel-net itself.
fn three_nodes(tag: &str, config: &str, bootstrap: bool) -> (Lab, Vec<Ipv4Addr>) {
    three_nodes_with(tag, config, bootstrap, Default::default())
}

fn three_nodes_with(
    tag: &str,
    config: &str,
    bootstrap: bool,
    extra_args: std::collections::HashMap<usize, Vec<String>>,
) -> (Lab, Vec<Ipv4Addr>) {
    let mut lab = Lab::new(tag, 3);
    lab.extra_args = extra_args;
    lab.start_etcd();
    if bootstrap {
        let p = lab.path("net-config.json");
        fs::write(&p, config).unwrap();
        lab.bootstrap = Some(p);
    } else {
        lab.put_config(config);
    }
    for i in 1..=3 {
        lab.start_node(i);
    }
    for i in 1..=3 {
        lab.wait_running(i, 2);
    }
    let subnets: Vec<String> = (1..=3).map(|i| lab.subnet(i)).collect();
    let mut distinct = subnets.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "leases must differ: {subnets:?}");
    let addrs: Vec<Ipv4Addr> = (1..=3).map(|i| lab.add_container(i)).collect();
    for (i, a) in addrs.iter().enumerate() {
        let net: ipnet::Ipv4Net = subnets[i].parse().unwrap();
        assert!(
            net.contains(a),
            "container {a} of node {} outside its subnet {net}",
            i + 1
        );
    }
    (lab, addrs)
}

/// vxlan: distinct leases, containers reach each other across nodes, a restart of keel-net drops
/// no packet and keeps the subnet, and a node that stops renewing loses its routes on the others.
#[test]
fn vxlan_overlay_between_three_nodes() {
    let (mut lab, addrs) = three_nodes(
        "v",
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
        false,
    );
    for (from, to) in [(1, 3), (3, 1), (2, 3), (1, 2)] {
        assert!(
            lab.reaches(from, addrs[to - 1]),
            "container on node {from} cannot reach node {to}'s {}",
            addrs[to - 1]
        );
    }
    // Leaving the overlay (the hub routes nothing back to 10.5.0.0/16), a container's traffic
    // is masqueraded behind its node's address; between containers the source stays.
    let hub = lab.ns("hub");
    assert_eq!(
        lab.source_seen(&hub, HUB_IP, &lab.ctr_ns(1)).as_deref(),
        Some(node_ip(1).as_str()),
        "container 1 → the hub (outside the overlay)"
    );
    assert_eq!(
        lab.source_seen(&lab.ctr_ns(3), &addrs[2].to_string(), &lab.ctr_ns(1)),
        Some(addrs[0].to_string()),
        "container 1 → container 3 must keep its source address"
    );
    let s1 = lab.status(1);
    let masq = s1["ip_masq"].as_str().unwrap_or_default();
    assert!(
        masq.starts_with(&format!("ip saddr {}", lab.subnet(1))) && masq.ends_with("masquerade"),
        "{s1}"
    );
    assert_eq!(s1["device"]["name"], "flannel.1");
    assert_eq!(s1["device"]["mtu"], 1450);
    let env1 = fs::read_to_string(lab.path("subnet1.env")).unwrap();
    assert!(
        env1.contains("FLANNEL_NETWORK=10.5.0.0/16\n")
            && env1.contains("FLANNEL_MTU=1450\n")
            && env1.contains("FLANNEL_IPMASQ=true\n"),
        "{env1}"
    );

    // Restart node 2's keel-net while node 1's container pings node 2's: no loss.
    let subnet2 = lab.subnet(2);
    let ctr1 = lab.ctr_ns(1);
    let target = addrs[1];
    let pinger = std::thread::spawn({
        let lab_ns = ctr1.clone();
        move || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lab_ns,
                    "ping",
                    "-c",
                    "40",
                    "-i",
                    "0.1",
                    "-W",
                    "1",
                    &target.to_string(),
                ])
                .output()
                .unwrap()
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_node(2, false);
    std::thread::sleep(Duration::from_millis(500));
    lab.start_node(2);
    let ping = pinger.join().unwrap();
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        text.contains(" 0% packet loss"),
        "pings across a keel-net restart were lost:\n{text}"
    );
    lab.wait_running(2, 2);
    assert_eq!(
        lab.subnet(2),
        subnet2,
        "the restarted node must keep its subnet"
    );

    // Node 3 disappears without a word: after the TTL (4 s) node 1 drops its route.
    let subnet3 = lab.subnet(3);
    assert!(lab.own_routes(1).contains(&subnet3));
    lab.stop_node(3, true);
    wait_until(
        "node 3's route to disappear on node 1",
        Duration::from_secs(20),
        || !lab.own_routes(1).contains(&subnet3),
    );
    lab.wait_running(1, 1);
    assert!(
        lab.reaches(1, addrs[1]),
        "node 1 → node 2 after node 3 left"
    );
    let neigh = lab.ip(&lab.ns("1"), &["neigh", "show", "dev", "flannel.1"]);
    assert_eq!(
        neigh.lines().count(),
        1,
        "one ARP entry left (node 2): {neigh}"
    );
}

/// host-gw: plain routes through the peers' underlay addresses; the nodes store the network
/// config themselves (--bootstrap-config), as etcd starts empty. Node 1 runs with
/// --ip-masq=false: its containers reach the overlay but not the hub outside it.
#[test]
fn host_gw_overlay_between_three_nodes() {
    let config = r#"{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}"#;
    let no_masq = [(1, vec!["--ip-masq=false".to_string()])].into();
    let (lab, addrs) = three_nodes_with("h", config, true, no_masq);
    let stored = lab.etcdctl(&["get", "--print-value-only", "/coreos.com/network/config"]);
    assert_eq!(String::from_utf8_lossy(&stored.stdout).trim(), config);
    for (from, to) in [(1, 3), (3, 2), (2, 1)] {
        assert!(
            lab.reaches(from, addrs[to - 1]),
            "container on node {from} cannot reach node {to}'s {}",
            addrs[to - 1]
        );
    }
    let routes = lab.own_routes(1);
    let subnet3 = lab.subnet(3);
    assert!(
        routes.contains(&format!("{subnet3} via {} dev eth0", node_ip(3))),
        "{routes}"
    );
    assert!(lab.status(1)["device"].is_null());
    let hub = lab.ns("hub");
    assert_eq!(
        lab.source_seen(&hub, HUB_IP, &lab.ctr_ns(2)).as_deref(),
        Some(node_ip(2).as_str()),
        "container 2 → the hub, masqueraded"
    );
    assert_eq!(
        lab.source_seen(&hub, HUB_IP, &lab.ctr_ns(1)),
        None,
        "node 1 runs with --ip-masq=false: the hub cannot answer its container"
    );
    assert!(lab.status(1)["ip_masq"].is_null());
    assert!(lab.log(1).contains("not masquerading (--ip-masq=false)"));
    let env1 = fs::read_to_string(lab.path("subnet1.env")).unwrap();
    assert!(env1.contains("FLANNEL_IPMASQ=false\n"), "{env1}");

    // What a container's unit does when it stops (`keel-agent net-detach`): the plugins' DEL
    // releases the address and the namespace goes; attaching again works.
    let first = lab.attach_record(3);
    lab.detach(3, first.clone()).expect("detach");
    assert!(
        !first.netns.exists(),
        "{} left behind",
        first.netns.display()
    );
    let reserved = Path::new(&lab.ipam_dir(3))
        .join("keel-net")
        .join(addrs[2].to_string());
    assert!(!reserved.exists(), "{} still reserved", reserved.display());
    assert!(
        !lab.reaches(1, addrs[2]),
        "the detached container still answers"
    );
    let again = lab.attach(3).expect("attach again");
    assert!(again.netns.exists());
    assert!(!again.addresses.is_empty());
}

/// etcd down or a bad config in etcd: the routes stay and traffic keeps flowing; the status and
/// the log say what is wrong; fixing it brings keel-net back without a restart.
#[test]
fn outages_and_bad_config_keep_traffic() {
    let mut lab = Lab::new("f", 2);
    lab.start_etcd();
    let good = r#"{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}"#;
    lab.put_config(good);
    lab.start_node(1);
    lab.start_node(2);
    lab.wait_running(1, 1);
    lab.wait_running(2, 1);
    let a1 = lab.add_container(1);
    let a2 = lab.add_container(2);
    assert!(lab.reaches(1, a2) && lab.reaches(2, a1));
    let routes_before = lab.own_routes(1);
    assert!(
        lab.status(1)["peers"][0]["direct"].is_null(),
        "plain vxlan encapsulates"
    );

    lab.put_config(r#"{"Network":"10.7.0.0/16","Backend":{"Type":"udp"}}"#);
    wait_until("config-error on node 1", Duration::from_secs(15), || {
        lab.status(1)["state"] == "config-error"
    });
    let msg = lab.status(1)["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains("Backend.Type") && msg.contains("/coreos.com/network/config"),
        "{msg}"
    );
    assert_eq!(
        lab.own_routes(1),
        routes_before,
        "a bad config must tear nothing down"
    );
    assert!(lab.reaches(1, a2), "traffic during a bad config");
    lab.put_config(good);
    lab.wait_running(1, 1);

    lab.stop_etcd();
    wait_until(
        "etcd-unreachable on node 1",
        Duration::from_secs(30),
        || lab.status(1)["state"] == "etcd-unreachable",
    );
    assert_eq!(
        lab.own_routes(1),
        routes_before,
        "an etcd outage must tear nothing down"
    );
    assert!(
        lab.reaches(1, a2) && lab.reaches(2, a1),
        "traffic during an etcd outage"
    );
    let log = lab.log(1);
    assert_eq!(
        log.matches("etcd-unreachable").count(),
        1,
        "logged once per state change:\n{log}"
    );
    lab.start_etcd();
    lab.wait_running(1, 1);
    lab.wait_running(2, 1);
    assert!(lab.reaches(1, a2));

    // vxlan with DirectRouting: the nodes share the hub's L2 segment, so each routes the
    // other's subnet through its underlay address, without encapsulation or FDB entries.
    lab.put_config(r#"{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#);
    let subnet2 = lab.subnet(2);
    let direct = format!("{subnet2} via {} dev eth0", node_ip(2));
    wait_until(
        "node 1's direct route to node 2",
        Duration::from_secs(20),
        || lab.own_routes(1).contains(&direct),
    );
    wait_until(
        "node 1's status to call node 2 direct",
        Duration::from_secs(10),
        || lab.status(1)["peers"][0]["direct"] == true,
    );
    let fdb = lab.ip(&lab.ns("1"), &["-4", "neigh", "show", "dev", "flannel.1"]);
    assert!(
        fdb.trim().is_empty(),
        "no ARP entries for a direct peer: {fdb}"
    );
    assert!(
        lab.reaches(1, a2) && lab.reaches(2, a1),
        "containers over direct routes"
    );
}
