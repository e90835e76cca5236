//! `keel bench`: the typed half of `scripts/bench`. The script drives the peers and the VMs and
//! times what only it can see; this reads what the runs wrote (keel's own `--json` manifests,
//! disk images, console logs, the lines the benchmark scenarios print) and prints `key=value`
//! lines for the results file.

use crate::disk::{gpt, PartitionType};
use crate::image::Definition;
use crate::manifest::Manifest;
use crate::node::agent::containers::Timings;
use anyhow::{bail, Context, Result};
use regex::Regex;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// The packages of an image definition, comma-separated (a peer builds the same set).
    Packages { definition: PathBuf },
    /// A number from a build's manifest (`keel build --json` or manifest.json): the /usr file
    /// system's bytes, or with --stage the seconds a build stage took (0 when it did not run).
    Manifest {
        manifest: PathBuf,
        #[arg(long)]
        stage: Option<String>,
    },
    /// Start and size, in 512-byte sectors, of a partition of a disk image: the first /usr
    /// partition with --usr, else the largest.
    Partition {
        image: PathBuf,
        #[arg(long)]
        usr: bool,
    },
    /// From a console log's kernel timestamps: kernel start to /init, /init to the real root's
    /// systemd, and the initramfs unpacking, in seconds ("none" where a line is missing).
    Console { log: PathBuf },
    /// Medians of the agent benchmark's rounds ("agent round=N ..." and "crun round=N ..." lines).
    Agent {
        rounds: PathBuf,
        /// Put before every key (e.g. `native_`).
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// etcd's `check perf` and the overlay-against-underlay rounds of the cluster benchmark.
    Cluster { results: PathBuf },
    /// Received Gbit/s from `iperf3 -J` output on stdin.
    Iperf3,
    /// The first address (without its prefix length) of a CNI plugin's result on stdin.
    CniAddress,
    /// The median of the numbers given, to two decimals.
    Median { values: Vec<f64> },
}

pub fn command(c: BenchCommand) -> Result<()> {
    let lines = match c {
        BenchCommand::Packages { definition } => {
            vec![Definition::load(&definition)?.packages.join(",")]
        }
        BenchCommand::Manifest { manifest, stage } => {
            let m: Manifest = serde_json::from_str(&read(&manifest)?)
                .with_context(|| format!("{}: not a keel manifest", manifest.display()))?;
            vec![match stage {
                Some(s) => stage_seconds(&m, &s).to_string(),
                None => m.usr_filesystem_bytes.to_string(),
            }]
        }
        BenchCommand::Partition { image, usr } => {
            let (_, parts) = gpt::read(&image)?;
            let p = if usr {
                parts.iter().find(|p| p.is(PartitionType::Usr))
            } else {
                parts.iter().max_by_key(|p| p.size)
            }
            .with_context(|| format!("{}: no such partition", image.display()))?;
            vec![format!("{} {}", p.offset / 512, p.size / 512)]
        }
        BenchCommand::Console { log } => {
            let bytes = fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
            vec![kernel_spans(&String::from_utf8_lossy(&bytes))?.to_string()]
        }
        BenchCommand::Agent { rounds, prefix } => agent_summary(&read(&rounds)?, &prefix)
            .with_context(|| format!("summarising {}", rounds.display()))?,
        BenchCommand::Cluster { results } => cluster_summary(&read(&results)?)?,
        BenchCommand::Iperf3 => vec![format!("{}", iperf3_gbit(&stdin()?)?)],
        BenchCommand::CniAddress => vec![cni_address(&stdin()?)?],
        BenchCommand::Median { values } => {
            if values.is_empty() {
                bail!("median of nothing: give at least one number");
            }
            vec![format!("{:.2}", median(values))]
        }
    };
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

fn read(p: &Path) -> Result<String> {
    fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

fn stdin() -> Result<String> {
    std::io::read_to_string(std::io::stdin()).context("reading standard input")
}

/// iperf3's JSON report: only what the benchmark reads.
#[derive(serde::Deserialize)]
struct Iperf3Report {
    end: Iperf3End,
}

#[derive(serde::Deserialize)]
struct Iperf3End {
    sum_received: Iperf3Sum,
}

#[derive(serde::Deserialize)]
struct Iperf3Sum {
    bits_per_second: f64,
}

fn iperf3_gbit(json: &str) -> Result<f64> {
    let r: Iperf3Report = serde_json::from_str(json).context("iperf3 -J output")?;
    Ok(r.end.sum_received.bits_per_second / 1e9)
}

/// A CNI plugin's ADD result (CNI spec 1.0): only its addresses.
#[derive(serde::Deserialize)]
struct CniResult {
    ips: Vec<CniIp>,
}

#[derive(serde::Deserialize)]
struct CniIp {
    address: ipnet::IpNet,
}

fn cni_address(json: &str) -> Result<String> {
    let r: CniResult = serde_json::from_str(json).context("a CNI result")?;
    let ip = r.ips.first().context("the CNI result has no address")?;
    Ok(ip.address.addr().to_string())
}

fn stage_seconds(m: &Manifest, stage: &str) -> f64 {
    m.timings
        .iter()
        .find(|t| t.stage == stage)
        .map_or(0.0, |t| t.seconds)
}

fn re(pattern: &str) -> Result<Regex> {
    Regex::new(pattern).with_context(|| format!("pattern {pattern}"))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => xs[n / 2],
        _ => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// Kernel-side spans of one boot, in seconds.
#[derive(Debug, PartialEq)]
struct KernelSpans {
    kernel_to_init: Option<f64>,
    initrd: Option<f64>,
    unpack: Option<f64>,
}

impl std::fmt::Display for KernelSpans {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let show = |v: Option<f64>| v.map_or("none".to_string(), |v| format!("{v:.1}"));
        write!(
            f,
            "{} {} {}",
            show(self.kernel_to_init),
            show(self.initrd),
            show(self.unpack)
        )
    }
}

/// From the kernel's own timestamps, which firmware and host noise do not touch: kernel start to
/// /init, /init to the real root's systemd (its last "running in system mode" line: keel's initrd
/// runs systemd too, Debian's initramfs-tools does not), and the kernel's unpacking of the
/// initramfs.
fn kernel_spans(console: &str) -> Result<KernelSpans> {
    let stamps = |what: &str| -> Result<Vec<f64>> {
        Ok(re(&format!(r"\[\s*(\d+\.\d+)\][^\n]*{what}"))?
            .captures_iter(console)
            .filter_map(|c| c[1].parse().ok())
            .collect())
    };
    let init = stamps("Run /init as init process")?;
    let real = stamps("running in system mode")?;
    let unpack = stamps("Trying to unpack rootfs image as initramfs")?;
    let freed = stamps("Freeing initrd memory")?;
    let both = |a: &[f64], b: Option<&f64>| a.first().zip(b).map(|(a, b)| b - a);
    Ok(KernelSpans {
        kernel_to_init: init.first().copied(),
        initrd: both(&init, real.last()),
        unpack: both(&unpack, freed.first()),
    })
}

/// One round of the agent benchmark: milliseconds from request to the container's first line.
struct AgentRound {
    total: f64,
    timings: Timings,
}

#[derive(serde::Deserialize)]
struct AgentRun {
    timings: Timings,
}

fn agent_summary(text: &str, prefix: &str) -> Result<Vec<String>> {
    use std::collections::BTreeMap;
    let line = re(r"^(agent|crun) round=(\d+) request=([\d.]+) start=([\d.]+)(?: json=(.*))?$")?;
    let mut agent: BTreeMap<u32, AgentRound> = BTreeMap::new();
    let mut crun: BTreeMap<u32, f64> = BTreeMap::new();
    for l in text.lines() {
        let Some(c) = line.captures(l.trim()) else {
            continue;
        };
        let round: u32 = c[2].parse()?;
        let total = (c[4].parse::<f64>()? - c[3].parse::<f64>()?) * 1000.0;
        if &c[1] == "agent" {
            let json = c.get(5).map_or("", |m| m.as_str());
            let run: AgentRun = serde_json::from_str(json)
                .with_context(|| format!("round {round}: keel-agent's --json output"))?;
            agent.insert(
                round,
                AgentRound {
                    total,
                    timings: run.timings,
                },
            );
        } else {
            crun.insert(round, total);
        }
    }
    let rounds: Vec<(&AgentRound, f64)> = agent
        .iter()
        .filter_map(|(r, a)| crun.get(r).map(|c| (a, *c)))
        .collect();
    if rounds.is_empty() {
        bail!("no round has both an agent and a crun line");
    }
    let med =
        |f: fn(&AgentRound, f64) -> f64| median(rounds.iter().map(|(a, c)| f(a, *c)).collect());
    let mut out = vec![format!("{prefix}agent_rounds={}", rounds.len())];
    type Phase = fn(&AgentRound, f64) -> f64;
    let phases: [(&str, Phase); 7] = [
        ("agent_total", |a, _| a.total),
        ("agent_gate", |a, _| a.timings.gate_ms),
        ("agent_verify", |a, _| a.timings.verify_ms),
        ("agent_unpack", |a, _| a.timings.unpack_ms),
        ("agent_start", |a, _| a.timings.start_ms),
        ("crun_by_hand", |_, c| c),
        ("agent_overhead", |a, c| a.total - c),
    ];
    for (name, f) in phases {
        out.push(format!("{prefix}{name}_ms_median={:.1}", med(f)));
    }
    for ((r, a), c) in agent
        .iter()
        .filter_map(|(r, a)| crun.get(r).map(|c| ((r, a), c)))
    {
        let t = &a.timings;
        out.push(format!(
            "{prefix}round{r}: agent {:.1} ms (gate {:.1}, verify {:.1}, unpack {:.1}, start {:.1}), crun {c:.1} ms",
            a.total, t.gate_ms, t.verify_ms, t.unpack_ms, t.start_ms
        ));
    }
    Ok(out)
}

fn cluster_summary(text: &str) -> Result<Vec<String>> {
    let writes = re(r"(\d+) writes/s")?
        .captures(text)
        .map_or("n/a".to_string(), |c| c[1].to_string());
    let mut out = vec![format!("etcd_check_perf_s_writes_per_s={writes}")];
    let perf = re(r"^(PASS|FAIL|Slowest|Stddev|Throughput)")?;
    for l in text.lines().map(str::trim).filter(|l| perf.is_match(l)) {
        out.push(format!("etcd_check_perf: {l}"));
    }
    for backend in ["vxlan", "wireguard"] {
        let round = re(&format!(
            r"{backend} round=\d+ underlay_mbit=([\d.]+) overlay_mbit=([\d.]+)"
        ))?;
        let (under, over): (Vec<f64>, Vec<f64>) = round
            .captures_iter(text)
            .filter_map(|c| Some((c[1].parse::<f64>().ok()?, c[2].parse::<f64>().ok()?)))
            .unzip();
        if under.is_empty() {
            out.push(format!("{backend}=no result"));
            continue;
        }
        let (u, o) = (median(under), median(over));
        out.push(format!(
            "{backend}_underlay_mbit_median={u:.0} {backend}_overlay_mbit_median={o:.0} {backend}_ratio={:.0}%",
            100.0 * o / u
        ));
        let rtt = re(&format!(
            r"{backend} rtt underlay_ms=([\d.]+) overlay_ms=([\d.]+)"
        ))?;
        if let Some(c) = rtt.captures(text) {
            out.push(format!(
                "{backend}_rtt_underlay_ms={} {backend}_rtt_overlay_ms={}",
                &c[1], &c[2]
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_spans_from_a_console() {
        let console = "[    0.812345] Trying to unpack rootfs image as initramfs...\n\
                       [    1.400000] Freeing initrd memory: 30000K\n\
                       [    2.100000] Run /init as init process\n\
                       [    2.300000] systemd[1]: systemd 257 running in system mode (+PAM)\n\
                       [    9.120000] systemd[1]: systemd 257 running in system mode (+PAM)\n";
        let s = kernel_spans(console).unwrap();
        assert_eq!(s.to_string(), "2.1 7.0 0.6");
        assert_eq!(
            kernel_spans("nothing").unwrap().to_string(),
            "none none none"
        );
    }

    #[test]
    fn agent_medians_pair_rounds() {
        let json = |g: f64| {
            format!(
                r#"{{"name":"b","timings":{{"gate_ms":{g},"verify_ms":2.0,"unpack_ms":3.0,"start_ms":4.0}}}}"#
            )
        };
        let text = format!(
            "agent round=1 request=10.000 start=10.100 json={}\n\
             crun round=1 request=20.000 start=20.050\n\
             agent round=2 request=30.000 start=30.300 json={}\n\
             crun round=2 request=40.000 start=40.070\n\
             agent round=3 request=50.000 start=50.200 json={}\n\
             noise line\n",
            json(1.0),
            json(3.0),
            json(9.0)
        );
        let out = agent_summary(&text, "x_").unwrap();
        // Round 3 has no crun line: two rounds, medians of two values.
        assert_eq!(out[0], "x_agent_rounds=2");
        assert!(
            out.contains(&"x_agent_total_ms_median=200.0".to_string()),
            "{out:?}"
        );
        assert!(
            out.contains(&"x_agent_gate_ms_median=2.0".to_string()),
            "{out:?}"
        );
        assert!(
            out.contains(&"x_crun_by_hand_ms_median=60.0".to_string()),
            "{out:?}"
        );
        assert!(
            out.contains(&"x_agent_overhead_ms_median=140.0".to_string()),
            "{out:?}"
        );
        assert!(agent_summary("crun round=1 request=1 start=2\n", "").is_err());
    }

    #[test]
    fn cluster_medians_and_ratio() {
        let text = "  PASS: Throughput is 150 writes/s\n\
                    Slowest request took 0.2s\n\
                    vxlan round=1 underlay_mbit=1000 overlay_mbit=800\n\
                    vxlan round=2 underlay_mbit=1200 overlay_mbit=900\n\
                    vxlan round=3 underlay_mbit=1100 overlay_mbit=880\n\
                    vxlan rtt underlay_ms=0.5 overlay_ms=0.7\n";
        let out = cluster_summary(text).unwrap();
        assert_eq!(out[0], "etcd_check_perf_s_writes_per_s=150");
        assert!(out.contains(&"etcd_check_perf: PASS: Throughput is 150 writes/s".to_string()));
        assert!(out.contains(
            &"vxlan_underlay_mbit_median=1100 vxlan_overlay_mbit_median=880 vxlan_ratio=80%"
                .to_string()
        ));
        assert!(out.contains(&"vxlan_rtt_underlay_ms=0.5 vxlan_rtt_overlay_ms=0.7".to_string()));
        assert!(out.contains(&"wireguard=no result".to_string()));
    }

    #[test]
    fn iperf3_and_cni_results() {
        let j = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":1},"sum_received":{"bits_per_second":2500000000.0}}}"#;
        assert_eq!(iperf3_gbit(j).unwrap(), 2.5);
        assert!(iperf3_gbit("{}").is_err());
        let c = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.9.1.2/24","gateway":"10.9.1.1"}]}"#;
        assert_eq!(cni_address(c).unwrap(), "10.9.1.2");
        assert!(cni_address(r#"{"ips":[]}"#).is_err());
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
    }

    #[test]
    fn manifest_stage_seconds() {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "name": "n", "version": "1", "description": "", "definition": "d",
            "ostree_commit": "", "ostree_base_commit": "", "ostree_repo": "",
            "usr_root_hash": "", "usr_filesystem_bytes": 7, "cmdline": "", "kernel": "",
            "source_date_epoch": 0, "uki": "", "partitions": [], "packages": [],
            "artifacts": [], "timings": [{"stage": "UKI", "seconds": 1.5}]
        }))
        .unwrap();
        assert_eq!(stage_seconds(&m, "UKI"), 1.5);
        assert_eq!(stage_seconds(&m, "signing keys"), 0.0);
        m.timings.clear();
        assert_eq!(stage_seconds(&m, "UKI"), 0.0);
    }
}
