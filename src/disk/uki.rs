//! Reading a unified kernel image (a PE file): its sections, command line, uname and
//! os-release, and where a section's bytes are in the file.

use anyhow::{bail, Context, Result};
use object::read::pe::PeFile64;
use object::{Object, ObjectSection};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct SectionView {
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UkiView {
    pub path: String,
    pub sections: Vec<SectionView>,
    pub cmdline: String,
    pub uname: String,
    pub os_release: String,
}

/// The file name of a version's UKI in the ESP's `EFI/Linux`: boot counting with three tries
/// (`keel-VERSION+3.efi`).
pub fn uki_file_name(version: &str) -> String {
    format!("keel-{version}+3.efi")
}

/// Reads the sections, command line, uname and os-release of a UKI; `name` is for messages.
pub fn read(name: &str, data: &[u8]) -> Result<UkiView> {
    let pe = object::File::parse(data).with_context(|| format!("{name} is not a PE file"))?;
    let mut view = UkiView {
        path: name.to_string(),
        sections: Vec::new(),
        cmdline: String::new(),
        uname: String::new(),
        os_release: String::new(),
    };
    for s in pe.sections() {
        let sname = s.name().unwrap_or("?").to_string();
        let bytes = s.data().unwrap_or_default();
        let text = || {
            String::from_utf8_lossy(bytes)
                .trim_end_matches('\0')
                .trim()
                .to_string()
        };
        match sname.as_str() {
            ".cmdline" => view.cmdline = text(),
            ".uname" => view.uname = text(),
            ".osrel" => view.os_release = text(),
            _ => {}
        }
        view.sections.push(SectionView {
            name: sname,
            size: s.size(),
        });
    }
    Ok(view)
}

/// The `usrhash=` of a kernel command line.
pub fn usrhash(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("usrhash="))
        .map(|s| s.to_string())
}

/// File offset and length of a PE section's raw data.
pub fn section_range(pe: &[u8], name: &str) -> Result<(usize, usize)> {
    let file = PeFile64::parse(pe).map_err(|e| anyhow::anyhow!("not a PE image: {e}"))?;
    for s in file.section_table().iter() {
        let n = String::from_utf8_lossy(s.raw_name())
            .trim_end_matches('\0')
            .to_string();
        if n == name {
            let off = s.pointer_to_raw_data.get(object::LittleEndian) as usize;
            let raw = s.size_of_raw_data.get(object::LittleEndian) as usize;
            let vsize = s.virtual_size.get(object::LittleEndian) as usize;
            if off.saturating_add(raw.min(vsize)) > pe.len() {
                bail!("the UKI's {name} section reaches past the end of the file");
            }
            return Ok((off, raw.min(vsize)));
        }
    }
    bail!("the UKI has no {name} section")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usrhash_is_found_in_cmdline() {
        assert_eq!(
            usrhash("rw usrhash=abc console=ttyS0").as_deref(),
            Some("abc")
        );
        assert_eq!(usrhash("rw"), None);
    }

    #[test]
    fn garbage_is_not_a_uki() {
        assert!(read("x", b"not a pe file").is_err());
        assert!(section_range(b"not a pe file", ".linux").is_err());
    }

    #[test]
    fn uki_name_has_three_tries() {
        assert_eq!(uki_file_name("0.1.0"), "keel-0.1.0+3.efi");
    }
}
