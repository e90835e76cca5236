//! keel-net's command line.

use super::config::NetworkConfig;
use super::daemon::{self, Options};
use super::files;
use super::store::EtcdOptions;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "keel-net",
    version,
    about = "Keel's overlay network daemon (flannel-compatible leases in etcd)"
)]
pub struct Cli {
    /// Where the daemon keeps its status (read by `status`).
    #[arg(
        long,
        global = true,
        env = "KEEL_NET_RUN_DIR",
        default_value = "/run/keel-net"
    )]
    pub run_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a subnet lease and keep the routes to every other node's subnet (the service runs this).
    Run(Box<RunArgs>),
    /// Print the lease, the peers and the backend state of the running daemon.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Check a network config document (the value for `<prefix>/config`) and print what it means.
    CheckConfig { file: PathBuf },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "KEEL_NET_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "https://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate that signed etcd's server certificate.
    #[arg(long, env = "KEEL_NET_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, env = "KEEL_NET_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, env = "KEEL_NET_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd key prefix (flannel's default).
    #[arg(long, env = "KEEL_NET_PREFIX", default_value = "/coreos.com/network")]
    pub prefix: String,
    /// Underlay interface (default: the one holding --public-ip, else the default route's).
    #[arg(long, env = "KEEL_NET_IFACE")]
    pub iface: Option<String>,
    /// This node's address on the underlay, published in its lease.
    #[arg(long, env = "KEEL_NET_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Lease time to live in seconds: how long after a node stops renewing its routes are removed.
    #[arg(long, env = "KEEL_NET_LEASE_TTL", default_value_t = 300)]
    pub lease_ttl: u64,
    /// Seconds between full resynchronisations (besides the etcd watch).
    #[arg(long, env = "KEEL_NET_RESYNC", default_value_t = 30)]
    pub resync: u64,
    #[arg(long, env = "KEEL_NET_STATE_DIR", default_value = "/var/lib/keel-net")]
    pub state_dir: PathBuf,
    #[arg(
        long,
        env = "KEEL_NET_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// CNI network config to write ("" for none).
    #[arg(
        long,
        env = "KEEL_NET_CNI_CONF",
        default_value = "/etc/cni/net.d/10-keel-net.conflist"
    )]
    pub cni_conf: PathBuf,
    /// A network config to store in etcd when none is there yet (create-if-absent, so the
    /// first node to start wins and later nodes never overwrite an operator's change).
    #[arg(long, env = "KEEL_NET_BOOTSTRAP_CONFIG")]
    pub bootstrap_config: Option<PathBuf>,
    /// The subnet this node must lease, e.g. 10.5.3.0/24 (an attested cluster assigns each
    /// node its subnet, and etcd lets the node write only that lease key). Default: choose a
    /// free one.
    #[arg(long, env = "KEEL_NET_SUBNET")]
    pub subnet: Option<ipnet::Ipv4Net>,
    /// Name published in the lease (default: the host name).
    #[arg(long, env = "KEEL_NET_HOSTNAME")]
    pub hostname: Option<String>,
    /// Masquerade containers' traffic that leaves the overlay network behind the node's
    /// address (nftables table `ip keel-net`); traffic between containers keeps its source.
    #[arg(long, env = "KEEL_NET_IP_MASQ", default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            if args.lease_ttl < 3 {
                anyhow::bail!("--lease-ttl {}: must be at least 3 seconds", args.lease_ttl);
            }
            let opts = Options {
                etcd: EtcdOptions {
                    endpoints: args.etcd_endpoints,
                    ca_file: args.etcd_cafile,
                    cert_file: args.etcd_certfile,
                    key_file: args.etcd_keyfile,
                    prefix: args.prefix,
                },
                iface: args.iface,
                public_ip: args.public_ip,
                lease_ttl: Duration::from_secs(args.lease_ttl),
                resync: Duration::from_secs(args.resync.max(1)),
                state_dir: args.state_dir,
                run_dir: cli.run_dir,
                subnet_env: args.subnet_file,
                bootstrap_config: match &args.bootstrap_config {
                    Some(p) => {
                        let text = std::fs::read_to_string(p)
                            .with_context(|| format!("--bootstrap-config {}", p.display()))?;
                        NetworkConfig::parse(&text)
                            .with_context(|| format!("--bootstrap-config {}", p.display()))?;
                        Some(text)
                    }
                    None => None,
                },
                ip_masq: args.ip_masq,
                subnet: args.subnet,
                cni_conf: (!args.cni_conf.as_os_str().is_empty()).then_some(args.cni_conf),
                hostname: args.hostname.or_else(|| {
                    nix::unistd::gethostname()
                        .ok()
                        .and_then(|h| h.into_string().ok())
                }),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(daemon::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let path = files::status_path(&cli.run_dir);
            let text = std::fs::read(&path).with_context(|| {
                format!(
                    "{}: no status (is keel-net running? systemctl status keel-net)",
                    path.display()
                )
            })?;
            let status: files::Status = serde_json::from_slice(&text)
                .with_context(|| format!("{}: not a keel-net status", path.display()))?;
            let alive =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(status.pid as i32), None).is_ok();
            if json {
                let mut v = serde_json::to_value(&status)?;
                v["process_alive"] = serde_json::Value::Bool(alive);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", files::render_status(&status));
                if !alive {
                    println!(
                        "(process {} is not running: this is its last report)",
                        status.pid
                    );
                }
            }
            Ok(if alive && status.state == "running" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Command::CheckConfig { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let c = NetworkConfig::parse(&text).with_context(|| file.display().to_string())?;
            println!(
                "{}: network {}, /{} subnets {} .. {} ({} nodes), backend {}",
                file.display(),
                c.network,
                c.subnet_len,
                c.subnet_min,
                c.subnet_max,
                c.subnets().count(),
                c.backend.type_name()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip_masq(args: &[&str]) -> bool {
        match Cli::try_parse_from(args).unwrap().command {
            Command::Run(a) => a.ip_masq,
            other => panic!("parsed as {other:?}"),
        }
    }

    /// Masquerading is on unless the flag or the unit's environment file says false.
    #[test]
    fn ip_masq_from_flag_and_environment() {
        assert!(ip_masq(&["keel-net", "run"]));
        assert!(!ip_masq(&["keel-net", "run", "--ip-masq=false"]));
        assert!(ip_masq(&["keel-net", "run", "--ip-masq", "true"]));
        // nextest runs each test in a process of its own, so the variable stays here.
        std::env::set_var("KEEL_NET_IP_MASQ", "false");
        assert!(!ip_masq(&["keel-net", "run"]));
    }
}
