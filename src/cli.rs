//! Command-line interface: argument structs (clap derive) and dispatch into the library.

use crate::build::{self, BuildOptions};
use crate::cache::Cache;
use crate::compose::dpkg;
use crate::inspect;
use crate::manifest::Manifest;
use crate::store::{self, Store};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Debug, Parser)]
#[command(name = "keel", version, about = "Build, boot and test a trusted, immutable cluster OS", long_about = None)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Build a disk image from an image definition (images/NAME.toml).
    Build(BuildArgs),
    /// Show an image's partitions, UKI sections, command line and /usr root hash.
    Inspect {
        /// A .raw image, a UKI (.efi) or a build output directory.
        image: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List builds recorded in the store.
    Log {
        /// Only this image's builds.
        name: Option<String>,
        #[arg(long)]
        repo: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show packages and files that changed between two builds.
    Diff {
        /// A commit (or unique prefix), a ref, a build directory or a manifest.json.
        a: String,
        b: String,
        #[arg(long)]
        repo: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Internal: run a command inside the tools tree.
    #[command(name = "__sandbox", hide = true)]
    Sandbox {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        bind: Vec<PathBuf>,
        #[arg(long)]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        argv: Vec<OsString>,
    },
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The image definition (default: images/cluster-node.toml).
    #[arg(default_value = "images/cluster-node.toml")]
    pub definition: PathBuf,
    /// Output directory (default: build/NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The OSTree store (default: ~/.cache/keel/repo).
    #[arg(long)]
    pub repo: Option<PathBuf>,
    /// Bootstrap the package tree again instead of using the cached one.
    #[arg(long)]
    pub rebootstrap: bool,
    /// Print the manifest as JSON when done.
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

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Commands::Build(a) => {
            let m = build::build(&BuildOptions {
                definition: a.definition,
                out: a.out.clone(),
                repo: a.repo,
                rebootstrap: a.rebootstrap,
                quiet: a.json,
            })?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                let out = a.out.unwrap_or_else(|| build::default_out(&m.name));
                println!("built {} {} in {}", m.name, m.version, out.display());
                println!("  commit     {}", m.ostree_commit);
                println!("  usr hash   {}", m.usr_root_hash);
                println!("  /usr       {} MiB erofs", m.usr_filesystem_bytes >> 20);
                for art in &m.artifacts {
                    println!("  {:<22} {:>6} MiB  sha256 {}", art.file, art.size >> 20, &art.sha256[..16]);
                }
                let total: f64 = m.timings.iter().map(|t| t.seconds).sum();
                println!("  total      {total:.1}s");
            }
            Ok(())
        }
        Commands::Inspect { image, json } => {
            let i = inspect::inspect(&image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print!("{}", inspect::render_text(&i));
            }
            Ok(())
        }
        Commands::Log { name, repo, json } => {
            let store = Store::open(&repo_or_default(repo)?)?;
            let refs = match name {
                Some(n) => vec![store::image_ref(&n)],
                None => store.image_refs()?,
            };
            let mut all = Vec::new();
            for r in refs {
                all.extend(store.log(&r).with_context(|| format!("reading history of {r}"))?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no builds recorded in {}", store.path().display());
            } else {
                for e in &all {
                    let when = chrono_like(e.timestamp);
                    let pkgs = e.record.as_ref().map_or(0, |r| r.packages.len());
                    println!("{}  {}  {:<28} {pkgs} packages", &e.commit[..12], when, e.subject);
                }
            }
            Ok(())
        }
        Commands::Diff { a, b, repo, json } => {
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
                    pkgs.added.len(), pkgs.removed.len(), pkgs.changed.len(), files.added.len(), files.removed.len(), files.modified.len()
                );
            }
            Ok(())
        }
        Commands::Sandbox { root, bind, env, argv } => {
            let env: Vec<(String, String)> = env
                .iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .collect();
            crate::tools::sandbox::exec_in(&root, &bind, &env, &argv)
        }
    }
}

fn empty_record() -> store::CommitRecord {
    store::CommitRecord { format: 1, name: String::new(), version: String::new(), kernel: String::new(), packages: vec![] }
}

/// UTC date and time of a Unix timestamp (`YYYY-MM-DD HH:MM`), without a date library.
pub fn chrono_like(ts: u64) -> String {
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
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", secs / 3600, (secs % 3600) / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(chrono_like(0), "1970-01-01 00:00");
        assert_eq!(chrono_like(crate::build::DEFAULT_EPOCH), "2025-01-01 00:00");
        assert_eq!(chrono_like(1_709_210_096), "2024-02-29 12:34");
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
