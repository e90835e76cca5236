//! Writing an update repository: TUF metadata (tough's editor) and targets, laid out as
//! `metadata/` (consistent snapshots: `N.root.json`, `N.targets.json`, `N.snapshot.json`, and
//! `timestamp.json`) and `targets/` (`SHA256.NAME`), so any static server or a copied directory
//! serves it. A publish never changes a file a node may be reading: targets and versioned
//! metadata get new names, and `timestamp.json`, the one name that changes meaning, is replaced
//! last by a rename.

use super::keys::{self, sources};
use crate::update::release::{Release, ReleaseIndex, INDEX_TARGET};
use crate::update::tuf::{self, Address, Expiry};
use crate::update::{METADATA_DIR, TARGETS_DIR};
use anyhow::{anyhow, bail, Context, Result};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use tough::editor::signed::PathExists;
use tough::editor::RepositoryEditor;
use tough::schema::RoleType;
use tough::{Repository, TargetName};

/// How long each signed role stays valid (Bottlerocket's 2 weeks / 2 weeks / 1 week by default):
/// a node refuses metadata past its expiry, so the publisher re-signs before then
/// (`keel publish refresh`, e.g. daily from a timer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub targets: jiff::SignedDuration,
    pub snapshot: jiff::SignedDuration,
    pub timestamp: jiff::SignedDuration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        let days = |d: i64| jiff::SignedDuration::from_hours(24 * d);
        Lifetimes {
            targets: days(14),
            snapshot: days(14),
            timestamp: days(7),
        }
    }
}

fn tough_err(what: &str) -> impl FnOnce(tough::error::Error) -> anyhow::Error + '_ {
    move |e| anyhow!("{what}: {}", crate::error::chain(&e))
}

/// The repository as it stands (None when `repo` holds none yet), read through TUF with the
/// key directory's root as the trust anchor (expiry not enforced: refreshing an expired
/// repository is the point).
pub async fn current(repo: &Path, tuf_dir: &Path) -> Result<Option<Repository>> {
    if !repo.join(METADATA_DIR).join("timestamp.json").exists() {
        return Ok(None);
    }
    let root = std::fs::read(keys::root_json(tuf_dir))
        .with_context(|| format!("reading {}", keys::root_json(tuf_dir).display()))?;
    let store = tempfile::tempdir().context("creating a temporary metadata store")?;
    let r = tuf::load(
        &root,
        &Address::from_dir(repo)?,
        store.path(),
        Expiry::IgnoreForPublisher,
    )
    .await
    .with_context(|| {
        format!(
            "reading the repository {} with the root of {}",
            repo.display(),
            tuf_dir.display()
        )
    })?;
    Ok(Some(r))
}

/// The newest `N.root.json` of a repository's metadata.
fn newest_root(metadata: &Path) -> Result<(u64, PathBuf)> {
    let mut best = None;
    for e in
        std::fs::read_dir(metadata).with_context(|| format!("reading {}", metadata.display()))?
    {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_suffix(".root.json")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if best.as_ref().is_none_or(|(b, _)| n > *b) {
                best = Some((n, metadata.join(&name)));
            }
        }
    }
    best.with_context(|| format!("{} holds no N.root.json", metadata.display()))
}

/// Signs targets (the current ones plus `add`), snapshot and timestamp with the online keys and
/// writes them with the added targets' files. `root` is the root file the roles answer to.
async fn sign_and_write(
    repo: &Path,
    tuf_dir: &Path,
    root: &Path,
    current: Option<&Repository>,
    add: &[(String, PathBuf)],
    life: &Lifetimes,
) -> Result<u64> {
    let mut editor = RepositoryEditor::new(root)
        .await
        .map_err(tough_err("reading root.json"))?;
    let next = |v: Option<NonZeroU64>| v.map_or(NonZeroU64::MIN, |v| v.saturating_add(1));
    let (tv, sv, ts) = match current {
        Some(r) => {
            editor
                .targets(r.targets().clone())
                .map_err(tough_err("taking the current targets"))?;
            (
                next(Some(r.targets().signed.version)),
                next(Some(r.snapshot().signed.version)),
                next(Some(r.timestamp().signed.version)),
            )
        }
        None => (next(None), next(None), next(None)),
    };
    for (name, path) in add {
        let (_, target) = RepositoryEditor::build_target(path)
            .await
            .map_err(tough_err(&format!("hashing {}", path.display())))?;
        let name = TargetName::new(name.as_str()).map_err(tough_err("naming a target"))?;
        editor
            .add_target(name, target)
            .map_err(tough_err("adding a target"))?;
    }
    let now = jiff::Timestamp::now();
    let at = |d: jiff::SignedDuration| now.checked_add(d).context("expiry out of range");
    editor
        .targets_version(tv)
        .map_err(tough_err("targets version"))?
        .targets_expires(at(life.targets)?)
        .map_err(tough_err("targets expiry"))?;
    editor
        .snapshot_version(sv)
        .snapshot_expires(at(life.snapshot)?)
        .timestamp_version(ts)
        .timestamp_expires(at(life.timestamp)?);
    let signed = editor
        .sign(&sources(
            tuf_dir,
            &[RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp],
        ))
        .await
        .map_err(tough_err("signing targets, snapshot and timestamp"))?;
    let targets_dir = repo.join(TARGETS_DIR);
    std::fs::create_dir_all(&targets_dir)
        .with_context(|| format!("creating {}", targets_dir.display()))?;
    for (name, path) in add {
        let name = TargetName::new(name.as_str()).map_err(tough_err("naming a target"))?;
        signed
            .copy_target(path, &targets_dir, PathExists::Skip, Some(&name))
            .await
            .map_err(tough_err(&format!(
                "copying {} into the repository",
                path.display()
            )))?;
    }
    // Metadata: written aside, then moved in; timestamp.json last, by rename.
    let metadata = repo.join(METADATA_DIR);
    std::fs::create_dir_all(&metadata)
        .with_context(|| format!("creating {}", metadata.display()))?;
    let staging = tempfile::tempdir_in(repo).context("creating a staging directory")?;
    signed
        .write(staging.path())
        .await
        .map_err(tough_err("writing metadata"))?;
    let mut names: Vec<String> = std::fs::read_dir(staging.path())?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort_by_key(|n| n == "timestamp.json");
    for name in names {
        let (from, to) = (staging.path().join(&name), metadata.join(&name));
        if name.ends_with(".root.json") && to.exists() {
            continue;
        }
        crate::atomic::write(&to, &std::fs::read(&from)?, 0o644)
            .with_context(|| format!("writing {}", to.display()))?;
    }
    Ok(ts.get())
}

/// What `add_release` publishes: the release's index entry and its files by target name.
pub struct ReleaseFiles {
    pub image: String,
    pub release: Release,
    pub files: Vec<(String, PathBuf)>,
}

/// Adds a release to a repository (creating the repository from the key directory's root when
/// `repo` holds none): its files as targets and the updated release index.
pub async fn add_release(
    repo: &Path,
    tuf_dir: &Path,
    rel: &ReleaseFiles,
    life: &Lifetimes,
) -> Result<u64> {
    let current = current(repo, tuf_dir).await?;
    let mut index = match &current {
        Some(r) => match tuf::read_index(r).await {
            Ok(i) => i,
            Err(tuf::TufError::NoTarget(_)) => ReleaseIndex::new(&rel.image),
            Err(e) => return Err(e).context("reading the repository's release index"),
        },
        None => ReleaseIndex::new(&rel.image),
    };
    if index.image != rel.image {
        bail!(
            "{} publishes image `{}`; this build is `{}` (one repository per image)",
            repo.display(),
            index.image,
            rel.image
        );
    }
    if let (Some(r), Some(old)) = (&current, index.find(&rel.release.version)) {
        if old != &rel.release {
            bail!(
                "{} already publishes version {} with other contents; a published version is never replaced (build a new version)",
                repo.display(),
                rel.release.version
            );
        }
        let _ = r;
    }
    index.insert(rel.release.clone());
    index.check()?;
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let index_file = scratch.path().join(INDEX_TARGET);
    std::fs::write(&index_file, index.to_json())
        .with_context(|| format!("writing {}", index_file.display()))?;
    let mut add = rel.files.clone();
    add.push((INDEX_TARGET.to_string(), index_file));
    let root = match &current {
        Some(_) => newest_root(&repo.join(METADATA_DIR))?.1,
        None => keys::root_json(tuf_dir),
    };
    sign_and_write(repo, tuf_dir, &root, current.as_ref(), &add, life).await
}

/// Re-signs targets, snapshot and timestamp with new versions and expiries, nothing else
/// changed. Returns the new timestamp version.
pub async fn refresh(repo: &Path, tuf_dir: &Path, life: &Lifetimes) -> Result<u64> {
    let current = current(repo, tuf_dir).await?.with_context(|| {
        format!(
            "{} holds no repository (publish a release first)",
            repo.display()
        )
    })?;
    let root = newest_root(&repo.join(METADATA_DIR))?.1;
    sign_and_write(repo, tuf_dir, &root, Some(&current), &[], life).await
}

/// Replaces one role's key: a new key file (the old one kept as `ROLE.key.vN`), root version
/// N+1 signed by the root key (by the old and the new one when the root key itself changes),
/// written to the repository and to the key directory, then the other roles re-signed.
pub async fn rotate(repo: &Path, tuf_dir: &Path, role: RoleType, life: &Lifetimes) -> Result<u64> {
    let current = current(repo, tuf_dir).await?.with_context(|| {
        format!(
            "{} holds no repository (publish a release first)",
            repo.display()
        )
    })?;
    let old_root = current.root().signed.clone();
    let n = old_root.version.get();
    let key = keys::key_file(tuf_dir, role);
    let kept = key.with_extension(format!("key.v{n}"));
    std::fs::rename(&key, &kept)
        .with_context(|| format!("keeping {} as {}", key.display(), kept.display()))?;
    // Until the new root is in the key directory, a failure puts the old key back.
    let prepared = async {
        keys::write_new_key(&key)?;
        let new_root = keys::root_for(tuf_dir, n + 1)?;
        let also = (role == RoleType::Root).then_some((&old_root, kept.as_path()));
        keys::sign_root(new_root, tuf_dir, also).await
    }
    .await;
    let bytes = match prepared {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&key);
            let _ = std::fs::rename(&kept, &key);
            return Err(e);
        }
    };
    let in_repo = repo.join(METADATA_DIR).join(format!("{}.root.json", n + 1));
    crate::atomic::write(&in_repo, &bytes, 0o644)
        .with_context(|| format!("writing {}", in_repo.display()))?;
    crate::atomic::write(&keys::root_json(tuf_dir), &bytes, 0o644)
        .with_context(|| format!("writing {}", keys::root_json(tuf_dir).display()))?;
    sign_and_write(repo, tuf_dir, &in_repo, Some(&current), &[], life).await
}
