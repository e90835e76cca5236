//! Unpacking verified image layers into a root file system, as if that directory were `/`.
//!
//! Layer content is not trusted to be well formed even when signed: entry names with `..` are
//! refused; symbolic links in the path of an entry are followed *inside* the root (an absolute
//! link restarts at the root, `..` stops there), so no entry can land outside it; hard links must
//! name a regular file already in the root; device nodes and FIFOs are refused; the bytes and
//! entries of all layers together are limited. Whiteouts (`.wh.NAME`, `.wh..wh..opq`) remove
//! content of lower layers, as the OCI image spec defines. The caller unpacks into a staging
//! directory and throws it away on any error.

use super::oci::Compression;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Bounds on what the layers of one image may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of file data, all layers together.
    pub max_bytes: u64,
    /// Entries, all layers together.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 2 << 30,
            max_entries: 500_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: entry `{path}` would escape the root (`..` in its name)")]
    PathEscape { layer: usize, path: String },
    #[error("layer {layer}: entry `{path}` is a device node or FIFO; images may not carry them")]
    DeviceNode { layer: usize, path: String },
    #[error("layer {layer}: entry `{path}` has a type keel does not unpack ({kind})")]
    Unsupported {
        layer: usize,
        path: String,
        kind: String,
    },
    #[error("layer {layer}: entry `{path}`: the image unpacks to more than {max} bytes (limit)")]
    TooLarge {
        layer: usize,
        path: String,
        max: u64,
    },
    #[error("layer {layer}: more than {max} entries (limit)")]
    TooManyEntries { layer: usize, max: u64 },
    #[error("layer {layer}: hard link `{path}` -> `{target}`: {reason}")]
    BadLink {
        layer: usize,
        path: String,
        target: String,
        reason: String,
    },
    #[error("layer {layer}: `{path}`: {reason}")]
    Resolve {
        layer: usize,
        path: String,
        reason: String,
    },
    #[error("layer {layer}: {context}")]
    Io {
        layer: usize,
        context: String,
        source: io::Error,
    },
}

/// What was unpacked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

/// A layer to unpack: the blob file and its compression.
pub struct LayerFile<'a> {
    pub path: &'a Path,
    pub compression: Compression,
}

/// Unpacks `layers` (bottom first) into `root`, which must exist.
pub fn unpack(root: &Path, layers: &[LayerFile], limits: Limits) -> Result<Stats, UnpackError> {
    let mut stats = Stats::default();
    for (i, l) in layers.iter().enumerate() {
        // One pass per layer. Whiteouts remove what lower layers put there, never this layer's
        // own content, whatever the entry order: paths this layer created are remembered and
        // an opaque directory keeps them.
        let mut u = Unpacker {
            root,
            layer: i + 1,
            limits,
            stats: &mut stats,
            created: HashSet::new(),
        };
        u.run(l)?;
    }
    Ok(stats)
}

struct Unpacker<'a> {
    root: &'a Path,
    layer: usize,
    limits: Limits,
    stats: &'a mut Stats,
    /// Paths this layer created or touched.
    created: HashSet<PathBuf>,
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

impl Unpacker<'_> {
    fn io(&self, context: String) -> impl FnOnce(io::Error) -> UnpackError {
        let layer = self.layer;
        move |source| UnpackError::Io {
            layer,
            context,
            source,
        }
    }

    fn run(&mut self, l: &LayerFile) -> Result<(), UnpackError> {
        let f = fs::File::open(l.path).map_err(self.io(format!("opening {}", l.path.display())))?;
        let reader: Box<dyn Read> = match l.compression {
            Compression::None => Box::new(io::BufReader::new(f)),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(f))),
        };
        let mut archive = tar::Archive::new(ExtensionCap::new(reader));
        let entries = archive
            .entries()
            .map_err(self.io("reading the layer as tar".into()))?;
        for entry in entries {
            let entry = entry.map_err(self.io("reading the layer as tar".into()))?;
            self.entry(entry)?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<R>) -> Result<(), UnpackError> {
        let layer = self.layer;
        let raw = entry
            .path()
            .map_err(self.io("reading an entry name".into()))?
            .into_owned();
        let shown = raw.display().to_string();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let comps = components(&raw).ok_or_else(|| UnpackError::PathEscape {
            layer,
            path: shown.clone(),
        })?;
        let Some((name, parent)) = comps.split_last() else {
            return Ok(()); // the root itself
        };
        let name_str = name.to_string_lossy();
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                layer,
                max: self.limits.max_entries,
            });
        }
        if let Some(hidden_name) = name_str.strip_prefix(WHITEOUT) {
            return self.whiteout(parent, &name_str, hidden_name, &shown);
        }
        let dir = self
            .resolve(parent, true, &shown)?
            .ok_or_else(|| UnpackError::Resolve {
                layer,
                path: shown.clone(),
                reason: "parent directory could not be created".into(),
            })?;
        let target = dir.join(name);
        self.created.insert(target.clone());
        let mut p = dir.as_path();
        while p.starts_with(self.root) && p != self.root && self.created.insert(p.to_path_buf()) {
            p = p.parent().unwrap_or(self.root);
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&target).map_err(self.io(format!("replacing {shown}")))?;
                        fs::create_dir(&target).map_err(self.io(format!("creating {shown}")))?;
                    }
                    Err(_) => {
                        fs::create_dir(&target).map_err(self.io(format!("creating {shown}")))?
                    }
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(self.io(format!("setting the mode of {shown}")))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.write_file(&mut entry, &target, mode, &shown)?
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(self.io(format!("reading the link of {shown}")))?
                    .ok_or_else(|| UnpackError::Resolve {
                        layer,
                        path: shown.clone(),
                        reason: "symbolic link without a target".into(),
                    })?;
                remove_any(&target).map_err(self.io(format!("replacing {shown}")))?;
                // The link is stored as written; it is only ever followed inside the root (here
                // by `resolve`, in the container by its own root).
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(self.io(format!("creating the link {shown}")))?;
            }
            tar::EntryType::Link => self.hard_link(&entry, &target, &shown)?,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(UnpackError::DeviceNode { layer, path: shown })
            }
            other => {
                return Err(UnpackError::Unsupported {
                    layer,
                    path: shown,
                    kind: format!("{other:?}"),
                })
            }
        }
        if kind != tar::EntryType::Link && nix::unistd::geteuid().is_root() {
            self.set_owner(entry.header(), &target, mode, &shown)?;
        }
        Ok(())
    }

    /// A whiteout (`.wh.NAME` hides NAME of the lower layers; `.wh..wh..opq` hides everything
    /// lower layers put in its directory).
    fn whiteout(
        &mut self,
        parent: &[OsString],
        name: &str,
        hidden_name: &str,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let Some(dir) = self.resolve(parent, false, shown)? else {
            return Ok(()); // nothing below to hide
        };
        if name == OPAQUE {
            self.clear_lower(&dir)
                .map_err(self.io(format!("applying {shown}")))?;
        } else if hidden_name.is_empty()
            || hidden_name == "."
            || hidden_name == ".."
            || hidden_name.contains('/')
        {
            // `.wh..` would hide the directory itself and `.wh...` its parent: above the root
            // at the top of a layer.
            return Err(UnpackError::PathEscape {
                layer: self.layer,
                path: shown.to_string(),
            });
        } else {
            let hidden = dir.join(hidden_name);
            if !self.created.contains(&hidden) {
                remove_any(&hidden).map_err(self.io(format!("applying {shown}")))?;
            }
        }
        Ok(())
    }

    /// A regular file's data, within the byte limit; never through a link.
    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        target: &Path,
        mode: u32,
        shown: &str,
    ) -> Result<(), UnpackError> {
        // The size the tar crate reads (a PAX `size` record overrides the header field).
        let size = entry.size();
        if self.stats.bytes.saturating_add(size) > self.limits.max_bytes {
            return Err(UnpackError::TooLarge {
                layer: self.layer,
                path: shown.to_string(),
                max: self.limits.max_bytes,
            });
        }
        remove_any(target).map_err(self.io(format!("replacing {shown}")))?;
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)
            .map_err(self.io(format!("creating {shown}")))?;
        let n = io::copy(&mut entry.take(size), &mut out)
            .map_err(self.io(format!("writing {shown}")))?;
        self.stats.bytes += n;
        fs::set_permissions(target, fs::Permissions::from_mode(mode))
            .map_err(self.io(format!("setting the mode of {shown}")))
    }

    /// A hard link to a regular file this image already unpacked.
    fn hard_link<R: Read>(
        &mut self,
        entry: &tar::Entry<R>,
        target: &Path,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let link = entry
            .link_name()
            .map_err(self.io(format!("reading the link of {shown}")))?
            .map(|l| l.into_owned())
            .unwrap_or_default();
        let bad = |reason: &str| UnpackError::BadLink {
            layer: self.layer,
            path: shown.to_string(),
            target: link.display().to_string(),
            reason: reason.into(),
        };
        let lc = components(&link).ok_or_else(|| bad("`..` in the target"))?;
        let (lname, lparent) = lc.split_last().ok_or_else(|| bad("empty target"))?;
        let src = self
            .resolve(lparent, false, shown)?
            .map(|d| d.join(lname))
            .ok_or_else(|| bad("target not in the image"))?;
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => return Err(bad("target is not a regular file")),
            Err(_) => return Err(bad("target not in the image")),
        }
        remove_any(target).map_err(self.io(format!("replacing {shown}")))?;
        fs::hard_link(&src, target).map_err(self.io(format!("linking {shown}")))
    }

    /// The entry's owner (as root only); set-id bits, which chown clears, put back.
    fn set_owner(
        &self,
        header: &tar::Header,
        target: &Path,
        mode: u32,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok());
        let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok());
        std::os::unix::fs::lchown(target, uid, gid)
            .map_err(self.io(format!("setting the owner of {shown}")))?;
        let is_link = header.entry_type() == tar::EntryType::Symlink;
        if !is_link && mode & 0o6000 != 0 {
            fs::set_permissions(target, fs::Permissions::from_mode(mode))
                .map_err(self.io(format!("setting the mode of {shown}")))?;
        }
        Ok(())
    }

    /// Removes everything under `dir` that lower layers put there, keeping what this layer
    /// created (an opaque whiteout).
    fn clear_lower(&self, dir: &Path) -> io::Result<()> {
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            if !self.created.contains(&p) {
                remove_any(&p)?;
            } else if fs::symlink_metadata(&p)?.is_dir() {
                self.clear_lower(&p)?;
            }
        }
        Ok(())
    }

    fn resolve(
        &self,
        comps: &[OsString],
        create: bool,
        shown: &str,
    ) -> Result<Option<PathBuf>, UnpackError> {
        resolve_in_root(self.root, comps, create).map_err(|e| {
            if e.raw_os_error().is_some() {
                // The file system said no (full, read-only, ...): an I/O error, with its source.
                UnpackError::Io {
                    layer: self.layer,
                    context: format!("resolving {shown}"),
                    source: e,
                }
            } else {
                UnpackError::Resolve {
                    layer: self.layer,
                    path: shown.into(),
                    reason: e.to_string(),
                }
            }
        })
    }
}

/// The largest GNU long-name/long-link or PAX extension header a layer may carry: the tar
/// crate reads their data into memory, so a layer could otherwise claim gigabytes for one name.
pub const MAX_EXTENSION_HEADER: u64 = 1 << 20;

/// Reads a tar stream through, following its 512-byte headers as the tar crate does, and fails
/// when an extension header (types `L`, `K`, `x`, `g`) announces more than
/// [`MAX_EXTENSION_HEADER`] bytes. Sizes are read as the crate reads them (octal up to the first
/// NUL, or base-256), and a PAX `size` record overrides the next entry's size as it does there,
/// so the two never disagree about where the next header is. GNU sparse entries (whose extra
/// header blocks move the data) are refused.
struct ExtensionCap<R> {
    inner: R,
    /// Stream offset of the next header, and of the data read so far.
    next_header: u64,
    pos: u64,
    header: Vec<u8>,
    /// A PAX header's data being collected: (bytes, end offset).
    pax: Option<(Vec<u8>, u64)>,
    /// The `size` a PAX header set for the next entry.
    pending_size: Option<u64>,
}

impl<R: Read> ExtensionCap<R> {
    fn new(inner: R) -> Self {
        ExtensionCap {
            inner,
            next_header: 0,
            pos: 0,
            header: Vec::with_capacity(512),
            pax: None,
            pending_size: None,
        }
    }

    /// A header's size field as the tar crate reads it: base-256 (the last 8 bytes) when the
    /// high bit of the first byte is set, else octal text up to the first NUL, spaces trimmed.
    fn size(field: &[u8]) -> Option<u64> {
        if field.first().is_some_and(|b| b & 0x80 != 0) {
            let mut n: u64 = 0;
            for b in &field[field.len() - 8..] {
                n = (n << 8) | u64::from(*b);
            }
            return Some(n);
        }
        let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
        let text = std::str::from_utf8(&field[..end]).ok()?;
        u64::from_str_radix(text.trim(), 8).ok()
    }

    /// The `size` record of PAX data, parsed exactly as the tar crate parses it
    /// (`tar::pax::pax_extensions_value`): `LEN key=value` lines, LEN counting the whole line
    /// with its newline; the first malformed line, an empty line or a bad value ends the search
    /// with nothing.
    fn pax_size(data: &[u8]) -> Option<u64> {
        for line in data.split(|b| *b == b'\n') {
            if line.is_empty() {
                return None;
            }
            let space = line.iter().position(|b| *b == b' ')?;
            let reported: usize = std::str::from_utf8(&line[..space]).ok()?.parse().ok()?;
            if line.len() + 1 != reported {
                return None;
            }
            let kv = &line[space + 1..];
            let eq = kv.iter().position(|b| *b == b'=')?;
            if std::str::from_utf8(&kv[..eq]) != Ok("size") {
                continue;
            }
            return std::str::from_utf8(&kv[eq + 1..]).ok()?.parse().ok();
        }
        None
    }

    fn header_done(&mut self) -> io::Result<()> {
        let h = std::mem::take(&mut self.header);
        if h.iter().all(|b| *b == 0) {
            self.next_header += 512;
            return Ok(());
        }
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let field = Self::size(&h[124..136])
            .ok_or_else(|| bad("a tar header with an unreadable size".into()))?;
        let kind = h[156];
        let extension = matches!(kind, b'L' | b'K' | b'x' | b'g');
        if kind == b'S' {
            return Err(bad(
                "a GNU sparse entry; container layers may not carry them".into(),
            ));
        }
        if extension && field > MAX_EXTENSION_HEADER {
            return Err(bad(format!(
                "a tar extension header (type {}) of {field} bytes; at most {MAX_EXTENSION_HEADER} are read",
                kind as char
            )));
        }
        let size = if extension {
            field
        } else {
            self.pending_size.take().unwrap_or(field)
        };
        let data_start = self.next_header + 512;
        // A size near u64::MAX (base-256 allows it) must not wrap around to a small offset.
        self.next_header = size
            .div_ceil(512)
            .checked_mul(512)
            .and_then(|padded| data_start.checked_add(padded))
            .ok_or_else(|| bad(format!("a tar entry of {size} bytes: beyond any archive")))?;
        if kind == b'x' {
            self.pax = Some((Vec::with_capacity(size as usize), data_start + size));
            if size == 0 {
                self.pax = None;
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for ExtensionCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut i = 0;
        while i < n {
            let at = self.pos + i as u64;
            if at < self.next_header {
                let skip = (self.next_header - at).min((n - i) as u64) as usize;
                if let Some((data, end)) = &mut self.pax {
                    let take = (*end).saturating_sub(at).min(skip as u64) as usize;
                    data.extend_from_slice(&buf[i..i + take]);
                    if at + take as u64 >= *end {
                        self.pending_size = Self::pax_size(data);
                        self.pax = None;
                    }
                }
                i += skip;
                continue;
            }
            let take = (512 - self.header.len()).min(n - i);
            self.header.extend_from_slice(&buf[i..i + take]);
            i += take;
            if self.header.len() == 512 {
                self.header_done()?;
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// The real directory under `root` that `comps` names, with symbolic links followed as if
/// `root` were `/` (an absolute link restarts at `root`, `..` never goes above it). Missing
/// directories are created when `create`, else the answer is `None`; so is a non-directory on
/// the way when not `create` (with `create` it is replaced by a directory).
pub fn resolve_in_root(
    root: &Path,
    comps: &[OsString],
    create: bool,
) -> io::Result<Option<PathBuf>> {
    let mut done: Vec<OsString> = Vec::new();
    let mut todo: VecDeque<OsString> = comps.iter().cloned().collect();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            done.pop();
            continue;
        }
        if c == "." || c.is_empty() {
            continue;
        }
        let here: PathBuf = root.join(done.iter().collect::<PathBuf>()).join(&c);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(io::Error::other("too many levels of symbolic links"));
                }
                let to = fs::read_link(&here)?;
                if to.is_absolute() {
                    done.clear();
                }
                let mut next: VecDeque<OsString> = to
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(s.to_os_string()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    })
                    .collect();
                next.extend(todo.drain(..));
                todo = next;
            }
            Ok(m) if m.is_dir() => done.push(c),
            Ok(_) if create => {
                // A later layer turns a file into a directory.
                fs::remove_file(&here)?;
                fs::create_dir(&here)?;
                done.push(c);
            }
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&here)?;
                done.push(c);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(root.join(done.iter().collect::<PathBuf>())))
}

/// The normal components of an entry name (leading `/` and `./` dropped); `None` when it holds
/// `..`.
pub fn components(p: &Path) -> Option<Vec<OsString>> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s.to_os_string()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Removes a file, link or directory tree; nothing there is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar layer built entry by entry (raw headers, so names like `../x` can be written).
    struct Tar {
        b: tar::Builder<Vec<u8>>,
    }

    impl Tar {
        fn new() -> Tar {
            Tar {
                b: tar::Builder::new(Vec::new()),
            }
        }
        fn header(kind: tar::EntryType, name: &str, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            // Raw bytes: no normalisation, so hostile names reach the unpacker as written.
            let field = &mut h.as_old_mut().name;
            field[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            h
        }
        fn file(mut self, name: &str, data: &[u8]) -> Tar {
            let h = Tar::header(tar::EntryType::Regular, name, data.len() as u64, 0o644);
            self.b.append(&h, data).expect("append");
            self
        }
        fn dir(mut self, name: &str) -> Tar {
            let h = Tar::header(tar::EntryType::Directory, name, 0, 0o755);
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Tar {
            let mut h = Tar::header(kind, name, 0, 0o777);
            h.set_link_name(target).expect("link name");
            h.set_cksum();
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        fn special(mut self, kind: tar::EntryType, name: &str) -> Tar {
            let h = Tar::header(kind, name, 0, 0o644);
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        fn write(self, dir: &Path, name: &str) -> PathBuf {
            let p = dir.join(name);
            fs::write(&p, self.b.into_inner().expect("tar")).expect("write");
            p
        }
    }

    fn run(layers: Vec<Tar>, limits: Limits) -> (tempfile::TempDir, Result<Stats, UnpackError>) {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        fs::create_dir(&root).expect("root");
        let paths: Vec<PathBuf> = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.write(t.path(), &format!("l{i}.tar")))
            .collect();
        let files: Vec<LayerFile> = paths
            .iter()
            .map(|p| LayerFile {
                path: p,
                compression: Compression::None,
            })
            .collect();
        let r = unpack(&root, &files, limits);
        (t, r)
    }

    /// Review L2: a whiteout named `.wh...` (hiding `..`) or `.wh..` at the top of a layer
    /// would remove the directory above the root; refused, nothing outside the root touched.
    #[test]
    fn whiteouts_of_dot_and_dot_dot_are_refused() {
        for name in [".wh...", ".wh..", "etc/.wh..."] {
            let (t, r) = run(
                vec![Tar::new().dir("etc/").file(name, b"")],
                Limits::default(),
            );
            fs::write(t.path().join("sibling"), "x").expect("sibling");
            assert!(
                matches!(r, Err(UnpackError::PathEscape { .. })),
                "{name}: {r:?}"
            );
            assert!(t.path().join("root").is_dir(), "{name}: root removed");
        }
        // And through unpack itself, with a sibling present before the layer is applied.
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("rootfs");
        fs::create_dir(&root).expect("root");
        fs::write(t.path().join("sibling"), "x").expect("sibling");
        let layer = Tar::new().file(".wh...", b"").write(t.path(), "l.tar");
        let r = unpack(
            &root,
            &[LayerFile {
                path: &layer,
                compression: Compression::None,
            }],
            Limits::default(),
        );
        assert!(r.is_err(), "{r:?}");
        assert!(t.path().join("sibling").exists() && root.is_dir());
    }

    /// Review L5: a GNU long-name header announcing more than [`MAX_EXTENSION_HEADER`] bytes is
    /// refused before the tar crate buffers it; a long name of ordinary length unpacks.
    #[test]
    fn huge_long_name_headers_are_refused() {
        let long = format!(
            "d/{}/{}/{}",
            "a".repeat(100),
            "b".repeat(100),
            "c".repeat(100)
        );
        let mut ok = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        ok.append_data(&mut h, &long, &b"x"[..]).expect("append");
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        fs::create_dir(&root).expect("root");
        let p = t.path().join("ok.tar");
        fs::write(&p, ok.into_inner().expect("tar")).expect("write");
        let files = [LayerFile {
            path: &p,
            compression: Compression::None,
        }];
        unpack(&root, &files, Limits::default()).expect("a 302-byte name");
        assert!(root.join(&long).is_file());
        // A 'L' header of 2 MiB.
        let mut raw = Vec::new();
        let mut l = tar::Header::new_gnu();
        l.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        l.set_entry_type(tar::EntryType::GNULongName);
        l.set_size(2 << 20);
        l.set_mode(0o644);
        l.set_cksum();
        raw.extend_from_slice(l.as_bytes());
        raw.extend(std::iter::repeat_n(b'a', 2 << 20));
        raw.extend(std::iter::repeat_n(0u8, 1024));
        let p = t.path().join("huge.tar");
        fs::write(&p, raw).expect("write");
        let root2 = t.path().join("root2");
        fs::create_dir(&root2).expect("root");
        let e = unpack(
            &root2,
            &[LayerFile {
                path: &p,
                compression: Compression::None,
            }],
            Limits::default(),
        )
        .expect_err("refused");
        assert!(
            crate::error::chain(&e).contains("extension header"),
            "{e:?}"
        );
    }

    /// Review L5 (second round): the cap reads sizes exactly as the tar crate does — octal up to
    /// the first NUL, and a PAX `size` record overriding the next entry's — so an archive that
    /// makes the two disagree cannot slip a huge long-name header past it.
    #[test]
    fn the_header_cap_follows_the_tar_crate() {
        fn header(kind: u8, name: &str, size_field: &[u8]) -> Vec<u8> {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::new(kind));
            h.as_old_mut().size.copy_from_slice(size_field);
            h.set_cksum();
            h.as_bytes().to_vec()
        }
        fn octal(n: u64) -> [u8; 12] {
            let mut f = [0u8; 12];
            let t = format!("{n:011o}");
            f[..11].copy_from_slice(t.as_bytes());
            f
        }
        fn pad(v: &mut Vec<u8>) {
            while v.len() % 512 != 0 {
                v.push(0);
            }
        }
        fn pax(kv: &str) -> Vec<u8> {
            // "LEN key=value\n", LEN counting the whole line.
            let mut digits = 1;
            loop {
                let len = digits + 1 + kv.len() + 1;
                if len.to_string().len() == digits {
                    return format!("{len} {kv}\n").into_bytes();
                }
                digits += 1;
            }
        }
        let huge_l = |raw: &mut Vec<u8>| {
            raw.extend(header(b'L', "././@LongLink", &octal(2 << 20)));
            raw.extend(std::iter::repeat_n(b'a', 2 << 20));
            pad(raw);
        };
        let unpack_raw = |raw: Vec<u8>| {
            let t = tempfile::tempdir().expect("tmp");
            let root = t.path().join("root");
            fs::create_dir(&root).expect("root");
            let p = t.path().join("l.tar");
            fs::write(&p, raw).expect("write");
            let r = unpack(
                &root,
                &[LayerFile {
                    path: &p,
                    compression: Compression::None,
                }],
                Limits::default(),
            );
            (t, r)
        };
        // A size field "1\0" followed by digits: the crate reads 1, and so does the cap.
        let mut raw = Vec::new();
        let mut field = [b'0'; 12];
        field[..2].copy_from_slice(b"1\0");
        raw.extend(header(b'0', "a", &field));
        raw.push(b'x');
        pad(&mut raw);
        huge_l(&mut raw);
        raw.extend([0u8; 1024]);
        let (_t, r) = unpack_raw(raw);
        let e = r.expect_err("the long name after it is seen and refused");
        assert!(
            crate::error::chain(&e).contains("extension header"),
            "{e:?}"
        );
        // PAX size=0 for an entry whose header says 4096: the crate takes 0, so the huge long
        // name right after is the next header, and the cap sees it.
        let mut raw = Vec::new();
        let rec = pax("size=0");
        raw.extend(header(b'x', "pax", &octal(rec.len() as u64)));
        raw.extend(&rec);
        pad(&mut raw);
        raw.extend(header(b'0', "b", &octal(4096)));
        huge_l(&mut raw);
        raw.extend([0u8; 1024]);
        let (_t, r) = unpack_raw(raw);
        let e = r.expect_err("refused");
        assert!(
            crate::error::chain(&e).contains("extension header"),
            "{e:?}"
        );
        // PAX size=2048 for an entry whose header says 0: its 2048 bytes (which look like a
        // huge long-name header) are data, not a header; the file unpacks.
        let mut raw = Vec::new();
        let rec = pax("size=2048");
        raw.extend(header(b'x', "pax", &octal(rec.len() as u64)));
        raw.extend(&rec);
        pad(&mut raw);
        raw.extend(header(b'0', "c", &octal(0)));
        let mut data = header(b'L', "././@LongLink", &octal(1 << 30));
        data.resize(2048, b'z');
        raw.extend(&data);
        raw.extend([0u8; 1024]);
        let (t, r) = unpack_raw(raw);
        r.expect("a plain file of 2048 bytes");
        assert_eq!(fs::read(t.path().join("root/c")).expect("c").len(), 2048);
    }

    /// Found by `scripts/fuzz` (unpack): a base-256 size near u64::MAX overflowed the cap's
    /// offset arithmetic (a panic with overflow checks, a wrapped offset without). Now an error.
    #[test]
    fn an_entry_size_near_u64_max_is_refused_not_wrapped() {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..1].copy_from_slice(b"a");
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let mut field = [0xffu8; 12];
        field[0] = 0x80;
        h.as_old_mut().size.copy_from_slice(&field);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend([0u8; 1024]);
        let mut cap = ExtensionCap::new(&raw[..]);
        let mut sink = Vec::new();
        let e = io::copy(&mut cap, &mut sink).expect_err("refused");
        assert!(e.to_string().contains("beyond any archive"), "{e}");
    }

    #[test]
    fn files_dirs_links_and_whiteouts() {
        let lower = Tar::new()
            .dir("etc/")
            .file("etc/keep", b"keep")
            .file("etc/gone", b"gone")
            .dir("opaque/")
            .file("opaque/old", b"old")
            .file("opaque2/sub/old", b"old")
            .file("bin/busybox", b"\x7fELF")
            .link(tar::EntryType::Symlink, "bin/sh", "busybox")
            .link(tar::EntryType::Link, "bin/hard", "bin/busybox");
        let upper = Tar::new()
            .file("etc/.wh.gone", b"")
            .file("opaque/.wh..wh..opq", b"")
            .file("opaque/new", b"new")
            // The marker after this layer's own content: it still hides only the lower layer's.
            .file("opaque2/sub/new", b"new")
            .file("opaque2/.wh..wh..opq", b"");
        let (t, r) = run(vec![lower, upper], Limits::default());
        let root = t.path().join("root");
        let s = r.expect("unpacks");
        assert_eq!(fs::read(root.join("etc/keep")).expect("keep"), b"keep");
        assert!(!root.join("etc/gone").exists(), "whiteout applied");
        assert!(!root.join("opaque/old").exists(), "opaque dir cleared");
        assert_eq!(
            fs::read(root.join("opaque/new")).expect("new"),
            b"new",
            "same-layer content kept"
        );
        assert_eq!(
            fs::read_link(root.join("bin/sh")).expect("link"),
            Path::new("busybox")
        );
        assert_eq!(fs::read(root.join("bin/hard")).expect("hard"), b"\x7fELF");
        assert!(
            !root.join("etc/.wh.gone").exists(),
            "whiteout files are not unpacked"
        );
        assert_eq!(
            s.bytes,
            4 + 4 + 3 + 3 + 4 + 3 + 3,
            "keep, gone, old, old, busybox, new, new"
        );
    }

    #[test]
    fn dotdot_names_are_refused() {
        for name in ["../escape", "a/../../escape", "./../escape"] {
            let (t, r) = run(vec![Tar::new().file(name, b"x")], Limits::default());
            let e = r.expect_err(name);
            assert!(matches!(e, UnpackError::PathEscape { .. }), "{name}: {e}");
            assert!(
                !t.path().join("escape").exists(),
                "{name}: nothing written outside"
            );
        }
    }

    #[test]
    fn absolute_names_stay_inside() {
        let (t, r) = run(vec![Tar::new().file("/etc/abs", b"x")], Limits::default());
        r.expect("unpacks");
        assert_eq!(
            fs::read(t.path().join("root/etc/abs")).expect("inside"),
            b"x"
        );
    }

    #[test]
    fn symlinks_cannot_carry_writes_out_of_the_root() {
        let outside = tempfile::tempdir().expect("tmp");
        let target = outside.path().display().to_string();
        let (t, r) = run(
            vec![
                Tar::new()
                    .link(tar::EntryType::Symlink, "abs", &target)
                    .link(tar::EntryType::Symlink, "up", "../../../..")
                    .file("abs/planted", b"x"),
                Tar::new().file("up/planted2", b"y"),
            ],
            Limits::default(),
        );
        r.expect("unpacks, inside the root");
        assert!(
            !outside.path().join("planted").exists(),
            "absolute link followed to the host"
        );
        assert!(
            !t.path().join("planted2").exists(),
            "relative link followed out"
        );
        let root = t.path().join("root");
        // Both land where the links point when the root is `/`.
        assert!(root
            .join(target.trim_start_matches('/'))
            .join("planted")
            .exists());
        assert!(root.join("planted2").exists());
    }

    #[test]
    fn hard_links_must_name_a_file_in_the_image() {
        let outside = tempfile::NamedTempFile::new().expect("tmp");
        let p = outside.path().display().to_string();
        let (_t, r) = run(
            vec![Tar::new().link(tar::EntryType::Link, "stolen", &p)],
            Limits::default(),
        );
        let e = r.expect_err("host file");
        assert!(matches!(e, UnpackError::BadLink { .. }), "{e}");
        let (_t, r) = run(
            vec![Tar::new().link(tar::EntryType::Link, "x", "../etc/shadow")],
            Limits::default(),
        );
        assert!(matches!(
            r.expect_err("dotdot"),
            UnpackError::BadLink { .. }
        ));
    }

    #[test]
    fn device_nodes_and_fifos_are_refused() {
        for kind in [
            tar::EntryType::Char,
            tar::EntryType::Block,
            tar::EntryType::Fifo,
        ] {
            let (t, r) = run(vec![Tar::new().special(kind, "dev/sda")], Limits::default());
            let e = r.expect_err("device");
            assert!(matches!(e, UnpackError::DeviceNode { .. }), "{kind:?}: {e}");
            assert!(!t.path().join("root/dev/sda").exists());
        }
    }

    #[test]
    fn limits_stop_oversized_layers() {
        let big = vec![0u8; 4096];
        let limits = Limits {
            max_bytes: 6000,
            max_entries: 100,
        };
        let (_t, r) = run(
            vec![Tar::new().file("a", &big), Tar::new().file("b", &big)],
            limits,
        );
        let e = r.expect_err("too large");
        assert!(matches!(e, UnpackError::TooLarge { layer: 2, .. }), "{e}");
        let limits = Limits {
            max_bytes: 1 << 20,
            max_entries: 2,
        };
        let (_t, r) = run(
            vec![Tar::new().file("a", b"").file("b", b"").file("c", b"")],
            limits,
        );
        assert!(matches!(
            r.expect_err("entries"),
            UnpackError::TooManyEntries { .. }
        ));
    }
}
