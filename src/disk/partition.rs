//! The partition types Keel's disks use (Discoverable Partitions Specification), named once: the
//! type GUID, the name systemd-repart's `Type=` takes, and the name `systemd-id128`/`sfdisk` and
//! `keel inspect` show.

use serde::Serialize;

/// The label of a slot that holds no version (what systemd-sysupdate looks for).
pub const EMPTY_LABEL: &str = "_empty";

/// A partition type of a Keel disk (x86-64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PartitionType {
    /// The EFI System Partition: systemd-boot, the UKIs, an embedded Ignition config.
    Esp,
    /// A /usr slot (erofs), A or B.
    Usr,
    /// The dm-verity hash tree of a /usr slot.
    UsrVerity,
    /// The root file system the node creates on first boot.
    Root,
    /// A dm-verity hash tree of a root partition (not used by Keel; recognised by inspect).
    RootVerity,
    /// A separate /var (not used by Keel; recognised by inspect).
    Var,
}

impl PartitionType {
    pub const ALL: [PartitionType; 6] = [
        PartitionType::Esp,
        PartitionType::Usr,
        PartitionType::UsrVerity,
        PartitionType::Root,
        PartitionType::RootVerity,
        PartitionType::Var,
    ];

    /// The type GUID (lower case), as written in the GPT.
    pub fn guid(self) -> &'static str {
        match self {
            PartitionType::Esp => "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            PartitionType::Usr => "8484680c-9521-48c6-9c11-b0720656f69e",
            PartitionType::UsrVerity => "77ff5f63-e7b6-4633-acf4-1565b864c0e6",
            PartitionType::Root => "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            PartitionType::RootVerity => "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5",
            PartitionType::Var => "4d21b016-b534-45c2-a9fb-5c16e091fd2d",
        }
    }

    /// The architecture-independent name systemd-repart's `Type=` takes (it picks the host's
    /// architecture, x86-64 here).
    pub fn repart_type(self) -> &'static str {
        match self {
            PartitionType::Esp => "esp",
            PartitionType::Usr => "usr",
            PartitionType::UsrVerity => "usr-verity",
            PartitionType::Root => "root",
            PartitionType::RootVerity => "root-verity",
            PartitionType::Var => "var",
        }
    }

    /// The full name systemd gives the type (`usr-x86-64`), as `keel inspect` prints it.
    pub fn name(self) -> &'static str {
        match self {
            PartitionType::Esp => "esp",
            PartitionType::Usr => "usr-x86-64",
            PartitionType::UsrVerity => "usr-x86-64-verity",
            PartitionType::Root => "root-x86-64",
            PartitionType::RootVerity => "root-x86-64-verity",
            PartitionType::Var => "var",
        }
    }

    /// The type of a GUID as read from a GPT (any case); `None` for types Keel does not use.
    pub fn from_guid(guid: &str) -> Option<PartitionType> {
        let g = guid.to_ascii_lowercase();
        Self::ALL.into_iter().find(|t| t.guid() == g)
    }
}

/// The name of a type GUID: systemd's name for the types Keel knows, else the GUID itself.
pub fn type_name(guid: &str) -> String {
    PartitionType::from_guid(guid)
        .map(|t| t.name().to_string())
        .unwrap_or_else(|| guid.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_guids_round_trip() {
        for t in PartitionType::ALL {
            assert_eq!(PartitionType::from_guid(&t.guid().to_uppercase()), Some(t));
        }
        assert_eq!(
            type_name("8484680C-9521-48C6-9C11-B0720656F69E"),
            "usr-x86-64"
        );
        assert_eq!(
            type_name("00000000-0000-0000-0000-000000000001"),
            "00000000-0000-0000-0000-000000000001"
        );
    }
}
