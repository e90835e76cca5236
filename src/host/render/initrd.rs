//! The initrd: a small Debian tree with systemd (as mkosi-initrd builds), the kernel modules that
//! find and open the disk, and keel's first-boot units. systemd in the initrd opens /usr through
//! dm-verity (`usrhash=`), creates the root partition with systemd-repart on first boot, fills /etc
//! from the factory defaults, and switches root.

use super::initrd_prune;
use crate::host::cache::{self, Cache};
use crate::host::compose::overlay::replace_file;
use crate::host::tools::{require_host_tool, run, HostTool, ToolsTree};
use crate::image::WithoutTpm;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages of the initrd tree.
pub const INITRD_PACKAGES: &[&str] = &[
    "systemd",
    "udev",
    "kmod",
    "systemd-repart",
    "systemd-cryptsetup",
    "e2fsprogs",
    "util-linux",
    "mount",
    // The sealed root: cryptsetup for the first-boot format, the TPM2 stack systemd loads.
    "cryptsetup-bin",
    "libtss2-esys-3.0.2-0t64",
    "libtss2-mu-4.0.1-0t64",
    "libtss2-rc0t64",
    "libtss2-tcti-device0t64",
    // keel-agent (first-boot provisioning) links these too.
    "libtss2-tctildr0t64",
    "libtss2-sys1t64",
    // The first boot encrypts the root's recovery key to the operator's recovery key.
    "openssl",
];
/// Bump when the initrd's keel content or trimming changes.
const INITRD_FORMAT: &str = "initrd-10";
/// Bump when the pruning of the assembled tree (`initrd_prune`) changes how it decides.
const PRUNE_FORMAT: &str = "prune-1";

/// Copies the factory /etc onto the new root partition, once, atomically (staging + rename).
const ETC_SETUP: &str = include_str!("../../../units/initrd/keel-etc-setup.sh");

const ETC_SETUP_UNIT: &str = include_str!("../../../units/initrd/keel-etc-setup.service");

/// First-boot provisioning: `keel-agent provision` applies the node's Ignition config to the new
/// root (once; later boots only measure the applied config's hash into PCR 12). Any error stops
/// the boot in emergency mode with the reason on the console.
const PROVISION_UNIT: &str = include_str!("../../../units/initrd/keel-provision.service");

/// First boot of a sealed image: turns the empty root partition systemd-repart created into a
/// LUKS2 volume whose key the TPM releases only under a PCR 11 policy signed by the operator's
/// initrd key, adds a recovery key, and makes the file system. The TPM enrolment runs while the
/// volume is opened (as `root`, measured into PCR 15 as on every later boot) and formatted, and
/// the volume stays open for the boot. It is labelled `keel-root-new` until every step is done,
/// so an interrupted first boot starts over instead of leaving a volume nobody can open.
/// `@WITHOUT_TPM@` is the image's `trust.without-tpm`.
const ROOT_INIT: &str = include_str!("../../../units/initrd/keel-root-init.sh");

const ROOT_INIT_UNIT: &str = include_str!("../../../units/initrd/keel-root-init.service");

/// Encrypts the recovery key to the operator's recovery key (RSA-OAEP, SHA-256), for
/// keel-root-init; `src/trust/escrow.rs` reads what it prints.
const ESCROW: &str = include_str!("../../../units/initrd/keel-escrow.sh");
/// On a trial boot (the boot loader counted it), reboots instead of a shell or a prompt.
const TRIAL_GUARD: &str = include_str!("../../../units/initrd/keel-trial-guard.sh");
const TRIAL_GUARD_DROPIN: &str =
    include_str!("../../../units/emergency.service.d/10-keel-trial.conf");

/// keel-root-init opens `/dev/mapper/root` (the UKI's `root=`) itself, however long that takes;
/// the device's job must not time out meanwhile.
const ROOT_DEVICE_DROPIN: &str =
    include_str!("../../../units/initrd/dev-mapper-root.device.d/10-keel.conf");

/// The kernel's module index files, as text.
pub struct ModuleIndex<'a> {
    pub dep: &'a str,
    pub builtin: &'a str,
    pub softdep: &'a str,
    pub alias: &'a str,
}

/// Module files (paths relative to the modules directory) needed for `wanted`: each module, its
/// dependencies, and its soft dependencies (e.g. libcrc32c needs a crc32c implementation, found
/// through modules.alias). Returns the files and the requested names that exist neither as a
/// module nor built in.
pub fn resolve_modules(index: &ModuleIndex, wanted: &[String]) -> (Vec<String>, Vec<String>) {
    let norm = |s: &str| s.replace('-', "_");
    let name_of = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        norm(file.split(".ko").next().unwrap_or(file))
    };
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in index.dep.lines() {
        if let Some((module, rest)) = line.split_once(':') {
            let list = rest.split_whitespace().map(|s| s.to_string()).collect();
            deps.insert(name_of(module), (module.to_string(), list));
        }
    }
    let builtins: BTreeSet<String> = index.builtin.lines().map(|l| name_of(l.trim())).collect();
    let mut soft: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in index.softdep.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(module) = words.next() else { continue };
        let names = words
            .filter(|w| !w.ends_with(':'))
            .map(|w| w.to_string())
            .collect();
        soft.insert(norm(module), names);
    }
    let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in index.alias.lines() {
        let mut words = line.split_whitespace();
        if let (Some("alias"), Some(a), Some(m)) = (words.next(), words.next(), words.next()) {
            if !a.contains(['*', '?', '[']) {
                aliases.entry(a.to_string()).or_default().push(norm(m));
            }
        }
    }
    let mut files = BTreeSet::new();
    let mut missing = Vec::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<(String, bool)> = wanted.iter().map(|w| (w.clone(), true)).collect();
    while let Some((raw, top)) = queue.pop() {
        let name = norm(&raw);
        if !done.insert(name.clone()) {
            continue;
        }
        let modules: Vec<String> = if deps.contains_key(&name) || builtins.contains(&name) {
            vec![name.clone()]
        } else {
            aliases
                .get(&raw)
                .or_else(|| aliases.get(&name))
                .cloned()
                .unwrap_or_default()
        };
        if modules.is_empty() {
            if top {
                missing.push(name);
            }
            continue;
        }
        for m in modules {
            if let Some((path, list)) = deps.get(&m) {
                files.insert(path.clone());
                for d in list {
                    files.insert(d.clone());
                    queue.push((name_of(d), false));
                }
            }
            for s in soft.get(&m).into_iter().flatten() {
                queue.push((s.clone(), false));
            }
            done.insert(m);
        }
    }
    missing.sort();
    (files.into_iter().collect(), missing)
}

/// Modules systemd-modules-load loads at once in the initrd, when the initrd has them, in this
/// order: the accelerated sha256 must be registered before dm-verity sets up /usr, or the
/// device hashes with sha256-generic for the rest of the boot.
const EARLY_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "sha256_ssse3",
    "dm_verity",
    "erofs",
    // QEMU's fw_cfg, where first-boot provisioning looks for the Ignition config.
    "qemu_fw_cfg",
];

/// The [`EARLY_MODULES`] present among the initrd's module files (a name that is missing would
/// make systemd-modules-load fail).
pub fn early_modules(files: &[String]) -> Vec<String> {
    EARLY_MODULES
        .iter()
        .filter(|m| {
            files.iter().any(|f| {
                let base = f.rsplit('/').next().unwrap_or(f);
                base.split(".ko").next().unwrap_or(base).replace('-', "_") == **m
            })
        })
        .map(|m| m.to_string())
        .collect()
}

/// Units masked in the initrd. The first three stand between systemd's start and udev's (each
/// waits for the one before): static device nodes for modules not loaded yet, and permissions of
/// nodes in /dev. The initrd loads the modules it needs explicitly and runs everything as root;
/// the real root runs all three. The rest mount API file systems nothing in the initrd uses
/// (huge pages, POSIX queues, debugfs, tracefs, FUSE, configfs); they only compete for the CPU
/// with the steps that find and open the disk.
pub const INITRD_MASKED: &[&str] = &[
    "kmod-static-nodes.service",
    "systemd-tmpfiles-setup-dev-early.service",
    "systemd-tmpfiles-setup-dev.service",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount",
    "modprobe@configfs.service",
    "modprobe@fuse.service",
];

/// Directories and files removed from the initrd tree: documentation, locales, perl, package
/// state — nothing the boot needs.
const TRIM: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/zoneinfo",
    "usr/share/perl5",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/bin/perl",
    "var/lib/dpkg",
    "var/lib/apt",
    "var/cache",
    "var/log",
    "etc/systemd/system",
    "etc/hostname",
    "etc/resolv.conf",
    // Generators for things an initrd never does (gettys, SysV scripts, rc.local, ssh sockets,
    // offline updates, resume from swap, dm-integrity): each is a process started on every boot.
    "usr/lib/systemd/system-generators/systemd-getty-generator",
    "usr/lib/systemd/system-generators/systemd-sysv-generator",
    "usr/lib/systemd/system-generators/systemd-rc-local-generator",
    "usr/lib/systemd/system-generators/systemd-ssh-generator",
    "usr/lib/systemd/system-generators/systemd-system-update-generator",
    "usr/lib/systemd/system-generators/systemd-hibernate-resume-generator",
    "usr/lib/systemd/system-generators/systemd-integritysetup-generator",
    // The hardware database (22 MB: half the uncompressed initrd) only names vendors and models
    // and classifies input devices; nothing the initrd does depends on it (dracut leaves it out
    // too). Every byte of the initrd is read by the firmware, hashed into PCR 11 in every bank,
    // decompressed and unpacked on each boot.
    "usr/lib/udev/hwdb.bin",
    "usr/lib/udev/hwdb.d",
    "etc/udev/hwdb.d",
    // perl-base's interpreter under its versioned name (the `perl` link is gone above).
    "usr/bin/perl5.40.1",
];

/// The udev rules the initrd keeps: device permissions and names, block devices and their
/// persistent names (the verity and root partitions are found by partition UUID), device-mapper,
/// the TPM, module loading for storage controllers, firmware, and systemd's device units. The
/// rest (input, sound, video, seats, network naming, ...) classify devices for a running
/// system; in the initrd they only make each coldplug event slower, and the real root's udev
/// runs them all again after switch-root.
pub const INITRD_UDEV_RULES: &[&str] = &[
    "50-firmware.rules",
    "50-udev-default.rules",
    "55-dm.rules",
    "60-block.rules",
    "60-dmi-id.rules",
    "60-persistent-storage-dm.rules",
    "60-persistent-storage.rules",
    "60-tpm-udev.rules",
    "80-drivers.rules",
    "95-dm-notify.rules",
    "99-systemd.rules",
];

/// Removes every udev rules file of `dir` that is not in `keep`; returns the names removed.
pub fn keep_udev_rules(dir: &Path, keep: &[&str]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for e in cache::dir_entries(dir)? {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".rules") && !keep.contains(&name.as_str()) {
            cache::remove_path(&e.path())?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// The cached initrd base tree (packages only), bootstrapped when missing.
fn ensure_base(cache: &Cache, suite: &str, mirror: &str, epoch: u64) -> Result<(PathBuf, String)> {
    let key = cache::key(
        [
            INITRD_FORMAT.to_string(),
            suite.into(),
            mirror.into(),
            epoch.to_string(),
        ]
        .into_iter()
        .chain(INITRD_PACKAGES.iter().map(|s| s.to_string())),
    );
    let entry = cache.entry("initrd-base", &key);
    if !entry.join("usr/lib/systemd/systemd").exists() {
        let staging = cache.staging("initrd-base", &key)?;
        cache::remove_path(&staging)?;
        let mmdebstrap = require_host_tool(HostTool::Mmdebstrap)?;
        run(Command::new(mmdebstrap)
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .arg("--variant=essential")
            .arg("--mode=root")
            .arg(format!("--include={}", INITRD_PACKAGES.join(",")))
            .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
            .arg("--dpkgopt=path-exclude=/usr/share/man/*")
            .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
            .arg("--skip=output/dev")
            .arg(suite)
            .arg(&staging)
            .arg(mirror))
        .context("bootstrapping the initrd tree")?;
        for t in TRIM {
            cache::remove_path(&staging.join(t))?;
        }
        let rules = staging.join("usr/lib/udev/rules.d");
        keep_udev_rules(&rules, INITRD_UDEV_RULES)?;
        for want in INITRD_UDEV_RULES {
            if !rules.join(want).exists() {
                anyhow::bail!(
                    "the initrd's udev has no {want} (package layout changed? INITRD_UDEV_RULES in src/render/initrd.rs lists the rules the initrd needs)"
                );
            }
        }
        cache::publish(&staging, &entry)?;
    }
    Ok((entry, key))
}

/// Inputs that shape an image's initrd.
pub struct InitrdInput<'a> {
    pub suite: &'a str,
    pub mirror: &'a str,
    pub epoch: u64,
    /// The image's /usr tree (for kernel modules and os-release).
    pub usr: &'a Path,
    pub kernel_version: &'a str,
    pub modules: &'a [String],
    /// A sealed root (trusted images): what to do without a TPM.
    pub sealed: Option<WithoutTpm>,
    /// keel-agent, for first-boot provisioning (images that ship it).
    pub agent: Option<&'a Path>,
}

/// Builds (or takes from the cache) the compressed initrd for an image; returns its path.
/// What goes into an initrd besides the base tree, read from the image's /usr.
struct Sources {
    moddir: PathBuf,
    /// Module files (paths under the module directory) the initrd carries.
    modules: Vec<String>,
    os_release: String,
    agent: Option<Vec<u8>>,
    /// The cache key of the finished initrd.
    key: String,
}

fn sources(input: &InitrdInput, base_key: String) -> Result<Sources> {
    let moddir = input.usr.join("lib/modules").join(input.kernel_version);
    let dep = fs::read_to_string(moddir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", moddir.display()))?;
    let read = |f: &str| fs::read_to_string(moddir.join(f)).unwrap_or_default();
    let (builtin, softdep, alias) = (
        read("modules.builtin"),
        read("modules.softdep"),
        read("modules.alias"),
    );
    let index = ModuleIndex {
        dep: &dep,
        builtin: &builtin,
        softdep: &softdep,
        alias: &alias,
    };
    let (files, missing) = resolve_modules(&index, input.modules);
    if !missing.is_empty() {
        tracing::warn!(
            kernel = input.kernel_version,
            ?missing,
            "initrd modules not found in the kernel; skipped"
        );
    }
    let osr = fs::read_to_string(input.usr.join("lib/os-release"))
        .context("reading the image's os-release")?;
    // The modules are identified by the kernel they were built with (its digest) and their paths.
    let vmlinuz = fs::read(moddir.join("vmlinuz"))
        .with_context(|| format!("reading {}/vmlinuz", moddir.display()))?;
    let kernel_digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&vmlinuz));
    let agent = input
        .agent
        .map(|p| {
            fs::read(p).with_context(|| {
                format!(
                    "reading {} (cargo build --release --bin keel-agent)",
                    p.display()
                )
            })
        })
        .transpose()?;
    let agent_digest = agent
        .as_ref()
        .map(|a| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(a)))
        .unwrap_or_default();
    let key = cache::key([
        base_key,
        input.kernel_version.to_string(),
        kernel_digest,
        files.join(","),
        osr.clone(),
        ETC_SETUP.into(),
        ETC_SETUP_UNIT.into(),
        INITRD_MASKED.join(","),
        early_modules(&files).join(","),
        input.epoch.to_string(),
        input
            .sealed
            .map(|w| {
                format!(
                    "{ROOT_INIT}{ROOT_INIT_UNIT}{ROOT_DEVICE_DROPIN}{ESCROW}{}",
                    w.as_str()
                )
            })
            .unwrap_or_default(),
        agent_digest,
        PROVISION_UNIT.into(),
        PRUNE_FORMAT.into(),
        initrd_prune::INITRD_PROGRAMS.join(","),
        initrd_prune::INITRD_SYSTEMD_UNUSED.join(","),
        initrd_prune::INITRD_DATA_UNUSED.join(","),
    ]);
    Ok(Sources {
        moddir,
        modules: files,
        os_release: osr,
        agent,
        key,
    })
}

/// The kernel modules the initrd carries, their index files, and the list loaded before udev.
fn install_modules(tree: &Path, src: &Sources, kernel_version: &str) -> Result<()> {
    let target_moddir = tree.join("usr/lib/modules").join(kernel_version);
    cache::remove_path(&tree.join("usr/lib/modules"))?;
    fs::create_dir_all(&target_moddir)
        .with_context(|| format!("creating {}", target_moddir.display()))?;
    for f in &src.modules {
        let dst = target_moddir.join(f);
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        fs::copy(src.moddir.join(f), &dst).with_context(|| format!("copying module {f}"))?;
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if src.moddir.join(f).exists() {
            fs::copy(src.moddir.join(f), target_moddir.join(f))
                .with_context(|| format!("copying {f}"))?;
        }
    }
    // Load the disk and /usr modules as soon as systemd starts, instead of when udev's coldplug
    // reaches the devices (seconds later under emulation).
    let early = early_modules(&src.modules);
    if !early.is_empty() {
        replace_file(
            &tree.join("etc/modules-load.d/keel-early.conf"),
            format!(
                "# keel: disk and /usr modules, loaded before udev coldplug\n{}\n",
                early.join("\n")
            )
            .as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// Keel's part of the initrd: release file, /init, the /etc set-up unit, masks, and (when the
/// image has them) first-boot provisioning and the sealed root.
fn install_keel(tree: &Path, src: &Sources, sealed: Option<WithoutTpm>) -> Result<()> {
    fs::write(tree.join("etc/initrd-release"), &src.os_release)
        .context("writing initrd-release")?;
    fs::write(tree.join("etc/machine-id"), "").context("writing machine-id")?;
    cache::remove_path(&tree.join("init"))?;
    symlink("usr/lib/systemd/systemd", tree.join("init")).context("linking /init")?;
    let keel_lib = tree.join("usr/lib/keel");
    fs::create_dir_all(&keel_lib).context("creating usr/lib/keel")?;
    replace_file(&keel_lib.join("etc-setup"), ETC_SETUP.as_bytes(), 0o755)?;
    replace_file(&keel_lib.join("trial-guard"), TRIAL_GUARD.as_bytes(), 0o755)?;
    let masks = tree.join("etc/systemd/system");
    fs::create_dir_all(&masks).context("creating etc/systemd/system")?;
    for unit in INITRD_MASKED {
        symlink("/dev/null", masks.join(unit)).with_context(|| format!("masking {unit}"))?;
    }
    let units = tree.join("usr/lib/systemd/system");
    replace_file(
        &units.join("keel-etc-setup.service"),
        ETC_SETUP_UNIT.as_bytes(),
        0o644,
    )?;
    for unit in ["emergency.service", "rescue.service"] {
        replace_file(
            &units.join(format!("{unit}.d/10-keel-trial.conf")),
            TRIAL_GUARD_DROPIN.as_bytes(),
            0o644,
        )?;
    }
    let wants = units.join("initrd-root-fs.target.wants");
    fs::create_dir_all(&wants).context("creating initrd-root-fs.target.wants")?;
    symlink(
        "../keel-etc-setup.service",
        wants.join("keel-etc-setup.service"),
    )
    .context("enabling keel-etc-setup")?;
    if let Some(a) = &src.agent {
        replace_file(&tree.join("usr/bin/keel-agent"), a, 0o755)?;
        replace_file(
            &units.join("keel-provision.service"),
            PROVISION_UNIT.as_bytes(),
            0o644,
        )?;
        symlink(
            "../keel-provision.service",
            wants.join("keel-provision.service"),
        )
        .context("enabling keel-provision")?;
    }
    if let Some(without_tpm) = sealed {
        replace_file(
            &keel_lib.join("root-init"),
            ROOT_INIT
                .replace("@WITHOUT_TPM@", without_tpm.as_str())
                .as_bytes(),
            0o755,
        )?;
        replace_file(
            &units.join("keel-root-init.service"),
            ROOT_INIT_UNIT.as_bytes(),
            0o644,
        )?;
        replace_file(&keel_lib.join("escrow"), ESCROW.as_bytes(), 0o755)?;
        // sysroot.mount waits for /dev/mapper/root, which only keel-root-init creates.
        let device_wants = units.join("initrd-root-device.target.wants");
        fs::create_dir_all(&device_wants).context("creating initrd-root-device.target.wants")?;
        symlink(
            "../keel-root-init.service",
            device_wants.join("keel-root-init.service"),
        )
        .context("enabling keel-root-init")?;
        replace_file(
            &units.join("dev-mapper-root.device.d/10-keel.conf"),
            ROOT_DEVICE_DROPIN.as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// depmod, then the tree as a reproducible zstd cpio in `work`.
fn pack(tools: &ToolsTree, work: &Path, tree: &Path, input: &InitrdInput) -> Result<PathBuf> {
    let tools = tools
        .clone()
        .bind(work)
        .env("SOURCE_DATE_EPOCH", &input.epoch.to_string());
    run(tools
        .command("depmod")?
        .arg("-b")
        .arg(tree)
        .arg(input.kernel_version))
    .context("running depmod for the initrd")?;
    let out = work.join("initrd.cpio.zst");
    let script = format!(
        "set -e; cd '{tree}'; find . -exec touch -h -d @{epoch} {{}} +; \
         find . -mindepth 1 -printf '%P\\n' | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible -R 0:0 | zstd -q -T0 -12 -o '{out}'",
        tree = tree.display(),
        epoch = input.epoch,
        out = out.display()
    );
    run(tools.command("sh")?.arg("-c").arg(script)).context("packing the initrd")?;
    Ok(out)
}

pub fn build(
    cache: &Cache,
    tools: &ToolsTree,
    work: &Path,
    input: &InitrdInput,
) -> Result<PathBuf> {
    let (base, base_key) = ensure_base(cache, input.suite, input.mirror, input.epoch)?;
    let src = sources(input, base_key)?;
    let entry = cache.entry("initrd", &src.key).join("initrd.cpio.zst");
    if entry.exists() {
        return Ok(entry);
    }
    let tree = work.join("initrd-tree");
    cache::remove_path(&tree)?;
    run(Command::new("cp").arg("-a").arg(&base).arg(&tree))
        .context("copying the initrd base tree")?;
    install_modules(&tree, &src, input.kernel_version)?;
    install_keel(&tree, &src, input.sealed)?;

    let mut programs = initrd_prune::INITRD_PROGRAMS.to_vec();
    if src.agent.is_some() {
        programs.push("keel-agent");
    }
    let pruned = initrd_prune::prune(&tree, &programs).context("pruning the initrd tree")?;
    tracing::info!(
        files = pruned.files,
        mib = pruned.bytes / (1 << 20),
        libraries = ?pruned.libraries,
        "initrd: removed what it never runs"
    );

    let out = pack(tools, work, &tree, input)?;
    cache::remove_path(&tree)?;
    if let Some(p) = entry.parent() {
        fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let staging = entry.with_extension(format!("partial-{}", std::process::id()));
    fs::copy(&out, &staging).context("caching the initrd")?;
    cache::publish(&staging, &entry)?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n\
kernel/drivers/md/dm-verity.ko.xz: kernel/drivers/md/dm-bufio.ko.xz kernel/drivers/md/dm-mod.ko.xz\n\
kernel/drivers/md/dm-mod.ko.xz:\n\
kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n\
kernel/lib/libcrc32c.ko.xz:\n\
kernel/crypto/crc32c_generic.ko.xz:\n\
kernel/lib/crc16.ko.xz:\n";
    const BUILTIN: &str = "kernel/drivers/char/tpm/tpm_tis.ko\n";
    const SOFTDEP: &str = "# comment\nsoftdep libcrc32c pre: crc32c\n";
    const ALIAS: &str = "alias crc32c crc32c_generic\nalias pci:v*d* virtio_pci\n";

    fn index() -> ModuleIndex<'static> {
        ModuleIndex {
            dep: DEP,
            builtin: BUILTIN,
            softdep: SOFTDEP,
            alias: ALIAS,
        }
    }

    #[test]
    fn modules_resolve_with_dependencies() {
        let (files, missing) = resolve_modules(
            &index(),
            &[
                "ext4".into(),
                "dm_verity".into(),
                "tpm_tis".into(),
                "nope".into(),
            ],
        );
        assert_eq!(
            files,
            vec![
                "kernel/drivers/md/dm-bufio.ko.xz",
                "kernel/drivers/md/dm-mod.ko.xz",
                "kernel/drivers/md/dm-verity.ko.xz",
                "kernel/fs/ext4/ext4.ko.xz",
                "kernel/fs/jbd2/jbd2.ko.xz",
                "kernel/fs/mbcache.ko.xz",
                "kernel/lib/crc16.ko.xz",
            ]
        );
        assert_eq!(missing, vec!["nope"], "built-in tpm_tis is not missing");
    }

    /// erofs needs libcrc32c, which needs a crc32c implementation only named as a soft
    /// dependency; without it erofs does not load and /usr cannot be mounted.
    #[test]
    fn soft_dependencies_are_followed_through_aliases() {
        let (files, _) = resolve_modules(&index(), &["erofs".into()]);
        assert!(
            files.contains(&"kernel/crypto/crc32c_generic.ko.xz".to_string()),
            "{files:?}"
        );
        assert!(files.contains(&"kernel/lib/libcrc32c.ko.xz".to_string()));
    }

    /// The root is opened by keel-root-init only, never prompting on the everyday path, never
    /// with an empty passphrase on a machine with a TPM, and PCR 11 is marked before the root is
    /// read (review C1, C2).
    #[test]
    fn root_init_opens_headless_binds_pcr_12_and_marks_pcr_11() {
        assert!(
            ROOT_INIT.contains("@WITHOUT_TPM@"),
            "substituted at build time"
        );
        assert!(ROOT_INIT.contains("headless=1"));
        assert!(!ROOT_INIT.contains("try-empty-password"));
        assert!(ROOT_INIT.contains("--tpm2-pcrs=\"$PCRS\""));
        assert!(ROOT_INIT.contains("PCRS=\"12:sha256=$ZERO+13:sha256=$ZERO\""));
        assert!(ROOT_INIT.contains(&format!("measure {}", crate::trust::measure::ROOT_OPENED)));
        assert!(ROOT_INIT.contains(&format!("measure {}", crate::trust::measure::RECOVERY)));
        assert!(ROOT_INIT_UNIT.contains("Before=systemd-fsck-root.service sysroot.mount"));
    }

    /// Review M5: what the initrd's escrow script prints (run here with the host's openssl)
    /// opens with the operator's recovery key and holds no plain text of the key.
    #[test]
    fn the_escrow_script_output_opens_with_the_recovery_key() {
        let t = tempfile::tempdir().expect("tmp");
        let k = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(3072).expect("rsa"))
            .expect("pkey");
        let public = t.path().join("recovery.pub.pem");
        fs::write(&public, k.public_key_to_pem().expect("pem")).expect("pub");
        let script = t.path().join("escrow");
        fs::write(&script, ESCROW).expect("script");
        let secret = "ldcbbfjt-vdikbtif-rrfebhcr-nlhgduch-vvikkgrh-rjvhnclr-htkjirue-tkvbbkvu";
        let mut child = Command::new("sh")
            .arg(&script)
            .arg(&public)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), secret.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).expect("utf8");
        assert!(!text.contains(secret), "{text}");
        assert_eq!(
            crate::trust::escrow::open(&k, &text).expect("opens"),
            secret
        );
    }

    /// The initrd's scripts parse as POSIX shell (the host's `sh`, dash on Debian as in the
    /// initrd): a syntax error would only show on a booted node.
    #[test]
    fn initrd_scripts_parse_as_posix_shell() {
        for (name, script) in [
            ("etc-setup", ETC_SETUP.to_string()),
            ("root-init", ROOT_INIT.replace("@WITHOUT_TPM@", "refuse")),
            ("escrow", ESCROW.to_string()),
        ] {
            let out = std::process::Command::new("sh")
                .arg("-n")
                .arg("-c")
                .arg(&script)
                .output()
                .expect("run sh");
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Every `Documentation=file:` link of the units cluster-node ships (its own units and the
    /// initrd's provisioning unit) names a file the image ships.
    #[test]
    fn documentation_links_of_shipped_units_resolve_in_the_image() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let def = crate::image::Definition::load(&root.join("images/cluster-node.toml"))
            .expect("load images/cluster-node.toml");
        let shipped: BTreeSet<&str> = def.files.iter().map(|f| f.dest.as_str()).collect();
        let mut units: Vec<(String, String)> = def
            .units
            .iter()
            .map(|u| {
                (
                    u.name.clone(),
                    fs::read_to_string(&u.source).expect("read unit"),
                )
            })
            .collect();
        units.push((
            "keel-provision.service (initrd)".into(),
            PROVISION_UNIT.into(),
        ));
        let mut links = 0;
        for (name, text) in &units {
            for value in text
                .lines()
                .filter_map(|l| l.strip_prefix("Documentation="))
            {
                for path in value
                    .split_whitespace()
                    .filter_map(|u| u.strip_prefix("file:"))
                {
                    links += 1;
                    assert!(
                        shipped.contains(path),
                        "{name} points at {path}, which images/cluster-node.toml does not ship"
                    );
                }
            }
        }
        assert!(
            links >= 3,
            "expected keel's units to link their guides, found {links} links"
        );
    }

    #[test]
    fn early_modules_are_only_those_the_initrd_has() {
        let files = vec![
            "kernel/drivers/block/virtio_blk.ko.xz".to_string(),
            "kernel/drivers/md/dm-verity.ko.xz".to_string(),
        ];
        assert_eq!(early_modules(&files), vec!["virtio_blk", "dm_verity"]);
        assert!(early_modules(&[]).is_empty());
    }

    #[test]
    fn dash_and_underscore_names_are_the_same_module() {
        let (files, missing) = resolve_modules(&index(), &["dm-mod".into()]);
        assert_eq!(files, vec!["kernel/drivers/md/dm-mod.ko.xz"]);
        assert!(missing.is_empty());
    }

    #[test]
    fn only_the_listed_udev_rules_stay() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path();
        for f in [
            "60-block.rules",
            "70-mouse.rules",
            "78-sound-card.rules",
            "99-systemd.rules",
            "README",
        ] {
            fs::write(d.join(f), "").expect("write");
        }
        let removed = keep_udev_rules(d, &["60-block.rules", "99-systemd.rules"]).expect("keep");
        assert_eq!(removed, vec!["70-mouse.rules", "78-sound-card.rules"]);
        let mut left: Vec<String> = fs::read_dir(d)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["60-block.rules", "99-systemd.rules", "README"]);
        assert!(keep_udev_rules(&d.join("absent"), &[])
            .expect("missing dir is fine")
            .is_empty());
    }
}
