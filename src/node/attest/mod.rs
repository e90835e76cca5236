//! Attestation on the node: the TPM half (`tpm`). See docs/attestation.md.

pub mod tpm;
