//! A check: the repository read through TUF from the image's trusted root (metadata kept in the
//! node's store, so a replayed or frozen mirror is refused), the verified release index, and
//! the policy's answer for this node.

use super::node::{Node, Running};
use super::state::Record;
use crate::update::policy::{self, NodeFacts, NotEligible};
use crate::update::release::{Release, ReleaseIndex};
use crate::update::tuf::{self, Address, Expiry};
use anyhow::{Context, Result};

/// What a check found.
pub struct Found {
    pub repo: tough::Repository,
    pub index: ReleaseIndex,
    /// The release to install, or why none.
    pub choice: Result<Release, NotEligible>,
}

/// The repository address in force: `--repository`, else the node's or image's setting.
pub fn address(node: &Node, over: Option<&str>) -> Result<Address> {
    let cfg = node.config()?;
    let url = match over {
        Some(u) => u.to_string(),
        None => cfg.repository.clone().context(
            "no update repository: the image's [update] names none and /etc/keel/update.toml sets no `repository`",
        )?,
    };
    Ok(Address::parse(&url)?)
}

pub async fn check(
    node: &Node,
    address: &Address,
    running: &Running,
    rec: &Record,
    requested: Option<&str>,
) -> Result<Found> {
    let root = node.trusted_root()?;
    let store = node.tuf_store();
    // A clock behind the newest time seen in signed metadata is refused (TufError::ClockBackward
    // says how to go on once an operator has checked the clock), synchronised or not.
    let repo = tuf::load(&root, address, &store, Expiry::Enforce)
        .await
        .with_context(|| format!("checking {}", address.base))?;
    let index = tuf::read_index(&repo)
        .await
        .context("reading the release index")?;
    let failed = rec.failed_versions();
    let cfg = node.config()?;
    let facts = NodeFacts {
        image: &running.image,
        running: &running.version,
        high_water: rec.high_water.as_deref(),
        failed: &failed,
        floor: cfg.min_version.as_deref(),
        held: rec.held,
    };
    let choice = policy::choose(&index, &facts, requested).cloned();
    Ok(Found {
        repo,
        index,
        choice,
    })
}
