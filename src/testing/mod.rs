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
    std::fs::create_dir_all(&opts.results)
        .with_context(|| format!("creating {}", opts.results.display()))?;
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

pub fn write_report(dir: &Path, results: &[TestResult]) -> Result<()> {
    let path = dir.join("report.json");
    let tmp = dir.join(".report.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}
