//! Command-line interface: argument structs (clap derive) and dispatch into the library.

use crate::build::{self, BuildOptions};
use crate::cache::Cache;
use crate::compose::dpkg;
use crate::inspect;
use crate::manifest::Manifest;
use crate::store::{self, Store};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

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
    Build(BuildArgs),
    /// Show an image's partitions, UKI sections, command line and /usr root hash.
    Inspect {
        /// A .raw image, a UKI (.efi) or a build output directory.
        image: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List builds recorded in the store.
    Log {
        /// Only this image's builds.
        name: Option<String>,
        #[arg(long)]
        repo: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show packages and files that changed between two builds.
    Diff {
        /// A commit (or unique prefix), a ref, a build directory or a manifest.json.
        a: String,
        b: String,
        #[arg(long)]
        repo: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Boot an image in QEMU (OVMF, software TPM); builds images/NAME.toml first when given a name.
    Boot(BootArgs),
    /// Run the QEMU integration tests in qemu-tests/ against an image.
    Test(TestArgs),
    /// Manage the operator's signing keys (Secure Boot PK/KEK/db, PCR policy keys).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Make, sign and check container images (OCI layouts with cosign-compatible signatures).
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Edit the operator-signed list of enrolled machines (TPM endorsement key hashes).
    #[command(subcommand)]
    Machines(MachinesCommand),
    /// Check Ignition configs with the code nodes use.
    #[command(subcommand)]
    Ignition(IgnitionCommand),
    /// Make the Ignition configs that form a cluster: etcd with TLS, keel-net (docs/etcd.md).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Put an Ignition config on a built image's ESP (keel/config.ign), like
    /// `coreos-installer iso customize`; the built image is changed in place.
    EmbedConfig {
        /// A .raw image or a build output directory.
        image: PathBuf,
        config: PathBuf,
    },
    /// Internal: print the tools tree's path (bootstrapping it when missing), for scripts.
    #[command(name = "__tools-path", hide = true)]
    ToolsPath,
    /// Internal: run a command inside the tools tree.
    #[command(name = "__sandbox", hide = true)]
    Sandbox {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        bind: Vec<PathBuf>,
        #[arg(long)]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        argv: Vec<OsString>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// Make an OCI image layout whose one layer is a directory tree.
    Build {
        /// The directory that becomes the container's root.
        #[arg(long)]
        from_tree: PathBuf,
        /// Output layout directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Also write an oci-archive (tar) of the layout here, for nodes' spool directories.
        #[arg(long)]
        archive: Option<PathBuf>,
        /// Environment variables (KEY=VALUE), repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        entrypoint: Vec<String>,
    },
    /// Sign an image layout with a container-signing key (stored in the layout as cosign does).
    Sign {
        image: PathBuf,
        /// PEM private key (ECDSA P-256), e.g. KEYDIR/container-signing.key.
        #[arg(long)]
        key: PathBuf,
        /// The reference named in the payload.
        #[arg(long, default_value = "keel/local")]
        reference: String,
        /// Also write an oci-archive (tar) of the signed layout here.
        #[arg(long)]
        archive: Option<PathBuf>,
    },
    /// Print the simple-signing payload of an image, to sign with `cosign sign-blob --key`.
    Payload {
        image: PathBuf,
        #[arg(long, default_value = "keel/local")]
        reference: String,
    },
    /// Store a signature made with cosign (`cosign sign-blob` over `keel container payload`).
    Attach {
        image: PathBuf,
        #[arg(long)]
        payload: PathBuf,
        /// File with the base64 signature cosign printed.
        #[arg(long)]
        signature: PathBuf,
        #[arg(long)]
        archive: Option<PathBuf>,
    },
    /// Check an image's signature and digests with public keys, as a node would.
    Verify {
        image: PathBuf,
        /// PEM public keys (cosign.pub or container-signing.pub.pem), repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum IgnitionCommand {
    /// Parse and check a config (spec 3.0–3.6) with the node's code: every unsupported or bad
    /// field is named. Exit status 1 on error.
    Validate { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a CA, an admin client certificate and one Ignition config per node (DIR/NAME.ign).
    Init {
        /// Output directory (must not hold a cluster yet); keep it: it holds the CA key.
        #[arg(long)]
        dir: PathBuf,
        /// NAME=IP[/PREFIX][@MAC]; with @MAC the node gets IP/PREFIX statically on that NIC.
        #[arg(long = "node", required = true)]
        nodes: Vec<crate::cluster::init::NodeSpec>,
        /// The overlay's network config (flannel's format), stored in etcd by the first node.
        #[arg(
            long,
            default_value = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#
        )]
        network_config: String,
    },
    /// Issue DIR/NAME.ign for a new member joining the cluster in DIR; run
    /// `etcdctl member add NAME --peer-urls=https://IP:2380` on the cluster first.
    AddNode {
        #[arg(long)]
        dir: PathBuf,
        /// NAME=IP[/PREFIX][@MAC]
        #[arg(long = "node")]
        node: crate::cluster::init::NodeSpec,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// Add a machine (its EK hash from `keel-agent ek-hash`) and sign the list again.
    Add {
        /// The list (created when missing); its signature goes to LIST.sig.
        #[arg(long)]
        list: PathBuf,
        /// Container-signing private key.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        name: String,
        /// sha256:<hex>, as `keel-agent ek-hash` prints it.
        #[arg(long)]
        ek: String,
    },
    /// Remove a machine by name or EK hash and sign the list again.
    Remove {
        #[arg(long)]
        list: PathBuf,
        #[arg(long)]
        key: PathBuf,
        what: String,
    },
    /// Print a list after checking its signature.
    List {
        #[arg(long)]
        list: PathBuf,
        /// Public key to check the signature with.
        #[arg(long = "pub")]
        public: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a new key directory: PK, KEK, db (key + certificate), the PCR policy keys for the
    /// initrd and for the running system, and the EFI owner GUID. Private keys are mode 0600.
    Init {
        dir: PathBuf,
        /// Names the owner in certificate subjects.
        #[arg(long, default_value = "Keel operator")]
        label: String,
    },
    /// Add the container-signing key (ECDSA P-256) to a key directory made before keel had it.
    AddContainerKey { dir: PathBuf },
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The image definition (default: images/cluster-node.toml).
    #[arg(default_value = "images/cluster-node.toml")]
    pub definition: PathBuf,
    /// Output directory (default: build/NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The OSTree store (default: ~/.cache/keel/repo).
    #[arg(long)]
    pub repo: Option<PathBuf>,
    /// Bootstrap the package tree again instead of using the cached one.
    #[arg(long)]
    pub rebootstrap: bool,
    /// Print the manifest as JSON when done.
    #[arg(long)]
    pub json: bool,
    /// Put this Ignition config on the image's ESP (keel/config.ign), for machines without
    /// fw_cfg; checked like `keel ignition validate` first.
    #[arg(long)]
    pub ignition: Option<PathBuf>,
    /// Build as this version instead of the definition's (e.g. from a release pipeline).
    #[arg(long)]
    pub version: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// An image name from images/ (built first), a build directory, or a .raw/.qcow2 file.
    #[arg(default_value = "cluster-node")]
    pub image: String,
    /// Use the existing build of an image name instead of building it.
    #[arg(long)]
    pub no_build: bool,
    /// Write the serial console to FILE instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// Keep the VM's disk (a qcow2 overlay) at PATH and reuse it on the next boot.
    #[arg(long, value_name = "PATH")]
    pub persist: Option<PathBuf>,
    /// Keep the software TPM's state in DIR (default: a fresh TPM per boot).
    #[arg(long, value_name = "DIR")]
    pub tpm_state: Option<PathBuf>,
    /// Ignition config passed to the guest as fw_cfg opt/com.coreos/config.
    #[arg(long, value_name = "FILE")]
    pub ignition: Option<PathBuf>,
    /// Forward a host TCP port to the guest, HOST:GUEST (repeatable).
    #[arg(long = "forward", value_name = "HOST:GUEST")]
    pub forwards: Vec<String>,
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// kvm or tcg (default: probe KVM, fall back to tcg).
    #[arg(long, value_parser = ["kvm", "tcg"])]
    pub accel: Option<String>,
    /// GiB of disk beyond the image, for the root partition created on first boot.
    #[arg(long, default_value_t = 6)]
    pub disk_gib: u64,
    /// Secure Boot on, with the image's PK/KEK/db enrolled in the VM's firmware variables.
    #[arg(long)]
    pub secure_boot: bool,
}

#[derive(Debug, clap::Args)]
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
}

fn repo_or_default(repo: Option<PathBuf>) -> Result<PathBuf> {
    match repo {
        Some(r) => Ok(r),
        None => Ok(build::default_repo(&Cache::from_env()?)),
    }
}

/// A commit named by a ref, commit prefix, build directory or manifest.
fn resolve_build(store: &Store, spec: &str) -> Result<String> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(Manifest::find(p)?.ostree_commit);
    }
    let as_ref = store::image_ref(spec);
    for candidate in [spec, as_ref.as_str()] {
        if let Some(c) = store.resolve(candidate)? {
            return Ok(c);
        }
    }
    anyhow::bail!("`{spec}` names no build: give a commit (or a unique prefix from `keel log`), an image name, a build directory or a manifest.json")
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Commands::Build(a) => {
            let m = build::build(&BuildOptions {
                definition: a.definition,
                out: a.out.clone(),
                repo: a.repo,
                rebootstrap: a.rebootstrap,
                quiet: a.json,
                version: a.version,
                ignition: a.ignition,
            })?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                let out = a.out.unwrap_or_else(|| build::default_out(&m.name));
                println!("built {} {} in {}", m.name, m.version, out.display());
                println!("  commit     {}", m.ostree_commit);
                println!("  usr hash   {}", m.usr_root_hash);
                println!("  /usr       {} MiB erofs", m.usr_filesystem_bytes >> 20);
                for art in &m.artifacts {
                    println!(
                        "  {:<22} {:>6} MiB  sha256 {}",
                        art.file,
                        art.size >> 20,
                        &art.sha256[..16]
                    );
                }
                let total: f64 = m.timings.iter().map(|t| t.seconds).sum();
                println!("  total      {total:.1}s");
            }
            Ok(())
        }
        Commands::Inspect { image, json } => {
            let i = inspect::inspect(&image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print!("{}", inspect::render_text(&i));
            }
            Ok(())
        }
        Commands::Log { name, repo, json } => {
            let store = Store::open(&repo_or_default(repo)?)?;
            let refs = match name {
                Some(n) => vec![store::image_ref(&n)],
                None => store.image_refs()?,
            };
            let mut all = Vec::new();
            for r in refs {
                all.extend(
                    store
                        .log(&r)
                        .with_context(|| format!("reading history of {r}"))?,
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no builds recorded in {}", store.path().display());
            } else {
                for e in &all {
                    let when = chrono_like(e.timestamp);
                    let pkgs = e.record.as_ref().map_or(0, |r| r.packages.len());
                    println!(
                        "{}  {}  {:<28} {pkgs} packages",
                        &e.commit[..12],
                        when,
                        e.subject
                    );
                }
            }
            Ok(())
        }
        Commands::Diff { a, b, repo, json } => {
            let store = Store::open(&repo_or_default(repo)?)?;
            let ca = resolve_build(&store, &a)?;
            let cb = resolve_build(&store, &b)?;
            let ra = store.entry(&ca)?.record.unwrap_or_else(empty_record);
            let rb = store.entry(&cb)?.record.unwrap_or_else(empty_record);
            let pkgs = dpkg::diff(&ra.packages, &rb.packages);
            let files = store::diff_files(&store.file_index(&ca)?, &store.file_index(&cb)?);
            if json {
                let v = serde_json::json!({"from": ca, "to": cb, "packages": pkgs, "files": files});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("from {ca}\nto   {cb}");
                for p in &pkgs.added {
                    println!("package + {} {}", p.name, p.version);
                }
                for p in &pkgs.removed {
                    println!("package - {} {}", p.name, p.version);
                }
                for (n, o, v) in &pkgs.changed {
                    println!("package ~ {n} {o} -> {v}");
                }
                for f in &files.added {
                    println!("file + /usr{f}");
                }
                for f in &files.removed {
                    println!("file - /usr{f}");
                }
                for f in &files.modified {
                    println!("file ~ /usr{f}");
                }
                println!(
                    "{} packages added, {} removed, {} changed; {} files added, {} removed, {} modified",
                    pkgs.added.len(), pkgs.removed.len(), pkgs.changed.len(), files.added.len(), files.removed.len(), files.modified.len()
                );
            }
            Ok(())
        }
        Commands::Keys(KeysCommand::Init { dir, label }) => {
            crate::trust::keys::init(&dir, &label)?;
            println!(
                "created keys in {}: keep the *.key files secret (mode 0600); name the directory in an image definition as [trust] keys = \"...\"",
                dir.display()
            );
            Ok(())
        }
        Commands::Keys(KeysCommand::AddContainerKey { dir }) => {
            if crate::trust::keys::ensure_container_key(&dir)? {
                println!(
                    "created {}/container-signing.key and .pub.pem",
                    dir.display()
                );
            } else {
                println!(
                    "{} already has a container-signing key; kept it",
                    dir.display()
                );
            }
            Ok(())
        }
        Commands::Container(c) => crate::container::commands::run(c),
        Commands::Ignition(IgnitionCommand::Validate { file }) => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let p = crate::provision::config::parse(&bytes)
                .with_context(|| file.display().to_string())?;
            println!(
                "{}: valid (spec {}, sha256 {}): files {}, directories {}, links {}, units {}, users {}, groups {}",
                file.display(), p.version, p.sha256, p.files.len(), p.directories.len(), p.links.len(), p.units.len(), p.users.len(), p.groups.len()
            );
            Ok(())
        }
        Commands::EmbedConfig { image, config } => crate::provision::embed::embed(&image, &config),
        Commands::ToolsPath => {
            let cache = crate::cache::Cache::from_env()?;
            let t = crate::tools::ToolsTree::ensure(&cache, crate::image::DEFAULT_MIRROR)?;
            println!("{}", t.root().display());
            Ok(())
        }
        Commands::Machines(c) => crate::container::commands::machines(c),
        Commands::Cluster(ClusterCommand::Init {
            dir,
            nodes,
            network_config,
        }) => {
            crate::cluster::init::init(&dir, &nodes, &network_config)?;
            println!(
                "{}: CA, admin certificate and {} node config(s) written",
                dir.display(),
                nodes.len()
            );
            Ok(())
        }
        Commands::Cluster(ClusterCommand::AddNode { dir, node }) => {
            crate::cluster::init::add_node(&dir, &node)?;
            println!(
                "{}/{}.ign written (state existing)",
                dir.display(),
                node.name
            );
            Ok(())
        }
        Commands::Boot(a) => {
            let forwards = a
                .forwards
                .iter()
                .map(|f| crate::boot::parse_forward(f))
                .collect::<Result<Vec<_>>>()?;
            crate::boot::boot(&crate::boot::BootOptions {
                image: a.image,
                no_build: a.no_build,
                console: a.console,
                persist: a.persist,
                tpm_state: a.tpm_state,
                ignition: a.ignition,
                forwards,
                memory_mib: a.memory,
                cpus: a.cpus,
                accel: a.accel,
                disk_gib: a.disk_gib,
                secure_boot: a.secure_boot,
            })
        }
        Commands::Test(a) => {
            let image = crate::boot::resolve_image(&a.image, a.no_build)?;
            let dir = image
                .dir
                .context("keel test needs a build directory with manifest.json")?;
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let results = a.results.unwrap_or_else(|| {
                PathBuf::from("build/test-results")
                    .join(chrono_like(stamp).replace([' ', ':'], "-"))
            });
            let all = crate::testing::run(&crate::testing::TestOptions {
                image_dir: dir,
                tests_dir: a.tests,
                filters: a.filters,
                results: results.clone(),
                accel: a.accel,
            })?;
            println!(
                "results in {} (report.json, consoles, journals)",
                results.display()
            );
            let line = crate::testing::report::summary(&all);
            println!("{line}");
            if all
                .iter()
                .any(|r| r.result == crate::testing::report::Outcome::Fail)
            {
                anyhow::bail!("{line}");
            }
            Ok(())
        }
        Commands::Sandbox {
            root,
            bind,
            env,
            argv,
        } => {
            let env: Vec<(String, String)> = env
                .iter()
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect();
            crate::tools::sandbox::exec_in(&root, &bind, &env, &argv)
        }
    }
}

fn empty_record() -> store::CommitRecord {
    store::CommitRecord {
        format: 1,
        name: String::new(),
        version: String::new(),
        kernel: String::new(),
        packages: vec![],
    }
}

/// UTC date and time of a Unix timestamp (`YYYY-MM-DD HH:MM`), without a date library.
pub fn chrono_like(ts: u64) -> String {
    let days = (ts / 86_400) as i64;
    let secs = ts % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        (secs % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(chrono_like(0), "1970-01-01 00:00");
        assert_eq!(chrono_like(crate::build::DEFAULT_EPOCH), "2025-01-01 00:00");
        assert_eq!(chrono_like(1_709_210_096), "2024-02-29 12:34");
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
