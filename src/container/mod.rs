//! Signed containers: cosign-compatible signatures over OCI image manifests. The agent that
//! unpacks and runs them builds on this (issue 5); so far this module verifies and creates
//! signatures.

pub mod signature;
