//! dm-verity in Rust: the superblock `veritysetup format` writes, and the hash tree of a data
//! image computed and compared with a stored one (format 1, sha256, salt before the block; the
//! levels stored top first after the superblock block, as the kernel's dm-verity reads them).
//! `keel-update` checks a downloaded /usr and its tree with this before either reaches a slot,
//! and `keel publish` before it publishes them.

use sha2::{Digest, Sha256};
use std::io::Read;

const SIGNATURE: &[u8; 8] = b"verity\0\0";
const DIGEST: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerityError {
    #[error("the hash device has no dm-verity superblock (signature `verity`)")]
    NoSuperblock,
    #[error("dm-verity superblock: {0}")]
    Unsupported(String),
    #[error("the data ends after {read} of {expected} bytes")]
    ShortData { read: u64, expected: u64 },
    #[error("reading the data: {0}")]
    Read(String),
    #[error("the hash device holds {have} bytes; its tree needs {need}")]
    ShortHash { have: u64, need: u64 },
    #[error("the stored hash tree differs from the data's at block {block} of the hash device")]
    TreeMismatch { block: u64 },
}

/// The fields of a version 1 superblock that Keel's images use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

impl Superblock {
    /// Reads the superblock at the start of a hash device.
    pub fn parse(b: &[u8]) -> Result<Superblock, VerityError> {
        if b.len() < 512 || &b[..8] != SIGNATURE {
            return Err(VerityError::NoSuperblock);
        }
        let version = u32_at(b, 8);
        let hash_type = u32_at(b, 12);
        let algorithm: Vec<u8> = b[32..64].iter().copied().take_while(|c| *c != 0).collect();
        let data_block_size = u32_at(b, 64);
        let hash_block_size = u32_at(b, 68);
        let mut blocks = [0u8; 8];
        blocks.copy_from_slice(&b[72..80]);
        let data_blocks = u64::from_le_bytes(blocks);
        let salt_size = usize::from(u16::from_le_bytes([b[80], b[81]]));
        if version != 1 || hash_type != 1 {
            return Err(VerityError::Unsupported(format!(
                "version {version}, hash type {hash_type} (Keel writes version 1, type 1)"
            )));
        }
        if algorithm != b"sha256" {
            return Err(VerityError::Unsupported(format!(
                "hash algorithm `{}` (Keel writes sha256)",
                String::from_utf8_lossy(&algorithm)
            )));
        }
        let sizes_ok = |s: u32| s.is_power_of_two() && (512..=65536).contains(&s);
        if !sizes_ok(data_block_size)
            || !sizes_ok(hash_block_size)
            || salt_size > 256
            || data_blocks == 0
        {
            return Err(VerityError::Unsupported(format!(
                "block sizes {data_block_size}/{hash_block_size}, {data_blocks} data blocks, salt of {salt_size} bytes"
            )));
        }
        Ok(Superblock {
            data_block_size,
            hash_block_size,
            data_blocks,
            salt: b[88..88 + salt_size].to_vec(),
        })
    }

    /// Bytes of data the tree covers.
    pub fn data_bytes(&self) -> u64 {
        self.data_blocks * u64::from(self.data_block_size)
    }
}

fn salted(salt: &[u8], block: &[u8]) -> [u8; DIGEST] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The hash tree of `data` (exactly `sb.data_blocks` blocks are read): the levels as the hash
/// device stores them after its superblock block (top level first), and the root hash.
pub fn tree(data: &mut impl Read, sb: &Superblock) -> Result<(Vec<u8>, [u8; DIGEST]), VerityError> {
    let (dbs, hbs) = (sb.data_block_size as usize, sb.hash_block_size as usize);
    // Level 0: one digest per data block, packed into hash blocks (zero-padded).
    let mut level = Vec::new();
    let mut block = vec![0u8; dbs];
    for n in 0..sb.data_blocks {
        data.read_exact(&mut block).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => VerityError::ShortData {
                read: n * dbs as u64,
                expected: sb.data_bytes(),
            },
            _ => VerityError::Read(e.to_string()),
        })?;
        level.extend_from_slice(&salted(&sb.salt, &block));
    }
    let pad = |v: &mut Vec<u8>| {
        let len = v.len().div_ceil(hbs).max(1) * hbs;
        v.resize(len, 0);
    };
    // One data block: no tree, its digest is the root (the kernel computes zero levels).
    if sb.data_blocks == 1 {
        let mut root = [0u8; DIGEST];
        root.copy_from_slice(&level[..DIGEST]);
        return Ok((Vec::new(), root));
    }
    pad(&mut level);
    let mut levels = vec![level];
    while levels.last().is_some_and(|l| l.len() > hbs) {
        let below = levels.last().map(Vec::as_slice).unwrap_or_default();
        let mut up: Vec<u8> = below
            .chunks(hbs)
            .flat_map(|b| salted(&sb.salt, b))
            .collect();
        pad(&mut up);
        levels.push(up);
    }
    let top = levels.last().map(Vec::as_slice).unwrap_or_default();
    let root = salted(&sb.salt, top);
    let stored: Vec<u8> = levels.into_iter().rev().flatten().collect();
    Ok((stored, root))
}

/// Checks a hash device against its data: the superblock read, the tree recomputed from
/// `data` and compared with the stored one block by block. Returns the root hash (hex), which
/// the caller compares with the one it trusts.
pub fn check(data: &mut impl Read, hash_device: &[u8]) -> Result<String, VerityError> {
    let sb = Superblock::parse(hash_device)?;
    let (computed, root) = tree(data, &sb)?;
    let hbs = sb.hash_block_size as usize;
    let start = hbs;
    let need = (start + computed.len()) as u64;
    if (hash_device.len() as u64) < need {
        return Err(VerityError::ShortHash {
            have: hash_device.len() as u64,
            need,
        });
    }
    let stored = &hash_device[start..start + computed.len()];
    if let Some(i) = computed
        .chunks(hbs)
        .zip(stored.chunks(hbs))
        .position(|(a, b)| a != b)
    {
        return Err(VerityError::TreeMismatch {
            block: i as u64 + 1,
        });
    }
    Ok(hex::encode(root))
}

/// Bytes of the hash device `keel build` publishes for `data_bytes` of data: the superblock
/// block and the tree.
pub fn hash_device_bytes(sb: &Superblock) -> u64 {
    let hbs = u64::from(sb.hash_block_size);
    let per_block = hbs / DIGEST as u64;
    let mut blocks = sb.data_blocks;
    let mut total = 0;
    while blocks > 1 {
        blocks = blocks.div_ceil(per_block);
        total += blocks;
    }
    (total + 1) * hbs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A data file of `blocks` pseudo-random blocks, formatted by the host's veritysetup.
    fn fixture(dir: &std::path::Path, blocks: usize) -> (Vec<u8>, Vec<u8>, String) {
        let mut data = vec![0u8; blocks * 4096];
        let mut x: u32 = 0x1234_5678;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let (d, h) = (dir.join("data"), dir.join("hash"));
        std::fs::write(&d, &data).expect("write data");
        let out = Command::new("veritysetup")
            .args([
                "format",
                "--salt=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            ])
            .arg(&d)
            .arg(&h)
            .output()
            .expect("veritysetup runs (cryptsetup-bin is a test dependency, .ci/run installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let root = text
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:"))
            .map(|h| h.trim().to_string())
            .expect("root hash printed");
        (data, std::fs::read(&h).expect("read hash"), root)
    }

    #[test]
    fn tree_equals_veritysetup_format() {
        let t = tempfile::tempdir().expect("tempdir");
        // One block, one hash block's worth, and enough for three levels.
        for blocks in [1usize, 128, 129, 128 * 128 + 3] {
            let (data, hash, root) = fixture(t.path(), blocks);
            let sb = Superblock::parse(&hash).expect("superblock");
            assert_eq!(sb.data_blocks, blocks as u64);
            assert_eq!(hash_device_bytes(&sb), hash.len() as u64, "{blocks} blocks");
            let got = check(&mut data.as_slice(), &hash).expect("tree matches");
            assert_eq!(got, root, "{blocks} blocks");
        }
    }

    #[test]
    fn a_changed_byte_or_short_data_is_found() {
        let t = tempfile::tempdir().expect("tempdir");
        let (mut data, hash, _) = fixture(t.path(), 300);
        data[4096 * 200 + 7] ^= 1;
        assert!(matches!(
            check(&mut data.as_slice(), &hash),
            Err(VerityError::TreeMismatch { .. })
        ));
        let short = &data[..4096 * 10];
        assert!(matches!(
            check(&mut &short[..], &hash),
            Err(VerityError::ShortData { .. })
        ));
        let mut bad = hash.clone();
        bad[0] = b'x';
        assert_eq!(
            check(&mut data.as_slice(), &bad),
            Err(VerityError::NoSuperblock)
        );
        let truncated = &hash[..4096 + 10];
        assert!(matches!(
            check(&mut data.as_slice(), truncated),
            Err(VerityError::ShortHash { .. })
        ));
    }
}
