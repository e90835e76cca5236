//! Keel: build, boot and test a trusted, immutable cluster operating system made of Debian
//! packages. See `docs/architecture.md` for how the modules fit together.

pub mod agent;
pub mod boot;
pub mod build;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod compose;
pub mod container;
pub mod image;
pub mod inspect;
pub mod manifest;
pub mod net;
pub mod progress;
pub mod provision;
pub mod qemu;
pub mod render;
pub mod store;
pub mod testing;
pub mod tools;
pub mod trust;
