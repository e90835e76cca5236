//! `keel test`: QEMU integration tests in the manner of kola. Test files in `qemu-tests/` are
//! discovered, filtered, and run against one image; results go to `report.json` next to each
//! node's console and journal.

pub mod definition;
pub mod lanes;
pub mod report;
pub mod runner;
pub mod tamper;
pub mod timing;

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
    /// Scenarios run side by side (default: one per two cores); each VM gets the machine's
    /// cores divided by this many vCPUs, at least one.
    #[arg(long)]
    pub jobs: Option<usize>,
    /// vCPUs per VM (default: the machine's cores divided by --jobs). More vCPUs than cores
    /// lets a VM that is alone use every core while the other lane waits.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Print the suite's wall time against this many minutes, and the slowest scenarios.
    #[arg(long)]
    pub budget: Option<u64>,
}

/// `keel test`: builds (or finds) the image, runs the selected tests, prints the summary line;
/// an error when any test failed.
pub fn command(args: &TestArgs) -> Result<()> {
    // The run's helpers come from a copy of this binary (target/release/keel may be rebuilt
    // while the suite runs).
    let pinned = crate::host::tools::pin_keel_exe(
        &Cache::from_env()?
            .dir()
            .join(format!("bin/keel-test-{}", std::process::id())),
    )?;
    let outcome = command_pinned(args);
    if let Some(dir) = pinned.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    outcome
}

fn command_pinned(args: &TestArgs) -> Result<()> {
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

/// Runs the tests `args` selects against the build in `image_dir`; writes `report.json` (in
/// the files' order) and `timings.json` into `results` after each scenario.
pub fn run(args: &TestArgs, image_dir: &Path, results: &Path) -> Result<Vec<TestResult>> {
    let started = std::time::Instant::now();
    let manifest = Manifest::find(image_dir)?;
    let raw = image_dir.join(format!("{}.raw", manifest.name));
    if !raw.exists() {
        bail!(
            "{} has no {}.raw (keel test needs the raw format in the image's formats)",
            image_dir.display(),
            manifest.name
        );
    }
    let files = queue(definition::select(
        definition::discover(&args.tests)?,
        &args.filters,
    ));
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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Two vCPUs per VM: under TCG on this project's 2-core machine a 1-vCPU VM booted about
    // 1.5 times slower than a 2-vCPU one, and two 1-vCPU lanes side by side gained nothing
    // (docs/testing.md). One lane per two cores, then.
    let lanes = args.jobs.unwrap_or((cores / 2).max(1)).max(1);
    let cpus = args
        .vcpus
        .unwrap_or_else(|| u32::try_from((cores / lanes).max(1)).unwrap_or(1))
        .max(1);
    eprintln!(
        "keel test: {} scenario(s), {lanes} side by side, {cpus} vCPU(s) per VM ({})",
        files.len(),
        choice.accel
    );
    let cache = Cache::from_env()?;
    let interrupted = crate::host::qemu::interrupt_flag()?;
    let states = std::sync::Mutex::new(std::collections::BTreeMap::new());
    let build_lock = std::sync::Mutex::new(());
    let ctx = runner::RunContext {
        manifest: &manifest,
        raw,
        results,
        accel: choice.accel.clone(),
        interrupted,
        cache: &cache,
        cpus,
        states: &states,
        build_lock: &build_lock,
    };
    let jobs: Vec<lanes::Job> = files
        .iter()
        .map(|f| lanes::Job {
            exclusive: f.spec.exclusive,
            needs: f.spec.start.clone(),
            saves: f.spec.saves.clone(),
        })
        .collect();
    let finished: std::sync::Mutex<Vec<Option<Outcome>>> =
        std::sync::Mutex::new(vec![None; files.len()]);
    let outcomes = lanes::run(
        &jobs,
        lanes,
        interrupted,
        |j, lane| scenario_outcome(&ctx, &files[j], lane),
        |j, lane, (tests, times)| {
            print_scenario(&files[j], lane, tests);
            if let Ok(mut f) = finished.lock() {
                f[j] = Some((tests.clone(), times.clone()));
                let done: Vec<_> = f.iter().flatten().cloned().collect();
                let all: Vec<TestResult> = done.iter().flat_map(|(t, _)| t.clone()).collect();
                let times: Vec<_> = done.into_iter().map(|(_, t)| t).collect();
                if let Err(e) =
                    write_report(results, &all).and_then(|_| write_times(results, &times))
                {
                    tracing::warn!("could not write the report: {e:#}");
                }
            }
        },
    );
    let mut all = Vec::new();
    let mut times = Vec::new();
    for (tests, t) in outcomes.into_iter().flatten() {
        all.extend(tests);
        times.push(t);
    }
    // The saved states (a disk and a memory image each) serve this run only.
    if let Err(e) = crate::host::cache::remove_path(&results.join("saved-states")) {
        tracing::warn!("could not remove the saved states: {e:#}");
    }
    eprint!("{}", timing::table(&times));
    if let Some(minutes) = args.budget {
        eprintln!(
            "{}",
            timing::budget_line(
                started.elapsed(),
                std::time::Duration::from_secs(minutes * 60),
                &times
            )
        );
    }
    Ok(all)
}

/// A scenario's test results and times.
type Outcome = (Vec<TestResult>, timing::ScenarioTimes);

/// The order scenarios are taken in: those that run alone first (they use the whole machine
/// before the lanes fill), then those that save a state (others wait for them), then the rest in
/// file order.
fn queue(mut files: Vec<definition::TestFile>) -> Vec<definition::TestFile> {
    files.sort_by_key(|f| (!f.spec.exclusive, f.spec.saves.is_none()));
    files
}

/// One scenario's results and times; a scenario that could not run at all fails each of its
/// tests with the reason.
fn scenario_outcome(
    ctx: &runner::RunContext,
    file: &definition::TestFile,
    lane: usize,
) -> (Vec<TestResult>, timing::ScenarioTimes) {
    eprintln!(
        "== {} ({}): {} [lane {}]",
        file.scenario,
        file.test_names().join(", "),
        file.spec.description,
        lane + 1
    );
    match runner::run_scenario(ctx, file) {
        Ok(mut run) => {
            run.times.lane = lane;
            (run.results, run.times)
        }
        Err(e) => {
            let why = format!("running {}: {e:#}", file.path.display());
            let tests = file
                .test_names()
                .into_iter()
                .map(|name| TestResult {
                    name,
                    result: report::Outcome::Fail,
                    duration_s: 0.0,
                    reason: Some(why.clone()),
                    scenario: file.path.display().to_string(),
                    timings: Default::default(),
                })
                .collect();
            let times = timing::ScenarioTimes {
                scenario: file.scenario.clone(),
                lane,
                ..Default::default()
            };
            (tests, times)
        }
    }
}

/// A scenario's lines, printed together when it ends.
fn print_scenario(file: &definition::TestFile, lane: usize, tests: &[TestResult]) {
    let mut out = format!("== {} done [lane {}]\n", file.scenario, lane + 1);
    for r in tests {
        let mark = match r.result {
            report::Outcome::Pass => "PASS",
            report::Outcome::Fail => "FAIL",
            report::Outcome::Skip => "SKIP",
        };
        out.push_str(&format!(
            "   {mark} {} ({:.0}s){}\n",
            r.name,
            r.duration_s,
            r.reason
                .as_deref()
                .map(|w| format!(": {w}"))
                .unwrap_or_default()
        ));
    }
    eprint!("{out}");
}

fn write_times(dir: &Path, times: &[timing::ScenarioTimes]) -> Result<()> {
    Ok(crate::atomic::write_json(
        &dir.join("timings.json"),
        &times,
        0o644,
    )?)
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
