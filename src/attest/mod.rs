//! Attestation, both sides: the TPM structures and software TPM cryptography a verifier needs
//! (`tpm2`). A node proves with its TPM that it is an enrolled machine running a boot the
//! operator signed; see docs/attestation.md.

pub mod admission;
pub mod protocol;
pub mod tpm2;

use sha2::{Digest, Sha256};

/// Where a first member's sealed issuer key is delivered (an Ignition file; ciphertext only its
/// TPM can import).
pub const SEALED_ISSUER_PATH: &str = "/etc/keel/attest/issuer.sealed";
/// Where the admission list and its signature are delivered.
pub const ADMISSION_PATH: &str = "/etc/keel/attest/admission.json";
pub const ADMISSION_SIG_PATH: &str = "/etc/keel/attest/admission.json.sig";

/// Files whose contents are left out of a config's measurement: each is authenticated on its
/// own (the sealed issuer by the TPM, the admission list by the CA's signature), and each
/// depends on the measurement (the issuer is sealed to it; the list pins every node's).
pub const ELIDED_PATHS: &[&str] = &[SEALED_ISSUER_PATH, ADMISSION_PATH, ADMISSION_SIG_PATH];

/// The sha256 (hex) of a provisioning config as measured into PCR 12. It is the hash of the
/// config's bytes, except for a config that delivers one of [`ELIDED_PATHS`]: a sealed issuer
/// is sealed to the PCR 12 value of the config it travels in, and the admission list pins that
/// value, so their contents cannot be part of what is measured. Such a config is measured as
/// its JSON with those files' `contents.source` emptied (keys sorted, no spaces), under its own
/// domain tag. Leaving them out loses nothing: a swapped blob yields a key that does not match
/// the issuer certificate the (measured) config names, and a list counts only when the CA
/// signed it.
pub fn measured_config_sha256(bytes: &[u8]) -> String {
    let plain = || hex::encode(Sha256::digest(bytes));
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return plain();
    };
    let Some(files) = v
        .pointer_mut("/storage/files")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return plain();
    };
    let mut found = false;
    for f in files.iter_mut() {
        let path = f.get("path").and_then(serde_json::Value::as_str);
        if path.is_some_and(|p| ELIDED_PATHS.contains(&p)) {
            if let Some(src) = f.pointer_mut("/contents/source") {
                *src = serde_json::Value::String(String::new());
                found = true;
            }
        }
    }
    if !found {
        return plain();
    }
    let canonical = serde_json::to_vec(&v).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(b"keel-ignition-attest-files-elided/v1\0");
    h.update(&canonical);
    hex::encode(h.finalize())
}

/// What a quote's qualifying data commits to: the verifier's nonce, the secret only the enrolled
/// TPM could release (credential activation), the certificate request the node wants signed and
/// the name it asks for. A quote made for one session, key or name is worthless in another.
pub fn qualifying_data(nonce: &[u8], secret: &[u8], csr_der: &[u8], name: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"keel-attest/v1\0");
    h.update((nonce.len() as u32).to_be_bytes());
    h.update(nonce);
    h.update((secret.len() as u32).to_be_bytes());
    h.update(secret);
    h.update(Sha256::digest(csr_der));
    h.update(name.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sealed_issuer_blob_is_left_out_of_the_measurement() {
        let plain = br#"{"ignition":{"version":"3.4.0"},"storage":{"files":[{"path":"/etc/a","contents":{"source":"data:,x"}}]}}"#;
        assert_eq!(
            measured_config_sha256(plain),
            hex::encode(Sha256::digest(plain))
        );
        let with = |blob: &str, other: &str| {
            format!(
                r#"{{"ignition":{{"version":"3.4.0"}},"storage":{{"files":[{{"path":"/etc/a","contents":{{"source":"data:,{other}"}}}},{{"path":"{SEALED_ISSUER_PATH}","contents":{{"source":"data:,{blob}"}}}}]}}}}"#
            )
        };
        let a = measured_config_sha256(with("blob1", "x").as_bytes());
        assert_eq!(a, measured_config_sha256(with("blob2", "x").as_bytes()));
        assert_ne!(a, measured_config_sha256(with("blob1", "y").as_bytes()));
        assert_ne!(
            a,
            hex::encode(Sha256::digest(with("blob1", "x").as_bytes()))
        );
    }
}
