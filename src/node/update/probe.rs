//! The machine as the health check sees it: units through `systemctl show`, etcd through
//! `etcdctl endpoint health` (a read through quorum, with the node's own client certificate when
//! etcd asks for one), and the boot through `keel-agent boot-state`.

use super::health::{Observed, Probe, UnitObs};
use super::node::os_release_value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Machine {
    pub root: PathBuf,
    pub units: Vec<String>,
}

/// Parses `systemctl show -p Id,ActiveState,SubState,ConditionResult,NRestarts U…` (blocks
/// separated by empty lines).
pub fn parse_show(text: &str) -> Vec<UnitObs> {
    text.split("\n\n")
        .filter_map(|block| {
            let get = |k: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix('=').map(str::to_string))
            };
            Some(UnitObs {
                name: get("Id")?,
                active: get("ActiveState").unwrap_or_default(),
                sub: get("SubState").unwrap_or_default(),
                condition: get("ConditionResult").unwrap_or_default(),
                restarts: get("NRestarts").and_then(|n| n.parse().ok()).unwrap_or(0),
                loaded: get("LoadState").as_deref() == Some("loaded"),
                condition_checked: get("ConditionTimestampMonotonic")
                    .is_some_and(|t| !t.is_empty() && t != "0"),
            })
        })
        .collect()
}

/// etcdctl's connection arguments for the local member from etcd.env (see [`etcdctl_args`]).
pub fn etcdctl_connection(env: &str) -> Vec<String> {
    let mut a = etcdctl_args(env);
    a.truncate(a.len() - 2);
    a
}

/// etcdctl's arguments for the local member from etcd.env: its first advertised client URL and,
/// when etcd checks client certificates, the node's certificate.
pub fn etcdctl_args(env: &str) -> Vec<String> {
    let get = |k: &str| os_release_value(env, k);
    let endpoint = get("ETCD_ADVERTISE_CLIENT_URLS")
        .and_then(|u| u.split(',').next().map(str::to_string))
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let mut args = vec![
        format!("--endpoints={endpoint}"),
        "--command-timeout=5s".into(),
        "--dial-timeout=3s".into(),
    ];
    for (var, flag) in [
        ("ETCD_TRUSTED_CA_FILE", "--cacert"),
        ("ETCD_CERT_FILE", "--cert"),
        ("ETCD_KEY_FILE", "--key"),
    ] {
        if let Some(v) = get(var) {
            args.push(format!("{flag}={v}"));
        }
    }
    args.extend(["endpoint".into(), "health".into()]);
    args
}

fn output(cmd: &mut Command) -> Result<String, String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            Err(text.trim().lines().last().unwrap_or("failed").to_string())
        }
        Err(e) => Err(format!("{e}")),
    }
}

impl Machine {
    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }
}

impl Probe for Machine {
    fn observe(&mut self) -> Observed {
        let units = match output(
            Command::new("systemctl")
                .args([
                    "show",
                    "-p",
                    "Id,LoadState,ActiveState,SubState,ConditionResult,ConditionTimestampMonotonic,NRestarts",
                ])
                .args(&self.units),
        ) {
            Ok(text) => parse_show(&text),
            Err(e) => vec![UnitObs {
                name: "systemctl".into(),
                active: "unknown".into(),
                sub: e,
                condition: String::new(),
                restarts: 0,
                loaded: true,
                condition_checked: false,
            }],
        };
        let etcd = if self.units.iter().any(|u| u == "etcd.service") {
            let env = std::fs::read_to_string(self.path("/etc/keel/etcd.env")).unwrap_or_default();
            Some(output(Command::new("etcdctl").args(etcdctl_args(&env))).map(|_| ()))
        } else {
            None
        };
        // The boot must be one the operator signed on trusted images, on machines with a TPM: an
        // image built to run without one (trust.without-tpm = "unencrypted") on a machine that
        // has none can never report a signed state, and is not rejected for it.
        let trusted = (self.path("/usr/lib/keel/trust").exists()
            && self.path("/sys/class/tpm/tpm0").exists())
        .then(|| {
            // A probe that hangs must not keep the trial undecided: the check runs again.
            output(Command::new("timeout").args(["60", "keel-agent", "boot-state"])).map(|_| ())
        });
        Observed {
            units,
            etcd,
            trusted,
        }
    }
}

/// Saves a snapshot of the local etcd member to `dest` before the node reboots into a new
/// version (etcdctl writes it aside and renames it when complete), so a fall back across a
/// storage-format change can be repaired (docs/etcd.md). Nothing to do without etcd.env.
pub fn etcd_snapshot(root: &Path, dest: &Path) -> anyhow::Result<bool> {
    let env_file = root.join("etc/keel/etcd.env");
    let Ok(env) = std::fs::read_to_string(&env_file) else {
        return Ok(false);
    };
    let mut args = etcdctl_connection(&env);
    args.extend(["snapshot".into(), "save".into(), dest.display().to_string()]);
    output(Command::new("etcdctl").args(&args))
        .map_err(|e| anyhow::anyhow!("etcdctl snapshot save {}: {e}", dest.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_output() {
        let text = "Id=etcd.service\nLoadState=loaded\nActiveState=active\nSubState=running\nConditionResult=yes\nConditionTimestampMonotonic=5000\nNRestarts=2\n\nId=keel-net.service\nLoadState=loaded\nActiveState=inactive\nSubState=dead\nConditionResult=no\nConditionTimestampMonotonic=0\n\nId=gone.service\nLoadState=not-found\nActiveState=inactive\n";
        let u = parse_show(text);
        assert_eq!(u.len(), 3);
        assert_eq!(u[1].name, "keel-net.service");
        assert_eq!(u[1].condition, "no");
        assert!(u[0].condition_checked && !u[1].condition_checked);
        assert!(u[1].loaded && !u[2].loaded);
        assert_eq!((u[0].restarts, u[1].restarts), (2, 0));
    }

    #[test]
    fn etcdctl_for_tls_and_plain_members() {
        let plain = etcdctl_args("ETCD_ADVERTISE_CLIENT_URLS=http://127.0.0.1:2379\n");
        assert_eq!(plain[0], "--endpoints=http://127.0.0.1:2379");
        assert!(!plain.iter().any(|a| a.starts_with("--cert")));
        let tls = etcdctl_args("ETCD_ADVERTISE_CLIENT_URLS=https://10.0.0.1:2379,https://x:2379\nETCD_CERT_FILE=/etc/keel/pki/node.pem\nETCD_KEY_FILE=/etc/keel/pki/node-key.pem\nETCD_TRUSTED_CA_FILE=/etc/keel/pki/ca.pem\n");
        assert_eq!(tls[0], "--endpoints=https://10.0.0.1:2379");
        assert!(tls.contains(&"--cert=/etc/keel/pki/node.pem".to_string()));
        assert!(tls.contains(&"--cacert=/etc/keel/pki/ca.pem".to_string()));
        assert_eq!(tls[tls.len() - 2..], ["endpoint", "health"]);
    }
}
