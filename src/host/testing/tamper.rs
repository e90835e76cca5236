//! Host-side tampering for the trust tests. /usr: find where a file's data lives in usr slot A
//! (dump.erofs from the tools tree, on the built image) and overwrite those bytes in the VM's
//! overlay (qemu-io), leaving the built image itself untouched. UKIs: pure byte-level changes
//! (a flipped kernel byte, a changed command line) and a re-signature with a foreign key; the
//! ESP itself is edited through `disk::esp`.

use crate::disk::uki::section_range;
use crate::host::tools::{run, run_capture, ToolsTree};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// The byte pattern written over the file's data; the guest must never read it back.
pub const PATTERN: u8 = 0x5a;
pub const LEN: u64 = 4096;

/// Physical byte offset (inside the erofs image) of the first data extent in `dump.erofs -e`
/// output.
pub fn first_extent_offset(dump: &str) -> Result<u64> {
    for line in dump.lines() {
        // "   0:        0..    5420 |    5420 :     331776..    335872 |    4096"
        let Some((_, right)) = line.split_once(':') else {
            continue;
        };
        let cols: Vec<&str> = right.split('|').collect();
        if cols.len() != 3 {
            continue;
        }
        let Some((_, phys)) = cols[1].split_once(':') else {
            continue;
        };
        if let Some((start, _)) = phys.split_once("..") {
            if let Ok(n) = start.trim().parse::<u64>() {
                return Ok(n);
            }
        }
    }
    bail!("dump.erofs printed no extents:\n{dump}")
}

/// Overwrites the first data block of `usr_path` (a path under /usr) in `overlay`, whose backing
/// image is `raw`; slot A starts at `slot_offset` bytes.
pub fn tamper(
    tools: &ToolsTree,
    raw: &Path,
    slot_offset: u64,
    usr_path: &str,
    overlay: &Path,
) -> Result<u64> {
    let inner = usr_path.strip_prefix("/usr").unwrap_or(usr_path);
    let dir = raw.parent().context("image has no directory")?;
    let tools = tools.clone().bind(dir);
    let out = run_capture(
        tools
            .command("dump.erofs")?
            .arg(format!("--offset={slot_offset}"))
            .arg(format!("--path={inner}"))
            .arg("-e")
            .arg(raw),
    )
    .with_context(|| format!("locating {usr_path} in usr slot A"))?;
    let offset = slot_offset + first_extent_offset(&String::from_utf8_lossy(&out))?;
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {PATTERN:#x} {offset} {LEN}"))
        .arg(overlay))
    .with_context(|| format!("writing over {usr_path} in {}", overlay.display()))?;
    Ok(offset)
}

/// A copy of `pe` with one byte in the middle of the kernel flipped.
pub fn flip_linux_byte(pe: &[u8]) -> Result<Vec<u8>> {
    let (off, len) = section_range(pe, ".linux")?;
    let mut out = pe.to_vec();
    let at = off + len / 2;
    out[at] ^= 0x01;
    Ok(out)
}

/// A copy of `pe` whose `.cmdline` has `from` replaced by `to` (padded with spaces to the same
/// length), leaving every other byte, the signature and `.pcrsig` as they were.
pub fn replace_cmdline(pe: &[u8], from: &str, to: &str) -> Result<Vec<u8>> {
    if to.len() > from.len() {
        bail!("cmdline replacement `{to}` is longer than `{from}`; the section keeps its size");
    }
    let (off, len) = section_range(pe, ".cmdline")?;
    let text = std::str::from_utf8(&pe[off..off + len]).context(".cmdline is not UTF-8")?;
    let at = text
        .find(from)
        .with_context(|| format!("the UKI's command line has no `{from}`: {text}"))?;
    let mut out = pe.to_vec();
    let padded = format!("{to:<width$}", width = from.len());
    out[off + at..off + at + from.len()].copy_from_slice(padded.as_bytes());
    Ok(out)
}

/// The UKI stripped of its signature and signed again with a new, unenrolled key.
pub fn resign_foreign(tools: &ToolsTree, pe: &[u8], work: &Path) -> Result<Vec<u8>> {
    let keys = work.join("foreign-keys");
    if !keys.exists() {
        crate::trust::keys::init(&keys, "Foreign")?;
    }
    let unsigned = work.join("foreign-unsigned.efi");
    let signed = work.join("foreign-signed.efi");
    std::fs::write(&unsigned, pe).context("writing the UKI copy")?;
    let tools = tools.clone().bind(work);
    run(tools.command("sbattach")?.arg("--remove").arg(&unsigned))
        .context("removing the UKI's signature (sbattach)")?;
    run(tools
        .command("sbsign")?
        .arg("--key")
        .arg(keys.join("db.key"))
        .arg("--cert")
        .arg(keys.join("db.crt"))
        .arg("--output")
        .arg(&signed)
        .arg(&unsigned))
    .context("signing the UKI with a foreign key (sbsign)")?;
    std::fs::read(&signed).context("reading the re-signed UKI")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "Path : /bin/bash\nSize: 1298416  On-disk size: 847872  regular file\n\
NID: 423546   Links: 1   Layout: 3   Compression ratio: 65.30%\nTimestamp: 1970-01-01 00:00:00.000000000\n\n \
Ext:   logical offset   |  length :     physical offset    |  length\n   \
0:        0..    5420 |    5420 :     331776..    335872 |    4096\n   \
1:     5420..   11227 |    5807 :     335872..    339968 |    4096\n";

    #[test]
    fn first_extent_is_found() {
        assert_eq!(first_extent_offset(DUMP).expect("offset"), 331_776);
        assert!(first_extent_offset("Path : /x\nSize: 0\n").is_err());
    }

    /// A minimal PE32+ with `.linux` and `.cmdline`, built with the object crate's writer is not
    /// available here; the UKI built by the integration tests exercises the PE paths. This checks
    /// the text logic of a cmdline replacement on a fake section layout.
    #[test]
    fn cmdline_replacement_must_not_grow() {
        let e = replace_cmdline(b"not a pe", "a", "bb").expect_err("must fail");
        assert!(e.to_string().contains("longer"), "{e}");
    }
}
