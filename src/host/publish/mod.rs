//! `keel publish`: releases into a signed update repository (TUF), and what keeps one alive:
//! `refresh` (re-sign before expiry), `check` (read it as a node does), `rotate-key`, and
//! `serve` (a static HTTP server for tests and small sites). See docs/updates.md.

pub mod keys;
pub mod repo;
pub mod serve;

use crate::disk::{gpt, slot, uki, verity};
use crate::manifest::Manifest;
use crate::update::release::Release;
use crate::update::tuf::{self, Address, Expiry};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use repo::{Lifetimes, ReleaseFiles};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PublishArgs {
    #[command(subcommand)]
    pub command: Option<PublishCommand>,
    /// A build directory (`keel build --out DIR`) to publish as a release.
    pub build: Option<PathBuf>,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Debug, Args, Clone)]
pub struct RepoArgs {
    /// The repository directory (created on first publish).
    #[arg(long)]
    pub repo: Option<PathBuf>,
    /// The operator's key directory; its tuf/ holds the repository keys.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Days until targets.json expires.
    #[arg(long, default_value_t = 14)]
    pub targets_days: i64,
    /// Days until snapshot.json expires.
    #[arg(long, default_value_t = 14)]
    pub snapshot_days: i64,
    /// Hours until timestamp.json expires (a node refuses metadata older than this: the freeze
    /// window). Negative values exist for tests of that refusal.
    #[arg(long, default_value_t = 7 * 24, allow_negative_numbers = true)]
    pub timestamp_hours: i64,
}

impl RepoArgs {
    fn lifetimes(&self) -> Lifetimes {
        let h = jiff::SignedDuration::from_hours;
        Lifetimes {
            targets: h(self.targets_days * 24),
            snapshot: h(self.snapshot_days * 24),
            timestamp: h(self.timestamp_hours),
        }
    }
    fn repo(&self) -> Result<&Path> {
        self.repo
            .as_deref()
            .context("--repo DIR is required: the repository directory")
    }
    fn tuf(&self) -> Result<PathBuf> {
        let k = self
            .keys
            .as_deref()
            .context("--keys DIR is required: the key directory whose tuf/ signs the repository")?;
        let t = keys::tuf_dir(k);
        if !t.is_dir() {
            bail!(
                "{} has no repository keys; add them with `keel keys add-update-keys {}`",
                k.display(),
                k.display()
            );
        }
        Ok(t)
    }
}

#[derive(Debug, Subcommand)]
pub enum PublishCommand {
    /// Re-sign targets, snapshot and timestamp with fresh expiry times (run it at least as often
    /// as --timestamp-hours, e.g. daily from a timer).
    Refresh(RepoArgs),
    /// Read the repository as a node would (signatures, versions, expiry) and list its releases.
    Check {
        #[command(flatten)]
        repo: RepoArgs,
        /// Fail when any role expires within this many days.
        #[arg(long, default_value_t = 0)]
        expiring_within: i64,
    },
    /// Replace one role's key (root, targets, snapshot or timestamp): a new root version that
    /// nodes follow, signed by the root key (old and new when the root key changes).
    RotateKey {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        role: String,
    },
    /// Serve a repository directory over HTTP (GET and HEAD, byte ranges), for tests and small
    /// sites; any static web server does the same.
    Serve(serve::ServeArgs),
}

pub fn command(a: PublishArgs) -> Result<()> {
    let rt = tuf::runtime()?;
    match a.command {
        None => {
            let build = a
                .build
                .context("name a build directory to publish, or a subcommand (see --help)")?;
            let repo = a.repo.repo()?;
            let tuf_dir = a.repo.tuf()?;
            let scratch = tempfile::tempdir().context("creating a scratch directory")?;
            let rel = release_from_build(&build, scratch.path())?;
            let version = rel.release.version.clone();
            let ts = rt.block_on(repo::add_release(repo, &tuf_dir, &rel, &a.repo.lifetimes()))?;
            println!(
                "published {} {version} to {} (timestamp version {ts}, expires in {} h)",
                rel.image,
                repo.display(),
                a.repo.timestamp_hours
            );
        }
        Some(PublishCommand::Refresh(r)) => {
            let ts = rt.block_on(repo::refresh(r.repo()?, &r.tuf()?, &r.lifetimes()))?;
            println!("re-signed {} (timestamp version {ts})", r.repo()?.display());
        }
        Some(PublishCommand::Check {
            repo,
            expiring_within,
        }) => rt.block_on(check(&repo, expiring_within))?,
        Some(PublishCommand::RotateKey { repo, role }) => {
            let r = match role.as_str() {
                "root" => tough::schema::RoleType::Root,
                "targets" => tough::schema::RoleType::Targets,
                "snapshot" => tough::schema::RoleType::Snapshot,
                "timestamp" => tough::schema::RoleType::Timestamp,
                other => bail!("--role {other}: one of root, targets, snapshot, timestamp"),
            };
            let ts = rt.block_on(repo::rotate(
                repo.repo()?,
                &repo.tuf()?,
                r,
                &repo.lifetimes(),
            ))?;
            println!(
                "rotated the {role} key; {} now holds a new root (nodes follow it) and timestamp version {ts}; rebuild images to embed the new root.json",
                repo.repo()?.display()
            );
        }
        Some(PublishCommand::Serve(s)) => serve::run(&s)?,
    }
    Ok(())
}

async fn check(r: &RepoArgs, expiring_within: i64) -> Result<()> {
    let repo_dir = r.repo()?;
    let tuf_dir = r.tuf()?;
    let root = std::fs::read(keys::root_json(&tuf_dir))
        .with_context(|| format!("reading {}", keys::root_json(&tuf_dir).display()))?;
    let store = tempfile::tempdir()?;
    let repo = tuf::load(
        &root,
        &Address::from_dir(repo_dir)?,
        store.path(),
        Expiry::Enforce,
    )
    .await
    .with_context(|| format!("checking {}", repo_dir.display()))?;
    let index = tuf::read_index(&repo).await?;
    println!("image {}: {} release(s)", index.image, index.releases.len());
    for rel in &index.releases {
        let size = tuf::target_length(&repo, &rel.usr)?
            + tuf::target_length(&repo, &rel.verity)?
            + tuf::target_length(&repo, &rel.uki)?;
        println!(
            "  {}  root hash {}  {size} bytes",
            rel.version, rel.root_hash
        );
    }
    let limit = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(24 * expiring_within))
        .context("--expiring-within out of range")?;
    let mut soon = Vec::new();
    for (role, at) in [
        ("root", repo.root().signed.expires),
        ("targets", repo.targets().signed.expires),
        ("snapshot", repo.snapshot().signed.expires),
        ("timestamp", repo.timestamp().signed.expires),
    ] {
        println!("  {role} expires {at}");
        if at <= limit {
            soon.push(role);
        }
    }
    if !soon.is_empty() {
        bail!(
            "{} expire(s) within {expiring_within} days: run `keel publish refresh` (or `rotate-key --role root` for root)",
            soon.join(", ")
        );
    }
    Ok(())
}

fn copy_prefix(raw: &Path, offset: u64, len: u64, dest: &Path) -> Result<()> {
    let mut f = std::fs::File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut out =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let n = std::io::copy(&mut f.take(len), &mut out)
        .with_context(|| format!("copying from {}", raw.display()))?;
    if n != len {
        bail!("{}: {n} of {len} bytes at offset {offset}", raw.display());
    }
    out.flush()?;
    Ok(())
}

/// A build's release files: /usr and its hash tree cut from slot A of the raw image (and checked
/// against each other and the manifest's root hash), the UKI (whose `usrhash=` must be that root
/// hash), and the manifest.
pub fn release_from_build(build: &Path, scratch: &Path) -> Result<ReleaseFiles> {
    let m = Manifest::load(&build.join("manifest.json"))?;
    let trust = m.trust.as_ref().with_context(|| {
        format!(
            "{}: the image is not signed ([trust] in its definition); only signed images can be published",
            build.display()
        )
    })?;
    // systemd-boot picks among boot entries by version with its own order, which agrees with
    // the one keel-update uses (dpkg's) for digits, dots and `~`, not for letters or `^`.
    if !m
        .version
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'~')
    {
        bail!(
            "{}: version {} has letters or `^`: published versions are digits, dots and `~` only, so that the boot loader and keel-update order releases the same way",
            build.display(),
            m.version
        );
    }
    let raw = build.join(format!("{}.raw", m.name));
    let (_, parts) = gpt::read(&raw)?;
    let (data, hash) = slot::by_root_hash(&parts, &m.usr_root_hash)
        .with_context(|| format!("reading slot A of {}", raw.display()))?;
    let base = format!("{}_{}", m.name, m.version);
    let usr = scratch.join(format!("{base}.usr"));
    copy_prefix(&raw, data.offset, m.usr_filesystem_bytes, &usr)?;
    let mut head = vec![0u8; 4096];
    let mut f = std::fs::File::open(&raw)?;
    f.seek(SeekFrom::Start(hash.offset))?;
    f.read_exact(&mut head)?;
    let sb = verity::Superblock::parse(&head)
        .with_context(|| format!("the verity partition of {}", raw.display()))?;
    let hash_len = verity::hash_device_bytes(&sb);
    if sb.data_bytes() != m.usr_filesystem_bytes || hash_len > hash.size {
        bail!(
            "{}: the verity superblock covers {} bytes, the manifest says /usr is {}",
            raw.display(),
            sb.data_bytes(),
            m.usr_filesystem_bytes
        );
    }
    let verity_file = scratch.join(format!("{base}.verity"));
    copy_prefix(&raw, hash.offset, hash_len, &verity_file)?;
    let tree = std::fs::read(&verity_file)?;
    let mut usr_reader = std::io::BufReader::new(std::fs::File::open(&usr)?);
    let root = verity::check(&mut usr_reader, &tree)
        .with_context(|| format!("checking slot A of {} against its hash tree", raw.display()))?;
    if root != m.usr_root_hash {
        bail!(
            "{}: /usr hashes to {root}, the manifest says {}",
            raw.display(),
            m.usr_root_hash
        );
    }
    let uki_path = build.join(format!("{}.efi", m.name));
    let uki_bytes =
        std::fs::read(&uki_path).with_context(|| format!("reading {}", uki_path.display()))?;
    let view = uki::read(&uki_path.display().to_string(), &uki_bytes)?;
    if uki::usrhash(&view.cmdline).as_deref() != Some(m.usr_root_hash.as_str()) {
        bail!(
            "{}: its command line's usrhash= is not the manifest's root hash {}",
            uki_path.display(),
            m.usr_root_hash
        );
    }
    let release = Release {
        version: m.version.clone(),
        root_hash: m.usr_root_hash.clone(),
        usr: format!("{base}.usr"),
        verity: format!("{base}.verity"),
        uki: format!("{base}.efi"),
        manifest: format!("{base}.manifest.json"),
        pcr_initrd_key: trust.pcr_initrd_key.clone(),
    };
    Ok(ReleaseFiles {
        image: m.name.clone(),
        files: vec![
            (release.usr.clone(), usr),
            (release.verity.clone(), verity_file),
            (release.uki.clone(), uki_path),
            (release.manifest.clone(), build.join("manifest.json")),
        ],
        release,
    })
}
