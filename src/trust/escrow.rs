//! The root volume's recovery key, escrowed: the first boot encrypts it to the operator's
//! recovery key (RSA-OAEP with SHA-256) and keeps only the ciphertext on the node
//! (`/var/lib/keel/recovery-key.escrow`); the operator decrypts it with `keel keys recover`.

use base64::Engine;
use openssl::encrypt::{Decrypter, Encrypter};
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPublic, PKey, Private};
use openssl::rsa::Padding;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What `format` says.
pub const FORMAT: &str = "keel-recovery-escrow/1";

#[derive(Debug, thiserror::Error)]
pub enum EscrowError {
    #[error("not a keel recovery escrow file: {0}")]
    Format(String),
    #[error("the file was encrypted to key {wanted}, not to this key ({have})")]
    WrongKey { wanted: String, have: String },
    #[error("encryption")]
    Crypto(#[from] openssl::error::ErrorStack),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Escrow {
    format: String,
    /// `sha256:` of the public key's DER SubjectPublicKeyInfo.
    key: String,
    rsa_oaep_sha256: String,
}

fn fingerprint<T: HasPublic>(k: &PKey<T>) -> Result<String, EscrowError> {
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(k.public_key_to_der()?))
    ))
}

/// Encrypts `secret` to `public` (PEM); the escrow file's text.
pub fn seal(public_pem: &[u8], secret: &str) -> Result<String, EscrowError> {
    let key = crate::trust::keys::public_from_pem(public_pem)?;
    let mut enc = Encrypter::new(&key)?;
    enc.set_rsa_padding(Padding::PKCS1_OAEP)?;
    enc.set_rsa_oaep_md(MessageDigest::sha256())?;
    enc.set_rsa_mgf1_md(MessageDigest::sha256())?;
    let mut out = vec![0u8; enc.encrypt_len(secret.as_bytes())?];
    let n = enc.encrypt(secret.as_bytes(), &mut out)?;
    out.truncate(n);
    let e = Escrow {
        format: FORMAT.into(),
        key: fingerprint(&key)?,
        rsa_oaep_sha256: base64::engine::general_purpose::STANDARD.encode(out),
    };
    let mut text =
        serde_json::to_string_pretty(&e).map_err(|e| EscrowError::Format(e.to_string()))?;
    text.push('\n');
    Ok(text)
}

/// Decrypts an escrow file's text with the operator's private recovery key.
pub fn open(private: &PKey<Private>, text: &str) -> Result<String, EscrowError> {
    let e: Escrow = serde_json::from_str(text).map_err(|e| EscrowError::Format(e.to_string()))?;
    if e.format != FORMAT {
        return Err(EscrowError::Format(format!(
            "format `{}`, not `{FORMAT}`",
            e.format
        )));
    }
    let have = fingerprint(private)?;
    if e.key != have {
        return Err(EscrowError::WrongKey {
            wanted: e.key,
            have,
        });
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(e.rsa_oaep_sha256.trim())
        .map_err(|e| EscrowError::Format(format!("rsa-oaep-sha256: {e}")))?;
    let mut dec = Decrypter::new(private)?;
    dec.set_rsa_padding(Padding::PKCS1_OAEP)?;
    dec.set_rsa_oaep_md(MessageDigest::sha256())?;
    dec.set_rsa_mgf1_md(MessageDigest::sha256())?;
    let mut out = vec![0u8; dec.decrypt_len(&data)?];
    let n = dec.decrypt(&data, &mut out)?;
    out.truncate(n);
    String::from_utf8(out).map_err(|e| EscrowError::Format(format!("not text: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review M5: the escrow file holds no plain text of the key, opens with the operator's
    /// key, and names (and refuses) any other key.
    #[test]
    fn escrow_round_trip_and_wrong_key() {
        let k = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).expect("rsa")).expect("pkey");
        let other = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).expect("rsa")).expect("pkey");
        let secret = "fjrtkbdh-cnvulhtb-idbijkcg-vkgnfhgl-ctlnhbdr-eebljfhn-jhcldrbn-ehrrclfc";
        let text = seal(&k.public_key_to_pem().expect("pem"), secret).expect("seal");
        assert!(!text.contains(secret) && text.contains(FORMAT), "{text}");
        assert_eq!(open(&k, &text).expect("open"), secret);
        let e = open(&other, &text).expect_err("other key");
        assert!(matches!(e, EscrowError::WrongKey { .. }), "{e}");
        assert!(open(&k, "{}").is_err());
    }
}
