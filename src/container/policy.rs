//! What a node requires before it runs a container: the policy shipped in the image (under
//! /usr, so dm-verity protects it) and the operator-signed list of enrolled machines.
//!
//! The policy (`/usr/lib/keel/containers/policy.json`) names the public keys allowed to sign
//! images, whether the boot must match a PCR 11 policy the operator signed, and whether a node
//! that finds no enrolled-machines list may run anything. The list of enrolled machines holds
//! the sha256 of each machine's TPM endorsement key (EK) and a serial number; it is signed like a
//! cosign blob (`machines.json` + `machines.json.sig`, base64 ECDSA P-256 over the file's bytes)
//! by a container-signing key, so it can reach nodes without rebuilding the image (Ignition,
//! the spool, later the cluster store). A node takes the valid list with the highest serial
//! among the image's copy and /var's; a list whose signature does not verify stops everything.

use super::signature::{self, TrustedKey};
use base64::Engine;
use openssl::pkey::{PKey, Private};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

/// Where the image's container policy lives (relative to the node's root).
pub const POLICY_DIR: &str = "usr/lib/keel/containers";
pub const POLICY_FILE: &str = "policy.json";
/// The enrolled-machines list an image may carry (relative to [`POLICY_DIR`]).
pub const IMAGE_MACHINES: &str = "machines.json";
/// The enrolled-machines list delivered to a node after it was built.
pub const NODE_MACHINES: &str = "var/lib/keel/machines.json";
/// The highest list serial a node has accepted (in the sealed root): a list never goes back.
pub const HIGH_WATER: &str = "var/lib/keel/machines.high-water";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Policy {
    /// Public key files (PEM, ECDSA P-256), relative to the policy directory.
    pub keys: Vec<String>,
    /// Run containers only when PCR 11 matches a policy the operator signed.
    pub require_trusted_boot: bool,
    /// Refuse to run anything when no enrolled-machines list is present.
    pub require_enrolled_machines: bool,
    /// The cluster this image is for: an enrolled-machines list must name it.
    #[serde(default)]
    pub cluster: String,
    /// Let an image run its process as root (uid 0). Without it an image that names no user
    /// runs as nobody (65534), and one that names root is refused.
    #[serde(default)]
    pub allow_root: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: the signature ({sig}) does not verify with any container-signing key of this image: refusing all containers until a validly signed list replaces it")]
    BadListSignature { path: PathBuf, sig: PathBuf },
}

/// The policy and its keys, loaded from a node's root.
pub struct LoadedPolicy {
    pub policy: Policy,
    pub keys: Vec<TrustedKey>,
    pub dir: PathBuf,
}

fn file_err(path: &Path, reason: impl Into<String>) -> PolicyError {
    PolicyError::File {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Loads `/usr/lib/keel/containers/policy.json` and its keys under `root`.
pub fn load(root: &Path) -> Result<LoadedPolicy, PolicyError> {
    let dir = root.join(POLICY_DIR);
    let p = dir.join(POLICY_FILE);
    let text = fs::read_to_string(&p).map_err(|e| {
        file_err(
            &p,
            format!(
                "{e}: this image carries no container policy (build it with a [containers] table)"
            ),
        )
    })?;
    let policy: Policy = serde_json::from_str(&text).map_err(|e| file_err(&p, e.to_string()))?;
    if policy.keys.is_empty() {
        return Err(file_err(&p, "`keys` is empty: no image could ever verify"));
    }
    let mut keys = Vec::new();
    for k in &policy.keys {
        let kp = dir.join(k);
        let pem = fs::read(&kp).map_err(|e| file_err(&kp, e.to_string()))?;
        keys.push(TrustedKey::from_pem(k, &pem).map_err(|e| file_err(&kp, e.to_string()))?);
    }
    Ok(LoadedPolicy { policy, keys, dir })
}

/// One enrolled machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Machine {
    pub name: String,
    /// `sha256:<hex>` of the EK public key (DER SubjectPublicKeyInfo), as `keel-agent ek-hash`
    /// prints it.
    pub ek_sha256: String,
}

/// The enrolled-machines list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Machines {
    /// The cluster the list is for (the image policy's `cluster`); a node of another cluster
    /// refuses it.
    #[serde(default)]
    pub cluster: String,
    /// Raised on every change; a node never goes back to a lower serial than one it accepted.
    pub serial: u64,
    pub machines: Vec<Machine>,
}

impl Machines {
    pub fn contains(&self, ek: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.ek_sha256 == ek)
    }

    /// Adds (or renames) a machine; raises the serial.
    pub fn add(&mut self, name: &str, ek: &str) -> Result<(), String> {
        check_ek(ek)?;
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(format!(
                "machine name `{name}`: 1 to 64 printable characters"
            ));
        }
        self.machines
            .retain(|m| m.ek_sha256 != ek && m.name != name);
        self.machines.push(Machine {
            name: name.into(),
            ek_sha256: ek.into(),
        });
        self.machines.sort_by(|a, b| a.name.cmp(&b.name));
        self.serial += 1;
        Ok(())
    }

    /// Removes a machine by name or EK hash; raises the serial. Returns whether one was removed.
    pub fn remove(&mut self, what: &str) -> bool {
        let before = self.machines.len();
        self.machines
            .retain(|m| m.name != what && m.ek_sha256 != what);
        let removed = self.machines.len() != before;
        if removed {
            self.serial += 1;
        }
        removed
    }
}

/// `sha256:<64 lowercase hex>`.
pub fn check_ek(ek: &str) -> Result<(), String> {
    if super::oci::digest_hex(ek).is_none() {
        return Err(format!(
            "`{ek}` is not an EK hash (sha256:<64 lowercase hex digits>, as `keel-agent ek-hash` prints)"
        ));
    }
    Ok(())
}

/// The signature file next to a list.
pub fn sig_path(list: &Path) -> PathBuf {
    let mut s = list.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Reads and verifies a signed list; `Ok(None)` when the list file does not exist.
pub fn read_signed(list: &Path, keys: &[TrustedKey]) -> Result<Option<Machines>, PolicyError> {
    let bytes = match fs::read(list) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err(list, e.to_string())),
    };
    let sp = sig_path(list);
    let sig = fs::read_to_string(&sp).map_err(|e| {
        file_err(
            list,
            format!("no signature next to it ({}: {e})", sp.display()),
        )
    })?;
    if !verify_blob(&bytes, &sig, keys) {
        return Err(PolicyError::BadListSignature {
            path: list.into(),
            sig: sp,
        });
    }
    let m: Machines = serde_json::from_slice(&bytes).map_err(|e| file_err(list, e.to_string()))?;
    for x in &m.machines {
        check_ek(&x.ek_sha256).map_err(|e| file_err(list, e))?;
    }
    Ok(Some(m))
}

/// Whether `sig` (base64 DER ECDSA, cosign sign-blob's output) verifies `bytes` with any key.
pub fn verify_blob(bytes: &[u8], sig: &str, keys: &[TrustedKey]) -> bool {
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(sig.trim()) else {
        return false;
    };
    signature::signed_by(bytes, &raw, keys).is_some()
}

/// Writes a list and its signature (each through a temporary file and a rename).
pub fn write_signed(list: &Path, m: &Machines, key: &PKey<Private>) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut bytes = serde_json::to_vec_pretty(m)?;
    bytes.push(b'\n');
    let sig = signature::sign(&bytes, key).context("signing the list")?;
    super::oci::atomic_write(list, &bytes)?;
    super::oci::atomic_write(&sig_path(list), format!("{sig}\n").as_bytes())?;
    Ok(())
}

/// Which list governs a node: the valid one with the highest serial among the image's and the
/// node's. Any list present with a bad signature is an error (fail closed).
pub fn effective_machines(
    root: &Path,
    loaded: &LoadedPolicy,
) -> Result<Option<(Machines, PathBuf)>, PolicyError> {
    let mut best: Option<(Machines, PathBuf)> = None;
    for p in [loaded.dir.join(IMAGE_MACHINES), root.join(NODE_MACHINES)] {
        if let Some(m) = read_signed(&p, &loaded.keys)? {
            if best.as_ref().is_none_or(|(b, _)| m.serial > b.serial) {
                best = Some((m, p));
            }
        }
    }
    Ok(best)
}

/// Checks the governing list against the highest serial this node accepted before and the
/// image's cluster, and records a higher serial. An older list (a revoked machine restored), a
/// list that vanished after one was in force, or a list for another cluster is an error.
pub fn check_list(
    root: &Path,
    loaded: &LoadedPolicy,
    list: Option<(&Machines, &Path)>,
) -> Result<(), String> {
    let hw_path = root.join(HIGH_WATER);
    let seen: u64 = match fs::read_to_string(&hw_path) {
        Ok(t) => t.trim().parse().map_err(|e| {
            format!(
                "{}: not a serial ({e}); restore it or reinstall the node",
                hw_path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("reading {}: {e}", hw_path.display())),
    };
    let Some((m, from)) = list else {
        if seen > 0 {
            return Err(format!(
                "an enrolled-machines list with serial {seen} was in force on this node and now there is none ({}); put the newest list back",
                root.join(NODE_MACHINES).display()
            ));
        }
        return Ok(());
    };
    if m.cluster != loaded.policy.cluster {
        return Err(format!(
            "the enrolled-machines list {} is for cluster `{}`, this image is for `{}`",
            from.display(),
            m.cluster,
            loaded.policy.cluster
        ));
    }
    if m.serial < seen {
        return Err(format!(
            "the enrolled-machines list {} has serial {}, older than serial {seen} which this node accepted before: a list never goes back (put the newest list back)",
            from.display(),
            m.serial
        ));
    }
    if m.serial > seen {
        crate::atomic::write(&hw_path, format!("{}\n", m.serial).as_bytes(), 0o600)
            .map_err(|e| format!("recording the list's serial: {}", crate::error::chain(&e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(policy: &Policy) -> (tempfile::TempDir, PKey<Private>) {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join(POLICY_DIR);
        fs::create_dir_all(&dir).expect("dir");
        let k = signature::generate_key().expect("key");
        fs::write(dir.join("ops.pub.pem"), k.public_key_to_pem().expect("pem")).expect("pub");
        fs::write(
            dir.join(POLICY_FILE),
            serde_json::to_vec(policy).expect("json"),
        )
        .expect("policy");
        (t, k)
    }

    fn policy() -> Policy {
        Policy {
            keys: vec!["ops.pub.pem".into()],
            require_trusted_boot: true,
            require_enrolled_machines: false,
            cluster: "test".into(),
            allow_root: false,
        }
    }

    const EK1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const EK2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn signed_lists_are_read_and_the_highest_serial_wins() {
        let (t, k) = setup(&policy());
        let loaded = load(t.path()).expect("policy");
        assert!(effective_machines(t.path(), &loaded)
            .expect("none")
            .is_none());
        let mut m = Machines::default();
        m.add("n1", EK1).expect("add");
        write_signed(&loaded.dir.join(IMAGE_MACHINES), &m, &k).expect("write");
        m.add("n2", EK2).expect("add");
        let node = t.path().join(NODE_MACHINES);
        fs::create_dir_all(node.parent().expect("parent")).expect("dir");
        write_signed(&node, &m, &k).expect("write");
        let (got, from) = effective_machines(t.path(), &loaded)
            .expect("ok")
            .expect("some");
        assert_eq!(got.serial, 2);
        assert_eq!(from, node);
        assert!(got.contains(EK2).is_some());
        // An older list in /var does not replace the image's newer one.
        let mut old = Machines::default();
        old.add("n1", EK1).expect("add");
        write_signed(&node, &old, &k).expect("write");
        let mut newer = m.clone();
        newer.serial = 5;
        write_signed(&loaded.dir.join(IMAGE_MACHINES), &newer, &k).expect("write");
        let (got, _) = effective_machines(t.path(), &loaded)
            .expect("ok")
            .expect("some");
        assert_eq!(got.serial, 5);
    }

    #[test]
    fn a_list_with_a_bad_signature_stops_everything() {
        let (t, k) = setup(&policy());
        let loaded = load(t.path()).expect("policy");
        let mut m = Machines::default();
        m.add("n1", EK1).expect("add");
        let node = t.path().join(NODE_MACHINES);
        fs::create_dir_all(node.parent().expect("parent")).expect("dir");
        write_signed(&node, &m, &k).expect("write");
        // Someone adds their machine without the key.
        let text = fs::read_to_string(&node).expect("read").replace(EK1, EK2);
        fs::write(&node, text).expect("write");
        let e = effective_machines(t.path(), &loaded).expect_err("tampered");
        assert!(matches!(e, PolicyError::BadListSignature { .. }), "{e}");
        // Signed by another key.
        let other = signature::generate_key().expect("key");
        write_signed(&node, &m, &other).expect("write");
        assert!(effective_machines(t.path(), &loaded).is_err());
        // No signature at all.
        fs::remove_file(sig_path(&node)).expect("rm");
        let e = effective_machines(t.path(), &loaded).expect_err("unsigned");
        assert!(e.to_string().contains("no signature"), "{e}");
    }

    #[test]
    fn policy_errors_name_the_file() {
        let t = tempfile::tempdir().expect("tmp");
        let e = load(t.path()).err().expect("missing");
        assert!(e.to_string().contains("policy.json"), "{e}");
        let (t, _) = setup(&Policy {
            keys: vec!["missing.pem".into()],
            ..policy()
        });
        let e = load(t.path()).err().expect("missing key");
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }

    #[test]
    fn machine_edits() {
        let mut m = Machines::default();
        assert!(m.add("n1", "sha256:xyz").is_err());
        m.add("n1", EK1).expect("add");
        m.add("n1", EK2)
            .expect("re-add under the same name replaces");
        assert_eq!(m.machines.len(), 1);
        assert_eq!(m.serial, 2);
        assert!(m.remove("n1"));
        assert!(!m.remove("n1"));
        assert_eq!(m.serial, 3);
    }
}
