//! Turning a bootstrapped Debian tree into a /usr-only tree: everything the image ships lives
//! under /usr; /etc defaults move to /usr/share/factory/etc (copied to the root partition on first
//! boot); /var, /boot and the rest are dropped, because the node creates them.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// Where /etc defaults live inside the /usr tree.
pub const FACTORY_ETC: &str = "share/factory/etc";
/// The dpkg status of the image, kept for the manifest and `keel diff`.
pub const DPKG_STATUS: &str = "share/keel/dpkg-status";

/// Checks merged-/usr: the top-level program and library directories must be symlinks into /usr.
pub fn check_merged_usr(root: &Path) -> Result<()> {
    for dir in ["bin", "sbin", "lib"] {
        let p = root.join(dir);
        let target = fs::read_link(&p).with_context(|| {
            format!(
                "{} is not a symlink: the tree is not merged-/usr (Debian trixie and later are)",
                p.display()
            )
        })?;
        if !target.to_string_lossy().starts_with("usr/") {
            bail!(
                "{} points to {}, not into usr/",
                p.display(),
                target.display()
            );
        }
    }
    Ok(())
}

/// Moves the one kernel from /boot to usr/lib/modules/VERSION/vmlinuz (the kernel-install
/// convention) and returns its version.
pub fn move_kernel(root: &Path) -> Result<String> {
    let boot = root.join("boot");
    let mut kernels: Vec<PathBuf> = Vec::new();
    if boot.is_dir() {
        for e in fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))? {
            let p = e?.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            {
                kernels.push(p);
            }
        }
    }
    kernels.sort();
    let kernel = match kernels.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "no kernel in {} (add a linux-image package to the definition)",
            boot.display()
        ),
        many => bail!(
            "{} kernels in {}; an image must have exactly one: {:?}",
            many.len(),
            boot.display(),
            many.iter()
                .map(|k| k.display().to_string())
                .collect::<Vec<_>>()
        ),
    };
    let version = kernel
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let moddir = root.join("usr/lib/modules").join(&version);
    if !moddir.is_dir() {
        bail!(
            "kernel {version} has no modules directory {}",
            moddir.display()
        );
    }
    fs::copy(&kernel, moddir.join("vmlinuz"))
        .with_context(|| format!("copying {} into {}", kernel.display(), moddir.display()))?;
    Ok(version)
}

/// Entries of /etc that describe this machine, not the image; they are created on the node.
const MACHINE_LOCAL_ETC: &[&str] = &[
    "hostname",
    "resolv.conf",
    "mtab",
    "machine-id",
    "adjtime",
    ".pwd.lock",
];

/// Moves /etc to usr/share/factory/etc, dropping machine-local files and unit enablement
/// (presets decide what is enabled: `overlay::apply_presets` applies them when the image is
/// composed, after keel's own presets are in place).
pub fn move_etc(root: &Path) -> Result<()> {
    let etc = root.join("etc");
    let factory = root.join("usr").join(FACTORY_ETC);
    if let Some(parent) = factory.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::rename(&etc, &factory)
        .with_context(|| format!("moving {} to {}", etc.display(), factory.display()))?;
    for name in MACHINE_LOCAL_ETC {
        crate::host::cache::remove_path(&factory.join(name))?;
    }
    for scope in ["systemd/system", "systemd/user"] {
        let dir = factory.join(scope);
        if dir.is_dir() {
            remove_enablement(&dir)?;
        }
    }
    Ok(())
}

/// Removes symlinks and `.wants`/`.requires` directories (what `systemctl enable` creates).
fn remove_enablement(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        let ft = e.file_type()?;
        let name = e.file_name().to_string_lossy().into_owned();
        if ft.is_symlink() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        } else if ft.is_dir()
            && (name.ends_with(".wants")
                || name.ends_with(".requires")
                || name.ends_with(".upholds"))
        {
            fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Keeps the dpkg status under /usr and removes everything outside /usr.
pub fn keep_only_usr(root: &Path) -> Result<()> {
    let status = root.join("var/lib/dpkg/status");
    let dest = root.join("usr").join(DPKG_STATUS);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::copy(&status, &dest).with_context(|| format!("copying {}", status.display()))?;
    for e in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let e = e?;
        if e.file_name() != "usr" {
            crate::host::cache::remove_path(&e.path())?;
        }
    }
    // Caches that would only go stale on a read-only /usr.
    crate::host::cache::remove_path(&root.join("usr/lib/python3/dist-packages/__pycache__"))?;
    Ok(())
}

/// The whole transformation; returns the kernel version.
pub fn usrify(root: &Path) -> Result<String> {
    check_merged_usr(root)?;
    let kver = move_kernel(root)?;
    move_etc(root)?;
    keep_only_usr(root)?;
    Ok(kver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        for d in [
            "usr/bin",
            "usr/lib/modules/6.1.0-9-amd64",
            "boot",
            "etc/systemd/system/multi-user.target.wants",
            "var/lib/dpkg",
            "root",
        ] {
            fs::create_dir_all(r.join(d)).expect("mkdir");
        }
        for l in ["bin", "sbin", "lib"] {
            symlink(format!("usr/{l}"), r.join(l)).expect("symlink");
        }
        fs::write(r.join("boot/vmlinuz-6.1.0-9-amd64"), "kernel").expect("write");
        fs::write(r.join("etc/hostname"), "buildhost").expect("write");
        fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").expect("write");
        fs::write(r.join("etc/machine-id"), "0123\n").expect("write");
        fs::write(r.join("etc/systemd/system/local.service"), "[Unit]\n").expect("write");
        symlink(
            "/usr/lib/systemd/system/etcd.service",
            r.join("etc/systemd/system/multi-user.target.wants/etcd.service"),
        )
        .expect("symlink");
        symlink(
            "/usr/lib/systemd/system/etcd.service",
            r.join("etc/systemd/system/etcd2.service"),
        )
        .expect("symlink");
        fs::write(r.join("var/lib/dpkg/status"), "Package: systemd\n").expect("write");
        t
    }

    #[test]
    fn usrify_leaves_only_usr_with_factory_etc() {
        let t = fake_tree();
        let r = t.path();
        let kver = usrify(r).expect("usrify");
        assert_eq!(kver, "6.1.0-9-amd64");
        let top: Vec<_> = fs::read_dir(r)
            .expect("read")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(top, vec![std::ffi::OsString::from("usr")]);
        let f = r.join("usr").join(FACTORY_ETC);
        assert!(f.join("passwd").is_file());
        assert!(!f.join("hostname").exists(), "machine-local file dropped");
        assert!(
            !f.join("machine-id").exists(),
            "the build's machine ID is not the image's (compose writes an empty one)"
        );
        assert!(
            f.join("systemd/system/local.service").is_file(),
            "real unit files kept"
        );
        assert!(
            !f.join("systemd/system/multi-user.target.wants").exists(),
            "enablement dropped"
        );
        assert!(
            !f.join("systemd/system/etcd2.service").exists(),
            "alias symlink dropped"
        );
        assert!(r.join("usr/lib/modules/6.1.0-9-amd64/vmlinuz").is_file());
        assert!(r.join("usr").join(DPKG_STATUS).is_file());
    }

    #[test]
    fn unmerged_usr_is_refused() {
        let t = fake_tree();
        fs::remove_file(t.path().join("bin")).expect("rm");
        fs::create_dir(t.path().join("bin")).expect("mkdir");
        let err = usrify(t.path()).expect_err("must fail").to_string();
        assert!(err.contains("not merged-/usr"), "{err}");
    }

    #[test]
    fn two_kernels_are_refused() {
        let t = fake_tree();
        fs::write(t.path().join("boot/vmlinuz-6.2"), "k").expect("write");
        let err = move_kernel(t.path()).expect_err("must fail").to_string();
        assert!(err.contains("exactly one"), "{err}");
    }
}
