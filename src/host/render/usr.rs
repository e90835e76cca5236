//! The /usr file system: erofs (compressed, read-only) from an OSTree checkout, and its dm-verity
//! hash tree. Every input that could vary (timestamps, UUID, salt) is derived from the commit, so
//! the same commit always gives the same bytes and the same root hash.

use crate::host::tools::{run, run_capture, ToolsTree};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

/// 32 bytes derived from the commit for a given purpose, as hex.
pub fn derived_hex(commit: &str, purpose: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"keel:");
    h.update(purpose.as_bytes());
    h.update(b":");
    h.update(commit.as_bytes());
    hex::encode(h.finalize())
}

/// A UUID derived from the commit (erofs and verity superblock UUIDs).
pub fn derived_uuid(commit: &str, purpose: &str) -> String {
    let h = derived_hex(commit, purpose);
    // Mark it as a version 4 / RFC 4122 variant UUID so tools accept it.
    format!(
        "{}-{}-4{}-{}{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        ["8", "9", "a", "b"][usize::from(h.as_bytes()[16] % 4)],
        &h[17..20],
        &h[20..32]
    )
}

/// The root hash from `veritysetup format` output.
pub fn parse_root_hash(output: &str) -> Result<String> {
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("Root hash:") {
            let h = rest.trim();
            if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
                return Ok(h.to_ascii_lowercase());
            }
        }
    }
    bail!("veritysetup printed no root hash:\n{output}")
}

/// Builds `erofs` from the /usr tree `usr` (the commit checkout).
pub fn make_erofs(
    tools: &ToolsTree,
    usr: &Path,
    erofs: &Path,
    commit: &str,
    epoch: u64,
) -> Result<()> {
    run(tools
        .command("mkfs.erofs")?
        .arg("-zlz4hc")
        .arg("-Eztailpacking")
        .arg(format!("-T{epoch}"))
        .arg(format!("-U{}", derived_uuid(commit, "erofs-uuid")))
        .arg("-Lusr")
        .arg(erofs)
        .arg(usr))
    .with_context(|| format!("making the erofs /usr image from {}", usr.display()))
}

/// Writes the verity hash tree of `data` to `hash`; returns the root hash.
pub fn make_verity(tools: &ToolsTree, data: &Path, hash: &Path, commit: &str) -> Result<String> {
    let out = run_capture(
        tools
            .command("veritysetup")?
            .arg("format")
            .arg(format!("--salt={}", derived_hex(commit, "verity-salt")))
            .arg(format!("--uuid={}", derived_uuid(commit, "verity-uuid")))
            .arg(data)
            .arg(hash),
    )
    .with_context(|| format!("computing dm-verity hashes of {}", data.display()))?;
    parse_root_hash(&String::from_utf8_lossy(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_hash_is_parsed_from_veritysetup_output() {
        let out = "VERITY header information for usr.verity\nUUID:            \t1111\nRoot hash:      \tBF0E781C15A4B0E84669221924449C5667AC0AED26D9D568CACDF37ABE21BE3E\n";
        assert_eq!(
            parse_root_hash(out).expect("hash"),
            "bf0e781c15a4b0e84669221924449c5667ac0aed26d9d568cacdf37abe21be3e"
        );
        assert!(parse_root_hash("nothing").is_err());
    }

    #[test]
    fn derived_values_are_stable_and_distinct() {
        assert_eq!(derived_hex("c1", "salt"), derived_hex("c1", "salt"));
        assert_ne!(derived_hex("c1", "salt"), derived_hex("c2", "salt"));
        assert_ne!(derived_hex("c1", "a"), derived_hex("c1", "b"));
        let u = derived_uuid("c1", "erofs");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
