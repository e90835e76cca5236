//! `keel test`: QEMU integration tests in the manner of kola. Test files in `qemu-tests/` are
//! discovered, filtered, and run against one image; results go to `report.json` next to each
//! node's console and journal.

pub mod definition;
pub mod esp;
pub mod report;
pub mod runner;
pub mod tamper;

use crate::cache::Cache;
use crate::manifest::Manifest;
use anyhow::{bail, Context, Result};
use report::TestResult;
use std::path::{Path, PathBuf};

pub struct TestOptions {
    /// Build output directory of the image under test.
    pub image_dir: PathBuf,
    pub tests_dir: PathBuf,
    pub filters: Vec<String>,
    pub results: PathBuf,
    pub accel: Option<String>,
}

/// Runs the selected tests; writes `report.json` after each scenario.
pub fn run(opts: &TestOptions) -> Result<Vec<TestResult>> {
    let manifest = Manifest::find(&opts.image_dir)?;
    let raw = opts.image_dir.join(format!("{}.raw", manifest.name));
    if !raw.exists() {
        bail!(
            "{} has no {}.raw (keel test needs the raw format in the image's formats)",
            opts.image_dir.display(),
            manifest.name
        );
    }
    let files: Vec<_> = definition::discover(&opts.tests_dir)?
        .into_iter()
        .filter(|f| f.matches(&opts.filters))
        .collect();
    if files.is_empty() {
        bail!(
            "no test in {} matches {:?}",
            opts.tests_dir.display(),
            opts.filters
        );
    }
    prepare_results(&opts.results)?;
    let choice = crate::qemu::accel::choose(opts.accel.as_deref())?;
    tracing::info!(accel = %choice.accel, "{}", choice.reason);
    let cache = Cache::from_env()?;
    let interrupted = crate::qemu::interrupt_flag()?;
    let ctx = runner::RunContext {
        manifest: &manifest,
        raw,
        results: &opts.results,
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
        let results = runner::run_scenario(&ctx, f)
            .with_context(|| format!("running {}", f.path.display()))?;
        for r in &results {
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
        all.extend(results);
        write_report(&opts.results, &all)?;
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
            crate::cache::remove_path(&p)?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

pub fn write_report(dir: &Path, results: &[TestResult]) -> Result<()> {
    let path = dir.join(REPORT_FILE);
    let tmp = dir.join(format!(".{REPORT_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
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
