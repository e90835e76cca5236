//! `report.json`: one entry per named test, and the closing `N passed, N failed` line.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestResult {
    pub name: String,
    pub result: Outcome,
    pub duration_s: f64,
    pub reason: Option<String>,
    /// The test file and scenario (shared VMs) it ran in.
    pub scenario: String,
    /// Boot and readiness timings measured in this test's scenario (seconds), for benchmarks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timings: BTreeMap<String, f64>,
}

pub fn summary(results: &[TestResult]) -> String {
    let count = |o: Outcome| results.iter().filter(|r| r.result == o).count();
    let (p, f, s) = (
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip),
    );
    if s > 0 {
        format!("{p} passed, {f} failed, {s} skipped")
    } else {
        format!("{p} passed, {f} failed")
    }
}

/// Parses systemd-analyze's "Startup finished in 1.2s (firmware) + 800ms (loader) + ..." line.
pub fn parse_startup(line: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Some(rest) = line.split("Startup finished in ").nth(1) else {
        return out;
    };
    let rest = rest.split('\n').next().unwrap_or("");
    let (parts, total) = match rest.split_once(" = ") {
        Some((p, t)) => (p, Some(t)),
        None => (rest, None),
    };
    for part in parts.split(" + ") {
        if let Some((value, label)) = part.trim().split_once(" (") {
            if let Some(v) = parse_span(value) {
                out.insert(label.trim_end_matches(')').to_string(), v);
            }
        }
    }
    if let Some(v) = total.and_then(|t| parse_span(t.trim().trim_end_matches('.'))) {
        out.insert("total".into(), v);
    }
    out
}

/// "1min 2.5s", "850ms", "3.1s" → seconds.
pub fn parse_span(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut any = false;
    for tok in s.split_whitespace() {
        let (num, unit): (String, String) =
            tok.chars().partition(|c| c.is_ascii_digit() || *c == '.');
        let n: f64 = num.parse().ok()?;
        total += match unit.as_str() {
            "ms" => n / 1000.0,
            "us" | "µs" => n / 1_000_000.0,
            "s" => n,
            "min" => n * 60.0,
            "h" => n * 3600.0,
            _ => return None,
        };
        any = true;
    }
    any.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line() {
        let r = |o| TestResult {
            name: "x".into(),
            result: o,
            duration_s: 1.0,
            reason: None,
            scenario: "s".into(),
            timings: BTreeMap::new(),
        };
        assert_eq!(
            summary(&[r(Outcome::Pass), r(Outcome::Fail), r(Outcome::Pass)]),
            "2 passed, 1 failed"
        );
        assert_eq!(
            summary(&[r(Outcome::Skip)]),
            "0 passed, 0 failed, 1 skipped"
        );
    }

    #[test]
    fn startup_line_is_parsed() {
        let t = parse_startup("Startup finished in 3.502s (firmware) + 1.2s (loader) + 4.1s (kernel) + 9.8s (initrd) + 1min 2.5s (userspace) = 1min 21.102s \ngraphical.target reached");
        assert_eq!(t.get("firmware"), Some(&3.502));
        assert_eq!(t.get("userspace"), Some(&62.5));
        assert_eq!(t.get("initrd"), Some(&9.8));
        assert!((t["total"] - 81.102).abs() < 1e-9);
        assert_eq!(parse_span("850ms"), Some(0.85));
    }
}
