//! The update repository's TUF keys, in the `tuf/` directory of the operator's key directory:
//! one ECDSA P-256 key per top-level role (`root.key`, `targets.key`, `snapshot.key`,
//! `timestamp.key`, mode 0600) and `root.json`, the newest signed root, which images embed.
//! `root.key` belongs offline once the repository exists: publishing and refreshing need only the
//! other three; rotating a key needs it.

use anyhow::{bail, Context, Result};
use aws_lc_rs::rand::SystemRandom;
use openssl::pkey::PKey;
use std::collections::HashMap;
use std::num::NonZeroU64;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tough::editor::signed::SignedRole;
use tough::key_source::KeySource;
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root};
use tough::sign::{parse_keypair, Sign};

pub const TUF_DIR: &str = "tuf";
pub const ROOT_JSON: &str = "root.json";
/// How long a root is valid; `keel publish check` warns ahead, `rotate-key` renews it.
pub const ROOT_DAYS: i64 = 365;

/// The top-level roles, with their key files.
pub const ROLES: [(RoleType, &str); 4] = [
    (RoleType::Root, "root.key"),
    (RoleType::Targets, "targets.key"),
    (RoleType::Snapshot, "snapshot.key"),
    (RoleType::Timestamp, "timestamp.key"),
];

/// The `tuf/` directory of a key directory.
pub fn tuf_dir(keys: &Path) -> PathBuf {
    keys.join(TUF_DIR)
}

/// A role's key file in a `tuf/` directory.
pub fn key_file(tuf: &Path, role: RoleType) -> PathBuf {
    let name = ROLES
        .iter()
        .find(|(r, _)| *r == role)
        .map(|(_, f)| *f)
        .unwrap_or("unknown.key");
    tuf.join(name)
}

pub fn root_json(tuf: &Path) -> PathBuf {
    tuf.join(ROOT_JSON)
}

/// A PEM (PKCS#8) private key file as tough's key source; the mode is checked before use.
#[derive(Debug)]
pub struct PemKey {
    pub path: PathBuf,
}

impl PemKey {
    pub fn signer(&self) -> Result<Box<dyn Sign>> {
        let mode = std::fs::metadata(&self.path)
            .with_context(|| {
                format!(
                    "{}: missing; the key directory needs update keys (`keel keys add-update-keys DIR`), or this key is kept offline",
                    self.path.display()
                )
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{}: private key is readable by group or others (mode {:o}); run chmod 600 {}",
                self.path.display(),
                mode & 0o777,
                self.path.display()
            );
        }
        let pem = std::fs::read(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let der = PKey::private_key_from_pem(&pem)
            .and_then(|k| k.private_key_to_pkcs8())
            .with_context(|| format!("{}: not a PEM private key", self.path.display()))?;
        let key = parse_keypair(&der).map_err(|e| {
            anyhow::anyhow!("{}: not a key TUF can sign with: {e}", self.path.display())
        })?;
        Ok(Box::new(key))
    }
}

#[tough::async_trait]
impl KeySource for PemKey {
    async fn as_sign(
        &self,
    ) -> std::result::Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync + 'static>>
    {
        self.signer()
            .map_err(|e| Box::<dyn std::error::Error + Send + Sync>::from(format!("{e:#}")))
    }

    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Err("keel never writes keys through tough".into())
    }
}

pub fn sources(tuf: &Path, roles: &[RoleType]) -> Vec<Box<dyn KeySource>> {
    roles
        .iter()
        .map(|r| {
            Box::new(PemKey {
                path: key_file(tuf, *r),
            }) as Box<dyn KeySource>
        })
        .collect()
}

/// Writes a new P-256 key, mode 0600, never over an existing file.
pub fn write_new_key(path: &Path) -> Result<()> {
    let key = crate::container::signature::generate_key()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, &key.private_key_to_pem_pkcs8()?)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

pub fn days_from_now(days: i64) -> Result<jiff::Timestamp> {
    jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(days * 24))
        .context("expiry out of range")
}

/// A root listing one key per role (threshold 1), `version`, expiring in ROOT_DAYS.
pub fn root_for(tuf: &Path, version: u64) -> Result<Root> {
    let mut all = HashMap::new();
    let mut roles = HashMap::new();
    for (role, _) in ROLES {
        let key = PemKey {
            path: key_file(tuf, role),
        }
        .signer()?
        .tuf_key();
        let id = key.key_id().context("computing a TUF key id")?;
        all.insert(id.clone(), key);
        roles.insert(
            role,
            RoleKeys {
                keyids: vec![id],
                threshold: NonZeroU64::MIN,
                _extra: HashMap::new(),
            },
        );
    }
    Ok(Root {
        spec_version: "1.0.0".into(),
        consistent_snapshot: true,
        version: NonZeroU64::new(version).context("root version 0")?,
        expires: days_from_now(ROOT_DAYS)?,
        keys: all,
        roles,
        _extra: HashMap::new(),
    })
}

/// Signs `root` with the root keys it lists, and with `also` (the previous root's key when the
/// root key itself is rotated, so nodes that trust the old root accept the new one).
pub async fn sign_root(root: Root, tuf: &Path, also: Option<(&Root, &Path)>) -> Result<Vec<u8>> {
    let rng = SystemRandom::new();
    let own: Vec<Box<dyn KeySource>> = vec![Box::new(PemKey {
        path: key_file(tuf, RoleType::Root),
    })];
    let mut signed = SignedRole::new(root.clone(), &KeyHolder::Root(root.clone()), &own, &rng)
        .await
        .map_err(|e| anyhow::anyhow!("signing root.json: {}", crate::error::chain(&e)))?;
    if let Some((previous, old_key)) = also {
        let old: Vec<Box<dyn KeySource>> = vec![Box::new(PemKey {
            path: old_key.to_path_buf(),
        })];
        let by_old = SignedRole::new(root, &KeyHolder::Root(previous.clone()), &old, &rng)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "signing root.json with the previous root key: {}",
                    crate::error::chain(&e)
                )
            })?;
        signed = signed
            .add_old_signatures(by_old.signed().signatures.clone())
            .map_err(|e| anyhow::anyhow!("adding the previous root's signature: {e}"))?;
    }
    Ok(signed.buffer().clone())
}

/// Creates `tuf/` in a key directory that has none: four keys and root.json version 1, made in
/// a staging directory and renamed into place. Returns false when it exists (nothing replaced).
pub fn ensure(keys: &Path) -> Result<bool> {
    let dir = tuf_dir(keys);
    if dir.exists() {
        return Ok(false);
    }
    if !keys.is_dir() {
        bail!(
            "{}: no such key directory; create one with `keel keys init DIR`",
            keys.display()
        );
    }
    let staging = keys.join(".tuf.partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let made = (|| -> Result<()> {
        for (_, file) in ROLES {
            write_new_key(&staging.join(file))?;
        }
        let root = root_for(&staging, 1)?;
        let bytes = crate::update::tuf::runtime()?.block_on(sign_root(root, &staging, None))?;
        std::fs::write(root_json(&staging), bytes)
            .with_context(|| format!("writing {}", root_json(&staging).display()))?;
        std::fs::rename(&staging, &dir)
            .with_context(|| format!("renaming {} to {}", staging.display(), dir.display()))
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    made.map(|()| true)
}
