//! Which release a node may move to: a pure function of the verified release index and what the
//! node knows about itself, so every rule is a row of a table test.
//!
//! Rules: only the node's own image; never back to or below the running version, nor below the
//! highest version this node ever blessed (its high-water mark), nor below the image's floor;
//! never a version that failed on this node or that the operator rolled back from; nothing while
//! the node is held. An operator may name a version (`keel-update apply --version`), which still
//! obeys every rule; without one the newest eligible release is chosen.

use super::release::{Release, ReleaseIndex};
use super::version::{compare, newer};
use std::cmp::Ordering;

/// What the node knows about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts<'a> {
    pub image: &'a str,
    pub running: &'a str,
    /// The highest version this node ever blessed.
    pub high_water: Option<&'a str>,
    /// Versions that failed here (or were rolled back from): never offered again.
    pub failed: &'a [String],
    /// The oldest version the node may run (image `[update] min-version`).
    pub floor: Option<&'a str>,
    pub held: bool,
}

/// Why nothing is applied (each says what to do about it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotEligible {
    #[error("the node is held at {0} (`keel-update hold --off` lets it update again)")]
    Held(String),
    #[error("the repository publishes image `{published}`, this node runs `{running}`: check [update] repository")]
    OtherImage { published: String, running: String },
    #[error("version {0} is not published in the repository")]
    NotPublished(String),
    #[error("version {version} is not newer than the running {running}: downgrades are refused (`keel-update rollback` returns to the other slot)")]
    NotNewer { version: String, running: String },
    #[error(
        "version {version} is older than {high_water}, the newest version this node has blessed"
    )]
    BelowHighWater { version: String, high_water: String },
    #[error("version {version} is older than the image's floor {floor}")]
    BelowFloor { version: String, floor: String },
    #[error("version {0} failed on this node before (see `keel-update status`); it is never offered again")]
    Failed(String),
    #[error("up to date: no published version is newer than the running {running}{}", skipped_note(.skipped))]
    UpToDate {
        running: String,
        /// Newer versions passed over, with why.
        skipped: Vec<(String, String)>,
    },
}

fn skipped_note(skipped: &[(String, String)]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    let list: Vec<String> = skipped
        .iter()
        .map(|(v, why)| format!("{v} ({why})"))
        .collect();
    format!(" that this node may take; passed over: {}", list.join(", "))
}

fn check(r: &Release, node: &NodeFacts) -> Result<(), NotEligible> {
    if node
        .failed
        .iter()
        .any(|f| crate::update::version::same(f, &r.version))
    {
        return Err(NotEligible::Failed(r.version.clone()));
    }
    if !newer(&r.version, node.running) {
        return Err(NotEligible::NotNewer {
            version: r.version.clone(),
            running: node.running.to_string(),
        });
    }
    if let Some(hw) = node.high_water {
        if compare(&r.version, hw) == Ordering::Less {
            return Err(NotEligible::BelowHighWater {
                version: r.version.clone(),
                high_water: hw.to_string(),
            });
        }
    }
    if let Some(floor) = node.floor {
        if compare(&r.version, floor) == Ordering::Less {
            return Err(NotEligible::BelowFloor {
                version: r.version.clone(),
                floor: floor.to_string(),
            });
        }
    }
    Ok(())
}

/// The release to install: `requested`, or the newest eligible one.
pub fn choose<'i>(
    index: &'i ReleaseIndex,
    node: &NodeFacts,
    requested: Option<&str>,
) -> Result<&'i Release, NotEligible> {
    if node.held {
        return Err(NotEligible::Held(node.running.to_string()));
    }
    if index.image != node.image {
        return Err(NotEligible::OtherImage {
            published: index.image.clone(),
            running: node.image.to_string(),
        });
    }
    if let Some(v) = requested {
        let r = index
            .find(v)
            .ok_or_else(|| NotEligible::NotPublished(v.to_string()))?;
        check(r, node)?;
        return Ok(r);
    }
    let mut skipped = Vec::new();
    let mut newest: Option<&Release> = None;
    for r in &index.releases {
        if !newer(&r.version, node.running) {
            continue;
        }
        match check(r, node) {
            Ok(()) => {
                if newest.is_none_or(|n| newer(&r.version, &n.version)) {
                    newest = Some(r);
                }
            }
            Err(e) => skipped.push((r.version.clone(), short(&e))),
        }
    }
    newest.ok_or(NotEligible::UpToDate {
        running: node.running.to_string(),
        skipped,
    })
}

fn short(e: &NotEligible) -> String {
    match e {
        NotEligible::Failed(_) => "failed here before".into(),
        NotEligible::BelowHighWater { high_water, .. } => format!("below blessed {high_water}"),
        NotEligible::BelowFloor { floor, .. } => format!("below floor {floor}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::release::tests::release;

    fn index(versions: &[&str]) -> ReleaseIndex {
        let mut i = ReleaseIndex::new("img");
        for v in versions {
            i.insert(release(v));
        }
        i
    }

    #[test]
    fn eligibility_table() {
        let failed_02 = vec!["0.2.0".to_string()];
        let none: Vec<String> = vec![];
        // (published, running, high-water, failed, floor, held, requested) → chosen or error
        type Row<'a> = (
            &'a [&'a str],
            &'a str,
            Option<&'a str>,
            &'a [String],
            Option<&'a str>,
            bool,
            Option<&'a str>,
            Result<&'a str, &'a str>,
        );
        let rows: &[Row] = &[
            (
                &["0.1.0", "0.2.0"],
                "0.1.0",
                None,
                &none,
                None,
                false,
                None,
                Ok("0.2.0"),
            ),
            (
                &["0.1.0", "0.2.0", "0.3.0"],
                "0.1.0",
                None,
                &none,
                None,
                false,
                None,
                Ok("0.3.0"),
            ),
            (
                &["0.1.0"],
                "0.1.0",
                None,
                &none,
                None,
                false,
                None,
                Err("up to date"),
            ),
            (
                &["0.1.0", "0.2.0"],
                "0.1.0",
                None,
                &failed_02,
                None,
                false,
                None,
                Err("passed over: 0.2.0 (failed here before)"),
            ),
            (
                &["0.2.0", "0.3.0"],
                "0.1.0",
                None,
                &failed_02,
                None,
                false,
                None,
                Ok("0.3.0"),
            ),
            (
                &["0.1.0", "0.2.0"],
                "0.1.0",
                None,
                &none,
                None,
                true,
                None,
                Err("held at 0.1.0"),
            ),
            (
                &["0.1.0", "0.2.0"],
                "0.1.0",
                None,
                &none,
                None,
                false,
                Some("0.1.0"),
                Err("not newer than the running 0.1.0"),
            ),
            (
                &["0.0.9", "0.2.0"],
                "0.1.0",
                None,
                &none,
                None,
                false,
                Some("0.0.9"),
                Err("downgrades are refused"),
            ),
            (
                &["0.1.0", "0.2.0"],
                "0.1.0",
                None,
                &none,
                None,
                false,
                Some("0.9"),
                Err("0.9 is not published"),
            ),
            (
                &["0.2.0", "0.3.0"],
                "0.1.0",
                None,
                &none,
                None,
                false,
                Some("0.2.0"),
                Ok("0.2.0"),
            ),
            (
                &["0.2.0", "0.3.0"],
                "0.1.0",
                None,
                &failed_02,
                None,
                false,
                Some("0.2.0"),
                Err("failed on this node before"),
            ),
            // Running an older slot after a rollback: never below what was blessed.
            (
                &["0.2.0", "0.3.0"],
                "0.1.0",
                Some("0.3.0"),
                &none,
                None,
                false,
                Some("0.2.0"),
                Err("older than 0.3.0, the newest version this node has blessed"),
            ),
            (
                &["0.2.0", "0.3.0"],
                "0.1.0",
                Some("0.3.0"),
                &none,
                None,
                false,
                None,
                Ok("0.3.0"),
            ),
            (
                &["0.2.0", "0.3.0"],
                "0.1.0",
                None,
                &none,
                Some("0.3.0"),
                false,
                None,
                Ok("0.3.0"),
            ),
            (
                &["0.2.0"],
                "0.1.0",
                None,
                &none,
                Some("0.3.0"),
                false,
                None,
                Err("below floor 0.3.0"),
            ),
            (
                &["0.1.0~rc1", "0.1.0"],
                "0.1.0~rc1",
                None,
                &none,
                None,
                false,
                None,
                Ok("0.1.0"),
            ),
        ];
        for (n, (published, running, hw, failed, floor, held, requested, want)) in
            rows.iter().enumerate()
        {
            let i = index(published);
            let facts = NodeFacts {
                image: "img",
                running,
                high_water: *hw,
                failed,
                floor: *floor,
                held: *held,
            };
            let got = choose(&i, &facts, *requested);
            match (got, want) {
                (Ok(r), Ok(v)) => assert_eq!(&r.version, v, "row {n}"),
                (Err(e), Err(msg)) => {
                    assert!(e.to_string().contains(msg), "row {n}: `{e}` lacks `{msg}`")
                }
                (got, want) => panic!("row {n}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn another_image_is_refused() {
        let i = index(&["0.2.0"]);
        let facts = NodeFacts {
            image: "other",
            running: "0.1.0",
            ..Default::default()
        };
        let e = choose(&i, &facts, None).expect_err("other image");
        assert!(matches!(e, NotEligible::OtherImage { .. }), "{e}");
    }

    #[test]
    fn a_failed_version_published_again_under_an_alias_is_still_failed() {
        let i = index(&["0.03.0"]);
        let failed = vec!["0.3.0".to_string()];
        let facts = NodeFacts {
            image: "img",
            running: "0.2.0",
            failed: &failed,
            ..Default::default()
        };
        let e = choose(&i, &facts, Some("0.03.0")).expect_err("alias");
        assert!(matches!(e, NotEligible::Failed(_)), "{e}");
    }
}
