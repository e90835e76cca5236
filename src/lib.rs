//! Keel: build, boot and test a trusted, immutable cluster operating system made of Debian
//! packages. See `docs/architecture.md` for how the modules fit together.
//!
//! Three groups, checked by `tests/wings.rs`:
//! - [`node`]: what runs on the node (keel-agent, first-boot provisioning, keel-net);
//! - [`host`]: what runs on the operator's or build machine (build, boot, test, publish);
//! - the modules at the top: formats and logic both use. Node code never imports host code, and
//!   the shared modules import neither wing.

pub mod host;
pub mod node;

pub mod atomic;
pub mod attest;
pub mod container;
pub mod disk;
pub mod error;
pub mod image;
pub mod manifest;
pub mod tools;
pub mod trust;
pub mod update;
