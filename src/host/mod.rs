//! Code that runs on the operator's or build machine: the `keel` command (build, inspect, boot,
//! test, keys, containers, cluster configs). It may use everything else in the crate.

pub mod bench;
pub mod boot;
pub mod build;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod compose;
pub mod container;
pub mod history;
pub mod ignition;
pub mod inspect;
pub mod keys;
pub mod progress;
pub mod publish;
pub mod qemu;
pub mod render;
pub mod space;
pub mod store;
pub mod testing;
pub mod tools;
