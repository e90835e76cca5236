//! The `keel` command line: the top-level parser and a dispatch into each command's module, where
//! its arguments are defined and its code runs.

use crate::host::{
    bench, boot, build, cluster, container, history, ignition, inspect, keys, publish, testing,
    tools,
};
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "keel", version, about = "Build, boot and test a trusted, immutable cluster OS", long_about = None)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Build a disk image from an image definition (images/NAME.toml).
    Build(build::BuildOptions),
    /// Show an image's partitions, UKI sections, command line and /usr root hash.
    Inspect(inspect::InspectArgs),
    /// List builds recorded in the store.
    Log(history::LogArgs),
    /// Show packages and files that changed between two builds.
    Diff(history::DiffArgs),
    /// Boot an image in QEMU (OVMF, software TPM); builds images/NAME.toml first when given a name.
    Boot(boot::BootOptions),
    /// Run the QEMU integration tests in qemu-tests/ against an image.
    Test(testing::TestArgs),
    /// Manage the operator's signing keys (Secure Boot PK/KEK/db, PCR policy keys).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Publish a build into a signed update repository (TUF), and keep the repository fresh.
    Publish(publish::PublishArgs),
    /// Make, sign and check container images (OCI layouts with cosign-compatible signatures).
    #[command(subcommand)]
    Container(container::ContainerCommand),
    /// Edit the operator-signed list of enrolled machines (TPM endorsement key hashes).
    #[command(subcommand)]
    Machines(container::MachinesCommand),
    /// Check Ignition configs with the code nodes use.
    #[command(subcommand)]
    Ignition(ignition::IgnitionCommand),
    /// Make the Ignition configs that form a cluster: etcd with TLS, keel-net (docs/etcd.md).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Put an Ignition config on a built image's ESP (keel/config.ign), like
    /// `coreos-installer iso customize`; the built image is changed in place.
    EmbedConfig(ignition::EmbedArgs),
    /// Read what scripts/bench recorded (manifests, disk images, console logs, benchmark output)
    /// and print its numbers as key=value lines.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Internal: print the tools tree's path (bootstrapping it when missing), for scripts.
    #[command(name = "__tools-path", hide = true)]
    ToolsPath,
    /// Internal: run a command inside the tools tree.
    #[command(name = "__sandbox", hide = true)]
    Sandbox(tools::sandbox::SandboxArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Commands::Build(a) => build::command(&a),
        Commands::Inspect(a) => inspect::command(&a),
        Commands::Log(a) => history::log(a),
        Commands::Diff(a) => history::diff(a),
        Commands::Boot(a) => boot::boot(&a),
        Commands::Test(a) => testing::command(&a),
        Commands::Keys(c) => keys::command(c),
        Commands::Publish(a) => publish::command(a),
        Commands::Container(c) => container::run(c),
        Commands::Machines(c) => container::machines(c),
        Commands::Ignition(c) => ignition::command(c),
        Commands::Cluster(c) => cluster::command(c),
        Commands::EmbedConfig(a) => ignition::embed(&a),
        Commands::Bench(c) => bench::command(c),
        Commands::ToolsPath => tools::print_path(),
        Commands::Sandbox(a) => tools::sandbox::command(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
