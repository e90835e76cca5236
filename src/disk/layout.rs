//! The disk layout, computed on plain data: partition sizes, dm-verity hash sizes, the UUIDs the
//! initrd derives from the root hash, and the systemd-repart definitions that write the GPT.
//!
//! Layout (Discoverable Partitions Specification, 512-byte sectors):
//! ESP | usr A | usr A verity | usr B (`_empty`) | usr B verity (`_empty`) | (root, made on first boot)

use super::partition::{PartitionType, EMPTY_LABEL};
use anyhow::{bail, Result};

pub const VERITY_BLOCK: u64 = 4096;
const DIGEST: u64 = 32;
const MIB: u64 = 1 << 20;

/// Size in bytes of a dm-verity hash device (superblock + tree) for `data_bytes` of data
/// (4096-byte blocks, sha256).
pub fn verity_hash_bytes(data_bytes: u64) -> u64 {
    let mut blocks = data_bytes.div_ceil(VERITY_BLOCK);
    let per_block = VERITY_BLOCK / DIGEST;
    let mut total = 0;
    loop {
        blocks = blocks.div_ceil(per_block);
        total += blocks;
        if blocks <= 1 {
            break;
        }
    }
    (total + 1) * VERITY_BLOCK
}

/// The verity partition size for a usr slot of `slot_bytes`, in whole MiB with room to spare.
pub fn verity_partition_bytes(slot_bytes: u64) -> u64 {
    let need = verity_hash_bytes(slot_bytes);
    need.div_ceil(MIB) * MIB + MIB
}

/// Formats 16 bytes as a GPT/RFC 4122 UUID string (bytes in written order, as systemd does when it
/// derives partition UUIDs from a verity root hash).
pub fn uuid_from_hex(hex32: &str) -> Result<String> {
    if hex32.len() != 32 || !hex32.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("`{hex32}` is not 32 hex digits");
    }
    let h = hex32.to_ascii_lowercase();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// The data and hash partition UUIDs for a verity root hash: its first and last 128 bits.
pub fn verity_uuids(root_hash: &str) -> Result<(String, String)> {
    if root_hash.len() != 64 {
        bail!("verity root hash `{root_hash}` is not 64 hex digits");
    }
    Ok((
        uuid_from_hex(&root_hash[..32])?,
        uuid_from_hex(&root_hash[32..])?,
    ))
}

/// One partition as systemd-repart should create it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDef {
    /// File name of the definition (orders the partitions).
    pub file: String,
    pub type_: PartitionType,
    pub label: String,
    pub uuid: Option<String>,
    pub size: u64,
    /// Raw content copied block for block.
    pub copy_blocks: Option<String>,
    /// A directory copied into a new file system of `format`.
    pub copy_files: Option<String>,
    pub format: Option<&'static str>,
    pub read_only: bool,
}

impl PartitionDef {
    /// The repart.d text for this partition.
    pub fn to_repart(&self) -> String {
        let mut s = format!(
            "[Partition]\nType={}\nLabel={}\n",
            self.type_.repart_type(),
            self.label
        );
        if let Some(u) = &self.uuid {
            s.push_str(&format!("UUID={u}\n"));
        }
        if let Some(f) = self.format {
            s.push_str(&format!("Format={f}\n"));
        }
        if let Some(c) = &self.copy_files {
            s.push_str(&format!("CopyFiles={c}:/\n"));
        }
        if let Some(c) = &self.copy_blocks {
            s.push_str(&format!("CopyBlocks={c}\n"));
        }
        if self.read_only {
            s.push_str("ReadOnly=yes\n");
        }
        s.push_str(&format!("SizeMinBytes={0}\nSizeMaxBytes={0}\n", self.size));
        s
    }
}

/// Inputs of the layout.
#[derive(Debug, Clone)]
pub struct LayoutInput<'a> {
    pub label: &'a str,
    pub esp_dir: &'a str,
    pub esp_bytes: u64,
    pub usr_image: &'a str,
    pub usr_image_bytes: u64,
    pub verity_image: &'a str,
    pub verity_image_bytes: u64,
    pub slot_bytes: u64,
    pub root_hash: &'a str,
}

/// The five partitions of a fresh image.
pub fn partitions(i: &LayoutInput) -> Result<Vec<PartitionDef>> {
    let verity_bytes = verity_partition_bytes(i.slot_bytes);
    if i.usr_image_bytes > i.slot_bytes {
        bail!(
            "the /usr file system is {} MiB but usr-size is {} MiB: raise usr-size in the image definition",
            i.usr_image_bytes.div_ceil(MIB),
            i.slot_bytes / MIB
        );
    }
    if i.verity_image_bytes > verity_bytes {
        bail!(
            "verity hash tree of {} bytes does not fit its {verity_bytes}-byte partition",
            i.verity_image_bytes
        );
    }
    let (data_uuid, hash_uuid) = verity_uuids(i.root_hash)?;
    Ok(vec![
        PartitionDef {
            file: "00-esp.conf".into(),
            type_: PartitionType::Esp,
            label: "ESP".into(),
            uuid: None,
            size: i.esp_bytes,
            copy_blocks: None,
            copy_files: Some(i.esp_dir.into()),
            format: Some("vfat"),
            read_only: false,
        },
        PartitionDef {
            file: "10-usr-a.conf".into(),
            type_: PartitionType::Usr,
            label: i.label.into(),
            uuid: Some(data_uuid),
            size: i.slot_bytes,
            copy_blocks: Some(i.usr_image.into()),
            copy_files: None,
            format: None,
            read_only: true,
        },
        PartitionDef {
            file: "11-usr-a-verity.conf".into(),
            type_: PartitionType::UsrVerity,
            label: i.label.into(),
            uuid: Some(hash_uuid),
            size: verity_bytes,
            copy_blocks: Some(i.verity_image.into()),
            copy_files: None,
            format: None,
            read_only: true,
        },
        PartitionDef {
            file: "20-usr-b.conf".into(),
            type_: PartitionType::Usr,
            label: EMPTY_LABEL.into(),
            uuid: None,
            size: i.slot_bytes,
            copy_blocks: None,
            copy_files: None,
            format: None,
            read_only: true,
        },
        PartitionDef {
            file: "21-usr-b-verity.conf".into(),
            type_: PartitionType::UsrVerity,
            label: EMPTY_LABEL.into(),
            uuid: None,
            size: verity_bytes,
            copy_blocks: None,
            copy_files: None,
            format: None,
            read_only: true,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verity_sizes_match_veritysetup() {
        // veritysetup format of a 65404-block erofs image reported 516 hash blocks and a hash
        // device of 2117632 bytes (superblock included).
        assert_eq!(verity_hash_bytes(65404 * 4096), 2_117_632);
        // One data block: one hash block plus the superblock.
        assert_eq!(verity_hash_bytes(4096), 8192);
        // 1 GiB: 262144 blocks -> 2048 + 16 + 1 hash blocks + superblock.
        assert_eq!(verity_hash_bytes(1 << 30), (2048 + 16 + 1 + 1) * 4096);
    }

    #[test]
    fn verity_partition_is_whole_mib_and_large_enough() {
        for slot in [64u64 << 20, 512 << 20, 1 << 30, 4 << 30] {
            let p = verity_partition_bytes(slot);
            assert_eq!(p % MIB, 0);
            assert!(p >= verity_hash_bytes(slot), "slot {slot}");
        }
    }

    #[test]
    fn uuids_are_the_halves_of_the_root_hash() {
        let rh = "bf0e781c15a4b0e84669221924449c5667ac0aed26d9d568cacdf37abe21be3e";
        let (d, h) = verity_uuids(rh).expect("uuids");
        // What systemd-veritysetup-generator looked for when booting this hash.
        assert_eq!(d, "bf0e781c-15a4-b0e8-4669-221924449c56");
        assert_eq!(h, "67ac0aed-26d9-d568-cacd-f37abe21be3e");
        assert!(verity_uuids("abc").is_err());
    }

    fn input<'a>(usr_bytes: u64) -> LayoutInput<'a> {
        LayoutInput {
            label: "keel_1.0",
            esp_dir: "/w/esp",
            esp_bytes: 256 << 20,
            usr_image: "/w/usr.erofs",
            usr_image_bytes: usr_bytes,
            verity_image: "/w/usr.verity",
            verity_image_bytes: verity_hash_bytes(usr_bytes),
            slot_bytes: 1 << 30,
            root_hash: "bf0e781c15a4b0e84669221924449c5667ac0aed26d9d568cacdf37abe21be3e",
        }
    }

    #[test]
    fn five_partitions_with_an_empty_b_slot() {
        let p = partitions(&input(300 << 20)).expect("layout");
        let kinds: Vec<(&str, &str)> = p
            .iter()
            .map(|x| (x.type_.repart_type(), x.label.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("esp", "ESP"),
                ("usr", "keel_1.0"),
                ("usr-verity", "keel_1.0"),
                ("usr", "_empty"),
                ("usr-verity", "_empty"),
            ]
        );
        assert_eq!(p[1].size, p[3].size, "A and B slots have the same size");
        assert_eq!(p[2].size, p[4].size);
        assert_eq!(
            p[1].uuid.as_deref(),
            Some("bf0e781c-15a4-b0e8-4669-221924449c56")
        );
        let text = p[1].to_repart();
        assert!(
            text.contains("CopyBlocks=/w/usr.erofs\n")
                && text.contains("SizeMaxBytes=1073741824\n"),
            "{text}"
        );
        assert!(
            p[0].to_repart().contains("CopyFiles=/w/esp:/\nFormat=vfat")
                || p[0].to_repart().contains("Format=vfat\nCopyFiles=/w/esp:/")
        );
    }

    #[test]
    fn usr_too_large_for_slot_is_an_error_that_names_the_fix() {
        let err = partitions(&input(2 << 30))
            .expect_err("too big")
            .to_string();
        assert!(err.contains("raise usr-size"), "{err}");
    }
}
