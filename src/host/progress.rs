//! Stage progress: a spinner with the elapsed time on a terminal, log lines otherwise; every
//! stage's duration is recorded for the manifest.

use indicatif::{ProgressBar, ProgressStyle};

use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub use crate::manifest::StageTiming;

#[derive(Debug, Default)]
pub struct Stages {
    pub timings: Vec<StageTiming>,
    quiet: bool,
}

impl Stages {
    pub fn new(quiet: bool) -> Self {
        Stages {
            timings: Vec::new(),
            quiet,
        }
    }

    /// Runs one named stage, showing progress and recording how long it took.
    pub fn run<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        let bar = if !self.quiet && std::io::stderr().is_terminal() {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_message(name.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            Some(b)
        } else {
            tracing::info!(stage = name, "started");
            None
        };
        let result = f();
        let secs = start.elapsed().as_secs_f64();
        if let Some(b) = bar {
            let mark = if result.is_ok() { "done" } else { "FAILED" };
            b.finish_with_message(format!("{name}: {mark} in {secs:.1}s"));
        } else {
            tracing::info!(
                stage = name,
                seconds = format!("{secs:.1}"),
                ok = result.is_ok(),
                "finished"
            );
        }
        self.timings.push(StageTiming {
            stage: name.to_string(),
            seconds: (secs * 10.0).round() / 10.0,
        });
        result
    }
}
