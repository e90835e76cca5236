//! Reading a disk image's GPT (the `gpt` crate, 512-byte sectors, as Keel's images are written).

use super::partition::{type_name, PartitionType};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// One partition of a disk image as a byte range.
#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub number: u32,
    /// systemd's name of the type (`usr-x86-64`), or the type GUID for types Keel does not use.
    #[serde(rename = "type")]
    pub type_: String,
    /// The type, when Keel knows it.
    #[serde(skip)]
    pub kind: Option<PartitionType>,
    pub uuid: String,
    pub label: String,
    pub offset: u64,
    pub size: u64,
    pub flags: u64,
}

impl Partition {
    pub fn is(&self, t: PartitionType) -> bool {
        self.kind == Some(t)
    }
}

/// The disk's GUID and its partitions in table order.
pub fn read(path: &Path) -> Result<(String, Vec<Partition>)> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(path)
        .with_context(|| format!("reading the GPT of {}", path.display()))?;
    let mut parts = Vec::new();
    for (n, p) in disk.partitions() {
        let guid = p.part_type_guid.guid.to_string();
        parts.push(Partition {
            number: *n,
            type_: type_name(&guid),
            kind: PartitionType::from_guid(&guid),
            uuid: p.part_guid.to_string(),
            label: p.name.clone(),
            offset: p.first_lba * 512,
            size: (p.last_lba + 1 - p.first_lba) * 512,
            flags: p.flags,
        });
    }
    Ok((disk.guid().to_string(), parts))
}

/// Gives partitions new UUIDs and labels, `(number, uuid, label)`, and writes the GPT (both
/// copies).
pub fn relabel(path: &Path, changes: &[(u32, &str, &str)]) -> Result<()> {
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(path)
        .with_context(|| format!("opening the GPT of {}", path.display()))?;
    let mut parts = disk.partitions().clone();
    for (num, uuid, label) in changes {
        let p = parts
            .get_mut(num)
            .with_context(|| format!("{} has no partition {num}", path.display()))?;
        p.part_guid = uuid
            .parse()
            .with_context(|| format!("`{uuid}` is not a UUID"))?;
        p.name = label.to_string();
    }
    disk.update_partitions(parts)
        .with_context(|| format!("updating the partition entries of {}", path.display()))?;
    disk.write()
        .with_context(|| format!("writing the GPT of {}", path.display()))?;
    Ok(())
}
