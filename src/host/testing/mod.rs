//! `keel test`: QEMU integration tests in the manner of kola. Test files in `qemu-tests/` are
//! discovered, filtered, and run against one image; results go to `report.json` next to each
//! node's console and journal.

pub mod definition;
pub mod report;
pub mod runner;
pub mod tamper;

use crate::host::cache::Cache;
use crate::manifest::Manifest;
use anyhow::{bail, Context, Result};
use report::TestResult;
use std::path::{Path, PathBuf};

/// `keel test`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    /// Test names, name prefixes (boot), globs (boot.*), scenario names or tags; default all.
    pub filters: Vec<String>,
    /// The image: a build directory or an image name (default: cluster-node-test, built first).
    #[arg(long, default_value = "cluster-node-test")]
    pub image: String,
    /// Use the existing build of an image name instead of building it.
    #[arg(long)]
    pub no_build: bool,
    /// Where tests are found.
    #[arg(long, default_value = "qemu-tests")]
    pub tests: PathBuf,
    /// Results directory (default: build/test-results/TIMESTAMP).
    #[arg(long)]
    pub results: Option<PathBuf>,
    #[arg(long, value_parser = ["kvm", "tcg"])]
    pub accel: Option<String>,
}

/// `keel test`: builds (or finds) the image, runs the selected tests, prints the summary line;
/// an error when any test failed.
pub fn command(args: &TestArgs) -> Result<()> {
    let image = crate::host::boot::resolve_image(&args.image, args.no_build)?;
    let dir = image
        .dir
        .context("keel test needs a build directory with manifest.json")?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let results = args.results.clone().unwrap_or_else(|| {
        PathBuf::from("build/test-results")
            .join(crate::host::history::utc_minute(stamp).replace([' ', ':'], "-"))
    });
    let all = run(args, &dir, &results)?;
    println!(
        "results in {} (report.json, consoles, journals)",
        results.display()
    );
    let line = report::summary(&all);
    println!("{line}");
    if all.iter().any(|r| r.result == report::Outcome::Fail) {
        bail!("{line}");
    }
    Ok(())
}

/// Runs the tests `args` selects against the build in `image_dir`; writes `report.json` into
/// `results` after each scenario.
pub fn run(args: &TestArgs, image_dir: &Path, results: &Path) -> Result<Vec<TestResult>> {
    let manifest = Manifest::find(image_dir)?;
    let raw = image_dir.join(format!("{}.raw", manifest.name));
    if !raw.exists() {
        bail!(
            "{} has no {}.raw (keel test needs the raw format in the image's formats)",
            image_dir.display(),
            manifest.name
        );
    }
    let files: Vec<_> = definition::discover(&args.tests)?
        .into_iter()
        .filter(|f| f.matches(&args.filters))
        .collect();
    if files.is_empty() {
        bail!(
            "no test in {} matches {:?}",
            args.tests.display(),
            args.filters
        );
    }
    prepare_results(results)?;
    let choice = crate::host::qemu::accel::choose(args.accel.as_deref())?;
    tracing::info!(accel = %choice.accel, "{}", choice.reason);
    let cache = Cache::from_env()?;
    let interrupted = crate::host::qemu::interrupt_flag()?;
    let ctx = runner::RunContext {
        manifest: &manifest,
        raw,
        results,
        accel: choice.accel.clone(),
        interrupted,
        cache: &cache,
    };
    let mut all: Vec<TestResult> = Vec::new();
    for f in &files {
        eprintln!(
            "== {} ({}): {}",
            f.scenario,
            f.test_names().join(", "),
            f.spec.description
        );
        let outcome = runner::run_scenario(&ctx, f)
            .with_context(|| format!("running {}", f.path.display()))?;
        for r in &outcome {
            let mark = match r.result {
                report::Outcome::Pass => "PASS",
                report::Outcome::Fail => "FAIL",
                report::Outcome::Skip => "SKIP",
            };
            eprintln!(
                "   {mark} {} ({:.0}s){}",
                r.name,
                r.duration_s,
                r.reason
                    .as_deref()
                    .map(|w| format!(": {w}"))
                    .unwrap_or_default()
            );
        }
        all.extend(outcome);
        write_report(results, &all)?;
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
    }
    Ok(all)
}

const REPORT_FILE: &str = "report.json";

/// A results directory that holds an earlier run's `report.json` is emptied first, so that
/// afterwards it holds this run's results alone: no consoles or journals of scenarios this run
/// did not boot (renamed ones, or ones a filter left out). A directory without a report is not
/// keel's to empty; it is only created when missing.
fn prepare_results(dir: &Path) -> Result<()> {
    if dir.join(REPORT_FILE).is_file() {
        tracing::info!(results = %dir.display(), "removing the previous run's results");
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .path();
            crate::host::cache::remove_path(&p)?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

pub fn write_report(dir: &Path, results: &[TestResult]) -> Result<()> {
    Ok(crate::atomic::write_json(
        &dir.join(REPORT_FILE),
        &results,
        0o644,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_runs_results_are_removed_and_other_directories_kept() {
        let t = tempfile::tempdir().expect("tmp");
        let earlier = t.path().join("earlier");
        std::fs::create_dir_all(earlier.join("two-nodes/node1")).expect("dir");
        std::fs::write(
            earlier.join("two-nodes/node1/node1.boot1.console.log"),
            "old",
        )
        .expect("log");
        write_report(&earlier, &[]).expect("report");
        prepare_results(&earlier).expect("prepare");
        assert!(earlier.is_dir());
        assert_eq!(std::fs::read_dir(&earlier).expect("read").count(), 0);

        // Not a results directory: left as it is.
        let other = t.path().join("mine");
        std::fs::create_dir_all(&other).expect("dir");
        std::fs::write(other.join("notes.txt"), "keep").expect("file");
        prepare_results(&other).expect("prepare");
        assert!(other.join("notes.txt").is_file());

        let fresh = t.path().join("new/results");
        prepare_results(&fresh).expect("prepare");
        assert!(fresh.is_dir());
    }
}
