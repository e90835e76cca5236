//! `keel build`: definition → bootstrap → /usr commit → erofs + verity → initrd → UKI → disk →
//! manifest. Outputs are staged next to their final names and renamed only when all are whole.

use crate::disk::layout;
use crate::host::cache::{self, Cache};
use crate::host::compose::{bootstrap, dpkg, overlay, usrify};
use crate::host::progress::Stages;
use crate::host::render::{disk, initrd, uki, usr};
use crate::host::store::{self, CommitRecord, Store};
use crate::host::tools::{require_host_tool, run, HostTool, ToolsTree};
use crate::image::{Definition, OutputFormat};
use crate::manifest::{self, Artifact, Manifest, Package, PartitionInfo, MANIFEST_FILE};
use crate::trust::Keys;
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// SOURCE_DATE_EPOCH when the environment sets none: fixed, so builds are reproducible by default
/// (2025-01-01T00:00:00Z).
pub const DEFAULT_EPOCH: u64 = 1_735_689_600;

/// `keel build`'s arguments, and what other commands (boot, test) ask a build for.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildOptions {
    /// The image definition (default: images/cluster-node.toml).
    #[arg(default_value = "images/cluster-node.toml")]
    pub definition: PathBuf,
    /// Output directory (default: build/NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The OSTree store (default: ~/.cache/keel/repo).
    #[arg(long)]
    pub repo: Option<PathBuf>,
    /// Bootstrap the package tree again instead of using the cached one (packages still come
    /// from the cache).
    #[arg(long)]
    pub rebootstrap: bool,
    /// Print the manifest as JSON when done (and no progress).
    #[arg(long)]
    pub json: bool,
    /// Only load and check the definition (every layer, file and unit it names); build nothing.
    #[arg(long)]
    pub check: bool,
    /// No progress output (for builds run by other commands).
    #[arg(skip)]
    pub quiet: bool,
    /// Build as this version instead of the definition's (e.g. from a release pipeline).
    #[arg(long)]
    pub version: Option<String>,
    /// Put this Ignition config on the image's ESP (keel/config.ign), for machines without
    /// fw_cfg; checked like `keel ignition validate` first.
    #[arg(long)]
    pub ignition: Option<PathBuf>,
}

impl BuildOptions {
    /// A build of `definition` with every option at its default.
    pub fn of(definition: PathBuf) -> BuildOptions {
        BuildOptions {
            definition,
            out: None,
            repo: None,
            rebootstrap: false,
            json: false,
            check: false,
            quiet: false,
            version: None,
            ignition: None,
        }
    }
}

/// `keel build`: builds and prints a summary (or the manifest as JSON).
pub fn command(opts: &BuildOptions) -> Result<()> {
    if opts.check {
        let def = Definition::load(&opts.definition)?;
        println!(
            "{}: valid ({} {}, {} packages, {} units, {} files)",
            opts.definition.display(),
            def.name,
            def.version,
            def.packages.len(),
            def.units.len(),
            def.files.len()
        );
        return Ok(());
    }
    let m = build(opts)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let out = opts.out.clone().unwrap_or_else(|| default_out(&m.name));
    println!("built {} {} in {}", m.name, m.version, out.display());
    println!("  commit     {}", m.ostree_commit);
    println!("  usr hash   {}", m.usr_root_hash);
    println!("  /usr       {} MiB erofs", m.usr_filesystem_bytes >> 20);
    for art in &m.artifacts {
        println!(
            "  {:<22} {:>6} MiB  sha256 {}",
            art.file,
            art.size >> 20,
            &art.sha256[..16.min(art.sha256.len())]
        );
    }
    let total: f64 = m.timings.iter().map(|t| t.seconds).sum();
    println!("  total      {total:.1}s");
    Ok(())
}

/// The epoch from SOURCE_DATE_EPOCH, else [`DEFAULT_EPOCH`].
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v} is not a number of seconds")),
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

/// Removes a directory when dropped (work and staging directories of a build, on success or error).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = cache::remove_path(&self.0) {
            tracing::warn!("leaving {}: {e:#}", self.0.display());
        }
    }
}

/// Default output directory for an image.
pub fn default_out(name: &str) -> PathBuf {
    PathBuf::from("build").join(name)
}

/// Default store location.
pub fn default_repo(cache: &Cache) -> PathBuf {
    cache.dir().join("repo")
}

/// Returns the base commit for the definition, bootstrapping when it is not in the store.
fn ensure_base(
    store: &Store,
    cache: &Cache,
    def: &Definition,
    epoch: u64,
    rebootstrap: bool,
) -> Result<(String, String)> {
    let key = bootstrap::base_key(def, epoch);
    let base_ref = store::base_ref(&key);
    if !rebootstrap {
        if let Some(c) = store.resolve(&base_ref)? {
            let kernel = store
                .entry(&c)?
                .record
                .map(|r| r.kernel)
                .unwrap_or_default();
            return Ok((c, kernel));
        }
    }
    let mmdebstrap = require_host_tool(HostTool::Mmdebstrap)?;
    let debs = cache.dir().join("debs").join(&def.suite);
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let staging = cache.staging("bootstrap", &key)?;
    cache::remove_path(&staging)?;
    let _cleanup = Scratch(staging.clone());
    run(Command::new(mmdebstrap)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(bootstrap::mmdebstrap_args(def, &staging, &debs)))
    .with_context(|| {
        format!(
            "bootstrapping {} from {} ({})",
            def.suite,
            def.mirror,
            def.path.display()
        )
    })?;
    let kernel = usrify::usrify(&staging)?;
    let status = fs::read_to_string(staging.join("usr").join(usrify::DPKG_STATUS))
        .context("reading dpkg status")?;
    let record = CommitRecord {
        format: 1,
        name: format!("base-{key}"),
        version: String::new(),
        kernel: kernel.clone(),
        packages: dpkg::parse_status(&status),
    };
    let usr = staging.join("usr");
    let subject = format!("base tree {key}");
    let req = store::CommitRequest {
        dir: &usr,
        ref_: &base_ref,
        parent: None,
        subject: &subject,
        record: Some(&record),
        time: epoch,
    };
    let commit = store.commit_dir(&req, None)?;
    Ok((commit, kernel))
}

/// The container policy files an image carries: policy.json, the public keys (checked to be
/// P-256), and the enrolled-machines list when the definition names one (its signature checked
/// against those keys, so a build never ships a list the nodes would refuse).
fn container_files(
    c: &crate::image::ContainerSettings,
    trust: Option<&crate::image::TrustSettings>,
    image_name: &str,
) -> Result<overlay::ContainerFiles> {
    let cluster = c.cluster.clone().unwrap_or_else(|| image_name.to_string());
    use crate::container::{policy, signature::TrustedKey};
    let mut paths = c.keys.clone();
    if paths.is_empty() {
        let t = trust.context(
            "`keys` is empty and there is no [trust] key directory to take container-signing.pub.pem from",
        )?;
        if t.generate_keys {
            crate::trust::keys::ensure_container_key(&t.keys)?;
        }
        paths.push(t.keys.join(crate::trust::keys::file::CONTAINER_PUB));
    }
    let mut keys = Vec::new();
    let mut trusted = Vec::new();
    for p in &paths {
        let pem = fs::read(p).with_context(|| format!("reading container key {}", p.display()))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .context("key file name")?;
        trusted.push(TrustedKey::from_pem(&name, &pem).with_context(|| p.display().to_string())?);
        if keys.iter().any(|(n, _): &(String, Vec<u8>)| n == &name) {
            anyhow::bail!("two container keys are named {name}; rename one");
        }
        keys.push((name, pem));
    }
    let machines = match &c.machines {
        Some(m) => {
            let list = policy::read_signed(m, &trusted)?
                .with_context(|| format!("{}: no such file", m.display()))?;
            if list.cluster != cluster {
                anyhow::bail!(
                    "{}: the enrolled-machines list is for cluster `{}`, the image for `{cluster}` ([containers] cluster)",
                    m.display(),
                    list.cluster
                );
            }
            tracing::debug!(serial = list.serial, "shipping the enrolled-machines list");
            Some((
                fs::read(m).with_context(|| format!("reading {}", m.display()))?,
                fs::read(policy::sig_path(m))?,
            ))
        }
        None => None,
    };
    let policy = policy::Policy {
        keys: keys.iter().map(|(n, _)| n.clone()).collect(),
        require_trusted_boot: c.require_trusted_boot,
        require_enrolled_machines: c.require_enrolled_machines,
        cluster,
        allow_root: c.allow_root,
    };
    Ok(overlay::ContainerFiles {
        policy_json: serde_json::to_vec_pretty(&policy)?,
        keys,
        machines,
    })
}

/// keel-update's image settings and the repository root the image trusts: `[update] root`, or
/// the [trust] key directory's `tuf/root.json` (made there for development keys).
fn update_files(
    u: &crate::image::UpdateSettings,
    trust: Option<&crate::image::TrustSettings>,
    health_units: &[String],
) -> Result<overlay::UpdateFiles> {
    let root = match (&u.root, trust) {
        (Some(r), _) => r.clone(),
        (None, Some(t)) => {
            if t.generate_keys {
                crate::host::publish::keys::ensure(&t.keys)?;
            }
            crate::host::publish::keys::root_json(&crate::host::publish::keys::tuf_dir(&t.keys))
        }
        (None, None) => anyhow::bail!("no root: set `root` or a [trust] key directory"),
    };
    let root_json = fs::read(&root).with_context(|| {
        format!(
            "reading the repository root {} (make the keys with `keel keys add-update-keys DIR`)",
            root.display()
        )
    })?;
    let parsed: tough::schema::Signed<tough::schema::Root> = serde_json::from_slice(&root_json)
        .with_context(|| format!("{}: not a TUF root.json", root.display()))?;
    tracing::debug!(
        version = parsed.signed.version.get(),
        "embedding the update root"
    );
    let mut config =
        String::from("# Written by keel build from the image definition's [update].\n");
    if let Some(r) = &u.repository {
        config.push_str(&format!(
            "repository = {}\n",
            toml::Value::String(r.clone())
        ));
    }
    config.push_str(&format!(
        "tries = {}\nreboot = \"{}\"\nhealth-timeout-secs = {}\n",
        u.tries, u.reboot, u.health_timeout_secs
    ));
    if let Some(v) = &u.min_version {
        config.push_str(&format!("min-version = \"{v}\"\n"));
    }
    let units: Vec<toml::Value> = health_units
        .iter()
        .map(|u| toml::Value::String(u.clone()))
        .collect();
    config.push_str(&format!("health-units = {}\n", toml::Value::Array(units)));
    Ok(overlay::UpdateFiles {
        config_toml: config.into_bytes(),
        root_json,
    })
}

fn read_text(p: &std::path::Path) -> Result<String> {
    fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

/// What a build reads before it touches the store: the definition, the epoch, and the files the
/// image carries that are checked up front (an embedded config, keys, the container policy).
struct Inputs {
    def: Definition,
    epoch: u64,
    ignition: Option<Vec<u8>>,
    keys: Option<Keys>,
    container_files: Option<overlay::ContainerFiles>,
    update_files: Option<overlay::UpdateFiles>,
}

fn load_inputs(opts: &BuildOptions, stages: &mut Stages) -> Result<Inputs> {
    let def = stages.run("load definition", || {
        let mut def = Definition::load(&opts.definition)?;
        if let Some(v) = &opts.version {
            def.set_version(v)
                .map_err(|m| anyhow::anyhow!("--version: {m}"))?;
        }
        Ok(def)
    })?;
    let epoch = source_date_epoch()?;
    // An embedded config is checked like `keel ignition validate` before anything is built.
    let ignition = match &opts.ignition {
        Some(p) => {
            let bytes =
                fs::read(p).with_context(|| format!("reading --ignition {}", p.display()))?;
            crate::node::provision::config::parse(&bytes)
                .with_context(|| format!("--ignition {}", p.display()))?;
            Some(bytes)
        }
        None => None,
    };
    let keys = match &def.trust {
        Some(t) => Some(stages.run("signing keys", || {
            crate::trust::ensure_keys(t, &def.name)
                .with_context(|| format!("trust.keys of {}", def.path.display()))
        })?),
        None => None,
    };
    let container_files = match &def.containers {
        Some(c) => Some(stages.run("container policy", || {
            container_files(c, def.trust.as_ref(), &def.name)
                .with_context(|| format!("[containers] of {}", def.path.display()))
        })?),
        None => None,
    };
    let update_files = match &def.update {
        Some(u) => Some(stages.run("update settings", || {
            // A trial boot must bring up every service the image enables.
            let units: Vec<String> = def
                .enable
                .iter()
                .filter(|u| u.ends_with(".service") && u.as_str() != "keel-update-health.service")
                .cloned()
                .collect();
            update_files(u, def.trust.as_ref(), &units)
                .with_context(|| format!("[update] of {}", def.path.display()))
        })?),
        None => None,
    };
    Ok(Inputs {
        def,
        epoch,
        ignition,
        keys,
        container_files,
        update_files,
    })
}

/// Where a build works: the store, the output directory, and two scratch directories (staging
/// next to the outputs, work in the cache) removed however the build ends.
struct Workspace {
    cache: Cache,
    store: Store,
    out: PathBuf,
    staging: PathBuf,
    work: PathBuf,
    _guards: (Scratch, Scratch),
}

impl Workspace {
    fn create(opts: &BuildOptions, name: &str) -> Result<Workspace> {
        let cache = Cache::from_env()?;
        let repo_path = opts.repo.clone().unwrap_or_else(|| default_repo(&cache));
        let store = Store::open_or_create(&repo_path)?;
        let out = opts.out.clone().unwrap_or_else(|| default_out(name));
        fs::create_dir_all(&out)
            .with_context(|| format!("creating output directory {}", out.display()))?;
        let out = out
            .canonicalize()
            .with_context(|| format!("resolving {}", out.display()))?;
        let pid = std::process::id();
        let staging = out.join(format!(".keel-staging-{pid}"));
        let work = cache.dir().join("work").join(format!("{name}-{pid}"));
        cache::remove_path(&staging)?;
        cache::remove_path(&work)?;
        fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let _guards = (Scratch(staging.clone()), Scratch(work.clone()));
        Ok(Workspace {
            cache,
            store,
            out,
            staging,
            work,
            _guards,
        })
    }
}

/// Base checkout + keel's content, committed as the image's /usr: the commit and its packages.
fn compose_usr(
    ws: &Workspace,
    tools: &ToolsTree,
    inputs: &Inputs,
    base: &str,
    kernel: &str,
) -> Result<(String, Vec<Package>)> {
    let def = &inputs.def;
    let devino = ostree::RepoDevInoCache::new();
    let tree = ws.work.join("usr-compose");
    ws.store.checkout(base, &tree, Some(&devino))?;
    let binaries = def.project_dir.join("target/release");
    let db_crt = match &inputs.keys {
        Some(k) => {
            fs::read(&k.db_crt).with_context(|| format!("reading {}", k.db_crt.display()))?
        }
        None => Vec::new(),
    };
    let trust_files = inputs.keys.as_ref().map(|k| overlay::TrustFiles {
        pcr_initrd_pub_pem: &k.pcr_initrd_pub_pem,
        pcr_boot_pub_pem: &k.pcr_boot_pub_pem,
        recovery_pub_pem: &k.recovery_pub_pem,
        db_crt_pem: &db_crt,
    });
    overlay::apply(
        &tree,
        def,
        &binaries,
        trust_files.as_ref(),
        inputs.container_files.as_ref(),
        inputs.update_files.as_ref(),
    )?;
    overlay::apply_presets(tools, &tree, &ws.work)?;
    let status = fs::read_to_string(tree.join(usrify::DPKG_STATUS))
        .context("reading the image's dpkg status")?;
    let packages = dpkg::parse_status(&status);
    let record = CommitRecord {
        format: 1,
        name: def.name.clone(),
        version: def.version.clone(),
        kernel: kernel.to_string(),
        packages: packages.clone(),
    };
    let image_ref = store::image_ref(&def.name);
    let parent = ws.store.resolve(&image_ref)?;
    let subject = format!("{} {}", def.name, def.version);
    let req = store::CommitRequest {
        dir: &tree,
        ref_: &image_ref,
        parent: parent.as_deref(),
        subject: &subject,
        record: Some(&record),
        time: inputs.epoch,
    };
    let commit = ws.store.commit_dir(&req, Some(&devino))?;
    cache::remove_path(&tree)?;
    Ok((commit, packages))
}

/// What a UKI is made of: the checked-out /usr (kernel, os-release), the kernel version, the
/// initrd and the command line.
struct UkiSources<'a> {
    usr_tree: &'a Path,
    kernel: &'a str,
    initrd: &'a Path,
    cmdline: &'a str,
}

/// The signed (or plain) UKI at `uki_out`. Returns the PCR 11 predictions of a signed one.
fn make_uki(
    ws: &Workspace,
    tools: &ToolsTree,
    keys: Option<&Keys>,
    src: &UkiSources,
    uki_out: &Path,
) -> Result<Option<Vec<crate::trust::measure::PhasePrediction>>> {
    let (usr_tree, kernel, initrd_path, cmdline) =
        (src.usr_tree, src.kernel, src.initrd, src.cmdline);
    let os_release = ws.work.join("os-release");
    fs::copy(usr_tree.join("lib/os-release"), &os_release).context("copying os-release")?;
    let kernel_file = ws.work.join("vmlinuz");
    fs::copy(
        usr_tree.join("lib/modules").join(kernel).join("vmlinuz"),
        &kernel_file,
    )
    .context("copying the kernel")?;
    let initrd_copy = ws.work.join("initrd.img");
    fs::copy(initrd_path, &initrd_copy).context("copying the initrd")?;
    let input = uki::UkiInput {
        kernel: &kernel_file,
        initrd: &initrd_copy,
        os_release: &os_release,
        kernel_version: kernel,
        cmdline,
    };
    match keys {
        Some(k) => uki::build_signed(tools, &input, k, &ws.work, uki_out).map(Some),
        None => uki::build(tools, &input, uki_out).map(|_| None),
    }
}

/// The usr image and its verity tree, as files in the work directory.
struct UsrImage {
    erofs: PathBuf,
    verity: PathBuf,
    root_hash: String,
    content_id: String,
}

/// The ESP (UKI, loader, Secure Boot keys, an embedded config) and the GPT disk around it and
/// the usr image, written to `raw`.
fn disk_image(
    ws: &Workspace,
    tools: &ToolsTree,
    inputs: &Inputs,
    usr: &UsrImage,
    uki_out: &Path,
    raw: &Path,
) -> Result<Vec<layout::PartitionDef>> {
    let def = &inputs.def;
    let esp = ws.work.join("esp");
    disk::prepare_esp(
        tools,
        &esp,
        uki_out,
        &def.version,
        inputs.epoch,
        inputs.keys.as_ref(),
    )?;
    if let Some(cfg) = &inputs.ignition {
        let dir = esp.join("keel");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join("config.ign"), cfg).context("writing keel/config.ign on the ESP")?;
        // Signed with the operator's container-signing key, which the node's policy trusts.
        if let Some(k) = &inputs.keys {
            let key = crate::trust::keys::container_key(&k.dir)?;
            let sig = crate::host::ignition::sign_config(cfg, &key)?;
            fs::write(dir.join("config.ign.sig"), format!("{sig}\n"))
                .context("writing keel/config.ign.sig on the ESP")?;
        }
        disk::set_times(&esp, inputs.epoch)?;
    }
    let esp_s = esp.display().to_string();
    let erofs_s = usr.erofs.display().to_string();
    let verity_s = usr.verity.display().to_string();
    let label = format!("{}_{}", def.name, def.version);
    let parts = layout::partitions(&layout::LayoutInput {
        label: &label,
        esp_dir: &esp_s,
        esp_bytes: def.esp_size.bytes(),
        usr_image: &erofs_s,
        usr_image_bytes: file_size(&usr.erofs)?,
        verity_image: &verity_s,
        verity_image_bytes: file_size(&usr.verity)?,
        slot_bytes: def.usr_size.bytes(),
        root_hash: &usr.root_hash,
    })?;
    let seed = usr::derived_uuid(&usr.content_id, "repart-seed");
    disk::write_disk(tools, &parts, &ws.work.join("repart.d"), raw, &seed)?;
    Ok(parts)
}

fn file_size(p: &Path) -> Result<u64> {
    Ok(fs::metadata(p)
        .with_context(|| format!("reading the size of {}", p.display()))?
        .len())
}

/// The trust section of the manifest: PCR 11 predictions, key fingerprints, Secure Boot certs.
fn trust_info(
    def: &Definition,
    keys: Option<&Keys>,
    pcr11: Option<Vec<crate::trust::measure::PhasePrediction>>,
) -> Result<Option<manifest::TrustInfo>> {
    let (Some(k), Some(pcr11)) = (keys, pcr11) else {
        return Ok(None);
    };
    Ok(Some(manifest::TrustInfo {
        pcr11,
        pcr_initrd_key: crate::trust::measure::key_fingerprint(&k.pcr_initrd)?,
        pcr_boot_key: crate::trust::measure::key_fingerprint(&k.pcr_boot)?,
        secure_boot_signed: true,
        without_tpm: def
            .trust
            .as_ref()
            .map(|t| t.without_tpm.as_str().to_string())
            .unwrap_or_default(),
        secure_boot: manifest::SecureBootCerts {
            owner_guid: k.owner_guid.clone(),
            pk: read_text(&k.pk_crt)?,
            kek: read_text(&k.kek_crt)?,
            db: read_text(&k.db_crt)?,
        },
    }))
}

/// sha256 and size of every file in `dir`, sorted by name (one thread per file).
fn checksums(dir: &Path) -> Result<Vec<Artifact>> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            let p = dir.join(n);
            std::thread::spawn(move || manifest::digest_file(&p))
        })
        .collect();
    let mut arts = Vec::new();
    for (n, h) in names.iter().zip(handles) {
        let (sha256, size) = h
            .join()
            .map_err(|_| anyhow::anyhow!("checksum thread panicked"))??;
        arts.push(Artifact {
            file: n.clone(),
            sha256,
            size,
        });
    }
    Ok(arts)
}

/// Writes the manifest into staging, then renames every artifact into the output directory and
/// the manifest last: a reader never sees a manifest whose files are not all whole.
/// Moves the outputs into place; with `private` (an embedded Ignition config, which may carry
/// secrets) the disk images are readable by their owner only.
fn publish(ws: &Workspace, manifest: &Manifest, private: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(
        ws.staging.join(MANIFEST_FILE),
        serde_json::to_string_pretty(manifest)? + "\n",
    )
    .context("writing manifest.json")?;
    for a in &manifest.artifacts {
        if private && (a.file.ends_with(".raw") || a.file.ends_with(".qcow2")) {
            fs::set_permissions(ws.staging.join(&a.file), fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private", a.file))?;
        }
        fs::rename(ws.staging.join(&a.file), ws.out.join(&a.file))
            .with_context(|| format!("moving {} into {}", a.file, ws.out.display()))?;
    }
    fs::rename(ws.staging.join(MANIFEST_FILE), ws.out.join(MANIFEST_FILE))
        .context("moving manifest.json into place")?;
    Ok(())
}

pub fn build(opts: &BuildOptions) -> Result<Manifest> {
    let mut stages = Stages::new(opts.quiet || opts.json);
    let inputs = load_inputs(opts, &mut stages)?;
    let (def, epoch) = (&inputs.def, inputs.epoch);
    let ws = Workspace::create(opts, &def.name)?;

    let tools = stages.run("tools tree", || ToolsTree::ensure(&ws.cache, &def.mirror))?;
    let tools = tools
        .bind(&ws.work)
        .bind(&ws.staging)
        .env("SOURCE_DATE_EPOCH", &epoch.to_string());

    let (base, kernel) = stages.run("bootstrap", || {
        ensure_base(&ws.store, &ws.cache, def, epoch, opts.rebootstrap)
    })?;
    let (commit, packages) = stages.run("compose and commit /usr", || {
        compose_usr(&ws, &tools, &inputs, &base, &kernel)
    })?;
    // Rendering depends only on the tree's content, not on the commit's parent or time.
    let content_id = ws.store.content_checksum(&commit)?;

    let usr_tree = ws.work.join("usr-render");
    stages.run("checkout /usr", || {
        ws.store.checkout(&commit, &usr_tree, None)
    })?;
    let usr_image = stages.run("erofs /usr and dm-verity", || {
        let erofs = ws.work.join("usr.erofs");
        let verity = ws.work.join("usr.verity");
        // Compressed, the image is smaller than the tree; its hash tree adds under 1%.
        let need = crate::host::space::tree_bytes(&usr_tree)?.saturating_add(256 << 20);
        crate::host::space::require(&ws.work, need, "the erofs /usr image and its hash tree")?;
        usr::make_erofs(&tools, &usr_tree, &erofs, &content_id, epoch)?;
        let root_hash = usr::make_verity(&tools, &erofs, &verity, &content_id)?;
        Ok(UsrImage {
            erofs,
            verity,
            root_hash,
            content_id: content_id.clone(),
        })
    })?;

    // The image's own keel-agent also runs first-boot provisioning in the initrd.
    let agent_bin = def
        .binaries
        .iter()
        .any(|b| b == "keel-agent")
        .then(|| usr_tree.join("bin/keel-agent"));
    let initrd_path = stages.run("initrd", || {
        initrd::build(
            &ws.cache,
            &tools,
            &ws.work,
            &initrd::InitrdInput {
                suite: &def.suite,
                mirror: &def.mirror,
                epoch,
                usr: &usr_tree,
                kernel_version: &kernel,
                modules: &def.initrd_modules,
                sealed: def.trust.as_ref().map(|t| t.without_tpm),
                agent: agent_bin.as_deref(),
            },
        )
    })?;

    let cmdline = uki::cmdline(
        &usr_image.root_hash,
        def.trust.is_some(),
        &def.kernel_cmdline,
    );
    let uki_out = ws.staging.join(format!("{}.efi", def.name));
    let pcr11 = stages.run("UKI", || {
        let sources = UkiSources {
            usr_tree: &usr_tree,
            kernel: &kernel,
            initrd: &initrd_path,
            cmdline: &cmdline,
        };
        make_uki(&ws, &tools, inputs.keys.as_ref(), &sources, &uki_out)
    })?;
    cache::remove_path(&usr_tree)?;

    let raw = ws.staging.join(format!("{}.raw", def.name));
    let parts = stages.run("disk image", || {
        // The raw image is sparse: what it holds is the ESP and slot A (the /usr image and its
        // hash tree); the qcow2 made from it holds the same again.
        let copies = if def.formats.contains(&OutputFormat::Qcow2) {
            2
        } else {
            1
        };
        let held = def
            .esp_size
            .bytes()
            .saturating_add(file_size(&usr_image.erofs)?)
            .saturating_add(file_size(&usr_image.verity)?);
        crate::host::space::require(
            &ws.staging,
            held.saturating_mul(copies).saturating_add(64 << 20),
            "the disk image",
        )?;
        disk_image(&ws, &tools, &inputs, &usr_image, &uki_out, &raw)
    })?;
    if def.formats.contains(&OutputFormat::Qcow2) {
        let qcow2 = ws.staging.join(format!("{}.qcow2", def.name));
        stages.run("qcow2", || disk::to_qcow2(&tools, &raw, &qcow2))?;
    }
    if !def.formats.contains(&OutputFormat::Raw) {
        fs::remove_file(&raw).context("removing the intermediate raw image")?;
    }

    let mut manifest = Manifest {
        format: manifest::MANIFEST_FORMAT,
        name: def.name.clone(),
        version: def.version.clone(),
        description: def.description.clone(),
        definition: opts.definition.display().to_string(),
        ostree_commit: commit,
        ostree_base_commit: base,
        ostree_repo: ws.store.path().display().to_string(),
        usr_root_hash: usr_image.root_hash.clone(),
        usr_filesystem_bytes: file_size(&usr_image.erofs)?,
        cmdline,
        kernel,
        source_date_epoch: epoch,
        uki: crate::disk::uki::factory_uki_name(&def.version),
        partitions: parts
            .iter()
            .map(|p| PartitionInfo {
                label: p.label.clone(),
                type_: p.type_.repart_type().to_string(),
                uuid: p.uuid.clone(),
                size: p.size,
            })
            .collect(),
        packages,
        trust: trust_info(def, inputs.keys.as_ref(), pcr11)?,
        artifacts: Vec::new(),
        timings: Vec::new(),
    };
    manifest.artifacts = stages.run("checksums", || checksums(&ws.staging))?;
    manifest.timings = stages.timings.clone();
    publish(&ws, &manifest, inputs.ignition.is_some())?;
    Ok(manifest)
}
