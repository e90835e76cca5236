//! keel-agent's command line.

use super::containers::{self, ThisMachine};
use super::network;
use super::systemd::{Systemd, Units};
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "keel-agent", version, about = "Keel's node agent")]
pub struct Cli {
    /// The node's root directory (for testing against a copy of a node's files).
    #[arg(long, global = true, default_value = "/")]
    pub root: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report PCR 11, replay the event logs to it, and say whether the operator signed this state.
    /// Exits 0 when trusted, 1 when not.
    BootState {
        #[arg(long)]
        json: bool,
    },
    /// Print this machine's TPM endorsement key hash, for `keel machines add`.
    EkHash,
    /// Print this machine's TPM endorsement key (PEM public key, then its hash), for
    /// `keel cluster init --ek NAME=FILE`.
    Ek,
    /// Cluster admission by TPM attestation (docs/attestation.md).
    Attest {
        #[command(subcommand)]
        command: AttestCommand,
    },
    /// Verify a signed image (layout directory or oci-archive), check this machine against the
    /// image policy, unpack it and start it as a systemd unit (keel-ctr-NAME.service).
    Run {
        /// OCI image layout directory or oci-archive (.tar).
        image: PathBuf,
        /// Container name (default: from the file name).
        #[arg(long)]
        name: Option<String>,
        /// The reference the image's signature must name (default: the container name, as
        /// the last part of the signed repository).
        #[arg(long)]
        reference: Option<String>,
        /// Print the result (digest, signer, phase timings) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the containers keel-agent started.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop a container.
    Stop { name: String },
    /// Show a container's output (from the journal).
    Logs {
        name: String,
        /// Keep following.
        #[arg(short, long)]
        follow: bool,
    },
    /// First-boot provisioning, run in the initrd with the new root at --root (/sysroot): measure
    /// the Ignition config's hash into PCR 12 (on every boot), and apply the config from fw_cfg
    /// or the ESP once.
    Provision,
    /// Release a stopped container's network: the CNI plugins' DEL and its network namespace
    /// (the container's unit runs this when it stops).
    NetDetach { name: String },
    /// Watch the spool directory (/var/lib/keel/spool) and run the archives dropped there; the
    /// keel-agent service runs this.
    Serve,
}

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Get and renew this node's cluster certificate; on a first member, serve the verifier
    /// (the keel-attest service runs this).
    Run,
    /// Show the certificate this node holds, who issued it, when it is renewed and the last
    /// error. Exits 0 when the node holds a valid certificate, 1 when not.
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let root = cli.root.as_path();
    match cli.command {
        Command::EkHash => {
            println!("{}", super::tpm::ek_sha256()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            image,
            name,
            reference,
            json,
        } => run_image(root, &image, name, reference, json),
        Command::List { json } => list(root, json),
        Command::Stop { name } => {
            containers::stop(&Systemd::connect()?, &name)?;
            println!("stopped {name}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { name, follow } => logs(&name, follow),
        Command::NetDetach { name } => net_detach(root, &name),
        Command::Provision => provision(root),
        Command::Serve => {
            let units = Systemd::connect()?;
            super::spool::serve(root, &machine(root), &units, &network::RealHost)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BootState { json } => boot_state(root, json),
        Command::Ek => {
            let tpm = crate::node::attest::tpm::Tpm::machine()?;
            let ek = crate::attest::tpm2::EkPublic::parse(tpm.ek_public())?;
            print!("{}", ek.pem()?);
            println!("# {}", ek.sha256()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Attest { command } => attest(root, command),
    }
}

fn attest(root: &Path, command: AttestCommand) -> Result<ExitCode> {
    use crate::node::attest::service;
    match command {
        AttestCommand::Run => {
            service::run(root)?;
            Ok(ExitCode::SUCCESS)
        }
        AttestCommand::Status { json } => {
            let st = service::status(root)?;
            let valid = st.state == "admitted" && st.not_after > service::now();
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("name:       {}", st.name);
                println!("state:      {}", st.state);
                println!("issued by:  {}", st.issued_by);
                println!("serial:     {}", st.serial);
                println!("not after:  {}", st.not_after);
                println!("renew at:   {}", st.renew_after);
                println!("renewals:   {}", st.renewals);
                println!("verifier:   {}", if st.verifier { "serving" } else { "no" });
                println!("admission:  serial {}", st.admission_serial);
                if !st.last_error.is_empty() {
                    println!("last error: {}", st.last_error);
                }
            }
            Ok(if valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn machine(root: &Path) -> ThisMachine {
    ThisMachine {
        root: root.to_path_buf(),
    }
}

/// `keel-agent run`.
fn run_image(
    root: &Path,
    image: &Path,
    name: Option<String>,
    reference: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let name = name.unwrap_or_else(|| containers::default_name(image));
    let units = Systemd::connect()?;
    match containers::run(
        root,
        image,
        &name,
        &machine(root),
        &units,
        &network::RealHost,
        &containers::RunOptions {
            reference,
            ..Default::default()
        },
    ) {
        Ok(s) => {
            tracing::info!(container = %s.name, digest = %s.manifest_digest, signed_by = %s.signed_by, gate = %s.gate, "started");
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "started {} ({}), signed by {}; {}",
                    s.unit, s.manifest_digest, s.signed_by, s.gate
                );
                if !s.addresses.is_empty() {
                    println!("address {}", s.addresses.join(" "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            tracing::error!(container = %name, image = %image.display(), "{e:#}");
            // The journal keeps the reason too, also when run from a shell.
            to_journal(&format!("container {name} ({}): {e:#}", image.display()));
            Ok(ExitCode::from(1))
        }
    }
}

/// `keel-agent list`.
fn list(root: &Path, json: bool) -> Result<ExitCode> {
    let units = Systemd::connect()?.list()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&units)?);
    } else {
        for u in units {
            let name = u
                .name
                .trim_start_matches(super::systemd::UNIT_PREFIX)
                .trim_end_matches(".service");
            let bundle = root.join(containers::CONTAINERS_DIR).join(name);
            let address = network::read_record(&bundle)
                .ok()
                .flatten()
                .map(|a| a.addresses.join(","))
                .unwrap_or_else(|| "-".into());
            println!(
                "{name:<24} {:<10} {:<10} {address:<18} {}",
                u.active, u.sub, u.description
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keel-agent logs`.
fn logs(name: &str, follow: bool) -> Result<ExitCode> {
    containers::check_name(name)?;
    let mut c = std::process::Command::new("journalctl");
    c.args([
        "--no-pager",
        "-o",
        "cat",
        "-u",
        &super::systemd::unit_name(name),
    ]);
    if follow {
        c.arg("-f");
    }
    let status = c
        .status()
        .map_err(|e| anyhow::anyhow!("running journalctl: {e}"))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `keel-agent net-detach`.
fn net_detach(root: &Path, name: &str) -> Result<ExitCode> {
    containers::check_name(name)?;
    let bundle = root.join(containers::CONTAINERS_DIR).join(name);
    match containers::detach_network(&bundle, &network::RealHost)? {
        Some(att) => tracing::info!(
            container = %name,
            netns = %att.netns.display(),
            addresses = %att.addresses.join(" "),
            "released the container's network"
        ),
        None => tracing::info!(container = %name, "no network attachment to release"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `keel-agent boot-state`.
fn boot_state(root: &Path, json: bool) -> Result<ExitCode> {
    let s = super::boot_state::read(root)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        for (i, v) in &s.pcrs {
            println!("PCR {i:<2} (sha256)   {v}");
        }
        println!(
            "event log replay  {} ({} firmware events, phases: {})",
            if s.replay_matches {
                "matches"
            } else {
                "DOES NOT MATCH"
            },
            s.firmware_events,
            if s.phase.is_empty() { "none" } else { &s.phase }
        );
        println!(
            "signed policy     {}",
            s.signed_by
                .as_deref()
                .map(|k| format!("matches, signed by {k}"))
                .unwrap_or_else(|| "none matches".into())
        );
        println!(
            "verdict           {}",
            if s.trusted { "trusted" } else { "NOT TRUSTED" }
        );
        for p in &s.problems {
            println!("  - {p}");
        }
    }
    Ok(if s.trusted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Sends an error line to the journal through the syslog socket (when there is one).
fn to_journal(msg: &str) {
    // user.err: facility 1, severity 3.
    let line = format!("<11>keel-agent: {}", msg.replace('\n', " "));
    if let Ok(s) = std::os::unix::net::UnixDatagram::unbound() {
        let _ = s.send_to(line.as_bytes(), "/dev/log");
    }
}

/// `keel-agent provision`: see [`crate::node::provision`].
fn provision(root: &std::path::Path) -> Result<ExitCode> {
    use crate::node::provision::{self, Outcome};
    let say = |level: u8, msg: &str| {
        // The console (kmsg) and the journal; the initrd's journal moves to the real root.
        eprintln!("keel-provision: {msg}");
        let _ = std::fs::write("/dev/kmsg", format!("<{level}>keel-provision: {msg}\n"));
    };
    // Each boot measures the config's hash (or "none") into PCR 12 before anything of it is
    // applied; boot-state expects exactly that value. A machine without a TPM has nothing
    // sealed and measures nothing; with one, a failed measurement stops the boot.
    let tpm = Path::new("/dev/tpmrm0").exists() || Path::new("/dev/tpm0").exists();
    let mut measure = |word: &str| -> Result<()> {
        if !tpm {
            say(6, &format!("no TPM: `{word}` not measured"));
            return Ok(());
        }
        let status = std::process::Command::new("/usr/lib/systemd/systemd-pcrextend")
            .arg(format!("--pcr={}", provision::PCR))
            .arg(word)
            .status()
            .map_err(|e| anyhow::anyhow!("running systemd-pcrextend: {e}"))?;
        if !status.success() {
            anyhow::bail!(
                "measuring `{word}` into PCR {} failed ({status}); the boot stops because the node could not account for its configuration",
                provision::PCR
            );
        }
        say(6, &format!("measured `{word}` into PCR {}", provision::PCR));
        Ok(())
    };
    let outcome = match provision::run(root, &provision::source::Sources::default(), &mut measure) {
        Ok(o) => o,
        Err(e) if e.downcast_ref::<provision::apply::StampError>().is_some() => {
            say(2, &format!("ERROR: {e:#}"));
            return Ok(ExitCode::from(1));
        }
        Err(e) => {
            say(2, &format!("ERROR: the Ignition config was not applied: {e:#}. Nothing of it was written; fix the config and boot again."));
            return Ok(ExitCode::from(1));
        }
    };
    match &outcome {
        Outcome::Applied(s) => say(
            5,
            &format!(
                "applied the Ignition config from {} (spec {}, sha256 {})",
                s.source, s.version, s.sha256
            ),
        ),
        Outcome::AlreadyProvisioned(s) if !s.sha256.is_empty() => say(
            6,
            &format!(
                "already provisioned (config sha256 {}, from {}); not applied again",
                s.sha256, s.source
            ),
        ),
        Outcome::AlreadyProvisioned(_) => say(
            6,
            "already provisioned (no config was given on the first boot)",
        ),
        Outcome::NoConfig => say(5, "no Ignition config (fw_cfg opt/com.coreos/config, ESP keel/config.ign): booting unconfigured"),
    }
    Ok(ExitCode::SUCCESS)
}
