//! `keel-agent attest run` (the keel-attest service): gets this node its cluster certificate and
//! keeps it valid, and on a first member also serves the verifier.
//!
//! A first member holds an issuer key sealed to its TPM. The TPM releases it only when PCR 11
//! is in a state the operator's boot key signed (the running UKI's `.pcrsig`) and PCRs 12 and 13
//! hold exactly this node's provisioning and nothing else; the member then checks its own boot
//! state and its own entry in the admission list, issues its own certificate and answers other
//! nodes on port 2382. Any other node attests to one of the verifiers its config names. The
//! node's TLS key is made at every boot and lives in /run only; certificates are renewed at
//! half their lifetime, and a node that cannot renew keeps its certificate until it expires,
//! then deletes it.

use super::session::{self, BootLogs, NodeSession, Served};
use super::tpm::Tpm;
use super::verifier::{self, Issuer, Verifier};
use crate::attest::admission::{Admission, AdmissionError, Bundle, Role};
use crate::attest::protocol::{self, Answer};
use crate::attest::tpm2::ImportBlob;
use crate::node::agent::boot_state::{self, TrustedKey, BOOT_KEY};
use anyhow::{bail, Context, Result};
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use serde::{Deserialize, Serialize};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Node files (relative to the root).
pub const CONFIG: &str = "etc/keel/attest/attest.json";
pub const ADMISSION: &str = "etc/keel/attest/admission.json";
/// A newer admission list published after provisioning (through etcd, `ETCD_KEY`), as a
/// bundle (list and signature in one file); the highest valid serial wins.
pub const ADMISSION_UPDATE: &str = "var/lib/keel/attest/admission.bundle.json";
/// A list delivered by hand by an earlier release (`admission.json` + `.sig`), still read.
pub const ADMISSION_UPDATE_PAIR: &str = "var/lib/keel/attest/admission.json";
/// Present once this verifier has seen etcd's auth on: from then on it certifies other nodes
/// (before, every certificate would be etcd's root, so only first members are certified).
pub const AUTH_ON: &str = "var/lib/keel/attest/etcd-auth-on";
/// How often a verifier looks for a newer list in etcd.
pub const ADMISSION_POLL: std::time::Duration = std::time::Duration::from_secs(10);
pub const ISSUER_CERT: &str = "etc/keel/attest/issuer.pem";
pub const ROOT_CA: &str = "etc/keel/pki/ca.pem";
pub const NODE_CERT: &str = "run/keel/pki/node.pem";
pub const NODE_KEY: &str = "run/keel/pki/node-key.pem";
pub const STATUS: &str = "run/keel/attest/status.json";
/// The highest admission list serial this node accepted (on the sealed root): a verifier never
/// goes back to an older list, which could re-admit a removed machine.
pub const HIGH_WATER: &str = "var/lib/keel/attest/admission.high-water";
/// The operator's Secure Boot db certificate in the image.
pub const DB_CERT: &str = "usr/lib/keel/trust/db.crt";

/// Sessions a verifier serves at once; more wait in the kernel's accept queue.
pub const MAX_SESSIONS: usize = 8;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AttestConfig {
    /// This machine's name in the admission list.
    pub name: String,
    /// Verifiers to attest to (the first members, port 2382).
    pub verifiers: Vec<SocketAddr>,
    /// This node holds a sealed issuer (etc/keel/attest/issuer.sealed) and serves the verifier.
    #[serde(default)]
    pub issuer: bool,
}

/// What `keel-agent attest status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    pub name: String,
    /// `admitted`, `waiting` (no certificate yet) or `expired`.
    pub state: String,
    pub serial: String,
    pub issued_by: String,
    pub not_after: i64,
    pub renew_after: i64,
    pub renewals: u64,
    pub last_error: String,
    pub last_attempt: i64,
    /// This node serves the verifier.
    pub verifier: bool,
    pub admission_serial: u64,
}

/// What the service does next: a pure function of the certificate it holds and the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Get a certificate now (none yet, or its renewal time came).
    Obtain,
    /// Sleep until then (renewal time, or the retry after a failure, whichever is first).
    Wait(i64),
    /// The certificate ran out without a renewal: delete it.
    Expire,
}

/// Renewal at half the lifetime left when the certificate was obtained (`cert` is (obtained,
/// not after)); retries after failures at `retry_at`.
pub fn next_step(cert: Option<(i64, i64)>, now: i64, retry_at: Option<i64>) -> Step {
    let Some((not_before, not_after)) = cert else {
        return match retry_at {
            Some(t) if t > now => Step::Wait(t),
            _ => Step::Obtain,
        };
    };
    if now >= not_after {
        return Step::Expire;
    }
    let renew = not_before + (not_after - not_before) / 2;
    if now < renew {
        return Step::Wait(renew);
    }
    match retry_at {
        Some(t) if t > now => Step::Wait(t.min(not_after)),
        _ => Step::Obtain,
    }
}

/// The retry delay after `failures` failed attempts in a row: 5 s doubling to 5 min.
pub fn backoff(failures: u32) -> i64 {
    (5i64 << failures.min(6)).min(300)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn read(root: &Path, rel: &str) -> Result<Vec<u8>> {
    let p = root.join(rel);
    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
}

pub fn load_config(root: &Path) -> Result<AttestConfig> {
    let bytes = read(root, CONFIG)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not an attest config", CONFIG))
}

/// The valid admission list with the highest serial among the config's and a later delivery,
/// never one below the highest serial this node accepted before (recorded as it goes up).
pub fn load_admission(root: &Path, ca: &X509) -> Result<Admission> {
    let key = ca.public_key().context("the CA certificate's key")?;
    let mut best: Option<Admission> = None;
    let mut errors = Vec::new();
    let mut consider = |found: Result<Admission, AdmissionError>, p: PathBuf| match found {
        Ok(a) if best.as_ref().is_none_or(|b| a.serial > b.serial) => best = Some(a),
        Ok(_) => {}
        Err(e) => errors.push(format!("{}: {e}", p.display())),
    };
    for rel in [ADMISSION, ADMISSION_UPDATE_PAIR] {
        let p = root.join(rel);
        if let Ok(bytes) = std::fs::read(&p) {
            let sig = std::fs::read_to_string(format!("{}.sig", p.display())).unwrap_or_default();
            consider(Admission::from_signed(&bytes, &sig, &key), p);
        }
    }
    let p = root.join(ADMISSION_UPDATE);
    if let Ok(bytes) = std::fs::read(&p) {
        consider(Bundle::open(&bytes, &key), p);
    }
    for e in &errors {
        tracing::warn!("{e}");
    }
    let best = best.with_context(|| format!("no valid admission list ({})", errors.join("; ")))?;
    // Sessions, the renewal and the etcd poll all land here: one at a time past this point, so
    // that two of them never write the high-water in the wrong order (lowering it).
    static HIGH_WATER_LOCK: Mutex<()> = Mutex::new(());
    let _guard = HIGH_WATER_LOCK
        .lock()
        .map_err(|_| anyhow::anyhow!("the high-water lock"))?;
    let hw_path = root.join(HIGH_WATER);
    let seen = high_water(root)?;
    if best.serial < seen {
        bail!(
            "the newest admission list here has serial {}, but serial {seen} was in force: put the newest list back ({})",
            best.serial,
            root.join(ADMISSION_UPDATE).display()
        );
    }
    if best.serial > seen {
        crate::atomic::write(&hw_path, format!("{}\n", best.serial).as_bytes(), 0o644)
            .with_context(|| format!("recording serial {}", best.serial))?;
    }
    Ok(best)
}

/// The highest admission list serial this node accepted (0 before any).
fn high_water(root: &Path) -> Result<u64> {
    let hw_path = root.join(HIGH_WATER);
    match std::fs::read_to_string(&hw_path) {
        Ok(t) => t
            .trim()
            .parse()
            .with_context(|| format!("{}: not a serial", hw_path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading {}", hw_path.display())),
    }
}

/// What a published list did here.
#[derive(Debug, PartialEq, Eq)]
pub enum Adopted {
    /// A newer list: it is in force from now on.
    Newer(u64),
    /// The list in force already.
    Same,
}

/// Takes a bundle read from etcd: kept (atomically, on the sealed root) when its signature
/// verifies and its serial is above the list in force; an older or forged one changes nothing
/// and is an error naming why, since only the CA's holder can publish and serials only rise.
pub fn adopt_published(root: &Path, ca: &X509, bytes: &[u8]) -> Result<Adopted> {
    let key = ca.public_key().context("the CA certificate's key")?;
    let new = Bundle::open(bytes, &key).with_context(|| {
        format!(
            "the list published at {}",
            crate::attest::admission::ETCD_KEY
        )
    })?;
    match load_admission(root, ca) {
        Ok(current) if new.serial == current.serial && new == current => {
            return Ok(Adopted::Same)
        }
        Ok(current) if new.serial == current.serial => bail!(
            "the list published at {} has serial {} but differs from the serial {} in force here: two different lists were signed with one serial (sign a new one with a higher serial); keeping the one in force",
            crate::attest::admission::ETCD_KEY,
            new.serial,
            current.serial
        ),
        Ok(current) if new.serial < current.serial => bail!(
            "the list published at {} has serial {}, older than serial {} in force here: not taken",
            crate::attest::admission::ETCD_KEY,
            new.serial,
            current.serial
        ),
        Ok(_) => {}
        // Nothing valid here at or above the high-water (lists lost from disk): a published
        // list that reaches the high-water heals that.
        Err(e) => {
            let floor = high_water(root)?;
            if new.serial < floor {
                bail!(
                    "the list published at {} has serial {}, below serial {floor} once in force here ({e:#}): not taken",
                    crate::attest::admission::ETCD_KEY,
                    new.serial
                );
            }
        }
    }
    let p = root.join(ADMISSION_UPDATE);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::atomic::write(&p, bytes, 0o644).with_context(|| format!("writing {}", p.display()))?;
    let now_in_force = load_admission(root, ca)?;
    Ok(Adopted::Newer(now_in_force.serial))
}

/// The local etcd member, reached with this node's certificate.
fn local_etcd(root: &Path, prefix: &str) -> crate::node::net::store::EtcdOptions {
    crate::node::net::store::EtcdOptions {
        endpoints: vec!["https://127.0.0.1:2379".into()],
        ca_file: Some(root.join(ROOT_CA)),
        cert_file: Some(root.join(NODE_CERT)),
        key_file: Some(root.join(NODE_KEY)),
        prefix: prefix.into(),
    }
}

/// keel-net's key prefix (flannel's) and the network config its config carries.
pub const NET_PREFIX: &str = "/coreos.com/network";
pub const NET_CONFIG: &str = "etc/keel/net-config.json";

/// A runtime for one thread's etcd calls (etcd-client is async; keel-attest is not).
fn etcd_runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!("no runtime to {what}: {e}");
            None
        }
    }
}

/// The first issuer (the first verifier its config names is itself) sets up etcd's users and
/// roles and enables auth, once etcd has quorum; until then every certificate is root. Runs
/// until auth is on (done here, or found on).
fn bootstrap_etcd_auth(shared: Arc<Shared>) {
    let Some(rt) = etcd_runtime("set up etcd's users and roles") else {
        return;
    };
    let root = shared.root.clone();
    let net_config = std::fs::read_to_string(root.join(NET_CONFIG)).ok();
    let mut last_error = String::new();
    loop {
        let outcome = load_admission(&root, &shared.ca).and_then(|admission| {
            rt.block_on(async {
                let mut store =
                    crate::node::net::store::Store::connect(&local_etcd(&root, NET_PREFIX)).await?;
                Ok::<_, anyhow::Error>(
                    super::etcd_auth::bootstrap(
                        store.client(),
                        &admission,
                        NET_PREFIX,
                        net_config.as_deref(),
                    )
                    .await?,
                )
            })
        });
        match outcome {
            Ok(super::etcd_auth::Bootstrap::AlreadyOn) => {
                shared.auth_is_on();
                return;
            }
            Ok(super::etcd_auth::Bootstrap::Enabled { users }) => {
                tracing::info!(
                    "etcd auth enabled: {users} users (root, {}, and one per machine with its own role)",
                    super::etcd_auth::ADMIN
                );
                shared.auth_is_on();
                return;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != last_error {
                    tracing::warn!("setting up etcd's users and roles (retrying every 5 s): {msg}");
                    last_error = msg;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
}

/// A verifier's watch on the published list: every `ADMISSION_POLL`, read `ETCD_KEY` from the
/// local etcd member with this node's certificate and adopt a newer list. etcd only carries the
/// list; the decision to admit is taken from the copy on disk.
fn poll_published(shared: Arc<Shared>) {
    let Some(rt) = etcd_runtime("read the published admission list") else {
        return;
    };
    let root = shared.root.clone();
    let mut last_error = String::new();
    let mut first = true;
    loop {
        if !first {
            std::thread::sleep(ADMISSION_POLL);
        }
        first = false;
        let opts = local_etcd(&root, "/keel/attest");
        let check_auth = !shared.auth_on.load(Ordering::SeqCst);
        let got = rt.block_on(async {
            let mut store = crate::node::net::store::Store::connect(&opts).await?;
            if check_auth {
                // With auth on, listing roles needs the root role no node certificate has.
                match store.client().role_list().await {
                    Err(e) if super::etcd_auth::permission_denied(&e) => shared.auth_is_on(),
                    _ => {}
                }
            }
            store.get(crate::attest::admission::ETCD_KEY).await
        });
        let outcome = match got {
            Ok(None) => Ok(Adopted::Same),
            Ok(Some(bytes)) => adopt_published(&root, &shared.ca, &bytes),
            Err(e) => Err(anyhow::Error::new(e).context("reading the published admission list")),
        };
        match outcome {
            Ok(Adopted::Newer(serial)) => {
                last_error.clear();
                tracing::info!(
                    "admission list serial {serial} adopted from {}",
                    crate::attest::admission::ETCD_KEY
                );
                // `keel-agent attest status` shows the list in force from now on.
                if let Ok(mut st) = status(&root) {
                    st.admission_serial = serial;
                    write_status(&root, &st);
                }
            }
            Ok(Adopted::Same) => last_error.clear(),
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != last_error {
                    tracing::warn!("{msg}");
                    last_error = msg;
                }
            }
        }
    }
}

/// The directory of the node's key and certificate: root's, readable by the etcd group (etcd
/// runs as that user), nobody else's.
fn prepare_pki_dir(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(NODE_KEY);
    let dir = dir.parent().context("the key's directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let group = nix::unistd::Group::from_name("etcd").ok().flatten();
    if let Some(g) = &group {
        nix::unistd::chown(dir, Some(nix::unistd::Uid::from_raw(0)), Some(g.gid))
            .with_context(|| format!("giving {} to group etcd", dir.display()))?;
    }
    let mode = if group.is_some() { 0o750 } else { 0o700 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// Writes a private file whole: created 0600 (never readable by others, not even for a moment),
/// given to `owner`, then renamed over `path`. A leftover temporary file is removed first, and a
/// symlink in its place is not followed.
fn write_private(path: &Path, data: &[u8], owner: Option<&str>) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    if let Some(user) = owner.and_then(|o| nix::unistd::User::from_name(o).ok().flatten()) {
        nix::unistd::fchown(&f, Some(user.uid), Some(user.gid))
            .with_context(|| format!("giving {} to {}", tmp.display(), user.name))?;
    }
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn x509_unix(t: &openssl::asn1::Asn1TimeRef) -> Result<i64> {
    let d = openssl::asn1::Asn1Time::from_unix(0)?.diff(t)?;
    Ok(i64::from(d.days) * 86400 + i64::from(d.secs))
}

/// (not_before, not_after) of the first certificate in a PEM chain.
pub fn validity(chain_pem: &[u8]) -> Result<(i64, i64)> {
    let c = X509::from_pem(chain_pem).context("certificate")?;
    Ok((x509_unix(c.not_before())?, x509_unix(c.not_after())?))
}

/// The issuer key sealed to this TPM: the `.pcrsig` entry for the current PCR 11 signed by the
/// operator's boot key approves the policy, and the TPM checks PCRs 11, 12 and 13 itself.
pub fn unseal_issuer(root: &Path, tpm: &mut Tpm, keys: &[TrustedKey]) -> Result<Issuer> {
    let blob: ImportBlob = serde_json::from_slice(&read(
        root,
        crate::attest::SEALED_ISSUER_PATH.trim_start_matches('/'),
    )?)
    .context("the sealed issuer is not an import blob")?;
    let cert = X509::from_pem(&read(root, ISSUER_CERT)?).context("the issuer certificate")?;
    let boot = keys
        .iter()
        .find(|k| k.file == BOOT_KEY)
        .context("the image has no boot key (pcr-boot.pub.pem)")?;
    let sig_text = String::from_utf8(read(root, boot_state::PCRSIG)?)
        .context("the .pcrsig file is not text")?;
    let pcrsig = crate::trust::measure::parse_pcrsig(&sig_text)?;
    // systemd-pcrphase may extend PCR 11 between the read and the unseal (sysinit → ready):
    // then the policy no longer matches and the whole sequence is tried again.
    let mut last = None;
    let mut secret = None;
    for _ in 0..3 {
        let pcr11 = tpm.read_pcrs(&[11])?[0];
        let pol = crate::trust::measure::policy_pcr_digest(&pcr11);
        let entry = pcrsig
            .get("sha256")
            .into_iter()
            .flatten()
            .find(|e| e.pol == hex::encode(pol) && e.pkfp == boot.fingerprint)
            .context("the running UKI's .pcrsig has no signature by the boot key for the current PCR 11: not a signed boot state, the issuer stays sealed")?;
        use base64::Engine;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&entry.sig)
            .context("the .pcrsig signature is not base64")?;
        match tpm.unseal_imported(&blob, &boot.key, &pol, &sig, &[12, 13]) {
            Ok(s) => {
                secret = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let secret = match (secret, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e),
        (None, None) => bail!("the issuer was not unsealed"),
    };
    let key = ec_key_from_scalar(&secret.0)?;
    let cert_key = cert.public_key()?;
    if !key.public_eq(&cert_key) {
        bail!("the unsealed issuer key does not belong to {ISSUER_CERT}");
    }
    Ok(Issuer { cert, key })
}

/// A P-256 private key from its 32-byte scalar.
pub fn ec_key_from_scalar(d: &[u8]) -> Result<PKey<Private>> {
    use openssl::bn::{BigNum, BigNumContext};
    use openssl::ec::{EcGroup, EcKey, EcPoint};
    let group = EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)?;
    let d = BigNum::from_slice(d)?;
    let mut ctx = BigNumContext::new()?;
    let mut point = EcPoint::new(&group)?;
    point.mul_generator2(&group, &d, &mut ctx)?;
    let key = EcKey::from_private_components(&group, &d, &point)?;
    key.check_key()
        .context("the issuer key is not a valid P-256 key")?;
    Ok(PKey::from_ec_key(key)?)
}

/// What the running service shares between its loop and the verifier's threads.
pub struct Shared {
    pub root: PathBuf,
    pub name: String,
    pub ca: X509,
    pub ca_pem: Vec<u8>,
    pub keys: Vec<TrustedKey>,
    pub node_key: PKey<Private>,
    /// This node's current chain (leaf, issuer), once it has one; the verifier serves only
    /// while it holds a valid one.
    pub chain: Mutex<Option<Vec<u8>>>,
    pub issuer: Option<Issuer>,
    /// The operator's Secure Boot db certificate (DER), from the image.
    pub db_cert: Option<Vec<u8>>,
    /// etcd's auth is on (seen here once, remembered in `AUTH_ON`): other nodes may be certified.
    pub auth_on: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Records that etcd's auth is on (once; the file keeps it across boots).
    fn auth_is_on(&self) {
        if !self.auth_on.swap(true, Ordering::SeqCst) {
            let p = self.root.join(AUTH_ON);
            if let Err(e) = crate::atomic::write(&p, b"1\n", 0o644) {
                tracing::warn!("recording that etcd auth is on in {}: {e:#}", p.display());
            }
            tracing::info!("etcd auth is on: this verifier now certifies other nodes");
        }
    }
}

/// The image's db certificate as DER, if it has one.
pub fn load_db_cert(root: &Path) -> Option<Vec<u8>> {
    let pem = std::fs::read(root.join(DB_CERT)).ok()?;
    X509::from_pem(&pem).ok()?.to_der().ok()
}

/// A name from the network, fit for a log line.
fn printable(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(64)
        .collect()
}

/// Self-issue on an issuer: its own boot state must be trusted and its own EK enrolled under its
/// name as a member, exactly what it would demand of another node.
fn self_issue(s: &Shared, tpm: &Tpm) -> Result<(Vec<u8>, String)> {
    let issuer = s.issuer.as_ref().context("not an issuer")?;
    let admission = load_admission(&s.root, &s.ca)?;
    let entry = admission.entry(&s.name).with_context(|| {
        format!(
            "{} is not in the admission list (serial {})",
            s.name, admission.serial
        )
    })?;
    let ek = crate::attest::tpm2::EkPublic::parse(tpm.ek_public())?.sha256()?;
    if ek != entry.ek_sha256 || entry.role != Role::Member {
        bail!(
            "this machine (EK {ek}) is not enrolled as member {} (admission list serial {})",
            s.name,
            admission.serial
        );
    }
    let state = boot_state::read(&s.root)?;
    if !state.trusted {
        bail!(
            "this node's own boot state is not trusted: {}",
            state.problems.join("; ")
        );
    }
    if admission.deny_pcr11.contains(&state.pcr11) {
        bail!("this node's PCR 11 {} is deny-listed", state.pcr11);
    }
    let csr = openssl::x509::X509Req::from_der(&session::csr(&s.name, &s.node_key)?)?;
    let now = now();
    let ttl = i64::try_from(admission.cert_ttl).unwrap_or(i64::MAX);
    let leaf = verifier::issue_leaf(issuer, entry, &csr, now, now.saturating_add(ttl))?;
    let mut chain = leaf.to_pem()?;
    chain.extend(issuer.cert.to_pem()?);
    Ok((chain, format!("{} (self)", s.name)))
}

/// Attest to the verifiers in turn (starting at a rotating index); the first admission wins.
fn attest_remote(
    s: &Shared,
    cfg: &AttestConfig,
    tpm: &mut Tpm,
    start: usize,
) -> Result<(Vec<u8>, String)> {
    let logs = BootLogs::read(&s.root)?;
    let stamp = crate::node::provision::apply::stamp(&s.root)?;
    let config_sha = stamp.map(|x| x.sha256).unwrap_or_default();
    let mut errors = Vec::new();
    let n = cfg.verifiers.len();
    for i in 0..n {
        let addr = cfg.verifiers[(start + i) % n];
        let attempt = (|| -> Result<Answer> {
            // Connect first: a verifier that is down costs no TPM work.
            let mut tls = session::connect(addr, &s.ca_pem)?;
            let csr = session::csr(&s.name, &s.node_key)?;
            let sess = NodeSession::start(tpm, &s.name, &config_sha, csr)?;
            session::attest(&mut tls, tpm, sess, &logs)
        })();
        match attempt {
            Ok(Answer::Admitted {
                chain_pem,
                verifier,
                ..
            }) => {
                check_chain(chain_pem.as_bytes(), &s.ca, &s.node_key)?;
                return Ok((chain_pem.into_bytes(), verifier));
            }
            Ok(Answer::Refused { reason }) => errors.push(format!("{addr}: refused: {reason}")),
            Err(e) => errors.push(format!("{addr}: {e:#}")),
        }
    }
    bail!("no verifier admitted this node: {}", errors.join("; "))
}

/// The chain a verifier sent: leaf signed by the issuer, issuer by the root, leaf holds our key.
fn check_chain(pem: &[u8], root: &X509, key: &PKey<Private>) -> Result<()> {
    let chain = X509::stack_from_pem(pem).context("the certificate chain")?;
    let (Some(leaf), Some(issuer)) = (chain.first(), chain.get(1)) else {
        bail!(
            "the verifier sent {} certificates, not a leaf and its issuer",
            chain.len()
        );
    };
    if !leaf.public_key()?.public_eq(key) {
        bail!("the certificate is not for this node's key");
    }
    let (issuer_key, root_key) = (issuer.public_key()?, root.public_key()?);
    if !leaf.verify(&issuer_key)? || !issuer.verify(&root_key)? {
        bail!("the certificate does not chain to the cluster's root");
    }
    Ok(())
}

fn notify_ready() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = std::os::unix::net::UnixDatagram::unbound();
        if let Ok(sock) = sock {
            let _ = sock.send_to(b"READY=1", &path);
        }
    }
}

fn write_status(root: &Path, st: &Status) {
    if let Ok(bytes) = serde_json::to_vec_pretty(st) {
        let p = root.join(STATUS);
        if let Err(e) = crate::atomic::write(&p, &bytes, 0o644) {
            tracing::warn!("writing {}: {e:#}", p.display());
        }
    }
}

/// Serves the verifier on `listener` until the process ends.
pub fn serve_verifier(shared: Arc<Shared>, listener: TcpListener) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        if active.load(Ordering::SeqCst) >= MAX_SESSIONS {
            tracing::warn!("verifier busy ({MAX_SESSIONS} sessions): closing a connection");
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(&shared);
        let active = Arc::clone(&active);
        std::thread::spawn(move || {
            if let Err(e) = serve_one(&shared, tcp) {
                tracing::warn!("attestation session: {e:#}");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn serve_one(s: &Shared, tcp: std::net::TcpStream) -> Result<()> {
    let peer = tcp.peer_addr().context("the peer's address")?;
    let admission = load_admission(&s.root, &s.ca)?;
    // Only machines in the list get a TLS handshake and RSA work.
    if !admission.machines.iter().any(|m| m.ip == peer.ip()) {
        bail!(
            "{peer}: not an address in the admission list (serial {}); closed",
            admission.serial
        );
    }
    // A verifier taken out of the list stops at once (not at its next renewal).
    if admission.entry(&s.name).is_none() {
        bail!(
            "{peer}: this verifier ({}) is not in the admission list (serial {}): not serving",
            s.name,
            admission.serial
        );
    }
    // Until etcd's auth is on every certificate is etcd's root: only the first members (which
    // certify themselves) hold one then.
    if !s.auth_on.load(Ordering::SeqCst) {
        bail!("{peer}: etcd's auth is not on yet (the first issuer sets it up once etcd has quorum): certifying no other node until then; closed");
    }
    // One deadline for the whole session, however slowly the peer sends: when it passes the
    // socket is shut down and any read or write in progress fails.
    let watchdog = tcp.try_clone().context("watchdog socket")?;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&done);
    std::thread::spawn(move || {
        let until = std::time::Instant::now() + session::DEADLINE;
        while std::time::Instant::now() < until {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = watchdog.shutdown(std::net::Shutdown::Both);
    });
    let result = (|| -> Result<()> {
        tcp.set_read_timeout(Some(session::DEADLINE))?;
        tcp.set_write_timeout(Some(session::DEADLINE))?;
        let chain = s.chain.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
        let chain = chain.context("this verifier holds no valid certificate: not serving")?;
        let acceptor = session::acceptor(&chain, &s.node_key)?;
        let mut tls = acceptor
            .accept(tcp)
            .map_err(|e| anyhow::anyhow!("TLS from {peer}: {e}"))?;
        let issuer = s.issuer.as_ref().context("not an issuer")?;
        let v = Verifier {
            admission: &admission,
            keys: &s.keys,
            issuer,
            name: &s.name,
            db_cert: s.db_cert.as_deref(),
        };
        match session::serve(&mut tls, &v, now)? {
            Served::Admitted(a) => tracing::info!(
                "admitted {} from {peer} (PCR 11 {}, not after {})",
                a.name,
                a.pcr11,
                a.not_after
            ),
            Served::Refused { name, refusal } => {
                tracing::warn!("refused `{}` from {peer}: {refusal}", printable(&name))
            }
        }
        Ok(())
    })();
    done.store(true, Ordering::SeqCst);
    result
}

/// The service: obtain, write, renew; serve the verifier on an issuer.
pub fn run(root: &Path) -> Result<()> {
    let cfg = load_config(root)?;
    let ca_pem = read(root, ROOT_CA)?;
    let ca = X509::from_pem(&ca_pem).context("the cluster's root certificate")?;
    let keys = boot_state::load_keys(root)?;
    let mut tpm = Tpm::machine()?;
    let node_key = {
        let g = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)?;
        PKey::from_ec_key(openssl::ec::EcKey::generate(&g)?)?
    };
    prepare_pki_dir(root)?;
    write_private(
        &root.join(NODE_KEY),
        &node_key.private_key_to_pem_pkcs8()?,
        Some("etcd"),
    )?;
    let issuer = if cfg.issuer {
        let i =
            unseal_issuer(root, &mut tpm, &keys).context("unsealing this member's issuer key")?;
        tracing::info!("issuer key unsealed under a boot state signed by {BOOT_KEY}");
        Some(i)
    } else {
        None
    };
    let shared = Arc::new(Shared {
        root: root.to_path_buf(),
        name: cfg.name.clone(),
        ca,
        ca_pem,
        keys,
        node_key,
        chain: Mutex::new(None),
        issuer,
        db_cert: load_db_cert(root),
        auth_on: std::sync::atomic::AtomicBool::new(root.join(AUTH_ON).exists()),
    });
    let mut status = Status {
        name: cfg.name.clone(),
        state: "waiting".into(),
        verifier: cfg.issuer,
        ..Status::default()
    };
    let mut cert: Option<(i64, i64)> = None;
    let mut failures = 0u32;
    let mut retry_at = None;
    let mut ready = false;
    let mut rotate = 0usize;
    loop {
        match next_step(cert, now(), retry_at) {
            Step::Wait(t) => {
                let secs = (t - now()).clamp(1, 60) as u64;
                std::thread::sleep(std::time::Duration::from_secs(secs));
            }
            Step::Expire => {
                let _ = std::fs::remove_file(root.join(NODE_CERT));
                tracing::error!(
                    "the certificate expired without a renewal: no cluster credentials"
                );
                cert = None;
                status.state = "expired".into();
                write_status(root, &status);
            }
            Step::Obtain => {
                status.last_attempt = now();
                let began = std::time::Instant::now();
                let got = if shared.issuer.is_some() {
                    self_issue(&shared, &tpm)
                } else {
                    rotate += 1;
                    attest_remote(&shared, &cfg, &mut tpm, rotate)
                };
                match got {
                    Ok((chain, by)) => {
                        write_private(&root.join(NODE_CERT), &chain, Some("etcd"))?;
                        let v = validity(&chain)?;
                        let leaf = X509::from_pem(&chain)?;
                        status.serial = leaf
                            .serial_number()
                            .to_bn()
                            .and_then(|b| b.to_hex_str().map(|s| s.to_string()))
                            .unwrap_or_default();
                        if cert.is_some() {
                            status.renewals += 1;
                        }
                        // Renewal is timed from when this node got the certificate, not from
                        // its notBefore (backdated for clock skew).
                        let obtained = now();
                        cert = Some((obtained, v.1));
                        *shared.chain.lock().map_err(|_| anyhow::anyhow!("lock"))? = Some(chain);
                        status.state = "admitted".into();
                        status.issued_by = by.clone();
                        status.not_after = v.1;
                        status.renew_after = obtained + (v.1 - obtained) / 2;
                        status.last_error.clear();
                        status.admission_serial = load_admission(root, &shared.ca)
                            .map(|a| a.serial)
                            .unwrap_or(0);
                        failures = 0;
                        retry_at = None;
                        tracing::info!(
                            "certificate for {} from {by} in {} ms, serial {}, not after {}",
                            cfg.name,
                            began.elapsed().as_millis(),
                            status.serial,
                            v.1
                        );
                        write_status(root, &status);
                        if !ready {
                            ready = true;
                            if shared.issuer.is_some() {
                                let listener = TcpListener::bind(("0.0.0.0", protocol::PORT))
                                    .with_context(|| {
                                        format!("listening on port {}", protocol::PORT)
                                    })?;
                                let s = Arc::clone(&shared);
                                std::thread::spawn(move || serve_verifier(s, listener));
                                tracing::info!("verifier listening on port {}", protocol::PORT);
                                let s = Arc::clone(&shared);
                                std::thread::spawn(move || poll_published(s));
                                if first_issuer(&shared, &cfg) {
                                    let s = Arc::clone(&shared);
                                    std::thread::spawn(move || bootstrap_etcd_auth(s));
                                }
                            }
                            notify_ready();
                        }
                    }
                    Err(e) => {
                        if shared.issuer.is_some() {
                            // An issuer that no longer passes its own checks (removed from the
                            // list, deny-listed, untrusted) stops admitting others at once.
                            *shared.chain.lock().map_err(|_| anyhow::anyhow!("lock"))? = None;
                        }
                        failures = failures.saturating_add(1);
                        let delay = backoff(failures);
                        retry_at = Some(now() + delay);
                        status.last_error = format!("{e:#}");
                        tracing::warn!("no certificate: {e:#} (next try in {delay} s)");
                        write_status(root, &status);
                    }
                }
            }
        }
    }
}

/// This node is the first verifier its config names: it sets up etcd's auth.
fn first_issuer(shared: &Shared, cfg: &AttestConfig) -> bool {
    let Some(first) = cfg.verifiers.first() else {
        return false;
    };
    load_admission(&shared.root, &shared.ca)
        .ok()
        .and_then(|a| a.entry(&cfg.name).map(|e| e.ip))
        .is_some_and(|ip| ip == first.ip())
}

/// Reads the status file.
pub fn status(root: &Path) -> Result<Status> {
    let bytes = read(root, STATUS)?;
    Ok(serde_json::from_slice(&bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_half_life_and_failures_back_off_until_expiry() {
        assert_eq!(next_step(None, 100, None), Step::Obtain);
        assert_eq!(next_step(None, 100, Some(105)), Step::Wait(105));
        assert_eq!(next_step(None, 110, Some(105)), Step::Obtain);
        // Obtained at 0, expires at 100: wait until 50, then renew. (A certificate backdated
        // for clock skew must not count from its notBefore: with a lifetime shorter than the
        // backdating that renewed it at once, over and over.)
        assert_eq!(next_step(Some((0, 100)), 10, None), Step::Wait(50));
        assert_eq!(next_step(Some((0, 100)), 50, None), Step::Obtain);
        // A failed renewal waits for its retry, never past expiry; at expiry the cert goes.
        assert_eq!(next_step(Some((0, 100)), 60, Some(70)), Step::Wait(70));
        assert_eq!(next_step(Some((0, 100)), 95, Some(200)), Step::Wait(100));
        assert_eq!(next_step(Some((0, 100)), 100, Some(200)), Step::Expire);
        assert_eq!(
            (1..=8).map(backoff).collect::<Vec<_>>(),
            [10, 20, 40, 80, 160, 300, 300, 300]
        );
    }

    fn ca() -> (X509, PKey<Private>) {
        let g = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
            .expect("group");
        let key = PKey::from_ec_key(openssl::ec::EcKey::generate(&g).expect("key")).expect("pkey");
        let mut name = openssl::x509::X509NameBuilder::new().expect("name");
        name.append_entry_by_text("CN", "test ca").expect("cn");
        let name = name.build();
        let mut b = X509::builder().expect("builder");
        b.set_subject_name(&name).expect("subject");
        b.set_issuer_name(&name).expect("issuer");
        b.set_pubkey(&key).expect("pubkey");
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).expect("t"))
            .expect("nb");
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).expect("t"))
            .expect("na");
        b.sign(&key, openssl::hash::MessageDigest::sha256())
            .expect("sign");
        (b.build(), key)
    }

    fn list(serial: u64, names: &[&str]) -> Admission {
        Admission {
            cluster: "c".into(),
            serial,
            cert_ttl: 120,
            machines: names
                .iter()
                .enumerate()
                .map(|(i, n)| crate::attest::admission::Entry {
                    name: (*n).into(),
                    ek_sha256: format!("sha256:{}", format!("{i:x}").repeat(64)),
                    ip: format!("10.77.0.{}", i + 1).parse().expect("ip"),
                    role: Role::Member,
                    config_sha256: None,
                    subnet: None,
                })
                .collect(),
            deny_pcr11: vec![],
            allow_secure_boot_off: false,
        }
    }

    fn bundle(a: &Admission, key: &PKey<Private>) -> Vec<u8> {
        let (bytes, sig) = a.sign(key).expect("sign");
        serde_json::to_vec(&Bundle::new(&bytes, &sig).expect("bundle")).expect("json")
    }

    #[test]
    fn a_published_list_is_taken_only_when_signed_and_newer() {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path();
        let (ca, key) = ca();
        let first = list(1, &["node1", "node2", "node3"]);
        let (bytes, sig) = first.sign(&key).expect("sign");
        std::fs::create_dir_all(root.join("etc/keel/attest")).expect("dir");
        std::fs::write(root.join(ADMISSION), &bytes).expect("write");
        std::fs::write(root.join(format!("{ADMISSION}.sig")), sig).expect("write");
        assert_eq!(load_admission(root, &ca).expect("load").serial, 1);

        // The operator removes node3 (serial 2): taken, in force, recorded as the high-water.
        let removed = list(2, &["node1", "node2"]);
        assert_eq!(
            adopt_published(root, &ca, &bundle(&removed, &key)).expect("adopt"),
            Adopted::Newer(2)
        );
        let now = load_admission(root, &ca).expect("load");
        assert_eq!(now.serial, 2);
        assert!(now.entry("node3").is_none());
        assert_eq!(
            adopt_published(root, &ca, &bundle(&removed, &key)).expect("again"),
            Adopted::Same
        );

        // Someone with etcd write access but not the CA key puts back the old list, or forges
        // a newer one: nothing changes.
        let old = adopt_published(root, &ca, &bundle(&first, &key)).expect_err("older");
        assert!(
            format!("{old:#}").contains("older than serial 2"),
            "{old:#}"
        );
        let (_, other) = self::ca();
        let forged = adopt_published(
            root,
            &ca,
            &bundle(&list(3, &["node1", "node2", "node3"]), &other),
        )
        .expect_err("forged");
        assert!(format!("{forged:#}").contains("signature"), "{forged:#}");
        assert_eq!(load_admission(root, &ca).expect("load").serial, 2);

        // Two different lists signed with one serial (two operators, a stale directory): the
        // one in force stays, and the conflict is named.
        let twin = list(2, &["node1"]);
        let e = adopt_published(root, &ca, &bundle(&twin, &key)).expect_err("same serial");
        assert!(
            format!("{e:#}").contains("differs from the serial 2 in force"),
            "{e:#}"
        );
        assert_eq!(load_admission(root, &ca).expect("load"), removed);

        // Deleting the newer list from disk does not bring node3 back: the high-water refuses.
        std::fs::remove_file(root.join(ADMISSION_UPDATE)).expect("rm");
        let e = load_admission(root, &ca).expect_err("below the high-water");
        assert!(format!("{e:#}").contains("serial 2 was in force"), "{e:#}");
        // The published list heals it; the old one still does not.
        assert!(adopt_published(root, &ca, &bundle(&first, &key)).is_err());
        assert_eq!(
            adopt_published(root, &ca, &bundle(&removed, &key)).expect("heals"),
            Adopted::Newer(2)
        );
        assert_eq!(load_admission(root, &ca).expect("load"), removed);
    }

    #[test]
    fn an_issuer_key_round_trips_through_its_scalar() {
        let g = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
            .expect("group");
        let k = openssl::ec::EcKey::generate(&g).expect("key");
        let d = k.private_key().to_vec_padded(32).expect("scalar");
        let back = ec_key_from_scalar(&d).expect("key");
        assert!(back.public_eq(&PKey::from_ec_key(k).expect("pkey")));
        assert!(ec_key_from_scalar(&[0u8; 32]).is_err());
    }
}
