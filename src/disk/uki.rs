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

/// The file name of the version a disk image is built with, in the ESP's `EFI/Linux`: no boot
/// counter (`keel-VERSION.efi`), since there is nothing to fall back to.
pub fn factory_uki_name(version: &str) -> String {
    format!("keel-{version}.efi")
}

/// The boot entry of a new version on trial: systemd-boot counts `tries` attempts down in the
/// name (`keel-VERSION+LEFT-DONE.efi`); systemd-bless-boot removes the counter once the version
/// proved healthy.
pub fn trial_uki_name(version: &str, tries: u32) -> String {
    format!("keel-{version}+{tries}.efi")
}

/// A staged UKI: written, fsynced, and invisible to the boot loader (which reads `*.efi` only)
/// until it is renamed to its trial name.
pub fn staged_uki_name(version: &str, tries: u32) -> String {
    format!("{}.staged", trial_uki_name(version, tries))
}

/// A Keel boot entry's file name, read back: its version and boot counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryName {
    pub version: String,
    /// Tries left, when counted.
    pub left: Option<u32>,
    /// Tries done, when counted and tried.
    pub done: Option<u32>,
    pub staged: bool,
}

impl EntryName {
    /// Counted with no tries left: systemd-boot sorts it last ("bad").
    pub fn bad(&self) -> bool {
        self.left == Some(0)
    }
}

/// Parses `keel-VERSION[+LEFT[-DONE]].efi[.staged]`.
pub fn parse_entry_name(name: &str) -> Option<EntryName> {
    let (name, staged) = match name.strip_suffix(".staged") {
        Some(n) => (n, true),
        None => (name, false),
    };
    let stem = name.strip_prefix("keel-")?.strip_suffix(".efi")?;
    let (version, counter) = match stem.split_once('+') {
        Some((v, c)) => (v, Some(c)),
        None => (stem, None),
    };
    if version.is_empty() || version.contains('-') {
        return None;
    }
    let (left, done) = match counter {
        None => (None, None),
        Some(c) => match c.split_once('-') {
            Some((l, d)) => (Some(l.parse().ok()?), Some(d.parse().ok()?)),
            None => (Some(c.parse().ok()?), None),
        },
    };
    Some(EntryName {
        version: version.to_string(),
        left,
        done,
        staged,
    })
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

/// The `usrhash=` of a kernel command line: the last one, as systemd's generators read a
/// repeated option.
pub fn usrhash(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("usrhash="))
        .next_back()
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
    fn the_last_usrhash_counts() {
        assert_eq!(usrhash("usrhash=aa rw usrhash=bb").as_deref(), Some("bb"));
        assert_eq!(usrhash("rw quiet"), None);
    }

    #[test]
    fn garbage_is_not_a_uki() {
        assert!(read("x", b"not a pe file").is_err());
        assert!(section_range(b"not a pe file", ".linux").is_err());
    }

    #[test]
    fn entry_names() {
        assert_eq!(factory_uki_name("0.1.0"), "keel-0.1.0.efi");
        assert_eq!(trial_uki_name("0.2.0", 2), "keel-0.2.0+2.efi");
        assert_eq!(staged_uki_name("0.2.0", 1), "keel-0.2.0+1.efi.staged");
        let e = parse_entry_name("keel-0.2.0+0-2.efi").expect("counted");
        assert_eq!(
            (e.version.as_str(), e.left, e.done, e.bad()),
            ("0.2.0", Some(0), Some(2), true)
        );
        let e = parse_entry_name("keel-0.1.0~rc1.efi").expect("factory");
        assert_eq!((e.left, e.done, e.staged), (None, None, false));
        assert!(
            parse_entry_name("keel-0.2.0+1.efi.staged")
                .expect("staged")
                .staged
        );
        for bad in [
            "keel-.efi",
            "other-0.1.efi",
            "keel-0.1+x.efi",
            "keel-0.1.conf",
            "keel-0.1+1-x.efi",
        ] {
            assert_eq!(parse_entry_name(bad), None, "{bad}");
        }
    }
}
