//! The operator's key directory (`keel keys init DIR`): Secure Boot PK, KEK and db, and the two
//! RSA keys that sign PCR 11 policies. Private keys never leave DIR (mode 0600); images carry
//! only certificates and public keys.

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectKeyIdentifier};
use openssl::x509::{X509Builder, X509NameBuilder, X509};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File names inside a key directory.
pub mod file {
    pub const PK_KEY: &str = "PK.key";
    pub const PK_CRT: &str = "PK.crt";
    pub const KEK_KEY: &str = "KEK.key";
    pub const KEK_CRT: &str = "KEK.crt";
    pub const DB_KEY: &str = "db.key";
    pub const DB_CRT: &str = "db.crt";
    /// EFI signature owner GUID used when enrolling PK/KEK/db.
    pub const OWNER: &str = "owner.guid";
    /// Signs the PCR 11 policy of the `enter-initrd` phase only: the root partition's key is
    /// sealed to this key, so the TPM releases it in the initrd of an operator-signed UKI only.
    pub const PCR_INITRD_KEY: &str = "pcr-initrd.key";
    pub const PCR_INITRD_PUB: &str = "pcr-initrd.pub.pem";
    /// Signs the later phases (after leaving the initrd); used for boot-state checks on the node.
    pub const PCR_BOOT_KEY: &str = "pcr-boot.key";
    pub const PCR_BOOT_PUB: &str = "pcr-boot.pub.pem";
    /// ECDSA P-256 key that signs container images and enrolled-machine lists (cosign's scheme).
    pub const CONTAINER_KEY: &str = "container-signing.key";
    pub const CONTAINER_PUB: &str = "container-signing.pub.pem";
    /// RSA key the first boot encrypts the root volume's recovery key to (RSA-OAEP, SHA-256):
    /// the node keeps only the ciphertext; the operator decrypts it with `keel keys recover`.
    pub const RECOVERY_KEY: &str = "recovery.key";
    pub const RECOVERY_PUB: &str = "recovery.pub.pem";
}

/// Size of the recovery escrow key (decrypting needs no firmware or TPM support).
const RECOVERY_BITS: u32 = 3072;

const CERT_DAYS: u32 = 3650;
const RSA_BITS: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key directory {0} already holds files; keys are never overwritten (choose an empty or new directory)")]
    NotEmpty(PathBuf),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(
        "{path}: private key is readable by group or others (mode {mode:o}); run chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("generating keys")]
    Crypto(#[from] openssl::error::ErrorStack),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A loaded key directory.
pub struct Keys {
    pub dir: PathBuf,
    pub db_key: PathBuf,
    pub db_crt: PathBuf,
    pub pk_crt: PathBuf,
    pub kek_crt: PathBuf,
    pub owner_guid: String,
    pub pcr_initrd: PKey<Private>,
    pub pcr_initrd_pub_pem: Vec<u8>,
    pub pcr_boot: PKey<Private>,
    pub pcr_boot_pub_pem: Vec<u8>,
    /// The recovery escrow key's public half (shipped under /usr).
    pub recovery_pub_pem: Vec<u8>,
}

fn rsa_key() -> Result<PKey<Private>, KeyError> {
    Ok(PKey::from_rsa(Rsa::generate(RSA_BITS)?)?)
}

fn self_signed(cn: &str, key: &PKey<Private>, ca: bool) -> Result<X509, KeyError> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    let name = name.build();
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(key)?;
    let (from, until) = (
        Asn1Time::days_from_now(0)?,
        Asn1Time::days_from_now(CERT_DAYS)?,
    );
    b.set_not_before(&from)?;
    b.set_not_after(&until)?;
    let mut bc = BasicConstraints::new();
    bc.critical();
    if ca {
        bc.ca();
    }
    b.append_extension(bc.build()?)?;
    let mut ku = KeyUsage::new();
    ku.critical().digital_signature();
    if ca {
        ku.key_cert_sign();
    }
    b.append_extension(ku.build()?)?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(key, MessageDigest::sha256())?;
    Ok(b.build())
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// A random GUID (version 4) in the textual form EFI tools expect.
fn random_guid() -> Result<String, KeyError> {
    let mut b = [0u8; 16];
    openssl::rand::rand_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    crate::disk::layout::uuid_from_hex(&hex::encode(b)).map_err(|e| KeyError::File {
        path: PathBuf::from(file::OWNER),
        message: format!("{e:#}"),
    })
}

/// Creates a new key directory. `label` names the owner in certificate subjects. The keys are
/// written into a sibling staging directory and renamed into place, so an interrupted run leaves
/// no half-filled key directory.
pub fn init(dir: &Path, label: &str) -> Result<(), KeyError> {
    if dir.exists() {
        let empty = fs::read_dir(dir)
            .map_err(|e| KeyError::File {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?
            .next()
            .is_none();
        if !empty {
            return Err(KeyError::NotEmpty(dir.to_path_buf()));
        }
        fs::remove_dir(dir).map_err(|source| KeyError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|source| KeyError::Write {
        path: parent.to_path_buf(),
        source,
    })?;
    let staging = parent.join(format!(
        ".{}.keel-keys-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).map_err(|source| KeyError::Write {
        path: staging.clone(),
        source,
    })?;
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o700)).map_err(|source| {
        KeyError::Write {
            path: staging.clone(),
            source,
        }
    })?;
    let result = (|| {
        for (key_file, crt_file, cn, ca) in [
            (
                file::PK_KEY,
                file::PK_CRT,
                format!("{label} Platform Key"),
                true,
            ),
            (
                file::KEK_KEY,
                file::KEK_CRT,
                format!("{label} Key Exchange Key"),
                true,
            ),
            (
                file::DB_KEY,
                file::DB_CRT,
                format!("{label} Image Signing Key"),
                false,
            ),
        ] {
            let key = rsa_key()?;
            let crt = self_signed(&cn, &key, ca)?;
            write_file(
                &staging.join(key_file),
                &key.private_key_to_pem_pkcs8()?,
                0o600,
            )?;
            write_file(&staging.join(crt_file), &crt.to_pem()?, 0o644)?;
        }
        for (key_file, pub_file) in [
            (file::PCR_INITRD_KEY, file::PCR_INITRD_PUB),
            (file::PCR_BOOT_KEY, file::PCR_BOOT_PUB),
        ] {
            let key = rsa_key()?;
            write_file(
                &staging.join(key_file),
                &key.private_key_to_pem_pkcs8()?,
                0o600,
            )?;
            write_file(&staging.join(pub_file), &key.public_key_to_pem()?, 0o644)?;
        }
        write_container_key(&staging)?;
        write_recovery_key(&staging)?;
        write_file(
            &staging.join(file::OWNER),
            format!("{}\n", random_guid()?).as_bytes(),
            0o644,
        )?;
        fs::rename(&staging, dir).map_err(|source| KeyError::Write {
            path: dir.to_path_buf(),
            source,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

fn write_container_key(dir: &Path) -> Result<(), KeyError> {
    let key = crate::container::signature::generate_key()?;
    write_file(
        &dir.join(file::CONTAINER_KEY),
        &key.private_key_to_pem_pkcs8()?,
        0o600,
    )?;
    write_file(
        &dir.join(file::CONTAINER_PUB),
        &key.public_key_to_pem()?,
        0o644,
    )
}

fn write_recovery_key(dir: &Path) -> Result<(), KeyError> {
    let key = PKey::from_rsa(Rsa::generate(RECOVERY_BITS)?)?;
    write_file(
        &dir.join(file::RECOVERY_KEY),
        &key.private_key_to_pem_pkcs8()?,
        0o600,
    )?;
    write_file(
        &dir.join(file::RECOVERY_PUB),
        &key.public_key_to_pem()?,
        0o644,
    )
}

/// Adds the recovery escrow key to a key directory made before it existed; returns whether it
/// was created (an existing key is never replaced).
pub fn ensure_recovery_key(dir: &Path) -> Result<bool, KeyError> {
    ensure_key(dir, file::RECOVERY_KEY, write_recovery_key)
}

/// Writes a key with `write` unless `name` is already in the key directory `dir`.
fn ensure_key(
    dir: &Path,
    name: &str,
    write: fn(&Path) -> Result<(), KeyError>,
) -> Result<bool, KeyError> {
    if dir.join(name).exists() {
        return Ok(false);
    }
    if !dir.is_dir() {
        return Err(KeyError::File {
            path: dir.to_path_buf(),
            message: "no such key directory; create one with `keel keys init DIR`".into(),
        });
    }
    write(dir)?;
    Ok(true)
}

/// The recovery escrow private key of a key directory (mode checked).
pub fn recovery_key(dir: &Path) -> Result<PKey<Private>, KeyError> {
    private(dir, file::RECOVERY_KEY).map(|(_, k)| k)
}

/// Adds the container-signing key to a key directory made before it existed; returns whether
/// it was created (an existing key is never replaced).
pub fn ensure_container_key(dir: &Path) -> Result<bool, KeyError> {
    ensure_key(dir, file::CONTAINER_KEY, write_container_key)
}

/// The container-signing private key of a key directory (mode checked).
pub fn container_key(dir: &Path) -> Result<PKey<Private>, KeyError> {
    private(dir, file::CONTAINER_KEY).map(|(_, k)| k)
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, KeyError> {
    let path = dir.join(name);
    fs::read(&path).map_err(|e| KeyError::File {
        message: format!(
            "cannot read ({e}); the key directory must hold every file `keel keys init` writes"
        ),
        path,
    })
}

fn private(dir: &Path, name: &str) -> Result<(PathBuf, PKey<Private>), KeyError> {
    let path = dir.join(name);
    let data = read(dir, name)?;
    let mode = fs::metadata(&path)
        .map_err(|e| KeyError::File {
            path: path.clone(),
            message: e.to_string(),
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path, mode });
    }
    let key = PKey::private_key_from_pem(&data).map_err(|e| KeyError::File {
        path: path.clone(),
        message: format!("not a PEM private key: {e}"),
    })?;
    Ok((path, key))
}

/// Public key from PEM (SubjectPublicKeyInfo or PKCS#1).
pub fn public_from_pem(pem: &[u8]) -> Result<PKey<Public>, openssl::error::ErrorStack> {
    PKey::public_key_from_pem(pem).or_else(|_| PKey::from_rsa(Rsa::public_key_from_pem_pkcs1(pem)?))
}

impl Keys {
    /// Loads and checks a key directory; every problem names the file.
    pub fn load(dir: &Path) -> Result<Keys, KeyError> {
        if !dir.is_dir() {
            return Err(KeyError::File {
                path: dir.to_path_buf(),
                message: "no such key directory; create one with `keel keys init DIR`".into(),
            });
        }
        let (db_key, _) = private(dir, file::DB_KEY)?;
        for crt in [file::DB_CRT, file::PK_CRT, file::KEK_CRT] {
            X509::from_pem(&read(dir, crt)?).map_err(|e| KeyError::File {
                path: dir.join(crt),
                message: format!("not a PEM certificate: {e}"),
            })?;
        }
        let (_, pcr_initrd) = private(dir, file::PCR_INITRD_KEY)?;
        let (_, pcr_boot) = private(dir, file::PCR_BOOT_KEY)?;
        let recovery_pub_pem = fs::read(dir.join(file::RECOVERY_PUB)).map_err(|e| KeyError::File {
            path: dir.join(file::RECOVERY_PUB),
            message: format!(
                "cannot read ({e}); key directories made before the recovery key was escrowed need one: `keel keys add-recovery-key {}`",
                dir.display()
            ),
        })?;
        public_from_pem(&recovery_pub_pem).map_err(|e| KeyError::File {
            path: dir.join(file::RECOVERY_PUB),
            message: format!("not a PEM public key: {e}"),
        })?;
        let owner = String::from_utf8_lossy(&read(dir, file::OWNER)?)
            .trim()
            .to_string();
        if owner.len() != 36 || owner.matches('-').count() != 4 {
            return Err(KeyError::File {
                path: dir.join(file::OWNER),
                message: format!("`{owner}` is not a GUID"),
            });
        }
        Ok(Keys {
            dir: dir.to_path_buf(),
            db_key,
            db_crt: dir.join(file::DB_CRT),
            pk_crt: dir.join(file::PK_CRT),
            kek_crt: dir.join(file::KEK_CRT),
            owner_guid: owner,
            pcr_initrd_pub_pem: pcr_initrd.public_key_to_pem()?,
            pcr_initrd,
            pcr_boot_pub_pem: pcr_boot.public_key_to_pem()?,
            pcr_boot,
            recovery_pub_pem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_private_keys_0600_and_loads() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("keys");
        init(&dir, "Test").expect("init");
        for f in [
            file::PK_KEY,
            file::KEK_KEY,
            file::DB_KEY,
            file::PCR_INITRD_KEY,
            file::PCR_BOOT_KEY,
        ] {
            let mode = fs::metadata(dir.join(f))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let keys = Keys::load(&dir).expect("load");
        assert!(String::from_utf8_lossy(&keys.pcr_initrd_pub_pem).contains("PUBLIC KEY"));
        assert_ne!(keys.pcr_initrd_pub_pem, keys.pcr_boot_pub_pem);
        // Never overwritten.
        assert!(matches!(init(&dir, "Test"), Err(KeyError::NotEmpty(_))));
        // No staging leftovers next to the directory.
        let names: Vec<_> = fs::read_dir(t.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn load_names_the_missing_or_unsafe_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("keys");
        init(&dir, "Test").expect("init");
        fs::set_permissions(dir.join(file::DB_KEY), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let e = Keys::load(&dir).err().expect("error").to_string();
        assert!(e.contains("db.key") && e.contains("chmod 600"), "{e}");
        fs::set_permissions(dir.join(file::DB_KEY), fs::Permissions::from_mode(0o600))
            .expect("chmod");
        fs::remove_file(dir.join(file::PCR_BOOT_KEY)).expect("rm");
        let e = Keys::load(&dir).err().expect("error").to_string();
        assert!(e.contains("pcr-boot.key"), "{e}");
        let e = Keys::load(&t.path().join("nope"))
            .err()
            .expect("error")
            .to_string();
        assert!(e.contains("keel keys init"), "{e}");
    }
}
