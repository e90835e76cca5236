//! Admission end to end on the host: a verifier serving TLS on loopback, nodes whose TPMs are
//! swtpm instances driven through a boot's measurements (a UKI's sections, the phases, the
//! provisioning config), and the attacks the verifier must stop, each played from the
//! attacker's side.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::swtpm::SoftTpm;
use keel::attest::admission::{Admission, Entry, Role};
use keel::attest::protocol::{self, Answer, ChallengeOrRefusal, Evidence, Hello};
use keel::host::cluster::pki;
use keel::node::agent::boot_state::{TrustedKey, BOOT_KEY};
use keel::node::attest::session::{self, BootLogs, NodeSession, Served};
use keel::node::attest::tpm::Tpm;
use keel::node::attest::verifier::{self, Issuer, Verifier};
use keel::trust::measure;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use sha2::{Digest, Sha256};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

const CONFIG: &str = "ab";

fn config_sha() -> String {
    CONFIG.repeat(32)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn rsa() -> PKey<Private> {
    PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap()
}

fn p256() -> PKey<Private> {
    let g = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(openssl::ec::EcKey::generate(&g).unwrap()).unwrap()
}

/// A TCG2 log as OVMF writes it (Spec ID header: sha1 + sha256), then (PCR, type, digest, data).
fn tcg2_log(events: &[(u32, u32, [u8; 32], Vec<u8>)]) -> Vec<u8> {
    let mut spec = b"Spec ID Event03\0".to_vec();
    spec.extend_from_slice(&[0; 4]);
    spec.extend_from_slice(&[0, 2, 0, 2]);
    spec.extend_from_slice(&2u32.to_le_bytes());
    spec.extend_from_slice(&0x0004u16.to_le_bytes());
    spec.extend_from_slice(&20u16.to_le_bytes());
    spec.extend_from_slice(&0x000Bu16.to_le_bytes());
    spec.extend_from_slice(&32u16.to_le_bytes());
    spec.push(0);
    let mut out = Vec::new();
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&[0; 20]);
    out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
    out.extend_from_slice(&spec);
    for (pcr, ty, d, data) in events {
        out.extend_from_slice(&pcr.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&0x0004u16.to_le_bytes());
        out.extend_from_slice(&[0xAA; 20]);
        out.extend_from_slice(&0x000Bu16.to_le_bytes());
        out.extend_from_slice(d);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// How a node boots, from the attacker's menu.
#[derive(Clone, Copy, PartialEq)]
enum Boot {
    /// The operator's UKI, nothing from outside it, the config provisioned.
    Signed,
    /// The same UKI started with a command line typed at the boot menu: the stub measures it
    /// into PCR 12 before anything else.
    CommandLineOverride,
    /// A UKI whose .pcrsig was made with a key that is not the operator's.
    SignedByAnotherKey,
    /// Secure Boot off: whatever booted (the attacker's own system) extended PCR 11 by hand to
    /// the signed states, and PCR 12 to the node's config measurement.
    SecureBootOff,
    /// Secure Boot on, but db also trusts another vendor's key (whose signed loaders boot
    /// anything).
    ForeignKeyInDb,
}

/// The operator's Secure Boot db certificate every test cluster uses (DER).
fn db_der() -> Vec<u8> {
    static DB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DB.get_or_init(|| {
        let ca = pki::new_ca("keel test db", 30).unwrap();
        X509::from_pem(&ca.cert_pem).unwrap().to_der().unwrap()
    })
    .clone()
}

/// Plays a boot into `tpm` and returns the logs the node will send.
fn boot(tpm: &mut Tpm, boot_key: &PKey<Private>, how: Boot) -> BootLogs {
    boot_with_config(tpm, boot_key, how, &config_sha())
}

fn boot_with_config(tpm: &mut Tpm, boot_key: &PKey<Private>, how: Boot, config: &str) -> BootLogs {
    use keel::trust::secureboot::{
        variable_data, x509_signature_list, EV_EFI_VARIABLE_DRIVER_CONFIG,
    };
    let mut db = x509_signature_list(&db_der());
    if how == Boot::ForeignKeyInDb {
        db.extend(x509_signature_list(b"another vendor's certificate"));
    }
    let sb = if how == Boot::SecureBootOff { 0 } else { 1 };
    let mut log: Vec<(u32, u32, [u8; 32], Vec<u8>)> = Vec::new();
    for data in [variable_data("SecureBoot", &[sb]), variable_data("db", &db)] {
        let d: [u8; 32] = Sha256::digest(&data).into();
        tpm.extend(7, d).unwrap();
        log.push((7, EV_EFI_VARIABLE_DRIVER_CONFIG, d, data));
    }
    let sections = vec![measure::MeasuredSection {
        name: ".linux".into(),
        digest: Sha256::digest(b"a kernel").into(),
    }];
    let stub: Vec<[u8; 32]> = vec![Sha256::digest(b".linux\0").into(), sections[0].digest];
    if how == Boot::CommandLineOverride {
        tpm.extend(12, Sha256::digest(b"init=/bin/sh").into())
            .unwrap();
    }
    for d in &stub {
        tpm.extend(11, *d).unwrap();
        log.push((11, 0xD, *d, Vec::new()));
    }
    let words = [
        "enter-initrd",
        "keel-root-opened",
        "leave-initrd",
        "sysinit",
        "ready",
    ];
    let mut userspace = String::new();
    for w in words {
        let d: [u8; 32] = Sha256::digest(w.as_bytes()).into();
        tpm.extend(11, d).unwrap();
        userspace.push('\u{1e}');
        userspace.push_str(&format!(
            r#"{{"pcr":11,"digests":[{{"hashAlg":"sha256","digest":"{}"}}],"content_type":"systemd","content":{{"string":"{w}"}}}}"#,
            hex::encode(d)
        ));
        userspace.push('\n');
        if w == "keel-root-opened" {
            let word = keel::node::provision::measurement(config);
            tpm.extend(12, Sha256::digest(word.as_bytes()).into())
                .unwrap();
        }
    }
    let preds = measure::predict(&sections);
    let signer = match how {
        Boot::SignedByAnotherKey => rsa(),
        _ => boot_key.clone(),
    };
    let entries = measure::sign_phases(&preds, &measure::PHASES[2..], &signer).unwrap();
    BootLogs {
        firmware: tcg2_log(&log),
        userspace,
        pcrsig: measure::pcrsig_json(entries).unwrap(),
    }
}

/// The cluster: root, one issuer, the verifier's own certificate, the admission list.
struct Cluster {
    root_pem: Vec<u8>,
    issuer: Arc<Issuer>,
    boot_key: PKey<Private>,
    verifier_chain: Vec<u8>,
    verifier_key: PKey<Private>,
    admission: Mutex<Admission>,
}

impl Cluster {
    fn new() -> Cluster {
        let root = pki::new_ca("keel test root", 30).unwrap();
        let iss = pki::new_issuer(&root, "keel issuer node1", 30).unwrap();
        let issuer = Issuer {
            cert: X509::from_pem(&iss.cert_pem).unwrap(),
            key: PKey::private_key_from_pem(&iss.key_pem).unwrap(),
        };
        let verifier_key = p256();
        let csr = openssl::x509::X509Req::from_der(&session::csr("node1", &verifier_key).unwrap())
            .unwrap();
        let me = Entry {
            name: "node1".into(),
            ek_sha256: format!("sha256:{}", "0".repeat(64)),
            ip: "127.0.0.1".parse().unwrap(),
            role: Role::Member,
            config_sha256: None,
            subnet: None,
        };
        let leaf = verifier::issue_leaf(&issuer, &me, &csr, now(), now() + 3600).unwrap();
        let mut chain = leaf.to_pem().unwrap();
        chain.extend(issuer.cert.to_pem().unwrap());
        Cluster {
            root_pem: root.cert_pem.clone(),
            issuer: Arc::new(issuer),
            boot_key: rsa(),
            verifier_chain: chain,
            verifier_key,
            admission: Mutex::new(Admission {
                cluster: "test".into(),
                serial: 1,
                cert_ttl: 600,
                machines: vec![],
                deny_pcr11: vec![],
                allow_secure_boot_off: false,
            }),
        }
    }

    fn enrol(&self, name: &str, tpm: &Tpm, ip: &str) {
        let ek = keel::attest::tpm2::EkPublic::parse(tpm.ek_public()).unwrap();
        self.admission.lock().unwrap().machines.push(Entry {
            name: name.into(),
            ek_sha256: ek.sha256().unwrap(),
            ip: ip.parse().unwrap(),
            role: Role::Client,
            config_sha256: Some(config_sha()),
            subnet: None,
        });
    }

    fn keys(&self) -> Vec<TrustedKey> {
        let pem = self.boot_key.public_key_to_pem().unwrap();
        let key = PKey::public_key_from_pem(&pem).unwrap();
        vec![TrustedKey {
            file: BOOT_KEY.into(),
            fingerprint: measure::key_fingerprint(&key).unwrap(),
            key,
        }]
    }

    /// Serves `sessions` TLS sessions on loopback; returns the address and what each ended with.
    fn serve(
        self: &Arc<Self>,
        sessions: usize,
    ) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let me = Arc::clone(self);
        let handle = std::thread::spawn(move || {
            let acceptor = session::acceptor(&me.verifier_chain, &me.verifier_key).unwrap();
            let keys = me.keys();
            let mut out = Vec::new();
            for _ in 0..sessions {
                let (tcp, _) = listener.accept().unwrap();
                let mut tls = acceptor.accept(tcp).unwrap();
                let admission = me.admission.lock().unwrap().clone();
                let db = db_der();
                let v = Verifier {
                    admission: &admission,
                    keys: &keys,
                    issuer: &me.issuer,
                    name: "node1",
                    db_cert: Some(&db),
                };
                out.push(match session::serve(&mut tls, &v, now) {
                    Ok(Served::Admitted(a)) => format!("admitted {}", a.name),
                    Ok(Served::Refused { name, refusal }) => format!("refused {name}: {refusal}"),
                    Err(e) => format!("error: {e}"),
                });
            }
            out
        });
        (addr, handle)
    }
}

fn attest(c: &Cluster, addr: SocketAddr, tpm: &mut Tpm, name: &str, logs: &BootLogs) -> Answer {
    let key = p256();
    let s =
        NodeSession::start(tpm, name, &config_sha(), session::csr(name, &key).unwrap()).unwrap();
    let mut tls = session::connect(addr, &c.root_pem).unwrap();
    session::attest(&mut tls, tpm, s, logs).unwrap()
}

/// An enrolled node3 booted `how` asks a verifier for a certificate: the refusal's reason.
fn refusal_for(how: Boot) -> String {
    let c = Arc::new(Cluster::new());
    let soft = SoftTpm::start();
    let mut tpm = soft.open();
    c.enrol("node3", &tpm, "10.77.0.3");
    let logs = boot(&mut tpm, &c.boot_key, how);
    let (addr, server) = c.serve(1);
    let a = attest(&c, addr, &mut tpm, "node3", &logs);
    server.join().unwrap();
    refused(&a).to_string()
}

fn refused(a: &Answer) -> &str {
    match a {
        Answer::Refused { reason } => reason,
        Answer::Admitted { .. } => panic!("admitted, expected a refusal"),
    }
}

#[test]
fn an_enrolled_node_in_a_signed_boot_is_admitted_with_a_short_lived_leaf() {
    let c = Arc::new(Cluster::new());
    let soft = SoftTpm::start();
    let mut tpm = soft.open();
    c.enrol("node3", &tpm, "10.77.0.3");
    let logs = boot(&mut tpm, &c.boot_key, Boot::Signed);
    let (addr, server) = c.serve(1);
    let started = std::time::Instant::now();
    let answer = attest(&c, addr, &mut tpm, "node3", &logs);
    let took = started.elapsed();
    let Answer::Admitted {
        chain_pem,
        not_after,
        verifier,
    } = answer
    else {
        panic!(
            "refused: {answer:?}; verifier: {:?}",
            server.join().unwrap()
        );
    };
    // scripts/bench attest-native reads this line.
    eprintln!("admission_ms={:.1}", took.as_secs_f64() * 1000.0);
    assert_eq!(server.join().unwrap(), ["admitted node3"]);
    assert_eq!(verifier, "node1");
    let chain = X509::stack_from_pem(chain_pem.as_bytes()).unwrap();
    let root = X509::from_pem(&c.root_pem).unwrap();
    assert!(chain[0].verify(&chain[1].public_key().unwrap()).unwrap());
    assert!(chain[1].verify(&root.public_key().unwrap()).unwrap());
    let cn = chain[0]
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .unwrap()
        .data()
        .to_string()
        .unwrap();
    assert_eq!(cn, "node3");
    let ips: Vec<Vec<u8>> = chain[0]
        .subject_alt_names()
        .unwrap()
        .iter()
        .filter_map(|n| n.ipaddress().map(<[u8]>::to_vec))
        .collect();
    assert!(ips.contains(&vec![10, 77, 0, 3]), "{ips:?}");
    assert!(
        (not_after - now() - 600).abs() < 30,
        "lifetime is the list's cert-ttl"
    );
}

#[test]
fn a_machine_whose_ek_is_not_enrolled_gets_nothing() {
    let c = Arc::new(Cluster::new());
    let enrolled = SoftTpm::start();
    let intruder = SoftTpm::start();
    c.enrol("node3", &enrolled.open(), "10.77.0.3");
    let mut tpm = intruder.open();
    let logs = boot(&mut tpm, &c.boot_key, Boot::Signed);
    let (addr, server) = c.serve(2);
    // It claims the enrolled machine's name, then a name of its own.
    let a = attest(&c, addr, &mut tpm, "node3", &logs);
    assert!(refused(&a).contains("is not enrolled as node3"), "{a:?}");
    let b = attest(&c, addr, &mut tpm, "node9", &logs);
    assert!(
        refused(&b).contains("`node9` is not in the admission list"),
        "{b:?}"
    );
    let log = server.join().unwrap();
    assert!(log.iter().all(|l| l.starts_with("refused")), "{log:?}");
}

#[test]
fn the_signed_uki_with_an_overridden_command_line_is_refused() {
    let reason = refusal_for(Boot::CommandLineOverride);
    assert!(reason.contains("PCR 12"), "{reason}");
}

#[test]
fn a_boot_state_signed_by_another_key_is_refused() {
    let reason = refusal_for(Boot::SignedByAnotherKey);
    assert!(
        reason.contains("not one of the operator's keys"),
        "{reason}"
    );
}

/// The attack a signed PCR 11 alone does not stop: on an enrolled machine with Secure Boot off,
/// the attacker boots their own system and extends PCR 11 (and PCR 12) by hand to exactly the
/// values a signed boot gives, with logs to match.
#[test]
fn pcr11_forged_by_hand_on_a_machine_without_secure_boot_is_refused() {
    let reason = refusal_for(Boot::SecureBootOff);
    assert!(reason.contains("Secure Boot was off"), "{reason}");
}

#[test]
fn a_firmware_that_trusts_another_vendors_key_is_refused() {
    let reason = refusal_for(Boot::ForeignKeyInDb);
    assert!(
        reason.contains("other keys than the operator's db"),
        "{reason}"
    );
}

/// An enrolled machine booted with the signed UKI but a config of the attacker's making (one
/// that would hand the attacker the node's key): its PCR 12 is honest, but not the pinned one.
#[test]
fn an_enrolled_machine_running_another_config_is_refused() {
    let c = Arc::new(Cluster::new());
    let soft = SoftTpm::start();
    let mut tpm = soft.open();
    c.enrol("node3", &tpm, "10.77.0.3");
    let other = "cd".repeat(32);
    let logs = boot_with_config(&mut tpm, &c.boot_key, Boot::Signed, &other);
    let (addr, server) = c.serve(1);
    let key = p256();
    let s = NodeSession::start(
        &mut tpm,
        "node3",
        &other,
        session::csr("node3", &key).unwrap(),
    )
    .unwrap();
    let mut tls = session::connect(addr, &c.root_pem).unwrap();
    let a = session::attest(&mut tls, &mut tpm, s, &logs).unwrap();
    assert!(refused(&a).contains("must run config"), "{a:?}");
    server.join().unwrap();
}

#[test]
fn a_deny_listed_boot_state_is_refused() {
    let c = Arc::new(Cluster::new());
    let soft = SoftTpm::start();
    let mut tpm = soft.open();
    c.enrol("node3", &tpm, "10.77.0.3");
    let logs = boot(&mut tpm, &c.boot_key, Boot::Signed);
    let pcr11 = hex::encode(tpm.read_pcrs(&[11]).unwrap()[0]);
    c.admission.lock().unwrap().deny_pcr11.push(pcr11);
    let (addr, server) = c.serve(1);
    let a = attest(&c, addr, &mut tpm, "node3", &logs);
    assert!(refused(&a).contains("deny-listed"), "{a:?}");
    server.join().unwrap();
}

/// An attacker who recorded a genuine session (Hello and Evidence) replays it in a new
/// connection; and one who relays a genuine node's session swaps in its own key's request.
#[test]
fn replayed_evidence_and_a_swapped_request_are_refused() {
    let c = Arc::new(Cluster::new());
    let soft = SoftTpm::start();
    let mut tpm = soft.open();
    c.enrol("node3", &tpm, "10.77.0.3");
    let logs = boot(&mut tpm, &c.boot_key, Boot::Signed);
    let (addr, server) = c.serve(3);

    // Session 1, recorded.
    let key = p256();
    let s = NodeSession::start(
        &mut tpm,
        "node3",
        &config_sha(),
        session::csr("node3", &key).unwrap(),
    )
    .unwrap();
    let hello: Hello = s.hello.clone();
    let mut tls = session::connect(addr, &c.root_pem).unwrap();
    protocol::write_frame(&mut tls, &hello).unwrap();
    let ChallengeOrRefusal::Challenge(ch) = protocol::read_frame(&mut tls).unwrap() else {
        panic!("refused at hello");
    };
    let evidence: Evidence = s.evidence(&mut tpm, &ch, &logs).unwrap();
    protocol::write_frame(&mut tls, &evidence).unwrap();
    let first: Answer = protocol::read_frame(&mut tls).unwrap();
    assert!(matches!(first, Answer::Admitted { .. }), "{first:?}");

    // Session 2: the same Hello and Evidence, replayed.
    let mut tls = session::connect(addr, &c.root_pem).unwrap();
    protocol::write_frame(&mut tls, &hello).unwrap();
    let _: ChallengeOrRefusal = protocol::read_frame(&mut tls).unwrap();
    protocol::write_frame(&mut tls, &evidence).unwrap();
    let replayed: Answer = protocol::read_frame(&mut tls).unwrap();
    assert!(
        refused(&replayed).contains("not bound to this session"),
        "{replayed:?}"
    );

    // Session 3: the node answers honestly, but the Hello carried the attacker's request.
    let s = NodeSession::start(
        &mut tpm,
        "node3",
        &config_sha(),
        session::csr("node3", &key).unwrap(),
    )
    .unwrap();
    let mut swapped = s.hello.clone();
    swapped.csr = session::csr("node3", &p256()).unwrap();
    let mut tls = session::connect(addr, &c.root_pem).unwrap();
    protocol::write_frame(&mut tls, &swapped).unwrap();
    let ChallengeOrRefusal::Challenge(ch) = protocol::read_frame(&mut tls).unwrap() else {
        panic!("refused at hello");
    };
    let ev = s.evidence(&mut tpm, &ch, &logs).unwrap();
    protocol::write_frame(&mut tls, &ev).unwrap();
    let relayed: Answer = protocol::read_frame(&mut tls).unwrap();
    assert!(
        refused(&relayed).contains("not bound to this session"),
        "{relayed:?}"
    );
    server.join().unwrap();
}

/// A verifier whose certificate does not chain to the cluster's root is not talked to (a node
/// never sends evidence to whoever answers on the verifier's address).
#[test]
fn a_node_refuses_a_verifier_outside_its_cluster() {
    let c = Arc::new(Cluster::new());
    let (addr, server) = c.serve(1);
    let other = pki::new_ca("another root", 30).unwrap();
    let err = session::connect(addr, &other.cert_pem).expect_err("foreign verifier");
    assert!(
        format!("{err:#}").contains("TLS with the verifier"),
        "{err:#}"
    );
    drop(server);
}

/// `keel cluster init --ek` seals a first member's issuer to the member's TPM under the policy
/// the node's keel-attest satisfies: opened on that TPM after a boot in a signed state with
/// exactly this config provisioned, and not on another TPM or with another config.
#[test]
fn cluster_init_seals_the_issuer_to_its_members_tpm_and_config() {
    let soft = SoftTpm::start();
    let other = SoftTpm::start();
    let mut tpm = soft.open();
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let boot_key = rsa();
    std::fs::write(
        keys.join("pcr-boot.pub.pem"),
        boot_key.public_key_to_pem().unwrap(),
    )
    .unwrap();
    let ek = keel::attest::tpm2::EkPublic::parse(tpm.ek_public()).unwrap();
    std::fs::write(work.path().join("ek1.pem"), ek.pem().unwrap()).unwrap();
    std::fs::write(
        work.path().join("ek2.pem"),
        keel::attest::tpm2::EkPublic::parse(other.open().ek_public())
            .unwrap()
            .pem()
            .unwrap(),
    )
    .unwrap();
    let dir = work.path().join("cluster");
    // Issuers that cannot make a quorum on their own are refused: until etcd's auth is on no
    // other node is certified.
    let ek1 = format!("{}", work.path().join("ek1.pem").display());
    let minority = common::run(
        common::keel()
            .args(["cluster", "init", "--dir"])
            .arg(work.path().join("minority"))
            .args(["--node", "node1=10.77.0.1", "--node", "node2=10.77.0.2"])
            .args(["--node", "node3=10.77.0.3", "--issuers", "node1"])
            .args(["--trust-keys"])
            .arg(&keys)
            .arg(format!("--ek=node1={ek1}"))
            .arg(format!("--ek=node2={ek1}"))
            .arg(format!("--ek=node3={ek1}")),
    );
    let err = String::from_utf8_lossy(&minority.stderr);
    assert!(
        !minority.status.success(),
        "a minority of issuers was accepted"
    );
    assert!(err.contains("must be a majority (2)"), "{err}");
    common::ok(
        common::keel()
            .args(["cluster", "init", "--dir"])
            .arg(&dir)
            .args([
                "--node",
                "node1=10.77.0.1",
                "--node",
                "node2=10.77.0.2",
                // Two members: the issuers must make a quorum on their own.
                "--issuers",
                "node1,node2",
                "--cert-ttl",
                "600",
            ])
            .arg(format!(
                "--ek=node1={}",
                work.path().join("ek1.pem").display()
            ))
            .arg(format!(
                "--ek=node2={}",
                work.path().join("ek2.pem").display()
            ))
            .arg("--trust-keys")
            .arg(&keys),
    );
    let bytes = std::fs::read(dir.join("node1.ign")).unwrap();
    for n in ["node1.ign", "node2.ign"] {
        let text = std::fs::read_to_string(dir.join(n)).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{n} holds a private key");
    }
    let plan = keel::node::provision::config::parse(&bytes).unwrap();
    // The node's files, as provisioning would write them.
    let root = work.path().join("root");
    for f in &plan.files {
        let p = root.join(f.path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &f.contents).unwrap();
    }
    let logs = boot_with_config(&mut tpm, &boot_key, Boot::Signed, &plan.sha256);
    let sig_path = root.join(keel::node::agent::boot_state::PCRSIG);
    std::fs::create_dir_all(sig_path.parent().unwrap()).unwrap();
    std::fs::write(&sig_path, &logs.pcrsig).unwrap();
    let keys_list = vec![TrustedKey {
        file: BOOT_KEY.into(),
        fingerprint: measure::key_fingerprint(
            &PKey::public_key_from_pem(&boot_key.public_key_to_pem().unwrap()).unwrap(),
        )
        .unwrap(),
        key: PKey::public_key_from_pem(&boot_key.public_key_to_pem().unwrap()).unwrap(),
    }];
    let issuer = keel::node::attest::service::unseal_issuer(&root, &mut tpm, &keys_list)
        .expect("the member's TPM opens its issuer in the signed state with its config");
    assert!(issuer.cert.subject_name().entries().any(|e| e
        .data()
        .to_string()
        .unwrap()
        .contains("keel issuer node1")));

    // The same config on another machine: its TPM cannot import the blob.
    let mut tpm2 = other.open();
    boot_with_config(&mut tpm2, &boot_key, Boot::Signed, &plan.sha256);
    let err = keel::node::attest::service::unseal_issuer(&root, &mut tpm2, &keys_list)
        .err()
        .expect("another TPM");
    assert!(format!("{err:#}").contains("importing"), "{err:#}");

    // The member's own TPM with PCR 12 extended once more, as another config or a command line
    // from outside the UKI would.
    tpm.extend(12, Sha256::digest(b"another config").into())
        .unwrap();
    let err = keel::node::attest::service::unseal_issuer(&root, &mut tpm, &keys_list)
        .err()
        .expect("PCR 12 changed");
    assert!(format!("{err:#}").contains("unsealing"), "{err:#}");
}
