//! keel-agent's command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
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
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::BootState { json } => {
            let s = super::boot_state::read(&cli.root)?;
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
    }
}
