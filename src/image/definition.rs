//! Parsing, merging (`extends`) and validation of image definition files.

use super::ByteSize;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where a value came from: file, line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Everything that can be wrong with a definition. Each case names the file and, where it applies,
/// the line, column and field.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("reading image definition {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Syntax { origin: Origin, message: String },
    #[error("{origin}: field `{field}`: {message}")]
    Invalid {
        origin: Origin,
        field: String,
        message: String,
    },
    #[error("{path}: `extends` forms a cycle: {chain}")]
    ExtendsCycle { path: PathBuf, chain: String },
}

/// Output formats `keel build` can write besides the UKI and manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    Raw,
    Qcow2,
}

/// The Debian archive an image is bootstrapped from, as written in a file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBase {
    suite: Option<Spanned<String>>,
    mirror: Option<Spanned<String>>,
    components: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    source: Spanned<String>,
    dest: Spanned<String>,
    mode: Option<Spanned<u32>>,
}

/// What a node without a TPM does on first boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WithoutTpm {
    /// Stop the boot with a message: the node's state is never stored unsealed.
    Refuse,
    /// Create the root partition with an empty LUKS passphrase (no protection) and warn.
    Unencrypted,
}

impl WithoutTpm {
    pub fn as_str(self) -> &'static str {
        match self {
            WithoutTpm::Refuse => "refuse",
            WithoutTpm::Unencrypted => "unencrypted",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTrust {
    keys: Option<Spanned<String>>,
    generate_keys: Option<bool>,
    without_tpm: Option<WithoutTpm>,
    unsigned_esp_configs: Option<bool>,
}

/// Trusted boot settings: signing keys and the sealed root partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustSettings {
    /// The operator's key directory (absolute).
    pub keys: PathBuf,
    /// Create the key directory when missing (development images only).
    pub generate_keys: bool,
    pub without_tpm: WithoutTpm,
    /// Apply an Ignition config found on the ESP without the operator's signature.
    pub unsigned_esp_configs: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawContainers {
    keys: Option<Vec<Spanned<String>>>,
    require_trusted_boot: Option<bool>,
    require_enrolled_machines: Option<bool>,
    machines: Option<Spanned<String>>,
    cluster: Option<String>,
    allow_root: Option<bool>,
}

/// The container policy the image carries for keel-agent (docs/containers.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerSettings {
    /// Public keys (PEM) allowed to sign images; empty means the container-signing key of the
    /// `[trust]` key directory.
    pub keys: Vec<PathBuf>,
    pub require_trusted_boot: bool,
    pub require_enrolled_machines: bool,
    /// A signed enrolled-machines list to ship in the image (its `.sig` beside it).
    pub machines: Option<PathBuf>,
    /// The cluster the image is for; enrolled-machines lists must name it (default: the
    /// image's name).
    pub cluster: Option<String>,
    /// Containers may run as root (uid 0).
    pub allow_root: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawUpdate {
    repository: Option<Spanned<String>>,
    root: Option<Spanned<String>>,
    tries: Option<Spanned<u32>>,
    reboot: Option<Spanned<String>>,
    health_timeout_secs: Option<u64>,
    min_version: Option<Spanned<String>>,
}

/// Signed A/B updates (docs/updates.md): where nodes look for releases, the repository's root
/// of trust the image embeds, and how a new version is tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateSettings {
    /// The repository's address (http, https or file URL); nodes may override it in /etc.
    pub repository: Option<String>,
    /// The repository's root.json (absolute); default: `tuf/root.json` of the [trust] keys.
    pub root: Option<PathBuf>,
    /// Boot attempts a new version gets.
    pub tries: u32,
    /// `off` (install, wait for `keel-update apply`) or `immediate`.
    pub reboot: String,
    pub health_timeout_secs: u64,
    /// The oldest version nodes may run.
    pub min_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawKeep {
    docs: Option<bool>,
    man: Option<bool>,
    locales: Option<bool>,
}

/// One definition file exactly as written; every field optional so `extends` can layer them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDefinition {
    extends: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    description: Option<String>,
    packages: Option<Vec<Spanned<String>>>,
    units: Option<Vec<Spanned<String>>>,
    enable: Option<Vec<Spanned<String>>>,
    disable: Option<Vec<Spanned<String>>>,
    binaries: Option<Vec<Spanned<String>>>,
    kernel_cmdline: Option<Vec<Spanned<String>>>,
    usr_size: Option<Spanned<ByteSize>>,
    esp_size: Option<Spanned<ByteSize>>,
    formats: Option<Vec<Spanned<OutputFormat>>>,
    initrd_modules: Option<Vec<Spanned<String>>>,
    base: Option<RawBase>,
    keep: Option<RawKeep>,
    files: Option<Vec<RawFile>>,
    trust: Option<RawTrust>,
    containers: Option<RawContainers>,
    update: Option<RawUpdate>,
    mask: Option<Vec<Spanned<String>>>,
}

/// A file copied from the project into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    /// Absolute path of the source on the build machine.
    pub source: PathBuf,
    /// Absolute path inside the image (`/etc/...` goes to the factory defaults).
    pub dest: String,
    pub mode: u32,
    #[serde(skip)]
    pub origin: Origin,
}

/// A unit file from a project's `units/` directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitEntry {
    /// Path below /usr/lib/systemd/system (e.g. `etcd.service.d/10-keel.conf`).
    pub name: String,
    /// Absolute path of the source on the build machine.
    pub source: PathBuf,
}

/// A fully resolved and validated image definition.
#[derive(Debug, Clone, Serialize)]
pub struct Definition {
    /// The file this definition was loaded from (the leaf of any `extends` chain).
    pub path: PathBuf,
    /// The project directory that `units/` and `configs/` are taken from.
    pub project_dir: PathBuf,
    /// Every file read to produce this definition, leaf first.
    pub sources: Vec<PathBuf>,
    pub name: String,
    pub version: String,
    pub description: String,
    pub suite: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub packages: Vec<String>,
    /// Unit files from `units/`, installed into `/usr/lib/systemd/system`.
    pub units: Vec<UnitEntry>,
    pub enable: Vec<String>,
    pub disable: Vec<String>,
    /// keel node programs built from this repository, installed into `/usr/bin`.
    pub binaries: Vec<String>,
    pub kernel_cmdline: Vec<String>,
    pub usr_size: ByteSize,
    pub esp_size: ByteSize,
    pub formats: Vec<OutputFormat>,
    pub initrd_modules: Vec<String>,
    pub keep_docs: bool,
    pub keep_man: bool,
    pub keep_locales: bool,
    pub files: Vec<FileEntry>,
    /// Signed, measured boot and a TPM-sealed root; `None` builds an unsigned image.
    pub trust: Option<TrustSettings>,
    /// Signed containers only (keel-agent); `None` ships no container policy.
    pub containers: Option<ContainerSettings>,
    /// Signed A/B updates; `None` ships no updater settings.
    pub update: Option<UpdateSettings>,
    /// Units masked in /usr (linked to /dev/null): never started, whatever wants them.
    pub mask: Vec<String>,
}

pub const DEFAULT_SUITE: &str = "trixie";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const DEFAULT_USR_SIZE: u64 = 1 << 30;
const DEFAULT_ESP_SIZE: u64 = 256 << 20;
/// Modules every initrd needs to find and open its disks; definitions may add more.
const BASE_INITRD_MODULES: &[&str] = &[
    "virtio_blk",
    "virtio_scsi",
    "virtio_pci",
    "sd_mod",
    "nvme",
    "ahci",
    "dm_mod",
    "dm_verity",
    "dm_crypt",
    // The sealed root's cipher (aes-xts-plain64) and cryptsetup's kernel crypto interface.
    "xts",
    "aesni_intel",
    "algif_skcipher",
    "erofs",
    "ext4",
    "loop",
    "efivarfs",
    "qemu_fw_cfg",
    // The ESP, read by first-boot provisioning for keel/config.ign.
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "tpm_tis",
    "tpm_crb",
    "autofs4",
    // dm-verity hashes every block read from /usr: the SSSE3/AVX2/SHA-NI sha256, not the generic C.
    "sha256_ssse3",
];

/// One layer of the `extends` chain while merging.
struct Layer {
    path: PathBuf,
    text: String,
    raw: RawDefinition,
}

impl Definition {
    /// Overrides the version (e.g. `keel build --version` from a release pipeline).
    pub fn set_version(&mut self, v: &str) -> Result<(), String> {
        validate_version(v)?;
        self.version = v.to_string();
        Ok(())
    }

    /// Loads `path`, follows `extends`, merges and validates. Nothing is built here.
    pub fn load(path: &Path) -> Result<Definition, DefinitionError> {
        let mut layers: Vec<Layer> = Vec::new();
        let mut next = Some(path.to_path_buf());
        while let Some(p) = next.take() {
            let canonical = p.canonicalize().map_err(|source| DefinitionError::Read {
                path: p.clone(),
                source,
            })?;
            if layers.iter().any(|l| l.path == canonical) {
                let mut chain: Vec<String> = layers
                    .iter()
                    .map(|l| l.path.display().to_string())
                    .collect();
                chain.push(canonical.display().to_string());
                return Err(DefinitionError::ExtendsCycle {
                    path: path.to_path_buf(),
                    chain: chain.join(" -> "),
                });
            }
            let text =
                std::fs::read_to_string(&canonical).map_err(|source| DefinitionError::Read {
                    path: canonical.clone(),
                    source,
                })?;
            let raw = parse_raw(&canonical, &text)?;
            if let Some(ext) = &raw.extends {
                let dir = canonical.parent().unwrap_or(Path::new("."));
                let target = dir.join(ext.get_ref());
                if !target.exists() {
                    return Err(invalid(
                        &canonical,
                        &text,
                        ext.span(),
                        "extends",
                        format!(
                            "no such definition {} (paths are relative to {})",
                            target.display(),
                            dir.display()
                        ),
                    ));
                }
                next = Some(target);
            }
            layers.push(Layer {
                path: canonical,
                text,
                raw,
            });
        }
        // Merge from the root of the chain down to the leaf.
        layers.reverse();
        merge(layers)
    }
}

fn parse_raw(path: &Path, text: &str) -> Result<RawDefinition, DefinitionError> {
    toml::from_str::<RawDefinition>(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        DefinitionError::Syntax {
            origin: Origin {
                file: path.to_path_buf(),
                line,
                column,
            },
            message: e.message().to_string(),
        }
    })
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

fn origin(path: &Path, text: &str, span: std::ops::Range<usize>) -> Origin {
    let (line, column) = line_col(text, span.start);
    Origin {
        file: path.to_path_buf(),
        line,
        column,
    }
}

fn invalid(
    path: &Path,
    text: &str,
    span: std::ops::Range<usize>,
    field: &str,
    message: String,
) -> DefinitionError {
    DefinitionError::Invalid {
        origin: origin(path, text, span),
        field: field.to_string(),
        message,
    }
}

/// The project directory of a definition: the parent of `images/` when the file lives there.
fn project_dir_of(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|n| n == "images") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn push_unique(list: &mut Vec<String>, seen: &mut BTreeSet<String>, value: &str) {
    if seen.insert(value.to_string()) {
        list.push(value.to_string());
    }
}

/// What earlier layers set: names that must appear once, and list entries already taken (a
/// later layer's duplicate is dropped).
#[derive(Default)]
struct Seen {
    name: bool,
    version: bool,
    packages: BTreeSet<String>,
    units: BTreeSet<String>,
    enable: BTreeSet<String>,
    disable: BTreeSet<String>,
    binaries: BTreeSet<String>,
    modules: BTreeSet<String>,
}

fn merge(layers: Vec<Layer>) -> Result<Definition, DefinitionError> {
    let leaf = layers.last().map(|l| l.path.clone()).unwrap_or_default();
    let project_dir = project_dir_of(&leaf);
    let mut def = Definition {
        path: leaf.clone(),
        project_dir: project_dir.clone(),
        sources: layers.iter().rev().map(|l| l.path.clone()).collect(),
        name: String::new(),
        version: String::new(),
        description: String::new(),
        suite: DEFAULT_SUITE.into(),
        mirror: DEFAULT_MIRROR.into(),
        components: vec!["main".into()],
        packages: vec![],
        units: vec![],
        enable: vec![],
        disable: vec![],
        binaries: vec![],
        kernel_cmdline: vec![],
        usr_size: ByteSize(DEFAULT_USR_SIZE),
        esp_size: ByteSize(DEFAULT_ESP_SIZE),
        formats: vec![OutputFormat::Raw, OutputFormat::Qcow2],
        initrd_modules: BASE_INITRD_MODULES.iter().map(|s| s.to_string()).collect(),
        keep_docs: false,
        keep_man: false,
        keep_locales: false,
        files: vec![],
        trust: None,
        containers: None,
        update: None,
        mask: vec![],
    };
    let mut seen = Seen {
        modules: def.initrd_modules.iter().cloned().collect(),
        ..Seen::default()
    };
    for layer in &layers {
        merge_identity(&mut def, &mut seen, layer)?;
        merge_lists(&mut def, &mut seen, layer)?;
        merge_sizes(&mut def, layer)?;
        merge_files(&mut def, layer)?;
        merge_trust(&mut def, layer)?;
        merge_containers(&mut def, layer)?;
        merge_update(&mut def, layer)?;
    }
    check_merged(&def, &seen, &leaf)?;
    Ok(def)
}

/// Merges the name, version, description and base of one layer into `def`.
fn merge_identity(
    def: &mut Definition,
    seen: &mut Seen,
    layer: &Layer,
) -> Result<(), DefinitionError> {
    let (path, text, raw) = (&layer.path, &layer.text, &layer.raw);
    let bad = |span: std::ops::Range<usize>, field: &str, msg: String| {
        invalid(path, text, span, field, msg)
    };
    if let Some(n) = &raw.name {
        validate_name(n.get_ref()).map_err(|m| bad(n.span(), "name", m))?;
        def.name = n.get_ref().clone();
        seen.name = true;
    }
    if let Some(v) = &raw.version {
        validate_version(v.get_ref()).map_err(|m| bad(v.span(), "version", m))?;
        def.version = v.get_ref().clone();
        seen.version = true;
    }
    if let Some(d) = &raw.description {
        def.description = d.clone();
    }
    if let Some(base) = &raw.base {
        if let Some(s) = &base.suite {
            if s.get_ref().is_empty() || s.get_ref().contains(char::is_whitespace) {
                return Err(bad(
                    s.span(),
                    "base.suite",
                    "must be a Debian suite name such as \"trixie\"".into(),
                ));
            }
            def.suite = s.get_ref().clone();
        }
        if let Some(m) = &base.mirror {
            let url = m.get_ref();
            if !(url.starts_with("http://")
                || url.starts_with("https://")
                || url.starts_with("file://"))
            {
                return Err(bad(
                    m.span(),
                    "base.mirror",
                    format!("`{url}` is not an http(s):// or file:// URL of a Debian mirror"),
                ));
            }
            def.mirror = url.trim_end_matches('/').to_string();
        }
        if let Some(c) = &base.components {
            def.components = c.iter().map(|s| s.get_ref().clone()).collect();
        }
    }
    Ok(())
}

/// Merges the packages, units, enable/disable lists, binaries, command line and initrd modules one layer adds into `def`.
fn merge_lists(
    def: &mut Definition,
    seen: &mut Seen,
    layer: &Layer,
) -> Result<(), DefinitionError> {
    let (path, text, raw) = (&layer.path, &layer.text, &layer.raw);
    let bad = |span: std::ops::Range<usize>, field: &str, msg: String| {
        invalid(path, text, span, field, msg)
    };
    for p in raw.packages.iter().flatten() {
        validate_package(p.get_ref()).map_err(|m| bad(p.span(), "packages", m))?;
        push_unique(&mut def.packages, &mut seen.packages, p.get_ref());
    }
    // Each layer takes units/ and configs/ from its own project.
    let layer_project = project_dir_of(path);
    for u in raw.units.iter().flatten() {
        let file = layer_project.join("units").join(u.get_ref());
        if u.get_ref().contains("..") || !file.is_file() {
            return Err(bad(
                u.span(),
                "units",
                format!(
                    "unit `{}` not found: expected the file {}",
                    u.get_ref(),
                    file.display()
                ),
            ));
        }
        if seen.units.insert(u.get_ref().clone()) {
            def.units.push(UnitEntry {
                name: u.get_ref().clone(),
                source: file,
            });
        }
    }
    for u in raw.enable.iter().flatten() {
        validate_unit_name(u.get_ref()).map_err(|m| bad(u.span(), "enable", m))?;
        push_unique(&mut def.enable, &mut seen.enable, u.get_ref());
    }
    for u in raw.disable.iter().flatten() {
        validate_unit_name(u.get_ref()).map_err(|m| bad(u.span(), "disable", m))?;
        push_unique(&mut def.disable, &mut seen.disable, u.get_ref());
    }
    for b in raw.binaries.iter().flatten() {
        if !b.get_ref().starts_with("keel-") {
            return Err(bad(
                b.span(),
                "binaries",
                format!(
                    "`{}` is not a keel node program (names start with `keel-`)",
                    b.get_ref()
                ),
            ));
        }
        push_unique(&mut def.binaries, &mut seen.binaries, b.get_ref());
    }
    for a in raw.kernel_cmdline.iter().flatten() {
        let arg = a.get_ref();
        if arg.starts_with("usrhash=")
            || arg.starts_with("roothash=")
            || arg.starts_with("root=")
            || arg.starts_with("mount.usr")
        {
            return Err(bad(
                a.span(),
                "kernel-cmdline",
                format!("`{arg}` is set by keel from the built image; remove it"),
            ));
        }
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            return Err(bad(
                a.span(),
                "kernel-cmdline",
                "each entry must be one argument without spaces".into(),
            ));
        }
        def.kernel_cmdline.push(arg.clone());
    }
    for m in raw.initrd_modules.iter().flatten() {
        push_unique(&mut def.initrd_modules, &mut seen.modules, m.get_ref());
    }
    Ok(())
}

/// Merges the sizes, formats and `[keep]` of one layer into `def`.
fn merge_sizes(def: &mut Definition, layer: &Layer) -> Result<(), DefinitionError> {
    let (path, text, raw) = (&layer.path, &layer.text, &layer.raw);
    let bad = |span: std::ops::Range<usize>, field: &str, msg: String| {
        invalid(path, text, span, field, msg)
    };
    if let Some(s) = &raw.usr_size {
        let b = s.get_ref().bytes();
        if b < 64 * ByteSize::MIB || b % ByteSize::MIB != 0 {
            return Err(bad(
                s.span(),
                "usr-size",
                format!(
                    "{} must be a whole number of MiB and at least 64M",
                    s.get_ref()
                ),
            ));
        }
        def.usr_size = *s.get_ref();
    }
    if let Some(s) = &raw.esp_size {
        let b = s.get_ref().bytes();
        if b < 64 * ByteSize::MIB || b % ByteSize::MIB != 0 {
            return Err(bad(
                s.span(),
                "esp-size",
                format!(
                    "{} must be a whole number of MiB and at least 64M (FAT32 and two UKIs)",
                    s.get_ref()
                ),
            ));
        }
        def.esp_size = *s.get_ref();
    }
    if let Some(f) = &raw.formats {
        let mut set: Vec<OutputFormat> = f.iter().map(|x| *x.get_ref()).collect();
        set.sort();
        set.dedup();
        def.formats = set;
    }
    if let Some(k) = &raw.keep {
        def.keep_docs = k.docs.unwrap_or(def.keep_docs);
        def.keep_man = k.man.unwrap_or(def.keep_man);
        def.keep_locales = k.locales.unwrap_or(def.keep_locales);
    }
    Ok(())
}

/// Merges the `[[files]]` of one layer (a later layer replaces a file with the same destination) into `def`.
fn merge_files(def: &mut Definition, layer: &Layer) -> Result<(), DefinitionError> {
    let (path, text, raw) = (&layer.path, &layer.text, &layer.raw);
    let bad = |span: std::ops::Range<usize>, field: &str, msg: String| {
        invalid(path, text, span, field, msg)
    };
    let layer_project = project_dir_of(path);
    for f in raw.files.iter().flatten() {
        let src_rel = f.source.get_ref();
        if !["units/", "configs/", "docs/"]
            .iter()
            .any(|d| src_rel.starts_with(d))
            || src_rel.contains("..")
        {
            return Err(bad(
                f.source.span(),
                "files.source",
                format!(
                    "`{src_rel}` must be a path under units/, configs/ or docs/ of the project"
                ),
            ));
        }
        let source = layer_project.join(src_rel);
        if !source.is_file() {
            return Err(bad(
                f.source.span(),
                "files.source",
                format!("{} does not exist or is not a file", source.display()),
            ));
        }
        let dest = f.dest.get_ref();
        validate_dest(dest).map_err(|m| bad(f.dest.span(), "files.dest", m))?;
        let mode = match &f.mode {
            Some(m) if *m.get_ref() > 0o7777 => {
                return Err(bad(
                    m.span(),
                    "files.mode",
                    format!("{:o} is not a file mode (write it as 0o644)", m.get_ref()),
                ));
            }
            Some(m) => *m.get_ref(),
            None => 0o644,
        };
        let entry = FileEntry {
            source,
            dest: dest.clone(),
            mode,
            origin: origin(path, text, f.source.span()),
        };
        // A later layer replaces an earlier file with the same destination.
        def.files.retain(|e| e.dest != entry.dest);
        def.files.push(entry);
    }
    Ok(())
}

/// Merges the `[trust]` table of one layer into `def`.
fn merge_trust(def: &mut Definition, layer: &Layer) -> Result<(), DefinitionError> {
    let (path, text, raw) = (&layer.path, &layer.text, &layer.raw);
    let bad = |span: std::ops::Range<usize>, field: &str, msg: String| {
        invalid(path, text, span, field, msg)
    };
    if let Some(t) = &raw.trust {
        let mut settings = def.trust.clone().unwrap_or(TrustSettings {
            keys: PathBuf::new(),
            generate_keys: false,
            without_tpm: WithoutTpm::Refuse,
            unsigned_esp_configs: false,
        });
        if let Some(k) = &t.keys {
            if k.get_ref().is_empty() {
                return Err(bad(
                    k.span(),
                    "trust.keys",
                    "must name the key directory made by `keel keys init DIR`".into(),
                ));
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            settings.keys = dir.join(k.get_ref());
        }
        if let Some(g) = t.generate_keys {
            settings.generate_keys = g;
        }
        if let Some(w) = t.without_tpm {
            settings.without_tpm = w;
        }
        if let Some(u) = t.unsigned_esp_configs {
            settings.unsigned_esp_configs = u;
        }
        if settings.keys.as_os_str().is_empty() {
            return Err(invalid(path, text, 0..0, "trust.keys", "missing: a [trust] table must name the key directory (keys = \"DIR\", relative to this file)".into()));
        }
        def.trust = Some(settings);
    }
    Ok(())
}

/// Merges the `[containers]` table of one layer into `def`.
fn merge_containers(def: &mut Definition, layer: &Layer) -> Result<(), DefinitionError> {
    let (path, raw) = (&layer.path, &layer.raw);
    if let Some(c) = &raw.containers {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut settings = def.containers.clone().unwrap_or(ContainerSettings {
            keys: vec![],
            require_trusted_boot: true,
            require_enrolled_machines: false,
            machines: None,
            cluster: None,
            allow_root: false,
        });
        if let Some(keys) = &c.keys {
            settings.keys = keys.iter().map(|k| dir.join(k.get_ref())).collect();
        }
        if let Some(b) = c.require_trusted_boot {
            settings.require_trusted_boot = b;
        }
        if let Some(b) = c.require_enrolled_machines {
            settings.require_enrolled_machines = b;
        }
        if let Some(m) = &c.machines {
            settings.machines = Some(dir.join(m.get_ref()));
        }
        if let Some(n) = &c.cluster {
            settings.cluster = Some(n.clone());
        }
        if let Some(b) = c.allow_root {
            settings.allow_root = b;
        }
        def.containers = Some(settings);
    }

    Ok(())
}

/// Merges the `[update]` table and the `mask` list of one layer into `def`.
fn merge_update(def: &mut Definition, layer: &Layer) -> Result<(), DefinitionError> {
    let (path, text, raw) = (&layer.path, &layer.text, &layer.raw);
    let bad = |span: std::ops::Range<usize>, field: &str, msg: String| {
        invalid(path, text, span, field, msg)
    };
    if let Some(m) = &raw.mask {
        for u in m {
            validate_unit_name(u.get_ref()).map_err(|e| bad(u.span(), "mask", e))?;
            if !def.mask.contains(u.get_ref()) {
                def.mask.push(u.get_ref().clone());
            }
        }
    }
    let Some(u) = &raw.update else {
        return Ok(());
    };
    let mut settings = def.update.clone().unwrap_or(UpdateSettings {
        repository: None,
        root: None,
        tries: 2,
        reboot: "off".into(),
        health_timeout_secs: 600,
        min_version: None,
    });
    if let Some(r) = &u.repository {
        let ok = ["http://", "https://", "file:///"]
            .iter()
            .any(|p| r.get_ref().starts_with(p));
        if !ok {
            return Err(bad(
                r.span(),
                "update.repository",
                format!(
                    "`{}` must be an http://, https:// or file:/// address",
                    r.get_ref()
                ),
            ));
        }
        settings.repository = Some(r.get_ref().clone());
    }
    if let Some(r) = &u.root {
        let dir = path.parent().unwrap_or(Path::new("."));
        settings.root = Some(dir.join(r.get_ref()));
    }
    if let Some(t) = &u.tries {
        if !(1..=9).contains(t.get_ref()) {
            return Err(bad(t.span(), "update.tries", "between 1 and 9".into()));
        }
        settings.tries = *t.get_ref();
    }
    if let Some(r) = &u.reboot {
        if !matches!(r.get_ref().as_str(), "off" | "immediate") {
            return Err(bad(
                r.span(),
                "update.reboot",
                format!("`{}`: one of off, immediate", r.get_ref()),
            ));
        }
        settings.reboot = r.get_ref().clone();
    }
    if let Some(h) = u.health_timeout_secs {
        settings.health_timeout_secs = h;
    }
    if let Some(v) = &u.min_version {
        validate_version(v.get_ref()).map_err(|m| bad(v.span(), "update.min-version", m))?;
        settings.min_version = Some(v.get_ref().clone());
    }
    def.update = Some(settings);
    Ok(())
}

/// The checks on the merged definition: what every image needs, and no contradictions.
fn check_merged(def: &Definition, seen: &Seen, leaf: &Path) -> Result<(), DefinitionError> {
    let first = || Origin {
        file: leaf.to_path_buf(),
        line: 1,
        column: 1,
    };
    if !seen.name {
        return Err(DefinitionError::Invalid {
            origin: first(),
            field: "name".into(),
            message: "missing: every image needs a name (e.g. name = \"cluster-node\")".into(),
        });
    }
    if !seen.version {
        return Err(DefinitionError::Invalid {
            origin: first(),
            field: "version".into(),
            message: "missing: every image needs a version (e.g. version = \"0.1.0\")".into(),
        });
    }
    if !def.packages.iter().any(|p| p.starts_with("linux-image-")) {
        return Err(DefinitionError::Invalid {
            origin: first(),
            field: "packages".into(),
            message: "no kernel: add a linux-image package (e.g. \"linux-image-amd64\")".into(),
        });
    }
    if !def.packages.iter().any(|p| p == "systemd") {
        return Err(DefinitionError::Invalid {
            origin: first(),
            field: "packages".into(),
            message: "keel images boot with systemd: add \"systemd\" to packages".into(),
        });
    }
    if let Some(both) = def.enable.iter().find(|u| def.disable.contains(u)) {
        return Err(DefinitionError::Invalid {
            origin: first(),
            field: "enable".into(),
            message: format!("`{both}` is listed in both enable and disable"),
        });
    }
    if let Some(both) = def.enable.iter().find(|u| def.mask.contains(u)) {
        return Err(DefinitionError::Invalid {
            origin: first(),
            field: "mask".into(),
            message: format!("`{both}` is listed in both enable and mask"),
        });
    }
    // The usr slots are labelled NAME_VERSION, and a GPT label holds 36 characters: longer ones
    // would be cut, and an updater reading a slot's version from its label would misread it.
    let label = def.name.len() + 1 + def.version.len();
    if label > 36 {
        return Err(DefinitionError::Invalid {
            origin: first(),
            field: "version".into(),
            message: format!(
                "`{}_{}` ({label} characters) is longer than a partition label (36): shorten the name or the version",
                def.name, def.version
            ),
        });
    }
    if def.update.is_some() && def.trust.is_none() {
        return Err(DefinitionError::Invalid {
            origin: first(),
            field: "update".into(),
            message: "[update] needs [trust]: nodes install only signed UKIs, and the repository's root comes from the key directory".into(),
        });
    }
    Ok(())
}

fn validate_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 48
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{n}` must be 1-48 characters of a-z, 0-9 and '-' (it names files and partitions)"
        ))
    }
}

fn validate_version(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 32
        && v.chars().next().is_some_and(|c| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '~' | '^'));
    if ok {
        Ok(())
    } else {
        Err(format!("`{v}` must start with a digit and use only letters, digits, '.', '~' and '^' (no '-' or '+': they mark boot counters in UKI names)"))
    }
}

fn validate_package(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | ':' | '=')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{p}` is not a Debian package name"))
    }
}

fn validate_unit_name(u: &str) -> Result<(), String> {
    const SUFFIXES: &[&str] = &[
        ".service", ".socket", ".timer", ".target", ".path", ".mount",
    ];
    if SUFFIXES.iter().any(|s| u.ends_with(s)) && !u.contains('/') {
        Ok(())
    } else {
        Err(format!(
            "`{u}` is not a systemd unit name (expected e.g. \"etcd.service\")"
        ))
    }
}

fn validate_dest(d: &str) -> Result<(), String> {
    if !d.starts_with('/') || d.ends_with('/') || d.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!(
            "`{d}` must be an absolute file path without `.` or `..`"
        ));
    }
    if d.starts_with("/usr/") || d.starts_with("/etc/") {
        Ok(())
    } else {
        Err(format!("`{d}` is outside /usr and /etc: only those are part of the image (/var and the rest are created on the node)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of a missing definition names the file and says "No such file" once, also
    /// when shown with its causes (as keel prints errors).
    #[test]
    fn a_missing_definition_says_so_once() {
        let e = Definition::load(Path::new("images/does-not-exist.toml")).expect_err("missing");
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert!(shown.contains("images/does-not-exist.toml"), "{shown}");
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
    }
    use std::fs;

    /// A throwaway project with `images/`, `units/` and `configs/`.
    fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["images", "units", "configs"] {
            fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        for (p, content) in files {
            let full = dir.path().join(p);
            fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            fs::write(full, content).expect("write");
        }
        dir
    }

    const BASE: &str = r#"
name = "base"
version = "1.0"
packages = ["systemd", "linux-image-amd64"]
units = ["a.service"]
enable = ["a.service"]
kernel-cmdline = ["console=ttyS0"]
usr-size = "512M"

[[files]]
source = "configs/x.conf"
dest = "/etc/x.conf"
"#;

    #[test]
    fn update_settings_and_slot_label_length() {
        let with = |extra: &str| {
            let text = format!(
                "{}{extra}",
                BASE.replace(
                    "version = \"1.0\"",
                    "version = \"1.0.1234567890123456789012345678\""
                )
            );
            project(&[
                ("images/base.toml", &text),
                ("units/a.service", "[Unit]\n"),
                ("configs/x.conf", "x"),
            ])
        };
        let p = with("");
        let e = Definition::load(&p.path().join("images/base.toml")).expect_err("label too long");
        assert!(
            e.to_string().contains("longer than a partition label (36)"),
            "{e}"
        );
        let ok = |extra: &str| {
            let p = project(&[
                ("images/base.toml", &format!("{BASE}{extra}")),
                ("units/a.service", "[Unit]\n"),
                ("configs/x.conf", "x"),
            ]);
            Definition::load(&p.path().join("images/base.toml"))
        };
        let e = ok("\n[update]\ntries = 1\n").expect_err("[update] without [trust]");
        assert!(e.to_string().contains("[update] needs [trust]"), "{e}");
        let e = ok("\n[trust]\nkeys = \"k\"\n[update]\nreboot = \"later\"\n").expect_err("reboot");
        assert!(e.to_string().contains("one of off, immediate"), "{e}");
        let e = ok("\n[trust]\nkeys = \"k\"\n[update]\nrepository = \"ftp://x/\"\n")
            .expect_err("scheme");
        assert!(e.to_string().contains("update.repository"), "{e}");
        let p = project(&[
            (
                "images/base.toml",
                &format!("mask = [\"a.service\"]\n{BASE}"),
            ),
            ("units/a.service", "[Unit]\n"),
            ("configs/x.conf", "x"),
        ]);
        let d =
            Definition::load(&p.path().join("images/base.toml")).expect_err("enabled and masked");
        assert!(d.to_string().contains("both enable and mask"), "{d}");
    }

    #[test]
    fn good_definition_loads_with_defaults() {
        let p = project(&[
            ("images/base.toml", BASE),
            ("units/a.service", "[Unit]\n"),
            ("configs/x.conf", "x"),
        ]);
        let d = Definition::load(&p.path().join("images/base.toml")).expect("loads");
        assert_eq!(d.name, "base");
        assert_eq!(d.suite, "trixie");
        assert_eq!(d.mirror, DEFAULT_MIRROR);
        assert_eq!(d.usr_size, ByteSize(512 << 20));
        assert_eq!(d.formats, vec![OutputFormat::Raw, OutputFormat::Qcow2]);
        assert_eq!(d.files.len(), 1);
        assert_eq!(d.files[0].mode, 0o644);
        assert!(d.files[0].source.ends_with("configs/x.conf"));
        assert!(d.initrd_modules.iter().any(|m| m == "dm_verity"));
        assert_eq!(d.trust, None, "no [trust]: an unsigned image");
    }

    #[test]
    fn trust_keys_resolve_relative_to_the_file_and_layers_merge() {
        let p = project(&[
            ("images/base.toml", BASE),
            ("units/a.service", "[Unit]\n"),
            ("configs/x.conf", "x"),
            (
                "images/signed.toml",
                "extends = \"base.toml\"\n[trust]\nkeys = \"../keys\"\n",
            ),
            (
                "images/open.toml",
                "extends = \"signed.toml\"\n[trust]\nwithout-tpm = \"unencrypted\"\n",
            ),
        ]);
        let d = Definition::load(&p.path().join("images/signed.toml")).expect("loads");
        let t = d.trust.expect("trust");
        assert!(t.keys.ends_with("images/../keys"), "{}", t.keys.display());
        assert_eq!(t.without_tpm, WithoutTpm::Refuse, "refusing is the default");
        assert!(!t.generate_keys);
        let d = Definition::load(&p.path().join("images/open.toml")).expect("loads");
        let t = d.trust.expect("trust");
        assert!(t.keys.ends_with("images/../keys"), "keys inherited");
        assert_eq!(t.without_tpm, WithoutTpm::Unencrypted);
    }

    #[test]
    fn extends_appends_lists_and_overrides_scalars() {
        let variant = r#"
extends = "base.toml"
name = "variant"
packages = ["systemd", "qemu-guest-agent"]
enable = ["qemu-guest-agent.service"]
kernel-cmdline = ["loglevel=4"]

[[files]]
source = "configs/y.conf"
dest = "/etc/x.conf"
mode = 0o600
"#;
        let p = project(&[
            ("images/base.toml", BASE),
            ("images/variant.toml", variant),
            ("units/a.service", ""),
            ("configs/x.conf", "x"),
            ("configs/y.conf", "y"),
        ]);
        let d = Definition::load(&p.path().join("images/variant.toml")).expect("loads");
        assert_eq!(d.name, "variant");
        assert_eq!(d.version, "1.0", "version inherited");
        assert_eq!(
            d.packages,
            vec!["systemd", "linux-image-amd64", "qemu-guest-agent"]
        );
        assert_eq!(d.enable, vec!["a.service", "qemu-guest-agent.service"]);
        assert_eq!(d.kernel_cmdline, vec!["console=ttyS0", "loglevel=4"]);
        assert_eq!(d.usr_size, ByteSize(512 << 20), "scalar inherited");
        assert_eq!(d.files.len(), 1, "same dest replaced");
        assert_eq!(d.files[0].mode, 0o600);
        assert!(d.files[0].source.ends_with("configs/y.conf"));
        assert_eq!(d.sources.len(), 2);
    }

    /// Each bad file must fail with an error naming the file, the position and the field.
    #[test]
    fn bad_definitions_name_file_line_and_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("unknown field", "name = \"x\"\nversion = \"1\"\npakages = []\n", ":3:1: unknown field `pakages`"),
            ("wrong type", "name = \"x\"\nversion = 1\n", ":2:11: invalid type: integer `1`, expected a string"),
            ("bad size", "name = \"x\"\nversion = \"1\"\nusr-size = \"1Q\"\n", ":3:12: unknown size suffix"),
            ("bad name", "name = \"Bad Name\"\nversion = \"1\"\n", ":1:8: field `name`"),
            ("version with dash", "name = \"x\"\nversion = \"1-2\"\n", ":2:11: field `version`"),
            ("missing unit", "name = \"x\"\nversion = \"1\"\nunits = [\"nope.service\"]\n", ":3:10: field `units`: unit `nope.service` not found"),
            ("dest in var", "name = \"x\"\nversion = \"1\"\n[[files]]\nsource = \"configs/x.conf\"\ndest = \"/var/x\"\n", ":5:8: field `files.dest`"),
            ("source outside", "name = \"x\"\nversion = \"1\"\n[[files]]\nsource = \"/etc/passwd\"\ndest = \"/etc/x\"\n", ":4:10: field `files.source`"),
            ("usrhash in cmdline", "name = \"x\"\nversion = \"1\"\nkernel-cmdline = [\"usrhash=00\"]\n", ":3:19: field `kernel-cmdline`"),
            ("no kernel", "name = \"x\"\nversion = \"1\"\npackages = [\"systemd\"]\n", ":1:1: field `packages`: no kernel"),
            ("missing version", "name = \"x\"\n", ":1:1: field `version`: missing"),
            ("bad format", "name = \"x\"\nversion = \"1\"\nformats = [\"vhd\"]\n", ":3:12: unknown variant `vhd`"),
            ("bad mirror", "name = \"x\"\nversion = \"1\"\n[base]\nmirror = \"ftp.debian.org\"\n", ":4:10: field `base.mirror`"),
            ("extends missing", "extends = \"gone.toml\"\nname = \"x\"\n", ":1:11: field `extends`: no such definition"),
            ("trust without keys", "name = \"x\"\nversion = \"1\"\n[trust]\ngenerate-keys = true\n", "field `trust.keys`: missing"),
            ("bad without-tpm", "name = \"x\"\nversion = \"1\"\n[trust]\nkeys = \"k\"\nwithout-tpm = \"maybe\"\n", ":5:15: unknown variant `maybe`"),
            ("trust typo", "name = \"x\"\nversion = \"1\"\n[trust]\nkey = \"k\"\n", ":4:1: unknown field `key`"),
        ];
        for (name, text, want) in cases {
            let p = project(&[("images/t.toml", text), ("configs/x.conf", "x")]);
            let err = Definition::load(&p.path().join("images/t.toml"))
                .expect_err(name)
                .to_string();
            assert!(err.contains("t.toml"), "case {name}: no file in `{err}`");
            assert!(err.contains(want), "case {name}: `{err}` lacks `{want}`");
        }
    }

    /// A variant in another project extends a shipped definition: each layer's units and
    /// configs come from its own project.
    #[test]
    fn extends_across_projects_resolves_files_per_layer() {
        let base = project(&[
            ("images/base.toml", BASE),
            ("units/a.service", ""),
            ("configs/x.conf", "x"),
        ]);
        let variant = format!(
            "extends = \"{}\"\nname = \"v\"\nunits = [\"b.service\"]\n",
            base.path().join("images/base.toml").display()
        );
        let other = project(&[("images/v.toml", &variant), ("units/b.service", "")]);
        let d = Definition::load(&other.path().join("images/v.toml")).expect("loads");
        assert!(d.units[0]
            .source
            .starts_with(base.path().canonicalize().expect("canon")));
        assert!(d.units[1]
            .source
            .starts_with(other.path().canonicalize().expect("canon")));
        assert!(d.files[0]
            .source
            .starts_with(base.path().canonicalize().expect("canon")));
    }

    #[test]
    fn extends_cycle_is_reported() {
        let p = project(&[
            ("images/a.toml", "extends = \"b.toml\"\n"),
            ("images/b.toml", "extends = \"a.toml\"\n"),
        ]);
        let err = Definition::load(&p.path().join("images/a.toml")).expect_err("cycle");
        assert!(matches!(err, DefinitionError::ExtendsCycle { .. }), "{err}");
    }

    #[test]
    fn shipped_definitions_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for entry in fs::read_dir(root.join("images")).expect("images dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Definition::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
