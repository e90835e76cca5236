//! Attestation, both sides: the TPM structures and software TPM cryptography a verifier needs
//! (`tpm2`). A node proves with its TPM that it is an enrolled machine running a boot the
//! operator signed; see docs/attestation.md.

pub mod admission;
pub mod protocol;
pub mod tpm2;

use sha2::{Digest, Sha256};

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
