//! Reading an update repository through TUF (the `tough` crate), as a node does and as
//! `keel publish check` does: metadata verified from the trusted root up (root rotations
//! followed, versions never going back, expiry enforced, snapshot binding targets), the release
//! index read as a verified target, and targets streamed to files whose length and sha256 TUF
//! checks before the file gets its final name.

use super::release::{IndexError, ReleaseIndex, INDEX_TARGET};
use super::{METADATA_DIR, TARGETS_DIR};
use futures::StreamExt;
use std::io::Write;
use std::path::{Path, PathBuf};
use tough::{ExpirationEnforcement, Repository, RepositoryLoader, TargetName};
use url::Url;

/// Why a repository or a target was refused, each with what an operator can do.
#[derive(Debug, thiserror::Error)]
pub enum TufError {
    #[error("{url}: not a repository address: {message}")]
    Address { url: String, message: String },
    #[error("the repository's {role} metadata has expired (a frozen or unmaintained mirror): the node keeps its version until the publisher runs `keel publish refresh`; {detail}")]
    Expired { role: String, detail: String },
    #[error("the repository offers older {role} metadata (version {offered}) than this node already trusted (version {trusted}): a replayed or rolled-back mirror; refused")]
    Older {
        role: String,
        trusted: u64,
        offered: u64,
    },
    #[error("the system clock is behind the newest time this node saw in update metadata; refusing until the clock is correct (is NTP synchronised?). If the clock is right and once ran ahead, `keel-update check --clock-is-right` forgets that time: {0}")]
    ClockBackward(String),
    #[error("target {target}: its bytes do not match the length or sha256 the signed metadata gives; nothing of it is kept: {detail}")]
    Target { target: String, detail: String },
    #[error("target {0} is not in the repository's signed targets")]
    NoTarget(String),
    #[error("the repository's metadata does not verify (signatures, versions or hashes between roles): {0}")]
    Metadata(String),
    #[error("cannot reach the repository at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

/// A repository's address, with the metadata and targets directories below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub base: Url,
}

impl Address {
    /// `http://…/`, `https://…/` or `file:///…/` (a directory, for air-gapped sites).
    pub fn parse(s: &str) -> Result<Address, TufError> {
        let with_slash = if s.ends_with('/') {
            s.to_string()
        } else {
            format!("{s}/")
        };
        let base = Url::parse(&with_slash).map_err(|e| TufError::Address {
            url: s.into(),
            message: e.to_string(),
        })?;
        if !matches!(base.scheme(), "http" | "https" | "file") {
            return Err(TufError::Address {
                url: s.into(),
                message: "the scheme must be http, https or file".into(),
            });
        }
        Ok(Address { base })
    }

    pub fn from_dir(dir: &Path) -> Result<Address, TufError> {
        let abs = std::path::absolute(dir).map_err(|e| TufError::File {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = Url::from_directory_path(&abs).map_err(|()| TufError::Address {
            url: abs.display().to_string(),
            message: "not an absolute directory".into(),
        })?;
        Ok(Address { base })
    }

    fn join(&self, dir: &str) -> Result<Url, TufError> {
        self.base
            .join(&format!("{dir}/"))
            .map_err(|e| TufError::Address {
                url: self.base.to_string(),
                message: e.to_string(),
            })
    }
}

/// Turns tough's error into the refusal an operator reads.
fn classify(e: tough::error::Error, url: &str) -> TufError {
    use tough::error::Error as E;
    let detail = e.to_string();
    // tough reports a fetched file whose bytes differ from what the signed metadata says as a
    // transport error; it is the mirror's lie, not an unreachable mirror.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(E::HashMismatch { .. } | E::MaxSizeExceeded { .. }) = c.downcast_ref::<E>() {
            return TufError::Metadata(detail);
        }
        cause = c.source();
    }
    match e {
        E::ExpiredMetadata { role, .. } => TufError::Expired {
            role: role.to_string(),
            detail,
        },
        E::OlderMetadata {
            role,
            current_version,
            new_version,
            ..
        } => TufError::Older {
            role: role.to_string(),
            trusted: current_version,
            offered: new_version,
        },
        E::SystemTimeSteppedBackward { .. } => TufError::ClockBackward(detail),
        E::Transport { .. } => TufError::Unreachable {
            url: url.to_string(),
            detail,
        },
        _ => TufError::Metadata(detail),
    }
}

/// A single-threaded runtime for tough's async API (the programs around it are synchronous).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// How strictly expiry is enforced: always for nodes; the publisher may read its own expired
/// repository to refresh it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Enforce,
    /// Only `keel publish` on the publisher's own repository.
    IgnoreForPublisher,
}

/// The root to start from: the newer of the trusted root given (the image's) and the root the
/// store kept from an earlier load (tough writes it there only after verifying it from the
/// given root up). Starting from the stored one keeps a rotation in force when a mirror later
/// hides the newer roots (else the retired keys of the image's root would be trusted again), and
/// keeps the stored timestamp and snapshot, and with them the replay check, valid.
pub fn starting_root(given: &[u8], datastore: &Path) -> Vec<u8> {
    let version = |b: &[u8]| {
        serde_json::from_slice::<tough::schema::Signed<tough::schema::Root>>(b)
            .ok()
            .map(|r| r.signed.version.get())
    };
    match std::fs::read(datastore.join("root.json")) {
        Ok(stored) if version(&stored) > version(given) => stored,
        _ => given.to_vec(),
    }
}

/// Downloads of a whole /usr take minutes on slow links: a generous limit per request, retries.
fn http() -> tough::HttpTransport {
    tough::HttpTransportBuilder::new()
        .connect_timeout(std::time::Duration::from_secs(30))
        .timeout(std::time::Duration::from_secs(3600))
        .tries(4)
        .build()
}

/// Loads a repository: `root` is the trusted root.json (the image's, or the key directory's);
/// `datastore` keeps the newest metadata seen (and the latest time), so replays are caught
/// across runs.
pub async fn load(
    root: &[u8],
    address: &Address,
    datastore: &Path,
    expiry: Expiry,
) -> Result<Repository, TufError> {
    let (metadata, targets) = (address.join(METADATA_DIR)?, address.join(TARGETS_DIR)?);
    std::fs::create_dir_all(datastore).map_err(|e| TufError::File {
        path: datastore.to_path_buf(),
        message: format!("creating the metadata store: {e}"),
    })?;
    let root = starting_root(root, datastore);
    let mut loader =
        RepositoryLoader::new(&root, metadata.clone(), targets).datastore(datastore.to_path_buf());
    if address.base.scheme() != "file" {
        loader = loader.transport(http());
    }
    if expiry == Expiry::IgnoreForPublisher {
        loader = loader.expiration_enforcement(ExpirationEnforcement::Unsafe);
    }
    loader
        .load()
        .await
        .map_err(|e| classify(e, metadata.as_str()))
}

/// Forgets the latest time the store saw (`latest_known_time.json`): for a node whose clock is
/// synchronised again after it once ran ahead, which would otherwise refuse every load as a
/// clock stepped backwards until that time came.
pub fn forget_latest_time(datastore: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(datastore.join("latest_known_time.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn target_name(name: &str) -> Result<TargetName, TufError> {
    TargetName::new(name).map_err(|e| TufError::Metadata(format!("target name {name}: {e}")))
}

/// Reads a whole (small) verified target into memory.
pub async fn read_small(repo: &Repository, name: &str, limit: u64) -> Result<Vec<u8>, TufError> {
    let t = target_name(name)?;
    let listed = repo
        .targets()
        .signed
        .targets
        .get(&t)
        .ok_or_else(|| TufError::NoTarget(name.into()))?;
    if listed.length > limit {
        return Err(TufError::Target {
            target: name.into(),
            detail: format!("{} bytes listed, at most {limit} expected", listed.length),
        });
    }
    let mut stream = repo
        .read_target(&t)
        .await
        .map_err(|e| classify(e, "the repository's targets"))?
        .ok_or_else(|| TufError::NoTarget(name.into()))?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| TufError::Target {
            target: name.into(),
            detail: crate::error::chain(&e),
        })?;
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The verified release index.
pub async fn read_index(repo: &Repository) -> Result<ReleaseIndex, TufError> {
    let bytes = read_small(repo, INDEX_TARGET, 4 << 20).await?;
    Ok(ReleaseIndex::parse(&bytes)?)
}

/// The length TUF lists for a target.
pub fn target_length(repo: &Repository, name: &str) -> Result<u64, TufError> {
    let t = target_name(name)?;
    repo.targets()
        .signed
        .targets
        .get(&t)
        .map(|t| t.length)
        .ok_or_else(|| TufError::NoTarget(name.into()))
}

/// Streams a target into `dest` (through `dest.part`, renamed only once TUF verified every byte;
/// a failure removes the part). `progress` gets the bytes written so far.
pub async fn save(
    repo: &Repository,
    name: &str,
    dest: &Path,
    mut progress: impl FnMut(u64),
) -> Result<u64, TufError> {
    let t = target_name(name)?;
    let part = dest.with_extension("part");
    let file_err = |path: &Path, e: std::io::Error| TufError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut stream = repo
        .read_target(&t)
        .await
        .map_err(|e| classify(e, "the repository's targets"))?
        .ok_or_else(|| TufError::NoTarget(name.into()))?;
    let mut f = std::fs::File::create(&part).map_err(|e| file_err(&part, e))?;
    let mut written = 0u64;
    let result: Result<(), TufError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| TufError::Target {
                target: name.into(),
                detail: crate::error::chain(&e),
            })?;
            f.write_all(&chunk).map_err(|e| file_err(&part, e))?;
            written += chunk.len() as u64;
            progress(written);
        }
        f.sync_all().map_err(|e| file_err(&part, e))
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, dest).map_err(|e| file_err(dest, e))?;
    Ok(written)
}
