//! `keel-net`: the overlay network between nodes, compatible with flannel's data model in etcd.
//! See `docs/networking.md`.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod files;
pub mod kernel;
pub mod lease;
pub mod masq;
pub mod plan;
pub mod state;
pub mod store;
