//! Attestation on the node: the TPM half (`tpm`), the verifier's decisions (`verifier`). See
//! docs/attestation.md.

pub mod etcd_auth;
pub mod service;
pub mod session;
pub mod tpm;
pub mod verifier;
