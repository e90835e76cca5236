//! Keel's disks, on the ground floor (this module imports nothing else of Keel's): partition
//! types (`partition`), the layout of a fresh image (`layout`: sizes, verity sizes, UUIDs derived
//! from the root hash, repart definitions), reading a GPT (`gpt`) and a UKI (`uki`), reading and
//! editing an ESP in place (`esp`), and the A/B slot writer (`slot`).

pub mod esp;
pub mod gpt;
pub mod layout;
pub mod partition;
pub mod slot;
pub mod uki;
pub mod verity;

pub use partition::{PartitionType, EMPTY_LABEL};

/// Bytes an unprivileged writer may still use on the file system holding `path` (statvfs).
pub fn free_bytes(path: &std::path::Path) -> nix::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}
