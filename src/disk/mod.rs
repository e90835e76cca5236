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
