//! Entering the tools tree: a private mount namespace with /proc, /dev, /sys and the build's
//! directories bound in, then chroot and exec. Everything mounted here disappears with the
//! process, so a crashed build leaves no mounts behind.
//!
//! keel re-executes itself (`keel __sandbox`) to do this, which keeps the privileged steps in one
//! small function and needs no shell.

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mount points made inside `root` for the given host paths (same path inside as outside).
pub fn bind_target(root: &Path, host: &Path) -> PathBuf {
    root.join(host.strip_prefix("/").unwrap_or(host))
}

/// `keel __sandbox`'s arguments (internal: how the tools tree runs a program).
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long)]
    pub bind: Vec<PathBuf>,
    #[arg(long)]
    pub env: Vec<String>,
    #[arg(last = true, required = true)]
    pub argv: Vec<std::ffi::OsString>,
}

/// `keel __sandbox`: runs `argv` inside the tools tree; returns only on error.
pub fn command(a: SandboxArgs) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = a
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    exec_in(&a.root, &a.bind, &env, &a.argv)
}

/// Sets up the namespace and replaces this process with `argv` run inside `root`.
/// Returns only on error.
pub fn exec_in(
    root: &Path,
    binds: &[PathBuf],
    env: &[(String, String)],
    argv: &[OsString],
) -> Result<()> {
    let Some((program, args)) = argv.split_first() else {
        bail!("no command given to run in the tools tree");
    };
    if !root.join("usr/bin").is_dir() {
        bail!("{} is not a tools tree (no usr/bin)", root.display());
    }
    unshare(CloneFlags::CLONE_NEWNS)
        .context("creating a mount namespace (keel must run as root)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    // Make the tree a mount point of its own: tools that set up their own sandbox (mkosi)
    // remount `/` and need it to be one.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("binding {} onto itself", root.display()))?;
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting /proc in {}", root.display()))?;
    for dir in ["dev", "sys"] {
        let target = root.join(dir);
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        mount(
            Some(Path::new("/").join(dir).as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("binding /{dir} into {}", root.display()))?;
    }
    mount(
        Some("tmpfs"),
        &root.join("tmp"),
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=1777"),
    )
    .with_context(|| format!("mounting a tmpfs on {}/tmp", root.display()))?;
    for host in binds {
        let target = bind_target(root, host);
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating mount point {}", target.display()))?;
        mount(
            Some(host.as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("binding {} into the tools tree", host.display()))?;
    }
    nix::unistd::chroot(root).with_context(|| format!("chroot into {}", root.display()))?;
    std::env::set_current_dir("/").context("chdir / in the tools tree")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .env("HOME", "/root");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let err = cmd.exec();
    bail!(
        "executing {} in the tools tree: {err}",
        program.to_string_lossy()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_targets_mirror_host_paths() {
        assert_eq!(
            bind_target(Path::new("/t"), Path::new("/work/b")),
            PathBuf::from("/t/work/b")
        );
    }
}
