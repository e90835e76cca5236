//! Signed containers: OCI image layouts with cosign-compatible signatures, the policy a node
//! applies before running one, and safe unpacking. Used by `keel container` (operator side) and
//! `keel-agent` (node side).

pub mod build;
pub mod oci;
pub mod policy;
pub mod signature;
pub mod unpack;
