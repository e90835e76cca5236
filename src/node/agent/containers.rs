//! Running signed containers: the gate (enrolled TPM, trusted boot), verification, unpacking
//! into a staging directory, the OCI runtime config, and the transient unit that runs crun.
//!
//! Order of a `run`, each step only after the previous held: policy → hardware gate → image
//! signature, manifest, config and layer digests → unpack into `containers/.staging-*` →
//! runtime config → rename to `containers/NAME` → attach to the node's CNI network (see
//! [`super::network`]) → start `keel-ctr-NAME.service`. A refusal at any step removes what the
//! run created; nothing of a refused image is left where it could run, and a refused image never
//! gets a network namespace or an address.

use super::network::{self, Attachment};
use super::systemd::{unit_name, UnitSpec, Units};
use crate::container::oci::{self, VerifiedImage};
use crate::container::policy::{self, LoadedPolicy};
use crate::container::unpack::{self, LayerFile, Limits};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where containers live on a node (relative to its root).
pub const CONTAINERS_DIR: &str = "var/lib/keel/containers";
/// The spool directory the agent service watches (relative to the node's root).
pub const SPOOL_DIR: &str = "var/lib/keel/spool";
const CRUN: &str = "/usr/bin/crun";
const KEEL_AGENT: &str = "/usr/bin/keel-agent";

/// What the gate needs to know about the machine.
pub trait Machine {
    /// `sha256:<hex>` of the TPM's endorsement key.
    fn ek_sha256(&self) -> Result<String>;
    /// Whether this boot matches a PCR 11 policy the operator signed; reasons when not.
    fn boot_trusted(&self) -> Result<(bool, Vec<String>)>;
}

/// The real machine: the TPM and the boot state read from `root`.
pub struct ThisMachine {
    pub root: PathBuf,
}

impl Machine for ThisMachine {
    fn ek_sha256(&self) -> Result<String> {
        super::tpm::ek_sha256()
    }
    fn boot_trusted(&self) -> Result<(bool, Vec<String>)> {
        let s = super::boot_state::read(&self.root)?;
        Ok((s.trusted, s.problems))
    }
}

/// Why nothing was started: the policy said no (unsigned or tampered image, unenrolled machine,
/// untrusted boot, an image that breaks the unpacking rules). Running it again changes nothing.
/// Every other error of [`run`] is a failure (disk full, crun or systemd failed): worth a retry.
#[derive(Debug, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refusal(pub String);

impl Refusal {
    /// Whether `e` (an error of [`run`]) is a refusal rather than a failure.
    pub fn is_refusal(e: &anyhow::Error) -> bool {
        e.downcast_ref::<Refusal>().is_some()
    }
}

/// Whether an I/O error says something about this machine (full disk, quota, read-only or
/// broken storage, permissions, memory) rather than about the image's bytes (truncated or
/// malformed archive, missing blob).
pub fn is_environmental(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::StorageFull
            | K::QuotaExceeded
            | K::ReadOnlyFilesystem
            | K::PermissionDenied
            | K::OutOfMemory
            | K::ResourceBusy
            | K::Interrupted
            | K::TimedOut
            | K::WouldBlock
    ) {
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOSPC
                | libc::EDQUOT
                | libc::EROFS
                | libc::EIO
                | libc::EACCES
                | libc::EPERM
                | libc::ENOMEM
                | libc::EMFILE
                | libc::ENFILE
                | libc::EBUSY
        )
    )
}

/// An image error as a refusal, unless it is the machine's I/O failing (then a failure).
fn oci_refusal(e: oci::OciError) -> anyhow::Error {
    match &e {
        oci::OciError::Io { source, .. } if is_environmental(source) => anyhow::Error::new(e),
        _ => Refusal(crate::error::chain(&e)).into(),
    }
}

/// An unpacking error as a refusal, unless it is the machine's I/O failing (then a failure).
fn unpack_refusal(e: unpack::UnpackError) -> anyhow::Error {
    match &e {
        unpack::UnpackError::Io { source, .. } if is_environmental(source) => anyhow::Error::new(e),
        _ => Refusal(crate::error::chain(&e)).into(),
    }
}

/// Checks the machine against the policy: trusted boot (when required) and the enrolled TPMs.
pub fn gate(root: &Path, loaded: &LoadedPolicy, machine: &dyn Machine) -> Result<String, Refusal> {
    let mut said = Vec::new();
    if loaded.policy.require_trusted_boot {
        match machine.boot_trusted() {
            Ok((true, _)) => said.push("boot trusted".to_string()),
            Ok((false, problems)) => {
                return Err(Refusal(format!(
                    "this boot is not in a state the operator signed ({})",
                    problems.join("; ")
                )))
            }
            Err(e) => return Err(Refusal(format!("cannot establish the boot state: {e:#}"))),
        }
    }
    let effective = policy::effective_machines(root, loaded).map_err(|e| Refusal(e.to_string()))?;
    policy::check_list(
        root,
        loaded,
        effective.as_ref().map(|(m, p)| (m, p.as_path())),
    )
    .map_err(Refusal)?;
    match effective {
        Some((list, from)) => {
            let ek = machine
                .ek_sha256()
                .map_err(|e| Refusal(format!("the enrolled-machines list ({}) needs this machine's TPM, which cannot be read: {e:#}", from.display())))?;
            match list.contains(&ek) {
                Some(m) => said.push(format!("TPM enrolled as `{}`", m.name)),
                None => {
                    return Err(Refusal(format!(
                        "this machine's TPM (EK {ek}) is not in the enrolled machines list ({}, serial {}); enrol it with `keel machines add`",
                        from.display(),
                        list.serial
                    )))
                }
            }
        }
        None if loaded.policy.require_enrolled_machines => {
            return Err(Refusal(format!(
            "the image's policy requires an enrolled-machines list and there is none ({} or {})",
            loaded.dir.join(policy::IMAGE_MACHINES).display(),
            root.join(policy::NODE_MACHINES).display()
        )))
        }
        None => said.push("no enrolled-machines list".into()),
    }
    Ok(said.join(", "))
}

/// `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn check_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && (b == b'-' || b == b'_'))
        });
    if ok {
        Ok(())
    } else {
        Err(Refusal(format!(
            "container name `{name}`: lowercase letters, digits, `-` and `_`, at most 63, starting with a letter or digit"
        )))
    }
}

/// A name from the image file or directory (`hello.tar` → `hello`).
pub fn default_name(image: &Path) -> String {
    let stem = image
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = stem.strip_suffix(".tar").unwrap_or(&stem);
    stem.to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// How long each phase of a run took, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Timings {
    pub gate_ms: f64,
    pub verify_ms: f64,
    pub unpack_ms: f64,
    pub start_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub name: String,
    pub unit: String,
    pub manifest_digest: String,
    pub signed_by: String,
    pub gate: String,
    pub bytes: u64,
    /// The container's addresses on the node's CNI network (none without one).
    pub addresses: Vec<String>,
    pub timings: Timings,
}

/// Settings of a run.
pub struct RunOptions {
    pub limits: Limits,
    pub memory_max: u64,
    pub tasks_max: u64,
    /// The image the operator means to run, as its signature must name it; `None`: the
    /// container's name.
    pub reference: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            limits: Limits::default(),
            memory_max: 512 << 20,
            tasks_max: 512,
            reference: None,
        }
    }
}

/// Whether a signature's `docker-reference` names the image the operator runs: the repository
/// (tag and digest ignored) equals `expected` when that has a `/`, else its last path component
/// does. A validly signed image is not run under a name it was not signed for.
pub fn reference_matches(signed: &str, expected: &str) -> bool {
    let without_digest = signed.split('@').next().unwrap_or(signed);
    let repo = match without_digest.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => without_digest,
    };
    if expected.contains('/') {
        repo == expected
    } else {
        repo.rsplit('/').next() == Some(expected)
    }
}

/// Removes a directory tree when dropped, unless disarmed.
struct Cleanup(Option<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Undoes the network attachment recorded in a bundle (if any) and removes its record; returns
/// what was released.
pub fn detach_network(bundle: &Path, net: &dyn network::Host) -> Result<Option<Attachment>> {
    let att = network::read_record(bundle)?;
    if let Some(att) = &att {
        network::detach(att, net)?;
        let _ = fs::remove_file(bundle.join(network::RECORD));
    }
    Ok(att)
}

/// Verifies and starts the image at `image` (a layout directory or an oci-archive) as `name`;
/// attaches it to the node's CNI network when there is one.
pub fn run(
    root: &Path,
    image: &Path,
    name: &str,
    machine: &dyn Machine,
    units: &dyn Units,
    net: &dyn network::Host,
    opts: &RunOptions,
) -> Result<Started> {
    check_name(name)?;
    if let Some(marker) = network::network_pending(root) {
        bail!(
            "not started: this node joins a keel-net overlay ({}) but {} has no network config \
             yet (keel-net has no subnet lease; see `keel-net status`); try again once it has one",
            marker.display(),
            root.join(network::CNI_CONF_DIR).display()
        );
    }
    let mut timings = Timings::default();
    let t = Instant::now();
    let loaded = policy::load(root).map_err(|e| Refusal(crate::error::chain(&e)))?;
    let gate = gate(root, &loaded, machine)?;
    timings.gate_ms = ms(t);

    let dir = root.join(CONTAINERS_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pid = std::process::id();
    let t = Instant::now();
    // The image is read once, into a directory only root can write (an archive extracted, a
    // layout directory copied); the digests checked and the bytes unpacked are that copy's.
    let incoming = Cleanup(Some(dir.join(format!(".incoming-{name}-{pid}"))));
    let tmp = incoming.0.clone().context("incoming path")?;
    let _ = fs::remove_dir_all(&tmp);
    let layout = if image.is_file() {
        oci::extract_archive(image, &tmp, opts.limits.max_bytes).map_err(oci_refusal)?
    } else {
        oci::copy_layout(image, &tmp, opts.limits.max_bytes).map_err(oci_refusal)?
    };
    let verified: VerifiedImage = oci::verify(&layout, &loaded.keys).map_err(oci_refusal)?;
    let expected = opts.reference.as_deref().unwrap_or(name);
    if !reference_matches(&verified.reference, expected) {
        bail!(Refusal(format!(
            "the image is signed for `{}`, not for `{expected}`: run it under the name its signature names, or name the reference it must carry (`--reference`)",
            verified.reference
        )));
    }
    timings.verify_ms = ms(t);

    let unit = unit_name(name);
    if units
        .state(&unit)?
        .is_some_and(|s| s.active == "active" || s.active == "activating")
    {
        bail!(Refusal(format!(
            "a container named `{name}` is running; stop it first (`keel-agent stop {name}`)"
        )));
    }

    let t = Instant::now();
    let staging = Cleanup(Some(dir.join(format!(".staging-{name}-{pid}"))));
    let stage = staging.0.clone().context("staging path")?;
    let _ = fs::remove_dir_all(&stage);
    let rootfs = stage.join("rootfs");
    fs::create_dir_all(&rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    let files: Vec<LayerFile> = verified
        .layers
        .iter()
        .map(|(p, c, _)| LayerFile {
            path: p,
            compression: *c,
        })
        .collect();
    let stats = unpack::unpack(&rootfs, &files, opts.limits).map_err(unpack_refusal)?;
    // Checked before anything outside the staging directory changes.
    // The image's own configuration (entrypoint, user, group): its errors are refusals.
    let mut spec = runtime_spec(&verified, name, &rootfs, loaded.policy.allow_root)
        .map_err(|e| anyhow::Error::from(Refusal(format!("{e:#}"))))?;
    let bundle = dir.join(name);
    if bundle.exists() {
        // A stopped container of the same name: its network was released when its unit
        // stopped, unless that never ran.
        if let Err(e) = detach_network(&bundle, net) {
            tracing::warn!(
                container = name,
                "releasing the old container's network: {e:#}"
            );
        }
        fs::remove_dir_all(&bundle)
            .with_context(|| format!("removing the old {}", bundle.display()))?;
    }
    fs::rename(&stage, &bundle)
        .with_context(|| format!("moving the bundle to {}", bundle.display()))?;
    let mut staging = staging;
    staging.0 = None;
    timings.unpack_ms = ms(t);

    // Attaching the network is part of starting. From here on a failure removes the bundle and
    // releases the network (a failed attach has undone itself).
    let t = Instant::now();
    let attached: Option<Attachment> = match network::attach(root, name, net) {
        Ok(a) => a,
        Err(e) => {
            let _ = fs::remove_dir_all(&bundle);
            return Err(e);
        }
    };
    let abandon = |e: anyhow::Error| -> anyhow::Error {
        if let Some(att) = &attached {
            let _ = network::detach(att, net);
        }
        let _ = fs::remove_dir_all(&bundle);
        e
    };
    if let Err(e) = write_bundle_files(&bundle, &mut spec, attached.as_ref(), &verified, &gate) {
        return Err(abandon(e));
    }
    let started = units.start(&unit_spec(
        root,
        name,
        &bundle,
        &verified.manifest_digest,
        opts,
    ));
    if let Err(e) = started {
        return Err(abandon(e));
    }
    timings.start_ms = ms(t);
    Ok(Started {
        name: name.to_string(),
        unit,
        manifest_digest: verified.manifest_digest,
        signed_by: verified.signed_by,
        gate,
        bytes: stats.bytes,
        addresses: attached.map(|a| a.addresses).unwrap_or_default(),
        timings,
    })
}

/// config.json (joining the attached namespace, if any), network.json and image.json.
fn write_bundle_files(
    bundle: &Path,
    spec: &mut oci_spec::runtime::Spec,
    attached: Option<&Attachment>,
    verified: &VerifiedImage,
    gate: &str,
) -> Result<()> {
    if let Some(att) = attached {
        join_netns(spec, &att.netns)?;
        fs::write(
            bundle.join(network::RECORD),
            serde_json::to_vec_pretty(att)?,
        )
        .context("writing network.json")?;
    }
    fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(spec)?)
        .context("writing config.json")?;
    let record = serde_json::json!({
        "manifest-digest": verified.manifest_digest,
        "signed-by": verified.signed_by,
        "reference": verified.reference,
        "gate": gate,
        "network": attached.map(|a| serde_json::json!({"name": a.network, "addresses": a.addresses})),
    });
    fs::write(
        bundle.join("image.json"),
        serde_json::to_vec_pretty(&record)?,
    )
    .context("writing image.json")
}

/// Makes the runtime config join the network namespace at `netns` instead of making a new one.
fn join_netns(spec: &mut oci_spec::runtime::Spec, netns: &Path) -> Result<()> {
    use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut namespaces: Vec<_> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Network)
        .collect();
    namespaces.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(netns)
            .build()?,
    );
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    Ok(())
}

/// The largest /etc/passwd read from an image.
const MAX_PASSWD: u64 = 1 << 20;

/// The image's /etc/passwd, resolved inside its root file system (its links followed as if the
/// rootfs were `/`), opened without following a final link, and only when it is a regular file
/// of at most [`MAX_PASSWD`] bytes: an image's `etc/passwd -> /etc/shadow` must not make the
/// agent read the host's files, nor a link to a FIFO or /dev/zero hang or exhaust it. No file:
/// empty.
fn read_image_passwd(rootfs: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(path) = file_in_root(rootfs, Path::new("etc/passwd"))? else {
        return Ok(String::new());
    };
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e).context("the image's /etc/passwd is not a plain file (a link?)"),
    };
    let meta = f.metadata().context("reading the image's /etc/passwd")?;
    if !meta.is_file() {
        anyhow::bail!("the image's /etc/passwd is not a regular file");
    }
    let mut text = String::new();
    f.take(MAX_PASSWD + 1)
        .read_to_string(&mut text)
        .context("reading the image's /etc/passwd")?;
    if text.len() as u64 > MAX_PASSWD {
        anyhow::bail!("the image's /etc/passwd is larger than {MAX_PASSWD} bytes");
    }
    Ok(text)
}

/// Where `rel` lies inside `rootfs` with every link on the way (the last one too) followed as if
/// `rootfs` were `/`; `None` when a directory on the way is missing.
fn file_in_root(rootfs: &Path, rel: &Path) -> Result<Option<std::path::PathBuf>> {
    use crate::container::unpack::resolve_in_root;
    let mut comps: Vec<std::ffi::OsString> = rel
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_os_string()),
            std::path::Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    for _ in 0..40 {
        let Some((name, parent)) = comps.split_last() else {
            return Ok(None);
        };
        let Some(dir) = resolve_in_root(rootfs, parent, false)
            .with_context(|| format!("resolving {} in the image", rel.display()))?
        else {
            return Ok(None);
        };
        let here = dir.join(name);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = fs::read_link(&here)?;
                let base: Vec<std::ffi::OsString> = if to.is_absolute() {
                    Vec::new()
                } else {
                    let inner = dir.strip_prefix(rootfs).unwrap_or(Path::new(""));
                    inner.iter().map(|c| c.to_os_string()).collect()
                };
                comps = base
                    .into_iter()
                    .chain(to.components().filter_map(|c| match c {
                        std::path::Component::Normal(s) => Some(s.to_os_string()),
                        std::path::Component::ParentDir => Some("..".into()),
                        _ => None,
                    }))
                    .collect();
            }
            _ => return Ok(Some(here)),
        }
    }
    anyhow::bail!("{}: too many levels of links in the image", rel.display())
}

/// Looks a user up in the container's /etc/passwd (`name` or `uid`, optionally `:group`).
fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user
        .split_once(':')
        .map_or((user, None), |(u, g)| (u, Some(g)));
    let passwd = read_image_passwd(rootfs)?;
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == u).then(|| (f[2].parse().ok(), f[3].parse().ok()))
            })
            .and_then(|(a, b)| Some((a?, b?)))
            .with_context(|| format!("the image's user `{u}` is not in its /etc/passwd"))?,
    };
    if let Some(g) = g {
        gid = g
            .parse()
            .with_context(|| format!("group `{g}`: only numeric groups are supported"))?;
    }
    Ok((uid, gid))
}

/// The transient unit that runs container `name` from `bundle` with crun; when it stops, the
/// container is deleted and its network released.
fn unit_spec(root: &Path, name: &str, bundle: &Path, digest: &str, opts: &RunOptions) -> UnitSpec {
    let bundle_s = bundle.display().to_string();
    UnitSpec {
        name: name.to_string(),
        description: format!("keel container {name} ({})", digest),
        exec: (
            CRUN.into(),
            vec![
                "crun".into(),
                "--cgroup-manager=disabled".into(),
                "run".into(),
                "--bundle".into(),
                bundle_s,
                format!("keel-{name}"),
            ],
        ),
        exec_stop_post: vec![
            (
                CRUN.into(),
                vec![
                    "crun".into(),
                    "delete".into(),
                    "--force".into(),
                    format!("keel-{name}"),
                ],
            ),
            (
                KEEL_AGENT.into(),
                vec![
                    "keel-agent".into(),
                    "--root".into(),
                    root.display().to_string(),
                    "net-detach".into(),
                    name.to_string(),
                ],
            ),
        ],
        memory_max: opts.memory_max,
        tasks_max: opts.tasks_max,
    }
}

/// The OCI runtime config for a verified image: the runtime spec's defaults (namespaces, masked
/// paths, a small capability set), the image's command, environment, directory and user, a
/// read-only root with a tmpfs /tmp.
pub fn runtime_spec(
    image: &VerifiedImage,
    name: &str,
    rootfs: &Path,
    allow_root: bool,
) -> Result<oci_spec::runtime::Spec> {
    use oci_spec::runtime::{MountBuilder, ProcessBuilder, RootBuilder, UserBuilder};
    let c = &image.config.config;
    let mut args: Vec<String> = c.entrypoint.clone().unwrap_or_default();
    args.extend(c.cmd.clone().unwrap_or_default());
    if args.is_empty() {
        bail!(Refusal(
            "the image's config has neither Entrypoint nor Cmd: nothing to run".into()
        ));
    }
    let mut env = c.env.clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let named = c.user.as_deref().unwrap_or("");
    let (uid, gid) = match resolve_user(rootfs, named)? {
        ids if allow_root => ids,
        (0, _) if named.is_empty() => (NOBODY, NOBODY),
        (0, _) => bail!(Refusal(format!(
            "the image runs as root (User `{named}`) and this image's policy does not allow containers as root ([containers] allow-root = true)"
        ))),
        ids => ids,
    };
    let mut spec = oci_spec::runtime::Spec::default();
    let default_process = spec.process().clone().unwrap_or_default();
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(args)
        .env(env)
        .cwd(
            c.working_dir
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into()),
        )
        .user(UserBuilder::default().uid(uid).gid(gid).build()?)
        .capabilities(default_process.capabilities().clone().unwrap_or_default())
        .rlimits(default_process.rlimits().clone().unwrap_or_default())
        .no_new_privileges(true)
        .build()?;
    spec.set_process(Some(process));
    spec.set_hostname(Some(name.to_string()));
    // Relative to the bundle, which is built in a staging directory and then renamed.
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(true)
            .build()?,
    ));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(
        MountBuilder::default()
            .destination("/tmp")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec![
                "nosuid".into(),
                "nodev".into(),
                "mode=1777".into(),
                "size=64m".into(),
            ])
            .build()?,
    );
    spec.set_mounts(Some(mounts));
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_seccomp(Some(default_seccomp()?));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// The user an image that names none runs as when its policy does not allow root.
pub const NOBODY: u32 = 65534;

/// System calls a container's process may not make (EPERM): kernel modules, kexec, reboot,
/// swap, clocks, accounting, mounting and namespaces (`mount`, `unshare`, `setns`, the new
/// mount API, `pivot_root`), keyrings, `bpf`, `perf_event_open`, `ptrace` and cross-process
/// memory, `userfaultfd`, NUMA policy, file handles, old and obscure interfaces. Modelled on the
/// default profile of Docker and containers-common, as a deny list; crun applies it just before
/// it starts the image's program.
pub const SECCOMP_DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_madvise",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// `clone` flags that make new namespaces (mount, cgroup, UTS, IPC, user, PID, network).
pub const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

/// The seccomp filter of every container: [`SECCOMP_DENIED`] and the io_uring calls refused
/// (EPERM), `clone` with any namespace flag refused, `clone3` answered ENOSYS (its flags are in
/// memory, out of seccomp's reach; C libraries then fall back to `clone`), on the x86 ABIs (so
/// the 32-bit entry points cannot be used to get around it); everything else allowed.
pub fn default_seccomp() -> Result<oci_spec::runtime::LinuxSeccomp> {
    const EPERM: u32 = 1;
    const ENOSYS: u32 = 38;
    let mut syscalls = vec![
        serde_json::json!({"names": SECCOMP_DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
        serde_json::json!({
            "names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
            "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM
        }),
        serde_json::json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    for flag in CLONE_NAMESPACE_FLAGS {
        syscalls.push(serde_json::json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]
        }));
    }
    let v = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls
    });
    serde_json::from_value(v).context("the default seccomp profile")
}

/// Stops a container's unit.
pub fn stop(units: &dyn Units, name: &str) -> Result<()> {
    check_name(name)?;
    let unit = unit_name(name);
    if units.state(&unit)?.is_none() {
        bail!("no container named `{name}` is running");
    }
    units.stop(&unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::oci::Layout;
    use crate::node::agent::testkit::*;

    /// Runs the signed image as `web` on a node with a CNI network config.
    fn run_on_cni_node(units: &FakeUnits, net: &FakeNet) -> (tempfile::TempDir, Result<Started>) {
        let (t, _, img) = node_signed_for(false, "keel/web");
        write_conflist(t.path());
        let m = FakeMachine {
            ek: None,
            trusted: true,
        };
        let r = run(
            t.path(),
            &img,
            "web",
            &m,
            units,
            net,
            &RunOptions::default(),
        );
        (t, r)
    }

    #[test]
    fn an_overlay_node_without_its_network_yet_starts_nothing_and_the_spool_waits() {
        let (t, _, img) = node_signed_for(false, "keel/web");
        let marker = t.path().join(network::OVERLAY_MARKER);
        fs::create_dir_all(marker.parent().expect("parent")).expect("dir");
        fs::write(&marker, "KEEL_NET_ETCD=https://10.77.0.1:2379\n").expect("marker");
        let m = FakeMachine {
            ek: None,
            trusted: true,
        };
        let units = FakeUnits::default();
        let net = FakeNet::default();
        let e = run(
            t.path(),
            &img,
            "web",
            &m,
            &units,
            &net,
            &RunOptions::default(),
        )
        .expect_err("no network yet");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("keel-net.env") && msg.contains("keel-net status"),
            "{msg}"
        );
        assert!(!t.path().join(CONTAINERS_DIR).join("web").exists());
        assert!(units.started.borrow().is_empty());

        // The spool keeps the archive while the network is missing, and runs it once keel-net
        // has written its config.
        let spool = t.path().join(SPOOL_DIR);
        fs::create_dir_all(&spool).expect("spool");
        let layout = Layout::open(&img).expect("layout");
        oci::write_archive(&layout, &spool.join("web.tar")).expect("archive");
        let mut sp = crate::node::agent::spool::Spool::new(spool.clone(), Default::default());
        let now = std::time::Instant::now();
        assert!(sp.pass(t.path(), &m, &units, &net, now).0);
        assert!(spool.join("web.tar").is_file(), "left in the spool");
        assert!(!spool.join("refused").exists(), "not refused");
        write_conflist(t.path());
        assert!(!sp.pass(t.path(), &m, &units, &net, now).0);
        assert!(spool.join("done/web.tar").is_file());
        assert_eq!(units.started.borrow().len(), 1);
        assert_eq!(net.namespaces.borrow().len(), 1);
    }

    #[test]
    fn with_a_cni_network_the_container_joins_its_namespace() {
        let units = FakeUnits::default();
        let net = FakeNet::default();
        let (t, r) = run_on_cni_node(&units, &net);
        let s = r.expect("runs");
        assert_eq!(s.addresses, vec!["10.5.7.2/24".to_string()]);
        let bundle = t.path().join(CONTAINERS_DIR).join("web");
        let cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(bundle.join("config.json")).expect("config"))
                .expect("json");
        let netns: Vec<&serde_json::Value> = cfg["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter(|n| n["type"] == "network")
            .collect();
        assert_eq!(netns.len(), 1, "{cfg}");
        assert_eq!(netns[0]["path"], "/run/netns/keel-web");
        let started = units.started.borrow();
        let post: Vec<String> = started[0]
            .exec_stop_post
            .iter()
            .map(|(_, argv)| argv.join(" "))
            .collect();
        assert!(
            post.iter().any(|c| c.ends_with("net-detach web")),
            "{post:?}"
        );
        // What the unit's ExecStopPost does: DEL, namespace gone, record gone.
        detach_network(&bundle, &net).expect("detach");
        assert_eq!(*net.deleted.borrow(), 1);
        assert!(net.namespaces.borrow().is_empty());
        assert!(!bundle.join(network::RECORD).exists());
    }

    #[test]
    fn a_container_that_fails_to_start_releases_its_network() {
        let units = FakeUnits {
            fail: std::cell::Cell::new(true),
            ..Default::default()
        };
        let net = FakeNet::default();
        let (t, r) = run_on_cni_node(&units, &net);
        r.expect_err("fails");
        assert_eq!(*net.deleted.borrow(), 1, "DEL ran");
        assert!(net.namespaces.borrow().is_empty(), "namespace removed");
        assert!(!t.path().join(CONTAINERS_DIR).join("web").exists());
    }

    /// Runs `img` as `hello` on a node without a CNI config.
    fn run_hello(root: &Path, img: &Path, m: &FakeMachine, units: &FakeUnits) -> Result<Started> {
        run(root, img, "hello", m, units, &NoNet, &RunOptions::default())
    }

    const EK: &str = "sha256:abababababababababababababababababababababababababababababababab";

    #[test]
    fn a_signed_image_is_unpacked_and_started() {
        let (t, _, img) = node(true);
        let units = FakeUnits::default();
        let m = FakeMachine {
            ek: Some(EK.into()),
            trusted: true,
        };
        let s = run_hello(t.path(), &img, &m, &units).expect("runs");
        assert_eq!(s.unit, "keel-ctr-hello.service");
        let bundle = t.path().join(CONTAINERS_DIR).join("hello");
        assert!(bundle.join("rootfs/bin/hello").is_file());
        let cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(bundle.join("config.json")).expect("config"))
                .expect("json");
        assert_eq!(cfg["process"]["args"][0], "/bin/hello");
        assert_eq!(cfg["root"]["readonly"], true);
        assert_eq!(
            cfg["root"]["path"], "rootfs",
            "relative: the bundle was renamed from staging"
        );
        let started = units.started.borrow();
        assert_eq!(started.len(), 1);
        assert!(started[0].exec.1.contains(&bundle.display().to_string()));
    }

    /// Nothing of a refused image is left where it could run, and nothing started.
    fn assert_refused(root: &Path, units: &FakeUnits, r: Result<Started>, want: &str) {
        let e = r.expect_err("refused");
        let msg = format!("{e:#}");
        assert!(msg.contains(want), "{msg}");
        assert!(units.started.borrow().is_empty(), "nothing started");
        let dir = root.join(CONTAINERS_DIR);
        let left: Vec<_> = fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "left behind in {}: {left:?}",
            dir.display()
        );
    }

    #[test]
    fn refusals_leave_nothing_behind() {
        // Untrusted boot.
        let (t, _, img) = node(true);
        let units = FakeUnits::default();
        let m = FakeMachine {
            ek: Some(EK.into()),
            trusted: false,
        };
        let r = run_hello(t.path(), &img, &m, &units);
        assert_refused(t.path(), &units, r, "not in a state the operator signed");

        // Unsigned: a fresh build without a signature.
        let tree = t.path().join("tree");
        let unsigned = t.path().join("unsigned");
        crate::container::build::from_tree(&tree, &unsigned, &["/bin/hello".into()], &[])
            .expect("build");
        let m = FakeMachine {
            ek: Some(EK.into()),
            trusted: true,
        };
        let r = run_hello(t.path(), &unsigned, &m, &units);
        assert_refused(t.path(), &units, r, "not signed");

        // A layer byte changed after signing.
        let layout = Layout::open(&img).expect("layout");
        let d = layout.image_descriptor().expect("image");
        let man: oci::Manifest =
            serde_json::from_slice(&layout.read_blob(&d, "m").expect("manifest")).expect("json");
        let blob = layout.blob_path(&man.layers[0].digest).expect("path");
        let mut bytes = fs::read(&blob).expect("layer");
        let n = bytes.len() / 2;
        bytes[n] ^= 0x40;
        fs::write(&blob, bytes).expect("tamper");
        let r = run_hello(t.path(), &img, &m, &units);
        assert_refused(t.path(), &units, r, "changed after signing");
    }

    #[test]
    fn the_enrolled_machines_list_gates_the_node() {
        let (t, k, img) = node(false);
        let units = FakeUnits::default();
        let mut list = policy::Machines {
            cluster: "test".into(),
            ..Default::default()
        };
        list.add(
            "other",
            "sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
        )
        .expect("add");
        let node_list = t.path().join(policy::NODE_MACHINES);
        fs::create_dir_all(node_list.parent().expect("parent")).expect("dir");
        policy::write_signed(&node_list, &list, &k).expect("list");
        let m = FakeMachine {
            ek: Some(EK.into()),
            trusted: true,
        };
        let r = run_hello(t.path(), &img, &m, &units);
        assert_refused(t.path(), &units, r, "is not in the enrolled machines list");
        let nomachine = FakeMachine {
            ek: None,
            trusted: true,
        };
        let r = run_hello(t.path(), &img, &nomachine, &units);
        assert_refused(t.path(), &units, r, "cannot be read");
        list.add("this", EK).expect("add");
        policy::write_signed(&node_list, &list, &k).expect("list");
        run_hello(t.path(), &img, &m, &units).expect("enrolled: runs");
    }

    /// Review M1: an older, validly signed list (still naming a revoked machine) does not
    /// replace a newer one; a list that vanished after one was in force, or one for another
    /// cluster, stops everything; with no list ever, a policy that requires enrolment refuses.
    #[test]
    fn enrolment_lists_never_go_back_and_name_their_cluster() {
        let (t, k, img) = node(false);
        let units = FakeUnits::default();
        let m = FakeMachine {
            ek: Some(EK.into()),
            trusted: true,
        };
        let node_list = t.path().join(policy::NODE_MACHINES);
        fs::create_dir_all(node_list.parent().expect("parent")).expect("dir");
        let mut list = policy::Machines {
            cluster: "test".into(),
            ..Default::default()
        };
        list.add("this", EK).expect("add");
        policy::write_signed(&node_list, &list, &k).expect("list");
        let old = (
            fs::read(&node_list).expect("list"),
            fs::read(policy::sig_path(&node_list)).expect("sig"),
        );
        run_hello(t.path(), &img, &m, &FakeUnits::default()).expect("serial 1: enrolled");
        fs::remove_dir_all(t.path().join(CONTAINERS_DIR)).expect("clean");
        list.remove("this");
        policy::write_signed(&node_list, &list, &k).expect("list");
        let r = run_hello(t.path(), &img, &m, &units);
        assert_refused(t.path(), &units, r, "is not in the enrolled machines list");
        // The attacker restores the older list, validly signed, that still names the machine.
        fs::write(&node_list, &old.0).expect("restore");
        fs::write(policy::sig_path(&node_list), &old.1).expect("restore");
        let r = run_hello(t.path(), &img, &m, &units);
        assert_refused(t.path(), &units, r, "never goes back");
        // Or removes the list altogether.
        fs::remove_file(&node_list).expect("rm");
        fs::remove_file(policy::sig_path(&node_list)).expect("rm");
        let r = run_hello(t.path(), &img, &m, &units);
        assert_refused(t.path(), &units, r, "and now there is none");
        // A list for another cluster, signed with the same key, with a higher serial.
        let mut foreign = policy::Machines {
            cluster: "elsewhere".into(),
            serial: 10,
            ..Default::default()
        };
        foreign.add("this", EK).expect("add");
        policy::write_signed(&node_list, &foreign, &k).expect("list");
        let r = run_hello(t.path(), &img, &m, &units);
        assert_refused(t.path(), &units, r, "is for cluster `elsewhere`");

        // No list ever, and the policy requires one: refused.
        let (t, _, img) = node(false);
        let pfile = t.path().join(policy::POLICY_DIR).join(policy::POLICY_FILE);
        let mut p: policy::Policy =
            serde_json::from_slice(&fs::read(&pfile).expect("policy")).expect("json");
        p.require_enrolled_machines = true;
        fs::write(&pfile, serde_json::to_vec(&p).expect("json")).expect("policy");
        let r = run_hello(t.path(), &img, &m, &units);
        assert_refused(t.path(), &units, r, "requires an enrolled-machines list");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("hello-1").is_ok());
        for bad in ["", "-x", "Hello", "a/b", "../x", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            default_name(Path::new("/spool/Hello World.tar")),
            "hello-world"
        );
    }

    /// A full disk or a read-only store is the machine's failure (retried); a truncated or
    /// malformed archive is the image's fault (refused).
    #[test]
    fn io_errors_split_into_failures_and_refusals() {
        use std::io::{Error, ErrorKind};
        for (case, e, environmental) in [
            ("disk full", Error::from_raw_os_error(libc::ENOSPC), true),
            ("quota", Error::from_raw_os_error(libc::EDQUOT), true),
            ("read-only", Error::from_raw_os_error(libc::EROFS), true),
            ("hardware", Error::from_raw_os_error(libc::EIO), true),
            (
                "truncated archive",
                Error::from(ErrorKind::UnexpectedEof),
                false,
            ),
            (
                "malformed archive",
                Error::new(ErrorKind::InvalidData, "bad header"),
                false,
            ),
            (
                "missing blob",
                Error::from_raw_os_error(libc::ENOENT),
                false,
            ),
        ] {
            assert_eq!(is_environmental(&e), environmental, "{case}");
            let refused = Refusal::is_refusal(&oci_refusal(oci::OciError::Io {
                context: "extracting".into(),
                source: e,
            }));
            assert_eq!(refused, !environmental, "{case}");
        }
        assert!(Refusal::is_refusal(&oci_refusal(oci::OciError::Unsigned {
            digest: "sha256:x".into()
        })));
    }

    /// Review L1: the image's /etc/passwd is read inside its root file system only. A link to a
    /// host file is looked up inside the rootfs (where it does not exist), a FIFO is refused
    /// without blocking, and a link inside the image is followed.
    #[test]
    fn the_image_passwd_is_never_read_from_the_host() {
        let t = tempfile::tempdir().expect("tmp");
        let host = t.path().join("host-etc-passwd");
        fs::write(&host, "hostonly:x:4242:4243::/:/bin/sh\n").expect("host file");
        let rootfs = t.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).expect("etc");
        std::os::unix::fs::symlink(&host, rootfs.join("etc/passwd")).expect("link");
        let e = resolve_user(&rootfs, "hostonly").expect_err("not in the image");
        assert!(format!("{e:#}").contains("not in its /etc/passwd"), "{e:#}");
        // A FIFO: refused at once instead of blocking the agent.
        fs::remove_file(rootfs.join("etc/passwd")).expect("rm");
        nix::unistd::mkfifo(&rootfs.join("etc/passwd"), nix::sys::stat::Mode::S_IRWXU)
            .expect("fifo");
        let e = resolve_user(&rootfs, "app").expect_err("fifo");
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
        // A link inside the image, relative and absolute, is followed inside it.
        fs::remove_file(rootfs.join("etc/passwd")).expect("rm");
        fs::write(
            rootfs.join("etc/passwd.real"),
            "app:x:1000:1001::/:/bin/sh\n",
        )
        .expect("w");
        std::os::unix::fs::symlink("passwd.real", rootfs.join("etc/passwd")).expect("link");
        assert_eq!(resolve_user(&rootfs, "app").expect("found"), (1000, 1001));
        fs::remove_file(rootfs.join("etc/passwd")).expect("rm");
        std::os::unix::fs::symlink("/etc/passwd.real", rootfs.join("etc/passwd")).expect("link");
        assert_eq!(resolve_user(&rootfs, "app").expect("found"), (1000, 1001));
    }

    /// Units whose `state` (asked after the image was verified, before it is unpacked) replaces
    /// every gzip blob of a layout directory with an unsigned layer.
    struct SwapUnits {
        blobs: PathBuf,
        evil: Vec<u8>,
        inner: crate::node::agent::testkit::FakeUnits,
    }
    impl Units for SwapUnits {
        fn start(&self, spec: &super::super::systemd::UnitSpec) -> Result<()> {
            self.inner.start(spec)
        }
        fn stop(&self, u: &str) -> Result<()> {
            self.inner.stop(u)
        }
        fn list(&self) -> Result<Vec<super::super::systemd::UnitState>> {
            self.inner.list()
        }
        fn state(&self, _: &str) -> Result<Option<super::super::systemd::UnitState>> {
            for e in fs::read_dir(&self.blobs).expect("blobs") {
                let p = e.expect("entry").path();
                if fs::read(&p).expect("blob").starts_with(&[0x1f, 0x8b]) {
                    fs::write(&p, &self.evil).expect("swap");
                }
            }
            Ok(None)
        }
    }

    /// Review M2: a layout directory's layer replaced after its digest was checked is not what
    /// gets unpacked: the agent verifies and unpacks its own private copy.
    #[test]
    fn a_layer_swapped_after_verification_is_not_run() {
        let (t, _, img) = crate::node::agent::testkit::node(false);
        let evil = {
            let mut b = tar::Builder::new(Vec::new());
            let body = b"#!/bin/sh\necho UNSIGNED CODE\n";
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            b.append_data(&mut h, "bin/hello", &body[..])
                .expect("append");
            let tar = b.into_inner().expect("tar");
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, &tar).expect("gz");
            gz.finish().expect("gz")
        };
        let units = SwapUnits {
            blobs: img.join("blobs/sha256"),
            evil,
            inner: Default::default(),
        };
        let machine = crate::node::agent::testkit::FakeMachine {
            ek: None,
            trusted: true,
        };
        run(
            t.path(),
            &img,
            "hello",
            &machine,
            &units,
            &crate::node::agent::testkit::NoNet,
            &Default::default(),
        )
        .expect("the signed image runs");
        let hello = t.path().join(CONTAINERS_DIR).join("hello/rootfs/bin/hello");
        let text = fs::read_to_string(&hello).expect("hello");
        assert_eq!(
            text, "#!/bin/sh\necho hi\n",
            "the swapped layer was unpacked"
        );
    }

    /// Review L3: the signed reference must name what the operator runs.
    #[test]
    fn the_signed_reference_must_name_the_container() {
        for (signed, expected, ok) in [
            ("keel/hello", "hello", true),
            ("registry.example/keel/hello:1.2", "hello", true),
            ("registry.example:5000/keel/hello@sha256:ab", "hello", true),
            ("registry.example:5000/keel/hello", "keel/hello", false),
            (
                "registry.example:5000/keel/hello",
                "registry.example:5000/keel/hello",
                true,
            ),
            ("keel/hello", "web", false),
            ("keel/hello-evil", "hello", false),
            ("keel/local", "hello", false),
        ] {
            assert_eq!(
                reference_matches(signed, expected),
                ok,
                "{signed} vs {expected}"
            );
        }
        // Through run: the image signed for keel/hello, run as `web`.
        let (t, _, img) = node(false);
        let units = FakeUnits::default();
        let m = FakeMachine {
            ek: None,
            trusted: true,
        };
        let r = run(
            t.path(),
            &img,
            "web",
            &m,
            &units,
            &NoNet,
            &RunOptions::default(),
        );
        assert_refused(
            t.path(),
            &units,
            r,
            "signed for `keel/hello`, not for `web`",
        );
        let opts = RunOptions {
            reference: Some("keel/hello".into()),
            ..Default::default()
        };
        run(t.path(), &img, "web", &m, &units, &NoNet, &opts).expect("named reference");
    }

    /// Review M4: a container does not run as root unless the policy allows it (an image that
    /// names no user runs as nobody, one that names root is refused), its seccomp filter refuses
    /// namespace, mount, keyring and bpf calls, and its unit closes the device controller.
    #[test]
    fn containers_run_without_root_and_with_a_seccomp_filter() {
        let (t, _, img) = node(false);
        let layout = Layout::open(&img).expect("layout");
        let keys = crate::container::policy::load(t.path())
            .expect("policy")
            .keys;
        let mut verified = oci::verify(&layout, &keys).expect("verified");
        let rootfs = t.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).expect("etc");
        fs::write(rootfs.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").expect("passwd");
        let spec = runtime_spec(&verified, "hello", &rootfs, false).expect("spec");
        let user = spec.process().as_ref().expect("process").user().clone();
        assert_eq!((user.uid(), user.gid()), (NOBODY, NOBODY));
        let seccomp = spec
            .linux()
            .as_ref()
            .and_then(|l| l.seccomp().clone())
            .expect("seccomp");
        let text = serde_json::to_string(&seccomp).expect("json");
        for call in [
            "\"bpf\"",
            "\"unshare\"",
            "\"mount\"",
            "\"keyctl\"",
            "\"setns\"",
            "SCMP_ARCH_X86\"",
            "\"clone3\"",
            "\"io_uring_setup\"",
            "268435456",
        ] {
            assert!(text.contains(call), "{call} in {text}");
        }
        assert!(spec.process().as_ref().expect("p").no_new_privileges() == Some(true));
        let allowed = runtime_spec(&verified, "hello", &rootfs, true).expect("spec");
        assert_eq!(allowed.process().as_ref().expect("p").user().uid(), 0);
        verified.config.config.user = Some("root".into());
        let e = runtime_spec(&verified, "hello", &rootfs, false).expect_err("root");
        assert!(format!("{e:#}").contains("allow-root"), "{e:#}");
        verified.config.config.user = Some("0:0".into());
        assert!(runtime_spec(&verified, "hello", &rootfs, false).is_err());
        verified.config.config.user = Some("1000:1000".into());
        let u = runtime_spec(&verified, "hello", &rootfs, false).expect("non-root");
        assert_eq!(u.process().as_ref().expect("p").user().uid(), 1000);
    }
}
