//! `keel log` and `keel diff`: the builds recorded in the OSTree store, and what changed between
//! two of them (packages and files).

use crate::host::build;
use crate::host::cache::Cache;
use crate::host::compose::dpkg;
use crate::host::store::{self, Store};
use crate::manifest::Manifest;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// `keel log`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Only this image's builds.
    pub name: Option<String>,
    #[arg(long)]
    pub repo: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// `keel diff`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DiffArgs {
    /// A commit (or unique prefix), a ref, a build directory or a manifest.json.
    pub a: String,
    pub b: String,
    #[arg(long)]
    pub repo: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn repo_or_default(repo: Option<PathBuf>) -> Result<PathBuf> {
    match repo {
        Some(r) => Ok(r),
        None => Ok(build::default_repo(&Cache::from_env()?)),
    }
}

/// A commit named by a ref, commit prefix, build directory or manifest.
fn resolve_build(store: &Store, spec: &str) -> Result<String> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(Manifest::find(p)?.ostree_commit);
    }
    let as_ref = store::image_ref(spec);
    for candidate in [spec, as_ref.as_str()] {
        if let Some(c) = store.resolve(candidate)? {
            return Ok(c);
        }
    }
    anyhow::bail!("`{spec}` names no build: give a commit (or a unique prefix from `keel log`), an image name, a build directory or a manifest.json")
}

/// `keel log`.
pub fn log(args: LogArgs) -> Result<()> {
    let LogArgs { name, repo, json } = args;
    let store = Store::open(&repo_or_default(repo)?)?;
    let refs = match name {
        Some(n) => vec![store::image_ref(&n)],
        None => store.image_refs()?,
    };
    let mut all = Vec::new();
    for r in refs {
        all.extend(
            store
                .log(&r)
                .with_context(|| format!("reading history of {r}"))?,
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no builds recorded in {}", store.path().display());
    } else {
        for e in &all {
            let when = utc_minute(e.timestamp);
            let pkgs = e.record.as_ref().map_or(0, |r| r.packages.len());
            println!(
                "{}  {}  {:<28} {pkgs} packages",
                &e.commit[..12],
                when,
                e.subject
            );
        }
    }
    Ok(())
}

/// `keel diff`.
pub fn diff(args: DiffArgs) -> Result<()> {
    let DiffArgs { a, b, repo, json } = args;
    let store = Store::open(&repo_or_default(repo)?)?;
    let ca = resolve_build(&store, &a)?;
    let cb = resolve_build(&store, &b)?;
    let ra = store.entry(&ca)?.record.unwrap_or_else(empty_record);
    let rb = store.entry(&cb)?.record.unwrap_or_else(empty_record);
    let pkgs = dpkg::diff(&ra.packages, &rb.packages);
    let files = store::diff_files(&store.file_index(&ca)?, &store.file_index(&cb)?);
    if json {
        let v = serde_json::json!({"from": ca, "to": cb, "packages": pkgs, "files": files});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("from {ca}\nto   {cb}");
        for p in &pkgs.added {
            println!("package + {} {}", p.name, p.version);
        }
        for p in &pkgs.removed {
            println!("package - {} {}", p.name, p.version);
        }
        for (n, o, v) in &pkgs.changed {
            println!("package ~ {n} {o} -> {v}");
        }
        for f in &files.added {
            println!("file + /usr{f}");
        }
        for f in &files.removed {
            println!("file - /usr{f}");
        }
        for f in &files.modified {
            println!("file ~ /usr{f}");
        }
        println!(
            "{} packages added, {} removed, {} changed; {} files added, {} removed, {} modified",
            pkgs.added.len(),
            pkgs.removed.len(),
            pkgs.changed.len(),
            files.added.len(),
            files.removed.len(),
            files.modified.len()
        );
    }
    Ok(())
}

fn empty_record() -> store::CommitRecord {
    store::CommitRecord {
        format: 1,
        name: String::new(),
        version: String::new(),
        kernel: String::new(),
        packages: vec![],
    }
}

/// UTC date and time of a Unix timestamp (`YYYY-MM-DD HH:MM`), without a date library.
pub fn utc_minute(ts: u64) -> String {
    let days = (ts / 86_400) as i64;
    let secs = ts % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        (secs % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00");
        assert_eq!(utc_minute(build::DEFAULT_EPOCH), "2025-01-01 00:00");
        assert_eq!(utc_minute(1_709_210_096), "2024-02-29 12:34");
    }
}
