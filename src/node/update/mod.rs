//! keel-update: the node's side of updates (docs/updates.md). `state` is the state machine on
//! plain data, `config` the image's and node's settings, `node` the files it keeps, `check` the
//! question "which release, if any, and why not", `cli` the commands.

pub mod check;
pub mod cli;
pub mod config;
pub mod health;
pub mod install;
pub mod loader;
pub mod node;
pub mod probe;
pub mod sealed;
pub mod state;
