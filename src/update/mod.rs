//! Updates, the parts both wings share: the release index a repository publishes
//! (`release`), the one order of versions (`version`), and which release a node may move to
//! (`policy`). `keel publish` (host) writes repositories; `keel-update` (node) reads them.

pub mod policy;
pub mod release;
pub mod tuf;
pub mod version;

/// Where a repository keeps TUF metadata and targets, below its base address.
pub const METADATA_DIR: &str = "metadata";
pub const TARGETS_DIR: &str = "targets";
