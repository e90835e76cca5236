//! Cutting the initrd tree down to what the initrd runs. The tree starts as a Debian bootstrap
//! (essential packages plus systemd, cryptsetup and e2fsprogs), which brings package tools, user
//! management, PAM modules and the daemons of a running system. Every byte of the initrd is read
//! by the firmware, hashed into the TPM, decompressed and unpacked by the kernel on every boot,
//! and the kernel's own start waits for the unpacking (its crypto self-tests ask for modules, and
//! module requests wait for the initramfs): a smaller tree is a shorter boot.
//!
//! The programs are an allowlist ([`INITRD_PROGRAMS`]); the shared libraries are what those
//! programs need (`DT_NEEDED`) or name (the sonames systemd and libcryptsetup `dlopen`), found by
//! reading the ELF files. Afterwards every ELF file left must find its libraries and its
//! interpreter, and every program a kept udev rule runs must exist, or the build fails naming
//! the file.

use crate::host::cache;
use anyhow::{bail, Context, Result};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::{elf, Endianness};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

/// The programs the initrd keeps in /usr/bin and /usr/sbin: what systemd and udev execute in
/// the initrd (mount, fsck, sulogin, modprobe, dmsetup), what keel's first-boot scripts call,
/// and a small set for an operator in the emergency shell. keel-agent (first-boot provisioning)
/// is added when the image ships it.
pub const INITRD_PROGRAMS: &[&str] = &[
    // shells: /bin/sh for scripts, bash as root's login shell in emergency mode
    "sh",
    "dash",
    "bash",
    // coreutils, grep and sed: keel's scripts and the emergency shell
    "[",
    "basename",
    "cat",
    "chmod",
    "chown",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "dirname",
    "du",
    "echo",
    "env",
    "false",
    "head",
    "id",
    "ln",
    "ls",
    "mkdir",
    "mktemp",
    "mv",
    "printf",
    "readlink",
    "realpath",
    "rm",
    "rmdir",
    "sleep",
    "sort",
    "stat",
    "sync",
    "tail",
    "tee",
    "test",
    "touch",
    "tr",
    "od",
    "true",
    "uname",
    "uniq",
    "wc",
    "grep",
    "sed",
    // systemd's tools (units in the initrd run several of them; the rest are for debugging)
    "systemctl",
    "journalctl",
    "udevadm",
    "busctl",
    "varlinkctl",
    "systemd-ask-password",
    "systemd-tty-ask-password-agent",
    "systemd-cryptenroll",
    "systemd-cryptsetup",
    "systemd-repart",
    "systemd-tmpfiles",
    "systemd-sysusers",
    "systemd-escape",
    "systemd-notify",
    "systemd-creds",
    "systemd-sysext",
    "systemd-confext",
    "systemd-mount",
    "systemd-umount",
    "systemd-run",
    "systemd-detect-virt",
    "systemd-id128",
    "systemd-machine-id-setup",
    "systemd-firstboot",
    "systemd-cat",
    // util-linux: systemd mounts with mount(8); sulogin is the emergency shell's gate
    "mount",
    "umount",
    "blkid",
    "blockdev",
    "findmnt",
    "lsblk",
    "losetup",
    "dmesg",
    "more",
    "sulogin",
    "switch_root",
    "chroot",
    "findfs",
    // modules (the kernel runs /sbin/modprobe for module requests)
    "kmod",
    "modprobe",
    "insmod",
    "rmmod",
    "lsmod",
    "depmod",
    "modinfo",
    // device-mapper (udev's dm rules run dmsetup), the sealed root and /usr
    "dmsetup",
    "cryptsetup",
    // the first boot's recovery key escrow
    "openssl",
    "veritysetup",
    // ext4: systemd-fsck runs fsck, keel-root-init makes the root file system
    "fsck",
    "fsck.ext2",
    "fsck.ext3",
    "fsck.ext4",
    "e2fsck",
    "mke2fs",
    "mkfs",
    "mkfs.ext2",
    "mkfs.ext3",
    "mkfs.ext4",
    "tune2fs",
    "e2label",
    "dumpe2fs",
];

/// Programs in /usr/lib/systemd the initrd never runs: the daemons and helpers of a running
/// system (network, logins, host/locale/time settings, user sessions) and build-time tools.
pub const INITRD_SYSTEMD_UNUSED: &[&str] = &[
    "systemd-networkd",
    "systemd-networkd-wait-online",
    "systemd-logind",
    "systemd-hostnamed",
    "systemd-localed",
    "systemd-timedated",
    "systemd-user-runtime-dir",
    "systemd-user-sessions",
    "systemd-storagetm",
    "systemd-socket-proxyd",
    "systemd-ssh-proxy",
    "systemd-sbsign",
    "systemd-measure",
    "systemd-xdg-autostart-condition",
];

/// Data the initrd never reads: licences, shell completions, package tool data, the journal's
/// message catalogue, PAM modules (no unit in the initrd opens a PAM session).
pub const INITRD_DATA_UNUSED: &[&str] = &[
    "usr/share/common-licenses",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/dpkg",
    "usr/share/debconf",
    "usr/share/initramfs-tools",
    "var/lib/systemd/catalog",
    "usr/lib/x86_64-linux-gnu/security",
];

/// Where the initrd's shared libraries live (the top level of the first is pruned; the rest are
/// searched when checking what each ELF file needs).
const LIB_DIR: &str = "usr/lib/x86_64-linux-gnu";
const LIB_SEARCH: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu/systemd",
];

/// What [`prune`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub files: usize,
    pub bytes: u64,
    /// Library file names removed (for the log).
    pub libraries: Vec<String>,
}

/// Cuts the initrd tree at `tree` down to the programs in `programs`, the systemd helpers not in
/// [`INITRD_SYSTEMD_UNUSED`], and the libraries they need; then checks that what is left is
/// complete (see the module documentation).
pub fn prune(tree: &Path, programs: &[&str]) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    let keep: BTreeSet<&str> = programs.iter().copied().collect();
    let mut found = BTreeSet::new();
    for dir in ["usr/bin", "usr/sbin"] {
        for e in cache::dir_entries(&tree.join(dir))? {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(name.as_str()) {
                found.insert(name);
            } else {
                remove(&e.path(), &mut pruned)?;
            }
        }
    }
    let missing: Vec<&str> = keep
        .iter()
        .filter(|p| !found.contains(**p))
        .copied()
        .collect();
    if !missing.is_empty() {
        bail!(
            "the initrd tree has no {} (package layout changed? INITRD_PROGRAMS in src/render/initrd_prune.rs lists the programs the initrd keeps)",
            missing.join(", ")
        );
    }
    for p in INITRD_SYSTEMD_UNUSED {
        remove(&tree.join("usr/lib/systemd").join(p), &mut pruned)?;
    }
    for p in INITRD_DATA_UNUSED {
        remove(&tree.join(p), &mut pruned)?;
    }
    prune_libraries(tree, &mut pruned)?;
    check_complete(tree)?;
    Ok(pruned)
}

/// Removes the libraries at the top level of [`LIB_DIR`] that no ELF file outside it needs or
/// names, directly or through another kept library.
fn prune_libraries(tree: &Path, pruned: &mut Pruned) -> Result<()> {
    let lib_dir = tree.join(LIB_DIR);
    // Every name at the top of the library directory, and the file it resolves to.
    let mut names: BTreeMap<String, PathBuf> = BTreeMap::new();
    for e in cache::dir_entries(&lib_dir)? {
        let path = e.path();
        if path.is_symlink() || path.is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(real) = resolve_in(tree, &path)? {
                if real.is_file() {
                    names.insert(name, real);
                }
            }
        }
    }
    let in_lib_dir: BTreeSet<&PathBuf> = names.values().collect();
    let mut queue: Vec<PathBuf> = Vec::new();
    for f in walk_files(tree)? {
        if f.parent() == Some(lib_dir.as_path()) {
            continue;
        }
        // Dangling links (the initrd's /etc has some) lead nowhere to scan.
        let Some(real) = resolve_in(tree, &f)? else {
            continue;
        };
        if real.is_file() && !in_lib_dir.contains(&real) && is_elf(&real)? {
            queue.push(real);
        }
    }
    let mut kept: BTreeSet<PathBuf> = BTreeSet::new();
    // The dynamic loader itself is every program's interpreter.
    for (name, real) in &names {
        if name.starts_with("ld-linux") {
            kept.insert(real.clone());
            queue.push(real.clone());
        }
    }
    let mut scanned = BTreeSet::new();
    while let Some(file) = queue.pop() {
        if !scanned.insert(file.clone()) {
            continue;
        }
        let data = fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let info = elf_info(&data).with_context(|| format!("reading ELF {}", file.display()))?;
        let mut refs = info.needed;
        refs.extend(library_names_in(&data, &names));
        for r in refs {
            if let Some(real) = names.get(&r) {
                if kept.insert(real.clone()) {
                    queue.push(real.clone());
                }
            }
        }
    }
    for (name, real) in &names {
        if !kept.contains(real) {
            let p = lib_dir.join(name);
            if !p.is_symlink() {
                pruned.libraries.push(name.clone());
            }
            remove(&p, pruned)?;
        }
    }
    Ok(())
}

/// Sonames of `names` that occur in `data` as strings: the libraries a program may `dlopen`
/// (systemd lists them in its ELF notes, and the call itself holds the name).
fn library_names_in(data: &[u8], names: &BTreeMap<String, PathBuf>) -> Vec<String> {
    let is_name_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+');
    let mut out = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if &data[i..i + 3] == b"lib" && (i == 0 || !is_name_byte(data[i - 1])) {
            let end = data[i..]
                .iter()
                .position(|b| !is_name_byte(*b))
                .map_or(data.len(), |n| i + n);
            if let Ok(s) = std::str::from_utf8(&data[i..end]) {
                if names.contains_key(s) {
                    out.push(s.to_string());
                }
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Fails unless every ELF file in the tree finds its interpreter and each library it needs, and
/// every program the kept udev rules run exists.
pub fn check_complete(tree: &Path) -> Result<()> {
    let mut available: BTreeSet<String> = BTreeSet::new();
    for dir in LIB_SEARCH {
        for e in cache::dir_entries(&tree.join(dir))? {
            if resolve_in(tree, &e.path())?.is_some_and(|p| p.is_file()) {
                available.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    let mut problems = Vec::new();
    for f in walk_files(tree)? {
        let regular = fs::symlink_metadata(&f).is_ok_and(|m| m.file_type().is_file());
        if !regular || !is_elf(&f)? {
            continue;
        }
        let data = fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        let info = elf_info(&data).with_context(|| format!("reading ELF {}", f.display()))?;
        let rel = f.strip_prefix(tree).unwrap_or(&f).display().to_string();
        for n in info.needed {
            if !available.contains(&n) {
                problems.push(format!("{rel} needs {n}"));
            }
        }
        if let Some(interp) = info.interpreter {
            if resolve_in(tree, Path::new(&interp))?.is_none_or(|p| !p.is_file()) {
                problems.push(format!("{rel} needs its interpreter {interp}"));
            }
        }
    }
    for e in cache::dir_entries(&tree.join("usr/lib/udev/rules.d"))? {
        let text = fs::read_to_string(e.path())
            .with_context(|| format!("reading {}", e.path().display()))?;
        for prog in udev_programs(&text) {
            let path = if prog.starts_with('/') {
                PathBuf::from(&prog)
            } else {
                PathBuf::from("/usr/lib/udev").join(&prog)
            };
            if resolve_in(tree, &path)?.is_none() {
                problems.push(format!(
                    "udev rule {} runs {prog}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "the initrd tree is incomplete: {} (INITRD_PROGRAMS and INITRD_SYSTEMD_UNUSED in src/render/initrd_prune.rs decide what it keeps)",
            problems.join("; ")
        );
    }
    Ok(())
}

/// The programs a udev rules file runs (`PROGRAM`, `IMPORT{program}`, `RUN`, not builtins), as
/// written: absolute paths, or names udev looks up in /usr/lib/udev. Commands taken from the
/// environment (`$env{...}`) are skipped.
pub fn udev_programs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        for key in [
            "PROGRAM==\"",
            "PROGRAM=\"",
            "IMPORT{program}=\"",
            "RUN+=\"",
            "RUN=\"",
        ] {
            let mut rest = line;
            while let Some(i) = rest.find(key) {
                // `RUN{builtin}` has its own key; `RUN{program}+=` is not used by these rules.
                rest = &rest[i + key.len()..];
                let cmd = rest.split('"').next().unwrap_or_default();
                if let Some(prog) = cmd.split_whitespace().next() {
                    if !prog.starts_with('$') && !out.iter().any(|p| p == prog) {
                        out.push(prog.to_string());
                    }
                }
            }
        }
    }
    out
}

/// What the dynamic loader needs for an ELF file.
#[derive(Debug, Default)]
struct ElfInfo {
    needed: Vec<String>,
    interpreter: Option<String>,
}

/// `DT_NEEDED` entries and the `PT_INTERP` path of a 64-bit little-endian ELF file (the initrd
/// is x86-64); other files have neither.
fn elf_info(data: &[u8]) -> Result<ElfInfo> {
    let mut info = ElfInfo::default();
    let Ok(header) = elf::FileHeader64::<Endianness>::parse(data) else {
        return Ok(info);
    };
    let endian = header.endian()?;
    for ph in header.program_headers(endian, data)? {
        if let Some(interp) = ph.interpreter(endian, data)? {
            info.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    if let Some((dynamic, link)) = sections.dynamic(endian, data)? {
        let strings = sections.strings(endian, data, link)?;
        for d in dynamic {
            if d.tag32(endian) == Some(elf::DT_NEEDED) {
                let name = d
                    .string(endian, strings)
                    .map_err(|e| anyhow::anyhow!("a DT_NEEDED entry: {e}"))?;
                info.needed.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok(info)
}

fn is_elf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 4];
    Ok(f.read(&mut magic).unwrap_or(0) == 4 && &magic == b"\x7fELF")
}

/// Every regular file and symlink under `dir` (not following directory symlinks).
fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).follow_links(false) {
        let e = e.with_context(|| format!("walking {}", dir.display()))?;
        if !e.file_type().is_dir() {
            out.push(e.into_path());
        }
    }
    Ok(out)
}

/// `path` (absolute inside the tree, or already under `tree`) with every symlink followed as the
/// initrd would see it, with `tree` as its root; `None` when something on the way does not exist.
pub fn resolve_in(tree: &Path, path: &Path) -> Result<Option<PathBuf>> {
    let rel = path.strip_prefix(tree).unwrap_or(path);
    let mut pending: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut current = tree.to_path_buf();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            if current != tree {
                current.pop();
            }
            continue;
        }
        let next = current.join(&part);
        match fs::symlink_metadata(&next) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", next.display())),
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {}", path.display());
                }
                let target = fs::read_link(&next)
                    .with_context(|| format!("reading the link {}", next.display()))?;
                if target.is_absolute() {
                    current = tree.to_path_buf();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(_) => current = next,
        }
    }
    Ok(Some(current))
}

/// Removes a file, symlink or directory tree if it exists, counting what went.
fn remove(path: &Path, pruned: &mut Pruned) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    let files = if meta.is_dir() {
        walk_files(path)?
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        if let Ok(m) = fs::symlink_metadata(&f) {
            pruned.files += 1;
            if m.is_file() {
                pruned.bytes += m.len();
            }
        }
    }
    cache::remove_path(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const HOST_LIBS: &str = "/usr/lib/x86_64-linux-gnu";

    /// A small tree laid out as Debian's: programs from the host (`true` needs libc, libc needs
    /// the loader), /lib64 and /lib as links, the loader reached through an absolute link.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        for d in [
            "usr/bin",
            "usr/sbin",
            "usr/lib/x86_64-linux-gnu",
            "usr/lib64",
        ] {
            fs::create_dir_all(r.join(d)).expect("mkdir");
        }
        symlink("usr/lib64", r.join("lib64")).expect("link");
        symlink("usr/lib", r.join("lib")).expect("link");
        symlink(
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            r.join("usr/lib64/ld-linux-x86-64.so.2"),
        )
        .expect("link");
        let lib = r.join(LIB_DIR);
        for f in ["libc.so.6", "ld-linux-x86-64.so.2"] {
            fs::copy(Path::new(HOST_LIBS).join(f), lib.join(f)).expect("copy host lib");
        }
        fs::copy("/usr/bin/true", r.join("usr/bin/true")).expect("copy true");
        fs::copy("/usr/bin/true", r.join("usr/bin/extra")).expect("copy");
        // A program that names a library it would dlopen, and that library (through its soname
        // link); plus a library nothing names.
        let mut loader = fs::read("/usr/bin/true").expect("read true");
        loader.extend_from_slice(b"\0libplugin.so.3\0");
        fs::write(r.join("usr/bin/loader"), loader).expect("write");
        fs::copy(
            Path::new(HOST_LIBS).join("ld-linux-x86-64.so.2"),
            lib.join("libplugin.so.3.0.0"),
        )
        .expect("copy");
        symlink("libplugin.so.3.0.0", lib.join("libplugin.so.3")).expect("link");
        fs::copy(
            Path::new(HOST_LIBS).join("libc.so.6"),
            lib.join("libunused.so.1"),
        )
        .expect("copy");
        fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu/security")).expect("mkdir");
        fs::write(r.join("usr/lib/x86_64-linux-gnu/security/pam_x.so"), "x").expect("write");
        t
    }

    #[test]
    fn keeps_the_listed_programs_and_the_libraries_they_need_or_name() {
        let t = tree();
        let r = t.path();
        let pruned = prune(r, &["true", "loader"]).expect("prune");
        assert!(r.join("usr/bin/true").exists() && r.join("usr/bin/loader").exists());
        assert!(
            !r.join("usr/bin/extra").exists(),
            "unlisted program removed"
        );
        let lib = r.join(LIB_DIR);
        for kept in [
            "libc.so.6",
            "ld-linux-x86-64.so.2",
            "libplugin.so.3",
            "libplugin.so.3.0.0",
        ] {
            assert!(lib.join(kept).exists(), "{kept} kept");
        }
        assert!(
            !lib.join("libunused.so.1").exists(),
            "unneeded library removed"
        );
        assert!(!lib.join("security").exists(), "PAM modules removed");
        assert_eq!(pruned.libraries, vec!["libunused.so.1".to_string()]);
        assert!(pruned.bytes > 0 && pruned.files >= 3);
    }

    #[test]
    fn a_listed_program_the_tree_lacks_is_named() {
        let t = tree();
        let err = format!(
            "{:#}",
            prune(t.path(), &["true", "mkfs.ext4"]).expect_err("missing")
        );
        assert!(
            err.contains("mkfs.ext4") && err.contains("INITRD_PROGRAMS"),
            "{err}"
        );
    }

    #[test]
    fn the_check_names_a_missing_library_interpreter_or_udev_program() {
        let t = tree();
        let r = t.path();
        check_complete(r).expect("the full tree is complete");

        fs::remove_file(r.join(LIB_DIR).join("libc.so.6")).expect("rm");
        let err = format!("{:#}", check_complete(r).expect_err("libc missing"));
        assert!(err.contains("usr/bin/true needs libc.so.6"), "{err}");

        let t = tree();
        let r = t.path();
        fs::remove_file(r.join(LIB_DIR).join("ld-linux-x86-64.so.2")).expect("rm");
        let err = format!("{:#}", check_complete(r).expect_err("loader missing"));
        assert!(
            err.contains("usr/bin/true needs its interpreter /lib64/ld-linux-x86-64.so.2"),
            "{err}"
        );

        let t = tree();
        let r = t.path();
        let rules = r.join("usr/lib/udev/rules.d");
        fs::create_dir_all(&rules).expect("mkdir");
        fs::write(
            rules.join("95-dm-notify.rules"),
            "ENV{DM_COOKIE}==\"?*\", RUN+=\"/usr/sbin/dmsetup udevcomplete $env{DM_COOKIE}\"\n",
        )
        .expect("write");
        let err = format!("{:#}", check_complete(r).expect_err("dmsetup missing"));
        assert!(
            err.contains("udev rule 95-dm-notify.rules runs /usr/sbin/dmsetup"),
            "{err}"
        );
        fs::copy("/usr/bin/true", r.join("usr/sbin/dmsetup")).expect("copy");
        check_complete(r).expect("complete with dmsetup");
    }

    #[test]
    fn udev_programs_are_read_from_program_import_and_run_keys() {
        let text = r#"
# RUN+="/usr/bin/commented"
KERNEL=="sd*", IMPORT{program}="ata_id --export $devnode"
ENV{DM_NAME}=="?*", PROGRAM=="/usr/sbin/dmsetup info", RUN+="/usr/sbin/dmsetup udevcomplete"
ACTION=="add", RUN{builtin}+="kmod load $env{MODALIAS}", RUN+="$env{REMOVE_CMD}"
"#;
        assert_eq!(
            udev_programs(text),
            vec!["ata_id".to_string(), "/usr/sbin/dmsetup".to_string()]
        );
    }

    #[test]
    fn links_resolve_inside_the_tree_not_on_the_host() {
        let t = tree();
        let r = t.path();
        let got = resolve_in(r, Path::new("/lib64/ld-linux-x86-64.so.2"))
            .expect("resolve")
            .expect("exists");
        assert_eq!(got, r.join("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"));
        // /etc/hostname exists on the host, not in the tree.
        symlink("/etc/hostname", r.join("usr/bin/dangling")).expect("link");
        assert_eq!(
            resolve_in(r, &r.join("usr/bin/dangling")).expect("resolve"),
            None
        );
    }
}
