//! `keel cluster admission`: change who is admitted, after `keel cluster init`. Each change
//! re-signs the list with the cluster CA's key under the next serial, keeps every list it
//! replaced in `DIR/admission-history/` (so a removed machine can be restored with its pinned
//! EK and config), and writes `DIR/admission.bundle.json`, the form the verifiers take from
//! etcd (`ETCD_KEY`). Nothing here reaches the cluster: the operator publishes the bundle.

use crate::attest::admission::{is_sha256_hex, Admission, Bundle, ETCD_KEY};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What to change in the list.
#[derive(Debug, Default, Clone)]
pub struct Change {
    /// Machines to take out: no new certificate for them from any verifier.
    pub remove: Vec<String>,
    /// Machines to put back, as the newest earlier list had them (same EK, address, config).
    pub restore: Vec<String>,
    /// PCR 11 values to refuse (boot states of a withdrawn image).
    pub deny_pcr11: Vec<String>,
    /// PCR 11 values to admit again.
    pub allow_pcr11: Vec<String>,
}

impl Change {
    fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.restore.is_empty()
            && self.deny_pcr11.is_empty()
            && self.allow_pcr11.is_empty()
    }
}

pub const LIST: &str = "admission.json";
pub const BUNDLE: &str = "admission.bundle.json";
pub const HISTORY: &str = "admission-history";

fn history_file(dir: &Path, serial: u64) -> PathBuf {
    dir.join(HISTORY).join(format!("admission-{serial}.json"))
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// The list in force in `dir`, checked against the CA there: the bundle a change wrote (one
/// file, replaced atomically), else the list and signature `keel cluster init` wrote.
pub fn current(dir: &Path) -> Result<Admission> {
    let ca_pem = read(&dir.join("ca.pem"))?;
    let ca = openssl::x509::X509::from_pem(&ca_pem)
        .with_context(|| format!("{}: not a certificate", dir.join("ca.pem").display()))?;
    let key = ca.public_key()?;
    let bundle = dir.join(BUNDLE);
    if bundle.exists() {
        return Bundle::open(&read(&bundle)?, &key)
            .with_context(|| format!("{}: not a list this cluster's CA signed", bundle.display()));
    }
    let list = dir.join(LIST);
    let bytes = read(&list)?;
    let sig_path = dir.join(format!("{LIST}.sig"));
    let sig = String::from_utf8(read(&sig_path)?)
        .with_context(|| format!("{}: not text", sig_path.display()))?;
    Admission::from_signed(&bytes, &sig, &key).with_context(|| {
        format!(
            "{}: {} is not a list this cluster's CA signed (made by `keel cluster init --ek`?)",
            dir.display(),
            list.display()
        )
    })
}

/// The newest list in the history (below serial `below`) that names `name`.
fn last_entry(dir: &Path, name: &str, below: u64) -> Result<crate::attest::admission::Entry> {
    let hist = dir.join(HISTORY);
    let mut serials: Vec<u64> = std::fs::read_dir(&hist)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            n.strip_prefix("admission-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .filter(|&s| s < below)
        .collect();
    serials.sort_unstable_by(|a, b| b.cmp(a));
    for serial in serials {
        let p = history_file(dir, serial);
        let a: Admission = serde_json::from_slice(&read(&p)?)
            .with_context(|| format!("{}: not a list", p.display()))?;
        if let Some(e) = a.entry(name) {
            return Ok(e.clone());
        }
    }
    bail!(
        "--restore {name}: no earlier list in {} names it (add a new machine with `keel cluster init` or `add-node`)",
        hist.display()
    )
}

/// Applies `change` to the list in `dir`, signs it as the next serial and writes the list, its
/// signature, the bundle and the history. Returns the new list.
pub fn change(dir: &Path, change: &Change) -> Result<Admission> {
    if change.is_empty() {
        bail!("nothing to change: give --remove, --restore, --deny-pcr11 or --allow-pcr11");
    }
    if let Some(n) = change.remove.iter().find(|n| change.restore.contains(n)) {
        bail!("{n}: both --remove and --restore; give one");
    }
    let old = current(dir)?;
    let key_path = dir.join("ca-key.pem");
    let ca_key = openssl::pkey::PKey::private_key_from_pem(&read(&key_path)?)
        .with_context(|| format!("{}: not a private key", key_path.display()))?;
    let mut new = old.clone();
    for name in &change.remove {
        let before = new.machines.len();
        new.machines.retain(|m| &m.name != name);
        if new.machines.len() == before {
            bail!(
                "--remove {name}: not in the admission list (serial {}); it names {}",
                old.serial,
                names(&old)
            );
        }
    }
    for name in &change.restore {
        if new.entry(name).is_some() {
            bail!(
                "--restore {name}: already in the admission list (serial {})",
                old.serial
            );
        }
        new.machines.push(last_entry(dir, name, old.serial + 1)?);
    }
    for v in &change.deny_pcr11 {
        if !is_sha256_hex(v) {
            bail!("--deny-pcr11 {v}: not a PCR value (64 lower-case hex digits, as `keel inspect` prints the PCR 11 predictions)");
        }
        if !new.deny_pcr11.contains(v) {
            new.deny_pcr11.push(v.clone());
        }
    }
    for v in &change.allow_pcr11 {
        let before = new.deny_pcr11.len();
        new.deny_pcr11.retain(|d| d != v);
        if new.deny_pcr11.len() == before {
            bail!("--allow-pcr11 {v}: not deny-listed (serial {})", old.serial);
        }
    }
    new.serial = old
        .serial
        .checked_add(1)
        .context("the admission list's serial cannot rise further")?;
    let (bytes, sig) = new.sign(&ca_key)?;
    let bundle = serde_json::to_vec_pretty(&Bundle::new(&bytes, &sig)?)?;
    // The history first (the list being replaced, then the new one), so that nothing in force
    // is ever missing from it; then the bundle and the list, each replaced atomically.
    let hist = dir.join(HISTORY);
    std::fs::create_dir_all(&hist).with_context(|| format!("creating {}", hist.display()))?;
    let prev = history_file(dir, old.serial);
    if !prev.exists() {
        let mut before = serde_json::to_vec_pretty(&old)?;
        before.push(b'\n');
        crate::atomic::write(&prev, &before, 0o644)
            .with_context(|| format!("keeping serial {} in {}", old.serial, prev.display()))?;
    }
    crate::atomic::write(&history_file(dir, new.serial), &bytes, 0o644)?;
    // The bundle is what is in force from here on (`current` reads it first); the list and
    // signature beside it follow, for people and tools that read those.
    crate::atomic::write(&dir.join(BUNDLE), &bundle, 0o644)?;
    crate::atomic::write(&dir.join(LIST), &bytes, 0o644)?;
    crate::atomic::write(
        &dir.join(format!("{LIST}.sig")),
        format!("{sig}\n").as_bytes(),
        0o644,
    )?;
    Ok(new)
}

fn names(a: &Admission) -> String {
    a.machines
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `keel cluster admission` prints after a change.
pub fn summary(dir: &Path, old: &Admission, new: &Admission) -> String {
    let gone: Vec<&str> = old
        .machines
        .iter()
        .filter(|m| new.entry(&m.name).is_none())
        .map(|m| m.name.as_str())
        .collect();
    let back: Vec<&str> = new
        .machines
        .iter()
        .filter(|m| old.entry(&m.name).is_none())
        .map(|m| m.name.as_str())
        .collect();
    let mut out = format!(
        "{}: admission list serial {} signed (was {}): machines {}",
        dir.display(),
        new.serial,
        old.serial,
        names(new)
    );
    if !gone.is_empty() {
        out.push_str(&format!("; removed {}", gone.join(", ")));
    }
    if !back.is_empty() {
        out.push_str(&format!("; restored {}", back.join(", ")));
    }
    let ctl = format!(
        "etcdctl --endpoints https://MEMBER:2379 --cacert {d}/ca.pem --cert {d}/admin.pem --key {d}/admin-key.pem",
        d = dir.display()
    );
    out.push_str(&format!(
        "; {} deny-listed PCR 11 value(s)\npublish it (verifiers take it within {} s):\n  {ctl} put {ETCD_KEY} < {}\n",
        new.deny_pcr11.len(),
        crate::node::attest::service::ADMISSION_POLL.as_secs(),
        dir.join(BUNDLE).display()
    ));
    // etcd checks a user's role at every request: taking it away cuts connections a removed
    // machine already has open, which its certificate's expiry does not.
    for name in &gone {
        out.push_str(&format!(
            "to cut {name}'s open etcd connections now, not when its certificate expires:\n  {ctl} user revoke-role {name} {}\n",
            crate::node::attest::etcd_auth::role_name(name)
        ));
    }
    for name in &back {
        out.push_str(&format!(
            "if {name}'s etcd role was taken away, give it back:\n  {ctl} user grant-role {name} {}\n",
            crate::node::attest::etcd_auth::role_name(name)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::admission::{Entry, Role};

    fn cluster(dir: &Path) -> Admission {
        let ca = crate::host::cluster::pki::new_ca("test", 1).expect("ca");
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).expect("ca");
        std::fs::write(dir.join("ca-key.pem"), &ca.key_pem).expect("key");
        let a = Admission {
            cluster: String::new(),
            serial: 1,
            cert_ttl: 120,
            machines: (1..=3)
                .map(|i| Entry {
                    name: format!("node{i}"),
                    ek_sha256: format!("sha256:{}", i.to_string().repeat(64)),
                    ip: format!("10.77.0.{i}").parse().expect("ip"),
                    role: Role::Member,
                    config_sha256: Some(format!("{i}").repeat(64)),
                    subnet: None,
                })
                .collect(),
            deny_pcr11: vec![],
            allow_secure_boot_off: false,
        };
        let key = openssl::pkey::PKey::private_key_from_pem(&ca.key_pem).expect("key");
        let (bytes, sig) = a.sign(&key).expect("sign");
        std::fs::write(dir.join(LIST), bytes).expect("list");
        std::fs::write(dir.join(format!("{LIST}.sig")), sig).expect("sig");
        a
    }

    fn opened(dir: &Path) -> Admission {
        let ca = openssl::x509::X509::from_pem(&std::fs::read(dir.join("ca.pem")).expect("ca"))
            .expect("ca");
        let bundle = std::fs::read(dir.join(BUNDLE)).expect("bundle");
        Bundle::open(&bundle, &ca.public_key().expect("key")).expect("a bundle the CA signed")
    }

    #[test]
    fn removing_and_restoring_a_machine_raises_the_serial_and_keeps_its_pins() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        let first = cluster(dir);
        let removed = change(
            dir,
            &Change {
                remove: vec!["node3".into()],
                ..Change::default()
            },
        )
        .expect("remove");
        assert_eq!(removed.serial, 2);
        assert!(removed.entry("node3").is_none());
        assert_eq!(opened(dir), removed, "the bundle is the list in force");
        assert_eq!(current(dir).expect("current"), removed);
        let text = summary(dir, &first, &removed);
        assert!(
            text.contains("removed node3")
                && text.contains(ETCD_KEY)
                && text.contains("user revoke-role node3 node-node3"),
            "{text}"
        );

        let back = change(
            dir,
            &Change {
                restore: vec!["node3".into()],
                ..Change::default()
            },
        )
        .expect("restore");
        assert_eq!(back.serial, 3);
        assert_eq!(
            back.entry("node3"),
            first.entry("node3"),
            "same EK, address, config"
        );
        assert!(history_file(dir, 1).is_file() && history_file(dir, 2).is_file());
    }

    #[test]
    fn a_wrong_change_names_what_is_wrong_and_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        cluster(dir);
        let before = std::fs::read(dir.join(LIST)).expect("list");
        for (c, want) in [
            (Change::default(), "nothing to change"),
            (
                Change {
                    remove: vec!["node9".into()],
                    ..Change::default()
                },
                "--remove node9: not in the admission list (serial 1); it names node1, node2, node3",
            ),
            (
                Change {
                    restore: vec!["node1".into()],
                    ..Change::default()
                },
                "already in the admission list",
            ),
            (
                Change {
                    restore: vec!["node9".into()],
                    ..Change::default()
                },
                "no earlier list",
            ),
            (
                Change {
                    deny_pcr11: vec!["AB".repeat(32)],
                    ..Change::default()
                },
                "not a PCR value",
            ),
            (
                Change {
                    allow_pcr11: vec!["ab".repeat(32)],
                    ..Change::default()
                },
                "not deny-listed",
            ),
        ] {
            let e = format!("{:#}", change(dir, &c).expect_err(want));
            assert!(e.contains(want), "{e}");
        }
        assert_eq!(std::fs::read(dir.join(LIST)).expect("list"), before);
        assert!(!dir.join(BUNDLE).exists());

        // A list someone edited by hand is not re-signed.
        let mut edited = before.clone();
        let i = edited.iter().position(|b| *b == b'1').expect("digit");
        edited[i] = b'2';
        std::fs::write(dir.join(LIST), &edited).expect("edit");
        let e = format!(
            "{:#}",
            change(
                dir,
                &Change {
                    remove: vec!["node3".into()],
                    ..Change::default()
                }
            )
            .expect_err("edited")
        );
        assert!(e.contains("is not a list this cluster's CA signed"), "{e}");
    }
}
