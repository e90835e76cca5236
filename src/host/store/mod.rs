//! The versioned store: an OSTree repository holding every base tree and every image's /usr
//! tree as commits. Builds record their commit in the manifest; `keel log` walks an image's ref,
//! `keel diff` compares two commits.
//!
//! Checkouts are hardlinks into the repository (bare mode, fast); callers must replace files,
//! never write through them (see `compose::overlay::replace_file`).

use anyhow::{anyhow, bail, Context, Result};
use ostree::gio;
use ostree::glib;
use ostree::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Commit metadata key holding keel's JSON record of a build.
const META_KEY: &str = "keel.build";

/// What keel records in every image commit (read back by `keel log` and `keel diff`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitRecord {
    pub format: u32,
    pub name: String,
    pub version: String,
    pub kernel: String,
    pub packages: Vec<crate::host::compose::dpkg::Package>,
}

/// One entry of `keel log`.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub commit: String,
    pub parent: Option<String>,
    pub timestamp: u64,
    pub subject: String,
    pub record: Option<CommitRecord>,
}

/// What to commit and how to label it.
#[derive(Debug, Clone, Copy)]
pub struct CommitRequest<'a> {
    /// The directory whose contents become the commit root.
    pub dir: &'a Path,
    pub ref_: &'a str,
    pub parent: Option<&'a str>,
    pub subject: &'a str,
    pub record: Option<&'a CommitRecord>,
    /// Commit timestamp (SOURCE_DATE_EPOCH), so equal trees give equal commits.
    pub time: u64,
}

pub struct Store {
    repo: ostree::Repo,
    path: PathBuf,
}

/// Ref of an image's build history.
pub fn image_ref(name: &str) -> String {
    format!("keel/image/{name}")
}

/// Ref of a cached base tree.
pub fn base_ref(key: &str) -> String {
    format!("keel/base/{key}")
}

fn gerr(e: glib::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl Store {
    /// Opens the repository at `path`, creating it (bare mode) when missing.
    pub fn open_or_create(path: &Path) -> Result<Store> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let repo = ostree::Repo::new_for_path(path);
        if path.join("config").exists() {
            repo.open(gio::Cancellable::NONE)
                .map_err(gerr)
                .with_context(|| format!("opening OSTree repository {}", path.display()))?;
        } else {
            repo.create(ostree::RepoMode::Bare, gio::Cancellable::NONE)
                .map_err(gerr)
                .with_context(|| format!("creating OSTree repository {}", path.display()))?;
        }
        Ok(Store {
            repo,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing repository (for `keel log`/`diff`); errors if there is none.
    pub fn open(path: &Path) -> Result<Store> {
        if !path.join("config").exists() {
            bail!("{} is not a keel store (no OSTree repository): build an image first, or pass --repo", path.display());
        }
        Self::open_or_create(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The commit a ref or commit prefix names, if any.
    pub fn resolve(&self, rev: &str) -> Result<Option<String>> {
        let r = self
            .repo
            .resolve_rev_ext(rev, true, ostree::RepoResolveRevExtFlags::NONE)
            .map_err(gerr)
            .with_context(|| format!("resolving {rev}"))?;
        if let Some(c) = r {
            return Ok(Some(c.to_string()));
        }
        // A unique prefix of a commit checksum.
        if rev.len() >= 6 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
            let objects = self.path.join("objects").join(&rev[..2]);
            if let Ok(entries) = std::fs::read_dir(&objects) {
                let mut hits: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".commit") && n.starts_with(&rev[2..]))
                    .map(|n| format!("{}{}", &rev[..2], n.trim_end_matches(".commit")))
                    .collect();
                if hits.len() == 1 {
                    return Ok(hits.pop());
                }
            }
        }
        Ok(None)
    }

    /// Checks `commit` out at `dest` (must not exist) as hardlinks, filling `devino` so that a
    /// later commit of the same tree only hashes what changed.
    pub fn checkout(
        &self,
        commit: &str,
        dest: &Path,
        devino: Option<&ostree::RepoDevInoCache>,
    ) -> Result<()> {
        let parent = dest
            .parent()
            .context("checkout destination has no parent")?;
        let name = dest
            .file_name()
            .context("checkout destination has no name")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let dir =
            std::fs::File::open(parent).with_context(|| format!("opening {}", parent.display()))?;
        let opts = ostree::RepoCheckoutAtOptions {
            mode: ostree::RepoCheckoutMode::None,
            overwrite_mode: ostree::RepoCheckoutOverwriteMode::None,
            no_copy_fallback: false,
            devino_to_csum_cache: devino.cloned(),
            ..Default::default()
        };
        use std::os::fd::AsRawFd;
        self.repo
            .checkout_at(
                Some(&opts),
                dir.as_raw_fd(),
                Path::new(name),
                commit,
                gio::Cancellable::NONE,
            )
            .map_err(gerr)
            .with_context(|| format!("checking out {commit} to {}", dest.display()))
    }

    /// Commits the directory `dir` (its contents become the commit root) and points `ref_` at it.
    /// `time` is the commit timestamp (SOURCE_DATE_EPOCH), so equal trees give equal commits.
    pub fn commit_dir(
        &self,
        req: &CommitRequest,
        devino: Option<&ostree::RepoDevInoCache>,
    ) -> Result<String> {
        let CommitRequest {
            dir,
            ref_,
            parent,
            subject,
            record,
            time,
        } = *req;
        let metadata = glib::VariantDict::new(None);
        if let Some(r) = record {
            metadata.insert(META_KEY, serde_json::to_string(r)?);
        }
        let metadata = metadata.end();
        let txn = self
            .repo
            .auto_transaction(gio::Cancellable::NONE)
            .map_err(gerr)
            .context("starting an OSTree transaction")?;
        let mtree = ostree::MutableTree::new();
        let modifier = ostree::RepoCommitModifier::new(ostree::RepoCommitModifierFlags::NONE, None);
        if let Some(cache) = devino {
            modifier.set_devino_cache(cache);
        }
        self.repo
            .write_directory_to_mtree(
                &gio::File::for_path(dir),
                &mtree,
                Some(&modifier),
                gio::Cancellable::NONE,
            )
            .map_err(gerr)
            .with_context(|| format!("committing {}", dir.display()))?;
        let root = self
            .repo
            .write_mtree(&mtree, gio::Cancellable::NONE)
            .map_err(gerr)
            .context("writing the tree")?;
        let root = root
            .downcast::<ostree::RepoFile>()
            .map_err(|_| anyhow!("OSTree returned a tree root that is not a RepoFile"))?;
        let checksum = self
            .repo
            .write_commit_with_time(
                parent,
                Some(subject),
                None,
                Some(&metadata),
                &root,
                time,
                gio::Cancellable::NONE,
            )
            .map_err(gerr)
            .context("writing the commit")?;
        self.repo
            .transaction_set_ref(None, ref_, Some(checksum.as_str()));
        txn.commit(gio::Cancellable::NONE)
            .map_err(gerr)
            .context("finishing the OSTree transaction")?;
        Ok(checksum.to_string())
    }

    /// Subject, parent, timestamp and keel record of a commit.
    pub fn entry(&self, commit: &str) -> Result<LogEntry> {
        let (variant, _) = self
            .repo
            .load_commit(commit)
            .map_err(gerr)
            .with_context(|| format!("loading commit {commit}"))?;
        let meta = glib::VariantDict::new(Some(&variant.child_value(0)));
        let record = meta
            .lookup_value(META_KEY, None)
            .and_then(|v| v.str().map(|s| s.to_string()))
            .map(|s| serde_json::from_str::<CommitRecord>(&s))
            .transpose()
            .with_context(|| format!("reading keel metadata of {commit}"))?;
        let subject = variant.child_value(3).str().unwrap_or_default().to_string();
        Ok(LogEntry {
            commit: commit.to_string(),
            parent: ostree::commit_get_parent(&variant).map(|s| s.to_string()),
            timestamp: ostree::commit_get_timestamp(&variant),
            subject,
            record,
        })
    }

    /// A checksum of the commit's tree content and metadata only (not its parent or time): two
    /// commits of the same tree share it.
    pub fn content_checksum(&self, commit: &str) -> Result<String> {
        let (variant, _) = self
            .repo
            .load_commit(commit)
            .map_err(gerr)
            .with_context(|| format!("loading commit {commit}"))?;
        ostree::commit_get_content_checksum(&variant)
            .map(|s| s.to_string())
            .with_context(|| format!("commit {commit} has no content checksum"))
    }

    /// The history of `ref_`, newest first (stops where parents were pruned).
    pub fn log(&self, ref_: &str) -> Result<Vec<LogEntry>> {
        let mut out = Vec::new();
        let mut next = self.resolve(ref_)?;
        while let Some(c) = next {
            let e = match self.entry(&c) {
                Ok(e) => e,
                Err(_) if !out.is_empty() => break,
                Err(e) => return Err(e),
            };
            next = e.parent.clone();
            out.push(e);
        }
        Ok(out)
    }

    /// Every image ref in the store (`keel/image/NAME`), sorted.
    pub fn image_refs(&self) -> Result<Vec<String>> {
        let refs = self
            .repo
            .list_refs(Some("keel/image"), gio::Cancellable::NONE)
            .map_err(gerr)
            .context("listing refs")?;
        let mut names: Vec<String> = refs.keys().map(|k| format!("keel/image/{k}")).collect();
        names.sort();
        Ok(names)
    }

    /// Path → content identity of every file, symlink and directory in a commit.
    pub fn file_index(&self, commit: &str) -> Result<BTreeMap<String, String>> {
        let (root, _) = self
            .repo
            .read_commit(commit, gio::Cancellable::NONE)
            .map_err(gerr)
            .with_context(|| format!("reading commit {commit}"))?;
        let mut out = BTreeMap::new();
        walk(&root, "", &mut out)?;
        Ok(out)
    }
}

fn walk(dir: &gio::File, prefix: &str, out: &mut BTreeMap<String, String>) -> Result<()> {
    let children = dir
        .enumerate_children(
            "standard::name,standard::type,standard::symlink-target,unix::mode",
            gio::FileQueryInfoFlags::NOFOLLOW_SYMLINKS,
            gio::Cancellable::NONE,
        )
        .map_err(gerr)?;
    while let Some(info) = children.next_file(gio::Cancellable::NONE).map_err(gerr)? {
        let name = info.name().to_string_lossy().into_owned();
        let path = format!("{prefix}/{name}");
        let child = dir.child(&name);
        let mode = info.attribute_uint32("unix::mode");
        match info.file_type() {
            gio::FileType::Directory => {
                out.insert(path.clone(), format!("dir {mode:o}"));
                walk(&child, &path, out)?;
            }
            gio::FileType::SymbolicLink => {
                let target = info
                    .symlink_target()
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                out.insert(path, format!("link {target}"));
            }
            _ => {
                let rf = child
                    .downcast::<ostree::RepoFile>()
                    .map_err(|_| anyhow!("{path}: not a repository file"))?;
                rf.ensure_resolved().map_err(gerr)?;
                out.insert(path, format!("file {mode:o} {}", rf.checksum()));
            }
        }
    }
    Ok(())
}

/// Files added, removed and modified between two file indexes.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct FileDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modified: Vec<String>,
}

pub fn diff_files(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> FileDiff {
    let mut d = FileDiff::default();
    for (p, id) in b {
        match a.get(p) {
            None => d.added.push(p.clone()),
            Some(old) if old != id && !id.starts_with("dir ") => d.modified.push(p.clone()),
            _ => {}
        }
    }
    d.removed = a.keys().filter(|p| !b.contains_key(*p)).cloned().collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn commit_checkout_log_and_diff_round_trip() {
        let t = tempfile::tempdir().expect("tempdir");
        let store = Store::open_or_create(&t.path().join("repo")).expect("repo");
        let tree = t.path().join("tree");
        fs::create_dir_all(tree.join("lib")).expect("mkdir");
        fs::write(tree.join("lib/a"), "one").expect("write");
        fs::write(tree.join("b"), "two").expect("write");
        let rec = CommitRecord {
            format: 1,
            name: "x".into(),
            version: "1".into(),
            kernel: "k".into(),
            packages: vec![],
        };
        let c1 = store
            .commit_dir(
                &CommitRequest {
                    dir: &tree,
                    ref_: &image_ref("x"),
                    parent: None,
                    subject: "x 1",
                    record: Some(&rec),
                    time: 0,
                },
                None,
            )
            .expect("commit");
        // Same tree, same time: same commit.
        let again = store
            .commit_dir(
                &CommitRequest {
                    dir: &tree,
                    ref_: "other",
                    parent: None,
                    subject: "x 1",
                    record: Some(&rec),
                    time: 0,
                },
                None,
            )
            .expect("commit");
        assert_eq!(c1, again);

        let cache = ostree::RepoDevInoCache::new();
        let co = t.path().join("co");
        store.checkout(&c1, &co, Some(&cache)).expect("checkout");
        assert_eq!(fs::read_to_string(co.join("lib/a")).expect("read"), "one");
        crate::host::compose::overlay::replace_file(&co.join("b"), b"changed", 0o644)
            .expect("replace");
        fs::write(co.join("c"), "new").expect("write");
        fs::remove_file(co.join("lib/a")).expect("rm");
        let c2 = store
            .commit_dir(
                &CommitRequest {
                    dir: &co,
                    ref_: &image_ref("x"),
                    parent: Some(&c1),
                    subject: "x 2",
                    record: Some(&rec),
                    time: 1,
                },
                Some(&cache),
            )
            .expect("commit");

        let log = store.log(&image_ref("x")).expect("log");
        assert_eq!(
            log.iter().map(|e| e.commit.clone()).collect::<Vec<_>>(),
            vec![c2.clone(), c1.clone()]
        );
        assert_eq!(log[0].record.as_ref().map(|r| r.name.as_str()), Some("x"));
        assert_eq!(store.resolve(&c2[..10]).expect("resolve"), Some(c2.clone()));

        let d = diff_files(
            &store.file_index(&c1).expect("index"),
            &store.file_index(&c2).expect("index"),
        );
        assert_eq!(d.added, vec!["/c"]);
        assert_eq!(d.removed, vec!["/lib/a"]);
        assert_eq!(d.modified, vec!["/b"]);
        assert_eq!(store.image_refs().expect("refs"), vec!["keel/image/x"]);
    }
}
